//! The `strangler` binary: parses the command line and hands over to the command.

use std::process::ExitCode;

use clap::Parser;
use strangler::cli::{Cli, Command, RunArgs};
use strangler::server::{self, ServeOptions};
use strangler::{check, client, demo, logging};

/// mimalloc instead of glibc's malloc: about 20 % fewer instructions per proxied request
/// (callgrind, 127k -> 102k) and ~10 % more 1 KiB requests per second on one core
/// (BENCHMARKS.md, "Allocator"). Pingora allocates per request (headers, buffers, futures).
/// Its settings: `strangler::allocator`.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn serve_options(a: RunArgs, demo: Vec<(String, String)>) -> ServeOptions {
    ServeOptions {
        config: a.config.config,
        listen: a.listen,
        admin: a.admin,
        admin_token: a.admin_token,
        state_file: a.state,
        audit_log: a.audit_log,
        threads: a.threads,
        drain_timeout: a.drain_timeout,
        upgrade: a.upgrade,
        upgrade_sock: a.upgrade_sock,
        header_timeout: a.header_timeout,
        keepalive_timeout: a.keepalive_timeout,
        limits: strangler::proxy::Limits {
            max_uri_bytes: a.max_uri_bytes,
            max_header_bytes: a.max_header_bytes,
            max_headers: a.max_headers,
        },
        demo_services: demo,
    }
}

fn main() -> ExitCode {
    strangler::allocator::tune();
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let result = match cli.command {
        Command::Run(a) => server::serve(serve_options(a, Vec::new())).map(|_| ExitCode::SUCCESS),
        Command::Demo(a) => demo::demo_backends(&a.config.config)
            .and_then(|demo| server::serve(serve_options(a, demo)))
            .map(|_| ExitCode::SUCCESS),
        Command::Check(a) => Ok(check::check(&a)),
        Command::Explain(a) => Ok(check::explain(&a)),
        Command::Routes(a) => Ok(client::routes(&a)),
        Command::Rollback(a) => Ok(client::rollback(&a)),
        Command::Resume(a) => Ok(client::resume(&a)),
        Command::Reload(a) => Ok(client::reload(&a)),
        Command::DemoService(a) => {
            server::serve_demo_services(vec![(a.name, a.listen)]).map(|_| ExitCode::SUCCESS)
        }
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // As they are (`FILE:LINE:COL: message`, one a line), or one JSON line each.
            match cli.log_format {
                logging::LogFormat::Text => eprintln!("{e}"),
                logging::LogFormat::Json => {
                    for line in e.lines() {
                        log::error!(target: "strangler", "{line}");
                    }
                }
            }
            ExitCode::from(1)
        }
    }
}
