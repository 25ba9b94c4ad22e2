//! Lingering close (nginx's `lingering_close`): an http/1.1 connection that ends while the
//! client may still be sending (an upload answered early, e.g. with 413) is not closed at
//! once, because closing a socket with unread bytes makes the kernel send a reset that can
//! destroy the answer the client has not read yet. Its TCP stream goes to a task that reads
//! and discards until the client closes, pauses for `LINGERING_TIMEOUT`, or `LINGERING_TIME`
//! has passed.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Longest a connection lingers in all (nginx's `lingering_time` default).
pub const LINGERING_TIME: Duration = Duration::from_secs(30);
/// Longest pause in the client's data while lingering (nginx's `lingering_timeout` default).
pub const LINGERING_TIMEOUT: Duration = Duration::from_secs(5);

/// What each read takes while lingering (as nginx, 4 KiB at a time).
const DISCARD_CHUNK: usize = 4 * 1024;

/// The default: h2, or a connection not yet serving.
const NEVER: u8 = 0;
const IF_UNREAD: u8 = 1;
const ALWAYS: u8 = 2;

/// What the code serving a connection knows about whether its client may still be sending
/// when it closes; shared with the [`LingeringTcp`] under it, which decides when dropped.
#[derive(Clone)]
pub struct LingerHint(Arc<AtomicU8>);

impl Default for LingerHint {
    fn default() -> Self {
        LingerHint(Arc::new(AtomicU8::new(NEVER)))
    }
}

impl LingerHint {
    /// An http/1.1 connection: it lingers if bytes wait unread when it closes. (h2 does not
    /// need it: it answers early with a response and a stream reset, and the client stops.)
    pub fn http1(&self) {
        self.0.store(IF_UNREAD, Ordering::Release);
    }

    /// An http/1.1 request came in, with or without a body. A body may still be on its way
    /// when the answer is sent, even with no bytes waiting at that moment (a slow uploader),
    /// so after a request with a body the connection lingers whatever it sees unread; the
    /// next request shows the body was read whole.
    pub fn request(&self, has_body: bool) {
        let hint = if has_body { ALWAYS } else { IF_UNREAD };
        self.0.store(hint, Ordering::Release);
    }

    /// The request body was read to its end: what may still come is the next request, so
    /// linger only if bytes are waiting unread.
    pub fn body_read(&self) {
        let _ = self
            .0
            .compare_exchange(ALWAYS, IF_UNREAD, Ordering::AcqRel, Ordering::Acquire);
    }

    /// The connection becomes a tunnel (Upgrade): its bytes are the tunnel's, never
    /// lingered over.
    pub fn tunnel(&self) {
        self.0.store(NEVER, Ordering::Release);
    }

    fn get(&self) -> u8 {
        self.0.load(Ordering::Acquire)
    }
}

/// A client's TCP stream that, when dropped after a clean end, lingers if its [`LingerHint`]
/// says the client may still be sending. Sits under TLS, so the linger reads raw TCP bytes
/// without decrypting them.
pub struct LingeringTcp {
    // `Some` for the stream's whole life: taken only by `drop`, to hand the socket over.
    tcp: Option<TcpStream>,
    hint: LingerHint,
    /// The write side was shut down (after TLS close_notify): the connection ended cleanly
    /// and the client has an answer to read. One cut on an error (send_timeout, reset,
    /// failed handshake) is just closed.
    write_shut: bool,
    tracker: TaskTracker,
    /// Held until the socket is closed, lingering included: the connection's slot of the
    /// listener's `max_connections` (as nginx counts lingering connections), so lingering
    /// sockets cannot pile up past the limit.
    slot: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Drain: lingering stops at once.
    shutdown: CancellationToken,
    /// The client's address for the log (a PROXY protocol header's, not the balancer's).
    client: Option<SocketAddr>,
}

impl LingeringTcp {
    /// `tracker`: the listener's, so drain waits for lingering connections (within the
    /// linger bounds); they hold no connection slot.
    /// `slot`: held until the socket closes; `shutdown`: stops a linger in progress.
    pub fn new(
        tcp: TcpStream,
        tracker: TaskTracker,
        slot: Box<dyn std::any::Any + Send + Sync>,
        shutdown: CancellationToken,
    ) -> Self {
        LingeringTcp {
            tcp: Some(tcp),
            hint: LingerHint::default(),
            write_shut: false,
            tracker,
            slot: Some(slot),
            shutdown,
            client: None,
        }
    }

    /// The client's address, for the log of a linger (the socket's peer otherwise).
    pub fn client(mut self, addr: SocketAddr) -> Self {
        self.client = Some(addr);
        self
    }

    /// The hint the connection's server sets.
    pub fn hint(&self) -> LingerHint {
        self.hint.clone()
    }

    fn tcp(&mut self) -> io::Result<&mut TcpStream> {
        self.tcp
            .as_mut()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotConnected))
    }
}

impl AsyncRead for LingeringTcp {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(self.tcp()?).poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.tcp()?).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(self.tcp()?).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.as_ref().is_some_and(|t| t.is_write_vectored())
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(self.tcp()?).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = std::task::ready!(Pin::new(self.tcp()?).poll_shutdown(cx));
        self.write_shut = r.is_ok();
        Poll::Ready(r)
    }
}

impl Drop for LingeringTcp {
    fn drop(&mut self) {
        let Some(tcp) = self.tcp.take() else { return };
        let client_may_send = self.write_shut
            && match self.hint.get() {
                ALWAYS => true,
                IF_UNREAD => unread_bytes(&tcp),
                _ => false,
            };
        if !client_may_send {
            return;
        }
        // Dropped outside a runtime only when the runtime itself is going away: then there
        // is no one left to linger.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (slot, shutdown, client) = (self.slot.take(), self.shutdown.clone(), self.client);
            self.tracker.spawn_on(
                async move {
                    tokio::select! {
                        () = linger(tcp, client) => {}
                        () = shutdown.cancelled() => {}
                    }
                    drop(slot);
                },
                &rt,
            );
        }
    }
}

/// Whether bytes wait unread in the socket. Asks the kernel (MSG_PEEK on the non-blocking
/// socket) rather than tokio's readiness, which may not have seen bytes that just arrived.
fn unread_bytes(tcp: &TcpStream) -> bool {
    let mut probe = [MaybeUninit::<u8>::uninit(); 1];
    matches!(socket2::SockRef::from(tcp).peek(&mut probe), Ok(n) if n > 0)
}

/// Reads and discards until the client closes, sends nothing for `LINGERING_TIMEOUT`, or
/// `LINGERING_TIME` has passed; then the socket closes (with a reset only if the client is
/// still sending by then).
async fn linger(tcp: TcpStream, client: Option<SocketAddr>) {
    // Taken now: once the client has closed, the socket no longer knows its peer.
    let peer = client.or_else(|| tcp.peer_addr().ok());
    let end = Instant::now() + LINGERING_TIME;
    let mut discarded = 0u64;
    let outcome = loop {
        let pause_end = (Instant::now() + LINGERING_TIMEOUT).min(end);
        match tokio::time::timeout_at(pause_end, tcp.readable()).await {
            Ok(Ok(())) => {
                // A buffer only while reading, not held by every lingering socket.
                let mut sink = [0u8; DISCARD_CHUNK];
                match tcp.try_read(&mut sink) {
                    Ok(0) => break "client closed",
                    Ok(n) => discarded += n as u64,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => break "client reset",
                }
            }
            Ok(Err(_)) => break "client reset",
            Err(_) if pause_end == end => break "lingering_time reached",
            Err(_) => break "lingering_timeout reached",
        }
    };
    tracing::debug!(
        peer = ?peer,
        discarded,
        outcome,
        "lingering close ended"
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;
    use tokio::net::TcpListener;

    /// A connected pair on loopback: (client, edge side).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (client.expect("connect"), accepted.expect("accept").0)
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_ends_as_soon_as_the_client_closes() {
        let (mut client, edge) = pair().await;
        let started = Instant::now();
        let lingering = tokio::spawn(linger(edge, None));
        client.write_all(&[b'x'; 100_000]).await.expect("write");
        drop(client);
        lingering.await.expect("linger task");
        assert!(
            started.elapsed() < LINGERING_TIMEOUT,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn lingering_ends_after_a_pause_of_lingering_timeout() {
        let (_client, edge) = pair().await;
        let started = Instant::now();
        linger(edge, None).await;
        assert_eq!(started.elapsed().as_secs(), LINGERING_TIMEOUT.as_secs());
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_that_keeps_sending_is_lingered_on_for_lingering_time_at_most() {
        let (mut client, edge) = pair().await;
        let started = Instant::now();
        let lingering = tokio::spawn(linger(edge, None));
        // A byte every second, never pausing for LINGERING_TIMEOUT; stops once the edge side
        // is closed (the write then fails).
        let trickle = tokio::spawn(async move {
            while client.write_all(b"x").await.is_ok() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
        lingering.await.expect("linger task");
        assert_eq!(started.elapsed().as_secs(), LINGERING_TIME.as_secs());
        trickle.abort();
    }

    #[tokio::test]
    async fn only_a_cleanly_ended_http1_connection_the_client_may_still_send_on_lingers() {
        let tracker = TaskTracker::new();
        // (hint, bytes left unread, write side shut down, lingers)
        let cases = [
            // h2, or a failed handshake: closed at once even with bytes unread.
            (NEVER, true, true, false),
            (IF_UNREAD, true, true, true),
            (IF_UNREAD, false, true, false),
            // After a request with a body: lingers even with nothing unread yet.
            (ALWAYS, false, true, true),
            // Cut on an error, without a shutdown: closed at once.
            (ALWAYS, true, false, false),
        ];
        for (hint, unread, shut, lingers) in cases {
            let (mut client, edge) = pair().await;
            if unread {
                client.write_all(b"more body").await.expect("write");
            }
            let mut edge = LingeringTcp::new(
                edge,
                tracker.clone(),
                Box::new(()),
                CancellationToken::new(),
            );
            edge.hint().0.store(hint, Ordering::Release);
            if shut {
                edge.shutdown().await.expect("shutdown");
            }
            drop(edge);
            let case = format!("hint {hint}, unread {unread}, shut {shut}");
            assert_eq!(tracker.len(), usize::from(lingers), "{case}");
            drop(client);
            tracker.close();
            tracker.wait().await;
            tracker.reopen();
        }
    }

    #[tokio::test]
    async fn a_lingering_socket_keeps_its_slot_until_it_closes_and_drain_ends_it() {
        let tracker = TaskTracker::new();
        let (mut client, edge) = pair().await;
        client.write_all(b"more body").await.expect("write");
        let slot = Arc::new(());
        let shutdown = CancellationToken::new();
        let mut edge = LingeringTcp::new(
            edge,
            tracker.clone(),
            Box::new(slot.clone()),
            shutdown.clone(),
        );
        edge.hint().request(true);
        edge.shutdown().await.expect("shutdown");
        drop(edge);
        assert_eq!(tracker.len(), 1, "lingers");
        assert_eq!(
            Arc::strong_count(&slot),
            2,
            "the slot is held while lingering"
        );
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
        assert_eq!(
            Arc::strong_count(&slot),
            1,
            "given back when drain ends the linger"
        );
        drop(client);
    }

    #[test]
    fn a_body_read_to_its_end_or_a_tunnel_ends_the_always_hint() {
        let h = LingerHint::default();
        h.request(true);
        assert_eq!(h.get(), ALWAYS);
        h.body_read();
        assert_eq!(h.get(), IF_UNREAD);
        h.request(true);
        h.tunnel();
        assert_eq!(h.get(), NEVER);
    }
}
