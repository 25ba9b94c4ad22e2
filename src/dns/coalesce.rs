//! When a UDP worker on io_uring waits for a batch of queries (`[dns] udp_coalesce`) and
//! when it answers at once, adaptively, as a NIC's interrupt coalescing does. See
//! [`Coalescer`] for why and how.

use std::time::{Duration, Instant};

/// A wait ends early once this many datagrams are in: a burst that fills a quarter of an
/// io_uring worker's buffers is answered without waiting out the window.
pub const WANT: usize = 32;
/// How long the arrival rate is counted over, and how long a window that came up short
/// turns waiting off.
const PERIOD: Duration = Duration::from_millis(10);
/// One period in this many answers at once throughout, to measure the rate anew.
const PROBE_EVERY: u32 = 8;
/// Queries a window must be expected to bring for waiting to be worth it.
const MIN_EXPECTED: f64 = 2.0;
/// A period of waiting whose rate falls below this share of the rate answering at once
/// slowed the clients down.
const SLOWED: f64 = 0.9;

/// Waiting pays only while queries come on their own, independently of the answers (many
/// resolvers). A client that sends its next query only once it has its answer (a stub asking
/// one name after another, a load generator's limit of outstanding queries) would be held
/// back by every window: one waiting out 1 ms gets 1,000 answers a second instead of tens of
/// thousands. So the worker measures how fast queries come while it answers at once (a
/// period of [`PERIOD`] without waiting, every [`PROBE_EVERY`] periods), waits only when that
/// rate fills a window with a few queries, stops waiting for the rest of a period as soon as
/// a window brings well under what that rate promised, and until the next measuring period
/// once a period of waiting saw queries come slower than answering at once did.
#[derive(Debug)]
pub struct Coalescer {
    start: Instant,
    /// Datagrams this period.
    count: usize,
    /// Some wait this period had a window (its count says nothing of the open rate).
    waited: bool,
    /// Datagrams per microsecond over the last period without a window; 0 until measured.
    open_per_us: f64,
    /// Periods so far; every [`PROBE_EVERY`]th measures.
    period: u32,
    /// A window this period brought well under what `open_per_us` promised.
    held_back: bool,
    /// A period of waiting saw a slower rate than `open_per_us`: no waiting until the next
    /// measuring period.
    slowed: bool,
    /// Datagrams the last wake-up brought.
    last_batch: usize,
}

impl Coalescer {
    /// Starts measuring at `now`: no waiting until a period has.
    pub fn new(now: Instant) -> Self {
        Coalescer {
            start: now,
            count: 0,
            waited: false,
            open_per_us: 0.0,
            // The first period measures.
            period: 0,
            held_back: false,
            slowed: false,
            last_batch: 0,
        }
    }

    /// The window for the next wait, in microseconds, given `[dns] udp_coalesce` (0: answer
    /// what comes at once).
    pub fn window(&self, configured_us: u32) -> u32 {
        let measuring = self.period % PROBE_EVERY == 0;
        // A wake-up that brought a full batch: queries queue on their own.
        let queuing = self.last_batch >= WANT;
        let sparse = self.open_per_us * f64::from(configured_us) < MIN_EXPECTED;
        if configured_us == 0 || measuring || queuing || sparse || self.held_back || self.slowed {
            0
        } else {
            configured_us
        }
    }

    /// A wake-up at `now` brought `datagrams` after a wait with `window_us` (0: none).
    pub fn record(&mut self, now: Instant, datagrams: usize, window_us: u32) {
        self.last_batch = datagrams;
        self.count += datagrams;
        if window_us > 0 {
            self.waited = true;
            let promised = self.open_per_us * f64::from(window_us);
            // Short of a full batch and of half the promise: the clients wait for answers.
            if (datagrams as f64) < (WANT as f64).min(promised / 2.0) {
                self.held_back = true;
            }
        }
        let elapsed = now.saturating_duration_since(self.start);
        if elapsed >= PERIOD {
            let per_us = self.count as f64 / elapsed.as_micros() as f64;
            if self.waited {
                self.slowed |= per_us < SLOWED * self.open_per_us;
            } else {
                self.open_per_us = per_us;
            }
            if self.period % PROBE_EVERY == 0 {
                self.slowed = false;
            }
            self.start = now;
            self.count = 0;
            self.waited = false;
            self.held_back = false;
            self.period = self.period.wrapping_add(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Drives a coalescer with a client: `arrivals(window_us)` is how many datagrams a
    /// wake-up brings and the microseconds it took. Returns the windows used, one per
    /// wake-up, over `total` of simulated time.
    fn drive(
        configured: u32,
        total: Duration,
        mut arrivals: impl FnMut(u32) -> (usize, u64),
    ) -> Vec<u32> {
        let start = Instant::now();
        let mut now = start;
        let mut c = Coalescer::new(now);
        let mut windows = Vec::new();
        while now - start < total {
            let w = c.window(configured);
            let (n, took) = arrivals(w);
            now += Duration::from_micros(took);
            c.record(now, n, w);
            windows.push(w);
        }
        windows
    }

    #[test]
    fn independent_queries_at_40k_a_second_are_waited_for_in_most_periods() {
        // 40 queries a millisecond: at once, one every 25 µs; a 300 µs window brings 12.
        let windows = drive(300, Duration::from_secs(1), |w| match w {
            0 => (1, 25),
            w => (w as usize / 25, u64::from(w)),
        });
        // Every eighth period measures; the rest wait.
        let waiting_time: u64 = windows.iter().map(|&w| u64::from(w)).sum();
        assert!(
            waiting_time > 800_000,
            "{waiting_time} µs of 1 s in windows"
        );
    }

    #[test]
    fn a_client_that_waits_for_each_answer_is_held_back_once_a_period_at_most() {
        // One query at a time, the next 30 µs after the answer: every window brings one.
        let windows = drive(1000, Duration::from_secs(1), |w| (1, u64::from(w.max(30))));
        let held: u64 = windows.iter().map(|&w| u64::from(w)).sum();
        // At most one window of 1 ms in each 10 ms period (and none in measuring ones).
        assert!(held <= 100 * 1000, "{held} µs of 1 s waited out");
        assert!(held > 0, "the first window of a period is tried");
        // So the client gets most of its rate: over 25 queries a millisecond, not 1.
        assert!(windows.len() > 25_000, "{} answers in 1 s", windows.len());
    }

    #[test]
    fn a_generator_with_queries_outstanding_is_held_back_at_its_cap() {
        // 250k a second answering at once, 20 a wake-up; waiting brings no more (the
        // generator has sent all it may until it has answers), far under the 75 promised.
        let windows = drive(300, Duration::from_secs(1), |w| match w {
            0 => (20, 80),
            _ => (20, 300),
        });
        let waited = windows.iter().filter(|&&w| w > 0).count();
        // At most one window per period.
        assert!(waited <= 100, "{waited} windows");
        // Waiting brings 40 where 75 were promised, short of a batch but over half the
        // promise: each window passes, yet the period's rate falls, and waiting stops until
        // the next measuring period.
        let windows = drive(300, Duration::from_secs(1), |w| match w {
            0 => (20, 80),
            _ => (40, 300),
        });
        let waiting_time: u64 = windows.iter().map(|&w| u64::from(w)).sum();
        assert!(
            waiting_time <= 200_000,
            "{waiting_time} µs of 1 s in windows"
        );
    }

    #[test]
    fn sparse_queries_are_answered_at_once() {
        // A query every 2 ms: a 1 ms window would bring half of one.
        let windows = drive(1000, Duration::from_secs(1), |w| {
            (1, u64::from(w).max(2000))
        });
        assert!(windows.iter().all(|&w| w == 0), "{windows:?}");
    }

    /// A coalescer after a measuring period of one query a microsecond, one a wake-up;
    /// and the time that period ended.
    fn measured() -> (Coalescer, Instant) {
        let start = Instant::now();
        let mut c = Coalescer::new(start);
        let us = PERIOD.as_micros() as u64;
        for i in 1..=us {
            c.record(start + Duration::from_micros(i), 1, 0);
        }
        (c, start + PERIOD)
    }

    #[test]
    fn a_full_batch_and_zero_configured_answer_at_once() {
        let (mut c, now) = measured();
        assert_eq!(c.window(300), 300);
        assert_eq!(c.window(0), 0);
        c.record(now + Duration::from_micros(50), WANT, 0);
        assert_eq!(c.window(300), 0);
    }

    #[test]
    fn a_long_idle_gap_measures_again_before_waiting() {
        let (mut c, now) = measured();
        assert_eq!(c.window(300), 300);
        // One query after a minute of nothing: the period that ends is sparse.
        c.record(now + Duration::from_secs(60), 1, 0);
        assert_eq!(c.window(300), 0);
    }
}
