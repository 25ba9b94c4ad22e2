//! `[[routes]] rate_limit`: a client over its allowance gets 429 with `Retry-After` before any
//! origin sees the request; other clients and other routes are not affected.

use super::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_client_over_the_routes_rate_limit_gets_429_with_retry_after() {
    let origin = origin().start().await.unwrap();
    // Two routes to one origin: `localhost` limited to 3 at once then 2 a minute,
    // `*.edgepop.test` unlimited.
    let config = edge_config(&[("o1", origin.addr(), "")], &["localhost"]).replace(
        "origins = [\"o1\"]\n",
        "origins = [\"o1\"]\nrate_limit = { requests = 2, per = \"1m\", burst = 3 }\n\n[[routes]]\nhosts = [\"*.edgepop.test\"]\norigins = [\"o1\"]\n",
    );
    assert!(config.contains("rate_limit"), "{config}");
    let edge = start_edge(&config).await;
    let mut h2 = Client::connect(edge.addr, "localhost", true).await;
    for i in 0..3 {
        assert_eq!(h2.get("localhost", "/").await.0, 200, "request {i}");
    }
    let seen = origin
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::SeqCst);
    let resp = h2
        .send(request(true, "localhost", "/"))
        .await
        .expect("response");
    assert_eq!(resp.status(), 429);
    let retry: u64 = resp
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("a Retry-After in seconds");
    assert!((1..=30).contains(&retry), "{retry}");
    // The same client on a new connection, over http/1.1 with curl: still limited.
    let out = curl(
        edge.addr,
        "localhost",
        "/",
        &["-o", "/dev/null", "-w", "%{http_code}"],
    )
    .await;
    assert_eq!(String::from_utf8_lossy(&out.stdout), "429");
    // Another route is not limited.
    for _ in 0..5 {
        assert_eq!(h2.get("www.edgepop.test", "/").await.0, 200);
    }
    let (_, metrics) = admin_get(edge.admin, "/metrics").await;
    assert!(
        metrics.contains("edgepop_rate_limited_total 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("edgepop_rate_limit_unrecorded_total 0\n"),
        "{metrics}"
    );
    assert_eq!(edge.server.rate_limited_clients(), 1);
    // A reload (log rotation sends SIGHUP too) keeps the allowances of unchanged routes.
    let path = edge.dir.path().join("edgepop.toml");
    let cfg = edgepop::config::load(&path).unwrap();
    edge.server.reload(&cfg).await.unwrap();
    assert_eq!(
        h2.get("localhost", "/").await.0,
        429,
        "still limited after a reload"
    );
    // The origin saw none of the refused requests, only the unlimited route's five.
    let now = origin
        .stats()
        .requests
        .load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(now - seen, 5);
    // A changed limit starts afresh.
    let text = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, text.replace("burst = 3", "burst = 4")).unwrap();
    let cfg = edgepop::config::load(&path).unwrap();
    edge.server.reload(&cfg).await.unwrap();
    assert_eq!(
        h2.get("localhost", "/").await.0,
        200,
        "a new limit, a new allowance"
    );
}
