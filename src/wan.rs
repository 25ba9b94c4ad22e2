//! The WAN simulator: a TCP relay that adds a one-way delay in each direction, so loopback
//! behaves like a link with round trip `2 x delay` (and [`UdpRelay`], the same for QUIC's
//! datagrams). Used by `demo`, the tests and the benches.
//!
//! # Fidelity
//! - Every chunk is delivered `delay` after the relay *read* it, not after the previous chunk
//!   was delivered: a burst keeps its spacing, order is preserved (deadlines are monotonic).
//! - A half-close (FIN) is forwarded `delay` after it was read; the other direction goes on.
//!   A reset (RST) read on one side resets both sides `delay` later.
//! - Connection set-up costs one round trip. On loopback the kernel completes the TCP
//!   handshake before user space sees it (and there is no netem), so the relay charges that
//!   round trip in the data path: client-to-upstream bytes are never delivered before
//!   `accept + 3 x delay` (SYN, SYN-ACK, then the first data segment), upstream-to-client
//!   bytes never before `accept + 4 x delay`.
//! - A refused upstream resets the client `2 x delay` after accept.
//!
//! # How phases read through it (RTT = 2 x delay, TLS 1.3)
//! TCP connect looks instant (the kernel answers locally); the TLS handshake takes 2 RTT
//! (its own round trip plus the TCP one charged in the data path); so TLS is done at 2 RTT
//! after the start and the first response byte arrives at 3 RTT — the same cumulative times
//! as on a real link (curl's `time_appconnect`, `time_starttransfer`). A kept connection pays
//! 1 RTT per request.
//!
//! # Faults (for the pool tests)
//! [`Relay::blackhole`] stops forwarding silently (no FIN, no RST) until it is lifted — like a
//! partition: held bytes are delivered, in order, when it heals. [`Relay::stop`] closes the
//! listener (new connects are refused) and resets every open connection;
//! [`Relay::restart`] listens again on the same address. Dropping the relay stops it.
//!
//! # Precision
//! tokio's timer has a 1 ms granularity (it rounds up); each delivery sleeps on it until 1.5 ms
//! before its deadline, then yields until the deadline. Measured with `cargo bench --bench
//! wan_accuracy` on a loaded 2-core box: +0.06 to +0.35 ms per round trip at p50. The price is
//! up to 1.5 ms of busy-yielding per delivered chunk: fine for tests and the demo, not meant
//! for bulk throughput on many connections. If the tokio clock does not move (paused time),
//! a delivery falls back to the timer after 3 ms of real time instead of spinning forever
//! (by design; not covered by a test, as tokio's `test-util` feature is not enabled).
//!
//! ```no_run
//! # async fn demo() -> Result<(), edgepop::wan::WanError> {
//! use std::time::Duration;
//! let origin: std::net::SocketAddr = "127.0.0.1:8443".parse().unwrap();
//! let relay = edgepop::wan::Relay::start(
//!     "127.0.0.1:0".parse().unwrap(), origin, Duration::from_millis(25)).await?;
//! let via = relay.local_addr(); // connect here: RTT 50 ms to the origin
//! relay.blackhole(true);        // inject a silent partition
//! relay.blackhole(false);
//! relay.stop();                 // refuse and reset
//! relay.restart().await?;       // and come back on the same address
//! # Ok(()) }
//! ```

use bytes::{Bytes, BytesMut};
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Errors of the relay itself (a failing relayed connection is not an error: it is reset).
#[derive(Debug, thiserror::Error)]
pub enum WanError {
    #[error("wan relay: cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

/// Largest chunk read at once; also what a delivery writes at once.
const CHUNK: usize = 64 * 1024;
/// Chunks in flight per direction before the relay stops reading (back-pressure).
const IN_FLIGHT: usize = 256;
/// Below this much time left, a delivery yields instead of sleeping on the 1 ms timer wheel.
const SPIN: Duration = Duration::from_micros(1_500);

/// A running relay: `local_addr()` -> `upstream`, with `delay` each way. Stops on drop.
#[derive(Debug)]
pub struct Relay {
    shared: Arc<Shared>,
    local: SocketAddr,
    /// The accept loop of the current generation and the token of its connections.
    /// A std mutex: held only to swap these two fields, never across an await.
    run: Mutex<Generation>,
}

#[derive(Debug)]
struct Generation {
    accept: Option<JoinHandle<()>>,
    conns: CancellationToken,
    /// While stopped: the aborted accept loop (its listener closes when it ends) and the
    /// port, bound but not listening, so connects are refused and no ephemeral bind or
    /// outgoing connection (a parallel test's) can take it before `restart`. (A socket that
    /// binds this exact port with SO_REUSEPORT as the same user still could.)
    stopped: Option<JoinHandle<()>>,
    parked: Option<TcpSocket>,
}

#[derive(Debug)]
struct Shared {
    upstream: SocketAddr,
    delay_ns: AtomicU64,
    blackhole: watch::Sender<bool>,
    active: AtomicUsize,
    accepted: AtomicUsize,
}

impl Shared {
    fn delay(&self) -> Duration {
        Duration::from_nanos(self.delay_ns.load(Ordering::Relaxed))
    }
}

impl Relay {
    /// Listens on `listen` (port 0 for an ephemeral one) and relays every connection to
    /// `upstream` with `one_way_delay` added in each direction.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        one_way_delay: Duration,
    ) -> Result<Relay, WanError> {
        let listener = listen_on(bound_socket(listen)?, listen)?;
        let local = listener.local_addr().map_err(|source| WanError::Listen {
            addr: listen,
            source,
        })?;
        let (blackhole, _) = watch::channel(false);
        let shared = Arc::new(Shared {
            upstream,
            delay_ns: AtomicU64::new(u64::try_from(one_way_delay.as_nanos()).unwrap_or(u64::MAX)),
            blackhole,
            active: AtomicUsize::new(0),
            accepted: AtomicUsize::new(0),
        });
        let conns = CancellationToken::new();
        let accept = spawn_accept(listener, shared.clone(), conns.clone());
        Ok(Relay {
            shared,
            local,
            run: Mutex::new(Generation {
                accept: Some(accept),
                conns,
                stopped: None,
                parked: None,
            }),
        })
    }

    /// The address clients connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// The address the relay forwards to.
    pub fn upstream(&self) -> SocketAddr {
        self.shared.upstream
    }

    /// The current one-way delay.
    pub fn delay(&self) -> Duration {
        self.shared.delay()
    }

    /// Changes the one-way delay for bytes read from now on.
    pub fn set_delay(&self, one_way_delay: Duration) {
        let ns = u64::try_from(one_way_delay.as_nanos()).unwrap_or(u64::MAX);
        self.shared.delay_ns.store(ns, Ordering::Relaxed);
    }

    /// `true`: stop forwarding in both directions, silently (no FIN, no RST), on open and new
    /// connections. `false`: deliver what was held, in order, and go on.
    pub fn blackhole(&self, on: bool) {
        self.shared.blackhole.send_replace(on);
    }

    /// Connections open right now.
    pub fn active_connections(&self) -> usize {
        self.shared.active.load(Ordering::Relaxed)
    }

    /// Connections accepted since start.
    pub fn accepted_connections(&self) -> usize {
        self.shared.accepted.load(Ordering::Relaxed)
    }

    /// Closes the listener (connects are refused) and resets every open connection. The
    /// port stays reserved for [`Relay::restart`].
    pub fn stop(&self) {
        let mut run = self.lock();
        if let Some(accept) = run.accept.take() {
            if run.parked.is_none() {
                // Bound beside the listener (SO_REUSEPORT) before the listener closes.
                run.parked = bound_socket(self.local).ok();
            }
            accept.abort();
            run.stopped = Some(accept);
        }
        run.conns.cancel();
    }

    /// Listens again on the same address after [`Relay::stop`] (no-op if running).
    pub async fn restart(&self) -> Result<(), WanError> {
        if self.is_running() {
            return Ok(());
        }
        let stopped = self.lock().stopped.take();
        if let Some(old) = stopped {
            // The old listener must be closed before the parked socket listens.
            let _ = old.await;
        }
        let socket = match self.lock().parked.take() {
            Some(s) => s,
            None => bound_socket(self.local)?,
        };
        let listener = listen_on(socket, self.local)?;
        let conns = CancellationToken::new();
        let accept = spawn_accept(listener, self.shared.clone(), conns.clone());
        let mut run = self.lock();
        run.accept = Some(accept);
        run.conns = conns;
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Generation> {
        self.run.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether the listener is open.
    pub fn is_running(&self) -> bool {
        let run = self.lock();
        run.accept.as_ref().is_some_and(|a| !a.is_finished())
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let run = self.lock();
        if let Some(accept) = &run.accept {
            accept.abort();
        }
        run.conns.cancel();
    }
}

fn bound_socket(addr: SocketAddr) -> Result<TcpSocket, WanError> {
    reservable_socket(addr).map_err(|source| WanError::Listen { addr, source })
}

/// A bound, not yet listening socket for the fault-injection fixtures (this relay and the
/// test origin) that stop and restart on the same port: SO_REUSEADDR (restart binds while
/// old connections are in TIME_WAIT) and SO_REUSEPORT (stop parks the port beside the
/// listener before closing it).
pub(crate) fn reservable_socket(addr: SocketAddr) -> io::Result<TcpSocket> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }?;
    socket.set_reuseaddr(true)?;
    #[cfg(unix)]
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

fn listen_on(socket: TcpSocket, addr: SocketAddr) -> Result<TcpListener, WanError> {
    socket
        .listen(1024)
        .map_err(|source| WanError::Listen { addr, source })
}

fn spawn_accept(
    listener: TcpListener,
    shared: Arc<Shared>,
    conns: CancellationToken,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let (client, _) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "wan relay: accept failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let accepted_at = Instant::now();
            shared.accepted.fetch_add(1, Ordering::Relaxed);
            let shared = shared.clone();
            let cancel = conns.child_token();
            tokio::spawn(async move {
                shared.active.fetch_add(1, Ordering::Relaxed);
                relay_conn(client, accepted_at, &shared, cancel).await;
                shared.active.fetch_sub(1, Ordering::Relaxed);
            });
        }
    })
}

/// Why a relayed connection ends early: both sides are then reset.
#[derive(Debug)]
struct Reset;

async fn relay_conn(
    mut client: TcpStream,
    accepted_at: Instant,
    shared: &Shared,
    cancel: CancellationToken,
) {
    let _ = client.set_nodelay(true);
    let delay = shared.delay();
    let mut upstream = match TcpStream::connect(shared.upstream).await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(upstream = %shared.upstream, error = %e, "wan relay: upstream connect failed");
            // The refusal travels back: the client learns it one round trip after its SYN.
            tokio::select! {
                _ = precise_sleep_until(accepted_at + delay * 2) => {}
                _ = cancel.cancelled() => {}
            }
            reset(&client);
            return;
        }
    };
    let _ = upstream.set_nodelay(true);
    let outcome = {
        let (cr, cw) = client.split();
        let (ur, uw) = upstream.split();
        let to_upstream = pipe(cr, uw, accepted_at + delay * 3, shared);
        let to_client = pipe(ur, cw, accepted_at + delay * 4, shared);
        // Either pipe failing (reset read, write error) ends the connection; cancellation
        // (stop, drop) too. The pipes borrow the streams, so they are dropped before the
        // streams are reset below.
        tokio::select! {
            r = async { tokio::try_join!(to_upstream, to_client) } => r.map(|_| ()),
            _ = cancel.cancelled() => Err(Reset),
        }
    };
    if outcome.is_err() {
        reset(&client);
        reset(&upstream);
    }
}

/// SO_LINGER 0: closing the socket sends RST instead of FIN (and never blocks the thread,
/// which is why tokio's deprecation of `set_linger` does not apply here).
fn reset(stream: &TcpStream) {
    let _ = socket2::SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

enum Event {
    Data(Instant, Bytes),
    Fin(Instant),
    Reset(Instant),
}

/// One direction: a reader stamps each chunk with its delivery deadline, a writer delivers it
/// then. Both run concurrently in the connection's task so a slow writer never delays the
/// stamping of later reads.
async fn pipe(
    mut from: tokio::net::tcp::ReadHalf<'_>,
    mut to: tokio::net::tcp::WriteHalf<'_>,
    floor: Instant,
    shared: &Shared,
) -> Result<(), Reset> {
    let (tx, mut rx) = mpsc::channel::<Event>(IN_FLIGHT);
    let reader = async move {
        let mut buf = BytesMut::with_capacity(CHUNK);
        loop {
            buf.reserve(CHUNK);
            let read = from.read_buf(&mut buf).await;
            let deadline = (Instant::now() + shared.delay()).max(floor);
            let (event, last) = match read {
                Ok(0) => (Event::Fin(deadline), true),
                Ok(_) => (Event::Data(deadline, buf.split().freeze()), false),
                Err(_) => (Event::Reset(deadline), true),
            };
            if tx.send(event).await.is_err() || last {
                return Ok::<(), Reset>(());
            }
        }
    };
    let writer = async move {
        let mut blackhole = shared.blackhole.subscribe();
        while let Some(event) = rx.recv().await {
            let deadline = match &event {
                Event::Data(d, _) | Event::Fin(d) | Event::Reset(d) => *d,
            };
            precise_sleep_until(deadline).await;
            // Held, not dropped, while blackholed; a closed sender means the relay is gone.
            if blackhole.wait_for(|on| !*on).await.is_err() {
                return Err(Reset);
            }
            match event {
                Event::Data(_, bytes) => to.write_all(&bytes).await.map_err(|_| Reset)?,
                Event::Fin(_) => {
                    let _ = to.shutdown().await;
                    return Ok(());
                }
                Event::Reset(_) => return Err(Reset),
            }
        }
        Ok(())
    };
    tokio::try_join!(reader, writer).map(|_| ())
}

/// Sleeps until `deadline` with sub-millisecond accuracy: the timer wheel for the bulk, then
/// yields for the last stretch (the wheel rounds deadlines up to the next millisecond).
pub async fn precise_sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now + SPIN {
        tokio::time::sleep_until(deadline - SPIN).await;
    }
    let spin_start = std::time::Instant::now();
    while Instant::now() < deadline {
        if spin_start.elapsed() > SPIN * 2 {
            // The tokio clock is not moving (paused in a test, or a starved runtime): let the
            // timer finish the wait instead of spinning on.
            tokio::time::sleep_until(deadline).await;
            return;
        }
        tokio::task::yield_now().await;
    }
}

/// The same simulated link for UDP (QUIC): every datagram is delivered `delay` after the
/// relay read it, each way, in order per flow. Each client address gets its own upstream
/// socket (as behind a NAT), so the upstream sees one peer per client. Stops on drop.
#[derive(Debug)]
pub struct UdpRelay {
    local: SocketAddr,
    stop: CancellationToken,
}

impl Drop for UdpRelay {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A datagram and when it is due.
type Due = (Instant, Bytes);

impl UdpRelay {
    /// Binds `listen` (port 0 for an ephemeral one) and relays datagrams to `upstream` with
    /// `one_way_delay` added in each direction.
    pub async fn start(
        listen: SocketAddr,
        upstream: SocketAddr,
        one_way_delay: Duration,
    ) -> Result<UdpRelay, WanError> {
        let err = |source| WanError::Listen {
            addr: listen,
            source,
        };
        let front = Arc::new(tokio::net::UdpSocket::bind(listen).await.map_err(err)?);
        let local = front.local_addr().map_err(err)?;
        let stop = CancellationToken::new();
        let token = stop.clone();
        tokio::spawn(async move {
            let mut flows: std::collections::HashMap<SocketAddr, mpsc::UnboundedSender<Due>> =
                std::collections::HashMap::new();
            let mut buf = vec![0u8; CHUNK];
            loop {
                // select!: the next datagram, or the relay dropped.
                let (n, from) = tokio::select! {
                    r = front.recv_from(&mut buf) => match r {
                        Ok(r) => r,
                        Err(_) => continue,
                    },
                    () = token.cancelled() => return,
                };
                let due = Instant::now() + one_way_delay;
                let flow = flows.entry(from).or_insert_with(|| {
                    udp_flow(front.clone(), from, upstream, one_way_delay, token.clone())
                });
                let _ = flow.send((due, Bytes::copy_from_slice(&buf[..n])));
            }
        });
        Ok(UdpRelay { local, stop })
    }

    /// The address clients send to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

/// One client's flow: its own upstream socket; datagrams each way delivered when due.
fn udp_flow(
    front: Arc<tokio::net::UdpSocket>,
    client: SocketAddr,
    upstream: SocketAddr,
    delay: Duration,
    stop: CancellationToken,
) -> mpsc::UnboundedSender<Due> {
    let (up_tx, mut up_rx) = mpsc::unbounded_channel::<Due>();
    tokio::spawn(async move {
        let any: SocketAddr = if upstream.is_ipv6() {
            (std::net::Ipv6Addr::LOCALHOST, 0).into()
        } else {
            (std::net::Ipv4Addr::LOCALHOST, 0).into()
        };
        let Ok(back) = tokio::net::UdpSocket::bind(any).await else {
            return;
        };
        if back.connect(upstream).await.is_err() {
            return;
        }
        let back = Arc::new(back);
        let (down_tx, mut down_rx) = mpsc::unbounded_channel::<Due>();
        let reader = {
            let back = back.clone();
            async move {
                let mut buf = vec![0u8; CHUNK];
                while let Ok(n) = back.recv(&mut buf).await {
                    let due = Instant::now() + delay;
                    if down_tx
                        .send((due, Bytes::copy_from_slice(&buf[..n])))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        };
        let down = async move {
            while let Some((due, d)) = down_rx.recv().await {
                precise_sleep_until(due).await;
                let _ = front.send_to(&d, client).await;
            }
        };
        let up = async move {
            while let Some((due, d)) = up_rx.recv().await {
                precise_sleep_until(due).await;
                let _ = back.send(&d).await;
            }
        };
        // select!: the flow runs until the relay is dropped (UDP has no end of its own).
        tokio::select! {
            () = async { tokio::join!(reader, down, up); } => {}
            () = stop.cancelled() => {}
        }
    });
    up_tx
}
