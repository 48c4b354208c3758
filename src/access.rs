//! What happens when a response ends: the request-duration histogram is observed and, when
//! enabled, one access-log line is written on the `fpmgate::access` target (stdout), in the
//! combined format users' log tooling already parses, or as JSON.
//!
//! The line is written when the last body byte has gone (or the client went away), so it
//! carries the real byte count and total time, like nginx's access log.

use std::fmt::Write as _;
use std::net::IpAddr;
use std::sync::Arc;

use tokio::time::Instant;

use crate::config::AccessLogFormat;

/// Everything the access log says about one request, gathered along the way.
pub struct AccessRecord {
    /// Log format.
    pub format: AccessLogFormat,
    /// The id PHP saw as `HTTP_X_REQUEST_ID` and the client got back.
    pub request_id: Arc<str>,
    /// The client address (after PROXY protocol and trusted forwarding headers).
    pub client: IpAddr,
    /// Request method.
    pub method: http::Method,
    /// Request target as sent (path and query).
    pub uri: String,
    /// `HTTP/1.1`, `HTTP/2.0`, ...
    pub protocol: &'static str,
    /// Host header or :authority.
    pub host: String,
    /// `Referer`, if any.
    pub referer: Option<String>,
    /// `User-Agent`, if any.
    pub user_agent: Option<String>,
    /// Vhost label (`-` before routing).
    pub vhost: String,
    /// Pool name (`-` before routing).
    pub pool: String,
    /// The endpoint that answered, if any.
    pub endpoint: Option<String>,
    /// Response status.
    pub status: u16,
    /// Time to FPM's response head.
    pub upstream_secs: Option<f64>,
    /// Cause label of an error answer.
    pub cause: Option<&'static str>,
}

/// Runs when the response body ends or is dropped.
pub struct Completion {
    started: Instant,
    histogram: Option<prometheus::Histogram>,
    /// Body bytes sent so far.
    pub bytes: u64,
    record: Option<AccessRecord>,
}

impl Completion {
    /// A completion for a request that started at `started`.
    pub fn new(
        started: Instant,
        histogram: Option<prometheus::Histogram>,
        record: Option<AccessRecord>,
    ) -> Completion {
        Completion {
            started,
            histogram,
            bytes: 0,
            record,
        }
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let secs = self.started.elapsed().as_secs_f64();
        if let Some(h) = &self.histogram {
            h.observe(secs);
        }
        if let Some(r) = &self.record {
            let line = match r.format {
                AccessLogFormat::Combined => combined(r, self.bytes, secs),
                AccessLogFormat::Json => json(r, self.bytes, secs),
                AccessLogFormat::Off => return,
            };
            tracing::info!(target: "fpmgate::access", "{line}");
        }
    }
}

/// Apache/nginx "combined", then fpmgate's fields as `key=value`.
fn combined(r: &AccessRecord, bytes: u64, secs: f64) -> String {
    let mut s = String::with_capacity(256);
    let now = crate::static_files::clf_date(std::time::SystemTime::now());
    let q = |v: &str| v.replace('\\', "\\\\").replace('"', "\\\"");
    let _ = write!(
        s,
        "{} - - [{now}] \"{} {} {}\" {} {bytes} \"{}\" \"{}\" rid={} host=\"{}\" vhost={} pool={} endpoint={} ut={} rt={secs:.3}",
        r.client,
        r.method,
        q(&r.uri),
        r.protocol,
        r.status,
        q(r.referer.as_deref().unwrap_or("-")),
        q(r.user_agent.as_deref().unwrap_or("-")),
        r.request_id,
        q(&r.host),
        r.vhost,
        r.pool,
        r.endpoint.as_deref().unwrap_or("-"),
        r.upstream_secs.map_or("-".to_string(), |u| format!("{u:.3}")),
    );
    if let Some(c) = r.cause {
        let _ = write!(s, " cause={c}");
    }
    s
}

fn json(r: &AccessRecord, bytes: u64, secs: f64) -> String {
    let v = serde_json::json!({
        "time": crate::static_files::rfc3339(std::time::SystemTime::now()),
        "request_id": &*r.request_id,
        "client": r.client.to_string(),
        "method": r.method.as_str(),
        "uri": r.uri,
        "protocol": r.protocol,
        "host": r.host,
        "status": r.status,
        "bytes": bytes,
        "referer": r.referer,
        "user_agent": r.user_agent,
        "vhost": r.vhost,
        "pool": r.pool,
        "endpoint": r.endpoint,
        "upstream_time": r.upstream_secs,
        "total_time": secs,
        "cause": r.cause,
    });
    v.to_string()
}
