//! The config file: YAML text → `schema` (serde mirror) → `compile` → [`Config`], the
//! ready-to-use types the rest of the proxy runs on. This module owns reading the file, the
//! one place YAML is deserialized (`parse_yaml`), and how errors are printed for
//! `fpmgate check`. It never touches the rest of the crate: a config is data, and loading
//! one (at start or on reload) has no effect until the caller swaps it in.
//!
//! Every problem is reported at once, each with its YAML path and line:column. Semantic
//! checks are collected by `compile`; schema errors (unknown keys, wrong types) stop serde
//! at the first one, so `parse_yaml` blanks the offending entry out of the text and
//! deserializes again, up to `MAX_SCHEMA_ERRORS` times.

mod compile;
mod error;
mod outline;
mod schema;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_errors;
#[cfg(test)]
mod tests_schema;
mod types;
mod units;

use std::fmt;
use std::io::Read as _;
use std::path::Path;

pub use compile::CertCheck;
pub use error::ConfigError;
pub use types::DnsConfig;
pub use types::{
    AccessLogFormat, AdminConfig, BalancePolicy, Cidr, Config, EndpointAddr, EndpointConfig,
    HealthConfig, KeepaliveConfig, Limits, ListenerConfig, PassiveConfig, PoolConfig, QueueConfig,
    RealIpHeader, RouteConfig, RouteMatch, TimeoutsConfig, TlsCertConfig, VhostConfig,
};
pub use units::{parse_duration, parse_size};

use outline::{Outline, OutlineError};
use schema::ConfigSpec;

/// Larger files are refused before parsing; a real config is a few KiB.
const MAX_CONFIG_BYTES: usize = 4 << 20;

/// Schema errors reported before giving up on finding more.
const MAX_SCHEMA_ERRORS: usize = 32;

/// Reads, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
    load_checking(path, None)
}

/// [`load`], with each TLS certificate/key pair also put through `certs`: its errors are
/// reported with the others, at the entry's line.
pub fn load_checking(path: &Path, certs: Option<CertCheck>) -> Result<Config, Vec<ConfigError>> {
    let unreadable = |e: &dyn fmt::Display| {
        vec![ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )]
    };
    let file = std::fs::File::open(path).map_err(|e| unreadable(&e))?;
    let mut bytes = Vec::new();
    // Read one byte past the cap so an oversized file is detected without reading it all.
    file.take(MAX_CONFIG_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| unreadable(&e))?;
    if bytes.len() > MAX_CONFIG_BYTES {
        return Err(unreadable(&"file is larger than 4 MiB"));
    }
    let text = String::from_utf8(bytes).map_err(|_| unreadable(&"not valid UTF-8"))?;
    parse_checking(&text, path, certs)
}

/// Parses and validates config `text`; `path` is used to resolve relative paths (against
/// its directory) and is recorded in [`Config::path`].
pub fn parse_str(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    parse_checking(text, path, None)
}

fn parse_checking(
    text: &str,
    path: &Path,
    certs: Option<CertCheck>,
) -> Result<Config, Vec<ConfigError>> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(vec![ConfigError::new("", "config is larger than 4 MiB")]);
    }
    // Editors on some platforms prepend a BOM; it is not content, and keeping it would put
    // blanking offsets and columns one character off.
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let parsed = parse_yaml(text)?;
    let mut errors = parsed.errors;
    match compile::compile(parsed.spec, path, certs) {
        Ok(config) if errors.is_empty() => return Ok(config),
        Ok(_) => {}
        // Keys that were blanked out after a schema error are absent to `compile`; drop
        // what it says about them ("missing", "no endpoints") as echoes of that error.
        Err(more) => errors.extend(
            more.into_iter()
                .filter(|e| !parsed.blanked.iter().any(|b| is_under(&e.path, b))),
        ),
    }
    if let Some(outline) = &parsed.outline {
        for e in errors.iter_mut().filter(|e| e.location.is_none()) {
            e.location = outline.locate(&e.path);
        }
    }
    errors.sort_by_key(|e| (e.location.is_none(), e.location));
    Err(errors)
}

/// Whether YAML path `path` is `prefix` or inside it.
fn is_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
}

/// What [`parse_yaml`] recovered from a document with schema errors.
struct ParsedYaml {
    /// Deserialized from the text minus the entries named in `blanked`.
    spec: ConfigSpec,
    /// One error per blanked entry.
    errors: Vec<ConfigError>,
    /// YAML paths of the entries removed to get past `errors`.
    blanked: Vec<String>,
    /// Paths and locations of the original text, when it could be outlined.
    outline: Option<Outline>,
}

/// Deserializes `text` into the schema: the only place YAML becomes `ConfigSpec`.
///
/// A syntax error, a resource-limit breach (alias bombs, nesting) or an error that cannot be
/// tied to one mapping entry is returned alone. Otherwise each schema error is recorded, the
/// entry holding it is blanked out of the text (spaces, so lines and columns of everything
/// else stay put) and deserialization runs again, until it succeeds.
fn parse_yaml(text: &str) -> Result<ParsedYaml, Vec<ConfigError>> {
    let outline = match Outline::build(text) {
        Ok(outline) => Some(outline),
        Err(OutlineError::Syntax(e)) => return Err(vec![e]),
        Err(OutlineError::Unsupported) => None,
    };
    let mut errors = Vec::new();
    let mut blanked = Vec::new();
    let mut current = text.to_string();
    let mut current_outline = None;
    loop {
        let e = match serde_saphyr::from_str_with_options::<ConfigSpec>(&current, yaml_options()) {
            Ok(spec) => {
                return Ok(ParsedYaml {
                    spec,
                    errors,
                    blanked,
                    outline,
                })
            }
            Err(e) => e,
        };
        let tree = current_outline.as_ref().or(outline.as_ref());
        let found = schema_error(&e, tree);
        errors.push(found.error);
        let next = match (found.at, tree) {
            (Some(at), Some(tree)) if !found.fatal => tree.blank_entry_at(&current, at, found.key),
            _ => None,
        };
        let Some((next, path)) = next else {
            return Err(errors);
        };
        if errors.len() >= MAX_SCHEMA_ERRORS {
            let notice = "too many errors; fix these and check again";
            errors.push(ConfigError::new("", notice));
            return Err(errors);
        }
        // The blanked text must still be well-formed YAML; if it is not (an anchor or tag
        // left behind), report what was found so far rather than a confusing follow-up.
        match Outline::build(&next) {
            Ok(o) => current_outline = Some(o),
            Err(_) => return Err(errors),
        }
        blanked.push(path);
        current = next;
    }
}

/// Parser options: limits sized for config files, which hold no legitimate alias fan-out.
fn yaml_options() -> serde_saphyr::Options {
    serde_saphyr::options! {
        budget: serde_saphyr::budget! {
            max_depth: 32,
            max_aliases: 1_000,
            max_anchors: 1_000,
            max_nodes: 200_000,
            max_events: 1_000_000,
            max_documents: 1,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: 100_000,
            max_replay_stack_depth: 16,
            max_alias_expansions_per_anchor: 1_000,
        },
        with_snippet: false,
    }
}

/// One deserialization error, classified for [`parse_yaml`].
struct SchemaError {
    /// The error with its YAML path (when the document could be outlined).
    error: ConfigError,
    /// Where the parser stopped.
    at: Option<(usize, usize)>,
    /// The error is about the mapping key at `at` (unknown or repeated), not a value.
    key: bool,
    /// A budget or alias-limit breach: retrying past it would only repeat the work.
    fatal: bool,
}

fn schema_error(e: &serde_saphyr::Error, outline: Option<&Outline>) -> SchemaError {
    use serde_saphyr::budget::BudgetBreach;
    use serde_saphyr::{Error as E, MessageFormatter as _};
    let mut inner = e.without_snippet();
    while let E::AliasError { error, .. } = inner {
        inner = error.without_snippet();
    }
    let key = matches!(
        inner,
        E::SerdeUnknownField { .. } | E::DuplicateMappingKey { .. }
    );
    let fatal = matches!(
        inner,
        E::Budget { .. }
            | E::AliasReplayCounterOverflow { .. }
            | E::AliasReplayLimitExceeded { .. }
            | E::AliasExpansionLimitExceeded { .. }
            | E::AliasReplayStackDepthExceeded { .. }
    );
    let default = serde_saphyr::DefaultMessageFormatter.format_message(inner);
    // serde-saphyr words some errors for Rust developers; say them in config terms.
    let message = match (inner, default.as_ref()) {
        (E::Budget { breach: BudgetBreach::Documents { .. }, .. }, _) => {
            "only one YAML document is allowed (remove the `---` separator)".to_string()
        }
        (E::Budget { breach, .. }, _) => format!(
            "YAML safety limit exceeded ({breach:?}): a config needs no deep nesting or alias fan-out"
        ),
        (_, "expected sequence start") => "expected a list".to_string(),
        (_, "expected mapping start") => "expected a mapping of keys to values".to_string(),
        (_, "expected string scalar") => "expected a single value, not a list or mapping".to_string(),
        (_, m) => match m.strip_prefix("invalid ") {
            Some(ty @ ("u16" | "u32" | "u64" | "usize")) => {
                format!("expected a non-negative whole number (invalid {ty})")
            }
            _ => m.to_string(),
        },
    };
    let at = e
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| (l.line() as usize, l.column() as usize));
    let path = at
        .and_then(|at| outline?.path_at(at, key))
        .unwrap_or_default();
    SchemaError {
        error: ConfigError::new(path, message).at(at),
        at,
        key,
        fatal,
    }
}

/// Renders errors for `fpmgate check`: one `file:line:col: yaml.path: message` line each
/// (location and path omitted when unknown), then `N error(s)`.
pub fn format_errors(path: &Path, errors: &[ConfigError]) -> String {
    let file = path.display();
    let mut out = String::new();
    for e in errors {
        // ConfigError's Display is `line:col: path: message`.
        if e.location.is_some() {
            out.push_str(&format!("{file}:{e}\n"));
        } else {
            out.push_str(&format!("{file}: {e}\n"));
        }
    }
    let n = errors.len();
    out.push_str(&format!("{n} error{}\n", if n == 1 { "" } else { "s" }));
    out
}
