//! The PROXY protocol (HAProxy's, v1 text and v2 binary) on listeners behind an L4 load
//! balancer: the client's real address arrives as a header before any TLS or HTTP byte.
//!
//! Only the header is consumed (peeked first, then read exactly; a header split across
//! segments is read a byte at a time for v1, by its announced length for v2), so the TLS
//! handshake or HTTP request that follows is untouched. A connection whose first bytes are not a valid
//! header is refused: on a listener configured for it, a missing header means someone
//! bypassed the load balancer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// The v2 signature.
const V2_SIG: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 header, CRLF included (spec: 107 bytes).
const V1_MAX: usize = 107;

/// Why a header was refused.
#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    /// The connection closed or failed before a header arrived.
    #[error("reading PROXY header: {0}")]
    Io(#[from] std::io::Error),
    /// Nothing came within the timeout.
    #[error("no PROXY header within the timeout")]
    Timeout,
    /// The bytes are not a PROXY header.
    #[error("invalid PROXY header: {0}")]
    Invalid(&'static str),
}

/// Reads the header. `Ok(Some((src, dst)))` for a proxied TCP connection; `Ok(None)` for
/// `UNKNOWN` / `LOCAL` (health checks of the load balancer itself): use the socket's peer.
pub async fn read_header(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyHeaderError> {
    match tokio::time::timeout(timeout, read_inner(stream)).await {
        Ok(r) => r,
        Err(_) => Err(ProxyHeaderError::Timeout),
    }
}

async fn read_inner(
    stream: &mut TcpStream,
) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyHeaderError> {
    let mut peek = [0u8; 232];
    let n = stream.peek(&mut peek).await?;
    if n == 0 {
        return Err(ProxyHeaderError::Invalid(
            "connection closed before the header",
        ));
    }
    let seen = &peek[..n];
    if b"PROXY ".starts_with(&seen[..n.min(6)]) {
        // Nearly always the whole line came in one segment.
        if let Some(end) = seen.windows(2).position(|w| w == b"\r\n") {
            let mut line = vec![0u8; end + 2];
            stream.read_exact(&mut line).await?;
            return parse_v1(&line[..end]);
        }
        if n >= V1_MAX {
            return Err(ProxyHeaderError::Invalid("v1 header without CRLF"));
        }
        // Split: a byte at a time, each read waiting for data (peeking again would find
        // the same bytes at once and spin), and nothing past the CRLF is consumed.
        let mut line = Vec::with_capacity(V1_MAX);
        while !line.ends_with(b"\r\n") {
            if line.len() >= V1_MAX {
                return Err(ProxyHeaderError::Invalid("v1 header without CRLF"));
            }
            line.push(stream.read_u8().await?);
        }
        if !line.starts_with(b"PROXY ") {
            return Err(ProxyHeaderError::Invalid("no PROXY protocol signature"));
        }
        return parse_v1(&line[..line.len() - 2]);
    }
    if V2_SIG.starts_with(&seen[..n.min(12)]) {
        // Fixed part, then the announced length: read exactly, waiting as needed.
        let mut fixed = [0u8; 16];
        stream.read_exact(&mut fixed).await?;
        if &fixed[..12] != V2_SIG {
            return Err(ProxyHeaderError::Invalid("no PROXY protocol signature"));
        }
        let len = usize::from(u16::from_be_bytes([fixed[14], fixed[15]]));
        let mut header = vec![0u8; 16 + len];
        header[..16].copy_from_slice(&fixed);
        stream.read_exact(&mut header[16..]).await?;
        return parse_v2(&header);
    }
    Err(ProxyHeaderError::Invalid("no PROXY protocol signature"))
}

/// `PROXY TCP4 1.2.3.4 5.6.7.8 1111 2222` (without CRLF).
pub fn parse_v1(line: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyHeaderError> {
    let text = std::str::from_utf8(line)
        .map_err(|_| ProxyHeaderError::Invalid("v1 header is not ASCII"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(ProxyHeaderError::Invalid("v1 header must start with PROXY"));
    }
    let proto = parts
        .next()
        .ok_or(ProxyHeaderError::Invalid("v1 header without protocol"))?;
    if proto == "UNKNOWN" {
        return Ok(None);
    }
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(ProxyHeaderError::Invalid(
            "v1 header needs 4 address fields",
        ));
    };
    let ip = |s: &str| -> Result<IpAddr, ProxyHeaderError> {
        let ip: IpAddr = s
            .parse()
            .map_err(|_| ProxyHeaderError::Invalid("v1 header with a bad address"))?;
        match (proto, ip) {
            ("TCP4", IpAddr::V4(_)) | ("TCP6", IpAddr::V6(_)) => Ok(ip),
            _ => Err(ProxyHeaderError::Invalid(
                "v1 address family does not match",
            )),
        }
    };
    let port = |s: &str| {
        s.parse::<u16>()
            .map_err(|_| ProxyHeaderError::Invalid("v1 header with a bad port"))
    };
    Ok(Some((
        SocketAddr::new(ip(src)?, port(sport)?),
        SocketAddr::new(ip(dst)?, port(dport)?),
    )))
}

/// A whole v2 header (signature, version/command, family, length, addresses, TLVs).
pub fn parse_v2(h: &[u8]) -> Result<Option<(SocketAddr, SocketAddr)>, ProxyHeaderError> {
    if h.len() < 16 || &h[..12] != V2_SIG {
        return Err(ProxyHeaderError::Invalid("v2 signature"));
    }
    if h[12] >> 4 != 2 {
        return Err(ProxyHeaderError::Invalid("v2 version"));
    }
    let body = &h[16..];
    match h[12] & 0x0f {
        0 => return Ok(None), // LOCAL: the balancer's own connection
        1 => {}
        _ => return Err(ProxyHeaderError::Invalid("v2 command")),
    }
    match h[13] {
        // TCP over IPv4
        0x11 if body.len() >= 12 => {
            let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
            let sp = u16::from_be_bytes([body[8], body[9]]);
            let dp = u16::from_be_bytes([body[10], body[11]]);
            Ok(Some((
                SocketAddr::new(src.into(), sp),
                SocketAddr::new(dst.into(), dp),
            )))
        }
        // TCP over IPv6
        0x21 if body.len() >= 36 => {
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&body[..16]);
            d.copy_from_slice(&body[16..32]);
            let sp = u16::from_be_bytes([body[32], body[33]]);
            let dp = u16::from_be_bytes([body[34], body[35]]);
            Ok(Some((
                SocketAddr::new(Ipv6Addr::from(s).into(), sp),
                SocketAddr::new(Ipv6Addr::from(d).into(), dp),
            )))
        }
        // UNSPEC or other families: keep the socket's addresses.
        0x00 => Ok(None),
        _ => Err(ProxyHeaderError::Invalid("v2 address family or length")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_forms() {
        let (s, d) = parse_v1(b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443")
            .unwrap()
            .unwrap();
        assert_eq!(s, "192.0.2.1:56324".parse().unwrap());
        assert_eq!(d, "198.51.100.2:443".parse().unwrap());
        let (s, _) = parse_v1(b"PROXY TCP6 2001:db8::1 2001:db8::2 1 2")
            .unwrap()
            .unwrap();
        assert_eq!(s, "[2001:db8::1]:1".parse().unwrap());
        assert!(parse_v1(b"PROXY UNKNOWN").unwrap().is_none());
        for bad in [
            &b"PROXY TCP4 1.2.3.4 5.6.7.8 1"[..],
            b"PROXY TCP4 ::1 ::1 1 2",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 99999 1",
            b"GET / HTTP/1.1",
            b"PROXY",
        ] {
            assert!(parse_v1(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn v2_forms() {
        let mut h = V2_SIG.to_vec();
        h.extend_from_slice(&[
            0x21, 0x11, 0, 12, 10, 0, 0, 1, 10, 0, 0, 2, 0x1f, 0x90, 0x01, 0xbb,
        ]);
        let (s, d) = parse_v2(&h).unwrap().unwrap();
        assert_eq!(s, "10.0.0.1:8080".parse().unwrap());
        assert_eq!(d, "10.0.0.2:443".parse().unwrap());
        let mut local = V2_SIG.to_vec();
        local.extend_from_slice(&[0x20, 0x00, 0, 0]);
        assert!(parse_v2(&local).unwrap().is_none());
        let mut short = V2_SIG.to_vec();
        short.extend_from_slice(&[0x21, 0x11, 0, 4, 1, 2, 3, 4]);
        assert!(parse_v2(&short).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for len in 0..300 {
            let mut v = Vec::with_capacity(len);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            let _ = parse_v1(&v);
            let mut h = V2_SIG.to_vec();
            h.extend_from_slice(&v);
            let _ = parse_v2(&h);
        }
    }
}
