//! TLS termination: certificates loaded from PEM files, chosen per handshake by SNI (exact
//! name, then the `*.parent` wildcard, then the listener's first certificate, which is also
//! what clients without SNI get), ALPN `h2` + `http/1.1`, and hot-swappable certificate sets.
//!
//! rustls' own SNI resolver does exact lookups only, has no default for clients without SNI
//! and cannot be changed after start; ours swaps its whole set atomically on reload, so new
//! handshakes see new certificates while established connections keep theirs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use arc_swap::ArcSwap;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsCertConfig;

/// The certificates of one listener, indexed by the names they are valid for.
#[derive(Debug)]
pub struct CertSet {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    /// Per certificate: its names and expiry, for logs.
    pub summary: Vec<String>,
    /// Per certificate: its file and the end of its validity (Unix seconds), for the
    /// expiry metric.
    pub expiry: Vec<(String, i64)>,
}

/// A certificate that failed to load, with the config entry it came from.
#[derive(Debug, Clone)]
pub struct CertError {
    /// Index in the listener's `tls` list.
    pub index: usize,
    /// What went wrong.
    pub message: String,
}

/// Installs the process-wide crypto provider (aws-lc-rs). Idempotent.
pub fn install_provider() {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// What loading one certificate gives: the key pair, its names, and its `notAfter`.
struct Loaded {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
    not_after: x509_parser::time::ASN1Time,
}

/// Checks one certificate/key pair as a load would: readable, parseable, and matching.
/// Expiry is not an error (see [`CertSet::load`]).
pub fn check_pair(c: &TlsCertConfig) -> Result<(), String> {
    load_one(c).map(|_| ())
}

fn load_one(c: &TlsCertConfig) -> Result<Loaded, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&c.cert)
        .map_err(|e| format!("cannot read certificate {}: {e}", c.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad PEM in {}: {e}", c.cert.display()))?;
    let Some(leaf) = certs.first() else {
        return Err(format!("no certificate in {}", c.cert.display()));
    };
    let key = PrivateKeyDer::from_pem_file(&c.key)
        .map_err(|e| format!("cannot read private key {}: {e}", c.key.display()))?;
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref())
        .map_err(|e| format!("cannot parse certificate {}: {e}", c.cert.display()))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = parsed.subject_alternative_name() {
        for n in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(d) = n {
                names.push(d.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        // Old certificates carry the name only in the subject CN.
        for cn in parsed.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    let not_after = parsed.validity().not_after;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    let ck = CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        format!(
            "certificate {} and key {} do not match: {e}",
            c.cert.display(),
            c.key.display()
        )
    })?;
    Ok(Loaded {
        key: Arc::new(ck),
        names,
        not_after,
    })
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl CertSet {
    /// Loads and checks every certificate of a listener; reports every failure. An
    /// expired certificate is loaded all the same (and flagged in `summary`): refusing it
    /// would make one lapsed name block every reload and every restart, taking all the
    /// other names down with it, where serving it costs that one name a browser warning.
    /// `fpmgate_tls_certificate_expiry_timestamp_seconds` is there to alert on before.
    pub fn load(certs: &[TlsCertConfig]) -> Result<CertSet, Vec<CertError>> {
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        let mut errors = Vec::new();
        let mut summary = Vec::new();
        let mut expiry = Vec::new();
        for (index, c) in certs.iter().enumerate() {
            match load_one(c) {
                Ok(Loaded {
                    key: ck,
                    names,
                    not_after,
                }) => {
                    let expired = if not_after.timestamp() < now_unix() {
                        "EXPIRED, "
                    } else {
                        ""
                    };
                    summary.push(format!(
                        "{} [{}] {expired}expires {not_after}",
                        display(&c.cert),
                        names.join(", ")
                    ));
                    expiry.push((display(&c.cert), not_after.timestamp()));
                    for n in names {
                        // The first certificate that names a host wins, as in config order.
                        match n.strip_prefix("*.") {
                            Some(parent) => wildcard
                                .entry(parent.to_string())
                                .or_insert_with(|| ck.clone()),
                            None => exact.entry(n).or_insert_with(|| ck.clone()),
                        };
                    }
                    default.get_or_insert(ck);
                }
                Err(message) => errors.push(CertError { index, message }),
            }
        }
        match default {
            Some(default) if errors.is_empty() => Ok(CertSet {
                exact,
                wildcard,
                default,
                summary,
                expiry,
            }),
            _ => Err(errors),
        }
    }

    /// The certificate for a server name (already lowercase or not).
    pub fn pick(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(ck) = self.exact.get(&name) {
            return ck.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(ck) = self.wildcard.get(parent) {
                return ck.clone();
            }
        }
        self.default.clone()
    }
}

fn display(p: &Path) -> String {
    p.display().to_string()
}

impl CertSet {
    /// The certificates whose validity has ended, as `file expired on date` lines.
    pub fn expired(&self) -> Vec<String> {
        let now = now_unix();
        self.summary
            .iter()
            .zip(&self.expiry)
            .filter(|(_, (_, at))| *at < now)
            .map(|(line, _)| line.clone())
            .collect()
    }
}

/// The SNI resolver of one listener; its certificate set can be replaced at any time.
#[derive(Debug)]
pub struct SniResolver {
    set: ArcSwap<CertSet>,
}

impl SniResolver {
    /// A resolver over a loaded set.
    pub fn new(set: CertSet) -> SniResolver {
        SniResolver {
            set: ArcSwap::from_pointee(set),
        }
    }

    /// Replaces the certificates for new handshakes.
    pub fn swap(&self, set: CertSet) {
        self.set.store(Arc::new(set));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.set.load().pick(hello.server_name()))
    }
}

/// The rustls server config of a listener: TLS 1.2 and 1.3, ALPN h2 then http/1.1.
pub fn server_config(resolver: Arc<SniResolver>) -> Arc<ServerConfig> {
    let mut cfg = ServerConfig::builder()
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(cfg)
}

/// `SSL_PROTOCOL` for PHP, as nginx names it.
pub fn protocol_name(v: Option<rustls::ProtocolVersion>) -> &'static str {
    match v {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
        _ => "TLS",
    }
}
