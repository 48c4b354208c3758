//! The edge features operators rely on behind load balancers: access-log lines (JSON and
//! combined), request ids shared with PHP, the real client address from trusted
//! `X-Forwarded-For` / `X-Real-IP`, and the PROXY protocol v1/v2.

mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use serde_json::Value;
use support::{client, php_root, shared_fpm, Gate};

fn gate(top: &str, listen_extra: &str) -> Gate {
    Gate::start(&format!(
        r#"
listen:
  - bind: "127.0.0.1:0"
{listen_extra}
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{}" }} ]
vhosts:
  - hosts: ["*"]
    root: {}
    pool: main
{top}
"#,
        shared_fpm().endpoint(),
        php_root().display()
    ))
}

fn raw(g: &Gate, bytes: &[u8]) -> String {
    raw_in_parts(g, &[bytes])
}

/// Sends each part with a pause between them (separate segments), then reads to the end.
fn raw_in_parts(g: &Gate, parts: &[&[u8]]) -> String {
    let mut s = TcpStream::connect(g.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(100));
        }
        s.write_all(part).unwrap();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn body_json(resp: &str) -> Value {
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    let (a, b) = (
        body.find('{').unwrap_or(0),
        body.rfind('}').map_or(0, |i| i + 1),
    );
    serde_json::from_str(&body[a..b]).unwrap_or_else(|e| panic!("{e}: {resp}"))
}

#[tokio::test]
async fn json_access_log_lines_carry_the_fields() {
    let g = gate("access_log: json", "");
    let resp = client()
        .get(g.url("/server.php?x=1"))
        .header("User-Agent", "edge-test")
        .send()
        .await
        .unwrap();
    let rid = resp.headers()["x-request-id"].to_str().unwrap().to_string();
    let v: Value = resp.json().await.unwrap();
    assert_eq!(
        v["HTTP_X_REQUEST_ID"],
        rid.as_str(),
        "PHP sees the same request id"
    );
    assert_eq!(
        client()
            .get(g.url("/missing.php"))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert!(
        g.wait_for_log_count("\"request_id\"", 2, Duration::from_secs(5)),
        "{:?}",
        g.logs()
    );
    let lines: Vec<Value> = g
        .logs()
        .iter()
        .filter(|l| l.contains("\"request_id\""))
        .map(|l| {
            let start = l.find('{').unwrap();
            serde_json::from_str(&l[start..])
                .unwrap_or_else(|e| panic!("access line is not JSON ({e}): {l}"))
        })
        .collect();
    let first = &lines[0];
    assert_eq!(first["request_id"], rid.as_str());
    assert_eq!(first["method"], "GET");
    assert_eq!(first["uri"], "/server.php?x=1");
    assert_eq!(first["status"], 200);
    assert_eq!(first["vhost"], "*");
    assert_eq!(first["pool"], "main");
    assert_eq!(first["endpoint"], shared_fpm().endpoint());
    assert_eq!(first["user_agent"], "edge-test");
    assert!(first["bytes"].as_u64().unwrap() > 100);
    assert!(first["upstream_time"].as_f64().unwrap() >= 0.0);
    assert!(first["total_time"].as_f64().unwrap() >= first["upstream_time"].as_f64().unwrap());
    assert_eq!(lines[1]["status"], 404);
}

#[tokio::test]
async fn combined_access_log_and_error_causes() {
    let g = Gate::start(&format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0" }} ]
pools:
  main:
    endpoints: [ {{ addr: "127.0.0.1:{}" }} ]
    retries: 0
vhosts:
  - hosts: ["*"]
    root: {}
    pool: main
"#,
        support::free_port(),
        php_root().display()
    ));
    assert_eq!(
        client().get(g.url("/x.php")).send().await.unwrap().status(),
        502
    );
    assert!(
        g.wait_for_log("\"GET /x.php HTTP/1.1\" 502", Duration::from_secs(5)),
        "{:?}",
        g.logs()
    );
    let line = g
        .logs()
        .into_iter()
        .find(|l| l.contains("\"GET /x.php HTTP/1.1\" 502"))
        .unwrap();
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains("cause=connect") && line.contains("pool=main"),
        "{line}"
    );
}

#[tokio::test]
async fn trusted_forwarded_for_sets_remote_addr() {
    let g = gate("trusted_proxies: [127.0.0.0/8]\naccess_log: off", "");
    let resp = raw(&g, b"GET /server.php HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7, 127.0.0.5\r\nX-Request-Id: lb-abc-123\r\nConnection: close\r\n\r\n");
    assert!(
        resp.contains("x-request-id: lb-abc-123") || resp.contains("X-Request-Id: lb-abc-123"),
        "{resp}"
    );
    let v = body_json(&resp);
    assert_eq!(v["REMOTE_ADDR"], "203.0.113.7", "right-most untrusted hop");
    assert_eq!(
        v["HTTP_X_FORWARDED_FOR"], "203.0.113.7, 127.0.0.5",
        "passed on as nginx does"
    );
    assert_eq!(
        v["HTTP_X_REQUEST_ID"], "lb-abc-123",
        "a trusted proxy's request id is kept"
    );
    let v = body_json(&raw(&g, b"GET /server.php HTTP/1.1\r\nHost: x\r\nX-Real-IP: 198.51.100.9\r\nConnection: close\r\n\r\n"));
    assert_eq!(v["REMOTE_ADDR"], "198.51.100.9");

    // A front that sets X-Real-IP and passes the client's X-Forwarded-For on untouched.
    let g = gate(
        "trusted_proxies: [127.0.0.0/8]\nreal_ip_header: x-real-ip\naccess_log: off",
        "",
    );
    let v = body_json(&raw(&g, b"GET /server.php HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.1.2.3\r\nX-Real-IP: 198.51.100.9\r\nConnection: close\r\n\r\n"));
    assert_eq!(v["REMOTE_ADDR"], "198.51.100.9");

    // From an untrusted peer the header is only data.
    let g = gate("trusted_proxies: [10.0.0.0/8]", "");
    let v = body_json(&raw(&g, b"GET /server.php HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 203.0.113.7\r\nX-Request-Id: spoofed\r\nConnection: close\r\n\r\n"));
    assert_eq!(v["REMOTE_ADDR"], "127.0.0.1");
    assert_ne!(v["HTTP_X_REQUEST_ID"], "spoofed");
}

/// A gate whose one listener takes the PROXY protocol, with `extra` top-level keys.
fn proxy_protocol_config(extra: &str) -> String {
    format!(
        r#"
listen: [ {{ bind: "127.0.0.1:0", proxy_protocol: true }} ]
{extra}
pools:
  main:
    endpoints: [ {{ addr: "{}" }} ]
vhosts:
  - hosts: ["*"]
    root: {}
    pool: main
access_log: off
"#,
        shared_fpm().endpoint(),
        php_root().display()
    )
}

#[tokio::test]
async fn proxy_protocol_v1_and_v2_set_remote_addr() {
    let g = Gate::start(&proxy_protocol_config(""));
    let req = b"GET /server.php HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let mut v1 = b"PROXY TCP4 192.0.2.10 192.0.2.20 40000 443\r\n".to_vec();
    v1.extend_from_slice(req);
    let v = body_json(&raw(&g, &v1));
    assert_eq!(v["REMOTE_ADDR"], "192.0.2.10");
    assert_eq!(v["REMOTE_PORT"], "40000");
    assert_eq!(v["SERVER_PORT"], "443");

    // Headers split across segments, the split inside the signature and inside the
    // addresses: read as they come, nothing after them consumed.
    let (head, tail) = v1.split_at(20);
    for parts in [[&v1[..3], &v1[3..]], [head, tail]] {
        let v = body_json(&raw_in_parts(&g, &parts));
        assert_eq!(v["REMOTE_ADDR"], "192.0.2.10");
    }

    let mut v2 = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    v2.extend_from_slice(&[
        0x21, 0x11, 0, 12, 198, 51, 100, 1, 198, 51, 100, 2, 0x9c, 0x40, 0x01, 0xbb,
    ]);
    v2.extend_from_slice(req);
    let v = body_json(&raw(&g, &v2));
    assert_eq!(v["REMOTE_ADDR"], "198.51.100.1");
    for cut in [5, 14, 20] {
        let v = body_json(&raw_in_parts(&g, &[&v2[..cut], &v2[cut..]]));
        assert_eq!(v["REMOTE_ADDR"], "198.51.100.1", "cut at {cut}");
    }

    // A connection without the header bypassed the balancer: refused.
    let resp = raw(&g, req);
    assert!(resp.is_empty(), "served without a PROXY header: {resp}");
}

/// Whoever may write a PROXY header names every client behind it: `proxy_protocol_from`
/// keeps that to the load balancers, and a reload changes who they are.
#[tokio::test]
async fn proxy_protocol_from_refuses_other_peers() {
    let config = |from: &str| {
        proxy_protocol_config(&format!(
            "admin: {{ bind: \"127.0.0.1:0\" }}\nproxy_protocol_from: [{from}]"
        ))
    };
    let g = Gate::start(&config("10.0.0.0/8, \"::1\""));
    let mut v1 = b"PROXY TCP4 192.0.2.10 192.0.2.20 40000 443\r\n".to_vec();
    v1.extend_from_slice(b"GET /server.php HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let resp = raw(&g, &v1);
    assert!(
        resp.is_empty(),
        "served from outside proxy_protocol_from: {resp}"
    );
    let refused = |text: &str, cause: &str| {
        text.lines()
            .filter(|l| l.starts_with("fpmgate_client_connections_refused_total{"))
            .filter(|l| l.contains(&format!("cause=\"{cause}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let text = g.metrics().await;
    assert_eq!(refused(&text, "proxy_source"), 1.0, "{text}");
    // Without a header, from an allowed peer: refused for the header.
    g.rewrite_config(&config("127.0.0.0/8"));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !g.metrics().await.contains("fpmgate_config_generation 2") {
        assert!(
            std::time::Instant::now() < deadline,
            "the reload did not apply"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let v = body_json(&raw(&g, &v1));
    assert_eq!(v["REMOTE_ADDR"], "192.0.2.10");
    assert!(raw(&g, b"GET /server.php HTTP/1.1\r\nHost: x\r\n\r\n").is_empty());
    let text = g.metrics().await;
    assert_eq!(refused(&text, "proxy_header"), 1.0, "{text}");
    assert_eq!(refused(&text, "proxy_source"), 1.0, "{text}");
}

/// On the `*` vhost SERVER_NAME is the request's host, which the client chooses; a
/// vhost's `server_name` pins it (apps that build links from it cannot be pointed
/// elsewhere).
#[test]
fn server_name_pins_what_the_client_would_choose() {
    let req = b"GET /server.php HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n";
    let g = gate("access_log: off", "");
    assert_eq!(body_json(&raw(&g, req))["SERVER_NAME"], "attacker.example");
    let g = gate("    server_name: Shop.Example.com\naccess_log: off", "");
    let v = body_json(&raw(&g, req));
    assert_eq!(v["SERVER_NAME"], "shop.example.com");
    assert_eq!(
        v["HTTP_HOST"], "attacker.example",
        "the header itself is passed on"
    );
}
