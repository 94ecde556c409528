//! Header rules of SPEC §4 as pure functions: the request id, `X-Forwarded-For`, and the
//! response rewrites that keep backend addresses from leaking (`Location`, `Set-Cookie`).

use std::borrow::Cow;
use std::net::IpAddr;

use http::{HeaderMap, HeaderName, HeaderValue};
use rand::RngCore;

use crate::router::{Backend, Cidr};

/// The client's `X-Request-Id` when it is usable (1–128 visible ASCII characters), else a new
/// random one (32 hex digits). A header value, so it is stamped on requests and responses
/// without being copied again.
pub fn request_id(client: Option<&HeaderValue>) -> HeaderValue {
    match client {
        Some(v)
            if !v.is_empty()
                && v.len() <= 128
                && v.as_bytes().iter().all(|b| (0x21..0x7f).contains(b)) =>
        {
            v.clone()
        }
        _ => {
            let mut bytes = [0u8; 16];
            rand::thread_rng().fill_bytes(&mut bytes);
            let mut hex = [0u8; 32];
            const DIGITS: &[u8; 16] = b"0123456789abcdef";
            for (i, b) in bytes.iter().enumerate() {
                hex[2 * i] = DIGITS[usize::from(b >> 4)];
                hex[2 * i + 1] = DIGITS[usize::from(b & 15)];
            }
            HeaderValue::from_bytes(&hex).unwrap_or(HeaderValue::from_static("invalid"))
        }
    }
}

/// Whether a request's `Host` headers are acceptable: exactly one, with a valid value
/// ([`host_value_ok`]), or none at all when one is not `required` (HTTP/1.0; `explain` without
/// `-H Host`).
pub fn host_headers_ok(headers: &HeaderMap, required: bool) -> bool {
    let mut hosts = headers.get_all(http::header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(h), None) => host_value_ok(h.as_bytes()),
        (None, None) => !required,
        _ => false,
    }
}

/// Whether a `Host` value is one the proxy may repeat (in `X-Forwarded-Host`, in a rewritten
/// `Location`): empty (RFC 9112 §3.2 allows it when the target has no authority), or
/// `host[:port]` — a name, an IPv4 address or a bracketed IPv6 literal, an optional decimal
/// port, no user information. Anything else (`evil.example/phish?`, `a@b`) is answered 400,
/// as RFC 9112 §3.2 asks of "a Host header field with an invalid field value".
pub fn host_value_ok(value: &[u8]) -> bool {
    if value.is_empty() {
        return true;
    }
    // Read in place: a parse through `http::uri::Authority` copies the value first, and this
    // runs on every request.
    let (host_ok, rest) = match value.strip_prefix(b"[") {
        Some(v6) => match v6.iter().position(|&b| b == b']') {
            Some(end) => (
                std::str::from_utf8(&v6[..end])
                    .is_ok_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok()),
                &v6[end + 1..],
            ),
            None => return false,
        },
        None => {
            let end = value.iter().position(|&b| b == b':').unwrap_or(value.len());
            let host = &value[..end];
            let name_ok = !host.is_empty()
                && host
                    .iter()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
            (name_ok, &value[end..])
        }
    };
    // What follows the host is nothing or `:PORT`, 1 to 5 digits up to 65535 (`h:` has an
    // empty port, which is no port).
    let port_ok = match rest {
        [] => true,
        [b':', digits @ ..] => {
            (1..=5).contains(&digits.len())
                && digits.iter().all(u8::is_ascii_digit)
                && digits
                    .iter()
                    .fold(0u32, |n, d| n * 10 + u32::from(d - b'0'))
                    <= 65535
        }
        _ => false,
    };
    host_ok && port_ok
}

/// `X-Forwarded-For`, to read what the client sent.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// A `const` (not a `static`) so that tables of header names elsewhere can list it.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

// Header names as written on the wire, for the primary request and the shadow copy alike.
// Pingora keeps each header's case beside the map; a `&'static str` name costs it one copy less
// than a `HeaderName` (which it re-titles and copies).
pub const WIRE_REQUEST_ID: &str = "X-Request-Id";
pub const WIRE_FORWARDED_FOR: &str = "X-Forwarded-For";
pub const WIRE_FORWARDED_PROTO: &str = "X-Forwarded-Proto";
pub const WIRE_FORWARDED_HOST: &str = "X-Forwarded-Host";
// The response's own header names, on every response (SPEC §4).
pub const WIRE_STRANGLER_ROUTE: &str = "X-Strangler-Route";
pub const WIRE_STRANGLER_BACKEND: &str = "X-Strangler-Backend";
/// The `X-Forwarded-Proto` value: the proxy's listeners speak plain HTTP.
pub static PROTO_HTTP: HeaderValue = HeaderValue::from_static("http");

/// Every line of a list-valued header as one comma-separated list (RFC 9110 §5.3: repeated
/// lines are one list, in order); `None` when absent or not visible ASCII. One line, the usual
/// case, is borrowed.
pub fn header_list<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Option<Cow<'a, str>> {
    let mut lines = headers.get_all(name).iter();
    let first = lines.next()?.to_str().ok()?;
    let mut joined: Option<String> = None;
    for line in lines {
        let line = line.to_str().ok()?;
        let j = joined.get_or_insert_with(|| first.to_string());
        j.push_str(", ");
        j.push_str(line);
    }
    Some(joined.map_or(Cow::Borrowed(first), Cow::Owned))
}

/// The one `Content-Length` to send for a message that gave it as a list of equal values
/// (two lines, or `5, 5`), which Pingora accepts (RFC 9110 §8.6 lets a recipient replace such
/// a list by the single value) but a strict backend or client refuses; `None` when the header is
/// absent or already a single value, the usual case. Unequal values never get here: Pingora
/// refuses them.
pub fn collapsed_content_length(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut lines = headers.get_all(http::header::CONTENT_LENGTH).iter();
    let first = lines.next()?;
    if lines.next().is_none() && !first.as_bytes().contains(&b',') {
        return None;
    }
    let value = first.to_str().ok()?.split(',').next()?.trim();
    HeaderValue::from_str(value).ok()
}

/// `Keep-Alive` and the pre-standard `Proxy-Connection`: hop-by-hop (RFC 9110 §7.6.1), though
/// not in `http`'s list of standard names.
pub static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
/// HTTP/2's upgrade settings (RFC 7540 §3.2.1), which Pingora strips from an HTTP/1 request.
pub static HTTP2_SETTINGS: HeaderName = HeaderName::from_static("http2-settings");

/// Which of the fields the proxy acts on a backend's response holds, found in one pass over its
/// names: most responses hold none of them, and a lookup for each costs more than the pass.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ResponseFields {
    /// `Connection`: removed from an interim answer (Pingora writes the final one's itself).
    pub connection: bool,
    /// ... and it says more than `keep-alive` or `close` (nginx's answers say `keep-alive`):
    /// an option that may nominate another hop-by-hop field, or `Upgrade`.
    pub connection_options: bool,
    /// ... and says `close` on a line after the first only (see [`ConnectionSays`]): Pingora
    /// would pool the connection its backend is about to close.
    pub late_close: bool,
    /// `Upgrade`: kept on a 101 only.
    pub upgrade: bool,
    /// `Transfer-Encoding`: refused unless it is `chunked` alone (see
    /// [`transfer_coding_refusal`]).
    pub transfer_encoding: bool,
    /// `Keep-Alive`, `Proxy-Connection`, `Proxy-Authenticate`, `TE`, `Trailer`: always removed.
    pub hop_by_hop: bool,
    /// `Location`, `Content-Location`, `Refresh`, `Link`: URLs that may name a backend.
    pub urls: bool,
    pub set_cookie: bool,
}

impl ResponseFields {
    pub fn of(headers: &HeaderMap) -> Self {
        use http::header::{
            CONNECTION, CONTENT_LOCATION, LINK, LOCATION, PROXY_AUTHENTICATE, REFRESH, SET_COOKIE,
            TE, TRAILER, TRANSFER_ENCODING, UPGRADE,
        };
        let mut found = Self::default();
        for name in headers.keys() {
            if name == CONNECTION {
                let says = ConnectionSays::of(headers, &[b"keep-alive".as_slice(), b"close"]);
                found.connection = true;
                found.connection_options = says.more;
                found.late_close = says.late_close;
            } else if name == UPGRADE {
                found.upgrade = true;
            } else if name == TRANSFER_ENCODING {
                found.transfer_encoding = true;
            } else if [
                &PROXY_AUTHENTICATE,
                &TE,
                &TRAILER,
                &KEEP_ALIVE,
                &PROXY_CONNECTION,
            ]
            .contains(&name)
            {
                found.hop_by_hop = true;
            } else if [&LOCATION, &CONTENT_LOCATION, &REFRESH, &LINK].contains(&name) {
                found.urls = true;
            } else if name == SET_COOKIE {
                found.set_cookie = true;
            }
        }
        found
    }
}

/// What a message's `Connection` lines say, in one pass over them.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct ConnectionSays {
    /// An option other than the plain ones (ASCII case ignored): one that may nominate a
    /// field, or `Upgrade`, or `close` where it is not among them.
    more: bool,
    /// `close` on a line after the first, and not on the first. The lines are one list (RFC
    /// 9110 §5.3), and `close` anywhere in it ends the connection (RFC 9112 §9.6); Pingora
    /// reads the first line only when it decides whether a connection is kept.
    late_close: bool,
}

impl ConnectionSays {
    fn of(headers: &HeaderMap, plain: &[&[u8]]) -> Self {
        let is_plain = |t: &[u8]| plain.iter().any(|p| t.eq_ignore_ascii_case(p));
        let mut says = Self::default();
        let mut first_closes = false;
        for (i, v) in headers.get_all(http::header::CONNECTION).iter().enumerate() {
            let v = v.as_bytes();
            // Nearly every value is one plain token (`keep-alive`): no list to split.
            let (more, close) = if is_plain(v) {
                (false, v.eq_ignore_ascii_case(b"close"))
            } else {
                v.split(|b| *b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|t| !t.is_empty())
                    .fold((false, false), |(more, close), t| {
                        (
                            more || !is_plain(t),
                            close || t.eq_ignore_ascii_case(b"close"),
                        )
                    })
            };
            says.more |= more;
            if i == 0 {
                first_closes = close;
            } else if close && !first_closes {
                says.late_close = true;
            }
        }
        says
    }
}

/// Which of the fields the proxy, or Pingora's standard upstream policy, acts on a client's
/// request holds, found in one pass over its names: most requests hold none of them, and each
/// removal costs a lookup in two maps (Pingora keeps each name's case beside the map).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestFields {
    /// `Connection`: most HTTP/1.1 clients that send one say `keep-alive` and nothing else.
    pub connection: bool,
    /// ... and this one says more: `close`, an option naming another field, `Upgrade`.
    pub connection_options: bool,
    /// ... and says `close` on a line after the first only (see [`ConnectionSays`]): Pingora
    /// would keep the connection the client asked to close.
    pub late_close: bool,
    /// Another field Pingora's standard upstream policy strips: `Keep-Alive`,
    /// `Proxy-Connection`, `Proxy-Authenticate`, `Proxy-Authorization`, `TE`, `Trailer`,
    /// `Transfer-Encoding`, `Upgrade`, `HTTP2-Settings`.
    pub hop_by_hop: bool,
    /// `X-Strangler-Shadow`, `Forwarded`, `Expect`, `X-Forwarded-Host`: the client's are
    /// dropped on the way upstream (an `Expect: 100-continue` is answered by the proxy).
    pub dropped: bool,
    /// `X-Forwarded-For`: the list the proxy appends to.
    pub forwarded_for: bool,
    /// A field spelt with `_` for `-` that the proxy sets itself (`X_Forwarded_For`): see
    /// [`own_field_lookalike`].
    pub lookalike: bool,
}

impl RequestFields {
    pub fn of(headers: &HeaderMap) -> Self {
        use http::header::{
            CONNECTION, EXPECT, FORWARDED, PROXY_AUTHENTICATE, PROXY_AUTHORIZATION, TE, TRAILER,
            TRANSFER_ENCODING, UPGRADE,
        };
        let mut found = Self::default();
        for name in headers.keys() {
            if name == CONNECTION {
                let says = ConnectionSays::of(headers, &[b"keep-alive".as_slice()]);
                found.connection = true;
                found.connection_options = says.more;
                found.late_close = says.late_close;
            } else if [
                &KEEP_ALIVE,
                &PROXY_CONNECTION,
                &PROXY_AUTHENTICATE,
                &PROXY_AUTHORIZATION,
                &TE,
                &TRAILER,
                &TRANSFER_ENCODING,
                &UPGRADE,
                &HTTP2_SETTINGS,
            ]
            .contains(&name)
            {
                found.hop_by_hop = true;
            } else if [
                &crate::shadow::X_STRANGLER_SHADOW,
                &FORWARDED,
                &EXPECT,
                &X_FORWARDED_HOST,
            ]
            .contains(&name)
            {
                found.dropped = true;
            } else if name == X_FORWARDED_FOR {
                found.forwarded_for = true;
            } else if own_field_lookalike(name) {
                found.lookalike = true;
            }
        }
        found
    }

    /// Whether Pingora's standard upstream policy has anything to do for this request: a
    /// hop-by-hop field other than `Connection`, or a `Connection` that says more than
    /// `keep-alive`. Without either, all it would do is remove that `Connection`.
    pub fn need_standard_policy(&self) -> bool {
        self.hop_by_hop || self.connection_options
    }
}

/// The fields the proxy sets on every upstream request (and the shadow mark), lower case.
const OWN_FIELDS: [&str; 5] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "x-strangler-shadow",
];

/// Whether `name` is one of [`OWN_FIELDS`] spelt with `_` for some `-` (`X_Forwarded_For`,
/// `x-forwarded_host`). CGI-style servers (WSGI, Rack, PHP: the Flask and Django services this
/// proxy stands in front of) read both spellings as one variable (`HTTP_X_FORWARDED_FOR`), so a
/// client's would override or join the proxy's own: a forged client address, a real request
/// passed off as a shadow copy. They are removed on the way upstream, as nginx drops every
/// name with `_` by default (`underscores_in_headers off`); other such names pass, since the
/// legacy service may rely on them.
pub fn own_field_lookalike(name: &HeaderName) -> bool {
    let b = name.as_str().as_bytes();
    // Most names fail on their first byte.
    b.first() == Some(&b'x')
        && b.contains(&b'_')
        && OWN_FIELDS.iter().any(|own| {
            own.len() == b.len()
                && own
                    .bytes()
                    .zip(b)
                    .all(|(o, &c)| c == o || (o == b'-' && c == b'_'))
        })
}

/// The headers a message's `Connection` names as hop-by-hop (RFC 9110 §7.6.1), to be removed
/// before it is forwarded. The usual `keep-alive` / `close` tokens name no header to look for,
/// and the framing headers are never taken this way (Pingora frames the message itself).
pub fn connection_nominated(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.eq_ignore_ascii_case("keep-alive") && !t.eq_ignore_ascii_case("close"))
        .filter_map(|t| HeaderName::from_bytes(t.as_bytes()).ok())
        .filter(|n| {
            n != http::header::CONNECTION
                && n != http::header::CONTENT_LENGTH
                && n != http::header::TRANSFER_ENCODING
        })
        .collect()
}

/// `CONNECT` asks for a tunnel to the host:port it names (authority-form, RFC 9112 §3.2.3): a
/// proxy in front of two known backends has no business opening one. A request whose target
/// is not a path is refused 400 (SPEC §3); a `CONNECT` with a path is refused with it, so that
/// none reaches a backend whatever its target.
pub fn method_refusal(method: &http::Method) -> Option<&'static str> {
    (method == http::Method::CONNECT)
        .then_some("CONNECT is not proxied: the request target must be a path (origin-form)")
}

/// Why a message's `Transfer-Encoding` cannot be forwarded, or `None`. In a request, Pingora
/// refuses any list whose last coding is not `chunked`, and decodes the chunks of one that ends
/// in it; the codings before (`gzip, chunked`) would be dropped, and the backend would take a
/// compressed body for a plain one. A server that does not know a transfer coding refuses the
/// request (RFC 9112 §6.1): the proxy does, before any backend sees it. In a backend's answer,
/// a list that does not end in `chunked` makes a body delimited by the connection's end, which
/// Pingora relays with the backend's `Transfer-Encoding` lines: a client or a cache in front
/// that read only the first (`chunked`) would parse the raw body as chunks, and whatever the
/// backend put in it as the next answer. nginx, Envoy and HAProxy answer 502; so does the proxy.
pub fn transfer_coding_refusal(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .any(|t| !t.eq_ignore_ascii_case(b"chunked"))
        .then_some("only the chunked transfer coding is forwarded")
}

/// Why a request's `Connection` header cannot be honoured, or `None`. Pingora's upstream
/// sanitiser (after Envoy's) refuses a request whose `Connection` names a header the proxy
/// itself sends (`Host`, `X-Forwarded-For`/`-Host`/`-Proto`: nominating one would strip it, the
/// classic way to hide the client address from a backend), a pseudo-header, a token that is not
/// an HTTP token, or ten nominations or more. That refusal would come after routing, blamed on
/// the chosen backend; the proxy asks the same questions first and answers 400 itself. It also
/// refuses a nomination of `Content-Length` or `Transfer-Encoding`, which that sanitiser strips.
pub fn connection_refusal(headers: &HeaderMap) -> Option<&'static str> {
    const PROTECTED: [&[u8]; 4] = [
        b"host",
        b"x-forwarded-for",
        b"x-forwarded-host",
        b"x-forwarded-proto",
    ];
    // Pingora's sanitiser would strip a nominated framing field, and the body would go on
    // re-framed as chunked, which many WSGI servers refuse. Nothing needs to nominate one.
    const FRAMING: [&[u8]; 2] = [b"content-length", b"transfer-encoding"];
    let is_tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let mut count = 0;
    for token in headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
    {
        count += 1;
        if count >= 10 {
            return Some("Connection names ten or more options");
        }
        if token.starts_with(b":") || PROTECTED.iter().any(|p| token.eq_ignore_ascii_case(p)) {
            return Some("Connection cannot name Host or X-Forwarded-*: the proxy sends those");
        }
        if FRAMING.iter().any(|p| token.eq_ignore_ascii_case(p)) {
            return Some(
                "Connection cannot name Content-Length or Transfer-Encoding: they frame the body",
            );
        }
        if !token.iter().all(is_tchar) {
            return Some("Connection holds something that is not a header name");
        }
    }
    None
}

/// `X-Forwarded-For` with the peer appended to what the client sent.
pub fn forwarded_for(existing: Option<&str>, peer: IpAddr) -> HeaderValue {
    let mut out = String::with_capacity(existing.map_or(0, str::len) + 2 + 39);
    if let Some(e) = existing.map(str::trim).filter(|s| !s.is_empty()) {
        out.push_str(e);
        out.push_str(", ");
    }
    push_ip(&mut out, peer);
    // The client's part was a valid header value and an address is ASCII digits, dots, colons.
    HeaderValue::try_from(out).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
}

/// Appends `ip` in its usual text form. IPv4, nearly every request's case, without going
/// through `fmt` (which costs more than the rest of the header work).
fn push_ip(out: &mut String, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                if octet >= 100 {
                    out.push(char::from(b'0' + octet / 100));
                }
                if octet >= 10 {
                    out.push(char::from(b'0' + octet / 10 % 10));
                }
                out.push(char::from(b'0' + octet % 10));
            }
        }
        IpAddr::V6(v6) => {
            use std::fmt::Write;
            let _ = write!(out, "{v6}");
        }
    }
}

/// The client's address for a split's `ip` key: the peer, unless the peer is a trusted proxy,
/// in which case the right-most `X-Forwarded-For` entry that is not itself trusted. IPv4-mapped
/// IPv6 addresses (`::ffff:10.0.0.5`, from a dual-stack listener or a proxy behind one) count as
/// the IPv4 address they carry.
pub fn client_ip(peer: IpAddr, xff: Option<&str>, trusted: &[Cidr]) -> IpAddr {
    let peer = peer.to_canonical();
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    if let Some(xff) = xff {
        for hop in xff.rsplit(',') {
            match forwarded_hop(hop) {
                Some(ip) => {
                    let ip = ip.to_canonical();
                    client = ip;
                    if !is_trusted(ip) {
                        break;
                    }
                }
                None => break,
            }
        }
    }
    client
}

/// One `X-Forwarded-For` entry's address: `1.2.3.4`, `2001:db8::1`, or the same with the
/// client's port as some load balancers write it (`1.2.3.4:5678`, `[2001:db8::1]:5678`,
/// `[2001:db8::1]`).
fn forwarded_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(ip);
    }
    if let Ok(addr) = hop.parse::<std::net::SocketAddr>() {
        return Some(addr.ip());
    }
    hop.strip_prefix('[')?.strip_suffix(']')?.parse().ok()
}

/// A `Location` pointing at `backend` rewritten onto the client's scheme and host; `None` when it
/// points elsewhere (relative locations are left alone too: they are already the client's). A
/// scheme-relative `//host:port/…` is resolved with the backend's own scheme, as the client's
/// browser would resolve it against the backend's response.
pub fn rewrite_location(
    location: &str,
    backend: &Backend,
    client_scheme: &str,
    client_host: &str,
) -> Option<String> {
    // `http://user@backend:port/…` names the backend as well: the userinfo goes with it.
    let without_userinfo;
    let location = match userinfo_span(location) {
        Some((start, end)) => {
            without_userinfo = format!("{}{}", &location[..start], &location[end..]);
            without_userinfo.as_str()
        }
        None => location,
    };
    let scheme_relative = location.starts_with("//");
    for prefix in &backend.location_prefixes {
        // Every prefix is `scheme://host[:port]`, lower case; without the scheme it is
        // `//host[:port]`. Compared as bytes: the URL may hold raw UTF-8 anywhere after it.
        let prefix = match (scheme_relative, prefix.find("//")) {
            (true, Some(i)) => &prefix[i..],
            _ => prefix.as_str(),
        };
        let head = location.as_bytes().get(..prefix.len());
        if head.is_some_and(|h| h.eq_ignore_ascii_case(prefix.as_bytes())) {
            // Equal to a whole string up to there: the cut is on a character boundary.
            let Some(rest) = location.get(prefix.len()..) else {
                continue;
            };
            // `http://h:8080` must not match `http://h:80` as a prefix. A backslash ends the
            // host as a slash does: browsers read `http://h:80\x` as `http://h:80/x`.
            if rest.is_empty() || rest.starts_with(['/', '?', '#', '\\']) {
                return Some(format!("{client_scheme}://{client_host}{rest}"));
            }
        }
    }
    None
}

/// A redirect from a route with `rewrite`, mapped back into the client's namespace: the route
/// `/departures` with `rewrite: /v2/departures` sends `/departures/x` as `/v2/departures/x`, so
/// the backend's redirect to `/v2/departures/y` is `/departures/y` for the client (nginx's
/// `proxy_redirect default`). `url` is origin-relative or absolute (already pointing at the
/// client's host); `None` when its path is outside `rewrite`.
pub fn unrewrite_location(url: &str, rewrite: &str, literal: &str) -> Option<String> {
    let path_start = if url.starts_with('/') && !url.starts_with("//") {
        0
    } else {
        let authority = url.find("://")? + 3;
        authority + url[authority..].find('/')?
    };
    let path_end = url[path_start..]
        .find(['?', '#'])
        .map_or(url.len(), |i| path_start + i);
    let path = &url[path_start..path_end];
    let rewrite = rewrite.trim_end_matches('/');
    let rest = path.strip_prefix(rewrite)?;
    if !(rest.is_empty() || rest.starts_with('/')) {
        return None;
    }
    let literal = literal.trim_end_matches('/');
    let mut mapped = format!("{}{literal}{rest}", &url[..path_start]);
    if mapped.len() == path_start {
        mapped.push('/');
    }
    mapped.push_str(&url[path_end..]);
    Some(mapped)
}

/// The byte range of `userinfo@` in an absolute or scheme-relative URL, if it has one.
fn userinfo_span(url: &str) -> Option<(usize, usize)> {
    let start = url.find("//")? + 2;
    if !url[..start - 2]
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"+-.:".contains(&b))
    {
        return None;
    }
    let authority_end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let at = url[start..authority_end].rfind('@')?;
    Some((start, start + at + 1))
}

/// A `Refresh` header (`5; url=http://backend/…`) with its URL passed through `rewrite_url`,
/// the rule a `Location` follows (nginx's `proxy_redirect` rewrites both); `None` when there is
/// no URL or the rule leaves it alone.
pub fn rewrite_refresh(
    refresh: &str,
    rewrite_url: impl FnOnce(&str) -> Option<String>,
) -> Option<String> {
    let lower = refresh.to_ascii_lowercase();
    let at = lower.find("url=")? + 4;
    let (quote, url_start) = match refresh[at..].chars().next() {
        Some(q @ ('"' | '\'')) => (Some(q), at + 1),
        _ => (None, at),
    };
    let url_end = match quote {
        Some(q) => refresh[url_start..]
            .find(q)
            .map_or(refresh.len(), |i| url_start + i),
        None => refresh.len(),
    };
    let new = rewrite_url(refresh[url_start..url_end].trim())?;
    Some(format!(
        "{}{new}{}",
        &refresh[..url_start],
        &refresh[url_end..]
    ))
}

/// A `Link` header (RFC 8288: `<http://backend/…?page=2>; rel="next", <…>; rel="prev"`) with
/// each target passed through `rewrite_url`; `None` when the rule leaves every one alone. A
/// target is what stands between `<` and `>` outside a quoted parameter value (`title="a<b"`).
pub fn rewrite_link(
    link: &str,
    mut rewrite_url: impl FnMut(&str) -> Option<String>,
) -> Option<String> {
    let bytes = link.as_bytes();
    let mut out = String::new();
    let (mut copied, mut changed, mut quoted) = (0, false, false);
    // Every delimiter is ASCII: a byte index on one is a char boundary.
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'\\' if quoted => i += 1, // the escaped byte is skipped with it
            b'"' => quoted = !quoted,
            b'<' if !quoted => {
                let Some(len) = link[i + 1..].find('>') else {
                    break;
                };
                let (start, end) = (i + 1, i + 1 + len);
                if let Some(new) = rewrite_url(link[start..end].trim()) {
                    out.push_str(&link[copied..start]);
                    out.push_str(&new);
                    copied = end;
                    changed = true;
                }
                i = end; // on past the target: a `"` in it opens no quoted string
            }
            _ => {}
        }
        i += 1;
    }
    changed.then(|| {
        out.push_str(&link[copied..]);
        out
    })
}

/// A `Set-Cookie` without its `Domain` attribute when that domain is one of `hosts`; `None` when
/// there is nothing to change.
pub fn strip_cookie_domain(cookie: &str, hosts: &[&str]) -> Option<String> {
    let mut changed = false;
    let kept: Vec<&str> = cookie
        .split(';')
        .enumerate()
        .filter(|(i, attr)| {
            if *i == 0 {
                return true;
            }
            let Some((k, v)) = attr.split_once('=') else {
                return true;
            };
            if !k.trim().eq_ignore_ascii_case("domain") {
                return true;
            }
            let v = v.trim().trim_start_matches('.');
            let ours = hosts.iter().any(|h| h.eq_ignore_ascii_case(v));
            changed |= ours;
            !ours
        })
        .map(|(_, a)| a)
        .collect();
    changed.then(|| kept.join(";"))
}

/// The value of cookie `name` in a `Cookie` header. Read as bytes: another cookie on the line
/// may hold raw UTF-8 (`lang=français`, as `document.cookie` writes it), which must not hide
/// this one.
pub fn cookie_value<'a>(header: &'a [u8], name: &str) -> Option<&'a [u8]> {
    header.split(|&b| b == b';').find_map(|pair| {
        let eq = pair.iter().position(|&b| b == b'=')?;
        let (k, v) = (&pair[..eq], &pair[eq + 1..]);
        (k.trim_ascii() == name.as_bytes()).then(|| v.trim_ascii())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse;
    use crate::router::RoutingTable;

    fn backend(url: &str) -> Backend {
        let yaml = format!("backends:\n  b: {{url: '{url}'}}\ndefault: b\n");
        let (f, s) = parse("t", &yaml).unwrap();
        RoutingTable::build(f, &s).unwrap().backends[0].clone()
    }

    /// A header map holding `fields` (name, value) in order.
    fn with_fields(fields: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (n, v) in fields {
            h.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    /// A header map holding each of `names` once, all with the value `x`.
    fn with_names(names: &[&str]) -> HeaderMap {
        with_fields(&names.iter().map(|n| (*n, "x")).collect::<Vec<_>>())
    }

    #[test]
    fn connection_options_the_proxy_cannot_honour() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(http::header::CONNECTION, HeaderValue::from_str(v).unwrap());
            connection_refusal(&h)
        };
        for ok in ["keep-alive", "close", "Upgrade, X-Custom", " te ,"] {
            assert_eq!(with(ok), None, "{ok:?}");
        }
        for bad in [
            "X-Forwarded-For",
            "Content-Length",
            "keep-alive, transfer-encoding",
            "keep-alive, host",
            "X-FORWARDED-PROTO",
            "x-forwarded-host",
            ":authority",
            "\"X-Forwarded-For\"",
            "a,b,c,d,e,f,g,h,i,j",
        ] {
            assert!(with(bad).is_some(), "{bad:?}");
        }
        assert_eq!(connection_refusal(&HeaderMap::new()), None);
    }

    /// A header map holding `name` once per line.
    fn lines_of(name: http::HeaderName, lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append(name.clone(), HeaderValue::from_str(l).unwrap());
        }
        h
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_refused() {
        let with = |lines: &[&str]| {
            transfer_coding_refusal(&lines_of(http::header::TRANSFER_ENCODING, lines))
        };
        assert_eq!(with(&[]), None);
        assert_eq!(with(&["chunked"]), None);
        assert_eq!(with(&["Chunked "]), None);
        assert!(with(&["gzip, chunked"]).is_some());
        assert!(with(&["gzip", "chunked"]).is_some());
        assert!(with(&["x-custom, chunked"]).is_some());
    }

    #[test]
    fn a_list_of_equal_content_lengths_becomes_one() {
        let with = |lines: &[&str]| {
            collapsed_content_length(&lines_of(http::header::CONTENT_LENGTH, lines))
        };
        assert_eq!(with(&[]), None);
        assert_eq!(with(&["5"]), None, "a single value is left as it is");
        assert_eq!(with(&["5", "5"]), Some(HeaderValue::from_static("5")));
        assert_eq!(with(&["5, 5"]), Some(HeaderValue::from_static("5")));
        assert_eq!(
            with(&[" 12 ,12", "12"]),
            Some(HeaderValue::from_static("12"))
        );
    }

    #[test]
    fn host_values() {
        for ok in [
            "",
            "api.example.com",
            "api.example.com:8080",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8443",
            "api.example.com:65535",
            "h:0",
            "under_score.local",
            "xn--caf-dma.example",
        ] {
            assert!(host_value_ok(ok.as_bytes()), "{ok:?} refused");
        }
        for bad in [
            "evil.example/phish?",
            "user@api.example.com",
            "api.example.com:",
            "api.example.com:http",
            "api.example.com:123456",
            "api.example.com:99999",
            "api.example.com:65536",
            "api.example.com:-1",
            "api.example.com:80:81",
            "[::1]x",
            "[::1]:",
            "[fe80::1%25eth0]",
            "[::1",
            "[not-ip]:80",
            "a b",
            "a\\b",
            "host?x",
            "host#x",
            ":80",
        ] {
            assert!(!host_value_ok(bad.as_bytes()), "{bad:?} accepted");
        }
    }

    #[test]
    fn repeated_header_lines_are_one_list() {
        let xff = HeaderName::from_static("x-forwarded-for");
        let mut h = HeaderMap::new();
        assert_eq!(header_list(&h, &xff), None);
        h.append(&xff, HeaderValue::from_static("1.1.1.1"));
        assert!(matches!(
            header_list(&h, &xff),
            Some(Cow::Borrowed("1.1.1.1"))
        ));
        h.append(&xff, HeaderValue::from_static("2.2.2.2, 3.3.3.3"));
        assert_eq!(
            header_list(&h, &xff).as_deref(),
            Some("1.1.1.1, 2.2.2.2, 3.3.3.3")
        );
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let list = header_list(&h, &xff);
        assert_eq!(
            forwarded_for(list.as_deref(), peer),
            "1.1.1.1, 2.2.2.2, 3.3.3.3, 10.0.0.1"
        );
    }

    #[test]
    fn request_ids() {
        let hv = |s: &str| HeaderValue::from_str(s).unwrap();
        assert_eq!(request_id(Some(&hv("abc-123"))), "abc-123");
        let fresh = request_id(None);
        assert_eq!(fresh.len(), 32);
        assert!(fresh
            .to_str()
            .unwrap()
            .bytes()
            .all(|b| b.is_ascii_hexdigit()));
        assert_ne!(fresh, request_id(None));
        assert_eq!(request_id(Some(&hv("bad id"))).len(), 32);
        assert_eq!(request_id(Some(&hv(&"a".repeat(200)))).len(), 32);
    }

    #[test]
    fn locations() {
        let b = backend("http://127.0.0.1:9002");
        let rw = |l| rewrite_location(l, &b, "https", "api.example.com");
        assert_eq!(
            rw("http://127.0.0.1:9002/bookings/"),
            Some("https://api.example.com/bookings/".into())
        );
        assert_eq!(
            rw("http://127.0.0.1:9002"),
            Some("https://api.example.com".into())
        );
        assert_eq!(rw("http://127.0.0.1:90021/x"), None);
        assert_eq!(rw("http://other/x"), None);
        // What a browser reads as `http://127.0.0.1:9002/x` names the backend too.
        assert_eq!(
            rw("http://127.0.0.1:9002\\x"),
            Some("https://api.example.com\\x".into())
        );
        assert_eq!(
            rw("//127.0.0.1:9002\\x"),
            Some("https://api.example.com\\x".into())
        );
        // The other scheme on the backend's own port is the backend's address too.
        assert_eq!(
            rw("https://127.0.0.1:9002/x"),
            Some("https://api.example.com/x".into())
        );
        assert_eq!(rw("https://127.0.0.1/x"), None);
        assert_eq!(rw("/relative"), None);
        assert_eq!(
            rw("//127.0.0.1:9002/x"),
            Some("https://api.example.com/x".into())
        );
        assert_eq!(rw("//127.0.0.1:90021/x"), None);
        assert_eq!(rw("//other/x"), None);
        let b80 = backend("http://legacy.internal");
        assert_eq!(
            rewrite_location("http://LEGACY.internal/x?y", &b80, "http", "h:8080"),
            Some("http://h:8080/x?y".into())
        );
        assert_eq!(
            rewrite_location("//legacy.internal/x", &b80, "http", "h:8080"),
            Some("http://h:8080/x".into())
        );
        // Userinfo names the backend too; it is not carried over to the client's host.
        assert_eq!(
            rw("http://user:pw@127.0.0.1:9002/z"),
            Some("https://api.example.com/z".into())
        );
        assert_eq!(rw("http://user@other/z"), None);
        assert_eq!(rw("/path/with@sign"), None);
        assert_eq!(
            rw("http://127.0.0.1:9002/a@b"),
            Some("https://api.example.com/a@b".into())
        );
        // Raw UTF-8 anywhere after the backend's address, however long the URL: byte 300 of
        // this one falls inside the `é` (a cut there once left the address in place).
        let long = format!("http://127.0.0.1:9002/{}é", "a".repeat(276));
        assert_eq!(
            rw(&long),
            Some(format!("https://api.example.com/{}é", "a".repeat(276)))
        );
        assert_eq!(rw("http://127.0.0.1:9002é"), None);
        assert_eq!(rw("http://127.0.0.1:900é"), None);
    }

    #[test]
    fn redirects_from_rewritten_routes_are_mapped_back() {
        let m = |u| unrewrite_location(u, "/v2/departures", "/departures");
        assert_eq!(m("/v2/departures/x?q#f"), Some("/departures/x?q#f".into()));
        assert_eq!(m("/v2/departures"), Some("/departures".into()));
        assert_eq!(
            m("http://front.example/v2/departures/y/"),
            Some("http://front.example/departures/y/".into())
        );
        assert_eq!(m("/v2/departuresX"), None);
        assert_eq!(m("/elsewhere"), None);
        assert_eq!(m("http://front.example"), None);
        assert_eq!(m("//other/v2/departures"), None);
        // A rewrite to the root: every path is under it.
        let root = |u| unrewrite_location(u, "/", "/root");
        assert_eq!(root("/x"), Some("/root/x".into()));
        assert_eq!(root("/"), Some("/root/".into()));
        // A route on the root rewritten elsewhere.
        assert_eq!(unrewrite_location("/v2", "/v2", "/"), Some("/".into()));
    }

    #[test]
    fn refresh_urls() {
        let b = backend("http://127.0.0.1:9002");
        let rw = |r| rewrite_refresh(r, |u| rewrite_location(u, &b, "http", "front.example"));
        assert_eq!(
            rw("0; url=http://127.0.0.1:9002/x"),
            Some("0; url=http://front.example/x".into())
        );
        assert_eq!(
            rw("5;URL='http://127.0.0.1:9002/y?q'"),
            Some("5;URL='http://front.example/y?q'".into())
        );
        assert_eq!(rw("0; url=/relative"), None);
        assert_eq!(rw("0; url=http://other/x"), None);
        assert_eq!(rw("30"), None);
    }

    #[test]
    fn response_fields_are_found_in_one_pass() {
        let of = |names: &[&str]| ResponseFields::of(&with_names(names));
        assert_eq!(
            of(&["Content-Type", "Content-Length", "Date", "Server"]),
            ResponseFields::default()
        );
        for hop in [
            "Keep-Alive",
            "proxy-connection",
            "Proxy-Authenticate",
            "TE",
            "Trailer",
        ] {
            let f = of(&["Date", hop]);
            assert!(f.hop_by_hop && !f.connection && !f.upgrade, "{hop}");
        }
        let f = of(&["connection", "Date"]);
        assert!(f.connection && !f.upgrade && !f.hop_by_hop);
        let connection = |values: &[&str]| {
            let mut h = with_names(&["Date"]);
            for v in values {
                h.append(http::header::CONNECTION, HeaderValue::from_str(v).unwrap());
            }
            let f = ResponseFields::of(&h);
            assert!(f.connection, "{values:?}");
            f.connection_options
        };
        for plain in [
            &["keep-alive"][..],
            &["Keep-Alive"],
            &["close"],
            &["keep-alive, close", ""],
        ] {
            assert!(!connection(plain), "{plain:?}");
        }
        for options in [
            &["Upgrade"][..],
            &["keep-alive, X-Hop"],
            &["close", "x-hop"],
        ] {
            assert!(connection(options), "{options:?}");
        }
        let f = of(&["Upgrade", "Date"]);
        assert!(f.upgrade && !f.connection && !f.hop_by_hop);
        for url in ["Location", "content-location", "Refresh", "Link"] {
            let f = of(&[url, "Date"]);
            assert!(
                f.urls && f.connection == f.hop_by_hop && !f.set_cookie,
                "{url}"
            );
        }
        assert!(of(&["Set-Cookie", "set-cookie"]).set_cookie);
    }

    #[test]
    fn request_fields_are_found_in_one_pass() {
        let of = |names: &[&str]| RequestFields::of(&with_names(names));
        assert_eq!(
            of(&[
                "Host",
                "User-Agent",
                "Accept",
                "Content-Length",
                "X-Request-Id"
            ]),
            RequestFields::default()
        );
        for hop in [
            "keep-alive",
            "Proxy-Connection",
            "Proxy-Authenticate",
            "Proxy-Authorization",
            "TE",
            "Trailer",
            "Transfer-Encoding",
            "Upgrade",
            "HTTP2-Settings",
        ] {
            let f = of(&["Host", hop]);
            assert!(f.hop_by_hop && !f.dropped && !f.forwarded_for, "{hop}");
        }
        for dropped in [
            "X-Strangler-Shadow",
            "Forwarded",
            "Expect",
            "x-forwarded-host",
        ] {
            let f = of(&[dropped, "Host"]);
            assert!(f.dropped && !f.hop_by_hop && !f.forwarded_for, "{dropped}");
        }
        let f = of(&["X-Forwarded-For", "x-forwarded-for"]);
        assert!(f.forwarded_for && !f.dropped && !f.hop_by_hop && !f.lookalike);
        let f = of(&["connection", "Host"]);
        assert!(f.connection && f.connection_options && !f.hop_by_hop && !f.dropped);
        for lookalike in [
            "X_Forwarded_For",
            "x-forwarded_for",
            "X_Forwarded_Proto",
            "X-Forwarded_Host",
            "X_Request_Id",
            "x_strangler_shadow",
        ] {
            let f = of(&["Host", lookalike]);
            assert!(f.lookalike && !f.dropped && !f.forwarded_for, "{lookalike}");
        }
        // Other names with `_` are the legacy service's business; near misses are not lookalikes.
        for other in [
            "X_Custom",
            "x_forwarded_fo",
            "y_forwarded_for",
            "x-forwarded-for-x",
        ] {
            assert!(!of(&["Host", other]).lookalike, "{other}");
        }
    }

    #[test]
    fn pingoras_standard_policy_is_needed_unless_connection_says_only_keep_alive() {
        let need = |fields: &[(&str, &str)]| {
            RequestFields::of(&with_fields(fields)).need_standard_policy()
        };
        assert!(!need(&[("Host", "h")]));
        assert!(!need(&[("Connection", "keep-alive")]));
        assert!(!need(&[
            ("Connection", "Keep-Alive"),
            ("Connection", " keep-alive ,")
        ]));
        for connection in ["close", "keep-alive, close", "keep-alive, X-Hop", "Upgrade"] {
            assert!(need(&[("Connection", connection)]), "{connection}");
        }
        // Every value counts, the first or a later one.
        for values in [["keep-alive", "close"], ["X-Hop", "keep-alive"]] {
            assert!(need(&values.map(|v| ("Connection", v))), "{values:?}");
        }
        assert!(need(&[
            ("Connection", "keep-alive"),
            ("Keep-Alive", "timeout=5")
        ]));
        assert!(need(&[("TE", "trailers")]));
    }

    /// `close` on a later line than the first is what Pingora does not read: the only case the
    /// proxy has to act on, for a client's request as for a backend's answer.
    #[test]
    fn close_on_a_later_connection_line_is_told() {
        let request = |values: &[&str]| {
            RequestFields::of(&lines_of(http::header::CONNECTION, values)).late_close
        };
        let response = |values: &[&str]| {
            ResponseFields::of(&lines_of(http::header::CONNECTION, values)).late_close
        };
        for later in [
            &["keep-alive", "close"][..],
            &["keep-alive", "X-Secret, close"],
            &["X-Hop", "keep-alive", " CLOSE "],
            &["Upgrade", "close"],
        ] {
            assert!(request(later), "{later:?}");
            assert!(response(later), "{later:?}");
        }
        for not_later in [
            &[][..],
            &["close"],
            &["keep-alive, close"],
            &["close", "keep-alive"],
            &["Close, X-Hop", "close"],
            &["keep-alive", "keep-alive"],
            &["keep-alive", "closed, X-close"],
        ] {
            assert!(!request(not_later), "{not_later:?}");
            assert!(!response(not_later), "{not_later:?}");
        }
        // What else the lines say is read as before.
        let fields = ResponseFields::of(&lines_of(
            http::header::CONNECTION,
            &["keep-alive", "close"],
        ));
        assert!(fields.connection && !fields.connection_options);
        let fields = RequestFields::of(&lines_of(
            http::header::CONNECTION,
            &["keep-alive", "close"],
        ));
        assert!(fields.connection && fields.connection_options);
    }

    #[test]
    fn link_targets() {
        let b = backend("http://127.0.0.1:9002");
        let rw = |l| rewrite_link(l, |u| rewrite_location(u, &b, "https", "front.example"));
        assert_eq!(
            rw("<http://127.0.0.1:9002/b?page=2>; rel=\"next\", <http://127.0.0.1:9002/b?page=1>; rel=\"prev\""),
            Some("<https://front.example/b?page=2>; rel=\"next\", <https://front.example/b?page=1>; rel=\"prev\"".into())
        );
        // Only the targets at the backend's address; none inside a quoted parameter.
        assert_eq!(
            rw("<https://cdn.example/x>; rel=preload, <http://127.0.0.1:9002/y>; title=\"a \\\"<http://127.0.0.1:9002/z>\""),
            Some("<https://cdn.example/x>; rel=preload, <https://front.example/y>; title=\"a \\\"<http://127.0.0.1:9002/z>\"".into())
        );
        assert_eq!(rw("</relative>; rel=next"), None);
        assert_eq!(rw("<http://127.0.0.1:9002/unclosed"), None);
        assert_eq!(rw(""), None);
        assert_eq!(
            rw("<http://127.0.0.1:9002/caf\u{e9}>; rel=a"),
            Some("<https://front.example/caf\u{e9}>; rel=a".into())
        );
    }

    #[test]
    fn cookies() {
        let hosts = ["127.0.0.1", "api.internal"];
        assert_eq!(
            strip_cookie_domain("sid=1; Path=/; Domain=api.internal; HttpOnly", &hosts),
            Some("sid=1; Path=/; HttpOnly".into())
        );
        assert_eq!(
            strip_cookie_domain("sid=1; domain=.API.internal", &hosts),
            Some("sid=1".into())
        );
        assert_eq!(
            strip_cookie_domain("sid=1; Domain=example.com", &hosts),
            None
        );
        assert_eq!(cookie_value(b"a=1; cid=xyz; b=2", "cid"), Some(&b"xyz"[..]));
        assert_eq!(cookie_value(b"a=1", "cid"), None);
        assert_eq!(
            cookie_value("lang=français; cid=abc".as_bytes(), "cid"),
            Some(&b"abc"[..])
        );
    }

    #[test]
    fn client_ips() {
        let trusted = [Cidr {
            addr: "10.0.0.0".parse().unwrap(),
            prefix: 8,
        }];
        let peer: IpAddr = "10.0.0.5".parse().unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_ip(peer, Some("1.2.3.4, 10.0.0.9"), &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(client_ip(peer, Some("1.2.3.4"), &[]), peer);
        assert_eq!(
            client_ip(ip("8.8.8.8"), Some("1.2.3.4"), &trusted),
            ip("8.8.8.8")
        );
        assert_eq!(
            forwarded_for(Some("1.1.1.1"), ip("2.2.2.2")),
            "1.1.1.1, 2.2.2.2"
        );
        assert_eq!(forwarded_for(Some("  "), ip("10.0.0.1")), "10.0.0.1");
        assert_eq!(forwarded_for(None, ip("::1")), "::1");
        // A dual-stack listener's IPv4 client, and mapped hops in the header, are IPv4.
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.5"), Some("1.2.3.4"), &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(
            client_ip(peer, Some("::ffff:1.2.3.4, ::ffff:10.0.0.9"), &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(client_ip(ip("::ffff:8.8.8.8"), None, &[]), ip("8.8.8.8"));
        // Entries with the client's port (Azure's gateways write them so) are addresses too:
        // the walk goes on past a trusted one and stops at the first untrusted.
        assert_eq!(
            client_ip(peer, Some("1.2.3.4:5678, 10.0.0.9:443"), &trusted),
            ip("1.2.3.4")
        );
        assert_eq!(
            client_ip(peer, Some("[2001:db8::1]:5678, 10.0.0.9"), &trusted),
            ip("2001:db8::1")
        );
        assert_eq!(
            client_ip(peer, Some("[2001:db8::2], 10.0.0.9"), &trusted),
            ip("2001:db8::2")
        );
        // What is no address stops the walk at the last trusted hop.
        assert_eq!(
            client_ip(peer, Some("unknown, 10.0.0.9"), &trusted),
            ip("10.0.0.9")
        );
    }

    #[test]
    fn ipv4_text_matches_display() {
        for ip in [
            "0.0.0.0",
            "255.255.255.255",
            "10.9.100.99",
            "1.20.199.200",
            "127.0.0.1",
        ] {
            let mut out = String::new();
            push_ip(&mut out, ip.parse().unwrap());
            assert_eq!(out, ip);
        }
    }
}
