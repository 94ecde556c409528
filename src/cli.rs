//! The command line (SPEC §1): clap definitions only. What each command does lives in
//! `server.rs` (run, demo), `check.rs` (check, explain) and `client.rs` (routes, rollback,
//! resume, reload).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::logging::LogFormat;

/// strangler: a migration proxy that routes each resource of an HTTP API to the legacy service
/// or its replacement, as routing.yaml says, and flips a route back in seconds.
#[derive(Debug, Parser)]
#[command(name = "strangler", version, about, long_about = None)]
pub struct Cli {
    /// Log lines as text or JSON (filter with RUST_LOG, e.g. RUST_LOG=info,audit=info).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text, env = "STRANGLER_LOG_FORMAT")]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve: proxy on --listen, admin API on --admin; SIGHUP reloads, SIGTERM drains.
    Run(RunArgs),
    /// As `run`, and also start two sample services on the addresses of the file's `legacy` and
    /// `new` backends, so routing can be tried with nothing else installed.
    Demo(RunArgs),
    /// Validate routing.yaml and print its table; with --cases, also check golden routing cases.
    Check(CheckArgs),
    /// Dry run: which route and backend a request gets, and the exact upstream request line.
    Explain(ExplainArgs),
    /// List the routes of a running proxy (states, pins, last-minute traffic).
    Routes(ClientArgs),
    /// Pin a route (or --all) of a running proxy to `default`.
    Rollback(RollbackArgs),
    /// Lift the pin of a route of a running proxy.
    Resume(ResumeArgs),
    /// Make a running proxy reload its routing.yaml now; exit 1 if it rejects the file (it
    /// keeps serving its previous table) or cannot be reached.
    Reload(ClientArgs),
    /// Run one sample service (what `demo` starts), e.g. for a Compose stack.
    DemoService(DemoServiceArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ConfigArg {
    /// The routing table.
    #[arg(
        short = 'c',
        long = "config",
        env = "STRANGLER_CONFIG",
        default_value = "routing.yaml"
    )]
    pub config: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Proxy listener address (repeatable).
    #[arg(
        long,
        env = "STRANGLER_LISTEN",
        value_delimiter = ',',
        value_parser = trimmed,
        default_value = "0.0.0.0:8080"
    )]
    pub listen: Vec<String>,
    /// Admin API address. A non-loopback address requires STRANGLER_ADMIN_TOKEN.
    /// `http://HOST:PORT` is taken too: STRANGLER_ADMIN is one variable for `run` and the client
    /// commands (which want a URL).
    #[arg(long, env = "STRANGLER_ADMIN", default_value = "127.0.0.1:9900", value_parser = admin_listen_address)]
    pub admin: String,
    /// Bearer token required by every admin POST.
    #[arg(long, env = "STRANGLER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Pin state file [default: .strangler-state.json beside routing.yaml].
    #[arg(long, env = "STRANGLER_STATE")]
    pub state: Option<PathBuf>,
    /// Append every change of who serves what as a JSON line to this file.
    #[arg(long, env = "STRANGLER_AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Proxy worker threads (at least 1).
    #[arg(long, env = "STRANGLER_THREADS", default_value_t = 2, value_parser = parse_threads)]
    pub threads: usize,
    /// Longest wait for in-flight requests after SIGTERM/SIGINT (e.g. 10s).
    #[arg(long, env = "STRANGLER_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration_arg)]
    pub drain_timeout: std::time::Duration,
    /// Longest time from a connection's accept (or a keep-alive request's first byte) to the
    /// end of its request header (slow or silent clients are cut).
    #[arg(long, env = "STRANGLER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration_arg)]
    pub header_timeout: std::time::Duration,
    /// Longest a client's keep-alive connection may sit idle between two requests (e.g. 60s).
    #[arg(long, env = "STRANGLER_KEEPALIVE_TIMEOUT", default_value = "60s", value_parser = parse_duration_arg)]
    pub keepalive_timeout: std::time::Duration,
    /// Longest request target (path + query) in bytes; longer is answered 414.
    #[arg(long, env = "STRANGLER_MAX_URI_BYTES", default_value_t = 8192)]
    pub max_uri_bytes: usize,
    /// Largest total size of request headers in bytes; larger is answered 431.
    #[arg(long, env = "STRANGLER_MAX_HEADER_BYTES", default_value_t = 32768)]
    pub max_header_bytes: usize,
    /// Most request header fields; more is answered 431.
    #[arg(long, env = "STRANGLER_MAX_HEADERS", default_value_t = 100)]
    pub max_headers: usize,
    /// Take over the listening sockets of a running strangler (send it SIGQUIT afterwards).
    #[arg(long)]
    pub upgrade: bool,
    /// Unix socket for handing listeners over on --upgrade.
    #[arg(
        long,
        env = "STRANGLER_UPGRADE_SOCK",
        default_value = "/tmp/strangler-upgrade.sock"
    )]
    pub upgrade_sock: PathBuf,
}

fn parse_threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("at least 1 thread is needed".into()),
        Ok(n) => Ok(n),
        Err(_) => Err(format!("{s:?} is not a number of threads")),
    }
}

fn parse_duration_arg(s: &str) -> Result<std::time::Duration, String> {
    if s == "0" || s == "0s" {
        return Ok(std::time::Duration::ZERO);
    }
    crate::config::parse_duration(s)
}

#[derive(Debug, Clone, Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Golden routing cases: a YAML list of {request: "GET /path", route: NAME, backend: NAME, headers: {..}}.
    #[arg(long)]
    pub cases: Option<PathBuf>,
    /// Pin state file whose pins the printed states reflect [default: beside routing.yaml].
    #[arg(long, env = "STRANGLER_STATE")]
    pub state: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ExplainArgs {
    #[command(flatten)]
    pub config: ConfigArg,
    /// Request method, e.g. GET.
    pub method: String,
    /// Request target, e.g. /bookings/42?x=1, as the client sends it (any bytes).
    pub path: std::ffi::OsString,
    /// A request header, 'Name: value' (repeatable).
    #[arg(short = 'H', long = "header")]
    pub headers: Vec<String>,
    /// The client's address, for `sticky: ip` splits.
    #[arg(long, default_value = "127.0.0.1")]
    pub client_ip: std::net::IpAddr,
    /// Pin state file whose pins the explanation reflects [default: beside routing.yaml].
    #[arg(long, env = "STRANGLER_STATE")]
    pub state: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ClientArgs {
    /// Admin API URL of the proxy (repeatable, or one DNS name that resolves to every replica).
    #[arg(
        long,
        env = "STRANGLER_ADMIN",
        value_delimiter = ',',
        value_parser = trimmed,
        default_value = "http://127.0.0.1:9900"
    )]
    pub admin: Vec<String>,
    /// Bearer token for the admin API.
    #[arg(long, env = "STRANGLER_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
    /// Print the raw JSON answer.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
#[command(override_usage = "strangler rollback [OPTIONS] <ROUTE | --all>")]
pub struct RollbackArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The route to pin to `default`.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub route: Option<String>,
    /// Pin every route.
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Args)]
#[command(override_usage = "strangler resume [OPTIONS] <ROUTE | --all>")]
pub struct ResumeArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The route whose pin to lift.
    #[arg(required_unless_present = "all", conflicts_with = "all")]
    pub route: Option<String>,
    /// Lift every pin, automatic ones too (the way back from `rollback --all`).
    #[arg(long)]
    pub all: bool,
}

#[derive(Debug, Clone, Args)]
pub struct DemoServiceArgs {
    /// The name the service answers with.
    #[arg(long)]
    pub name: String,
    /// Address to listen on.
    #[arg(long)]
    pub listen: String,
}

/// The admin listener's address, written `HOST:PORT` or as the URL the client commands use.
fn admin_listen_address(s: &str) -> Result<String, String> {
    if s.starts_with("https://") {
        return Err("the admin listener speaks plain HTTP: give HOST:PORT".into());
    }
    let addr = s.strip_prefix("http://").unwrap_or(s);
    let addr = addr.strip_suffix('/').unwrap_or(addr);
    if addr.is_empty() || addr.contains('/') {
        return Err(format!("{s:?} is not HOST:PORT (or http://HOST:PORT)"));
    }
    Ok(addr.to_string())
}

/// A list item as written after a comma in an environment variable (`a:1, b:2`).
fn trimmed(s: &str) -> Result<String, String> {
    Ok(s.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_admin_address_may_be_written_as_the_clients_url() {
        assert_eq!(
            admin_listen_address("127.0.0.1:9900").unwrap(),
            "127.0.0.1:9900"
        );
        assert_eq!(
            admin_listen_address("http://127.0.0.1:9900/").unwrap(),
            "127.0.0.1:9900"
        );
        assert_eq!(
            admin_listen_address("http://[::1]:9900").unwrap(),
            "[::1]:9900"
        );
        assert!(admin_listen_address("https://127.0.0.1:9900").is_err());
        assert!(admin_listen_address("http://127.0.0.1:9900/admin").is_err());
    }
}
