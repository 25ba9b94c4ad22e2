//! A route's own header edits (`request_headers`, `remove_request_headers`,
//! `response_headers`, `remove_response_headers`) with curl over http/1.1 and h2 to h2 and
//! http/1.1 origins, on a tunnel's 101, and against client trailers.

use super::trailers::{body_and_trailers, post_with_trailers};
use super::*;

const EDITS: &str = r#"request_headers = { "X-Edge-PoP" = "tyo1", "User-Agent" = "edgepop-test" }
remove_request_headers = ["X-Debug"]
response_headers = { "X-Frame-Options" = "DENY" }
remove_response_headers = ["X-Origin", "Via", "Server-Timing"]
max_body_size = 4
"#;

/// An edge whose one route has [`EDITS`], in front of an origin speaking `protocol`.
async fn edited_edge(protocol: &str) -> (edgepop::demo::origin::Origin, TestEdge) {
    let origin = origin().start().await.unwrap();
    let extra = format!("protocol = {protocol:?}");
    let config = edge_config(&[("o1", origin.addr(), &extra)], &["localhost"]).replacen(
        "origins = [\"o1\"]\n",
        &format!("origins = [\"o1\"]\n{EDITS}"),
        1,
    );
    assert!(config.contains("X-Edge-PoP"), "{config}");
    (origin, start_edge(&config).await)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_routes_header_edits_reach_the_origin_and_the_client() {
    for protocol in ["h2", "http1"] {
        let (_origin, edge) = edited_edge(protocol).await;
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
            let head = format!("{head}\r\n");
            let at = format!("{protocol} origin, curl {version}");
            // What the origin saw: set (replacing the client's), removed, the rest kept.
            assert!(body.contains("x-edge-pop: tyo1\n"), "{at}: {body}");
            assert!(!body.contains("from-the-client"), "{at}: {body}");
            assert!(body.contains("user-agent: edgepop-test\n"), "{at}: {body}");
            assert!(!body.contains("x-debug"), "{at}: {body}");
            assert!(
                body.contains("x-forwarded-for: 127.0.0.1\n"),
                "{at}: {body}"
            );
            // What the client got: edits after the edge's own fields (Via, Server-Timing).
            assert!(head.contains("x-frame-options: deny\r\n"), "{at}: {head}");
            assert!(!head.contains("x-origin:"), "{at}: {head}");
            assert!(!head.contains("\r\nvia:"), "{at}: {head}");
            assert!(!head.contains("server-timing"), "{at}: {head}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_edges_own_answers_tunnels_and_trailers_meet_the_edits_too() {
    let (_origin, edge) = edited_edge("h2").await;
    // The edge's own answer (413 over max_body_size) is not the origin's: not edited.
    let out = curl(
        edge.addr,
        "localhost",
        "/echo",
        &["-i", "--data-binary", "too long"],
    )
    .await;
    let text = String::from_utf8_lossy(&out.stdout).to_ascii_lowercase();
    assert!(
        text.starts_with("http/2 413"),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!text.contains("x-frame-options"), "{text}");

    // A tunnel's 101 comes from the origin.
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

    // A client's trailers cannot bring back a removed field or override a set one (the
    // origin's /echo sends back the trailers it got).
    let mut c = Client::connect(edge.addr, "localhost", true).await;
    let resp = c
        .send(post_with_trailers(
            true,
            "abc",
            &[("x-debug", "1"), ("x-edge-pop", "evil"), ("x-sum", "7")],
        ))
        .await
        .expect("response");
    assert_eq!(resp.status(), 200);
    let (body, trailers) = body_and_trailers(resp).await;
    assert_eq!(body, "abc");
    let trailers = trailers.expect("trailers");
    assert_eq!(trailers.get("x-sum").map(|v| v.as_bytes()), Some(&b"7"[..]));
    assert!(!trailers.contains_key("x-debug"), "{trailers:?}");
    assert!(!trailers.contains_key("x-edge-pop"), "{trailers:?}");
}
