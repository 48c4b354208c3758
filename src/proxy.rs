//! One client request: snapshot the runtime, work out who the client is, route, map to a
//! script, buffer the body, wait for a place in the pool, hand over to [`crate::upstream`],
//! and answer. Every failure becomes a [`ProxyError`] with a status, a log line and a
//! metric; every response ends in a [`Completion`] (duration histogram, access log).

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderName, HeaderValue, Method, Request, Response, StatusCode};
use tokio::time::Instant;

use crate::access::{AccessRecord, Completion};
use crate::body::{self, BodyLimits, BodyMemory};
use crate::config::AccessLogFormat;
use crate::error::ProxyError;
use crate::mapping::{self, AddrText, LocalFile, RequestFacts, Resolved};
use crate::metrics::Metrics;
use crate::pool::balance::hash_bytes;
use crate::real_ip::{forwarded_client, is_trusted};
use crate::respbody::{ProxyBody, ResponseBody};
use crate::runtime::{Runtime, Shared};
use crate::static_files;
use crate::upstream::{self, Upstream};

/// `SERVER_SOFTWARE`.
const SERVER_SOFTWARE: &str = concat!("fpmgate/", env!("CARGO_PKG_VERSION"));

/// The request id header: kept from a trusted proxy, else made here; PHP sees it as
/// `HTTP_X_REQUEST_ID` and the client gets it back.
const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// What the listener knows about the client connection.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// Client address (from the PROXY protocol header when the listener uses it).
    pub remote: SocketAddr,
    /// Our address the client connected to.
    pub local: SocketAddr,
    /// TLS protocol name (`TLSv1.3`) when the connection is TLS.
    pub tls: Option<&'static str>,
    /// `remote` and `local` as the FastCGI params spell them.
    pub addr_text: AddrText,
}

impl ConnInfo {
    /// A connection's facts, its addresses formatted once.
    pub fn new(remote: SocketAddr, local: SocketAddr, tls: Option<&'static str>) -> ConnInfo {
        ConnInfo {
            remote,
            local,
            tls,
            addr_text: AddrText::new(remote, local),
        }
    }
}

/// The request handler shared by every connection.
pub struct Proxy {
    /// The live runtime.
    pub shared: Shared,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// Request bodies held in memory, by every connection together.
    pub body_memory: Arc<BodyMemory>,
    /// Per-request metrics are recorded: there is an admin listener to scrape them. Fixed
    /// at start, as the listener is (a reload does not add or remove it).
    record: bool,
    next_id: AtomicU64,
}

/// What one request learns on its way, for metrics and the access log.
struct Trace<'r> {
    vhost: &'r str,
    pool: &'r str,
    /// `(vhost, pool)` indexes once routed.
    route: Option<(usize, usize)>,
    upstream: Upstream,
}

impl Proxy {
    /// A handler over a shared runtime.
    pub fn new(shared: Shared, metrics: Arc<Metrics>) -> Proxy {
        // Request ids start from a time-derived value so ids from restarts do not repeat.
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let body_memory = Arc::new(metrics.body_memory());
        let record = shared.load().config.admin.is_some();
        Proxy {
            shared,
            metrics,
            body_memory,
            record,
            next_id: AtomicU64::new(seed << 12),
        }
    }

    /// Accounts for a request head that hyper's HTTP/1 parser refused and answered itself
    /// (431 for a head over `limits.max_header_bytes` or with more than 100 fields, 400 for
    /// one that does not parse), which never reaches [`Proxy::handle`]: counted under
    /// vhost and pool `-`, as other requests refused before routing are, and logged.
    pub fn refused_head(&self, conn: &ConnInfo, too_large: bool) {
        let (status, cause) = if too_large {
            (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "header_too_large",
            )
        } else {
            (StatusCode::BAD_REQUEST, "bad_request")
        };
        if self.record {
            self.metrics
                .http_requests
                .with_label_values(&["-", "-", status.as_str()])
                .inc();
        }
        let rt = self.shared.load();
        if rt.config.access_log == AccessLogFormat::Off {
            return;
        }
        let hex = hex_id(self.next_id.fetch_add(1, Ordering::Relaxed));
        let record = AccessRecord {
            format: rt.config.access_log,
            request_id: Arc::from(std::str::from_utf8(&hex).unwrap_or("0")),
            client: conn.remote.ip(),
            // Nothing of the request line is known for sure: `-`, as nginx logs it.
            method: Method::from_bytes(b"-").unwrap_or(Method::GET),
            uri: "-".to_string(),
            protocol: "HTTP/1.1",
            host: String::new(),
            referer: None,
            user_agent: None,
            vhost: "-".to_string(),
            pool: "-".to_string(),
            endpoint: None,
            status: status.as_u16(),
            upstream_secs: None,
            cause: Some(cause),
        };
        drop(Completion::new(Instant::now(), None, Some(record)));
    }

    /// Serves one request. Never fails at the hyper level: errors become responses.
    pub async fn handle<B>(
        self: Arc<Self>,
        mut req: Request<B>,
        conn: Arc<ConnInfo>,
    ) -> Result<Response<ResponseBody>, Infallible>
    where
        B: http_body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let started = Instant::now();
        let rt = self.shared.load_full();
        let trusted = is_trusted(&rt.config.trusted_proxies, conn.remote.ip());
        let client = if trusted {
            let (nets, header) = (&rt.config.trusted_proxies, rt.config.real_ip_header);
            forwarded_client(req.headers(), nets, header).unwrap_or(conn.remote.ip())
        } else {
            conn.remote.ip()
        };
        let rid = request_id(
            &mut req,
            trusted,
            self.next_id.fetch_add(1, Ordering::Relaxed),
        );
        let method = req.method().clone();
        let access = (rt.config.access_log != AccessLogFormat::Off)
            .then(|| access_record(&req, rt.config.access_log, &rid, client));
        let mut trace = Trace {
            vhost: "-",
            pool: "-",
            route: None,
            upstream: Upstream::default(),
        };
        let result = self.serve(&rt, req, &conn, client, &rid, &mut trace).await;
        let Trace {
            vhost,
            pool,
            route,
            upstream,
        } = trace;
        let route_metrics = route.map(|(v, p)| Arc::clone(&rt.route_metrics[v][p]));
        let mut cause = None;
        let mut resp = match result {
            Ok(resp) => resp,
            Err(err) => {
                let status = err.status();
                cause = Some(err.cause());
                if err.is_gateway() {
                    self.metrics
                        .gateway_errors
                        .with_label_values(&[vhost, pool, status.as_str(), err.cause()])
                        .inc();
                    tracing::warn!(request_id = &*rid, vhost, pool, %method, status = status.as_u16(), cause = err.cause(), "{err}");
                } else {
                    tracing::debug!(request_id = &*rid, vhost, pool, %method, status = status.as_u16(), cause = err.cause(), "{err}");
                }
                let retry_after = rt
                    .pools
                    .iter()
                    .find(|p| p.name() == pool)
                    .map(|p| p.config.retry_after);
                error_response(&err, retry_after)
            }
        };
        let status = resp.status();
        // Without an admin listener nobody can scrape: skip the per-request series (the
        // gauges that guards move, and the error counters, stay).
        let record = self.record;
        match &route_metrics {
            _ if !record => {}
            Some(m) => m.requests.inc(status),
            None => self
                .metrics
                .http_requests
                .with_label_values(&[vhost, pool, status.as_str()])
                .inc(),
        }
        if let Ok(mut v) = HeaderValue::from_str(&rid) {
            // Never the same twice: over HTTP/2 it is sent as a literal that HPACK does not
            // index, instead of evicting reusable entries from the client's table.
            v.set_sensitive(true);
            resp.headers_mut().insert(REQUEST_ID, v);
        }
        let access = access.map(|mut r| {
            r.vhost = vhost.to_string();
            r.pool = pool.to_string();
            r.endpoint = upstream.endpoint.as_ref().map(|e| e.label.clone());
            r.upstream_secs = upstream.header_secs;
            r.status = status.as_u16();
            r.cause = cause;
            r
        });
        let histogram = match &route_metrics {
            _ if !record => None,
            Some(m) => Some(m.duration()),
            None => Some(self.metrics.http_duration.with_label_values(&[vhost, pool])),
        };
        let done = Completion::new(started, histogram, access);
        Ok(resp.map(|b| ResponseBody::new(b, Some(Box::new(done)))))
    }

    async fn serve<'r, B>(
        &self,
        rt: &'r Runtime,
        req: Request<B>,
        conn: &ConnInfo,
        client: IpAddr,
        rid: &Arc<str>,
        trace: &mut Trace<'r>,
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
        let framing = check_framing(&parts.headers)?;
        let raw_path = parts.uri.path();
        let query = parts.uri.query().unwrap_or("");
        let host = match parts.uri.authority() {
            Some(a) => a.as_str(),
            None => match framing.host {
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
        trace.vhost = vhost.label.as_str();
        trace.pool = pool.name();
        trace.route = Some((vi, pi));
        trace.upstream.record = self.record;

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
                    let (method, headers) = (&parts.method, &parts.headers);
                    let (follow, deny) = (vhost.follow_symlinks, &vhost.static_deny);
                    return static_files::serve(dir, &path, method, headers, follow, deny).await;
                }
                Resolved::NotFound => return Err(ProxyError::NotFound),
            };

        // The whole body, before any FPM worker is involved.
        let declared = match framing.content_length {
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
            body_memory: limits.body_memory,
            body_timeout: limits.body_timeout,
        };
        let request_body = body::read_body(body, declared, body_limits, &self.body_memory).await?;
        let has_framing = declared.is_some()
            || framing.chunked
            || !request_body.is_empty()
            || matches!(parts.method, Method::POST | Method::PUT | Method::PATCH);
        let content_length = has_framing.then(|| request_body.len());

        let protocol = protocol_name(parts.version);
        let facts = RequestFacts {
            method: parts.method.as_str(),
            request_uri: pq,
            query,
            headers: &parts.headers,
            host,
            protocol,
            https: conn.tls.is_some(),
            tls_protocol: conn.tls,
            remote: SocketAddr::new(client, conn.remote.port()),
            local: conn.local,
            addr_text: (client == conn.remote.ip()).then_some(&conn.addr_text),
            content_length,
            server_software: SERVER_SOFTWARE,
        };
        let wire = upstream::encode_request(
            &facts,
            vhost,
            pool,
            (&script_name, &path_info, &document_uri),
            &request_body,
        );

        let key = if pool.hashes_client_ip() {
            Some(match client {
                IpAddr::V4(a) => hash_bytes(&a.octets()),
                IpAddr::V6(a) => hash_bytes(&a.octets()),
            })
        } else {
            pool.hash_cookie()
                .and_then(|name| upstream::cookie_value(&parts.headers, name))
                .map(hash_bytes)
        };

        let admit = pool.admit().await?;
        let max_header = limits.max_response_header;
        upstream::exchange(
            &self.metrics,
            pool,
            &parts.method,
            wire,
            &request_body,
            key,
            rid,
            admit,
            max_header,
            &mut trace.upstream,
        )
        .await
    }
}

fn protocol_name(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_2 => "HTTP/2.0",
        _ => "HTTP/1.1",
    }
}

/// The request id: a well-formed one from a trusted proxy is kept, else a new one. Either
/// way it is set on the request so PHP sees it.
fn request_id<B>(req: &mut Request<B>, trusted: bool, n: u64) -> Arc<str> {
    if trusted {
        if let Some(v) = req.headers().get(&REQUEST_ID).and_then(|v| v.to_str().ok()) {
            if !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
            {
                return Arc::from(v);
            }
        }
    }
    let hex = hex_id(n);
    if let Ok(v) = HeaderValue::from_bytes(&hex) {
        req.headers_mut().insert(REQUEST_ID, v);
    }
    // Hex digits are ASCII.
    Arc::from(std::str::from_utf8(&hex).unwrap_or("0"))
}

/// Request id `n` as 16 lowercase hex digits.
fn hex_id(n: u64) -> [u8; 16] {
    let mut hex = [0u8; 16];
    for (i, b) in hex.iter_mut().enumerate() {
        *b = b"0123456789abcdef"[((n >> (60 - 4 * i)) & 0xf) as usize];
    }
    hex
}

fn access_record<B>(
    req: &Request<B>,
    format: AccessLogFormat,
    rid: &Arc<str>,
    client: IpAddr,
) -> AccessRecord {
    let h = req.headers();
    let text = |name: header::HeaderName| {
        h.get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    AccessRecord {
        format,
        request_id: Arc::clone(rid),
        client,
        method: req.method().clone(),
        uri: req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .to_string(),
        protocol: protocol_name(req.version()),
        host: req
            .uri()
            .authority()
            .map(|a| a.to_string())
            .or_else(|| text(header::HOST))
            .unwrap_or_default(),
        referer: text(header::REFERER),
        user_agent: text(header::USER_AGENT),
        vhost: String::new(),
        pool: String::new(),
        endpoint: None,
        status: 0,
        upstream_secs: None,
        cause: None,
    }
}

/// Request smuggling guards on top of hyper's parser: a message whose length two parties
/// could read differently is refused (and the connection closed), as nginx does.
/// The headers that frame a request, found in one pass over them.
struct Framing<'a> {
    host: Option<&'a HeaderValue>,
    content_length: Option<&'a HeaderValue>,
    chunked: bool,
}

/// Rejects ambiguous framing (request smuggling): more than one Content-Length or Host,
/// Content-Length with Transfer-Encoding, any Transfer-Encoding but a single `chunked`.
fn check_framing(headers: &http::HeaderMap) -> Result<Framing<'_>, ProxyError> {
    let mut f = Framing {
        host: None,
        content_length: None,
        chunked: false,
    };
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            if f.content_length.replace(value).is_some() {
                return Err(ProxyError::BadRequest("duplicate Content-Length"));
            }
        } else if name == header::TRANSFER_ENCODING {
            if f.chunked
                || !value
                    .as_bytes()
                    .trim_ascii()
                    .eq_ignore_ascii_case(b"chunked")
            {
                return Err(ProxyError::BadRequest("unsupported Transfer-Encoding"));
            }
            f.chunked = true;
        } else if name == header::HOST && f.host.replace(value).is_some() {
            return Err(ProxyError::BadRequest("duplicate Host header"));
        }
    }
    if f.chunked && f.content_length.is_some() {
        return Err(ProxyError::BadRequest(
            "both Content-Length and Transfer-Encoding",
        ));
    }
    Ok(f)
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
