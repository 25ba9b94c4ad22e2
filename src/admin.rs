//! The admin listener (plain HTTP/1.1, bind it to loopback or a management network):
//! `/healthz` (200 only when this PoP can serve fast: not draining, and every route has an
//! origin with a warm connection), `/pools` (JSON), `/metrics` (Prometheus text).

use crate::metrics::{self, EdgeCounters};
use crate::pool::Pool;
use crate::proxy::Runtime;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http_body_util::Full;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// What the edge exposes to the admin listener.
#[derive(Clone)]
pub struct EdgeStatus {
    pub runtime: Arc<ArcSwap<Runtime>>,
    pub draining: Arc<AtomicBool>,
    pub counters: Arc<EdgeCounters>,
}

impl EdgeStatus {
    /// Ready to serve fast: not draining, and each route has a healthy origin whose pool is
    /// at work (a warm connection open, or no floor to keep: `warm_connections = 0` opens on
    /// demand, and an idle PoP is not a broken one).
    pub fn health(&self) -> Result<(), String> {
        if self.draining.load(Ordering::Acquire) {
            return Err("draining".into());
        }
        let rt = self.runtime.load();
        let ready = |p: &Pool| p.is_healthy() && (p.floor() == 0 || p.warm_count() > 0);
        for route in rt.router.routes() {
            let pools = || route.iter().filter_map(|&i| rt.pools.get(i));
            if !pools().any(ready) {
                let names: Vec<&str> = pools().map(|p| p.origin().name.as_str()).collect();
                return Err(format!(
                    "no healthy origin with a warm connection for origins {}",
                    names.join(", ")
                ));
            }
        }
        Ok(())
    }

    pub fn pools_json(&self) -> serde_json::Value {
        let rt = self.runtime.load();
        let pools: Vec<_> = rt.pools.iter().map(|p| p.snapshot()).collect();
        serde_json::json!({ "pools": pools })
    }

    pub fn metrics(&self) -> String {
        let rt = self.runtime.load();
        let pools: Vec<_> = rt.pools.iter().map(|p| p.snapshot()).collect();
        metrics::render_edge(
            &self.counters,
            &pools,
            &rt.certificates,
            self.draining.load(Ordering::Acquire),
            rt.access_log.as_ref().map(|l| l.dropped()),
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("binding admin listener {address}: {source}")]
pub struct AdminError {
    address: SocketAddr,
    #[source]
    source: std::io::Error,
}

/// Binds the admin listener and serves it until `shutdown`; returns the bound address.
///
/// With `tls` (the edge's certificates) the same port also speaks HTTPS, told apart by the
/// first byte of the connection, so a DNS sidecar can check `https://<pop>:<admin>/healthz`
/// as DESIGN's region file does.
pub async fn start(
    address: SocketAddr,
    status: EdgeStatus,
    tls: Option<Arc<ArcSwap<rustls::ServerConfig>>>,
    shutdown: CancellationToken,
) -> Result<SocketAddr, AdminError> {
    let listener = TcpListener::bind(address)
        .await
        .map_err(|source| AdminError { address, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| AdminError { address, source })?;
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(_) => continue,
                },
                _ = shutdown.cancelled() => return,
            };
            let status = status.clone();
            let tls = tls.clone();
            tokio::spawn(async move {
                let serve = async {
                    match &tls {
                        Some(t) if is_tls(&tcp).await => {
                            let acceptor = tokio_rustls::TlsAcceptor::from(admin_tls(&t.load()));
                            if let Ok(stream) = acceptor.accept(tcp).await {
                                serve_admin(stream, status).await;
                            }
                        }
                        _ => serve_admin(tcp, status).await,
                    }
                };
                // The whole admin exchange is bounded: a stuck client cannot pile up tasks.
                let _ = tokio::time::timeout(ADMIN_CONNECTION_LIMIT, serve).await;
            });
        }
    });
    Ok(local)
}

/// Longest an admin connection lives (scrapes and health checks take milliseconds).
const ADMIN_CONNECTION_LIMIT: Duration = Duration::from_secs(60);

/// A TLS ClientHello starts with the handshake record type, 0x16; no HTTP request does.
async fn is_tls(tcp: &tokio::net::TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(Duration::from_secs(10), tcp.peek(&mut first)).await,
        Ok(Ok(1))
    ) && first[0] == 0x16
}

/// The edge's certificates, offering http/1.1 only (the admin server speaks nothing else),
/// no 0-RTT (tokio-rustls' acceptor would drop early data; rejected, a client resends it) and
/// no session cache of its own.
fn admin_tls(edge: &rustls::ServerConfig) -> Arc<rustls::ServerConfig> {
    let mut cfg = edge.clone();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.max_early_data_size = 0;
    // Health checks need no resumption, and must not fill the edge's session cache (with
    // 0-RTT on, the sessions clients resume from).
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    Arc::new(cfg)
}

async fn serve_admin<IO>(io: IO, status: EdgeStatus)
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| {
        let status = status.clone();
        async move { Ok::<_, Infallible>(route(&status, &req)) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(10))
        .serve_connection(TokioIo::new(io), svc)
        .await;
}

fn route<B>(status: &EdgeStatus, req: &Request<B>) -> Response<Full<Bytes>> {
    match req.uri().path() {
        "/healthz" => match status.health() {
            Ok(()) => text(StatusCode::OK, "ok\n".into()),
            Err(why) => text(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("unhealthy: {why}\n"),
            ),
        },
        "/pools" => json(&status.pools_json()),
        "/metrics" => {
            let mut r = text(StatusCode::OK, status.metrics());
            r.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

pub fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

pub fn json(v: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(v.to_string())));
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}
