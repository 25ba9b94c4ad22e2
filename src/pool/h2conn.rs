//! h2 upstream connections driven by the `h2` crate directly (not hyper's client), because
//! the pool needs what hyper keeps private: PING round trips (liveness *and* the measured
//! PoP-origin RTT) and the origin's SETTINGS_MAX_CONCURRENT_STREAMS.
//!
//! `open` does the h2 handshake and spawns the driver and the pinger (liveness, RTT, and the
//! bandwidth-delay samples that grow the receive windows); `send` sends one request, pumping
//! its body with h2 flow control, and returns the response with a body that releases
//! flow-control capacity as the client side consumes it.

use super::conn::UpstreamBody;
use bytes::{Buf, Bytes};
use futures_util::FutureExt;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::{Request, Response};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Response bodies from either protocol, as the proxy streams them.
pub type ResponseBody = http_body_util::combinators::UnsyncBoxBody<Bytes, BoxError>;

/// Starting per-stream and per-connection receive windows. One stream can have at most its
/// window in flight per round trip (2 MiB at 80 ms is ~25 MiB/s), so while responses flow the
/// pinger measures the bandwidth-delay product and grows the windows to fit it (as hyper's
/// adaptive window does), up to the maxima, which bound what a slow client can make the
/// edge buffer.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_STREAM_WINDOW: u32 = 16 * 1024 * 1024;
const MAX_CONNECTION_WINDOW: u32 = 128 * 1024 * 1024;

/// What the pinger learns, and what it needs from the response bodies; shared with the
/// pool's stats.
#[derive(Debug)]
pub struct PingStats {
    /// Last PING round trip in microseconds; 0 = none yet.
    pub last_rtt_us: AtomicU64,
    /// The connection's current per-stream receive window.
    pub stream_window: AtomicU64,
    /// DATA bytes the client side has read from this connection's streams.
    received: AtomicU64,
    /// Set by the pinger when it wants the next DATA frame to start a bandwidth sample.
    want_sample: AtomicBool,
    data: Notify,
}

impl Default for PingStats {
    fn default() -> Self {
        PingStats {
            last_rtt_us: AtomicU64::new(0),
            stream_window: AtomicU64::new(u64::from(STREAM_WINDOW)),
            received: AtomicU64::new(0),
            want_sample: AtomicBool::new(false),
            data: Notify::new(),
        }
    }
}

impl PingStats {
    /// Counts `n` bytes read; wakes the pinger if it waits for data to sample.
    fn read(&self, n: usize) {
        self.received.fetch_add(n as u64, Ordering::Relaxed);
        if self.want_sample.load(Ordering::Relaxed)
            && self.want_sample.swap(false, Ordering::AcqRel)
        {
            self.data.notify_one();
        }
    }
}

/// The connection window that goes with a stream window: eight streams' worth, so a few
/// streams stalled behind slow clients cannot take all of it.
fn connection_window(stream: u32) -> u32 {
    stream
        .saturating_mul(8)
        .clamp(CONNECTION_WINDOW, MAX_CONNECTION_WINDOW)
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
    let (windows, mut new_window) = tokio::sync::mpsc::unbounded_channel::<u32>();
    let stats = ping.clone();
    let driver = tokio::spawn(async move {
        // A window whose SETTINGS h2 could not send yet (one SETTINGS at a time: the previous
        // one is not acknowledged yet): retried shortly.
        let mut pending: Option<u32> = None;
        // select!: the connection ending on its own, the pinger / pool killing it (dropping
        // the connection closes the socket), the pinger growing the receive windows, or the
        // retry of a pending window.
        loop {
            tokio::select! {
                r = &mut connection => return r,
                _ = k.cancelled() => return Ok(()),
                Some(w) = new_window.recv() => pending = Some(w),
                _ = tokio::time::sleep(SETTINGS_RETRY), if pending.is_some() => {}
            }
            if let Some(w) = pending {
                connection.set_target_window_size(connection_window(w));
                match connection.set_initial_window_size(w) {
                    Ok(()) => {
                        stats.stream_window.store(u64::from(w), Ordering::Relaxed);
                        pending = None;
                    }
                    Err(e) => tracing::debug!(error = %e, "h2 stream window: retrying"),
                }
            }
        }
    });
    if let Some(pong) = pong {
        tokio::spawn(pinger(pong, interval, timeout, kill, ping, windows));
    }
    Ok((send, driver))
}

async fn pinger(
    mut pong: h2::PingPong,
    interval: Duration,
    timeout: Duration,
    kill: CancellationToken,
    stats: Arc<PingStats>,
    windows: tokio::sync::mpsc::UnboundedSender<u32>,
) {
    use tokio::time::{sleep_until, Instant};
    // The first PING right away: it measures the RTT before any request needs it.
    let mut keepalive_at = Instant::now();
    let mut window = STREAM_WINDOW;
    // Bandwidth samples: the next DATA read after `sample_at` starts one; the bytes read
    // during that PING's round trip are the bandwidth-delay product. A sample that does not
    // grow the window doubles the pause before the next (100 ms to 10 s, as hyper does), so
    // a connection busy with small responses is not flooded with PINGs.
    let mut sample_at = Instant::now();
    let mut calm = Duration::ZERO;
    let mut armed = false;
    loop {
        let growable = window < MAX_STREAM_WINDOW;
        let sample = tokio::select! {
            _ = sleep_until(keepalive_at) => false,
            _ = sleep_until(sample_at), if growable && !armed => {
                armed = true;
                stats.want_sample.store(true, Ordering::Release);
                continue;
            }
            _ = stats.data.notified(), if armed => {
                armed = false;
                true
            }
            _ = kill.cancelled() => return,
        };
        let sent = Instant::now();
        keepalive_at = sent + interval;
        let before = stats.received.load(Ordering::Acquire);
        match tokio::time::timeout(timeout, pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_pong)) => {
                let us = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
                stats.last_rtt_us.store(us.max(1), Ordering::Relaxed);
                let bdp = stats
                    .received
                    .load(Ordering::Acquire)
                    .saturating_sub(before);
                if armed && !stats.want_sample.load(Ordering::Acquire) {
                    // A read during this PING took the arming: the stored wake-up is stale.
                    armed = false;
                    let _ = stats.data.notified().now_or_never();
                }
                match grown(window, bdp) {
                    Some(w) => {
                        window = w;
                        calm = Duration::ZERO;
                        tracing::debug!(window = w, bdp, rtt_us = us, "growing h2 receive windows");
                        if windows.send(w).is_err() {
                            return; // the driver is gone
                        }
                        // The next sample once the new SETTINGS is in force.
                        sample_at = Instant::now() + sent.elapsed() * 2;
                    }
                    // Keepalive PINGs on an idle connection say nothing about bandwidth.
                    None if sample => {
                        calm = (calm * 2).clamp(MIN_SAMPLE_PAUSE, MAX_SAMPLE_PAUSE);
                        sample_at = Instant::now() + calm;
                    }
                    None => {}
                }
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

const MIN_SAMPLE_PAUSE: Duration = Duration::from_millis(100);
const SETTINGS_RETRY: Duration = Duration::from_millis(20);
const MAX_SAMPLE_PAUSE: Duration = Duration::from_secs(10);

/// The stream window after a bandwidth sample of `bdp` bytes in one round trip: doubled past
/// the sample when the sample filled two thirds of it (the window was the limit), else
/// unchanged (`None`).
fn grown(window: u32, bdp: u64) -> Option<u32> {
    if bdp.saturating_mul(3) < u64::from(window) * 2 {
        return None;
    }
    let target = bdp.saturating_mul(2).min(u64::from(MAX_STREAM_WINDOW));
    let w = u32::try_from(target).unwrap_or(MAX_STREAM_WINDOW);
    (w > window).then_some(w)
}

/// Why an h2 send failed, and whether the request is known not to have left.
pub struct H2SendError {
    pub error: h2::Error,
    pub request: Option<Request<UpstreamBody>>,
}

/// Sends one request; the body (if any) is pumped by its own task.
pub async fn send(
    send: &h2::client::SendRequest<Bytes>,
    stats: &Arc<PingStats>,
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
    // Dropped with this future (no response head in time, the request given up): the pump
    // then resets the stream instead of waiting on an origin that may never read again.
    let given_up = tokio_util::sync::CancellationToken::new();
    let _cancel_pump = given_up.clone().drop_guard();
    // Set once the head is in: a stream failing after it is not a refusal, and the body is
    // not read on for a replay then.
    let answered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if !end {
        tokio::spawn(pump(body, stream, given_up, answered.clone()));
    }
    let resp = match response.await {
        Ok(r) => r,
        Err(error) => {
            if error.is_remote()
                && (error.is_go_away() || error.reason() == Some(h2::Reason::REFUSED_STREAM))
            {
                // Refused unprocessed: the pump reads the rest of a small body, so that a
                // copy of it (`proxy::replay`) is whole and the request can go again.
                _cancel_pump.disarm();
            }
            return Err(H2SendError {
                error,
                request: None,
            });
        }
    };
    // The head arrived: the pump finishes the body on its own (the origin is reading).
    answered.store(true, std::sync::atomic::Ordering::Release);
    _cancel_pump.disarm();
    let (parts, recv) = resp.into_parts();
    let body = RecvBody {
        recv,
        data_done: false,
        stats: stats.clone(),
    };
    Ok(Response::from_parts(parts, body.boxed_unsync()))
}

/// Streams the client's body upstream, never holding more than the peer's window; resets the
/// stream if the request is given up first.
async fn pump(
    body: UpstreamBody,
    mut stream: h2::SendStream<Bytes>,
    given_up: tokio_util::sync::CancellationToken,
    answered: Arc<std::sync::atomic::AtomicBool>,
) {
    let done = tokio::select! {
        biased;
        () = given_up.cancelled() => false,
        done = pump_body(body, &mut stream, &answered) => done,
    };
    if !done {
        stream.send_reset(h2::Reason::CANCEL);
    }
}

/// Returns false if the stream must be reset (the body failed).
async fn pump_body(
    mut body: UpstreamBody,
    stream: &mut h2::SendStream<Bytes>,
    answered: &std::sync::atomic::AtomicBool,
) -> bool {
    let mut read = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return false;
        };
        match frame.into_data() {
            Ok(mut data) => {
                read += data.len();
                while data.has_remaining() {
                    stream.reserve_capacity(data.len());
                    let granted = std::future::poll_fn(|cx| stream.poll_capacity(cx)).await;
                    let sent = match granted {
                        Some(Ok(n)) => {
                            let n = n.min(data.len());
                            stream.send_data(data.split_to(n), false).is_ok()
                        }
                        // Stream reset or connection gone.
                        _ => false,
                    };
                    if !sent {
                        if !answered.load(std::sync::atomic::Ordering::Acquire) {
                            drain(&mut body, read).await;
                        }
                        return true;
                    }
                }
            }
            Err(frame) => {
                if let Ok(trailers) = frame.into_trailers() {
                    // Refused (a connection-specific field): the stream would stay open
                    // without END_STREAM, so it is reset instead.
                    return stream.send_trailers(trailers).is_ok();
                }
            }
        }
    }
    let _ = stream.send_data(Bytes::new(), true);
    true
}

/// After the stream failed before any answer: reads what is left of a small body (`read`
/// bytes of it so far; up to the 64 KiB a retry keeps, `proxy::replay`, and for at most the
/// 2 s a retry waits for it), which a request the origin refused unprocessed can then be
/// sent again with. Any other failure drops the pump (and this) as the request returns.
async fn drain(body: &mut UpstreamBody, read: usize) {
    let mut left = (64 * 1024usize).saturating_sub(read);
    if body.size_hint().lower() > left as u64 {
        return;
    }
    let rest = async {
        while !body.is_end_stream() {
            match body.frame().await {
                Some(Ok(f)) => match f.data_ref() {
                    Some(d) if d.len() > left => break,
                    Some(d) => left -= d.len(),
                    None => {}
                },
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), rest).await;
}

/// An h2 response body that gives flow-control capacity back as it is read.
struct RecvBody {
    recv: h2::RecvStream,
    data_done: bool,
    stats: Arc<PingStats>,
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
                    self.stats.read(data.len());
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_grow_only_when_a_sample_fills_two_thirds_of_them() {
        let w = STREAM_WINDOW;
        assert_eq!(grown(w, u64::from(w) / 2), None);
        assert_eq!(grown(w, u64::from(w)), Some(2 * w));
        assert_eq!(grown(w, 3 * u64::from(w)), Some(6 * w));
        assert_eq!(grown(w, u64::MAX), Some(MAX_STREAM_WINDOW));
        assert_eq!(grown(MAX_STREAM_WINDOW, u64::MAX), None);
        assert_eq!(connection_window(STREAM_WINDOW), CONNECTION_WINDOW);
        assert_eq!(connection_window(MAX_STREAM_WINDOW), MAX_CONNECTION_WINDOW);
        assert_eq!(connection_window(4 * STREAM_WINDOW), 64 << 20);
    }
}
