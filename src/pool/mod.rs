//! A balancer pool: its endpoints, admission (a bounded FIFO wait queue in front of the sum
//! of the endpoints' `max_conns`), and endpoint selection.
//!
//! Admission is what keeps PHP-FPM's kernel backlog empty: a request only gets to pick an
//! endpoint once the pool has a free worker for it, otherwise it waits here, in order, for at
//! most `queue.timeout`; a full queue answers 503 at once. Every resource is an RAII guard so
//! a request whose client went away releases its place by being dropped.
//!
//! A reload that changes a pool builds a new [`Pool`] that takes over the old one's
//! admission ([`Pool::succeeding`]): requests admitted before the reload keep counting
//! against the pool until they finish, and those still queued keep their turn, so a reload
//! under load neither admits twice the capacity nor lets new requests jump the queue. Places
//! held on endpoints the reload removed are not counted against the new endpoints.
//!
//! Health (active pings, FPM status scraping, passive ejection) lives in [`health`] and
//! [`fpm_status`]; its state is kept on each [`Endpoint`] so that it survives reloads.

pub mod balance;
pub mod endpoint;
pub mod fpm_status;
pub mod health;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{BalancePolicy, PoolConfig};
use crate::error::ProxyError;
use crate::metrics::PoolMetrics;
use balance::{Balancer, Candidate};
pub use endpoint::{Conn, ConnSettings, Endpoint, Slot};

/// A pool's admission ledger, shared by the pool objects that successive reloads built for
/// one pool name.
struct Admission {
    inflight: usize,
    capacity: usize,
    waiters: VecDeque<oneshot::Sender<Admit>>,
    /// [`Pool::id`] of the pool object that sets `capacity` (the newest).
    owner: u64,
    /// That pool, once a reload made one that shares this ledger: requests armed from here
    /// on use its endpoints, whichever pool object they queued on.
    newest: Weak<Pool>,
    /// Places held on endpoints a reload removed, per endpoint: taken out of `inflight` then
    /// (they hold no slot the new endpoints could use), so the request that ends on one
    /// does not count its end again, and one that moves away from it counts again.
    uncounted: Vec<(Arc<Endpoint>, usize)>,
    /// Endpoints of the newest pool out of the count because they are unavailable (down,
    /// ejected, drained): their places were set aside in `uncounted` then, as a reload
    /// that removes an endpoint does, so their slow requests do not hold back the others,
    /// and counted again when they came back.
    excluded: Vec<Arc<Endpoint>>,
}

impl Admission {
    /// Takes one of `ep`'s uncounted places, if it has one left.
    fn take_uncounted(&mut self, ep: &Arc<Endpoint>) -> bool {
        let Some(at) = self.uncounted.iter().position(|(e, _)| Arc::ptr_eq(e, ep)) else {
            return false;
        };
        self.uncounted[at].1 -= 1;
        if self.uncounted[at].1 == 0 {
            self.uncounted.swap_remove(at);
        }
        true
    }

    /// Takes `held` places on `ep` out of the count.
    fn set_aside(&mut self, ep: &Arc<Endpoint>, held: usize) {
        if held == 0 {
            return;
        }
        self.inflight = self.inflight.saturating_sub(held);
        match self.uncounted.iter_mut().find(|(e, _)| Arc::ptr_eq(e, ep)) {
            Some((_, n)) => *n += held,
            None => self.uncounted.push((Arc::clone(ep), held)),
        }
    }

    /// Counts `ep`'s places set aside again.
    fn count_again(&mut self, ep: &Arc<Endpoint>) {
        if let Some(at) = self.uncounted.iter().position(|(e, _)| Arc::ptr_eq(e, ep)) {
            self.inflight += self.uncounted.swap_remove(at).1;
        }
    }
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

/// A pool of PHP-FPM endpoints serving one PHP application/version.
pub struct Pool {
    /// The pool's compiled config.
    pub config: Arc<PoolConfig>,
    /// Its endpoints, in config order.
    pub endpoints: Vec<Arc<Endpoint>>,
    balancer: Balancer,
    /// Tells this pool object apart from the others sharing its admission.
    id: u64,
    admission: Arc<Mutex<Admission>>,
    /// Label-bound metric handles.
    pub metrics: PoolMetrics,
    /// Stops the pool's health tasks ([`Pool::stop`], or when the pool is dropped).
    cancel: CancellationToken,
    /// [`Pool::start_health`] ran.
    health_started: AtomicBool,
}

impl Pool {
    /// Builds a pool over endpoints made (or carried over) by the runtime.
    pub fn new(
        config: Arc<PoolConfig>,
        endpoints: Vec<Arc<Endpoint>>,
        metrics: PoolMetrics,
    ) -> Pool {
        let admission = Arc::new(Mutex::new(Admission {
            inflight: 0,
            capacity: 0,
            waiters: VecDeque::new(),
            owner: 0,
            newest: Weak::new(),
            uncounted: Vec::new(),
            excluded: Vec::new(),
        }));
        Pool::with_admission(config, endpoints, metrics, admission, &[])
    }

    /// Builds the pool that replaces `prev` (same name, changed by a reload), taking over
    /// its admission: its requests in flight and its queue.
    pub fn succeeding(
        config: Arc<PoolConfig>,
        endpoints: Vec<Arc<Endpoint>>,
        metrics: PoolMetrics,
        prev: &Pool,
    ) -> Arc<Pool> {
        let admission = Arc::clone(&prev.admission);
        let pool = Arc::new_cyclic(|me| {
            let pool = Pool::with_admission(config, endpoints, metrics, admission, &prev.endpoints);
            pool.lock().newest = me.clone();
            pool
        });
        pool.refresh_capacity();
        pool
    }

    fn with_admission(
        config: Arc<PoolConfig>,
        endpoints: Vec<Arc<Endpoint>>,
        metrics: PoolMetrics,
        admission: Arc<Mutex<Admission>>,
        prev_endpoints: &[Arc<Endpoint>],
    ) -> Pool {
        let id = NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed);
        {
            let mut st = admission.lock().unwrap_or_else(|e| e.into_inner());
            st.owner = id;
            // Under the lock, so no place on a removed endpoint ends between its count
            // here and its entry in `uncounted`.
            for ep in prev_endpoints {
                if endpoints.iter().any(|e| Arc::ptr_eq(e, ep)) {
                    continue;
                }
                // One already out of the count (unavailable) was set aside then.
                match st.excluded.iter().position(|e| Arc::ptr_eq(e, ep)) {
                    Some(at) => drop(st.excluded.swap_remove(at)),
                    None => st.set_aside(ep, ep.busy()),
                }
            }
        }
        let balancer = match config.balance {
            BalancePolicy::RoundRobin => Balancer::round_robin(endpoints.len()),
            BalancePolicy::LeastConn => Balancer::least_conn(),
            BalancePolicy::P2c => Balancer::P2c,
            BalancePolicy::HashClientIp | BalancePolicy::HashCookie(_) => Balancer::Hash,
        };
        metrics.queue_size.set(config.queue.size as i64);
        let pool = Pool {
            config,
            endpoints,
            balancer,
            id,
            admission,
            metrics,
            cancel: CancellationToken::new(),
            health_started: AtomicBool::new(false),
        };
        pool.refresh_capacity();
        pool
    }

    /// The pool's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Recomputes capacity (sum of `max_conns` over available endpoints) after a health,
    /// drain or config change, and admits waiters that now fit. When nothing is available
    /// every waiter is failed at once: waiting for a dead pool helps nobody. A pool that a
    /// reload replaced has its successor recompute instead (a health change or an admin
    /// action can still reach it through an older snapshot).
    pub fn refresh_capacity(&self) {
        let newest = {
            let st = self.lock();
            (st.owner != self.id).then(|| st.newest.upgrade())
        };
        if let Some(newest) = newest {
            if let Some(pool) = newest.filter(|p| p.id != self.id) {
                pool.refresh_capacity();
            }
            return;
        }
        let mut st = self.lock();
        if st.owner != self.id {
            return;
        }
        // Under the lock, so two refreshes cannot interleave their views. An endpoint
        // that became unavailable takes its places in flight out of the count; the
        // requests there finish, but the others need not wait for them.
        let mut capacity = 0;
        for ep in &self.endpoints {
            let excluded = st.excluded.iter().position(|e| Arc::ptr_eq(e, ep));
            match (ep.is_available(), excluded) {
                (true, None) => {}
                (true, Some(at)) => {
                    st.excluded.swap_remove(at);
                    st.count_again(ep);
                }
                (false, None) => {
                    st.excluded.push(Arc::clone(ep));
                    st.set_aside(ep, ep.busy());
                    continue;
                }
                (false, Some(_)) => continue,
            }
            capacity += ep.max_conns();
        }
        self.metrics.capacity.set(capacity as i64);
        st.capacity = capacity;
        if capacity == 0 {
            st.waiters.clear();
            return;
        }
        while st.inflight < st.capacity {
            let Some(tx) = st.waiters.pop_front() else {
                break;
            };
            st.inflight += 1;
            if let Err(admit) = tx.send(Admit::unarmed()) {
                drop(admit);
                st.inflight -= 1;
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Admission> {
        self.admission.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits for a place in the pool (FIFO, bounded by `queue.size` and `queue.timeout`).
    pub async fn admit(self: &Arc<Self>) -> Result<Admit, ProxyError> {
        let rx = {
            let mut st = self.lock();
            if st.capacity == 0 {
                return Err(ProxyError::NoHealthy);
            }
            if st.waiters.is_empty() && st.inflight < st.capacity {
                st.inflight += 1;
                // A request on an older snapshot of the config goes to the newest pool's
                // endpoints: the others may be full or gone.
                let pool = st.newest.upgrade().unwrap_or_else(|| self.clone());
                drop(st);
                pool.metrics.inflight.inc();
                // Counted as a wait of 0, so the histogram covers every admitted request
                // (its quantiles and `_count` are those of all of them, not of waiters only).
                self.metrics.queue_wait.observe(0.0);
                return Ok(Admit {
                    pool: Some(pool),
                    on: None,
                });
            }
            if st.waiters.len() >= self.config.queue.size {
                // Waiters that gave up (client gone, timeout) leave closed senders behind.
                st.waiters.retain(|tx| !tx.is_closed());
                if st.waiters.len() >= self.config.queue.size {
                    return Err(ProxyError::QueueFull);
                }
            }
            let (tx, rx) = oneshot::channel();
            st.waiters.push_back(tx);
            rx
        };
        let started = Instant::now();
        self.metrics.queue_depth.inc();
        let _depth = DepthGuard(&self.metrics);
        let mut waiting = Waiting { pool: self, rx };
        let result = tokio::time::timeout(self.config.queue.timeout, &mut waiting.rx).await;
        self.metrics
            .queue_wait
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(Ok(admit)) => Ok(self.arm(admit)),
            // The sender was dropped: capacity fell to zero while we waited.
            Ok(Err(_)) => Err(ProxyError::NoHealthy),
            // A place handed over as the time ran out is taken, not lost.
            Err(_) => waiting.take().ok_or(ProxyError::QueueTimeout),
        }
    }

    /// Arms a place handed over by a releaser, who counted it in `inflight` already.
    fn arm(self: &Arc<Self>, mut admit: Admit) -> Admit {
        let newest = self.lock().newest.upgrade();
        let pool = newest.unwrap_or_else(|| self.clone());
        pool.metrics.inflight.inc();
        admit.pool = Some(pool);
        admit
    }

    /// Ends a place whose request last used endpoint `on` (an index into `endpoints`).
    fn release(&self, on: Option<usize>) {
        let mut st = self.lock();
        if let Some(ep) = on.filter(|_| !st.uncounted.is_empty()) {
            if st.take_uncounted(&self.endpoints[ep]) {
                return;
            }
        }
        // Hand the place straight to the first live waiter (FIFO), unless capacity shrank.
        while st.inflight <= st.capacity {
            let Some(tx) = st.waiters.pop_front() else {
                break;
            };
            match tx.send(Admit::unarmed()) {
                Ok(()) => return,
                Err(unarmed) => drop(unarmed),
            }
        }
        st.inflight = st.inflight.saturating_sub(1);
    }

    /// Queue length right now (for `/status`).
    pub fn queue_len(&self) -> usize {
        self.lock().waiters.len()
    }

    /// Requests admitted and not finished.
    pub fn inflight(&self) -> usize {
        self.lock().inflight
    }

    /// Picks an available endpoint with a free slot and reserves it. `avoid` lists endpoints
    /// already tried by this request: they are used again only if nothing else is left.
    pub fn select(&self, avoid: &[usize], key: Option<u64>) -> Option<(usize, Slot)> {
        let n = self.endpoints.len();
        let mut cands = [Candidate {
            weight: 1,
            load: 0,
            id_hash: 0,
        }; 8];
        let mut heap;
        let cands: &mut [Candidate] = if n <= cands.len() {
            &mut cands[..n]
        } else {
            heap = vec![
                Candidate {
                    weight: 1,
                    load: 0,
                    id_hash: 0
                };
                n
            ];
            &mut heap
        };
        for (c, e) in cands.iter_mut().zip(&self.endpoints) {
            *c = Candidate {
                weight: e.weight(),
                load: e.busy(),
                id_hash: e.id_hash,
            };
        }
        for pass in 0..2 {
            // A reservation can lose a race with another request; a few rounds settle it.
            for _ in 0..4 {
                let eligible = |i: usize| {
                    let e = &self.endpoints[i];
                    (pass == 1 || !avoid.contains(&i))
                        && e.is_available()
                        && e.busy() < e.max_conns()
                };
                let Some(i) = self.balancer.pick(cands, &eligible, key) else {
                    break;
                };
                if let Some(slot) = self.endpoints[i].try_reserve() {
                    return Some((i, slot));
                }
                cands[i].load = usize::MAX / 2;
            }
            if avoid.is_empty() {
                break;
            }
        }
        None
    }

    /// Whether this pool hashes on a cookie, and its name.
    pub fn hash_cookie(&self) -> Option<&str> {
        match &self.config.balance {
            BalancePolicy::HashCookie(name) => Some(name),
            _ => None,
        }
    }

    /// Whether this pool hashes on the client address.
    pub fn hashes_client_ip(&self) -> bool {
        matches!(self.config.balance, BalancePolicy::HashClientIp)
    }
}

/// A waiter's end of the hand-over. A place is handed over by sending it, so one sent to a
/// waiter that is cancelled (client gone) before it looks must still be given back: on drop
/// the channel is closed (no more hand-overs to it) and whatever arrived is released.
struct Waiting<'a> {
    pool: &'a Arc<Pool>,
    rx: oneshot::Receiver<Admit>,
}

impl Waiting<'_> {
    /// Closes the channel and takes (armed) a place that arrived before that.
    fn take(&mut self) -> Option<Admit> {
        self.rx.close();
        self.rx.try_recv().ok().map(|admit| self.pool.arm(admit))
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        // Armed, the place is released by dropping it, outside the admission lock.
        drop(self.take());
    }
}

struct DepthGuard<'a>(&'a PoolMetrics);

impl Drop for DepthGuard<'_> {
    fn drop(&mut self) {
        self.0.queue_depth.dec();
    }
}

/// A place in a pool. Dropping it lets the next waiter in.
pub struct Admit {
    pool: Option<Arc<Pool>>,
    /// The endpoint (index into the pool's `endpoints`) whose slot the request holds or
    /// last held.
    on: Option<usize>,
}

impl Admit {
    fn unarmed() -> Admit {
        Admit {
            pool: None,
            on: None,
        }
    }

    /// The pool whose endpoints the request is to use: the one it was admitted to, or the
    /// one a reload built in its place while it waited.
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        self.pool.as_ref()
    }

    /// Records that the request now holds a slot on endpoint `idx` of its pool.
    pub fn attach(&mut self, idx: usize) {
        let prev = self.on.replace(idx);
        let (Some(prev), Some(pool)) = (prev, &self.pool) else {
            return;
        };
        if prev != idx {
            // Moving away from an endpoint a reload removed, onto one that counts: if its
            // place was taken out of the count, it is counted again.
            let mut st = pool.lock();
            if !st.uncounted.is_empty() && st.take_uncounted(&pool.endpoints[prev]) {
                st.inflight += 1;
            }
        }
    }
}

impl Drop for Admit {
    fn drop(&mut self) {
        if let Some(pool) = self.pool.take() {
            pool.metrics.inflight.dec();
            pool.release(self.on);
        }
    }
}

#[cfg(test)]
#[path = "admission_tests.rs"]
mod admission_tests;
