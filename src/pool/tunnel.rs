//! Dedicated upstream connections for upgraded requests (WebSocket and other HTTP/1.1
//! `Upgrade`s). After `101 Switching Protocols` the connection carries one client's bytes,
//! so such a request gets an http/1.1 connection of its own, outside the pool, whatever the
//! pool's protocol; it pays a TCP+TLS handshake (resumed when the session cache allows),
//! which a long-lived tunnel amortises.

use super::conn::{connect_tcp, connect_tls, h1_handshake, within_connect_timeout, UpstreamBody};
use super::{ConnectError, Pool};
use hyper::client::conn::http1;

impl Pool {
    /// Opens an http/1.1 connection to the origin whose driver supports upgrades.
    pub async fn open_tunnel(&self) -> Result<http1::SendRequest<UpstreamBody>, ConnectError> {
        let cfg = &self.inner.origin;
        within_connect_timeout(cfg, async {
            let tcp = connect_tcp(&cfg.address).await?;
            let tls = connect_tls(cfg, &self.inner.tunnel_tls, tcp).await?;
            let (send, conn) = h1_handshake(cfg, tls).await?;
            tokio::spawn(async move {
                if let Err(e) = conn.with_upgrades().await {
                    tracing::debug!(error = %e, "upgrade connection to origin ended");
                }
            });
            Ok(send)
        })
        .await
    }
}
