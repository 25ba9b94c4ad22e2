//! Response bodies: the origin's body streamed to the client frame by frame (never buffered
//! whole), with an idle timeout between frames, holding the pool lease until it ends.

use super::stall::Feed;
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

/// The answer to a HEAD request: the head only (RFC 9110 9.3.2), whatever body came with it
/// (an origin that sends one anyway, the edge's own error text), dropped unread, which ends
/// its access-log entry. hyper's http/1.1 server and the HTTP/3 path do this themselves;
/// hyper's h2 server sends what it is given, which an h2 client takes as a protocol error.
pub struct HeadBody(Option<ProxyBody>);

impl HeadBody {
    /// `body` made a HEAD answer's.
    pub fn wrap(body: ProxyBody) -> ProxyBody {
        HeadBody(Some(body)).boxed_unsync()
    }
}

impl Body for HeadBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.0 = None;
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        true
    }
}

#[derive(Debug, thiserror::Error)]
#[error("origin sent no body data for {0:?}")]
pub struct BodyIdleTimeout(pub Duration);

pin_project_lite::pin_project! {
    pub struct UpstreamBody {
        feed: Feed,
        idle: Duration,
        #[pin]
        timer: Sleep,
        // Set at the first wait for the origin after progress: time the client side takes
        // between polls is not the origin's idle time.
        armed: bool,
        // The client connection's send_timeout for one h2 stream (see `super::stall`).
        send_timeout: Option<Duration>,
        // The rest of a frame being handed over in pieces (watched bodies only).
        pending: Pieces,
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
                let done = log.complete(*this.bytes)
                    || this.saw_end.get()
                    || (this.pending.is_empty() && this.feed.is_end_stream());
                let outcome = match (done, this.feed.was_cut()) {
                    (true, _) => "ok",
                    (false, true) => "client stalled",
                    (false, false) => "aborted",
                };
                log.finish(*this.bytes, outcome);
            }
        }
    }
}

impl UpstreamBody {
    /// `guard`: the pool lease held until the body ends (none for a dedicated connection);
    /// `send_timeout`: how long the client may take no data before the upstream side is
    /// released (none: never).
    pub fn new(
        inner: ResponseBody,
        guard: Option<StreamGuard>,
        idle: Duration,
        send_timeout: Option<Duration>,
        log: Option<PendingLog>,
    ) -> Self {
        UpstreamBody {
            feed: Feed::new(inner, guard),
            idle,
            timer: tokio::time::sleep(idle),
            armed: false,
            send_timeout,
            pending: Pieces::default(),
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
        if let Some(piece) = this.pending.next() {
            *this.bytes += piece.len() as u64;
            *this.armed = false;
            after_data(this.feed, this.pending, *this.send_timeout);
            return Poll::Ready(Some(Ok(Frame::data(piece))));
        }
        match this.feed.poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                *this.armed = false;
                let frame = match frame.into_data() {
                    Ok(data) if this.send_timeout.is_some() => {
                        Frame::data(this.pending.split(data))
                    }
                    Ok(data) => Frame::data(data),
                    Err(frame) => frame,
                };
                if let Some(d) = frame.data_ref() {
                    *this.bytes += d.len() as u64;
                    after_data(this.feed, this.pending, *this.send_timeout);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                // Ended cleanly: give the connection (or stream slot) back now, not when the
                // client connection gets around to dropping the body.
                this.feed.release();
                if let Some(log) = this.log.take() {
                    log.finish(*this.bytes, "ok");
                }
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                let outcome = if this.feed.was_cut() {
                    "client stalled"
                } else {
                    "aborted"
                };
                this.feed.release();
                if let Some(log) = this.log.take() {
                    log.finish(*this.bytes, outcome);
                }
                Poll::Ready(Some(Err(e)))
            }
            Poll::Pending => {
                if !*this.armed {
                    *this.armed = true;
                    this.timer.as_mut().reset(Instant::now() + *this.idle);
                }
                match this.timer.poll(cx) {
                    Poll::Ready(()) => {
                        this.feed.release();
                        if let Some(log) = this.log.take() {
                            log.finish(*this.bytes, "aborted");
                        }
                        Poll::Ready(Some(Err(Box::new(BodyIdleTimeout(*this.idle)))))
                    }
                    Poll::Pending => Poll::Pending,
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        let end = self.pending.is_empty() && self.feed.is_end_stream();
        if end {
            self.saw_end.set(true);
        }
        end
    }

    fn size_hint(&self) -> SizeHint {
        self.pending.added_to(self.feed.size_hint())
    }
}

/// Data is going to the client side. With nothing more to come the origin's side is done, so
/// its connection or stream slot goes back to the pool now, before the client can see the end:
/// else a client's next request can find that connection still out and open another.
fn after_data(feed: &mut Feed, pending: &Pieces, send_timeout: Option<Duration>) {
    if pending.is_empty() && feed.is_end_stream() {
        feed.release();
    } else {
        feed.handed_over(send_timeout);
    }
}

/// Largest piece of data a body hands over at once when the far side's pace must be seen
/// piece by piece (h2 responses, uploads): the taker asks for the next piece only once the
/// previous one is sent, so this bounds what a slow but steady peer must take per timeout
/// (h2's own frames are this size).
const PIECE: usize = 16 * 1024;

/// The rest of a large frame, handed over [`PIECE`] bytes at a time.
#[derive(Default)]
pub(super) struct Pieces(Bytes);

impl Pieces {
    /// The first piece of `data`; the rest is kept for [`Pieces::next`].
    pub(super) fn split(&mut self, mut data: Bytes) -> Bytes {
        if data.len() > PIECE {
            self.0 = data.split_off(PIECE);
        }
        data
    }

    /// The next piece of the kept rest, if any.
    pub(super) fn next(&mut self) -> Option<Bytes> {
        if self.0.is_empty() {
            return None;
        }
        let n = self.0.len().min(PIECE);
        Some(self.0.split_to(n))
    }

    pub(super) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `rest` (what the source still has) plus what is kept here.
    pub(super) fn added_to(&self, rest: SizeHint) -> SizeHint {
        let kept = self.0.len() as u64;
        let mut hint = SizeHint::new();
        hint.set_lower(rest.lower().saturating_add(kept));
        if let Some(upper) = rest.upper() {
            hint.set_upper(upper.saturating_add(kept));
        }
        hint
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
