//! What a black-box audit against nginx and HAProxy found the edge passing on and RFC 9110,
//! 9112 and 9113 forbid: split cookies to http/1.1 origins, transfer codings it cannot
//! apply, a second Host, header sections past 64 KiB, bodies on HEAD answers over h2,
//! h2c upgrades, a 101 to a protocol nobody asked for, padded h2 values; and the
//! `Forwarded` element an origin can trust, and http/1.1 heads hyper refuses itself going
//! unlogged.

use super::*;

/// The header lines `/headers` of the demo origin saw, lower-cased.
fn seen(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).to_ascii_lowercase()
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn split_cookies_reach_an_http1_origin_as_one_field_and_forwarded_gets_the_edges_element() {
    let (_origin, edge) = one_origin_edge("protocol = \"http1\"").await;
    let args = [
        "--http2",
        "-H",
        "Cookie: a=1",
        "-H",
        "Cookie: b=2",
        "-H",
        "Forwarded: for=9.9.9.9;proto=http",
    ];
    let body = seen(&curl(edge.addr, "localhost", "/headers", &args).await);
    assert!(body.contains("cookie: a=1; b=2\n"), "{body}");
    assert_eq!(body.matches("cookie:").count(), 1, "{body}");
    // The client's element stays (as X-Forwarded-For's do); the last one is the edge's.
    let forwarded: Vec<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("forwarded: "))
        .collect();
    assert_eq!(
        forwarded,
        ["for=9.9.9.9;proto=http", "for=127.0.0.1;proto=https"],
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_transfer_codings_a_second_host_and_oversized_heads_are_refused() {
    let (_origin, edge) = one_origin_edge("protocol = \"http1\"").await;
    let gzip = raw_exchange(
        edge.addr,
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: gzip, chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&gzip), 501, "{gzip}");
    // Chunked twice: hyper takes one layer off, the origin would take the other as content.
    let twice = raw_exchange(
        edge.addr,
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked, chunked\r\nConnection: close\r\n\r\n14\r\n5\r\nhello\r\n0\r\n\r\n\r\n0\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&twice), 400, "{twice}");
    let two_hosts = raw_exchange(
        edge.addr,
        b"GET /headers HTTP/1.1\r\nHost: localhost\r\nHost: other.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&two_hosts), 400, "{two_hosts}");
    // 64 KiB of header section, over http/1.1 and h2 alike (hyper's own limits were about
    // 400 KiB and 16 KiB).
    for (size, want) in [(60_000usize, 200u16), (70_000, 431)] {
        let big = format!("X-Big: {}", "a".repeat(size));
        let h1 = raw_exchange(
            edge.addr,
            format!(
                "GET /headers HTTP/1.1\r\nHost: localhost\r\n{big}\r\nConnection: close\r\n\r\n"
            )
            .as_bytes(),
        )
        .await;
        assert_eq!(status_of(&h1), want, "http/1.1, {size} bytes");
        let out = curl(
            edge.addr,
            "localhost",
            "/headers",
            &[
                "--http2",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-H",
                &big,
            ],
        )
        .await;
        // Over h2, curl (nghttp2) sends no header block over 64 KiB: it gives up itself (the
        // edge's 431 over h2 is tested below with a client that sends it).
        let code = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            code == "200",
            want == 200,
            "h2, {size} bytes: {code} {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_over_h2_gets_the_head_only_from_the_origin_and_from_the_edge() {
    let (_origin, edge) = one_origin_edge("protocol = \"h2\"").await;
    for (host, path, status) in [
        ("localhost", "/bytes/1000", "200"),
        // An origin that sends a body anyway (hyper's h2 server sends what it is given).
        ("localhost", "/bytes/1000?body-on-head", "200"),
        ("unknown.example", "/", "421"),
    ] {
        let authority = format!("Host: {host}");
        let out = curl(
            edge.addr,
            "localhost",
            path,
            &[
                "--http2",
                "-I",
                "-H",
                &authority,
                "-w",
                "%{http_code} %{size_download}",
            ],
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        assert!(
            out.status.success(),
            "{host}: curl failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.ends_with(&format!("{status} 0")), "{host}: {text}");
        if status == "200" {
            assert!(text.contains("content-length: 1000"), "{text}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_ignored_and_a_101_to_an_unasked_protocol_is_a_502() {
    let (_origin, edge) = one_origin_edge("protocol = \"http1\"").await;
    let h2c = raw_exchange(
        edge.addr,
        b"GET /headers HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade, HTTP2-Settings, close\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert_eq!(status_of(&h2c), 200, "{h2c}");
    let (_, body) = h2c.split_once("\r\n\r\n").expect("a body");
    assert!(
        !body.contains("upgrade") && !body.contains("http2-settings"),
        "{body}"
    );
    // h2c among other protocols: only the others reach the origin (which echoes them).
    let mixed = raw_exchange(
        edge.addr,
        b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: echo-test, h2c\r\n\r\n",
    )
    .await
    .to_ascii_lowercase();
    assert_eq!(status_of(&mixed), 101, "{mixed}");
    assert!(mixed.contains("upgrade: echo-test\r\n"), "{mixed}");
    let other = raw_exchange(
        edge.addr,
        b"GET /upgrade?switch-to-other HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: echo-test\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status_of(&other), 502, "{other}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2_field_value_padded_with_white_space_is_a_bad_request() {
    let (_origin, edge) = one_origin_edge("protocol = \"http1\"").await;
    let mut client = Client::connect(edge.addr, "localhost", true).await;
    let mut req = request(true, "localhost", "/headers");
    req.headers_mut().insert(
        "x-padded",
        hyper::header::HeaderValue::from_static(" value"),
    );
    let resp = client.send(req).await.expect("a response");
    assert_eq!(resp.status(), 400);
    // The connection carries on: a stream's error, not the connection's.
    assert_eq!(client.get("localhost", "/headers").await.0, 200);
}

/// An h2 origin (the h2 crate, certs/origin.*) that refuses POST streams unprocessed
/// (RST_STREAM REFUSED_STREAM, RFC 9113 8.7): every other one as soon as it opens, or all
/// those that carry `x-refuse: always` once their body is in; answers the others with what
/// it got ("refuser: N bytes").
async fn refusing_h2_origin() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let acceptor = origin_tls(&[b"h2"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let posts = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, posts) = (acceptor.clone(), posts.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut conn) = h2::server::handshake(tls).await else {
                    return;
                };
                while let Some(Ok((req, mut respond))) = conn.accept().await {
                    let always = req.headers().contains_key("x-refuse");
                    let other = req.method() == http::Method::POST
                        && posts.fetch_add(1, std::sync::atomic::Ordering::SeqCst) % 2 == 0;
                    if other && !always {
                        // At once, while the body may still be on its way.
                        respond.send_reset(h2::Reason::REFUSED_STREAM);
                        continue;
                    }
                    let refuse = always && req.method() == http::Method::POST;
                    tokio::spawn(async move {
                        // The whole body first, so the refusal comes after it went.
                        let mut body = req.into_body();
                        let mut got = 0;
                        while let Some(Ok(d)) = body.data().await {
                            got += d.len();
                            let _ = body.flow_control().release_capacity(d.len());
                        }
                        if refuse {
                            respond.send_reset(h2::Reason::REFUSED_STREAM);
                            return;
                        }
                        let head = http::Response::builder()
                            .status(200)
                            .body(())
                            .expect("response");
                        if let Ok(mut out) = respond.send_response(head, false) {
                            let text = format!("refuser: {got} bytes\n");
                            let _ = out.send_data(bytes::Bytes::from(text), true);
                        }
                    });
                }
            });
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_an_h2_origin_refused_unprocessed_is_sent_again_with_its_body() {
    let (refuser, task) = refusing_h2_origin().await;
    let backup = origin().start().await.unwrap();
    let health = "protocol = \"h2\"\nwarm_connections = 1\nunhealthy_after = 2";
    let edge = start_edge(&edge_config(
        &[("refuser", refuser, health), ("backup", backup.addr(), "")],
        &["localhost"],
    ))
    .await;
    let post = |extra: &'static [&'static str]| {
        let mut args = vec!["--http2", "-sS", "--data-binary", "0123456789"];
        args.extend_from_slice(extra);
        async move { curl(edge.addr, "localhost", "/", &args).await }
    };
    // Every other POST is refused as it opens, its body on its way or gone: sent again, body
    // and all (the edge reads the rest of a small body after the refusal).
    for _ in 0..4 {
        let out = post(&[]).await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "refuser: 10 bytes\n");
    }
    // A body too large to keep cannot be sent again: 502, but a refusal says nothing of the
    // origin's health...
    let dir = tempfile::tempdir().expect("tempdir");
    let large = dir.path().join("large");
    std::fs::write(&large, vec![b'x'; 70_000]).expect("write");
    let data = format!("@{}", large.display());
    for _ in 0..3 {
        let args = [
            "--http2",
            "-H",
            "x-refuse: always",
            "--data-binary",
            &data,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ];
        let out = curl(edge.addr, "localhost", "/", &args).await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "502");
    }
    let mut c = Client::connect(edge.addr, "localhost", true).await;
    assert_eq!(
        c.get("localhost", "/").await,
        (200, "refuser: 0 bytes\n".to_string())
    );
    // ...unless it refuses every time a request is tried: then (after 2 such, its
    // unhealthy_after) the route's next origin answers.
    for _ in 0..2 {
        let out = post(&[
            "-H",
            "x-refuse: always",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .await;
        assert_eq!(String::from_utf8_lossy(&out.stdout), "502");
    }
    let (status, body) = c.get("localhost", "/").await;
    assert_eq!(status, 200);
    assert_ne!(body, "refuser: 0 bytes\n", "the backup answers");
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_header_sections_over_the_cap_get_a_431_logged_with_their_request() {
    let origin = origin().start().await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    // An http/1.1 origin: hyper's h2 server would refuse a 64 KiB list (GOAWAY).
    let config = edge_config(
        &[("o1", origin.addr(), "protocol = \"http1\"")],
        &["localhost"],
    );
    let edge = start_edge(&super::with_access_log(&config, &path)).await;
    // Over the 64 KiB cap and under where the h2 crate would refuse the list itself (curl
    // cannot send it: nghttp2 sends no header block over 64 KiB).
    // The cap is exact: a list of 65,536 bytes as h2 counts it passes, one more does not. The
    // id the edge adds is not the client's (a client's own is replaced, not counted twice).
    let mut c = Client::connect(edge.addr, "localhost", true).await;
    for (size, want) in [(65_536, 200), (65_537, 431)] {
        let mut req = request(true, "localhost", "/headers");
        req.headers_mut().insert(
            "x-request-id",
            hyper::header::HeaderValue::from_static("id"),
        );
        let value_len = size - list_size(&req) - ("x-big".len() + 32);
        let req = with_big_field(req, value_len);
        assert_eq!(list_size(&req), size);
        let resp = c.send(req).await.expect("an answer");
        assert_eq!(resp.status(), want, "{size} bytes");
    }
    let req = with_big_field(request(true, "localhost", "/headers?big"), 70_000);
    let resp = c.send(req).await.expect("an answer");
    assert_eq!(resp.status(), 431);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], b"header section too large\n");
    super::wait_log_lines(&path, 3).await;
    let line = &super::log_lines(&path)[2];
    assert_eq!(line["status"], 431, "{line}");
    assert_eq!(line["outcome"], "header section too large", "{line}");
    assert_eq!(line["protocol"], "HTTP/2", "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/headers?big", "{line}");
    assert_requests_counted(edge.admin, "4xx", 2).await;
    assert_eq!(
        origin
            .stats()
            .requests
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
}

/// An h2 request's header list as RFC 9113 6.5.2 counts it, its pseudo-header fields included.
fn list_size(req: &hyper::Request<Body>) -> usize {
    let uri = req.uri();
    let pseudo = [
        (":method", req.method().as_str()),
        (":scheme", uri.scheme_str().unwrap()),
        (":authority", uri.authority().unwrap().as_str()),
        (":path", uri.path_and_query().unwrap().as_str()),
    ];
    let fields = req.headers().iter().map(|(n, v)| (n.as_str(), v.len()));
    pseudo
        .iter()
        .map(|(n, v)| n.len() + v.len() + 32)
        .sum::<usize>()
        + fields.map(|(n, v)| n.len() + v + 32).sum::<usize>()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_heads_hyper_refuses_are_counted_and_logged_like_other_answers() {
    let origin = origin().start().await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let config = edge_config(&[("o1", origin.addr(), "")], &["localhost"]);
    let edge = start_edge(&super::with_access_log(&config, &path)).await;
    // A header section over the 64 KiB cap, then a request line that does not parse: hyper
    // answers both itself, before any handler.
    let big = format!("X-Big: {}", "a".repeat(70_000));
    let too_large = raw_exchange(
        edge.addr,
        format!("GET /headers HTTP/1.1\r\nHost: localhost\r\n{big}\r\n\r\n").as_bytes(),
    )
    .await;
    assert_eq!(status_of(&too_large), 431, "{too_large}");
    super::wait_log_lines(&path, 1).await;
    // A request line, then the framing fields request smuggling plays with.
    let malformed: [&[u8]; 4] = [
        b"GET /a b c HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
        b"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
        b"POST /echo HTTP/1.0\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ];
    for (i, m) in malformed.iter().enumerate() {
        let bad = raw_exchange(edge.addr, m).await;
        assert_eq!(status_of(&bad), 400, "{bad}");
        super::wait_log_lines(&path, 2 + i).await;
    }
    let lines = super::log_lines(&path);
    let mut expected = vec![(&lines[0], 431, "header section too large")];
    expected.extend(lines[1..].iter().map(|l| (l, 400, "malformed request")));
    for (line, status, outcome) in expected {
        assert_eq!(line["status"], status, "{line}");
        assert_eq!(line["outcome"], outcome, "{line}");
        assert_eq!(line["protocol"], "HTTP/1.1", "{line}");
        assert_eq!(
            (&line["method"], &line["path"]),
            (&"".into(), &"".into()),
            "{line}"
        );
        assert_eq!(line["connection_request"], 1, "{line}");
        assert_eq!(line["tls_handshake"], "full", "{line}");
    }
    assert_requests_counted(edge.admin, "4xx", 5).await;
}
