//! Fewer, fuller TLS records on multiplexed (h2) connections.
//!
//! An h2 connection task flushes whenever it runs, and it runs as soon as one stream hands it
//! a frame: tokio runs a task woken by the running one next. So under load each response (and
//! each upstream request) went out as its own TLS record and its own system call, while the
//! other streams' frames were ready a few microseconds later. `Coalesce` keeps what is written
//! in a buffer and, on the first flushes of a round, gives every other ready task a turn
//! (the task wakes itself and goes to the back of the run queue) before it writes everything
//! in one record. A lone request pays up to two extra polls of its connection task. HAProxy
//! and h2o likewise write once per turn of their event loop. Large writes (bodies) skip the
//! buffer so they are not copied twice.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Buffered bytes beyond which writes go out before more are taken: one TLS record's worth.
const LIMIT: usize = 16 * 1024;
/// Yields per flush round. More than one, because one poll of a connection task may flush
/// twice (hyper's server accepts a request and flushes, then goes round its accept loop and
/// flushes again), which used up a single yield without the task ever leaving the CPU
/// (h2/h2 bench: 0.29 -> 0.22 writes per request with two). Three since a client
/// connection's h2 streams run on its task (`edge::streams`): a poll then runs streams and
/// connection together, and the third turn lets the upstream connections' tasks hand over
/// more answers first (h2 clients: 0.165 -> 0.145 writes per request on an h2 upstream,
/// 1.14 -> 1.075 on http/1.1, whose upstream writes are about one per request).
const YIELDS: u8 = 3;

pub struct Coalesce<T> {
    io: T,
    buf: Vec<u8>,
    /// Bytes of `buf` already handed to `io`.
    written: usize,
    /// Times this flush round has let the other ready tasks run (up to `YIELDS`).
    yielded: u8,
    enabled: bool,
}

impl<T> Coalesce<T> {
    /// Coalesces writes when `enabled` (h2); otherwise passes every call straight through.
    pub fn new(io: T, enabled: bool) -> Self {
        Coalesce {
            io,
            buf: Vec::new(),
            written: 0,
            yielded: 0,
            enabled,
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn buffered(&self) -> usize {
        self.buf.len() - self.written
    }
}

impl<T: AsyncWrite + Unpin> Coalesce<T> {
    /// Writes out everything buffered.
    fn drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.written < self.buf.len() {
            let n = ready!(Pin::new(&mut self.io).poll_write(cx, &self.buf[self.written..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.written += n;
        }
        // Freed, not kept: an idle h2 connection holds no buffer (one allocation per round
        // under load is cheap next to the system call it saves).
        self.buf = Vec::new();
        self.written = 0;
        Poll::Ready(Ok(()))
    }

    /// Appends to the buffer, first dropping what a partial drain already wrote, so the
    /// buffer never grows past `LIMIT`.
    fn append(&mut self, data: &[u8]) {
        if self.written > 0 {
            self.buf.drain(..self.written);
            self.written = 0;
        }
        if self.buf.capacity() == 0 {
            self.buf.reserve_exact(LIMIT);
        }
        self.buf.extend_from_slice(data);
    }

    /// Room for `len` more bytes: drains first if they would not fit. `Ready(false)` means
    /// the write is large enough to go straight to the connection.
    fn make_room(&mut self, cx: &mut Context<'_>, len: usize) -> Poll<io::Result<bool>> {
        if self.buffered() + len > LIMIT {
            ready!(self.drain(cx))?;
        }
        Poll::Ready(Ok(len <= LIMIT))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesce<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesce<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if !this.enabled || !ready!(this.make_room(cx, data.len()))? {
            return Pin::new(&mut this.io).poll_write(cx, data);
        }
        this.append(data);
        Poll::Ready(Ok(data.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        let len: usize = bufs.iter().map(|b| b.len()).sum();
        if !this.enabled || !ready!(this.make_room(cx, len))? {
            return Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        }
        for b in bufs {
            this.append(b);
        }
        Poll::Ready(Ok(len))
    }

    fn is_write_vectored(&self) -> bool {
        self.enabled || self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.enabled && this.buffered() > 0 && this.yielded < YIELDS {
            this.yielded += 1;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        ready!(this.drain(cx))?;
        this.yielded = 0;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.drain(cx))?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Counts the writes that reach the connection.
    struct Counting {
        writes: usize,
        data: Vec<u8>,
    }

    impl AsyncWrite for Counting {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes += 1;
            self.data.extend_from_slice(buf);
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    fn counting() -> Counting {
        Counting {
            writes: 0,
            data: Vec::new(),
        }
    }

    #[tokio::test]
    async fn small_writes_leave_as_one_after_one_yield() {
        let mut c = Coalesce::new(counting(), true);
        for i in 0..10u8 {
            c.write_all(&[i; 100]).await.unwrap();
        }
        let n = c
            .write_vectored(&[IoSlice::new(b"ab"), IoSlice::new(b"cd")])
            .await
            .unwrap();
        assert_eq!(n, 4);
        assert_eq!(c.get_ref().writes, 0);
        // The first polls of the flush yield (and wake the task); then it writes.
        let mut flush = std::pin::pin!(c.flush());
        for _ in 0..YIELDS {
            assert!(futures_util::poll!(flush.as_mut()).is_pending());
        }
        flush.await.unwrap();
        assert_eq!(c.get_ref().writes, 1);
        assert_eq!(c.get_ref().data.len(), 1004);
        assert_eq!(&c.get_ref().data[1000..], b"abcd");
        // A flush with nothing buffered does not yield.
        let mut flush = std::pin::pin!(c.flush());
        assert!(futures_util::poll!(flush.as_mut()).is_ready());
    }

    #[tokio::test]
    async fn large_writes_go_straight_through_in_order() {
        let mut c = Coalesce::new(counting(), true);
        c.write_all(b"head").await.unwrap();
        c.write_all(&vec![7u8; LIMIT + 1]).await.unwrap();
        // The buffered bytes went first, then the large write without a copy.
        assert_eq!(c.get_ref().writes, 2);
        assert_eq!(&c.get_ref().data[..4], b"head");
        assert_eq!(c.get_ref().data.len(), LIMIT + 5);
        c.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn disabled_passes_through_and_shutdown_drains() {
        let mut c = Coalesce::new(counting(), false);
        c.write_all(b"x").await.unwrap();
        assert_eq!(c.get_ref().writes, 1);
        let mut c = Coalesce::new(counting(), true);
        c.write_all(b"tail").await.unwrap();
        c.shutdown().await.unwrap();
        assert_eq!(c.get_ref().data, b"tail");
    }

    /// Takes at most 100 bytes per write and is not ready every other call.
    struct Choppy {
        turn: bool,
        data: Vec<u8>,
    }

    impl AsyncWrite for Choppy {
        fn poll_write(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.turn = !self.turn;
            if self.turn {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            let n = buf.len().min(100);
            self.data.extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn a_partly_drained_buffer_keeps_order_and_is_freed_when_empty() {
        let mut c = Coalesce::new(
            Choppy {
                turn: false,
                data: Vec::new(),
            },
            true,
        );
        let first: Vec<u8> = (0..1000u32).map(|i| i as u8).collect();
        c.write_all(&first).await.unwrap();
        // The yields; the writer not ready; one 100-byte write and not ready again: 900 wait.
        {
            let mut flush = std::pin::pin!(c.flush());
            for _ in 0..YIELDS + 2 {
                assert!(futures_util::poll!(flush.as_mut()).is_pending());
            }
        }
        assert_eq!(c.get_ref().data.len(), 100);
        c.write_all(b"after").await.unwrap();
        // What was written is dropped before appending: the buffer holds only what waits.
        assert_eq!(c.buf.len(), 905);
        c.flush().await.unwrap();
        let mut want = first.clone();
        want.extend_from_slice(b"after");
        assert_eq!(c.get_ref().data, want);
        assert_eq!(c.buf.capacity(), 0, "an idle connection keeps no buffer");
    }

    #[tokio::test]
    async fn reads_pass_through() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut c = Coalesce::new(a, true);
        b.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        c.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"ping");
    }
}
