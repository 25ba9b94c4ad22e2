//! Accept loop: SO_REUSEPORT sockets (many instances per PoP), then one task per connection:
//! any PROXY protocol header, the per-client limit, and the TLS handshake, all within
//! `handshake_timeout`, with the handshake timed and counted in the metrics. At
//! `max_connections` open connections it stops accepting (new ones wait in the kernel's
//! backlog) until one closes. Stops accepting on drain.

use super::client_limit::{ClientTable, PerClient};
use super::conn;
use super::linger::LingeringTcp;
use super::proxy_protocol::ProxyHeaderError;
use crate::config::ListenerConfig;
use crate::metrics::{ClientHandshake, EdgeCounters, HandshakeFailure};
use crate::proxy::Runtime;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("binding listener {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A listener's settings, swapped by a reload: new connections use the current ones.
pub type Settings = Arc<ArcSwap<ListenerConfig>>;

/// A bound listener, not yet accepting.
pub struct Listener {
    config: Settings,
    socket: TcpListener,
    /// `Alt-Svc` for this listener's answers when its port also speaks HTTP/3.
    alt_svc: Option<http::HeaderValue>,
    /// Connections per client, for `max_connections_per_client`.
    clients: Arc<ClientTable>,
}

/// Binds with SO_REUSEADDR and SO_REUSEPORT so several edgepop processes can share a port.
pub fn bind(config: &ListenerConfig) -> Result<Listener, ListenError> {
    let address = config.address;
    let err = |source| ListenError::Bind { address, source };
    let domain = socket2::Domain::for_address(address);
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))
        .map_err(err)?;
    s.set_reuse_address(true).map_err(err)?;
    s.set_reuse_port(true).map_err(err)?;
    if address.is_ipv6() {
        s.set_only_v6(true).map_err(err)?;
    }
    s.set_nonblocking(true).map_err(err)?;
    s.bind(&address.into()).map_err(err)?;
    s.listen(4096).map_err(err)?;
    let socket = TcpListener::from_std(s.into()).map_err(err)?;
    Ok(Listener {
        config: Arc::new(ArcSwap::from_pointee(config.clone())),
        socket,
        alt_svc: None,
        clients: Arc::default(),
    })
}

impl Listener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Answers on this listener advertise HTTP/3 on `port` (`Alt-Svc`).
    pub fn advertise_h3(&mut self, port: u16) {
        self.alt_svc = Some(super::h3::alt_svc(port));
    }

    /// The handle a reload uses to change this listener's timeouts.
    pub fn settings(&self) -> Settings {
        self.config.clone()
    }

    /// Accepts until `shutdown`; each connection is tracked so drain can wait for it.
    pub async fn run(
        self,
        tls: Arc<ArcSwap<rustls::ServerConfig>>,
        runtime: Arc<ArcSwap<Runtime>>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        // Fixed for the listener's life: a reload cannot resize it (a restart can).
        let max_connections = self.config.load().max_connections;
        let address = self.config.load().address;
        let limit = Arc::new(Semaphore::new(max_connections));
        let counters = runtime.load().counters.clone();
        let mut last_warning: Option<Instant> = None;
        loop {
            // Wait for a free slot without holding it while accept waits: h2 WebSockets take
            // slots of the same limit, and a slot held in reserve here would make them fail
            // one early.
            if limit.available_permits() == 0
                && last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(10))
            {
                last_warning = Some(Instant::now());
                tracing::warn!(
                    %address,
                    max_connections,
                    "connection limit reached; not accepting until a connection closes"
                );
            }
            tokio::select! {
                p = limit.acquire() => match p {
                    Ok(p) => drop(p),
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            }
            // select!: stop accepting as soon as drain starts; connections already accepted
            // keep their own shutdown handling.
            let accepted = tokio::select! {
                r = self.socket.accept() => r,
                _ = shutdown.cancelled() => return,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // The slot seen free may have gone to a WebSocket meanwhile: then this
            // connection waits, unserved, for the next one.
            let permit = tokio::select! {
                p = limit.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = shutdown.cancelled() => return,
            };
            let open = Arc::new(OpenConnection::new(&counters, permit));
            let acceptor = TlsAcceptor::from(tls.load_full());
            let cfg = ListenerConfig::clone(&self.config.load());
            let runtime = runtime.clone();
            let shutdown = shutdown.clone();
            let hold = crate::proxy::upgrade::Hold {
                slot: open,
                tracker: tracker.clone(),
                limit: limit.clone(),
                per_client: None,
            };
            let alt_svc = self.alt_svc.clone();
            tracker.spawn(handshake_and_serve(
                tcp,
                peer,
                acceptor,
                cfg,
                runtime,
                shutdown,
                hold,
                alt_svc,
                self.clients.clone(),
            ));
        }
    }
}

/// One client connection held open: a slot of the listener's limit and a count in
/// `edgepop_client_connections`, both given back on drop (after the connection and any
/// tunnel made from it have ended).
pub(super) struct OpenConnection {
    counters: Arc<EdgeCounters>,
    _slot: OwnedSemaphorePermit,
}

impl OpenConnection {
    pub(super) fn new(counters: &Arc<EdgeCounters>, slot: OwnedSemaphorePermit) -> Self {
        counters.client_connections.fetch_add(1, Ordering::Relaxed);
        OpenConnection {
            counters: counters.clone(),
            _slot: slot,
        }
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.counters
            .client_connections
            .fetch_sub(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)]
async fn handshake_and_serve(
    mut tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    cfg: ListenerConfig,
    runtime: Arc<ArcSwap<Runtime>>,
    shutdown: CancellationToken,
    mut hold: crate::proxy::upgrade::Hold,
    alt_svc: Option<http::HeaderValue>,
    clients: Arc<ClientTable>,
) {
    let _ = tcp.set_nodelay(true);
    let counters = runtime.load().counters.clone();
    // Everything up to the TLS handshake's end shares the handshake timeout.
    let deadline = Instant::now() + cfg.handshake_timeout;
    // `Some` when the address is a client's (a LOCAL or UNKNOWN header leaves the balancer's).
    let client_addr = if cfg.proxy_protocol {
        match proxy_header(&mut tcp, peer, &counters, deadline, cfg.handshake_timeout).await {
            Some(addr) => addr,
            None => return,
        }
    } else {
        Some(peer)
    };
    let peer = client_addr.unwrap_or(peer);
    // Counted from here, so idle connections count too; a balancer's own are not a client's.
    let client_slot = match cfg.max_connections_per_client {
        Some(limit) if client_addr.is_some() => {
            let per_client = PerClient {
                table: clients,
                ip: peer.ip(),
                limit,
            };
            let Some(slot) = per_client.take() else {
                refuse_over_limit(&tcp, peer, limit, &counters);
                return;
            };
            hold.per_client = Some(per_client);
            Some(slot)
        }
        _ => None,
    };
    if cfg.redirect_to_https.is_some() {
        // Plain HTTP: no handshake to wait for or time; `header_timeout` covers the request.
        let tcp = lingering(tcp, &hold, client_slot, &shutdown, peer);
        let client = conn::Client {
            peer,
            h2: false,
            handshake: None,
            linger: tcp.hint(),
            alt_svc: None,
            tls: None,
        };
        return conn::serve(tcp, client, &cfg, runtime, shutdown, hold).await;
    }
    if !first_byte(&tcp, peer, &counters, deadline, cfg.handshake_timeout).await {
        return;
    }
    let started = Instant::now();
    let tcp = lingering(tcp, &hold, client_slot, &shutdown, peer);
    let linger = tcp.hint();
    let accepted = tls_handshake(&acceptor, tcp, deadline).await;
    let took = started.elapsed();
    match accepted {
        Ok(Accepted::Full(tls)) => {
            let kind = handshake_kind(tls.get_ref().1, false);
            counters.record_handshake(kind, took);
            let client = conn::Client {
                peer,
                h2: tls.get_ref().1.alpn_protocol() == Some(b"h2"),
                handshake: None,
                linger,
                alt_svc,
                tls: Some((kind, took)),
            };
            conn::serve(tls, client, &cfg, runtime, shutdown, hold).await
        }
        Ok(Accepted::Early(tls)) => {
            let kind = handshake_kind(tls.connection(), tls.connection().is_handshaking());
            counters.record_handshake(kind, took);
            let client = conn::Client {
                peer,
                h2: tls.connection().alpn_protocol() == Some(b"h2"),
                handshake: Some(tls.handshake()),
                linger,
                alt_svc,
                tls: Some((kind, took)),
            };
            conn::serve(tls, client, &cfg, runtime, shutdown, hold).await
        }
        Err(Some(e)) => {
            counters.record_handshake_failure(HandshakeFailure::Error);
            tracing::debug!(%peer, error = %e, "TLS handshake failed")
        }
        Err(None) => {
            counters.record_handshake_failure(HandshakeFailure::Timeout);
            tracing::debug!(%peer, after = ?cfg.handshake_timeout, "TLS handshake timed out")
        }
    }
}

/// The client's socket, holding its connection slots until it closes, lingering included.
fn lingering(
    tcp: TcpStream,
    hold: &crate::proxy::upgrade::Hold,
    client_slot: Option<super::client_limit::ClientSlot>,
    shutdown: &CancellationToken,
    peer: SocketAddr,
) -> LingeringTcp {
    LingeringTcp::new(
        tcp,
        hold.tracker.clone(),
        Box::new((hold.slot.clone(), client_slot)),
        shutdown.clone(),
    )
    .client(peer)
}

/// Reads the PROXY protocol header: `Some` with the client's address (`None` inside when the
/// header names none), or `None` when the connection is to be dropped.
async fn proxy_header(
    tcp: &mut TcpStream,
    peer: SocketAddr,
    counters: &EdgeCounters,
    deadline: Instant,
    limit: Duration,
) -> Option<Option<SocketAddr>> {
    let header = super::proxy_protocol::read(tcp);
    let read = match tokio::time::timeout_at(deadline, header).await {
        Ok(r) => r,
        Err(_) => Err(ProxyHeaderError::Timeout(limit)),
    };
    match read {
        Ok(source) => Some(source),
        // A balancer's TCP health check (or a port scan): not a refused header.
        Err(ProxyHeaderError::Empty) => None,
        Err(e) => {
            // Debug, like failed TLS handshakes: a scanner would flood the log. A balancer
            // that sends no header shows in the metric.
            tracing::debug!(%peer, error = %e, "PROXY protocol header refused");
            counters
                .proxy_headers_refused
                .fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// A client over `max_connections_per_client`: the connection is reset, not closed, so it
/// leaves no TIME_WAIT behind on the edge.
fn refuse_over_limit(tcp: &TcpStream, peer: SocketAddr, limit: usize, counters: &EdgeCounters) {
    let _ = socket2::SockRef::from(tcp).set_linger(Some(Duration::ZERO));
    tracing::debug!(%peer, limit, "per-client connection limit reached; closed");
    counters.per_client_refused.fetch_add(1, Ordering::Relaxed);
}

/// Waits for the client's first byte (the ClientHello), from which the handshake is timed.
/// False when the connection is to be dropped: closed without a byte (a balancer's TCP health
/// check: neither a handshake nor a failed one), or nothing in time (a failed one).
async fn first_byte(
    tcp: &TcpStream,
    peer: SocketAddr,
    counters: &EdgeCounters,
    deadline: Instant,
    limit: Duration,
) -> bool {
    match tokio::time::timeout_at(deadline, tcp.peek(&mut [0u8; 1])).await {
        Ok(Ok(n)) => n > 0,
        Ok(Err(_)) => false,
        Err(_) => {
            counters.record_handshake_failure(HandshakeFailure::Timeout);
            tracing::debug!(%peer, after = ?limit, "no TLS handshake in time");
            false
        }
    }
}

/// The TLS handshake, by `deadline`: `Err(None)` when it timed out. 0-RTT needs a stream that
/// is handed out before the handshake ends; without it tokio-rustls' (which finishes the
/// handshake first) serves.
async fn tls_handshake(
    acceptor: &TlsAcceptor,
    tcp: LingeringTcp,
    deadline: Instant,
) -> Result<Accepted, Option<std::io::Error>> {
    let early = acceptor.config().max_early_data_size > 0;
    if early {
        let handshake = crate::tls::early::accept(acceptor.config().clone(), tcp);
        match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(s)) => Ok(Accepted::Early(s)),
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(None),
        }
    } else {
        match tokio::time::timeout_at(deadline, acceptor.accept(tcp)).await {
            Ok(Ok(s)) => Ok(Accepted::Full(s)),
            Ok(Err(e)) => Err(Some(e)),
            Err(_) => Err(None),
        }
    }
}

/// What the handshake was; `early`: handed out on accepted 0-RTT data, still handshaking.
fn handshake_kind(tls: &rustls::ServerConnection, early: bool) -> ClientHandshake {
    match tls.handshake_kind() {
        _ if early => ClientHandshake::Early,
        Some(rustls::HandshakeKind::Resumed) => ClientHandshake::Resumed,
        _ => ClientHandshake::Full,
    }
}

enum Accepted {
    Full(tokio_rustls::server::TlsStream<LingeringTcp>),
    Early(crate::tls::early::EarlyStream),
}
