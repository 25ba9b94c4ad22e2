//! CLI dispatch only.

use clap::Parser;
use edgepop::cli::{Cli, Command};
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Check(a) => edgepop::serve::check(&a.config),
        Command::Serve(a) => runtime().and_then(|rt| rt.block_on(edgepop::serve::serve(&a.config))),
        Command::Dns(a) => runtime().and_then(|rt| rt.block_on(edgepop::dns::run(&a.config))),
        Command::LatencyProbe(a) => runtime().and_then(|rt| rt.block_on(edgepop::probe::run(a))),
        Command::Demo(a) => runtime().and_then(|rt| rt.block_on(edgepop::demo::run(a))),
        Command::Origin(a) => runtime().and_then(|rt| rt.block_on(edgepop::demo::run_origin(a))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {}", chain(&e));
            ExitCode::FAILURE
        }
    }
}

/// "outer: inner: root", skipping a cause whose text the outer message already contains.
fn chain(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let s = cause.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
    }
    out
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("EDGEPOP_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
