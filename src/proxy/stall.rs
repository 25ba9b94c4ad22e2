//! An h2 client that stops taking one response: flow control makes hyper stop polling that
//! body, so no timer inside it can fire, and it would hold its origin connection (http/1.1)
//! or its stream and a share of the connection window (h2) for good, while the client's other
//! streams keep the connection itself busy. Once a response to an h2 client has handed over
//! data and has more to come, its upstream side moves into shared state and a small task
//! watches it: once the client has taken nothing for the listener's `send_timeout`, the task
//! drops the upstream side (the origin stream is reset or the connection closed, and its pool
//! slot returns). http/1.1 clients need none of this: a stuck response there is a stuck
//! socket write, which the connection's own send timeout sees.

use crate::pool::{ResponseBody, StreamGuard};
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::body::BoxError;

#[derive(Debug, thiserror::Error)]
#[error("client took no response data for {0:?}; upstream released")]
pub struct ClientStalled(pub Duration);

/// The upstream side of a response body.
pub(super) enum Feed {
    Direct {
        inner: ResponseBody,
        guard: Option<StreamGuard>,
    },
    Watched(Watched),
    /// Ended, failed or cut: nothing upstream is held any more.
    Closed,
}

/// The body's handle on its watch; dropping it (the body ended or went away) releases the
/// upstream side and ends the watchdog.
pub(super) struct Watched(Arc<Watch>);

impl Drop for Watched {
    fn drop(&mut self) {
        self.0.upstream().take();
        self.0.done.notify_one();
    }
}

pub(super) struct Watch {
    upstream: Mutex<Option<(ResponseBody, Option<StreamGuard>)>>,
    limit: Duration,
    epoch: Instant,
    /// When the body last handed data to the client side, in ms since `epoch`.
    last_taken_ms: AtomicU64,
    /// Set when data was handed over, cleared when the client side polls again.
    awaiting_client: AtomicBool,
    cut: AtomicBool,
    done: Notify,
}

impl Watch {
    fn upstream(&self) -> MutexGuard<'_, Option<(ResponseBody, Option<StreamGuard>)>> {
        self.upstream.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn stalled_until(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_taken_ms.load(Ordering::Acquire)) + self.limit
    }
}

impl Feed {
    pub(super) fn new(inner: ResponseBody, guard: Option<StreamGuard>) -> Self {
        Feed::Direct { inner, guard }
    }

    pub(super) fn poll_frame(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self {
            Feed::Direct { inner, .. } => Pin::new(inner).poll_frame(cx),
            Feed::Watched(Watched(w)) => {
                w.awaiting_client.store(false, Ordering::Release);
                match w.upstream().as_mut() {
                    Some((inner, _)) => Pin::new(inner).poll_frame(cx),
                    None => Poll::Ready(Some(Err(Box::new(ClientStalled(w.limit))))),
                }
            }
            Feed::Closed => Poll::Ready(None),
        }
    }

    /// Data was handed to the client side and more is to come: note it for the watch, or
    /// start watching (once a body has more to give, the client may stop taking it).
    pub(super) fn handed_over(&mut self, send_timeout: Option<Duration>) {
        match self {
            Feed::Watched(Watched(w)) => {
                w.last_taken_ms.store(w.now_ms(), Ordering::Release);
                w.awaiting_client.store(true, Ordering::Release);
            }
            Feed::Direct { .. } => {
                if let Some(limit) = send_timeout {
                    self.watch(limit);
                }
            }
            Feed::Closed => {}
        }
    }

    fn watch(&mut self, limit: Duration) {
        let Feed::Direct { inner, guard } = std::mem::replace(self, Feed::Closed) else {
            return;
        };
        let w = Arc::new(Watch {
            upstream: Mutex::new(Some((inner, guard))),
            limit,
            epoch: Instant::now(),
            last_taken_ms: AtomicU64::new(0),
            awaiting_client: AtomicBool::new(true),
            cut: AtomicBool::new(false),
            done: Notify::new(),
        });
        tokio::spawn(watchdog(w.clone()));
        *self = Feed::Watched(Watched(w));
    }

    /// The body ended or failed: give the pool slot back and drop the upstream side now.
    pub(super) fn release(&mut self) {
        *self = Feed::Closed;
    }

    pub(super) fn is_end_stream(&self) -> bool {
        match self {
            Feed::Direct { inner, .. } => inner.is_end_stream(),
            // Cut by the watch: not at its end, whatever was handed over.
            Feed::Watched(Watched(w)) => w
                .upstream()
                .as_ref()
                .is_some_and(|(b, _)| b.is_end_stream()),
            Feed::Closed => true,
        }
    }

    pub(super) fn size_hint(&self) -> SizeHint {
        match self {
            Feed::Direct { inner, .. } => inner.size_hint(),
            Feed::Watched(Watched(w)) => w
                .upstream()
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), |(b, _)| b.size_hint()),
            Feed::Closed => SizeHint::with_exact(0),
        }
    }

    /// Whether the watch cut this body off.
    pub(super) fn was_cut(&self) -> bool {
        matches!(self, Feed::Watched(Watched(w)) if w.cut.load(Ordering::Acquire))
    }
}

async fn watchdog(w: Arc<Watch>) {
    loop {
        // Waiting on the origin (the client side is polling) is the body idle timer's job:
        // look again later.
        let due = if w.awaiting_client.load(Ordering::Acquire) {
            w.stalled_until()
        } else {
            Instant::now() + w.limit
        };
        tokio::select! {
            _ = tokio::time::sleep_until(due) => {}
            _ = w.done.notified() => return,
        }
        // Decided under the lock the body polls through, so it cannot take data meanwhile.
        let mut upstream = w.upstream();
        if upstream.is_none() {
            return;
        }
        let stalled =
            w.awaiting_client.load(Ordering::Acquire) && Instant::now() >= w.stalled_until();
        if stalled {
            let cut = upstream.take();
            w.cut.store(true, Ordering::Release);
            drop(upstream);
            drop(cut);
            tracing::debug!(after = ?w.limit, "client took no response data; upstream released");
            return;
        }
    }
}
