//! The shipped Grafana dashboard and Prometheus alerts may only name metric families and labels
//! that `src/metrics.rs` registers: a renamed metric must break this test, not a dashboard in
//! production. promtool, when installed, also checks the PromQL and runs the alert unit tests.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;

use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::Value;

const METRICS_RS: &str = include_str!("../src/metrics.rs");
const DASHBOARD: &str = include_str!("../dashboards/fpmgate.json");
const ALERTS: &str = include_str!("../dashboards/alerts.yml");
const ALERT_TESTS: &str = include_str!("../dashboards/alerts.test.yml");

/// Labels Prometheus attaches to every scraped series.
const TARGET_LABELS: &[&str] = &["instance", "job"];

const ALERT_NAMES: &[&str] = &[
    "FpmgateEndpointDown",
    "FpmgatePoolNoCapacity",
    "FpmgatePoolSaturated",
    "FpmgateQueueTimeouts",
    "FpmgateHigh5xxRatio",
    "FpmgateUpstreamTimeouts",
    "FpmgateConfigReloadFailing",
    "FpmgateFpmMaxChildrenReached",
    "FpmgateFpmListenQueue",
];

struct Family {
    labels: Vec<String>,
    histogram: bool,
}

fn is_ident(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_' || b == b':'
}

/// Reads a Rust string literal starting at the `"` at `at`: (content, index after it).
fn rust_string(src: &str, at: usize) -> (String, usize) {
    let b = src.as_bytes();
    let mut i = at + 1;
    while b[i] != b'"' {
        i += if b[i] == b'\\' { 2 } else { 1 };
    }
    (src[at + 1..i].to_string(), i + 1)
}

fn skip_ws(src: &str, i: usize) -> usize {
    i + (src[i..].len() - src[i..].trim_start().len())
}

/// The `"..."` literals of a `[...]` list starting at `at`.
fn string_list(src: &str, at: usize) -> Vec<String> {
    let end = at + src[at..].find(']').expect("closed label list");
    src[at..end]
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .filter(|s| !s.is_empty())
        .collect()
}

/// Every family registered in src/metrics.rs. A registration is a `"fpmgate_..."` literal followed
/// by its help literal and, for vectors, its label list (inline or a `let x = &[...]` binding).
fn families() -> BTreeMap<String, Family> {
    let src = METRICS_RS;
    let mut out = BTreeMap::new();
    let mut from = 0;
    while let Some(off) = src[from..].find("\"fpmgate_") {
        let at = from + off;
        let (name, after) = rust_string(src, at);
        from = after;
        let mut i = skip_ws(src, after);
        if !src[i..].starts_with(',') || !src[skip_ws(src, i + 1)..].starts_with('"') {
            continue; // a mention, not a registration
        }
        let before = &src[..at];
        let paren = before.rfind('(').expect("a call around the name");
        let ctor: String = before[..paren]
            .chars()
            .rev()
            .take_while(|c| c.is_alphanumeric() || *c == '_' || *c == ':')
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        i = skip_ws(src, rust_string(src, skip_ws(src, i + 1)).1);
        if src[i..].starts_with(',') {
            i = skip_ws(src, i + 1);
        }
        let labels = if src[i..].starts_with(')') {
            assert!(
                !ctor.ends_with("Opts::new"),
                "the labels of {name} are not next to its name in src/metrics.rs; \
                 register it like the others or teach tests/dashboards.rs where to find them"
            );
            Vec::new()
        } else if src[i..].starts_with("&[") {
            string_list(src, i + 2)
        } else {
            let id: String = src[i..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let binding = format!("let {id} = &[");
            let b = src.find(&binding).unwrap_or_else(|| {
                panic!("cannot resolve the labels `{id}` of {name} in src/metrics.rs")
            });
            string_list(src, b + binding.len())
        };
        let histogram = ctor.to_ascii_lowercase().contains("histogram");
        out.insert(name, Family { labels, histogram });
    }
    assert!(
        out.len() > 20,
        "found only {} families in src/metrics.rs",
        out.len()
    );
    out
}

/// The expression with the inside of every quoted string blanked, so label values never look
/// like names or syntax. Byte offsets are kept.
fn mask_strings(expr: &str) -> String {
    let mut out = expr.as_bytes().to_vec();
    let mut quote = None;
    let mut i = 0;
    while i < out.len() {
        match quote {
            None if matches!(out[i], b'"' | b'\'' | b'`') => quote = Some(out[i]),
            Some(q) if out[i] == q => quote = None,
            Some(q) => {
                if out[i] == b'\\' && q != b'`' && i + 1 < out.len() {
                    out[i] = b' ';
                    i += 1;
                }
                out[i] = b' ';
            }
            None => {}
        }
        i += 1;
    }
    String::from_utf8(out).expect("ASCII blanks keep UTF-8")
}

/// The index of the parenthesis matching the one at `open` (forwards or backwards).
fn matching(m: &[u8], open: usize) -> usize {
    let (inc, dec, step): (u8, u8, isize) = if m[open] == b'(' {
        (b'(', b')', 1)
    } else {
        (b')', b'(', -1)
    };
    let (mut depth, mut i) = (0, open as isize);
    loop {
        depth += (m[i as usize] == inc) as i32 - (m[i as usize] == dec) as i32;
        if depth == 0 {
            return i as usize;
        }
        i += step;
    }
}

/// `fpmgate_*` names in a masked expression: (start, end).
fn metric_refs(m: &str) -> Vec<(usize, usize)> {
    let b = m.as_bytes();
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(off) = m[from..].find("fpmgate_") {
        let s = from + off;
        let mut e = s;
        while e < b.len() && is_ident(b[e]) {
            e += 1;
        }
        if s == 0 || !is_ident(b[s - 1]) {
            out.push((s, e));
        }
        from = e;
    }
    out
}

/// The labels a series name may carry, or why the name does not exist.
fn labels_of(fams: &BTreeMap<String, Family>, name: &str) -> Result<BTreeSet<String>, String> {
    let mut labels: BTreeSet<String> = TARGET_LABELS.iter().map(|s| s.to_string()).collect();
    if let Some(f) = fams.get(name) {
        if f.histogram {
            return Err(format!(
                "{name} is a histogram: use {name}_bucket, _sum or _count"
            ));
        }
        labels.extend(f.labels.iter().cloned());
        return Ok(labels);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(f) = name
            .strip_suffix(suffix)
            .and_then(|b| fams.get(b))
            .filter(|f| f.histogram)
        {
            labels.extend(f.labels.iter().cloned());
            if suffix == "_bucket" {
                labels.insert("le".into());
            }
            return Ok(labels);
        }
    }
    Err(format!(
        "{name} is not a family registered in src/metrics.rs (this test reads the string literals \
         passed to the registering calls there; a name built with format! or concat! must be \
         written out)"
    ))
}

/// Every problem with the names and labels of one PromQL expression.
fn check_expr(
    fams: &BTreeMap<String, Family>,
    origin: &str,
    expr: &str,
    legend: Option<&str>,
) -> Vec<String> {
    let mut errs = Vec::new();
    let m = mask_strings(expr);
    let b = m.as_bytes();
    let mut seen = BTreeSet::new();
    for (s, e) in metric_refs(&m) {
        let name = &m[s..e];
        let Ok(labels) = labels_of(fams, name).map_err(|err| errs.push(format!("{origin}: {err}")))
        else {
            continue;
        };
        if b.get(e) == Some(&b'{') {
            let close = e + m[e..].find('}').expect("closed selector");
            for matcher in m[e + 1..close]
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
            {
                let label =
                    matcher[..matcher.find(['=', '!', '~']).unwrap_or(matcher.len())].trim();
                if !labels.contains(label) {
                    errs.push(format!(
                        "{origin}: {name} has no label `{label}` (it has {labels:?})"
                    ));
                }
            }
        }
        seen.extend(labels);
    }
    // `agg by (labels) (arg)` or `agg (arg) by (labels)`: every family in arg needs the labels.
    let mut from = 0;
    while let Some(off) = m[from..].find("by") {
        let at = from + off;
        from = at + 2;
        let open = skip_ws(&m, at + 2);
        if (at > 0 && is_ident(b[at - 1]))
            || b.get(at + 2).is_some_and(|c| is_ident(*c))
            || b.get(open) != Some(&b'(')
        {
            continue;
        }
        let close = matching(b, open);
        let next = skip_ws(&m, close + 1);
        let end = m[..at].trim_end().len().saturating_sub(1);
        let arg = if b.get(next) == Some(&b'(') {
            next..matching(b, next)
        } else if b[end] == b')' {
            matching(b, end)..end
        } else {
            errs.push(format!(
                "{origin}: cannot tell what `by` at byte {at} aggregates"
            ));
            continue;
        };
        for label in m[open + 1..close]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            for (s, e) in metric_refs(&m[arg.clone()]) {
                let name = &m[arg.start + s..arg.start + e];
                if labels_of(fams, name).is_ok_and(|l| !l.contains(label)) {
                    errs.push(format!(
                        "{origin}: `by ({label})` over {name}, which has no such label"
                    ));
                }
            }
        }
    }
    // Legend templates such as `{{endpoint}}` must name a label some queried family has.
    for part in legend.unwrap_or("").split("{{").skip(1) {
        let label = part.split("}}").next().unwrap_or("").trim();
        if !seen.contains(label) {
            errs.push(format!(
                "{origin}: legend uses `{{{{{label}}}}}`, a label none of its series has"
            ));
        }
    }
    errs
}

fn dashboard() -> Value {
    serde_json::from_str(DASHBOARD).expect("dashboards/fpmgate.json is valid JSON")
}

/// Every panel, rows and the panels folded into collapsed rows included.
fn all_panels(v: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in v["panels"].as_array().into_iter().flatten() {
        out.push(p);
        out.extend(all_panels(p));
    }
    out
}

/// (origin, expr, legend, is a panel query) for every query of the dashboard.
fn dashboard_queries(d: &Value) -> Vec<(String, String, Option<String>, bool)> {
    let mut out = Vec::new();
    for p in all_panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            let origin = format!("panel {} {:?} target {}", p["id"], p["title"], t["refId"]);
            let legend = t["legendFormat"].as_str().map(String::from);
            out.push((
                origin,
                t["expr"].as_str().unwrap_or("").to_string(),
                legend,
                true,
            ));
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] == "query" {
            let q = v["query"]["query"]
                .as_str()
                .or(v["query"].as_str())
                .unwrap_or("")
                .to_string();
            out.push((
                format!("variable ${}", v["name"].as_str().unwrap_or("?")),
                q,
                None,
                false,
            ));
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        if let Some(e) = a["expr"].as_str() {
            out.push((
                format!("annotation {:?}", a["name"]),
                e.to_string(),
                None,
                false,
            ));
        }
    }
    out
}

/// `label_values(selector, label)` becomes the selector, with its label checked separately.
fn check_query(
    fams: &BTreeMap<String, Family>,
    origin: &str,
    q: &str,
    legend: Option<&str>,
) -> Vec<String> {
    let Some(inner) = q
        .trim()
        .strip_prefix("label_values(")
        .and_then(|s| s.strip_suffix(')'))
    else {
        return check_expr(fams, origin, q, legend);
    };
    let (sel, label) = inner.rsplit_once(',').expect("label_values(metric, label)");
    let mut errs = check_expr(fams, origin, sel, None);
    for (s, e) in metric_refs(&mask_strings(sel)) {
        if labels_of(fams, &sel[s..e]).is_ok_and(|l| !l.contains(label.trim())) {
            errs.push(format!(
                "{origin}: {} has no label `{}`",
                &sel[s..e],
                label.trim()
            ));
        }
    }
    errs
}

fn assert_clean(errs: Vec<String>) {
    assert!(
        errs.is_empty(),
        "{} problem(s):\n  {}",
        errs.len(),
        errs.join("\n  ")
    );
}

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
struct Rule {
    alert: String,
    expr: String,
    #[serde(rename = "for")]
    for_: Option<String>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct TestFile {
    tests: Vec<TestGroup>,
}

#[derive(Deserialize)]
struct TestGroup {
    input_series: Vec<InputSeries>,
    #[serde(default)]
    alert_rule_test: Vec<AlertCase>,
}

#[derive(Deserialize)]
struct InputSeries {
    series: String,
}

#[derive(Deserialize)]
struct AlertCase {
    alertname: String,
    #[serde(default)]
    exp_alerts: Vec<IgnoredAny>,
}

fn rules() -> Vec<Rule> {
    let file: RuleFile = serde_saphyr::from_str(ALERTS).expect("dashboards/alerts.yml parses");
    assert_eq!(file.groups.len(), 1);
    assert_eq!(file.groups[0].name, "fpmgate");
    file.groups.into_iter().flat_map(|g| g.rules).collect()
}

#[test]
fn metrics_rs_parser_reads_names_labels_and_kinds() {
    let f = families();
    assert_eq!(
        f["fpmgate_http_requests_total"].labels,
        ["vhost", "pool", "code"]
    );
    assert_eq!(f["fpmgate_fpm_listen_queue"].labels, ["pool", "endpoint"]);
    assert!(f["fpmgate_config_generation"].labels.is_empty());
    assert!(f["fpmgate_pool_queue_wait_seconds"].histogram);
    assert!(!f["fpmgate_pool_queue_depth"].histogram);
}

#[test]
fn checker_rejects_unknown_names_and_labels() {
    let f = families();
    for (bad, why) in [
        (
            "rate(fpmgate_http_request_total[5m])",
            "not a family registered",
        ),
        (
            "rate(fpmgate_http_request_duration_seconds[5m])",
            "is a histogram",
        ),
        (
            "sum by (endpoint) (rate(fpmgate_http_requests_total[5m]))",
            "`by (endpoint)`",
        ),
        (
            "sum(rate(fpmgate_gateway_errors_total[5m])) by (kind)",
            "`by (kind)`",
        ),
        ("fpmgate_pool_capacity{vhost=\"a,b\"}", "no label `vhost`"),
        (
            "label_values(fpmgate_pool_capacity, vhost)",
            "no label `vhost`",
        ),
    ] {
        let errs = check_query(&f, "self-test", bad, None);
        assert!(errs.iter().any(|e| e.contains(why)), "{bad}: {errs:?}");
    }
    let errs = check_expr(&f, "self-test", "fpmgate_endpoint_up", Some("{{endpiont}}"));
    assert!(errs.iter().any(|e| e.contains("endpiont")), "{errs:?}");
    let good = "histogram_quantile(0.9, sum by (le, pool) (rate(fpmgate_pool_queue_wait_seconds_bucket{pool=~\"by (x)\"}[5m])))";
    assert_clean(check_expr(&f, "self-test", good, Some("{{pool}}")));
}

#[test]
fn dashboard_names_only_registered_metrics_and_labels() {
    let f = families();
    let queries = dashboard_queries(&dashboard());
    assert!(queries.len() > 30, "found only {} queries", queries.len());
    let mut errs = Vec::new();
    for (origin, q, legend, panel) in &queries {
        if q.trim().is_empty() {
            errs.push(format!("{origin}: empty query"));
        }
        errs.extend(check_query(
            &f,
            origin,
            q,
            legend.as_deref().filter(|l| *l != "__auto"),
        ));
        // Grafana widens $__rate_interval to cover at least four scrapes; fixed windows break
        // with long scrape intervals or zoomed-out ranges.
        let ranges = q
            .split('[')
            .skip(1)
            .filter(|r| !r.starts_with("$__rate_interval]"));
        if *panel && ranges.count() > 0 {
            errs.push(format!(
                "{origin}: range selectors must be [$__rate_interval]"
            ));
        }
    }
    assert_clean(errs);
}

#[test]
fn dashboard_structure() {
    let d = dashboard();
    assert!(
        d["schemaVersion"].as_u64().unwrap_or(0) >= 38,
        "schemaVersion must be 38 or more"
    );
    let vars = d["templating"]["list"].as_array().expect("templating.list");
    let var = |n: &str| {
        vars.iter()
            .find(|v| v["name"] == n)
            .unwrap_or_else(|| panic!("no ${n}"))
    };
    assert_eq!(var("datasource")["type"], "datasource");
    assert_eq!(var("datasource")["query"], "prometheus");
    for n in ["vhost", "pool"] {
        let v = var(n);
        assert_eq!(v["type"], "query", "${n}");
        assert_eq!(v["datasource"]["uid"], "${datasource}", "${n}");
        assert!(
            v["multi"] == true && v["includeAll"] == true,
            "${n} must be multi with All"
        );
    }
    let mut ids = BTreeSet::new();
    let mut rows = Vec::new();
    for p in all_panels(&d) {
        let title = &p["title"];
        assert!(
            ids.insert(p["id"].as_u64().expect("numeric id")),
            "duplicate panel id {}",
            p["id"]
        );
        if p["type"] == "row" {
            rows.push(title.as_str().unwrap_or_default().to_string());
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${datasource}", "panel {title}");
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        for t in targets.unwrap_or_else(|| panic!("panel {title} has no query")) {
            assert_eq!(
                t["datasource"]["uid"], "${datasource}",
                "panel {title} target {}",
                t["refId"]
            );
        }
    }
    let expected = [
        "Traffic",
        "Errors",
        "Latency",
        "Saturation",
        "Endpoints",
        "PHP-FPM",
        "Operations",
    ];
    assert_eq!(rows, expected);
}

#[test]
fn alerts_name_only_registered_metrics_and_are_complete() {
    let f = families();
    let rules = rules();
    let names: Vec<&str> = rules.iter().map(|r| r.alert.as_str()).collect();
    assert_eq!(names, ALERT_NAMES);
    let mut errs = Vec::new();
    for r in &rules {
        errs.extend(check_expr(&f, &r.alert, &r.expr, None));
        if r.for_.is_none() {
            errs.push(format!("{}: no `for`", r.alert));
        }
        if !matches!(
            r.labels.get("severity").map(String::as_str),
            Some("warning" | "critical")
        ) {
            errs.push(format!("{}: severity must be warning or critical", r.alert));
        }
        for key in ["summary", "description", "runbook"] {
            if r.annotations.get(key).is_none_or(|a| a.trim().is_empty()) {
                errs.push(format!("{}: no `{key}` annotation", r.alert));
            }
        }
    }
    // The unit tests must feed real series, and prove each alert both fires and holds back.
    let tests: TestFile =
        serde_saphyr::from_str(ALERT_TESTS).expect("dashboards/alerts.test.yml parses");
    let mut fires = BTreeSet::new();
    let mut quiet = BTreeSet::new();
    for g in &tests.tests {
        for s in &g.input_series {
            errs.extend(check_expr(&f, "alerts.test.yml input", &s.series, None));
        }
        for c in &g.alert_rule_test {
            let set = if c.exp_alerts.is_empty() {
                &mut quiet
            } else {
                &mut fires
            };
            set.insert(c.alertname.clone());
        }
    }
    for a in ALERT_NAMES {
        if !fires.contains(*a) || !quiet.contains(*a) {
            errs.push(format!(
                "{a}: alerts.test.yml needs a case that fires and one that does not"
            ));
        }
    }
    assert_clean(errs);
}

/// Runs promtool with `args` in dashboards/; None when promtool is not installed.
fn promtool(args: &[&str]) -> Option<std::process::Output> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("dashboards");
    match Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
    {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("promtool not found: run scripts/test.sh, which installs it");
            None
        }
        Err(e) => panic!("running promtool: {e}"),
    }
}

fn assert_ok(what: &str, out: &std::process::Output) {
    assert!(
        out.status.success(),
        "{what} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn promtool_accepts_alerts_and_their_tests() {
    let Some(out) = promtool(&["check", "rules", "alerts.yml"]) else {
        return;
    };
    assert_ok("promtool check rules alerts.yml", &out);
    let out = promtool(&["test", "rules", "alerts.test.yml"]).expect("promtool ran once already");
    assert_ok("promtool test rules alerts.test.yml", &out);
}

#[test]
fn promtool_parses_every_dashboard_query() {
    // promtool only checks rule files, so each query becomes a recording rule, with Grafana's
    // variables replaced by values they can take.
    let mut yaml = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (origin, q, _, _)) in dashboard_queries(&dashboard()).iter().enumerate() {
        if q.trim_start().starts_with("label_values(") {
            continue;
        }
        let q = q
            .replace("$__rate_interval", "5m")
            .replace("$vhost", ".*")
            .replace("$pool", ".*");
        assert!(!q.contains('$'), "{origin}: unknown variable in {q}");
        // A JSON string is a valid YAML double-quoted scalar.
        yaml += &format!(
            "      - record: dashboard:query_{i}\n        expr: {}\n",
            Value::from(q)
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("dashboard_queries.yml");
    std::fs::write(&file, yaml).expect("write rules");
    let Some(out) = promtool(&["check", "rules", file.to_str().expect("UTF-8 path")]) else {
        return;
    };
    assert_ok("promtool check rules on the dashboard queries", &out);
}
