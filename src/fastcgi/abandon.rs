//! Requests whose client went away while FPM runs the script.
//!
//! FPM does not notice: a worker runs its script to the end (PHP sees a closed connection
//! only when it writes, and then only if the script prints). Closing the connection and
//! letting the pool place go at once would let the next request in while that worker is
//! still busy, so a client that resets its streams (or hangs up) could push FPM past
//! `max_conns`, into its listen backlog where nothing bounds the wait. Instead the
//! connection is read on, its output discarded, until END_REQUEST, FPM closing, or the read
//! timeout, and the place goes only then.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

use super::client::{log_stderr, LogCtx};
use super::codec::{self, RecordType};
use crate::pool::Conn;

/// Read size while discarding: one FastCGI record's largest content.
const DRAIN_READ: usize = 64 * 1024;

/// A connection read on after its response, and the guards (the pool place) to drop after
/// it: fields drop in order, so the FPM slot goes before the place however the task ends
/// (a pool's count of places held on an endpoint, see `Pool::succeeding`, relies on that).
pub(crate) struct Finishing {
    pub(crate) conn: Conn,
    pub(crate) guards: Box<dyn Send + Sync>,
}

/// A request FPM has, or may have, started: its connection and its place in the pool.
/// Dropped as it is (the client went away, and the handler with it), it hands both to
/// [`abandon`]; [`Running::finish`] takes them back for the response or a retry.
pub struct Running<G: Send + Sync + 'static> {
    conn: Option<Conn>,
    place: Option<G>,
    /// When FPM's answer is due at the latest (the read timeout from the request's start):
    /// a request left earlier holds its place no longer than one that waited for its 504.
    due: Instant,
    request_id: Arc<str>,
}

impl<G: Send + Sync + 'static> Running<G> {
    /// A request about to be written on `conn`, holding `place`.
    pub fn new(conn: Conn, place: G, read_timeout: Duration, request_id: &Arc<str>) -> Self {
        Running {
            conn: Some(conn),
            place: Some(place),
            due: Instant::now() + read_timeout,
            request_id: Arc::clone(request_id),
        }
    }

    /// The connection.
    pub fn conn(&mut self) -> &mut Conn {
        // Both are taken only by `finish`, which consumes self.
        self.conn.as_mut().expect("held until finish")
    }

    /// The connection and the place, for the response body or the next attempt.
    pub fn finish(mut self) -> (Conn, G) {
        match (self.conn.take(), self.place.take()) {
            (Some(conn), Some(place)) => (conn, place),
            _ => unreachable!("both are held until finish"),
        }
    }
}

impl<G: Send + Sync + 'static> Drop for Running<G> {
    fn drop(&mut self) {
        if let (Some(conn), Some(place)) = (self.conn.take(), self.place.take()) {
            abandon(
                conn,
                Box::new(place),
                self.due,
                Arc::clone(&self.request_id),
            );
        }
    }
}

/// Reads `conn` on to the end of its request in a task of its own, discarding the output,
/// and drops `guards` (the pool place) after: until `deadline` (the read timeout of the
/// FPM read the client left during), after which the connection closes (PHP then stops
/// the script at its next output, unless it ignores user aborts).
pub(crate) fn abandon(
    conn: Conn,
    guards: Box<dyn Send + Sync>,
    deadline: Instant,
    request_id: Arc<str>,
) {
    // Outside a runtime (shutting down) there is nobody to serve: close, the slot before
    // the place.
    let Ok(rt) = tokio::runtime::Handle::try_current() else {
        drop(conn);
        drop(guards);
        return;
    };
    rt.spawn(drain(Finishing { conn, guards }, deadline, request_id));
}

/// [`abandon`]'s task: discards records to END_REQUEST, EOF or `deadline`.
pub(crate) async fn drain(mut f: Finishing, deadline: Instant, request_id: Arc<str>) {
    let conn = &mut f.conn;
    // FPM may not have the whole request yet (cut off mid-write): the end of its input
    // tells it there is no more, rather than leaving the worker waiting for it. A whole
    // request is not disturbed: FPM reads again only after END_REQUEST.
    let _ = tokio::time::timeout_at(deadline, conn.stream.shutdown()).await;
    loop {
        loop {
            match codec::decode_record(&mut conn.buf) {
                Ok(Some(rec)) => match rec.kind {
                    RecordType::EndRequest => {
                        tracing::debug!(request_id = &*request_id, endpoint = %conn.endpoint().label, "abandoned request ended");
                        return;
                    }
                    RecordType::Stderr => log_stderr(
                        &rec.content,
                        LogCtx {
                            request_id: &request_id,
                            endpoint: &conn.endpoint().label,
                        },
                    ),
                    _ => {}
                },
                Ok(None) => break,
                Err(_) => return,
            }
        }
        if conn.buf.capacity() - conn.buf.len() < 4096 {
            conn.buf.reserve(DRAIN_READ);
        }
        match tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)).await {
            Ok(Ok(n)) if n > 0 => conn.stream.rearm_quickack(),
            // FPM closed or failed: the worker is done with it.
            Ok(_) => return,
            Err(_) => {
                tracing::debug!(request_id = &*request_id, endpoint = %conn.endpoint().label, "abandoned request still running at the read timeout: closing");
                return;
            }
        }
    }
}
