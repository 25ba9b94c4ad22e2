//! How faithful is the WAN relay? Probes a local TLS origin through `wan::Relay` and prints,
//! per mode, the p50 of TLS-done and TTFB against the ideal multiples of the round trip
//! (cold: 2 RTT and 3 RTT; warm: 1 RTT), plus a plain TCP ping-pong (1 RTT) without TLS.
//!
//! `cargo bench --bench wan_accuracy` (release build; run it on an idle machine).

use edgepop::probe::{measure, Mode, Options, Row, Target, Trust};
use edgepop::wan::Relay;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

fn certs() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("certs")
}

async fn origin() -> SocketAddr {
    let chain = edgepop::tls::certs::load_chain(&certs().join("origin.crt")).expect("chain");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(certs().join("origin.key")).expect("key");
    let mut cfg = rustls::ServerConfig::builder_with_provider(edgepop::tls::provider_arc())
        .with_protocol_versions(edgepop::tls::VERSIONS)
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        Bytes::from_static(b"hello\n"),
                    )))
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// `direct`: the same phase without the relay (crypto and HTTP work on loopback), which a real
/// link would add too; what is left after it is the relay's own error.
fn line(what: &str, p50: Duration, ideal: f64, direct: Duration) {
    let p = ms(p50);
    println!(
        "{what:<28} p50 {p:>8.3} ms  ideal {ideal:>6.1} ms  error {:>+7.3} ms  \
         (loopback cost {:>6.3} ms, relay error {:>+7.3} ms)",
        p - ideal,
        ms(direct),
        p - ideal - ms(direct)
    );
}

async fn tcp_ping_pong(delay: Duration, n: usize) -> Duration {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let up = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).await.is_ok() {
                    if s.write_all(&b).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let relay = Relay::start("127.0.0.1:0".parse().expect("addr"), up, delay)
        .await
        .expect("relay");
    let mut c = TcpStream::connect(relay.local_addr())
        .await
        .expect("connect");
    c.set_nodelay(true).expect("nodelay");
    let mut b = [0u8; 1];
    // The first exchange pays the set-up round trip; measure the ones after it.
    c.write_all(b"x").await.expect("write");
    c.read_exact(&mut b).await.expect("read");
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.write_all(b"x").await.expect("write");
        c.read_exact(&mut b).await.expect("read");
        v.push(t.elapsed());
    }
    v.sort_unstable();
    v[(v.len() - 1) / 2]
}

fn main() {
    // `cargo test --all-targets` runs harness-less benches too, without `--bench`: skip there.
    if !std::env::args().any(|a| a == "--bench") {
        println!(
            "wan_accuracy: measurement skipped (run it with `cargo bench --bench wan_accuracy`)"
        );
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let roots = edgepop::tls::certs::load_roots(&certs().join("dev-ca.crt")).expect("CA");
        let origin = origin().await;
        for one_way in [5u64, 25] {
            let d = Duration::from_millis(one_way);
            let rtt = 2.0 * one_way as f64;
            println!("one-way delay {one_way} ms (RTT {rtt} ms)");
            line(
                "tcp ping-pong (1 RTT)",
                tcp_ping_pong(d, 50).await,
                rtt,
                tcp_ping_pong(Duration::ZERO, 50).await,
            );
            let relay = Relay::start("127.0.0.1:0".parse().expect("addr"), origin, d)
                .await
                .expect("relay");
            let url = format!("https://127.0.0.1:{}/", relay.local_addr().port());
            let direct = format!("https://127.0.0.1:{}/", origin.port());
            let targets = [
                Target::parse(&url).expect("url"),
                Target::parse(&direct).expect("url"),
            ];
            for mode in [Mode::Cold, Mode::Resumed, Mode::Warm] {
                let opts = Options {
                    count: 50,
                    mode,
                    trust: Trust::Roots(roots.clone()),
                    ..Options::default()
                };
                let r = measure(&targets, &opts).await;
                let p50 =
                    |i: usize, row| r.targets[i].stats(row).map(|s| s.p50).unwrap_or_default();
                let name = mode.as_str();
                if mode != Mode::Warm {
                    line(
                        &format!("{name}: tls done (2 RTT)"),
                        p50(0, Row::Connect) + p50(0, Row::Tls),
                        2.0 * rtt,
                        p50(1, Row::Connect) + p50(1, Row::Tls),
                    );
                    line(
                        &format!("{name}: ttfb (3 RTT)"),
                        p50(0, Row::Ttfb),
                        3.0 * rtt,
                        p50(1, Row::Ttfb),
                    );
                } else {
                    line(
                        &format!("{name}: ttfb (1 RTT)"),
                        p50(0, Row::Ttfb),
                        rtt,
                        p50(1, Row::Ttfb),
                    );
                }
                if mode == Mode::Cold {
                    compare_with_curl(&url, &r);
                }
            }
        }
    });
}

/// curl's `time_connect time_appconnect time_starttransfer` p50 over 20 runs against the same
/// URL, beside the probe's cold p50 (connect, connect + tls, ttfb).
fn compare_with_curl(url: &str, r: &edgepop::probe::Report) {
    let ca = certs().join("dev-ca.crt");
    let mut cols: [Vec<f64>; 3] = Default::default();
    for _ in 0..20 {
        let out = std::process::Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--cacert"])
            .arg(&ca)
            .args([
                "-w",
                "%{time_connect} %{time_appconnect} %{time_starttransfer}",
                url,
            ])
            .output();
        let Ok(out) = out else {
            println!("curl not available: comparison skipped");
            return;
        };
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        for (col, v) in cols.iter_mut().zip(text.split_whitespace()) {
            if let Ok(v) = v.parse::<f64>() {
                col.push(v * 1000.0);
            }
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v.get(v.len().saturating_sub(1) / 2)
            .copied()
            .unwrap_or(f64::NAN)
    };
    let t = &r.targets[0];
    let p = |row| t.stats(row).map(|s| ms(s.p50)).unwrap_or(f64::NAN);
    let [c, a, s] = &mut cols;
    println!(
        "probe vs curl, p50 ms        connect {:>8.3} / {:>8.3}  tls done {:>8.3} / {:>8.3}  ttfb {:>8.3} / {:>8.3}",
        p(Row::Connect),
        med(c),
        p(Row::Connect) + p(Row::Tls),
        med(a),
        p(Row::Ttfb),
        med(s)
    );
}
