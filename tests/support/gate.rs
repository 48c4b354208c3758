//! The `fpmgate` binary under test: config in a fresh temp dir, ports learnt from its
//! `listening addr=IP:PORT kind=KIND` log lines, output captured line by line.
//!
//! The harness only reads logs and sends signals; it never assumes fixed ports.

use super::process::{self, Guardian};
use super::{fpm::tail, substitute_dir};
use serde::de::IgnoredAny;
use serde::Deserialize;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long fpmgate may take to announce all its listeners.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(20);

/// A running fpmgate process.
pub struct Gate {
    /// The first plain `http` listener (the first `https` one if the config has none).
    pub http: SocketAddr,
    /// The first `https` listener, if any.
    pub https: Option<SocketAddr>,
    /// The admin listener, if configured.
    pub admin: Option<SocketAddr>,
    /// `dir/fpmgate.yaml`, the file fpmgate watches.
    pub config_path: PathBuf,
    /// The temp dir (the `{dir}` placeholder), for certs, static trees, count files.
    pub dir: PathBuf,
    child: Child,
    logs: Arc<LogBuf>,
    exit: Option<ExitStatus>,
    guardian: Option<Guardian>,
    _tmp: TempDir,
}

impl Gate {
    /// Like [`Gate::try_start`], but panics with fpmgate's output on failure.
    pub fn start(yaml: &str) -> Gate {
        match Gate::try_start(yaml) {
            Ok(gate) => gate,
            Err(output) => panic!("fpmgate did not start:\n{output}"),
        }
    }

    /// Writes `yaml` (with `{dir}` replaced) to `dir/fpmgate.yaml` in a new temp dir, runs
    /// `fpmgate run --config` on it with `RUST_LOG=info` (`FPMGATE_TEST_LOG` overrides; it
    /// must keep the info-level `listening` lines), and waits until every listener of the
    /// config is announced. `Err(output)` if fpmgate exits first or takes over 20 s.
    pub fn try_start(yaml: &str) -> Result<Gate, String> {
        let tmp = tempfile::Builder::new()
            .prefix("fpmgate-gate-")
            .tempdir()
            .map_err(|e| format!("create temp dir: {e}"))?;
        let dir = tmp.path().to_path_buf();
        let config_path = dir.join("fpmgate.yaml");
        let text = substitute_dir(yaml, &dir);
        fs::write(&config_path, &text).map_err(|e| format!("write config: {e}"))?;
        let expected = Expected::from_yaml(&text);

        let log_level = std::env::var("FPMGATE_TEST_LOG").unwrap_or_else(|_| "info".into());
        let mut child = Command::new(env!("CARGO_BIN_EXE_fpmgate"))
            .arg("run")
            .arg("--config")
            .arg(&config_path)
            .env("RUST_LOG", log_level)
            // Plain lines are easier to match; ANSI codes are stripped anyway.
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("spawn fpmgate: {e}"))?;
        let guardian = Guardian::spawn(child.id(), Some(&dir));
        let logs = Arc::new(LogBuf::default());
        let echo = std::env::var_os("FPMGATE_TEST_ECHO").is_some();
        // tracing may write to stdout or stderr depending on setup: capture both.
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        spawn_reader(stdout, Arc::clone(&logs), echo);
        spawn_reader(stderr, Arc::clone(&logs), echo);

        let mut gate = Gate {
            http: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            https: None,
            admin: None,
            config_path,
            dir,
            child,
            logs,
            exit: None,
            guardian,
            _tmp: tmp,
        };
        let deadline = Instant::now() + LISTEN_TIMEOUT;
        loop {
            let found = Listeners::parse(&gate.logs());
            if found.satisfies(&expected) {
                gate.http = found.http.or(found.https).expect("an http(s) listener");
                gate.https = found.https;
                gate.admin = found.admin;
                return Ok(gate);
            }
            if let Ok(Some(status)) = gate.child.try_wait() {
                gate.exit = Some(status);
                // Both pipes close at exit; wait (briefly) for the last lines.
                gate.logs.wait_closed(2, Duration::from_secs(2));
                return Err(format!(
                    "fpmgate exited with {status} before listening:\n{}",
                    gate.logs().join("\n")
                ));
            }
            if Instant::now() >= deadline {
                process::stop_child(&mut gate.child, "KILL", Duration::from_secs(5));
                return Err(format!(
                    "fpmgate did not announce its listeners ({expected:?}) within \
                     {LISTEN_TIMEOUT:?}:\n{}",
                    gate.logs().join("\n")
                ));
            }
            gate.logs.wait_change(Duration::from_millis(50));
        }
    }

    /// `http://127.0.0.1:PORT{path}` (the bound IP when it is not a wildcard).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", connect_host(self.http))
    }

    /// `https://127.0.0.1:PORT{path}`; panics without an https listener.
    pub fn https_url(&self, path: &str) -> String {
        let addr = self.https.expect("config has no tls listener");
        format!("https://{}{path}", connect_host(addr))
    }

    /// `http://127.0.0.1:ADMIN_PORT{path}`; panics without an admin listener.
    pub fn admin_url(&self, path: &str) -> String {
        let addr = self.admin.expect("config has no admin listener");
        format!("http://{}{path}", connect_host(addr))
    }

    /// The text of `GET /metrics` on the admin listener.
    pub async fn metrics(&self) -> String {
        super::client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("read /metrics")
    }

    /// Every line fpmgate printed so far (stdout and stderr, ANSI codes removed).
    pub fn logs(&self) -> Vec<String> {
        self.logs
            .lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many lines so far contain `needle`.
    pub fn count_log(&self, needle: &str) -> usize {
        let lines = self.logs.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().filter(|l| l.contains(needle)).count()
    }

    /// Waits until some line (old or new) contains `needle`.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_for_log_count(needle, 1, timeout)
    }

    /// Waits until at least `count` lines contain `needle` (e.g. a second "reload").
    pub fn wait_for_log_count(&self, needle: &str, count: usize, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.count_log(needle) >= count {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            self.logs
                .wait_change((deadline - now).min(Duration::from_millis(100)));
        }
    }

    /// Atomically replaces the config file (write a temp file, then rename over it, as
    /// editors do), with the same `{dir}` substitution.
    pub fn rewrite_config(&self, yaml: &str) {
        let text = substitute_dir(yaml, &self.dir);
        let tmp = self.dir.join(".fpmgate.yaml.tmp");
        fs::write(&tmp, text).expect("write new config");
        fs::rename(&tmp, &self.config_path).expect("rename new config into place");
    }

    /// Sends a signal by name: "HUP", "TERM", "INT", ...
    pub fn signal(&self, sig: &str) {
        assert!(
            process::send_signal(self.child.id(), sig),
            "kill -s {sig} {} failed (fpmgate gone?)",
            self.child.id()
        );
    }

    /// Waits up to `timeout` for fpmgate to exit; its status, or `None` if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exit.is_none() {
            self.exit = process::wait_with_deadline(&mut self.child, timeout);
        }
        self.exit
    }

    /// fpmgate's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        if std::thread::panicking() && std::env::var_os("FPMGATE_TEST_ECHO").is_none() {
            eprintln!(
                "--- fpmgate output ({}) ---\n{}",
                self.dir.display(),
                tail(&self.logs().join("\n"), 300)
            );
        }
        if self.exit.is_none() {
            process::stop_child(&mut self.child, "KILL", Duration::from_secs(5));
        }
        self.guardian = None;
    }
}

/// `fpmgate check --config FILE` on `yaml` (with `{dir}` replaced by the file's temp dir):
/// (exit code, -1 if killed by a signal; stdout; stderr).
pub fn run_check(yaml: &str) -> (i32, String, String) {
    let tmp = tempfile::Builder::new()
        .prefix("fpmgate-check-")
        .tempdir()
        .expect("create temp dir");
    let path = tmp.path().join("fpmgate.yaml");
    fs::write(&path, substitute_dir(yaml, tmp.path())).expect("write config");
    run_check_file(&path)
}

/// `fpmgate check --config PATH` on an existing file (e.g. the shipped examples).
pub fn run_check_file(path: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fpmgate"))
        .arg("check")
        .arg("--config")
        .arg(path)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("run fpmgate check");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Captured output lines plus a change signal, shared with the reader threads.
#[derive(Default)]
struct LogBuf {
    lines: Mutex<Vec<String>>,
    /// Bumped on every new line and on each stream's EOF.
    events: Mutex<(u64, usize)>,
    changed: Condvar,
}

impl LogBuf {
    fn push(&self, line: String) {
        self.lines
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
        self.bump(false);
    }

    fn bump(&self, closed: bool) {
        let mut ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        ev.0 += 1;
        if closed {
            ev.1 += 1;
        }
        self.changed.notify_all();
    }

    /// Blocks until a new line arrives or `timeout` passes.
    fn wait_change(&self, timeout: Duration) {
        let ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let seen = ev.0;
        let _ = self
            .changed
            .wait_timeout_while(ev, timeout, |ev| ev.0 == seen);
    }

    /// Blocks until `streams` streams reached EOF or `timeout` passes.
    fn wait_closed(&self, streams: usize, timeout: Duration) {
        let ev = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let _ = self
            .changed
            .wait_timeout_while(ev, timeout, |ev| ev.1 < streams);
    }
}

fn spawn_reader(stream: impl Read + Send + 'static, logs: Arc<LogBuf>, echo: bool) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let raw = String::from_utf8_lossy(&buf);
                    let raw = raw.trim_end_matches(['\n', '\r']);
                    if echo {
                        eprintln!("[fpmgate] {raw}");
                    }
                    logs.push(strip_ansi(raw));
                }
            }
        }
        logs.bump(true);
    });
}

/// Removes ANSI escape sequences (CSI `ESC [ ... final`), in case colours are on.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, up to the final byte in '@'..='~'.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// Where a client connects for a listener: loopback for wildcard binds.
fn connect_host(addr: SocketAddr) -> String {
    let ip = match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        ip => ip,
    };
    SocketAddr::new(ip, addr.port()).to_string()
}

/// How many listeners of each kind the config declares (`None` if it does not parse:
/// then the first announced listener is enough).
#[derive(Debug)]
struct Expected(Option<(usize, usize, bool)>);

#[derive(Deserialize)]
struct ConfigProbe {
    #[serde(default)]
    listen: Vec<ListenProbe>,
    #[serde(default)]
    admin: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct ListenProbe {
    #[serde(default)]
    tls: Option<IgnoredAny>,
}

impl Expected {
    fn from_yaml(text: &str) -> Expected {
        let Ok(probe) = serde_saphyr::from_str::<ConfigProbe>(text) else {
            return Expected(None);
        };
        let https = probe.listen.iter().filter(|l| l.tls.is_some()).count();
        Expected(Some((
            probe.listen.len() - https,
            https,
            probe.admin.is_some(),
        )))
    }
}

/// Listeners announced so far, in order.
#[derive(Default)]
struct Listeners {
    http: Option<SocketAddr>,
    https: Option<SocketAddr>,
    admin: Option<SocketAddr>,
    counts: (usize, usize, usize),
}

impl Listeners {
    fn parse(lines: &[String]) -> Listeners {
        let mut found = Listeners::default();
        for line in lines {
            let Some((addr, kind)) = parse_listening(line) else {
                continue;
            };
            match kind.as_str() {
                "http" => {
                    found.http.get_or_insert(addr);
                    found.counts.0 += 1;
                }
                "https" => {
                    found.https.get_or_insert(addr);
                    found.counts.1 += 1;
                }
                "admin" => {
                    found.admin.get_or_insert(addr);
                    found.counts.2 += 1;
                }
                _ => {}
            }
        }
        found
    }

    fn satisfies(&self, expected: &Expected) -> bool {
        match expected.0 {
            Some((http, https, admin)) => {
                self.counts.0 >= http
                    && self.counts.1 >= https
                    && (!admin || self.counts.2 >= 1)
                    && self.counts.0 + self.counts.1 + self.counts.2 > 0
            }
            None => self.http.is_some() || self.https.is_some(),
        }
    }
}

/// `(addr, kind)` from a line containing `listening ... addr=IP:PORT ... kind=KIND`, in
/// text form (values possibly quoted) or JSON (`"addr":"IP:PORT"`).
fn parse_listening(line: &str) -> Option<(SocketAddr, String)> {
    if !line.contains("listening") {
        return None;
    }
    let addr = field(line, "addr")?.parse().ok()?;
    let kind = field(line, "kind")?;
    Some((addr, kind))
}

fn field(line: &str, name: &str) -> Option<String> {
    for pattern in [format!(" {name}="), format!("\"{name}\":")] {
        if let Some(start) = line.find(&pattern) {
            let rest = line[start + pattern.len()..].trim_start_matches('"');
            let end = rest
                .find(|c: char| c.is_whitespace() || c == '"' || c == ',' || c == '}')
                .unwrap_or(rest.len());
            return Some(rest[..end].to_string());
        }
    }
    // The field may open the line (no leading space).
    let prefix = format!("{name}=");
    line.strip_prefix(&prefix).map(|rest| {
        let rest = rest.trim_start_matches('"');
        rest.split(|c: char| c.is_whitespace() || c == '"')
            .next()
            .unwrap_or("")
            .to_string()
    })
}
