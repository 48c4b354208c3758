//! The config file: YAML text → `schema` (serde mirror) → `compile` → [`Config`], the
//! ready-to-use types the rest of the proxy runs on. This module owns reading the file, the
//! one place YAML is deserialized ([`parse_yaml`]), and how errors are printed for
//! `fpmgate check`. It never touches the rest of the crate: a config is data, and loading
//! one (at start or on reload) has no effect until the caller swaps it in.
//!
//! Every problem is reported at once, each with its YAML path and line:column. Semantic
//! checks are collected by `compile`; schema errors (unknown keys, wrong types) stop serde
//! at the first one, so `parse_yaml` blanks the offending entry out of the text and
//! deserializes again, up to [`MAX_SCHEMA_ERRORS`] times.

mod compile;
mod error;
mod outline;
mod schema;
#[cfg(test)]
mod tests;
mod units;

use std::fmt;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use error::ConfigError;
pub use units::{parse_duration, parse_size};

use outline::{Outline, OutlineError};
use schema::ConfigSpec;

/// Larger files are refused before parsing; a real config is a few KiB.
const MAX_CONFIG_BYTES: usize = 4 << 20;

/// Schema errors reported before giving up on finding more.
const MAX_SCHEMA_ERRORS: usize = 32;

/// A validated configuration. Durations, sizes, addresses and regexes are parsed, defaults
/// applied, relative paths resolved against the config file's directory.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file this was loaded from (as given).
    pub path: PathBuf,
    /// Client listeners, at least one.
    pub listeners: Vec<ListenerConfig>,
    /// Admin listener, if configured.
    pub admin: Option<AdminConfig>,
    /// Pools in file order; names are unique.
    pub pools: Vec<PoolConfig>,
    /// Vhosts in file order; host names are unique across them.
    pub vhosts: Vec<VhostConfig>,
    /// Client-side limits.
    pub limits: Limits,
    /// Time in-flight requests get to finish on SIGTERM.
    pub shutdown_grace: Duration,
    /// Runtime worker threads; `None` = one per CPU core.
    pub workers: Option<usize>,
}

/// One client listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Certificates (first = default for clients without SNI); empty = plaintext.
    pub tls: Vec<TlsCertConfig>,
}

/// A certificate/key pair; both files existed and were readable at load time.
#[derive(Debug, Clone)]
pub struct TlsCertConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// The admin listener.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Bearer token required on POST endpoints, if set.
    pub token: Option<String>,
}

/// A balancer group of FPM endpoints.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Name from the config; the `pool` metric label.
    pub name: String,
    /// At least one; addresses unique within the pool.
    pub endpoints: Vec<EndpointConfig>,
    /// How requests are spread over endpoints.
    pub balance: BalancePolicy,
    /// Idle connection reuse.
    pub keepalive: KeepaliveConfig,
    /// Upstream timeouts.
    pub timeouts: TimeoutsConfig,
    /// Wait queue.
    pub queue: QueueConfig,
    /// Extra attempts on another endpoint, where FPM cannot have run the script.
    pub retries: u32,
    /// `Retry-After` seconds on this pool's 503s.
    pub retry_after: u32,
    /// Active ping checks; `None` = endpoints are healthy unless passively ejected.
    pub health: Option<HealthConfig>,
    /// Passive ejection on request failures.
    pub passive: PassiveConfig,
    /// FPM `pm.status_path` to scrape, if set.
    pub status: Option<String>,
    /// Extra FastCGI params, in file order.
    pub params: Vec<(String, String)>,
}

/// One FPM endpoint.
#[derive(Debug, Clone)]
pub struct EndpointConfig {
    /// Where to connect.
    pub addr: EndpointAddr,
    /// Relative share of traffic, ≥ 1.
    pub weight: u32,
    /// Connections (busy + idle) this proxy may hold, ≥ 1.
    pub max_conns: usize,
}

/// Where an FPM endpoint listens. `Display` gives the canonical form (`127.0.0.1:9000`,
/// `[::1]:9000`, `unix:/run/php/x.sock`), used as the endpoint's key and metric label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path (absolute).
    Unix(PathBuf),
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddr::Tcp(addr) => write!(f, "{addr}"),
            EndpointAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// Endpoint selection policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BalancePolicy {
    /// Weighted round robin.
    RoundRobin,
    /// Fewest in-flight requests relative to weight.
    LeastConn,
    /// Power of two random choices.
    P2c,
    /// Sticky by client IP.
    HashClientIp,
    /// Sticky by the value of this cookie.
    HashCookie(String),
}

/// Idle upstream connection reuse.
#[derive(Debug, Clone)]
pub struct KeepaliveConfig {
    /// Idle connections kept per endpoint (0 = no reuse); ≤ every endpoint's `max_conns`.
    pub max_idle: usize,
    /// Idle connections close after this.
    pub idle_timeout: Duration,
}

/// Upstream timeouts, all non-zero.
#[derive(Debug, Clone)]
pub struct TimeoutsConfig {
    /// Connecting to an endpoint.
    pub connect: Duration,
    /// Longest FPM silence (before the first byte and between reads).
    pub read: Duration,
    /// Longest a write to FPM may block.
    pub send: Duration,
}

/// The pool's wait queue.
#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Waiting requests allowed; 0 = none (503 at once when at capacity).
    pub size: usize,
    /// Longest wait before a 503.
    pub timeout: Duration,
}

/// Active FastCGI ping checks.
#[derive(Debug, Clone)]
pub struct HealthConfig {
    /// FPM's `ping.path`.
    pub ping: String,
    /// Expected body (FPM's `ping.response`).
    pub expect: String,
    /// Ping this port on a TCP endpoint's host instead of the endpoint's own port.
    pub addr_port: Option<u16>,
    /// Time between pings.
    pub interval: Duration,
    /// Ping timeout.
    pub timeout: Duration,
    /// Consecutive successes before down → up (0 = at once).
    pub rise: u32,
    /// Consecutive failures before up → down (≥ 1).
    pub fall: u32,
}

/// Passive ejection: `fails` request failures within `window` eject an endpoint for `eject`.
#[derive(Debug, Clone)]
pub struct PassiveConfig {
    /// Failures that eject; 0 = passive ejection off.
    pub fails: u32,
    /// Counting window.
    pub window: Duration,
    /// Ejection time.
    pub eject: Duration,
}

/// A virtual host.
#[derive(Debug, Clone)]
pub struct VhostConfig {
    /// Lowercased: exact names, `*.suffix` wildcards, or `*` (the default vhost).
    pub hosts: Vec<String>,
    /// Absolute document root on the FPM nodes; no trailing slash except `/` itself.
    pub root: String,
    /// Pool for requests no route claims (a defined pool).
    pub pool: String,
    /// Front controller file name (`index.php`), if set.
    pub index: Option<String>,
    /// Local copy of the document tree (an existing directory), if set.
    pub static_dir: Option<PathBuf>,
    /// Routes, first match wins.
    pub routes: Vec<RouteConfig>,
}

/// A route: requests whose path matches go to `pool`.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// What to match the normalised path against.
    pub matcher: RouteMatch,
    /// A defined pool.
    pub pool: String,
}

/// A route's path matcher.
#[derive(Debug, Clone)]
pub enum RouteMatch {
    /// The path starts with this.
    Prefix(String),
    /// The regex matches the path.
    Regex(regex::Regex),
}

/// Client-side limits (all non-zero).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest request body (→ 413).
    pub max_body: u64,
    /// Bodies past this many bytes spill to a temp file.
    pub body_buffer: usize,
    /// Largest request head (→ 431).
    pub max_header_bytes: usize,
    /// Longest request URI (→ 414).
    pub max_uri: usize,
    /// Largest FPM response head (→ 502).
    pub max_response_header: usize,
    /// Time to receive a whole request head.
    pub header_timeout: Duration,
    /// Idle keep-alive client connections close after this.
    pub idle_timeout: Duration,
    /// Longest client silence while sending a body.
    pub body_timeout: Duration,
    /// Concurrent client connections.
    pub max_connections: usize,
}

impl Config {
    /// One line for `fpmgate check`: `ok: 2 listeners, 2 pools (3 endpoints), 2 vhosts`.
    pub fn summary(&self) -> String {
        let endpoints: usize = self.pools.iter().map(|p| p.endpoints.len()).sum();
        format!(
            "ok: {}, {} ({}), {}",
            count(self.listeners.len(), "listener"),
            count(self.pools.len(), "pool"),
            count(endpoints, "endpoint"),
            count(self.vhosts.len(), "vhost"),
        )
    }
}

fn count(n: usize, noun: &str) -> String {
    if n == 1 {
        format!("1 {noun}")
    } else {
        format!("{n} {noun}s")
    }
}

/// Reads, parses and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, Vec<ConfigError>> {
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
    parse_str(&text, path)
}

/// Parses and validates config `text`; `path` is used to resolve relative paths (against
/// its directory) and is recorded in [`Config::path`].
pub fn parse_str(text: &str, path: &Path) -> Result<Config, Vec<ConfigError>> {
    if text.len() > MAX_CONFIG_BYTES {
        return Err(vec![ConfigError::new("", "config is larger than 4 MiB")]);
    }
    let parsed = parse_yaml(text)?;
    let mut errors = parsed.errors;
    match compile::compile(parsed.spec, path) {
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
        let (error, at) = schema_error(&e, tree);
        errors.push(error);
        let fatal = is_resource_limit(&e) || errors.len() >= MAX_SCHEMA_ERRORS;
        let next = match (at, tree) {
            (Some(at), Some(tree)) if !fatal => tree.blank_entry_at(&current, at),
            _ => None,
        };
        let Some((next, path)) = next else {
            return Err(errors);
        };
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

/// Budget and alias-limit breaches: retrying past them would only repeat the work.
fn is_resource_limit(e: &serde_saphyr::Error) -> bool {
    use serde_saphyr::Error as E;
    let mut e = e.without_snippet();
    while let E::AliasError { error, .. } = e {
        e = error.without_snippet();
    }
    matches!(
        e,
        E::Budget { .. }
            | E::AliasReplayCounterOverflow { .. }
            | E::AliasReplayLimitExceeded { .. }
            | E::AliasExpansionLimitExceeded { .. }
            | E::AliasReplayStackDepthExceeded { .. }
    )
}

/// A serde-saphyr error as a `ConfigError` (path from the outline), plus its position.
fn schema_error(
    e: &serde_saphyr::Error,
    outline: Option<&Outline>,
) -> (ConfigError, Option<(usize, usize)>) {
    use serde_saphyr::MessageFormatter as _;
    let message = serde_saphyr::DefaultMessageFormatter.format_message(e.without_snippet());
    let message = match message.strip_prefix("invalid ") {
        Some(ty @ ("u16" | "u32" | "u64" | "usize")) => {
            format!("expected a non-negative whole number (invalid {ty})")
        }
        _ => message.into_owned(),
    };
    let at = e
        .location()
        .filter(|l| l.line() > 0)
        .map(|l| (l.line() as usize, l.column() as usize));
    let path = at
        .and_then(|at| outline?.path_at(at))
        .unwrap_or_default()
        .to_string();
    (ConfigError::new(path, message).at(at), at)
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
