//! The region file (what operators edit): PoPs with addresses and health URL, regions mapping
//! networks to PoPs in preference order, and a default. Parsed and validated here; the DNS
//! sidecar builds its lookup map from the typed result.

use super::error::ConfigError;
use std::path::Path;

/// A validated region file. (To be filled in by the DNS work.)
#[derive(Debug, Clone, Default)]
pub struct RegionFile {}

pub fn load(path: &Path) -> Result<RegionFile, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let _ = source;
    Ok(RegionFile {})
}
