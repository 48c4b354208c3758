//! Properties checked on arbitrary input, shared by the cargo-fuzz targets
//! under `fuzz/` and by `tests/fuzz_regressions.rs`, which replays saved
//! inputs through the very same code on stable Rust.
//!
//! Each entry point takes raw fuzzer bytes, carves them into the arguments
//! it needs without any other crate (so the regression test needs no extra
//! dev-dependency), and panics with a message naming the broken property.
//! A panic inside fpmgate itself is a finding too: every function exercised
//! here documents that it never panics on input.

// Each fuzz target uses only one entry point of this module.
#![allow(dead_code)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use bytes::{Bytes, BytesMut};
use fpmgate::fastcgi::cgi::{CgiError, CgiHead, HeadParser};
use fpmgate::fastcgi::codec::{
    decode_pairs, decode_record, parse_begin_request, parse_end_request, DecodeError, Pair,
    ParamsWriter, Record, RecordType, HEADER_LEN, MAX_CONTENT_LEN, VERSION_1,
};
use fpmgate::mapping::{
    normalize_path, resolve, split_script, write_params, AddrText, LocalFile, MapError, ParamSink,
    RequestFacts, Resolved, VhostFacts,
};
use http::{HeaderMap, HeaderName, HeaderValue};

/// Reads the fuzzer's bytes front to back; running out yields zeros, so
/// every input, even an empty one, maps to some arguments.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        for b in &mut out {
            *b = self.byte();
        }
        out
    }

    /// A count byte (mod 16) then that many piece lengths; what is left is
    /// the stream, cut into those pieces with whatever remains as the last.
    /// Returns the stream and the piece lengths (summing to its length).
    fn split_stream(mut self) -> (&'a [u8], Vec<usize>) {
        let count = self.byte() % 16;
        let wanted: Vec<usize> = (0..count).map(|_| usize::from(self.byte())).collect();
        let stream = self.0;
        let mut left = stream.len();
        let mut cuts = Vec::with_capacity(wanted.len() + 1);
        for len in wanted {
            let len = len.min(left);
            cuts.push(len);
            left -= len;
        }
        cuts.push(left);
        (stream, cuts)
    }
}

// ---------------------------------------------------------------------------
// FastCGI record codec
// ---------------------------------------------------------------------------

/// Decodes a record stream delivered in arbitrary pieces, checks every step
/// against the header bytes, requires the same outcome as decoding it in one
/// piece, and feeds every record's content to the body parsers.
pub fn fastcgi_decode(data: &[u8]) {
    let (stream, cuts) = Cursor(data).split_stream();
    let whole = decode_stream(stream, &[stream.len()]);
    let chunked = decode_stream(stream, &cuts);
    assert_eq!(
        whole, chunked,
        "decoding depends on how the stream was cut into reads"
    );

    let mut params = Vec::new();
    for record in &whole.records {
        check_record_bodies(&record.content);
        if record.kind == RecordType::Params {
            params.extend_from_slice(&record.content);
        }
    }
    // The client concatenates a request's PARAMS contents before decoding
    // them, so a pair may straddle records.
    check_pairs(&params);
}

#[derive(Debug, PartialEq)]
struct Decoded {
    records: Vec<Record>,
    error: Option<DecodeError>,
    /// Bytes taken by the records; the rest waits for more input.
    consumed: usize,
}

/// Feeds `stream` to `decode_record` in pieces of the given lengths, draining
/// the buffer after each piece like a read loop does.
fn decode_stream(stream: &[u8], cuts: &[usize]) -> Decoded {
    let mut buf = BytesMut::new();
    let mut records = Vec::new();
    // Invariant: `buf` holds exactly `stream[offset..fed]`.
    let mut offset = 0;
    let mut fed = 0;
    for &cut in cuts {
        buf.extend_from_slice(&stream[fed..fed + cut]);
        fed += cut;
        loop {
            let pending = &stream[offset..fed];
            match decode_record(&mut buf) {
                Ok(Some(record)) => {
                    let used = check_decoded(pending, &record);
                    offset += used;
                    assert_eq!(
                        &buf[..],
                        &stream[offset..fed],
                        "decode_record left the buffer out of step with the record it returned"
                    );
                    records.push(record);
                }
                Ok(None) => {
                    assert_eq!(
                        &buf[..],
                        pending,
                        "Ok(None) must leave the buffer untouched"
                    );
                    let needed = match pending {
                        [_, _, _, _, hi, lo, pad, _, ..] => {
                            HEADER_LEN
                                + usize::from(u16::from_be_bytes([*hi, *lo]))
                                + usize::from(*pad)
                        }
                        _ => HEADER_LEN,
                    };
                    assert!(
                        needed > pending.len(),
                        "Ok(None) although the whole record ({needed} bytes) was buffered"
                    );
                    assert!(
                        buf.capacity() >= needed,
                        "Ok(None) must reserve room for the rest of the record"
                    );
                    break;
                }
                Err(error) => {
                    assert!(
                        pending.len() >= HEADER_LEN,
                        "error before a whole header: {error}"
                    );
                    assert_eq!(error, DecodeError::UnsupportedVersion(pending[0]));
                    assert_ne!(pending[0], VERSION_1, "version 1 header rejected");
                    return Decoded {
                        records,
                        error: Some(error),
                        consumed: offset,
                    };
                }
            }
        }
    }
    Decoded {
        records,
        error: None,
        consumed: offset,
    }
}

/// Checks a decoded record against the bytes it was decoded from; returns
/// how many bytes it should have consumed.
fn check_decoded(pending: &[u8], record: &Record) -> usize {
    let &[version, kind, id_hi, id_lo, len_hi, len_lo, padding, _] = pending
        .first_chunk::<HEADER_LEN>()
        .expect("record decoded from less than a header");
    assert_eq!(version, VERSION_1, "record accepted with version {version}");
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let total = HEADER_LEN + len + usize::from(padding);
    assert!(
        pending.len() >= total,
        "record decoded before it was complete"
    );
    assert_eq!(&record.content[..], &pending[HEADER_LEN..HEADER_LEN + len]);
    assert_eq!(record.kind.as_u8(), kind, "record type byte not kept");
    assert_eq!(RecordType::from_u8(kind), record.kind);
    assert_eq!(record.request_id, u16::from_be_bytes([id_hi, id_lo]));
    total
}

fn check_record_bodies(content: &[u8]) {
    match parse_end_request(content) {
        Ok(end) => {
            assert!(
                content.len() >= 8,
                "END_REQUEST body accepted from {} bytes",
                content.len()
            );
            assert_eq!(
                end.app_status,
                u32::from_be_bytes([content[0], content[1], content[2], content[3]])
            );
            assert_eq!(end.protocol_status.as_u8(), content[4]);
        }
        Err(error) => {
            assert!(content.len() < 8, "whole END_REQUEST body rejected");
            assert_eq!(error, DecodeError::BadEndRequest);
        }
    }
    match parse_begin_request(content) {
        Ok((role, flags)) => {
            assert!(
                content.len() >= 8,
                "BEGIN_REQUEST body accepted from {} bytes",
                content.len()
            );
            assert_eq!(role, u16::from_be_bytes([content[0], content[1]]));
            assert_eq!(flags, content[2]);
        }
        Err(error) => {
            assert!(content.len() < 8, "whole BEGIN_REQUEST body rejected");
            assert_eq!(error, DecodeError::BadBeginRequest);
        }
    }
    check_pairs(content);
}

/// Decodes a pair stream and, when it is well formed, re-encodes the pairs
/// with the request-side writer and checks they come back unchanged.
fn check_pairs(data: &[u8]) {
    let Ok(pairs) = decode_pairs(data) else {
        return;
    };
    let encoded_len: usize = pairs
        .iter()
        .map(|(name, value)| {
            pair_len_size(name.len()) + pair_len_size(value.len()) + name.len() + value.len()
        })
        .sum();
    assert!(
        encoded_len <= data.len(),
        "decode_pairs produced more than it was given"
    );

    let mut out = BytesMut::new();
    let mut writer = ParamsWriter::new(&mut out, 7);
    for (name, value) in &pairs {
        writer.add(name, value);
    }
    writer.finish();
    let (decoded, content_len) = read_params_stream(&out, 7);
    assert_eq!(decoded, pairs, "PARAMS round trip lost pairs");
    assert_eq!(
        content_len, encoded_len,
        "ParamsWriter did not use the short length form"
    );

    // The header form: `HTTP_` + name upper-cased with '-' turned into '_'.
    let mut out = BytesMut::new();
    let mut writer = ParamsWriter::new(&mut out, 9);
    for (name, value) in &pairs {
        writer.add_header(name, value);
    }
    writer.finish();
    let expected: Vec<Pair> = pairs
        .iter()
        .map(|(name, value)| (cgi_header_name(name), value.clone()))
        .collect();
    assert_eq!(
        read_params_stream(&out, 9).0,
        expected,
        "add_header round trip"
    );
}

/// Size of the shortest length encoding, which the writer must use.
fn pair_len_size(len: usize) -> usize {
    if len < 0x80 {
        1
    } else {
        4
    }
}

fn cgi_header_name(name: &[u8]) -> Vec<u8> {
    let mut out = b"HTTP_".to_vec();
    out.extend(name.iter().map(|&b| match b {
        b'-' => b'_',
        other => other.to_ascii_uppercase(),
    }));
    out
}

/// Decodes what a `ParamsWriter` wrote: PARAMS records of `request_id`, none
/// empty or overlong except the single empty terminator at the very end.
/// Returns the pairs and the length of the pair stream they came from.
fn read_params_stream(encoded: &[u8], request_id: u16) -> (Vec<Pair>, usize) {
    let mut buf = BytesMut::from(encoded);
    let mut content = Vec::new();
    let mut ended = false;
    while !buf.is_empty() {
        let record = decode_record(&mut buf)
            .expect("ParamsWriter output must decode")
            .expect("ParamsWriter left a truncated record");
        assert!(!ended, "record after the empty PARAMS terminator");
        assert_eq!(record.kind, RecordType::Params);
        assert_eq!(record.request_id, request_id);
        assert!(record.content.len() <= MAX_CONTENT_LEN);
        ended = record.content.is_empty();
        content.extend_from_slice(&record.content);
    }
    assert!(ended, "PARAMS stream without its empty terminator");
    let pairs = decode_pairs(&content).expect("ParamsWriter output must hold whole pairs");
    (pairs, content.len())
}

// ---------------------------------------------------------------------------
// CGI response head
// ---------------------------------------------------------------------------

/// Parses a CGI head fed in arbitrary pieces under a limit taken from the
/// first two bytes, checks what the parser returns against the input, and
/// requires the same outcome as feeding it in one piece.
pub fn cgi_head(data: &[u8]) {
    let mut cursor = Cursor(data);
    let limit = usize::from(u16::from_be_bytes(cursor.array()));
    let (stream, cuts) = cursor.split_stream();
    let whole = parse_head(limit, stream, &[stream.len()]);
    let chunked = parse_head(limit, stream, &cuts);
    assert_eq!(
        whole, chunked,
        "CGI head parsing depends on how STDOUT was cut into records"
    );
}

#[derive(Debug, PartialEq)]
enum HeadOutcome {
    /// Every piece was taken and the head is still open.
    Pending,
    /// The head, and how many input bytes it took (blank line included).
    Head {
        status: http::StatusCode,
        headers: HeaderMap,
        head_len: usize,
    },
    Error(String),
}

fn parse_head(limit: usize, stream: &[u8], cuts: &[usize]) -> HeadOutcome {
    let mut parser = HeadParser::new(limit);
    let mut fed = 0;
    for (i, &cut) in cuts.iter().enumerate() {
        let chunk = Bytes::copy_from_slice(&stream[fed..fed + cut]);
        fed += cut;
        match parser.push(chunk.clone()) {
            Ok(None) => {}
            Ok(Some((head, rest))) => {
                let head_len = check_head_found(limit, &stream[..fed], &chunk, &head, &rest);
                // The body that follows belongs to the caller: nothing more
                // may be fed to the parser, not even an empty piece.
                assert!(
                    parser.push(Bytes::new()).is_err(),
                    "empty push accepted after the head"
                );
                for &later in &cuts[i + 1..] {
                    let piece = Bytes::copy_from_slice(&stream[fed..fed + later]);
                    fed += later;
                    assert!(parser.push(piece).is_err(), "push accepted after the head");
                }
                return HeadOutcome::Head {
                    status: head.status,
                    headers: head.headers,
                    head_len,
                };
            }
            Err(error) => {
                if matches!(error, CgiError::TooLarge) {
                    assert!(
                        fed >= limit,
                        "TooLarge after {fed} bytes under a {limit}-byte limit"
                    );
                }
                return HeadOutcome::Error(error.to_string());
            }
        }
    }
    assert!(
        fed < limit,
        "{fed} bytes without a head end accepted under a {limit}-byte limit"
    );
    HeadOutcome::Pending
}

/// Checks a returned head against `input` (everything pushed so far) and the
/// last pushed `chunk`; returns the head's length.
fn check_head_found(
    limit: usize,
    input: &[u8],
    chunk: &Bytes,
    head: &CgiHead,
    rest: &Bytes,
) -> usize {
    assert!(
        rest.len() <= chunk.len(),
        "rest longer than the chunk it came from"
    );
    assert!(input.ends_with(rest), "rest is not a suffix of the input");
    let range = chunk.as_ptr_range();
    assert!(
        rest.is_empty() || range.contains(&rest.as_ptr()),
        "rest is not a slice of the pushed chunk"
    );
    let head_len = input.len() - rest.len();
    assert!(
        head_len <= limit,
        "{head_len}-byte head accepted under a {limit}-byte limit"
    );

    // The head is lines ended by LF (CR optional), the first empty one last.
    let head_bytes = &input[..head_len];
    let body = head_bytes
        .strip_suffix(b"\n")
        .expect("head does not end with LF");
    let mut lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    let last = lines.pop().unwrap_or_default();
    assert!(
        last.is_empty() || last == b"\r",
        "head ended on a non-empty line"
    );
    for line in lines {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(!line.is_empty(), "head did not end at its first empty line");
    }

    let status = head.status.as_u16();
    assert!((100..=999).contains(&status), "status {status}");
    for (name, value) in &head.headers {
        assert_ne!(name.as_str(), "status", "Status passed on as a header");
        for hop in [
            "connection",
            "transfer-encoding",
            "te",
            "trailer",
            "upgrade",
            "keep-alive",
            "proxy-connection",
        ] {
            assert_ne!(name.as_str(), hop, "hop-by-hop header passed on");
        }
        if name == http::header::CONTENT_LENGTH {
            let v = value.as_bytes();
            assert!(
                !v.is_empty() && v.iter().all(u8::is_ascii_digit),
                "bad Content-Length passed on: {value:?}"
            );
        }
    }
    assert!(
        head.headers
            .get_all(http::header::CONTENT_LENGTH)
            .iter()
            .count()
            <= 1,
        "repeated Content-Length passed on"
    );
    head_len
}

// ---------------------------------------------------------------------------
// Request mapping
// ---------------------------------------------------------------------------

/// Names no header may reach PHP under (hop-by-hop, httpoxy, and host, which
/// is sent from the request's authority instead).
const NEVER_PASSED: [&str; 8] = [
    "connection",
    "keep-alive",
    "te",
    "transfer-encoding",
    "upgrade",
    "proxy-connection",
    "proxy",
    "host",
];

/// Carves a request out of the input — a fixed prefix of flags, addresses
/// and length, then 0xFF-separated fields (0xFF never occurs in UTF-8, so
/// fields can hold any text, NUL, CR and LF included) — and runs it through
/// normalisation, the script split, resolution and the param writer.
pub fn request_mapping(data: &[u8]) {
    let mut cursor = Cursor(data);
    let flags = cursor.byte();
    let local_mode = cursor.byte();
    let remote_ip: [u8; 16] = cursor.array();
    let remote_port = u16::from_be_bytes(cursor.array());
    let local_ip: [u8; 4] = cursor.array();
    let local_port = u16::from_be_bytes(cursor.array());
    let content_length = u64::from_be_bytes(cursor.array());

    let mut fields = cursor.0.split(|&b| b == 0xFF);
    let mut text = || String::from_utf8_lossy(fields.next().unwrap_or_default()).into_owned();
    let raw_path = text();
    let index = text();
    let root = text();
    let host = text();
    let first_host = if flags & 0x40 != 0 {
        "*".to_owned()
    } else {
        text()
    };
    let query = text();
    let method = text();
    let extra = text();
    let mut headers = HeaderMap::new();
    while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
        // Only what the HTTP layer could have produced reaches mapping.
        if let (Ok(name), Ok(value)) =
            (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
        {
            headers.append(name, value);
        }
    }

    // The raw string itself also goes to split_script: it must hold its
    // promises on any text, not only on normalised paths.
    check_split(&raw_path);

    let path = match normalize_path(&raw_path) {
        Ok(path) => {
            check_normalized(&raw_path, &path);
            path
        }
        Err(error) => {
            if !raw_path.starts_with('/') {
                assert_eq!(error, MapError::NotOriginForm);
            }
            return;
        }
    };
    check_split(&path);

    let index = (flags & 0x04 != 0).then_some(index.as_str());
    let seed = usize::from(local_mode >> 2);
    let local = move |p: &str| match local_mode & 3 {
        0 => LocalFile::File,
        1 => LocalFile::Missing,
        2 => LocalFile::Dir,
        _ => match (p.len() + seed) % 3 {
            0 => LocalFile::File,
            1 => LocalFile::Dir,
            _ => LocalFile::Missing,
        },
    };
    let unchecked = resolve(&path, index, None);
    check_resolved(&path, index, &unchecked, None);
    let checked = resolve(&path, index, Some(&local));
    check_resolved(&path, index, &checked, Some(&local));
    if let Resolved::Script { .. } = checked {
        assert_eq!(
            checked, unchecked,
            "the local check changed the script it let through"
        );
    }

    let remote_ip = match flags & 0x30 {
        0x00 => IpAddr::V4(Ipv4Addr::new(
            remote_ip[0],
            remote_ip[1],
            remote_ip[2],
            remote_ip[3],
        )),
        0x10 => IpAddr::V6(
            Ipv4Addr::new(remote_ip[0], remote_ip[1], remote_ip[2], remote_ip[3]).to_ipv6_mapped(),
        ),
        _ => IpAddr::V6(Ipv6Addr::from(remote_ip)),
    };
    let extra_params = [("FUZZ_EXTRA".to_owned(), extra)];
    let request_uri = if query.is_empty() {
        raw_path.clone()
    } else {
        format!("{raw_path}?{query}")
    };
    let req = RequestFacts {
        method: &method,
        request_uri: &request_uri,
        query: &query,
        headers: &headers,
        host: &host,
        protocol: "HTTP/1.1",
        https: flags & 0x01 != 0,
        tls_protocol: (flags & 0x02 != 0).then_some("TLSv1.3"),
        remote: SocketAddr::new(remote_ip, remote_port),
        local: SocketAddr::new(IpAddr::V4(Ipv4Addr::from(local_ip)), local_port),
        addr_text: None,
        content_length: (flags & 0x08 != 0).then_some(content_length),
        server_software: "fpmgate/0.1.0",
    };
    let vhost = VhostFacts {
        first_host: &first_host,
        root: &root,
        extra_params: if flags & 0x80 != 0 {
            &extra_params
        } else {
            &[]
        },
    };
    for resolved in [&unchecked, &checked] {
        if let Resolved::Script {
            script_name,
            path_info,
            document_uri,
        } = resolved
        {
            check_params(&req, &vhost, (script_name, path_info, document_uri));
        }
    }
    // Whatever the caller passes as the script, the writer must not panic.
    let mut sink = Collect::default();
    write_params(&req, &vhost, (&raw_path, &query, &host), &mut sink);
    // The connection's addresses formatted once say exactly what formatting them per
    // request says.
    let text = AddrText::new(req.remote, req.local);
    let with_text = RequestFacts {
        addr_text: Some(&text),
        ..req
    };
    let mut from_text = Collect::default();
    write_params(
        &with_text,
        &vhost,
        (&raw_path, &query, &host),
        &mut from_text,
    );
    assert_eq!(
        from_text.0, sink.0,
        "addresses {:?} {:?}",
        req.remote, req.local
    );
}

fn has_forbidden_byte(s: &str) -> bool {
    s.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n'))
}

fn check_normalized(raw: &str, path: &str) {
    assert!(path.starts_with('/'), "{raw:?} normalised to {path:?}");
    assert!(!has_forbidden_byte(path), "{raw:?} normalised to {path:?}");
    for bad in ["/../", "/./", "//"] {
        assert!(!path.contains(bad), "{raw:?} normalised to {path:?}");
    }
    for bad in ["/..", "/."] {
        assert!(!path.ends_with(bad), "{raw:?} normalised to {path:?}");
    }
    if !path.contains('%') {
        // Decoding happens once, so only a path without '%' is a fixed point.
        assert_eq!(
            normalize_path(path).as_deref(),
            Ok(path),
            "normalising {raw:?} twice is not stable"
        );
    }
}

fn check_split(path: &str) {
    let Some((script, info)) = split_script(path) else {
        return;
    };
    assert_eq!(
        format!("{script}{info}"),
        path,
        "split of {path:?} is not a split"
    );
    assert!(
        script.ends_with(".php"),
        "split of {path:?} gave script {script:?}"
    );
    let name = &script[..script.len() - ".php".len()];
    assert!(
        !name.is_empty() && !name.ends_with('/'),
        "split of {path:?} gave a script without a file name: {script:?}"
    );
    assert!(
        info.is_empty() || info.starts_with('/'),
        "split of {path:?} gave PATH_INFO {info:?}"
    );
    assert!(
        !has_forbidden_byte(path),
        "{path:?} split although it holds NUL, CR or LF"
    );
}

fn check_resolved(
    path: &str,
    index: Option<&str>,
    resolved: &Resolved,
    local: Option<&dyn Fn(&str) -> LocalFile>,
) {
    let is_file = |p: &str| local.is_none_or(|local| local(p) == LocalFile::File);
    match resolved {
        Resolved::Script {
            script_name,
            path_info,
            document_uri,
        } => {
            assert!(
                is_file(script_name),
                "{path:?}: script {script_name:?} is not a local file"
            );
            assert!(
                script_name.ends_with(".php"),
                "{path:?} resolved to script {script_name:?}"
            );
            assert!(
                script_name.starts_with('/'),
                "{path:?} resolved to script {script_name:?}"
            );
            assert!(
                !has_forbidden_byte(script_name),
                "{path:?} resolved to script {script_name:?}"
            );
            // The root plus this name must stay inside the root.
            for seg in script_name[1..].split('/') {
                assert!(
                    !matches!(seg, "" | "." | ".."),
                    "{path:?} (index {index:?}) resolved to script {script_name:?}"
                );
            }
            if document_uri == path {
                assert_eq!(format!("{script_name}{path_info}"), path);
            } else {
                // The front controller.
                assert!(
                    index.is_some(),
                    "{path:?} resolved to a front controller without an index"
                );
                assert!(path_info.is_empty());
                assert_eq!(document_uri, script_name);
            }
        }
        Resolved::Static => {
            assert!(
                local.is_some(),
                "{path:?} served statically without a local tree"
            );
            assert!(
                is_file(path),
                "{path:?} served statically but is not a local file"
            );
            let rest = path.strip_prefix("/.well-known/").unwrap_or(path);
            assert!(
                !rest.split('/').any(|seg| seg.starts_with('.')),
                "hidden {path:?} served statically"
            );
            assert!(
                !path.to_ascii_lowercase().ends_with(".php"),
                "PHP source {path:?} served statically"
            );
        }
        Resolved::NotFound => {
            if let (None, Some((script, info))) = (local, split_script(path)) {
                panic!("{path:?} splits as ({script:?}, {info:?}) but was not found");
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Param,
    Header,
}

/// The plain sink: every call, in order.
#[derive(Default, Debug)]
struct Collect(Vec<(Kind, Vec<u8>, Vec<u8>)>);

impl ParamSink for Collect {
    fn param(&mut self, name: &[u8], value: &[u8]) {
        self.0.push((Kind::Param, name.to_vec(), value.to_vec()));
    }
    fn header(&mut self, name: &[u8], value: &[u8]) {
        self.0.push((Kind::Header, name.to_vec(), value.to_vec()));
    }
}

fn check_params(req: &RequestFacts<'_>, vhost: &VhostFacts<'_>, script: (&str, &str, &str)) {
    let (script_name, path_info, document_uri) = script;
    let mut sink = Collect::default();
    write_params(req, vhost, script, &mut sink);
    let sent = &sink.0;

    let param = |name: &str| -> Vec<&[u8]> {
        sent.iter()
            .filter(|(kind, n, _)| *kind == Kind::Param && n == name.as_bytes())
            .map(|(_, _, v)| &v[..])
            .collect()
    };
    let root = vhost.root.trim_end_matches('/');
    let filename = param("SCRIPT_FILENAME");
    let [filename] = filename[..] else {
        panic!("SCRIPT_FILENAME sent {} times", filename.len());
    };
    assert!(
        filename.ends_with(b".php"),
        "SCRIPT_FILENAME {:?}",
        String::from_utf8_lossy(filename)
    );
    let below = filename.strip_prefix(root.as_bytes()).unwrap_or_else(|| {
        panic!(
            "SCRIPT_FILENAME {:?} outside root {root:?}",
            String::from_utf8_lossy(filename)
        )
    });
    assert_eq!(
        below,
        script_name.as_bytes(),
        "SCRIPT_FILENAME is not root + SCRIPT_NAME"
    );
    assert!(
        below.starts_with(b"/"),
        "SCRIPT_FILENAME {:?}",
        String::from_utf8_lossy(filename)
    );
    assert_eq!(param("SCRIPT_NAME"), [script_name.as_bytes()]);
    assert_eq!(param("PATH_INFO"), [path_info.as_bytes()]);
    assert_eq!(param("DOCUMENT_URI"), [document_uri.as_bytes()]);
    let remote = req.remote.ip().to_canonical().to_string();
    assert_eq!(param("REMOTE_ADDR"), [remote.as_bytes()]);
    let length = req
        .content_length
        .map(|n| n.to_string())
        .unwrap_or_default();
    assert_eq!(param("CONTENT_LENGTH"), [length.as_bytes()]);
    assert_eq!(param("HTTPS").len(), usize::from(req.https));
    let [server_name] = param("SERVER_NAME")[..] else {
        panic!("SERVER_NAME not sent exactly once");
    };
    if vhost.first_host == "*" || vhost.first_host.starts_with("*.") {
        assert!(
            !server_name.iter().any(u8::is_ascii_uppercase),
            "SERVER_NAME not lowercased"
        );
    } else {
        assert_eq!(server_name, vhost.first_host.as_bytes());
    }
    let mut names: Vec<&[u8]> = sent
        .iter()
        .filter(|(k, _, _)| *k == Kind::Param)
        .map(|(_, n, _)| &n[..])
        .collect();
    let count = names.len();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), count, "a param was sent twice");
    if let Some((name, value)) = vhost.extra_params.last() {
        let (kind, n, v) = sent.last().expect("nothing sent");
        assert_eq!(
            (*kind, &n[..], &v[..]),
            (Kind::Param, name.as_bytes(), value.as_bytes()),
            "pool params must come last"
        );
    }

    check_headers(req, sent);
    check_encoded(req, vhost, script, sent);
}

/// The headers that reach PHP: only `[a-z0-9-]` names, none of the
/// never-passed ones, none the client declared hop-by-hop, each once; host
/// first and only from the request's authority.
fn check_headers(req: &RequestFacts<'_>, sent: &[(Kind, Vec<u8>, Vec<u8>)]) {
    let headers: Vec<(&[u8], &[u8])> = sent
        .iter()
        .filter(|(k, _, _)| *k == Kind::Header)
        .map(|(_, n, v)| (&n[..], &v[..]))
        .collect();
    let mut rest = &headers[..];
    if !req.host.is_empty() {
        let Some(((b"host", value), after)) = rest.split_first() else {
            panic!("host not sent first: {headers:?}");
        };
        assert_eq!(*value, req.host.as_bytes());
        rest = after;
    }
    let connection: Vec<Vec<u8>> = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .flat_map(|v| {
            v.as_bytes()
                .split(|&b| b == b',')
                .map(|t| t.trim_ascii().to_ascii_lowercase())
        })
        .collect();
    let mut seen: Vec<&[u8]> = Vec::new();
    for &(name, _) in rest {
        let shown = String::from_utf8_lossy(name);
        assert!(
            !name.is_empty()
                && name
                    .iter()
                    .all(|&b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'),
            "header {shown:?} passed to PHP"
        );
        assert!(
            !NEVER_PASSED.iter().any(|n| n.as_bytes() == name),
            "header {shown:?} passed to PHP"
        );
        assert!(
            !connection.iter().any(|c| c == name),
            "Connection-listed header {shown:?} passed to PHP"
        );
        assert!(!seen.contains(&name), "header {shown:?} sent twice");
        seen.push(name);
    }
    // And nothing else is dropped.
    for name in req.headers.keys() {
        let n = name.as_str();
        let plain = n
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let dropped = NEVER_PASSED.contains(&n) || connection.iter().any(|c| c == n.as_bytes());
        if plain && !dropped {
            assert!(
                seen.contains(&n.as_bytes()),
                "header {n:?} not passed to PHP"
            );
        }
    }
}

/// What `write_params` sends through the real FastCGI encoder must decode to
/// exactly what the plain sink saw.
fn check_encoded(
    req: &RequestFacts<'_>,
    vhost: &VhostFacts<'_>,
    script: (&str, &str, &str),
    sent: &[(Kind, Vec<u8>, Vec<u8>)],
) {
    let mut out = BytesMut::new();
    let mut writer = ParamsWriter::new(&mut out, 1);
    write_params(req, vhost, script, &mut writer);
    writer.finish();
    let expected: Vec<Pair> = sent
        .iter()
        .map(|(kind, name, value)| match kind {
            Kind::Param => (name.clone(), value.clone()),
            Kind::Header => (cgi_header_name(name), value.clone()),
        })
        .collect();
    assert_eq!(
        read_params_stream(&out, 1).0,
        expected,
        "encoded params differ from the sink's"
    );
}
