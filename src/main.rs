//! The `fpmgate` binary: argument parsing and exit codes only.

use clap::Parser;
use fpmgate::cli::{Cli, Command};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc purges freed pages lazily, on a later allocation: a proxy that has just
/// parked thousands of idle connections (dropping their buffers) and then sees no traffic
/// would keep that memory. Purging at once costs nothing measurable here.
/// `mi_option_purge_delay` in mimalloc.h (between `eager_commit_delay`, 14, and
/// `use_numa_nodes`, 16, which libmimalloc-sys names).
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

#[cfg(feature = "mimalloc")]
fn tune_allocator() {
    // SAFETY: setting an option before the first allocation of any thread that reads it;
    // mi_option_set has no other precondition.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 0) }
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
