//! CLI dispatch only.

use clap::Parser;
use edgepop::cli::{Cli, Command};
use std::process::ExitCode;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The sidecar's map rebuilds free tens of MiB at once; give them back right away.
    tune_allocator(matches!(cli.command, Command::Dns(_) | Command::Demo(_)));
    init_tracing();
    let result = match cli.command {
        Command::Check(a) => {
            // A report piped into `head` ends quietly, as other Unix tools do, instead of
            // panicking on a closed stdout. (`check` writes to no socket, so SIGPIPE's
            // default action cannot end it anywhere else.)
            // SAFETY: resetting a signal disposition before any other thread exists.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            edgepop::serve::check(&a.config)
        }
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

/// Ids in mimalloc v3's `mi_option_e`, checked against their documented defaults so that
/// another mimalloc (or a MIMALLOC_* environment override) is left alone, never mis-set.
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4; // default 2
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15; // 10 ms in the docs, 1000 ms in v3

/// mimalloc commits its first arena eagerly, and it does so in its own process constructor,
/// before `main`: 15 MiB of idle RSS (27 MiB instead of 12 for `serve`). This runs before
/// that constructor (a prioritised `.init_array` entry runs before unprioritised ones, and
/// mimalloc's has no priority when built by gcc) and asks for commit on use.
#[cfg(target_os = "linux")]
#[used]
#[link_section = ".init_array.00098"]
static COMMIT_ON_USE: extern "C" fn() = commit_on_use;

#[cfg(target_os = "linux")]
extern "C" fn commit_on_use() {
    use libmimalloc_sys::{mi_option_get, mi_option_set};
    // SAFETY: plain getter/setter of mimalloc's global options (an array of statics), run
    // single-threaded by the loader; the getter reads the environment, already set up.
    unsafe {
        if mi_option_get(ARENA_EAGER_COMMIT) == 2 {
            mi_option_set(ARENA_EAGER_COMMIT, 0);
        }
    }
}

/// mimalloc (fast on the request path) purges freed pages lazily, which shows as resident
/// memory: with `purge_now` it returns them at once. Measured with 100,000 region networks:
/// the sidecar's RSS is 15 MiB instead of 73 MiB.
fn tune_allocator(purge_now: bool) {
    use libmimalloc_sys::{mi_option_get, mi_option_set};
    // SAFETY: plain setters of mimalloc's global options, called before any other thread
    // exists.
    unsafe {
        if !cfg!(target_os = "linux") && mi_option_get(ARENA_EAGER_COMMIT) == 2 {
            mi_option_set(ARENA_EAGER_COMMIT, 0);
        }
        if purge_now && matches!(mi_option_get(PURGE_DELAY), 10 | 1000) {
            mi_option_set(PURGE_DELAY, 0);
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
