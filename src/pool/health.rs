//! Endpoint health: the pure rise/fall counter, the passive failure window, the active
//! FastCGI ping task (one per pool), and passive ejection.
//!
//! Rules, and why:
//! - At boot every endpoint is up, so a fresh proxy serves at once; an endpoint marked down
//!   comes back only after `rise` successful pings.
//! - A ping is served by an ordinary FPM worker, so it queues behind busy workers when the
//!   pool is saturated. A ping that *waits* (times out, or finds a unix backlog full) while
//!   the endpoint is at `max_conns` (busy + idle connections, which both pin workers) or
//!   while the last status scrape saw a listen queue is recorded as `busy`: it counts neither
//!   way. A refused or reset connection is always a failure: nothing is listening.
//! - `passive.fails` consecutive request failures within `passive.window` eject the endpoint
//!   for `passive.eject`; a success in between starts the count again (HAProxy's
//!   error-limit and Envoy's consecutive errors). The last available endpoint is ejected
//!   too: a pool whose endpoints all fail answers 503 at once instead of queueing clients in
//!   front of a dead backend (nginx's max_fails and HAProxy behave the same way).
//! - With active checks an ejected endpoint is not pinged, and when the ejection ends it is
//!   down until `rise` pings succeed: it is probed before it takes traffic again. Without
//!   active checks it simply returns when the ejection time is over.
//!
//! State lives on the [`Endpoint`] (it survives reloads); tasks hold only a `Weak<Pool>`.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use http::StatusCode;
use serde::Serialize;
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::endpoint::{epoch, now_ms};
use super::fpm_status::{self, fcgi_get, probe_target, unix_ms};
use super::{Endpoint, Pool};
use crate::config::HealthConfig;
use crate::metrics::Metrics;

/// Largest ping answer read (`ping.response` is a short word).
const PING_LIMIT: usize = 4 * 1024;

/// A rise/fall state machine: `fall` consecutive failures take an up endpoint down, `rise`
/// consecutive successes bring a down one up. Pure: no clock, no I/O.
#[derive(Debug, Clone)]
pub struct HealthCounter {
    rise: u32,
    fall: u32,
    up: bool,
    /// Consecutive results disagreeing with the current state.
    streak: u32,
}

impl HealthCounter {
    /// A counter starting in state `up`. `rise` 0 behaves as 1 (up after any success).
    pub fn new(rise: u32, fall: u32, up: bool) -> HealthCounter {
        HealthCounter {
            rise,
            fall,
            up,
            streak: 0,
        }
    }

    /// Applies new thresholds (a reload) without losing the state or the current streak.
    pub fn set_thresholds(&mut self, rise: u32, fall: u32) {
        self.rise = rise;
        self.fall = fall;
    }

    /// The current state.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Records one result; `Some(new_state)` only when it flips the state.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        if ok == self.up {
            self.streak = 0;
            return None;
        }
        self.streak = self.streak.saturating_add(1);
        let needed = if self.up { self.fall } else { self.rise }.max(1);
        if self.streak >= needed {
            self.up = ok;
            self.streak = 0;
            Some(ok)
        } else {
            None
        }
    }

    /// Forces the state to down with an empty streak: `rise` successes are needed again.
    pub fn force_down(&mut self) {
        self.up = false;
        self.streak = 0;
    }

    /// Forces the state to up with an empty streak.
    pub fn force_up(&mut self) {
        self.up = true;
        self.streak = 0;
    }
}

impl Default for HealthCounter {
    /// The config defaults (rise 2, fall 3), up.
    fn default() -> Self {
        HealthCounter::new(2, 3, true)
    }
}

/// Consecutive request failures with their times (ms), oldest first. Pure.
#[derive(Debug, Default)]
pub struct PassiveWindow {
    failures: VecDeque<u64>,
}

impl PassiveWindow {
    /// Records a failure at `now_ms`; true when it is the `fails`-th within `window_ms`,
    /// which ejects (the window then starts empty). `fails` 0 never ejects.
    pub fn record_failure(&mut self, now_ms: u64, fails: u32, window_ms: u64) -> bool {
        if fails == 0 {
            return false;
        }
        while self
            .failures
            .front()
            .is_some_and(|&t| now_ms.saturating_sub(t) >= window_ms)
        {
            self.failures.pop_front();
        }
        self.failures.push_back(now_ms);
        if self.failures.len() >= fails as usize {
            self.failures.clear();
            return true;
        }
        false
    }

    /// A success: the failures so far were not consecutive.
    pub fn record_success(&mut self) {
        self.failures.clear();
    }

    /// Failures currently counted.
    pub fn len(&self) -> usize {
        self.failures.len()
    }

    /// No failure counted.
    pub fn is_empty(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The outcome class of one active check (the `result` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CheckResult {
    /// FPM answered 200 with the expected body.
    Ok,
    /// Anything else that is not excused by saturation.
    Fail,
    /// The ping waited while the endpoint was saturated; not counted.
    Busy,
}

impl CheckResult {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            CheckResult::Ok => "ok",
            CheckResult::Fail => "fail",
            CheckResult::Busy => "busy",
        }
    }
}

/// The last active check of an endpoint, for `/status`.
#[derive(Debug, Clone, Serialize)]
pub struct LastCheck {
    /// Its class.
    pub result: CheckResult,
    /// When it finished (unix ms).
    pub at_unix_ms: u64,
    /// Why it failed or was excused; `None` for ok.
    pub reason: Option<String>,
}

/// Health state kept on each endpoint.
#[derive(Debug, Default)]
pub struct EndpointHealth {
    /// The active-check state machine (thresholds refreshed from the pool's config).
    pub counter: HealthCounter,
    /// Passive failures being counted.
    pub passive: PassiveWindow,
    /// The last active check.
    pub last_check: Option<LastCheck>,
}

impl Pool {
    /// Starts the pool's background tasks: active pings when `health` is configured, FPM
    /// status scraping when `status` is. Tasks hold only a `Weak<Pool>` and end when the
    /// pool is dropped or [`Pool::stop`] is called. Calling it again does nothing.
    pub fn start_health(self: &Arc<Self>, metrics: Arc<Metrics>) {
        if self.health_started.swap(true, Ordering::AcqRel) {
            return;
        }
        for ep in &self.endpoints {
            ep.set_owner(Arc::downgrade(self));
        }
        if self.config.health.is_none() {
            // An endpoint carried over from a pool that had active checks would otherwise
            // keep a down verdict that nothing will ever revise.
            let mut changed = false;
            for ep in &self.endpoints {
                ep.health().counter.force_up();
                changed |= !ep.up.swap(true, Ordering::AcqRel);
                ep.sync_up_metric();
            }
            if changed {
                self.refresh_capacity();
            }
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::warn!(
                pool = self.name(),
                "no async runtime: health tasks not started"
            );
            return;
        };
        if self.config.health.is_some() {
            rt.spawn(run_checker(
                Arc::downgrade(self),
                self.cancel.clone(),
                metrics.clone(),
            ));
        }
        if self.config.status.is_some() {
            rt.spawn(fpm_status::run_scraper(
                Arc::downgrade(self),
                self.cancel.clone(),
                metrics,
            ));
        }
    }

    /// Stops the pool's background tasks (a reload replaced the pool). Idempotent.
    pub fn stop(&self) {
        self.cancel.cancel();
    }

    /// Recomputes capacity of this pool and, if a reload moved the endpoint to another pool
    /// object, of that one too.
    fn refresh_for(&self, ep: &Endpoint) {
        self.refresh_capacity();
        if let Some(owner) = ep.owner() {
            if !std::ptr::eq(Arc::as_ptr(&owner), self) {
                owner.refresh_capacity();
            }
        }
    }

    /// A request on `ep` failed in a way that blames the endpoint (connect failure, reset
    /// before any response byte, protocol error, read timeout). May eject it, unless it is
    /// the pool's last available endpoint.
    pub fn passive_failure(&self, ep: &Endpoint) {
        let pc = &self.config.passive;
        if pc.fails == 0 || ep.is_ejected() {
            // Late failures of requests that started before the ejection change nothing.
            return;
        }
        let active = self.config.health.is_some();
        let now = now_ms();
        // Never the pool's last available endpoint: ejecting it would turn its 502s and
        // 504s into 503s for every request and fail `/readyz`, and a few scripts slower
        // than the read timeout (a report, an export) would do it as readily as a hung FPM.
        let last = !self
            .endpoints
            .iter()
            .any(|e| !std::ptr::eq(e.as_ref(), ep) && e.is_available());
        let eject = {
            let mut h = ep.health();
            let eject = h
                .passive
                .record_failure(now, pc.fails, pc.window.as_millis() as u64);
            if eject && last {
                drop(h);
                tracing::warn!(
                    pool = self.name(),
                    endpoint = %ep.label,
                    "{} consecutive request failures, but this is the pool's last available endpoint: not ejected",
                    pc.fails
                );
                return;
            }
            if eject && active {
                // Back through the rise counter once the ejection is over.
                h.counter.force_down();
            }
            ep.passive_pending
                .store(!h.passive.is_empty(), Ordering::Relaxed);
            eject
        };
        if !eject {
            return;
        }
        let until = now.saturating_add(pc.eject.as_millis() as u64);
        ep.ejected_until_ms.store(until, Ordering::Relaxed);
        if active {
            ep.up.store(false, Ordering::Relaxed);
        }
        ep.sync_up_metric();
        ep.metrics.ejections.inc();
        tracing::warn!(
            pool = self.name(),
            endpoint = %ep.label,
            fails = pc.fails,
            window_ms = pc.window.as_millis() as u64,
            eject_ms = pc.eject.as_millis() as u64,
            "endpoint ejected after {} consecutive request failures",
            pc.fails
        );
        self.refresh_for(ep);
        if let Some(arc) = self.endpoints.iter().find(|e| std::ptr::eq(e.as_ref(), ep)) {
            schedule_ejection_end(arc, until);
        }
    }

    /// A request on `ep` got a complete response head: failures so far were not
    /// consecutive.
    pub fn passive_success(&self, ep: &Endpoint) {
        if ep.passive_pending.swap(false, Ordering::Relaxed) {
            ep.health().passive.record_success();
        }
    }

    /// Records one active check and applies a state change.
    fn apply_check(&self, ep: &Endpoint, check: Check, cfg: &HealthConfig, metrics: &Metrics) {
        metrics
            .health_checks
            .with_label_values(&[self.name(), &ep.label, check.result.as_str()])
            .inc();
        let flipped = {
            let mut h = ep.health();
            h.last_check = Some(LastCheck {
                result: check.result,
                at_unix_ms: unix_ms(),
                reason: check.reason.clone(),
            });
            h.counter.set_thresholds(cfg.rise, cfg.fall);
            match check.result {
                // An ejection that began while the ping was in flight wins: the endpoint
                // must be probed after it ends.
                _ if ep.is_ejected() => None,
                CheckResult::Busy => None,
                CheckResult::Ok => h.counter.record(true),
                CheckResult::Fail => h.counter.record(false),
            }
        };
        let Some(up) = flipped else { return };
        ep.up.store(up, Ordering::Relaxed);
        ep.sync_up_metric();
        let reason = check.reason.as_deref().unwrap_or("ping answered");
        if up {
            tracing::info!(pool = self.name(), endpoint = %ep.label, reason, "endpoint up after {} successful checks", cfg.rise.max(1));
        } else {
            tracing::warn!(pool = self.name(), endpoint = %ep.label, reason, "endpoint down after {} failed checks", cfg.fall.max(1));
        }
        self.refresh_for(ep);
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Makes the end of an ejection visible: metric, log, and the owning pool's capacity.
fn schedule_ejection_end(ep: &Arc<Endpoint>, until_ms: u64) {
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let weak = Arc::downgrade(ep);
    rt.spawn(async move {
        tokio::time::sleep_until(epoch() + Duration::from_millis(until_ms)).await;
        let Some(ep) = weak.upgrade() else { return };
        if ep.ejected_until_ms.load(Ordering::Relaxed) != until_ms {
            // Lifted by the admin or replaced by a later ejection with its own timer.
            return;
        }
        ep.sync_up_metric();
        let owner = ep.owner();
        if ep.is_up() {
            tracing::info!(endpoint = %ep.label, "ejection over; endpoint takes traffic again");
        } else {
            tracing::info!(endpoint = %ep.label, "ejection over; endpoint returns after successful checks");
        }
        if let Some(pool) = owner {
            pool.refresh_capacity();
        }
    });
}

/// One check's verdict.
#[derive(Debug)]
struct Check {
    result: CheckResult,
    reason: Option<String>,
}

/// Pings `ep` once and classifies the answer (see the module doc for the busy rule).
async fn check_once(ep: &Endpoint, cfg: &HealthConfig) -> Check {
    let target = probe_target(&ep.addr, cfg.addr_port);
    let fail = |reason: String| Check {
        result: CheckResult::Fail,
        reason: Some(reason),
    };
    match fcgi_get(target, &cfg.ping, "", cfg.timeout, PING_LIMIT).await {
        Ok(a) if a.status == StatusCode::OK && a.body.trim_ascii() == cfg.expect.as_bytes() => {
            Check {
                result: CheckResult::Ok,
                reason: None,
            }
        }
        Ok(a) => fail(format!(
            "unexpected answer: status {}, body {:?}",
            a.status.as_u16(),
            String::from_utf8_lossy(a.body.get(..64).unwrap_or(&a.body)).trim()
        )),
        Err(e) if e.is_wait() && saturated(ep) => Check {
            result: CheckResult::Busy,
            reason: Some(format!("{e} while saturated")),
        },
        Err(e) => fail(e.to_string()),
    }
}

/// Every worker this proxy may use is pinned (busy and idle connections both hold one), or
/// FPM itself reported connections waiting for a worker.
fn saturated(ep: &Endpoint) -> bool {
    ep.busy() + ep.idle_count() >= ep.max_conns() || ep.fpm_queued()
}

/// Pings every endpoint of the pool each interval until the pool is dropped or stopped.
async fn run_checker(pool: Weak<Pool>, cancel: CancellationToken, metrics: Arc<Metrics>) {
    let Some(cfg) = pool.upgrade().and_then(|p| p.config.health.clone()) else {
        return;
    };
    let cfg = Arc::new(cfg);
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Cancel-safe: an interval tick that loses the race is simply not taken.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some(endpoints) = pool.upgrade().map(|p| p.endpoints.clone()) else {
            return;
        };
        let mut set = JoinSet::new();
        for ep in endpoints {
            // An ejected endpoint is probed again once the ejection is over.
            if ep.is_ejected() {
                continue;
            }
            let cfg = cfg.clone();
            set.spawn(async move {
                let check = check_once(&ep, &cfg).await;
                (ep, check)
            });
        }
        // Each ping is bounded by `timeout`; dropping the set on cancel aborts them.
        let mut results = Vec::with_capacity(set.len());
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                r = set.join_next() => match r {
                    Some(Ok(v)) => results.push(v),
                    Some(Err(_)) => {}
                    None => break,
                },
            }
        }
        let Some(p) = pool.upgrade() else { return };
        for (ep, check) in results {
            p.apply_check(&ep, check, &cfg, &metrics);
        }
    }
}

#[cfg(test)]
#[path = "health_tests.rs"]
mod tests;
