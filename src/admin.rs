//! The admin listener: `GET /metrics` (Prometheus text), `/healthz` (process alive),
//! `/readyz` (config loaded and every pool has an available endpoint), `/status` (JSON), and
//! the operator actions `POST /pools/{pool}/endpoints/{addr}/drain|enable` and `/reload`.
//! It is a separate socket so that it can stay on loopback while clients reach the others.
//!
//! When `admin.token` is set, every POST needs `Authorization: Bearer TOKEN`; reads stay
//! open so that scrapers and probes need no secret.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pool::endpoint::now_ms;
use crate::pool::fpm_status::unix_ms;
use crate::pool::{Endpoint, Pool};
use crate::respbody::ProxyBody;
use crate::runtime::Shared;

/// Admin state.
#[derive(Clone)]
pub struct Admin {
    /// The live runtime.
    pub shared: Shared,
    /// Metric families.
    pub metrics: Arc<Metrics>,
    /// The last reload error, shown in `/status`.
    pub last_error: Arc<std::sync::Mutex<Option<String>>>,
    /// Reloads the config file (blocking: file reads, certificate loads, DNS), returning
    /// whether the new config is running. Called on a blocking thread by `POST /reload`.
    pub reload: Option<Arc<dyn Fn() -> bool + Send + Sync>>,
}

/// Serves the admin API until shutdown.
pub async fn serve(listener: TcpListener, admin: Admin, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r { Ok(v) => v, Err(_) => continue },
        };
        let admin = admin.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let admin = admin.clone();
                async move {
                    if req.uri().path() == "/reload" {
                        return Ok::<_, Infallible>(admin.reload_now(&req).await);
                    }
                    Ok::<_, Infallible>(admin.route(req))
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(std::time::Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>, ctype: &'static str) -> Response<ProxyBody> {
    let mut r = Response::new(ProxyBody::full(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn json_response(status: StatusCode, doc: &Value) -> Response<ProxyBody> {
    let mut s = serde_json::to_string_pretty(doc).unwrap_or_default();
    s.push('\n');
    text(status, s, "application/json")
}

fn method_not_allowed(allow: &'static str) -> Response<ProxyBody> {
    let mut r = text(
        StatusCode::METHOD_NOT_ALLOWED,
        "method not allowed\n",
        "text/plain",
    );
    r.headers_mut()
        .insert(header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// An operator action on one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// No new requests; in-flight ones finish; idle connections close.
    Drain,
    /// Takes traffic again (lifts a drain and a passive ejection).
    Enable,
}

/// `/pools/{pool}/endpoints/{addr}/{drain|enable}` → (pool, addr, action). The address may
/// be percent-encoded (`127.0.0.1%3A9000`, `unix%3A%2Frun%2Fphp.sock`) or raw: the action is
/// the last segment and the pool the first, so slashes of a raw socket path are unambiguous.
fn parse_endpoint_path(path: &str) -> Option<(String, String, Action)> {
    let rest = path.strip_prefix("/pools/")?;
    let (pool, rest) = rest.split_once('/')?;
    let rest = rest.strip_prefix("endpoints/")?;
    let (addr, action) = rest.rsplit_once('/')?;
    let action = match action {
        "drain" => Action::Drain,
        "enable" => Action::Enable,
        _ => return None,
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .ok()
            .map(|c| c.into_owned())
    };
    let (pool, addr) = (decode(pool)?, decode(addr)?);
    (!pool.is_empty() && !addr.is_empty()).then_some((pool, addr, action))
}

/// Compares without an early exit, so response time says nothing about the token.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The `/status` object of one endpoint.
pub fn endpoint_status(e: &Endpoint) -> Value {
    let now = now_ms();
    let until = e.ejected_until_ms.load(Ordering::Relaxed);
    let ejected = until > now;
    let state = if e.is_draining() {
        "draining"
    } else if ejected {
        "ejected"
    } else if !e.is_up() {
        "down"
    } else {
        "up"
    };
    let (last_check, passive_failures) = {
        let h = e.health();
        (h.last_check.clone(), h.passive.len())
    };
    json!({
        "addr": e.label,
        "state": state,
        "healthy": e.is_up(),
        "draining": e.is_draining(),
        "ejected_until": ejected.then(|| unix_ms() + (until - now)),
        "passive_failures": passive_failures,
        "weight": e.weight(),
        "max_conns": e.max_conns(),
        "inflight": e.busy(),
        "idle_conns": e.idle_count(),
        "last_check": last_check,
        "fpm": e.fpm_snapshot(),
        "fpm_busy": e.fpm_busy(),
    })
}

impl Admin {
    fn route<B>(&self, req: Request<B>) -> Response<ProxyBody> {
        let path = req.uri().path();
        let read = matches!(*req.method(), Method::GET | Method::HEAD);
        match path {
            "/metrics" | "/healthz" | "/readyz" | "/status" if !read => {
                method_not_allowed("GET, HEAD")
            }
            "/metrics" => text(
                StatusCode::OK,
                self.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            "/healthz" => text(StatusCode::OK, "ok\n", "text/plain"),
            "/readyz" => self.readyz(),
            "/status" => text(StatusCode::OK, self.status_json(), "application/json"),
            _ => match parse_endpoint_path(path) {
                Some((pool, addr, action)) => {
                    self.post(&req, |admin| admin.endpoint_action(&pool, &addr, action))
                }
                None => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
            },
        }
    }

    /// `POST /reload`: the same as SIGHUP; 200 when the new config runs, 422 with the
    /// errors (line numbers included) when it was rejected and the old one keeps serving.
    async fn reload_now<B>(&self, req: &Request<B>) -> Response<ProxyBody> {
        let denied = self.post(req, |_| text(StatusCode::OK, "", "text/plain"));
        if denied.status() != StatusCode::OK {
            return denied;
        }
        let Some(reload) = self.reload.clone() else {
            return text(
                StatusCode::NOT_IMPLEMENTED,
                "reload is not available\n",
                "text/plain",
            );
        };
        match tokio::task::spawn_blocking(move || reload()).await {
            Ok(true) => text(
                StatusCode::OK,
                format!("reloaded: generation {}\n", self.shared.load().generation),
                "text/plain",
            ),
            Ok(false) => {
                let err = self
                    .last_error
                    .lock()
                    .map(|g| g.clone())
                    .unwrap_or(None)
                    .unwrap_or_default();
                text(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    format!("config rejected; the running config keeps serving:\n{err}"),
                    "text/plain",
                )
            }
            Err(_) => text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "reload failed\n",
                "text/plain",
            ),
        }
    }

    /// Runs `f` for an authorized POST; 405 for other methods, 401 without the token.
    fn post<B>(
        &self,
        req: &Request<B>,
        f: impl FnOnce(&Admin) -> Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        if req.method() != Method::POST {
            return method_not_allowed("POST");
        }
        if !self.authorized(req) {
            let mut r = text(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token\n",
                "text/plain",
            );
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"fpmgate\""),
            );
            return r;
        }
        f(self)
    }

    /// No token configured, or `Authorization: Bearer <token>` matches the live config's
    /// (a reload rotates it; one that removes `admin:` keeps the last, see `Reloader`).
    fn authorized<B>(&self, req: &Request<B>) -> bool {
        let rt = self.shared.load();
        let Some(token) = rt.config.admin.as_ref().and_then(|a| a.token.as_deref()) else {
            return true;
        };
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        given.is_some_and(|t| same_secret(t.as_bytes(), token.as_bytes()))
    }

    fn endpoint_action(&self, pool: &str, addr: &str, action: Action) -> Response<ProxyBody> {
        let rt = self.shared.load();
        let Some(p) = rt.pools.iter().find(|p| p.name() == pool) else {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({ "error": format!("no pool `{pool}`") }),
            );
        };
        let Some(ep) = p.endpoints.iter().find(|e| e.label == addr) else {
            return json_response(
                StatusCode::NOT_FOUND,
                &json!({ "error": format!("pool `{pool}` has no endpoint `{addr}`") }),
            );
        };
        apply_action(p, ep, action);
        json_response(
            StatusCode::OK,
            &json!({ "pool": p.name(), "endpoint": endpoint_status(ep) }),
        )
    }

    fn readyz(&self) -> Response<ProxyBody> {
        let rt = self.shared.load();
        let down: Vec<&str> = rt
            .pools
            .iter()
            .filter(|p| !p.endpoints.iter().any(|e| e.is_available()))
            .map(|p| p.name())
            .collect();
        if down.is_empty() {
            text(StatusCode::OK, "ready\n", "text/plain")
        } else {
            text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("not ready: no available endpoint in {}\n", down.join(", ")),
                "text/plain",
            )
        }
    }

    /// The `/status` document.
    pub fn status_json(&self) -> String {
        let rt = self.shared.load();
        let pools: Vec<Value> = rt
            .pools
            .iter()
            .map(|p| {
                let endpoints: Vec<Value> =
                    p.endpoints.iter().map(|e| endpoint_status(e)).collect();
                json!({
                    "name": p.name(),
                    "inflight": p.inflight(),
                    "queue_depth": p.queue_len(),
                    "capacity": p.endpoints.iter().filter(|e| e.is_available()).map(|e| e.max_conns()).sum::<usize>(),
                    "endpoints": endpoints,
                })
            })
            .collect();
        let last_error = self.last_error.lock().map(|g| g.clone()).unwrap_or(None);
        let doc = json!({
            "version": env!("CARGO_PKG_VERSION"),
            "generation": rt.generation,
            "config": rt.config.path.display().to_string(),
            "last_reload_error": last_error,
            "pools": pools,
        });
        let mut s = serde_json::to_string_pretty(&doc).unwrap_or_default();
        s.push('\n');
        s
    }
}

/// Drains or enables `ep` in `pool`, then updates its metric and the pool's capacity.
fn apply_action(pool: &Pool, ep: &Endpoint, action: Action) {
    match action {
        Action::Drain => {
            ep.draining.store(true, Ordering::Relaxed);
            // Idle connections pin FPM workers; in-flight requests keep theirs until done.
            let closed = ep.reap_idle(true);
            tracing::info!(pool = pool.name(), endpoint = %ep.label, idle_closed = closed, "endpoint drained by the admin API");
        }
        Action::Enable => {
            ep.draining.store(false, Ordering::Relaxed);
            // The operator overrides a passive ejection; a down verdict of the active checks
            // stands until FPM answers pings again.
            ep.ejected_until_ms.store(0, Ordering::Relaxed);
            ep.health().passive.record_success();
            tracing::info!(pool = pool.name(), endpoint = %ep.label, "endpoint enabled by the admin API");
        }
    }
    ep.sync_up_metric();
    pool.refresh_capacity();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_paths() {
        let p = |s| parse_endpoint_path(s);
        assert_eq!(
            p("/pools/php82/endpoints/127.0.0.1%3A9000/drain"),
            Some(("php82".into(), "127.0.0.1:9000".into(), Action::Drain))
        );
        assert_eq!(
            p("/pools/php82/endpoints/127.0.0.1:9000/enable"),
            Some(("php82".into(), "127.0.0.1:9000".into(), Action::Enable))
        );
        assert_eq!(
            p("/pools/a/endpoints/unix%3A%2Frun%2Fphp.sock/drain"),
            Some(("a".into(), "unix:/run/php.sock".into(), Action::Drain))
        );
        assert_eq!(
            p("/pools/a/endpoints/unix:/run/php/x.sock/drain"),
            Some(("a".into(), "unix:/run/php/x.sock".into(), Action::Drain))
        );
        assert_eq!(p("/pools/a/endpoints//drain"), None);
        assert_eq!(p("/pools/a/endpoints/x/stop"), None);
        assert_eq!(p("/pools/a/x/drain"), None);
        assert_eq!(p("/pools/a/endpoints/%FF/drain"), None);
    }

    #[test]
    fn secrets() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"abcd"));
    }
}
