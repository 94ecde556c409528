//! Shadow traffic (SPEC §5): a GET or HEAD on a route with `shadow` is also sent to the shadow
//! backend, on its own task, with its own timeout and a cap on requests in flight per route.
//! The client only ever gets the primary's answer and never waits for the shadow: the primary
//! body streams on while a bounded copy (1 MiB, then length + SHA-256) is kept; when both sides
//! are complete the task compares them and counts the result.

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora_core::connectors::http::Connector;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_http::RequestHeader;
use serde_json::Value;
use tokio::sync::oneshot;

use crate::forwarding;
use crate::metrics;
use crate::path::NormalPath;
use crate::proxy::MAX_INTERIM;
use crate::router::upstream_path;
use crate::state::{LiveTable, RouteControl};

/// Bodies up to this size are compared in full; larger ones by length and hash.
pub const BODY_CAP: usize = 1 << 20;
/// Shadow requests in flight per route; beyond it a shadow is `skipped`.
pub const MAX_IN_FLIGHT: usize = 32;
/// Shadow requests in flight in the whole process, whatever the number of shadowed routes: each
/// may hold two 1 MiB captures and a socket. Beyond it a shadow is `skipped`.
pub const MAX_IN_FLIGHT_TOTAL: usize = 256;
static IN_FLIGHT_TOTAL: AtomicUsize = AtomicUsize::new(0);
/// Bytes of response bodies the shadow captures may hold at once in the whole process: 256
/// copies of bodies near the 1 MiB cap would otherwise hold 512 MiB (both sides). A capture
/// that would pass it lets go of its bytes and its comparison is `skipped`.
pub const BUFFER_BUDGET: usize = 64 << 20;
static BUFFERED: Budget = Budget::new(BUFFER_BUDGET);

/// Bytes that captures may hold at once, and how many they hold.
struct Budget {
    held: AtomicUsize,
    limit: usize,
}

impl Budget {
    const fn new(limit: usize) -> Self {
        Budget {
            held: AtomicUsize::new(0),
            limit,
        }
    }

    /// Takes `bytes` from the budget, unless that would pass its limit.
    fn take(&self, bytes: usize) -> bool {
        if self.held.fetch_add(bytes, Ordering::Relaxed) + bytes > self.limit {
            self.held.fetch_sub(bytes, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::Relaxed);
    }
}
/// Comparisons that run at once: each decodes and parses up to two bodies of a MiB (a parsed
/// JSON document takes several times its text), so their memory is bounded by their number.
static COMPARING: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

static CLIENT: LazyLock<Connector> = LazyLock::new(|| Connector::new(None));

/// Builds the shadow client now. Building it loads the system's root certificates, a blocking
/// job of tens of milliseconds that must not land on a proxy worker mid-request.
pub fn warm_up() {
    LazyLock::force(&CLIENT);
}

/// Marks a shadow copy (SPEC §5); stripped from client requests so that only copies carry it.
pub static X_STRANGLER_SHADOW: HeaderName = HeaderName::from_static("x-strangler-shadow");

/// Hop-by-hop and framing headers never copied onto a shadow request.
/// `X-Forwarded-Host` is set from the client's Host, never copied (an HTTP/1.0 client may send
/// no Host and its own `X-Forwarded-Host`).
static NOT_COPIED: [HeaderName; 15] = [
    header::CONNECTION,
    header::TE,
    header::TRAILER,
    HeaderName::from_static("http2-settings"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::CONTENT_LENGTH,
    header::EXPECT,
    header::PROXY_AUTHORIZATION,
    // Removed from the primary request too (`proxy.rs`): the proxy's `X-Forwarded-*` stand.
    header::FORWARDED,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    forwarding::X_FORWARDED_HOST,
    // A cache's or a browser's revalidation: the primary's 304 says nothing to compare, and a
    // copy sent without them answers in full instead of 304 to the primary's validator.
    header::IF_NONE_MATCH,
    header::IF_MODIFIED_SINCE,
];

/// What was seen of one side's response.
pub struct Capture {
    status: u16,
    /// Its `Content-Encoding` (lower case), if any other than `identity`.
    encoding: Option<Box<str>>,
    len: u64,
    body: Vec<u8>,
    hash: ring::digest::Context,
    /// Bytes allocated for `body`, taken from `budget`.
    held: usize,
    /// The process's [`BUFFERED`]; none for a decoded copy (bounded by [`COMPARING`]).
    budget: Option<&'static Budget>,
    /// The budget was reached: the bytes were let go, nothing to compare.
    over_budget: bool,
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.let_go();
    }
}

/// The most bytes a compressed body is decoded to for the comparison: past it (a bomb, or a
/// document far over the cap) the two sides are compared as they came.
const DECODED_MAX: u64 = 16 * BODY_CAP as u64;

impl Capture {
    fn new(status: u16, encoding: Option<&HeaderValue>) -> Self {
        Self::within(&BUFFERED, status, encoding)
    }

    /// A capture whose bytes are taken from `budget` (`None`: not counted).
    fn within(
        budget: impl Into<Option<&'static Budget>>,
        status: u16,
        encoding: Option<&HeaderValue>,
    ) -> Self {
        let encoding = encoding
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty() && v != "identity")
            .map(String::into_boxed_str);
        Capture {
            status,
            encoding,
            len: 0,
            body: Vec::new(),
            hash: ring::digest::Context::new(&ring::digest::SHA256),
            held: 0,
            budget: budget.into(),
            over_budget: false,
        }
    }

    /// Lets go of the body's bytes, for good (`len` only grows; a capture over the budget
    /// stays so).
    fn let_go(&mut self) {
        self.body = Vec::new();
        if let Some(budget) = self.budget {
            budget.give_back(std::mem::take(&mut self.held));
        }
    }

    /// The body decoded by its `Content-Encoding` (gzip, deflate, br), so that a compressed
    /// side compares with an uncompressed one, and two compressions of one document (another
    /// gzip timestamp, level) compare equal. `None` when there is nothing to decode, or it
    /// cannot be: an unknown or stacked coding, a body over the cap (only its hash was kept),
    /// corrupt data, or more than `DECODED_MAX` once decoded.
    fn decoded(&self) -> Option<Capture> {
        use std::io::Read;
        let encoding = self.encoding.as_deref()?;
        if self.is_capped() {
            return None;
        }
        let body = &self.body[..];
        let mut reader: Box<dyn Read + '_> = match encoding {
            "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(body)),
            // HTTP's `deflate` is the zlib format; some servers send it raw.
            "deflate" if body.first().is_some_and(|b| b & 0x0f == 8) => {
                Box::new(flate2::read::ZlibDecoder::new(body))
            }
            "deflate" => Box::new(flate2::read::DeflateDecoder::new(body)),
            "br" => Box::new(brotli::Decompressor::new(body, 4096)),
            _ => return None,
        };
        let mut out = Capture::within(None, self.status, None);
        let mut buf = [0u8; 16 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Some(out),
                Ok(n) => {
                    out.push(&buf[..n]);
                    if out.len > DECODED_MAX {
                        return None;
                    }
                }
                Err(_) => return None,
            }
        }
    }

    fn push(&mut self, chunk: &[u8]) {
        self.len += chunk.len() as u64;
        self.hash.update(chunk);
        if self.is_capped() || self.over_budget {
            // Over the cap: only length and hash are compared, so stop holding the bytes.
            if self.body.capacity() > 0 {
                self.let_go();
            }
            return;
        }
        let need = self.body.len() + chunk.len();
        if need > self.body.capacity() {
            // Grown as `Vec` grows (doubling), but by hand, so that what is counted is what
            // is allocated.
            let grown = need.max(2 * self.body.capacity()).min(BODY_CAP);
            let more = grown - self.body.capacity();
            if let Some(budget) = self.budget {
                if !budget.take(more) {
                    self.over_budget = true;
                    self.let_go();
                    return;
                }
                self.held += more;
            }
            self.body.reserve_exact(grown - self.body.len());
        }
        self.body.extend_from_slice(chunk);
    }

    fn is_capped(&self) -> bool {
        self.len > BODY_CAP as u64
    }
}

/// The primary side's tap, carried in the request context.
pub struct ShadowTap {
    primary: Option<Capture>,
    to_task: Option<oneshot::Sender<Option<Capture>>>,
    /// The request body of a GET or HEAD that has one (a search API's query), copied for the
    /// shadow request, which waits for it; dropped past the cap (the copy is then skipped).
    body: Option<(Vec<u8>, oneshot::Sender<Bytes>)>,
}

impl ShadowTap {
    /// A new attempt at the primary begins (a retry on a fresh connection, a failover): Pingora
    /// passes the body read so far through the filter again, so the copy starts over.
    pub fn request_restarts(&mut self) {
        if let Some((copy, _)) = &mut self.body {
            copy.clear();
        }
    }

    /// A chunk of the client's request body passed to the primary.
    pub fn request_chunk(&mut self, chunk: Option<&Bytes>, end: bool) {
        let Some((copy, _)) = &mut self.body else {
            return;
        };
        if let Some(c) = chunk {
            if copy.len() + c.len() > BODY_CAP {
                self.body = None;
                return;
            }
            copy.extend_from_slice(c);
        }
        if end {
            if let Some((copy, tx)) = self.body.take() {
                let _ = tx.send(Bytes::from(copy));
            }
        }
    }

    /// The primary's response header arrived.
    pub fn primary_header(&mut self, status: u16, encoding: Option<&HeaderValue>) {
        self.primary = Some(Capture::new(status, encoding));
    }

    /// A chunk of the primary's response body passed to the client.
    pub fn primary_chunk(&mut self, chunk: Option<&Bytes>, _end: bool) {
        if let (Some(p), Some(c)) = (&mut self.primary, chunk) {
            p.push(c);
        }
    }

    /// The primary is done; `failed` if it did not complete normally.
    pub fn finish(mut self, failed: bool) {
        let primary = if failed { None } else { self.primary.take() };
        if let Some(tx) = self.to_task.take() {
            let _ = tx.send(primary);
        }
    }
}

/// Frees a shadow slot when the task ends, however it ends.
struct Slot(Arc<RouteControl>);

impl Slot {
    /// Takes a slot of the route and of the process, or none if either is full.
    fn take(control: Arc<RouteControl>) -> Option<Slot> {
        if control.shadow_in_flight.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT {
            control.shadow_in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        if IN_FLIGHT_TOTAL.fetch_add(1, Ordering::AcqRel) >= MAX_IN_FLIGHT_TOTAL {
            IN_FLIGHT_TOTAL.fetch_sub(1, Ordering::AcqRel);
            control.shadow_in_flight.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(control))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.shadow_in_flight.fetch_sub(1, Ordering::AcqRel);
        IN_FLIGHT_TOTAL.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The client as the shadow request names it: the TCP peer and the Host it asked for.
pub struct Client<'a> {
    pub ip: Option<IpAddr>,
    pub host: Option<&'a HeaderValue>,
}

/// Starts the shadow request for route `i` if it has `shadow`, the request is a GET or HEAD, and
/// `shadow` is not the backend that serves it (`served_by`).
/// The copy is forwarded as the primary is (SPEC §4): hop-by-hop headers, and those the client's
/// `Connection` names, removed; `X-Forwarded-For` appended, `X-Forwarded-Proto` and
/// `X-Forwarded-Host` set; plus `X-Strangler-Shadow: 1`.
pub fn tap(
    live: &Arc<LiveTable>,
    i: usize,
    served_by: usize,
    req: &RequestHeader,
    path: Option<&NormalPath>,
    request_id: &HeaderValue,
    client: Client<'_>,
) -> Option<ShadowTap> {
    let route = &live.table.routes[i];
    let shadow = route.shadow?;
    if live.routes[i].control.is_pinned() {
        // Rolled back: the route involves `default` only. An incident caused by the new
        // service (shadow reads loading its database, say) ends with a pin, shadow or not.
        return None;
    }
    if shadow == served_by {
        // `shadow` equal to `to`: only the requests `default` serves are copied.
        return None;
    }
    // An upgrade (WebSocket) is a conversation, not a read to replay and compare: its copy
    // would go out as a plain GET and hold a slot for the life of the connection.
    if !matches!(req.method, http::Method::GET | http::Method::HEAD)
        || req.headers.contains_key(header::UPGRADE)
    {
        return None;
    }
    let path = path?;
    let backend = &live.table.backends[shadow];
    let labels = [&*route.name, &*backend.name];
    let Some(slot) = Slot::take(live.routes[i].control.clone()) else {
        metrics::SHADOW
            .with_label_values(&[labels[0], labels[1], "skipped"])
            .inc();
        return None;
    };
    // Never a passed-over address's second chance: the copy's answer does not reach the
    // primary's accounting, which ends the passing over.
    let addr = backend
        .addrs
        .next(backend.addrs.turn(), |_| false, false)?
        .addr;
    let counters = metrics::SHADOW_RESULTS
        .map(|r| metrics::SHADOW.with_label_values(&[labels[0], labels[1], r]));

    let mut up =
        RequestHeader::build(req.method.clone(), b"/", Some(req.headers.len() + 5)).ok()?;
    // `rewrite` is the path on the route's `to`: a copy to `to` itself (a canary's shadow) is
    // sent as its real requests are.
    let target = upstream_path(Some(route), shadow == route.to, backend, path);
    up.set_raw_path(target.as_bytes()).ok()?;
    let nominated = forwarding::connection_nominated(&req.headers);
    for (name, value) in req.headers.iter() {
        if !NOT_COPIED.contains(name)
            && !nominated.contains(name)
            && !forwarding::own_field_lookalike(name)
        {
            up.append_header(name.clone(), value.clone()).ok()?;
        }
    }
    // As on the primary request: the backend's `host`, else the client's (even an empty
    // one), else the backend's own address (an HTTP/1.0 client may send none).
    if let Some(h) = &backend.host_header {
        up.insert_header(header::HOST, h.as_str()).ok()?;
    } else if !up.headers.contains_key(header::HOST) {
        up.insert_header(header::HOST, backend.authority()).ok()?;
    }
    if let Some(ip) = client.ip {
        let existing = forwarding::header_list(&req.headers, &forwarding::X_FORWARDED_FOR);
        let xff = forwarding::forwarded_for(existing.as_deref(), ip);
        up.insert_header(forwarding::WIRE_FORWARDED_FOR, xff).ok()?;
    }
    up.insert_header(
        forwarding::WIRE_FORWARDED_PROTO,
        forwarding::PROTO_HTTP.clone(),
    )
    .ok()?;
    if let Some(h) = client.host {
        up.insert_header(forwarding::WIRE_FORWARDED_HOST, h).ok()?;
    }
    up.insert_header(X_STRANGLER_SHADOW.clone(), "1").ok()?;
    up.insert_header(forwarding::WIRE_REQUEST_ID, request_id)
        .ok()?;

    let mut peer = HttpPeer::new(addr, backend.tls, backend.sni.clone());
    peer.options.connection_timeout = Some(backend.connect_timeout);
    peer.options.read_timeout = Some(backend.timeout);
    peer.options.write_timeout = Some(backend.timeout);
    let deadline = backend.timeout + backend.connect_timeout;
    let ignore = route.shadow_ignore.clone();
    let (route_name, backend_name) = (route.name.clone(), backend.name.clone());
    let request_id = request_id.to_str().unwrap_or("-").to_string();
    let head = req.method == http::Method::HEAD;
    let (tx, rx) = oneshot::channel::<Option<Capture>>();
    let (body, body_rx) = if has_body(req) {
        let (body_tx, body_rx) = oneshot::channel();
        (Some((Vec::new(), body_tx)), Some(body_rx))
    } else {
        (None, None)
    };

    tokio::spawn(async move {
        let _slot = slot;
        // Counted through a handle taken when the copy was sent: a reload that removed the
        // route or its shadow backend meanwhile has deleted the series, and a deleted series'
        // handle counts where nothing exports it (a lookup by labels now would recreate it).
        let count = |result: &str| {
            if let Some(i) = metrics::SHADOW_RESULTS.iter().position(|r| *r == result) {
                counters[i].inc();
            }
        };
        // A body is copied whole before the copy goes out: one the client has not sent within
        // the shadow's deadline, or over the cap, leaves nothing to compare.
        let body = match body_rx {
            None => Bytes::new(),
            Some(rx) => match tokio::time::timeout(deadline, rx).await {
                Ok(Ok(body)) => body,
                _ => {
                    count("skipped");
                    return;
                }
            },
        };
        let shadow = tokio::time::timeout(deadline, fetch(&peer, up, head, body)).await;
        // A shadow that failed is the shadow backend's error, whatever the primary does: it
        // is not waited for.
        let shadow = match shadow {
            Err(_) => {
                log::info!(target: "shadow", "shadow request {request_id} on route {route_name:?} to {backend_name}: timed out after {deadline:?}");
                Err("error")
            }
            Ok(Err(e)) => {
                log::info!(target: "shadow", "shadow request {request_id} on route {route_name:?} to {backend_name}: {e}");
                Err("error")
            }
            Ok(Ok(s)) => Ok(s),
        };
        // The primary's answer is waited for as long again at most: a stream that outlives
        // that (server-sent events, a long poll, a download far slower than the shadow's) is
        // not compared ("skipped"), and gives its slot back.
        let primary = match &shadow {
            Ok(_) => tokio::time::timeout(deadline, rx)
                .await
                .ok()
                .and_then(|r| r.ok())
                .flatten(),
            Err(_) => None,
        };
        let result = match (primary, shadow) {
            (_, Err(error)) => error,
            (None, Ok(_)) => "skipped",
            // The process held as many bodies as it may (`BUFFER_BUDGET`), or the primary
            // answered a revalidation (304, no body; the copy asked for none).
            (Some(p), Ok(s)) if p.over_budget || s.over_budget || p.status == 304 => "skipped",
            // Decoding and parsing up to two bodies of a MiB (16 once decompressed) is CPU
            // work: on the blocking pool, off the threads that serve requests.
            (Some(p), Ok(s)) => {
                let _comparing = COMPARING.acquire().await;
                match tokio::task::spawn_blocking(move || compare(&p, &s, &ignore)).await {
                    Err(e) => {
                        log::error!(target: "shadow", "shadow comparison of request {request_id} on route {route_name:?} failed: {e}");
                        "error"
                    }
                    Ok(None) => "match",
                    Ok(Some(_)) if !crate::logging::shadow_mismatch_admitted() => "mismatch",
                    Ok(Some(diff)) => {
                        let (primary, shadow) = (truncate(&diff.primary), truncate(&diff.shadow));
                        log::warn!(
                            target: "shadow",
                            request_id = request_id.as_str(),
                            route = &*route_name,
                            backend = &*backend_name,
                            pointer = diff.pointer.as_str(),
                            primary = primary.as_str(),
                            shadow = shadow.as_str();
                            "shadow mismatch: request {request_id} route {route_name:?} backend {backend_name}: at {:?} primary={primary} shadow={shadow}",
                            diff.pointer,
                        );
                        "mismatch"
                    }
                }
            }
        };
        count(result);
    });

    Some(ShadowTap {
        primary: None,
        to_task: Some(tx),
        body,
    })
}

/// Whether a request says it has a body.
fn has_body(req: &RequestHeader) -> bool {
    req.headers.contains_key(header::TRANSFER_ENCODING)
        || req
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes().iter().any(|b| (b'1'..=b'9').contains(b)))
}

async fn fetch(
    peer: &HttpPeer,
    mut req: RequestHeader,
    head: bool,
    body: Bytes,
) -> pingora_error::Result<Capture> {
    if !body.is_empty() {
        req.insert_header(header::CONTENT_LENGTH, body.len())?;
    }
    let (mut session, _reused) = CLIENT.get_http_session(peer).await?;
    session.write_request_header(Box::new(req)).await?;
    if !body.is_empty() {
        session.write_request_body(body, true).await?;
    }
    session.finish_request_body().await?;
    // Interim answers (100, 103) come before the one compared, each as a header of its own;
    // their count is bounded as on the primary.
    let mut interim = 0;
    let mut cap = loop {
        session.read_response_header().await?;
        let resp = session.response_header();
        let status = resp.map(|r| r.status.as_u16()).unwrap_or(0);
        if !(100..200).contains(&status) || status == 101 {
            break Capture::new(
                status,
                resp.and_then(|r| r.headers.get(header::CONTENT_ENCODING)),
            );
        }
        interim += 1;
        if interim > MAX_INTERIM {
            return Err(pingora_error::Error::explain(
                pingora_error::ErrorType::InvalidHTTPHeader,
                format!("more than {MAX_INTERIM} interim (1xx) responses"),
            ));
        }
    };
    if !head {
        while let Some(chunk) = session.read_response_body().await? {
            cap.push(&chunk);
        }
    }
    CLIENT
        .release_http_session(session, peer, Some(Duration::from_secs(30)))
        .await;
    Ok(cap)
}

/// The first difference between two responses.
#[derive(Debug, PartialEq)]
pub struct Difference {
    /// A JSON pointer into the body, or `status`, `body` (non-JSON), `length`.
    pub pointer: String,
    pub primary: String,
    pub shadow: String,
}

/// Compares status, then body: JSON as values with `ignore` pointers removed, other bodies byte
/// for byte, bodies over the cap by length and hash. `None` means they match.
pub fn compare(p: &Capture, s: &Capture, ignore: &[String]) -> Option<Difference> {
    let (pd, sd) = (p.decoded(), s.decoded());
    let (p, s) = (pd.as_ref().unwrap_or(p), sd.as_ref().unwrap_or(s));
    if p.status != s.status {
        return Some(Difference {
            pointer: "status".into(),
            primary: p.status.to_string(),
            shadow: s.status.to_string(),
        });
    }
    if p.is_capped() || s.is_capped() {
        let (hp, hs) = (p.hash.clone().finish(), s.hash.clone().finish());
        if p.len != s.len || hp.as_ref() != hs.as_ref() {
            let short = |d: &ring::digest::Digest| {
                d.as_ref()[..6]
                    .iter()
                    .map(|b| format!("{b:02x}"))
                    .collect::<String>()
            };
            return Some(Difference {
                pointer: "length+sha256".into(),
                primary: format!("{} bytes, sha256 {}…", p.len, short(&hp)),
                shadow: format!("{} bytes, sha256 {}…", s.len, short(&hs)),
            });
        }
        return None;
    }
    compare_bodies(&p.body, &s.body, ignore)
}

/// Body comparison, JSON-aware.
pub fn compare_bodies(p: &[u8], s: &[u8], ignore: &[String]) -> Option<Difference> {
    match (
        serde_json::from_slice::<Value>(p),
        serde_json::from_slice::<Value>(s),
    ) {
        (Ok(mut a), Ok(mut b)) => {
            for ptr in ignore {
                remove_pointer(&mut a, ptr);
                remove_pointer(&mut b, ptr);
            }
            first_difference(&a, &b, String::new())
        }
        _ if p == s => None,
        _ => {
            let mut at = p
                .iter()
                .zip(s)
                .position(|(x, y)| x != y)
                .unwrap_or(p.len().min(s.len()));
            // From the start of the character the difference falls in (`é` against `è` differ
            // in their second byte), so that both sides show it whole.
            while at > 0 && p.get(at).or(s.get(at)).is_some_and(|b| b & 0xc0 == 0x80) {
                at -= 1;
            }
            // What each has from there; "(end)" for the one that has ended, as "(absent)"
            // says it of a JSON member.
            let from = |b: &[u8]| match &b[at..] {
                [] => "(end)".to_string(),
                rest => String::from_utf8_lossy(&rest[..rest.len().min(64)]).into_owned(),
            };
            Some(Difference {
                pointer: format!("body (byte {at})"),
                primary: from(p),
                shadow: from(s),
            })
        }
    }
}

fn first_difference(a: &Value, b: &Value, at: String) -> Option<Difference> {
    let diff = |at: String| {
        Some(Difference {
            // RFC 6901: the whole document is "" ("/" is the member named "").
            pointer: at,
            primary: a.to_string(),
            shadow: b.to_string(),
        })
    };
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            // In document order: the primary's members, then those only the shadow has.
            let only_shadow = y.keys().filter(|k| !x.contains_key(*k));
            for k in x.keys().chain(only_shadow) {
                let here = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                match (x.get(k), y.get(k)) {
                    (Some(va), Some(vb)) => {
                        if let Some(d) = first_difference(va, vb, here) {
                            return Some(d);
                        }
                    }
                    (va, vb) => {
                        return Some(Difference {
                            pointer: here,
                            primary: va.map_or("(absent)".into(), Value::to_string),
                            shadow: vb.map_or("(absent)".into(), Value::to_string),
                        })
                    }
                }
            }
            None
        }
        (Value::Array(x), Value::Array(y)) => {
            for (i, (va, vb)) in x.iter().zip(y).enumerate() {
                if let Some(d) = first_difference(va, vb, format!("{at}/{i}")) {
                    return Some(d);
                }
            }
            if x.len() != y.len() {
                let i = x.len().min(y.len());
                return Some(Difference {
                    pointer: format!("{at}/{i}"),
                    primary: x.get(i).map_or("(absent)".into(), Value::to_string),
                    shadow: y.get(i).map_or("(absent)".into(), Value::to_string),
                });
            }
            None
        }
        // `1`, `1.0` and `1e0` are one JSON value (RFC 8259 §6): services written in different
        // languages print numbers differently. Integers are compared exactly, others as f64.
        (Value::Number(x), Value::Number(y)) if same_number(x, y) => None,
        _ if a == b => None,
        _ => diff(at),
    }
}

fn same_number(x: &serde_json::Number, y: &serde_json::Number) -> bool {
    match (x.as_i64(), y.as_i64(), x.as_u64(), y.as_u64()) {
        (Some(a), Some(b), _, _) => a == b,
        (_, _, Some(a), Some(b)) => a == b,
        _ => x.as_f64().zip(y.as_f64()).is_some_and(|(a, b)| a == b),
    }
}

/// Leaves the value at JSON pointer `ptr` out of the comparison, if present.
fn remove_pointer(v: &mut Value, ptr: &str) {
    let Some((parent, last)) = ptr.rsplit_once('/') else {
        return;
    };
    let key = last.replace("~1", "/").replace("~0", "~");
    match v.pointer_mut(parent) {
        Some(Value::Object(m)) => {
            // Keeping the others in document order, which the first difference follows.
            m.shift_remove(&key);
        }
        Some(Value::Array(a)) => {
            // Blanked, not removed: the elements after it keep their indexes, so a difference
            // further on is reported at the pointer it has in the real documents.
            if let Some(slot) = key.parse::<usize>().ok().and_then(|i| a.get_mut(i)) {
                *slot = Value::Null;
            }
        }
        _ => {}
    }
}

fn truncate(s: &str) -> String {
    if s.len() <= 200 {
        return s.to_string();
    }
    let mut end = 200;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(a: &str, b: &str, ignore: &[&str]) -> Option<Difference> {
        let ignore: Vec<String> = ignore.iter().map(|s| s.to_string()).collect();
        compare_bodies(a.as_bytes(), b.as_bytes(), &ignore)
    }

    fn captured(encoding: Option<&str>, body: &[u8]) -> Capture {
        let v = encoding.map(|e| HeaderValue::from_str(e).unwrap());
        let mut c = Capture::new(200, v.as_ref());
        c.push(body);
        c
    }

    fn gzip(body: &[u8], mtime: u32) -> Vec<u8> {
        use std::io::Write;
        let mut w = flate2::GzBuilder::new()
            .mtime(mtime)
            .write(Vec::new(), flate2::Compression::default());
        w.write_all(body).unwrap();
        w.finish().unwrap()
    }

    /// Compressed bodies are compared decoded: as JSON values when they are JSON, whichever
    /// side compressed, however (gzip timestamps, deflate, br).
    #[test]
    fn compressed_bodies_are_compared_decoded() {
        use std::io::Write;
        let doc = br#"{"a":1,"b":[1,2]}"#;
        let other = br#"{"b":[1,2],"a":2}"#;
        let plain = captured(None, doc);
        let gz1 = captured(Some("gzip"), &gzip(doc, 1));
        let gz2 = captured(Some("GZIP"), &gzip(doc, 2));
        assert_eq!(compare(&gz1, &gz2, &[]), None, "two gzip timestamps");
        assert_eq!(compare(&gz1, &plain, &[]), None, "gzip against identity");
        let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        z.write_all(doc).unwrap();
        assert_eq!(
            compare(
                &captured(Some("deflate"), &z.finish().unwrap()),
                &plain,
                &[]
            ),
            None
        );
        let mut br = Vec::new();
        {
            let mut w = brotli::CompressorWriter::new(&mut br, 4096, 5, 22);
            w.write_all(doc).unwrap();
        }
        assert_eq!(compare(&captured(Some("br"), &br), &plain, &[]), None);
        // A difference is reported in the decoded document.
        let d = compare(&gz1, &captured(Some("gzip"), &gzip(other, 1)), &[]).unwrap();
        assert_eq!(
            (d.pointer.as_str(), d.primary.as_str(), d.shadow.as_str()),
            ("/a", "1", "2")
        );
        // What cannot be decoded is compared as it came.
        let corrupt = captured(Some("gzip"), b"not gzip");
        assert!(compare(&corrupt, &plain, &[]).is_some());
        assert_eq!(
            compare(&corrupt, &captured(Some("gzip"), b"not gzip"), &[]),
            None
        );
    }

    #[test]
    fn json_as_values() {
        assert_eq!(
            cmp(r#"{"a":1,"b":[1,2]}"#, r#"{"b":[1,2],"a":1}"#, &[]),
            None
        );
        let d = cmp(r#"{"a":{"x":1},"b":2}"#, r#"{"a":{"x":2},"b":2}"#, &[]).unwrap();
        assert_eq!(
            (d.pointer.as_str(), d.primary.as_str(), d.shadow.as_str()),
            ("/a/x", "1", "2")
        );
        assert_eq!(
            cmp(
                r#"{"a":1,"updated_at":"x"}"#,
                r#"{"a":1,"updated_at":"y"}"#,
                &["/updated_at"]
            ),
            None
        );
        assert_eq!(
            cmp(
                r#"{"meta":{"request_id":"1","n":1}}"#,
                r#"{"meta":{"request_id":"2","n":1}}"#,
                &["/meta/request_id"]
            ),
            None
        );
        let d = cmp(r#"[1,2]"#, r#"[1,2,3]"#, &[]).unwrap();
        assert_eq!(d.pointer, "/2");
        // The first difference in the primary's document order, not the alphabet's; then
        // what only the shadow has. An ignored member takes no other out of order.
        let d = cmp(
            r#"{"name":"Alice","id":5,"list":[1,2,3]}"#,
            r#"{"id":5,"list":[1,2,4],"name":"Bob"}"#,
            &[],
        )
        .unwrap();
        assert_eq!(d.pointer, "/name");
        let d = cmp(r#"{"z":1,"y":2}"#, r#"{"b":0,"z":1,"y":2,"a":0}"#, &[]).unwrap();
        assert_eq!(d.pointer, "/b");
        let d = cmp(
            r#"{"t":0,"c":1,"b":1,"a":1}"#,
            r#"{"t":1,"c":2,"b":2,"a":2}"#,
            &["/t"],
        )
        .unwrap();
        assert_eq!(d.pointer, "/c");
        // An ignored array element: the others keep their pointers.
        let d = cmp(r#"{"arr":[1,2,3,4]}"#, r#"{"arr":[1,9,3,5]}"#, &["/arr/1"]).unwrap();
        assert_eq!(
            (d.pointer.as_str(), d.primary.as_str(), d.shadow.as_str()),
            ("/arr/3", "4", "5")
        );
        let d = cmp(r#"{"arr":[1,2,3]}"#, r#"{"arr":[1,2]}"#, &["/arr/1"]).unwrap();
        assert_eq!(
            (d.pointer.as_str(), d.primary.as_str(), d.shadow.as_str()),
            ("/arr/2", "3", "(absent)")
        );
        assert_eq!(cmp(r#"[1,2,3]"#, r#"[1,7,3]"#, &["/1"]), None);
        let d = cmp(r#"{"a":1}"#, r#"{}"#, &[]).unwrap();
        assert_eq!((d.pointer.as_str(), d.shadow.as_str()), ("/a", "(absent)"));
        // Numbers as numbers: however each service prints them.
        assert_eq!(
            cmp(r#"{"a":1.0,"b":[1e2]}"#, r#"{"a":1,"b":[100]}"#, &[]),
            None
        );
        assert_eq!(cmp(r#"{"a":-0.5}"#, r#"{"a":-5e-1}"#, &[]), None);
        assert_eq!(
            cmp("18446744073709551615", "18446744073709551614", &[]).map(|d| d.pointer),
            Some(String::new())
        );
        assert!(cmp(r#"{"a":1.5}"#, r#"{"a":1}"#, &[]).is_some());
        assert!(cmp(r#"{"a":1}"#, r#"{"a":"1"}"#, &[]).is_some());
        // Each number read as the double it denotes (correctly rounded): two spellings of one
        // double are the same number, neighbouring doubles are not.
        assert_eq!(
            cmp(r#"[1e-300]"#, r#"[1.0000000000000001e-300]"#, &[]),
            None
        );
        assert_eq!(
            cmp(
                r#"[-2.1035300715365295e-22]"#,
                r#"[-2.10353007153652954e-22]"#,
                &[]
            ),
            None
        );
        assert!(cmp(r#"[19.990000000000002]"#, r#"[19.99]"#, &[]).is_some());
        assert!(cmp(r#"[100.00000000000001]"#, r#"[100.0]"#, &[]).is_some());
    }

    #[test]
    fn captures_hold_no_more_than_the_process_budget() {
        // Bodies at the cap (kept in full), more of them than the budget holds: the later ones
        // let go of their bytes and say so; every byte is given back when they go. A budget of
        // the test's own: the process's is shared with the tests running beside it.
        static BUDGET: Budget = Budget::new(BUFFER_BUDGET);
        let mib = vec![b'x'; BODY_CAP];
        let captures: Vec<Capture> = (0..BUFFER_BUDGET / BODY_CAP + 8)
            .map(|_| {
                let mut c = Capture::within(&BUDGET, 200, None);
                c.push(&mib);
                c
            })
            .collect();
        let over: Vec<&Capture> = captures.iter().filter(|c| c.over_budget).collect();
        assert!(over.len() >= 8, "{} over the budget", over.len());
        assert!(over.iter().all(|c| c.body.capacity() == 0 && c.held == 0));
        assert_eq!(
            BUDGET.held.load(Ordering::Relaxed),
            BUFFER_BUDGET,
            "the budget filled, not passed"
        );
        // Hashed still, as a capped one is: the length stays known.
        assert!(over.iter().all(|c| c.len == BODY_CAP as u64));
        drop(captures);
        assert_eq!(BUDGET.held.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn every_result_the_task_counts_has_its_counter() {
        for result in ["match", "mismatch", "error", "skipped"] {
            assert!(metrics::SHADOW_RESULTS.contains(&result), "{result}");
        }
    }

    #[test]
    fn other_bodies_byte_for_byte() {
        assert_eq!(cmp("hello", "hello", &[]), None);
        assert!(cmp("hello", "help!", &[])
            .unwrap()
            .pointer
            .contains("byte 3"));
        let d = cmp("café au lait", "cafè au lait", &[]).unwrap();
        assert_eq!(
            (d.pointer.as_str(), d.primary.as_str(), d.shadow.as_str()),
            ("body (byte 3)", "é au lait", "è au lait")
        );
        let d = cmp("hello", "hello, world", &[]).unwrap();
        assert_eq!(
            (d.pointer.as_str(), d.primary.as_str(), d.shadow.as_str()),
            ("body (byte 5)", "(end)", ", world")
        );
    }

    #[test]
    fn status_then_large_bodies() {
        let mut p = Capture::new(200, None);
        let mut s = Capture::new(500, None);
        assert_eq!(compare(&p, &s, &[]).unwrap().pointer, "status");
        s.status = 200;
        let big = vec![7u8; BODY_CAP + 10];
        p.push(&big);
        s.push(&big);
        assert!(p.is_capped() && p.body.is_empty());
        assert_eq!(compare(&p, &s, &[]), None);
        s.push(b"x");
        let d = compare(&p, &s, &[]).unwrap();
        assert_eq!(d.pointer, "length+sha256");
        assert!(
            d.primary.contains("sha256 ") && d.primary != d.shadow,
            "{d:?}"
        );
    }

    #[test]
    fn capped_bodies_stay_dropped() {
        // In chunks, as bodies arrive: once past the cap, no later chunk is held again.
        let chunk = vec![1u8; 64 << 10];
        let mut c = Capture::new(200, None);
        for _ in 0..16 {
            c.push(&chunk);
        }
        assert_eq!(c.body.len(), BODY_CAP);
        for _ in 0..4 {
            c.push(&chunk);
            assert!(c.is_capped() && c.body.capacity() == 0);
        }
        assert_eq!(c.len, 20 * (64 << 10));
    }
}
