//! A backend's addresses: every address its name resolves to, not only the first. Requests take
//! them in turn, a connection that cannot be made moves the request to the next one (nothing was
//! sent yet), and a background thread re-resolves the names every [`REFRESH`], so a backend
//! behind a cloud load balancer (several addresses, rotating) keeps working when one of them
//! goes away. DNS never runs on the request path: a table is resolved before it is swapped in,
//! and a refresh replaces a backend's list in place.
//!
//! An address that refused a connection (or let it time out) is passed over for [`EJECT`]
//! while the backend has others, as nginx's `max_fails=1 fail_timeout=10s` does: without
//! that, a dead address behind a name costs every n-th request a failed attempt (a whole
//! `connect_timeout` for one that drops packets). When every address is passed over, they are
//! all tried as if none were.

use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::state::State;

/// How often backend names are resolved again (Envoy's default DNS refresh rate).
pub const REFRESH: Duration = Duration::from_secs(5);

/// At most this many addresses are tried for one request before it fails (or fails over):
/// connect timeouts add up, and a client waits for all of them.
pub const MAX_TRIES: usize = 4;

/// How long an address that could not be connected to is passed over (nginx's default
/// `fail_timeout`).
pub const EJECT: Duration = Duration::from_secs(10);

/// The addresses of one backend, in the resolver's order, replaceable while requests use them.
pub struct Addresses {
    list: ArcSwap<Vec<SocketAddr>>,
    /// Round robin: the next request's first address.
    turn: AtomicUsize,
    /// Addresses passed over until the instant given (empty, one atomic load, while every
    /// address answers).
    ejected: ArcSwap<Vec<(SocketAddr, Instant)>>,
}

impl Addresses {
    pub fn new(list: Vec<SocketAddr>) -> Self {
        Addresses {
            list: ArcSwap::from_pointee(list),
            turn: AtomicUsize::new(0),
            ejected: ArcSwap::from_pointee(Vec::new()),
        }
    }

    /// The current list.
    pub fn load(&self) -> Arc<Vec<SocketAddr>> {
        self.list.load_full()
    }

    /// Where a new request starts in the list: each request one further than the last.
    pub fn turn(&self) -> usize {
        self.turn.fetch_add(1, Ordering::Relaxed)
    }

    /// The address at position `at` of the round robin (positions count on past the end).
    pub fn pick(&self, at: usize) -> Option<SocketAddr> {
        let list = self.list.load();
        (!list.is_empty()).then(|| list[at % list.len()])
    }

    /// The position of the next address to try, from `from` on and before `end`: the first
    /// one not passed over, or `from` when each of them is (they are all tried then).
    pub fn next_up(&self, from: usize, end: usize) -> usize {
        let ejected = self.ejected.load();
        if ejected.is_empty() {
            return from;
        }
        let now = Instant::now();
        if ejected.iter().all(|&(_, until)| until <= now) {
            self.ejected.store(Arc::new(Vec::new()));
            return from;
        }
        let list = self.list.load();
        if list.is_empty() {
            return from;
        }
        let passed_over = |a: SocketAddr| ejected.iter().any(|&(e, until)| e == a && until > now);
        (from..end)
            .find(|&at| !passed_over(list[at % list.len()]))
            .unwrap_or(from)
    }

    /// Passes `addr` over for [`EJECT`] after a failed connection, when the backend has
    /// another address to send requests to. Returns whether it was not passed over already.
    pub fn eject(&self, addr: SocketAddr) -> bool {
        if self.list.load().len() < 2 {
            return false;
        }
        let now = Instant::now();
        let mut newly = true;
        self.ejected.rcu(|old| {
            newly = !old.iter().any(|&(a, until)| a == addr && until > now);
            let mut v: Vec<_> = old
                .iter()
                .filter(|&&(a, until)| a != addr && until > now)
                .copied()
                .collect();
            v.push((addr, now + EJECT));
            v
        });
        newly
    }

    /// How many addresses there are.
    pub fn count(&self) -> usize {
        self.list.load().len()
    }

    /// How many addresses a request may try.
    pub fn tries(&self) -> usize {
        self.list.load().len().min(MAX_TRIES)
    }

    /// Replaces the list when it holds other addresses (the resolver's order may rotate
    /// between answers: that is not a change). Returns whether it changed.
    pub fn replace(&self, mut new: Vec<SocketAddr>) -> bool {
        let mut old = self.list.load().as_ref().clone();
        old.sort();
        let mut sorted = new.clone();
        sorted.sort();
        sorted.dedup();
        if sorted == old {
            return false;
        }
        dedup_keep_order(&mut new);
        self.list.store(Arc::new(new));
        true
    }
}

impl Default for Addresses {
    fn default() -> Self {
        Addresses::new(Vec::new())
    }
}

impl Clone for Addresses {
    fn clone(&self) -> Self {
        Addresses::new(self.load().as_ref().clone())
    }
}

impl fmt::Debug for Addresses {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.load().iter()).finish()
    }
}

fn dedup_keep_order(list: &mut Vec<SocketAddr>) {
    let mut seen = std::collections::HashSet::new();
    list.retain(|a| seen.insert(*a));
}

/// Every address `host:port` resolves to (an IP literal: itself), without duplicates.
pub fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let mut list: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| e.to_string())?
        .collect();
    dedup_keep_order(&mut list);
    if list.is_empty() {
        return Err("no address".into());
    }
    Ok(list)
}

/// Whether `host` is a name (something DNS answers for), not an IP literal.
pub fn is_name(host: &str) -> bool {
    host.parse::<IpAddr>().is_err()
}

/// Re-resolves the named backends of the table in force every `every`, for as long as the
/// process runs. A name that stops resolving keeps its last addresses (logged once).
pub fn spawn_refresher(state: Arc<State>, every: Duration) {
    let spawned = std::thread::Builder::new()
        .name("strangler dns".into())
        .spawn(move || {
            let mut failing = std::collections::HashSet::new();
            loop {
                std::thread::sleep(every);
                let live = state.snapshot();
                for b in live.table.backends.iter().filter(|b| is_name(&b.host)) {
                    match resolve(&b.host, b.port) {
                        Ok(list) => {
                            failing.remove(&*b.name);
                            let shown = format!("{list:?}");
                            if b.addrs.replace(list) {
                                log::info!(
                                    "backend {:?} ({}) now resolves to {shown}",
                                    b.name,
                                    b.host
                                );
                            }
                        }
                        Err(e) => {
                            if failing.insert(b.name.to_string()) {
                                log::warn!(
                                    "backend {:?}: cannot resolve {} ({e}); keeping {:?}",
                                    b.name,
                                    b.host,
                                    b.addrs
                                );
                            }
                        }
                    }
                }
            }
        });
    if let Err(e) = spawned {
        log::error!("cannot start the DNS refresh thread: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn requests_take_turns_and_retries_move_to_the_next_address() {
        let addrs = Addresses::new(vec![a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80")]);
        let firsts: Vec<_> = (0..4).map(|_| addrs.pick(addrs.turn()).unwrap()).collect();
        assert_eq!(
            firsts,
            [
                a("10.0.0.1:80"),
                a("10.0.0.2:80"),
                a("10.0.0.3:80"),
                a("10.0.0.1:80")
            ]
        );
        let turn = 2;
        let tried: Vec<_> = (0..addrs.tries())
            .map(|t| addrs.pick(turn + t).unwrap())
            .collect();
        assert_eq!(
            tried,
            [a("10.0.0.3:80"), a("10.0.0.1:80"), a("10.0.0.2:80")]
        );
        assert_eq!(Addresses::default().pick(0), None);
        let many = Addresses::new((1..=9).map(|i| a(&format!("10.0.0.{i}:80"))).collect());
        assert_eq!(many.tries(), MAX_TRIES);
    }

    #[test]
    fn an_address_that_failed_is_passed_over_while_another_answers() {
        let addrs = Addresses::new(vec![a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80")]);
        assert_eq!(addrs.next_up(0, 3), 0);
        assert!(addrs.eject(a("10.0.0.1:80")));
        assert!(!addrs.eject(a("10.0.0.1:80")), "already passed over");
        // Every request starts on an address that answers; a retry moves on past the one
        // that just failed, never back to an earlier position.
        assert_eq!(addrs.next_up(0, 3), 1);
        assert_eq!(addrs.next_up(3, 6), 4);
        assert_eq!(addrs.next_up(2, 3), 2);
        assert!(addrs.eject(a("10.0.0.2:80")));
        assert_eq!(addrs.next_up(0, 3), 2);
        assert_eq!(addrs.next_up(1, 3), 2);
        // All passed over: tried in turn all the same.
        assert!(addrs.eject(a("10.0.0.3:80")));
        assert_eq!(addrs.next_up(1, 4), 1);
        // The only address of a backend is never passed over: there is no other to take.
        let one = Addresses::new(vec![a("10.0.0.9:80")]);
        assert!(!one.eject(a("10.0.0.9:80")));
        assert_eq!(one.next_up(5, 6), 5);
    }

    #[test]
    fn a_reordered_answer_is_no_change_and_a_new_address_is() {
        let addrs = Addresses::new(vec![a("10.0.0.1:80"), a("10.0.0.2:80")]);
        assert!(!addrs.replace(vec![a("10.0.0.2:80"), a("10.0.0.1:80")]));
        assert_eq!(addrs.load().as_ref(), &[a("10.0.0.1:80"), a("10.0.0.2:80")]);
        assert!(addrs.replace(vec![a("10.0.0.3:80"), a("10.0.0.2:80"), a("10.0.0.3:80")]));
        assert_eq!(addrs.load().as_ref(), &[a("10.0.0.3:80"), a("10.0.0.2:80")]);
    }

    #[test]
    fn literals_resolve_to_themselves_and_are_not_names() {
        assert_eq!(resolve("127.0.0.1", 9).unwrap(), [a("127.0.0.1:9")]);
        assert_eq!(resolve("::1", 9).unwrap(), [a("[::1]:9")]);
        assert!(!is_name("::1") && !is_name("10.1.2.3") && is_name("api.internal"));
        assert!(resolve("name.invalid", 9).is_err());
    }
}
