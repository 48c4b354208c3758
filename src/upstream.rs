//! The upstream half of a request: choose an endpoint, get a FastCGI connection (a kept one
//! or a new one), run the exchange, and retry only where PHP cannot have run the script:
//! a failed connect; for idempotent methods (all but POST, PATCH and LOCK, nginx's rule), a
//! reused kept-alive connection that FPM had closed (the worker was recycled) before any
//! response byte, or any reset before the first response byte. Never after a response
//! byte, and never a POST that may have started: its kept connection is probed before it
//! is used, since a worker that read it and died looks the same as a closed one afterwards.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, Method, Response, StatusCode};
use tokio::time::Instant;

use crate::body::RequestBody;
use crate::error::ProxyError;
use crate::fastcgi::abandon::Running;
use crate::fastcgi::body::FcgiBody;
use crate::fastcgi::client::{self, Answer, LogCtx, Outgoing, Source, REQUEST_ID};
use crate::fastcgi::codec::{self, ParamsWriter};
use crate::mapping::{self, ParamSink, RequestFacts, VhostFacts};
use crate::metrics::Metrics;
use crate::pool::{Admit, Endpoint, Pool};
use crate::respbody::ProxyBody;
use crate::runtime::Vhost;

/// What the access log wants to know about the upstream side.
#[derive(Default)]
pub struct Upstream {
    /// The endpoint of the last attempt.
    pub endpoint: Option<Arc<Endpoint>>,
    /// Seconds from sending the request to the end of FPM's response head.
    pub header_secs: Option<f64>,
    /// Per-request metrics are recorded (false without an admin listener: nobody can scrape).
    pub record: bool,
}

impl ParamSink for ParamsWriter<'_> {
    // Inlined at each call site, where the name is a literal: its length and copy are
    // constants there.
    #[inline(always)]
    fn param(&mut self, name: &[u8], value: &[u8]) {
        self.add(name, value);
    }
    #[inline]
    fn header(&mut self, name: &[u8], value: &[u8]) {
        self.add_header(name, value);
    }
    #[inline]
    fn param_joined(&mut self, name: &[u8], value: &[u8], more: &[u8]) {
        self.add_joined(name, value, more);
    }
}

/// Runs the request on the pool's endpoints: pick, connect (or reuse), send, read the head,
/// retrying by the rule above. Records which endpoint answered, and when, in `seen`.
#[allow(clippy::too_many_arguments)]
pub async fn exchange(
    metrics: &Metrics,
    pool: &Arc<Pool>,
    method: &Method,
    wire: Bytes,
    request_body: &RequestBody,
    key: Option<u64>,
    rid: &Arc<str>,
    mut admit: Admit,
    max_header: usize,
    seen: &mut Upstream,
) -> Result<Response<ProxyBody>, ProxyError> {
    let id: &str = rid;
    // Queued before a reload rebuilt the pool, the request is sent to the new endpoints.
    let newest;
    let pool = match admit.pool() {
        Some(p) if !Arc::ptr_eq(p, pool) => {
            newest = Arc::clone(p);
            &newest
        }
        _ => pool,
    };
    let cfg = &pool.config;
    let idempotent = !matches!(method.as_str(), "POST" | "PATCH" | "LOCK");
    let mut tried: Vec<usize> = Vec::new();
    let mut retries_left = cfg.retries;
    // Stale kept-alive connections are retried for free: FPM recycled the worker and the
    // script never ran, so this is not a failure of the endpoint.
    let mut stale_left = cfg.keepalive.max_idle + 1;
    let slot_deadline = Instant::now() + cfg.queue.timeout;
    loop {
        let (idx, slot) = match pool.select(&tried, key) {
            Some(s) => s,
            None => {
                // Admitted but every endpoint is full: admission counts places, not slots,
                // so this is only possible for a moment (a reload that lowered an
                // endpoint's `max_conns` under load, or one that raced a request's retry).
                let available = pool.endpoints.iter().any(|e| e.is_available());
                if available && Instant::now() < slot_deadline {
                    tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                    continue;
                }
                // Waited as long as the queue would have: say so, rather than "no healthy
                // endpoint" while healthy ones are merely busy.
                return Err(if available {
                    ProxyError::QueueTimeout
                } else {
                    ProxyError::NoHealthy
                });
            }
        };
        admit.attach(idx);
        let ep = Arc::clone(slot.endpoint());
        seen.endpoint = Some(Arc::clone(&ep));
        // A POST is never sent twice, so its kept connection is checked before, not after.
        let conn = match ep.connect(slot, !idempotent).await {
            Ok(c) => c,
            Err((slot, e)) => {
                drop(slot);
                // Passive health: a connect failure counts against the endpoint.
                pool.passive_failure(&ep);
                metrics
                    .upstream_errors
                    .with_label_values(&[pool.name(), &ep.label, "connect"])
                    .inc();
                tracing::warn!(request_id = id, pool = pool.name(), endpoint = %ep.label, "connect failed: {e}");
                if retries_left > 0 {
                    retries_left -= 1;
                    tried.push(idx);
                    pool.metrics.retries.inc();
                    continue;
                }
                return Err(ProxyError::Connect {
                    endpoint: ep.label.clone(),
                    source: e,
                });
            }
        };
        let body = match request_body.reopen_file() {
            Some(Ok(f)) => Source::File(f, request_body.len()),
            Some(Err(e)) => return Err(ProxyError::BodySpool(e)),
            None => sent_apart(request_body).map_or(Source::Nothing, Source::Memory),
        };
        let sent_at = Instant::now();
        let log = LogCtx {
            request_id: id,
            endpoint: &ep.label,
        };
        // From the first byte written FPM may be running the script: a client that goes
        // away from here on leaves the place held until the script ends.
        let mut running = Running::new(conn, admit, cfg.timeouts.read, rid);
        let sent = client::send(
            running.conn(),
            Outgoing {
                wire: wire.clone(),
                body,
            },
            cfg.timeouts.read,
            cfg.timeouts.send,
            max_header,
            log,
        )
        .await;
        let (conn, place) = running.finish();
        admit = place;
        match sent {
            Ok(Answer {
                head,
                rest,
                reusable,
                tail,
            }) => {
                let head_at = Instant::now();
                let header_secs = head_at.saturating_duration_since(sent_at).as_secs_f64();
                if seen.record {
                    ep.metrics.header_duration.observe(header_secs);
                }
                seen.header_secs = Some(header_secs);
                let code = head.status;
                ep.metrics.requests.inc(code);
                if code.is_informational() {
                    // Passive health: a protocol error counts against the endpoint.
                    pool.passive_failure(&ep);
                    return Err(ProxyError::UpstreamProtocol(format!(
                        "FPM sent final status {code}"
                    )));
                }
                // Passive health: a complete response head ends a run of failures.
                pool.passive_success(&ep);
                let mut body = FcgiBody::new(
                    conn,
                    rest,
                    reusable,
                    cfg.timeouts.read,
                    head_at,
                    Arc::clone(rid),
                    Box::new(admit),
                );
                let declared: Option<u64> = head
                    .headers
                    .get(http::header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                // HEAD: PHP sends the header without the body.
                if method != Method::HEAD {
                    body.set_declared_length(declared);
                }
                body.set_stdin_tail(tail);
                let whole = if method == Method::HEAD {
                    None
                } else {
                    body.take_complete()
                };
                let no_body = code == StatusCode::NO_CONTENT || code == StatusCode::NOT_MODIFIED;
                let body = match whole {
                    // Whatever the script printed: over HTTP/2 a DATA frame would fail it.
                    _ if no_body => {
                        drop(body);
                        ProxyBody::Empty
                    }
                    Some(all) => {
                        // Spent: dropping it frees the pool place now.
                        drop(body);
                        let at = LogCtx {
                            request_id: id,
                            endpoint: &ep.label,
                        };
                        ProxyBody::full(fit_declared(all, declared, code, at, pool.name())?)
                    }
                    None => ProxyBody::Fcgi(Box::new(body)),
                };
                let mut resp = Response::new(body);
                *resp.status_mut() = code;
                *resp.headers_mut() = head.headers;
                if method == Method::HEAD {
                    // PHP sends no body for HEAD; read to END_REQUEST so the connection is reused.
                    return Ok(drain_head(resp).await);
                }
                return Ok(resp);
            }
            Err(f) => {
                let reused = conn.reused;
                drop(conn);
                let before_response = !f.any_byte && f.closed;
                // Only where the script cannot have run twice: a POST could have been read by
                // a worker that then died (killed, crashed) before its first byte. Not an
                // error of the endpoint: FPM recycling workers (`pm.max_requests`) does this.
                if before_response && reused && idempotent && stale_left > 0 {
                    stale_left -= 1;
                    tracing::debug!(request_id = id, endpoint = %ep.label, "kept connection was stale; retrying");
                    continue;
                }
                metrics
                    .upstream_errors
                    .with_label_values(&[pool.name(), &ep.label, f.error.cause()])
                    .inc();
                // Passive health: resets before any response byte, protocol errors and read
                // timeouts count against the endpoint (a hung FPM answers nothing, and its
                // pings time out as a saturated one's do, which counts as busy). The pool's
                // last available endpoint is never ejected (see `passive_failure`).
                if matches!(
                    f.error,
                    ProxyError::ReadTimeout | ProxyError::UpstreamProtocol(_)
                ) || (before_response && matches!(f.error, ProxyError::UpstreamReset(_)))
                {
                    pool.passive_failure(&ep);
                }
                if before_response && idempotent && retries_left > 0 {
                    retries_left -= 1;
                    tried.push(idx);
                    pool.metrics.retries.inc();
                    tracing::warn!(request_id = id, endpoint = %ep.label, "FPM closed before answering; retrying: {}", f.error);
                    continue;
                }
                return Err(f.error);
            }
        }
    }
}

/// Encodes BEGIN_REQUEST, PARAMS and, for in-memory bodies, STDIN with its terminator, into
/// one buffer written with one syscall on the common path.
pub fn encode_request(
    facts: &RequestFacts<'_>,
    vhost: &Vhost,
    pool: &Pool,
    script: (&str, &str, &str),
    body: &RequestBody,
) -> Bytes {
    let apart = sent_apart(body).is_some();
    let body_len = match body {
        RequestBody::Memory(b) if !apart => {
            b.len() + (b.len() / codec::MAX_CONTENT_LEN + 1) * codec::HEADER_LEN
        }
        _ => 0,
    };
    let mut wire = BytesMut::with_capacity(2048 + body_len);
    codec::put_begin_request(&mut wire, REQUEST_ID, pool.config.keepalive.max_idle > 0);
    let mut params = ParamsWriter::new(&mut wire, REQUEST_ID);
    let vf = VhostFacts {
        first_host: &vhost.first_host,
        root: &vhost.root,
        extra_params: &pool.config.params,
    };
    mapping::write_params(facts, &vf, script, &mut params);
    params.finish();
    match body {
        // Large ones follow the wire buffer from their own (see `sent_apart`).
        RequestBody::Memory(_) if apart => {}
        RequestBody::Memory(b) => {
            codec::put_stdin(&mut wire, REQUEST_ID, b);
            codec::put_stdin_end(&mut wire, REQUEST_ID);
        }
        RequestBody::Empty => codec::put_stdin_end(&mut wire, REQUEST_ID),
        // The file's records and the terminator follow the wire buffer.
        RequestBody::File { .. } => {}
    }
    wire.freeze()
}

/// In-memory bodies above this are written to FPM from their own buffer instead of being
/// copied into the request's wire buffer; smaller ones are cheaper to copy than to write
/// apart.
const SEND_APART_OVER: usize = 16 * 1024;

/// The in-memory body that is written after the wire buffer rather than inside it.
fn sent_apart(body: &RequestBody) -> Option<Bytes> {
    match body {
        RequestBody::Memory(b) if b.len() > SEND_APART_OVER => Some(b.clone()),
        _ => None,
    }
}

/// A whole body against the script's `Content-Length`, before anything is sent: the header
/// frames the response on the wire, so a body longer than declared is cut to the declared
/// length (what a client reading the header takes anyway; the rest would otherwise be read
/// as the start of the next response on the connection), and a shorter one is a truncated
/// response, answered 502 rather than sent as a complete-looking one. 204 and 304 carry no
/// body whatever the header says.
fn fit_declared(
    mut all: Bytes,
    declared: Option<u64>,
    code: StatusCode,
    at: LogCtx<'_>,
    pool: &str,
) -> Result<Bytes, ProxyError> {
    let Some(declared) = declared else {
        return Ok(all);
    };
    if code == StatusCode::NO_CONTENT || code == StatusCode::NOT_MODIFIED {
        return Ok(all);
    }
    let sent = all.len() as u64;
    if sent > declared {
        tracing::warn!(
            request_id = at.request_id,
            pool = %pool,
            endpoint = %at.endpoint,
            "the script declared Content-Length {declared} but sent {sent} bytes: sending the first {declared}"
        );
        // declared < sent ≤ usize::MAX.
        all.truncate(declared as usize);
    } else if sent < declared {
        return Err(ProxyError::UpstreamProtocol(format!(
            "the script declared Content-Length {declared} but sent {sent} bytes"
        )));
    }
    Ok(all)
}

async fn drain_head(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    use http_body_util::BodyExt;
    let (parts, mut body) = resp.into_parts();
    // Bounded: a misbehaving script's output for HEAD is discarded after 1 MiB.
    let mut seen = 0usize;
    while let Some(Ok(frame)) = body.frame().await {
        if let Some(d) = frame.data_ref() {
            seen += d.len();
            if seen > 1 << 20 {
                break;
            }
        }
    }
    Response::from_parts(parts, ProxyBody::Empty)
}

pub fn cookie_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
    for h in headers.get_all(header::COOKIE) {
        for part in h.as_bytes().split(|b| *b == b';') {
            let part = part.trim_ascii();
            if let Some(rest) = part.strip_prefix(name.as_bytes()) {
                if let Some(v) = rest.strip_prefix(b"=") {
                    return Some(v);
                }
            }
        }
    }
    None
}
