//! PEM loading for certificate chains, private keys and CA bundles; every error names the file.

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("certificate file {}: {source}", path.display())]
    Cert {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("certificate file {} holds no certificate", path.display())]
    NoCert { path: PathBuf },
    #[error("key file {}: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("key file {} holds no private key", path.display())]
    NoKey { path: PathBuf },
    #[error("key file {} holds an encrypted key, which is not supported (decrypt it with `openssl pkey -in KEY -out PLAIN`)", path.display())]
    EncryptedKey { path: PathBuf },
    #[error("key {} does not fit certificate {}: {source}", key.display(), cert.display())]
    Mismatch {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("CA file {}: {source}", path.display())]
    Ca {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("CA file {} holds no usable certificate", path.display())]
    NoCa { path: PathBuf },
}

/// Reads every certificate of a PEM file, in order.
pub fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| CertError::Cert {
            path: path.to_path_buf(),
            source,
        })?;
    non_empty(path, chain)
}

/// Every certificate of PEM text, in order.
fn pem_certificates(
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, rustls::pki_types::pem::Error> {
    CertificateDer::pem_slice_iter(pem).collect()
}

/// Every certificate of PEM text read from `path`, in order.
pub fn chain_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = pem_certificates(pem).map_err(|source| CertError::Cert {
        path: path.to_path_buf(),
        source,
    })?;
    non_empty(path, chain)
}

fn non_empty(
    path: &Path,
    chain: Vec<CertificateDer<'static>>,
) -> Result<Vec<CertificateDer<'static>>, CertError> {
    if chain.is_empty() {
        return Err(CertError::NoCert {
            path: path.to_path_buf(),
        });
    }
    Ok(chain)
}

/// The first private key of PEM text read from `key`.
pub fn key_from_pem(key: &Path, pem: &[u8]) -> Result<PrivateKeyDer<'static>, CertError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|source| {
        // PKCS#8 "ENCRYPTED PRIVATE KEY" and OpenSSL's "Proc-Type: 4,ENCRYPTED" headers.
        let encrypted = pem.windows(9).any(|w| w == b"ENCRYPTED");
        match source {
            rustls::pki_types::pem::Error::NoItemsFound
            | rustls::pki_types::pem::Error::Base64Decode(_)
                if encrypted =>
            {
                CertError::EncryptedKey {
                    path: key.to_path_buf(),
                }
            }
            source => key_error(key, source),
        }
    })
}

fn key_error(key: &Path, source: rustls::pki_types::pem::Error) -> CertError {
    match source {
        rustls::pki_types::pem::Error::NoItemsFound => CertError::NoKey {
            path: key.to_path_buf(),
        },
        source => CertError::Key {
            path: key.to_path_buf(),
            source,
        },
    }
}

/// Checks that `key` belongs to the first certificate of `chain`.
pub fn certified_key(
    (cert, chain): (&Path, Vec<CertificateDer<'static>>),
    (key, der): (&Path, PrivateKeyDer<'static>),
) -> Result<CertifiedKey, CertError> {
    let provider = super::provider();
    CertifiedKey::from_der(chain, der, &provider).map_err(|source| CertError::Mismatch {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        source,
    })
}

/// Loads a chain and its key and checks that the key belongs to the first certificate.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, CertError> {
    let chain = load_chain(cert)?;
    let pem =
        std::fs::read(key).map_err(|e| key_error(key, rustls::pki_types::pem::Error::Io(e)))?;
    let der = key_from_pem(key, &pem)?;
    certified_key((cert, chain), (key, der))
}

/// The trust used when no CA file is configured: the system's store (as curl and nginx
/// builds against the system OpenSSL use), or the bundled webpki roots where the system has
/// none. Read once per process.
pub fn default_roots() -> RootCertStore {
    static ROOTS: std::sync::OnceLock<RootCertStore> = std::sync::OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _ignored) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::debug!(errors = ?found.errors, "no system CA certificates; using the webpki roots");
                roots.roots = webpki_roots::TLS_SERVER_ROOTS.to_vec();
            }
            roots
        })
        .clone()
}

/// Loads a CA bundle into a root store; fails if no certificate in it is usable.
pub fn load_roots(path: &Path) -> Result<RootCertStore, CertError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| CertError::Ca {
            path: path.to_path_buf(),
            source,
        })?;
    roots_of(path, certs)
}

/// A root store from a CA bundle's PEM text, read from `path`.
pub fn roots_from_pem(path: &Path, pem: &[u8]) -> Result<RootCertStore, CertError> {
    let certs = pem_certificates(pem).map_err(|source| CertError::Ca {
        path: path.to_path_buf(),
        source,
    })?;
    roots_of(path, certs)
}

fn roots_of(path: &Path, certs: Vec<CertificateDer<'static>>) -> Result<RootCertStore, CertError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(CertError::NoCa {
            path: path.to_path_buf(),
        });
    }
    Ok(roots)
}

/// What operators watch about a certificate in service: when it expires and which uses its
/// extended key usage allows (`None`: the certificate has no such extension, so any).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// notAfter, in seconds since the Unix epoch.
    pub not_after: i64,
    pub server_auth: Option<bool>,
    pub client_auth: Option<bool>,
}

/// How soon before expiry `edgepop check` warns (certificate authorities renew at 30 days).
pub const EXPIRY_WARNING_DAYS: i64 = 14;

impl Validity {
    /// Of a certificate in DER; `None` when it does not parse (rustls accepted it, so rare).
    pub fn of(cert: &CertificateDer<'_>) -> Option<Validity> {
        let (_, c) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
        // anyExtendedKeyUsage does not count: rustls (webpki) and OpenSSL want the exact
        // purpose. An extension that does not parse allows nothing, as webpki sees it.
        let (server_auth, client_auth) = match c.extended_key_usage() {
            Ok(None) => (None, None),
            Ok(Some(e)) => (Some(e.value.server_auth), Some(e.value.client_auth)),
            Err(_) => (Some(false), Some(false)),
        };
        Some(Validity {
            not_after: c.validity().not_after.timestamp(),
            server_auth,
            client_auth,
        })
    }

    /// "expires 2027-02-20T00:00:00Z (in 85 days)", or when it expired.
    pub fn describe(&self, now: std::time::SystemTime) -> String {
        let at = std::time::UNIX_EPOCH
            + std::time::Duration::from_secs(u64::try_from(self.not_after).unwrap_or(0));
        let when = humantime::format_rfc3339_seconds(at);
        match self.days_left(now) {
            d if d < 0 => format!("expired {when}"),
            d => format!("expires {when} (in {d} days)"),
        }
    }

    /// Whole days until expiry (negative once expired).
    pub fn days_left(&self, now: std::time::SystemTime) -> i64 {
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        (self.not_after - now).div_euclid(86_400)
    }

    /// The warnings `edgepop check` prints for a certificate used for `role`.
    pub fn warnings(&self, what: &str, role: CertUse, now: std::time::SystemTime) -> Vec<String> {
        let mut out = Vec::new();
        let days = self.days_left(now);
        if days < 0 {
            out.push(format!("{what} has expired: {}", self.describe(now)));
        } else if days < EXPIRY_WARNING_DAYS {
            out.push(format!("{what} {}: renew it", self.describe(now)));
        }
        let (allowed, usage, who) = match role {
            CertUse::Server => (self.server_auth, "serverAuth", "clients"),
            CertUse::Client => (self.client_auth, "clientAuth", "origins that check it"),
        };
        if allowed == Some(false) {
            out.push(format!(
                "{what}: its extended key usage lacks {usage}, so {who} will refuse it"
            ));
        }
        out
    }
}

/// Which side of TLS a certificate is presented on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertUse {
    /// The edge's own certificates, to clients.
    Server,
    /// `[[origins]] client_cert`, to origins.
    Client,
}
