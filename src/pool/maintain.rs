//! The warm task: keeps at least the floor of connections open, refilling at once when one
//! closes and backing off (jittered, exponential, bounded) while the origin refuses.

use super::{conn, Inner};
use rand::Rng;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Re-check the floor even without a wake-up, in case a notification raced a state change.
const TICK: Duration = Duration::from_secs(1);

pub(super) async fn run(inner: Arc<Inner>) {
    let mut failures: u32 = 0;
    loop {
        if inner.shutdown.is_cancelled() {
            return;
        }
        let wanted = reserve_deficit(&inner);
        if wanted > 0 {
            let results =
                futures_util::future::join_all((0..wanted).map(|_| conn::open(&inner))).await;
            let mut failed = false;
            for r in results {
                match r {
                    Ok(opened) => {
                        inner.add_idle(opened);
                        if inner.origin.health_path.is_none() {
                            inner.note_success();
                        }
                    }
                    Err(e) => {
                        failed = true;
                        tracing::warn!(origin = %inner.origin.name, error = %e, "warm connection failed");
                        inner.stats.record_failure(&e);
                        inner.note_failure();
                        inner.cancel_connect();
                    }
                }
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
            } else {
                failures = 0;
            }
            continue;
        }
        // select!: whichever comes first — a connection closed, the periodic tick, or shutdown.
        tokio::select! {
            _ = inner.maintain.notified() => {}
            _ = tokio::time::sleep(TICK) => {}
            _ = inner.shutdown.cancelled() => return,
        }
    }
}

/// Claims connect slots for the gap between the floor and what is open or opening.
fn reserve_deficit(inner: &Inner) -> usize {
    let mut st = inner.lock();
    let have = st.open + st.connecting;
    let room = inner.origin.max_connections.saturating_sub(have);
    let wanted = inner.floor.saturating_sub(have).min(room);
    st.connecting += wanted;
    wanted
}

/// Full jitter over an exponential ceiling: spreads reconnects of many pools and instances.
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
    u64::try_from((now + d).as_millis()).unwrap_or(u64::MAX)
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
