//! Client listeners: bind, accept under `max_connections`, and serve each connection with
//! hyper-util's auto builder (HTTP/1.1, and HTTP/2 with prior knowledge on plaintext).
//!
//! Every connection task watches the shutdown token: on shutdown HTTP/1 connections close
//! after their current response and HTTP/2 connections send GOAWAY.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::conn_clock::{Clock, Verdict, Watched};
use crate::metrics::Metrics;
use crate::proxy::{ConnInfo, Proxy};

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

/// Builds the HTTP server settings for one connection from the current limits.
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    // hyper needs a timer or header_read_timeout never fires (slowloris). Its header timer
    // also bounds the idle wait between kept-alive requests.
    b.http1()
        .timer(TokioTimer::new())
        // Head and idle timers are ours (conn_clock): hyper's restarts on idle reads.
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .title_case_headers(true)
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
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
        let tls = tls.clone();
        s.tracker.spawn(async move {
            let gauge = s2.metrics.client_connections.with_label_values(&[kind]);
            gauge.inc();
            let (mut stream, mut remote, mut local) = (stream, remote, local);
            if proxy_protocol {
                let timeout = s2.proxy.shared.load().limits().header_timeout;
                match crate::proxy_protocol::read_header(&mut stream, timeout).await {
                    Ok(Some((src, dst))) => (remote, local) = (src, dst),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::debug!(%remote, "connection refused: {e}");
                        gauge.dec();
                        return;
                    }
                }
            }
            match tls {
                None => {
                    let info = Arc::new(ConnInfo {
                        remote,
                        local,
                        tls: None,
                    });
                    serve_connection(stream, info, &s2, false).await;
                }
                Some(cfg) => {
                    // A handshake gets the same budget as a request head: a client that
                    // opens a socket and says nothing must not hold a connection slot.
                    let timeout = s2.proxy.shared.load().limits().header_timeout;
                    let acceptor = tokio_rustls::TlsAcceptor::from(cfg);
                    match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let proto = crate::tls::protocol_name(
                                tls_stream.get_ref().1.protocol_version(),
                            );
                            let info = Arc::new(ConnInfo {
                                remote,
                                local,
                                tls: Some(proto),
                            });
                            let h2 = tls_stream.get_ref().1.alpn_protocol() == Some(b"h2");
                            serve_connection(tls_stream, info, &s2, h2).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%remote, "TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!(%remote, "TLS handshake timed out"),
                    }
                }
            }
            gauge.dec();
            drop(permit);
        });
    }
}

/// Serves one accepted connection (plain or already TLS-terminated) to its end, with the
/// header and idle timers of [`Clock`] watching it. `h2` when ALPN chose HTTP/2.
pub async fn serve_connection<I>(io: I, info: Arc<ConnInfo>, s: &Serve, h2: bool)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let limits = s.proxy.shared.load().limits().clone();
    let builder = http_builder(&limits);
    let clock = Clock::new(h2);
    let proxy = s.proxy.clone();
    let svc_clock = clock.clone();
    let service = service_fn(move |req| {
        let in_flight = svc_clock.begin();
        let fut = proxy.clone().handle(req, info.clone());
        async move {
            let mut resp = fut.await?;
            resp.body_mut().hold(in_flight);
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let conn = builder.serve_connection(TokioIo::new(Watched::new(io, clock.clone())), service);
    tokio::pin!(conn);
    // Half the shorter timeout, so either fires within 1.5x of its setting; at most 1 s.
    let period = (limits.header_timeout.min(limits.idle_timeout) / 2)
        .clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!("client connection ended: {e}");
                }
                return;
            }
            _ = s.shutdown.cancelled(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = tick.tick(), if !closing => match clock.check(limits.header_timeout, limits.idle_timeout) {
                Verdict::Fine => {}
                Verdict::Idle => {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
                // A slowloris head: no answer owed, drop the socket.
                Verdict::SlowHead => return,
            },
        }
    }
}
