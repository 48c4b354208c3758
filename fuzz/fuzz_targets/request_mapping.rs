#![no_main]

// The checks live with the tests so that tests/fuzz_regressions.rs replays
// saved inputs through exactly the code fuzzed here.
#[path = "../../tests/fuzz_checks/mod.rs"]
mod fuzz_checks;

libfuzzer_sys::fuzz_target!(|data: &[u8]| fuzz_checks::request_mapping(data));
