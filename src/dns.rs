//! DNS discovery for `dns:NAME:PORT` endpoints: the resolver (a configured DNS server over
//! UDP, or the system's), the cache of the last good answer per name, the expansion of a
//! pool's `dns:` entries into one endpoint per address, and the task that re-resolves each
//! name on its pool's `resolve_interval` and rebuilds the runtime when an answer changes.
//!
//! A failed or empty resolution never shrinks a pool: the last known set keeps serving,
//! and the failure is logged and counted. Stale addresses of nodes that really left are
//! handled by connect failures, retries and passive ejection; an emptied pool could only
//! answer 503.

mod wire;

use std::collections::{HashMap, HashSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, DnsConfig, EndpointAddr, EndpointConfig, PoolConfig};
use crate::metrics::Metrics;
use crate::runtime::{self, Shared};

/// A name as configured: lowercased host (no trailing dot) and port.
pub type DnsKey = (String, u16);

/// The last good answer per name: sorted, deduplicated, never empty.
pub type DnsMap = HashMap<DnsKey, Vec<SocketAddr>>;

/// Longest the discovery task sleeps between looks at the running config, so names added
/// by a reload are picked up and names removed stop being resolved within this time.
const MAX_SLEEP: Duration = Duration::from_secs(1);

/// Receive buffer: answers without EDNS fit in 512 bytes, some servers send more.
const RECV_BUF: usize = 4096;

/// The shared [`DnsMap`].
///
/// Its lock also serialises runtime rebuilds (see [`runtime::rebuild`]): a config reload
/// and a DNS change each build from the running runtime, and without it the second store
/// would silently undo the first.
#[derive(Clone, Default)]
pub struct DnsCache(Arc<Mutex<DnsMap>>);

impl DnsCache {
    /// Locks the cache. Hold it only for synchronous work, never across an `.await`.
    pub fn lock(&self) -> MutexGuard<'_, DnsMap> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Why a name could not be resolved.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    /// No complete answer within `dns.timeout`.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The name does not exist.
    #[error("name does not exist (NXDOMAIN)")]
    NotFound,
    /// The name exists but has no A or AAAA records.
    #[error("no A or AAAA records")]
    NoAddresses,
    /// The DNS server's answer was an error or unusable.
    #[error("{0}")]
    Wire(#[from] wire::WireError),
    /// A socket error (e.g. the server's port is closed) or a system resolver failure.
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// Resolves names to addresses, through `dns.resolver` when set, else the system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolver {
    server: Option<SocketAddr>,
    timeout: Duration,
}

impl Resolver {
    /// A resolver for the `dns:` settings.
    pub fn new(cfg: &DnsConfig) -> Resolver {
        Resolver {
            server: cfg.resolver,
            timeout: cfg.timeout,
        }
    }

    /// The addresses of `host` (A and AAAA) with `port`, sorted and deduplicated; an empty
    /// answer is an error. Bounded by the configured timeout.
    pub async fn resolve(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, DnsError> {
        let mut addrs: Vec<SocketAddr> = match self.server {
            Some(server) => {
                let ips = tokio::time::timeout(self.timeout, query(server, host, self.timeout))
                    .await
                    .map_err(|_| DnsError::Timeout(self.timeout))??;
                ips.into_iter()
                    .map(|ip| SocketAddr::new(ip, port))
                    .collect()
            }
            None => {
                // getaddrinfo runs on a blocking thread; the timeout bounds our wait, not
                // that thread, which ends on its own (resolv.conf has its own timeouts).
                let found =
                    tokio::time::timeout(self.timeout, tokio::net::lookup_host((host, port)))
                        .await
                        .map_err(|_| DnsError::Timeout(self.timeout))??;
                found.collect()
            }
        };
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err(DnsError::NoAddresses);
        }
        Ok(addrs)
    }
}

/// A random query id: with the source port, what stops off-path answer spoofing.
fn random_id() -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    // RandomState is keyed from the OS's randomness; hashing a counter with it gives
    // unpredictable values without another dependency.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish() as u16
}

/// One outstanding question.
struct Question {
    qtype: u16,
    id: u16,
    packet: Vec<u8>,
    answer: Option<wire::Answer>,
}

/// Asks `server` for the A and AAAA records of `host` over UDP; the caller bounds the time.
/// Unanswered questions are sent again once, half-way through `timeout` (UDP may drop
/// them). Datagrams that are not the answer to an outstanding question are ignored.
async fn query(server: SocketAddr, host: &str, timeout: Duration) -> Result<Vec<IpAddr>, DnsError> {
    let local: SocketAddr = match server {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let sock = UdpSocket::bind(local).await?;
    // Connected: the kernel drops datagrams from any other source, and a closed port on
    // the server comes back as an error instead of a silent timeout.
    sock.connect(server).await?;
    let a_id = random_id();
    let mut aaaa_id = random_id();
    if aaaa_id == a_id {
        aaaa_id = a_id.wrapping_add(1);
    }
    let mut questions = Vec::with_capacity(2);
    for (qtype, id) in [(wire::TYPE_A, a_id), (wire::TYPE_AAAA, aaaa_id)] {
        let packet = wire::build_query(id, host, qtype)?;
        questions.push(Question {
            qtype,
            id,
            packet,
            answer: None,
        });
    }
    for q in &questions {
        sock.send(&q.packet).await?;
    }
    let mut resend_at = Some(Instant::now() + timeout / 2);
    let mut buf = vec![0u8; RECV_BUF];
    while questions.iter().any(|q| q.answer.is_none()) {
        let received = match resend_at {
            Some(at) => match tokio::time::timeout_at(at, sock.recv(&mut buf)).await {
                Ok(r) => r,
                Err(_) => {
                    resend_at = None;
                    for q in questions.iter().filter(|q| q.answer.is_none()) {
                        sock.send(&q.packet).await?;
                    }
                    continue;
                }
            },
            None => sock.recv(&mut buf).await,
        };
        let msg = buf.get(..received?).unwrap_or_default();
        let Some(q) = wire::response_id(msg).and_then(|id| {
            questions
                .iter_mut()
                .find(|q| q.id == id && q.answer.is_none())
        }) else {
            continue;
        };
        match wire::parse_response(msg, q.id, host, q.qtype) {
            Ok(answer) => q.answer = Some(answer),
            // Right id, wrong question: not our answer (a late reply to an earlier query
            // that reused the id, or a spoof); keep waiting for the real one.
            Err(wire::WireError::QuestionMismatch | wire::WireError::NotResponse) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let answers: Vec<wire::Answer> = questions.into_iter().filter_map(|q| q.answer).collect();
    let ips: Vec<IpAddr> = answers
        .iter()
        .flat_map(|a| a.addrs.iter().copied())
        .collect();
    if ips.is_empty() && answers.iter().all(|a| a.nxdomain) {
        return Err(DnsError::NotFound);
    }
    if answers.iter().any(|a| a.truncated) {
        tracing::debug!(host, "truncated DNS answer; using the addresses it holds");
    }
    Ok(ips)
}

/// One `dns:` entry of one pool: what is resolved, scheduled and labelled in metrics.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DnsTarget {
    /// The pool's name.
    pub pool: String,
    /// Lowercased host name.
    pub host: String,
    /// Port of every endpoint made from the answer.
    pub port: u16,
}

impl DnsTarget {
    /// The cache key.
    pub fn key(&self) -> DnsKey {
        (self.host.clone(), self.port)
    }

    /// The `name` metric label: `host:port`, the entry as written after `dns:`.
    pub fn name(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }
}

/// Every `dns:` entry of `config`, with its pool's resolve interval.
pub fn targets(config: &Config) -> Vec<(DnsTarget, Duration)> {
    let mut out = Vec::new();
    for pool in &config.pools {
        for ep in &pool.endpoints {
            if let EndpointAddr::Dns { host, port } = &ep.addr {
                let target = DnsTarget {
                    pool: pool.name.clone(),
                    host: host.clone(),
                    port: *port,
                };
                out.push((target, pool.resolve_interval));
            }
        }
    }
    out
}

/// The pool's endpoints as they run: each `dns:` entry replaced by one TCP endpoint per
/// cached address (with the entry's weight and max_conns), in config order. A name not
/// resolved yet contributes nothing. An address listed twice (a name resolving to a node
/// also listed by IP) is kept once, as first listed: endpoints are keyed by address.
pub fn expand_endpoints(pc: &PoolConfig, map: &DnsMap) -> Vec<EndpointConfig> {
    let mut out: Vec<EndpointConfig> = Vec::with_capacity(pc.endpoints.len());
    let mut push = |ec: EndpointConfig| {
        if out.iter().any(|e| e.addr == ec.addr) {
            tracing::debug!(
                pool = %pc.name,
                endpoint = %ec.addr,
                "address listed twice; keeping the first"
            );
        } else {
            out.push(ec);
        }
    };
    for ec in &pc.endpoints {
        let EndpointAddr::Dns { host, port } = &ec.addr else {
            push(ec.clone());
            continue;
        };
        match map.get(&(host.clone(), *port)) {
            Some(addrs) => {
                for addr in addrs {
                    push(EndpointConfig {
                        addr: EndpointAddr::Tcp(*addr),
                        weight: ec.weight,
                        max_conns: ec.max_conns,
                    });
                }
            }
            None => tracing::warn!(
                pool = %pc.name,
                name = %ec.addr,
                "not resolved yet: no endpoints from this name until it resolves"
            ),
        }
    }
    out
}

/// Counts one resolution and sets the known-addresses gauge.
fn record(metrics: &Metrics, t: &DnsTarget, ok: bool, known: usize) {
    let name = t.name();
    let result = if ok { "success" } else { "failure" };
    metrics
        .dns_resolutions
        .with_label_values(&[t.pool.as_str(), name.as_str(), result])
        .inc();
    metrics
        .dns_endpoints
        .with_label_values(&[t.pool.as_str(), name.as_str()])
        .set(known as i64);
}

/// Drops the series of a `dns:` entry that left the config.
fn forget(metrics: &Metrics, t: &DnsTarget) {
    let name = t.name();
    let l = [t.pool.as_str(), name.as_str()];
    for result in ["success", "failure"] {
        let _ = metrics
            .dns_resolutions
            .remove_label_values(&[l[0], l[1], result]);
    }
    let _ = metrics.dns_endpoints.remove_label_values(&l);
}

/// Resolves, at once and concurrently, every `dns:` entry of `config` whose name has no
/// cached answer, and caches what resolves. Used before the first runtime is built and
/// before a reload applies a config with new names, so those pools start with endpoints.
/// Takes at most about `dns.timeout`; failures are logged and counted.
pub async fn resolve_missing(config: &Config, metrics: &Metrics, cache: &DnsCache) {
    let resolver = Resolver::new(&config.dns);
    let mut jobs = JoinSet::new();
    for (t, _) in targets(config) {
        if cache.lock().contains_key(&t.key()) {
            continue;
        }
        let r = resolver.clone();
        jobs.spawn(async move {
            let res = r.resolve(&t.host, t.port).await;
            (t, res)
        });
    }
    while let Some(joined) = jobs.join_next().await {
        let Ok((t, res)) = joined else { continue };
        match res {
            Ok(addrs) => {
                tracing::info!(
                    pool = %t.pool,
                    name = %t.name(),
                    addrs = ?addrs,
                    "DNS name resolved"
                );
                record(metrics, &t, true, addrs.len());
                cache.lock().insert(t.key(), addrs);
            }
            Err(e) => {
                tracing::warn!(
                    pool = %t.pool,
                    name = %t.name(),
                    "DNS resolution failed ({e}); no endpoints from this name until it resolves"
                );
                let known = cache.lock().get(&t.key()).map_or(0, Vec::len);
                record(metrics, &t, false, known);
            }
        }
    }
}

/// [`resolve_missing`] for synchronous callers (the reloader, on a blocking thread):
/// runs it on the current tokio runtime and waits at most a little over `dns.timeout`.
/// Does nothing outside a runtime or when no name is missing.
pub fn resolve_missing_blocking(config: &Config, metrics: &Arc<Metrics>, cache: &DnsCache) {
    let missing = {
        let map = cache.lock();
        targets(config)
            .iter()
            .any(|(t, _)| !map.contains_key(&t.key()))
    };
    let Ok(handle) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if !missing {
        return;
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let (config2, metrics2, cache2) = (config.clone(), Arc::clone(metrics), cache.clone());
    handle.spawn(async move {
        resolve_missing(&config2, &metrics2, &cache2).await;
        let _ = tx.send(());
    });
    let _ = rx.recv_timeout(config.dns.timeout + Duration::from_millis(500));
}

/// Schedule of one `dns:` entry in [`discover`].
struct Schedule {
    next: Instant,
    running: bool,
    failing: bool,
}

/// Re-resolves every `dns:` entry of the running config on its pool's `resolve_interval`
/// until `token` is cancelled. When an answer differs from the cached one, the cache is
/// updated and the runtime rebuilt from the running config: new addresses become
/// endpoints, vanished ones drain. A failed resolution keeps the cached answer.
pub async fn discover(
    shared: Shared,
    metrics: Arc<Metrics>,
    cache: DnsCache,
    token: CancellationToken,
) {
    let mut schedule: HashMap<DnsTarget, Schedule> = HashMap::new();
    let mut running: HashMap<tokio::task::Id, DnsTarget> = HashMap::new();
    let mut jobs: JoinSet<Result<Vec<SocketAddr>, DnsError>> = JoinSet::new();
    loop {
        let config = Arc::clone(&shared.load().config);
        let current = targets(&config);
        let resolver = Resolver::new(&config.dns);
        let live: HashSet<&DnsTarget> = current.iter().map(|(t, _)| t).collect();
        schedule.retain(|t, _| {
            let keep = live.contains(t);
            if !keep {
                forget(&metrics, t);
            }
            keep
        });
        let now = Instant::now();
        for (t, interval) in &current {
            let s = schedule.entry(t.clone()).or_insert_with(|| {
                // Resolved already (at start, or by the reload that added it): the next
                // look is one interval away. Not resolved: that attempt failed and was
                // logged, so the next failure is not news but a success is.
                let known = cache.lock().contains_key(&t.key());
                Schedule {
                    next: if known { now + *interval } else { now },
                    running: false,
                    failing: !known,
                }
            });
            if !s.running && s.next <= now {
                s.running = true;
                let (r, job) = (resolver.clone(), t.clone());
                let handle = jobs.spawn(async move { r.resolve(&job.host, job.port).await });
                running.insert(handle.id(), t.clone());
            }
        }
        let wake = schedule
            .values()
            .filter(|s| !s.running)
            .map(|s| s.next)
            .fold(now + MAX_SLEEP, Instant::min);
        tokio::select! {
            _ = token.cancelled() => return,
            Some(joined) = jobs.join_next_with_id(), if !jobs.is_empty() => {
                let (id, res) = match joined {
                    Ok((id, res)) => (id, res),
                    Err(e) => {
                        let failed = io::Error::other("resolution task failed");
                        (e.id(), Err(DnsError::Io(failed)))
                    }
                };
                let Some(t) = running.remove(&id) else { continue };
                let interval = current
                    .iter()
                    .find(|(x, _)| *x == t)
                    .map_or(MAX_SLEEP, |(_, i)| *i);
                let Some(s) = schedule.get_mut(&t) else { continue };
                s.running = false;
                s.next = Instant::now() + interval;
                apply(&shared, &metrics, &cache, &t, s, res);
            }
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
}

/// Records one resolution of `t` and, when its answer changed, updates the cache and
/// rebuilds the runtime.
fn apply(
    shared: &Shared,
    metrics: &Arc<Metrics>,
    cache: &DnsCache,
    t: &DnsTarget,
    s: &mut Schedule,
    res: Result<Vec<SocketAddr>, DnsError>,
) {
    let addrs = match res {
        Ok(addrs) => addrs,
        Err(e) => {
            let known = cache.lock().get(&t.key()).map_or(0, Vec::len);
            record(metrics, t, false, known);
            // Once per outage at warn: a resolver down for an hour should not write a
            // line every interval for every name.
            if !s.failing {
                tracing::warn!(
                    pool = %t.pool,
                    name = %t.name(),
                    known,
                    "DNS resolution failed ({e}); keeping the last known addresses"
                );
            } else {
                tracing::debug!(
                    pool = %t.pool,
                    name = %t.name(),
                    "DNS resolution failed again ({e})"
                );
            }
            s.failing = true;
            return;
        }
    };
    if s.failing {
        tracing::info!(pool = %t.pool, name = %t.name(), "DNS resolution works again");
        s.failing = false;
    }
    record(metrics, t, true, addrs.len());
    let mut map = cache.lock();
    let key = t.key();
    if map.get(&key) == Some(&addrs) {
        return;
    }
    // Checked under the lock, which reloads also hold: a name a reload just removed must
    // not come back into the cache.
    let config = Arc::clone(&shared.load().config);
    if !targets(&config).iter().any(|(x, _)| x.key() == key) {
        return;
    }
    let before = map.insert(key, addrs.clone()).unwrap_or_default();
    let added: Vec<&SocketAddr> = addrs.iter().filter(|a| !before.contains(a)).collect();
    let removed: Vec<&SocketAddr> = before.iter().filter(|a| !addrs.contains(a)).collect();
    let generation = runtime::rebuild(shared, (*config).clone(), metrics, &mut map);
    tracing::info!(
        pool = %t.pool,
        name = %t.name(),
        added = ?added,
        removed = ?removed,
        generation,
        "DNS answer changed; endpoints updated"
    );
}

#[cfg(test)]
mod tests;
