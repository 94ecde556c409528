//! The sliding window behind automatic rollback (SPEC §5): per route, how many requests went to
//! its `to` and how many of them failed, over the last `window`. Lock-free: every request adds
//! to one slot with atomic increments; a slot older than the window is recycled by the first
//! request that lands on it. The window is cut in `SLOTS` slots, so it slides in steps of
//! `window / SLOTS`.

use std::sync::atomic::{
    AtomicU64,
    Ordering::{Acquire, Relaxed, Release},
};
use std::time::{Duration, Instant};

const SLOTS: usize = 20;

/// Where [`Window::record_in`] counted a request: its generation and its slot's epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Counted {
    generation: u64,
    epoch: u64,
}

/// Requests and failures, packed in one u64 per slot together with the slot's epoch so that a
/// recycle and an increment never tear: high 24 bits epoch, then 20 bits requests, 20 failures.
/// A slot that reaches 2^20 - 1 requests stops counting (see `record`).
#[derive(Debug)]
pub struct Window {
    origin: Instant,
    slots: [AtomicU64; SLOTS],
    /// How many times the window was cleared: see [`Window::generation`].
    generation: AtomicU64,
}

const COUNT_BITS: u32 = 20;
const COUNT_MASK: u64 = (1 << COUNT_BITS) - 1;
const EPOCH_MASK: u64 = (1 << 24) - 1;

fn pack(epoch: u64, requests: u64, failures: u64) -> u64 {
    ((epoch & EPOCH_MASK) << (2 * COUNT_BITS))
        | (requests.min(COUNT_MASK) << COUNT_BITS)
        | failures.min(COUNT_MASK)
}

fn unpack(v: u64) -> (u64, u64, u64) {
    (
        v >> (2 * COUNT_BITS),
        (v >> COUNT_BITS) & COUNT_MASK,
        v & COUNT_MASK,
    )
}

impl Default for Window {
    fn default() -> Self {
        Window {
            origin: Instant::now(),
            slots: Default::default(),
            generation: AtomicU64::new(0),
        }
    }
}

impl Window {
    fn epoch(&self, now: Instant, window: Duration) -> u64 {
        let step = (window.as_nanos() / SLOTS as u128).max(1);
        (now.saturating_duration_since(self.origin).as_nanos() / step) as u64 + 1
    }

    /// Counts one request (and whether it failed) at `now`.
    pub fn record(&self, now: Instant, window: Duration, failed: bool) {
        self.add(now, window, 1, u64::from(failed));
    }

    /// The window's generation, which [`Window::clear`] moves on. A request notes it when it
    /// is sent and passes it with its outcome: an outcome from before a clear does not count
    /// after it (a slow request sent to the backend a reload replaced, or sent before a pin
    /// that has since been lifted, must not judge the fresh start).
    pub fn generation(&self) -> u64 {
        self.generation.load(Acquire)
    }

    /// [`Window::record`] for a request sent in `generation`: nothing if the window has been
    /// cleared since. Says where the request was counted, for [`Window::fail_counted`].
    pub fn record_in(
        &self,
        generation: u64,
        now: Instant,
        window: Duration,
        failed: bool,
    ) -> Option<Counted> {
        if generation != self.generation() {
            return None;
        }
        let epoch = self.add(now, window, 1, u64::from(failed))?;
        Some(Counted { generation, epoch })
    }

    /// Turns a request already counted as a success into a failure: its backend broke off or
    /// stalled after the response header that judged it. Only while that success is still in
    /// the window: a response that outlasted it was sent before the window began, and is no
    /// longer one of the requests whose share is judged. Nothing after a clear either.
    pub fn fail_counted(&self, counted: Counted) {
        if counted.generation != self.generation() {
            return;
        }
        let slot = &self.slots[counted.epoch as usize % SLOTS];
        let mut cur = slot.load(Relaxed);
        loop {
            let (e, r, f) = unpack(cur);
            if e != counted.epoch || f >= r {
                // Recycled for a later step: the success has left the window.
                return;
            }
            match slot.compare_exchange_weak(cur, pack(e, r, f + 1), Relaxed, Relaxed) {
                Ok(_) => return,
                Err(actual) => cur = actual,
            }
        }
    }

    /// Adds to the slot of `now`; returns its epoch, or `None` when the slot was full and did
    /// not count.
    fn add(&self, now: Instant, window: Duration, requests: u64, failures: u64) -> Option<u64> {
        let epoch = self.epoch(now, window) & EPOCH_MASK;
        let slot = &self.slots[epoch as usize % SLOTS];
        let mut cur = slot.load(Relaxed);
        loop {
            let (e, r, f) = unpack(cur);
            let next = if e == epoch {
                if r >= COUNT_MASK {
                    // A full slot stops counting both: its first 2^20 requests stand for the
                    // rest, so the failure share stays what it was (counting failures alone on
                    // would inflate it and pin a healthy route).
                    return None;
                }
                pack(epoch, r + requests, f + failures)
            } else {
                pack(epoch, requests, failures)
            };
            match slot.compare_exchange_weak(cur, next, Relaxed, Relaxed) {
                Ok(_) => return Some(epoch),
                Err(actual) => cur = actual,
            }
        }
    }

    /// Requests and failures within the window ending at `now`.
    pub fn totals(&self, now: Instant, window: Duration) -> (u64, u64) {
        let epoch = self.epoch(now, window) & EPOCH_MASK;
        let mut requests = 0;
        let mut failures = 0;
        for slot in &self.slots {
            let (e, r, f) = unpack(slot.load(Relaxed));
            // Live slots are this epoch and the SLOTS-1 before it.
            if e != 0 && epoch.wrapping_sub(e) & EPOCH_MASK < SLOTS as u64 {
                requests += r;
                failures += f;
            }
        }
        (requests, failures)
    }

    /// Forgets everything (after a pin is lifted, the route starts with a clean slate), and
    /// starts a new generation: outcomes of requests sent before are not counted.
    pub fn clear(&self) {
        self.generation.fetch_add(1, Release);
        for slot in &self.slots {
            slot.store(0, Relaxed);
        }
    }
}

/// Whether these totals call for a rollback: at least `min_requests`, and a failure share of at
/// least `percent` %. Compared exactly, in millionths (a percentage is kept to four decimals): in
/// floating point `0.07 × 100` is `7.000000000000001`, and 7 failures of 100 would miss 7 %.
pub fn should_roll_back(requests: u64, failures: u64, min_requests: u64, percent: f64) -> bool {
    let millionths = (percent * 10_000.0).round() as u128;
    requests >= min_requests
        && requests > 0
        && u128::from(failures) * 1_000_000 >= millionths * u128::from(requests)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_within_the_window_and_forgets_after() {
        let w = Window::default();
        let t0 = w.origin;
        let win = Duration::from_secs(60);
        for i in 0..10 {
            w.record(t0 + Duration::from_secs(i), win, i % 2 == 0);
        }
        assert_eq!(w.totals(t0 + Duration::from_secs(10), win), (10, 5));
        // 61 s later the first three seconds (one slot) have left the window.
        let (r, _) = w.totals(t0 + Duration::from_secs(63), win);
        assert!(r < 10, "{r}");
        assert_eq!(w.totals(t0 + Duration::from_secs(200), win), (0, 0));
        w.clear();
        assert_eq!(w.totals(t0 + Duration::from_secs(10), win), (0, 0));
    }

    #[test]
    fn an_outcome_from_before_a_clear_does_not_count_after_it() {
        let w = Window::default();
        let t0 = w.origin;
        let win = Duration::from_secs(60);
        let sent = w.generation();
        let counted = w.record_in(sent, t0, win, false).expect("counted");
        w.clear();
        // Sent before the clear, ended after it: neither counted nor turned into a failure.
        assert_eq!(w.record_in(sent, t0, win, true), None);
        w.fail_counted(counted);
        assert_eq!(w.totals(t0, win), (0, 0));
        let now = w.generation();
        assert_ne!(now, sent);
        let counted = w.record_in(now, t0, win, false).expect("counted");
        w.fail_counted(counted);
        assert_eq!(w.totals(t0, win), (1, 1));
    }

    #[test]
    fn a_success_turns_into_a_failure_only_while_it_is_in_the_window() {
        let w = Window::default();
        let t0 = w.origin;
        let win = Duration::from_secs(3);
        let g = w.generation();
        // Two long responses judged good at their header, at t0.
        let long = [
            w.record_in(g, t0, win, false).expect("counted"),
            w.record_in(g, t0, win, false).expect("counted"),
        ];
        // Still in the window: the first one breaks off.
        w.fail_counted(long[0]);
        assert_eq!(w.totals(t0 + Duration::from_secs(1), win), (2, 1));
        // The second breaks off four seconds later, when both have left the 3 s window: sent
        // before it, it is not judged in it.
        let later = t0 + Duration::from_secs(4);
        w.fail_counted(long[1]);
        assert_eq!(w.totals(later, win), (0, 0));
        // Nor does it land on a later request's count when its slot has been recycled (one
        // slot is 150 ms; 6 s later the ring is round twice).
        let (a, b) = (
            w.record_in(g, t0, win, false).expect("counted"),
            w.record_in(g, t0, win, false).expect("counted"),
        );
        let recycled = t0 + Duration::from_secs(6);
        w.record_in(g, recycled, win, false).expect("counted");
        w.fail_counted(a);
        w.fail_counted(b);
        assert_eq!(w.totals(recycled, win), (1, 0));
    }

    #[test]
    fn a_full_slot_keeps_its_failure_share() {
        let w = Window::default();
        let t0 = w.origin;
        let win = Duration::from_secs(24 * 3600);
        // One slot of a 24 h window lasts 72 min: 3 million requests in it, one in ten failed.
        for i in 0..3_000_000u64 {
            w.record(t0, win, i % 10 == 0);
        }
        let (r, f) = w.totals(t0, win);
        assert_eq!(r, COUNT_MASK);
        let share = f as f64 / r as f64;
        assert!((share - 0.1).abs() < 0.001, "{f} of {r}");
    }

    #[test]
    fn the_rule() {
        assert!(should_roll_back(10, 10, 10, 50.0));
        assert!(should_roll_back(10, 5, 10, 50.0));
        assert!(!should_roll_back(9, 9, 10, 50.0));
        assert!(!should_roll_back(10, 2, 10, 50.0));
        // "At least" holds exactly on the boundary, whatever floating point makes of the rate.
        for (pct, failures, requests) in [
            (7.0, 7, 100),
            (14.0, 7, 50),
            (28.0, 7, 25),
            (55.0, 55, 100),
            (56.0, 14, 25),
            (14.3, 143, 1000),
            (0.1, 1, 1000),
        ] {
            assert!(
                should_roll_back(requests, failures, 1, pct),
                "{failures}/{requests} at {pct}%"
            );
            assert!(
                !should_roll_back(requests, failures - 1, 1, pct),
                "{}/{requests} at {pct}%",
                failures - 1
            );
        }
    }
}
