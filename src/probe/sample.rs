//! One sample of one target: the phase timings, or why it failed. A `Session` keeps what a
//! mode carries between samples (the TLS session cache for `resumed`, the kept connection for
//! `warm`).

use super::conn::{self, HttpConn, TlsInfo};
use super::quic::QuicClient;
use super::server_timing::ServerTiming;
use super::target::{DnsError, Resolution, Target};
use super::{HttpVersion, Mode, Options};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// The phases of a sample, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Dns,
    Connect,
    Tls,
    Ttfb,
    Body,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Dns => "dns",
            Phase::Connect => "connect",
            Phase::Tls => "tls handshake",
            Phase::Ttfb => "first byte",
            Phase::Body => "body",
        })
    }
}

/// Why a sample failed. A failed sample is counted and reported, never fatal.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("dns {host}: {source}")]
    Dns {
        host: String,
        #[source]
        source: DnsError,
    },
    #[error("connect {addr}: connection refused")]
    Refused { addr: SocketAddr },
    #[error("connect {addr}: {source}")]
    Connect {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("tls {host}: {host:?} is not a valid server name")]
    Sni { host: String },
    #[error("tls {host}: bad certificate: {source}")]
    BadCertificate {
        host: String,
        #[source]
        source: rustls::Error,
    },
    #[error("tls {host}: {source}")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http: {0}")]
    Http(#[source] hyper::Error),
    #[error("http: cannot build the request: {0}")]
    Request(String),
    #[error("http: status {0}")]
    Status(u16),
    #[error("{phase}: timed out after {after:?}")]
    Timeout { phase: Phase, after: Duration },
}

impl SampleError {
    /// The short reason failures are grouped by in the report.
    pub fn reason(&self) -> String {
        match self {
            SampleError::Dns { .. } => "dns".into(),
            SampleError::Refused { .. } => "refused".into(),
            SampleError::Connect { .. } => "connect".into(),
            SampleError::Sni { .. } => "bad server name".into(),
            SampleError::BadCertificate { .. } => "bad certificate".into(),
            SampleError::Tls { .. } => "tls".into(),
            SampleError::Http(_) | SampleError::Request(_) => "http".into(),
            SampleError::Status(s) => format!("status {s}"),
            SampleError::Timeout { phase, .. } => format!("timeout ({phase})"),
        }
    }

    pub(super) fn http(e: hyper::Error) -> SampleError {
        SampleError::Http(e)
    }

    /// tokio-rustls reports rustls errors inside an `io::Error`; certificate problems get
    /// their own reason.
    pub(super) fn from_tls(host: &str, e: std::io::Error) -> SampleError {
        let host = host.to_string();
        if e.get_ref().is_some_and(|i| i.is::<rustls::Error>()) {
            let kind = e.kind();
            if let Some(Ok(source)) = e.into_inner().map(|i| i.downcast::<rustls::Error>()) {
                let source = *source;
                return match source {
                    rustls::Error::InvalidCertificate(_)
                    | rustls::Error::NoCertificatesPresented => {
                        SampleError::BadCertificate { host, source }
                    }
                    other => SampleError::Tls {
                        host,
                        source: std::io::Error::new(kind, other),
                    },
                };
            }
            return SampleError::Tls {
                host,
                source: std::io::Error::from(kind),
            };
        }
        SampleError::Tls { host, source: e }
    }
}

/// The timings of one successful sample. `dns`, `connect`, `tls` are phase durations (`None`:
/// the phase did not happen — IP literal or `--resolve`, or `warm` mode); `ttfb` and `total`
/// count from the start of the sample, like curl's `time_starttransfer` and `time_total`.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    pub address: SocketAddr,
    #[serde(rename = "dns_ms", serialize_with = "super::report::ser_opt_ms")]
    pub dns: Option<Duration>,
    #[serde(rename = "connect_ms", serialize_with = "super::report::ser_opt_ms")]
    pub connect: Option<Duration>,
    #[serde(rename = "tls_ms", serialize_with = "super::report::ser_opt_ms")]
    pub tls: Option<Duration>,
    #[serde(rename = "ttfb_ms", serialize_with = "super::report::ser_ms")]
    pub ttfb: Duration,
    #[serde(rename = "total_ms", serialize_with = "super::report::ser_ms")]
    pub total: Duration,
    /// `HTTP/1.1` or `HTTP/2`.
    pub http: &'static str,
    pub status: u16,
    pub body_bytes: u64,
    /// `None` on cleartext; in `warm` mode, the kept connection's handshake.
    pub tls_info: Option<TlsInfo>,
    pub server_timing: Option<ServerTiming>,
}

/// The connection `warm` mode keeps.
struct Kept {
    http: HttpConn,
    addr: SocketAddr,
    tls_info: Option<TlsInfo>,
}

/// What a target carries from sample to sample.
pub struct Session {
    target: Target,
    resolution: Resolution,
    config: Arc<rustls::ClientConfig>,
    http: HttpVersion,
    mode: Mode,
    timeout: Duration,
    /// `warm`: the kept connection, where it goes and what its handshake negotiated.
    kept: Option<Kept>,
    /// Whether the last fresh connection spoke h2 (what a 0-RTT resumption of it speaks).
    last_h2: bool,
    /// `--http3`: the QUIC client, made at the first connection.
    quic: Option<QuicClient>,
}

impl Session {
    pub fn new(target: Target, options: &Options) -> Session {
        let resolution = Resolution::for_target(&target, &options.resolve, options.dns.as_ref());
        let config = Arc::new(conn::tls_config(
            &options.trust,
            options.http,
            matches!(options.mode, Mode::Resumed | Mode::Early),
            options.mode == Mode::Early,
        ));
        Session {
            target,
            resolution,
            config,
            http: options.http,
            mode: options.mode,
            timeout: options.timeout,
            kept: None,
            last_h2: options.http == HttpVersion::Http2,
            quic: None,
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    /// Untimed preparation: `resumed` needs a session to resume, `warm` a connection to keep.
    /// A failure here is not reported: the first sample will meet it again.
    pub async fn prime(&mut self) {
        match self.mode {
            Mode::Cold => {}
            Mode::Resumed | Mode::Early => {
                let _ = self.fresh().await;
            }
            Mode::Warm => {
                let _ = self.ensure_kept().await;
            }
        }
    }

    pub async fn sample(&mut self) -> Result<Sample, SampleError> {
        let result = match self.mode {
            Mode::Cold | Mode::Resumed | Mode::Early => self.fresh().await,
            Mode::Warm => self.kept().await,
        };
        match result {
            Ok(s) if s.status >= 500 => Err(SampleError::Status(s.status)),
            other => other,
        }
    }

    /// The QUIC client for `--http3` (one UDP socket for the target's connections).
    fn quic(&mut self, addr: SocketAddr) -> Result<&QuicClient, SampleError> {
        if !self.target.is_tls() {
            return Err(SampleError::Request("HTTP/3 needs an https:// URL".into()));
        }
        if self.quic.is_none() {
            let local: SocketAddr = if addr.is_ipv6() {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            } else {
                (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
            };
            self.quic = Some(QuicClient::new(&self.config, local)?);
        }
        self.quic
            .as_ref()
            .ok_or_else(|| SampleError::Request("no QUIC client".into()))
    }

    /// A new HTTP/3 connection: dns, the QUIC handshake (transport and TLS at once: the tls
    /// phase; there is no TCP connect), request.
    async fn fresh_h3(&mut self) -> Result<Sample, SampleError> {
        let timeout = self.timeout;
        let start = Instant::now();
        let (addr, dns) = self.resolve().await?;
        let t_dns = Instant::now();
        let host = self.target.host().to_string();
        let early = self.mode == Mode::Early;
        let (conn, mut info, zero_rtt) = self
            .quic(addr)?
            .connect(addr, &host, timeout, early)
            .await?;
        let mut tls = t_dns.elapsed();
        // Kept open past a failed attempt, to tell a refused 0-RTT (the connection lives on)
        // from a failed connection.
        let first = conn.clone();
        let attempt = async {
            let mut http = HttpConn::h3(conn, timeout).await?;
            let resp = self.request(&mut http).await?;
            Ok::<_, SampleError>((http, resp))
        };
        let (http, resp) = match (attempt.await, zero_rtt) {
            (Ok(r), Some(accepted)) => {
                info = super::quic::info(accepted.await);
                r
            }
            (Ok(r), None) => r,
            // The server refused the 0-RTT data (no session left to resume, say): everything
            // sent early is void, so the client starts over, as a browser would; the time
            // lost counts.
            (Err(e), Some(accepted)) => {
                if accepted.await || first.close_reason().is_some() {
                    return Err(e);
                }
                let t = Instant::now();
                let (conn, i, _) = self
                    .quic(addr)?
                    .connect(addr, &host, timeout, false)
                    .await?;
                tls += t.elapsed();
                info = i;
                let mut http = HttpConn::h3(conn, timeout).await?;
                let resp = self.request(&mut http).await?;
                (http, resp)
            }
            (Err(e), None) => return Err(e),
        };
        Ok(Sample {
            address: addr,
            dns: dns.then(|| t_dns - start),
            connect: None,
            tls: Some(tls),
            ttfb: resp.first_byte - start,
            total: resp.done - start,
            http: http.label(),
            status: resp.status,
            body_bytes: resp.body_bytes,
            tls_info: Some(info),
            server_timing: resp.server_timing,
        })
    }

    /// A new connection: dns, connect, tls, request.
    async fn fresh(&mut self) -> Result<Sample, SampleError> {
        if self.http == HttpVersion::Http3 {
            return self.fresh_h3().await;
        }
        let timeout = self.timeout;
        let start = Instant::now();
        let (addr, dns) = self.resolve().await?;
        let t_dns = Instant::now();
        let tcp = conn::tcp_connect(addr, timeout).await?;
        let t_conn = Instant::now();
        let (io, negotiated, tls) = if self.target.is_tls() {
            let hs =
                conn::tls_handshake(tcp, self.config.clone(), self.target.host(), timeout).await?;
            (
                conn::stream_tls(hs.stream),
                Some(hs.info),
                Some(t_conn.elapsed()),
            )
        } else {
            (conn::stream_plain(tcp), None, None)
        };
        // A 0-RTT connection does not know its ALPN yet: it is the resumed session's, the one
        // the previous sample negotiated.
        let h2 = match negotiated.as_ref().map(|n| n.get()) {
            Some(Some(info)) => self.use_h2(Some(info)),
            Some(None) => self.last_h2,
            None => self.use_h2(None),
        };
        let mut http = HttpConn::handshake(io, h2, timeout).await?;
        if negotiated.as_ref().is_some_and(|n| n.get().is_some()) {
            self.last_h2 = http.h2;
        }
        let resp = self.request(&mut http).await?;
        let tls_info = negotiated.and_then(|n| n.get().cloned());
        self.last_h2 = http.h2;
        Ok(Sample {
            address: addr,
            dns: dns.then(|| t_dns - start),
            connect: Some(t_conn - t_dns),
            tls,
            ttfb: resp.first_byte - start,
            total: resp.done - start,
            http: http.label(),
            status: resp.status,
            body_bytes: resp.body_bytes,
            tls_info,
            server_timing: resp.server_timing,
        })
    }

    /// A request on the kept connection: the request round trip alone.
    async fn kept(&mut self) -> Result<Sample, SampleError> {
        self.ensure_kept().await?;
        let Some(mut kept) = self.kept.take() else {
            return Err(SampleError::Request("no kept connection".into()));
        };
        let start = Instant::now();
        let resp = self.request(&mut kept.http).await?;
        let (label, addr, tls_info) = (kept.http.label(), kept.addr, kept.tls_info.clone());
        // Kept only if the request went well: a broken connection is reopened next sample.
        self.kept = Some(kept);
        Ok(Sample {
            address: addr,
            dns: None,
            connect: None,
            tls: None,
            ttfb: resp.first_byte - start,
            total: resp.done - start,
            http: label,
            status: resp.status,
            body_bytes: resp.body_bytes,
            tls_info,
            server_timing: resp.server_timing,
        })
    }

    async fn ensure_kept(&mut self) -> Result<(), SampleError> {
        if self.kept.as_ref().is_some_and(|k| k.http.is_open()) {
            return Ok(());
        }
        self.kept = None;
        let timeout = self.timeout;
        let (addr, _) = self.resolve().await?;
        if self.http == HttpVersion::Http3 {
            let host = self.target.host().to_string();
            let (conn, info, _) = self
                .quic(addr)?
                .connect(addr, &host, timeout, false)
                .await?;
            let http = HttpConn::h3(conn, timeout).await?;
            self.kept = Some(Kept {
                http,
                addr,
                tls_info: Some(info),
            });
            return Ok(());
        }
        let tcp = conn::tcp_connect(addr, timeout).await?;
        let (io, info) = if self.target.is_tls() {
            let hs =
                conn::tls_handshake(tcp, self.config.clone(), self.target.host(), timeout).await?;
            let info = hs.info.get().cloned();
            (conn::stream_tls(hs.stream), info)
        } else {
            (conn::stream_plain(tcp), None)
        };
        let h2 = self.use_h2(info.as_ref());
        let http = HttpConn::handshake(io, h2, timeout).await?;
        self.kept = Some(Kept {
            http,
            addr,
            tls_info: info,
        });
        Ok(())
    }

    async fn request(&self, http: &mut HttpConn) -> Result<conn::Response, SampleError> {
        let scheme = if self.target.is_tls() {
            "https"
        } else {
            "http"
        };
        http.get(
            scheme,
            &self.target.authority(),
            self.target.path(),
            self.timeout,
        )
        .await
    }

    /// The address, and whether a DNS phase happened.
    async fn resolve(&self) -> Result<(SocketAddr, bool), SampleError> {
        let dns = !matches!(self.resolution, Resolution::Fixed(_));
        let host = self.target.host();
        let addr = conn::phase(super::sample::Phase::Dns, self.timeout, async {
            self.resolution
                .resolve(host, self.target.port())
                .await
                .map_err(|source| SampleError::Dns {
                    host: host.to_string(),
                    source,
                })
        })
        .await?;
        Ok((addr, dns))
    }

    /// ALPN decides over TLS (`--http2` against a server without h2 falls back to HTTP/1.1,
    /// like curl); on cleartext `--http2` means prior knowledge.
    fn use_h2(&self, tls: Option<&TlsInfo>) -> bool {
        match tls {
            Some(info) => info.alpn.as_deref() == Some("h2"),
            None => self.http == HttpVersion::Http2,
        }
    }
}
