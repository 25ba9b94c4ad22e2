//! The h2 streams of one client connection, run on the connection's own task rather than on
//! a tokio task each. hyper hands every stream (its service future and response body) to an
//! executor; with tokio's, each request cost a task spawn, and every frame a stream produced
//! woke the connection task from another one. Here hyper's executor is [`StreamExec`], which
//! queues the stream for [`Streams`], polled by the connection's future before the
//! connection itself, so what the streams write goes out in the same poll. A connection's
//! streams then share one task (and core); connections still spread over the runtime. The
//! connection is polled only when it was woken ([`Woken`]), not whenever a stream was. A
//! drain waits for the streams with their connection. A stream that panics (a bug) ends
//! alone, as its own task would: the connection and its other streams go on.

use futures_util::stream::{FuturesUnordered, StreamExt};
use futures_util::task::AtomicWaker;
use futures_util::FutureExt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Wake, Waker};

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// hyper's executor for one h2 connection: queues its streams for that connection's
/// [`Streams`].
#[derive(Clone)]
pub struct StreamExec(Arc<Shared>);

struct Shared {
    /// Streams hyper started since the connection's task last looked.
    started: Mutex<Vec<StreamFuture>>,
    /// The connection's task.
    waker: AtomicWaker,
}

impl<F> hyper::rt::Executor<F> for StreamExec
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        let fut = AssertUnwindSafe(fut).catch_unwind().map(|r| {
            if r.is_err() {
                tracing::error!("an h2 stream panicked; its connection goes on");
            }
        });
        self.0
            .started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::pin(fut));
        self.0.waker.wake();
    }
}

/// The running streams of one connection.
pub struct Streams {
    shared: Arc<Shared>,
    running: FuturesUnordered<StreamFuture>,
}

impl Streams {
    pub fn new() -> (Streams, StreamExec) {
        let shared = Arc::new(Shared {
            started: Mutex::new(Vec::new()),
            waker: AtomicWaker::new(),
        });
        let exec = StreamExec(shared.clone());
        let streams = Streams {
            shared,
            running: FuturesUnordered::new(),
        };
        (streams, exec)
    }

    /// Streams hyper started that have not run yet.
    pub fn has_started(&self) -> bool {
        !self
            .shared
            .started
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_empty()
    }

    /// Runs the streams that can make progress; pending for as long as the connection lives
    /// (its task is woken when a stream can go on or a new one starts).
    pub fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        self.shared.waker.register(cx.waker());
        loop {
            {
                let mut started = self
                    .shared
                    .started
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                self.running.extend(started.drain(..));
            }
            // `FuturesUnordered` hands back control (and wakes this task) after a round over
            // its streams, so a busy connection does not starve the others.
            match self.running.poll_next_unpin(cx) {
                Poll::Ready(Some(())) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// Streams queued but never run hold the executor (hyper gives each stream a copy), which
/// holds the queue: dropped here, or that cycle would keep them, with their requests'
/// connection slots and runtime, for good.
impl Drop for Streams {
    fn drop(&mut self) {
        let started = std::mem::take(
            &mut *self
                .shared
                .started
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        // Outside the lock, which a stream's drop may want.
        drop(started);
    }
}

/// A waker for one part of a task's future: notes that this part has work, then wakes the
/// task, so a task woken for another part skips polling this one. The h2 connection is
/// polled with one (its socket, a stream's frame to send, its timers), so a task woken only
/// for a stream does not poll it; `serve` keeps its timers behind another.
pub struct Woken {
    inner: Arc<ConnWoken>,
    waker: Waker,
}

struct ConnWoken {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ConnWoken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Woken {
    pub fn new() -> Self {
        let inner = Arc::new(ConnWoken {
            // Polled the first time round.
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(inner.clone());
        Woken { inner, waker }
    }

    /// Polls the part with its own waker, if it was woken since its last poll.
    pub fn poll<T>(
        &self,
        cx: &mut Context<'_>,
        part: impl FnOnce(&mut Context<'_>) -> Poll<T>,
    ) -> Poll<T> {
        self.inner.task.register(cx.waker());
        if !self.inner.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        part(&mut Context::from_waker(&self.waker))
    }

    /// The part has work that nothing will wake it for (a graceful shutdown, a timer reset).
    pub fn wake(&self) {
        self.inner.woken.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::AtomicUsize;

    #[tokio::test]
    async fn streams_started_on_the_executor_run_on_the_polling_task() {
        let (mut streams, exec) = Streams::new();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        for _ in 0..3 {
            let done = done.clone();
            exec.execute(async move {
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        let waiting = done.clone();
        exec.execute(async move {
            let _ = rx.await;
            waiting.fetch_add(1, Ordering::SeqCst);
        });
        // Nothing runs until the connection's task polls.
        assert_eq!(done.load(Ordering::SeqCst), 0);
        std::future::poll_fn(|cx| {
            assert!(streams.poll_run(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(done.load(Ordering::SeqCst), 3);
        // The one still waiting goes on when woken, and then the set is empty.
        tx.send(()).unwrap();
        std::future::poll_fn(|cx| {
            assert!(streams.poll_run(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(done.load(Ordering::SeqCst), 4);
        assert!(streams.running.is_empty());
    }

    /// Polls a part behind `woken`; the waker it was polled with, if it was.
    fn poll_part(woken: &Woken) -> Option<Waker> {
        let mut cx = Context::from_waker(Waker::noop());
        let mut polled = None;
        let r = woken.poll(&mut cx, |cx| {
            polled = Some(cx.waker().clone());
            Poll::<()>::Pending
        });
        assert!(r.is_pending());
        polled
    }

    #[tokio::test]
    async fn streams_never_run_are_freed_with_the_connection() {
        struct Flag(Arc<AtomicUsize>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let (streams, exec) = Streams::new();
        let dropped = Arc::new(AtomicUsize::new(0));
        // As hyper's streams do, each holds a copy of the executor.
        let (held, flag) = (exec.clone(), Flag(dropped.clone()));
        exec.execute(async move {
            let _keep = (held, flag);
            std::future::pending::<()>().await;
        });
        drop((streams, exec));
        assert_eq!(dropped.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn a_panicking_stream_ends_alone() {
        let (mut streams, exec) = Streams::new();
        let done = Arc::new(AtomicUsize::new(0));
        exec.execute(async { panic!("a bug in one stream") });
        let other = done.clone();
        exec.execute(async move {
            other.fetch_add(1, Ordering::SeqCst);
        });
        std::future::poll_fn(|cx| {
            assert!(streams.poll_run(cx).is_pending());
            Poll::Ready(())
        })
        .await;
        assert_eq!(done.load(Ordering::SeqCst), 1);
        assert!(streams.running.is_empty());
    }

    #[test]
    fn a_part_is_polled_only_after_its_own_waker_fired() {
        let woken = Woken::new();
        // The first poll goes through; a poll for another reason does not.
        let own = poll_part(&woken).expect("first poll");
        assert!(poll_part(&woken).is_none());
        // The part's own waker (the one it was polled with) lets the next poll through.
        own.wake();
        assert!(poll_part(&woken).is_some());
        assert!(poll_part(&woken).is_none());
        // So does `wake`.
        woken.wake();
        assert!(poll_part(&woken).is_some());
    }
}
