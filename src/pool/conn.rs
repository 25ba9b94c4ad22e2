//! One upstream connection: TCP (keepalive, nodelay) + verified TLS + an h2 (`h2` crate) or
//! http/1.1 (hyper) handshake, each part under the origin's connect timeout (with, for warm
//! connections, a short wait for a refused client certificate in between), and the task that
//! drives it.

use super::error::ConnectError;
use super::Inner;
use crate::config::{OriginConfig, Protocol};
use bytes::Bytes;
use http_body_util::combinators::UnsyncBoxBody;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rand::Rng;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The body type sent upstream: the client's streaming body, or an empty one.
pub type UpstreamBody = UnsyncBoxBody<Bytes, super::h2conn::BoxError>;

/// How the connection that carried a request came to be; reported in Server-Timing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Warmth {
    /// Already open before the request arrived.
    Warm,
    /// Opened for this request with a full TLS handshake.
    Fresh,
    /// Opened for this request, TLS session resumed.
    Resumed,
}

impl Warmth {
    pub fn as_str(self) -> &'static str {
        match self {
            Warmth::Warm => "warm",
            Warmth::Fresh => "fresh",
            Warmth::Resumed => "resumed",
        }
    }
}

pub(super) enum Sender {
    H2(h2::client::SendRequest<Bytes>),
    /// http/1.1 senders live in the pool's idle list or in a lease, never here.
    H1,
}

pub(super) struct Conn {
    pub id: u64,
    pub sender: Sender,
    pub in_flight: AtomicUsize,
    pub resumed: bool,
    pub flags: Arc<ConnFlags>,
    /// PING round trips measured on this connection (h2 only).
    pub ping: Arc<super::h2conn::PingStats>,
    /// The TCP socket, for TCP_INFO only; valid while `flags.closed` is false.
    pub fd: std::os::fd::RawFd,
    /// When rotation retires it (opened + jittered max_connection_age).
    pub retire_at: Instant,
}

/// State shared with the driver task, which must not hold the connection itself.
#[derive(Debug)]
pub(super) struct ConnFlags {
    /// Set when the driver task ends; a closed connection is never handed out again.
    pub closed: AtomicBool,
    /// Set (under the pool's lock) when the pool counts it as open: a connection whose driver
    /// ended before the pool took it in was never counted, so its close must not uncount it.
    pub counted: AtomicBool,
    /// Set when rotation or shutdown retires it: finish what runs, take nothing new.
    pub draining: AtomicBool,
    /// Set (under the pool's lock) when it became an idle trial (`pool::trial`): counted as
    /// retiring, though not draining.
    pub trial: AtomicBool,
    /// Milliseconds since the pool's epoch when the last exchange on it ended.
    pub last_used_ms: AtomicU64,
    /// Cancelled to close the connection now (an unanswered PING); ends the h2 driver.
    pub kill: tokio_util::sync::CancellationToken,
}

impl Conn {
    /// Streams this connection takes before another is preferred: our cap, or the origin's
    /// SETTINGS_MAX_CONCURRENT_STREAMS if lower.
    pub fn stream_capacity(&self) -> usize {
        match &self.sender {
            Sender::H2(s) => super::H2_STREAMS_PER_CONNECTION.min(s.current_max_send_streams()),
            Sender::H1 => 1,
        }
    }

    /// Two atomic loads: this runs for every pooled connection on every request. A connection
    /// killed for an unanswered PING is marked closed by its driver right after; a request that
    /// takes it in between finds the sender gone and is retried as never sent.
    pub fn is_usable(&self) -> bool {
        !self.flags.closed.load(Ordering::Acquire) && !self.flags.draining.load(Ordering::Acquire)
    }
}

/// A freshly opened connection, not yet in the pool.
pub(super) struct Opened {
    pub conn: Arc<Conn>,
    pub h1: Option<http1::SendRequest<UpstreamBody>>,
}

/// Opens a connection and spawns its driver (which tells the pool when it ends): TCP and TLS
/// under the origin's `connect_timeout`, then, for a warm connection (`settle`), the wait of
/// [`settle_after_handshake`], then the protocol handshake.
pub(super) async fn open(inner: &Arc<Inner>, settle: bool) -> Result<Opened, ConnectError> {
    let (tls, opened_at) = connect(inner, settle).await?;
    within_connect_timeout(&inner.origin, handshake(inner, tls, opened_at)).await
}

/// TCP and TLS to the origin under its `connect_timeout`, then, with `settle`, the wait of
/// [`settle_after_handshake`]; the TLS stream and when its handshake ended (from then on the
/// origin's idle clock runs).
pub(super) async fn connect(
    inner: &Arc<Inner>,
    settle: bool,
) -> Result<(tokio_rustls::client::TlsStream<TcpStream>, Instant), ConnectError> {
    let cfg = &inner.origin;
    let tcp_tls = async {
        let t0 = Instant::now();
        let tcp = connect_tcp(&cfg.address).await?;
        let t1 = Instant::now();
        let tls = connect_tls(cfg, &inner.tls, tcp).await?;
        inner.stats.record_connect_times(t1 - t0, t1.elapsed());
        Ok((tls, t1.elapsed()))
    };
    let (mut tls, handshake) = within_connect_timeout(cfg, tcp_tls).await?;
    let opened_at = Instant::now();
    if settle {
        settle_after_handshake(cfg, &mut tls, handshake).await?;
    }
    Ok((tls, opened_at))
}

/// Under TLS 1.3 an origin that asks for a client certificate refuses a missing or wrong one
/// only after the client's side of the handshake is done, with an alert that comes a round
/// trip later: a refused connection would look open, and a pool would re-dial it in a loop
/// while the origin looked healthy. So a warm connection (opened in the background: no
/// request waits) waits up to twice its handshake time (50 ms to 1 s) for that alert,
/// reading TLS records without taking any application data: data (an h2 server's SETTINGS)
/// or silence passes, an alert or a close fails the connect. Request connects and TLS 1.2
/// (which refuses inside the handshake) do not wait.
async fn settle_after_handshake(
    cfg: &OriginConfig,
    tls: &mut tokio_rustls::client::TlsStream<TcpStream>,
    handshake: Duration,
) -> Result<(), ConnectError> {
    let (tcp, session) = tls.get_mut();
    if session.protocol_version() != Some(rustls::ProtocolVersion::TLSv1_3) {
        return Ok(());
    }
    let deadline = Instant::now() + (handshake * 2).clamp(SETTLE_MIN, SETTLE_MAX);
    let refused = |e: std::io::Error| tls_error(cfg, e);
    let closed = || refused(std::io::ErrorKind::UnexpectedEof.into());
    loop {
        // What is buffered first: the handshake may have read past its end already.
        let state = session
            .process_new_packets()
            .map_err(|e| refused(std::io::Error::other(e)))?;
        if state.plaintext_bytes_to_read() > 0 {
            return Ok(());
        }
        if state.peer_has_closed() {
            return Err(closed());
        }
        if tokio::time::timeout_at(deadline, tcp.readable())
            .await
            .is_err()
        {
            return Ok(());
        }
        // Straight from the socket into rustls: nothing it has not taken leaves the kernel.
        match session.read_tls(&mut TryRead(tcp)) {
            Ok(0) => return Err(closed()),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(refused(e)),
        }
    }
}

/// A non-blocking read of a tokio socket, for rustls' `read_tls`.
struct TryRead<'a>(&'a TcpStream);

impl std::io::Read for TryRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.try_read(buf)
    }
}

/// Bounds of [`settle_after_handshake`]'s wait.
const SETTLE_MIN: Duration = Duration::from_millis(50);
pub(super) const SETTLE_MAX: Duration = Duration::from_secs(1);

/// Runs `open` (TCP, TLS, protocol handshake) under the origin's `connect_timeout`.
pub(super) async fn within_connect_timeout<T>(
    cfg: &OriginConfig,
    open: impl std::future::Future<Output = Result<T, ConnectError>>,
) -> Result<T, ConnectError> {
    match tokio::time::timeout(cfg.connect_timeout, open).await {
        Ok(r) => r,
        Err(_) => Err(ConnectError::Timeout {
            address: cfg.address.clone(),
            after: cfg.connect_timeout,
        }),
    }
}

/// The http/1.1 handshake over an established TLS connection to the origin.
pub(super) async fn h1_handshake(
    cfg: &OriginConfig,
    tls: tokio_rustls::client::TlsStream<TcpStream>,
) -> Result<
    (
        http1::SendRequest<UpstreamBody>,
        http1::Connection<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, UpstreamBody>,
    ),
    ConnectError,
> {
    http1::Builder::new()
        .handshake(TokioIo::new(tls))
        .await
        .map_err(|source| ConnectError::Handshake {
            address: cfg.address.clone(),
            source,
        })
}

/// The TLS handshake with the origin over `tcp`, certificate checked against `server_name`.
pub(super) async fn connect_tls(
    cfg: &OriginConfig,
    connector: &tokio_rustls::TlsConnector,
    tcp: TcpStream,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    connector
        .connect(cfg.server_name.clone(), tcp)
        .await
        .map_err(|source| tls_error(cfg, source))
}

fn tls_error(cfg: &OriginConfig, source: std::io::Error) -> ConnectError {
    ConnectError::Tls {
        address: cfg.address.clone(),
        server_name: cfg.server_name.to_str().into_owned(),
        source,
    }
}

/// The protocol handshake over a new TLS connection.
async fn handshake(
    inner: &Arc<Inner>,
    tls: tokio_rustls::client::TlsStream<TcpStream>,
    opened_at: Instant,
) -> Result<Opened, ConnectError> {
    let cfg = &inner.origin;
    let fd = std::os::fd::AsRawFd::as_raw_fd(tls.get_ref().0);
    let (_, session) = tls.get_ref();
    let resumed = session.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let negotiated_h2 = session.alpn_protocol() == Some(b"h2");
    if cfg.protocol == Protocol::H2 && !negotiated_h2 {
        return Err(ConnectError::Alpn {
            address: cfg.address.clone(),
        });
    }
    inner.stats.record_handshake(resumed);
    let id = inner.next_id();
    match cfg.protocol {
        Protocol::H2 => {
            let kill = tokio_util::sync::CancellationToken::new();
            let ping = Arc::new(super::h2conn::PingStats::default());
            let (send, driver) = super::h2conn::open(
                crate::tls::coalesce::Coalesce::new(tls, true),
                cfg.keepalive_interval,
                cfg.keepalive_timeout,
                kill.clone(),
                ping.clone(),
            )
            .await
            .map_err(|source| ConnectError::H2Handshake {
                address: cfg.address.clone(),
                source,
            })?;
            let conn = Arc::new(Conn::new(
                inner,
                id,
                Sender::H2(send),
                opened_at,
                resumed,
                fd,
                kill,
                ping,
            ));
            spawn_driver(inner, &conn, async move {
                match driver.await {
                    Ok(r) => r.map_err(|e| e.to_string()),
                    Err(e) => Err(e.to_string()),
                }
            });
            Ok(Opened { conn, h1: None })
        }
        Protocol::Http1 => {
            let (send, driver) = h1_handshake(cfg, tls).await?;
            let kill = tokio_util::sync::CancellationToken::new();
            let conn = Arc::new(Conn::new(
                inner,
                id,
                Sender::H1,
                opened_at,
                resumed,
                fd,
                kill.clone(),
                Arc::new(super::h2conn::PingStats::default()),
            ));
            // select!: the connection ending, or the edge giving up on its request (see
            // `Lease::send`): an exchange abandoned halfway leaves the connection unusable.
            spawn_driver(inner, &conn, async move {
                tokio::select! {
                    r = driver => r.map_err(|e| e.to_string()),
                    () = kill.cancelled() => Err("request given up; connection closed".into()),
                }
            });
            Ok(Opened {
                conn,
                h1: Some(send),
            })
        }
    }
}

impl Conn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        inner: &Inner,
        id: u64,
        sender: Sender,
        opened_at: Instant,
        resumed: bool,
        fd: std::os::fd::RawFd,
        kill: tokio_util::sync::CancellationToken,
        ping: Arc<super::h2conn::PingStats>,
    ) -> Self {
        Conn {
            fd,
            ping,
            id,
            sender,
            in_flight: AtomicUsize::new(0),
            resumed,
            flags: Arc::new(ConnFlags {
                closed: AtomicBool::new(false),
                counted: AtomicBool::new(false),
                draining: AtomicBool::new(false),
                trial: AtomicBool::new(false),
                last_used_ms: AtomicU64::new(
                    inner
                        .now_ms()
                        .saturating_sub(opened_at.elapsed().as_millis() as u64),
                ),
                kill,
            }),
            retire_at: opened_at + jittered_age(inner.origin.max_connection_age),
        }
    }
}

/// 90-100% of the configured age, so connections opened together do not rotate together.
fn jittered_age(age: Duration) -> Duration {
    age.mul_f64(rand::thread_rng().gen_range(0.9..=1.0))
}

fn spawn_driver<F>(inner: &Arc<Inner>, conn: &Arc<Conn>, driver: F)
where
    F: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let pool = inner.clone();
    // Weak: the driver must not keep the h2 sender alive, or a retired connection whose
    // leases are all gone would never close.
    let flags = conn.flags.clone();
    let id = conn.id;
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(origin = %pool.origin.name, conn = id, error = %e, "upstream connection ended with error");
            pool.stats.set_last_error(format!("connection closed: {e}"));
        }
        flags.closed.store(true, Ordering::Release);
        // Stops the pinger too.
        flags.kill.cancel();
        pool.on_closed(id, &flags);
    });
}

/// Tries each resolved address in turn; the whole thing runs under the connect timeout.
pub(super) async fn connect_tcp(address: &str) -> Result<TcpStream, ConnectError> {
    let addrs = tokio::net::lookup_host(address)
        .await
        .map_err(|source| ConnectError::Resolve {
            address: address.to_string(),
            source,
        })?;
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(s) => {
                tune(&s);
                return Ok(s);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(ConnectError::Tcp {
        address: address.to_string(),
        source: last.unwrap_or_else(|| std::io::Error::other("name resolved to no address")),
    })
}

/// TCP keepalive catches paths that died without FIN/RST even when the pool's own checks
/// are not running (http/1.1 idle connections).
fn tune(s: &TcpStream) {
    let _ = s.set_nodelay(true);
    let ka = socket2::TcpKeepalive::new()
        .with_time(std::time::Duration::from_secs(30))
        .with_interval(std::time::Duration::from_secs(10))
        .with_retries(3);
    let _ = socket2::SockRef::from(s).set_tcp_keepalive(&ka);
}
