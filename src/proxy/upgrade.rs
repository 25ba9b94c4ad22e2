//! Upgraded requests (WebSocket and other HTTP/1.1 `Upgrade`s from http/1.1 clients): the
//! request goes to the first origin of the route that accepts a connection, over a dedicated
//! http/1.1 connection whatever the pool's protocol (`Pool::open_tunnel`). On `101 Switching
//! Protocols` both sides are upgraded and their bytes copied both ways until either closes.
//! Any other answer is passed on like a normal response. A tunnel with no bytes either way
//! for the origin's `tunnel_idle_timeout` (default 1h, like HAProxy's usual `timeout tunnel`:
//! WebSockets idle by design, so the body `idle_timeout` would be too short) is closed. A
//! tunnel keeps its client connection's slot of `max_connections` and is waited for by drain
//! like the connection it came from (see [`Hold`]).

use super::body::{full, BoxError, ProxyBody, UpstreamBody};
use super::error::ProxyError;
use super::handler::upstream_request;
use super::headers;
use super::Runtime;
use crate::access_log::PendingLog;
use crate::pool::{CheckoutError, Pool, ResponseBody, UpstreamBody as UpBody, UpstreamError};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// Put in an upgrade request's extensions by the connection that carries it: what a tunnel
/// must hold to outlive that connection (its slot of the listener's limit) and where to
/// spawn so that drain waits for it.
#[derive(Clone)]
pub struct Hold {
    pub slot: Arc<dyn std::any::Any + Send + Sync>,
    pub tracker: TaskTracker,
}

/// Forwards an upgrade request; on 101 answers the client with the origin's head and splices
/// the two connections in a task of their own.
pub async fn tunnel(
    rt: &Runtime,
    mut req: Request<Incoming>,
    peer: SocketAddr,
    authority: &str,
    candidates: &[&Pool],
    log: &mut Option<PendingLog>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let Some(protocol) = req.headers().get(header::UPGRADE).cloned() else {
        return Err(ProxyError::BadRequest("Upgrade without a protocol"));
    };
    let hold = req.extensions_mut().remove::<Hold>();
    let client_side = hyper::upgrade::on(&mut req);
    let mut up = upstream_request(rt, req, peer, authority)?;
    up.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    up.headers_mut().insert(header::UPGRADE, protocol);
    let started = Instant::now();
    let (pool, mut resp) = exchange(candidates, up).await?;
    let origin = pool.origin();
    let ttfb = started.elapsed();
    let mut log = log.take();
    if let Some(l) = log.as_mut() {
        l.upstream(
            &origin.name,
            resp.status().as_u16(),
            Duration::ZERO,
            ttfb,
            "fresh",
        );
    }
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let upstream_side = switched.then(|| hyper::upgrade::on(&mut resp));
    let (mut parts, body) = resp.into_parts();
    let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    headers::append_via(&mut parts.headers, parts.version, &rt.via);
    let Some(upstream_side) = upstream_side else {
        // The origin declined the upgrade: an ordinary response.
        let body = UpstreamBody::new(body, None, origin.idle_timeout, log).boxed();
        return Ok(Response::from_parts(parts, body));
    };
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = upgrade_to {
        parts.headers.insert(header::UPGRADE, p);
    }
    let name = origin.name.clone();
    let idle = origin.tunnel_idle_timeout;
    match hold {
        Some(h) => {
            let slot = h.slot;
            h.tracker.spawn(async move {
                splice(client_side, upstream_side, log, &name, idle).await;
                drop(slot);
            })
        }
        None => {
            tokio::spawn(async move { splice(client_side, upstream_side, log, &name, idle).await })
        }
    };
    Ok(Response::from_parts(parts, full("")))
}

/// Waits for both sides to be upgraded, then copies bytes both ways until either closes or
/// nothing moves for `idle`; logs the tunnel when it ends.
async fn splice(
    client_side: hyper::upgrade::OnUpgrade,
    upstream_side: hyper::upgrade::OnUpgrade,
    log: Option<PendingLog>,
    origin: &str,
    idle: Duration,
) {
    let (client, upstream) = match tokio::join!(client_side, upstream_side) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            tracing::debug!(
                origin,
                client_ok = c.is_ok(),
                origin_ok = u.is_ok(),
                "upgrade did not complete"
            );
            if let Some(l) = log {
                l.finish(0, "aborted");
            }
            return;
        }
    };
    let activity = Arc::new(Activity::new());
    let mut client = Tracked::new(TokioIo::new(client), activity.clone());
    let mut upstream = Tracked::new(TokioIo::new(upstream), activity.clone());
    let outcome = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                // An error here is one side closing without a clean shutdown.
                r = &mut copy => break if r.is_ok() { "ok" } else { "aborted" },
                _ = tokio::time::sleep_until(activity.last() + idle) => {
                    if activity.last() + idle <= Instant::now() {
                        tracing::debug!(origin, ?idle, "tunnel idle, closing");
                        break "tunnel idle timeout";
                    }
                }
            }
        }
    };
    if let Some(l) = log {
        l.finish(client.written, outcome);
    }
}

/// Sends the upgrade request over a dedicated connection to the first candidate that accepts
/// one. (Taking a warm pooled http/1.1 connection instead would save the handshake, but
/// driving every pooled connection with hyper's upgrade support measured ~10% fewer
/// requests/s on the ordinary http/1.1 path in `benches/edge/run.sh`.)
async fn exchange<'a>(
    candidates: &[&'a Pool],
    up: Request<UpBody>,
) -> Result<(&'a Pool, Response<ResponseBody>), ProxyError> {
    let mut last = None;
    for &pool in candidates {
        let origin = pool.origin();
        let mut send = match pool.open_tunnel().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(origin = %origin.name, error = %e, "upgrade: connect failed");
                pool.record_failure();
                last = Some(CheckoutError::Connect(e).into());
                continue;
            }
        };
        return match tokio::time::timeout(origin.first_byte_timeout, send.send_request(up)).await {
            Ok(Ok(resp)) => {
                pool.record_success();
                let resp = resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
                Ok((pool, resp))
            }
            Ok(Err(e)) => Err(failed(pool, UpstreamError::Http1(e))),
            Err(_) => Err(timed_out(pool)),
        };
    }
    Err(last.unwrap_or(ProxyError::BadRequest("no origin for this route")))
}

fn failed(pool: &Pool, source: UpstreamError) -> ProxyError {
    pool.record_failure();
    ProxyError::Upstream {
        origin: pool.origin().name.clone(),
        source,
    }
}

fn timed_out(pool: &Pool) -> ProxyError {
    pool.record_failure();
    ProxyError::FirstByteTimeout {
        origin: pool.origin().name.clone(),
        after: pool.origin().first_byte_timeout,
    }
}

/// When bytes last moved through a tunnel, either way.
struct Activity {
    start: Instant,
    /// Milliseconds from `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// One side of a tunnel: records activity, and counts the bytes written to it (kept even
/// when the copy ends in an error).
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
    written: u64,
}

impl<T> Tracked<T> {
    fn new(inner: T, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
            if n > 0 {
                self.activity.touch();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
