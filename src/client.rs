//! `strangler routes | rollback | resume | reload`: the admin API from the command line. Several
//! `--admin` URLs, or one DNS name that resolves to many replicas (a headless Service), are
//! all asked at once; one line per replica says how each answered, and the exit code is 1 if
//! any failed.

use std::net::ToSocketAddrs;
use std::process::ExitCode;
use std::time::Duration;

use serde_json::Value;

use crate::cli::{ClientArgs, ResumeArgs, RollbackArgs};

/// One admin endpoint to ask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// How the replica is named in output.
    pub label: String,
    /// Base URL, without a trailing slash.
    pub base: String,
}

/// How long a loopback address is given to take a connection when a name resolves to several.
const CONNECT_PROBE: std::time::Duration = std::time::Duration::from_secs(1);

/// Expands `--admin` values into targets: a name resolving to several addresses becomes one
/// target per address (a fleet behind one DNS name), unless they are all loopback addresses.
pub fn targets(admin: &[String]) -> Vec<Target> {
    let mut out = Vec::new();
    for a in admin {
        let a = a.trim().trim_end_matches('/');
        let url = if a.contains("://") {
            a.to_string()
        } else {
            format!("http://{a}")
        };
        let (scheme, rest) = url.split_once("://").unwrap_or(("http", &url));
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        let default_port = if scheme == "https" { 443 } else { 80 };
        let host_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_string()
        } else {
            format!("{authority}:{default_port}")
        };
        let addrs: Vec<_> = host_port
            .to_socket_addrs()
            .map(|it| {
                let mut v: Vec<_> = it.collect();
                v.sort();
                v.dedup();
                v
            })
            .unwrap_or_default();
        let one_machine = addrs.iter().all(|a| a.ip().is_loopback());
        if addrs.len() > 1 && one_machine {
            // `localhost` (127.0.0.1 and ::1) is this machine, not a fleet: one target, at the
            // address that takes a connection (a proxy listens on one of them).
            let addr = addrs
                .iter()
                .find(|a| std::net::TcpStream::connect_timeout(a, CONNECT_PROBE).is_ok())
                .unwrap_or(&addrs[0]);
            out.push(Target {
                label: authority.to_string(),
                base: if scheme == "http" {
                    format!("{scheme}://{addr}{path}")
                } else {
                    url.clone()
                },
            });
        } else if addrs.len() > 1 {
            for addr in addrs {
                out.push(Target {
                    label: format!("{authority} ({addr})"),
                    base: format!("{scheme}://{addr}{path}"),
                });
            }
        } else {
            out.push(Target {
                label: authority.to_string(),
                base: url.clone(),
            });
        }
    }
    out
}

/// How long a replica may take to answer: reads and pins are instant.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// A reload reads, validates and resolves the whole file (DNS included) before it answers.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(30);

fn agent(timeout: Duration) -> ureq::Agent {
    let config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(timeout))
        .build();
    ureq::Agent::new_with_config(config)
}

/// Sends one request; `Ok((status, json))` when the replica answered. A change refused because
/// the process answering is handing over to a new one (`run --upgrade`: both accept on the
/// admin socket for a few seconds) is sent again, so it lands on the process that serves.
fn call(
    target: &Target,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let mut tries = 0;
    loop {
        let answer = call_once(target, method, path, token, timeout);
        match &answer {
            Ok((503, v)) if v["error"] == "handing_over" && tries < 25 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            _ => return answer,
        }
    }
}

fn call_once(
    target: &Target,
    method: &str,
    path: &str,
    token: Option<&str>,
    timeout: Duration,
) -> Result<(u16, Value), String> {
    let url = format!("{}{path}", target.base);
    let agent = agent(timeout);
    let auth = token.map(|t| format!("Bearer {t}"));
    let result = if method == "POST" {
        let mut req = agent.post(&url);
        if let Some(a) = &auth {
            req = req.header("Authorization", a);
        }
        req.send_empty()
    } else {
        let mut req = agent.get(&url);
        if let Some(a) = &auth {
            req = req.header("Authorization", a);
        }
        req.call()
    };
    let mut resp = result.map_err(|e| format!("{url}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .map_err(|e| format!("{url}: {e}"))?;
    let json = serde_json::from_str(&body).unwrap_or(Value::String(body));
    Ok((status, json))
}

/// One replica's answer: `(status, body)`, or why it could not be asked.
type Answer = Result<(u16, Value), String>;

/// Asks every target concurrently, printing one block per replica.
///
/// `show` words a successful answer, or says `None` when the answer does not have the shape
/// of the admin API's ([`not_admin_api`]).
fn fan_out(
    args: &ClientArgs,
    method: &str,
    path: &str,
    show: impl Fn(&Value) -> Option<String> + Sync,
) -> ExitCode {
    fan_out_within(args, method, path, ANSWER_TIMEOUT, show)
}

/// [`fan_out`], each replica given `timeout` to answer.
fn fan_out_within(
    args: &ClientArgs,
    method: &str,
    path: &str,
    timeout: Duration,
    show: impl Fn(&Value) -> Option<String> + Sync,
) -> ExitCode {
    let targets = targets(&args.admin);
    let token = args
        .admin_token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty());
    let results: Vec<(Target, Answer)> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| s.spawn(move || (t.clone(), call(t, method, path, token, timeout))))
            .collect();
        handles.into_iter().filter_map(|h| h.join().ok()).collect()
    });
    let many = results.len() > 1;
    let mut failed = 0;
    for (t, r) in &results {
        let prefix = if many {
            format!("{}: ", t.label)
        } else {
            String::new()
        };
        match r {
            Ok((status, body)) if (200..300).contains(status) => match show(body) {
                Some(_) if args.json => outln!(
                    "{prefix}{}",
                    serde_json::to_string_pretty(body).unwrap_or_default()
                ),
                Some(text) if many && text.contains('\n') => outln!("{}:\n{text}", t.label),
                Some(text) => outln!("{prefix}{text}"),
                None => {
                    failed += 1;
                    not_admin_api(&prefix, &t.base, path, *status, body);
                }
            },
            // The admin API's errors are `{"error": CODE, "message": …}`.
            Ok((status, body)) if !(body["error"].is_string() && body["message"].is_string()) => {
                failed += 1;
                not_admin_api(&prefix, &t.base, path, *status, body);
            }
            Ok((status, body)) => {
                failed += 1;
                let msg = match (status, token) {
                    // The server cannot tell a missing token from a wrong one; this side can.
                    (401, Some(_)) => {
                        "the admin token (--admin-token or STRANGLER_ADMIN_TOKEN) was refused"
                            .to_string()
                    }
                    (401, None) => {
                        "this admin API needs a token: set STRANGLER_ADMIN_TOKEN or pass --admin-token"
                            .to_string()
                    }
                    _ => body["message"]
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| body.to_string()),
                };
                // A rejected reload names every error of the file, one a line.
                let note = (body["error"] == "invalid_config")
                    .then_some("the file was rejected; the previous table keeps serving");
                let lines: Vec<&str> = msg.lines().collect();
                if note.is_none() && lines.len() <= 1 {
                    eprintln!("{prefix}error {status}: {msg}");
                } else {
                    match note {
                        Some(note) => eprintln!("{prefix}error {status}: {note}:"),
                        None => eprintln!("{prefix}error {status}:"),
                    }
                    for line in lines {
                        eprintln!("{prefix}  {line}");
                    }
                }
            }
            Err(e) => {
                failed += 1;
                eprintln!("{prefix}unreachable: {e}");
            }
        }
    }
    if many {
        outln!(
            "{} of {} replicas ok",
            results.len() - failed,
            results.len()
        );
    }
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// Says that `base` answered something other than the admin API would: a 2xx from the proxy's
/// own port (which forwards the request to a backend) must not read as "pinned".
fn not_admin_api(prefix: &str, base: &str, path: &str, status: u16, body: &Value) {
    eprintln!(
        "{prefix}error: {base}{path} answered {status} with {}: not strangler's admin API \
         (is --admin the admin listener's address, not the proxy's or a backend's?)",
        excerpt(body)
    );
}

/// The start of an answer that is not the admin API's, on one line.
fn excerpt(body: &Value) -> String {
    const MAX: usize = 80;
    let text = match body {
        Value::String(s) => s.split_whitespace().collect::<Vec<_>>().join(" "),
        other => other.to_string(),
    };
    if text.is_empty() {
        return "an empty body".into();
    }
    match text.char_indices().nth(MAX) {
        Some((i, _)) => format!("{:?}", format!("{}…", &text[..i])),
        None => format!("{text:?}"),
    }
}

/// Route names may contain `/` and `{}`: escape everything but unreserved characters.
fn escape(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn route_table(v: &Value) -> Option<String> {
    // The admin API's `GET /routes`: an array of routes, each with a name and a state.
    let routes = v.as_array().filter(|a| {
        a.iter()
            .all(|r| r["name"].is_string() && r["state"].is_string())
    })?;
    let mut rows: Vec<[String; 7]> = vec![[
        "NAME".into(),
        "PATH".into(),
        "STATE".into(),
        "TO".into(),
        "SPLIT".into(),
        "PINNED".into(),
        "LAST MINUTE (req/err)".into(),
    ]];
    for r in routes {
        let pinned = match &r["pinned"] {
            Value::Object(p) => format!(
                "{} {}",
                p.get("reason").and_then(Value::as_str).unwrap_or("?"),
                p.get("since").and_then(Value::as_str).unwrap_or("")
            ),
            _ => "-".into(),
        };
        let mut traffic = Vec::new();
        if let Some(reqs) = r["requests"].as_object() {
            for (b, n) in reqs {
                let e = r["errors"][b].as_u64().unwrap_or(0);
                traffic.push(format!("{b} {}/{e}", n.as_u64().unwrap_or(0)));
            }
        }
        rows.push([
            r["name"].as_str().unwrap_or("?").to_string(),
            r["path"].as_str().unwrap_or("*").to_string(),
            r["state"].as_str().unwrap_or("?").to_string(),
            r["to"].as_str().unwrap_or("?").to_string(),
            r["split"].as_f64().map_or("-".into(), |s| format!("{s}%")),
            pinned,
            traffic.join(", "),
        ]);
    }
    // Columns as wide as their widest cell, so long names and paths do not shift the rest.
    let mut widths = [0usize; 7];
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut lines: Vec<String> = rows
        .iter()
        .map(|row| {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i + 1 < row.len() {
                    line.push_str(&format!("{cell:<w$} ", w = widths[i]));
                } else {
                    line.push_str(cell);
                }
            }
            line.trim_end().to_string()
        })
        .collect();
    // The totals, as `check` and the reload log print them (the `default` pseudo-route, the
    // one without a path, is not a route of the file).
    let states: Vec<&str> = routes
        .iter()
        .filter(|r| !r["path"].is_null())
        .filter_map(|r| r["state"].as_str())
        .collect();
    let parts: Vec<String> = crate::router::RouteState::ALL
        .iter()
        .map(|s| {
            let n = states.iter().filter(|x| **x == s.as_str()).count();
            format!("{n} {}", s.as_str())
        })
        .collect();
    lines.push(format!("{} routes: {}", states.len(), parts.join(", ")));
    Some(lines.join("\n"))
}

/// `strangler routes`.
pub fn routes(a: &ClientArgs) -> ExitCode {
    fan_out(a, "GET", "/routes?default=1", route_table)
}

/// `strangler rollback ROUTE` / `--all`.
pub fn rollback(a: &RollbackArgs) -> ExitCode {
    match &a.route {
        Some(route) if !a.all => one_route(
            &a.client,
            route,
            "rollback",
            ("pinned to default", "already pinned"),
        ),
        // `pinned` counts the routes this call pinned; some may have been pinned before.
        _ => every_route(&a.client, "/rollback", "pinned", |n| {
            format!("pinned {n} route(s) to default")
        }),
    }
}

/// `strangler resume ROUTE` / `--all`.
pub fn resume(a: &ResumeArgs) -> ExitCode {
    match &a.route {
        Some(route) if !a.all => {
            one_route(&a.client, route, "resume", ("resumed", "was not pinned"))
        }
        _ => every_route(&a.client, "/resume", "resumed", |n| {
            format!("resumed {n} route(s)")
        }),
    }
}

/// `rollback ROUTE` / `resume ROUTE`: `POST /routes/ROUTE/ACTION`, and whether it changed
/// anything (`said.0`) or found the route so already (`said.1`).
fn one_route(a: &ClientArgs, route: &str, action: &str, said: (&str, &str)) -> ExitCode {
    fan_out(
        a,
        "POST",
        &format!("/routes/{}/{action}", escape(route)),
        |v| {
            let what = if v["changed"].as_bool()? {
                said.0
            } else {
                said.1
            };
            Some(format!("{route}: {what}"))
        },
    )
}

/// `rollback --all` / `resume --all`: what the call did (the count under `key`), and where the
/// replica stands after it.
fn every_route(a: &ClientArgs, path: &str, key: &str, did: fn(u64) -> String) -> ExitCode {
    fan_out(a, "POST", path, |v| {
        let routes = v["routes"].as_array()?;
        let now = routes.iter().filter(|r| !r["pinned"].is_null()).count();
        Some(format!(
            "{}; {now} of {} pinned now",
            did(v[key].as_u64()?),
            routes.len()
        ))
    })
}

/// `strangler reload`: the proxy re-reads the routing file it was started with (`POST
/// /reload`), as on SIGHUP, and says whether the new table serves. Unlike SIGHUP, the answer
/// comes back: exit 1 with the file's errors when it was rejected.
pub fn reload(a: &ClientArgs) -> ExitCode {
    fan_out_within(a, "POST", "/reload", RELOAD_TIMEOUT, |v| {
        let sha = v["sha256"].as_str()?;
        let mut out = format!("reloaded (sha256 {})", sha.get(..16).unwrap_or(sha));
        for w in v["warnings"].as_array().into_iter().flatten() {
            out.push_str("\nwarning: ");
            out.push_str(w.as_str().unwrap_or("?"));
        }
        Some(out)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_and_escaping() {
        let t = targets(&["127.0.0.1:9900".into(), "http://127.0.0.1:9901/".into()]);
        assert_eq!(t[0].base, "http://127.0.0.1:9900");
        assert_eq!(t[1].base, "http://127.0.0.1:9901");
        // `localhost` is one target whatever it resolves to (127.0.0.1, ::1): the address
        // that listens.
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let t = targets(&[format!("localhost:{port}")]);
        assert_eq!(
            t.len(),
            1,
            "{:?}",
            t.iter().map(|t| &t.base).collect::<Vec<_>>()
        );
        assert!(
            [
                format!("http://localhost:{port}"),
                format!("http://127.0.0.1:{port}")
            ]
            .contains(&t[0].base),
            "{}",
            t[0].base
        );
        assert_eq!(escape("/itineraries/{id}"), "%2Fitineraries%2F%7Bid%7D");
        assert_eq!(escape("bookings"), "bookings");
    }
}
