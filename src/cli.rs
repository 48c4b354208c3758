//! Command-line interface: `fpmgate run --config PATH` (also `fpmgate --config PATH`),
//! `fpmgate check --config PATH`, `fpmgate --version`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// A load-balancing FastCGI edge proxy for PHP-FPM fleets.
#[derive(Debug, Parser)]
#[command(
    name = "fpmgate",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// What to do (default: run).
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Config file (for the default `run`).
    #[arg(short, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve with the given config.
    Run {
        /// The YAML config file.
        #[arg(short, long, value_name = "PATH")]
        config: PathBuf,
    },
    /// Validate a config: print every error with its YAML path and line:column; exit 1 on
    /// any error.
    Check {
        /// The YAML config file.
        #[arg(short, long, value_name = "PATH")]
        config: PathBuf,
    },
}
