//! The pre-warmed upstream pool of one origin: `warm_connections` verified TLS connections
//! opened before any request and refilled whenever one closes (`maintain`), checked out per
//! request (`checkout`), and returned as the response's last data leaves for the client
//! (`lease`, released by the proxy's response body).
//!
//! h2 connections are shared: a checkout takes a stream slot (see `take_locked` for which
//! connection). http/1.1 connections are exclusive: a checkout takes an idle connection out
//! of the pool and the lease puts it back once the response is complete and the connection is
//! ready again. With nothing free and no room to connect, requests wait in a FIFO (`queue`)
//! and a freed connection, stream slot or connect slot is handed to the oldest.

mod conn;
mod error;
mod h2conn;
mod health;
mod idle;
mod lease;
mod maintain;
mod queue;
mod rtt;
mod stats;
mod trial;
mod tunnel;

pub use conn::{UpstreamBody, Warmth};
pub use error::{CheckoutError, ConnectError, UpstreamError};
pub use h2conn::ResponseBody;
pub use lease::{Lease, SendError, StreamGuard};
pub use stats::PoolSnapshot;

use crate::config::{OriginConfig, Protocol};
use crate::tls::certs::CertError;
use conn::{Conn, Opened, Sender};
use hyper::client::conn::http1;
use queue::Handed;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Streams per h2 connection before another connection is preferred; lowered to the origin's
/// SETTINGS_MAX_CONCURRENT_STREAMS when that is smaller (`Conn::stream_capacity`).
pub const H2_STREAMS_PER_CONNECTION: usize = 100;

/// Longest a warm connection takes to open: TCP and TLS, the settle wait, the protocol
/// handshake (see `conn::open`).
pub fn warm_open_limit(connect_timeout: Duration) -> Duration {
    connect_timeout * 2 + conn::SETTLE_MAX
}

/// Pause between a request's connect attempts while the origin refuses connections.
const CONNECT_RETRY_PAUSE: Duration = Duration::from_millis(50);
/// Streams an h2 connection takes before the pool spreads requests over its other
/// connections (see `take_locked`).
const SHARED_STREAMS: usize = 16;

/// A handle to one origin's pool; cheap to clone.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub origin: Arc<OriginConfig>,
    tls: tokio_rustls::TlsConnector,
    /// http/1.1 only (ALPN), for the dedicated connections of upgraded requests.
    tunnel_tls: tokio_rustls::TlsConnector,
    /// Connections kept open at all times.
    floor: usize,
    /// Guards only this origin's bookkeeping, held for a few instructions and never across an
    /// await: no request of another origin ever waits on it.
    state: Mutex<State>,
    /// Entries in `State::queue`, readable without the lock (see `release_h2`).
    queued: AtomicUsize,
    /// Wakes `wait_warm` when the number of open connections may have changed.
    warmed: Notify,
    /// Wakes the maintenance task (a connection closed, a lease failed).
    maintain: Notify,
    next_id: AtomicU64,
    waiting: AtomicUsize,
    /// Zero point of the millisecond timestamps kept in atomics.
    epoch: Instant,
    /// Requests holding a connection or stream right now, and the decaying recent peak
    /// (in thousandths) that adaptive warmth sizes the pool by.
    in_flight: AtomicUsize,
    peak_milli: AtomicU64,
    pub idle: idle::IdleLearner,
    pub stats: stats::Stats,
    health: health::Health,
    shutdown: tokio_util::sync::CancellationToken,
}

#[derive(Default)]
struct State {
    /// Open h2 connections (shared).
    h2: Vec<Arc<Conn>>,
    /// Idle http/1.1 connections with their senders, most recently used last.
    idle_h1: Vec<(Arc<Conn>, http1::SendRequest<UpstreamBody>)>,
    /// Connections whose driver is running (idle, busy, or draining).
    open: usize,
    /// Connects in progress (counted against max_connections).
    connecting: usize,
    /// Open connections retired by rotation, still finishing their exchanges.
    retiring: usize,
    busy_h1: usize,
    /// Requests waiting for a connection, oldest first.
    queue: queue::Queue,
    /// The idle trial in progress (see `trial`): an open connection out of service.
    trial: Option<trial::Trial>,
    /// When the last idle trial ended (`now_ms`); none yet: one may start at once.
    trial_ended_ms: Option<u64>,
}

impl State {
    /// Open connections that still take new requests.
    fn live(&self) -> usize {
        self.open.saturating_sub(self.retiring)
    }

    /// Counts a connect in progress if open + connecting stays within `max`.
    fn reserve_connect(&mut self, max: usize) -> bool {
        let room = self.open + self.connecting < max;
        if room {
            self.connecting += 1;
        }
        room
    }

    /// Counts a newly opened connection as open, unless its driver has already ended (its
    /// close then found it uncounted and left `open` alone). Returns whether it counted.
    fn count_open(&mut self, conn: &Conn) -> bool {
        if conn.flags.closed.load(Ordering::Acquire) {
            return false;
        }
        conn.flags.counted.store(true, Ordering::Release);
        self.open += 1;
        true
    }
}

impl Pool {
    /// Builds the pool (and its TLS client config); nothing is opened until [`Pool::start`].
    pub fn new(origin: Arc<OriginConfig>, floor: usize) -> Result<Pool, CertError> {
        let idle_timeout = origin.origin_idle_timeout;
        let tls = crate::tls::client::shared_client_config(
            &origin.address,
            &origin.server_name.to_str(),
            origin.ca.as_deref(),
            origin.protocol,
            origin.client_auth.as_ref(),
        )?;
        let tunnel_tls = crate::tls::client::shared_client_config(
            &origin.address,
            &origin.server_name.to_str(),
            origin.ca.as_deref(),
            crate::config::Protocol::Http1,
            origin.client_auth.as_ref(),
        )?;
        Ok(Pool {
            inner: Arc::new(Inner {
                floor: floor.min(origin.max_connections),
                origin,
                tls: tokio_rustls::TlsConnector::from(tls),
                tunnel_tls: tokio_rustls::TlsConnector::from(tunnel_tls),
                state: Mutex::new(State::default()),
                queued: AtomicUsize::new(0),
                warmed: Notify::new(),
                maintain: Notify::new(),
                next_id: AtomicU64::new(1),
                waiting: AtomicUsize::new(0),
                epoch: Instant::now(),
                in_flight: AtomicUsize::new(0),
                peak_milli: AtomicU64::new(0),
                idle: idle::IdleLearner::new(idle_timeout),
                stats: stats::Stats::default(),
                health: health::Health::default(),
                shutdown: tokio_util::sync::CancellationToken::new(),
            }),
        })
    }

    /// Starts the task that keeps the floor of connections open.
    pub fn start(&self) {
        tokio::spawn(maintain::run(self.inner.clone()));
        health::spawn(self);
    }

    pub fn origin(&self) -> &Arc<OriginConfig> {
        &self.inner.origin
    }

    pub fn floor(&self) -> usize {
        self.inner.floor
    }

    /// Waits until the floor is open, or `limit` passes; returns whether it is.
    pub async fn wait_warm(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        loop {
            let notified = self.inner.warmed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.inner.lock().live() >= self.inner.floor {
                return true;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.inner.lock().live() >= self.inner.floor;
            }
        }
    }

    /// Open connections that can take a request now (the meaning of "warm" for /healthz).
    pub fn warm_count(&self) -> usize {
        let st = self.inner.lock();
        match self.inner.origin.protocol {
            Protocol::H2 => st.h2.iter().filter(|c| c.is_usable()).count(),
            Protocol::Http1 => st.idle_h1.len() + st.busy_h1,
        }
    }

    /// A connection for one request: a warm one if any can take it; otherwise a new one if
    /// below `max_connections`; otherwise wait in the bounded queue up to `queue_timeout`.
    ///
    /// `retry_refused`: keep retrying refused connects until the connect timeout (for the
    /// last origin a request can use; others fail fast so the request can fail over).
    pub async fn checkout(&self, retry_refused: bool) -> Result<Lease, CheckoutError> {
        let started = Instant::now();
        if let Some(lease) = self.inner.try_take(started) {
            return Ok(lease);
        }
        self.wait_or_connect(retry_refused, started).await
    }

    /// No connection free right now: open one if the pool may, or wait in the bounded queue
    /// for one to be handed over (oldest request first).
    async fn wait_or_connect(
        &self,
        retry_refused: bool,
        started: Instant,
    ) -> Result<Lease, CheckoutError> {
        let inner = &self.inner;
        let ahead = inner.waiting.fetch_add(1, Ordering::AcqRel);
        let _unqueue = Unqueue(&inner.waiting);
        if ahead >= inner.origin.queue_size + inner.origin.max_connections {
            inner.stats.queue_full.fetch_add(1, Ordering::Relaxed);
            return Err(CheckoutError::QueueFull {
                origin: inner.origin.name.clone(),
                size: inner.origin.queue_size,
            });
        }
        let deadline = started + inner.origin.queue_timeout;
        let closed = || CheckoutError::Closed {
            origin: inner.origin.name.clone(),
        };
        let mut ticket: Option<queue::Ticket> = None;
        // Room to open a connection: claimed here when nobody waits, else handed over in turn.
        let mut slot: Option<ConnectSlot> = None;
        // After a refused connect: no new attempt before then, though a connection handed
        // over is taken. The queue timeout does not apply meanwhile: the connect timeout does.
        let mut pause: Option<Instant> = None;
        loop {
            if slot.is_none() {
                // A ticket that left the line; dropped once the lock is let go, as is
                // anything it still holds.
                let mut left = None;
                {
                    let mut st = inner.lock();
                    // Under the lock: `shutdown` cancels, then clears the line under it, so a
                    // request either sees the pool closed here or is in the line it clears.
                    if inner.shutdown.is_cancelled() {
                        return Err(closed());
                    }
                    match ticket.as_mut() {
                        Some(t) => match t.rx.try_recv() {
                            Ok(Handed::Lease(lease)) => return Ok(lease),
                            Ok(Handed::Connect(s)) => {
                                slot = Some(s);
                                left = ticket.take();
                            }
                            Err(_) => {}
                        },
                        None => {
                            if let Some(lease) = inner.take_unqueued(&mut st, started) {
                                return Ok(lease);
                            }
                            if pause.is_none() && st.queue.none_waiting() {
                                slot = inner.claim_connect(&mut st);
                            }
                            if slot.is_none() {
                                // The line holds `queue_size` (the count before the lock
                                // also holds those about to connect, so it is only a bound).
                                if st.queue.entries() >= inner.origin.queue_size {
                                    inner.stats.queue_full.fetch_add(1, Ordering::Relaxed);
                                    return Err(CheckoutError::QueueFull {
                                        origin: inner.origin.name.clone(),
                                        size: inner.origin.queue_size,
                                    });
                                }
                                // Its place in line; what frees up is handed to it in turn
                                // (at once, if there is room now).
                                ticket = Some(inner.enqueue(&mut st, started));
                            }
                        }
                    }
                }
                drop(left);
            }
            if let Some(s) = slot.take() {
                if let Some(p) = pause.take() {
                    // Handed over during the pause: kept through it.
                    tokio::time::sleep_until(p).await;
                }
                if inner.shutdown.is_cancelled() {
                    return Err(closed());
                }
                // Boxed: a connect holds a whole TLS handshake (~10 KiB). Inline it would make
                // every request's future that large; boxing the whole wait instead copied
                // those bytes on every queued request, though few of them connect.
                match Box::pin(inner.open_for_request(started, s)).await {
                    // Refused or reset while the origin restarts: nothing was sent, so keep
                    // trying (or take a connection that frees up) until the connect timeout,
                    // rather than fail a request the origin will be able to serve shortly.
                    Err(CheckoutError::Connect(e))
                        if retry_refused
                            && !e.is_timeout()
                            && Instant::now() + CONNECT_RETRY_PAUSE
                                < started + inner.origin.connect_timeout =>
                    {
                        tracing::debug!(origin = %inner.origin.name, error = %e, "connect failed; retrying within the connect timeout");
                        pause = Some(Instant::now() + CONNECT_RETRY_PAUSE);
                        continue;
                    }
                    other => return other,
                }
            }
            let Some(t) = ticket.as_mut() else {
                continue;
            };
            tokio::select! {
                handed = &mut t.rx => match handed {
                    Ok(Handed::Lease(lease)) => return Ok(lease),
                    Ok(Handed::Connect(s)) => {
                        slot = Some(s);
                        ticket = None;
                    }
                    Err(_) => return Err(closed()),
                },
                _ = tokio::time::sleep_until(pause.unwrap_or(deadline)) => {
                    if pause.take().is_none() {
                        match inner.give_up_waiting(t)? {
                            Handed::Lease(lease) => return Ok(lease),
                            // Room came just as the wait ended: used.
                            Handed::Connect(s) => {
                                slot = Some(s);
                                ticket = None;
                            }
                        }
                    }
                }
            }
        }
    }

    pub fn snapshot(&self) -> PoolSnapshot {
        self.inner.snapshot()
    }

    /// Stops refilling and closes idle connections; in-flight requests finish.
    pub fn shutdown(&self) {
        self.inner.shutdown.cancel();
        let mut st = self.inner.lock();
        st.idle_h1.clear();
        st.queue.clear();
        let trial = st.trial.take();
        if let Some(t) = &trial {
            t.mark_draining();
        }
        for c in st.h2.drain(..) {
            c.flags.draining.store(true, Ordering::Release);
        }
        drop(st);
        drop(trial);
        self.inner.warmed.notify_waiters();
    }
}

/// A claimed connect slot (`connecting` counted); see `Inner::claim_connect`. Dropped
/// unused, it goes to the next request in line (it takes the pool's lock: never dropped
/// under it).
struct ConnectSlot {
    inner: Arc<Inner>,
    /// The connection opened and now counts as open.
    taken: bool,
}

impl ConnectSlot {
    /// For a slot given back under the lock: the caller uncounts it.
    fn forget(mut self) {
        self.taken = true;
    }
}

impl Drop for ConnectSlot {
    fn drop(&mut self) {
        if !self.taken {
            self.inner.cancel_connect();
        }
    }
}

/// Whole milliseconds, saturating: the unit of the pool's timestamps and learned timeouts.
pub(crate) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

struct Unqueue<'a>(&'a AtomicUsize);
impl Drop for Unqueue<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding this lock cannot leave the counters half-updated in a way
        // that matters more than losing the pool, so recover the guard.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn now_ms(&self) -> u64 {
        millis(self.epoch.elapsed())
    }

    /// Counts a request taking a connection and raises the recent peak.
    fn enter(&self) {
        let now = self.in_flight.fetch_add(1, Ordering::AcqRel) + 1;
        self.peak_milli.fetch_max(
            u64::try_from(now).unwrap_or(u64::MAX).saturating_mul(1000),
            Ordering::AcqRel,
        );
    }

    fn leave(&self) {
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
    }

    /// Connections to keep open: the floor, or enough for the recent peak times warm_ratio.
    fn target(&self) -> usize {
        let per_conn = match self.origin.protocol {
            Protocol::H2 => H2_STREAMS_PER_CONNECTION,
            Protocol::Http1 => 1,
        };
        let peak = self.peak_milli.load(Ordering::Acquire) as f64 / 1000.0;
        let adaptive = (peak * self.origin.warm_ratio / per_conn as f64).ceil() as usize;
        self.floor.max(adaptive).min(self.origin.max_connections)
    }

    /// A free connection for a request that arrives now, unless older requests are queued:
    /// they are served first.
    fn try_take(self: &Arc<Self>, started: Instant) -> Option<Lease> {
        let mut st = self.lock();
        self.take_unqueued(&mut st, started)
    }

    fn take_unqueued(self: &Arc<Self>, st: &mut State, started: Instant) -> Option<Lease> {
        if st.queue.none_waiting() {
            self.take_locked(st, started)
        } else {
            None
        }
    }

    /// Takes a free connection (http/1.1) or stream slot (h2), if any.
    fn take_locked(self: &Arc<Self>, st: &mut State, started: Instant) -> Option<Lease> {
        if !self.origin.pooling {
            return None;
        }
        match self.origin.protocol {
            Protocol::H2 => {
                // Streams share one connection up to SHARED_STREAMS before the next is used:
                // a busy connection batches many streams' frames into each write (Envoy keeps
                // to one connection until its stream limit). Past that, the least busy one
                // takes the load, so a loss on one TCP connection stalls only its share.
                // Capacity takes h2's lock, so it is checked for one candidate at a time.
                let busy = |c: &&Arc<Conn>| c.in_flight.load(Ordering::Acquire);
                let has_room = |c: &&Arc<Conn>| busy(c) < c.stream_capacity();
                let usable = || st.h2.iter().filter(|c| c.is_usable());
                let sharing = usable()
                    .filter(|c| busy(c) < SHARED_STREAMS)
                    .max_by_key(busy)
                    .filter(has_room);
                let conn = match sharing {
                    Some(c) => c,
                    None => {
                        let least = usable().min_by_key(busy)?;
                        if has_room(&least) {
                            least
                        } else {
                            usable().filter(has_room).min_by_key(busy)?
                        }
                    }
                }
                .clone();
                conn.in_flight.fetch_add(1, Ordering::AcqRel);
                self.enter();
                Some(Lease::new(self.clone(), conn, None, Warmth::Warm, started))
            }
            Protocol::Http1 => {
                while let Some((conn, send)) = st.idle_h1.pop() {
                    if conn.is_usable() && !send.is_closed() {
                        st.busy_h1 += 1;
                        conn.in_flight.fetch_add(1, Ordering::AcqRel);
                        self.enter();
                        return Some(Lease::new(
                            self.clone(),
                            conn,
                            Some(send),
                            Warmth::Warm,
                            started,
                        ));
                    }
                }
                None
            }
        }
    }

    /// Undoes `take_locked` for a lease whose request went away before it got it.
    fn untake(&self, st: &mut State, lease: Lease) {
        let (conn, h1) = lease.into_parts();
        self.stats.reused.fetch_sub(1, Ordering::Relaxed);
        conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        self.leave();
        if let Some(send) = h1 {
            st.busy_h1 -= 1;
            st.idle_h1.push((conn, send));
        }
    }

    /// Hands free connections, stream slots, then connect slots to queued requests, oldest
    /// first.
    fn serve_queue(self: &Arc<Self>, st: &mut State) {
        while let Some(started) = st.queue.front_started() {
            let handed = match self.take_locked(st, started) {
                Some(lease) => Handed::Lease(lease),
                None => match self.claim_connect(st) {
                    Some(slot) => Handed::Connect(slot),
                    None => break,
                },
            };
            match st.queue.hand(handed) {
                Ok(()) => {}
                Err(Handed::Lease(lease)) => self.untake(st, lease),
                Err(Handed::Connect(slot)) => {
                    slot.forget();
                    st.connecting -= 1;
                }
            }
        }
        self.queued.store(st.queue.entries(), Ordering::Relaxed);
    }

    /// Puts a request at the back of the queue. A stream slot freed just before (h2 frees
    /// them without the lock) is served here: the fence pairs with the one in `release_h2`,
    /// so that either this sees the slot or the release sees the queued request.
    fn enqueue(self: &Arc<Self>, st: &mut State, started: Instant) -> queue::Ticket {
        let ticket = st.queue.push(started);
        self.queued.store(st.queue.entries(), Ordering::Relaxed);
        std::sync::atomic::fence(Ordering::SeqCst);
        self.serve_queue(st);
        ticket
    }

    fn dequeue(&self, st: &mut State, id: u64) {
        st.queue.remove(id);
        self.queued.store(st.queue.entries(), Ordering::Relaxed);
    }

    /// The queue timeout passed: leave the queue, unless a connection or connect slot was
    /// handed over just now (it is taken).
    fn give_up_waiting(&self, ticket: &mut queue::Ticket) -> Result<Handed, CheckoutError> {
        let mut st = self.lock();
        if let Ok(handed) = ticket.rx.try_recv() {
            return Ok(handed);
        }
        self.dequeue(&mut st, ticket.id);
        drop(st);
        self.stats.queue_timeouts.fetch_add(1, Ordering::Relaxed);
        Err(CheckoutError::QueueTimeout {
            origin: self.origin.name.clone(),
            after: self.origin.queue_timeout,
            max: self.origin.max_connections,
        })
    }

    /// Claims a connect slot if open + connecting is below max_connections.
    fn reserve_connect(&self) -> bool {
        self.lock().reserve_connect(self.origin.max_connections)
    }

    /// Gives back a connect slot whose connect failed or was abandoned: the next request in
    /// line gets it.
    fn cancel_connect(self: &Arc<Self>) {
        let mut st = self.lock();
        st.connecting -= 1;
        self.serve_queue(&mut st);
    }

    /// A connect slot for a request, given back if the connect fails or the request is
    /// cancelled while connecting (else each cancelled connect would lower the limit for good).
    fn claim_connect(self: &Arc<Self>, st: &mut State) -> Option<ConnectSlot> {
        if self.shutdown.is_cancelled() {
            return None;
        }
        // `then`, not `then_some`: an unclaimed slot must never exist, its drop gives one back.
        st.reserve_connect(self.origin.max_connections)
            .then(|| ConnectSlot {
                inner: self.clone(),
                taken: false,
            })
    }

    async fn open_for_request(
        self: &Arc<Self>,
        started: Instant,
        mut slot: ConnectSlot,
    ) -> Result<Lease, CheckoutError> {
        // No settle wait: a request is waiting (its own answer tells if the origin took it).
        match conn::open(self, false).await {
            Ok(Opened { conn, h1 }) => {
                slot.taken = true;
                let warmth = if conn.resumed {
                    Warmth::Resumed
                } else {
                    Warmth::Fresh
                };
                self.stats.opened.fetch_add(1, Ordering::Relaxed);
                conn.in_flight.fetch_add(1, Ordering::AcqRel);
                {
                    let mut st = self.lock();
                    st.connecting -= 1;
                    // Already closed again (its driver ended before we got here): not counted
                    // as open; the request finds it closed and retries elsewhere, and its
                    // connect slot goes to the next in line.
                    let live = st.count_open(&conn);
                    if !live {
                        self.serve_queue(&mut st);
                    }
                    self.enter();
                    match self.origin.protocol {
                        // Without pooling nobody else may use it; it closes with the lease.
                        Protocol::H2 if self.origin.pooling && live => {
                            st.h2.push(conn.clone());
                            // Queued requests may fit on it too.
                            self.serve_queue(&mut st);
                        }
                        Protocol::H2 => {}
                        Protocol::Http1 => st.busy_h1 += 1,
                    }
                }
                self.warmed.notify_waiters();
                Ok(Lease::new(self.clone(), conn, h1, warmth, started))
            }
            Err(e) => {
                drop(slot);
                self.stats.record_failure(&e);
                self.note_failure();
                Err(e.into())
            }
        }
    }

    /// Adds a connection opened by the maintenance task as idle capacity; false if it had
    /// closed already.
    fn add_idle(self: &Arc<Self>, opened: Opened) -> bool {
        let mut st = self.lock();
        st.connecting -= 1;
        if !st.count_open(&opened.conn) {
            // Closed before it was counted: its connect slot is free again.
            self.serve_queue(&mut st);
            drop(st);
            self.maintain.notify_one();
            return false;
        }
        match (opened.h1, &opened.conn.sender) {
            (Some(send), _) => st.idle_h1.push((opened.conn, send)),
            (None, Sender::H2(_)) => st.h2.push(opened.conn),
            (None, Sender::H1) => {}
        }
        self.serve_queue(&mut st);
        drop(st);
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        self.warmed.notify_waiters();
        true
    }

    /// Called by the driver task when a connection has ended, however it ended.
    fn on_closed(self: &Arc<Self>, id: u64, flags: &conn::ConnFlags) {
        let draining = flags.draining.load(Ordering::Acquire);
        if !draining {
            // Closed by the origin or the network, not by us: if it was idle, that is what
            // the origin's idle timeout looks like.
            let idle_for = self
                .now_ms()
                .saturating_sub(flags.last_used_ms.load(Ordering::Acquire));
            self.idle.observe_close(Duration::from_millis(idle_for));
        }
        let mut st = self.lock();
        if flags.counted.load(Ordering::Acquire) {
            st.open = st.open.saturating_sub(1);
        }
        // A trial's connection was counted as retiring without draining (read under the lock,
        // where `start_trial` sets it).
        if draining || flags.trial.load(Ordering::Acquire) {
            st.retiring = st.retiring.saturating_sub(1);
        }
        let ended_trial = self.trial_closed(&mut st, id);
        st.h2.retain(|c| c.id != id);
        st.idle_h1.retain(|(c, _)| c.id != id);
        // Room to connect again, for the next request in line.
        self.serve_queue(&mut st);
        drop(st);
        drop(ended_trial);
        self.stats.closed.fetch_add(1, Ordering::Relaxed);
        self.maintain.notify_one();
        self.warmed.notify_waiters();
    }

    /// Returns an http/1.1 connection after its exchange, or forgets it if it cannot be reused.
    fn return_h1(
        self: &Arc<Self>,
        conn: Arc<Conn>,
        send: Option<http1::SendRequest<UpstreamBody>>,
    ) {
        conn.flags
            .last_used_ms
            .store(self.now_ms(), Ordering::Release);
        self.leave();
        let mut st = self.lock();
        st.busy_h1 = st.busy_h1.saturating_sub(1);
        conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        if let Some(send) = send {
            if self.origin.pooling
                && conn.is_usable()
                && send.is_ready()
                && !self.shutdown.is_cancelled()
            {
                st.idle_h1.push((conn, send));
                self.serve_queue(&mut st);
            }
        }
    }

    /// Takes a connection out of service: no new requests; it closes once its exchanges end.
    /// Whether it retired one: a connection taken by a request since it was picked (an idle
    /// http/1.1 one) is not there to retire.
    fn retire(&self, id: u64) -> bool {
        let mut st = self.lock();
        let mut found = None;
        if let Some(i) = st.h2.iter().position(|c| c.id == id) {
            found = Some(st.h2.remove(i));
        } else if let Some(i) = st.idle_h1.iter().position(|(c, _)| c.id == id) {
            // Dropping the sender closes the idle http/1.1 connection.
            found = Some(st.idle_h1.remove(i).0);
        }
        let Some(c) = found else {
            return false;
        };
        if !c.flags.draining.swap(true, Ordering::AcqRel) && !c.flags.closed.load(Ordering::Acquire)
        {
            st.retiring += 1;
        }
        true
    }

    /// Lowest PING round trip over the open h2 connections.
    fn sample_ping_rtt(&self) -> Option<Duration> {
        let st = self.lock();
        st.h2
            .iter()
            .filter(|c| c.is_usable())
            .map(|c| c.ping.last_rtt_us.load(Ordering::Relaxed))
            .filter(|&us| us > 0)
            .min()
            .map(Duration::from_micros)
    }

    /// Lowest kernel-smoothed RTT over the open connections (the path's RTT; queueing only
    /// ever adds to it).
    fn sample_rtt(&self) -> Option<Duration> {
        let st = self.lock();
        let h2 = st.h2.iter();
        let h1 = st.idle_h1.iter().map(|(c, _)| c);
        h2.chain(h1)
            .filter(|c| !c.flags.closed.load(Ordering::Acquire))
            .filter_map(|c| rtt::tcp_rtt(c.fd))
            .min()
    }

    /// Connections to consider for rotation: (id, retire_at, idle since ms, in flight).
    fn rotation_candidates(&self) -> Vec<(u64, Instant, u64, usize)> {
        let st = self.lock();
        let h2 = st.h2.iter();
        let h1 = st.idle_h1.iter().map(|(c, _)| c);
        h2.chain(h1)
            .filter(|c| c.is_usable())
            .map(|c| {
                (
                    c.id,
                    c.retire_at,
                    c.flags.last_used_ms.load(Ordering::Acquire),
                    c.in_flight.load(Ordering::Acquire),
                )
            })
            .collect()
    }

    /// Frees an h2 stream slot; without the lock unless requests are queued (see `enqueue`).
    fn release_h2(self: &Arc<Self>, conn: &Conn) {
        conn.flags
            .last_used_ms
            .store(self.now_ms(), Ordering::Release);
        self.leave();
        conn.in_flight.fetch_sub(1, Ordering::AcqRel);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.queued.load(Ordering::Relaxed) > 0 {
            self.serve_queue(&mut self.lock());
        }
    }
}
