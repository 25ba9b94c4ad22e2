//! TTFB through a PoP with simulated WAN legs (RTT1 client-PoP 10 ms, RTT2 PoP-origin 80 ms),
//! a fresh TLS 1.3 client connection per sample, edgepop vs nginx with upstream keepalive,
//! in three situations:
//! - `first`: the first request after the proxy started;
//! - `after idle`: the first request after the origin's idle timeout passed with no traffic
//!   (the origin closes connections idle for `ORIGIN_IDLE`);
//! - `steady`: back-to-back requests.
//!
//! The physical limit is 3 x RTT1 + RTT2 = 110 ms. Needs nginx (`apt-get install nginx-light`);
//! without it only edgepop is measured.
//!
//! `cargo bench --bench pool_ttfb` (release; takes about two minutes).

use edgepop::demo::origin::Origin;
use edgepop::probe::{measure, Mode, Options, Row, Target, Trust};
use edgepop::serve::EdgeServer;
use edgepop::wan::Relay;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

const RTT1: Duration = Duration::from_millis(10);
const RTT2: Duration = Duration::from_millis(80);
const SAMPLES: usize = 30;
const ORIGIN_IDLE: Duration = Duration::from_millis(1500);

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
}

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind(any())
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// One fresh-connection TTFB sample against `port` (through the client-side relay).
async fn sample(port: u16) -> Option<Duration> {
    let roots = edgepop::tls::certs::load_roots(&certs().join("dev-ca.crt")).ok()?;
    let target = Target::parse(&format!("https://localhost:{port}/")).ok()?;
    let options = Options {
        count: 1,
        mode: Mode::Cold,
        trust: Trust::Roots(roots),
        ..Options::default()
    };
    let report = measure(&[target], &options).await;
    report.targets[0].stats(Row::Ttfb).map(|s| s.p50)
}

fn p(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1;
    v[i].as_secs_f64() * 1000.0
}

trait Proxy {
    async fn start(&mut self);
    async fn stop(&mut self);
    fn port(&self) -> u16;
}

struct Edgepop {
    dir: tempfile::TempDir,
    upstream: SocketAddr,
    server: Option<EdgeServer>,
    relay: Option<Relay>,
}

impl Proxy for Edgepop {
    async fn start(&mut self) {
        let c = certs();
        let text = format!(
            "[pop]\nname = \"bench\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\n[[certificates]]\nnames = [\"localhost\"]\ncert = \"{c}/edge.crt\"\nkey = \"{c}/edge.key\"\n[[origins]]\nname = \"o\"\naddress = \"{}\"\nserver_name = \"origin.edgepop.test\"\nca = \"{c}/dev-ca.crt\"\nwarm_connections = 4\n[[routes]]\nhosts = [\"localhost\"]\norigins = [\"o\"]\n",
            self.upstream,
            c = c.display()
        );
        let path = self.dir.path().join("edge.toml");
        std::fs::write(&path, &text).expect("write");
        let cfg = edgepop::config::parse(&path, &text).expect("config");
        let server = EdgeServer::start(&cfg).await.expect("edge");
        let relay = Relay::start(any(), server.listen_addrs[0], RTT1 / 2)
            .await
            .expect("relay");
        self.server = Some(server);
        self.relay = Some(relay);
    }
    async fn stop(&mut self) {
        self.relay = None;
        if let Some(s) = self.server.take() {
            s.drain().await;
        }
    }
    fn port(&self) -> u16 {
        self.relay.as_ref().map_or(0, |r| r.local_addr().port())
    }
}

struct Nginx {
    dir: tempfile::TempDir,
    upstream: SocketAddr,
    port: u16,
    child: Option<tokio::process::Child>,
    relay: Option<Relay>,
}

impl Proxy for Nginx {
    async fn start(&mut self) {
        let c = certs();
        let d = self.dir.path();
        let conf = format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 1024; }}\nhttp {{\n access_log off;\n upstream origin {{ server {up}; keepalive 16; keepalive_timeout 300s; }}\n server {{\n  listen 127.0.0.1:{port} ssl http2;\n  ssl_certificate {c}/edge.crt;\n  ssl_certificate_key {c}/edge.key;\n  location / {{\n   proxy_pass https://origin;\n   proxy_http_version 1.1;\n   proxy_set_header Connection \"\";\n   proxy_ssl_server_name on;\n   proxy_ssl_name origin.edgepop.test;\n   proxy_ssl_verify on;\n   proxy_ssl_trusted_certificate {c}/dev-ca.crt;\n   proxy_ssl_session_reuse on;\n   proxy_ssl_protocols TLSv1.2 TLSv1.3;\n  }}\n }}\n}}\n",
            d = d.display(),
            c = c.display(),
            up = self.upstream,
            port = self.port
        );
        std::fs::write(d.join("nginx.conf"), conf).expect("write");
        let child = tokio::process::Command::new("nginx")
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-p")
            .arg(d)
            .kill_on_drop(true)
            .spawn()
            .expect("nginx");
        let addr: SocketAddr = format!("127.0.0.1:{}", self.port).parse().expect("addr");
        for _ in 0..200 {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.child = Some(child);
        self.relay = Some(Relay::start(any(), addr, RTT1 / 2).await.expect("relay"));
    }
    async fn stop(&mut self) {
        self.relay = None;
        // SIGTERM, not SIGKILL: the master must take its workers (and the port) with it.
        if let Some(mut c) = self.child.take() {
            if let Some(pid) = c.id() {
                let _ = std::process::Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status();
            }
            let _ = c.wait().await;
        }
    }
    fn port(&self) -> u16 {
        self.relay.as_ref().map_or(0, |r| r.local_addr().port())
    }
}

async fn run_cases(name: &str, proxy: &mut impl Proxy) {
    let (mut first, mut idle, mut steady) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        proxy.start().await;
        first.extend(sample(proxy.port()).await);
        proxy.stop().await;
    }
    proxy.start().await;
    let _ = sample(proxy.port()).await;
    for _ in 0..SAMPLES {
        tokio::time::sleep(ORIGIN_IDLE + Duration::from_millis(300)).await;
        idle.extend(sample(proxy.port()).await);
    }
    for _ in 0..SAMPLES {
        steady.extend(sample(proxy.port()).await);
    }
    proxy.stop().await;
    for (case, v) in [
        ("first request", &mut first),
        ("after origin idle timeout", &mut idle),
        ("steady", &mut steady),
    ] {
        if v.is_empty() {
            println!("{name:<10} {case:<27} all samples failed");
            continue;
        }
        let (p50, p90) = (p(v, 0.5), p(v, 0.9));
        println!(
            "{name:<10} {case:<27} p50 {p50:7.1} ms  p90 {p90:7.1} ms  limit 110.0 ms  p50 over limit {:+6.1} ms  (n={})",
            p50 - 110.0,
            v.len()
        );
    }
}

fn has_nginx() -> bool {
    std::process::Command::new("nginx")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` builds benches and runs them without --bench.
    }
    let origin = Origin::builder(certs())
        .idle_close(ORIGIN_IDLE)
        .start()
        .await
        .expect("origin");
    let wan = Relay::start(any(), origin.addr(), RTT2 / 2)
        .await
        .expect("relay");
    println!(
        "TTFB, fresh TLS 1.3 client connection per sample, RTT1 {} ms, RTT2 {} ms, origin idle timeout {} ms, {SAMPLES} samples",
        RTT1.as_millis(),
        RTT2.as_millis(),
        ORIGIN_IDLE.as_millis()
    );
    let dir = |_: &Path| tempfile::tempdir().expect("tempdir");
    let mut edge = Edgepop {
        dir: dir(Path::new("")),
        upstream: wan.local_addr(),
        server: None,
        relay: None,
    };
    run_cases("edgepop", &mut edge).await;
    if has_nginx() {
        let mut nginx = Nginx {
            dir: dir(Path::new("")),
            upstream: wan.local_addr(),
            port: free_port(),
            child: None,
            relay: None,
        };
        run_cases("nginx", &mut nginx).await;
    } else {
        println!("nginx not installed: skipped");
    }
}
