//! TLS 1.3 0-RTT on the client side of the edge: a server TLS stream that hands out the
//! client's early data as soon as the ClientHello that carries it has been answered, so a
//! resuming client's first request reaches the origin one client round trip sooner.
//!
//! tokio-rustls' acceptor finishes the whole handshake before it returns a stream and never
//! reads early data, which would throw the round trip away; this stream drives rustls itself.
//! Which requests may be served before the handshake completes is the proxy's decision
//! ([`Handshake::is_complete`] tells it whether the client's Finished has been seen yet).

use crate::edge::linger::LingeringTcp;
use rustls::ServerConnection;
use std::io::{self, Read, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Early data a client may send (rustls' `max_early_data_size`): a request head or a few.
pub const MAX_EARLY_DATA: u32 = 16 * 1024;

/// Whether the client's Finished has arrived, shared with the connection's requests: until it
/// has, what the client sent may be a replay of someone else's early data. (Over TCP here;
/// HTTP/3 connections keep one too, in `edge::h3`.)
#[derive(Clone, Debug, Default)]
pub struct Handshake(Arc<AtomicBool>);

impl Handshake {
    pub fn is_complete(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    pub(crate) fn complete(&self) {
        self.0.store(true, Ordering::Release);
    }
}

/// A server TLS connection over TCP (with its lingering close) that may still be handshaking
/// while it is read from.
pub struct EarlyStream {
    tcp: LingeringTcp,
    tls: ServerConnection,
    handshake: Handshake,
    close_notify_sent: bool,
}

/// Runs the handshake until the client's early data is accepted (then the stream is handed
/// out with the handshake still under way) or the handshake is complete.
pub async fn accept(
    config: Arc<rustls::ServerConfig>,
    tcp: LingeringTcp,
) -> io::Result<EarlyStream> {
    let tls = ServerConnection::new(config).map_err(io::Error::other)?;
    let mut s = EarlyStream {
        tcp,
        tls,
        handshake: Handshake::default(),
        close_notify_sent: false,
    };
    std::future::poll_fn(|cx| s.poll_start(cx)).await?;
    Ok(s)
}

/// `io::Read`/`io::Write` over the socket's own poll functions, for rustls' `read_tls` and
/// `write_tls`: `Pending` becomes `WouldBlock` with the waker registered. (tokio's `try_*`
/// would cost a system call per read: unlike `poll_read`, a short read does not tell it the
/// socket is drained.)
struct SyncIo<'a, 'b> {
    io: &'a mut LingeringTcp,
    cx: &'a mut Context<'b>,
}

fn would_block<T>(p: Poll<io::Result<T>>) -> io::Result<T> {
    match p {
        Poll::Ready(r) => r,
        Poll::Pending => Err(io::ErrorKind::WouldBlock.into()),
    }
}

impl Read for SyncIo<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut rb = ReadBuf::new(buf);
        would_block(Pin::new(&mut *self.io).poll_read(self.cx, &mut rb))?;
        Ok(rb.filled().len())
    }
}

impl Write for SyncIo<'_, '_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        would_block(Pin::new(&mut *self.io).poll_write(self.cx, buf))
    }

    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        would_block(Pin::new(&mut *self.io).poll_write_vectored(self.cx, bufs))
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl EarlyStream {
    pub fn connection(&self) -> &ServerConnection {
        &self.tls
    }

    pub fn handshake(&self) -> Handshake {
        self.handshake.clone()
    }

    fn poll_start(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send_tls(cx))?;
            if !self.tls.is_handshaking() || self.tls.early_data().is_some() {
                return Poll::Ready(Ok(()));
            }
            if ready!(self.poll_recv_tls(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "client closed the connection during the TLS handshake",
                )));
            }
        }
    }

    /// Writes out what rustls has queued (handshake messages, alerts, records).
    fn poll_send_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.tls.wants_write() {
            let mut io = SyncIo {
                io: &mut self.tcp,
                cx,
            };
            match self.tls.write_tls(&mut io) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Poll::Pending,
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads TLS records from the socket and processes them; 0 at the end of the stream.
    fn poll_recv_tls(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let mut io = SyncIo {
            io: &mut self.tcp,
            cx,
        };
        match self.tls.read_tls(&mut io) {
            Ok(n) => {
                if let Err(e) = self.tls.process_new_packets() {
                    // The alert rustls queued for the peer, best effort.
                    let _ = self.tls.write_tls(&mut io);
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::InvalidData, e)));
                }
                if !self.tls.is_handshaking() {
                    self.handshake.complete();
                }
                Poll::Ready(Ok(n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Poll::Pending,
            Err(e) => Poll::Ready(Err(e)),
        }
    }

    /// Plaintext already decrypted, copied into `buf`: early data first (it comes first in
    /// the stream), then application data. `None`: nothing yet.
    fn read_plaintext(&mut self, buf: &mut ReadBuf<'_>) -> Option<io::Result<()>> {
        if let Some(mut early) = self.tls.early_data() {
            // At most MAX_EARLY_DATA in all: a bounded part of `buf` is initialised for it.
            let room = buf.remaining().min(MAX_EARLY_DATA as usize);
            match early.read(buf.initialize_unfilled_to(room)) {
                Ok(0) => {}
                Ok(n) => {
                    buf.advance(n);
                    return Some(Ok(()));
                }
                Err(e) => return Some(Err(e)),
            }
        }
        // Copied chunk by chunk from rustls' buffer, as many as fit: no zeroing of `buf`.
        let mut copied = false;
        while buf.remaining() > 0 {
            match self.tls.reader().into_first_chunk() {
                Ok([]) => return Some(Ok(())),
                Ok(chunk) => {
                    let n = chunk.len().min(buf.remaining());
                    buf.put_slice(&chunk[..n]);
                    io::BufRead::consume(&mut self.tls.reader(), n);
                    copied = true;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // rustls reports it again on the next read, after what was copied.
                Err(_) if copied => break,
                Err(e) => return Some(Err(e)),
            }
        }
        copied.then_some(Ok(()))
    }
}

impl AsyncRead for EarlyStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if let Some(r) = this.read_plaintext(buf) {
                return Poll::Ready(r);
            }
            // Handshake messages the last records produced (the server's reply to the client's
            // Finished, tickets) go out before waiting for more; a full socket does not stop
            // the read, the write side registered for a wake-up.
            if let Poll::Ready(Err(e)) = this.poll_send_tls(cx) {
                return Poll::Ready(Err(e));
            }
            if ready!(this.poll_recv_tls(cx))? == 0 {
                // End of stream: rustls now answers the read with EOF or an error.
                return Poll::Ready(
                    this.read_plaintext(buf)
                        .unwrap_or_else(|| Err(io::ErrorKind::UnexpectedEof.into())),
                );
            }
        }
    }
}

impl EarlyStream {
    fn poll_write_with(
        &mut self,
        cx: &mut Context<'_>,
        write: impl Fn(&mut rustls::Writer<'_>) -> io::Result<usize>,
    ) -> Poll<io::Result<usize>> {
        loop {
            let n = write(&mut self.tls.writer())?;
            if n > 0 {
                // Push out what the socket takes now; the rest waits for the next write or
                // flush, as with a BufWriter.
                if let Poll::Ready(Err(e)) = self.poll_send_tls(cx) {
                    return Poll::Ready(Err(e));
                }
                return Poll::Ready(Ok(n));
            }
            // rustls' buffer is full: wait until the socket takes some of it.
            if !self.tls.wants_write() {
                return Poll::Ready(Ok(0));
            }
            ready!(self.poll_send_tls(cx))?;
        }
    }
}

impl AsyncWrite for EarlyStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        self.get_mut().poll_write_with(cx, |w| w.write(buf))
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if bufs.iter().all(|b| b.is_empty()) {
            return Poll::Ready(Ok(0));
        }
        self.get_mut()
            .poll_write_with(cx, |w| w.write_vectored(bufs))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        this.tls.writer().flush()?;
        ready!(this.poll_send_tls(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // An answer to early data can be complete before the client's Finished arrives;
        // closing then would reset the connection under the client's Finished and lose the
        // answer, so the handshake ends first (bounded by the listener's send timeout).
        while this.tls.is_handshaking() && !this.close_notify_sent {
            ready!(this.poll_send_tls(cx))?;
            if ready!(this.poll_recv_tls(cx))? == 0 {
                break;
            }
        }
        if !this.close_notify_sent {
            this.tls.send_close_notify();
            this.close_notify_sent = true;
        }
        ready!(this.poll_send_tls(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}
