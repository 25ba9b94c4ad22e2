//! Pool counters (lock-free) and the JSON snapshot served on /pools.

use super::error::ConnectError;
use super::Inner;
use serde::Serialize;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

#[derive(Default)]
pub struct Stats {
    pub opened: AtomicU64,
    pub failed: AtomicU64,
    pub closed: AtomicU64,
    pub reused: AtomicU64,
    pub handshakes_full: AtomicU64,
    pub handshakes_resumed: AtomicU64,
    pub queue_full: AtomicU64,
    pub queue_timeouts: AtomicU64,
    pub rotated: AtomicU64,
    /// Idle trials started (`pool::trial`).
    pub idle_trials: AtomicU64,
    pub retried: AtomicU64,
    /// Last TCP connect and TLS handshake durations, in microseconds.
    pub tcp_connect_us: AtomicU64,
    pub tls_handshake_us: AtomicU64,
    /// Moving average of a warm open's whole time, in microseconds (see `record_warm_open`).
    warm_open_us: AtomicU64,
    /// Last health check's request round trip over a pooled connection, in microseconds.
    pub health_rtt_us: AtomicU64,
    /// Kernel-smoothed RTT of the pooled TCP connections, in microseconds.
    pub tcp_rtt_us: AtomicU64,
    /// Lowest h2 PING round trip over the pooled connections, in microseconds.
    pub ping_rtt_us: AtomicU64,
    /// Only written on failures and read by /pools; never touched by a successful request.
    last_error: Mutex<Option<String>>,
    /// Unix milliseconds until which refills back off; 0 when not backing off.
    pub backoff_until_ms: AtomicU64,
    /// The origin's responses by status class, and their time to the response head.
    pub responses: crate::metrics::StatusClasses,
    pub response_time: crate::metrics::Latency,
}

impl Stats {
    pub fn record_handshake(&self, resumed: bool) {
        let c = if resumed {
            &self.handshakes_resumed
        } else {
            &self.handshakes_full
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record_connect_times(&self, tcp: Duration, tls: Duration) {
        store_us(&self.tcp_connect_us, tcp);
        store_us(&self.tls_handshake_us, tls);
    }

    /// A warm connection opened in `d` (connect, handshakes, settle): kept as a moving
    /// average, so one slow connect moves it by a quarter.
    pub fn record_warm_open(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let _ = self
            .warm_open_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| {
                Some(if old == 0 {
                    us
                } else {
                    old.saturating_mul(3).saturating_add(us) / 4
                })
            });
    }

    /// How long opening a warm connection takes, on average.
    pub fn warm_open_time(&self) -> Duration {
        Duration::from_micros(self.warm_open_us.load(Ordering::Relaxed))
    }

    pub fn record_ping_rtt(&self, d: Duration) {
        store_us(&self.ping_rtt_us, d);
    }

    pub fn record_tcp_rtt(&self, d: Duration) {
        store_us(&self.tcp_rtt_us, d);
    }

    pub fn record_health_rtt(&self, d: Duration) {
        store_us(&self.health_rtt_us, d);
    }

    pub fn record_failure(&self, e: &ConnectError) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.set_last_error(e.to_string());
    }

    pub fn set_last_error(&self, e: String) {
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One origin's pool as shown on /pools.
#[derive(Debug, Clone, Serialize)]
pub struct PoolSnapshot {
    pub origin: String,
    pub address: String,
    pub server_name: String,
    pub protocol: &'static str,
    pub healthy: bool,
    pub warm_target: usize,
    pub max_connections: usize,
    pub open: usize,
    pub idle: usize,
    pub busy: usize,
    pub connecting: usize,
    pub in_flight: usize,
    pub waiting: usize,
    pub opened_total: u64,
    pub failed_total: u64,
    pub closed_total: u64,
    pub reused_total: u64,
    pub handshakes_full: u64,
    pub handshakes_resumed: u64,
    /// resumed / (full + resumed) over the pool's life.
    pub resumption_ratio: f64,
    /// Last connect's TCP and TLS phases; TLS 1.3 takes one round trip, so the handshake
    /// time is one more view of the PoP-origin RTT (see also `ping_rtt_ms`, `rtt_ms`).
    pub last_tcp_connect_ms: f64,
    pub last_tls_handshake_ms: f64,
    /// Round trip of the last active health check over a warm connection (the PoP-origin RTT
    /// plus the origin's time to answer `health_path`); absent without `health_path`.
    pub health_rtt_ms: Option<f64>,
    /// The PoP-origin round trip as the kernel measures it on the pooled connections
    /// (TCP_INFO smoothed RTT, lowest over the open connections, sampled every second).
    pub rtt_ms: Option<f64>,
    /// The PoP-origin round trip measured by h2 PING on the pooled connections (lowest of
    /// the latest PING per connection, every `keepalive_interval`); h2 origins only.
    pub ping_rtt_ms: Option<f64>,
    /// Largest per-stream h2 receive window over the open connections, in bytes: it starts
    /// at 2 MiB and grows (to 16 MiB) with the bandwidth-delay product measured while
    /// responses flow (shown once its SETTINGS is sent); h2 origins only.
    pub stream_window_max: Option<u64>,
    pub rotated_total: u64,
    pub retried_total: u64,
    /// The origin's idle timeout, configured, announced or observed; idle connections rotate
    /// before it.
    pub learned_idle_timeout_ms: Option<u64>,
    /// Where it comes from: "configured" (`origin_idle_timeout`), "announced"
    /// (`Keep-Alive: timeout=N`) or "observed" (the origin's idle closes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_source: Option<&'static str>,
    /// Idle closes by the origin before a configured `origin_idle_timeout`'s rotation point
    /// (3/4 of it): the setting is too high.
    pub early_idle_closes_total: u64,
    /// Idle trials: a rotated connection kept open and idle, out of service, up to twice an
    /// observed idle timeout, to see whether the origin closes it; and those it did not
    /// (each doubled the value).
    pub idle_trials_total: u64,
    pub idle_trials_survived_total: u64,
    /// A trial's connection is open, idle and out of service now.
    pub idle_trial_running: bool,
    /// Target open connections: the floor raised by the recent peak of concurrent requests.
    pub target: usize,
    pub recent_peak_in_flight: f64,
    pub retiring: usize,
    pub queue_full_total: u64,
    pub queue_timeouts_total: u64,
    pub backoff_until_unix_ms: Option<u64>,
    pub last_error: Option<String>,
    /// For /metrics only.
    #[serde(skip)]
    pub responses_by_class: [u64; 6],
    #[serde(skip)]
    pub response_time: crate::metrics::LatencySnapshot,
}

fn store_us(gauge: &AtomicU64, d: Duration) {
    gauge.store(
        u64::try_from(d.as_micros()).unwrap_or(u64::MAX),
        Ordering::Relaxed,
    );
}

/// A microsecond gauge as milliseconds; 0 means "not measured yet".
fn opt_ms(us: &AtomicU64) -> Option<f64> {
    match us.load(Ordering::Relaxed) {
        0 => None,
        us => Some(us as f64 / 1000.0),
    }
}

impl Inner {
    pub(super) fn snapshot(&self) -> PoolSnapshot {
        // Read before taking the state lock: the last error has its own lock.
        let last_error = self.stats.last_error();
        let target = self.target();
        let st = self.lock();
        let (idle, busy, in_flight) = match self.origin.protocol {
            crate::config::Protocol::H2 => {
                let in_flight: usize = st
                    .h2
                    .iter()
                    .map(|c| c.in_flight.load(Ordering::Relaxed))
                    .sum();
                let busy = st
                    .h2
                    .iter()
                    .filter(|c| c.in_flight.load(Ordering::Relaxed) > 0)
                    .count();
                (st.open.saturating_sub(busy), busy, in_flight)
            }
            crate::config::Protocol::Http1 => (st.idle_h1.len(), st.busy_h1, st.busy_h1),
        };
        let full = self.stats.handshakes_full.load(Ordering::Relaxed);
        let resumed = self.stats.handshakes_resumed.load(Ordering::Relaxed);
        let ms = |a: &AtomicU64| a.load(Ordering::Relaxed) as f64 / 1000.0;
        PoolSnapshot {
            origin: self.origin.name.clone(),
            address: self.origin.address.clone(),
            server_name: self.origin.server_name.to_str().into_owned(),
            protocol: self.origin.protocol.as_str(),
            healthy: self.health.is_up(),
            warm_target: self.floor,
            max_connections: self.origin.max_connections,
            open: st.open,
            idle,
            busy,
            connecting: st.connecting,
            in_flight,
            waiting: self.waiting.load(Ordering::Relaxed),
            opened_total: self.stats.opened.load(Ordering::Relaxed),
            failed_total: self.stats.failed.load(Ordering::Relaxed),
            closed_total: self.stats.closed.load(Ordering::Relaxed),
            reused_total: self.stats.reused.load(Ordering::Relaxed),
            handshakes_full: full,
            handshakes_resumed: resumed,
            resumption_ratio: if full + resumed == 0 {
                0.0
            } else {
                resumed as f64 / (full + resumed) as f64
            },
            last_tcp_connect_ms: ms(&self.stats.tcp_connect_us),
            last_tls_handshake_ms: ms(&self.stats.tls_handshake_us),
            ping_rtt_ms: opt_ms(&self.stats.ping_rtt_us),
            stream_window_max: st
                .h2
                .iter()
                .map(|c| c.ping.stream_window.load(Ordering::Relaxed))
                .max(),
            rtt_ms: opt_ms(&self.stats.tcp_rtt_us),
            health_rtt_ms: opt_ms(&self.stats.health_rtt_us),
            rotated_total: self.stats.rotated.load(Ordering::Relaxed),
            retried_total: self.stats.retried.load(Ordering::Relaxed),
            learned_idle_timeout_ms: self.idle.learned().map(super::millis),
            idle_timeout_source: self.idle.source(),
            early_idle_closes_total: self.idle.early_closes(),
            idle_trials_total: self.stats.idle_trials.load(Ordering::Relaxed),
            idle_trials_survived_total: self.idle.trials_survived(),
            idle_trial_running: st.trial.is_some(),
            target,
            recent_peak_in_flight: self.peak_milli.load(Ordering::Relaxed) as f64 / 1000.0,
            retiring: st.retiring,
            queue_full_total: self.stats.queue_full.load(Ordering::Relaxed),
            queue_timeouts_total: self.stats.queue_timeouts.load(Ordering::Relaxed),
            backoff_until_unix_ms: match self.stats.backoff_until_ms.load(Ordering::Relaxed) {
                0 => None,
                t => Some(t),
            },
            last_error,
            responses_by_class: self.stats.responses.snapshot(),
            response_time: self.stats.response_time.snapshot(),
        }
    }
}
