//! Micro-benchmarks of the per-request work in the proxy that does not touch the network:
//! Host normalisation, route lookup (exact and wildcard), header rewriting, and the request
//! side of an access-log entry (build it, hand it to the writer thread, which writes to
//! /dev/null here).
//!
//! `cargo bench --bench proxy_path`

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use edgepop::access_log::{AccessLog, PendingLog};
use edgepop::config::AccessLogTarget;
use edgepop::config::RouteConfig;
use edgepop::proxy::headers;
use edgepop::proxy::router::{normalize_host, Router};
use hyper::header::{HeaderMap, HeaderValue};
use std::time::Duration;

fn router() -> Router {
    let mut routes: Vec<RouteConfig> = (0..1000)
        .map(|i| RouteConfig {
            hosts: vec![format!("www{i}.example.com")],
            origins: vec![0],
            max_body_size: None,
            rate_limit: None,
            hsts: None,
            request_headers: Default::default(),
            response_headers: Default::default(),
        })
        .collect();
    routes.push(RouteConfig {
        hosts: vec!["*.cdn.example.net".into()],
        origins: vec![0],
        max_body_size: None,
        rate_limit: None,
        hsts: None,
        request_headers: Default::default(),
        response_headers: Default::default(),
    });
    Router::new(&routes, None, &std::sync::Arc::default())
}

fn request_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        (
            "user-agent",
            "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0",
        ),
        ("accept", "text/html,application/xhtml+xml"),
        ("accept-encoding", "gzip, br"),
        ("accept-language", "en-US,en;q=0.5"),
        ("cookie", "session=0123456789abcdef"),
        ("connection", "keep-alive"),
        ("keep-alive", "timeout=5"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let r = router();
    c.bench_function("normalize_host", |b| {
        b.iter(|| normalize_host(black_box("WWW500.Example.com:443")))
    });
    c.bench_function("route_exact_of_1000", |b| {
        b.iter(|| r.origins_for(black_box("www500.example.com")).is_some())
    });
    c.bench_function("route_wildcard", |b| {
        b.iter(|| r.origins_for(black_box("img.cdn.example.net")).is_some())
    });
    let via = HeaderValue::from_static("edgepop-tyo1");
    let base = request_headers();
    let client = headers::ClientFields::new("192.0.2.1".parse().expect("ip"), true);
    c.bench_function("rewrite_request_headers", |b| {
        b.iter_batched(
            || base.clone(),
            |mut h| {
                headers::strip_hop_by_hop(&mut h, true);
                headers::set_forwarded(&mut h, &client);
                headers::append_via(&mut h, hyper::Version::HTTP_2, &via);
                h
            },
            criterion::BatchSize::SmallInput,
        )
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .expect("runtime");
    let _guard = rt.enter();
    let log = AccessLog::start(
        &AccessLogTarget::File("/dev/null".into()),
        Default::default(),
    )
    .expect("access log");
    let req = hyper::Request::builder()
        .uri("https://www.example.com/images/logo.png?v=3")
        .body(())
        .expect("request");
    let client = edgepop::proxy::ClientConn {
        addr: "192.0.2.1:51234".parse().expect("addr"),
        handshake: Some(edgepop::metrics::ClientHandshake::Resumed),
        handshake_time: Some(Duration::from_millis(12)),
        request: 1,
        fields: headers::ClientFields::new("192.0.2.1".parse().expect("ip"), true),
    };
    c.bench_function("access_log_entry", |b| {
        b.iter(|| {
            let mut l = PendingLog::new(&log, black_box(&req), &client);
            l.upstream(
                "origin-a",
                200,
                Duration::from_micros(20),
                Duration::from_micros(900),
                "warm",
            );
            l.finish(1234, "ok");
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
