//! `https://` backends end to end: a real TLS backend on loopback (Python's `ssl`, with a
//! certificate signed by a CA made for the test with the `openssl` command line), the real
//! binary trusting that CA through `SSL_CERT_FILE` (Pingora's rustls connector loads its roots
//! with `rustls-native-certs`, which honours it).
mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use common::*;

/// The TLS backend: HTTP/1.1 with keep-alive on 127.0.0.1 and, when the machine has it, on ::1
/// too (same port: `localhost` may resolve to either). It prints one JSON line per event on
/// stdout: `listening` (the port) first, then every TLS handshake (ok or not, with the SNI the
/// client sent) and every request (path, Host, SNI, connection number). It answers 200 with
/// that request record as JSON; `?big=N` answers N bytes of `a..z`; a path containing
/// `/static` answers `{"static":true}`; an `X-Reply-Location` header makes it a 302 with that
/// `Location`. It exits when its stdin closes.
const BACKEND_PY: &str = r#"
import errno, itertools, json, os, socket, socketserver, ssl, sys, threading
from http.server import BaseHTTPRequestHandler
from urllib.parse import parse_qs, urlsplit

cert, key = sys.argv[1], sys.argv[2]
out_lock = threading.Lock()
dropped = set()
conn_ids = itertools.count(1)

def emit(obj):
    with out_lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
if len(sys.argv) > 3:
    # Clients must show a certificate of this CA (mutual TLS); TLS 1.3 refuses after the
    # client's handshake is over, at its first read.
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(sys.argv[3])

def on_sni(sock, name, _ctx):
    sock.sni_name = name

ctx.sni_callback = on_sni

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.answer(True)

    def do_HEAD(self):
        self.answer(False)

    def answer(self, with_body):
        tls = self.connection
        seen = {
            "event": "request",
            "method": self.command,
            "path": self.path,
            "host": self.headers.get("Host"),
            "shadow": self.headers.get("X-Strangler-Shadow"),
            "sni": getattr(tls, "sni_name", None),
            "conn": tls.conn_id,
            "tls": tls.version(),
        }
        emit(seen)
        url = urlsplit(self.path)
        served = getattr(tls, "served", 0)
        tls.served = served + 1
        if url.path.startswith("/secure/drop/") and served > 0 and url.path not in dropped:
            # A pooled connection the backend closes under the next request: no answer, and no
            # TLS close_notify (SSLSocket.shutdown closes the socket under TLS).
            dropped.add(url.path)
            emit({"event": "dropped", "path": url.path, "conn": tls.conn_id})
            tls.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        big = parse_qs(url.query).get("big")
        if big:
            n = int(big[0])
            body = (b"abcdefghijklmnopqrstuvwxyz" * (n // 26 + 1))[:n]
        elif "/static" in url.path:
            body = b'{"static":true}'
        else:
            body = json.dumps(seen).encode()
        location = self.headers.get("X-Reply-Location")
        self.send_response(302 if location else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if location:
            self.send_header("Location", location)
        self.end_headers()
        if with_body:
            self.wfile.write(body)

class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
    daemon_threads = True
    allow_reuse_address = False

    def server_bind(self):
        if self.address_family == socket.AF_INET6:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        socketserver.TCPServer.server_bind(self)

    # Runs on the connection's own thread: a slow or failed handshake blocks nobody else.
    def finish_request(self, request, client_address):
        conn_id = next(conn_ids)
        request.settimeout(30)
        tls = ctx.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        tls.conn_id = conn_id
        try:
            try:
                tls.do_handshake()
            except (ssl.SSLError, OSError) as e:
                emit({"event": "handshake", "ok": False, "conn": conn_id,
                      "sni": getattr(tls, "sni_name", None), "error": str(e)})
                return
            emit({"event": "handshake", "ok": True, "conn": conn_id,
                  "sni": getattr(tls, "sni_name", None)})
            Handler(tls, client_address, self)
        finally:
            tls.close()

class Server6(Server):
    address_family = socket.AF_INET6

def listen():
    for _ in range(50):
        v4 = Server(("127.0.0.1", 0), Handler)
        try:
            return v4, Server6(("::1", v4.server_address[1]), Handler)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                v4.server_close()
                continue
            return v4, None  # no IPv6 loopback here: IPv4 only
    raise SystemExit("no port free on both 127.0.0.1 and ::1")

v4, v6 = listen()
for s in (v4, v6):
    if s is not None:
        threading.Thread(target=s.serve_forever, daemon=True).start()
emit({"event": "listening", "port": v4.server_address[1], "ipv6": v6 is not None})
sys.stdin.read()
os._exit(0)
"#;

/// A CA's `openssl req` configuration; `CN` is added per CA (two CAs with one name would look
/// like one CA whose signature is wrong, not like an unknown CA).
const CA_CNF: &str = "[req]\n\
distinguished_name = dn\n\
prompt = no\n\
x509_extensions = v3_ca\n\
[v3_ca]\n\
basicConstraints = critical, CA:TRUE\n\
keyUsage = critical, keyCertSign, cRLSign\n\
subjectKeyIdentifier = hash\n\
[dn]\n";

const LEAF_CNF: &str = "[req]\n\
distinguished_name = dn\n\
prompt = no\n\
[dn]\n\
CN = localhost\n\
[v3_leaf]\n\
basicConstraints = critical, CA:FALSE\n\
keyUsage = critical, digitalSignature\n\
extendedKeyUsage = serverAuth\n\
subjectAltName = DNS:localhost, IP:127.0.0.1, IP:::1\n";

/// A test PKI in a temporary directory: a CA, a server certificate it signed for `localhost`,
/// 127.0.0.1 and ::1, and a second, unrelated CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(d.join("leaf.cnf"), LEAF_CNF).unwrap();
        std::fs::create_dir(d.join("empty")).unwrap();
        let ec: &[&str] = &[
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        for ca in ["ca", "other-ca"] {
            let cnf = format!("{ca}.cnf");
            std::fs::write(d.join(&cnf), format!("{CA_CNF}CN = strangler {ca}\n")).unwrap();
            let (key, pem) = (format!("{ca}.key"), format!("{ca}.pem"));
            let out: &[&str] = &["-keyout", &key, "-out", &pem, "-days", "2"];
            openssl(d, &[&["req", "-x509", "-config", &cnf], ec, out].concat());
        }
        let out: &[&str] = &["-keyout", "leaf.key", "-out", "leaf.csr"];
        openssl(
            d,
            &[&["req", "-new", "-config", "leaf.cnf"], ec, out].concat(),
        );
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "leaf.csr",
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "leaf.pem",
                "-days",
                "2",
                "-extfile",
                "leaf.cnf",
                "-extensions",
                "v3_leaf",
            ],
        );
        Pki { dir }
    }

    fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The environment that makes the proxy trust exactly the CA in `ca_file` (also when the
    /// environment running the tests sets SSL_CERT_FILE or SSL_CERT_DIR).
    fn trusting(&self, ca_file: &str) -> Vec<(String, String)> {
        vec![
            (
                "SSL_CERT_FILE".into(),
                self.path(ca_file).display().to_string(),
            ),
            (
                "SSL_CERT_DIR".into(),
                self.path("empty").display().to_string(),
            ),
        ]
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .expect("the `openssl` command line is needed to make test certificates");
    assert!(
        out.status.success(),
        "openssl {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The Python TLS backend (see [`BACKEND_PY`]), killed on drop.
struct TlsBackend {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
    events: Arc<Mutex<Vec<Value>>>,
}

impl TlsBackend {
    fn start(pki: &Pki) -> TlsBackend {
        Self::start_with(pki, &[])
    }

    /// One that requires a client certificate signed by the test CA (which the proxy has none
    /// of).
    fn requiring_client_certificates(pki: &Pki) -> TlsBackend {
        Self::start_with(pki, &[pki.path("ca.pem")])
    }

    fn start_with(pki: &Pki, extra: &[PathBuf]) -> TlsBackend {
        let script = pki.path("backend.py");
        std::fs::write(&script, BACKEND_PY).unwrap();
        let stderr = std::fs::File::create(pki.path("backend.stderr")).unwrap();
        let mut child = Command::new("python3")
            .arg("-u")
            .arg(&script)
            .arg(pki.path("leaf.pem"))
            .arg(pki.path("leaf.key"))
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("python3 is needed for the TLS test backend");
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        let events: Arc<Mutex<Vec<Value>>> = Arc::default();
        let (port_tx, port_rx) = mpsc::channel();
        let events2 = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                if v["event"] == "listening" {
                    let _ = port_tx.send(v["port"].as_u64().unwrap() as u16);
                }
                events2.lock().unwrap().push(v);
            }
        });
        let port = match port_rx.recv_timeout(Duration::from_secs(20)) {
            Ok(p) => p,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "the TLS backend did not start:\n{}",
                    std::fs::read_to_string(pki.path("backend.stderr")).unwrap_or_default()
                );
            }
        };
        TlsBackend {
            child,
            _stdin: stdin,
            port,
            events,
        }
    }

    fn events(&self, kind: &str) -> Vec<Value> {
        self.events
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["event"] == kind)
            .cloned()
            .collect()
    }

    fn requests(&self) -> Vec<Value> {
        self.events("request")
    }

    /// The requests seen, once there are at least `n` (the backend reports a request just
    /// before answering it, so the client may have the answer a moment before the report).
    fn wait_requests(&self, n: usize) -> Vec<Value> {
        wait_for(
            &format!("{n} requests at the TLS backend"),
            Duration::from_secs(10),
            || self.requests().len() >= n,
        );
        self.requests()
    }

    fn handshakes(&self) -> Vec<Value> {
        self.events("handshake")
    }
}

impl Drop for TlsBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_proxy(yaml: &str, env: &[(String, String)]) -> Proxy {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&**k, &**v)).collect();
    Proxy::start_with(yaml, &[], &env)
}

/// A proxy whose one route, `/secure`, goes to the backend `secure` that `spec` describes (its
/// lines under `backends:`), trusting the test CA.
fn proxy_to_secure(pki: &Pki, legacy: &Backend, spec: &str) -> Proxy {
    start_proxy(
        &yaml(
            legacy,
            spec,
            "  - {name: secure, path: /secure, to: secure}\n",
        ),
        &pki.trusting("ca.pem"),
    )
}

/// The backend `secure` at `https://localhost:PORT`.
fn localhost(secure: &TlsBackend) -> String {
    format!("  secure:\n    url: https://localhost:{}\n", secure.port)
}

/// The backend `secure` at `https://127.0.0.1:PORT`, sending `host` as its Host (and, without
/// the port, as its SNI).
fn by_ip_with_host(secure: &TlsBackend, host: &str) -> String {
    format!(
        "  secure:\n    url: https://127.0.0.1:{}\n    host: {host}\n",
        secure.port
    )
}

/// `legacy` (plain http, the default) plus the given https backends and routes.
fn yaml(legacy: &Backend, backends: &str, routes: &str) -> String {
    format!(
        "backends:\n  legacy:\n    url: {}\n{backends}default: legacy\nroutes:\n{routes}",
        legacy.url()
    )
}

#[test]
fn https_backend_serves_requests_through_the_proxy() {
    let pki = Pki::new();
    let secure = TlsBackend::start(&pki);
    let legacy = Backend::echo("legacy");
    let proxy = proxy_to_secure(&pki, &legacy, &localhost(&secure));

    let r = request("GET", &proxy.url("/secure/items?x=1"), &[], None);
    assert_eq!(r.status, 200, "{}\nlog:\n{}", r.body, proxy.log_text());
    assert_eq!(r.header("x-strangler-route"), "secure");
    assert_eq!(r.header("x-strangler-backend"), "secure");
    let echoed = r.json();
    assert_eq!(echoed["path"], "/secure/items?x=1");
    assert_eq!(echoed["method"], "GET");
    // No `host:` override: the client's Host is kept.
    assert_eq!(echoed["host"], format!("127.0.0.1:{}", proxy.port));
    assert_eq!(echoed["sni"], "localhost");
    // What the backend itself recorded, not only what came back.
    let seen = secure.wait_requests(1);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["path"], "/secure/items?x=1");
    assert_eq!(seen[0]["host"], format!("127.0.0.1:{}", proxy.port));
    assert!(
        seen[0]["tls"].as_str().unwrap().starts_with("TLSv1."),
        "{seen:?}"
    );
    assert!(legacy.seen().is_empty());

    // A body of several MiB streams through the TLS connection intact.
    let n = 3 * 1024 * 1024 + 17;
    let r = request("GET", &proxy.url(&format!("/secure/dl?big={n}")), &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), n);
    assert!(r
        .body
        .bytes()
        .enumerate()
        .all(|(i, b)| b == b'a' + (i % 26) as u8));

    // A Location pointing at the https backend's own address is rewritten to the client's.
    let own = format!("https://localhost:{}/secure/next?a=1", secure.port);
    let r = request(
        "GET",
        &proxy.url("/secure/go"),
        &[("x-reply-location", &own)],
        None,
    );
    assert_eq!(r.status, 302);
    assert_eq!(
        r.header("location"),
        format!("http://127.0.0.1:{}/secure/next?a=1", proxy.port)
    );

    // Unrouted requests still go to the plain-http default.
    let r = request("GET", &proxy.url("/other"), &[], None);
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-strangler-backend"), "legacy");

    proxy.wait_metric(
        "strangler_requests_total{route=\"secure\",backend=\"secure\",method=\"GET\",code=\"200\"}",
        2.0,
    );
    proxy.wait_metric(
        "strangler_requests_total{route=\"secure\",backend=\"secure\",method=\"GET\",code=\"302\"}",
        1.0,
    );
    for kind in ["connect", "timeout", "reset", "other"] {
        let sample = format!(
            "strangler_upstream_errors_total{{route=\"secure\",backend=\"secure\",kind=\"{kind}\"}}"
        );
        proxy.wait_metric(&sample, 0.0);
    }
    assert!(secure.handshakes().iter().all(|h| h["ok"] == true));
}

#[test]
fn sni_is_the_url_host_or_the_host_override() {
    let pki = Pki::new();
    let tls = TlsBackend::start(&pki);
    let legacy = Backend::echo("legacy");
    let p = tls.port;
    let proxy = start_proxy(
        &yaml(
            &legacy,
            &format!(
                "  byname:\n    url: https://localhost:{p}\n\
                 \x20 byip:\n    url: https://127.0.0.1:{p}\n\
                 \x20 override:\n    url: https://127.0.0.1:{p}\n    host: localhost\n"
            ),
            "  - {name: byname, path: /name, to: byname}\n\
             \x20 - {name: byip, path: /ip, to: byip}\n\
             \x20 - {name: override, path: /override, to: override}\n",
        ),
        &pki.trusting("ca.pem"),
    );
    let client_host = format!("127.0.0.1:{}", proxy.port);

    // The URL's host name is the SNI; the client's Host is kept.
    let r = request("GET", &proxy.url("/name/1"), &[], None);
    assert_eq!(r.status, 200, "{}\nlog:\n{}", r.body, proxy.log_text());
    assert_eq!(r.json()["sni"], "localhost");
    assert_eq!(r.json()["host"], client_host);

    // An IP address is never sent as SNI (RFC 6066); the certificate is still verified, against
    // its IP address SAN, and accepted.
    let r = request("GET", &proxy.url("/ip/1"), &[], None);
    assert_eq!(r.status, 200, "{}\nlog:\n{}", r.body, proxy.log_text());
    assert_eq!(r.json()["sni"], Value::Null);
    assert_eq!(r.json()["host"], client_host);

    // `host:` is both the Host header and the SNI.
    let r = request("GET", &proxy.url("/override/1"), &[], None);
    assert_eq!(r.status, 200, "{}\nlog:\n{}", r.body, proxy.log_text());
    assert_eq!(r.json()["sni"], "localhost");
    assert_eq!(r.json()["host"], "localhost");

    let seen = tls.wait_requests(3);
    assert_eq!(seen.len(), 3, "{seen:?}");
    let by_path = |p: &str| seen.iter().find(|s| s["path"] == p).cloned().unwrap();
    assert_eq!(by_path("/name/1")["sni"], "localhost");
    assert_eq!(by_path("/ip/1")["sni"], Value::Null);
    assert_eq!(by_path("/override/1")["sni"], "localhost");
    assert_eq!(by_path("/override/1")["host"], "localhost");
    // Each handshake carried the SNI its request reported.
    for s in &seen {
        let h = tls
            .handshakes()
            .into_iter()
            .find(|h| h["conn"] == s["conn"])
            .unwrap();
        assert_eq!(h["ok"], true);
        assert_eq!(h["sni"], s["sni"]);
    }
}

/// Asserts a proxy-made 502 for a TLS failure on `route` / `backend`.
/// The one handshake the proxy attempted with `secure`, once the backend has reported it: it
/// failed, and no request reached the backend.
fn refused_handshake(secure: &TlsBackend) -> serde_json::Value {
    wait_for("the refused handshake", Duration::from_secs(5), || {
        !secure.handshakes().is_empty()
    });
    let h = secure.handshakes()[0].clone();
    assert_eq!(h["ok"], false, "{h}");
    assert!(secure.requests().is_empty());
    h
}

fn assert_tls_502(r: &Reply, route: &str, backend: &str) {
    assert_eq!(r.status, 502, "{}", r.body);
    assert_eq!(r.header("content-type"), "application/json");
    assert_eq!(r.header("x-strangler-route"), route);
    assert_eq!(r.header("x-strangler-backend"), backend);
    let v = r.json();
    assert_eq!(v["error"], "bad_gateway");
    assert_eq!(v["route"], route);
    assert_eq!(v["backend"], backend);
    assert_eq!(v["request_id"], r.header("x-request-id"));
    assert!(
        v["message"]
            .as_str()
            .unwrap()
            .contains("TLSHandshakeFailure"),
        "{v}"
    );
}

#[test]
fn untrusted_certificate_is_a_502_and_a_connect_error() {
    let pki = Pki::new();
    let secure = TlsBackend::start(&pki);
    let legacy = Backend::echo("legacy");
    // The proxy trusts another CA than the one that signed the backend's certificate.
    let proxy = start_proxy(
        &yaml(
            &legacy,
            &localhost(&secure),
            "  - {name: secure, path: /secure, to: secure}\n\
             \x20 - {name: fo, path: /fo, to: secure, failover: true}\n",
        ),
        &pki.trusting("other-ca.pem"),
    );

    let r = request("GET", &proxy.url("/secure/1"), &[], None);
    assert_tls_502(&r, "secure", "secure");
    proxy.wait_metric(
        "strangler_upstream_errors_total{route=\"secure\",backend=\"secure\",kind=\"connect\"}",
        1.0,
    );
    proxy.wait_metric(
        "strangler_requests_total{route=\"secure\",backend=\"secure\",method=\"GET\",code=\"502\"}",
        1.0,
    );
    // The proxy refused the certificate in the handshake: the backend never got a request.
    let h = refused_handshake(&secure);
    assert_eq!(h["sni"], "localhost");
    assert!(
        h["error"]
            .as_str()
            .unwrap()
            .to_ascii_lowercase()
            .contains("unknown ca"),
        "{h}"
    );

    // A TLS failure is a connect failure: with `failover` the request is served by `default`.
    let r = request("GET", &proxy.url("/fo/1"), &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-strangler-backend"), "legacy");
    assert_eq!(r.json()["target"], "/fo/1");
    proxy.wait_metric(
        "strangler_failovers_total{route=\"fo\",from=\"secure\",to=\"legacy\"}",
        1.0,
    );
    proxy.wait_metric(
        "strangler_upstream_errors_total{route=\"fo\",backend=\"secure\",kind=\"connect\"}",
        1.0,
    );
    assert!(secure.requests().is_empty());
}

#[test]
fn certificate_not_valid_for_the_sni_is_a_502() {
    let pki = Pki::new();
    let secure = TlsBackend::start(&pki);
    let legacy = Backend::echo("legacy");
    // Trusted CA, but the certificate does not name `other.example`.
    let proxy = proxy_to_secure(&pki, &legacy, &by_ip_with_host(&secure, "other.example"));

    let r = request("GET", &proxy.url("/secure/1"), &[], None);
    assert_tls_502(&r, "secure", "secure");
    proxy.wait_metric(
        "strangler_upstream_errors_total{route=\"secure\",backend=\"secure\",kind=\"connect\"}",
        1.0,
    );
    assert_eq!(refused_handshake(&secure)["sni"], "other.example");
}

#[test]
fn keep_alive_reuses_upstream_tls_connections() {
    let pki = Pki::new();
    let secure = TlsBackend::start(&pki);
    let legacy = Backend::echo("legacy");
    let proxy = proxy_to_secure(&pki, &legacy, &localhost(&secure));

    let n = 20;
    for i in 0..n {
        let path = format!("/secure/{i}");
        let r = request("GET", &proxy.url(&path), &[], None);
        assert_eq!(r.status, 200, "request {i}: {}", r.body);
        assert_eq!(r.json()["path"], path);
    }
    let seen = secure.wait_requests(n);
    assert_eq!(seen.len(), n);
    let handshakes = secure.handshakes();
    assert!(handshakes.iter().all(|h| h["ok"] == true), "{handshakes:?}");
    // Sequential requests reuse pooled TLS connections: fewer handshakes than requests (a
    // request may still open a new one if it arrives before the last connection went back to
    // the pool).
    assert!(
        handshakes.len() < n,
        "{} TLS handshakes for {n} sequential requests",
        handshakes.len()
    );
    let mut conns: Vec<u64> = seen.iter().map(|s| s["conn"].as_u64().unwrap()).collect();
    // Distinct connections, not runs of one: two pooled connections may take turns.
    conns.sort_unstable();
    conns.dedup();
    assert!(conns.len() < n, "no connection carried two requests");
    proxy.wait_metric(
        "strangler_requests_total{route=\"secure\",backend=\"secure\",method=\"GET\",code=\"200\"}",
        n as f64,
    );
}

#[test]
fn a_pooled_tls_connection_closed_without_close_notify_is_retried() {
    let pki = Pki::new();
    let secure = TlsBackend::start(&pki);
    let legacy = Backend::echo("legacy");
    let proxy = proxy_to_secure(&pki, &legacy, &localhost(&secure));
    // Until one of them lands on a pooled connection, which the backend then closes under it.
    for i in 0..20 {
        let r = request("GET", &proxy.url(&format!("/secure/warm/{i}")), &[], None);
        assert_eq!(r.status, 200, "{}", r.body);
        let path = format!("/secure/drop/{i}");
        let r = request("GET", &proxy.url(&path), &[], None);
        assert_eq!(
            (r.status, r.json()["path"].as_str()),
            (200, Some(path.as_str())),
            "a stale pooled https connection failed the request: {}",
            r.body
        );
        if !secure.events("dropped").is_empty() {
            break;
        }
    }
    assert_eq!(
        secure.events("dropped").len(),
        1,
        "no request met a closed pooled connection"
    );
    assert_eq!(
        proxy.metric(
            "strangler_upstream_errors_total{route=\"secure\",backend=\"secure\",kind=\"reset\"}"
        ),
        0.0,
        "a retried stale connection is not the backend's failure"
    );
}

#[test]
fn shadow_requests_reach_an_https_backend() {
    let pki = Pki::new();
    let secure = TlsBackend::start(&pki);
    let legacy = Backend::start(Arc::new(|_: &Seen| {
        json(200, serde_json::json!({"static": true}))
    }));
    let proxy = start_proxy(
        &yaml(
            &legacy,
            &localhost(&secure),
            "  - {name: mirrored, path: /static, to: legacy, shadow: secure}\n",
        ),
        &pki.trusting("ca.pem"),
    );

    let r = request("GET", &proxy.url("/static/1"), &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-strangler-backend"), "legacy");
    wait_for("the shadow comparison", Duration::from_secs(10), || {
        proxy.metric(
            "strangler_shadow_total{route=\"mirrored\",backend=\"secure\",result=\"match\"}",
        ) == 1.0
    });
    proxy.wait_metric(
        "strangler_shadow_total{route=\"mirrored\",backend=\"secure\",result=\"error\"}",
        0.0,
    );
    let seen = secure.wait_requests(1);
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0]["path"], "/static/1");
    assert_eq!(seen[0]["shadow"], "1");
    assert_eq!(seen[0]["sni"], "localhost");
}

/// `host:` may carry a port (it is a Host header value, and the config accepts it); the SNI
/// must then be the name alone (the whole value, port included, is not a server name: every
/// request was a 502 `TLSHandshakeFailure` before the SNI was derived at table build).
#[test]
fn host_override_with_a_port_still_connects() {
    let pki = Pki::new();
    let secure = TlsBackend::start(&pki);
    let legacy = Backend::echo("legacy");
    let host = format!("localhost:{}", secure.port);
    let proxy = proxy_to_secure(&pki, &legacy, &by_ip_with_host(&secure, &host));
    let r = request("GET", &proxy.url("/secure/1"), &[], None);
    assert_eq!(
        r.status,
        200,
        "{}\nbackend handshakes: {:?}",
        r.body,
        secure.handshakes()
    );
    assert_eq!(r.json()["host"], format!("localhost:{}", secure.port));
    assert_eq!(r.json()["sni"], "localhost");
}

/// `strangler run` on `yaml` with the trust store the environment names; (exit code if it
/// ended within 10 s, its stderr so far). A process still running is stopped.
fn start_with_trust_store(yaml: &str, env: &[(&str, &str)]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("routing.yaml");
    std::fs::write(&config, yaml).unwrap();
    let log = dir.path().join("stderr");
    let mut child = Command::new(bin())
        .arg("run")
        .arg("-c")
        .arg(&config)
        .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
        .env("RUST_LOG", "info")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let text = || std::fs::read_to_string(&log).unwrap_or_default();
    let mut code = None;
    wait_for(
        "an exit or the start-up line",
        Duration::from_secs(10),
        || {
            if let Ok(Some(status)) = child.try_wait() {
                code = status.code();
                return true;
            }
            text().contains("serving on")
        },
    );
    if code.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    (code, text())
}

#[test]
fn a_trust_store_that_cannot_be_read_is_a_start_up_error() {
    let legacy = Backend::echo("legacy");
    let yaml = yaml(
        &legacy,
        "  secure: {url: 'https://localhost:9443'}\n",
        "  - {name: s, path: /s, to: secure}\n",
    );
    // A stale SSL_CERT_FILE / SSL_CERT_DIR (a container image that moved its CA bundle): exit 1
    // with why, not a panic in Pingora's TLS connector.
    let (code, err) = start_with_trust_store(
        &yaml,
        &[
            ("SSL_CERT_FILE", "/nonexistent/ca.pem"),
            ("SSL_CERT_DIR", "/nonexistent/certs"),
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot load the trusted root certificates")
            && err.contains("/nonexistent/ca.pem")
            && !err.contains("panicked"),
        "{err}"
    );
    // One of the two unreadable while the other holds a CA (an image sets both, a mount moved
    // one): the same, though the loader alone would take the good one and say nothing.
    let pki = Pki::new();
    let ca = pki.path("ca.pem");
    let (code, err) = start_with_trust_store(
        &yaml,
        &[
            ("SSL_CERT_FILE", ca.to_str().unwrap()),
            ("SSL_CERT_DIR", "/nonexistent/certs"),
        ],
    );
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot load the trusted root certificates")
            && err.contains("SSL_CERT_DIR=/nonexistent/certs"),
        "{err}"
    );
    // Readable but holding no certificate: it starts, and says every https backend will fail.
    let empty = tempfile::tempdir().unwrap();
    let (code, err) = start_with_trust_store(
        &yaml,
        &[
            ("SSL_CERT_FILE", "/dev/null"),
            ("SSL_CERT_DIR", empty.path().to_str().unwrap()),
        ],
    );
    assert_eq!(code, None, "{err}");
    assert!(
        err.contains("no trusted root certificate found") && err.contains("serving on"),
        "{err}"
    );
    // A bundle with one damaged certificate (a line lost in a copied Secret): exit 1 naming
    // it, not a panic in Pingora's TLS connector, even with no https backend in the file.
    let pem = std::fs::read_to_string(&ca).unwrap();
    let mut lines: Vec<&str> = pem.lines().collect();
    lines.remove(4);
    let damaged = empty.path().join("bundle.pem");
    std::fs::write(&damaged, format!("{pem}{}\n", lines.join("\n"))).unwrap();
    let plain = self::yaml(&legacy, "", "  - {name: p, path: /p, to: legacy}\n");
    let (code, err) =
        start_with_trust_store(&plain, &[("SSL_CERT_FILE", damaged.to_str().unwrap())]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("cannot load the trusted root certificates")
            && err.contains("cannot be used (invalid peer certificate: BadEncoding)")
            && !err.contains("panicked"),
        "{err}"
    );
}

#[test]
fn a_backend_that_requires_a_client_certificate_is_a_failure_to_connect() {
    // With TLS 1.3 the proxy's handshake is over before the backend asks for the certificate it
    // does not have: the refusal arrives as an alert at the first read. No request reached the
    // backend, so it is counted as `connect` and fails over like a failed handshake, whatever
    // the method.
    let pki = Pki::new();
    let secure = TlsBackend::requiring_client_certificates(&pki);
    let legacy = Backend::echo("legacy");
    let proxy = start_proxy(
        &yaml(
            &legacy,
            &localhost(&secure),
            "  - {name: secure, path: /secure, to: secure, failover: true}\n",
        ),
        &pki.trusting("ca.pem"),
    );
    // A DELETE too (no body: the refusal is read before anything else is written; a request
    // with a body finds the connection closed under it while it writes, which says nothing of
    // TLS, and stays a `reset`).
    for method in ["GET", "DELETE"] {
        let r = request(method, &proxy.url("/secure/a"), &[], None);
        assert_eq!(
            (r.status, r.json()["service"].as_str()),
            (200, Some("legacy")),
            "{method}: {}",
            r.body
        );
    }
    proxy.wait_metric(
        "strangler_upstream_errors_total{route=\"secure\",backend=\"secure\",kind=\"connect\"}",
        2.0,
    );
    proxy.wait_metric(
        "strangler_failovers_total{route=\"secure\",from=\"secure\",to=\"legacy\"}",
        2.0,
    );
    assert_eq!(
        proxy.metric(
            "strangler_upstream_errors_total{route=\"secure\",backend=\"secure\",kind=\"reset\"}"
        ),
        0.0
    );
}

#[test]
fn a_reload_that_brings_an_https_backend_to_an_empty_trust_store_says_so() {
    // The store is read at start-up only: a process that found no certificate and later gets
    // its first https backend by a reload warns there, not only in a start-up line long gone.
    let legacy = Backend::echo("legacy");
    let empty = tempfile::tempdir().unwrap();
    let env = vec![
        ("SSL_CERT_FILE".to_string(), "/dev/null".to_string()),
        (
            "SSL_CERT_DIR".to_string(),
            empty.path().display().to_string(),
        ),
    ];
    let proxy = start_proxy(
        &yaml(&legacy, "", "  - {name: p, path: /p, to: legacy}\n"),
        &env,
    );
    proxy.write_config(&yaml(
        &legacy,
        "  secure: {url: 'https://localhost:9443'}\n",
        "  - {name: p, path: /p, to: secure}\n",
    ));
    // Whichever reload takes the file first (the watcher's or this one) says it.
    let r = request("POST", &proxy.admin_url("/reload"), &[], None);
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("the warning", Duration::from_secs(5), || {
        proxy.log_text().lines().any(|l| {
            l.contains("WARN")
                && l.contains("backend \"secure\" (https://localhost:9443): no trusted root certificate was found at start-up")
        })
    });
}
