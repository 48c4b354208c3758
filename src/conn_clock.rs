//! Client connection timers that hyper does not give us: `header_timeout` (a request head
//! must arrive within this time of its first byte, however slowly it trickles),
//! `idle_timeout` (a kept-alive connection with no request in flight closes after this) and
//! `send_timeout` (a response the client has stopped accepting: the connection closes, so a
//! client that stops reading cannot hold an FPM worker and its pool place for ever).
//! hyper's own header timer restarts on every read of an idle connection, which makes the
//! two the same number; here they are separate.
//!
//! The clock is shared by the connection's IO wrapper (which sees bytes arrive), the
//! service (which sees a request start) and the response body (which sees it end).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use slab::Slab;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::pool::endpoint::now_ms;

/// Per-connection state.
#[derive(Debug)]
pub struct Clock {
    inflight: AtomicUsize,
    idle_since: AtomicU64,
    /// When the first byte of the next request head arrived (0 = none yet).
    head_since: AtomicU64,
    /// HTTP/2: no head timer (pings and window updates arrive between requests).
    h2: AtomicBool,
    first_read: AtomicBool,
    /// Set while the HTTP/1 server is being parked: closing it must leave the socket open.
    parking: AtomicBool,
    /// Watchdog ticks so far, from 1: the response timestamps below count in ticks, so the
    /// hot path reads no clock.
    ticks: AtomicU64,
    /// Since which tick the response in flight on HTTP/1 (one at a time) has been waiting
    /// for the client to take what it was given (a frame handed to hyper, which has not
    /// asked for more since); 0 while not.
    waiting_h1: AtomicU64,
    /// The same for each HTTP/2 stream in flight.
    waiting_h2: Mutex<Slab<u64>>,
    /// Bytes the socket has taken from the server: what a connection that is closing with
    /// nothing in flight is watched by (it may still be flushing its last response).
    written: AtomicU64,
}

/// What the watchdog should do.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing.
    Fine,
    /// Idle past `idle_timeout`: close gracefully.
    Idle,
    /// A request head is taking longer than `header_timeout`: drop the connection.
    SlowHead,
    /// A response has waited longer than `send_timeout` for the client to take it: drop
    /// the connection (and with it the FPM connection the response streams from).
    Stalled,
}

impl Clock {
    /// A clock for a connection accepted now. `h2` when ALPN already said so. An HTTP/1
    /// connection owes its first request head within `header_timeout` of the accept, so
    /// sockets opened and left silent are not kept for a whole idle period.
    pub fn new(h2: bool) -> Arc<Clock> {
        let now = now_ms();
        Arc::new(Clock {
            inflight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(now),
            head_since: AtomicU64::new(if h2 { 0 } else { now.max(1) }),
            h2: AtomicBool::new(h2),
            first_read: AtomicBool::new(true),
            parking: AtomicBool::new(false),
            ticks: AtomicU64::new(1),
            waiting_h1: AtomicU64::new(0),
            waiting_h2: Mutex::new(Slab::new()),
            written: AtomicU64::new(0),
        })
    }

    /// The clock of a connection coming back from the parking lot: past its first
    /// request, idle since `idle_since` (ms).
    pub fn resumed(idle_since: u64) -> Arc<Clock> {
        Arc::new(Clock {
            inflight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(idle_since),
            head_since: AtomicU64::new(0),
            h2: AtomicBool::new(false),
            first_read: AtomicBool::new(false),
            parking: AtomicBool::new(false),
            ticks: AtomicU64::new(1),
            waiting_h1: AtomicU64::new(0),
            waiting_h2: Mutex::new(Slab::new()),
            written: AtomicU64::new(0),
        })
    }

    /// When the connection's last response ended (ms).
    pub fn idle_since(&self) -> u64 {
        self.idle_since.load(Ordering::Relaxed)
    }

    fn on_read(&self, first_bytes: &[u8]) {
        if self.first_read.swap(false, Ordering::Relaxed) && first_bytes.starts_with(b"PRI ") {
            self.h2.store(true, Ordering::Relaxed);
            self.head_since.store(0, Ordering::Relaxed);
            return;
        }
        if self.inflight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
        {
            self.head_since.store(now_ms().max(1), Ordering::Relaxed);
        }
    }

    /// A request head was parsed and handed to the service.
    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.head_since.store(0, Ordering::Relaxed);
        let key = self
            .h2
            .load(Ordering::Relaxed)
            .then(|| self.slots().insert(0));
        InFlight {
            clock: Arc::clone(self),
            key,
            waiting: false,
        }
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, Slab<u64>> {
        self.waiting_h2.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether an HTTP/1 connection has been quiet long enough to park: no request in
    /// flight, no byte of a next head seen, idle for at least `after`.
    pub fn parkable(&self, after: Duration) -> bool {
        self.inflight.load(Ordering::Relaxed) == 0
            && self.head_since.load(Ordering::Relaxed) == 0
            && now_ms().saturating_sub(self.idle_since.load(Ordering::Relaxed))
                >= after.as_millis() as u64
    }

    /// A response is in flight (its body not yet all handed to the server).
    pub fn busy(&self) -> bool {
        self.inflight.load(Ordering::Relaxed) > 0
    }

    /// Bytes written to the socket so far.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Marks the connection as being parked (or not): see [`Watched`]'s shutdown.
    pub fn set_parking(&self, on: bool) {
        self.parking.store(on, Ordering::Relaxed);
    }

    /// How long a parked connection may stay silent from now: what is left of
    /// `header_timeout` when a head is owed (a fresh connection), else of `idle_timeout`.
    pub fn park_budget(&self, header_timeout: Duration, idle_timeout: Duration) -> Duration {
        let now = now_ms();
        let head = self.head_since.load(Ordering::Relaxed);
        let (since, limit) = if head != 0 {
            (head, header_timeout)
        } else {
            (self.idle_since.load(Ordering::Relaxed), idle_timeout)
        };
        limit.saturating_sub(Duration::from_millis(now.saturating_sub(since)))
    }

    /// The watchdog's decision at this moment; called once per watchdog tick. A response
    /// stalls once it has waited for the client for more than `send_ticks` whole ticks
    /// (`send_timeout` divided by the tick, rounded up).
    pub fn check(
        &self,
        header_timeout: Duration,
        idle_timeout: Duration,
        send_ticks: u64,
    ) -> Verdict {
        let tick = self.ticks.fetch_add(1, Ordering::Relaxed) + 1;
        let now = now_ms();
        if self.inflight.load(Ordering::Relaxed) > 0 {
            // A stamp taken after tick k reads k: more than n ticks since is n whole periods.
            let late = |since: u64| since != 0 && tick.saturating_sub(since) > send_ticks;
            let stalled = late(self.waiting_h1.load(Ordering::Relaxed))
                || self.slots().iter().any(|(_, &since)| late(since));
            return if stalled {
                Verdict::Stalled
            } else {
                Verdict::Fine
            };
        }
        let head = self.head_since.load(Ordering::Relaxed);
        if head != 0 && !self.h2.load(Ordering::Relaxed) {
            if now.saturating_sub(head) > header_timeout.as_millis() as u64 {
                return Verdict::SlowHead;
            }
            return Verdict::Fine;
        }
        if now.saturating_sub(self.idle_since.load(Ordering::Relaxed))
            > idle_timeout.as_millis() as u64
        {
            return Verdict::Idle;
        }
        Verdict::Fine
    }
}

/// Held by a response until its body ends.
#[derive(Debug)]
pub struct InFlight {
    clock: Arc<Clock>,
    /// The HTTP/2 stream's entry; `None` on HTTP/1.
    key: Option<usize>,
    /// The entry is non-zero (kept here to skip the store when nothing changes).
    waiting: bool,
}

impl InFlight {
    fn stamp(&self, since: u64) {
        match self.key {
            None => self.clock.waiting_h1.store(since, Ordering::Relaxed),
            Some(key) => {
                if let Some(s) = self.clock.slots().get_mut(key) {
                    *s = since;
                }
            }
        }
    }

    /// A frame of the body was handed to hyper: the response waits for the client.
    pub fn wait_for_client(&mut self) {
        self.stamp(self.clock.ticks.load(Ordering::Relaxed));
        self.waiting = true;
    }

    /// hyper asks for more of the body: the client has taken what it was given (or made
    /// room for it).
    pub fn client_took(&mut self) {
        if self.waiting {
            self.stamp(0);
            self.waiting = false;
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        match self.key {
            None => self.clock.waiting_h1.store(0, Ordering::Relaxed),
            Some(key) => drop(self.clock.slots().try_remove(key)),
        }
        if self.clock.inflight.fetch_sub(1, Ordering::Relaxed) == 1 {
            self.clock.idle_since.store(now_ms(), Ordering::Relaxed);
        }
    }
}

pin_project_lite::pin_project! {
    /// The connection's IO, reporting reads to the clock.
    pub struct Watched<I> {
        #[pin]
        inner: I,
        clock: Arc<Clock>,
        prefix: Bytes,
    }
}

impl<I> Watched<I> {
    /// Wraps `inner`.
    pub fn new(inner: I, clock: Arc<Clock>) -> Watched<I> {
        Watched {
            inner,
            clock,
            prefix: Bytes::new(),
        }
    }

    /// The wrapped IO.
    pub fn get_mut(&mut self) -> &mut I {
        &mut self.inner
    }

    /// The wrapped IO, unwrapped.
    pub fn into_inner(self) -> I {
        self.inner
    }

    /// Whether bytes given to [`Watched::unread`] are still waiting.
    pub fn has_unread(&self) -> bool {
        !self.prefix.is_empty()
    }

    /// Bytes already read from the socket (by a server that was parked) to be read again
    /// before the socket's own.
    pub fn unread(&mut self, bytes: Bytes) {
        debug_assert!(self.prefix.is_empty());
        self.prefix = bytes;
    }

    /// The connection's first bytes, read past the clock (to tell HTTP/2 from HTTP/1):
    /// reported to it now, then read again before the socket's own.
    pub fn put_back_first(&mut self, bytes: Bytes) {
        if !bytes.is_empty() {
            self.clock.on_read(&bytes);
        }
        self.unread(bytes);
    }
}

impl<I: AsyncRead> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.project();
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(n));
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = r {
            let got = &buf.filled()[before..];
            if !got.is_empty() {
                this.clock.on_read(got);
            }
        }
        r
    }
}

impl<I: AsyncWrite> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            this.clock.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.project();
        let r = this.inner.poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            this.clock.written.fetch_add(n as u64, Ordering::Relaxed);
        }
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        if this.clock.parking.load(Ordering::Relaxed) {
            // The server closes its side of a parked connection; the socket stays open.
            return Poll::Ready(Ok(()));
        }
        this.inner.poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEND: u64 = 1_000_000;

    /// `n` watchdog ticks; the verdict of the last.
    fn ticks(c: &Clock, n: u64, send_ticks: u64) -> Verdict {
        let t = Duration::from_secs(10);
        (0..n).map(|_| c.check(t, t, send_ticks)).last().unwrap()
    }

    #[test]
    fn a_response_the_client_does_not_take_stalls() {
        // HTTP/2: one stream left without window is enough.
        let c = Clock::new(true);
        let mut a = c.begin();
        let mut b = c.begin();
        assert_eq!(
            ticks(&c, 5, 2),
            Verdict::Fine,
            "waiting for FPM is not the client's doing"
        );
        a.wait_for_client();
        b.wait_for_client();
        b.client_took();
        assert_eq!(
            ticks(&c, 2, 2),
            Verdict::Fine,
            "two ticks may be less than two periods"
        );
        assert_eq!(
            ticks(&c, 1, 2),
            Verdict::Stalled,
            "one response left untaken past send_timeout"
        );
        a.client_took();
        assert_eq!(ticks(&c, 1, 2), Verdict::Fine);
        a.wait_for_client();
        drop(a);
        assert_eq!(ticks(&c, 5, 2), Verdict::Fine, "a finished one neither");
        drop(b);

        // HTTP/1: one response at a time.
        let c = Clock::new(false);
        let mut a = c.begin();
        a.wait_for_client();
        assert_eq!(ticks(&c, 3, 2), Verdict::Stalled);
        a.client_took();
        assert_eq!(ticks(&c, 1, 2), Verdict::Fine);
        a.wait_for_client();
        drop(a);
        assert_eq!(ticks(&c, 5, 2), Verdict::Fine);
    }

    #[test]
    fn head_then_idle_then_head() {
        let c = Clock::new(false);
        let (head, idle) = (Duration::from_millis(40), Duration::from_millis(120));
        assert_eq!(c.check(head, idle, SEND), Verdict::Fine);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            c.check(head, idle, SEND),
            Verdict::SlowHead,
            "no request within header_timeout of the accept"
        );

        let c = Clock::new(false);
        c.on_read(b"GET / HTTP/1.1\r\n");
        let g = c.begin();
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            c.check(head, idle, SEND),
            Verdict::Fine,
            "a request in flight is never timed out here"
        );
        drop(g);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            c.check(head, idle, SEND),
            Verdict::Fine,
            "idle, but less than idle_timeout"
        );
        std::thread::sleep(Duration::from_millis(80));
        assert_eq!(c.check(head, idle, SEND), Verdict::Idle);

        let c = Clock::new(false);
        c.on_read(b"PRI * HTTP/2.0\r\n");
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(
            c.check(head, idle, SEND),
            Verdict::Fine,
            "HTTP/2 has no head timer"
        );
    }
}
