//! Compiling DNS discovery settings: the top-level `dns:` section and `dns:NAME:PORT`
//! endpoint addresses. Syntax only: nothing here touches the network, so `fpmgate check`
//! gives the same verdict on a laptop as in the cluster where the names exist.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use super::super::schema::DnsSpec;
use super::super::{DnsConfig, EndpointAddr};
use super::{loc, Ctx};

/// Port of a `dns.resolver` given without one.
const DNS_PORT: u16 = 53;

/// Longest host name in text form (RFC 1035: 255 octets on the wire).
const MAX_HOST: usize = 253;

/// Compiles `dns:`, recording errors in `cx`.
pub(super) fn compile_dns(cx: &mut Ctx, spec: Option<DnsSpec>) -> DnsConfig {
    let resolver = spec
        .as_ref()
        .and_then(|s| s.resolver.as_ref())
        .and_then(|t| {
            parse_resolver(&t.value)
                .map_err(|m| cx.err("dns.resolver", loc(t), m))
                .ok()
        });
    let timeout = cx.duration_or(
        &spec.and_then(|s| s.timeout),
        "dns.timeout",
        Duration::from_secs(1),
        true,
    );
    DnsConfig { resolver, timeout }
}

/// `IP`, `IP:PORT`, `[IPv6]` or `[IPv6]:PORT`. A name is refused: resolving the resolver
/// would need another resolver.
fn parse_resolver(text: &str) -> Result<SocketAddr, String> {
    let text = text.trim();
    let addr = if let Ok(addr) = text.parse::<SocketAddr>() {
        addr
    } else if let Ok(ip) = text.trim_matches(['[', ']']).parse::<IpAddr>() {
        SocketAddr::new(ip, DNS_PORT)
    } else {
        return Err(format!(
            "invalid resolver `{text}`; expected the DNS server's `IP` or `IP:PORT`"
        ));
    };
    if addr.port() == 0 || addr.ip().is_unspecified() {
        return Err(format!(
            "`{addr}` cannot be queried; give the DNS server's address"
        ));
    }
    Ok(addr)
}

/// The part of an endpoint `addr` after `dns:`: `NAME:PORT`.
pub(super) fn parse_endpoint(rest: &str) -> Result<EndpointAddr, String> {
    let Some((host, port)) = rest.rsplit_once(':') else {
        return Err(format!(
            "`dns:{rest}` needs a port: `dns:NAME:PORT`, e.g. `dns:php-fpm.app.svc.cluster.local:9000`"
        ));
    };
    let port = match port.parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(format!(
                "invalid port `{port}` in `dns:{rest}`; expected 1 to 65535"
            ))
        }
    };
    Ok(EndpointAddr::Dns {
        host: check_host(host)?,
        port,
    })
}

/// A host name: dot-separated labels of letters, digits, `-` and `_` (1 to 63 each, no
/// `-` at either end), at most 253 characters, one trailing dot allowed. Returned
/// lowercased without the trailing dot, so `A.example.` and `a.example` are one name.
fn check_host(host: &str) -> Result<String, String> {
    if host.trim_matches(['[', ']']).parse::<IpAddr>().is_ok() {
        return Err(format!(
            "`{host}` is an IP address: write it without `dns:` (`dns:` is for names)"
        ));
    }
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    if name.is_empty() {
        return Err("`dns:` needs a host name: `dns:NAME:PORT`".into());
    }
    if name.len() > MAX_HOST {
        return Err(format!("host name is longer than {MAX_HOST} characters"));
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err(format!("invalid host name `{host}`: empty label"));
        }
        if label.len() > 63 {
            return Err(format!(
                "invalid host name `{host}`: label `{label}` is longer than 63 characters"
            ));
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-' || *c == '_'))
        {
            return Err(format!(
                "invalid host name `{host}`: unexpected character {c:?}"
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(format!(
                "invalid host name `{host}`: label `{label}` starts or ends with `-`"
            ));
        }
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{format_errors, parse_str, ConfigError};

    fn config(
        pool_extra: &str,
        addr: &str,
        top: &str,
    ) -> Result<crate::config::Config, Vec<ConfigError>> {
        let yaml = format!(
            "listen: [{{ bind: 127.0.0.1:8080 }}]\n{top}pools:\n  app:\n    endpoints:\n      - {{ addr: '{addr}', weight: 2, max_conns: 4 }}\n{pool_extra}vhosts:\n  - {{ hosts: ['*'], root: /srv, pool: app }}\n"
        );
        parse_str(&yaml, Path::new("/tmp/fpmgate.yaml"))
    }

    fn error(addr: &str) -> String {
        match config("", addr, "") {
            Ok(_) => panic!("`{addr}` accepted"),
            Err(e) => format_errors(Path::new("t"), &e),
        }
    }

    #[test]
    fn dns_endpoint_and_defaults() {
        let c = config("", "dns:PHP-fpm.App.svc.cluster.local.:9000", "").unwrap();
        let p = &c.pools[0];
        assert_eq!(
            p.endpoints[0].addr,
            EndpointAddr::Dns {
                host: "php-fpm.app.svc.cluster.local".into(),
                port: 9000
            }
        );
        assert_eq!(
            p.endpoints[0].addr.to_string(),
            "dns:php-fpm.app.svc.cluster.local:9000"
        );
        assert_eq!(p.resolve_interval, Duration::from_secs(5));
        assert_eq!(c.dns.resolver, None);
        assert_eq!(c.dns.timeout, Duration::from_secs(1));
    }

    #[test]
    fn dns_section_and_interval() {
        let c = config(
            "    resolve_interval: 500ms\n",
            "dns:fpm:9000",
            "dns: { resolver: '127.0.0.1:5353', timeout: 300ms }\n",
        )
        .unwrap();
        assert_eq!(c.pools[0].resolve_interval, Duration::from_millis(500));
        assert_eq!(c.dns.resolver, Some("127.0.0.1:5353".parse().unwrap()));
        assert_eq!(c.dns.timeout, Duration::from_millis(300));
        let c = config("", "dns:fpm:9000", "dns: { resolver: '::1' }\n").unwrap();
        assert_eq!(c.dns.resolver, Some("[::1]:53".parse().unwrap()));
    }

    #[test]
    fn bad_dns_settings() {
        for (top, extra, want) in [
            ("dns: { resolver: ns.example }\n", "", "dns.resolver"),
            ("dns: { resolver: '0.0.0.0:53' }\n", "", "cannot be queried"),
            ("dns: { timeout: 0s }\n", "", "dns.timeout"),
            ("dns: { port: 53 }\n", "", "port"),
            ("", "    resolve_interval: 0s\n", "resolve_interval"),
            ("", "    resolve_interval: soon\n", "resolve_interval"),
        ] {
            let errs = config(extra, "dns:fpm:9000", top).expect_err(top);
            let text = format_errors(Path::new("t"), &errs);
            assert!(text.contains(want), "{top}{extra}: {text}");
        }
    }

    #[test]
    fn bad_dns_endpoints() {
        for (addr, want) in [
            ("dns:bad host:9000", "unexpected character ' '"),
            ("dns:name", "needs a port"),
            ("dns:name:0", "invalid port"),
            ("dns:name:http", "invalid port"),
            ("dns::9000", "needs a host name"),
            ("dns:a..b:9000", "empty label"),
            ("dns:-a.b:9000", "starts or ends"),
            ("dns:10.0.0.1:9000", "IP address"),
            ("dns:[::1]:9000", "IP address"),
        ] {
            let text = error(addr);
            assert!(text.contains(want), "{addr}: {text}");
            assert!(
                text.contains("pools.app.endpoints[0].addr"),
                "{addr}: {text}"
            );
        }
        let long = format!("dns:{}.x:9000", "a".repeat(64));
        assert!(error(&long).contains("longer than 63"));
        let huge = format!("dns:{}x:9000", "abcdefghi.".repeat(26));
        assert!(error(&huge).contains("longer than 253"));
    }

    #[test]
    fn duplicate_dns_endpoints() {
        let yaml = "listen: [{ bind: 127.0.0.1:8080 }]\npools:\n  app:\n    endpoints:\n      - { addr: 'dns:fpm:9000' }\n      - { addr: 'dns:FPM.:9000' }\nvhosts:\n  - { hosts: ['*'], root: /srv, pool: app }\n";
        let errs = parse_str(yaml, Path::new("/tmp/fpmgate.yaml")).expect_err("duplicate");
        assert!(format_errors(Path::new("t"), &errs).contains("duplicate endpoint `dns:fpm:9000`"));
    }
}
