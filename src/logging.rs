//! Logging: one line per event on stderr, filtered like `RUST_LOG` (default `info`), as text or
//! as JSON lines (`--log-format json`). Targets worth knowing: `audit` (who serves what),
//! `shadow` (mismatches), `strangler::access` (one line per request, at debug).

use std::io::Write;

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// Installs the logger. Pingora's own info lines (service start-up, per-connection chatter)
/// are kept at warn, and the file watcher's at error, unless `RUST_LOG` says otherwise.
pub fn init(format: LogFormat) {
    let mut b = env_logger::Builder::new();
    // `notify` warns when a watch it drops is already gone, which a ConfigMap update (the old
    // `..data` directory deleted) does every time: routine, not a warning.
    b.parse_filters("info,pingora_core=warn,pingora_proxy=warn,pingora=warn,notify=error");
    if let Ok(f) = std::env::var("RUST_LOG") {
        b.parse_filters(&f);
    }
    b.target(env_logger::Target::Stderr);
    match format {
        LogFormat::Text => {
            b.format(|buf, r| {
                let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let msg = one_line(r.args().to_string());
                writeln!(buf, "{ts} {:5} {}: {msg}", r.level(), r.target())
            });
        }
        LogFormat::Json => {
            b.format(|buf, r| {
                let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
                let mut fields = Fields(Vec::new());
                let _ = r.key_values().visit(&mut fields);
                let line = json_line(
                    &ts,
                    r.level().as_str(),
                    r.target(),
                    r.args().to_string(),
                    fields.0,
                );
                writeln!(buf, "{line}")
            });
        }
    }
    let logger = b.build();
    let max = logger.filter();
    if log::set_boxed_logger(Box::new(Reclassified(logger))).is_ok() {
        log::set_max_level(max);
    }
}

/// Pingora logs three routine events at error, which alert rules on error lines would page on:
/// a new process (`run --upgrade`) waiting for the old one's listeners, as it does until
/// SIGQUIT (info here), a pooled backend connection its idle watcher still held, given up
/// for a fresh one (debug here), and a client whose request header did not come within
/// `--header-timeout` (a slow or silent client, or a browser's unused preconnect: info here, as
/// nginx logs "client timed out"). Every other record goes through as it is.
struct Reclassified(env_logger::Logger);

impl Reclassified {
    /// The level a Pingora record at `level` saying `msg` is logged at, when not its own.
    fn level_of(target: &str, level: log::Level, msg: &str) -> Option<log::Level> {
        if level != log::Level::Error {
            return None;
        }
        if target.starts_with("pingora_core::server::transfer_fd") {
            return msg
                .starts_with("No incoming socket transfer")
                .then_some(log::Level::Info);
        }
        if target.starts_with("pingora_core::connectors") {
            return (msg == "failed to acquire reusable stream").then_some(log::Level::Debug);
        }
        if target.starts_with("pingora_proxy") {
            return (msg.starts_with("Fail to proxy: Downstream")
                && msg.contains(crate::connection::HEADER_TIMED_OUT))
            .then_some(log::Level::Info);
        }
        None
    }
}

/// At most this many of Pingora's per-request failure lines ("Fail to proxy: …") a second: a
/// backend that is down fails every request, and a line each (15 000 a second, measured) would
/// bury the rest of the log and trip journald's rate limit, which then drops the lines that
/// matter (`audit`, the automatic rollback the outage triggers). The metrics count every
/// failure; the lines held back are counted in the next one shown.
const FAILURE_LINES_PER_SECOND: u32 = 10;

/// The per-second budget of failure lines, and what it held back.
#[derive(Debug)]
struct Flood {
    window: std::time::Instant,
    shown: u32,
    held: u64,
    /// When the first of the lines held back came.
    held_since: Option<std::time::SystemTime>,
}

impl Flood {
    /// Whether a failure line at `now` is shown, and, when a new second begins after lines were
    /// held back, how many and since when (to say so first).
    fn admit(
        this: &mut Option<Flood>,
        limit: u32,
        now: std::time::Instant,
        wall: std::time::SystemTime,
    ) -> (bool, Option<(u64, std::time::SystemTime)>) {
        let f = this.get_or_insert(Flood {
            window: now,
            shown: 0,
            held: 0,
            held_since: None,
        });
        let mut held_before = None;
        if now.duration_since(f.window) >= std::time::Duration::from_secs(1) {
            let held = std::mem::take(&mut f.held);
            held_before = f.held_since.take().map(|since| (held, since));
            f.window = now;
            f.shown = 0;
        }
        if f.shown < limit {
            f.shown += 1;
            (true, held_before)
        } else {
            f.held += 1;
            f.held_since.get_or_insert(wall);
            (false, held_before)
        }
    }
}

static FLOOD: std::sync::Mutex<Option<Flood>> = std::sync::Mutex::new(None);

/// [`Flood::admit`] now on the budget in `flood`: whether the line is shown, and how many lines
/// were held back before it and since when (RFC 3339), to be said first.
fn admit_now(flood: &std::sync::Mutex<Option<Flood>>, limit: u32) -> (bool, Option<(u64, String)>) {
    let (show, held) = Flood::admit(
        &mut flood.lock().unwrap_or_else(|p| p.into_inner()),
        limit,
        std::time::Instant::now(),
        std::time::SystemTime::now(),
    );
    let held = held.map(|(n, since)| {
        let since = chrono::DateTime::<chrono::Utc>::from(since)
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        (n, since)
    });
    (show, held)
}

/// At most this many shadow mismatch lines a second: a new service that differs on every
/// answer writes one per request otherwise (7 000 a second measured), which buries the log,
/// and a log reader that falls behind would then hold up the threads that write it.
pub const SHADOW_LINES_PER_SECOND: u32 = 10;

static SHADOW_FLOOD: std::sync::Mutex<Option<Flood>> = std::sync::Mutex::new(None);

/// Whether a shadow mismatch line is logged now. When a new second begins after lines were
/// held back, says first how many and since when.
pub fn shadow_mismatch_admitted() -> bool {
    let (show, held) = admit_now(&SHADOW_FLOOD, SHADOW_LINES_PER_SECOND);
    if let Some((held, since)) = held {
        log::warn!(
            target: "shadow",
            "{held} more shadow mismatch lines held back since {since}: {SHADOW_LINES_PER_SECOND} a second are logged; strangler_shadow_total counts every comparison"
        );
    }
    show
}

impl log::Log for Reclassified {
    fn enabled(&self, m: &log::Metadata) -> bool {
        self.0.enabled(m)
    }

    fn log(&self, r: &log::Record) {
        // Only Pingora's warnings and errors are looked at, each formatted once.
        if r.level() > log::Level::Warn
            || !r.target().starts_with("pingora")
            || !self.0.enabled(r.metadata())
        {
            return self.0.log(r);
        }
        let msg = r.args().to_string();
        let level = Self::level_of(r.target(), r.level(), &msg);
        // One of Pingora's per-request failure lines (a line given another level is not).
        if level.is_none()
            && r.target().starts_with("pingora_proxy")
            && msg.starts_with("Fail to proxy")
        {
            let (show, held) = admit_now(&FLOOD, FAILURE_LINES_PER_SECOND);
            if let Some((held, since)) = held {
                self.0.log(
                    &log::Record::builder()
                        .level(log::Level::Warn)
                        .target("strangler")
                        .args(format_args!(
                            "{held} more request failure lines (\"Fail to proxy\") held back since {since}: {FAILURE_LINES_PER_SECOND} a second are logged; strangler_requests_total counts every request"
                        ))
                        .build(),
                );
            }
            if !show {
                return;
            }
        }
        self.0.log(
            &log::Record::builder()
                .level(level.unwrap_or(r.level()))
                .target(r.target())
                .args(format_args!("{msg}"))
                .module_path(r.module_path())
                .file(r.file())
                .line(r.line())
                .key_values(r.key_values())
                .build(),
        );
    }

    fn flush(&self) {
        self.0.flush()
    }
}

/// An event's structured fields (`log::warn!(route = …, …; "…")`), in the order written.
struct Fields(Vec<(String, serde_json::Value)>);

impl<'kvs> log::kv::VisitSource<'kvs> for Fields {
    fn visit_pair(
        &mut self,
        key: log::kv::Key<'kvs>,
        value: log::kv::Value<'kvs>,
    ) -> Result<(), log::kv::Error> {
        let value = if let Some(b) = value.to_bool() {
            b.into()
        } else if let Some(i) = value.to_i64() {
            i.into()
        } else if let Some(u) = value.to_u64() {
            u.into()
        } else if let Some(f) = value.to_f64() {
            f.into()
        } else {
            value.to_string().into()
        };
        self.0.push((key.as_str().to_string(), value));
        Ok(())
    }
}

/// One JSON log line. An audit record is JSON already: its fields (`route`, `before`, `after`,
/// `reason`, `config_sha256`) go to the top level beside `ts`, `level` and `target`, so a log
/// pipeline reads them without parsing `msg` a second time. So do the structured fields of other
/// events (a shadow mismatch's `request_id`, `route`, `backend`, `pointer`, `primary`, `shadow`;
/// a failover's `request_id`, `route`, `from`, `to`; a pin's `route`, `reason`); they never
/// replace `ts`, `level`, `target` or `msg`.
fn json_line(
    ts: &str,
    level: &str,
    target: &str,
    msg: String,
    fields: Vec<(String, serde_json::Value)>,
) -> serde_json::Value {
    let mut line = serde_json::json!({ "ts": ts, "level": level, "target": target });
    let obj = line.as_object_mut().expect("an object");
    let record = (target == "audit")
        .then(|| serde_json::from_str::<serde_json::Value>(&msg).ok())
        .flatten();
    match record {
        Some(serde_json::Value::Object(fields)) => {
            let route = fields.get("route").and_then(|r| r.as_str()).unwrap_or("?");
            obj.insert(
                "msg".into(),
                format!("route {route:?}: who serves it changed").into(),
            );
            for (k, v) in fields {
                if k != "ts" {
                    obj.insert(k, v);
                }
            }
        }
        _ => {
            obj.insert("msg".into(), msg.into());
        }
    }
    for (k, v) in fields {
        if !obj.contains_key(&k) {
            obj.insert(k, v);
        }
    }
    line
}

/// The message with its control characters escaped (`\n`, `\r`, `\t`, `\u{1b}`, …): one event
/// stays one line even when it quotes a backend's body or lists several errors.
fn one_line(msg: String) -> String {
    if !msg.contains(char::is_control) {
        return msg;
    }
    let mut out = String::with_capacity(msg.len() + 8);
    for c in msg.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{json_line, one_line, Fields, Flood, Reclassified, FAILURE_LINES_PER_SECOND};

    #[test]
    fn pingora_s_routine_error_lines_are_not_errors() {
        let level = |target: &str, args: std::fmt::Arguments| {
            Reclassified::level_of(target, log::Level::Error, &args.to_string())
        };
        let wait = std::time::Duration::from_secs(1);
        assert_eq!(
            level(
                "pingora_core::server::transfer_fd",
                format_args!("No incoming socket transfer, sleep {wait:?} and try again")
            ),
            Some(log::Level::Info)
        );
        assert_eq!(
            level(
                "pingora_core::connectors",
                format_args!("failed to acquire reusable stream")
            ),
            Some(log::Level::Debug)
        );
        // Anything else, of those targets too, stays an error.
        assert_eq!(
            level(
                "pingora_core::server::transfer_fd",
                format_args!("Error accepting socket transfer: EBADF")
            ),
            None
        );
        let expired = crate::connection::HEADER_TIMED_OUT;
        assert_eq!(
            level(
                "pingora_proxy",
                format_args!("Fail to proxy: Downstream ReadError context: while reading request headers cause: {expired}, downstream session type: h1")
            ),
            Some(log::Level::Info)
        );
        assert_eq!(
            level(
                "pingora_proxy",
                format_args!("Fail to proxy: Upstream ConnectRefused context: …")
            ),
            None
        );
        assert_eq!(level("strangler::proxy", format_args!("failed")), None);
    }

    #[test]
    fn request_failure_lines_are_held_to_ten_a_second() {
        let (t0, wall) = (std::time::Instant::now(), std::time::SystemTime::now());
        let mut flood = None;
        let shown = (0..25)
            .filter(|_| Flood::admit(&mut flood, FAILURE_LINES_PER_SECOND, t0, wall).0)
            .count();
        assert_eq!(shown, FAILURE_LINES_PER_SECOND as usize);
        // The next second: shown again, and the 15 held back are said, with when they began.
        let t1 = t0 + std::time::Duration::from_millis(1000);
        let later = wall + std::time::Duration::from_secs(1);
        assert_eq!(
            Flood::admit(&mut flood, FAILURE_LINES_PER_SECOND, t1, later),
            (true, Some((15, wall)))
        );
        assert_eq!(
            Flood::admit(&mut flood, FAILURE_LINES_PER_SECOND, t1, later),
            (true, None)
        );
    }

    #[test]
    fn audit_records_are_top_level_fields_in_json_lines() {
        let record = r#"{"ts":"t0","route":"bookings","before":null,"after":{"backend":"new"},"reason":"file changed","config_sha256":"ab"}"#;
        let line = json_line("t1", "INFO", "audit", record.to_string(), Vec::new());
        assert_eq!(line["ts"], "t1");
        assert_eq!(line["route"], "bookings");
        assert_eq!(line["after"]["backend"], "new");
        assert_eq!(line["reason"], "file changed");
        assert_eq!(line["config_sha256"], "ab");
        assert!(line["before"].is_null() && line.get("before").is_some());
        // Other targets keep their message as it is, JSON-looking or not.
        let other = json_line(
            "t1",
            "INFO",
            "strangler::state",
            "{\"a\":1}".to_string(),
            Vec::new(),
        );
        assert_eq!(other["msg"], "{\"a\":1}");
    }

    #[test]
    fn structured_fields_are_top_level_in_json_lines() {
        let kvs = [
            ("route", "bookings"),
            ("pointer", "/a/0"),
            ("msg", "not this"),
        ];
        let record = log::Record::builder()
            .args(format_args!("m"))
            .key_values(&kvs)
            .build();
        let mut fields = Fields(Vec::new());
        record.key_values().visit(&mut fields).unwrap();
        let line = json_line("t1", "WARN", "shadow", "m".into(), fields.0);
        assert_eq!(line["route"], "bookings");
        assert_eq!(line["pointer"], "/a/0");
        assert_eq!(line["msg"], "m", "a field never replaces the message");
        assert_eq!(line["target"], "shadow");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(
            one_line("plain \"quoted\" text".into()),
            "plain \"quoted\" text"
        );
        assert_eq!(
            one_line("a\nb\r\tc\u{1b}[31m".into()),
            "a\\nb\\r\\tc\\u{1b}[31m"
        );
    }
}
