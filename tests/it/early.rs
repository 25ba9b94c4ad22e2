//! TLS 1.3 0-RTT at the edge (`[pop] early_data = true`): a resuming client's safe request
//! rides in its first flight and reaches the origin marked `Early-Data: 1`; an unsafe one
//! gets 425; a replayed first flight is not served again; ordinary clients are unaffected.

use crate::support::*;
use http_body_util::BodyExt;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;

fn early_config(origin: SocketAddr) -> String {
    edge_config(&[("o1", origin, "warm_connections = 1")], &["localhost"])
        .replace(
            "name = \"test1\"\n",
            "name = \"test1\"\nearly_data = true\n",
        )
        .replace(
            "address = \"127.0.0.1:0\"\n\n[[certificates]]",
            "address = \"127.0.0.1:0\"\nhandshake_timeout = \"2s\"\n\n[[certificates]]",
        )
}

fn client_config(alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
    let roots = edgepop::tls::certs::load_roots(&ca()).expect("dev CA");
    let mut cfg = edgepop::tls::client::client_config_with_roots(roots, alpn);
    cfg.resumption = rustls::client::Resumption::in_memory_sessions(16);
    cfg.enable_early_data = true;
    Arc::new(cfg)
}

/// The client's socket: records what the client writes (its first flight, to replay) and
/// holds back what the server sends until `open`, so the client cannot finish its handshake
/// (its Finished answers the server's flight) before the edge has acted on the early data.
struct Gated {
    tcp: TcpStream,
    written: Arc<Mutex<Vec<u8>>>,
    open: Arc<AtomicBool>,
    waker: Arc<futures_util::task::AtomicWaker>,
}

#[derive(Clone)]
struct Gate {
    written: Arc<Mutex<Vec<u8>>>,
    open: Arc<AtomicBool>,
    waker: Arc<futures_util::task::AtomicWaker>,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, Ordering::SeqCst);
        self.waker.wake();
    }

    fn written(&self) -> Vec<u8> {
        self.written.lock().expect("lock").clone()
    }
}

fn gated(tcp: TcpStream) -> (Gated, Gate) {
    let gate = Gate {
        written: Arc::default(),
        open: Arc::default(),
        waker: Arc::default(),
    };
    let g = Gated {
        tcp,
        written: gate.written.clone(),
        open: gate.open.clone(),
        waker: gate.waker.clone(),
    };
    (g, gate)
}

impl AsyncRead for Gated {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.waker.register(cx.waker());
        if !self.open.load(Ordering::SeqCst) {
            return Poll::Pending;
        }
        Pin::new(&mut self.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for Gated {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.tcp).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written
                .lock()
                .expect("lock")
                .extend_from_slice(&buf[..n]);
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.tcp).poll_shutdown(cx)
    }
}

/// A full handshake and one request, so the client holds a session to resume with 0-RTT.
async fn take_a_session(addr: SocketAddr, cfg: &Arc<rustls::ClientConfig>) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .connect(name, tcp)
        .await
        .expect("TLS");
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await.expect("read");
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

/// What a 0-RTT exchange saw.
struct Exchange {
    accepted: bool,
    response: String,
    first_flight: Vec<u8>,
}

/// A resumed TLS connection offering 0-RTT, whose handshake waits behind `Gate`.
async fn early_connect(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
) -> (tokio_rustls::client::TlsStream<Gated>, Gate) {
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let (io, gate) = gated(tcp);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .early_data(true)
        .connect(name, io)
        .await
        .expect("TLS");
    assert!(
        tls.get_ref().1.is_handshaking(),
        "no 0-RTT offered: no session to resume"
    );
    (tls, gate)
}

/// Sends `request` (http/1.1, ending in `connection: close`) as early data on a resumed
/// connection; lets the handshake finish only once `edge_acted` says the edge has answered
/// or forwarded it.
async fn early_exchange<F, Fut>(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    request: &'static [u8],
    edge_acted: F,
) -> Exchange
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (mut tls, gate) = early_connect(addr, cfg).await;
    // The write only queues early data; the flush sends it and then completes the handshake,
    // which needs the server's flight: it runs on while the gate is closed.
    tls.write_all(request).await.expect("early write");
    let exchange = tokio::spawn(async move {
        tls.flush().await.expect("flush");
        let mut out = Vec::new();
        let _ = tls.read_to_end(&mut out).await;
        (tls.get_ref().1.is_early_data_accepted(), out)
    });
    assert!(
        eventually(Duration::from_secs(10), edge_acted).await,
        "the edge did not act on the early data before the handshake completed"
    );
    let first_flight = gate.written();
    gate.open();
    let (accepted, out) = exchange.await.expect("exchange");
    Exchange {
        accepted,
        response: String::from_utf8_lossy(&out).into_owned(),
        first_flight,
    }
}

async fn metric(admin: SocketAddr, line: &str) -> bool {
    let (_, m) = admin_get(admin, "/metrics").await;
    m.lines().any(|l| l == line)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_safe_request_in_early_data_is_forwarded_before_the_handshake_ends_and_a_replay_is_not() {
    let origin = origin().start().await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("access.log");
    let edge = start_edge(&early_config(origin.addr()).replacen(
        "name = \"test1\"\n",
        &format!(
            "name = \"test1\"\naccess_log = {:?}\n",
            log_path.display().to_string()
        ),
        1,
    ))
    .await;
    let seen = || origin.stats().requests.load(Ordering::SeqCst);
    let cfg = client_config(&[b"http/1.1"]);
    take_a_session(edge.addr, &cfg).await;
    let before = seen();
    let ex = early_exchange(
        edge.addr,
        &cfg,
        // `early-data` in Connection: the client may not strip the mark meant for the origin.
        b"GET /headers HTTP/1.1\r\nhost: localhost\r\nconnection: close, early-data\r\n\r\n",
        || async { seen() > before },
    )
    .await;
    assert!(ex.accepted, "the edge rejected the early data");
    assert!(ex.response.starts_with("HTTP/1.1 200"), "{}", ex.response);
    assert!(
        ex.response.contains("early-data: 1\n"),
        "the origin was not told the request came early:\n{}",
        ex.response
    );
    assert_eq!(seen(), before + 1);
    assert!(
        metric(
            edge.admin,
            "edgepop_early_data_requests_total{outcome=\"forwarded\"} 1"
        )
        .await
    );
    // The session's first handshake was full, the 0-RTT one is timed as early.
    for kind in ["full", "early"] {
        let line = format!("edgepop_client_handshake_seconds_count{{kind=\"{kind}\"}} 1");
        assert!(metric(edge.admin, &line).await, "{line}");
    }
    // The access log says which request came early.
    let lines = || -> Vec<serde_json::Value> {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("JSON line"))
            .collect()
    };
    assert!(eventually(Duration::from_secs(5), || async { lines().len() == 2 }).await);
    let logged = lines();
    assert_eq!(
        logged[0]["early_data"],
        serde_json::Value::Null,
        "{logged:?}"
    );
    assert_eq!(logged[1]["path"], "/headers");
    assert_eq!(logged[1]["early_data"], true, "{logged:?}");
    assert_eq!(logged[0]["tls_handshake"], "full", "{logged:?}");
    assert_eq!(logged[1]["tls_handshake"], "early", "{logged:?}");

    // The same first flight sent again (an attacker replaying it): the session it resumes was
    // used up, so the handshake starts afresh, the early data is dropped, and the edge gives
    // up on the connection when its handshake times out. Either way the connection ends; an
    // accepted replay would have been answered (and counted by the origin) before that.
    let mut raw = TcpStream::connect(edge.addr).await.expect("connect");
    raw.write_all(&ex.first_flight).await.expect("replay");
    let mut sink = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), raw.read_to_end(&mut sink)).await;
    assert_eq!(
        seen(),
        before + 1,
        "the replayed request reached the origin"
    );
    assert!(
        metric(
            edge.admin,
            "edgepop_early_data_requests_total{outcome=\"forwarded\"} 1"
        )
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsafe_request_in_early_data_gets_425_and_never_reaches_the_origin() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&early_config(origin.addr())).await;
    let seen = || origin.stats().requests.load(Ordering::SeqCst);
    let cfg = client_config(&[b"http/1.1"]);
    take_a_session(edge.addr, &cfg).await;
    let before = seen();
    let admin = edge.admin;
    let ex = early_exchange(
        edge.addr,
        &cfg,
        b"POST /echo HTTP/1.1\r\nhost: localhost\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello",
        || async move {
            metric(
                admin,
                "edgepop_early_data_requests_total{outcome=\"too_early\"} 1",
            )
            .await
        },
    )
    .await;
    assert!(ex.accepted);
    assert!(ex.response.starts_with("HTTP/1.1 425"), "{}", ex.response);
    assert_eq!(
        seen(),
        before,
        "the origin saw a request sent in early data"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_early_data_on_ordinary_clients_stream_both_ways_over_h1_and_h2() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&early_config(origin.addr())).await;
    for h2 in [true, false] {
        let mut c = Client::connect(edge.addr, "localhost", h2).await;
        assert_eq!(c.get("localhost", "/").await.0, 200);
        // 8 MiB down and 8 MiB up and back: the edge's own TLS stream under flow control.
        let resp = c
            .send(request(h2, "localhost", "/bytes/8388608"))
            .await
            .expect("response");
        assert_eq!(body_len(resp).await, 8 << 20, "h2={h2}");
        let chunks = (0..128).map(|_| {
            Ok::<_, io::Error>(hyper::body::Frame::data(bytes::Bytes::from(vec![
                b'u';
                64 * 1024
            ])))
        });
        let body = BodyExt::boxed(http_body_util::StreamBody::new(futures_util::stream::iter(
            chunks,
        )));
        let mut req = request(h2, "localhost", "/echo");
        *req.method_mut() = hyper::Method::POST;
        *req.body_mut() = body;
        let resp = c.send(req).await.expect("echo");
        assert_eq!(resp.status(), 200);
        assert_eq!(body_len(resp).await, 8 << 20, "h2={h2}");
    }
    for http in ["--http1.1", "--http2"] {
        let out = curl(
            edge.addr,
            "localhost",
            "/",
            &[http, "-o", "/dev/null", "-w", "%{http_code}"],
        )
        .await;
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "{http}: {out:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_probe_sends_its_requests_as_0rtt_over_h1_and_h2() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&early_config(origin.addr())).await;
    for http in ["--http1", "--http2"] {
        let report = probe_json(edge.addr, &["--mode", "early", "-n", "4", http]).await;
        let t = &report["targets"][0];
        assert_eq!(report["mode"], "early");
        assert_eq!(t["ok"], 4, "{http}: {t}");
        // Each 0-RTT connection uses up a single-use session, and the probe closes it right
        // after the answer, maybe before the new tickets arrive: under load a sample may
        // have none left and do a full handshake. Most go as 0-RTT, and the count is honest.
        let early = t["early_data"].as_u64().expect("early_data count");
        assert!(early >= 2, "{http}: too few samples went as 0-RTT: {t}");
        let flagged = t["samples"]
            .as_array()
            .expect("samples")
            .iter()
            .filter(|s| s["sample"]["tls_info"]["early_data"] == true)
            .count() as u64;
        assert_eq!(early, flagged, "{t}");
        let alpn = if http == "--http2" { "h2" } else { "http/1.1" };
        assert_eq!(t["tls"]["alpn"], alpn, "{t}");
    }
}

#[test]
fn early_data_with_shared_ticket_keys_is_refused_at_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let keys = write_file(
        dir.path(),
        "ticket.keys",
        "00112233445566778899aabbccddeeff000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\n",
    );
    let text = edge_config(
        &[("o1", "127.0.0.1:1".parse().unwrap(), "")],
        &["localhost"],
    )
    .replace(
        "name = \"test1\"\n",
        &format!(
            "name = \"test1\"\nticket_keys = \"{}\"\nearly_data = true\n",
            keys.display()
        ),
    );
    let path = write_file(dir.path(), "edgepop.toml", &text);
    let err = edgepop::config::load(&path).unwrap_err().to_string();
    assert!(err.contains("edgepop.toml:4:"), "{err}");
    assert!(
        err.contains("early_data cannot be combined with ticket_keys"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_early_data_but_never_its_finished_is_dropped_after_the_handshake_timeout(
) {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&early_config(origin.addr())).await;
    let seen = || origin.stats().requests.load(Ordering::SeqCst);
    let cfg = client_config(&[b"http/1.1"]);
    take_a_session(edge.addr, &cfg).await;
    let before = seen();
    let tcp = TcpStream::connect(edge.addr).await.expect("connect");
    let (io, _gate) = gated(tcp);
    let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(cfg.clone())
        .early_data(true)
        .connect(name, io)
        .await
        .expect("TLS");
    tls.write_all(b"GET / HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("early write");
    // The gate stays closed: the client never sees the server's flight, never sends Finished.
    let stuck = tokio::spawn(async move {
        let _ = tls.flush().await;
        tls
    });
    assert!(eventually(Duration::from_secs(10), || async { seen() > before }).await);
    // Served (a safe request), then dropped once handshake_timeout (2 s) has passed.
    assert!(
        no_client_connections(edge.admin).await,
        "the connection without a Finished is still open"
    );
    stuck.abort();
}

/// Sends one h2 request as early data on a resumed connection (the client's handshake held
/// back as in `early_exchange`) and returns the status and body once `edge_acted`.
async fn early_h2_exchange<F, Fut>(
    addr: SocketAddr,
    cfg: &Arc<rustls::ClientConfig>,
    req: hyper::Request<Body>,
    edge_acted: F,
) -> (u16, String)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (tls, gate) = early_connect(addr, cfg).await;
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tls),
    )
    .await
    .expect("h2 handshake");
    let driver = tokio::spawn(conn);
    let exchange = tokio::spawn(async move {
        let resp = send.send_request(req).await.expect("response");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    });
    assert!(
        eventually(Duration::from_secs(10), edge_acted).await,
        "the edge did not act on the h2 early data before the handshake completed"
    );
    gate.open();
    let out = exchange.await.expect("exchange");
    driver.abort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_h2_a_get_in_early_data_is_forwarded_marked_and_a_post_gets_425() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&early_config(origin.addr())).await;
    let seen = || origin.stats().requests.load(Ordering::SeqCst);
    let cfg = client_config(&[b"h2"]);
    // A session to resume (h2, the ALPN the early data must use again).
    let mut c = Client::connect_with(edge.addr, "localhost", cfg.clone()).await;
    assert_eq!(c.get("localhost", "/").await.0, 200);
    drop(c);

    let before = seen();
    let (status, body) = early_h2_exchange(
        edge.addr,
        &cfg,
        request(true, "localhost", "/headers"),
        || async { seen() > before },
    )
    .await;
    assert_eq!(status, 200);
    assert!(body.contains("early-data: 1\n"), "{body}");

    let admin = edge.admin;
    let mut post = request(true, "localhost", "/echo");
    *post.method_mut() = hyper::Method::POST;
    *post.body_mut() = http_body_util::Full::new(bytes::Bytes::from_static(b"hello"))
        .map_err(|never| match never {})
        .boxed();
    let before = seen();
    let (status, _) = early_h2_exchange(edge.addr, &cfg, post, || async move {
        metric(
            admin,
            "edgepop_early_data_requests_total{outcome=\"too_early\"} 1",
        )
        .await
    })
    .await;
    assert_eq!(status, 425);
    assert_eq!(seen(), before, "the origin saw a POST sent in early data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_that_early_data_is_on() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(
        dir.path(),
        "edgepop.toml",
        &early_config("127.0.0.1:9".parse().unwrap()),
    );
    let out = tokio::process::Command::new(bin())
        .arg("check")
        .arg("--config")
        .arg(&path)
        .kill_on_drop(true)
        .output()
        .await
        .expect("check runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("pop test1 (TLS resumption: per-instance sessions, 0-RTT early data on)"),
        "{stdout}"
    );
}
