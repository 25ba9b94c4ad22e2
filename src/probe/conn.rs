//! Opening one probe connection phase by phase — TCP connect, TLS handshake, HTTP handshake
//! (hyper 1.x client connection API over our own tokio-rustls stream) — and sending one
//! request, so each phase is timed here and nowhere else.

use super::sample::{Phase, SampleError};
use super::server_timing::ServerTiming;
use super::{HttpVersion, Trust};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde::Serialize;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

type Stream = Either<Watched, TcpStream>;

/// What the TLS handshake negotiated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsInfo {
    /// `TLSv1.3` or `TLSv1.2`.
    pub version: String,
    pub alpn: Option<String>,
    pub resumed: bool,
    /// The request went as 0-RTT early data and the server took it.
    pub early_data: bool,
}

impl TlsInfo {
    fn of(conn: &rustls::ClientConnection) -> TlsInfo {
        TlsInfo {
            version: match conn.protocol_version() {
                Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
                Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
                Some(v) => format!("{v:?}"),
                None => "unknown".to_string(),
            },
            alpn: conn
                .alpn_protocol()
                .map(|a| String::from_utf8_lossy(a).into_owned()),
            resumed: conn.handshake_kind() == Some(rustls::HandshakeKind::Resumed),
            early_data: conn.is_early_data_accepted(),
        }
    }
}

/// The client TLS stream, noting what its handshake negotiated once it completes: a 0-RTT
/// connection is handed to HTTP before that, with the request as early data.
pub struct Watched {
    tls: TlsStream<TcpStream>,
    info: Arc<std::sync::OnceLock<TlsInfo>>,
}

impl Watched {
    fn note(&self) {
        let (_, conn) = self.tls.get_ref();
        if self.info.get().is_none() && !conn.is_handshaking() {
            let _ = self.info.set(TlsInfo::of(conn));
        }
    }
}

impl tokio::io::AsyncRead for Watched {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let r = std::pin::Pin::new(&mut this.tls).poll_read(cx, buf);
        this.note();
        r
    }
}

impl tokio::io::AsyncWrite for Watched {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().tls).poll_write(cx, buf)
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tls).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().tls).poll_shutdown(cx)
    }
}

/// A TLS connection as the handshake phase hands it over: what was negotiated is known now,
/// or (0-RTT) once the server has answered.
pub struct Handshaken {
    pub stream: Watched,
    pub info: Arc<std::sync::OnceLock<TlsInfo>>,
}

/// Builds the client TLS config of one target. `resumption`: keep sessions between samples
/// (modes `resumed` and `early`); off for `cold`, so every handshake is a full one. `early`:
/// send the request as TLS 1.3 early data when a session allows it.
pub fn tls_config(
    trust: &Trust,
    http: HttpVersion,
    resumption: bool,
    early: bool,
) -> rustls::ClientConfig {
    let alpn: &[&[u8]] = match http {
        HttpVersion::Http1 => &[b"http/1.1"],
        HttpVersion::Http2 => &[b"h2"],
        HttpVersion::Http3 => &[b"h3"],
        HttpVersion::Auto => &[b"h2", b"http/1.1"],
    };
    let mut cfg = match trust {
        Trust::Roots(roots) => crate::tls::client::client_config_with_roots(roots.clone(), alpn),
        Trust::System => {
            crate::tls::client::client_config_with_roots(crate::tls::certs::default_roots(), alpn)
        }
        Trust::Insecure => {
            let provider = crate::tls::provider_arc();
            let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_protocol_versions(crate::tls::VERSIONS)
                .expect("ring supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            cfg.alpn_protocols = alpn.iter().map(|a| a.to_vec()).collect();
            cfg
        }
    };
    cfg.resumption = if resumption {
        rustls::client::Resumption::in_memory_sessions(64)
    } else {
        rustls::client::Resumption::disabled()
    };
    cfg.enable_early_data = early;
    cfg
}

/// `--insecure`: any certificate for any name, but handshake signatures are still checked
/// (so the numbers are those of a real handshake).
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Runs one phase under the per-phase timeout.
pub async fn phase<T>(
    phase: Phase,
    timeout: Duration,
    fut: impl Future<Output = Result<T, SampleError>>,
) -> Result<T, SampleError> {
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(SampleError::Timeout {
            phase,
            after: timeout,
        }),
    }
}

pub async fn tcp_connect(addr: SocketAddr, timeout: Duration) -> Result<TcpStream, SampleError> {
    phase(Phase::Connect, timeout, async {
        let tcp = TcpStream::connect(addr).await.map_err(|source| {
            if source.kind() == std::io::ErrorKind::ConnectionRefused {
                SampleError::Refused { addr }
            } else {
                SampleError::Connect { addr, source }
            }
        })?;
        // Requests are small: no Nagle delay between the TLS Finished and the request.
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    })
    .await
}

/// The TLS phase. With early data enabled in `config` and a session that allows it, this
/// ends as soon as the ClientHello is out: the request then rides along as 0-RTT data.
pub async fn tls_handshake(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    host: &str,
    timeout: Duration,
) -> Result<Handshaken, SampleError> {
    let server_name = ServerName::try_from(host.to_string()).map_err(|_| SampleError::Sni {
        host: host.to_string(),
    })?;
    let early = config.enable_early_data;
    phase(Phase::Tls, timeout, async {
        let tls = tokio_rustls::TlsConnector::from(config)
            .early_data(early)
            .connect(server_name, tcp)
            .await
            .map_err(|e| SampleError::from_tls(host, e))?;
        let stream = Watched {
            tls,
            info: Arc::default(),
        };
        stream.note();
        Ok(Handshaken {
            info: stream.info.clone(),
            stream,
        })
    })
    .await
}

/// An HTTP connection ready for requests; its driver task ends when this is dropped.
pub struct HttpConn {
    sender: Sender,
    /// hyper's connection task (HTTP/3's has its own in `H3Conn`).
    driver: Option<JoinHandle<()>>,
    pub h2: bool,
}

enum Sender {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<Empty<Bytes>>),
    H3(super::quic::H3Conn),
}

impl Drop for HttpConn {
    fn drop(&mut self) {
        if let Some(d) = &self.driver {
            d.abort();
        }
    }
}

/// What one request saw.
pub struct Response {
    pub status: u16,
    /// First response byte (headers parsed), from the request start.
    pub first_byte: Instant,
    pub done: Instant,
    pub body_bytes: u64,
    pub server_timing: Option<ServerTiming>,
}

impl HttpConn {
    /// HTTP/2 if ALPN said so (or forced on cleartext), else HTTP/1.1.
    pub async fn handshake(
        io: Stream,
        h2: bool,
        timeout: Duration,
    ) -> Result<HttpConn, SampleError> {
        let io = TokioIo::new(io);
        phase(Phase::Ttfb, timeout, async move {
            if h2 {
                let (sender, conn) =
                    hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
                        .await
                        .map_err(SampleError::http)?;
                let driver = tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(HttpConn {
                    sender: Sender::H2(sender),
                    driver: Some(driver),
                    h2: true,
                })
            } else {
                let (sender, conn) =
                    hyper::client::conn::http1::handshake::<TokioIo<Stream>, _>(io)
                        .await
                        .map_err(SampleError::http)?;
                let driver = tokio::spawn(async move {
                    let _ = conn.await;
                });
                Ok(HttpConn {
                    sender: Sender::H1(sender),
                    driver: Some(driver),
                    h2: false,
                })
            }
        })
        .await
    }

    /// An HTTP/3 connection over a finished QUIC handshake.
    pub async fn h3(conn: quinn::Connection, timeout: Duration) -> Result<HttpConn, SampleError> {
        Ok(HttpConn {
            sender: Sender::H3(super::quic::H3Conn::handshake(conn, timeout).await?),
            driver: None,
            h2: false,
        })
    }

    /// "HTTP/1.1", "HTTP/2" or "HTTP/3".
    pub fn label(&self) -> &'static str {
        match &self.sender {
            Sender::H1(_) => "HTTP/1.1",
            Sender::H2(_) => "HTTP/2",
            Sender::H3(_) => "HTTP/3",
        }
    }

    /// Whether another request can go on this connection.
    pub fn is_open(&self) -> bool {
        match &self.sender {
            Sender::H1(s) => !s.is_closed(),
            Sender::H2(s) => !s.is_closed(),
            Sender::H3(c) => c.is_open(),
        }
    }

    /// GET `path`; times the first byte and the end of the body.
    pub async fn get(
        &mut self,
        scheme: &str,
        authority: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<Response, SampleError> {
        if let Sender::H3(c) = &mut self.sender {
            return c
                .get(&format!("{scheme}://{authority}{path}"), timeout)
                .await;
        }
        let uri = if self.h2 {
            format!("{scheme}://{authority}{path}")
        } else {
            path.to_string()
        };
        let mut req = http::Request::get(uri)
            .header(http::header::USER_AGENT, super::USER_AGENT)
            .header(http::header::ACCEPT, "*/*");
        if !self.h2 {
            req = req.header(http::header::HOST, authority);
        }
        let req = req
            .body(Empty::<Bytes>::new())
            .map_err(|e| SampleError::Request(e.to_string()))?;
        let resp = phase(Phase::Ttfb, timeout, async {
            match &mut self.sender {
                Sender::H1(s) => {
                    s.ready().await.map_err(SampleError::http)?;
                    s.send_request(req).await.map_err(SampleError::http)
                }
                Sender::H2(s) => {
                    s.ready().await.map_err(SampleError::http)?;
                    s.send_request(req).await.map_err(SampleError::http)
                }
                Sender::H3(_) => Err(SampleError::Request("HTTP/3 is sent above".into())),
            }
        })
        .await?;
        let first_byte = Instant::now();
        let status = resp.status().as_u16();
        let server_timing = ServerTiming::from_headers(resp.headers());
        let mut body = resp.into_body();
        let body_bytes = phase(Phase::Body, timeout, async {
            let mut n = 0u64;
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(SampleError::http)?;
                if let Some(data) = frame.data_ref() {
                    n += data.len() as u64;
                }
            }
            Ok(n)
        })
        .await?;
        Ok(Response {
            status,
            first_byte,
            done: Instant::now(),
            body_bytes,
            server_timing,
        })
    }
}

/// Wraps the connected stream for hyper.
pub fn stream_tls(tls: Watched) -> Stream {
    Either::Left(tls)
}
pub fn stream_plain(tcp: TcpStream) -> Stream {
    Either::Right(tcp)
}
