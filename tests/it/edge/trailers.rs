//! Trailers through the edge, both ways, to h2 and http/1.1 origins: an h2 client's request
//! trailers reach the origin (its `/echo` sends them back as response trailers), and an
//! http/1.1 client that sends `TE: trailers` gets them too. Over http/1.1 a hop carries the
//! trailer fields its `Trailer` header declares, so that header goes end to end.

use super::*;
use bytes::Bytes;
use http_body_util::StreamBody;
use hyper::body::Frame;

/// A POST to `/echo` whose body is `data` followed by `trailers`, all of them declared.
pub(super) fn post_with_trailers(
    h2: bool,
    data: &'static str,
    trailers: &[(&'static str, &'static str)],
) -> hyper::Request<Body> {
    let mut fields = hyper::HeaderMap::new();
    for (k, v) in trailers {
        fields.insert(*k, v.parse().unwrap());
    }
    let declared: Vec<&str> = trailers.iter().map(|(k, _)| *k).collect();
    let frames = vec![
        Ok::<_, std::io::Error>(Frame::data(Bytes::from_static(data.as_bytes()))),
        Ok(Frame::trailers(fields)),
    ];
    let body = StreamBody::new(futures_util::stream::iter(frames)).boxed();
    let b = hyper::Request::builder().method("POST");
    let b = if h2 {
        b.uri("https://localhost/echo")
            .version(hyper::Version::HTTP_2)
    } else {
        b.uri("/echo").header("host", "localhost")
    };
    b.header("te", "trailers")
        .header("trailer", declared.join(", "))
        .body(body)
        .expect("request")
}

/// An edge in front of one origin speaking `protocol` ("h2" or "http1").
async fn echo_edge(protocol: &str) -> (edgepop::demo::origin::Origin, TestEdge) {
    let origin = origin().start().await.unwrap();
    let extra = format!("protocol = {protocol:?}");
    let edge = start_edge(&edge_config(
        &[("o1", origin.addr(), &extra)],
        &["localhost"],
    ))
    .await;
    (origin, edge)
}

/// The body and the trailers of an answer.
pub(super) async fn body_and_trailers(
    resp: hyper::Response<hyper::body::Incoming>,
) -> (String, Option<hyper::HeaderMap>) {
    let collected = resp.into_body().collect().await.expect("body");
    let trailers = collected.trailers().cloned();
    (
        String::from_utf8_lossy(&collected.to_bytes()).into_owned(),
        trailers,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn request_and_response_trailers_cross_the_edge_to_h2_and_http1_origins() {
    for protocol in ["h2", "http1"] {
        let (_origin, edge) = echo_edge(protocol).await;
        for h2_client in [true, false] {
            let mut c = Client::connect(edge.addr, "localhost", h2_client).await;
            let resp = c
                .send(post_with_trailers(h2_client, "abc", &[("x-sum", "7")]))
                .await
                .expect("response");
            assert_eq!(
                resp.status(),
                200,
                "{protocol} origin, h2 client: {h2_client}"
            );
            let (body, trailers) = body_and_trailers(resp).await;
            assert_eq!(body, "abc");
            let sum = trailers.as_ref().and_then(|t| t.get("x-sum"));
            assert_eq!(
                sum.map(|v| v.as_bytes()),
                Some(&b"7"[..]),
                "{protocol} origin, h2 client: {h2_client}: {trailers:?}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn request_trailers_cannot_carry_what_the_edge_sets_or_framing_fields() {
    for protocol in ["h2", "http1"] {
        let (_origin, edge) = echo_edge(protocol).await;
        let req = post_with_trailers(
            true,
            "abc",
            &[
                ("x-sum", "7"),
                ("x-forwarded-for", "203.0.113.66"),
                ("x-request-id", "forged"),
                ("cookie", "session=stolen"),
                ("if-match", "*"),
            ],
        );
        let mut c = Client::connect(edge.addr, "localhost", true).await;
        let resp = c.send(req).await.expect("response");
        assert_eq!(resp.status(), 200, "{protocol}");
        let (body, trailers) = body_and_trailers(resp).await;
        assert_eq!(body, "abc");
        let names: Vec<String> = trailers
            .iter()
            .flat_map(|t| t.keys())
            .map(|k| k.to_string())
            .collect();
        // Only the harmless one reached the origin (which echoed what it got).
        assert_eq!(names, vec!["x-sum"], "{protocol}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_request_trailers_over_the_header_cap_make_the_body_malformed() {
    // The h2 decoder lets a section of up to 128 KiB through (so the head's 431 is the
    // handler's, and logged); trailers over the 64 KiB cap never reach the origin: the body
    // fails there. `/echo` answers as the body streams, so its head is out already and the
    // answer is cut (reset) instead of the 400 a slower origin would leave room for.
    let (_origin, edge) = echo_edge("h2").await;
    let big: &'static str = Box::leak("a".repeat(70_000).into_boxed_str());
    let mut c = Client::connect(edge.addr, "localhost", true).await;
    let resp = c
        .send(post_with_trailers(true, "abc", &[("x-big", big)]))
        .await
        .expect("response");
    if resp.status() != 400 {
        let echoed = resp.into_body().collect().await;
        assert!(
            echoed.is_err(),
            "the echo ended with the trailers: {echoed:?}"
        );
    }
    // Trailers under the cap still go through on the same connection.
    let resp = c
        .send(post_with_trailers(true, "abc", &[("x-sum", "7")]))
        .await
        .expect("response");
    let (body, trailers) = body_and_trailers(resp).await;
    assert_eq!(body, "abc");
    assert_eq!(trailers.expect("trailers")["x-sum"], "7");
}
