//! The live, ready-to-serve form of a config: router, vhosts and pools with their endpoints.
//! A reload builds a new [`Runtime`] beside the running one and swaps it in with one store;
//! every request takes one snapshot at its start and keeps it to its end.
//!
//! State carries over by name: a pool whose definition did not change is kept whole (queue,
//! in-flight counts); an endpoint whose pool and address did not change keeps its health,
//! counters and idle connections even when the pool around it is rebuilt.
//!
//! `dns:` entries run as one endpoint per address in the DNS cache, so a changed answer is
//! a rebuild like a reload: addresses that stay keep their endpoint, gone ones drain.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::{Config, Limits, PoolConfig, RouteMatch as CfgRouteMatch};
use crate::dns::{self, DnsMap};
use crate::metrics::{Metrics, RouteMetrics};
use crate::pool::{ConnSettings, Endpoint, Pool};
use crate::router::{RouteMatch, Router, VhostRoutes};
use crate::static_files::DenyList;

/// The shared handle every component reads the current runtime from.
pub type Shared = Arc<ArcSwap<Runtime>>;

/// One vhost, ready for the request path.
pub struct Vhost {
    /// Metric label and log name: the first host name.
    pub label: String,
    /// What SERVER_NAME comes from: the vhost's `server_name`, else the first host name as
    /// configured (may be `*` or a wildcard: then the request's host).
    pub first_host: String,
    /// Document root as seen by the FPM nodes.
    pub root: String,
    /// Front controller script name (e.g. `index.php`).
    pub index: Option<String>,
    /// Local document tree served directly.
    pub static_dir: Option<PathBuf>,
    /// Static files may be symlinks leading out of the tree.
    pub follow_symlinks: bool,
    /// File names never served from `static_dir`.
    pub static_deny: DenyList,
}

/// A compiled, live configuration.
pub struct Runtime {
    /// 1 for the first load, +1 for each applied reload.
    pub generation: u64,
    /// The config it was built from.
    pub config: Arc<Config>,
    /// Host and path routing.
    pub router: Router,
    /// Vhosts, by the indexes the router returns.
    pub vhosts: Vec<Vhost>,
    /// Pools, by the indexes the router returns.
    pub pools: Vec<Arc<Pool>>,
    /// Request metrics by `[vhost][pool]`, bound once per runtime.
    pub route_metrics: Vec<Vec<Arc<RouteMetrics>>>,
}

impl Runtime {
    /// Client-side limits.
    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }
}

fn conn_settings(p: &PoolConfig) -> ConnSettings {
    ConnSettings {
        connect_timeout: p.timeouts.connect,
        max_idle: p.keepalive.max_idle,
        idle_timeout: p.keepalive.idle_timeout,
    }
}

/// Builds a runtime, carrying over what `prev` has that did not change. Endpoints that left
/// the config (or the DNS answer of a `dns:` entry, looked up in `dns`) are marked draining
/// and lose their idle connections; their in-flight requests finish on their own.
pub fn build(
    config: Config,
    prev: Option<&Runtime>,
    metrics: &Arc<Metrics>,
    generation: u64,
    dns: &DnsMap,
) -> Runtime {
    let config = Arc::new(config);
    let mut old_pools: HashMap<&str, &Arc<Pool>> = HashMap::new();
    let mut old_endpoints: HashMap<(&str, String), &Arc<Endpoint>> = HashMap::new();
    if let Some(prev) = prev {
        for pool in &prev.pools {
            old_pools.insert(pool.name(), pool);
            for ep in &pool.endpoints {
                old_endpoints.insert((pool.name(), ep.label.clone()), ep);
            }
        }
    }

    let mut pools = Vec::with_capacity(config.pools.len());
    let mut kept_endpoints: Vec<(String, String)> = Vec::new();
    for pc in &config.pools {
        let endpoint_configs = dns::expand_endpoints(pc, dns);
        // Same definition (and DNS answers) → same pool object: its queue and admission
        // state stay exact.
        if let Some(old) = old_pools.get(pc.name.as_str()) {
            if format!("{:?}", old.config) == format!("{pc:?}")
                && old
                    .endpoints
                    .iter()
                    .map(|e| &e.addr)
                    .eq(endpoint_configs.iter().map(|e| &e.addr))
            {
                for ep in &old.endpoints {
                    kept_endpoints.push((pc.name.clone(), ep.label.clone()));
                }
                pools.push(Arc::clone(old));
                continue;
            }
        }
        let settings = conn_settings(pc);
        let mut fresh = Vec::new();
        let endpoints: Vec<Arc<Endpoint>> = endpoint_configs
            .iter()
            .map(|ec| {
                let label = ec.addr.to_string();
                kept_endpoints.push((pc.name.clone(), label.clone()));
                match old_endpoints.get(&(pc.name.as_str(), label.clone())) {
                    Some(old) => {
                        old.update(ec, settings);
                        Arc::clone(old)
                    }
                    None => {
                        let ep = Arc::new(Endpoint::new(
                            ec,
                            settings,
                            metrics.endpoint(&pc.name, &label),
                        ));
                        fresh.push(Arc::clone(&ep));
                        ep
                    }
                }
            })
            .collect();
        // At boot every endpoint starts up so a restart serves at once. One added later
        // (reload, DNS) must first pass `rise` checks while the pool has endpoints that
        // are known to work; when it has none (every endpoint replaced, or all of them
        // down), the new ones start up as at boot rather than leave the pool without
        // capacity until their checks pass.
        let known_good = endpoints
            .iter()
            .any(|e| e.is_available() && !fresh.iter().any(|f| Arc::ptr_eq(f, e)));
        if prev.is_some() && known_good && pc.health.as_ref().is_some_and(|h| h.rise > 0) {
            for ep in &fresh {
                ep.start_unverified();
            }
        }
        let (pool_config, pool_metrics) = (Arc::new(pc.clone()), metrics.pool(&pc.name));
        pools.push(match old_pools.get(pc.name.as_str()) {
            // Its requests in flight and in the queue carry over to the new definition.
            Some(old) => Pool::succeeding(pool_config, endpoints, pool_metrics, old),
            None => Arc::new(Pool::new(pool_config, endpoints, pool_metrics)),
        });
    }

    // Endpoints (and pools) that are gone: drain, close idle connections, drop their series.
    if let Some(prev) = prev {
        for pool in &prev.pools {
            let pool_removed = !config.pools.iter().any(|p| p.name == pool.name());
            for ep in &pool.endpoints {
                if !kept_endpoints
                    .iter()
                    .any(|(p, l)| p == pool.name() && *l == ep.label)
                {
                    // A pool that is gone takes no new requests (nothing routes to it), but
                    // the ones already in its queue are still served by its endpoints: a
                    // drained endpoint would fail them with 503, as when a reload moves a
                    // vhost to a new PHP version's pool and removes the old one at once.
                    // Its connections close when its last request is done.
                    if !pool_removed {
                        ep.draining.store(true, Ordering::Relaxed);
                    }
                    ep.reap_idle(true);
                    metrics.forget_endpoint(pool.name(), &ep.label);
                }
            }
            if pool_removed {
                for g in [
                    &metrics.pool_inflight,
                    &metrics.pool_capacity,
                    &metrics.pool_queue_depth,
                    &metrics.pool_queue_size,
                ] {
                    let _ = g.remove_label_values(&[pool.name()]);
                }
            }
        }
    }

    let pool_index: HashMap<&str, usize> = config
        .pools
        .iter()
        .enumerate()
        .map(|(i, p)| (p.name.as_str(), i))
        .collect();
    let mut vhosts = Vec::with_capacity(config.vhosts.len());
    let mut routes = Vec::with_capacity(config.vhosts.len());
    for vc in &config.vhosts {
        // compile() guarantees every referenced pool exists.
        let pool = pool_index.get(vc.pool.as_str()).copied().unwrap_or(0);
        let vroutes = vc
            .routes
            .iter()
            .map(|r| {
                let m = match &r.matcher {
                    CfgRouteMatch::Prefix(p) => RouteMatch::Prefix(p.clone()),
                    CfgRouteMatch::Regex(re) => RouteMatch::Regex(re.clone()),
                };
                (m, pool_index.get(r.pool.as_str()).copied().unwrap_or(pool))
            })
            .collect();
        routes.push(VhostRoutes {
            hosts: vc.hosts.clone(),
            pool,
            routes: vroutes,
        });
        let first_host = vc.hosts.first().cloned().unwrap_or_else(|| "*".to_string());
        vhosts.push(Vhost {
            label: first_host.clone(),
            // A configured server_name is never a wildcard: SERVER_NAME is always it.
            first_host: vc.server_name.clone().unwrap_or(first_host),
            root: vc.root.clone(),
            index: vc.index.clone(),
            static_dir: vc.static_dir.clone(),
            follow_symlinks: vc.follow_symlinks,
            static_deny: DenyList::new(&vc.static_deny),
        });
    }

    for pool in &pools {
        pool.refresh_capacity();
    }
    // Health tasks: started for pools built here (a carried-over pool keeps its tasks),
    // stopped for old pools that were replaced or removed.
    for pool in &pools {
        pool.start_health(Arc::clone(metrics));
    }
    if let Some(prev) = prev {
        for old in &prev.pools {
            if !pools.iter().any(|p| Arc::ptr_eq(p, old)) {
                old.stop();
            }
        }
    }
    metrics.config_generation.set(generation as i64);
    let route_metrics = vhosts
        .iter()
        .map(|v| {
            pools
                .iter()
                .map(|p| Arc::new(RouteMetrics::new(metrics, &v.label, p.name())))
                .collect()
        })
        .collect();
    Runtime {
        generation,
        router: Router::new(routes),
        vhosts,
        pools,
        config,
        route_metrics,
    }
}

/// Builds a runtime from `config` on top of the running one and stores it as the next
/// generation; returns that generation. `dns` is the locked DNS cache: holding its lock
/// serialises rebuilds (a reload and a DNS change each build from the running runtime, and
/// without it the second store would undo the first). Names no longer in `config` are
/// dropped from the cache.
pub fn rebuild(shared: &Shared, config: Config, metrics: &Arc<Metrics>, dns: &mut DnsMap) -> u64 {
    let names: Vec<dns::DnsKey> = dns::targets(&config).iter().map(|(t, _)| t.key()).collect();
    dns.retain(|k, _| names.contains(k));
    let old = shared.load_full();
    let generation = old.generation + 1;
    let new = build(config, Some(&old), metrics, generation, dns);
    shared.store(Arc::new(new));
    generation
}

/// Closes idle connections past their idle timeout in every pool, so kept connections stop
/// pinning FPM workers once traffic drops. Runs every second from the app.
pub fn reap_idle(rt: &Runtime) {
    for pool in &rt.pools {
        for ep in &pool.endpoints {
            ep.reap_idle(false);
        }
    }
}
