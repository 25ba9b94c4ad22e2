//! The client's request body on its way to the origin: an idle timeout between frames
//! (nginx's `client_body_timeout`) and a [`BodyProgress`] that tells the sender when the body
//! ended and whether the client was at fault.

use super::body::BoxError;
use super::body::Pieces;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// A client's request body, whichever protocol brought it: hyper's (http/1.1 or h2) or
/// HTTP/3's. An enum, so hyper's requests allocate nothing for it; HTTP/3's larger body is
/// boxed so it does not grow every request's future.
pub enum ClientIn {
    /// http/1.1 (its lingering close covers an answer that comes before the body's end).
    Hyper(hyper::body::Incoming),
    /// h2: read to its end after an early answer ([`H2Body`]).
    H2(H2Body),
    H3(Box<crate::edge::h3::H3Body>),
}

/// Bytes of an h2 request body read after its answer before the stream is reset anyway.
const DRAIN_MAX: usize = 1 << 20;
/// Longest pause between frames of such a body.
const DRAIN_IDLE: Duration = Duration::from_secs(2);
/// Longest such a body is read for, however it trickles (empty DATA frames included): an
/// open stream keeps its connection from closing, a drain of the edge included.
const DRAIN_TIME: Duration = Duration::from_secs(5);

/// An h2 request body that, dropped before its end (the answer came first: 413, 429, an
/// origin's early answer), is read to its end by a task of its own, up to [`DRAIN_MAX`]
/// bytes with pauses of up to [`DRAIN_IDLE`], for [`DRAIN_TIME`] at most, so the stream ends
/// cleanly. hyper would reset
/// the stream (NO_ERROR, which RFC 9113 8.1 allows) while the client still sends, and clients
/// that do not expect an early answer then fail instead of showing it: curl 7.88 reports
/// "Stream error in the HTTP/2 framing layer" for most early 413s. nginx discards the rest
/// of such a body too; http/1.1 has the lingering close (`edge::linger`).
pub struct H2Body(Option<hyper::body::Incoming>);

impl H2Body {
    pub fn new(body: hyper::body::Incoming) -> Self {
        H2Body(Some(body))
    }
}

impl Drop for H2Body {
    fn drop(&mut self) {
        let Some(body) = self.0.take() else { return };
        if body.is_end_stream() {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(drain(body));
        }
    }
}

/// Reads and discards what is left of a body, within [`DRAIN_MAX`], [`DRAIN_IDLE`] and
/// [`DRAIN_TIME`].
async fn drain(mut body: hyper::body::Incoming) {
    use http_body_util::BodyExt;
    let end = Instant::now() + DRAIN_TIME;
    let mut read = 0usize;
    loop {
        let pause_end = (Instant::now() + DRAIN_IDLE).min(end);
        let Ok(Some(Ok(frame))) = tokio::time::timeout_at(pause_end, body.frame()).await else {
            return;
        };
        read += frame.data_ref().map_or(0, Bytes::len);
        if read >= DRAIN_MAX {
            return;
        }
    }
}

impl Body for ClientIn {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ClientIn::Hyper(b) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            ClientIn::H2(H2Body(Some(b))) => Pin::new(b)
                .poll_frame(cx)
                .map_err(|e| Box::new(e) as BoxError),
            ClientIn::H2(H2Body(None)) => Poll::Ready(None),
            ClientIn::H3(b) => Pin::new(b.as_mut()).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientIn::Hyper(b) => b.is_end_stream(),
            ClientIn::H2(H2Body(b)) => b.as_ref().is_none_or(Body::is_end_stream),
            ClientIn::H3(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientIn::Hyper(b) => b.size_hint(),
            ClientIn::H2(H2Body(b)) => b.as_ref().map(Body::size_hint).unwrap_or_default(),
            ClientIn::H3(b) => b.size_hint(),
        }
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
    /// The route's max_body_size, for the error that names it.
    max: Option<u64>,
    epoch: Instant,
    /// When the last frame came from the client, in ms since `epoch`.
    last_frame_ms: std::sync::atomic::AtomicU64,
    /// Set while the edge waits for the client's next frame; clear while the frame it has
    /// waits for the origin to take it.
    waiting_on_client: std::sync::atomic::AtomicBool,
}

/// Why a client's request body did not arrive whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ClientBodyError {
    #[error("client sent no request body data for {0:?}")]
    Timeout(Duration),
    #[error("client request body ended early or was malformed")]
    Aborted,
    #[error("request body larger than the route's max_body_size ({0} bytes)")]
    TooLarge(u64),
}

const STREAMING: u8 = 0;
const COMPLETE: u8 = 1;
const TIMED_OUT: u8 = 2;
const ABORTED: u8 = 3;
const TOO_LARGE: u8 = 4;

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

    /// When the origin will have taken nothing for `limit`, if it keeps not reading.
    fn origin_deadline(&self, limit: Duration) -> Instant {
        let last = self
            .last_frame_ms
            .load(std::sync::atomic::Ordering::Acquire);
        self.epoch + Duration::from_millis(last) + limit
    }

    /// When to look at the origin's side again: at its deadline, or (while the edge waits on
    /// the client, whose own timeout applies) a limit from now.
    pub fn next_check(&self, limit: Duration) -> Instant {
        let now = Instant::now();
        match self.origin_deadline(limit) {
            d if d > now => d,
            _ => now + limit,
        }
    }

    /// The origin has taken no body for `limit` while the edge held data for it: an origin
    /// that stopped reading (a client that stopped sending is `ClientBody`'s timeout).
    pub fn origin_stalled(&self, limit: Duration) -> bool {
        !self
            .waiting_on_client
            .load(std::sync::atomic::Ordering::Acquire)
            && Instant::now() >= self.origin_deadline(limit)
    }

    /// The sender starts on the body now: the origin's clock starts here, not when the body
    /// was wrapped (checkout and connect come in between).
    pub fn start(&self) {
        self.frame_arrived();
    }

    fn frame_arrived(&self) {
        use std::sync::atomic::Ordering;
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_frame_ms.store(ms, Ordering::Release);
        self.waiting_on_client.store(false, Ordering::Release);
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
            TOO_LARGE => Some(ClientBodyError::TooLarge(self.max.unwrap_or(0))),
            _ => None,
        }
    }
}

pin_project_lite::pin_project! {
    /// The client's request body on its way to the origin, with an idle timeout between
    /// frames (nginx's `client_body_timeout`), reporting its end to a [`BodyProgress`].
    pub struct ClientBody {
        #[pin]
        inner: ClientIn,
        idle: Duration,
        #[pin]
        timer: Sleep,
        // The timer is set when the body first waits after progress, not on every frame.
        armed: bool,
        // Bytes received so far, against the route's limit.
        received: u64,
        // The rest of a large frame, handed over in pieces: the origin's progress through
        // it is seen piece by piece (see `BodyProgress::origin_stalled`).
        pending: Pieces,
        max: Option<u64>,
        progress: std::sync::Arc<BodyProgress>,
        // Told when the body has been read to its end (an http/1.1 connection then need not
        // linger for it).
        linger: Option<crate::edge::linger::LingerHint>,
        // The route's edited request fields, kept out of the trailers.
        edited: Option<std::sync::Arc<crate::config::HeaderEdits>>,
    }
}

impl ClientBody {
    /// `max`: the route's max_body_size (a larger body fails with `TooLarge`).
    pub fn new(
        inner: ClientIn,
        idle: Duration,
        max: Option<u64>,
        linger: Option<crate::edge::linger::LingerHint>,
        edited: Option<std::sync::Arc<crate::config::HeaderEdits>>,
    ) -> (Self, std::sync::Arc<BodyProgress>) {
        let progress = std::sync::Arc::new(BodyProgress {
            state: std::sync::atomic::AtomicU8::new(STREAMING),
            ended: tokio::sync::Notify::new(),
            idle,
            max,
            epoch: Instant::now(),
            last_frame_ms: std::sync::atomic::AtomicU64::new(0),
            waiting_on_client: std::sync::atomic::AtomicBool::new(false),
        });
        let body = ClientBody {
            inner,
            idle,
            timer: tokio::time::sleep(idle),
            armed: false,
            received: 0,
            pending: Pieces::default(),
            max,
            progress: progress.clone(),
            linger,
            edited,
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
        if let Some(piece) = this.pending.next() {
            // The rest of a large frame, in pieces: each piece the origin takes is progress.
            this.progress.frame_arrived();
            if this.pending.is_empty() && this.inner.is_end_stream() {
                this.progress.set(COMPLETE);
                body_read(this.linger);
            }
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        match this.inner.as_mut().poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.armed = false;
                this.progress.frame_arrived();
                let frame = match frame.into_data() {
                    Ok(data) => {
                        *this.received += data.len() as u64;
                        if let Some(max) = *this.max {
                            if *this.received > max {
                                this.progress.set(TOO_LARGE);
                                return Poll::Ready(Some(Err(Box::new(
                                    ClientBodyError::TooLarge(max),
                                ))));
                            }
                        }
                        Frame::data(this.pending.split(data))
                    }
                    Err(frame) => match frame.into_trailers() {
                        // Over h2 the decoder lets a section up to twice the cap through
                        // (`edge::HEADER_LIST_DECODE_LIMIT`, for the head's logged 431):
                        // trailers over the cap are a malformed body.
                        Ok(trailers)
                            if super::headers::section_size(&trailers)
                                > crate::edge::MAX_HEADER_SECTION =>
                        {
                            this.progress.set(ABORTED);
                            return Poll::Ready(Some(Err(Box::new(ClientBodyError::Aborted))));
                        }
                        Ok(mut trailers) => {
                            super::headers::strip_trailers(&mut trailers);
                            if let Some(e) = this.edited.as_deref() {
                                super::headers::strip_edited(&mut trailers, e);
                            }
                            Frame::trailers(trailers)
                        }
                        Err(frame) => frame,
                    },
                };
                if this.pending.is_empty() && this.inner.is_end_stream() {
                    // The sender may stop polling once the body says it is at its end.
                    this.progress.set(COMPLETE);
                    body_read(this.linger);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                this.progress.set(COMPLETE);
                body_read(this.linger);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.progress.set(ABORTED);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                this.progress
                    .waiting_on_client
                    .store(true, std::sync::atomic::Ordering::Release);
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
        let end = self.pending.is_empty() && self.inner.is_end_stream();
        if end {
            self.progress.set(COMPLETE);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.pending.added_to(self.inner.size_hint())
    }
}

fn body_read(linger: &mut Option<crate::edge::linger::LingerHint>) {
    if let Some(h) = linger.take() {
        h.body_read();
    }
}
