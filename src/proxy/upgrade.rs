//! Upgraded requests: WebSocket and other HTTP/1.1 `Upgrade`s from http/1.1 clients, and
//! WebSockets from h2 clients (RFC 8441 extended CONNECT, bridged to RFC 6455). The request
//! goes to the first origin of the route that accepts a connection, over a dedicated
//! http/1.1 connection whatever the pool's protocol (`Pool::open_tunnel`). On `101 Switching
//! Protocols` both sides are upgraded and their bytes copied both ways until either closes.
//! Any other answer is passed on like a normal response (see `websocket_over_h2` for the
//! exceptions on h2). A tunnel with no bytes either way
//! for the origin's `tunnel_idle_timeout` (default 1h, like HAProxy's usual `timeout tunnel`:
//! WebSockets idle by design, so the body `idle_timeout` would be too short) is closed. A
//! tunnel keeps its client connection's slot of `max_connections` and is waited for by drain
//! like the connection it came from (see [`Hold`]).

use super::body::{full, BoxError, ProxyBody, UpstreamBody};
use super::error::ProxyError;
use super::handler::{plain_body, upstream_request};
use super::headers;
use super::request_body::ClientIn;
use super::router::Route;
use super::ClientConn;
use super::Runtime;
use crate::access_log::PendingLog;
use crate::pool::{CheckoutError, Pool, ResponseBody, UpstreamBody as UpBody, UpstreamError};
use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Version};
use hyper_util::rt::TokioIo;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

/// Put in an upgrade request's extensions by the connection that carries it: what a tunnel
/// must hold to outlive that connection (its slot of the listener's limit, and its mark as a
/// request in flight so an h2 connection carrying a tunnel is not closed as idle) and where
/// to spawn so that drain waits for it.
#[derive(Clone)]
pub struct Hold {
    pub slot: Arc<dyn std::any::Any + Send + Sync>,
    pub tracker: TaskTracker,
    /// The listener's connection limit. An h2 WebSocket takes a slot of its own: it opens
    /// its own origin connection while sharing its client connection with other streams.
    pub limit: Arc<tokio::sync::Semaphore>,
    /// The listener's per-client limit, when set: an h2 WebSocket takes a slot of that too.
    pub per_client: Option<crate::edge::client_limit::PerClient>,
}

impl Hold {
    /// The same hold, also keeping `extra` until the tunnel ends.
    pub fn with(self, extra: impl std::any::Any + Send + Sync) -> Hold {
        Hold {
            slot: Arc::new((self.slot, extra)),
            ..self
        }
    }
}

/// Forwards an upgrade of either kind: an h2 client's WebSocket (`websocket_over_h2`) or an
/// http/1.1 `Upgrade` (`tunnel`).
pub async fn forward(
    rt: &Runtime,
    req: Request<ClientIn>,
    client: &ClientConn,
    authority: &str,
    route: &Route,
    candidates: &[&Pool],
    log: &mut Option<PendingLog>,
) -> Result<Response<ProxyBody>, ProxyError> {
    if is_h2_websocket(&req) {
        websocket_over_h2(rt, req, client, authority, route, candidates, log).await
    } else {
        tunnel(rt, req, client, authority, route, candidates, log).await
    }
}

/// Forwards an upgrade request; on 101 answers the client with the origin's head and splices
/// the two connections in a task of their own.
async fn tunnel(
    rt: &Runtime,
    mut req: Request<ClientIn>,
    client: &ClientConn,
    authority: &str,
    route: &Route,
    candidates: &[&Pool],
    log: &mut Option<PendingLog>,
) -> Result<Response<ProxyBody>, ProxyError> {
    // Every protocol asked for, from every Upgrade line, but h2c (see `handler::is_upgrade`).
    let asked: Vec<&[u8]> = headers::list_tokens(req.headers().get_all(header::UPGRADE))
        .filter(|p| !p.eq_ignore_ascii_case(b"h2c"))
        .collect();
    let protocol = HeaderValue::from_bytes(&asked.join(&b", "[..]))
        .map_err(|_| ProxyError::BadRequest("Upgrade without a protocol"))?;
    let hold = req.extensions_mut().remove::<Hold>();
    let client_side = hyper::upgrade::on(&mut req);
    let mut up = upstream_request(rt, plain_body(req), client, authority, route)?;
    // A tunnel has no trailers to ask for (and `TE` would have to be named in Connection).
    up.headers_mut().remove(header::TE);
    // The origin speaks http/1.1 here, whatever its pool's protocol (see `for_protocol`).
    headers::join_cookies(up.headers_mut());
    up.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    up.headers_mut().insert(header::UPGRADE, protocol.clone());
    let started = Instant::now();
    let (pool, mut resp) = exchange(candidates, up).await?;
    let origin = pool.origin();
    let ttfb = started.elapsed();
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if switched && !switches_to_asked(&protocol, resp.headers()) {
        // RFC 9110 7.8: a 101 names the protocol(s) switched to, which must be ones the
        // client asked for (HAProxy answers 502 too). Before the log is taken: the caller
        // logs the 502.
        return Err(ProxyError::BadWebSocketHandshake {
            origin: origin.name.clone(),
            reason: "101 to a protocol the client did not ask for",
        });
    }
    let mut log = log.take();
    if let Some(l) = log.as_mut() {
        l.upstream(
            &origin.name,
            resp.status().as_u16(),
            Duration::ZERO,
            ttfb,
            "fresh",
        );
    }
    let upstream_side = switched.then(|| hyper::upgrade::on(&mut resp));
    let (mut parts, body) = resp.into_parts();
    let upgrade_to = parts.headers.get(header::UPGRADE).cloned();
    headers::from_origin(&mut parts.headers, parts.version, &rt.via);
    headers::apply_edits(&mut parts.headers, &route.response_headers);
    let Some(upstream_side) = upstream_side else {
        // The origin declined the upgrade: an ordinary response.
        expect_length(&mut log, &parts.headers);
        let body = UpstreamBody::new(body, None, origin.idle_timeout, None, log).boxed();
        return Ok(Response::from_parts(parts, body));
    };
    parts
        .headers
        .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Some(p) = upgrade_to {
        parts.headers.insert(header::UPGRADE, p);
    }
    spawn_splice(hold, client_side, upstream_side, log, pool);
    Ok(Response::from_parts(parts, full("")))
}

/// RFC 6455 4.2.2: what a server answers to a `Sec-WebSocket-Key`.
pub fn websocket_accept(key: &[u8]) -> String {
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut sha1 = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    sha1.update(key);
    sha1.update(GUID);
    STANDARD.encode(sha1.finish())
}

/// Whether `req` is an h2 client's WebSocket: RFC 8441 extended CONNECT with
/// `:protocol = websocket`.
pub fn is_h2_websocket<B>(req: &Request<B>) -> bool {
    req.method() == Method::CONNECT
        && req
            .extensions()
            .get::<hyper::ext::Protocol>()
            .is_some_and(|p| p.as_str().eq_ignore_ascii_case("websocket"))
}

/// An h2 client's WebSocket (RFC 8441), bridged to an RFC 6455 upgrade toward the origin over
/// a dedicated http/1.1 connection. The h2 side has no `Sec-WebSocket-Key`, so edgepop makes
/// one and checks the origin's `Sec-WebSocket-Accept` (a mismatch is a 502); on 101 the
/// client gets 200 and its stream then carries the WebSocket frames both ways. An origin's
/// 2xx other than 101 is a 502 too; its 3xx, 4xx and 5xx are passed on like normal responses.
async fn websocket_over_h2(
    rt: &Runtime,
    mut req: Request<ClientIn>,
    client: &ClientConn,
    authority: &str,
    route: &Route,
    candidates: &[&Pool],
    log: &mut Option<PendingLog>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let hold = match req.extensions_mut().remove::<Hold>() {
        Some(h) => {
            let own = h.limit.clone().try_acquire_owned();
            let own = own.map_err(|_| ProxyError::TunnelLimit)?;
            let client = match &h.per_client {
                Some(p) => Some(p.take().ok_or(ProxyError::TunnelLimit)?),
                None => None,
            };
            Some(h.with((own, client)))
        }
        None => None,
    };
    let client_side = hyper::upgrade::on(&mut req);
    req.extensions_mut().remove::<hyper::ext::Protocol>();
    *req.method_mut() = Method::GET;
    let mut up = upstream_request(rt, plain_body(req), client, authority, route)?;
    up.headers_mut().remove(header::TE);
    // An RFC 6455 handshake is http/1.1: cookies an h2 client split go as one field.
    headers::join_cookies(up.headers_mut());
    let key = STANDARD.encode(rand::random::<[u8; 16]>());
    let h = up.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(
        header::SEC_WEBSOCKET_KEY,
        HeaderValue::from_str(&key).map_err(|_| ProxyError::BadRequest("invalid key"))?,
    );
    h.entry(header::SEC_WEBSOCKET_VERSION)
        .or_insert(HeaderValue::from_static("13"));
    let started = Instant::now();
    let (pool, mut resp) = exchange(candidates, up).await?;
    let origin = pool.origin();
    let switched = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    // RFC 6455 4.1: the 101 must say websocket, upgrade, and the accept value for our key.
    let h = resp.headers();
    let accepted = h
        .get(header::SEC_WEBSOCKET_ACCEPT)
        .is_some_and(|v| v.as_bytes() == websocket_accept(key.as_bytes()).as_bytes())
        && h.get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && headers::has_token(h, header::CONNECTION, "upgrade");
    // Not the WebSocket the client asked for: a 502 (the caller logs it). A 2xx other than
    // 101 cannot be passed on: to an extended CONNECT, 2xx means the tunnel is open.
    let refused = match (switched, accepted) {
        (true, false) => Some("101 without Upgrade: websocket or the right Sec-WebSocket-Accept"),
        (false, _) if resp.status().is_success() => Some("the origin did not switch protocols"),
        _ => None,
    };
    if let Some(reason) = refused {
        return Err(ProxyError::BadWebSocketHandshake {
            origin: origin.name.clone(),
            reason,
        });
    }
    let mut log = log.take();
    if let Some(l) = log.as_mut() {
        let status = if switched {
            200
        } else {
            resp.status().as_u16()
        };
        l.upstream(
            &origin.name,
            status,
            Duration::ZERO,
            started.elapsed(),
            "fresh",
        );
    }
    if !switched {
        let (mut parts, body) = resp.into_parts();
        headers::from_origin(&mut parts.headers, parts.version, &rt.via);
        headers::apply_edits(&mut parts.headers, &route.response_headers);
        parts.version = Version::HTTP_2;
        expect_length(&mut log, &parts.headers);
        let body = UpstreamBody::new(body, None, origin.idle_timeout, None, log).boxed();
        return Ok(Response::from_parts(parts, body));
    }
    let upstream_side = hyper::upgrade::on(&mut resp);
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(header::SEC_WEBSOCKET_ACCEPT);
    headers::from_origin(&mut parts.headers, parts.version, &rt.via);
    headers::apply_edits(&mut parts.headers, &route.response_headers);
    parts.status = StatusCode::OK;
    parts.version = Version::HTTP_2;
    spawn_splice(hold, client_side, upstream_side, log, pool);
    Ok(Response::from_parts(parts, full("")))
}

/// Tells the access log how long the body of a passed-on response is, so a complete one is
/// logged "ok" even if the client stops polling at its end.
fn expect_length(log: &mut Option<PendingLog>, h: &header::HeaderMap) {
    if let Some(l) = log.as_mut() {
        l.expect_bytes(
            h.get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        );
    }
}

/// Whether a 101's `Upgrade` names protocols, each one the client asked for in `asked` (its
/// `Upgrade` value); h2c never counts (see `handler::is_upgrade`).
fn switches_to_asked(asked: &HeaderValue, answer: &header::HeaderMap) -> bool {
    // `name` or `name/version`: a version counts only where both sides give one.
    let split = |t: &[u8]| -> (Vec<u8>, Option<Vec<u8>>) {
        let t = t.to_ascii_lowercase();
        match t.iter().position(|&b| b == b'/') {
            Some(i) => (
                t[..i].trim_ascii().to_vec(),
                Some(t[i + 1..].trim_ascii().to_vec()),
            ),
            None => (t, None),
        }
    };
    let asked: Vec<_> = asked
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .map(split)
        .collect();
    let given: Vec<_> = headers::list_tokens(answer.get_all(header::UPGRADE))
        .map(split)
        .collect();
    let fits = |(name, version): &(Vec<u8>, Option<Vec<u8>>)| {
        name != b"h2c"
            && asked
                .iter()
                .any(|(n, v)| n == name && (v.is_none() || version.is_none() || v == version))
    };
    !given.is_empty() && given.iter().all(fits)
}

/// Splices the two upgraded sides in a task of its own: under the client connection's
/// [`Hold`] when it has one, so the tunnel keeps its slot and drain waits for it.
fn spawn_splice(
    hold: Option<Hold>,
    client_side: hyper::upgrade::OnUpgrade,
    upstream_side: hyper::upgrade::OnUpgrade,
    log: Option<PendingLog>,
    pool: &Pool,
) {
    let name = pool.origin().name.clone();
    let idle = pool.origin().tunnel_idle_timeout;
    match hold {
        Some(h) => {
            let slot = h.slot;
            h.tracker.spawn(async move {
                splice(client_side, upstream_side, log, &name, idle).await;
                drop(slot);
            })
        }
        None => {
            tokio::spawn(async move { splice(client_side, upstream_side, log, &name, idle).await })
        }
    };
}

/// Waits for both sides to be upgraded, then copies bytes both ways until either closes or
/// nothing moves for `idle`; logs the tunnel when it ends.
async fn splice(
    client_side: hyper::upgrade::OnUpgrade,
    upstream_side: hyper::upgrade::OnUpgrade,
    log: Option<PendingLog>,
    origin: &str,
    idle: Duration,
) {
    let (client, upstream) = match tokio::join!(client_side, upstream_side) {
        (Ok(c), Ok(u)) => (c, u),
        (c, u) => {
            tracing::debug!(
                origin,
                client_ok = c.is_ok(),
                origin_ok = u.is_ok(),
                "upgrade did not complete"
            );
            if let Some(l) = log {
                l.finish(0, "aborted");
            }
            return;
        }
    };
    let activity = Arc::new(Activity::new());
    let mut client = Tracked::new(TokioIo::new(client), activity.clone());
    let mut upstream = Tracked::new(TokioIo::new(upstream), activity.clone());
    let outcome = {
        let copy = tokio::io::copy_bidirectional(&mut client, &mut upstream);
        tokio::pin!(copy);
        loop {
            tokio::select! {
                // An error here is one side closing without a clean shutdown.
                r = &mut copy => break if r.is_ok() { "ok" } else { "aborted" },
                _ = tokio::time::sleep_until(activity.last() + idle) => {
                    if activity.last() + idle <= Instant::now() {
                        tracing::debug!(origin, ?idle, "tunnel idle, closing");
                        break "tunnel idle timeout";
                    }
                }
            }
        }
    };
    if let Some(l) = log {
        l.finish(client.written, outcome);
    }
}

/// Sends the upgrade request over a dedicated connection to the first candidate that accepts
/// one. (Taking a warm pooled http/1.1 connection instead would save the handshake, but
/// driving every pooled connection with hyper's upgrade support measured ~10% fewer
/// requests/s on the ordinary http/1.1 path in `benches/edge/run.sh`.)
async fn exchange<'a>(
    candidates: &[&'a Pool],
    up: Request<UpBody>,
) -> Result<(&'a Pool, Response<ResponseBody>), ProxyError> {
    let mut last = None;
    for &pool in candidates {
        let origin = pool.origin();
        let mut send = match pool.open_tunnel().await {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(origin = %origin.name, error = %e, "upgrade: connect failed");
                pool.record_failure();
                last = Some(CheckoutError::Connect(e).into());
                continue;
            }
        };
        return match tokio::time::timeout(origin.first_byte_timeout, send.send_request(up)).await {
            Ok(Ok(resp)) => {
                pool.record_success();
                let resp = resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync());
                Ok((pool, resp))
            }
            Ok(Err(e)) => Err(failed(pool, UpstreamError::Http1(e))),
            Err(_) => Err(timed_out(pool)),
        };
    }
    Err(last.unwrap_or(ProxyError::BadRequest("no origin for this route")))
}

fn failed(pool: &Pool, source: UpstreamError) -> ProxyError {
    pool.record_failure();
    ProxyError::Upstream {
        origin: pool.origin().name.clone(),
        source,
    }
}

fn timed_out(pool: &Pool) -> ProxyError {
    pool.record_failure();
    ProxyError::FirstByteTimeout {
        origin: pool.origin().name.clone(),
        after: pool.origin().first_byte_timeout,
    }
}

/// When bytes last moved through a tunnel, either way.
struct Activity {
    start: Instant,
    /// Milliseconds from `start`.
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

/// One side of a tunnel: records activity, and counts the bytes written to it (kept even
/// when the copy ends in an error).
struct Tracked<T> {
    inner: T,
    activity: Arc<Activity>,
    written: u64,
}

impl<T> Tracked<T> {
    fn new(inner: T, activity: Arc<Activity>) -> Self {
        Tracked {
            inner,
            activity,
            written: 0,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Tracked<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Tracked<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.written += n as u64;
            if n > 0 {
                self.activity.touch();
            }
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_101_must_switch_to_what_was_asked_versions_counting_where_both_give_one() {
        let answer = |v: &'static str| {
            let mut h = header::HeaderMap::new();
            h.insert(header::UPGRADE, HeaderValue::from_static(v));
            h
        };
        let asked = HeaderValue::from_static("websocket, Foo/2");
        for (given, ok) in [
            ("websocket", true),
            ("WebSocket/13", true),
            ("foo/2", true),
            ("foo", true),
            ("foo/3", false),
            ("websocket, h2c", false),
            ("h2c", false),
            ("other", false),
            (",", false),
        ] {
            assert_eq!(switches_to_asked(&asked, &answer(given)), ok, "{given}");
        }
        assert!(
            !switches_to_asked(&asked, &header::HeaderMap::new()),
            "no Upgrade"
        );
    }
}
