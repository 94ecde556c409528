//! The built-in sample services of `strangler demo` and `strangler demo-service`: tiny HTTP
//! apps that answer every request with JSON naming themselves and echoing what they received,
//! so a newcomer sees routing work with nothing else installed. `?status=NNN` answers with that
//! status and `?delay_ms=N` answers late, to try failover, rollback and the dashboard.

use std::path::Path;

use async_trait::async_trait;
use http::{Response, StatusCode};
use pingora_core::apps::http_app::{HttpServer, ServeHttp};
use pingora_core::protocols::http::ServerSession;
use pingora_core::services::listening::Service;
use serde_json::json;

/// One sample service.
pub struct DemoService {
    pub name: String,
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then_some(v)
    })
}

#[async_trait]
impl ServeHttp for DemoService {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let req = session.req_header();
        let method = req.method.to_string();
        let path = req.uri.path().to_string();
        let query = req.uri.query().unwrap_or("").to_string();
        let header = |n: &str| {
            req.headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let headers = json!({
            "host": header("host"),
            "x-forwarded-for": header("x-forwarded-for"),
            "x-forwarded-host": header("x-forwarded-host"),
            "x-forwarded-proto": header("x-forwarded-proto"),
            "x-request-id": header("x-request-id"),
            "x-strangler-shadow": header("x-strangler-shadow"),
        });
        let mut body_len = 0usize;
        while let Ok(Some(chunk)) = session.read_request_body().await {
            body_len += chunk.len();
        }
        if let Some(ms) = query_param(&query, "delay_ms").and_then(|v| v.parse::<u64>().ok()) {
            tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
        }
        let status = query_param(&query, "status")
            .and_then(|v| v.parse::<u16>().ok())
            .and_then(|s| StatusCode::from_u16(s).ok())
            .unwrap_or(StatusCode::OK);
        let body = json!({
            "service": self.name,
            "method": method,
            "path": path,
            "query": query,
            "body_bytes": body_len,
            "headers": headers,
        });
        let mut bytes = serde_json::to_vec_pretty(&body).unwrap_or_default();
        bytes.push(b'\n');
        Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header(http::header::CONTENT_LENGTH, bytes.len())
            .body(bytes)
            .unwrap_or_default()
    }
}

/// A Pingora service running one sample service on `addr`.
pub fn service(name: &str, addr: &str) -> Service<HttpServer<DemoService>> {
    let mut s = Service::new(
        format!("demo service {name}"),
        HttpServer::new_app(DemoService {
            name: name.to_string(),
        }),
    );
    s.add_tcp(addr);
    s
}

/// The `(name, address)` of the sample services `demo` starts: the `legacy` and `new` backends.
pub fn demo_backends(config: &Path) -> Result<Vec<(String, String)>, String> {
    let table = crate::check::load(config).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for name in ["legacy", "new"] {
        let b = table
            .backend_index(name)
            .map(|i| &table.backends[i])
            .ok_or_else(|| {
                format!(
                    "demo needs backends named `legacy` and `new` in {}",
                    config.display()
                )
            })?;
        if b.tls {
            return Err(format!(
                "demo services speak plain http; backend {name} is https"
            ));
        }
        out.push((name.to_string(), format!("{}:{}", bracket(&b.host), b.port)));
    }
    Ok(out)
}

fn bracket(host: &str) -> String {
    if host.contains(':') {
        format!("[{host}]")
    } else {
        host.to_string()
    }
}
