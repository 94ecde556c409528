//! Hot reload (SPEC §6) as a Pingora background service: watches routing.yaml's directory
//! (editors that save by rename, in-place writes, Kubernetes ConfigMaps that swap a `..data`
//! symlink), takes SIGHUP, debounces bursts, and reloads only when the file's bytes changed.
//! The reload itself — build, validate, one atomic swap — is `State::reload`.
//!
//! The watcher watches the directory, not the file: a rename or symlink swap replaces the
//! file's inode, and a watch on the old inode would go silent. A slow poll backs the watcher up
//! on filesystems where inotify sees nothing (NFS, some overlay mounts).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use notify::{RecursiveMode, Watcher};
use pingora_core::server::ShutdownWatch;
use pingora_core::services::background::BackgroundService;
use tokio::sync::mpsc;

use crate::config::sha256_hex;
use crate::state::State;

/// Events closer together than this are one change (an editor writes, renames, chmods).
const DEBOUNCE: Duration = Duration::from_millis(25);
/// The fallback poll.
const POLL: Duration = Duration::from_secs(1);

/// The reloader service.
pub struct Reloader {
    pub state: Arc<State>,
}

#[derive(Debug)]
enum Trigger {
    File,
    Signal,
}

fn file_digest(path: &Path) -> Option<String> {
    std::fs::read(path).ok().map(|b| sha256_hex(&b))
}

#[async_trait]
impl BackgroundService for Reloader {
    /// Runs until shutdown: waits for a file event, SIGHUP or the poll tick, then reloads if the
    /// bytes differ from the table in force (SIGHUP always reloads).
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let config: PathBuf = self.state.config_path().to_path_buf();
        let (tx, mut rx) = mpsc::unbounded_channel::<Trigger>();

        // The watcher runs its own thread; it only pokes the channel.
        let dir = config
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let file_tx = tx.clone();
        let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = file_tx.send(Trigger::File);
            }
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|_| w));
        let _watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                log::warn!(
                    "cannot watch {} ({e}); relying on a {}s poll and SIGHUP",
                    dir.display(),
                    POLL.as_secs()
                );
                None
            }
        };

        let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(s) => Some(s),
            Err(e) => {
                log::warn!("cannot listen for SIGHUP: {e}");
                None
            }
        };
        let mut poll = tokio::time::interval(POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        let mut last_tried: Option<String> = None;
        loop {
            let trigger = tokio::select! {
                // Shutdown is the only way out: the watcher and the signal stream end with us.
                _ = shutdown.changed() => return,
                Some(t) = rx.recv() => t,
                Some(_) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => Trigger::Signal,
                _ = poll.tick() => Trigger::File,
            };
            // Let the burst settle, then drain whatever else it queued.
            tokio::time::sleep(DEBOUNCE).await;
            let mut signal = matches!(trigger, Trigger::Signal);
            while let Ok(t) = rx.try_recv() {
                signal |= matches!(t, Trigger::Signal);
            }
            let state = self.state.clone();
            let config = config.clone();
            let tried = last_tried.clone();
            // File reads, parsing and DNS run off the proxy's worker threads.
            last_tried = tokio::task::spawn_blocking(move || {
                if signal {
                    let _ = state.reload("SIGHUP");
                    return file_digest(&config);
                }
                let on_disk = file_digest(&config)?;
                if on_disk == state.snapshot().table.sha256 {
                    // The table in force is the file on disk (a rejected edit may have been
                    // reverted): nothing to load, and the file is valid again.
                    crate::metrics::CONFIG_VALID.set(1);
                } else if tried.as_deref() != Some(on_disk.as_str()) {
                    // Each version of the file is tried once: a bad edit is reported once,
                    // not at every poll.
                    let _ = state.reload("file changed");
                }
                Some(on_disk)
            })
            .await
            .unwrap_or(None);
        }
    }
}
