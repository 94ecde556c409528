//! The operator's side (issue: admin API, metrics, CLI): what /metrics counts, manual rollback
//! and its pins across reloads and restarts, the admin token, the CLI against running proxies,
//! and the offline `check` / `explain` commands. Real backends on loopback, the real binary.
mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

// ---------------------------------------------------------------------------------------------
// Helpers local to this file.

/// Two backends and two routes sent to `new`.
fn routing(legacy: &Backend, new: &Backend) -> String {
    format!(
        "{}routes:\n\
         \x20 - {{name: bookings, path: /bookings, to: new}}\n\
         \x20 - {{name: tours, path: /tours, to: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    )
}

fn post(url: &str, token: Option<&str>) -> Reply {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("Authorization", a.as_str())).collect();
    request("POST", url, &headers, None)
}

fn routes(proxy: &Proxy) -> Vec<Value> {
    let r = request("GET", &proxy.admin_url("/routes"), &[], None);
    assert_eq!(r.status, 200, "GET /routes: {}", r.body);
    r.json()
        .as_array()
        .cloned()
        .expect("/routes is a JSON array")
}

fn route(proxy: &Proxy, name: &str) -> Value {
    routes(proxy)
        .into_iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no route {name} in /routes"))
}

fn served_by(proxy: &Proxy, path: &str) -> String {
    let r = request("GET", &proxy.url(path), &[], None);
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.header("x-strangler-backend").to_string()
}

fn metrics_text(proxy: &Proxy) -> String {
    let (status, body) = get(&proxy.admin_url("/metrics"));
    assert_eq!(status, 200);
    body
}

/// Rewrites routing.yaml and waits until the proxy has loaded it.
fn reload_to(proxy: &Proxy, yaml: &str) {
    let key = "strangler_config_reloads_total{result=\"success\"}";
    let before = proxy.metric(key);
    proxy.write_config(yaml);
    wait_for("the reload", Duration::from_secs(3), || {
        proxy.metric(key) > before
    });
}

/// Runs the binary to completion (10 s at most) with no STRANGLER_* variables inherited:
/// (exit code, stdout, stderr).
fn strangler(args: &[&str]) -> (i32, String, String) {
    strangler_env(args, &[])
}

fn strangler_env(args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, _) in std::env::vars() {
        if k.starts_with("STRANGLER_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(envs.iter().copied());
    let mut child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "strangler {args:?} did not exit within 10 s; stderr:\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn admin_arg(proxy: &Proxy) -> String {
    format!("http://127.0.0.1:{}", proxy.admin_port)
}

/// Pipes a Prometheus exposition to `promtool check metrics`; `None` when promtool is absent.
fn promtool_check(body: &str) -> Option<(bool, String)> {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .ok()?;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Some((out.status.success(), text))
}

// ---------------------------------------------------------------------------------------------
// /metrics

#[test]
fn metrics_count_every_request_once_and_never_name_a_path() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let broken = Backend::start(Arc::new(|_s: &Seen| full(503, "down for maintenance")));
    let yaml = format!(
        "backends:\n\
         \x20 legacy: {{url: '{}'}}\n\
         \x20 new: {{url: '{}'}}\n\
         \x20 broken: {{url: '{}'}}\n\
         \x20 gone: {{url: 'http://127.0.0.1:{}'}}\n\
         default: legacy\n\
         routes:\n\
         \x20 - {{name: bookings, path: /bookings, to: new}}\n\
         \x20 - {{name: reports, path: /reports, to: broken}}\n\
         \x20 - {{name: archive, path: /archive, to: gone}}\n",
        legacy.url(),
        new.url(),
        broken.url(),
        dead_port()
    );
    let proxy = Proxy::start(&yaml);

    // Raw paths that must never show up as a label value.
    let raw_paths = [
        "/bookings/secret-7731",
        "/unrouted-5512",
        "/reports/q3-9087",
        "/archive/old-4410",
    ];
    for _ in 0..3 {
        assert_eq!(
            request("GET", &proxy.url(raw_paths[0]), &[], None).status,
            200
        );
    }
    for _ in 0..2 {
        let r = request("POST", &proxy.url(raw_paths[1]), &[], Some(b"{}"));
        assert_eq!((r.status, r.header("x-strangler-route")), (200, "default"));
    }
    assert_eq!(
        request("GET", &proxy.url(raw_paths[2]), &[], None).status,
        503
    );
    assert_eq!(
        request("GET", &proxy.url(raw_paths[3]), &[], None).status,
        502,
        "a refused connection"
    );

    let total = |body: &str, family: &str| -> f64 {
        body.lines()
            .filter(|l| l.starts_with(family))
            .map(|l| l.rsplit_once(' ').unwrap().1.parse::<f64>().unwrap())
            .sum()
    };
    // Counted and timed in the `logging` phase, which may end after the client has its answer.
    let mut body = String::new();
    wait_for(
        "7 requests counted and timed",
        Duration::from_secs(5),
        || {
            body = metrics_text(&proxy);
            total(&body, "strangler_requests_total{") == 7.0
                && total(&body, "strangler_request_duration_seconds_count{") == 7.0
        },
    );
    let requests =
        |labels: &str| metric_value(&body, &format!("strangler_requests_total{{{labels}}}"));
    assert_eq!(
        requests("route=\"bookings\",backend=\"new\",method=\"GET\",code=\"200\""),
        3.0
    );
    assert_eq!(
        requests("route=\"default\",backend=\"legacy\",method=\"POST\",code=\"200\""),
        2.0
    );
    assert_eq!(
        requests("route=\"reports\",backend=\"broken\",method=\"GET\",code=\"503\""),
        1.0
    );
    assert_eq!(
        requests("route=\"archive\",backend=\"gone\",method=\"GET\",code=\"502\""),
        1.0
    );

    let count = |labels: &str| {
        metric_value(
            &body,
            &format!("strangler_request_duration_seconds_count{{{labels}}}"),
        )
    };
    assert_eq!(count("route=\"bookings\",backend=\"new\""), 3.0);
    assert_eq!(count("route=\"default\",backend=\"legacy\""), 2.0);
    assert_eq!(count("route=\"reports\",backend=\"broken\""), 1.0);
    assert_eq!(count("route=\"archive\",backend=\"gone\""), 1.0);

    assert_eq!(
        metric_value(
            &body,
            "strangler_upstream_errors_total{route=\"archive\",backend=\"gone\",kind=\"connect\"}"
        ),
        1.0
    );
    assert_eq!(
        metric_value(&body, "strangler_upstream_errors_total{route=\"reports\",backend=\"broken\",kind=\"connect\"}"),
        0.0,
        "a 503 answer is not an upstream error"
    );

    // The standard process metrics, for the descriptors a proxy can run out of (it answers
    // 503 then) and the memory its connections take.
    let fds = metric_value(&body, "process_open_fds");
    assert!(
        fds > 0.0 && fds < metric_value(&body, "process_max_fds"),
        "{body}"
    );
    assert!(metric_value(&body, "process_resident_memory_bytes") > 0.0);

    for p in raw_paths {
        let tail = p.rsplit('/').next().unwrap();
        assert!(
            !body.contains(tail),
            "a raw path ({p}) leaked into /metrics:\n{body}"
        );
    }

    match promtool_check(&body) {
        Some((ok, out)) => assert!(ok, "promtool check metrics failed:\n{out}"),
        None => eprintln!("promtool not on PATH: skipping `promtool check metrics` (CI runs it)"),
    }
}

// ---------------------------------------------------------------------------------------------
// Manual rollback and pins

#[test]
fn a_manual_rollback_holds_across_reload_and_restart_until_resumed() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = routing(&legacy, &new);
    let mut proxy = Proxy::start(&yaml);
    assert_eq!(served_by(&proxy, "/bookings/1"), "new");
    assert_eq!(route(&proxy, "bookings")["pinned"], Value::Null);

    // Roll back: the very next request goes to legacy.
    let r = post(&proxy.admin_url("/routes/bookings/rollback"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(served_by(&proxy, "/bookings/1"), "legacy");
    assert_eq!(
        served_by(&proxy, "/tours/1"),
        "new",
        "other routes are untouched"
    );
    assert_eq!(
        proxy.metric("strangler_route_pinned{route=\"bookings\"}"),
        1.0
    );
    assert_eq!(proxy.metric("strangler_route_pinned{route=\"tours\"}"), 0.0);
    assert_eq!(
        proxy.metric("strangler_rollbacks_total{route=\"bookings\",reason=\"manual\"}"),
        1.0
    );
    assert_eq!(
        proxy.metric("strangler_route_state{route=\"bookings\",state=\"rolled_back\"}"),
        1.0
    );
    // The totals `check` prints, in a header beside the array.
    let r = request("GET", &proxy.admin_url("/routes"), &[], None);
    assert_eq!(
        r.header("x-strangler-totals"),
        "2 routes: 1 new, 0 canary, 0 shadow, 0 legacy, 1 rolled_back"
    );
    let b = route(&proxy, "bookings");
    assert_eq!(b["state"], "rolled_back");
    assert_eq!(b["pinned"]["reason"], "manual");
    let since = b["pinned"]["since"]
        .as_str()
        .expect("pinned.since")
        .to_string();
    chrono::DateTime::parse_from_rfc3339(&since)
        .unwrap_or_else(|e| panic!("since {since:?} is not RFC 3339: {e}"));
    let log = proxy.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains("bookings") && l.contains("pinned")),
        "the rollback is logged:\n{log}"
    );
    // Rolling back twice changes nothing and counts nothing.
    assert_eq!(
        post(&proxy.admin_url("/routes/bookings/rollback"), None).status,
        200
    );
    assert_eq!(
        proxy.metric("strangler_rollbacks_total{route=\"bookings\",reason=\"manual\"}"),
        1.0
    );

    // A reload keeps the pin.
    reload_to(&proxy, &format!("{yaml}# a comment, so the bytes change\n"));
    assert_eq!(served_by(&proxy, "/bookings/1"), "legacy");
    assert_eq!(route(&proxy, "bookings")["state"], "rolled_back");

    // So does a restart: the pin is in .strangler-state.json beside routing.yaml.
    let state_file = proxy.config.parent().unwrap().join(".strangler-state.json");
    let saved = std::fs::read_to_string(&state_file).expect("state file beside routing.yaml");
    assert!(saved.contains("bookings"), "{saved}");
    proxy.child.kill().unwrap();
    proxy.child.wait().unwrap();
    proxy.spawn();
    assert_eq!(served_by(&proxy, "/bookings/1"), "legacy");
    assert_eq!(
        proxy.metric("strangler_route_pinned{route=\"bookings\"}"),
        1.0
    );
    let b = route(&proxy, "bookings");
    assert_eq!(
        (b["state"].as_str(), b["pinned"]["reason"].as_str()),
        (Some("rolled_back"), Some("manual"))
    );
    assert_eq!(
        b["pinned"]["since"],
        since.as_str(),
        "the pin keeps its time"
    );

    // Resume lifts it.
    let r = post(&proxy.admin_url("/routes/bookings/resume"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(served_by(&proxy, "/bookings/1"), "new");
    assert_eq!(
        proxy.metric("strangler_route_pinned{route=\"bookings\"}"),
        0.0
    );
    let b = route(&proxy, "bookings");
    assert_eq!(
        (b["state"].as_str(), &b["pinned"]),
        (Some("new"), &Value::Null)
    );

    // Unknown routes are 404.
    for action in ["rollback", "resume"] {
        let r = post(&proxy.admin_url(&format!("/routes/nosuch/{action}")), None);
        assert_eq!(r.status, 404, "{action} of an unknown route: {}", r.body);
    }
    // A known endpoint with the wrong method is 405 and says which one (RFC 9110); changes
    // nothing.
    for (method, path, allow) in [
        ("GET", "/routes/bookings/rollback", "POST"),
        ("GET", "/rollback", "POST"),
        ("GET", "/resume", "POST"),
        ("GET", "/reload", "POST"),
        ("DELETE", "/routes/bookings/resume", "POST"),
        ("POST", "/metrics", "GET, HEAD"),
        ("PUT", "/routes", "GET, HEAD"),
    ] {
        let r = request(method, &proxy.admin_url(path), &[], None);
        assert_eq!(
            (r.status, r.header("allow")),
            (405, allow),
            "{method} {path}"
        );
    }
    assert_eq!(route(&proxy, "bookings")["state"], "new");
    assert_eq!(
        request("GET", &proxy.admin_url("/nosuch"), &[], None).status,
        404
    );
    // `/routes` holds exactly the file's routes; `?default=1` adds the unmatched requests.
    let names = |path: &str| -> Vec<String> {
        let (_, body) = get(&proxy.admin_url(path));
        serde_json::from_str::<Vec<Value>>(&body)
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("/routes"), ["bookings", "tours"]);
    assert_eq!(names("/routes?default=1"), ["bookings", "tours", "default"]);

    // POST /rollback pins every route.
    assert_eq!(post(&proxy.admin_url("/rollback"), None).status, 200);
    for name in ["bookings", "tours"] {
        let r = route(&proxy, name);
        assert_eq!(
            (r["state"].as_str(), r["pinned"]["reason"].as_str()),
            (Some("rolled_back"), Some("manual")),
            "{name}"
        );
        assert_eq!(
            proxy.metric(&format!("strangler_route_pinned{{route=\"{name}\"}}")),
            1.0
        );
    }
    assert_eq!(served_by(&proxy, "/tours/1"), "legacy");

    // A route that leaves routing.yaml loses its pin: added back, it is not pinned.
    let without_bookings = format!(
        "{}routes:\n  - {{name: tours, path: /tours, to: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    reload_to(&proxy, &without_bookings);
    assert!(routes(&proxy).iter().all(|r| r["name"] != "bookings"));
    assert!(
        proxy.log_text().lines().any(|l| l.contains("WARN")
            && l.contains("\"bookings\", pinned to default (manual rollback")
            && l.contains("pin lifted")),
        "a pin lifted by a reload is a warning:\n{}",
        proxy.log_text()
    );
    wait_for(
        "the state file to forget bookings",
        Duration::from_secs(2),
        || {
            !std::fs::read_to_string(&state_file)
                .unwrap_or_default()
                .contains("bookings")
        },
    );
    reload_to(&proxy, &yaml);
    let b = route(&proxy, "bookings");
    assert_eq!(
        (b["state"].as_str(), &b["pinned"]),
        (Some("new"), &Value::Null)
    );
    assert_eq!(served_by(&proxy, "/bookings/1"), "new");
    assert_eq!(
        route(&proxy, "tours")["state"],
        "rolled_back",
        "tours stayed in the file, so it stays pinned"
    );
}

#[test]
fn with_a_token_every_post_needs_it_and_reads_do_not() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let proxy = Proxy::start_with(
        &routing(&legacy, &new),
        &[],
        &[("STRANGLER_ADMIN_TOKEN", "s3cret")],
    );
    let rollback = proxy.admin_url("/routes/bookings/rollback");
    let refused = post(&rollback, None);
    assert_eq!(refused.status, 401);
    assert!(refused.header("www-authenticate").starts_with("Bearer"));
    assert_eq!(post(&rollback, Some("wrong")).status, 401);
    assert_eq!(post(&proxy.admin_url("/rollback"), None).status, 401);
    assert_eq!(post(&proxy.admin_url("/reload"), None).status, 401);
    // Every POST: an unknown path or route is not told apart before the token is shown.
    assert_eq!(post(&proxy.admin_url("/nope"), None).status, 401);
    assert_eq!(
        post(&proxy.admin_url("/routes/nope/resume"), None).status,
        401
    );
    assert_eq!(post(&proxy.admin_url("/nope"), Some("s3cret")).status, 404);
    assert_eq!(
        served_by(&proxy, "/bookings/1"),
        "new",
        "a refused POST changed nothing"
    );
    let as_is = |auth: &str| {
        request(
            "POST",
            &proxy.admin_url("/routes/tours/rollback"),
            &[("Authorization", auth)],
            None,
        )
        .status
    };
    assert_eq!(as_is("Basic s3cret"), 401, "another scheme");
    assert_eq!(as_is("bearer S3CRET"), 401, "the token is case-sensitive");
    assert_eq!(
        as_is("bearer s3cret"),
        200,
        "the scheme name is not (RFC 9110)"
    );
    assert_eq!(post(&rollback, Some("s3cret")).status, 200);
    assert_eq!(served_by(&proxy, "/bookings/1"), "legacy");
    // Reads need no token.
    assert_eq!(route(&proxy, "bookings")["state"], "rolled_back");
    assert_eq!(get(&proxy.admin_url("/metrics")).0, 200);
    assert_eq!(get(&proxy.admin_url("/healthz")).0, 200);
}

#[test]
fn a_non_loopback_admin_address_needs_a_token() {
    let legacy = Backend::echo("legacy");
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("routing.yaml");
    std::fs::write(&cfg, one_backend(&legacy.url())).unwrap();
    let cfg = cfg.to_str().unwrap();
    let listen = format!("127.0.0.1:{}", free_port());
    let admin = format!("0.0.0.0:{}", free_port());
    let (code, _, err) = strangler(&["run", "-c", cfg, "--listen", &listen, "--admin", &admin]);
    assert_eq!(code, 1, "refused at start-up; stderr:\n{err}");
    assert!(
        err.contains("STRANGLER_ADMIN_TOKEN"),
        "the message names the remedy:\n{err}"
    );
}

// ---------------------------------------------------------------------------------------------
// The CLI against running proxies

#[test]
fn the_cli_lists_rolls_back_and_resumes_on_every_replica() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = routing(&legacy, &new);
    let one = Proxy::start(&yaml);
    let two = Proxy::start(&yaml);
    let (a1, a2) = (admin_arg(&one), admin_arg(&two));

    let (code, out, err) = strangler(&["routes", "--admin", &a1]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bookings") && out.contains("tours"), "{out}");
    // Columns line up under their headings, whatever the length of names and paths.
    let header = out.lines().find(|l| l.starts_with("NAME")).unwrap();
    let state_col = header.find("STATE").unwrap();
    for l in out
        .lines()
        .filter(|l| l.starts_with("bookings") || l.starts_with("tours"))
    {
        assert_eq!(l.get(state_col..state_col + 3), Some("new"), "{out}");
    }
    assert!(
        out.contains("2 routes: 2 new, 0 canary, 0 shadow, 0 legacy, 0 rolled_back"),
        "the totals:\n{out}"
    );

    let (code, out, err) = strangler(&["rollback", "bookings", "--admin", &a1]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bookings"), "{out}");
    assert_eq!(route(&one, "bookings")["pinned"]["reason"], "manual");
    assert_eq!(served_by(&one, "/bookings/1"), "legacy");
    assert_eq!(
        served_by(&two, "/bookings/1"),
        "new",
        "only the replica asked"
    );

    let (code, _, err) = strangler(&["resume", "bookings", "--admin", &a1]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(route(&one, "bookings")["pinned"], Value::Null);
    assert_eq!(served_by(&one, "/bookings/1"), "new");

    // Two replicas: one line each.
    let (code, out, err) = strangler(&["rollback", "--all", "--admin", &a1, "--admin", &a2]);
    assert_eq!(code, 0, "{err}");
    for p in [one.admin_port, two.admin_port] {
        assert_eq!(
            out.lines()
                .filter(|l| l.contains(&format!("127.0.0.1:{p}")))
                .count(),
            1,
            "one line for the replica on port {p}:\n{out}"
        );
    }
    // Each line says what the call did and where the replica stands: again, nothing changes.
    assert_eq!(
        out.matches("pinned 2 route(s) to default; 2 of 2 pinned now")
            .count(),
        2,
        "{out}"
    );
    let (code, out, err) = strangler(&["rollback", "--all", "--admin", &a1]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("pinned 0 route(s) to default; 2 of 2 pinned now"),
        "{out}"
    );
    for proxy in [&one, &two] {
        for name in ["bookings", "tours"] {
            assert_eq!(
                route(proxy, name)["state"],
                "rolled_back",
                "{name} on port {}",
                proxy.port
            );
        }
    }
    let (code, out, err) = strangler(&["routes", "--admin", &format!("{a1},{a2}")]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&one.admin_port.to_string()) && out.contains(&two.admin_port.to_string()),
        "{out}"
    );

    // One replica unreachable: the others are still asked, and the exit code says it failed.
    let dead = format!("http://127.0.0.1:{}", dead_port());
    let (code, out, err) = strangler(&["resume", "tours", "--admin", &a1, "--admin", &dead]);
    assert_ne!(
        code, 0,
        "an unreachable replica is a failure:\n{out}\n{err}"
    );
    assert!(
        err.contains(&dead[7..]),
        "the unreachable replica is named:\n{err}"
    );
    assert_eq!(
        route(&one, "tours")["pinned"],
        Value::Null,
        "the reachable replica was resumed"
    );
    let (code, _, _) = strangler(&["routes", "--admin", &dead]);
    assert_ne!(code, 0);

    // The way back from `rollback --all`: every pin lifted, on every replica asked. `one` has
    // one route pinned still (bookings), `two` both.
    let (code, out, err) = strangler(&["resume", "--all", "--admin", &a1, "--admin", &a2]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("resumed 1 route(s); 0 of 2 pinned now"),
        "{out}"
    );
    assert!(
        out.contains("resumed 2 route(s); 0 of 2 pinned now"),
        "{out}"
    );
    for proxy in [&one, &two] {
        for name in ["bookings", "tours"] {
            assert_eq!(route(proxy, name)["pinned"], Value::Null, "{name}");
        }
        assert_eq!(served_by(proxy, "/bookings/1"), "new");
    }
    let (code, out, err) = strangler(&["resume", "--all", "--admin", &a1]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("resumed 0 route(s); 0 of 2 pinned now"),
        "{out}"
    );
    // Neither a route nor `--all`: clap names both in the usage line.
    let (code, _, err) = strangler(&["resume", "--admin", &a1]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("<ROUTE | --all>"), "{err}");
}

#[test]
fn the_cli_pointed_at_the_proxy_instead_of_its_admin_listener_claims_nothing() {
    // `--admin` given the proxy's own port: the request is forwarded to a backend, whose 200
    // must not read as "already pinned" when nothing was pinned.
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let proxy = Proxy::start(&routing(&legacy, &new));
    let wrong = format!("http://127.0.0.1:{}", proxy.port);
    for args in [
        &["rollback", "bookings"][..],
        &["rollback", "--all"],
        &["resume", "bookings"],
        &["resume", "--all"],
        &["routes"],
        &["reload"],
    ] {
        let mut argv = args.to_vec();
        argv.extend(["--admin", &wrong]);
        let (code, out, err) = strangler(&argv);
        assert_eq!(code, 1, "{args:?} fails:\n{out}\n{err}");
        assert!(
            err.contains("not strangler's admin API") && err.contains(&wrong),
            "{args:?} says why, and where it asked:\n{err}"
        );
        assert!(!out.contains("pinned") && !out.contains("resumed"), "{out}");
    }
    assert_eq!(route(&proxy, "bookings")["pinned"], Value::Null);
    assert_eq!(served_by(&proxy, "/bookings/1"), "new");
    // The admin listener itself still answers as before.
    let (code, out, err) = strangler(&["rollback", "bookings", "--admin", &admin_arg(&proxy)]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bookings: pinned to default"), "{out}");
}

#[test]
fn the_cli_reloads_a_running_proxy_and_fails_when_it_rejects_the_file() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let token = [("STRANGLER_ADMIN_TOKEN", "s3cret")];
    let proxy = Proxy::start_with(&routing(&legacy, &new), &[], &token);
    let cfg = proxy.config.to_str().unwrap().to_string();
    // A bare HOST:PORT is taken, as by `rollback`.
    let bare = format!("127.0.0.1:{}", proxy.admin_port);
    let sha = |out: &str| -> String {
        let i = out
            .find("sha256 ")
            .unwrap_or_else(|| panic!("no sha256 in {out}"))
            + 7;
        out[i..i + 16].to_string()
    };

    let (code, out, err) = strangler_env(&["reload", "--admin", &bare], &token);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.starts_with("reloaded (sha256 "), "{out}");
    let (_, checked, _) = strangler(&["check", "-c", &cfg]);
    assert_eq!(
        sha(&out),
        sha(&checked),
        "the file on disk is the one serving"
    );

    // The token is required, as for every admin POST.
    let (code, _, err) = strangler(&["reload", "--admin", &bare]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("error 401: this admin API needs a token: set STRANGLER_ADMIN_TOKEN"),
        "{err}"
    );
    let (code, _, err) = strangler_env(
        &["reload", "--admin", &bare],
        &[("STRANGLER_ADMIN_TOKEN", "s3cre")],
    );
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(
            "error 401: the admin token (--admin-token or STRANGLER_ADMIN_TOKEN) was refused"
        ),
        "a wrong token is not worded as a missing one: {err}"
    );

    // A file the proxy rejects: exit 1 with its errors, and the previous table keeps serving.
    proxy.write_config(&format!(
        "{}routes:\n  - {{name: bookings, path: /bookings, to: legacy, colour: red}}\n",
        base_yaml(&legacy.url(), &new.url())
    ));
    let admin_env = [token[0], ("STRANGLER_ADMIN", bare.as_str())];
    let (code, out, err) = strangler_env(&["reload"], &admin_env);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("error 422") && err.contains("the previous table keeps serving"),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.trim_start().starts_with(&format!("{cfg}:")) && l.contains("colour")),
        "the file's error, at its position:\n{err}"
    );
    assert_eq!(served_by(&proxy, "/bookings/1"), "new");

    // Fixed: the new table serves once the command returns.
    let fixed = format!(
        "{}routes:\n  - {{name: bookings, path: /bookings, to: legacy}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    proxy.write_config(&fixed);
    let (code, out, err) = strangler_env(&["reload"], &admin_env);
    assert_eq!(code, 0, "{out}{err}");
    let (_, checked, _) = strangler(&["check", "-c", &cfg]);
    assert_eq!(sha(&out), sha(&checked));
    assert_eq!(served_by(&proxy, "/bookings/1"), "legacy");

    // Fleet: every replica is asked; one unreachable fails the command and is named.
    let dead = format!("127.0.0.1:{}", dead_port());
    let (code, out, err) = strangler_env(&["reload", "--admin", &bare, "--admin", &dead], &token);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("1 of 2 replicas ok"), "{out}");
    assert!(
        err.lines()
            .any(|l| l.starts_with(&dead) && l.contains("unreachable")),
        "{err}"
    );
    let (code, _, err) = strangler(&["reload", "--admin", &dead]);
    assert_eq!(code, 1);
    assert!(err.contains("unreachable"), "{err}");
}

/// Two echo backends and a directory holding their routing.yaml and a state file `state`
/// beside it, for a proxy to start in.
fn with_state_file(state: &[u8]) -> (Backend, Backend, tempfile::TempDir) {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routing.yaml"), routing(&legacy, &new)).unwrap();
    std::fs::write(dir.path().join(".strangler-state.json"), state).unwrap();
    (legacy, new, dir)
}

#[test]
fn a_corrupt_state_file_is_ignored() {
    let (_legacy, _new, dir) = with_state_file(b"{\"pins\": {\"bookings\": tru\x00\xff");
    let proxy = Proxy::start_at(dir, "routing.yaml");
    assert_eq!(served_by(&proxy, "/bookings/1"), "new", "nothing pinned");
    let log = proxy.log_text();
    assert!(
        log.lines()
            .any(|l| l.contains(".strangler-state.json") && l.to_lowercase().contains("corrupt")),
        "the corrupt file is logged:\n{log}"
    );
    assert_eq!(
        proxy.metric("strangler_state_file_read_errors_total"),
        1.0,
        "and counted"
    );
    // And the next pin writes a good file over it.
    assert_eq!(
        post(&proxy.admin_url("/routes/bookings/rollback"), None).status,
        200
    );
    let saved = std::fs::read_to_string(proxy.dir.path().join(".strangler-state.json")).unwrap();
    let v: Value = serde_json::from_str(&saved).unwrap_or_else(|e| panic!("{e}: {saved}"));
    assert!(v.to_string().contains("bookings"), "{saved}");
}

/// A state file that cannot be written (its directory missing: a `--state` typo, an unmounted
/// volume) is said at start-up; a pin then still holds, in memory, and its failed write is
/// logged and counted (SPEC §5).
#[test]
fn a_state_file_that_cannot_be_written_is_said_and_the_pin_holds() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("no-such-dir/state.json");
    let proxy = Proxy::start_with(
        &routing(&legacy, &new),
        &["--state", state.to_str().unwrap()],
        &[],
    );
    wait_for("the start-up warning", Duration::from_secs(5), || {
        proxy.log_text().lines().any(|l| {
            l.contains("WARN") && l.contains("no-such-dir") && l.contains("does not exist")
        })
    });
    assert_eq!(
        post(&proxy.admin_url("/routes/bookings/rollback"), None).status,
        200
    );
    assert_eq!(
        served_by(&proxy, "/bookings/1"),
        "legacy",
        "pinned in memory"
    );
    proxy.wait_metric("strangler_state_file_write_errors_total", 1.0);
    assert!(!state.exists());

    // The directory appears (a volume mounted late, a disk freed): the pin is written then,
    // not only at the next pin, and holds across a restart.
    std::fs::create_dir(state.parent().unwrap()).unwrap();
    wait_for("the pin written", Duration::from_secs(10), || {
        state.exists()
    });
    let saved = std::fs::read_to_string(&state).unwrap();
    assert!(saved.contains("bookings"), "{saved}");
    wait_for("the retry said", Duration::from_secs(5), || {
        proxy.log_text().contains("the pins it missed are saved")
    });
}

#[test]
fn a_stored_pin_of_a_route_not_in_the_file_is_lifted_and_audited() {
    let (_legacy, _new, dir) = with_state_file(
        br#"{"version":1,"pins":{"gone":{"reason":"manual","since":"2026-11-21T10:00:00Z"}}}"#,
    );
    let audit = dir.path().join("audit.jsonl");
    let audit_arg = audit.to_str().unwrap().to_string();
    let proxy = Proxy::start_in(dir, "routing.yaml", &["--audit-log", &audit_arg], &[]);
    let log = proxy.log_text();
    assert!(
        log.contains("state file pins route \"gone\"") && log.contains("pin lifted"),
        "{log}"
    );
    let lines = std::fs::read_to_string(&audit).unwrap();
    let entry: Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert_eq!(entry["route"], "gone", "{lines}");
    assert!(
        entry["reason"]
            .as_str()
            .unwrap()
            .contains("not in routing.yaml"),
        "{lines}"
    );
    let saved = std::fs::read_to_string(proxy.dir.path().join(".strangler-state.json")).unwrap();
    assert!(
        !saved.contains("gone"),
        "the state file forgets it: {saved}"
    );
}

// ---------------------------------------------------------------------------------------------
// Offline: check and explain

fn write(dir: &Path, name: &str, text: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p.to_str().unwrap().to_string()
}

const BACKENDS: &str = "backends:\n  legacy:\n    url: http://127.0.0.1:9001\n  new:\n    url: http://127.0.0.1:9002\ndefault: legacy\n";

#[test]
fn check_and_explain_end_quietly_when_their_reader_has_gone() {
    // `strangler check | grep -q valid` under pipefail: the reader may be gone before the first
    // line. The read end is closed before the child starts, so every write meets EPIPE.
    let sample = concat!(env!("CARGO_MANIFEST_DIR"), "/routing.yaml");
    for args in [
        &["check", "-c", sample][..],
        &["explain", "-c", sample, "GET", "/bookings/42"][..],
    ] {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin())
            .args(args)
            .stdin(Stdio::null())
            .stdout(writer)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {err}");
        assert!(!err.contains("panicked"), "{args:?}: {err}");
    }
}

#[test]
fn check_prints_the_table_and_points_at_each_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "routing.yaml",
        &format!(
            "{BACKENDS}routes:\n\
             \x20 - name: bookings\n    path: /bookings\n    to: new\n\
             \x20 - name: tours\n    path: /tours\n    to: new\n    split: 10\n    sticky: header:X-Client-Id\n\
             \x20 - name: customers\n    path: /customers\n    to: legacy\n    shadow: new\n\
             \x20 - name: itin\n    path: /itineraries/{{id}}\n    to: legacy\n"
        ),
    );
    let (code, out, err) = strangler(&["check", "-c", &good]);
    assert_eq!(code, 0, "{out}{err}");
    for (name, state) in [
        ("bookings", "new"),
        ("tours", "canary"),
        ("customers", "shadow"),
        ("itin", "legacy"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(name) && l.split_whitespace().any(|w| w == state)),
            "{name} is listed as {state}:\n{out}"
        );
    }
    assert!(
        out.contains("4 routes: 1 new, 1 canary, 1 shadow, 1 legacy, 0 rolled_back"),
        "{out}"
    );

    // Each kind of error, at its line and column. (line of the offending value or key)
    let bad: &[(&str, String, &str)] = &[
        ("unknown-key.yaml", format!("{BACKENDS}routes:\n  - path: /a\n    to: new\n    colour: red\n"), ":10:5:"),
        ("undefined.yaml", format!("{BACKENDS}routes:\n  - path: /a\n    to: nowhere\n"), ":9:9:"),
        (
            "duplicate.yaml",
            format!("{BACKENDS}routes:\n  - name: a\n    path: /a\n    to: new\n  - name: a\n    path: /b\n    to: new\n"),
            ":11:11:",
        ),
        (
            "conflict.yaml",
            format!("{BACKENDS}routes:\n  - name: a\n    path: /a\n    to: new\n  - name: b\n    path: /a\n    to: legacy\n"),
            ":12:",
        ),
        ("split.yaml", format!("{BACKENDS}routes:\n  - path: /a\n    to: new\n    split: 100.5\n"), ":10:12:"),
    ];
    for (file, text, pos) in bad {
        let path = write(dir.path(), file, text);
        let (code, out, err) = strangler(&["check", "-c", &path]);
        assert_eq!(code, 1, "{file} is invalid:\n{out}{err}");
        let want = format!("{path}{pos}");
        assert!(
            err.lines().any(|l| l.starts_with(&want)),
            "{file}: want {want}…, got:\n{err}"
        );
    }
    // Several errors are all reported.
    let path = write(
        dir.path(),
        "two.yaml",
        &format!("{BACKENDS}routes:\n  - path: /a\n    to: nowhere\n  - path: /b\n    to: new\n    split: -1\n"),
    );
    let (code, _, err) = strangler(&["check", "-c", &path]);
    assert_eq!(code, 1);
    assert!(
        err.contains(&format!("{path}:9:")) && err.contains(&format!("{path}:12:")),
        "both errors:\n{err}"
    );
}

#[test]
fn golden_cases_pin_the_routing_in_ci_and_explain_shows_the_upstream_request() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "routing.yaml",
        &format!(
            "{BACKENDS}routes:\n\
             \x20 - {{name: bookings, path: /bookings, to: new}}\n\
             \x20 - {{name: departures, path: /departures, exact: true, to: new, rewrite: /v2/departures}}\n\
             \x20 - {{name: tours, path: /tours, to: new, split: 100, sticky: 'header:X-Client-Id'}}\n"
        ),
    );
    let good = write(
        dir.path(),
        "cases.yaml",
        "- {request: GET /bookings/42, route: bookings, backend: new}\n\
         - {request: POST /bookingsX, route: default, backend: legacy}\n\
         - {request: GET /departures, route: departures, backend: new}\n\
         - {request: GET /tours/1, route: tours, backend: new, headers: {X-Client-Id: c1}}\n",
    );
    let (code, out, err) = strangler(&["check", "-c", &cfg, "--cases", &good]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("4 passed, 0 failed"), "{out}");

    let wrong = write(
        dir.path(),
        "wrong.yaml",
        "- {request: GET /bookings/42, route: bookings, backend: new}\n\
         - {request: GET /departures/1, route: departures, backend: new}\n",
    );
    let (code, out, err) = strangler(&["check", "-c", &cfg, "--cases", &wrong]);
    assert_eq!(code, 1, "a wrong case fails the check:\n{out}{err}");
    assert!(
        out.contains("GET /departures/1"),
        "the failing case is named:\n{out}"
    );
    assert!(out.contains("1 passed, 1 failed"), "{out}");
    assert!(
        out.contains(&format!(
            "FAIL  GET /departures/1 ({wrong}:2:4): route: want departures"
        )),
        "the failing case's place in its file:\n{out}"
    );
    let renamed = write(
        dir.path(),
        "renamed.yaml",
        "- {request: GET /bookings/42, route: booking}\n",
    );
    let (code, out, _) = strangler(&["check", "-c", &cfg, "--cases", &renamed]);
    assert_eq!(code, 1);
    assert!(
        out.contains("want booking, got bookings (the table has no route named \"booking\")"),
        "{out}"
    );
    // An emptied golden file fails too: it pins nothing.
    for (name, text) in [("empty.yaml", ""), ("none.yaml", "[]\n")] {
        let empty = write(dir.path(), name, text);
        let (code, out, err) = strangler(&["check", "-c", &cfg, "--cases", &empty]);
        assert_eq!(code, 1, "{name}:\n{out}{err}");
        assert!(err.contains(&format!("{name}:1:1:")), "{err}");
    }
    // A case the schema refuses is named as the file's list item.
    let typo = write(
        dir.path(),
        "typo.yaml",
        "- {request: GET /x, route: default}\n- {request: GET /y, route: default, bakend: new}\n\
         - {request: GET /z, rout: default}\n- {request: 5, route: default}\n",
    );
    let (code, out, err) = strangler(&["check", "-c", &cfg, "--cases", &typo]);
    assert_eq!(code, 1, "{out}{err}");
    // Every case that does not read is reported, each where it goes wrong, and none is run.
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 3, "{err}");
    assert!(
        lines[0].contains("typo.yaml:2:37: cases[1]: unknown field `bakend`"),
        "{err}"
    );
    assert!(
        lines[1].contains("typo.yaml:3:21: cases[2]: unknown field `rout`"),
        "{err}"
    );
    assert!(
        lines[2].contains("typo.yaml:4:13: cases[3].request: \"5\" is not \"METHOD /path\""),
        "{err}"
    );
    assert!(!out.contains("passed"), "{out}");

    // A case on a partial split without its sticky key would pass or fail by chance: it fails,
    // saying why, every time.
    let canary = write(
        dir.path(),
        "canary.yaml",
        &format!(
            "{BACKENDS}routes:\n  - {{name: tours, path: /tours, to: new, split: 50, sticky: 'header:X-Client-Id'}}\n"
        ),
    );
    let keyless = write(
        dir.path(),
        "keyless.yaml",
        "- {request: GET /tours/1, route: tours, backend: legacy}\n\
         - {request: GET /tours/1, route: tours}\n",
    );
    for _ in 0..5 {
        let (code, out, err) = strangler(&["check", "-c", &canary, "--cases", &keyless]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(
            out.contains("a random pick per request") && out.contains("sticky header:x-client-id"),
            "{out}"
        );
        assert!(
            out.contains("1 passed, 1 failed"),
            "the route alone is pinned:\n{out}"
        );
    }
    // A pinned split splits nothing: its requests go to default, key or no key.
    write(
        dir.path(),
        ".strangler-state.json",
        r#"{"version":1,"pins":{"tours":{"reason":"manual","since":"2026-01-01T00:00:00Z"}}}"#,
    );
    let (code, out, err) = strangler(&["check", "-c", &canary, "--cases", &keyless]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("2 passed, 0 failed"), "{out}");

    let (code, out, err) = strangler(&["explain", "-c", &cfg, "GET", "/bookings/42"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("bookings"), "the route:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.contains("backend") && l.contains("new")),
        "the backend:\n{out}"
    );
    assert!(
        out.contains("GET /bookings/42 HTTP/1.1"),
        "the upstream request line:\n{out}"
    );

    let (code, out, err) = strangler(&["explain", "-c", &cfg, "GET", "//departures/?x=1"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("departures") && out.contains("GET /v2/departures/?x=1 HTTP/1.1"),
        "rewritten:\n{out}"
    );

    // As the proxy does: `OPTIONS *` goes to default untouched, methods are case-sensitive.
    let (code, out, err) = strangler(&["explain", "-c", &cfg, "OPTIONS", "*"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("route:    default") && out.contains("upstream: OPTIONS * HTTP/1.1"),
        "OPTIONS *:\n{out}"
    );
    let (code, out, err) = strangler(&["explain", "-c", &cfg, "get", "/bookings/42"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("upstream: get /bookings/42 HTTP/1.1"),
        "the method as sent:\n{out}"
    );
    // Requests the proxy answers itself are explained as such, not as forwarded.
    let long = format!("/bookings/{}", "a".repeat(9000));
    let big = format!("X-Big: {}", "a".repeat(40_000));
    for (args, says) in [
        (
            vec!["GET", "/bookings/1", "-H", "Host: a/b"],
            "400 bad_request",
        ),
        (
            vec!["GET", "/bookings/1", "-H", "Connection: X-Forwarded-For"],
            "400 bad_request",
        ),
        (vec!["GET", long.as_str()], "414 uri_too_long"),
        (
            vec!["GET", "/bookings", "-H", big.as_str()],
            "431 headers_too_large",
        ),
    ] {
        let mut all = vec!["explain", "-c", &cfg];
        all.extend(args.iter().copied());
        let (code, out, err) = strangler(&all);
        assert_eq!(code, 0, "{err}");
        assert!(
            out.contains(&format!("answered by strangler: {says}")) && !out.contains("upstream:"),
            "{says}:\n{out}"
        );
    }
    // Two Host fields never reach strangler's hooks: Pingora's parser refuses the head first,
    // and the proxy answers its JSON 400, as it does live.
    let (code, out, err) = strangler(&[
        "explain",
        "-c",
        &cfg,
        "GET",
        "/bookings/1",
        "-H",
        "Host: a",
        "-H",
        "Host: b",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("answered by strangler: 400 bad_request")
            && out.contains("Pingora's HTTP/1 parser refuses the head")
            && !out.contains("upstream:"),
        "{out}"
    );
}

/// `strangler explain -c CFG METHOD TARGET` with the target as raw bytes (any, as a client may
/// send): its stdout.
fn explain_bytes(cfg: &str, target: &[u8]) -> String {
    use std::os::unix::ffi::OsStrExt;
    let mut cmd = Command::new(bin());
    cmd.args(["explain", "-c", cfg, "GET"])
        .arg(std::ffi::OsStr::from_bytes(target))
        .stdin(Stdio::null());
    for (k, _) in std::env::vars() {
        if k.starts_with("STRANGLER_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn explain_and_check_agree_with_the_live_proxy_on_targets_pingora_rewrites_or_refuses() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = format!(
        "{}routes:\n\
         \x20 - {{name: bookings, path: /bookings, to: new}}\n\
         \x20 - {{name: departures, path: /departures, to: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    let proxy = Proxy::start(&yaml);
    let cfg = proxy.config.to_str().unwrap().to_string();
    let addr = format!("127.0.0.1:{}", proxy.port);
    let targets: &[&[u8]] = &[
        b"/bookings/42",
        b"/bookings#x",
        b"/departures#/x/y",
        b"/x#/../../bookings",
        b"/bookings/42?q#frag",
        b"/bookings/42 extra",
        b"/bookings/a b?c d",
        b"/bookings/a b<c",
        b"/bookings/a`b",
        b"/bookings/a<b",
        b"/bookings/a>b",
        b"/bookings/a\"b",
        b"/bookings?q=\"x\"",
        b"/bookings?q=<x>",
        b"/bookings/\xe9",
        b"/bookings/\x80",
        b"/bookings?q=\xff",
        "/bookings/caf\u{e9}".as_bytes(),
        b"/bookings/../x",
    ];
    for &target in targets {
        let shown = String::from_utf8_lossy(target);
        let mut head = b"GET ".to_vec();
        head.extend_from_slice(target);
        head.extend_from_slice(b" HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let before = legacy.seen().len() + new.seen().len();
        // `Connection: close`: the answer ends when the proxy closes, however loaded the host.
        let live = raw_within(&addr, &head, Duration::from_secs(10));
        let status = live.get(9..12).unwrap_or("").to_string();
        let live_route = live
            .lines()
            .find_map(|l| {
                l.split_once(':')
                    .filter(|(k, _)| k.eq_ignore_ascii_case("x-strangler-route"))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default();
        let out = explain_bytes(&cfg, target);
        if out.contains("answered by strangler: 400") {
            // Refused by Pingora's parser or by the hooks: the proxy's JSON 400 either way.
            assert_eq!(status, "400", "{shown}: live\n{live}\nexplain:\n{out}");
            assert!(live.contains("\"bad_request\""), "{shown}:\n{live}");
            assert_eq!(live_route, "default", "{shown}:\n{live}");
            assert!(!out.contains("upstream:"), "{out}");
        } else {
            assert_eq!(status, "200", "{shown}: live\n{live}\nexplain:\n{out}");
            let field = |name: &str| {
                out.lines()
                    .find_map(|l| l.trim().strip_prefix(name))
                    .unwrap_or_else(|| panic!("{shown}: no {name} in\n{out}"))
                    .trim()
                    .to_string()
            };
            let route = field("route:");
            let route = route.split(' ').next().unwrap();
            assert_eq!(route, live_route, "{shown}: the route\n{out}\n{live}");
            let upstream = field("upstream:");
            let body = live.split_once("\r\n\r\n").unwrap().1;
            let seen: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {live}"));
            assert_eq!(
                upstream,
                format!("GET {} HTTP/1.1", seen["target"].as_str().unwrap()),
                "{shown}: the upstream request line\n{out}"
            );
        }
        let after = legacy.seen().len() + new.seen().len();
        assert_eq!(
            after - before,
            usize::from(status == "200"),
            "{shown}: forwarded iff routed"
        );
    }
    // The fragment is dropped, what Pingora re-encodes is shown re-encoded.
    let out = explain_bytes(&cfg, b"/bookings/42 extra#frag");
    assert!(
        out.contains("target:   /bookings/42%20extra (")
            && out.contains("upstream: GET /bookings/42%20extra HTTP/1.1"),
        "{out}"
    );
    let out = explain_bytes(&cfg, b"/bookings/a`b");
    assert!(
        out.starts_with("GET /bookings/a`b\n  answered by strangler: 400 bad_request")
            && out.contains("Pingora's HTTP/1 parser refuses the head"),
        "{out}"
    );
    let out = explain_bytes(&cfg, b"/bookings/\xe9");
    assert!(out.starts_with("GET /bookings/\\xE9\n"), "{out}");

    // The same verdicts as golden cases.
    let cases = write(
        proxy.dir.path(),
        "cases.yaml",
        "- {request: 'GET /bookings#x', route: bookings, backend: new}\n\
         - {request: 'GET /x#/../../bookings', route: default, backend: legacy}\n\
         - {request: 'GET /bookings/42 extra', route: bookings, backend: new}\n\
         - {request: 'GET /bookings/a`b', route: bookings, backend: new}\n",
    );
    let (code, out, err) = strangler(&["check", "-c", &cfg, "--cases", &cases]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("3 passed, 1 failed"), "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("FAIL  GET /bookings/a`b")
            && l.contains("answered by strangler: 400 bad_request")),
        "{out}"
    );
}

#[test]
fn explain_reads_pins_from_the_state_file_check_reads() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write(
        dir.path(),
        "routing.yaml",
        &format!("{BACKENDS}routes:\n  - {{name: bookings, path: /bookings, to: new}}\n"),
    );
    // Elsewhere, as the systemd unit and the Kubernetes Deployment keep it.
    let var = tempfile::tempdir().unwrap();
    let state = write(
        var.path(),
        "state.json",
        r#"{"version":1,"pins":{"bookings":{"reason":"manual","since":"2026-11-21T10:00:00Z"}}}"#,
    );
    let pinned = |out: &str| {
        out.lines().any(|l| {
            l.contains("backend:") && l.contains("legacy") && l.contains("pinned to default")
        }) && out.contains("state rolled_back")
    };
    let (code, out, err) = strangler(&["explain", "-c", &cfg, "GET", "/bookings/1"]);
    assert_eq!(code, 0, "{err}");
    assert!(!pinned(&out), "no pin beside routing.yaml:\n{out}");
    let (code, out, err) = strangler(&[
        "explain",
        "-c",
        &cfg,
        "--state",
        &state,
        "GET",
        "/bookings/1",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(pinned(&out), "--state:\n{out}");
    let (code, out, err) = strangler_env(
        &["explain", "-c", &cfg, "GET", "/bookings/1"],
        &[("STRANGLER_STATE", &state)],
    );
    assert_eq!(code, 0, "{err}");
    assert!(pinned(&out), "STRANGLER_STATE:\n{out}");
    // And check says the same of the same file.
    let (code, out, err) = strangler(&["check", "-c", &cfg, "--state", &state]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.lines()
            .any(|l| l.contains("bookings") && l.contains("rolled_back")),
        "{out}"
    );
    // A golden case that the pin fails names the pin and where it was read.
    let cases = write(
        dir.path(),
        "cases.yaml",
        "- {request: GET /bookings/1, route: bookings, backend: new}\n",
    );
    let (code, out, err) = strangler(&["check", "-c", &cfg, "--state", &state, "--cases", &cases]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.contains(&format!(
            "backend: want new, got legacy (route bookings is pinned to default in {state})"
        )),
        "{out}"
    );
}

/// Two successful loads within one second have distinct timestamps: "the timestamp moved" is a
/// sound check after any reload.
#[test]
fn each_successful_reload_moves_the_timestamp() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let proxy = Proxy::start(&routing(&legacy, &new));
    let stamp = || proxy.metric("strangler_config_last_reload_success_timestamp_seconds");
    let mut last = stamp();
    assert!(last > 1.0e9, "{last}");
    for _ in 0..3 {
        assert_eq!(post(&proxy.admin_url("/reload"), None).status, 200);
        let now = stamp();
        assert!(now > last, "{now} after {last}");
        last = now;
    }
}

/// The admin port has the proxy's header deadline (a client dripping its header is cut, not
/// kept holding a descriptor), and answers pipelined requests in order.
#[test]
fn the_admin_port_cuts_slow_headers_and_answers_pipelined_requests() {
    use std::io::Write;
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start_with(
        &one_backend(&legacy.url()),
        &["--header-timeout", "1s"],
        &[],
    );
    let admin = format!("127.0.0.1:{}", proxy.admin_port);
    let answer = raw_within(
        &admin,
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");

    // The header's time runs from the connection: so does the test's.
    let t0 = Instant::now();
    let mut slow = std::net::TcpStream::connect(&admin).unwrap();
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nX-A: ")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut how = String::new();
    wait_for(
        "the slow admin client to be cut",
        Duration::from_secs(5),
        || {
            let mut buf = [0u8; 256];
            how = match read_some(&mut slow, &mut buf) {
                // Closed, or answered (an error): the header never finished.
                Ok(n) => format!("read {:?}", String::from_utf8_lossy(&buf[..n])),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut =>
                {
                    match slow.write_all(b"a") {
                        Ok(()) => return false,
                        Err(e) => format!("write: {e}"),
                    }
                }
                Err(e) => format!("read: {e}"),
            };
            true
        },
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(900),
        "cut after {:?} ({how}); log:\n{}",
        t0.elapsed(),
        proxy.log_text()
    );
    assert_eq!(get(&proxy.admin_url("/healthz")).0, 200);
}
