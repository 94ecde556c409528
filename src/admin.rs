//! The admin listener (SPEC §7): metrics, health, the route table with states and pins, and the
//! rollback / resume / reload controls. Served by Pingora on its own address; it reads the same
//! `State` as the proxy and changes it only through `State`'s methods.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora_core::apps::http_app::ServeHttp;
use pingora_core::protocols::http::ServerSession;
use serde_json::{json, Value};

use crate::connection::DeadlineStream;
use crate::metrics;
use crate::pins::PinReason;
use crate::state::{recent_counts, ControlError, LiveTable, State};

/// The admin application.
pub struct Admin {
    pub state: Arc<State>,
    /// `STRANGLER_ADMIN_TOKEN`: when set, every POST needs `Authorization: Bearer TOKEN`.
    pub token: Option<String>,
}

fn respond(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .header(http::header::CACHE_CONTROL, "no-store")
        .body(body)
        .unwrap_or_default()
}

/// On `GET /routes`: the routes per state, "12 routes: 5 new, 2 canary, 1 shadow, 3 legacy,
/// 1 rolled_back".
pub const X_STRANGLER_TOTALS: http::HeaderName =
    http::HeaderName::from_static("x-strangler-totals");

fn json_response(status: StatusCode, v: Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    respond(status, "application/json", body)
}

fn error(status: StatusCode, code: &str, message: String) -> Response<Vec<u8>> {
    json_response(status, json!({"error": code, "message": message}))
}

/// `response` with fixed headers added (`WWW-Authenticate`, `Retry-After`, …).
fn with_headers(
    mut response: Response<Vec<u8>>,
    headers: &[(http::HeaderName, &'static str)],
) -> Response<Vec<u8>> {
    for (name, value) in headers {
        response
            .headers_mut()
            .insert(name.clone(), http::HeaderValue::from_static(value));
    }
    response
}

/// 503 from a process that has handed its listeners to a new one (`run --upgrade`): the
/// connection is closed, so that the retry connects again and may reach the new process.
fn handing_over() -> Response<Vec<u8>> {
    with_headers(
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "handing_over",
            "this process is handing over to a new one; retry (the new one answers)".into(),
        ),
        &[
            (http::header::RETRY_AFTER, "1"),
            (http::header::CONNECTION, "close"),
        ],
    )
}

/// Constant-time comparison, so a token cannot be guessed byte by byte from response times.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Percent-decodes a route name taken from the URL (route names may contain `/` and `{`).
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            // Digits read as bytes: a `%` before a multi-byte character is not an escape.
            let hex = |d: u8| (d as char).to_digit(16);
            if let (Some(hi), Some(lo)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((hi * 16 + lo) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `{backend: n}` from last-minute `(backend, requests, errors)` counts.
fn per_backend(counts: &[(String, u64, u64)], pick: impl Fn(&(String, u64, u64)) -> u64) -> Value {
    Value::Object(
        counts
            .iter()
            .map(|c| (c.0.clone(), json!(pick(c))))
            .collect(),
    )
}

/// The `/routes` document: the routes of the file, in file order. With `unmatched`, one more
/// entry at the end for the `default` pseudo-route (the requests no route matched; `path`
/// null) — what `strangler routes` shows as its last line, asked for with `?default=1` so that
/// the plain document holds exactly the file's routes.
pub fn routes_json(live: &LiveTable, unmatched: bool) -> Value {
    let t = &live.table;
    let default = &*t.backends[t.default].name;
    let mut out: Vec<Value> = t
        .routes
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let control = &live.routes[i].control;
            let pin = control.pin();
            let counts = recent_counts(live, Some(i));
            json!({
                "name": &*r.name,
                "path": r.path,
                "methods": r.methods,
                "exact": r.exact,
                "to": &*t.backends[r.to].name,
                "default": default,
                "split": r.split.as_ref().map(|s| crate::split::percent_json(s.percent)),
                "shadow": r.shadow.map(|b| &*t.backends[b].name),
                "failover": r.failover,
                "rewrite": r.rewrite,
                "state": t.state(r, pin.is_some()).as_str(),
                "pinned": pin.map(|p| json!({"reason": p.reason.as_str(), "since": p.since})),
                "requests": per_backend(&counts, |(_, r, _)| *r),
                "errors": per_backend(&counts, |(_, _, e)| *e),
            })
        })
        .collect();
    if !unmatched {
        return Value::Array(out);
    }
    let counts = recent_counts(live, None);
    out.push(json!({
        "name": crate::router::DEFAULT_ROUTE,
        "path": null,
        "methods": null,
        "exact": false,
        "to": default,
        "default": default,
        "split": null,
        "shadow": null,
        "failover": false,
        "rewrite": null,
        "state": "legacy",
        "pinned": null,
        "requests": per_backend(&counts, |(_, r, _)| *r),
        "errors": per_backend(&counts, |(_, _, e)| *e),
    }));
    Value::Array(out)
}

impl Admin {
    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let given = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            // The scheme name is case-insensitive (RFC 9110 §11.1); the token is not.
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map_or("", |(_, t)| t);
        same(given.trim().as_bytes(), token.as_bytes())
    }

    fn handle(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        authorized: bool,
    ) -> Response<Vec<u8>> {
        let get = method == Method::GET || method == Method::HEAD;
        let action = route_action(path);
        let post_endpoint = matches!(path, "/rollback" | "/resume" | "/reload") || action.is_some();
        if *method == Method::POST && !authorized {
            // Every POST, whatever its path (SPEC §7): an unknown one is not told apart from
            // a known one before the token is shown. RFC 9110 §11.6.1: a 401 names the scheme
            // it wants.
            return with_headers(
                error(
                    StatusCode::UNAUTHORIZED,
                    "unauthorized",
                    "this admin API needs Authorization: Bearer $STRANGLER_ADMIN_TOKEN".into(),
                ),
                &[(
                    http::header::WWW_AUTHENTICATE,
                    "Bearer realm=\"strangler admin\"",
                )],
            );
        }
        if matches!(path, "/metrics" | "/healthz" | "/routes") {
            if !get {
                return not_allowed(method, "GET, HEAD");
            }
            if path != "/healthz" && crate::pins::handed_over() {
                // The new process answers for the routes and counts from now on: a scrape
                // landing here would read counters that go back and forth between the two
                // processes (each step down a counter reset for `rate()`).
                return handing_over();
            }
        } else if !post_endpoint {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint {path}"),
            );
        } else if *method != Method::POST {
            return not_allowed(method, "POST");
        } else if crate::pins::handed_over() {
            // During `run --upgrade` both processes accept on the admin socket for a few
            // seconds; a change taken here would never reach the process that serves now.
            return handing_over();
        }
        match (path, action) {
            ("/metrics", _) => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(),
            ),
            ("/healthz", _) => respond(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            ("/routes", _) => {
                let unmatched = query
                    .split('&')
                    .any(|p| p == "default=1" || p == "default=true");
                let live = self.state.snapshot();
                let mut response = json_response(StatusCode::OK, routes_json(&live, unmatched));
                // SPEC §5 has `GET /routes` show the states "with totals"; its document is the
                // array §7 fixes, so the totals go in a header, worded as `check` words them.
                if let Ok(totals) = http::HeaderValue::try_from(live.summary()) {
                    response.headers_mut().insert(X_STRANGLER_TOTALS, totals);
                }
                response
            }
            ("/rollback", _) => {
                let n = self.state.pin_all("POST /rollback");
                if crate::pins::handed_over() {
                    // Handed over while the change was made: it may not have reached the state
                    // file the new process reads. Said so, the CLI sends it there.
                    return handing_over();
                }
                json_response(
                    StatusCode::OK,
                    json!({"pinned": n, "routes": routes_json(&self.state.snapshot(), false)}),
                )
            }
            // Not in SPEC §7: the way back from `POST /rollback`, for `strangler resume --all`.
            ("/resume", _) => {
                let n = self.state.resume_all();
                if crate::pins::handed_over() {
                    return handing_over();
                }
                json_response(
                    StatusCode::OK,
                    json!({"resumed": n, "routes": routes_json(&self.state.snapshot(), false)}),
                )
            }
            ("/reload", _) => match self.state.reload("POST /reload") {
                Ok(warnings) => json_response(
                    StatusCode::OK,
                    json!({
                        "reloaded": true,
                        "sha256": self.state.snapshot().table.sha256,
                        "warnings": warnings,
                    }),
                ),
                Err(e) => error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_config",
                    e.message,
                ),
            },
            (_, Some((name, action))) => {
                let result = if action == "rollback" {
                    self.state
                        .pin(&name, PinReason::Manual, "POST rollback (admin API)")
                } else {
                    self.state.resume(&name)
                };
                match result {
                    // As for `POST /rollback`: the new process may not have it.
                    Ok(_) if crate::pins::handed_over() => handing_over(),
                    Ok(changed) => {
                        let live = self.state.snapshot();
                        let route = routes_json(&live, false)
                            .as_array()
                            .and_then(|a| a.iter().find(|r| r["name"] == name.as_str()).cloned())
                            .unwrap_or(Value::Null);
                        json_response(StatusCode::OK, json!({"changed": changed, "route": route}))
                    }
                    Err(ControlError::UnknownRoute) => error(
                        StatusCode::NOT_FOUND,
                        "unknown_route",
                        format!("no route named {name:?}"),
                    ),
                }
            }
            (p, None) => error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint {p}"),
            ),
        }
    }
}

/// `/routes/NAME/rollback` or `/routes/NAME/resume`: the (decoded) route name and the action.
fn route_action(path: &str) -> Option<(String, &'static str)> {
    let (name, action) = path.strip_prefix("/routes/")?.rsplit_once('/')?;
    let action = match action {
        "rollback" => "rollback",
        "resume" => "resume",
        _ => return None,
    };
    Some((decode(name), action))
}

/// 405 with the `Allow` header (RFC 9110 §15.5.6).
fn not_allowed(method: &Method, allow: &str) -> Response<Vec<u8>> {
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed here (allowed: {allow})"),
    );
    if let Ok(v) = http::HeaderValue::from_str(allow) {
        r.headers_mut().insert(http::header::ALLOW, v);
    }
    r
}

#[async_trait]
impl ServeHttp for Admin {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        // The header deadline (`connection::Guarded`) has done its work for this request, and
        // starts again for the next one on the connection.
        let clock = session.stream().and_then(DeadlineStream::clock_of).cloned();
        if let Some(c) = &clock {
            c.header_done();
        }
        // Pipelined requests are answered in order, as on the proxy's listeners.
        session.set_pipelining_enabled(true);
        let response = self.answer(session).await;
        if let Some(c) = &clock {
            c.request_done();
        }
        response
    }
}

impl Admin {
    async fn answer(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let query = session.req_header().uri.query().unwrap_or("").to_string();
        let authorized = self.authorized(session);
        // The body of a POST is not used; read it so the connection stays usable.
        let _ = session.drain_request_body().await;
        let state = self.state.clone();
        let token = self.token.clone();
        // Pins and reloads write files: keep them off the async workers.
        tokio::task::spawn_blocking(move || {
            Admin { state, token }.handle(&method, &path, &query, authorized)
        })
        .await
        .unwrap_or_else(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                e.to_string(),
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_route_names() {
        assert_eq!(decode("bookings"), "bookings");
        assert_eq!(decode("%2Fitineraries%2F%7Bid%7D"), "/itineraries/{id}");
        assert_eq!(decode("a%2"), "a%2");
        // A '%' before a multi-byte character is kept as written, not sliced through.
        assert_eq!(decode("%aé/x"), "%aé/x");
        assert_eq!(decode("%C3%A9"), "é");
        assert_eq!(decode("/bookings"), "/bookings");
    }

    #[test]
    fn constant_time_compare() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"ab"));
    }
}
