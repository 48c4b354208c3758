//! `ConfigSpec` → [`Config`]: applies defaults, parses durations, sizes, addresses and
//! regexes, resolves relative paths against the config file's directory, checks cross
//! references and file readability. Every problem is collected, never just the first, and
//! each names its YAML path (and line:column when the spec carries a `Spanned` location;
//! the caller fills in the rest from the document outline).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_saphyr::Spanned;

use super::error::ConfigError;
use super::schema::{ConfigSpec, LimitsSpec, ListenSpec, RouteSpec, Text, VhostSpec};
use super::units::{parse_duration, parse_size};
use super::{AdminConfig, Config, Limits, ListenerConfig, RouteConfig, RouteMatch, TlsCertConfig};
use super::{EndpointAddr, VhostConfig};

mod pool;

/// Compiled regexes are capped so a route cannot make every request expensive.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// Builds the runtime config from the schema, or returns every error found.
pub fn compile(spec: ConfigSpec, path: &Path) -> Result<Config, Vec<ConfigError>> {
    let base = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut cx = Ctx {
        errors: Vec::new(),
        base,
    };

    let listeners = cx.listeners(spec.listen.unwrap_or_default());
    let admin = spec.admin.and_then(|a| {
        let bind = cx.required(&a.bind, "admin.bind")?;
        let bind = cx.socket_addr(bind, "admin.bind")?;
        Some((bind, a.token.map(|t| t.value)))
    });
    let mut binds: Vec<(String, &Text, SocketAddr)> = Vec::new();
    for (i, l) in listeners.iter().enumerate() {
        binds.push((format!("listen[{i}].bind"), &l.0, l.1.bind));
    }
    cx.check_bind_conflicts(&binds, admin.as_ref().map(|a| a.0));
    let listeners = listeners.iter().map(|l| l.1.clone()).collect();
    let admin = admin.map(|(bind, token)| AdminConfig { bind, token });

    let pools = pool::compile_pools(&mut cx, spec.pools.unwrap_or_default().0);
    let names: Vec<&str> = pools.iter().map(|p| p.name.as_str()).collect();
    let vhosts = cx.vhosts(spec.vhosts.unwrap_or_default(), &names);
    let limits = cx.limits(spec.limits);
    let shutdown_grace = cx.duration(&spec.shutdown_grace, "shutdown_grace", 30, false);
    let workers = spec.workers.and_then(|w| {
        if w.value == 0 {
            cx.err(
                "workers",
                loc(&w),
                "workers must be at least 1 (omit it for one per CPU core)",
            );
        }
        Some(w.value).filter(|&n| n > 0)
    });

    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    Ok(Config {
        path: path.to_path_buf(),
        listeners,
        admin,
        pools,
        vhosts,
        limits,
        shutdown_grace,
        workers,
    })
}

/// 1-based `(line, column)` of a spanned value; `None` when the parser did not record one.
pub(super) fn loc<T>(s: &Spanned<T>) -> Option<(usize, usize)> {
    let l = s.referenced;
    (l.line() > 0).then(|| (l.line() as usize, l.column() as usize))
}

/// Error sink plus the directory relative paths are resolved against.
pub(super) struct Ctx {
    pub(super) errors: Vec<ConfigError>,
    base: PathBuf,
}

impl Ctx {
    pub(super) fn err(
        &mut self,
        path: &str,
        at: Option<(usize, usize)>,
        message: impl Into<String>,
    ) {
        self.errors.push(ConfigError::new(path, message).at(at));
    }

    /// The value of a required key, or an error naming it (located later from the outline).
    pub(super) fn required<'v, T>(&mut self, v: &'v Option<T>, path: &str) -> Option<&'v T> {
        if v.is_none() {
            let key = path.rsplit('.').next().unwrap_or(path);
            self.err(path, None, format!("missing required key `{key}`"));
        }
        v.as_ref()
    }

    /// Parses an optional duration, `default_secs` when absent (or invalid, after recording
    /// the error, so later checks still run). `nonzero` rejects `0s`.
    pub(super) fn duration(
        &mut self,
        v: &Option<Text>,
        path: &str,
        default_secs: u64,
        nonzero: bool,
    ) -> Duration {
        self.duration_or(v, path, Duration::from_secs(default_secs), nonzero)
    }

    pub(super) fn duration_or(
        &mut self,
        v: &Option<Text>,
        path: &str,
        default: Duration,
        nonzero: bool,
    ) -> Duration {
        let Some(t) = v else { return default };
        match parse_duration(&t.value) {
            Ok(d) if nonzero && d.is_zero() => {
                self.err(path, loc(t), "must be greater than zero");
                default
            }
            Ok(d) => d,
            Err(e) => {
                self.err(path, loc(t), e);
                default
            }
        }
    }

    /// Parses an optional non-zero size, `default` when absent or invalid.
    fn size(&mut self, v: &Option<Text>, path: &str, default: u64) -> u64 {
        let Some(t) = v else { return default };
        match parse_size(&t.value) {
            Ok(0) => self.err(path, loc(t), "must be greater than zero"),
            Ok(n) => return n,
            Err(e) => self.err(path, loc(t), e),
        }
        default
    }

    fn usize_size(&mut self, v: &Option<Text>, path: &str, default: usize) -> usize {
        let n = self.size(v, path, default as u64);
        usize::try_from(n).unwrap_or_else(|_| {
            self.err(
                path,
                v.as_ref().and_then(loc),
                "too large for this platform",
            );
            default
        })
    }

    /// `path` as written, or joined to the config file's directory when relative.
    pub(super) fn resolve(&self, path: &str) -> PathBuf {
        let joined = self.base.join(path);
        std::path::absolute(&joined).unwrap_or(joined)
    }

    fn socket_addr(&mut self, t: &Text, path: &str) -> Option<SocketAddr> {
        parse_socket_addr(&t.value, false)
            .map_err(|e| self.err(path, loc(t), e))
            .ok()
    }

    fn listeners(&mut self, specs: Vec<ListenSpec>) -> Vec<(Text, ListenerConfig)> {
        if specs.is_empty() {
            self.err(
                "listen",
                None,
                "at least one listener is required, e.g. `listen: [{ bind: 0.0.0.0:8080 }]`",
            );
        }
        let mut out = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let p = format!("listen[{i}]");
            let mut tls = Vec::new();
            for (j, cert) in spec.tls.unwrap_or_default().into_iter().enumerate() {
                let cp = format!("{p}.tls[{j}]");
                let c = self.required(&cert.cert, &format!("{cp}.cert")).cloned();
                let k = self.required(&cert.key, &format!("{cp}.key")).cloned();
                let c =
                    c.and_then(|c| self.readable_file(&c, &format!("{cp}.cert"), "certificate"));
                let k = k.and_then(|k| self.readable_file(&k, &format!("{cp}.key"), "key"));
                if let (Some(cert), Some(key)) = (c, k) {
                    tls.push(TlsCertConfig { cert, key });
                }
            }
            let bind_path = format!("{p}.bind");
            let Some(text) = self.required(&spec.bind, &bind_path).cloned() else {
                continue;
            };
            if let Some(bind) = self.socket_addr(&text, &bind_path) {
                out.push((text, ListenerConfig { bind, tls }));
            }
        }
        out
    }

    /// Resolves a file path and checks that it can be opened for reading.
    fn readable_file(&mut self, t: &Text, path: &str, what: &str) -> Option<PathBuf> {
        let file = self.resolve(&t.value);
        let problem = match std::fs::File::open(&file).and_then(|f| f.metadata()) {
            Ok(m) if m.is_file() => return Some(file),
            Ok(_) => "not a regular file".to_string(),
            Err(e) => e.to_string(),
        };
        self.err(
            path,
            loc(t),
            format!("cannot read {what} file {}: {problem}", file.display()),
        );
        None
    }

    /// Two sockets cannot bind the same port when their IPs are equal or one is the
    /// wildcard of the same family. Port 0 (any free port) never conflicts.
    fn check_bind_conflicts(
        &mut self,
        listeners: &[(String, &Text, SocketAddr)],
        admin: Option<SocketAddr>,
    ) {
        let clash = |a: SocketAddr, b: SocketAddr| {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip()
                    || (a.is_ipv4() == b.is_ipv4()
                        && (a.ip().is_unspecified() || b.ip().is_unspecified())))
        };
        for (i, (path, text, addr)) in listeners.iter().enumerate() {
            if let Some((other, ..)) = listeners[..i].iter().find(|(_, _, o)| clash(*o, *addr)) {
                self.err(
                    path,
                    loc(text),
                    format!("`{addr}` is already bound by {other}"),
                );
            }
        }
        if let Some(admin) = admin {
            if let Some((other, ..)) = listeners.iter().find(|(_, _, o)| clash(*o, admin)) {
                self.err(
                    "admin.bind",
                    None,
                    format!("`{admin}` is already bound by {other}"),
                );
            }
        }
    }

    fn vhosts(&mut self, specs: Vec<VhostSpec>, pools: &[&str]) -> Vec<VhostConfig> {
        if specs.is_empty() {
            self.err(
                "vhosts",
                None,
                "at least one vhost is required (`hosts: [\"*\"]` is the default vhost)",
            );
        }
        let mut seen: HashMap<String, String> = HashMap::new();
        let mut out = Vec::new();
        for (i, spec) in specs.into_iter().enumerate() {
            let p = format!("vhosts[{i}]");
            let mut hosts = Vec::new();
            let host_specs = spec.hosts.clone().unwrap_or_default();
            if host_specs.is_empty() {
                self.err(
                    &format!("{p}.hosts"),
                    None,
                    "at least one host name is required (`\"*\"` matches any)",
                );
            }
            for (j, h) in host_specs.iter().enumerate() {
                let hp = format!("{p}.hosts[{j}]");
                match check_host(&h.value) {
                    Err(e) => self.err(&hp, loc(h), e),
                    Ok(host) => match seen.get(&host) {
                        Some(first) => self.err(
                            &hp,
                            loc(h),
                            format!("host `{host}` is already used by {first}"),
                        ),
                        None => {
                            seen.insert(host.clone(), hp);
                            hosts.push(host);
                        }
                    },
                }
            }
            let root = self.required(&spec.root, &format!("{p}.root")).cloned();
            let root = root.and_then(|r| match check_root(&r.value) {
                Ok(root) => Some(root),
                Err(e) => {
                    self.err(&format!("{p}.root"), loc(&r), e);
                    None
                }
            });
            let pool = self.pool_ref(&spec.pool, &format!("{p}.pool"), pools);
            let index = spec.index.as_ref().and_then(|t| {
                let ok = !t.value.contains('/') && t.value.len() > 4 && t.value.ends_with(".php");
                if !ok {
                    self.err(
                        &format!("{p}.index"),
                        loc(t),
                        "index must be a file name ending in `.php`, e.g. `index.php`",
                    );
                }
                ok.then(|| t.value.clone())
            });
            let static_dir = spec
                .static_dir
                .as_ref()
                .and_then(|t| self.static_dir(t, &format!("{p}.static")));
            let routes = self.routes(spec.routes.unwrap_or_default(), &p, pools);
            if let (Some(root), Some(pool)) = (root, pool) {
                out.push(VhostConfig {
                    hosts,
                    root,
                    pool,
                    index,
                    static_dir,
                    routes,
                });
            }
        }
        out
    }

    /// A reference to a pool by name: required, and defined.
    fn pool_ref(&mut self, v: &Option<Text>, path: &str, pools: &[&str]) -> Option<String> {
        let t = self.required(v, path)?;
        if pools.contains(&t.value.as_str()) {
            return Some(t.value.clone());
        }
        let defined = if pools.is_empty() {
            "none".to_string()
        } else {
            pools.join(", ")
        };
        let message = format!("undefined pool `{}` (defined: {defined})", t.value);
        self.err(path, loc(t), message);
        None
    }

    fn static_dir(&mut self, t: &Text, path: &str) -> Option<PathBuf> {
        let dir = self.resolve(&t.value);
        let problem = match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => return Some(dir),
            Ok(_) => "is not a directory".to_string(),
            Err(e) => format!("cannot be read: {e}"),
        };
        self.err(
            path,
            loc(t),
            format!("static directory {} {problem}", dir.display()),
        );
        None
    }

    fn routes(&mut self, specs: Vec<RouteSpec>, vhost: &str, pools: &[&str]) -> Vec<RouteConfig> {
        let mut out = Vec::new();
        for (i, r) in specs.into_iter().enumerate() {
            let p = format!("{vhost}.routes[{i}]");
            let matcher = match (&r.path, &r.regex) {
                (Some(t), None) if t.value.starts_with('/') => {
                    Some(RouteMatch::Prefix(t.value.clone()))
                }
                (Some(t), None) => {
                    self.err(
                        &format!("{p}.path"),
                        loc(t),
                        "a route path must start with `/`",
                    );
                    None
                }
                (None, Some(t)) => match regex::RegexBuilder::new(&t.value)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .build()
                {
                    Ok(re) => Some(RouteMatch::Regex(re)),
                    Err(e) => {
                        let msg = e
                            .to_string()
                            .split_whitespace()
                            .collect::<Vec<_>>()
                            .join(" ");
                        self.err(
                            &format!("{p}.regex"),
                            loc(t),
                            format!("invalid regex: {msg}"),
                        );
                        None
                    }
                },
                _ => {
                    self.err(
                        &p,
                        None,
                        "a route needs exactly one of `path` (prefix) or `regex`",
                    );
                    None
                }
            };
            let pool = self.pool_ref(&r.pool, &format!("{p}.pool"), pools);
            if let (Some(matcher), Some(pool)) = (matcher, pool) {
                out.push(RouteConfig { matcher, pool });
            }
        }
        out
    }

    fn limits(&mut self, spec: Option<LimitsSpec>) -> Limits {
        let s = spec.unwrap_or(LimitsSpec {
            max_body: None,
            body_buffer: None,
            max_header_bytes: None,
            max_uri: None,
            max_response_header: None,
            header_timeout: None,
            idle_timeout: None,
            body_timeout: None,
            max_connections: None,
        });
        let max_connections = match &s.max_connections {
            Some(n) if n.value == 0 => {
                self.err(
                    "limits.max_connections",
                    loc(n),
                    "must be greater than zero",
                );
                10_000
            }
            Some(n) => n.value,
            None => 10_000,
        };
        Limits {
            max_body: self.size(&s.max_body, "limits.max_body", 100 << 20),
            body_buffer: self.usize_size(&s.body_buffer, "limits.body_buffer", 1 << 20),
            max_header_bytes: self.usize_size(
                &s.max_header_bytes,
                "limits.max_header_bytes",
                64 << 10,
            ),
            max_uri: self.usize_size(&s.max_uri, "limits.max_uri", 8 << 10),
            max_response_header: self.usize_size(
                &s.max_response_header,
                "limits.max_response_header",
                64 << 10,
            ),
            header_timeout: self.duration(&s.header_timeout, "limits.header_timeout", 10, true),
            idle_timeout: self.duration(&s.idle_timeout, "limits.idle_timeout", 60, true),
            body_timeout: self.duration(&s.body_timeout, "limits.body_timeout", 60, true),
            max_connections,
        }
    }
}

/// `IP:PORT`, `[IPv6]:PORT` or `localhost:PORT` (always 127.0.0.1: resolving names at load
/// time would pin whatever DNS said once). `dns_hint` adds where DNS-named endpoints will go.
pub(super) fn parse_socket_addr(text: &str, dns_hint: bool) -> Result<SocketAddr, String> {
    let text = text.trim();
    if let Ok(addr) = text.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Some(port) = text.strip_prefix("localhost:") {
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("invalid port in `{text}`"))?;
        return Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port));
    }
    if text.parse::<IpAddr>().is_ok() || text.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
        return Err(format!(
            "`{text}` has no port; write `IP:PORT` (`[IPv6]:PORT` for IPv6)"
        ));
    }
    match text.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {
            let hint = if dns_hint {
                " (DNS discovery is `dns:NAME:PORT`)"
            } else {
                ""
            };
            Err(format!(
                "`{host}` is not an IP address; use an IP address{hint}"
            ))
        }
        _ => Err(format!("invalid address `{text}`; expected `IP:PORT`")),
    }
}

/// Lowercases and checks a vhost host name: `*`, `*.suffix`, a DNS name or an IP literal.
fn check_host(raw: &str) -> Result<String, String> {
    let host = raw.trim().to_ascii_lowercase();
    if host == "*" {
        return Ok(host);
    }
    let name = host.strip_prefix("*.").unwrap_or(&host);
    if name.is_empty() {
        return Err("empty host name".into());
    }
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return match v6.parse::<std::net::Ipv6Addr>() {
            Ok(_) if name.len() == host.len() => Ok(host),
            _ => Err(format!("invalid IPv6 host `{raw}`")),
        };
    }
    if name.contains('*') {
        return Err(format!(
            "invalid host `{raw}`: a wildcard is `*` or a leading `*.` only"
        ));
    }
    if name.contains(':') {
        return Err(format!(
            "invalid host `{raw}`: host names carry no port (the port is the listener's)"
        ));
    }
    if !name.is_ascii() {
        return Err(format!(
            "invalid host `{raw}`: write internationalised names in their `xn--` form"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_')))
    {
        return Err(format!("invalid host `{raw}`: unexpected character {c:?}"));
    }
    Ok(host)
}

/// Document roots are absolute paths on the FPM side; trailing slashes are dropped so
/// `root + SCRIPT_NAME` never doubles one.
fn check_root(raw: &str) -> Result<String, String> {
    if !raw.starts_with('/') {
        return Err(format!(
            "root must be an absolute path (as seen by the FPM nodes), got `{raw}`"
        ));
    }
    if raw.split('/').any(|seg| seg == "..") || raw.contains('\0') {
        return Err(format!(
            "root must not contain `..` segments or NUL: `{raw}`"
        ));
    }
    let trimmed = raw.trim_end_matches('/');
    Ok(if trimmed.is_empty() {
        "/".to_string()
    } else {
        trimmed.to_string()
    })
}

/// Names used to build per-pool error paths; kept here so both halves agree.
pub(super) fn pool_path(name: &str, rest: &str) -> String {
    if rest.is_empty() {
        format!("pools.{name}")
    } else {
        format!("pools.{name}.{rest}")
    }
}

/// Whether any two endpoint addresses repeat; returns (index of first, index of repeat).
pub(super) fn first_duplicate(addrs: &[(usize, EndpointAddr)]) -> Vec<(usize, usize)> {
    let mut seen: HashMap<&EndpointAddr, usize> = HashMap::new();
    let mut dups = Vec::new();
    for (i, a) in addrs {
        if let Some(&first) = seen.get(a) {
            dups.push((first, *i));
        } else {
            seen.insert(a, *i);
        }
    }
    dups
}
