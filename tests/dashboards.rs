//! The shipped Grafana dashboard and Prometheus alerts may only name metric families and labels
//! that `src/metrics.rs` registers: a renamed metric must break this test, not a dashboard in
//! production. promtool, when installed, also parses every query and runs the alert unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::path::Path;
use std::process::Command;
use std::sync::LazyLock;

use regex::Regex;
use serde_json::Value;

/// src/metrics.rs and its child modules, where every family is registered.
static METRICS_RS: LazyLock<String> = LazyLock::new(|| {
    [
        include_str!("../src/metrics.rs"),
        include_str!("../src/metrics/fpm.rs"),
    ]
    .concat()
});
const DASHBOARD: &str = include_str!("../dashboards/fpmgate.json");
const ALERTS: &str = include_str!("../dashboards/alerts.yml");
const ALERT_TESTS: &str = include_str!("../dashboards/alerts.test.yml");

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: [&str; 2] = ["instance", "job"];
const ALERT_NAMES: &str = "FpmgateEndpointDown FpmgatePoolNoCapacity FpmgatePoolSaturated \
    FpmgateQueueTimeouts FpmgateHigh5xxRatio FpmgateUpstreamTimeouts FpmgateConfigReloadFailing \
    FpmgateFpmMaxChildrenReached FpmgateFpmListenQueue FpmgateFpmStatusFailing \
    FpmgateCertificateExpiresSoon";
const ROWS: &str = "Traffic Errors Latency Saturation Endpoints PHP-FPM Operations";

struct Family {
    labels: Vec<String>,
    histogram: bool,
}

fn re(pattern: &str) -> Regex {
    Regex::new(pattern).expect("valid regex")
}

/// Every family of src/metrics.rs. A registration is a call taking the name literal, the help
/// literal and, for vectors, the labels: inline `&["a", "b"]` or a `let x = &[...]` binding.
static FAMILIES: LazyLock<BTreeMap<String, Family>> = LazyLock::new(|| {
    let call = re(concat!(
        r#"(\w+(?:::\w+)?)\(\s*(?:&?r,\s*)?"(fpmgate_\w*)",\s*"(?:[^"\\]|\\.)*",?\s*"#,
        r"(?:&\[([^\]]*)\]|(\w+))?"
    ));
    let mut bindings = BTreeMap::new();
    for c in re(r"let (\w+) = &\[([^\]]*)\];").captures_iter(&METRICS_RS) {
        bindings.insert(c[1].to_string(), c[2].to_string());
    }
    let (literal, mut out) = (re(r#""(\w+)""#), BTreeMap::new());
    for c in call.captures_iter(&METRICS_RS) {
        let (ctor, name) = (&c[1], c[2].to_string());
        let list = match (c.get(3), c.get(4)) {
            (Some(inline), _) => inline.as_str(),
            (None, Some(id)) => bindings.get(id.as_str()).expect("a `let` label list"),
            // `Opts::new(name, help)` inside a `*Vec::new`: the labels are elsewhere.
            (None, None) if ctor.ends_with("Opts::new") => {
                panic!("teach this test where the labels of {name} are in src/metrics.rs")
            }
            (None, None) => "",
        };
        let labels = literal.captures_iter(list).map(|l| l[1].into()).collect();
        let histogram = ctor.to_ascii_lowercase().contains("histogram");
        out.insert(name, Family { labels, histogram });
    }
    assert!(out.len() > 20, "too few families found in src/metrics.rs");
    out
});

/// The labels a series name may carry, or why no such series exists.
fn labels_of(name: &str) -> Result<BTreeSet<String>, String> {
    let mut labels: BTreeSet<String> = TARGET_LABELS.map(String::from).into();
    let mut family = FAMILIES.get(name);
    if family.is_some_and(|f| f.histogram) {
        return Err(format!(
            "{name} is a histogram: use _bucket, _sum or _count"
        ));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        let base = name.strip_suffix(suffix).and_then(|b| FAMILIES.get(b));
        if let Some(f) = base.filter(|f| family.is_none() && f.histogram) {
            family = Some(f);
            labels.extend((suffix == "_bucket").then(|| "le".to_string()));
        }
    }
    let f = family.ok_or_else(|| {
        format!(
            "{name} is not a family registered in src/metrics.rs (this test reads the string \
             literals passed to the registering calls: write the name out in full there)"
        )
    })?;
    labels.extend(f.labels.iter().cloned());
    Ok(labels)
}

/// The expression with the inside of every quoted string blanked, so label values never look
/// like names or syntax. Byte offsets are kept.
fn mask_strings(expr: &str) -> String {
    let quoted = re(r#""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`"#);
    let blank = |c: &regex::Captures| format!("\"{}\"", " ".repeat(c[0].len() - 2));
    quoted.replace_all(expr, blank).into_owned()
}

/// The index of the parenthesis matching the one at `at`: forwards from `(`, backwards from `)`.
fn matching(m: &[u8], at: usize) -> Option<usize> {
    let (open, step) = if m[at] == b'(' { (b'(', 1) } else { (b')', -1) };
    let (mut depth, mut i) = (0, at as isize);
    while let Some(&c) = m.get(usize::try_from(i).ok()?) {
        depth += (c == open) as i32 - (c != open && (c == b'(' || c == b')')) as i32;
        if depth == 0 {
            return Some(i as usize);
        }
        i += step;
    }
    None
}

/// `fpmgate_*` names in a masked expression, as byte ranges.
fn metric_refs(m: &str) -> Vec<Range<usize>> {
    let refs = re(r"(?:^|[^\w:])(fpmgate_[\w:]*)");
    refs.captures_iter(m)
        .map(|c| c.get(1).unwrap().range())
        .collect()
}

/// Every problem with the names and labels of one PromQL expression.
fn check_expr(origin: &str, expr: &str, legend: Option<&str>) -> Vec<String> {
    let mut errs = Vec::new();
    let m = mask_strings(expr);
    let b = m.as_bytes();
    let mut seen = BTreeSet::new();
    for r in metric_refs(&m) {
        let name = &m[r.clone()];
        let labels = match labels_of(name) {
            Ok(labels) => labels,
            Err(e) => {
                errs.push(format!("{origin}: {e}"));
                continue;
            }
        };
        let selector = m[r.end..]
            .strip_prefix('{')
            .and_then(|s| s.split('}').next());
        for matcher in selector.unwrap_or_default().split(',') {
            let label = matcher.split(['=', '!', '~']).next().unwrap_or("").trim();
            if !label.is_empty() && !labels.contains(label) {
                errs.push(format!("{origin}: {name} has no label `{label}`"));
            }
        }
        seen.extend(labels);
    }
    // `agg by (labels) (arg)` or `agg (arg) by (labels)`: every family in arg needs the labels.
    for by in re(r"\bby\s*\(([^)]*)\)\s*").captures_iter(&m) {
        let (whole, list) = (by.get(0).unwrap(), by.get(1).unwrap().as_str());
        let before = m[..whole.start()].trim_end().len().saturating_sub(1);
        let arg = match (b.get(whole.end()), b[before]) {
            (Some(b'('), _) => matching(b, whole.end()).map(|end| whole.end()..end),
            (_, b')') => matching(b, before).map(|start| start..before),
            _ => None,
        };
        let Some(arg) = arg else {
            errs.push(format!(
                "{origin}: what does `{}` aggregate?",
                whole.as_str()
            ));
            continue;
        };
        for r in metric_refs(&m[arg.clone()]) {
            let name = &m[arg.start + r.start..arg.start + r.end];
            let labels = labels_of(name).unwrap_or_default();
            for label in list.split(',').map(str::trim) {
                if !labels.is_empty() && !label.is_empty() && !labels.contains(label) {
                    errs.push(format!("{origin}: {name} lacks `by ({label})`"));
                }
            }
        }
    }
    // Legend templates such as `{{endpoint}}` must name a label some queried family has (a
    // misspelt family already failed, so its legend is not reported again).
    let legend = legend.filter(|_| errs.is_empty()).unwrap_or_default();
    for c in re(r"\{\{\s*(\w+)\s*\}\}").captures_iter(legend) {
        if !seen.contains(&c[1]) {
            errs.push(format!("{origin}: no series has legend label `{}`", &c[1]));
        }
    }
    errs
}

/// Grafana's `label_values(selector, label)` is checked as `count by (label) (selector)`.
fn check_query(origin: &str, q: &str, legend: Option<&str>) -> Vec<String> {
    let label_values = re(r"^\s*label_values\((.*),\s*(\w+)\s*\)\s*$");
    match label_values.captures(q) {
        Some(c) => check_expr(origin, &format!("count by ({}) ({})", &c[2], &c[1]), None),
        None => check_expr(origin, q, legend),
    }
}

fn assert_clean(errs: Vec<String>) {
    assert!(errs.is_empty(), "problems:\n  {}", errs.join("\n  "));
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("dashboards/fpmgate.json is valid JSON")
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).expect("valid YAML")
}

fn list(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn text(v: &Value) -> &str {
    v.as_str().unwrap_or_default()
}

/// Every panel, rows and the panels folded into collapsed rows included.
fn all_panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in list(&v["panels"]) {
        out.push(p);
        out.extend(all_panels(p));
    }
    out
}

/// A dashboard query: where it is, its PromQL, its legend, and whether a panel draws it.
struct Query(String, String, Option<String>, bool);

fn dashboard_queries(d: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in list(&p["targets"]) {
            let origin = format!("panel {} {} target {}", p["id"], p["title"], t["refId"]);
            let legend = t["legendFormat"].as_str().map(String::from);
            out.push(Query(origin, text(&t["expr"]).into(), legend, true));
        }
    }
    for v in list(&d["templating"]["list"]) {
        let q = v["query"].get("query").unwrap_or(&v["query"]);
        if v["type"] == "query" {
            let origin = format!("variable {}", v["name"]);
            out.push(Query(origin, text(q).into(), None, false));
        }
    }
    for a in list(&d["annotations"]["list"]) {
        if let Some(expr) = a["expr"].as_str() {
            let origin = format!("annotation {}", a["name"]);
            out.push(Query(origin, expr.into(), None, false));
        }
    }
    out
}

#[test]
fn checker_reads_metrics_rs_and_rejects_unknown_names_and_labels() {
    let f = |name: &str| FAMILIES.get(name).expect(name);
    let labels = ["vhost", "pool", "code"];
    assert_eq!(f("fpmgate_http_requests_total").labels, labels);
    assert_eq!(f("fpmgate_fpm_listen_queue").labels, ["pool", "endpoint"]);
    assert!(f("fpmgate_config_generation").labels.is_empty());
    assert!(f("fpmgate_pool_queue_wait_seconds").histogram);
    assert!(!f("fpmgate_pool_queue_depth").histogram);
    let cases = "rate(fpmgate_http_request_total[5m]) => not a family registered
        rate(fpmgate_http_request_duration_seconds[5m]) => is a histogram
        sum by (endpoint) (rate(fpmgate_http_requests_total[5m])) => `by (endpoint)`
        sum(rate(fpmgate_gateway_errors_total[5m])) by (kind) => `by (kind)`
        fpmgate_pool_capacity{vhost=\"a,b\"} => no label `vhost`
        label_values(fpmgate_pool_capacity, vhost) => `by (vhost)`
        sum by (pool) (fpmgate_pool_capacity => what does";
    for (bad, why) in cases.lines().filter_map(|l| l.trim().split_once(" => ")) {
        let errs = check_query("self-test", bad, None);
        assert!(errs.iter().any(|e| e.contains(why)), "{bad}: {errs:?}");
    }
    let errs = check_expr("self-test", "fpmgate_endpoint_up", Some("{{endpiont}}"));
    assert!(errs.iter().any(|e| e.contains("endpiont")), "{errs:?}");
    let good = "histogram_quantile(0.9, sum by (le, pool) \
                (rate(fpmgate_pool_queue_wait_seconds_bucket{pool=~\"by (x)\"}[5m])))";
    assert_clean(check_expr("self-test", good, Some("{{pool}}")));
}

#[test]
fn dashboard_names_only_registered_metrics_and_labels() {
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() > 30, "only {} queries found", queries.len());
    let mut errs = Vec::new();
    for Query(origin, expr, legend, panel) in &queries {
        if expr.trim().is_empty() {
            errs.push(format!("{origin}: empty query"));
        }
        let legend = legend.as_deref().filter(|l| *l != "__auto");
        errs.extend(check_query(origin, expr, legend));
        // $__rate_interval covers at least four scrapes at any zoom; a fixed window does not.
        let mut ranges = expr.split('[').skip(1);
        if *panel && ranges.any(|r| !r.starts_with("$__rate_interval]")) {
            errs.push(format!("{origin}: use [$__rate_interval]"));
        }
    }
    assert_clean(errs);
}

#[test]
fn dashboard_structure() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64() >= Some(38),
        "schemaVersion < 38"
    );
    let vars = list(&d["templating"]["list"]);
    let var = |n: &str| vars.iter().find(|v| v["name"] == n).expect(n);
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for n in ["vhost", "pool"] {
        let v = var(n);
        assert_eq!(v["type"], "query", "${n}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "${n}");
        assert!(v["multi"] == true && v["includeAll"] == true, "${n}");
    }
    let (mut ids, mut rows) = (BTreeSet::new(), Vec::new());
    for p in all_panels(&d) {
        let title = &p["title"];
        assert!(ids.insert(p["id"].as_u64()), "panel {title}: id reused");
        if p["type"] == "row" {
            rows.push(text(title));
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        assert!(!list(&p["targets"]).is_empty(), "panel {title}: no query");
        for t in list(&p["targets"]) {
            assert_eq!(t["datasource"]["uid"], "${datasource}", "{title}");
        }
    }
    assert!(!ids.contains(&None), "a panel has no numeric id");
    assert_eq!(rows, ROWS.split(' ').collect::<Vec<_>>());
}

#[test]
fn alerts_name_only_registered_metrics_and_are_complete() {
    let file = yaml(ALERTS);
    let groups = list(&file["groups"]);
    assert!(groups.len() == 1 && groups[0]["name"] == "fpmgate");
    let rules = list(&groups[0]["rules"]);
    let names: Vec<&str> = rules.iter().map(|r| text(&r["alert"])).collect();
    assert_eq!(names, ALERT_NAMES.split_whitespace().collect::<Vec<_>>());
    let mut errs = Vec::new();
    for (r, name) in rules.iter().zip(&names) {
        errs.extend(check_expr(name, text(&r["expr"]), None));
        if !r["for"].is_string() {
            errs.push(format!("{name}: no `for`"));
        }
        if !matches!(text(&r["labels"]["severity"]), "warning" | "critical") {
            errs.push(format!("{name}: severity must be warning or critical"));
        }
        for key in ["summary", "description", "runbook"] {
            if text(&r["annotations"][key]).trim().is_empty() {
                errs.push(format!("{name}: no `{key}` annotation"));
            }
        }
    }
    // The unit tests must feed real series, and show each alert both firing and holding back.
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for group in list(&yaml(ALERT_TESTS)["tests"]) {
        for s in list(&group["input_series"]) {
            errs.extend(check_expr("alerts.test.yml", text(&s["series"]), None));
        }
        for case in list(&group["alert_rule_test"]) {
            let firing = !list(&case["exp_alerts"]).is_empty();
            let set = if firing { &mut fires } else { &mut quiet };
            set.insert(text(&case["alertname"]).to_string());
        }
    }
    for a in ALERT_NAMES.split_whitespace() {
        if !fires.contains(a) || !quiet.contains(a) {
            errs.push(format!("{a}: needs a firing and a quiet test"));
        }
    }
    assert_clean(errs);
}

/// Runs promtool in dashboards/ and asserts it succeeds; false when it is not installed.
fn promtool(args: &[&str]) -> bool {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output();
    let out = match out {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("promtool not found: run scripts/test.sh, which installs it");
            return false;
        }
        Err(e) => panic!("running promtool: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let args = args.join(" ");
    assert!(out.status.success(), "promtool {args}:\n{stdout}{stderr}");
    true
}

#[test]
fn promtool_accepts_alerts_and_their_tests() {
    if promtool(&["check", "rules", "alerts.yml"]) {
        promtool(&["test", "rules", "alerts.test.yml"]);
    }
}

#[test]
fn promtool_parses_every_dashboard_query() {
    // promtool checks rule files only, so each query becomes a recording rule, with Grafana's
    // variables replaced by values they can take.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, Query(origin, expr, ..)) in dashboard_queries(&dashboard()).iter().enumerate() {
        if expr.contains("label_values(") {
            continue;
        }
        let expr = expr.replace("$__rate_interval", "5m");
        let expr = expr.replace("$vhost", ".*").replace("$pool", ".*");
        assert!(!expr.contains('$'), "{origin}: unknown variable in {expr}");
        // A JSON string is also a YAML double-quoted scalar.
        let expr = Value::from(expr);
        rules += &format!("      - record: dashboard:query_{i}\n        expr: {expr}\n");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboard_queries.yml");
    std::fs::write(&file, rules).expect("write the rules");
    promtool(&["check", "rules", file.to_str().expect("UTF-8 path")]);
}
