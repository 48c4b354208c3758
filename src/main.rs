//! The `fpmgate` binary: argument parsing and exit codes only.

use clap::Parser;
use fpmgate::cli::{Cli, Command};

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
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
