//! The Pingora hooks: every request's way through strangler, in one place. Each hook states its
//! phase and contract. The request takes one snapshot of the table in `request_filter` and keeps
//! it to the end, so a reload never changes a request halfway.
//!
//! Phases, in order: `request_filter` (normalise, route, choose the backend, or answer 400) →
//! `upstream_peer` (where to connect) → `connected_to_upstream` (a pooled connection its
//! backend said it would close is refused) → `upstream_request_filter` (path, Host, X-Forwarded-*) →
//! `upstream_response_filter` (Location, Set-Cookie, hop-by-hop) → `response_filter`
//! (X-Strangler-* headers) → `logging` (metrics, rollback window). On failure:
//! `fail_to_connect` / `error_while_proxy` (failover) → `fail_to_proxy` (JSON error).

use std::net::{IpAddr, SocketAddr};
use std::os::unix::io::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use pingora_core::protocols::Digest;
use pingora_core::upstreams::peer::{HttpPeer, HttpUpstreamRequestPolicy};
use pingora_error::{Error, ErrorSource, ErrorType, Result};
use pingora_http::{RequestHeader, ResponseHeader};
use pingora_proxy::{FailToProxy, ProxyHttp, ProxyWarnLogContext, Session};

use crate::connection::DeadlineStream;
use crate::dns;
use crate::errors::{self, ProxyError, UpstreamErrorKind};
use crate::forwarding;
use crate::metrics;
use crate::path::{self, NormalPath};
use crate::rollback;
use crate::router::{upstream_path, DEFAULT_ROUTE, NO_BACKEND};
use crate::shadow::{self, ShadowTap};
use crate::split;
use crate::state::{LiveTable, RouteControl, State};
use crate::upstream_close;

use crate::forwarding::{
    PROTO_HTTP, WIRE_FORWARDED_FOR, WIRE_FORWARDED_HOST, WIRE_FORWARDED_PROTO, WIRE_REQUEST_ID,
    WIRE_STRANGLER_BACKEND, WIRE_STRANGLER_ROUTE, X_FORWARDED_FOR,
};

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static ACRM: HeaderName = HeaderName::from_static("access-control-request-method");

/// How long one write to a client may wait for it to read (nginx's `send_timeout`, 60 s).
pub const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a pooled backend connection was refused (`connected_to_upstream`).
const POOLED_SAID_CLOSE: &str =
    "pooled backend connection not reused: its backend said it would close it";

/// Interim (1xx) responses relayed per request before the backend's answer is taken as
/// invalid (502): each restarts the backend's read timeout, so an endless stream of them would
/// hold the client, its connection and the request's slot for ever.
pub(crate) const MAX_INTERIM: u8 = 16;

/// Request size limits enforced before routing (the backend is never contacted past them).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest request target (path + query), in bytes: 414 beyond.
    pub max_uri_bytes: usize,
    /// Largest total of header names and values, in bytes: 431 beyond.
    pub max_header_bytes: usize,
    /// Most header fields: 431 beyond.
    pub max_headers: usize,
}

impl Limits {
    /// The error that a request with this target length and these headers is refused with, if
    /// it breaks a limit: 414 first, then 431. `explain` and `check --cases` ask it too.
    pub fn refusal(&self, target_len: usize, headers: &http::HeaderMap) -> Option<ProxyError> {
        if target_len > self.max_uri_bytes {
            return Some(errors::URI_TOO_LONG);
        }
        let header_bytes: usize = headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        (headers.len() > self.max_headers || header_bytes > self.max_header_bytes)
            .then_some(errors::HEADERS_TOO_LARGE)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_uri_bytes: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
        }
    }
}

/// The proxy service.
pub struct Strangler {
    pub state: Arc<State>,
    pub limits: Limits,
    /// How long a client's keep-alive connection may sit idle between two requests, in
    /// seconds (`--keepalive-timeout`).
    pub keepalive_secs: u64,
}

/// Counts the request in its route's in-flight gauge until it ends, however it ends.
struct InFlight(Arc<RouteControl>);

impl InFlight {
    fn new(control: Arc<RouteControl>) -> Self {
        control.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(control)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counts the request in [`crate::server::ACTIVE`] for as long as it lives.
struct Active;

impl Active {
    fn new() -> Self {
        crate::server::ACTIVE.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Active
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        crate::server::ACTIVE.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Per-request state, from the first hook to the last.
pub struct RequestCtx {
    _active: Active,
    start: Instant,
    /// The table this request is served under (taken once, in `request_filter`).
    live: Option<Arc<LiveTable>>,
    request_id: HeaderValue,
    method: &'static str,
    path: Option<NormalPath>,
    /// Route index in `live.table.routes`; `None` is the unmatched `default` route.
    route: Option<usize>,
    /// Backend index the request is being sent to; `None` until routed (answered by the proxy).
    backend: Option<usize>,
    /// The request went to its route's `to` (not pinned, not split off, not failed over).
    to_target: bool,
    /// The generation of the route's rollback window when the request was sent to `to`: its
    /// outcome counts only if the window was not cleared since (`rollback::Window`).
    to_generation: u64,
    failed_over: bool,
    /// When the request went on to `default`: its duration there is `default`'s (the failed
    /// attempt on `to` is not `default`'s latency; it shows as the failover and its error).
    failed_over_at: Option<Instant>,
    /// Retried once already because a reused connection closed under it.
    stale_retried: bool,
    /// The descriptor of the backend connection of the last attempt (-1 before one).
    upstream_fd: RawFd,
    /// The last attempt was given a pooled connection its backend said it would close
    /// (`upstream_close`): refused before anything was sent, and retried.
    refused_pooled: bool,
    /// Where this request started in its backend's round robin of addresses, and the
    /// addresses it could not connect to, `addr_tries` of them (`dns.rs`).
    addr_turn: usize,
    /// Boxed, and only once an attempt failed: the context is moved whole with the
    /// connection's future (twice per request), and nearly every request connects at once.
    addr_tried: Option<Box<[Option<SocketAddr>; dns::MAX_TRIES]>>,
    addr_tries: usize,
    /// The backend and address of the last attempt.
    peer: Option<(usize, SocketAddr)>,
    /// That address was passed over for a failed connection, and this request tries it again:
    /// its answer ends that. (Other requests' answers do not: one sent on a connection made
    /// before the failure says nothing of new ones.)
    probing: bool,
    /// The backend's `timeout` ran out while the client's request body was still coming: the
    /// client stalled, and the request is answered 408, not blamed on the backend.
    client_stalled: bool,
    /// The proxy ran out of descriptors or memory connecting to the backend
    /// (`errors::proxy_out_of_resources`): answered 503, not held against the backend.
    proxy_short: bool,
    /// An upgraded connection (101) ended the way tunnels end, not by a backend failure.
    tunnel_closed: bool,
    /// The outcome has been counted in the rollback window.
    judged: bool,
    /// ... as a success (at its response header), counted there.
    success_counted: Option<rollback::Counted>,
    upstream_error: Option<UpstreamErrorKind>,
    /// Status of a response the proxy wrote itself.
    proxy_status: Option<u16>,
    /// Interim (1xx) responses the backend has sent so far (at most `MAX_INTERIM`).
    interim: u8,
    /// The upstream request offered an upgrade (an `Upgrade` left after Pingora's policy, which
    /// keeps a WebSocket one from an HTTP/1.1 client only): a 101 to any other is invalid.
    offered_upgrade: bool,
    /// The proxy answered the client's `Expect: 100-continue` itself.
    sent_continue: bool,
    /// The client closed its connection while the proxy was still trying backends (found
    /// when an attempt failed): the request ends there, as a 499.
    client_left: bool,
    /// The whole response has been handed to the client's connection (its last body chunk,
    /// or a header that ends it). A client that goes away after this is not a 499: it may
    /// simply stop sending a body the backend already answered without reading.
    response_done: bool,
    /// The client's Host, for Location rewriting and X-Forwarded-Host.
    client_host: Option<HeaderValue>,
    /// Which of the request's fields the proxy acts on are there at all.
    fields: forwarding::RequestFields,
    _in_flight: Option<InFlight>,
    /// Boxed: a tap is 280 bytes, and the context lives inside the connection's future, which
    /// Pingora moves whole (twice per request); most requests are not shadowed.
    shadow: Option<Box<ShadowTap>>,
}

impl RequestCtx {
    fn route_name(&self) -> &str {
        match (&self.live, self.route) {
            (Some(l), Some(i)) => &l.table.routes[i].name,
            _ => DEFAULT_ROUTE,
        }
    }

    /// Whether a reload has removed the request's route (and deleted its series) since the
    /// request began: its counts then go nowhere rather than bring the series back.
    fn route_retired(&self) -> bool {
        match (&self.live, self.route) {
            (Some(l), Some(i)) => l.routes[i].control.retired.load(Ordering::Acquire),
            _ => false,
        }
    }

    /// Whether counting this request would bring back series a reload deleted: its route, or
    /// the backend it went to, left the table since the request began.
    fn series_retired(&self) -> bool {
        self.route_retired()
            || match (&self.live, self.backend) {
                (Some(l), Some(b)) => l.backend_retired(b),
                _ => false,
            }
    }

    fn backend_name(&self) -> &str {
        match (&self.live, self.backend) {
            (Some(l), Some(b)) => &l.table.backends[b].name,
            _ => NO_BACKEND,
        }
    }
}

impl Strangler {
    /// Answers the request with one of the proxy's own JSON errors.
    async fn answer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
        err: ProxyError,
        detail: Option<&str>,
    ) -> Result<()> {
        ctx.proxy_status = Some(err.status);
        let body = err.body(
            detail,
            ctx.route_name(),
            ctx.backend_name(),
            ctx.request_id.to_str().unwrap_or("-"),
        );
        let mut resp = err.response_header(body.len())?;
        self.stamp(&mut resp, ctx)?;
        // A malformed request leaves the connection in doubt: close it after answering.
        session.set_keepalive(None);
        session.write_response_header(Box::new(resp), false).await?;
        session.write_response_body(Some(body), true).await?;
        Ok(())
    }

    /// The three headers every response carries.
    fn stamp(&self, resp: &mut ResponseHeader, ctx: &RequestCtx) -> Result<()> {
        resp.insert_header(WIRE_REQUEST_ID, ctx.request_id.clone())?;
        let (route, backend) = match &ctx.live {
            Some(l) => (
                l.route_live(ctx.route).header.clone(),
                ctx.backend
                    .map(|b| l.backend_headers[b].clone())
                    .unwrap_or(HeaderValue::from_static(NO_BACKEND)),
            ),
            None => (
                HeaderValue::from_static(DEFAULT_ROUTE),
                HeaderValue::from_static(NO_BACKEND),
            ),
        };
        resp.insert_header(WIRE_STRANGLER_ROUTE, route)?;
        resp.insert_header(WIRE_STRANGLER_BACKEND, backend)?;
        Ok(())
    }

    /// The split decision for route `i`: does this client go to `to`?
    fn split_to_target(&self, session: &Session, live: &LiveTable, i: usize) -> bool {
        let route = &live.table.routes[i];
        let Some(split) = &route.split else {
            return true;
        };
        let req = session.req_header();
        let client = peer_ip(session).map(|peer| {
            let xff = forwarding::header_list(&req.headers, &X_FORWARDED_FOR);
            forwarding::client_ip(peer, xff.as_deref(), &live.table.trusted_proxies)
        });
        let key = split::sticky_key(&split.sticky, &req.headers, client);
        split::decide(&route.name, split, key.as_deref())
    }
}

/// Whether a response is over once its header is out: no body can follow (HEAD, 204, 304, an
/// empty `Content-Length`), or the connection now belongs to the upgraded protocol (101).
/// An interim header (1xx other than 101) ends nothing, even for a HEAD: the answer follows.
fn header_ends_response(req: &RequestHeader, resp: &ResponseHeader) -> bool {
    let status = resp.status.as_u16();
    if resp.status.is_informational() && status != 101 {
        return false;
    }
    req.method == http::Method::HEAD
        || matches!(status, 101 | 204 | 304)
        || resp
            .headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() == b"0")
}

/// How long a client still owing part of its request body gets between two reads once its
/// response is complete (nginx's `lingering_timeout`).
const LINGER: Duration = Duration::from_secs(5);

/// The response is complete. A backend that answered before it read the whole request body (a
/// 413 or 401 cutting an upload short) leaves the rest to be read and dropped: a client that
/// sends no more of it, waiting for the connection to close, is let go after `LINGER`
/// instead of the backend's `timeout`, and the request ends with the answer it had.
fn linger(session: &mut Session) {
    if !session.is_body_done() {
        session.set_read_timeout(Some(LINGER));
    }
}

/// Whether an HTTP/1.1 client asked for `100 Continue` before its body.
fn expects_continue(req: &RequestHeader) -> bool {
    req.version >= http::Version::HTTP_11
        && req
            .headers
            .get(header::EXPECT)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
}

/// The response header the client has been sent, if any, leaving out an interim one (1xx
/// other than 101, which hands the connection over): after a `100 Continue` or `103 Early
/// Hints` the request still gets its final answer, the proxy's 502/504 included, and is
/// counted by that answer's status.
fn answer_written(session: &Session) -> Option<&ResponseHeader> {
    session.response_written().filter(|r| {
        !r.status.is_informational() || r.status == http::StatusCode::SWITCHING_PROTOCOLS
    })
}

/// A URL from `backend`'s response (`Location`, `Refresh`) as the client must see it, or `None`
/// to leave it alone: one at the answering backend's address goes to the client's scheme and
/// host; one inside a rewritten route's backend prefix goes back into the route's (nginx's
/// `proxy_redirect default`); then one at any other backend's address, so that a redirect from
/// one service to another's internal address does not leak it either.
fn client_url(
    live: &LiveTable,
    ctx: &RequestCtx,
    backend: &crate::router::Backend,
    host: &str,
    url: &str,
) -> Option<String> {
    let own = forwarding::rewrite_location(url, backend, "http", host);
    let relative = url.starts_with('/') && !url.starts_with("//");
    let unrewritten = match ctx.route.map(|i| &live.table.routes[i]) {
        Some(r) if ctx.to_target && (own.is_some() || relative) => {
            r.rewrite.as_deref().and_then(|rw| {
                forwarding::unrewrite_location(own.as_deref().unwrap_or(url), rw, &r.path)
            })
        }
        _ => None,
    };
    unrewritten.or(own).or_else(|| {
        live.table
            .backends
            .iter()
            .find_map(|b| forwarding::rewrite_location(url, b, "http", host))
    })
}

/// The authority the client asked for: its Host or, without one (HTTP/1.0, or an empty one),
/// the address it connected to. What rewritten `Location` and `Refresh` URLs point at.
fn client_authority<'a>(session: &Session, ctx: &'a RequestCtx) -> std::borrow::Cow<'a, str> {
    match ctx.client_host.as_ref().and_then(|h| h.to_str().ok()) {
        Some(h) => h.into(),
        None => session
            .server_addr()
            .and_then(|a| a.as_inet())
            .map_or_else(|| "localhost".to_string(), |a| a.to_string())
            .into(),
    }
}

/// Whether the request target, as the client wrote it, begins as a path (or `*`).
/// `raw_path` is Pingora's reading of it, which drops a `#fragment`: any target written
/// `#…` reaches the hooks as `/`, and only then do the written bytes need a look (every other
/// target that does not begin with `/` is passed on as written, and refused as it stands).
fn written_as_path(session: &Session) -> bool {
    if session.req_header().raw_path() != b"/" {
        return true;
    }
    let Some(h1) = session.as_downstream().as_http1() else {
        return true;
    };
    let head = h1.get_headers_raw_bytes();
    memchr::memchr(b' ', &head).is_none_or(|sp| path::written_as_path(&head[sp + 1..]))
}

/// The client's TCP address. An IPv4 client of a dual-stack listener (`[::]:8080`) arrives as
/// `::ffff:a.b.c.d`; it is taken as the IPv4 address it is, so `trusted_proxies`, split buckets
/// and `X-Forwarded-For` see one client the same way on every listener.
fn peer_ip(session: &Session) -> Option<IpAddr> {
    session
        .client_addr()
        .and_then(|a| a.as_inet())
        .map(|a| a.ip().to_canonical())
}

/// Exactly one Host on HTTP/1.1 (RFC 9112 §3.2): none, or two, is a 400.
fn host_ok(req: &RequestHeader) -> bool {
    forwarding::host_headers_ok(&req.headers, req.version == http::Version::HTTP_11)
}

#[async_trait]
impl ProxyHttp for Strangler {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            _active: Active::new(),
            start: Instant::now(),
            live: None,
            request_id: HeaderValue::from_static("-"),
            method: "OTHER",
            path: None,
            route: None,
            backend: None,
            to_target: false,
            to_generation: 0,
            failed_over: false,
            failed_over_at: None,
            stale_retried: false,
            upstream_fd: -1,
            refused_pooled: false,
            addr_turn: 0,
            addr_tried: None,
            addr_tries: 0,
            peer: None,
            probing: false,
            client_stalled: false,
            proxy_short: false,
            tunnel_closed: false,
            judged: false,
            success_counted: None,
            response_done: false,
            upstream_error: None,
            proxy_status: None,
            interim: 0,
            offered_upgrade: false,
            sent_continue: false,
            client_left: false,
            client_host: None,
            fields: forwarding::RequestFields::default(),
            _in_flight: None,
            shadow: None,
        }
    }

    /// Phase: the request header has just been read, before any module. Stops the connection's
    /// header clock (see `connection.rs`). Never fails.
    async fn early_request_filter(
        &self,
        session: &mut Session,
        _ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(clock) = session
            .as_downstream()
            .stream()
            .and_then(DeadlineStream::clock_of)
        {
            clock.header_done();
        }
        Ok(())
    }

    /// Phase: request header read, nothing sent upstream yet. Takes the table snapshot,
    /// normalises the target, routes, and picks the backend (pin → split → `to`). Answers 400
    /// itself for a target SPEC §3 refuses. Contract: `Ok(true)` means "answered already".
    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        // HTTP/1.1 pipelining is opt-in in Pingora: without it, requests a client sent back to
        // back after the first are dropped with the connection although the answer says
        // keep-alive. Pingora serves them in order once enabled.
        session.as_downstream_mut().set_pipelining_enabled(true);
        // A client that stops reading would otherwise hold its request, a backend connection
        // and the body pipeline's buffers for ever: each write to it must progress within
        // CLIENT_WRITE_TIMEOUT (nginx's `send_timeout`). The timer is armed only by a write
        // that blocks.
        session
            .as_downstream_mut()
            .set_write_timeout(Some(CLIENT_WRITE_TIMEOUT));
        if session.req_header().version < http::Version::HTTP_11 {
            // No 1xx to an HTTP/1.0 client (RFC 9110 §15.2): it would take one for the answer.
            session.as_downstream_mut().set_ignore_info_resp(true);
        }
        let live = self.state.snapshot();
        let req = session.req_header();
        ctx.method = metrics::method_label(&req.method);
        ctx.request_id = forwarding::request_id(req.headers.get(&X_REQUEST_ID));
        ctx.client_host = req
            .headers
            .get(header::HOST)
            .filter(|h| !h.is_empty())
            .cloned();
        ctx.live = Some(live.clone());

        if let Some(refusal) = self.limits.refusal(req.raw_path().len(), &req.headers) {
            self.answer(session, ctx, refusal, None).await?;
            return Ok(true);
        }
        let req = session.req_header();
        if let Some(why) = forwarding::method_refusal(&req.method) {
            self.answer(session, ctx, errors::BAD_REQUEST, Some(why))
                .await?;
            return Ok(true);
        }
        if !written_as_path(session) {
            let detail = path::PathError::NotOriginForm.to_string();
            self.answer(session, ctx, errors::BAD_REQUEST, Some(&detail))
                .await?;
            return Ok(true);
        }
        let req = session.req_header();
        let raw = req.raw_path();
        let normal = match path::normalize_target(raw, req.method == http::Method::OPTIONS) {
            Ok(p) => p,
            Err(e) => {
                let detail = e.to_string();
                self.answer(session, ctx, errors::BAD_REQUEST, Some(&detail))
                    .await?;
                return Ok(true);
            }
        };
        if !host_ok(session.req_header()) {
            self.answer(
                session,
                ctx,
                errors::BAD_REQUEST,
                Some("exactly one Host header, host[:port], is required"),
            )
            .await?;
            return Ok(true);
        }

        let headers = &session.req_header().headers;
        ctx.fields = forwarding::RequestFields::of(headers);
        // Both questions are about hop-by-hop fields: most requests hold none to ask them of.
        let refusal = if ctx.fields.connection || ctx.fields.hop_by_hop {
            forwarding::connection_refusal(headers)
                .or_else(|| forwarding::transfer_coding_refusal(headers))
        } else {
            None
        };
        if let Some(why) = refusal {
            self.answer(session, ctx, errors::BAD_REQUEST, Some(why))
                .await?;
            return Ok(true);
        }
        if ctx.fields.late_close {
            // The client said `close` on a later `Connection` line, which Pingora does not read:
            // the connection closes after this answer (RFC 9112 §9.6), and the answer says so.
            session.set_keepalive(None);
        }

        // A CORS preflight is routed as the request it announces.
        let req = session.req_header();
        let preflight = (req.method == http::Method::OPTIONS)
            .then(|| req.headers.get(&ACRM).and_then(|v| v.to_str().ok()))
            .flatten();
        let match_method = preflight.unwrap_or(req.method.as_str());
        let route = normal
            .as_ref()
            .and_then(|p| live.table.lookup(p, match_method));
        let default = live.table.default;
        let backend = match route {
            None => default,
            Some(i) => {
                let r = &live.table.routes[i];
                if live.routes[i].control.is_pinned() || !self.split_to_target(session, &live, i) {
                    default
                } else {
                    ctx.to_target = true;
                    ctx.to_generation = live.routes[i].control.to_window.generation();
                    // A reload swaps the table, then clears the windows whose `to` or rule
                    // changed: a request that took the table before the swap and read the
                    // generation after it would count its outcome in the new window.
                    if r.rollback.is_some() && !self.state.is_current(&live) {
                        ctx.to_generation = u64::MAX;
                    }
                    r.to
                }
            }
        };
        ctx.route = route;
        ctx.backend = Some(backend);
        ctx.path = normal;
        ctx._in_flight = Some(InFlight::new(live.route_live(route).control.clone()));
        if let Some(i) = route {
            ctx.shadow = shadow::tap(
                &live,
                i,
                backend,
                session.req_header(),
                ctx.path.as_ref(),
                &ctx.request_id,
                shadow::Client {
                    ip: peer_ip(session),
                    host: ctx.client_host.as_ref(),
                },
            )
            .map(Box::new);
        }
        // (`fields.dropped` says whether the request holds an `Expect` at all.)
        if ctx.fields.dropped && expects_continue(session.req_header()) && !session.is_body_empty()
        {
            // The request goes on: its body is wanted. Answered here, as nginx and Envoy do,
            // rather than left to a backend that may never send one: a client that then
            // withholds its body has stalled (408), and a silent backend is a 504 either way.
            // Pingora closes a connection answered before its request body is in (a final
            // answer that cuts an upload short cannot reuse it), and takes the 100 for such an
            // answer: every upload that asked for one would cost the client its connection.
            let keepalive = session.get_keepalive();
            session.write_continue_response().await?;
            session.set_keepalive(keepalive);
            ctx.sent_continue = true;
        }
        Ok(false)
    }

    /// Phase: before connecting (again, on a retry). Returns the chosen backend's peer with its
    /// timeouts. DNS was resolved when the table was built.
    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let (Some(live), Some(b)) = (&ctx.live, ctx.backend) else {
            return Error::e_explain(ErrorType::InternalError, "no backend chosen");
        };
        let backend = &live.table.backends[b];
        if !session.is_body_empty() {
            // A body read waits as long as this backend's wait for the response does: without
            // this, Pingora's 60 s would cut a client pausing mid-upload before a longer
            // `timeout` ran out, unanswered, and count it as gone (499).
            session.set_read_timeout(Some(backend.timeout));
            if let Some(tap) = &mut ctx.shadow {
                tap.request_restarts();
            }
        }
        if ctx.addr_tries == 0 {
            ctx.addr_turn = backend.addrs.turn();
            ctx.addr_tried = None;
        }
        let tried = ctx.addr_tried.as_deref();
        // Only a first attempt may try a passed-over address again: a request that failed
        // once is not made to wait on another that failed before.
        let Some(dns::Pick { addr, probe }) = backend.addrs.next(
            ctx.addr_turn,
            |a| tried.is_some_and(|t| t.contains(&Some(a))),
            ctx.addr_tries == 0,
        ) else {
            return Error::e_explain(ErrorType::ConnectNoRoute, "no backend address left to try");
        };
        ctx.peer = Some((b, addr));
        ctx.probing = probe;
        let mut peer = HttpPeer::new(addr, backend.tls, backend.sni.clone());
        let o = &mut peer.options;
        o.connection_timeout = Some(backend.connect_timeout);
        // `timeout` bounds the wait for the first response byte; Pingora applies it per read,
        // so it is also the longest silence tolerated mid-body.
        o.read_timeout = Some(backend.timeout);
        o.write_timeout = Some(backend.timeout);
        o.idle_timeout = Some(Duration::from_secs(60));
        if !ctx.fields.need_standard_policy() {
            // Nothing for Pingora's standard policy to strip or to refuse but a `Connection:
            // keep-alive`, which `upstream_request_filter` removes: its thirteen removals
            // would find nothing else. Any other hop-by-hop field keeps the standard policy.
            o.http_upstream_request_policy = HttpUpstreamRequestPolicy::preserve();
        }
        Ok(Box::new(peer))
    }

    /// Phase: each chunk of the request body on its way to the backend. The body streams; a
    /// shadowed GET's (a search query) is copied for the shadow request, bounded at 1 MiB.
    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()>
    where
        RequestCtx: Send + Sync,
    {
        if let Some(tap) = &mut ctx.shadow {
            tap.request_chunk(body.as_ref(), end_of_stream);
        }
        Ok(())
    }

    /// Phase: connected, request header about to be sent (once per attempt). Sets the
    /// normalised (and rewritten) path, Host, and the X-Forwarded-* / X-Request-Id headers.
    /// Pingora has already removed the hop-by-hop headers (its standard upstream policy, which
    /// `upstream_peer` leaves out for a request that holds none but `Connection: keep-alive`).
    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let (Some(live), Some(b)) = (&ctx.live, ctx.backend) else {
            return Ok(());
        };
        let backend = &live.table.backends[b];
        if let Some(p) = &ctx.path {
            let route = ctx.route.map(|i| &live.table.routes[i]);
            let target = upstream_path(route, ctx.to_target, backend, p);
            // Most requests arrive already normal: leave their target untouched then.
            if target.as_bytes() != up.raw_path() {
                up.set_raw_path(target.as_bytes())?;
            }
        }
        if let Some(h) = &backend.host_header {
            up.insert_header(header::HOST, h.as_str())?;
        } else if !up.headers.contains_key(header::HOST) {
            // HTTP/1.0 without a Host: the upstream request is HTTP/1.1, which needs one
            // (RFC 9112 §3.2); the backend's own address, as nginx sends. An empty Host (which
            // that section allows for a target without an authority) is the client's: kept.
            up.insert_header(header::HOST, backend.authority())?;
        }
        let fields = ctx.fields;
        if fields.connection && !fields.need_standard_policy() {
            // All the standard policy would have done (`upstream_peer`): the client's wish to
            // keep its connection says nothing of the proxy's own to the backend.
            up.remove_header(&header::CONNECTION);
        }
        if fields.dropped {
            // Only the proxy's shadow copies carry it: a client's would pass a real request off
            // as a shadow copy to a service that skips side effects for those.
            up.remove_header(&shadow::X_STRANGLER_SHADOW);
            // RFC 7239's `Forwarded` says what `X-Forwarded-*` say, and frameworks that read
            // it prefer it: a client's own would override the proto and host the proxy sets.
            up.remove_header(&header::FORWARDED);
            // The proxy answers `Expect: 100-continue` itself (`request_filter`), and an
            // HTTP/1.0 client's must be ignored (RFC 9110 §10.1.1): the backend never sees it.
            up.remove_header(&header::EXPECT);
        }
        if fields.lookalike {
            let lookalikes: Vec<HeaderName> = up
                .headers
                .keys()
                .filter(|n| forwarding::own_field_lookalike(n))
                .cloned()
                .collect();
            for name in lookalikes {
                up.remove_header(&name);
            }
        }
        if let Some(length) = forwarding::collapsed_content_length(&up.headers) {
            up.insert_header(header::CONTENT_LENGTH, length)?;
        }
        if let Some(peer) = peer_ip(session) {
            let existing = fields
                .forwarded_for
                .then(|| forwarding::header_list(&up.headers, &X_FORWARDED_FOR))
                .flatten();
            let xff = forwarding::forwarded_for(existing.as_deref(), peer);
            up.insert_header(WIRE_FORWARDED_FOR, xff)?;
        }
        up.insert_header(WIRE_FORWARDED_PROTO, PROTO_HTTP.clone())?;
        if let Some(h) = &ctx.client_host {
            up.insert_header(WIRE_FORWARDED_HOST, h.clone())?;
        } else if fields.dropped {
            // No Host to report: the client's own claim must not pass for the proxy's.
            up.remove_header(&forwarding::X_FORWARDED_HOST);
        }
        up.insert_header(WIRE_REQUEST_ID, ctx.request_id.clone())?;
        // (A request without any hop-by-hop field has no `Upgrade` to look for.)
        ctx.offered_upgrade = fields.hop_by_hop && up.headers.contains_key(header::UPGRADE);
        Ok(())
    }

    /// Phase: the backend's response header arrived. Rewrites a `Location` or `Set-Cookie`
    /// that would leak the backend's address, and drops hop-by-hop headers.
    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A passed-over address tried again answered: no longer passed over.
        if let (true, Some(live), Some((b, addr))) = (ctx.probing, &ctx.live, ctx.peer) {
            live.table.backends[b].addrs.answered(addr);
        }
        if resp.status == http::StatusCode::SWITCHING_PROTOCOLS && !ctx.offered_upgrade {
            // A server must not switch to a protocol the request did not offer (RFC 9110
            // §15.2.2): relayed, it would leave the client on a connection that is neither
            // HTTP nor a tunnel. That includes a client's offer the proxy did not pass on (an
            // HTTP/1.0 client's, which cannot upgrade; `h2c`). An invalid response: 502.
            return Err(Error::explain(
                ErrorType::InvalidHTTPHeader,
                "101 Switching Protocols to a request that asked for no upgrade",
            )
            .into_up());
        }
        if resp.status.is_informational() && resp.status != http::StatusCode::SWITCHING_PROTOCOLS {
            ctx.interim += 1;
            if ctx.interim > MAX_INTERIM {
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    format!("more than {MAX_INTERIM} interim (1xx) responses to one request"),
                )
                .into_up());
            }
        }
        // A list of equal lengths, which Pingora accepts, goes on as one value (RFC 9110
        // §8.6): Node's and Go's HTTP clients refuse the list.
        if let Some(length) = forwarding::collapsed_content_length(&resp.headers) {
            resp.insert_header(header::CONTENT_LENGTH, length)?;
        }
        if resp.status.is_informational() || resp.status == http::StatusCode::NO_CONTENT {
            // No body follows a 1xx or a 204, which must not carry `Content-Length` or
            // `Transfer-Encoding` (RFC 9110 §8.6, RFC 9112 §6.1): Pingora frames them as empty
            // whatever they say, and a client (or a proxy in front) that believed a backend's
            // would read the next answer on the connection as this one's body.
            resp.remove_header(&header::CONTENT_LENGTH);
            resp.remove_header(&header::TRANSFER_ENCODING);
        }
        let fields = forwarding::ResponseFields::of(&resp.headers);
        if fields.transfer_encoding {
            if let Some(why) = forwarding::transfer_coding_refusal(&resp.headers) {
                return Err(Error::explain(
                    ErrorType::InvalidHTTPHeader,
                    format!("the backend's answer: {why}"),
                )
                .into_up());
            }
        }
        if fields.late_close && !resp.status.is_informational() {
            // Pingora reads the first `Connection` line only, and would pool the connection.
            upstream_close::said_close(ctx.upstream_fd);
        }
        strip_hop_by_hop(resp, fields)?;
        let (Some(live), Some(b)) = (&ctx.live, ctx.backend) else {
            return Ok(());
        };
        let backend = &live.table.backends[b];
        if !fields.urls && !fields.set_cookie {
            tap_primary(resp, ctx);
            return Ok(());
        }
        // Read as UTF-8, not `to_str` (visible ASCII only): a Location or Set-Cookie carrying
        // raw UTF-8 (an IRI path) must be rewritten as well, or it leaks the backend. The
        // URL a `Content-Location` names follows the same rule.
        for (name, spelling) in [
            (header::LOCATION, "Location"),
            (header::CONTENT_LOCATION, "Content-Location"),
        ] {
            if let Some(loc) = resp
                .headers
                .get(&name)
                .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
            {
                let host = client_authority(session, ctx);
                if let Some(new) = client_url(live, ctx, backend, &host, loc) {
                    // By its usual spelling: the case-preserving map sends the name as given.
                    resp.insert_header(spelling, new)?;
                }
            }
        }
        // And the targets of a `Link` (pagination: `<http://backend/…?page=2>; rel="next"`).
        if resp.headers.contains_key(header::LINK) {
            let host = client_authority(session, ctx);
            let links: Vec<HeaderValue> =
                resp.headers.get_all(header::LINK).iter().cloned().collect();
            let rewritten: Vec<Option<String>> = links
                .iter()
                .map(|l| {
                    let l = std::str::from_utf8(l.as_bytes()).ok()?;
                    forwarding::rewrite_link(l, |url| client_url(live, ctx, backend, &host, url))
                })
                .collect();
            if rewritten.iter().any(Option::is_some) {
                resp.remove_header(&header::LINK);
                for (old, new) in links.into_iter().zip(rewritten) {
                    let value = new.and_then(|n| HeaderValue::try_from(n).ok());
                    resp.append_header("Link", value.unwrap_or(old))?;
                }
            }
        }
        if let Some(refresh) = resp
            .headers
            .get(header::REFRESH)
            .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
        {
            let host = client_authority(session, ctx);
            let new = forwarding::rewrite_refresh(refresh, |url| {
                client_url(live, ctx, backend, &host, url)
            });
            if let Some(new) = new {
                resp.insert_header("Refresh", new)?;
            }
        }
        if fields.set_cookie {
            let mut hosts = vec![backend.host.as_str()];
            if let Some(h) = &backend.host_header {
                hosts.push(h.split(':').next().unwrap_or(h));
            }
            let cookies: Vec<HeaderValue> = resp
                .headers
                .get_all(header::SET_COOKIE)
                .iter()
                .cloned()
                .collect();
            let mut changed = false;
            let rewritten: Vec<HeaderValue> = cookies
                .iter()
                .map(|c| {
                    match std::str::from_utf8(c.as_bytes())
                        .ok()
                        .and_then(|s| forwarding::strip_cookie_domain(s, &hosts))
                    {
                        Some(new) => {
                            changed = true;
                            HeaderValue::from_str(&new).unwrap_or_else(|_| c.clone())
                        }
                        None => c.clone(),
                    }
                })
                .collect();
            if changed {
                resp.remove_header(&header::SET_COOKIE);
                for c in rewritten {
                    resp.append_header(header::SET_COOKIE, c)?;
                }
            }
        }
        tap_primary(resp, ctx);
        Ok(())
    }

    /// Phase: response header about to go to the client. Adds X-Request-Id, X-Strangler-Route
    /// and X-Strangler-Backend.
    async fn response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if resp.status.as_u16() >= 200 {
            self.judge_target(ctx, resp.status.as_u16() >= 500);
        }
        ctx.response_done = header_ends_response(session.req_header(), resp);
        if ctx.response_done {
            linger(session);
        }
        if crate::server::DRAINING.load(std::sync::atomic::Ordering::Acquire) {
            // Shutting down: this connection closes after the response, and says so.
            session.set_keepalive(None);
        } else if session
            .get_keepalive()
            .is_some_and(|secs| secs == 0 || secs > self.keepalive_secs)
        {
            // Pingora waits forever for an HTTP/1.1 client's next request: an idle connection
            // is closed after `--keepalive-timeout`, as nginx's `keepalive_timeout` does, so
            // idle clients cannot hold every descriptor.
            session.set_keepalive(Some(self.keepalive_secs));
        }
        if resp.version < http::Version::HTTP_11 {
            // An HTTP/1.0 backend's answer goes out in the proxy's own version (RFC 9110 §6.2);
            // its framing (a length, or the end of the connection) holds in HTTP/1.1 too.
            resp.set_version(http::Version::HTTP_11);
        }
        if session.req_header().version < http::Version::HTTP_11
            && resp.headers.contains_key(header::TRANSFER_ENCODING)
        {
            // Pingora re-frames a body of unknown length as chunked, which an HTTP/1.0 client
            // does not read (RFC 9112 §6.1): without the header the body is written as is, and
            // its end is the end of the connection.
            resp.remove_header(&header::TRANSFER_ENCODING);
            session.set_keepalive(None);
        }
        self.stamp(resp, ctx)
    }

    /// Phase: each chunk of the response body on its way to the client. The body streams; the
    /// only copy kept is the shadow comparison's, bounded at 1 MiB.
    fn response_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<Option<Duration>> {
        if let Some(tap) = &mut ctx.shadow {
            tap.primary_chunk(body.as_ref(), end_of_stream);
        }
        if end_of_stream && !ctx.response_done {
            ctx.response_done = true;
            linger(session);
        }
        Ok(None)
    }

    /// Phase: connecting to the backend failed. Nothing was sent, so the request moves to the
    /// backend's next address, if its name has several (up to `dns::MAX_TRIES`); then, with
    /// `failover`, it is retried once on `default`. Otherwise the error is final.
    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if errors::proxy_out_of_resources(&e) {
            // The proxy's own shortage: no other address, no failover (they would fail
            // alike), nothing held against the backend, which was never reached: the answer,
            // its headers and its metrics name no backend (`none`, as for a refused request).
            // Pingora logs the error itself.
            ctx.proxy_short = true;
            ctx.backend = None;
            e.set_retry(false);
            return e;
        }
        // Every failed attempt is the backend's upstream error, even one the next address
        // makes good: the dashboards see a dying address before the clients do.
        record_upstream_error(ctx, UpstreamErrorKind::Connect);
        let tried = ctx
            .addr_tried
            .get_or_insert_with(|| Box::new([None; dns::MAX_TRIES]));
        if let Some(slot) = tried.get_mut(ctx.addr_tries) {
            *slot = ctx.peer.map(|(_, a)| a);
        }
        ctx.addr_tries += 1;
        if let (Some(live), Some(b)) = (&ctx.live, ctx.backend) {
            let backend = &live.table.backends[b];
            let addrs = &backend.addrs;
            if let Some((_, addr)) = ctx.peer.filter(|&(pb, a)| pb == b && addrs.eject(a)) {
                log::warn!(
                    backend = &*backend.name,
                    address = addr.to_string();
                    "backend {:?}: cannot connect to {addr} ({}); its other addresses take its requests until it answers (tried again every {} s)",
                    backend.name,
                    e.etype().as_str(),
                    dns::EJECT.as_secs()
                );
            }
            if ctx.addr_tries < addrs.tries() && !client_closed(session) {
                e.set_retry(true);
                return e;
            }
        }
        ctx.upstream_error = Some(UpstreamErrorKind::Connect);
        let retry = self.fail_over(session, ctx);
        e.set_retry(retry);
        e
    }

    /// Phase: a connection to the backend was made or taken from the pool; the request is not
    /// written yet. A pooled one its backend said it would close is refused (`upstream_close`):
    /// closed, and the request sent on another (`error_while_proxy`).
    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        fd: RawFd,
        _digest: Option<&Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        ctx.upstream_fd = fd;
        if upstream_close::refuse(fd, reused) {
            ctx.refused_pooled = true;
            return Error::e_explain(ErrorType::ConnectionClosed, POOLED_SAID_CLOSE);
        }
        Ok(())
    }

    /// Phase: an error after the connection was made (or reused). Pingora's policy is kept
    /// (idempotent requests on a reused connection are retried once it closed under us); in
    /// addition, with `failover`, a GET/HEAD whose backend timed out before any response byte
    /// is retried on `default`.
    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        if std::mem::take(&mut ctx.refused_pooled) {
            // Nothing of the request went out: any method goes again, on another connection,
            // and it was no failure of the backend's.
            log::debug!(
                "request {}: {e}; sent on another connection",
                ctx.request_id.to_str().unwrap_or("-")
            );
            let mut e = e;
            e.set_retry(true);
            return e;
        }
        let mut e = e.more_context(format!("Peer: {peer}"));
        // After a 101 the connection carries the upgraded protocol: a tunnel left idle for the
        // backend's `timeout` (nginx's `proxy_read_timeout` ends it the same way), or an https
        // backend closing it without TLS `close_notify` once the WebSocket's own close
        // handshake is done, is how it ends, not a failure of the backend.
        if answer_written(session)
            .is_some_and(|r| r.status == http::StatusCode::SWITCHING_PROTOCOLS)
            && errors::ends_tunnel(&e)
        {
            ctx.tunnel_closed = true;
            e.set_retry(false);
            log::info!(
                "upgraded connection of request {} on route {:?} closed: {}",
                ctx.request_id.to_str().unwrap_or("-"),
                ctx.route_name(),
                if *e.etype() == ErrorType::ReadTimedout {
                    "idle for the backend's timeout"
                } else {
                    "the backend closed or reset it"
                }
            );
            return e;
        }
        // Pingora waits for the response while it relays the request body, and restarts that
        // wait at every chunk the client sends: a read that times out before the body is done
        // means the client went silent for `timeout` (a client that asked for `100 Continue`
        // had it from the proxy: it owed its body too). The client's own read of the body has
        // the same timeout (`upstream_peer`), and whichever fires first says the same. Not the
        // backend's failure: no upstream error, no rollback judgement, no failover, no retry;
        // the client, still connected, gets a 408.
        if *e.etype() == ErrorType::ReadTimedout && !session.is_body_done() {
            ctx.client_stalled = true;
            if ctx.failed_over {
                // `to` failed before the stall, and counts so.
                self.judge_target(ctx, true);
            } else {
                ctx.judged = true;
            }
            e.set_retry(false);
            return e;
        }
        let kind = UpstreamErrorKind::of(&e);
        let idempotent = session.req_header().method.is_idempotent();
        // A stale-connection retry happens once: Pingora would take the next pooled connection
        // for each retry, so a request that kills its backend worker would be replayed on every
        // idle connection. And never after an interim (1xx) answer went to the client: a retry
        // would wait the whole exchange again, and relay its 1xx a second time.
        if !idempotent
            || session.as_ref().retry_buffer_truncated()
            || ctx.stale_retried
            || backend_answer_begun(session, ctx)
        {
            e.set_retry(false);
        } else {
            if errors::closed_before_answer(&e) {
                // A pooled https connection the backend closed: as stale as a plain one.
                e.retry = pingora_error::RetryType::ReusedOnly;
            }
            e.retry.decide_reuse(client_reused);
            ctx.stale_retried |= e.retry();
        }
        let retrying = e.retry();
        if let Some(kind) = kind {
            // A retried stale keep-alive connection is not the backend's failure.
            if !retrying {
                ctx.upstream_error = Some(kind);
                record_upstream_error(ctx, kind);
            }
        }
        let get_or_head = matches!(
            session.req_header().method,
            http::Method::GET | http::Method::HEAD
        );
        // Replayed on `default` only whole: a body larger than Pingora's retry buffer (64 KiB)
        // cannot be sent again. A backend whose TLS refused the proxy after the handshake (TLS
        // 1.3) never read the request: that is a failure to connect, any method fails over.
        if !retrying
            && ((kind == Some(UpstreamErrorKind::Timeout) && get_or_head)
                || kind == Some(UpstreamErrorKind::Connect))
            && !backend_answer_begun(session, ctx)
            && !session.as_ref().retry_buffer_truncated()
            && self.fail_over(session, ctx)
        {
            e.set_retry(true);
        }
        e
    }

    /// Phase: the request failed for good. Writes the JSON error (502, 504, 400) unless the
    /// client is gone. Contract: returns the status for logging; the connection is not reused.
    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy
    where
        RequestCtx: Send + Sync,
    {
        let err = if ctx.client_stalled {
            Some(errors::REQUEST_TIMEOUT)
        } else {
            ProxyError::for_error(e)
        };
        let Some(err) = err else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        if answer_written(session).is_some() {
            // Mid-body failure: the status is already out; the client sees a truncated response.
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        ctx.client_left |= client_closed(session);
        if *e.esource() == ErrorSource::Downstream && !ctx.failed_over {
            // The client's side failed (a malformed request body): that says nothing of the
            // backend, neither good nor bad. (After a failover, `to` has failed already.)
            ctx.judged = true;
        } else {
            self.judge_target(ctx, err.status >= 500);
        }
        let detail = e.etype().as_str();
        if ctx.client_left {
            // Nobody to answer: counted as a 499 (`logging`).
        } else if let Err(we) = self.answer(session, ctx, err, Some(detail)).await {
            log::debug!("could not send the error response: {we}");
        }
        FailToProxy {
            error_code: err.status,
            can_reuse_downstream: false,
        }
    }

    /// Pingora's error log lines about a request ("Fail to proxy: …", "Fail to connect …")
    /// end with this: Pingora's own summary (method, path, Host), then what ties the line to
    /// the rest — the request id the client's error body and `X-Request-Id` carry, the route,
    /// and the backend with the address of the last attempt (a name may have several).
    fn request_summary(&self, session: &Session, ctx: &RequestCtx) -> String {
        use std::fmt::Write;
        let mut s = session.as_downstream().request_summary();
        let _ = write!(
            s,
            ", request_id: {}, route: {}",
            ctx.request_id.to_str().unwrap_or("-"),
            ctx.route_name()
        );
        // The backend of the attempt that failed (after a failover, `ctx.backend` is
        // already the default).
        match (&ctx.live, ctx.peer, ctx.backend) {
            (Some(live), Some((b, a)), _) => {
                let _ = write!(s, ", backend: {} at {a}", live.table.backends[b].name);
            }
            (Some(live), None, Some(b)) => {
                let _ = write!(s, ", backend: {}", live.table.backends[b].name);
            }
            _ => {}
        }
        s
    }

    /// Pingora warns of every retry; the refusal of a pooled connection its backend said it
    /// would close is routine (`error_while_proxy` logs it at debug).
    fn suppress_proxy_warn_log(
        &self,
        _session: &Session,
        _ctx: &RequestCtx,
        e: &Error,
        _context: ProxyWarnLogContext,
    ) -> bool {
        e.context
            .as_ref()
            .is_some_and(|c| c.as_str() == POOLED_SAID_CLOSE)
    }

    /// Pingora logs a request that ended in an error at level error; a tunnel that ended as
    /// tunnels do was logged at info in `error_while_proxy` instead.
    fn suppress_error_log(&self, _session: &Session, ctx: &RequestCtx, e: &Error) -> bool {
        // A client that went away is not an error of the proxy (nginx logs it at info, as
        // `logging` does here; the request counts as a 499).
        ctx.tunnel_closed || ctx.client_left || client_went_away(e)
    }

    /// Phase: the request is over (answered, failed, or abandoned). Counts it: requests, latency,
    /// the last-minute view, the rollback window (and pins the route when it crosses the
    /// threshold), and hands the shadow its copy of the primary response.
    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx)
    where
        RequestCtx: Send + Sync,
    {
        if let Some(clock) = session
            .as_downstream()
            .stream()
            .and_then(DeadlineStream::clock_of)
        {
            clock.request_done();
        }
        let Some(live) = ctx.live.clone() else {
            return;
        };
        let client_gone =
            ctx.client_left || (!ctx.client_stalled && e.is_some_and(client_went_away));
        let code: u16 = if client_gone && !ctx.response_done {
            log::info!(
                "request {} on route {:?}: the client went away ({}): 499",
                ctx.request_id.to_str().unwrap_or("-"),
                ctx.route_name(),
                e.map_or("", |e| e.etype().as_str())
            );
            499
        } else if let Some(s) = ctx.proxy_status {
            s
        } else {
            answer_written(session)
                .map(|r| r.status.as_u16())
                .unwrap_or(if e.is_some() { 502 } else { 200 })
        };
        let rl = live.route_live(ctx.route);
        let backend = ctx.backend_name();
        let counted = !ctx.series_retired();
        if counted {
            rl.requests.inc(ctx.backend, backend, ctx.method, code);
        }
        let now = Instant::now();
        if let Some(b) = ctx.backend {
            if counted {
                let began = ctx.failed_over_at.unwrap_or(ctx.start);
                rl.observe(b, backend, now.duration_since(began).as_secs_f64());
            }
            let failed = code >= 500 || ctx.upstream_error.is_some();
            rl.recent[b].record(now, crate::state::RECENT, failed);
        }
        if let Some(tap) = ctx.shadow.take() {
            (*tap).finish(client_gone || e.is_some());
        }
        // Normally judged when the response header went out (its status decides, and the next
        // request may already go to `default`); what is left is a request that never got one
        // (an upstream error the error page answered, or a client that left first), judged
        // now, and a success whose backend then timed out or broke off mid-body: a failure after
        // all (a truncated 200 failed the client as much as a 502; `/routes` counts it as an
        // error of that backend too). A client that left while the backend was doing fine says
        // nothing about the backend; one that left after `to` had failed and the request had
        // gone on to `default` does not undo that failure (an unreachable `to` that makes every
        // client wait its `connect_timeout` must still be rolled back when they give up).
        if !(client_gone && ctx.upstream_error.is_none()) || ctx.failed_over {
            let failed = ctx.failed_over || ctx.upstream_error.is_some() || code >= 500;
            self.judge_target(ctx, failed);
        }
    }
}

/// Hop-by-hop fields (RFC 9110 §7.6.1) of a backend's response end here, a 101's included: of
/// its `Connection` only `Upgrade` goes on, the switch the client asked for. `fields` says which
/// are there: a removal of an absent field still costs two lookups.
fn strip_hop_by_hop(resp: &mut ResponseHeader, fields: forwarding::ResponseFields) -> Result<()> {
    let switching = resp.status == http::StatusCode::SWITCHING_PROTOCOLS;
    if fields.connection_options {
        let nominated = forwarding::connection_nominated(&resp.headers);
        let others = nominated.iter().any(|n| n != header::UPGRADE);
        for n in nominated {
            if !(switching && n == header::UPGRADE) {
                resp.remove_header(&n);
            }
        }
        if switching && others {
            resp.insert_header(header::CONNECTION, "Upgrade")?;
        }
    }
    if fields.connection && resp.status.is_informational() && !switching {
        // Pingora writes the final answer's `Connection` itself, not an interim one's.
        resp.remove_header(&header::CONNECTION);
    }
    if fields.hop_by_hop {
        resp.remove_header(&forwarding::KEEP_ALIVE);
        resp.remove_header(&forwarding::PROXY_CONNECTION);
        // Hop-by-hop too: a proxy's authentication challenge is meant for the next client of
        // the chain only; `TE` is a request field, meaningless in an answer. `Trailer`
        // announces trailer fields that Pingora 0.9 does not forward over HTTP/1.1 (its chunked
        // reader drops them), so the client would wait for fields that never come; the
        // request's goes too (Pingora's upstream policy), as RFC 2616 listed it hop-by-hop.
        resp.remove_header(&header::PROXY_AUTHENTICATE);
        resp.remove_header(&header::TE);
        resp.remove_header(&header::TRAILER);
    }
    if fields.upgrade && !switching {
        // An `Upgrade` offer outside a 101 is this hop's business.
        resp.remove_header(&header::UPGRADE);
    }
    Ok(())
}

/// The primary's status and coding, for the shadow comparison of this request if it has one.
fn tap_primary(resp: &ResponseHeader, ctx: &mut RequestCtx) {
    if let Some(tap) = &mut ctx.shadow {
        tap.primary_header(
            resp.status.as_u16(),
            resp.headers.get(header::CONTENT_ENCODING),
        );
    }
}

impl Strangler {
    /// Counts the outcome of a request sent to its route's `to` in the automatic-rollback
    /// window, once per request, and pins the route when the window crosses its threshold.
    /// Called as soon as the outcome is known — before the response goes to the client — so
    /// that the request after the one that crossed the threshold is already served by `default`.
    /// After a failover the attempt on `to` failed: that counts as a failure.
    fn judge_target(&self, ctx: &mut RequestCtx, failed: bool) {
        if ctx.proxy_short && !ctx.failed_over {
            // The backend was never reached, for want of the proxy's own resources. (After a
            // failover, `to` had failed first: that is judged, as any failover is.)
            ctx.judged = true;
            return;
        }
        // Judged once; but a success judged at its header that fails afterwards becomes a
        // failure (the request stays counted once).
        let late_failure = ctx.judged && ctx.success_counted.is_some() && failed;
        if ctx.judged && !late_failure {
            return;
        }
        ctx.judged = true;
        let (Some(live), Some(i)) = (&ctx.live, ctx.route) else {
            return;
        };
        if !(ctx.to_target || ctx.failed_over) {
            return;
        }
        let route = &live.table.routes[i];
        let Some(rule) = &route.rollback else {
            return;
        };
        let failed = failed || ctx.failed_over;
        let now = Instant::now();
        let control = &live.routes[i].control;
        if ctx.to_generation != control.to_window.generation() {
            // A reload (another `to` or another rule) or a resume cleared the window since the
            // request was sent: its outcome belongs to no window in force, and the rule it
            // would be judged by may be gone.
            return;
        }
        if let Some(counted) = ctx.success_counted.take() {
            control.to_window.fail_counted(counted);
        } else {
            let counted = control
                .to_window
                .record_in(ctx.to_generation, now, rule.window, failed);
            ctx.success_counted = counted.filter(|_| !failed);
        }
        // Judged on every request, not only on failures: failures first and successes after can
        // meet the rule when the request that reaches `min_requests` is a success.
        if !control.is_pinned() {
            let (requests, failures) = control.to_window.totals(now, rule.window);
            if rollback::should_roll_back(
                requests,
                failures,
                rule.min_requests,
                rule.error_rate_percent,
            ) {
                let why = format!(
                    "{failures} of {requests} requests to {} failed within {:?} (threshold {}% of at least {})",
                    live.table.backends[route.to].name,
                    rule.window,
                    rule.error_rate_percent,
                    rule.min_requests
                );
                self.state.auto_pin(live, i, &why);
            }
        }
    }

    /// Switches the request to `default` for one retry if its route allows failover and it has
    /// not failed over yet. Returns whether a retry should happen.
    fn fail_over(&self, session: &Session, ctx: &mut RequestCtx) -> bool {
        let (Some(live), Some(i), Some(b)) = (&ctx.live, ctx.route, ctx.backend) else {
            return false;
        };
        let route = &live.table.routes[i];
        let default = live.table.default;
        if !route.failover || ctx.failed_over || b == default {
            return false;
        }
        // Pingora does not watch the client while it connects: one that left during a slow
        // connect would have its request (a POST too) started again where nobody reads the
        // answer.
        if client_closed(session) {
            ctx.client_left = true;
            return false;
        }
        if !ctx.series_retired() && !live.backend_retired(default) {
            metrics::FAILOVERS
                .with_label_values(&[
                    &*route.name,
                    &*live.table.backends[b].name,
                    &*live.table.backends[default].name,
                ])
                .inc();
        }
        let (request_id, from, to) = (
            ctx.request_id.to_str().unwrap_or("-"),
            &*live.table.backends[b].name,
            &*live.table.backends[default].name,
        );
        log::warn!(
            request_id = request_id,
            route = &*route.name,
            from = from,
            to = to;
            "request {request_id} on route {:?}: {from} unreachable, failing over to {to}",
            route.name
        );
        // The attempt on `to` failed: the last-minute view (`/routes`) shows it there, as the
        // metrics do (`strangler_upstream_errors_total`); the request itself is then counted on
        // `default`.
        let now = Instant::now();
        live.route_live(Some(i)).recent[b].record(now, crate::state::RECENT, true);
        ctx.failed_over = true;
        ctx.failed_over_at = Some(now);
        ctx.to_target = false;
        ctx.backend = Some(default);
        ctx.upstream_error = None;
        ctx.addr_tries = 0;
        true
    }
}

/// Whether the backend's answer has begun to reach the client: a response header written
/// other than the proxy's own `100 Continue` (which asked the client for its body, and says
/// nothing of the backend's answer). Once it has, a retry would relay the backend's again.
fn backend_answer_begun(session: &Session, ctx: &RequestCtx) -> bool {
    session.response_written().is_some_and(|r| {
        !(ctx.sent_continue && ctx.interim == 0 && r.status == http::StatusCode::CONTINUE)
    })
}

/// Whether the client has closed (or reset) its connection: its socket polls as hung up
/// (`POLLRDHUP`: its end-of-file has arrived, even behind body bytes not read yet) or in error.
/// Nothing is read, and a pending error is left where it is.
fn client_closed(session: &Session) -> bool {
    let Some(stream) = session.as_downstream().stream() else {
        return false;
    };
    let mut fd = libc::pollfd {
        fd: stream.id(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: one pollfd on the stack, for the socket of this session's client (`id` is its
    // descriptor), which the session keeps open; a timeout of 0 never blocks.
    let ready = unsafe { libc::poll(&mut fd, 1, 0) };
    ready > 0 && fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The client's side of the request broke off: it closed, reset, or stopped reading or
/// sending for longer than its timeouts.
fn client_went_away(e: &Error) -> bool {
    *e.esource() == ErrorSource::Downstream
        && matches!(
            e.etype(),
            ErrorType::ReadError
                | ErrorType::WriteError
                | ErrorType::ConnectionClosed
                | ErrorType::ReadTimedout
                | ErrorType::WriteTimedout
        )
}

fn record_upstream_error(ctx: &RequestCtx, kind: UpstreamErrorKind) {
    if ctx.series_retired() {
        return;
    }
    metrics::UPSTREAM_ERRORS
        .with_label_values(&[ctx.route_name(), ctx.backend_name(), kind.as_str()])
        .inc();
}
