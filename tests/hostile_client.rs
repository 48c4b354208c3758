//! Hostile clients: request smuggling variants, slowloris and slow bodies, connection
//! floods, traversal, and the `/uploads/evil.jpg/x.php` path-info attack. Each case fails
//! if its defence is removed.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use support::{client, context_switches, php_root, shared_fpm, Gate};

fn gate(extra: &str, vhost_extra: &str) -> Gate {
    Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{}" }} ]
vhosts:
  - hosts: ["*"]
    root: {root}
    pool: main
{vhost_extra}
{extra}
"#,
        shared_fpm().endpoint(),
        root = php_root().display()
    ))
}

/// Sends bytes, reads until the server closes (or 5 s), returns the text.
fn exchange(g: &Gate, req: &[u8]) -> String {
    let mut s = TcpStream::connect(g.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn statuses(resp: &str) -> Vec<&str> {
    resp.lines().filter(|l| l.starts_with("HTTP/1.")).collect()
}

#[test]
fn smuggling_variants_are_refused() {
    let g = gate("", "");
    // CL + TE: hyper follows RFC 9112 (Transfer-Encoding wins, Content-Length dropped) and
    // closes the connection after the message, so the smuggled GET is never served.
    let r = exchange(
        &g,
        b"POST /body.php HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /server.php HTTP/1.1\r\nHost: x\r\n\r\n",
    );
    assert_eq!(
        statuses(&r).len(),
        1,
        "the pipelined request must not be served: {r}"
    );
    for (name, req) in [
        ("two different Content-Length", &b"POST /body.php HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde"[..]),
        ("bad chunk size", b"POST /body.php HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n"),
        ("gzip, chunked", b"POST /body.php HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n"),
        ("chunked, gzip", b"POST /body.php HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n"),
        ("two Transfer-Encoding lines", b"POST /body.php HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("two Host lines", b"GET /server.php HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
        ("NUL in a header", b"GET /server.php HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n"),
        ("space before colon", b"GET /server.php HTTP/1.1\r\nHost : x\r\n\r\n"),
        ("TE on HTTP/1.0", b"POST /body.php HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        ("no Host on HTTP/1.1", b"GET /server.php HTTP/1.1\r\n\r\n"),
        ("encoded traversal", b"GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1\r\nHost: x\r\n\r\n"),
        ("encoded newline in path", b"GET /server.php%0a.php HTTP/1.1\r\nHost: x\r\n\r\n"),
    ] {
        let r = exchange(&g, req);
        let st = statuses(&r);
        assert!(st.len() == 1 && st[0].contains(" 400 "), "{name}: {r}");
    }
}

#[test]
fn slowloris_head_is_cut_at_header_timeout() {
    let g = gate("limits: { header_timeout: 1s }", "");
    let mut s = TcpStream::connect(g.http).unwrap();
    s.write_all(b"GET /server.php HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let t = Instant::now();
    // Trickle a header byte every 200 ms: each byte must not restart the clock.
    let mut closed_at = None;
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(200));
        if s.write_all(b"X").is_err() {
            closed_at = Some(t.elapsed());
            break;
        }
        s.set_read_timeout(Some(Duration::from_millis(1))).unwrap();
        let mut b = [0u8; 512];
        if let Ok(0) = s.read(&mut b) {
            closed_at = Some(t.elapsed());
            break;
        }
    }
    let at = closed_at.expect("the server never closed the slow connection");
    assert!(at < Duration::from_secs(3), "closed after {at:?}");
}

#[test]
fn idle_timeout_is_separate_from_header_timeout() {
    let g = gate("limits: { header_timeout: 1s, idle_timeout: 3s }", "");
    let mut s = TcpStream::connect(g.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let req = b"GET /pid.php HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut buf = [0u8; 4096];
    s.write_all(req).unwrap();
    assert!(s.read(&mut buf).unwrap() > 0);
    // Idle for longer than header_timeout but less than idle_timeout: still usable.
    std::thread::sleep(Duration::from_millis(1800));
    s.write_all(req).unwrap();
    let n = s.read(&mut buf).unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
        "closed before idle_timeout"
    );
    // Past idle_timeout the server closes the connection.
    let t = Instant::now();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let e = t.elapsed();
    assert!(
        e > Duration::from_millis(2500) && e < Duration::from_millis(4900),
        "closed after {e:?}"
    );
}

/// Reads until `n` whole responses (each with a Content-Length) have arrived, or 5 s.
fn read_responses(s: &mut TcpStream, n: usize) -> String {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let (mut out, t) = (Vec::new(), Instant::now());
    let mut buf = [0u8; 4096];
    while t.elapsed() < Duration::from_secs(5) {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => out.extend_from_slice(&buf[..k]),
            Err(_) => {}
        }
        if whole_responses(&String::from_utf8_lossy(&out)) >= n {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// How many complete `Content-Length` responses `text` holds, back to back.
fn whole_responses(mut text: &str) -> usize {
    let mut n = 0;
    while let Some(end) = text.find("\r\n\r\n") {
        let head = &text[..end];
        let Some(len) = head.lines().find_map(|l| {
            l.strip_prefix("Content-Length: ")
                .and_then(|v| v.trim().parse::<usize>().ok())
        }) else {
            break;
        };
        let Some(rest) = text.get(end + 4 + len..) else {
            break;
        };
        n += 1;
        text = rest;
    }
    n
}

#[test]
fn parked_connections_serve_split_and_pipelined_requests() {
    // Idle HTTP/1 connections park (drop the server state) after 200 ms: whatever arrives
    // next, however it is cut, must be served as if they never had.
    let g = gate("limits: { header_timeout: 3s, idle_timeout: 10s }", "");
    let mut s = TcpStream::connect(g.http).unwrap();
    let req = "GET /pid.php HTTP/1.1\r\nHost: x\r\n\r\n";
    // The first request's method cut after "P" (could be HTTP/2's "PRI"), then the rest.
    s.write_all(b"P").unwrap();
    std::thread::sleep(Duration::from_millis(100));
    s.write_all(b"OST /body.php HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    let r = read_responses(&mut s, 1);
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    for round in 0..3 {
        std::thread::sleep(Duration::from_millis(600));
        // A head cut in two across the wait.
        let (a, b) = req.split_at(12);
        s.write_all(a.as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(400));
        s.write_all(b.as_bytes()).unwrap();
        let r = read_responses(&mut s, 1);
        assert!(r.starts_with("HTTP/1.1 200 OK"), "round {round}: {r}");
        assert_eq!(whole_responses(&r), 1, "round {round}: {r}");
        std::thread::sleep(Duration::from_millis(600));
        // Three pipelined requests in one write.
        s.write_all(req.repeat(3).as_bytes()).unwrap();
        let r = read_responses(&mut s, 3);
        assert_eq!(
            r.matches("HTTP/1.1 200 OK").count(),
            3,
            "round {round}: {r}"
        );
        assert_eq!(whole_responses(&r), 3, "round {round}: {r}");
    }
}

#[test]
fn a_client_stopped_inside_the_http2_preface_costs_no_wakeups() {
    // "P", "PR" and "PRI" may begin HTTP/2's preface or POST, PUT, PATCH, PROPFIND. While
    // the client says no more, the proxy waits for bytes; it must not poll (5 ms polling
    // was ~200 wake-ups a second per such connection).
    let g = gate("limits: { header_timeout: 5s }", "");
    let over_a_second = || {
        let before = context_switches(g.pid());
        std::thread::sleep(Duration::from_secs(1));
        context_switches(g.pid()) - before
    };
    let quiet = over_a_second();
    let mut h1 = TcpStream::connect(g.http).unwrap();
    h1.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h1.write_all(b"PR").unwrap();
    let mut h2 = TcpStream::connect(g.http).unwrap();
    h2.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    h2.write_all(b"PRI").unwrap();
    let stalled = over_a_second();
    assert!(
        stalled < quiet + 60,
        "{stalled} context switches in a second with two clients stalled in the preface \
         ({quiet} with none)"
    );
    // The rest arrives: each is served as what it turned out to be.
    h1.write_all(b"OPFIND /pid.php HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = h1.read_to_end(&mut out);
    let out = String::from_utf8_lossy(&out);
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    h2.write_all(b" * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .unwrap();
    let mut frame = [0u8; 9];
    h2.read_exact(&mut frame).unwrap();
    assert_eq!(
        frame[3], 4,
        "the server's first frame is SETTINGS: {frame:?}"
    );
}

#[test]
fn silent_connection_is_closed_at_header_timeout() {
    let g = gate("limits: { header_timeout: 1s, idle_timeout: 30s }", "");
    let mut s = TcpStream::connect(g.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    assert!(
        t.elapsed() < Duration::from_millis(2500),
        "a socket that never sends a request is closed at header_timeout"
    );
}

#[test]
fn slow_body_is_cut_at_body_timeout() {
    let g = gate("limits: { body_timeout: 1s }", "");
    let mut s = TcpStream::connect(g.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"POST /body.php HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .unwrap();
    let t = Instant::now();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let r = String::from_utf8_lossy(&out);
    assert!(r.starts_with("HTTP/1.1 408"), "{r}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[tokio::test]
async fn connection_limit_holds_extra_clients_in_the_backlog() {
    let g = gate("limits: { max_connections: 2 }", "");
    let a = TcpStream::connect(g.http).unwrap();
    let b = TcpStream::connect(g.http).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    let mut c = TcpStream::connect(g.http).unwrap(); // kernel accepts; fpmgate does not yet
    c.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    c.write_all(b"GET /pid.php HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        c.read(&mut buf).is_err(),
        "a third connection was served past max_connections"
    );
    drop(a);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    assert!(
        String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"),
        "served once a slot freed"
    );
    drop(b);
}

#[tokio::test]
async fn parked_connections_hold_their_slot_until_they_hang_up_or_shut_down() {
    // Parked connections wait outside any task, but still count under max_connections.
    let mut g = gate("limits: { max_connections: 2, idle_timeout: 30s }", "");
    let req = b"GET /pid.php HTTP/1.1\r\nHost: x\r\n\r\n";
    let (mut a, mut b) = (
        TcpStream::connect(g.http).unwrap(),
        TcpStream::connect(g.http).unwrap(),
    );
    for s in [&mut a, &mut b] {
        s.write_all(req).unwrap();
        assert!(read_responses(s, 1).starts_with("HTTP/1.1 200"));
    }
    std::thread::sleep(Duration::from_millis(700));
    let mut c = TcpStream::connect(g.http).unwrap();
    c.set_read_timeout(Some(Duration::from_millis(800)))
        .unwrap();
    c.write_all(req).unwrap();
    let mut buf = [0u8; 64];
    assert!(
        c.read(&mut buf).is_err(),
        "served while two parked connections held both slots"
    );
    // A parked client hangs up: its slot goes to the waiting one.
    drop(a);
    assert!(read_responses(&mut c, 1).starts_with("HTTP/1.1 200"));
    // The other is served again after its wait, and parks again.
    b.write_all(req).unwrap();
    assert!(read_responses(&mut b, 1).starts_with("HTTP/1.1 200"));
    std::thread::sleep(Duration::from_millis(700));
    // Shutdown closes parked connections at once and exits.
    g.signal("TERM");
    let t = Instant::now();
    for s in [&mut b, &mut c] {
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(s.read(&mut buf).unwrap_or(0), 0, "closed at shutdown");
    }
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let status = g.wait_exit(Duration::from_secs(5)).expect("exited");
    assert!(status.success(), "{status:?}");
}

#[tokio::test]
async fn upload_disguised_as_script_never_runs() {
    // With a local tree: the try_files rule answers 404 before FPM is asked.
    let g = gate("", &format!("    static: {}", php_root().display()));
    let resp = client()
        .get(g.url("/uploads/evil.jpg/x.php"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
    assert!(!resp.text().await.unwrap().contains("EVIL EXECUTED"));
    let m = g.metrics().await;
    assert!(
        !m.contains("fpmgate_upstream_requests_total{"),
        "FPM must not have been asked"
    );
    // The static tree serves the file itself (as data), and real scripts still run.
    let resp = client().get(g.url("/hello.txt")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    assert!(resp.headers().contains_key("etag"));
    assert_eq!(
        client()
            .get(g.url("/pid.php"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    // PHP sources are never served as static files, even with a local tree.
    let resp = client().get(g.url("/server.php")).send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "application/json");

    // Without a local tree, FPM's security.limit_extensions refuses the .jpg.
    let g = gate("", "");
    let resp = client()
        .get(g.url("/uploads/evil.jpg/x.php"))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status() == 403 || resp.status() == 404,
        "{}",
        resp.status()
    );
    assert!(!resp.text().await.unwrap().contains("EVIL EXECUTED"));
}

/// One FPM place, a long queue, and a 1 s `send_timeout`: a response its client stops
/// taking holds the only place until the timeout closes the connection.
fn one_place_gate() -> Gate {
    Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
limits: {{ send_timeout: 1s }}
pools:
  main:
    endpoints: [ {{ addr: "{}", max_conns: 1 }} ]
    keepalive: {{ max_idle: 1 }}
    queue: {{ size: 8, timeout: 30s }}
vhosts:
  - hosts: ["*"]
    root: {root}
    pool: main
"#,
        shared_fpm().endpoint(),
        root = php_root().display()
    ))
}

/// The next request is served once the stalled one's connection is closed: the place
/// came back. Without `send_timeout` it waits in the queue until the queue timeout (503).
async fn next_request_is_served(g: &Gate) {
    let t = Instant::now();
    let resp = client().get(g.url("/index.php")).send().await.unwrap();
    assert_eq!(
        resp.status(),
        200,
        "the stalled response still holds the place"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_at_send_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let g = one_place_gate();
    // 64 MiB: far more than the socket buffers between PHP and the client hold.
    let mut s = tokio::net::TcpStream::connect(g.http).await.unwrap();
    s.write_all(b"GET /big.php?bytes=67108864 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    // Read nothing more.
    next_request_is_served(&g).await;
    // The stalled connection was closed: what was in flight drains, then it ends.
    let mut rest = Vec::new();
    let end = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut rest)).await;
    assert!(end.is_ok(), "the stalled connection stays open");
    assert!(
        rest.len() < 64 << 20,
        "the whole response arrived after all"
    );
}

#[tokio::test]
async fn an_http2_client_giving_one_byte_of_window_does_not_hold_its_connection() {
    // A small answer goes to h2's send buffer whole and the request counts as done; a
    // client that never opens its window (but answers pings) must still be let go.
    let g = gate("limits: { send_timeout: 1s, idle_timeout: 1s }", "");
    let tcp = tokio::net::TcpStream::connect(g.http).await.unwrap();
    let (mut h2, conn) = h2::client::Builder::new()
        .initial_window_size(1)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get("http://x/pid.php").body(()).unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(
        ended.is_ok(),
        "a connection closing with its bytes untaken stays open"
    );
    drop(resp);
}

#[tokio::test]
async fn an_http2_stream_given_no_window_is_cut_at_send_timeout() {
    let g = one_place_gate();
    let tcp = tokio::net::TcpStream::connect(g.http).await.unwrap();
    // No stream window: the response head arrives, no DATA ever can.
    let (mut h2, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    let driver = tokio::spawn(conn);
    let req = http::Request::get("http://x/big.php?bytes=4194304")
        .body(())
        .unwrap();
    let (resp, _) = h2.send_request(req, true).unwrap();
    let resp = resp.await.unwrap();
    assert_eq!(resp.status(), 200);
    next_request_is_served(&g).await;
    let ended = tokio::time::timeout(Duration::from_secs(10), driver).await;
    assert!(ended.is_ok(), "the stalled HTTP/2 connection stays open");
    drop(resp);
}
