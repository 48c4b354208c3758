//! Hot reload under load and graceful shutdown: config rewrites (by rename, as editors do)
//! switch a vhost between pools without a failed request; a broken config is rejected and
//! counted while the old one keeps serving; state that did not change survives; SIGTERM
//! lets in-flight requests finish within the grace in force (also one set by a reload), and
//! HTTP/2 clients get a GOAWAY first even when the grace is short.

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::{client, php_root, Fpm, FpmOptions, Gate};

fn fpm(name: &str, workers: usize) -> Fpm {
    Fpm::start(FpmOptions {
        workers,
        pool_name: name.to_string(),
        env: vec![("APP_POOL".into(), name.into())],
        ..FpmOptions::default()
    })
}

fn config(a: &Fpm, b: &Fpm, vhost_pool: &str) -> String {
    format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  a:
    endpoints: [ {{ addr: "{}", max_conns: 4 }} ]
  b:
    endpoints: [ {{ addr: "{}", max_conns: 4 }} ]
vhosts:
  - hosts: ["*"]
    root: {}
    pool: {vhost_pool}
shutdown_grace: 10s
"#,
        a.endpoint(),
        b.endpoint(),
        php_root().display()
    )
}

async fn which_pool(g: &Gate) -> String {
    client()
        .get(g.url("/env.php"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

async fn metric(g: &Gate, prefix: &str) -> f64 {
    let m = g.metrics().await;
    m.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_for_pool(g: &Gate, want: &str, within: Duration) -> Duration {
    let t = Instant::now();
    loop {
        if which_pool(g).await == want {
            return t.elapsed();
        }
        assert!(
            t.elapsed() < within,
            "vhost did not switch to pool {want} within {within:?}: {:?}",
            g.logs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_drops_nothing() {
    // Enough requests to span several reloads 200 ms apart, on a fast machine too.
    const TOTAL: usize = 10_000;
    let (a, b) = (fpm("a", 4), fpm("b", 4));
    let g = Gate::start(&config(&a, &b, "a"));
    assert_eq!(which_pool(&g).await, "a");

    let failures = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let c = client();
    let sem = Arc::new(tokio::sync::Semaphore::new(32));
    let mut tasks = Vec::new();
    let load = {
        let (failures, done, url) = (failures.clone(), done.clone(), g.url("/env.php"));
        tokio::spawn(async move {
            for _ in 0..TOTAL {
                let permit = sem.clone().acquire_owned().await.unwrap();
                let (c, url, failures, done) =
                    (c.clone(), url.clone(), failures.clone(), done.clone());
                tasks.push(tokio::spawn(async move {
                    match c.get(&url).send().await {
                        Ok(r) if r.status() == 200 => {
                            let body = r.text().await.unwrap_or_default();
                            if body != "a" && body != "b" {
                                failures.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        _ => {
                            failures.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    done.fetch_add(1, Ordering::SeqCst);
                    drop(permit);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
        })
    };
    let mut flip = false;
    let mut rewrites = 0;
    while !load.is_finished() {
        flip = !flip;
        g.rewrite_config(&config(&a, &b, if flip { "b" } else { "a" }));
        rewrites += 1;
        if rewrites == 2 {
            // A broken config in the middle of the load: rejected, old one keeps serving.
            g.rewrite_config("listen: [ { bind: \"127.0.0.1:0\" } ]\npools: { a: { endpoints: [] } }\nvhosts: oops\n");
            // Seen before the next write replaces it (a reload slowed by a loaded machine
            // could otherwise find the next valid file instead).
            let rejected = "fpmgate_config_reloads_total{result=\"failure\"}";
            wait_metric(&g, rejected, Duration::from_secs(10), |v| v >= 1.0).await;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    load.await.unwrap();
    assert_eq!(done.load(Ordering::SeqCst), TOTAL);
    assert_eq!(
        failures.load(Ordering::SeqCst),
        0,
        "failed requests during reloads; logs: {:?}",
        g.logs()
    );
    assert!(
        rewrites >= 3,
        "the load finished too fast to overlap reloads ({rewrites} rewrites)"
    );
    assert!(metric(&g, "fpmgate_config_reloads_total{result=\"failure\"}").await >= 1.0);
    assert!(metric(&g, "fpmgate_config_reloads_total{result=\"success\"}").await >= 2.0);

    // The switch is visible within a second of the write.
    g.rewrite_config(&config(&a, &b, "b"));
    let took = wait_for_pool(&g, "b", Duration::from_secs(1)).await;
    eprintln!("switch visible after {took:?}");
    g.rewrite_config(&config(&a, &b, "a"));
    wait_for_pool(&g, "a", Duration::from_secs(1)).await;
}

#[tokio::test]
async fn sighup_with_broken_config_keeps_serving_and_counts() {
    let (a, b) = (fpm("a", 2), fpm("b", 2));
    let g = Gate::start(&config(&a, &b, "a"));
    // Warm a kept connection, then reload a config that changes nothing about pool a.
    assert_eq!(which_pool(&g).await, "a");
    let connects_before = metric(&g, "fpmgate_upstream_connects_total{pool=\"a\"").await;
    let text = config(&a, &b, "a").replace("shutdown_grace: 10s", "shutdown_grace: 11s");
    g.rewrite_config(&text);
    g.signal("HUP");
    assert!(g.wait_for_log("config reloaded", Duration::from_secs(5)));
    for _ in 0..20 {
        assert_eq!(which_pool(&g).await, "a");
    }
    assert_eq!(
        metric(&g, "fpmgate_upstream_connects_total{pool=\"a\"").await,
        connects_before,
        "the untouched pool kept its idle connection across the reload"
    );

    std::fs::write(&g.config_path, "pools: [unclosed\n").unwrap();
    g.signal("HUP");
    assert!(g.wait_for_log("config reload rejected", Duration::from_secs(5)));
    assert_eq!(which_pool(&g).await, "a");
    assert!(metric(&g, "fpmgate_config_reloads_total{result=\"failure\"}").await >= 1.0);
    assert_eq!(
        metric(&g, "fpmgate_config_last_reload_successful ").await,
        0.0
    );
    let status = client()
        .get(g.admin_url("/status"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        status.contains("\"last_reload_error\": \"") && status.contains(":1:8: YAML syntax error"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish() {
    let a = fpm("a", 20);
    let b = fpm("b", 1);
    let mut g = Gate::start(&config(&a, &b, "a").replace("max_conns: 4", "max_conns: 20"));
    let c = client();
    let mut reqs = Vec::new();
    for _ in 0..20 {
        reqs.push(tokio::spawn(c.get(g.url("/sleep.php?ms=1500")).send()));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    g.signal("TERM");
    for r in reqs {
        let resp = r.await.unwrap().expect("in-flight request completes");
        assert_eq!(resp.status(), 200);
    }
    let status = g
        .wait_exit(Duration::from_secs(10))
        .expect("fpmgate exited");
    assert!(status.success(), "{status:?}");
}

/// Polls a metric until `ok` holds for it, for at most `within`.
async fn wait_metric(g: &Gate, prefix: &str, within: Duration, ok: impl Fn(f64) -> bool) -> f64 {
    let t = Instant::now();
    loop {
        let v = metric(g, prefix).await;
        if ok(v) || t.elapsed() > within {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_changes_a_busy_pool_keeps_its_queue() {
    // FPM has workers to spare: only fpmgate's admission (max_conns 2) holds requests back.
    let (a, b) = (fpm("a", 4), fpm("b", 1));
    let yaml = |size: usize| {
        config(&a, &b, "a")
            .replace(
                "max_conns: 4 } ]",
                "max_conns: 2 } ]\n    queue: { size: SIZE, timeout: 10s }",
            )
            .replace("SIZE", &size.to_string())
    };
    let g = Gate::start(&yaml(8));
    let c = client();
    let slow = |c: &reqwest::Client| c.get(g.url("/sleep.php?ms=1500")).send();
    let before: Vec<_> = (0..2).map(|_| tokio::spawn(slow(&c))).collect();
    let inflight = "fpmgate_pool_inflight_requests{pool=\"a\"}";
    let held = wait_metric(&g, inflight, Duration::from_secs(5), |v| v == 2.0).await;
    assert_eq!(held, 2.0, "{:?}", g.logs());

    // A changed definition of pool a: a new pool object replaces the old one.
    g.rewrite_config(&yaml(9));
    let generation = wait_metric(
        &g,
        "fpmgate_config_generation",
        Duration::from_secs(5),
        |v| v >= 2.0,
    )
    .await;
    assert!(generation >= 2.0, "reload not applied: {:?}", g.logs());

    // Both places are still taken by the old requests: new ones wait in the queue, where
    // the queue's size, order and timeout apply, rather than being let in on top.
    let after: Vec<_> = (0..2).map(|_| tokio::spawn(slow(&c))).collect();
    let depth = "fpmgate_pool_queue_depth{pool=\"a\"}";
    let queued = wait_metric(&g, depth, Duration::from_secs(1), |v| v == 2.0).await;
    assert_eq!(
        queued, 2.0,
        "requests admitted past a full pool after the reload"
    );
    assert_eq!(metric(&g, inflight).await, 2.0);

    for r in before.into_iter().chain(after) {
        let resp = r.await.unwrap().expect("request completes");
        assert_eq!(resp.status(), 200);
    }
    let left = wait_metric(&g, inflight, Duration::from_secs(2), |v| v == 0.0).await;
    assert_eq!(left, 0.0);
    // The pool's count came back to zero: a full pool's worth is let in without queueing.
    // (The histogram counts every admitted request; those let in at once are in its
    // lowest bucket.)
    let waits = async || {
        let all = metric(&g, "fpmgate_pool_queue_wait_seconds_count{pool=\"a\"}").await;
        let at_once = "fpmgate_pool_queue_wait_seconds_bucket{pool=\"a\",le=\"0.005\"}";
        all - metric(&g, at_once).await
    };
    let queued_so_far = waits().await;
    assert_eq!(queued_so_far, 2.0);
    let again: Vec<_> = (0..2)
        .map(|_| tokio::spawn(c.get(g.url("/sleep.php?ms=300")).send()))
        .collect();
    for r in again {
        assert_eq!(r.await.unwrap().expect("request").status(), 200);
    }
    assert_eq!(waits().await, queued_so_far, "a place was lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_queued_on_a_pool_a_reload_removes_are_still_served() {
    // The PHP upgrade: the vhost moves from pool a to pool b and a is removed, in one
    // reload, while a request waits in a's queue.
    let (a, b) = (fpm("a", 2), fpm("b", 2));
    let both = config(&a, &b, "a").replace(
        "max_conns: 4 } ]\n  b:",
        "max_conns: 1 } ]\n    queue: { size: 8, timeout: 10s }\n  b:",
    );
    assert!(both.contains("max_conns: 1"), "{both}");
    let g = Gate::start(&both);
    let c = client();
    let slow = tokio::spawn(c.get(g.url("/sleep.php?ms=1500")).send());
    let inflight = "fpmgate_pool_inflight_requests{pool=\"a\"}";
    wait_metric(&g, inflight, Duration::from_secs(5), |v| v == 1.0).await;
    let queued = tokio::spawn(c.get(g.url("/env.php")).send());
    let depth = "fpmgate_pool_queue_depth{pool=\"a\"}";
    let waiting = wait_metric(&g, depth, Duration::from_secs(5), |v| v == 1.0).await;
    assert_eq!(waiting, 1.0);

    let only_b = config(&a, &b, "b");
    let pool_a = only_b.find("  a:").unwrap();
    let pool_b = only_b.find("  b:").unwrap();
    g.rewrite_config(&format!("{}{}", &only_b[..pool_a], &only_b[pool_b..]));
    let generation = "fpmgate_config_generation";
    let applied = wait_metric(&g, generation, Duration::from_secs(5), |v| v >= 2.0).await;
    assert!(applied >= 2.0, "reload not applied: {:?}", g.logs());

    let resp = queued.await.unwrap().expect("the queued request completes");
    assert_eq!(resp.status(), 200, "the queued request was failed");
    assert_eq!(
        resp.text().await.unwrap(),
        "a",
        "served where it was queued"
    );
    assert_eq!(slow.await.unwrap().expect("slow").status(), 200);
    assert_eq!(which_pool(&g).await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_changed_by_reload_bounds_the_drain() {
    let (a, b) = (fpm("a", 2), fpm("b", 1));
    let cfg = config(&a, &b, "a").replace("shutdown_grace: 10s", "shutdown_grace: 60s");
    let mut g = Gate::start(&cfg);
    g.rewrite_config(&cfg.replace("shutdown_grace: 60s", "shutdown_grace: 1s"));
    g.signal("HUP");
    assert!(g.wait_for_log("config reloaded", Duration::from_secs(5)));
    let req = tokio::spawn(client().get(g.url("/sleep.php?ms=8000")).send());
    tokio::time::sleep(Duration::from_millis(400)).await;
    g.signal("TERM");
    let status = g
        .wait_exit(Duration::from_secs(30))
        .expect("fpmgate exited");
    assert!(status.success(), "{status:?}");
    // With the grace it started with (60 s) the request would have finished with a 200.
    assert!(
        g.logs()
            .iter()
            .any(|l| l.contains("shutdown grace elapsed with requests still in flight")),
        "{:?}",
        g.logs()
    );
    let cut = match req.await.unwrap() {
        Err(_) => true,
        Ok(r) => r.bytes().await.is_err(),
    };
    assert!(cut, "the 8 s request outlived a 1 s grace");
}

/// Reads one HTTP/2 frame; its type, or `None` once the server has closed.
async fn read_frame(sock: &mut tokio::net::TcpStream) -> Option<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    sock.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    sock.read_exact(&mut payload).await.ok()?;
    Some(head[3])
}

#[tokio::test]
async fn http2_connections_get_goaway_within_a_short_grace() {
    use tokio::io::AsyncWriteExt;
    let (a, b) = (fpm("a", 1), fpm("b", 1));
    let mut g =
        Gate::start(&config(&a, &b, "a").replace("shutdown_grace: 10s", "shutdown_grace: 400ms"));
    let addr = g.url("").trim_start_matches("http://").to_string();
    let mut sock = tokio::net::TcpStream::connect(&addr).await.unwrap();
    // h2c with prior knowledge: the preface and an empty SETTINGS frame, then its ACK of
    // the server's SETTINGS once that has arrived.
    sock.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    assert_eq!(
        read_frame(&mut sock).await,
        Some(4),
        "the server starts with SETTINGS"
    );
    sock.write_all(b"\0\0\0\x04\x01\0\0\0\0").await.unwrap();
    // At once: the connection's watchdog has just made its first check, and its next must
    // come within the grace.
    g.signal("TERM");
    let mut types = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(t) = read_frame(&mut sock).await {
            types.push(t);
        }
    })
    .await
    .expect("the connection closed");
    assert!(
        types.contains(&7),
        "no GOAWAY before the close: frame types {types:?}"
    );
    assert!(g
        .wait_exit(Duration::from_secs(10))
        .expect("exited")
        .success());
}

#[tokio::test]
async fn endpoints_added_by_reload_wait_for_rise_checks_unless_none_is_known_good() {
    let (a, b) = (fpm("a", 2), fpm("b", 2));
    let cfg = |endpoints: &str| {
        format!(
            r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  p:
    endpoints: [ {endpoints} ]
    balance: round_robin
    health: {{ interval: 400ms, timeout: 300ms, rise: 3, fall: 2 }}
vhosts:
  - hosts: ["*"]
    root: {}
    pool: p
"#,
            php_root().display()
        )
    };
    let g = Gate::start(&cfg(&format!("{{ addr: \"{}\" }}", a.endpoint())));
    assert_eq!(which_pool(&g).await, "a");
    g.rewrite_config(&cfg(&format!(
        "{{ addr: \"{}\" }}, {{ addr: \"{}\" }}",
        a.endpoint(),
        b.endpoint()
    )));
    let t = Instant::now();
    g.signal("HUP");
    assert!(g.wait_for_log("config reloaded", Duration::from_secs(5)));
    // Right after the reload the new endpoint has not passed its checks yet.
    for _ in 0..5 {
        assert_eq!(which_pool(&g).await, "a");
    }
    // After `rise` good pings it takes its share.
    loop {
        if which_pool(&g).await == "b" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the added endpoint never came up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "came up after {:?}, before 3 checks",
        t.elapsed()
    );

    // A reload that replaces every endpoint leaves none known to work: the new one starts
    // up, as at boot, instead of the pool having no capacity until its checks pass.
    let c = fpm("c", 2);
    g.rewrite_config(&cfg(&format!("{{ addr: \"{}\" }}", c.endpoint())));
    let reloads = g.count_log("config reloaded");
    g.signal("HUP");
    assert!(g.wait_for_log_count("config reloaded", reloads + 1, Duration::from_secs(5)));
    for _ in 0..10 {
        let resp = client().get(g.url("/env.php")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "the replaced pool had no capacity");
        assert_eq!(resp.text().await.unwrap(), "c");
    }
}

#[tokio::test]
async fn listeners_are_added_and_removed_by_reload() {
    let (a, b) = (fpm("a", 2), fpm("b", 1));
    let base = config(&a, &b, "a");
    let g = Gate::start(&base);
    let port = support::free_port();
    let extra = format!("listen:\n  - bind: \"127.0.0.1:0\"\n  - bind: \"127.0.0.1:{port}\"\n");
    g.rewrite_config(&base.replace("listen: [ { bind: \"127.0.0.1:0\" } ]\n", &extra));
    g.signal("HUP");
    assert!(
        g.wait_for_log(
            &format!("listening addr=127.0.0.1:{port}"),
            Duration::from_secs(5)
        ),
        "{:?}",
        g.logs()
    );
    let url = format!("http://127.0.0.1:{port}/env.php");
    assert_eq!(
        client()
            .get(&url)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
        "a"
    );
    assert_eq!(
        which_pool(&g).await,
        "a",
        "the first listener was not touched"
    );

    g.rewrite_config(&base);
    g.signal("HUP");
    assert!(
        g.wait_for_log("listener stopped", Duration::from_secs(5)),
        "{:?}",
        g.logs()
    );
    let t = Instant::now();
    loop {
        if support::client().get(&url).send().await.is_err() {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(3),
            "removed listener still accepts"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(which_pool(&g).await, "a");

    // A listener whose shape changes (PROXY protocol on) keeps its socket: the same port,
    // even one the kernel chose, now wants the PROXY header.
    let reloads = g.count_log("config reloaded");
    g.rewrite_config(&base.replace(
        "listen: [ { bind: \"127.0.0.1:0\" } ]",
        "listen: [ { bind: \"127.0.0.1:0\", proxy_protocol: true } ]",
    ));
    g.signal("HUP");
    assert!(g.wait_for_log_count("config reloaded", reloads + 1, Duration::from_secs(5)));
    let answer = tokio::task::spawn_blocking({
        let addr = g.http;
        move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr)?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.write_all(
                b"PROXY TCP4 192.0.2.7 127.0.0.1 4000 80\r\nGET /env.php HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            std::io::Result::Ok(out)
        }
    })
    .await
    .unwrap()
    .expect("the listener's port closed when its shape changed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("a"), "{answer}");
}

#[tokio::test]
async fn admin_post_reload_applies_or_rejects() {
    let (a, b) = (fpm("a", 2), fpm("b", 1));
    let g = Gate::start(&config(&a, &b, "a"));
    g.rewrite_config(&config(&a, &b, "b"));
    let r = client().post(g.admin_url("/reload")).send().await.unwrap();
    assert_eq!(r.status(), 200, "{:?}", r.text().await);
    assert_eq!(which_pool(&g).await, "b");
    std::fs::write(&g.config_path, "vhosts: [\n").unwrap();
    let r = client().post(g.admin_url("/reload")).send().await.unwrap();
    assert_eq!(r.status(), 422);
    assert!(
        r.text().await.unwrap().contains("fpmgate.yaml:"),
        "errors carry file and line"
    );
    assert_eq!(
        which_pool(&g).await,
        "b",
        "the running config keeps serving"
    );
}

#[tokio::test]
async fn a_reload_rotates_the_admin_token_and_removing_admin_locks_nothing_open() {
    let (a, b) = (fpm("a", 2), fpm("b", 1));
    let with_token = |t: &str| {
        config(&a, &b, "a").replace(
            "admin: { bind: \"127.0.0.1:0\" }",
            &format!("admin: {{ bind: \"127.0.0.1:0\", token: \"{t}\" }}"),
        )
    };
    let g = Gate::start(&with_token("one"));
    let post = |token: &'static str| {
        let r = client().post(g.admin_url("/reload"));
        let r = if token.is_empty() {
            r
        } else {
            r.bearer_auth(token)
        };
        async move { r.send().await.unwrap().status().as_u16() }
    };
    let served = "fpmgate_http_requests_total{";

    let generation = "fpmgate_config_generation";
    let applied = |n: f64| wait_metric(&g, generation, Duration::from_secs(5), move |v| v >= n);

    // The token follows reloads (the file watcher applies the change): it can be rotated
    // without a restart.
    g.rewrite_config(&with_token("two"));
    assert!(applied(2.0).await >= 2.0, "{:?}", g.logs());
    assert_eq!(post("one").await, 401, "the old token still works");
    assert_eq!(post("two").await, 200);

    // Without `admin:` the listener runs on until a restart: with its last token (not the
    // one rotated away, nor open to anyone), and the request metrics it serves go on
    // counting.
    let none = config(&a, &b, "a").replace("admin: { bind: \"127.0.0.1:0\" }\n", "");
    assert!(!none.contains("admin"), "{none}");
    let now = metric(&g, generation).await;
    g.rewrite_config(&none);
    assert!(applied(now + 1.0).await > now, "{:?}", g.logs());
    assert_eq!(post("").await, 401, "POSTs open to anyone");
    assert_eq!(post("one").await, 401, "the rotated-away token works again");
    assert_eq!(post("two").await, 200);
    let before = metric(&g, served).await;
    assert_eq!(which_pool(&g).await, "a");
    assert_eq!(
        metric(&g, served).await,
        before + 1.0,
        "requests not counted"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_triggered_together_run_one_at_a_time() {
    // "Write the file, then reload": the file watcher, SIGHUP and POST /reload all fire for
    // one change. Run at once, two reloads both bound the new listener's address, and one
    // was rejected (a false alarm on the reload alert).
    let (a, b) = (fpm("a", 2), fpm("b", 1));
    let base = config(&a, &b, "a");
    let g = Gate::start(&base);
    for _ in 0..6 {
        let port = support::free_port();
        let extra = format!("listen:\n  - bind: \"127.0.0.1:0\"\n  - bind: \"127.0.0.1:{port}\"\n");
        g.rewrite_config(&base.replace("listen: [ { bind: \"127.0.0.1:0\" } ]\n", &extra));
        let post = tokio::spawn(client().post(g.admin_url("/reload")).send());
        g.signal("HUP");
        assert_eq!(post.await.unwrap().unwrap().status(), 200, "{:?}", g.logs());
        let url = format!("http://127.0.0.1:{port}/env.php");
        let t = Instant::now();
        while client().get(&url).send().await.is_err() {
            assert!(t.elapsed() < Duration::from_secs(5), "{:?}", g.logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Let the last triggers finish before counting.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(g.count_log("config reload rejected"), 0, "{:?}", g.logs());
    assert_eq!(
        metric(&g, "fpmgate_config_last_reload_successful").await,
        1.0
    );
}
