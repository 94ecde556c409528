//! The routing table that requests use: `routing.yaml` validated into backends, routes and a
//! segment trie, built off to the side and published whole (see `reload.rs`). Owns every
//! cross-field rule of SPEC §2 and the upstream path a request is sent with. Holds no live state
//! (pins, counters and metrics live in `state.rs`, so a table can be rebuilt at any time), except
//! the backends' resolved addresses, which the DNS refresh replaces in place (`dns.rs`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::HeaderName;

use crate::config::{
    parse_duration, ConfigError, ConfigErrors, PercentSpec, RoutingFile, Source, TrailingSlash,
    Unread,
};
use crate::matching::{parse_pattern, Constraint, PatternSegment, RouteTrie};
use crate::path::NormalPath;

/// The reserved route name of requests no route matches.
pub const DEFAULT_ROUTE: &str = "default";
/// The backend label of requests the proxy answered itself, before choosing a backend.
pub const NO_BACKEND: &str = "none";

const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An upstream service.
#[derive(Debug, Clone)]
pub struct Backend {
    pub name: Arc<str>,
    /// `scheme://authority` as normalised from `url` (no trailing slash).
    pub url: String,
    pub tls: bool,
    /// The URL's host, without IPv6 brackets: the TLS SNI, and what `Set-Cookie` Domain is
    /// compared with.
    pub host: String,
    pub port: u16,
    /// Every address the host resolves to: resolved once per table build (DNS is never on the
    /// request path), and again every few seconds in the background (`dns.rs`).
    pub addrs: crate::dns::Addresses,
    /// `Host` sent upstream; `None` keeps the client's.
    pub host_header: Option<String>,
    /// The TLS server name: `host_header`'s host (no port, no IPv6 brackets), else `host`.
    pub sni: String,
    pub trailing_slash: TrailingSlash,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    /// Prefixes of `Location` values that point at this backend (`http://h:p`, `https://h:p`,
    /// and `http://h` when the port is the scheme's default).
    pub location_prefixes: Vec<String>,
}

impl Backend {
    /// `host[:port]` of `url`, the scheme's default port left out (as a client writes a Host):
    /// the `Host` sent when neither the backend's `host` setting nor the client names one (an
    /// HTTP/1.0 client may send none).
    pub fn authority(&self) -> &str {
        let a = self.url.split_once("://").map_or("", |(_, a)| a);
        a.strip_suffix(if self.tls { ":443" } else { ":80" })
            .unwrap_or(a)
    }
}

/// Where a split's sticky key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sticky {
    /// The client's address (see `trusted_proxies`).
    Ip,
    Header(HeaderName),
    Cookie(String),
}

/// As written in routing.yaml (`ip`, `header:NAME`, `cookie:NAME`; header names lower-cased).
impl std::fmt::Display for Sticky {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Sticky::Ip => f.write_str("ip"),
            Sticky::Header(h) => write!(f, "header:{h}"),
            Sticky::Cookie(c) => write!(f, "cookie:{c}"),
        }
    }
}

/// `split` on a route.
#[derive(Debug, Clone)]
pub struct Split {
    pub percent: f64,
    /// Buckets `0..threshold` (of 10 000) go to `to`.
    pub threshold: u32,
    pub sticky: Sticky,
}

/// The buckets (of 10 000) a split sends to `to`: those below `percent × 100` (SPEC §5), so
/// `12.341` takes 0..=1234 and `0.001` takes bucket 0. Worked out in millionths of a percent,
/// not in floating point, where `0.07 × 100` would be `7.000000000000001` and take bucket 7.
fn split_threshold(percent: f64) -> u32 {
    let millionths = (percent * 1_000_000.0).round() as u64;
    millionths.div_ceil(10_000) as u32
}

/// `rollback` on a route.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoRollback {
    /// Failure share, in percent as written (`7` for `7%`), at or above which the route is
    /// pinned.
    pub error_rate_percent: f64,
    pub min_requests: u64,
    pub window: Duration,
}

/// A route as the proxy uses it.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: Arc<str>,
    /// The pattern as written in the file.
    pub path: String,
    pub pattern: Vec<PatternSegment>,
    pub methods: Option<Vec<String>>,
    pub exact: bool,
    pub to: usize,
    pub split: Option<Split>,
    pub shadow: Option<usize>,
    pub shadow_ignore: Vec<String>,
    pub failover: bool,
    pub rewrite: Option<String>,
    pub rollback: Option<AutoRollback>,
}

/// The state SPEC §5 derives for a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RouteState {
    Legacy,
    Shadow,
    Canary,
    New,
    RolledBack,
}

impl RouteState {
    pub const ALL: [RouteState; 5] = [
        RouteState::New,
        RouteState::Canary,
        RouteState::Shadow,
        RouteState::Legacy,
        RouteState::RolledBack,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RouteState::Legacy => "legacy",
            RouteState::Shadow => "shadow",
            RouteState::Canary => "canary",
            RouteState::New => "new",
            RouteState::RolledBack => "rolled_back",
        }
    }
}

/// A CIDR block of `trusted_proxies`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(a) & mask == u32::from(b) & mask
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(b) & mask
            }
            _ => false,
        }
    }
}

/// The validated table.
#[derive(Debug)]
pub struct RoutingTable {
    pub backends: Vec<Backend>,
    pub default: usize,
    pub routes: Vec<Route>,
    pub trusted_proxies: Vec<Cidr>,
    /// The file it was read from, and the hex SHA-256 of its bytes.
    pub file: String,
    pub sha256: String,
    trie: RouteTrie,
    /// Route index by name.
    names: HashMap<Arc<str>, usize, ahash::RandomState>,
}

/// The server name Pingora's rustls connector sends for `sni`: the `_` of the leftmost label
/// of a name with three labels or more become `-` (`replace_leftmost_underscore` in
/// pingora-core's `connectors::tls`, a private module).
fn sent_server_name(sni: &str) -> String {
    match sni.split_once('.') {
        Some((leftmost, rest)) if rest.contains('.') && leftmost.contains('_') => {
            format!("{}.{rest}", leftmost.replace('_', "-"))
        }
        _ => sni.to_string(),
    }
}

impl RoutingTable {
    /// Validates what [`crate::config::read_checked`] read. A file refused only for keys that
    /// can be taken out (unknown keys, optional keys of the wrong type) is also validated
    /// without them, and those errors join the schema's, in file order.
    pub fn build_checked(
        read: Result<(RoutingFile, Source), Unread>,
    ) -> Result<Self, ConfigErrors> {
        match read {
            Ok((file, source)) => Self::build(file, &source),
            Err(unread) => {
                let mut errors = unread.errors.0;
                if let Some(rest) = unread.without_faulty_keys {
                    let (file, source) = *rest;
                    if let Err(more) = Self::build(file, &source) {
                        errors.extend(more.0);
                        errors.sort_by_key(|e| (e.pos.line, e.pos.col));
                    }
                }
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Validates `file` into a table, reporting every error found (not just the first).
    /// Backends are not resolved: see [`RoutingTable::resolve`].
    pub fn build(file: RoutingFile, source: &Source) -> Result<Self, ConfigErrors> {
        let mut errors = Vec::new();
        let mut backends = Vec::new();
        let mut by_name: HashMap<String, usize, ahash::RandomState> = HashMap::default();
        if file.backends.is_empty() {
            errors.push(source.error_at("backends", "at least one backend is required"));
        }
        for (name, spec) in &file.backends {
            let at = |field: &str| format!("backends.{name}.{field}");
            if name == NO_BACKEND {
                errors.push(source.error_at_key(
                    &format!("backends.{name}"),
                    format!("backend name {name:?} is reserved"),
                ));
            } else if name.is_empty() {
                errors.push(
                    source.error_at_key(&format!("backends.{name}"), "a backend needs a name"),
                );
            }
            // A bad URL is reported and the backend kept, so that the routes using it are still
            // checked (their conflicts too); the table is refused anyway.
            let parsed = parse_url(&spec.url).unwrap_or_else(|msg| {
                errors.push(source.error_at(&at("url"), msg));
                ParsedUrl::default()
            });
            let mut duration = |field: &str, v: &Option<String>, dflt| match v {
                None => dflt,
                Some(s) => parse_duration(s).unwrap_or_else(|msg| {
                    errors.push(source.error_at(&at(field), msg));
                    dflt
                }),
            };
            let connect_timeout = duration(
                "connect_timeout",
                &spec.connect_timeout,
                DEFAULT_CONNECT_TIMEOUT,
            );
            let timeout = duration("timeout", &spec.timeout, DEFAULT_TIMEOUT);
            if let Some(h) = &spec.host {
                // The rule the proxy applies to a client's Host (`h:99999` is refused there).
                if !crate::forwarding::host_value_ok(h.as_bytes()) || h.is_empty() {
                    errors.push(source.error_at(&at("host"), format!("{h:?} is not a valid Host")));
                }
            }
            let sni = spec
                .host
                .as_deref()
                .and_then(|h| h.parse::<http::uri::Authority>().ok())
                .map(|a| {
                    a.host()
                        .trim_start_matches('[')
                        .trim_end_matches(']')
                        .to_string()
                })
                .unwrap_or_else(|| parsed.host.clone());
            // rustls takes a DNS name or a full IP address as the server name, the name Pingora
            // sends: anything else fails every connection with a 502, though the system
            // resolver reads `127.1` or `0x7f.0.0.1` as 127.0.0.1 for plain http.
            if parsed.tls
                && !sni.is_empty()
                && pingora_core::tls::ServerName::try_from(sent_server_name(&sni)).is_err()
            {
                let field = if spec.host.is_some() { "host" } else { "url" };
                errors.push(source.error_at(
                    &at(field),
                    format!(
                        "{sni:?} cannot be the TLS server name of an https backend: write a DNS name or the full IP address (127.0.0.1, not 127.1)"
                    ),
                ));
            }
            by_name.insert(name.clone(), backends.len());
            backends.push(Backend {
                name: name.as_str().into(),
                url: parsed.origin.clone(),
                tls: parsed.tls,
                sni,
                host: parsed.host,
                port: parsed.port,
                addrs: Default::default(),
                host_header: spec.host.clone(),
                trailing_slash: spec.trailing_slash,
                connect_timeout,
                timeout,
                location_prefixes: parsed.location_prefixes,
            });
        }

        // `at` (where the name was written) is formatted only for an error.
        let lookup =
            |errors: &mut Vec<ConfigError>, name: &str, at: &dyn Fn() -> String| -> Option<usize> {
                let found = by_name.get(name).copied();
                if found.is_none() && !file.backends.contains_key(name) {
                    let known: Vec<&str> = file.backends.keys().map(String::as_str).collect();
                    errors.push(source.error_at(
                        &at(),
                        format!(
                            "backend {name:?} is not defined (backends: {})",
                            known.join(", ")
                        ),
                    ));
                }
                found
            };

        let default = match &file.default {
            Some(d) => lookup(&mut errors, d, &|| "default".to_string()),
            None => {
                errors.push(source.error_at_start(crate::config::DEFAULT_MISSING));
                None
            }
        };

        let trusted_proxies = file
            .trusted_proxies
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                parse_cidr(s)
                    .map_err(|m| errors.push(source.error_at(&format!("trusted_proxies.{i}"), m)))
                    .ok()
            })
            .collect();

        // Unnamed routes are named by their path; those sharing one (a `methods` route beside
        // the route that serves the path's other methods, or GET on one backend and POST on
        // another) would share a name: see `default_name`.
        let mut unnamed_paths: HashMap<&str, usize, ahash::RandomState> = HashMap::default();
        for r in file.routes.iter().filter(|r| r.name.is_none()) {
            *unnamed_paths.entry(r.path.as_str()).or_default() += 1;
        }
        let unnamed: Vec<bool> = file.routes.iter().map(|r| r.name.is_none()).collect();
        let path_shared: Vec<bool> = file
            .routes
            .iter()
            .map(|r| unnamed_paths.get(r.path.as_str()).is_some_and(|&n| n > 1))
            .collect();

        let mut routes: Vec<Route> = Vec::with_capacity(file.routes.len());
        let mut trie = RouteTrie::default();
        let mut names: HashMap<Arc<str>, usize, ahash::RandomState> =
            HashMap::with_capacity_and_hasher(file.routes.len(), Default::default());
        let mut claimed: Vec<Claim> = Vec::with_capacity(file.routes.len());
        for (i, mut spec) in file.routes.into_iter().enumerate() {
            let at = |field: &str| format!("routes.{i}.{field}");
            let before = errors.len();
            if !spec.path.starts_with('/') {
                errors.push(source.error_at(&at("path"), "path must start with '/'"));
            }
            let mut path_ok = errors.len() == before;
            let pattern = parse_pattern(&spec.path).unwrap_or_else(|m| {
                errors.push(source.error_at(&at("path"), m));
                path_ok = false;
                Vec::new()
            });
            let name: Arc<str> = match &spec.name {
                Some(n) => n.as_str().into(),
                None => default_name(&spec.path, spec.methods.as_deref(), path_shared[i]).into(),
            };
            // Formatted only for an error.
            let name_at = || {
                if spec.name.is_some() {
                    at("name")
                } else {
                    at("path")
                }
            };
            if *name == *DEFAULT_ROUTE {
                errors.push(source.error_at(&name_at(), "route name \"default\" is reserved"));
            } else if name.is_empty() || name.chars().any(char::is_control) {
                errors.push(
                    source.error_at(&name_at(), "route name must be printable and non-empty"),
                );
            } else if let Some(&first) = names.get(&*name) {
                // Two unnamed routes named alike are one path with the same methods: the
                // conflict check below says so, and naming them would not help.
                if !(spec.name.is_none() && unnamed[first]) {
                    errors.push(source.error_at(
                        &name_at(),
                        format!(
                            "duplicate route name {name:?} (also routes[{first}] at line {}){}",
                            source.pos(&format!("routes.{first}")).line,
                            if spec.name.is_none() {
                                "; give one of them a `name`"
                            } else {
                                ""
                            }
                        ),
                    ));
                }
            } else {
                names.insert(name.clone(), i);
            }
            // Upper-cased in place: the file's strings become the table's.
            let methods = spec.methods.take().map(|ms| {
                if ms.is_empty() {
                    errors.push(source.error_at(
                        &at("methods"),
                        "methods is empty: omit it to serve every method",
                    ));
                }
                let mut listed: Vec<String> = Vec::with_capacity(ms.len());
                for (j, mut up) in ms.into_iter().enumerate() {
                    let not_method = up.is_empty()
                        || !up
                            .bytes()
                            .all(|b| b.is_ascii_alphabetic() || b == b'-' || b == b'_');
                    // The message quotes the method as written.
                    let not_method = not_method.then(|| format!("{up:?} is not an HTTP method"));
                    up.make_ascii_uppercase();
                    let why = if not_method.is_some() {
                        not_method
                    } else if up == "CONNECT" {
                        Some("CONNECT is answered 400 before routing: no route serves it".into())
                    } else if listed.contains(&up) {
                        Some(format!("{up} is listed twice"))
                    } else {
                        None
                    };
                    if let Some(why) = why {
                        errors.push(source.error_at(&format!("routes.{i}.methods.{j}"), why));
                    }
                    listed.push(up);
                }
                listed
            });
            let to = lookup(&mut errors, &spec.to, &|| at("to"));
            let shadow = spec
                .shadow
                .as_ref()
                .and_then(|s| lookup(&mut errors, s, &|| at("shadow")));
            // `shadow` equal to `to` is allowed: the part of a split that `default` serves is
            // shadowed, and a request `to` serves itself is not copied (a cut-over that removes
            // `split` may leave it). A shadow that no request could ever reach is refused:
            // the route would show as `shadow` while nothing is compared.
            if let (Some(sh), Some(t), Some(d)) = (shadow, to, default) {
                if sh == t && t == d {
                    errors.push(source.error_at(
                        &at("shadow"),
                        format!(
                            "shadow {:?} is the backend that serves every request of this route (its `to`, and the default): nothing would be compared",
                            spec.shadow.as_deref().unwrap_or_default()
                        ),
                    ));
                }
            }
            if shadow.is_some()
                && methods
                    .as_ref()
                    .is_some_and(|ms| !ms.iter().any(|m| m == "GET" || m == "HEAD"))
            {
                errors.push(source.error_at(
                    &at("shadow"),
                    "shadow copies GET and HEAD requests only, and this route's `methods` have neither",
                ));
            }
            // `shadow_ignore` without `shadow` and `sticky` without `split` are left-overs of a
            // migration step (README, "Migrating a resource"): kept, without effect.
            for (j, p) in spec.shadow_ignore.iter().enumerate() {
                if let Err(m) = check_json_pointer(p) {
                    errors.push(source.error_at(&format!("routes.{i}.shadow_ignore.{j}"), m));
                }
            }
            // `sticky` is checked whatever `split` holds: a bad percentage must not hide it.
            let sticky = match spec.sticky.as_deref().map(parse_sticky) {
                None => Sticky::Ip,
                Some(Ok(s)) => s,
                Some(Err(m)) => {
                    errors.push(source.error_at(&at("sticky"), m));
                    Sticky::Ip
                }
            };
            let split = match spec.split.as_ref().map(PercentSpec::percent) {
                Some(Err(m)) => {
                    errors.push(source.error_at(&at("split"), format!("split {m}")));
                    None
                }
                Some(Ok(pct)) => Some(Split {
                    percent: pct,
                    threshold: split_threshold(pct),
                    sticky,
                }),
                None => None,
            };
            if let Some(rw) = &spec.rewrite {
                if pattern
                    .iter()
                    .any(|s| matches!(s, PatternSegment::Param(_)))
                {
                    errors.push(source.error_at(
                        &at("rewrite"),
                        "rewrite cannot be used on a path with a {param}",
                    ));
                } else if !rw.starts_with('/') || rw.contains(['?', '#', '{', '}', '\\']) {
                    errors.push(source.error_at(
                        &at("rewrite"),
                        format!("rewrite {rw:?} must be a plain path starting with '/'"),
                    ));
                } else if let Some(c) = rw.chars().find(|&c| !is_path_char(c)) {
                    // An upstream request line cannot carry it: every request would fail.
                    let encoded: String =
                        c.to_string().bytes().map(|b| format!("%{b:02X}")).collect();
                    errors.push(source.error_at(
                        &at("rewrite"),
                        format!("rewrite {rw:?}: {c:?} cannot be sent in a path; write it percent-encoded ({encoded})"),
                    ));
                } else if let Err(e) = crate::path::normalize(rw) {
                    // The backend must get a path the proxy would have let through itself.
                    errors.push(source.error_at(&at("rewrite"), format!("rewrite {rw:?}: {e}")));
                }
            }
            let rollback = spec.rollback.as_ref().and_then(|r| {
                let rate = r.error_rate.percent().map_err(|m| {
                    errors.push(
                        source.error_at(&at("rollback.error_rate"), format!("error_rate {m}")),
                    );
                });
                if matches!(rate, Ok(v) if v <= 0.0) {
                    errors.push(
                        source.error_at(&at("rollback.error_rate"), "error_rate must be above 0%"),
                    );
                }
                if r.min_requests == 0 {
                    errors.push(source.error_at(
                        &at("rollback.min_requests"),
                        "min_requests must be at least 1",
                    ));
                }
                let window = parse_duration(&r.window).map_err(|m| {
                    errors.push(source.error_at(&at("rollback.window"), m));
                });
                Some(AutoRollback {
                    error_rate_percent: rate.ok()?,
                    min_requests: r.min_requests,
                    window: window.ok()?,
                })
            });
            // The conflict check runs even when the route has other errors, so that one run
            // reports them all. Trie values index `claimed`; when the build succeeds every route
            // claimed its pattern and was pushed, so they index `routes` too.
            let mut claims = false;
            if path_ok {
                let constraint = Constraint {
                    exact: spec.exact,
                    methods: methods.clone(),
                };
                if let Err(c) = trie.insert(&pattern, constraint, claimed.len()) {
                    let (other_name, other_path) = match &claimed[c.existing] {
                        Claim::Route(k) => (&routes[*k].name, routes[*k].path.as_str()),
                        Claim::Refused(name, path) => (name, path.as_str()),
                    };
                    // `exact` is no tiebreaker (SPEC §3): the message says so when only one of
                    // the two is.
                    let (both, note) = match (spec.exact, c.existing_exact) {
                        (true, true) => (", both exact,", ""),
                        (false, false) => ("", ""),
                        _ => ("", "; `exact` on one of them does not set them apart"),
                    };
                    // Two routes of one name (an error of its own) are told apart by path.
                    let message = if *other_name == name && other_path == spec.path {
                        format!(
                            "route {name:?} is written twice: same path{both} and overlapping methods{note}"
                        )
                    } else if *other_name == name {
                        format!(
                            "route {name:?} ({}) conflicts with the other route named {name:?} ({other_path}): same path pattern{both} and overlapping methods{note}",
                            spec.path
                        )
                    } else {
                        format!(
                            "route {name:?} conflicts with route {other_name:?} ({other_path}): same path pattern{both} and overlapping methods{note}"
                        )
                    };
                    errors.push(source.error_at(&at("path"), message));
                } else {
                    // The index the route gets if it has no other error (pushed below).
                    claimed.push(Claim::Route(routes.len()));
                    claims = true;
                }
            }
            let to = match to {
                Some(to) if errors.len() == before => to,
                _ => {
                    if claims {
                        *claimed.last_mut().expect("pushed above") =
                            Claim::Refused(name, spec.path);
                    }
                    continue;
                }
            };
            routes.push(Route {
                name,
                path: spec.path,
                pattern,
                methods,
                exact: spec.exact,
                to,
                split,
                shadow,
                shadow_ignore: spec.shadow_ignore,
                failover: spec.failover,
                // In the form the proxy forwards paths: `/v2//x` is sent as `/v2/x`.
                rewrite: spec.rewrite.map(|r| {
                    let normal =
                        crate::path::normalize(&r).map_or(r.clone(), |p| p.path().to_string());
                    normal.trim_end_matches('/').to_string()
                }),
                rollback,
            });
        }

        errors.sort_by_key(|e| (e.pos.line, e.pos.col));
        match default {
            Some(default) if errors.is_empty() => Ok(RoutingTable {
                backends,
                default,
                routes,
                trusted_proxies,
                file: source.file.clone(),
                sha256: source.sha256.clone(),
                trie,
                names,
            }),
            _ => Err(ConfigErrors(errors)),
        }
    }

    /// Resolves every backend's address. Done once per build so that DNS never runs on the
    /// request path. A name that does not resolve fails the build like any other error, unless
    /// the table `in_force` serves the same host and port: its addresses are kept then, as the
    /// DNS refresh keeps them (a DNS outage must not block an edit such as a rollback to
    /// `default`). Returns a line to log for each name kept that way.
    pub fn resolve(
        &mut self,
        source: &Source,
        in_force: Option<&RoutingTable>,
    ) -> Result<Vec<String>, ConfigErrors> {
        let mut failed = Vec::new();
        let mut kept = Vec::new();
        for b in &mut self.backends {
            let in_use = in_force.and_then(|t| {
                t.backends
                    .iter()
                    .find(|k| k.host == b.host && k.port == b.port)
            });
            let why = match crate::dns::resolve(&b.host, b.port) {
                Ok(list) => {
                    b.addrs = crate::dns::Addresses::new(list);
                    // An address passed over for a failed connection stays so across a reload.
                    if let Some(k) = in_use {
                        b.addrs.inherit(&k.addrs);
                    }
                    continue;
                }
                Err(e) => e,
            };
            match in_use.filter(|k| !k.addrs.load().is_empty()) {
                Some(k) => {
                    b.addrs = k.addrs.clone();
                    b.addrs.inherit(&k.addrs);
                    kept.push(format!(
                        "backend {:?}: cannot resolve {} ({why}); keeping the addresses in use: {:?}",
                        b.name, b.host, b.addrs
                    ));
                }
                None => failed.push(source.error_at(
                    &format!("backends.{}.url", b.name),
                    format!("cannot resolve backend {:?} ({}): {why}", b.name, b.url),
                )),
            }
        }
        if failed.is_empty() {
            Ok(kept)
        } else {
            Err(ConfigErrors(failed))
        }
    }

    /// The route for a normalised path and the method to match with.
    pub fn lookup(&self, path: &NormalPath, method: &str) -> Option<usize> {
        self.trie.lookup(path, method)
    }

    /// A backend by name.
    pub fn backend_index(&self, name: &str) -> Option<usize> {
        self.backends.iter().position(|b| &*b.name == name)
    }

    /// A route by name.
    pub fn route_index(&self, name: &str) -> Option<usize> {
        self.names.get(name).copied()
    }

    /// The state of a route, given whether it is pinned.
    pub fn state(&self, route: &Route, pinned: bool) -> RouteState {
        if pinned {
            RouteState::RolledBack
        } else if route.to == self.default {
            if route.shadow.is_some() {
                RouteState::Shadow
            } else {
                RouteState::Legacy
            }
        } else if route.split.as_ref().is_some_and(|s| s.percent < 100.0) {
            RouteState::Canary
        } else {
            RouteState::New
        }
    }

    /// Routes per state, in the order of [`RouteState::ALL`].
    pub fn state_totals(&self, pinned: impl Fn(&Route) -> bool) -> BTreeMap<RouteState, usize> {
        let mut totals: BTreeMap<RouteState, usize> =
            RouteState::ALL.iter().map(|s| (*s, 0)).collect();
        for r in &self.routes {
            *totals.entry(self.state(r, pinned(r))).or_default() += 1;
        }
        totals
    }

    /// "12 routes: 5 new, 2 canary, 1 shadow, 3 legacy, 1 rolled_back".
    pub fn summary(&self, pinned: impl Fn(&Route) -> bool) -> String {
        let totals = self.state_totals(pinned);
        let parts: Vec<String> = RouteState::ALL
            .iter()
            .map(|s| format!("{} {}", totals[s], s.as_str()))
            .collect();
        format!("{} routes: {}", self.routes.len(), parts.join(", "))
    }
}

/// The name of a route without `name`: its path (SPEC §2). When another unnamed route has the
/// same path, one with `methods` is named by them too, as a request line reads —
/// `GET,HEAD /bookings` — so that `/bookings` for GET on one backend and the rest on another
/// needs no names. The route without `methods` keeps the path. (Two unnamed routes with the
/// same path and the same methods still share a name, and overlap: both are reported.)
fn default_name<'a>(path: &'a str, methods: Option<&[String]>, shared: bool) -> Cow<'a, str> {
    match methods {
        Some(ms) if shared && !ms.is_empty() => {
            let ms: Vec<String> = ms.iter().map(|m| m.to_ascii_uppercase()).collect();
            Cow::Owned(format!("{} {path}", ms.join(",")))
        }
        _ => Cow::Borrowed(path),
    }
}

/// A route that claimed its path pattern in the trie, named in the conflict errors of the
/// routes after it: most are in the table (no copy of their name and path is kept), the others
/// were refused for another error.
enum Claim {
    /// The table's route at this index.
    Route(usize),
    /// Refused: its name and path.
    Refused(Arc<str>, String),
}

/// Whether `c` may stand for itself in a path sent upstream (RFC 3986 `pchar` and `/`; `%`
/// starts an escape).
fn is_path_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~!$&'()*+,;=:@/%".contains(c)
}

/// The path (and query) sent to `backend` for `path`. `rewrite` applies only when the request
/// goes to the route's own `to` (`use_rewrite`): a pinned, split-off or failed-over request
/// reaches `default` with the path the client sent.
pub fn upstream_path(
    route: Option<&Route>,
    use_rewrite: bool,
    backend: &Backend,
    path: &NormalPath,
) -> String {
    let mut out = String::with_capacity(path.path().len() + 16);
    match route.and_then(|r| {
        r.rewrite
            .as_deref()
            .filter(|_| use_rewrite)
            .map(|rw| (r, rw))
    }) {
        Some((r, rw)) => {
            out.push_str(rw);
            out.push_str(path.rest_from(r.pattern.len()));
            if out.is_empty() {
                out.push('/');
            }
        }
        None => out.push_str(path.path()),
    }
    match backend.trailing_slash {
        TrailingSlash::Keep => {}
        TrailingSlash::Add => {
            if !out.ends_with('/') {
                out.push('/');
            }
        }
        TrailingSlash::Strip => {
            while out.len() > 1 && out.ends_with('/') {
                out.pop();
            }
        }
    }
    if let Some(q) = path.query() {
        out.push('?');
        out.push_str(q);
    }
    out
}

#[derive(Default)]
struct ParsedUrl {
    origin: String,
    tls: bool,
    host: String,
    port: u16,
    location_prefixes: Vec<String>,
}

fn parse_url(url: &str) -> Result<ParsedUrl, String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    let tls = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        Some(s) => return Err(format!("{url:?}: scheme {s:?} is not http or https")),
        None => return Err(format!("{url:?}: needs http:// or https://")),
    };
    let auth = uri
        .authority()
        .ok_or_else(|| format!("{url:?}: needs a host"))?;
    if auth.as_str().contains('@') {
        return Err(format!("{url:?}: credentials in the URL are not supported"));
    }
    if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
        return Err(format!(
            "{url:?}: a backend URL has no path or query (use `rewrite` on a route)"
        ));
    }
    let host = auth
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return Err(format!("{url:?}: needs a host"));
    }
    if auth.host().starts_with('[') && host.parse::<std::net::Ipv6Addr>().is_err() {
        return Err(format!("{url:?}: [{host}] is not an IPv6 address"));
    }
    if host.parse::<std::net::IpAddr>().is_err() && !is_host_name(&host) {
        return Err(format!(
            "{url:?}: {host:?} is neither an IP address nor a host name (labels of letters, \
             digits, `-` and `_`, separated by dots)"
        ));
    }
    if url.contains('#') {
        return Err(format!("{url:?}: a backend URL has no fragment"));
    }
    let default_port = if tls { 443 } else { 80 };
    // Read from the text: `http::Uri` accepts any digits (or none) after the colon and reports
    // no port when they do not fit a u16, which would silently turn `:99999` into 80.
    let auth_text = auth.as_str();
    let after_host = auth_text
        .rsplit_once(']')
        .map_or(auth_text, |(_, rest)| rest);
    let port = match after_host.rsplit_once(':') {
        None => default_port,
        Some((_, p)) => p
            .parse::<u16>()
            .ok()
            .filter(|n| *n != 0 && p.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| format!("{url:?}: port {p:?} is not 1..65535"))?,
    };
    let scheme = if tls { "https" } else { "http" };
    let host_lc = auth.host().to_ascii_lowercase();
    let origin = format!("{scheme}://{host_lc}:{port}");
    // The other scheme on the same explicit port names the same address (a backend that
    // believes it is behind TLS redirects `http://h:p` to `https://h:p`): it must not leak
    // either.
    let other = if tls { "http" } else { "https" };
    let mut location_prefixes = vec![origin.clone(), format!("{other}://{host_lc}:{port}")];
    if port == default_port {
        location_prefixes.push(format!("{scheme}://{host_lc}"));
    }
    Ok(ParsedUrl {
        origin,
        tls,
        host,
        port,
        location_prefixes,
    })
}

/// A DNS name as resolvers take it (RFC 1123 §2.1): dot-separated labels of 1 to 63 letters,
/// digits and hyphens, none at either end of a label, 253 bytes at most, one final dot allowed.
/// `_` is let through: container platforms name services with it, and their resolvers answer.
/// `check` resolves nothing; a name no resolver can answer is refused here, before `run` would.
fn is_host_name(host: &str) -> bool {
    let name = host.strip_suffix('.').unwrap_or(host);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

fn parse_sticky(s: &str) -> Result<Sticky, String> {
    if s == "ip" {
        return Ok(Sticky::Ip);
    }
    if let Some(h) = s.strip_prefix("header:") {
        return HeaderName::from_bytes(h.trim().as_bytes())
            .map(Sticky::Header)
            .map_err(|_| format!("sticky {s:?}: {h:?} is not a header name"));
    }
    if let Some(c) = s.strip_prefix("cookie:") {
        let c = c.trim();
        if c.is_empty() || c.contains([';', '=', ' ', ',']) {
            return Err(format!("sticky {s:?}: {c:?} is not a cookie name"));
        }
        return Ok(Sticky::Cookie(c.to_string()));
    }
    Err(format!(
        "sticky {s:?} must be ip, header:NAME or cookie:NAME"
    ))
}

fn parse_cidr(s: &str) -> Result<Cidr, String> {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let addr: IpAddr = addr
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not an IP address or CIDR block"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = match prefix {
        None => max,
        Some(p) => p
            .parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: prefix length must be 0..{max}"))?,
    };
    Ok(Cidr { addr, prefix })
}

/// A `shadow_ignore` entry: an RFC 6901 JSON pointer to a part of the body (`/meta/id`, `~1`
/// for `/` and `~0` for `~` inside a name). The empty pointer, the whole body, is refused:
/// ignoring it would compare nothing.
fn check_json_pointer(p: &str) -> Result<(), String> {
    if p.is_empty() {
        return Err("\"\" is the whole body: ignoring it would compare nothing".into());
    }
    if !p.starts_with('/') {
        return Err(format!(
            "{p:?} is not a JSON pointer (it must start with '/')"
        ));
    }
    let mut chars = p.chars();
    while let Some(c) = chars.next() {
        if c == '~' && !matches!(chars.next(), Some('0' | '1')) {
            return Err(format!(
                "{p:?} is not a JSON pointer: '~' must be followed by 0 or 1 (~0 is '~', ~1 is '/')"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::path::normalize;

    #[test]
    fn sticky_reads_back_as_written() {
        for text in ["ip", "header:x-client-id", "cookie:sid"] {
            assert_eq!(parse_sticky(text).unwrap().to_string(), text);
        }
        assert_eq!(
            parse_sticky("header:X-Client-Id").unwrap().to_string(),
            "header:x-client-id"
        );
    }

    fn table(yaml: &str) -> RoutingTable {
        let (f, s) = parse("t.yaml", yaml).unwrap();
        RoutingTable::build(f, &s).unwrap_or_else(|e| panic!("{e}"))
    }

    fn errors(yaml: &str) -> Vec<String> {
        let (f, s) = match parse("t.yaml", yaml) {
            Ok(x) => x,
            Err(e) => return e.0.iter().map(|e| e.to_string()).collect(),
        };
        match RoutingTable::build(f, &s) {
            Ok(_) => vec![],
            Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
        }
    }

    const BASE: &str = "backends:\n  legacy: {url: http://127.0.0.1:9001}\n  new: {url: 'http://127.0.0.1:9002', trailing_slash: add}\ndefault: legacy\n";

    /// `check` lists every error in one run: unknown keys, optional keys of the wrong type and
    /// what the rest of the file gets wrong, in file order.
    #[test]
    fn unknown_keys_and_semantic_errors_are_reported_together() {
        let checked = |yaml: &str| -> Vec<String> {
            match RoutingTable::build_checked(crate::config::parse_checked("t.yaml", yaml)) {
                Ok(_) => vec![],
                Err(e) => e.0.iter().map(|e| e.to_string()).collect(),
            }
        };
        let got = checked(&format!(
            "{BASE}routes:\n  - path: /a\n    to: nope\n    bogus: 1\n    split: 200\n  - {{path: /b, to: legacy, colour: red}}\nextra: 1\n"
        ));
        let want = [
            "t.yaml:7:9: backend \"nope\" is not defined",
            "t.yaml:8:5: routes[0]: unknown field `bogus`",
            "t.yaml:9:12: split 200 is outside 0..100",
            "t.yaml:10:28: routes[1]: unknown field `colour`",
            "t.yaml:11:1: unknown field `extra`",
        ];
        crate::config::assert_each_starts_with(&got, &want);
        // An optional key of the wrong type is taken out like an unknown one.
        let got = checked(&format!(
            "{BASE}routes:\n  - {{path: /a, to: nope, split: [1], bogus: 1}}\n  - {{path: b, to: new, exact: maybe, methods: [GET, [x]]}}\n"
        ));
        let want = [
            "t.yaml:6:20: backend \"nope\" is not defined",
            "t.yaml:6:33: routes[0].split: invalid type: sequence",
            "t.yaml:6:38: routes[0]: unknown field `bogus`",
            "t.yaml:7:12: path must start with '/'",
            "t.yaml:7:31: routes[1].exact: invalid type: string \"maybe\", expected a boolean",
            "t.yaml:7:53: routes[1].methods[1]: invalid type: sequence",
        ];
        crate::config::assert_each_starts_with(&got, &want);
        // A backend named with dots, and a wrong type inside `rollback`: still taken out.
        let got = checked(
            "backends:\n  api.v2: {url: 'http://127.0.0.1:9', colour: red, trailing_slash: Add}\ndefault: api.v2\n\
             routes:\n  - {path: /a, to: api.v2, rollback: {error_rate: [5], min_requests: 1, window: 1s}}\n  - {path: /b, to: nope}\n",
        );
        let want = [
            "t.yaml:2:39: backends.api.v2: unknown field `colour`",
            "t.yaml:2:68: backends.api.v2.trailing_slash: unknown variant `Add`",
            "t.yaml:5:51: routes[0].rollback.error_rate: invalid type: sequence",
            "t.yaml:6:20: backend \"nope\" is not defined",
        ];
        crate::config::assert_each_starts_with(&got, &want);
        // A required one: what the route would mean without it is not guessed at, and the key
        // is not reported missing; the routes around it are still checked.
        for route in [
            "{path: /a, to: [nope], split: 500}",
            "{path: [a], to: nope}",
        ] {
            let got = checked(&format!(
                "{BASE}routes:\n  - {route}\n  - {{path: /b, to: nope}}\n"
            ));
            assert_eq!(got.len(), 2, "{route}: {got:#?}");
            assert!(got[0].contains("invalid type"), "{route}: {got:#?}");
            assert!(
                got[1].starts_with("t.yaml:7:20: backend \"nope\""),
                "{got:#?}"
            );
        }
        // Missing: a route's `to`, a backend's `url`, a key of a route's `rollback`. A route to
        // the backend without its `url` is no error, nor is one named like the route set aside
        // (a second one is).
        let got = checked(
            "backends:\n  legacy: {url: 'http://127.0.0.1:9'}\n  new: {timeout: 5s}\ndefault: legacy\nroutes:\n  \
             - {name: a, path: /a}\n  - {name: a, path: /b, to: new}\n  \
             - {path: /c, to: new, split: 200, rollback: {error_rate: 5%, window: 1s}}\n  - {path: /d, to: nope}\n",
        );
        let want = [
            "t.yaml:3:8: backends.new: missing field `url`",
            "t.yaml:6:5: routes[0]: missing field `to`",
            "t.yaml:7:12: duplicate route name \"a\"",
            "t.yaml:8:32: split 200 is outside 0..100",
            "t.yaml:8:47: routes[2].rollback: missing field `min_requests`",
            "t.yaml:9:20: backend \"nope\" is not defined",
        ];
        crate::config::assert_each_starts_with(&got, &want);
        // Every error inside one `rollback` block: unknown keys, a required key of the wrong
        // type or missing (a stand-in takes its place), and the block's other values' checks.
        let got = checked(&format!(
            "{BASE}routes:\n  - {{path: /a, to: new, rollback: {{error_rate: [5], bogus: 1, bogus2: 2, window: 1x}}}}\n  \
             - {{path: /b, to: new, rollback: {{error_rate: 5%, min_requests: many, window: 0s}}}}\n"
        ));
        let want = [
            "t.yaml:6:35: routes[0].rollback: missing field `min_requests`",
            "t.yaml:6:48: routes[0].rollback.error_rate: invalid type: sequence",
            "t.yaml:6:53: routes[0].rollback: unknown field `bogus`",
            "t.yaml:6:63: routes[0].rollback: unknown field `bogus2`",
            "t.yaml:6:82: duration \"1x\": unknown unit",
            "t.yaml:7:66: routes[1].rollback.min_requests: invalid type: string \"many\"",
            "t.yaml:7:80: duration \"0s\" must be at least 1ms",
        ];
        crate::config::assert_each_starts_with(&got, &want);
        assert_eq!(got.len(), want.len(), "{got:#?}");
        // A file whose rest cannot be checked still has each missing top-level key reported,
        // beside its other errors.
        for (yaml, want) in [
            (
                "routes:\n  - {path: /a, to: new, foo: 1}\n",
                &[
                    "t.yaml:1:1: missing field `backends`",
                    "t.yaml:1:1: `default` is missing",
                    "t.yaml:2:25: routes[0]: unknown field `foo`",
                ][..],
            ),
            (
                "default: legacy\nroutes:\n  - {path: /a, to: new}\n",
                &["t.yaml:1:1: missing field `backends`"],
            ),
            (
                "# nothing yet\n",
                &[
                    "t.yaml:1:1: missing field `backends`",
                    "t.yaml:1:1: `default` is missing",
                ],
            ),
        ] {
            let got = checked(yaml);
            crate::config::assert_each_starts_with(&got, want);
            assert_eq!(got.len(), want.len(), "{yaml}: {got:#?}");
        }
        // Required keys of the wrong type, more than the faults taken out one by one would
        // allow: each route is stood in for at once, and the rest is still checked.
        let mut routes: String = (0..12)
            .map(|i| format!("  - {{path: /r{i}, to: [legacy]}}\n"))
            .collect();
        routes.push_str("  - {path: /d, to: nowhere}\n");
        let got = checked(&format!("{BASE}routes:\n{routes}"));
        assert_eq!(got.len(), 13, "{got:#?}");
        assert!(
            got[12].starts_with("t.yaml:18:20: backend \"nowhere\""),
            "{got:#?}"
        );
        // The faults of both copies of a mapping written twice.
        let got = checked(
            "backends:\n  legacy: {url: 'http://127.0.0.1:9', colour: red}\n  legacy: {url: 'http://127.0.0.1:9', shade: blue}\n\
             default: legacy\nroutes:\n  - {path: /a, to: legacy, rollback: {window: 1s}, rollback: {error_rate: 5%, window: 1s}}\n",
        );
        let want = [
            "t.yaml:2:39: backends.legacy: unknown field `colour`",
            "t.yaml:3:3: backends: backend \"legacy\" is defined twice",
            "t.yaml:3:39: backends.legacy: unknown field `shade`",
            "t.yaml:6:52: routes[0]: duplicate field `rollback`",
            "t.yaml:6:62: routes[0].rollback: missing field `min_requests`",
        ];
        crate::config::assert_each_starts_with(&got, &want);
        // A key written twice: the last one is read, as the source map points there.
        let got = checked(&format!(
            "{BASE}routes:\n  - {{path: /a, to: new, to: nope}}\n  - {{path: /b, to: new, split: 200}}\n"
        ));
        let want = [
            "t.yaml:6:25: routes[0]: duplicate field `to`",
            "t.yaml:6:29: backend \"nope\" is not defined",
            "t.yaml:7:32: split 200 is outside 0..100",
        ];
        crate::config::assert_each_starts_with(&got, &want);
    }

    /// Unnamed routes that share a path are named apart by their methods (`default_name`), so
    /// that method routing on one path needs no names; a lone unnamed route keeps its path.
    #[test]
    fn unnamed_routes_on_one_path_are_named_by_their_methods() {
        let t = table(&format!(
            "{BASE}routes:\n  - {{path: /a, to: legacy}}\n  - {{path: /a, methods: [get, HEAD], to: new}}\n  \
             - {{path: /b, methods: [GET], to: new}}\n  - {{path: /b, methods: [POST], to: legacy}}\n  \
             - {{path: '/c/{{id}}', methods: [GET], to: new}}\n  \
             - {{name: d, path: /d, to: legacy}}\n  - {{path: /d, methods: [GET], to: new}}\n"
        ));
        let names: Vec<&str> = t.routes.iter().map(|r| &*r.name).collect();
        assert_eq!(
            names,
            [
                "/a",
                "GET,HEAD /a",
                "GET /b",
                "POST /b",
                "/c/{id}",
                "d",
                "/d"
            ]
        );
        let at = |path: &str, method: &str| {
            t.lookup(&normalize(path).unwrap(), method)
                .map(|i| &*t.routes[i].name)
        };
        assert_eq!(at("/a/1", "GET"), Some("GET,HEAD /a"));
        assert_eq!(at("/a/1", "DELETE"), Some("/a"));
        assert_eq!(at("/b", "GET"), Some("GET /b"));
        assert_eq!(at("/b", "POST"), Some("POST /b"));
        assert_eq!(at("/b", "PUT"), None);
        // The same path and the same methods: one route written twice (not two names to
        // tell apart: naming them would leave the overlap).
        let got = errors(&format!(
            "{BASE}routes:\n  - {{path: /a, methods: [GET], to: new}}\n  - {{path: /a, methods: [GET], to: legacy}}\n"
        ));
        assert_eq!(got.len(), 1, "{got:#?}");
        assert!(
            got[0].contains(
                "t.yaml:7:12: route \"GET /a\" is written twice: same path and overlapping methods"
            ),
            "{got:#?}"
        );
    }

    #[test]
    fn semantic_errors_point_at_the_node() {
        let cases: &[(&str, &str)] = &[
            ("routes:\n  - {path: /a, to: nope}\n", "t.yaml:6:20: backend \"nope\" is not defined"),
            ("routes:\n  - {path: /a, to: new}\n  - {path: /a, to: legacy}\n", "t.yaml:7:12: route \"/a\" is written twice"),
            ("routes:\n  - {name: x, path: /a, to: new}\n  - {name: x, path: /b, to: legacy}\n", "t.yaml:7:12: duplicate route name \"x\" (also routes[0] at line 6)"),
            ("routes:\n  - {name: x, path: /a, to: new}\n  - {name: y, path: '/a/', to: legacy}\n", "t.yaml:7:21: route \"y\" conflicts with route \"x\""),
            ("routes:\n  - {name: x, path: /a, to: new}\n  - {name: x, path: /a, to: legacy}\n", "t.yaml:7:21: route \"x\" is written twice: same path and overlapping methods"),
            ("routes:\n  - {name: x, path: /a, to: new}\n  - {name: x, path: '/a/', to: legacy}\n", "t.yaml:7:21: route \"x\" (/a/) conflicts with the other route named \"x\" (/a)"),
            ("routes:\n  - {name: x, path: /a, to: new}\n  - {name: y, path: /a, exact: true, to: legacy}\n", "route \"y\" conflicts with route \"x\" (/a): same path pattern and overlapping methods; `exact` on one of them does not set them apart"),
            ("routes:\n  - {name: x, path: /a, exact: true, to: new}\n  - {name: y, path: /a, to: legacy}\n", "route \"y\" conflicts with route \"x\" (/a): same path pattern and overlapping methods; `exact` on one of them does not set them apart"),
            ("routes:\n  - {name: x, path: /a, exact: true, to: new}\n  - {name: y, path: /a, exact: true, to: legacy}\n", "route \"y\" conflicts with route \"x\" (/a): same path pattern, both exact, and overlapping methods"),
            ("routes:\n  - {path: /a, to: new, split: 101}\n", "t.yaml:6:32: split 101 is outside 0..100"),
            ("routes:\n  - {path: '/a/{id}', to: new, rewrite: /b}\n", "t.yaml:6:41: rewrite cannot be used on a path with a {param}"),
            ("routes:\n  - {path: /a, to: new, rewrite: '/v<2'}\n", "t.yaml:6:34: rewrite \"/v<2\": '<' cannot be sent in a path; write it percent-encoded (%3C)"),
            ("routes:\n  - {path: /a, to: new, rewrite: /caf\u{e9}}\n", "t.yaml:6:34: rewrite \"/caf\u{e9}\": '\u{e9}' cannot be sent in a path; write it percent-encoded (%C3%A9)"),
            ("routes:\n  - {path: /a, to: new, rewrite: '/a b'}\n", "t.yaml:6:34: rewrite \"/a b\": ' ' cannot be sent in a path; write it percent-encoded (%20)"),
            ("routes:\n  - {path: /a, to: new, rewrite: /v2/../b}\n", "t.yaml:6:34: rewrite \"/v2/../b\": path contains a '.' or '..' segment"),
            ("routes:\n  - {path: /a, to: new, rewrite: '/v2/%2e'}\n", "rewrite \"/v2/%2e\": path contains a '.' or '..' segment"),
            ("routes:\n  - {name: default, path: /a, to: new}\n", "t.yaml:6:12: route name \"default\" is reserved"),
            ("routes:\n  - path: /a\n    to: new\n    rollback: {error_rate: 5%, min_requests: 20, window: 60}\n", "t.yaml:8:58: duration \"60\" needs a unit"),
            ("routes:\n  - {path: /a, to: new, sticky: 'tls:X'}\n", "t.yaml:6:33: "),
            ("routes:\n  - {path: /a, to: new, methods: [GET, get]}\n", "t.yaml:6:40: GET is listed twice"),
            ("routes:\n  - {path: /a, to: new, methods: [CONNECT]}\n", "t.yaml:6:35: CONNECT is answered 400"),
            ("routes:\n  - {path: /a, to: new, split: 101%}\n", "t.yaml:6:32: split 101 is outside 0..100"),
            ("routes:\n  - {path: /a, to: new, rollback: {error_rate: 150%, min_requests: 1, window: 1s}}\n", "error_rate 150 is outside 0..100"),
            ("routes:\n  - {path: /a, to: new, split: ten}\n", "t.yaml:6:32: split \"ten\" is not a percentage like 5%"),
            ("routes:\n  - {path: /a, to: legacy, shadow: legacy}\n", "t.yaml:6:36: shadow \"legacy\" is the backend that serves every request of this route"),
            ("routes:\n  - {path: /a, to: legacy, shadow: new, methods: [POST, PUT]}\n", "t.yaml:6:36: shadow copies GET and HEAD requests only"),
            ("routes:\n  - {path: /a, to: legacy, shadow: new, shadow_ignore: ['/a~2']}\n", "t.yaml:6:57: \"/a~2\" is not a JSON pointer: '~' must be followed by 0 or 1"),
            ("routes:\n  - {path: /a, to: legacy, shadow: new, shadow_ignore: ['/b~']}\n", "'~' must be followed by 0 or 1"),
            ("routes:\n  - {path: /a, to: legacy, shadow: new, shadow_ignore: ['']}\n", "\"\" is the whole body"),
            ("routes:\n  - {path: /a, to: legacy, shadow: new, shadow_ignore: [a]}\n", "\"a\" is not a JSON pointer (it must start with '/')"),
        ];
        for (routes, want) in cases {
            let errs = errors(&format!("{BASE}{routes}"));
            assert!(
                errs.iter().any(|e| e.starts_with(want) || e.contains(want)),
                "want {want:?}, got {errs:?}"
            );
        }
    }

    #[test]
    fn file_level_errors_point_at_their_key_or_the_start() {
        let errs = errors("backends:\n  legacy:\n    url: http://127.0.0.1:1\n");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("t.yaml:1:1: `default` is missing")),
            "{errs:?}"
        );
        let errs = errors("backends:\n  none:\n    url: http://127.0.0.1:1\ndefault: none\n");
        assert!(
            errs.iter()
                .any(|e| e.starts_with("t.yaml:2:3: backend name \"none\" is reserved")),
            "{errs:?}"
        );
        // DNS runs when the table is loaded (`.invalid` never resolves, RFC 6761).
        let (f, s) = parse("t.yaml", "backends:\n  legacy: {url: http://127.0.0.1:1}\n  new:\n    url: http://no-such-host.invalid:80\ndefault: legacy\n").unwrap();
        let err = RoutingTable::build(f, &s)
            .unwrap()
            .resolve(&s, None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("t.yaml:4:10: cannot resolve backend \"new\""),
            "{err}"
        );
        // A reload while the name does not resolve keeps the addresses the table in force has
        // for the same host and port, under whatever name.
        let text = "backends:\n  legacy: {url: http://127.0.0.1:1}\n  new:\n    url: http://no-such-host.invalid:80\ndefault: legacy\n";
        let (f, s) = parse("t.yaml", text).unwrap();
        let in_force = RoutingTable::build(f, &s).unwrap();
        let known: std::net::SocketAddr = "10.0.0.7:80".parse().unwrap();
        in_force.backends[1].addrs.replace(vec![known]);
        let (f, s) = parse(
            "t.yaml",
            text.replace("  new:", "  renamed:")
                .replace("legacy", "old"),
        )
        .unwrap();
        let mut next = RoutingTable::build(f, &s).unwrap();
        let kept = next.resolve(&s, Some(&in_force)).unwrap();
        assert_eq!(kept.len(), 1, "{kept:?}");
        assert!(kept[0].starts_with("backend \"renamed\": cannot resolve no-such-host.invalid"));
        assert_eq!(next.backends[1].addrs.load().as_ref(), &[known]);
        // Another port is another service: not kept.
        let (f, s) = parse("t.yaml", text.replace(":80", ":81")).unwrap();
        assert!(RoutingTable::build(f, &s)
            .unwrap()
            .resolve(&s, Some(&in_force))
            .is_err());
    }

    #[test]
    fn a_backend_with_a_bad_url_does_not_hide_its_routes_errors() {
        let errs = errors(
            "backends:\n  legacy: {url: http://127.0.0.1:1}\n  new: {url: 'http://127.0.0.1:2/api'}\ndefault: legacy\nroutes:\n  - {name: a, path: /a, to: new}\n  - {name: b, path: /a, to: new}\n",
        );
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs[0].starts_with("t.yaml:3:14: "), "{errs:?}");
        assert!(
            errs[1].starts_with("t.yaml:7:21: route \"b\" conflicts with route \"a\""),
            "{errs:?}"
        );
    }

    #[test]
    fn a_bad_split_does_not_hide_a_bad_sticky() {
        let errs = errors(&format!(
            "{BASE}routes:\n  - {{path: /a, to: new, split: ten, sticky: 'nose:x'}}\n"
        ));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("split \"ten\"")), "{errs:?}");
        assert!(errs.iter().any(|e| e.contains("t.yaml:6:45: ")), "{errs:?}");
    }

    #[test]
    fn a_routes_other_errors_do_not_hide_its_path_conflict() {
        // The conflict names the first route and its path, whether it is in the table (the
        // last two) or was refused (the others).
        for (first, second, named) in [
            ("{path: /b, to: new, shadow: ghost}", "{name: x, path: /b, to: legacy}", "route \"/b\" (/b)"),
            ("{path: /b, to: ghost}", "{name: x, path: /b, to: legacy}", "route \"/b\" (/b)"),
            ("{path: /b, to: new, split: 500}", "{name: x, path: /b, to: legacy}", "route \"/b\" (/b)"),
            ("{path: '/c/{id}', to: ghost}", "{name: x, path: '/c/{n}', to: legacy}", "route \"/c/{id}\" (/c/{id})"),
            ("{path: /b, to: new}", "{name: x, path: /b, to: new, rollback: {error_rate: 500%, min_requests: 1, window: 1s}}", "route \"/b\" (/b)"),
        ] {
            let errs = errors(&format!("{BASE}routes:\n  - {first}\n  - {second}\n"));
            assert_eq!(errs.len(), 2, "{first} / {second}: {errs:?}");
            assert!(
                errs.iter()
                    .any(|e| e.contains(&format!("conflicts with {named}: same path pattern"))),
                "{first} / {second}: {errs:?}"
            );
        }
        // One name twice on one path: the route is written twice (not "a conflicts with a").
        let errs = errors(&format!(
            "{BASE}routes:\n  - {{name: a, path: /b, to: new}}\n  - {{name: a, path: /b, to: legacy}}\n"
        ));
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert!(
            errs.iter()
                .any(|e| e.contains("route \"a\" is written twice: same path")),
            "{errs:?}"
        );
    }

    #[test]
    fn left_overs_of_a_migration_step_are_accepted() {
        // Cut over (split removed, sticky kept), shadowing stopped (shadow_ignore kept), and a
        // canary that shadows its `to` for the share `default` serves.
        let t = table(&format!(
            "{BASE}routes:\n  - {{path: /a, to: new, sticky: 'header:X-Client-Id'}}\n  - {{path: /b, to: legacy, shadow_ignore: [/id]}}\n  - {{path: /c, to: new, split: 10, shadow: new}}\n"
        ));
        assert!(t.routes[0].split.is_none());
        assert!(t.routes[1].shadow.is_none());
        assert_eq!(t.routes[2].shadow, Some(t.routes[2].to));
    }

    #[test]
    fn a_backends_authority_is_its_urls_host_and_port() {
        let t = table("backends:\n  a: {url: 'http://127.0.0.1:9001'}\n  b: {url: 'https://API.example'}\n  c: {url: 'http://[::1]:8080/'}\n  d: {url: 'http://h:80'}\n  e: {url: 'https://[::1]:443'}\n  f: {url: 'http://h:443'}\ndefault: a\n");
        let authorities: Vec<&str> = t.backends.iter().map(Backend::authority).collect();
        assert_eq!(
            authorities,
            [
                "127.0.0.1:9001",
                "api.example",
                "[::1]:8080",
                "h",
                "[::1]",
                "h:443"
            ]
        );
    }

    #[test]
    fn split_is_a_percentage_like_error_rate() {
        for (written, percent, threshold) in [
            ("10%", 10.0, 1000),
            ("12.345", 12.345, 1235),
            ("12.34", 12.34, 1234),
            ("12.341", 12.341, 1235),
            ("0.001", 0.001, 1),
            ("0.07", 0.07, 7),
            ("100", 100.0, 10_000),
            ("'0.5 %'", 0.5, 50),
            ("-0", 0.0, 0),
        ] {
            let t = table(&format!(
                "{BASE}routes:\n  - {{path: /a, to: new, split: {written}}}\n"
            ));
            let split = t.routes[0].split.as_ref().unwrap();
            assert_eq!(
                (split.percent, split.threshold),
                (percent, threshold),
                "{written}"
            );
            assert!(split.percent.is_sign_positive(), "{written}");
        }
    }

    #[test]
    fn file_level_errors() {
        let errs = errors("backends:\n  legacy: {url: 'ftp://x'}\n");
        assert!(
            errs.iter().any(|e| e.contains("`default` is missing")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.starts_with("t.yaml:2:") && e.contains("not http or https")),
            "{errs:?}"
        );
        let errs = errors("backends:\n  legacy: {url: 'http://h:1/api'}\ndefault: legacy\n");
        assert!(errs[0].contains("no path"), "{errs:?}");
        let errs =
            errors("backends:\n  legacy: {url: 'http://h:1', timeout: 3x}\ndefault: legacy\n");
        assert!(
            errs[0].starts_with("t.yaml:2:") && errs[0].contains("unknown unit"),
            "{errs:?}"
        );
        let errs =
            errors("backends: {}\ndefault: x\nroutes: [{path: /a, to: y}, {path: /b, to: z}]\n");
        assert!(errs.len() >= 3, "every error is reported: {errs:?}");
    }

    #[test]
    fn backend_ports_are_read_not_guessed() {
        for (url, want) in [
            ("http://127.0.0.1:99999", "port \"99999\" is not 1..65535"),
            ("http://127.0.0.1:65536", "port \"65536\" is not 1..65535"),
            ("http://127.0.0.1:0", "port \"0\" is not 1..65535"),
            ("http://127.0.0.1:", "port \"\" is not 1..65535"),
            ("http://[::1]:70000", "port \"70000\" is not 1..65535"),
            ("http://127.0.0.1:+9002", "port \"+9002\" is not 1..65535"),
            ("http://127.0.0.1:9001#x", "no fragment"),
            // Names no resolver answers: `check` says so, not `run`'s first lookup.
            ("http://a..b:80", "is neither an IP address nor a host name"),
            (
                "http://-bad-.example:80",
                "is neither an IP address nor a host name",
            ),
            ("http://a$b:80", "is neither an IP address nor a host name"),
            ("http://[example.com]:80", "is not an IPv6 address"),
        ] {
            let errs = errors(&format!(
                "backends:\n  legacy: {{url: '{url}'}}\ndefault: legacy\n"
            ));
            assert!(
                errs.len() == 1 && errs[0].starts_with("t.yaml:2:") && errs[0].contains(want),
                "{url}: {errs:?}"
            );
        }
        let t = table(
            "backends:\n  a: {url: 'http://[::1]:8080'}\n  b: {url: 'https://h'}\n  \
             c: {url: 'http://my_service.internal.:1'}\n  d: {url: 'http://10.0.0.1'}\ndefault: a\n",
        );
        assert_eq!(t.backends[0].port, 8080);
        assert_eq!(t.backends[1].port, 443);
        assert_eq!(t.backends[2].port, 1);
        // A `host` setting obeys the rule a client's Host does.
        for bad in ["x:99999", "caf\u{e9}.example", "a/b", ""] {
            let errs = errors(&format!(
                "backends:\n  legacy: {{url: 'http://127.0.0.1:1', host: '{bad}'}}\ndefault: legacy\n"
            ));
            assert!(
                errs.len() == 1 && errs[0].contains("is not a valid Host"),
                "{bad}: {errs:?}"
            );
        }
    }

    #[test]
    fn a_rewrite_is_kept_in_the_form_paths_are_forwarded() {
        let t = table(&format!(
            "{BASE}routes:\n  - {{path: /a, to: new, rewrite: '/v2//x/'}}\n"
        ));
        assert_eq!(t.routes[0].rewrite.as_deref(), Some("/v2/x"));
    }

    #[test]
    fn upstream_paths() {
        let t = table(&format!(
            "{BASE}routes:\n  - {{path: /departures, to: new, rewrite: /v2/departures}}\n  - {{path: /root, to: legacy, rewrite: /}}\n"
        ));
        let new = &t.backends[t.backend_index("new").unwrap()];
        let legacy = &t.backends[t.backend_index("legacy").unwrap()];
        let dep = &t.routes[0];
        let root = &t.routes[1];
        let up = |r, rw, b, p: &str| upstream_path(r, rw, b, &normalize(p).unwrap());
        assert_eq!(
            up(Some(dep), true, new, "/departures/5?x=%2F&y"),
            "/v2/departures/5/?x=%2F&y"
        );
        assert_eq!(up(Some(dep), true, new, "/departures"), "/v2/departures/");
        assert_eq!(
            up(Some(dep), false, legacy, "/departures/5/"),
            "/departures/5/"
        );
        assert_eq!(up(Some(root), true, legacy, "/root/x"), "/x");
        assert_eq!(up(Some(root), true, legacy, "/root"), "/");
        assert_eq!(up(None, false, new, "/a%2Fb"), "/a%2Fb/");
        let mut strip = new.clone();
        strip.trailing_slash = TrailingSlash::Strip;
        assert_eq!(up(None, false, &strip, "/a/?q"), "/a?q");
        assert_eq!(up(None, false, &strip, "/"), "/");
    }

    #[test]
    fn states_and_summary() {
        let t = table(&format!(
            "{BASE}routes:\n  - {{path: /a, to: new}}\n  - {{path: /b, to: new, split: 10}}\n  - {{path: /c, to: legacy, shadow: new}}\n  - {{path: /d, to: legacy}}\n  - {{path: /e, to: new}}\n"
        ));
        let pinned = |r: &Route| &*r.name == "/e";
        assert_eq!(
            t.summary(pinned),
            "5 routes: 1 new, 1 canary, 1 shadow, 1 legacy, 1 rolled_back"
        );
    }

    #[test]
    fn cidrs() {
        let c = parse_cidr("10.0.0.0/8").unwrap();
        assert!(c.contains("10.1.2.3".parse().unwrap()));
        assert!(!c.contains("11.1.2.3".parse().unwrap()));
        assert!(parse_cidr("::1").unwrap().contains("::1".parse().unwrap()));
        assert!(parse_cidr("0.0.0.0/0")
            .unwrap()
            .contains("1.2.3.4".parse().unwrap()));
        assert!(parse_cidr("10.0.0.0/33").is_err());
    }

    #[test]
    fn an_https_backend_needs_a_name_tls_can_send() {
        // The error points at the field the name came from (column 12: the url; 44: host).
        for (backend, want) in [
            (
                "{url: 'https://127.1:8443'}",
                Some("t.yaml:2:12: \"127.1\" cannot be the TLS server name"),
            ),
            (
                "{url: 'https://0x7f.0.0.1:8443'}",
                Some("t.yaml:2:12: \"0x7f.0.0.1\""),
            ),
            (
                "{url: 'https://localhost:8443', host: '127.1'}",
                Some("t.yaml:2:44: \"127.1\""),
            ),
            ("{url: 'http://127.1:8080'}", None),
            ("{url: 'https://127.0.0.1:8443'}", None),
            ("{url: 'https://[::1]:8443'}", None),
            ("{url: 'https://my_svc.internal:8443'}", None),
            ("{url: 'https://my_svc.team.internal:8443'}", None),
            ("{url: 'https://_svc.internal:8443'}", None),
            ("{url: 'https://api.svc_.corp:8443'}", None),
            (
                "{url: 'https://a_b_.x.y:8443'}",
                Some("t.yaml:2:12: \"a_b_.x.y\""),
            ),
        ] {
            let got = errors(&format!(
                "backends:\n  b: {backend}\ndefault: b\nroutes: []\n"
            ));
            match want {
                None => assert!(got.is_empty(), "{backend}: {got:?}"),
                Some(want) => assert!(
                    got.len() == 1 && got[0].starts_with(want),
                    "{backend}: {got:?}"
                ),
            }
        }
    }

    #[test]
    fn sni_is_the_host_override_without_port() {
        let sni = |host: &str| {
            let t = table(&format!(
                "backends:\n  b: {{url: 'https://10.0.0.1:8443', host: '{host}'}}\ndefault: b\n"
            ));
            t.backends[0].sni.clone()
        };
        assert_eq!(sni("api.example.com"), "api.example.com");
        assert_eq!(sni("api.example.com:8443"), "api.example.com");
        assert_eq!(sni("[::1]:8443"), "::1");
        let t = table("backends:\n  b: {url: 'https://svc.internal'}\ndefault: b\n");
        assert_eq!(t.backends[0].sni, "svc.internal");
    }
}
