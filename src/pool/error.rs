//! Pool errors: opening a connection, getting one, and sending on one.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("resolving origin {address}: {source}")]
    Resolve {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to origin {address}: {source}")]
    Tcp {
        address: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with origin {address} (SNI {server_name}): {source}")]
    Tls {
        address: String,
        server_name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("origin {address} did not negotiate h2 via ALPN")]
    Alpn { address: String },
    #[error("HTTP handshake with origin {address}: {source}")]
    Handshake {
        address: String,
        #[source]
        source: hyper::Error,
    },
    #[error("h2 handshake with origin {address}: {source}")]
    H2Handshake {
        address: String,
        #[source]
        source: h2::Error,
    },
    #[error("connecting to origin {address}: timed out after {after:?}")]
    Timeout { address: String, after: Duration },
}

impl ConnectError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, ConnectError::Timeout { .. })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CheckoutError {
    #[error("no upstream connection for origin {origin} within {after:?} (all {max} in use)")]
    QueueTimeout {
        origin: String,
        after: Duration,
        max: usize,
    },
    #[error("origin {origin}: request queue is full ({size} waiting, its queue_size)")]
    QueueFull { origin: String, size: usize },
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("origin {origin}: pool is shut down")]
    Closed { origin: String },
}

/// A request failed on an upstream connection.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Http1(hyper::Error),
    #[error(transparent)]
    H2(h2::Error),
}

impl UpstreamError {
    /// The origin says it did not process the request: REFUSED_STREAM, or a GOAWAY whose
    /// last-stream-id is below the stream.
    /// Refused unprocessed and gracefully: REFUSED_STREAM, or a GOAWAY with NO_ERROR (an
    /// origin closing after its request limit), which say nothing of the origin's health.
    pub fn graceful_refusal(&self) -> bool {
        match self {
            UpstreamError::H2(e) => {
                self.not_processed()
                    && (e.reason() == Some(h2::Reason::REFUSED_STREAM)
                        || e.reason() == Some(h2::Reason::NO_ERROR))
            }
            UpstreamError::Http1(_) => false,
        }
    }

    /// Not processed, but refused with an error code (a GOAWAY with ENHANCE_YOUR_CALM,
    /// PROTOCOL_ERROR, ...): perhaps the request's own doing.
    pub fn refused_with_error(&self) -> bool {
        self.not_processed() && !self.graceful_refusal()
    }

    pub fn not_processed(&self) -> bool {
        match self {
            UpstreamError::H2(e) => {
                e.is_remote() && (e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away())
            }
            UpstreamError::Http1(_) => false,
        }
    }
}
