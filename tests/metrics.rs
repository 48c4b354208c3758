//! `/metrics` after a scripted traffic mix: every counter equals what the clients saw, and
//! the exposition passes `promtool check metrics`.

mod fake;
mod support;

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use fake::{FakeFpm, Mode};
use support::{client, free_port, php_root, shared_fpm, Gate};

/// Parses the text exposition into `series → value` (series = name{labels} as printed).
fn scrape_map(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

fn value(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            k.split('{').next() == Some(name)
                && labels
                    .iter()
                    .all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_match_what_clients_received() {
    let silent = FakeFpm::start(Mode::Silent);
    let dead = format!("127.0.0.1:{}", free_port());
    let g = Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  php:
    endpoints: [ {{ addr: "{fpm}", max_conns: 1 }} ]
    queue: {{ size: 0, timeout: 1s }}
  dead:
    endpoints: [ {{ addr: "{dead}" }} ]
    retries: 0
    health: {{ passive: {{ fails: 0 }} }}
  slow:
    endpoints: [ {{ addr: "{silent}" }} ]
    timeouts: {{ read: 300ms }}
    retries: 0
    health: {{ passive: {{ fails: 0 }} }}
vhosts:
  - hosts: [app.test]
    root: {root}
    pool: php
    routes:
      - {{ path: /dead/, pool: dead }}
      - {{ path: /slow/, pool: slow }}
"#,
        fpm = shared_fpm().endpoint(),
        silent = silent.addr,
        root = php_root().display()
    ));
    let c = client();
    let get = |path: &str| c.get(g.url(path)).header("Host", "app.test").send();
    let mut seen: BTreeMap<u16, u32> = BTreeMap::new();
    for _ in 0..5 {
        *seen
            .entry(get("/pid.php").await.unwrap().status().as_u16())
            .or_default() += 1;
    }
    for _ in 0..3 {
        *seen
            .entry(get("/missing.php").await.unwrap().status().as_u16())
            .or_default() += 1;
    }
    for _ in 0..4 {
        *seen
            .entry(get("/dead/x.php").await.unwrap().status().as_u16())
            .or_default() += 1;
    }
    for _ in 0..7 {
        *seen
            .entry(get("/slow/x.php").await.unwrap().status().as_u16())
            .or_default() += 1;
    }
    // 503: the only slot is busy and the queue has no room.
    let busy = tokio::spawn(get("/sleep.php?ms=700"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    for _ in 0..2 {
        *seen
            .entry(get("/pid.php").await.unwrap().status().as_u16())
            .or_default() += 1;
    }
    *seen
        .entry(busy.await.unwrap().unwrap().status().as_u16())
        .or_default() += 1;
    assert_eq!(
        seen,
        BTreeMap::from([(200, 6), (404, 3), (502, 4), (503, 2), (504, 7)])
    );

    let text = g.metrics().await;
    let m = scrape_map(&text);
    let v = |code: &str, pool: &str| {
        value(
            &m,
            "fpmgate_http_requests_total",
            &[("vhost", "app.test"), ("pool", pool), ("code", code)],
        )
    };
    assert_eq!(v("200", "php"), 6.0);
    assert_eq!(
        v("404", "php"),
        3.0,
        "FPM's own 404s count as requests with their code"
    );
    assert_eq!(v("502", "dead"), 4.0);
    assert_eq!(v("503", "php"), 2.0);
    assert_eq!(v("504", "slow"), 7.0);
    let ge = |code: &str, cause: &str| {
        value(
            &m,
            "fpmgate_gateway_errors_total",
            &[("code", code), ("cause", cause)],
        )
    };
    assert_eq!(ge("502", "connect"), 4.0);
    assert_eq!(ge("503", "queue_full"), 2.0);
    assert_eq!(ge("504", "read_timeout"), 7.0);
    assert_eq!(value(&m, "fpmgate_gateway_errors_total", &[]), 13.0);
    assert_eq!(
        value(
            &m,
            "fpmgate_upstream_errors_total",
            &[("pool", "dead"), ("kind", "connect")]
        ),
        4.0
    );
    assert_eq!(
        value(
            &m,
            "fpmgate_upstream_errors_total",
            &[("pool", "slow"), ("kind", "read_timeout")]
        ),
        7.0
    );
    // FPM answered 6 × 200 and 3 × 404 (its own "File not found.").
    assert_eq!(
        value(
            &m,
            "fpmgate_upstream_requests_total",
            &[("pool", "php"), ("code", "200")]
        ),
        6.0
    );
    assert_eq!(
        value(
            &m,
            "fpmgate_upstream_requests_total",
            &[("pool", "php"), ("code", "404")]
        ),
        3.0
    );
    assert_eq!(
        value(
            &m,
            "fpmgate_http_request_duration_seconds_count",
            &[("pool", "php")]
        ),
        11.0
    );
    // Nothing left in flight or queued.
    assert_eq!(value(&m, "fpmgate_pool_inflight_requests", &[]), 0.0);
    assert_eq!(value(&m, "fpmgate_pool_queue_depth", &[]), 0.0);
    assert_eq!(value(&m, "fpmgate_endpoint_inflight_requests", &[]), 0.0);
    assert_eq!(value(&m, "fpmgate_pool_capacity", &[("pool", "php")]), 1.0);
    assert_eq!(value(&m, "fpmgate_build_info", &[]), 1.0);
    assert_eq!(value(&m, "fpmgate_config_last_reload_successful", &[]), 1.0);

    promtool_check(&text);
}

fn promtool_check(text: &str) {
    let Ok(mut child) = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    else {
        eprintln!("promtool not found: run scripts/test.sh, which installs it; skipping the exposition lint");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && report.trim().is_empty(),
        "promtool check metrics:\n{report}"
    );
}
