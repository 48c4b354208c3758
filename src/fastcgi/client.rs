//! One FastCGI request over one connection: send the pre-encoded BEGIN_REQUEST + PARAMS (+
//! STDIN) and read until the CGI response head is complete. The rest of STDOUT streams as
//! the HTTP body from [`super::body`].
//!
//! PHP-FPM never multiplexes, so the request id is always 1. A response truncated before
//! END_REQUEST is an error, never a short success.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use super::cgi::{CgiError, CgiHead, HeadParser};
use super::codec::{self, ProtocolStatus, RecordType};
use super::conn::READ_BUF;
pub use super::stdin::{Source, StdinTail};
use crate::error::ProxyError;
use crate::pool::Conn;

/// The request id of every request: FPM does not multiplex.
pub const REQUEST_ID: u16 = 1;

/// Requests whose encoded form is at most this size are written before reading: they fit in
/// the socket buffer, so FPM cannot deadlock us by answering before reading its STDIN.
const SEQUENTIAL_WRITE_MAX: usize = 64 * 1024;

/// What goes to FPM: the encoded records, and a large body to write after them.
pub struct Outgoing {
    /// BEGIN_REQUEST, PARAMS, and (for small in-memory bodies) every STDIN record with the
    /// empty terminator.
    pub wire: Bytes,
    /// A body written after `wire` as STDIN records, from its own buffer or its spool
    /// file; [`Source::Nothing`] when `wire` holds the whole request.
    pub body: Source,
}

/// A response head, and what comes with it.
pub struct Answer {
    /// The CGI head.
    pub head: CgiHead,
    /// The body bytes that followed the head.
    pub rest: Bytes,
    /// The connection can serve another request once this one ends.
    pub reusable: bool,
    /// The request not yet written when the head came: the response body goes on writing
    /// it (the script answered before it read all of its input).
    pub tail: Option<StdinTail>,
}

/// A failed exchange, with what the retry rule needs to know.
#[derive(Debug)]
pub struct Failure {
    /// The error for the client.
    pub error: ProxyError,
    /// FPM sent at least one byte: the script may have run and output.
    pub any_byte: bool,
    /// The failure was EOF or reset (as opposed to garbage or a timeout).
    pub closed: bool,
}

/// Per-request context for FPM's stderr lines.
#[derive(Debug, Clone, Copy)]
pub struct LogCtx<'a> {
    /// The request id shown in logs.
    pub request_id: &'a str,
    /// The endpoint label.
    pub endpoint: &'a str,
}

fn closed(e: io::Error, any_byte: bool) -> Failure {
    Failure {
        error: ProxyError::UpstreamReset(e.to_string()),
        any_byte,
        closed: true,
    }
}

fn protocol(msg: String, any_byte: bool) -> Failure {
    Failure {
        error: ProxyError::UpstreamProtocol(msg),
        any_byte,
        closed: false,
    }
}

/// Sends the request and reads the response head. On success returns the head and the body
/// bytes that followed it; the connection's buffer holds whatever came after.
pub async fn send(
    conn: &mut Conn,
    out: Outgoing,
    read_timeout: Duration,
    send_timeout: Duration,
    max_header: usize,
    log: LogCtx<'_>,
) -> Result<Answer, Failure> {
    let small = matches!(out.body, Source::Nothing) && out.wire.len() <= SEQUENTIAL_WRITE_MAX;
    if small {
        // Nearly always the socket takes the whole request at once: try that before arming
        // the send timer.
        let first = std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut conn.stream).poll_write(cx, &out.wire) {
                Poll::Ready(r) => r,
                Poll::Pending => Ok(0),
            })
        })
        .await;
        let sent = match first {
            Ok(n) => n,
            Err(e) => return Err(closed(e, false)),
        };
        if sent < out.wire.len() {
            let rest = &out.wire[sent..];
            match tokio::time::timeout(send_timeout, conn.stream.write_all(rest)).await {
                Err(_) => {
                    return Err(Failure {
                        error: ProxyError::SendTimeout,
                        any_byte: false,
                        closed: false,
                    })
                }
                Ok(Err(e)) => return Err(closed(e, false)),
                Ok(Ok(())) => {}
            }
        }
        let (head, rest) = read_head(conn, read_timeout, max_header, log).await?;
        return Ok(Answer {
            head,
            rest,
            reusable: true,
            tail: None,
        });
    }
    // Large requests: write while reading, so a script that answers before it has read all
    // of its input cannot stall against us. Once the head is in, what is left of the
    // request goes on with the response body.
    let mut tail = StdinTail::new(out.wire, out.body);
    let Conn { stream, buf, .. } = conn;
    let (mut rd, mut wr) = tokio::io::split(&mut *stream);
    let (read, wrote) = {
        let write = write_timed(&mut tail, &mut wr, send_timeout);
        // While the request is still going out the send timeout bounds the wait (an upload
        // that FPM takes slowly is not a silent FPM); the read timeout runs once it is out,
        // as nginx arms fastcgi_read_timeout.
        let read = read_head_from(&mut rd, buf, None, max_header, log);
        let silent = tokio::time::sleep(read_timeout);
        tokio::pin!(write, read, silent);
        let mut wrote: Option<io::Result<()>> = None;
        loop {
            tokio::select! {
                // The write first: the request goes out before the first read is tried.
                biased;
                w = &mut write, if wrote.is_none() => match w {
                    // FPM took none of its input for the whole send timeout.
                    Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                        return Err(Failure {
                            error: ProxyError::SendTimeout,
                            any_byte: true,
                            closed: false,
                        });
                    }
                    w => {
                        wrote = Some(w);
                        silent.as_mut().reset(Instant::now() + read_timeout);
                    }
                },
                r = &mut read => break (r, wrote),
                () = &mut silent, if wrote.is_some() => {
                    return Err(Failure {
                        error: ProxyError::ReadTimeout,
                        any_byte: true,
                        closed: false,
                    });
                }
            }
        }
    };
    let (head, rest) = read?;
    Ok(match wrote {
        Some(Ok(())) => Answer {
            head,
            rest,
            reusable: true,
            tail: None,
        },
        // FPM answered and closed its end of the input: the response is fine, the
        // connection is not (STDIN records may still be in flight), so it is not reused.
        Some(Err(_)) => Answer {
            head,
            rest,
            reusable: false,
            tail: None,
        },
        None => Answer {
            head,
            rest,
            reusable: true,
            tail: Some(tail),
        },
    })
}

/// Writes the request to its end, failing when a write makes no progress for `timeout`.
async fn write_timed<W: AsyncWrite + Unpin>(
    tail: &mut StdinTail,
    wr: &mut W,
    timeout: Duration,
) -> io::Result<()> {
    let sleep = tokio::time::sleep(timeout);
    tokio::pin!(sleep);
    std::future::poll_fn(|cx| {
        let before = tail.sent();
        if let Poll::Ready(r) = tail.poll_write(cx, Pin::new(&mut *wr)) {
            return Poll::Ready(r);
        }
        if tail.sent() != before {
            sleep.as_mut().reset(Instant::now() + timeout);
        }
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "send timeout")))
            }
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

async fn read_head(
    conn: &mut Conn,
    read_timeout: Duration,
    max_header: usize,
    log: LogCtx<'_>,
) -> Result<(CgiHead, Bytes), Failure> {
    let Conn { stream, buf, .. } = conn;
    // A response starts with a whole buffer of room. A kept connection came back with what
    // was left of its buffer; by now the last response has usually been sent, and this
    // takes the whole allocation back without allocating.
    if buf.is_empty() && buf.capacity() < READ_BUF {
        buf.reserve(READ_BUF);
    }
    read_head_from(stream, buf, Some(read_timeout), max_header, log).await
}

/// Reads records until the CGI head is complete. Returns the head and the body bytes after
/// it. `read_timeout` bounds each read; `None`: the caller bounds the wait.
async fn read_head_from<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    read_timeout: Option<Duration>,
    max_header: usize,
    log: LogCtx<'_>,
) -> Result<(CgiHead, Bytes), Failure> {
    let mut parser = HeadParser::new(max_header);
    let mut any_byte = false;
    loop {
        match codec::decode_record(buf) {
            Err(e) => return Err(protocol(e.to_string(), true)),
            Ok(Some(rec)) => match rec.kind {
                RecordType::Stdout => match parser.push(rec.content) {
                    Ok(Some((head, rest))) => return Ok((head, rest)),
                    Ok(None) => {}
                    Err(CgiError::TooLarge) => {
                        return Err(Failure {
                            error: ProxyError::HeaderTooBig,
                            any_byte: true,
                            closed: false,
                        })
                    }
                    Err(e) => return Err(protocol(e.to_string(), true)),
                },
                RecordType::Stderr => log_stderr(&rec.content, log),
                RecordType::EndRequest => {
                    let end = codec::parse_end_request(&rec.content)
                        .map_err(|e| protocol(e.to_string(), true))?;
                    return Err(match end.protocol_status {
                        ProtocolStatus::Overloaded => Failure {
                            error: ProxyError::UpstreamRefused("FCGI_OVERLOADED"),
                            any_byte: true,
                            closed: false,
                        },
                        ProtocolStatus::CantMpxConn => Failure {
                            error: ProxyError::UpstreamRefused("FCGI_CANT_MPX_CONN"),
                            any_byte: true,
                            closed: false,
                        },
                        _ => protocol("END_REQUEST before a complete response head".into(), true),
                    });
                }
                other => {
                    return Err(protocol(
                        format!("unexpected record type {}", other.as_u8()),
                        true,
                    ))
                }
            },
            Ok(None) => {
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(READ_BUF);
                }
                let read = rd.read_buf(buf);
                let read = match read_timeout {
                    Some(t) => tokio::time::timeout(t, read).await,
                    None => Ok(read.await),
                };
                match read {
                    Err(_) => {
                        return Err(Failure {
                            error: ProxyError::ReadTimeout,
                            any_byte,
                            closed: false,
                        })
                    }
                    Ok(Err(e)) => return Err(closed(e, any_byte)),
                    Ok(Ok(0)) => {
                        return Err(closed(
                            io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "FPM closed the connection",
                            ),
                            any_byte,
                        ))
                    }
                    Ok(Ok(_)) => any_byte = true,
                }
            }
        }
    }
}

/// Logs FPM's stderr (PHP warnings and notices when `catch_workers_output` is off, or
/// whatever the script wrote to php://stderr) at warn, one event per line.
pub fn log_stderr(content: &[u8], log: LogCtx<'_>) {
    for line in content.split(|b| *b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            continue;
        }
        tracing::warn!(
            target: "fpmgate::fpm_stderr",
            request_id = log.request_id,
            endpoint = log.endpoint,
            "{}",
            String::from_utf8_lossy(line)
        );
    }
}
