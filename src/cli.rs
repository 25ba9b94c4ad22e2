//! The command line (a contract: see DESIGN.md): serve | dns | check | latency-probe | demo.

use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "edgepop",
    version,
    about = "Edge proxy with pre-warmed origin pools, geo DNS sidecar and latency probe"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the edge proxy of one PoP.
    Serve(ConfigArg),
    /// Run the authoritative DNS sidecar.
    Dns(ConfigArg),
    /// Validate the configuration (and region file, certificates); print a summary.
    Check(ConfigArg),
    /// Measure DNS, TCP connect, TLS handshake, TTFB and total for one or more URLs.
    LatencyProbe(crate::probe::ProbeArgs),
    /// Self-contained showcase on loopback: origin, WAN simulator, edge, probe.
    Demo(crate::demo::DemoArgs),
    /// Run the demo/test origin (TLS, h2 + http/1.1) so `serve` has something to front.
    Origin(crate::demo::OriginArgs),
}

#[derive(Debug, Args)]
pub struct ConfigArg {
    /// Configuration file.
    #[arg(long, short = 'c', default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
}
