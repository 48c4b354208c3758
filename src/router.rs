//! Request routing: picks the vhost for a request's host and, inside it, the
//! pool for its path.
//!
//! Host precedence follows nginx's `server_name` rules: an exact name first
//! (case-insensitive, port and one trailing dot ignored), then the longest
//! matching `*.suffix` wildcard, then the `*` default. Inside a vhost the
//! path routes are tried in order and the first match wins; no match means
//! the vhost's own pool.
//!
//! Pure: no I/O, imports nothing else from the crate. Lookups do not
//! allocate (hosts are lowercased into a stack buffer when needed), since
//! this runs once per request.

use std::collections::HashMap;

/// How a route matches the normalised request path.
#[derive(Debug, Clone)]
pub enum RouteMatch {
    /// `path.starts_with(prefix)`.
    Prefix(String),
    /// `regex.is_match(path)`.
    Regex(regex::Regex),
}

impl RouteMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            RouteMatch::Prefix(prefix) => path.starts_with(prefix.as_str()),
            RouteMatch::Regex(re) => re.is_match(path),
        }
    }
}

/// One vhost as the router sees it.
#[derive(Debug, Clone)]
pub struct VhostRoutes {
    /// Lowercased host names: exact names, `*.suffix` wildcards, or `*`.
    pub hosts: Vec<String>,
    /// The vhost's default pool index.
    pub pool: usize,
    /// Path routes in config order, each with its pool index.
    pub routes: Vec<(RouteMatch, usize)>,
}

/// Immutable routing table built once per config generation.
#[derive(Debug, Clone)]
pub struct Router {
    vhosts: Vec<VhostRoutes>,
    /// Lowercased exact name (no trailing dot) -> vhost index.
    exact: HashMap<String, usize>,
    /// Lowercased wildcard suffix including its leading dot
    /// (`.shop.example.com`) -> vhost index.
    wildcard: HashMap<String, usize>,
    /// The first vhost listing `*`.
    default: Option<usize>,
}

/// Host names longer than this are lowercased on the heap; DNS names stop at
/// 253 bytes, so real traffic never gets there.
const STACK_HOST: usize = 256;

impl Router {
    /// Builds the table. When two vhosts claim the same name, the first one
    /// in config order keeps it (config validation is expected to reject
    /// duplicates; this keeps the router deterministic regardless).
    pub fn new(vhosts: Vec<VhostRoutes>) -> Router {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        for (idx, vhost) in vhosts.iter().enumerate() {
            for name in &vhost.hosts {
                let name = name.to_ascii_lowercase();
                if name == "*" {
                    default.get_or_insert(idx);
                } else if let Some(suffix) = name.strip_prefix('*') {
                    // Keep the dot: `*.b.c` must not match `xb.c`.
                    if suffix.starts_with('.') && suffix.len() > 1 {
                        let suffix = suffix.strip_suffix('.').unwrap_or(suffix);
                        wildcard.entry(suffix.to_owned()).or_insert(idx);
                    }
                } else {
                    let name = name.strip_suffix('.').unwrap_or(&name);
                    exact.entry(name.to_owned()).or_insert(idx);
                }
            }
        }
        Router {
            vhosts,
            exact,
            wildcard,
            default,
        }
    }

    /// Routes one request.
    ///
    /// `host` is the Host header or `:authority` as sent (may carry a port,
    /// upper case, an IPv6 literal such as `[::1]:8080`, or a trailing dot);
    /// `path` is the normalised path. Returns `(vhost index, pool index)`, or
    /// `None` when no vhost matches and there is no `*` default.
    pub fn route(&self, host: &str, path: &str) -> Option<(usize, usize)> {
        let vhost_idx = self.vhost_for(host)?;
        let vhost = self.vhosts.get(vhost_idx)?;
        let pool = vhost
            .routes
            .iter()
            .find(|(m, _)| m.matches(path))
            .map_or(vhost.pool, |(_, pool)| *pool);
        Some((vhost_idx, pool))
    }

    fn vhost_for(&self, host: &str) -> Option<usize> {
        let name = host_without_port(host);
        // nginx ignores one trailing dot ("example.com." is the same name).
        let name = name.strip_suffix('.').unwrap_or(name);
        if name.is_empty() {
            return self.default;
        }
        let mut buf = [0u8; STACK_HOST];
        let heap;
        let lower: &str = if !name.bytes().any(|b| b.is_ascii_uppercase()) {
            name
        } else if name.len() <= STACK_HOST {
            let dst = &mut buf[..name.len()];
            dst.copy_from_slice(name.as_bytes());
            dst.make_ascii_lowercase();
            // ASCII lowercasing keeps UTF-8 valid, so this cannot fail; fall
            // back to the default vhost rather than panic if it ever did.
            match std::str::from_utf8(dst) {
                Ok(s) => s,
                Err(_) => return self.default,
            }
        } else {
            heap = name.to_ascii_lowercase();
            &heap
        };
        self.lookup(lower).or(self.default)
    }

    /// Exact name, then the longest wildcard suffix. Scanning dots from the
    /// left tries the longest suffix first; starting after the first byte
    /// means `*.b.c` never matches `b.c` itself (nor `.b.c`).
    fn lookup(&self, lower: &str) -> Option<usize> {
        if let Some(&idx) = self.exact.get(lower) {
            return Some(idx);
        }
        if self.wildcard.is_empty() {
            return None;
        }
        lower
            .char_indices()
            .skip(1)
            .filter(|&(_, c)| c == '.')
            .find_map(|(i, _)| self.wildcard.get(&lower[i..]).copied())
    }
}

/// Strips the port from a Host / `:authority` value, keeping IPv6 brackets:
/// `"[::1]:80"` -> `"[::1]"`, `"a.b:8080"` -> `"a.b"`. An unbracketed value
/// with several colons (not a valid Host, but possible on the wire) is
/// returned unchanged rather than cut at a guess.
pub fn host_without_port(host: &str) -> &str {
    // Byte scans: every delimiter is ASCII, so each cut is on a char boundary.
    let bytes = host.as_bytes();
    if bytes.first() == Some(&b'[') {
        return match bytes.iter().position(|&b| b == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    let mut colons = bytes
        .iter()
        .enumerate()
        .filter(|(_, &b)| b == b':')
        .map(|(i, _)| i);
    match (colons.next(), colons.next()) {
        // One colon: name:port. None: no port. More: a bare IPv6 address, kept whole.
        (Some(colon), None) => &host[..colon],
        _ => host,
    }
}

#[cfg(test)]
#[path = "router_tests.rs"]
mod tests;
