//! The per-connection serve loops: hyper's HTTP/1 or HTTP/2 server beside the watchdog
//! tick that enforces the connection's timeouts (header, idle, send), parks idle HTTP/1
//! connections, and starts a graceful close on shutdown.

use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use super::{http1_builder, http2_builder, ClientIo, Serve, Timers, PARK_AFTER};
use crate::conn_clock::{Clock, InFlight, Verdict, Watched};
use crate::proxy::ConnInfo;

fn service(
    s: &Serve,
    info: &Arc<ConnInfo>,
    clock: &Arc<Clock>,
) -> impl hyper::service::Service<
    hyper::Request<hyper::body::Incoming>,
    Response = hyper::Response<crate::respbody::ResponseBody>,
    Error = std::convert::Infallible,
    Future = impl std::future::Future<
        Output = Result<hyper::Response<crate::respbody::ResponseBody>, std::convert::Infallible>,
    > + Send,
> + Clone
       + Send
       + Unpin
       + 'static {
    let (proxy, info, clock) = (s.proxy.clone(), info.clone(), clock.clone());
    service_fn(move |req| {
        let in_flight = clock.begin();
        // Boxed: the request's future is a few KiB, and hyper moves what it is given (an
        // HTTP/2 stream is spawned as a task with it inside, and tokio moves a task's
        // future by value several times before it first runs). A pointer moves for free.
        // The box holds the handler's future itself, not a block that makes it on its first
        // poll: that block would be the larger one, copied whole into the box and then
        // copying the handler's future into itself.
        Held {
            handle: Box::pin(Arc::clone(&proxy).handle(req, Arc::clone(&info))),
            in_flight: Some(in_flight),
        }
    })
}

/// A request's handler future, and the connection's in-flight mark, which goes with the
/// response to its body.
struct Held<F> {
    handle: std::pin::Pin<Box<F>>,
    in_flight: Option<InFlight>,
}

impl<F> std::future::Future for Held<F>
where
    F: std::future::Future<Output = HandlerResult>,
{
    type Output = HandlerResult;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<HandlerResult> {
        // Unpin: the handler's future is behind its box.
        let this = self.get_mut();
        let mut resp = std::task::ready!(this.handle.as_mut().poll(cx))?;
        if let Some(in_flight) = this.in_flight.take() {
            resp.body_mut().hold(in_flight);
        }
        std::task::Poll::Ready(Ok(resp))
    }
}

type HandlerResult =
    Result<hyper::Response<crate::respbody::ResponseBody>, std::convert::Infallible>;

/// Runs hyper's HTTP/1 server on the connection until it ends (`None`) or has been idle
/// for [`PARK_AFTER`] (the IO back, with any bytes the server had read ahead).
pub(super) async fn serve_h1<I: ClientIo>(
    io: Watched<I>,
    info: &Arc<ConnInfo>,
    s: &Serve,
    clock: &Arc<Clock>,
    t: Timers,
) -> Option<Watched<I>> {
    // Boxed: the server's state lives only while it runs, not in a parked connection.
    let mut conn =
        Box::new(http1_builder(&t).serve_connection(TokioIo::new(io), service(s, info, clock)));
    let mut tick = tokio::time::interval(t.tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut closing, mut parking) = (false, false);
    // While closing with nothing in flight: bytes written at the last tick, and ticks since
    // they last grew (hyper flushes its last response before it ends the connection).
    let (mut flushed, mut still) = (0u64, 0u64);
    loop {
        // Shutdown is looked at on the tick, not as a branch here: a cancellation token's
        // future takes two locks shared by every connection of the listener each time it
        // is polled, and this loop is polled on every wake-up of the connection.
        tokio::select! {
            biased;
            res = &mut *conn => {
                if let Err(e) = res {
                    if e.is_parse() {
                        // hyper answered it (400 or 431) without calling us.
                        s.proxy.refused_head(info, e.is_parse_too_large());
                    }
                    tracing::debug!("client connection ended: {e}");
                    return None;
                }
                if !parking {
                    return None;
                }
                clock.set_parking(false);
                tracing::trace!("connection parked");
                crate::memory::parked();
                let parts = conn.into_parts();
                let mut io = parts.io.into_inner();
                if !parts.read_buf.is_empty() {
                    io.unread(parts.read_buf);
                }
                return Some(io);
            }
            _ = tick.tick() => {
                let verdict = clock.check(t.header, t.idle, t.send_ticks);
                if verdict == Verdict::SlowHead {
                    // A slowloris head: no answer owed, drop the socket (while draining too).
                    return None;
                }
                if verdict == Verdict::Stalled {
                    tracing::debug!("client took no response bytes within send_timeout: closing");
                    return None;
                }
                if closing {
                    let written = clock.written();
                    if clock.busy() || written != flushed {
                        (flushed, still) = (written, 0);
                    } else {
                        still += 1;
                        if still > t.send_ticks {
                            tracing::debug!("closing connection took no bytes within send_timeout: dropping");
                            return None;
                        }
                    }
                    continue;
                }
                if s.shutdown.is_cancelled() || verdict == Verdict::Idle {
                    closing = true;
                    std::pin::Pin::new(&mut *conn).graceful_shutdown();
                } else if clock.parkable(PARK_AFTER) {
                    // hyper is idle (the clock saw no byte since the last response):
                    // closing it now ends it at once and leaves the socket open.
                    (closing, parking) = (true, true);
                    clock.set_parking(true);
                    std::pin::Pin::new(&mut *conn).graceful_shutdown();
                }
            }
        }
    }
}

/// Serves an HTTP/2 connection to its end.
pub(super) async fn serve_h2<I: ClientIo>(
    io: Watched<I>,
    info: Arc<ConnInfo>,
    s: &Serve,
    clock: &Arc<Clock>,
    t: Timers,
) {
    let mut conn =
        Box::pin(http2_builder(&t).serve_connection(TokioIo::new(io), service(s, &info, clock)));
    let mut tick = tokio::time::interval(t.h2_tick);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut closing = false;
    // Ticks spent closing with no request the clock sees in flight.
    let mut leftover_ticks = 0;
    loop {
        // Shutdown on the tick, as in `serve_h1`.
        tokio::select! {
            biased;
            res = conn.as_mut() => {
                if let Err(e) = res {
                    tracing::debug!("client connection ended: {e}");
                }
                return;
            }
            _ = tick.tick() => {
                let verdict = clock.check(t.header, t.idle, t.h2_send_ticks);
                if verdict == Verdict::Stalled {
                    // One stream the client gives no window to is enough: it holds an FPM
                    // worker. The whole connection goes, as with nginx's send_timeout.
                    tracing::debug!("client took no response bytes within send_timeout: closing");
                    return;
                }
                if closing && verdict == Verdict::Idle {
                    // GOAWAY sent and every request answered, yet open: what is left are
                    // response bytes already handed to h2 that a client giving no window
                    // never takes. As for HTTP/1, closing lasts at most send_timeout.
                    leftover_ticks += 1;
                    if leftover_ticks > t.h2_send_ticks {
                        tracing::debug!("closing connection took no bytes within send_timeout: dropping");
                        return;
                    }
                }
                if !closing && (s.shutdown.is_cancelled() || verdict == Verdict::Idle) {
                    closing = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
        }
    }
}
