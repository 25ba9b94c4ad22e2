//! Configuration: `raw` is the file as written, `validate` turns it into the typed [`Config`]
//! whose invariants hold (names resolve, certificates load, numbers make sense), `error` says
//! where in which file something is wrong. `regions` does the same for the DNS region map.

mod error;
mod raw;
pub mod regions;
mod validate;

pub use error::{ConfigError, Location};
pub use validate::{
    AccessLogTarget, AdminConfig, CertificateConfig, Config, DnsConfig, EdgeConfig, Glue,
    ListenerConfig, OriginConfig, PopConfig, Protocol, RouteConfig,
};

use std::path::Path;

/// The default configuration path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/edgepop.toml";

/// Reads and validates a configuration file. Relative paths inside it (certificates, CA,
/// region file) are resolved against the working directory, like the default `--config`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    let source = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(path, &source)
}

/// Validates configuration text as if it had been read from `path`.
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
    let raw: raw::RawConfig = ConfigError::parse_toml(path, source)?;
    validate::validate(path, source, raw)
}
