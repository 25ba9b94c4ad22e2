//! `[dns] rate_limit`: response rate limiting (RRL) for UDP, as BIND's `rate-limit`, Knot's
//! `mod-rrl` and NSD's `rrl-ratelimit` do it, so the sidecar cannot be used to reflect and
//! amplify traffic at a victim whose address is forged. Answers to one client network (an
//! IPv4 /24 or IPv6 /56 by default: a forger picks addresses freely within a victim's
//! network) are counted per kind of answer: a positive answer per name and type, NODATA per
//! name, NXDOMAIN for the whole zone (so random names share one allowance), errors together.
//! Beyond the allowance (the `governor` crate's GCRA: `burst` at once, then `responses` per
//! `per`; NODATA, NXDOMAIN and errors may have rates of their own, as in BIND) answers are
//! dropped, except every `slip`-th, which goes out truncated with no
//! records: a real resolver behind the network retries over TCP, which is never limited, and
//! a forged source gets nothing larger than its query. Queries that bring a valid server
//! cookie (RFC 7873) prove their source and are never limited.
//!
//! The allowances live in a fixed table of 65,536 timestamps indexed by a keyed hash, as in
//! Knot: constant memory whatever the attacker sends; clients that share a slot share an
//! allowance, which errs towards limiting, never towards amplifying.

use crate::config::DnsRateLimit;
use governor::clock::MonotonicClock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;

const SLOTS: usize = 1 << 16;

type Limiter = governor::RateLimiter<u64, Shared, MonotonicClock, NoOpMiddleware>;

/// What the limit says about one UDP answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Send,
    /// Over the limit: send nothing.
    Drop,
    /// Over the limit, but this one goes out truncated (TC, no records).
    Slip,
}

/// The kinds of answer counted apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    /// Records in the answer: per name and type.
    Answer(u16),
    /// NOERROR without records: per name.
    NoData,
    /// Per zone.
    NxDomain,
    /// REFUSED, FORMERR, NOTIMP, BADVERS...: one allowance.
    Error,
}

impl Kind {
    fn class(self) -> usize {
        match self {
            Kind::Answer(_) => 0,
            Kind::NoData => 1,
            Kind::NxDomain => 2,
            Kind::Error => 3,
        }
    }
}

pub struct RateLimiter {
    limit: DnsRateLimit,
    /// By [`Kind::class`]: positive answers, NODATA, NXDOMAIN, errors (`None`: not limited).
    limiters: [Option<Limiter>; 4],
    hasher: std::collections::hash_map::RandomState,
    /// Answers over the limit, per slot: which of them slips is decided per allowance (as
    /// BIND does), so two floods interleaved cannot starve one network of its slips.
    over: Box<[AtomicU16]>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    pub fn new(limit: DnsRateLimit) -> Self {
        // Kinds with one rate share a table (the kind is part of every key); a kind with a
        // rate of its own gets its own, since in a shared slot each allowed answer moves the
        // timestamp by its own kind's interval: one NXDOMAIN at 1/s would use up the burst
        // of answers at 20/s that hash to the same slot.
        let mut tables: Vec<(u32, Arc<Table>)> = Vec::new();
        let mut limiter = |count: u32| {
            let burst = limit.kind_burst(count)?;
            let table = match tables.iter().find(|(c, _)| *c == count) {
                Some((_, t)) => t.clone(),
                None => {
                    let t = Arc::new(Table((0..SLOTS).map(|_| AtomicU64::new(0)).collect()));
                    tables.push((count, t.clone()));
                    t
                }
            };
            let quota = crate::proxy::rate_limit::quota(limit.per, count, burst);
            Some(governor::RateLimiter::new(
                quota,
                Shared(table),
                MonotonicClock,
            ))
        };
        let limiters = [
            limiter(limit.responses),
            limiter(limit.nodata),
            limiter(limit.nxdomains),
            limiter(limit.errors),
        ];
        RateLimiter {
            limit,
            limiters,
            hasher: std::collections::hash_map::RandomState::new(),
            over: (0..SLOTS).map(|_| AtomicU16::new(0)).collect(),
        }
    }

    pub fn limit(&self) -> &DnsRateLimit {
        &self.limit
    }

    /// Counts one answer of `kind` about `name` (lower-case wire form) to `client`.
    pub fn check(&self, client: IpAddr, kind: Kind, name: &[u8]) -> Verdict {
        let Some(limiter) = &self.limiters[kind.class()] else {
            return Verdict::Send;
        };
        let key = self.hasher.hash_one((self.network(client), kind, name));
        if limiter.check_key(&key).is_ok() {
            return Verdict::Send;
        }
        let n = self.over[slot(key)].fetch_add(1, Ordering::Relaxed);
        match self.limit.slip {
            0 => Verdict::Drop,
            s if u32::from(n) % s == 0 => Verdict::Slip,
            _ => Verdict::Drop,
        }
    }

    /// Whether `client` is in `exempt` (never limited).
    pub fn exempt(&self, client: IpAddr) -> bool {
        let client = client.to_canonical();
        self.limit.exempt.iter().any(|n| n.contains(&client))
    }

    /// The client's network: its address cut to the configured prefix.
    fn network(&self, client: IpAddr) -> (bool, u128) {
        match client.to_canonical() {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let keep = u32::MAX
                    .checked_shl(32 - u32::from(self.limit.ipv4_prefix))
                    .unwrap_or(0);
                (true, u128::from(bits & keep))
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let keep = u128::MAX
                    .checked_shl(128 - u32::from(self.limit.ipv6_prefix))
                    .unwrap_or(0);
                (false, bits & keep)
            }
        }
    }
}

/// The slot of a key (already a keyed hash).
fn slot(key: u64) -> usize {
    (key as usize) % SLOTS
}

/// One GCRA timestamp per slot (0: never used), the slot picked by the key (already a keyed
/// hash).
struct Table(Box<[AtomicU64]>);

/// governor's state store: a table, shared by the limiters of the kinds with one rate.
struct Shared(Arc<Table>);

impl StateStore for Shared {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let state = &self.0 .0[slot(*key)];
        let mut prev = state.load(Ordering::Acquire);
        loop {
            let (result, next) = f((prev != 0).then(|| Nanos::from(prev)))?;
            match state.compare_exchange_weak(
                prev,
                next.into(),
                Ordering::Release,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(result),
                Err(now) => prev = now,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn limit(slip: u32) -> DnsRateLimit {
        DnsRateLimit {
            responses: 3,
            per: Duration::from_secs(60),
            burst: 3,
            nodata: 3,
            nxdomains: 3,
            errors: 3,
            slip,
            ipv4_prefix: 24,
            ipv6_prefix: 56,
            exempt: vec!["192.0.2.0/24".parse().unwrap()],
        }
    }

    #[test]
    fn beyond_the_burst_every_slipth_answer_goes_out_truncated_and_the_rest_are_dropped() {
        let rl = RateLimiter::new(limit(2));
        let me: IpAddr = "198.51.100.7".parse().unwrap();
        let www = b"\x03www\x07example\x03com\x00";
        let verdicts: Vec<Verdict> = (0..7).map(|_| rl.check(me, Kind::Answer(1), www)).collect();
        use Verdict::*;
        assert_eq!(verdicts, [Send, Send, Send, Slip, Drop, Slip, Drop]);
        // The same network (/24), same answer: the same allowance.
        let neighbour: IpAddr = "198.51.100.200".parse().unwrap();
        assert_ne!(rl.check(neighbour, Kind::Answer(1), www), Send);
        // Another type, another kind, another network: allowances of their own.
        assert_eq!(rl.check(me, Kind::Answer(28), www), Send);
        assert_eq!(
            rl.check(me, Kind::NxDomain, b"\x07example\x03com\x00"),
            Send
        );
        assert_eq!(
            rl.check("198.51.101.7".parse().unwrap(), Kind::Answer(1), www),
            Send
        );
        // IPv6 /56; a mapped IPv4 address is its IPv4 network.
        let a: IpAddr = "2001:db8:0:1::1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(rl.check(a, Kind::Error, b""), Send);
        }
        assert_ne!(
            rl.check("2001:db8:0:ff::2".parse().unwrap(), Kind::Error, b""),
            Send
        );
        assert_eq!(
            rl.check("2001:db8:0:100::1".parse().unwrap(), Kind::Error, b""),
            Send
        );
        assert_ne!(
            rl.check("::ffff:198.51.100.9".parse().unwrap(), Kind::Answer(1), www),
            Send
        );
    }

    #[test]
    fn slips_are_counted_per_allowance_so_interleaved_floods_each_get_theirs() {
        let rl = RateLimiter::new(limit(2));
        let (a, b): (IpAddr, IpAddr) = (
            "198.51.100.1".parse().unwrap(),
            "203.0.113.1".parse().unwrap(),
        );
        for _ in 0..3 {
            rl.check(a, Kind::NoData, b"");
            rl.check(b, Kind::NoData, b"");
        }
        let over: Vec<(Verdict, Verdict)> = (0..4)
            .map(|_| {
                (
                    rl.check(a, Kind::NoData, b""),
                    rl.check(b, Kind::NoData, b""),
                )
            })
            .collect();
        use Verdict::*;
        assert_eq!(
            over,
            [(Slip, Slip), (Drop, Drop), (Slip, Slip), (Drop, Drop)]
        );
        assert!(rl.exempt("192.0.2.77".parse().unwrap()));
        assert!(rl.exempt("::ffff:192.0.2.77".parse().unwrap()));
        assert!(!rl.exempt(a));
    }

    #[test]
    fn nodata_nxdomain_and_errors_may_have_rates_of_their_own_or_none() {
        let rl = RateLimiter::new(DnsRateLimit {
            nodata: 6,
            nxdomains: 1,
            errors: 0,
            ..limit(0)
        });
        let me: IpAddr = "198.51.100.7".parse().unwrap();
        let sent = |kind: Kind| {
            (0..20)
                .filter(|_| rl.check(me, kind, b"\x01x\x00") == Verdict::Send)
                .count()
        };
        // Bursts scale with the rate: 3 for `responses` 3, 6 for 6, 1 for 1.
        assert_eq!(sent(Kind::Answer(1)), 3);
        assert_eq!(sent(Kind::NoData), 6);
        assert_eq!(sent(Kind::NxDomain), 1);
        assert_eq!(sent(Kind::Error), 20, "errors = 0: not limited");
    }

    #[test]
    fn slip_zero_drops_all_and_slip_one_truncates_all() {
        let me: IpAddr = "192.0.2.1".parse().unwrap();
        for (slip, want) in [(0, Verdict::Drop), (1, Verdict::Slip)] {
            let rl = RateLimiter::new(limit(slip));
            let over: Vec<Verdict> = (0..6)
                .map(|_| rl.check(me, Kind::NoData, b""))
                .skip(3)
                .collect();
            assert_eq!(over, [want; 3], "slip {slip}");
        }
    }
}
