//! TLS and HTTP/2 termination with real certificates generated here: SNI picks the
//! certificate (exact, wildcard, default without SNI), ALPN negotiates h2, PHP sees
//! HTTPS=on, h2c with prior knowledge works on plaintext listeners, many concurrent
//! streams share one connection, and a certificate replaced on disk is served to new
//! handshakes without a restart.

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::Value;
use support::{client_builder, php_root, run_check, shared_fpm, Gate};

struct Cert {
    pem: String,
    key: String,
    der: Vec<u8>,
}

fn make_cert(names: &[&str]) -> Cert {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    Cert {
        pem: ck.cert.pem(),
        key: ck.signing_key.serialize_pem(),
        der: ck.cert.der().to_vec(),
    }
}

fn write(dir: &Path, name: &str, c: &Cert) {
    // Write then rename, as certificate renewal tools do.
    for (ext, text) in [("crt", &c.pem), ("key", &c.key)] {
        let tmp = dir.join(format!("{name}.{ext}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, dir.join(format!("{name}.{ext}"))).unwrap();
    }
}

fn tls_config(endpoint: &str) -> String {
    format!(
        r#"
listen:
  - bind: "127.0.0.1:0"
  - bind: "127.0.0.1:0"
    tls:
      - {{ cert: a.crt, key: a.key }}
      - {{ cert: b.crt, key: b.key }}
admin: {{ bind: "127.0.0.1:0" }}
pools:
  main:
    endpoints: [ {{ addr: "{endpoint}" }} ]
vhosts:
  - hosts: ["*"]
    root: {root}
    pool: main
    index: index.php
"#,
        root = php_root().display()
    )
}

/// Starts a gate whose temp dir holds the certificates before the config is read.
fn start_tls_gate(a: &Cert, b: &Cert) -> Gate {
    let dir = tempfile::tempdir().unwrap();
    // Gate::start writes the config into its own temp dir; certificates are referenced
    // relative to it, so write them with absolute paths into the config instead.
    write(dir.path(), "a", a);
    write(dir.path(), "b", b);
    let yaml = tls_config(&shared_fpm().endpoint())
        .replace("a.crt", &dir.path().join("a.crt").display().to_string())
        .replace("a.key", &dir.path().join("a.key").display().to_string())
        .replace("b.crt", &dir.path().join("b.crt").display().to_string())
        .replace("b.key", &dir.path().join("b.key").display().to_string());
    let g = Gate::start(&yaml);
    std::mem::forget(dir); // lives as long as the test process; the OS cleans /tmp
    g
}

/// Handshakes with the given SNI (None: connect by IP, so no SNI is sent) and returns the
/// leaf certificate the server presented and the ALPN protocol.
async fn handshake(addr: SocketAddr, sni: Option<&str>) -> (Vec<u8>, Option<Vec<u8>>) {
    #[derive(Debug)]
    struct AcceptAny;
    impl rustls::client::danger::ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _: &CertificateDer<'_>,
            _: &[CertificateDer<'_>],
            _: &ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            _: &[u8],
            _: &CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            rustls::crypto::aws_lc_rs::default_provider()
                .signature_verification_algorithms
                .supported_schemes()
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAny))
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = match sni {
        Some(n) => ServerName::try_from(n.to_string()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let (_, conn) = tls.get_ref();
    let leaf = conn.peer_certificates().unwrap()[0].to_vec();
    (leaf, conn.alpn_protocol().map(|p| p.to_vec()))
}

fn https_client(g: &Gate, roots: &[&Cert]) -> reqwest::Client {
    let https = g.https.unwrap();
    let certs = roots
        .iter()
        .map(|c| reqwest::Certificate::from_der(&c.der).unwrap());
    client_builder()
        .http2_adaptive_window(true)
        .tls_certs_only(certs)
        .resolve("a.test", https)
        .resolve("b.test", https)
        .resolve("x.wild.test", https)
        .build()
        .unwrap()
}

// reqwest's client builder prefers HTTP/1 in `client_builder`; ALPN still offers h2 when
// http1_only is not set, so build without it for the h2 cases.
fn h2_client(g: &Gate, roots: &[&Cert]) -> reqwest::Client {
    let https = g.https.unwrap();
    let certs = roots
        .iter()
        .map(|c| reqwest::Certificate::from_der(&c.der).unwrap());
    reqwest::Client::builder()
        .no_proxy()
        .tls_certs_only(certs)
        .resolve("a.test", https)
        .resolve("b.test", https)
        .timeout(Duration::from_secs(30))
        .build()
        .unwrap()
}

#[tokio::test]
async fn sni_picks_the_certificate_and_default_without_sni() {
    let a = make_cert(&["a.test"]);
    let b = make_cert(&["b.test", "*.wild.test"]);
    let g = start_tls_gate(&a, &b);
    let https = g.https.unwrap();
    assert_eq!(handshake(https, Some("a.test")).await.0, a.der);
    assert_eq!(handshake(https, Some("b.test")).await.0, b.der);
    assert_eq!(
        handshake(https, Some("x.wild.test")).await.0,
        b.der,
        "wildcard"
    );
    assert_eq!(
        handshake(https, Some("unknown.test")).await.0,
        a.der,
        "unknown name → first cert"
    );
    assert_eq!(handshake(https, None).await.0, a.der, "no SNI → first cert");
    assert_eq!(
        handshake(https, Some("a.test")).await.1.as_deref(),
        Some(&b"h2"[..])
    );
    // Real clients verifying the chain get through on both names.
    let c = https_client(&g, &[&a, &b]);
    for host in ["a.test", "b.test"] {
        let resp = c
            .get(format!("https://{host}:{}/server.php", https.port()))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{host}");
    }
}

#[tokio::test]
async fn h2_over_tls_reaches_php_with_https_params() {
    let a = make_cert(&["a.test"]);
    let b = make_cert(&["b.test"]);
    let g = start_tls_gate(&a, &b);
    let c = h2_client(&g, &[&a, &b]);
    let port = g.https.unwrap().port();
    let resp = c
        .get(format!("https://a.test:{port}/server.php/p?q=1"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["HTTPS"], "on");
    assert_eq!(v["REQUEST_SCHEME"], "https");
    assert_eq!(v["SERVER_PROTOCOL"], "HTTP/2.0");
    assert_eq!(v["SSL_PROTOCOL"], "TLSv1.3");
    assert_eq!(v["HTTP_HOST"], format!("a.test:{port}"));
    assert_eq!(v["SERVER_PORT"], port.to_string());
    assert_eq!(v["PATH_INFO"], "/p");

    // h2 bodies come without Content-Length; PHP still gets the right CONTENT_LENGTH, and an
    // empty POST still ends with an empty STDIN.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..5).map(|_| Ok(vec![b'z'; 777])).collect();
    let v: Value = c
        .post(format!("https://a.test:{port}/body.php"))
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["length"], 3885);
    assert_eq!(v["content_length"], "3885");
    let v: Value = c
        .post(format!("https://a.test:{port}/body.php"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["content_length"], "0");
    assert_eq!(v["length"], 0);
}

#[tokio::test]
async fn many_concurrent_h2_streams_on_one_connection() {
    let a = make_cert(&["a.test"]);
    let b = make_cert(&["b.test"]);
    let g = start_tls_gate(&a, &b);
    let c = h2_client(&g, &[&a, &b]);
    let port = g.https.unwrap().port();
    let mut tasks = Vec::new();
    for i in 0..300 {
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let resp = c
                .get(format!("https://a.test:{port}/server.php?i={i}"))
                .send()
                .await
                .unwrap();
            assert_eq!(resp.version(), reqwest::Version::HTTP_2);
            let v: Value = resp.json().await.unwrap();
            assert_eq!(v["QUERY_STRING"], format!("i={i}"));
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let m = g.metrics().await;
    let https_conns: f64 = m
        .lines()
        .filter(|l| l.starts_with("fpmgate_client_connections{listener=\"https\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        https_conns <= 1.0,
        "one h2 connection carried every stream: {https_conns}"
    );
}

#[tokio::test]
async fn h2c_prior_knowledge_on_plaintext() {
    let g = Gate::start(&tls_config(&shared_fpm().endpoint()).replace(
        "  - bind: \"127.0.0.1:0\"\n    tls:\n      - { cert: a.crt, key: a.key }\n      - { cert: b.crt, key: b.key }\n",
        "",
    ));
    let c = reqwest::Client::builder()
        .no_proxy()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let resp = c.get(g.url("/server.php")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let v: Value = resp.json().await.unwrap();
    assert_eq!(v["SERVER_PROTOCOL"], "HTTP/2.0");
    assert!(v.get("HTTPS").is_none());
}

#[tokio::test]
async fn replaced_certificate_is_served_to_new_handshakes() {
    let a = make_cert(&["a.test"]);
    let b = make_cert(&["b.test"]);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &a);
    write(dir.path(), "b", &b);
    let yaml = tls_config(&shared_fpm().endpoint())
        .replace("a.crt", &dir.path().join("a.crt").display().to_string())
        .replace("a.key", &dir.path().join("a.key").display().to_string());
    let yaml = yaml
        .replace("b.crt", &dir.path().join("b.crt").display().to_string())
        .replace("b.key", &dir.path().join("b.key").display().to_string());
    let g = Gate::start(&yaml);
    let https = g.https.unwrap();
    assert_eq!(handshake(https, Some("a.test")).await.0, a.der);

    // A broken replacement (key of another cert) is rejected: the old cert keeps serving.
    let broken = Cert {
        pem: make_cert(&["a.test"]).pem,
        key: b.key.clone(),
        der: vec![],
    };
    write(dir.path(), "a", &broken);
    assert!(
        g.wait_for_log("config reload rejected", Duration::from_secs(10)),
        "{:?}",
        g.logs()
    );
    assert_eq!(handshake(https, Some("a.test")).await.0, a.der);

    let renewed = make_cert(&["a.test"]);
    write(dir.path(), "a", &renewed);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if handshake(https, Some("a.test")).await.0 == renewed.der {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "renewed certificate not served: {:?}",
            g.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn check_reports_key_mismatch_and_missing_files() {
    let a = make_cert(&["a.test"]);
    let b = make_cert(&["b.test"]);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &a);
    write(
        dir.path(),
        "b",
        &Cert {
            pem: b.pem.clone(),
            key: a.key.clone(),
            der: vec![],
        },
    );
    let yaml = tls_config(&shared_fpm().endpoint())
        .replace("a.crt", &dir.path().join("a.crt").display().to_string())
        .replace("a.key", &dir.path().join("a.key").display().to_string())
        .replace("b.crt", &dir.path().join("b.crt").display().to_string())
        .replace("b.key", &dir.path().join("b.key").display().to_string());
    // A mistake elsewhere in the file is reported with the certificate's, each at its line.
    let yaml = yaml.replace("    pool: main\n", "    pool: nope\n");
    let (code, _out, err) = run_check(&yaml);
    assert_eq!(code, 1, "{err}");
    let line_of = |needle: &str| yaml[..yaml.find(needle).unwrap()].matches('\n').count() + 1;
    let cert_line = format!("fpmgate.yaml:{}:", line_of("b.crt"));
    let pool_line = format!("fpmgate.yaml:{}:", line_of("pool: nope"));
    assert!(
        err.lines().any(|l| l.contains(&cert_line)
            && l.contains("listen[1].tls[1]")
            && l.contains("do not match")),
        "{err}"
    );
    assert!(
        err.lines()
            .any(|l| l.contains(&pool_line) && l.contains("nope")),
        "{err}"
    );
    assert!(err.contains("2 errors"), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_served_with_a_warning_and_its_expiry_exported() {
    // Expired on 2021-01-01: a hard error would take every other name down with it, at
    // the next reload or restart.
    let mut params = rcgen::CertificateParams::new(vec!["old.test".to_string()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2020, 1, 1);
    params.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let old = Cert {
        pem: cert.pem(),
        key: key.serialize_pem(),
        der: cert.der().to_vec(),
    };
    let b = make_cert(&["b.test"]);
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", &old);
    write(dir.path(), "b", &b);
    let yaml = tls_config(&shared_fpm().endpoint())
        .replace("a.crt", &dir.path().join("a.crt").display().to_string())
        .replace("a.key", &dir.path().join("a.key").display().to_string())
        .replace("b.crt", &dir.path().join("b.crt").display().to_string())
        .replace("b.key", &dir.path().join("b.key").display().to_string());
    let (code, out, err) = run_check(&yaml);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok:"), "{out}");
    assert!(
        err.contains("warning:") && err.contains("a.crt") && err.contains("EXPIRED"),
        "{err}"
    );

    let g = Gate::start(&yaml);
    assert!(g.wait_for_log("serving it anyway", Duration::from_secs(5)));
    let https = g.https.unwrap();
    assert_eq!(handshake(https, Some("old.test")).await.0, old.der);
    assert_eq!(handshake(https, Some("b.test")).await.0, b.der);
    let metrics = g.metrics().await;
    let expiry = |file: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("fpmgate_tls_certificate_expiry_timestamp_seconds{")
                    && l.contains(&format!("{file}\""))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
    };
    assert_eq!(expiry("a.crt"), Some(1_609_459_200.0), "{metrics}");
    assert!(
        expiry("b.crt").is_some_and(|t| t > 1_609_459_200.0),
        "{metrics}"
    );
}
