//! latency-probe: per-sample phase timings (DNS, TCP connect, TLS, TTFB, total) of one or more
//! URLs, measured interleaved, and the side-by-side report (table or JSON), with the edge's
//! `Server-Timing` split of TTFB into client-PoP and PoP-origin.
//!
//! `args` is the command line, `target` what is probed and how it resolves, `conn` opens and
//! times one connection, `sample` runs one sample per mode, `report` aggregates and renders,
//! `server_timing` reads the edge's header.
//!
//! # Library use (`edgepop demo`, tests)
//! ```no_run
//! # async fn demo() -> Result<(), edgepop::probe::ProbeError> {
//! use edgepop::probe::{measure, Mode, Options, Target, Trust};
//! let roots = edgepop::tls::certs::load_roots("certs/dev-ca.crt".as_ref())?;
//! let targets = vec![Target::parse("https://localhost:8443/")?];
//! let options = Options { count: 20, mode: Mode::Cold, trust: Trust::Roots(roots),
//!                         ..Options::default() };
//! let report = measure(&targets, &options).await;
//! print!("{}", report.render_table());
//! let p50_ttfb = report.targets[0].stats(edgepop::probe::Row::Ttfb).map(|s| s.p50);
//! # let _ = p50_ttfb; Ok(()) }
//! ```
//!
//! # What the numbers mean
//! `dns`, `connect`, `tls` are the durations of those phases (absent when the phase did not
//! happen: IP literal or `--resolve`, or `warm` mode); `ttfb` and `total` count from the start
//! of the sample, as curl's `time_starttransfer` / `time_total` do. In `warm` mode the sample
//! starts at the request, so `ttfb` is the request round trip alone. "First byte" is when hyper
//! has the response head, which for a small head is its first byte's arrival to within
//! microseconds. Through `wan::Relay`
//! the TCP round trip shows up in the TLS phase (see `wan`).
//!
//! A sample fails (counted per target with its reason: `refused`, `bad certificate`,
//! `timeout (tls handshake)`, `status 502`...) on any error or a 5xx status; failures are
//! reported, never fatal. The edge's `Server-Timing` (`pool;dur=`, `upstream;dur=;desc=`)
//! splits TTFB into client<->edge (TTFB - DNS - pool wait - upstream), the edge's pool wait,
//! and edge<->origin (upstream time to first byte).

mod args;
mod conn;
mod quic;
pub mod report;
mod sample;
mod server_timing;
mod target;

pub use args::ProbeArgs;
pub use conn::TlsInfo;
pub use report::{Failure, Report, Row, Stats, TargetReport};
pub use sample::{Phase, Sample, SampleError};
pub use server_timing::ServerTiming;
pub use target::{DnsError, DnsServer, ResolveOverride, Target, DEFAULT_TIMEOUT};

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub(crate) const USER_AGENT: &str = concat!("edgepop-latency-probe/", env!("CARGO_PKG_VERSION"));

/// Errors before any sample is taken (bad URL, unreadable CA file).
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("url {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error(transparent)]
    Ca(#[from] crate::tls::certs::CertError),
}

/// How each sample connects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// New TCP + full TLS handshake every sample (no resumption).
    Cold,
    /// New TCP, TLS resumed from the previous sample's session.
    Resumed,
    /// One kept connection: the request round trip alone.
    Warm,
    /// New TCP, TLS resumed with the request sent as TLS 1.3 0-RTT early data.
    Early,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Cold => "cold",
            Mode::Resumed => "resumed",
            Mode::Warm => "warm",
            Mode::Early => "early",
        }
    }
}

/// Which HTTP version to offer in ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum HttpVersion {
    /// h2 and http/1.1; the server picks.
    Auto,
    Http1,
    Http2,
    /// QUIC; ALPN h3.
    Http3,
}

impl HttpVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpVersion::Auto => "auto",
            HttpVersion::Http1 => "http1",
            HttpVersion::Http2 => "http2",
            HttpVersion::Http3 => "http3",
        }
    }
}

/// Which server certificates are accepted.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The system trust store (the webpki roots where it has none).
    System,
    /// `--cacert FILE`.
    Roots(rustls::RootCertStore),
    /// `--insecure`: any certificate (signatures still checked).
    Insecure,
}

/// What `measure` does; `Options::default()` is 10 cold samples, no interval, system roots.
#[derive(Debug, Clone)]
pub struct Options {
    pub count: usize,
    /// Pause between rounds (one round = one sample of every target).
    pub interval: Duration,
    pub mode: Mode,
    pub http: HttpVersion,
    pub resolve: Vec<ResolveOverride>,
    pub trust: Trust,
    pub dns: Option<DnsServer>,
    /// Per phase (dns, connect, tls, first byte, body).
    pub timeout: Duration,
    /// Print a progress line on stderr (only if it is a terminal and the run lasts > 1 s).
    pub progress: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            count: 10,
            interval: Duration::ZERO,
            mode: Mode::Cold,
            http: HttpVersion::Auto,
            resolve: Vec::new(),
            trust: Trust::System,
            dns: None,
            timeout: DEFAULT_TIMEOUT,
            progress: false,
        }
    }
}

/// Measures every target `count` times, interleaved (round i samples target 1, 2, ... in
/// turn, so a slow moment hits all of them alike). Failed samples are recorded, not fatal.
pub async fn measure(targets: &[Target], options: &Options) -> Report {
    let mut sessions: Vec<_> = targets
        .iter()
        .map(|t| sample::Session::new(t.clone(), options))
        .collect();
    let mut results: Vec<Vec<_>> = targets.iter().map(|_| Vec::new()).collect();
    for s in &mut sessions {
        s.prime().await;
    }
    let progress = options.progress && std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut shown = false;
    for round in 0..options.count {
        if round > 0 && !options.interval.is_zero() {
            tokio::time::sleep(options.interval).await;
        }
        for (s, out) in sessions.iter_mut().zip(results.iter_mut()) {
            out.push(s.sample().await);
        }
        if progress && started.elapsed() > Duration::from_secs(1) {
            let failed: usize = results.iter().flatten().filter(|r| r.is_err()).count();
            eprint!(
                "\r\x1b[Kround {}/{} ({} failed)",
                round + 1,
                options.count,
                failed
            );
            let _ = std::io::stderr().flush();
            shown = true;
        }
    }
    if shown {
        eprint!("\r\x1b[K");
    }
    Report {
        mode: options.mode,
        http: options.http,
        count: options.count,
        targets: sessions
            .iter()
            .zip(results)
            .map(|(s, samples)| TargetReport {
                url: s.target().url().to_string(),
                samples,
            })
            .collect(),
    }
}

/// `edgepop latency-probe`: exit 0 if every target had a successful sample, else 1.
pub async fn run(args: ProbeArgs) -> anyhow::Result<ExitCode> {
    let json = args.json;
    let (targets, options) = args.into_run()?;
    let report = measure(&targets, &options).await;
    let text = if json {
        format!("{}\n", serde_json::to_string_pretty(&report.to_json())?)
    } else {
        report.render_table()
    };
    // A report piped into `head` and cut short is not an error (print! would panic).
    let mut out = std::io::stdout().lock();
    match std::io::Write::write_all(&mut out, text.as_bytes()).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
        _ => {}
    }
    Ok(if report.all_targets_succeeded() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
