//! Incremental parser for the CGI response head that PHP-FPM writes at the
//! start of its STDOUT stream: `Name: value` lines (CRLF from PHP, bare LF
//! accepted) ended by an empty line, followed by the response body.
//!
//! It owns the translation of that head into an HTTP status and header map,
//! following nginx's fastcgi module: `Status` sets the status, a `Location`
//! without `Status` means 302, hop-by-hop headers are dropped. It must not do
//! I/O, touch the body beyond handing back the bytes that followed the head,
//! or panic on any input bytes.

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};

/// The parsed response head.
#[derive(Debug)]
pub struct CgiHead {
    /// Response status (from `Status`, else 302 for `Location`, else 200).
    pub status: StatusCode,
    /// Response headers, minus `Status` and hop-by-hop headers.
    pub headers: HeaderMap,
}

/// Why a CGI head was rejected; any of these makes the upstream response
/// unusable (nginx answers 502 in the same cases).
#[derive(Debug, thiserror::Error)]
pub enum CgiError {
    /// The head grew past the configured limit without ending.
    #[error("CGI response head exceeds the size limit")]
    TooLarge,
    /// A head line could not be parsed.
    #[error("malformed CGI response head: {0}")]
    Malformed(&'static str),
    /// The `Status` header does not start with a 3-digit code in 100..=999.
    #[error("invalid CGI Status header")]
    BadStatus,
}

/// Accumulates STDOUT chunks until the CGI head is complete.
///
/// Complete lines are parsed as soon as they arrive and only a partial line
/// is kept between chunks, so header values share the chunks' memory instead
/// of being copied.
#[derive(Debug)]
pub struct HeadParser {
    /// The unfinished line carried over from earlier chunks.
    pending: BytesMut,
    /// Head bytes consumed by complete lines, terminators included.
    consumed: usize,
    limit: usize,
    status: Option<StatusCode>,
    headers: HeaderMap,
    content_length_seen: bool,
    done: bool,
}

impl HeadParser {
    /// A parser rejecting heads (terminating empty line included) longer
    /// than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            pending: BytesMut::new(),
            consumed: 0,
            limit,
            status: None,
            headers: HeaderMap::new(),
            content_length_seen: false,
            done: false,
        }
    }

    /// Feed the next STDOUT chunk. Returns Ok(Some((head, rest))) once the
    /// blank line is seen, `rest` being the body bytes that followed it in
    /// this chunk (zero-copy slice). Errors with TooLarge as soon as the head
    /// exceeds `limit` bytes without a terminator. Pushing again after the
    /// head was returned is an error.
    pub fn push(&mut self, chunk: Bytes) -> Result<Option<(CgiHead, Bytes)>, CgiError> {
        if self.done {
            return Err(CgiError::Malformed(
                "data pushed after the head was complete",
            ));
        }
        let mut pos = 0;
        loop {
            let remaining = chunk.get(pos..).unwrap_or_default();
            let used = self.consumed + self.pending.len();
            let allowed = self.limit.saturating_sub(used);
            // Only look as far as the limit allows: a line end beyond it
            // means the head is too large, whatever follows.
            let window = remaining.get(..allowed).unwrap_or(remaining);
            let Some(nl) = window.iter().position(|&b| b == b'\n') else {
                if remaining.len() >= allowed {
                    return Err(CgiError::TooLarge);
                }
                self.pending.extend_from_slice(remaining);
                return Ok(None);
            };
            let line_end = pos + nl;
            let line = if self.pending.is_empty() {
                chunk.slice(pos..line_end)
            } else {
                self.pending
                    .extend_from_slice(window.get(..nl).unwrap_or_default());
                self.pending.split().freeze()
            };
            self.consumed = used + nl + 1;
            pos = line_end + 1;
            let line = match line.strip_suffix(b"\r") {
                Some(stripped) => line.slice_ref(stripped),
                None => line,
            };
            if line.is_empty() {
                self.done = true;
                let head = self.take_head();
                return Ok(Some((head, chunk.slice(pos..))));
            }
            self.header_line(line)?;
        }
    }

    fn take_head(&mut self) -> CgiHead {
        let headers = std::mem::take(&mut self.headers);
        let status = match self.status {
            Some(status) => status,
            None if headers.contains_key(header::LOCATION) => StatusCode::FOUND,
            None => StatusCode::OK,
        };
        CgiHead { status, headers }
    }

    fn header_line(&mut self, line: Bytes) -> Result<(), CgiError> {
        let colon = line
            .iter()
            .position(|&b| b == b':')
            .ok_or(CgiError::Malformed("header line without a colon"))?;
        let name = line.get(..colon).unwrap_or_default();
        let value = trim(line.get(colon + 1..).unwrap_or_default());

        if name.eq_ignore_ascii_case(b"status") {
            // Last one wins, as in nginx.
            self.status = Some(parse_status(value)?);
            return Ok(());
        }
        let name =
            HeaderName::from_bytes(name).map_err(|_| CgiError::Malformed("invalid header name"))?;
        if is_hop_by_hop(&name) {
            return Ok(());
        }
        if name == header::CONTENT_LENGTH {
            // PHP scripts set Content-Length by hand and get it wrong; an
            // unparsable or repeated one must not reach the framing layer.
            if self.content_length_seen || !is_decimal_u64(value) {
                return Ok(());
            }
            self.content_length_seen = true;
        }
        let value = HeaderValue::from_maybe_shared(line.slice_ref(value))
            .map_err(|_| CgiError::Malformed("invalid header value"))?;
        self.headers.append(name, value);
        Ok(())
    }
}

fn trim(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// `NNN` or `NNN reason`: the reason text is ignored, as nginx does.
fn parse_status(value: &[u8]) -> Result<StatusCode, CgiError> {
    let (code, rest) = value.split_at_checked(3).ok_or(CgiError::BadStatus)?;
    if !matches!(rest.first(), None | Some(b' ' | b'\t')) {
        return Err(CgiError::BadStatus);
    }
    StatusCode::from_bytes(code).map_err(|_| CgiError::BadStatus)
}

fn is_decimal_u64(value: &[u8]) -> bool {
    // `u64::from_str` alone would also take a leading '+'.
    !value.is_empty()
        && value.iter().all(u8::is_ascii_digit)
        && std::str::from_utf8(value).is_ok_and(|s| s.parse::<u64>().is_ok())
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    *name == header::CONNECTION
        || *name == header::TRANSFER_ENCODING
        || *name == header::TE
        || *name == header::TRAILER
        || *name == header::UPGRADE
        || name.as_str() == "keep-alive"
        || name.as_str() == "proxy-connection"
}

#[cfg(test)]
#[path = "cgi_tests.rs"]
mod tests;
