//! Configuration: `raw` is the file as written, `validate` turns it into the typed [`Config`]
//! whose invariants hold (names resolve, certificates load, numbers make sense), `error` says
//! where in which file something is wrong. `regions` does the same for the DNS region map.

mod error;
pub mod key_file;
mod raw;
pub mod regions;
mod validate;

pub use error::{ConfigError, Location};
pub use validate::{
    AccessLogTarget, AdminConfig, CertificateConfig, ClientAuth, Config, CookieKeys, DnsConfig,
    DnsRateLimit, EdgeConfig, Glue, HeaderEdits, HealthCa, ListenerConfig, Nsid, OriginConfig,
    PopConfig, Protocol, RateLimit, Role, RouteConfig, UdpIo,
};

use std::path::Path;

/// The default configuration path, relative to the working directory.
pub const DEFAULT_PATH: &str = "config/edgepop.toml";

/// Reads a configuration file and validates every role whose sections it has (what `check`
/// does); a file with neither role is an error. Relative paths inside it (certificates, CA,
/// region file) are resolved against the working directory, like the default `--config`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(path, &read(path)?)
}

/// Reads a configuration file and validates only the sections `role` uses (what `serve` and
/// `dns` do): the other role's sections must still have the right shape (no unknown keys,
/// right types) but their values and the files they name are not looked at.
pub fn load_role(path: &Path, role: Role) -> Result<Config, ConfigError> {
    parse_role(path, &read(path)?, role)
}

/// Like [`load`], for configuration text as if it had been read from `path`.
pub fn parse(path: &Path, source: &str) -> Result<Config, ConfigError> {
    let raw: raw::RawConfig = ConfigError::parse_toml(path, source)?;
    validate::validate(path, source, raw, None)
}

/// Like [`load_role`], for configuration text as if it had been read from `path`.
pub fn parse_role(path: &Path, source: &str, role: Role) -> Result<Config, ConfigError> {
    let raw: raw::RawConfig = ConfigError::parse_toml(path, source)?;
    validate::validate(path, source, raw, Some(role))
}

fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })
}
