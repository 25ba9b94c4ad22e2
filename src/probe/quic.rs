//! latency-probe over HTTP/3 (`--http3`): one QUIC handshake (transport and TLS in the same
//! round trip, reported as the tls phase; there is no TCP connect) and then the request.

use super::conn::TlsInfo;
use super::sample::{Phase, SampleError};
use bytes::{Buf, Bytes};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The probe's QUIC client: one UDP socket for all of a target's connections.
pub struct QuicClient {
    endpoint: quinn::Endpoint,
}

/// An HTTP/3 connection ready for requests; its driver task ends when this is dropped.
pub struct H3Conn {
    send: h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>,
    driver: JoinHandle<()>,
    /// Kept so the connection stays open as long as this does.
    _conn: quinn::Connection,
}

impl Drop for H3Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

impl QuicClient {
    /// `tls`: the target's client config (ALPN h3; its session cache makes `resumed` work).
    pub fn new(tls: &rustls::ClientConfig, local: SocketAddr) -> Result<QuicClient, SampleError> {
        let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls.clone()))
            .map_err(|e| SampleError::Request(format!("QUIC TLS config: {e}")))?;
        let mut endpoint =
            quinn::Endpoint::client(local).map_err(|source| SampleError::Connect {
                addr: local,
                source,
            })?;
        endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
        Ok(QuicClient { endpoint })
    }

    /// The QUIC handshake (the tls phase). With `early` and a session that allows it, the
    /// connection is handed over at once and the request goes as 0-RTT data; the returned
    /// future then says whether the server took it.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        host: &str,
        timeout: Duration,
        early: bool,
    ) -> Result<(quinn::Connection, TlsInfo, Option<quinn::ZeroRttAccepted>), SampleError> {
        let mut connecting =
            self.endpoint
                .connect(addr, host)
                .map_err(|e| SampleError::Connect {
                    addr,
                    source: std::io::Error::other(e),
                })?;
        if early {
            match connecting.into_0rtt() {
                Ok((conn, accepted)) => return Ok((conn, info(false), Some(accepted))),
                Err(c) => connecting = c,
            }
        }
        let conn = super::conn::phase(Phase::Tls, timeout, async {
            connecting.await.map_err(|e| SampleError::Tls {
                host: host.to_string(),
                source: std::io::Error::other(e),
            })
        })
        .await?;
        Ok((conn, info(false), None))
    }
}

/// What a QUIC handshake negotiated, as far as quinn tells: TLS 1.3 and h3 always; whether
/// a session was resumed only when 0-RTT was accepted (which needs one).
pub fn info(early_data: bool) -> TlsInfo {
    TlsInfo {
        version: "TLSv1.3".to_string(),
        alpn: Some("h3".to_string()),
        resumed: early_data,
        early_data,
    }
}

impl H3Conn {
    pub async fn handshake(
        conn: quinn::Connection,
        timeout: Duration,
    ) -> Result<H3Conn, SampleError> {
        let (mut driver, send) = super::conn::phase(Phase::Ttfb, timeout, async {
            h3::client::new(h3_quinn::Connection::new(conn.clone()))
                .await
                .map_err(|e| SampleError::Request(format!("HTTP/3 set-up: {e}")))
        })
        .await?;
        let driver = tokio::spawn(async move {
            let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
        });
        Ok(H3Conn {
            send,
            driver,
            _conn: conn,
        })
    }

    pub fn is_open(&self) -> bool {
        self._conn.close_reason().is_none()
    }

    /// GET `uri`: the first byte (response head) and the end of the body, timed.
    pub async fn get(
        &mut self,
        uri: &str,
        timeout: Duration,
    ) -> Result<super::conn::Response, SampleError> {
        let req = http::Request::get(uri)
            .header(http::header::USER_AGENT, super::USER_AGENT)
            .header(http::header::ACCEPT, "*/*")
            .body(())
            .map_err(|e| SampleError::Request(e.to_string()))?;
        let h3err = |e: &dyn std::fmt::Display| SampleError::Request(format!("HTTP/3: {e}"));
        let mut stream = super::conn::phase(Phase::Ttfb, timeout, async {
            let mut stream = self.send.send_request(req).await.map_err(|e| h3err(&e))?;
            stream.finish().await.map_err(|e| h3err(&e))?;
            Ok(stream)
        })
        .await?;
        let resp = super::conn::phase(Phase::Ttfb, timeout, async {
            stream.recv_response().await.map_err(|e| h3err(&e))
        })
        .await?;
        let first_byte = Instant::now();
        let server_timing = super::server_timing::ServerTiming::from_headers(resp.headers());
        let body_bytes = super::conn::phase(Phase::Body, timeout, async {
            let mut n = 0u64;
            while let Some(chunk) = stream.recv_data().await.map_err(|e| h3err(&e))? {
                n += chunk.remaining() as u64;
            }
            Ok(n)
        })
        .await?;
        Ok(super::conn::Response {
            status: resp.status().as_u16(),
            first_byte,
            done: Instant::now(),
            body_bytes,
            server_timing,
        })
    }
}
