//! Moving traffic (issue: cutover controls): the sticky split, shadow comparison, automatic
//! rollback, failover, and the route states and audit trail that record who serves what.
//! Real backends on loopback, the real binary.
mod common;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers local to this file.

/// A keep-alive client: thousands of requests over a few connections.
fn keep_alive() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    )
}

/// The backend that served `client` on `url` (reads the body so the connection is reused).
fn side(agent: &ureq::Agent, url: &str, client: &str) -> String {
    let mut r = agent.get(url).header("X-Client-Id", client).call().unwrap();
    assert_eq!(r.status(), 200);
    let backend = r
        .headers()
        .get("x-strangler-backend")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    r.body_mut().read_to_vec().unwrap();
    backend
}

fn routes(proxy: &Proxy) -> Vec<Value> {
    let r = request("GET", &proxy.admin_url("/routes"), &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.json().as_array().cloned().unwrap()
}

/// A proxy whose route `customers` goes to `legacy` and is shadowed on `new` (`extra`: more of
/// the route's settings, `, shadow_ignore: [...]`).
fn shadowed(legacy: &Backend, new: &Backend, extra: &str) -> Proxy {
    Proxy::start(&format!(
        "{}routes:\n  - {{name: customers, path: /customers, to: legacy, shadow: new{extra}}}\n",
        base_yaml(&legacy.url(), &new.url())
    ))
}

/// `strangler_shadow_total` of the route `shadowed` makes, for one result.
fn shadow_results(proxy: &Proxy, result: &str) -> f64 {
    proxy.metric(&format!(
        "strangler_shadow_total{{route=\"customers\",backend=\"new\",result=\"{result}\"}}"
    ))
}

fn route(proxy: &Proxy, name: &str) -> Value {
    routes(proxy)
        .into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no route {name}"))
}

fn post(url: &str) -> Reply {
    request("POST", url, &[], None)
}

fn sha256_hex(bytes: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The complete lines of the audit log (a line still being appended is not one yet).
fn audit_lines(path: &std::path::Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = &text[..text.rfind('\n').map_or(0, |i| i + 1)];
    complete
        .lines()
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {l}"))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Split

#[test]
fn a_sticky_split_keeps_each_client_on_its_side_and_only_ever_grows() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = |percent: f64| {
        format!(
            "{}routes:\n  - {{name: tours, path: /tours, to: new, split: {percent}, sticky: 'header:X-Client-Id'}}\n",
            base_yaml(&legacy.url(), &new.url())
        )
    };
    let proxy = Proxy::start(&yaml(10.0));
    assert_eq!(
        proxy.metric("strangler_route_split_percent{route=\"tours\",backend=\"new\"}"),
        10.0
    );
    assert_eq!(
        proxy.metric("strangler_route_split_percent{route=\"tours\",backend=\"legacy\"}"),
        90.0
    );
    assert_eq!(route(&proxy, "tours")["state"], "canary");

    let agent = keep_alive();
    let url = proxy.url("/tours/7");
    let clients: Vec<String> = (0..2000).map(|i| format!("client-{i}")).collect();
    let t0 = Instant::now();
    let at_10: Vec<String> = clients.iter().map(|c| side(&agent, &url, c)).collect();
    eprintln!("2000 split requests in {:?}", t0.elapsed());
    let on_new: HashSet<&str> = clients
        .iter()
        .zip(&at_10)
        .filter(|(_, s)| *s == "new")
        .map(|(c, _)| c.as_str())
        .collect();
    let share = on_new.len() as f64 / 20.0;
    eprintln!("split 10: {share}% of 2000 clients on new");
    assert!(
        (7.0..=13.0).contains(&share),
        "split 10 gave {share}% on new"
    );

    // Sticky: a client asking again lands where it did.
    for (c, first) in clients.iter().zip(&at_10).step_by(10) {
        for _ in 0..3 {
            assert_eq!(&side(&agent, &url, c), first, "client {c} moved");
        }
    }

    // Raising the split only moves clients from legacy to new.
    proxy.write_config(&yaml(30.0));
    wait_for("split 30 in force", Duration::from_secs(3), || {
        proxy.metric("strangler_route_split_percent{route=\"tours\",backend=\"new\"}") == 30.0
    });
    let at_30: Vec<String> = clients.iter().map(|c| side(&agent, &url, c)).collect();
    let moved_back: Vec<&String> = clients
        .iter()
        .zip(&at_30)
        .filter(|(c, s)| on_new.contains(c.as_str()) && *s == "legacy")
        .map(|(c, _)| c)
        .collect();
    assert!(
        moved_back.is_empty(),
        "clients went back to legacy: {moved_back:?}"
    );
    let share = at_30.iter().filter(|s| *s == "new").count() as f64 / 20.0;
    eprintln!("split 30: {share}% of 2000 clients on new");
    assert!(
        (26.0..=34.0).contains(&share),
        "split 30 gave {share}% on new"
    );
    assert_eq!(
        proxy.metric("strangler_route_split_percent{route=\"tours\",backend=\"legacy\"}"),
        70.0
    );
    // The rest of a split is what the file says, not floating point's `100 − 99.99`.
    proxy.write_config(&yaml(99.99));
    wait_for("split 99.99 in force", Duration::from_secs(3), || {
        proxy.metric("strangler_route_split_percent{route=\"tours\",backend=\"new\"}") == 99.99
    });
    assert_eq!(
        proxy.metric("strangler_route_split_percent{route=\"tours\",backend=\"legacy\"}"),
        0.01
    );
}

// ---------------------------------------------------------------------------------------------
// Shadow

const LEGACY_DOC: &str = r#"{"a":1,"b":{"c":2},"updated_at":"x"}"#;

#[test]
fn shadow_compares_json_as_values_and_reports_the_first_difference() {
    let legacy = Backend::start(Arc::new(|_s: &Seen| {
        json(200, serde_json::from_str(LEGACY_DOC).unwrap())
    }));
    let new = Backend::start(Arc::new(|s: &Seen| {
        let doc = match s.target.as_str() {
            "/customers/same" => r#"{"b":{"c":2},"a":1,"updated_at":"y"}"#,
            "/customers/differs" => r#"{"b":{"c":3},"a":1,"updated_at":"y"}"#,
            _ => return json(404, serde_json::from_str(LEGACY_DOC).unwrap()),
        };
        json(200, serde_json::from_str(doc).unwrap())
    }));
    let proxy = shadowed(&legacy, &new, ", shadow_ignore: [/updated_at]");
    let shadow = |result: &str| shadow_results(&proxy, result);

    // Same values in another key order, ignored field different: a match. The client gets legacy's answer.
    let r = request(
        "GET",
        &proxy.url("/customers/same"),
        &[("X-Request-Id", "rid-same")],
        None,
    );
    assert_eq!((r.status, r.header("x-strangler-backend")), (200, "legacy"));
    assert_eq!(r.json(), serde_json::from_str::<Value>(LEGACY_DOC).unwrap());
    wait_for("a match", Duration::from_secs(3), || shadow("match") == 1.0);

    // A differing field: a mismatch, logged with its JSON pointer and the request id.
    let r = request(
        "GET",
        &proxy.url("/customers/differs"),
        &[("X-Request-Id", "rid-differs")],
        None,
    );
    assert_eq!(
        r.json()["b"]["c"],
        2,
        "the client never sees the shadow's answer"
    );
    wait_for("a mismatch", Duration::from_secs(3), || {
        shadow("mismatch") == 1.0
    });
    wait_for("the mismatch in the log", Duration::from_secs(2), || {
        proxy
            .log_text()
            .lines()
            .any(|l| l.contains("rid-differs") && l.contains("/b/c"))
    });

    // A different status: a mismatch.
    let r = request("GET", &proxy.url("/customers/missing"), &[], None);
    assert_eq!(r.status, 200);
    wait_for("a status mismatch", Duration::from_secs(3), || {
        shadow("mismatch") == 2.0
    });

    // POST and DELETE reach the primary only.
    assert_eq!(
        request("POST", &proxy.url("/customers/same"), &[], Some(b"{}")).status,
        200
    );
    assert_eq!(
        request("DELETE", &proxy.url("/customers/same"), &[], None).status,
        200
    );
    // So does an upgrade (a WebSocket is a conversation, not a read to compare).
    let host = format!("127.0.0.1:{}", proxy.port);
    let upgrade = format!(
        "GET /customers/same HTTP/1.1\r\nHost: {host}\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    assert!(raw(&host, upgrade.as_bytes()).starts_with("HTTP/1.1 200"));
    // A GET sent after them is shadowed; once its comparison is counted, theirs would have been.
    let r = request("GET", &proxy.url("/customers/same"), &[], None);
    let generated_id = r.header("x-request-id").to_string();
    wait_for("the second match", Duration::from_secs(3), || {
        shadow("match") == 2.0
    });
    let seen = new.seen();
    let methods: Vec<&str> = seen.iter().map(|s| s.method.as_str()).collect();
    assert_eq!(
        methods, ["GET"; 4],
        "only GETs that are not upgrades are shadowed"
    );
    assert_eq!(legacy.seen().len(), 7, "the primary saw every request");
    assert_eq!(shadow("error") + shadow("skipped"), 0.0);

    // The shadow request says what it is, and carries the client request's id.
    for s in &seen {
        assert_eq!(
            s.headers.get("x-strangler-shadow").map(String::as_str),
            Some("1"),
            "{s:?}"
        );
    }
    let rid = |target: &str| {
        seen.iter()
            .filter(|s| s.target == target)
            .map(|s| s.headers.get("x-request-id").cloned().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(rid("/customers/differs"), ["rid-differs"]);
    assert_eq!(
        rid("/customers/same"),
        ["rid-same".to_string(), generated_id]
    );

    // The copy is forwarded as the primary is: X-Forwarded-*, hop-by-hop headers removed.
    let head = format!(
        "GET /customers/same HTTP/1.1\r\nHost: {host}\r\nX-Request-Id: rid-raw\r\n\
         X-Forwarded-For: 9.9.9.9\r\nKeep-Alive: timeout=5\r\nX-Hop: 1\r\n\
         Connection: X-Hop, close\r\n\r\n"
    );
    assert!(raw(&host, head.as_bytes()).starts_with("HTTP/1.1 200"));
    wait_for("the third match", Duration::from_secs(3), || {
        shadow("match") == 3.0
    });
    let both = [legacy.seen(), new.seen()];
    let [primary, copy] = both.each_ref().map(|seen| {
        seen.iter()
            .find(|s| s.headers.get("x-request-id").map(String::as_str) == Some("rid-raw"))
            .cloned()
            .expect("the raw request was seen")
    });
    for name in ["x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"] {
        assert_eq!(copy.headers.get(name), primary.headers.get(name), "{name}");
    }
    assert_eq!(copy.headers["x-forwarded-for"], "9.9.9.9, 127.0.0.1");
    assert_eq!(copy.headers["x-forwarded-host"], host);
    for gone in ["x-hop", "keep-alive"] {
        assert!(!copy.headers.contains_key(gone), "{gone}: {copy:?}");
        assert!(!primary.headers.contains_key(gone), "{gone}: {primary:?}");
    }

    // Rolled back, the route involves `default` only: nothing is copied to `new` any more.
    let copies = new.seen().len();
    let served = "strangler_requests_total{route=\"customers\",backend=\"legacy\",method=\"GET\",code=\"200\"}";
    let served_before = proxy.metric(served);
    let r = request(
        "POST",
        &proxy.admin_url("/routes/customers/rollback"),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let r = request("GET", &proxy.url("/customers/same"), &[], None);
    assert_eq!((r.status, r.header("x-strangler-backend")), (200, "legacy"));
    proxy.wait_metric(served, served_before + 1.0);
    assert_eq!(new.seen().len(), copies, "no shadow copy of a pinned route");
}

#[test]
fn a_shadowed_get_with_a_body_sends_the_shadow_the_same_body() {
    // A search API that takes its query as a GET body: both sides answer with what they got.
    let answer = Arc::new(|s: &Seen| json(200, serde_json::json!({"query_len": s.body_len})));
    let legacy = Backend::start(answer.clone());
    let new = Backend::start(answer);
    let yaml = format!(
        "{}routes:\n  - {{name: search, path: /search, to: legacy, shadow: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    let proxy = Proxy::start(&yaml);
    let shadow = |result: &str| {
        proxy.metric(&format!(
            "strangler_shadow_total{{route=\"search\",backend=\"new\",result=\"{result}\"}}"
        ))
    };
    let query = br#"{"query":{"match":{"title":"strangler"}}}"#;
    let forwarded = [
        ("Forwarded", "proto=https;host=evil.example"),
        ("X_Strangler_Shadow", "0"),
        ("X_Forwarded_For", "6.6.6.6"),
    ];
    let r = request("GET", &proxy.url("/search"), &forwarded, Some(query));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["query_len"], query.len());
    wait_for("the comparison", Duration::from_secs(5), || {
        shadow("match") == 1.0
    });
    let copy = new.seen().pop().expect("the shadow got a copy");
    assert_eq!(copy.body_len, query.len());
    assert_eq!(copy.headers.get("x-strangler-shadow").unwrap(), "1");
    // A client's Forwarded reaches neither side: the proxy's X-Forwarded-* stand. Nor do the
    // proxy's own fields spelt with `_`, which CGI-style servers read as the same variable.
    let primary = legacy.seen().pop().unwrap();
    for seen in [&copy, &primary] {
        for forged in ["forwarded", "x_strangler_shadow", "x_forwarded_for"] {
            assert_eq!(seen.headers.get(forged), None, "{forged}");
        }
    }

    // A body over the comparison's cap is not copied: nothing to compare.
    let big = vec![b'q'; 2 << 20];
    let r = request("GET", &proxy.url("/search"), &[], Some(&big));
    assert_eq!(r.json()["query_len"], big.len());
    wait_for("the copy skipped", Duration::from_secs(5), || {
        shadow("skipped") == 1.0
    });
    assert_eq!(new.seen().len(), 1, "no copy without its body");
    assert_eq!((shadow("mismatch"), shadow("error")), (0.0, 0.0));

    // A client's empty Host (RFC 9112 §3.2) reaches the shadow as it reaches the primary:
    // kept, not replaced by the backend's address.
    let addr = format!("127.0.0.1:{}", proxy.port);
    let answer = raw(
        &addr,
        b"GET /search HTTP/1.1\r\nHost: \r\nX-Request-Id: rid-empty-host\r\nConnection: close\r\n\r\n",
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let host_of = |b: &Backend| {
        b.seen()
            .into_iter()
            .find(|s| s.headers.get("x-request-id").map(String::as_str) == Some("rid-empty-host"))
            .map(|s| s.headers.get("host").cloned())
    };
    wait_for("the shadow copy", Duration::from_secs(5), || {
        host_of(&new).is_some()
    });
    assert_eq!(host_of(&legacy), Some(Some(String::new())));
    assert_eq!(host_of(&new), Some(Some(String::new())));
}

#[test]
fn a_slow_shadow_costs_the_client_nothing() {
    let legacy = Backend::echo("legacy");
    // Answers once the test has timed the requests: a request that waited for its shadow
    // would wait for that.
    let gate = Gate::default();
    let g = gate.clone();
    let slow = Backend::start(Arc::new(move |_s: &Seen| {
        g.wait_at_most(Duration::from_secs(20));
        full(200, "late")
    }));
    let yaml = format!(
        "backends:\n  legacy: {{url: '{}'}}\n  slow: {{url: '{}'}}\ndefault: legacy\nroutes:\n\
         \x20 - {{name: plain, path: /plain, to: legacy}}\n\
         \x20 - {{name: shadowed, path: /shadowed, to: legacy, shadow: slow}}\n",
        legacy.url(),
        slow.url()
    );
    let proxy = Proxy::start(&yaml);
    let time = |path: &str| -> Vec<Duration> {
        (0..5)
            .map(|_| {
                let t0 = Instant::now();
                let r = request("GET", &proxy.url(path), &[], None);
                assert_eq!((r.status, r.header("x-strangler-backend")), (200, "legacy"));
                t0.elapsed()
            })
            .collect()
    };
    let plain = time("/plain");
    let shadowed = time("/shadowed");
    let mean = |v: &[Duration]| v.iter().sum::<Duration>() / v.len() as u32;
    eprintln!(
        "5 requests without shadow: mean {:?} {plain:?}; with a shadow that does not answer: mean {:?} {shadowed:?}",
        mean(&plain),
        mean(&shadowed),
    );
    // A request that waited for its shadow would not have ended: the shadow answers only once
    // the gate opens, below. The bound leaves a loaded machine running a debug build its time.
    for (i, t) in shadowed.iter().enumerate() {
        assert!(
            *t < Duration::from_secs(5),
            "shadowed request {i} took {t:?}"
        );
    }
    wait_for(
        "the slow shadow to be asked",
        Duration::from_secs(3),
        || !slow.seen().is_empty(),
    );
    gate.open();
}

/// A shadow that sends an interim answer (`103 Early Hints`) first is compared on the answer
/// that follows; a copy to the route's own `to` (a canary's shadow) goes to its rewritten path.
#[test]
fn a_shadows_1xx_is_not_its_answer_and_a_copy_to_to_is_rewritten() {
    let body = r#"{"a":1}"#;
    let primary = Backend::start(Arc::new(move |_s: &Seen| {
        json(200, serde_json::json!({"a": 1}))
    }));
    // A raw backend: a 103, then the same JSON as the primary.
    let hinting = listener();
    let hinting_addr = hinting.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{BufRead, Write};
        for conn in hinting.incoming() {
            let Ok(conn) = conn else { return };
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::new(conn.try_clone().unwrap());
                let mut w = conn;
                loop {
                    let mut line = String::new();
                    while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                        line.clear();
                    }
                    if line != "\r\n" {
                        return;
                    }
                    let answer = format!(
                        "HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n\
                         HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if w.write_all(answer.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    let new = Backend::echo("new");
    let yaml = format!(
        "backends:\n  legacy: {{url: '{}'}}\n  hinting: {{url: 'http://{hinting_addr}'}}\n  new: {{url: '{}'}}\n\
         default: legacy\nroutes:\n\
         \x20 - {{name: hinted, path: /hinted, to: legacy, shadow: hinting}}\n\
         \x20 - {{name: departures, path: /departures, to: new, split: 0, shadow: new, rewrite: /v2/departures}}\n",
        primary.url(),
        new.url()
    );
    let proxy = Proxy::start(&yaml);
    let r = request("GET", &proxy.url("/hinted"), &[], None);
    assert_eq!(r.status, 200);
    wait_for("the comparison counted", Duration::from_secs(5), || {
        proxy
            .metric("strangler_shadow_total{route=\"hinted\",backend=\"hinting\",result=\"match\"}")
            == 1.0
    });
    assert!(
        !proxy.log_text().contains("panicked"),
        "{}",
        proxy.log_text()
    );

    // The canary at 0 %: every client is served by `default`, and `new` gets the copy at the
    // path its real requests would have.
    let r = request("GET", &proxy.url("/departures/x?y=1"), &[], None);
    assert_eq!(r.header("x-strangler-backend"), "legacy");
    wait_for("the copy to reach new", Duration::from_secs(5), || {
        !new.seen().is_empty()
    });
    assert_eq!(new.seen()[0].target, "/v2/departures/x?y=1");
}

/// A shadow that cannot be reached is counted as the shadow's error, however long the primary
/// takes: a slow endpoint does not hide its shadow's failures as "skipped".
#[test]
fn a_failing_shadow_is_an_error_even_behind_a_slow_primary() {
    let slow = Backend::start(Arc::new(|_s: &Seen| {
        std::thread::sleep(Duration::from_millis(1500));
        full(200, "slow")
    }));
    let yaml = format!(
        "backends:\n  legacy: {{url: '{}'}}\n  dead: {{url: 'http://127.0.0.1:{}', connect_timeout: 200ms, timeout: 200ms}}\n\
         default: legacy\nroutes:\n  - {{name: slow, path: /slow, to: legacy, shadow: dead}}\n",
        slow.url(),
        dead_port()
    );
    let proxy = Proxy::start(&yaml);
    assert_eq!(request("GET", &proxy.url("/slow"), &[], None).status, 200);
    let shadow = |result: &str| {
        proxy.metric(&format!(
            "strangler_shadow_total{{route=\"slow\",backend=\"dead\",result=\"{result}\"}}"
        ))
    };
    wait_for("the shadow's error counted", Duration::from_secs(3), || {
        shadow("error") == 1.0
    });
    assert_eq!(shadow("skipped"), 0.0);
}

/// A browser's or a cache's revalidation (`If-None-Match`): the primary's 304 has no body to
/// compare, and the copy goes without the validator (the shadow cannot know the primary's
/// ETag). Skipped, not a mismatch of 304 against 200.
#[test]
fn a_revalidation_is_not_compared() {
    let legacy = Backend::start(Arc::new(|s: &Seen| {
        if s.headers.get("if-none-match").map(String::as_str) == Some("\"v1\"") {
            full(304, "")
        } else {
            json(200, serde_json::json!({"a": 1}))
        }
    }));
    let new = Backend::start(Arc::new(|_s: &Seen| json(200, serde_json::json!({"a": 1}))));
    let proxy = shadowed(&legacy, &new, "");
    let shadow = |result: &str| shadow_results(&proxy, result);
    let r = request(
        "GET",
        &proxy.url("/customers/1"),
        &[
            ("If-None-Match", "\"v1\""),
            ("If-Modified-Since", "Sun, 22 Nov 2026 10:00:00 GMT"),
        ],
        None,
    );
    assert_eq!(r.status, 304);
    wait_for("the copy counted", Duration::from_secs(3), || {
        shadow("skipped") == 1.0
    });
    let copy = &new.seen()[0];
    assert!(
        !copy.headers.contains_key("if-none-match")
            && !copy.headers.contains_key("if-modified-since"),
        "{:?}",
        copy.headers
    );
    // Without a validator both answer in full, and are compared.
    assert_eq!(
        request("GET", &proxy.url("/customers/2"), &[], None).status,
        200
    );
    wait_for("a match", Duration::from_secs(3), || shadow("match") == 1.0);
    assert_eq!(shadow("mismatch"), 0.0);
}

/// A new service that differs on every answer logs at most ten mismatch lines a second, and
/// says how many it held back; the counter counts them all.
#[test]
fn shadow_mismatch_lines_are_held_to_ten_a_second() {
    let legacy = Backend::start(Arc::new(|_s: &Seen| json(200, serde_json::json!({"a": 1}))));
    let new = Backend::start(Arc::new(|_s: &Seen| json(200, serde_json::json!({"a": 2}))));
    let proxy = shadowed(&legacy, &new, "");
    let mismatches = || shadow_results(&proxy, "mismatch");
    let started = Instant::now();
    for i in 0..60 {
        assert_eq!(get(&proxy.url(&format!("/customers/{i}"))).0, 200);
    }
    wait_for("every comparison counted", Duration::from_secs(10), || {
        mismatches() == 60.0
    });
    let seconds = started.elapsed().as_secs() + 1;
    let log = proxy.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("shadow mismatch: request"))
        .count();
    assert!(
        lines >= 10 && lines as u64 <= 10 * seconds,
        "{lines} lines in {seconds} s"
    );
    if lines < 60 {
        // Said with the first mismatch of a later second: one more now and then until it is.
        let mut n = 0;
        wait_for("the held-back lines said", Duration::from_secs(10), || {
            n += 1;
            assert_eq!(get(&proxy.url(&format!("/customers/late{n}"))).0, 200);
            proxy
                .log_text()
                .contains("more shadow mismatch lines held back since")
        });
    }
}

/// A shadow copy still in flight when a reload removes its backend does not bring back the
/// series the reload deleted.
#[test]
fn a_shadow_ending_after_its_backend_left_the_file_leaves_no_series() {
    let legacy = Backend::echo("legacy");
    let gate = Gate::default();
    let g = gate.clone();
    let gated = Backend::start(Arc::new(move |_s: &Seen| {
        g.wait();
        full(200, "different")
    }));
    let yaml = |with_shadow: bool| {
        let (backend, shadow) = if with_shadow {
            (
                format!("  gated: {{url: '{}'}}\n", gated.url()),
                ", shadow: gated",
            )
        } else {
            (String::new(), "")
        };
        format!(
            "backends:\n  legacy: {{url: '{}'}}\n{backend}default: legacy\nroutes:\n  - {{name: mirrored, path: /mirrored, to: legacy{shadow}}}\n",
            legacy.url()
        )
    };
    let proxy = Proxy::start(&yaml(true));
    assert_eq!(
        request("GET", &proxy.url("/mirrored"), &[], None).status,
        200
    );
    wait_for("the copy in flight", Duration::from_secs(3), || {
        !gated.seen().is_empty()
    });
    let reloads = || proxy.metric("strangler_config_reloads_total{result=\"success\"}");
    let before = reloads();
    proxy.write_config(&yaml(false));
    // The success is counted once the reload's bookkeeping is done (the removed backend's
    // series forgotten, its flag set); `/routes` shows the swap before that.
    wait_for("the reload", Duration::from_secs(3), || reloads() > before);
    assert!(route(&proxy, "mirrored")["shadow"].is_null());
    gate.open();
    wait_for("the late comparison", Duration::from_secs(5), || {
        proxy.log_text().contains("shadow mismatch")
    });
    let (_, body) = get(&proxy.admin_url("/metrics"));
    assert!(
        !body.contains("backend=\"gated\""),
        "{}",
        body.lines()
            .filter(|l| l.contains("gated"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// A request sent under a `rollback` rule that a reload then removes is not judged by it when
/// it ends: the operator who turned automatic rollback off is not rolled back by the requests
/// already running.
#[test]
fn a_request_ending_after_its_rollback_rule_was_removed_does_not_pin() {
    let legacy = Backend::echo("legacy");
    let gate = Gate::default();
    let g = gate.clone();
    let failing = Backend::start(Arc::new(move |s: &Seen| {
        if s.target.starts_with("/orders/slow") {
            g.wait();
        }
        full(500, "broken")
    }));
    let yaml = |rule: &str| {
        format!(
            "{}routes:\n  - {{name: orders, path: /orders, to: new{rule}}}\n",
            base_yaml(&legacy.url(), &failing.url())
        )
    };
    let proxy = Proxy::start(&yaml(
        ", rollback: {error_rate: 50%, min_requests: 4, window: 60s}",
    ));
    for _ in 0..3 {
        assert_eq!(get(&proxy.url("/orders/fast")).0, 500);
    }
    let url = proxy.url("/orders/slow");
    let slow = std::thread::spawn(move || get(&url).0);
    wait_for(
        "the fourth request in flight",
        Duration::from_secs(3),
        || failing.seen().len() == 4,
    );
    proxy.write_config(&yaml(""));
    wait_for("the reload", Duration::from_secs(3), || {
        route(&proxy, "orders")["state"] == "new" && proxy.log_text().contains("reloaded ")
    });
    gate.open();
    assert_eq!(slow.join().unwrap(), 500);
    // The fourth failure would have met the old rule (4 of 4). Requests after it are served
    // by `new`, so a pin would show in their answers.
    assert_eq!(get(&proxy.url("/orders/fast")).0, 500);
    assert_eq!(
        route(&proxy, "orders")["pinned"],
        Value::Null,
        "{}",
        proxy.log_text()
    );
    assert!(
        !proxy.log_text().contains("pinned to default"),
        "{}",
        proxy.log_text()
    );
}

/// A request still running on a backend that a reload renames away (`orders-v41` →
/// `orders-v42`) does not bring back the series the reload deleted when it ends: not its
/// request count, nor its duration, nor (answered 504 here) its upstream error. Also when the
/// reload that renames it is the second since the request began.
#[test]
fn a_request_ending_after_its_backend_left_the_file_leaves_no_series() {
    let legacy = Backend::echo("legacy");
    let gate = Gate::default();
    let g = gate.clone();
    let gated = Backend::start(Arc::new(move |_s: &Seen| {
        g.wait();
        full(200, "late")
    }));
    // `name` is the gated backend's name; the route goes `to` it or elsewhere.
    let yaml = |name: &str, to: &str| {
        format!(
            "backends:\n  legacy: {{url: '{}'}}\n  {name}: {{url: '{}', timeout: 3s}}\ndefault: legacy\nroutes:\n  - {{name: orders, path: /orders, to: {to}}}\n",
            legacy.url(),
            gated.url()
        )
    };
    // One worker thread: a request sent after the 504 is served after the hooks that end the
    // first one (its counts are taken in the same run of the task that wrote its answer).
    let proxy = Proxy::start_with(&yaml("orders-v41", "orders-v41"), &["--threads", "1"], &[]);
    let reloads = || proxy.metric("strangler_config_reloads_total{result=\"success\"}");
    let url = proxy.url("/orders/1");
    let slow = std::thread::spawn(move || request("GET", &url, &[], None).status);
    wait_for("the request in flight", Duration::from_secs(3), || {
        !gated.seen().is_empty()
    });
    // Two reloads while it runs: the first sends the route elsewhere (the backend stays in the
    // file), the second renames the backend. The request's table is then two tables back.
    let before = reloads();
    proxy.write_config(&yaml("orders-v41", "legacy"));
    wait_for("the first reload", Duration::from_secs(3), || {
        reloads() > before
    });
    proxy.write_config(&yaml("orders-v42", "legacy"));
    wait_for("the second reload", Duration::from_secs(3), || {
        reloads() > before + 1.0
    });
    assert!(!slow.is_finished(), "the request outlived both reloads");
    // The old table's backend times out (3 s) while the gate stays shut.
    assert_eq!(slow.join().unwrap(), 504);
    gate.open();
    assert_eq!(get(&proxy.url("/other")).0, 200);
    proxy.wait_metric(
        "strangler_requests_total{route=\"default\",backend=\"legacy\",method=\"GET\",code=\"200\"}",
        1.0,
    );
    let (_, body) = get(&proxy.admin_url("/metrics"));
    assert!(
        !body.contains("orders-v41"),
        "{}",
        body.lines()
            .filter(|l| l.contains("orders-v41"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

#[test]
fn a_primary_that_outlives_the_shadow_is_not_compared() {
    // The primary drips its body for about 6 s (a server-sent events stream, a long poll);
    // the shadow answers at once, and its deadline is `timeout` + `connect_timeout` = 2 s.
    let listener = listener();
    let drip = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                use std::io::Write;
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n")
                    && read_some(&mut conn, &mut byte).unwrap_or(0) == 1
                {
                    head.push(byte[0]);
                }
                let _ = conn.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
                for _ in 0..30 {
                    // The stream's own pace: what the test is about, not a wait for a condition.
                    std::thread::sleep(Duration::from_millis(200));
                    let _ = conn.write_all(b"1\r\nx\r\n");
                }
                let _ = conn.write_all(b"0\r\n\r\n");
            });
        }
    });
    let new = Backend::echo("new");
    let yaml = format!(
        "backends:\n  legacy: {{url: '{drip}'}}\n\
         \x20 new: {{url: '{}', timeout: 1500ms, connect_timeout: 500ms}}\n\
         default: legacy\nroutes:\n\
         \x20 - {{name: stream, path: /stream, to: legacy, shadow: new}}\n",
        new.url()
    );
    let proxy = Proxy::start(&yaml);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (url, done) = (proxy.url("/stream"), done.clone());
        std::thread::spawn(move || {
            let r = request("GET", &url, &[], None);
            done.store(true, Ordering::SeqCst);
            r
        })
    };
    let shadow = |result: &str| {
        proxy.metric(&format!(
            "strangler_shadow_total{{route=\"stream\",backend=\"new\",result=\"{result}\"}}"
        ))
    };
    wait_for("the comparison given up", Duration::from_secs(5), || {
        shadow("skipped") == 1.0
    });
    assert!(
        !done.load(Ordering::SeqCst),
        "given up while the primary still streams, its slot back"
    );
    let r = client.join().unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "x".repeat(30).as_str()));
    assert_eq!(new.seen().len(), 1);
    for result in ["match", "mismatch", "error"] {
        assert_eq!(shadow(result), 0.0, "{result}");
    }
}

// ---------------------------------------------------------------------------------------------
// Automatic rollback

#[test]
fn a_failing_route_rolls_itself_back_and_a_flaky_one_does_not() {
    let legacy = Backend::echo("legacy");
    let broken = Backend::start(Arc::new(|_s: &Seen| full(500, "boom")));
    let n = Arc::new(AtomicUsize::new(0));
    let n2 = n.clone();
    let flaky = Backend::start(Arc::new(move |_s: &Seen| {
        if n2.fetch_add(1, Ordering::SeqCst) % 5 == 4 {
            full(500, "every fifth")
        } else {
            full(200, "ok")
        }
    }));
    let m = Arc::new(AtomicUsize::new(0));
    let m2 = m.clone();
    let bad_start = Backend::start(Arc::new(move |_s: &Seen| {
        if m2.fetch_add(1, Ordering::SeqCst) < 5 {
            full(503, "warming up")
        } else {
            full(200, "ok")
        }
    }));
    let rule = "rollback: {error_rate: 50%, min_requests: 10, window: 60s}";
    let yaml = format!(
        "backends:\n  legacy: {{url: '{}'}}\n  broken: {{url: '{}'}}\n  flaky: {{url: '{}'}}\n  bad_start: {{url: '{}'}}\ndefault: legacy\nroutes:\n\
         \x20 - {{name: payments, path: /payments, to: broken, {rule}}}\n\
         \x20 - {{name: search, path: /search, to: flaky, {rule}}}\n\
         \x20 - {{name: orders, path: /orders, to: bad_start, {rule}}}\n",
        legacy.url(),
        broken.url(),
        flaky.url(),
        bad_start.url()
    );
    let proxy = Proxy::start(&yaml);

    for i in 0..10 {
        let r = request("GET", &proxy.url("/payments/1"), &[], None);
        assert_eq!(
            (r.status, r.header("x-strangler-backend")),
            (500, "broken"),
            "request {i}"
        );
    }
    let r = request("GET", &proxy.url("/payments/1"), &[], None);
    assert_eq!(
        (r.status, r.header("x-strangler-backend")),
        (200, "legacy"),
        "the 11th request"
    );
    let p = route(&proxy, "payments");
    assert_eq!(
        (p["state"].as_str(), p["pinned"]["reason"].as_str()),
        (Some("rolled_back"), Some("auto"))
    );
    assert_eq!(
        proxy.metric("strangler_rollbacks_total{route=\"payments\",reason=\"auto\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("strangler_route_pinned{route=\"payments\"}"),
        1.0
    );
    assert!(
        proxy
            .log_text()
            .lines()
            .any(|l| l.contains("WARN") && l.contains("payments")),
        "logged as a warning"
    );
    assert_eq!(
        broken.seen().len(),
        10,
        "nothing more was sent to the failing backend"
    );

    // 20 % failures stay under the 50 % threshold.
    for _ in 0..25 {
        let r = request("GET", &proxy.url("/search?q=x"), &[], None);
        assert_eq!(r.header("x-strangler-backend"), "flaky");
    }
    assert_eq!(n.load(Ordering::SeqCst), 25);
    let s = route(&proxy, "search");
    assert_eq!(
        (s["state"].as_str(), &s["pinned"]),
        (Some("new"), &Value::Null)
    );
    assert_eq!(
        proxy.metric("strangler_rollbacks_total{route=\"search\",reason=\"auto\"}"),
        0.0
    );

    // Five failures, then five successes: the tenth request meets the rule (5 of 10) although
    // it succeeded, and the eleventh already goes to legacy.
    for i in 0..10 {
        let r = request("GET", &proxy.url("/orders"), &[], None);
        assert_eq!(r.header("x-strangler-backend"), "bad_start", "request {i}");
    }
    let r = request("GET", &proxy.url("/orders"), &[], None);
    assert_eq!((r.status, r.header("x-strangler-backend")), (200, "legacy"));
    assert_eq!(route(&proxy, "orders")["pinned"]["reason"], "auto");
}

#[test]
fn a_route_moved_to_another_backend_starts_a_fresh_rollback_window() {
    let legacy = Backend::echo("legacy");
    let first = Backend::start(Arc::new(|_s: &Seen| full(500, "first")));
    let second = Backend::start(Arc::new(|_s: &Seen| full(500, "second")));
    let yaml = |to: &str| {
        format!(
            "backends:\n  legacy: {{url: '{}'}}\n  first: {{url: '{}'}}\n  second: {{url: '{}'}}\ndefault: legacy\nroutes:\n\
             \x20 - {{name: payments, path: /payments, to: {to}, rollback: {{error_rate: 50%, min_requests: 10, window: 60s}}}}\n",
            legacy.url(),
            first.url(),
            second.url()
        )
    };
    let proxy = Proxy::start(&yaml("first"));
    let send = || {
        let r = request("GET", &proxy.url("/payments"), &[], None);
        (r.status, r.header("x-strangler-backend").to_string())
    };
    for _ in 0..9 {
        assert_eq!(send(), (500, "first".to_string()));
    }
    proxy.write_config(&yaml("second"));
    wait_for("the reload", Duration::from_secs(3), || {
        proxy.metric("strangler_config_reloads_total{result=\"success\"}") >= 2.0
    });
    // Nine failures of `first` and one of `second` would reach min_requests: the window
    // must have forgotten `first`.
    for i in 0..10 {
        assert_eq!(
            send(),
            (500, "second".to_string()),
            "request {i} after the move"
        );
    }
    // ... and it counts `second` from there: ten failures of its own roll the route back.
    assert_eq!(send(), (200, "legacy".to_string()));
    assert_eq!(route(&proxy, "payments")["pinned"]["reason"], "auto");
}

/// Requests sent to a route's `to` before its window was cleared (by a resume, or by a reload
/// that moved the route to another backend) and failing after it do not judge the fresh start:
/// three slow failures that land after the resume or the move, with `min_requests: 3`, pin
/// nothing.
#[test]
fn failures_of_requests_sent_before_a_resume_or_a_move_do_not_pin_the_route() {
    let legacy = Backend::echo("legacy");
    let ok = Backend::echo("ok");
    // Answers 500, once the test opens the gate.
    let gate = Gate::default();
    let g = gate.clone();
    let slow = Backend::start(Arc::new(move |_s: &Seen| {
        g.wait();
        full(500, "late failure")
    }));
    let set_gate = |to: bool| gate.set(to);
    let yaml = |to: &str| {
        format!(
            "backends:\n  legacy: {{url: '{}'}}\n  slow: {{url: '{}'}}\n  ok: {{url: '{}'}}\ndefault: legacy\nroutes:\n\
             \x20 - {{name: payments, path: /payments, to: {to}, rollback: {{error_rate: 50%, min_requests: 3, window: 60s}}}}\n",
            legacy.url(),
            slow.url(),
            ok.url()
        )
    };
    let proxy = Proxy::start(&yaml("slow"));
    let url = proxy.url("/payments");
    // Three requests to `slow`, held there until the gate opens.
    let send_three = || -> Vec<std::thread::JoinHandle<u16>> {
        // The last batch's requests leave the gauge when their connections are done with,
        // which can be after their clients have the answers.
        wait_for("no request in flight", Duration::from_secs(5), || {
            proxy.metric("strangler_requests_in_flight{route=\"payments\"}") == 0.0
        });
        let handles = (0..3)
            .map(|_| {
                let url = url.clone();
                std::thread::spawn(move || request("GET", &url, &[], None).status)
            })
            .collect();
        wait_for("three requests in flight", Duration::from_secs(5), || {
            proxy.metric("strangler_requests_in_flight{route=\"payments\"}") == 3.0
        });
        handles
    };
    let statuses = |handles: Vec<std::thread::JoinHandle<u16>>| -> Vec<u16> {
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    };
    let pinned = || route(&proxy, "payments")["pinned"].clone();

    // Pinned by hand and resumed while they are in flight.
    let held = send_three();
    assert_eq!(
        post(&proxy.admin_url("/routes/payments/rollback")).status,
        200
    );
    assert_eq!(
        post(&proxy.admin_url("/routes/payments/resume")).status,
        200
    );
    set_gate(true);
    assert_eq!(statuses(held), [500, 500, 500]);
    assert_eq!(
        pinned(),
        Value::Null,
        "re-pinned by failures from before the resume"
    );

    // Moved to another backend while they are in flight.
    set_gate(false);
    let held = send_three();
    proxy.write_config(&yaml("ok"));
    wait_for("the move", Duration::from_secs(3), || {
        route(&proxy, "payments")["to"] == "ok"
    });
    set_gate(true);
    assert_eq!(statuses(held), [500, 500, 500]);
    assert_eq!(pinned(), Value::Null, "pinned for the backend it left");
    assert_eq!(
        proxy.metric("strangler_rollbacks_total{route=\"payments\",reason=\"auto\"}"),
        0.0
    );
    let r = request("GET", &url, &[], None);
    assert_eq!((r.status, r.header("x-strangler-backend")), (200, "ok"));
}

// ---------------------------------------------------------------------------------------------
// Failover

#[test]
fn failover_retries_an_unreachable_backend_on_default() {
    let legacy = Backend::echo("legacy");
    let dead = dead_port();
    let yaml = format!(
        "{}routes:\n\
         \x20 - {{name: departures, path: /departures, to: new, failover: true}}\n\
         \x20 - {{name: arrivals, path: /arrivals, to: new}}\n",
        base_yaml(&legacy.url(), &format!("http://127.0.0.1:{dead}"))
    );
    let proxy = Proxy::start(&yaml);
    let failovers = || {
        proxy.metric("strangler_failovers_total{route=\"departures\",from=\"new\",to=\"legacy\"}")
    };
    for (i, method) in ["GET", "GET", "POST"].into_iter().enumerate() {
        let r = request(method, &proxy.url("/departures/1"), &[], None);
        assert_eq!(
            (r.status, r.header("x-strangler-backend")),
            (200, "legacy"),
            "{method}: {}",
            r.body
        );
        assert_eq!(r.json()["target"], "/departures/1");
        wait_for("the failover counted", Duration::from_secs(2), || {
            failovers() == (i + 1) as f64
        });
    }
    let r = request("GET", &proxy.url("/arrivals/1"), &[], None);
    assert_eq!(
        (r.status, r.header("x-strangler-backend")),
        (502, "new"),
        "{}",
        r.body
    );
    assert_eq!(r.json()["error"], "bad_gateway");
    assert_eq!(failovers(), 3.0);
    assert_eq!(legacy.seen().len(), 3);
    // The last-minute view shows the failed attempts on `to` and the answers from `default`
    // (an answer is recorded in the `logging` phase, which may end after the client has it).
    let mut departures = Value::Null;
    wait_for(
        "the last answer from legacy in /routes",
        Duration::from_secs(5),
        || {
            departures = route(&proxy, "departures");
            departures["requests"]["legacy"] == 3
        },
    );
    assert_eq!(
        (&departures["requests"], &departures["errors"]),
        (
            &serde_json::json!({"legacy": 3, "new": 3}),
            &serde_json::json!({"legacy": 0, "new": 3})
        ),
        "{departures}"
    );
    // Pingora's line about the failed attempt names the backend that failed, not the one
    // the request failed over to.
    let log = proxy.log_text();
    assert!(
        log.lines().any(|l| l.contains("route: departures")
            && l.contains(&format!("backend: new at 127.0.0.1:{dead}"))),
        "{log}"
    );
    assert!(
        !log.contains(&format!("backend: legacy at 127.0.0.1:{dead}")),
        "{log}"
    );
}

/// Clients that give up while the request they sent to an unreachable `to` is being answered by
/// `default` (a 499) still leave `to`'s failure in the rollback window: an unreachable new
/// service whose failovers make every client wait is rolled back all the same.
#[test]
fn a_failover_whose_client_leaves_still_counts_against_to() {
    // Legacy answers after 300 ms (it plays slow); each client has left by then.
    let legacy = Backend::start(Arc::new(|_s: &Seen| {
        std::thread::sleep(Duration::from_millis(300));
        full(200, "late")
    }));
    let dead = dead_port();
    let yaml = format!(
        "{}routes:\n  - {{name: departures, path: /departures, to: new, failover: true, rollback: {{error_rate: 50%, min_requests: 4, window: 60s}}}}\n",
        base_yaml(&legacy.url(), &format!("http://127.0.0.1:{dead}"))
    );
    let proxy = Proxy::start(&yaml);
    let gone = || {
        proxy.metric(
            "strangler_requests_total{route=\"departures\",backend=\"legacy\",method=\"GET\",code=\"499\"}",
        )
    };
    for i in 1..=4 {
        // Sent, failed over (`new` refuses), at legacy, and given up on.
        let mut c = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        std::io::Write::write_all(
            &mut c,
            format!("GET /departures/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
        )
        .unwrap();
        wait_for("the request at legacy", Duration::from_secs(5), || {
            legacy.seen().len() == i
        });
        drop(c);
        wait_for(
            "the client's leaving counted",
            Duration::from_secs(5),
            || gone() == i as f64,
        );
    }
    assert_eq!(
        route(&proxy, "departures")["pinned"]["reason"],
        "auto",
        "{}",
        proxy.log_text()
    );
}

#[test]
fn failover_after_a_timeout_replays_only_whole_reads() {
    // `new` accepts and never answers.
    let listener = listener();
    let silent = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in listener.incoming() {
            held.extend(conn.ok());
        }
    });
    let legacy = Backend::echo("legacy");
    let yaml = format!(
        "backends:\n  legacy: {{url: '{}'}}\n  new: {{url: '{silent}', timeout: 300ms}}\n\
         default: legacy\nroutes:\n\
         \x20 - {{name: departures, path: /departures, to: new, failover: true}}\n",
        legacy.url()
    );
    let proxy = Proxy::start(&yaml);
    let failovers = || {
        proxy.metric("strangler_failovers_total{route=\"departures\",from=\"new\",to=\"legacy\"}")
    };
    // A GET that times out before any response byte is retried on `default` (SPEC §2).
    let r = request("GET", &proxy.url("/departures/1"), &[], None);
    assert_eq!(
        (r.status, r.header("x-strangler-backend")),
        (200, "legacy"),
        "{}",
        r.body
    );
    assert_eq!(failovers(), 1.0);
    // `default`'s latency is its own: the 300 ms lost on `new` are not in it.
    let legacy_seconds = |what: &str| {
        proxy.metric(&format!(
            "strangler_request_duration_seconds_{what}{{backend=\"legacy\",route=\"departures\"}}"
        ))
    };
    wait_for("the answer timed", Duration::from_secs(5), || {
        legacy_seconds("count") == 1.0
    });
    assert!(legacy_seconds("sum") < 0.3, "{}", legacy_seconds("sum"));
    // One with a small body too, whole.
    let r = request("GET", &proxy.url("/departures/2"), &[], Some(&[b'a'; 1000]));
    assert_eq!(
        (r.status, r.json()["body_len"].as_u64()),
        (200, Some(1000)),
        "{}",
        r.body
    );
    // A body larger than the retry buffer (64 KiB) cannot be sent again: a 504, no failover.
    let big = vec![b'b'; 100 << 10];
    let r = request("GET", &proxy.url("/departures/3"), &[], Some(&big));
    assert_eq!(
        (r.status, r.header("x-strangler-backend")),
        (504, "new"),
        "{}",
        r.body
    );
    assert_eq!(r.json()["error"], "gateway_timeout");
    // Nor is a POST retried after a timeout: it may have been acted on.
    let r = request("POST", &proxy.url("/departures/4"), &[], Some(b"{}"));
    assert_eq!(
        (r.status, r.header("x-strangler-backend")),
        (504, "new"),
        "{}",
        r.body
    );
    assert_eq!(failovers(), 2.0);
    // The proxy's own `100 Continue` to a GET that asked for one is no byte of the backend's.
    let answer = raw(
        &format!("127.0.0.1:{}", proxy.port),
        b"GET /departures/5 HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert!(
        answer.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200")
            && answer.contains("X-Strangler-Backend: legacy"),
        "{answer}"
    );
    assert_eq!(failovers(), 3.0);
    let seen: Vec<(String, usize)> = legacy
        .seen()
        .iter()
        .map(|s| (s.target.clone(), s.body_len))
        .collect();
    assert_eq!(
        seen,
        [
            ("/departures/1".to_string(), 0),
            ("/departures/2".to_string(), 1000),
            ("/departures/5".to_string(), 5)
        ]
    );
}

#[test]
fn a_client_that_left_during_a_slow_connect_is_not_failed_over() {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    // `new` never completes a connection: its accept queue is full (a backlog of 0, one
    // connection queued and never accepted), so the kernel drops the proxy's SYNs.
    let blackhole = listener();
    let addr = blackhole.local_addr().unwrap();
    // SAFETY: listen(2) on a socket this test owns and keeps open.
    assert_eq!(unsafe { libc::listen(blackhole.as_raw_fd(), 0) }, 0);
    let _queued: Vec<_> = (0..3)
        .filter_map(|_| {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()
        })
        .collect();
    let legacy = Backend::echo("legacy");
    let yaml = format!(
        "backends:\n  legacy: {{url: '{}'}}\n  new: {{url: 'http://{addr}', connect_timeout: 1s}}\n\
         default: legacy\nroutes:\n\
         \x20 - {{name: departures, path: /departures, to: new, failover: true}}\n",
        legacy.url()
    );
    let proxy = Proxy::start(&yaml);
    // A POST whose client leaves at once: at the connect timeout there is nobody to answer,
    // and its request must not be started again on `default`.
    {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        c.write_all(b"POST /departures/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
            .unwrap();
    }
    let gone = "strangler_requests_total{route=\"departures\",backend=\"new\",method=\"POST\",code=\"499\"}";
    wait_for(
        "the request counted as a 499",
        Duration::from_secs(10),
        || proxy.metric(gone) == 1.0,
    );
    // One whose body the proxy has not read yet when the client leaves: its end-of-file
    // waits behind those bytes.
    {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", proxy.port)).unwrap();
        c.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
        let body = vec![b'x'; 100 << 10];
        c.write_all(
            format!(
                "POST /departures/3 HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        )
        .unwrap();
        c.write_all(&body).unwrap();
    }
    wait_for(
        "the second counted as a 499",
        Duration::from_secs(10),
        || proxy.metric(gone) == 2.0,
    );
    assert!(legacy.seen().is_empty(), "{:?}", legacy.seen());
    let failovers = "strangler_failovers_total{route=\"departures\",from=\"new\",to=\"legacy\"}";
    assert_eq!(proxy.metric(failovers), 0.0);
    // A client that waits is failed over as before.
    let r = request("GET", &proxy.url("/departures/2"), &[], None);
    assert_eq!(
        (r.status, r.header("x-strangler-backend")),
        (200, "legacy"),
        "{}",
        r.body
    );
    assert_eq!(proxy.metric(failovers), 1.0);
}

// ---------------------------------------------------------------------------------------------
// States and audit

#[test]
fn json_logs_carry_the_audit_record_as_fields() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = format!(
        "{}routes:\n  - {{name: plain, path: /plain, to: new}}\n  - {{name: mirrored, path: /mirrored, to: legacy, shadow: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    let proxy = Proxy::start_with(&yaml, &["--log-format", "json"], &[]);
    assert_eq!(post(&proxy.admin_url("/routes/plain/rollback")).status, 200);
    let audit_line = || {
        proxy.log_text().lines().find_map(|l| {
            let v: Value = serde_json::from_str(l)
                .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {l}"));
            (v["target"] == "audit").then_some(v)
        })
    };
    wait_for("the audit line", Duration::from_secs(3), || {
        audit_line().is_some()
    });
    let v = audit_line().unwrap();
    assert_eq!(v["route"], "plain", "{v}");
    assert_eq!(v["before"]["state"], "new", "{v}");
    assert_eq!(v["after"]["state"], "rolled_back", "{v}");
    assert!(
        v["reason"].as_str().is_some_and(|r| r.contains("manual")),
        "{v}"
    );
    assert_eq!(v["config_sha256"], sha256_hex(yaml.as_bytes()), "{v}");

    // A shadow mismatch's request id, route, backend and first difference are fields too.
    let r = request(
        "GET",
        &proxy.url("/mirrored"),
        &[("X-Request-Id", "rid-json")],
        None,
    );
    assert_eq!(r.json()["service"], "legacy");
    let mismatch_line = || {
        proxy.log_text().lines().find_map(|l| {
            let v: Value = serde_json::from_str(l).ok()?;
            (v["target"] == "shadow" && v["request_id"] == "rid-json").then_some(v)
        })
    };
    wait_for("the mismatch line", Duration::from_secs(3), || {
        mismatch_line().is_some()
    });
    let v = mismatch_line().unwrap();
    assert_eq!(
        (&v["level"], &v["route"], &v["backend"], &v["pointer"]),
        (
            &Value::from("WARN"),
            &Value::from("mirrored"),
            &Value::from("new"),
            &Value::from("/service")
        ),
        "{v}"
    );
    assert!(
        v["primary"].as_str().is_some_and(|p| p.contains("legacy"))
            && v["shadow"].as_str().is_some_and(|s| s.contains("new")),
        "{v}"
    );
    assert!(
        v["msg"].as_str().is_some_and(|m| m.contains("rid-json")),
        "{v}"
    );
}

#[test]
fn states_and_the_audit_trail_record_who_serves_what() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let audit_dir = tempfile::tempdir().unwrap();
    let audit = audit_dir.path().join("audit.jsonl");
    let routes_yaml = |old_to: &str| {
        format!(
            "{}routes:\n\
             \x20 - {{name: plain, path: /plain, to: new}}\n\
             \x20 - {{name: canary, path: /canary, to: new, split: 25}}\n\
             \x20 - {{name: shadowed, path: /shadowed, to: legacy, shadow: new}}\n\
             \x20 - {{name: old, path: /old, to: {old_to}}}\n",
            base_yaml(&legacy.url(), &new.url())
        )
    };
    let yaml = routes_yaml("legacy");
    let proxy = Proxy::start_with(&yaml, &["--audit-log", audit.to_str().unwrap()], &[]);
    for (name, state) in [
        ("plain", "new"),
        ("canary", "canary"),
        ("shadowed", "shadow"),
        ("old", "legacy"),
    ] {
        assert_eq!(route(&proxy, name)["state"], state, "{name}");
        assert_eq!(
            proxy.metric(&format!(
                "strangler_route_state{{route=\"{name}\",state=\"{state}\"}}"
            )),
            1.0
        );
        assert_eq!(
            proxy.metric(&format!(
                "strangler_route_state{{route=\"{name}\",state=\"rolled_back\"}}"
            )),
            0.0
        );
    }
    // Written as the file has it: `25`, not `25.0`.
    assert_eq!(route(&proxy, "canary")["split"], serde_json::json!(25));
    assert_eq!(route(&proxy, "shadowed")["shadow"], "new");
    assert!(audit_lines(&audit).is_empty(), "starting changes nothing");

    let sha = sha256_hex(yaml.as_bytes());
    assert_eq!(post(&proxy.admin_url("/routes/plain/rollback")).status, 200);
    assert_eq!(post(&proxy.admin_url("/routes/plain/resume")).status, 200);
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), 2, "{lines:?}");
    let (pin, resume) = (&lines[0], &lines[1]);
    assert_eq!(pin["route"], "plain");
    assert_eq!(
        (
            pin["before"]["state"].as_str(),
            pin["after"]["state"].as_str()
        ),
        (Some("new"), Some("rolled_back"))
    );
    assert!(pin["reason"].as_str().unwrap().contains("manual"), "{pin}");
    assert_eq!(pin["config_sha256"], sha.as_str());
    assert_eq!(resume["route"], "plain");
    assert_eq!(
        (
            resume["before"]["state"].as_str(),
            resume["after"]["state"].as_str()
        ),
        (Some("rolled_back"), Some("new"))
    );
    assert!(
        resume["reason"].as_str().unwrap().contains("resume"),
        "{resume}"
    );
    assert_eq!(resume["config_sha256"], sha.as_str());

    // A reload that moves a route appends one line, naming the new file by its hash.
    let moved = routes_yaml("new");
    proxy.write_config(&moved);
    wait_for("the reload's audit line", Duration::from_secs(3), || {
        audit_lines(&audit).len() >= 3
    });
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), 3, "only the route that changed: {lines:?}");
    let reload = &lines[2];
    assert_eq!(reload["route"], "old");
    assert_eq!(
        (
            reload["before"]["to"].as_str(),
            reload["after"]["to"].as_str()
        ),
        (Some("legacy"), Some("new"))
    );
    assert_eq!(
        (
            reload["before"]["state"].as_str(),
            reload["after"]["state"].as_str()
        ),
        (Some("legacy"), Some("new"))
    );
    assert!(
        reload["reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{reload}"
    );
    assert_eq!(
        reload["config_sha256"],
        sha256_hex(moved.as_bytes()).as_str()
    );
    assert_eq!(route(&proxy, "old")["state"], "new");
    // The gauges follow: the moved route's series change, the others keep theirs.
    let state = |route: &str, state: &str| {
        proxy.metric(&format!(
            "strangler_route_state{{route=\"{route}\",state=\"{state}\"}}"
        ))
    };
    assert_eq!((state("old", "new"), state("old", "legacy")), (1.0, 0.0));
    assert_eq!(state("canary", "canary"), 1.0);
    assert_eq!(state("shadowed", "shadow"), 1.0);

    // A reload that drops one route and adds another: one line each, the missing side null;
    // routes that did not change stay out of the trail.
    let renamed = moved.replace("name: old, path: /old", "name: fresh, path: /fresh");
    proxy.write_config(&renamed);
    wait_for("the rename's audit lines", Duration::from_secs(3), || {
        audit_lines(&audit).len() >= 5
    });
    let lines = audit_lines(&audit);
    assert_eq!(
        lines.len(),
        5,
        "one line per route that came or went: {lines:?}"
    );
    // Sorted by route name: "fresh" (added) before "old" (removed).
    let (added, removed) = (&lines[3], &lines[4]);
    assert_eq!(added["route"], "fresh");
    assert!(added["before"].is_null(), "{added}");
    assert_eq!(added["after"]["state"], "new");
    assert_eq!(removed["route"], "old");
    assert_eq!(removed["before"]["to"], "new");
    assert!(removed["after"].is_null(), "{removed}");
    assert_eq!(
        removed["config_sha256"],
        sha256_hex(renamed.as_bytes()).as_str()
    );
    assert_eq!(state("fresh", "new"), 1.0);
    let (_, metrics) = get(&proxy.admin_url("/metrics"));
    assert!(
        !metrics.contains("route=\"old\""),
        "a route that left the file leaves /metrics:\n{metrics}"
    );

    // What a route takes (its methods, `exact`) and a split's sticky key move traffic too: a
    // line each, with the fields that changed; and again when the file goes back.
    let seen = audit_lines(&audit).len();
    let narrowed = renamed
        .replace(
            "name: plain, path: /plain, to: new",
            "name: plain, path: /plain, to: new, methods: [GET], exact: true",
        )
        .replace("split: 25}", "split: 25, sticky: 'header:X-Client'}");
    proxy.write_config(&narrowed);
    wait_for(
        "the narrowing's audit lines",
        Duration::from_secs(3),
        || audit_lines(&audit).len() >= seen + 2,
    );
    let lines = audit_lines(&audit);
    assert_eq!(lines.len(), seen + 2, "{lines:?}");
    let (canary, plain) = (&lines[seen], &lines[seen + 1]);
    assert_eq!(canary["route"], "canary");
    assert_eq!(
        (
            canary["before"]["sticky"].as_str(),
            canary["after"]["sticky"].as_str()
        ),
        (Some("ip"), Some("header:x-client"))
    );
    assert_eq!(plain["route"], "plain");
    assert!(plain["before"]["methods"].is_null(), "{plain}");
    assert_eq!(plain["after"]["methods"], serde_json::json!(["GET"]));
    assert_eq!(
        (
            plain["before"]["exact"].as_bool(),
            plain["after"]["exact"].as_bool()
        ),
        (Some(false), Some(true))
    );
    proxy.write_config(&renamed);
    wait_for("the way back's audit lines", Duration::from_secs(3), || {
        audit_lines(&audit).len() >= seen + 4
    });

    // Requests are counted on the same series across reloads, whether the reload keeps the
    // route's handles (same backends) or rebuilds them (a backend added).
    let plain_200 =
        "strangler_requests_total{route=\"plain\",backend=\"new\",method=\"GET\",code=\"200\"}";
    let reload = |yaml: &str, what: &str| {
        let reloads = || proxy.metric("strangler_config_reloads_total{result=\"success\"}");
        let before = reloads();
        proxy.write_config(yaml);
        wait_for(what, Duration::from_secs(3), || reloads() > before);
    };
    assert_eq!(get(&proxy.url("/plain")).0, 200);
    proxy.wait_metric(plain_200, 1.0);
    let spare = renamed.replace(
        "backends:\n",
        "backends:\n  spare:\n    url: http://127.0.0.1:9\n",
    );
    reload(&spare, "the reload with a new backend");
    assert_eq!(get(&proxy.url("/plain")).0, 200);
    let touched = spare.replace(
        "name: plain, path: /plain, to: new",
        "name: plain, path: /plain, to: new, split: 100",
    );
    reload(&touched, "the reload that keeps the handles");
    assert_eq!(get(&proxy.url("/plain")).0, 200);
    proxy.wait_metric(plain_200, 3.0);
    assert_eq!(state("fresh", "new"), 1.0);
    assert_eq!(state("plain", "new"), 1.0);

    // A new `default` moves unmatched requests and the default side of the canary and shadow
    // routes: a line for each, and none for the routes wholly on `new`.
    let seen = audit_lines(&audit).len();
    reload(
        &touched.replace("default: legacy", "default: spare"),
        "the reload with another default",
    );
    wait_for("the default's audit lines", Duration::from_secs(3), || {
        audit_lines(&audit).len() >= seen + 3
    });
    let lines = audit_lines(&audit);
    let moved: Vec<(&str, &str, &str)> = lines[seen..]
        .iter()
        .map(|l| {
            (
                l["route"].as_str().unwrap(),
                l["before"]["default"].as_str().unwrap(),
                l["after"]["default"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        moved,
        [
            ("canary", "legacy", "spare"),
            ("default", "legacy", "spare"),
            ("shadowed", "legacy", "spare")
        ]
    );
    assert_eq!(lines[seen + 1]["after"]["to"], "spare");
    assert!(
        proxy
            .log_text()
            .lines()
            .filter(|l| l.contains("audit"))
            .count()
            >= 3,
        "each change is also a log line on the audit target:\n{}",
        proxy.log_text()
    );

    // `new` repointed at another server moves every route it serves, though no `to` changed:
    // a line each, naming both addresses (here: legacy's, as a team would repoint v1 → v2).
    let seen = audit_lines(&audit).len();
    let with_default = touched.replace("default: legacy", "default: spare");
    reload(
        &with_default.replace(&new.url(), &legacy.url()),
        "the reload that repoints new",
    );
    wait_for("the repoint's audit lines", Duration::from_secs(3), || {
        audit_lines(&audit).len() >= seen + 4
    });
    let lines = audit_lines(&audit);
    let repointed: Vec<(&str, &str, &str)> = lines[seen..]
        .iter()
        .map(|l| {
            (
                l["route"].as_str().unwrap(),
                l["before"]["to_url"].as_str().unwrap(),
                l["after"]["to_url"].as_str().unwrap(),
            )
        })
        .collect();
    let (n, l) = (new.url(), legacy.url());
    assert_eq!(
        repointed,
        [
            ("canary", n.as_str(), l.as_str()),
            ("fresh", n.as_str(), l.as_str()),
            ("plain", n.as_str(), l.as_str()),
            ("shadowed", l.as_str(), l.as_str())
        ]
    );
    let shadowed = &lines[seen + 3];
    assert_eq!(
        (
            shadowed["before"]["shadow_url"].as_str(),
            shadowed["after"]["shadow_url"].as_str()
        ),
        (Some(n.as_str()), Some(l.as_str()))
    );
}

#[test]
fn a_backend_renamed_away_leaves_the_metrics() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = format!(
        "{}routes:\n\
         \x20 - {{name: r1, path: /r1, to: new, failover: true}}\n\
         \x20 - {{name: r2, path: /r2, to: legacy, shadow: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    let proxy = Proxy::start(&yaml);
    assert_eq!(get(&proxy.url("/r1")).0, 200);
    let served =
        "strangler_requests_total{route=\"r1\",backend=\"new\",method=\"GET\",code=\"200\"}";
    proxy.wait_metric(served, 1.0);

    // Versioned backend names (`new` → `newv2` on a deploy): the old name's series go.
    let renamed = yaml
        .replace("  new:\n", "  newv2:\n")
        .replace("to: new", "to: newv2")
        .replace("shadow: new", "shadow: newv2");
    assert_ne!(renamed, yaml);
    let reloads = || proxy.metric("strangler_config_reloads_total{result=\"success\"}");
    let before = reloads();
    proxy.write_config(&renamed);
    wait_for("the reload", Duration::from_secs(3), || reloads() > before);
    assert_eq!(get(&proxy.url("/r1")).0, 200);
    // Counted (in the `logging` phase) before the scrape whose series are checked.
    proxy.wait_metric(
        "strangler_requests_total{route=\"r1\",backend=\"newv2\",method=\"GET\",code=\"200\"}",
        1.0,
    );
    let (_, metrics) = get(&proxy.admin_url("/metrics"));
    for gone in ["backend=\"new\"", "from=\"new\""] {
        assert!(
            !metrics.contains(gone),
            "no series names the backend that left: {gone}\n{metrics}"
        );
    }
    assert!(
        metrics.contains("strangler_shadow_total{backend=\"newv2\""),
        "{metrics}"
    );
    // The backends that stayed keep their series.
    assert!(metrics.contains("to=\"legacy\""), "{metrics}");
}

/// A route that stays but drops `failover`, `rollback` or `shadow` loses the zero series they
/// made (`/metrics` describes the table in force); a series that counted something keeps it.
#[test]
fn settings_a_route_drops_take_their_zero_series_along() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = format!(
        "{}routes:\n\
         \x20 - {{name: r1, path: /r1, to: new, failover: true, rollback: {{error_rate: 50%, min_requests: 5, window: 60s}}}}\n\
         \x20 - {{name: r2, path: /r2, to: legacy, shadow: new}}\n\
         \x20 - {{name: r3, path: /r3, to: legacy, shadow: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    let proxy = Proxy::start(&yaml);
    let shadow = |route: &str, result: &str| {
        format!("strangler_shadow_total{{route=\"{route}\",backend=\"new\",result=\"{result}\"}}")
    };
    let failover = "strangler_failovers_total{route=\"r1\",from=\"new\",to=\"legacy\"}";
    let auto = "strangler_rollbacks_total{route=\"r1\",reason=\"auto\"}";
    let (_, metrics) = get(&proxy.admin_url("/metrics"));
    for primed in [
        failover,
        auto,
        &shadow("r2", "match"),
        &shadow("r3", "error"),
    ] {
        assert_eq!(
            series_value(&metrics, primed),
            Some(0.0),
            "primed at start: {primed}\n{metrics}"
        );
    }
    // r3's shadow compares one answer (the two echo services answer differently).
    assert_eq!(get(&proxy.url("/r3")).0, 200);
    proxy.wait_metric(&shadow("r3", "mismatch"), 1.0);

    let plain = yaml
        .replace(
            ", failover: true, rollback: {error_rate: 50%, min_requests: 5, window: 60s}",
            "",
        )
        .replace("to: legacy, shadow: new}", "to: legacy}");
    assert_ne!(plain, yaml);
    let reloads = || proxy.metric("strangler_config_reloads_total{result=\"success\"}");
    let before = reloads();
    proxy.write_config(&plain);
    wait_for("the reload", Duration::from_secs(3), || reloads() > before);
    let (_, metrics) = get(&proxy.admin_url("/metrics"));
    for gone in [
        failover.to_string(),
        auto.to_string(),
        shadow("r2", "match"),
        shadow("r3", "match"),
        shadow("r3", "error"),
    ] {
        assert_eq!(
            series_value(&metrics, &gone),
            None,
            "{gone} stayed:\n{metrics}"
        );
    }
    assert_eq!(
        series_value(&metrics, &shadow("r3", "mismatch")),
        Some(1.0),
        "counted: kept"
    );
    // The manual reason is every route's, and stays.
    assert_eq!(
        series_value(
            &metrics,
            "strangler_rollbacks_total{route=\"r1\",reason=\"manual\"}"
        ),
        Some(0.0),
        "{metrics}"
    );
}
