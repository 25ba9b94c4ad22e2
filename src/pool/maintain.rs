//! The warm task: keeps the target number of connections open (the floor, raised by adaptive
//! warmth), refilling at once when one closes and backing off (jittered, exponential, bounded)
//! while the origin refuses; rotates connections that reached their age or are about to hit
//! the origin's learned idle timeout, opening the replacement before retiring the old one.

use super::{conn, Inner};
use rand::Rng;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::time::Instant;

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Re-check even without a wake-up: rotation, decay, and a notification racing a change.
const TICK: Duration = Duration::from_secs(1);
/// Recent peak decays by this factor per second: half-life of about 70 s.
const PEAK_DECAY_PER_SEC: f64 = 0.99;

pub(super) async fn run(inner: Arc<Inner>) {
    let mut failures: u32 = 0;
    let mut last_decay = Instant::now();
    let mut last_probe = Instant::now();
    loop {
        if inner.shutdown.is_cancelled() {
            return;
        }
        decay_peak(&inner, &mut last_decay);
        if let Some(rtt) = inner.sample_rtt() {
            inner.stats.record_tcp_rtt(rtt);
        }
        if let Some(rtt) = inner.sample_ping_rtt() {
            inner.stats.record_ping_rtt(rtt);
        }
        inner.check_trial();
        let wanted = reserve_deficit(&inner);
        let mut failed = open_n(&inner, wanted).await;
        if !failed {
            failed = rotate(&inner).await;
        }
        if failed {
            failures = failures.saturating_add(1);
            let delay = backoff(failures);
            inner
                .stats
                .backoff_until_ms
                .store(unix_ms_after(delay), Ordering::Relaxed);
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = inner.shutdown.cancelled() => return,
            }
            inner.stats.backoff_until_ms.store(0, Ordering::Relaxed);
            continue;
        }
        failures = 0;
        if wanted > 0 {
            continue;
        }
        if needs_probe(&inner) && last_probe.elapsed() >= inner.origin.health_interval {
            last_probe = Instant::now();
            tokio::select! {
                () = probe(&inner) => {}
                _ = inner.shutdown.cancelled() => return,
            }
        }
        // select!: whichever comes first — a connection closed, the tick, or shutdown.
        tokio::select! {
            _ = inner.maintain.notified() => {}
            _ = tokio::time::sleep(tick(&inner)) => {}
            _ = inner.shutdown.cancelled() => return,
        }
    }
}

/// An origin marked down with nothing that would ever check it again: no health path, and
/// no floor to keep (so no connects). Without a probe it would stay down for good once
/// clients are steered away, since only requests could bring it back.
fn needs_probe(inner: &Inner) -> bool {
    !inner.health.is_up() && inner.origin.health_path.is_none() && inner.target() == 0
}

/// A connect check: TCP and TLS to the origin (under `connect_timeout`), the wait for a
/// refused client certificate (`conn::settle_after_handshake`), then closed; counts toward
/// `healthy_after`.
async fn probe(inner: &Arc<Inner>) {
    match conn::connect(inner, true).await {
        Ok(_) => inner.note_success(),
        Err(e) => {
            inner.stats.record_failure(&e);
            inner.note_failure();
        }
    }
}

/// Opens `n` connections (slots already reserved) concurrently; true if any failed.
async fn open_n(inner: &Arc<Inner>, n: usize) -> bool {
    if n == 0 {
        return false;
    }
    let results = futures_util::future::join_all((0..n).map(|_| async {
        let started = Instant::now();
        (conn::open(inner, true).await, started.elapsed())
    }))
    .await;
    let was_up = inner.health.is_up();
    let mut failures: Option<(usize, String)> = None;
    let mut failed = false;
    for (r, took) in results {
        match r {
            Ok(opened) => {
                inner.stats.record_warm_open(took);
                if inner.add_idle(opened) {
                    if inner.origin.health_path.is_none() {
                        inner.note_success();
                    }
                } else {
                    // Closed before it could be counted (refused late): a failed connect.
                    failed = true;
                    inner.stats.failed.fetch_add(1, Ordering::Relaxed);
                    inner.note_failure();
                }
            }
            Err(e) => {
                failed = true;
                let (n, _) = failures.get_or_insert_with(|| (0, e.to_string()));
                *n += 1;
                inner.stats.record_failure(&e);
                inner.note_failure();
                inner.cancel_connect();
            }
        }
    }
    if let Some((n, error)) = failures {
        log_failed_opens(inner, was_up, n, &error);
    }
    failed
}

/// One line for a batch's failed opens (`n`, the first's `error`), and a warning only while
/// the origin was up: a down origin is retried on backoff for as long as it stays down, and
/// "origin marked down" said so once.
fn log_failed_opens(inner: &Inner, was_up: bool, n: usize, error: &str) {
    let origin = &inner.origin.name;
    if was_up {
        tracing::warn!(%origin, failed = n, %error, "warm connections failed");
    } else {
        tracing::debug!(%origin, failed = n, %error, "warm connections failed (origin down)");
    }
}

/// Wakes often enough to rotate before a learned idle timeout.
fn tick(inner: &Inner) -> Duration {
    match inner.idle.learned() {
        Some(t) => (t / 8).clamp(Duration::from_millis(25), TICK),
        None => TICK,
    }
}

fn decay_peak(inner: &Inner, last: &mut Instant) {
    let dt = last.elapsed().as_secs_f64();
    if dt < 0.5 {
        return;
    }
    *last = Instant::now();
    let factor = PEAK_DECAY_PER_SEC.powf(dt);
    let floor_now =
        u64::try_from(inner.in_flight.load(Ordering::Acquire)).unwrap_or(u64::MAX) * 1000;
    let _ = inner
        .peak_milli
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |p| {
            Some(((p as f64 * factor) as u64).max(floor_now))
        });
}

/// Claims connect slots for the gap between the target and what is live or opening.
fn reserve_deficit(inner: &Inner) -> usize {
    let target = inner.target();
    let mut st = inner.lock();
    let have = st.live() + st.connecting;
    let room = inner
        .origin
        .max_connections
        .saturating_sub(st.open + st.connecting);
    let wanted = target.saturating_sub(have).min(room);
    st.connecting += wanted;
    wanted
}

/// Retires connections past their age, or idle long enough that the origin's learned idle
/// timeout is near; each replacement is opened first, unless the pool holds more than its
/// target (then the connection just goes). Returns true if a replacement failed.
async fn rotate(inner: &Arc<Inner>) -> bool {
    let due = due_for_rotation(inner);
    if due.is_empty() {
        return false;
    }
    // Rotation is also how a pool shrinks back to its target after a burst: surplus
    // connections are retired without a replacement. The replacements open together.
    let surplus = inner.lock().live().saturating_sub(inner.target());
    let wanted = due.len().saturating_sub(surplus);
    let mut reserved = 0;
    while reserved < wanted && inner.reserve_connect() {
        reserved += 1;
    }
    if open_n(inner, reserved).await {
        return true;
    }
    for (i, (id, idle_expiring)) in due.into_iter().enumerate() {
        // Only a connection the pool can do without becomes a trial (one with a replacement,
        // or a surplus one): at max_connections, a trial would hold a slot the pool needs.
        let spare = i < surplus + reserved;
        if idle_expiring && spare && inner.start_trial(id) {
            continue;
        }
        if inner.retire(id) {
            inner.stats.rotated.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(origin = %inner.origin.name, conn = id, idle_expiring, "rotated connection");
        }
    }
    false
}

/// Connections past their age, or idle long enough that the origin's idle timeout is near
/// (true: idle, not aged). The old connection must be out of service by 3/4 of the timeout,
/// but this check runs once a tick and the replacement's open (handshake and settle) comes
/// first: both are taken off, down to half the timeout.
fn due_for_rotation(inner: &Inner) -> Vec<(u64, bool)> {
    let now = Instant::now();
    let now_ms = inner.now_ms();
    let lead = tick(inner) + inner.stats.warm_open_time();
    let idle_limit_ms = inner.idle.learned().map(|t| {
        let limit = (t * 3 / 4).saturating_sub(lead).max(t / 2);
        super::millis(limit)
    });
    inner
        .rotation_candidates()
        .into_iter()
        .filter_map(|(id, retire_at, last_used, in_flight)| {
            let aged = now >= retire_at;
            let idle_expiring = idle_limit_ms
                .is_some_and(|lim| in_flight == 0 && now_ms.saturating_sub(last_used) >= lim);
            (aged || idle_expiring).then_some((id, idle_expiring && !aged))
        })
        .collect()
}

/// Full jitter over the upper half of an exponential ceiling: spreads reconnects of many
/// pools and instances.
pub(super) fn backoff(failures: u32) -> Duration {
    let exp = BACKOFF_BASE.saturating_mul(1u32 << failures.min(10).saturating_sub(1));
    let ceiling = exp.min(BACKOFF_MAX);
    let lo = ceiling / 2;
    lo + rand::thread_rng().gen_range(Duration::ZERO..=ceiling - lo)
}

fn unix_ms_after(d: Duration) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    super::millis(now + d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_stays_bounded() {
        for f in 1..20 {
            let d = backoff(f);
            assert!(d <= BACKOFF_MAX, "{d:?}");
            assert!(d >= BACKOFF_BASE / 2, "{d:?}");
        }
        assert!(backoff(1) <= BACKOFF_BASE);
    }
}
