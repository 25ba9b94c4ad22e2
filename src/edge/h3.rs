//! HTTP/3 on a listener's port (`[[listeners]] http3 = true`): QUIC over UDP (quinn), HTTP/3
//! framing (h3), the listener's certificates (ALPN `h3`), and the same proxy path as TCP.
//! The TCP side advertises it with `Alt-Svc`, so browsers move to it on their next request.
//!
//! The limits mirror the TCP side's: headers up to 64 KiB, arriving within `header_timeout`;
//! a connection with no request in flight for `idle_timeout` is closed (QUIC's own idle timer
//! is reset by the client's PINGs, so it is not enough); every write to the client within
//! `send_timeout`; receive windows bounded like h2's.

use super::activity::{Activity, InFlight};
use super::listener::OpenConnection;
use crate::config::ListenerConfig;
use crate::metrics::{ClientHandshake, HandshakeFailure};
use crate::proxy::body::{BoxError, ProxyBody};
use crate::proxy::request_body::ClientIn;
use crate::proxy::{handler, ClientConn, ClientLimits, Runtime};
use crate::tls::early::Handshake;
use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Concurrent requests a client may have on one HTTP/3 connection (as for h2).
const MAX_STREAMS: u32 = 256;
/// Where the h3 layer refuses a request header section (decoded) itself; the handler's 431
/// (logged) comes at the cap, as for the TCP side.
const MAX_FIELD_SECTION: u64 = super::HEADER_LIST_DECODE_LIMIT as u64;
/// Receive windows: per request stream and per connection (h2's order of magnitude).
const STREAM_WINDOW: u32 = 1024 * 1024;
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// How long a 0-RTT request with a safe method waits for its stream's end (see `serve`).
const EARLY_BODY_WAIT: Duration = Duration::from_millis(200);
/// HTTP/3's "no error", for closing a connection that is done.
const H3_NO_ERROR: u32 = 0x100;

type RecvStream = h3::server::RequestStream<h3_quinn::RecvStream, Bytes>;
type SendStream = h3::server::RequestStream<h3_quinn::SendStream<Bytes>, Bytes>;

#[derive(Debug, thiserror::Error)]
pub enum H3Error {
    #[error("binding HTTP/3 (UDP) on {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS config for QUIC: {0}")]
    Tls(String),
}

/// The `Alt-Svc` value a TCP listener on `port` sends when that port also speaks HTTP/3.
pub fn alt_svc(port: u16) -> http::HeaderValue {
    // A day: long enough that clients stay on HTTP/3, short enough that turning it off
    // takes effect.
    http::HeaderValue::from_str(&format!("h3=\":{port}\"; ma=86400"))
        .unwrap_or_else(|_| http::HeaderValue::from_static("clear"))
}

/// A bound QUIC endpoint, not yet accepting.
pub struct H3Listener {
    endpoint: quinn::Endpoint,
    config: crate::edge::listener::Settings,
    configs: Arc<QuicConfigs>,
}

/// Binds UDP `address` (the TCP listener's, so one port serves both), with SO_REUSEPORT when
/// `share_port` (a configured port, which several edgepop processes may share), and
/// checks that the edge's TLS config works for QUIC before anything advertises HTTP/3.
pub fn bind(
    address: SocketAddr,
    config: crate::edge::listener::Settings,
    tls: &Arc<rustls::ServerConfig>,
    share_port: bool,
) -> Result<H3Listener, H3Error> {
    let configs = Arc::new(QuicConfigs {
        last: Mutex::new(None),
    });
    let initial = configs.current(tls, &config.load())?;
    let err = |source| H3Error::Bind { address, source };
    let domain = socket2::Domain::for_address(address);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    // Not for a port the TCP bind picked: joining some other socket's SO_REUSEPORT group
    // there would split QUIC flows with it instead of failing.
    s.set_reuse_port(share_port).map_err(err)?;
    if address.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&address.into()).map_err(err)?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    // quinn takes in connections only with a server config on the endpoint; each is then
    // accepted with the config current at that moment (certificates follow reloads).
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        Some(quinn::ServerConfig::clone(&initial)),
        std::net::UdpSocket::from(s),
        runtime,
    )
    .map_err(err)?;
    Ok(H3Listener {
        endpoint,
        config,
        configs,
    })
}

/// The QUIC server config made from the edge's TLS config and the listener's idle timeout,
/// rebuilt when a reload swaps either.
struct QuicConfigs {
    last: Mutex<Option<QuicKey>>,
}

struct QuicKey {
    tls: Arc<rustls::ServerConfig>,
    idle: Duration,
    quic: Arc<quinn::ServerConfig>,
}

impl QuicConfigs {
    fn current(
        &self,
        tls: &Arc<rustls::ServerConfig>,
        listener: &ListenerConfig,
    ) -> Result<Arc<quinn::ServerConfig>, H3Error> {
        // A std mutex: held for a pointer compare or one config build, never across an await.
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(k) = last.as_ref() {
            if Arc::ptr_eq(&k.tls, tls) && k.idle == listener.idle_timeout {
                return Ok(k.quic.clone());
            }
        }
        let quic = Arc::new(quic_config(tls, listener)?);
        *last = Some(QuicKey {
            tls: tls.clone(),
            idle: listener.idle_timeout,
            quic: quic.clone(),
        });
        Ok(quic)
    }
}

/// The edge's certificates (same resolver, same session store) with ALPN `h3`.
fn quic_config(
    tls: &rustls::ServerConfig,
    listener: &ListenerConfig,
) -> Result<quinn::ServerConfig, H3Error> {
    let mut crypto = tls.clone();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    // QUIC takes early data unlimited or not at all: on when the edge does 0-RTT
    // (`[pop] early_data`, sessions single-use as for TCP), and requests that arrive before
    // the handshake completes follow the same rules (`EarlyData`).
    crypto.max_early_data_size = if tls.max_early_data_size > 0 {
        u32::MAX
    } else {
        0
    };
    crypto.send_half_rtt_data = false;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(crypto))
        .map_err(|e| H3Error::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS))
        // HTTP/3 needs three (control, QPACK encoder and decoder); a few spare for GREASE.
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(8))
        .stream_receive_window(quinn::VarInt::from_u32(STREAM_WINDOW))
        .receive_window(quinn::VarInt::from_u32(CONNECTION_WINDOW))
        // No datagram extension: none would ever be read.
        .datagram_receive_buffer_size(None)
        // A backstop for dead peers; idleness between requests is timed by `Connection`.
        .max_idle_timeout(quinn::IdleTimeout::try_from(listener.idle_timeout).ok());
    config.transport_config(Arc::new(transport));
    Ok(config)
}

impl H3Listener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.endpoint.local_addr()
    }

    /// Accepts until `shutdown`; connections and their requests are tracked for drain.
    pub async fn run(
        self,
        tls: Arc<ArcSwap<rustls::ServerConfig>>,
        runtime: Arc<ArcSwap<Runtime>>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        let max_connections = self.config.load().max_connections;
        let limit = Arc::new(Semaphore::new(max_connections));
        loop {
            // select!: stop accepting as soon as drain starts; connections already accepted
            // drain on their own.
            let incoming = tokio::select! {
                i = self.endpoint.accept() => match i {
                    Some(i) => i,
                    None => return,
                },
                _ = shutdown.cancelled() => break,
            };
            // Over half the slots taken: a client must prove its address (a Retry round
            // trip) before it gets one, so spoofed Initials cannot hold slots.
            if limit.available_permits() < max_connections / 2
                && !incoming.remote_address_validated()
                && incoming.may_retry()
            {
                if let Err(e) = incoming.retry() {
                    e.into_incoming().refuse();
                }
                continue;
            }
            let Ok(slot) = limit.clone().try_acquire_owned() else {
                incoming.refuse();
                continue;
            };
            let cfg = ListenerConfig::clone(&self.config.load());
            let quic = match self.configs.current(&tls.load_full(), &cfg) {
                Ok(q) => q,
                Err(e) => {
                    tracing::warn!(error = %e, "HTTP/3 connection refused");
                    incoming.refuse();
                    continue;
                }
            };
            let conn = Connection {
                runtime: runtime.clone(),
                shutdown: shutdown.clone(),
                tracker: tracker.clone(),
                cfg,
                early: tls.load().max_early_data_size > 0,
                handshake: Handshake::default(),
            };
            // The slot and the `edgepop_client_connections` count, until the connection ends.
            let open = OpenConnection::new(&runtime.load().counters, slot);
            tracker.spawn(async move {
                let _open = open;
                conn.serve(incoming, quic).await;
            });
        }
        // New clients are turned away at once instead of waiting for a handshake.
        self.endpoint.set_server_config(None);
        self.endpoint.wait_idle().await;
    }
}

/// A QUIC handshake still under way while its connection is served (0-RTT).
struct Unfinished<'a> {
    counters: &'a crate::metrics::EdgeCounters,
    armed: bool,
}

impl Drop for Unfinished<'_> {
    fn drop(&mut self) {
        if self.armed {
            self.counters
                .record_handshake_failure(HandshakeFailure::Error);
        }
    }
}

struct Connection {
    runtime: Arc<ArcSwap<Runtime>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    cfg: ListenerConfig,
    /// 0-RTT on: the connection is served before its handshake completes.
    early: bool,
    /// Set once the handshake completed; requests before that may be replays.
    handshake: Handshake,
}

impl Connection {
    async fn serve(self, incoming: quinn::Incoming, quic: Arc<quinn::ServerConfig>) {
        let peer = incoming.remote_address();
        let started = tokio::time::Instant::now();
        let counters = self.runtime.load().counters.clone();
        // Known once the handshake completes (with 0-RTT, requests may come before).
        let mut handshake_time = None;
        let mut requests = 0u64;
        let fields = crate::proxy::headers::ClientFields::new(peer.ip(), true);
        let connecting = match incoming.accept_with(quic) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "QUIC connection refused");
                return;
            }
        };
        // With 0-RTT the connection is served at once (the client's first request may be in
        // its first flight) and the handshake completes alongside; without, it completes first.
        let (quic_conn, mut finishing) = if self.early {
            match connecting.into_0rtt() {
                Ok((c, accepted)) => (c, Some(accepted)),
                Err(_) => return,
            }
        } else {
            match tokio::time::timeout(self.cfg.handshake_timeout, connecting).await {
                Ok(Ok(c)) => {
                    self.handshake.complete();
                    let took = started.elapsed();
                    handshake_time = Some(took);
                    counters.record_handshake(ClientHandshake::Quic, took);
                    (c, None)
                }
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "QUIC handshake failed");
                    counters.record_handshake_failure(HandshakeFailure::Error);
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, after = ?self.cfg.handshake_timeout, "QUIC handshake timed out");
                    counters.record_handshake_failure(HandshakeFailure::Timeout);
                    return;
                }
            }
        };
        // With 0-RTT the handshake ends while the connection is served; if the connection ends
        // first, whichever way, the handshake counts as failed.
        let mut unfinished = Unfinished {
            counters: &counters,
            armed: finishing.is_some(),
        };
        let handshake_deadline = tokio::time::sleep(self.cfg.handshake_timeout);
        tokio::pin!(handshake_deadline);
        // Within the handshake timeout: with 0-RTT the set-up runs before the handshake ends,
        // and a client that allows no streams would hold it (and its slot) open.
        let mut builder = h3::server::builder();
        builder.max_field_section_size(MAX_FIELD_SECTION);
        let setup = builder.build::<_, Bytes>(h3_quinn::Connection::new(quic_conn.clone()));
        let mut h3 = match tokio::time::timeout(self.cfg.handshake_timeout, setup).await {
            Ok(Ok(h)) => h,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "HTTP/3 connection setup failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "HTTP/3 connection setup timed out");
                return;
            }
        };
        let close = || quic_conn.close(quinn::VarInt::from_u32(H3_NO_ERROR), b"");
        let activity = Activity::new();
        let idle = self.cfg.idle_timeout;
        let idle_timer = tokio::time::sleep(idle);
        tokio::pin!(idle_timer);
        let mut draining = false;
        loop {
            // select!: the next request; drain starting (GOAWAY, then close once the
            // requests taken are done); the idle timer (re-armed while requests run); a
            // request ending while draining; the handshake completing (0-RTT), or not in time.
            tokio::select! {
                // Resolves when the handshake ends, with whether 0-RTT was used (false too when
                // the client sent none); a failed handshake fails the connection, seen by
                // `accept`.
                _ = async {
                    match finishing.as_mut() {
                        Some(h) => h.await,
                        None => std::future::pending().await,
                    }
                }, if finishing.is_some() => {
                    finishing = None;
                    // It resolves on a failed handshake too; requests already taken in may
                    // still resolve after that, and must not pass as sent after a completed
                    // handshake (quinn records the close before it resolves).
                    if quic_conn.close_reason().is_some() {
                        return;
                    }
                    self.handshake.complete();
                    // QUIC does not say whether the client sent 0-RTT data: the time is to
                    // the handshake's end, as without 0-RTT.
                    let took = started.elapsed();
                    handshake_time = Some(took);
                    unfinished.armed = false;
                    counters.record_handshake(ClientHandshake::Quic, took);
                }
                _ = &mut handshake_deadline, if finishing.is_some() => {
                    tracing::debug!(%peer, after = ?self.cfg.handshake_timeout, "QUIC handshake after early data timed out");
                    unfinished.armed = false;
                    counters.record_handshake_failure(HandshakeFailure::Timeout);
                    close();
                    return;
                }
                r = h3.accept() => match r {
                    Ok(Some(resolver)) => {
                        requests += 1;
                        let client = ClientConn {
                            addr: peer,
                            handshake: Some(ClientHandshake::Quic),
                            handshake_time,
                            request: requests,
                            fields: fields.clone(),
                        };
                        self.spawn_request(resolver, client, &activity);
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "HTTP/3 connection ended");
                        return;
                    }
                },
                _ = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    // One past the last request taken: that one is processed, not retried.
                    if let Err(e) = h3.shutdown(1).await {
                        tracing::debug!(%peer, error = %e, "HTTP/3 GOAWAY failed");
                        return;
                    }
                    if activity.in_flight() == 0 {
                        return close_after_delivery(&quic_conn).await;
                    }
                }
                _ = activity.ended(), if draining => {
                    if activity.in_flight() == 0 {
                        return close_after_delivery(&quic_conn).await;
                    }
                }
                _ = &mut idle_timer => {
                    if activity.expired(idle, None, idle_timer.as_mut()).is_some() {
                        tracing::debug!(%peer, "HTTP/3 connection idle; closed");
                        close();
                        return;
                    }
                }
            }
        }
    }

    fn spawn_request(
        &self,
        resolver: h3::server::RequestResolver<h3_quinn::Connection, Bytes>,
        client: ClientConn,
        activity: &Arc<Activity>,
    ) {
        let peer = client.addr;
        let runtime = self.runtime.clone();
        let cfg = self.cfg.clone();
        let in_flight = InFlight::new(activity);
        let handshake = self.handshake.clone();
        self.tracker.spawn(async move {
            let _in_flight = in_flight;
            let resolved = tokio::time::timeout(cfg.header_timeout, resolver.resolve_request());
            let (req, stream) = match resolved.await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "bad HTTP/3 request");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, after = ?cfg.header_timeout, "HTTP/3 request head timed out");
                    return;
                }
            };
            let head = req.method() == http::Method::HEAD;
            let (send, recv) = stream.split();
            let declared = req
                .headers()
                .get(http::header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok());
            let mut body = H3Body::new(recv, declared);
            let early = !handshake.is_complete();
            if early && matches!(*req.method(), http::Method::GET | http::Method::HEAD | http::Method::OPTIONS) {
                // A 0-RTT request goes on only if it has no body (else 425), and the stream's
                // end may come a packet after its head: worth a short wait, not a false 425.
                body.settle(EARLY_BODY_WAIT).await;
            }
            let mut req = req.map(|()| ClientIn::H3(Box::new(body)));
            if early {
                req.extensions_mut().insert(crate::proxy::EarlyData);
            }
            let limits = ClientLimits {
                body_timeout: cfg.body_timeout,
                stream_send_timeout: Some(cfg.send_timeout),
            };
            let rt = runtime.load_full();
            let resp = handler::handle(&rt, req, client, limits).await;
            if let Err(e) = respond(send, resp, head, cfg.send_timeout).await {
                tracing::debug!(%peer, error = %e, "HTTP/3 response not sent whole");
            }
        });
    }
}

/// Closes a drained connection once its last answers have had time to arrive: a QUIC close
/// drops data still unsent or unacknowledged, and h3 does not say when a stream's data is
/// acknowledged. The client may close first (it should, after GOAWAY, once its requests are
/// answered).
async fn close_after_delivery(conn: &quinn::Connection) {
    let grace = (conn.rtt() * 4).max(Duration::from_secs(1));
    // select!: the client closing, or the grace running out.
    tokio::select! {
        _ = conn.closed() => {}
        _ = tokio::time::sleep(grace) => conn.close(quinn::VarInt::from_u32(H3_NO_ERROR), b""),
    }
}

/// Sends the response head, the body (unless the request was HEAD) and trailers, each write
/// within `send_timeout`, else the stream is reset: a client that takes nothing must not
/// hold the origin's answer.
async fn respond(
    mut send: SendStream,
    resp: http::Response<ProxyBody>,
    head: bool,
    limit: Duration,
) -> Result<(), BoxError> {
    use tokio::time::timeout;
    let (parts, mut body) = resp.into_parts();
    let head_sent = timeout(
        limit,
        send.send_response(http::Response::from_parts(parts, ())),
    );
    settle(head_sent.await, &mut send, limit)?;
    if !head {
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(f) => f,
                Err(e) => {
                    // The origin's body broke: the client must not take a cut body for a whole
                    // one.
                    send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                    return Err(e);
                }
            };
            match frame.into_data() {
                Ok(data) => settle(timeout(limit, send.send_data(data)).await, &mut send, limit)?,
                Err(frame) => {
                    if let Ok(t) = frame.into_trailers() {
                        settle(
                            timeout(limit, send.send_trailers(t)).await,
                            &mut send,
                            limit,
                        )?;
                    }
                }
            }
        }
    }
    settle(timeout(limit, send.finish()).await, &mut send, limit)
}

/// The outcome of one write to the client under `limit`: a write that did not complete in
/// time resets the stream.
fn settle(
    written: Result<Result<(), h3::error::StreamError>, tokio::time::error::Elapsed>,
    send: &mut SendStream,
    limit: Duration,
) -> Result<(), BoxError> {
    match written {
        Ok(r) => r.map_err(|e| Box::new(e) as BoxError),
        Err(_) => {
            send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
            Err(format!("client took nothing for {limit:?}").into())
        }
    }
}

/// The request body of an HTTP/3 stream, as an `http_body::Body`. Checked against its
/// Content-Length (h3 does not, and an http/1.1 origin would get a body that is not the one
/// declared). Request trailers are not read: h3 0.0.8 panics on them after a DATA frame the
/// client cut short, so they end the body instead.
pub struct H3Body {
    recv: RecvStream,
    /// A first chunk found when looking whether the body is empty.
    first: Option<Bytes>,
    /// An error found then, reported on the first poll.
    error: Option<BoxError>,
    ended: bool,
    declared: Option<u64>,
    received: u64,
}

impl H3Body {
    /// Looks once, without waiting, whether the client already ended the stream: a GET's
    /// HEADERS usually come with the stream's end, and a body known to be empty is sent
    /// upstream as none (no chunked GET to an http/1.1 origin, a retry stays possible).
    fn new(recv: RecvStream, declared: Option<u64>) -> Self {
        let mut body = H3Body {
            recv,
            first: None,
            error: None,
            ended: declared == Some(0),
            declared,
            received: 0,
        };
        if body.ended {
            return body;
        }
        let mut cx = Context::from_waker(Waker::noop());
        match body.recv.poll_recv_data(&mut cx) {
            Poll::Ready(Ok(Some(mut buf))) => {
                body.first = Some(buf.copy_to_bytes(buf.remaining()));
            }
            Poll::Ready(Ok(None)) => {
                if let Err(e) = body.check_end() {
                    body.error = Some(e);
                } else {
                    body.ended = true;
                }
            }
            Poll::Ready(Err(e)) => body.error = Some(Box::new(e)),
            Poll::Pending => {}
        }
        body
    }

    /// Waits up to `limit` for what [`H3Body::new`] looked for without waiting: the first
    /// chunk or the stream's end.
    async fn settle(&mut self, limit: Duration) {
        if self.ended || self.first.is_some() || self.error.is_some() {
            return;
        }
        let looked = std::future::poll_fn(|cx| self.recv.poll_recv_data(cx));
        match tokio::time::timeout(limit, looked).await {
            Ok(Ok(Some(mut buf))) => self.first = Some(buf.copy_to_bytes(buf.remaining())),
            Ok(Ok(None)) => match self.check_end() {
                Err(e) => self.error = Some(e),
                Ok(()) => self.ended = true,
            },
            Ok(Err(e)) => self.error = Some(Box::new(e)),
            Err(_) => {}
        }
    }

    fn check_end(&self) -> Result<(), BoxError> {
        match self.declared {
            Some(d) if d != self.received => Err(format!(
                "request body of {} bytes, Content-Length says {d}",
                self.received
            )
            .into()),
            _ => Ok(()),
        }
    }

    fn data(&mut self, b: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.received += b.len() as u64;
        if self.declared.is_some_and(|d| self.received > d) {
            self.ended = true;
            return Poll::Ready(Some(Err(
                "request body longer than its Content-Length".into()
            )));
        }
        Poll::Ready(Some(Ok(Frame::data(b))))
    }
}

impl Body for H3Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if let Some(e) = this.error.take() {
            this.ended = true;
            return Poll::Ready(Some(Err(e)));
        }
        if let Some(b) = this.first.take() {
            return this.data(b);
        }
        if this.ended {
            return Poll::Ready(None);
        }
        match ready!(this.recv.poll_recv_data(cx)) {
            Ok(Some(mut buf)) => {
                let b = buf.copy_to_bytes(buf.remaining());
                this.data(b)
            }
            Ok(None) => {
                this.ended = true;
                match this.check_end() {
                    Ok(()) => Poll::Ready(None),
                    Err(e) => Poll::Ready(Some(Err(e))),
                }
            }
            Err(e) => {
                this.ended = true;
                Poll::Ready(Some(Err(Box::new(e))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.first.is_none() && self.error.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.declared {
            Some(d) => SizeHint::with_exact(d.saturating_sub(self.received)),
            None if self.is_end_stream() => SizeHint::with_exact(0),
            None => SizeHint::default(),
        }
    }
}
