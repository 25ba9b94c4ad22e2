//! HTTP/3 on a listener's port (`[[listeners]] http3 = true`): QUIC over UDP (quinn), HTTP/3
//! framing (h3), the listener's certificates (ALPN `h3`), and the same proxy path as TCP.
//! The TCP side advertises it with `Alt-Svc`, so browsers move to it on their next request.

use crate::config::ListenerConfig;
use crate::metrics::EdgeCounters;
use crate::proxy::body::{BoxError, ProxyBody};
use crate::proxy::request_body::ClientIn;
use crate::proxy::{handler, ClientLimits, Runtime};
use arc_swap::ArcSwap;
use bytes::{Buf, Bytes};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use quinn::ServerConfig;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Concurrent requests a client may have on one HTTP/3 connection (as for h2).
const MAX_STREAMS: u32 = 256;

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
}

/// Binds UDP `address` (the TCP listener's, so one port serves both) with SO_REUSEPORT.
pub fn bind(
    address: SocketAddr,
    config: crate::edge::listener::Settings,
) -> Result<H3Listener, H3Error> {
    let err = |source| H3Error::Bind { address, source };
    let domain = socket2::Domain::for_address(address);
    let s = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
        .map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    if address.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&address.into()).map_err(err)?;
    let runtime: Arc<dyn quinn::Runtime> = Arc::new(quinn::TokioRuntime);
    // The server config comes when it runs (`H3Listener::run`).
    let endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        std::net::UdpSocket::from(s),
        runtime,
    )
    .map_err(err)?;
    Ok(H3Listener { endpoint, config })
}

/// The QUIC server config made from the edge's TLS config, rebuilt when a reload swaps that.
struct QuicConfigs {
    last: Mutex<Option<(Arc<rustls::ServerConfig>, Arc<quinn::ServerConfig>)>>,
}

impl QuicConfigs {
    fn current(
        &self,
        tls: &Arc<rustls::ServerConfig>,
        listener: &ListenerConfig,
    ) -> Result<Arc<quinn::ServerConfig>, H3Error> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, q)) = last.as_ref() {
            if Arc::ptr_eq(t, tls) {
                return Ok(q.clone());
            }
        }
        let q = Arc::new(quic_config(tls, listener)?);
        *last = Some((tls.clone(), q.clone()));
        Ok(q)
    }
}

/// The edge's certificates (same resolver, same session store) with ALPN `h3`. QUIC allows
/// early data only unlimited or off: off here.
fn quic_config(
    tls: &rustls::ServerConfig,
    listener: &ListenerConfig,
) -> Result<quinn::ServerConfig, H3Error> {
    let mut crypto = tls.clone();
    crypto.alpn_protocols = vec![b"h3".to_vec()];
    crypto.max_early_data_size = 0;
    crypto.send_half_rtt_data = false;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(crypto))
        .map_err(|e| H3Error::Tls(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport.max_concurrent_bidi_streams(quinn::VarInt::from_u32(MAX_STREAMS));
    transport.max_idle_timeout(quinn::IdleTimeout::try_from(listener.idle_timeout).ok());
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
        let configs = Arc::new(QuicConfigs {
            last: Mutex::new(None),
        });
        // quinn only takes in connections with a server config on the endpoint; each is
        // then accepted with the config current at that moment.
        match configs.current(&tls.load_full(), &self.config.load()) {
            Ok(q) => self
                .endpoint
                .set_server_config(Some(ServerConfig::clone(&q))),
            Err(e) => {
                tracing::error!(error = %e, "HTTP/3 not served");
                return;
            }
        }
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
            let Ok(slot) = limit.clone().try_acquire_owned() else {
                incoming.refuse();
                continue;
            };
            let cfg = ListenerConfig::clone(&self.config.load());
            let quic = match configs.current(&tls.load_full(), &cfg) {
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
            };
            tracker.spawn(async move {
                let _slot = slot;
                conn.serve(incoming, quic).await;
            });
        }
        // Connections still open finish their requests; then the endpoint goes with them.
        self.endpoint.wait_idle().await;
    }
}

struct Connection {
    runtime: Arc<ArcSwap<Runtime>>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    cfg: ListenerConfig,
}

/// Counts an HTTP/3 connection in `edgepop_client_connections` while it lives.
struct Counted(Arc<EdgeCounters>);

impl Counted {
    fn new(counters: &Arc<EdgeCounters>) -> Self {
        counters.client_connections.fetch_add(1, Ordering::Relaxed);
        Counted(counters.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.client_connections.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Connection {
    async fn serve(self, incoming: quinn::Incoming, quic: Arc<quinn::ServerConfig>) {
        let peer = incoming.remote_address();
        let _counted = Counted::new(&self.runtime.load().counters);
        let connecting = match incoming.accept_with(quic) {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "QUIC connection refused");
                return;
            }
        };
        let conn = match tokio::time::timeout(self.cfg.handshake_timeout, connecting).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "QUIC handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, after = ?self.cfg.handshake_timeout, "QUIC handshake timed out");
                return;
            }
        };
        let mut h3 = match h3::server::builder()
            .build::<_, Bytes>(h3_quinn::Connection::new(conn))
            .await
        {
            Ok(h) => h,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "HTTP/3 connection setup failed");
                return;
            }
        };
        let limits = ClientLimits {
            body_timeout: self.cfg.body_timeout,
            stream_send_timeout: Some(self.cfg.send_timeout),
        };
        let mut draining = false;
        loop {
            // select!: the next request, or drain starting (then GOAWAY, and the requests
            // already taken finish).
            let next = tokio::select! {
                r = h3.accept() => r,
                _ = self.shutdown.cancelled(), if !draining => {
                    draining = true;
                    if let Err(e) = h3.shutdown(0).await {
                        tracing::debug!(%peer, error = %e, "HTTP/3 GOAWAY failed");
                        return;
                    }
                    continue;
                }
            };
            match next {
                Ok(Some(resolver)) => {
                    let runtime = self.runtime.clone();
                    let send_timeout = self.cfg.send_timeout;
                    self.tracker.spawn(async move {
                        let (req, stream) = match resolver.resolve_request().await {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::debug!(%peer, error = %e, "bad HTTP/3 request");
                                return;
                            }
                        };
                        let (send, recv) = stream.split();
                        let req = req.map(|()| ClientIn::H3(H3Body::new(recv)));
                        let rt = runtime.load_full();
                        let resp = handler::handle(&rt, req, peer, limits).await;
                        if let Err(e) = respond(send, resp, send_timeout).await {
                            tracing::debug!(%peer, error = %e, "HTTP/3 response not sent whole");
                        }
                    });
                }
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "HTTP/3 connection ended");
                    return;
                }
            }
        }
    }
}

/// Sends the response head, the body (each piece within `send_timeout`, else the stream is
/// reset: a client that reads nothing must not hold the origin's answer), and trailers.
async fn respond(
    mut send: SendStream,
    resp: http::Response<ProxyBody>,
    send_timeout: Duration,
) -> Result<(), BoxError> {
    let (parts, mut body) = resp.into_parts();
    send.send_response(http::Response::from_parts(parts, ()))
        .await?;
    while let Some(frame) = body.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) => {
                // The origin's body broke: the client must not take a cut body for a whole one.
                send.stop_stream(h3::error::Code::H3_INTERNAL_ERROR);
                return Err(e);
            }
        };
        let sent = match frame.into_data() {
            Ok(data) => tokio::time::timeout(send_timeout, send.send_data(data)).await,
            Err(frame) => match frame.into_trailers() {
                Ok(t) => tokio::time::timeout(send_timeout, send.send_trailers(t)).await,
                Err(_) => continue,
            },
        };
        match sent {
            Ok(r) => r?,
            Err(_) => {
                send.stop_stream(h3::error::Code::H3_REQUEST_CANCELLED);
                return Err(format!("client took no data for {send_timeout:?}").into());
            }
        }
    }
    send.finish().await?;
    Ok(())
}

/// The request body of an HTTP/3 stream, as an `http_body::Body`.
pub struct H3Body {
    recv: RecvStream,
    /// A first chunk found when looking whether the body is empty.
    first: Option<Bytes>,
    data_done: bool,
    ended: bool,
}

impl H3Body {
    /// Looks once, without waiting, whether the client already ended the stream: a GET's
    /// HEADERS usually come with the stream's end, and a body known to be empty is sent
    /// upstream as none (no chunked GET to an http/1.1 origin, a retry stays possible).
    fn new(recv: RecvStream) -> Self {
        let mut body = H3Body {
            recv,
            first: None,
            data_done: false,
            ended: false,
        };
        let mut cx = Context::from_waker(Waker::noop());
        if let Poll::Ready(Ok(d)) = body.recv.poll_recv_data(&mut cx) {
            match d {
                Some(mut buf) => body.first = Some(buf.copy_to_bytes(buf.remaining())),
                None => {
                    body.data_done = true;
                    if let Poll::Ready(Ok(None)) = body.recv.poll_recv_trailers(&mut cx) {
                        body.ended = true;
                    }
                }
            }
        }
        body
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
        if let Some(b) = this.first.take() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        if this.ended {
            return Poll::Ready(None);
        }
        if !this.data_done {
            match ready!(this.recv.poll_recv_data(cx)) {
                Ok(Some(mut buf)) => {
                    return Poll::Ready(Some(Ok(Frame::data(buf.copy_to_bytes(buf.remaining())))))
                }
                Ok(None) => this.data_done = true,
                Err(e) => {
                    this.ended = true;
                    return Poll::Ready(Some(Err(Box::new(e))));
                }
            }
        }
        let trailers = ready!(this.recv.poll_recv_trailers(cx));
        this.ended = true;
        match trailers {
            Ok(Some(t)) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Ok(None) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(Box::new(e)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ended && self.first.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        if self.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}
