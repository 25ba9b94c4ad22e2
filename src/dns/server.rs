//! Wire I/O: UDP on dedicated threads (on Linux io_uring, see `uring`, else blocking receive
//! and send batched with `recvmmsg` and `sendmmsg`; no reactor in between) and TCP on tokio
//! (RFC 7766: length-prefixed, pipelined, idle timeout). Both read the current map through an `ArcSwap` guard, never a lock.

use super::query::{self, Transport};
use super::DnsState;
use crate::config::UdpIo;
use crate::edge::client_limit::ClientTable;
use socket2::{Domain, Protocol, Socket, Type};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long a TCP client may stay silent between queries.
pub(super) const TCP_IDLE: Duration = Duration::from_secs(10);
/// The same once more than half of the slots are taken (RFC 7766 6.2.3: servers shorten
/// idle timeouts under load), so clients that keep connections open between rare queries
/// cannot hold the slots that TC answers send resolvers to.
const TCP_IDLE_BUSY: Duration = Duration::from_secs(1);
/// Concurrent TCP connections; more wait in the accept queue.
const TCP_MAX: usize = 1024;
/// Concurrent TCP connections one client (an IPv4 address or an IPv6 /64, as the edge's
/// `max_connections_per_client` counts them) may hold; more are closed at accept.
const TCP_PER_CLIENT: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot bind DNS {proto} socket on {addr}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start UDP worker thread")]
    Thread(#[source] std::io::Error),
    #[error("[dns] udp_io = \"io_uring\", but the kernel refuses io_uring (\"auto\" falls back to recvmmsg)")]
    IoUring(#[source] std::io::Error),
}

/// Binds `udp` UDP sockets (one per worker, SO_REUSEPORT, so the kernel spreads clients over
/// them by address hash and workers never contend for one receive queue) and a TCP listener,
/// all on the same address. With port 0 the others take the port the kernel gave the first
/// UDP socket; if that TCP port is taken, it tries again with a fresh port.
pub fn bind(addr: SocketAddr, udp: usize) -> Result<(Vec<UdpSocket>, TcpListener), ServerError> {
    let mut attempt = 0;
    loop {
        // An automatic port is taken without SO_REUSEPORT (set right after): Linux may give a
        // SO_REUSEPORT socket binding port 0 a port already in another group of the same
        // user, which would split that server's queries with this one.
        let first = udp_socket(addr, addr.port() != 0)?;
        #[cfg(target_os = "linux")]
        socket2::SockRef::from(&first)
            .set_reuse_port(true)
            .map_err(|source| ServerError::Bind {
                proto: "UDP",
                addr,
                source,
            })?;
        let local = first.local_addr().map_err(|source| ServerError::Bind {
            proto: "UDP",
            addr,
            source,
        })?;
        let mut socks = vec![first];
        // Elsewhere than Linux: one socket and one worker (no SO_REUSEPORT groups there).
        let count = if cfg!(target_os = "linux") { udp } else { 1 };
        for _ in 1..count.max(1) {
            socks.push(udp_socket(local, true)?);
        }
        match tcp_listener(local) {
            Ok(tcp) => return Ok((socks, tcp)),
            Err(e) if addr.port() == 0 && attempt < 16 => {
                attempt += 1;
                tracing::debug!(error = %e, "TCP port taken, retrying");
            }
            Err(source) => {
                return Err(ServerError::Bind {
                    proto: "TCP",
                    addr: local,
                    source,
                })
            }
        }
    }
}

fn udp_socket(addr: SocketAddr, reuse_port: bool) -> Result<UdpSocket, ServerError> {
    let err = |source| ServerError::Bind {
        proto: "UDP",
        addr,
        source,
    };
    let s =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    // Large buffers absorb bursts while a worker is busy; failure here is not fatal.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    #[cfg(target_os = "linux")]
    s.set_reuse_port(reuse_port).map_err(err)?;
    s.bind(&addr.into()).map_err(err)?;
    dont_fragment(&s, addr.is_ipv4());
    #[cfg(target_os = "linux")]
    if addr.ip().is_unspecified() {
        super::pktinfo::enable(&s, addr.is_ipv4()).map_err(err)?;
    }
    Ok(s.into())
}

/// Sends UDP answers with DF set and without consulting the path-MTU cache (RFC 9715: no IP
/// fragmentation for DNS over UDP; our answers are at most 1232 bytes). Best effort. As a
/// side effect Linux skips the IP ID hash for DF packets, which is measurable per query.
#[cfg(target_os = "linux")]
fn dont_fragment(s: &Socket, v4: bool) {
    let (level, name, value) = if v4 {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )
    };
    if let Err(e) = set_int_option(s, level, name, value) {
        tracing::debug!(error = %e, "cannot set DF on DNS socket");
    }
}

/// `setsockopt` of an option that takes a C int (those socket2 has no setter for).
#[cfg(target_os = "linux")]
pub(super) fn set_int_option(
    sock: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> std::io::Result<()> {
    // SAFETY: setsockopt with a valid fd, a level/name pair that takes a c_int, and its size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn dont_fragment(_s: &Socket, _v4: bool) {}

fn tcp_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    TcpListener::from_std(s.into())
}

/// Running UDP workers, one per socket; dropping it stops them.
pub struct UdpWorkers {
    stop: Arc<AtomicBool>,
    socks: Vec<Arc<UdpSocket>>,
    wakers: Vec<Arc<Waker>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl UdpWorkers {
    /// Starts one worker per socket, with the I/O `io` asks for; returns once each has set
    /// up (an error if `io` is [`UdpIo::IoUring`] and the kernel refuses it).
    pub fn start(socks: Vec<UdpSocket>, state: DnsState, io: UdpIo) -> Result<Self, ServerError> {
        let socks: Vec<Arc<UdpSocket>> = socks.into_iter().map(Arc::new).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let mut workers = UdpWorkers {
            stop: stop.clone(),
            socks: socks.clone(),
            wakers: Vec::with_capacity(socks.len()),
            threads: Vec::with_capacity(socks.len()),
        };
        for (i, sock) in socks.into_iter().enumerate() {
            let waker = Arc::new(Waker::new().map_err(ServerError::Thread)?);
            workers.wakers.push(waker.clone());
            let (state, stop) = (state.clone(), stop.clone());
            let (ready, started) = std::sync::mpsc::sync_channel(1);
            let t = std::thread::Builder::new()
                .name(format!("dns-udp-{i}"))
                .spawn(move || worker(&sock, &waker, &state, &stop, io, ready))
                .map_err(ServerError::Thread)?;
            workers.threads.push(t);
            match started.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(ServerError::IoUring(e)),
                Err(_) => {
                    return Err(ServerError::Thread(std::io::Error::other(
                        "UDP worker ended while starting",
                    )))
                }
            }
        }
        Ok(workers)
    }
}

impl Drop for UdpWorkers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // An io_uring worker waits on its ring, which reads the waker's eventfd. A `recvmmsg`
        // worker sits in a blocking receive on its own socket: shutting the socket's receive
        // side wakes it (Linux does this even for unconnected UDP sockets, and the receive
        // then returns at once). Either then sees the flag.
        for w in &self.wakers {
            w.wake();
        }
        for s in &self.socks {
            wake(s);
        }
        for _ in 0..5000 {
            if self.threads.iter().all(|t| t.is_finished()) {
                break;
            }
            // Shutdown only, never on a query path: wait for the worker OS threads to notice
            // the stop flag.
            #[allow(clippy::disallowed_methods)]
            std::thread::sleep(Duration::from_millis(1));
        }
        for t in self.threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            }
        }
    }
}

/// Wakes an io_uring worker: an eventfd its ring keeps a read on (Linux; elsewhere nothing).
struct Waker {
    #[cfg(target_os = "linux")]
    fd: std::os::fd::OwnedFd,
}

impl Waker {
    #[cfg(target_os = "linux")]
    fn new() -> std::io::Result<Self> {
        use std::os::fd::FromRawFd;
        // SAFETY: eventfd(2) with valid flags; a non-negative result is a new descriptor
        // that nothing else owns.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: as above.
        Ok(Waker {
            fd: unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) },
        })
    }

    #[cfg(not(target_os = "linux"))]
    fn new() -> std::io::Result<Self> {
        Ok(Waker {})
    }

    #[cfg(target_os = "linux")]
    fn wake(&self) {
        use std::os::fd::AsRawFd;
        let one = 1u64.to_ne_bytes();
        // SAFETY: an 8-byte write from a live buffer to an eventfd this struct owns.
        unsafe {
            libc::write(self.fd.as_raw_fd(), one.as_ptr().cast(), one.len());
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn wake(&self) {}
}

#[cfg(target_os = "linux")]
fn wake(s: &UdpSocket) {
    use std::os::fd::AsRawFd;
    // SAFETY: shutdown(2) on a socket this struct keeps open; ENOTCONN is expected for an
    // unconnected UDP socket and the wake-up happens anyway.
    unsafe {
        libc::shutdown(s.as_raw_fd(), libc::SHUT_RD);
    }
}

#[cfg(not(target_os = "linux"))]
fn wake(s: &UdpSocket) {
    if let Ok(local) = s.local_addr() {
        let _ = s.send_to(&[], local);
    }
}

/// `[dns] udp_coalesce` is an io_uring wait; a worker on `recvmmsg` answers at once.
#[cfg(target_os = "linux")]
fn warn_no_coalesce(state: &DnsState) {
    if state.udp_coalesce_us() > 0 {
        tracing::warn!("[dns] udp_coalesce needs io_uring; this DNS UDP worker answers at once");
    }
}

#[cfg(target_os = "linux")]
fn worker(
    sock: &UdpSocket,
    waker: &Waker,
    state: &DnsState,
    stop: &AtomicBool,
    io: UdpIo,
    ready: std::sync::mpsc::SyncSender<std::io::Result<()>>,
) {
    use std::os::fd::AsRawFd;
    let reply_source = sock.local_addr().is_ok_and(|a| a.ip().is_unspecified());
    let stats = state.stats();
    let ring = match io {
        UdpIo::Recvmmsg => None,
        UdpIo::Auto | UdpIo::IoUring => {
            match super::uring::Worker::new(sock.as_raw_fd(), waker.fd.as_raw_fd(), reply_source) {
                Ok(w) => Some(w),
                Err(e) if io == UdpIo::IoUring => {
                    let _ = ready.send(Err(e));
                    return;
                }
                Err(e) => {
                    tracing::info!(error = %e, "io_uring refused; the DNS UDP worker uses recvmmsg");
                    warn_no_coalesce(state);
                    None
                }
            }
        }
    };
    // Counted before `start` returns, so /metrics shows every worker from the start.
    stats.udp_workers[usize::from(ring.is_none())].fetch_add(1, Ordering::Relaxed);
    let _ = ready.send(Ok(()));
    if let Some(mut ring) = ring {
        let r = ring.run(state, stop);
        drop(ring);
        stats.udp_workers[0].fetch_sub(1, Ordering::Relaxed);
        match r {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(error = %e, "io_uring failed; the DNS UDP worker goes on with recvmmsg");
                warn_no_coalesce(state);
                stats.udp_workers[1].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let batch = std::env::var("EDGEPOP_DNS_UDP_BATCH")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(super::batch::BATCH);
    super::batch::udp_loop(sock, state, stop, batch, reply_source);
    stats.udp_workers[1].fetch_sub(1, Ordering::Relaxed);
}

#[cfg(not(target_os = "linux"))]
fn worker(
    sock: &UdpSocket,
    _waker: &Waker,
    state: &DnsState,
    stop: &AtomicBool,
    _io: UdpIo,
    ready: std::sync::mpsc::SyncSender<std::io::Result<()>>,
) {
    state.stats().udp_workers[1].fetch_add(1, Ordering::Relaxed);
    let _ = ready.send(Ok(()));
    udp_loop(sock, state, stop);
    state.stats().udp_workers[1].fetch_sub(1, Ordering::Relaxed);
}

/// One datagram per system call (portable fallback; Linux uses `batch`).
#[cfg_attr(target_os = "linux", allow(dead_code))]
fn udp_loop(sock: &UdpSocket, state: &DnsState, stop: &AtomicBool) {
    let mut buf = vec![0u8; 65535];
    let mut out = Vec::with_capacity(4096);
    let stats = state.stats();
    loop {
        let (n, src) = match sock.recv_from(&mut buf) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                // ICMP errors from earlier sends surface here on some systems; keep going.
                stats.udp_errors.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(error = %e, "dns udp receive");
                continue;
            }
        };
        stats.record_udp_batch(1);
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let map = state.map_guard();
        if let Some(o) = query::handle_udp(&buf[..n], src.ip(), &map, &mut out) {
            drop(map);
            stats.record(o);
            if !out.is_empty() && sock.send_to(&out, src).is_err() {
                stats.udp_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

/// Accepts TCP clients until `cancel`.
pub async fn tcp_accept(listener: TcpListener, state: DnsState, cancel: CancellationToken) {
    let slots = Arc::new(tokio::sync::Semaphore::new(TCP_MAX));
    let clients = Arc::new(ClientTable::default());
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (stream, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(error = %e, "dns tcp accept");
                    continue;
                }
            },
        };
        let Some(client) = clients.try_take(peer.ip(), TCP_PER_CLIENT) else {
            state.stats().tcp_refused.fetch_add(1, Ordering::Relaxed);
            continue;
        };
        let (state, cancel, slots) = (state.clone(), cancel.clone(), slots.clone());
        state
            .stats()
            .tcp_connections
            .fetch_add(1, Ordering::Relaxed);
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                _ = tcp_conn(stream, &state, &slots) => {}
            }
            drop((permit, client));
        });
    }
}

/// One TCP client: queries answered in order until EOF, an error or the idle timeout
/// (shorter while `slots` are scarce).
async fn tcp_conn(mut s: TcpStream, state: &DnsState, slots: &tokio::sync::Semaphore) {
    let _ = s.set_nodelay(true);
    let mut buf = vec![0u8; 65535];
    let mut out = Vec::with_capacity(4096);
    loop {
        let mut len = [0u8; 2];
        let idle = if slots.available_permits() < TCP_MAX / 2 {
            TCP_IDLE_BUSY
        } else {
            TCP_IDLE
        };
        match tokio::time::timeout(idle, s.read_exact(&mut len)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let len = usize::from(u16::from_be_bytes(len));
        let Some(msg) = buf.get_mut(..len) else {
            return;
        };
        match tokio::time::timeout(idle, s.read_exact(msg)).await {
            Ok(Ok(_)) => {}
            _ => return,
        }
        let peer = match s.peer_addr() {
            Ok(p) => p.ip(),
            Err(_) => return,
        };
        let outcome = {
            let map = state.map_guard();
            // RFC 7828: advertise the idle time this connection gets now.
            let reply = query::Reply {
                keepalive: query::keepalive_units(idle),
                truncate: false,
            };
            let o = query::respond(&buf[..len], peer, Transport::Tcp, &map, &mut out, reply);
            if let Some(o) = &o {
                query::count_hit(&map, o);
            }
            o
        };
        let Some(o) = outcome else { continue };
        state.stats().record(o);
        let Ok(n) = u16::try_from(out.len()) else {
            return;
        };
        let mut frame = Vec::with_capacity(out.len() + 2);
        frame.extend_from_slice(&n.to_be_bytes());
        frame.extend_from_slice(&out);
        match tokio::time::timeout(idle, s.write_all(&frame)).await {
            Ok(Ok(())) => {}
            _ => return,
        }
    }
}
