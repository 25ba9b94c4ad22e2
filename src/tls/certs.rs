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

/// Every certificate of PEM text read from `path`, in order.
pub fn chain_from_pem(path: &Path, pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, CertError> {
    let chain = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Cert {
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
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| CertError::Ca {
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
