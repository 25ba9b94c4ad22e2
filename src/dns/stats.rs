//! Query counters (by qtype and rcode: a fixed array of atomics, so counting costs one
//! relaxed add and no lock) and the Prometheus text exposition of everything the sidecar
//! reports: queries, answers per region and PoP, PoP health, map age, generations, errors.

use super::cookie::CookieState;
use super::query::{Outcome, Qtype, Rcode};
use super::rrl::Verdict;
use super::DnsState;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

const NQ: usize = Qtype::ALL.len();
const NR: usize = Rcode::ALL.len();
const NC: usize = CookieState::ALL.len();

#[derive(Debug)]
pub struct Stats {
    queries: [[AtomicU64; NR]; NQ],
    truncated: AtomicU64,
    /// Queries with a DNS cookie, by what their server cookie was.
    cookies: [AtomicU64; NC],
    pub udp_errors: AtomicU64,
    /// Wake-ups of a UDP worker that brought datagrams, and the datagrams: their ratio is
    /// the batch size (what `[dns] udp_coalesce` raises).
    udp_batches: AtomicU64,
    udp_datagrams: AtomicU64,
    /// UDP workers by their I/O: io_uring, `recvmmsg` (or the portable loop elsewhere).
    pub udp_workers: [AtomicU64; 2],
    pub tcp_connections: AtomicU64,
    /// TCP connections closed at accept: their client already held its share.
    pub tcp_refused: AtomicU64,
    /// UDP answers over `[dns] rate_limit`: dropped, sent truncated.
    rate_limited: [AtomicU64; 2],
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            queries: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            truncated: AtomicU64::new(0),
            cookies: std::array::from_fn(|_| AtomicU64::new(0)),
            udp_errors: AtomicU64::new(0),
            udp_batches: AtomicU64::new(0),
            udp_datagrams: AtomicU64::new(0),
            udp_workers: [AtomicU64::new(0), AtomicU64::new(0)],
            tcp_connections: AtomicU64::new(0),
            tcp_refused: AtomicU64::new(0),
            rate_limited: [AtomicU64::new(0), AtomicU64::new(0)],
        }
    }
}

fn qi(q: Qtype) -> usize {
    Qtype::ALL.iter().position(|&x| x == q).unwrap_or(NQ - 1)
}

fn ri(r: Rcode) -> usize {
    Rcode::ALL.iter().position(|&x| x == r).unwrap_or(0)
}

impl Stats {
    /// A UDP worker's wake-up brought `datagrams` (none: not counted).
    #[inline]
    pub fn record_udp_batch(&self, datagrams: usize) {
        if datagrams > 0 {
            self.udp_batches.fetch_add(1, Ordering::Relaxed);
            self.udp_datagrams
                .fetch_add(datagrams as u64, Ordering::Relaxed);
        }
    }

    #[inline]
    pub fn record(&self, o: Outcome) {
        self.queries[qi(o.qtype)][ri(o.rcode)].fetch_add(1, Ordering::Relaxed);
        if o.truncated && o.limited != Some(Verdict::Drop) {
            self.truncated.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(c) = o.cookie {
            self.cookies[c as usize].fetch_add(1, Ordering::Relaxed);
        }
        match o.limited {
            Some(Verdict::Drop) => self.rate_limited[0].fetch_add(1, Ordering::Relaxed),
            Some(Verdict::Slip) => self.rate_limited[1].fetch_add(1, Ordering::Relaxed),
            _ => 0,
        };
    }

    pub fn cookies(&self, c: CookieState) -> u64 {
        self.cookies[c as usize].load(Ordering::Relaxed)
    }

    pub fn queries(&self, q: Qtype, r: Rcode) -> u64 {
        self.queries[qi(q)][ri(r)].load(Ordering::Relaxed)
    }
}

fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The Prometheus text exposition of the DNS sidecar's metrics.
pub fn render(state: &DnsState) -> String {
    let mut o = String::with_capacity(4096);
    let s = state.stats();
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_queries_total DNS queries, by query type and response code (answers dropped by rate_limit included: see edgepop_dns_rate_limited_total)."
    );
    let _ = writeln!(o, "# TYPE edgepop_dns_queries_total counter");
    for q in Qtype::ALL {
        for r in Rcode::ALL {
            let n = s.queries(q, r);
            if n > 0 {
                let _ = writeln!(
                    o,
                    "edgepop_dns_queries_total{{qtype=\"{}\",rcode=\"{}\"}} {n}",
                    q.as_str(),
                    r.as_str()
                );
            }
        }
    }
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_truncated_total UDP answers sent with TC set.\n# TYPE edgepop_dns_truncated_total counter\nedgepop_dns_truncated_total {}",
        s.truncated.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_cookies_total Queries with a DNS cookie, by their server cookie: none yet (client_only), ours (valid), or not ours, too old or from before a restart (invalid).\n# TYPE edgepop_dns_cookies_total counter"
    );
    for c in CookieState::ALL {
        let _ = writeln!(
            o,
            "edgepop_dns_cookies_total{{server_cookie=\"{}\"}} {}",
            c.as_str(),
            s.cookies(c)
        );
    }
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_rate_limited_total UDP answers over [dns] rate_limit: dropped, or sent truncated (slip) so a real resolver retries over TCP.\n# TYPE edgepop_dns_rate_limited_total counter\nedgepop_dns_rate_limited_total{{action=\"drop\"}} {}\nedgepop_dns_rate_limited_total{{action=\"slip\"}} {}",
        s.rate_limited[0].load(Ordering::Relaxed),
        s.rate_limited[1].load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_udp_errors_total UDP receives and sends that failed.\n# TYPE edgepop_dns_udp_errors_total counter\nedgepop_dns_udp_errors_total {}",
        s.udp_errors.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_udp_batches_total Wake-ups of a UDP worker that brought datagrams (edgepop_dns_udp_datagrams_total over this: the batch size, which [dns] udp_coalesce raises).\n# TYPE edgepop_dns_udp_batches_total counter\nedgepop_dns_udp_batches_total {}",
        s.udp_batches.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_udp_datagrams_total Datagrams the UDP workers received.\n# TYPE edgepop_dns_udp_datagrams_total counter\nedgepop_dns_udp_datagrams_total {}",
        s.udp_datagrams.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_udp_workers UDP worker threads by how they receive and send ([dns] udp_io).\n# TYPE edgepop_dns_udp_workers gauge\nedgepop_dns_udp_workers{{io=\"io_uring\"}} {}\nedgepop_dns_udp_workers{{io=\"recvmmsg\"}} {}",
        s.udp_workers[0].load(Ordering::Relaxed),
        s.udp_workers[1].load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_tcp_connections_total TCP connections accepted.\n# TYPE edgepop_dns_tcp_connections_total counter\nedgepop_dns_tcp_connections_total {}",
        s.tcp_connections.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_tcp_refused_total TCP connections closed at once because their client (an IPv4 address or IPv6 /64) already held its share of the slots.\n# TYPE edgepop_dns_tcp_refused_total counter\nedgepop_dns_tcp_refused_total {}",
        s.tcp_refused.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_answers_total Geo answers, by region (answer class) and PoP.\n# TYPE edgepop_dns_answers_total counter"
    );
    for (region, pop, n) in state.hits().snapshot() {
        let _ = writeln!(
            o,
            "edgepop_dns_answers_total{{region=\"{}\",pop=\"{}\"}} {n}",
            label(&region),
            label(&pop)
        );
    }
    let map = state.map();
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_pop_up Whether a PoP gets answers (1) or not (0): its health checks, unless the region file forces it up or down.\n# TYPE edgepop_dns_pop_up gauge"
    );
    for p in &map.pops {
        let _ = writeln!(
            o,
            "edgepop_dns_pop_up{{pop=\"{}\"}} {}",
            label(&p.name),
            u8::from(p.serves())
        );
    }
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_pop_checks_pass Whether a PoP passes its health checks (1) or not (0), whatever the region file forces.\n# TYPE edgepop_dns_pop_checks_pass gauge"
    );
    for p in &map.pops {
        let _ = writeln!(
            o,
            "edgepop_dns_pop_checks_pass{{pop=\"{}\"}} {}",
            label(&p.name),
            u8::from(p.health.is_up())
        );
    }
    let age = SystemTime::now()
        .duration_since(map.built_at)
        .unwrap_or_default()
        .as_secs_f64();
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_map_age_seconds Time since the map in service was built.\n# TYPE edgepop_dns_map_age_seconds gauge\nedgepop_dns_map_age_seconds {age:.3}"
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_map_generation Generation of the map in service (successful builds).\n# TYPE edgepop_dns_map_generation gauge\nedgepop_dns_map_generation {}",
        map.generation
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_map_serial SOA serial of the map in service.\n# TYPE edgepop_dns_map_serial gauge\nedgepop_dns_map_serial {}",
        map.serial
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_map_blocks Explicit prefix blocks in the map after flattening.\n# TYPE edgepop_dns_map_blocks gauge\nedgepop_dns_map_blocks {}",
        map.geo.block_count()
    );
    let (failures, last) = state.regen_status();
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_map_errors_total Region file and configuration file (SIGHUP) loads rejected (old map and settings kept).\n# TYPE edgepop_dns_map_errors_total counter\nedgepop_dns_map_errors_total {failures}"
    );
    let _ = writeln!(
        o,
        "# HELP edgepop_dns_map_last_error The last rejected region file or configuration file load (1 until that file loads).\n# TYPE edgepop_dns_map_last_error gauge"
    );
    if let Some(e) = last {
        let _ = writeln!(
            o,
            "edgepop_dns_map_last_error{{error=\"{}\"}} {}",
            label(&e.message),
            u8::from(e.current)
        );
    }
    o
}
