//! Shared test helpers: paths, the binary, dev certificates.

#![allow(dead_code)]

use std::path::PathBuf;

/// The repository root (tests run with the package root as working directory).
pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `edgepop` binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgepop"))
}

pub fn certs() -> PathBuf {
    root().join("certs")
}
