//! The live state shared by the proxy hooks, the admin API and the reloader: the published
//! table (one `ArcSwap`, read without locks), and per route what outlives a reload — its pin,
//! its rollback window, its shadow slots. Every change of who serves what goes through here:
//! reloads, pins and resumes are serialised by one lock, each builds the new `LiveTable` off to
//! the side and publishes it with one store, then updates the state file and the audit. The
//! per-route gauges are read from the published table at scrape time (`route_gauges.rs`).
//!
//! ```text
//! State ─ live: ArcSwap<LiveTable> ─ table: RoutingTable (validated, immutable)
//!       │                          └ routes[i]: Arc<RouteLive> (metric handles; taken over by
//!       │                                         the next table when its backends are the same)
//!       │                                         └ control: Arc<RouteControl> (kept by name)
//!       └ controls: name → Arc<RouteControl>  (pin, rollback window, shadow slots)
//! ```

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use parking_lot::Mutex;
use prometheus::Histogram;

use crate::audit::{Audit, Serving};
use crate::config;
use crate::metrics;
use crate::pins::{Pin, PinReason, StateFile};
use crate::rollback::Window;
use crate::router::{Route, RouteState, RoutingTable, Sticky, DEFAULT_ROUTE};

/// What the audit compares between two tables for one route: its path, methods and `exact`
/// (what it takes), to, default (when it serves some of the route's traffic), split and its
/// sticky key, shadow, state, and where those backends are (a backend repointed at another
/// server moves the route's traffic as much as another `to`).
#[derive(PartialEq)]
struct ServingKey<'a> {
    path: &'a str,
    methods: Option<&'a [String]>,
    exact: bool,
    to: (&'a str, &'a str),
    default: Option<(&'a str, &'a str)>,
    split: Option<(f64, &'a Sticky)>,
    shadow: Option<(&'a str, &'a str)>,
    state: RouteState,
}

/// The window over which `/routes` reports requests and errors per backend.
pub const RECENT: Duration = Duration::from_secs(60);

/// What a route keeps across reloads, found again by its name.
#[derive(Debug)]
pub struct RouteControl {
    pub name: Arc<str>,
    pin: ArcSwapOption<Pin>,
    /// Requests sent to the route's `to`, and their failures: the automatic rollback's input.
    pub to_window: Window,
    /// Shadow requests in flight, against the per-route cap.
    pub shadow_in_flight: AtomicUsize,
    /// Requests and errors per backend name over [`RECENT`], for `/routes`.
    recent: Mutex<HashMap<Arc<str>, Arc<Window>>>,
    /// Requests being served now (`strangler_requests_in_flight{route}`, read at scrape time).
    pub in_flight: AtomicI64,
    /// Set when a reload removes the route: its series have been deleted, and a request still
    /// in flight on the old table must not bring them back.
    pub retired: AtomicBool,
}

impl RouteControl {
    fn new(name: Arc<str>) -> Self {
        RouteControl {
            in_flight: AtomicI64::new(0),
            name,
            pin: ArcSwapOption::empty(),
            to_window: Window::default(),
            shadow_in_flight: AtomicUsize::new(0),
            recent: Mutex::new(HashMap::new()),
            retired: AtomicBool::new(false),
        }
    }

    /// The pin, if the route is pinned.
    pub fn pin(&self) -> Option<Arc<Pin>> {
        self.pin.load_full()
    }

    /// Whether the route is pinned (cheap: one atomic load).
    pub fn is_pinned(&self) -> bool {
        self.pin.load().is_some()
    }

    fn recent_window(&self, backend: &Arc<str>) -> Arc<Window> {
        self.recent
            .lock()
            .entry(backend.clone())
            .or_insert_with(|| Arc::new(Window::default()))
            .clone()
    }
}

/// A route's handles: resolved once, so the request path formats no label. A reload with the
/// same backends (names, in order) takes them over whole, so they may depend only on the route's
/// name and the backends' names — never on its `to`, its index or `default` (see [`assemble`]).
#[derive(Debug)]
pub struct RouteLive {
    pub control: Arc<RouteControl>,
    /// `X-Strangler-Route` value.
    pub header: HeaderValue,
    /// `strangler_request_duration_seconds{route, backend}` by backend index, created on the
    /// first request: a series per route and backend up front would be 18 lines of /metrics
    /// for every route of a 10 000-route table that never sees traffic.
    duration: Vec<OnceLock<Histogram>>,
    /// Last-minute requests/errors by backend index.
    pub recent: Vec<Arc<Window>>,
    /// `strangler_requests_total` handles.
    pub requests: metrics::RequestCounters,
}

impl RouteLive {
    /// Observes one request's duration on backend `b`.
    pub fn observe(&self, b: usize, backend: &str, seconds: f64) {
        self.duration[b]
            .get_or_init(|| metrics::DURATION.with_label_values(&[&self.control.name, backend]))
            .observe(seconds);
    }
}

/// A pin set in memory, for its audit line.
struct PinChange {
    route: Arc<str>,
    before: Serving,
    after: Serving,
    reason: String,
    sha256: String,
}

/// The table in force and its live handles. Requests take one `Arc` of it and keep it to the end.
#[derive(Debug)]
pub struct LiveTable {
    pub table: RoutingTable,
    /// Aligned with `table.routes`; shared with the previous table for routes a reload kept.
    pub routes: Vec<Arc<RouteLive>>,
    /// For requests no route matched (`route="default"`).
    pub unmatched: Arc<RouteLive>,
    /// `X-Strangler-Backend` values by backend index.
    pub backend_headers: Vec<HeaderValue>,
    /// By backend index: a reload removed (or renamed) the backend and deleted its series, so
    /// requests still running on this table count nothing more under its name.
    pub backend_retired: Vec<AtomicBool>,
}

impl LiveTable {
    /// "12 routes: 5 new, 2 canary, 1 shadow, 3 legacy, 1 rolled_back", pins as they stand.
    pub fn summary(&self) -> String {
        self.table.summary(|r| {
            self.table
                .route_index(&r.name)
                .is_some_and(|i| self.routes[i].control.is_pinned())
        })
    }

    /// Whether a reload has removed backend `b` of this table (see `backend_retired`).
    pub fn backend_retired(&self, b: usize) -> bool {
        self.backend_retired[b].load(Ordering::Acquire)
    }

    /// The live handles of route `i`, or of the unmatched pseudo-route.
    pub fn route_live(&self, i: Option<usize>) -> &RouteLive {
        match i {
            Some(i) => &self.routes[i],
            None => &self.unmatched,
        }
    }

    /// What [`LiveTable::serving`] describes, borrowed: compared on every reload, formatted
    /// only when it changed.
    fn serving_key<'a>(&'a self, route: &'a Route, pinned: bool) -> ServingKey<'a> {
        let t = &self.table;
        let state = t.state(route, pinned);
        let at = |b: usize| (&*t.backends[b].name, t.backends[b].url.as_str());
        ServingKey {
            path: &route.path,
            methods: route.methods.as_deref(),
            exact: route.exact,
            to: at(route.to),
            // `default` decides who serves unless the route is wholly on another backend
            // (failover aside): a change of `default` moves a legacy, shadow, canary or rolled
            // back route's traffic.
            default: (state != RouteState::New).then(|| at(t.default)),
            split: route.split.as_ref().map(|s| (s.percent, &s.sticky)),
            shadow: route.shadow.map(at),
            state,
        }
    }

    fn serving(&self, route: &Route, pinned: bool) -> Serving {
        let t = &self.table;
        Serving {
            path: route.path.clone(),
            methods: route.methods.clone(),
            exact: route.exact,
            to: t.backends[route.to].name.to_string(),
            to_url: t.backends[route.to].url.clone(),
            default: t.backends[t.default].name.to_string(),
            default_url: t.backends[t.default].url.clone(),
            split: route.split.as_ref().map(|s| s.percent),
            sticky: route.split.as_ref().map(|s| s.sticky.to_string()),
            shadow: route.shadow.map(|b| t.backends[b].name.to_string()),
            shadow_url: route.shadow.map(|b| t.backends[b].url.clone()),
            state: t.state(route, pinned).as_str(),
        }
    }

    /// The `default` pseudo-route (unmatched requests), as the audit records it.
    fn serving_unmatched(&self) -> Serving {
        let name = self.table.backends[self.table.default].name.to_string();
        let url = self.table.backends[self.table.default].url.clone();
        Serving {
            path: "*".to_string(),
            methods: None,
            exact: false,
            to: name.clone(),
            to_url: url.clone(),
            default: name,
            default_url: url,
            split: None,
            sticky: None,
            shadow: None,
            shadow_url: None,
            state: RouteState::Legacy.as_str(),
        }
    }
}

/// Proof that the caller holds `State::reloading` (see [`State::begin_reload`]).
pub struct Reloading<'a> {
    _held: parking_lot::MutexGuard<'a, ()>,
}

/// Why a pin or resume could not be done.
#[derive(Debug, PartialEq, Eq)]
pub enum ControlError {
    UnknownRoute,
}

/// The first wait before a failed write of the state file is tried again; it doubles up to
/// [`SAVE_RETRY_MAX`].
const SAVE_RETRY_FIRST: Duration = Duration::from_secs(1);
const SAVE_RETRY_MAX: Duration = Duration::from_secs(60);

/// The process-wide state.
pub struct State {
    live: ArcSwap<LiveTable>,
    config: PathBuf,
    controls: Mutex<HashMap<Arc<str>, Arc<RouteControl>>>,
    state_file: StateFile,
    audit: Audit,
    /// Serialises every publish (the swap of a reload, pin, resume).
    publish: Mutex<()>,
    /// Serialises reloads, so that two never publish out of order. Taken before `publish`.
    reloading: Mutex<()>,
    /// Automatic pins set in memory whose audit lines are not written yet (their thread waits
    /// for `publish`). Whoever writes an audit line under `publish` writes these first, so
    /// the trail keeps the order things happened in: a pin before the resume that lifted it.
    unrecorded: Mutex<Vec<PinChange>>,
    /// Tables a reload replaced while requests still held them (see [`State::reap_retired`]).
    retired: Mutex<Vec<Arc<LiveTable>>>,
    /// The last write of the state file failed: when to try again, and the wait before that
    /// try (see [`State::save_unsaved_pins`]).
    unsaved: Mutex<Option<(Instant, Duration)>>,
    /// Automatic pins set so far, and how many of them the state file has been written with.
    auto_pins: AtomicU64,
    auto_pins_saved: AtomicU64,
}

/// Automatic pins set but not yet written to the state file and the audit log: a draining
/// process waits for them before it exits, so a pin set by its last requests survives the
/// restart.
pub static PINS_BEING_SAVED: AtomicUsize = AtomicUsize::new(0);

/// One count in [`PINS_BEING_SAVED`], given back when dropped (however the save ends).
struct SavingPin;

impl SavingPin {
    fn start() -> Self {
        PINS_BEING_SAVED.fetch_add(1, Ordering::AcqRel);
        SavingPin
    }
}

impl Drop for SavingPin {
    fn drop(&mut self) {
        PINS_BEING_SAVED.fetch_sub(1, Ordering::AcqRel);
    }
}

impl State {
    /// Loads the table (an invalid file is an error: the caller exits 1), restores pins from
    /// the state file, and registers the per-route gauges.
    /// `upgrading`: started with `--upgrade`, the process it replaces still owns the state file
    /// until it hands over ([`State::adopt_pins`] reads it then).
    pub fn start(
        config: &Path,
        state_file: StateFile,
        audit: Audit,
        upgrading: bool,
    ) -> Result<Arc<State>, String> {
        metrics::register_all();
        let t0 = Instant::now();
        let mut parsed = Duration::ZERO;
        let (table, _) = load_table(config, None, t0, &mut parsed, None).map_err(|e| {
            metrics::CONFIG_RELOADS.with_label_values(&["error"]).inc();
            e.message
        })?;
        let saved = state_file.load();
        let mut controls = HashMap::new();
        let live = assemble(table, None, &mut controls);
        metrics::prime(&live.table);
        let mut restored = 0;
        for r in &live.routes {
            if let Some(pin) = saved.get(&*r.control.name) {
                r.control.pin.store(Some(Arc::new(pin.clone())));
                restored += 1;
                log::warn!(
                    "route {:?} stays pinned to default ({} rollback since {}, from {})",
                    r.control.name,
                    pin.reason.as_str(),
                    pin.since,
                    state_file.path().display()
                );
            }
        }
        let state = Arc::new(State {
            live: ArcSwap::from_pointee(live),
            config: config.to_path_buf(),
            controls: Mutex::new(controls),
            state_file,
            audit,
            publish: Mutex::new(()),
            reloading: Mutex::new(()),
            unrecorded: Mutex::new(Vec::new()),
            retired: Mutex::new(Vec::new()),
            unsaved: Mutex::new(None),
            auto_pins: AtomicU64::new(0),
            auto_pins_saved: AtomicU64::new(0),
        });
        if restored != saved.len() {
            // Pins of routes that have left routing.yaml are lifted, and said so: a pin is a
            // change of who serves what (the route is not there to say who serves it now).
            let live = state.snapshot();
            for (name, pin) in &saved {
                if live.table.route_index(name).is_none() {
                    log::warn!(
                        "state file pins route {name:?} ({} rollback since {}), which is not in {}: pin lifted",
                        pin.reason.as_str(),
                        pin.since,
                        config.display()
                    );
                    state.audit.record(
                        name,
                        None,
                        None,
                        &format!(
                            "pin lifted at start-up: route not in routing.yaml ({} rollback since {})",
                            pin.reason.as_str(),
                            pin.since
                        ),
                        &live.table.sha256,
                    );
                }
            }
            if !upgrading {
                state.save_pins();
            }
        }
        let live = state.snapshot();
        // One State per process: a second one would find the gauges taken, and a proxy whose
        // per-route gauges are missing is not one to run.
        crate::route_gauges::register(&state)
            .map_err(|e| format!("cannot register the per-route gauges: {e}"))?;
        record_success(t0.elapsed());
        log::info!(
            "loaded {} (sha256 {}): {}",
            config.display(),
            &live.table.sha256[..12],
            live.table.summary(|r| state.is_pinned(&r.name))
        );
        Ok(state)
    }

    /// After `run --upgrade` took the listeners over: the pins as the process it replaces left
    /// them. That one answered rollbacks and resumes until it handed over, after this one
    /// read the state file at its start; nothing has been served or changed here yet, so the
    /// file is the truth. (The old process waits, at SIGQUIT, for a pin it is still saving.)
    pub fn adopt_pins(&self) {
        let _publish = self.publish.lock();
        // A file that cannot be read now (it was at start) changes nothing: the pins read then
        // hold.
        let Some(saved) = self.state_file.reload() else {
            return;
        };
        let live = self.snapshot();
        for r in &live.routes {
            let now = saved.get(&*r.control.name);
            if now.is_some() != r.control.is_pinned() {
                log::warn!(
                    "route {:?} {} by the process this one replaces, before it handed over",
                    r.control.name,
                    if now.is_some() {
                        "was pinned to default"
                    } else {
                        "was resumed"
                    },
                );
            }
            r.control.pin.store(now.cloned().map(Arc::new));
        }
        // The file is this process's now: pins of routes not in its table leave it.
        if saved
            .keys()
            .any(|name| live.table.route_index(name).is_none())
        {
            self.save_pins();
        }
    }

    /// The table in force. Take it once per request and keep it to the end.
    pub fn snapshot(&self) -> Arc<LiveTable> {
        self.live.load_full()
    }

    /// Whether `live` is still the table in force.
    pub fn is_current(&self, live: &Arc<LiveTable>) -> bool {
        Arc::ptr_eq(&self.live.load(), live)
    }

    pub fn config_path(&self) -> &Path {
        &self.config
    }

    fn is_pinned(&self, name: &str) -> bool {
        self.controls
            .lock()
            .get(name)
            .is_some_and(|c| c.is_pinned())
    }

    /// Reads, validates and swaps in routing.yaml. On error the table in force stays, the error
    /// is logged with `FILE:LINE:COL` and counted, and `strangler_config_valid` drops to 0.
    ///
    /// Reading, parsing, validating and resolving run under `reloading` only: pins and resumes
    /// (one of them from the request path) wait for the swap, never for the parse or for DNS.
    /// A reload that served its table returns its warnings (a backend name that did not
    /// resolve, whose addresses in use were kept).
    pub fn reload(&self, trigger: &str) -> Result<Vec<String>, LoadError> {
        let held = self.begin_reload();
        self.reload_bytes(&held, trigger, None, Instant::now())
    }

    /// Holds off every other reload (SIGHUP, `POST /reload`) until dropped: the reload loop
    /// reads and hashes the file under it, decides, and reloads the very bytes it hashed, so
    /// that no reload of a newer version can publish between its read and its swap.
    pub fn begin_reload(&self) -> Reloading<'_> {
        Reloading {
            _held: self.reloading.lock(),
        }
    }

    /// [`State::reload`] of `bytes` and their digest, read from the file from `t0` on under
    /// `_held` (`None`: read it now). The reload's duration counts from `t0`.
    pub fn reload_bytes(
        &self,
        _held: &Reloading<'_>,
        trigger: &str,
        bytes: Option<(Vec<u8>, String)>,
        t0: Instant,
    ) -> Result<Vec<String>, LoadError> {
        let mut t_parsed = Duration::ZERO;
        let in_force = self.snapshot();
        let (table, warnings) = match load_table(
            &self.config,
            bytes,
            t0,
            &mut t_parsed,
            Some(&in_force.table),
        ) {
            Ok(t) => t,
            Err(e) => {
                // The counter last, as in `record_success`.
                metrics::CONFIG_VALID.set(0);
                metrics::CONFIG_RELOADS.with_label_values(&["error"]).inc();
                // One line per event: the errors (one per line in `e`) joined.
                log::error!(
                    "reload ({trigger}) rejected, the previous table keeps serving: {}{}",
                    e.message.lines().collect::<Vec<_>>().join("; "),
                    if e.unresolved {
                        " (tried again until it resolves)"
                    } else {
                        ""
                    }
                );
                return Err(e);
            }
        };
        let t_loaded = t0.elapsed();
        let _publish = self.publish.lock();
        let old = self.snapshot();
        let live = assemble(table, Some(&old), &mut self.controls.lock());
        self.live.store(Arc::new(live));
        let t_swapped = t0.elapsed();

        // The new table serves; what follows is bookkeeping. Only routes whose serving changed
        // are formatted for the audit (a 10 000-route reload usually changes a handful).
        let live = self.snapshot();
        let sha = live.table.sha256.clone();
        let mut changes: Vec<(Arc<str>, Option<Serving>, Option<Serving>)> = Vec::new();
        for (r, l) in old.table.routes.iter().zip(&old.routes) {
            let pinned = l.control.is_pinned();
            match live.table.route_index(&r.name) {
                None => {
                    if let Some(pin) = l.control.pin() {
                        // Lifted with the route: said louder than the audit line, since a
                        // route renamed (or, unnamed, its `path` edited) is a new route.
                        log::warn!(
                            "route {:?}, pinned to default ({} rollback since {}), has left {}: pin lifted (a renamed route, or an unnamed one whose path changed, starts unpinned)",
                            r.name,
                            pin.reason.as_str(),
                            pin.since,
                            self.config.display()
                        );
                    }
                    changes.push((r.name.clone(), Some(old.serving(r, pinned)), None))
                }
                Some(j) => {
                    let (nr, nl) = (&live.table.routes[j], &live.routes[j]);
                    let now_pinned = nl.control.is_pinned();
                    let (before, after) =
                        (old.serving_key(r, pinned), live.serving_key(nr, now_pinned));
                    if before.to != after.to || r.rollback != nr.rollback {
                        // Another `to`: the rollback window counted the old backend's answers.
                        // Another rule: requests still running under the old one must not
                        // judge by it (the clear makes their outcomes stale), and the new
                        // one starts from a fresh window.
                        nl.control.to_window.clear();
                    }
                    if before != after {
                        changes.push((
                            r.name.clone(),
                            Some(old.serving(r, pinned)),
                            Some(live.serving(nr, now_pinned)),
                        ));
                    }
                }
            }
        }
        for (r, l) in live.table.routes.iter().zip(&live.routes) {
            if old.table.route_index(&r.name).is_none() {
                let serving = live.serving(r, l.control.is_pinned());
                changes.push((r.name.clone(), None, Some(serving)));
            }
        }
        let (was, is) = (
            &old.table.backends[old.table.default],
            &live.table.backends[live.table.default],
        );
        if (&was.name, &was.url) != (&is.name, &is.url) {
            changes.push((
                Arc::from(DEFAULT_ROUTE),
                Some(old.serving_unmatched()),
                Some(live.serving_unmatched()),
            ));
        }
        changes.sort_by(|a, b| a.0.cmp(&b.0));
        let gone: HashSet<&str> = changes
            .iter()
            .filter(|(_, _, after)| after.is_none())
            .map(|(name, _, _)| &**name)
            .collect();
        // Pins of routes that left the file are lifted: the state file follows. Their series
        // leave `/metrics`; the table's routes have theirs.
        if !gone.is_empty() {
            self.save_pins();
        }
        metrics::forget(&gone);
        // So do the series of backends that left it (renamed, or removed).
        let kept_backends: HashSet<&str> = live.table.backends.iter().map(|b| &*b.name).collect();
        // Before the series go: a request still on a table that names a backend this one does
        // not adds nothing under the name when it ends (a request that looked just before
        // may). The replaced table, and those replaced before it that requests still hold: a
        // backend one reload stopped using and the next removed is named only there.
        let mut backends_gone = false;
        {
            let retired = self.retired.lock();
            for t in std::iter::once(&old).chain(retired.iter()) {
                for (b, flag) in t.table.backends.iter().zip(&t.backend_retired) {
                    if !kept_backends.contains(&*b.name) {
                        flag.store(true, Ordering::Release);
                        backends_gone |= Arc::ptr_eq(t, &old);
                    }
                }
            }
        }
        if backends_gone {
            metrics::forget_backends(&kept_backends);
        }
        metrics::unprime(&old.table, &live.table);
        metrics::prime(&live.table);
        // Counted once the series of what left are gone: a scrape that sees the success sees
        // the metrics of the new table. The duration is the read → swap one.
        record_success(t_swapped);
        self.record_unrecorded();
        for (name, before, after) in &changes {
            self.audit
                .record(name, before.as_ref(), after.as_ref(), trigger, &sha);
        }
        let summary = live.summary();
        drop(live);
        // Freed (when no request holds it) after `publish` is let go: pins wait for no free.
        drop(_publish);
        self.retired.lock().push(old);
        self.reap_retired();
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
        log::info!(
            "reloaded {} ({trigger}) in {:.1} ms (read and parse {:.1}; validate {:.1}; swap {:.1}; audit {:.1}), sha256 {}: {summary}",
            self.config.display(),
            ms(t0.elapsed()),
            ms(t_parsed),
            ms(t_loaded - t_parsed),
            ms(t_swapped - t_loaded),
            ms(t0.elapsed() - t_swapped),
            &sha[..12]
        );
        Ok(warnings)
    }

    /// Frees the tables replaced by reloads that no request holds any more, and returns how
    /// many are still held. A request keeps the table it started on to its end: were its `Arc`
    /// the last, the serving thread ending it would free a whole table (10 000 routes: a few
    /// milliseconds) between two requests. The reload loop holds them instead, and frees them
    /// here, off the serving threads: after each reload and at each of its looks (normally
    /// about a second apart).
    pub fn reap_retired(&self) -> usize {
        let free: Vec<Arc<LiveTable>>;
        let held = {
            let mut retired = self.retired.lock();
            // A table no one else holds cannot be taken again (it has left `live`, and no
            // `Weak` of a table is kept outside tests): a count of 1 is final.
            let (f, held): (Vec<_>, Vec<_>) =
                retired.drain(..).partition(|t| Arc::strong_count(t) == 1);
            free = f;
            *retired = held;
            retired.len()
        };
        drop(free);
        held
    }

    /// The table in force and the index of `route` in it.
    fn find(&self, route: &str) -> Result<(Arc<LiveTable>, usize), ControlError> {
        let live = self.snapshot();
        let i = live
            .table
            .route_index(route)
            .ok_or(ControlError::UnknownRoute)?;
        Ok((live, i))
    }

    /// Pins `route` to `default`. Returns whether it was newly pinned.
    pub fn pin(&self, route: &str, reason: PinReason, why: &str) -> Result<bool, ControlError> {
        let _publish = self.publish.lock();
        let (live, i) = self.find(route)?;
        Ok(self.pin_locked(&live, i, reason, why))
    }

    /// Pins every route. Returns how many were newly pinned. The pins are set in memory first,
    /// then written to the state file once: one write for the whole table, not one per route.
    pub fn pin_all(&self, why: &str) -> usize {
        let _publish = self.publish.lock();
        let live = self.snapshot();
        let changes: Vec<PinChange> = (0..live.routes.len())
            .filter_map(|i| Self::pin_in_memory(&live, i, PinReason::Manual, why, false))
            .collect();
        if !changes.is_empty() {
            // One warning for the lot (each route still gets its audit line).
            log::warn!(
                "{} route(s) pinned to default (manual, every route): {why}",
                changes.len()
            );
            self.save_pins();
        }
        self.record_unrecorded();
        for c in &changes {
            self.record(c);
        }
        changes.len()
    }

    /// The automatic rollback: called from the request path when a route's window crosses its
    /// threshold. Only the first caller pins; the rest return at once. The pin takes effect here
    /// (the next request already goes to `default`); the state file and the audit line, which
    /// wait on the disk, are written by a thread of their own so that no worker thread, and no
    /// connection on it, waits for an fsync or for a manual pin holding the lock.
    pub fn auto_pin(self: &Arc<Self>, live: &LiveTable, i: usize, why: &str) {
        // Counted before the pin exists: a hand-over (SIGQUIT) waits for the count to fall.
        let saving = SavingPin::start();
        if !self.pin_unrecorded(live, i, why) {
            return;
        }
        // After the pin is set: a write that reads this count or a later one writes the pin.
        let change = self.auto_pins.fetch_add(1, Ordering::SeqCst) + 1;
        let state = self.clone();
        let persist = move || {
            let _saving = saving;
            let _publish = state.publish.lock();
            // A backend down behind many routes pins them all at once: the first thread to get
            // here writes every pin set so far, the others find theirs written (one fsync, not
            // one per route, ahead of an operator's `POST /rollback`).
            if state.auto_pins_saved.load(Ordering::SeqCst) < change {
                state.save_pins();
            }
            state.record_unrecorded();
        };
        // A thread that cannot start drops `persist`, and with it `saving`.
        if let Err(e) = std::thread::Builder::new()
            .name("strangler pin".into())
            .spawn(persist)
        {
            log::error!("cannot start the thread that saves an automatic pin: {e}");
        }
    }

    /// The automatic pin in memory, its audit line left in `unrecorded`. Returns whether the
    /// route was newly pinned.
    fn pin_unrecorded(&self, live: &LiveTable, i: usize, why: &str) -> bool {
        let control = &live.routes[i].control;
        // A route a reload removed meanwhile is not pinned (nor audited): it is gone.
        if control.is_pinned() || control.retired.load(Ordering::Acquire) {
            return false;
        }
        // A route keeps its control across reloads by name, so pinning the control of the
        // table this request began with pins the route in the table in force too; the audit
        // line says who served it in that table, and which file it came from.
        let now = self.snapshot();
        let Some(j) = now.table.route_index(&live.table.routes[i].name) else {
            return false;
        };
        // Judged under the request's table; the table in force must still send the route to
        // the same backend under the same rule. A reload in between that changed either (it
        // clears the window, but only after its swap) leaves the judgement to the new rule.
        let (then, here) = (&live.table.routes[i], &now.table.routes[j]);
        let (b_then, b_here) = (&live.table.backends[then.to], &now.table.backends[here.to]);
        if here.rollback.is_none()
            || here.rollback != then.rollback
            || b_here.name != b_then.name
            || b_here.url != b_then.url
        {
            return false;
        }
        // Set and queued as one step: an audit writer that finds the pin set (a resume lifting
        // it) finds its line queued too.
        let mut unrecorded = self.unrecorded.lock();
        let Some(change) = Self::pin_in_memory(&now, j, PinReason::Auto, why, true) else {
            return false;
        };
        unrecorded.push(change);
        true
    }

    /// Writes the audit lines of automatic pins not written yet. Called under `publish`,
    /// before any other audit line.
    fn record_unrecorded(&self) {
        let changes = std::mem::take(&mut *self.unrecorded.lock());
        for c in &changes {
            self.record(c);
        }
    }

    fn pin_locked(&self, live: &LiveTable, i: usize, reason: PinReason, why: &str) -> bool {
        let Some(change) = Self::pin_in_memory(live, i, reason, why, true) else {
            return false;
        };
        self.save_pins();
        self.record_unrecorded();
        self.record(&change);
        true
    }

    /// Sets the pin of route `i` if it has none (atomically: of two callers, one wins), counts
    /// it, logs it if `log` (else the caller does), and returns what the audit line needs.
    fn pin_in_memory(
        live: &LiveTable,
        i: usize,
        reason: PinReason,
        why: &str,
        log: bool,
    ) -> Option<PinChange> {
        let control = &live.routes[i].control;
        let route = &live.table.routes[i];
        if control.is_pinned() {
            return None; // the common case of `pin_all`: nothing to format
        }
        let before = live.serving(route, false);
        let previous = control
            .pin
            .compare_and_swap(std::ptr::null::<Pin>(), Some(Arc::new(Pin::now(reason))));
        if previous.is_some() {
            return None;
        }
        metrics::ROLLBACKS
            .with_label_values(&[&*route.name, reason.as_str()])
            .inc();
        if log {
            log::warn!(
                route = &*route.name,
                reason = reason.as_str();
                "route {:?} pinned to default ({}): {why}",
                route.name,
                reason.as_str()
            );
        }
        Some(PinChange {
            route: route.name.clone(),
            before,
            after: live.serving(route, true),
            reason: format!("{} rollback: {why}", reason.as_str()),
            sha256: live.table.sha256.clone(),
        })
    }

    fn record(&self, c: &PinChange) {
        self.audit.record(
            &c.route,
            Some(&c.before),
            Some(&c.after),
            &c.reason,
            &c.sha256,
        );
    }

    /// Lifts the pin on `route`. Returns whether it was pinned.
    pub fn resume(&self, route: &str) -> Result<bool, ControlError> {
        let _publish = self.publish.lock();
        let (live, i) = self.find(route)?;
        Ok(self.resume_locked(&live, &[i], "resume") == 1)
    }

    /// Lifts every pin (`strangler resume --all`, `POST /resume`): the way back from
    /// `rollback --all`. Returns how many routes were pinned. One write of the state file.
    pub fn resume_all(&self) -> usize {
        let _publish = self.publish.lock();
        let live = self.snapshot();
        let all: Vec<usize> = (0..live.routes.len()).collect();
        let n = self.resume_locked(&live, &all, "resume (every route)");
        if n > 0 {
            log::info!("{n} route(s) resumed (every route)");
        }
        n
    }

    /// Lifts the pins of the routes `which` of `live` that have one, under `publish`. Returns
    /// how many it lifted.
    fn resume_locked(&self, live: &LiveTable, which: &[usize], why: &str) -> usize {
        let pinned: Vec<(usize, Serving)> = which
            .iter()
            .filter(|&&i| live.routes[i].control.is_pinned())
            .map(|&i| (i, live.serving(&live.table.routes[i], true)))
            .collect();
        if pinned.is_empty() {
            return 0;
        }
        // A fresh start, made before the pin is lifted: the failures that caused the pin must
        // not re-pin at once, nor those of requests sent before it that end later (the window's
        // next generation; one ending between a lift and a clear would judge the old window).
        for &(i, _) in &pinned {
            live.routes[i].control.to_window.clear();
        }
        // Lifted while holding the queue of unwritten pin lines: the line of a pin being
        // lifted (if its thread has not written it yet) is taken and written first; a pin set
        // after the lift queues its line behind this resume's.
        let earlier = {
            let mut queue = self.unrecorded.lock();
            for &(i, _) in &pinned {
                live.routes[i].control.pin.store(None);
            }
            std::mem::take(&mut *queue)
        };
        for (i, before) in &pinned {
            let name = &live.table.routes[*i].name;
            log::info!("route {name:?} resumed: served by {} again", before.to);
        }
        self.save_pins();
        for c in &earlier {
            self.record(c);
        }
        for (i, before) in &pinned {
            let r = &live.table.routes[*i];
            let after = live.serving(r, false);
            self.audit
                .record(&r.name, Some(before), Some(&after), why, &live.table.sha256);
        }
        pinned.len()
    }

    fn save_pins(&self) {
        let through = self.auto_pins.load(Ordering::SeqCst);
        let pins: BTreeMap<String, Pin> = self
            .controls
            .lock()
            .values()
            .filter_map(|c| c.pin().map(|p| (c.name.to_string(), (*p).clone())))
            .collect();
        let saved = self.state_file.save(&pins);
        if saved {
            self.auto_pins_saved.fetch_max(through, Ordering::SeqCst);
        }
        let mut unsaved = self.unsaved.lock();
        *unsaved = match (*unsaved, saved) {
            (_, true) => None,
            // After a hand-over the file is the new process's: nothing to try again.
            (_, false) if crate::pins::handed_over() => None,
            (None, false) => Some((Instant::now() + SAVE_RETRY_FIRST, SAVE_RETRY_FIRST)),
            (Some((_, wait)), false) => {
                let wait = (wait * 2).min(SAVE_RETRY_MAX);
                Some((Instant::now() + wait, wait))
            }
        };
    }

    /// Writes the pins again if the last write failed and its retry is due (a directory created
    /// since, a disk freed): a pin taken during an incident must not live in memory only until
    /// the next pin or restart. Called by the reload loop at each look (about a second apart);
    /// the wait doubles from 1 s to 60 s between failed tries, so a disk that stays full
    /// writes one error line a minute.
    pub fn save_unsaved_pins(&self) {
        let due = |u: &Option<(Instant, Duration)>| u.is_some_and(|(at, _)| Instant::now() >= at);
        if !due(&self.unsaved.lock()) {
            return;
        }
        let _publish = self.publish.lock();
        if !due(&self.unsaved.lock()) {
            return;
        }
        self.save_pins();
        if self.unsaved.lock().is_none() {
            log::info!(
                "state file {} written: the pins it missed are saved",
                self.state_file.path().display()
            );
        }
    }
}

/// Why a routing file was not loaded.
#[derive(Debug)]
pub struct LoadError {
    /// Every error, one per line (`FILE:LINE:COL: message`).
    pub message: String,
    /// The file is valid but a backend's name did not resolve: not a property of the file, so
    /// the same version is worth trying again (a DNS hiccup, a Service whose record lags the
    /// ConfigMap).
    pub unresolved: bool,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl From<String> for LoadError {
    fn from(message: String) -> Self {
        LoadError {
            message,
            unresolved: false,
        }
    }
}

/// Reads `config` (unless given its bytes, read from `t0` on), parses, validates and resolves
/// it. `parsed` is set to the time from `t0` to the end of the YAML parse (the rest is
/// validation and DNS).
/// Reads, parses, validates and resolves `config` (`bytes`, when already read). A name that
/// does not resolve keeps the addresses `in_force` has for it (`RoutingTable::resolve`): each
/// such name is a warning, logged and returned with the table.
fn load_table(
    config: &Path,
    bytes: Option<(Vec<u8>, String)>,
    t0: Instant,
    parsed: &mut Duration,
    in_force: Option<&RoutingTable>,
) -> Result<(RoutingTable, Vec<String>), LoadError> {
    let read = match bytes {
        Some((bytes, sha256)) => config::bytes_checked(config, bytes, sha256),
        None => config::read_checked(config),
    };
    *parsed = t0.elapsed();
    let (file, source) = match read {
        Ok(read) => read,
        // Every error the file has, the unknown keys' and the rest's.
        Err(unread) => {
            return Err(match RoutingTable::build_checked(Err(unread)) {
                Err(e) => e.to_string(),
                Ok(_) => "routing file refused".to_string(),
            }
            .into())
        }
    };
    let mut table = RoutingTable::build(file, &source).map_err(|e| e.to_string())?;
    let kept = table.resolve(&source, in_force).map_err(|e| LoadError {
        message: e.to_string(),
        unresolved: true,
    })?;
    let mut kept = kept;
    // The store is read once, at start-up: a reload that brings an https backend to a process
    // that found none says so where the operator looks (the log, `POST /reload`'s warnings).
    if let Some(old) = in_force {
        if crate::server::TRUST_STORE_EMPTY.load(std::sync::atomic::Ordering::Relaxed) {
            for b in table.backends.iter().filter(|b| b.tls) {
                if !old.backends.iter().any(|o| o.tls && o.url == b.url) {
                    kept.push(format!(
                        "backend {:?} ({}): no trusted root certificate was found at start-up (SSL_CERT_FILE, SSL_CERT_DIR or the system's store): its requests will fail verification (502) until a restart with one",
                        b.name, b.url
                    ));
                }
            }
        }
    }
    for line in &kept {
        log::warn!("{line}");
    }
    Ok((table, kept))
}

/// The counter goes last: whoever sees it (a scrape, an alert, a script waiting for its
/// reload) sees the validity, the timestamp and the duration of the same reload.
fn record_success(took: Duration) {
    metrics::CONFIG_RELOAD_DURATION.observe(took.as_secs_f64());
    metrics::CONFIG_VALID.set(1);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as f64 / 1e6)
        .unwrap_or(0.0);
    metrics::CONFIG_LAST_SUCCESS.set(now);
    metrics::CONFIG_RELOADS
        .with_label_values(&["success"])
        .inc();
}

/// Builds the live handles for `table`, reusing the controls of routes that keep their name and
/// dropping the others (their pins are lifted: the route has left the file). When the backends
/// are the same, in the same order, as in `old`, a kept route's handles are taken over whole
/// (one `Arc` each): a reload that changes a few routes of 10 000 builds a few handles.
fn assemble(
    table: RoutingTable,
    old: Option<&LiveTable>,
    controls: &mut HashMap<Arc<str>, Arc<RouteControl>>,
) -> LiveTable {
    let reusable = old.filter(|o| {
        o.table.backends.len() == table.backends.len()
            && o.table
                .backends
                .iter()
                .zip(&table.backends)
                .all(|(a, b)| a.name == b.name)
    });
    let live_for = |name: &Arc<str>, control: Arc<RouteControl>| {
        // The last-minute windows of backends no longer in the table are let go.
        control
            .recent
            .lock()
            .retain(|b, _| table.backends.iter().any(|t| t.name == *b));
        RouteLive {
            header: HeaderValue::from_str(name)
                .unwrap_or_else(|_| HeaderValue::from_static("invalid")),
            duration: table.backends.iter().map(|_| OnceLock::new()).collect(),
            recent: table
                .backends
                .iter()
                .map(|b| control.recent_window(&b.name))
                .collect(),
            requests: metrics::RequestCounters::new(name.clone()),
            control,
        }
    };
    // The old route of the same name: usually at the same index, else found by name.
    let taken_over = |i: usize, name: &Arc<str>| {
        let o = reusable?;
        let j = match o.table.routes.get(i) {
            Some(r) if r.name == *name => i,
            _ => o.table.route_index(name)?,
        };
        Some(o.routes[j].clone())
    };
    let mut all_taken_over = true;
    let routes: Vec<Arc<RouteLive>> = table
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            if let Some(l) = taken_over(i, &r.name) {
                return l;
            }
            all_taken_over = false;
            let control = controls
                .entry(r.name.clone())
                .or_insert_with(|| Arc::new(RouteControl::new(r.name.clone())))
                .clone();
            Arc::new(live_for(&r.name, control))
        })
        .collect();
    let unmatched = match reusable {
        Some(o) => o.unmatched.clone(),
        None => {
            let control = controls
                .entry(DEFAULT_ROUTE.into())
                .or_insert_with(|| Arc::new(RouteControl::new(DEFAULT_ROUTE.into())))
                .clone();
            Arc::new(live_for(&control.name.clone(), control))
        }
    };
    // Same names as before: the controls are those of the table in force. Otherwise the routes
    // that left the file drop their control (and with it their gauges: those are read from the
    // table in force, see `route_gauges.rs`).
    let same_names =
        all_taken_over && reusable.is_some_and(|o| o.table.routes.len() == table.routes.len());
    if !same_names {
        controls.retain(|name, control| {
            let kept = **name == *DEFAULT_ROUTE || table.route_index(name).is_some();
            if !kept {
                control.retired.store(true, Ordering::Release);
            }
            kept
        });
    }
    let backend_headers = table
        .backends
        .iter()
        .map(|b| {
            HeaderValue::from_str(&b.name).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
        })
        .collect();
    LiveTable {
        routes,
        unmatched,
        backend_headers,
        backend_retired: table
            .backends
            .iter()
            .map(|_| AtomicBool::new(false))
            .collect(),
        table,
    }
}

/// Requests and errors per backend over the last minute, for `/routes`.
pub fn recent_counts(live: &LiveTable, i: Option<usize>) -> Vec<(String, u64, u64)> {
    let l = live.route_live(i);
    let now = Instant::now();
    live.table
        .backends
        .iter()
        .zip(&l.recent)
        .map(|(b, w)| {
            let (r, e) = w.totals(now, RECENT);
            (b.name.to_string(), r, e)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The audit trail of an automatic pin whose thread has not run yet (it waits for
    /// `publish`, which a reload or a resume holds): the pin's line says who served the route in
    /// the table in force, with that file's sha256, and a resume that lifts the pin writes the
    /// pin's line before its own, never after. (One `State` per process: the only test that
    /// starts one; it also checks that the table the request began on is freed off its thread.)
    #[test]
    fn a_pin_not_yet_written_is_audited_from_the_table_in_force_and_before_its_resume() {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("routing.yaml");
        let yaml = |extra: &str| {
            format!(
                "backends:\n  legacy: {{url: 'http://127.0.0.1:9'}}\n  new: {{url: 'http://127.0.0.1:9'}}\n\
                 default: legacy\nroutes:\n  - {{name: r, path: /r, to: new, rollback: {{error_rate: 50%, min_requests: 4, window: 60s}}}}\n{extra}"
            )
        };
        std::fs::write(&config, yaml("")).unwrap();
        let audit_path = dir.path().join("audit.jsonl");
        let state = State::start(
            &config,
            StateFile::new(dir.path().join("state.json")),
            Audit::open(Some(audit_path.clone())).unwrap(),
            false,
        )
        .unwrap();
        // The request began under this table; a reload publishes another before it pins.
        let began = state.snapshot();
        std::fs::write(&config, yaml("  - {name: s, path: /s, to: new}\n")).unwrap();
        state.reload("test").unwrap();
        let in_force = state.snapshot().table.sha256.clone();
        assert_ne!(began.table.sha256, in_force);

        assert!(state.pin_unrecorded(&began, 0, "failing"));
        assert!(!state.pin_unrecorded(&began, 0, "again"), "pinned once");
        assert_eq!(state.resume("r"), Ok(true));
        // The pin's thread, when it runs, has nothing left to write.
        state.record_unrecorded();

        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&audit_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .filter(|l: &serde_json::Value| l["route"] == "r")
            .collect();
        let reasons: Vec<&str> = lines
            .iter()
            .map(|l| l["reason"].as_str().unwrap())
            .collect();
        assert_eq!(reasons, ["auto rollback: failing", "resume"], "{lines:?}");
        assert_eq!(lines[0]["config_sha256"], in_force.as_str());
        assert_eq!(lines[0]["after"]["state"], "rolled_back");
        assert_eq!(lines[1]["before"]["state"], "rolled_back");
        assert_eq!(lines[1]["after"]["state"], "new");

        // The replaced table outlives the request's end: the reload loop frees it, not the
        // thread that ends the request.
        let replaced = Arc::downgrade(&began);
        assert_eq!(state.reap_retired(), 1, "held by the request");
        drop(began);
        assert!(replaced.upgrade().is_some(), "not freed by the request");
        assert_eq!(state.reap_retired(), 0);
        assert!(replaced.upgrade().is_none(), "freed by the reaper");

        // After a hand-over (`run --upgrade`) the state file is the truth: the pins and
        // resumes the replaced process made before it handed over are taken; a file that
        // cannot be read then lifts nothing.
        let file = dir.path().join("state.json");
        assert_eq!(state.pin("s", PinReason::Manual, "test"), Ok(true));
        let with_s = std::fs::read(&file).unwrap();
        std::fs::write(&file, br#"{"version": 1, "pins": {}}"#).unwrap();
        state.adopt_pins();
        assert!(!state.is_pinned("s"), "resumed by the other process");
        std::fs::write(&file, &with_s).unwrap();
        state.adopt_pins();
        assert!(state.is_pinned("s"), "pinned by the other process");
        std::fs::remove_file(&file).unwrap();
        std::fs::create_dir(&file).unwrap();
        state.adopt_pins();
        assert!(state.is_pinned("s"), "an unreadable file lifts nothing");
    }
}
