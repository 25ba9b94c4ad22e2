//! TLS on both sides: `certs` loads PEM files, `sni` picks the server certificate by name and
//! builds the listener's config, `early` serves TLS 1.3 0-RTT, `client` builds the verified
//! upstream config, `coalesce` batches h2 writes into full records.

pub mod certs;
pub mod client;
pub mod coalesce;
pub mod early;
pub mod sni;
pub mod tickets;

use std::sync::Arc;

/// The one crypto provider of the process (ring: builds with a C compiler only, no cmake).
pub fn provider() -> rustls::crypto::CryptoProvider {
    rustls::crypto::ring::default_provider()
}

/// TLS 1.2 is the floor; 1.3 preferred.
pub static VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

pub fn provider_arc() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(provider())
}
