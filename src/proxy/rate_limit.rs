//! `[[routes]] rate_limit`: how many requests one client may make on a route, as nginx's
//! `limit_req` keyed by address (with `nodelay`), Envoy's local rate limit or HAProxy's
//! `http_req_rate`. A client is an IPv4 address or an IPv6 /64, as for
//! `max_connections_per_client`. The `governor` crate's GCRA decides: a client may send
//! `burst` requests at once, then `requests` per `per`; beyond that it gets 429 with a
//! `Retry-After`, before any origin sees the request.
//!
//! The per-client states (one timestamp each) live in a table of bounded size, as in nginx's
//! fixed-size zone: a client that the full table has no room for is served without being
//! counted (and that is counted), rather than refused. An attacker who rotates addresses gets
//! a fresh allowance with each one anyway, so refusing newcomers would only turn the attack
//! on legitimate clients. Clients whose allowance is full again are dropped every few seconds
//! ([`RateLimiter::forget_idle`]), which makes room.

use crate::config::RateLimit;
use crate::edge::client_limit::ClientKey;
use dashmap::DashMap;
use governor::clock::{Clock, MonotonicClock};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::keyed::ShrinkableKeyedStateStore;
use governor::state::StateStore;
use governor::Quota;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

type Limiter = governor::RateLimiter<ClientKey, Table, MonotonicClock, NoOpMiddleware>;

/// One route's limiter.
pub struct RateLimiter {
    limit: RateLimit,
    limiter: Limiter,
    clock: MonotonicClock,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("limit", &self.limit)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// `unrecorded` counts the requests served uncounted because the table was full.
    pub fn new(limit: RateLimit, unrecorded: Arc<AtomicU64>) -> Self {
        let quota = quota(limit.per, limit.requests, limit.burst);
        let table = Table {
            states: DashMap::new(),
            len: AtomicUsize::new(0),
            max: limit.max_clients,
            unrecorded,
        };
        RateLimiter {
            limit,
            limiter: governor::RateLimiter::new(quota, table, MonotonicClock),
            clock: MonotonicClock,
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one request of `client`'s allowance, or says how long until it may come back.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&ClientKey::of(client))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops the clients whose allowance is full again (they would start afresh anyway), so
    /// the table holds only recent clients. Takes each shard's lock in turn: run it off the
    /// request threads (`spawn_blocking`).
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
    }

    /// Clients remembered now.
    pub fn clients(&self) -> usize {
        self.limiter.len()
    }
}

/// `count` per `per` with bursts of `burst`, as governor's quota. Validation keeps both counts
/// at least 1 and `per / count` at least a millisecond; out of that range it stays sane.
pub(crate) fn quota(per: Duration, count: u32, burst: u32) -> Quota {
    let period = (per / count.max(1)).max(Duration::from_millis(1));
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period)
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
        .allow_burst(burst)
}

/// governor's state store: one GCRA timestamp (governor's theoretical arrival time, 0 for a
/// new client) per client, at most `max` clients.
struct Table {
    states: DashMap<ClientKey, AtomicU64>,
    /// `states.len()` without visiting every shard.
    len: AtomicUsize,
    max: usize,
    unrecorded: Arc<AtomicU64>,
}

/// governor's update of one state: compare-and-swap until the decision sticks (as its own
/// in-memory state does).
fn measure_and_replace<T, F, E>(state: &AtomicU64, f: F) -> Result<T, E>
where
    F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
{
    let mut prev = state.load(Ordering::Acquire);
    loop {
        let (result, next) = f((prev != 0).then(|| Nanos::from(prev)))?;
        match state.compare_exchange_weak(prev, next.into(), Ordering::Release, Ordering::Relaxed) {
            Ok(_) => return Ok(result),
            Err(now) => prev = now,
        }
    }
}

impl StateStore for Table {
    type Key = ClientKey;

    fn measure_and_replace<T, F, E>(&self, key: &ClientKey, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        if let Some(state) = self.states.get(key) {
            return measure_and_replace(&state, f);
        }
        if self.len.load(Ordering::Relaxed) >= self.max {
            // No room: decide as for a new client, remember nothing.
            self.unrecorded.fetch_add(1, Ordering::Relaxed);
            return f(None).map(|(result, _)| result);
        }
        let state = self.states.entry(*key).or_insert_with(|| {
            self.len.fetch_add(1, Ordering::Relaxed);
            AtomicU64::new(0)
        });
        measure_and_replace(&state, f)
    }
}

impl ShrinkableKeyedStateStore<ClientKey> for Table {
    fn retain_recent(&self, drop_below: Nanos) {
        let drop_below: u64 = drop_below.into();
        self.states.retain(|_, state| {
            let keep = state.load(Ordering::Relaxed) > drop_below;
            if !keep {
                self.len.fetch_sub(1, Ordering::Relaxed);
            }
            keep
        });
    }

    fn len(&self) -> usize {
        self.len.load(Ordering::Relaxed)
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(requests: u32, per: Duration, burst: u32, max_clients: usize) -> RateLimiter {
        let limit = RateLimit {
            requests,
            per,
            burst,
            max_clients,
        };
        RateLimiter::new(limit, Arc::default())
    }

    #[test]
    fn a_client_gets_its_burst_then_waits_and_others_are_not_affected() {
        let l = limiter(2, Duration::from_secs(60), 3, 100);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.check(a), Ok(()));
        }
        let wait = l.check(a).unwrap_err();
        // One request every 30 s: the next one is at most that far away.
        assert!(
            wait > Duration::from_secs(25) && wait <= Duration::from_secs(30),
            "{wait:?}"
        );
        assert_eq!(l.check("192.0.2.2".parse().unwrap()), Ok(()));
        // One IPv6 /64 is one client; NAT64 addresses are their IPv4 client.
        let v6: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(l.check(v6), Ok(()));
        }
        assert!(l.check("2001:db8:1:2:ffff::9".parse().unwrap()).is_err());
        assert!(l.check("64:ff9b::192.0.2.1".parse().unwrap()).is_err());
        assert_eq!(l.clients(), 3);
        // Nobody is back at a full burst yet: all remembered.
        l.forget_idle();
        assert_eq!(l.clients(), 3);
    }

    #[test]
    fn a_full_table_serves_newcomers_uncounted_and_keeps_counting_its_clients() {
        let unrecorded = Arc::new(AtomicU64::new(0));
        let limit = RateLimit {
            requests: 1,
            per: Duration::from_secs(60),
            burst: 1,
            max_clients: 2,
        };
        let l = RateLimiter::new(limit, unrecorded.clone());
        let ip = |i: u8| IpAddr::from([192, 0, 2, i]);
        assert_eq!(l.check(ip(1)), Ok(()));
        assert_eq!(l.check(ip(2)), Ok(()));
        for _ in 0..3 {
            assert_eq!(l.check(ip(3)), Ok(()), "no room: not limited");
        }
        assert_eq!(unrecorded.load(Ordering::Relaxed), 3);
        assert_eq!(l.clients(), 2);
        assert!(l.check(ip(1)).is_err(), "the table's clients still are");
    }

    #[test]
    // A plain test thread, not a tokio worker: it sleeps while the limiter's clock moves on.
    #[allow(clippy::disallowed_methods)]
    fn a_client_back_at_a_full_burst_is_forgotten() {
        let l = limiter(1, Duration::from_millis(5), 1, 100);
        assert_eq!(l.check("192.0.2.1".parse().unwrap()), Ok(()));
        assert_eq!(l.clients(), 1);
        // Dropped once its allowance has been full for one more period (about 10 ms); poll
        // for that instead of guessing.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while l.clients() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            l.forget_idle();
        }
        assert_eq!(l.clients(), 0);
    }
}
