//! Process plumbing for the harness: signals, `/proc` probes, bounded waits, and the
//! guardian that cleans up when a test binary dies without running `Drop`.
//!
//! Signals go through `sh -c kill` (the shell builtin) because the test crate has no libc
//! dependency and minimal Debian images have no `procps` `kill` binary.

use std::io::Write;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Sends `sig` ("TERM", "QUIT", "HUP", "KILL", ...) to `pid`; false if it is gone.
pub(crate) fn send_signal(pid: u32, sig: &str) -> bool {
    Command::new("sh")
        .args([
            "-c",
            "kill -s \"$0\" \"$1\" 2>/dev/null",
            sig,
            &pid.to_string(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// True while `/proc/<pid>` exists (a zombie not yet reaped still counts).
pub fn process_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// Context switches of every thread of `pid` so far (voluntary and not), from
/// `/proc/<pid>/task/*/status`: each is a thread waking up, what a busy loop costs.
pub fn context_switches(pid: u32) -> u64 {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    let mut total = 0;
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        total += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split(':').nth(1)?.trim().parse::<u64>().ok())
            .sum::<u64>();
    }
    total
}

/// Pids whose parent is `pid` (e.g. an FPM master's workers), read from `/proc/*/stat`.
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in entries.flatten() {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if stat_ppid(child) == Some(pid) {
            out.push(child);
        }
    }
    out.sort_unstable();
    out
}

/// The parent pid and command name of `pid` from `/proc/<pid>/stat`.
fn stat_fields(pid: u32) -> Option<(u32, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let mut rest = stat.get(close + 1..)?.split_whitespace();
    let _state = rest.next()?;
    let ppid = rest.next()?.parse().ok()?;
    Some((ppid, comm))
}

fn stat_ppid(pid: u32) -> Option<u32> {
    stat_fields(pid).map(|(ppid, _)| ppid)
}

/// The command name of `pid` (`php-fpm8.2`, `fpmgate`, ...), if it still exists.
pub(crate) fn process_name(pid: u32) -> Option<String> {
    stat_fields(pid).map(|(_, comm)| comm)
}

/// Polls `child` until it exits or `timeout` passes.
pub(crate) fn wait_with_deadline(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Signals `child`, waits up to `grace`, then SIGKILLs it; always reaps it.
pub(crate) fn stop_child(child: &mut Child, sig: &str, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    send_signal(child.id(), sig);
    if let Some(status) = wait_with_deadline(child, grace) {
        return Some(status);
    }
    let _ = child.kill();
    child.wait().ok()
}

/// A `sh` process that terminates a target once the test binary is gone.
///
/// `Drop` cannot run for statics ([`super::shared_fpm`]) or after an abort, and an orphaned
/// php-fpm or fpmgate would outlive the test run. The guardian blocks reading a pipe whose
/// only write end lives in this process (std creates pipes close-on-exec), so it wakes
/// exactly when the test process exits, however it exits; then it stops the target and
/// removes its temp dir. On a normal `Drop` the guardian is killed first and does nothing.
pub(crate) struct Guardian {
    child: Child,
    stdin: Option<ChildStdin>,
}

impl Guardian {
    /// Watches `target`; `dir` (if any) is removed after the target is gone.
    pub(crate) fn spawn(target: u32, dir: Option<&Path>) -> Option<Guardian> {
        const SCRIPT: &str = r#"
read -r _ || true
kill -s TERM "$1" 2>/dev/null || true
i=0
while kill -0 "$1" 2>/dev/null && [ "$i" -lt 50 ]; do sleep 0.1; i=$((i+1)); done
kill -s KILL "$1" 2>/dev/null || true
if [ -n "$2" ]; then rm -rf -- "$2"; fi
"#;
        let dir = dir.map(|d| d.display().to_string()).unwrap_or_default();
        let mut child = Command::new("sh")
            .args([
                "-c",
                SCRIPT,
                "fpmgate-test-guardian",
                &target.to_string(),
                &dir,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let stdin = child.stdin.take();
        Some(Guardian { child, stdin })
    }
}

impl Drop for Guardian {
    fn drop(&mut self) {
        // Kill before closing the pipe, so the guardian never acts on a normal teardown.
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(mut stdin) = self.stdin.take() {
            let _ = stdin.flush();
        }
    }
}
