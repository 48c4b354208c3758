//! The compiled configuration: what the rest of the proxy runs on. Durations, sizes,
//! addresses and regexes are parsed, defaults applied and references checked, so nothing
//! here can fail at use.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

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
    /// How `dns:` endpoints are resolved.
    pub dns: DnsConfig,
    /// Vhosts in file order; host names are unique across them.
    pub vhosts: Vec<VhostConfig>,
    /// Client-side limits.
    pub limits: Limits,
    /// Time in-flight requests get to finish on SIGTERM.
    pub shutdown_grace: Duration,
    /// Runtime worker threads; `None` = one per CPU core.
    pub workers: Option<usize>,
    /// Peers whose forwarded-client headers are believed.
    pub trusted_proxies: Vec<Cidr>,
    /// Which of those headers names the client.
    pub real_ip_header: RealIpHeader,
    /// Peers that may connect to `proxy_protocol` listeners; empty = any.
    pub proxy_protocol_from: Vec<Cidr>,
    /// Access log format.
    pub access_log: AccessLogFormat,
}

/// The header a trusted proxy names the client in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealIpHeader {
    /// `X-Forwarded-For`, right-most untrusted hop; `X-Real-IP` when it is absent.
    XForwardedFor,
    /// `X-Real-IP` only.
    XRealIp,
}

/// How each request is logged on the `fpmgate::access` target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccessLogFormat {
    /// Apache/nginx combined format plus request id, pool, endpoint and timings.
    Combined,
    /// One JSON object per line.
    Json,
    /// No access log.
    Off,
}

/// An IP network (`10.0.0.0/8`, `::1/128`, or a bare address).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    /// Network address.
    pub addr: std::net::IpAddr,
    /// Prefix length.
    pub prefix: u8,
}

impl Cidr {
    /// Parses `ADDR/LEN` or a bare address (a single host).
    pub fn parse(s: &str) -> Result<Cidr, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: std::net::IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or CIDR"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&n| n <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0..={max}"))?,
            None => max,
        };
        Ok(Cidr { addr, prefix })
    }

    /// Whether `ip` is inside this network (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        use std::net::IpAddr;
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// `dns:` — how `dns:NAME:PORT` endpoints are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsConfig {
    /// DNS server queried directly over UDP; `None` = the system resolver (which honours
    /// `/etc/hosts` and `resolv.conf`).
    pub resolver: Option<SocketAddr>,
    /// Longest wait for one resolution.
    pub timeout: Duration,
}

/// One client listener.
#[derive(Debug, Clone)]
pub struct ListenerConfig {
    /// Address to bind.
    pub bind: SocketAddr,
    /// Certificates (first = default for clients without SNI); empty = plaintext.
    pub tls: Vec<TlsCertConfig>,
    /// Every connection starts with a PROXY protocol (v1 or v2) header.
    pub proxy_protocol: bool,
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
    /// How often `dns:` endpoints are resolved again.
    pub resolve_interval: Duration,
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
/// `[::1]:9000`, `unix:/run/php/x.sock`, `dns:fpm.svc:9000`), used as the endpoint's key and
/// metric label.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EndpointAddr {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path (absolute).
    Unix(PathBuf),
    /// A DNS name resolved periodically; each address becomes a `Tcp` endpoint of the live
    /// pool, so a running endpoint never has this form.
    Dns {
        /// Lowercased host name, without a trailing dot.
        host: String,
        /// TCP port.
        port: u16,
    },
}

impl fmt::Display for EndpointAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EndpointAddr::Tcp(addr) => write!(f, "{addr}"),
            EndpointAddr::Unix(path) => write!(f, "unix:{}", path.display()),
            EndpointAddr::Dns { host, port } => write!(f, "dns:{host}:{port}"),
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
    /// Static files may be symlinks to anywhere, not only inside `static_dir`.
    pub follow_symlinks: bool,
    /// File-name patterns never served from `static_dir` (checked).
    pub static_deny: Vec<String>,
    /// SERVER_NAME, when set.
    pub server_name: Option<String>,
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
    /// Bytes of request bodies held in memory by all requests together; past it, bodies
    /// spill to temp files whatever their size.
    pub body_memory: u64,
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
    /// Longest a response may wait for the client to take more of it; then the connection
    /// closes (nginx's `send_timeout`).
    pub send_timeout: Duration,
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
