//! Origin health: passive (consecutive request/connect failures eject the origin) and active
//! (`health_path` fetched every `health_interval` over the pool's own connections). Routes
//! skip an origin that is down; it comes back after `healthy_after` successes.

use super::{conn::UpstreamBody, Inner, Pool};
use http_body_util::{BodyExt, Empty};
use hyper::{Method, Request, Uri};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

#[derive(Debug)]
pub struct Health {
    up: AtomicBool,
    failures: AtomicU32,
    successes: AtomicU32,
}

impl Default for Health {
    fn default() -> Self {
        Health {
            up: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            successes: AtomicU32::new(0),
        }
    }
}

impl Health {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Returns true when this failure took the origin down.
    pub fn failure(&self, unhealthy_after: u32) -> bool {
        self.successes.store(0, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        n >= unhealthy_after && self.up.swap(false, Ordering::AcqRel)
    }

    /// Returns true when this success brought the origin back.
    pub fn success(&self, healthy_after: u32) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        if self.is_up() {
            return false;
        }
        let n = self.successes.fetch_add(1, Ordering::AcqRel) + 1;
        n >= healthy_after && !self.up.swap(true, Ordering::AcqRel)
    }
}

impl Inner {
    pub(super) fn note_failure(&self) {
        if self.health.failure(self.origin.unhealthy_after) {
            tracing::warn!(origin = %self.origin.name, "origin marked down");
        }
    }

    pub(super) fn note_success(&self) {
        if self.health.success(self.origin.healthy_after) {
            tracing::info!(origin = %self.origin.name, "origin is healthy again");
        }
    }
}

impl Pool {
    pub fn is_healthy(&self) -> bool {
        self.inner.health.is_up()
    }

    /// A request through this pool got a response head.
    pub fn record_success(&self) {
        self.inner.note_success();
    }

    /// An origin's response head arrived `took` after the request was handed to it.
    pub fn record_response(&self, status: u16, took: std::time::Duration) {
        self.inner.stats.responses.record(status);
        self.inner.stats.response_time.observe(took);
    }

    /// A request was sent again on another connection.
    pub fn record_retry(&self) {
        self.inner
            .stats
            .retried
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// A request through this pool failed at the origin (connect, send, first byte).
    pub fn record_failure(&self) {
        self.inner.note_failure();
    }
}

/// Active checks. Without `health_path`, a successful connect is the check (done by the warm
/// task), so this task only runs when a path is configured.
pub(super) async fn run(pool: Pool) {
    let Some(path) = pool.inner.origin.health_path.clone() else {
        return;
    };
    let interval = pool.inner.origin.health_interval;
    // The first check one interval after start: the warm task is opening connections now.
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = pool.inner.shutdown.cancelled() => return,
        }
        let ok = tokio::time::timeout(interval, check_once(&pool, &path))
            .await
            .unwrap_or(false);
        if ok {
            pool.inner.note_success();
        } else {
            pool.inner.note_failure();
        }
    }
}

async fn check_once(pool: &Pool, path: &str) -> bool {
    let Ok(lease) = pool.checkout(false).await else {
        return false;
    };
    let origin = &pool.inner.origin;
    let uri = match origin.protocol {
        crate::config::Protocol::H2 => format!("https://{}{}", origin.server_name.to_str(), path),
        crate::config::Protocol::Http1 => path.to_string(),
    };
    let Ok(uri) = uri.parse::<Uri>() else {
        return false;
    };
    let body: UpstreamBody = Empty::new().map_err(|never| match never {}).boxed_unsync();
    let mut req = Request::new(body);
    *req.method_mut() = Method::GET;
    *req.uri_mut() = uri;
    if origin.protocol == crate::config::Protocol::Http1 {
        if let Ok(h) = origin.server_name.to_str().parse() {
            req.headers_mut().insert(hyper::header::HOST, h);
        }
    }
    let sent_at = tokio::time::Instant::now();
    match lease.send(req).await {
        Ok((resp, guard)) => {
            pool.inner.stats.record_health_rtt(sent_at.elapsed());
            let ok = resp.status().is_success() || resp.status().is_redirection();
            // Drain so an http/1.1 connection can go back to the pool.
            let _ = resp.into_body().collect().await;
            drop(guard);
            ok
        }
        Err(_) => false,
    }
}

pub(super) fn spawn(pool: &Pool) {
    tokio::spawn(run(pool.clone()));
}
