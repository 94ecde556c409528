//! The allocator's settings. The binaries use mimalloc (`#[global_allocator]` in `main.rs` and
//! in the bare-Pingora baseline): about 20 % fewer instructions per proxied request than glibc's
//! malloc. Its defaults keep freed memory for a second before returning it, which a proxy
//! streaming large bodies pays in RSS; [`tune`] makes it return memory at once.

/// mimalloc's `mi_option_t` values used here, from the `mimalloc.h` vendored by
/// libmimalloc-sys 0.1.49 (pinned in Cargo.lock; `tests::option_indices` checks them against
/// the library's defaults, so an upgrade that moves them fails the tests).
const MI_OPTION_ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;
const MI_OPTION_PURGE_DECOMMITS: libmimalloc_sys::mi_option_t = 5;
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long freed memory stays mapped before it goes back to the OS.
const PURGE_DELAY_MS: std::ffi::c_long = 0;

/// Returns freed memory to the OS at once (decommit, no delay). Measured with 64 clients
/// streaming 1 MiB bodies: peak RSS ~100 MiB with mimalloc's defaults, ~77 MiB with these, at
/// no measurable CPU cost (BENCHMARKS.md, "Allocator"). Call first thing in `main`.
/// mimalloc's own `MIMALLOC_*` environment variables still win: an option set there is left
/// alone.
pub fn tune() {
    for (option, env, value) in [
        (
            MI_OPTION_PURGE_DELAY,
            "MIMALLOC_PURGE_DELAY",
            PURGE_DELAY_MS,
        ),
        (MI_OPTION_PURGE_DECOMMITS, "MIMALLOC_PURGE_DECOMMITS", 1),
        (
            MI_OPTION_ARENA_EAGER_COMMIT,
            "MIMALLOC_ARENA_EAGER_COMMIT",
            0,
        ),
    ] {
        if std::env::var_os(env).is_none() {
            // SAFETY: a plain option setter of the allocator, called before any thread starts.
            unsafe { libmimalloc_sys::mi_option_set(option, value) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hand-copied option indices still name the options meant: their defaults in the
    /// vendored mimalloc are arena_eager_commit 2, purge_decommits 1, purge_delay 1000 (ms).
    #[test]
    fn option_indices() {
        // SAFETY: read-only option getters.
        let get = |o| unsafe { libmimalloc_sys::mi_option_get(o) };
        assert_eq!(get(MI_OPTION_ARENA_EAGER_COMMIT), 2);
        assert_eq!(get(MI_OPTION_PURGE_DECOMMITS), 1);
        assert_eq!(get(MI_OPTION_PURGE_DELAY), 1000);
    }
}
