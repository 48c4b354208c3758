//! Unit tests of the health module: the pure counter and window, passive ejection on a real
//! `Pool`, and pings against a small fake FastCGI server.
//!
//! Timing tests run on the real clock with short windows and wide margins (the crate's
//! tokio has no `test-util`, so time cannot be paused).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::*;
use crate::config::{
    BalancePolicy, EndpointAddr, EndpointConfig, HealthConfig, KeepaliveConfig, PassiveConfig,
    PoolConfig, QueueConfig, TimeoutsConfig,
};
use crate::fastcgi::codec::{self, ProtocolStatus, RecordType};
use crate::pool::fpm_status::FpmStatus;
use crate::pool::ConnSettings;

#[test]
fn counter_falls_after_fall_consecutive_failures() {
    let mut c = HealthCounter::new(2, 3, true);
    assert_eq!(c.record(false), None);
    assert_eq!(c.record(false), None);
    // A success breaks the run.
    assert_eq!(c.record(true), None);
    assert_eq!(c.record(false), None);
    assert_eq!(c.record(false), None);
    assert_eq!(c.record(false), Some(false));
    assert!(!c.is_up());
    // Further failures report nothing: only transitions are reported.
    assert_eq!(c.record(false), None);
}

#[test]
fn counter_rises_after_rise_consecutive_successes() {
    let mut c = HealthCounter::new(2, 3, false);
    assert_eq!(c.record(true), None);
    assert_eq!(c.record(false), None);
    assert_eq!(c.record(true), None);
    assert_eq!(c.record(true), Some(true));
    assert!(c.is_up());
    assert_eq!(c.record(true), None);
}

#[test]
fn counter_rise_zero_means_first_success_and_thresholds_change() {
    let mut c = HealthCounter::new(0, 1, false);
    assert_eq!(c.record(true), Some(true));
    assert_eq!(c.record(false), Some(false));
    c.set_thresholds(3, 1);
    assert_eq!(c.record(true), None);
    assert_eq!(c.record(true), None);
    assert_eq!(c.record(true), Some(true));
    c.force_down();
    assert!(!c.is_up());
    assert_eq!(c.record(true), None);
}

#[test]
fn passive_window_counts_consecutive_failures_within_the_window() {
    let mut w = PassiveWindow::default();
    assert!(!w.record_failure(0, 3, 10_000));
    assert!(!w.record_failure(1_000, 3, 10_000));
    assert!(w.record_failure(2_000, 3, 10_000));
    assert!(w.is_empty(), "an ejection starts a new count");

    // Spread over more than the window: the oldest falls out.
    assert!(!w.record_failure(0, 3, 10_000));
    assert!(!w.record_failure(11_000, 3, 10_000));
    assert!(!w.record_failure(12_000, 3, 10_000));
    assert_eq!(w.len(), 2);
    assert!(w.record_failure(13_000, 3, 10_000));

    // A success in between resets.
    assert!(!w.record_failure(20_000, 2, 10_000));
    w.record_success();
    assert!(!w.record_failure(20_001, 2, 10_000));
    assert!(w.record_failure(20_002, 2, 10_000));

    // fails 0 disables ejection.
    for t in 0..100 {
        assert!(!w.record_failure(t, 0, 10_000));
    }
}

/// Ejection time of the test pools.
const EJECT: Duration = Duration::from_millis(300);
/// Passive window of the test pools.
const WINDOW: Duration = Duration::from_millis(400);

fn pool_config(health: Option<HealthConfig>, fails: u32) -> PoolConfig {
    let addrs = ["127.0.0.1:1", "127.0.0.1:2"].map(|a| a.parse().expect("addr"));
    pool_config_at(&addrs, health, fails)
}

fn pool_config_at(
    addrs: &[std::net::SocketAddr],
    health: Option<HealthConfig>,
    fails: u32,
) -> PoolConfig {
    PoolConfig {
        name: "p".into(),
        endpoints: addrs
            .iter()
            .map(|a| EndpointConfig {
                addr: EndpointAddr::Tcp(*a),
                weight: 1,
                max_conns: 4,
            })
            .collect(),
        balance: BalancePolicy::RoundRobin,
        keepalive: KeepaliveConfig {
            max_idle: 0,
            idle_timeout: Duration::from_secs(5),
        },
        timeouts: TimeoutsConfig {
            connect: Duration::from_secs(1),
            read: Duration::from_secs(5),
            send: Duration::from_secs(5),
        },
        queue: QueueConfig {
            size: 8,
            timeout: Duration::from_secs(1),
        },
        retries: 1,
        resolve_interval: Duration::from_secs(5),
        retry_after: 1,
        health,
        passive: PassiveConfig {
            fails,
            window: WINDOW,
            eject: EJECT,
        },
        status: None,
        params: Vec::new(),
    }
}

fn health_config(rise: u32, fall: u32) -> HealthConfig {
    HealthConfig {
        ping: "/ping".into(),
        expect: "pong".into(),
        addr_port: None,
        interval: Duration::from_secs(3600),
        timeout: Duration::from_millis(300),
        rise,
        fall,
    }
}

fn pool(cfg: PoolConfig, metrics: &Metrics) -> Arc<Pool> {
    let settings = ConnSettings {
        connect_timeout: cfg.timeouts.connect,
        max_idle: cfg.keepalive.max_idle,
        idle_timeout: cfg.keepalive.idle_timeout,
    };
    let endpoints = cfg
        .endpoints
        .iter()
        .map(|e| {
            Arc::new(Endpoint::new(
                e,
                settings,
                metrics.endpoint(&cfg.name, &e.addr.to_string()),
            ))
        })
        .collect();
    let pm = metrics.pool(&cfg.name);
    let pool = Arc::new(Pool::new(Arc::new(cfg), endpoints, pm));
    // What `start_health` does first, without spawning pings at unused addresses.
    for ep in &pool.endpoints {
        ep.set_owner(Arc::downgrade(&pool));
    }
    pool
}

#[tokio::test]
async fn passive_ejection_without_active_checks_returns_after_eject_time() {
    let metrics = Metrics::new();
    let pool = pool(pool_config(None, 2), &metrics);
    let ep = pool.endpoints[0].clone();
    assert_eq!(pool.metrics.capacity.get(), 8);

    pool.passive_failure(&ep);
    assert!(ep.is_available(), "one failure of two does not eject");
    pool.passive_failure(&ep);
    assert!(ep.is_ejected());
    assert!(!ep.is_available());
    assert!(ep.is_up(), "without active checks the verdict is untouched");
    assert_eq!(ep.metrics.up.get(), 0);
    assert_eq!(pool.metrics.capacity.get(), 4);

    // Late failures of requests started before the ejection do not extend it.
    let until = ep.ejected_until_ms.load(Ordering::Relaxed);
    pool.passive_failure(&ep);
    assert_eq!(ep.ejected_until_ms.load(Ordering::Relaxed), until);

    tokio::time::sleep(EJECT / 2).await;
    assert!(!ep.is_available());
    // Past the end, with room for the ejection-end task to run.
    tokio::time::sleep(EJECT).await;
    assert!(ep.is_available());
    assert_eq!(ep.metrics.up.get(), 1);
    assert_eq!(
        pool.metrics.capacity.get(),
        8,
        "capacity refreshed at the end"
    );
}

#[tokio::test]
async fn passive_ejection_with_active_checks_needs_rise_successes() {
    let metrics = Metrics::new();
    let cfg = health_config(2, 3);
    let pool = pool(pool_config(Some(cfg.clone()), 2), &metrics);
    let ep = pool.endpoints[1].clone();
    pool.passive_failure(&ep);
    pool.passive_failure(&ep);
    assert!(ep.is_ejected() && !ep.is_up());

    // A ping that succeeded while the ejection is in force does not count.
    let ok = || Check {
        result: CheckResult::Ok,
        reason: None,
    };
    pool.apply_check(&ep, ok(), &cfg, &metrics);
    tokio::time::sleep(EJECT + EJECT / 2).await;
    assert!(!ep.is_ejected());
    assert!(!ep.is_available(), "probed before it takes traffic again");
    assert_eq!(pool.metrics.capacity.get(), 4);

    pool.apply_check(&ep, ok(), &cfg, &metrics);
    assert!(!ep.is_available());
    pool.apply_check(&ep, ok(), &cfg, &metrics);
    assert!(ep.is_available());
    assert_eq!(ep.metrics.up.get(), 1);
    assert_eq!(pool.metrics.capacity.get(), 8);
}

#[tokio::test]
async fn passive_success_resets_and_fails_zero_disables() {
    let metrics = Metrics::new();
    let pool_a = pool(pool_config(None, 2), &metrics);
    let ep = pool_a.endpoints[0].clone();
    pool_a.passive_failure(&ep);
    pool_a.passive_success(&ep);
    pool_a.passive_failure(&ep);
    assert!(ep.is_available(), "failures were not consecutive");
    // Outside the window the first failure no longer counts.
    tokio::time::sleep(WINDOW + WINDOW / 4).await;
    pool_a.passive_failure(&ep);
    assert!(ep.is_available());
    pool_a.passive_failure(&ep);
    assert!(ep.is_ejected());

    let metrics = Metrics::new();
    let pool_b = pool(pool_config(None, 0), &metrics);
    let ep = pool_b.endpoints[0].clone();
    for _ in 0..50 {
        pool_b.passive_failure(&ep);
    }
    assert!(ep.is_available());
}

#[tokio::test]
async fn busy_checks_do_not_count_and_transitions_refresh_capacity() {
    let metrics = Metrics::new();
    let cfg = health_config(2, 2);
    let pool = pool(pool_config(Some(cfg.clone()), 0), &metrics);
    let ep = pool.endpoints[0].clone();
    let check = |result| Check {
        result,
        reason: Some("x".into()),
    };
    pool.apply_check(&ep, check(CheckResult::Fail), &cfg, &metrics);
    for _ in 0..5 {
        pool.apply_check(&ep, check(CheckResult::Busy), &cfg, &metrics);
    }
    assert!(ep.is_up(), "busy checks are not failures");
    pool.apply_check(&ep, check(CheckResult::Fail), &cfg, &metrics);
    assert!(!ep.is_up());
    assert_eq!(ep.metrics.up.get(), 0);
    assert_eq!(pool.metrics.capacity.get(), 4);
    let count = |r: &str| {
        metrics
            .health_checks
            .with_label_values(&["p", "127.0.0.1:1", r])
            .get()
    };
    assert_eq!((count("ok"), count("fail"), count("busy")), (0, 2, 5));
    let last = ep.health().last_check.clone().expect("last check");
    assert_eq!(last.result, CheckResult::Fail);
}

/// A one-shot FastCGI server: answers each connection with `stdout` (or never answers).
async fn fake_fpm(stdout: Option<&'static [u8]>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                // Read the request up to the empty STDIN that ends it.
                let mut buf = BytesMut::new();
                let mut params = Vec::new();
                'read: loop {
                    if s.read_buf(&mut buf).await.unwrap_or(0) == 0 {
                        return;
                    }
                    while let Ok(Some(rec)) = codec::decode_record(&mut buf) {
                        match rec.kind {
                            RecordType::Params => params.extend_from_slice(&rec.content),
                            RecordType::Stdin if rec.content.is_empty() => break 'read,
                            _ => {}
                        }
                    }
                }
                let pairs = codec::decode_pairs(&params).expect("pairs");
                assert!(pairs.iter().any(|(n, _)| n == b"REQUEST_METHOD"));
                let Some(out) = stdout else {
                    tokio::time::sleep(Duration::from_secs(30)).await;
                    return;
                };
                let mut w = BytesMut::new();
                codec::put_record(&mut w, RecordType::Stdout, 1, out);
                codec::put_record(&mut w, RecordType::Stdout, 1, b"");
                codec::put_end_request(&mut w, 1, 0, ProtocolStatus::RequestComplete);
                let _ = s.write_all(&w).await;
            });
        }
    });
    addr
}

fn endpoint_at(addr: std::net::SocketAddr, max_conns: usize) -> Arc<Endpoint> {
    let metrics = Metrics::new();
    let cfg = EndpointConfig {
        addr: EndpointAddr::Tcp(addr),
        weight: 1,
        max_conns,
    };
    let settings = ConnSettings {
        connect_timeout: Duration::from_secs(1),
        max_idle: 0,
        idle_timeout: Duration::from_secs(1),
    };
    Arc::new(Endpoint::new(
        &cfg,
        settings,
        metrics.endpoint("p", &addr.to_string()),
    ))
}

#[tokio::test]
async fn ping_classification() {
    let cfg = health_config(2, 3);
    let good = fake_fpm(Some(b"Content-type: text/plain\r\n\r\npong\n")).await;
    let check = check_once(&endpoint_at(good, 2), &cfg).await;
    assert_eq!(check.result, CheckResult::Ok, "{:?}", check.reason);

    let wrong = fake_fpm(Some(b"Status: 404 Not Found\r\n\r\nFile not found.")).await;
    let check = check_once(&endpoint_at(wrong, 2), &cfg).await;
    assert_eq!(check.result, CheckResult::Fail);
    assert!(check.reason.unwrap_or_default().contains("404"));

    // Silent: a failure, unless every slot is in use (saturation is not death).
    let silent = fake_fpm(None).await;
    let ep = endpoint_at(silent, 1);
    assert_eq!(check_once(&ep, &cfg).await.result, CheckResult::Fail);
    let slot = ep.try_reserve().expect("slot");
    assert_eq!(check_once(&ep, &cfg).await.result, CheckResult::Busy);

    // Refused: always a failure, saturated or not.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let ep = endpoint_at(closed, 1);
    let _slot2 = ep.try_reserve().expect("slot");
    assert_eq!(check_once(&ep, &cfg).await.result, CheckResult::Fail);
    drop(slot);
}

#[test]
fn fpm_status_json() {
    let body = br#"{"pool":"www","process manager":"static","start time":1700000000,
        "start since":12,"accepted conn":42,"listen queue":0,"max listen queue":3,
        "listen queue len":511,"idle processes":3,"active processes":1,"total processes":4,
        "max active processes":2,"max children reached":0,"slow requests":1}"#;
    let s = FpmStatus::parse(body).expect("parse");
    assert_eq!(s.accepted_conn, 42);
    assert_eq!(s.total_processes, 4);
    assert_eq!(s.max_listen_queue, 3);
    assert_eq!(s.slow_requests, 1);
    assert!(!s.is_busy());
    assert!(FpmStatus {
        listen_queue: 1,
        ..s
    }
    .is_busy());
    assert!(FpmStatus {
        active_processes: 4,
        ..s
    }
    .is_busy());
    assert!(FpmStatus::parse(br#"{"accepted conn": 1}"#).is_err());
    assert!(FpmStatus::parse(b"pong").is_err());
}

#[tokio::test]
async fn checker_task_flips_states_and_stops() {
    let good = fake_fpm(Some(b"Content-type: text/plain\r\n\r\npong")).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let metrics = Arc::new(Metrics::new());
    let mut cfg = health_config(1, 2);
    cfg.interval = Duration::from_millis(50);
    let pool = pool(pool_config_at(&[good, closed], Some(cfg), 0), &metrics);
    pool.start_health(metrics.clone());
    pool.start_health(metrics.clone()); // idempotent: one task only
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while pool.endpoints[1].is_up() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(pool.endpoints[0].is_up());
    assert!(!pool.endpoints[1].is_up(), "refused pings take it down");
    assert_eq!(pool.metrics.capacity.get(), 4);
    let last = pool.endpoints[1]
        .health()
        .last_check
        .clone()
        .expect("checked");
    assert_eq!(last.result, CheckResult::Fail);

    pool.stop();
    // Let a round already in flight finish, then nothing more may be counted.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let count = || {
        metrics
            .health_checks
            .with_label_values(&["p", &good.to_string(), "ok"])
            .get()
    };
    let before = count();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(count(), before, "stopped tasks do not ping");
}

#[tokio::test]
async fn start_health_without_checks_revives_a_carried_down_endpoint() {
    let metrics = Arc::new(Metrics::new());
    let pool = pool(pool_config(None, 0), &metrics);
    let ep = pool.endpoints[0].clone();
    ep.up.store(false, Ordering::Relaxed);
    ep.sync_up_metric();
    pool.refresh_capacity();
    assert_eq!(pool.metrics.capacity.get(), 4);
    pool.start_health(metrics);
    assert!(ep.is_available());
    assert_eq!(ep.metrics.up.get(), 1);
    assert_eq!(pool.metrics.capacity.get(), 8);
}
