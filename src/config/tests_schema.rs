//! Schema-level errors (YAML syntax, unknown keys, wrong types, resource limits) and the
//! guarantee that all errors of a file are reported together, each with path and line.

use std::path::Path;

use super::tests::{assert_error, errors, with_pool_keys, Scratch, MINIMAL, SPEC_EXAMPLE};
use super::*;

#[test]
fn three_mistakes_give_exactly_three_errors() {
    let yaml = "\
listen:
  - bind: 127.0.0.1:8080
pools:
  app:
    endpoints:
      - { addr: 127.0.0.1:9000 }
    timeouts: { read: 5x }
vhosts:
  - hosts: [\"*\"]
    rot: /var/www
    root: /var/www/html
    pool: ap
";
    let errs = errors(yaml);
    let out = format_errors(Path::new("fpmgate.yaml"), &errs);
    assert_eq!(errs.len(), 3, "{out}");
    assert_error(
        &errs,
        yaml,
        "pools.app.timeouts.read",
        "5x",
        "invalid duration",
    );
    assert_error(&errs, yaml, "vhosts[0].rot", "rot:", "unknown field `rot`");
    assert_error(
        &errs,
        yaml,
        "vhosts[0].pool",
        "pool: ap",
        "undefined pool `ap`",
    );
    assert!(
        out.starts_with("fpmgate.yaml:7:23: pools.app.timeouts.read: "),
        "{out}"
    );
    assert!(out.ends_with("\n3 errors\n"), "{out}");
}

#[test]
fn unknown_keys_everywhere_are_all_reported() {
    let yaml = "\
listen:
  - bind: 127.0.0.1:8080
    tsl: []
pools:
  php82:
    endpoints:
      - { addr: 127.0.0.1:9000, wieght: 2 }
    keepalive:
      max_idel: 4
    health:
      passive: { fails: 3, windw: 10s }
vhosts:
  - hosts: [\"*\"]
    root: /var/www/html
    pool: php82
limit: {}
";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 5, "{}", format_errors(Path::new("t"), &errs));
    assert_error(&errs, yaml, "listen[0].tsl", "tsl", "unknown field `tsl`");
    assert_error(
        &errs,
        yaml,
        "pools.php82.endpoints[0].wieght",
        "wieght",
        "unknown field",
    );
    assert_error(
        &errs,
        yaml,
        "pools.php82.keepalive.max_idel",
        "max_idel",
        "expected one of",
    );
    assert_error(
        &errs,
        yaml,
        "pools.php82.health.passive.windw",
        "windw",
        "unknown field",
    );
    assert_error(&errs, yaml, "limit", "limit:", "unknown field `limit`");
}

#[test]
fn type_errors_are_reported_alongside_semantic_ones() {
    let yaml = with_pool_keys("    retries: many\n    queue: { size: -1 }\n") + "workers: 0\n";
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 3, "{}", format_errors(Path::new("t"), &errs));
    assert_error(&errs, &yaml, "pools.app.retries", "many", "whole number");
    assert_error(&errs, &yaml, "pools.app.queue.size", "-1", "whole number");
    assert_error(&errs, &yaml, "workers", "workers", "at least 1");
}

#[test]
fn missing_required_keys_point_at_their_mapping() {
    let yaml = "\
listen:
  - tls: []
pools:
  app: {}
vhosts:
  - hosts: [\"*\"]
    pool: app
";
    let errs = errors(yaml);
    assert_error(
        &errs,
        yaml,
        "listen[0].bind",
        "tls",
        "missing required key `bind`",
    );
    assert_error(
        &errs,
        yaml,
        "pools.app.endpoints",
        "app: {}",
        "at least one endpoint",
    );
    assert_error(
        &errs,
        yaml,
        "vhosts[0].root",
        "- hosts",
        "missing required key `root`",
    );
    let errs = errors("pools: {}\n");
    assert!(errs
        .iter()
        .any(|e| e.path == "listen" && e.message.contains("at least one listener")));
    assert!(errs
        .iter()
        .any(|e| e.path == "vhosts" && e.message.contains("at least one vhost")));
}

#[test]
fn syntax_error_is_one_located_error() {
    let yaml = "listen:\n  - bind: 127.0.0.1:8080\npools: [a\n";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].location, Some((3, 8)));
    assert!(
        errs[0]
            .message
            .contains("YAML syntax error: unclosed bracket"),
        "{errs:?}"
    );
    let out = format_errors(Path::new("f.yaml"), &errs);
    assert_eq!(
        out,
        "f.yaml:3:8: YAML syntax error: unclosed bracket '['\n1 error\n"
    );
}

#[test]
fn wrong_shapes_are_reported_once_each() {
    let yaml = "listen: 5\npools:\n  app: [1, 2]\nvhosts:\n  hosts: x\nlimits: big\n";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 4, "{}", format_errors(Path::new("t"), &errs));
    assert_error(&errs, yaml, "listen", "5", "expected a list");
    assert_error(&errs, yaml, "pools.app", "[1, 2]", "expected a mapping");
    assert_error(&errs, yaml, "vhosts", "hosts: x", "expected a list");
    assert_error(&errs, yaml, "limits", "big", "expected a mapping");
}

#[test]
fn duplicate_keys_and_extra_documents() {
    let yaml = with_pool_keys("    retries: 1\n    retries: 2\n");
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_error(
        &errs,
        &yaml,
        "pools.app.retries",
        "retries: 2",
        "duplicate mapping key",
    );
    let two_docs = format!("{MINIMAL}---\n{MINIMAL}");
    let errs = errors(&two_docs);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].message.contains("only one YAML document"),
        "{errs:?}"
    );
}

#[test]
fn crlf_line_endings_and_a_bom_keep_locations_right() {
    let yaml = format!(
        "\u{feff}{}",
        with_pool_keys("    retires: 1\n").replace('\n', "\r\n")
    );
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].path, "pools.app.retires");
    assert_eq!(errs[0].location, Some((5, 5)));
}

#[test]
fn alias_fan_out_hits_the_budget() {
    let mut params = String::from("    params:\n      p0: &v some-value\n");
    for i in 1..1500 {
        params.push_str(&format!("      p{i}: *v\n"));
    }
    let errs = errors(&with_pool_keys(&params));
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].message.contains("YAML safety limit"), "{errs:?}");
    // A handful of aliases is ordinary YAML and fine.
    let c = tests::ok(&with_pool_keys("    params:\n      A: &v x\n      B: *v\n"));
    assert_eq!(c.pools[0].params[1], ("B".to_string(), "x".to_string()));
}

#[test]
fn nesting_beyond_the_limit_is_refused() {
    let yaml = format!("{MINIMAL}limits: {}{}\n", "[".repeat(300), "]".repeat(300));
    let errs = errors(&yaml);
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].location.map(|l| l.0), Some(11), "{errs:?}");
}

#[test]
fn errors_are_capped() {
    let mut eps = String::from("    endpoints:\n");
    for i in 0..50 {
        eps.push_str(&format!(
            "      - {{ addr: 127.0.0.1:{}, bogus: 1 }}\n",
            9000 + i
        ));
    }
    let yaml = MINIMAL.replace("    endpoints:\n      - { addr: 127.0.0.1:9000 }\n", &eps);
    let errs = errors(&yaml);
    assert_eq!(errs.len(), MAX_SCHEMA_ERRORS + 1);
    assert!(errs
        .last()
        .is_some_and(|e| e.message.contains("too many errors")));
}

#[test]
fn mangled_input_never_panics() {
    let s = Scratch::new();
    let chars: Vec<char> = SPEC_EXAMPLE.chars().collect();
    // Every prefix (step 5) and every single-line deletion of the spec example.
    for end in (0..chars.len()).step_by(5) {
        let text: String = chars[..end].iter().collect();
        let _ = s.parse(&text);
    }
    let lines: Vec<&str> = SPEC_EXAMPLE.lines().collect();
    for skip in 0..lines.len() {
        let text: Vec<&str> = lines
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .map(|(_, l)| *l)
            .collect();
        let errs = s.parse(&text.join("\n")).err().unwrap_or_default();
        assert!(errs.iter().all(|e| !e.message.is_empty()));
    }
}
