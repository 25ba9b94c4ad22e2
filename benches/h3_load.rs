//! HTTP/3 load for `benches/edge/h3.sh` (no packaged load generator speaks HTTP/3): `C`
//! QUIC connections, `M` requests in flight on each, `N` GETs in all against
//! `https://localhost:PORT/`, trusting certs/dev-ca.crt. Prints h2load's summary line shape,
//! `finished in X s, Y req/s`, and the failures.
//!
//! `cargo bench --bench h3_load -- PORT [N] [C] [M]`

use bytes::{Buf, Bytes};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

fn arg(args: &[String], i: usize, default: u64) -> u64 {
    args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; the numbers are the plain arguments.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let Some(port) = args.first().and_then(|p| p.parse::<u16>().ok()) else {
        eprintln!("usage: h3_load PORT [N] [C] [M]");
        return Ok(());
    };
    let (n, c, m) = (arg(&args, 1, 100_000), arg(&args, 2, 16), arg(&args, 3, 32));
    let ca = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("certs/dev-ca.crt");
    let roots = edgepop::tls::certs::load_roots(&ca)?;
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"h3".to_vec()];
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse()?)?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
    let addr: SocketAddr = ([127, 0, 0, 1], port).into();
    let issued = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..c {
        let conn = endpoint.connect(addr, "localhost")?.await?;
        let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
        tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        for _ in 0..m {
            let mut send = send.clone();
            let (issued, failed) = (issued.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while issued.fetch_add(1, Ordering::Relaxed) < n {
                    if get(&mut send).await.is_err() {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await?;
    }
    let secs = started.elapsed().as_secs_f64();
    let failed = failed.load(Ordering::Relaxed);
    println!(
        "finished in {secs:.2}s, {:.2} req/s; requests: {n} total, {} succeeded, {failed} failed",
        n as f64 / secs,
        n - failed
    );
    Ok(())
}

async fn get(
    send: &mut h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let req = http::Request::get("https://localhost/").body(())?;
    let mut stream = send.send_request(req).await?;
    stream.finish().await?;
    let resp = stream.recv_response().await?;
    while let Some(mut chunk) = stream.recv_data().await? {
        chunk.advance(chunk.remaining());
    }
    if resp.status() != 200 {
        return Err(format!("status {}", resp.status()).into());
    }
    Ok(())
}
