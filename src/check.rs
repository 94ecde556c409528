//! The offline commands: `check` (validate, print the table with states, run golden cases) and
//! `explain` (what would happen to one request). Both read the file exactly as the proxy does
//! and decide exactly as the proxy does; neither contacts a backend.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::process::ExitCode;

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

use crate::cli::{CheckArgs, ExplainArgs};
use crate::config::{self, ConfigErrors};
use crate::path;
use crate::pins::{Pin, StateFile};
use crate::router::{upstream_path, RoutingTable, DEFAULT_ROUTE};
use crate::split;

/// Reads and validates without resolving backends (so `check` works offline, e.g. in CI).
pub fn load(config: &Path) -> Result<RoutingTable, ConfigErrors> {
    let (file, source) = config::read(config)?;
    RoutingTable::build(file, &source)
}

fn pins(config: &Path, state: Option<&Path>) -> BTreeMap<String, Pin> {
    let path = state
        .map(Path::to_path_buf)
        .unwrap_or_else(|| StateFile::beside(config));
    StateFile::new(path).load()
}

/// `strangler check`.
pub fn check(a: &CheckArgs) -> ExitCode {
    let table = match load(&a.config.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let pins = pins(&a.config.config, a.state.as_deref());
    let pinned = |name: &str| pins.contains_key(name);
    outln!("{}: valid (sha256 {})", table.file, &table.sha256[..16]);
    outln!("\nbackends:");
    for (i, b) in table.backends.iter().enumerate() {
        let mut notes = Vec::new();
        if i == table.default {
            notes.push("default".to_string());
        }
        if let Some(h) = &b.host_header {
            notes.push(format!("host={h}"));
        }
        notes.push(format!("trailing_slash={:?}", b.trailing_slash).to_lowercase());
        notes.push(format!(
            "connect_timeout={:?} timeout={:?}",
            b.connect_timeout, b.timeout
        ));
        outln!("  {:<12} {:<32} {}", b.name, b.url, notes.join(" "));
    }
    outln!("\nroutes:");
    let rows: Vec<[String; 6]> = table
        .routes
        .iter()
        .map(|r| {
            let methods = r.methods.as_ref().map_or("*".to_string(), |m| m.join(","));
            let mut extra = Vec::new();
            if let Some(s) = &r.split {
                extra.push(format!("split={}%", s.percent));
            }
            if let Some(s) = r.shadow {
                extra.push(format!("shadow={}", table.backends[s].name));
            }
            if r.exact {
                extra.push("exact".into());
            }
            if r.failover {
                extra.push("failover".into());
            }
            if let Some(rw) = &r.rewrite {
                extra.push(format!("rewrite={rw}"));
            }
            if r.rollback.is_some() {
                extra.push("auto-rollback".into());
            }
            [
                r.name.to_string(),
                r.path.clone(),
                methods,
                table.backends[r.to].name.to_string(),
                table.state(r, pinned(&r.name)).as_str().to_string(),
                extra.join(" "),
            ]
        })
        .collect();
    let header = ["NAME", "PATH", "METHODS", "TO", "STATE", ""];
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: [&str; 6]| {
        let mut s = String::from(" ");
        for (c, w) in cells.iter().zip(widths) {
            s.push_str(&format!(" {c:<w$}"));
        }
        outln!("{}", s.trim_end());
    };
    line(header);
    for row in &rows {
        line([&row[0], &row[1], &row[2], &row[3], &row[4], &row[5]]);
    }
    outln!("\n{}", table.summary(|r| pinned(&r.name)));
    match &a.cases {
        None => ExitCode::SUCCESS,
        Some(cases) => run_cases(&table, cases, &pins),
    }
}

/// One golden case.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    request: String,
    route: String,
    backend: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    client_ip: Option<IpAddr>,
}

/// Where one request goes.
#[derive(Debug)]
pub struct Decision {
    pub route: Option<usize>,
    pub backend: usize,
    pub to_target: bool,
    pub upstream_target: String,
    pub normal_path: String,
}

/// Decides like the proxy: normalise, match (preflights as their announced method), then
/// pin → split → `to`.
pub fn decide(
    table: &RoutingTable,
    method: &str,
    target: &str,
    headers: &HeaderMap,
    client_ip: IpAddr,
    pinned: impl Fn(&str) -> bool,
) -> Result<Decision, String> {
    // The proxy's own refusals, in its order and with its default limits: a case or an
    // explanation must not describe as forwarded a request the proxy answers itself.
    if let Some(e) = crate::proxy::Limits::default().refusal(target.len(), headers) {
        return Err(format!(
            "{} {}: {} (at run's default limits)",
            e.status, e.code, e.message
        ));
    }
    let asterisk = method == "OPTIONS" && target == "*";
    let normal = if asterisk {
        None
    } else {
        Some(path::normalize(target).map_err(|e| format!("400 bad_request: {e}"))?)
    };
    // No -H Host: the client's Host is whatever it will be.
    if !crate::forwarding::host_headers_ok(headers, false) {
        return Err(
            "400 bad_request: exactly one Host header, host[:port], is required".to_string(),
        );
    }
    if let Some(why) = crate::forwarding::connection_refusal(headers) {
        return Err(format!("400 bad_request: {why}"));
    }
    let Some(normal) = normal else {
        // Server-wide OPTIONS: no path to match, so `default` answers it, target unchanged.
        return Ok(Decision {
            route: None,
            backend: table.default,
            to_target: false,
            upstream_target: "*".to_string(),
            normal_path: "*".to_string(),
        });
    };
    let match_method = match (method, headers.get("access-control-request-method")) {
        ("OPTIONS", Some(m)) => m.to_str().unwrap_or(method).to_string(),
        _ => method.to_string(),
    };
    let route = table.lookup(&normal, &match_method);
    let (backend, to_target) = match route {
        None => (table.default, false),
        Some(i) => {
            let r = &table.routes[i];
            let to = !pinned(&r.name)
                && r.split.as_ref().is_none_or(|s| {
                    let key = split::sticky_key(&s.sticky, headers, Some(client_ip));
                    split::decide(&r.name, s, key.as_deref())
                });
            if to {
                (r.to, true)
            } else {
                (table.default, false)
            }
        }
    };
    let upstream_target = upstream_path(
        route.map(|i| &table.routes[i]),
        to_target,
        &table.backends[backend],
        &normal,
    );
    Ok(Decision {
        route,
        backend,
        to_target,
        upstream_target,
        normal_path: normal.path().to_string(),
    })
}

fn header_map(pairs: impl IntoIterator<Item = (String, String)>) -> Result<HeaderMap, String> {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        let name = HeaderName::from_bytes(k.trim().as_bytes())
            .map_err(|_| format!("bad header name {k:?}"))?;
        let value =
            HeaderValue::from_str(v.trim()).map_err(|_| format!("bad header value {v:?}"))?;
        h.append(name, value);
    }
    Ok(h)
}

fn run_cases(table: &RoutingTable, file: &Path, pins: &BTreeMap<String, Pin>) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}:1:1: cannot read: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    let text = text.strip_prefix(crate::config::BOM).unwrap_or(&text);
    let cases: Vec<Case> = match serde_yaml::from_str(text) {
        Ok(c) => c,
        Err(e) => {
            let (l, c) = e.location().map_or((1, 1), |l| (l.line(), l.column()));
            let message = crate::config::clean_serde_message(&e.to_string());
            eprintln!("{}:{l}:{c}: {message}", file.display());
            return ExitCode::from(1);
        }
    };
    let mut failed = 0;
    for (n, case) in cases.iter().enumerate() {
        let outcome = (|| -> Result<(), String> {
            let (method, target) = case
                .request
                .split_once(' ')
                .ok_or_else(|| format!("request {:?} must be \"METHOD /path\"", case.request))?;
            let headers = header_map(case.headers.clone())?;
            let ip = case.client_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
            let d = decide(table, method, target.trim(), &headers, ip, |r| {
                pins.contains_key(r)
            })?;
            let route = d.route.map_or(DEFAULT_ROUTE, |i| &table.routes[i].name);
            let backend = &*table.backends[d.backend].name;
            if route != case.route {
                return Err(format!("route: want {}, got {route}", case.route));
            }
            if let Some(want) = &case.backend {
                // Without its sticky key a split is a random pick per request: such a case
                // would pass or fail by chance, which is no way to pin routing in CI.
                let keyless = d.route.map(|i| &table.routes[i]).and_then(|r| {
                    let s = r
                        .split
                        .as_ref()
                        .filter(|s| s.percent > 0.0 && s.percent < 100.0)?;
                    split::sticky_key(&s.sticky, &headers, Some(ip))
                        .is_none()
                        .then_some((r, s))
                });
                if let Some((r, s)) = keyless {
                    return Err(format!(
                        "backend: a random pick per request: route {} splits {}% by sticky {} and the case sends no such key (add it under headers:)",
                        r.name, s.percent, s.sticky
                    ));
                }
                if want != backend {
                    return Err(format!("backend: want {want}, got {backend}"));
                }
            }
            Ok(())
        })();
        match outcome {
            Ok(()) => outln!("ok    {}", case.request),
            Err(e) => {
                failed += 1;
                outln!("FAIL  {} (case {}): {e}", case.request, n + 1);
            }
        }
    }
    outln!("{} passed, {failed} failed", cases.len() - failed);
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// `strangler explain`.
pub fn explain(a: &ExplainArgs) -> ExitCode {
    let table = match load(&a.config.config) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let pairs: Result<Vec<(String, String)>, String> = a
        .headers
        .iter()
        .map(|h| {
            h.split_once(':')
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| format!("header {h:?} must be 'Name: value'"))
        })
        .collect();
    let headers = match pairs.and_then(header_map) {
        Ok(h) => h,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    let pins = pins(&a.config.config, None);
    // As sent: methods are case-sensitive (RFC 9110 §9.1), and so is the proxy's matching.
    let method = a.method.as_str();
    let d = match decide(&table, method, &a.path, &headers, a.client_ip, |r| {
        pins.contains_key(r)
    }) {
        Ok(d) => d,
        Err(e) => {
            outln!(
                "{method} {}\n  answered by strangler: {e}; sent nowhere",
                a.path
            );
            return ExitCode::SUCCESS;
        }
    };
    let backend = &table.backends[d.backend];
    outln!("{method} {}", a.path);
    outln!("  normalised path: {}", d.normal_path);
    match d.route {
        Some(i) => {
            let r = &table.routes[i];
            let state = table.state(r, pins.contains_key(&*r.name)).as_str();
            outln!("  route:    {} (path {}, state {state})", r.name, r.path);
            let keyless = r.split.as_ref().is_some_and(|s| {
                split::sticky_key(&s.sticky, &headers, Some(a.client_ip)).is_none()
            });
            let percent = r.split.as_ref().map_or(0.0, |s| s.percent);
            let why = if pins.contains_key(&*r.name) {
                "pinned to default".to_string()
            } else if keyless {
                let side = if d.to_target { "`to`" } else { "default" };
                format!("split {percent}%: no sticky key, so each request is a random pick (this one: {side})")
            } else if d.to_target {
                "the route's `to`".to_string()
            } else {
                format!("split: this client is outside the {percent}%")
            };
            outln!("  backend:  {} ({}) — {why}", backend.name, backend.url);
        }
        None => {
            outln!("  route:    {DEFAULT_ROUTE} (no route matches)");
            outln!(
                "  backend:  {} ({}) — the default",
                backend.name,
                backend.url
            );
        }
    }
    outln!("  upstream: {method} {} HTTP/1.1", d.upstream_target);
    match (&backend.host_header, headers.get(http::header::HOST)) {
        (Some(h), _) => outln!("  Host:     {h} (set by backend `host`)"),
        (None, Some(h)) => outln!("  Host:     {} (the client's)", h.to_str().unwrap_or("?")),
        (None, None) => outln!("  Host:     the client's Host, kept"),
    }
    ExitCode::SUCCESS
}
