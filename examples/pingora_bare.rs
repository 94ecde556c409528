//! The baseline for `scripts/bench.sh`: a minimal Pingora proxy, built with the same release
//! profile and allocator, that sends every request to one fixed peer — no routing, no metrics,
//! no header work. The gap between it and strangler is the cost of strangler's own logic.
//!
//! Try it: `cargo run --release --example pingora_bare -- 127.0.0.1:8081 127.0.0.1:9001`
//! (listen address, peer address), then `curl localhost:8081/`.

use async_trait::async_trait;

/// The same allocator as strangler's binary: the baseline is built the same way.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use pingora_core::server::configuration::{Opt, ServerConf};
use pingora_core::server::Server;
use pingora_core::upstreams::peer::HttpPeer;
use pingora_proxy::{ProxyHttp, Session};

struct Bare {
    peer: std::net::SocketAddr,
}

#[async_trait]
impl ProxyHttp for Bare {
    type CTX = ();

    fn new_ctx(&self) {}

    /// Every request goes to the one peer.
    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora_error::Result<Box<HttpPeer>> {
        Ok(Box::new(HttpPeer::new(self.peer, false, String::new())))
    }
}

fn main() {
    strangler::allocator::tune();
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(peer)) = (args.next(), args.next()) else {
        eprintln!("usage: pingora_bare LISTEN_ADDR PEER_ADDR");
        std::process::exit(2);
    };
    let Ok(peer) = peer.parse() else {
        eprintln!("{peer}: not an IP:port");
        std::process::exit(2);
    };
    let conf = ServerConf {
        threads: 1,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(0),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(Opt::default(), conf);
    server.bootstrap();
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, Bare { peer });
    proxy.add_tcp(&listen);
    server.add_service(proxy);
    server.run_forever();
}
