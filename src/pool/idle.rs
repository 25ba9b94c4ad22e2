//! Learning the origin's idle timeout, so idle connections are rotated shortly before the
//! origin would close them instead of racing it: the origin's `origin_idle_timeout` when the
//! operator states it (then nothing is learned), else from `Keep-Alive: timeout=N` when the
//! origin announces it, otherwise from two consecutive idle closes after about the same
//! interval (which closes that were not idle timeouts can mislead: the setting is the way
//! out).
//!
//! An observed value is only ever confirmed from below, since the pool rotates idle
//! connections before it: so now and then one rotated connection is not closed but kept out
//! of service, idle, up to twice the value (an idle trial, see the pool's maintenance). If
//! the origin closes it, that close is one more observation; if it survives, the value was
//! too low (closes that were not the idle timeout taught it) and is doubled.

use super::millis;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Shortest idle close we treat as a timeout rather than noise.
const MIN_LEARNED: Duration = Duration::from_millis(200);
/// An observed value that doubles past this is forgotten: the origin keeps idle connections
/// for as long as the pool cares.
const MAX_LEARNED: Duration = Duration::from_secs(3600);

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
    /// Idle trials that outlived twice the observed value (which was then doubled).
    trials_survived: AtomicU64,
}

impl IdleLearner {
    /// A learner that starts from `configured` (and then learns nothing) when given one.
    pub fn new(configured: Option<Duration>) -> Self {
        let ms = configured.map_or(0, millis);
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
        let ms = millis(timeout);
        if self.announced_ms.swap(ms, Ordering::AcqRel) != ms {
            self.learned_ms.store(ms, Ordering::Release);
            tracing::info!(timeout = ?timeout, "origin announced its keep-alive timeout");
        }
    }

    /// The observed timeout an idle trial tests now, if one may run: only an observed value
    /// is tried (a configured or announced one is the origin's word).
    pub fn trial_base(&self) -> Option<Duration> {
        if self.configured || self.announced_ms.load(Ordering::Acquire) != 0 {
            return None;
        }
        self.learned()
    }

    /// An idle trial of `base` kept its connection open, idle, for twice `base`: the origin's
    /// timeout is longer, so the value doubles (or is forgotten past [`MAX_LEARNED`]),
    /// unless it changed meanwhile.
    pub fn trial_survived(&self, base: Duration) {
        let base_ms = millis(base);
        let doubled = base.saturating_mul(2);
        let next_ms = if doubled > MAX_LEARNED {
            0
        } else {
            base_ms.saturating_mul(2)
        };
        let swapped =
            self.learned_ms
                .compare_exchange(base_ms, next_ms, Ordering::AcqRel, Ordering::Acquire);
        if swapped.is_ok() {
            self.trials_survived.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                learned = ?base,
                now = ?(next_ms > 0).then_some(doubled),
                "the origin kept an idle connection open past twice the learned idle timeout; raising it"
            );
        }
    }

    /// Idle trials that showed the observed value too low.
    pub fn trials_survived(&self) -> u64 {
        self.trials_survived.load(Ordering::Relaxed)
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
                let ms = millis(lo);
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
    fn a_surviving_idle_trial_doubles_an_observed_timeout_and_nothing_else() {
        let l = IdleLearner::default();
        assert_eq!(l.trial_base(), None);
        l.observe_close(Duration::from_millis(300));
        l.observe_close(Duration::from_millis(300));
        let base = l.trial_base().expect("observed");
        assert_eq!(base, Duration::from_millis(300));
        l.trial_survived(base);
        assert_eq!(l.learned(), Some(Duration::from_millis(600)));
        assert_eq!(l.trials_survived(), 1);
        // A trial of a value that changed meanwhile changes nothing.
        l.trial_survived(base);
        assert_eq!(l.learned(), Some(Duration::from_millis(600)));
        // Past an hour, the value is forgotten.
        l.observe_close(Duration::from_secs(2000));
        l.observe_close(Duration::from_secs(2000));
        l.trial_survived(Duration::from_secs(2000));
        assert_eq!(l.learned(), None);
        // Configured and announced values are never tried.
        assert_eq!(
            IdleLearner::new(Some(Duration::from_secs(5))).trial_base(),
            None
        );
        let a = IdleLearner::default();
        a.announce(Duration::from_secs(5));
        assert_eq!(a.trial_base(), None);
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
