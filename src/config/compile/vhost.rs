//! Compiling `vhosts:`: host names (lowercased, unique across vhosts), document root,
//! pool references, front controller, local static tree and routes.

use std::collections::HashMap;
use std::path::PathBuf;

use super::super::schema::{RouteSpec, Text, VhostSpec};
use super::super::{RouteConfig, RouteMatch, VhostConfig};
use super::{loc, Ctx};
use crate::static_files::{check_pattern, DEFAULT_DENY};

/// Compiled regexes are capped so a route cannot make every request expensive.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

impl Ctx {
    /// Compiles every vhost; `pools` are the defined pool names.
    pub(super) fn vhosts(&mut self, specs: Vec<VhostSpec>, pools: &[&str]) -> Vec<VhostConfig> {
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
            let host_specs = spec.hosts.as_deref().unwrap_or_default();
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
            let follow_symlinks = spec.follow_symlinks.as_ref().is_some_and(|f| f.value);
            if follow_symlinks && spec.static_dir.is_none() {
                self.err(
                    &format!("{p}.follow_symlinks"),
                    spec.follow_symlinks.as_ref().and_then(loc),
                    "follow_symlinks applies to files served from `static`, which is not set",
                );
            }
            let static_deny = match &spec.static_deny {
                None => DEFAULT_DENY.iter().map(|p| p.to_string()).collect(),
                Some(list) => {
                    if spec.static_dir.is_none() {
                        self.err(
                            &format!("{p}.static_deny"),
                            list.first().and_then(loc),
                            "static_deny applies to files served from `static`, which is not set",
                        );
                    }
                    let mut out = Vec::new();
                    for (j, t) in list.iter().enumerate() {
                        match check_pattern(&t.value) {
                            Ok(()) => out.push(t.value.clone()),
                            Err(e) => self.err(&format!("{p}.static_deny[{j}]"), loc(t), e),
                        }
                    }
                    out
                }
            };
            let server_name = spec.server_name.as_ref().and_then(|t| {
                let v = t.value.as_str();
                let ok = !v.is_empty()
                    && !v.contains('*')
                    && v.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
                if !ok {
                    self.err(
                        &format!("{p}.server_name"),
                        loc(t),
                        "server_name must be one host name, without `*`, spaces or `/`",
                    );
                }
                ok.then(|| v.to_ascii_lowercase())
            });
            let routes = self.routes(spec.routes.unwrap_or_default(), &p, pools);
            if let (Some(root), Some(pool)) = (root, pool) {
                out.push(VhostConfig {
                    hosts,
                    root,
                    pool,
                    index,
                    static_dir,
                    follow_symlinks,
                    static_deny,
                    server_name,
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
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_string(),
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
