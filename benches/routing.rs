//! Routing micro-benchmarks (criterion): route lookup at 10 / 1 000 / 10 000 routes, the parse +
//! validate of a 10 000-route file (what a reload costs before its one pointer swap; plus the parse
//! alone, to split that figure), and path normalisation.
//!
//! Run: `cargo bench --bench routing`. Figures and the machine they came from: BENCHMARKS.md.
//!
//! The generated tables look like a real API: services `svcK` with 50 resources each, and per
//! resource four routes
//!
//! ```text
//! /svcK/resourceJ                      prefix, to new|legacy
//! /svcK/resourceJ/{id}                 methods [GET, HEAD]
//! /svcK/resourceJ/{id}                 methods [PUT, PATCH, DELETE]   (same pattern, disjoint methods)
//! /svcK/resourceJ/{id}/sub             exact: true on every other resource
//! ```
//!
//! cut at exactly N routes, names unique, backends `legacy` and `new`, `default: legacy`.

use std::fmt::Write as _;
use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use strangler::config;
use strangler::path::{normalize, NormalPath};
use strangler::router::RoutingTable;

const RESOURCES_PER_SERVICE: usize = 50;
const ROUTES_PER_RESOURCE: usize = 4;

/// `(service, resource)` of resource number `r`.
fn resource(r: usize) -> (usize, usize) {
    (r / RESOURCES_PER_SERVICE, r % RESOURCES_PER_SERVICE)
}

/// routing.yaml text with exactly `n` routes.
fn routing_yaml(n: usize) -> String {
    let mut y = String::with_capacity(n * 110 + 256);
    y.push_str(
        "backends:\n  legacy:\n    url: http://127.0.0.1:9001\n  new:\n    url: http://127.0.0.1:9002\n    trailing_slash: add\ndefault: legacy\nroutes:\n",
    );
    for i in 0..n {
        let r = i / ROUTES_PER_RESOURCE;
        let (k, j) = resource(r);
        let to = if r.is_multiple_of(2) { "new" } else { "legacy" };
        match i % ROUTES_PER_RESOURCE {
            0 => writeln!(y, "  - name: svc{k}-resource{j}\n    path: /svc{k}/resource{j}\n    to: {to}"),
            1 => writeln!(
                y,
                "  - name: svc{k}-resource{j}-read\n    path: /svc{k}/resource{j}/{{id}}\n    methods: [GET, HEAD]\n    to: new"
            ),
            2 => writeln!(
                y,
                "  - name: svc{k}-resource{j}-write\n    path: /svc{k}/resource{j}/{{id}}\n    methods: [PUT, PATCH, DELETE]\n    to: {to}"
            ),
            _ => writeln!(
                y,
                "  - name: svc{k}-resource{j}-sub\n    path: /svc{k}/resource{j}/{{id}}/sub\n    exact: {}\n    to: new",
                r.is_multiple_of(2)
            ),
        }
        .unwrap();
    }
    y
}

fn table(n: usize) -> RoutingTable {
    let text = routing_yaml(n);
    let (file, source) = config::parse("routing.yaml", &text).expect("generated file parses");
    RoutingTable::build(file, &source).expect("generated file validates")
}

/// A fixed mix of 8 requests, aimed at the last (deepest-in-the-file) complete resource of an
/// `n`-route table, plus the first resource, and misses. Each is (method, target, expected route
/// name or None).
fn request_mix(n: usize) -> Vec<(&'static str, String, Option<String>)> {
    let last = n / ROUTES_PER_RESOURCE - 1; // last resource that has all four routes
    let (k, j) = resource(last);
    let mid = resource(last / 2);
    let sub_exact = last.is_multiple_of(2);
    vec![
        // param hit, deep in the table
        (
            "GET",
            format!("/svc{k}/resource{j}/4711"),
            Some(format!("svc{k}-resource{j}-read")),
        ),
        // same pattern, the other method set
        (
            "DELETE",
            format!("/svc{k}/resource{j}/4711"),
            Some(format!("svc{k}-resource{j}-write")),
        ),
        // {id}/sub
        (
            "GET",
            format!("/svc{k}/resource{j}/4711/sub"),
            Some(format!("svc{k}-resource{j}-sub")),
        ),
        // collection, with trailing slash
        (
            "GET",
            format!("/svc{}/resource{}/", mid.0, mid.1),
            Some(format!("svc{}-resource{}", mid.0, mid.1)),
        ),
        // POST on an item: no {id} route takes POST, falls back to the prefix route
        (
            "POST",
            "/svc0/resource0/7".to_string(),
            Some("svc0-resource0".to_string()),
        ),
        // deeper than any route: the /sub route as a prefix, or (when /sub is exact) the
        // GET/HEAD {id} route as a prefix
        (
            "GET",
            format!("/svc{k}/resource{j}/9/sub/extra"),
            Some(if sub_exact {
                format!("svc{k}-resource{j}-read")
            } else {
                format!("svc{k}-resource{j}-sub")
            }),
        ),
        // known service, unknown resource: miss at depth 2
        ("GET", format!("/svc{k}/nothing/1"), None),
        // unknown at the root
        ("GET", "/api/v1/unknown/route".to_string(), None),
    ]
}

fn bench_lookup(c: &mut Criterion) {
    let mut g = c.benchmark_group("lookup");
    for n in [10usize, 1_000, 10_000] {
        let t = table(n);
        assert_eq!(t.routes.len(), n);
        let mix: Vec<(&str, NormalPath)> = request_mix(n)
            .into_iter()
            .map(|(m, target, expect)| {
                let p = normalize(&target).expect("valid target");
                let got = t.lookup(&p, m).map(|i| t.routes[i].name.to_string());
                assert_eq!(got, expect, "{m} {target} at {n} routes");
                (m, p)
            })
            .collect();
        // One iteration = the whole mix of 8 lookups; BENCHMARKS.md divides by 8.
        g.bench_with_input(BenchmarkId::from_parameter(n), &mix, |b, mix| {
            b.iter(|| {
                let mut acc = 0usize;
                for (m, p) in mix {
                    acc = acc
                        .wrapping_add(t.lookup(black_box(p), black_box(m)).unwrap_or(usize::MAX));
                }
                acc
            })
        });
    }
    g.finish();
}

fn bench_build(c: &mut Criterion) {
    let text = routing_yaml(10_000);
    let mut g = c.benchmark_group("build");
    g.sample_size(10);
    g.bench_function("10000", |b| {
        b.iter(|| {
            let (file, source) = config::parse("routing.yaml", black_box(&text)).unwrap();
            RoutingTable::build(file, &source).unwrap()
        })
    });
    // The YAML parse alone (serde_yaml + source map), to split the build figure.
    g.bench_function("10000-parse-only", |b| {
        b.iter(|| config::parse("routing.yaml", black_box(&text)).unwrap())
    });
    // Freeing a built table: what a serving thread would pay between two requests if it held
    // a replaced table's last reference (the reload loop frees them instead, `reap_retired`).
    g.bench_function("10000-drop", |b| {
        b.iter_batched(
            || {
                let (file, source) = config::parse("routing.yaml", &text).unwrap();
                RoutingTable::build(file, &source).unwrap()
            },
            drop,
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn bench_normalize(c: &mut Criterion) {
    let mut g = c.benchmark_group("normalize");
    g.bench_function("typical", |b| {
        b.iter(|| normalize(black_box("/itineraries/2222/3333/itinerary_maps?x=1&y=%2F")).unwrap())
    });
    g.bench_function("escapes", |b| {
        b.iter(|| normalize(black_box("//%62ookings//42/")).unwrap())
    });
    g.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(2))
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_lookup, bench_build, bench_normalize
}
criterion_main!(benches);
