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
/// are kept at warn unless `RUST_LOG` says otherwise.
pub fn init(format: LogFormat) {
    let mut b = env_logger::Builder::new();
    b.parse_filters("info,pingora_core=warn,pingora_proxy=warn,pingora=warn");
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
                let line = serde_json::json!({
                    "ts": ts,
                    "level": r.level().as_str(),
                    "target": r.target(),
                    "msg": r.args().to_string(),
                });
                writeln!(buf, "{line}")
            });
        }
    }
    let _ = b.try_init();
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
    use super::one_line;

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
