//! The line of requests waiting for a connection, oldest first. A connection, stream slot or
//! connect slot that frees up is handed to the request at its head directly, under the pool's
//! lock, so a request that arrives later cannot take it first: the one that waited longest is
//! served first, as in HAProxy's queue. Requests that gave up are skipped.

use super::lease::Lease;
use super::ConnectSlot;
use std::collections::VecDeque;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// What a queued request is handed: a connection (or h2 stream slot) to use, or room under
/// `max_connections` to open one.
pub(super) enum Handed {
    Lease(Lease),
    Connect(ConnectSlot),
}

/// A queued request: where its connection goes, and when it asked (for `Lease::waited`).
struct Waiter {
    id: u64,
    started: Instant,
    tx: oneshot::Sender<Handed>,
}

/// A request's place in the line.
pub(super) struct Ticket {
    pub id: u64,
    pub rx: oneshot::Receiver<Handed>,
}

#[derive(Default)]
pub(super) struct Queue {
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

impl Queue {
    /// Whether no live request is waiting (skipping, and so dropping, given-up ones at the
    /// head).
    pub fn none_waiting(&mut self) -> bool {
        self.front_started().is_none()
    }

    /// Entries, including ones given up but not yet skipped.
    pub fn entries(&self) -> usize {
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

    /// Takes its place by when the request asked: at the back for a new one, further up for
    /// one coming back after a refused connect.
    pub fn push(&mut self, started: Instant) -> Ticket {
        let (tx, rx) = oneshot::channel();
        self.next_id += 1;
        let id = self.next_id;
        let at = self
            .waiters
            .iter()
            .rposition(|w| w.started <= started)
            .map_or(0, |i| i + 1);
        self.waiters.insert(at, Waiter { id, started, tx });
        Ticket { id, rx }
    }

    /// Gives `what` to the request at the head; hands it back if that request went away
    /// meanwhile (the caller then undoes it: neither a lease nor a slot may drop under the
    /// lock).
    pub fn hand(&mut self, what: Handed) -> Result<(), Handed> {
        match self.waiters.pop_front() {
            Some(w) => w.tx.send(what),
            None => Err(what),
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_request_takes_its_place_by_when_it_asked() {
        let mut q = Queue::default();
        let t0 = Instant::now();
        let later = |ms| t0 + Duration::from_millis(ms);
        let a = q.push(later(10));
        let b = q.push(later(20));
        // Back after a refused connect: it asked before `b`.
        let c = q.push(later(15));
        let d = q.push(later(30));
        let order: Vec<u64> = q.waiters.iter().map(|w| w.id).collect();
        assert_eq!(order, [a.id, c.id, b.id, d.id]);
        // One that gave up is skipped at the head.
        drop(a);
        assert_eq!(q.front_started(), Some(later(15)));
        q.remove(b.id);
        assert_eq!(q.entries(), 2);
        drop((c, d));
    }
}
