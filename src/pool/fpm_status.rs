//! Out-of-band FastCGI GETs to PHP-FPM (the health ping and the status page), and the task
//! that scrapes FPM's status page (`pm.status_path?json`) into the `fpmgate_fpm_*` gauges
//! and onto each [`Endpoint`].
//!
//! Probes never borrow a pooled connection and never take a slot of `max_conns`: each one
//! opens a short connection of its own (so one extra FPM connection per endpoint per
//! interval). A pooled connection could be stale, and waiting for a slot would make a
//! saturated endpoint look dead. FPM answers ping and status before it looks up any script,
//! so SCRIPT_FILENAME only has to be present, not to exist.

use std::io;
use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinSet;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use super::{Endpoint, Pool};
use crate::config::EndpointAddr;
use crate::fastcgi::cgi::HeadParser;
use crate::fastcgi::codec::{self, ParamsWriter, ProtocolStatus, RecordType};
use crate::fastcgi::conn::{self, Target};
use crate::metrics::Metrics;

/// The request id of every probe (FPM does not multiplex).
const PROBE_REQUEST_ID: u16 = 1;
/// Largest CGI head accepted from a probe answer.
const PROBE_HEAD_LIMIT: usize = 8 * 1024;
/// Largest status answer: the pool part of `?json` is a few hundred bytes (no `full`).
pub(crate) const STATUS_LIMIT: usize = 256 * 1024;
/// Scrape interval when the pool has no `health:` section.
const DEFAULT_SCRAPE_INTERVAL: Duration = Duration::from_secs(5);
/// Scrape timeout when the pool has no `health:` section.
const DEFAULT_SCRAPE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The connection could not be opened (refused, unreachable, backlog full).
    #[error("connect failed: {0}")]
    Connect(#[source] io::Error),
    /// No complete answer within the probe timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// FPM closed or reset the connection before END_REQUEST.
    #[error("connection closed early: {0}")]
    Closed(#[source] io::Error),
    /// The answer is not valid FastCGI/CGI, or FPM refused the request.
    #[error("malformed answer: {0}")]
    Protocol(String),
    /// The answer exceeded the probe's size limit.
    #[error("answer larger than {0} bytes")]
    TooLarge(usize),
    /// The status page answered, but not with FPM's JSON.
    #[error("status page is not FPM JSON: {0}")]
    BadStatus(String),
}

impl ProbeError {
    /// A failure that a saturated FPM produces as well as a dead one: the probe waited (in
    /// FPM's kernel backlog behind busy workers), or a unix socket's backlog was full
    /// (EAGAIN at connect). Refusals and resets never qualify: nothing is listening.
    pub fn is_wait(&self) -> bool {
        match self {
            ProbeError::Timeout(_) => true,
            ProbeError::Connect(e) => {
                matches!(
                    e.kind(),
                    io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
                )
            }
            _ => false,
        }
    }
}

/// What FPM answered to a probe.
#[derive(Debug)]
pub struct ProbeAnswer {
    /// The CGI status.
    pub status: StatusCode,
    /// The body.
    pub body: Bytes,
}

/// Where an endpoint's probes go: its own address, or `ip:addr_port` for TCP endpoints when
/// `health.addr_port` names FPM's `pm.status_listen` (a dedicated listener that answers even
/// when every worker of the main pool is busy).
pub fn probe_target(addr: &EndpointAddr, addr_port: Option<u16>) -> Target<'_> {
    match (addr, addr_port) {
        (EndpointAddr::Tcp(a), Some(port)) => Target::Tcp(std::net::SocketAddr::new(a.ip(), port)),
        (EndpointAddr::Tcp(a), None) => Target::Tcp(*a),
        (EndpointAddr::Unix(p), _) => Target::Unix(p),
        // Never reached (live endpoints hold resolved addresses); an empty path fails to
        // connect, which is a failed probe rather than a panic.
        (EndpointAddr::Dns { .. }, _) => Target::Unix(std::path::Path::new("")),
    }
}

/// The records of a GET for `path` with `query`: no keep-conn (FPM closes after answering),
/// empty STDIN.
fn encode_get(path: &str, query: &str) -> BytesMut {
    let mut wire = BytesMut::with_capacity(512);
    codec::put_begin_request(&mut wire, PROBE_REQUEST_ID, false);
    let uri = if query.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{query}")
    };
    let mut params = ParamsWriter::new(&mut wire, PROBE_REQUEST_ID);
    for (name, value) in [
        ("SCRIPT_NAME", path),
        ("SCRIPT_FILENAME", path),
        ("DOCUMENT_URI", path),
        ("REQUEST_URI", uri.as_str()),
        ("REQUEST_METHOD", "GET"),
        ("QUERY_STRING", query),
        ("SERVER_PROTOCOL", "HTTP/1.1"),
        ("GATEWAY_INTERFACE", "CGI/1.1"),
        (
            "SERVER_SOFTWARE",
            concat!("fpmgate/", env!("CARGO_PKG_VERSION")),
        ),
        ("CONTENT_LENGTH", ""),
    ] {
        params.add(name.as_bytes(), value.as_bytes());
    }
    params.finish();
    codec::put_stdin_end(&mut wire, PROBE_REQUEST_ID);
    wire
}

/// One GET over a fresh connection, connect included within `timeout`; STDOUT beyond
/// `limit` bytes is an error.
pub async fn fcgi_get(
    target: Target<'_>,
    path: &str,
    query: &str,
    timeout: Duration,
    limit: usize,
) -> Result<ProbeAnswer, ProbeError> {
    let exchange = async {
        let mut stream = conn::connect(target, timeout)
            .await
            .map_err(ProbeError::Connect)?;
        stream
            .write_all(&encode_get(path, query))
            .await
            .map_err(ProbeError::Closed)?;
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut stdout = BytesMut::new();
        loop {
            while let Some(rec) =
                codec::decode_record(&mut buf).map_err(|e| ProbeError::Protocol(e.to_string()))?
            {
                match rec.kind {
                    RecordType::Stdout => {
                        if stdout.len() + rec.content.len() > limit {
                            return Err(ProbeError::TooLarge(limit));
                        }
                        stdout.extend_from_slice(&rec.content);
                    }
                    RecordType::EndRequest => {
                        let end = codec::parse_end_request(&rec.content)
                            .map_err(|e| ProbeError::Protocol(e.to_string()))?;
                        if end.protocol_status != ProtocolStatus::RequestComplete {
                            return Err(ProbeError::Protocol(format!(
                                "END_REQUEST protocol status {:?}",
                                end.protocol_status
                            )));
                        }
                        return parse_answer(stdout.freeze());
                    }
                    // STDERR (PHP notices) and anything else carry no verdict.
                    _ => {}
                }
            }
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(ProbeError::Closed)?;
            if n == 0 {
                return Err(ProbeError::Closed(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "EOF before END_REQUEST",
                )));
            }
        }
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .unwrap_or(Err(ProbeError::Timeout(timeout)))
}

fn parse_answer(stdout: Bytes) -> Result<ProbeAnswer, ProbeError> {
    let mut parser = HeadParser::new(PROBE_HEAD_LIMIT);
    match parser.push(stdout) {
        Ok(Some((head, body))) => Ok(ProbeAnswer {
            status: head.status,
            body,
        }),
        Ok(None) => Err(ProbeError::Protocol("CGI head never ended".into())),
        Err(e) => Err(ProbeError::Protocol(e.to_string())),
    }
}

/// The pool figures of FPM's status page (`?json`), named as FPM names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct FpmStatus {
    /// `accepted conn`: connections accepted since FPM started.
    pub accepted_conn: u64,
    /// `listen queue`: connections waiting in the kernel backlog right now.
    pub listen_queue: u64,
    /// `max listen queue`.
    pub max_listen_queue: u64,
    /// `idle processes`.
    pub idle_processes: u64,
    /// `active processes` (a status request served by the pool counts itself).
    pub active_processes: u64,
    /// `total processes`.
    pub total_processes: u64,
    /// `max children reached`.
    pub max_children_reached: u64,
    /// `slow requests`.
    pub slow_requests: u64,
}

impl FpmStatus {
    /// Parses the JSON form of FPM's status page.
    pub fn parse(body: &[u8]) -> Result<FpmStatus, ProbeError> {
        let v: serde_json::Value =
            serde_json::from_slice(body).map_err(|e| ProbeError::BadStatus(e.to_string()))?;
        let field = |name: &str| {
            v.get(name)
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| ProbeError::BadStatus(format!("no numeric `{name}`")))
        };
        Ok(FpmStatus {
            accepted_conn: field("accepted conn")?,
            listen_queue: field("listen queue")?,
            max_listen_queue: field("max listen queue")?,
            idle_processes: field("idle processes")?,
            active_processes: field("active processes")?,
            total_processes: field("total processes")?,
            max_children_reached: field("max children reached")?,
            slow_requests: field("slow requests")?,
        })
    }

    /// Connections are waiting for a worker, or every worker is active.
    pub fn is_busy(&self) -> bool {
        self.listen_queue > 0
            || (self.total_processes > 0 && self.active_processes >= self.total_processes)
    }
}

/// The last successful scrape of one endpoint.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct FpmSnapshot {
    /// The figures.
    #[serde(flatten)]
    pub status: FpmStatus,
    /// When they were scraped (unix ms).
    pub at_unix_ms: u64,
}

/// Wall-clock milliseconds, for timestamps shown to operators.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Scrapes every endpoint of the pool each interval until the pool is dropped or stopped.
pub(super) async fn run_scraper(
    pool: Weak<Pool>,
    cancel: CancellationToken,
    metrics: Arc<Metrics>,
) {
    let Some((path, interval, timeout, addr_port)) = pool.upgrade().and_then(|p| {
        let path = p.config.status.clone()?;
        let h = p.config.health.as_ref();
        Some((
            path,
            h.map_or(DEFAULT_SCRAPE_INTERVAL, |h| h.interval),
            h.map_or(DEFAULT_SCRAPE_TIMEOUT, |h| h.timeout),
            h.and_then(|h| h.addr_port),
        ))
    }) else {
        return;
    };
    // Half an interval out of phase with the pings (which tick at start): our own ping
    // would otherwise be counted among FPM's active processes, and FPM gets one probe at a
    // time.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval / 2, interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        // Cancel-safe: an interval tick that loses the race is simply not taken.
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Some((name, endpoints)) = pool
            .upgrade()
            .map(|p| (p.config.name.clone(), p.endpoints.clone()))
        else {
            return;
        };
        let mut set = JoinSet::new();
        for ep in endpoints {
            let path = path.clone();
            set.spawn(async move {
                let target = probe_target(&ep.addr, addr_port);
                let r = fcgi_get(target, &path, "json", timeout, STATUS_LIMIT)
                    .await
                    .and_then(|a| {
                        if a.status == StatusCode::OK {
                            FpmStatus::parse(&a.body)
                        } else {
                            Err(ProbeError::BadStatus(format!("HTTP status {}", a.status)))
                        }
                    });
                (ep, r)
            });
        }
        // Dropping the set on cancel aborts the probes still running.
        let results = tokio::select! {
            _ = cancel.cancelled() => return,
            r = join_all(set) => r,
        };
        for (ep, result) in results {
            apply_scrape(&metrics, &name, &ep, result);
        }
    }
}

async fn join_all<T: 'static>(mut set: JoinSet<T>) -> Vec<T> {
    let mut out = Vec::with_capacity(set.len());
    while let Some(r) = set.join_next().await {
        if let Ok(v) = r {
            out.push(v);
        }
    }
    out
}

fn apply_scrape(
    metrics: &Metrics,
    pool: &str,
    ep: &Endpoint,
    result: Result<FpmStatus, ProbeError>,
) {
    match result {
        Ok(s) => {
            let l = &[pool, ep.label.as_str()];
            let f = &metrics.fpm;
            let set = |g: &prometheus::IntGaugeVec, v: u64| {
                g.with_label_values(l)
                    .set(i64::try_from(v).unwrap_or(i64::MAX));
            };
            set(&f.active_processes, s.active_processes);
            set(&f.idle_processes, s.idle_processes);
            set(&f.total_processes, s.total_processes);
            set(&f.listen_queue, s.listen_queue);
            set(&f.max_listen_queue, s.max_listen_queue);
            set(&f.max_children_reached, s.max_children_reached);
            set(&f.slow_requests, s.slow_requests);
            set(&f.accepted_connections, s.accepted_conn);
            f.up.with_label_values(l).set(1);
            f.scrapes
                .with_label_values(&[pool, ep.label.as_str(), "ok"])
                .inc();
            ep.set_fpm_snapshot(FpmSnapshot {
                status: s,
                at_unix_ms: unix_ms(),
            });
        }
        Err(e) => {
            // Gauges and figures keep their last values. A scrape that waited is what
            // saturation looks like, so the busy hints stay; one that was refused or reset
            // means FPM is gone, and its old listen queue must not excuse failed pings.
            if !e.is_wait() {
                ep.clear_fpm_hints();
            }
            let f = &metrics.fpm;
            f.up.with_label_values(&[pool, ep.label.as_str()]).set(0);
            let result = if e.is_wait() { "busy" } else { "fail" };
            f.scrapes
                .with_label_values(&[pool, ep.label.as_str(), result])
                .inc();
            tracing::debug!(pool, endpoint = %ep.label, "FPM status scrape failed: {e}");
        }
    }
}
