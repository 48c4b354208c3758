//! The pool's admission queue under paused time: FIFO hand-over, a full queue answering at
//! once, waits ending exactly at `queue.timeout`, cancelled waiters leaving no trace (even one
//! handed a place before it looked), and a pool without capacity failing at once.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::{
    EndpointAddr, EndpointConfig, KeepaliveConfig, PassiveConfig, QueueConfig, TimeoutsConfig,
};
use crate::metrics::Metrics;

fn pool(max_conns: usize, queue: usize, timeout: Duration) -> Arc<Pool> {
    let cfg = PoolConfig {
        name: "q".into(),
        endpoints: vec![EndpointConfig {
            addr: EndpointAddr::Tcp("127.0.0.1:1".parse().expect("addr")),
            weight: 1,
            max_conns,
        }],
        balance: BalancePolicy::LeastConn,
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
            size: queue,
            timeout,
        },
        retries: 1,
        resolve_interval: Duration::from_secs(5),
        retry_after: 1,
        health: None,
        passive: PassiveConfig {
            fails: 0,
            window: Duration::from_secs(1),
            eject: Duration::from_secs(1),
        },
        status: None,
        params: Vec::new(),
    };
    let metrics = Metrics::new();
    let settings = ConnSettings {
        connect_timeout: cfg.timeouts.connect,
        max_idle: 0,
        idle_timeout: Duration::from_secs(5),
    };
    let eps = cfg
        .endpoints
        .iter()
        .map(|e| {
            Arc::new(Endpoint::new(
                e,
                settings,
                metrics.endpoint("q", &e.addr.to_string()),
            ))
        })
        .collect();
    Arc::new(Pool::new(Arc::new(cfg), eps, metrics.pool("q")))
}

#[tokio::test(start_paused = true)]
async fn full_queue_answers_at_once_and_places_are_handed_over_in_order() {
    let p = pool(2, 2, Duration::from_secs(10));
    let a = p.admit().await.expect("first");
    let _b = p.admit().await.expect("second");
    assert_eq!(p.inflight(), 2);

    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for n in 0..2 {
        let (p, tx) = (p.clone(), tx.clone());
        tokio::spawn(async move {
            let admit = p.admit().await;
            let _ = tx.send((n, admit.is_ok()));
            // Hold the place until the test ends.
            tokio::time::sleep(Duration::from_secs(3600)).await;
            drop(admit);
        });
        tokio::task::yield_now().await;
    }
    tokio::task::yield_now().await;
    assert_eq!(p.queue_len(), 2);
    let t = Instant::now();
    assert!(matches!(p.admit().await, Err(ProxyError::QueueFull)));
    assert_eq!(t.elapsed(), Duration::ZERO, "a full queue does not wait");

    drop(a);
    assert_eq!(
        rx.recv().await,
        Some((0, true)),
        "the first waiter gets the freed place"
    );
    assert_eq!(
        p.inflight(),
        2,
        "the place was handed over, not released and re-taken"
    );
    assert_eq!(p.queue_len(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_wait_ends_exactly_at_the_queue_timeout() {
    let p = pool(1, 4, Duration::from_millis(750));
    let _held = p.admit().await.expect("first");
    let t = Instant::now();
    assert!(matches!(p.admit().await, Err(ProxyError::QueueTimeout)));
    assert_eq!(t.elapsed(), Duration::from_millis(750));
    assert_eq!(p.inflight(), 1);
}

/// A request waiting in `p`'s queue (spawned, and run until it waits).
async fn queued(p: &Arc<Pool>) -> tokio::task::JoinHandle<Result<(), ProxyError>> {
    let waiter = tokio::spawn({
        let p = p.clone();
        async move { p.admit().await.map(|_| ()) }
    });
    tokio::task::yield_now().await;
    waiter
}

#[tokio::test(start_paused = true)]
async fn a_cancelled_waiter_leaves_the_queue() {
    let p = pool(1, 1, Duration::from_secs(10));
    let held = p.admit().await.expect("first");
    // A client that goes away drops its request future while it waits.
    let waiter = queued(&p).await;
    assert_eq!(p.queue_len(), 1);
    waiter.abort();
    let _ = waiter.await;
    // Its slot in the queue is free again for the next client.
    let next = tokio::spawn({
        let p = p.clone();
        async move { p.admit().await.is_ok() }
    });
    tokio::task::yield_now().await;
    drop(held);
    assert!(
        next.await.expect("join"),
        "the place went to the live waiter"
    );
    assert_eq!(p.inflight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_place_handed_to_a_waiter_cancelled_before_it_looks_is_not_lost() {
    let p = pool(1, 1, Duration::from_secs(10));
    let held = p.admit().await.expect("first");
    let waiter = queued(&p).await;
    assert_eq!(p.queue_len(), 1);
    // The place is handed to the waiter, which is cancelled before it runs again.
    drop(held);
    waiter.abort();
    let _ = waiter.await;
    assert_eq!(p.inflight(), 0, "the handed-over place came back");
    let t = Instant::now();
    let again = p.admit().await.expect("a place is free");
    assert_eq!(t.elapsed(), Duration::ZERO, "admitted at once, not queued");
    drop(again);
    assert_eq!(p.inflight(), 0);
}

#[tokio::test(start_paused = true)]
async fn no_capacity_fails_at_once_and_fails_waiters() {
    let p = pool(1, 4, Duration::from_secs(10));
    let held = p.admit().await.expect("first");
    let waiter = queued(&p).await;
    // The only endpoint goes away (drained): capacity 0.
    p.endpoints[0]
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    p.refresh_capacity();
    assert!(matches!(
        waiter.await.expect("join"),
        Err(ProxyError::NoHealthy)
    ));
    assert!(matches!(p.admit().await, Err(ProxyError::NoHealthy)));
    drop(held);
    assert_eq!(p.inflight(), 0);
}
