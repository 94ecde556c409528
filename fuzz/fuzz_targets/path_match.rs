//! Arbitrary bytes as a request target: normalise, then look up in a fixed table and build the
//! upstream path. Must never panic, and the normalised path must be a fixed point.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use strangler::path::normalize;
use strangler::router::{upstream_path, RoutingTable};

const TABLE: &str = "\
backends:
  legacy: {url: 'http://127.0.0.1:9001'}
  new: {url: 'http://127.0.0.1:9002', trailing_slash: add}
  strip: {url: 'http://127.0.0.1:9003', trailing_slash: strip}
default: legacy
routes:
  - {name: bookings, path: /bookings, to: new}
  - {name: maps, path: '/itineraries/{id}/itinerary_maps', methods: [GET, HEAD], to: new}
  - {name: itin, path: '/itineraries/{id}', to: legacy}
  - {name: departures, path: /departures, exact: true, to: new, rewrite: /v2/departures}
  - {name: deep, path: /a/b/c/d, to: strip, rewrite: /}
  - {name: lit, path: /a/b, to: new}
  - {name: param, path: '/a/{x}/c', to: strip}
  - {name: root-post, path: /, methods: [POST], to: new}
  - {name: unicode, path: /caf\u{e9}, to: strip}
";

fn table() -> &'static RoutingTable {
    static T: OnceLock<RoutingTable> = OnceLock::new();
    T.get_or_init(|| {
        let (file, source) = strangler::config::parse("routing.yaml", TABLE).unwrap();
        RoutingTable::build(file, &source).unwrap()
    })
}

const METHODS: [&str; 6] = ["GET", "HEAD", "POST", "PUT", "DELETE", "XQZ"];

fuzz_target!(|data: &[u8]| {
    let Some((&m, rest)) = data.split_first() else {
        return;
    };
    let method = METHODS[m as usize % METHODS.len()];
    // The proxy refuses a target that is not UTF-8 before normalising it.
    let Ok(target) = std::str::from_utf8(rest) else {
        return;
    };
    let Ok(p) = normalize(target) else {
        return;
    };
    let path = p.path();
    assert!(
        path.starts_with('/') && !path.contains("//"),
        "{target:?} -> {path:?}"
    );
    let again = normalize(path).expect("a normalised path normalises");
    assert_eq!(again.path(), path, "not idempotent for {target:?}");
    assert_eq!(again.len(), p.len());

    let t = table();
    let route = t.lookup(&p, method).map(|i| &t.routes[i]);
    if let Some(r) = route {
        assert!(r.pattern.len() <= p.len(), "{} matched {path:?}", r.name);
        if r.exact {
            assert_eq!(r.pattern.len(), p.len());
        }
        if let Some(ms) = &r.methods {
            assert!(ms.iter().any(|x| x == method));
        }
    }
    let backend = &t.backends[route.map_or(t.default, |r| r.to)];
    for use_rewrite in [true, false] {
        let up = upstream_path(route, use_rewrite, backend, &p);
        assert!(up.starts_with('/'), "upstream {up:?} for {target:?}");
        // The upstream path (before its query) is itself a normal path: the backend sees the
        // resource the proxy matched.
        let up_path = up.split_once('?').map_or(up.as_str(), |(a, _)| a);
        assert!(normalize(up_path).is_ok(), "upstream {up:?} for {target:?}");
    }
});
