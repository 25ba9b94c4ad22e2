//! Throw-away certificates for the demo, generated in memory with rcgen: a CA, the edge's
//! leaf (www.edgepop.test, localhost) and the origin's leaf (origin.edgepop.test).

use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum DemoCertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("writing {path}: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// Writes dev-ca.crt, edge.{crt,key}, origin.{crt,key} into `dir`.
pub fn write_all(dir: &Path) -> Result<(), DemoCertError> {
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "edgepop demo CA");
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    write(dir, "dev-ca.crt", &ca_cert.pem())?;
    for (name, sans) in [
        (
            "edge",
            vec!["www.edgepop.test".to_string(), "localhost".into()],
        ),
        ("origin", vec!["origin.edgepop.test".to_string()]),
    ] {
        let params = CertificateParams::new(sans)?;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &ca_cert, &ca_key)?;
        write(dir, &format!("{name}.crt"), &cert.pem())?;
        write(dir, &format!("{name}.key"), &key.serialize_pem())?;
    }
    Ok(())
}

fn write(dir: &Path, name: &str, text: &str) -> Result<(), DemoCertError> {
    let path = dir.join(name);
    std::fs::write(&path, text).map_err(|source| DemoCertError::Write {
        path: path.display().to_string(),
        source,
    })
}
