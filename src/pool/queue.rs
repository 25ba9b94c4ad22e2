//! The line of requests waiting for a connection, oldest first. A connection or stream slot
//! that frees up is handed to the request at its head directly, under the pool's lock, so a
//! request that arrives later cannot take it first: the one that waited longest is served
//! first, as in HAProxy's queue. Requests that gave up are skipped.

use super::lease::Lease;
use std::collections::VecDeque;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// A queued request: where its connection goes, and when it asked (for `Lease::waited`).
struct Waiter {
    id: u64,
    started: Instant,
    tx: oneshot::Sender<Lease>,
}

/// A request's place in the line.
pub(super) struct Ticket {
    pub id: u64,
    pub rx: oneshot::Receiver<Lease>,
}

#[derive(Default)]
pub(super) struct Queue {
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

impl Queue {
    /// Whether a live request is waiting.
    pub fn is_empty(&mut self) -> bool {
        self.front_started().is_none()
    }

    /// Entries, including ones given up but not yet skipped.
    pub fn len(&self) -> usize {
        self.waiters.len()
    }

    /// When the request at the head asked, skipping requests that gave up.
    pub fn front_started(&mut self) -> Option<Instant> {
        while let Some(w) = self.waiters.front() {
            if !w.tx.is_closed() {
                return Some(w.started);
            }
            self.waiters.pop_front();
        }
        None
    }

    pub fn push(&mut self, started: Instant) -> Ticket {
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        let id = self.next_id;
        self.waiters.push_back(Waiter { id, started, tx });
        Ticket { id, rx }
    }

    /// Gives `lease` to the request at the head; hands it back if that request went away
    /// meanwhile (the caller then undoes the lease, which must not drop under the lock).
    pub fn hand(&mut self, lease: Lease) -> Result<(), Lease> {
        match self.waiters.pop_front() {
            Some(w) => w.tx.send(lease),
            None => Err(lease),
        }
    }

    pub fn remove(&mut self, id: u64) {
        // Searched from the front: the oldest are the ones that time out.
        if let Some(i) = self.waiters.iter().position(|w| w.id == id) {
            self.waiters.remove(i);
        }
    }

    /// Drops every place in line: each waiting request sees the pool closed.
    pub fn clear(&mut self) {
        self.waiters.clear();
    }
}
