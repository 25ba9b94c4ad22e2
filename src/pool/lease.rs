//! A checked-out connection and the guard that gives it back: an h2 stream slot is freed when
//! the response body ends; an http/1.1 connection goes back to the idle list once the exchange
//! is complete and hyper reports it ready for the next request.

use super::conn::{Conn, Sender, UpstreamBody, Warmth};
use super::error::UpstreamError;
use super::h2conn::ResponseBody;
use super::Inner;
use http_body_util::BodyExt;
use hyper::client::conn::http1;
use hyper::{Request, Response};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long a returned http/1.1 connection may take to become ready again before it is
/// dropped instead of pooled.
const H1_READY_WAIT: Duration = Duration::from_secs(1);

/// One request's claim on a connection. Dropping it unused gives the claim back.
pub struct Lease {
    slot: Slot,
    warmth: Warmth,
    waited: Duration,
}

/// Holds the claim until the response is done; drop it when the body has ended.
pub struct StreamGuard {
    _slot: Slot,
}

/// Sending failed. `request` is `Some` when nothing of it was sent (hyper or h2 says so), which
/// makes a retry on another connection safe for any method.
#[derive(Debug)]
pub struct SendError {
    pub source: UpstreamError,
    pub request: Option<Request<UpstreamBody>>,
}

struct Slot {
    pool: Arc<Inner>,
    conn: Arc<Conn>,
    h1: Option<http1::SendRequest<UpstreamBody>>,
    /// Cleared when the claim was undone by hand (`Lease::into_parts`): nothing to give back.
    armed: bool,
}

impl Lease {
    pub(super) fn new(
        pool: Arc<Inner>,
        conn: Arc<Conn>,
        h1: Option<http1::SendRequest<UpstreamBody>>,
        warmth: Warmth,
        started: Instant,
    ) -> Self {
        if warmth == Warmth::Warm {
            pool.stats
                .reused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Lease {
            slot: Slot {
                pool,
                conn,
                h1,
                armed: true,
            },
            warmth,
            waited: started.elapsed(),
        }
    }

    /// The connection and sender, without giving the claim back: the pool undoes it itself,
    /// under its lock (a lease handed to a request that went away meanwhile).
    pub(super) fn into_parts(mut self) -> (Arc<Conn>, Option<http1::SendRequest<UpstreamBody>>) {
        self.slot.armed = false;
        (self.slot.conn.clone(), self.slot.h1.take())
    }

    /// Whether the connection was open before this request asked for it.
    pub fn warmth(&self) -> Warmth {
        self.warmth
    }

    /// Time spent getting the connection (waiting in the queue or opening one).
    pub fn waited(&self) -> Duration {
        self.waited
    }

    pub fn connection_id(&self) -> u64 {
        self.slot.conn.id
    }

    /// Sends the request; on success the guard must live as long as the response body.
    pub async fn send(
        mut self,
        req: Request<UpstreamBody>,
    ) -> Result<(Response<ResponseBody>, StreamGuard), SendError> {
        let result = match (&self.slot.conn.sender, self.slot.h1.as_mut()) {
            (Sender::H2(send), _) => super::h2conn::send(send, &self.slot.conn.ping, req)
                .await
                .map_err(|e| (UpstreamError::H2(e.error), e.request)),
            (Sender::H1, Some(send)) => {
                if let Err(source) = send.ready().await {
                    self.slot.h1 = None;
                    return Err(SendError {
                        source: UpstreamError::Http1(source),
                        request: Some(req),
                    });
                }
                // Dropped with this future (the request given up before its head came):
                // the exchange is half done, so the connection is closed, which also lets go
                // of the client's body hyper holds.
                let abandoned = self.slot.conn.flags.kill.clone().drop_guard();
                let sent = send.try_send_request(req).await;
                abandoned.disarm();
                match sent {
                    Ok(resp) => Ok(resp.map(|b| {
                        b.map_err(|e| Box::new(e) as super::h2conn::BoxError)
                            .boxed_unsync()
                    })),
                    Err(mut e) => {
                        let request = e.take_message();
                        Err((UpstreamError::Http1(e.into_error()), request))
                    }
                }
            }
            (Sender::H1, None) => unreachable!("an http/1.1 lease always carries its sender"),
        };
        match result {
            Ok(resp) => {
                if let Some(t) = resp
                    .headers()
                    .get("keep-alive")
                    .and_then(|v| v.to_str().ok())
                    .and_then(super::idle::parse_keep_alive)
                {
                    self.slot.pool.idle.announce(t);
                }
                Ok((resp, StreamGuard { _slot: self.slot }))
            }
            Err((source, request)) => {
                // The connection is suspect: an http/1.1 sender is not returned; an h2
                // connection that failed as a whole (GOAWAY, I/O) takes no new streams, so a
                // retry lands elsewhere while its in-flight streams finish.
                if let UpstreamError::H2(e) = &source {
                    if !e.is_reset() {
                        self.slot.pool.retire(self.slot.conn.id);
                    }
                }
                self.slot.h1 = None;
                self.slot.pool.maintain.notify_one();
                Err(SendError { request, source })
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        match self.conn.sender {
            Sender::H2(_) => self.pool.release_h2(&self.conn),
            Sender::H1 => {
                let send = self.h1.take();
                let pool = self.pool.clone();
                let conn = self.conn.clone();
                match send {
                    Some(s) if s.is_ready() => pool.return_h1(conn, Some(s)),
                    Some(mut s) if !s.is_closed() => {
                        // hyper finishes reading the response in its own task; wait for it
                        // rather than guess, so a reused connection is really idle.
                        tokio::spawn(async move {
                            let ready = tokio::time::timeout(H1_READY_WAIT, s.ready()).await;
                            let s = matches!(ready, Ok(Ok(()))).then_some(s);
                            pool.return_h1(conn, s);
                        });
                    }
                    _ => pool.return_h1(conn, None),
                }
            }
        }
    }
}
