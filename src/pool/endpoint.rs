//! One PHP-FPM endpoint: its worker budget (`max_conns`), its kept-alive idle connections,
//! and its health state (active verdict, passive ejection, drain, last FPM status figures).
//!
//! Health state lives here, not in the checker tasks, because an endpoint object moves from
//! the old pool to the new one on reload: its verdict and counters must move with it.
//!
//! PHP-FPM gives each connection its own worker until the connection closes, so an idle
//! pooled connection pins a worker exactly like a busy one. The budget therefore counts both:
//! `busy + idle <= max_conns` always holds, because a new connection is only opened when no
//! idle one is left.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;

use crate::config::{EndpointAddr, EndpointConfig};
use crate::fastcgi::conn::{self, Stream, Target, READ_BUF};
use crate::metrics::EndpointMetrics;
use crate::pool::fpm_status::FpmSnapshot;
use crate::pool::health::EndpointHealth;
use crate::pool::Pool;

/// Kept connections idle for less than this are reused without a liveness probe.
const FRESH_IDLE: std::time::Duration = std::time::Duration::from_millis(100);

struct Idle {
    stream: Stream,
    buf: BytesMut,
    since: Instant,
}

/// Settings an endpoint takes from its pool; changing them on reload does not reset state.
#[derive(Debug, Clone, Copy)]
pub struct ConnSettings {
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Idle connections kept at most.
    pub max_idle: usize,
    /// Idle connections older than this are closed.
    pub idle_timeout: Duration,
}

/// A PHP-FPM endpoint shared by every request (and carried over reloads).
pub struct Endpoint {
    /// Where it listens.
    pub addr: EndpointAddr,
    /// The metric label and `/status` key (`127.0.0.1:9000`, `unix:/run/php.sock`).
    pub label: String,
    /// Stable hash of the label, for consistent hashing.
    pub id_hash: u64,
    weight: AtomicU32,
    max_conns: AtomicUsize,
    busy: AtomicUsize,
    idle: Mutex<Vec<Idle>>,
    settings: Mutex<ConnSettings>,
    /// Active health-check verdict (true until a check says otherwise).
    pub up: AtomicBool,
    /// Set by the admin drain call or when the endpoint left the config.
    pub draining: AtomicBool,
    /// Passive ejection: not eligible until this many ms after [`epoch`].
    pub ejected_until_ms: AtomicU64,
    /// Handles of its metric series.
    pub metrics: EndpointMetrics,
    /// Rise/fall counter, passive failure window and last check (short critical sections
    /// only, never held across an await).
    health: Mutex<EndpointHealth>,
    /// Set by a passive failure, cleared by a success: lets the success path skip the lock.
    pub(crate) passive_pending: AtomicBool,
    /// The last FPM status page figures, when the pool scrapes them.
    fpm: Mutex<Option<FpmSnapshot>>,
    /// The last scrape showed a listen queue or every FPM process active.
    fpm_busy: AtomicBool,
    /// The last scrape showed connections waiting in FPM's listen queue.
    fpm_queued: AtomicBool,
    /// The pool currently serving this endpoint (set when its health tasks start), so that
    /// an ejection ending after a reload refreshes the capacity of the right pool.
    owner: Mutex<Weak<Pool>>,
}

/// Process-wide monotonic epoch for the millisecond timestamps kept in atomics.
pub fn epoch() -> Instant {
    use std::sync::OnceLock;
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since [`epoch`].
pub fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64
}

impl Endpoint {
    /// A new endpoint with no connections, considered up.
    pub fn new(cfg: &EndpointConfig, settings: ConnSettings, metrics: EndpointMetrics) -> Endpoint {
        let label = cfg.addr.to_string();
        metrics.max_conns.set(cfg.max_conns as i64);
        metrics.up.set(1);
        Endpoint {
            id_hash: crate::pool::balance::hash_bytes(label.as_bytes()),
            addr: cfg.addr.clone(),
            label,
            weight: AtomicU32::new(cfg.weight.max(1)),
            max_conns: AtomicUsize::new(cfg.max_conns.max(1)),
            busy: AtomicUsize::new(0),
            idle: Mutex::new(Vec::new()),
            settings: Mutex::new(settings),
            up: AtomicBool::new(true),
            draining: AtomicBool::new(false),
            ejected_until_ms: AtomicU64::new(0),
            metrics,
            health: Mutex::new(EndpointHealth::default()),
            passive_pending: AtomicBool::new(false),
            fpm: Mutex::new(None),
            fpm_busy: AtomicBool::new(false),
            fpm_queued: AtomicBool::new(false),
            owner: Mutex::new(Weak::new()),
        }
    }

    /// Applies a reloaded config entry for the same address without touching connections.
    /// An admin drain survives the reload: only the operator's `enable` undoes it (an
    /// endpoint that left the config is a new object if it ever comes back).
    pub fn update(&self, cfg: &EndpointConfig, settings: ConnSettings) {
        self.weight.store(cfg.weight.max(1), Ordering::Relaxed);
        self.max_conns
            .store(cfg.max_conns.max(1), Ordering::Relaxed);
        self.metrics.max_conns.set(cfg.max_conns as i64);
        *self.settings.lock().unwrap_or_else(|e| e.into_inner()) = settings;
    }

    /// Relative weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// The worker budget.
    pub fn max_conns(&self) -> usize {
        self.max_conns.load(Ordering::Relaxed)
    }

    /// Requests holding (or opening) a connection right now.
    pub fn busy(&self) -> usize {
        self.busy.load(Ordering::Relaxed)
    }

    /// Idle kept-alive connections.
    pub fn idle_count(&self) -> usize {
        self.idle.lock().map(|v| v.len()).unwrap_or(0)
    }

    /// Whether the endpoint may take new requests at all (health, ejection, drain).
    pub fn is_available(&self) -> bool {
        self.up.load(Ordering::Relaxed)
            && !self.draining.load(Ordering::Relaxed)
            && self.ejection_over()
    }

    /// No ejection is in force; the clock is read only if one ever was (once per request
    /// on the hot path otherwise).
    fn ejection_over(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until == 0 || until <= now_ms()
    }

    /// Whether a passive ejection is in force right now.
    pub fn is_ejected(&self) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms()
    }

    /// Whether the admin (or a reload that removed it) drained the endpoint.
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Whether the active checks consider it up.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Sets `fpmgate_endpoint_up` from [`Endpoint::is_available`]; call after any change
    /// of health, ejection or drain.
    pub fn sync_up_metric(&self) {
        self.metrics.up.set(i64::from(self.is_available()));
    }

    /// Marks a newly added endpoint down until active checks have seen it `rise` times.
    pub fn start_unverified(&self) {
        self.health().counter.force_down();
        self.up.store(false, Ordering::Relaxed);
        self.sync_up_metric();
    }

    /// The health state, for a short synchronous critical section.
    pub(crate) fn health(&self) -> MutexGuard<'_, EndpointHealth> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The last FPM status figures, if the pool scrapes them and a scrape succeeded.
    pub fn fpm_snapshot(&self) -> Option<FpmSnapshot> {
        *self.fpm.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Records a successful status scrape.
    pub(crate) fn set_fpm_snapshot(&self, snap: FpmSnapshot) {
        self.fpm_busy
            .store(snap.status.is_busy(), Ordering::Relaxed);
        self.fpm_queued
            .store(snap.status.listen_queue > 0, Ordering::Relaxed);
        *self.fpm.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap);
    }

    /// Forgets what the last scrape said about saturation (FPM refused the scrape: it is
    /// gone, not busy). The figures stay for `/status`.
    pub(crate) fn clear_fpm_hints(&self) {
        self.fpm_busy.store(false, Ordering::Relaxed);
        self.fpm_queued.store(false, Ordering::Relaxed);
    }

    /// FPM looked saturated at the last status scrape (a listen queue, or every process
    /// active). A hint the balancer may use; the endpoint stays available.
    pub fn fpm_busy(&self) -> bool {
        self.fpm_busy.load(Ordering::Relaxed)
    }

    /// The last status scrape saw connections waiting in FPM's listen queue.
    pub fn fpm_queued(&self) -> bool {
        self.fpm_queued.load(Ordering::Relaxed)
    }

    /// The pool that currently serves this endpoint, if its health tasks were started.
    pub fn owner(&self) -> Option<Arc<Pool>> {
        self.owner
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .upgrade()
    }

    pub(crate) fn set_owner(&self, pool: Weak<Pool>) {
        *self.owner.lock().unwrap_or_else(|e| e.into_inner()) = pool;
    }

    /// Reserves one slot of the worker budget; None when the endpoint is full.
    pub fn try_reserve(self: &Arc<Self>) -> Option<Slot> {
        let max = self.max_conns();
        let mut cur = self.busy.load(Ordering::Relaxed);
        loop {
            if cur >= max {
                return None;
            }
            match self
                .busy
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.metrics.inflight.inc();
                    return Some(Slot {
                        endpoint: self.clone(),
                        connected: false,
                    });
                }
                Err(now) => cur = now,
            }
        }
    }

    fn settings(&self) -> ConnSettings {
        *self.settings.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Turns a slot into a connection: the most recently used idle one that is still alive,
    /// or a new one. `probe`: check every kept connection first, even one returned moments
    /// ago (for requests that must not be retried once sent).
    pub async fn connect(
        &self,
        mut slot: Slot,
        probe: bool,
    ) -> Result<Conn, (Slot, std::io::Error)> {
        let settings = self.settings();
        loop {
            let idle = {
                let mut list = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                list.pop()
            };
            let Some(idle) = idle else { break };
            self.metrics.idle.dec();
            // Probing the socket costs a syscall; a connection returned moments ago (the
            // busy case) is almost never stale, and if it is, an idempotent request is
            // retried for free on a fresh connection, so only longer-idle ones are probed.
            let idle_for = idle.since.elapsed();
            if idle_for < settings.idle_timeout
                && ((!probe && idle_for < FRESH_IDLE) || idle.stream.is_reusable())
            {
                self.metrics.reuses.inc();
                slot.connected();
                return Ok(Conn {
                    stream: idle.stream,
                    buf: idle.buf,
                    reused: true,
                    slot,
                });
            }
            // Stale (FPM recycled the worker) or past its idle time: drop it and look again.
        }
        let target = match &self.addr {
            EndpointAddr::Tcp(a) => Target::Tcp(*a),
            EndpointAddr::Unix(p) => Target::Unix(p),
            // The runtime makes one endpoint per resolved address; a name is never dialled.
            EndpointAddr::Dns { .. } => {
                let e = std::io::Error::new(
                    std::io::ErrorKind::AddrNotAvailable,
                    "unresolved DNS endpoint",
                );
                return Err((slot, e));
            }
        };
        match conn::connect(target, settings.connect_timeout).await {
            Ok(stream) => {
                self.metrics.connects.inc();
                slot.connected();
                Ok(Conn {
                    stream,
                    buf: BytesMut::with_capacity(READ_BUF),
                    reused: false,
                    slot,
                })
            }
            Err(e) => Err((slot, e)),
        }
    }

    /// Keeps a connection whose FastCGI request ended cleanly, if the idle list has room.
    fn put_idle(&self, stream: Stream, buf: BytesMut) {
        let settings = self.settings();
        if settings.max_idle == 0 || self.draining.load(Ordering::Relaxed) {
            return;
        }
        let mut list = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if list.len() < settings.max_idle {
            list.push(Idle {
                stream,
                buf,
                since: Instant::now(),
            });
            self.metrics.idle.inc();
        }
    }

    /// Closes idle connections past `idle_timeout` (all of them when `all`), so they stop
    /// pinning FPM workers. Returns how many were closed.
    pub fn reap_idle(&self, all: bool) -> usize {
        let timeout = self.settings().idle_timeout;
        let closed: Vec<Idle> = {
            let mut list = self.idle.lock().unwrap_or_else(|e| e.into_inner());
            if all {
                std::mem::take(&mut *list)
            } else {
                // Oldest first: the list is pushed in order of return.
                let keep_from = list
                    .iter()
                    .position(|i| i.since.elapsed() < timeout)
                    .unwrap_or(list.len());
                list.drain(..keep_from).collect()
            }
        };
        self.metrics.idle.sub(closed.len() as i64);
        closed.len()
    }
}

/// One reserved unit of an endpoint's worker budget. Dropping it frees the unit.
pub struct Slot {
    endpoint: Arc<Endpoint>,
    /// A connection holds it: counted in `fpmgate_upstream_connections{state="active"}`,
    /// which a slot still connecting (or failing to) is not.
    connected: bool,
}

impl Slot {
    /// The endpoint this slot belongs to.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    fn connected(&mut self) {
        if !self.connected {
            self.connected = true;
            self.endpoint.metrics.active.inc();
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.endpoint.busy.fetch_sub(1, Ordering::AcqRel);
        self.endpoint.metrics.inflight.dec();
        if self.connected {
            self.endpoint.metrics.active.dec();
        }
    }
}

/// A connection in use by one request. Dropped without [`Conn::release`] it closes, which is
/// what every error path wants.
pub struct Conn {
    /// The socket.
    pub stream: Stream,
    /// Its read buffer (kept with the connection between requests).
    pub buf: BytesMut,
    /// True when it served an earlier request: a failure before any response byte then means
    /// FPM recycled the worker and the script did not run.
    pub reused: bool,
    slot: Slot,
}

impl Conn {
    /// The endpoint.
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.slot.endpoint
    }

    /// Returns the connection to the idle list after a clean END_REQUEST.
    pub fn release(self) {
        let Conn {
            stream,
            mut buf,
            slot,
            ..
        } = self;
        if buf.is_empty() {
            if buf.capacity() > 2 * READ_BUF {
                // A large response grew it: an idle connection keeps only the usual size.
                buf = BytesMut::with_capacity(READ_BUF);
            }
            // Otherwise it goes back as it is. Reserving here would allocate anew on every
            // request: the response just read still shares the buffer until it has been
            // sent. The next request's first read makes room (`client::read_head`), when
            // that response is usually gone and the room is taken back without allocating.
            slot.endpoint.put_idle(stream, buf);
        }
        // Bytes left after END_REQUEST mean FPM sent something we did not ask for: close.
        drop(slot);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn endpoint(port: u16) -> (Arc<Endpoint>, EndpointMetrics) {
        let metrics = Metrics::new().endpoint("p", "e");
        let cfg = EndpointConfig {
            addr: EndpointAddr::Tcp(([127, 0, 0, 1], port).into()),
            weight: 1,
            max_conns: 4,
        };
        let settings = ConnSettings {
            connect_timeout: Duration::from_secs(1),
            max_idle: 0,
            idle_timeout: Duration::from_secs(5),
        };
        (
            Arc::new(Endpoint::new(&cfg, settings, metrics.clone())),
            metrics,
        )
    }

    /// `upstream_connections{state="active"}` counts connections, not reserved slots: a
    /// request still connecting, or failing to, during an FPM outage is not one.
    #[tokio::test]
    async fn only_connected_slots_count_as_active_connections() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (ep, m) = endpoint(listener.local_addr().unwrap().port());
        let slot = ep.try_reserve().unwrap();
        assert_eq!((m.inflight.get(), m.active.get()), (1, 0));
        let conn = ep.connect(slot, false).await.ok().unwrap();
        assert_eq!((m.inflight.get(), m.active.get()), (1, 1));
        drop(conn);
        assert_eq!((m.inflight.get(), m.active.get()), (0, 0));

        // Nothing listens there any more: the connect fails and nothing was active.
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let (ep, m) = endpoint(port);
        let (slot, _) = ep
            .connect(ep.try_reserve().unwrap(), false)
            .await
            .err()
            .unwrap();
        assert_eq!((m.inflight.get(), m.active.get()), (1, 0));
        drop(slot);
        assert_eq!((m.inflight.get(), m.active.get()), (0, 0));
    }
}
