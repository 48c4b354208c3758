//! The admin listener: `/metrics` (Prometheus text), `/healthz` (process alive), `/readyz`
//! (config loaded and every pool has an available endpoint) and `/status` (JSON).
//! It is a separate socket so that it can stay on loopback while clients reach the others.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::pool::endpoint::now_ms;
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
                async move { Ok::<_, Infallible>(admin.route(req)) }
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

impl Admin {
    fn route<B>(&self, req: Request<B>) -> Response<ProxyBody> {
        match (req.method(), req.uri().path()) {
            (&Method::GET, "/metrics") => text(
                StatusCode::OK,
                self.metrics.render(),
                "text/plain; version=0.0.4; charset=utf-8",
            ),
            (&Method::GET, "/healthz") => text(StatusCode::OK, "ok\n", "text/plain"),
            (&Method::GET, "/readyz") => {
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
            (&Method::GET, "/status") => {
                text(StatusCode::OK, self.status_json(), "application/json")
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n", "text/plain"),
        }
    }

    /// The `/status` document.
    pub fn status_json(&self) -> String {
        let rt = self.shared.load();
        let now = now_ms();
        let pools: Vec<serde_json::Value> = rt
            .pools
            .iter()
            .map(|p| {
                let endpoints: Vec<serde_json::Value> = p
                    .endpoints
                    .iter()
                    .map(|e| {
                        let ejected = e.ejected_until_ms.load(Ordering::Relaxed) > now;
                        let state = if e.draining.load(Ordering::Relaxed) {
                            "draining"
                        } else if !e.up.load(Ordering::Relaxed) {
                            "down"
                        } else if ejected {
                            "ejected"
                        } else {
                            "up"
                        };
                        serde_json::json!({
                            "addr": e.label,
                            "state": state,
                            "weight": e.weight(),
                            "max_conns": e.max_conns(),
                            "inflight": e.busy(),
                            "idle_conns": e.idle_count(),
                        })
                    })
                    .collect();
                serde_json::json!({
                    "name": p.name(),
                    "inflight": p.inflight(),
                    "queue_depth": p.queue_len(),
                    "capacity": p.endpoints.iter().filter(|e| e.is_available()).map(|e| e.max_conns()).sum::<usize>(),
                    "endpoints": endpoints,
                })
            })
            .collect();
        let last_error = self.last_error.lock().map(|g| g.clone()).unwrap_or(None);
        let doc = serde_json::json!({
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
