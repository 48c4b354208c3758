//! Who the client is behind trusted proxies: `X-Forwarded-For` walked from the right, or
//! `X-Real-IP`, as `trusted_proxies` and `real_ip_header` say.

use std::net::{IpAddr, SocketAddr};

use crate::config::{Cidr, RealIpHeader};

/// The peer is one of `nets` (none configured: nobody is).
pub fn is_trusted(nets: &[Cidr], ip: IpAddr) -> bool {
    !nets.is_empty() && nets.iter().any(|n| n.contains(ip))
}

/// The client behind trusted proxies (nginx's `real_ip_recursive on`): walking
/// `X-Forwarded-For` from the right, the first address that is not itself a trusted proxy.
/// Entries left of it are never read: the client wrote those, and one it garbled must not
/// make the answer a proxy's own address. An entry that does not parse ends the walk at the
/// last trusted proxy passed, as does a list of trusted proxies only. Without the header,
/// or when the config names it as the one to believe, `X-Real-IP`.
pub fn forwarded_client(
    headers: &http::HeaderMap,
    trusted: &[Cidr],
    which: RealIpHeader,
) -> Option<IpAddr> {
    let mut values = headers.get_all("x-forwarded-for").iter().rev().peekable();
    if which == RealIpHeader::XRealIp || values.peek().is_none() {
        return headers
            .get("x-real-ip")
            .and_then(|v| v.to_str().ok())
            .and_then(|s| parse_hop(s.trim()));
    }
    let mut last_proxy = None;
    for v in values {
        let Ok(v) = v.to_str() else {
            return last_proxy;
        };
        for part in v.rsplit(',') {
            let Some(ip) = parse_hop(part.trim()) else {
                return last_proxy;
            };
            if !is_trusted(trusted, ip) {
                return Some(ip);
            }
            last_proxy = Some(ip);
        }
    }
    last_proxy
}

/// An address as proxies write it: `1.2.3.4`, `2001:db8::1`, `[2001:db8::1]:443`, `1.2.3.4:5678`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    s.parse::<IpAddr>()
        .ok()
        .or_else(|| s.parse::<SocketAddr>().ok().map(|a| a.ip()))
}

#[cfg(test)]
mod tests {
    use http::HeaderValue;

    use super::*;

    fn client_of(xff: &[&str], real_ip: Option<&str>) -> Option<IpAddr> {
        client_by(xff, real_ip, RealIpHeader::XForwardedFor)
    }

    fn client_by(xff: &[&str], real_ip: Option<&str>, which: RealIpHeader) -> Option<IpAddr> {
        let mut h = http::HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        if let Some(v) = real_ip {
            h.insert("x-real-ip", HeaderValue::from_str(v).unwrap());
        }
        let trusted = [Cidr::parse("10.0.0.0/8").unwrap()];
        forwarded_client(&h, &trusted, which)
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn the_client_is_the_right_most_untrusted_hop_whatever_the_client_wrote_left_of_it() {
        assert_eq!(
            client_of(&["203.0.113.7, 10.0.0.5"], None),
            ip("203.0.113.7")
        );
        // Garbage, empty entries and spoofed trusted addresses left of the real hop.
        for spoof in ["x", "", "unknown", "10.0.0.1", "::1, nonsense"] {
            let v = format!("{spoof}, 203.0.113.7");
            assert_eq!(client_of(&[&v], None), ip("203.0.113.7"), "{v}");
        }
        // Several headers: the last one's last entry is the right-most.
        assert_eq!(
            client_of(&["198.51.100.1", "203.0.113.7, 10.0.0.5"], None),
            ip("203.0.113.7")
        );
        assert_eq!(
            client_of(&["198.51.100.1", "10.0.0.5"], None),
            ip("198.51.100.1")
        );
        assert_eq!(client_of(&["[2001:db8::1]:443"], None), ip("2001:db8::1"));
    }

    #[test]
    fn an_unreadable_hop_ends_the_walk_at_the_last_trusted_proxy() {
        assert_eq!(client_of(&["x, 10.0.0.7, 10.0.0.5"], None), ip("10.0.0.7"));
        assert_eq!(client_of(&["10.0.0.7, 10.0.0.5"], None), ip("10.0.0.7"));
        // Nothing readable: the caller falls back to the connection's address.
        assert_eq!(client_of(&["x"], None), None);
        // X-Real-IP is for requests without X-Forwarded-For.
        assert_eq!(client_of(&[], Some("198.51.100.9")), ip("198.51.100.9"));
        assert_eq!(
            client_of(&["203.0.113.7"], Some("198.51.100.9")),
            ip("203.0.113.7")
        );
        // Configured to believe X-Real-IP: the client's own X-Forwarded-For is ignored.
        let real = RealIpHeader::XRealIp;
        assert_eq!(
            client_by(&["127.0.0.1"], Some("198.51.100.9"), real),
            ip("198.51.100.9")
        );
        assert_eq!(client_by(&["203.0.113.7"], None, real), None);
    }
}
