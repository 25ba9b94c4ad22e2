//! `edgepop demo`: on loopback, an origin; WAN simulators for the client-PoP (RTT1) and
//! PoP-origin (RTT2) legs; an edge with a pre-warmed pool and one with pooling off; the DNS
//! sidecar answering for the edge's name. Then latency-probe against the origin directly, the
//! cold edge, the warm edge, and the warm edge again with the request sent as TLS 1.3 0-RTT
//! early data on a resumed session, over HTTP/3, and over HTTP/3 with 0-RTT, printed next to
//! the physical limits of DESIGN.md.
//!
//! Everything runs from embedded defaults: certificates are generated in memory (`certs`), the
//! configuration is built here, nothing is read from the working directory.

mod certs;
pub mod origin;

use crate::config;
use crate::dns::Sidecar;
use crate::probe::{self, Mode, Options, ResolveOverride, Row, Target, Trust};
use crate::serve::EdgeServer;
use crate::wan::Relay;
use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Client-PoP round trip (simulated).
    #[arg(long, default_value = "10ms", value_parser = humantime::parse_duration)]
    pub rtt1: Duration,
    /// PoP-origin round trip (simulated).
    #[arg(long, default_value = "80ms", value_parser = humantime::parse_duration)]
    pub rtt2: Duration,
    /// Samples per path (each a fresh TCP + TLS 1.3 client connection).
    #[arg(long, short = 'n', default_value_t = 15)]
    pub count: usize,
}

#[derive(Debug, Args)]
pub struct OriginArgs {
    /// Address to listen on (the origin of config/edgepop.toml).
    #[arg(long, default_value = "127.0.0.1:9443")]
    pub listen: SocketAddr,
    /// Folder with origin.crt and origin.key.
    #[arg(long, default_value = "certs")]
    pub certs: std::path::PathBuf,
}

/// `edgepop origin`: the demo origin in the foreground until Ctrl-C / SIGTERM.
pub async fn run_origin(args: OriginArgs) -> anyhow::Result<ExitCode> {
    let origin = origin::Origin::builder(&args.certs)
        .address(args.listen)
        .start()
        .await?;
    println!("edgepop origin: listening on https://{}", origin.addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    Ok(ExitCode::SUCCESS)
}

const LOCALHOST: [u8; 4] = [127, 0, 0, 1];

fn any_port() -> SocketAddr {
    SocketAddr::from((LOCALHOST, 0))
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.count > 0, "--count must be at least 1");
    let dir = tempfile_dir()?;
    certs::write_all(dir.path()).context("generating demo certificates")?;
    let origin = origin::Origin::builder(dir.path())
        .h2_only()
        .start()
        .await
        .context("starting the demo origin")?;
    let half = |d: Duration| d / 2;
    let wan = Relay::start(any_port(), origin.addr(), half(args.rtt2)).await?;
    let direct = Relay::start(any_port(), origin.addr(), half(args.rtt1 + args.rtt2)).await?;
    let warm = start_edge(dir.path(), "warm", wan.local_addr(), true).await?;
    let cold = start_edge(dir.path(), "cold", wan.local_addr(), false).await?;
    let to_warm = Relay::start(any_port(), warm.listen_addrs[0], half(args.rtt1)).await?;
    let to_cold = Relay::start(any_port(), cold.listen_addrs[0], half(args.rtt1)).await?;
    // QUIC to the warm edge's HTTP/3 port (the same number as its TCP port, over UDP).
    let to_warm_h3 =
        crate::wan::UdpRelay::start(any_port(), warm.listen_addrs[0], half(args.rtt1)).await?;
    let admin = warm.admin_addr.context("demo edge has an admin listener")?;
    let sidecar = start_dns(dir.path(), admin).await?;
    println!(
        "edgepop demo: RTT1 (client-PoP) = {} ms, RTT2 (PoP-origin) = {} ms, TLS 1.3, \
         a fresh client connection per sample, {} samples per path",
        ms(args.rtt1),
        ms(args.rtt2),
        args.count
    );
    println!(
        "  origin {}  |  WAN relays: client->origin {}, client->edge {} / {}, edge->origin {}  |  DNS sidecar {}",
        origin.addr(),
        direct.local_addr(),
        to_warm.local_addr(),
        to_cold.local_addr(),
        wan.local_addr(),
        sidecar.dns_addr()
    );
    let targets = vec![
        Target::parse(&format!(
            "https://origin.edgepop.test:{}/",
            direct.local_addr().port()
        ))?,
        Target::parse(&format!(
            "https://www.edgepop.test:{}/",
            to_cold.local_addr().port()
        ))?,
        Target::parse(&format!(
            "https://www.edgepop.test:{}/",
            to_warm.local_addr().port()
        ))?,
    ];
    let roots = crate::tls::certs::load_roots(&dir.path().join("dev-ca.crt"))?;
    let options = Options {
        count: args.count,
        mode: Mode::Cold,
        trust: Trust::Roots(roots),
        resolve: vec![ResolveOverride {
            host: "origin.edgepop.test".into(),
            port: direct.local_addr().port(),
            addr: LOCALHOST.into(),
        }],
        dns: Some(probe::DnsServer {
            server: sidecar.dns_addr(),
            subnet: None,
        }),
        progress: true,
        ..Options::default()
    };
    let report = probe::measure(&targets, &options).await;
    let early_options = Options {
        mode: Mode::Early,
        ..options.clone()
    };
    let early = probe::measure(&targets[2..], &early_options).await;
    let h3_options = Options {
        http: probe::HttpVersion::Http3,
        ..options.clone()
    };
    let h3_target = Target::parse(&format!(
        "https://www.edgepop.test:{}/",
        to_warm_h3.local_addr().port()
    ))?;
    let h3 = probe::measure(std::slice::from_ref(&h3_target), &h3_options).await;
    let h3_early_options = Options {
        mode: Mode::Early,
        ..h3_options.clone()
    };
    let h3_early = probe::measure(std::slice::from_ref(&h3_target), &h3_early_options).await;
    let (r1, r2) = (ms(args.rtt1), ms(args.rtt2));
    let rows = [
        (
            "client -> origin directly",
            "3 x (RTT1 + RTT2)",
            3.0 * (r1 + r2),
        ),
        (
            "client -> edge, cold upstream",
            "3 x RTT1 + 3 x RTT2",
            3.0 * r1 + 3.0 * r2,
        ),
        (
            "client -> edge, warm pool",
            "3 x RTT1 + RTT2",
            3.0 * r1 + r2,
        ),
        (
            "  ... resumed, request in 0-RTT",
            "2 x RTT1 + RTT2",
            2.0 * r1 + r2,
        ),
        ("  ... over HTTP/3 (QUIC)", "2 x RTT1 + RTT2", 2.0 * r1 + r2),
        ("  ... HTTP/3, request in 0-RTT", "RTT1 + RTT2", r1 + r2),
    ];
    println!();
    println!(
        "{:<32} {:>10} {:>10}   {:<22} {:>8}",
        "path", "TTFB p50", "p90", "physical limit", "= ms"
    );
    let measured = report
        .targets
        .iter()
        .chain(&early.targets)
        .chain(&h3.targets)
        .chain(&h3_early.targets);
    for ((label, formula, limit), t) in rows.iter().zip(measured) {
        let (p50, p90) = match t.stats(Row::Ttfb) {
            Some(s) => (format!("{:.1}", ms(s.p50)), format!("{:.1}", ms(s.p90))),
            None => ("failed".into(), "-".into()),
        };
        println!("{label:<32} {p50:>10} {p90:>10}   {formula:<22} {limit:>8.1}");
    }
    println!();
    println!("latency-probe detail (ms; dns = the sidecar's answer; pool/upstream = the edge's Server-Timing):");
    print!("{}", report.render_table());
    println!("\nthe warm edge again, TLS resumed with the request as 0-RTT early data:");
    print!("{}", early.render_table());
    println!("\nthe warm edge over HTTP/3 (the QUIC handshake, transport and TLS at once, is the tls row):");
    print!("{}", h3.render_table());
    println!("\nand over HTTP/3 with the request as 0-RTT data on a resumed session:");
    print!("{}", h3_early.render_table());
    let warm_snap = warm.pools().first().map(|p| p.snapshot());
    if let Some(s) = warm_snap {
        println!(
            "\nwarm edge pool: {} open connections to the origin, {} requests found one warm, {} opened in total",
            s.open, s.reused_total, s.opened_total
        );
    }
    drop(sidecar);
    warm.drain().await;
    cold.drain().await;
    Ok(
        if [&report, &early, &h3, &h3_early]
            .iter()
            .all(|r| r.all_targets_succeeded())
        {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn tempfile_dir() -> anyhow::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .prefix("edgepop-demo")
        .tempdir()
        .context("creating a temporary directory")
}

/// An edge whose one origin is reached through the PoP-origin WAN relay.
async fn start_edge(
    dir: &Path,
    name: &str,
    origin: SocketAddr,
    pooling: bool,
) -> anyhow::Result<EdgeServer> {
    let pool = if pooling {
        "warm_connections = 4"
    } else {
        "pooling = false"
    };
    let text = format!(
        r#"[pop]
name = "demo-{name}"
early_data = true
[admin]
listen = "127.0.0.1:0"
[[listeners]]
address = "127.0.0.1:0"
http3 = true
[[certificates]]
names = ["www.edgepop.test", "localhost"]
cert = "{d}/edge.crt"
key = "{d}/edge.key"
[[origins]]
name = "origin"
address = "{origin}"
server_name = "origin.edgepop.test"
ca = "{d}/dev-ca.crt"
protocol = "h2"
{pool}
[[routes]]
hosts = ["www.edgepop.test", "localhost"]
origins = ["origin"]
"#,
        d = dir.display()
    );
    let path = dir.join(format!("edge-{name}.toml"));
    std::fs::write(&path, &text)?;
    let cfg = config::parse(&path, &text)?;
    EdgeServer::start(&cfg).await
}

/// The sidecar answers www.edgepop.test with 127.0.0.1 while the warm edge's /healthz is ok.
async fn start_dns(dir: &Path, admin: SocketAddr) -> anyhow::Result<Sidecar> {
    let regions = format!(
        r#"[[pops]]
name = "demo"
ipv4 = ["127.0.0.1"]
health = "http://{admin}/healthz"

[[regions]]
name = "loopback"
networks = ["127.0.0.0/8"]
pops = ["demo"]

[default]
pops = ["demo"]
"#
    );
    let regions_path = dir.join("regions.toml");
    std::fs::write(&regions_path, regions)?;
    // ns1 is the sidecar itself, given glue: an in-zone nameserver without it gets a
    // warning (resolvers could not reach it).
    let text = format!(
        "[pop]\nname = \"demo\"\n[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"edgepop.test\"\nnames = [\"www.edgepop.test\"]\nregions = \"{}\"\nglue = {{ \"ns1.edgepop.test\" = [\"127.0.0.1\"] }}\n",
        regions_path.display()
    );
    let path = dir.join("dns.toml");
    std::fs::write(&path, &text)?;
    let cfg = config::parse(&path, &text)?;
    let dns = cfg.dns.context("demo DNS config has [dns]")?;
    Ok(Sidecar::start(dns, None).await?)
}
