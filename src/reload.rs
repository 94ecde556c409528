//! Hot reload (SPEC §6) as a Pingora background service: watches routing.yaml's directory
//! (editors that save by rename, in-place writes, Kubernetes ConfigMaps that swap a `..data`
//! symlink), takes SIGHUP, debounces bursts, waits for a writer saving in place to close the
//! file, and reloads only when the file's bytes changed.
//! The reload itself — build, validate, one atomic swap — is `State::reload`.
//!
//! The watcher watches the directory, not the file: a rename or symlink swap replaces the
//! file's inode, and a watch on the old inode would go silent. A slow poll backs the watcher up
//! on filesystems where inotify sees nothing (NFS, some overlay mounts).
//!
//! Reloads must not take the serving threads' time: they run at a lower priority, and a file
//! rewritten faster than it can be loaded is loaded at a bounded duty cycle, always in its
//! latest version (`RELOAD_NICENESS`, `RELOAD_DUTY_WAIT`, `RELOAD_WAIT_MAX`).

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use notify::event::{AccessKind, AccessMode, ModifyKind};
use notify::{EventKind, RecursiveMode, Watcher};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::config::sha256_hex;
use crate::state::State;

/// Events closer together than this are one change (an editor writes, renames, chmods).
const DEBOUNCE: Duration = Duration::from_millis(25);
/// A file written in place is read once its writer closes it: before, it may hold half the new
/// version, which can even validate (a table cut after its first routes) and lift the pins of
/// the routes it lacks. A writer that keeps the file open is waited for until it has written
/// nothing for this long.
const WRITER_QUIET: Duration = Duration::from_millis(500);
/// What the loop remembers of a config file it could not read: once, then reported.
const MISSING_ONCE: &str = "missing once";
const MISSING: &str = "missing";
/// What it remembers of an empty config file seen once (see `EMPTY_DIGEST`).
const EMPTY_ONCE: &str = "empty once";
/// The SHA-256 of no bytes. An empty file is what a writer saving in place leaves between its
/// truncation and its first write. A look woken by something else (another file's event in the
/// directory, the poll) can fall in that instant, before the truncation's own event has
/// arrived; the writer is then not known to be writing. So an empty file is reported only when
/// seen a second time, and not while a writer holds it open (`WRITER_OPEN_MAX`): at its
/// writer's close, or at a later poll.
const EMPTY_DIGEST: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// How long a writer that truncated the file and keeps it open (`cmd > routing.yaml` where
/// `cmd` thinks before it prints) may leave it empty before the empty file is reported.
const WRITER_OPEN_MAX: Duration = Duration::from_secs(30);

/// Why an automatic reload ran, as its log line and audit records say.
const CHANGED: &str = "file changed";
/// A change no watcher event announced: if every reload says so, the watcher does not see this
/// file's changes (a network file system, a link it does not follow), and edits are served up
/// to a second late.
const CHANGED_UNANNOUNCED: &str = "file changed, found by the poll";
/// The same version again, after a backend name did not resolve (see UNRESOLVED_RETRY_MAX).
const RETRY_DNS: &str = "retry, a backend name did not resolve";

/// The fallback poll. Also how long a file seen missing or empty must stay so before it is
/// reported (an editor's delete-then-write, a writer's truncate-then-write are not).
const POLL: Duration = Duration::from_secs(1);

/// The longest one look waits for writers saving in place: a file rewritten in place without
/// pause (each writer opening it within the debounce of the last one's close) is still read.
const WRITER_WAIT_MAX: Duration = Duration::from_secs(5);

/// A file whose only fault was a backend name that did not resolve is tried again: after 1 s,
/// then twice as long each time, up to this.
const UNRESOLVED_RETRY_MAX: Duration = Duration::from_secs(30);

/// Whether what the loop remembers as tried is a sighting of the file missing or empty, not yet
/// reported (see POLL, EMPTY_DIGEST).
fn is_absent(tried: Option<&str>) -> bool {
    matches!(tried, Some(MISSING_ONCE | EMPTY_ONCE))
}

/// Why an automatic reload runs: a retry of the version that failed in DNS, or a change the
/// watcher announced, or one only the poll found.
fn reason(retrying: bool, announced: bool) -> &'static str {
    if retrying {
        RETRY_DNS
    } else if announced {
        CHANGED
    } else {
        CHANGED_UNANNOUNCED
    }
}

/// The wait before `version`, which just failed in DNS, is tried again: twice the last wait when
/// it is the version that failed before, else from the start; between POLL and
/// UNRESOLVED_RETRY_MAX.
fn retry_wait(failed_before: Option<&str>, last_wait: Duration, version: &str) -> Duration {
    let last = if failed_before == Some(version) {
        last_wait
    } else {
        Duration::ZERO
    };
    (last * 2).clamp(POLL, UNRESOLVED_RETRY_MAX)
}

/// What one look at the file did, for the loop to remember.
#[derive(Debug, Default)]
struct Look {
    /// What to remember as tried: the version's digest, or a MISSING / EMPTY marker.
    tried: Option<String>,
    /// The CPU time of a reload, when one ran (see RELOAD_DUTY_WAIT).
    cost: Option<Duration>,
    /// The version (digest) that failed only in DNS.
    unresolved: Option<String>,
    /// The version that failed in DNS, looked at before its retry was due: nothing changed.
    /// Also a look that could not read for want of descriptors or memory, or left what it read.
    not_due: bool,
    /// A writer may have been at work during the look: what it read is left, and the loop
    /// looks again (the writer's events may be queued still, or taken before the decision).
    look_again: bool,
}

impl Look {
    fn tried(tried: String, cost: Option<Duration>) -> Look {
        Look {
            tried: Some(tried),
            cost,
            ..Look::default()
        }
    }

    fn unresolved(version: String, cost: Option<Duration>) -> Look {
        Look {
            unresolved: Some(version),
            cost,
            ..Look::default()
        }
    }

    fn not_due() -> Look {
        Look {
            not_due: true,
            ..Look::default()
        }
    }

    fn look_again() -> Look {
        Look {
            not_due: true,
            look_again: true,
            ..Look::default()
        }
    }
}

/// The reloader service.
pub struct Reloader {
    pub state: Arc<State>,
}

#[derive(Debug)]
enum Trigger {
    /// Something changed in a watched directory.
    File,
    /// The fallback poll ticked.
    Poll,
    /// Bytes were written into (or cut from) the file of this name, in place.
    Written(OsString),
    /// A file of this name was created: a writer may be about to write it (a new file opened
    /// for writing shows no write until its first bytes).
    Created(OsString),
    /// A writer closed the file of this name.
    Closed(OsString),
    Signal,
}

/// Writes into the config file (under its names) and creations of it, counted on the watcher's
/// thread as it sees them, not in the reload loop: a look compares the count at the end of its
/// read with the count when it was decided, and so learns that a writer began meanwhile.
/// An event is counted once it is sent: a count the loop took before it drains its queue
/// covers no event it will not find there.
#[derive(Debug, Default)]
struct WritesSeen {
    count: std::sync::atomic::AtomicU64,
    names: std::sync::Mutex<Vec<OsString>>,
}

impl WritesSeen {
    /// Whether the event is a write into (or the creation of) the config file.
    fn counts(&self, t: &Trigger) -> bool {
        matches!(t, Trigger::Written(n) | Trigger::Created(n) if self.names().contains(n))
    }

    fn add(&self) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    fn names(&self) -> std::sync::MutexGuard<'_, Vec<OsString>> {
        self.names.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Whether a writer may still be writing the config file in place: bytes written into it (under
/// its own name or its symlink target's) and not closed since. `unclosed` is when the last
/// bytes were written.
#[derive(Debug, Default)]
struct InPlaceWrite {
    names: Vec<OsString>,
    unclosed: Option<tokio::time::Instant>,
}

impl InPlaceWrite {
    fn note(&mut self, t: &Trigger) {
        match t {
            Trigger::Written(n) | Trigger::Created(n) if self.names.contains(n) => {
                self.unclosed = Some(tokio::time::Instant::now())
            }
            Trigger::Closed(n) if self.names.contains(n) => self.unclosed = None,
            _ => {}
        }
    }

    /// Whether a watcher event may stand for a change of the config file. Bytes written into
    /// another file of its directory (a log file beside it) do not.
    fn may_concern(&self, t: &Trigger) -> bool {
        match t {
            Trigger::Written(n) | Trigger::Closed(n) => self.names.contains(n),
            Trigger::Poll => false,
            // A created link or directory of another name can be on the file's path.
            Trigger::Created(_) | Trigger::File | Trigger::Signal => true,
        }
    }

    /// Whether a writer has written into the file and not closed it, lately.
    fn holds_open(&self) -> bool {
        self.unclosed
            .is_some_and(|at| at.elapsed() < WRITER_OPEN_MAX)
    }

    /// Until when to wait for the writer: `None` once it closed the file or went quiet.
    fn wait_until(&self) -> Option<tokio::time::Instant> {
        self.unclosed
            .map(|at| at + WRITER_QUIET)
            .filter(|&until| until > tokio::time::Instant::now())
    }
}

/// The next SIGHUP; never, when the signal could not be registered.
async fn next_hup(hup: &mut Option<tokio::signal::unix::Signal>) -> Option<()> {
    match hup {
        Some(h) => h.recv().await,
        None => std::future::pending().await,
    }
}

/// When a file read whole last changed, as the descriptor it was read from says once read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Changed {
    At(SystemTime),
    /// Its size differs from what was read: it changed during the read.
    DuringRead,
    /// Nothing to tell: not a regular file (its size means nothing), a change time before 1970.
    Unknown,
}

/// The file's bytes and their sha256, and when it last changed.
fn read_file(path: &Path) -> std::io::Result<(Vec<u8>, String, Changed)> {
    use std::io::Read;
    use std::os::unix::fs::MetadataExt;
    let mut file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    let meta = file.metadata()?;
    let changed = if !meta.is_file() {
        Changed::Unknown
    } else if meta.len() != bytes.len() as u64 {
        Changed::DuringRead
    } else {
        u64::try_from(meta.ctime())
            .ok()
            .zip(u32::try_from(meta.ctime_nsec()).ok())
            .and_then(|(secs, nanos)| {
                SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
            })
            .map_or(Changed::Unknown, Changed::At)
    };
    let digest = sha256_hex(&bytes);
    Ok((bytes, digest, changed))
}

/// How far a file's change time may lag the clock. The kernel stamps it from the coarse clock,
/// which moves a tick at a time (4 ms at 250 Hz), and a tick can be handled late: stamps were
/// measured up to 6.8 ms behind the clock on a 4 ms-tick host. Twice the tick, and at most
/// half the debounce, so that a look the debounce put after a write seldom takes that write
/// for a later one (it would only look again).
fn stamp_lag_max() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    let tick = if unsafe { libc::clock_getres(libc::CLOCK_REALTIME_COARSE, &mut ts) } == 0 {
        Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    } else {
        Duration::from_millis(10)
    };
    (tick * 2).min(DEBOUNCE / 2)
}

/// Whether a file may have been written after a look was decided at `decided`: a writer the
/// look did not know of may have cut it short. A change time ahead of the clock (the clock was
/// set back) tells nothing; nor does one on a file system that stamps whole seconds, unless it
/// falls in the same second.
fn changed_after(changed: Changed, decided: SystemTime, lag_max: Duration) -> bool {
    match changed {
        Changed::DuringRead => true,
        Changed::Unknown => false,
        Changed::At(at) => at + lag_max >= decided && at <= SystemTime::now(),
    }
}

/// After an automatic reload that used `T` of CPU, the next one waits until `T × RELOAD_DUTY_WAIT`
/// has passed, at most `RELOAD_WAIT_MAX`, so that a file rewritten faster than it can be
/// reloaded costs a bounded share of a core: 5 % for reloads up to ~30 ms; a 1 ms reload of a
/// small table delays nothing (the debounce is longer). SIGHUP and `POST /reload` are never
/// delayed.
const RELOAD_DUTY_WAIT: f64 = 19.0;

/// The longest of those waits: SPEC §6 serves a saved change within one second, also the
/// second of two saves made in quick succession (a bad edit, then its fix; two commits synced
/// back to back). A 10 000-route table (~100 ms of CPU on a busy host) is then reloaded at
/// most every ~0.7 s while its file keeps changing, ~15 % of a core at `nice` +10, served
/// ~0.8 s after the save at worst.
const RELOAD_WAIT_MAX: Duration = Duration::from_millis(600);

/// CPU time the calling thread has used: what a reload costs, whatever the contention.
fn thread_cpu_time() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return Duration::ZERO;
    }
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// How much lower than the serving threads a reload runs (`nice` steps): CFS then gives it about
/// a tenth of a core the serving threads want (weights 1024 vs 110).
const RELOAD_NICENESS: libc::c_int = 10;

/// Lowers the calling thread's scheduling priority to [`RELOAD_NICENESS`], once per thread.
/// Linux applies `setpriority(PRIO_PROCESS, tid)` to the one thread; raising niceness needs no
/// privilege. Failure is harmless (the reload runs at normal priority).
fn lower_priority() {
    thread_local!(static LOWERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    if LOWERED.get() {
        return;
    }
    LOWERED.set(true);
    // SAFETY: plain syscalls on the calling thread's own id; no memory is shared.
    let rc = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, RELOAD_NICENESS)
    };
    if rc != 0 {
        log::debug!(
            "could not lower the reload thread's priority: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Whether a watcher event can mean the file changed (not an open, read or read-only close).
fn is_change(kind: &EventKind) -> bool {
    match kind {
        EventKind::Access(AccessKind::Close(AccessMode::Write)) => true,
        EventKind::Access(_) => false,
        _ => true,
    }
}

#[async_trait]
impl BackgroundService for Reloader {
    /// Runs until shutdown: waits for a file event, SIGHUP or the poll tick, then reloads if the
    /// bytes differ from the table in force (SIGHUP always reloads).
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let config: PathBuf = self.state.config_path().to_path_buf();
        let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();

        // The watcher runs its own thread; it only pokes the channel.
        let dir = config
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let file_tx = tx.clone();
        let seen = Arc::new(WritesSeen::default());
        *seen.names() = file_names(&config);
        let seen_w = seen.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            // inotify also reports opens and reads: our own read of the file to hash it would
            // wake us again, in a loop (~40 reads and hashes a second). Only changes count, and
            // the close of a file written in place.
            let Ok(e) = res else { return };
            let name = || {
                e.paths
                    .first()
                    .and_then(|p| p.file_name())
                    .map(OsStr::to_os_string)
            };
            let t = match e.kind {
                EventKind::Modify(ModifyKind::Data(_)) => {
                    name().map_or(Trigger::File, Trigger::Written)
                }
                EventKind::Access(AccessKind::Close(AccessMode::Write)) => {
                    name().map_or(Trigger::File, Trigger::Closed)
                }
                EventKind::Create(_) => name().map_or(Trigger::File, Trigger::Created),
                kind if is_change(&kind) => Trigger::File,
                _ => return,
            };
            // Counted once sent (see WritesSeen): a look that sees the count change finds the
            // event still queued, and it brings the next look.
            let counts = seen_w.counts(&t);
            let _ = file_tx.send(t);
            if counts {
                seen_w.add();
            }
        });
        let mut watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!(
                    "cannot watch {} ({e}); relying on a {}s poll and SIGHUP",
                    dir.display(),
                    POLL.as_secs()
                );
                None
            }
        };

        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let stamp_lag = stamp_lag_max();
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        // The directories where a change of the file shows (`watched_dirs`), followed when a
        // link is pointed elsewhere.
        let mut watched: Vec<Watched> = Vec::new();
        follow_links(&config, &mut watcher, &mut watched);
        let mut writing = InPlaceWrite {
            names: file_names(&config),
            unclosed: None,
        };

        let mut last_tried: Option<String> = None;
        // Since when looks have ended without reading (a writer began during each, say): past
        // `WRITER_WAIT_MAX`, a look reads whatever a writer is doing, as the wait for writers
        // does, so that a file rewritten in place again and again is still read.
        let mut unread_since: Option<tokio::time::Instant> = None;
        // Since when the file has been seen missing or empty, look after look (see POLL).
        let mut absent_since: Option<tokio::time::Instant> = None;
        // The version that failed only in DNS, when it is due to be tried again, and the wait
        // before the next try after that one (see UNRESOLVED_RETRY_MAX). Another version is
        // tried at once.
        let mut dns_retry: Option<(String, tokio::time::Instant)> = None;
        let mut unresolved_wait = Duration::ZERO;
        // Whether a watcher event that may concern the file came since the last look that
        // settled what is on disk (a look that only saw it missing or empty once, or failed in
        // DNS, settles nothing): a change found without one is said to be found by the poll.
        let mut announced = false;
        // When the next automatic reload may start (see RELOAD_DUTY_WAIT).
        let mut not_before = tokio::time::Instant::now();
        // A SIGHUP whose look could not open the file for want of descriptors or memory: the
        // next look (the poll's, a second later) is the operator's reload.
        let mut signal_pending = false;
        loop {
            let trigger = tokio::select! {
                // Shutdown is the only way out: the watcher and the signal stream end with us.
                _ = shutdown.changed() => return,
                Some(t) = rx.recv() => t,
                Some(_) = next_hup(&mut hup) => Trigger::Signal,
                _ = poll.tick() => Trigger::Poll,
            };
            // Let the burst settle (and a file rewritten faster than it reloads wait its turn),
            // then drain whatever else it queued. A file being written in place is waited for
            // until its writer closes it (`WRITER_QUIET`).
            // A SIGHUP that arrives during a wait for `not_before` cuts the wait to the
            // debounce: an operator's explicit reload is never delayed (`POST /reload` reloads
            // on its own, not through this loop).
            let mut signal =
                matches!(trigger, Trigger::Signal) || std::mem::take(&mut signal_pending);
            // Whether a watcher event of this pass may concern the file.
            let mut seen_now = writing.may_concern(&trigger);
            writing.note(&trigger);
            let settle = tokio::time::Instant::now() + DEBOUNCE;
            let give_up_on_writers = settle.max(not_before) + WRITER_WAIT_MAX;
            let mut wake = if signal {
                settle
            } else {
                settle.max(not_before)
            };
            // What the look is decided on (see `writer_began` below): the count of writes and
            // the time, both taken before the queue is drained, so that no writer counted or
            // stamped before them can be missing from what the drain finds.
            let (written_before, decided_at) = loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(wake) => {
                        let decided = (seen.count(), SystemTime::now());
                        while let Ok(t) = rx.try_recv() {
                            signal |= matches!(t, Trigger::Signal);
                            seen_now |= writing.may_concern(&t);
                            writing.note(&t);
                        }
                        match writing.wait_until().map(|u| u.min(give_up_on_writers)) {
                            Some(until) if !signal && until > tokio::time::Instant::now() => {
                                wake = until
                            }
                            _ => break decided,
                        }
                    }
                    Some(t) = rx.recv() => {
                        seen_now |= writing.may_concern(&t);
                        writing.note(&t);
                        match t {
                            Trigger::Signal => {
                                signal = true;
                                wake = wake.min(tokio::time::Instant::now() + DEBOUNCE);
                            }
                            // The writer is done: read the file after the debounce.
                            Trigger::Closed(_) if !signal && writing.unclosed.is_none() => {
                                wake = wake.min((tokio::time::Instant::now() + DEBOUNCE).max(not_before));
                            }
                            _ => {}
                        }
                    }
                    Some(_) = next_hup(&mut hup) => {
                        signal = true;
                        wake = wake.min(tokio::time::Instant::now() + DEBOUNCE);
                    }
                }
            };
            if !seen_now && !signal && !matches!(trigger, Trigger::Poll) {
                // Only other files of the directory were written (a log file beside it).
                continue;
            }
            announced |= seen_now;
            // Watch where the file now lives before reading it (a swapped link moves it): a
            // change made once the read has begun is then seen by the watcher, not left to
            // the poll.
            follow_links(self.state.config_path(), &mut watcher, &mut watched);
            writing.names = file_names(self.state.config_path());
            seen.names().clone_from(&writing.names);
            // A look decided while no writer is known to be at work leaves what it read to the
            // next look if a writer began meanwhile: a look already under way (the poll's, on a
            // loaded host where the reload thread waits at nice +10) would otherwise read a
            // file truncated and half written since, which can validate. Not after the wait for
            // writers gave up (`WRITER_WAIT_MAX`), nor when looks have left the file unread
            // that long, nor for a signal. A writer is known by the watcher's count of its
            // writes, and by the time the file last changed: the watcher's thread may not have
            // counted the first write yet when the read ends (a loaded host), but the file's
            // change time already tells it.
            let forced = signal
                || writing.wait_until().is_some()
                || unread_since.is_some_and(|t| t.elapsed() >= WRITER_WAIT_MAX);
            let writer_began = {
                let seen = seen.clone();
                move |changed: Option<Changed>| {
                    !forced
                        && (seen.count() != written_before
                            || changed.is_some_and(|c| changed_after(c, decided_at, stamp_lag)))
                }
            };
            let state = self.state.clone();
            let config = config.clone();
            let tried = last_tried.clone();
            let absent_due = absent_since.is_some_and(|t| t.elapsed() >= POLL);
            let retry = dns_retry
                .as_ref()
                .map(|(d, at)| (d.clone(), tokio::time::Instant::now() >= *at));
            let writer_open = writing.holds_open();
            // File reads, parsing and DNS run off the proxy's worker threads, at a lower
            // priority than they: on a saturated core a reload takes longer instead of taking
            // requests' time.
            let look = tokio::task::spawn_blocking(move || {
                lower_priority();
                state.reap_retired();
                state.save_unsaved_pins();
                let t0 = thread_cpu_time();
                let unresolved =
                    |r: Result<_, crate::state::LoadError>| r.is_err_and(|e| e.unresolved);
                let cost = || Some(thread_cpu_time().saturating_sub(t0));
                // The file is read once, hashed, and those very bytes are loaded, under the
                // reload lock: the version tried is the one kept as tried, and no other reload
                // (`POST /reload`) publishes between the read and the swap. A version saved
                // after the read differs from the hash kept: its event (or the next poll)
                // loads it.
                let held = state.begin_reload();
                let read_at = std::time::Instant::now();
                let read = match read_file(&config) {
                    Err(e) if crate::errors::short_of_resources(&e) => {
                        // The process is out of descriptors or memory: that says nothing of the
                        // file, which is not reported invalid (`strangler_config_valid` would
                        // send on-call to the wrong place). Looked at again at the next poll.
                        log::warn!(
                            "cannot read {} ({e}): the proxy is short of descriptors or memory; looking again in {} s",
                            config.display(),
                            POLL.as_secs()
                        );
                        return Look::not_due();
                    }
                    read => read.ok(),
                };
                if writer_began(read.as_ref().map(|(_, _, changed)| *changed)) {
                    // Its events may be queued still, or may have been taken before the
                    // decision: look again either way.
                    log::debug!(
                        "{} changed as it was read; looking again",
                        config.display()
                    );
                    return Look::look_again();
                }
                let read = read.map(|(bytes, digest, _)| (bytes, digest));
                if signal {
                    // An operator's reload does not delay the next file change: the wait for
                    // `not_before` paces automatic reloads only.
                    // A missing file is reported by this reload; not again at the next poll.
                    let digest = read
                        .as_ref()
                        .map_or_else(|| MISSING.to_string(), |(_, digest)| digest.clone());
                    if unresolved(state.reload_bytes(&held, "SIGHUP", read, read_at)) {
                        return Look::unresolved(digest, None);
                    }
                    return Look::tried(digest, None);
                }
                let absent_seen = is_absent(tried.as_deref());
                let Some((bytes, on_disk)) = read else {
                    // Gone or unreadable. Still so a poll later (not an editor's
                    // delete-then-write), it is reported once: the reload fails to read it,
                    // logs why, counts the error and clears `strangler_config_valid`.
                    return match tried.as_deref() {
                        Some(MISSING) => Look::tried(MISSING.into(), None),
                        _ if absent_seen && absent_due => {
                            let trigger = reason(false, announced);
                            let _ = state.reload_bytes(&held, trigger, None, read_at);
                            Look::tried(MISSING.into(), cost())
                        }
                        _ => Look::tried(MISSING_ONCE.into(), None),
                    };
                };
                let in_force = on_disk == state.snapshot().table.sha256;
                // See EMPTY_DIGEST: once reported (tried), an empty file is left alone like any
                // bad version.
                if on_disk == EMPTY_DIGEST
                    && !in_force
                    && tried.as_deref() != Some(EMPTY_DIGEST)
                    && (writer_open || !(absent_seen && absent_due))
                {
                    return Look::tried(EMPTY_ONCE.into(), None);
                }
                let retrying = retry.as_ref().filter(|(d, _)| *d == on_disk);
                if retrying.is_some_and(|(_, due)| !due) {
                    return Look::not_due();
                }
                if in_force && crate::metrics::CONFIG_VALID.get() == 1 {
                    // The table in force is the file on disk, which nothing said was wrong
                    // (a touch, a rewrite of the same bytes): nothing to load.
                    return Look::tried(on_disk, None);
                }
                if !in_force && tried.as_deref() == Some(on_disk.as_str()) {
                    // Each version of the file is tried once: a bad edit is reported once,
                    // not at every poll.
                    return Look::tried(on_disk, None);
                }
                // A new version, or a rejected edit reverted to the table in force (loaded like
                // any fix: the reload counts as a success, the file is valid).
                let trigger = reason(retrying.is_some(), announced);
                let read = Some((bytes, on_disk.clone()));
                if unresolved(state.reload_bytes(&held, trigger, read, read_at)) {
                    return Look::unresolved(on_disk, cost());
                }
                Look::tried(on_disk, cost())
            })
            .await
            .unwrap_or_default();
            // The next poll is a whole period after this look: a file seen missing or empty
            // once is not confirmed a moment later by a tick that came due during the look.
            poll.reset();
            if look.look_again {
                // As a poll would: a change this finds is announced only by its own events.
                let _ = tx.send(Trigger::Poll);
            }
            if look.not_due {
                // (A signal's look is never not due but for a shortage: see `read_file`'s use.)
                signal_pending |= signal;
                unread_since.get_or_insert_with(tokio::time::Instant::now);
                continue;
            }
            unread_since = None;
            let now = tokio::time::Instant::now();
            let absent = is_absent(look.tried.as_deref());
            if !absent {
                absent_since = None;
            } else if !is_absent(last_tried.as_deref()) {
                absent_since = Some(now);
            }
            // A look that saw the file missing or empty once, or failed in DNS, settles
            // nothing: the next look is still the change's.
            if look.unresolved.is_none() && !absent {
                announced = false;
            }
            match look.unresolved {
                Some(version) => {
                    // Not remembered as tried: the same version is tried again when due.
                    last_tried = None;
                    let failed_before = dns_retry.as_ref().map(|(d, _)| d.as_str());
                    unresolved_wait = retry_wait(failed_before, unresolved_wait, &version);
                    dns_retry = Some((version, now + unresolved_wait));
                }
                None => {
                    last_tried = look.tried;
                    unresolved_wait = Duration::ZERO;
                    dns_retry = None;
                }
            }
            if let Some(cost) = look.cost {
                not_before = now + cost.mul_f64(RELOAD_DUTY_WAIT).min(RELOAD_WAIT_MAX);
            }
        }
    }
}

/// The names under which the config file is written in place: its own, and its symlink
/// target's when it is a link.
fn file_names(config: &Path) -> Vec<OsString> {
    let mut names: Vec<OsString> = config
        .file_name()
        .map(OsStr::to_os_string)
        .into_iter()
        .collect();
    if let Some(target) = std::fs::canonicalize(config)
        .ok()
        .as_deref()
        .and_then(Path::file_name)
    {
        if !names.iter().any(|n| n == target) {
            names.push(target.to_os_string());
        }
    }
    names
}

/// The directories where a change of `config` shows, each by its real path: the file's own
/// directory; the directory of the file it resolves to, when it is a symlink (a ConfigMap's
/// `..data/routing.yaml`, or a link into another directory); and the directory holding each
/// symlinked directory on the way (`-c current/routing.yaml` with `current -> releases/N`,
/// swapped Capistrano-style: the swap happens beside `current`).
fn watched_dirs(config: &Path) -> Vec<PathBuf> {
    let here = |p: &Path| -> PathBuf {
        if p.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            p.to_path_buf()
        }
    };
    let dir = here(config.parent().unwrap_or(Path::new("")));
    let mut dirs: Vec<PathBuf> = Vec::new();
    let mut add = |p: Option<PathBuf>| {
        if let Some(p) = p.filter(|p| !dirs.contains(p)) {
            dirs.push(p);
        }
    };
    add(std::fs::canonicalize(&dir).ok());
    add(std::fs::canonicalize(config)
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf)));
    for ancestor in dir.ancestors().filter(|a| !a.as_os_str().is_empty()) {
        if std::fs::symlink_metadata(ancestor).is_ok_and(|m| m.file_type().is_symlink()) {
            add(std::fs::canonicalize(here(ancestor.parent().unwrap_or(Path::new("")))).ok());
        }
    }
    dirs
}

/// A watched directory: its path, and the directory (device, inode) the watch was put on.
type Watched = (PathBuf, Option<(u64, u64)>);

fn dir_id(d: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(d).ok().map(|m| (m.dev(), m.ino()))
}

/// Brings the watches in line with [`watched_dirs`]: a swapped link moves them, and a
/// directory replaced under the same path (`rm -rf cfg` and made again, `mv cfg.new cfg`) is
/// watched again: an inotify watch belongs to the directory it was put on, not to its path.
fn follow_links(
    config: &Path,
    watcher: &mut Option<notify::RecommendedWatcher>,
    watched: &mut Vec<Watched>,
) {
    let Some(w) = watcher.as_mut() else {
        return;
    };
    let wanted: Vec<Watched> = match watched_dirs(config) {
        // Nothing resolves (a link removed and not yet made again, `rm current; ln -s …`): the
        // watches stay on the directories still there, where the link comes back.
        dirs if dirs.is_empty() => watched
            .iter()
            .filter(|(d, id)| dir_id(d) == *id)
            .cloned()
            .collect(),
        dirs => dirs
            .into_iter()
            .map(|d| {
                let id = dir_id(&d);
                (d, id)
            })
            .collect(),
    };
    if wanted == *watched {
        return;
    }
    for (old, _) in watched.iter().filter(|d| !wanted.contains(d)) {
        let _ = w.unwatch(old);
    }
    let mut now = Vec::new();
    for entry in wanted {
        if watched.contains(&entry) {
            now.push(entry);
            continue;
        }
        let d = &entry.0;
        if let Err(e) = w.watch(d, RecursiveMode::NonRecursive) {
            // Said once: the directory stays in the list, and is not tried at every poll.
            log::warn!(
                "cannot watch {} (where changes of {} show): {e}; the {}s poll covers it",
                d.display(),
                config.display(),
                POLL.as_secs()
            );
        }
        now.push(entry);
    }
    *watched = now;
}

#[cfg(test)]
mod tests {
    use super::*;
    use notify::event::{CreateKind, ModifyKind};

    /// Only what can leave the file half written counts: bytes written into it, or its
    /// creation, under its own names. A close, a rename (`File`), another file do not.
    #[test]
    fn writes_seen_count_writers_of_the_file_alone() {
        let seen = WritesSeen::default();
        *seen.names() = vec!["routing.yaml".into(), "target.yaml".into()];
        let n = |s: &str| OsString::from(s);
        for t in [
            Trigger::Written(n("routing.yaml")),
            Trigger::Created(n("target.yaml")),
            Trigger::Closed(n("routing.yaml")),
            Trigger::Written(n("audit.log")),
            Trigger::Created(n(".strangler-state.json")),
            Trigger::File,
            Trigger::Poll,
            Trigger::Signal,
        ] {
            if seen.counts(&t) {
                seen.add();
            }
        }
        assert_eq!(seen.count(), 2);
    }

    /// A write the watcher has not counted yet still shows in the file's change time, read from
    /// the descriptor the bytes came from once they are read; a write well before the decision
    /// does not.
    #[test]
    fn a_write_after_a_looks_decision_shows_in_the_files_change_time() {
        let lag = stamp_lag_max();
        assert!(lag > Duration::ZERO && lag <= DEBOUNCE / 2);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("routing.yaml");
        std::fs::write(&path, "default: a\n").unwrap();
        let (_, _, first) = read_file(&path).unwrap();
        let Changed::At(first) = first else {
            panic!("a regular file read whole: {first:?}")
        };
        // Past a second, on any file system's stamps.
        let decided = first + Duration::from_millis(1100);
        while SystemTime::now() < decided {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!changed_after(Changed::At(first), decided, lag));
        std::fs::write(&path, "default:").unwrap();
        let (bytes, _, second) = read_file(&path).unwrap();
        assert_eq!(bytes, b"default:");
        let Changed::At(second) = second else {
            panic!("a regular file read whole: {second:?}")
        };
        assert!(second > first, "the write moved the change time");
        // Within the stamps' lag of the decision, or after it: left. Before it, or ahead of
        // the clock: read.
        let now = SystemTime::now();
        assert!(changed_after(Changed::At(now - lag / 2), now, lag));
        assert!(!changed_after(Changed::At(now - lag * 2), now, lag));
        assert!(!changed_after(
            Changed::At(now + Duration::from_secs(3600)),
            now,
            lag
        ));
        assert!(changed_after(Changed::DuringRead, now, lag));
        assert!(!changed_after(Changed::Unknown, now, lag));
        // Not a regular file: its size tells nothing.
        let (_, _, dev) = read_file(Path::new("/dev/null")).unwrap();
        assert_eq!(dev, Changed::Unknown);
    }

    #[test]
    fn watches_stay_while_a_swapped_link_is_missing() {
        let dir = tempfile::tempdir().unwrap();
        let app = dir.path().join("app");
        std::fs::create_dir_all(app.join("releases/1")).unwrap();
        std::fs::write(app.join("releases/1/routing.yaml"), "x").unwrap();
        std::os::unix::fs::symlink("releases/1", app.join("current")).unwrap();
        let config = app.join("current/routing.yaml");
        let mut watcher =
            Some(notify::recommended_watcher(|_: notify::Result<notify::Event>| {}).unwrap());
        let mut watched = Vec::new();
        follow_links(&config, &mut watcher, &mut watched);
        let paths = |w: &[Watched]| w.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>();
        let real = |p: &Path| std::fs::canonicalize(p).unwrap();
        let both = vec![real(&app.join("releases/1")), real(&app)];
        assert_eq!(paths(&watched), both);
        // `rm current; ln -s releases/2 current`, looked at in between.
        std::fs::remove_file(app.join("current")).unwrap();
        assert!(watched_dirs(&config).is_empty());
        follow_links(&config, &mut watcher, &mut watched);
        assert_eq!(paths(&watched), both);
        std::fs::create_dir_all(app.join("releases/2")).unwrap();
        std::os::unix::fs::symlink("releases/2", app.join("current")).unwrap();
        follow_links(&config, &mut watcher, &mut watched);
        assert_eq!(
            paths(&watched),
            vec![real(&app.join("releases/2")), real(&app)]
        );
    }

    #[test]
    fn a_directory_replaced_under_its_path_is_watched_again() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("cfg");
        std::fs::create_dir(&cfg).unwrap();
        std::fs::write(cfg.join("routing.yaml"), "x").unwrap();
        let config = cfg.join("routing.yaml");
        let (tx, rx) = std::sync::mpsc::channel();
        let mut watcher = Some(
            notify::recommended_watcher(move |e: notify::Result<notify::Event>| {
                if let Ok(e) = e {
                    let _ = tx.send(e.paths);
                }
            })
            .unwrap(),
        );
        let mut watched = Vec::new();
        follow_links(&config, &mut watcher, &mut watched);
        // Removed, looked at while gone (the watch on a directory that is gone is dropped),
        // then made again.
        std::fs::remove_dir_all(&cfg).unwrap();
        follow_links(&config, &mut watcher, &mut watched);
        assert!(watched.is_empty(), "{watched:?}");
        std::fs::create_dir(&cfg).unwrap();
        follow_links(&config, &mut watcher, &mut watched);
        assert_eq!(watched.len(), 1);
        // (Compared with this one, which stays alive as `cfg.old`: a removed directory's inode
        // number may be given to the next one made.)
        let before = watched.clone();
        // Replaced between two looks (`mv cfg cfg.old; mv cfg.new cfg`): same path, another
        // directory, watched again.
        let replaced = dir.path().join("cfg.new");
        std::fs::create_dir(&replaced).unwrap();
        std::fs::rename(&cfg, dir.path().join("cfg.old")).unwrap();
        std::fs::rename(&replaced, &cfg).unwrap();
        follow_links(&config, &mut watcher, &mut watched);
        assert_eq!(watched.len(), 1);
        assert_eq!(watched[0].0, before[0].0);
        assert_ne!(watched[0].1, before[0].1);
        assert_eq!(watched[0].1, dir_id(&cfg));
        // And a write there is seen.
        while rx.try_recv().is_ok() {}
        std::fs::write(cfg.join("routing.yaml"), "y").unwrap();
        let seen = rx
            .recv_timeout(Duration::from_secs(10))
            .expect("an event for the replaced directory");
        assert!(seen.iter().any(|p| p.starts_with(&cfg)), "{seen:?}");
    }

    #[test]
    fn dns_retries_back_off_per_version() {
        let s = Duration::from_secs;
        assert_eq!(retry_wait(None, Duration::ZERO, "a"), s(1));
        assert_eq!(retry_wait(Some("a"), s(1), "a"), s(2));
        assert_eq!(retry_wait(Some("a"), s(16), "a"), s(30));
        assert_eq!(retry_wait(Some("a"), s(30), "a"), s(30));
        // Another version that fails in DNS starts from a second, not from the last wait.
        assert_eq!(retry_wait(Some("a"), s(16), "b"), s(1));
    }

    #[test]
    fn reads_are_not_changes() {
        assert!(!is_change(&EventKind::Access(AccessKind::Open(
            AccessMode::Any
        ))));
        assert!(!is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Read
        ))));
        assert!(is_change(&EventKind::Access(AccessKind::Close(
            AccessMode::Write
        ))));
        assert!(is_change(&EventKind::Modify(ModifyKind::Any)));
        assert!(is_change(&EventKind::Create(CreateKind::File)));
    }
}
