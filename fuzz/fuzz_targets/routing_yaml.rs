//! Arbitrary bytes as routing.yaml: parse, validate, build the table. Must never panic: a bad
//! file is an error with FILE:LINE:COL, never a crash of the proxy (it reloads files it is given).
#![no_main]

use libfuzzer_sys::fuzz_target;
use strangler::config::{parse, parse_checked};
use strangler::path::normalize;
use strangler::router::RoutingTable;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (file, source) = match parse("routing.yaml", text) {
        Ok(parsed) => parsed,
        Err(errors) => {
            // Formatting the errors walks the source map: it must not panic either.
            let _ = errors.to_string();
            // What `check` and a reload do with a refused file: set its faults aside (stand-ins,
            // a lenient reading of repeated keys) and check the rest.
            let checked = RoutingTable::build_checked(parse_checked("routing.yaml", text));
            let errors = checked.expect_err("a file the schema refuses is refused");
            let lines = text.lines().count().max(1) + text.matches('\r').count();
            for e in &errors.0 {
                assert!(e.pos.line >= 1 && e.pos.line <= lines, "{e} past the file's end");
            }
            return;
        }
    };
    match RoutingTable::build(file, &source) {
        Ok(table) => {
            // Never resolve (no DNS in a fuzzer); exercise what a request and the admin use.
            let _ = table.summary(|_| false);
            for t in [
                "/",
                "/a",
                "/bookings/42/",
                "/itineraries/7/itinerary_maps?x=1",
            ] {
                let p = normalize(t).unwrap();
                for m in ["GET", "POST", "HEAD"] {
                    if let Some(i) = table.lookup(&p, m) {
                        let route = &table.routes[i];
                        let backend = &table.backends[route.to];
                        let up = strangler::router::upstream_path(Some(route), true, backend, &p);
                        assert!(up.starts_with('/'), "upstream path {up:?} for {t}");
                    }
                }
            }
        }
        Err(errors) => {
            let text = errors.to_string();
            assert!(!errors.0.is_empty(), "an error without a message");
            assert!(text.starts_with("routing.yaml:"), "{text}");
        }
    }
});
