//! Compiling `pools:`: endpoint addresses and capacities, balance policy, keepalive,
//! timeouts, queue, active health checks and passive ejection, with their defaults.

use std::collections::HashMap;
use std::time::Duration;

use super::super::schema::{HealthSpec, PoolSpec, Text};
use super::super::{
    BalancePolicy, EndpointAddr, EndpointConfig, HealthConfig, KeepaliveConfig, PassiveConfig,
    PoolConfig, QueueConfig, TimeoutsConfig,
};
use super::{loc, parse_socket_addr, pool_path, Ctx};

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_PATH: usize = 107;
/// Far beyond any FPM pool's `pm.max_children`, and small enough that a pool's capacity (a
/// sum over its endpoints) cannot overflow.
const MAX_CONNS_LIMIT: usize = 65_535;

/// Compiles every pool, recording errors in `cx`.
pub(super) fn compile_pools(cx: &mut Ctx, specs: Vec<(String, PoolSpec)>) -> Vec<PoolConfig> {
    let mut out = Vec::new();
    for (name, spec) in specs {
        if name.trim().is_empty() {
            cx.err(&pool_path(&name, ""), None, "pool names must not be empty");
        }
        out.push(compile_pool(cx, &name, spec));
    }
    out
}

fn compile_pool(cx: &mut Ctx, name: &str, spec: PoolSpec) -> PoolConfig {
    let path = |rest: &str| pool_path(name, rest);
    let endpoint_specs = spec.endpoints.unwrap_or_default();
    if endpoint_specs.is_empty() {
        cx.err(
            &path("endpoints"),
            None,
            "a pool needs at least one endpoint",
        );
    }
    let mut endpoints = Vec::new();
    // Endpoints are keyed by address (metrics, reload carry-over), so one may appear once.
    let mut seen: HashMap<EndpointAddr, usize> = HashMap::new();
    for (i, e) in endpoint_specs.into_iter().enumerate() {
        let p = path(&format!("endpoints[{i}]"));
        let addr = cx
            .required(&e.addr, &format!("{p}.addr"))
            .cloned()
            .and_then(|t| {
                parse_endpoint(cx, &t.value)
                    .map_err(|m| cx.err(&format!("{p}.addr"), loc(&t), m))
                    .ok()
            });
        let weight = match &e.weight {
            Some(w) if w.value == 0 => {
                cx.err(&format!("{p}.weight"), loc(w), "weight must be at least 1");
                1
            }
            Some(w) => w.value,
            None => 1,
        };
        let max_conns = match &e.max_conns {
            Some(m) if m.value == 0 || m.value > MAX_CONNS_LIMIT => {
                cx.err(
                    &format!("{p}.max_conns"),
                    loc(m),
                    format!(
                        "max_conns must be at least 1 and at most {MAX_CONNS_LIMIT} (the \
                         endpoint's share of FPM workers, pm.max_children)"
                    ),
                );
                16
            }
            Some(m) => m.value,
            None => 16,
        };
        if let Some(addr) = addr {
            if let Some(first) = seen.get(&addr) {
                let message = format!("duplicate endpoint `{addr}` (also endpoints[{first}])");
                cx.err(&format!("{p}.addr"), e.addr.as_ref().and_then(loc), message);
            } else {
                seen.insert(addr.clone(), i);
            }
            endpoints.push(EndpointConfig {
                addr,
                weight,
                max_conns,
            });
        }
    }

    let balance = match &spec.balance {
        None => BalancePolicy::LeastConn,
        Some(t) => parse_balance(&t.value).unwrap_or_else(|e| {
            cx.err(&path("balance"), loc(t), e);
            BalancePolicy::LeastConn
        }),
    };

    // Idle connections pin FPM workers and count against max_conns, so the default never
    // exceeds the smallest endpoint's share.
    let smallest = endpoints.iter().map(|e| e.max_conns).min();
    let ka = spec.keepalive.as_ref();
    let max_idle = match ka.and_then(|k| k.max_idle.as_ref()) {
        Some(m) => {
            if let Some(e) = endpoints.iter().find(|e| e.max_conns < m.value) {
                let message = format!(
                    "max_idle {} exceeds max_conns {} of endpoint `{}`; idle connections count \
                     against max_conns",
                    m.value, e.max_conns, e.addr
                );
                cx.err(&path("keepalive.max_idle"), loc(m), message);
            }
            m.value
        }
        None => smallest.unwrap_or(4).min(4),
    };
    let keepalive = KeepaliveConfig {
        max_idle,
        idle_timeout: cx.duration(
            &ka.and_then(|k| k.idle_timeout.clone()),
            &path("keepalive.idle_timeout"),
            5,
            true,
        ),
    };

    let t = spec.timeouts.as_ref();
    let mut timeout = |v: Option<&Option<Text>>, key: &str, default: u64| {
        cx.duration(
            &v.cloned().flatten(),
            &path(&format!("timeouts.{key}")),
            default,
            true,
        )
    };
    let timeouts = TimeoutsConfig {
        // 3 s, not 1 s: a SYN dropped by a full FPM backlog is retransmitted after 1 s, and
        // one lost SYN should not fail (and passively eject) an endpoint.
        connect: timeout(t.map(|t| &t.connect), "connect", 3),
        read: timeout(t.map(|t| &t.read), "read", 60),
        send: timeout(t.map(|t| &t.send), "send", 60),
    };

    let q = spec.queue.as_ref();
    let queue = QueueConfig {
        size: q.and_then(|q| q.size.as_ref()).map_or(512, |s| s.value),
        timeout: cx.duration(
            &q.and_then(|q| q.timeout.clone()),
            &path("queue.timeout"),
            5,
            true,
        ),
    };

    // `health: { passive: ... }` alone tunes passive ejection without turning pings on.
    let health = spec
        .health
        .as_ref()
        .filter(|h| !h.passive_only())
        .map(|h| compile_health(cx, name, h, &endpoints));
    let passive = compile_passive(cx, name, spec.health.as_ref());

    let status = spec.status.as_ref().map(|s| {
        if !s.value.starts_with('/') {
            cx.err(
                &path("status"),
                loc(s),
                "status must be FPM's pm.status_path, starting with `/`",
            );
        }
        s.value.clone()
    });
    let params = spec.params.unwrap_or_default().0;
    for (k, _) in &params {
        if k.is_empty() {
            cx.err(
                &path("params"),
                None,
                "FastCGI param names must not be empty",
            );
        }
    }

    PoolConfig {
        name: name.to_string(),
        endpoints,
        balance,
        keepalive,
        timeouts,
        queue,
        retries: spec.retries.map_or(1, |r| r.value),
        resolve_interval: cx.duration(&spec.resolve_interval, &path("resolve_interval"), 5, true),
        retry_after: spec.retry_after.map_or(1, |r| r.value),
        health,
        passive,
        status,
        params,
    }
}

fn compile_health(
    cx: &mut Ctx,
    pool: &str,
    h: &HealthSpec,
    endpoints: &[EndpointConfig],
) -> HealthConfig {
    let path = |rest: &str| pool_path(pool, &format!("health.{rest}"));
    let ping = match &h.ping {
        Some(p) if !p.value.starts_with('/') => {
            cx.err(
                &path("ping"),
                loc(p),
                "ping must be FPM's ping.path, starting with `/`",
            );
            p.value.clone()
        }
        Some(p) => p.value.clone(),
        None => "/ping".to_string(),
    };
    let addr_port = h.addr_port.as_ref().map(|port| {
        if port.value == 0 {
            cx.err(
                &path("addr_port"),
                loc(port),
                "addr_port must be a port number from 1 to 65535",
            );
        }
        // A separate status port only makes sense on a host: a unix socket has no port, so
        // unix endpoints are pinged on their socket. A pool with no TCP endpoint at all
        // has nothing the setting could apply to.
        if let Some(e) = endpoints.first().filter(|_| {
            endpoints
                .iter()
                .all(|e| matches!(e.addr, EndpointAddr::Unix(_)))
        }) {
            let message = format!(
                "addr_port applies to TCP endpoints only, and this pool has none (`{}` is a unix socket)",
                e.addr
            );
            cx.err(&path("addr_port"), loc(port), message);
        }
        port.value
    });
    let fall = match &h.fall {
        Some(f) if f.value == 0 => {
            cx.err(&path("fall"), loc(f), "fall must be at least 1");
            3
        }
        Some(f) => f.value,
        None => 3,
    };
    HealthConfig {
        ping,
        expect: h
            .expect
            .as_ref()
            .map_or_else(|| "pong".to_string(), |e| e.value.clone()),
        addr_port,
        interval: cx.duration(&h.interval, &path("interval"), 2, true),
        timeout: cx.duration(&h.timeout, &path("timeout"), 1, true),
        rise: h.rise.as_ref().map_or(2, |r| r.value),
        fall,
    }
}

/// Passive ejection defaults apply whether or not `health:` is present.
fn compile_passive(cx: &mut Ctx, pool: &str, health: Option<&HealthSpec>) -> PassiveConfig {
    let spec = health.and_then(|h| h.passive.as_ref());
    let path = |rest: &str| pool_path(pool, &format!("health.passive.{rest}"));
    let fails = spec.and_then(|p| p.fails.as_ref()).map_or(3, |f| f.value);
    // With fails 0 the window and eject times are unused, so zero is fine there.
    let nonzero = fails > 0;
    PassiveConfig {
        fails,
        window: cx.duration_or(
            &spec.and_then(|p| p.window.clone()),
            &path("window"),
            Duration::from_secs(10),
            nonzero,
        ),
        eject: cx.duration_or(
            &spec.and_then(|p| p.eject.clone()),
            &path("eject"),
            Duration::from_secs(30),
            nonzero,
        ),
    }
}

/// `unix:/path` (relative paths resolved against the config directory), `dns:NAME:PORT`
/// or a TCP address.
fn parse_endpoint(cx: &Ctx, text: &str) -> Result<EndpointAddr, String> {
    let text = text.trim();
    if let Some(p) = text.strip_prefix("unix:") {
        if p.is_empty() {
            return Err("`unix:` needs a socket path, e.g. `unix:/run/php/php8.2-fpm.sock`".into());
        }
        let path = cx.resolve(p);
        if path.as_os_str().len() > MAX_UNIX_PATH {
            return Err(format!(
                "unix socket path {} is longer than {MAX_UNIX_PATH} bytes",
                path.display()
            ));
        }
        return Ok(EndpointAddr::Unix(path));
    }
    if let Some(rest) = text.strip_prefix("dns:") {
        return super::dns::parse_endpoint(rest);
    }
    let addr = parse_socket_addr(text, true)?;
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!(
            "`{addr}` cannot be connected to; give the FPM node's address and port"
        ));
    }
    Ok(EndpointAddr::Tcp(addr))
}

/// `round_robin | least_conn | p2c | hash_client_ip | hash_cookie:NAME`.
fn parse_balance(text: &str) -> Result<BalancePolicy, String> {
    let s = text.trim();
    match s {
        "round_robin" => return Ok(BalancePolicy::RoundRobin),
        "least_conn" => return Ok(BalancePolicy::LeastConn),
        "p2c" => return Ok(BalancePolicy::P2c),
        "hash_client_ip" => return Ok(BalancePolicy::HashClientIp),
        _ => {}
    }
    let Some(rest) = s
        .strip_prefix("hash_cookie")
        .filter(|r| r.is_empty() || r.starts_with(':'))
    else {
        return Err(format!(
            "unknown balance policy `{s}`; expected round_robin, least_conn, p2c, hash_client_ip or hash_cookie:NAME"
        ));
    };
    let name = rest.strip_prefix(':').unwrap_or_default().trim();
    if name.is_empty() {
        return Err("`hash_cookie` needs a cookie name: `hash_cookie:NAME`".into());
    }
    // RFC 6265 cookie-name = token: visible ASCII except separators.
    if let Some(c) = name
        .chars()
        .find(|c| !c.is_ascii_graphic() || "()<>@,;:\\\"/[]?={}".contains(*c))
    {
        return Err(format!(
            "invalid cookie name `{name}`: unexpected character {c:?}"
        ));
    }
    Ok(BalancePolicy::HashCookie(name.to_string()))
}
