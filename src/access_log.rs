//! The access log: one JSON line per request (`[pop] access_log`), written by a thread of its
//! own so a slow disk never stalls a request. Requests hand their entry over a bounded
//! channel without waiting; when the writer falls behind, entries are dropped and counted
//! (`edgepop_access_log_dropped_total`) rather than queued without bound. SIGHUP reopens the
//! file (rotate by renaming it, then send SIGHUP).

use crate::config::AccessLogTarget;
use serde::Serialize;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Entries waiting for the writer before new ones are dropped.
const QUEUE: usize = 16 * 1024;

/// One request, as logged.
#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// RFC 3339, milliseconds, UTC: when the request arrived.
    pub time: String,
    pub client: SocketAddr,
    /// "HTTP/1.1", "HTTP/2".
    pub protocol: &'static str,
    pub method: String,
    pub host: String,
    pub path: String,
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
}

impl Entry {
    /// What is known when the request head arrives; the rest is filled in later.
    pub fn start(
        client: SocketAddr,
        version: http::Version,
        method: &http::Method,
        host: &str,
        path: &str,
    ) -> Entry {
        Entry {
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            client,
            protocol: protocol(version),
            method: method.as_str().to_string(),
            host: host.to_string(),
            path: path.to_string(),
            status: 0,
            bytes: 0,
            duration_ms: 0.0,
            origin: None,
            pool_wait_ms: None,
            upstream_ms: None,
            upstream_connection: None,
            outcome: "ok",
        }
    }
}

pub fn ms(d: Duration) -> f64 {
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

enum Msg {
    Entry(Box<Entry>),
    Reopen(AccessLogTarget),
}

/// A handle on the writer; cheap to clone. The writer thread ends (after writing what it
/// has) when the last handle is dropped.
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog").finish_non_exhaustive()
    }
}

impl AccessLog {
    /// Opens the target (an error if the file cannot be opened) and starts the writer.
    pub fn start(target: &AccessLogTarget) -> std::io::Result<AccessLog> {
        let out = open(target)?;
        let (tx, rx) = sync_channel(QUEUE);
        std::thread::Builder::new()
            .name("edgepop-access-log".into())
            .spawn(move || write_loop(rx, out))?;
        Ok(AccessLog {
            tx,
            dropped: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Hands an entry to the writer; never waits.
    pub fn record(&self, entry: Entry) {
        match self.tx.try_send(Msg::Entry(Box::new(entry))) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Reopens (or switches to) `target`: after log rotation, or a changed path on reload.
    pub fn reopen(&self, target: &AccessLogTarget) {
        if self.tx.try_send(Msg::Reopen(target.clone())).is_err() {
            tracing::warn!("access log: writer busy, reopen request dropped");
        }
    }

    /// Entries dropped because the writer fell behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
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

/// Writes entries in batches: everything already queued goes out in one buffered write.
fn write_loop(rx: Receiver<Msg>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    let mut line = Vec::with_capacity(512);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Entry(e) => {
                    line.clear();
                    if serde_json::to_writer(&mut line, &e).is_ok() {
                        line.push(b'\n');
                        if let Err(err) = out.write_all(&line) {
                            tracing::warn!(error = %err, "access log write failed");
                        }
                    }
                }
                Msg::Reopen(target) => {
                    let _ = out.flush();
                    match open(&target) {
                        Ok(o) => out = std::io::BufWriter::with_capacity(64 * 1024, o),
                        Err(err) => {
                            tracing::warn!(error = %err, "access log: cannot reopen; keeping the old file")
                        }
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        if let Err(err) = out.flush() {
            tracing::warn!(error = %err, "access log flush failed");
        }
    }
    let _ = out.flush();
}

/// An entry being filled in while its request runs; written by [`PendingLog::finish`].
#[derive(Debug)]
pub struct PendingLog {
    log: AccessLog,
    entry: Entry,
    started: tokio::time::Instant,
}

impl PendingLog {
    /// Starts the entry from the request head as the client sent it.
    pub fn new<B>(log: &AccessLog, req: &http::Request<B>, client: SocketAddr) -> PendingLog {
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
        PendingLog {
            log: log.clone(),
            entry: Entry::start(client, req.version(), req.method(), host, path),
            started: tokio::time::Instant::now(),
        }
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
        self.entry.origin = Some(origin.to_string());
        self.entry.status = status;
        self.entry.pool_wait_ms = Some(ms(waited));
        self.entry.upstream_ms = Some(ms(ttfb.saturating_sub(waited)));
        self.entry.upstream_connection = Some(connection);
    }

    /// A response that has no body to send (HEAD, 1xx, 204, 304): the client's side never
    /// reads it, so dropping it unread is its normal end.
    pub fn bodiless(&self) -> bool {
        self.entry.method == "HEAD" || matches!(self.entry.status, 100..=199 | 204 | 304)
    }

    pub fn status(&mut self, status: u16) {
        self.entry.status = status;
    }

    /// Completes the entry and hands it to the writer.
    pub fn finish(mut self, bytes: u64, outcome: &'static str) {
        self.entry.bytes = bytes;
        self.entry.outcome = outcome;
        self.entry.duration_ms = ms(self.started.elapsed());
        self.log.record(self.entry);
    }
}
