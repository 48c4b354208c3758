//! The DNS wire format, only as much as endpoint discovery needs (RFC 1035): a query with
//! one question and recursion desired, and the A/AAAA addresses of a response.
//!
//! Responses are untrusted bytes: every read is bounds-checked, compression pointers are
//! followed a bounded number of times, and nothing here can panic. A CNAME chain inside the
//! answer section is followed (a recursive server puts the target's records right after
//! it); nothing outside the response is ever queried.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Record type A (IPv4 address).
pub const TYPE_A: u16 = 1;
/// Record type AAAA (IPv6 address).
pub const TYPE_AAAA: u16 = 28;
/// Record type CNAME (alias).
const TYPE_CNAME: u16 = 5;
/// Class IN.
const CLASS_IN: u16 = 1;
/// Header length.
const HEADER: usize = 12;
/// Longest name on the wire, length octets included (RFC 1035 §2.3.4).
const MAX_NAME: usize = 255;
/// Longest label.
const MAX_LABEL: usize = 63;
/// Compression pointers followed within one name; a valid name needs at most one per
/// label, and this bound is what stops pointer loops.
const MAX_JUMPS: usize = 64;
/// CNAME hops followed inside one answer section.
const MAX_CNAME_HOPS: usize = 8;

/// Why a query could not be built or a response not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The name cannot be encoded (empty label, label over 63 bytes, name over 255).
    #[error("`{0}` is not a valid DNS name")]
    BadName(String),
    /// Shorter than a DNS header.
    #[error("response shorter than a DNS header")]
    Short,
    /// The id is not the query's: a stray or spoofed datagram.
    #[error("response id {got} does not match the query")]
    IdMismatch {
        /// The id in the response.
        got: u16,
    },
    /// The QR bit is clear.
    #[error("datagram is not a DNS response")]
    NotResponse,
    /// The question section does not repeat the question asked.
    #[error("response is for a different question")]
    QuestionMismatch,
    /// The server answered with an error code other than NXDOMAIN.
    #[error("server answered {0}")]
    Rcode(&'static str),
    /// The bytes do not parse.
    #[error("malformed response: {0}")]
    Malformed(&'static str),
}

/// The usable part of a response.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Answer {
    /// Addresses of the queried type for the name (or its in-answer CNAME chain), in
    /// response order.
    pub addrs: Vec<IpAddr>,
    /// The TC bit was set: `addrs` is what fitted in the datagram.
    pub truncated: bool,
    /// NXDOMAIN: the name does not exist (`addrs` is empty).
    pub nxdomain: bool,
}

/// A name in canonical form for comparison: the wire labels, each length-prefixed and
/// ASCII-lowercased (DNS names compare case-insensitively), without the root label.
type Canonical = Vec<u8>;

/// Encodes `name` (`a.b.c` or `a.b.c.`) as wire labels, without the terminating root.
fn encode_name(name: &str) -> Result<Canonical, WireError> {
    let bad = || WireError::BadName(name.to_string());
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(bad());
    }
    let mut out = Vec::with_capacity(trimmed.len() + 1);
    for label in trimmed.split('.') {
        if label.is_empty() || label.len() > MAX_LABEL {
            return Err(bad());
        }
        out.push(label.len() as u8);
        out.extend(label.bytes().map(|b| b.to_ascii_lowercase()));
    }
    // + the root label's zero octet.
    if out.len() + 1 > MAX_NAME {
        return Err(bad());
    }
    Ok(out)
}

/// A query for `name`/`qtype`, class IN, with `id` and RD set.
pub fn build_query(id: u16, name: &str, qtype: u16) -> Result<Vec<u8>, WireError> {
    let qname = encode_name(name)?;
    let mut out = Vec::with_capacity(HEADER + qname.len() + 5);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&0x0100u16.to_be_bytes()); // RD
    out.extend_from_slice(&1u16.to_be_bytes()); // QDCOUNT
    out.extend_from_slice(&[0; 6]); // AN, NS, AR counts
    out.extend_from_slice(&qname);
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    Ok(out)
}

/// The id of a datagram, if it is long enough to have one (to route it to its query).
pub fn response_id(msg: &[u8]) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.first()?, *msg.get(1)?]))
}

/// Bounds-checked big-endian reads.
fn u16_at(msg: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*msg.get(at)?, *msg.get(at + 1)?]))
}

/// Reads the (possibly compressed) name at `at`: its canonical form and the offset just
/// past it in the record being read (pointers do not move that offset past themselves).
fn read_name(msg: &[u8], at: usize) -> Result<(Canonical, usize), WireError> {
    let mut out = Vec::new();
    let mut pos = at;
    let mut end = None;
    let mut jumps = 0;
    loop {
        let len = *msg
            .get(pos)
            .ok_or(WireError::Malformed("name runs past the end"))?;
        match len & 0xC0 {
            0x00 if len == 0 => {
                return Ok((out, end.unwrap_or(pos + 1)));
            }
            0x00 => {
                let len = usize::from(len);
                let label = msg
                    .get(pos + 1..pos + 1 + len)
                    .ok_or(WireError::Malformed("label runs past the end"))?;
                out.push(len as u8);
                out.extend(label.iter().map(u8::to_ascii_lowercase));
                if out.len() + 1 > MAX_NAME {
                    return Err(WireError::Malformed("name longer than 255 bytes"));
                }
                pos += 1 + len;
            }
            0xC0 => {
                let low = *msg
                    .get(pos + 1)
                    .ok_or(WireError::Malformed("cut pointer"))?;
                jumps += 1;
                if jumps > MAX_JUMPS {
                    return Err(WireError::Malformed("compression pointer loop"));
                }
                end.get_or_insert(pos + 2);
                pos = usize::from(u16::from_be_bytes([len & 0x3F, low]));
            }
            _ => return Err(WireError::Malformed("unsupported label type")),
        }
    }
}

/// One resource record, borrowed from the message.
struct Record<'a> {
    owner: Canonical,
    rtype: u16,
    class: u16,
    /// Offset of the rdata in the message (CNAME targets may point back into it).
    rdata_at: usize,
    rdata: &'a [u8],
}

/// Reads the record at `at`; returns it and the offset past it.
fn read_record(msg: &[u8], at: usize) -> Result<(Record<'_>, usize), WireError> {
    let (owner, pos) = read_name(msg, at)?;
    let cut = WireError::Malformed("record runs past the end");
    let rtype = u16_at(msg, pos).ok_or(cut.clone())?;
    let class = u16_at(msg, pos + 2).ok_or(cut.clone())?;
    // pos + 4: TTL (4 bytes), unused: the resolve interval decides when to ask again.
    let rdlen = usize::from(u16_at(msg, pos + 8).ok_or(cut.clone())?);
    let rdata_at = pos + 10;
    let rdata = msg.get(rdata_at..rdata_at + rdlen).ok_or(cut)?;
    let record = Record {
        owner,
        rtype,
        class,
        rdata_at,
        rdata,
    };
    Ok((record, rdata_at + rdlen))
}

fn rcode_name(rcode: u16) -> &'static str {
    match rcode {
        1 => "FORMERR",
        2 => "SERVFAIL",
        4 => "NOTIMP",
        5 => "REFUSED",
        _ => "an error code",
    }
}

/// Parses the response to the query (`id`, `name`, `qtype`) built by [`build_query`].
///
/// A truncated response (TC set) yields the addresses that fitted: fpmgate does not retry
/// over TCP, and a partial set of nodes serves better than none. Records cut short in a
/// response without TC make it malformed.
pub fn parse_response(msg: &[u8], id: u16, name: &str, qtype: u16) -> Result<Answer, WireError> {
    if msg.len() < HEADER {
        return Err(WireError::Short);
    }
    let got = response_id(msg).ok_or(WireError::Short)?;
    if got != id {
        return Err(WireError::IdMismatch { got });
    }
    let flags = u16_at(msg, 2).ok_or(WireError::Short)?;
    if flags & 0x8000 == 0 {
        return Err(WireError::NotResponse);
    }
    let truncated = flags & 0x0200 != 0;
    let qdcount = u16_at(msg, 4).ok_or(WireError::Short)?;
    let ancount = u16_at(msg, 6).ok_or(WireError::Short)?;
    let qname = encode_name(name)?;

    // The question must be the one asked: with the id, that is what ties a datagram to
    // this query.
    if qdcount != 1 {
        return Err(WireError::QuestionMismatch);
    }
    let (asked, pos) = read_name(msg, HEADER)?;
    let cut = WireError::Malformed("question runs past the end");
    let (qt, qc) = (
        u16_at(msg, pos).ok_or(cut.clone())?,
        u16_at(msg, pos + 2).ok_or(cut)?,
    );
    if asked != qname || qt != qtype || qc != CLASS_IN {
        return Err(WireError::QuestionMismatch);
    }
    let mut pos = pos + 4;

    match flags & 0x000F {
        0 => {}
        3 => {
            return Ok(Answer {
                addrs: Vec::new(),
                truncated,
                nxdomain: true,
            })
        }
        rcode => return Err(WireError::Rcode(rcode_name(rcode))),
    }

    let mut records = Vec::new();
    for _ in 0..ancount {
        match read_record(msg, pos) {
            Ok((r, next)) => {
                records.push(r);
                pos = next;
            }
            Err(_) if truncated => break,
            Err(e) => return Err(e),
        }
    }

    // The names whose records answer the question: the name itself and the targets of the
    // CNAMEs reachable from it within this answer.
    let mut names = vec![qname];
    for _ in 0..MAX_CNAME_HOPS {
        let mut grew = false;
        for r in records
            .iter()
            .filter(|r| r.rtype == TYPE_CNAME && r.class == CLASS_IN)
        {
            if names.contains(&r.owner) {
                // A target that does not parse is skipped, not fatal: other records may
                // still answer the question.
                if let Ok((target, _)) = read_name(msg, r.rdata_at) {
                    if !names.contains(&target) {
                        names.push(target);
                        grew = true;
                    }
                }
            }
        }
        if !grew {
            break;
        }
    }

    let mut addrs = Vec::new();
    for r in &records {
        if r.rtype != qtype || r.class != CLASS_IN || !names.contains(&r.owner) {
            continue;
        }
        let ip = match (r.rtype, r.rdata) {
            (TYPE_A, &[a, b, c, d]) => IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
            (TYPE_AAAA, data) => match <[u8; 16]>::try_from(data) {
                Ok(octets) => IpAddr::V6(Ipv6Addr::from(octets)),
                Err(_) => continue,
            },
            // Wrong length for its type: ignore the record, keep the others.
            _ => continue,
        };
        addrs.push(ip);
    }
    Ok(Answer {
        addrs,
        truncated,
        nxdomain: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A response to `query` (as built by `build_query`): header flags, the question
    /// copied, then `answers` appended verbatim.
    fn response(query: &[u8], flags: u16, ancount: u16, answers: &[u8]) -> Vec<u8> {
        let mut out = query.to_vec();
        out[2..4].copy_from_slice(&flags.to_be_bytes());
        out[6..8].copy_from_slice(&ancount.to_be_bytes());
        out.extend_from_slice(answers);
        out
    }

    /// A record whose owner is a pointer to the question name (offset 12).
    fn rr_ptr(rtype: u16, rdata: &[u8]) -> Vec<u8> {
        let mut out = vec![0xC0, 12];
        out.extend_from_slice(&rtype.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&60u32.to_be_bytes());
        out.extend_from_slice(&(rdata.len() as u16).to_be_bytes());
        out.extend_from_slice(rdata);
        out
    }

    /// A record with an uncompressed owner name.
    fn rr_named(owner: &str, rtype: u16, rdata: &[u8]) -> Vec<u8> {
        let mut out = encode_name(owner).unwrap();
        out.push(0);
        out.extend_from_slice(&rr_ptr(rtype, rdata)[2..]);
        out
    }

    fn wire_name(name: &str) -> Vec<u8> {
        let mut n = encode_name(name).unwrap();
        n.push(0);
        n
    }

    #[test]
    fn query_layout() {
        let q = build_query(0xBEEF, "php.test.", TYPE_A).unwrap();
        assert_eq!(&q[..12], &[0xBE, 0xEF, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(&q[12..], b"\x03php\x04test\x00\x00\x01\x00\x01");
        assert_eq!(
            build_query(1, "PHP.test", TYPE_AAAA).unwrap()[12..21],
            q[12..21]
        );
    }

    #[test]
    fn bad_names_are_refused() {
        for name in ["", ".", "a..b", &"x".repeat(64), &["abc"; 64].join(".")] {
            assert!(build_query(1, name, TYPE_A).is_err(), "{name:?}");
        }
    }

    #[test]
    fn a_records_with_compression() {
        let q = build_query(7, "php.test", TYPE_A).unwrap();
        let mut answers = rr_ptr(TYPE_A, &[10, 0, 0, 5]);
        answers.extend(rr_ptr(TYPE_A, &[10, 0, 0, 6]));
        let r = response(&q, 0x8180, 2, &answers);
        let a = parse_response(&r, 7, "php.test", TYPE_A).unwrap();
        assert_eq!(
            a.addrs,
            vec![IpAddr::from([10, 0, 0, 5]), IpAddr::from([10, 0, 0, 6])]
        );
        assert!(!a.truncated && !a.nxdomain);
    }

    #[test]
    fn aaaa_records_and_case_insensitive_owner() {
        let q = build_query(9, "php.test", TYPE_AAAA).unwrap();
        let ip6 = Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1);
        let answers = rr_named("PHP.Test", TYPE_AAAA, &ip6.octets());
        let r = response(&q, 0x8180, 1, &answers);
        let a = parse_response(&r, 9, "php.test", TYPE_AAAA).unwrap();
        assert_eq!(a.addrs, vec![IpAddr::V6(ip6)]);
    }

    #[test]
    fn cname_chain_in_the_answer_is_followed_and_strangers_ignored() {
        let q = build_query(3, "web.test", TYPE_A).unwrap();
        let mut answers = rr_ptr(TYPE_CNAME, &wire_name("real.test"));
        answers.extend(rr_named("real.test", TYPE_A, &[10, 1, 1, 1]));
        // Not reachable from the question: a poisoning attempt or leftover glue.
        answers.extend(rr_named("other.test", TYPE_A, &[6, 6, 6, 6]));
        // A record of the wrong type for the question.
        answers.extend(rr_ptr(TYPE_AAAA, &[0; 16]));
        // A with a wrong rdata length.
        answers.extend(rr_ptr(TYPE_A, &[1, 2, 3]));
        let r = response(&q, 0x8180, 5, &answers);
        let a = parse_response(&r, 3, "web.test", TYPE_A).unwrap();
        assert_eq!(a.addrs, vec![IpAddr::from([10, 1, 1, 1])]);
    }

    #[test]
    fn nxdomain_and_errors() {
        let q = build_query(4, "gone.test", TYPE_A).unwrap();
        let a = parse_response(&response(&q, 0x8183, 0, &[]), 4, "gone.test", TYPE_A).unwrap();
        assert!(a.nxdomain && a.addrs.is_empty());
        assert_eq!(
            parse_response(&response(&q, 0x8182, 0, &[]), 4, "gone.test", TYPE_A),
            Err(WireError::Rcode("SERVFAIL"))
        );
        assert_eq!(
            parse_response(&response(&q, 0x8180, 0, &[]), 5, "gone.test", TYPE_A),
            Err(WireError::IdMismatch { got: 4 })
        );
        assert_eq!(
            parse_response(&q, 4, "gone.test", TYPE_A),
            Err(WireError::NotResponse)
        );
        assert_eq!(
            parse_response(&response(&q, 0x8180, 0, &[]), 4, "other.test", TYPE_A),
            Err(WireError::QuestionMismatch)
        );
        assert_eq!(
            parse_response(&response(&q, 0x8180, 0, &[]), 4, "gone.test", TYPE_AAAA),
            Err(WireError::QuestionMismatch)
        );
        assert_eq!(
            parse_response(&q[..11], 4, "gone.test", TYPE_A),
            Err(WireError::Short)
        );
    }

    #[test]
    fn truncated_response_yields_what_fitted() {
        let q = build_query(8, "php.test", TYPE_A).unwrap();
        let mut answers = rr_ptr(TYPE_A, &[10, 0, 0, 1]);
        answers.extend(&rr_ptr(TYPE_A, &[10, 0, 0, 2])[..7]);
        // TC set: the cut second record is dropped, the first kept.
        let r = response(&q, 0x8380, 3, &answers);
        let a = parse_response(&r, 8, "php.test", TYPE_A).unwrap();
        assert_eq!(a.addrs, vec![IpAddr::from([10, 0, 0, 1])]);
        assert!(a.truncated);
        // Without TC the same bytes are malformed.
        let r = response(&q, 0x8180, 3, &answers);
        assert!(matches!(
            parse_response(&r, 8, "php.test", TYPE_A),
            Err(WireError::Malformed(_))
        ));
    }

    #[test]
    fn pointer_loops_and_bad_labels_are_malformed() {
        let q = build_query(2, "php.test", TYPE_A).unwrap();
        let at = q.len() as u8;
        // An owner that points to itself.
        let mut looped = vec![0xC0, at];
        looped.extend_from_slice(&rr_ptr(TYPE_A, &[1, 1, 1, 1])[2..]);
        let r = response(&q, 0x8180, 1, &looped);
        assert_eq!(
            parse_response(&r, 2, "php.test", TYPE_A),
            Err(WireError::Malformed("compression pointer loop"))
        );
        // Extended label types (0x40, 0x80) are not supported.
        let mut ext = vec![0x41, 0];
        ext.extend_from_slice(&rr_ptr(TYPE_A, &[1, 1, 1, 1])[2..]);
        let r = response(&q, 0x8180, 1, &ext);
        assert!(parse_response(&r, 2, "php.test", TYPE_A).is_err());
        // A pointer past the end.
        let mut far = vec![0xFF, 0xFF];
        far.extend_from_slice(&rr_ptr(TYPE_A, &[1, 1, 1, 1])[2..]);
        let r = response(&q, 0x8180, 1, &far);
        assert!(parse_response(&r, 2, "php.test", TYPE_A).is_err());
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..600),
            id in any::<u16>(),
            aaaa in any::<bool>(),
        ) {
            let qtype = if aaaa { TYPE_AAAA } else { TYPE_A };
            let _ = parse_response(&bytes, id, "php.test", qtype);
            let _ = response_id(&bytes);
        }

        /// Garbage after a valid header and question reaches the record parser, where
        /// most of the hostile cases live.
        #[test]
        fn arbitrary_answers_never_panic(
            tail in proptest::collection::vec(any::<u8>(), 0..400),
            ancount in any::<u16>(),
            flags in any::<u16>(),
        ) {
            let q = build_query(42, "php.test", TYPE_A).unwrap();
            let r = response(&q, flags | 0x8000, ancount, &tail);
            let _ = parse_response(&r, 42, "php.test", TYPE_A);
        }

        #[test]
        fn addresses_round_trip(ips in proptest::collection::vec(any::<[u8; 4]>(), 0..20)) {
            let q = build_query(11, "php.test", TYPE_A).unwrap();
            let answers: Vec<u8> = ips.iter().flat_map(|ip| rr_ptr(TYPE_A, ip)).collect();
            let r = response(&q, 0x8180, ips.len() as u16, &answers);
            let a = parse_response(&r, 11, "php.test", TYPE_A).unwrap();
            let want: Vec<IpAddr> = ips.iter().map(|&ip| IpAddr::from(ip)).collect();
            prop_assert_eq!(a.addrs, want);
        }
    }
}
