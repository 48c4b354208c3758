//! The set of client listeners, kept in step with the config: a reload binds new addresses,
//! stops removed ones (their open connections drain gracefully) and swaps the certificates
//! of TLS listeners that stay — without touching the sockets that did not change.
//!
//! Applying is two-phase so a reload is all or nothing: [`ListenerSet::prepare`] binds every
//! new socket and loads every certificate first; only if all of that worked does
//! [`ListenerSet::commit`] start, stop and swap anything.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::ListenerConfig;
use crate::listener::{self, Serve};
use crate::tls::{self, CertSet, SniResolver};

/// What makes two listener entries the same socket: changing any of these rebinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Shape {
    tls: bool,
    proxy_protocol: bool,
}

struct Running {
    shape: Shape,
    /// A second handle on the listening socket: a change of shape starts the new accept
    /// loop on it, so the socket (its port, and connections waiting in its backlog) never
    /// closes in between. None if the handle could not be made (out of descriptors).
    socket: Option<socket2::Socket>,
    resolver: Option<Arc<SniResolver>>,
    /// The address it is bound to (the `bind` label of its expiry series: unique, where
    /// several configured `127.0.0.1:0` are not) and the `certificate` labels.
    addr: SocketAddr,
    certs: Vec<String>,
    stop: CancellationToken,
    _task: JoinHandle<()>,
}

/// A bound-but-not-started listener, or new certificates for a running one.
enum Step {
    /// `sock` is the running listener's own socket when only its shape changed; None when
    /// that could not be had: it is bound again in commit, after the old listener stops.
    Start {
        key: Key,
        cfg: ListenerConfig,
        sock: Option<TcpListener>,
        set: Option<CertSet>,
    },
    Swap {
        key: Key,
        set: CertSet,
    },
    Stop {
        key: Key,
    },
}

/// Work prepared by [`ListenerSet::prepare`].
pub struct Prepared(Vec<Step>);

/// A listener's identity across reloads: its configured bind address, and which occurrence
/// of it (several `127.0.0.1:0` entries are distinct listeners; other duplicates are
/// config errors).
type Key = (SocketAddr, usize);

fn keys(wanted: &[ListenerConfig]) -> Vec<Key> {
    wanted
        .iter()
        .enumerate()
        .map(|(i, l)| {
            (
                l.bind,
                wanted[..i].iter().filter(|o| o.bind == l.bind).count(),
            )
        })
        .collect()
}

/// The running client listeners.
pub struct ListenerSet {
    serve: Serve,
    running: Mutex<HashMap<Key, Running>>,
}

fn shape(l: &ListenerConfig) -> Shape {
    Shape {
        tls: !l.tls.is_empty(),
        proxy_protocol: l.proxy_protocol,
    }
}

fn load_certs(l: &ListenerConfig) -> Result<Option<CertSet>, String> {
    if l.tls.is_empty() {
        return Ok(None);
    }
    CertSet::load(&l.tls).map(Some).map_err(|errs| {
        let msgs: Vec<String> = errs.into_iter().map(|e| e.message).collect();
        format!("listener {}: {}", l.bind, msgs.join("; "))
    })
}

impl ListenerSet {
    /// An empty set serving through `serve`.
    pub fn new(serve: Serve) -> ListenerSet {
        ListenerSet {
            serve,
            running: Mutex::new(HashMap::new()),
        }
    }

    /// Binds what is new and loads every certificate; changes nothing that runs.
    pub fn prepare(&self, wanted: &[ListenerConfig]) -> Result<Prepared, String> {
        let running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let mut steps = Vec::new();
        let wanted_keys = keys(wanted);
        for (l, key) in wanted.iter().zip(&wanted_keys) {
            let set = load_certs(l)?;
            match running.get(key) {
                Some(r) if r.shape == shape(l) => {
                    if let Some(set) = set {
                        steps.push(Step::Swap { key: *key, set });
                    }
                }
                other => {
                    if other.is_some() {
                        // Same address, new shape: the old loop stops, and the new one
                        // takes over its socket (bound again only if that fails).
                        steps.push(Step::Stop { key: *key });
                    }
                    let sock = match other {
                        Some(r) => r
                            .socket
                            .as_ref()
                            .and_then(|s| s.try_clone().ok())
                            .and_then(|s| TcpListener::from_std(s.into()).ok()),
                        None => Some(
                            listener::bind(l.bind)
                                .map_err(|e| format!("binding {}: {e}", l.bind))?,
                        ),
                    };
                    steps.push(Step::Start {
                        key: *key,
                        cfg: l.clone(),
                        sock,
                        set,
                    });
                }
            }
        }
        for key in running.keys() {
            if !wanted_keys.contains(key) {
                steps.push(Step::Stop { key: *key });
            }
        }
        Ok(Prepared(steps))
    }

    /// Applies prepared work.
    pub fn commit(&self, prepared: Prepared) {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        for step in prepared.0 {
            match step {
                Step::Stop { key } => {
                    if let Some(r) = running.remove(&key) {
                        self.publish_expiry(r.addr, &r.certs, None);
                        r.stop.cancel();
                        tracing::info!(bind = %key.0, "listener stopped");
                    }
                }
                Step::Swap { key, set } => {
                    if let Some(r) = running.get_mut(&key) {
                        if let Some(res) = &r.resolver {
                            for line in set.expired() {
                                tracing::warn!(listener = %key.0, "certificate {line}: serving it anyway");
                            }
                            r.certs = self.publish_expiry(r.addr, &r.certs, Some(&set));
                            res.swap(set);
                        }
                    }
                }
                Step::Start {
                    key,
                    cfg,
                    sock,
                    set,
                } => {
                    let sock = match sock.map_or_else(|| rebind(cfg.bind), Ok) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::error!(bind = %cfg.bind, "cannot rebind listener: {e}");
                            continue;
                        }
                    };
                    let entry = self.start(&cfg, sock, set);
                    running.insert(key, entry);
                }
            }
        }
    }

    fn start(&self, cfg: &ListenerConfig, sock: TcpListener, set: Option<CertSet>) -> Running {
        let addr = sock.local_addr().unwrap_or(cfg.bind);
        let socket = socket2::SockRef::from(&sock).try_clone().ok();
        let certs = self.publish_expiry(addr, &[], set.as_ref());
        let resolver = set.map(|set| {
            let expired = set.expired();
            for line in &set.summary {
                if expired.contains(line) {
                    tracing::warn!(listener = %addr, "certificate {line}: serving it anyway");
                } else {
                    tracing::info!(listener = %addr, "certificate {line}");
                }
            }
            Arc::new(SniResolver::new(set))
        });
        let tls_cfg = resolver.as_ref().map(|r| tls::server_config(r.clone()));
        let kind = if tls_cfg.is_some() { "https" } else { "http" };
        tracing::info!("listening addr={addr} kind={kind}");
        let stop = self.serve.shutdown.child_token();
        let mut serve = self.serve.clone();
        serve.shutdown = stop.clone();
        let task = tokio::spawn(listener::accept_loop(
            sock,
            kind,
            tls_cfg,
            cfg.proxy_protocol,
            serve,
        ));
        Running {
            shape: shape(cfg),
            socket,
            resolver,
            addr,
            certs,
            stop,
            _task: task,
        }
    }
}

impl ListenerSet {
    /// Replaces a listener's certificate expiry series (`old` labels) by those of `set`;
    /// returns the new labels.
    fn publish_expiry(
        &self,
        bind: SocketAddr,
        old: &[String],
        set: Option<&CertSet>,
    ) -> Vec<String> {
        let family = &self.serve.metrics.tls_certificate_expiry;
        let bind = bind.to_string();
        for cert in old {
            let _ = family.remove_label_values(&[&bind, cert]);
        }
        let Some(set) = set else {
            return Vec::new();
        };
        for (cert, at) in &set.expiry {
            family.with_label_values(&[&bind, cert]).set(*at);
        }
        set.expiry.iter().map(|(c, _)| c.clone()).collect()
    }
}

/// Binds an address whose previous listener was just told to stop: its accept loop drops
/// the socket within moments, so retry briefly. Only reloads get here, on a blocking
/// thread, so the short sleeps stall nothing.
fn rebind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut last = None;
    for _ in 0..40 {
        match listener::bind(addr) {
            Ok(s) => return Ok(s),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
                last = Some(e);
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::from(std::io::ErrorKind::AddrInUse)))
}
