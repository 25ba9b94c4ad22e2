//! The request path inside the edge: `router` (Host -> route), `handler` (choose origin,
//! check out a pooled connection, forward, retry when safe), `headers`, `body`, `error`.

pub mod body;
pub mod error;
pub mod handler;
pub mod headers;
pub mod rate_limit;
pub mod redirect;
pub mod replay;
pub mod request_body;
pub mod router;
mod stall;
pub mod upgrade;

use crate::config::{EdgeConfig, PopConfig};
use crate::metrics::EdgeCounters;
use crate::pool::Pool;
use hyper::header::HeaderValue;
use router::Router;
use std::sync::Arc;
use std::time::Duration;

/// Marks a request that arrived before its client's TLS handshake completed (0-RTT early
/// data): it may be a replay, so only a safe one is forwarded, flagged `Early-Data: 1`.
#[derive(Debug, Clone, Copy)]
pub struct EarlyData;

/// The client connection a request came on.
#[derive(Debug, Clone)]
pub struct ClientConn {
    /// The client's address (a PROXY protocol header's when the listener takes one).
    pub addr: std::net::SocketAddr,
    /// `None`: plain HTTP (a `redirect_to_https` listener).
    pub handshake: Option<crate::metrics::ClientHandshake>,
    /// From its first byte to the first request being readable; `None` while a QUIC handshake
    /// that began with 0-RTT is still under way.
    pub handshake_time: Option<Duration>,
    /// The request's number on its connection, from 1.
    pub request: u64,
    /// Its address and scheme as the origin is told them, made once per connection.
    pub fields: headers::ClientFields,
}

/// What a client connection allows a request's bodies (its listener's settings).
#[derive(Debug, Clone, Copy)]
pub struct ClientLimits {
    /// Longest pause while the client sends a request body.
    pub body_timeout: Duration,
    /// Longest an h2 client may take no data of one response (none for http/1.1 clients:
    /// there the connection's own send timeout covers it).
    pub stream_send_timeout: Option<Duration>,
}

/// Everything a request needs, immutable: a reload builds a new one and swaps it atomically.
pub struct Runtime {
    pub router: Router,
    /// Indexed like `EdgeConfig::origins`.
    pub pools: Vec<Pool>,
    pub server_timing: bool,
    pub via: HeaderValue,
    /// Carried from one runtime to the next on reload, so counters never reset.
    pub counters: Arc<EdgeCounters>,
    pub access_log: Option<crate::access_log::AccessLog>,
    /// The certificates in service and when they expire, for the metrics.
    pub certificates: Vec<crate::metrics::CertificateExpiry>,
}

impl Runtime {
    pub fn new(
        pop: &PopConfig,
        edge: &EdgeConfig,
        pools: Vec<Pool>,
        counters: Arc<EdgeCounters>,
        access_log: Option<crate::access_log::AccessLog>,
        previous: Option<&Runtime>,
    ) -> Self {
        let via = HeaderValue::from_str(&format!("edgepop-{}", pop.name))
            .unwrap_or_else(|_| HeaderValue::from_static("edgepop"));
        let router = Router::new(
            &edge.routes,
            previous.map(|p| &p.router),
            &counters.rate_limit_unrecorded,
        );
        Runtime {
            router,
            pools,
            server_timing: pop.server_timing,
            via,
            counters,
            access_log,
            certificates: crate::metrics::CertificateExpiry::of(edge),
        }
    }

    /// The origins to try for a route, in order: the healthy ones in failover order; if none
    /// is healthy, the first (try rather than fail without trying). Never routes to a down
    /// origin while an up one exists.
    pub fn candidates(&self, origins: &[usize]) -> Vec<&Pool> {
        let healthy: Vec<&Pool> = origins
            .iter()
            .filter_map(|&i| self.pools.get(i))
            .filter(|p| p.is_healthy())
            .collect();
        if healthy.is_empty() {
            origins
                .first()
                .and_then(|&i| self.pools.get(i))
                .into_iter()
                .collect()
        } else {
            healthy
        }
    }
}
