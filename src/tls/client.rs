//! Upstream TLS: certificates verified against the origin's `ca` (or the webpki roots) and
//! `server_name`; one session cache per config so reconnects resume.

use super::certs::{self, CertError};
use crate::config::Protocol;
use rustls::RootCertStore;
use std::path::Path;
use std::sync::Arc;

/// Builds the client config for one origin: ALPN is pinned to the configured protocol.
pub fn client_config(
    ca: Option<&Path>,
    protocol: Protocol,
) -> Result<rustls::ClientConfig, CertError> {
    let roots = match ca {
        Some(p) => certs::load_roots(p)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(super::provider_arc())
        .with_protocol_versions(super::VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![protocol.alpn().to_vec()];
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(4096);
    Ok(cfg)
}

/// A client config that trusts `roots` only; used by tests, the probe and health checks.
pub fn client_config_with_roots(roots: RootCertStore, alpn: &[&[u8]]) -> rustls::ClientConfig {
    let mut cfg = rustls::ClientConfig::builder_with_provider(super::provider_arc())
        .with_protocol_versions(super::VERSIONS)
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
    cfg
}

/// Shares one client config per origin key; wrapped so callers cannot mutate it.
pub type SharedClientConfig = Arc<rustls::ClientConfig>;
