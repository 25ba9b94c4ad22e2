//! Throughput of one large response over the long PoP-origin leg (RTT2 80 ms): a 64 MiB body
//! from the test origin, fetched by one client on loopback next to the PoP (a warm h2
//! connection, like a browser's), through edgepop with an h2 upstream, through edgepop with
//! an http/1.1 upstream, through nginx (http/1.1 keepalive upstream), and straight from the
//! origin over the same delayed leg (one TLS connection, the reference: TCP alone).
//!
//! With an h2 upstream, one stream can have at most its flow-control window (2 MiB) in flight
//! per round trip, so it is bounded near 2 MiB / 80 ms = 25 MiB/s whatever the bandwidth;
//! http/1.1 is bounded by TCP's window, which Linux grows on its own.
//!
//! `cargo bench --bench large_body` (release; about a minute). Needs nginx for its row.

use edgepop::demo::origin::Origin;
use edgepop::probe::{measure, HttpVersion, Mode, Options, ResolveOverride, Target, Trust};
use edgepop::serve::EdgeServer;
use edgepop::wan::Relay;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

const RTT2: Duration = Duration::from_millis(80);
const BODY: u64 = 64 << 20;
const SAMPLES: usize = 5;

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
}

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// Median time to the last byte over `SAMPLES` fetches on one warm client connection
/// (the first fetch, which opens it, is not counted), as MiB/s.
async fn throughput(port: u16, host: &str) -> Option<f64> {
    let roots = edgepop::tls::certs::load_roots(&certs().join("dev-ca.crt")).ok()?;
    let target = Target::parse(&format!("https://{host}:{port}/bytes/{BODY}")).ok()?;
    let options = Options {
        count: SAMPLES + 1,
        mode: Mode::Warm,
        http: HttpVersion::Http2,
        resolve: vec![ResolveOverride {
            host: host.to_string(),
            port,
            addr: "127.0.0.1".parse().ok()?,
        }],
        trust: Trust::Roots(roots),
        timeout: Duration::from_secs(60),
        ..Options::default()
    };
    let report = measure(&[target], &options).await;
    let t = &report.targets[0];
    let mut totals: Vec<Duration> = t
        .samples
        .iter()
        .skip(1)
        .filter_map(|s| s.as_ref().ok())
        .filter(|s| s.body_bytes == BODY)
        .map(|s| s.total - s.ttfb)
        .collect();
    if totals.is_empty() {
        return None;
    }
    totals.sort();
    let median = totals[totals.len() / 2];
    Some(BODY as f64 / (1 << 20) as f64 / median.as_secs_f64())
}

fn edge_config(dir: &std::path::Path, upstream: SocketAddr, protocol: &str) -> String {
    let c = certs();
    let text = format!(
        "[pop]\nname = \"bench\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[[certificates]]\nnames = [\"localhost\"]\ncert = \"{c}/edge.crt\"\nkey = \"{c}/edge.key\"\n[[origins]]\nname = \"o\"\naddress = \"{upstream}\"\nserver_name = \"origin.edgepop.test\"\nca = \"{c}/dev-ca.crt\"\nprotocol = \"{protocol}\"\nwarm_connections = 2\n[[routes]]\nhosts = [\"localhost\"]\norigins = [\"o\"]\n",
        c = c.display()
    );
    std::fs::write(dir.join("edge.toml"), &text).expect("write");
    text
}

async fn edgepop_row(upstream: SocketAddr, protocol: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let text = edge_config(dir.path(), upstream, protocol);
    let cfg = edgepop::config::parse(&dir.path().join("edge.toml"), &text).expect("config");
    let server = EdgeServer::start(&cfg).await.expect("edge");
    let port = server.listen_addrs[0].port();
    report(
        &format!("edgepop, {protocol} upstream"),
        throughput(port, "localhost").await,
    );
    server.drain().await;
}

async fn nginx_row(upstream: SocketAddr) {
    let ok = std::process::Command::new("nginx")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        println!("nginx not installed: skipped");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let port = std::net::TcpListener::bind(any())
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port");
    let c = certs();
    let conf = format!(
        "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n access_log off;\n proxy_buffering off;\n upstream origin {{ server {upstream}; keepalive 16; }}\n server {{\n  listen 127.0.0.1:{port} ssl http2;\n  ssl_certificate {c}/edge.crt;\n  ssl_certificate_key {c}/edge.key;\n  location / {{\n   proxy_pass https://origin;\n   proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n   proxy_ssl_server_name on;\n   proxy_ssl_name origin.edgepop.test;\n   proxy_ssl_verify on;\n   proxy_ssl_trusted_certificate {c}/dev-ca.crt;\n  }}\n }}\n}}\n",
        d = d.display(),
        c = c.display(),
    );
    std::fs::write(d.join("nginx.conf"), conf).expect("write");
    let mut child = tokio::process::Command::new("nginx")
        .arg("-c")
        .arg(d.join("nginx.conf"))
        .arg("-p")
        .arg(d)
        .kill_on_drop(true)
        .spawn()
        .expect("nginx");
    for _ in 0..200 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    report(
        "nginx, http/1.1 upstream",
        throughput(port, "localhost").await,
    );
    if let Some(pid) = child.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = child.wait().await;
}

fn report(name: &str, mib_s: Option<f64>) {
    match mib_s {
        Some(v) => println!("{name:<34} {v:8.1} MiB/s  (64 MiB body, median of {SAMPLES})"),
        None => println!("{name:<34} failed"),
    }
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` builds benches and runs them without --bench.
    }
    let origin = Origin::builder(certs()).start().await.expect("origin");
    let wan = Relay::start(any(), origin.addr(), RTT2 / 2)
        .await
        .expect("relay");
    println!(
        "one 64 MiB response over a {} ms PoP-origin round trip, client next to the PoP",
        RTT2.as_millis()
    );
    report(
        "origin over the WAN leg directly",
        throughput(wan.local_addr().port(), "origin.edgepop.test").await,
    );
    edgepop_row(wan.local_addr(), "h2").await;
    edgepop_row(wan.local_addr(), "http1").await;
    nginx_row(wan.local_addr()).await;
}
