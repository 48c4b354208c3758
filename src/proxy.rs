//! One client request: snapshot the runtime, route, map to a script, buffer the body, wait
//! for a place in the pool, run the FastCGI exchange (retrying where FPM cannot have run the
//! script), and answer. Every failure becomes a [`ProxyError`] with a status, a log line and
//! a metric.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use tokio::time::Instant;

use crate::body::{self, BodyLimits, RequestBody};
use crate::error::ProxyError;
use crate::fastcgi::client::{self, FcgiBody, LogCtx, Outgoing, REQUEST_ID};
use crate::fastcgi::codec::{self, ParamsWriter};
use crate::mapping::{self, LocalFile, ParamSink, RequestFacts, Resolved, VhostFacts};
use crate::metrics::Metrics;
use crate::pool::balance::hash_bytes;
use crate::pool::{Admit, Pool};
use crate::respbody::ProxyBody;
use crate::runtime::{Runtime, Shared, Vhost};
use crate::static_files;

/// `SERVER_SOFTWARE`.
const SERVER_SOFTWARE: &str = concat!("fpmgate/", env!("CARGO_PKG_VERSION"));

/// What the listener knows about the client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Client address.
    pub remote: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
    /// TLS protocol name (`TLSv1.3`) when the connection is TLS.
    pub tls: Option<&'static str>,
}

/// The request handler shared by every connection.
pub struct Proxy {
    /// The live runtime.
    pub shared: Shared,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    next_id: AtomicU64,
}

impl ParamSink for ParamsWriter<'_> {
    fn param(&mut self, name: &[u8], value: &[u8]) {
        self.add(name, value);
    }
    fn header(&mut self, name: &[u8], value: &[u8]) {
        self.add_header(name, value);
    }
}

/// Records the request's duration when its response ends (or is dropped).
struct Finish {
    started: Instant,
    histogram: prometheus::Histogram,
}

impl Drop for Finish {
    fn drop(&mut self) {
        self.histogram.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Proxy {
    /// A handler over a shared runtime.
    pub fn new(shared: Shared, metrics: Arc<Metrics>) -> Proxy {
        // Request ids start from a time-derived value so ids from restarts do not repeat.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Proxy {
            shared,
            metrics,
            next_id: AtomicU64::new(seed << 8),
        }
    }

    /// Serves one request. Never fails at the hyper level: errors become responses.
    pub async fn handle<B>(
        self: Arc<Self>,
        req: Request<B>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<ProxyBody>, Infallible>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let started = Instant::now();
        let rt = self.shared.load_full();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let method = req.method().clone();
        let mut labels: (&str, &str) = ("-", "-");
        let result = self.serve(&rt, req, &conn, id, started, &mut labels).await;
        let (vhost, pool) = labels;
        let resp = match result {
            Ok(resp) => resp,
            Err(err) => {
                let status = err.status();
                if err.is_gateway() {
                    self.metrics
                        .gateway_errors
                        .with_label_values(&[vhost, pool, status.as_str(), err.cause()])
                        .inc();
                    tracing::warn!(request_id = id, vhost, pool, %method, status = status.as_u16(), cause = err.cause(), "{err}");
                } else {
                    tracing::debug!(request_id = id, vhost, pool, %method, status = status.as_u16(), cause = err.cause(), "{err}");
                }
                self.metrics
                    .http_duration
                    .with_label_values(&[vhost, pool])
                    .observe(started.elapsed().as_secs_f64());
                error_response(
                    &err,
                    rt.pools
                        .iter()
                        .find(|p| p.name() == pool)
                        .map(|p| p.config.retry_after),
                )
            }
        };
        self.metrics
            .http_requests
            .with_label_values(&[vhost, pool, resp.status().as_str()])
            .inc();
        Ok(resp)
    }

    async fn serve<'r, B>(
        &self,
        rt: &'r Runtime,
        req: Request<B>,
        conn: &ConnInfo,
        id: u64,
        started: Instant,
        labels: &mut (&'r str, &'r str),
    ) -> Result<Response<ProxyBody>, ProxyError>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let limits = rt.limits();
        let (parts, body) = req.into_parts();
        let pq = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        if pq.len() > limits.max_uri {
            return Err(ProxyError::UriTooLong);
        }
        check_framing(&parts.headers)?;
        let raw_path = parts.uri.path();
        let query = parts.uri.query().unwrap_or("");
        let host = match parts.uri.authority() {
            Some(a) => a.as_str(),
            None => match parts.headers.get(header::HOST) {
                Some(h) => h
                    .to_str()
                    .map_err(|_| ProxyError::BadRequest("invalid Host header"))?,
                None if parts.version == http::Version::HTTP_10 => "",
                None => return Err(ProxyError::BadRequest("missing Host header")),
            },
        };
        if !valid_host(host) {
            return Err(ProxyError::BadRequest("invalid Host header"));
        }
        let path = mapping::normalize_path(raw_path)
            .map_err(|_| ProxyError::BadRequest("invalid request path"))?;
        let (vi, pi) = rt.router.route(host, &path).ok_or(ProxyError::NotFound)?;
        let vhost = &rt.vhosts[vi];
        let pool = &rt.pools[pi];
        *labels = (vhost.label.as_str(), pool.name());

        let local_check = vhost
            .static_dir
            .as_ref()
            .map(|dir| move |p: &str| static_files::probe(dir, p));
        let local_ref: Option<&dyn Fn(&str) -> LocalFile> = local_check
            .as_ref()
            .map(|f| f as &dyn Fn(&str) -> LocalFile);
        let (script_name, path_info, document_uri) =
            match mapping::resolve(&path, vhost.index.as_deref(), local_ref) {
                Resolved::Script {
                    script_name,
                    path_info,
                    document_uri,
                } => (script_name, path_info, document_uri),
                Resolved::Static => {
                    let dir = vhost.static_dir.as_ref().ok_or(ProxyError::NotFound)?;
                    let finish = Finish {
                        started,
                        histogram: self
                            .metrics
                            .http_duration
                            .with_label_values(&[vhost.label.as_str(), pool.name()]),
                    };
                    return static_files::serve(
                        dir,
                        &path,
                        &parts.method,
                        &parts.headers,
                        Box::new(finish),
                    )
                    .await;
                }
                Resolved::NotFound => return Err(ProxyError::NotFound),
            };

        // The whole body, before any FPM worker is involved.
        let declared = match parts.headers.get(header::CONTENT_LENGTH) {
            Some(v) => Some(
                v.to_str()
                    .ok()
                    .and_then(|s| s.trim().parse::<u64>().ok())
                    .ok_or(ProxyError::BadRequest("invalid Content-Length"))?,
            ),
            None => None,
        };
        let body_limits = BodyLimits {
            max_body: limits.max_body,
            body_buffer: limits.body_buffer,
            body_timeout: limits.body_timeout,
        };
        let request_body = body::read_body(body, declared, body_limits).await?;
        let has_framing = declared.is_some()
            || parts.headers.contains_key(header::TRANSFER_ENCODING)
            || !request_body.is_empty()
            || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
        let content_length = has_framing.then(|| request_body.len());

        let protocol = match parts.version {
            http::Version::HTTP_10 => "HTTP/1.0",
            http::Version::HTTP_2 => "HTTP/2.0",
            _ => "HTTP/1.1",
        };
        let facts = RequestFacts {
            method: parts.method.as_str(),
            request_uri: pq,
            query,
            headers: &parts.headers,
            host,
            protocol,
            https: conn.tls.is_some(),
            tls_protocol: conn.tls,
            remote: conn.remote,
            local: conn.local,
            content_length,
            server_software: SERVER_SOFTWARE,
        };
        let wire = encode_request(
            &facts,
            vhost,
            pool,
            (&script_name, &path_info, &document_uri),
            &request_body,
        );

        let key = if pool.hashes_client_ip() {
            Some(match conn.remote.ip() {
                std::net::IpAddr::V4(a) => hash_bytes(&a.octets()),
                std::net::IpAddr::V6(a) => hash_bytes(&a.octets()),
            })
        } else {
            pool.hash_cookie()
                .and_then(|name| cookie_value(&parts.headers, name))
                .map(hash_bytes)
        };

        let admit = pool.admit().await?;
        let finish = Finish {
            started,
            histogram: self
                .metrics
                .http_duration
                .with_label_values(&[vhost.label.as_str(), pool.name()]),
        };
        self.exchange(
            pool,
            &parts.method,
            wire,
            &request_body,
            key,
            id,
            admit,
            finish,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn exchange(
        &self,
        pool: &Arc<Pool>,
        method: &Method,
        wire: Bytes,
        request_body: &RequestBody,
        key: Option<u64>,
        id: u64,
        admit: Admit,
        finish: Finish,
    ) -> Result<Response<ProxyBody>, ProxyError> {
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
                    // Admitted but every endpoint is full: possible for a moment right after a
                    // reload rebuilt the pool while old requests still hold their slots.
                    if pool.endpoints.iter().any(|e| e.is_available())
                        && Instant::now() < slot_deadline
                    {
                        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
                        continue;
                    }
                    return Err(ProxyError::NoHealthy);
                }
            };
            let ep = Arc::clone(slot.endpoint());
            let mut conn = match ep.connect(slot).await {
                Ok(c) => c,
                Err((slot, e)) => {
                    drop(slot);
                    // Passive health: a connect failure counts against the endpoint.
                    pool.passive_failure(&ep);
                    self.metrics
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
            let file = match request_body.reopen_file() {
                Some(Ok(f)) => Some((f, request_body.len())),
                Some(Err(e)) => return Err(ProxyError::BodySpool(e)),
                None => None,
            };
            let sent = Instant::now();
            let log = LogCtx {
                request_id: id,
                endpoint: &ep.label,
            };
            match client::send(
                &mut conn,
                Outgoing { wire: &wire, file },
                cfg.timeouts.read,
                cfg.timeouts.send,
                max_response_header(&self.shared),
                log,
            )
            .await
            {
                Ok((head, rest, reusable)) => {
                    ep.metrics
                        .header_duration
                        .observe(sent.elapsed().as_secs_f64());
                    let code = head.status;
                    self.metrics
                        .upstream_requests
                        .with_label_values(&[pool.name(), &ep.label, code.as_str()])
                        .inc();
                    if code.is_informational() {
                        // Passive health: a protocol error counts against the endpoint.
                        pool.passive_failure(&ep);
                        return Err(ProxyError::UpstreamProtocol(format!(
                            "FPM sent final status {code}"
                        )));
                    }
                    // Passive health: a complete response head ends a run of failures.
                    pool.passive_success(&ep);
                    let body = FcgiBody::new(
                        conn,
                        rest,
                        reusable,
                        cfg.timeouts.read,
                        id,
                        Box::new((admit, finish)),
                    );
                    let mut resp = Response::new(ProxyBody::Fcgi(body));
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
                    self.metrics
                        .upstream_errors
                        .with_label_values(&[pool.name(), &ep.label, f.error.cause()])
                        .inc();
                    let before_response = !f.any_byte && f.closed;
                    if before_response && reused && stale_left > 0 {
                        stale_left -= 1;
                        tracing::debug!(request_id = id, endpoint = %ep.label, "kept connection was stale; retrying");
                        continue;
                    }
                    // Passive health: resets before any response byte, protocol errors and read
                    // timeouts count against the endpoint (a stale kept connection does not).
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
}

fn max_response_header(shared: &Shared) -> usize {
    shared.load().config.limits.max_response_header
}

/// Encodes BEGIN_REQUEST, PARAMS and, for in-memory bodies, STDIN with its terminator, into
/// one buffer written with one syscall on the common path.
fn encode_request(
    facts: &RequestFacts<'_>,
    vhost: &Vhost,
    pool: &Pool,
    script: (&str, &str, &str),
    body: &RequestBody,
) -> Bytes {
    let body_len = match body {
        RequestBody::Memory(b) => {
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

fn cookie_value<'h>(headers: &'h http::HeaderMap, name: &str) -> Option<&'h [u8]> {
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

/// Request smuggling guards on top of hyper's parser: a message whose length two parties
/// could read differently is refused (and the connection closed), as nginx does.
fn check_framing(headers: &http::HeaderMap) -> Result<(), ProxyError> {
    let cl = headers.get_all(header::CONTENT_LENGTH).iter().count();
    let te: Vec<&HeaderValue> = headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    if cl > 1 {
        return Err(ProxyError::BadRequest("duplicate Content-Length"));
    }
    if !te.is_empty() {
        if cl > 0 {
            return Err(ProxyError::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if te.len() > 1
            || !te[0]
                .as_bytes()
                .trim_ascii()
                .eq_ignore_ascii_case(b"chunked")
        {
            return Err(ProxyError::BadRequest("unsupported Transfer-Encoding"));
        }
    }
    if headers.get_all(header::HOST).iter().count() > 1 {
        return Err(ProxyError::BadRequest("duplicate Host header"));
    }
    Ok(())
}

/// Host is `name[:port]` or `[v6][:port]` of visible ASCII without `/`, `\`, `@` or spaces.
fn valid_host(h: &str) -> bool {
    h.len() <= 255
        && h.bytes()
            .all(|b| b.is_ascii_graphic() && !matches!(b, b'/' | b'\\' | b'@' | b'?' | b'#'))
}

/// The short response for an error status, with Retry-After on 503.
pub fn error_response(err: &ProxyError, retry_after: Option<u32>) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Full(Some(Bytes::from_static(
        err.body().as_bytes(),
    ))));
    *resp.status_mut() = err.status();
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    if err.status() == StatusCode::SERVICE_UNAVAILABLE {
        h.insert(
            header::RETRY_AFTER,
            HeaderValue::from(retry_after.unwrap_or(1)),
        );
    }
    if matches!(
        err,
        ProxyError::BodyTooLarge
            | ProxyError::BadRequest(_)
            | ProxyError::BodyTimeout
            | ProxyError::BodyRead(_)
    ) {
        // The rest of the body was not read: the connection cannot carry another request.
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
