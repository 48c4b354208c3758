//! The `fpmgate` binary: argument parsing and exit codes only.

use clap::Parser;
use fpmgate::cli::{Cli, Command};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Gives freed memory back to the kernel at once instead of after mimalloc's purge delay
/// (1 s, and only when the allocator runs again). When thousands of kept-alive clients go
/// quiet together, their connections park and free their HTTP state, then nothing
/// allocates: with the delay that memory would stay resident. Measured on the load test's
/// 5,000 idle clients: 5.7 → 1.9 KiB of RSS per connection, with no change in throughput.
/// `MIMALLOC_PURGE_DELAY` in the environment still wins.
#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    // `mi_option_purge_delay` in mimalloc's option enum (not exported by the bindings).
    const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
    // SAFETY: sets a process-wide option default; no pointers, callable at any time.
    unsafe { libmimalloc_sys::mi_option_set_default(MI_OPTION_PURGE_DELAY, 0) };
}

#[cfg(not(feature = "mimalloc"))]
fn tune_allocator() {}

fn main() {
    tune_allocator();
    let cli = Cli::parse();
    let code = match (cli.command, cli.config) {
        (Some(Command::Check { config }), _) => match fpmgate::app::load_config(&config) {
            Ok(cfg) => {
                println!("{}: {}", config.display(), cfg.summary());
                0
            }
            Err(errors) => {
                eprint!("{errors}");
                1
            }
        },
        (Some(Command::Run { config }), _) | (None, Some(config)) => {
            fpmgate::telemetry::init();
            match fpmgate::app::run(config) {
                Ok(()) => 0,
                Err(e) => {
                    eprintln!("fpmgate: {e:#}");
                    1
                }
            }
        }
        (None, None) => {
            eprintln!("fpmgate: missing --config PATH (try `fpmgate --help`)");
            2
        }
    };
    std::process::exit(code);
}
