//! latency-probe: per-sample phase timings (DNS, TCP connect, TLS, TTFB, total) and the
//! side-by-side report.

use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// URLs to measure (https://host[:port]/path), interleaved.
    #[arg(required = true)]
    pub urls: Vec<String>,
}

pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("latency-probe: not implemented yet")
}
