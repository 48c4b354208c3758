//! Proves the FPM half of the test harness on its own, without fpmgate: a real php-fpm
//! answers hand-written FastCGI requests over TCP and unix sockets, survives a graceful
//! stop and restart on the same addresses, and leaves no process behind.
//!
//! The FastCGI encoder here is deliberately independent of the crate's codec, so a codec
//! bug cannot hide a harness bug (or the reverse).

mod support;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};
use support::{php_root, process_alive, Fpm, FpmOptions};

const FCGI_BEGIN_REQUEST: u8 = 1;
const FCGI_END_REQUEST: u8 = 3;
const FCGI_PARAMS: u8 = 4;
const FCGI_STDIN: u8 = 5;
const FCGI_STDOUT: u8 = 6;
const FCGI_STDERR: u8 = 7;

/// One FastCGI record (version 1, request id 1, no padding).
fn record(kind: u8, content: &[u8]) -> Vec<u8> {
    let len = u16::try_from(content.len()).expect("record content fits 64 KiB");
    let mut out = vec![1, kind, 0, 1, (len >> 8) as u8, len as u8, 0, 0];
    out.extend_from_slice(content);
    out
}

/// A name-value pair length: 1 byte below 128, else 4 bytes with the top bit set.
fn nv_len(out: &mut Vec<u8>, len: usize) {
    if len < 128 {
        out.push(len as u8);
    } else {
        out.extend_from_slice(&(len as u32 | 0x8000_0000).to_be_bytes());
    }
}

/// What FPM answered: raw stdout (CGI headers + body), stderr, app status.
struct Answer {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    app_status: u32,
}

impl Answer {
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    fn body(&self) -> String {
        let text = self.stdout();
        match text.split_once("\r\n\r\n") {
            Some((_, body)) => body.to_string(),
            None => text,
        }
    }
}

/// Sends a GET with `params` (BEGIN_REQUEST, PARAMS, empty PARAMS, empty STDIN) and reads
/// records until END_REQUEST.
fn fcgi<S: Read + Write>(mut stream: S, params: &[(&str, &str)]) -> Answer {
    let mut pairs = Vec::new();
    for (name, value) in params {
        nv_len(&mut pairs, name.len());
        nv_len(&mut pairs, value.len());
        pairs.extend_from_slice(name.as_bytes());
        pairs.extend_from_slice(value.as_bytes());
    }
    // Role 1 = RESPONDER, flags 0 = close the connection after the request.
    let mut request = record(FCGI_BEGIN_REQUEST, &[0, 1, 0, 0, 0, 0, 0, 0]);
    request.extend(record(FCGI_PARAMS, &pairs));
    request.extend(record(FCGI_PARAMS, &[]));
    request.extend(record(FCGI_STDIN, &[]));
    stream.write_all(&request).expect("write FastCGI request");

    let mut answer = Answer {
        stdout: Vec::new(),
        stderr: Vec::new(),
        app_status: u32::MAX,
    };
    loop {
        let mut header = [0u8; 8];
        stream
            .read_exact(&mut header)
            .expect("read FastCGI record header (EOF before END_REQUEST?)");
        let len = usize::from(u16::from_be_bytes([header[4], header[5]]));
        let mut content = vec![0u8; len + usize::from(header[6])];
        stream.read_exact(&mut content).expect("read record body");
        content.truncate(len);
        match header[1] {
            FCGI_STDOUT => answer.stdout.extend_from_slice(&content),
            FCGI_STDERR => answer.stderr.extend_from_slice(&content),
            FCGI_END_REQUEST => {
                answer.app_status =
                    u32::from_be_bytes([content[0], content[1], content[2], content[3]]);
                return answer;
            }
            other => panic!("unexpected record type {other}"),
        }
    }
}

fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to FPM over TCP");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

fn unix(path: &Path) -> UnixStream {
    let stream = UnixStream::connect(path).expect("connect to FPM over unix socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

/// Params for FPM's own ping/status paths: FPM matches SCRIPT_NAME before any script
/// lookup, so SCRIPT_FILENAME need not exist.
fn builtin(path: &str, query: &str) -> Vec<(&'static str, String)> {
    vec![
        ("SCRIPT_NAME", path.to_string()),
        ("SCRIPT_FILENAME", format!("{}{path}", php_root().display())),
        ("REQUEST_METHOD", "GET".to_string()),
        ("QUERY_STRING", query.to_string()),
    ]
}

/// Params for a fixture script, as nginx's fastcgi_params would send them.
fn script(name: &str, query: &str) -> Vec<(&'static str, String)> {
    let root = php_root().display().to_string();
    let uri = if query.is_empty() {
        name.to_string()
    } else {
        format!("{name}?{query}")
    };
    vec![
        ("SCRIPT_NAME", name.to_string()),
        ("SCRIPT_FILENAME", format!("{root}{name}")),
        ("DOCUMENT_ROOT", root),
        ("REQUEST_METHOD", "GET".to_string()),
        ("REQUEST_URI", uri),
        ("QUERY_STRING", query.to_string()),
        ("SERVER_PROTOCOL", "HTTP/1.1".to_string()),
        ("GATEWAY_INTERFACE", "CGI/1.1".to_string()),
        ("REDIRECT_STATUS", "200".to_string()),
        ("HTTP_HOST", "smoke.test".to_string()),
    ]
}

fn as_refs<'a>(params: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    params.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn ping_tcp(addr: SocketAddr) -> Answer {
    fcgi(tcp(addr), &as_refs(&builtin("/ping", "")))
}

fn ping_unix(path: &Path) -> Answer {
    fcgi(unix(path), &as_refs(&builtin("/ping", "")))
}

fn both() -> FpmOptions {
    FpmOptions {
        unix: true,
        ..FpmOptions::default()
    }
}

#[test]
fn ping_answers_over_tcp_and_unix() {
    let fpm = Fpm::start(both());
    let addr = fpm.tcp.expect("tcp listener");
    let sock = fpm.unix.clone().expect("unix socket");
    assert_eq!(fpm.endpoint(), addr.to_string());
    assert_eq!(fpm.unix_endpoint(), format!("unix:{}", sock.display()));

    for answer in [ping_tcp(addr), ping_unix(&sock)] {
        assert!(answer.body().contains("pong"), "{}", answer.stdout());
        assert_eq!(answer.app_status, 0);
    }
}

#[test]
fn server_php_reports_cgi_params_and_pool_env() {
    let fpm = Fpm::start(FpmOptions {
        unix: true,
        pool_name: "smoke".into(),
        env: vec![("FPMGATE_SMOKE".into(), "yes please".into())],
        ..FpmOptions::default()
    });
    let params = script("/server.php", "a=1");
    let tcp_answer = fcgi(tcp(fpm.tcp_addr()), &as_refs(&params));
    let json: serde_json::Value = serde_json::from_str(&tcp_answer.body())
        .unwrap_or_else(|e| panic!("{e}: {}\n{}", tcp_answer.stdout(), fpm.log()));
    assert_eq!(json["SCRIPT_NAME"], "/server.php");
    assert_eq!(json["QUERY_STRING"], "a=1");
    assert_eq!(json["HTTP_HOST"], "smoke.test");
    assert_eq!(json["FPMGATE_SMOKE"], "yes please");
    assert_eq!(json["FPMGATE_TEST_POOL"], "smoke");

    let unix_answer = fcgi(unix(fpm.unix.as_ref().unwrap()), &as_refs(&params));
    let json: serde_json::Value = serde_json::from_str(&unix_answer.body()).unwrap();
    assert_eq!(json["FPMGATE_TEST_POOL"], "smoke_unix");
}

/// Tests rely on a stock FPM: with cgi.fix_pathinfo=1 (PHP's default) a SCRIPT_FILENAME
/// pointing past a script runs that script; `security.limit_extensions = .php` is then what
/// stops `/uploads/evil.jpg/x.php` from running a non-.php file (403 "Access denied.").
#[test]
fn fix_pathinfo_is_php_default_and_limit_extensions_holds() {
    let fpm = Fpm::start(FpmOptions::default());
    let root = php_root().display().to_string();
    let request = |path: &str| {
        let params = [
            ("SCRIPT_NAME", path.to_string()),
            ("SCRIPT_FILENAME", format!("{root}{path}")),
            ("DOCUMENT_ROOT", root.clone()),
            ("REQUEST_METHOD", "GET".to_string()),
            ("REQUEST_URI", path.to_string()),
        ];
        fcgi(tcp(fpm.tcp_addr()), &as_refs(&params))
    };

    let answer = request("/server.php/extra/path");
    let json: serde_json::Value =
        serde_json::from_str(&answer.body()).unwrap_or_else(|e| panic!("{e}: {}", answer.stdout()));
    assert_eq!(json["SCRIPT_FILENAME"], format!("{root}/server.php"));
    assert_eq!(
        json["ORIG_SCRIPT_FILENAME"],
        format!("{root}/server.php/extra/path")
    );

    let evil = request("/uploads/evil.jpg/x.php");
    assert!(
        evil.stdout().starts_with("Status: 403"),
        "{}",
        evil.stdout()
    );
    assert!(!evil.stdout().contains("EVIL EXECUTED"));
}

#[test]
fn error_log_goes_to_fastcgi_stderr_and_php_stderr_to_fpm_log() {
    let fpm = Fpm::start(FpmOptions::default());
    let answer = fcgi(tcp(fpm.tcp_addr()), &as_refs(&script("/error.php", "")));
    assert_eq!(answer.body(), "ok");
    let stderr = String::from_utf8_lossy(&answer.stderr);
    assert!(stderr.contains("fixture stderr line"), "stderr: {stderr}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fpm.log().contains("fixture php-stderr line") {
        assert!(Instant::now() < deadline, "FPM log:\n{}", fpm.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn status_listen_answers_ping_and_status() {
    let fpm = Fpm::start(FpmOptions {
        status_listen: true,
        ..FpmOptions::default()
    });
    let status = fpm.status_addr.expect("status listener");
    assert!(ping_tcp(status).body().contains("pong"));
    let answer = fcgi(tcp(status), &as_refs(&builtin("/fpm-status", "json")));
    let json: serde_json::Value =
        serde_json::from_str(&answer.body()).unwrap_or_else(|e| panic!("{e}: {}", answer.stdout()));
    assert_eq!(json["pool"], "www");
    assert_eq!(json["total processes"], 4);
}

/// Active workers in the pool, from FPM's JSON status page (the status request itself
/// occupies one of them).
fn active_processes(addr: SocketAddr) -> u64 {
    let answer = fcgi(tcp(addr), &as_refs(&builtin("/fpm-status", "json")));
    let json: serde_json::Value = serde_json::from_str(&answer.body()).unwrap();
    json["active processes"].as_u64().unwrap()
}

#[test]
fn graceful_stop_finishes_in_flight_and_restart_keeps_addresses() {
    let mut fpm = Fpm::start(both());
    let addr = fpm.tcp_addr();
    let sock = fpm.unix.clone().unwrap();
    let first_pid = fpm.pid();

    // A request in flight across the SIGQUIT must still complete. It sleeps long enough
    // for the status polls below to see it on a loaded machine (1 s was missed once).
    let in_flight = std::thread::spawn(move || {
        fcgi(tcp(addr), &as_refs(&script("/sleep.php", "ms=2500"))).body()
    });
    let deadline = Instant::now() + Duration::from_secs(10);
    while active_processes(addr) < 2 {
        assert!(Instant::now() < deadline, "sleep.php never became active");
        std::thread::sleep(Duration::from_millis(20));
    }
    fpm.stop_graceful();
    assert!(!process_alive(first_pid), "master {first_pid} still alive");
    let body = in_flight.join().unwrap();
    assert!(
        body.contains("\"slept_ms\":2500"),
        "in-flight answer: {body}"
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "port still open after stop"
    );

    fpm.restart();
    assert_ne!(fpm.pid(), first_pid);
    assert_eq!(fpm.tcp, Some(addr));
    assert_eq!(fpm.unix.as_deref(), Some(sock.as_path()));
    assert!(ping_tcp(addr).body().contains("pong"));
    assert!(ping_unix(&sock).body().contains("pong"));

    fpm.stop_term();
    assert!(TcpStream::connect(addr).is_err());
    fpm.restart();
    assert!(ping_tcp(addr).body().contains("pong"));
}

#[test]
fn drop_leaves_no_process() {
    let fpm = Fpm::start(both());
    let master = fpm.pid();
    let workers = fpm.worker_pids();
    // Two pools of 4 static workers.
    assert_eq!(workers.len(), 8, "workers: {workers:?}\n{}", fpm.log());
    let dir = fpm.dir.clone();
    drop(fpm);
    for pid in std::iter::once(master).chain(workers) {
        assert!(!process_alive(pid), "pid {pid} survived Drop");
    }
    assert!(!dir.exists(), "temp dir {} survived Drop", dir.display());
}

#[test]
fn max_requests_recycles_workers() {
    let fpm = Fpm::start(FpmOptions {
        workers: 1,
        max_requests: 2,
        ..FpmOptions::default()
    });
    let pid = || fcgi(tcp(fpm.tcp_addr()), &as_refs(&script("/pid.php", ""))).body();
    let (a, b) = (pid(), pid());
    assert_eq!(a, b, "one worker serves the first two requests");
    assert_ne!(pid(), a, "the worker was replaced after max_requests");
}
