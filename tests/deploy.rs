//! The shipped deployment files stay valid and consistent with each other:
//!
//! - `config/example.yaml` and the fpmgate config embedded in the Kubernetes ConfigMap pass
//!   `fpmgate check` (with generated certificates where they name certificate files);
//! - the Kubernetes manifests are structurally sound and cross-reference correctly
//!   (selectors, port names, volumes, probes, grace periods, capacity arithmetic), and pass
//!   `kubernetes-validate` and `kubectl kustomize` where those tools are installed;
//! - the systemd unit passes `systemd-analyze verify` where systemd is installed;
//! - the PHP-FPM pool examples pass `php-fpm -t` where php-fpm is installed;
//! - the Containerfile builds exactly the tested release build from files that exist.
//!
//! External tools are optional: a missing one skips its part with a message on stderr.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

#[path = "deploy/kubernetes.rs"]
mod kubernetes;

use kubernetes::{find, k8s_docs};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn yaml_docs(text: &str, what: &str) -> Vec<Value> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)
        .unwrap_or_else(|e| panic!("{what} is not valid YAML: {e}"));
    docs.into_iter().filter(|d| !d.is_null()).collect()
}

fn yaml(text: &str, what: &str) -> Value {
    let mut docs = yaml_docs(text, what);
    assert_eq!(docs.len(), 1, "{what}: expected one YAML document");
    docs.remove(0)
}

fn duration(text: &str) -> Duration {
    fpmgate::config::parse_duration(text).unwrap_or_else(|e| panic!("duration `{text}`: {e}"))
}

fn s<'a>(v: &'a Value, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, got {v}"))
}

fn n(v: &Value, what: &str) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{what}: expected a number, got {v}"))
}

fn arr<'a>(v: &'a Value, what: &str) -> &'a Vec<Value> {
    v.as_array()
        .unwrap_or_else(|| panic!("{what}: expected a list, got {v}"))
}

fn run(cmd: &mut Command) -> Option<Output> {
    match cmd.output() {
        Ok(out) => Some(out),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("running {cmd:?}: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn skip(what: &str, why: &str) {
    eprintln!("SKIPPED {what}: {why}");
}

// ---- fpmgate check ----------------------------------------------------------------------

/// Writes `config` as `dir/fpmgate.yaml` with everything it references created: a fresh
/// self-signed certificate and key for every TLS entry, and every `static` directory.
/// Absolute certificate paths (mounted Secrets, say) are moved under `dir` first.
fn materialize(config: &str, dir: &Path) -> PathBuf {
    let parsed = yaml(config, "the config");
    let mut config = config.to_string();
    let mut files: Vec<(String, String)> = Vec::new();
    for (i, l) in parsed["listen"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        for (j, t) in l["tls"].as_array().into_iter().flatten().enumerate() {
            let cert = s(&t["cert"], &format!("listen[{i}].tls[{j}].cert")).to_string();
            let key = s(&t["key"], &format!("listen[{i}].tls[{j}].key")).to_string();
            files.push((cert, key));
        }
    }
    for (k, (cert, key)) in files.iter().enumerate() {
        let generated = rcgen::generate_simple_self_signed(vec![format!("host{k}.example")])
            .expect("generating a certificate");
        for (path, pem) in [
            (cert, generated.cert.pem()),
            (key, generated.signing_key.serialize_pem()),
        ] {
            let target = match path.strip_prefix('/') {
                Some(abs) => {
                    let moved = dir.join("mounted").join(abs);
                    config = config.replace(path.as_str(), moved.to_str().unwrap());
                    moved
                }
                None => dir.join(path),
            };
            fs::create_dir_all(target.parent().unwrap()).unwrap();
            fs::write(&target, pem).unwrap();
        }
    }
    for (i, v) in parsed["vhosts"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        if let Some(st) = v["static"].as_str() {
            assert!(
                !st.starts_with('/'),
                "vhosts[{i}].static is the absolute `{st}`, which cannot exist everywhere: \
                 leave it commented out in shipped configs or make it relative"
            );
            fs::create_dir_all(dir.join(st)).unwrap();
        }
    }
    let path = dir.join("fpmgate.yaml");
    fs::write(&path, config).unwrap();
    path
}

fn check(path: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_fpmgate"))
        .args(["check", "--config"])
        .arg(path)
        .output()
        .expect("running fpmgate check")
}

fn assert_check_passes(config: &str, what: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = materialize(config, dir.path());
    let out = check(&path);
    assert!(
        out.status.success(),
        "`fpmgate check` rejected {what} ({}):\n{}",
        out.status,
        text(&out)
    );
}

#[test]
fn example_config_passes_check() {
    assert_check_passes(&read("config/example.yaml"), "config/example.yaml");
}

#[test]
fn example_config_without_certificates_names_them() {
    // The example's header promises that `check` reports the missing certificate files.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fpmgate.yaml");
    fs::write(&path, read("config/example.yaml")).unwrap();
    let out = check(&path);
    let output = text(&out);
    assert_eq!(out.status.code(), Some(1), "{output}");
    for file in ["certs/a.crt", "certs/a.key", "certs/b.crt", "certs/b.key"] {
        assert!(output.contains(file), "no error names {file}:\n{output}");
    }
}

// ---- systemd --------------------------------------------------------------------------------

const UNIT: &str = "deploy/systemd/fpmgate.service";

fn unit_value(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{key}=")))
        .map(str::to_string)
        .collect()
}

#[test]
fn systemd_unit_matches_the_binary_and_config() {
    let unit = read(UNIT);
    let config = yaml(&read("config/example.yaml"), "example.yaml");
    let grace = duration(s(&config["shutdown_grace"], "shutdown_grace"));
    let stop = unit_value(&unit, "TimeoutStopSec");
    assert_eq!(stop.len(), 1, "one TimeoutStopSec");
    assert!(
        duration(&stop[0]) > grace,
        "TimeoutStopSec {} must exceed shutdown_grace {grace:?}",
        stop[0]
    );
    let exec = |key: &str| unit_value(&unit, key).join("\n");
    assert!(exec("ExecStartPre").contains("fpmgate check --config /etc/fpmgate/fpmgate.yaml"));
    assert!(exec("ExecStart").contains("fpmgate run --config /etc/fpmgate/fpmgate.yaml"));
    assert!(exec("ExecReload").contains("kill -HUP $MAINPID"));
    for (key, want) in [
        ("Type", "exec"),
        ("DynamicUser", "yes"),
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("PrivateTmp", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("SystemCallFilter", "@system-service"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("KillSignal", "SIGTERM"),
        ("Restart", "on-failure"),
    ] {
        assert_eq!(unit_value(&unit, key), vec![want.to_string()], "{key}");
    }
}

#[test]
fn systemd_unit_passes_systemd_analyze_verify() {
    // `verify` insists that ExecStart binaries exist: point them at the built one.
    let dir = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_fpmgate");
    let unit = read(UNIT).replace("/usr/local/bin/fpmgate", bin);
    let path = dir.path().join("fpmgate.service");
    fs::write(&path, unit).unwrap();
    let Some(out) = run(Command::new("systemd-analyze").arg("verify").arg(&path)) else {
        return skip(
            "systemd unit verification",
            "systemd-analyze is not installed",
        );
    };
    let output = text(&out);
    // Unknown or malformed directives are only warnings (exit 0), printed as
    // "fpmgate.service:LINE: ..." or "fpmgate.service: ...". Lines about other units, or
    // about the host (no /etc/fpmgate here), are not the unit's problem.
    let own: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("fpmgate.service"))
        .collect();
    assert!(
        out.status.success() && own.is_empty(),
        "systemd-analyze verify ({}):\n{output}",
        out.status
    );
    if !output.trim().is_empty() {
        eprintln!("systemd-analyze verify, about other units:\n{output}");
    }
}

// ---- PHP-FPM ---------------------------------------------------------------------------------

fn php_fpm() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FPMGATE_PHP_FPM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    let dirs: Vec<PathBuf> = std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")])
        .collect();
    ["php-fpm8.2", "php-fpm"]
        .iter()
        .flat_map(|name| dirs.iter().map(move |d| d.join(name)))
        .find(|p| p.is_file())
}

/// `php-fpm -t` on a pool file, included from a minimal main config (as php-fpm.conf
/// includes pool.d/*.conf).
fn assert_fpm_accepts(pool: &str, what: &str) {
    let Some(fpm) = php_fpm() else {
        return skip(&format!("php-fpm -t on {what}"), "php-fpm is not installed");
    };
    let dir = tempfile::tempdir().unwrap();
    let pool_path = dir.path().join("pool.conf");
    fs::write(&pool_path, pool).unwrap();
    let main = dir.path().join("php-fpm.conf");
    fs::write(
        &main,
        format!(
            "[global]\nerror_log = {d}/fpm.log\npid = {d}/fpm.pid\ninclude = {p}\n",
            d = dir.path().display(),
            p = pool_path.display()
        ),
    )
    .unwrap();
    let out = Command::new(fpm)
        .arg("-t")
        .arg("-y")
        .arg(&main)
        .arg("-p")
        .arg(dir.path())
        .output()
        .expect("running php-fpm -t");
    let output = text(&out);
    assert!(
        out.status.success() && !output.contains("WARNING"),
        "php-fpm -t rejected {what}:\n{output}"
    );
}

#[test]
fn fpm_pool_example_passes_php_fpm_test() {
    let pool = read("config/fpm-pool.conf.example");
    for (key, value) in [
        ("ping.path", "/ping"),
        ("pm.status_path", "/fpm-status"),
        ("security.limit_extensions", ".php"),
        ("php_admin_value[cgi.fix_pathinfo]", "0"),
    ] {
        assert!(
            pool.lines().any(|l| l
                .split_once('=')
                .is_some_and(|(k, v)| k.trim() == key && v.trim() == value)),
            "fpm-pool.conf.example must set {key} = {value}"
        );
    }
    assert!(pool.lines().any(|l| l.starts_with("pm.status_listen")));
    assert_fpm_accepts(&pool, "config/fpm-pool.conf.example");
}

#[test]
fn kubernetes_fpm_pool_passes_php_fpm_test() {
    let docs = k8s_docs();
    let pool = s(
        &find(&docs, "ConfigMap", "php-fpm-pool")["data"]["www.conf"],
        "www.conf",
    );
    assert_fpm_accepts(pool, "ConfigMap php-fpm-pool www.conf");
}

// ---- Container image ---------------------------------------------------------------------------

#[test]
fn containerfile_builds_the_tested_release_from_existing_files() {
    let cf = read("deploy/container/Containerfile");
    let lines: Vec<&str> = cf
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    let froms: Vec<&&str> = lines.iter().filter(|l| l.starts_with("FROM ")).collect();
    assert_eq!(froms.len(), 2, "a build stage and a runtime stage");
    assert!(froms[0].contains("rust:1-bookworm"), "{}", froms[0]);
    assert!(froms[1].contains("debian:bookworm-slim"), "{}", froms[1]);
    assert!(
        lines.contains(&"RUN cargo build --release --locked"),
        "the image must build exactly `cargo build --release --locked`"
    );
    assert!(lines.contains(&"USER 65532:65532"));
    assert!(lines.contains(&"EXPOSE 8080 8443 9180"));
    assert!(lines.contains(&r#"ENTRYPOINT ["/usr/local/bin/fpmgate"]"#));
    assert!(lines.contains(&r#"CMD ["run", "--config", "/etc/fpmgate/fpmgate.yaml"]"#));

    // Every COPY from the build context names an existing path, and together they hold
    // everything Cargo needs to build: the sources, and any build script or explicitly
    // declared target outside src/.
    let mut copied: Vec<&str> = Vec::new();
    for l in lines
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let words: Vec<&str> = l.split_whitespace().skip(1).collect();
        for src in &words[..words.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "Containerfile copies missing {src}"
            );
            copied.push(src.trim_end_matches('/'));
        }
    }
    let manifest = read("Cargo.toml");
    let mut needed = vec!["Cargo.toml", "Cargo.lock", "src"];
    for (section, dir) in [
        ("[[test]]", "tests"),
        ("[[bench]]", "benches"),
        ("[[example]]", "examples"),
    ] {
        if manifest.lines().any(|l| l.trim() == section) {
            needed.push(dir);
        }
    }
    if repo().join("build.rs").exists() || manifest.lines().any(|l| l.trim().starts_with("build ="))
    {
        needed.push("build.rs");
    }
    for path in manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("path = "))
    {
        let path = path.trim_matches('"');
        assert!(
            copied
                .iter()
                .any(|c| path == *c || path.starts_with(&format!("{c}/"))),
            "Cargo.toml names {path}, which the Containerfile does not copy"
        );
    }
    for n in needed {
        assert!(copied.contains(&n), "the Containerfile must COPY {n}");
    }
}
