//! The response body type every handler returns: a small fixed body, FPM's streamed STDOUT,
//! or a static file. One enum instead of a boxed trait object keeps the hot path free of an
//! allocation per response.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Frame, SizeHint};

use crate::access::Completion;
use crate::conn_clock::InFlight;
use crate::fastcgi::body::FcgiBody;
use crate::static_files::FileBody;

/// A response body.
pub enum ProxyBody {
    /// No bytes.
    Empty,
    /// One buffer (error pages, admin answers).
    Full(Option<Bytes>),
    /// PHP's output, streamed as FPM writes it. Boxed, as is the file: a response is moved
    /// several times on its way out, and the small variants (the common whole-body case)
    /// should not pay for copying the large ones.
    Fcgi(Box<FcgiBody>),
    /// A static file streamed from disk.
    File(Box<FileBody>),
}

impl ProxyBody {
    /// A body of one buffer.
    pub fn full(b: impl Into<Bytes>) -> ProxyBody {
        ProxyBody::Full(Some(b.into()))
    }
}

impl http_body::Body for ProxyBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        match self.get_mut() {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Fcgi(f) => Pin::new(&mut **f).poll_frame(cx),
            ProxyBody::File(f) => Pin::new(&mut **f).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Full(b) => b.is_none(),
            ProxyBody::Fcgi(f) => f.is_end_stream(),
            ProxyBody::File(f) => f.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Fcgi(f) => f.size_hint(),
            ProxyBody::File(f) => f.size_hint(),
        }
    }
}

/// What hyper sends: the body, plus the [`Completion`] that runs when it ends (duration
/// histogram, access log). Counting bytes here covers every kind of body in one place.
pub struct ResponseBody {
    kind: ProxyBody,
    done: Option<Box<Completion>>,
    in_flight: Option<InFlight>,
}

impl ResponseBody {
    /// Wraps a body; `done` runs when it ends or is dropped.
    pub fn new(kind: ProxyBody, done: Option<Box<Completion>>) -> ResponseBody {
        ResponseBody {
            kind,
            done,
            in_flight: None,
        }
    }

    /// Keeps the connection's in-flight mark until the body ends (the idle timer starts
    /// only then), and tells it when a frame waits for the client (`send_timeout`).
    pub fn hold(&mut self, in_flight: InFlight) {
        self.in_flight = Some(in_flight);
    }
}

impl http_body::Body for ResponseBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        let this = &mut *self;
        if let Some(f) = this.in_flight.as_mut() {
            f.client_took();
        }
        let r = Pin::new(&mut this.kind).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(d), Some(done)) = (frame.data_ref(), this.done.as_mut()) {
                    done.bytes += d.len() as u64;
                }
                if let Some(f) = this.in_flight.as_mut() {
                    f.wait_for_client();
                }
            }
            Poll::Ready(_) => {
                this.done = None;
                this.in_flight = None;
            }
            Poll::Pending => {}
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.kind.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.kind.size_hint()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn streamed_bodies_are_boxed() {
        // What a response costs to move: the head plus this.
        assert!(std::mem::size_of::<super::ProxyBody>() <= 48);
    }
}
