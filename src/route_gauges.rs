//! The per-route gauges of SPEC §8 — `strangler_route_pinned`, `strangler_route_state`,
//! `strangler_route_split_percent` and `strangler_requests_in_flight` — read from the table in
//! force when `/metrics` is scraped instead of being stored as registry series. With them, one
//! the SPEC does not list: `strangler_default_backend{backend}`, 1 for the backend `default`
//! names, so that alert rules and dashboards tell the default backend from a new one by what
//! the table says, not by inference from shares and states.
//!
//! A series in the `prometheus` registry carries its own copy of the metric's description and
//! labels (~600 bytes); these four families are 8–9 series per route, ~50 MiB for a 10 000-route
//! table. Read at scrape time they cost nothing between scrapes, a reload or a pin has nothing
//! to publish, and they can never disagree with the table and the pins in force. Names, help
//! texts, types and labels are the same as registered series would have: dashboards and alert
//! rules see no difference.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Gauge, LabelPair, Metric, MetricFamily, MetricType};

use crate::router::RouteState;
use crate::state::{LiveTable, State};

const PINNED: (&str, &str) = (
    "strangler_route_pinned",
    "1 while the route is pinned to default, else 0.",
);
const STATE: (&str, &str) = (
    "strangler_route_state",
    "1 for the route's current state (legacy, shadow, canary, new, rolled_back), 0 for the others.",
);
const SPLIT: (&str, &str) = (
    "strangler_route_split_percent",
    "Share of new clients (percent) that the backend gets on this route.",
);
const DEFAULT_BACKEND: (&str, &str) = (
    "strangler_default_backend",
    "1 for the backend named by `default` (unmatched requests, pinned routes, the rest of a split).",
);
const IN_FLIGHT: (&str, &str) = (
    "strangler_requests_in_flight",
    "Requests being served now, by route.",
);

/// The collector, registered once in the default registry by [`register`].
pub struct RouteGauges {
    state: Weak<State>,
    descs: Vec<Desc>,
}

/// Registers the per-route gauges of `state` in the default registry. Called once per process,
/// when the first table is in force.
pub fn register(state: &Arc<State>) -> prometheus::Result<()> {
    let desc = |(name, help): (&str, &str), labels: &[&str]| {
        Desc::new(
            name.to_string(),
            help.to_string(),
            labels.iter().map(|l| l.to_string()).collect(),
            Default::default(),
        )
    };
    let descs = vec![
        desc(PINNED, &["route"])?,
        desc(STATE, &["route", "state"])?,
        desc(SPLIT, &["route", "backend"])?,
        desc(IN_FLIGHT, &["route"])?,
        desc(DEFAULT_BACKEND, &["backend"])?,
    ];
    prometheus::register(Box::new(RouteGauges {
        state: Arc::downgrade(state),
        descs,
    }))
}

impl Collector for RouteGauges {
    fn desc(&self) -> Vec<&Desc> {
        self.descs.iter().collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        match self.state.upgrade() {
            Some(state) => families(&state.snapshot()),
            None => Vec::new(),
        }
    }
}

/// The five families for `live`.
fn families(live: &LiveTable) -> Vec<MetricFamily> {
    let t = &live.table;
    let default = &*t.backends[t.default].name;
    let n = t.routes.len();
    let mut pinned = Vec::with_capacity(n);
    let mut states = Vec::with_capacity(n * RouteState::ALL.len());
    let mut split = Vec::with_capacity(n * 2);
    let mut in_flight = Vec::with_capacity(n + 1);
    for (r, l) in t.routes.iter().zip(&live.routes) {
        let name = &*r.name;
        let is_pinned = l.control.is_pinned();
        pinned.push(gauge(&[("route", name)], f64::from(u8::from(is_pinned))));
        let state = t.state(r, is_pinned);
        for s in RouteState::ALL {
            let value = f64::from(u8::from(s == state));
            states.push(gauge(&[("route", name), ("state", s.as_str())], value));
        }
        // The share of new clients each backend gets: `to` and `default` split 100 between
        // them (all to `default` while pinned); a route whose `to` is `default` has one series.
        let to_share = match (&r.split, is_pinned) {
            (_, true) => 0.0,
            (Some(s), false) => s.percent,
            (None, false) => 100.0,
        };
        if r.to == t.default {
            split.push(gauge(&[("backend", default), ("route", name)], 100.0));
        } else {
            let to = &*t.backends[r.to].name;
            split.push(gauge(&[("backend", to), ("route", name)], to_share));
            // To the millionth of a percent, as a split is read: `100 − 99.99` in floating
            // point is 0.010000000000005116.
            let rest = ((100.0 - to_share) * 1e6).round() / 1e6;
            split.push(gauge(&[("backend", default), ("route", name)], rest));
        }
        in_flight.push(in_flight_gauge(name, l));
    }
    in_flight.push(in_flight_gauge(
        &live.unmatched.control.name,
        &live.unmatched,
    ));
    vec![
        family(PINNED, pinned),
        family(STATE, states),
        family(SPLIT, split),
        family(IN_FLIGHT, in_flight),
        family(DEFAULT_BACKEND, vec![gauge(&[("backend", default)], 1.0)]),
    ]
}

fn in_flight_gauge(route: &str, l: &crate::state::RouteLive) -> Metric {
    let n = l.control.in_flight.load(Ordering::Relaxed);
    gauge(&[("route", route)], n as f64)
}

/// One sample; `labels` in the registry's order (sorted by name), which is the order of the
/// pairs in the exposition text.
fn gauge(labels: &[(&str, &str)], value: f64) -> Metric {
    debug_assert!(labels.windows(2).all(|w| w[0].0 < w[1].0), "{labels:?}");
    let pairs = labels
        .iter()
        .map(|(k, v)| {
            let mut p = LabelPair::default();
            p.set_name(k.to_string());
            p.set_value(v.to_string());
            p
        })
        .collect();
    let mut m = Metric::from_label(pairs);
    let mut g = Gauge::default();
    g.set_value(value);
    m.set_gauge(g);
    m
}

fn family((name, help): (&str, &str), metrics: Vec<Metric>) -> MetricFamily {
    let mut f = MetricFamily::default();
    f.set_name(name.to_string());
    f.set_help(help.to_string());
    f.set_field_type(MetricType::GAUGE);
    f.set_metric(metrics);
    f
}
