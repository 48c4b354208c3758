//! `ConfigSpec` → [`Config`]: applies defaults, parses durations, sizes, addresses and
//! regexes, resolves relative paths against the config file's directory, checks cross
//! references and file readability. Every problem is collected, never just the first, and
//! each names its YAML path (and line:column when the spec carries a `Spanned` location;
//! the caller fills in the rest from the document outline).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_saphyr::Spanned;

use super::error::ConfigError;
use super::schema::{ConfigSpec, LimitsSpec, ListenSpec, Text};
use super::units::{parse_duration, parse_size};
use super::{AdminConfig, Config, Limits, ListenerConfig, TlsCertConfig};

mod dns;
mod pool;
mod vhost;

/// Checks a certificate/key pair beyond being readable files (the TLS layer's own rules),
/// so its errors come with the others, at the entry's line.
pub type CertCheck = fn(&TlsCertConfig) -> Result<(), String>;

/// Builds the runtime config from the schema, or returns every error found.
pub fn compile(
    spec: ConfigSpec,
    path: &Path,
    certs: Option<CertCheck>,
) -> Result<Config, Vec<ConfigError>> {
    let base = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut cx = Ctx {
        errors: Vec::new(),
        base,
        certs,
    };

    let listeners = cx.listeners(spec.listen.unwrap_or_default());
    let admin = spec.admin.and_then(|a| {
        let bind = cx.required(&a.bind, "admin.bind")?;
        let bind = cx.socket_addr(bind, "admin.bind")?;
        let token = a.token.map(|t| {
            if t.value.is_empty() {
                cx.err(
                    "admin.token",
                    loc(&t),
                    "token must not be empty (omit it for none)",
                );
            }
            t.value
        });
        Some(AdminConfig { bind, token })
    });
    cx.check_bind_conflicts(&listeners, admin.as_ref().map(|a| a.bind));
    let listeners = listeners.into_iter().map(|(.., l)| l).collect();

    let pools = pool::compile_pools(&mut cx, spec.pools.unwrap_or_default().0);
    let dns = dns::compile_dns(&mut cx, spec.dns);
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

    let mut cidrs = |list: Option<Vec<Text>>, key: &str| -> Vec<super::Cidr> {
        let list = list.unwrap_or_default();
        let parsed = list.iter().enumerate().map(|(i, t)| {
            super::Cidr::parse(&t.value).map_err(|e| cx.err(&format!("{key}[{i}]"), loc(t), e))
        });
        parsed.filter_map(Result::ok).collect()
    };
    let trusted_proxies = cidrs(spec.trusted_proxies, "trusted_proxies");
    let empty_from = spec.proxy_protocol_from.as_ref().is_some_and(Vec::is_empty);
    let proxy_protocol_from = cidrs(spec.proxy_protocol_from, "proxy_protocol_from");
    if empty_from {
        // Read as "no one" or as "anyone"? Only the absent key means anyone.
        cx.err(
            "proxy_protocol_from",
            None,
            "an empty list is ambiguous: list the load balancers, or leave the key out to \
             take PROXY headers from any peer",
        );
    }
    let real_ip_header = match spec.real_ip_header.as_ref() {
        None => super::RealIpHeader::XForwardedFor,
        Some(t) if t.value.eq_ignore_ascii_case("x-forwarded-for") => {
            super::RealIpHeader::XForwardedFor
        }
        Some(t) if t.value.eq_ignore_ascii_case("x-real-ip") => super::RealIpHeader::XRealIp,
        Some(t) => {
            cx.err(
                "real_ip_header",
                loc(t),
                format!(
                    "unknown real_ip_header `{}`, expected x-forwarded-for or x-real-ip",
                    t.value
                ),
            );
            super::RealIpHeader::XForwardedFor
        }
    };
    let access_log = match spec.access_log.as_ref().map(|t| (t.value.as_str(), t)) {
        None | Some(("combined", _)) => super::AccessLogFormat::Combined,
        Some(("json", _)) => super::AccessLogFormat::Json,
        Some(("off", _)) => super::AccessLogFormat::Off,
        Some((other, t)) => {
            cx.err(
                "access_log",
                loc(t),
                format!("unknown access_log format `{other}`, expected combined, json or off"),
            );
            super::AccessLogFormat::Combined
        }
    };

    if !cx.errors.is_empty() {
        return Err(cx.errors);
    }
    Ok(Config {
        trusted_proxies,
        real_ip_header,
        proxy_protocol_from,
        access_log,
        path: path.to_path_buf(),
        listeners,
        admin,
        pools,
        dns,
        vhosts,
        limits,
        shutdown_grace,
        workers,
    })
}

/// A 1-based `(line, column)`.
pub(super) type Pos = (usize, usize);

/// 1-based `(line, column)` of a spanned value; `None` when the parser did not record one.
pub(super) fn loc<T>(s: &Spanned<T>) -> Option<Pos> {
    let l = s.referenced;
    (l.line() > 0).then(|| (l.line() as usize, l.column() as usize))
}

/// Error sink plus the directory relative paths are resolved against.
pub(super) struct Ctx {
    pub(super) errors: Vec<ConfigError>,
    base: PathBuf,
    certs: Option<CertCheck>,
}

/// The smallest `limits.max_header_bytes`: hyper's HTTP/1 minimum read buffer.
const MIN_HEAD: usize = 8 << 10;

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

    /// [`Ctx::duration`] with a default that is not a whole number of seconds.
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

    /// [`Ctx::size`] for limits held as `usize`.
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

    /// `path` as written, or joined to the config file's directory when relative, with `.`
    /// and `..` resolved lexically so that labels (`unix:` endpoints in metrics) and log
    /// lines show the path users expect, not `config/../run/php.sock`.
    pub(super) fn resolve(&self, path: &str) -> PathBuf {
        let joined = self.base.join(path);
        let abs = std::path::absolute(&joined).unwrap_or(joined);
        let mut out = PathBuf::new();
        for c in abs.components() {
            match c {
                std::path::Component::ParentDir => {
                    out.pop();
                }
                std::path::Component::CurDir => {}
                other => out.push(other),
            }
        }
        out
    }

    fn socket_addr(&mut self, t: &Text, path: &str) -> Option<SocketAddr> {
        parse_socket_addr(&t.value, false)
            .map_err(|e| self.err(path, loc(t), e))
            .ok()
    }

    /// Each valid listener with its bind's YAML path and location (for conflict errors).
    fn listeners(&mut self, specs: Vec<ListenSpec>) -> Vec<(String, Option<Pos>, ListenerConfig)> {
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
                    let pair = TlsCertConfig { cert, key };
                    match self.certs.map_or(Ok(()), |check| check(&pair)) {
                        Ok(()) => tls.push(pair),
                        Err(e) => self.err(&format!("{cp}.cert"), None, e),
                    }
                }
            }
            let bind_path = format!("{p}.bind");
            let Some(text) = self.required(&spec.bind, &bind_path).cloned() else {
                continue;
            };
            if let Some(bind) = self.socket_addr(&text, &bind_path) {
                let proxy_protocol = spec.proxy_protocol.unwrap_or(false);
                out.push((
                    bind_path,
                    loc(&text),
                    ListenerConfig {
                        bind,
                        tls,
                        proxy_protocol,
                    },
                ));
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
        listeners: &[(String, Option<Pos>, ListenerConfig)],
        admin: Option<SocketAddr>,
    ) {
        let clash = |a: SocketAddr, b: SocketAddr| {
            a.port() != 0
                && a.port() == b.port()
                && (a.ip() == b.ip()
                    || (a.is_ipv4() == b.is_ipv4()
                        && (a.ip().is_unspecified() || b.ip().is_unspecified())))
        };
        for (i, (path, at, l)) in listeners.iter().enumerate() {
            let earlier = listeners.iter().take(i);
            if let Some((other, ..)) = earlier.clone().find(|(.., o)| clash(o.bind, l.bind)) {
                let message = format!("`{}` is already bound by {other}", l.bind);
                self.err(path, *at, message);
            }
        }
        if let Some(admin) = admin {
            if let Some((other, ..)) = listeners.iter().find(|(.., o)| clash(o.bind, admin)) {
                self.err(
                    "admin.bind",
                    None,
                    format!("`{admin}` is already bound by {other}"),
                );
            }
        }
    }

    fn limits(&mut self, spec: Option<LimitsSpec>) -> Limits {
        let s = spec.unwrap_or_default();
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
        let max_header_bytes =
            self.usize_size(&s.max_header_bytes, "limits.max_header_bytes", 64 << 10);
        if max_header_bytes < MIN_HEAD {
            // hyper's HTTP/1 read buffer cannot be smaller: a lower limit would hold on
            // HTTP/2 and silently be 8 KiB on HTTP/1.
            self.err(
                "limits.max_header_bytes",
                s.max_header_bytes.as_ref().and_then(loc),
                "must be at least 8KiB (the smallest HTTP/1 head buffer)",
            );
        }
        Limits {
            max_body: self.size(&s.max_body, "limits.max_body", 100 << 20),
            body_buffer: self.usize_size(&s.body_buffer, "limits.body_buffer", 1 << 20),
            body_memory: self.size(&s.body_memory, "limits.body_memory", 256 << 20),
            max_header_bytes,
            max_uri: self.usize_size(&s.max_uri, "limits.max_uri", 8 << 10),
            max_response_header: self.usize_size(
                &s.max_response_header,
                "limits.max_response_header",
                64 << 10,
            ),
            header_timeout: self.duration(&s.header_timeout, "limits.header_timeout", 10, true),
            idle_timeout: self.duration(&s.idle_timeout, "limits.idle_timeout", 60, true),
            body_timeout: self.duration(&s.body_timeout, "limits.body_timeout", 60, true),
            send_timeout: self.duration(&s.send_timeout, "limits.send_timeout", 60, true),
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

/// Names used to build per-pool error paths; kept here so both halves agree.
pub(super) fn pool_path(name: &str, rest: &str) -> String {
    if rest.is_empty() {
        format!("pools.{name}")
    } else {
        format!("pools.{name}.{rest}")
    }
}
