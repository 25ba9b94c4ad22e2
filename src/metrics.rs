//! Every metric name in one place, and the Prometheus text exposition of the edge. Request
//! counters are plain atomics (no lock on the request path); the registry is built at scrape
//! time from them and from the pool snapshots.

use crate::pool::PoolSnapshot;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const REQUESTS: &str = "edgepop_requests";
pub const DRAINING: &str = "edgepop_draining";
pub const CLIENT_CONNECTIONS: &str = "edgepop_client_connections";
pub const ACCESS_LOG_DROPPED: &str = "edgepop_access_log_dropped";
pub const UPSTREAM_OPEN: &str = "edgepop_upstream_open_connections";
pub const UPSTREAM_IDLE: &str = "edgepop_upstream_idle_connections";
pub const UPSTREAM_BUSY: &str = "edgepop_upstream_busy_connections";
pub const UPSTREAM_WARM_TARGET: &str = "edgepop_upstream_warm_target";
pub const UPSTREAM_OPENED: &str = "edgepop_upstream_connections_opened";
pub const UPSTREAM_FAILED: &str = "edgepop_upstream_connect_failures";
pub const UPSTREAM_REUSED: &str = "edgepop_upstream_reused";
pub const UPSTREAM_HANDSHAKES: &str = "edgepop_upstream_tls_handshakes";
pub const ORIGIN_UP: &str = "edgepop_origin_up";

/// Responses by status class, counted on the request path.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    by_class: [AtomicU64; 6],
    /// Client connections open now (all listeners), TLS handshakes included.
    pub client_connections: std::sync::atomic::AtomicUsize,
    /// Access-log entries dropped, shared with every access-log writer of the process so the
    /// counter survives a reload that turns the log off and on again.
    pub access_log_dropped: Arc<AtomicU64>,
}

impl EdgeCounters {
    pub fn record(&self, status: u16) {
        let i = usize::from(status / 100).min(5);
        self.by_class[i].fetch_add(1, Ordering::Relaxed);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OriginLabel {
    origin: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandshakeLabel {
    origin: String,
    kind: String,
}

/// A metric read off a pool snapshot: name, help, accessor.
type SnapshotMetric<T> = (&'static str, &'static str, fn(&PoolSnapshot) -> T);

fn gauge(v: usize) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// Renders the edge's metrics in the Prometheus text format.
pub fn render_edge(
    counters: &EdgeCounters,
    pools: &[PoolSnapshot],
    draining: bool,
    access_log_dropped: Option<u64>,
) -> String {
    let mut reg = Registry::default();
    let requests = Family::<ClassLabel, Counter>::default();
    for (i, c) in counters.by_class.iter().enumerate().skip(1) {
        requests
            .get_or_create(&ClassLabel {
                code: format!("{i}xx"),
            })
            .inc_by(c.load(Ordering::Relaxed));
    }
    reg.register(
        REQUESTS,
        "Responses sent to clients, by status class",
        requests,
    );
    let open = Gauge::<i64>::default();
    open.set(gauge(counters.client_connections.load(Ordering::Relaxed)));
    reg.register(
        CLIENT_CONNECTIONS,
        "Client connections open now (TLS handshakes included)",
        open,
    );
    let d = Gauge::<i64>::default();
    d.set(i64::from(draining));
    reg.register(DRAINING, "1 while the edge drains", d);
    if let Some(n) = access_log_dropped {
        let c = Counter::<u64>::default();
        c.inc_by(n);
        reg.register(
            ACCESS_LOG_DROPPED,
            "Access-log entries dropped because the writer fell behind",
            c,
        );
    }

    let gauges: [SnapshotMetric<i64>; 5] = [
        (UPSTREAM_OPEN, "Open upstream connections", |p| {
            gauge(p.open)
        }),
        (UPSTREAM_IDLE, "Idle upstream connections", |p| {
            gauge(p.idle)
        }),
        (UPSTREAM_BUSY, "Busy upstream connections", |p| {
            gauge(p.busy)
        }),
        (
            UPSTREAM_WARM_TARGET,
            "Connections kept open at all times",
            |p| gauge(p.warm_target),
        ),
        (ORIGIN_UP, "1 if the origin is healthy", |p| {
            i64::from(p.healthy)
        }),
    ];
    for (name, help, f) in gauges {
        let fam = Family::<OriginLabel, Gauge<i64>>::default();
        for p in pools {
            fam.get_or_create(&OriginLabel {
                origin: p.origin.clone(),
            })
            .set(f(p));
        }
        reg.register(name, help, fam);
    }
    let counters: [SnapshotMetric<u64>; 3] = [
        (UPSTREAM_OPENED, "Upstream connections opened", |p| {
            p.opened_total
        }),
        (UPSTREAM_FAILED, "Upstream connects that failed", |p| {
            p.failed_total
        }),
        (
            UPSTREAM_REUSED,
            "Requests that found a warm connection",
            |p| p.reused_total,
        ),
    ];
    for (name, help, f) in counters {
        let fam = Family::<OriginLabel, Counter>::default();
        for p in pools {
            fam.get_or_create(&OriginLabel {
                origin: p.origin.clone(),
            })
            .inc_by(f(p));
        }
        reg.register(name, help, fam);
    }
    let hs = Family::<HandshakeLabel, Counter>::default();
    for p in pools {
        for (kind, v) in [
            ("full", p.handshakes_full),
            ("resumed", p.handshakes_resumed),
        ] {
            hs.get_or_create(&HandshakeLabel {
                origin: p.origin.clone(),
                kind: kind.into(),
            })
            .inc_by(v);
        }
    }
    reg.register(UPSTREAM_HANDSHAKES, "Upstream TLS handshakes by kind", hs);
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}
