//! Resolver, cache and expansion tests against a UDP DNS server run inside the test.

use super::*;
use crate::config::{parse_str, DnsConfig};
use std::path::Path;

/// A UDP DNS server sending the datagrams `answer(query, qtype)` returns for each
/// query; returns its address.
async fn server<F>(answer: F) -> SocketAddr
where
    F: Fn(&[u8], u16) -> Vec<Vec<u8>> + Send + 'static,
{
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut buf = [0u8; 512];
        while let Ok((n, peer)) = sock.recv_from(&mut buf).await {
            let q = &buf[..n];
            let qtype = u16::from_be_bytes([q[n - 4], q[n - 3]]);
            for r in answer(q, qtype) {
                let _ = sock.send_to(&r, peer).await;
            }
        }
    });
    addr
}

/// The response to query `q`: flags, then A records (pointer to the question name).
fn reply(q: &[u8], rcode: u16, ips: &[[u8; 4]]) -> Vec<u8> {
    let mut r = q.to_vec();
    r[2..4].copy_from_slice(&(0x8180u16 | rcode).to_be_bytes());
    r[6..8].copy_from_slice(&(ips.len() as u16).to_be_bytes());
    for ip in ips {
        r.extend_from_slice(&[0xC0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
        r.extend_from_slice(ip);
    }
    r
}

fn resolver(server: SocketAddr, ms: u64) -> Resolver {
    Resolver::new(&DnsConfig {
        resolver: Some(server),
        timeout: Duration::from_millis(ms),
    })
}

#[tokio::test]
async fn server_answers_are_sorted_and_deduplicated() {
    let s = server(|q, qtype| {
        vec![match qtype {
            wire::TYPE_A => reply(q, 0, &[[10, 0, 0, 2], [10, 0, 0, 1], [10, 0, 0, 2]]),
            _ => reply(q, 0, &[]),
        }]
    })
    .await;
    let got = resolver(s, 1000).resolve("php.test", 9000).await.unwrap();
    let want: Vec<SocketAddr> = vec![
        "10.0.0.1:9000".parse().unwrap(),
        "10.0.0.2:9000".parse().unwrap(),
    ];
    assert_eq!(got, want);
}

#[tokio::test]
async fn failures_are_errors() {
    let nx = server(|q, _| vec![reply(q, 3, &[])]).await;
    assert!(matches!(
        resolver(nx, 1000).resolve("gone.test", 1).await,
        Err(DnsError::NotFound)
    ));
    let empty = server(|q, _| vec![reply(q, 0, &[])]).await;
    assert!(matches!(
        resolver(empty, 1000).resolve("php.test", 1).await,
        Err(DnsError::NoAddresses)
    ));
    let servfail = server(|q, _| vec![reply(q, 2, &[])]).await;
    assert!(matches!(
        resolver(servfail, 1000).resolve("php.test", 1).await,
        Err(DnsError::Wire(_))
    ));
    let silent = server(|_, _| Vec::new()).await;
    let started = std::time::Instant::now();
    assert!(matches!(
        resolver(silent, 300).resolve("php.test", 1).await,
        Err(DnsError::Timeout(_))
    ));
    assert!(started.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn stray_and_spoofed_datagrams_are_ignored() {
    // First a reply with a wrong id, then one for another name with the right id,
    // then the real answer: only the last counts.
    let s = server(|q, qtype| {
        let mut wrong_id = reply(q, 0, &[[6, 6, 6, 6]]);
        wrong_id[0] ^= 0xFF;
        // `php` → `qhp` in the echoed question.
        let mut wrong_name = reply(q, 0, &[[6, 6, 6, 7]]);
        wrong_name[13] ^= 0x01;
        let real = match qtype {
            wire::TYPE_A => reply(q, 0, &[[10, 9, 9, 9]]),
            _ => reply(q, 0, &[]),
        };
        vec![wrong_id, vec![1, 2, 3], wrong_name, real]
    })
    .await;
    let got = resolver(s, 1000).resolve("php.test", 80).await.unwrap();
    assert_eq!(got, vec!["10.9.9.9:80".parse::<SocketAddr>().unwrap()]);
}

#[tokio::test]
async fn system_resolver_reads_hosts() {
    let r = Resolver::new(&DnsConfig {
        resolver: None,
        timeout: Duration::from_secs(2),
    });
    let got = r.resolve("localhost", 9000).await.unwrap();
    assert!(
        got.iter().all(|a| a.ip().is_loopback() && a.port() == 9000),
        "{got:?}"
    );
}

#[test]
fn expansion_keeps_order_weights_and_skips_unresolved() {
    let yaml = "listen: [{ bind: 127.0.0.1:8080 }]\npools:\n  app:\n    endpoints:\n      - { addr: 10.0.0.1:9000 }\n      - { addr: 'dns:a.test:9000', weight: 3, max_conns: 5 }\n      - { addr: 'dns:b.test:9000' }\nvhosts:\n  - { hosts: ['*'], root: /srv, pool: app }\n";
    let config = parse_str(yaml, Path::new("/tmp/f.yaml")).unwrap();
    let mut map = DnsMap::new();
    map.insert(
        ("a.test".into(), 9000),
        vec![
            "10.0.0.1:9000".parse().unwrap(),
            "10.0.0.7:9000".parse().unwrap(),
        ],
    );
    let eps = expand_endpoints(&config.pools[0], &map);
    let labels: Vec<String> = eps.iter().map(|e| e.addr.to_string()).collect();
    assert_eq!(labels, ["10.0.0.1:9000", "10.0.0.7:9000"]);
    assert_eq!((eps[1].weight, eps[1].max_conns), (3, 5));
    assert_eq!(
        eps[0].weight, 1,
        "the address listed by IP first keeps its own entry"
    );
    let names: Vec<String> = targets(&config).iter().map(|(t, _)| t.name()).collect();
    assert_eq!(names, ["a.test:9000", "b.test:9000"]);
}
