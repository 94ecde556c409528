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
                writeln!(buf, "{ts} {:5} {}: {}", r.level(), r.target(), r.args())
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
