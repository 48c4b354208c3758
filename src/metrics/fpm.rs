//! The PHP-FPM status-page gauges, by pool and endpoint.

use prometheus::{IntCounterVec, IntGaugeVec, Registry};

use super::{counter, gauge};

/// The PHP-FPM status-page gauges.
pub struct FpmMetrics {
    /// `active processes`.
    pub active_processes: IntGaugeVec,
    /// `idle processes`.
    pub idle_processes: IntGaugeVec,
    /// `total processes`.
    pub total_processes: IntGaugeVec,
    /// `listen queue`.
    pub listen_queue: IntGaugeVec,
    /// `max listen queue`.
    pub max_listen_queue: IntGaugeVec,
    /// `max children reached` (a counter in FPM, exported as FPM reports it).
    pub max_children_reached: IntGaugeVec,
    /// `slow requests`.
    pub slow_requests: IntGaugeVec,
    /// `accepted conn`.
    pub accepted_connections: IntGaugeVec,
    /// Whether the last scrape worked (the other figures are stale when 0).
    pub up: IntGaugeVec,
    /// Scrapes by result (`ok`, `busy`: timed out waiting, `fail`), labelled pool,
    /// endpoint, result.
    pub scrapes: IntCounterVec,
}

impl FpmMetrics {
    /// Registers the gauges, labelled `pe` (pool, endpoint).
    pub(super) fn new(r: &Registry, pe: &[&str]) -> FpmMetrics {
        FpmMetrics {
            active_processes: gauge(
                r,
                "fpmgate_fpm_active_processes",
                "PHP-FPM active processes, from its status page.",
                pe,
            ),
            idle_processes: gauge(
                r,
                "fpmgate_fpm_idle_processes",
                "PHP-FPM idle processes, from its status page.",
                pe,
            ),
            total_processes: gauge(
                r,
                "fpmgate_fpm_total_processes",
                "PHP-FPM total processes, from its status page.",
                pe,
            ),
            listen_queue: gauge(
                r,
                "fpmgate_fpm_listen_queue",
                "Connections waiting in PHP-FPM's listen backlog.",
                pe,
            ),
            max_listen_queue: gauge(
                r,
                "fpmgate_fpm_max_listen_queue",
                "PHP-FPM's highest listen queue since it started.",
                pe,
            ),
            max_children_reached: gauge(
                r,
                "fpmgate_fpm_max_children_reached",
                "Times PHP-FPM hit pm.max_children since it started.",
                pe,
            ),
            slow_requests: gauge(
                r,
                "fpmgate_fpm_slow_requests",
                "PHP-FPM slow requests since it started.",
                pe,
            ),
            accepted_connections: gauge(
                r,
                "fpmgate_fpm_accepted_connections",
                "Connections PHP-FPM accepted since it started.",
                pe,
            ),
            up: gauge(
                r,
                "fpmgate_fpm_up",
                "1 if the last PHP-FPM status scrape succeeded, 0 if it failed.",
                pe,
            ),
            scrapes: counter(
                r,
                "fpmgate_fpm_status_scrapes_total",
                "PHP-FPM status scrapes by result: ok, busy (timed out waiting), fail.",
                &["pool", "endpoint", "result"],
            ),
        }
    }
}
