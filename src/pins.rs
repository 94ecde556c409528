//! Pins (SPEC §5): a route held on `default`, by hand or by the automatic rollback, and the
//! state file that keeps pins across restarts. The file is written whole, to a temporary file
//! then renamed over the old one, so a crash never leaves half a file; a file that cannot be
//! written or read is logged and counted, never fatal: the pin holds in memory regardless.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::metrics;

/// Set when this process has handed its listeners to a new one (`run --upgrade`, then SIGQUIT
/// here). The new process read the state file at its start and owns it from then on: what this
/// one still pins (an automatic rollback while it finishes its last requests) must not overwrite
/// the new process's pins, and the admin API refuses changes (they would never reach the
/// process that now serves).
static HANDED_OVER: AtomicBool = AtomicBool::new(false);

/// Held while the state file is written, and while [`hand_over`] sets its flag: a write under
/// way when the hand-over begins is finished first (the new process reads the file once it has
/// the listeners); one that starts after it is refused.
static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// This process no longer owns the state file (see [`HANDED_OVER`]).
pub fn hand_over() {
    let _saving = SAVING.lock().unwrap_or_else(|e| e.into_inner());
    HANDED_OVER.store(true, Ordering::Release);
}

/// Whether this process has handed over to a new one.
pub fn handed_over() -> bool {
    HANDED_OVER.load(Ordering::Acquire)
}

/// Why a route is pinned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PinReason {
    Auto,
    Manual,
}

impl PinReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PinReason::Auto => "auto",
            PinReason::Manual => "manual",
        }
    }
}

/// A pin: the route is served by `default` until resumed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pin {
    pub reason: PinReason,
    /// RFC 3339, UTC. A state file whose `since` is anything else is corrupt, as one with an
    /// unknown `reason` is: `GET /routes` never shows a value the SPEC does not allow.
    #[serde(deserialize_with = "rfc3339")]
    pub since: String,
}

fn rfc3339<'de, D: serde::Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let s = String::deserialize(d)?;
    match chrono::DateTime::parse_from_rfc3339(&s) {
        Ok(_) => Ok(s),
        Err(e) => Err(serde::de::Error::custom(format!(
            "since: {s:?} is not an RFC 3339 time ({e})"
        ))),
    }
}

impl Pin {
    pub fn now(reason: PinReason) -> Pin {
        let since: chrono::DateTime<chrono::Utc> = SystemTime::now().into();
        Pin {
            reason,
            since: since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct StateDoc {
    version: u32,
    pins: BTreeMap<String, Pin>,
}

/// The state file beside routing.yaml (or where `--state` says).
#[derive(Debug, Clone)]
pub struct StateFile {
    path: PathBuf,
}

impl StateFile {
    pub fn new(path: PathBuf) -> Self {
        StateFile { path }
    }

    /// The default location: `.strangler-state.json` in routing.yaml's directory.
    pub fn beside(config: &Path) -> PathBuf {
        config
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join(".strangler-state.json")
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Why pins could not be saved where the file is to go, if its directory is missing: said
    /// at start-up rather than at the first pin, mid-incident. (Pins hold in memory either way.)
    pub fn missing_dir(&self) -> Option<String> {
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        (!dir.is_dir()).then(|| {
            format!(
                "state file {}: directory {} does not exist: pins will hold in memory only, and not across a restart, until it does",
                self.path.display(),
                dir.display()
            )
        })
    }

    /// The pins on disk. A missing file is no pins; a corrupt one is logged and ignored, and
    /// so is a pin entry that cannot be read (the others hold). What was corrupt is copied to
    /// `PATH.corrupt` first: the next pin or resume rewrites the file from memory.
    pub fn load(&self) -> BTreeMap<String, Pin> {
        self.read(true).unwrap_or_default()
    }

    /// As [`StateFile::load`], leaving no copy behind (`strangler check` only reads).
    pub fn peek(&self) -> BTreeMap<String, Pin> {
        self.read(false).unwrap_or_default()
    }

    /// As [`StateFile::load`], but `None` (logged) for a file that cannot be read or parsed,
    /// rather than no pins: the pins read before stay (a hand-over reads the file again).
    pub fn reload(&self) -> Option<BTreeMap<String, Pin>> {
        self.read(true)
    }

    /// The pins on disk; `None` for a file that exists but cannot be read or parsed.
    fn read(&self, set_aside: bool) -> Option<BTreeMap<String, Pin>> {
        /// The file with each pin left unread, so that one bad entry costs only itself.
        #[derive(Deserialize)]
        struct RawDoc {
            #[allow(dead_code)]
            version: u32,
            pins: BTreeMap<String, serde_json::Value>,
        }
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Some(BTreeMap::new()),
            Err(e) => {
                metrics::STATE_FILE_READ_ERRORS.inc();
                log::error!(
                    "cannot read state file {}, ignoring it: {e}",
                    self.path.display()
                );
                return None;
            }
        };
        let raw = match serde_json::from_slice::<RawDoc>(&bytes) {
            Ok(raw) => raw,
            Err(e) => {
                self.corrupt(&bytes, set_aside, &format!("{e}; pins start empty"));
                return None;
            }
        };
        let mut pins = BTreeMap::new();
        let mut bad = Vec::new();
        for (route, value) in raw.pins {
            match serde_json::from_value::<Pin>(value) {
                Ok(pin) => {
                    pins.insert(route, pin);
                }
                Err(e) => bad.push(format!("{route:?} ({e})")),
            }
        }
        if !bad.is_empty() {
            let what = format!(
                "the pins of {} cannot be read and are ignored, the {} others hold",
                bad.join(", "),
                pins.len()
            );
            self.corrupt(&bytes, set_aside, &what);
        }
        Some(pins)
    }

    /// Logs and counts a corrupt file, copied aside first if `set_aside`.
    fn corrupt(&self, bytes: &[u8], set_aside: bool, what: &str) {
        metrics::STATE_FILE_READ_ERRORS.inc();
        let mut aside = self.path.clone().into_os_string();
        aside.push(".corrupt");
        let aside = PathBuf::from(aside);
        let kept = if !set_aside {
            String::new()
        } else {
            match std::fs::write(&aside, bytes) {
                Ok(()) => format!(" (a copy is kept as {})", aside.display()),
                Err(e) => format!(" (no copy kept: {}: {e})", aside.display()),
            }
        };
        log::error!(
            "state file {} is corrupt{kept}: {what}",
            self.path.display()
        );
    }

    /// Writes `pins` atomically. Failure is logged and counted; the caller keeps its pins.
    /// After a hand-over the file is the new process's: nothing is written.
    pub fn save(&self, pins: &BTreeMap<String, Pin>) -> bool {
        let _saving = SAVING.lock().unwrap_or_else(|e| e.into_inner());
        if handed_over() {
            log::warn!(
                "state file {} not written: this process has handed over to a new one, which owns it",
                self.path.display()
            );
            return false;
        }
        match self.try_save(pins) {
            Ok(()) => true,
            Err(e) => {
                metrics::STATE_FILE_ERRORS.inc();
                log::error!(
                    "cannot write state file {} (pins hold in memory; tried again until it is written): {e}",
                    self.path.display()
                );
                false
            }
        }
    }

    fn try_save(&self, pins: &BTreeMap<String, Pin>) -> std::io::Result<()> {
        let doc = StateDoc {
            version: 1,
            pins: pins.clone(),
        };
        let bytes = serde_json::to_vec_pretty(&doc)?;
        let dir = self
            .path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "state".into());
        // Unique to this write: two processes sharing the file (containers on one volume, all
        // PID 1) never write into one temporary file.
        let tmp = dir.join(format!(
            ".{name}.tmp.{}.{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        let result = (|| {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&tmp)?;
            f.write_all(&bytes)?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            // The rename is durable once the directory is: a pin survives a power cut too.
            // Best effort: not every file system lets a directory be opened and synced.
            if let Ok(d) = std::fs::File::open(dir) {
                let _ = d.sync_all();
            }
            Ok(())
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let file = StateFile::new(dir.path().join("s.json"));
        assert!(file.load().is_empty(), "missing file: no pins");
        let mut pins = BTreeMap::new();
        pins.insert("bookings".to_string(), Pin::now(PinReason::Manual));
        assert!(file.save(&pins));
        assert_eq!(file.load(), pins);
        std::fs::write(file.path(), b"{not json").unwrap();
        assert!(file.load().is_empty(), "corrupt file: ignored");
        let aside = dir.path().join("s.json.corrupt");
        assert_eq!(
            std::fs::read(&aside).unwrap(),
            b"{not json",
            "and kept aside"
        );
        for since in ["yesterday", "2026-13-45T99:00:00Z", ""] {
            let doc = format!(
                r#"{{"version":1,"pins":{{"b":{{"reason":"manual","since":"{since}"}}}}}}"#
            );
            std::fs::write(file.path(), doc).unwrap();
            assert!(file.load().is_empty(), "since {since:?}: corrupt, ignored");
        }
        let doc =
            r#"{"version":1,"pins":{"b":{"reason":"auto","since":"2026-11-21T10:00:00+01:00"}}}"#;
        std::fs::write(file.path(), doc).unwrap();
        assert_eq!(file.load()["b"].since, "2026-11-21T10:00:00+01:00");
        // One unreadable pin costs only itself.
        let doc = r#"{"version":1,"pins":{"a":{"reason":"manual","since":"2026-11-21T10:00:00Z"},"b":{"reason":"manual"},"c":7}}"#;
        std::fs::write(file.path(), doc).unwrap();
        std::fs::remove_file(&aside).unwrap();
        let pins = file.peek();
        assert_eq!(pins.keys().collect::<Vec<_>>(), ["a"]);
        assert!(!aside.exists(), "peek leaves no copy");
        assert_eq!(file.load(), pins);
        assert_eq!(std::fs::read(&aside).unwrap(), doc.as_bytes());
        let unwritable = StateFile::new(dir.path().join("no/such/dir/s.json"));
        assert!(unwritable
            .missing_dir()
            .is_some_and(|w| w.contains("does not exist")));
        assert_eq!(
            StateFile::new(dir.path().join("s.json")).missing_dir(),
            None
        );
        assert!(!unwritable.save(&pins));
    }

    #[test]
    fn default_location_is_beside_the_config() {
        assert_eq!(
            StateFile::beside(Path::new("/etc/strangler/routing.yaml")),
            PathBuf::from("/etc/strangler/.strangler-state.json")
        );
        assert_eq!(
            StateFile::beside(Path::new("routing.yaml")),
            PathBuf::from("./.strangler-state.json")
        );
    }
}
