//! FastCGI record codec: the wire format of FastCGI 1.0 records, their
//! BEGIN_REQUEST / END_REQUEST bodies and name-value pair streams.
//!
//! This module is sans-io: it only turns bytes into records and records into
//! bytes in caller-owned buffers. It must not do I/O, hold connection state,
//! log, or decide which records are fatal — that is the client's job. Nothing
//! here may panic on any input bytes.

use bytes::{Buf, Bytes, BytesMut};

/// Length of every record header.
pub const HEADER_LEN: usize = 8;
/// Largest content a single record can carry (the length field is 16 bits).
pub const MAX_CONTENT_LEN: usize = 65535;
/// BEGIN_REQUEST flag asking the application to keep the connection open
/// after the request ends.
pub const FLAG_KEEP_CONN: u8 = 1;
/// The Responder role, the only one PHP-FPM implements.
pub const ROLE_RESPONDER: u16 = 1;
/// The only protocol version ever defined.
pub const VERSION_1: u8 = 1;

/// Largest length the 4-byte name-value length form can express.
const MAX_PAIR_LEN: usize = 0x7FFF_FFFF;

/// One decoded name-value pair: `(name, value)`.
pub type Pair = (Vec<u8>, Vec<u8>);

/// Record type byte of a FastCGI record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordType {
    /// FCGI_BEGIN_REQUEST (1).
    BeginRequest,
    /// FCGI_ABORT_REQUEST (2).
    AbortRequest,
    /// FCGI_END_REQUEST (3).
    EndRequest,
    /// FCGI_PARAMS (4).
    Params,
    /// FCGI_STDIN (5).
    Stdin,
    /// FCGI_STDOUT (6).
    Stdout,
    /// FCGI_STDERR (7).
    Stderr,
    /// FCGI_DATA (8).
    Data,
    /// FCGI_GET_VALUES (9).
    GetValues,
    /// FCGI_GET_VALUES_RESULT (10).
    GetValuesResult,
    /// FCGI_UNKNOWN_TYPE (11).
    UnknownType,
    /// Any other type byte. [`RecordType::from_u8`] never produces this for
    /// the codes above, so equality comparisons stay meaningful.
    Other(u8),
}

impl RecordType {
    /// Maps a wire type byte to a record type; unknown bytes become `Other`.
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::BeginRequest,
            2 => Self::AbortRequest,
            3 => Self::EndRequest,
            4 => Self::Params,
            5 => Self::Stdin,
            6 => Self::Stdout,
            7 => Self::Stderr,
            8 => Self::Data,
            9 => Self::GetValues,
            10 => Self::GetValuesResult,
            11 => Self::UnknownType,
            other => Self::Other(other),
        }
    }

    /// The wire type byte.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::BeginRequest => 1,
            Self::AbortRequest => 2,
            Self::EndRequest => 3,
            Self::Params => 4,
            Self::Stdin => 5,
            Self::Stdout => 6,
            Self::Stderr => 7,
            Self::Data => 8,
            Self::GetValues => 9,
            Self::GetValuesResult => 10,
            Self::UnknownType => 11,
            Self::Other(v) => v,
        }
    }
}

/// protocolStatus field of an END_REQUEST body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtocolStatus {
    /// FCGI_REQUEST_COMPLETE (0): normal end of request.
    RequestComplete,
    /// FCGI_CANT_MPX_CONN (1): the application refuses concurrent requests
    /// on one connection (PHP-FPM always behaves this way).
    CantMpxConn,
    /// FCGI_OVERLOADED (2): the application is out of resources.
    Overloaded,
    /// FCGI_UNKNOWN_ROLE (3): the requested role is not supported.
    UnknownRole,
    /// Any other status byte.
    Other(u8),
}

impl ProtocolStatus {
    /// Maps a wire status byte to a protocol status.
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::RequestComplete,
            1 => Self::CantMpxConn,
            2 => Self::Overloaded,
            3 => Self::UnknownRole,
            other => Self::Other(other),
        }
    }

    /// The wire status byte.
    pub fn as_u8(self) -> u8 {
        match self {
            Self::RequestComplete => 0,
            Self::CantMpxConn => 1,
            Self::Overloaded => 2,
            Self::UnknownRole => 3,
            Self::Other(v) => v,
        }
    }
}

/// One decoded record; padding is already stripped from `content`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Record type.
    pub kind: RecordType,
    /// Request id (0 is the management id).
    pub request_id: u16,
    /// Content bytes, sharing the decode buffer's allocation.
    pub content: Bytes,
}

/// Decoded END_REQUEST body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndRequest {
    /// Application exit status (PHP-FPM reports 0 unless the worker died).
    pub app_status: u32,
    /// Protocol-level outcome.
    pub protocol_status: ProtocolStatus,
}

/// Errors raised while decoding FastCGI data.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The record header carries a version other than 1; the peer is not
    /// speaking FastCGI (commonly an HTTP server on the configured port).
    #[error("unsupported FastCGI version {0}")]
    UnsupportedVersion(u8),
    /// END_REQUEST content shorter than its 8-byte body.
    #[error("malformed FastCGI END_REQUEST body")]
    BadEndRequest,
    /// BEGIN_REQUEST content shorter than its 8-byte body.
    #[error("malformed FastCGI BEGIN_REQUEST body")]
    BadBeginRequest,
    /// A name-value pair stream ended in the middle of a length or a pair.
    #[error("malformed FastCGI name-value pair stream")]
    BadNameValue,
}

/// Decode one whole record from the front of `buf` (header + content +
/// padding), zero-copy (`split_to(..).freeze()`). `Ok(None)` means more bytes
/// are needed: `buf` is then untouched apart from reserving room for the rest
/// of the record. Padding of any length is consumed and discarded.
pub fn decode_record(buf: &mut BytesMut) -> Result<Option<Record>, DecodeError> {
    let Some(&[version, kind, id_hi, id_lo, len_hi, len_lo, padding, _reserved]) =
        buf.first_chunk::<HEADER_LEN>()
    else {
        buf.reserve(HEADER_LEN - buf.len());
        return Ok(None);
    };
    if version != VERSION_1 {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let padding = usize::from(padding);
    let total = HEADER_LEN + len + padding;
    if buf.len() < total {
        // Reserving the whole record up front lets a read loop fill it
        // without repeated reallocation.
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    buf.advance(HEADER_LEN);
    let content = buf.split_to(len).freeze();
    buf.advance(padding);
    Ok(Some(Record {
        kind: RecordType::from_u8(kind),
        request_id: u16::from_be_bytes([id_hi, id_lo]),
        content,
    }))
}

/// The start of a STDOUT record not yet whole in `buf`, when at least `min` bytes of its
/// content are: the header is consumed and the content there split off (zero-copy), so a
/// large record streams as it arrives instead of being gathered (and copied) first.
/// Returns the content, and the content and padding bytes of the record still to come.
/// `None` (nothing consumed): a whole record, another type, or too little content yet.
pub fn split_partial_stdout(buf: &mut BytesMut, min: usize) -> Option<(Bytes, usize, usize)> {
    let &[version, kind, _, _, len_hi, len_lo, padding, _] = buf.first_chunk::<HEADER_LEN>()?;
    let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
    let padding = usize::from(padding);
    let avail = buf.len() - HEADER_LEN;
    if version != VERSION_1
        || RecordType::from_u8(kind) != RecordType::Stdout
        || avail >= len + padding
        || avail.min(len) < min.max(1)
    {
        return None;
    }
    buf.advance(HEADER_LEN);
    let content = buf.split_to(avail.min(len)).freeze();
    let left = len - content.len();
    // With the content all here, part of the padding may be too.
    let pad_here = if left == 0 { buf.len().min(padding) } else { 0 };
    buf.advance(pad_here);
    Some((content, left, padding - pad_here))
}

/// Parse an END_REQUEST body. It must be at least 8 bytes; anything after the
/// 8-byte body is ignored.
pub fn parse_end_request(content: &[u8]) -> Result<EndRequest, DecodeError> {
    let Some(&[a, b, c, d, status, ..]) = content.first_chunk::<8>() else {
        return Err(DecodeError::BadEndRequest);
    };
    Ok(EndRequest {
        app_status: u32::from_be_bytes([a, b, c, d]),
        protocol_status: ProtocolStatus::from_u8(status),
    })
}

/// Parse a BEGIN_REQUEST body into `(role, flags)`. It must be at least 8
/// bytes; anything after the 8-byte body is ignored.
pub fn parse_begin_request(content: &[u8]) -> Result<(u16, u8), DecodeError> {
    let Some(&[role_hi, role_lo, flags, ..]) = content.first_chunk::<8>() else {
        return Err(DecodeError::BadBeginRequest);
    };
    Ok((u16::from_be_bytes([role_hi, role_lo]), flags))
}

/// Reads one pair length: one byte when the high bit is clear, otherwise four
/// bytes big-endian with the high bit masked off.
fn take_pair_len(data: &mut &[u8]) -> Result<usize, DecodeError> {
    let (&first, rest) = data.split_first().ok_or(DecodeError::BadNameValue)?;
    if first & 0x80 == 0 {
        *data = rest;
        return Ok(usize::from(first));
    }
    let (&[a, b, c, d], rest) = data
        .split_first_chunk::<4>()
        .ok_or(DecodeError::BadNameValue)?;
    *data = rest;
    let len = u32::from_be_bytes([a & 0x7F, b, c, d]);
    usize::try_from(len).map_err(|_| DecodeError::BadNameValue)
}

fn take_bytes<'d>(data: &mut &'d [u8], len: usize) -> Result<&'d [u8], DecodeError> {
    let (head, rest) = data
        .split_at_checked(len)
        .ok_or(DecodeError::BadNameValue)?;
    *data = rest;
    Ok(head)
}

/// Decode a name-value pair stream (1- or 4-byte lengths; 4-byte form has the
/// high bit set). `data` must hold whole pairs: a stream ending mid-pair is
/// an error, so concatenate all PARAMS / GET_VALUES contents first.
pub fn decode_pairs(data: &[u8]) -> Result<Vec<Pair>, DecodeError> {
    let mut rest = data;
    let mut pairs = Vec::new();
    while !rest.is_empty() {
        let name_len = take_pair_len(&mut rest)?;
        let value_len = take_pair_len(&mut rest)?;
        let name = take_bytes(&mut rest, name_len)?;
        let value = take_bytes(&mut rest, value_len)?;
        pairs.push((name.to_vec(), value.to_vec()));
    }
    Ok(pairs)
}

/// Builds the 8-byte header of a record carrying `len` content bytes followed
/// by `padding` padding bytes (which the caller appends).
pub fn record_header(kind: RecordType, request_id: u16, len: u16, padding: u8) -> [u8; 8] {
    let [id_hi, id_lo] = request_id.to_be_bytes();
    let [len_hi, len_lo] = len.to_be_bytes();
    [
        VERSION_1,
        kind.as_u8(),
        id_hi,
        id_lo,
        len_hi,
        len_lo,
        padding,
        0,
    ]
}

/// Appends a BEGIN_REQUEST record for the Responder role.
pub fn put_begin_request(buf: &mut BytesMut, request_id: u16, keep_conn: bool) {
    let flags = if keep_conn { FLAG_KEEP_CONN } else { 0 };
    let [role_hi, role_lo] = ROLE_RESPONDER.to_be_bytes();
    buf.reserve(HEADER_LEN + 8);
    buf.extend_from_slice(&record_header(RecordType::BeginRequest, request_id, 8, 0));
    buf.extend_from_slice(&[role_hi, role_lo, flags, 0, 0, 0, 0, 0]);
}

/// Appends `data` as records of `kind`, at most MAX_CONTENT_LEN each, without
/// padding. Empty `data` appends nothing.
fn put_chunked(buf: &mut BytesMut, kind: RecordType, request_id: u16, data: &[u8]) {
    let records = data.len().div_ceil(MAX_CONTENT_LEN);
    buf.reserve(data.len() + records * HEADER_LEN);
    for chunk in data.chunks(MAX_CONTENT_LEN) {
        // chunks() never yields more than MAX_CONTENT_LEN bytes.
        let len = u16::try_from(chunk.len()).unwrap_or(u16::MAX);
        buf.extend_from_slice(&record_header(kind, request_id, len, 0));
        buf.extend_from_slice(chunk);
    }
}

/// Writes STDIN records of at most MAX_CONTENT_LEN each (no-op for empty data;
/// never emits the empty terminator, since an empty STDIN record would end
/// the body stream).
pub fn put_stdin(buf: &mut BytesMut, request_id: u16, data: &[u8]) {
    put_chunked(buf, RecordType::Stdin, request_id, data);
}

/// The empty STDIN record that ends the request body stream.
pub fn put_stdin_end(buf: &mut BytesMut, request_id: u16) {
    buf.extend_from_slice(&record_header(RecordType::Stdin, request_id, 0, 0));
}

/// Generic record writer used by the test FastCGI servers: splits content
/// into records of at most MAX_CONTENT_LEN (an empty content writes one empty
/// record, which for stream types is the end-of-stream marker).
pub fn put_record(buf: &mut BytesMut, kind: RecordType, request_id: u16, content: &[u8]) {
    if content.is_empty() {
        buf.extend_from_slice(&record_header(kind, request_id, 0, 0));
    } else {
        put_chunked(buf, kind, request_id, content);
    }
}

/// Appends an END_REQUEST record.
pub fn put_end_request(
    buf: &mut BytesMut,
    request_id: u16,
    app_status: u32,
    status: ProtocolStatus,
) {
    let [a, b, c, d] = app_status.to_be_bytes();
    buf.reserve(HEADER_LEN + 8);
    buf.extend_from_slice(&record_header(RecordType::EndRequest, request_id, 8, 0));
    buf.extend_from_slice(&[a, b, c, d, status.as_u8(), 0, 0, 0]);
}

/// Streams name-value pairs into PARAMS records without intermediate
/// allocation: pairs are written straight into `buf`; when the open record
/// reaches MAX_CONTENT_LEN its header is patched and a new one is opened (a
/// pair may span records: the PARAMS stream is a byte stream).
///
/// Call [`ParamsWriter::finish`]: until then the open record's header is a
/// placeholder and the buffer is not a valid record stream.
#[derive(Debug)]
pub struct ParamsWriter<'a> {
    buf: &'a mut BytesMut,
    request_id: u16,
    /// Offset in `buf` of the open record's header.
    start: usize,
}

impl<'a> ParamsWriter<'a> {
    /// Opens the first PARAMS record at the end of `buf`.
    pub fn new(buf: &'a mut BytesMut, request_id: u16) -> Self {
        let start = buf.len();
        buf.extend_from_slice(&record_header(RecordType::Params, request_id, 0, 0));
        Self {
            buf,
            request_id,
            start,
        }
    }

    /// Adds one pair. Names or values longer than 2^31-1 bytes (which no
    /// HTTP front end lets through) are truncated to what the 4-byte length
    /// form can express.
    #[inline(always)]
    pub fn add(&mut self, name: &[u8], value: &[u8]) {
        let name = name.get(..MAX_PAIR_LEN).unwrap_or(name);
        self.pair(b"", name, false, value, b"");
    }

    /// Adds one pair whose value is `value` followed by `more`, without joining them first.
    #[inline(always)]
    pub fn add_joined(&mut self, name: &[u8], value: &[u8], more: &[u8]) {
        let name = name.get(..MAX_PAIR_LEN).unwrap_or(name);
        self.pair(b"", name, false, value, more);
    }

    /// Adds `HTTP_` + the header name upper-cased with `-` turned into `_`
    /// (the caller has already filtered names; this only transforms), with
    /// no temporary allocation.
    #[inline]
    pub fn add_header(&mut self, header_name: &[u8], value: &[u8]) {
        const PREFIX: &[u8] = b"HTTP_";
        let header_name = header_name
            .get(..MAX_PAIR_LEN - PREFIX.len())
            .unwrap_or(header_name);
        self.pair(PREFIX, header_name, true, value, b"");
    }

    /// Writes a pair named `prefix` + `name` (`name` in CGI spelling when `cgi`) with the
    /// value `value` + `more`; the name is already clamped. Inlined into its callers, so
    /// `prefix` and `cgi` are constants.
    #[inline(always)]
    fn pair(&mut self, prefix: &[u8], name: &[u8], cgi: bool, value: &[u8], more: &[u8]) {
        let value = value.get(..MAX_PAIR_LEN).unwrap_or(value);
        let more = more.get(..MAX_PAIR_LEN - value.len()).unwrap_or(more);
        let name_len = prefix.len() + name.len();
        let value_len = value.len() + more.len();
        let (len_bytes, n) = pair_lengths(name_len, value_len);
        let lens = len_bytes.get(..n).unwrap_or_default();
        let pair = n + name_len + value_len;
        if !self.fits(pair) {
            // Rare: the pair rolls over into a new record.
            self.reserve_pair(name_len, value_len);
            self.put(lens, false);
            self.put(prefix, false);
            self.put(name, cgi);
            self.put(value, false);
            self.put(more, false);
            return;
        }
        // The common case: the pair fits the open record, a few plain copies. Both lengths
        // below 128 (nearly every pair) make a two-byte prefix: a fixed-size store instead
        // of a copy of unknown length.
        self.buf.reserve(pair);
        if n == 2 {
            self.buf.extend_from_slice(&[len_bytes[0], len_bytes[1]]);
        } else {
            self.buf.extend_from_slice(lens);
        }
        self.buf.extend_from_slice(prefix);
        let from = self.buf.len();
        self.buf.extend_from_slice(name);
        if cgi {
            if let Some(written) = self.buf.get_mut(from..) {
                cgi_name(written);
            }
        }
        self.buf.extend_from_slice(value);
        if !more.is_empty() {
            self.buf.extend_from_slice(more);
        }
    }

    /// Closes the open record and appends the empty PARAMS record that ends
    /// the stream.
    pub fn finish(mut self) {
        let open = self.open_len();
        self.patch_header();
        // With no pairs at all the open record is already empty and serves
        // as the terminator; a second empty record would be read as a stray
        // record after the stream ended.
        if open > 0 {
            self.buf
                .extend_from_slice(&record_header(RecordType::Params, self.request_id, 0, 0));
        }
    }

    fn open_len(&self) -> usize {
        self.buf.len().saturating_sub(self.start + HEADER_LEN)
    }

    fn patch_header(&mut self) {
        let len = u16::try_from(self.open_len()).unwrap_or(u16::MAX);
        let header = record_header(RecordType::Params, self.request_id, len, 0);
        if let Some(slot) = self.buf.get_mut(self.start..self.start + HEADER_LEN) {
            slot.copy_from_slice(&header);
        }
    }

    /// Reserves room for a pair plus the headers of any records it opens, so
    /// a long value costs one reallocation at most.
    fn reserve_pair(&mut self, name_len: usize, value_len: usize) {
        let pair = 8 + name_len + value_len;
        let extra_records = (self.open_len() + pair) / MAX_CONTENT_LEN;
        self.buf.reserve(pair + extra_records * HEADER_LEN);
    }

    /// Whether `n` more bytes fit the open record.
    #[inline]
    fn fits(&self, n: usize) -> bool {
        self.open_len() + n <= MAX_CONTENT_LEN
    }

    /// Appends `data` to the stream, rolling to a new record whenever the
    /// open one is full. A new record is opened only when there is more to
    /// write, so the open record is never left empty after a roll.
    fn put(&mut self, mut data: &[u8], header_name: bool) {
        while !data.is_empty() {
            let room = MAX_CONTENT_LEN.saturating_sub(self.open_len());
            if room == 0 {
                self.patch_header();
                self.start = self.buf.len();
                self.buf.extend_from_slice(&record_header(
                    RecordType::Params,
                    self.request_id,
                    0,
                    0,
                ));
                continue;
            }
            let (now, later) = data.split_at(room.min(data.len()));
            let from = self.buf.len();
            self.buf.extend_from_slice(now);
            if header_name {
                if let Some(written) = self.buf.get_mut(from..) {
                    cgi_name(written);
                }
            }
            data = later;
        }
    }
}

/// A pair's two length prefixes: one byte each below 128, else four with the high bit
/// set. Callers clamp lengths to MAX_PAIR_LEN, so the high bit is free for the marker.
#[inline]
fn pair_lengths(name_len: usize, value_len: usize) -> ([u8; 8], usize) {
    let mut out = [0u8; 8];
    let mut n = 0;
    for len in [name_len, value_len] {
        match u8::try_from(len) {
            Ok(short) if short < 0x80 => {
                out[n] = short;
                n += 1;
            }
            _ => {
                let long = u32::try_from(len).unwrap_or(MAX_PAIR_LEN as u32) | 0x8000_0000;
                out[n..n + 4].copy_from_slice(&long.to_be_bytes());
                n += 4;
            }
        }
    }
    (out, n)
}

/// A header name as CGI spells it, in place: upper case, `-` as `_`. One table load per
/// byte (a header or two per request run through here, 10–20 bytes each).
fn cgi_name(name: &mut [u8]) {
    for b in name {
        *b = CGI_BYTE[usize::from(*b)];
    }
}

/// Each byte as CGI spells it in a name.
static CGI_BYTE: [u8; 256] = {
    let mut table = [0u8; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        table[i] = match b {
            b'-' => b'_',
            other => other.to_ascii_uppercase(),
        };
        i += 1;
    }
    table
};

#[cfg(test)]
#[path = "codec_tests.rs"]
mod tests;
