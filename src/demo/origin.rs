//! A small TLS origin for the demo, tests and benches: h2 and http/1.1 by ALPN, counts
//! connections and full/resumed handshakes, and can be stopped, restarted, made unhealthy,
//! made to close idle connections or to send GOAWAY — the faults the pool must survive.
//!
//! Paths: `/healthz`; `/bytes/N` streams N bytes; `/echo` streams the request body (and its
//! trailers) back;
//! `/headers` returns the request headers as text; `/delay/MS` answers after MS
//! milliseconds; `/status/N` answers with status N; `/upgrade` (with `Upgrade`) switches
//! protocols and echoes bytes; `/.well-known/acme-challenge/TOKEN` answers an ACME key
//! authorization for TOKEN, saying in `x-origin-saw-proto` which `X-Forwarded-Proto` it got;
//! anything else answers "hello".

use crate::tls::certs;
use bytes::Bytes;
use futures_util::stream;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpSocket;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

type Body = UnsyncBoxBody<Bytes, std::io::Error>;

/// What the origin has seen; read by tests.
#[derive(Debug, Default)]
pub struct OriginStats {
    pub connections: AtomicU64,
    pub handshakes_full: AtomicU64,
    pub handshakes_resumed: AtomicU64,
    pub requests: AtomicU64,
    pub open: AtomicUsize,
}

impl OriginStats {
    pub fn handshakes(&self) -> u64 {
        self.handshakes_full.load(Ordering::SeqCst) + self.handshakes_resumed.load(Ordering::SeqCst)
    }
}

/// Above the edge's caps (64 KiB of header section, its h2 decoder's 128 KiB), so tests see
/// what the edge lets through rather than hyper's own limit (16 KiB).
const DEFAULT_MAX_HEADER_LIST: u32 = 256 * 1024;

#[derive(Debug, Clone)]
pub struct OriginBuilder {
    address: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    alpn: Vec<Vec<u8>>,
    idle_close: Option<Duration>,
    keep_alive_timeout_header: Option<u64>,
    max_streams: Option<u32>,
    /// The h2 side's SETTINGS_MAX_HEADER_LIST_SIZE (hyper closes the connection, GOAWAY
    /// ENHANCE_YOUR_CALM, on a list four times over it).
    max_header_list: u32,
    name: String,
    /// Ask every client for a certificate signed by this CA (mutual TLS).
    client_ca: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum OriginError {
    #[error("test origin certificate: {0}")]
    Cert(#[from] certs::CertError),
    #[error("test origin TLS config: {0}")]
    Tls(#[from] rustls::Error),
    #[error("test origin client certificate check: {0}")]
    ClientVerifier(#[from] rustls::server::VerifierBuilderError),
    #[error("binding test origin {address}: {source}")]
    Bind {
        address: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

impl OriginBuilder {
    /// Defaults: 127.0.0.1:0, certs/origin.{crt,key} relative to `certs_dir`, h2 + http/1.1.
    pub fn new(certs_dir: impl Into<PathBuf>) -> Self {
        let dir = certs_dir.into();
        OriginBuilder {
            address: SocketAddr::from(([127, 0, 0, 1], 0)),
            cert: dir.join("origin.crt"),
            key: dir.join("origin.key"),
            alpn: vec![b"h2".to_vec(), b"http/1.1".to_vec()],
            idle_close: None,
            keep_alive_timeout_header: None,
            max_streams: None,
            max_header_list: DEFAULT_MAX_HEADER_LIST,
            name: "origin".into(),
            client_ca: None,
        }
    }

    pub fn address(mut self, a: SocketAddr) -> Self {
        self.address = a;
        self
    }

    pub fn name(mut self, n: &str) -> Self {
        self.name = n.into();
        self
    }

    /// Offer only http/1.1 (or only h2) in ALPN.
    pub fn http1_only(mut self) -> Self {
        self.alpn = vec![b"http/1.1".to_vec()];
        self
    }

    pub fn h2_only(mut self) -> Self {
        self.alpn = vec![b"h2".to_vec()];
        self
    }

    /// Close connections that carried no request for this long.
    pub fn idle_close(mut self, d: Duration) -> Self {
        self.idle_close = Some(d);
        self
    }

    /// Announce SETTINGS_MAX_HEADER_LIST_SIZE = `n` on h2 connections (and close any
    /// connection that sends a list four times over it, as hyper does).
    pub fn max_header_list(mut self, n: u32) -> Self {
        self.max_header_list = n;
        self
    }

    /// Announce SETTINGS_MAX_CONCURRENT_STREAMS = `n` on h2 connections.
    pub fn max_streams(mut self, n: u32) -> Self {
        self.max_streams = Some(n);
        self
    }

    /// Require a client certificate signed by the CA in `ca` (PEM): a client without one fails
    /// the handshake.
    pub fn require_client_cert(mut self, ca: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(ca.into());
        self
    }

    /// Announce `Keep-Alive: timeout=N` on http/1.1 responses.
    pub fn keep_alive_header(mut self, secs: u64) -> Self {
        self.keep_alive_timeout_header = Some(secs);
        self
    }

    pub async fn start(self) -> Result<Origin, OriginError> {
        let key = certs::load_certified_key(&self.cert, &self.key)?;
        let builder = rustls::ServerConfig::builder_with_provider(crate::tls::provider_arc())
            .with_protocol_versions(crate::tls::VERSIONS)?;
        let builder = match &self.client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let roots = Arc::new(certs::load_roots(ca)?);
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots,
                    crate::tls::provider_arc(),
                )
                .build()?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut cfg = builder.with_cert_resolver(Arc::new(OneCert(Arc::new(key))));
        cfg.alpn_protocols = self.alpn.clone();
        cfg.ticketer = rustls::crypto::ring::Ticketer::new()?;
        let shared = Arc::new(Shared {
            stats: OriginStats::default(),
            healthy: AtomicBool::new(true),
            acceptor: TlsAcceptor::from(Arc::new(cfg)),
            builder: self.clone(),
            run: Mutex::new(CancellationToken::new()),
            parked: Mutex::new(None),
            accept_task: Mutex::new(None),
            goaway: Notify::new(),
            idle_changed: Notify::new(),
            idle_close_ms: AtomicU64::new(idle_close_ms(self.idle_close)),
        });
        let socket = bound_socket(self.address)?;
        let address = serve(&shared, socket, self.address)?;
        Ok(Origin { shared, address })
    }
}

#[derive(Debug)]
struct OneCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::server::ResolvesServerCert for OneCert {
    fn resolve(
        &self,
        _hello: rustls::server::ClientHello<'_>,
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }
}

struct Shared {
    stats: OriginStats,
    healthy: AtomicBool,
    acceptor: TlsAcceptor,
    builder: OriginBuilder,
    /// Cancelled by stop(); replaced by restart().
    run: Mutex<CancellationToken>,
    /// While stopped, the port stays bound (not listening): connects are refused, and no
    /// ephemeral bind or outgoing connection of a parallel test can take the port before
    /// restart() listens on it (only an explicit SO_REUSEPORT bind of this port could).
    parked: Mutex<Option<TcpSocket>>,
    accept_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    goaway: Notify,
    /// Idle connections are closed after this many ms (0: never); changed by
    /// [`Origin::set_idle_close`].
    idle_close_ms: AtomicU64,
    /// Wakes every connection's loop to take a changed `idle_close_ms`.
    idle_changed: Notify,
}

/// `Shared::idle_close_ms` for an idle close after `d` (0: never; under 1 ms is 1 ms).
fn idle_close_ms(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

impl Shared {
    fn token(&self) -> CancellationToken {
        lock(&self.run).clone()
    }

    fn idle_close(&self) -> Option<Duration> {
        match self.idle_close_ms.load(Ordering::SeqCst) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}

/// A running test origin; stops when dropped.
pub struct Origin {
    shared: Arc<Shared>,
    address: SocketAddr,
}

impl Origin {
    pub fn builder(certs_dir: impl Into<PathBuf>) -> OriginBuilder {
        OriginBuilder::new(certs_dir)
    }

    pub fn addr(&self) -> SocketAddr {
        self.address
    }

    pub fn stats(&self) -> &OriginStats {
        &self.shared.stats
    }

    /// Changes when idle connections are closed (None: never), open ones included: their
    /// idle time starts over.
    pub fn set_idle_close(&self, d: Option<Duration>) {
        self.shared
            .idle_close_ms
            .store(idle_close_ms(d), Ordering::SeqCst);
        self.shared.idle_changed.notify_waiters();
    }

    /// `/healthz` answers 503 while false.
    pub fn set_healthy(&self, ok: bool) {
        self.shared.healthy.store(ok, Ordering::SeqCst);
    }

    /// Like a crash: stops listening and drops every connection at once. The port stays
    /// reserved for [`Origin::restart`].
    pub fn stop(&self) {
        let mut parked = lock(&self.shared.parked);
        if parked.is_none() {
            // Bound beside the listener (SO_REUSEPORT) before the listener closes.
            *parked = bound_socket(self.address).ok();
        }
        self.shared.token().cancel();
    }

    /// Listens again on the same address after [`Origin::stop`] (no-op if running).
    pub async fn restart(&self) -> Result<(), OriginError> {
        if !self.shared.token().is_cancelled() {
            return Ok(());
        }
        let previous = lock(&self.shared.accept_task).take();
        if let Some(task) = previous {
            // The old listener must be closed before the parked socket listens.
            let _ = task.await;
        }
        *lock(&self.shared.run) = CancellationToken::new();
        let socket = match lock(&self.shared.parked).take() {
            Some(s) => s,
            None => bound_socket(self.address)?,
        };
        serve(&self.shared, socket, self.address).map(|_| ())
    }

    /// Graceful shutdown of every open connection (h2: GOAWAY), listener stays up.
    pub fn goaway_all(&self) {
        self.shared.goaway.notify_waiters();
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        // Like stop(), without keeping the port.
        self.shared.token().cancel();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bound_socket(address: SocketAddr) -> Result<TcpSocket, OriginError> {
    crate::wan::reservable_socket(address).map_err(|source| OriginError::Bind { address, source })
}

/// Listens on `socket` and serves until the run token is cancelled; returns the local address.
fn serve(
    shared: &Arc<Shared>,
    socket: TcpSocket,
    address: SocketAddr,
) -> Result<SocketAddr, OriginError> {
    let bind = |source| OriginError::Bind { address, source };
    let listener = socket.listen(1024).map_err(bind)?;
    let local = listener.local_addr().map_err(bind)?;
    let token = shared.token();
    let task_shared = shared.clone();
    let task = tokio::spawn(async move {
        let shared = task_shared;
        loop {
            let (tcp, _) = tokio::select! {
                r = listener.accept() => match r { Ok(a) => a, Err(_) => continue },
                _ = token.cancelled() => return,
            };
            tokio::spawn(serve_conn(shared.clone(), tcp, token.clone()));
        }
    });
    *lock(&shared.accept_task) = Some(task);
    Ok(local)
}

async fn serve_conn(shared: Arc<Shared>, tcp: tokio::net::TcpStream, token: CancellationToken) {
    let _ = tcp.set_nodelay(true);
    // Which of the client's connections carried a request (tests of connection sharing).
    let peer_port = tcp.peer_addr().map(|a| a.port()).unwrap_or(0);
    shared.stats.connections.fetch_add(1, Ordering::SeqCst);
    let Ok(tls) = shared.acceptor.accept(tcp).await else {
        return;
    };
    let resumed = tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed);
    let counter = if resumed {
        &shared.stats.handshakes_resumed
    } else {
        &shared.stats.handshakes_full
    };
    counter.fetch_add(1, Ordering::SeqCst);
    shared.stats.open.fetch_add(1, Ordering::SeqCst);
    let in_flight = Arc::new(AtomicUsize::new(0));
    let activity = Arc::new(Notify::new());
    let svc = {
        let shared = shared.clone();
        let in_flight = in_flight.clone();
        let activity = activity.clone();
        service_fn(move |req| {
            let shared = shared.clone();
            let in_flight = in_flight.clone();
            let activity = activity.clone();
            in_flight.fetch_add(1, Ordering::SeqCst);
            async move {
                let mut r = respond(&shared, req).await;
                r.headers_mut().insert(
                    "x-origin-peer-port",
                    hyper::header::HeaderValue::from(peer_port),
                );
                in_flight.fetch_sub(1, Ordering::SeqCst);
                activity.notify_one();
                Ok::<_, Infallible>(r)
            }
        })
    };
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new());
    b.http2().timer(TokioTimer::new());
    b.http2()
        .max_header_list_size(shared.builder.max_header_list);
    if let Some(n) = shared.builder.max_streams {
        b.http2().max_concurrent_streams(n);
    }
    let conn = b.serve_connection_with_upgrades(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        let idle = shared.idle_close();
        // select!: connection done, crash (token), GOAWAY request, idle timer.
        tokio::select! {
            _ = conn.as_mut() => break,
            _ = token.cancelled() => break,
            _ = shared.goaway.notified(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = activity.notified() => {}
            // The idle timer starts over with the new value.
            _ = shared.idle_changed.notified() => {}
            _ = tokio::time::sleep(idle.unwrap_or(Duration::from_secs(86400))), if idle.is_some() && !closing => {
                if in_flight.load(Ordering::SeqCst) == 0 {
                    break;
                }
            }
        }
    }
    shared.stats.open.fetch_sub(1, Ordering::SeqCst);
}

/// `/upgrade` with `Connection: upgrade` + `Upgrade: X`: 101, then every byte echoed back
/// (a stand-in for a WebSocket server; it answers a `Sec-WebSocket-Key` with the RFC 6455
/// `Sec-WebSocket-Accept`, or a wrong one for `/upgrade?bad-accept`, and says in
/// `x-upgrade-request` the method, version and `Sec-WebSocket-Version` it got). Without the
/// headers: 426.
fn upgrade_echo(req: &mut Request<Incoming>) -> Response<Body> {
    let Some(protocol) = req.headers().get(hyper::header::UPGRADE).cloned() else {
        return full(StatusCode::UPGRADE_REQUIRED, "upgrade required\n");
    };
    let on = hyper::upgrade::on(&mut *req);
    tokio::spawn(async move {
        if let Ok(upgraded) = on.await {
            let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
            if tokio::io::copy(&mut r, &mut w).await.is_ok() {
                let _ = tokio::io::AsyncWriteExt::shutdown(&mut w).await;
            }
        }
    });
    let accept = req
        .headers()
        .get(hyper::header::SEC_WEBSOCKET_KEY)
        .map(|k| match req.uri().query() {
            Some("bad-accept") => "not-the-accept-value".to_string(),
            _ => crate::proxy::upgrade::websocket_accept(k.as_bytes()),
        });
    // What the request looked like, for tests of the edge's RFC 8441 bridge.
    let version = req
        .headers()
        .get(hyper::header::SEC_WEBSOCKET_VERSION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-");
    let saw = format!("{} {:?} {version}", req.method(), req.version());
    let cookies = req.headers().get_all(hyper::header::COOKIE).iter().count();
    let mut resp = full(StatusCode::SWITCHING_PROTOCOLS, Bytes::new());
    if let Ok(v) = hyper::header::HeaderValue::from_str(&saw) {
        resp.headers_mut().insert("x-upgrade-request", v);
    }
    resp.headers_mut()
        .insert("x-upgrade-cookie-fields", cookies.into());
    let protocol = match req.uri().query() {
        // A misbehaving origin, for the edge's tests: a 101 to what nobody asked for.
        Some("switch-to-other") => hyper::header::HeaderValue::from_static("not-asked"),
        _ => protocol,
    };
    resp.headers_mut().insert(hyper::header::UPGRADE, protocol);
    if let Some(a) = accept.and_then(|a| hyper::header::HeaderValue::from_str(&a).ok()) {
        resp.headers_mut()
            .insert(hyper::header::SEC_WEBSOCKET_ACCEPT, a);
    }
    resp.headers_mut().insert(
        hyper::header::CONNECTION,
        hyper::header::HeaderValue::from_static("upgrade"),
    );
    resp
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(
        Full::new(body.into())
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

async fn respond(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    shared.stats.requests.fetch_add(1, Ordering::SeqCst);
    let path = req.uri().path().to_string();
    // `?body-on-head`: a misbehaving origin, for the edge's tests.
    let head = req.method() == hyper::Method::HEAD && req.uri().query() != Some("body-on-head");
    let mut resp = route(shared, req, &path).await;
    if head {
        // The head only (RFC 9110 9.3.2): hyper's h2 server would send the body as DATA.
        let (mut parts, body) = resp.into_parts();
        let has_content = !(parts.status.is_informational()
            || parts.status == StatusCode::NO_CONTENT
            || parts.status == StatusCode::NOT_MODIFIED);
        if let Some(n) = http_body::Body::size_hint(&body)
            .exact()
            .filter(|_| has_content)
        {
            parts
                .headers
                .entry(hyper::header::CONTENT_LENGTH)
                .or_insert_with(|| n.into());
        }
        resp = Response::from_parts(
            parts,
            http_body_util::Empty::new()
                .map_err(|never| match never {})
                .boxed_unsync(),
        );
    }
    if let Some(t) = shared.builder.keep_alive_timeout_header {
        if let Ok(v) = format!("timeout={t}").parse() {
            resp.headers_mut().insert("keep-alive", v);
        }
    }
    if let Ok(v) = shared.builder.name.parse() {
        resp.headers_mut().insert("x-origin", v);
    }
    resp
}

async fn route(shared: &Shared, mut req: Request<Incoming>, path: &str) -> Response<Body> {
    if path == "/upgrade" {
        return upgrade_echo(&mut req);
    }
    if path == "/healthz" {
        return if shared.healthy.load(Ordering::SeqCst) {
            full(StatusCode::OK, "ok\n")
        } else {
            full(StatusCode::SERVICE_UNAVAILABLE, "unhealthy\n")
        };
    }
    if path == "/echo" {
        // Trailers come back too; over http/1.1 only the ones the request declares.
        let declared = req.headers().get(hyper::header::TRAILER).cloned();
        let body = req
            .into_body()
            .map_err(std::io::Error::other)
            .boxed_unsync();
        let mut resp = Response::new(body);
        if let Some(t) = declared {
            resp.headers_mut().insert(hyper::header::TRAILER, t);
        }
        return resp;
    }
    if let Some(token) = path.strip_prefix("/.well-known/acme-challenge/") {
        let proto = req
            .headers()
            .get("x-forwarded-proto")
            .cloned()
            .unwrap_or(hyper::header::HeaderValue::from_static("none"));
        let mut resp = full(StatusCode::OK, format!("{token}.demo-account-key\n"));
        resp.headers_mut().insert("x-origin-saw-proto", proto);
        return resp;
    }
    if path == "/headers" {
        let mut out = String::new();
        for (k, v) in req.headers() {
            out.push_str(&format!("{}: {}\n", k, v.to_str().unwrap_or("<binary>")));
        }
        return full(StatusCode::OK, out);
    }
    if let Some(n) = path
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        return bytes_response(n);
    }
    if let Some(ms) = path
        .strip_prefix("/delay/")
        .and_then(|n| n.parse::<u64>().ok())
    {
        tokio::time::sleep(Duration::from_millis(ms.min(60_000))).await;
        return full(StatusCode::OK, "delayed\n");
    }
    if let Some(code) = path
        .strip_prefix("/status/")
        .and_then(|n| n.parse::<u16>().ok())
    {
        let status = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_REQUEST);
        return full(status, format!("{code}\n"));
    }
    // Drain any request body so http/1.1 keep-alive works.
    let _ = req.into_body().collect().await;
    full(StatusCode::OK, "hello\n")
}

fn bytes_response(n: u64) -> Response<Body> {
    const CHUNK: u64 = 64 * 1024;
    let chunk = Bytes::from(vec![b'x'; CHUNK as usize]);
    let chunks = stream::iter((0..n.div_ceil(CHUNK)).map(move |i| {
        let len = (n - i * CHUNK).min(CHUNK) as usize;
        Ok::<_, std::io::Error>(Frame::data(chunk.slice(..len)))
    }));
    let mut r = Response::new(StreamBody::new(chunks).boxed_unsync());
    if let Ok(v) = n.to_string().parse() {
        r.headers_mut().insert(hyper::header::CONTENT_LENGTH, v);
    }
    r
}
