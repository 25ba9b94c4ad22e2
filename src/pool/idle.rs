//! Learning the origin's idle timeout, so idle connections are rotated shortly before the
//! origin would close them instead of racing it: the origin's `origin_idle_timeout` when the
//! operator states it (then nothing is learned), else from `Keep-Alive: timeout=N` when the
//! origin announces it, otherwise from two consecutive idle closes after about the same
//! interval (which closes that were not idle timeouts can mislead: the setting is the way
//! out).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Shortest idle close we treat as a timeout rather than noise.
const MIN_LEARNED: Duration = Duration::from_millis(200);

#[derive(Debug, Default)]
pub struct IdleLearner {
    /// Learned timeout in ms; 0 = unknown. Read lock-free by the warm task and /pools.
    learned_ms: AtomicU64,
    announced_ms: AtomicU64,
    /// The previous observed idle close, to compare with the next.
    last_observed: Mutex<Option<Duration>>,
    /// The timeout was configured: announcements and closes change nothing.
    configured: bool,
    /// Idle closes by the origin before a configured timeout's rotation point: the stated
    /// value is too high.
    early_closes: AtomicU64,
}

impl IdleLearner {
    /// A learner that starts from `configured` (and then learns nothing) when given one.
    pub fn new(configured: Option<Duration>) -> Self {
        let ms = configured.map_or(0, |t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX));
        IdleLearner {
            learned_ms: AtomicU64::new(ms),
            configured: configured.is_some(),
            ..Self::default()
        }
    }

    pub fn learned(&self) -> Option<Duration> {
        match self.learned_ms.load(Ordering::Acquire) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }

    /// Where [`learned`](Self::learned) comes from: "configured", "announced" or "observed";
    /// `None` while unknown.
    pub fn source(&self) -> Option<&'static str> {
        self.learned()?;
        Some(if self.configured {
            "configured"
        } else if self.announced_ms.load(Ordering::Acquire) != 0 {
            "announced"
        } else {
            "observed"
        })
    }

    /// The origin said `Keep-Alive: timeout=N`.
    pub fn announce(&self, timeout: Duration) {
        if self.configured || timeout < MIN_LEARNED {
            return;
        }
        let ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
        if self.announced_ms.swap(ms, Ordering::AcqRel) != ms {
            self.learned_ms.store(ms, Ordering::Release);
            tracing::info!(timeout = ?timeout, "origin announced its keep-alive timeout");
        }
    }

    /// Idle closes by the origin that came before a configured timeout's rotation point.
    pub fn early_closes(&self) -> u64 {
        self.early_closes.load(Ordering::Relaxed)
    }

    /// An idle connection was closed by the far side after `idle`.
    pub fn observe_close(&self, idle: Duration) {
        if self.configured {
            self.check_configured(idle);
            return;
        }
        if idle < MIN_LEARNED || self.announced_ms.load(Ordering::Acquire) != 0 {
            return;
        }
        let mut last = self.last_observed.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(prev) = *last {
            let (lo, hi) = if prev < idle {
                (prev, idle)
            } else {
                (idle, prev)
            };
            // "Steady": two closes within 10% (+50ms of scheduling noise) of each other.
            if hi - lo <= lo / 10 + Duration::from_millis(50) {
                let ms = u64::try_from(lo.as_millis()).unwrap_or(u64::MAX);
                if self.learned_ms.swap(ms, Ordering::AcqRel) != ms {
                    tracing::info!(timeout = ?lo, "learned the origin's idle timeout from its closes");
                }
            }
        }
        *last = Some(idle);
    }

    /// A configured timeout is trusted, but an idle close before the point where the pool
    /// would have rotated the connection (3/4 of it) says it is too high: counted, and
    /// warned of the first time.
    fn check_configured(&self, idle: Duration) {
        let configured = Duration::from_millis(self.learned_ms.load(Ordering::Acquire));
        if idle < MIN_LEARNED || idle >= configured * 3 / 4 {
            return;
        }
        if self.early_closes.fetch_add(1, Ordering::Relaxed) == 0 {
            tracing::warn!(
                idle = ?idle,
                configured = ?configured,
                "the origin closed an idle connection before origin_idle_timeout's rotation point; is it set too high?"
            );
        }
    }
}

/// Parses `timeout=N` out of a Keep-Alive header value.
pub fn parse_keep_alive(value: &str) -> Option<Duration> {
    value.split(',').find_map(|part| {
        let (k, v) = part.split_once('=')?;
        if k.trim().eq_ignore_ascii_case("timeout") {
            v.trim().parse::<u64>().ok().map(Duration::from_secs)
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_similar_idle_closes_teach_the_timeout() {
        let l = IdleLearner::default();
        l.observe_close(Duration::from_millis(5000));
        assert_eq!(l.learned(), None);
        l.observe_close(Duration::from_millis(5030));
        assert_eq!(l.learned(), Some(Duration::from_millis(5000)));
        assert_eq!(l.source(), Some("observed"));
    }

    #[test]
    fn an_announced_timeout_wins_over_observations() {
        let l = IdleLearner::default();
        l.announce(Duration::from_secs(4));
        l.observe_close(Duration::from_millis(900));
        l.observe_close(Duration::from_millis(900));
        assert_eq!(l.learned(), Some(Duration::from_secs(4)));
        assert_eq!(l.source(), Some("announced"));
    }

    #[test]
    fn a_configured_timeout_is_neither_announced_over_nor_learned_over() {
        let l = IdleLearner::new(Some(Duration::from_secs(75)));
        assert_eq!(l.learned(), Some(Duration::from_secs(75)));
        l.announce(Duration::from_secs(5));
        l.observe_close(Duration::from_millis(1100));
        l.observe_close(Duration::from_millis(1100));
        assert_eq!(l.learned(), Some(Duration::from_secs(75)));
        assert_eq!(l.source(), Some("configured"));
        assert_eq!(IdleLearner::new(None).learned(), None);
        assert_eq!(IdleLearner::new(None).source(), None);
        // 1.1 s is before 3/4 of 75 s: counted as a sign the setting is too high; a close
        // after the rotation point (a connection kept busy past it) is not.
        assert_eq!(l.early_closes(), 2);
        l.observe_close(Duration::from_secs(60));
        assert_eq!(l.early_closes(), 2);
    }

    #[test]
    fn keep_alive_header_values_parse() {
        assert_eq!(
            parse_keep_alive("timeout=5, max=100"),
            Some(Duration::from_secs(5))
        );
        assert_eq!(parse_keep_alive("max=100"), None);
    }
}
