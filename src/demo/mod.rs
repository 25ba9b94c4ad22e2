//! `edgepop demo`: origin, WAN simulators, edge with a warm pool (and one with pooling off),
//! then latency-probe against each, printed next to the physical limits.

pub mod origin;

use clap::Args;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct DemoArgs {}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let _ = args;
    anyhow::bail!("demo: not implemented yet")
}
