//! Config loading end to end: the spec's example, defaults, error output format, and the
//! shared fixtures the error tests use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::*;

/// A scratch directory removed on drop; configs are "loaded" from `dir/fpmgate.yaml` so
/// relative paths resolve inside it.
pub(super) struct Scratch {
    pub dir: PathBuf,
}

impl Scratch {
    pub fn new() -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("fpmgate-config-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch { dir }
    }

    /// Creates `rel` (and its parents) with some content.
    pub fn file(&self, rel: &str) -> PathBuf {
        let p = self.dir.join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, "-----BEGIN TEST-----\n").expect("write");
        p
    }

    pub fn mkdir(&self, rel: &str) -> PathBuf {
        let p = self.dir.join(rel);
        std::fs::create_dir_all(&p).expect("mkdir");
        p
    }

    pub fn parse(&self, yaml: &str) -> Result<Config, Vec<ConfigError>> {
        parse_str(yaml, &self.dir.join("fpmgate.yaml"))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Parses a config expected to be valid.
pub(super) fn ok(yaml: &str) -> Config {
    let s = Scratch::new();
    match s.parse(yaml) {
        Ok(c) => c,
        Err(e) => panic!(
            "expected a valid config, got:\n{}",
            format_errors(Path::new("t.yaml"), &e)
        ),
    }
}

/// Parses a config expected to be invalid.
pub(super) fn errors(yaml: &str) -> Vec<ConfigError> {
    Scratch::new().parse(yaml).expect_err("expected errors")
}

/// 1-based line of the first occurrence of `needle` in `yaml`.
pub(super) fn line_of(yaml: &str, needle: &str) -> usize {
    let at = yaml
        .find(needle)
        .unwrap_or_else(|| panic!("`{needle}` not in test yaml"));
    yaml[..at].matches('\n').count() + 1
}

/// Asserts that some error has exactly `path`, sits on the line where `needle` is, and
/// mentions `words`.
#[track_caller]
pub(super) fn assert_error(
    errs: &[ConfigError],
    yaml: &str,
    path: &str,
    needle: &str,
    words: &str,
) {
    let line = line_of(yaml, needle);
    let found = errs.iter().any(|e| {
        e.path == path && e.location.map(|l| l.0) == Some(line) && e.message.contains(words)
    });
    assert!(
        found,
        "no error at {path} line {line} mentioning {words:?}; got:\n{}",
        format_errors(Path::new("t.yaml"), errs)
    );
}

/// MINIMAL with `extra` inserted as pool keys (indented 4) before `endpoints:`.
pub(super) fn with_pool_keys(extra: &str) -> String {
    MINIMAL.replace("    endpoints:", &format!("{extra}    endpoints:"))
}

/// A valid minimal config the error tests start from.
pub(super) const MINIMAL: &str = "\
listen:
  - bind: 127.0.0.1:8080
pools:
  app:
    endpoints:
      - { addr: 127.0.0.1:9000 }
vhosts:
  - hosts: [\"*\"]
    root: /var/www/html
    pool: app
";

pub(super) const SPEC_EXAMPLE: &str = r#"
listen:
  - bind: 0.0.0.0:8080                 # plain HTTP/1.1 (+ h2c with prior knowledge)
  - bind: 0.0.0.0:8443
    tls:                               # rustls; ALPN h2 + http/1.1; SNI picks the cert
      - { cert: certs/a.crt, key: certs/a.key }
      - { cert: certs/b.crt, key: certs/b.key }
admin:
  bind: 127.0.0.1:9180                 # GET /metrics /healthz /readyz /status

pools:
  php82:
    endpoints:
      - { addr: 10.0.1.11:9000, weight: 3, max_conns: 16 }
      - { addr: unix:/run/php/php8.2-fpm.sock }
    balance: least_conn                # round_robin | least_conn | p2c | hash_client_ip | hash_cookie:NAME
    keepalive: { max_idle: 4, idle_timeout: 5s }    # idle conns pin FPM workers: they count against max_conns
    timeouts: { connect: 1s, read: 60s, send: 60s }
    queue: { size: 512, timeout: 5s }  # every endpoint at max_conns → wait here; full/expired → 503
    retries: 1                         # only where FPM cannot have run the script (see Errors)
    health:
      ping: /ping                      # FastCGI request to FPM's ping.path, expects ping.response "pong"
      addr_port: 9001                  # optional (TCP endpoints): ping FPM's pm.status_listen port instead
      interval: 2s
      timeout: 1s
      rise: 2
      fall: 3
      passive: { fails: 3, window: 10s, eject: 30s }
    status: /fpm-status                # optional: scrape FPM's pm.status_path (?json) into metrics
    params: { APP_ENV: production }    # extra FastCGI params
  php74:                               # a second PHP version: every key but endpoints has a default
    endpoints:
      - { addr: 10.0.2.21:9000 }
      - { addr: 10.0.2.22:9000 }
vhosts:
  - hosts: [shop.example.com, "*.shop.example.com"]
    root: /var/www/shop/public         # document root as seen by the FPM nodes
    pool: php82
    index: index.php                   # front controller for paths that are not .php
    static: www/shop/public            # optional: existing files here are served directly
    routes:                            # optional, first match wins
      - { path: /legacy/, pool: php74 }
      - { regex: '^/api/v1/', pool: php74 }
  - hosts: ["*"]                       # default vhost
    root: /var/www/default
    pool: php82
limits:
  max_body: 100MiB                     # → 413
  body_buffer: 1MiB                    # request bodies past this spill to a temp file
  max_header_bytes: 64KiB              # client request headers → 431
  max_response_header: 64KiB           # FPM response headers → 502 cause header_too_big
  header_timeout: 10s                  # slowloris guard
  idle_timeout: 60s
  max_connections: 10000
shutdown_grace: 30s
workers: 2                             # runtime worker threads; default: the number of CPU cores
"#;

fn addr(s: &str) -> SocketAddr {
    s.parse().expect("test address")
}

#[test]
fn spec_example_compiles() {
    let s = Scratch::new();
    for f in ["certs/a.crt", "certs/a.key", "certs/b.crt", "certs/b.key"] {
        s.file(f);
    }
    let public = s.mkdir("www/shop/public");
    let c = match s.parse(SPEC_EXAMPLE) {
        Ok(c) => c,
        Err(e) => panic!("{}", format_errors(Path::new("spec.yaml"), &e)),
    };
    assert_eq!(
        c.summary(),
        "ok: 2 listeners, 2 pools (4 endpoints), 2 vhosts"
    );
    assert_eq!(c.listeners[0].bind, addr("0.0.0.0:8080"));
    assert!(c.listeners[0].tls.is_empty());
    let tls = &c.listeners[1].tls;
    assert_eq!(tls.len(), 2);
    assert!(tls[0].cert.is_absolute() && tls[0].cert.ends_with("certs/a.crt"));
    assert!(tls[1].key.ends_with("certs/b.key"));
    assert_eq!(
        c.admin.as_ref().map(|a| a.bind),
        Some(addr("127.0.0.1:9180"))
    );

    let names: Vec<&str> = c.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["php82", "php74"], "pools keep file order");
    let php82 = &c.pools[0];
    assert_eq!(php82.endpoints[0].addr.to_string(), "10.0.1.11:9000");
    assert_eq!(
        (php82.endpoints[0].weight, php82.endpoints[0].max_conns),
        (3, 16)
    );
    assert_eq!(
        php82.endpoints[1].addr,
        EndpointAddr::Unix("/run/php/php8.2-fpm.sock".into())
    );
    assert_eq!(
        php82.endpoints[1].addr.to_string(),
        "unix:/run/php/php8.2-fpm.sock"
    );
    assert_eq!(php82.balance, BalancePolicy::LeastConn);
    let health = php82.health.as_ref().expect("health");
    assert_eq!(
        (health.ping.as_str(), health.expect.as_str()),
        ("/ping", "pong")
    );
    assert_eq!(
        (health.rise, health.fall, health.addr_port),
        (2, 3, Some(9001))
    );
    assert_eq!(php82.passive.eject, Duration::from_secs(30));
    assert_eq!(php82.status.as_deref(), Some("/fpm-status"));
    assert_eq!(
        php82.params,
        [("APP_ENV".to_string(), "production".to_string())]
    );
    assert!(c.pools[1].health.is_none());

    let shop = &c.vhosts[0];
    assert_eq!(shop.hosts, ["shop.example.com", "*.shop.example.com"]);
    assert_eq!(shop.static_dir.as_deref(), Some(public.as_path()));
    assert_eq!(shop.index.as_deref(), Some("index.php"));
    assert!(matches!(&shop.routes[0].matcher, RouteMatch::Prefix(p) if p == "/legacy/"));
    assert!(matches!(&shop.routes[1].matcher, RouteMatch::Regex(r) if r.is_match("/api/v1/x")));
    assert_eq!(shop.routes[1].pool, "php74");
    assert_eq!(c.vhosts[1].hosts, ["*"]);
    assert_eq!(c.limits.max_body, 100 << 20);
    assert_eq!(c.workers, Some(2));
}

#[test]
fn minimal_config_gets_every_default() {
    let c = ok(MINIMAL);
    assert_eq!(c.summary(), "ok: 1 listener, 1 pool (1 endpoint), 1 vhost");
    assert!(c.admin.is_none());
    assert_eq!(c.shutdown_grace, Duration::from_secs(30));
    assert_eq!(c.workers, None);
    let p = &c.pools[0];
    assert_eq!((p.endpoints[0].weight, p.endpoints[0].max_conns), (1, 16));
    assert_eq!(p.balance, BalancePolicy::LeastConn);
    assert_eq!(
        (p.keepalive.max_idle, p.keepalive.idle_timeout),
        (4, Duration::from_secs(5))
    );
    let t = &p.timeouts;
    assert_eq!(
        (t.connect, t.read, t.send),
        (
            Duration::from_secs(3),
            Duration::from_secs(60),
            Duration::from_secs(60)
        )
    );
    assert_eq!(
        (p.queue.size, p.queue.timeout),
        (512, Duration::from_secs(5))
    );
    assert_eq!((p.retries, p.retry_after), (1, 1));
    assert!(
        p.health.is_none(),
        "no active checks unless `health:` is present"
    );
    let pa = &p.passive;
    assert_eq!(
        (pa.fails, pa.window, pa.eject),
        (3, Duration::from_secs(10), Duration::from_secs(30))
    );
    assert!(p.status.is_none() && p.params.is_empty());
    let v = &c.vhosts[0];
    assert_eq!((v.root.as_str(), v.pool.as_str()), ("/var/www/html", "app"));
    assert!(v.index.is_none() && v.static_dir.is_none() && v.routes.is_empty());
    let l = &c.limits;
    assert_eq!(
        (l.max_body, l.body_buffer, l.body_memory),
        (100 << 20, 1 << 20, 256 << 20)
    );
    assert_eq!(
        (l.max_header_bytes, l.max_response_header, l.max_uri),
        (64 << 10, 64 << 10, 8 << 10)
    );
    assert_eq!(l.header_timeout, Duration::from_secs(10));
    assert_eq!(
        (l.idle_timeout, l.body_timeout, l.send_timeout),
        (
            Duration::from_secs(60),
            Duration::from_secs(60),
            Duration::from_secs(60)
        )
    );
    assert_eq!(l.max_connections, 10_000);
}

#[test]
fn health_present_gets_its_defaults_and_small_pools_a_smaller_keepalive() {
    let yaml = MINIMAL
        .replace(
            "{ addr: 127.0.0.1:9000 }",
            "{ addr: 127.0.0.1:9000, max_conns: 2 }",
        )
        .replace("    endpoints:", "    health: {}\n    endpoints:");
    let c = ok(&yaml);
    let p = &c.pools[0];
    assert_eq!(p.keepalive.max_idle, 2, "min(4, smallest max_conns)");
    let h = p.health.as_ref().expect("health: {} turns checks on");
    assert_eq!((h.ping.as_str(), h.expect.as_str()), ("/ping", "pong"));
    assert_eq!(
        (h.interval, h.timeout),
        (Duration::from_secs(2), Duration::from_secs(1))
    );
    assert_eq!((h.rise, h.fall), (2, 3));
}

#[test]
fn addresses_and_paths() {
    let s = Scratch::new();
    let yaml = MINIMAL.replace("127.0.0.1:8080", "localhost:8080").replace(
        "      - { addr: 127.0.0.1:9000 }",
        "      - { addr: 'localhost:9000' }\n      - { addr: '[::1]:9000' }\n      - { addr: unix:run/fpm.sock }",
    );
    let c = s.parse(&yaml).expect("valid");
    assert_eq!(c.listeners[0].bind, addr("127.0.0.1:8080"));
    let eps: Vec<String> = c.pools[0]
        .endpoints
        .iter()
        .map(|e| e.addr.to_string())
        .collect();
    let sock = std::path::absolute(s.dir.join("run/fpm.sock")).expect("abs");
    assert_eq!(
        eps,
        [
            "127.0.0.1:9000".to_string(),
            "[::1]:9000".into(),
            format!("unix:{}", sock.display())
        ]
    );
}

#[test]
fn queue_size_zero_rise_zero_and_other_policies_are_accepted() {
    let yaml = MINIMAL.replace(
        "    endpoints:",
        "    queue: { size: 0 }\n    balance: hash_cookie:PHPSESSID\n    health: { rise: 0 }\n    endpoints:",
    );
    let c = ok(&yaml);
    let p = &c.pools[0];
    assert_eq!(p.queue.size, 0);
    assert_eq!(p.balance, BalancePolicy::HashCookie("PHPSESSID".into()));
    assert_eq!(p.health.as_ref().map(|h| h.rise), Some(0));
    for (word, policy) in [
        ("round_robin", BalancePolicy::RoundRobin),
        ("p2c", BalancePolicy::P2c),
        ("hash_client_ip", BalancePolicy::HashClientIp),
    ] {
        let c = ok(&MINIMAL.replace(
            "    endpoints:",
            &format!("    balance: {word}\n    endpoints:"),
        ));
        assert_eq!(c.pools[0].balance, policy);
    }
}

#[test]
fn root_and_hosts_are_normalised() {
    let yaml = MINIMAL
        .replace("[\"*\"]", "[Shop.Example.COM, \"*.Example.com\"]")
        .replace("/var/www/html", "/srv/app/");
    let c = ok(&yaml);
    assert_eq!(c.vhosts[0].hosts, ["shop.example.com", "*.example.com"]);
    assert_eq!(c.vhosts[0].root, "/srv/app");
    assert_eq!(
        ok(&MINIMAL.replace("/var/www/html", "/")).vhosts[0].root,
        "/"
    );
}

#[test]
fn format_errors_prints_file_line_col_path_and_count() {
    let errs = vec![
        ConfigError::new("vhosts[0].pool", "undefined pool `x`").at(Some((12, 11))),
        ConfigError::new("", "cannot read it"),
    ];
    let out = format_errors(Path::new("/etc/fpmgate.yaml"), &errs);
    assert_eq!(
        out,
        "/etc/fpmgate.yaml:12:11: vhosts[0].pool: undefined pool `x`\n/etc/fpmgate.yaml: cannot read it\n2 errors\n"
    );
    assert!(format_errors(Path::new("f"), &errs[..1]).ends_with("\n1 error\n"));
    let evil = ConfigError::new("a", "bad\nline\u{1b}[31m");
    assert_eq!(evil.to_string(), "a: bad\\nline\\u{1b}[31m");
}

#[test]
fn load_reads_files_and_reports_unreadable_ones() {
    let s = Scratch::new();
    let path = s.dir.join("fpmgate.yaml");
    std::fs::write(&path, MINIMAL).expect("write");
    let c = load(&path).expect("valid");
    assert_eq!(c.path, path);
    let missing = load(&s.dir.join("nope.yaml")).expect_err("missing file");
    assert_eq!(missing.len(), 1);
    assert!(
        missing[0].message.contains("cannot read"),
        "{:?}",
        missing[0]
    );
}
