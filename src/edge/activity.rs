//! Requests in flight on one client connection (TCP or QUIC), since when there have been
//! none, and (http/1.1) since when the client has been sending its next request's head: the
//! connection's timer checks them when it fires instead of being woken on every request start
//! and end or on every read.
//!
//! The http/1.1 head timer is ours, not hyper's: hyper starts its `header_read_timeout` when
//! the last response ends (hyper#3828), which would close an idle keep-alive connection after
//! `header_timeout` instead of `idle_timeout`. Here, as in nginx (`keepalive_timeout`, then
//! `client_header_timeout` from the first byte), an idle connection waits `idle_timeout` for
//! a byte and then `header_timeout` for the rest of the head.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last request in flight ended, in ns since `epoch`.
    idle_since: AtomicU64,
    epoch: Instant,
    /// When the client's first byte since `idle_since` arrived, in ns since `epoch`: a request
    /// head is on its way. Not after `idle_since`: none is.
    head_since: AtomicU64,
    /// A request ended (for a drain that waits for the last one; nothing waits otherwise).
    ended: Notify,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            epoch: Instant::now(),
            // The first request's head is awaited from the start.
            head_since: AtomicU64::new(1),
            ended: Notify::new(),
        })
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The client sent bytes. While no request is in flight they start the next head, and
    /// only the first of them is stamped (no clock read on the others).
    fn bytes_read(&self) {
        if self.in_flight() > 0 {
            return;
        }
        let idle = self.idle_since.load(Ordering::Acquire);
        if self.head_since.load(Ordering::Relaxed) <= idle {
            self.head_since
                .store(self.now_ns().max(idle + 1), Ordering::Relaxed);
        }
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Completes when a request ends (a permit is kept if none waits).
    pub async fn ended(&self) {
        self.ended.notified().await
    }

    /// How long the connection has had no request in flight; `None` while it has one.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.in_flight() > 0 {
            return None;
        }
        let since = Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
        Some(now.saturating_duration_since(self.epoch + since))
    }

    /// The connection's timer fired: whether it is due to close, else the timer is re-armed
    /// for when it might be. `head`: the time a request head may take from its first byte
    /// (http/1.1 through [`ReadWatch`]); `None`: only idleness counts.
    pub fn expired(
        &self,
        idle: Duration,
        head: Option<Duration>,
        timer: Pin<&mut Sleep>,
    ) -> Option<Expired> {
        let now = Instant::now();
        let Some(idle_for) = self.idle_for(now) else {
            // Within `head` too: a head that starts once this request ends is seen in time.
            timer.reset(now + head.map_or(idle, |h| h.min(idle)));
            return None;
        };
        let Some(head) = head else {
            if idle_for >= idle {
                return Some(Expired::Idle);
            }
            timer.reset(now + (idle - idle_for));
            return None;
        };
        let head_since = self.head_since.load(Ordering::Relaxed);
        if head_since > self.idle_since.load(Ordering::Acquire) {
            let due = self.epoch + Duration::from_nanos(head_since) + head;
            if now >= due {
                return Some(Expired::Head);
            }
            timer.reset(due);
            return None;
        }
        if idle_for >= idle {
            return Some(Expired::Idle);
        }
        // Looked at again within `head` at the latest: a head that starts meanwhile is then
        // timed from its first byte, without a wake-up per read.
        timer.reset(now + (idle - idle_for).min(head));
        None
    }
}

/// Why a connection's timer closes it.
#[derive(Debug, PartialEq, Eq)]
pub enum Expired {
    /// No request for `idle_timeout`: closed gracefully.
    Idle,
    /// A request head took longer than `header_timeout` from its first byte: dropped, as
    /// hyper's own header timeout would.
    Head,
}

/// Tells the connection's [`Activity`] when the client sends bytes (http/1.1: the start of a
/// request head when none is in flight). Bytes of the next head that come in while a request
/// is still in flight (pipelining) are not seen: that head is timed as idle time, so it is
/// cut after `idle_timeout` at the latest.
pub struct ReadWatch<T> {
    io: T,
    /// None: nobody times heads (h2), so reads are not watched.
    activity: Option<Arc<Activity>>,
}

impl<T> ReadWatch<T> {
    pub fn new(io: T, activity: Option<Arc<Activity>>) -> Self {
        ReadWatch { io, activity }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ReadWatch<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.io).poll_read(cx, buf);
        if let Some(a) = &self.activity {
            if buf.filled().len() > before {
                a.bytes_read();
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ReadWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// One request (or tunnel) in flight, for as long as it lives.
pub struct InFlight(Arc<Activity>);

impl InFlight {
    pub fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // Stamped by every request that ends, before its count goes: a timer that sees no
        // request in flight also sees a stamp at least as recent as the last one to end.
        a.idle_since.fetch_max(a.now_ns(), Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.ended.notify_one();
    }
}
