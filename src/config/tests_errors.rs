//! Semantic config errors, one test per class: each is reported with its YAML path and
//! the line it sits on.

use std::path::Path;

use super::tests::{assert_error, errors, ok, with_pool_keys, Scratch, MINIMAL};
use super::*;

#[test]
fn bad_durations_and_sizes() {
    let yaml = with_pool_keys("    keepalive: { idle_timeout: 5 }\n    queue: { timeout: 1M }\n")
        + "limits:\n  max_body: 100M\n  body_buffer: 100MB\n  body_memory: 0MiB\n  max_uri: 8KiB\n  header_timeout: 0s\nshutdown_grace: soon\n";
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 7, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        &yaml,
        "pools.app.keepalive.idle_timeout",
        "idle_timeout: 5",
        "no unit",
    );
    assert_error(&errs, &yaml, "pools.app.queue.timeout", "1M", "months");
    assert_error(
        &errs,
        &yaml,
        "limits.max_body",
        "100M",
        "use KiB/MiB/GiB (binary units)",
    );
    assert_error(
        &errs,
        &yaml,
        "limits.body_buffer",
        "100MB",
        "use KiB/MiB/GiB (binary units)",
    );
    assert_error(
        &errs,
        &yaml,
        "limits.body_memory",
        "0MiB",
        "greater than zero",
    );
    assert_error(
        &errs,
        &yaml,
        "limits.header_timeout",
        "0s",
        "greater than zero",
    );
    assert_error(&errs, &yaml, "shutdown_grace", "soon", "invalid duration");
}

#[test]
fn undefined_pools_in_vhosts_and_routes() {
    let yaml = MINIMAL.replace(
        "    pool: app\n",
        "    pool: nope\n    routes:\n      - { path: /a/, pool: gone }\n",
    );
    let errs = errors(&yaml);
    assert_error(
        &errs,
        &yaml,
        "vhosts[0].pool",
        "nope",
        "undefined pool `nope` (defined: app)",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[0].routes[0].pool",
        "gone",
        "undefined pool `gone`",
    );
}

#[test]
fn duplicate_hosts_across_vhosts() {
    let yaml = MINIMAL.to_string()
        + "  - hosts: [a.example, \"*\"]\n    root: /x\n    pool: app\n  - hosts: [A.Example]\n    root: /y\n    pool: app\n";
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 2, "{errs:?}");
    assert_error(
        &errs,
        &yaml,
        "vhosts[1].hosts[1]",
        "a.example, \"*\"",
        "`*` is already used by vhosts[0].hosts[0]",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[2].hosts[0]",
        "A.Example",
        "already used by vhosts[1].hosts[0]",
    );
}

#[test]
fn bad_endpoint_addresses() {
    let yaml = MINIMAL.replace(
        "      - { addr: 127.0.0.1:9000 }\n",
        "      - { addr: fpm.internal:9000 }\n      - { addr: 'dns:fpm' }\n      - { addr: 10.0.0.1 }\n      - { addr: 'unix:' }\n      - { addr: 127.0.0.1:0 }\n      - {}\n",
    );
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 6, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[0].addr",
        "fpm.internal",
        "use an IP address",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[0].addr",
        "fpm.internal",
        "dns:NAME:PORT",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[1].addr",
        "dns:fpm",
        "needs a port",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[2].addr",
        "10.0.0.1 }",
        "no port",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[3].addr",
        "'unix:'",
        "socket path",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[4].addr",
        "127.0.0.1:0",
        "cannot be connected",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[5].addr",
        "{}",
        "missing required key `addr`",
    );
}

#[test]
fn bad_regex_and_route_shapes() {
    let yaml = MINIMAL.to_string()
        + "    routes:\n      - { regex: '^/api/(', pool: app }\n      - { path: api, pool: app }\n      - { path: /a, regex: b, pool: app }\n";
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 3, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        &yaml,
        "vhosts[0].routes[0].regex",
        "^/api/(",
        "invalid regex",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[0].routes[1].path",
        "path: api",
        "must start with `/`",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[0].routes[2]",
        "path: /a, regex",
        "exactly one of",
    );
    assert!(!errs[0].message.contains('\n'));
}

#[test]
fn balance_policies() {
    for (value, words) in [
        ("fastest", "unknown balance policy `fastest`"),
        ("'hash_cookie:'", "needs a cookie name"),
        ("hash_cookie", "needs a cookie name"),
        ("'hash_cookie:a;b'", "invalid cookie name"),
    ] {
        let yaml = with_pool_keys(&format!("    balance: {value}\n"));
        let errs = errors(&yaml);
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_error(&errs, &yaml, "pools.app.balance", "balance:", words);
    }
}

#[test]
fn endpoint_capacity_rules() {
    let yaml = MINIMAL.replace(
        "      - { addr: 127.0.0.1:9000 }\n",
        "      - { addr: 127.0.0.1:9000, weight: 0 }\n      - { addr: 127.0.0.1:9001, max_conns: 0 }\n      - { addr: 127.0.0.1:9002, max_conns: 2 }\n      - { addr: '127.0.0.1:9000' }\n      - { addr: 127.0.0.1:9003, max_conns: 18446744073709551615 }\n",
    ) .replace("    endpoints:", "    keepalive: { max_idle: 3 }\n    endpoints:");
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 5, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[4].max_conns",
        "max_conns: 18446744073709551615",
        "at most 65535",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[0].weight",
        "weight: 0",
        "at least 1",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[1].max_conns",
        "max_conns: 0",
        "at least 1",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.keepalive.max_idle",
        "max_idle",
        "exceeds max_conns 2 of endpoint `127.0.0.1:9002`",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.endpoints[3].addr",
        "'127.0.0.1:9000'",
        "duplicate endpoint `127.0.0.1:9000` (also endpoints[0])",
    );
    let empty = with_pool_keys("").replace(
        "    endpoints:\n      - { addr: 127.0.0.1:9000 }\n",
        "    endpoints: []\n",
    );
    assert_error(
        &errors(&empty),
        &empty,
        "pools.app.endpoints",
        "endpoints: []",
        "at least one endpoint",
    );
}

#[test]
fn health_and_timeout_rules() {
    let yaml = with_pool_keys(
        "    timeouts: { connect: 0s, read: 0ms }\n    health: { rise: 0, fall: 0, ping: ping, interval: 0s }\n",
    );
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 5, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        &yaml,
        "pools.app.timeouts.connect",
        "connect",
        "greater than zero",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.timeouts.read",
        "read",
        "greater than zero",
    );
    assert_error(&errs, &yaml, "pools.app.health.fall", "fall", "at least 1");
    assert_error(
        &errs,
        &yaml,
        "pools.app.health.ping",
        "ping: ping",
        "starting with `/`",
    );
    assert_error(
        &errs,
        &yaml,
        "pools.app.health.interval",
        "interval",
        "greater than zero",
    );
    let unix = MINIMAL
        .replace("127.0.0.1:9000 }", "'unix:/run/fpm.sock' }")
        .replace(
            "    endpoints:",
            "    health: { addr_port: 9001 }\n    endpoints:",
        );
    assert_error(
        &errors(&unix),
        &unix,
        "pools.app.health.addr_port",
        "addr_port",
        "TCP endpoints only",
    );
    // Beside a TCP endpoint it applies to that one; the unix one is pinged on its socket
    // (the spec's own example).
    let mixed = MINIMAL.replace(
        "127.0.0.1:9000 }",
        "127.0.0.1:9000 }\n      - { addr: 'unix:/run/fpm.sock' }",
    );
    let mixed = mixed.replace(
        "    endpoints:",
        "    health: { addr_port: 9001 }\n    endpoints:",
    );
    let c = Scratch::new()
        .parse(&mixed)
        .expect("addr_port beside a TCP endpoint");
    assert_eq!(
        c.pools[0].health.as_ref().and_then(|h| h.addr_port),
        Some(9001)
    );
}

#[test]
fn vhost_root_index_and_static() {
    let s = Scratch::new();
    let file = s.file("not-a-dir");
    let yaml = MINIMAL.replace("/var/www/html", "var/www").replace(
        "    pool: app\n",
        &format!(
            "    pool: app\n    index: public/index.php\n    static: missing\n  - hosts: [b]\n    root: /b\n    pool: app\n    index: index.html\n    static: {}\n",
            file.display()
        ),
    );
    let yaml = yaml
        + "  - hosts: [c]\n    root: /c\n    pool: app\n    follow_symlinks: true\n"
        + "    static_deny: [\"*.bak\", \"logs/*.log\", \"**\"]\n";
    let errs = s.parse(&yaml).expect_err("invalid");
    assert_eq!(errs.len(), 9, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        &yaml,
        "vhosts[2].static_deny",
        "\"*.bak\"",
        "`static`, which is not set",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[2].static_deny[1]",
        "\"logs/*.log\"",
        "without `/`",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[2].static_deny[2]",
        "\"**\"",
        "must name something",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[2].follow_symlinks",
        "follow_symlinks: true",
        "`static`, which is not set",
    );
    assert_error(&errs, &yaml, "vhosts[0].root", "var/www", "absolute path");
    assert_error(
        &errs,
        &yaml,
        "vhosts[0].index",
        "public/index.php",
        "ending in `.php`",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[0].static",
        "missing",
        "does not exist",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[1].index",
        "index.html",
        "ending in `.php`",
    );
    assert_error(
        &errs,
        &yaml,
        "vhosts[1].static",
        "not-a-dir",
        "is not a directory",
    );
}

#[test]
fn listeners_tls_and_binds() {
    let s = Scratch::new();
    s.file("certs/a.crt");
    let yaml = "\
listen:
  - bind: 0.0.0.0:8443
    tls:
      - { cert: certs/a.crt, key: certs/a.key }
  - bind: 127.0.0.1:8443
  - bind: example.com:80
admin:
  bind: 0.0.0.0:8443
pools:
  app:
    endpoints:
      - { addr: 127.0.0.1:9000 }
vhosts:
  - hosts: [\"*\"]
    root: /var/www/html
    pool: app
";
    let errs = s.parse(yaml).expect_err("invalid");
    assert_eq!(errs.len(), 4, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        yaml,
        "listen[0].tls[0].key",
        "certs/a.key",
        "cannot read key file",
    );
    assert_error(
        &errs,
        yaml,
        "listen[1].bind",
        "127.0.0.1:8443",
        "already bound by listen[0].bind",
    );
    assert_error(
        &errs,
        yaml,
        "listen[2].bind",
        "example.com",
        "not an IP address",
    );
    assert_error(
        &errs,
        yaml,
        "admin.bind",
        "bind: 0.0.0.0:8443\npools",
        "already bound by listen[0].bind",
    );
}

#[test]
fn bind_conflicts_name_the_right_listener_and_admin_token() {
    let yaml = MINIMAL.replace(
        "  - bind: 127.0.0.1:8080\n",
        "  - bind: nonsense\n  - bind: 127.0.0.1:8080\n  - bind: '127.0.0.1:8080'\n",
    ) + "admin: { bind: 127.0.0.1:9180, token: '' }\n";
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 3, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        &yaml,
        "listen[0].bind",
        "nonsense",
        "invalid address",
    );
    assert_error(
        &errs,
        &yaml,
        "listen[2].bind",
        "'127.0.0.1:8080'",
        "already bound by listen[1].bind",
    );
    assert_error(&errs, &yaml, "admin.token", "token", "must not be empty");
}

#[test]
fn real_ip_header_names_one_of_two_headers() {
    assert_eq!(ok(MINIMAL).real_ip_header, RealIpHeader::XForwardedFor);
    let real = format!("{MINIMAL}trusted_proxies: [10.0.0.0/8]\nreal_ip_header: X-Real-IP\n");
    assert_eq!(ok(&real).real_ip_header, RealIpHeader::XRealIp);
    let yaml = format!("{MINIMAL}real_ip_header: cf-connecting-ip\n");
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 1, "{}", format_errors(Path::new("t"), &errs));
    assert_error(
        &errs,
        &yaml,
        "real_ip_header",
        "cf-connecting-ip",
        "expected x-forwarded-for or x-real-ip",
    );
}

#[test]
fn max_header_bytes_is_at_least_the_http1_head_buffer() {
    let yaml = format!("{MINIMAL}limits: {{ max_header_bytes: 4KiB }}\n");
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 1);
    assert_error(
        &errs,
        &yaml,
        "limits.max_header_bytes",
        "4KiB",
        "at least 8KiB",
    );
}

#[test]
fn address_lists_name_each_bad_entry() {
    let c = ok(&format!(
        "{MINIMAL}proxy_protocol_from: [10.0.0.0/8, \"::1\"]\n"
    ));
    assert_eq!(c.proxy_protocol_from.len(), 2);
    assert!(c.trusted_proxies.is_empty() && ok(MINIMAL).proxy_protocol_from.is_empty());
    let yaml =
        format!("{MINIMAL}trusted_proxies: [10.0.0.0/33]\nproxy_protocol_from: [lb.internal]\n");
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 2, "{}", format_errors(Path::new("t"), &errs));
    assert_error(&errs, &yaml, "trusted_proxies[0]", "10.0.0.0/33", "");
    assert_error(&errs, &yaml, "proxy_protocol_from[0]", "lb.internal", "");
    let errs = errors(&format!("{MINIMAL}proxy_protocol_from: []\n"));
    assert_eq!(errs.len(), 1);
    assert!(errs[0].message.contains("ambiguous"), "{}", errs[0].message);
}

#[test]
fn server_name_is_one_host_name() {
    let with = |name: &str| {
        MINIMAL.replace(
            "    pool: app\n",
            &format!("    pool: app\n    server_name: {name}\n"),
        )
    };
    let c = ok(&with("Shop.Example.com"));
    assert_eq!(c.vhosts[0].server_name.as_deref(), Some("shop.example.com"));
    assert_eq!(ok(MINIMAL).vhosts[0].server_name, None);
    for bad in ["'*.example.com'", "'a b'", "a/b"] {
        let yaml = with(bad);
        let errs = errors(&yaml);
        assert_eq!(errs.len(), 1, "{}", format_errors(Path::new("t"), &errs));
        let shown = bad.trim_matches('\'');
        assert_error(
            &errs,
            &yaml,
            "vhosts[0].server_name",
            shown,
            "one host name",
        );
    }
}
