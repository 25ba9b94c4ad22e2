//! Idle trials: how a learned idle timeout that is too low gets corrected. The pool rotates
//! idle connections at 3/4 of the observed value, so it never sees whether the origin would
//! have kept them longer. Now and then, instead of closing a connection rotation retired, the
//! pool keeps it open, idle and out of service (no request ever uses it), up to twice the
//! value: closed by the origin before that, its close is one more observation; still open,
//! the value doubles (`idle::IdleLearner::trial_survived`). One trial at a time, the next
//! no sooner than [`SPACING`] times the value after the last, so it costs the origin one
//! idle connection now and then.

use super::{conn::Conn, millis, Inner, UpstreamBody};
use hyper::client::conn::http1;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

/// A new trial waits this many learned timeouts after the last one ended.
const SPACING: u64 = 8;

/// The connection under trial.
pub(super) struct Trial {
    conn: Arc<Conn>,
    /// Keeps an http/1.1 connection open: dropping the sender closes it.
    _h1: Option<http1::SendRequest<UpstreamBody>>,
    /// The learned value it tests.
    base: Duration,
}

impl Trial {
    pub(super) fn conn_id(&self) -> u64 {
        self.conn.id
    }

    /// Its close is ours, not the origin's: not an observation.
    pub(super) fn mark_draining(&self) {
        self.conn.flags.draining.store(true, Ordering::Release);
    }
}

impl Inner {
    /// Takes idle connection `id` out of service as a trial, if one may start (an observed
    /// value, no trial running, spaced from the last). It counts as retiring, so the pool
    /// refills as for a rotation. False: the caller retires it as usual.
    pub(super) fn start_trial(&self, id: u64) -> bool {
        let Some(base) = self.idle.trial_base() else {
            return false;
        };
        let now = self.now_ms();
        let mut st = self.lock();
        let spaced = st
            .trial_ended_ms
            .is_none_or(|t| now.saturating_sub(t) >= millis(base).saturating_mul(SPACING));
        if st.trial.is_some() || !spaced {
            return false;
        }
        // Still idle: an h2 connection may have taken a stream while its replacement opened.
        let idle = |c: &Conn| {
            !c.flags.closed.load(Ordering::Acquire) && c.in_flight.load(Ordering::Acquire) == 0
        };
        let (conn, h1) = if let Some(i) = st.h2.iter().position(|c| c.id == id && idle(c)) {
            (st.h2.remove(i), None)
        } else if let Some(i) = st.idle_h1.iter().position(|(c, _)| c.id == id && idle(c)) {
            let (c, send) = st.idle_h1.remove(i);
            (c, Some(send))
        } else {
            return false;
        };
        // Under the lock, as `on_closed` reads it: its close uncounts it from `retiring`.
        conn.flags.trial.store(true, Ordering::Release);
        st.retiring += 1;
        st.trial = Some(Trial {
            conn,
            _h1: h1,
            base,
        });
        drop(st);
        self.stats.idle_trials.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(origin = %self.origin.name, conn = id, base = ?base, "idle trial: kept out of service to see whether the origin closes it before twice the learned idle timeout");
        true
    }

    /// Ends the trial once its connection has been idle for twice its base: the origin's
    /// timeout is longer than learned. Closing it is then ours (draining). A trial whose
    /// connection carries a stream ends without a verdict (a guard: `start_trial` takes only
    /// idle ones, under the lock that hands out streams).
    pub(super) fn check_trial(&self) {
        let now = self.now_ms();
        let mut st = self.lock();
        let Some(t) = &st.trial else {
            return;
        };
        let busy = t.conn.in_flight.load(Ordering::Acquire) > 0;
        let idle = now.saturating_sub(t.conn.flags.last_used_ms.load(Ordering::Acquire));
        let survived = !busy && idle >= millis(t.base).saturating_mul(2);
        if !(busy || survived) || t.conn.flags.closed.load(Ordering::Acquire) {
            return;
        }
        let Some(t) = st.trial.take() else {
            return;
        };
        st.trial_ended_ms = Some(now);
        t.mark_draining();
        drop(st);
        if survived {
            self.idle.trial_survived(t.base);
        }
        // Dropped here, outside the lock: the connection closes (after its stream, if any).
        drop(t);
    }

    /// The trial's connection closed (`on_closed`, under the lock): by the origin, unless
    /// `check_trial` ended it first.
    pub(super) fn trial_closed(&self, st: &mut super::State, id: u64) -> Option<Trial> {
        if st.trial.as_ref().is_some_and(|t| t.conn_id() == id) {
            st.trial_ended_ms = Some(self.now_ms());
            return st.trial.take();
        }
        None
    }
}
