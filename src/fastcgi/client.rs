//! One FastCGI request over one connection: send the pre-encoded BEGIN_REQUEST + PARAMS (+
//! STDIN) and read until the CGI response head is complete. The rest of STDOUT streams as
//! the HTTP body from [`super::body`].
//!
//! PHP-FPM never multiplexes, so the request id is always 1. A response truncated before
//! END_REQUEST is an error, never a short success.

use std::io;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::cgi::{CgiError, CgiHead, HeadParser};
use super::codec::{self, ProtocolStatus, RecordType};
use super::conn::READ_BUF;
use crate::error::ProxyError;
use crate::pool::Conn;

/// The request id of every request: FPM does not multiplex.
pub const REQUEST_ID: u16 = 1;

/// Requests whose encoded form is at most this size are written before reading: they fit in
/// the socket buffer, so FPM cannot deadlock us by answering before reading its STDIN.
const SEQUENTIAL_WRITE_MAX: usize = 64 * 1024;

/// What goes to FPM: the encoded records, and a spooled body to stream after them.
pub struct Outgoing<'a> {
    /// BEGIN_REQUEST, PARAMS, and (for small in-memory bodies) every STDIN record with the
    /// empty terminator.
    pub wire: &'a [u8],
    /// A spooled body whose STDIN records (and terminator) are written after `wire`.
    pub file: Option<(std::fs::File, u64)>,
    /// A large in-memory body, written after `wire` as STDIN records straight from its
    /// buffer (record headers and slices of it, vectored), not copied into `wire`.
    pub memory: Option<&'a [u8]>,
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
    out: Outgoing<'_>,
    read_timeout: Duration,
    send_timeout: Duration,
    max_header: usize,
    log: LogCtx<'_>,
) -> Result<(CgiHead, Bytes, bool), Failure> {
    if out.file.is_none() && out.memory.is_none() && out.wire.len() <= SEQUENTIAL_WRITE_MAX {
        // Nearly always the socket takes the whole request at once: try that before arming
        // the send timer.
        let first = std::future::poll_fn(|cx| {
            Poll::Ready(match Pin::new(&mut conn.stream).poll_write(cx, out.wire) {
                Poll::Ready(r) => r,
                Poll::Pending => Ok(0),
            })
        })
        .await;
        let sent = match first {
            Ok(n) => n,
            Err(e) => return Err(closed(e, false)),
        };
        if sent == out.wire.len() {
            return read_head(conn, read_timeout, max_header, log).await;
        }
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
        return read_head(conn, read_timeout, max_header, log).await;
    }
    // Large bodies: write and read at the same time, so a script that answers before it has
    // read all of its input cannot deadlock against us.
    let Conn { stream, buf, .. } = conn;
    let (mut rd, mut wr) = tokio::io::split(stream);
    let write = async {
        if let Some(body) = out.memory {
            // The wire buffer, then each STDIN record as its header and a slice of the
            // body, then the terminator: one vectored write where the socket takes it all.
            let chunks = body.chunks(codec::MAX_CONTENT_LEN);
            let headers: Vec<[u8; codec::HEADER_LEN]> = chunks
                .clone()
                .map(|c| stdin_header(c.len()))
                .chain([stdin_header(0)])
                .collect();
            let mut parts = vec![io::IoSlice::new(out.wire)];
            for (h, c) in headers.iter().zip(chunks) {
                parts.extend([io::IoSlice::new(h), io::IoSlice::new(c)]);
            }
            parts.extend(headers.last().map(|h| io::IoSlice::new(h)));
            write_all_vectored(&mut wr, &mut parts, send_timeout).await?;
            return Ok(());
        }
        tokio::time::timeout(send_timeout, wr.write_all(out.wire))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "send timeout"))??;
        if let Some((file, len)) = out.file {
            write_file(&mut wr, file, len, send_timeout).await?;
        }
        Ok::<(), io::Error>(())
    };
    let read = read_head_from(&mut rd, buf, read_timeout, max_header, log);
    let (w, r) = tokio::join!(write, read);
    match (w, r) {
        (_, Err(f)) => Err(f),
        (Err(e), Ok(_)) if e.kind() == io::ErrorKind::TimedOut => Err(Failure {
            error: ProxyError::SendTimeout,
            any_byte: true,
            closed: false,
        }),
        // FPM answered without reading all of its input: the response is fine, the
        // connection is not (STDIN records may still be in flight), so it must not be reused.
        (Err(_), Ok((head, rest, _))) => Ok((head, rest, false)),
        (Ok(()), Ok(v)) => Ok(v),
    }
}

async fn write_file<W: AsyncWrite + Unpin>(
    wr: &mut W,
    file: std::fs::File,
    len: u64,
    send_timeout: Duration,
) -> io::Result<()> {
    let mut file = tokio::fs::File::from_std(file);
    let mut remaining = len;
    let mut chunk = vec![0u8; codec::MAX_CONTENT_LEN];
    while remaining > 0 {
        let want = remaining.min(codec::MAX_CONTENT_LEN as u64) as usize;
        file.read_exact(&mut chunk[..want]).await?;
        write_stdin(wr, &chunk[..want], send_timeout).await?;
        remaining -= want as u64;
    }
    write_stdin(wr, &[], send_timeout).await?;
    wr.flush().await
}

/// The header of a STDIN record of `len` (≤ `MAX_CONTENT_LEN`) bytes; 0 is the terminator.
fn stdin_header(len: usize) -> [u8; codec::HEADER_LEN] {
    let len = u16::try_from(len).unwrap_or(u16::MAX);
    codec::record_header(RecordType::Stdin, REQUEST_ID, len, 0)
}

/// One STDIN record of at most `MAX_CONTENT_LEN` bytes (empty: the terminator), its header
/// and content in one vectored write where the socket takes it.
async fn write_stdin<W: AsyncWrite + Unpin>(
    wr: &mut W,
    content: &[u8],
    send_timeout: Duration,
) -> io::Result<()> {
    let content = content.get(..codec::MAX_CONTENT_LEN).unwrap_or(content);
    let header = stdin_header(content.len());
    let mut both = Buf::chain(&header[..], content);
    tokio::time::timeout(send_timeout, wr.write_all_buf(&mut both))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "send timeout"))?
}

/// Writes every slice, each write call within `send_timeout`.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut parts: &mut [io::IoSlice<'_>],
    send_timeout: Duration,
) -> io::Result<()> {
    io::IoSlice::advance_slices(&mut parts, 0);
    while !parts.is_empty() {
        let n = tokio::time::timeout(send_timeout, wr.write_vectored(parts))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "send timeout"))??;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut parts, n);
    }
    Ok(())
}

async fn read_head(
    conn: &mut Conn,
    read_timeout: Duration,
    max_header: usize,
    log: LogCtx<'_>,
) -> Result<(CgiHead, Bytes, bool), Failure> {
    let Conn { stream, buf, .. } = conn;
    // A response starts with a whole buffer of room. A kept connection came back with what
    // was left of its buffer; by now the last response has usually been sent, and this
    // takes the whole allocation back without allocating.
    if buf.is_empty() && buf.capacity() < READ_BUF {
        buf.reserve(READ_BUF);
    }
    read_head_from(stream, buf, read_timeout, max_header, log).await
}

/// Reads records until the CGI head is complete. Returns (head, body bytes after it,
/// write_ok=true).
async fn read_head_from<R: tokio::io::AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut BytesMut,
    read_timeout: Duration,
    max_header: usize,
    log: LogCtx<'_>,
) -> Result<(CgiHead, Bytes, bool), Failure> {
    let mut parser = HeadParser::new(max_header);
    let mut any_byte = false;
    loop {
        match codec::decode_record(buf) {
            Err(e) => return Err(protocol(e.to_string(), true)),
            Ok(Some(rec)) => match rec.kind {
                RecordType::Stdout => match parser.push(rec.content) {
                    Ok(Some((head, rest))) => return Ok((head, rest, true)),
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
                match tokio::time::timeout(read_timeout, rd.read_buf(buf)).await {
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
