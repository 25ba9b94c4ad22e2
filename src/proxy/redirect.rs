//! Requests on a plain-HTTP listener (`redirect_to_https`): each is answered with a redirect
//! to the same host and target over HTTPS, as nginx's `return 301 https://$host$request_uri`
//! and HAProxy's `redirect scheme https` do. GET and HEAD get 301; other methods get 308, so
//! a POST stays a POST with its body. A host no route serves gets 421, as on HTTPS, so the
//! edge never redirects for names it does not serve. ACME HTTP-01 challenges are the
//! exception: they go to the route's origins like any request (see [`is_acme_challenge`]).

use super::body::{full, ProxyBody};
use super::error::ProxyError;
use super::handler::{error_response, target_host};
use super::request_body::ClientIn;
use super::{ClientConn, Runtime};
use crate::access_log::PendingLog;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use tokio::time::Instant;

/// The path under which ACME HTTP-01 challenges are fetched (RFC 8555 8.3).
const ACME_CHALLENGE: &str = "/.well-known/acme-challenge/";

/// A certificate authority's HTTP-01 check: forwarded to the origin (the only place that
/// knows the token) over plain HTTP's own route, so a CA that reaches any PoP reaches it.
/// Only what a CA sends qualifies: a GET (or HEAD) of exactly one base64url token (RFC 8555
/// 8.3) without a query or an upgrade, so no `..`, `%2e`, other path or tunnel reaches the
/// origin in plain HTTP.
pub fn is_acme_challenge<B>(req: &Request<B>) -> bool {
    let token = req.uri().path().strip_prefix(ACME_CHALLENGE);
    (req.method() == Method::GET || req.method() == Method::HEAD)
        && req.uri().query().is_none()
        && !req.headers().contains_key(header::UPGRADE)
        && token.is_some_and(|t| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// The redirect for one request (or the 4xx for a request that cannot have one), counted
/// and logged like a forwarded request.
pub fn to_https(
    rt: &Runtime,
    mut req: Request<ClientIn>,
    client: ClientConn,
    https_port: u16,
) -> Response<ProxyBody> {
    let received = Instant::now();
    // For the log: an ID the client sent is not trusted (see `headers::set_request_id`).
    super::headers::set_request_id(req.headers_mut());
    let log = rt
        .access_log
        .as_ref()
        .map(|l| PendingLog::new(l, &req, &client));
    let (resp, bytes, outcome) = match location(rt, &req, https_port) {
        Ok(to) => (redirect(req.method(), to), 0, "https redirect"),
        Err(e) => {
            let reason = e.public_reason();
            (error_response(&e), reason.len() as u64 + 1, reason)
        }
    };
    if let Some(mut l) = log {
        l.status(resp.status().as_u16());
        l.finish(bytes, outcome);
    }
    rt.counters
        .record(resp.status().as_u16(), received.elapsed());
    resp
}

/// `https://<host>[:port]<target>` for a host some route serves.
fn location(
    rt: &Runtime,
    req: &Request<ClientIn>,
    https_port: u16,
) -> Result<HeaderValue, ProxyError> {
    if req.method() == Method::CONNECT {
        return Err(ProxyError::ConnectMethod);
    }
    let (host, _) = target_host(req)?;
    // A host name's characters only, so nothing a URL parser would read as the end of the
    // host (`#`, `?`, `\`, `%`) can ride in a wildcard route's first label into `Location`.
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    {
        return Err(ProxyError::BadRequest("invalid Host"));
    }
    if rt.router.route_for(&host).is_none() {
        return Err(ProxyError::MisdirectedHost(host));
    }
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    if !target.starts_with('/') {
        return Err(ProxyError::BadRequest("unsupported request target"));
    }
    // The host without the client's port (that was the plain one); 443 goes unsaid.
    let port = match https_port {
        443 => String::new(),
        p => format!(":{p}"),
    };
    HeaderValue::from_str(&format!("https://{host}{port}{target}"))
        .map_err(|_| ProxyError::BadRequest("invalid request target"))
}

fn redirect(method: &Method, to: HeaderValue) -> Response<ProxyBody> {
    let status = if method == Method::GET || method == Method::HEAD {
        StatusCode::MOVED_PERMANENTLY
    } else {
        StatusCode::PERMANENT_REDIRECT
    };
    let mut resp = Response::new(full(String::new()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(header::LOCATION, to);
    resp
}
