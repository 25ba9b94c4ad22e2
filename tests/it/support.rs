//! Shared test helpers: dev certificates, an in-process edge in front of an in-process origin,
//! a real TLS client, curl.

#![allow(dead_code)]

use bytes::Bytes;
use edgepop::demo::origin::{Origin, OriginBuilder};
use edgepop::serve::EdgeServer;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The `edgepop` binary built for this test run.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_edgepop"))
}

pub fn certs() -> PathBuf {
    root().join("certs")
}

pub fn ca() -> PathBuf {
    certs().join("dev-ca.crt")
}

pub fn origin() -> OriginBuilder {
    Origin::builder(certs())
}

/// Edge config text: one listener and admin on port 0, dev certs, one origin per entry of
/// `origins` ("name", address, extra TOML lines), one route `hosts` -> all origins in order.
pub fn edge_config(origins: &[(&str, SocketAddr, &str)], hosts: &[&str]) -> String {
    let certs = certs();
    let mut s = format!(
        r#"[pop]
name = "test1"

[admin]
listen = "127.0.0.1:0"

[[listeners]]
address = "127.0.0.1:0"

[[certificates]]
names = ["localhost", "*.edgepop.test", "edgepop.test"]
cert = "{c}/edge.crt"
key = "{c}/edge.key"

[[certificates]]
names = ["other.example"]
cert = "{c}/origin.crt"
key = "{c}/origin.key"
"#,
        c = certs.display()
    );
    for (name, addr, extra) in origins {
        s.push_str(&format!(
            r#"
[[origins]]
name = "{name}"
address = "{addr}"
server_name = "origin.edgepop.test"
ca = "{ca}"
{extra}
"#,
            ca = ca().display()
        ));
    }
    let hosts: Vec<String> = hosts.iter().map(|h| format!("{h:?}")).collect();
    let names: Vec<String> = origins.iter().map(|(n, _, _)| format!("{n:?}")).collect();
    s.push_str(&format!(
        "\n[[routes]]\nhosts = [{}]\norigins = [{}]\n",
        hosts.join(", "),
        names.join(", ")
    ));
    s
}

pub struct TestEdge {
    pub server: EdgeServer,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

/// `config` (from `edge_config`) with `line` added to its listener.
pub fn with_listener_line(config: &str, line: &str) -> String {
    let listener = "[[listeners]]\naddress = \"127.0.0.1:0\"\n";
    assert!(config.contains(listener), "{config}");
    config.replacen(listener, &format!("{listener}{line}\n"), 1)
}

/// An in-process edge routing `localhost` to one origin "o1" at `addr`, with `extra` TOML lines
/// for the origin.
pub async fn single_origin_edge(addr: SocketAddr, extra: &str) -> TestEdge {
    start_edge(&edge_config(&[("o1", addr, extra)], &["localhost"])).await
}

/// Test logs, when `EDGEPOP_LOG` is set (e.g. `EDGEPOP_LOG=edgepop=debug`).
pub fn init_logs() {
    if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_env("EDGEPOP_LOG") {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    }
}

pub async fn start_edge(config: &str) -> TestEdge {
    init_logs();
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("edgepop.toml");
    std::fs::write(&path, config).expect("write config");
    let cfg = edgepop::config::load(&path).expect("valid config");
    let server = EdgeServer::start(&cfg).await.expect("edge starts");
    let addr = server.listen_addrs[0];
    let admin = server.admin_addr.expect("admin");
    TestEdge {
        server,
        addr,
        admin,
        dir,
    }
}

pub fn tls_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let roots = edgepop::tls::certs::load_roots(&ca()).expect("dev CA");
    Arc::new(edgepop::tls::client::client_config_with_roots(roots, alpn))
}

pub async fn tls_connect(
    addr: SocketAddr,
    sni: &str,
    alpn: &[&[u8]],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name =
        rustls::pki_types::ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    tokio_rustls::TlsConnector::from(tls_config(alpn))
        .connect(name, tcp)
        .await
}

/// A client connection speaking h2 or http/1.1 to the edge.
pub enum Client {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>),
}

pub type Body = http_body_util::combinators::BoxBody<Bytes, std::io::Error>;

pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed()
}

impl Client {
    /// Over a TLS config of the test's own (its session cache, for resumption); h2 when ALPN
    /// picks it.
    pub async fn connect_with(
        addr: SocketAddr,
        sni: &str,
        cfg: Arc<rustls::ClientConfig>,
    ) -> Client {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        Client::over(tcp, sni, cfg).await
    }

    /// TLS and h2 or http/1.1 over a connection already open (and perhaps already written to).
    pub async fn over(tcp: TcpStream, sni: &str, cfg: Arc<rustls::ClientConfig>) -> Client {
        let name = rustls::pki_types::ServerName::try_from(sni.to_string()).expect("name");
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .expect("TLS to edge");
        let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(tls);
        if h2 {
            let (send, conn) = http2::handshake(TokioExecutor::new(), io)
                .await
                .expect("h2");
            tokio::spawn(conn);
            Client::H2(send)
        } else {
            let (send, conn) = http1::handshake(io).await.expect("h1");
            tokio::spawn(conn);
            Client::H1(send)
        }
    }

    pub async fn connect(addr: SocketAddr, sni: &str, h2: bool) -> Client {
        let alpn: &[&[u8]] = if h2 { &[b"h2"] } else { &[b"http/1.1"] };
        Client::connect_with(addr, sni, tls_config(alpn)).await
    }

    pub async fn send(
        &mut self,
        req: hyper::Request<Body>,
    ) -> hyper::Result<hyper::Response<hyper::body::Incoming>> {
        match self {
            Client::H1(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
            Client::H2(s) => {
                s.ready().await?;
                s.send_request(req).await
            }
        }
    }

    /// GET `path` with Host/authority `host`; returns status and body text.
    pub async fn get(&mut self, host: &str, path: &str) -> (u16, String) {
        let resp = self
            .send(request(self.is_h2(), host, path))
            .await
            .expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    pub fn is_h2(&self) -> bool {
        matches!(self, Client::H2(_))
    }
}

/// Adds an `x-big` field whose value is `len` bytes: a header section as large as a test needs.
pub fn with_big_field(mut req: hyper::Request<Body>, len: usize) -> hyper::Request<Body> {
    let value = hyper::header::HeaderValue::from_str(&"a".repeat(len)).expect("ASCII");
    req.headers_mut().insert("x-big", value);
    req
}

/// Asserts that /metrics counts `n` requests answered with status class `class` ("4xx").
pub async fn assert_requests_counted(admin: SocketAddr, class: &str, n: u64) {
    let (_, m) = admin_get(admin, "/metrics").await;
    let line = format!("edgepop_requests_total{{code=\"{class}\"}} {n}");
    assert!(m.lines().any(|l| l == line), "wanted {line}: {m}");
}

pub fn request(h2: bool, host: &str, path: &str) -> hyper::Request<Body> {
    let b = hyper::Request::builder();
    let b = if h2 {
        b.uri(format!("https://{host}{path}"))
            .version(hyper::Version::HTTP_2)
    } else {
        b.uri(path).header("host", host)
    };
    b.body(empty()).expect("request")
}

/// Plain-HTTP GET on the admin listener; returns status and body.
pub async fn admin_get(admin: SocketAddr, path: &str) -> (u16, String) {
    let tcp = TcpStream::connect(admin).await.expect("admin connect");
    let (mut send, conn) = http1::handshake(TokioIo::new(tcp)).await.expect("admin h1");
    tokio::spawn(conn);
    let req = hyper::Request::builder()
        .uri(path)
        .header("host", "admin")
        .body(empty())
        .expect("request");
    let resp = send.send_request(req).await.expect("admin response");
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    (status, String::from_utf8_lossy(&body).into_owned())
}

pub async fn pools_json(admin: SocketAddr) -> serde_json::Value {
    let (_, body) = admin_get(admin, "/pools").await;
    serde_json::from_str(&body).expect("pools JSON")
}

/// Polls `f` until it returns true or `limit` passes (no fixed sleeps).
/// Waits (up to 10 s) until the edge has no client connection open.
pub async fn no_client_connections(admin: SocketAddr) -> bool {
    eventually(Duration::from_secs(10), || async {
        let (_, m) = admin_get(admin, "/metrics").await;
        m.lines().any(|l| l == "edgepop_client_connections 0")
    })
    .await
}

pub async fn eventually<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs curl against the edge with the dev CA, resolving `host` to the edge address.
pub async fn curl(
    addr: SocketAddr,
    host: &str,
    path: &str,
    extra: &[&str],
) -> std::process::Output {
    let mut cmd = tokio::process::Command::new("curl");
    cmd.args(["-sS", "--cacert"])
        .arg(ca())
        .arg("--resolve")
        .arg(format!("{host}:{}:{}", addr.port(), addr.ip()))
        .args(extra)
        .arg(format!("https://{host}:{}{path}", addr.port()))
        .kill_on_drop(true);
    cmd.output().await.expect("curl runs")
}

pub fn write_file(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).expect("write");
    p
}

/// An `edgepop serve` child process; killed on drop.
pub struct EdgeProcess {
    pub child: tokio::process::Child,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
    pub dir: tempfile::TempDir,
}

impl EdgeProcess {
    pub fn pid(&self) -> u32 {
        self.child.id().expect("running")
    }

    /// Peak resident memory (VmHWM) in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmHWM")
    }
}

/// Starts `edgepop serve` on `config` and waits for its "listening"/"admin" lines.
pub async fn spawn_edge(config: &str) -> EdgeProcess {
    spawn_edge_with_env(config, &[]).await
}

/// [`spawn_edge`] with extra environment variables.
pub async fn spawn_edge_with_env(config: &str, env: &[(&str, &Path)]) -> EdgeProcess {
    use tokio::io::AsyncBufReadExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write_file(dir.path(), "edgepop.toml", config);
    let mut child = tokio::process::Command::new(bin())
        .arg("serve")
        .arg("--config")
        .arg(&path)
        .env("EDGEPOP_LOG", "warn")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn edgepop serve");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let (mut addr, mut admin) = (None, None);
    let found = tokio::time::timeout(Duration::from_secs(30), async {
        while let Ok(Some(line)) = lines.next_line().await {
            if let Some(a) = line.split("listening on https://").nth(1) {
                addr = a.trim().parse().ok();
            }
            if let Some(a) = line.split("admin on http://").nth(1) {
                admin = a.trim().parse().ok();
            }
            if addr.is_some() && admin.is_some() {
                return;
            }
        }
    })
    .await;
    assert!(found.is_ok(), "edgepop serve did not report its addresses");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    EdgeProcess {
        child,
        addr: addr.expect("listen address"),
        admin: admin.expect("admin address"),
        dir,
    }
}

/// Which origin (its `x-origin` header) answers a GET / for localhost on a new connection.
pub async fn served_by(addr: SocketAddr) -> String {
    let mut c = Client::connect(addr, "localhost", false).await;
    let resp = c.send(request(false, "localhost", "/")).await.unwrap();
    resp.headers()
        .get("x-origin")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// An address whose connects are refused for as long as the returned socket lives: bound,
/// not listening, so no parallel test can start listening on that port meanwhile.
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let s = tokio::net::TcpSocket::new_v4().expect("socket");
    s.bind("127.0.0.1:0".parse().expect("addr")).expect("bind");
    let addr = s.local_addr().expect("addr");
    (s, addr)
}

/// Sends `sig` ("HUP", "TERM") to a process.
pub fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill -{sig} {pid}");
}

/// Runs `edgepop latency-probe --json` with `args` against `https://localhost:PORT/` of the
/// edge at `addr` (dev CA, resolved to it); asserts it succeeded and returns the report.
pub async fn probe_json(addr: SocketAddr, args: &[&str]) -> serde_json::Value {
    let out = tokio::process::Command::new(bin())
        .arg("latency-probe")
        .args(args)
        .arg("--json")
        .arg("--cacert")
        .arg(ca())
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", addr.port()))
        .arg(format!("https://localhost:{}/", addr.port()))
        .kill_on_drop(true)
        .output()
        .await
        .expect("probe runs");
    assert!(out.status.success(), "{args:?}: {out:?}");
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// The length of a whole response body.
pub async fn body_len(resp: hyper::Response<hyper::body::Incoming>) -> usize {
    resp.into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes()
        .len()
}

/// A certificate chain as large as many real ones (a leaf naming `localhost` and 150 more
/// hosts, then its CA: about 5 KB), written to `dir`, with the roots that trust it.
pub struct BigChain {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub roots: rustls::RootCertStore,
    /// Bytes of DER in the chain.
    pub der_len: usize,
}

pub fn big_chain(dir: &Path) -> BigChain {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edgepop test CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let names: Vec<String> = std::iter::once("localhost".to_string())
        .chain((0..150).map(|i| format!("host-{i:03}.edgepop.test")))
        .collect();
    let leaf_key = rcgen::KeyPair::generate().expect("leaf key");
    let leaf = rcgen::CertificateParams::new(names)
        .expect("leaf")
        .signed_by(&leaf_key, &ca, &ca_key)
        .expect("leaf cert");
    let cert = write_file(dir, "big.crt", &format!("{}{}", leaf.pem(), ca.pem()));
    let key = write_file(dir, "big.key", &leaf_key.serialize_pem());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    BigChain {
        cert,
        key,
        roots,
        der_len: leaf.der().len() + ca.der().len(),
    }
}

impl BigChain {
    /// `config` (from `edge_config`) serving this chain instead of the dev certificate.
    pub fn serve_in(&self, config: &str) -> String {
        let c = certs();
        config
            .replace(
                &format!("{}/edge.crt", c.display()),
                &self.cert.display().to_string(),
            )
            .replace(
                &format!("{}/edge.key", c.display()),
                &self.key.display().to_string(),
            )
    }

    /// A client TLS config trusting this chain; `decompress`: offer certificate compression
    /// (RFC 8879; rustls offers brotli and zlib by default).
    pub fn client_config(&self, alpn: &[u8], decompress: bool) -> rustls::ClientConfig {
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(self.roots.clone())
        .with_no_client_auth();
        tls.alpn_protocols = vec![alpn.to_vec()];
        if !decompress {
            tls.cert_decompressors = Vec::new();
        }
        tls
    }

    /// A client TLS config offering certificate compression that notes the (compressed,
    /// decompressed) sizes of each certificate message it gets.
    pub fn recording_client_config(&self, alpn: &[u8]) -> (rustls::ClientConfig, Decompressed) {
        let mut tls = self.client_config(alpn, true);
        let seen = Decompressed::default();
        tls.cert_decompressors = rustls::compress::default_cert_decompressors()
            .iter()
            .map(|&inner| {
                let recording: &'static dyn rustls::compress::CertDecompressor =
                    Box::leak(Box::new(Recording {
                        inner,
                        seen: seen.clone(),
                    }));
                recording
            })
            .collect();
        (tls, seen)
    }
}

/// (compressed, decompressed) sizes of the certificate messages a client took in.
pub type Decompressed = Arc<std::sync::Mutex<Vec<(usize, usize)>>>;

#[derive(Debug)]
struct Recording {
    inner: &'static dyn rustls::compress::CertDecompressor,
    seen: Decompressed,
}

impl rustls::compress::CertDecompressor for Recording {
    fn decompress(
        &self,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<(), rustls::compress::DecompressionFailed> {
        self.seen
            .lock()
            .expect("lock")
            .push((input.len(), output.len()));
        self.inner.decompress(input, output)
    }

    fn algorithm(&self) -> rustls::CertificateCompressionAlgorithm {
        self.inner.algorithm()
    }
}

pin_project_lite::pin_project! {
    /// A stream that counts the bytes read from it.
    pub struct Counting<S> {
        #[pin]
        inner: S,
        pub read: Arc<std::sync::atomic::AtomicUsize>,
    }
}

impl<S> Counting<S> {
    pub fn new(inner: S) -> Self {
        Counting {
            inner,
            read: Arc::default(),
        }
    }
}

impl<S: tokio::io::AsyncRead> tokio::io::AsyncRead for Counting<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let before = buf.filled().len();
        let r = this.inner.poll_read(cx, buf);
        let n = buf.filled().len() - before;
        this.read.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        r
    }
}

impl<S: tokio::io::AsyncWrite> tokio::io::AsyncWrite for Counting<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
}

/// A TLS acceptor with the origin certificate (certs/origin.*), offering `alpn`: for test
/// origins of our own making.
pub fn origin_tls(alpn: &[&[u8]]) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    let chain = edgepop::tls::certs::load_chain(&certs().join("origin.crt")).expect("chain");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(certs().join("origin.key")).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(edgepop::tls::provider_arc())
        .with_protocol_versions(edgepop::tls::VERSIONS)
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(cfg))
}
