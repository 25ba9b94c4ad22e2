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

/// How far the client's request body got; shared between the body (streamed to the origin
/// by the pool) and the sender, which starts the first-byte clock only once the whole body
/// is sent and must not blame the origin for a client that stopped sending.
pub struct BodyProgress {
    state: std::sync::atomic::AtomicU8,
    ended: tokio::sync::Notify,
    /// The body's idle timeout, for the error that names it.
    idle: Duration,
}

/// Why a client's request body did not arrive whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyError {
    #[error("client sent no request body data for {0:?}")]
    Timeout(Duration),
    #[error("client request body ended early or was malformed")]
    Aborted,
}

const STREAMING: u8 = 0;
const COMPLETE: u8 = 1;
const TIMED_OUT: u8 = 2;
const ABORTED: u8 = 3;

impl BodyProgress {
    fn set(&self, state: u8) {
        use std::sync::atomic::Ordering;
        if self
            .state
            .compare_exchange(STREAMING, state, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            self.ended.notify_waiters();
        }
    }

    /// Resolves once the body ended, whole or not.
    pub async fn ended(&self) {
        use std::sync::atomic::Ordering;
        loop {
            let notified = self.ended.notified();
            if self.state.load(Ordering::Acquire) != STREAMING {
                return;
            }
            notified.await;
        }
    }

    /// Whether the body ended because of the client (a pause too long, an abort).
    pub fn failed(&self) -> bool {
        self.client_error().is_some()
    }

    /// The client's failure, if the body ended because of one.
    pub fn client_error(&self) -> Option<ClientBodyError> {
        match self.state.load(std::sync::atomic::Ordering::Acquire) {
            TIMED_OUT => Some(ClientBodyError::Timeout(self.idle)),
            ABORTED => Some(ClientBodyError::Aborted),
            _ => None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The client's request body on its way to the origin, with an idle timeout between
    /// frames (nginx's `client_body_timeout`), reporting its end to a [`BodyProgress`].
    pub struct ClientBody {
        #[pin]
        inner: hyper::body::Incoming,
        idle: Duration,
        #[pin]
        timer: Sleep,
        // The timer is set when the body first waits after progress, not on every frame.
        armed: bool,
        progress: std::sync::Arc<BodyProgress>,
    }
}

impl ClientBody {
    pub fn new(
        inner: hyper::body::Incoming,
        idle: Duration,
    ) -> (Self, std::sync::Arc<BodyProgress>) {
        let progress = std::sync::Arc::new(BodyProgress {
            state: std::sync::atomic::AtomicU8::new(STREAMING),
            ended: tokio::sync::Notify::new(),
            idle,
        });
        let body = ClientBody {
            inner,
            idle,
            timer: tokio::time::sleep(idle),
            armed: false,
            progress: progress.clone(),
        };
        (body, progress)
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.armed = false;
                if this.inner.is_end_stream() {
                    // The sender may stop polling once the body says it is at its end.
                    this.progress.set(COMPLETE);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.progress.set(COMPLETE);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.progress.set(ABORTED);
                Poll::Ready(Some(Err(Box::new(e))))
            }
            Poll::Pending => {
                if !*this.armed {
                    *this.armed = true;
                    this.timer.as_mut().reset(Instant::now() + *this.idle);
                }
                match this.timer.poll(cx) {
                    Poll::Ready(()) => {
                        this.progress.set(TIMED_OUT);
                        Poll::Ready(Some(Err(Box::new(ClientBodyError::Timeout(*this.idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.inner.is_end_stream();
        if end {
            self.progress.set(COMPLETE);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps `held` alive until the body is done with.
    pub struct Holding<G> {
        #[pin]
        body: ProxyBody,
        held: G,
    }
}

impl<G: Send + 'static> Holding<G> {
    pub fn wrap(body: ProxyBody, held: G) -> ProxyBody {
        if body.is_end_stream() {
            return body;
        }
        UnsyncBoxBody::new(Holding { body, held })
    }
}

impl<G> Body for Holding<G> {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}
