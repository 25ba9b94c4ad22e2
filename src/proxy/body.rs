//! Response bodies: the origin's body streamed to the client frame by frame (never buffered
//! whole), with an idle timeout between frames, holding the pool lease until it ends.

use crate::access_log::PendingLog;
use crate::pool::ResponseBody;
use crate::pool::StreamGuard;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// What edgepop sends to clients.
pub type ProxyBody = UnsyncBoxBody<Bytes, BoxError>;

pub fn full(text: impl Into<Bytes>) -> ProxyBody {
    Full::new(text.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

#[derive(Debug, thiserror::Error)]
#[error("origin sent no body data for {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

pin_project_lite::pin_project! {
    pub struct UpstreamBody {
        #[pin]
        inner: ResponseBody,
        guard: Option<StreamGuard>,
        idle: Duration,
        #[pin]
        timer: Sleep,
        // The access-log entry, written when the body ends, fails or is dropped.
        log: Option<PendingLog>,
        bytes: u64,
        // Set once `is_end_stream` said so: the client's side may stop polling then and drop
        // the body without seeing the final `None`.
        saw_end: std::cell::Cell<bool>,
    }
    impl PinnedDrop for UpstreamBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(log) = this.log.take() {
                // Dropped without being read to the end: normal for HEAD, 204, 304 and
                // bodies already at their end; a client gone away otherwise.
                let done =
                    log.complete(*this.bytes) || this.saw_end.get() || this.inner.is_end_stream();
                let outcome = if done { "ok" } else { "aborted" };
                log.finish(*this.bytes, outcome);
            }
        }
    }
}

impl UpstreamBody {
    /// `guard`: the pool lease held until the body ends (none for a dedicated connection).
    pub fn new(
        inner: ResponseBody,
        guard: Option<StreamGuard>,
        idle: Duration,
        log: Option<PendingLog>,
    ) -> Self {
        UpstreamBody {
            inner,
            guard,
            idle,
            timer: tokio::time::sleep(idle),
            log,
            bytes: 0,
            saw_end: std::cell::Cell::new(false),
        }
    }

    pub fn boxed(self) -> ProxyBody {
        UnsyncBoxBody::new(self)
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                this.timer.as_mut().reset(Instant::now() + *this.idle);
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.len() as u64;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                // Ended cleanly: give the connection (or stream slot) back now, not when the
                // client connection gets around to dropping the body.
                this.guard.take();
                if let Some(log) = this.log.take() {
                    log.finish(*this.bytes, "ok");
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.guard.take();
                if let Some(log) = this.log.take() {
                    log.finish(*this.bytes, "aborted");
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => match this.timer.poll(cx) {
                Poll::Ready(()) => {
                    this.guard.take();
                    if let Some(log) = this.log.take() {
                        log.finish(*this.bytes, "aborted");
                    }
                    Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(*this.idle)))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.saw_end.set(true);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
