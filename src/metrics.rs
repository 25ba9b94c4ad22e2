//! Every metric name in one place, and the Prometheus text exposition of the edge. Request
//! counters are plain atomics (no lock on the request path); the registry is built at scrape
//! time from them and from the pool snapshots.

use crate::pool::PoolSnapshot;
use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub const REQUESTS: &str = "edgepop_requests";
pub const DRAINING: &str = "edgepop_draining";
pub const CLIENT_CONNECTIONS: &str = "edgepop_client_connections";
pub const REPLAY_BYTES: &str = "edgepop_replay_buffer_bytes";
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
pub const REQUEST_DURATION: &str = "edgepop_request_duration_seconds";
pub const UPSTREAM_RESPONSES: &str = "edgepop_upstream_responses";
pub const UPSTREAM_RESPONSE_TIME: &str = "edgepop_upstream_response_seconds";
pub const EARLY_DATA_REQUESTS: &str = "edgepop_early_data_requests";
pub const PROXY_HEADERS_REFUSED: &str = "edgepop_proxy_protocol_refused";
pub const PER_CLIENT_REFUSED: &str = "edgepop_per_client_limit_refused";
pub const RATE_LIMITED: &str = "edgepop_rate_limited";
pub const RATE_LIMIT_UNRECORDED: &str = "edgepop_rate_limit_unrecorded";
pub const CLIENT_HANDSHAKE_TIME: &str = "edgepop_client_handshake_seconds";
pub const CLIENT_HANDSHAKE_FAILURES: &str = "edgepop_client_handshake_failures";
pub const CERTIFICATE_EXPIRY: &str = "edgepop_certificate_expiry_timestamp_seconds";

/// A certificate in service and its notAfter, for `edgepop_certificate_expiry_timestamp_seconds`
/// (Envoy's `expiration_unix_time_seconds`): alert on `metric - time() < 14 * 86400`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateExpiry {
    /// "server" (presented to clients) or "client" (presented to an origin).
    pub usage: &'static str,
    /// The names it serves, or "origin <name>".
    pub certificate: String,
    pub not_after: i64,
}

impl CertificateExpiry {
    pub fn of(edge: &crate::config::EdgeConfig) -> Vec<CertificateExpiry> {
        use crate::tls::certs::Validity;
        let server = edge.certificates.iter().filter_map(|c| {
            Some(CertificateExpiry {
                usage: "server",
                certificate: c.names.join(","),
                not_after: Validity::of(c.key.cert.first()?)?.not_after,
            })
        });
        let client = edge.origins.iter().filter_map(|o| {
            Some(CertificateExpiry {
                usage: "client",
                certificate: format!("origin {}", o.name),
                not_after: Validity::of(o.client_auth.as_ref()?.chain.first()?)?.not_after,
            })
        });
        // The first certificate for a set of names is the one served (SNI takes the first
        // match): a later one with the same names (a rotation staged below the old one) would
        // otherwise hide the old one's expiry.
        let mut out: Vec<CertificateExpiry> = Vec::new();
        for c in server.chain(client) {
            if !out
                .iter()
                .any(|o| (o.usage, &o.certificate) == (c.usage, &c.certificate))
            {
                out.push(c);
            }
        }
        out
    }
}

/// A label value in the text exposition's escaping (backslash, double quote, newline), which
/// prometheus-client 0.22 leaves to the caller: origin names are free text.
fn escape(s: &str) -> String {
    if !s.contains(['\\', '"', '\n']) {
        return s.to_string();
    }
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CertificateLabel {
    usage: &'static str,
    certificate: String,
}

/// How a client's handshake went, for `edgepop_client_handshake_seconds{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientHandshake {
    /// TLS over TCP, a full handshake (a HelloRetryRequest included).
    Full,
    /// TLS over TCP, a resumed session.
    Resumed,
    /// TLS over TCP, resumed with 0-RTT data accepted: the first request was readable once
    /// the ClientHello was answered.
    Early,
    /// QUIC (HTTP/3): it does not tell whether the session was resumed.
    Quic,
}

impl ClientHandshake {
    const ALL: [ClientHandshake; 4] = [Self::Full, Self::Resumed, Self::Early, Self::Quic];

    pub fn label(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Resumed => "resumed",
            Self::Early => "early",
            Self::Quic => "quic",
        }
    }
}

/// Why a client's handshake failed, for `edgepop_client_handshake_failures_total{reason}`.
#[derive(Debug, Clone, Copy)]
pub enum HandshakeFailure {
    /// A TLS or QUIC error, or the client closed the connection.
    Error,
    /// Not done within the listener's `handshake_timeout`.
    Timeout,
}

/// Upper bounds of the latency histograms, in seconds: from a warm nearby origin (1 ms) to a
/// slow answer across an ocean (10 s).
const LATENCY_BOUNDS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A latency histogram on plain atomics: observed on the request path without a lock (the
/// crate's own histogram locks), rendered at scrape time.
#[derive(Debug, Default)]
pub struct Latency {
    counts: [AtomicU64; LATENCY_BOUNDS.len() + 1],
    sum_us: AtomicU64,
}

impl Latency {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = LATENCY_BOUNDS.partition_point(|&b| b < secs);
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
    }

    /// The counts per bucket (not cumulative; the last is above every bound) and the sum.
    pub fn snapshot(&self) -> LatencySnapshot {
        LatencySnapshot {
            counts: self
                .counts
                .iter()
                .map(|c| c.load(Ordering::Relaxed))
                .collect(),
            sum_us: self.sum_us.load(Ordering::Relaxed),
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct LatencySnapshot {
    counts: Vec<u64>,
    sum_us: u64,
}

/// A histogram's value set at scrape time, in the shape the text encoder wants.
#[derive(Debug, Default)]
struct HistogramValue(Mutex<LatencySnapshot>);

impl HistogramValue {
    fn set(&self, v: LatencySnapshot) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = v;
    }
}

impl TypedMetric for HistogramValue {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for HistogramValue {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let v = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        // f64::MAX is the encoder's +Inf bucket.
        let bounds = LATENCY_BOUNDS.iter().copied().chain([f64::MAX]);
        let buckets: Vec<(f64, u64)> = bounds.zip(v.counts.iter().copied()).collect();
        let count = v.counts.iter().sum();
        encoder.encode_histogram::<()>(v.sum_us as f64 / 1e6, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// Counts by status class (index = first digit; 0 unused).
#[derive(Debug, Default)]
pub struct StatusClasses([AtomicU64; 6]);

impl StatusClasses {
    pub fn record(&self, status: u16) {
        let i = usize::from(status / 100).min(5);
        self.0[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> [u64; 6] {
        std::array::from_fn(|i| self.0[i].load(Ordering::Relaxed))
    }
}

/// Responses by status class and their latency, counted on the request path.
#[derive(Debug, Default)]
pub struct EdgeCounters {
    by_class: StatusClasses,
    /// Request received to response head returned, every request.
    latency: Latency,
    /// Client connections open now (all listeners), TLS handshakes included.
    pub client_connections: std::sync::atomic::AtomicUsize,
    /// Access-log entries dropped, shared with every access-log writer of the process so the
    /// counter survives a reload that turns the log off and on again.
    pub access_log_dropped: Arc<AtomicU64>,
    /// Requests that arrived in TLS early data: forwarded, refused with 425.
    early_data: [AtomicU64; 2],
    /// Connections closed on a `proxy_protocol` listener for a missing or bad header.
    pub proxy_headers_refused: AtomicU64,
    /// Connections closed because their client held `max_connections_per_client` already.
    pub per_client_refused: AtomicU64,
    /// Requests answered 429: their client was over the route's `rate_limit`.
    pub rate_limited: AtomicU64,
    /// Requests a full rate-limit table served without counting them.
    pub rate_limit_unrecorded: Arc<AtomicU64>,
    /// Client handshake times by `ClientHandshake` (in its order), and failures by
    /// `HandshakeFailure`.
    handshakes: [Latency; 4],
    handshake_failures: [AtomicU64; 2],
}

impl EdgeCounters {
    pub fn record(&self, status: u16, took: Duration) {
        self.by_class.record(status);
        self.latency.observe(took);
    }

    /// A response with no latency to speak of (hyper answered a head it could not parse).
    pub fn record_status(&self, status: u16) {
        self.by_class.record(status);
    }

    pub fn record_early_data(&self, forwarded: bool) {
        self.early_data[usize::from(!forwarded)].fetch_add(1, Ordering::Relaxed);
    }

    /// A client handshake done: `took` from its first byte (the ClientHello) to the first
    /// request being readable.
    pub fn record_handshake(&self, kind: ClientHandshake, took: Duration) {
        self.handshakes[kind as usize].observe(took);
    }

    pub fn record_handshake_failure(&self, why: HandshakeFailure) {
        self.handshake_failures[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// A counter without labels, set to `value` at scrape time.
fn register_counter(reg: &mut Registry, name: &str, help: &str, value: u64) {
    let c = Counter::<u64>::default();
    c.inc_by(value);
    reg.register(name, help, c);
}

/// Counters under one label, from label values and their counts in the same order.
fn counter_family<L>(
    values: &[&'static str],
    counts: &[AtomicU64],
    label: impl Fn(&'static str) -> L,
) -> Family<L, Counter>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Counter>::default();
    for (&value, n) in values.iter().zip(counts) {
        family
            .get_or_create(&label(value))
            .inc_by(n.load(Ordering::Relaxed));
    }
    family
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
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
struct OriginClassLabel {
    origin: String,
    code: String,
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
    certificates: &[CertificateExpiry],
    draining: bool,
    access_log_dropped: Option<u64>,
) -> String {
    let mut reg = Registry::default();
    let expiry = Family::<CertificateLabel, Gauge<i64>>::default();
    for c in certificates {
        expiry
            .get_or_create(&CertificateLabel {
                usage: c.usage,
                certificate: escape(&c.certificate),
            })
            .set(c.not_after);
    }
    reg.register(
        CERTIFICATE_EXPIRY,
        "When each certificate in service expires (notAfter, Unix seconds): usage server for the edge's own, client for an origin's client_cert",
        expiry,
    );
    let requests = Family::<ClassLabel, Counter>::default();
    for (i, n) in counters.by_class.snapshot().iter().enumerate().skip(1) {
        requests
            .get_or_create(&ClassLabel {
                code: format!("{i}xx"),
            })
            .inc_by(*n);
    }
    reg.register(
        REQUESTS,
        "Responses sent to clients, by status class",
        requests,
    );
    let latency = HistogramValue::default();
    latency.set(counters.latency.snapshot());
    reg.register(
        REQUEST_DURATION,
        "Time from a client request to its response head, every request",
        latency,
    );
    let open = Gauge::<i64>::default();
    open.set(gauge(counters.client_connections.load(Ordering::Relaxed)));
    reg.register(
        CLIENT_CONNECTIONS,
        "Client connections open now (TLS handshakes included)",
        open,
    );
    let replay = Gauge::<i64>::default();
    replay.set(gauge(crate::proxy::replay::REPLAY_BYTES.held()));
    reg.register(
        REPLAY_BYTES,
        "Bytes of request bodies kept to send again if an h2 origin refuses them unprocessed (at most 64 MiB)",
        replay,
    );
    let early = counter_family(
        &["forwarded", "too_early"],
        &counters.early_data,
        |outcome| OutcomeLabel { outcome },
    );
    reg.register(
        EARLY_DATA_REQUESTS,
        "Requests received in TLS 0-RTT early data: forwarded (safe, marked Early-Data: 1) or answered 425",
        early,
    );
    let handshakes = Family::<KindLabel, HistogramValue>::default();
    for (kind, times) in ClientHandshake::ALL.iter().zip(&counters.handshakes) {
        handshakes
            .get_or_create(&KindLabel { kind: kind.label() })
            .set(times.snapshot());
    }
    reg.register(
        CLIENT_HANDSHAKE_TIME,
        "Client handshakes by kind (full, resumed, early: TLS over TCP; quic: HTTP/3) and their time from the first byte to the first request being readable (quic: to the handshake's end)",
        handshakes,
    );
    let failures = counter_family(
        &["error", "timeout"],
        &counters.handshake_failures,
        |reason| ReasonLabel { reason },
    );
    reg.register(
        CLIENT_HANDSHAKE_FAILURES,
        "Client handshakes that failed (a TLS or QUIC error, the client leaving) or timed out",
        failures,
    );
    register_counter(
        &mut reg,
        PER_CLIENT_REFUSED,
        "TCP connections closed before their handshake: their client already held max_connections_per_client",
        counters.per_client_refused.load(Ordering::Relaxed),
    );
    register_counter(
        &mut reg,
        RATE_LIMITED,
        "Requests answered 429 before reaching an origin: their client was over the route's rate_limit",
        counters.rate_limited.load(Ordering::Relaxed),
    );
    register_counter(
        &mut reg,
        RATE_LIMIT_UNRECORDED,
        "Requests on a rate-limited route served without being counted: their client was new and the route's table of clients (rate_limit max_clients) was full",
        counters.rate_limit_unrecorded.load(Ordering::Relaxed),
    );
    register_counter(
        &mut reg,
        PROXY_HEADERS_REFUSED,
        "Connections closed on a proxy_protocol listener: no valid PROXY protocol header in time",
        counters.proxy_headers_refused.load(Ordering::Relaxed),
    );
    let d = Gauge::<i64>::default();
    d.set(i64::from(draining));
    reg.register(DRAINING, "1 while the edge drains", d);
    if let Some(n) = access_log_dropped {
        register_counter(
            &mut reg,
            ACCESS_LOG_DROPPED,
            "Access-log entries dropped because the writer fell behind",
            n,
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
                origin: escape(&p.origin),
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
                origin: escape(&p.origin),
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
                origin: escape(&p.origin),
                kind: kind.into(),
            })
            .inc_by(v);
        }
    }
    reg.register(UPSTREAM_HANDSHAKES, "Upstream TLS handshakes by kind", hs);
    let responses = Family::<OriginClassLabel, Counter>::default();
    let times = Family::<OriginLabel, HistogramValue>::default();
    for p in pools {
        for (i, n) in p.responses_by_class.iter().enumerate().skip(1) {
            responses
                .get_or_create(&OriginClassLabel {
                    origin: escape(&p.origin),
                    code: format!("{i}xx"),
                })
                .inc_by(*n);
        }
        times
            .get_or_create(&OriginLabel {
                origin: escape(&p.origin),
            })
            .set(p.response_time.clone());
    }
    reg.register(
        UPSTREAM_RESPONSES,
        "Responses from each origin, by status class",
        responses,
    );
    reg.register(
        UPSTREAM_RESPONSE_TIME,
        "Time from sending a request to an origin to its response head (the request body included)",
        times,
    );
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, &reg);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_escaped_as_the_text_format_wants() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn latency_lands_in_the_first_bucket_whose_bound_it_does_not_exceed() {
        let h = Latency::default();
        h.observe(Duration::from_micros(900)); // <= 1 ms
        h.observe(Duration::from_millis(1)); // exactly on a bound: that bucket (le)
        h.observe(Duration::from_millis(30)); // 25 ms < x <= 50 ms
        h.observe(Duration::from_secs(11)); // above every bound: +Inf
        let s = h.snapshot();
        assert_eq!(s.counts.len(), LATENCY_BOUNDS.len() + 1);
        assert_eq!(s.counts[0], 2);
        assert_eq!(s.counts[LATENCY_BOUNDS.partition_point(|&b| b < 0.05)], 1);
        assert_eq!(s.counts[LATENCY_BOUNDS.len()], 1);
        assert_eq!(s.counts.iter().sum::<u64>(), 4);
        assert_eq!(s.sum_us, 900 + 1_000 + 30_000 + 11_000_000);
    }
}
