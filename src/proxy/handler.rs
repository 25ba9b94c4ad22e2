//! One request: validate the target, route by Host, check out a pooled connection on the
//! first healthy origin of the route, forward, and stream the answer back. (`Upgrade`
//! requests leave here for [`super::upgrade`].)
//!
//! Retries: a request that provably never reached the origin (never written, REFUSED_STREAM,
//! GOAWAY below its stream) is retried on another connection whatever its method (each failed
//! connection is retired, so retries walk to live or fresh ones; at most 8); a bodiless
//! idempotent request that may have reached the origin is retried too (at most 2); nothing
//! else is. A connect failure or a full pool (queue full or timed out) moves any request on
//! to the route's next healthy origin, and so does a bodiless idempotent request that got no
//! response head in time (or failed past its retries).

use super::body::{full, HeadBody, ProxyBody, UpstreamBody};
use super::error::ProxyError;
use super::headers;
use super::replay::Replay;
use super::request_body::ClientIn;
use super::request_body::{BodyProgress, ClientBody, ClientBodyError};
use super::router::normalize_host;
use super::router::Route;
use super::Runtime;
use super::{ClientConn, ClientLimits};
use crate::access_log::PendingLog;
use crate::config::Protocol;
use crate::pool::{CheckoutError, Pool, SendError, StreamGuard, UpstreamBody as UpBody, Warmth};
use http_body_util::BodyExt;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, Uri, Version};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Answers one client request; never fails (errors become 4xx/5xx responses).
/// `limits`: what the client connection's listener allows the request's bodies.
pub async fn handle(
    rt: &Runtime,
    req: Request<ClientIn>,
    client: ClientConn,
    limits: ClientLimits,
) -> Response<ProxyBody> {
    let received = Instant::now();
    let is_head = req.method() == Method::HEAD;
    // hyper's http/1.1 server sends no body to a HEAD itself, nor does the HTTP/3 path.
    let head_only = is_head && req.version() == Version::HTTP_2;
    let mut req = req;
    // Measured before the edge adds its request id (replacing any the client sent).
    let head_size = header_list_size(&req);
    headers::set_request_id(req.headers_mut());
    let mut log = rt
        .access_log
        .as_ref()
        .map(|l| PendingLog::new(l, &req, &client));
    let resp = match forward(rt, req, &client, limits, head_size, &mut log).await {
        Ok(resp) => resp,
        Err(e) => {
            let resp = error_response(&e);
            if let Some(mut l) = log {
                l.status(resp.status().as_u16());
                let sent = if is_head {
                    0
                } else {
                    e.public_reason().len() as u64 + 1
                };
                l.finish(sent, e.public_reason());
            }
            resp
        }
    };
    rt.counters
        .record(resp.status().as_u16(), received.elapsed());
    if head_only {
        return resp.map(HeadBody::wrap);
    }
    resp
}

/// Counts and logs a request whose head hyper refused with `status` before any handler saw
/// it (an http/1.1 header section over the cap, say), as nginx logs its own 400s and 414s:
/// no method, host or path, as none could be read.
pub fn record_refused_head(rt: &Runtime, client: &ClientConn, status: u16, outcome: &'static str) {
    rt.counters.record_status(status);
    if let Some(log) = &rt.access_log {
        let mut e = crate::access_log::Entry::start(client, Version::HTTP_11, &Method::GET, "", "");
        e.method.clear();
        e.status = status;
        e.outcome = outcome;
        log.record(Box::new(e));
    }
}

pub fn error_response(e: &ProxyError) -> Response<ProxyBody> {
    match e.source_kind() {
        super::error::ErrorSource::Client => tracing::debug!(error = %e, "client error"),
        super::error::ErrorSource::Origin | super::error::ErrorSource::Internal => {
            tracing::warn!(error = %e, "request failed")
        }
    }
    let mut resp = Response::new(full(format!("{}\n", e.public_reason())));
    *resp.status_mut() = e.status();
    if let ProxyError::RateLimited(wait) = e {
        // Whole seconds (RFC 9110 10.2.3), rounded up so a client that obeys gets through.
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
    }
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

/// An h2 or HTTP/3 request's header list as the client sent it, counted as those protocols
/// do (RFC 9113 6.5.2: each field's name and value and 32 octets), its pseudo-header fields
/// included; 0 for http/1.1, whose head hyper measured already.
fn header_list_size(req: &Request<ClientIn>) -> usize {
    if !matches!(req.version(), Version::HTTP_2 | Version::HTTP_3) {
        return 0;
    }
    let uri = req.uri();
    let protocol = req
        .extensions()
        .get::<hyper::ext::Protocol>()
        .map(hyper::ext::Protocol::as_str);
    let pseudo = [
        (":method", Some(req.method().as_str())),
        (":scheme", uri.scheme_str()),
        (":authority", uri.authority().map(|a| a.as_str())),
        (":path", uri.path_and_query().map(|p| p.as_str())),
        (":protocol", protocol),
    ];
    let pseudo: usize = pseudo
        .iter()
        .filter_map(|(name, value)| value.map(|v| headers::field_size(name, v.len())))
        .sum();
    pseudo + headers::section_size(req.headers())
}

/// Host from :authority / absolute-form target or the Host header; both present must agree.
pub(super) fn target_host(req: &Request<ClientIn>) -> Result<(String, String), ProxyError> {
    let from_uri = req.uri().authority().map(|a| a.as_str().to_string());
    if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
        // RFC 9112 3.2: which one would the origin believe?
        return Err(ProxyError::BadRequest("more than one Host header"));
    }
    let from_header = match req.headers().get(header::HOST) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ProxyError::BadRequest("Host header is not valid text"))?
                .to_string(),
        ),
        None => None,
    };
    let authority = match (from_uri, from_header) {
        (Some(u), Some(h)) => {
            if normalize_host(&u) != normalize_host(&h) {
                return Err(ProxyError::BadRequest(
                    "Host header does not match the request target",
                ));
            }
            u
        }
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => return Err(ProxyError::BadRequest("missing Host")),
    };
    let host = normalize_host(&authority).ok_or(ProxyError::BadRequest("invalid Host"))?;
    Ok((host, authority))
}

async fn forward(
    rt: &Runtime,
    req: Request<ClientIn>,
    client: &ClientConn,
    limits: ClientLimits,
    head_size: usize,
    log: &mut Option<PendingLog>,
) -> Result<Response<ProxyBody>, ProxyError> {
    let h2_websocket = super::upgrade::is_h2_websocket(&req);
    if req.method() == Method::CONNECT && !h2_websocket {
        return Err(ProxyError::ConnectMethod);
    }
    check_fields(&req, head_size)?;
    let (host, authority) = target_host(&req)?;
    let route = rt
        .router
        .route_for(&host)
        .ok_or_else(|| ProxyError::MisdirectedHost(host.clone()))?;
    let candidates = rt.candidates(&route.origins);
    if let Some(max) = route.max_body_size {
        // A declared length over the limit is refused before any origin sees the request.
        if declared_length(&req).is_some_and(|n| n > max) {
            return Err(ProxyError::ClientBody(ClientBodyError::TooLarge(max)));
        }
    }
    let upgrade = is_upgrade(&req);
    let early = req.extensions().get::<super::EarlyData>().is_some();
    if early {
        // Over QUIC, 0-RTT comes before the client's address is proven: a rate-limited
        // route must not charge (or spare) an address somebody may have spoofed.
        let unproven = req.version() == Version::HTTP_3 && route.rate_limit.is_some();
        let accepted = if unproven {
            Err(ProxyError::TooEarly(req.method().clone()))
        } else {
            accept_early(&req, upgrade || h2_websocket)
        };
        rt.counters.record_early_data(accepted.is_ok());
        accepted?;
    }
    if upgrade && !http_body::Body::is_end_stream(req.body()) {
        // A WebSocket handshake has no body; one with a body would reach the origin
        // unchecked (no size limit, no body timeout) through the tunnel.
        return Err(ProxyError::BadRequest(
            "an Upgrade request must not have a body",
        ));
    }
    // After the refusals that need only the head (413, 425, 400), so they use up no
    // allowance, and before the body is read or any origin is asked.
    if let Some(limiter) = &route.rate_limit {
        if let Err(wait) = limiter.check(client.addr.ip()) {
            rt.counters
                .rate_limited
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            return Err(ProxyError::RateLimited(wait));
        }
    }
    if h2_websocket || upgrade {
        // Boxed: a tunnel's future holds a TLS handshake, and inline it would make every
        // request's future that large.
        return Box::pin(super::upgrade::forward(
            rt,
            req,
            client,
            &authority,
            route,
            &candidates,
            log,
        ))
        .await;
    }
    let client_version = req.version();
    let (req, progress) = client_body(req, limits.body_timeout, route);
    let upstream = upstream_request(rt, req, client, &authority, route)?;
    let started = Instant::now();
    let sent = send(&candidates, upstream, &authority, progress.as_deref()).await?;
    let upstream_ttfb = started.elapsed();
    let (mut parts, body) = sent.response.into_parts();
    if headers::list_tokens(parts.headers.get_all(header::TRANSFER_ENCODING))
        .any(|c| !c.eq_ignore_ascii_case(b"chunked"))
    {
        // hyper took the chunks off and would pass the rest (gzip, say) as plain bytes; no
        // header can say so once Transfer-Encoding goes (HAProxy answers 502 too).
        return Err(ProxyError::BadResponse {
            origin: sent.pool.origin().name.clone(),
            reason: "a transfer coding other than chunked",
        });
    }
    sent.pool.record_response(
        parts.status.as_u16(),
        upstream_ttfb.saturating_sub(sent.waited),
    );
    headers::from_origin(&mut parts.headers, parts.version, &rt.via);
    // Over HTTPS only (RFC 6797 7.2), and the origin's own policy wins.
    if let (Some(hsts), Some(_)) = (&route.hsts, client.handshake) {
        parts
            .headers
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert_with(|| hsts.clone());
    }
    if rt.server_timing {
        add_server_timing(
            &mut parts.headers,
            client,
            sent.waited,
            upstream_ttfb,
            sent.warmth,
        );
    }
    // Last, so the route's edits see (and may remove) everything the edge added.
    headers::apply_edits(&mut parts.headers, &route.response_headers);
    parts.version = client_version;
    let log = log.take().map(|mut l| {
        l.expect_bytes(
            parts
                .headers
                .get(header::CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse().ok()),
        );
        l.upstream(
            &sent.pool.origin().name,
            parts.status.as_u16(),
            sent.waited,
            upstream_ttfb,
            sent.warmth.as_str(),
        );
        l
    });
    let body = UpstreamBody::new(
        body,
        Some(sent.guard),
        sent.pool.origin().idle_timeout,
        limits.stream_send_timeout,
        log,
    )
    .boxed();
    Ok(Response::from_parts(parts, body))
}

static CONNECTION_SPECIFIC: [header::HeaderName; 5] = [
    header::CONNECTION,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::HeaderName::from_static("keep-alive"),
    header::HeaderName::from_static("proxy-connection"),
];

/// What hyper lets through but an intermediary must not pass on: a transfer coding other
/// than `chunked` (hyper decodes the chunks and would drop the rest, `gzip` say, so the origin
/// would take compressed bytes for plain ones: 501, RFC 9112 6.1, as nginx answers); over h2
/// and HTTP/3, values with white space at either end (malformed, RFC 9113 8.2.1) and
/// Content-Length fields that disagree (one is kept when they agree).
fn check_fields(req: &Request<ClientIn>, head_size: usize) -> Result<(), ProxyError> {
    if head_size > crate::edge::MAX_HEADER_SECTION {
        return Err(ProxyError::HeaderSectionTooLarge(head_size));
    }
    let h = req.headers();
    match req.version() {
        Version::HTTP_2 | Version::HTTP_3 => {
            // The h2 crate refuses connection-specific fields; h3 lets them through, though
            // RFC 9114 4.2 makes such a request malformed.
            let te = h.get(header::TE).is_some_and(|v| v != "trailers");
            if te || CONNECTION_SPECIFIC.iter().any(|n| h.contains_key(n)) {
                return Err(ProxyError::BadRequest("a connection-specific field"));
            }
            let padded = |v: &HeaderValue| {
                let b = v.as_bytes();
                matches!(b.first(), Some(b' ' | b'\t')) || matches!(b.last(), Some(b' ' | b'\t'))
            };
            if h.values().any(padded) {
                return Err(ProxyError::BadRequest(
                    "a field value with white space at either end",
                ));
            }
            let mut lengths = h.get_all(header::CONTENT_LENGTH).iter();
            if let Some(first) = lengths.next() {
                if lengths.any(|v| v != first) {
                    return Err(ProxyError::BadRequest("conflicting Content-Length"));
                }
            }
        }
        _ => {
            // hyper framed the body by the last coding, chunked; whatever else is listed is
            // still applied to what reaches the origin.
            let mut chunked = 0;
            for c in headers::list_tokens(h.get_all(header::TRANSFER_ENCODING)) {
                if !c.eq_ignore_ascii_case(b"chunked") {
                    return Err(ProxyError::NotImplemented(
                        "a transfer coding other than chunked",
                    ));
                }
                chunked += 1;
            }
            if chunked > 1 {
                // RFC 9112 7: chunked is applied once; twice, the origin would take the inner
                // framing as content.
                return Err(ProxyError::BadRequest("chunked more than once"));
            }
        }
    }
    Ok(())
}

/// A request that arrived in TLS early data (RFC 8470): an attacker may have replayed it, so
/// only a safe method without a body goes on (marked `Early-Data: 1` for the origin, which
/// may answer 425 itself, by `upstream_request`); anything else gets 425 and the client sends
/// it again after the handshake.
fn accept_early(req: &Request<ClientIn>, tunnel: bool) -> Result<(), ProxyError> {
    let safe = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !safe || tunnel || !http_body::Body::is_end_stream(req.body()) {
        return Err(ProxyError::TooEarly(req.method().clone()));
    }
    Ok(())
}

/// An HTTP/1.1 `Upgrade` request (WebSocket and friends): an `Upgrade` header and the
/// `upgrade` token in `Connection`.
pub(crate) fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && headers::list_tokens(req.headers().get_all(header::UPGRADE))
            // h2c (retired by RFC 9113, meaningless over TLS) is ignored as RFC 9110 7.8
            // lets a server ignore Upgrade: the request goes on as a plain one, so a tunnel
            // cannot carry requests past routing ("h2c smuggling").
            .any(|p| !p.eq_ignore_ascii_case(b"h2c"))
        && headers::has_token(req.headers(), header::CONNECTION, "upgrade")
}

/// `Server-Timing: pool;dur=<ms>, upstream;dur=<ms>;desc="warm|fresh|resumed"`: time to get
/// a connection, then the upstream time to the response head. A connection's first request,
/// which waited for the client's handshake, also gets `tls;dur=<ms>;desc="full|resumed|early|
/// quic"` (its first byte to the request being readable).
fn add_server_timing(
    h: &mut header::HeaderMap,
    client: &ClientConn,
    waited: Duration,
    total: Duration,
    w: Warmth,
) {
    let pool_ms = waited.as_secs_f64() * 1000.0;
    let up_ms = total.saturating_sub(waited).as_secs_f64() * 1000.0;
    let tls = match (client.handshake, client.handshake_time) {
        (Some(kind), Some(t)) if client.request == 1 => format!(
            "tls;dur={:.3};desc=\"{}\", ",
            t.as_secs_f64() * 1000.0,
            kind.label()
        ),
        _ => String::new(),
    };
    let v = format!(
        "{tls}pool;dur={pool_ms:.3}, upstream;dur={up_ms:.3};desc=\"{}\"",
        w.as_str()
    );
    if let Ok(v) = HeaderValue::from_str(&v) {
        h.append(&headers::SERVER_TIMING, v);
    }
}

/// The client's body as it is sent upstream, unchanged.
pub(super) fn plain_body(req: Request<ClientIn>) -> Request<UpBody> {
    req.map(|b| b.boxed_unsync())
}

/// The client's body as it is sent upstream, watched for pauses longer than `idle` and for
/// its end (see [`BodyProgress`]); an empty body needs neither.
fn client_body(
    req: Request<ClientIn>,
    idle: Duration,
    route: &Route,
) -> (Request<UpBody>, Option<Arc<BodyProgress>>) {
    use http_body::Body;
    if req.body().is_end_stream() {
        return (plain_body(req), None);
    }
    let (parts, body) = req.into_parts();
    let linger = parts
        .extensions
        .get::<crate::edge::linger::LingerHint>()
        .cloned();
    let edited = (!route.request_headers.is_empty()).then(|| route.request_headers.clone());
    let (body, progress) = ClientBody::new(body, idle, route.max_body_size, linger, edited);
    (
        Request::from_parts(parts, body.boxed_unsync()),
        Some(progress),
    )
}

/// The body length the client declared (Content-Length), if any.
fn declared_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The request as it leaves the edge, in origin form with a Host header; [`for_protocol`]
/// turns it into what the chosen origin's protocol needs.
pub(super) fn upstream_request(
    rt: &Runtime,
    req: Request<UpBody>,
    client: &ClientConn,
    authority: &str,
    route: &Route,
) -> Result<Request<UpBody>, ProxyError> {
    let (mut parts, body) = req.into_parts();
    let path = parts
        .uri
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if !path.starts_with('/') {
        // OPTIONS * and other non-origin-form targets have no meaning behind a route.
        return Err(ProxyError::BadRequest("unsupported request target"));
    }
    parts.uri = Uri::builder()
        .path_and_query(path.as_str())
        .build()
        .map_err(|_| ProxyError::BadRequest("invalid request target"))?;
    let client_version = parts.version;
    headers::strip_hop_by_hop(&mut parts.headers, true);
    if let Some(len) = parts.headers.get(header::CONTENT_LENGTH).cloned() {
        // Several that agree (h2 lets them through; check_fields refused the others).
        parts.headers.insert(header::CONTENT_LENGTH, len);
    }
    if parts.extensions.get::<super::EarlyData>().is_some() {
        // After the hop-by-hop strip: `Connection: early-data` must not remove the mark.
        parts
            .headers
            .insert("early-data", HeaderValue::from_static("1"));
    }
    headers::set_forwarded(&mut parts.headers, &client.fields);
    headers::append_via(&mut parts.headers, client_version, &rt.via);
    headers::apply_edits(&mut parts.headers, &route.request_headers);
    let host =
        HeaderValue::from_str(authority).map_err(|_| ProxyError::BadRequest("invalid Host"))?;
    parts.headers.insert(header::HOST, host);
    parts.version = Version::HTTP_11;
    Ok(Request::from_parts(parts, body))
}

/// h2 upstream: absolute URI (becomes :scheme/:authority), no Host header; http/1.1: origin
/// form with Host, and a kept `TE: trailers` named in `Connection` (RFC 9110 10.1.4), so an
/// http/1.1 origin sends its trailers.
fn for_protocol(mut req: Request<UpBody>, protocol: Protocol, authority: &str) -> Request<UpBody> {
    match protocol {
        Protocol::H2 => {
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            if let Ok(uri) = Uri::builder()
                .scheme("https")
                .authority(authority)
                .path_and_query(path)
                .build()
            {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(header::HOST);
            // An earlier http/1.1 attempt (a failover) may have named TE in Connection.
            req.headers_mut().remove(header::CONNECTION);
            *req.version_mut() = Version::HTTP_2;
        }
        Protocol::Http1 => {
            if let Some(p) = req.uri().path_and_query().cloned() {
                *req.uri_mut() = Uri::from(p);
            }
            headers::join_cookies(req.headers_mut());
            if req.headers().contains_key(header::TE) {
                req.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("te"));
            }
            if !req.headers().contains_key(header::HOST) {
                if let Ok(h) = HeaderValue::from_str(authority) {
                    req.headers_mut().insert(header::HOST, h);
                }
            }
            *req.version_mut() = Version::HTTP_11;
        }
    }
    req
}

/// Retries per request of a bodiless idempotent request that may have reached the origin.
/// More than one, because when an origin crashes every pooled connection is dead at once and
/// the first retry may pick a sibling that is not yet known dead.
const MAX_RETRIES: u32 = 2;

/// Retries per request when the origin proved it did not process the request (or it never
/// left). A larger budget: an origin restarting gracefully sends GOAWAY on every connection
/// at once, and each failed attempt retires the connection it used, so the retries walk the
/// going-away connections and then land on fresh ones.
const MAX_PROVEN_RETRIES: u32 = 8;

/// Longest wait, after a refusal, for the rest of a small body to come from the client so
/// the request can be sent again whole.
const REPLAY_SETTLE: Duration = Duration::from_secs(2);

struct Sent<'a> {
    response: Response<crate::pool::ResponseBody>,
    guard: StreamGuard,
    pool: &'a Pool,
    waited: Duration,
    warmth: Warmth,
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

/// Copy of a bodiless request, kept so it can be sent again when the first attempt fails in
/// a way that proves (any method) or allows (idempotent methods) a retry.
fn replayable(req: &Request<UpBody>) -> Option<Request<UpBody>> {
    use http_body::Body;
    if !req.body().is_end_stream() {
        return None;
    }
    let empty = http_body_util::Empty::new()
        .map_err(|never| match never {})
        .boxed_unsync();
    Some(super::replay::with_head(req, empty))
}

/// The origin did not answer (or, during the upload, did not read) within its limit.
struct FirstByteTimedOut;

/// Waits for the response head. The first-byte clock starts once the request body (if any)
/// has been handed over whole, so a long upload is not an origin timeout; while it streams,
/// an origin that takes none of it for the same limit is one. Takes the send pinned by the
/// caller: one copy of it in the request's future, not three.
async fn first_byte<F: std::future::Future>(
    mut send: std::pin::Pin<&mut F>,
    limit: Duration,
    body: Option<&BodyProgress>,
) -> Result<F::Output, FirstByteTimedOut> {
    if let Some(body) = body {
        body.start();
        loop {
            tokio::select! {
                biased;
                out = send.as_mut() => return Ok(out),
                () = body.ended() => break,
                () = tokio::time::sleep_until(body.next_check(limit)) => {
                    if body.origin_stalled(limit) {
                        return Err(FirstByteTimedOut);
                    }
                }
            }
        }
    }
    tokio::time::timeout(limit, send)
        .await
        .map_err(|_| FirstByteTimedOut)
}

/// The request to send to the route's next origin after this one failed it (no answer in
/// time, or errors past the retries): only a bodiless idempotent request, as nginx's
/// `proxy_next_upstream error timeout` does, and only if there is a next origin.
fn failover(
    replay: &mut Option<Request<UpBody>>,
    last_candidate: bool,
    method: &Method,
) -> Option<Request<UpBody>> {
    if last_candidate || !is_idempotent(method) {
        return None;
    }
    replay.take()
}

/// Sends on the first candidate that gives a connection; see the module doc for retries.
async fn send<'a>(
    candidates: &[&'a Pool],
    req: Request<UpBody>,
    authority: &str,
    body: Option<&BodyProgress>,
) -> Result<Sent<'a>, ProxyError> {
    // A small body is kept as it goes, for an h2 origin's refusal that comes after it went
    // (an http/1.1 origin never says it did not process a request).
    let h2 = candidates
        .iter()
        .any(|p| p.origin().protocol == Protocol::H2);
    let (mut req, kept) = if !h2 || http_body::Body::is_end_stream(req.body()) {
        (req, None)
    } else {
        Replay::record(req)
    };
    let mut retries = 0;
    let mut proven_retries = 0;
    let mut error_goaway_retried = false;
    let mut waited = Duration::ZERO;
    let mut i = 0;
    loop {
        let Some(&pool) = candidates.get(i) else {
            return Err(ProxyError::MisdirectedHost(authority.to_string()));
        };
        let last_candidate = i + 1 == candidates.len();
        let checkout_started = Instant::now();
        let lease = match pool.checkout(last_candidate).await {
            Ok(l) => l,
            // Nothing was sent: any request may move on (HAProxy's `option redispatch`, nginx
            // moving past a server at `max_conns`), a farther origin being better than a 503.
            Err(
                e @ (CheckoutError::Connect(_)
                | CheckoutError::QueueFull { .. }
                | CheckoutError::QueueTimeout { .. }
                | CheckoutError::Closed { .. }),
            ) if !last_candidate => {
                tracing::debug!(origin = %pool.origin().name, error = %e, "failing over to the next origin");
                // The time spent on this origin is pool wait for the one that answers, not
                // its upstream time.
                waited += checkout_started.elapsed();
                i += 1;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let warmth = lease.warmth();
        waited += lease.waited();
        let out = for_protocol(req, pool.origin().protocol, authority);
        let mut replay =
            if retries < MAX_RETRIES || proven_retries < MAX_PROVEN_RETRIES || !last_candidate {
                replayable(&out)
            } else {
                None
            };
        let method = out.method().clone();
        let limit = pool.origin().first_byte_timeout;
        let sending = lease.send(out);
        tokio::pin!(sending);
        match first_byte(sending, limit, body).await {
            Ok(Ok((response, guard))) => {
                pool.record_success();
                return Ok(Sent {
                    response,
                    guard,
                    pool,
                    waited,
                    warmth,
                });
            }
            Ok(Err(_)) if body.is_some_and(|b| b.failed()) => {
                // The client stopped sending (or broke) its body: not the origin's fault.
                let e = body.and_then(BodyProgress::client_error);
                return Err(ProxyError::ClientBody(
                    e.unwrap_or(ClientBodyError::Aborted),
                ));
            }
            Ok(Err(SendError { source, request })) => {
                let proven = proven_retries < MAX_PROVEN_RETRIES;
                // A GOAWAY with an error code (ENHANCE_YOUR_CALM, PROTOCOL_ERROR, ...) may be
                // this request's doing, a header list the origin will not take, say: each
                // attempt would close another pooled connection, so it goes again once at
                // most (the connection may have died of another stream).
                let error_goaway = source.refused_with_error();
                let refused =
                    source.not_processed() && proven && !(error_goaway && error_goaway_retried);
                let next = match request {
                    // Never left this process: safe for any method.
                    Some(r) if proven => Some((r, true)),
                    // The origin says it did not process the stream (REFUSED_STREAM, or a
                    // GOAWAY whose last-stream-id is below it): safe for any method, with
                    // its body if that was kept whole.
                    None if refused => {
                        error_goaway_retried |= error_goaway;
                        let again = match (replay.take(), &kept) {
                            (Some(r), _) => Some(r),
                            (None, Some(k)) => k.settled(REPLAY_SETTLE).await,
                            (None, None) => None,
                        };
                        if again.is_none() {
                            // The client's body failed meanwhile (too large, cut, too slow):
                            // its error, not the origin's.
                            if let Some(e) = body.and_then(BodyProgress::client_error) {
                                return Err(ProxyError::ClientBody(e));
                            }
                        }
                        again.map(|r| (r, true))
                    }
                    // May have reached the origin: only a bodiless idempotent request (its
                    // body, if any, is gone). Fresh connections too: an origin that is going
                    // down may accept a connection and drop it before answering.
                    None if !error_goaway && retries < MAX_RETRIES && is_idempotent(&method) => {
                        replay.take().map(|r| (r, false))
                    }
                    _ => None,
                };
                match next {
                    Some((r, was_proven)) => {
                        tracing::debug!(origin = %pool.origin().name, error = %source, "retrying on another connection");
                        if was_proven {
                            proven_retries += 1;
                        } else {
                            retries += 1;
                        }
                        pool.record_retry();
                        req = r;
                    }
                    _ => {
                        tracing::debug!(origin = %pool.origin().name, error = ?source, "upstream send failed");
                        // A stream the origin refused unprocessed and gracefully (REFUSED_STREAM,
                        // or above a NO_ERROR GOAWAY's last stream: nginx sends one every 1,000
                        // requests) says nothing of its health, as in Envoy's outlier
                        // detection; one refused every time it was tried does.
                        if !source.graceful_refusal() || proven_retries >= MAX_PROVEN_RETRIES {
                            pool.record_failure();
                        }
                        if let Some(r) = failover(&mut replay, last_candidate, &method) {
                            req = r;
                            i += 1;
                            continue;
                        }
                        return Err(ProxyError::Upstream {
                            origin: pool.origin().name.clone(),
                            source,
                        });
                    }
                }
            }
            Err(FirstByteTimedOut) => {
                pool.record_failure();
                if let Some(r) = failover(&mut replay, last_candidate, &method) {
                    tracing::debug!(origin = %pool.origin().name, after = ?limit, "no response head in time; failing over to the next origin");
                    req = r;
                    i += 1;
                    continue;
                }
                return Err(ProxyError::FirstByteTimeout {
                    origin: pool.origin().name.clone(),
                    after: limit,
                });
            }
        }
    }
}
