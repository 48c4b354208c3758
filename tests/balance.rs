//! Balancer pools against several real PHP-FPM masters: weights, the bounded wait queue in
//! front of the endpoints' worker budgets, and failover when a master stops mid-load (no
//! GET lost, no POST run twice).

mod fake;
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

fn gate(endpoints: &str, pool_extra: &str) -> Gate {
    Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints:
{endpoints}
{pool_extra}
vhosts:
  - hosts: ["*"]
    root: {}
    pool: main
"#,
        php_root().display()
    ))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one() {
    let (a, b) = (fpm("a", 4), fpm("b", 4));
    let g = gate(
        &format!(
            "      - {{ addr: \"{}\", weight: 3 }}\n      - {{ addr: \"{}\", weight: 1 }}",
            a.endpoint(),
            b.endpoint()
        ),
        "    balance: round_robin",
    );
    let c = client();
    let mut n_a = 0;
    for _ in 0..4000 {
        if c.get(g.url("/env.php"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
            == "a"
        {
            n_a += 1;
        }
    }
    let share = f64::from(n_a) / 4000.0;
    assert!(
        (share - 0.75).abs() <= 0.05,
        "share of the weight-3 endpoint: {share}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturation_queues_then_503s_and_fpm_backlog_stays_empty() {
    // FPM's status answers on its own listener (pm.status_listen), so reading it does not
    // queue behind the workers fpmgate keeps connected.
    let with_status = |name: &str| {
        Fpm::start(FpmOptions {
            workers: 2,
            pool_name: name.into(),
            status_listen: true,
            ..FpmOptions::default()
        })
    };
    let (a, b) = (with_status("a"), with_status("b"));
    let g = gate(
        &format!(
            "      - {{ addr: \"{}\", max_conns: 2 }}\n      - {{ addr: \"{}\", max_conns: 2 }}",
            a.endpoint(),
            b.endpoint()
        ),
        "    queue: { size: 8, timeout: 1s }\n    keepalive: { max_idle: 2 }",
    );
    let c = client();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let (c, url) = (c.clone(), g.url("/sleep.php?ms=400"));
        tasks.push(tokio::spawn(async move {
            let resp = c.get(url).send().await.unwrap();
            (
                resp.status().as_u16(),
                started.elapsed(),
                resp.headers().get("retry-after").is_some(),
            )
        }));
    }
    let mut ok = 0;
    let mut full_at_once = 0;
    let mut timed_out = 0;
    for t in tasks {
        let (status, at, retry_after) = t.await.unwrap();
        match status {
            200 => ok += 1,
            503 => {
                assert!(retry_after);
                if at < Duration::from_millis(300) {
                    full_at_once += 1;
                } else {
                    assert!(at < Duration::from_millis(1600), "503 after {at:?}");
                    timed_out += 1;
                }
            }
            s => panic!("unexpected status {s}"),
        }
    }
    // 4 run at once, 8 wait and are served in two more 400 ms waves (the last starts at
    // ~800 ms, inside the 1 s queue timeout), 8 find the queue full and get 503 at once.
    assert_eq!((ok, full_at_once, timed_out), (12, 8, 0));
    // fpmgate held the excess, not FPM's kernel backlog.
    for f in [&a, &b] {
        let status = fake::fcgi_get(f.status_addr.unwrap(), "/fpm-status", "json");
        let v: serde_json::Value =
            serde_json::from_str(&status).unwrap_or_else(|e| panic!("{e}: {status}"));
        assert_eq!(v["max listen queue"], 0, "{v}");
    }
}

async fn failover_under_load(graceful: bool) {
    let (mut a, b) = (fpm("a", 4), fpm("b", 4));
    let count_file = tempfile::NamedTempFile::new().unwrap();
    let g = gate(
        &format!(
            "      - {{ addr: \"{}\" }}\n      - {{ addr: \"{}\" }}",
            a.endpoint(),
            b.endpoint()
        ),
        "    balance: round_robin\n    retries: 1",
    );
    let c = client();
    let failed = Arc::new(AtomicUsize::new(0));
    let posts_ok = Arc::new(AtomicUsize::new(0));
    let sem = Arc::new(tokio::sync::Semaphore::new(16));
    let mut tasks = Vec::new();
    let path = count_file.path().display().to_string();
    for i in 0..2000 {
        let permit = sem.clone().acquire_owned().await.unwrap();
        let (c, failed, posts_ok) = (c.clone(), failed.clone(), posts_ok.clone());
        let get_url = g.url("/env.php");
        let post_url = g.url(&format!("/count.php?file={path}&id={i}"));
        tasks.push(tokio::spawn(async move {
            if i % 10 == 0 {
                // POSTs may fail when their master dies under them, but never run twice.
                if let Ok(r) = c.post(post_url).body("x").send().await {
                    if r.status() == 200 {
                        posts_ok.fetch_add(1, Ordering::SeqCst);
                    }
                }
            } else {
                match c.get(get_url).send().await {
                    Ok(r) if r.status() == 200 => {}
                    other => {
                        eprintln!("GET failed: {:?}", other.map(|r| r.status()));
                        failed.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            drop(permit);
        }));
        if i == 600 {
            if graceful {
                a.stop_graceful();
            } else {
                a.stop_term();
            }
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "GETs lost while a master stopped; {:?}",
        g.logs().iter().rev().take(20).collect::<Vec<_>>()
    );
    // Every POST line in the count file is unique: none ran twice.
    let text = std::fs::read_to_string(count_file.path()).unwrap();
    let mut ids: Vec<&str> = text
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .collect();
    let total = ids.len();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), total, "a POST was executed twice");
    assert!(posts_ok.load(Ordering::SeqCst) <= total);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_master_gracefully_loses_no_get() {
    failover_under_load(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopping_a_master_with_sigterm_loses_no_get() {
    failover_under_load(false).await;
}

#[tokio::test]
async fn hash_cookie_is_sticky() {
    let (a, b) = (fpm("a", 2), fpm("b", 2));
    let g = gate(
        &format!(
            "      - {{ addr: \"{}\" }}\n      - {{ addr: \"{}\" }}",
            a.endpoint(),
            b.endpoint()
        ),
        "    balance: hash_cookie:sid",
    );
    let c = client();
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..20 {
        let mut first = None;
        for _ in 0..5 {
            let r = c
                .get(g.url("/env.php"))
                .header("Cookie", format!("x=1; sid=user{user}"))
                .send()
                .await
                .unwrap();
            let pool = r.text().await.unwrap();
            assert_eq!(*first.get_or_insert(pool.clone()), pool, "user{user} moved");
            seen.insert(pool);
        }
    }
    assert_eq!(seen.len(), 2, "20 users all hashed to one endpoint");
}
