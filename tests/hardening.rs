//! Hardening (issue 6): what a hostile or broken peer can do to the proxy. Raw sockets where a
//! client library would tidy the bytes; the recording backends' `seen()` judges what was
//! forwarded. Every test waits on conditions, never on a fixed sleep (a fake backend may sleep
//! to play slow).
mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

// ---------------------------------------------------------------------------------------------
// Raw HTTP/1 helpers
// ---------------------------------------------------------------------------------------------

/// One HTTP/1 response read off a socket.
#[derive(Debug)]
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response (status line, headers, body framed by Content-Length or chunked; HEAD and
/// 1xx/204/304 have none). Errors on EOF before the header ends.
fn read_response(r: &mut impl BufRead, head_request: bool) -> std::io::Result<RawResponse> {
    let mut line = String::new();
    if r.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let status: u16 = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let l = line.trim_end_matches(['\r', '\n']);
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_string(), v.trim().to_string()));
        }
    }
    let mut resp = RawResponse {
        status,
        headers,
        body: Vec::new(),
    };
    if head_request || status < 200 || status == 204 || status == 304 {
        return Ok(resp);
    }
    if resp
        .header("transfer-encoding")
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"))
    {
        loop {
            line.clear();
            r.read_line(&mut line)?;
            let size = usize::from_str_radix(line.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {line:?}")))?;
            if size == 0 {
                // Trailers end with an empty line.
                loop {
                    line.clear();
                    r.read_line(&mut line)?;
                    if line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk)?;
            resp.body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(n) = resp.header("content-length").and_then(|v| v.parse().ok()) {
        let mut body = vec![0u8; n];
        r.read_exact(&mut body)?;
        resp.body = body;
    } else {
        r.read_to_end(&mut resp.body)?;
    }
    Ok(resp)
}

/// Sends `bytes` on a fresh connection and reads everything until the proxy closes it (or
/// `silence` passes without a byte). Returns the raw answer and whether the proxy closed.
fn exchange(addr: &str, bytes: &[u8], silence: Duration) -> (String, bool) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(silence)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let closed = loop {
        match read_some(&mut s, &mut buf) {
            Ok(0) => break true,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

fn addr_of(proxy: &Proxy) -> String {
    format!("127.0.0.1:{}", proxy.port)
}

fn targets(b: &Backend) -> Vec<String> {
    b.seen().into_iter().map(|s| s.target).collect()
}

/// After a hostile exchange, one ordinary request through the proxy: it must work, and it
/// flushes anything a smuggled request could have left on a pooled upstream connection.
fn a_normal_request_still_works(proxy: &Proxy, path: &str) {
    let r = request("GET", &proxy.url(path), &[], None);
    assert_eq!(r.status, 200, "GET {path} after the attack: {}", r.body);
}

// ---------------------------------------------------------------------------------------------
// Raw TCP backends (for what hyper would never do)
// ---------------------------------------------------------------------------------------------

/// What a raw backend saw of a request: its request line.
type Lines = Arc<Mutex<Vec<String>>>;

/// A raw TCP backend: accepts on 127.0.0.1 and runs `serve` on each connection in its own
/// thread. The accept loop lives as long as the test process (cheap: one blocked thread).
fn raw_backend(serve: impl Fn(TcpStream, Lines) + Send + Sync + 'static) -> (SocketAddr, Lines) {
    let listener = listener();
    let addr = listener.local_addr().unwrap();
    let lines: Lines = Arc::default();
    let l2 = lines.clone();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let serve = serve.clone();
            let lines = l2.clone();
            std::thread::spawn(move || serve(s, lines));
        }
    });
    (addr, lines)
}

/// Reads one request head (and its Content-Length body) from a raw backend's connection.
/// Returns the request line, or `None` at EOF.
fn read_request_head(r: &mut BufReader<TcpStream>) -> Option<String> {
    let mut first = String::new();
    if r.read_line(&mut first).ok()? == 0 {
        return None;
    }
    let mut cl = 0usize;
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            if k.eq_ignore_ascii_case("content-length") {
                cl = v.trim().parse().unwrap_or(0);
            }
        }
    }
    let mut body = vec![0u8; cl];
    r.read_exact(&mut body).ok()?;
    Some(first.trim_end().to_string())
}

fn metrics_body(proxy: &Proxy) -> String {
    get(&proxy.admin_url("/metrics")).1
}

/// Established TCP connections whose destination port is `port` (the proxy's side of its
/// upstream connections to a backend on that port).
fn established_to(port: u16) -> usize {
    let out = std::process::Command::new("ss")
        .args([
            "-Htn",
            "state",
            "established",
            &format!("( dport = :{port} )"),
        ])
        .output()
        .expect("ss (iproute2) is needed");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count()
}

// ---------------------------------------------------------------------------------------------
// Request smuggling and framing
// ---------------------------------------------------------------------------------------------

#[test]
fn cl_and_te_together_are_forwarded_chunked_only_and_smuggle_nothing() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let addr = addr_of(&proxy);

    // CL.TE: Content-Length covers a smuggled request after the chunked terminator. The proxy
    // frames by Transfer-Encoding (RFC 9112 §6.3), so the smuggled bytes are a *second* request
    // on the client connection, which the proxy must not serve (keep-alive is off after CL+TE).
    let smuggled = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let body = format!("0\r\n\r\n{smuggled}");
    let req = format!(
        "POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n{body}",
        body.len()
    );
    let (answer, closed) = exchange(&addr, req.as_bytes(), Duration::from_secs(3));
    let status = status_of(&answer);
    eprintln!("CL.TE: {status}, closed: {closed}");
    assert!(
        status == 200 || (400..500).contains(&status),
        "CL.TE: {answer}"
    );
    assert_eq!(
        answer.matches("HTTP/1.1 ").count(),
        1,
        "one request, one answer: {answer}"
    );
    assert!(closed, "the connection is closed after CL+TE");

    // TE.CL: a short Content-Length, the smuggled request inside a chunk.
    let chunk = "GPOST /smuggled HTTP/1.1\r\nHost: x\r\nContent-Length: 15\r\n\r\nx=";
    let req = format!(
        "POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{chunk}\r\n0\r\n\r\n",
        chunk.len()
    );
    let (answer, _) = exchange(&addr, req.as_bytes(), Duration::from_secs(3));
    let status = status_of(&answer);
    eprintln!("TE.CL: {status}");
    assert!(
        status == 200 || (400..500).contains(&status),
        "TE.CL: {answer}"
    );
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");

    a_normal_request_still_works(&proxy, "/after");
    let seen = legacy.seen();
    for s in &seen {
        if s.method == "POST" {
            assert!(
                !(s.headers.contains_key("content-length")
                    && s.headers.contains_key("transfer-encoding")),
                "the backend saw Content-Length together with Transfer-Encoding: {s:?}"
            );
        }
    }
    let t: Vec<&str> = seen.iter().map(|s| s.target.as_str()).collect();
    assert!(
        !t.iter().any(|t| t.contains("smuggled")),
        "a smuggled request reached the backend: {t:?}"
    );
    // Each forwarded POST kept only Transfer-Encoding (or was refused outright).
    for s in seen.iter().filter(|s| s.method == "POST") {
        assert_eq!(
            s.headers.get("transfer-encoding").map(String::as_str),
            Some("chunked"),
            "{s:?}"
        );
    }
    assert!(
        t.iter().all(|t| ["/a", "/b", "/after"].contains(t)),
        "the backend saw exactly what the proxy routed: {t:?}"
    );
    assert_eq!(t.last(), Some(&"/after"));
}

#[test]
fn duplicate_or_malformed_content_length_is_refused() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let addr = addr_of(&proxy);
    let cases: &[(&str, &str)] = &[
        (
            "two different values",
            "Content-Length: 5\r\nContent-Length: 6\r\n",
        ),
        ("negative", "Content-Length: -1\r\n"),
        ("plus sign", "Content-Length: +5\r\n"),
        ("hex", "Content-Length: 0x10\r\n"),
        ("a list of two", "Content-Length: 1,2\r\n"),
        ("not a number", "Content-Length: five\r\n"),
        ("space inside", "Content-Length: 1 2\r\n"),
        ("overflow", "Content-Length: 99999999999999999999999\r\n"),
    ];
    for (what, headers) in cases {
        // The body carries a would-be smuggled request whatever length the proxy picked.
        let req = format!(
            "POST /cl HTTP/1.1\r\nHost: x\r\n{headers}\r\nhelloGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        );
        let (answer, _) = exchange(&addr, req.as_bytes(), Duration::from_secs(3));
        let status = status_of(&answer);
        eprintln!("Content-Length {what}: {status}");
        assert!(
            (400..500).contains(&status),
            "{what} ({headers:?}) got {answer:?}"
        );
    }
    a_normal_request_still_works(&proxy, "/after");
    assert_eq!(
        targets(&legacy),
        vec!["/after".to_string()],
        "a refused request (or a smuggled one) reached the backend"
    );
}

#[test]
fn unusable_transfer_encodings_are_refused() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let addr = addr_of(&proxy);
    let chunked_body = "5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let cases: &[(&str, String)] = &[
        (
            "xchunked",
            format!("POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n{chunked_body}"),
        ),
        (
            "chunked not final",
            format!("POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n{chunked_body}"),
        ),
        (
            "chunked then identity on two lines",
            format!("POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n{chunked_body}"),
        ),
        (
            "HTTP/1.0 with chunked",
            format!("POST /te HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunked_body}"),
        ),
        (
            "gzip only",
            format!("POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n{chunked_body}"),
        ),
        // Pingora decodes the chunks and would drop the gzip: the proxy's own 400.
        (
            "gzip, chunked",
            format!("POST /te HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n{chunked_body}"),
        ),
    ];
    for (what, req) in cases {
        let (answer, _) = exchange(&addr, req.as_bytes(), Duration::from_secs(3));
        let status = status_of(&answer);
        eprintln!("Transfer-Encoding {what}: {status}");
        assert!((400..500).contains(&status), "{what}: {answer:?}");
        if *what == "gzip, chunked" {
            assert!(answer.contains("\"error\":\"bad_request\""), "{answer}");
        }
    }
    a_normal_request_still_works(&proxy, "/after");
    assert_eq!(targets(&legacy), vec!["/after".to_string()]);
}

#[test]
fn nul_or_bare_cr_in_a_header_is_refused() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let addr = addr_of(&proxy);
    let cases: &[(&str, &[u8])] = &[
        (
            "NUL in a value",
            b"GET /h HTTP/1.1\r\nHost: x\r\nX-A: a\0b\r\n\r\n",
        ),
        (
            "bare CR in a value",
            b"GET /h HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
        ),
        (
            "bare CR smuggling a header",
            b"GET /h HTTP/1.1\r\nHost: x\r\nX-A: a\rTransfer-Encoding: chunked\r\n\r\n",
        ),
        ("NUL in the Host", b"GET /h HTTP/1.1\r\nHost: x\0y\r\n\r\n"),
        (
            "NUL in a name",
            b"GET /h HTTP/1.1\r\nHost: x\r\nX\0A: 1\r\n\r\n",
        ),
        (
            "space before the colon",
            b"GET /h HTTP/1.1\r\nHost: x\r\nX-A : 1\r\n\r\n",
        ),
    ];
    for (what, req) in cases {
        let (answer, _) = exchange(&addr, req, Duration::from_secs(3));
        let status = status_of(&answer);
        eprintln!("header bytes, {what}: {status}");
        assert!((400..500).contains(&status), "{what}: {answer:?}");
    }
    a_normal_request_still_works(&proxy, "/after");
    assert_eq!(targets(&legacy), vec!["/after".to_string()]);
}

#[test]
fn a_refused_upgrade_does_not_turn_the_connection_into_a_tunnel() {
    // The backend ignores Upgrade and answers 200 (as a plain HTTP service does).
    let legacy = Backend::start(Arc::new(|s: &Seen| {
        let mut r = full(200, format!("plain answer to {}", s.target));
        r.headers_mut()
            .insert("content-type", "text/plain".parse().unwrap());
        r
    }));
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let mut s = TcpStream::connect(addr_of(&proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // The pipelined request's target is not normalised (`//pipelined`): a raw tunnel would
    // deliver it as is, a routed request arrives as `/pipelined`, with the proxy's headers.
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n\
GET //pipelined HTTP/1.1\r\nHost: x\r\nX-Request-Id: second\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let first = read_response(&mut r, false).expect("an answer to the upgrade request");
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(String::from_utf8_lossy(&first.body), "plain answer to /ws");
    // The second request is either answered as a request of its own (routed) or not at all.
    let second = read_response(&mut r, false);
    // Let whatever the proxy forwards arrive before judging what the backend saw.
    wait_for("the connection to end", Duration::from_secs(5), || {
        let mut b = [0u8; 1];
        matches!(read_some(&mut s, &mut b), Ok(0) | Err(_))
    });
    a_normal_request_still_works(&proxy, "/after");
    let seen = legacy.seen();
    for req in &seen {
        assert!(
            req.headers.contains_key("x-forwarded-for"),
            "a request reached the backend without passing the proxy's hooks (raw tunnel): {req:?}"
        );
        assert_ne!(req.target, "//pipelined", "raw bytes tunnelled: {seen:?}");
    }
    eprintln!(
        "upgrade answered 200, pipelined request: {}; backend saw {:?}",
        second
            .as_ref()
            .map_or("dropped (connection closed)".to_string(), |r| format!(
                "answered {}",
                r.status
            )),
        targets(&legacy)
    );
    if let Ok(second) = second {
        assert_eq!(second.status, 200, "{second:?}");
        assert_eq!(
            String::from_utf8_lossy(&second.body),
            "plain answer to /pipelined"
        );
        assert_eq!(second.header("x-request-id"), Some("second"));
    }
    let t = targets(&legacy);
    assert_eq!(t.first().map(String::as_str), Some("/ws"), "{t:?}");
    assert_eq!(t.last().map(String::as_str), Some("/after"), "{t:?}");

    // The same, but the follow-up is sent only after the 200 arrived (the classic WebSocket
    // smuggling: a proxy that believes the connection upgraded would now pass raw bytes).
    let mut s = TcpStream::connect(addr_of(&proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"GET /ws2 HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let first = read_response(&mut r, false).expect("an answer to the upgrade request");
    assert_eq!(first.status, 200, "{first:?}");
    let _ = s.write_all(b"GET //after-upgrade HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let second = read_response(&mut r, false);
    eprintln!(
        "upgrade answered 200, then a request on the same connection: {}",
        second
            .as_ref()
            .map_or("connection closed".to_string(), |r| format!(
                "answered {}",
                r.status
            ))
    );
    if let Ok(second) = &second {
        assert_eq!(second.status, 200, "{second:?}");
        assert_eq!(
            String::from_utf8_lossy(&second.body),
            "plain answer to /after-upgrade",
            "routed and normalised"
        );
    }
    a_normal_request_still_works(&proxy, "/after2");
    for req in legacy.seen() {
        assert!(
            req.headers.contains_key("x-forwarded-for") && !req.target.starts_with("//"),
            "raw bytes tunnelled to the backend after a refused upgrade: {req:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Request targets and Host
// ---------------------------------------------------------------------------------------------

/// A backend that answers every request with a 101, then echoes what comes through the tunnel.
fn upgrading_echo_backend() -> SocketAddr {
    let (addr, _lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        if let Some(line) = read_request_head(&mut r) {
            lines.lock().unwrap().push(line);
            let _ = w.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade, X-Hop\r\nX-Hop: secret\r\nKeep-Alive: timeout=5\r\n\r\n",
            );
            let _ = w.flush();
            let mut buf = [0u8; 1024];
            while let Ok(n @ 1..) = read_some(&mut r, &mut buf) {
                let _ = w.write_all(&buf[..n]);
            }
        }
    });
    addr
}

/// Upgrades a connection to the proxy on `path` and checks one round trip through the
/// tunnel; returns its reading side and how many upgrades it took. Pingora 0.9.1 ends a
/// fraction of tunnels right after their 101 under load (cloudflare/pingora#946, README
/// "Known issue"): such a tunnel is opened again, at most three times in all.
fn open_tunnel(proxy: &Proxy, path: &str) -> (BufReader<TcpStream>, u32) {
    let head = format!(
        "GET {path} HTTP/1.1\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    for attempt in 1..=3 {
        let mut s = TcpStream::connect(addr_of(proxy)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let answer = read_response(&mut r, true).expect("the 101");
        assert_eq!(answer.status, 101);
        // The switch goes on; the backend's other hop-by-hop fields end at the proxy.
        let head = |name: &str| answer.header(name);
        assert_eq!(
            (head("upgrade"), head("connection")),
            (Some("websocket"), Some("Upgrade")),
            "{:?}",
            answer.headers
        );
        assert_eq!((head("x-hop"), head("keep-alive")), (None, None));
        s.write_all(b"ping").unwrap();
        let mut echo = [0u8; 4];
        match r.read_exact(&mut echo) {
            Ok(()) => {
                assert_eq!(&echo, b"ping");
                return (r, attempt);
            }
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                eprintln!("tunnel {attempt} ended after its 101 (pingora#946): again");
            }
            Err(e) => panic!("the echo: {e}"),
        }
    }
    panic!("three tunnels in a row ended after their 101");
}

#[test]
fn an_upgrade_nobody_asked_for_is_a_502_not_a_dead_connection() {
    // Answers every request with a 101, asked for or not.
    let baddr = upgrading_echo_backend();
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let t0 = Instant::now();
    let (answer, closed) = exchange(
        &addr_of(&proxy),
        b"GET /ws HTTP/1.1\r\nHost: h\r\n\r\n",
        Duration::from_secs(10),
    );
    assert_eq!(status_of(&answer), 502, "{answer}");
    assert!(answer.contains("\"error\":\"bad_gateway\""), "{answer}");
    assert!(
        closed && t0.elapsed() < Duration::from_secs(5),
        "answered at once"
    );
    wait_for(
        "counted as the backend's error",
        Duration::from_secs(2),
        || {
            proxy.metric(
            "strangler_upstream_errors_total{route=\"default\",backend=\"legacy\",kind=\"other\"}",
        ) == 1.0
        },
    );
    // Offered by the client but not passed on (an HTTP/1.0 client cannot upgrade; Pingora
    // forwards WebSocket offers only), the backend's 101 is as invalid. (Pingora itself refuses
    // the `h2c` one; the HTTP/1.0 one is the proxy's own check.)
    for offer in [
        &b"GET /ws HTTP/1.0\r\nHost: h\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"[..],
        b"GET /ws HTTP/1.1\r\nHost: h\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    ] {
        let t0 = Instant::now();
        let (answer, closed) = exchange(&addr_of(&proxy), offer, Duration::from_secs(10));
        assert_eq!(status_of(&answer), 502, "{answer}");
        assert!(closed && t0.elapsed() < Duration::from_secs(5), "answered at once");
    }
    // Asked for, the same 101 is a tunnel.
    let (_, _) = open_tunnel(&proxy, "/ws");
}

#[test]
fn an_idle_tunnel_ends_at_the_timeout_without_blaming_the_backend() {
    // A WebSocket backend; nobody speaks after the first message. (The timeout also runs
    // between the 101 and the first message: shorter than 1 s, a loaded machine's scheduling
    // delay can end the tunnel before it. A tunnel that ends right after its 101 whatever the
    // timeout is Pingora's #946, which `open_tunnel` opens again.)
    let baddr = upgrading_echo_backend();
    let proxy = Proxy::start(&format!(
        "backends:\n  legacy: {{url: 'http://127.0.0.1:{}'}}\n  new: {{url: 'http://{baddr}', timeout: 1s}}\n\
         default: legacy\nroutes:\n\
         \x20 - {{name: ws, path: /ws, to: new, rollback: {{error_rate: 1%, min_requests: 1, window: 60s}}}}\n",
        dead_port()
    ));
    let mut upgrades = 0;
    for _ in 0..2 {
        let (mut r, made) = open_tunnel(&proxy, "/ws");
        upgrades += made;
        // Then silence: the tunnel ends at the backend's `timeout` (nginx's
        // proxy_read_timeout does the same), with no error answer written into it.
        let t0 = Instant::now();
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "closed at the timeout"
        );
    }
    let code_101 =
        "strangler_requests_total{route=\"ws\",backend=\"new\",method=\"GET\",code=\"101\"}";
    wait_for("every tunnel counted", Duration::from_secs(2), || {
        proxy.metric(code_101) == f64::from(upgrades)
    });
    // An idle tunnel is not the backend's failure: no upstream error, no rollback.
    let (_, metrics) = get(&proxy.admin_url("/metrics"));
    assert!(
        !metrics.contains("strangler_upstream_errors_total{backend=\"new\""),
        "{metrics}"
    );
    assert_eq!(proxy.metric("strangler_route_pinned{route=\"ws\"}"), 0.0);
    assert!(
        proxy.log_text().contains("idle for the backend's timeout")
            && !proxy.log_text().contains("Fail to proxy"),
        "{}",
        proxy.log_text()
    );
}

/// A WebSocket backend that goes away while its client is talking (it closes with the client's
/// next message unread, so its kernel resets the connection): that is how this tunnel ends,
/// not a failure of the backend. No upstream error, no rollback, an info line.
#[test]
fn a_tunnel_the_backend_resets_is_not_its_failure() {
    let (baddr, _lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        if let Some(line) = read_request_head(&mut r) {
            lines.lock().unwrap().push(line);
            let _ = w.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
            );
            // One round trip (`open_tunnel`'s), then the client's next message arrives and
            // stays unread: the close resets.
            let mut ping = [0u8; 4];
            if r.read_exact(&mut ping).is_ok() {
                let _ = w.write_all(&ping);
                let _ = w.peek(&mut ping);
            }
        }
    });
    let proxy = Proxy::start(&format!(
        "backends:\n  legacy: {{url: 'http://127.0.0.1:{}'}}\n  new: {{url: 'http://{baddr}'}}\n\
         default: legacy\nroutes:\n\
         \x20 - {{name: ws, path: /ws, to: new, rollback: {{error_rate: 1%, min_requests: 1, window: 60s}}}}\n",
        dead_port()
    ));
    let (mut r, _) = open_tunnel(&proxy, "/ws");
    r.get_mut().write_all(b"more").unwrap();
    // The tunnel ends (an end of file or a reset, as the proxy passes it on).
    let mut rest = Vec::new();
    let _ = r.read_to_end(&mut rest);
    wait_for("the tunnel's end logged", Duration::from_secs(5), || {
        proxy
            .log_text()
            .contains("closed: the backend closed or reset it")
    });
    let (_, metrics) = get(&proxy.admin_url("/metrics"));
    assert!(
        !metrics.contains("strangler_upstream_errors_total{backend=\"new\""),
        "{metrics}"
    );
    assert_eq!(proxy.metric("strangler_route_pinned{route=\"ws\"}"), 0.0);
}

/// Headers that Pingora's own parser refuses before any hook runs (it would answer a bare 400)
/// get the proxy's JSON answers as its limits would give them: a target over Pingora's 65 534
/// bytes is a 414, more than 256 fields a 431, two `Host` headers or conflicting lengths a 400.
/// Each carries the three stamps, closes the connection, is counted, and reaches no backend; a
/// `HEAD` gets the header alone.
#[test]
fn headers_the_parser_refuses_get_the_proxys_json_answers() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let addr = addr_of(&proxy);
    let long = format!("GET /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let fields: String = (0..300).map(|i| format!("X-F{i}: 1\r\n")).collect();
    let many = format!("POST /m HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n{fields}\r\n");
    let head = format!("HEAD /{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(70_000));
    let cases: [(&str, &[u8], u16, &str); 5] = [
        (
            "a target over 65 534 bytes",
            long.as_bytes(),
            414,
            "uri_too_long",
        ),
        (
            "300 header fields",
            many.as_bytes(),
            431,
            "headers_too_large",
        ),
        (
            "two Host headers",
            b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            400,
            "bad_request",
        ),
        (
            "conflicting lengths",
            b"POST /a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
            400,
            "bad_request",
        ),
        (
            "HEAD with a target over 65 534 bytes",
            head.as_bytes(),
            414,
            "",
        ),
    ];
    for (what, req, status, code) in cases {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(req).unwrap();
        let mut r = BufReader::new(s);
        let resp = read_response(&mut r, code.is_empty())
            .unwrap_or_else(|e| panic!("{what}: no answer ({e})"));
        assert_eq!(resp.status, status, "{what}: {resp:?}");
        assert_eq!(
            resp.header("content-type"),
            Some("application/json"),
            "{what}"
        );
        assert_eq!(resp.header("x-strangler-route"), Some("default"), "{what}");
        assert_eq!(resp.header("x-strangler-backend"), Some("none"), "{what}");
        assert_eq!(resp.header("connection"), Some("close"), "{what}");
        let id = resp.header("x-request-id").expect("a request id");
        assert_eq!(id.len(), 32, "{what}: {id}");
        let mut rest = Vec::new();
        let _ = r.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{what}: bytes after the answer: {rest:?}");
        if code.is_empty() {
            continue; // HEAD: the header alone, its Content-Length that of the JSON.
        }
        let v: serde_json::Value = serde_json::from_slice(&resp.body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {resp:?}"));
        assert_eq!(v["error"], code, "{what}");
        assert_eq!(v["route"], "default", "{what}");
        assert_eq!(v["backend"], "none", "{what}");
        assert_eq!(v["request_id"], id, "{what}");
    }
    for (method, code, n) in [
        ("GET", 414, 1.0),
        ("HEAD", 414, 1.0),
        ("POST", 431, 1.0),
        ("GET", 400, 1.0),
        ("POST", 400, 1.0),
    ] {
        proxy.wait_metric(
            &format!(
                "strangler_requests_total{{route=\"default\",backend=\"none\",method=\"{method}\",code=\"{code}\"}}"
            ),
            n,
        );
    }
    assert!(
        legacy.seen().is_empty(),
        "a refused request reached the backend: {:?}",
        targets(&legacy)
    );
    // The connection that served a request answers a refused one behind it the same way.
    let (answer, closed) = exchange(
        &addr,
        b"GET /first HTTP/1.1\r\nHost: x\r\n\r\nGET /second HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(closed, "{answer}");
    assert_eq!(answer.matches("HTTP/1.1 ").count(), 2, "{answer}");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let second = &answer[answer.rfind("HTTP/1.1 ").unwrap()..];
    assert_eq!(status_of(second), 400, "{answer}");
    assert!(second.contains("\"error\":\"bad_request\""), "{answer}");
    assert_eq!(targets(&legacy), vec!["/first".to_string()]);
}

#[test]
fn foreign_targets_connect_and_host_errors_are_refused_and_sent_nowhere() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let addr = addr_of(&proxy);
    let cases: &[(&str, &[u8])] = &[
        (
            "absolute-form, foreign host",
            b"GET http://evil.example/a HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        ),
        (
            "absolute-form, foreign host, own Host header",
            b"GET http://evil.example/a HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "absolute-form https",
            b"GET https://evil.example:443/a HTTP/1.1\r\nHost: evil.example\r\n\r\n",
        ),
        (
            "CONNECT",
            b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n\r\n",
        ),
        (
            "CONNECT with a path",
            b"CONNECT /a HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        (
            "authority-form GET",
            b"GET evil.example:443 HTTP/1.1\r\nHost: x\r\n\r\n",
        ),
        ("missing Host on HTTP/1.1", b"GET /a HTTP/1.1\r\n\r\n"),
        (
            "two Host headers",
            b"GET /a HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        ),
        (
            "two Host headers, one empty",
            b"GET /a HTTP/1.1\r\nHost: a\r\nHost: \r\n\r\n",
        ),
        ("asterisk with GET", b"GET * HTTP/1.1\r\nHost: x\r\n\r\n"),
        (
            "Connection naming X-Forwarded-For",
            b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: X-Forwarded-For\r\n\r\n",
        ),
        (
            "Connection naming Host",
            b"GET /a HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, host\r\n\r\n",
        ),
        (
            // Stripped as hop-by-hop, the body would reach the backend re-framed as chunked.
            "Connection naming Content-Length",
            b"POST /a HTTP/1.1\r\nHost: x\r\nConnection: Content-Length\r\nContent-Length: 3\r\n\r\nabc",
        ),
    ];
    for (what, req) in cases {
        let (answer, _) = exchange(&addr, req, Duration::from_secs(3));
        let status = status_of(&answer);
        assert_eq!(status, 400, "{what}: {answer:?}");
        // All of them the proxy's own JSON, those Pingora's parser refuses before any hook
        // (two Hosts, a foreign absolute-form target) as well as those the hooks refuse.
        let body = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
        let v: serde_json::Value = serde_json::from_str(body)
            .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {answer}"));
        assert_eq!(v["error"], "bad_request", "{what}");
        // Refused before routing: no backend is blamed for it.
        assert_eq!(v["backend"], "none", "{what}: {answer}");
        if *what == "CONNECT" || what.starts_with("absolute") {
            assert!(
                !answer.to_ascii_lowercase().contains("evil.example"),
                "{what}: the answer mentions the foreign host: {answer}"
            );
        }
    }
    assert!(
        legacy.seen().is_empty(),
        "a refused request reached the backend: {:?}",
        targets(&legacy)
    );
    // HTTP/1.0 without Host is lawful and forwarded.
    // Its own X-Forwarded-Host does not pass for the proxy's: there is no Host to report.
    let (answer, _) = exchange(
        &addr,
        b"GET /ten HTTP/1.0\r\nX-Forwarded-Host: evil.example\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(status_of(&answer), 200, "{answer}");
    assert_eq!(targets(&legacy), vec!["/ten".to_string()]);
    // The upstream request is HTTP/1.1, which needs a Host: the backend's address.
    let backend_authority = legacy.url().trim_start_matches("http://").to_string();
    assert_eq!(
        legacy.seen()[0].headers.get("host"),
        Some(&backend_authority),
        "{:?}",
        legacy.seen()[0].headers
    );
    assert_eq!(
        legacy.seen()[0].headers.get("x-forwarded-host"),
        None,
        "{:?}",
        legacy.seen()[0].headers
    );
}

// ---------------------------------------------------------------------------------------------
// Failing backends
// ---------------------------------------------------------------------------------------------

#[test]
fn a_refusing_backend_is_502_at_once() {
    let port = dead_port();
    let proxy = Proxy::start(&one_backend(&format!("http://127.0.0.1:{port}")));
    for n in 0..3 {
        let t0 = Instant::now();
        let r = request(
            "GET",
            &proxy.url("/x"),
            &[("X-Request-Id", &format!("refused-{n}"))],
            None,
        );
        let took = t0.elapsed();
        assert_eq!(r.status, 502, "{}", r.body);
        assert_eq!(r.json()["error"], "bad_gateway");
        assert!(took < Duration::from_secs(1), "502 took {took:?}");
    }
    wait_for("connect errors counted", Duration::from_secs(2), || {
        proxy.metric(
            "strangler_upstream_errors_total{route=\"default\",backend=\"legacy\",kind=\"connect\"}",
        ) == 3.0
    });
    // Pingora's error line names the request the client was told about, and where it went.
    wait_for(
        "the failure logged with its request",
        Duration::from_secs(2),
        || {
            proxy.log_text().lines().any(|l| {
                l.contains("request_id: refused-2, route: default")
                    && l.contains(&format!("backend: legacy at 127.0.0.1:{port}"))
            })
        },
    );
    // A backend that is down fails every request: ten such lines a second, then the count of
    // those held back, said with the next one shown (the metrics count every failure).
    let failure_lines = || {
        proxy
            .log_text()
            .lines()
            .filter(|l| l.contains("Fail to proxy") && !l.contains("more request failure lines"))
            .count()
    };
    let before = failure_lines();
    let t0 = Instant::now();
    for _ in 0..100 {
        assert_eq!(request("GET", &proxy.url("/x"), &[], None).status, 502);
    }
    // Ten a second at most, whatever this machine's pace: each second begun shows ten.
    let seconds = t0.elapsed().as_secs() as usize + 2;
    let shown = failure_lines() - before;
    assert!(
        shown <= (10 * seconds).min(99),
        "{shown} lines in {seconds} s:\n{}",
        proxy.log_text()
    );
    wait_for(
        "the count of lines held back",
        Duration::from_secs(5),
        || {
            assert_eq!(request("GET", &proxy.url("/x"), &[], None).status, 502);
            proxy.log_text().contains("more request failure lines")
        },
    );
    wait_for("every failure counted", Duration::from_secs(2), || {
        proxy.metric(
            "strangler_upstream_errors_total{route=\"default\",backend=\"legacy\",kind=\"connect\"}",
        ) >= 103.0
    });
}

#[test]
fn a_backend_that_accepts_and_never_answers_is_504_at_the_timeout() {
    let listener = listener();
    let port = listener.local_addr().unwrap().port();
    // Accepts, and holds every socket open without reading or writing.
    let held = Arc::new(AtomicUsize::new(0));
    let h2 = held.clone();
    std::thread::spawn(move || {
        let mut keep = Vec::new();
        for s in listener.incoming().flatten() {
            keep.push(s);
            h2.fetch_add(1, Ordering::SeqCst);
        }
    });
    let proxy = Proxy::start(&format!(
        "backends:\n  legacy: {{url: 'http://127.0.0.1:{port}', timeout: 500ms}}\ndefault: legacy\n"
    ));
    for method in ["GET", "POST"] {
        let t0 = Instant::now();
        let body: Option<&[u8]> = (method == "POST").then_some(b"data");
        let r = request(method, &proxy.url("/hang"), &[], body);
        let took = t0.elapsed();
        assert_eq!(r.status, 504, "{method}: {}", r.body);
        assert_eq!(r.json()["error"], "gateway_timeout");
        assert!(
            took >= Duration::from_millis(400) && took <= Duration::from_secs(3),
            "{method}: 504 after {took:?}, want ~500ms"
        );
    }
    assert!(held.load(Ordering::SeqCst) >= 1);
    wait_for("timeouts counted", Duration::from_secs(2), || {
        proxy.metric(
            "strangler_upstream_errors_total{route=\"default\",backend=\"legacy\",kind=\"timeout\"}",
        ) >= 2.0
    });
}

#[test]
fn a_client_that_stalls_its_upload_gets_408_and_the_backend_is_not_blamed() {
    // Reads the head and the whole body before answering, as a real application does.
    let (baddr, lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        while let Some(line) = read_request_head(&mut r) {
            lines.lock().unwrap().push(line);
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let proxy = Proxy::start(&format!(
        "backends:\n  legacy: {{url: 'http://127.0.0.1:{}'}}\n  new: {{url: 'http://{baddr}', timeout: 1s}}\n\
         default: legacy\nroutes:\n  - {{name: up, path: /up, to: new, rollback: {{error_rate: 1%, min_requests: 1, window: 60s}}}}\n",
        dead_port()
    ));
    let addr = addr_of(&proxy);
    for _ in 0..3 {
        // Half of the body, then silence: the answer comes when the backend's timeout runs out.
        let t0 = Instant::now();
        let (answer, closed) = exchange(
            &addr,
            b"POST /up/x HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nhello",
            Duration::from_secs(10),
        );
        assert_eq!(status_of(&answer), 408, "{answer}");
        assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");
        assert!(answer.contains("X-Strangler-Backend: new"), "{answer}");
        assert!(
            closed,
            "the connection is closed: the rest of the body never came"
        );
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
    // The backend did nothing wrong: no upstream error, and the route is not rolled back.
    let r = request("POST", &proxy.url("/up/y"), &[], Some(b"0123456789"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-strangler-backend"), "new");
    let m = metrics_body(&proxy);
    assert_eq!(
        metric_value(
            &m,
            "strangler_upstream_errors_total{route=\"up\",backend=\"new\",kind=\"timeout\"}"
        ),
        0.0,
        "{m}"
    );
    assert_eq!(
        metric_value(&m, "strangler_route_pinned{route=\"up\"}"),
        0.0
    );
    wait_for("the 408s counted", Duration::from_secs(2), || {
        proxy.metric(
            "strangler_requests_total{route=\"up\",backend=\"new\",method=\"POST\",code=\"408\"}",
        ) == 3.0
    });
    assert!(lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.starts_with("POST /up/y")));
}

/// `Expect: 100-continue` is answered by the proxy (as nginx and Envoy do) and not sent on: a
/// client that then sends its body and meets a silent backend gets the backend's 504; one that
/// withholds its body after the `100` has stalled (408), and the backend is not blamed.
#[test]
fn the_proxy_answers_expect_continue_and_blames_the_side_that_went_silent() {
    // Records the request head, then sends nothing: it waits for the rest of the body.
    let (baddr, lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).map_or(true, |n| n == 0) {
                return;
            }
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        lines.lock().unwrap().push(head);
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    let proxy = Proxy::start(&format!(
        "backends:\n  legacy: {{url: 'http://127.0.0.1:{}'}}\n  new: {{url: 'http://{baddr}', timeout: 300ms}}\n\
         default: legacy\nroutes:\n  - {{name: up, path: /up, to: new}}\n",
        dead_port()
    ));
    let addr = addr_of(&proxy);
    // Sends the head, reads the proxy's `100 Continue`, then sends `body` (maybe nothing).
    let upload = |body: &[u8]| -> String {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(
            b"POST /up/x HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
        )
        .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        while !got.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = read_some(&mut s, &mut buf).unwrap();
            assert!(n > 0, "closed before the 100");
            got.extend_from_slice(&buf[..n]);
        }
        let interim = String::from_utf8_lossy(&got).into_owned();
        assert!(
            interim.starts_with("HTTP/1.1 100 Continue\r\n"),
            "{interim}"
        );
        s.write_all(body).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        got.extend_from_slice(&rest);
        let all = String::from_utf8_lossy(&got).into_owned();
        all.split_once("\r\n\r\n").unwrap().1.to_string()
    };
    let timeouts = || {
        proxy.metric(
            "strangler_upstream_errors_total{route=\"up\",backend=\"new\",kind=\"timeout\"}",
        )
    };

    let answer = upload(b"0123456789");
    assert_eq!(status_of(&answer), 504, "{answer}");
    assert!(answer.contains("\"error\":\"gateway_timeout\""), "{answer}");
    wait_for(
        "the backend's timeout counted",
        Duration::from_secs(2),
        || timeouts() == 1.0,
    );
    let heads = lines.lock().unwrap().clone();
    assert!(heads[0].starts_with("POST /up/x"), "{heads:?}");
    assert!(
        !heads[0].to_ascii_lowercase().contains("expect:"),
        "answered by the proxy, not sent on: {heads:?}"
    );

    let answer = upload(b"");
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("\"error\":\"request_timeout\""), "{answer}");
    assert_eq!(timeouts(), 1.0, "the client's stall is not the backend's");
}

#[test]
fn an_upload_that_asked_for_100_continue_keeps_its_connection() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let mut s = TcpStream::connect(addr_of(&proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(
        b"POST /up HTTP/1.1\r\nHost: h\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut r, false).unwrap().status, 100);
    s.write_all(b"0123456789").unwrap();
    let answer = read_response(&mut r, false).unwrap();
    assert_eq!(answer.status, 200);
    assert_ne!(
        answer.header("connection"),
        Some("close"),
        "the 100 cost the client its connection"
    );
    assert!(String::from_utf8_lossy(&answer.body).contains("\"body_len\":10"));
    // The same connection serves the next request.
    s.write_all(b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n")
        .unwrap();
    let answer = read_response(&mut r, false).unwrap();
    assert_eq!(answer.status, 200);
    assert!(String::from_utf8_lossy(&answer.body).contains("/next"));
}

#[test]
fn a_client_cut_short_by_an_early_answer_is_let_go_soon() {
    // Refuses the upload from its head (413, close) without reading the body.
    let (baddr, _lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut line = String::new();
        while r.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
            lines.lock().unwrap().push(std::mem::take(&mut line));
        }
        let _ = w.write_all(
            b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        );
        let _ = w.shutdown(Shutdown::Both);
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    // A client that stops sending once it has its final answer, and waits for the close.
    let mut s = TcpStream::connect(addr_of(&proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    s.write_all(b"POST /big HTTP/1.1\r\nHost: h\r\nContent-Length: 5000000\r\n\r\n")
        .unwrap();
    s.write_all(&[b'u'; 1000]).unwrap();
    let t0 = Instant::now();
    assert_eq!(read_response(&mut r, false).unwrap().status, 413);
    let mut buf = [0u8; 1024];
    while matches!(read_some(&mut r, &mut buf), Ok(1..)) {}
    let held = t0.elapsed();
    assert!(
        held < Duration::from_secs(15),
        "the answered client was held {held:?} (the linger is 5 s)"
    );
    wait_for(
        "the request ended, as answered",
        Duration::from_secs(3),
        || {
            proxy.metric("strangler_requests_in_flight{route=\"default\"}") == 0.0
            && proxy.metric(
                "strangler_requests_total{route=\"default\",backend=\"legacy\",method=\"POST\",code=\"413\"}",
            ) == 1.0
        },
    );
}

#[test]
fn a_backend_that_stalls_mid_body_counts_toward_automatic_rollback() {
    // A header and the start of a body, then silence (until the proxy gives up and closes).
    let (baddr, _lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        if let Some(line) = read_request_head(&mut r) {
            lines.lock().unwrap().push(line);
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
            let mut sink = [0u8; 64];
            while let Ok(1..) = read_some(&mut r, &mut sink) {}
        }
    });
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&format!(
        "backends:\n  legacy: {{url: '{}'}}\n  new: {{url: 'http://{baddr}', timeout: 1s}}\n\
         default: legacy\nroutes:\n  - {{name: stall, path: /stall, to: new, rollback: {{error_rate: 50%, min_requests: 3, window: 60s}}}}\n",
        legacy.url()
    ));
    for _ in 0..3 {
        let (answer, _) = exchange(
            &addr_of(&proxy),
            b"GET /stall/x HTTP/1.1\r\nHost: h\r\n\r\n",
            Duration::from_secs(10),
        );
        assert_eq!(status_of(&answer), 200, "{answer}");
        assert!(answer.ends_with("0123456789"), "truncated: {answer}");
    }
    // A 200 whose body never came is a timeout of the backend: three of three failed.
    wait_for("the route rolled back", Duration::from_secs(5), || {
        proxy.metric("strangler_route_pinned{route=\"stall\"}") == 1.0
    });
    let r = request("GET", &proxy.url("/stall/y"), &[], None);
    assert_eq!((r.status, r.header("x-strangler-backend")), (200, "legacy"));
    assert_eq!(
        proxy.metric(
            "strangler_upstream_errors_total{route=\"stall\",backend=\"new\",kind=\"timeout\"}"
        ),
        3.0
    );
}

#[test]
fn a_backend_that_breaks_off_mid_body_truncates_and_is_counted_as_reset() {
    // /trunc: promises 100 000 bytes, sends 1 000, closes. Anything else: a proper answer.
    let (baddr, _lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        while let Some(line) = read_request_head(&mut r) {
            lines.lock().unwrap().push(line.clone());
            if line.contains("/trunc") {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
                let _ = w.write_all(&[b'x'; 1000]);
                let _ = w.flush();
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let addr = addr_of(&proxy);
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /trunc HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let t0 = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    let ended = loop {
        match read_some(&mut s, &mut buf) {
            Ok(0) => break "closed",
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break "reset",
            Err(_) => break "silent",
        }
    };
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body_len = out.len() - text.find("\r\n\r\n").unwrap() - 4;
    assert!(
        ended != "silent",
        "the proxy kept the client waiting after the backend broke off ({body_len} bytes in {:?})",
        t0.elapsed()
    );
    assert!(
        body_len < 100_000,
        "the body is truncated, not padded: {body_len}"
    );
    // The next request works.
    let r = request("GET", &proxy.url("/fine"), &[], None);
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
    wait_for("kind=reset counted", Duration::from_secs(3), || {
        proxy.metric(
            "strangler_upstream_errors_total{route=\"default\",backend=\"legacy\",kind=\"reset\"}",
        ) >= 1.0
    });
}

#[test]
fn a_response_s_first_bytes_reach_the_client_while_its_backend_pauses() {
    // A header with a Content-Length and ten bytes, then nothing until the test opens the gate
    // (a report whose first rows are ready, a long poll that sends its header first).
    let gate = Gate::default();
    let g = gate.clone();
    let (baddr, _lines) = raw_backend(move |s, _lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        if read_request_head(&mut r).is_some() {
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789");
            let _ = w.flush();
            g.wait();
            let _ = w.write_all(&[b'z'; 90]);
        }
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let mut s = TcpStream::connect(addr_of(&proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /report HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("0123456789") {
        match read_some(&mut s, &mut buf) {
            Ok(n) if n > 0 => got.extend_from_slice(&buf[..n]),
            other => panic!(
                "the header and first bytes were held back ({other:?}): {:?}",
                String::from_utf8_lossy(&got)
            ),
        }
    }
    gate.open();
    while !got.ends_with(&[b'z'; 90]) {
        let n = read_some(&mut s, &mut buf).unwrap();
        assert!(n > 0, "closed early: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert_eq!(got.len() - text.find("\r\n\r\n").unwrap() - 4, 100);
}

#[test]
fn a_response_that_outlives_the_rollback_window_is_not_judged_in_it() {
    // /long: a good header and a little body, then the connection is cut once the test opens
    // the gate. Anything else: a proper answer.
    let gate = Gate::default();
    let g = gate.clone();
    let (baddr, _lines) = raw_backend(move |s, _lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        while let Some(line) = read_request_head(&mut r) {
            if line.contains("/long") {
                let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\nxxxxxxxxxx");
                let _ = w.flush();
                g.wait();
                let _ = w.shutdown(Shutdown::Both);
                return;
            }
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let legacy = Backend::echo("legacy");
    let window = Duration::from_secs(1);
    let proxy = Proxy::start(&format!(
        "backends:\n  legacy: {{url: '{}'}}\n  new: {{url: 'http://{baddr}'}}\ndefault: legacy\nroutes:\n\
         \x20 - {{name: stream, path: /stream, to: new, rollback: {{error_rate: 60%, min_requests: 2, window: 1s}}}}\n",
        legacy.url()
    ));
    let addr = addr_of(&proxy);
    // Two long downloads, judged good at their header.
    let long: Vec<TcpStream> = (0..2)
        .map(|_| {
            let mut s = TcpStream::connect(&addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            s.write_all(b"GET /stream/long HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 4096];
            while !String::from_utf8_lossy(&head).contains("xxxxxxxxxx") {
                let n = read_some(&mut s, &mut buf)
                    .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&head)));
                assert!(n > 0, "closed early: {}", String::from_utf8_lossy(&head));
                head.extend_from_slice(&buf[..n]);
            }
            s
        })
        .collect();
    // The window passes (nothing to wait on but the clock: the downloads are still running).
    std::thread::sleep(window + Duration::from_millis(100));
    // Two quick successes inside the new window.
    for _ in 0..2 {
        let r = request("GET", &proxy.url("/stream/ok"), &[], None);
        assert_eq!((r.status, r.header("x-strangler-backend")), (200, "new"));
    }
    // The long downloads break off now: sent before this window, they are not judged in it.
    gate.open();
    for mut s in long {
        let mut buf = [0u8; 4096];
        while matches!(read_some(&mut s, &mut buf), Ok(n) if n > 0) {}
    }
    wait_for("both cut downloads counted", Duration::from_secs(5), || {
        proxy.metric(
            "strangler_upstream_errors_total{route=\"stream\",backend=\"new\",kind=\"reset\"}",
        ) == 2.0
    });
    assert_eq!(
        proxy.metric("strangler_route_pinned{route=\"stream\"}"),
        0.0,
        "pinned by failures of requests sent before the window: {}",
        proxy.log_text()
    );
    let r = request("GET", &proxy.url("/stream/ok"), &[], None);
    assert_eq!((r.status, r.header("x-strangler-backend")), (200, "new"));
}

#[test]
fn a_backend_that_closes_every_connection_after_answering_costs_no_request() {
    // Answers one request per connection, without `Connection: close`, then closes.
    let served = Arc::new(AtomicUsize::new(0));
    let s2 = served.clone();
    let (baddr, _lines) = raw_backend(move |s, _lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        if read_request_head(&mut r).is_some() {
            // Counted before the answer goes out: counted after, the last request's count
            // could still be on its way when the client, already answered, reads it.
            s2.fetch_add(1, Ordering::SeqCst);
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
            let _ = w.flush();
        }
        // Dropping both halves closes the connection.
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let agent = ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build(),
    );
    let mut statuses = Vec::new();
    for i in 0..20 {
        let status = match agent.get(&proxy.url(&format!("/n/{i}"))).call() {
            Ok(mut r) => {
                let _ = r.body_mut().read_to_string();
                r.status().as_u16()
            }
            Err(_) => 0,
        };
        statuses.push(status);
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "sequential GETs failed against a backend that closes idle connections: {statuses:?}"
    );
    // The same for HEAD and for a body-less DELETE (idempotent too).
    for m in ["HEAD", "DELETE"] {
        for _ in 0..3 {
            let r = request(m, &proxy.url("/m"), &[], None);
            assert_eq!(r.status, 200, "{m}");
        }
    }
    assert!(served.load(Ordering::SeqCst) >= 26);
}

#[test]
fn a_request_that_kills_its_backend_connection_is_retried_once_not_once_per_pooled_connection() {
    // Keep-alive backend: `/slow` answers after 300 ms (so that several requests in parallel
    // leave as many idle pooled connections); `/die` closes the connection without an answer,
    // as a worker that crashes on a request does.
    let (baddr, lines) = raw_backend(move |s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        while let Some(line) = read_request_head(&mut r) {
            lines.lock().unwrap().push(line.clone());
            if line.contains("/die") {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
            let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let warm: Vec<_> = (0..5)
        .map(|i| {
            let url = proxy.url(&format!("/slow/{i}"));
            std::thread::spawn(move || request("GET", &url, &[], None).status)
        })
        .collect();
    for w in warm {
        assert_eq!(w.join().unwrap(), 200);
    }
    let r = request("GET", &proxy.url("/die"), &[], None);
    assert_eq!(r.status, 502, "{}", r.body);
    let tries = lines
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("/die"))
        .count();
    assert!(
        (1..=2).contains(&tries),
        "the backend saw the request {tries} times (5 idle pooled connections)"
    );
}

#[test]
fn an_http_1_0_client_gets_a_body_it_can_read_not_chunks() {
    // The backend answers with a chunked body, whatever the request's version.
    let (baddr, _lines) = raw_backend(move |s, _lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        while read_request_head(&mut r).is_some() {
            let _ = w.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\naaa\r\n3\r\nbbb\r\n0\r\n\r\n",
            );
        }
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let addr = addr_of(&proxy);
    for req in [
        &b"GET /old HTTP/1.0\r\nHost: x\r\n\r\n"[..],
        b"GET /old HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n",
    ] {
        let (answer, closed) = exchange(&addr, req, Duration::from_secs(5));
        let (head, body) = answer.split_once("\r\n\r\n").unwrap();
        assert_eq!(status_of(&answer), 200, "{answer}");
        assert!(
            !head.to_ascii_lowercase().contains("transfer-encoding"),
            "{head}"
        );
        assert_eq!(body, "aaabbb", "{answer}");
        assert!(closed, "the body ends with the connection: {answer}");
    }
    // HTTP/1.1 clients keep the chunked framing (and their connection).
    let (answer, _) = exchange(
        &addr,
        b"GET /new HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        answer
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked"),
        "{answer}"
    );
}

/// Interim (1xx) answers: relayed to HTTP/1.1 clients, never to HTTP/1.0 ones; a backend that
/// fails after one still gets its client a final answer (and is counted by it); an endless
/// stream of them is a 502. And the proxy's own version on an HTTP/1.0 backend's status line.
#[test]
fn interim_responses_never_stand_in_for_the_answer() {
    let (baddr, lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        while let Some(line) = read_request_head(&mut r) {
            lines.lock().unwrap().push(line.clone());
            let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
            let _ = match path.as_str() {
                "/hints" => w.write_all(
                    b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: X-Hop\r\nX-Hop: secret\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                ),
                "/hints-then-close" => {
                    let _ = w.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n");
                    return;
                }
                // A 103, then nothing until the proxy closes the connection.
                "/hints-then-silence" => {
                    w.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n")
                }
                "/flood" => {
                    for _ in 0..40 {
                        let _ = w.write_all(b"HTTP/1.1 102 Processing\r\n\r\n");
                    }
                    w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                }
                _ => {
                    let _ = w.write_all(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok");
                    return;
                }
            };
        }
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let addr = addr_of(&proxy);
    let seen = |path: &str| {
        lines
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.split_whitespace().nth(1) == Some(path))
            .count()
    };

    // Relayed to an HTTP/1.1 client, then the answer.
    let (answer, _) = exchange(
        &addr,
        b"GET /hints HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 103"), "{answer}");
    assert!(answer.contains("\r\n\r\nHTTP/1.1 200 OK\r\n") && answer.ends_with("ok"));
    // Without the backend's hop-by-hop fields: those it names in `Connection`, and that one.
    let interim = answer
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        interim.contains("link: </a.css>")
            && !interim.contains("x-hop")
            && !interim.contains("connection:"),
        "{answer}"
    );
    // Never to an HTTP/1.0 client (RFC 9110 §15.2): it would take it for the answer.
    let (answer, _) = exchange(
        &addr,
        b"GET /hints HTTP/1.0\r\nHost: h\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(!answer.contains(" 103 "), "{answer}");

    // The backend fails after its 103: the client still gets the proxy's 502, counted as a
    // 502, and the request is not sent again (the 1xx is already out).
    let (answer, _) = exchange(
        &addr,
        b"GET /hints-then-close HTTP/1.1\r\nHost: h\r\n\r\n",
        Duration::from_secs(5),
    );
    let (interim, last) = answer.split_once("\r\n\r\n").unwrap();
    assert!(interim.starts_with("HTTP/1.1 103"), "{answer}");
    assert_eq!(status_of(last), 502, "{answer}");
    assert!(last.contains("\"error\":\"bad_gateway\""), "{answer}");
    assert_eq!(seen("/hints-then-close"), 1);
    let code = |c: &str| {
        proxy.metric(&format!(
            "strangler_requests_total{{route=\"default\",backend=\"legacy\",method=\"GET\",code=\"{c}\"}}"
        ))
    };
    wait_for("the 502 counted", Duration::from_secs(2), || {
        code("502") == 1.0
    });
    assert_eq!(code("103"), 0.0);

    // A HEAD whose client leaves after the 103: the answer never came, so a 499 (a HEAD's
    // answer ends at its header, but a 103 is not the answer).
    let mut c = std::net::TcpStream::connect(&addr).unwrap();
    c.write_all(b"HEAD /hints-then-silence HTTP/1.1\r\nHost: h\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = read_some(&mut c, &mut buf).unwrap();
        assert!(n > 0, "closed before the 103");
        got.extend_from_slice(&buf[..n]);
    }
    assert!(got.starts_with(b"HTTP/1.1 103"));
    drop(c);
    wait_for("the HEAD counted as 499", Duration::from_secs(3), || {
        proxy.metric(
            "strangler_requests_total{route=\"default\",backend=\"legacy\",method=\"HEAD\",code=\"499\"}",
        ) == 1.0
    });

    // An endless stream of 1xx: a 502 after MAX_INTERIM of them, the backend's error.
    let (answer, _) = exchange(
        &addr,
        b"GET /flood HTTP/1.1\r\nHost: h\r\n\r\n",
        Duration::from_secs(5),
    );
    // At most MAX_INTERIM of them are relayed. The last one may not be: Pingora's two halves
    // hand the 17th's error to the client side, which can answer it before writing a 1xx
    // still queued (seen under load: 15 relayed in 8 of 30 runs).
    let relayed = answer.matches("HTTP/1.1 102").count();
    assert!((1..=16).contains(&relayed), "{relayed} relayed:\n{answer}");
    let last = answer.rsplit("\r\n\r\nHTTP/1.1 ").next().unwrap();
    assert!(last.starts_with("502"), "{answer}");
    wait_for("the flood counted", Duration::from_secs(2), || {
        code("502") == 2.0
            && proxy.metric(
                "strangler_upstream_errors_total{route=\"default\",backend=\"legacy\",kind=\"other\"}",
            ) == 1.0
    });

    // An HTTP/1.0 backend's answer goes out as HTTP/1.1 (RFC 9110 §6.2).
    let (answer, _) = exchange(
        &addr,
        b"GET /old HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
}

/// `Content-Length: 2, 2` (or two equal lines), which Pingora accepts, reaches the backend as
/// one value (RFC 9110 §8.6), since a strict backend refuses the list; and a backend's answer
/// framed so reaches the client as one value (Node's and Go's clients refuse the list).
#[test]
fn a_204_or_an_interim_answer_carries_no_length_fields() {
    // Backends that frame an answer without a body as if it had one (RFC 9110 §8.6 and
    // RFC 9112 §6.1 forbid both fields on a 1xx or 204).
    let (baddr, _lines) = raw_backend(|s, _lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        while let Some(line) = read_request_head(&mut r) {
            let answer: &[u8] = match line.split_whitespace().nth(1).unwrap_or("") {
                "/204-chunked" => b"HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n",
                "/204-length" => b"HTTP/1.1 204 No Content\r\nContent-Length: 37\r\n\r\n",
                "/103-length" => b"HTTP/1.1 103 Early Hints\r\nContent-Length: 37\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
                _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
            };
            if w.write_all(answer).is_err() {
                return;
            }
        }
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let addr = addr_of(&proxy);
    for (path, status) in [
        ("/204-chunked", 204),
        ("/204-length", 204),
        ("/103-length", 103),
    ] {
        // The answer, then a second request on the same connection: it gets its own.
        let mut s = TcpStream::connect(&addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: h\r\n\r\n").as_bytes())
            .unwrap();
        let first = read_response(&mut r, false).unwrap();
        assert_eq!(first.status, status, "{path}");
        for field in ["content-length", "transfer-encoding"] {
            assert_eq!(first.header(field), None, "{path}: {first:?}");
        }
        if status == 103 {
            let answer = read_response(&mut r, false).unwrap();
            assert_eq!((answer.status, answer.body.as_slice()), (200, &b"ok"[..]));
        }
        s.write_all(b"GET /next HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
            .unwrap();
        let next = read_response(&mut r, false).unwrap();
        assert_eq!(
            (next.status, next.body.as_slice()),
            (200, &b"ok"[..]),
            "{path}"
        );
    }
}

#[test]
fn a_proxy_out_of_descriptors_answers_503_and_blames_no_backend() {
    const LIMIT: usize = 128;
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = format!(
        "{}routes:\n  - name: b\n    path: /b\n    to: new\n    failover: true\n    \
         rollback: {{error_rate: 1%, min_requests: 1, window: 60s}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routing.yaml"), yaml).unwrap();
    let limit = format!("ulimit -n {LIMIT} && exec \"$0\" \"$@\"");
    // The first connection waits idle for its request while the rest are set up: a header
    // deadline longer than those waits.
    let proxy = Proxy::start_wrapped(
        dir,
        "routing.yaml",
        &["--header-timeout", "60s"],
        &[],
        &["sh", "-c", &limit],
    );
    let open = || {
        std::fs::read_dir(format!("/proc/{}/fd", proxy.child.id()))
            .unwrap()
            .count()
    };
    // Idle client connections take every descriptor the proxy has; the rest wait in the
    // listener's backlog and take any that frees. The first is accepted (the backlog is FIFO).
    let addr = addr_of(&proxy);
    let held: Vec<TcpStream> = (0..LIMIT + 32)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    wait_for("every descriptor in use", Duration::from_secs(10), || {
        open() >= LIMIT
    });
    // The reload poll (once a second) cannot open routing.yaml either: it says why and waits.
    wait_for("the poll's look", Duration::from_secs(5), || {
        proxy.log_text().contains("short of descriptors or memory")
    });
    let mut first = held[0].try_clone().unwrap();
    first
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    first
        .write_all(b"GET /b/1 HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        .unwrap();
    let answer = read_response(&mut BufReader::new(first), false).unwrap();
    // The proxy's own shortage: 503 (try another instance), not a 502 blaming `new`, and no
    // failover to `default`, which would fail alike.
    assert_eq!(answer.status, 503, "{answer:?}");
    assert!(
        String::from_utf8_lossy(&answer.body).contains("\"service_unavailable\""),
        "{answer:?}"
    );
    // No backend was reached: the answer and its metrics name none.
    assert_eq!(answer.header("x-strangler-backend"), Some("none"));
    drop(held);
    wait_for("descriptors given back", Duration::from_secs(30), || {
        open() < LIMIT / 2
    });
    proxy.wait_metric(
        "strangler_requests_total{route=\"b\",backend=\"none\",method=\"GET\",code=\"503\"}",
        1.0,
    );
    // Nothing held against the backend: no upstream error, no failover, no rollback, and the
    // file the reload poll could not open meanwhile is not reported invalid.
    let metrics = metrics_body(&proxy);
    assert!(
        !metrics.contains("strangler_upstream_errors_total{"),
        "{metrics}"
    );
    for zero in [
        "strangler_failovers_total{route=\"b\",from=\"new\",to=\"legacy\"}",
        "strangler_rollbacks_total{route=\"b\",reason=\"auto\"}",
        "strangler_route_pinned{route=\"b\"}",
    ] {
        assert_eq!(proxy.metric(zero), 0.0, "{zero}");
    }
    assert_eq!(proxy.metric("strangler_config_valid"), 1.0);
    assert!(legacy.seen().is_empty() && new.seen().is_empty());
}

#[test]
fn a_list_of_equal_content_lengths_reaches_the_backend_as_one() {
    let (baddr, lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        loop {
            let mut head = String::new();
            loop {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap_or(0) == 0 {
                    return;
                }
                if line == "\r\n" {
                    break;
                }
                head.push_str(&line);
            }
            let mut body = [0u8; 2];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            let answer: &[u8] = if head.starts_with("POST /a ") {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2, 2\r\n\r\nok"
            } else {
                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok"
            };
            lines.lock().unwrap().push(head);
            let _ = w.write_all(answer);
        }
    });
    let one_length = |head: &str| {
        let lengths: Vec<&str> = head
            .lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
            .collect();
        assert_eq!(lengths.len(), 1, "{head}");
        assert_eq!(lengths[0].split_once(':').unwrap().1.trim(), "2", "{head}");
    };
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    for req in [
        &b"POST /a HTTP/1.1\r\nHost: h\r\nContent-Length: 2, 2\r\nConnection: close\r\n\r\nab"[..],
        b"POST /b HTTP/1.1\r\nHost: h\r\nContent-Length: 2\r\nContent-Length: 2\r\nConnection: close\r\n\r\nab",
    ] {
        let (answer, _) = exchange(&addr_of(&proxy), req, Duration::from_secs(5));
        assert_eq!(status_of(&answer), 200, "{answer}");
        assert!(answer.ends_with("\r\n\r\nok"), "{answer}");
        one_length(answer.split("\r\n\r\n").next().unwrap());
    }
    let heads = lines.lock().unwrap().clone();
    assert_eq!(heads.len(), 2, "{heads:?}");
    for head in heads {
        one_length(&head);
    }
}

#[test]
fn an_http_1_0_clients_expect_100_continue_is_ignored() {
    let legacy = Backend::start(Arc::new(|s: &Seen| {
        full(
            200,
            format!("expect={:?}", s.headers.get("expect").map(String::as_str)),
        )
    }));
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let (answer, _) = exchange(
        &addr_of(&proxy),
        b"POST /up HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\nab",
        Duration::from_secs(5),
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "no 100 first: {answer}");
    assert!(answer.ends_with("expect=None"), "{answer}");
}

// ---------------------------------------------------------------------------------------------
// Client aborts
// ---------------------------------------------------------------------------------------------

#[test]
fn clients_that_abort_leave_no_upstream_connection_and_count_as_499() {
    const N: usize = 50;
    const BACKEND_DELAY: Duration = Duration::from_secs(8);
    // A slow backend, one thread per connection, so that 50 requests are in flight at once.
    let (baddr, lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        while let Some(line) = read_request_head(&mut r) {
            lines.lock().unwrap().push(line);
            std::thread::sleep(BACKEND_DELAY); // plays slow
            if w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nlate")
                .is_err()
            {
                return;
            }
        }
    });
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&format!(
        "backends:\n  legacy: {{url: '{}'}}\n  slow: {{url: 'http://{baddr}'}}\ndefault: legacy\nroutes:\n  - {{name: slow, path: /slow, to: slow}}\n",
        legacy.url()
    ));
    let addr = addr_of(&proxy);
    let before = established_to(baddr.port());
    let t0 = Instant::now();
    let mut clients = Vec::new();
    for i in 0..N {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(format!("GET /slow/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .unwrap();
        clients.push(s);
    }
    wait_for(
        "every request to reach the slow backend",
        Duration::from_secs(5),
        || lines.lock().unwrap().len() >= N,
    );
    let peak = established_to(baddr.port());
    // Every client gives up before the answer.
    for s in &clients {
        let _ = s.shutdown(Shutdown::Both);
    }
    drop(clients);
    let aborted_at = Instant::now();
    let metric =
        "strangler_requests_total{route=\"slow\",backend=\"slow\",method=\"GET\",code=\"499\"}";
    // Both conditions must hold before the backend would have answered: the proxy noticed the
    // clients leave, rather than waiting for the backend.
    let deadline = t0 + BACKEND_DELAY - Duration::from_millis(500);
    let budget = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(50));
    wait_for("the upstream connections to close", budget, || {
        established_to(baddr.port()) <= 2
    });
    let closed_after = aborted_at.elapsed();
    wait_for(
        "the aborts to be counted as 499",
        deadline.saturating_duration_since(Instant::now()) + Duration::from_millis(100),
        || proxy.metric(metric) >= N as f64,
    );
    eprintln!(
        "client aborts: upstream ESTABLISHED before={before} peak={peak} after={} (closed {closed_after:?} after the aborts); 499s={}",
        established_to(baddr.port()),
        proxy.metric(metric)
    );
    assert_eq!(proxy.metric(metric), N as f64, "each abort counted once");
    // And the proxy serves on.
    assert_eq!(request("GET", &proxy.url("/other"), &[], None).status, 200);
    assert_eq!(
        lines.lock().unwrap().len(),
        N,
        "no retry of an abandoned request"
    );
    // A client going away is no error of the proxy's: one info line each, no ERROR line.
    let log = proxy.log_text();
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("the client went away"))
            .count(),
        N,
        "{log}"
    );
    assert!(!log.lines().any(|l| l.contains("ERROR")), "{log}");
}

#[test]
fn a_client_that_leaves_after_a_complete_answer_is_counted_with_that_answer() {
    // The backend refuses an upload at once (as an auth check or a size limit does), then
    // discards what keeps coming; the client reads the whole 401 and stops sending. The
    // client went away after the response was complete: that is a 401, not a 499.
    let (baddr, lines) = raw_backend(|s, lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let mut first = String::new();
        if r.read_line(&mut first).unwrap_or(0) == 0 {
            return;
        }
        lines.lock().unwrap().push(first.trim_end().to_string());
        loop {
            let mut line = String::new();
            if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim_end().is_empty() {
                break;
            }
        }
        let _ = w.write_all(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 6\r\n\r\nnot ok");
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let mut s = TcpStream::connect(addr_of(&proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n")
        .unwrap();
    s.write_all(&[b'a'; 65536]).unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 4096];
    while !answer.ends_with(b"not ok") {
        match read_some(&mut s, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&answer);
    assert!(text.starts_with("HTTP/1.1 401"), "{text}");
    drop(s);
    let answered =
        "strangler_requests_total{route=\"default\",backend=\"legacy\",method=\"POST\",code=\"401\"}";
    wait_for("the request to be counted", Duration::from_secs(5), || {
        proxy.metric(answered) >= 1.0
    });
    assert_eq!(
        proxy.metric(
            "strangler_requests_total{route=\"default\",backend=\"legacy\",method=\"POST\",code=\"499\"}"
        ),
        0.0
    );
    assert_eq!(lines.lock().unwrap().len(), 1);
}

// ---------------------------------------------------------------------------------------------
// Metric cardinality
// ---------------------------------------------------------------------------------------------

/// Sends `requests` one after the other on one keep-alive connection (reconnecting if the
/// proxy closes it) and returns every status.
fn keep_alive_run(addr: &str, requests: Vec<Vec<u8>>) -> Vec<u16> {
    let connect = || {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.set_nodelay(true).unwrap();
        (s.try_clone().unwrap(), BufReader::with_capacity(1 << 16, s))
    };
    let (mut w, mut r) = connect();
    let mut statuses = Vec::with_capacity(requests.len());
    for req in requests {
        let mut tries = 0;
        loop {
            tries += 1;
            let sent = w.write_all(&req);
            match sent.and_then(|_| read_response(&mut r, false)) {
                Ok(resp) => {
                    let close = resp
                        .header("connection")
                        .is_some_and(|v| v.eq_ignore_ascii_case("close"));
                    statuses.push(resp.status);
                    if close {
                        (w, r) = connect();
                    }
                    break;
                }
                Err(e) if tries < 3 => {
                    eprintln!("reconnecting after {e}");
                    (w, r) = connect();
                }
                Err(e) => panic!("request {} failed: {e}", statuses.len()),
            }
        }
    }
    statuses
}

/// HTTP/1.1 pipelining (RFC 9112 §9.3.2): requests sent back to back on one connection are
/// each answered, in order.
#[test]
fn pipelined_requests_are_each_answered_in_order() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    let mut s = TcpStream::connect(addr_of(&proxy)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"GET /p0 HTTP/1.1\r\nHost: x\r\n\r\nGET /p1 HTTP/1.1\r\nHost: x\r\n\r\nGET /p2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s);
    for i in 0..3 {
        let resp = read_response(&mut r, false)
            .unwrap_or_else(|e| panic!("answer {i} of 3 pipelined requests: {e}"));
        assert_eq!(resp.status, 200);
        let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap();
        assert_eq!(v["target"], format!("/p{i}"), "answers in request order");
    }
    assert_eq!(targets(&legacy), vec!["/p0", "/p1", "/p2"]);
}

/// `Connection` lines are one list (RFC 9110 §5.3): a client's `close` on its second line ends
/// the connection after the answer (RFC 9112 §9.6), and a request pipelined behind is not
/// served. Pingora alone reads the first line only.
#[test]
fn a_clients_close_on_a_later_connection_line_closes_the_connection() {
    let legacy = Backend::echo("legacy");
    let proxy = Proxy::start(&one_backend(&legacy.url()));
    for (version, first) in [
        ("1.1", "keep-alive"),
        ("1.0", "keep-alive"),
        ("1.1", "X-Hop"),
    ] {
        let before = legacy.seen().len();
        let (answer, closed) = exchange(
            &addr_of(&proxy),
            format!(
                "GET /first HTTP/{version}\r\nHost: x\r\nConnection: {first}\r\nConnection: X-Secret, close\r\nX-Secret: v\r\n\r\nGET /next HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            .as_bytes(),
            Duration::from_secs(5),
        );
        assert!(
            closed,
            "HTTP/{version}, {first}: the connection stayed open: {answer}"
        );
        assert_eq!(
            answer.matches("HTTP/1.1 200").count(),
            1,
            "HTTP/{version}, {first}: {answer}"
        );
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "HTTP/{version}, {first}: the answer does not say close: {answer}"
        );
        let seen = legacy.seen();
        assert_eq!(
            seen[before..]
                .iter()
                .map(|s| s.target.as_str())
                .collect::<Vec<_>>(),
            ["/first"],
            "HTTP/{version}, {first}"
        );
        assert_eq!(
            seen[before].headers.get("x-secret"),
            None,
            "nominated: hop-by-hop"
        );
    }
}

/// A backend's `close` on its answer's second `Connection` line: the connection is not pooled
/// (Pingora alone reads the first line and would send the next request on it). The backend
/// here closes only a second later without reading anything more, so a POST sent on that
/// connection would be lost, and not retried: 502.
#[test]
fn a_backends_close_on_a_later_connection_line_keeps_its_connection_out_of_the_pool() {
    let connections = Arc::new(AtomicUsize::new(0));
    let c2 = connections.clone();
    let (baddr, lines) = raw_backend(move |s, lines| {
        c2.fetch_add(1, Ordering::SeqCst);
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let Some(line) = read_request_head(&mut r) else {
            return;
        };
        lines.lock().unwrap().push(line.clone());
        if line.contains("/says-close") {
            let _ = w.write_all(
                b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nConnection: close\r\nContent-Length: 2\r\n\r\nhi",
            );
            // As a server that lingers before it closes: what comes in the meantime is lost.
            std::thread::sleep(Duration::from_secs(1));
            let _ = w.shutdown(std::net::Shutdown::Both);
            return;
        }
        let _ = w.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        // One request per connection here; the proxy's next request would come on a new one.
        std::thread::sleep(Duration::from_secs(1));
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    let r = request("GET", &proxy.url("/says-close"), &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    let post = request("POST", &proxy.url("/after"), &[], Some(b"payload"));
    assert_eq!(post.status, 200, "{}", post.body);
    assert_eq!(
        connections.load(Ordering::SeqCst),
        2,
        "the POST went on a connection of its own"
    );
    assert_eq!(
        *lines.lock().unwrap(),
        ["GET /says-close HTTP/1.1", "POST /after HTTP/1.1"]
    );
    let metrics = metrics_body(&proxy);
    assert!(
        !metrics.contains("strangler_upstream_errors_total{backend=\"legacy\""),
        "not a failure of the backend's"
    );
    // Nor a warning: Pingora's line for the retry is held back.
    let log = proxy.log_text();
    assert!(!log.contains("Fail to proxy"), "{log}");
}

/// A backend's answer whose transfer codings do not end in `chunked` has a body delimited by the
/// connection's end. Relayed with its `Transfer-Encoding` lines, a client or cache in front that
/// read only the first (`chunked`) would take the raw body for chunks, and what the backend put
/// in it for the next answer. 502, as nginx, Envoy and HAProxy answer.
#[test]
fn a_backends_transfer_coding_other_than_chunked_is_a_502() {
    let (baddr, _lines) = raw_backend(move |s, _lines| {
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut w = s;
        let Some(line) = read_request_head(&mut r) else {
            return;
        };
        let codings = if line.contains("/two-lines") {
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n"
        } else if line.contains("/identity") {
            "Transfer-Encoding: identity\r\n"
        } else {
            "Transfer-Encoding: Chunked\r\n"
        };
        let body = if line.contains("/chunked") {
            "2\r\nok\r\n0\r\n\r\n"
        } else {
            "2\r\nok\r\n0\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED"
        };
        let _ = w.write_all(format!("HTTP/1.1 200 OK\r\n{codings}\r\n{body}").as_bytes());
        // Closing ends a body delimited by the connection's end.
    });
    let proxy = Proxy::start(&one_backend(&format!("http://{baddr}")));
    for path in ["/two-lines", "/identity"] {
        let (answer, _) = exchange(
            &addr_of(&proxy),
            format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes(),
            Duration::from_secs(5),
        );
        assert_eq!(status_of(&answer), 502, "{path}: {answer}");
        assert!(
            answer.contains("\"error\":\"bad_gateway\""),
            "{path}: {answer}"
        );
        assert!(!answer.contains("INJECTED"), "{path}: {answer}");
    }
    wait_for("counted as the backend's", Duration::from_secs(2), || {
        proxy.metric(
            "strangler_upstream_errors_total{route=\"default\",backend=\"legacy\",kind=\"other\"}",
        ) == 2.0
    });
    // `chunked` alone, in any case, is relayed.
    let r = request("GET", &proxy.url("/chunked"), &[], None);
    assert_eq!((r.status, r.body.as_str()), (200, "ok"));
}

#[test]
fn random_paths_and_methods_add_no_metric_series() {
    use rand::{Rng, SeedableRng};
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let proxy = Proxy::start(&format!(
        "{}routes:\n  - {{name: bookings, path: /bookings, to: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    ));
    let addr = addr_of(&proxy);
    // Warm up the fixed series (one request per method label, matched and unmatched).
    for m in ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] {
        request(m, &proxy.url("/bookings/1"), &[], None);
        request(m, &proxy.url("/warm"), &[], None);
    }
    let (warm, _) = exchange(
        &addr,
        b"XWARM /warm HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    );
    assert_eq!(status_of(&warm), 200, "{warm}");
    let before = metrics_body(&proxy);

    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_6006);
    const PATHS: usize = 10_000;
    const METHODS: usize = 1_000;
    let mut reqs = Vec::with_capacity(PATHS + METHODS);
    let mut methods_used = BTreeSet::new();
    for i in 0..PATHS {
        let seg: String = (0..rng.gen_range(4..16))
            .map(|_| char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[rng.gen_range(0..36)]))
            .collect();
        let method = ["GET", "POST", "DELETE"][i % 3];
        let body = if method == "POST" {
            "Content-Length: 0\r\n"
        } else {
            ""
        };
        reqs.push(
            format!("{method} /zqpath-{seg}/{i}?q={seg} HTTP/1.1\r\nHost: x\r\n{body}\r\n")
                .into_bytes(),
        );
    }
    for i in 0..METHODS {
        let m: String = (0..rng.gen_range(3..9))
            .map(|_| char::from(b"ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"[rng.gen_range(0..36)]))
            .collect();
        let m = format!("XQ{m}");
        reqs.push(format!("{m} /zqm/{i} HTTP/1.1\r\nHost: x\r\n\r\n").into_bytes());
        methods_used.insert(m);
    }
    let n = reqs.len();
    // Four keep-alive connections in parallel (Pingora 0.9.1 does not serve pipelined requests
    // unless told to: see `pipelined_requests_are_each_answered_in_order`).
    let t0 = Instant::now();
    let mut chunks: Vec<Vec<Vec<u8>>> = vec![Vec::new(); 4];
    for (i, r) in reqs.into_iter().enumerate() {
        chunks[i % 4].push(r);
    }
    let handles: Vec<_> = chunks
        .into_iter()
        .map(|c| {
            let addr = addr.clone();
            std::thread::spawn(move || keep_alive_run(&addr, c))
        })
        .collect();
    let mut statuses = Vec::with_capacity(n);
    for h in handles {
        statuses.extend(h.join().unwrap());
    }
    eprintln!("{n} requests in {:?}", t0.elapsed());
    assert_eq!(statuses.len(), n);
    assert!(
        statuses.iter().all(|s| *s == 200),
        "every request was served"
    );
    assert!(legacy.seen().len() >= n, "they went through the proxy");

    // Each request is counted in the proxy's `logging` phase, which may end just after the
    // client got its answer: every unknown method is counted under `OTHER` once all are in.
    wait_for(
        "the unknown methods counted",
        Duration::from_secs(5),
        || {
            proxy.metric(
            "strangler_requests_total{route=\"default\",backend=\"legacy\",method=\"OTHER\",code=\"200\"}",
        ) > METHODS as f64 // and the XWARM request
        },
    );
    let after = metrics_body(&proxy);
    assert!(
        !after.contains("zqpath-") && !after.contains("/zqm/"),
        "a path in /metrics"
    );
    for m in &methods_used {
        assert!(!after.contains(m.as_str()), "method {m} in /metrics");
    }
    let allowed = [
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "OTHER",
    ];
    let series: Vec<&str> = after
        .lines()
        .filter(|l| l.starts_with("strangler_requests_total{"))
        .collect();
    for s in &series {
        let method = s
            .split("method=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
            .unwrap_or_else(|| panic!("no method label: {s}"));
        assert!(allowed.contains(&method), "method label {method:?}: {s}");
        assert!(!s.contains("zq"), "{s}");
    }
    let series_before = before
        .lines()
        .filter(|l| l.starts_with("strangler_requests_total{"))
        .count();
    eprintln!(
        "strangler_requests_total series: {series_before} before, {} after; /metrics lines {} -> {}",
        series.len(),
        before.lines().count(),
        after.lines().count()
    );
    for s in &series {
        let name = s.rsplit_once(' ').map_or(*s, |(n, _)| n);
        if !before.contains(name) {
            eprintln!("new series: {s}");
        }
    }
    assert!(
        series.len() <= series_before + 2,
        "11 000 random requests added series: {series_before} -> {}",
        series.len()
    );
    assert!(
        after.lines().count() <= before.lines().count() + 10,
        "/metrics grew from {} to {} lines",
        before.lines().count(),
        after.lines().count()
    );
}

/// An idle keep-alive connection is closed after `--keepalive-timeout`, whatever the client's
/// `Keep-Alive: timeout=` asks (Pingora alone would wait for its next request forever).
#[test]
fn an_idle_keep_alive_connection_is_closed_at_the_keepalive_timeout() {
    let backend = Backend::echo("legacy");
    let proxy = Proxy::start_with(
        &one_backend(&backend.url()),
        &["--keepalive-timeout", "1s"],
        &[],
    );
    for extra in ["", "Keep-Alive: timeout=3600\r\n"] {
        let s = TcpStream::connect(addr_of(&proxy)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut w = s.try_clone().unwrap();
        let mut r = BufReader::new(s);
        let mut requests = 0;
        let t0 = Instant::now();
        // Two requests on the connection: it is kept alive while used.
        for _ in 0..2 {
            w.write_all(format!("GET /x HTTP/1.1\r\nHost: x\r\n{extra}\r\n").as_bytes())
                .unwrap();
            let resp = read_response(&mut r, false).unwrap();
            assert_eq!(resp.status, 200);
            assert_ne!(resp.header("connection"), Some("close"), "{resp:?}");
            requests += 1;
        }
        // Then idle: the proxy closes it (EOF), long before the read timeout.
        let mut rest = Vec::new();
        let n = r
            .read_to_end(&mut rest)
            .expect("closed by the proxy, not timed out");
        assert_eq!((n, requests), (0, 2), "{extra:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(14),
            "{extra:?}: {:?}",
            t0.elapsed()
        );
    }
}
