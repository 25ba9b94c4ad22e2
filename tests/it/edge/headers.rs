//! A route's own header edits (`request_headers`, `remove_request_headers`,
//! `response_headers`, `remove_response_headers`) with curl over http/1.1 and h2, and on a
//! tunnel's 101.

use super::*;

const EDITS: &str = r#"request_headers = { "X-Edge-PoP" = "tyo1", "User-Agent" = "edgepop-test" }
remove_request_headers = ["X-Debug"]
response_headers = { "X-Frame-Options" = "DENY" }
remove_response_headers = ["X-Origin", "Via"]
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_routes_header_edits_reach_the_origin_and_the_client() {
    let origin = origin().start().await.unwrap();
    let config = edge_config(&[("o1", origin.addr(), "")], &["localhost"]).replacen(
        "origins = [\"o1\"]\n",
        &format!("origins = [\"o1\"]\n{EDITS}"),
        1,
    );
    assert!(config.contains("X-Edge-PoP"), "{config}");
    let edge = start_edge(&config).await;
    for version in ["--http1.1", "--http2"] {
        let out = curl(
            edge.addr,
            "localhost",
            "/headers",
            &[
                "-i",
                version,
                "-H",
                "X-Debug: 1",
                "-H",
                "X-Edge-PoP: from-the-client",
            ],
        )
        .await;
        let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        // What the origin saw: set (replacing the client's), removed, and the rest kept.
        assert!(body.contains("x-edge-pop: tyo1\n"), "{version}: {body}");
        assert!(!body.contains("from-the-client"), "{version}: {body}");
        assert!(
            body.contains("user-agent: edgepop-test\n"),
            "{version}: {body}"
        );
        assert!(!body.contains("x-debug"), "{version}: {body}");
        assert!(
            body.contains("x-forwarded-for: 127.0.0.1\n"),
            "{version}: {body}"
        );
        // What the client got.
        assert!(
            head.contains("x-frame-options: deny\r\n"),
            "{version}: {head}"
        );
        assert!(!head.contains("x-origin:"), "{version}: {head}");
        assert!(!head.contains("\r\nvia:"), "{version}: {head}");
    }
    // The edge's own answers are not the origin's: no edits there.
    let out = curl(
        edge.addr,
        "localhost",
        "/",
        &["-i", "-H", "Host: elsewhere.test"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(text.starts_with("http/2 421"), "{text}");
    assert!(!text.contains("x-frame-options"), "{text}");

    // A tunnel's 101 comes from the origin too.
    use tokio::io::AsyncWriteExt;
    let mut s = tls_connect(edge.addr, "localhost", &[b"http/1.1"])
        .await
        .expect("tls");
    s.write_all(b"GET /upgrade HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: echo-test\r\n\r\n")
        .await
        .unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("x-frame-options: deny\r\n"), "{head}");
    assert!(!head.contains("x-origin:"), "{head}");
}
