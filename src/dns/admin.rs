//! The sidecar's own admin listener (plain HTTP/1.1): `/healthz`, `/map` (JSON), `/metrics`
//! (Prometheus text). Meant to be folded into the shared admin module later.

use super::{DnsError, DnsState};
use http_body_util::Full;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Binds `addr` and serves until `cancel`; returns the bound address.
pub async fn start(
    addr: SocketAddr,
    state: DnsState,
    cancel: CancellationToken,
) -> Result<SocketAddr, DnsError> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| DnsError::AdminBind { addr, source })?;
    let local = listener
        .local_addr()
        .map_err(|source| DnsError::AdminBind { addr, source })?;
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = cancel.cancelled() => return,
                r = listener.accept() => match r {
                    Ok((s, _)) => s,
                    Err(_) => continue,
                },
            };
            let state = state.clone();
            let cancel = cancel.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, std::convert::Infallible>(route(&state, &req)) }
                });
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(10))
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = conn => {}
                }
            });
        }
    });
    Ok(local)
}

fn route<B>(state: &DnsState, req: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let (status, ctype, body) = match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/healthz") => {
            if state.healthz() {
                (http::StatusCode::OK, "text/plain", "ok\n".to_string())
            } else {
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "no healthy pop\n".to_string(),
                )
            }
        }
        (&http::Method::GET, "/map") => (
            http::StatusCode::OK,
            "application/json",
            format!("{:#}\n", state.map_json()),
        ),
        (&http::Method::GET, "/metrics") => (
            http::StatusCode::OK,
            "text/plain; version=0.0.4",
            super::stats::render(state),
        ),
        _ => (
            http::StatusCode::NOT_FOUND,
            "text/plain",
            "not found\n".to_string(),
        ),
    };
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    if let Ok(v) = http::HeaderValue::from_str(ctype) {
        resp.headers_mut().insert(http::header::CONTENT_TYPE, v);
    }
    resp
}
