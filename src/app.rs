//! Wiring: load the config, build the runtime, bind listeners, start the admin API, the idle
//! reaper and the reload triggers, then wait for a signal and drain.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use arc_swap::ArcSwap;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Admin};
use crate::config::{self, Config};
use crate::listener::{self, Serve};
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::runtime::{self, Shared};

/// How often the config file's content is compared with what is running, as a safety net
/// for file systems and mounts that emit no change events.
const POLL_INTERVAL: Duration = Duration::from_secs(2);

/// Loads the config or returns the formatted list of every error in it.
pub fn load_config(path: &Path) -> Result<Config, String> {
    config::load(path).map_err(|errs| config::format_errors(path, &errs))
}

/// Runs the proxy until SIGTERM/SIGINT. Builds its own tokio runtime with `workers` threads.
pub fn run(path: PathBuf) -> anyhow::Result<()> {
    let config = load_config(&path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    let workers = config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers.max(1))
        .thread_name("fpmgate-worker")
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(path, config))
}

struct Reloader {
    path: PathBuf,
    shared: Shared,
    metrics: Arc<Metrics>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    last_hash: std::sync::Mutex<u64>,
}

fn unix_now() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn content_hash(path: &Path) -> Option<u64> {
    std::fs::read(path)
        .ok()
        .map(|b| crate::pool::balance::hash_bytes(&b))
}

impl Reloader {
    /// Parses and compiles the file beside the running runtime; stores it only if valid.
    fn reload(&self, why: &str) -> bool {
        let hash = content_hash(&self.path);
        match load_config(&self.path) {
            Ok(cfg) => {
                let old = self.shared.load_full();
                if cfg
                    .listeners
                    .iter()
                    .map(|l| (l.bind, l.tls.len()))
                    .collect::<Vec<_>>()
                    != old
                        .config
                        .listeners
                        .iter()
                        .map(|l| (l.bind, l.tls.len()))
                        .collect::<Vec<_>>()
                {
                    tracing::warn!("listener changes take effect at the next restart; other changes are applied");
                }
                let generation = old.generation + 1;
                let new = runtime::build(cfg, Some(&old), &self.metrics, generation);
                self.shared.store(Arc::new(new));
                self.metrics
                    .config_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.metrics.config_last_success.set(unix_now());
                self.metrics.config_last_successful.set(1);
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
                if let Some(h) = hash {
                    *self.last_hash.lock().unwrap_or_else(|e| e.into_inner()) = h;
                }
                tracing::info!(generation, trigger = why, "config reloaded");
                true
            }
            Err(errors) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                self.metrics.config_last_successful.set(0);
                if let Some(h) = hash {
                    // Do not retry the same broken content every poll.
                    *self.last_hash.lock().unwrap_or_else(|e| e.into_inner()) = h;
                }
                tracing::warn!(
                    trigger = why,
                    "config reload rejected, the running config keeps serving:\n{errors}"
                );
                *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(errors);
                false
            }
        }
    }

    fn changed_on_disk(&self) -> bool {
        match content_hash(&self.path) {
            Some(h) => h != *self.last_hash.lock().unwrap_or_else(|e| e.into_inner()),
            None => false,
        }
    }
}

async fn serve(path: PathBuf, config: Config) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let initial_hash = content_hash(&path).unwrap_or(0);
    let grace = config.shutdown_grace;
    let max_conns = config.limits.max_connections;
    let listeners = config.listeners.clone();
    let admin_cfg = config.admin.clone();
    let shared: Shared = Arc::new(ArcSwap::from_pointee(runtime::build(
        config, None, &metrics, 1,
    )));
    metrics.config_last_success.set(unix_now());
    metrics.config_last_successful.set(1);

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let proxy = Arc::new(Proxy::new(shared.clone(), metrics.clone()));
    let serve = Serve {
        proxy,
        metrics: metrics.clone(),
        conn_limit: Arc::new(Semaphore::new(max_conns.max(1))),
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    };

    let mut accept_tasks = Vec::new();
    for l in &listeners {
        if !l.tls.is_empty() {
            anyhow::bail!(
                "listener {}: TLS listeners are not supported by this build yet",
                l.bind
            );
        }
        let sock = listener::bind(l.bind).with_context(|| format!("binding {}", l.bind))?;
        let addr = sock.local_addr()?;
        tracing::info!("listening addr={addr} kind=http");
        accept_tasks.push(tokio::spawn(listener::accept_loop(
            sock,
            "http",
            serve.clone(),
        )));
    }

    let last_error = Arc::new(std::sync::Mutex::new(None));
    if let Some(a) = &admin_cfg {
        let sock = listener::bind(a.bind).with_context(|| format!("binding admin {}", a.bind))?;
        let addr = sock.local_addr()?;
        tracing::info!("listening addr={addr} kind=admin");
        let admin = Admin {
            shared: shared.clone(),
            metrics: metrics.clone(),
            last_error: last_error.clone(),
        };
        tokio::spawn(admin::serve(sock, admin, shutdown.clone()));
    }

    // Idle FastCGI connections past their idle timeout stop pinning FPM workers.
    {
        let shared = shared.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => runtime::reap_idle(&shared.load()),
                }
            }
        });
    }

    let reloader = Arc::new(Reloader {
        path: path.clone(),
        shared: shared.clone(),
        metrics: metrics.clone(),
        last_error,
        last_hash: std::sync::Mutex::new(initial_hash),
    });
    {
        let reloader = reloader.clone();
        let token = shutdown.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(POLL_INTERVAL);
            loop {
                tokio::select! {
                    _ = token.cancelled() => return,
                    _ = tick.tick() => {
                        if reloader.changed_on_disk() {
                            let r = reloader.clone();
                            let _ = tokio::task::spawn_blocking(move || r.reload("file changed")).await;
                        }
                    }
                }
            }
        });
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tracing::info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "fpmgate started");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                let r = reloader.clone();
                let _ = tokio::task::spawn_blocking(move || r.reload("SIGHUP")).await;
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    shutdown.cancel();
    for t in accept_tasks {
        let _ = t.await;
    }
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        tracing::warn!("shutdown grace elapsed with requests still in flight; closing them");
    }
    // Close kept FastCGI connections so FPM workers are free at once.
    for pool in &shared.load().pools {
        for ep in &pool.endpoints {
            ep.reap_idle(true);
        }
    }
    tracing::info!("stopped");
    Ok(())
}
