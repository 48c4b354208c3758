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
use crate::dns::DnsCache;
use crate::listener::{self, Serve};
use crate::listeners::ListenerSet;
use crate::metrics::Metrics;
use crate::proxy::Proxy;
use crate::reload::{unix_now, Reloader};
use crate::runtime::{self, Shared};
use crate::tls;

/// Loads the config or returns the formatted list of every error in it. Certificates are
/// checked as part of it (readable, parseable, each key matching its certificate), so
/// their errors come with the others, at their lines.
pub fn load_config(path: &Path) -> Result<Config, String> {
    config::load_checking(path, Some(tls::check_pair))
        .map_err(|errs| config::format_errors(path, &errs))
}

/// Warnings about a valid config: certificates past their validity (served all the same;
/// see [`tls::CertSet::load`]).
pub fn config_warnings(cfg: &Config) -> Vec<String> {
    let mut out = Vec::new();
    for l in &cfg.listeners {
        if let Ok(set) = tls::CertSet::load(&l.tls) {
            for line in set.expired() {
                out.push(format!("listener {}: certificate {line}", l.bind));
            }
        }
    }
    out
}

/// Runs the proxy until SIGTERM/SIGINT. Builds its own tokio runtime with `workers` threads.
pub fn run(path: PathBuf) -> anyhow::Result<()> {
    tls::install_provider();
    let config = load_config(&path).map_err(|e| anyhow::anyhow!("invalid config:\n{e}"))?;
    let workers = config.workers.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    // One worker: a current-thread runtime does the same work without the work-stealing
    // scheduler's cross-thread bookkeeping.
    let mut builder = if workers <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let rt = builder
        .thread_name("fpmgate-worker")
        .on_thread_park(crate::memory::before_idle)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(serve(path, config))
}

async fn serve(path: PathBuf, config: Config) -> anyhow::Result<()> {
    // Handlers first: once a listener is announced, a SIGHUP must reload, not kill.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let metrics = Arc::new(Metrics::new());
    let max_conns = config.limits.max_connections;
    let listeners = config.listeners.clone();
    let admin_cfg = config.admin.clone();
    // `dns:` names are resolved before the first runtime (within `dns.timeout`), so their
    // pools start with endpoints; one that fails starts empty and fills when it resolves.
    let dns_cache = DnsCache::default();
    crate::dns::resolve_missing(&config, &metrics, &dns_cache).await;
    let shared: Shared = Arc::new(ArcSwap::from_pointee(runtime::build(
        config,
        None,
        &metrics,
        1,
        &dns_cache.lock(),
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

    let listener_set = Arc::new(ListenerSet::new(serve.clone()));
    let prepared = listener_set
        .prepare(&listeners)
        .map_err(|e| anyhow::anyhow!(e))?;
    listener_set.commit(prepared);

    let last_error = Arc::new(std::sync::Mutex::new(None));
    let reloader = Arc::new(Reloader::new(
        path.clone(),
        shared.clone(),
        metrics.clone(),
        last_error.clone(),
        listener_set.clone(),
        dns_cache.clone(),
    ));
    if let Some(a) = &admin_cfg {
        let sock = listener::bind(a.bind).with_context(|| format!("binding admin {}", a.bind))?;
        let addr = sock.local_addr()?;
        tracing::info!("listening addr={addr} kind=admin");
        let admin = Admin {
            shared: shared.clone(),
            metrics: metrics.clone(),
            last_error: last_error.clone(),
            reload: Some({
                let r = reloader.clone();
                Arc::new(move || r.reload("admin POST /reload"))
            }),
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

    tokio::spawn(crate::reload::watch(reloader.clone(), shutdown.clone()));
    tokio::spawn(crate::memory::trim_after_parking(shutdown.clone()));
    tokio::spawn(crate::dns::discover(
        shared.clone(),
        metrics.clone(),
        dns_cache,
        shutdown.clone(),
    ));

    tracing::info!(config = %path.display(), version = env!("CARGO_PKG_VERSION"), "fpmgate started");
    loop {
        tokio::select! {
            _ = hup.recv() => {
                // Not awaited here: a slow reload (DNS answers, certificate files) must not
                // hold up a SIGTERM. Reloads run one at a time (`Reloader::reload`).
                let r = reloader.clone();
                drop(tokio::task::spawn_blocking(move || r.reload("SIGHUP")));
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    // The grace of the config in force now: a reload may have changed it.
    let grace = shared.load().config.shutdown_grace;
    tracing::info!(
        grace_secs = grace.as_secs_f64(),
        "shutting down: draining in-flight requests"
    );
    shutdown.cancel();
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
