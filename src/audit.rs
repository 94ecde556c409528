//! The audit trail (SPEC §5): one structured line for every change of who serves what — a reload
//! that changes a route's backend, split or shadow (or what the route takes: its path, methods,
//! `exact`; or its split's sticky key), a pin, a resume. Logged on the `audit` target, and
//! appended as a JSON line to `--audit-log` when given.

use std::io::Write;
use std::path::PathBuf;

use parking_lot::Mutex;
use serde::Serialize;
use serde_json::json;

/// Who serves a route, as the audit trail records it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Serving {
    /// The route's `path` (`*` for the `default` pseudo-route).
    pub path: String,
    /// The methods it serves (`None`: every one) and whether only the path itself: what the
    /// route takes from `default` or another route.
    pub methods: Option<Vec<String>>,
    pub exact: bool,
    pub to: String,
    /// Where `to` is (its `url`): repointing a backend moves traffic too.
    pub to_url: String,
    /// The file's `default`: it serves the route's split-off, pinned and failed-over requests
    /// (and, for the `default` pseudo-route, every unmatched one).
    pub default: String,
    pub default_url: String,
    #[serde(serialize_with = "crate::split::serialize_percent")]
    pub split: Option<f64>,
    /// The split's sticky key (`ip`, `header:NAME`, `cookie:NAME`): another key moves clients.
    pub sticky: Option<String>,
    pub shadow: Option<String>,
    pub shadow_url: Option<String>,
    pub state: &'static str,
}

/// The audit sink.
#[derive(Debug, Default)]
pub struct Audit {
    file: Option<(PathBuf, Mutex<Option<std::fs::File>>)>,
}

impl Audit {
    pub fn new(path: Option<PathBuf>) -> Self {
        Audit {
            file: path.map(|p| (p, Mutex::new(None))),
        }
    }

    /// As [`Audit::new`], the file opened (created, appended to) now: a path that cannot take
    /// the trail is a start-up error, not an error at the first pin, days later, mid-incident.
    pub fn open(path: Option<PathBuf>) -> Result<Self, String> {
        let audit = Audit::new(path);
        if let Some((path, file)) = &audit.file {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--audit-log {}: {e}", path.display()))?;
            *file.lock() = Some(f);
        }
        Ok(audit)
    }

    /// Records one change.
    pub fn record(
        &self,
        route: &str,
        before: Option<&Serving>,
        after: Option<&Serving>,
        reason: &str,
        config_sha256: &str,
    ) {
        let ts = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        let entry = json!({
            "ts": ts,
            "route": route,
            "before": before,
            "after": after,
            "reason": reason,
            "config_sha256": config_sha256,
        });
        log::info!(target: "audit", "{entry}");
        if let Some((path, file)) = &self.file {
            let mut guard = file.lock();
            // Rotated away (logrotate renames the file, then the trail goes on at `path`, as
            // for any log a daemon keeps open), or removed: written to a new file at `path`.
            if guard.as_ref().is_some_and(|f| !is_at(f, path)) {
                *guard = None;
            }
            if guard.is_none() {
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                {
                    Ok(f) => *guard = Some(f),
                    Err(e) => {
                        log::error!("cannot open audit log {}: {e}", path.display());
                        return;
                    }
                }
            }
            if let Some(f) = guard.as_mut() {
                // One write per line: a reader never sees half an entry.
                let line = format!("{entry}\n");
                if let Err(e) = f.write_all(line.as_bytes()) {
                    log::error!("cannot append to audit log {}: {e}", path.display());
                    *guard = None;
                }
            }
        }
    }
}

/// Whether `path` names the file open as `f` (the same inode on the same device).
fn is_at(f: &std::fs::File, path: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (f.metadata(), std::fs::metadata(path)) {
        (Ok(open), Ok(named)) => (open.dev(), open.ino()) == (named.dev(), named.ino()),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// After logrotate renames the trail (no `copytruncate`), the next line starts a new file
    /// at the configured path; the rotated file keeps what it had.
    #[test]
    fn a_rotated_trail_goes_on_in_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let audit = Audit::open(Some(path.clone())).unwrap();
        audit.record("a", None, None, "first", "sha");
        let rotated = dir.path().join("audit.jsonl.1");
        std::fs::rename(&path, &rotated).unwrap();
        audit.record("b", None, None, "second", "sha");
        let lines = |p: &std::path::Path| std::fs::read_to_string(p).unwrap().lines().count();
        assert_eq!((lines(&rotated), lines(&path)), (1, 1));
        // And a removed trail is created again.
        std::fs::remove_file(&path).unwrap();
        audit.record("c", None, None, "third", "sha");
        assert_eq!(lines(&path), 1);
    }
}
