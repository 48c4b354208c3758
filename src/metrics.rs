//! Every Prometheus family fpmgate exports, registered once in [`Metrics::new`] on a registry
//! of our own (never the global default), with their `fpmgate_` names written only here.
//!
//! Components never format metric names: they get label-bound handles ([`PoolMetrics`],
//! [`EndpointMetrics`]) made when a runtime is built, so the request path only touches
//! atomics, except for the families labelled by status code.

mod fpm;
pub use fpm::FpmMetrics;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Latency buckets: OpenTelemetry's HTTP boundaries extended to 60 s, since PHP requests
/// (reports, imports) are often slow on purpose.
const LATENCY_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
];

/// The registry and every metric family.
pub struct Metrics {
    registry: Registry,
    /// Client requests by vhost, pool and exact status code.
    pub http_requests: IntCounterVec,
    /// Client request duration, head received to last body byte sent.
    pub http_duration: HistogramVec,
    /// Client connections currently open, by listener kind.
    pub client_connections: IntGaugeVec,
    /// Client connections closed before any request, by listener kind and cause.
    pub client_refused: IntCounterVec,
    /// `fpmgate_tls_certificate_expiry_timestamp_seconds{bind,certificate}`.
    pub tls_certificate_expiry: IntGaugeVec,
    /// FastCGI requests by endpoint and status FPM returned.
    pub upstream_requests: IntCounterVec,
    /// Time from sending the request to the end of FPM's response head.
    pub upstream_header_duration: HistogramVec,
    /// Upstream failures by kind.
    pub upstream_errors: IntCounterVec,
    /// Retries on another connection or endpoint.
    pub upstream_retries: IntCounterVec,
    /// 502/503/504 answers by cause.
    pub gateway_errors: IntCounterVec,
    /// Requests admitted to a pool and not finished.
    pub pool_inflight: IntGaugeVec,
    /// Sum of max_conns over the pool's healthy endpoints.
    pub pool_capacity: IntGaugeVec,
    /// Requests waiting in the pool's queue.
    pub pool_queue_depth: IntGaugeVec,
    /// Time requests waited in the queue.
    pub pool_queue_wait: HistogramVec,
    /// 1 when the endpoint takes traffic.
    pub endpoint_up: IntGaugeVec,
    /// Requests holding a connection to the endpoint.
    pub endpoint_inflight: IntGaugeVec,
    /// The endpoint's max_conns.
    pub endpoint_max_conns: IntGaugeVec,
    /// Open FastCGI connections by state (active, idle).
    pub upstream_connections: IntGaugeVec,
    /// Kept-alive connections reused for another request.
    pub upstream_reuses: IntCounterVec,
    /// New FastCGI connections opened.
    pub upstream_connects: IntCounterVec,
    /// Active health checks by result.
    pub health_checks: IntCounterVec,
    /// Passive ejections.
    pub endpoint_ejections: IntCounterVec,
    /// Configured queue size per pool.
    pub pool_queue_size: IntGaugeVec,
    /// Config reloads by result.
    pub config_reloads: IntCounterVec,
    /// Unix time of the last successful (re)load.
    pub config_last_success: Gauge,
    /// 1 if the last reload attempt succeeded.
    pub config_last_successful: IntGauge,
    /// Current config generation.
    pub config_generation: IntGauge,
    /// FPM status page figures, by pool and endpoint.
    pub fpm: FpmMetrics,
    /// Resolutions of `dns:` endpoints by pool, name and result.
    pub dns_resolutions: IntCounterVec,
    /// Addresses currently known for each `dns:` endpoint.
    pub dns_endpoints: IntGaugeVec,
    /// Bytes of request bodies held in memory.
    pub request_body_memory: IntGauge,
    /// Request bodies written to temporary files, by cause.
    pub request_bodies_spooled: IntCounterVec,
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid counter");
    r.register(Box::new(c.clone())).expect("unique counter");
    c
}

fn gauge(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let g = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid gauge");
    r.register(Box::new(g.clone())).expect("unique gauge");
    g
}

fn histogram(r: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let h = HistogramVec::new(
        HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
        labels,
    )
    .expect("valid histogram");
    r.register(Box::new(h.clone())).expect("unique histogram");
    h
}

impl Metrics {
    /// The request-body memory budget, counting into these families.
    pub fn body_memory(&self) -> crate::body::BodyMemory {
        let spooled = |cause| self.request_bodies_spooled.with_label_values(&[cause]);
        crate::body::BodyMemory::new(
            self.request_body_memory.clone(),
            spooled("size"),
            spooled("memory"),
        )
    }

    /// Registers every family. Called once per process.
    pub fn new() -> Metrics {
        let r = Registry::new();
        let pe = &["pool", "endpoint"];
        let fpm = FpmMetrics::new(&r, pe);
        let config_last_success = Gauge::new(
            "fpmgate_config_last_reload_success_timestamp_seconds",
            "Unix time of the last successful config load.",
        )
        .expect("valid gauge");
        r.register(Box::new(config_last_success.clone()))
            .expect("unique");
        let config_last_successful = IntGauge::new(
            "fpmgate_config_last_reload_successful",
            "1 if the last config reload attempt succeeded.",
        )
        .expect("valid gauge");
        r.register(Box::new(config_last_successful.clone()))
            .expect("unique");
        let config_generation = IntGauge::new(
            "fpmgate_config_generation",
            "Generation number of the running config (1 at start, +1 per applied reload).",
        )
        .expect("valid gauge");
        r.register(Box::new(config_generation.clone()))
            .expect("unique");
        let build = gauge(
            &r,
            "fpmgate_build_info",
            "Build information; always 1.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        let start_time = Gauge::new(
            "fpmgate_start_time_seconds",
            "Unix time the process started.",
        )
        .expect("valid gauge");
        r.register(Box::new(start_time.clone())).expect("unique");
        start_time.set(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );

        let request_body_memory = IntGauge::new(
            "fpmgate_request_body_memory_bytes",
            "Bytes of request bodies held in memory, all requests together.",
        )
        .expect("valid gauge");
        r.register(Box::new(request_body_memory.clone()))
            .expect("unique");

        Metrics {
            http_requests: counter(
                &r,
                "fpmgate_http_requests_total",
                "Client HTTP requests by vhost, pool and status code.",
                &["vhost", "pool", "code"],
            ),
            http_duration: histogram(
                &r,
                "fpmgate_http_request_duration_seconds",
                "Client request duration, head received to response end.",
                &["vhost", "pool"],
            ),
            client_connections: gauge(
                &r,
                "fpmgate_client_connections",
                "Open client connections by listener kind.",
                &["listener"],
            ),
            client_refused: counter(
                &r,
                "fpmgate_client_connections_refused_total",
                "Client connections closed before any request, by cause.",
                &["listener", "cause"],
            ),
            tls_certificate_expiry: gauge(
                &r,
                "fpmgate_tls_certificate_expiry_timestamp_seconds",
                "End of the validity of each certificate served, in Unix seconds, by listener address and certificate file.",
                &["bind", "certificate"],
            ),
            upstream_requests: counter(
                &r,
                "fpmgate_upstream_requests_total",
                "FastCGI requests by endpoint and the status FPM returned.",
                &["pool", "endpoint", "code"],
            ),
            upstream_header_duration: histogram(
                &r,
                "fpmgate_upstream_header_duration_seconds",
                "Time from sending a FastCGI request to the end of FPM's response head.",
                pe,
            ),
            upstream_errors: counter(
                &r,
                "fpmgate_upstream_errors_total",
                "FastCGI failures by endpoint and kind.",
                &["pool", "endpoint", "kind"],
            ),
            upstream_retries: counter(
                &r,
                "fpmgate_upstream_retries_total",
                "Requests retried on another connection or endpoint.",
                &["pool"],
            ),
            gateway_errors: counter(
                &r,
                "fpmgate_gateway_errors_total",
                "502, 503 and 504 answers by cause.",
                &["vhost", "pool", "code", "cause"],
            ),
            pool_inflight: gauge(
                &r,
                "fpmgate_pool_inflight_requests",
                "Requests admitted to the pool and not finished.",
                &["pool"],
            ),
            pool_capacity: gauge(
                &r,
                "fpmgate_pool_capacity",
                "Sum of max_conns over the pool's healthy endpoints.",
                &["pool"],
            ),
            pool_queue_depth: gauge(
                &r,
                "fpmgate_pool_queue_depth",
                "Requests waiting for an FPM connection.",
                &["pool"],
            ),
            pool_queue_wait: histogram(
                &r,
                "fpmgate_pool_queue_wait_seconds",
                "Time requests waited in the pool queue (0 for those admitted at once).",
                &["pool"],
            ),
            endpoint_up: gauge(
                &r,
                "fpmgate_endpoint_up",
                "1 when the endpoint takes traffic, 0 when down, ejected or draining.",
                pe,
            ),
            endpoint_inflight: gauge(
                &r,
                "fpmgate_endpoint_inflight_requests",
                "Requests holding a connection to the endpoint.",
                pe,
            ),
            endpoint_max_conns: gauge(
                &r,
                "fpmgate_endpoint_max_conns",
                "The endpoint's configured max_conns.",
                pe,
            ),
            upstream_connections: gauge(
                &r,
                "fpmgate_upstream_connections",
                "Open FastCGI connections by state.",
                &["pool", "endpoint", "state"],
            ),
            upstream_reuses: counter(
                &r,
                "fpmgate_upstream_connection_reuses_total",
                "Kept-alive FastCGI connections reused.",
                pe,
            ),
            upstream_connects: counter(
                &r,
                "fpmgate_upstream_connects_total",
                "New FastCGI connections opened.",
                pe,
            ),
            health_checks: counter(
                &r,
                "fpmgate_health_checks_total",
                "Active health checks by result.",
                &["pool", "endpoint", "result"],
            ),
            endpoint_ejections: counter(
                &r,
                "fpmgate_endpoint_ejections_total",
                "Passive ejections after consecutive request failures.",
                pe,
            ),
            pool_queue_size: gauge(
                &r,
                "fpmgate_pool_queue_size",
                "The pool's configured queue size.",
                &["pool"],
            ),
            config_reloads: counter(
                &r,
                "fpmgate_config_reloads_total",
                "Config reloads by result.",
                &["result"],
            ),
            dns_resolutions: counter(
                &r,
                "fpmgate_dns_resolutions_total",
                "Resolutions of dns: endpoint names by result.",
                &["pool", "name", "result"],
            ),
            dns_endpoints: gauge(
                &r,
                "fpmgate_dns_endpoints",
                "Addresses currently known for a dns: endpoint name.",
                &["pool", "name"],
            ),
            request_body_memory,
            request_bodies_spooled: counter(
                &r,
                "fpmgate_request_bodies_spooled_total",
                "Request bodies spooled to a temporary file, by cause (size, memory).",
                &["cause"],
            ),
            config_last_success,
            config_last_successful,
            config_generation,
            fpm,
            registry: r,
        }
    }

    /// The text exposition of every family.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 * 1024);
        let families = self.registry.gather();
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&families, &mut out);
        out
    }

    /// Handles bound to one pool's labels.
    pub fn pool(&self, pool: &str) -> PoolMetrics {
        PoolMetrics {
            inflight: self.pool_inflight.with_label_values(&[pool]),
            capacity: self.pool_capacity.with_label_values(&[pool]),
            queue_depth: self.pool_queue_depth.with_label_values(&[pool]),
            queue_wait: self.pool_queue_wait.with_label_values(&[pool]),
            retries: self.upstream_retries.with_label_values(&[pool]),
            queue_size: self.pool_queue_size.with_label_values(&[pool]),
        }
    }

    /// Handles bound to one endpoint's labels.
    pub fn endpoint(&self, pool: &str, endpoint: &str) -> EndpointMetrics {
        let l = &[pool, endpoint];
        EndpointMetrics {
            up: self.endpoint_up.with_label_values(l),
            inflight: self.endpoint_inflight.with_label_values(l),
            max_conns: self.endpoint_max_conns.with_label_values(l),
            active: self
                .upstream_connections
                .with_label_values(&[pool, endpoint, "active"]),
            idle: self
                .upstream_connections
                .with_label_values(&[pool, endpoint, "idle"]),
            reuses: self.upstream_reuses.with_label_values(l),
            connects: self.upstream_connects.with_label_values(l),
            ejections: self.endpoint_ejections.with_label_values(l),
            header_duration: self.upstream_header_duration.with_label_values(l),
            requests: std::sync::Arc::new(CodeCounters::new(&self.upstream_requests, l)),
        }
    }

    /// Removes every series of an endpoint that left the config, so dashboards do not show
    /// ghosts.
    pub fn forget_endpoint(&self, pool: &str, endpoint: &str) {
        let l = &[pool, endpoint];
        let _ = self.endpoint_up.remove_label_values(l);
        let _ = self.endpoint_inflight.remove_label_values(l);
        let _ = self.endpoint_max_conns.remove_label_values(l);
        let _ = self.upstream_reuses.remove_label_values(l);
        let _ = self.upstream_connects.remove_label_values(l);
        let _ = self.upstream_header_duration.remove_label_values(l);
        let _ = self.endpoint_ejections.remove_label_values(l);
        for result in ["ok", "fail", "busy"] {
            let _ = self
                .health_checks
                .remove_label_values(&[pool, endpoint, result]);
        }
        for result in ["ok", "busy", "fail"] {
            let _ = self
                .fpm
                .scrapes
                .remove_label_values(&[pool, endpoint, result]);
        }
        for state in ["active", "idle"] {
            let _ = self
                .upstream_connections
                .remove_label_values(&[pool, endpoint, state]);
        }
        let f = &self.fpm;
        for g in [
            &f.active_processes,
            &f.idle_processes,
            &f.total_processes,
            &f.listen_queue,
            &f.max_listen_queue,
            &f.max_children_reached,
            &f.slow_requests,
            &f.accepted_connections,
            &f.up,
        ] {
            let _ = g.remove_label_values(l);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Label-bound handles of one pool.
#[derive(Clone)]
pub struct PoolMetrics {
    /// `fpmgate_pool_inflight_requests`.
    pub inflight: IntGauge,
    /// `fpmgate_pool_capacity`.
    pub capacity: IntGauge,
    /// `fpmgate_pool_queue_depth`.
    pub queue_depth: IntGauge,
    /// `fpmgate_pool_queue_wait_seconds`.
    pub queue_wait: Histogram,
    /// `fpmgate_upstream_retries_total`.
    pub retries: IntCounter,
    /// `fpmgate_pool_queue_size`.
    pub queue_size: IntGauge,
}

/// Label-bound handles of one endpoint.
#[derive(Clone)]
pub struct EndpointMetrics {
    /// `fpmgate_endpoint_up`.
    pub up: IntGauge,
    /// `fpmgate_endpoint_inflight_requests`.
    pub inflight: IntGauge,
    /// `fpmgate_endpoint_max_conns`.
    pub max_conns: IntGauge,
    /// `fpmgate_upstream_connections{state="active"}`.
    pub active: IntGauge,
    /// `fpmgate_upstream_connections{state="idle"}`.
    pub idle: IntGauge,
    /// `fpmgate_upstream_connection_reuses_total`.
    pub reuses: IntCounter,
    /// `fpmgate_upstream_connects_total`.
    pub connects: IntCounter,
    /// `fpmgate_endpoint_ejections_total`.
    pub ejections: IntCounter,
    /// `fpmgate_upstream_header_duration_seconds`.
    pub header_duration: Histogram,
    /// `fpmgate_upstream_requests_total{pool,endpoint,code}`.
    pub requests: std::sync::Arc<CodeCounters>,
}

/// The status codes whose counters are bound once per label set; any other code takes the
/// slower labelled lookup. Bound lazily, so a series appears only once it has been seen.
const COMMON_CODES: [u16; 20] = [
    200, 201, 204, 206, 301, 302, 304, 400, 401, 403, 404, 405, 408, 413, 414, 429, 500, 502, 503,
    504,
];

/// A counter family with every label but `code` fixed: the request path increments by code
/// without hashing label strings.
pub struct CodeCounters {
    vec: IntCounterVec,
    labels: Vec<String>,
    bound: [std::sync::OnceLock<IntCounter>; COMMON_CODES.len()],
}

impl CodeCounters {
    /// Counters of `vec` with the leading labels fixed (`code` is the last label).
    pub fn new(vec: &IntCounterVec, labels: &[&str]) -> CodeCounters {
        CodeCounters {
            vec: vec.clone(),
            labels: labels.iter().map(|s| s.to_string()).collect(),
            bound: std::array::from_fn(|_| std::sync::OnceLock::new()),
        }
    }

    /// Adds one for `code`.
    pub fn inc(&self, code: http::StatusCode) {
        let n = code.as_u16();
        let with_code = || {
            let mut l: Vec<&str> = self.labels.iter().map(String::as_str).collect();
            l.push(code.as_str());
            self.vec.with_label_values(&l)
        };
        match COMMON_CODES.iter().position(|&c| c == n) {
            Some(i) => self.bound[i].get_or_init(with_code).inc(),
            None => with_code().inc(),
        }
    }
}

/// Handles of one (vhost, pool) pair, bound on first use.
pub struct RouteMetrics {
    /// `fpmgate_http_requests_total{vhost,pool,code}`.
    pub requests: CodeCounters,
    duration_vec: HistogramVec,
    labels: [String; 2],
    duration: std::sync::OnceLock<Histogram>,
}

impl RouteMetrics {
    /// Handles for requests routed to `vhost` and `pool`.
    pub fn new(m: &Metrics, vhost: &str, pool: &str) -> RouteMetrics {
        RouteMetrics {
            requests: CodeCounters::new(&m.http_requests, &[vhost, pool]),
            duration_vec: m.http_duration.clone(),
            labels: [vhost.to_string(), pool.to_string()],
            duration: std::sync::OnceLock::new(),
        }
    }

    /// `fpmgate_http_request_duration_seconds{vhost,pool}`.
    pub fn duration(&self) -> Histogram {
        self.duration
            .get_or_init(|| {
                self.duration_vec
                    .with_label_values(&[&self.labels[0], &self.labels[1]])
            })
            .clone()
    }
}
