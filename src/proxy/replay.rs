//! A copy of a small request body, kept as it streams to the origin, so that a request the
//! origin refused unprocessed after its body went (an h2 origin's GOAWAY racing the request:
//! nginx sends one every `keepalive_requests`, 1,000 by default; a REFUSED_STREAM) can be
//! sent again on another connection, as Envoy and HAProxy do from their buffers. Only bodies
//! up to [`REPLAY_LIMIT`] that the client finished sending are kept: a larger or unfinished
//! one is not copied, and such a request gets its error as before.

use crate::pool::UpstreamBody as UpBody;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::header::HeaderMap;
use hyper::Request;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Largest body kept for a replay (Envoy's default retry buffer is 64 KiB too).
pub const REPLAY_LIMIT: usize = 64 * 1024;

#[derive(Clone)]
enum Piece {
    Data(Bytes),
    Trailers(HeaderMap),
}

#[derive(Default)]
struct Recorded {
    pieces: Vec<Piece>,
    bytes: usize,
    /// The body ended (its last frame went by).
    complete: bool,
    /// Over the limit, or failed: nothing to replay.
    given_up: bool,
}

/// What a request needs to be sent again: its head, and its body as it went by.
pub struct Replay {
    head: Request<()>,
    body: Arc<Mutex<Recorded>>,
}

impl Replay {
    /// Wraps the body of `req` (which has one) to keep a copy as it is sent; `None` when it
    /// says it is larger than [`REPLAY_LIMIT`].
    pub fn record(req: Request<UpBody>) -> (Request<UpBody>, Option<Replay>) {
        if req.body().size_hint().lower() > REPLAY_LIMIT as u64 {
            return (req, None);
        }
        let mut head = Request::new(());
        *head.method_mut() = req.method().clone();
        *head.uri_mut() = req.uri().clone();
        *head.version_mut() = req.version();
        *head.headers_mut() = req.headers().clone();
        let recorded = Arc::new(Mutex::new(Recorded::default()));
        let (parts, body) = req.into_parts();
        let body = Tee {
            inner: body,
            recorded: recorded.clone(),
        };
        let replay = Replay {
            head,
            body: recorded,
        };
        (
            Request::from_parts(parts, body.boxed_unsync()),
            Some(replay),
        )
    }

    /// The request again, if its whole body was kept.
    pub fn request(&self) -> Option<Request<UpBody>> {
        let pieces = {
            let r = self.body.lock().unwrap_or_else(|p| p.into_inner());
            if !r.complete || r.given_up {
                return None;
            }
            r.pieces.clone()
        };
        let mut req = Request::new(
            Replayed {
                pieces: pieces.into_iter().rev().collect(),
            }
            .boxed_unsync(),
        );
        *req.method_mut() = self.head.method().clone();
        *req.uri_mut() = self.head.uri().clone();
        *req.version_mut() = self.head.version();
        *req.headers_mut() = self.head.headers().clone();
        Some(req)
    }
}

/// The client's body on its way to the origin, copied into `recorded` up to the limit.
struct Tee {
    inner: UpBody,
    recorded: Arc<Mutex<Recorded>>,
}

impl Body for Tee {
    type Data = Bytes;
    type Error = super::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        let Poll::Ready(frame) = &polled else {
            return polled;
        };
        let mut r = self.recorded.lock().unwrap_or_else(|p| p.into_inner());
        if r.given_up {
            return polled;
        }
        match frame {
            None => r.complete = true,
            Some(Err(_)) => r.given_up = true,
            Some(Ok(f)) => {
                if let Some(data) = f.data_ref() {
                    r.bytes += data.len();
                    if r.bytes > REPLAY_LIMIT {
                        r.given_up = true;
                        r.pieces = Vec::new();
                    } else {
                        r.pieces.push(Piece::Data(data.clone()));
                    }
                } else if let Some(t) = f.trailers_ref() {
                    r.pieces.push(Piece::Trailers(t.clone()));
                }
            }
        }
        drop(r);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A kept body sent again (its pieces in reverse order, so each is popped off the end).
struct Replayed {
    pieces: Vec<Piece>,
}

impl Body for Replayed {
    type Data = Bytes;
    type Error = super::body::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Poll::Ready(self.pieces.pop().map(|p| {
            Ok(match p {
                Piece::Data(d) => Frame::data(d),
                Piece::Trailers(t) => Frame::trailers(t),
            })
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.pieces.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        let data = self.pieces.iter().map(|p| match p {
            Piece::Data(d) => d.len() as u64,
            Piece::Trailers(_) => 0,
        });
        if self.pieces.iter().any(|p| matches!(p, Piece::Trailers(_))) {
            return SizeHint::default();
        }
        SizeHint::with_exact(data.sum())
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

    async fn collect(req: Request<UpBody>) -> (Bytes, Option<HeaderMap>) {
        let c = req.into_body().collect().await.expect("body");
        let trailers = c.trailers().cloned();
        (c.to_bytes(), trailers)
    }

    #[tokio::test]
    async fn a_small_body_sent_whole_can_be_sent_again_with_its_trailers() {
        let mut t = HeaderMap::new();
        t.insert("x-sum", hyper::header::HeaderValue::from_static("42"));
        let frames: Vec<Result<Frame<Bytes>, crate::proxy::body::BoxError>> = vec![
            Ok(Frame::data(Bytes::from_static(b"hello "))),
            Ok(Frame::data(Bytes::from_static(b"world"))),
            Ok(Frame::trailers(t.clone())),
        ];
        let body = StreamBody::new(futures_util::stream::iter(frames)).boxed_unsync();
        let (req, replay) = Replay::record(request(body));
        let replay = replay.expect("small enough");
        assert!(replay.request().is_none(), "not sent yet");
        assert_eq!(
            collect(req).await,
            (Bytes::from_static(b"hello world"), Some(t.clone()))
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
    async fn a_body_over_the_limit_or_not_finished_is_not_kept() {
        let big = Full::new(Bytes::from(vec![0u8; REPLAY_LIMIT + 1]))
            .map_err(|never| match never {})
            .boxed_unsync();
        assert!(
            Replay::record(request(big)).1.is_none(),
            "declared too large"
        );
        let chunks: Vec<Result<Frame<Bytes>, crate::proxy::body::BoxError>> = (0..2)
            .map(|_| Ok(Frame::data(Bytes::from(vec![0u8; REPLAY_LIMIT / 2 + 1]))))
            .collect();
        let body = StreamBody::new(futures_util::stream::iter(chunks)).boxed_unsync();
        let (req, replay) = Replay::record(request(body));
        let replay = replay.expect("size unknown");
        collect(req).await;
        assert!(replay.request().is_none(), "grew over the limit");
        let body = Full::new(Bytes::from_static(b"abc"))
            .map_err(|never| match never {})
            .boxed_unsync();
        let (mut req, replay) = Replay::record(request(body));
        let replay = replay.expect("small");
        let _ = std::future::poll_fn(|cx| Pin::new(req.body_mut()).poll_frame(cx)).await;
        // The data went, but the end was never seen: the origin may not have it all.
        assert!(replay.request().is_none());
    }
}
