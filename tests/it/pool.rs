//! Integration tests: pools that stay warm through origin restarts, silent path death,
//! idle-close races, GOAWAY, rotation, and failover between origins.

use crate::support::*;
use edgepop::wan::Relay;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A client hammering the edge with GETs until stopped; counts successes and failures.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<Vec<String>>,
}

impl Load {
    fn start(edge: std::net::SocketAddr, h2: bool, path: &'static str, pause: Duration) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicUsize::new(0));
        let (s, o) = (stop.clone(), ok.clone());
        let task = tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut c = Client::connect(edge, "localhost", h2).await;
            while !s.load(Ordering::SeqCst) {
                let (status, body) = c.get("localhost", path).await;
                if status == 200 {
                    o.fetch_add(1, Ordering::SeqCst);
                } else {
                    errors.push(format!("{status} {body}"));
                }
                tokio::time::sleep(pause).await;
            }
            errors
        });
        Load { stop, ok, task }
    }

    async fn wait_for(&self, n: usize) {
        let ok = self.ok.clone();
        assert!(
            eventually(Duration::from_secs(20), || {
                let ok = ok.clone();
                async move { ok.load(Ordering::SeqCst) >= n }
            })
            .await,
            "load stalled"
        );
    }

    async fn finish(self) -> (usize, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self.task.await.unwrap();
        (self.ok.load(Ordering::SeqCst), errors)
    }
}

async fn pool_field(admin: std::net::SocketAddr, i: usize, field: &str) -> serde_json::Value {
    pools_json(admin).await["pools"][i][field].clone()
}

/// An http/1.1 origin that closes connections idle for `idle`, behind an edge whose origin
/// has `extra` config.
async fn idle_closing_origin(
    idle: Duration,
    extra: &str,
) -> (edgepop::demo::origin::Origin, TestEdge) {
    let origin = origin()
        .http1_only()
        .idle_close(idle)
        .start()
        .await
        .unwrap();
    let edge = single_origin_edge(origin.addr(), &format!("protocol = \"http1\"\n{extra}")).await;
    (origin, edge)
}

/// Waits (up to `within`) until the first pool's `field` in /pools reaches `n`; fails with the
/// whole /pools document.
async fn wait_pool_count(admin: std::net::SocketAddr, field: &str, n: u64, within: Duration) {
    assert!(
        eventually(within, || async {
            pool_field(admin, 0, field).await.as_u64() >= Some(n)
        })
        .await,
        "{field} under {n}: {}",
        pools_json(admin).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_restart_under_steady_gets_fails_no_request_and_the_pool_refills_resumed() {
    let origin = origin().start().await.unwrap();
    let edge = single_origin_edge(origin.addr(), "warm_connections = 2").await;
    let load = Load::start(edge.addr, true, "/", Duration::from_millis(5));
    load.wait_for(20).await;
    origin.stop();
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool_field(edge.admin, 0, "open").await == 0
        })
        .await,
        "{} origin open {}",
        pools_json(edge.admin).await,
        origin.stats().open.load(Ordering::SeqCst)
    );
    let full_before = origin.stats().handshakes_full.load(Ordering::SeqCst);
    origin.restart().await.unwrap();
    // Back to warm within one (bounded) backoff step. (Requests that waited through the
    // outage may have opened one more; the surplus goes at rotation.)
    wait_pool_count(edge.admin, "open", 2, Duration::from_secs(6)).await;
    let n = load.ok.load(Ordering::SeqCst);
    load.wait_for(n + 20).await;
    let (ok, errors) = load.finish().await;
    assert!(
        errors.is_empty(),
        "{} failed GETs of {}: {errors:?}",
        errors.len(),
        ok + errors.len()
    );
    // Reconnects resume the TLS session with the origin.
    assert_eq!(
        origin.stats().handshakes_full.load(Ordering::SeqCst),
        full_before
    );
    assert!(origin.stats().handshakes_resumed.load(Ordering::SeqCst) >= 2);
    let snap = pools_json(edge.admin).await;
    assert!(
        snap["pools"][0]["handshakes_resumed"].as_u64().unwrap() >= 2,
        "{snap}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_dead_path_is_detected_by_h2_ping_and_replaced() {
    let origin = origin().start().await.unwrap();
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        origin.addr(),
        Duration::ZERO,
    )
    .await
    .unwrap();
    let edge = single_origin_edge(relay.local_addr(), "warm_connections = 2\nkeepalive_interval = \"300ms\"\nkeepalive_timeout = \"300ms\"\nconnect_timeout = \"1s\"").await;
    let mut c = Client::connect(edge.addr, "localhost", true).await;
    assert_eq!(c.get("localhost", "/").await.0, 200);
    relay.blackhole(true);
    let started = tokio::time::Instant::now();
    wait_pool_count(edge.admin, "closed_total", 2, Duration::from_secs(5)).await;
    let detected = started.elapsed();
    eprintln!("dead connections detected after {detected:?} (interval + timeout = 600ms)");
    relay.blackhole(false);
    assert!(
        eventually(Duration::from_secs(10), || async {
            pool_field(edge.admin, 0, "open").await == 2
        })
        .await
    );
    for _ in 0..5 {
        assert_eq!(c.get("localhost", "/").await.0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http1_idle_close_race_costs_no_client_an_error() {
    // The origin closes connections idle for 300ms; requests arrive right around then.
    let (_origin, edge) =
        idle_closing_origin(Duration::from_millis(300), "warm_connections = 2").await;
    let mut c = Client::connect(edge.addr, "localhost", true).await;
    let mut failures = Vec::new();
    for i in 0..24u64 {
        let (status, body) = c.get("localhost", "/").await;
        if status != 200 {
            failures.push(format!("{i}: {status} {body}"));
        }
        // 280..320 ms: straddles the origin's idle timeout.
        tokio::time::sleep(Duration::from_millis(280 + (i * 7) % 41)).await;
    }
    assert!(failures.is_empty(), "{failures:?}");
    let snap = pools_json(edge.admin).await;
    let learned = snap["pools"][0]["learned_idle_timeout_ms"].as_u64();
    assert!(
        learned.is_some_and(|ms| (250..=400).contains(&ms)),
        "{snap}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_timeout_learned_too_low_is_raised_by_idle_trials() {
    // The origin closes idle connections after 300ms, and the pool learns it; then the
    // origin stops closing them (a proxy in front of it went away, say). Rotation alone would
    // keep replacing connections at 225ms for good: an idle trial keeps one open, idle and
    // out of service, past 600ms, and the value doubles.
    let (origin, edge) =
        idle_closing_origin(Duration::from_millis(300), "warm_connections = 2").await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            pool_field(edge.admin, 0, "learned_idle_timeout_ms")
                .await
                .as_u64()
                .is_some()
        })
        .await,
        "{}",
        pools_json(edge.admin).await
    );
    // A trial while the origin still closes at 300ms: the origin's close ends it.
    wait_pool_count(edge.admin, "idle_trials_total", 1, Duration::from_secs(10)).await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            pool_field(edge.admin, 0, "idle_trial_running").await == false
        })
        .await,
        "{}",
        pools_json(edge.admin).await
    );
    let snap = pools_json(edge.admin).await;
    assert_eq!(snap["pools"][0]["idle_trials_survived_total"], 0, "{snap}");
    let learned = snap["pools"][0]["learned_idle_timeout_ms"].as_u64();
    assert!(learned.is_some_and(|ms| ms < 500), "{snap}");
    origin.set_idle_close(None);
    // The next trial, 8 learned timeouts later, outlives twice the value.
    wait_pool_count(
        edge.admin,
        "idle_trials_survived_total",
        1,
        Duration::from_secs(15),
    )
    .await;
    let snap = pools_json(edge.admin).await;
    let learned = snap["pools"][0]["learned_idle_timeout_ms"].as_u64();
    assert!(learned.is_some_and(|ms| ms >= 500), "{snap}");
    assert_eq!(
        snap["pools"][0]["idle_timeout_source"], "observed",
        "{snap}"
    );
    // Both ways a trial ends leave the books straight: the pool is back to its two live
    // connections, none retiring (between trials and rotations).
    assert!(
        eventually(Duration::from_secs(10), || async {
            let snap = pools_json(edge.admin).await;
            snap["pools"][0]["open"] == 2 && snap["pools"][0]["retiring"] == 0
        })
        .await,
        "{}",
        pools_json(edge.admin).await
    );
    // The trial's connection never took a request; the pool serves on as before.
    let mut c = Client::connect(edge.addr, "localhost", false).await;
    for _ in 0..3 {
        assert_eq!(c.get("localhost", "/").await.0, 200);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_at_max_connections_runs_no_idle_trial() {
    // With every slot taken, a rotated connection has no replacement: keeping it open as a
    // trial would leave the pool a connection short, so it is closed instead.
    let (_origin, edge) = idle_closing_origin(
        Duration::from_millis(300),
        "warm_connections = 2\nmax_connections = 2",
    )
    .await;
    wait_pool_count(edge.admin, "rotated_total", 3, Duration::from_secs(10)).await;
    assert_eq!(
        pool_field(edge.admin, 0, "idle_trials_total").await,
        0,
        "{}",
        pools_json(edge.admin).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_announced_keep_alive_timeout_is_learned() {
    let origin = origin()
        .http1_only()
        .keep_alive_header(4)
        .start()
        .await
        .unwrap();
    let edge =
        single_origin_edge(origin.addr(), "protocol = \"http1\"\nwarm_connections = 1").await;
    let mut c = Client::connect(edge.addr, "localhost", false).await;
    assert_eq!(c.get("localhost", "/").await.0, 200);
    assert_eq!(
        pool_field(edge.admin, 0, "learned_idle_timeout_ms").await,
        4000
    );
    assert_eq!(
        pool_field(edge.admin, 0, "idle_timeout_source").await,
        "announced"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_origin_idle_timeout_wins_and_idle_connections_are_replaced_before_it() {
    // The origin announces 60 s but closes idle connections after 1.5 s (a proxy in front of
    // it, say); the operator states 1 s.
    let origin = origin()
        .http1_only()
        .keep_alive_header(60)
        .idle_close(Duration::from_millis(1500))
        .start()
        .await
        .unwrap();
    let edge = single_origin_edge(
        origin.addr(),
        "protocol = \"http1\"\nwarm_connections = 2\norigin_idle_timeout = \"1s\"",
    )
    .await;
    let mut c = Client::connect(edge.addr, "localhost", false).await;
    assert_eq!(c.get("localhost", "/").await.0, 200);
    assert_eq!(
        pool_field(edge.admin, 0, "learned_idle_timeout_ms").await,
        1000
    );
    assert_eq!(
        pool_field(edge.admin, 0, "idle_timeout_source").await,
        "configured"
    );
    // Idle connections are replaced at 3/4 of it, before the origin's close.
    wait_pool_count(edge.admin, "rotated_total", 2, Duration::from_secs(5)).await;
    assert_eq!(c.get("localhost", "/").await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_idle_timeout_set_too_high_shows_in_early_idle_closes() {
    // The origin closes idle connections after 1 s; the operator states 10 s (rotation at
    // 7.5 s), so the origin's closes come first, and /pools says so.
    let (_origin, edge) = idle_closing_origin(
        Duration::from_millis(1000),
        "warm_connections = 2\norigin_idle_timeout = \"10s\"",
    )
    .await;
    wait_pool_count(
        edge.admin,
        "early_idle_closes_total",
        1,
        Duration::from_secs(8),
    )
    .await;
    assert_eq!(
        pool_field(edge.admin, 0, "learned_idle_timeout_ms").await,
        10_000
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn goaway_from_the_origin_and_connection_rotation_cost_no_client_an_error() {
    let origin = origin().start().await.unwrap();
    let edge = single_origin_edge(
        origin.addr(),
        "warm_connections = 2\nmax_connection_age = \"400ms\"",
    )
    .await;
    let loads: Vec<Load> = (0..3)
        .map(|_| Load::start(edge.addr, true, "/delay/5", Duration::ZERO))
        .collect();
    for l in &loads {
        l.wait_for(10).await;
    }
    for _ in 0..3 {
        origin.goaway_all();
        let n = loads[0].ok.load(Ordering::SeqCst);
        loads[0].wait_for(n + 10).await;
    }
    assert!(
        eventually(Duration::from_secs(10), || async {
            pool_field(edge.admin, 0, "rotated_total").await.as_u64() >= Some(4)
        })
        .await
    );
    let mut all = Vec::new();
    for l in loads {
        let (_, errors) = l.finish().await;
        all.extend(errors);
    }
    assert!(all.is_empty(), "{all:?}");
    // Retired connections really close once their streams are done (no leak of capacity).
    assert!(
        eventually(Duration::from_secs(10), || async {
            let p = &pools_json(edge.admin).await["pools"][0];
            p["retiring"].as_u64() == Some(0) && p["open"].as_u64() <= Some(3)
        })
        .await,
        "{}",
        pools_json(edge.admin).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_fail_over_to_the_second_origin_and_come_back() {
    let a = origin().name("a").start().await.unwrap();
    let b = origin().name("b").start().await.unwrap();
    let health = "warm_connections = 1\nstandby_connections = 1\nhealth_path = \"/healthz\"\nhealth_interval = \"200ms\"\nunhealthy_after = 1\nhealthy_after = 1";
    let edge = start_edge(&edge_config(
        &[("a", a.addr(), health), ("b", b.addr(), health)],
        &["localhost"],
    ))
    .await;
    // The standby origin is warm too (a connection may have been replaced meanwhile: a
    // count that went 0 -> 2 between two looks failed "== 1" once in CI).
    assert!(
        eventually(Duration::from_secs(5), || async {
            b.stats().handshakes() >= 1
        })
        .await,
        "standby handshakes: {}",
        b.stats().handshakes()
    );
    let served_by = || served_by(edge.addr);
    assert_eq!(served_by().await, "a");
    a.set_healthy(false);
    let t = tokio::time::Instant::now();
    assert!(
        eventually(Duration::from_secs(5), || async {
            served_by().await == "b"
        })
        .await
    );
    eprintln!(
        "failed over after {:?} (health_interval 200ms)",
        t.elapsed()
    );
    assert_eq!(pool_field(edge.admin, 0, "healthy").await, false);
    a.set_healthy(true);
    assert!(
        eventually(Duration::from_secs(5), || async {
            served_by().await == "a"
        })
        .await
    );
    // A hard stop of the first origin: passive ejection plus failover, no client error.
    let load = Load::start(edge.addr, false, "/", Duration::from_millis(5));
    load.wait_for(10).await;
    a.stop();
    let n = load.ok.load(Ordering::SeqCst);
    load.wait_for(n + 30).await;
    let (_, errors) = load.finish().await;
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(served_by().await, "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_raises_the_warm_target_above_the_floor() {
    let origin = origin().http1_only().start().await.unwrap();
    let edge = single_origin_edge(
        origin.addr(),
        "protocol = \"http1\"\nwarm_connections = 1\nmax_connections = 16",
    )
    .await;
    let c = Client::connect(edge.addr, "localhost", true).await;
    let Client::H2(send) = c else { unreachable!() };
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let mut c = Client::H2(send.clone());
            tokio::spawn(async move { c.get("localhost", "/delay/200").await.0 })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    // After the burst the pool keeps enough connections for it (decaying slowly).
    let snap = pools_json(edge.admin).await;
    assert!(snap["pools"][0]["target"].as_u64().unwrap() >= 8, "{snap}");
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool_field(edge.admin, 0, "open").await.as_u64() >= Some(8)
        })
        .await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pop_origin_rtt_is_measured_by_h2_ping_and_exported() {
    let origin = origin().start().await.unwrap();
    // 20 ms each way: a 40 ms PoP-origin round trip.
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        origin.addr(),
        Duration::from_millis(20),
    )
    .await
    .unwrap();
    let edge = single_origin_edge(
        relay.local_addr(),
        "warm_connections = 2\nkeepalive_interval = \"200ms\"",
    )
    .await;
    assert!(
        eventually(Duration::from_secs(10), || async {
            pool_field(edge.admin, 0, "ping_rtt_ms")
                .await
                .as_f64()
                .is_some()
        })
        .await
    );
    let rtt = pool_field(edge.admin, 0, "ping_rtt_ms")
        .await
        .as_f64()
        .unwrap();
    // Never below the simulated round trip; the upper bound only guards against nonsense.
    assert!((39.0..1000.0).contains(&rtt), "ping_rtt_ms {rtt}");
    eprintln!("PING RTT through a 40 ms relay: {rtt:.2} ms");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_receive_windows_grow_with_the_bandwidth_delay_product() {
    // 300 ms round trip to the origin: a 2 MiB stream window is the limit of one response,
    // and growing needs only ~4.5 MiB/s through the edge even in a debug build.
    let origin = origin().start().await.unwrap();
    let relay = Relay::start(
        "127.0.0.1:0".parse().unwrap(),
        origin.addr(),
        Duration::from_millis(150),
    )
    .await
    .unwrap();
    let edge = single_origin_edge(relay.local_addr(), "warm_connections = 1").await;
    let initial = pool_field(edge.admin, 0, "stream_window_max").await;
    assert_eq!(initial.as_u64(), Some(2 << 20), "starts at 2 MiB");
    let size = 32u64 << 20;
    let out = curl(
        edge.addr,
        "localhost",
        &format!("/bytes/{size}"),
        &["-o", "/dev/null", "-w", "%{size_download} %{http_code}"],
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!("{size} 200"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let grown = pool_field(edge.admin, 0, "stream_window_max").await;
    assert!(
        grown.as_u64().is_some_and(|w| w > 2 << 20 && w <= 16 << 20),
        "the window grew, within its 16 MiB bound: {}",
        pools_json(edge.admin).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_requests_take_a_freed_connection_in_turn_even_when_some_give_up() {
    // One connection, 24 requests: each freed connection wakes one queued request, and one
    // that gave up while woken passes its turn on; a lost turn would leave the rest queued
    // until queue_timeout (503).
    let origin = origin().http1_only().start().await.unwrap();
    let edge = single_origin_edge(
        origin.addr(),
        "protocol = \"http1\"\nwarm_connections = 1\nmax_connections = 1\nqueue_timeout = \"10s\"",
    )
    .await;
    let c = Client::connect(edge.addr, "localhost", true).await;
    let Client::H2(send) = c else { unreachable!() };
    let (mut kept, mut gave_up) = (Vec::new(), Vec::new());
    for i in 0..24 {
        let mut c = Client::H2(send.clone());
        let t = tokio::spawn(async move { c.get("localhost", "/delay/20").await.0 });
        if i % 3 == 1 {
            gave_up.push(t);
        } else {
            kept.push(t);
        }
    }
    wait_pool_count(edge.admin, "waiting", 16, Duration::from_secs(5)).await;
    for t in &gave_up {
        t.abort();
    }
    for t in kept {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(pool_field(edge.admin, 0, "queue_timeouts_total").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_cancelled_while_connecting_gives_its_connect_slot_back() {
    // An origin that accepts TCP and never answers the TLS handshake.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let held = tokio::spawn(async move {
        let mut conns = Vec::new();
        while let Ok((s, _)) = silent.accept().await {
            conns.push(s);
        }
    });
    let edge = single_origin_edge(
        addr,
        "protocol = \"http1\"\nwarm_connections = 0\nmax_connections = 1\nconnect_timeout = \"30s\"",
    )
    .await;
    let c = Client::connect(edge.addr, "localhost", true).await;
    let Client::H2(send) = c else { unreachable!() };
    let mut waiting = Client::H2(send.clone());
    let request = tokio::spawn(async move { waiting.get("localhost", "/").await });
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool_field(edge.admin, 0, "connecting").await == 1
        })
        .await
    );
    // The client gives up (RST_STREAM): the connect is abandoned and its slot comes back,
    // or the pool would stay one connection short of max_connections for good.
    request.abort();
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool_field(edge.admin, 0, "connecting").await == 0
        })
        .await,
        "{}",
        pools_json(edge.admin).await
    );
    held.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2_requests_share_one_connection_until_it_carries_sixteen() {
    // Four warm h2 connections: ten requests at once share one connection (fewer, fuller
    // writes); twenty at once fill it to sixteen and spill over to a second one.
    let origin = origin().h2_only().start().await.unwrap();
    let edge = single_origin_edge(origin.addr(), "warm_connections = 4").await;
    assert!(
        eventually(Duration::from_secs(5), || async {
            pool_field(edge.admin, 0, "open").await == 4
        })
        .await
    );
    let c = Client::connect(edge.addr, "localhost", true).await;
    let Client::H2(send) = c else { unreachable!() };
    for (n, connections) in [(10, 1), (20, 2)] {
        let tasks: Vec<_> = (0..n)
            .map(|_| {
                let mut c = Client::H2(send.clone());
                tokio::spawn(async move {
                    let resp = c
                        .send(request(true, "localhost", "/delay/1500"))
                        .await
                        .unwrap();
                    assert_eq!(resp.status(), 200);
                    resp.headers()["x-origin-peer-port"]
                        .to_str()
                        .unwrap()
                        .to_owned()
                })
            })
            .collect();
        // All in flight at once, so each was placed while the earlier ones were busy.
        assert!(
            eventually(Duration::from_secs(5), || async {
                pool_field(edge.admin, 0, "in_flight").await == n
            })
            .await,
            "{}",
            pools_json(edge.admin).await
        );
        let mut ports = std::collections::BTreeSet::new();
        for t in tasks {
            ports.insert(t.await.unwrap());
        }
        assert_eq!(ports.len(), connections, "{n} requests: {ports:?}");
    }
}

/// A started pool for one origin, built from the same configuration the edge reads, with
/// its floor of connections open.
async fn warm_pool(addr: std::net::SocketAddr, extra: &str) -> edgepop::pool::Pool {
    let source = edge_config(&[("o1", addr, extra)], &["localhost"]);
    let config = edgepop::config::parse(std::path::Path::new("test.toml"), &source).unwrap();
    let origin = config.edge.unwrap().origins[0].clone();
    let floor = origin.warm_connections;
    let pool = edgepop::pool::Pool::new(origin, floor).unwrap();
    pool.start();
    assert!(pool.wait_warm(Duration::from_secs(5)).await);
    pool
}

/// Lets the other tasks of this single-threaded runtime run until `done` holds.
async fn run_others_until(mut done: impl FnMut() -> bool) {
    for _ in 0..10_000 {
        if done() {
            return;
        }
        tokio::task::yield_now().await;
    }
    panic!("the other tasks never got there");
}

#[tokio::test(flavor = "current_thread")]
async fn a_freed_connection_goes_to_the_oldest_queued_request_not_a_newcomer() {
    let origin = origin().http1_only().start().await.unwrap();
    let pool = warm_pool(
        origin.addr(),
        "protocol = \"http1\"\nwarm_connections = 1\nmax_connections = 1\nqueue_timeout = \"10s\"",
    )
    .await;
    oldest_first(&pool).await;
    assert_eq!(pool.snapshot().opened_total, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_freed_h2_stream_goes_to_the_oldest_queued_request_not_a_newcomer() {
    let origin = origin().h2_only().max_streams(1).start().await.unwrap();
    let pool = warm_pool(
        origin.addr(),
        "protocol = \"h2\"\nwarm_connections = 1\nmax_connections = 1\nqueue_timeout = \"10s\"",
    )
    .await;
    // One exchange first, so the pool has the origin's SETTINGS (one stream at a time).
    let lease = pool.checkout(false).await.unwrap();
    let (response, guard) = lease.send(get_request()).await.unwrap();
    assert_eq!(response.status(), 200);
    drop((response, guard));
    oldest_first(&pool).await;
    assert_eq!(pool.snapshot().opened_total, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn a_freed_connect_slot_goes_to_the_oldest_queued_request_not_a_newcomer() {
    use futures_util::FutureExt;
    let origin = origin().http1_only().start().await.unwrap();
    let pool = warm_pool(
        origin.addr(),
        "protocol = \"http1\"\nwarm_connections = 0\nmax_connections = 1\nqueue_timeout = \"10s\"",
    )
    .await;
    // The only connect slot, taken by a request that is connecting (polled once: its
    // handshake is under way).
    let mut connecting = Box::pin(pool.checkout(false));
    assert!((&mut connecting).now_or_never().is_none());
    assert_eq!(pool.snapshot().connecting, 1);
    let (order, waiters) = queue_three(&pool).await;
    // That request goes away: its slot is free, and a newcomer asks before any waiter runs.
    drop(connecting);
    let mut newcomer = Box::pin(take_in_turn(&pool, &order, 3));
    assert!(
        (&mut newcomer).now_or_never().is_none(),
        "a newcomer took the connect slot first"
    );
    finish_in_order(waiters, newcomer, &order).await;
    assert_eq!(pool.snapshot().opened_total, 1);
}

type Order = Arc<std::sync::Mutex<Vec<usize>>>;

/// A checkout that notes its turn in `order` once it has a connection.
fn take_in_turn(
    pool: &edgepop::pool::Pool,
    order: &Order,
    i: usize,
) -> impl std::future::Future<Output = Result<(), edgepop::pool::CheckoutError>> + Send + 'static {
    let (p, order) = (pool.clone(), order.clone());
    async move {
        let lease = p.checkout(false).await;
        order.lock().unwrap().push(i);
        lease.map(|_| ())
    }
}

/// Three checkouts waiting in line, in order.
async fn queue_three(
    pool: &edgepop::pool::Pool,
) -> (
    Order,
    Vec<tokio::task::JoinHandle<Result<(), edgepop::pool::CheckoutError>>>,
) {
    let order = Order::default();
    let mut waiters = Vec::new();
    // A request that is connecting counts as waiting too.
    let before = pool.snapshot().waiting;
    for i in 0..3 {
        waiters.push(tokio::spawn(take_in_turn(pool, &order, i)));
        run_others_until(|| pool.snapshot().waiting == before + i + 1).await;
    }
    (order, waiters)
}

/// The three waiters, then the newcomer, each got a connection, in that order.
async fn finish_in_order(
    mut waiters: Vec<tokio::task::JoinHandle<Result<(), edgepop::pool::CheckoutError>>>,
    newcomer: impl std::future::Future<Output = Result<(), edgepop::pool::CheckoutError>>
        + Send
        + 'static,
    order: &Order,
) {
    waiters.push(tokio::spawn(newcomer));
    for w in waiters {
        assert!(w.await.unwrap().is_ok());
    }
    assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
}

/// Three requests queue for the pool's only connection (or stream); it comes back while they
/// wait, and a new request asks before any of them has run again. The oldest waiter gets it
/// and the newcomer joins the back of the line (on this single-threaded runtime, nothing else
/// runs in between).
async fn oldest_first(pool: &edgepop::pool::Pool) {
    use futures_util::FutureExt;
    let held = pool.checkout(false).await.unwrap();
    let (order, waiters) = queue_three(pool).await;
    drop(held);
    let mut newcomer = Box::pin(take_in_turn(pool, &order, 3));
    assert!(
        (&mut newcomer).now_or_never().is_none(),
        "a newcomer took the connection first"
    );
    finish_in_order(waiters, newcomer, &order).await;
}

fn get_request() -> hyper::Request<edgepop::pool::UpstreamBody> {
    use http_body_util::BodyExt;
    let body = http_body_util::Empty::<bytes::Bytes>::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    hyper::Request::get("https://localhost/")
        .body(body)
        .unwrap()
}

/// A CA and a client certificate it signed (for mutual TLS with an origin), written to `dir`
/// as `<name>-ca.crt`, `<name>.crt` and `<name>.key`.
fn client_cert(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, String) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{name} CA"));
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = rcgen::KeyPair::generate().expect("client key");
    let mut params =
        rcgen::CertificateParams::new(vec!["edge.edgepop.test".to_string()]).expect("client");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, &ca, &ca_key).expect("client cert");
    let ca_path = write_file(dir, &format!("{name}-ca.crt"), &ca.pem());
    let crt = write_file(dir, &format!("{name}.crt"), &cert.pem());
    let key_path = write_file(dir, &format!("{name}.key"), &key.serialize_pem());
    let lines = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        crt.display(),
        key_path.display()
    );
    (ca_path, lines)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_origin_that_asks_for_a_client_certificate_gets_the_edges() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, ours) = client_cert(dir.path(), "edge");
    let (_, theirs) = client_cert(dir.path(), "other");
    // The origin accepts only clients with a certificate from the edge's CA (Cloudflare's
    // "authenticated origin pulls").
    let origin = origin().require_client_cert(&ca).start().await.unwrap();
    for protocol in ["h2", "http1"] {
        let extra = format!("protocol = \"{protocol}\"\nwarm_connections = 2\n{ours}");
        let edge = single_origin_edge(origin.addr(), &extra).await;
        let mut c = Client::connect(edge.addr, "localhost", true).await;
        for _ in 0..5 {
            assert_eq!(c.get("localhost", "/").await.0, 200, "{protocol}");
        }
        // Both warm connections (and every request) went over accepted connections.
        assert_eq!(
            pool_field(edge.admin, 0, "failed_total").await,
            0,
            "{protocol}"
        );
        assert_eq!(pool_field(edge.admin, 0, "open").await, 2, "{protocol}");
    }
    for (what, lines) in [
        ("no certificate", ""),
        ("another CA's certificate", theirs.as_str()),
    ] {
        for protocol in ["h2", "http1"] {
            let at = format!("{what}, {protocol}");
            let extra = format!("protocol = \"{protocol}\"\nwarm_connections = 1\n{lines}");
            let edge = single_origin_edge(origin.addr(), &extra).await;
            let mut c = Client::connect(edge.addr, "localhost", true).await;
            assert_eq!(c.get("localhost", "/").await.0, 502, "{at}");
            // Under TLS 1.3 the refusal comes after the handshake: each such connection still
            // counts as a failed connect, so the origin is marked down and the pool backs off
            // instead of re-dialling it hundreds of times a second.
            assert!(
                eventually(Duration::from_secs(10), || async {
                    pool_field(edge.admin, 0, "healthy").await == false
                })
                .await,
                "{at}: {}",
                pools_json(edge.admin).await
            );
            let failed = || async {
                pool_field(edge.admin, 0, "failed_total")
                    .await
                    .as_u64()
                    .unwrap_or(0)
            };
            let before = failed().await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let dialled = failed().await - before;
            assert!(
                dialled < 30,
                "{at}: {dialled} refused connections in a second"
            );
        }
    }
}

#[tokio::test(flavor = "current_thread")]
async fn the_queue_holds_queue_size_requests_when_every_connection_is_busy() {
    let origin = origin().http1_only().start().await.unwrap();
    let pool = warm_pool(
        origin.addr(),
        "protocol = \"http1\"\nwarm_connections = 1\nmax_connections = 1\nqueue_size = 1\nqueue_timeout = \"10s\"",
    )
    .await;
    // The one connection is busy; one request waits in line, which is then full.
    let busy = pool.checkout(false).await.unwrap();
    let waiting = tokio::spawn({
        let pool = pool.clone();
        async move { pool.checkout(false).await.map(|_| ()) }
    });
    run_others_until(|| pool.snapshot().waiting == 1).await;
    let over = tokio::time::timeout(Duration::from_secs(5), pool.checkout(false))
        .await
        .expect("refused at once, not queued");
    assert!(
        matches!(over, Err(edgepop::pool::CheckoutError::QueueFull { .. })),
        "{:?}",
        over.map(|_| ())
    );
    drop(busy);
    assert!(waiting.await.unwrap().is_ok(), "the one in line is served");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_origin_closes_its_connection_over_is_not_retried_across_the_pool() {
    // The origin takes header lists of 4 KiB and closes the connection (GOAWAY
    // ENHANCE_YOUR_CALM) on one over 16 KiB. Such a GOAWAY says the stream was not
    // processed, but sending the request again would close the next connection too: a
    // 20 KB head goes again once at most, not through the pool's whole retry budget.
    let origin = origin().max_header_list(4096).start().await.unwrap();
    let edge = single_origin_edge(origin.addr(), "protocol = \"h2\"\nwarm_connections = 4").await;
    wait_pool_count(edge.admin, "opened_total", 4, Duration::from_secs(10)).await;
    let mut c = Client::connect(edge.addr, "localhost", true).await;
    let req = with_big_field(request(true, "localhost", "/"), 20_000);
    let resp = c.send(req).await.expect("an answer");
    assert_eq!(resp.status(), 502);
    let retried = pool_field(edge.admin, 0, "retried_total").await.as_u64();
    assert!(
        retried.is_some_and(|n| (1..=2).contains(&n)),
        "{}",
        pools_json(edge.admin).await
    );
    // The pool refills and serves the next request.
    assert_eq!(c.get("localhost", "/").await.0, 200);
}
