//! The rest of FPM's STDOUT after the CGI head, streamed as the HTTP response body until
//! END_REQUEST, when the connection goes back to its endpoint's idle list. A body truncated
//! before END_REQUEST is an error, never a short success.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http_body::Frame;
use tokio::time::{Instant, Sleep};

use super::client::{log_stderr, LogCtx};
use super::codec::{self, ProtocolStatus, RecordType};
use super::stdin::StdinTail;
use crate::pool::Conn;

/// When `buf` holds whole records of STDOUT (and STDERR) up to and including an
/// END_REQUEST with status REQUEST_COMPLETE: the number of STDOUT bytes in them.
fn buffered_stdout(mut buf: &[u8]) -> Option<usize> {
    let mut total = 0usize;
    loop {
        let &[version, kind, _, _, len_hi, len_lo, padding, _] =
            buf.first_chunk::<{ codec::HEADER_LEN }>()?;
        if version != codec::VERSION_1 {
            return None;
        }
        let len = usize::from(u16::from_be_bytes([len_hi, len_lo]));
        let content = buf.get(codec::HEADER_LEN..codec::HEADER_LEN + len)?;
        let rest = buf.get(codec::HEADER_LEN + len + usize::from(padding)..)?;
        match RecordType::from_u8(kind) {
            RecordType::Stdout => total += len,
            RecordType::Stderr => {}
            RecordType::EndRequest => {
                let end = codec::parse_end_request(content).ok()?;
                return (end.protocol_status == ProtocolStatus::RequestComplete).then_some(total);
            }
            _ => return None,
        }
        buf = rest;
    }
}

/// The rest of FPM's STDOUT as an HTTP body. Owns the connection until END_REQUEST; on a
/// clean end the connection goes back to the idle list, on anything else it is closed.
pub struct FcgiBody {
    conn: Option<Conn>,
    pending: Option<Bytes>,
    reusable: bool,
    read_timeout: Duration,
    last_progress: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    request_id: std::sync::Arc<str>,
    /// The response's `Content-Length`, and the body bytes handed out so far: hyper drops a
    /// body as soon as the declared length has been sent, before END_REQUEST is read.
    declared: Option<u64>,
    delivered: u64,
    /// The script sent more than its `Content-Length`: the body ends at it.
    overran: bool,
    /// Dropped when the body ends or is dropped: holds the pool place and the metrics guard.
    guards: Box<dyn Send + Sync>,
    /// The request body not yet written when the head came, written as the body streams.
    tail: Option<StdinTail>,
    /// Inside a STDOUT record streamed as it arrives: its content and padding bytes still
    /// to come (both 0 at a record boundary).
    left: usize,
    pad: usize,
}

/// What the bytes buffered inside a record streamed as it arrives give.
enum Mid {
    /// More of its content.
    Chunk(Bytes),
    /// Nothing yet: read.
    Read,
    /// The record is done: the buffer is at a record boundary.
    Boundary,
}

impl FcgiBody {
    /// Wraps a connection whose response head was read at `head_at` (the read timeout
    /// runs from there).
    pub fn new(
        conn: Conn,
        first: Bytes,
        reusable: bool,
        read_timeout: Duration,
        head_at: Instant,
        request_id: std::sync::Arc<str>,
        guards: Box<dyn Send + Sync>,
    ) -> FcgiBody {
        FcgiBody {
            conn: Some(conn),
            pending: (!first.is_empty()).then_some(first),
            reusable,
            read_timeout,
            last_progress: head_at,
            sleep: None,
            request_id,
            declared: None,
            delivered: 0,
            overran: false,
            guards,
            tail: None,
            left: 0,
            pad: 0,
        }
    }

    /// Continues a STDOUT record whose start [`codec::split_partial_stdout`] took.
    fn mid_record(&mut self) -> Mid {
        let Some(conn) = self.conn.as_mut() else {
            return Mid::Boundary;
        };
        if self.left > 0 {
            if conn.buf.is_empty() {
                return Mid::Read;
            }
            let chunk = conn.buf.split_to(self.left.min(conn.buf.len())).freeze();
            self.left -= chunk.len();
            return Mid::Chunk(chunk);
        }
        let skip = self.pad.min(conn.buf.len());
        conn.buf.advance(skip);
        self.pad -= skip;
        if self.pad > 0 {
            Mid::Read
        } else {
            Mid::Boundary
        }
    }

    /// The connection, its buffer at a record boundary again for whoever reads on: the
    /// rest of a record streamed as it arrived gets a header of its own (a copy of what is
    /// buffered, on the rare paths that leave a body early).
    pub(super) fn take_conn(&mut self) -> Option<Conn> {
        let mut conn = self.conn.take()?;
        if self.left > 0 || self.pad > 0 {
            let (left, pad) = (
                std::mem::take(&mut self.left),
                std::mem::take(&mut self.pad),
            );
            // A record's remainder: at most 65535 content and 255 padding bytes.
            let (len, padding) = (left as u16, pad as u8);
            let header =
                codec::record_header(RecordType::Stdout, super::client::REQUEST_ID, len, padding);
            let mut buf = BytesMut::with_capacity(header.len() + conn.buf.len().max(left + pad));
            buf.extend_from_slice(&header);
            buf.extend_from_slice(&conn.buf);
            conn.buf = buf;
        }
        Some(conn)
    }

    /// The rest of the request, when the script answered before it read all of its input:
    /// written to FPM as the response is read (progress either way keeps the read timeout
    /// away). The connection is reused only if all of it went out.
    pub fn set_stdin_tail(&mut self, tail: Option<StdinTail>) {
        self.tail = tail;
    }

    /// Writes what the socket takes of the rest of the request. A failed write ends the
    /// writing, not the response: FPM may still answer in full, but the connection is not
    /// reused.
    fn write_tail(&mut self, cx: &mut Context<'_>) {
        let (Some(tail), Some(conn)) = (self.tail.as_mut(), self.conn.as_mut()) else {
            return;
        };
        let before = tail.sent();
        let done = match tail.poll_write(cx, Pin::new(&mut conn.stream)) {
            Poll::Pending => false,
            Poll::Ready(Ok(())) => true,
            Poll::Ready(Err(e)) => {
                tracing::debug!(request_id = &*self.request_id, endpoint = %conn.endpoint().label, "FPM stopped taking the request body: {e}");
                self.reusable = false;
                true
            }
        };
        if tail.sent() != before {
            self.last_progress = Instant::now();
        }
        if done {
            self.tail = None;
        }
    }

    /// The `Content-Length` the script declared (FPM's head, already checked to be one
    /// decimal number). When the client has been sent that many bytes, dropping the body
    /// reads on to END_REQUEST and keeps the connection instead of closing it.
    pub fn set_declared_length(&mut self, declared: Option<u64>) {
        self.declared = declared;
    }

    /// The whole body, when the rest of the response (STDOUT to its end, then a clean
    /// END_REQUEST) is already in the connection's buffer, as it is for most small
    /// responses: the client then gets a `Content-Length` instead of chunks, and the FPM
    /// connection goes back at once instead of after the client has read the body (drop
    /// the spent body to free the pool place). `None`: nothing taken, stream the body.
    pub fn take_complete(&mut self) -> Option<Bytes> {
        let total = self.conn.as_ref().and_then(|c| buffered_stdout(&c.buf))?;
        let first = self.pending.take().unwrap_or_default();
        let mut conn = self.conn.take().expect("checked above");
        let mut body = (total > 0).then(|| {
            let mut b = BytesMut::with_capacity(first.len() + total);
            b.extend_from_slice(&first);
            b
        });
        loop {
            // buffered_stdout checked that every record through END_REQUEST is here.
            let Ok(Some(rec)) = codec::decode_record(&mut conn.buf) else {
                unreachable!("records checked by buffered_stdout");
            };
            match rec.kind {
                RecordType::Stdout => {
                    if let Some(b) = body.as_mut() {
                        b.extend_from_slice(&rec.content);
                    }
                }
                RecordType::Stderr => log_stderr(
                    &rec.content,
                    LogCtx {
                        request_id: &self.request_id,
                        endpoint: &conn.endpoint().label,
                    },
                ),
                _ => {
                    // END_REQUEST (buffered_stdout stops at it, with a clean status).
                    // A request not all written leaves STDIN records to come: not reused.
                    if self.reusable && self.tail.is_none() {
                        conn.release();
                    }
                    break;
                }
            }
        }
        Some(body.map_or(first, BytesMut::freeze))
    }

    /// `data` cut to what the script's `Content-Length` leaves room for: a client reading
    /// the header takes no more (over HTTP/2 more would fail the whole stream). `None`:
    /// nothing to send.
    fn fit(&mut self, mut data: Bytes) -> Option<Bytes> {
        if let Some(declared) = self.declared {
            let room = declared.saturating_sub(self.delivered);
            if data.len() as u64 > room {
                if !self.overran {
                    // Worded as for a body that came whole (`upstream::fit_declared`): which
                    // path a response takes depends on how FPM's writes were read.
                    let ep = self.conn.as_ref().map(|c| c.endpoint());
                    let pool = ep.and_then(|e| e.owner());
                    let sent = self.delivered + data.len() as u64;
                    tracing::warn!(
                        request_id = &*self.request_id,
                        pool = %pool.as_ref().map_or("-", |p| p.name()),
                        endpoint = %ep.map_or("-", |e| e.label.as_str()),
                        "the script declared Content-Length {declared} but sent {sent} bytes or more: sending the first {declared}"
                    );
                }
                self.overran = true;
                // room < data.len() ≤ usize::MAX.
                data.truncate(room as usize);
            }
        }
        if data.is_empty() {
            return None;
        }
        self.delivered += data.len() as u64;
        Some(data)
    }

    fn fail(&mut self, msg: impl Into<String>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let msg = msg.into();
        if let Some(conn) = self.conn.take() {
            tracing::warn!(request_id = &*self.request_id, endpoint = %conn.endpoint().label, "response aborted: {msg}");
        }
        Poll::Ready(Some(Err(io::Error::other(msg))))
    }
}

impl http_body::Body for FcgiBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(b) = this.pending.take().and_then(|b| this.fit(b)) {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        this.write_tail(cx);
        loop {
            if this.overran {
                // FPM is still sending what nobody may read: the body ends here, and the
                // rest is discarded while the place stays held, as for a client abort.
                if let Some(conn) = this.take_conn() {
                    let guards = std::mem::replace(&mut this.guards, Box::new(()));
                    let rid = std::sync::Arc::clone(&this.request_id);
                    let due = this.last_progress + this.read_timeout;
                    super::abandon::abandon(conn, guards, due, rid);
                }
                return Poll::Ready(None);
            }
            let at_boundary = match this.mid_record() {
                Mid::Chunk(chunk) => {
                    if let Some(b) = this.fit(chunk) {
                        return Poll::Ready(Some(Ok(Frame::data(b))));
                    }
                    continue;
                }
                Mid::Read => false,
                Mid::Boundary => true,
            };
            let Some(conn) = this.conn.as_mut() else {
                return Poll::Ready(None);
            };
            // Inside a record there is nothing to decode until more of it is read.
            let decoded = if at_boundary {
                codec::decode_record(&mut conn.buf)
            } else {
                Ok(None)
            };
            match decoded {
                Err(e) => return this.fail(format!("malformed FastCGI record: {e}")),
                Ok(Some(rec)) => match rec.kind {
                    RecordType::Stdout => {
                        if let Some(b) = this.fit(rec.content) {
                            return Poll::Ready(Some(Ok(Frame::data(b))));
                        }
                    }
                    RecordType::Stderr => log_stderr(
                        &rec.content,
                        LogCtx {
                            request_id: &this.request_id,
                            endpoint: &conn.endpoint().label,
                        },
                    ),
                    RecordType::EndRequest => {
                        let end = codec::parse_end_request(&rec.content);
                        if !end
                            .as_ref()
                            .is_ok_and(|e| e.protocol_status == ProtocolStatus::RequestComplete)
                        {
                            // The body so far is not the whole response: fail, not end.
                            return this.fail(match end {
                                Ok(e) => format!(
                                    "FPM ended the request with protocol status {:?}",
                                    e.protocol_status
                                ),
                                Err(e) => format!("malformed END_REQUEST: {e}"),
                            });
                        }
                        if let Some(declared) = this.declared.filter(|d| this.delivered < *d) {
                            let sent = this.delivered;
                            return this.fail(format!(
                                "the script declared Content-Length {declared} but sent {sent} bytes"
                            ));
                        }
                        let conn = this.conn.take().expect("checked above");
                        if this.reusable && this.tail.is_none() {
                            conn.release();
                        }
                        return Poll::Ready(None);
                    }
                    other => {
                        return this.fail(format!(
                            "unexpected record type {} in response",
                            other.as_u8()
                        ))
                    }
                },
                Ok(None) => {
                    if at_boundary {
                        if let Some((chunk, left, pad)) =
                            codec::split_partial_stdout(&mut conn.buf, PARTIAL_MIN)
                        {
                            (this.left, this.pad) = (left, pad);
                            if let Some(b) = this.fit(chunk) {
                                return Poll::Ready(Some(Ok(Frame::data(b))));
                            }
                            continue;
                        }
                    }
                    // A body that needs more than the first read streams in reads of a
                    // whole record (64 KiB) rather than 16 KiB: a quarter of the reads.
                    if conn.buf.capacity() - conn.buf.len() < 4096 {
                        conn.buf.reserve(STREAM_READ);
                    }
                    match tokio_util::io::poll_read_buf(
                        Pin::new(&mut conn.stream),
                        cx,
                        &mut conn.buf,
                    ) {
                        Poll::Ready(Ok(0)) => {
                            return this.fail("FPM closed the connection before END_REQUEST")
                        }
                        Poll::Ready(Ok(_)) => {
                            conn.stream.rearm_quickack();
                            this.last_progress = Instant::now();
                        }
                        Poll::Ready(Err(e)) => {
                            return this.fail(format!("read from FPM failed: {e}"))
                        }
                        Poll::Pending => {
                            // The read timer is re-armed lazily: only when it fires do we check
                            // whether progress happened since it was set.
                            let deadline = this.last_progress + this.read_timeout;
                            let sleep = this.sleep.get_or_insert_with(|| {
                                Box::pin(tokio::time::sleep_until(deadline))
                            });
                            if sleep.deadline() != deadline {
                                sleep.as_mut().reset(deadline);
                            }
                            return match sleep.as_mut().poll(cx) {
                                Poll::Ready(()) => {
                                    this.fail("FPM went silent past the read timeout")
                                }
                                Poll::Pending => Poll::Pending,
                            };
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none() && self.pending.is_none()
    }
}

/// Read size while a response body streams: one FastCGI record's largest content.
const STREAM_READ: usize = 64 * 1024;

/// Content of a STDOUT record not yet whole that is sent on at once rather than gathered
/// with the rest of the record: gathering copies what is buffered when the buffer is grown.
const PARTIAL_MIN: usize = 4096;

#[path = "body_end.rs"]
mod body_end;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffered_stdout_needs_every_record_through_a_clean_end() {
        let mut b = BytesMut::new();
        codec::put_record(&mut b, RecordType::Stdout, 1, b"hello");
        codec::put_record(&mut b, RecordType::Stderr, 1, b"notice");
        codec::put_record(&mut b, RecordType::Stdout, 1, b" world");
        codec::put_record(&mut b, RecordType::Stdout, 1, b"");
        let body_only = b.len();
        codec::put_end_request(&mut b, 1, 0, ProtocolStatus::RequestComplete);
        assert_eq!(buffered_stdout(&b), Some(11));
        // Any cut short of the end: not complete.
        for cut in [0, 3, 8, 12, body_only, b.len() - 1] {
            assert_eq!(buffered_stdout(&b[..cut]), None, "cut at {cut}");
        }
        // END_REQUEST with another status, or a record of another kind: stream instead.
        let mut o = BytesMut::new();
        codec::put_record(&mut o, RecordType::Stdout, 1, b"x");
        codec::put_end_request(&mut o, 1, 0, ProtocolStatus::Overloaded);
        assert_eq!(buffered_stdout(&o), None);
        let mut u = BytesMut::new();
        codec::put_record(&mut u, RecordType::Data, 1, b"x");
        codec::put_end_request(&mut u, 1, 0, ProtocolStatus::RequestComplete);
        assert_eq!(buffered_stdout(&u), None);
    }
}
