//! h2 upstream connections driven by the `h2` crate directly (not hyper's client), because
//! the pool needs what hyper keeps private: PING round trips (liveness *and* the measured
//! PoP-origin RTT) and the origin's SETTINGS_MAX_CONCURRENT_STREAMS.
//!
//! `open` does the h2 handshake and spawns the driver and the pinger; `send` sends one
//! request, pumping its body with h2 flow control, and returns the response with a body that
//! releases flow-control capacity as the client side consumes it.

use super::conn::UpstreamBody;
use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::{Request, Response};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Response bodies from either protocol, as the proxy streams them.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Per-stream and per-connection receive windows: large enough for a PoP-origin path
/// (2 MiB per stream at 80 ms is ~200 Mbit/s per stream), small enough to bound memory.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;

/// What the pinger learns; shared with the pool's stats.
#[derive(Debug, Default)]
pub struct PingStats {
    /// Last PING round trip in microseconds; 0 = none yet.
    pub last_rtt_us: AtomicU64,
}

/// Handshakes h2 over `io` and spawns the driver (until the connection ends or `kill`) and the
/// pinger (PING every `interval`; no PONG within `timeout` cancels `kill`).
pub async fn open<T>(
    io: T,
    interval: Duration,
    timeout: Duration,
    kill: CancellationToken,
    ping: Arc<PingStats>,
) -> Result<
    (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<(), h2::Error>>,
    ),
    h2::Error,
>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, mut connection) = h2::client::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .enable_push(false)
        .handshake::<_, Bytes>(io)
        .await?;
    let pong = connection.ping_pong();
    let k = kill.clone();
    let driver = tokio::spawn(async move {
        // select!: the connection ending on its own, or the pinger / pool killing it (dropping
        // the connection closes the socket).
        tokio::select! {
            r = connection => r,
            _ = k.cancelled() => Ok(()),
        }
    });
    if let Some(pong) = pong {
        tokio::spawn(pinger(pong, interval, timeout, kill, ping));
    }
    Ok((send, driver))
}

async fn pinger(
    mut pong: h2::PingPong,
    interval: Duration,
    timeout: Duration,
    kill: CancellationToken,
    stats: Arc<PingStats>,
) {
    // The first PING right away: it measures the RTT before any request needs it.
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = kill.cancelled() => return,
        }
        wait = interval;
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(timeout, pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {
                let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.last_rtt_us.store(us.max(1), Ordering::Relaxed);
            }
            Ok(Err(_)) => return, // the connection is gone; the driver reports it
            Err(_) => {
                tracing::warn!(after = ?timeout, "upstream PING unanswered; closing the connection");
                kill.cancel();
                return;
            }
        }
    }
}

/// Why an h2 send failed, and whether the request is known not to have left.
pub struct H2SendError {
    pub error: h2::Error,
    pub request: Option<Request<UpstreamBody>>,
}

/// Sends one request; the body (if any) is pumped by its own task.
pub async fn send(
    send: &h2::client::SendRequest<Bytes>,
    req: Request<UpstreamBody>,
) -> Result<Response<ResponseBody>, H2SendError> {
    let mut ready = match send.clone().ready().await {
        Ok(r) => r,
        Err(error) => {
            return Err(H2SendError {
                error,
                request: Some(req),
            })
        }
    };
    let (parts, body) = req.into_parts();
    let end = body.is_end_stream();
    let (response, stream) = match ready.send_request(Request::from_parts(parts, ()), end) {
        Ok(r) => r,
        Err(error) => {
            return Err(H2SendError {
                error,
                request: None,
            })
        }
    };
    if !end {
        tokio::spawn(pump(body, stream));
    }
    let resp = response.await.map_err(|error| H2SendError {
        error,
        request: None,
    })?;
    let (parts, recv) = resp.into_parts();
    let body = RecvBody {
        recv,
        data_done: false,
    };
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// Streams the client's body upstream, never holding more than the peer's window.
async fn pump(mut body: UpstreamBody, mut stream: h2::SendStream<Bytes>) {
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(_) => {
                stream.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        match frame.into_data() {
            Ok(mut data) => {
                while data.has_remaining() {
                    stream.reserve_capacity(data.len());
                    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
                    let n = match granted {
                        Some(Ok(n)) => n.min(data.len()),
                        _ => return, // stream reset or connection gone
                    };
                    if stream.send_data(data.split_to(n), false).is_err() {
                        return;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    let _ = stream.send_trailers(trailers);
                    return;
                }
            }
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
}

/// An h2 response body that gives flow-control capacity back as it is read.
struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if !self.data_done {
            match self.recv.poll_data(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Ok(data))) => {
                    let _ = self.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(Box::new(e)))),
                Poll::Ready(None) => self.data_done = true,
            }
        }
        match self.recv.poll_trailers(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::default()
    }
}
