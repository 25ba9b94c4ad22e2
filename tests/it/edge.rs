//! Integration tests: the edge proxy core (TLS termination, routing, forwarding, pool).

use crate::support::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h1_and_h2_clients_reach_the_origin_through_the_edge() {
    let origin = origin().start().await.unwrap();
    let edge = start_edge(&edge_config(
        &[("o1", origin.addr(), "warm_connections = 2")],
        &["localhost", "*.edgepop.test"],
    ))
    .await;
    for h2 in [false, true] {
        let mut c = Client::connect(edge.addr, "www.edgepop.test", h2).await;
        let (status, body) = c.get("www.edgepop.test", "/").await;
        assert_eq!((status, body.as_str()), (200, "hello\n"), "h2={h2}");
    }
}
