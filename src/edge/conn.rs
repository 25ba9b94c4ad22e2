//! One client connection after TLS (or plain HTTP on a `redirect_to_https` listener): h2 or
//! http/1.1 by ALPN, served by hyper's builder for that protocol only ([`Served`]); closed
//! after `idle_timeout` without requests, drained gracefully on shutdown, with a lingering
//! close for http/1.1 (see `linger`).

use super::activity::{Activity, Expired, InFlight, ReadWatch};
use super::linger::LingerHint;
use super::streams::{StreamExec, Streams, Woken};
use super::write_deadline::WriteDeadline;
use crate::config::ListenerConfig;
use crate::metrics::ClientHandshake;
use crate::proxy::body::Holding;
use crate::proxy::headers::ClientFields;
use crate::proxy::request_body::{ClientIn, H2Body};
use crate::proxy::upgrade::Hold;
use crate::proxy::{handler, redirect, ClientConn, Runtime};
use crate::tls::coalesce::Coalesce;
use crate::tls::early::Handshake;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Concurrent streams a client may open on one h2 connection.
const H2_MAX_STREAMS: u32 = 256;

/// Who is at the other end of a connection, as the handshake left it.
pub struct Client {
    pub peer: SocketAddr,
    /// ALPN chose h2.
    pub h2: bool,
    /// Set when the client may send 0-RTT early data: until the handshake completes, its
    /// requests may be replays.
    pub handshake: Option<Handshake>,
    /// Tells the TCP stream under the TLS whether its close must linger.
    pub linger: LingerHint,
    /// Added to every answer when the listener's port also speaks HTTP/3.
    pub alt_svc: Option<http::HeaderValue>,
    /// How the handshake went and how long it took (for the access log and Server-Timing);
    /// `None`: plain HTTP (a `redirect_to_https` listener).
    pub tls: Option<(ClientHandshake, Duration)>,
}

pub async fn serve<S>(
    tls: S,
    client: Client,
    cfg: &ListenerConfig,
    runtime: Arc<ArcSwap<Runtime>>,
    shutdown: CancellationToken,
    hold: Hold,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Client {
        peer,
        h2: is_h2,
        handshake,
        linger,
        alt_svc,
        tls: handshake_done,
    } = client;
    let redirect_to_https = cfg.redirect_to_https;
    let requests = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fields = ClientFields::new(peer.ip(), handshake_done.is_some());
    // For an http/1.1 head hyper refuses before the handler sees it (see `Event::Ended`).
    let (requests_seen, fields_kept, runtime_kept) =
        (requests.clone(), fields.clone(), runtime.clone());
    let counters = runtime.load().counters.clone();
    let limits = crate::proxy::ClientLimits {
        body_timeout: cfg.body_timeout,
        stream_send_timeout: is_h2.then_some(cfg.send_timeout),
    };
    if !is_h2 {
        linger.http1();
    }
    let activity = Activity::new();
    let act = activity.clone();
    let mut unfinished = handshake.clone();
    let svc = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
        if !is_h2 {
            // An answer may go out before the body is read (413, 408, 504): the close then
            // lingers so the client, still sending, gets it; the body's end lifts that.
            let has_body = !hyper::body::Body::is_end_stream(req.body());
            linger.request(has_body);
            if has_body {
                req.extensions_mut().insert(linger.clone());
            }
        }
        // Decided first: a redirected request is answered here, never tunnelled.
        let redirect = redirect_to_https.filter(|_| !redirect::is_acme_challenge(&req));
        if redirect.is_none()
            && (handler::is_upgrade(&req) || req.method() == hyper::Method::CONNECT)
        {
            if !is_h2 {
                linger.tunnel();
            }
            // A tunnel counts as a request in flight until it ends.
            req.extensions_mut()
                .insert(hold.clone().with(InFlight::new(&act)));
        }
        if handshake.as_ref().is_some_and(|h| !h.is_complete()) {
            req.extensions_mut().insert(crate::proxy::EarlyData);
        }
        let rt = runtime.load_full();
        let guard = InFlight::new(&act);
        let alt_svc = alt_svc.clone();
        let client = ClientConn {
            addr: peer,
            handshake: handshake_done.map(|(kind, _)| kind),
            handshake_time: handshake_done.map(|(_, took)| took),
            request: requests.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            fields: fields.clone(),
        };
        // Boxed: the request's future (4.5 KiB) is then moved as a pointer when hyper spawns
        // its stream task, not copied several times over.
        Box::pin(async move {
            let req = req.map(|body| match is_h2 {
                true => ClientIn::H2(H2Body::new(body)),
                false => ClientIn::Hyper(body),
            });
            let mut resp = match redirect {
                Some(port) => redirect::to_https(&rt, req, client, port),
                None => handler::handle(&rt, req, client, limits).await,
            };
            if let Some(v) = alt_svc {
                resp.headers_mut().insert(hyper::header::ALT_SVC, v);
            }
            // In flight until the response body ends: a long download is not idle time.
            Ok::<_, Infallible>(resp.map(|body| Holding::wrap(body, guard)))
        })
    });
    let io = TokioIo::new(Coalesce::new(
        WriteDeadline::new(
            ReadWatch::new(tls, (!is_h2).then(|| activity.clone())),
            cfg.send_timeout,
        ),
        is_h2,
    ));
    let conn = Served::new(io, svc, is_h2, cfg);
    tokio::pin!(conn);
    let idle = cfg.idle_timeout;
    // http/1.1 heads are timed here (see `activity`); h2 has no head timer.
    let head = (!is_h2).then_some(cfg.header_timeout);
    let mut draining = false;
    let idle_timer = tokio::time::sleep(head.map_or(idle, |h| h.min(idle)));
    tokio::pin!(idle_timer);
    let handshake_deadline = tokio::time::sleep(cfg.handshake_timeout);
    tokio::pin!(handshake_deadline);
    // Armed when an idle connection is told to close: one that cannot close gracefully (an h2
    // client that never sent its preface waits in hyper's handshake) is dropped then.
    let mut close_by: Option<std::pin::Pin<Box<tokio::time::Sleep>>> = None;
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    // The timers and the shutdown signal are looked at only when one of them woke the task:
    // under load the task is woken mostly by its streams and sockets, and polling four more
    // futures on each of those wake-ups was measurable.
    let control = Woken::new();
    loop {
        // After any event: the handling may have re-armed a timer, and two may have fired.
        control.wake();
        let event = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = conn.as_mut().poll(cx) {
                return Poll::Ready(Event::Ended(r));
            }
            control.poll(cx, |cx| {
                if !draining && cancelled.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Shutdown);
                }
                if idle_timer.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Idle);
                }
                if close_by
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready())
                {
                    return Poll::Ready(Event::CloseBy);
                }
                if unfinished.is_some() && handshake_deadline.as_mut().poll(cx).is_ready() {
                    return Poll::Ready(Event::Handshake);
                }
                Poll::Pending
            })
        })
        .await;
        match event {
            Event::Ended(r) => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "client connection ended with error");
                    if let Some((status, outcome)) = (!is_h2).then(|| parser_refusal(&e)).flatten()
                    {
                        let client = ClientConn {
                            addr: peer,
                            handshake: handshake_done.map(|(kind, _)| kind),
                            handshake_time: handshake_done.map(|(_, took)| took),
                            request: requests_seen.load(std::sync::atomic::Ordering::Relaxed) + 1,
                            fields: fields_kept,
                        };
                        handler::record_refused_head(
                            &runtime_kept.load(),
                            &client,
                            status,
                            outcome,
                        );
                    }
                }
                return;
            }
            Event::Shutdown => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            // Also while draining: a half-sent head keeps hyper from closing gracefully. The
            // idle timer is one timer re-armed when it fires early: requests starting and
            // ending do not touch it.
            Event::Idle => match activity.expired(idle, head, idle_timer.as_mut()) {
                None => {}
                Some(Expired::Idle) if draining => {
                    idle_timer.as_mut().reset(Instant::now() + idle);
                }
                Some(Expired::Idle) => {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                    close_by = Some(Box::pin(tokio::time::sleep(cfg.header_timeout)));
                }
                Some(Expired::Head) => {
                    tracing::debug!(%peer, after = ?cfg.header_timeout, "request head timed out");
                    return;
                }
            },
            Event::CloseBy => {
                tracing::debug!(%peer, "idle connection did not close gracefully; dropped");
                return;
            }
            // A 0-RTT connection is served before its handshake ends; one whose client never
            // sends its Finished is dropped after `handshake_timeout`, as a stalled handshake
            // is. An http/1.1 request in flight keeps hyper from reading the Finished, so with
            // one in flight the check comes again later.
            Event::Handshake => {
                if unfinished.as_ref().is_some_and(|h| h.is_complete()) {
                    unfinished = None;
                } else if activity.in_flight() == 0 {
                    tracing::debug!(%peer, after = ?cfg.handshake_timeout, "TLS handshake after early data timed out");
                    // Counted as `early` when its early data was taken; now as a timeout too.
                    counters.record_handshake_failure(crate::metrics::HandshakeFailure::Timeout);
                    return;
                } else {
                    handshake_deadline
                        .as_mut()
                        .reset(Instant::now() + cfg.handshake_timeout);
                }
            }
        }
    }
}

/// What ended a wait of [`serve`]'s loop.
enum Event {
    /// The connection finished.
    Ended(hyper::Result<()>),
    /// The edge drains.
    Shutdown,
    /// The idle timer fired (idle, a head taking too long, or not yet).
    Idle,
    /// An idle connection told to close has not.
    CloseBy,
    /// The 0-RTT handshake deadline passed.
    Handshake,
}

pin_project_lite::pin_project! {
    /// A client connection served by hyper in the protocol ALPN chose, and only in it: an
    /// http/1.1 (or plain-HTTP) connection that sends the h2 preface is not taken for h2, as
    /// hyper-util's auto builder would, whatever `http1_only` says, when upgrades are on.
    #[project = ServedProj]
    enum Served<H1, H2> {
        H1 { #[pin] conn: H1 },
        // The streams are polled first: what they write goes out in the connection's poll.
        H2 { streams: Streams, woken: Woken, #[pin] conn: H2 },
    }
}

type Io<S> = TokioIo<Coalesce<WriteDeadline<S>>>;

impl<S, Svc, B>
    Served<
        hyper::server::conn::http1::UpgradeableConnection<Io<S>, Svc>,
        hyper::server::conn::http2::Connection<Io<S>, Svc, StreamExec>,
    >
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    Svc: hyper::service::Service<
            hyper::Request<hyper::body::Incoming>,
            Response = hyper::Response<B>,
            Error = Infallible,
        > + Send
        + 'static,
    Svc::Future: Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    fn new(io: Io<S>, svc: Svc, h2: bool, cfg: &ListenerConfig) -> Self {
        if h2 {
            let (streams, exec) = Streams::new();
            let conn = hyper::server::conn::http2::Builder::new(exec)
                .timer(TokioTimer::new())
                .max_concurrent_streams(H2_MAX_STREAMS)
                .max_pending_accept_reset_streams(Some(64))
                .max_header_list_size(super::HEADER_LIST_DECODE_LIMIT as u32)
                // RFC 8441: WebSockets over h2 (extended CONNECT), bridged to the origin's
                // RFC 6455.
                .enable_connect_protocol()
                .keep_alive_interval(Some(cfg.idle_timeout / 2))
                .keep_alive_timeout(Duration::from_secs(20))
                .serve_connection(io, svc);
            Served::H2 {
                streams,
                woken: Woken::new(),
                conn,
            }
        } else {
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                // Timed by `serve` instead, from the head's first byte (see `activity`).
                .header_read_timeout(None)
                // The head with its request line (hyper's default is its read buffer's cap,
                // about 400 KiB, which the last read could overshoot).
                .max_header_size(super::MAX_HEADER_SECTION)
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades();
            Served::H1 { conn }
        }
    }

    fn graceful_shutdown(self: std::pin::Pin<&mut Self>) {
        match self.project() {
            ServedProj::H1 { conn } => conn.graceful_shutdown(),
            ServedProj::H2 { conn, woken, .. } => {
                conn.graceful_shutdown();
                woken.wake();
            }
        }
    }
}

impl<H1, H2> std::future::Future for Served<H1, H2>
where
    H1: std::future::Future<Output = hyper::Result<()>>,
    H2: std::future::Future<Output = hyper::Result<()>>,
{
    type Output = hyper::Result<()>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        match self.project() {
            ServedProj::H1 { conn } => conn.poll(cx),
            ServedProj::H2 {
                streams,
                woken,
                conn,
            } => {
                let _ = streams.poll_run(cx);
                let mut conn = conn;
                let r = woken.poll(cx, |cx| conn.as_mut().poll(cx));
                // Streams the connection just started run now, not after a turn of the
                // runtime (and what they write goes out in this poll too).
                if r.is_pending() && streams.has_started() {
                    let _ = streams.poll_run(cx);
                    return woken.poll(cx, |cx| conn.as_mut().poll(cx));
                }
                r
            }
        }
    }
}

/// The answer hyper's http/1.1 server wrote itself for a request head it could not parse
/// (its `on_error`: every parse error but an h2 preface, a status line and its own internal
/// errors), which never reached the handler: status and the access log's outcome.
fn parser_refusal(e: &hyper::Error) -> Option<(u16, &'static str)> {
    if !e.is_parse() || e.is_parse_version_h2() || e.is_parse_status() {
        return None;
    }
    let text = e.to_string();
    if text.starts_with("internal error") {
        return None;
    }
    Some(if !e.is_parse_too_large() {
        // A method, URI, version or field that does not parse, Content-Length or
        // Transfer-Encoding included (the request-smuggling probes).
        (400, "malformed request")
    } else if text.contains("URI") {
        // hyper's two "too large" kinds are told apart only by their text. (A URI long
        // enough for hyper's 414 is already over the 64 KiB head cap, so 431 comes first.)
        (414, "uri too long")
    } else {
        (431, "header section too large")
    })
}
