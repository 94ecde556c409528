//! The offline commands: `check` (validate, print the table with states, run golden cases) and
//! `explain` (what would happen to one request). Both read the file exactly as the proxy does
//! and decide exactly as the proxy does, starting where the proxy starts: Pingora's own parser
//! reads the request head first (see [`pingora_reads`]). Neither contacts a backend.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use http::{HeaderMap, HeaderName, HeaderValue};
use pingora_http::RequestHeader;
use serde::Deserialize;

use crate::cli::{CheckArgs, ExplainArgs};
use crate::config::{self, ConfigError, ConfigErrors};
use crate::path;
use crate::pins::{Pin, StateFile};
use crate::router::{upstream_path, RoutingTable, DEFAULT_ROUTE};
use crate::source_map::{Pos, SourceMap};
use crate::split;

/// Reads and validates without resolving backends (so `check` works offline, e.g. in CI).
pub fn load(config: &Path) -> Result<RoutingTable, ConfigErrors> {
    RoutingTable::build_checked(config::read_checked(config))
}

fn state_path(config: &Path, state: Option<&Path>) -> PathBuf {
    state
        .map(Path::to_path_buf)
        .unwrap_or_else(|| StateFile::beside(config))
}

fn pins(config: &Path, state: Option<&Path>) -> BTreeMap<String, Pin> {
    StateFile::new(state_path(config, state)).peek()
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
        Some(cases) => run_cases(
            &table,
            cases,
            &pins,
            &state_path(&a.config.config, a.state.as_deref()),
        ),
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
    /// The request target as Pingora hands it to the proxy: a `#fragment` dropped; when the
    /// request line did not parse (a raw space, …), percent-encoded by Pingora's retry.
    pub received_target: String,
}

/// Who answers a request itself instead of forwarding it, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answered {
    /// Pingora, while it reads the request head, before any hook of strangler runs: the
    /// connection is closed without an answer. (A head it refuses with a 400 is answered the
    /// proxy's own JSON error instead: `Strangler`.)
    Pingora { why: String },
    /// strangler's own refusal (SPEC §4), a JSON error: `"STATUS CODE: message"`.
    Strangler(String),
    /// Not a request at all: what was given cannot be written as one request head.
    Unsendable(String),
}

impl std::fmt::Display for Answered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Answered::Pingora { why } => {
                write!(
                    f,
                    "closed by Pingora without an answer (before routing): {why}"
                )
            }
            Answered::Strangler(e) => write!(f, "answered by strangler: {e}"),
            Answered::Unsendable(why) => write!(f, "not a request: {why}"),
        }
    }
}

/// Reads the request head exactly as the live proxy's HTTP/1 listener does, with Pingora's own
/// code, so that `explain` and `check --cases` see the request the proxy's hooks see:
/// `ServerSession::new_http1` + `read_request` (httparse; on a request line it refuses,
/// Pingora's retry with the target percent-encoded; `RequestHeader::build`, which drops a
/// `#fragment` and refuses what the `http` crate's `Uri` cannot hold; `validate_request`),
/// then pingora-proxy's `handle_new_request` verdict: a head that does not parse is answered a
/// 400 — which the live proxy's connection turns into its own JSON 400, 414 or 431
/// (`connection.rs`, `head_scan.rs`), as this does. (`CONNECT`, which Pingora would answer 405,
/// is let through to the proxy's own 400: `server.rs`.)
pub fn pingora_reads(
    method: &str,
    target: &[u8],
    headers: &HeaderMap,
) -> Result<RequestHeader, Answered> {
    use pingora_core::protocols::http::ServerSession;

    // Written into a request line, a line feed would end it there (a bare CR is a byte the
    // parser refuses, as the proxy's does: that one is explained).
    if method.contains('\n') || target.contains(&b'\n') {
        return Err(Answered::Unsendable(
            "a line feed in the method or target would end the request line there".to_string(),
        ));
    }

    let mut wire = Vec::with_capacity(method.len() + target.len() + 64);
    wire.extend_from_slice(method.as_bytes());
    wire.push(b' ');
    wire.extend_from_slice(target);
    wire.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers {
        wire.extend_from_slice(name.as_str().as_bytes());
        wire.extend_from_slice(b": ");
        wire.extend_from_slice(value.as_bytes());
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"\r\n");
    let mut session = ServerSession::new_http1(Box::new(std::io::Cursor::new(wire.clone())));
    // Pingora arms its read timeout with tokio's timer; the bytes are all there, so nothing
    // ever waits.
    let read = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(|e| Answered::Pingora {
            why: format!("cannot start a runtime to parse with: {e}"),
        })?
        .block_on(session.read_request());
    match read {
        Ok(true) => {}
        Ok(false) => {
            return Err(Answered::Pingora {
                why: "no request".to_string(),
            })
        }
        Err(e) => {
            let why = pingora_reason(&e);
            if e.etype == pingora_error::ErrorType::InvalidHTTPHeader {
                let mut scan = crate::head_scan::HeadScan::default();
                scan.feed(&wire);
                let err = scan.refusal(&crate::proxy::Limits::default());
                return Err(Answered::Strangler(format!(
                    "{} {}: {} (Pingora's HTTP/1 parser refuses the head, before routing: {why})",
                    err.status, err.code, err.message
                )));
            }
            return Err(Answered::Pingora { why });
        }
    }
    Ok(session.req_header().clone())
}

/// Pingora's error, in words: its context and cause, without the bytes it failed on (the head,
/// the target), which the explanation shows already.
fn pingora_reason(e: &pingora_error::Error) -> String {
    let mut cause = e.cause.as_ref().map(|c| c.to_string());
    let context = e.context.as_ref().map(|c| c.as_str()).and_then(|c| {
        if c.starts_with("buf:") {
            None
        } else if let Some(target) = c.strip_prefix("invalid uri ") {
            // Pingora keeps no cause here: ask the `http` crate again what it refused.
            cause = cause.take().or_else(|| {
                http::uri::PathAndQuery::try_from(target)
                    .err()
                    .map(|e| e.to_string())
            });
            Some("the request target is refused")
        } else {
            Some(c)
        }
    });
    match (context, cause) {
        (Some(c), Some(why)) => format!("{c}: {why}"),
        (Some(c), None) => c.to_string(),
        (None, Some(why)) => format!("the request line does not parse: {why}"),
        (None, None) => e.etype.as_str().to_string(),
    }
}

/// Decides like the proxy: Pingora reads the head, then strangler's hooks normalise, match
/// (preflights as their announced method), then pin → split → `to`.
pub fn decide(
    table: &RoutingTable,
    method: &str,
    target: &[u8],
    headers: &HeaderMap,
    client_ip: IpAddr,
    pinned: impl Fn(&str) -> bool,
) -> Result<Decision, Answered> {
    let req = pingora_reads(method, target, headers)?;
    let (method, raw, headers) = (req.method.as_str(), req.raw_path(), &req.headers);
    let received_target = String::from_utf8_lossy(raw).into_owned();
    // The proxy's own refusals, in its order and with its default limits: a case or an
    // explanation must not describe as forwarded a request the proxy answers itself.
    if let Some(e) = crate::proxy::Limits::default().refusal(raw.len(), headers) {
        return Err(Answered::Strangler(format!(
            "{} {}: {} (at run's default limits)",
            e.status, e.code, e.message
        )));
    }
    if let Some(why) = crate::forwarding::method_refusal(&req.method) {
        return Err(Answered::Strangler(format!("400 bad_request: {why}")));
    }
    if !path::written_as_path(target) {
        let e = path::PathError::NotOriginForm;
        return Err(Answered::Strangler(format!("400 bad_request: {e}")));
    }
    let normal = path::normalize_target(raw, method == "OPTIONS")
        .map_err(|e| Answered::Strangler(format!("400 bad_request: {e}")))?;
    // No -H Host: the client's Host is whatever it will be.
    if !crate::forwarding::host_headers_ok(headers, false) {
        return Err(Answered::Strangler(
            "400 bad_request: exactly one Host header, host[:port], is required".to_string(),
        ));
    }
    if let Some(why) = crate::forwarding::connection_refusal(headers)
        .or_else(|| crate::forwarding::transfer_coding_refusal(headers))
    {
        return Err(Answered::Strangler(format!("400 bad_request: {why}")));
    }
    let Some(normal) = normal else {
        // Server-wide OPTIONS: no path to match, so `default` answers it, target unchanged.
        return Ok(Decision {
            route: None,
            backend: table.default,
            to_target: false,
            upstream_target: "*".to_string(),
            normal_path: "*".to_string(),
            received_target,
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
                    // As the proxy does: the peer, or behind trusted proxies the client that
                    // `X-Forwarded-For` names.
                    let xff = crate::forwarding::header_list(
                        headers,
                        &crate::forwarding::X_FORWARDED_FOR,
                    );
                    let client = crate::forwarding::client_ip(
                        client_ip,
                        xff.as_deref(),
                        &table.trusted_proxies,
                    );
                    let key = split::sticky_key(&s.sticky, headers, Some(client));
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
        received_target,
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

fn run_cases(
    table: &RoutingTable,
    file: &Path,
    pins: &BTreeMap<String, Pin>,
    state: &Path,
) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}:1:1: cannot read: {e}", file.display());
            return ExitCode::from(1);
        }
    };
    let text = text.strip_prefix(crate::config::BOM).unwrap_or(&text);
    let cases = match read_cases(&file.display().to_string(), text) {
        Ok(cases) => cases,
        Err(errors) => {
            for e in errors {
                eprintln!("{e}");
            }
            return ExitCode::from(1);
        }
    };
    if cases.is_empty() {
        // A golden file emptied by mistake must not pass CI as "0 failed".
        eprintln!(
            "{}:1:1: no cases: a cases file lists at least one {{request, route, backend}}",
            file.display()
        );
        return ExitCode::from(1);
    }
    let mut failed = 0;
    for (pos, case) in &cases {
        let outcome = (|| -> Result<(), String> {
            let (method, target) = case
                .request
                .split_once(' ')
                .ok_or_else(|| format!("request {:?} must be \"METHOD /path\"", case.request))?;
            let headers = header_map(case.headers.clone())?;
            let ip = case.client_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
            let d = decide(table, method, target.trim().as_bytes(), &headers, ip, |r| {
                pins.contains_key(r)
            })
            .map_err(|e| e.to_string())?;
            let route = d.route.map_or(DEFAULT_ROUTE, |i| &table.routes[i].name);
            let backend = &*table.backends[d.backend].name;
            if route != case.route {
                // A name the table does not have is more likely a typo, or a route renamed
                // since the case was written, than a routing change.
                let unknown =
                    if case.route != DEFAULT_ROUTE && table.route_index(&case.route).is_none() {
                        format!(" (the table has no route named {:?})", case.route)
                    } else {
                        String::new()
                    };
                return Err(format!("route: want {}, got {route}{unknown}", case.route));
            }
            if let Some(want) = &case.backend {
                // Without its sticky key a split is a random pick per request: such a case
                // would pass or fail by chance, which is no way to pin routing in CI. A pinned
                // route splits nothing: it is served by `default`.
                let keyless = d.route.map(|i| &table.routes[i]).and_then(|r| {
                    if pins.contains_key(&*r.name) {
                        return None;
                    }
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
                    // A pin in a running proxy's state file beside the table is easily
                    // forgotten when the golden cases run on an operator's machine.
                    let pinned = match d.route.map(|i| &*table.routes[i].name) {
                        Some(r) if pins.contains_key(r) => {
                            format!(" (route {r} is pinned to default in {})", state.display())
                        }
                        _ => String::new(),
                    };
                    return Err(format!("backend: want {want}, got {backend}{pinned}"));
                }
            }
            Ok(())
        })();
        match outcome {
            Ok(()) => outln!("ok    {}", case.request),
            Err(e) => {
                failed += 1;
                outln!(
                    "FAIL  {} ({}:{}:{}): {e}",
                    case.request,
                    file.display(),
                    pos.line,
                    pos.col
                );
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

/// The cases of a cases file, each with where it starts; or every case that does not read as
/// one (each at its fault), so that a file with several is fixed in one go.
fn read_cases(file: &str, text: &str) -> Result<Vec<(Pos, Case)>, Vec<ConfigError>> {
    let at = |pos: Pos, message: String| ConfigError {
        file: file.to_string(),
        pos,
        message,
    };
    let items: Vec<serde_yaml::Value> = serde_yaml::from_str(text).map_err(|e| {
        let pos = e.location().map_or(Pos { line: 1, col: 1 }, |l| Pos {
            line: l.line(),
            col: l.column(),
        });
        let message = config::clean_serde_message(&e.to_string());
        // serde_yaml names the top-level list's items `.[N]`: the file's `cases[N]`.
        let message = match message.strip_prefix(".[") {
            Some(rest) => format!("cases[{rest}"),
            None => message,
        };
        vec![at(pos, message)]
    })?;
    let map = SourceMap::new(text);
    let mut cases = Vec::with_capacity(items.len());
    let mut errors = Vec::new();
    for (i, item) in items.iter().enumerate() {
        // Read from its own text, as `check` reads a route: serde then names the key at fault.
        let read = serde_yaml::to_string(item)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_yaml::from_str::<Case>(&t).map_err(|e| e.to_string()));
        match read {
            // A request that is not `METHOD /path` is an error of the file, as a wrong type.
            Ok(case) if case.request.split_once(' ').is_none() => errors.push(at(
                map.pos(&format!("{i}.request")),
                format!(
                    "cases[{i}].request: {:?} is not \"METHOD /path\"",
                    case.request
                ),
            )),
            // Where a case stands is where its request is written.
            Ok(case) => cases.push((map.key_pos(&format!("{i}.request")), case)),
            Err(e) => {
                let message = config::clean_serde_message(&e);
                let (inner, own) = config::split_serde_path(&message);
                let node = match inner {
                    Some(inner) => format!("{i}.{}", inner.replace('[', ".").replace(']', "")),
                    None => i.to_string(),
                };
                let pos = match config::backticked(own, "unknown field `") {
                    Some(key) => map.key_pos(&format!("{node}.{key}")),
                    None => map.pos(&node),
                };
                let shown = match inner {
                    Some(inner) => format!("cases[{i}].{inner}"),
                    None => format!("cases[{i}]"),
                };
                errors.push(at(pos, format!("{shown}: {own}")));
            }
        }
    }
    if errors.is_empty() {
        Ok(cases)
    } else {
        Err(errors)
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
    let pins = pins(&a.config.config, a.state.as_deref());
    // As sent: methods are case-sensitive (RFC 9110 §9.1), and so is the proxy's matching.
    let method = a.method.as_str();
    // Bytes, not text: a client may send what is not UTF-8, and Pingora has a say about it.
    let target = a.path.as_encoded_bytes();
    let shown = shown(target);
    let d = match decide(&table, method, target, &headers, a.client_ip, |r| {
        pins.contains_key(r)
    }) {
        Ok(d) => d,
        Err(e) => {
            outln!("{method} {shown}\n  {e}; sent nowhere");
            return ExitCode::SUCCESS;
        }
    };
    let backend = &table.backends[d.backend];
    outln!("{method} {shown}");
    if d.received_target.as_bytes() != target {
        outln!(
            "  target:   {} ({})",
            d.received_target,
            received_note(target, &d.received_target)
        );
    }
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
        (None, Some(h)) if h.is_empty() => outln!("  Host:     empty (the client's, kept)"),
        (None, Some(h)) => outln!("  Host:     {} (the client's)", h.to_str().unwrap_or("?")),
        (None, None) => outln!(
            "  Host:     the client's Host, kept (this dry run was given none: pass -H 'Host: …'; a real HTTP/1.1 request without one is answered 400)"
        ),
    }
    ExitCode::SUCCESS
}

/// A target as given, its bytes that are not UTF-8 and its control characters written `\xNN`.
fn shown(target: &[u8]) -> String {
    let mut s = String::with_capacity(target.len());
    for chunk in target.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_ascii_control() {
                s.push_str(&format!("\\x{:02X}", c as u32));
            } else {
                s.push(c);
            }
        }
        for b in chunk.invalid() {
            s.push_str(&format!("\\x{b:02X}"));
        }
    }
    s
}

/// What Pingora changed of the target before the proxy saw it.
fn received_note(given: &[u8], received: &str) -> &'static str {
    let fragment = given.contains(&b'#');
    let before = given.split(|&b| b == b'#').next().unwrap_or_default();
    match (fragment, before != received.as_bytes()) {
        (true, false) => "as Pingora hands it on: the #fragment dropped",
        (true, true) => {
            "as Pingora hands it on: the request line did not parse, so Pingora percent-encoded \
             the target and parsed it again; the #fragment dropped"
        }
        _ => {
            "as Pingora hands it on: the request line did not parse, so Pingora percent-encoded \
             the target and parsed it again"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> RoutingTable {
        let yaml = "backends:\n  legacy: {url: 'http://127.0.0.1:9001'}\n  new: {url: 'http://127.0.0.1:9002', trailing_slash: add}\n\
                    default: legacy\nroutes:\n  - {name: bookings, path: /bookings, to: new}\n  - {name: departures, path: /departures, to: new}\n";
        let (f, s) = config::parse("t.yaml", yaml).unwrap();
        RoutingTable::build(f, &s).unwrap_or_else(|e| panic!("{e}"))
    }

    /// (route, upstream target) as the proxy would pick them, or who answers instead.
    fn goes(target: &[u8], headers: &[(&str, &str)]) -> Result<(String, String), Answered> {
        let t = table();
        let headers =
            header_map(headers.iter().map(|(k, v)| (k.to_string(), v.to_string()))).unwrap();
        let ip = IpAddr::from([127, 0, 0, 1]);
        let d = decide(&t, "GET", target, &headers, ip, |_| false)?;
        let route = d.route.map_or(DEFAULT_ROUTE, |i| &t.routes[i].name);
        Ok((route.to_string(), d.upstream_target))
    }

    /// Refused by Pingora's parser, answered the proxy's JSON 400.
    fn pingora_400(target: &[u8]) -> bool {
        matches!(
            goes(target, &[]),
            Err(Answered::Strangler(e)) if e.starts_with("400 bad_request") && e.contains("Pingora's HTTP/1 parser")
        )
    }

    /// A `sticky: ip` split is decided on the client that `X-Forwarded-For` names when the
    /// peer is a trusted proxy, and on the peer otherwise, as the proxy decides it.
    #[test]
    fn an_ip_split_behind_a_trusted_proxy_is_decided_on_the_forwarded_client() {
        let yaml = |trusted: &str| {
            format!(
                "backends:\n  legacy: {{url: 'http://127.0.0.1:9001'}}\n  new: {{url: 'http://127.0.0.1:9002'}}\n\
                 default: legacy\n{trusted}routes:\n  - {{name: ip, path: /ip, to: new, split: 50}}\n"
            )
        };
        let build = |y: &str| {
            let (f, s) = config::parse("t.yaml", y).unwrap();
            RoutingTable::build(f, &s).unwrap_or_else(|e| panic!("{e}"))
        };
        let behind = build(&yaml("trusted_proxies: [127.0.0.1]\n"));
        let direct = build(&yaml(""));
        let lb: IpAddr = "127.0.0.1".parse().unwrap();
        let side = |t: &RoutingTable, peer: IpAddr, xff: Option<&str>| {
            let mut headers = HeaderMap::new();
            headers.insert("host", "h".parse().unwrap());
            if let Some(x) = xff {
                headers.insert("x-forwarded-for", x.parse().unwrap());
            }
            decide(t, "GET", b"/ip", &headers, peer, |_| false)
                .unwrap()
                .to_target
        };
        let clients: Vec<IpAddr> = (1..=40)
            .map(|i| format!("203.0.113.{i}").parse().unwrap())
            .collect();
        let mut sides = std::collections::HashSet::new();
        for &c in &clients {
            let forwarded = side(&behind, lb, Some(&c.to_string()));
            assert_eq!(forwarded, side(&behind, c, None), "{c} behind the proxy");
            // An untrusted peer's X-Forwarded-For is not believed.
            assert_eq!(
                side(&direct, lb, Some(&c.to_string())),
                side(&direct, lb, None)
            );
            sides.insert(forwarded);
        }
        assert_eq!(
            sides.len(),
            2,
            "40 clients land on both sides of a 50 % split"
        );
    }

    #[test]
    fn a_fragment_is_dropped_before_routing_as_pingora_does() {
        for (target, route, upstream) in [
            ("/bookings#x", "bookings", "/bookings/"),
            ("/departures#/x/y", "departures", "/departures/"),
            ("/x#/../../bookings", "default", "/x"),
            ("/bookings/42?q#frag", "bookings", "/bookings/42/?q"),
            ("/bookings/42#", "bookings", "/bookings/42/"),
        ] {
            assert_eq!(
                goes(target.as_bytes(), &[]),
                Ok((route.to_string(), upstream.to_string())),
                "{target}"
            );
        }
    }

    #[test]
    fn what_pingora_refuses_is_answered_by_pingora_and_what_it_re_encodes_is_forwarded_so() {
        for target in [
            &b"/bookings/a`b"[..],
            b"/bookings/a<b",
            b"/bookings/a>b",
            b"/bookings/\xe9",
            b"/bookings/\x80",
            b"/bookings/\xff",
            b"/bookings/\xc3",
            b"/bookings?q=\"x\"",
            b"/bookings?q=<x>",
            b"/bookings?q=\xe9",
        ] {
            assert!(pingora_400(target), "{}", shown(target));
        }
        // A raw space: Pingora percent-encodes it and the proxy forwards that.
        assert_eq!(
            goes(b"/bookings/42 extra", &[]),
            Ok(("bookings".to_string(), "/bookings/42%20extra/".to_string()))
        );
        // Only a head httparse refuses is re-encoded, and then `<` with the space: so `a<b` is
        // refused but `a b<c` forwarded.
        assert_eq!(
            goes(b"/bookings/a b<c", &[]),
            Ok(("bookings".to_string(), "/bookings/a%20b%3Cc/".to_string()))
        );
        // Valid UTF-8 passes Pingora, and is forwarded as the escapes it is routed by.
        assert_eq!(
            goes("/bookings/caf\u{e9}".as_bytes(), &[]),
            Ok(("bookings".to_string(), "/bookings/caf%C3%A9/".to_string()))
        );
        // Heads Pingora refuses for their headers, before strangler's own checks: the
        // proxy's JSON answers all the same, as it would have given them.
        let by_parser = |r: Result<_, Answered>, want: &str| {
            matches!(r, Err(Answered::Strangler(e))
                if e.starts_with(want) && e.contains("Pingora's HTTP/1 parser"))
        };
        assert!(by_parser(
            goes(b"/bookings", &[("Host", "a"), ("Host", "b")]),
            "400 bad_request"
        ));
        assert!(by_parser(
            goes(b"/bookings", &[("Content-Length", "1, 2")]),
            "400 bad_request"
        ));
        let long = format!("/bookings/{}", "a".repeat(70_000));
        assert!(by_parser(goes(long.as_bytes(), &[]), "414 uri_too_long"));
        // strangler's own refusals stay its own.
        assert!(matches!(
            goes(b"/bookings/../x", &[]),
            Err(Answered::Strangler(e)) if e.starts_with("400 bad_request")
        ));
        let t = table();
        for target in [&b"example.com:443"[..], b"/bookings"] {
            let connect = decide(
                &t,
                "CONNECT",
                target,
                &HeaderMap::new(),
                IpAddr::from([127, 0, 0, 1]),
                |_| false,
            );
            assert!(
                matches!(&connect, Err(Answered::Strangler(e)) if e.starts_with("400 bad_request: CONNECT")),
                "{connect:?}"
            );
        }
        // A target written as a fragment reaches the hooks as `/`; it is not origin-form.
        assert!(matches!(
            goes(b"#x", &[]),
            Err(Answered::Strangler(e)) if e == "400 bad_request: request target must be an absolute path (origin-form)"
        ));
        // A line feed would end the request line: what follows it is no part of this request.
        // A bare CR is refused by the parser, as the proxy's refuses it.
        assert!(matches!(
            goes(b"/a\rb", &[]),
            Err(Answered::Strangler(e)) if e.starts_with("400 bad_request")
        ));
        for target in [
            &b"/users/9 HTTP/1.1\r\nX-Client-Id: z\r\n\r\nGET /bookings"[..],
            b"/a\nb",
        ] {
            assert!(
                matches!(goes(target, &[]), Err(Answered::Unsendable(_))),
                "{:?}",
                goes(target, &[])
            );
        }
        let e = goes(b"/bookings/a`b", &[]).unwrap_err().to_string();
        assert!(
            e.starts_with("answered by strangler: 400 bad_request: the request is malformed (Pingora's HTTP/1 parser refuses the head, before routing: "),
            "{e}"
        );
    }

    #[test]
    fn explain_shows_bytes_that_are_not_utf8_and_says_what_pingora_changed() {
        assert_eq!(shown(b"/a\xe9b/caf\xc3\xa9"), "/a\\xE9b/caf\u{e9}");
        assert_eq!(shown(b"/a\rb\n\x7f"), "/a\\x0Db\\x0A\\x7F");
        assert_eq!(
            received_note(b"/bookings#x", "/bookings"),
            "as Pingora hands it on: the #fragment dropped"
        );
        assert!(received_note(b"/a b", "/a%20b").contains("percent-encoded the target"));
    }
}
