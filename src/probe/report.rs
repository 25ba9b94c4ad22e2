//! The result of a run: per target, per phase p50/p90/p99/max, failures by reason, the
//! Server-Timing split of TTFB; rendered as a side-by-side table or as JSON.

use super::sample::{Sample, SampleError};
use super::{HttpVersion, Mode};
use serde::{Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

/// Everything one `measure` run saw.
#[derive(Debug)]
pub struct Report {
    pub mode: Mode,
    pub http: HttpVersion,
    pub count: usize,
    pub targets: Vec<TargetReport>,
}

/// One target's samples, in order.
#[derive(Debug)]
pub struct TargetReport {
    pub url: String,
    pub samples: Vec<Result<Sample, SampleError>>,
}

/// Order statistics of one phase over the successful samples (nearest-rank percentiles).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Stats {
    pub n: usize,
    #[serde(rename = "p50_ms", serialize_with = "ser_ms")]
    pub p50: Duration,
    #[serde(rename = "p90_ms", serialize_with = "ser_ms")]
    pub p90: Duration,
    #[serde(rename = "p99_ms", serialize_with = "ser_ms")]
    pub p99: Duration,
    #[serde(rename = "max_ms", serialize_with = "ser_ms")]
    pub max: Duration,
}

impl Stats {
    pub fn of(mut v: Vec<Duration>) -> Option<Stats> {
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        Some(Stats {
            n: v.len(),
            p50: rank(0.50),
            p90: rank(0.90),
            p99: rank(0.99),
            max: v[v.len() - 1],
        })
    }
}

/// The phases a report shows, in table order. `client_edge`, `edge_pool`, `edge_origin` exist
/// only when the target answered with the edge's Server-Timing header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Row {
    Dns,
    Connect,
    Tls,
    Ttfb,
    Total,
    /// TTFB minus DNS, pool wait and upstream: the client-PoP leg (network + edge work).
    ClientEdge,
    EdgePool,
    /// The upstream time to first byte the edge reported: the PoP-origin leg.
    EdgeOrigin,
}

impl Row {
    pub const ALL: [Row; 8] = [
        Row::Dns,
        Row::Connect,
        Row::Tls,
        Row::Ttfb,
        Row::Total,
        Row::ClientEdge,
        Row::EdgePool,
        Row::EdgeOrigin,
    ];

    pub fn key(self) -> &'static str {
        match self {
            Row::Dns => "dns",
            Row::Connect => "connect",
            Row::Tls => "tls",
            Row::Ttfb => "ttfb",
            Row::Total => "total",
            Row::ClientEdge => "client_edge",
            Row::EdgePool => "edge_pool",
            Row::EdgeOrigin => "edge_origin",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Row::Dns => "dns",
            Row::Connect => "tcp connect",
            Row::Tls => "tls handshake",
            Row::Ttfb => "ttfb",
            Row::Total => "total",
            Row::ClientEdge => "  client<->edge",
            Row::EdgePool => "  edge pool wait",
            Row::EdgeOrigin => "  edge<->origin",
        }
    }

    fn of(self, s: &Sample) -> Option<Duration> {
        let st = s.server_timing.as_ref();
        match self {
            Row::Dns => s.dns,
            Row::Connect => s.connect,
            Row::Tls => s.tls,
            Row::Ttfb => Some(s.ttfb),
            Row::Total => Some(s.total),
            Row::EdgePool => st.and_then(|t| t.pool),
            Row::EdgeOrigin => st.and_then(|t| t.upstream),
            Row::ClientEdge => {
                let t = st?;
                let edge = t.pool.unwrap_or_default() + t.upstream?;
                Some(
                    s.ttfb
                        .saturating_sub(s.dns.unwrap_or_default())
                        .saturating_sub(edge),
                )
            }
        }
    }
}

impl TargetReport {
    pub fn ok(&self) -> impl Iterator<Item = &Sample> {
        self.samples.iter().filter_map(|s| s.as_ref().ok())
    }

    pub fn succeeded(&self) -> usize {
        self.ok().count()
    }

    pub fn failed(&self) -> usize {
        self.samples.len() - self.succeeded()
    }

    pub fn stats(&self, row: Row) -> Option<Stats> {
        Stats::of(self.ok().filter_map(|s| row.of(s)).collect())
    }

    /// Failures grouped by reason, each with one full message as an example.
    pub fn failures(&self) -> Vec<Failure> {
        let mut by: BTreeMap<String, Failure> = BTreeMap::new();
        for e in self.samples.iter().filter_map(|s| s.as_ref().err()) {
            let f = by.entry(e.reason()).or_insert_with(|| Failure {
                reason: e.reason(),
                count: 0,
                example: error_chain(e),
            });
            f.count += 1;
        }
        by.into_values().collect()
    }

    /// "TLSv1.3 h2 resumed 9/10" from the samples that did a handshake, with "0-RTT 9/10"
    /// when any request went as early data.
    fn tls_summary(&self) -> Option<String> {
        let infos: Vec<_> = self.ok().filter_map(|s| s.tls_info.as_ref()).collect();
        let first = infos.first()?;
        let resumed = infos.iter().filter(|i| i.resumed).count();
        let early = infos.iter().filter(|i| i.early_data).count();
        let mut summary = format!(
            "{} {} resumed {}/{}",
            first.version,
            first.alpn.as_deref().unwrap_or("-"),
            resumed,
            infos.len()
        );
        if early > 0 {
            summary.push_str(&format!(" 0-RTT {}/{}", early, infos.len()));
        }
        Some(summary)
    }

    fn upstream_states(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for s in self.ok() {
            if let Some(state) = s
                .server_timing
                .as_ref()
                .and_then(|t| t.upstream_state.clone())
            {
                *m.entry(state).or_insert(0) += 1;
            }
        }
        m
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    pub reason: String,
    pub count: usize,
    pub example: String,
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let s = c.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cause = c.source();
    }
    out
}

impl Report {
    /// True when every target had at least one successful sample (the exit code).
    pub fn all_targets_succeeded(&self) -> bool {
        self.targets.iter().all(|t| t.succeeded() > 0)
    }

    /// The side-by-side table: one column per target, `p50 p90 p99 max` in ms per phase.
    pub fn render_table(&self) -> String {
        const CELL: usize = 31;
        let width = self
            .targets
            .iter()
            .map(|t| t.url.len())
            .max()
            .unwrap_or(0)
            .max(CELL)
            + 2;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "mode {}, {} sample(s) per target; ms: p50 p90 p99 max (dns/connect/tls: phase; ttfb/total: from start)",
            self.mode.as_str(),
            self.count
        );
        let mut line = |label: &str, cells: Vec<String>| {
            let _ = write!(out, "{label:<17}");
            for c in cells {
                let _ = write!(out, "{c:<width$}");
            }
            let _ = writeln!(out);
        };
        line("", self.targets.iter().map(|t| t.url.clone()).collect());
        line(
            "ok / failed",
            self.targets
                .iter()
                .map(|t| format!("{} / {}", t.succeeded(), t.failed()))
                .collect(),
        );
        line(
            "tls",
            self.targets
                .iter()
                .map(|t| t.tls_summary().unwrap_or_else(|| "-".into()))
                .collect(),
        );
        let has_split = self
            .targets
            .iter()
            .any(|t| t.stats(Row::EdgeOrigin).is_some());
        for row in Row::ALL {
            let split = matches!(row, Row::ClientEdge | Row::EdgePool | Row::EdgeOrigin);
            if split && !has_split {
                continue;
            }
            if row == Row::ClientEdge {
                line("ttfb split", Vec::new());
            }
            line(
                row.label(),
                self.targets
                    .iter()
                    .map(|t| match t.stats(row) {
                        Some(s) => format!(
                            "{:>7.1}{:>8.1}{:>8.1}{:>8.1}",
                            ms(s.p50),
                            ms(s.p90),
                            ms(s.p99),
                            ms(s.max)
                        ),
                        None => format!("{:>7}", "-"),
                    })
                    .collect(),
            );
        }
        if has_split {
            line(
                "  upstream conn",
                self.targets
                    .iter()
                    .map(|t| {
                        let m = t.upstream_states();
                        if m.is_empty() {
                            "-".into()
                        } else {
                            m.iter()
                                .map(|(k, v)| format!("{k} {v}"))
                                .collect::<Vec<_>>()
                                .join(", ")
                        }
                    })
                    .collect(),
            );
        }
        for (i, t) in self.targets.iter().enumerate() {
            for f in t.failures() {
                let _ = writeln!(
                    out,
                    "failures [{}] {}: {} x{} (e.g. {})",
                    i + 1,
                    t.url,
                    f.reason,
                    f.count,
                    f.example
                );
            }
        }
        out
    }

    /// Every field, always present (`null` when a phase did not happen).
    pub fn to_json(&self) -> serde_json::Value {
        let targets: Vec<_> = self
            .targets
            .iter()
            .map(|t| {
                let phases: serde_json::Map<_, _> = Row::ALL
                    .iter()
                    .map(|r| {
                        let v = serde_json::to_value(t.stats(*r)).unwrap_or_default();
                        (r.key().to_string(), v)
                    })
                    .collect();
                let samples: Vec<_> = t
                    .samples
                    .iter()
                    .map(|s| match s {
                        Ok(s) => serde_json::json!({ "ok": true, "error": null, "reason": null, "sample": s }),
                        Err(e) => serde_json::json!({
                            "ok": false, "error": error_chain(e), "reason": e.reason(), "sample": null
                        }),
                    })
                    .collect();
                let tls = t.ok().find_map(|s| s.tls_info.clone());
                serde_json::json!({
                    "url": t.url,
                    "address": t.ok().next().map(|s| s.address.to_string()),
                    "ok": t.succeeded(),
                    "failed": t.failed(),
                    "failures": t.failures(),
                    "tls": tls,
                    "resumed": t.ok().filter(|s| s.tls_info.as_ref().is_some_and(|i| i.resumed)).count(),
                    "early_data": t.ok().filter(|s| s.tls_info.as_ref().is_some_and(|i| i.early_data)).count(),
                    "http": t.ok().next().map(|s| s.http),
                    "upstream_states": t.upstream_states(),
                    "phases": phases,
                    "samples": samples,
                })
            })
            .collect();
        serde_json::json!({
            "mode": self.mode.as_str(),
            "http": self.http.as_str(),
            "count": self.count,
            "targets": targets,
        })
    }
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Durations go out as float milliseconds.
pub fn ser_ms<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64((ms(*d) * 1000.0).round() / 1000.0)
}

pub fn ser_opt_ms<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => ser_ms(d, s),
        None => s.serialize_none(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<_> = (1..=100).map(Duration::from_millis).collect();
        let s = Stats::of(v).expect("stats");
        assert_eq!(s.p50, Duration::from_millis(50));
        assert_eq!(s.p90, Duration::from_millis(90));
        assert_eq!(s.p99, Duration::from_millis(99));
        assert_eq!(s.max, Duration::from_millis(100));
        let one = Stats::of(vec![Duration::from_millis(7)]).expect("stats");
        assert_eq!(
            (one.p50, one.p99),
            (Duration::from_millis(7), Duration::from_millis(7))
        );
        assert!(Stats::of(vec![]).is_none());
    }
}
