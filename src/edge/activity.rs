//! Requests in flight on one client connection (TCP or QUIC), and since when there have been
//! none: the connection's idle timer checks it when it fires instead of being woken on every
//! request start and end.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::{Instant, Sleep};

pub struct Activity {
    in_flight: AtomicUsize,
    /// When the last request in flight ended, in ns since `epoch`.
    idle_since: AtomicU64,
    epoch: Instant,
    /// A request ended (for a drain that waits for the last one; nothing waits otherwise).
    ended: Notify,
}

impl Activity {
    pub fn new() -> Arc<Self> {
        Arc::new(Activity {
            in_flight: AtomicUsize::new(0),
            idle_since: AtomicU64::new(0),
            epoch: Instant::now(),
            ended: Notify::new(),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    /// Completes when a request ends (a permit is kept if none waits).
    pub async fn ended(&self) {
        self.ended.notified().await
    }

    /// How long the connection has had no request in flight; `None` while it has one.
    fn idle_for(&self, now: Instant) -> Option<Duration> {
        if self.in_flight() > 0 {
            return None;
        }
        let since = Duration::from_nanos(self.idle_since.load(Ordering::Acquire));
        Some(now.saturating_duration_since(self.epoch + since))
    }

    /// The connection's idle timer fired: true when it has been idle for `idle`, else the
    /// timer is re-armed for when it would be.
    pub fn idle_expired(&self, idle: Duration, timer: Pin<&mut Sleep>) -> bool {
        let now = Instant::now();
        match self.idle_for(now) {
            Some(d) if d >= idle => true,
            Some(d) => {
                timer.reset(now + (idle - d));
                false
            }
            None => {
                timer.reset(now + idle);
                false
            }
        }
    }
}

/// One request (or tunnel) in flight, for as long as it lives.
pub struct InFlight(Arc<Activity>);

impl InFlight {
    pub fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(activity.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        // Stamped by every request that ends, before its count goes: a timer that sees no
        // request in flight also sees a stamp at least as recent as the last one to end.
        let ns = u64::try_from(a.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
        a.idle_since.fetch_max(ns, Ordering::AcqRel);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.ended.notify_one();
    }
}
