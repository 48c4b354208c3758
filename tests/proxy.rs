//! The request path against a real PHP-FPM: nginx-parity params, bodies, status
//! pass-through, streaming, and every error status the proxy produces.
//!
//! Expected values are those nginx gives with upstream `fastcgi_params`,
//! `fastcgi_split_path_info ^(.+?\.php)(/.*)$`, `SCRIPT_FILENAME $document_root$fastcgi_script_name`,
//! `PATH_INFO $fastcgi_path_info` and `try_files $uri $uri/ /index.php$is_args$args`.

mod support;

use std::time::{Duration, Instant};

use md5::{Digest, Md5};
use serde_json::Value;
use support::{client, php_root, shared_fpm, Fpm, FpmOptions, Gate};

fn gate_for(endpoint: &str, extra_pool: &str, limits: &str) -> Gate {
    Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{endpoint}" }} ]
{extra_pool}
vhosts:
  - hosts: ["*"]
    root: {root}
    pool: main
    index: index.php
{limits}
"#,
        root = php_root().display()
    ))
}

fn shared_gate() -> &'static Gate {
    static G: std::sync::OnceLock<Gate> = std::sync::OnceLock::new();
    G.get_or_init(|| gate_for(&shared_fpm().endpoint(), "", ""))
}

async fn json(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let text = resp.text().await.expect("body");
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("status {status}, not JSON ({e}): {text}"))
}

fn s<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

fn md5_hex(data: &[u8]) -> String {
    format!("{:x}", Md5::digest(data))
}

/// The deterministic pattern of big.php.
fn pattern(n: usize) -> Vec<u8> {
    b"0123456789abcdef"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect()
}

#[tokio::test]
async fn script_with_path_info_and_query_matches_nginx() {
    let g = shared_gate();
    let root = php_root().display().to_string();
    let resp = client()
        .get(g.url("/server.php/some/path?x=1&y=%20z"))
        .header("X-Custom", "v1")
        .header("Proxy", "http://evil.example")
        .header("X_Spoof", "bad")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let v = json(resp).await;
    assert_eq!(s(&v, "SCRIPT_NAME"), "/server.php");
    assert_eq!(s(&v, "SCRIPT_FILENAME"), format!("{root}/server.php"));
    assert_eq!(s(&v, "PATH_INFO"), "/some/path");
    assert_eq!(s(&v, "REQUEST_URI"), "/server.php/some/path?x=1&y=%20z");
    assert_eq!(s(&v, "DOCUMENT_URI"), "/server.php/some/path");
    assert_eq!(s(&v, "QUERY_STRING"), "x=1&y=%20z");
    assert_eq!(s(&v, "DOCUMENT_ROOT"), root);
    assert_eq!(s(&v, "REQUEST_METHOD"), "GET");
    assert_eq!(s(&v, "SERVER_PROTOCOL"), "HTTP/1.1");
    assert_eq!(s(&v, "GATEWAY_INTERFACE"), "CGI/1.1");
    assert_eq!(s(&v, "REQUEST_SCHEME"), "http");
    assert_eq!(s(&v, "REDIRECT_STATUS"), "200");
    assert_eq!(s(&v, "CONTENT_LENGTH"), "");
    assert_eq!(s(&v, "CONTENT_TYPE"), "");
    assert_eq!(s(&v, "HTTP_HOST"), g.http.to_string());
    assert_eq!(s(&v, "SERVER_NAME"), "127.0.0.1");
    assert_eq!(s(&v, "SERVER_PORT"), g.http.port().to_string());
    assert_eq!(s(&v, "SERVER_ADDR"), "127.0.0.1");
    assert_eq!(s(&v, "REMOTE_ADDR"), "127.0.0.1");
    assert_eq!(s(&v, "HTTP_X_CUSTOM"), "v1");
    assert!(s(&v, "SERVER_SOFTWARE").starts_with("fpmgate/"));
    assert!(
        v.get("HTTP_PROXY").is_none(),
        "httpoxy: Proxy header must not reach PHP"
    );
    assert!(
        v.get("HTTP_X_SPOOF").is_none(),
        "underscore headers are dropped"
    );
    assert!(v.get("HTTPS").is_none());
}

#[tokio::test]
async fn front_controller_keeps_request_uri() {
    let g = shared_gate();
    for (path, uri) in [
        ("/app/page?q=1", "/app/page?q=1"),
        ("/", "/"),
        ("/app/", "/app/"),
    ] {
        let v = json(client().get(g.url(path)).send().await.unwrap()).await;
        assert_eq!(v["_front"], Value::Bool(true), "{path}");
        assert_eq!(s(&v, "SCRIPT_NAME"), "/index.php", "{path}");
        assert_eq!(s(&v, "REQUEST_URI"), uri, "{path}");
        assert_eq!(s(&v, "DOCUMENT_URI"), "/index.php", "{path}");
        assert_eq!(s(&v, "PATH_INFO"), "", "{path}");
    }
}

/// Sends raw request bytes (clients normalise dot segments before sending) and returns the
/// whole response as text.
fn raw(g: &Gate, request: &str) -> String {
    use std::io::{Read, Write};
    let mut sock = std::net::TcpStream::connect(g.http).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    sock.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = sock.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn raw_get(g: &Gate, path: &str) -> String {
    raw(
        g,
        &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"),
    )
}

fn raw_body_json(resp: &str) -> Value {
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    // The response is chunked: take the JSON object between the first '{' and the last '}'.
    let (a, b) = (
        body.find('{').unwrap_or(0),
        body.rfind('}').map_or(0, |i| i + 1),
    );
    serde_json::from_str(&body[a..b]).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

#[tokio::test]
async fn dot_segments_and_encoded_paths() {
    let g = shared_gate();
    let v = raw_body_json(&raw_get(g, "/x/../server.php?a"));
    assert_eq!(s(&v, "SCRIPT_NAME"), "/server.php");
    assert_eq!(s(&v, "REQUEST_URI"), "/x/../server.php?a");
    assert_eq!(s(&v, "DOCUMENT_URI"), "/server.php");
    let v = raw_body_json(&raw_get(g, "//x/./..//server.php/a/./b"));
    assert_eq!(s(&v, "SCRIPT_NAME"), "/server.php");
    assert_eq!(s(&v, "PATH_INFO"), "/a/b");
    let v = json(
        client()
            .get(g.url("/%73erver.php/caf%C3%A9"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s(&v, "SCRIPT_NAME"), "/server.php");
    assert_eq!(s(&v, "PATH_INFO"), "/café");
    assert_eq!(s(&v, "REQUEST_URI"), "/%73erver.php/caf%C3%A9");
}

#[tokio::test]
async fn bad_paths_are_400_before_php() {
    let g = shared_gate();
    for path in [
        "/server.php%00.jpg",
        "/x.php%0a",
        "/a%0d.php",
        "/../etc/passwd",
        "/%2e%2e/etc/passwd",
        "/a/../../etc/passwd",
        "/bad%zz",
    ] {
        let resp = raw_get(g, path);
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
    }
}

#[tokio::test]
async fn missing_script_is_fpm_404() {
    let g = shared_gate();
    let resp = client().get(g.url("/nope.php")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn post_bodies_reach_php_with_content_length() {
    let g = shared_gate();
    // urlencoded
    let resp = client()
        .post(g.url("/body.php"))
        .header("Content-Type", "application/x-www-form-urlencoded")
        .body("a=1&b=two")
        .send()
        .await
        .unwrap();
    let v = json(resp).await;
    assert_eq!(s(&v, "content_length"), "9");
    assert_eq!(v["post"]["a"], "1");
    assert_eq!(v["post"]["b"], "two");
    // JSON
    let body = br#"{"k":[1,2,3]}"#;
    let v = json(
        client()
            .post(g.url("/body.php"))
            .header("Content-Type", "application/json")
            .body(&body[..])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["length"], body.len());
    assert_eq!(s(&v, "md5"), md5_hex(body));
    assert_eq!(s(&v, "content_type"), "application/json");
    // empty POST still gets CONTENT_LENGTH 0 and an empty STDIN
    let v = json(client().post(g.url("/body.php")).send().await.unwrap()).await;
    assert_eq!(s(&v, "content_length"), "0");
    assert_eq!(v["length"], 0);
    // PUT and DELETE
    let v = json(
        client()
            .put(g.url("/body.php"))
            .body("put-body")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s(&v, "method"), "PUT");
    assert_eq!(s(&v, "md5"), md5_hex(b"put-body"));
    let v = json(client().delete(g.url("/body.php")).send().await.unwrap()).await;
    assert_eq!(s(&v, "method"), "DELETE");
}

/// Bodies around the sizes where the STDIN records change shape: copied into the request
/// buffer up to 16 KiB, written apart above it, split into 65,535-byte records.
#[tokio::test]
async fn bodies_at_record_boundaries_arrive_intact() {
    let g = shared_gate();
    for n in [
        16 * 1024,
        16 * 1024 + 1,
        65_535,
        65_536,
        131_070,
        131_071,
        200_000,
    ] {
        let body = pattern(n);
        let v = json(
            client()
                .post(g.url("/body.php"))
                .body(body.clone())
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(v["length"], n, "length of a {n}-byte body");
        assert_eq!(s(&v, "md5"), md5_hex(&body), "md5 of a {n}-byte body");
    }
}

#[tokio::test]
async fn chunked_request_body_gets_a_real_content_length() {
    let g = shared_gate();
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..10).map(|i| Ok(vec![b'a' + i as u8; 1000])).collect();
    let expected: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.as_ref().unwrap().clone())
        .collect();
    let body = reqwest::Body::wrap_stream(futures_util::stream::iter(chunks));
    let v = json(
        client()
            .post(g.url("/body.php"))
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s(&v, "content_length"), "10000");
    assert_eq!(s(&v, "md5"), md5_hex(&expected));
}

#[tokio::test]
async fn multipart_upload_arrives_intact() {
    let g = shared_gate();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let boundary = "XyZbOuNdArY";
    let mut body = Vec::new();
    body.extend_from_slice(
        format!("--{boundary}\r\nContent-Disposition: form-data; name=\"title\"\r\n\r\nhello\r\n")
            .as_bytes(),
    );
    body.extend_from_slice(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"f\"; filename=\"blob.bin\"\r\nContent-Type: application/octet-stream\r\n\r\n").as_bytes());
    body.extend_from_slice(&data);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let v = json(
        client()
            .post(g.url("/body.php"))
            .header(
                "Content-Type",
                format!("multipart/form-data; boundary={boundary}"),
            )
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["post"]["title"], "hello");
    assert_eq!(v["files"][0]["size"], data.len());
    assert_eq!(s(&v["files"][0], "md5"), md5_hex(&data));
}

#[tokio::test]
async fn cookies_and_repeated_headers_are_joined() {
    let g = shared_gate();
    let v = json(
        client()
            .get(g.url("/server.php"))
            .header("Cookie", "a=1")
            .header("Cookie", "b=2")
            .header("Accept", "text/html")
            .header("Accept", "application/json")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(s(&v, "HTTP_COOKIE"), "a=1; b=2");
    assert_eq!(s(&v, "HTTP_ACCEPT"), "text/html, application/json");
}

#[tokio::test]
async fn head_has_no_body_and_the_connection_survives() {
    let g = shared_gate();
    let c = client();
    let resp = c.head(g.url("/server.php")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.bytes().await.unwrap().len(), 0);
    let resp = c.get(g.url("/pid.php")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn status_location_and_cookies_pass_through() {
    let g = shared_gate();
    let resp = client()
        .get(g.url("/status.php?code=418"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 418);
    let resp = client()
        .get(g.url("/redirect.php?to=/elsewhere"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 302);
    assert_eq!(resp.headers()["location"], "/elsewhere");
    let resp = client().get(g.url("/cookies.php")).send().await.unwrap();
    let cookies: Vec<&str> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap())
        .collect();
    assert_eq!(cookies.len(), 3, "{cookies:?}");
    assert!(
        cookies[0].starts_with("a=1")
            && cookies[1].starts_with("b=2")
            && cookies[2].starts_with("c=3")
    );
}

#[tokio::test]
async fn ten_mib_response_is_intact() {
    let g = shared_gate();
    let n = 10 * 1024 * 1024 + 7;
    let resp = client()
        .get(g.url(&format!("/big.php?bytes={n}")))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body = resp.bytes().await.unwrap();
    assert_eq!(body.len(), n);
    assert_eq!(md5_hex(&body), md5_hex(&pattern(n)));
}

#[tokio::test]
async fn streamed_responses_with_content_length_keep_the_connection() {
    // hyper drops a body once the declared Content-Length has been sent, before FPM's
    // END_REQUEST is read: the connection must still go back to the pool, also when the
    // script runs on after its last byte (END_REQUEST comes later).
    let fpm = Fpm::start(FpmOptions {
        workers: 1,
        ..FpmOptions::default()
    });
    let g = kept_gate(&fpm, 1);
    let c = client();
    let n = 300_000;
    for i in 0..10 {
        let resp = c
            .get(g.url(&format!("/big.php?bytes={n}&length=1")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.content_length(), Some(n as u64));
        let body = resp.bytes().await.unwrap();
        assert_eq!(md5_hex(&body), md5_hex(&pattern(n)), "request {i}");
    }
    let started = Instant::now();
    for i in 0..3 {
        let resp = c
            .get(g.url("/big.php?bytes=5000&length=1&after_ms=700"))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "late end {i}");
        assert_eq!(resp.bytes().await.unwrap(), pattern(5000), "late end {i}");
    }
    // One worker, one connection: each request waited for the previous script's end.
    assert!(started.elapsed() >= Duration::from_millis(1400));
    let resp = c.get(g.url("/pid.php")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let metrics = g.metrics().await;
    let connects = metric_value(&metrics, "fpmgate_upstream_connects_total{");
    let reuses = metric_value(&metrics, "fpmgate_upstream_connection_reuses_total{");
    assert_eq!(connects, 1.0, "FastCGI connections opened for 14 requests");
    assert_eq!(reuses, 13.0);
}

#[tokio::test]
async fn fifty_mib_upload_is_intact() {
    let g = shared_gate();
    let data: Vec<u8> = (0..50 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let v = json(
        client()
            .post(g.url("/body.php"))
            .header("Content-Type", "application/octet-stream")
            .body(data.clone())
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(v["length"], data.len());
    assert_eq!(s(&v, "md5"), md5_hex(&data));
}

/// A script that writes megabytes of output before it reads its (large) input: the proxy
/// must forward the answer while it is still sending the body, or both sides wait on full
/// socket buffers until the send timeout.
#[tokio::test]
async fn a_script_answering_before_reading_its_body_gets_it_all() {
    // Over a unix socket, whose buffers (~200 KiB) fill long before the output ends.
    let g = gate_for(
        &shared_fpm().unix_endpoint(),
        "    timeouts: { send: 2s }",
        "limits: { body_buffer: 1MiB }",
    );
    let out = 4 << 20;
    // In memory (sent from its buffer) and spooled to a file.
    for len in [768 << 10, 3 << 20] {
        let started = Instant::now();
        let resp = client()
            .put(g.url(&format!("/answer_first.php?out={out}")))
            .body(vec![b'b'; len])
            .send()
            .await
            .unwrap();
        let status = resp.status();
        let text = resp.text().await.expect("body");
        assert_eq!(
            status,
            200,
            "{len}-byte body: {}",
            &text[..text.len().min(300)]
        );
        assert_eq!(text.len(), out + format!("\nread {len}\n").len());
        assert!(
            text.ends_with(&format!("\nread {len}\n")),
            "{len}-byte body"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{len}-byte body waited for the send timeout"
        );
    }
    // The rest of each body went out beside the response: the connection was kept.
    let metrics = g.metrics().await;
    assert_eq!(
        metric_value(&metrics, "fpmgate_upstream_connects_total{"),
        1.0
    );
    assert_eq!(
        metric_value(&metrics, "fpmgate_upstream_connection_reuses_total{"),
        1.0
    );
    // As many at once as the pool has workers (more would wait in FPM's backlog, unread,
    // past the send timeout), on the connections they leave behind: none stalls.
    for round in 0..3 {
        let calls = (0..4).map(|i| {
            let len = if i % 2 == 0 { 768 << 10 } else { 3 << 20 };
            let url = g.url(&format!("/answer_first.php?out={}", 2 << 20));
            async move {
                let resp = client()
                    .put(url)
                    .body(vec![b'c'; len])
                    .send()
                    .await
                    .unwrap();
                assert_eq!(resp.status(), 200, "round {round}, {len}-byte body");
                let text = resp.text().await.expect("body");
                assert!(text.ends_with(&format!("\nread {len}\n")), "round {round}");
            }
        });
        futures_util::future::join_all(calls).await;
    }
}

#[tokio::test]
async fn flushed_output_streams_incrementally() {
    let g = shared_gate();
    let started = Instant::now();
    let mut resp = client()
        .get(g.url("/stream.php?n=5&ms=200"))
        .send()
        .await
        .unwrap();
    let first = resp.chunk().await.unwrap().expect("first chunk");
    let first_at = started.elapsed();
    assert!(String::from_utf8_lossy(&first).starts_with("tick 0"));
    let mut lines = String::from_utf8_lossy(&first).to_string();
    while let Some(c) = resp.chunk().await.unwrap() {
        lines.push_str(&String::from_utf8_lossy(&c));
    }
    let total = started.elapsed();
    assert_eq!(lines.lines().count(), 5);
    // Buffering would deliver the first line only after the whole 800 ms.
    assert!(total >= Duration::from_millis(800));
    assert!(
        first_at + Duration::from_millis(500) < total,
        "first chunk at {first_at:?}, all at {total:?}"
    );
}

/// One pool of one FPM endpoint, `max_conns` as given, one kept connection at most.
fn kept_gate(fpm: &Fpm, max_conns: u32) -> Gate {
    Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{}", max_conns: {max_conns} }} ]
    keepalive: {{ max_idle: 1, idle_timeout: 30s }}
vhosts:
  - hosts: ["*"]
    root: {}
    pool: main
"#,
        fpm.endpoint(),
        php_root().display()
    ))
}

#[tokio::test]
async fn kept_connections_are_reused() {
    let fpm = Fpm::start(FpmOptions {
        workers: 2,
        ..FpmOptions::default()
    });
    let g = kept_gate(&fpm, 2);
    let c = client();
    let mut pids = std::collections::BTreeSet::new();
    for i in 0..2000 {
        let resp = c.get(g.url("/pid.php")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        pids.insert(resp.text().await.unwrap());
    }
    // One FastCGI connection is one FPM worker: reuse means one pid served everything.
    assert_eq!(pids.len(), 1, "{pids:?}");
    let metrics = g.metrics().await;
    let connects = metric_value(&metrics, "fpmgate_upstream_connects_total{");
    let reuses = metric_value(&metrics, "fpmgate_upstream_connection_reuses_total{");
    assert!(
        connects <= 1.0,
        "opened {connects} FastCGI connections for 2000 sequential requests"
    );
    assert!(reuses >= 1999.0, "reuses {reuses}");
}

#[tokio::test]
async fn recycled_fpm_workers_cause_no_client_error() {
    // Every worker exits after 3 requests, killing the kept connection under fpmgate.
    let fpm = Fpm::start(FpmOptions {
        workers: 2,
        max_requests: 3,
        ..FpmOptions::default()
    });
    let g = gate_for(&fpm.endpoint(), "", "");
    let c = client();
    for i in 0..200 {
        let resp = c.get(g.url("/pid.php")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "request {i}");
        resp.bytes().await.unwrap();
    }
    // Ordinary recycling is not an upstream error on the dashboards.
    let metrics = g.metrics().await;
    let errors = metric_value(&metrics, "fpmgate_upstream_errors_total{");
    assert_eq!(errors, 0.0, "recycled workers counted as errors");
}

pub fn metric_value(text: &str, prefix: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(prefix))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
