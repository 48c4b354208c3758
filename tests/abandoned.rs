//! Clients that go away while FPM runs their script: an HTTP/2 stream reset, an HTTP/1
//! hang-up before the answer, a hang-up in the middle of the body. FPM runs the script to
//! its end regardless, so the pool place must stay held until then: otherwise resetting
//! streams pushes FPM past `max_conns` (the rapid-reset amplification). Each case fails if
//! the place goes back when the client leaves.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use support::{client, php_root, shared_fpm, Gate};

/// One FPM place (FPM itself has four workers) and a long queue.
fn one_place_gate(pool_extra: &str) -> Gate {
    Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{}", max_conns: 1 }} ]
    queue: {{ size: 16, timeout: 30s }}
{pool_extra}
vhosts:
  - hosts: ["*"]
    root: {root}
    pool: main
"#,
        shared_fpm().endpoint(),
        root = php_root().display()
    ))
}

/// The most `span.php` runs recorded in `file` that overlapped in time.
fn most_at_once(file: &Path) -> usize {
    let text = std::fs::read_to_string(file).unwrap();
    let spans: Vec<(f64, f64)> = text
        .lines()
        .map(|l| {
            let mut f = l.split(' ').map(|v| v.parse::<f64>().unwrap());
            (f.next().unwrap(), f.next().unwrap())
        })
        .collect();
    spans
        .iter()
        .map(|&(start, _)| {
            spans
                .iter()
                .filter(|&&(s, e)| s <= start && start < e)
                .count()
        })
        .max()
        .unwrap_or(0)
}

/// Waits until no script has ended for a second (longer than any left running takes), and
/// returns how many ran. Requests reset while queued never run at all.
fn settle(file: &Path) -> usize {
    let lines = || std::fs::read_to_string(file).map_or(0, |t| t.lines().count());
    let until = Instant::now() + Duration::from_secs(20);
    let (mut seen, mut since) = (lines(), Instant::now());
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
        let now = lines();
        if now != seen {
            (seen, since) = (now, Instant::now());
        } else if since.elapsed() > Duration::from_secs(1) {
            return seen;
        }
    }
    panic!("scripts went on ending for 20 s");
}

#[tokio::test]
async fn reset_http2_streams_never_run_more_scripts_than_max_conns() {
    let g = one_place_gate("");
    let spans = tempfile::NamedTempFile::new().unwrap();
    let url = format!("http://x/span.php?ms=700&file={}", spans.path().display());
    let tcp = tokio::net::TcpStream::connect(g.http).await.unwrap();
    let (h2, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    for _ in 0..4 {
        let req = http::Request::get(&url).body(()).unwrap();
        let (resp, _) = h2
            .clone()
            .ready()
            .await
            .unwrap()
            .send_request(req, true)
            .unwrap();
        tokio::time::sleep(Duration::from_millis(150)).await;
        // Dropping the stream's handles resets it (RST_STREAM CANCEL).
        drop(resp);
    }
    let req = http::Request::get(&url).body(()).unwrap();
    let (resp, _) = h2.ready().await.unwrap().send_request(req, true).unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(20), resp)
        .await
        .expect("the request after the resets is never answered")
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(settle(spans.path()) >= 2);
    assert_eq!(
        most_at_once(spans.path()),
        1,
        "reset streams let scripts run side by side past max_conns: 1"
    );
}

#[tokio::test]
async fn clients_hanging_up_never_run_more_scripts_than_max_conns() {
    let g = one_place_gate("");
    let spans = tempfile::NamedTempFile::new().unwrap();
    let file = spans.path().display().to_string();
    // Two hang up before the answer, one after the head, in the middle of the body.
    for _ in 0..2 {
        let mut s = TcpStream::connect(g.http).unwrap();
        write!(
            s,
            "GET /span.php?ms=600&file={file} HTTP/1.1\r\nHost: x\r\n\r\n"
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(150));
    }
    let mut s = TcpStream::connect(g.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET /span.php?ms=600&out=1&file={file} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    drop(s);
    let resp = client()
        .get(g.url(&format!("/span.php?ms=100&file={file}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(settle(spans.path()) >= 2);
    assert_eq!(
        most_at_once(spans.path()),
        1,
        "hang-ups let scripts run side by side past max_conns: 1"
    );
}

#[tokio::test]
async fn a_left_script_holds_its_place_no_longer_than_the_read_timeout() {
    let g = one_place_gate("    timeouts: { read: 1s }");
    let spans = tempfile::NamedTempFile::new().unwrap();
    let file = spans.path().display().to_string();
    let started = Instant::now();
    let mut s = TcpStream::connect(g.http).unwrap();
    write!(
        s,
        "GET /span.php?ms=4000&file={file} HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    .unwrap();
    // Most of the read timeout has passed when the client leaves: the place is held for
    // what is left of it, as long as a client that stayed for its 504 would hold it.
    std::thread::sleep(Duration::from_millis(600));
    drop(s);
    let resp = client().get(g.url("/index.php")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let took = started.elapsed();
    // Held until the read timeout (1 s from the start), not the script's 4 s, nor a
    // whole read timeout more from the hang-up.
    assert!(took < Duration::from_millis(1500), "{took:?}");
    assert!(
        took >= Duration::from_millis(900),
        "the place came back while the script ran: {took:?}"
    );
}
