//! Proxy errors know where they came from and map, in one exhaustive match, to the status
//! the client sees with a short plain-text reason.

use crate::pool::{CheckoutError, ConnectError};
use hyper::StatusCode;
use std::time::Duration;

/// Who caused a failure: decides the status family and what gets logged at which level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    Client,
    Origin,
    Internal,
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("request header section of {0} bytes, over the cap")]
    HeaderSectionTooLarge(usize),
    #[error("not implemented: {0}")]
    NotImplemented(&'static str),
    #[error("CONNECT is not supported: edgepop is not a forward proxy (only RFC 8441 WebSocket)")]
    ConnectMethod,
    #[error("no connection slot left for another WebSocket tunnel")]
    TunnelLimit,
    #[error("origin {origin}: WebSocket handshake failed: {reason}")]
    BadWebSocketHandshake {
        origin: String,
        reason: &'static str,
    },
    #[error("{0} request in TLS early data: not safe to replay, the client must send it after the handshake")]
    TooEarly(hyper::Method),
    #[error("no route serves host {0:?}")]
    MisdirectedHost(String),
    #[error(transparent)]
    NoCapacity(CheckoutError),
    #[error(transparent)]
    ConnectTimeout(CheckoutError),
    #[error(transparent)]
    Connect(CheckoutError),
    #[error("origin {origin}: {source}")]
    Upstream {
        origin: String,
        #[source]
        source: crate::pool::UpstreamError,
    },
    #[error("origin {origin}: {reason}")]
    BadResponse {
        origin: String,
        reason: &'static str,
    },
    #[error("origin {origin}: no response head within {after:?}")]
    FirstByteTimeout { origin: String, after: Duration },
    #[error(transparent)]
    ClientBody(super::request_body::ClientBodyError),
    #[error("client over the route's rate_limit; may retry in {0:?}")]
    RateLimited(Duration),
}

impl From<CheckoutError> for ProxyError {
    fn from(e: CheckoutError) -> Self {
        match &e {
            CheckoutError::QueueFull { .. }
            | CheckoutError::QueueTimeout { .. }
            | CheckoutError::Closed { .. } => ProxyError::NoCapacity(e),
            CheckoutError::Connect(ConnectError::Timeout { .. }) => ProxyError::ConnectTimeout(e),
            CheckoutError::Connect(_) => ProxyError::Connect(e),
        }
    }
}

impl ProxyError {
    pub fn source_kind(&self) -> ErrorSource {
        match self {
            ProxyError::BadRequest(_)
            | ProxyError::HeaderSectionTooLarge(_)
            | ProxyError::NotImplemented(_)
            | ProxyError::ConnectMethod
            | ProxyError::MisdirectedHost(_)
            | ProxyError::TooEarly(_)
            | ProxyError::ClientBody(_)
            | ProxyError::RateLimited(_) => ErrorSource::Client,
            ProxyError::NoCapacity(_) | ProxyError::TunnelLimit => ErrorSource::Internal,
            ProxyError::ConnectTimeout(_)
            | ProxyError::Connect(_)
            | ProxyError::Upstream { .. }
            | ProxyError::BadWebSocketHandshake { .. }
            | ProxyError::BadResponse { .. }
            | ProxyError::FirstByteTimeout { .. } => ErrorSource::Origin,
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ProxyError::HeaderSectionTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ProxyError::NotImplemented(_) => StatusCode::NOT_IMPLEMENTED,
            ProxyError::ConnectMethod => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            ProxyError::TooEarly(_) => StatusCode::TOO_EARLY,
            ProxyError::RateLimited(_) => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::ClientBody(super::request_body::ClientBodyError::Timeout(_)) => {
                StatusCode::REQUEST_TIMEOUT
            }
            ProxyError::ClientBody(super::request_body::ClientBodyError::Aborted) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ClientBody(super::request_body::ClientBodyError::TooLarge(_)) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ProxyError::NoCapacity(_) | ProxyError::TunnelLimit => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Connect(_)
            | ProxyError::Upstream { .. }
            | ProxyError::BadWebSocketHandshake { .. }
            | ProxyError::BadResponse { .. } => StatusCode::BAD_GATEWAY,
            ProxyError::ConnectTimeout(_) | ProxyError::FirstByteTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
        }
    }

    /// The short reason in the response body: says what failed without leaking addresses.
    pub fn public_reason(&self) -> &'static str {
        match self {
            ProxyError::BadRequest(r) | ProxyError::NotImplemented(r) => r,
            // As for the http/1.1 heads hyper refuses (`edge::conn`).
            ProxyError::HeaderSectionTooLarge(_) => "header section too large",
            ProxyError::ConnectMethod => "CONNECT is not supported",
            ProxyError::MisdirectedHost(_) => "this server does not serve the requested host",
            ProxyError::TooEarly(_) => "too early: send this request again after the TLS handshake",
            ProxyError::RateLimited(_) => "too many requests",
            ProxyError::NoCapacity(_) => "no upstream capacity",
            ProxyError::TunnelLimit => "too many open connections",
            ProxyError::ConnectTimeout(_) => "upstream connect timed out",
            ProxyError::Connect(_) => "upstream connect failed",
            ProxyError::Upstream { .. } => "upstream request failed",
            ProxyError::BadWebSocketHandshake { .. } => "upstream WebSocket handshake failed",
            ProxyError::BadResponse { .. } => "upstream response not understood",
            ProxyError::FirstByteTimeout { .. } => "upstream response timed out",
            ProxyError::ClientBody(super::request_body::ClientBodyError::Timeout(_)) => {
                "request body timed out"
            }
            ProxyError::ClientBody(super::request_body::ClientBodyError::Aborted) => {
                "request body incomplete"
            }
            ProxyError::ClientBody(super::request_body::ClientBodyError::TooLarge(_)) => {
                "request body too large"
            }
        }
    }
}
