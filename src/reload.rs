//! Applying a new config while serving: parse and compile it (certificates included) beside
//! the running runtime, then swap it in with one store. A config that fails anywhere is
//! rejected whole: logged with its line numbers, counted, shown in `/status`, and the old
//! runtime keeps serving.
//!
//! Triggers (SIGHUP, the file changing on disk) live in the app; this module only decides
//! whether what is on disk differs from what runs, and applies it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use std::time::Duration;

use notify::Watcher as _;
use tokio_util::sync::CancellationToken;

use crate::app::load_config;
use crate::config::Config;
use crate::dns::DnsCache;
use crate::listeners::ListenerSet;
use crate::metrics::Metrics;
use crate::runtime::{self, Shared};

/// Seconds since the Unix epoch, for the last-success gauge.
pub fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A hash over the config file and every certificate and key it names. Editors, ConfigMap
/// symlink swaps and certificate renewals all change one of these, whatever the file events
/// said (or did not say, on NFS).
fn fingerprint(path: &Path, cfg: Option<&Config>) -> Option<u64> {
    let mut h = crate::pool::balance::hash_bytes(&std::fs::read(path).ok()?);
    if let Some(cfg) = cfg {
        for l in &cfg.listeners {
            for t in &l.tls {
                for f in [&t.cert, &t.key] {
                    let bytes = std::fs::read(f).unwrap_or_default();
                    h = crate::pool::balance::mix(h ^ crate::pool::balance::hash_bytes(&bytes));
                }
            }
        }
    }
    Some(h)
}

/// How often the files are compared with what runs even without change events (NFS and
/// some overlay mounts emit none).
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Events come in bursts (an editor's write + rename, a ConfigMap's symlink dance): wait
/// this long after the first before looking.
const DEBOUNCE: Duration = Duration::from_millis(150);

/// Watches the directories holding the config file and its certificates, and polls, then
/// reloads when their content changed. Directories, not files: editors and Kubernetes
/// replace files by rename, which a watch on the file itself would lose.
pub async fn watch(reloader: Arc<Reloader>, token: CancellationToken) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        // Reads (ours included: every check reads the files) are not changes; reacting to
        // them would re-read the files forever.
        if res.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_))) {
            let _ = tx.send(());
        }
    });
    // Kept alive for the life of this task; dropping it stops the events.
    let _watcher = match watcher {
        Ok(mut w) => {
            for dir in reloader.watched_dirs() {
                if let Err(e) = w.watch(&dir, notify::RecursiveMode::NonRecursive) {
                    tracing::warn!(dir = %dir.display(), "cannot watch for config changes ({e}); polling only");
                }
            }
            Some(w)
        }
        Err(e) => {
            tracing::warn!(
                "file watching unavailable ({e}); polling the config every {POLL_INTERVAL:?}"
            );
            None
        }
    };
    let mut tick = tokio::time::interval(POLL_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = token.cancelled() => return,
            _ = tick.tick() => {}
            Some(()) = rx.recv() => {
                tokio::time::sleep(DEBOUNCE).await;
                while rx.try_recv().is_ok() {}
            }
        }
        if reloader.changed_on_disk() {
            let r = reloader.clone();
            let _ = tokio::task::spawn_blocking(move || r.reload("file changed")).await;
        }
    }
}

/// Reloads the config on demand.
pub struct Reloader {
    path: PathBuf,
    shared: Shared,
    metrics: Arc<Metrics>,
    last_error: Arc<Mutex<Option<String>>>,
    last_hash: Mutex<u64>,
    listeners: Arc<ListenerSet>,
    dns: DnsCache,
    /// Held through a reload: the file watcher, SIGHUP and `POST /reload` often fire for
    /// one change together ("write the file, then reload"), and two reloads at once would
    /// both bind a new listener's address (one failing, a false "rejected" alarm) or
    /// interleave their listener changes.
    serial: Mutex<()>,
}

impl Reloader {
    /// A reloader for the running runtime; `listeners` are the running client listeners,
    /// `dns` the cache of `dns:` endpoint answers.
    pub fn new(
        path: PathBuf,
        shared: Shared,
        metrics: Arc<Metrics>,
        last_error: Arc<Mutex<Option<String>>>,
        listeners: Arc<ListenerSet>,
        dns: DnsCache,
    ) -> Reloader {
        let hash = fingerprint(&path, Some(&shared.load().config)).unwrap_or(0);
        Reloader {
            path,
            shared,
            metrics,
            last_error,
            last_hash: Mutex::new(hash),
            listeners,
            dns,
            serial: Mutex::new(()),
        }
    }

    fn set_hash(&self, h: Option<u64>) {
        if let Some(h) = h {
            *self.last_hash.lock().unwrap_or_else(|e| e.into_inner()) = h;
        }
    }

    /// The directories to watch: the config file's (as given, not resolved: a ConfigMap's
    /// `..data` symlink swap happens there) and each certificate's.
    pub fn watched_dirs(&self) -> Vec<PathBuf> {
        let mut dirs = Vec::new();
        let parent = |p: &Path| match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        dirs.push(parent(&self.path));
        for l in &self.shared.load().config.listeners {
            for t in &l.tls {
                dirs.push(parent(&t.cert));
                dirs.push(parent(&t.key));
            }
        }
        dirs.sort();
        dirs.dedup();
        dirs
    }

    /// True when the file (or a certificate it names) differs from what was last applied or
    /// rejected.
    pub fn changed_on_disk(&self) -> bool {
        let cfg = self.shared.load();
        match fingerprint(&self.path, Some(&cfg.config)) {
            Some(h) => h != *self.last_hash.lock().unwrap_or_else(|e| e.into_inner()),
            None => false,
        }
    }

    /// Parses, compiles and applies the file. Returns whether the new config is running.
    pub fn reload(&self, why: &str) -> bool {
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        match load_config(&self.path) {
            Ok(mut cfg) => {
                let hash = fingerprint(&self.path, Some(&cfg));
                if cfg.admin.is_none() {
                    // The admin listener runs on until a restart: it keeps the last token
                    // it had (a reload may have rotated a leaked one away), and is never
                    // left open to anyone by the section's removal.
                    if let Some(running) = self.shared.load().config.admin.clone() {
                        tracing::warn!(bind = %running.bind, "admin: removed from the config; the admin listener runs until the next restart, with its last token");
                        cfg.admin = Some(running);
                    }
                }
                // New sockets are bound and every certificate loaded before anything
                // changes; a bind that fails rejects the whole reload.
                let prepared = match self.listeners.prepare(&cfg.listeners) {
                    Ok(p) => p,
                    Err(e) => return self.reject(why, e, hash),
                };
                // New `dns:` names are resolved first, so their pools start with endpoints.
                crate::dns::resolve_missing_blocking(&cfg, &self.metrics, &self.dns);
                let generation =
                    runtime::rebuild(&self.shared, cfg, &self.metrics, &mut self.dns.lock());
                self.listeners.commit(prepared);
                self.metrics
                    .config_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.metrics.config_last_success.set(unix_now());
                self.metrics.config_last_successful.set(1);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                self.set_hash(hash);
                tracing::info!(generation, trigger = why, "config reloaded");
                true
            }
            Err(errors) => {
                let hash = fingerprint(&self.path, Some(&self.shared.load().config));
                self.reject(why, errors, hash)
            }
        }
    }

    fn reject(&self, why: &str, errors: String, hash: Option<u64>) -> bool {
        self.metrics
            .config_reloads
            .with_label_values(&["failure"])
            .inc();
        self.metrics.config_last_successful.set(0);
        // Remember the broken content so the poll does not retry it every tick.
        self.set_hash(hash);
        tracing::warn!(
            trigger = why,
            "config reload rejected; the running config keeps serving:\n{errors}"
        );
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(errors);
        false
    }
}
