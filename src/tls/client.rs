//! Upstream TLS: certificates verified against the origin's `ca` (or the system's roots) and
//! `server_name`, the origin's `client_cert` presented when it asks; one session cache per
//! config so reconnects resume.

use super::certs::{self, CertError};
use crate::config::{ClientAuth, Protocol};
use rustls::client::WantsClientCert;
use rustls::{ConfigBuilder, RootCertStore};
use std::path::Path;
use std::sync::Arc;

/// Builds the client config for one origin: ALPN is pinned to the configured protocol, and
/// sessions are cached so reconnects resume. `ca`: a CA file and its bytes.
fn client_config(
    ca: Option<(&Path, &[u8])>,
    protocol: Protocol,
    client_auth: Option<&ClientAuth>,
) -> Result<rustls::ClientConfig, CertError> {
    let roots = match ca {
        Some((path, pem)) => certs::roots_from_pem(path, pem)?,
        None => certs::default_roots(),
    };
    let builder = builder(roots);
    let mut cfg = match client_auth {
        None => builder.with_no_client_auth(),
        Some(a) => builder
            .with_client_auth_cert(a.chain.clone(), a.key_der.clone_key())
            .map_err(|source| CertError::Mismatch {
                cert: a.cert.clone(),
                key: a.key.clone(),
                source,
            })?,
    };
    cfg.alpn_protocols = vec![protocol.alpn().to_vec()];
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(4096);
    Ok(cfg)
}

fn builder(roots: RootCertStore) -> ConfigBuilder<rustls::ClientConfig, WantsClientCert> {
    rustls::ClientConfig::builder_with_provider(super::provider_arc())
        .with_protocol_versions(super::VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
}

/// A client config that trusts `roots` only; used by tests, the probe and health checks.
pub fn client_config_with_roots(roots: RootCertStore, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut cfg = builder(roots).with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

/// Shares one client config per origin key; wrapped so callers cannot mutate it.
pub type SharedClientConfig = Arc<rustls::ClientConfig>;

/// Everything that makes two upstream TLS configs different, including the CA file's bytes
/// so a reload with a changed CA builds a new config.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ConfigKey {
    address: String,
    server_name: String,
    ca: Option<Vec<u8>>,
    protocol: Protocol,
    /// Digest of the client certificate and key files.
    client_auth: Option<[u8; 32]>,
}

type Registry =
    std::sync::Mutex<std::collections::HashMap<ConfigKey, std::sync::Weak<rustls::ClientConfig>>>;

/// Process-wide: one config (hence one TLS session cache) per server name + address + CA +
/// protocol + client certificate, shared by every worker thread and kept across reloads (a
/// reload builds its pools while the old ones still hold their configs), so reconnects
/// resume. Held weakly: a config no pool uses (an old client key, say) is dropped.
fn registry() -> &'static Registry {
    static REGISTRY: std::sync::OnceLock<Registry> = std::sync::OnceLock::new();
    REGISTRY.get_or_init(Default::default)
}

/// The shared client config for an origin; built on first use.
pub fn shared_client_config(
    address: &str,
    server_name: &str,
    ca: Option<&Path>,
    protocol: Protocol,
    client_auth: Option<&ClientAuth>,
) -> Result<SharedClientConfig, CertError> {
    let ca_bytes = match ca {
        Some(p) => Some(std::fs::read(p).map_err(|e| CertError::Ca {
            path: p.to_path_buf(),
            source: rustls::pki_types::pem::Error::Io(e),
        })?),
        None => None,
    };
    let key = ConfigKey {
        address: address.to_string(),
        server_name: server_name.to_string(),
        ca: ca_bytes,
        protocol,
        client_auth: client_auth.map(|a| a.digest),
    };
    // Held only at pool construction (start-up and reload), never on a request path.
    let mut map = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(cfg) = map.get(&key).and_then(std::sync::Weak::upgrade) {
        return Ok(cfg);
    }
    map.retain(|_, cfg| cfg.strong_count() > 0);
    let ca_pem = ca.zip(key.ca.as_deref());
    let cfg = Arc::new(client_config(ca_pem, protocol, client_auth)?);
    map.insert(key, Arc::downgrade(&cfg));
    Ok(cfg)
}
