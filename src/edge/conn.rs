//! One client connection after TLS: h2 or http/1.1 by ALPN, served by hyper-util's auto
//! builder; closed after `idle_timeout` without requests, drained gracefully on shutdown,
//! with a lingering close for http/1.1 (see `linger`).

use super::activity::{Activity, InFlight};
use super::linger::LingerHint;
use super::write_deadline::WriteDeadline;
use crate::config::ListenerConfig;
use crate::metrics::ClientHandshake;
use crate::proxy::body::Holding;
use crate::proxy::upgrade::Hold;
use crate::proxy::{handler, redirect, ClientConn, Runtime};
use crate::tls::coalesce::Coalesce;
use crate::tls::early::Handshake;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
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
    let requests = std::sync::atomic::AtomicU64::new(0);
    let counters = runtime.load().counters.clone();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(cfg.header_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(H2_MAX_STREAMS)
        .max_pending_accept_reset_streams(Some(64))
        // RFC 8441: WebSockets over h2 (extended CONNECT), bridged to the origin's RFC 6455.
        .enable_connect_protocol()
        .keep_alive_interval(Some(cfg.idle_timeout / 2))
        .keep_alive_timeout(Duration::from_secs(20));
    let builder = if is_h2 {
        builder.http2_only()
    } else {
        builder.http1_only()
    };
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
        if req.headers().contains_key(hyper::header::UPGRADE)
            || req.method() == hyper::Method::CONNECT
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
        };
        // Boxed: the request's future (4.5 KiB) is then moved as a pointer when hyper spawns
        // its stream task, not copied several times over.
        Box::pin(async move {
            let req = req.map(crate::proxy::request_body::ClientIn::Hyper);
            let mut resp = match redirect_to_https {
                Some(port) if !redirect::is_acme_challenge(&req) => {
                    redirect::to_https(&rt, &req, client, port)
                }
                _ => handler::handle(&rt, req, client, limits).await,
            };
            if let Some(v) = alt_svc {
                resp.headers_mut().insert(hyper::header::ALT_SVC, v);
            }
            // In flight until the response body ends: a long download is not idle time.
            Ok::<_, Infallible>(resp.map(|body| Holding::wrap(body, guard)))
        })
    });
    let io = TokioIo::new(Coalesce::new(
        WriteDeadline::new(tls, cfg.send_timeout),
        is_h2,
    ));
    let conn = builder.serve_connection_with_upgrades(io, svc);
    tokio::pin!(conn);
    let idle = cfg.idle_timeout;
    let mut draining = false;
    let idle_timer = tokio::time::sleep(idle);
    tokio::pin!(idle_timer);
    let handshake_deadline = tokio::time::sleep(cfg.handshake_timeout);
    tokio::pin!(handshake_deadline);
    loop {
        // select!: the connection finishing, drain starting, the idle timer, or (0-RTT) the
        // handshake deadline. The idle timer is one timer re-armed when it fires early:
        // requests starting and ending do not touch it.
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "client connection ended with error");
                }
                return;
            }
            _ = shutdown.cancelled(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle_timer, if !draining => {
                if activity.idle_expired(idle, idle_timer.as_mut()) {
                    draining = true;
                    conn.as_mut().graceful_shutdown();
                }
            }
            // A 0-RTT connection is served before its handshake ends; one whose client never
            // sends its Finished is dropped after `handshake_timeout`, as a stalled handshake
            // is. An http/1.1 request in flight keeps hyper from reading the Finished, so with
            // one in flight the check comes again later.
            _ = &mut handshake_deadline, if unfinished.is_some() => {
                if unfinished.as_ref().is_some_and(|h| h.is_complete()) {
                    unfinished = None;
                } else if activity.in_flight() == 0 {
                    tracing::debug!(%peer, after = ?cfg.handshake_timeout, "TLS handshake after early data timed out");
                    // Counted as `early` when its early data was taken; now as a timeout too.
                    counters.record_handshake_failure(crate::metrics::HandshakeFailure::Timeout);
                    return;
                } else {
                    handshake_deadline.as_mut().reset(Instant::now() + cfg.handshake_timeout);
                }
            }
        }
    }
}
