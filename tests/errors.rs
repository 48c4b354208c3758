//! Every error status the proxy produces, against real PHP-FPM where FPM can produce the
//! fault and against a misbehaving FastCGI server where it cannot. Each case also checks the
//! cause label of `fpmgate_gateway_errors_total`.

mod fake;
mod support;

use std::time::{Duration, Instant};

use fake::{FakeFpm, Mode};
use support::{client, client_builder, free_port, php_root, shared_fpm, Fpm, FpmOptions, Gate};

fn gate(endpoint: &str, pool_extra: &str, top_extra: &str) -> Gate {
    Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{endpoint}" }} ]
{pool_extra}
vhosts:
  - hosts: ["*"]
    root: {root}
    pool: main
    index: index.php
{top_extra}
"#,
        root = php_root().display()
    ))
}

async fn gateway_errors(g: &Gate, code: u16, cause: &str) -> u64 {
    let m = g.metrics().await;
    let needle = format!("code=\"{code}\"");
    let cause = format!("cause=\"{cause}\"");
    m.lines()
        .filter(|l| {
            l.starts_with("fpmgate_gateway_errors_total{")
                && l.contains(&needle)
                && l.contains(&cause)
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

async fn get_status(g: &Gate, path: &str) -> u16 {
    client()
        .get(g.url(path))
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

#[tokio::test]
async fn connection_refused_is_502_connect() {
    let g = gate(&format!("127.0.0.1:{}", free_port()), "", "");
    assert_eq!(get_status(&g, "/x.php").await, 502);
    assert_eq!(gateway_errors(&g, 502, "connect").await, 1);
}

#[tokio::test]
async fn garbage_from_fpm_is_502_protocol() {
    let f = FakeFpm::start(Mode::Garbage);
    let g = gate(&f.addr.to_string(), "", "");
    assert_eq!(get_status(&g, "/x.php").await, 502);
    assert_eq!(gateway_errors(&g, 502, "protocol").await, 1);
}

#[tokio::test]
async fn unknown_record_bad_status_and_short_record_are_502() {
    for (mode, cause) in [
        (Mode::UnknownRecord, "protocol"),
        (Mode::BadStatus, "protocol"),
        (Mode::ShortRecord, "reset"),
    ] {
        let f = FakeFpm::start(mode);
        let g = gate(&f.addr.to_string(), "    retries: 0", "");
        assert_eq!(get_status(&g, "/x.php").await, 502, "{mode:?}");
        assert_eq!(gateway_errors(&g, 502, cause).await, 1, "{mode:?}");
    }
}

#[tokio::test]
async fn reset_before_response_retries_get_but_never_post() {
    let f = FakeFpm::start(Mode::CloseBeforeResponse);
    let g = gate(&f.addr.to_string(), "    retries: 1", "");
    assert_eq!(get_status(&g, "/x.php").await, 502);
    // A GET may be retried (nginx's rule): two requests reached the server.
    assert_eq!(f.requests.load(std::sync::atomic::Ordering::SeqCst), 2);
    let status = client()
        .post(g.url("/x.php"))
        .body("x")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(status, 502);
    // A POST on a fresh connection is never retried: FPM may have run it.
    assert_eq!(f.requests.load(std::sync::atomic::Ordering::SeqCst), 3);
    assert_eq!(gateway_errors(&g, 502, "reset").await, 2);
}

/// An upload FPM takes more slowly than the read timeout is not a silent FPM: the read
/// timeout runs from the end of the request, the send timeout bounds the upload.
#[tokio::test]
async fn a_slow_upload_is_not_cut_by_the_read_timeout() {
    let g = gate(
        &shared_fpm().unix_endpoint(),
        "    timeouts: { read: 500ms, send: 2s }",
        "limits: { body_buffer: 3MiB }",
    );
    // PHP reads 8 KiB at a time, 4 ms apart: 1 s and 2 s to take, in memory and spooled.
    for len in [2 << 20, 4 << 20] {
        let resp = client()
            .put(g.url("/slow_read.php?ms=4"))
            .body(vec![b'u'; len])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{len}-byte body");
        assert_eq!(resp.text().await.unwrap(), format!("read {len}\n"));
    }
}

/// A POST read by a worker that then dies before its first byte is not sent again, even on
/// a kept connection (which looks like one FPM closed while idle); a GET may be.
#[tokio::test]
async fn a_post_whose_worker_dies_on_a_kept_connection_is_not_sent_again() {
    let fpm = Fpm::start(FpmOptions {
        workers: 2,
        ..FpmOptions::default()
    });
    let g = gate(&fpm.endpoint(), "    retries: 0", "");
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("runs");
    let url = g.url(&format!("/die.php?log={}", log.display()));
    let runs = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .count()
    };
    // Leaves a kept connection for the POST to reuse.
    assert_eq!(get_status(&g, "/sleep.php?ms=0").await, 200);
    let resp = client().post(&url).body("order=1").send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert_eq!(runs(), 1, "the POST ran again");
    assert_eq!(get_status(&g, "/sleep.php?ms=0").await, 200);
}

#[tokio::test]
async fn truncated_response_is_not_a_short_success() {
    let f = FakeFpm::start(Mode::TruncateBody);
    let g = gate(&f.addr.to_string(), "", "");
    let resp = client().get(g.url("/x.php")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the head was complete");
    assert!(
        resp.bytes().await.is_err(),
        "the client must see the body fail, not end cleanly"
    );
    // An END_REQUEST that says the request did not complete, after some body: the client
    // sees the response fail (here all of it arrives at once, so hyper drops the connection
    // before even the head is out).
    let f = FakeFpm::start(Mode::UncleanEnd);
    let g = gate(&f.addr.to_string(), "", "");
    let whole = match client().get(g.url("/x.php")).send().await {
        Err(_) => false,
        Ok(resp) => resp.bytes().await.is_ok(),
    };
    assert!(!whole, "an unclean end is not a success");
}

#[tokio::test]
async fn oversized_response_head_is_502_header_too_big() {
    let f = FakeFpm::start(Mode::HugeHead(100_000));
    let g = gate(
        &f.addr.to_string(),
        "",
        "limits: { max_response_header: 16KiB }",
    );
    assert_eq!(get_status(&g, "/x.php").await, 502);
    assert_eq!(gateway_errors(&g, 502, "header_too_big").await, 1);
    // Real PHP too: a 40 KB header under a 16 KiB limit.
    let g = gate(
        &shared_fpm().endpoint(),
        "",
        "limits: { max_response_header: 16KiB }",
    );
    assert_eq!(get_status(&g, "/header_big.php?bytes=40000").await, 502);
    assert_eq!(get_status(&g, "/header_big.php?bytes=1000").await, 200);
}

#[tokio::test]
async fn records_after_end_request_close_the_connection() {
    let f = FakeFpm::start(Mode::StdoutAfterEnd);
    let g = gate(&f.addr.to_string(), "", "");
    for _ in 0..3 {
        let resp = client().get(g.url("/x.php")).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "ok");
    }
    // The dirty connection is never reused.
    assert_eq!(f.accepted.load(std::sync::atomic::Ordering::SeqCst), 3);
}

#[tokio::test]
async fn overloaded_is_503() {
    let f = FakeFpm::start(Mode::Overloaded);
    let g = gate(&f.addr.to_string(), "", "");
    let resp = client().get(g.url("/x.php")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
}

#[tokio::test]
async fn silent_fpm_is_504_read_timeout() {
    let f = FakeFpm::start(Mode::Silent);
    let g = gate(
        &f.addr.to_string(),
        "    timeouts: { read: 500ms }\n    retries: 0",
        "",
    );
    let t = Instant::now();
    assert_eq!(get_status(&g, "/x.php").await, 504);
    assert!(t.elapsed() < Duration::from_secs(3));
    // Real PHP: a script slower than the read timeout.
    let g = gate(
        &shared_fpm().endpoint(),
        "    timeouts: { read: 500ms }",
        "",
    );
    for _ in 0..3 {
        assert_eq!(get_status(&g, "/sleep.php?ms=1500").await, 504);
    }
    // Three read timeouts in a row (the passive default) do not eject the pool's only
    // endpoint: a few slow scripts would take the whole pool down.
    assert_eq!(get_status(&g, "/index.php").await, 200);
    // Beside another endpoint, one that never answers is ejected after them.
    let f = FakeFpm::start(Mode::Silent);
    let g = gate(
        &format!("{}\" }}, {{ addr: \"{}", f.addr, shared_fpm().endpoint()),
        "    balance: round_robin\n    timeouts: { read: 300ms }\n    retries: 0",
        "",
    );
    let mut codes = Vec::new();
    for _ in 0..12 {
        codes.push(get_status(&g, "/index.php").await);
    }
    assert_eq!(codes.iter().filter(|&&c| c == 504).count(), 3, "{codes:?}");
    assert!(codes[6..].iter().all(|&c| c == 200), "{codes:?}");
    // A request large enough to be written beside the read (all of it fits in the socket
    // buffers): the read timeout runs from its end.
    let g = gate(
        &shared_fpm().unix_endpoint(),
        "    timeouts: { read: 500ms }",
        "",
    );
    let t = Instant::now();
    let resp = client()
        .put(g.url("/sleep.php?ms=1500"))
        .body(vec![b'p'; 100 << 10])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 504);
    assert!(
        t.elapsed() < Duration::from_millis(1400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(gateway_errors(&g, 504, "read_timeout").await, 1);
}

/// A script that takes none of a large PUT body (PHP reads it only when asked) and says
/// nothing for longer than the send timeout: 504 when the send timeout runs out, not when
/// the script ends.
#[tokio::test]
async fn fpm_taking_no_input_is_504_send_timeout() {
    // Over a unix socket, whose buffers (~200 KiB) fill long before the body ends.
    let g = gate(
        &shared_fpm().unix_endpoint(),
        "    timeouts: { send: 500ms, read: 10s }",
        "limits: { body_buffer: 1MiB }",
    );
    // In memory and spooled to a file.
    for len in [768 << 10, 3 << 20] {
        let t = Instant::now();
        let resp = client()
            .put(g.url("/sleep.php?ms=2500"))
            .body(vec![b'b'; len])
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 504, "{len}-byte body");
        assert!(
            t.elapsed() < Duration::from_secs(2),
            "{len}-byte body: {:?}",
            t.elapsed()
        );
    }
    assert_eq!(gateway_errors(&g, 504, "send_timeout").await, 2);
}

#[tokio::test]
async fn body_over_max_body_is_413() {
    let g = gate(
        &shared_fpm().endpoint(),
        "",
        "limits: { max_body: 1KiB, body_buffer: 512B }",
    );
    let c = client();
    let ok = c
        .post(g.url("/body.php"))
        .body(vec![b'a'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    let declared = c
        .post(g.url("/body.php"))
        .body(vec![b'a'; 1025])
        .send()
        .await
        .unwrap();
    assert_eq!(declared.status(), 413);
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..4).map(|_| Ok(vec![b'b'; 400])).collect();
    let chunked = c
        .post(g.url("/body.php"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(chunked.status(), 413);
}

#[tokio::test]
async fn oversized_head_uri_and_host_are_rejected() {
    let g = gate(
        &shared_fpm().endpoint(),
        "",
        "limits: { max_header_bytes: 8KiB, max_uri: 1KiB }",
    );
    let c = client();
    let resp = c
        .get(g.url("/server.php"))
        .header("X-Big", "a".repeat(20_000))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    let resp = c
        .get(g.url(&format!("/server.php?q={}", "a".repeat(2000))))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 414);
    let resp = c
        .get(g.url("/server.php"))
        .header("Host", "bad host/x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);

    // The 431 and a head that does not parse are answered by hyper's parser before any
    // handler runs: they are still counted, and logged, like the other refusals.
    let mut s = std::net::TcpStream::connect(g.http).unwrap();
    std::io::Write::write_all(&mut s, b"GET / HTTP/1.1\r\nHost x\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let m = g.metrics().await;
    let count = |code: &str| {
        let labels = format!("{{code=\"{code}\",pool=\"-\",vhost=\"-\"}}");
        m.lines()
            .find(|l| l.starts_with("fpmgate_http_requests_total") && l.contains(&labels))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!(count("431"), Some(1), "{m}");
    // The bad Host header above is ours, the broken head hyper's.
    assert_eq!(count("400"), Some(2), "{m}");
    assert!(
        g.wait_for_log("\" 431 0 ", Duration::from_secs(2))
            && g.wait_for_log("cause=header_too_large", Duration::from_secs(2)),
        "{:?}",
        g.logs()
    );
}

#[tokio::test]
async fn unknown_vhost_without_default_is_404() {
    let g = Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
pools:
  main:
    endpoints: [ {{ addr: "{}" }} ]
vhosts:
  - hosts: [shop.test]
    root: {}
    pool: main
"#,
        shared_fpm().endpoint(),
        php_root().display()
    ));
    assert_eq!(get_status(&g, "/server.php").await, 404);
    let resp = client()
        .get(g.url("/server.php"))
        .header("Host", "shop.test:1234")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn full_queue_is_503_at_once_and_queued_requests_are_served() {
    // One worker slot (max_conns 1) and room for one waiter.
    let g = Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{}", max_conns: 1 }} ]
    queue: {{ size: 1, timeout: 5s }}
    retry_after: 7
vhosts:
  - hosts: ["*"]
    root: {}
    pool: main
"#,
        shared_fpm().endpoint(),
        php_root().display()
    ));
    let c = client();
    let first = tokio::spawn(c.get(g.url("/sleep.php?ms=800")).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = tokio::spawn(c.get(g.url("/sleep.php?ms=10")).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let third = c.get(g.url("/sleep.php?ms=10")).send().await.unwrap();
    assert_eq!(third.status(), 503);
    assert_eq!(third.headers()["retry-after"], "7");
    assert!(
        t.elapsed() < Duration::from_millis(300),
        "a full queue answers at once"
    );
    assert_eq!(first.await.unwrap().unwrap().status(), 200);
    assert_eq!(
        second.await.unwrap().unwrap().status(),
        200,
        "the queued request is served"
    );
    assert_eq!(gateway_errors(&g, 503, "queue_full").await, 1);

    // Queue timeout: a waiter gives up after queue.timeout.
    let g2 = Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{}", max_conns: 1 }} ]
    queue: {{ size: 4, timeout: 300ms }}
vhosts:
  - hosts: ["*"]
    root: {}
    pool: main
"#,
        shared_fpm().endpoint(),
        php_root().display()
    ));
    let slow = tokio::spawn(c.get(g2.url("/sleep.php?ms=1200")).send());
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = Instant::now();
    let waited = c.get(g2.url("/sleep.php?ms=10")).send().await.unwrap();
    assert_eq!(waited.status(), 503);
    let e = t.elapsed();
    assert!(
        e >= Duration::from_millis(250) && e < Duration::from_millis(1000),
        "{e:?}"
    );
    assert_eq!(slow.await.unwrap().unwrap().status(), 200);
    assert_eq!(gateway_errors(&g2, 503, "queue_timeout").await, 1);
}

/// Two requests on one keep-alive connection, the raw bytes of both answers.
async fn two_on_one_connection(g: &Gate, first: &str, second: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut sock = tokio::net::TcpStream::connect(g.http).await.unwrap();
    let req = format!(
        "GET {first} HTTP/1.1\r\nHost: t\r\n\r\nGET {second} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
    );
    sock.write_all(req.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), sock.read_to_end(&mut out))
        .await
        .expect("the connection ends after the second answer")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

/// A log line saying `what`, with the pool, endpoint and request id it is about.
fn overrun_reported(g: &Gate, what: &str) {
    let endpoint = format!("endpoint={}", shared_fpm().endpoint());
    let warned = g
        .logs()
        .into_iter()
        .find(|l| l.contains(what))
        .unwrap_or_else(|| panic!("no warning `{what}`: {:?}", g.logs()));
    assert!(
        warned.contains("pool=main")
            && warned.contains(&endpoint)
            && warned.contains("request_id="),
        "{warned}"
    );
}

#[tokio::test]
async fn script_content_length_frames_the_response() {
    let g = gate(&shared_fpm().endpoint(), "", "");
    // Longer than declared: the client gets the declared length, and the rest is not read
    // as the start of the next response on the connection.
    let raw = two_on_one_connection(&g, "/length.php?declared=2&body=hello", "/index.php").await;
    let (first, second) = raw
        .split_once("\r\n\r\nhe")
        .unwrap_or_else(|| panic!("no first body:\n{raw}"));
    assert!(first.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(
        first.to_ascii_lowercase().contains("content-length: 2\r"),
        "{raw}"
    );
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the bytes after the declared length must be the next response:\n{raw}"
    );
    // The operator is told, with where it came from.
    overrun_reported(&g, "declared Content-Length 2 but sent 5 bytes");
    // Shorter than declared: a truncated response, 502, not a 200 the client waits on.
    let raw = two_on_one_connection(&g, "/length.php?declared=100&body=hello", "/index.php").await;
    assert!(raw.starts_with("HTTP/1.1 502"), "{raw}");
    assert!(!raw.contains("hello"), "{raw}");
    assert_eq!(gateway_errors(&g, 502, "protocol").await, 1);
    // Right: untouched.
    let resp = client()
        .get(g.url("/length.php?declared=5&body=hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "hello");
}

/// Over HTTP/2 nothing else holds a body to its `Content-Length`: a DATA frame past it, or
/// any on a 304, fails the client's whole stream, and a body that ends short must reset the
/// stream rather than end it as if complete.
#[tokio::test]
async fn over_http2_bodies_keep_to_the_scripts_content_length() {
    let g = gate(&shared_fpm().endpoint(), "", "");
    let c = client_builder().http2_prior_knowledge().build().unwrap();
    for after in ["", "&after_ms=100"] {
        let r = c
            .get(g.url(&format!("/length.php?declared=2&body=hello{after}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{after}");
        assert_eq!(r.text().await.unwrap(), "he", "{after}");
        let r = c
            .get(g.url(&format!(
                "/length.php?code=304&declared=5&body=hello{after}"
            )))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 304, "{after}");
        assert_eq!(r.bytes().await.unwrap().len(), 0, "{after}");
    }
    // The streamed one is reported as the whole one is.
    overrun_reported(&g, "declared Content-Length 2 but sent 5 bytes or more");
    let r = c
        .get(g.url("/length.php?declared=100&body=hello&after_ms=100"))
        .send()
        .await
        .unwrap();
    let h = format!("{:?}", r.headers());
    let got = r.bytes().await;
    assert!(
        got.is_err(),
        "a short body ended as if complete: {got:?} {h}"
    );
    // Still one healthy connection to the proxy.
    let r = c
        .get(g.url("/length.php?declared=5&body=hello"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.text().await.unwrap(), "hello");
}
