//! Reading a client's request body completely before any FPM connection is taken: in memory
//! up to `limits.body_buffer` while the process-wide [`BodyMemory`] budget has room, then in
//! an anonymous temporary file, never past `max_body`.
//!
//! PHP-FPM needs CONTENT_LENGTH up front and gives a connection 5 seconds to send its first
//! record; a slow client streaming straight into FPM would pin a PHP worker for as long as it
//! likes. Buffering here means only the proxy waits for slow clients.

use std::io::{Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

use crate::error::ProxyError;

mod memory;
pub use memory::BodyMemory;

/// A fully received request body.
#[derive(Debug)]
pub enum RequestBody {
    /// No body bytes.
    Empty,
    /// The whole body in memory. Its share of the memory budget goes with the bytes: it
    /// is given back when the last clone is dropped (a request still being written to FPM
    /// while the response streams outlives this value).
    Memory(Bytes),
    /// A body larger than `body_buffer` (or arriving with the memory budget full), spooled
    /// to an unlinked temporary file.
    File {
        /// The file, positioned anywhere: readers seek first.
        file: std::fs::File,
        /// Its length in bytes.
        len: u64,
    },
}

impl RequestBody {
    /// Body length in bytes.
    pub fn len(&self) -> u64 {
        match self {
            RequestBody::Empty => 0,
            RequestBody::Memory(b) => b.len() as u64,
            RequestBody::File { len, .. } => *len,
        }
    }

    /// True when there are no body bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A fresh reader over a spooled body, from its start (for each FastCGI attempt).
    pub fn reopen_file(&self) -> Option<std::io::Result<std::fs::File>> {
        match self {
            RequestBody::File { file, .. } => Some(file.try_clone().and_then(|mut f| {
                f.seek(SeekFrom::Start(0))?;
                Ok(f)
            })),
            _ => None,
        }
    }
}

/// Limits applied while reading.
#[derive(Debug, Clone, Copy)]
pub struct BodyLimits {
    /// Larger bodies are refused with 413.
    pub max_body: u64,
    /// Bodies past this go to a temporary file.
    pub body_buffer: usize,
    /// So do bodies that would take the bodies held in memory, all requests together,
    /// past this.
    pub body_memory: u64,
    /// Longest pause between two body frames.
    pub body_timeout: Duration,
}

/// Reads the whole body. `declared` is the Content-Length header, if any: a declared length
/// over `max_body` is refused before a byte is read.
pub async fn read_body<B>(
    mut body: B,
    declared: Option<u64>,
    limits: BodyLimits,
    memory: &Arc<BodyMemory>,
) -> Result<RequestBody, ProxyError>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    if declared.is_some_and(|n| n > limits.max_body) {
        return Err(ProxyError::BodyTooLarge);
    }
    if declared == Some(0) || body.is_end_stream() {
        return Ok(RequestBody::Empty);
    }
    let mut lease = memory.lease(limits.body_memory);
    let mut first: Option<Bytes> = None;
    let mut mem = BytesMut::new();
    let mut file: Option<std::fs::File> = None;
    let mut total: u64 = 0;
    loop {
        let frame = match tokio::time::timeout(limits.body_timeout, body.frame()).await {
            Err(_) => return Err(ProxyError::BodyTimeout),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(ProxyError::BodyRead(e.to_string())),
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        }; // trailers are not forwarded
        if data.is_empty() {
            continue;
        }
        total += data.len() as u64;
        if total > limits.max_body {
            return Err(ProxyError::BodyTooLarge);
        }
        if let Some(f) = file.as_mut() {
            write_blocking(f, &data)?;
            continue;
        }
        // Keep a single-frame body as is (no copy): the common small POST.
        if first.is_none() && mem.is_empty() {
            let small = data.len() <= limits.body_buffer;
            if small && lease.hold(data.len()) {
                first = Some(data);
            } else {
                file = Some(spool(&data, small, memory)?);
            }
            continue;
        }
        if let Some(f) = first.take() {
            // Room for the declared body at once instead of doubling, and copying, as it
            // arrives; at most RESERVE_MAX ahead of the bytes, so that a client declaring
            // a large body and sending two bytes does not get the memory of a large body.
            const RESERVE_MAX: u64 = 256 * 1024;
            let cap = RESERVE_MAX.min(limits.body_buffer as u64 + 1);
            let want = declared.map_or(0, |n| n.min(cap) as usize);
            mem.reserve(want.max(f.len() + data.len()));
            mem.extend_from_slice(&f);
        }
        mem.extend_from_slice(&data);
        // What is allocated counts, reserved room included: that is what waits in memory
        // for the next frame.
        let small = mem.len() <= limits.body_buffer;
        if !small || !lease.hold(mem.capacity()) {
            file = Some(spool(&mem, small, memory)?);
            mem = BytesMut::new();
            lease.hold(0);
        }
    }
    if let Some(f) = file {
        return Ok(RequestBody::File {
            file: f,
            len: total,
        });
    }
    if let Some(f) = first {
        return Ok(RequestBody::Memory(lease.attach(f)));
    }
    Ok(if mem.is_empty() {
        RequestBody::Empty
    } else {
        RequestBody::Memory(lease.attach(mem.freeze()))
    })
}

/// A temporary file holding `head`, the body so far: `small` when it went there for want of
/// budget rather than for its size.
fn spool(head: &[u8], small: bool, memory: &BodyMemory) -> Result<std::fs::File, ProxyError> {
    let mut f = tempfile::tempfile().map_err(ProxyError::BodySpool)?;
    write_blocking(&mut f, head)?;
    memory.spooled(small);
    Ok(f)
}

/// Writes to the spool file. These are page-cache writes of at most one frame (or one
/// `body_buffer`), short enough to do inline rather than hop to a blocking thread per frame.
fn write_blocking(f: &mut std::fs::File, data: &[u8]) -> Result<(), ProxyError> {
    f.write_all(data).map_err(ProxyError::BodySpool)
}
