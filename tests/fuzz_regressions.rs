//! Replays every saved fuzz input under `fuzz/regressions/<target>/` through
//! the same checks the fuzz targets run, so inputs that once broke a property
//! keep being checked on stable Rust without a fuzzer.

mod fuzz_checks;

use std::fs;
use std::panic::{self, AssertUnwindSafe};
use std::path::Path;

fn replay(target: &str, check: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/regressions")
        .join(target);
    let mut inputs: Vec<_> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.expect("readable directory entry").path())
        .collect();
    inputs.sort();
    // An empty directory would make the test pass without checking anything.
    assert!(!inputs.is_empty(), "no saved inputs in {}", dir.display());

    // Run them all before failing, so one report names every broken input.
    let mut failed = Vec::new();
    for path in &inputs {
        let data = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        if panic::catch_unwind(AssertUnwindSafe(|| check(&data))).is_err() {
            failed.push(
                path.file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned(),
            );
        }
    }
    assert!(
        failed.is_empty(),
        "{target}: {} of {} saved inputs fail: {failed:?}",
        failed.len(),
        inputs.len()
    );
}

#[test]
fn fastcgi_decode() {
    replay("fastcgi_decode", fuzz_checks::fastcgi_decode);
}

#[test]
fn cgi_head() {
    replay("cgi_head", fuzz_checks::cgi_head);
}

#[test]
fn request_mapping() {
    replay("request_mapping", fuzz_checks::request_mapping);
}
