//! Integration-test harness shared by every `tests/*.rs` binary (`mod support;`).
//!
//! It owns real child processes: a PHP-FPM master per [`Fpm`] (generated conf in a temp
//! dir, loopback TCP port and/or unix socket) and an `fpmgate` binary per [`Gate`] (config
//! in a temp dir, ports learnt from its `listening` log lines). It never uses fixed ports,
//! the system php-fpm service, or sleeps for readiness: every wait polls with a deadline.
//!
//! Each binary uses only part of this module, hence the `dead_code` allowance.
#![allow(dead_code)]

mod fpm;
mod gate;
mod process;

// Each test binary uses a different subset of these re-exports.
#[allow(unused_imports)]
pub use fpm::{php_fpm_binary, shared_fpm, Fpm, FpmOptions};
#[allow(unused_imports)]
pub use gate::{run_check, run_check_file, Gate};
#[allow(unused_imports)]
pub use process::{child_pids, context_switches, process_alive};

use std::collections::BTreeSet;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Absolute path of the PHP fixtures (`tests/php`), the document root tests give FPM.
pub fn php_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests")
        .join("php")
}

/// A loopback TCP port that was free a moment ago (bind `127.0.0.1:0`, read, drop).
///
/// Ports already handed out by this process are never handed out again, so tests running
/// in parallel threads cannot be given the same port; a collision with another process is
/// still possible, which is why [`Fpm::start`] retries on "Address already in use".
pub fn free_port() -> u16 {
    static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if HANDED_OUT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(port)
        {
            return port;
        }
    }
}

/// The HTTP client tests use: no proxy (CI may export `http_proxy`), HTTP/1.1 only, 30 s
/// timeout, redirects not followed (tests assert on the 3xx itself).
pub fn client() -> reqwest::Client {
    client_builder().build().expect("build reqwest client")
}

/// The builder behind [`client`], for tests that need to add TLS roots, `resolve` or
/// HTTP/2 (`.http2_prior_knowledge()` replaces the HTTP/1-only preference).
pub fn client_builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .no_proxy()
        .http1_only()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
}

/// Replaces the `{dir}` placeholder of a test config with the given directory.
fn substitute_dir(text: &str, dir: &std::path::Path) -> String {
    text.replace("{dir}", &dir.display().to_string())
}
