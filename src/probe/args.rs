//! The `latency-probe` command line (a contract: DESIGN.md) and its translation to `Options`.

use super::{DnsServer, HttpVersion, Mode, Options, ProbeError, ResolveOverride, Target, Trust};
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct ProbeArgs {
    /// URLs to measure (https://host/path, with an optional :port), interleaved.
    #[arg(required = true)]
    pub urls: Vec<String>,
    /// Samples per URL.
    #[arg(short = 'n', long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub count: u32,
    /// Pause between rounds, e.g. "200ms".
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// cold: new TCP+TLS each sample; resumed: TLS resumption; warm: one kept connection;
    /// early: resumption with the request as TLS 1.3 0-RTT early data.
    #[arg(long, value_enum, default_value_t = Mode::Cold)]
    pub mode: Mode,
    /// Offer HTTP/1.1 only.
    #[arg(long, conflicts_with_all = ["http2", "http3"])]
    pub http1: bool,
    /// Offer HTTP/2 only (prior knowledge on http://).
    #[arg(long, conflicts_with = "http3")]
    pub http2: bool,
    /// HTTP/3 over QUIC (https:// only): the QUIC handshake is reported as the tls phase.
    #[arg(long)]
    pub http3: bool,
    /// Connect to ADDR for HOST:PORT instead of resolving HOST (curl syntax). Repeatable.
    #[arg(long, value_name = "HOST:PORT:ADDR")]
    pub resolve: Vec<ResolveOverride>,
    /// Trust these CA certificates (PEM) instead of the system roots.
    #[arg(long, value_name = "FILE", conflicts_with = "insecure")]
    pub cacert: Option<PathBuf>,
    /// Accept any server certificate (handshake signatures are still checked).
    #[arg(long, short = 'k')]
    pub insecure: bool,
    /// Resolve through this DNS server (UDP), e.g. the edgepop sidecar.
    #[arg(long, value_name = "SERVER:PORT")]
    pub dns: Option<SocketAddr>,
    /// EDNS Client Subnet sent with --dns queries, e.g. 203.0.113.0/24.
    #[arg(long, value_name = "NET", requires = "dns")]
    pub subnet: Option<ipnet::IpNet>,
    /// Print JSON instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Timeout of each phase, e.g. "5s".
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

impl ProbeArgs {
    pub fn into_run(self) -> Result<(Vec<Target>, Options), ProbeError> {
        let targets = self
            .urls
            .iter()
            .map(|u| Target::parse(u))
            .collect::<Result<Vec<_>, _>>()?;
        let trust = match (&self.cacert, self.insecure) {
            (_, true) => Trust::Insecure,
            (Some(path), false) => Trust::Roots(crate::tls::certs::load_roots(path)?),
            (None, false) => Trust::System,
        };
        let http = match (self.http1, self.http2, self.http3) {
            (true, _, _) => HttpVersion::Http1,
            (_, true, _) => HttpVersion::Http2,
            (_, _, true) => HttpVersion::Http3,
            _ => HttpVersion::Auto,
        };
        let options = Options {
            count: self.count as usize,
            interval: self.interval,
            mode: self.mode,
            http,
            resolve: self.resolve,
            trust,
            dns: self.dns.map(|server| DnsServer {
                server,
                subnet: self.subnet.map(|n| n.trunc()),
            }),
            timeout: self.timeout,
            progress: true,
        };
        Ok((targets, options))
    }
}
