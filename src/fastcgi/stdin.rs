//! A large request as it goes to FPM: the encoded BEGIN_REQUEST + PARAMS, then the body as
//! STDIN records and their empty terminator, written as the socket takes it.
//!
//! Every byte of progress lives in [`StdinTail`] itself, not in a future, so the writing
//! can stop at any point and go on from another place: it starts beside the read of the
//! response head and, when the script answers before it has read all of its input, goes
//! on beside the response body. PHP reads a PUT body only when the script asks for it, so
//! a script that streams its answer first would otherwise stall against us, both sides
//! waiting on full socket buffers.

use std::future::Future;
use std::io::{self, IoSlice};
use std::os::unix::fs::FileExt;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;

use super::client::REQUEST_ID;
use super::codec::{self, RecordType};

/// Content bytes of every STDIN record but the last of the body.
const FULL: u64 = codec::MAX_CONTENT_LEN as u64;
/// Wire size of a full STDIN record.
const RECORD: u64 = codec::HEADER_LEN as u64 + FULL;
/// In-memory records offered to one vectored write (4 MiB).
const BATCH: usize = 64;

/// Where the body comes from.
pub enum Source {
    /// Nowhere: the prefix holds the whole request, STDIN terminator included.
    Nothing,
    /// In memory: written from its own buffer, record headers beside slices of it.
    Memory(Bytes),
    /// Spooled to a file (positioned at its start) of this many bytes: read a record at a
    /// time.
    File(std::fs::File, u64),
}

enum Body {
    Nothing,
    Memory(Bytes),
    File(FileBody),
}

struct FileBody {
    file: Arc<std::fs::File>,
    /// The read of the record being fetched, off the runtime's threads.
    job: Option<tokio::task::JoinHandle<(Vec<u8>, io::Result<()>)>>,
    /// The content of the record being written, `filled` bytes of it read so far.
    buf: Vec<u8>,
    filled: usize,
    /// The record whose content `buf` holds.
    record: u64,
}

/// The request's bytes not yet written: see the module doc.
pub struct StdinTail {
    prefix: Bytes,
    body: Body,
    /// Body length in bytes.
    len: u64,
    /// Bytes written of the whole stream: prefix, records, terminator.
    sent: u64,
}

impl StdinTail {
    /// `prefix` (the encoded BEGIN_REQUEST and PARAMS) followed by the body's records.
    pub fn new(prefix: Bytes, source: Source) -> StdinTail {
        let (body, len) = match source {
            Source::Nothing => (Body::Nothing, 0),
            Source::Memory(b) => {
                let len = b.len() as u64;
                (Body::Memory(b), len)
            }
            Source::File(file, len) => (
                Body::File(FileBody {
                    file: Arc::new(file),
                    job: None,
                    buf: Vec::new(),
                    filled: 0,
                    record: u64::MAX,
                }),
                len,
            ),
        };
        StdinTail {
            prefix,
            body,
            len,
            sent: 0,
        }
    }

    /// Bytes written so far: a change means progress.
    pub fn sent(&self) -> u64 {
        self.sent
    }

    /// Whole-stream length: prefix, one header per record (the terminator too), the body.
    fn total(&self) -> u64 {
        if let Body::Nothing = self.body {
            return self.prefix.len() as u64;
        }
        let records = self.len.div_ceil(FULL) + 1;
        self.prefix.len() as u64 + records * codec::HEADER_LEN as u64 + self.len
    }

    /// Content length of body record `k` (the terminator, `k` = the number of data
    /// records, has none).
    fn content_len(&self, k: u64) -> usize {
        // At most FULL, which fits in usize.
        (self.len.saturating_sub(k * FULL)).min(FULL) as usize
    }

    /// The body record at `at` bytes into the records, and the offset into it. Every data
    /// record but the last is full; the last may be short; the terminator follows.
    fn locate(&self, at: u64) -> (u64, u64) {
        let full = self.len / FULL;
        if at < full * RECORD {
            return (at / RECORD, at % RECORD);
        }
        let rest = at - full * RECORD;
        let short = self.len % FULL;
        match short {
            0 => (full, rest),
            _ if rest < codec::HEADER_LEN as u64 + short => (full, rest),
            _ => (full + 1, rest - (codec::HEADER_LEN as u64 + short)),
        }
    }

    /// Writes as much as the socket takes; `Ready(Ok)` once the terminator is out.
    pub fn poll_write<W: AsyncWrite + ?Sized>(
        &mut self,
        cx: &mut Context<'_>,
        mut w: Pin<&mut W>,
    ) -> Poll<io::Result<()>> {
        let prefix_len = self.prefix.len() as u64;
        // Records 0..=last: the data records, then the terminator.
        let last = self.len.div_ceil(FULL);
        loop {
            if self.sent >= self.total() {
                return w.as_mut().poll_flush(cx);
            }
            let (first, mut skip) = self.locate(self.sent.saturating_sub(prefix_len));
            let first_len = self.content_len(first);
            // A spooled body's record is read in before any of it is written.
            let batch = match &mut self.body {
                Body::Nothing => 0,
                Body::Memory(_) => BATCH as u64,
                Body::File(f) => {
                    ready!(f.poll_fill(cx, first, first_len))?;
                    1
                }
            };
            let end = (last + 1).min(first + batch);
            let mut headers = [[0u8; codec::HEADER_LEN]; BATCH];
            for (k, h) in (first..end).zip(headers.iter_mut()) {
                // content_len ≤ FULL = u16::MAX.
                let len = self.content_len(k) as u16;
                *h = codec::record_header(RecordType::Stdin, REQUEST_ID, len, 0);
            }
            let mut parts = [IoSlice::new(&[]); 2 * BATCH + 1];
            let mut n = 0;
            if self.sent < prefix_len {
                // sent < prefix_len ≤ usize::MAX.
                parts[0] = IoSlice::new(&self.prefix[self.sent as usize..]);
                n = 1;
            }
            for (k, header) in (first..end).zip(headers.iter()) {
                let len = self.content_len(k);
                let content: &[u8] = match &self.body {
                    // k * FULL < len ≤ usize::MAX for a data record (0 for the terminator).
                    Body::Memory(b) => {
                        let start = (k * FULL) as usize;
                        b.get(start..start + len).unwrap_or_default()
                    }
                    Body::File(f) => f.buf.get(..len).unwrap_or_default(),
                    Body::Nothing => &[],
                };
                // skip < the record's size, which is at most RECORD.
                let s = skip as usize;
                let h = s.min(codec::HEADER_LEN);
                if h < codec::HEADER_LEN {
                    parts[n] = IoSlice::new(&header[h..]);
                    n += 1;
                }
                if let Some(c) = content.get(s - h..).filter(|c| !c.is_empty()) {
                    parts[n] = IoSlice::new(c);
                    n += 1;
                }
                skip = 0;
            }
            let wrote = ready!(w.as_mut().poll_write_vectored(cx, &parts[..n]))?;
            if wrote == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += wrote as u64;
        }
    }
}

impl FileBody {
    /// Reads record `record`'s `want` content bytes into `buf`, if not already there. By
    /// offset (`pread`), not through the file position: the descriptor is shared with the
    /// request's other attempts, and a read left running by an abandoned one must not move
    /// where a retry reads.
    fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        record: u64,
        want: usize,
    ) -> Poll<io::Result<()>> {
        if want == 0 || (self.record == record && self.filled == want) {
            return Poll::Ready(Ok(()));
        }
        let job = match &mut self.job {
            Some(job) => job,
            None => {
                self.record = record;
                self.filled = 0;
                let file = Arc::clone(&self.file);
                let mut buf = std::mem::take(&mut self.buf);
                buf.resize(want, 0);
                self.job.insert(tokio::task::spawn_blocking(move || {
                    let r = file.read_exact_at(&mut buf, record * FULL);
                    (buf, r)
                }))
            }
        };
        let done = ready!(Pin::new(job).poll(cx));
        self.job = None;
        let (buf, r) = done.map_err(io::Error::other)?;
        self.buf = buf;
        match r {
            Ok(()) => {
                self.filled = want;
                Poll::Ready(Ok(()))
            }
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the spooled request body is shorter than its length",
            ))),
            Err(e) => Poll::Ready(Err(e)),
        }
    }
}

#[cfg(test)]
#[path = "stdin_tests.rs"]
mod tests;
