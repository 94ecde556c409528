//! Operating a fleet (issue: deploy and operate): a zero-downtime binary upgrade under load, and
//! the fleet CLI against three real proxy processes.
mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

/// A child process killed when the test ends, pass or fail.
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `strangler run` on the given ports (so a second process can take them over).
fn spawn_on(dir: &std::path::Path, port: u16, admin: u16, upgrade: bool) -> Reaped {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("strangler.log"))
        .unwrap();
    let mut cmd = Command::new(bin());
    cmd.arg("run")
        .arg("-c")
        .arg(dir.join("routing.yaml"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .arg("--upgrade-sock")
        .arg(dir.join("upgrade.sock"))
        .env("RUST_LOG", "info")
        .env_remove("STRANGLER_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log);
    if upgrade {
        cmd.arg("--upgrade");
    }
    Reaped(cmd.spawn().unwrap())
}

#[test]
fn a_binary_upgrade_under_load_fails_no_request() {
    let legacy = Backend::echo("legacy");
    let new_backend = Backend::echo("new");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("routing.yaml"),
        format!(
            "{}routes:\n  - {{name: bookings, path: /bookings, to: new}}\n  - {{name: tours, path: /tours, to: new}}\n",
            base_yaml(&legacy.url(), &new_backend.url())
        ),
    )
    .unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut old = spawn_on(dir.path(), port, admin, false);
    let health = format!("http://127.0.0.1:{admin}/healthz");
    // Both listeners: the proxy's may accept a moment after the admin API answers.
    wait_for("the old process", Duration::from_secs(15), || {
        get(&health).0 == 200 && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });

    // Load: fresh connections, as many clients make them, all through the upgrade.
    let load = Load::start(&format!("http://127.0.0.1:{port}/x"), 3);
    wait_for("load to run", Duration::from_secs(5), || load.ok() > 50);

    // The new binary waits for the listeners; SIGQUIT makes the old one hand them over.
    let mut new = spawn_on(dir.path(), port, admin, true);
    let sock = dir.path().join("upgrade.sock");
    wait_for(
        "the new process to wait for the sockets",
        Duration::from_secs(10),
        || sock.exists(),
    );
    // A rollback after the new process read the state file and before the hand-over: only
    // the old one answers the admin API then. The new one takes the pins as the old one left
    // them when it takes over.
    let r = request(
        "POST",
        &format!("http://127.0.0.1:{admin}/routes/tours/rollback"),
        &[],
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    unsafe_kill(old.0.id(), "QUIT");
    let before = load.ok();
    // A rollback during the hand-over, while both processes accept on the admin socket: the
    // old one refuses it (503 handing_over: it would never reach the process that serves), and
    // the CLI sends it again until the new one takes it.
    let out = Command::new(bin())
        .args([
            "rollback",
            "bookings",
            "--admin",
            &format!("127.0.0.1:{admin}"),
        ])
        .env_remove("STRANGLER_ADMIN_TOKEN")
        .env_remove("STRANGLER_ADMIN")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(
        "the old process to drain and exit",
        Duration::from_secs(20),
        || matches!(old.0.try_wait(), Ok(Some(_))),
    );
    let status = old.0.wait().unwrap();
    wait_for(
        "requests served after the old process left",
        Duration::from_secs(10),
        || load.ok() > before + 50,
    );
    let (ok, failed) = load.stop();
    let log = std::fs::read_to_string(dir.path().join("strangler.log")).unwrap_or_default();
    assert!(
        status.success(),
        "the old process exits 0: {status:?}\n{log}"
    );
    assert_eq!(failed, 0, "requests failed during the upgrade\n{log}");
    assert!(
        matches!(new.0.try_wait(), Ok(None)),
        "the new process serves on"
    );
    assert_eq!(get(&health).0, 200, "the admin listener moved over too");
    let r = request(
        "GET",
        &format!("http://127.0.0.1:{port}/bookings/1"),
        &[],
        None,
    );
    assert_eq!(
        r.header("x-strangler-backend"),
        "legacy",
        "the serving process is pinned"
    );
    let r = request(
        "GET",
        &format!("http://127.0.0.1:{port}/tours/1"),
        &[],
        None,
    );
    assert_eq!(
        r.header("x-strangler-backend"),
        "legacy",
        "a pin the old process took before handing over holds in the new one\n{log}"
    );
    let state = std::fs::read_to_string(dir.path().join(".strangler-state.json")).unwrap();
    assert!(
        state.contains("\"bookings\""),
        "the pin is in the state file: {state}"
    );
    eprintln!("upgrade under load: {ok} requests, 0 failed");
}

#[test]
fn a_sigquit_with_no_new_process_waiting_is_refused() {
    let legacy = Backend::echo("legacy");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routing.yaml"), one_backend(&legacy.url())).unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut proxy = spawn_on(dir.path(), port, admin, false);
    let health = format!("http://127.0.0.1:{admin}/healthz");
    wait_for("the proxy", Duration::from_secs(15), || {
        get(&health).0 == 200 && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    // Pingora would try to hand the listeners over for a few seconds, stop listening, and
    // exit 0: the service down for a stray Ctrl-\. A socket file left by a new process that
    // was killed while it waited is no new process waiting.
    drop(std::os::unix::net::UnixListener::bind(dir.path().join("upgrade.sock")).unwrap());
    assert!(dir.path().join("upgrade.sock").exists());
    unsafe_kill(proxy.0.id(), "QUIT");
    let log = dir.path().join("strangler.log");
    wait_for("the refusal in the log", Duration::from_secs(15), || {
        std::fs::read_to_string(&log).is_ok_and(|l| l.contains("no new process waits"))
    });
    let url = format!("http://127.0.0.1:{port}/x");
    for _ in 0..3 {
        assert_eq!(get(&url).0, 200);
    }
    assert!(
        matches!(proxy.0.try_wait(), Ok(None)),
        "the proxy serves on\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // And SIGTERM still drains and exits 0.
    unsafe_kill(proxy.0.id(), "TERM");
    wait_for("the proxy to exit", Duration::from_secs(10), || {
        matches!(proxy.0.try_wait(), Ok(Some(_)))
    });
    assert!(proxy.0.wait().unwrap().success());
}

#[test]
fn the_fleet_cli_acts_on_three_replicas_and_reports_each() {
    let legacy = Backend::echo("legacy");
    let new = Backend::echo("new");
    let yaml = format!(
        "{}routes:\n  - {{name: bookings, path: /bookings, to: new}}\n",
        base_yaml(&legacy.url(), &new.url())
    );
    let fleet: Vec<Proxy> = (0..3).map(|_| Proxy::start(&yaml)).collect();
    let admins: Vec<String> = fleet.iter().map(|p| p.admin_url("")).collect();
    let cli = |args: &[&str], admins: &[String]| {
        let mut cmd = Command::new(bin());
        cmd.args(args)
            .env_remove("STRANGLER_ADMIN_TOKEN")
            .env_remove("STRANGLER_ADMIN");
        for a in admins {
            cmd.args(["--admin", a]);
        }
        cmd.output().unwrap()
    };
    let out = cli(&["rollback", "bookings"], &admins);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.lines()
            .filter(|l| l.contains("bookings: pinned to default"))
            .count(),
        3,
        "{text}"
    );
    assert!(text.contains("3 of 3 replicas ok"), "{text}");
    for p in &fleet {
        let r = request("GET", &p.url("/bookings"), &[], None);
        assert_eq!(
            r.header("x-strangler-backend"),
            "legacy",
            "pinned on every replica"
        );
    }
    // One replica down: the others are still acted on, and the exit code says so.
    let mut with_dead = admins.clone();
    with_dead.push(format!("http://127.0.0.1:{}", dead_port()));
    let out = cli(&["resume", "bookings"], &with_dead);
    let text = String::from_utf8_lossy(&out.stdout);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}{err}");
    assert!(text.contains("3 of 4 replicas ok"), "{text}");
    assert!(err.contains("unreachable"), "{err}");
    for p in &fleet {
        let r = request("GET", &p.url("/bookings"), &[], None);
        assert_eq!(
            r.header("x-strangler-backend"),
            "new",
            "resumed on every live replica"
        );
    }
    let out = cli(&["routes"], &admins);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert_eq!(
        text.lines().filter(|l| l.starts_with("bookings ")).count(),
        3,
        "{text}"
    );
}

#[test]
fn one_dns_name_fans_out_to_every_address() {
    // `localhost` resolves to 127.0.0.1 (and maybe ::1): each address is one target.
    let t = strangler::client::targets(&["http://localhost:9900".to_string()]);
    assert!(!t.is_empty());
    assert!(t.iter().all(|t| t.base.ends_with(":9900")), "{t:?}");
}

/// `--listen 127.0.0.1:0 --admin 127.0.0.1:0`: two different free ports, and the start-up line
/// names them, so a harness or an ad-hoc run finds the proxy without choosing ports itself.
#[test]
fn port_zero_listens_on_free_ports_and_logs_them() {
    let legacy = Backend::echo("legacy");
    let dir = tempfile::tempdir().unwrap();
    let yaml = base_yaml(&legacy.url(), &legacy.url()) + "routes: []\n";
    std::fs::write(dir.path().join("routing.yaml"), yaml).unwrap();
    let log = dir.path().join("strangler.log");
    let _proxy = Reaped(
        Command::new(bin())
            .arg("run")
            .arg("-c")
            .arg(dir.path().join("routing.yaml"))
            .args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"])
            .env("RUST_LOG", "info")
            .env_remove("STRANGLER_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    wait_for("the start-up line", Duration::from_secs(15), || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        match text.lines().find(|l| l.contains("serving on ")) {
            Some(l) => {
                line = l.to_string();
                true
            }
            None => false,
        }
    });
    // "strangler serving on 127.0.0.1:P (admin 127.0.0.1:A), N thread(s)"
    let after = |marker: &str| -> u16 {
        let rest = &line[line.find(marker).unwrap() + marker.len()..];
        let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
        digits
            .parse()
            .unwrap_or_else(|_| panic!("no port in {line:?}"))
    };
    let (port, admin) = (after("serving on 127.0.0.1:"), after("(admin 127.0.0.1:"));
    assert!(port != 0 && admin != 0 && port != admin, "{line}");
    // The line is written once both listeners accept: no wait after it.
    assert_eq!(get(&format!("http://127.0.0.1:{admin}/healthz")).0, 200);
    let reply = request("GET", &format!("http://127.0.0.1:{port}/x"), &[], None);
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("x-strangler-backend"), "legacy");
}

#[test]
fn the_soft_open_file_limit_is_raised_to_the_hard_one() {
    let backend = Backend::echo("legacy");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("routing.yaml"), one_backend(&backend.url())).unwrap();
    // A shell's usual soft limit, under whatever hard limit this machine has.
    let soft = "ulimit -Sn 256 && exec \"$0\" \"$@\"";
    let proxy = Proxy::start_wrapped(dir, "routing.yaml", &[], &[], &["sh", "-c", soft]);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", proxy.child.id())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("an open files line");
    let fields: Vec<&str> = line.split_whitespace().collect();
    let (soft, hard) = (fields[3], fields[4]);
    let nr_open: u64 = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(1 << 20);
    let hard_n: u64 = hard.parse().unwrap_or(u64::MAX);
    assert_eq!(soft.parse::<u64>().unwrap(), hard_n.min(nr_open), "{line}");
    if hard_n > 256 {
        assert!(
            proxy.log_text().contains("open file limit raised from 256"),
            "{}",
            proxy.log_text()
        );
    }
    assert_eq!(get(&proxy.url("/x")).0, 200);
}
