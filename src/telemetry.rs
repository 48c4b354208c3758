//! Log output. Diagnostics go to stderr through `tracing` (filtered by `RUST_LOG`, default
//! `info`; text, or JSON lines with `FPMGATE_LOG_FORMAT=json`). The access log has its own
//! target, `fpmgate::access`, written to stdout as bare lines (combined format or JSON, as
//! the config says), so it can be collected and parsed separately.

use std::io::IsTerminal;

use tracing::{Event, Subscriber};
use tracing_subscriber::filter::{filter_fn, EnvFilter};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields};
use tracing_subscriber::prelude::*;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// The target of access-log events.
pub const ACCESS_TARGET: &str = "fpmgate::access";

/// Writes only the event's message: an access line is already formatted.
struct Bare;

impl<S, N> FormatEvent<S, N> for Bare
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

/// Installs the global subscriber. Safe to call once per process.
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var("FPMGATE_LOG_FORMAT").is_ok_and(|v| v == "json");
    let not_access = filter_fn(|m| m.target() != ACCESS_TARGET);
    let diagnostics = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .with_filter(not_access)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr)
            .with_filter(not_access)
            .boxed()
    };
    let access = tracing_subscriber::fmt::layer()
        .event_format(Bare)
        .with_writer(std::io::stdout)
        .with_filter(filter_fn(|m| m.target() == ACCESS_TARGET));
    let _ = tracing_subscriber::registry()
        .with(diagnostics.with_filter(filter))
        .with(access)
        .try_init();
}
