//! Server-side TLS: the certificate is chosen by SNI (exact name first, then a `*.` wildcard
//! for one label, then the first configured certificate for clients without or with an
//! unknown SNI), ALPN offers h2 and http/1.1, sessions resume from tickets or, with 0-RTT,
//! from a single-use session cache.

use crate::config::CertificateConfig;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug)]
pub struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl SniResolver {
    /// `certs` must not be empty; the typed config guarantees it for the edge role.
    pub fn new(certs: &[CertificateConfig]) -> Option<Self> {
        let default = certs.first()?.key.clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        for c in certs {
            for name in &c.names {
                // First entry wins for a name listed twice, as in the config order.
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard
                        .entry(suffix.to_string())
                        .or_insert_with(|| c.key.clone()),
                    None => exact.entry(name.clone()).or_insert_with(|| c.key.clone()),
                };
            }
        }
        Some(SniResolver {
            exact,
            wildcard,
            default,
        })
    }

    pub fn lookup(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = sni else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(k) = self.exact.get(&name) {
            return k.clone();
        }
        if let Some((_, parent)) = name.split_once('.') {
            if let Some(k) = self.wildcard.get(parent) {
                return k.clone();
            }
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.lookup(hello.server_name()))
    }
}

/// Session state that outlives reloads, so clients keep resuming across a SIGHUP: the
/// process's own ticket key (used without shared `ticket_keys`) and the session cache.
#[derive(Clone)]
pub struct Resumption {
    own_tickets: Arc<dyn rustls::server::ProducesTickets>,
    cache: Arc<dyn rustls::server::StoresServerSessions>,
}

impl Resumption {
    pub fn new() -> Result<Self, rustls::Error> {
        Ok(Resumption {
            own_tickets: rustls::crypto::ring::Ticketer::new()?,
            cache: rustls::server::ServerSessionMemoryCache::new(16 * 1024),
        })
    }
}

/// Builds the listeners' TLS config. Sessions resume from tickets (`pop.ticket_keys` when
/// the PoP's instances share them, else a per-process key), except with `pop.early_data`:
/// rustls accepts 0-RTT only for sessions it keeps itself, where each session resumes once,
/// so a replayed ClientHello finds nothing to resume and its early data is rejected.
pub fn server_config(
    certs: &[CertificateConfig],
    pop: &crate::config::PopConfig,
    resumption: &Resumption,
) -> Result<rustls::ServerConfig, rustls::Error> {
    let resolver = SniResolver::new(certs)
        .ok_or_else(|| rustls::Error::General("no certificate configured".into()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(super::provider_arc())
        .with_protocol_versions(super::VERSIONS)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Each chain compressed once per algorithm (RFC 8879) and kept: rustls' default keeps 4,
    // so with more certificates than two the compression would be redone per handshake.
    cfg.cert_compression_cache = Arc::new(rustls::compress::CompressionCache::new(
        certs.len().max(2) * rustls::compress::default_cert_compressors().len(),
    ));
    cfg.session_storage = resumption.cache.clone();
    if pop.early_data {
        cfg.max_early_data_size = super::early::MAX_EARLY_DATA;
        // The answer to an early request may go out before the client's Finished arrives.
        cfg.send_half_rtt_data = true;
    } else {
        cfg.ticketer = match &pop.ticket_keys {
            Some(t) => t.clone(),
            None => resumption.own_tickets.clone(),
        };
    }
    Ok(cfg)
}
