//! A backend's addresses: every address its name resolves to, not only the first. Requests take
//! them in turn, a connection that cannot be made moves the request to the next one (nothing was
//! sent yet), and a background thread re-resolves the names every [`REFRESH`], so a backend
//! behind a cloud load balancer (several addresses, rotating) keeps working when one of them
//! goes away. DNS never runs on the request path: a table is resolved before it is swapped in,
//! and a refresh replaces a backend's list in place.
//!
//! An address that refused a connection (or let it time out) is passed over while the backend
//! has others, and every [`EJECT`] one request tries it again, until it answers, as nginx's
//! `max_fails=1 fail_timeout=10s` does: without that, a dead address behind a name costs every
//! n-th request a failed attempt (a whole `connect_timeout` for one that drops packets). When
//! every address is passed over, they are all tried as if none were.

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

/// An address to connect to, and whether it is a passed-over one tried again (whose answer
/// ends its being passed over: [`Addresses::answered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pick {
    pub addr: SocketAddr,
    pub probe: bool,
}

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

    /// The address to try next for a request that started at `turn` and has tried those
    /// `tried` says, `None` once every address has been tried (or there is none):
    /// - while none is passed over, the first untried one in round-robin order from `turn`;
    /// - else, when `may_probe` (a request's first attempt), an address whose [`EJECT`] is
    ///   over, given to this request alone to try again (the others pass it over for another
    ///   `EJECT`), as nginx lets one request probe a server after its `fail_timeout`;
    /// - else one of the untried addresses not passed over, by `turn` (so the share of one
    ///   passed over is spread over all the others, not left to its neighbour);
    /// - else, every untried one being passed over, the first untried one in turn.
    pub fn next(
        &self,
        turn: usize,
        tried: impl Fn(SocketAddr) -> bool,
        may_probe: bool,
    ) -> Option<Pick> {
        let list = self.list.load();
        let n = list.len();
        let in_turn = || {
            (0..n)
                .map(|i| list[turn.wrapping_add(i) % n])
                .find(|&a| !tried(a))
                .map(|addr| Pick { addr, probe: false })
        };
        let ejected = self.ejected.load();
        if ejected.is_empty() {
            return in_turn();
        }
        let now = Instant::now();
        let until = |a: SocketAddr| ejected.iter().find(|e| e.0 == a).map(|e| e.1);
        if may_probe {
            let due = (0..n)
                .map(|i| list[turn.wrapping_add(i) % n])
                .filter(|&a| !tried(a) && until(a).is_some_and(|u| u <= now))
                .find(|&a| self.take_probe(a, now));
            if let Some(addr) = due {
                return Some(Pick { addr, probe: true });
            }
        }
        let answering: Vec<SocketAddr> = list
            .iter()
            .copied()
            .filter(|&a| !tried(a) && until(a).is_none())
            .collect();
        if !answering.is_empty() {
            let addr = answering[turn % answering.len()];
            return Some(Pick { addr, probe: false });
        }
        in_turn()
    }

    /// Gives the retry of `addr`, whose time out is over, to the caller alone: the others pass
    /// it over for another [`EJECT`]. Whether the caller got it.
    fn take_probe(&self, addr: SocketAddr, now: Instant) -> bool {
        let mut taken = false;
        self.ejected.rcu(|old| {
            taken = false;
            let mut v = old.as_ref().clone();
            if let Some(e) = v.iter_mut().find(|e| e.0 == addr && e.1 <= now) {
                e.1 = now + EJECT;
                taken = true;
            }
            v
        });
        taken
    }

    /// Passes `addr` over for [`EJECT`] after a failed connection, when the backend has
    /// another address to send requests to. Whether it was answering until now (not passed
    /// over, nor being tried again after being passed over).
    pub fn eject(&self, addr: SocketAddr) -> bool {
        let list = self.list.load();
        if list.len() < 2 {
            return false;
        }
        let now = Instant::now();
        let mut newly = true;
        self.ejected.rcu(|old| {
            newly = !old.iter().any(|&(a, _)| a == addr);
            let mut v: Vec<_> = old
                .iter()
                .filter(|&&(a, _)| a != addr && list.contains(&a))
                .copied()
                .collect();
            v.push((addr, now + EJECT));
            v
        });
        newly
    }

    /// Takes over what `old` (the same host and port, in the table a reload replaces) knows:
    /// the addresses passed over that are still in this list, and where the round robin is.
    pub fn inherit(&self, old: &Addresses) {
        let list = self.list.load();
        let ejected: Vec<_> = old
            .ejected
            .load()
            .iter()
            .filter(|(a, _)| list.contains(a))
            .copied()
            .collect();
        if !ejected.is_empty() {
            self.ejected.store(Arc::new(ejected));
        }
        self.turn
            .store(old.turn.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    /// `addr`, tried again after being passed over, answered: it is no longer passed over.
    pub fn answered(&self, addr: SocketAddr) {
        if self.ejected.load().iter().any(|&(a, _)| a == addr) {
            self.ejected.rcu(|old| {
                old.iter()
                    .filter(|&&(a, _)| a != addr)
                    .copied()
                    .collect::<Vec<_>>()
            });
        }
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

    /// The address a request's first attempt gets, without a probe.
    fn first(addrs: &Addresses, turn: usize) -> Option<SocketAddr> {
        addrs.next(turn, |_| false, false).map(|p| p.addr)
    }

    /// The addresses a request tries, in order, when every attempt fails.
    fn walk(addrs: &Addresses, turn: usize) -> Vec<SocketAddr> {
        let mut tried = Vec::new();
        while tried.len() < addrs.tries() {
            let Some(p) = addrs.next(turn, |a| tried.contains(&a), tried.is_empty()) else {
                break;
            };
            tried.push(p.addr);
        }
        tried
    }

    #[test]
    fn requests_take_turns_and_retries_move_to_the_next_address() {
        let addrs = Addresses::new(vec![a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80")]);
        let firsts: Vec<_> = (0..4)
            .map(|_| first(&addrs, addrs.turn()).unwrap())
            .collect();
        assert_eq!(
            firsts,
            [
                a("10.0.0.1:80"),
                a("10.0.0.2:80"),
                a("10.0.0.3:80"),
                a("10.0.0.1:80")
            ]
        );
        assert_eq!(
            walk(&addrs, 2),
            [a("10.0.0.3:80"), a("10.0.0.1:80"), a("10.0.0.2:80")]
        );
        assert_eq!(first(&Addresses::default(), 0), None);
        let many = Addresses::new((1..=9).map(|i| a(&format!("10.0.0.{i}:80"))).collect());
        assert_eq!(many.tries(), MAX_TRIES);
    }

    #[test]
    fn an_address_that_failed_is_passed_over_while_another_answers() {
        let (one, two, three) = (a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80"));
        let addrs = Addresses::new(vec![one, two, three]);
        assert!(addrs.eject(one));
        assert!(!addrs.eject(one), "already passed over");
        // Requests start on an address that answers; a request whose attempts all fail tries
        // each address once, the one passed over last.
        assert_eq!(first(&addrs, 0), Some(two));
        assert_eq!(walk(&addrs, 0), [two, three, one]);
        assert_eq!(walk(&addrs, 1), [three, two, one]);
        assert!(addrs.eject(three));
        assert_eq!(walk(&addrs, 2), [two, three, one]);
        // Every one passed over: each still tried, in turn.
        assert!(addrs.eject(two));
        assert_eq!(walk(&addrs, 1), [two, three, one]);
        // The only address of a backend is never passed over: there is no other to take.
        let single = Addresses::new(vec![one]);
        assert!(!single.eject(one));
        assert_eq!(first(&single, 5), Some(one));
    }

    #[test]
    fn the_share_of_one_passed_over_is_spread_over_the_others() {
        let list: Vec<_> = (1..=4).map(|i| a(&format!("10.0.0.{i}:80"))).collect();
        let addrs = Addresses::new(list.clone());
        addrs.eject(list[0]);
        let mut count = std::collections::HashMap::new();
        for turn in 0..300 {
            *count.entry(first(&addrs, turn).unwrap()).or_insert(0) += 1;
        }
        assert_eq!(count.get(&list[0]), None);
        for a in &list[1..] {
            assert_eq!(count[a], 100, "{count:?}");
        }
    }

    #[test]
    fn a_reload_keeps_what_is_passed_over() {
        let (one, two, three) = (a("10.0.0.1:80"), a("10.0.0.2:80"), a("10.0.0.3:80"));
        let old = Addresses::new(vec![one, two, three]);
        old.eject(one);
        old.eject(three);
        old.turn();
        let new = Addresses::new(vec![two, one]);
        new.inherit(&old);
        assert_eq!(first(&new, 0), Some(two));
        assert_eq!(new.ejected.load().as_ref().len(), 1, "three left the list");
        assert_eq!(new.turn(), 1);
    }

    #[test]
    fn once_its_time_is_over_one_first_attempt_tries_it_again() {
        let (one, two) = (a("10.0.0.1:80"), a("10.0.0.2:80"));
        let addrs = Addresses::new(vec![one, two]);
        addrs.eject(one);
        // As if the EJECT had run out.
        addrs.ejected.store(Arc::new(vec![(one, Instant::now())]));
        // Not a retry, nor a shadow copy (which could not tell the answer).
        assert_eq!(
            addrs.next(0, |a| a == two, false).map(|p| p.addr),
            Some(one)
        );
        assert_eq!(first(&addrs, 0), Some(two));
        assert_eq!(
            addrs.next(0, |_| false, true),
            Some(Pick {
                addr: one,
                probe: true
            }),
            "the probe"
        );
        assert_eq!(
            addrs.next(0, |_| false, true).map(|p| p.addr),
            Some(two),
            "the others still pass it over"
        );
        // The probe failed: still passed over, and not reported as newly failing.
        assert!(!addrs.eject(one));
        assert_eq!(first(&addrs, 0), Some(two));
        // The probe answered: no longer passed over.
        addrs.answered(one);
        assert_eq!(first(&addrs, 0), Some(one));
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
