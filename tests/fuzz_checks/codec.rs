//! The FastCGI record codec and the CGI response head parser, on arbitrary input.

use bytes::{Buf, Bytes, BytesMut};
use fpmgate::fastcgi::cgi::{CgiError, CgiHead, HeadParser};
use fpmgate::fastcgi::codec::{
    decode_pairs, decode_record, parse_begin_request, parse_end_request, split_partial_stdout,
    DecodeError, Pair, ParamsWriter, Record, RecordType, HEADER_LEN, MAX_CONTENT_LEN, VERSION_1,
};
use http::HeaderMap;

use super::Cursor;

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

    // A response body read as it streams, records split as they arrive: the same bytes
    // however the stream was cut, and what whole records give, plus at most the part of
    // an unfinished STDOUT record at the end.
    let streamed = stream_stdout(stream, &[stream.len()]);
    assert_eq!(
        streamed,
        stream_stdout(stream, &cuts),
        "a streamed body depends on how the stream was cut into reads"
    );
    let gathered = stdout_until_end(&whole.records);
    assert!(
        streamed.starts_with(&gathered) && streamed.len() - gathered.len() <= MAX_CONTENT_LEN,
        "a streamed body is not the records' STDOUT"
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

/// STDOUT of a response as `FcgiBody` reads it: whole records decoded, a STDOUT record
/// not yet whole split off as it arrives and continued by its remaining lengths, up to
/// END_REQUEST, a record of another kind, or a decode error.
fn stream_stdout(stream: &[u8], cuts: &[usize]) -> Vec<u8> {
    let (mut buf, mut out) = (BytesMut::new(), Vec::new());
    let (mut left, mut pad, mut fed) = (0usize, 0usize, 0);
    for &cut in cuts {
        buf.extend_from_slice(&stream[fed..fed + cut]);
        fed += cut;
        loop {
            if left > 0 {
                if buf.is_empty() {
                    break;
                }
                let n = left.min(buf.len());
                out.extend_from_slice(&buf.split_to(n));
                left -= n;
                continue;
            }
            if pad > 0 {
                let n = pad.min(buf.len());
                buf.advance(n);
                pad -= n;
                if pad > 0 {
                    break;
                }
                continue;
            }
            match decode_record(&mut buf) {
                Ok(Some(r)) if r.kind == RecordType::Stdout => out.extend_from_slice(&r.content),
                Ok(Some(r)) if r.kind == RecordType::Stderr => {}
                Ok(Some(_)) | Err(_) => return out,
                Ok(None) => match split_partial_stdout(&mut buf, 1) {
                    Some((content, l, p)) => {
                        out.extend_from_slice(&content);
                        (left, pad) = (l, p);
                    }
                    None => break,
                },
            }
        }
    }
    out
}

/// The STDOUT contents of whole records, up to END_REQUEST or a record of another kind.
fn stdout_until_end(records: &[Record]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        match r.kind {
            RecordType::Stdout => out.extend_from_slice(&r.content),
            RecordType::Stderr => {}
            _ => break,
        }
    }
    out
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

pub(super) fn cgi_header_name(name: &[u8]) -> Vec<u8> {
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
pub(super) fn read_params_stream(encoded: &[u8], request_id: u16) -> (Vec<Pair>, usize) {
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
