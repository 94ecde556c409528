//! Backend connections a backend said it would close, kept out of reuse.
//!
//! A backend's `Connection` lines are one list, and `close` anywhere in it means the backend
//! closes the connection after this answer (RFC 9112 §9.6): the proxy must not send it another
//! request. Pingora decides whether to pool a backend connection from the first `Connection`
//! line only, so an answer saying `Connection: keep-alive` then `Connection: close` (an app
//! that adds its own under a server that writes one) leaves the connection in the pool. The
//! next request sent on it is lost when the backend closes it; one that is not idempotent is
//! not retried, and fails 502.
//!
//! No hook can take a connection out of Pingora's pool, but every request that takes one
//! passes `connected_to_upstream` before its request is written. There, a pooled connection
//! recorded here is refused: Pingora closes it, and the request is sent again on another
//! connection, whatever its method, since none of it was sent.
//!
//! A connection is known by its descriptor. A descriptor recorded here stays with its
//! connection while the connection is open; once it is closed, the number can come back for
//! another connection, whose first request (not a reuse) forgets it. Nothing is held while no
//! backend says `close` that way: a request then reads one atomic.

use std::os::unix::io::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// The most descriptors remembered. Each one is forgotten when its connection is reused or its
/// number comes back; one whose connection a backend closed in the pool lingers until then.
const REMEMBERED: usize = 1024;

static ANY: AtomicBool = AtomicBool::new(false);
static SAID_CLOSE: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

/// The connection on `fd` (its answer is being relayed) is not to be reused.
pub fn said_close(fd: RawFd) {
    let mut fds = SAID_CLOSE.lock().unwrap_or_else(|e| e.into_inner());
    if fds.contains(&fd) {
        return;
    }
    if fds.len() == REMEMBERED {
        fds.remove(0);
    }
    fds.push(fd);
    ANY.store(true, Ordering::Release);
}

/// Whether a request about to be written on the connection on `fd` must not be: the connection
/// is a pooled one (`reused`) its backend said it would close. A recorded descriptor is
/// forgotten at its next use either way: its pooled connection is refused once (and closed), a
/// fresh connection that got the number again is not refused.
pub fn refuse(fd: RawFd, reused: bool) -> bool {
    if !ANY.load(Ordering::Acquire) {
        return false;
    }
    let mut fds = SAID_CLOSE.lock().unwrap_or_else(|e| e.into_inner());
    let Some(at) = fds.iter().position(|&f| f == fd) else {
        return false;
    };
    fds.remove(at);
    if fds.is_empty() {
        ANY.store(false, Ordering::Release);
    }
    reused
}

#[cfg(test)]
mod tests {
    use super::*;

    // One test: the record is the process's.
    #[test]
    fn a_connection_said_to_close_is_refused_once_and_a_new_one_on_its_number_is_not() {
        let fd = RawFd::MAX - 7;
        assert!(!refuse(fd, true), "nothing recorded");
        said_close(fd);
        said_close(fd);
        assert!(refuse(fd, true), "the pooled connection is refused");
        assert!(!refuse(fd, true), "once: it is closed then");
        // The connection was closed by the pool and its number came back for a new one.
        said_close(fd);
        assert!(!refuse(fd, false), "a new connection is not refused");
        assert!(!refuse(fd, true), "and its number is forgotten");
        // The record is bounded: the oldest goes first.
        for f in 0..=REMEMBERED as RawFd {
            said_close(RawFd::MAX - 10_000 - f);
        }
        assert!(
            !refuse(RawFd::MAX - 10_000, true),
            "the oldest was forgotten"
        );
        assert!(refuse(RawFd::MAX - 10_000 - 1, true));
        for f in 2..=REMEMBERED as RawFd {
            assert!(refuse(RawFd::MAX - 10_000 - f, true));
        }
        assert!(!ANY.load(Ordering::Acquire), "nothing left, nothing held");
    }
}
