//! DNS discovery end to end: `dns:php.test:PORT` endpoints resolved through a tiny UDP DNS
//! server the test controls, in front of real PHP-FPM masters listening on 127.0.0.1,
//! 127.0.0.2 and 127.0.0.3 with one shared port (A records carry no port). Records that
//! appear become endpoints, records that go drain, and a resolver that stops answering
//! leaves the last known set serving — none of it failing a request.

mod support;

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::AsyncFnMut;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{client, free_port, php_root, run_check, Fpm, FpmOptions, Gate};
use tokio::net::UdpSocket;

/// The pools' `resolve_interval` (and the resolver timeout).
const INTERVAL: Duration = Duration::from_millis(300);
/// Allowance on top of the interval for a resolution, a rebuild and a request.
const SLACK: Duration = Duration::from_secs(2);

/// A UDP DNS server for `php.test.`: A queries get the current records, AAAA queries an
/// empty answer, other names NXDOMAIN. While `answering` is off every query is dropped.
struct DnsServer {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<Ipv4Addr>>>,
    answering: Arc<AtomicBool>,
    queries: Arc<AtomicUsize>,
}

impl DnsServer {
    async fn start(records: &[Ipv4Addr]) -> DnsServer {
        let sock = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind DNS server");
        let server = DnsServer {
            addr: sock.local_addr().expect("local addr"),
            records: Arc::new(Mutex::new(records.to_vec())),
            answering: Arc::new(AtomicBool::new(true)),
            queries: Arc::new(AtomicUsize::new(0)),
        };
        let (records, answering, queries) = (
            server.records.clone(),
            server.answering.clone(),
            server.queries.clone(),
        );
        tokio::spawn(async move {
            let mut buf = [0u8; 512];
            while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
                queries.fetch_add(1, Ordering::Relaxed);
                if !answering.load(Ordering::Relaxed) {
                    continue;
                }
                let records = records.lock().unwrap().clone();
                if let Some(reply) = respond(&buf[..n], &records) {
                    let _ = sock.send_to(&reply, peer).await;
                }
            }
        });
        server
    }

    fn set(&self, records: &[Ipv4Addr]) {
        *self.records.lock().unwrap() = records.to_vec();
    }
}

/// The answer to query `q`: the question echoed, then the A records (owner compressed to
/// the question name). `None` for what does not parse as a query.
fn respond(q: &[u8], records: &[Ipv4Addr]) -> Option<Vec<u8>> {
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*q.get(pos)?);
        if len == 0 {
            break;
        }
        labels.push(String::from_utf8_lossy(q.get(pos + 1..pos + 1 + len)?).to_lowercase());
        pos += 1 + len;
    }
    let qtype = u16::from_be_bytes([*q.get(pos + 1)?, *q.get(pos + 2)?]);
    let mut r = q.get(..pos + 5)?.to_vec();
    let (rcode, answers) = match (labels.join(".").as_str(), qtype) {
        ("php.test", 1) => (0, records),
        ("php.test", _) => (0, &[][..]),
        _ => (3, &[][..]),
    };
    r[2] = 0x81; // QR, RD
    r[3] = 0x80 | rcode; // RA
    r[6..8].copy_from_slice(&(answers.len() as u16).to_be_bytes());
    r[8..12].fill(0);
    for ip in answers {
        r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 0, 0, 4]);
        r.extend_from_slice(&ip.octets());
    }
    Some(r)
}

fn ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, last)
}

/// An FPM master on `127.0.0.{last}:port`, answering `env.php` with `n{last}`.
fn node(last: u8, port: u16) -> Fpm {
    Fpm::start(FpmOptions {
        bind_ip: IpAddr::V4(ip(last)),
        port: Some(port),
        pool_name: format!("n{last}"),
        env: vec![("APP_POOL".into(), format!("n{last}"))],
        ..FpmOptions::default()
    })
}

fn gate(dns: SocketAddr, port: u16) -> Gate {
    Gate::start(&config(dns, &format!("dns:php.test:{port}")))
}

/// A config with one pool whose single endpoint is `addr`.
fn config(dns: SocketAddr, addr: &str) -> String {
    format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
dns: {{ resolver: "{dns}", timeout: {ms}ms }}
pools:
  main:
    resolve_interval: {ms}ms
    endpoints:
      - {{ addr: "{addr}", max_conns: 4 }}
vhosts:
  - hosts: ["*"]
    root: {root}
    pool: main
"#,
        ms = INTERVAL.as_millis(),
        root = php_root().display(),
    )
}

/// (status, body); status 0 for a transport error.
async fn get(c: &reqwest::Client, url: &str) -> (u16, String) {
    match c.get(url).send().await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(e) => (0, e.to_string()),
    }
}

async fn metrics(g: &Gate) -> String {
    get(&client(), &g.admin_url("/metrics")).await.1
}

/// One sample: `name{...k="v"...} value`.
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

/// Polls `cond` every 20 ms until it holds or `timeout` passes; returns whether it held.
async fn wait_until(timeout: Duration, mut cond: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Clients GETting `url` in a loop until stopped; (status, body) of each, in completion
/// order.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u16, String)>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(url: &str, workers: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..workers)
            .map(|_| {
                let (stop, seen, url, c) = (stop.clone(), seen.clone(), url.to_string(), client());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let r = get(&c, &url).await;
                        seen.lock().unwrap().push(r);
                        tokio::time::sleep(Duration::from_millis(3)).await;
                    }
                })
            })
            .collect();
        Load { stop, seen, tasks }
    }

    fn len(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn count(&self, body: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|r| r.1 == body)
            .count()
    }

    async fn finish(self) -> Vec<(u16, String)> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("load task");
        }
        std::mem::take(&mut *self.seen.lock().unwrap())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_join_drain_and_survive_a_silent_resolver() {
    let port = free_port();
    let _nodes = [1, 2, 3].map(|last| node(last, port));
    let dns = DnsServer::start(&[ip(1), ip(2)]).await;
    let g = gate(dns.addr, port);
    let url = g.url("/env.php");
    let name = format!("php.test:{port}");
    let c = client();

    // (1) Both records are endpoints and both get traffic.
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let (status, body) = get(&c, &url).await;
        assert_eq!(status, 200, "{body}");
        seen.insert(body);
    }
    assert_eq!(seen, BTreeSet::from(["n1".to_string(), "n2".to_string()]));
    let m = metrics(&g).await;
    let labels = [("pool", "main"), ("name", name.as_str())];
    assert_eq!(
        metric(&m, "fpmgate_dns_endpoints", &labels),
        Some(2.0),
        "{m}"
    );
    let ep1 = format!("127.0.0.1:{port}");
    let up = [("pool", "main"), ("endpoint", ep1.as_str())];
    assert_eq!(
        metric(&m, "fpmgate_endpoint_up", &up),
        Some(1.0),
        "labelled by address"
    );

    // (2) A third record joins within the interval, under steady load.
    let load = Load::start(&url, 8);
    assert!(wait_until(Duration::from_secs(10), async || load.len() >= 50).await);
    dns.set(&[ip(1), ip(2), ip(3)]);
    let added = Instant::now();
    let joined = wait_until(INTERVAL + SLACK, async || load.count("n3") > 0).await;
    assert!(
        joined,
        "127.0.0.3 got no request {:?} after its record appeared",
        added.elapsed()
    );

    // (3) A record leaves: its endpoint drains (series gone, no new requests).
    dns.set(&[ip(2), ip(3)]);
    let up = [("pool", "main"), ("endpoint", ep1.as_str())];
    let drained = wait_until(INTERVAL + SLACK, async || {
        metric(&metrics(&g).await, "fpmgate_endpoint_up", &up).is_none()
    })
    .await;
    assert!(drained, "127.0.0.1 still exported after its record left");
    // Requests already on it when it drained finish there (env.php takes milliseconds).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let cut = load.len();
    let target = (cut + 100).max(300);
    assert!(wait_until(Duration::from_secs(20), async || load.len() >= target).await);
    let results = load.finish().await;
    let failed: Vec<_> = results.iter().filter(|r| r.0 != 200).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );
    let late: BTreeSet<&str> = results[cut..].iter().map(|r| r.1.as_str()).collect();
    assert_eq!(late, BTreeSet::from(["n2", "n3"]), "after the drain");

    // (4) The resolver goes silent: failures are counted, the last set keeps serving.
    dns.answering.store(false, Ordering::Relaxed);
    let failures = [
        ("pool", "main"),
        ("name", name.as_str()),
        ("result", "failure"),
    ];
    let counted = wait_until(INTERVAL * 3 + SLACK, async || {
        metric(
            &metrics(&g).await,
            "fpmgate_dns_resolutions_total",
            &failures,
        )
        .unwrap_or(0.0)
            >= 2.0
    })
    .await;
    assert!(counted, "{}", metrics(&g).await);
    let mut seen = BTreeSet::new();
    for _ in 0..20 {
        let (status, body) = get(&c, &url).await;
        assert_eq!(status, 200, "{body}");
        seen.insert(body);
    }
    assert_eq!(seen, BTreeSet::from(["n2".to_string(), "n3".to_string()]));
    let m = metrics(&g).await;
    assert_eq!(
        metric(&m, "fpmgate_dns_endpoints", &labels),
        Some(2.0),
        "{m}"
    );
    let ok = [
        ("pool", "main"),
        ("name", name.as_str()),
        ("result", "success"),
    ];
    assert!(metric(&m, "fpmgate_dns_resolutions_total", &ok).unwrap_or(0.0) >= 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_answers_503_until_the_name_first_resolves() {
    let port = free_port();
    let _node = node(1, port);
    let dns = DnsServer::start(&[ip(1)]).await;
    dns.answering.store(false, Ordering::Relaxed);
    let g = gate(dns.addr, port);
    let c = client();
    let (status, _) = get(&c, &g.url("/env.php")).await;
    assert_eq!(status, 503, "no address known yet");
    assert!(
        dns.queries.load(Ordering::Relaxed) >= 2,
        "A and AAAA asked at start"
    );

    dns.answering.store(true, Ordering::Relaxed);
    let served = wait_until(INTERVAL + SLACK, async || {
        get(&c, &g.url("/env.php")).await == (200, "n1".to_string())
    })
    .await;
    assert!(served, "{}", g.logs().join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_to_a_dns_endpoint_resolves_it_before_applying() {
    let port = free_port();
    let _nodes = [1, 2].map(|last| node(last, port));
    let dns = DnsServer::start(&[ip(2)]).await;
    let g = Gate::start(&config(dns.addr, &format!("127.0.0.1:{port}")));
    let c = client();
    assert_eq!(get(&c, &g.url("/env.php")).await, (200, "n1".to_string()));

    g.rewrite_config(&config(dns.addr, &format!("dns:php.test:{port}")));
    assert!(g.wait_for_log("config reloaded", Duration::from_secs(10)));
    // At once: the reload resolved the new name before swapping the runtime in, so the
    // pool is never empty.
    for _ in 0..10 {
        assert_eq!(get(&c, &g.url("/env.php")).await, (200, "n2".to_string()));
    }
}

#[test]
fn check_accepts_dns_endpoints_offline_and_rejects_bad_names() {
    let config = |addr: &str| {
        format!(
            r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
dns: {{ resolver: "192.0.2.1:53", timeout: 5s }}
pools:
  main:
    resolve_interval: 10s
    endpoints:
      - {{ addr: "{addr}" }}
vhosts:
  - {{ hosts: ["*"], root: /srv, pool: main }}
"#
        )
    };
    // The resolver is unroutable (TEST-NET-1): a check that queried it would hang.
    let started = Instant::now();
    let (code, out, err) = run_check(&config("dns:php-fpm.shop.svc.cluster.local:9000"));
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "check resolved names"
    );

    for (addr, want) in [
        ("dns:bad host:9000", "unexpected character ' '"),
        ("dns:name", "needs a port"),
    ] {
        let (code, out, err) = run_check(&config(addr));
        let text = format!("{out}{err}");
        assert_eq!(code, 1, "{addr}: {text}");
        assert!(
            text.contains("pools.main.endpoints[0].addr"),
            "{addr}: {text}"
        );
        assert!(text.contains(want), "{addr}: {text}");
    }
}
