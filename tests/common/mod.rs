//! Shared test helpers: real HTTP backends on loopback (hyper), the real `strangler` binary
//! started on free ports against a temporary routing.yaml, and waiting on conditions.
#![allow(dead_code)]

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};

pub type Body = http_body_util::combinators::BoxBody<Bytes, Infallible>;

/// What a test backend saw of one request.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// The request target exactly as received (path and query).
    pub target: String,
    pub headers: HashMap<String, String>,
    pub body_len: usize,
}

/// Holds a test backend's answers until it is opened: the request is in flight, at the
/// backend, for as long as the test needs (a reload meanwhile, say).
#[derive(Clone, Default)]
pub struct Gate(Arc<(std::sync::Mutex<bool>, std::sync::Condvar)>);

impl Gate {
    /// Waits (in a backend's handler) until the gate is open.
    pub fn wait(&self) {
        let (open, cv) = &*self.0;
        let _open = cv.wait_while(open.lock().unwrap(), |open| !*open).unwrap();
    }

    /// Waits until the gate is open, or `limit` has passed: a backend that plays slow for as
    /// long as the test measures, and lets its runtime shut down if the test fails first.
    pub fn wait_at_most(&self, limit: Duration) {
        let (open, cv) = &*self.0;
        let _open = cv
            .wait_timeout_while(open.lock().unwrap(), limit, |open| !*open)
            .unwrap();
    }

    pub fn open(&self) {
        self.set(true);
    }

    /// Opens or shuts it (answers already let through are not held back).
    pub fn set(&self, open: bool) {
        *self.0 .0.lock().unwrap() = open;
        self.0 .1.notify_all();
    }
}

/// How a test backend answers.
pub type Handler = Arc<dyn Fn(&Seen) -> Response<Body> + Send + Sync>;

/// A real HTTP/1.1 backend on 127.0.0.1, on its own thread and runtime, recording requests.
pub struct Backend {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Vec<Seen>>>,
    _rt: tokio::runtime::Runtime,
}

pub fn full(status: u16, body: impl Into<Bytes>) -> Response<Body> {
    Response::builder()
        .status(status)
        .body(Full::new(body.into()).boxed())
        .unwrap()
}

pub fn json(status: u16, v: serde_json::Value) -> Response<Body> {
    let mut r = full(status, v.to_string());
    r.headers_mut()
        .insert("content-type", "application/json".parse().unwrap());
    r
}

/// A body of `len` bytes of a repeating pattern, streamed in 64 KiB chunks.
pub fn streamed(len: usize) -> Response<Body> {
    let chunks = (0..len).step_by(65536).map(move |off| {
        let n = 65536.min(len - off);
        let data: Vec<u8> = (off..off + n).map(|i| (i % 251) as u8).collect();
        Ok::<_, Infallible>(Frame::data(Bytes::from(data)))
    });
    let stream = futures_lite_stream(chunks);
    Response::builder()
        .status(200)
        .header("content-length", len.to_string())
        .body(BodyExt::boxed(StreamBody::new(stream)))
        .unwrap()
}

fn futures_lite_stream<I: Iterator + Send + Unpin + 'static>(
    it: I,
) -> impl futures_core::Stream<Item = I::Item> + Send + 'static
where
    I::Item: Send,
{
    struct S<I>(I);
    impl<I: Iterator + Unpin> futures_core::Stream for S<I> {
        type Item = I::Item;
        fn poll_next(
            mut self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<I::Item>> {
            std::task::Poll::Ready(self.0.next())
        }
    }
    S(it)
}

impl Backend {
    /// Echoes method, target and the interesting headers as JSON, naming itself.
    pub fn echo(name: &str) -> Backend {
        Backend::start(Backend::echo_handler(name))
    }

    fn echo_handler(name: &str) -> Handler {
        let name = name.to_string();
        Arc::new(move |s: &Seen| {
            json(
                200,
                serde_json::json!({
                    "service": name,
                    "method": s.method,
                    "target": s.target,
                    "body_len": s.body_len,
                    "host": s.headers.get("host"),
                    "xff": s.headers.get("x-forwarded-for"),
                    "xfp": s.headers.get("x-forwarded-proto"),
                    "xfh": s.headers.get("x-forwarded-host"),
                    "request_id": s.headers.get("x-request-id"),
                }),
            )
        })
    }

    pub fn start(handler: Handler) -> Backend {
        Backend::start_on("127.0.0.1:0", handler).unwrap()
    }

    /// `echo` on a given address (another loopback address, a given port).
    pub fn echo_on(name: &str, addr: &str) -> std::io::Result<Backend> {
        Backend::start_on(addr, Backend::echo_handler(name))
    }

    pub fn start_on(bind: &str, handler: Handler) -> std::io::Result<Backend> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let std_listener = if bind == "127.0.0.1:0" {
            listener()
        } else {
            TcpListener::bind(bind)?
        };
        std_listener.set_nonblocking(true).unwrap();
        let addr = std_listener.local_addr().unwrap();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let seen2 = seen.clone();
        rt.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(std_listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let handler = handler.clone();
                let seen = seen2.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let handler = handler.clone();
                        let seen = seen.clone();
                        async move {
                            let method = req.method().to_string();
                            let target = req
                                .uri()
                                .path_and_query()
                                .map(|p| p.as_str().to_string())
                                .unwrap_or_default();
                            let headers: HashMap<String, String> = req
                                .headers()
                                .iter()
                                .map(|(k, v)| {
                                    (
                                        k.as_str().to_string(),
                                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                                    )
                                })
                                .collect();
                            let body = req
                                .into_body()
                                .collect()
                                .await
                                .map(|b| b.to_bytes().len())
                                .unwrap_or(0);
                            let s = Seen {
                                method,
                                target,
                                headers,
                                body_len: body,
                            };
                            seen.lock().unwrap().push(s.clone());
                            Ok::<_, Infallible>(handler(&s))
                        }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Ok(Backend {
            addr,
            seen,
            _rt: rt,
        })
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

/// A port nothing listens on, for the rest of the test process: bound without `listen` (a
/// connection to it is refused) and held, so that no listener bound to port 0 beside it, in
/// this process or another, is given it.
pub fn dead_port() -> u16 {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    static HELD: Mutex<Vec<OwnedFd>> = Mutex::new(Vec::new());
    // SAFETY: plain socket calls on a descriptor owned here; the address structs are local.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let mut addr: libc::sockaddr_in = std::mem::zeroed();
        addr.sin_family = libc::AF_INET as libc::sa_family_t;
        addr.sin_addr.s_addr = u32::from_ne_bytes([127, 0, 0, 1]);
        let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let sa = &mut addr as *mut libc::sockaddr_in as *mut libc::sockaddr;
        assert_eq!(libc::bind(fd.as_raw_fd(), sa, len), 0, "bind");
        assert_eq!(
            libc::getsockname(fd.as_raw_fd(), sa, &mut len),
            0,
            "getsockname"
        );
        HELD.lock().unwrap().push(fd);
        u16::from_be(addr.sin_port)
    }
}

/// Ports handed out in this test process: to a proxy (`free_port`, released until the proxy
/// binds it) or to a test's own listener (`listener`).
static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A listener on 127.0.0.1 on a port never handed out before in this test process: a plain
/// bind to port 0 may be given the port `free_port` just released for a proxy about to start.
pub fn listener() -> TcpListener {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return l;
        }
    }
}

/// A port nothing listens on now, never handed out before in this test process: the kernel may
/// give a just-released port again, and a proxy started with the same port for `--listen` and
/// `--admin` would pass its readiness check with the admin API on both.
pub fn free_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut given = GIVEN.lock().unwrap();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// Polls `cond` every 10 ms until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("timed out after {timeout:?} waiting for {what}");
}

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_strangler"))
}

/// A running `strangler run` process on free ports, killed on drop.
pub struct Proxy {
    pub child: Child,
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub log: PathBuf,
    extra: Vec<String>,
    envs: Vec<(String, String)>,
    /// A command the binary runs under (`unshare -m sh -c …`), empty for none.
    wrapper: Vec<String>,
}

impl Proxy {
    pub fn start(yaml: &str) -> Proxy {
        Proxy::start_with(yaml, &[], &[])
    }

    pub fn start_with(yaml: &str, extra: &[&str], envs: &[(&str, &str)]) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("routing.yaml"), yaml).unwrap();
        Proxy::start_in(dir, "routing.yaml", extra, envs)
    }

    /// Starts on a routing file already in `dir`.
    pub fn start_at(dir: tempfile::TempDir, file: &str) -> Proxy {
        Proxy::start_in(dir, file, &[], &[])
    }

    pub fn start_in(
        dir: tempfile::TempDir,
        file: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> Proxy {
        Proxy::start_wrapped(dir, file, extra, envs, &[])
    }

    /// Starts the binary as the last argument of `wrapper` (followed by its own arguments).
    pub fn start_wrapped(
        dir: tempfile::TempDir,
        file: &str,
        extra: &[&str],
        envs: &[(&str, &str)],
        wrapper: &[&str],
    ) -> Proxy {
        let config = dir.path().join(file);
        let mut p = Proxy {
            child: Command::new("true").spawn().unwrap(),
            port: 0,
            admin_port: 0,
            log: dir.path().join("strangler.log"),
            config,
            dir,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            wrapper: wrapper.iter().map(|s| s.to_string()).collect(),
        };
        p.spawn();
        p
    }

    /// (Re)starts the process on fresh ports, keeping the directory (config, state file).
    pub fn spawn(&mut self) {
        for _attempt in 0..5 {
            self.port = free_port();
            self.admin_port = free_port();
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.log)
                .unwrap();
            let mut cmd = match self.wrapper.split_first() {
                Some((program, args)) => {
                    let mut c = Command::new(program);
                    c.args(args).arg(bin());
                    c
                }
                None => Command::new(bin()),
            };
            cmd.arg("run")
                .arg("-c")
                .arg(&self.config)
                .arg("--listen")
                .arg(format!("127.0.0.1:{}", self.port))
                .arg("--admin")
                .arg(format!("127.0.0.1:{}", self.admin_port));
            // Two worker threads unless the test asks for its own number.
            if !self.extra.iter().any(|a| a == "--threads") {
                cmd.arg("--threads").arg("2");
            }
            cmd.arg("--upgrade-sock")
                .arg(self.dir.path().join("upgrade.sock"))
                .args(&self.extra)
                .env_remove("STRANGLER_ADMIN_TOKEN")
                .env("RUST_LOG", "info")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(log);
            for (k, v) in &self.envs {
                cmd.env(k, v);
            }
            self.child = cmd.spawn().unwrap();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.child.try_wait() {
                    break; // exited (port taken?): try again on other ports
                }
                if get(&self.admin_url("/healthz")).0 == 200
                    && TcpStream::connect(("127.0.0.1", self.port)).is_ok()
                {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        panic!("strangler did not start; log:\n{}", self.log_text());
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.admin_port)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Replaces routing.yaml the way editors do: write a temp file, rename it over.
    pub fn write_config(&self, yaml: &str) {
        let tmp = self.dir.path().join(".routing.yaml.tmp");
        std::fs::write(&tmp, yaml).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    /// The value of one sample in /metrics, 0 when absent.
    pub fn metric(&self, name_and_labels: &str) -> f64 {
        let (_, body) = get(&self.admin_url("/metrics"));
        metric_value(&body, name_and_labels)
    }

    /// Waits up to 5 s for one sample of /metrics to read `want`, and panics with the value it
    /// last read otherwise: a request is counted in the proxy's `logging` phase, which may run
    /// just after the client got its response.
    pub fn wait_metric(&self, sample: &str, want: f64) {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let have = self.metric(sample);
            if have == want {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{sample} is {have}, expected {want}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Sends SIGHUP until `done` holds (checked first), again every 2 s, for up to `timeout`:
    /// the process ignores SIGHUP until its reloader listens for it, which may be just after
    /// the admin API answers.
    pub fn sighup_until(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let mut sent: Option<Instant> = None;
        wait_for(what, timeout, || {
            if done() {
                return true;
            }
            if sent.is_none_or(|t| t.elapsed() > Duration::from_secs(2)) {
                unsafe_kill(self.child.id(), "HUP");
                sent = Some(Instant::now());
            }
            false
        });
    }

    pub fn stop(&mut self) -> std::process::ExitStatus {
        unsafe_kill(self.child.id(), "TERM");
        self.child.wait().unwrap()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

/// Finds `name{labels}` (labels in any order) in a Prometheus text exposition; 0 when absent.
pub fn metric_value(body: &str, name_and_labels: &str) -> f64 {
    series_value(body, name_and_labels).unwrap_or(0.0)
}

/// The value of `name{labels}` (labels in any order), if the exposition has that series.
pub fn series_value(body: &str, name_and_labels: &str) -> Option<f64> {
    let (name, labels) = match name_and_labels.find('{') {
        Some(i) => (
            &name_and_labels[..i],
            &name_and_labels[i + 1..name_and_labels.len() - 1],
        ),
        None => (name_and_labels, ""),
    };
    let want: Vec<&str> = labels.split(',').filter(|s| !s.is_empty()).collect();
    for line in body.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, l) = match series.find('{') {
            Some(i) => (&series[..i], &series[i + 1..series.len() - 1]),
            None => (series, ""),
        };
        if n != name {
            continue;
        }
        let have: Vec<&str> = l.split(',').filter(|s| !s.is_empty()).collect();
        if want.len() == have.len() && want.iter().all(|w| have.contains(w)) {
            return Some(value.parse().unwrap_or(0.0));
        }
    }
    None
}

fn agent() -> ureq::Agent {
    ureq::Agent::new_with_config(
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .timeout_global(Some(Duration::from_secs(30)))
            .build(),
    )
}

/// GET; (status, body). Status 0 when the request failed.
pub fn get(url: &str) -> (u16, String) {
    let r = request("GET", url, &[], None);
    (r.status, r.body)
}

pub struct Reply {
    pub status: u16,
    pub headers: HashMap<String, String>,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, n: &str) -> &str {
        self.headers.get(n).map(String::as_str).unwrap_or("")
    }
}

pub fn request(method: &str, url: &str, headers: &[(&str, &str)], body: Option<&[u8]>) -> Reply {
    let agent = agent();
    let mut b = http::Request::builder().method(method).uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let result = match body {
        Some(data) => agent.run(b.body(data.to_vec()).unwrap()),
        None => agent.run(b.body(()).unwrap()),
    };
    match result {
        Ok(mut r) => Reply {
            status: r.status().as_u16(),
            headers: r
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
                .collect(),
            body: r
                .body_mut()
                .with_config()
                .limit(u64::MAX)
                .read_to_string()
                .unwrap_or_default(),
        },
        Err(_) => Reply {
            status: 0,
            headers: HashMap::new(),
            body: String::new(),
        },
    }
}

/// Sends raw bytes and returns the raw answer (until the server closes or 2 s of silence).
pub fn raw(addr: &str, bytes: &[u8]) -> String {
    raw_within(addr, bytes, Duration::from_secs(2))
}

/// `Read::read`, tried again when a signal interrupts it. The kernel never restarts a read
/// that has a timeout (`SO_RCVTIMEO`, signal(7)); it fails with `EINTR` instead, and a loaded
/// machine interrupts the test's threads now and then (a CI run failed on one).
pub fn read_some(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    loop {
        match r.read(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// As [`raw`], until the server closes or `silence` passes without a byte: for requests that
/// close their connection, a long bound that a loaded machine's stall never reaches.
pub fn raw_within(addr: &str, bytes: &[u8], silence: Duration) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(silence)).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match read_some(&mut s, &mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A routing.yaml with one backend, `legacy`, serving everything (`default`, no route).
pub fn one_backend(url: &str) -> String {
    format!("backends:\n  legacy: {{url: '{url}'}}\ndefault: legacy\n")
}

/// A two-backend routing.yaml header: `legacy` (default) and `new`.
pub fn base_yaml(legacy: &str, new: &str) -> String {
    format!("backends:\n  legacy:\n    url: {legacy}\n  new:\n    url: {new}\ndefault: legacy\n")
}

/// A background load: `threads` clients sending GET `url` on fresh connections until stopped,
/// counting answers that are 200 and those that are not.
pub struct Load {
    stop: Arc<std::sync::atomic::AtomicBool>,
    ok: Arc<std::sync::atomic::AtomicUsize>,
    failed: Arc<std::sync::atomic::AtomicUsize>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    pub fn start(url: &str, threads: usize) -> Load {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let workers = (0..threads)
            .map(|_| {
                let (stop, ok, failed, url) =
                    (stop.clone(), ok.clone(), failed.clone(), url.to_string());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        match request("GET", &url, &[], None).status {
                            200 => ok.fetch_add(1, Ordering::Relaxed),
                            _ => failed.fetch_add(1, Ordering::Relaxed),
                        };
                    }
                })
            })
            .collect();
        Load {
            stop,
            ok,
            failed,
            workers,
        }
    }

    pub fn ok(&self) -> usize {
        self.ok.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Stops the clients; returns (ok, failed).
    pub fn stop(self) -> (usize, usize) {
        use std::sync::atomic::Ordering;
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            let _ = w.join();
        }
        (
            self.ok.load(Ordering::Relaxed),
            self.failed.load(Ordering::Relaxed),
        )
    }
}
