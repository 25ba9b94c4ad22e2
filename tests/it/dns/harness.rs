//! DNS test harness: a sidecar started in-process from a temporary config and region file,
//! fake PoP health endpoints whose status a test flips, `dig`/`kdig` runners and raw
//! queries built with hickory-proto. Everything on 127.0.0.1 with ephemeral ports.

#![allow(dead_code)]

use edgepop::dns::Sidecar;
use hickory_proto::op::{Edns, Message, Query};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsCode, EdnsOption};
use hickory_proto::rr::{Name, RecordType};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const ZONE: &str = "edgepop.test";
pub const WWW: &str = "www.edgepop.test";

/// A running sidecar plus the files it was started from.
pub struct Dns {
    pub sidecar: Sidecar,
    pub dir: tempfile::TempDir,
    pub regions: PathBuf,
    /// The configuration file it was started from.
    pub config: PathBuf,
}

impl Dns {
    pub async fn start(regions: &str) -> Dns {
        Self::start_with(regions, "").await
    }

    /// `extra`: more `[dns]` keys, e.g. `regenerate_every = "100ms"`.
    pub async fn start_with(regions: &str, extra: &str) -> Dns {
        Self::start_config(regions, |r| config_text(r, extra)).await
    }

    /// `config`: the configuration text, given the region file's path.
    pub async fn start_config(regions: &str, config: impl Fn(&Path) -> String) -> Dns {
        Self::try_start_config(regions, config)
            .await
            .unwrap_or_else(|e| panic!("sidecar starts: {e}"))
    }

    /// As [`Dns::start_with`], but a sidecar that does not start is an error (its chain).
    pub async fn try_start_with(regions: &str, extra: &str) -> Result<Dns, String> {
        Self::try_start_config(regions, |r| config_text(r, extra)).await
    }

    async fn try_start_config(
        regions: &str,
        config: impl Fn(&Path) -> String,
    ) -> Result<Dns, String> {
        let dir = tempfile::tempdir().expect("tempdir");
        let regions_path = dir.path().join("regions.toml");
        std::fs::write(&regions_path, regions).expect("write regions");
        let cfg_path = dir.path().join("edgepop.toml");
        let text = config(&regions_path);
        std::fs::write(&cfg_path, &text).expect("write config");
        let cfg = edgepop::config::parse(&cfg_path, &text).expect("config");
        let dns = cfg.dns.expect("[dns]");
        let sidecar = Sidecar::start(dns, Some("127.0.0.1:0".parse().expect("addr")))
            .await
            .map_err(|e| format!("{:#}", anyhow::Error::new(e)))?;
        Ok(Dns {
            sidecar,
            dir,
            regions: regions_path,
            config: cfg_path,
        })
    }

    /// Replaces the configuration file (write, then rename) and asks the sidecar to apply it,
    /// as SIGHUP does.
    pub fn reload_config(&self, text: &str) {
        let tmp = self.dir.path().join("edgepop.toml.tmp");
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, &self.config).expect("rename config");
        self.sidecar.reload_config(&self.config);
    }

    pub fn addr(&self) -> SocketAddr {
        self.sidecar.dns_addr()
    }

    pub fn port(&self) -> String {
        self.addr().port().to_string()
    }

    pub fn write_regions(&self, text: &str) {
        // Write then rename, so a regeneration never reads a half-written file.
        let tmp = self.dir.path().join("regions.toml.tmp");
        std::fs::write(&tmp, text).expect("write regions");
        std::fs::rename(&tmp, &self.regions).expect("rename regions");
    }

    /// `dig @sidecar <args>` (UDP unless the args say otherwise).
    pub async fn dig(&self, args: &[&str]) -> String {
        let p = self.port();
        let mut all = vec!["@127.0.0.1", "-p", p.as_str(), "+time=2", "+tries=1"];
        all.extend_from_slice(args);
        run("dig", &all).await
    }

    pub async fn kdig(&self, args: &[&str]) -> String {
        let p = self.port();
        let mut all = vec!["@127.0.0.1", "-p", p.as_str(), "+time=2", "+retry=0"];
        all.extend_from_slice(args);
        run("kdig", &all).await
    }

    /// `dig +short` answers, sorted.
    pub async fn short(&self, args: &[&str]) -> Vec<String> {
        let mut a = vec!["+short"];
        a.extend_from_slice(args);
        let mut v: Vec<String> = self
            .dig(&a)
            .await
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty() && !l.starts_with(';'))
            .collect();
        v.sort();
        v
    }

    /// Sends raw bytes over UDP and waits for one answer (None after `wait`).
    pub async fn raw_udp(&self, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        s.send_to(bytes, self.addr()).await.expect("send");
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }

    /// Sends one query over TCP (length-prefixed) and reads one answer.
    pub async fn raw_tcp(&self, bytes: &[u8]) -> Vec<u8> {
        let mut s = tokio::net::TcpStream::connect(self.addr())
            .await
            .expect("connect");
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(bytes);
        s.write_all(&framed).await.expect("write");
        let mut len = [0u8; 2];
        s.read_exact(&mut len).await.expect("read len");
        let mut out = vec![0u8; usize::from(u16::from_be_bytes(len))];
        s.read_exact(&mut out).await.expect("read body");
        out
    }

    /// A hickory-built query over UDP, parsed back with hickory.
    pub async fn ask(&self, q: &Message) -> Message {
        let bytes = q.to_vec().expect("encode");
        let resp = self
            .raw_udp(&bytes, Duration::from_secs(2))
            .await
            .expect("an answer");
        Message::from_vec(&resp).expect("a parseable answer")
    }

    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let addr = self.sidecar.admin_addr().expect("admin");
        http_get(addr, path).await
    }
}

pub fn config_text(regions: &std::path::Path, extra: &str) -> String {
    format!(
        "[pop]\nname = \"test\"\n\n[dns]\nlisten = \"127.0.0.1:0\"\nzone = \"{ZONE}\"\nnames = [\"{WWW}\", \"deep.sub.{ZONE}\"]\nttl = \"60s\"\nregions = {:?}\nnameservers = [\"ns1.{ZONE}\", \"ns2.{ZONE}\"]\nhealth_interval = \"50ms\"\nhealth_timeout = \"500ms\"\nunhealthy_after = 2\nhealthy_after = 2\nhealth_ca = {:?}\n{extra}\n",
        regions.display().to_string(),
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("certs/dev-ca.crt")
            .display()
            .to_string()
    )
}

pub async fn run(cmd: &str, args: &[&str]) -> String {
    let out = tokio::process::Command::new(cmd)
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("{cmd} must be installed (dnsutils, knot-dnsutils): {e}"));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Dns {
    /// Waits until a rejected load is reported and still current; its message.
    pub async fn load_error(&self) -> String {
        eventually(Duration::from_secs(5), "the error is reported", || async {
            self.sidecar
                .state()
                .regen_status()
                .1
                .is_some_and(|e| e.current)
        })
        .await;
        self.sidecar
            .state()
            .regen_status()
            .1
            .map(|e| e.message)
            .unwrap_or_default()
    }
}

/// Polls `f` until it returns true, failing after `limit`.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if f().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A query for `name`/`rtype`, optionally with EDNS and an ECS option.
pub fn query(name: &str, rtype: RecordType, ecs: Option<(&str, u8)>) -> Message {
    let mut m = Message::new();
    m.set_id(0x1234);
    m.set_recursion_desired(true);
    m.add_query(Query::query(
        Name::from_str(&format!("{name}.")).expect("name"),
        rtype,
    ));
    if let Some((addr, source)) = ecs {
        let mut e = Edns::new();
        e.set_max_payload(1232);
        let addr: IpAddr = addr.parse().expect("ecs address");
        e.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::new(addr, source, 0)));
        m.set_edns(e);
    }
    m
}

/// The ECS option of an answer as (family, source, scope, address octets).
pub fn ecs_of(m: &Message) -> Option<(u16, u8, u8, Vec<u8>)> {
    let opt = m.extensions().as_ref()?.option(EdnsCode::Subnet)?;
    let bytes: Vec<u8> = opt.try_into().ok()?;
    Some((
        u16::from_be_bytes([bytes[0], bytes[1]]),
        bytes[2],
        bytes[3],
        bytes[4..].to_vec(),
    ))
}

/// The A/AAAA addresses in an answer, sorted.
pub fn addrs(m: &Message) -> Vec<String> {
    let mut v: Vec<String> = m
        .answers()
        .iter()
        .filter_map(|r| match r.data() {
            Some(hickory_proto::rr::RData::A(a)) => Some(a.0.to_string()),
            Some(hickory_proto::rr::RData::AAAA(a)) => Some(a.0.to_string()),
            _ => None,
        })
        .collect();
    v.sort();
    v
}

/// A fake PoP admin endpoint: answers every request with 200, or 503 while `fail` is set.
pub struct FakeHealth {
    pub addr: SocketAddr,
    pub fail: Arc<AtomicBool>,
    pub hits: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
    https: bool,
}

/// Reads one request head and answers 200, or 503 while `fail` is set.
async fn serve_health<S>(mut s: S, fail: &AtomicBool, hits: &AtomicU64)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    hits.fetch_add(1, Ordering::Relaxed);
    let status = if fail.load(Ordering::Relaxed) {
        "503 Service Unavailable"
    } else {
        "200 OK"
    };
    let resp = format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
    let _ = s.write_all(resp.as_bytes()).await;
    let _ = s.shutdown().await;
}

impl FakeHealth {
    /// Plain HTTP.
    pub async fn start() -> FakeHealth {
        Self::start_inner(None).await
    }

    /// HTTPS with the dev certificate (SAN 127.0.0.1), signed by certs/dev-ca.crt.
    pub async fn start_tls() -> FakeHealth {
        let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs");
        let (cert, key) = (certs.join("edge.crt"), certs.join("edge.key"));
        let ck = edgepop::tls::certs::load_certified_key(&cert, &key).expect("dev cert");
        let cc = edgepop::config::CertificateConfig {
            names: vec!["localhost".into()],
            cert_path: cert,
            key_path: key,
            key: Arc::new(ck),
        };
        let pop = edgepop::config::PopConfig {
            name: "health".into(),
            server_timing: false,
            ticket_keys: None,
            early_data: false,
            access_log: None,
        };
        let resumption = edgepop::tls::sni::Resumption::new().expect("ticket key");
        let cfg =
            edgepop::tls::sni::server_config(&[cc], &pop, &resumption).expect("server config");
        Self::start_inner(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))).await
    }

    async fn start_inner(tls: Option<tokio_rustls::TlsAcceptor>) -> FakeHealth {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let fail = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicU64::new(0));
        let (f, h) = (fail.clone(), hits.clone());
        let https = tls.is_some();
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (f, h, tls) = (f.clone(), h.clone(), tls.clone());
                tokio::spawn(async move {
                    match tls {
                        Some(acceptor) => {
                            if let Ok(s) = acceptor.accept(s).await {
                                serve_health(s, &f, &h).await;
                            }
                        }
                        None => serve_health(s, &f, &h).await,
                    }
                });
            }
        });
        FakeHealth {
            addr,
            fail,
            hits,
            task,
            https,
        }
    }

    pub fn url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}/healthz", self.addr)
    }
}

impl Drop for FakeHealth {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Minimal HTTP/1.1 GET for the admin endpoints.
pub async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let req = format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.expect("read");
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, b)| b.to_string());
    (status, body)
}

impl Dns {
    /// Like [`Dns::ask`], for use inside closures that cannot borrow the fixture.
    pub async fn probe_addr(addr: SocketAddr, q: &Message) -> Message {
        let bytes = q.to_vec().expect("encode");
        let resp = Self::probe_raw(addr, &bytes, Duration::from_secs(2))
            .await
            .expect("an answer");
        Message::from_vec(&resp).expect("a parseable answer")
    }

    pub async fn probe_raw(addr: SocketAddr, bytes: &[u8], wait: Duration) -> Option<Vec<u8>> {
        let s = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        s.send_to(bytes, addr).await.expect("send");
        let mut buf = vec![0u8; 65535];
        match tokio::time::timeout(wait, s.recv_from(&mut buf)).await {
            Ok(Ok((n, _))) => Some(buf[..n].to_vec()),
            _ => None,
        }
    }
}

/// Kills the child on drop, so a failing test leaves nothing running.
pub struct Child(pub std::process::Child);

/// `edgepop dns --config cfg` (killed on drop), its log lines (stderr) on a channel.
pub fn spawn_dns_binary(cfg: &std::path::Path) -> (Child, std::sync::mpsc::Receiver<String>) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edgepop"))
        .args(["dns", "--config"])
        .arg(cfg)
        .env("EDGEPOP_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map(Child)
        .expect("spawn");
    let stderr = child.0.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// The text after `marker` in the first log line that has it (20 s at most).
pub fn log_after(log: &std::sync::mpsc::Receiver<String>, marker: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let line = log
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .unwrap_or_else(|_| panic!("no log line with {marker:?}"));
        if let Some(rest) = line.split(marker).nth(1) {
            return rest.to_string();
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `dig @127.0.0.1 -p port <args>` against a sidecar process.
pub async fn dig_port(port: u16, args: &[&str]) -> String {
    let p = port.to_string();
    let mut all = vec!["@127.0.0.1", "-p", p.as_str(), "+time=2", "+tries=1"];
    all.extend_from_slice(args);
    run("dig", &all).await
}

/// (TTL, data) of each answer record in `dig +noall +answer` output.
pub fn answer_records(dig: &str) -> Vec<(u32, String)> {
    dig.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            Some((f.get(1)?.parse().ok()?, f.get(4)?.to_string()))
        })
        .collect()
}

pub use crate::support::signal;

/// The DNS port and admin address of a sidecar process, from its start-up log line
/// ("dns listening on 127.0.0.1:PORT (udp+tcp) ... admin=Some(ADDR) ...").
pub fn dns_addrs(log: &std::sync::mpsc::Receiver<String>) -> (u16, Option<SocketAddr>) {
    let rest = log_after(log, "dns listening on 127.0.0.1:");
    let port = rest
        .split_whitespace()
        .next()
        .and_then(|p| p.parse().ok())
        .expect("port");
    let admin = rest
        .split("admin=Some(")
        .nth(1)
        .and_then(|a| a.split(')').next())
        .and_then(|a| a.parse().ok());
    (port, admin)
}

/// A configuration whose `[admin] listen` is already held (as `edgepop serve` from the same
/// file holds it), with `extra` `[dns]` keys. Returns the holder (keep it alive), the held
/// address, the directory and the configuration's path.
pub fn config_beside_edge_admin(
    extra: &str,
) -> (
    std::net::TcpListener,
    SocketAddr,
    tempfile::TempDir,
    PathBuf,
) {
    let edge_admin = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held = edge_admin.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let regions = dir.path().join("regions.toml");
    std::fs::write(&regions, super::basic_regions()).expect("write");
    let cfg = dir.path().join("edgepop.toml");
    let text = format!(
        "[admin]\nlisten = \"{held}\"\n{}",
        config_text(&regions, extra)
    );
    std::fs::write(&cfg, text).expect("write");
    (edge_admin, held, dir, cfg)
}
