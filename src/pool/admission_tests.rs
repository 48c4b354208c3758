//! The pool's admission queue under paused time: FIFO hand-over, a full queue answering at
//! once, waits ending exactly at `queue.timeout`, cancelled waiters leaving no trace (even one
//! handed a place before it looked), a pool without capacity failing at once, and admission
//! carried over to the pool a reload builds in its place.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::*;
use crate::config::{
    EndpointAddr, EndpointConfig, KeepaliveConfig, PassiveConfig, QueueConfig, TimeoutsConfig,
};
use crate::metrics::Metrics;

fn pool(max_conns: usize, queue: usize, timeout: Duration) -> Arc<Pool> {
    let cfg = config(&[1], max_conns, queue, timeout);
    let metrics = Metrics::new();
    let eps = endpoints(&cfg, &metrics);
    Arc::new(Pool::new(Arc::new(cfg), eps, metrics.pool("q")))
}

/// Pool "q" over endpoints on 127.0.0.1 at `ports`, each with `max_conns`.
fn config(ports: &[u16], max_conns: usize, queue: usize, timeout: Duration) -> PoolConfig {
    PoolConfig {
        name: "q".into(),
        endpoints: ports
            .iter()
            .map(|port| EndpointConfig {
                addr: EndpointAddr::Tcp(([127, 0, 0, 1], *port).into()),
                weight: 1,
                max_conns,
            })
            .collect(),
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
    }
}

fn endpoints(cfg: &PoolConfig, metrics: &Metrics) -> Vec<Arc<Endpoint>> {
    let settings = ConnSettings {
        connect_timeout: cfg.timeouts.connect,
        max_idle: 0,
        idle_timeout: Duration::from_secs(5),
    };
    cfg.endpoints
        .iter()
        .map(|e| {
            Arc::new(Endpoint::new(
                e,
                settings,
                metrics.endpoint("q", &e.addr.to_string()),
            ))
        })
        .collect()
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
    // Both waits are in the histogram: the first, admitted at once, as 0.
    let wait = &p.metrics.queue_wait;
    assert_eq!(wait.get_sample_count(), 2);
    assert_eq!(wait.get_sample_sum(), 0.75);
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

/// A request waiting in `p`'s queue that, once admitted, holds its place until told.
async fn queued_holding(
    p: &Arc<Pool>,
) -> (
    tokio::task::JoinHandle<Result<(), ProxyError>>,
    tokio::sync::oneshot::Sender<()>,
) {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let waiter = tokio::spawn({
        let p = p.clone();
        async move {
            let admit = p.admit().await?;
            let _ = rx.await;
            drop(admit);
            Ok(())
        }
    });
    tokio::task::yield_now().await;
    (waiter, tx)
}

/// A request holding a place in `p` and a slot on its endpoint `idx`.
struct Held {
    // Dropped in this order, as in a response body: the slot, then the place.
    _slot: Slot,
    _admit: Admit,
}

async fn hold(p: &Arc<Pool>, idx: usize) -> Held {
    let mut admit = p.admit().await.expect("a place");
    let slot = p.endpoints[idx].try_reserve().expect("a free slot");
    admit.attach(idx);
    Held {
        _slot: slot,
        _admit: admit,
    }
}

/// The pool a reload builds in place of `old` (same name, changed), over `eps`.
fn reloaded(old: &Pool, eps: Vec<Arc<Endpoint>>) -> Arc<Pool> {
    let mut cfg = (*old.config).clone();
    cfg.queue.size += 1;
    Pool::succeeding(Arc::new(cfg), eps, Metrics::new().pool("q"), old)
}

#[tokio::test(start_paused = true)]
async fn a_reload_keeps_the_places_in_flight_and_the_queue() {
    let old = pool(2, 4, Duration::from_secs(10));
    let first = hold(&old, 0).await;
    let second = hold(&old, 0).await;
    let (old_waiter, release_old) = queued_holding(&old).await;

    let new = reloaded(&old, old.endpoints.clone());
    // The endpoint's two workers are still busy with the old requests: a new one queues
    // behind the old waiter instead of being let in on top.
    let (new_waiter, release_new) = queued_holding(&new).await;
    assert_eq!(new.queue_len(), 2);
    assert_eq!(new.inflight(), 2);

    // Places go in order: the old waiter first, then the new one.
    drop(first);
    tokio::task::yield_now().await;
    assert_eq!(new.queue_len(), 1, "the old waiter got the place");
    assert_eq!(new.inflight(), 2);
    drop(second);
    tokio::task::yield_now().await;
    assert_eq!(new.queue_len(), 0, "then the new one");
    assert_eq!(new.inflight(), 2);
    for (waiter, release) in [(old_waiter, release_old), (new_waiter, release_new)] {
        let _ = release.send(());
        waiter.await.expect("join").expect("admitted");
    }
    assert_eq!(new.inflight(), 0);
}

/// A pool over two endpoints of one slot each, and the metrics its endpoints came from.
fn two_endpoints() -> (Arc<Pool>, Metrics) {
    let cfg = config(&[1, 2], 1, 4, Duration::from_secs(10));
    let metrics = Metrics::new();
    let eps = endpoints(&cfg, &metrics);
    let pool = Arc::new(Pool::new(Arc::new(cfg), eps, metrics.pool("q")));
    (pool, metrics)
}

#[tokio::test(start_paused = true)]
async fn places_on_an_endpoint_the_reload_removed_do_not_count_against_the_new_ones() {
    let (old, metrics) = two_endpoints();
    let on_kept = hold(&old, 0).await;
    let on_removed = hold(&old, 1).await;

    // The reload keeps the first endpoint and replaces the second by a new one.
    let fresh = endpoints(&config(&[3], 1, 4, Duration::from_secs(10)), &metrics);
    let new = reloaded(&old, vec![Arc::clone(&old.endpoints[0]), fresh[0].clone()]);
    assert_eq!(
        new.inflight(),
        1,
        "only the place on the kept endpoint counts"
    );
    let t = Instant::now();
    let admitted = new.admit().await.expect("the new endpoint is free");
    assert_eq!(t.elapsed(), Duration::ZERO);

    // Both endpoints are busy now; the end of the request on the removed one frees neither.
    let waiter = queued(&new).await;
    drop(on_removed);
    tokio::task::yield_now().await;
    assert!(!waiter.is_finished());
    assert_eq!(new.inflight(), 2);
    drop(on_kept);
    waiter.await.expect("join").expect("admitted");
    drop(admitted);
    assert_eq!(new.inflight(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_request_moving_off_a_removed_endpoint_counts_again() {
    let (old, metrics) = two_endpoints();
    let mut admit = old.admit().await.expect("a place");
    let slot = old.endpoints[1].try_reserve().expect("slot");
    admit.attach(1);

    let new = reloaded(&old, vec![Arc::clone(&old.endpoints[0])]);
    assert_eq!(new.inflight(), 0);
    // The request fails on the removed endpoint and is retried on the kept one, whose slot
    // it now takes: it counts again.
    drop(slot);
    let slot = old.endpoints[0].try_reserve().expect("slot");
    admit.attach(0);
    assert_eq!(new.inflight(), 1);
    let waiter = queued(&new).await;
    assert!(!waiter.is_finished(), "the kept endpoint is full");

    // A second reload that removes that endpoint too: the place is set aside once.
    let fresh = endpoints(&config(&[3], 1, 4, Duration::from_secs(10)), &metrics);
    let newer = reloaded(&new, fresh);
    waiter
        .await
        .expect("join")
        .expect("admitted to the newest endpoint");
    assert_eq!(newer.inflight(), 0);
    drop(slot);
    drop(admit);
    assert_eq!(newer.inflight(), 0, "its end is not counted again");
    let _one = newer.admit().await.expect("a place");
    assert_eq!(newer.inflight(), 1);
}

#[tokio::test(start_paused = true)]
async fn a_request_queued_before_a_reload_is_sent_to_the_new_endpoints() {
    let old = pool(1, 4, Duration::from_secs(10));
    let held = hold(&old, 0).await;
    let waiter = tokio::spawn({
        let old = old.clone();
        async move {
            let admit = old.admit().await.expect("admitted");
            let pool = Arc::clone(admit.pool().expect("armed"));
            (pool, admit)
        }
    });
    tokio::task::yield_now().await;

    // The reload replaces the busy endpoint: the new one is free, and the request queued
    // on the old pool object gets it rather than the old endpoint.
    let metrics = Metrics::new();
    let fresh = endpoints(&config(&[2], 1, 4, Duration::from_secs(10)), &metrics);
    let new = reloaded(&old, fresh);
    let (armed, admit) = waiter.await.expect("join");
    assert!(Arc::ptr_eq(&armed, &new), "armed with the newest pool");
    assert_eq!(new.inflight(), 1);
    // A request that read the old config snapshot is sent to the new pool as well.
    drop(held);
    assert_eq!(
        new.inflight(),
        1,
        "the old place was set aside at the reload"
    );
    drop(admit);
    let late = old.admit().await.expect("a place");
    assert!(Arc::ptr_eq(late.pool().expect("armed"), &new));
    drop(late);
    assert_eq!(new.inflight(), 0);

    // The old pool object forwards a capacity change to the new one.
    new.endpoints[0]
        .draining
        .store(true, std::sync::atomic::Ordering::Relaxed);
    old.refresh_capacity();
    assert!(matches!(new.admit().await, Err(ProxyError::NoHealthy)));
}

fn set_draining(p: &Pool, idx: usize, on: bool) {
    p.endpoints[idx]
        .draining
        .store(on, std::sync::atomic::Ordering::Relaxed);
    p.refresh_capacity();
}

#[tokio::test(start_paused = true)]
async fn places_on_an_unavailable_endpoint_do_not_hold_back_the_others() {
    let (p, _metrics) = two_endpoints();
    let on_drained = hold(&p, 0).await;
    let on_healthy = hold(&p, 1).await;
    let waiter = queued(&p).await;

    // The first endpoint is drained (as an ejection or a failed check would take it out)
    // while its request runs: that request no longer counts against the second one.
    set_draining(&p, 0, true);
    assert_eq!(p.inflight(), 1);
    drop(on_healthy);
    waiter
        .await
        .expect("join")
        .expect("admitted when the healthy endpoint's place came back");
    assert_eq!(p.inflight(), 0);
    // The end of the drained endpoint's request is not counted a second time.
    let held = hold(&p, 1).await;
    drop(on_drained);
    assert_eq!(p.inflight(), 1);

    // Back in service, its places in flight count again.
    let again = {
        set_draining(&p, 0, false);
        hold(&p, 0).await
    };
    set_draining(&p, 0, true);
    assert_eq!(p.inflight(), 1, "set aside");
    set_draining(&p, 0, false);
    assert_eq!(p.inflight(), 2, "counted again");
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(1), p.admit()).await,
        Ok(Err(ProxyError::QueueTimeout)) | Err(_)
    ));
    drop(again);
    drop(held);
    assert_eq!(p.inflight(), 0);
}
