//! A real PHP-FPM master per test: generated conf in a fresh temp dir, loopback TCP port
//! and/or unix socket, stock Debian `php.ini` (so `cgi.fix_pathinfo` stays at PHP's default
//! of 1 and SCRIPT_NAME/PATH_INFO behave as on a stock FPM).
//!
//! It must not touch the system php-fpm service, its pool.d, or any fixed port.

use super::process::{self, Guardian};
use super::{free_port, php_root};
use std::fmt::Write as _;
use std::fs;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// How long a master may take from spawn to "ready to handle connections".
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGQUIT stop may take: in-flight requests finish first (see the conf).
const GRACEFUL_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a SIGTERM stop may take before the harness escalates to SIGKILL.
const TERM_TIMEOUT: Duration = Duration::from_secs(10);
/// Spawn attempts when another process grabbed a port between `free_port` and the bind.
const BIND_ATTEMPTS: usize = 5;

/// The php-fpm binary: `$FPMGATE_PHP_FPM`, else `php-fpm8.2` / `php-fpm` in `PATH`, else
/// the same names in `/usr/sbin` (not in a normal user's `PATH` on Debian).
pub fn php_fpm_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("FPMGATE_PHP_FPM") {
        return PathBuf::from(bin);
    }
    let names = ["php-fpm8.2", "php-fpm"];
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = std::env::split_paths(&path).collect();
    dirs.push(PathBuf::from("/usr/sbin"));
    for name in names {
        for dir in &dirs {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!("php-fpm not found: run scripts/test.sh (it installs php8.2-fpm)");
}

/// What to start. `Default`: 4 static workers, unlimited requests, TCP only, pool "www".
#[derive(Clone, Debug)]
pub struct FpmOptions {
    /// `pm = static`, `pm.max_children` (per pool; tcp+unix means two pools).
    pub workers: usize,
    /// `pm.max_requests`: a worker exits after this many requests; 0 = unlimited.
    pub max_requests: u32,
    /// Listen on `bind_ip:<port>`.
    pub tcp: bool,
    /// The TCP listener's IP. Default 127.0.0.1; any of 127.0.0.0/8 works on Linux, so
    /// several masters can share one port, as the nodes behind a DNS name do.
    pub bind_ip: IpAddr,
    /// The TCP port; `None` (default) = a free one.
    pub port: Option<u16>,
    /// Listen on a unix socket in the temp dir (mode 0666).
    pub unix: bool,
    /// Also `pm.status_listen` on a separate port: ping/status served by a dedicated
    /// worker, so they answer while the main pool is saturated.
    pub status_listen: bool,
    /// The pool name (the unix pool is `{pool_name}_unix` when both are requested).
    pub pool_name: String,
    /// `env[NAME] = "VALUE"` lines (visible to `getenv()` and `$_SERVER`).
    pub env: Vec<(String, String)>,
    /// Raw lines appended to each pool section (later lines override earlier ones).
    pub extra_ini: Vec<String>,
}

impl Default for FpmOptions {
    fn default() -> Self {
        FpmOptions {
            workers: 4,
            max_requests: 0,
            tcp: true,
            bind_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: None,
            unix: false,
            status_listen: false,
            pool_name: "www".to_string(),
            env: Vec::new(),
            extra_ini: Vec::new(),
        }
    }
}

/// A running (or stopped, restartable) PHP-FPM master.
pub struct Fpm {
    /// The TCP listener of the pool, when `tcp` was requested.
    pub tcp: Option<SocketAddr>,
    /// The unix socket path, when `unix` was requested.
    pub unix: Option<PathBuf>,
    /// The `pm.status_listen` address, when requested.
    pub status_addr: Option<SocketAddr>,
    /// The temp dir holding conf, logs, pid file and socket.
    pub dir: PathBuf,
    /// The generated php-fpm conf (kept for [`Fpm::restart`]).
    pub conf: PathBuf,
    opts: FpmOptions,
    child: Option<Child>,
    guardian: Option<Guardian>,
    last_pid: u32,
    _tmp: TempDir,
}

/// One FPM started per test binary, shared by every test in it (TCP + unix, default
/// options otherwise). Never stopped by tests; it is terminated when the binary exits.
pub fn shared_fpm() -> &'static Fpm {
    static SHARED: OnceLock<Fpm> = OnceLock::new();
    SHARED.get_or_init(|| {
        Fpm::start(FpmOptions {
            unix: true,
            ..FpmOptions::default()
        })
    })
}

impl Fpm {
    /// Generates the conf, spawns `php-fpm -F -R -y conf -p dir`, and waits until the log
    /// says "ready to handle connections" and every listener accepts. Panics (with the FPM
    /// log) on failure.
    pub fn start(opts: FpmOptions) -> Fpm {
        assert!(opts.tcp || opts.unix, "FpmOptions: enable tcp and/or unix");
        assert!(opts.workers > 0, "FpmOptions: workers must be > 0");
        let tmp = tempfile::Builder::new()
            .prefix("fpmgate-fpm-")
            .tempdir()
            .expect("create FPM temp dir");
        let dir = tmp.path().to_path_buf();
        let mut fpm = Fpm {
            tcp: None,
            unix: opts.unix.then(|| dir.join("fpm.sock")),
            status_addr: None,
            dir: dir.clone(),
            conf: dir.join("php-fpm.conf"),
            opts,
            child: None,
            guardian: None,
            last_pid: 0,
            _tmp: tmp,
        };
        let mut last_err = String::new();
        for _ in 0..BIND_ATTEMPTS {
            let (ip, port) = (fpm.opts.bind_ip, fpm.opts.port);
            fpm.tcp = fpm
                .opts
                .tcp
                .then(|| SocketAddr::new(ip, port.unwrap_or_else(free_port)));
            fpm.status_addr = fpm.opts.status_listen.then(|| loopback(free_port()));
            let text = render_conf(
                &fpm.opts,
                &dir,
                fpm.tcp,
                fpm.unix.as_deref(),
                fpm.status_addr,
            );
            fs::write(&fpm.conf, text).expect("write php-fpm conf");
            let _ = fs::remove_file(dir.join("fpm-error.log"));
            match fpm.spawn_and_wait() {
                Ok(()) => return fpm,
                Err(err) => {
                    fpm.kill_now();
                    let retry = err.contains("Address already in use");
                    last_err = err;
                    if !retry {
                        break;
                    }
                }
            }
        }
        panic!("php-fpm did not start:\n{last_err}");
    }

    /// The fpmgate `addr` for this FPM: `127.0.0.1:PORT`, or `unix:/path` without TCP.
    pub fn endpoint(&self) -> String {
        match (self.tcp, &self.unix) {
            (Some(addr), _) => addr.to_string(),
            (None, Some(_)) => self.unix_endpoint(),
            (None, None) => unreachable!("Fpm without listeners"),
        }
    }

    /// The fpmgate `addr` of the unix pool: `unix:/path/fpm.sock`. Panics without one.
    pub fn unix_endpoint(&self) -> String {
        let path = self.unix.as_ref().expect("Fpm started without unix: true");
        format!("unix:{}", path.display())
    }

    /// The TCP address; panics when started without `tcp`.
    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp.expect("Fpm started without tcp: true")
    }

    /// The master's pid (the last one, once stopped).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(self.last_pid, Child::id)
    }

    /// Whether the master is running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The pids of the master's current children (workers).
    pub fn worker_pids(&self) -> Vec<u32> {
        match &self.child {
            Some(child) => process::child_pids(child.id()),
            None => Vec::new(),
        }
    }

    /// Graceful stop (SIGQUIT): FPM stops accepting and lets in-flight requests finish
    /// (`process_control_timeout` in the conf), then exits. Waits for the exit.
    pub fn stop_graceful(&mut self) {
        self.stop("QUIT", GRACEFUL_TIMEOUT);
    }

    /// Fast stop (SIGTERM): workers are terminated at once. Waits for the exit.
    pub fn stop_term(&mut self) {
        self.stop("TERM", TERM_TIMEOUT);
    }

    /// Starts the master again with the same conf, so the same port and socket path;
    /// waits until ready. A running master is stopped (SIGTERM) first.
    pub fn restart(&mut self) {
        if self.child.is_some() {
            self.stop_term();
        }
        if let Err(err) = self.spawn_and_wait() {
            self.kill_now();
            panic!("php-fpm did not restart:\n{err}");
        }
    }

    /// The FPM error log (master notices, worker stderr via `catch_workers_output`), plus
    /// anything the master printed on its own stderr before the log was open.
    pub fn log(&self) -> String {
        let mut out = fs::read_to_string(self.dir.join("fpm-error.log")).unwrap_or_default();
        let early = fs::read_to_string(self.dir.join("fpm-stderr.log")).unwrap_or_default();
        if !early.trim().is_empty() {
            out.push_str("--- php-fpm stderr ---\n");
            out.push_str(&early);
        }
        out
    }

    fn stop(&mut self, sig: &str, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            self.last_pid = child.id();
            let workers = process::child_pids(child.id());
            process::stop_child(&mut child, sig, grace);
            reap_stray_workers(&workers);
        }
        self.guardian = None;
    }

    fn kill_now(&mut self) {
        self.stop("TERM", Duration::from_secs(5));
    }

    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log_path = self.dir.join("fpm-error.log");
        let log_offset = fs::metadata(&log_path).map(|m| m.len()).unwrap_or(0);
        let stderr = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("fpm-stderr.log"))
            .map_err(|e| format!("open fpm-stderr.log: {e}"))?;
        // -F: foreground (we own the process); -R: root may run pools as root (CI is
        // root; harmless otherwise); -p: prefix for any relative path.
        let child = Command::new(php_fpm_binary())
            .arg("-F")
            .arg("-R")
            .arg("-y")
            .arg(&self.conf)
            .arg("-p")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(
                stderr
                    .try_clone()
                    .map_err(|e| format!("dup stderr file: {e}"))?,
            ))
            .stderr(Stdio::from(stderr))
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", php_fpm_binary().display()))?;
        self.last_pid = child.id();
        self.guardian = Guardian::spawn(child.id(), Some(&self.dir));
        self.child = Some(child);
        self.wait_ready(&log_path, log_offset)
    }

    fn wait_ready(&mut self, log_path: &Path, log_offset: u64) -> Result<(), String> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let child = self.child.as_mut().expect("child just spawned");
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!("php-fpm exited with {status}\n{}", self.log()));
            }
            // The log line comes after the sockets are bound; checking it (not only that
            // the port accepts) avoids mistaking another process on a reused port for FPM.
            let ready = log_since(log_path, log_offset).contains("ready to handle connections")
                && self.tcp.is_none_or(tcp_accepts)
                && self.status_addr.is_none_or(tcp_accepts)
                && self.unix.as_deref().is_none_or(unix_accepts);
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "php-fpm not ready after {READY_TIMEOUT:?}\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Fpm {
    fn drop(&mut self) {
        if std::thread::panicking() && self.child.is_some() {
            eprintln!(
                "--- php-fpm log ({}) ---\n{}",
                self.dir.display(),
                tail(&self.log(), 200)
            );
        }
        self.kill_now();
    }
}

/// After the master is gone its workers should be too; SIGKILL any that survived (only if
/// the pid still names a php-fpm process, in case it was reused).
fn reap_stray_workers(workers: &[u32]) {
    for &pid in workers {
        if process::process_name(pid).is_some_and(|n| n.starts_with("php-fpm")) {
            process::send_signal(pid, "KILL");
        }
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn tcp_accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
}

fn unix_accepts(path: &Path) -> bool {
    path.exists() && UnixStream::connect(path).is_ok()
}

fn log_since(path: &Path, offset: u64) -> String {
    let bytes = fs::read(path).unwrap_or_default();
    let start = usize::try_from(offset).unwrap_or(0).min(bytes.len());
    String::from_utf8_lossy(&bytes[start..]).into_owned()
}

/// The last `n` lines of `text`.
pub(crate) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid of the process reading it.
    fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// The php-fpm conf: a `[global]` section and one pool per listener (FPM allows a single
/// `listen` per pool, so tcp+unix means two pools with the same settings).
fn render_conf(
    opts: &FpmOptions,
    dir: &Path,
    tcp: Option<SocketAddr>,
    unix: Option<&Path>,
    status: Option<SocketAddr>,
) -> String {
    let d = dir.display();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "; Generated by the fpmgate test harness.
[global]
pid = {d}/php-fpm.pid
error_log = {d}/fpm-error.log
log_level = notice
daemonize = no
; With the default 0 a SIGQUIT escalates to SIGTERM at once and kills in-flight requests;
; tests expect a graceful stop to let them finish.
process_control_timeout = 20s
"
    );
    let mut listens: Vec<(String, String, bool)> = Vec::new();
    if let Some(addr) = tcp {
        listens.push((opts.pool_name.clone(), addr.to_string(), false));
    }
    if let Some(path) = unix {
        let name = if tcp.is_some() {
            format!("{}_unix", opts.pool_name)
        } else {
            opts.pool_name.clone()
        };
        listens.push((name, path.display().to_string(), true));
    }
    for (i, (name, listen, is_unix)) in listens.iter().enumerate() {
        let _ = writeln!(out, "[{name}]");
        if running_as_root() {
            let _ = writeln!(out, "user = root\ngroup = root");
        }
        let _ = writeln!(out, "listen = {listen}");
        if *is_unix {
            let _ = writeln!(out, "listen.mode = 0666");
        }
        let _ = writeln!(
            out,
            "pm = static
pm.max_children = {workers}
pm.max_requests = {max_requests}
ping.path = /ping
ping.response = pong
pm.status_path = /fpm-status",
            workers = opts.workers,
            max_requests = opts.max_requests,
        );
        // One status listener for the master: two pools cannot bind the same port.
        if let (0, Some(addr)) = (i, status) {
            let _ = writeln!(out, "pm.status_listen = {addr}");
        }
        let _ = writeln!(
            out,
            "catch_workers_output = yes
decorate_workers_output = no
clear_env = no
security.limit_extensions = .php
; request_terminate_timeout is left unset (0 = off): tests own every timeout.
; error_log is left unset on purpose: PHP then sends error_log() output as FastCGI
; FCGI_STDERR records to the proxy, as on a stock Debian FPM.
php_admin_flag[log_errors] = on
php_admin_flag[display_errors] = off
; Bodies are limited by fpmgate in these tests, not by PHP (0 = no limit).
php_admin_value[post_max_size] = 0
php_admin_value[upload_max_filesize] = 1G
php_admin_value[memory_limit] = 256M
; Tests may write scripts and run them at once.
php_admin_value[opcache.revalidate_freq] = 0
env[FPMGATE_TEST_POOL] = {name}
env[FPMGATE_TEST_PHP_ROOT] = \"{root}\"",
            root = php_root().display(),
        );
        for (key, value) in &opts.env {
            let _ = writeln!(out, "env[{key}] = \"{value}\"");
        }
        for line in &opts.extra_ini {
            let _ = writeln!(out, "{line}");
        }
        out.push('\n');
    }
    out
}
