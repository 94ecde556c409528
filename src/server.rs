//! The running process: builds the Pingora `Server` with its services — the proxy listeners,
//! the admin listener, the reloader, the drain watcher, and for `demo` the sample services —
//! and runs it until SIGTERM/SIGINT (drain, then exit 0) or SIGQUIT (hand the listening sockets
//! to a new process started with `--upgrade`, then drain).

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora_core::apps::http_app::HttpServer;
use pingora_core::apps::HttpServerOptions;
use pingora_core::listeners::ListenerConfig;
use pingora_core::protocols::l4::stream::L4BufferSettings;
use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora_core::services::background::{background_service, BackgroundService};
use pingora_core::services::listening::Service;

use crate::admin::Admin;
use crate::audit::Audit;
use crate::pins::StateFile;
use crate::proxy::Strangler;
use crate::reload::Reloader;
use crate::state::State;

/// Requests in progress, process-wide: the drain watcher exits when it reaches zero.
pub static ACTIVE: AtomicUsize = AtomicUsize::new(0);

/// Set when a SIGTERM, SIGINT or SIGQUIT starts the drain: every response from then on says
/// `Connection: close`, so a keep-alive client does not send its next request on a connection
/// that is about to close (Pingora only does so for requests that begin after the signal).
pub static DRAINING: AtomicBool = AtomicBool::new(false);

/// What `run` and `demo` need.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config: PathBuf,
    pub listen: Vec<String>,
    pub admin: String,
    pub admin_token: Option<String>,
    pub state_file: Option<PathBuf>,
    pub audit_log: Option<PathBuf>,
    pub threads: usize,
    /// Longest wait for in-flight requests after SIGTERM.
    pub drain_timeout: Duration,
    /// Take over the listening sockets of a running strangler (zero-downtime upgrade).
    pub upgrade: bool,
    pub upgrade_sock: PathBuf,
    /// From a connection's accept (or a keep-alive request's first byte) to the end of the
    /// request header.
    pub header_timeout: Duration,
    /// A client's idle keep-alive connection, between two requests.
    pub keepalive_timeout: Duration,
    /// Request size limits.
    pub limits: crate::proxy::Limits,
    /// `(name, address)` of sample services to start beside the proxy.
    pub demo_services: Vec<(String, String)>,
}

/// The admin address must be loopback unless a token guards it (SPEC §7).
pub fn check_admin_address(admin: &str, token: Option<&str>) -> Result<(), String> {
    let addrs: Vec<SocketAddr> = admin
        .to_socket_addrs()
        .map_err(|e| format!("admin address {admin:?}: {e}"))?
        .collect();
    let exposed = addrs.iter().any(|a| !a.ip().is_loopback());
    if exposed && token.is_none_or(|t| t.trim().is_empty()) {
        return Err(format!(
            "refusing to serve the admin API on non-loopback {admin} without a token: set STRANGLER_ADMIN_TOKEN"
        ));
    }
    Ok(())
}

/// The first address `addr` (a `--listen`, `--admin` or demo address) resolves to.
fn resolve(what: &str, addr: &str) -> Result<SocketAddr, String> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| format!("{what} address {addr:?}: {e} (want HOST:PORT, e.g. 0.0.0.0:8080)"))?
        .collect();
    addrs
        .first()
        .copied()
        .ok_or_else(|| format!("{what} address {addr:?} resolves to nothing"))
}

/// Checks that this process can listen on `at` now, by binding it; the caller holds the trial
/// listener until every address is checked, then lets go. Pingora binds its listeners on its
/// own threads later, where a bad address panics a thread and a taken port is retried forever
/// while the admin API says healthy: refusing at start-up (exit 1, the reason) is what an
/// operator and a supervisor can act on. Skipped for `--upgrade`, where the sockets come from
/// the old process and are taken by design.
fn check_bindable(what: &str, addr: &str, at: SocketAddr) -> Result<std::net::TcpListener, String> {
    std::net::TcpListener::bind(at).map_err(|e| format!("cannot listen on {addr} ({what}): {e}"))
}

/// The address a listener is given to Pingora with: as written, or, for port 0, the port the
/// kernel chose for the trial bind, so the log and the listener agree on where the proxy is
/// (`--listen 127.0.0.1:0` picks a free port, as test harnesses and ad-hoc runs expect).
fn concrete(addr: &str, at: SocketAddr, probe: &std::net::TcpListener) -> String {
    match probe.local_addr() {
        Ok(bound) if at.port() == 0 => bound.to_string(),
        _ => addr.to_string(),
    }
}

/// Refuses two of this process's own listeners on one address. Pingora binds with
/// `SO_REUSEPORT`, so the second bind succeeds and the kernel then hands each connection to one
/// of the two at random: proxy traffic answered by the admin API, or the other way round.
/// Two addresses on the same port clash when their IPs are equal or one of them is a wildcard
/// that covers the other: `0.0.0.0` covers IPv4, `[::]` both families (Pingora's listeners are
/// dual-stack).
fn check_distinct(addrs: &[(String, SocketAddr)]) -> Result<(), String> {
    let covers =
        |w: &SocketAddr, o: &SocketAddr| w.ip().is_unspecified() && (w.is_ipv6() || o.is_ipv4());
    for (i, (what_a, a)) in addrs.iter().enumerate() {
        for (what_b, b) in &addrs[..i] {
            // Port 0 is a free port of the kernel's choosing: never another listener's.
            let clash = a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip() || covers(a, b) || covers(b, a));
            if clash {
                return Err(format!(
                    "cannot listen on {a} ({what_a}): {b} is already this process's {what_b}"
                ));
            }
        }
    }
    Ok(())
}

/// SIGTERM and SIGINT drain; SIGQUIT hands over to an upgraded process.
struct Signals {
    /// Where a process started with `--upgrade` waits for the listeners (`--upgrade-sock`):
    /// a SIGQUIT with nobody waiting there is refused. Pingora's hand-over would try for a
    /// few seconds, stop listening and exit 0: the service down, and a supervisor's
    /// `Restart=on-failure` none the wiser (a stray Ctrl-\ in a terminal sends SIGQUIT too).
    upgrade_sock: Option<PathBuf>,
}

#[async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int), Ok(mut quit)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
            signal(SignalKind::quit()),
        ) else {
            log::error!("cannot install signal handlers; SIGTERM will kill without draining");
            return std::future::pending().await;
        };
        let name = loop {
            let name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
                _ = quit.recv() => "SIGQUIT",
            };
            match &self.upgrade_sock {
                Some(sock) if name == "SIGQUIT" && !successor_waits(sock).await => log::error!(
                    "SIGQUIT, but no new process waits for the listeners at {} (start \
                     `strangler run --upgrade` with the same --upgrade-sock first): ignored, \
                     serving on",
                    sock.display()
                ),
                _ => break name,
            }
        };
        DRAINING.store(true, Ordering::Release);
        if name == "SIGQUIT" {
            log::info!("SIGQUIT: handing listeners to the new process, then draining");
            // The new process reads the pins from the state file once it has the listeners:
            // an automatic pin still on its way there goes first (a second at most). Then the
            // file is the new process's: a write under way finishes, later ones are refused.
            let deadline = std::time::Instant::now() + Duration::from_secs(1);
            while crate::state::PINS_BEING_SAVED.load(Ordering::Acquire) > 0
                && std::time::Instant::now() < deadline
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            crate::pins::hand_over();
            return ShutdownSignal::GracefulUpgrade;
        }
        log::info!("{name}: draining in-flight requests");
        ShutdownSignal::GracefulTerminate
    }
}

/// Whether a process started with `--upgrade` waits for the listeners at `sock`: a listening
/// Unix socket bound to that path (`/proc/net/unix`; a connection to it would be taken for the
/// hand-over itself). It may still be loading its table: up to 5 s are given for it to bind,
/// as long as Pingora's own hand-over would have tried. Where `/proc` cannot be read, the
/// socket file's presence is taken for it (Pingora removes the file once done or given up).
async fn successor_waits(sock: &std::path::Path) -> bool {
    let absolute = std::path::absolute(sock).unwrap_or_else(|_| sock.to_path_buf());
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let listening = match std::fs::read_to_string("/proc/net/unix") {
            Ok(table) => table.lines().skip(1).any(|line| {
                // Num RefCount Protocol Flags Type St Inode Path; flag 0x10000 = listening.
                let f: Vec<&str> = line.split_whitespace().collect();
                f.len() >= 8
                    && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
                    && (std::path::Path::new(f[7]) == sock
                        || std::path::Path::new(f[7]) == absolute)
            }),
            Err(_) => sock.exists(),
        };
        if listening || std::time::Instant::now() >= deadline {
            return listening;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Ends the process as soon as a graceful shutdown has no request left, instead of always
/// sleeping the whole grace period, and at `--drain-timeout` says how many requests it cuts
/// (Pingora's grace period stays as the upper bound).
struct DrainWatcher {
    timeout: Duration,
}

#[async_trait]
impl BackgroundService for DrainWatcher {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        if shutdown.changed().await.is_err() {
            return;
        }
        let deadline = std::time::Instant::now() + self.timeout;
        // Let the listeners close and connections already accepted deliver their requests.
        let settle = crate::connection::LATE_REQUEST_GRACE + Duration::from_millis(100);
        tokio::time::sleep(settle.min(self.timeout)).await;
        loop {
            let active = ACTIVE.load(Ordering::Acquire);
            // An automatic pin set by the last requests is on its way to the state file.
            let saving = crate::state::PINS_BEING_SAVED.load(Ordering::Acquire);
            if active == 0 && saving == 0 {
                log::info!("drained: no request in flight, exiting");
                std::process::exit(0);
            }
            if std::time::Instant::now() >= deadline {
                log::warn!(
                    "drain timeout ({:?}) reached with {active} request(s) in flight: closing them, exiting",
                    self.timeout
                );
                std::process::exit(0);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Says "serving on …" once every listener accepts connections (Pingora binds them on its
/// services' own threads as it starts them), so a supervisor or a script that waits for the
/// line can connect at once.
struct Announcer {
    listen: Vec<String>,
    admin: String,
    threads: usize,
}

/// How long the announcer waits for the listeners before saying so anyway.
const ANNOUNCE_WAIT: Duration = Duration::from_secs(10);

#[async_trait]
impl BackgroundService for Announcer {
    async fn start(&self, _shutdown: ShutdownWatch) {
        let deadline = tokio::time::Instant::now() + ANNOUNCE_WAIT;
        let mut waiting = Vec::new();
        for addr in self.listen.iter().chain([&self.admin]) {
            // A wildcard listener is reached on the loopback address of its family.
            let Some(mut at) = tokio::net::lookup_host(addr.as_str())
                .await
                .ok()
                .and_then(|mut a| a.next())
            else {
                continue;
            };
            if at.ip().is_unspecified() {
                at.set_ip(match at {
                    SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                    SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
                });
            }
            // The first connection a listener accepts closes at once, before any request.
            while tokio::net::TcpStream::connect(at).await.is_err() {
                if tokio::time::Instant::now() >= deadline {
                    waiting.push(addr.as_str());
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let note = if waiting.is_empty() {
            String::new()
        } else {
            format!(
                "; not accepting yet after {ANNOUNCE_WAIT:?}: {}",
                waiting.join(", ")
            )
        };
        log::info!(
            "strangler serving on {} (admin {}), {} thread(s){note}",
            self.listen.join(", "),
            self.admin,
            self.threads
        );
    }
}

/// The roots https backends are verified against: the system's, or those `SSL_CERT_FILE` /
/// `SSL_CERT_DIR` name. One of those naming a path that cannot be read is a start-up error
/// (Pingora's connectors would panic on it); no root at all, with an https backend in the
/// table, is worth a warning (every such backend would answer 502).
/// The trust store read at start-up holds no certificate: a reload that brings an https backend
/// says so too.
pub static TRUST_STORE_EMPTY: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

fn check_trust_store(table: &crate::router::RoutingTable) -> Result<(), String> {
    // Each named path on its own: the loader reports an unreadable one only when the other
    // yields nothing, so a typo in one of two variables an image sets would pass unseen.
    for (var, is_dir) in [("SSL_CERT_FILE", false), ("SSL_CERT_DIR", true)] {
        let Some(path) = std::env::var_os(var) else {
            continue;
        };
        let readable = if is_dir {
            std::fs::read_dir(&path).map(drop)
        } else {
            std::fs::File::open(&path).map(drop)
        };
        if let Err(e) = readable {
            return Err(format!(
                "cannot load the trusted root certificates ({var}={}): {e}",
                path.to_string_lossy()
            ));
        }
    }
    let named = ["SSL_CERT_FILE", "SSL_CERT_DIR"]
        .iter()
        .filter_map(|v| std::env::var(v).ok().map(|p| format!("{v}={p}")))
        .collect::<Vec<_>>()
        .join(", ");
    let from = if named.is_empty() {
        "the system's trust store".to_string()
    } else {
        named
    };
    let roots = match pingora_core::tls::load_native_certs() {
        Err(e) => {
            return Err(format!(
                "cannot load the trusted root certificates ({from}): {e}"
            ))
        }
        Ok(roots) => roots,
    };
    // Pingora adds each certificate to its root store with `unwrap` when it builds its TLS
    // connector: one that rustls cannot parse (a truncated PEM block in a mounted bundle) would
    // panic there, plain-http backends or not. Refused here instead, saying which one.
    for (i, cert) in roots.iter().enumerate() {
        if let Err(e) = pingora_core::tls::RootCertStore::empty().add(cert.clone()) {
            return Err(format!(
                "cannot load the trusted root certificates ({from}): certificate {} of {} cannot be used ({e}); remove or replace it",
                i + 1,
                roots.len()
            ));
        }
    }
    TRUST_STORE_EMPTY.store(roots.is_empty(), std::sync::atomic::Ordering::Relaxed);
    if roots.is_empty() && table.backends.iter().any(|b| b.tls) {
        log::warn!(
            "no trusted root certificate found ({from}): every https backend will fail verification (502)"
        );
    }
    Ok(())
}

/// Below this many descriptors, start-up warns: each request in flight holds two (client and
/// backend), a shadowed one three, and idle keep-alive connections one each.
const FEW_DESCRIPTORS: u64 = 4096;

/// Raises the soft limit on open files to the hard one, as Go's runtime and nginx's
/// `worker_rlimit_nofile` do: a shell's soft 1024 would otherwise cap a proxy at ~500 requests
/// in flight while its hard limit allows far more. Says what it got, and warns when that is
/// little (the proxy answers 503 when it runs out).
fn raise_descriptor_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write the struct passed, nothing else.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let before = lim.rlim_cur;
    if lim.rlim_cur < lim.rlim_max {
        // An unlimited hard limit still stops at the kernel's `fs.nr_open` (2^20 by default).
        let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse::<libc::rlim_t>().ok())
            .unwrap_or(1 << 20);
        lim.rlim_cur = lim.rlim_max.min(nr_open);
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            log::warn!(
                "cannot raise the open file limit from {before} to {}: {}",
                lim.rlim_cur,
                std::io::Error::last_os_error()
            );
            lim.rlim_cur = before;
        }
    }
    let now = lim.rlim_cur;
    if now < FEW_DESCRIPTORS {
        log::warn!(
            "open file limit is {now} (hard limit {}): each request in flight holds two descriptors; raise it (`ulimit -n`, systemd `LimitNOFILE=`) for more than ~{} at once",
            lim.rlim_max,
            now / 2
        );
    } else if now != before {
        log::info!("open file limit raised from {before} to {now} (the hard limit)");
    }
}

/// Runs the proxy until it is told to stop. Errors are start-up errors (exit 1).
pub fn serve(mut opts: ServeOptions) -> Result<(), String> {
    // SIGHUP's default action ends the process. Until the reloader listens for it (after the
    // table is loaded and Pingora has started, which takes a while for a large table), one
    // sent by `systemctl reload` or a config sidecar right after a restart is ignored: the
    // table being loaded is the file's content of that moment anyway.
    // SAFETY: `signal` with SIG_IGN installs no handler code; tokio's later registration
    // replaces the disposition.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
    }
    check_admin_address(&opts.admin, opts.admin_token.as_deref())?;
    raise_descriptor_limit();
    if !opts.upgrade {
        let mut wanted: Vec<(String, String)> = opts
            .listen
            .iter()
            .map(|a| ("--listen".to_string(), a.clone()))
            .collect();
        wanted.push(("--admin".to_string(), opts.admin.clone()));
        for (name, addr) in &opts.demo_services {
            wanted.push((format!("demo service {name}"), addr.clone()));
        }
        let resolved = wanted
            .iter()
            .map(|(what, addr)| Ok((what.clone(), resolve(what, addr)?)))
            .collect::<Result<Vec<_>, String>>()?;
        check_distinct(&resolved)?;
        // The trial listeners stay open until every address is bound, so two `:0` addresses
        // get two different ports.
        let mut probes = Vec::new();
        for ((what, addr), (_, at)) in wanted.iter().zip(&resolved) {
            probes.push((*at, check_bindable(what, addr, *at)?));
        }
        let n = opts.listen.len();
        for (addr, (at, probe)) in opts.listen.iter_mut().zip(&probes) {
            *addr = concrete(addr, *at, probe);
        }
        let (at, probe) = &probes[n];
        opts.admin = concrete(&opts.admin, *at, probe);
    }
    let state_path = opts
        .state_file
        .clone()
        .unwrap_or_else(|| StateFile::beside(&opts.config));
    let state_file = StateFile::new(state_path);
    if let Some(warning) = state_file.missing_dir() {
        log::warn!("{warning}");
    }
    let state = State::start(
        &opts.config,
        state_file,
        Audit::open(opts.audit_log.clone())?,
        opts.upgrade,
    )?;

    check_trust_store(&state.snapshot().table)?;
    // Before any request: a reload may add a shadow route at any time.
    crate::shadow::warm_up();
    crate::dns::spawn_refresher(state.clone(), crate::dns::REFRESH);
    let conf = ServerConf {
        threads: opts.threads.max(1),
        // The drain watcher ends the process at `--drain-timeout` (and says what it cut);
        // Pingora's own grace period is the backstop, a second later.
        grace_period_seconds: Some(opts.drain_timeout.as_secs_f64().ceil() as u64 + 1),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: opts.upgrade_sock.display().to_string(),
        pid_file: std::env::temp_dir()
            .join(format!("strangler-{}.pid", std::process::id()))
            .display()
            .to_string(),
        ..ServerConf::default()
    };
    let opt = Opt {
        upgrade: opts.upgrade,
        ..Opt::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    // With `--upgrade`, this waits for the old process to hand its listeners over (SIGQUIT).
    server.bootstrap();
    if opts.upgrade {
        state.adopt_pins();
    }

    let mut app = pingora_proxy::http_proxy(
        &server.configuration,
        Strangler {
            state: state.clone(),
            limits: opts.limits,
            // Pingora counts keep-alive in whole seconds, and reads 0 as "forever".
            keepalive_secs: opts.keepalive_timeout.as_secs().max(1),
        },
    );
    // Pingora answers CONNECT a plain 405 before any hook runs; let it through to
    // `request_filter`, which answers it the JSON 400 of every target that is not a path
    // (SPEC §3) and never proxies it (`forwarding::method_refusal`).
    let mut server_options = HttpServerOptions::default();
    server_options.allow_connect_method_proxying = true;
    app.server_options = Some(server_options);
    let mut proxy = Service::new(
        "strangler proxy".to_string(),
        crate::connection::Guarded {
            app: Arc::new(app),
            header_timeout: opts.header_timeout,
            refusals: Some(opts.limits),
        },
    );
    for addr in &opts.listen {
        // No L4 read buffer in front of client connections: Pingora reads request heads into
        // its own header buffer and bodies into its own body buffer, so its default 64 KiB
        // per connection only added a copy. Same instructions per request, 64 KiB less per
        // client (BENCHMARKS.md, third session, "Changes that stayed").
        proxy.add_listener(
            ListenerConfig::tcp(addr.as_str()).l4_buffer(L4BufferSettings::default().read(0)),
        );
    }
    server.add_service(proxy);

    // The same header deadline as the proxy's listeners: a client dripping its header on the
    // admin port is cut after `--header-timeout`, not kept for ever holding a descriptor.
    let mut admin = Service::new(
        "strangler admin".to_string(),
        crate::connection::Guarded {
            app: Arc::new(HttpServer::new_app(Admin {
                state: state.clone(),
                token: opts
                    .admin_token
                    .as_deref()
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(str::to_string),
            })),
            header_timeout: opts.header_timeout,
            refusals: None,
        },
    );
    admin.add_tcp(&opts.admin);
    // The admin listener is small: one thread keeps it off the proxy's threads.
    admin.threads = Some(1);
    server.add_service(admin);

    server.add_service(background_service(
        "reloader",
        Reloader {
            state: state.clone(),
        },
    ));
    server.add_service(background_service(
        "drain watcher",
        DrainWatcher {
            timeout: opts.drain_timeout,
        },
    ));
    for (name, addr) in &opts.demo_services {
        let mut s = crate::demo::service(name, addr);
        s.threads = Some(1);
        server.add_service(s);
    }
    server.add_service(background_service(
        "announcer",
        Announcer {
            listen: opts.listen.clone(),
            admin: opts.admin.clone(),
            threads: opts.threads,
        },
    ));
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals {
            upgrade_sock: Some(opts.upgrade_sock.clone()),
        }),
    });
    Ok(())
}

/// Runs sample services only (`strangler demo-service`).
pub fn serve_demo_services(services: Vec<(String, String)>) -> Result<(), String> {
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    for (name, addr) in &services {
        log::info!("demo service {name} on {addr}");
        server.add_service(crate::demo::service(name, addr));
    }
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals { upgrade_sock: None }),
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_listeners_may_not_overlap() {
        let clash = |a: &str, b: &str| {
            let addrs = [
                ("a".to_string(), a.parse().unwrap()),
                ("b".to_string(), b.parse().unwrap()),
            ];
            check_distinct(&addrs).is_err()
        };
        assert!(clash("127.0.0.1:80", "127.0.0.1:80"));
        assert!(clash("0.0.0.0:80", "127.0.0.1:80"));
        assert!(clash("127.0.0.1:80", "[::]:80"), "[::] is dual-stack");
        assert!(clash("[::]:80", "[::1]:80"));
        assert!(!clash("0.0.0.0:80", "[::1]:80"), "0.0.0.0 covers IPv4 only");
        assert!(!clash("127.0.0.1:80", "127.0.0.2:80"));
        assert!(!clash("127.0.0.1:80", "127.0.0.1:81"));
        assert!(!clash("127.0.0.1:0", "127.0.0.1:0"), "two free ports");
    }
}
