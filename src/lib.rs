//! strangler: a migration proxy on Pingora. It routes each resource path of an HTTP API to the
//! legacy service or its replacement, as `routing.yaml` says, and flips a route back in seconds.
//!
//! How the pieces own each other:
//! ```text
//! main ─ cli (flags) ─┬ server (Pingora Server and its services)
//!                     │   ├ connection::Guarded (header deadline, late cleanup, refused headers)
//!                     │   │   └ proxy::Strangler (the ProxyHttp hooks) ─┐
//!                     │   ├ admin::Admin (metrics, routes, pins) ───────┼─ state::State ─ ArcSwap<LiveTable>
//!                     │   ├ reload::Reloader (file watch, SIGHUP) ──────┘                 └ router::RoutingTable
//!                     │   └ demo (sample services)                                          └ matching::RouteTrie
//!                     ├ check (check, explain: offline)
//!                     └ client (routes, rollback, resume: admin API client)
//! config (file schema) + source_map (FILE:LINE:COL) ─► router (validated table)
//! path (normalisation) · split · shadow · rollback · pins · audit · forwarding · errors · metrics
//! head_scan (what a header Pingora's parser refused was: 400, 414 or 431)
//! dns (backend addresses: all of them, in turn, refreshed)
//! upstream_close (pooled backend connections a backend said it would close)
//! allocator (mimalloc settings)
//! ```
/// `println!` for the command-line output (`check`, `explain`, `routes`): a reader that closes
/// early (`strangler check | head -1`) ends the output, not the process with a panic, and the
/// exit status stays the command's own.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

pub mod admin;
pub mod allocator;
pub mod audit;
pub mod check;
pub mod cli;
pub mod client;
pub mod config;
pub mod connection;
pub mod demo;
pub mod dns;
pub mod errors;
pub mod forwarding;
pub mod head_scan;
pub mod logging;
pub mod matching;
pub mod metrics;
pub mod path;
pub mod pins;
pub mod proxy;
pub mod reload;
pub mod rollback;
pub mod route_gauges;
pub mod router;
pub mod server;
pub mod shadow;
pub mod source_map;
pub mod split;
pub mod state;
pub mod upstream_close;
