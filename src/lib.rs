//! strangler: a migration proxy on Pingora. It routes each resource path of an HTTP API to the
//! legacy service or its replacement, as `routing.yaml` says, and flips a route back in seconds.
//!
//! How the pieces own each other:
//! ```text
//! main ─ cli (commands) ─ server (Pingora Server, services)
//!                           ├─ proxy::Strangler (ProxyHttp hooks) ── Arc<ArcSwap<RoutingTable>>
//!                           ├─ reload::Reloader (background: file watch, SIGHUP) ─┘
//!                           └─ admin (metrics, routes, pins)
//! config (file schema) ─► router::RoutingTable (validated) ─► matching::RouteTrie (pure)
//! ```
pub mod config;
pub mod matching;
pub mod path;
pub mod router;
pub mod source_map;
