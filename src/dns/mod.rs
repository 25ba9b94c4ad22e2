//! The authoritative DNS sidecar: `server` (UDP/TCP wire I/O), `geo` (address or ECS ->
//! region -> answer, pure), `map` (building the immutable map from the region file).

use std::path::Path;
use std::process::ExitCode;

/// `edgepop dns`: runs until SIGTERM.
pub async fn run(config: &Path) -> anyhow::Result<ExitCode> {
    let _ = config;
    anyhow::bail!("dns: not implemented yet")
}
