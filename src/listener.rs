//! Client listeners: bind, accept under `max_connections`, and serve each connection with
//! hyper (HTTP/1.1, HTTP/2 by ALPN, and HTTP/2 with prior knowledge on plaintext).
//!
//! Every connection task watches the shutdown token: on shutdown HTTP/1 connections close
//! after their current response and HTTP/2 connections send GOAWAY.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::conn_clock::{Clock, Watched};
use crate::metrics::Metrics;
use crate::parking::{ConnGuard, Lot, Parked, Resume};
use crate::proxy::{ConnInfo, Proxy};

mod serve;
use serve::{serve_h1, serve_h2};

/// Binds a listening socket with `SO_REUSEADDR` and a deep backlog.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

/// Idle HTTP/1 connections park after this long: the HTTP server state and its buffers
/// are dropped and the connection waits for its next request with nothing but the socket,
/// the way nginx frees its buffers between kept-alive requests. Thousands of idle
/// keep-alive clients then cost about a kilobyte each instead of tens.
const PARK_AFTER: Duration = Duration::from_millis(200);

/// What a connection's timers need, copied out of the limits at accept.
#[derive(Clone, Copy)]
struct Timers {
    header: Duration,
    idle: Duration,
    /// `send_timeout` in watchdog ticks (rounded up), for HTTP/1 and for HTTP/2.
    send_ticks: u64,
    h2_send_ticks: u64,
    max_head: usize,
    /// The watchdog's period while a server runs.
    tick: Duration,
    /// The HTTP/2 watchdog's period.
    h2_tick: Duration,
}

/// Whole periods of `tick` in `d`, rounded up (at least 1).
fn ticks_in(d: Duration, tick: Duration) -> u64 {
    (d.as_nanos().div_ceil(tick.as_nanos().max(1)) as u64).max(1)
}

impl Timers {
    fn new(limits: &Limits, shutdown_grace: Duration) -> Timers {
        // Half the shorter timeout, so either fires within 1.5x of its setting; at most
        // PARK_AFTER, so an idle connection parks soon after it went quiet.
        let tick = (limits
            .header_timeout
            .min(limits.idle_timeout)
            .min(limits.send_timeout)
            / 2)
        .clamp(Duration::from_millis(50), PARK_AFTER);
        // Slower for HTTP/2 (pings and window updates wake its connections often): within
        // half a second, and within a quarter of a short shutdown grace, so that a
        // connection sends its GOAWAY before the grace ends and the process exits (the
        // grace in force when the connection was accepted). Never under 50 ms, HTTP/1's
        // floor: a zero grace must not make every HTTP/2 connection wake 100 times a second.
        let h2_tick = tick
            .max(Duration::from_millis(500).min(limits.idle_timeout / 2))
            .min(shutdown_grace / 4)
            .max(Duration::from_millis(50));
        Timers {
            header: limits.header_timeout,
            idle: limits.idle_timeout,
            send_ticks: ticks_in(limits.send_timeout, tick),
            h2_send_ticks: ticks_in(limits.send_timeout, h2_tick),
            max_head: limits.max_header_bytes,
            tick,
            h2_tick,
        }
    }
}

/// A client connection's IO, as far as parking needs it.
pub trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ready when a read would not block (bytes, end of stream or an error), without
    /// reading anything.
    fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;

    /// Plaintext only: copies the bytes waiting to be read, without consuming them, to
    /// tell HTTP/2 prior knowledge from HTTP/1. `Ok(0)` where that cannot be done.
    fn poll_peek(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let _ = (cx, buf);
        Poll::Ready(Ok(0))
    }

    /// Plaintext only: the socket out of the runtime's reactor, for a [`Lot`]. `Err(self)`
    /// where the connection cannot park there; `Ok(Err(_))` when leaving the reactor
    /// failed (the socket is closed).
    fn into_parkable(self) -> Result<io::Result<std::net::TcpStream>, Self>
    where
        Self: Sized,
    {
        Err(self)
    }
}

impl ClientIo for TcpStream {
    fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }

    fn poll_peek(&mut self, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let mut rb = ReadBuf::new(buf);
        TcpStream::poll_peek(self, cx, &mut rb).map_ok(|n| n.min(rb.filled().len()))
    }

    fn into_parkable(self) -> Result<io::Result<std::net::TcpStream>, Self> {
        Ok(self.into_std())
    }
}

impl ClientIo for tokio_rustls::server::TlsStream<TcpStream> {
    fn poll_parked(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let (tcp, tls) = self.get_mut();
        if !tls.wants_read() {
            // Decrypted bytes (or a close) are already waiting inside rustls.
            return Poll::Ready(Ok(()));
        }
        tcp.poll_read_ready(cx)
    }
}

fn http1_builder(t: &Timers) -> http1::Builder {
    let mut b = http1::Builder::new();
    // Head and idle timers are ours (conn_clock): hyper's restarts on idle reads.
    b.timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(t.max_head.max(8192))
        .title_case_headers(true)
        .keep_alive(true);
    b
}

fn http2_builder(t: &Timers) -> http2::Builder<TokioExecutor> {
    let mut b = http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(t.max_head).unwrap_or(u32::MAX))
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_concurrent_streams(128)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    b
}

/// Everything an accept loop needs.
#[derive(Clone)]
pub struct Serve {
    /// The request handler.
    pub proxy: Arc<Proxy>,
    /// Metrics, for the connection gauge.
    pub metrics: Arc<Metrics>,
    /// Shared across listeners: `limits.max_connections`.
    pub conn_limit: Arc<Semaphore>,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    /// Tracks connection tasks for the drain.
    pub tracker: TaskTracker,
}

/// Accepts until shutdown. Waiting for a connection permit before accepting leaves excess
/// clients in the kernel backlog instead of accepting and dropping them.
pub async fn accept_loop(
    listener: TcpListener,
    kind: &'static str,
    tls: Option<Arc<rustls::ServerConfig>>,
    proxy_protocol: bool,
    s: Serve,
) {
    let local = listener.local_addr().ok();
    // Plaintext connections park in a lot of their own; TLS ones keep their session in
    // their task.
    let lot = match tls {
        Some(_) => None,
        None => match Lot::start(s.shutdown.clone(), Resumer(s.clone(), Handle::current())) {
            Ok(lot) => Some(lot),
            Err(e) => {
                tracing::warn!(listener = kind, "idle connections wait in their tasks: {e}");
                None
            }
        },
    };
    loop {
        let permit = tokio::select! {
            _ = s.shutdown.cancelled() => return,
            p = s.conn_limit.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (stream, remote) = tokio::select! {
            _ = s.shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(v) => v,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(listener = kind, "accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let local = stream.local_addr().ok().or(local).unwrap_or(remote);
        let s2 = s.clone();
        let (tls, lot) = (tls.clone(), lot.clone());
        s.tracker.spawn(async move {
            let gauge = s2.metrics.client_connections.with_label_values(&[kind]);
            let guard = ConnGuard::new(gauge, permit);
            let (mut stream, mut remote, mut local) = (stream, remote, local);
            if proxy_protocol {
                let refused = |cause| {
                    let m = &s2.metrics.client_refused;
                    m.with_label_values(&[kind, cause]).inc();
                };
                let timeout = {
                    let rt = s2.proxy.shared.load();
                    let from = &rt.config.proxy_protocol_from;
                    if !from.is_empty() && !from.iter().any(|n| n.contains(remote.ip())) {
                        // Whoever may write a PROXY header names every client it carries.
                        tracing::debug!(%remote, "connection refused: not in proxy_protocol_from");
                        refused("proxy_source");
                        return;
                    }
                    rt.limits().header_timeout
                };
                // Boxed, like the serving below.
                match Box::pin(crate::proxy_protocol::read_header(&mut stream, timeout)).await {
                    Ok(Some((src, dst))) => (remote, local) = (src, dst),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(%remote, "connection refused: {e}");
                        refused("proxy_header");
                        return;
                    }
                }
            }
            // Boxed: a task keeps room for its largest state for its whole life, and a
            // parked plaintext connection should not carry a TLS session's.
            match tls {
                None => {
                    let info = Arc::new(ConnInfo::new(remote, local, None));
                    let (io, conn) = Conn::accepted(stream, info, guard, lot.as_ref(), false);
                    Box::pin(serve_connection(io, conn, &s2, false)).await;
                }
                Some(cfg) => Box::pin(serve_tls(stream, cfg, remote, local, guard, &s2)).await,
            }
        });
    }
}

/// The TLS handshake, then [`serve_connection`].
async fn serve_tls(
    stream: TcpStream,
    cfg: Arc<rustls::ServerConfig>,
    remote: SocketAddr,
    local: SocketAddr,
    guard: ConnGuard,
    s: &Serve,
) {
    // A handshake gets the same budget as a request head: a client that opens a socket
    // and says nothing must not hold a connection slot.
    let timeout = s.proxy.shared.load().limits().header_timeout;
    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => {
            let proto = crate::tls::protocol_name(tls_stream.get_ref().1.protocol_version());
            let info = Arc::new(ConnInfo::new(remote, local, Some(proto)));
            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
            let (io, conn) = Conn::accepted(tls_stream, info, guard, None, h2);
            serve_connection(io, conn, s, h2).await;
        }
        Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
    }
}

/// What a connection being served carries besides its IO.
struct Conn<'a> {
    info: Arc<ConnInfo>,
    clock: Arc<Clock>,
    guard: ConnGuard,
    /// Where it parks when idle (plaintext listeners).
    lot: Option<&'a Arc<Lot>>,
    /// Nothing read yet (a connection coming back from its lot has served requests).
    fresh: bool,
}

impl<'a> Conn<'a> {
    /// A connection just accepted (and through its TLS handshake), with its clock started.
    fn accepted<I>(
        io: I,
        info: Arc<ConnInfo>,
        guard: ConnGuard,
        lot: Option<&'a Arc<Lot>>,
        h2: bool,
    ) -> (Watched<I>, Conn<'a>) {
        let clock = Clock::new(h2);
        let io = Watched::new(io, clock.clone());
        let conn = Conn {
            info,
            clock,
            guard,
            lot,
            fresh: true,
        };
        (io, conn)
    }
}

/// Serves a connection (plain or already TLS-terminated) to its end or until it parks in
/// its lot, with the header and idle timers of its [`Clock`] watching it. `h2` when ALPN
/// chose HTTP/2.
///
/// An HTTP/1 connection alternates between parked (waiting for bytes with no server
/// state, see [`PARK_AFTER`]) and served (hyper's HTTP/1 server, until it has been idle
/// for `PARK_AFTER`); an HTTP/2 connection is served to its end.
async fn serve_connection<I: ClientIo>(mut io: Watched<I>, c: Conn<'_>, s: &Serve, h2: bool) {
    let t = {
        let rt = s.proxy.shared.load();
        Timers::new(rt.limits(), rt.config.shutdown_grace)
    };
    let Conn {
        info,
        clock,
        guard,
        lot,
        fresh,
    } = c;
    if h2 {
        return Box::pin(serve_h2(io, info, s, &clock, t)).await;
    }
    // Only a fresh connection may turn out to be HTTP/2 with prior knowledge.
    let mut first = fresh;
    loop {
        if !io.has_unread() {
            let budget = clock.park_budget(t.header, t.idle);
            // A request that has arrived is served, even at the budget's end.
            let ready = tokio::select! {
                biased;
                r = std::future::poll_fn(|cx| io.get_mut().poll_parked(cx)) => r.is_ok(),
                _ = s.shutdown.cancelled() => false,
                _ = tokio::time::sleep(budget) => false,
            };
            if !ready {
                // Shutting down, idle past idle_timeout, or silent past header_timeout
                // since the accept: nothing is owed, close.
                return;
            }
        }
        if std::mem::take(&mut first) {
            let budget = clock.park_budget(t.header, t.idle);
            match Box::pin(tokio::time::timeout(budget, sniff_h2(&mut io)))
                .await
                .unwrap_or(None)
            {
                Some(true) => return Box::pin(serve_h2(io, info, s, &clock, t)).await,
                Some(false) => {}
                None => return,
            }
        }
        // The servers' futures are boxed (one allocation per wake-up) so that what stays
        // allocated while parked is only this loop's state.
        io = match Box::pin(serve_h1(io, &info, s, &clock, t)).await {
            Some(back) => back,
            None => return,
        };
        let Some(lot) = lot.filter(|_| !io.has_unread()) else {
            continue;
        };
        match io.into_inner().into_parkable() {
            Ok(Ok(stream)) => {
                let parked = Parked {
                    stream,
                    info,
                    idle_since: clock.idle_since(),
                    guard,
                };
                let Err(back) = lot.park(parked, clock.park_budget(t.header, t.idle)) else {
                    return;
                };
                if s.shutdown.is_cancelled() {
                    return;
                }
                // The lot cannot watch it: the connection waits in this task after all.
                return Box::pin(serve_unparked(back, None, s)).await;
            }
            Ok(Err(e)) => {
                tracing::debug!("cannot park a connection: {e}");
                return;
            }
            Err(back) => io = Watched::new(back, clock.clone()),
        }
    }
}

/// Serves the connections a lot hands back, on the runtime.
struct Resumer(Serve, Handle);

impl Resume for Resumer {
    fn resume(&self, lot: &Arc<Lot>, p: Parked) {
        let (s, lot) = (self.0.clone(), lot.clone());
        let task = async move { serve_unparked(p, Some(&lot), &s).await };
        self.0.tracker.spawn_on(task, &self.1);
    }
}

/// Serves a connection that was parked (or could not be) again, back in the runtime's
/// reactor; it parks in `lot` when idle again.
async fn serve_unparked(p: Parked, lot: Option<&Arc<Lot>>, s: &Serve) {
    let stream = match TcpStream::from_std(p.stream) {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!("cannot serve a parked connection again: {e}");
            return;
        }
    };
    let clock = Clock::resumed(p.idle_since);
    let io = Watched::new(stream, clock.clone());
    let conn = Conn {
        info: p.info,
        clock,
        guard: p.guard,
        lot,
        fresh: false,
    };
    Box::pin(serve_connection(io, conn, s, false)).await;
}

/// Whether a plaintext connection opens with the HTTP/2 preface. `None` on a read error.
async fn sniff_h2<I: ClientIo>(io: &mut Watched<I>) -> Option<bool> {
    const PRI: &[u8] = b"PRI ";
    let mut buf = [0u8; 4];
    let n = std::future::poll_fn(|cx| io.get_mut().poll_peek(cx, &mut buf))
        .await
        .ok()?;
    if n >= PRI.len() || n == 0 || buf[..n] != PRI[..n] {
        return Some(n >= PRI.len() && buf == *PRI);
    }
    // "P", "PR" or "PRI" so far: POST, PUT, PATCH or PROPFIND may still follow. Peeking
    // again would find the same bytes at once and spin, so the first four bytes are read
    // (each read waits for data) and put back for whichever server follows.
    let mut got = 0;
    while got < PRI.len() {
        match tokio::io::AsyncReadExt::read(io.get_mut(), &mut buf[got..]).await {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(_) => return None,
        }
        if buf[..got] != PRI[..got.min(PRI.len())] {
            break;
        }
    }
    let h2 = buf[..got] == *PRI;
    io.put_back_first(Bytes::copy_from_slice(&buf[..got]));
    Some(h2)
}
