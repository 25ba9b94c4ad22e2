//! `[[routes]] rate_limit`: how many requests one client may make on a route, as nginx's
//! `limit_req` keyed by address, Envoy's local rate limit or HAProxy's `http_req_rate`. A
//! client is an IPv4 address or an IPv6 /64, as for `max_connections_per_client`. The
//! `governor` crate keeps one GCRA state (a timestamp) per client, so a client may send
//! `burst` requests at once and then `requests` per `per`; beyond that it gets 429 with a
//! `Retry-After`, before any origin sees the request. Clients that have been quiet long
//! enough to be back at a full burst are forgotten (see [`RateLimiter::forget_idle`]).

use crate::config::RateLimit;
use crate::edge::client_limit::ClientKey;
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

/// One route's limiter.
pub struct RateLimiter {
    limiter: DefaultKeyedRateLimiter<ClientKey>,
    clock: DefaultClock,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("clients", &self.limiter.len())
            .finish()
    }
}

impl RateLimiter {
    /// `None` only for a limit the configuration cannot hold (validation refuses zeros).
    pub fn new(limit: &RateLimit) -> Option<Self> {
        let quota = Quota::with_period(limit.per / limit.requests)?
            .allow_burst(NonZeroU32::new(limit.burst)?);
        let limiter = governor::RateLimiter::dashmap(quota);
        let clock = limiter.clock().clone();
        Some(RateLimiter { limiter, clock })
    }

    /// Takes one request of `client`'s allowance, or says how long until it may come back.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        self.limiter
            .check_key(&ClientKey::of(client))
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// Drops the clients whose allowance is full again (they would start afresh anyway), so
    /// the table holds only recent clients. Called every few seconds off the request path.
    pub fn forget_idle(&self) {
        self.limiter.retain_recent();
        self.limiter.shrink_to_fit();
    }

    /// Clients remembered now.
    pub fn clients(&self) -> usize {
        self.limiter.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_gets_its_burst_then_waits_and_others_are_not_affected() {
        let limit = RateLimit {
            requests: 2,
            per: Duration::from_secs(60),
            burst: 3,
        };
        let l = RateLimiter::new(&limit).unwrap();
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
    // A plain test thread, not a tokio worker: it sleeps while the limiter's clock moves on.
    #[allow(clippy::disallowed_methods)]
    fn a_client_back_at_a_full_burst_is_forgotten() {
        let limit = RateLimit {
            requests: 1,
            per: Duration::from_millis(5),
            burst: 1,
        };
        let l = RateLimiter::new(&limit).unwrap();
        assert_eq!(l.check("192.0.2.1".parse().unwrap()), Ok(()));
        assert_eq!(l.clients(), 1);
        // 5 ms later its allowance is full again; poll for that instead of guessing.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while l.clients() > 0 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
            l.forget_idle();
        }
        assert_eq!(l.clients(), 0);
    }
}
