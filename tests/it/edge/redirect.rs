//! Plain-HTTP listeners (`redirect_to_https`) with curl: redirects to HTTPS that curl follows,
//! 308 for other methods, 421 for hosts no route serves, and ACME HTTP-01 challenges passed
//! through to the origin.

use super::*;
use std::net::SocketAddr;

/// Config with its TLS listener first and a plain-HTTP redirect listener (with `line`) second.
fn redirecting_config(origin: SocketAddr, line: &str) -> String {
    edge_config(&[("o1", origin, "")], &["localhost", "*.edgepop.test"]).replacen(
        "[[certificates]]",
        &format!(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\nredirect_to_https = true\n{line}\n\n[[certificates]]"
        ),
        1,
    )
}

/// An edge started from [`redirecting_config`], and its plain listener's address.
async fn redirecting_edge(line: &str) -> (edgepop::demo::origin::Origin, TestEdge, SocketAddr) {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&redirecting_config(origin.addr(), line)).await;
    let plain = edge.server.listen_addrs[1];
    (origin, edge, plain)
}

/// `curl -i` over plain HTTP: (status, headers and body as text).
async fn plain(addr: SocketAddr, host: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-i", "--resolve"])
        .arg(format!("{host}:{}:{}", addr.port(), addr.ip()))
        .args(extra)
        .arg(format!("http://{host}:{}{path}", addr.port()))
        .kill_on_drop(true)
        .output()
        .await
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "a status line: {text} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    (status, text)
}

/// One request written by hand on a fresh connection: (status, the answer's head).
async fn raw_request(addr: SocketAddr, request: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    while !String::from_utf8_lossy(&buf[..got]).contains("\r\n\r\n") {
        let n = s.read(&mut buf[got..]).await.expect("read");
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&buf[..got]));
        got += n;
    }
    let text = String::from_utf8_lossy(&buf[..got]).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

fn location(text: &str) -> Option<&str> {
    text.lines()
        .find_map(|l| l.strip_prefix("location: "))
        .map(str::trim)
}

#[tokio::test(flavor = "multi_thread")]
async fn plain_http_is_redirected_to_https_and_curl_follows_it_to_the_origin() {
    let (_origin, edge, plain_addr) = redirecting_edge("https_port = 8443").await;
    let (status, text) = plain(plain_addr, "localhost", "/some/page?q=1&r=2", &[]).await;
    assert_eq!(status, 301, "{text}");
    assert_eq!(
        location(&text),
        Some("https://localhost:8443/some/page?q=1&r=2")
    );
    // Other methods keep their method and body: 308.
    let (status, text) = plain(plain_addr, "localhost", "/form", &["-d", "a=1"]).await;
    assert_eq!(status, 308, "{text}");
    assert_eq!(location(&text), Some("https://localhost:8443/form"));
    // curl follows the redirect to the TLS listener (its port mapped to the real one).
    let out = tokio::process::Command::new("curl")
        .args(["-sS", "-L", "--cacert"])
        .arg(ca())
        .arg("--resolve")
        .arg(format!("localhost:{}:127.0.0.1", plain_addr.port()))
        .arg("--connect-to")
        .arg(format!("localhost:8443:127.0.0.1:{}", edge.addr.port()))
        .arg(format!("http://localhost:{}/hello", plain_addr.port()))
        .kill_on_drop(true)
        .output()
        .await
        .expect("curl runs");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Hosts no route serves: 421, as over HTTPS; no Host at all: 400.
    let (status, text) = plain(plain_addr, "other.example", "/", &[]).await;
    assert_eq!(status, 421, "{text}");
    assert!(location(&text).is_none());
    let (status, _) = plain(plain_addr, "localhost", "/", &["-0", "-H", "Host:"]).await;
    assert_eq!(status, 400);
    // CONNECT is not a page to send to HTTPS: 405, as on TLS listeners.
    let (status, text) = raw_request(
        plain_addr,
        "CONNECT localhost:443 HTTP/1.1\r\nHost: localhost:443\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405, "{text}");
    // Counted like any answer: two 301s and a 308; the 421, the 400 and the 405.
    assert_requests_counted(edge.admin, "3xx", 3).await;
    assert_requests_counted(edge.admin, "4xx", 3).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn acme_challenges_go_to_the_origin_over_plain_http_and_443_goes_unsaid() {
    let (_origin, edge, plain_addr) = redirecting_edge("").await;
    let (status, text) = plain(
        plain_addr,
        "localhost",
        "/.well-known/acme-challenge/tok-123",
        &[],
    )
    .await;
    assert_eq!(status, 200, "{text}");
    assert!(text.ends_with("tok-123.demo-account-key\n"), "{text}");
    // The origin is told the request came in plain HTTP.
    assert!(text.contains("x-origin-saw-proto: http\r\n"), "{text}");
    // Over HTTPS the same header says https.
    let out = curl(
        edge.addr,
        "localhost",
        "/.well-known/acme-challenge/t",
        &["-i"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("x-origin-saw-proto: https\r\n"), "{text}");
    // Everything else is redirected, to the default HTTPS port without a port in the URL:
    // other paths, and anything under the challenge path that is not a GET of one token.
    let (status, text) = plain(plain_addr, "localhost", "/.well-known/other", &[]).await;
    assert_eq!(status, 301, "{text}");
    assert_eq!(location(&text), Some("https://localhost/.well-known/other"));
    for (path, extra) in [
        (
            "/.well-known/acme-challenge/../../headers",
            vec!["--path-as-is"],
        ),
        (
            "/.well-known/acme-challenge/%2e%2e/headers",
            vec!["--path-as-is"],
        ),
        ("/.well-known/acme-challenge/a/b", vec![]),
        ("/.well-known/acme-challenge/", vec![]),
        ("/.well-known/acme-challenge/tok?x=1", vec![]),
        ("/.well-known/acme-challenge/tok", vec!["-d", "x"]),
    ] {
        let (status, text) = plain(plain_addr, "localhost", path, &extra).await;
        assert!(status == 301 || status == 308, "{path}: {text}");
        assert_eq!(
            location(&text),
            Some(format!("https://localhost{path}").as_str()),
            "{path}"
        );
    }
    // Nor does a token fetched with an Upgrade: redirected, never tunnelled to the origin.
    let (status, text) = raw_request(
        plain_addr,
        "GET /.well-known/acme-challenge/tok HTTP/1.1\r\nHost: localhost\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await;
    assert_eq!(status, 301, "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plain_listener_speaks_only_http1_closes_silent_clients_and_checks_hosts() {
    let (_origin, _edge, plain_addr) =
        redirecting_edge("header_timeout = \"300ms\"\nidle_timeout = \"60s\"").await;
    // The h2 preface is not taken for cleartext h2 (h2c): hyper's http/1.1 side refuses it
    // and closes, where it used to answer with an h2 SETTINGS frame.
    let mut s = tokio::net::TcpStream::connect(plain_addr)
        .await
        .expect("connect");
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await?;
        let mut all = Vec::new();
        s.read_to_end(&mut all).await.map(|_| all)
    })
    .await
    .expect("closed");
    let all = all.unwrap_or_default();
    assert!(all.is_empty() || all.starts_with(b"HTTP/1.1 4"), "{all:?}");
    // A client that sends nothing is closed after header_timeout, not idle_timeout.
    let mut s = tokio::net::TcpStream::connect(plain_addr)
        .await
        .expect("connect");
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), async {
        use tokio::io::AsyncReadExt;
        s.read(&mut buf).await
    })
    .await
    .expect("closed well before idle_timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    // A wildcard route's first label cannot carry what a URL parser would end the host at.
    for host in [
        "evil%2ecom#.edgepop.test",
        "evil.com?.edgepop.test",
        "a\\b.edgepop.test",
    ] {
        let (status, text) = raw_request(
            plain_addr,
            &format!("GET /x HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        )
        .await;
        assert_eq!(status, 400, "{host}: {text}");
        assert!(location(&text).is_none(), "{host}: {text}");
    }
    let (status, text) = raw_request(
        plain_addr,
        "GET /x HTTP/1.1\r\nHost: www.edgepop.test:80\r\n\r\n",
    )
    .await;
    assert_eq!(status, 301, "{text}");
    assert_eq!(location(&text), Some("https://www.edgepop.test/x"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reload_changes_the_https_port_but_not_a_listener_between_tls_and_plain() {
    let (_origin, edge, plain_addr) = redirecting_edge("https_port = 8443").await;
    let path = edge.dir.path().join("edgepop.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    // Both listeners are on port 0: the reload matches them by position.
    std::fs::write(
        &path,
        text.replace("https_port = 8443", "https_port = 9443"),
    )
    .unwrap();
    let cfg = edgepop::config::load(&path).unwrap();
    edge.server.reload(&cfg).await.unwrap();
    let (status, text) = plain(plain_addr, "localhost", "/a", &[]).await;
    assert_eq!(status, 301);
    assert_eq!(location(&text), Some("https://localhost:9443/a"));
    // Turning the plain listener into a TLS one (and the TLS one plain) waits for a restart:
    // both keep what they are.
    let swapped = std::fs::read_to_string(&path)
        .unwrap()
        .replace("redirect_to_https = true\nhttps_port = 9443\n", "")
        .replacen(
            "[[listeners]]\naddress = \"127.0.0.1:0\"\n",
            "[[listeners]]\naddress = \"127.0.0.1:0\"\nredirect_to_https = true\n",
            1,
        );
    std::fs::write(&path, &swapped).unwrap();
    let cfg = edgepop::config::load(&path).unwrap();
    edge.server.reload(&cfg).await.unwrap();
    let (status, text) = plain(plain_addr, "localhost", "/b", &[]).await;
    assert_eq!(status, 301, "{text}");
    assert_eq!(location(&text), Some("https://localhost:9443/b"));
    let out = curl(edge.addr, "localhost", "/", &[]).await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn redirects_and_challenges_are_logged_without_tls_fields() {
    let origin = origin().start().await.unwrap();
    let logs = tempfile::tempdir().unwrap();
    let path = logs.path().join("access.log");
    let edge = start_edge(&with_access_log(
        &redirecting_config(origin.addr(), ""),
        &path,
    ))
    .await;
    let plain_addr = edge.server.listen_addrs[1];
    assert_eq!(plain(plain_addr, "localhost", "/a?b=1", &[]).await.0, 301);
    let (status, _) = plain(
        plain_addr,
        "localhost",
        "/.well-known/acme-challenge/tok",
        &["-H", "X-Request-Id: mine"],
    )
    .await;
    assert_eq!(status, 200);
    wait_log_lines(&path, 2).await;
    let lines = log_lines(&path);
    let redirect = &lines[0];
    assert_eq!(redirect["status"], 301, "{redirect}");
    assert_eq!(redirect["outcome"], "https redirect", "{redirect}");
    assert_eq!(redirect["path"], "/a?b=1", "{redirect}");
    assert!(redirect.get("tls_handshake").is_none(), "{redirect}");
    assert!(redirect.get("tls_handshake_ms").is_none(), "{redirect}");
    let challenge = &lines[1];
    assert_eq!(challenge["status"], 200, "{challenge}");
    assert_eq!(challenge["origin"], "o1", "{challenge}");
    assert!(challenge.get("tls_handshake").is_none(), "{challenge}");
    // The client's own request ID is replaced, as on TLS listeners.
    assert_ne!(challenge["request_id"], "mine", "{challenge}");
    assert_eq!(challenge["request_id"].as_str().map(str::len), Some(32));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_routes_hsts_goes_on_https_answers_only() {
    let origin = origin().start().await.unwrap();
    let config = redirecting_config(origin.addr(), "").replace(
        "origins = [\"o1\"]\n",
        "origins = [\"o1\"]\nhsts = \"max-age=31536000; includeSubDomains\"\n",
    );
    assert!(config.contains("hsts"), "{config}");
    let edge = start_edge(&config).await;
    let out = curl(edge.addr, "localhost", "/", &["-i", "--http1.1"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("strict-transport-security: max-age=31536000; includeSubDomains\r\n"),
        "{text}"
    );
    let out = curl(edge.addr, "localhost", "/", &["-i", "--http2"]).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("strict-transport-security: max-age=31536000"),
        "{text}"
    );
    // Not over plain HTTP (RFC 6797 7.2): neither on a redirect nor on an ACME answer.
    let plain_addr = edge.server.listen_addrs[1];
    let (status, text) = plain(plain_addr, "localhost", "/", &[]).await;
    assert_eq!(status, 301);
    assert!(
        !text
            .to_ascii_lowercase()
            .contains("strict-transport-security"),
        "{text}"
    );
    let (status, text) = plain(
        plain_addr,
        "localhost",
        "/.well-known/acme-challenge/t",
        &[],
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        !text
            .to_ascii_lowercase()
            .contains("strict-transport-security"),
        "{text}"
    );
}
