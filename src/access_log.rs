//! The access log: one JSON line per request (`[pop] access_log`), written by a thread of its
//! own so a slow disk never stalls a request. Requests push their entry onto a bounded
//! lock-free queue (no lock, no system call); the writer drains it every 100 ms. When it
//! falls behind, entries are dropped and counted (`edgepop_access_log_dropped_total`) rather
//! than queued without bound. SIGHUP reopens the file (rotate by renaming it, then SIGHUP).

use crate::config::AccessLogTarget;
use crate::metrics::ClientHandshake;
use crossbeam_queue::ArrayQueue;
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// Entries waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;
/// The longest host or path logged, in bytes (longer ones end with "..."): a full queue of
/// 64 KiB request targets would hold a gigabyte.
const FIELD_MAX: usize = 8 * 1024;
/// How often the writer comes by (sooner when the queue is half full).
const FLUSH_EVERY: Duration = Duration::from_millis(100);

/// One request, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// When the request arrived; written as RFC 3339, milliseconds, UTC (by the writer
    /// thread: formatting is not the request's business).
    #[serde(serialize_with = "rfc3339")]
    pub time: SystemTime,
    pub client: SocketAddr,
    /// "HTTP/1.1", "HTTP/2".
    pub protocol: &'static str,
    pub method: String,
    pub host: String,
    pub path: String,
    /// The `X-Request-Id` the edge gave the request (and the origin received).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub request_id: String,
    /// The request arrived in TLS 0-RTT early data, before the handshake completed (only
    /// written when true).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub early_data: bool,
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// From the request head to the end of the response body, milliseconds.
    pub duration_ms: f64,
    /// The origin that answered; absent when edgepop answered itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    /// Time spent getting a pooled connection, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool_wait_ms: Option<f64>,
    /// Upstream time to the response head, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_ms: Option<f64>,
    /// "warm", "fresh" or "resumed".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_connection: Option<&'static str>,
    /// "ok", "aborted" (the client went away or the body failed mid-way) or, for answers
    /// edgepop made itself, the short reason it gave.
    pub outcome: &'static str,
    /// The request's number on its client connection, from 1 (nginx's `$connection_requests`).
    pub connection_request: u64,
    /// How the client connection's handshake went: "full", "resumed", "early" (TLS over TCP,
    /// 0-RTT data accepted), "quic"; absent for plain HTTP.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake: Option<&'static str>,
    /// On a connection's first request, which waited for it: the handshake's time (its first
    /// byte to the request being readable), milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_handshake_ms: Option<f64>,
}

impl Entry {
    /// What is known when the request head arrives; the rest is filled in later.
    pub fn start(
        client: &crate::proxy::ClientConn,
        version: http::Version,
        method: &http::Method,
        host: &str,
        path: &str,
    ) -> Entry {
        Entry {
            time: SystemTime::now(),
            client: client.addr,
            protocol: protocol(version),
            method: method.as_str().to_string(),
            host: clipped(host),
            path: clipped(path),
            request_id: String::new(),
            early_data: false,
            status: 0,
            bytes: 0,
            duration_ms: 0.0,
            origin: None,
            pool_wait_ms: None,
            upstream_ms: None,
            upstream_connection: None,
            outcome: "ok",
            connection_request: client.request,
            tls_handshake: client.handshake.map(ClientHandshake::label),
            tls_handshake_ms: client
                .handshake_time
                .filter(|_| client.request == 1)
                .map(ms),
        }
    }
}

/// `s`, cut at [`FIELD_MAX`] bytes (on a character boundary) and marked with "...".
fn clipped(s: &str) -> String {
    if s.len() <= FIELD_MAX {
        return s.to_string();
    }
    let mut end = FIELD_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_rfc3339_millis(*t))
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn protocol(v: http::Version) -> &'static str {
    match v {
        http::Version::HTTP_09 => "HTTP/0.9",
        http::Version::HTTP_10 => "HTTP/1.0",
        http::Version::HTTP_11 => "HTTP/1.1",
        http::Version::HTTP_2 => "HTTP/2",
        http::Version::HTTP_3 => "HTTP/3",
        _ => "HTTP",
    }
}

/// What the request threads and the writer share.
struct Shared {
    queue: ArrayQueue<Box<Entry>>,
    dropped: Arc<AtomicU64>,
    /// Set by `reopen`, taken by the writer.
    reopen: Mutex<Option<AccessLogTarget>>,
    /// Set when the writer has been woken and not yet come by: one wake-up per fill.
    woken: AtomicBool,
    /// Set by `close`: write what is queued and end.
    closing: AtomicBool,
    handle: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// A handle on the writer; cheap to clone. The writer thread ends (after writing what it
/// has) when the last handle is dropped.
#[derive(Clone)]
pub struct AccessLog {
    shared: Arc<Shared>,
    writer: std::thread::Thread,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Opens the target (an error if the file cannot be opened) and starts the writer, which
    /// counts the entries it has to drop in `dropped`.
    pub fn start(target: &AccessLogTarget, dropped: Arc<AtomicU64>) -> std::io::Result<AccessLog> {
        let out = open(target)?;
        let shared = Arc::new(Shared {
            queue: ArrayQueue::new(QUEUE),
            dropped,
            reopen: Mutex::new(None),
            woken: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            handle: Mutex::new(None),
        });
        let for_writer = shared.clone();
        let handle = std::thread::Builder::new()
            .name("edgepop-access-log".into())
            .spawn(move || write_loop(&for_writer, out))?;
        let writer = handle.thread().clone();
        if let Ok(mut h) = shared.handle.lock() {
            *h = Some(handle);
        }
        Ok(AccessLog { shared, writer })
    }

    /// Writes what is queued and stops the writer (at exit, after the drain); waits for it
    /// up to `limit`.
    pub async fn close(&self, limit: Duration) {
        self.shared.closing.store(true, Ordering::Release);
        self.writer.unpark();
        let handle = self.shared.handle.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let join = tokio::task::spawn_blocking(move || h.join());
            if tokio::time::timeout(limit, join).await.is_err() {
                tracing::warn!("access log: writer did not finish in {limit:?}");
            }
        }
    }

    /// Hands an entry to the writer: a lock-free push, no system call. The writer is woken
    /// only when the queue is half full; otherwise it comes by every 100 ms.
    pub fn record(&self, entry: Box<Entry>) {
        let q = &self.shared.queue;
        let full = q.push(entry).is_err();
        if full {
            self.shared.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if (full || q.len() >= QUEUE / 2) && !self.shared.woken.swap(true, Ordering::AcqRel) {
            self.writer.unpark();
        }
    }

    /// Reopens (or switches to) `target`: after log rotation, or a changed path on reload.
    pub fn reopen(&self, target: &AccessLogTarget) {
        if let Ok(mut r) = self.shared.reopen.lock() {
            *r = Some(target.clone());
        }
        self.writer.unpark();
    }

    /// Entries dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for AccessLog {
    fn drop(&mut self) {
        // The last handle going (the writer holds the other reference): let the writer
        // write what is left and end now.
        if Arc::strong_count(&self.shared) == 2 {
            self.writer.unpark();
        }
    }
}

fn open(target: &AccessLogTarget) -> std::io::Result<Box<dyn Write + Send>> {
    Ok(match target {
        AccessLogTarget::Stdout => Box::new(std::io::stdout()),
        AccessLogTarget::File(path) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?,
        ),
    })
}

/// Every [`FLUSH_EVERY`] (or when woken): write everything queued in one buffered write,
/// reopen if asked. Ends once every [`AccessLog`] handle is gone and the queue is written.
fn write_loop(shared: &Arc<Shared>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(512);
    loop {
        // Checked before draining, so what the last handle queued is still written.
        let last = Arc::strong_count(shared) == 1 || shared.closing.load(Ordering::Acquire);
        shared.woken.store(false, Ordering::Release);
        let reopen = shared.reopen.lock().ok().and_then(|mut r| r.take());
        if let Some(target) = reopen {
            let _ = out.flush();
            match open(&target) {
                Ok(o) => out = std::io::BufWriter::with_capacity(64 * 1024, o),
                Err(err) => {
                    tracing::warn!(error = %err, "access log: cannot reopen; keeping the old file")
                }
            }
        }
        while let Some(e) = shared.queue.pop() {
            line.clear();
            if serde_json::to_writer(&mut line, &e).is_ok() {
                line.push(b'\n');
                if let Err(err) = out.write_all(&line) {
                    tracing::warn!(error = %err, "access log write failed");
                }
            }
        }
        if let Err(err) = out.flush() {
            tracing::warn!(error = %err, "access log flush failed");
        }
        if last {
            break;
        }
        std::thread::park_timeout(FLUSH_EVERY);
    }
}

/// An entry being filled in while its request runs; written by [`PendingLog::finish`].
#[derive(Debug)]
pub struct PendingLog {
    log: AccessLog,
    /// `None` once written.
    entry: Option<Box<Entry>>,
    started: tokio::time::Instant,
    /// The response's Content-Length, when it has one.
    expected: Option<u64>,
}

impl PendingLog {
    /// Starts the entry from the request head as the client sent it.
    pub fn new<B>(
        log: &AccessLog,
        req: &http::Request<B>,
        client: &crate::proxy::ClientConn,
    ) -> PendingLog {
        let host = req
            .uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                req.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or("");
        let path = req.uri().path_and_query().map_or("", |p| p.as_str());
        let mut entry = Box::new(Entry::start(
            client,
            req.version(),
            req.method(),
            host,
            path,
        ));
        if let Some(id) = req
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
        {
            entry.request_id = id.to_string();
        }
        entry.early_data = req.extensions().get::<crate::proxy::EarlyData>().is_some();
        PendingLog {
            log: log.clone(),
            entry: Some(entry),
            started: tokio::time::Instant::now(),
            expected: None,
        }
    }

    /// The response body's announced length (`Content-Length`).
    pub fn expect_bytes(&mut self, n: Option<u64>) {
        self.expected = n;
    }

    /// The upstream part: which origin, how long the pool and the origin took, and whether
    /// the connection was warm.
    pub fn upstream(
        &mut self,
        origin: &str,
        status: u16,
        waited: Duration,
        ttfb: Duration,
        connection: &'static str,
    ) {
        if let Some(e) = self.entry.as_mut() {
            e.origin = Some(origin.to_string());
            e.status = status;
            e.pool_wait_ms = Some(ms(waited));
            e.upstream_ms = Some(ms(ttfb.saturating_sub(waited)));
            e.upstream_connection = Some(connection);
        }
    }

    /// Whether a body dropped after `sent` bytes was complete: all of its announced length
    /// went out (a client may close before the end-of-stream marker arrives), or there is no
    /// body to send (HEAD, 1xx, 204, 304: the client's side never reads it).
    pub fn complete(&self, sent: u64) -> bool {
        self.expected == Some(sent)
            || self
                .entry
                .as_ref()
                .is_some_and(|e| e.method == "HEAD" || matches!(e.status, 100..=199 | 204 | 304))
    }

    pub fn status(&mut self, status: u16) {
        if let Some(e) = self.entry.as_mut() {
            e.status = status;
        }
    }

    /// Completes the entry and hands it to the writer.
    pub fn finish(mut self, bytes: u64, outcome: &'static str) {
        self.write(bytes, outcome);
    }

    fn write(&mut self, bytes: u64, outcome: &'static str) {
        if let Some(mut e) = self.entry.take() {
            e.bytes = bytes;
            e.outcome = outcome;
            e.duration_ms = ms(self.started.elapsed());
            self.log.record(e);
        }
    }
}

impl Drop for PendingLog {
    /// The request went away before a response head was sent (the client reset the stream
    /// or closed the connection while edgepop waited for the origin): logged with nginx's
    /// 499, "client closed request".
    fn drop(&mut self) {
        if let Some(e) = self.entry.as_mut() {
            if e.status == 0 {
                e.status = 499;
            }
        }
        self.write(0, "aborted");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_hosts_and_paths_are_clipped_on_a_character_boundary() {
        assert_eq!(clipped("/short"), "/short");
        let exact = "a".repeat(FIELD_MAX);
        assert_eq!(clipped(&exact), exact);
        // A two-byte character straddling the cut is left out whole.
        let long = format!("{}é{}", "a".repeat(FIELD_MAX - 1), "b".repeat(100));
        let c = clipped(&long);
        assert_eq!(c, format!("{}...", "a".repeat(FIELD_MAX - 1)));
    }
}
