//! Accept loop: SO_REUSEPORT sockets (many instances per PoP), TLS handshake with a timeout,
//! then one task per connection. Stops accepting on drain.

use super::conn;
use crate::config::ListenerConfig;
use crate::proxy::Runtime;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
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

/// A bound listener, not yet accepting.
pub struct Listener {
    pub config: ListenerConfig,
    socket: TcpListener,
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
        config: config.clone(),
        socket,
    })
}

impl Listener {
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }

    /// Accepts until `shutdown`; each connection is tracked so drain can wait for it.
    pub async fn run(
        self,
        tls: Arc<ArcSwap<rustls::ServerConfig>>,
        runtime: Arc<ArcSwap<Runtime>>,
        shutdown: CancellationToken,
        tracker: TaskTracker,
    ) {
        loop {
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
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let acceptor = TlsAcceptor::from(tls.load_full());
            let cfg = self.config.clone();
            let runtime = runtime.clone();
            let shutdown = shutdown.clone();
            tracker.spawn(handshake_and_serve(
                tcp, peer, acceptor, cfg, runtime, shutdown,
            ));
        }
    }
}

async fn handshake_and_serve(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    cfg: ListenerConfig,
    runtime: Arc<ArcSwap<Runtime>>,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let tls = match tokio::time::timeout(cfg.handshake_timeout, acceptor.accept(tcp)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, after = ?cfg.handshake_timeout, "TLS handshake timed out");
            return;
        }
    };
    conn::serve(tls, peer, &cfg, runtime, shutdown).await;
}
