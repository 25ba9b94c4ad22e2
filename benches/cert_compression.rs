//! What TLS certificate compression (RFC 8879) saves a client's first connection: the bytes
//! of the server's first flight, and over QUIC a whole round trip once the certificate chain
//! is large. Before a QUIC server has seen the client's address confirmed it may send only
//! three times what it received (RFC 9000 §8.1; the client's first datagram is 1,200 bytes),
//! so a first flight above ~3,600 bytes waits for the client's next datagram, one RTT later.
//!
//! For chains of two sizes (a leaf with N host names, plus its CA), the edge serves HTTP/3
//! behind the user-space WAN relay (RTT 50 ms, loopback otherwise) and a quinn client makes
//! full handshakes with and without offering compression (rustls offers brotli and zlib).
//! Over TCP the same bytes are saved (`tests/it/edge.rs` checks it); the round trip is not at
//! stake there, since TCP's initial window (10 segments) holds such a flight.
//!
//! `cargo bench --bench cert_compression` (release; about ten seconds).

use edgepop::serve::EdgeServer;
use edgepop::wan::UdpRelay;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const RTT: Duration = Duration::from_millis(50);
const SAMPLES: usize = 7;

fn any() -> SocketAddr {
    "127.0.0.1:0".parse().expect("addr")
}

/// A leaf naming `localhost` and `hosts` more, and its CA: (PEM chain, PEM key, roots, DER size).
fn chain(hosts: usize) -> (String, String, rustls::RootCertStore, usize) {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "edgepop bench CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let names: Vec<String> = std::iter::once("localhost".to_string())
        .chain((0..hosts).map(|i| format!("www{i}.shop-{}.example", i * 7919 % 10007)))
        .collect();
    let key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(names)
        .expect("leaf")
        .signed_by(&key, &ca, &ca_key)
        .expect("leaf cert");
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca.der().clone()).expect("root");
    let size = leaf.der().len() + ca.der().len();
    (
        format!("{}{}", leaf.pem(), ca.pem()),
        key.serialize_pem(),
        roots,
        size,
    )
}

fn edge_config(dir: &Path, pem: &str, key: &str) -> String {
    std::fs::write(dir.join("chain.crt"), pem).expect("write");
    std::fs::write(dir.join("chain.key"), key).expect("write");
    let text = format!(
        "[pop]\nname = \"bench\"\n[[listeners]]\naddress = \"127.0.0.1:0\"\nhttp3 = true\n[[certificates]]\nnames = [\"localhost\"]\ncert = \"{d}/chain.crt\"\nkey = \"{d}/chain.key\"\n[[origins]]\nname = \"o\"\naddress = \"127.0.0.1:9\"\nserver_name = \"origin.edgepop.test\"\nwarm_connections = 0\n[[routes]]\nhosts = [\"localhost\"]\norigins = [\"o\"]\n",
        d = dir.display()
    );
    std::fs::write(dir.join("edge.toml"), &text).expect("write");
    text
}

fn client_tls(roots: &rustls::RootCertStore, alpn: &[u8], compress: bool) -> rustls::ClientConfig {
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .expect("TLS 1.3")
    .with_root_certificates(roots.clone())
    .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    if !compress {
        tls.cert_decompressors = Vec::new();
    }
    tls
}

/// Median QUIC handshake time through `relay` (a fresh client each time: full handshakes)
/// and the UDP bytes received by its end.
async fn quic(relay: SocketAddr, roots: &rustls::RootCertStore, compress: bool) -> (Duration, u64) {
    let mut samples = Vec::new();
    let mut bytes = 0;
    for _ in 0..SAMPLES {
        let tls = client_tls(roots, b"h3", compress);
        let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).expect("QUIC TLS");
        let mut endpoint = quinn::Endpoint::client(any()).expect("UDP");
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(quic)));
        let started = Instant::now();
        let conn = endpoint
            .connect(relay, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        samples.push(started.elapsed());
        bytes = conn.stats().udp_rx.bytes;
        conn.close(0u32.into(), b"");
        endpoint.wait_idle().await;
    }
    samples.sort();
    (samples[samples.len() / 2], bytes)
}

#[tokio::main]
async fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        return; // `cargo test --all-targets` builds benches and runs them without --bench.
    }
    println!(
        "QUIC handshake over a {} ms RTT (median of {SAMPLES}), and bytes received:",
        RTT.as_millis()
    );
    for hosts in [20, 150] {
        let dir = tempfile::tempdir().expect("tempdir");
        let (pem, key, roots, der) = chain(hosts);
        let text = edge_config(dir.path(), &pem, &key);
        let cfg = edgepop::config::parse(&dir.path().join("edge.toml"), &text).expect("config");
        let server = EdgeServer::start(&cfg).await.expect("edge");
        let edge = server.listen_addrs[0];
        let relay = UdpRelay::start(any(), edge, RTT / 2).await.expect("relay");
        let (t_plain, b_plain) = quic(relay.local_addr(), &roots, false).await;
        let (t_comp, b_comp) = quic(relay.local_addr(), &roots, true).await;
        println!(
            "  chain of {der} bytes ({hosts} host names): uncompressed {:.1} ms ({b_plain} bytes), compressed {:.1} ms ({b_comp} bytes): {:.2}x the time, {:.2}x the bytes",
            t_plain.as_secs_f64() * 1e3,
            t_comp.as_secs_f64() * 1e3,
            t_comp.as_secs_f64() / t_plain.as_secs_f64(),
            b_comp as f64 / b_plain as f64,
        );
        drop(relay);
        server.drain().await;
    }
}
