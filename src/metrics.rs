//! The metrics of SPEC §8, registered once in the default registry of `prometheus` 0.14 (the
//! registry `pingora-prometheus` and our admin `/metrics` gather from) — all but the four
//! per-route gauges, which `route_gauges.rs` reads from the table at scrape time. Names, types
//! and labels here are a contract with dashboards and alert rules: change none of them.
//!
//! Label values are bounded by construction: `route` is a route name from the table or
//! `default`, `backend` a backend name or `none`, `method` one of eight words, `code` a status.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use prometheus::core::{Collector, MetricVec, MetricVecBuilder};
use prometheus::{
    exponential_buckets, register_gauge, register_histogram, register_histogram_vec,
    register_int_counter, register_int_counter_vec, register_int_gauge, Gauge, Histogram,
    HistogramVec, IntCounter, IntCounterVec, IntGauge,
};

use crate::router::{Route, RoutingTable};

/// Latency buckets for an API proxy: 1 ms … ~33 s, doubling.
fn latency_buckets() -> Vec<f64> {
    // 0.001 · 2^0 … 0.001 · 2^15 = 32.768 s
    exponential_buckets(0.001, 2.0, 16).unwrap_or_default()
}

macro_rules! metric {
    ($name:ident: $ty:ty = $e:expr) => {
        pub static $name: LazyLock<$ty> =
            LazyLock::new(|| $e.expect(concat!("registering ", stringify!($name))));
    };
}

metric!(REQUESTS: IntCounterVec = register_int_counter_vec!(
    "strangler_requests_total",
    "Requests answered, by route, backend, method and the status code sent to the client (499: client went away).",
    &["route", "backend", "method", "code"]
));
metric!(DURATION: HistogramVec = register_histogram_vec!(
    "strangler_request_duration_seconds",
    "Time from the request's arrival to the end of its response, by route and backend.",
    &["route", "backend"],
    latency_buckets()
));
metric!(UPSTREAM_ERRORS: IntCounterVec = register_int_counter_vec!(
    "strangler_upstream_errors_total",
    "Failures talking to a backend, by kind: connect, timeout, reset, other.",
    &["route", "backend", "kind"]
));
metric!(SHADOW: IntCounterVec = register_int_counter_vec!(
    "strangler_shadow_total",
    "Shadow comparisons, by result: match, mismatch, error, skipped.",
    &["route", "backend", "result"]
));
metric!(ROLLBACKS: IntCounterVec = register_int_counter_vec!(
    "strangler_rollbacks_total",
    "Routes pinned to default, by reason: auto or manual.",
    &["route", "reason"]
));
metric!(FAILOVERS: IntCounterVec = register_int_counter_vec!(
    "strangler_failovers_total",
    "Requests retried on default after their backend could not be reached.",
    &["route", "from", "to"]
));
metric!(CONFIG_RELOADS: IntCounterVec = register_int_counter_vec!(
    "strangler_config_reloads_total",
    "Attempts to load routing.yaml, by result: success or error.",
    &["result"]
));
metric!(CONFIG_LAST_SUCCESS: Gauge = register_gauge!(
    "strangler_config_last_reload_success_timestamp_seconds",
    "Unix time of the last successful load of routing.yaml (to the microsecond: two loads in one second differ)."
));
metric!(CONFIG_VALID: IntGauge = register_int_gauge!(
    "strangler_config_valid",
    "1 when the routing.yaml on disk is the table in force, 0 when the last load failed."
));
metric!(CONFIG_RELOAD_DURATION: Histogram = register_histogram!(
    "strangler_config_reload_duration_seconds",
    "Time to read, parse, validate and swap in routing.yaml.",
    exponential_buckets(0.0005, 2.0, 14).unwrap_or_default()
));
metric!(STATE_FILE_ERRORS: IntCounter = register_int_counter!(
    "strangler_state_file_write_errors_total",
    "Failed writes of the pin state file since start (pins still hold in memory)."
));
metric!(STATE_FILE_READ_ERRORS: IntCounter = register_int_counter!(
    "strangler_state_file_read_errors_total",
    "State files found unreadable or corrupt at start-up (their pins were dropped)."
));

/// The `method` label: the eight fixed values, never the raw method.
pub fn method_label(method: &http::Method) -> &'static str {
    match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        _ => "OTHER",
    }
}

/// Index of a method label (see [`method_label`]), for compact keys.
pub fn method_index(label: &str) -> u32 {
    match label {
        "GET" => 0,
        "HEAD" => 1,
        "POST" => 2,
        "PUT" => 3,
        "PATCH" => 4,
        "DELETE" => 5,
        "OPTIONS" => 6,
        _ => 7,
    }
}

/// `strangler_requests_total` handles of one route, resolved on first use and kept: the
/// request path finds its counter by a small integer key instead of hashing four label strings
/// in the registry. A route sees few distinct (backend, method, code) triples, so a short
/// vector scanned under a read lock is the cheapest map.
#[derive(Debug)]
pub struct RequestCounters {
    route: std::sync::Arc<str>,
    cache: parking_lot::RwLock<Vec<(u64, IntCounter)>>,
}

impl RequestCounters {
    pub fn new(route: std::sync::Arc<str>) -> Self {
        RequestCounters {
            route,
            cache: parking_lot::RwLock::new(Vec::new()),
        }
    }

    /// Counts one request. `backend` is the backend's index (`None`: answered by the proxy).
    pub fn inc(&self, backend: Option<usize>, backend_name: &str, method: &'static str, code: u16) {
        // Backend index (any table size), method and code: distinct labels, distinct keys.
        let b = backend.map_or(u64::from(u32::MAX), |b| b as u64);
        let key = (b << 32) | (u64::from(method_index(method)) << 16) | u64::from(code);
        if let Some((_, c)) = self.cache.read().iter().find(|(k, _)| *k == key) {
            c.inc();
            return;
        }
        let counter =
            REQUESTS.with_label_values(&[&*self.route, backend_name, method, &code.to_string()]);
        counter.inc();
        let mut cache = self.cache.write();
        if !cache.iter().any(|(k, _)| *k == key) {
            cache.push((key, counter));
        }
    }
}

/// The `result` values of `strangler_shadow_total`.
pub const SHADOW_RESULTS: [&str; 4] = ["match", "mismatch", "error", "skipped"];

/// Zero series for the events each route's configuration makes possible: a manual rollback
/// (every route), an automatic one (a route with `rollback`), a failover (a route with
/// `failover`), the four shadow results (a shadowed route). So the first such event is a step
/// from 0 that `increase()` and the alert rules see, not a series born at 1 — and a scrape of a
/// fresh proxy lists these families. Existing series are left as they are (a lookup each).
/// `strangler_upstream_errors_total` (route × backend × kind) and the request families (which
/// depend on method and code) are born with their first event.
pub fn prime(table: &RoutingTable) {
    let default = &*table.backends[table.default].name;
    for r in &table.routes {
        ROLLBACKS.with_label_values(&[&*r.name, "manual"]);
        if r.rollback.is_some() {
            ROLLBACKS.with_label_values(&[&*r.name, "auto"]);
        }
        if r.failover && r.to != table.default {
            FAILOVERS.with_label_values(&[&*r.name, &*table.backends[r.to].name, default]);
        }
        if let Some(s) = r.shadow {
            for result in SHADOW_RESULTS {
                SHADOW.with_label_values(&[&*r.name, &*table.backends[s].name, result]);
            }
        }
    }
}

/// Deletes the zero series [`prime`] made for `old`'s routes that `new` no longer makes: a route
/// that stays but drops `rollback`, `failover` or `shadow`, or whose failover or shadow
/// backends change. So `/metrics` describes the table in force; a series that has counted
/// something keeps its history. (Routes that left the table: [`forget`].)
pub fn unprime(old: &RoutingTable, new: &RoutingTable) {
    fn failover<'t>(t: &'t RoutingTable, r: &Route) -> Option<(&'t str, &'t str)> {
        (r.failover && r.to != t.default)
            .then(|| (&*t.backends[r.to].name, &*t.backends[t.default].name))
    }
    fn shadow<'t>(t: &'t RoutingTable, r: &Route) -> Option<&'t str> {
        r.shadow.map(|s| &*t.backends[s].name)
    }
    for r in &old.routes {
        let Some(n) = new.route_index(&r.name).map(|j| &new.routes[j]) else {
            continue;
        };
        if r.rollback.is_some() && n.rollback.is_none() {
            remove_if_zero(&ROLLBACKS, &[&r.name, "auto"]);
        }
        if let Some((from, to)) = failover(old, r) {
            if failover(new, n) != Some((from, to)) {
                remove_if_zero(&FAILOVERS, &[&r.name, from, to]);
            }
        }
        if let Some(b) = shadow(old, r) {
            if shadow(new, n) != Some(b) {
                for result in SHADOW_RESULTS {
                    remove_if_zero(&SHADOW, &[&r.name, b, result]);
                }
            }
        }
    }
}

/// Deletes a series if it reads zero (one that is absent is made and deleted at once).
fn remove_if_zero(vec: &IntCounterVec, labels: &[&str]) {
    if vec
        .get_metric_with_label_values(labels)
        .is_ok_and(|c| c.get() == 0)
    {
        let _ = vec.remove_label_values(labels);
    }
}

/// Deletes every series of the named routes (they have left the table), so `/metrics` does
/// not keep reporting routes that no longer exist. A request still in flight on the old table
/// finishes uncounted in them.
pub fn forget(routes: &HashSet<&str>) {
    if routes.is_empty() {
        return;
    }
    forget_where(|label, value| label == "route" && routes.contains(value));
}

/// Deletes every series naming a backend that is not in `kept` (a reload renamed or removed
/// it): its `backend`, or a failover's `from` or `to`. `none` (answered by the proxy) stays.
pub fn forget_backends(kept: &HashSet<&str>) {
    forget_where(|label, value| {
        matches!(label, "backend" | "from" | "to") && value != "none" && !kept.contains(value)
    });
}

/// Deletes, from every labelled family that names routes and backends, the series with a
/// label for which `gone(name, value)` holds.
fn forget_where(gone: impl Fn(&str, &str) -> bool) {
    forget_in(&REQUESTS, &gone);
    forget_in(&DURATION, &gone);
    forget_in(&UPSTREAM_ERRORS, &gone);
    forget_in(&SHADOW, &gone);
    forget_in(&ROLLBACKS, &gone);
    forget_in(&FAILOVERS, &gone);
}

fn forget_in<T: MetricVecBuilder>(vec: &MetricVec<T>, gone: &impl Fn(&str, &str) -> bool) {
    for family in vec.collect() {
        for m in family.get_metric() {
            if !m.get_label().iter().any(|l| gone(l.name(), l.value())) {
                continue;
            }
            let labels: HashMap<&str, &str> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            let _ = vec.remove(&labels);
        }
    }
}

/// Forces registration of every metric. (A labelled family appears in `/metrics` with its
/// first series: see [`prime`].)
pub fn register_all() {
    LazyLock::force(&REQUESTS);
    LazyLock::force(&DURATION);
    LazyLock::force(&UPSTREAM_ERRORS);
    LazyLock::force(&SHADOW);
    LazyLock::force(&ROLLBACKS);
    LazyLock::force(&FAILOVERS);
    // Both results exist from start-up, so `rate()` and alerts see a zero, not a gap.
    CONFIG_RELOADS.with_label_values(&["success"]);
    CONFIG_RELOADS.with_label_values(&["error"]);
    LazyLock::force(&CONFIG_LAST_SUCCESS);
    LazyLock::force(&CONFIG_VALID);
    LazyLock::force(&CONFIG_RELOAD_DURATION);
    LazyLock::force(&STATE_FILE_ERRORS);
    LazyLock::force(&STATE_FILE_READ_ERRORS);
    // The standard process metrics (`process_open_fds`, `process_max_fds`,
    // `process_resident_memory_bytes`, `process_cpu_seconds_total`…) come with the default
    // registry itself: the `prometheus` crate's `process` feature registers them there.
}

/// The last render and when it began, kept only while scrapes wait for the lock: none is kept
/// between scrapes (a 10 000-route exposition is ~7 MB).
static LAST: parking_lot::Mutex<Option<(std::time::Instant, Vec<u8>)>> =
    parking_lot::Mutex::new(None);
/// Scrapes waiting for `LAST`'s lock.
static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The Prometheus text exposition of every registered metric. One render at a time, and the
/// scrapes that wait while one runs take the next one (begun after they asked, so never older
/// than their request): a 10 000-route table's exposition takes ~100 ms of CPU, which many
/// scrapers at once must not multiply.
pub fn render() -> Vec<u8> {
    use prometheus::Encoder;
    use std::sync::atomic::Ordering;
    let asked = std::time::Instant::now();
    WAITING.fetch_add(1, Ordering::AcqRel);
    let mut last = LAST.lock();
    WAITING.fetch_sub(1, Ordering::AcqRel);
    match last.take() {
        // Begun after this scrape asked: it holds every change made before the request.
        Some((began, body)) if began > asked => {
            if WAITING.load(Ordering::Acquire) > 0 {
                *last = Some((began, body.clone()));
            }
            return body;
        }
        _ => {}
    }
    let began = std::time::Instant::now();
    let mut buf = Vec::with_capacity(16 * 1024);
    let encoder = prometheus::TextEncoder::new();
    if let Err(e) = encoder.encode(&prometheus::gather(), &mut buf) {
        log::error!("encoding metrics: {e}");
    }
    if WAITING.load(Ordering::Acquire) > 0 {
        *last = Some((began, buf.clone()));
    }
    buf
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::core::{Collector, Desc};
    use prometheus::proto::MetricFamily;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
    use std::sync::{Arc, Barrier};

    const HELD: &str = "strangler_test_held_scrape";

    /// A gauge read at scrape time that, once armed, holds the scrape that reads it between
    /// reading its value and returning it: that render is in progress, and stale, meanwhile.
    struct Held {
        desc: Desc,
        value: Arc<AtomicU64>,
        armed: Arc<AtomicBool>,
        read: Arc<Barrier>,
        release: Arc<Barrier>,
    }

    impl Collector for Held {
        fn desc(&self) -> Vec<&Desc> {
            vec![&self.desc]
        }
        fn collect(&self) -> Vec<MetricFamily> {
            let value = self.value.load(SeqCst);
            if self.armed.swap(false, SeqCst) {
                self.read.wait();
                self.release.wait();
            }
            let gauge = prometheus::Gauge::new(HELD, "test").unwrap();
            gauge.set(value as f64);
            gauge.collect()
        }
    }

    /// A scrape that waits while another renders gets a render begun after it asked: what
    /// changed before its request (here a gauge, after a reload a whole route) is in it.
    #[test]
    fn a_scrape_never_gets_a_render_begun_before_it_asked() {
        let (value, armed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicBool::new(true)));
        let (read, release) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        prometheus::register(Box::new(Held {
            desc: Desc::new(HELD.into(), "test".into(), vec![], Default::default()).unwrap(),
            value: value.clone(),
            armed,
            read: read.clone(),
            release: release.clone(),
        }))
        .unwrap();
        let first = std::thread::spawn(render);
        read.wait();
        // The first render has read 0 and holds the lock; the value changes, then a second
        // scrape asks and waits.
        value.store(1, SeqCst);
        let second = std::thread::spawn(render);
        while WAITING.load(SeqCst) == 0 {
            std::thread::yield_now();
        }
        release.wait();
        let text = |body: Vec<u8>| String::from_utf8(body).unwrap();
        let (first, second) = (text(first.join().unwrap()), text(second.join().unwrap()));
        assert!(first.contains(&format!("\n{HELD} 0\n")), "{first}");
        assert!(second.contains(&format!("\n{HELD} 1\n")), "{second}");
    }
}
