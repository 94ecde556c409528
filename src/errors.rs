//! The one place where failures become HTTP statuses, JSON bodies (SPEC §4) and the `kind`
//! label of `strangler_upstream_errors_total` (SPEC §8).

use bytes::Bytes;
use http::header::{self, HeaderValue};
use pingora_core::protocols::http::date::get_cached_date;
use pingora_error::{Error, ErrorSource, ErrorType};
use pingora_http::ResponseHeader;
use serde_json::json;

use crate::forwarding;

/// The `kind` of an upstream failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamErrorKind {
    /// The connection could not be made: refused, unreachable, timed out connecting, TLS
    /// handshake failed. Nothing reached the backend.
    Connect,
    /// Connected, but the backend stayed silent past `timeout`.
    Timeout,
    /// The backend closed or reset the connection mid-exchange.
    Reset,
    Other,
}

impl UpstreamErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamErrorKind::Connect => "connect",
            UpstreamErrorKind::Timeout => "timeout",
            UpstreamErrorKind::Reset => "reset",
            UpstreamErrorKind::Other => "other",
        }
    }

    /// Classifies an upstream-side error; `None` for errors that are not the backend's doing.
    pub fn of(e: &Error) -> Option<UpstreamErrorKind> {
        if *e.esource() != ErrorSource::Upstream {
            return None;
        }
        use ErrorType::*;
        Some(match e.etype() {
            ConnectTimedout | ConnectRefused | ConnectNoRoute | TLSHandshakeFailure
            | TLSHandshakeTimedout | InvalidCert | HandshakeError | ConnectError | BindError
            | SocketError | TLSWantX509Lookup | ConnectProxyFailure => UpstreamErrorKind::Connect,
            ReadTimedout | WriteTimedout => UpstreamErrorKind::Timeout,
            ReadError | WriteError if tls_refused(e) => UpstreamErrorKind::Connect,
            ReadError | WriteError | ConnectionClosed => UpstreamErrorKind::Reset,
            _ => UpstreamErrorKind::Other,
        })
    }
}

/// Whether an upstream error is how an upgraded connection (a tunnel) ends rather than a
/// failure: the backend's read timeout (the tunnel sat idle that long), a TLS peer that
/// closed without `close_notify` (rustls reports the bare close as an unexpected EOF), or a
/// backend that closed its end while the client was still sending (the kernel answers the
/// client's next frame with a reset: a WebSocket server saying goodbye with its close frame
/// to a busy client). A tunnel's protocol has its own end, as WebSocket's close frames.
pub fn ends_tunnel(e: &Error) -> bool {
    use std::io::ErrorKind::*;
    *e.esource() == ErrorSource::Upstream
        && (*e.etype() == ErrorType::ReadTimedout
            || matches!(
                io_kind(e),
                Some(UnexpectedEof | ConnectionReset | ConnectionAborted | BrokenPipe)
            ))
}

/// Whether the backend's TLS refused the proxy (a client certificate required or rejected,
/// access denied): the connection never carried a request, whatever Pingora's error type says.
/// With TLS 1.2 such a server ends the handshake (a connect failure); with TLS 1.3 the client's
/// handshake is over before the server judges it, and the alert arrives at the first read.
pub fn tls_refused(e: &Error) -> bool {
    use rustls::AlertDescription::*;
    let alert = e
        .root_cause()
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
        .and_then(|inner| inner.downcast_ref::<rustls::Error>());
    matches!(
        alert,
        Some(rustls::Error::AlertReceived(
            CertificateRequired
                | BadCertificate
                | UnsupportedCertificate
                | CertificateRevoked
                | CertificateExpired
                | CertificateUnknown
                | UnknownCA
                | AccessDenied
                | HandshakeFailure
        ))
    )
}

/// The kind of the I/O error at the root of `e`, if that is one.
fn io_kind(e: &Error) -> Option<std::io::ErrorKind> {
    e.root_cause()
        .downcast_ref::<std::io::Error>()
        .map(std::io::Error::kind)
}

/// Whether a backend connection broke before any response header came, the way a pooled
/// connection the backend has since closed breaks: Pingora marks that as safe to retry once on a
/// fresh connection when the OS reports it, but not when TLS sits between (rustls reports a
/// close without `close_notify` as an unexpected EOF, which Pingora takes for a TLS failure).
pub fn closed_before_answer(e: &Error) -> bool {
    use std::io::ErrorKind::*;
    *e.esource() == ErrorSource::Upstream
        && *e.etype() == ErrorType::ReadError
        && matches!(
            io_kind(e),
            Some(UnexpectedEof | ConnectionReset | ConnectionAborted)
        )
}

/// Whether `e` is the proxy itself running short while connecting to a backend: out of file
/// descriptors (its own `RLIMIT_NOFILE`, or the system's), socket buffers or memory. That is
/// no failure of the backend: it must not count against it (upstream errors, the rollback
/// window, passed-over addresses), and `default` would fail alike.
pub fn proxy_out_of_resources(e: &Error) -> bool {
    if *e.esource() != ErrorSource::Upstream {
        return false;
    }
    // The io::Error may sit under a cause that is not Pingora's own (a failed `connect()` is
    // wrapped in pingora-core's `ConnectErrorDetails`): follow `source()` down to it.
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e.root_cause());
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            return short_of_resources(io);
        }
        cause = c.source();
    }
    false
}

/// Whether an I/O error says the process is short of descriptors, buffers or memory, rather
/// than anything about what it was working on.
pub fn short_of_resources(e: &std::io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|c| [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM].contains(&c))
}

/// An error response the proxy makes itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProxyError {
    pub status: u16,
    pub code: &'static str,
    pub message: &'static str,
}

pub const BAD_REQUEST: ProxyError = ProxyError {
    status: 400,
    code: "bad_request",
    message: "the request is malformed",
};
pub const URI_TOO_LONG: ProxyError = ProxyError {
    status: 414,
    code: "uri_too_long",
    message: "the request target is too long",
};
pub const HEADERS_TOO_LARGE: ProxyError = ProxyError {
    status: 431,
    code: "headers_too_large",
    message: "the request headers are too large",
};
/// The client stopped sending its request body for longer than the backend's `timeout`: the
/// backend was waiting for it, so the wait is the client's, not the backend's (nginx's
/// `client_body_timeout`).
pub const REQUEST_TIMEOUT: ProxyError = ProxyError {
    status: 408,
    code: "request_timeout",
    message: "the client stopped sending its request body",
};
pub const BAD_GATEWAY: ProxyError = ProxyError {
    status: 502,
    code: "bad_gateway",
    message: "the backend could not be reached or broke the connection",
};
/// The proxy ran out of its own resources ([`proxy_out_of_resources`]): a 503, which a load
/// balancer in front takes for "try another instance" (Envoy's overload manager answers so),
/// not a 502 that blames the backend.
pub const UNAVAILABLE: ProxyError = ProxyError {
    status: 503,
    code: "service_unavailable",
    message: "the proxy is out of file descriptors or memory",
};
pub const GATEWAY_TIMEOUT: ProxyError = ProxyError {
    status: 504,
    code: "gateway_timeout",
    message: "the backend did not answer in time",
};
pub const INTERNAL: ProxyError = ProxyError {
    status: 500,
    code: "internal_error",
    message: "the proxy failed to handle the request",
};

impl ProxyError {
    /// The response for a Pingora error that ended a request; `None` when the client is gone
    /// and there is nobody to answer.
    pub fn for_error(e: &Error) -> Option<ProxyError> {
        use ErrorType::*;
        if proxy_out_of_resources(e) {
            return Some(UNAVAILABLE);
        }
        match (e.esource(), e.etype()) {
            (_, HTTPStatus(400)) => Some(BAD_REQUEST),
            (_, HTTPStatus(414)) => Some(URI_TOO_LONG),
            (_, HTTPStatus(431)) => Some(HEADERS_TOO_LARGE),
            (_, HTTPStatus(504)) => Some(GATEWAY_TIMEOUT),
            (_, HTTPStatus(s)) if *s >= 500 => Some(BAD_GATEWAY),
            (_, HTTPStatus(_)) => Some(BAD_REQUEST),
            (ErrorSource::Upstream, ConnectTimedout | ReadTimedout | WriteTimedout) => {
                Some(GATEWAY_TIMEOUT)
            }
            (ErrorSource::Upstream, _) => Some(BAD_GATEWAY),
            (ErrorSource::Downstream, ReadError | WriteError | ConnectionClosed) => None,
            (ErrorSource::Downstream, ReadTimedout | WriteTimedout) => None,
            (ErrorSource::Downstream, _) => Some(BAD_REQUEST),
            _ => Some(INTERNAL),
        }
    }

    /// The JSON body: `{"error", "message", "route", "backend", "request_id"}`.
    pub fn body(
        &self,
        detail: Option<&str>,
        route: &str,
        backend: &str,
        request_id: &str,
    ) -> Bytes {
        let message = match detail {
            Some(d) => format!("{}: {d}", self.message),
            None => self.message.to_string(),
        };
        let v = json!({
            "error": self.code,
            "message": message,
            "route": route,
            "backend": backend,
            "request_id": request_id,
        });
        Bytes::from(v.to_string())
    }

    /// The response header of this error's answer with a JSON body of `body_len` bytes, before
    /// the three stamps every response carries: what `proxy::Strangler::answer` writes and
    /// [`ProxyError::h1_answer`] serialises.
    pub fn response_header(&self, body_len: usize) -> pingora_error::Result<ResponseHeader> {
        let mut resp = ResponseHeader::build(self.status, Some(9))?;
        resp.insert_header(header::CONTENT_TYPE, "application/json")?;
        resp.insert_header(header::CONTENT_LENGTH, body_len.to_string())?;
        resp.insert_header(header::CACHE_CONTROL, "no-store")?;
        Ok(resp)
    }

    /// The whole HTTP/1.1 answer to a request whose header Pingora's parser refused, for the
    /// client's connection as is (no hook ran, there is no session to write it through): what
    /// `proxy::Strangler::answer` writes for a request refused before routing — the JSON body,
    /// route `default`, backend `none`, a new request id — and the connection closes after it.
    /// A `HEAD` gets the header alone.
    pub fn h1_answer(
        &self,
        request_id: &HeaderValue,
        head: bool,
    ) -> pingora_error::Result<Vec<u8>> {
        use crate::router::{DEFAULT_ROUTE, NO_BACKEND};
        let id = request_id.to_str().unwrap_or("-");
        let body = self.body(None, DEFAULT_ROUTE, NO_BACKEND, id);
        let mut resp = self.response_header(body.len())?;
        resp.insert_header(forwarding::WIRE_REQUEST_ID, request_id)?;
        resp.insert_header(forwarding::WIRE_STRANGLER_ROUTE, DEFAULT_ROUTE)?;
        resp.insert_header(forwarding::WIRE_STRANGLER_BACKEND, NO_BACKEND)?;
        resp.insert_header(header::DATE, get_cached_date())?;
        resp.insert_header(header::CONNECTION, "close")?;
        let mut wire = Vec::with_capacity(512 + body.len());
        wire.extend_from_slice(b"HTTP/1.1 ");
        wire.extend_from_slice(resp.status.as_str().as_bytes());
        wire.push(b' ');
        wire.extend_from_slice(resp.status.canonical_reason().unwrap_or("").as_bytes());
        wire.extend_from_slice(b"\r\n");
        resp.header_to_h1_wire(&mut wire);
        wire.extend_from_slice(b"\r\n");
        if !head {
            wire.extend_from_slice(&body);
        }
        Ok(wire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_kinds() {
        let up = |t| {
            let mut e = Error::new(t);
            e.as_up();
            e
        };
        let e = up(ErrorType::ConnectRefused);
        assert_eq!(ProxyError::for_error(&e), Some(BAD_GATEWAY));
        assert_eq!(UpstreamErrorKind::of(&e), Some(UpstreamErrorKind::Connect));
        let e = up(ErrorType::ReadTimedout);
        assert_eq!(ProxyError::for_error(&e), Some(GATEWAY_TIMEOUT));
        assert_eq!(UpstreamErrorKind::of(&e), Some(UpstreamErrorKind::Timeout));
        let e = up(ErrorType::ConnectionClosed);
        assert_eq!(UpstreamErrorKind::of(&e), Some(UpstreamErrorKind::Reset));
        let mut e = Error::new(ErrorType::ReadError);
        e.as_down();
        assert_eq!(ProxyError::for_error(&e), None);
        assert_eq!(UpstreamErrorKind::of(&e), None);
    }

    #[test]
    fn the_proxys_own_shortage_is_not_the_backends_failure() {
        // As pingora-core's connector wraps a socket() that failed: InternalError, caused by
        // SocketError, caused by the io::Error.
        let wrapped = |os: i32| {
            let io = std::io::Error::from_raw_os_error(os);
            let socket = Error::because(ErrorType::SocketError, "failed to create socket", io);
            let mut e = Error::because(ErrorType::InternalError, "Fail to connect", socket);
            e.as_up();
            e
        };
        for os in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let e = wrapped(os);
            assert!(proxy_out_of_resources(&e), "{os}");
            assert_eq!(ProxyError::for_error(&e), Some(UNAVAILABLE));
        }
        // A failed connect(): the io::Error under a wrapper of pingora-core's own.
        #[derive(Debug)]
        struct Details(std::io::Error);
        impl std::fmt::Display for Details {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, "connect failed: {}", self.0)
            }
        }
        impl std::error::Error for Details {
            fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
                Some(&self.0)
            }
        }
        let details = Details(std::io::Error::from_raw_os_error(libc::ENOBUFS));
        let mut e = Error::because(ErrorType::ConnectError, "Fail to connect", details);
        e.as_up();
        assert!(proxy_out_of_resources(&e));
        let refused = wrapped(libc::ECONNREFUSED);
        assert!(!proxy_out_of_resources(&refused));
        assert_eq!(ProxyError::for_error(&refused), Some(BAD_GATEWAY));
        assert!(short_of_resources(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(!short_of_resources(&std::io::Error::from_raw_os_error(
            libc::ENOENT
        )));
    }

    #[test]
    fn how_tunnels_end() {
        // What rustls reports for a TLS peer that closed without close_notify, as Pingora
        // wraps it (the io::Error as the cause, under another pingora Error).
        let eof = std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "peer closed connection without sending TLS close_notify",
        );
        let inner = Error::because(ErrorType::ReadError, "reading body", eof);
        let mut e = Error::because(ErrorType::ReadError, "while proxying", inner);
        e.as_up();
        assert!(ends_tunnel(&e));
        let mut idle = Error::new(ErrorType::ReadTimedout);
        idle.as_up();
        assert!(ends_tunnel(&idle));
        // A backend that closed its end while the client still talked is reset by its kernel:
        // that ends the tunnel too. Data the tunnel could not carry does not, and the client's
        // side is never the backend's.
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        let mut e = Error::because(ErrorType::ReadError, "reading body", reset);
        e.as_up();
        assert!(ends_tunnel(&e));
        let garbled = std::io::Error::new(std::io::ErrorKind::InvalidData, "bad record");
        let mut e = Error::because(ErrorType::ReadError, "reading body", garbled);
        e.as_up();
        assert!(!ends_tunnel(&e));
        let mut down = Error::new(ErrorType::ReadTimedout);
        down.as_down();
        assert!(!ends_tunnel(&down));
    }

    #[test]
    fn a_closed_pooled_connection_before_any_answer() {
        let upstream = |kind, etype| {
            let io = std::io::Error::new(kind, "read");
            let mut e = Error::because(etype, "while reading response headers", io);
            e.as_up();
            e
        };
        use std::io::ErrorKind::*;
        // TLS without close_notify, and the OS's own resets.
        for kind in [UnexpectedEof, ConnectionReset, ConnectionAborted] {
            assert!(closed_before_answer(&upstream(kind, ErrorType::ReadError)));
        }
        // Not a closed connection: a TLS failure of another kind, a timeout, a write.
        assert!(!closed_before_answer(&upstream(
            InvalidData,
            ErrorType::ReadError
        )));
        assert!(!closed_before_answer(&upstream(
            TimedOut,
            ErrorType::ReadTimedout
        )));
        assert!(!closed_before_answer(&upstream(
            ConnectionReset,
            ErrorType::WriteError
        )));
        // The client's side is never the backend's connection.
        let mut down = upstream(UnexpectedEof, ErrorType::ReadError);
        down.as_down();
        assert!(!closed_before_answer(&down));
    }

    #[test]
    fn body_is_json_with_every_field() {
        let b = BAD_GATEWAY.body(None, "bookings", "new", "abc");
        let v: serde_json::Value = serde_json::from_slice(&b).unwrap();
        assert_eq!(v["error"], "bad_gateway");
        assert_eq!(v["route"], "bookings");
        assert_eq!(v["backend"], "new");
        assert_eq!(v["request_id"], "abc");
    }
}
