//! A copy of a small request body, kept as it streams to the origin, so that a request the
//! origin refused unprocessed after its body went (an h2 origin's GOAWAY racing the request:
//! nginx sends one every `keepalive_requests`, 1,000 by default; a REFUSED_STREAM) can be
//! sent again on another connection, as Envoy and HAProxy do from their buffers. Only bodies
//! up to [`REPLAY_LIMIT`] are kept (after a refusal the h2 pump reads the rest of one still
//! arriving); a larger one is not, and such a request gets its error as before. All the
//! copies of the process together hold at most [`REPLAY_BUDGET`]: past it, a body is sent
//! without a copy, so many slow uploads at once cannot make the copies a memory sink.

use super::body::BoxError;
use crate::pool::UpstreamBody as UpBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::header::HeaderMap;
use hyper::Request;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};

/// Largest body kept for a replay (Envoy's default retry buffer is 64 KiB too).
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// The bytes all copies in the process may hold at once: 1,024 full ones.
pub const REPLAY_BUDGET: usize = 64 * 1024 * 1024;

/// Bytes held by copies, against a cap.
pub struct Budget {
    held: std::sync::atomic::AtomicUsize,
    cap: usize,
}

impl Budget {
    pub const fn new(cap: usize) -> Self {
        Budget {
            held: std::sync::atomic::AtomicUsize::new(0),
            cap,
        }
    }

    /// Takes `n` bytes if they fit under the cap.
    fn take(&self, n: usize) -> bool {
        use std::sync::atomic::Ordering;
        self.held
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |held| {
                held.checked_add(n).filter(|&t| t <= self.cap)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.held.fetch_sub(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// Bytes held now.
    pub fn held(&self) -> usize {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// The process's copies.
pub static REPLAY_BYTES: Budget = Budget::new(REPLAY_BUDGET);

struct Recorded {
    /// The data, copied (a slice of the client connection's read buffer would pin all of it).
    data: bytes::BytesMut,
    /// Where `data`'s bytes are counted.
    budget: &'static Budget,
    trailers: Option<HeaderMap>,
    /// The body ended (its last frame went by).
    complete: bool,
    /// Over the limit, or failed: nothing to replay.
    given_up: bool,
    /// The tee is gone (the body was dropped): nothing more will come.
    dropped: bool,
}

impl Recorded {
    fn new(budget: &'static Budget) -> Self {
        Recorded {
            data: bytes::BytesMut::new(),
            budget,
            trailers: None,
            complete: false,
            given_up: false,
            dropped: false,
        }
    }

    fn give_up(&mut self) {
        self.given_up = true;
        self.budget.give_back(self.data.len());
        self.data = bytes::BytesMut::new();
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.budget.give_back(self.data.len());
    }
}

/// What a request needs to be sent again: its head, and its body as it went by.
pub struct Replay {
    head: Request<()>,
    body: Arc<Mutex<Recorded>>,
    /// Told when the copy is settled: complete, given up, or its body dropped.
    settled: Arc<tokio::sync::Notify>,
}

impl Replay {
    /// Wraps the body of `req` (which has one) to keep a copy as it is sent; `None` when it
    /// says it is larger than [`REPLAY_LIMIT`]. The copy is kept while the `Replay` lives.
    pub fn record(req: Request<UpBody>) -> (Request<UpBody>, Option<Replay>) {
        Self::record_within(req, &REPLAY_BYTES)
    }

    /// As [`Replay::record`], counting the copy in `budget`.
    fn record_within(
        req: Request<UpBody>,
        budget: &'static Budget,
    ) -> (Request<UpBody>, Option<Replay>) {
        if req.body().size_hint().lower() > REPLAY_LIMIT as u64 {
            return (req, None);
        }
        let head = with_head(&req, ());
        let recorded = Arc::new(Mutex::new(Recorded::new(budget)));
        let settled = Arc::new(tokio::sync::Notify::new());
        let (parts, body) = req.into_parts();
        let body = Tee {
            inner: body,
            recorded: Arc::downgrade(&recorded),
            settled: settled.clone(),
        };
        let replay = Replay {
            head,
            body: recorded,
            settled,
        };
        (
            Request::from_parts(parts, body.boxed_unsync()),
            Some(replay),
        )
    }

    /// The request again once its copy is settled (the refusal may come while the body is
    /// still on its way: the h2 pump reads it to its end then), waiting up to `limit`.
    pub async fn settled(&self, limit: std::time::Duration) -> Option<Request<UpBody>> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let notified = self.settled.notified();
            {
                let r = self.body.lock().unwrap_or_else(|p| p.into_inner());
                if r.complete || r.given_up || r.dropped {
                    break;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
        self.request()
    }

    /// The request again, if its whole body was kept.
    pub fn request(&self) -> Option<Request<UpBody>> {
        let (data, trailers) = {
            let r = self.body.lock().unwrap_or_else(|p| p.into_inner());
            if !r.complete || r.given_up {
                return None;
            }
            (r.data.clone().freeze(), r.trailers.clone())
        };
        Some(with_head(
            &self.head,
            Replayed { data, trailers }.boxed_unsync(),
        ))
    }
}

/// A request with the method, target, version and fields of `head` (not its extensions,
/// which nothing on the way to the origin reads) and `body`: a copy to send again.
pub fn with_head<A, B>(head: &Request<A>, body: B) -> Request<B> {
    let mut req = Request::new(body);
    *req.method_mut() = head.method().clone();
    *req.uri_mut() = head.uri().clone();
    *req.version_mut() = head.version();
    *req.headers_mut() = head.headers().clone();
    req
}

/// The client's body on its way to the origin, copied into `recorded` up to the limit, while
/// the request's [`Replay`] lives (an early answer ends the need for it).
struct Tee {
    inner: UpBody,
    recorded: Weak<Mutex<Recorded>>,
    settled: Arc<tokio::sync::Notify>,
}

impl Drop for Tee {
    fn drop(&mut self) {
        if let Some(recorded) = self.recorded.upgrade() {
            recorded.lock().unwrap_or_else(|p| p.into_inner()).dropped = true;
        }
        self.settled.notify_one();
    }
}

impl Tee {
    /// Notes `frame` (the one just polled); false once there is nothing more to keep.
    fn keep(&self, frame: &Option<Result<Frame<Bytes>, BoxError>>) -> bool {
        let Some(recorded) = self.recorded.upgrade() else {
            return false;
        };
        let mut r = recorded.lock().unwrap_or_else(|p| p.into_inner());
        match frame {
            None => r.complete = true,
            Some(Err(_)) => r.give_up(),
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    if r.data.len() + data.len() > REPLAY_LIMIT || !r.budget.take(data.len()) {
                        r.give_up();
                    } else {
                        r.data.extend_from_slice(data);
                    }
                } else if let Some(t) = f.trailers_ref() {
                    r.trailers = Some(t.clone());
                }
                // The pump stops polling at the end (after trailers, or once the body says
                // it ended), so the end is taken from here, not only from a final `None`.
                if !r.given_up && (f.is_trailers() || self.inner.is_end_stream()) {
                    r.complete = true;
                }
            }
        }
        !(r.given_up || r.complete)
    }
}

impl Body for Tee {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(frame) = &polled {
            if self.recorded.strong_count() > 0 && !self.keep(frame) {
                self.recorded = Weak::new();
                self.settled.notify_one();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A kept body sent again: its data in one frame, then its trailers.
struct Replayed {
    data: Bytes,
    trailers: Option<HeaderMap>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if !self.data.is_empty() {
            return Poll::Ready(Some(Ok(Frame::data(std::mem::take(&mut self.data)))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_empty() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.trailers {
            // Unknown, so an http/1.1 hop stays chunked and sends the trailers.
            Some(_) => SizeHint::default(),
            None => SizeHint::with_exact(self.data.len() as u64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{Full, StreamBody};

    fn request(body: UpBody) -> Request<UpBody> {
        let mut req = Request::new(body);
        *req.method_mut() = hyper::Method::POST;
        req.headers_mut()
            .insert("x-test", hyper::header::HeaderValue::from_static("1"));
        req
    }

    fn stream(frames: Vec<Frame<Bytes>>) -> UpBody {
        let frames: Vec<Result<Frame<Bytes>, BoxError>> = frames.into_iter().map(Ok).collect();
        StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync()
    }

    /// Polls as the h2 pump does: until trailers, or until the body says it ended.
    async fn pump(req: &mut Request<UpBody>) -> (Vec<u8>, Option<HeaderMap>) {
        let mut data = Vec::new();
        loop {
            if req.body().is_end_stream() {
                return (data, None);
            }
            match req.body_mut().frame().await {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(f) => return (data, f.into_trailers().ok()),
                },
                _ => return (data, None),
            }
        }
    }

    async fn collect(req: Request<UpBody>) -> (Bytes, Option<HeaderMap>) {
        let c = req.into_body().collect().await.expect("body");
        let trailers = c.trailers().cloned();
        (c.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_small_body_sent_whole_can_be_sent_again_with_its_trailers() {
        let mut t = HeaderMap::new();
        t.insert("x-sum", hyper::header::HeaderValue::from_static("42"));
        let body = stream(vec![
            Frame::data(Bytes::from_static(b"hello ")),
            Frame::data(Bytes::from_static(b"world")),
            Frame::trailers(t.clone()),
        ]);
        let (mut req, replay) = Replay::record(request(body));
        let replay = replay.expect("small enough");
        assert!(replay.request().is_none(), "not sent yet");
        // Taken as the pump takes it: it stops at the trailers.
        assert_eq!(
            pump(&mut req).await,
            (b"hello world".to_vec(), Some(t.clone()))
        );
        for _ in 0..2 {
            let again = replay.request().expect("kept whole");
            assert_eq!(again.method(), hyper::Method::POST);
            assert_eq!(again.headers()["x-test"], "1");
            assert_eq!(
                collect(again).await,
                (Bytes::from_static(b"hello world"), Some(t.clone()))
            );
        }
    }

    #[tokio::test]
    async fn a_body_that_says_it_ended_is_complete_without_a_last_poll() {
        let body = Full::new(Bytes::from_static(b"abc"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let (mut req, replay) = Replay::record(request(body));
        let replay = replay.expect("small");
        assert_eq!(pump(&mut req).await, (b"abc".to_vec(), None));
        let again = replay.request().expect("kept whole");
        assert_eq!(collect(again).await, (Bytes::from_static(b"abc"), None));
    }

    #[tokio::test]
    async fn copies_past_the_process_budget_are_not_kept_and_freed_bytes_come_back() {
        static SMALL: Budget = Budget::new(10);
        let body = |b: &'static [u8]| stream(vec![Frame::data(Bytes::from_static(b))]);
        let (mut first, kept) = Replay::record_within(request(body(b"0123456")), &SMALL);
        pump(&mut first).await;
        let kept = kept.expect("small");
        assert!(kept.request().is_some());
        assert_eq!(SMALL.held(), 7);
        // 7 + 7 > 10: the second goes without a copy.
        let (mut second, over) = Replay::record_within(request(body(b"abcdefg")), &SMALL);
        pump(&mut second).await;
        assert!(over.expect("small").request().is_none());
        assert_eq!(SMALL.held(), 7);
        // The first request done: its bytes are free again.
        drop((kept, first));
        assert_eq!(SMALL.held(), 0);
        let (mut third, again) = Replay::record_within(request(body(b"abcdefg")), &SMALL);
        pump(&mut third).await;
        assert!(again.expect("small").request().is_some());
    }

    #[tokio::test]
    async fn a_body_over_the_limit_or_not_finished_is_not_kept() {
        let big = Full::new(Bytes::from(vec![0u8; REPLAY_LIMIT + 1]))
            .map_err(|never| match never {})
            .boxed_unsync();
        assert!(
            Replay::record(request(big)).1.is_none(),
            "declared too large"
        );
        let half = || Frame::data(Bytes::from(vec![0u8; REPLAY_LIMIT / 2 + 1]));
        let (req, replay) = Replay::record(request(stream(vec![half(), half()])));
        let replay = replay.expect("size unknown");
        collect(req).await;
        assert!(replay.request().is_none(), "grew over the limit");
        let two = stream(vec![
            Frame::data(Bytes::from_static(b"a")),
            Frame::data(Bytes::from_static(b"b")),
        ]);
        let (mut req, replay) = Replay::record(request(two));
        let replay = replay.expect("small");
        let _ = req.body_mut().frame().await;
        // One frame went; the rest was never seen: the origin may not have it all.
        assert!(replay.request().is_none());
    }
}
