//! The end of a response body whose declared length has been sent: hyper drops the body
//! then, before FPM's END_REQUEST has been read. Reading on to it keeps the connection.

use tokio::io::AsyncReadExt;
use tokio::time::Instant;

use super::FcgiBody;
use crate::fastcgi::abandon::{abandon, drain, Finishing};
use crate::fastcgi::client::{log_stderr, LogCtx};
use crate::fastcgi::codec::{self, ProtocolStatus, RecordType};
use crate::pool::Conn;

impl Drop for FcgiBody {
    fn drop(&mut self) {
        let Some(mut conn) = self.take_conn() else {
            return;
        };
        let guards = std::mem::replace(&mut self.guards, Box::new(()));
        let request_id = std::sync::Arc::clone(&self.request_id);
        // A body the client got whole, as declared, on a connection worth keeping: read
        // END_REQUEST and keep it. Anything else (a client abort, a 204 with output, a
        // request FPM stopped taking) leaves FPM busy with the script: its output is
        // discarded, and the place held, until it ends.
        let whole = self.pending.is_none() && self.declared == Some(self.delivered);
        // The read timeout of the read in progress: no longer than a client that stayed.
        let due = self.last_progress + self.read_timeout;
        if !self.reusable || !whole || self.tail.is_some() {
            abandon(conn, guards, due, request_id);
            return;
        }
        match finish_buffered(&mut conn, &self.request_id) {
            Finish::Clean => {
                conn.release();
                drop(guards);
            }
            // More output than declared: the script is still printing.
            Finish::Broken => abandon(conn, guards, due, request_id),
            Finish::More => {
                // END_REQUEST is still on its way (FPM sends it when the script ends): read
                // on in a task of its own, holding the pool place, since the worker is busy
                // until then.
                let Ok(rt) = tokio::runtime::Handle::try_current() else {
                    drop(conn);
                    drop(guards);
                    return;
                };
                rt.spawn(finish_after_body(
                    Finishing { conn, guards },
                    due,
                    request_id,
                ));
            }
        }
    }
}

/// What the records after a fully delivered body say.
enum Finish {
    /// A clean END_REQUEST (with only empty STDOUT or STDERR before it).
    Clean,
    /// More output than declared, another record, a bad record or an unclean end: close.
    Broken,
    /// Nothing conclusive buffered yet.
    More,
}

fn finish_buffered(conn: &mut Conn, request_id: &str) -> Finish {
    loop {
        match codec::decode_record(&mut conn.buf) {
            Ok(Some(rec)) => match rec.kind {
                RecordType::Stdout if rec.content.is_empty() => {}
                RecordType::Stderr => log_stderr(
                    &rec.content,
                    LogCtx {
                        request_id,
                        endpoint: &conn.endpoint().label,
                    },
                ),
                RecordType::EndRequest => {
                    let clean = codec::parse_end_request(&rec.content)
                        .is_ok_and(|e| e.protocol_status == ProtocolStatus::RequestComplete);
                    return if clean { Finish::Clean } else { Finish::Broken };
                }
                _ => return Finish::Broken,
            },
            Ok(None) => return Finish::More,
            Err(_) => return Finish::Broken,
        }
    }
}

/// Reads a connection on to END_REQUEST, within the read timeout, then keeps it; `guards`
/// (the pool place) go when it is done either way.
async fn finish_after_body(mut f: Finishing, deadline: Instant, request_id: std::sync::Arc<str>) {
    loop {
        match finish_buffered(&mut f.conn, &request_id) {
            Finish::Clean => {
                let Finishing { conn, guards } = f;
                conn.release();
                drop(guards);
                return;
            }
            // More output than declared: the script still runs, so the place stays held
            // while the rest is discarded.
            Finish::Broken => return drain(f, deadline, request_id).await,
            Finish::More => {}
        }
        let conn = &mut f.conn;
        if conn.buf.capacity() - conn.buf.len() < 1024 {
            conn.buf.reserve(4096);
        }
        match tokio::time::timeout_at(deadline, conn.stream.read_buf(&mut conn.buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            // FPM closed, failed, or the script ran on past the read timeout: close.
            _ => return,
        }
    }
}
