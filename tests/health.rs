//! Health against real PHP-FPM masters: active pings take a killed master out and bring it
//! back without a client-visible error; saturation is not death; passive ejection; drain and
//! enable through the admin API (with its token); FPM status figures in `/metrics`.
//!
//! Intervals are short so the whole file runs in seconds; every wait polls with a deadline.

mod support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;
use support::{client, free_port, php_root, Fpm, FpmOptions, Gate};

/// Runs blocking harness work (process spawn, stop, restart) on a multi-thread runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

fn fpm(name: &str, workers: usize) -> Fpm {
    Fpm::start(FpmOptions {
        workers,
        pool_name: name.to_string(),
        env: vec![("APP_POOL".into(), name.into())],
        ..FpmOptions::default()
    })
}

fn gate_config(pool_body: &str, admin_extra: &str) -> String {
    format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" {admin_extra} }}
pools:
  app:
{pool_body}
vhosts:
  - hosts: ["*"]
    root: {}
    pool: app
"#,
        php_root().display()
    )
}

async fn get_text(url: &str) -> (u16, String) {
    match client().get(url).send().await {
        Ok(r) => {
            let code = r.status().as_u16();
            (code, r.text().await.unwrap_or_default())
        }
        Err(e) => (0, e.to_string()),
    }
}

async fn status(g: &Gate) -> Value {
    let (code, body) = get_text(&g.admin_url("/status")).await;
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).expect("status JSON")
}

/// The `/status` object of endpoint `addr` in pool `app`.
fn endpoint<'a>(doc: &'a Value, addr: &str) -> &'a Value {
    doc["pools"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "app"))
        .and_then(|p| p["endpoints"].as_array())
        .and_then(|e| e.iter().find(|e| e["addr"] == addr))
        .unwrap_or_else(|| panic!("no endpoint {addr} in {doc}"))
}

async fn state(g: &Gate, addr: &str) -> String {
    endpoint(&status(g).await, addr)["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Polls until `addr` is in `want`; returns how long that took.
async fn wait_state(g: &Gate, addr: &str, want: &str, timeout: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let s = state(g, addr).await;
        if s == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < timeout,
            "{addr} still {s}, not {want}, after {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// One sample of a metric series: `name{...k="v"...} value`.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (series, value) = l.rsplit_once(' ')?;
        let (n, rest) = series.split_at(series.find('{').unwrap_or(series.len()));
        let matches = n == name
            && labels
                .iter()
                .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
        matches.then(|| value.parse().ok()).flatten()
    })
}

async fn metrics(g: &Gate) -> String {
    get_text(&g.admin_url("/metrics")).await.1
}

async fn series(g: &Gate, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&metrics(g).await, name, labels).unwrap_or(0.0)
}

/// Client GETs in a loop until stopped: (status, body) of each.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u16, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: String, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, seen, url) = (stop.clone(), seen.clone(), url.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let r = get_text(&url).await;
                        seen.lock().unwrap().push(r);
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                })
            })
            .collect();
        Load { stop, seen, tasks }
    }

    fn count(&self, body: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.1 == body)
            .count()
    }

    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn finish(self) -> Vec<(u16, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        Arc::try_unwrap(self.seen)
            .expect("tasks done")
            .into_inner()
            .unwrap()
    }
}

async fn wait_seen(load: &Load, body: &str, timeout: Duration) {
    let start = Instant::now();
    while load.count(body) == 0 {
        assert!(start.elapsed() < timeout, "no response from {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_master_goes_down_and_comes_back_without_client_errors() {
    let (a, mut b) = blocking(|| (fpm("a", 4), fpm("b", 4)));
    let (interval, timeout, rise, fall) = (200u64, 500u64, 2u64, 2u64);
    let pool = format!(
        r#"    endpoints: [ {{ addr: "{}" }}, {{ addr: "{}" }} ]
    balance: round_robin
    retries: 1
    health: {{ interval: {interval}ms, timeout: {timeout}ms, rise: {rise}, fall: {fall}, passive: {{ fails: 0 }} }}"#,
        a.endpoint(),
        b.endpoint()
    );
    let g = blocking(|| Gate::start(&gate_config(&pool, "")));
    let (a_addr, b_addr) = (a.endpoint(), b.endpoint());

    let load = Load::start(g.url("/env.php?name=APP_POOL"), 2);
    wait_seen(&load, "a", Duration::from_secs(5)).await;
    wait_seen(&load, "b", Duration::from_secs(5)).await;

    blocking(|| b.stop_term());
    let took = wait_state(&g, &b_addr, "down", Duration::from_secs(10)).await;
    let bound = Duration::from_millis(fall * interval + timeout + 1500);
    assert!(took <= bound, "down after {took:?}, bound {bound:?}");
    let doc = status(&g).await;
    let last = &endpoint(&doc, &b_addr)["last_check"];
    assert_eq!(last["result"], "fail", "{last}");
    assert!(last["reason"].as_str().is_some_and(|r| !r.is_empty()));
    assert!(last["at_unix_ms"].as_u64().is_some_and(|t| t > 0));

    // Down: no request is sent there any more (not even one retried away).
    let labels = [("pool", "app"), ("endpoint", b_addr.as_str())];
    let errors_before = series(&g, "fpmgate_upstream_errors_total", &labels).await;
    let served_before = load.count("b");
    let n_before = load.len();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(load.len() > n_before + 10, "load kept running");
    assert_eq!(load.count("b"), served_before);
    let errors_after = series(&g, "fpmgate_upstream_errors_total", &labels).await;
    assert_eq!(errors_before, errors_after, "a down endpoint got requests");
    assert_eq!(
        series(&g, "fpmgate_endpoint_up", &labels).await,
        0.0,
        "endpoint_up gauge"
    );

    blocking(|| b.restart());
    let took = wait_state(&g, &b_addr, "up", Duration::from_secs(10)).await;
    let bound = Duration::from_millis(rise * interval + timeout + 1500);
    assert!(took <= bound, "up after {took:?}, bound {bound:?}");
    let back_from = load.count("b");
    let start = Instant::now();
    while load.count("b") == back_from {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "b takes no traffic"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(state(&g, &a_addr).await, "up");

    let seen = load.finish().await;
    let bad: Vec<_> = seen.iter().filter(|r| r.0 != 200).collect();
    assert!(bad.is_empty(), "client-visible errors: {bad:?}");
    let ok = series(
        &g,
        "fpmgate_health_checks_total",
        &[("endpoint", &a_addr), ("result", "ok")],
    )
    .await;
    assert!(ok >= 3.0, "ok checks counted: {ok}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saturated_endpoint_stays_up() {
    let f = blocking(|| fpm("s", 2));
    let addr = f.endpoint();
    let pool = format!(
        r#"    endpoints: [ {{ addr: "{addr}", max_conns: 2 }} ]
    queue: {{ size: 8, timeout: 10s }}
    health: {{ interval: 500ms, timeout: 1s, fall: 2, rise: 2 }}"#
    );
    let g = blocking(|| Gate::start(&gate_config(&pool, "")));
    wait_state(&g, &addr, "up", Duration::from_secs(2)).await;

    let slow: Vec<_> = (0..2)
        .map(|_| {
            let url = g.url("/sleep.php?ms=3000");
            tokio::spawn(async move { get_text(&url).await.0 })
        })
        .collect();
    let start = Instant::now();
    let mut polls = 0;
    while start.elapsed() < Duration::from_millis(3500) {
        let s = state(&g, &addr).await;
        assert_eq!(
            s,
            "up",
            "saturated endpoint marked {s} after {:?}",
            start.elapsed()
        );
        polls += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(polls > 10);
    for t in slow {
        assert_eq!(t.await.expect("slow request"), 200);
    }
    let labels = [("endpoint", addr.as_str()), ("result", "busy")];
    let busy = series(&g, "fpmgate_health_checks_total", &labels).await;
    assert!(busy >= 1.0, "pings during saturation are counted as busy");
    let labels = [("endpoint", addr.as_str()), ("result", "fail")];
    assert_eq!(
        series(&g, "fpmgate_health_checks_total", &labels).await,
        0.0
    );
    assert_eq!(state(&g, &addr).await, "up");
}

/// A loopback address where nothing listens.
fn closed_addr() -> String {
    format!("127.0.0.1:{}", free_port())
}

/// Sequential GETs until `bad` counted `n` connect errors; every answer must be 200.
async fn hit_bad(g: &Gate, bad: &str, n: f64) {
    let labels = [("endpoint", bad), ("kind", "connect")];
    for _ in 0..40 {
        if series(g, "fpmgate_upstream_errors_total", &labels).await >= n {
            return;
        }
        let (code, body) = get_text(&g.url("/env.php?name=APP_POOL")).await;
        assert_eq!(
            (code, body.as_str()),
            (200, "good"),
            "retried to the good one"
        );
    }
    panic!("{bad} never reached {n} connect errors");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_without_active_checks() {
    let good = blocking(|| fpm("good", 2));
    let bad = closed_addr();
    // `health:` with only `passive`: no pings, passive ejection tuned.
    let pool = format!(
        r#"    endpoints: [ {{ addr: "{bad}" }}, {{ addr: "{}" }} ]
    balance: round_robin
    retries: 1
    health: {{ passive: {{ fails: 2, window: 10s, eject: 2s }} }}"#,
        good.endpoint()
    );
    let g = blocking(|| Gate::start(&gate_config(&pool, "")));
    hit_bad(&g, &bad, 2.0).await;
    let ejected_at = Instant::now();
    let doc = status(&g).await;
    let ep = endpoint(&doc, &bad);
    assert_eq!(ep["state"], "ejected", "{ep}");
    assert!(ep["ejected_until"].as_u64().is_some(), "{ep}");
    assert_eq!(ep["healthy"], true, "no active verdict without pings");
    assert!(ep["last_check"].is_null(), "no pings: {ep}");
    let up = [("endpoint", bad.as_str())];
    assert_eq!(series(&g, "fpmgate_endpoint_up", &up).await, 0.0);

    let labels = [("endpoint", bad.as_str()), ("kind", "connect")];
    let before = series(&g, "fpmgate_upstream_errors_total", &labels).await;
    for _ in 0..10 {
        let (code, body) = get_text(&g.url("/env.php?name=APP_POOL")).await;
        assert_eq!((code, body.as_str()), (200, "good"));
    }
    assert_eq!(
        series(&g, "fpmgate_upstream_errors_total", &labels).await,
        before,
        "an ejected endpoint got requests"
    );
    assert_eq!(get_text(&g.admin_url("/readyz")).await.0, 200);

    // Without pings it returns by itself when the ejection time is over.
    let took = wait_state(&g, &bad, "up", Duration::from_secs(5)).await;
    assert!(
        ejected_at.elapsed() >= Duration::from_millis(1500),
        "{took:?}"
    );
    assert_eq!(series(&g, "fpmgate_endpoint_up", &up).await, 1.0);
    hit_bad(&g, &bad, before + 1.0).await;
    assert_eq!(g.count_log("endpoint ejected"), 1, "logged once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passive_ejection_with_active_checks_needs_probes_to_return() {
    let good = blocking(|| fpm("good", 2));
    let bad = closed_addr();
    // Pings are rare here (one at start), so the ejection is the only thing that acts.
    let pool = format!(
        r#"    endpoints: [ {{ addr: "{bad}" }}, {{ addr: "{}" }} ]
    balance: round_robin
    retries: 1
    health: {{ interval: 3600s, timeout: 500ms, fall: 3, passive: {{ fails: 2, window: 10s, eject: 1s }} }}"#,
        good.endpoint()
    );
    let g = blocking(|| Gate::start(&gate_config(&pool, "")));
    hit_bad(&g, &bad, 2.0).await;
    assert_eq!(state(&g, &bad).await, "ejected");
    // After the ejection it waits for `rise` good pings, which this dead address never gives.
    wait_state(&g, &bad, "down", Duration::from_secs(3)).await;
    let labels = [("endpoint", bad.as_str()), ("kind", "connect")];
    let before = series(&g, "fpmgate_upstream_errors_total", &labels).await;
    for _ in 0..6 {
        let (code, body) = get_text(&g.url("/env.php?name=APP_POOL")).await;
        assert_eq!((code, body.as_str()), (200, "good"));
    }
    assert_eq!(
        series(&g, "fpmgate_upstream_errors_total", &labels).await,
        before
    );
}

async fn post(g: &Gate, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = client().post(g.admin_url(path));
    if let Some(t) = token {
        req = req.header("Authorization", format!("Bearer {t}"));
    }
    let r = req.send().await.expect("admin POST");
    let code = r.status().as_u16();
    (code, r.text().await.unwrap_or_default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_and_enable_through_the_admin_api() {
    // One master, two listeners: FPM pools `d` (TCP) and `d_unix` tell them apart.
    let f = blocking(|| {
        Fpm::start(FpmOptions {
            unix: true,
            pool_name: "d".into(),
            ..FpmOptions::default()
        })
    });
    let (tcp, unix) = (f.endpoint(), f.unix_endpoint());
    let pool = format!(
        r#"    endpoints: [ {{ addr: "{tcp}", max_conns: 1 }}, {{ addr: "{unix}", max_conns: 1 }} ]
    balance: round_robin
    health: {{ interval: 200ms, timeout: 1s }}"#
    );
    let g = blocking(|| Gate::start(&gate_config(&pool, r#", token: "s3cret""#)));
    let who = g.url("/env.php?name=FPMGATE_TEST_POOL");
    let name_of = |addr: &str| if addr == tcp { "d" } else { "d_unix" };
    // Pings over TCP and over the unix socket both succeed.
    for addr in [&tcp, &unix] {
        let start = Instant::now();
        while endpoint(&status(&g).await, addr)["last_check"]["result"] != "ok" {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "{addr} never pinged ok"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    // A slow request in flight on one endpoint; find which.
    let slow_url = g.url("/sleep.php?ms=1500");
    let slow = tokio::spawn(async move { get_text(&slow_url).await.0 });
    let start = Instant::now();
    let target = loop {
        let doc = status(&g).await;
        if let Some(a) = [&tcp, &unix]
            .into_iter()
            .find(|a| endpoint(&doc, a)["inflight"] == 1)
        {
            break a.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "slow request not in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let other = if target == tcp { &unix } else { &tcp };
    let enc = utf8_percent_encode(&target, NON_ALPHANUMERIC).to_string();
    let drain = format!("/pools/app/endpoints/{enc}/drain");

    assert_eq!(post(&g, &drain, None).await.0, 401);
    assert_eq!(post(&g, &drain, Some("wrong")).await.0, 401);
    let (code, body) = post(&g, &drain, Some("s3cret")).await;
    assert_eq!(code, 200, "{body}");
    let doc: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(doc["endpoint"]["state"], "draining", "{doc}");

    for _ in 0..8 {
        let (code, body) = get_text(&who).await;
        assert_eq!((code, body.as_str()), (200, name_of(other)));
    }
    // With one place per endpoint, the drained endpoint's request in flight no longer
    // counts against the other: they did not wait for it.
    assert!(
        !slow.is_finished(),
        "requests waited for the drained endpoint"
    );
    assert_eq!(
        slow.await.expect("slow request"),
        200,
        "in-flight request finished"
    );
    assert_eq!(state(&g, &target).await, "draining");

    // A reload that rebuilds the pool keeps the endpoint objects: the drain survives, and
    // the new pool's checker keeps pinging.
    g.rewrite_config(&gate_config(
        &format!("{pool}\n    retries: 2"),
        r#", token: "s3cret""#,
    ));
    assert!(g.wait_for_log("config reloaded", Duration::from_secs(10)));
    assert_eq!(state(&g, &target).await, "draining");
    let at = |doc: &Value| endpoint(doc, &target)["last_check"]["at_unix_ms"].as_u64();
    let before = at(&status(&g).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        at(&status(&g).await) > before,
        "pings go on after the reload"
    );
    for _ in 0..4 {
        let (code, body) = get_text(&who).await;
        assert_eq!((code, body.as_str()), (200, name_of(other)));
    }

    let enable = format!("/pools/app/endpoints/{enc}/enable");
    let (code, body) = post(&g, &enable, Some("s3cret")).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(state(&g, &target).await, "up");
    let mut back = false;
    for _ in 0..8 {
        let (code, body) = get_text(&who).await;
        assert_eq!(code, 200);
        back |= body == name_of(&target);
    }
    assert!(back, "enabled endpoint takes traffic again");

    // The raw (unencoded) form, unknown names, the reload stub, reads without a token.
    let raw = format!("/pools/app/endpoints/{tcp}/drain");
    assert_eq!(post(&g, &raw, Some("s3cret")).await.0, 200);
    assert_eq!(state(&g, &tcp).await, "draining");
    let raw = format!("/pools/app/endpoints/{unix}/enable");
    assert_eq!(post(&g, &raw, Some("s3cret")).await.0, 200);
    let raw = format!("/pools/app/endpoints/{tcp}/enable");
    assert_eq!(post(&g, &raw, Some("s3cret")).await.0, 200);
    assert_eq!(state(&g, &tcp).await, "up");
    let unknown = "/pools/nope/endpoints/127.0.0.1%3A1/drain";
    assert_eq!(post(&g, unknown, Some("s3cret")).await.0, 404);
    let unknown = "/pools/app/endpoints/127.0.0.1%3A1/drain";
    assert_eq!(post(&g, unknown, Some("s3cret")).await.0, 404);
    assert_eq!(post(&g, "/reload", None).await.0, 401);
    assert_eq!(
        post(&g, "/reload", Some("s3cret")).await.0,
        200,
        "POST /reload applies the file like SIGHUP"
    );
    assert_eq!(get_text(&g.admin_url("/status")).await.0, 200);
    assert_eq!(get_text(&g.admin_url("/metrics")).await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fpm_status_figures_match_fpms_own_page() {
    // The status path ends in `.php` so a client can reach it through the proxy's mapping;
    // FPM answers it before any script lookup.
    let f = blocking(|| {
        Fpm::start(FpmOptions {
            workers: 3,
            extra_ini: vec!["pm.status_path = /fpm-status.php".into()],
            ..FpmOptions::default()
        })
    });
    let addr = f.endpoint();
    let pool = format!(
        r#"    endpoints: [ {{ addr: "{addr}" }} ]
    status: /fpm-status.php
    health: {{ interval: 300ms, timeout: 1s }}"#
    );
    let g = blocking(|| Gate::start(&gate_config(&pool, "")));
    let labels = [("pool", "app"), ("endpoint", addr.as_str())];
    let start = Instant::now();
    let m1 = loop {
        if let Some(v) = metric(
            &metrics(&g).await,
            "fpmgate_fpm_accepted_connections",
            &labels,
        ) {
            break v;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no scrape");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    let (code, body) = get_text(&g.url("/fpm-status.php?json")).await;
    assert_eq!(code, 200, "{body}");
    let page: Value = serde_json::from_str(&body).expect("FPM status JSON");
    let accepted = page["accepted conn"].as_f64().expect("accepted conn");
    assert!(
        accepted >= m1,
        "FPM's counter only grows: {accepted} < {m1}"
    );

    // FPM's process counts are its own sampled figures and can wobble by one while probes
    // run, so wait (a few scrape intervals at most) for a scrape that matches the page.
    let total = page["total processes"].as_f64().expect("total processes");
    assert_eq!(total, 3.0, "pm static with 3 children: {page}");
    let start = Instant::now();
    let text = loop {
        let text = metrics(&g).await;
        let scraped = metric(&text, "fpmgate_fpm_total_processes", &labels);
        let acc = metric(&text, "fpmgate_fpm_accepted_connections", &labels).unwrap_or(0.0);
        if scraped == Some(total) && acc >= accepted {
            break text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "scraped total {scraped:?} / accepted {acc}, FPM says {total} / {accepted}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let get = |name: &str| metric(&text, name, &labels).unwrap_or(-1.0);
    assert!(get("fpmgate_fpm_accepted_connections") >= accepted);
    let [pool, ep] = labels;
    let scrapes = |result| {
        let l = [pool, ep, ("result", result)];
        metric(&text, "fpmgate_fpm_status_scrapes_total", &l).unwrap_or(0.0)
    };
    assert!(scrapes("ok") >= 2.0, "scrapes are counted");
    assert_eq!(scrapes("fail"), 0.0);
    for name in [
        "fpmgate_fpm_active_processes",
        "fpmgate_fpm_idle_processes",
        "fpmgate_fpm_listen_queue",
        "fpmgate_fpm_max_listen_queue",
        "fpmgate_fpm_max_children_reached",
        "fpmgate_fpm_slow_requests",
    ] {
        assert!(get(name) >= 0.0, "{name} missing");
    }
    let doc = status(&g).await;
    let fpm = &endpoint(&doc, &addr)["fpm"];
    assert!(fpm["total_processes"].as_u64().is_some(), "{fpm}");
    assert!(fpm["at_unix_ms"].as_u64().is_some_and(|t| t > 0));
}
