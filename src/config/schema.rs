//! Serde mirror of the YAML config file, one struct per mapping, field names exactly as
//! users type them. No logic and no defaults live here beyond "absent": every key is
//! optional at this level so that a missing key becomes a located compile error instead of
//! serde's first-error-only `missing field`, and leaves that need checking are kept as
//! `Spanned` text so their line survives into `compile`. Defaults are documented per field
//! and applied in `compile`.

use std::fmt;
use std::marker::PhantomData;

use serde::de::{Deserialize, Deserializer, MapAccess, Visitor};
use serde_saphyr::Spanned;

/// A YAML scalar kept as text with its source location (durations, sizes, addresses, ...).
pub type Text = Spanned<String>;

/// The whole file.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// Client listeners. Required: at least one.
    pub listen: Option<Vec<ListenSpec>>,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`, `/status`). Default: none.
    pub admin: Option<AdminSpec>,
    /// Balancer groups of PHP-FPM endpoints, by name (order kept).
    pub pools: Option<NamedMap<PoolSpec>>,
    /// How `dns:` endpoints are resolved. Default: the system resolver, 1s timeout.
    pub dns: Option<DnsSpec>,
    /// Virtual hosts; matched by `hosts`, `"*"` is the default vhost.
    pub vhosts: Option<Vec<VhostSpec>>,
    /// Client-side limits.
    pub limits: Option<LimitsSpec>,
    /// Time in-flight requests get to finish on SIGTERM. Default `30s`.
    pub shutdown_grace: Option<Text>,
    /// Runtime worker threads. Default: the number of CPU cores.
    pub workers: Option<Spanned<usize>>,
    /// Peers (CIDRs) whose `X-Forwarded-For` / `X-Real-IP` header is believed for
    /// REMOTE_ADDR. Default: none.
    pub trusted_proxies: Option<Vec<Text>>,
    /// Peers (CIDRs) that may open connections on `proxy_protocol` listeners (the load
    /// balancers); others are refused before their header is read. Default: any peer.
    pub proxy_protocol_from: Option<Vec<Text>>,
    /// The header a trusted proxy names the client in: `x-forwarded-for` (right-most
    /// untrusted hop; `X-Real-IP` only when it is absent) or `x-real-ip` (only that one, for
    /// fronts that set X-Real-IP and pass the client's X-Forwarded-For on untouched).
    /// Default `x-forwarded-for`.
    pub real_ip_header: Option<Text>,
    /// Access log format: `combined`, `json` or `off`. Default `combined`.
    pub access_log: Option<Text>,
}

/// One entry of `listen`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenSpec {
    /// `IP:PORT` (or `localhost:PORT`). Required.
    pub bind: Option<Text>,
    /// Certificates; the first one is served to clients without SNI. Default: plaintext.
    pub tls: Option<Vec<TlsCertSpec>>,
    /// Expect a PROXY protocol v1 or v2 header on every connection (from an L4 load
    /// balancer). Default `false`.
    pub proxy_protocol: Option<bool>,
}

/// One certificate of a TLS listener.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertSpec {
    /// PEM certificate chain; relative to the config file's directory. Required.
    pub cert: Option<Text>,
    /// PEM private key; relative to the config file's directory. Required.
    pub key: Option<Text>,
}

/// `admin:`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// `IP:PORT`. Required.
    pub bind: Option<Text>,
    /// Bearer token required on POST endpoints. Default: none.
    pub token: Option<Text>,
}

/// `dns:`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsSpec {
    /// `IP` or `IP:PORT` (default port 53) of a DNS server to query directly over UDP.
    /// Default: the system resolver (`/etc/hosts`, `resolv.conf`).
    pub resolver: Option<Text>,
    /// Longest wait for one resolution. Default `1s`.
    pub timeout: Option<Text>,
}

/// One pool under `pools:`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolSpec {
    /// The FPM endpoints. Required, at least one.
    pub endpoints: Option<Vec<EndpointSpec>>,
    /// `round_robin | least_conn | p2c | hash_client_ip | hash_cookie:NAME`. Default `least_conn`.
    pub balance: Option<Text>,
    /// Idle connection reuse.
    pub keepalive: Option<KeepaliveSpec>,
    /// Upstream timeouts.
    pub timeouts: Option<TimeoutsSpec>,
    /// Wait queue for when every endpoint is at `max_conns`.
    pub queue: Option<QueueSpec>,
    /// Extra attempts on another endpoint where FPM cannot have run the script. Default 1.
    pub retries: Option<Spanned<u32>>,
    /// How often `dns:` endpoints are resolved again. Default `5s`.
    pub resolve_interval: Option<Text>,
    /// `Retry-After` seconds on this pool's 503s. Default 1.
    pub retry_after: Option<Spanned<u32>>,
    /// Active FastCGI ping checks. Default: absent = no active checks (a ping on an FPM
    /// without `ping.path` would mark every node down).
    pub health: Option<HealthSpec>,
    /// FPM `pm.status_path` to scrape into metrics. Default: none.
    pub status: Option<Text>,
    /// Extra FastCGI params, in order. Default: none.
    pub params: Option<NamedMap<String>>,
}

/// One entry of `endpoints`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointSpec {
    /// `IP:PORT`, `[IPv6]:PORT`, `localhost:PORT`, `unix:/path.sock` or `dns:NAME:PORT`.
    /// Required.
    pub addr: Option<Text>,
    /// Relative share of traffic. Default 1; 0 is an error.
    pub weight: Option<Spanned<u32>>,
    /// Connections (busy + idle) this proxy may hold to the endpoint: `pm.max_children`
    /// divided by the number of proxy replicas. Default 16; 0 is an error.
    pub max_conns: Option<Spanned<usize>>,
}

/// `keepalive:`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeepaliveSpec {
    /// Idle connections kept per endpoint; 0 disables reuse. Default min(4, the pool's
    /// smallest `max_conns`); must not exceed any endpoint's `max_conns`.
    pub max_idle: Option<Spanned<usize>>,
    /// Idle connections close after this. Default `5s`.
    pub idle_timeout: Option<Text>,
}

/// `timeouts:`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimeoutsSpec {
    /// Connect to an endpoint. Default `3s`.
    pub connect: Option<Text>,
    /// Longest FPM silence, before the first byte and between reads. Default `60s`.
    pub read: Option<Text>,
    /// Longest a write to FPM may block. Default `60s`.
    pub send: Option<Text>,
}

/// `queue:`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueSpec {
    /// Requests that may wait for capacity; 0 = no queue (503 at once). Default 512.
    pub size: Option<Spanned<usize>>,
    /// Longest wait before a 503. Default `5s`.
    pub timeout: Option<Text>,
}

/// `health:`; present (even as `{}`) = active checks on, unless it holds only `passive`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    /// FPM's `ping.path`. Default `/ping`.
    pub ping: Option<Text>,
    /// FPM's `ping.response`. Default `pong`.
    pub expect: Option<Text>,
    /// Ping this port on each TCP endpoint's host (FPM's `pm.status_listen`). Default: the
    /// endpoint's own address.
    pub addr_port: Option<Spanned<u16>>,
    /// Time between pings. Default `2s`.
    pub interval: Option<Text>,
    /// Ping timeout. Default `1s`.
    pub timeout: Option<Text>,
    /// Successes before a down endpoint is up; 0 = up after any success. Default 2.
    pub rise: Option<Spanned<u32>>,
    /// Failures before an up endpoint is down; at least 1. Default 3.
    pub fall: Option<Spanned<u32>>,
    /// Passive ejection on request failures (applies also without active checks).
    pub passive: Option<PassiveSpec>,
}

impl HealthSpec {
    /// True when only `passive` is set: passive ejection tuned, no active pings.
    pub fn passive_only(&self) -> bool {
        self.passive.is_some()
            && self.ping.is_none()
            && self.expect.is_none()
            && self.addr_port.is_none()
            && self.interval.is_none()
            && self.timeout.is_none()
            && self.rise.is_none()
            && self.fall.is_none()
    }
}

/// `health.passive:`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveSpec {
    /// Failures within `window` that eject an endpoint; 0 = off. Default 3.
    pub fails: Option<Spanned<u32>>,
    /// Window for counting failures. Default `10s`.
    pub window: Option<Text>,
    /// How long an ejected endpoint is skipped. Default `30s`.
    pub eject: Option<Text>,
}

/// One entry of `vhosts`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VhostSpec {
    /// Host names: exact, `*.suffix`, or `"*"` (default vhost). Required, at least one.
    pub hosts: Option<Vec<Text>>,
    /// Document root as seen by the FPM nodes; absolute. Required.
    pub root: Option<Text>,
    /// Pool for requests no route claims. Required.
    pub pool: Option<Text>,
    /// Front controller (`index.php`) for paths that are not `.php`. Default: none (404).
    pub index: Option<Text>,
    /// Local copy of the document tree: existing files are served directly and missing
    /// `.php` scripts are a 404 without calling FPM. Relative to the config file's
    /// directory. Default: none.
    #[serde(rename = "static")]
    pub static_dir: Option<Text>,
    /// Serve files from `static` that symlinks inside it point at wherever they lead, as
    /// nginx does by default (Laravel's `public/storage`). Default: false, only targets
    /// inside the tree.
    pub follow_symlinks: Option<Spanned<bool>>,
    /// File-name patterns never served from `static` (`*.bak`). Default: PHP source copies,
    /// templates, archives, dumps and logs; `[]` serves everything.
    pub static_deny: Option<Vec<Text>>,
    /// SERVER_NAME for every request of this vhost. Default: the first host name, or for
    /// `*` and `*.suffix` the request's host (which the client chooses).
    pub server_name: Option<Text>,
    /// Per-path pool overrides, first match wins. Default: none.
    pub routes: Option<Vec<RouteSpec>>,
}

/// One entry of `routes`: exactly one of `path` (prefix) or `regex`, plus `pool`.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// Path prefix, starting with `/`.
    pub path: Option<Text>,
    /// Regular expression matched against the normalised path.
    pub regex: Option<Text>,
    /// Pool for matching requests. Required.
    pub pool: Option<Text>,
}

/// `limits:`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSpec {
    /// Largest request body (→ 413). Default `100MiB`.
    pub max_body: Option<Text>,
    /// Request bodies past this spill to a temp file. Default `1MiB`.
    pub body_buffer: Option<Text>,
    /// All request bodies held in memory together; past it new bodies spill to temp files.
    /// Default `256MiB`.
    pub body_memory: Option<Text>,
    /// Largest client request head (→ 431). Default `64KiB`.
    pub max_header_bytes: Option<Text>,
    /// Longest request URI (→ 414). Default `8KiB`.
    pub max_uri: Option<Text>,
    /// Largest FPM response head (→ 502). Default `64KiB`.
    pub max_response_header: Option<Text>,
    /// Time to receive a whole request head (slowloris guard). Default `10s`.
    pub header_timeout: Option<Text>,
    /// Idle keep-alive client connections close after this. Default `60s`.
    pub idle_timeout: Option<Text>,
    /// Longest client silence while sending a request body. Default `60s`.
    pub body_timeout: Option<Text>,
    /// Longest a response may wait for the client to take more of it. Default `60s`.
    pub send_timeout: Option<Text>,
    /// Concurrent client connections. Default 10000.
    pub max_connections: Option<Spanned<usize>>,
}

/// A YAML mapping with string keys whose order is kept (pools and params are listed in
/// file order). Duplicate keys never reach here: the parser rejects them.
#[derive(Debug)]
pub struct NamedMap<V>(pub Vec<(String, V)>);

impl<V> Default for NamedMap<V> {
    fn default() -> Self {
        NamedMap(Vec::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for NamedMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct NamedMapVisitor<V>(PhantomData<V>);

        impl<'de, V: Deserialize<'de>> Visitor<'de> for NamedMapVisitor<V> {
            type Value = NamedMap<V>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping of names")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut entries = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, V>()? {
                    entries.push((k, v));
                }
                Ok(NamedMap(entries))
            }
        }

        deserializer.deserialize_map(NamedMapVisitor(PhantomData))
    }
}
