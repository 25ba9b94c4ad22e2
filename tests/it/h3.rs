//! HTTP/3 at the edge (`[[listeners]] http3 = true`), driven by a real HTTP/3 client (hyperium's
//! h3 over quinn): requests reach the origin and bodies stream both ways; TCP answers carry
//! Alt-Svc; the proxy's rules (routing, errors) are the same as over TCP.

use crate::support::*;
use bytes::{Buf, Bytes};
use std::net::SocketAddr;
use std::sync::Arc;

fn h3_config(origin: SocketAddr) -> String {
    let config = edge_config(&[("o1", origin, "warm_connections = 1")], &["localhost"]);
    with_listener_line(&config, "http3 = true")
}

struct H3Client {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: tokio::task::JoinHandle<()>,
    _endpoint: quinn::Endpoint,
}

impl Drop for H3Client {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

async fn h3_connect(addr: SocketAddr) -> H3Client {
    let endpoint = h3_endpoint(false);
    early_connect(&endpoint, addr, false).await
}

/// A QUIC client endpoint trusting the dev CA (ALPN h3); with `early`, it keeps sessions
/// and offers 0-RTT.
fn h3_endpoint(early: bool) -> quinn::Endpoint {
    let roots = edgepop::tls::certs::load_roots(&ca()).expect("dev CA");
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    tls.enable_early_data = early;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("addr")).expect("UDP");
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    endpoint
}

/// One request; returns status, the `x-origin` header and the body.
async fn h3_request(
    c: &mut H3Client,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> (u16, String, Vec<u8>) {
    let req = http::Request::builder()
        .method(method)
        .uri(format!("https://localhost{path}"))
        .body(())
        .expect("request");
    h3_send(c, req, body).await
}

async fn h3_send(
    c: &mut H3Client,
    req: http::Request<()>,
    body: Option<Vec<u8>>,
) -> (u16, String, Vec<u8>) {
    let mut stream = c.send.send_request(req).await.expect("send request");
    if let Some(b) = body {
        for chunk in b.chunks(64 * 1024) {
            stream
                .send_data(Bytes::copy_from_slice(chunk))
                .await
                .expect("send body");
        }
    }
    stream.finish().await.expect("finish");
    let resp = stream.recv_response().await.expect("response");
    let origin = resp
        .headers()
        .get("x-origin")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mut out = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.expect("body") {
        while chunk.has_remaining() {
            let n = chunk.chunk().len();
            out.extend_from_slice(chunk.chunk());
            chunk.advance(n);
        }
    }
    (resp.status().as_u16(), origin, out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_clients_reach_the_origin_and_bodies_stream_both_ways() {
    let origin = origin().name("o1").start().await.unwrap();
    let edge = start_edge(&h3_config(origin.addr())).await;
    let mut c = h3_connect(edge.addr).await;
    let (status, served_by, body) = h3_request(&mut c, "GET", "/", None).await;
    assert_eq!((status, served_by.as_str()), (200, "o1"));
    assert_eq!(body, b"hello\n");
    // Several requests on the one connection, a large download and an upload echoed back.
    let (status, _, body) = h3_request(&mut c, "GET", "/bytes/4194304", None).await;
    assert_eq!((status, body.len()), (200, 4 << 20));
    let upload = vec![b'u'; 3 << 20];
    let (status, _, body) = h3_request(&mut c, "POST", "/echo", Some(upload.clone())).await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), upload.len());
    // The origin sees the HTTP/3 client like any other: Via names the protocol.
    let (_, _, headers) = h3_request(&mut c, "GET", "/headers", None).await;
    let headers = String::from_utf8_lossy(&headers);
    assert!(headers.contains("via: 3 "), "{headers}");
    // Same rules as TCP: a host no route serves gets 421.
    let req = http::Request::builder()
        .uri("https://elsewhere.example/")
        .body(())
        .expect("request");
    let mut stream = c.send.send_request(req).await.expect("send");
    stream.finish().await.expect("finish");
    assert_eq!(
        stream.recv_response().await.expect("response").status(),
        421
    );
    let (_, m) = admin_get(edge.admin, "/metrics").await;
    assert!(
        m.lines().any(|l| l == "edgepop_client_connections 1"),
        "the HTTP/3 connection is counted:\n{m}"
    );
    assert!(
        m.lines()
            .any(|l| l == "edgepop_client_handshake_seconds_count{kind=\"quic\"} 1"),
        "the QUIC handshake is timed:\n{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_answers_advertise_http3_on_the_same_port() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&h3_config(origin.addr())).await;
    for http in ["--http1.1", "--http2"] {
        let out = curl(
            edge.addr,
            "localhost",
            "/",
            &[http, "-sS", "-D", "-", "-o", "/dev/null"],
        )
        .await;
        let head = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(
            head.contains(&format!("alt-svc: h3=\":{}\"; ma=86400", edge.addr.port())),
            "{http}: {head}"
        );
    }
    // Without http3, no advertisement.
    let plain = start_edge(&edge_config(
        &[("o1", origin.addr(), "warm_connections = 1")],
        &["localhost"],
    ))
    .await;
    let out = curl(
        plain.addr,
        "localhost",
        "/",
        &["-sS", "-D", "-", "-o", "/dev/null"],
    )
    .await;
    assert!(!String::from_utf8_lossy(&out.stdout)
        .to_ascii_lowercase()
        .contains("alt-svc"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_an_http3_request_in_flight_finish() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&h3_config(origin.addr())).await;
    let seen = || {
        origin
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let before = seen();
    let mut c = h3_connect(edge.addr).await;
    let slow = tokio::spawn(async move { h3_request(&mut c, "GET", "/delay/1500", None).await });
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            seen() > before
        })
        .await
    );
    edge.server.drain().await;
    let (status, _, body) = slow.await.expect("request task");
    assert_eq!((status, body.as_slice()), (200, &b"delayed\n"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn latency_probe_measures_http3_cold_and_warm() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&h3_config(origin.addr())).await;
    for mode in ["cold", "warm"] {
        let report = probe_json(edge.addr, &["--http3", "--mode", mode, "-n", "3"]).await;
        let t = &report["targets"][0];
        assert_eq!(t["ok"], 3, "{mode}: {t}");
        assert_eq!(t["http"], "HTTP/3", "{t}");
        assert_eq!(t["tls"]["alpn"], "h3", "{t}");
        let sample = &t["samples"][0]["sample"];
        // No TCP: the QUIC handshake is the tls phase (cold), nothing at all (warm).
        assert!(sample["connect_ms"].is_null(), "{sample}");
        assert_eq!(sample["tls_ms"].is_null(), mode == "warm", "{sample}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http3_enforces_the_tcp_sides_limits() {
    let origin = origin().start().await.unwrap();
    // Short, for the idle check at the end; long enough that a loaded machine's pauses
    // between this test's requests do not pass for idleness (300 ms did, once, with two test
    // suites running at once).
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("access.log");
    let config = h3_config(origin.addr()).replacen(
        "http3 = true\n",
        "http3 = true\nidle_timeout = \"1500ms\"\n",
        1,
    );
    let edge = start_edge(&crate::edge::with_access_log(&config, &log)).await;
    let mut c = h3_connect(edge.addr).await;
    // CONNECT is refused as over TCP: edgepop is no forward proxy.
    let req = http::Request::builder()
        .method("CONNECT")
        .uri("localhost:443")
        .body(())
        .expect("request");
    let mut stream = c.send.send_request(req).await.expect("send");
    stream.finish().await.expect("finish");
    assert_eq!(
        stream.recv_response().await.expect("response").status(),
        405
    );
    // A header section over 64 KiB gets no answer from the origin.
    let before = origin
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::SeqCst);
    let req = http::Request::builder()
        .uri("https://localhost/")
        .header("x-big", "a".repeat(70_000))
        .body(())
        .expect("request");
    let mut c2 = h3_connect(edge.addr).await;
    let sent = async {
        let mut stream = c2.send.send_request(req).await?;
        stream.finish().await?;
        stream.recv_response().await
    };
    // Under where the h3 layer would refuse it (128 KiB), so the edge's handler answers.
    let resp = sent.await.expect("an answer");
    assert_eq!(
        resp.status(),
        431,
        "a 70,000-byte header section was answered"
    );
    // Logged with its request, as over h2.
    let refused = || {
        crate::edge::log_lines(&log)
            .into_iter()
            .find(|l| l["status"] == 431)
    };
    assert!(
        eventually(std::time::Duration::from_secs(5), || async {
            refused().is_some()
        })
        .await,
        "{:?}",
        std::fs::read_to_string(&log)
    );
    let line = refused().unwrap();
    assert_eq!(line["protocol"], "HTTP/3", "{line}");
    assert_eq!(
        (&line["method"], &line["path"]),
        (&"GET".into(), &"/".into()),
        "{line}"
    );
    assert_eq!(line["outcome"], "header section too large", "{line}");
    assert_eq!(
        origin
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    drop(c2);
    // A body shorter than its Content-Length is not passed on as if whole: either a 400
    // (found before the origin answered) or the answer's stream reset (the echo had begun).
    let req = http::Request::builder()
        .method("POST")
        .uri("https://localhost/echo")
        .header("content-length", "10")
        .body(())
        .expect("request");
    let exchange = async {
        let mut stream = c.send.send_request(req).await?;
        stream.send_data(Bytes::from_static(b"hello")).await?;
        stream.finish().await?;
        let status = stream.recv_response().await?.status();
        let mut n = 0;
        while let Some(chunk) = stream.recv_data().await? {
            n += chunk.remaining();
        }
        Ok::<_, h3::error::StreamError>((status, n))
    };
    match exchange.await {
        Ok((status, _)) => assert_eq!(status, 400),
        Err(e) => assert!(e.to_string().contains("H3_INTERNAL_ERROR"), "{e}"),
    }
    // Idle (no request in flight) for idle_timeout: the connection is closed by the edge,
    // whatever QUIC keep-alives say.
    assert_eq!(h3_request(&mut c, "GET", "/", None).await.0, 200);
    assert!(
        no_client_connections(edge.admin).await,
        "an idle HTTP/3 connection stayed open"
    );
}

/// An HTTP/3 connection through `addr`; with `early`, usable at once (0-RTT) when the
/// session allows, else after the handshake.
async fn early_connect(endpoint: &quinn::Endpoint, addr: SocketAddr, early: bool) -> H3Client {
    let connecting = endpoint.connect(addr, "localhost").expect("connect");
    let conn = if early {
        match connecting.into_0rtt() {
            Ok((c, _)) => c,
            Err(_) => panic!("no 0-RTT offered: no session to resume"),
        }
    } else {
        connecting.await.expect("QUIC handshake")
    };
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .expect("h3 setup");
    let driver = tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    H3Client {
        send,
        driver,
        _endpoint: endpoint.clone(),
    }
}

/// A client endpoint holding a session to resume with `edge` (tickets read: they come after
/// the handshake), and a long path to it: the edge acts on a 0-RTT request (it comes with the
/// client's first flight) a full round trip, 500 ms, before the client's Finished can arrive.
async fn resumable_over_a_long_path(edge: &TestEdge) -> (edgepop::wan::UdpRelay, quinn::Endpoint) {
    let path = edgepop::wan::UdpRelay::start(
        "127.0.0.1:0".parse().unwrap(),
        edge.addr,
        std::time::Duration::from_millis(250),
    )
    .await
    .unwrap();
    let endpoint = h3_endpoint(true);
    let mut c = early_connect(&endpoint, edge.addr, false).await;
    assert_eq!(h3_request(&mut c, "GET", "/", None).await.0, 200);
    assert_eq!(h3_request(&mut c, "GET", "/", None).await.0, 200);
    (path, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http3_0rtt_a_get_is_forwarded_marked_and_a_post_gets_425() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&h3_config(origin.addr()).replace(
        "name = \"test1\"\n",
        "name = \"test1\"\nearly_data = true\n",
    ))
    .await;
    let (path, endpoint) = resumable_over_a_long_path(&edge).await;
    let seen = || {
        origin
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::SeqCst)
    };
    let mut c = early_connect(&endpoint, path.local_addr(), true).await;
    let (status, _, body) = h3_request(&mut c, "GET", "/headers", None).await;
    assert_eq!(status, 200);
    let body = String::from_utf8_lossy(&body);
    assert!(body.contains("early-data: 1\n"), "{body}");
    drop(c);

    let before = seen();
    let mut c = early_connect(&endpoint, path.local_addr(), true).await;
    let (status, _, _) = h3_request(&mut c, "POST", "/echo", Some(b"hello".to_vec())).await;
    assert_eq!(status, 425);
    assert_eq!(seen(), before, "the origin saw a POST sent in 0-RTT");
    let (_, m) = admin_get(edge.admin, "/metrics").await;
    assert!(
        m.lines()
            .any(|l| l == "edgepop_early_data_requests_total{outcome=\"too_early\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http3_too_certificates_go_compressed_to_clients_that_offer_it() {
    let dir = tempfile::tempdir().unwrap();
    let chain = big_chain(dir.path());
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&chain.serve_in(&h3_config(origin.addr()))).await;
    let handshake = |tls: rustls::ClientConfig| async move {
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).unwrap();
        let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let conn = endpoint.connect(edge.addr, "localhost").unwrap().await;
        assert!(conn.is_ok(), "{conn:?}");
    };
    // (Packet counts would vary with retransmissions; the certificate message does not.)
    let (tls, seen) = chain.recording_client_config(b"h3");
    handshake(tls).await;
    let seen = seen.lock().unwrap().clone();
    assert_eq!(
        seen.len(),
        1,
        "one compressed certificate message: {seen:?}"
    );
    let (compressed, whole) = seen[0];
    assert!(whole > chain.der_len, "{whole} bytes for {}", chain.der_len);
    assert!(compressed * 2 < whole, "{compressed} bytes for {whole}");
    // A client that does not offer it gets the chain as it is.
    handshake(chain.client_config(b"h3", false)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http3_0rtt_requests_on_a_rate_limited_route_get_425_until_the_handshake() {
    let origin = origin().start().await.unwrap();
    let config = h3_config(origin.addr())
        .replace(
            "name = \"test1\"\n",
            "name = \"test1\"\nearly_data = true\n",
        )
        .replace(
            "origins = [\"o1\"]\n",
            "origins = [\"o1\"]\nrate_limit = { requests = 100, per = \"1s\" }\n",
        );
    assert!(config.contains("rate_limit"), "{config}");
    let edge = start_edge(&config).await;
    let (path, endpoint) = resumable_over_a_long_path(&edge).await;
    // Even a GET: its client's address is not proven yet, so it is neither charged nor let by.
    let mut c = early_connect(&endpoint, path.local_addr(), true).await;
    assert_eq!(h3_request(&mut c, "GET", "/", None).await.0, 425);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_http3_connection_specific_fields_are_a_bad_request() {
    // RFC 9114 4.2 (the h3 crate lets them through): a transfer coding would reach the origin
    // stripped, its bytes taken as plain.
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&h3_config(origin.addr())).await;
    let mut c = h3_connect(edge.addr).await;
    for (name, value) in [
        ("transfer-encoding", "gzip"),
        ("connection", "close"),
        ("te", "gzip"),
    ] {
        let req = http::Request::builder()
            .uri("https://localhost/headers")
            .header(name, value)
            .body(())
            .expect("request");
        assert_eq!(h3_send(&mut c, req, None).await.0, 400, "{name}");
    }
    let req = http::Request::builder()
        .uri("https://localhost/headers")
        .header("te", "trailers")
        .body(())
        .expect("request");
    assert_eq!(h3_send(&mut c, req, None).await.0, 200);
}
