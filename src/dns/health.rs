//! PoP health: one probe task per PoP health URL (plain HTTP or HTTPS GET with a timeout),
//! turning consecutive failures/successes into an up/down flag that queries read atomically.
//! Health is an overlay on the map: flags live here, maps only hold `Arc`s to them.

use crate::config::DnsConfig;
use http_body_util::Empty;
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio::sync::watch;

/// Why one probe failed.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    #[error("health URL {0} has no host")]
    NoHost(http::Uri),
    #[error("cannot resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connect to {addr} failed")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {host} failed")]
    Tls {
        host: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{host} is not a valid TLS server name")]
    ServerName { host: String },
    #[error("HTTP exchange with {url} failed")]
    Http {
        url: http::Uri,
        #[source]
        source: hyper::Error,
    },
    #[error("cannot build request for {url}")]
    Request {
        url: http::Uri,
        #[source]
        source: http::Error,
    },
    #[error("{url} answered {status}")]
    Status {
        url: http::Uri,
        status: http::StatusCode,
    },
    #[error("{url} did not answer within {timeout:?}")]
    Timeout { url: http::Uri, timeout: Duration },
}

/// The health of one PoP (by name and URL), shared by every map that lists it.
#[derive(Debug)]
pub struct Health {
    pub pop: String,
    pub url: Option<http::Uri>,
    up: AtomicBool,
    /// Set when no current map lists this PoP any more; its probe task then exits.
    retired: AtomicBool,
    probing: AtomicBool,
    pub probes: AtomicU64,
    pub failures: AtomicU64,
    /// Last probe error, for /map. Only the probe task and the admin endpoint touch it, never
    /// a query, so a plain mutex is fine here.
    last_error: Mutex<Option<String>>,
}

impl Health {
    fn new(pop: &str, url: Option<&http::Uri>) -> Self {
        Health {
            pop: pop.to_string(),
            url: url.cloned(),
            // Healthy until proven otherwise: a fresh sidecar must answer at once.
            up: AtomicBool::new(true),
            retired: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            probes: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            last_error: Mutex::new(None),
        }
    }

    #[inline]
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().map(|g| g.clone()).unwrap_or(None)
    }

    fn set_error(&self, e: Option<String>) {
        if let Ok(mut g) = self.last_error.lock() {
            *g = e;
        }
    }
}

/// All health entries, keyed by PoP name and URL (a changed URL is a new entry).
#[derive(Debug, Default)]
pub struct HealthBook {
    entries: dashmap::DashMap<(String, Option<String>), Arc<Health>>,
}

impl HealthBook {
    pub fn entry(&self, pop: &str, url: Option<&http::Uri>) -> Arc<Health> {
        self.entries
            .entry((pop.to_string(), url.map(|u| u.to_string())))
            .or_insert_with(|| Arc::new(Health::new(pop, url)))
            .clone()
    }

    /// Keeps only the entries in `current` (the newest map's), retiring the rest, and
    /// returns the entries that still need a probe task.
    pub fn reconcile(&self, current: &[Arc<Health>]) -> Vec<Arc<Health>> {
        self.entries.retain(|_, h| {
            let keep = current.iter().any(|c| Arc::ptr_eq(c, h));
            if !keep {
                h.retired.store(true, Ordering::Relaxed);
            }
            keep
        });
        current
            .iter()
            .filter(|h| h.url.is_some() && !h.probing.swap(true, Ordering::Relaxed))
            .cloned()
            .collect()
    }
}

/// The `[dns]` health settings, as one immutable value.
struct ProbeSettings {
    interval: Duration,
    timeout: Duration,
    unhealthy_after: u32,
    healthy_after: u32,
    tls: tokio_rustls::TlsConnector,
}

impl ProbeSettings {
    fn new(cfg: &DnsConfig) -> Self {
        let roots = match &cfg.health_ca {
            // Loaded (and checked) when the configuration was validated.
            Some(ca) => (*ca.roots).clone(),
            None => crate::tls::certs::default_roots(),
        };
        let tls = crate::tls::client::client_config_with_roots(roots, &[b"http/1.1"]);
        ProbeSettings {
            interval: cfg.health_interval,
            timeout: cfg.health_timeout,
            unhealthy_after: cfg.unhealthy_after,
            healthy_after: cfg.healthy_after,
            tls: tokio_rustls::TlsConnector::from(Arc::new(tls)),
        }
    }
}

/// Probe settings shared by every probe task. A reload replaces them as a whole; each task
/// sees the change at once (a new interval starts from then), keeping its PoP's up/down state
/// and counts.
#[derive(Clone)]
pub struct Prober {
    settings: Arc<watch::Sender<Arc<ProbeSettings>>>,
}

impl Prober {
    pub fn new(cfg: &DnsConfig) -> Self {
        let (tx, _) = watch::channel(Arc::new(ProbeSettings::new(cfg)));
        Prober {
            settings: Arc::new(tx),
        }
    }

    /// Applies the health settings of `cfg` (interval, timeout, thresholds, `health_ca`) to
    /// every probe task, running or future.
    pub fn update(&self, cfg: &DnsConfig) {
        self.settings
            .send_replace(Arc::new(ProbeSettings::new(cfg)));
    }

    /// Starts the probe task of one PoP; it runs until the entry is retired.
    pub fn spawn(&self, h: Arc<Health>) {
        let this = self.clone();
        tokio::spawn(async move { this.run(h).await });
    }

    async fn run(self, h: Arc<Health>) {
        let Some(url) = h.url.clone() else { return };
        let mut settings = self.settings.subscribe();
        let mut s = settings.borrow_and_update().clone();
        let mut tick = tokio::time::interval(s.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let (mut fails, mut oks) = (0u32, 0u32);
        while !h.retired.load(Ordering::Relaxed) {
            // Either the next probe is due, or new settings arrived: take them and wait
            // again, so a shorter interval need not wait out the old one. The sender lives
            // as long as the sidecar; once it is gone the `Ok` pattern disables that branch.
            tokio::select! {
                _ = tick.tick() => {}
                Ok(()) = settings.changed() => {
                    let new = settings.borrow_and_update().clone();
                    if new.interval != s.interval {
                        tick = tokio::time::interval_at(
                            tokio::time::Instant::now() + new.interval,
                            new.interval,
                        );
                        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                    s = new;
                    continue;
                }
            }
            let result = match tokio::time::timeout(s.timeout, probe(&s.tls, &url)).await {
                Ok(r) => r,
                Err(_) => Err(HealthError::Timeout {
                    url: url.clone(),
                    timeout: s.timeout,
                }),
            };
            h.probes.fetch_add(1, Ordering::Relaxed);
            match result {
                Ok(()) => {
                    fails = 0;
                    oks = oks.saturating_add(1);
                    h.set_error(None);
                    if !h.is_up() && oks >= s.healthy_after {
                        h.up.store(true, Ordering::Relaxed);
                        tracing::info!(pop = %h.pop, %url, "pop is healthy again");
                    }
                }
                Err(e) => {
                    oks = 0;
                    fails = fails.saturating_add(1);
                    h.failures.fetch_add(1, Ordering::Relaxed);
                    let msg = error_chain(&e);
                    if h.is_up() && fails >= s.unhealthy_after {
                        h.up.store(false, Ordering::Relaxed);
                        tracing::warn!(pop = %h.pop, error = %msg, "pop marked down");
                    }
                    h.set_error(Some(msg));
                }
            }
        }
    }
}

/// One GET; success is a 2xx status.
async fn probe(tls: &tokio_rustls::TlsConnector, url: &http::Uri) -> Result<(), HealthError> {
    let host = url
        .host()
        .ok_or_else(|| HealthError::NoHost(url.clone()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let addr = tokio::net::lookup_host((host.as_str(), port))
        .await
        .map_err(|source| HealthError::Resolve {
            host: host.clone(),
            source,
        })?
        .next()
        .ok_or_else(|| HealthError::Resolve {
            host: host.clone(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no address"),
        })?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| HealthError::Connect {
            addr: addr.to_string(),
            source,
        })?;
    let _ = tcp.set_nodelay(true);
    let authority = url
        .authority()
        .map_or(host.clone(), |a| a.as_str().to_string());
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let req = http::Request::get(path)
        .header(http::header::HOST, authority)
        .header(http::header::USER_AGENT, "edgepop-dns-health")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|source| HealthError::Request {
            url: url.clone(),
            source,
        })?;
    let status = if https {
        let name = ServerName::try_from(host.clone())
            .map_err(|_| HealthError::ServerName { host: host.clone() })?;
        let tls = tls
            .connect(name, tcp)
            .await
            .map_err(|source| HealthError::Tls {
                host: host.clone(),
                source,
            })?;
        exchange(TokioIo::new(tls), req, url).await?
    } else {
        exchange(TokioIo::new(tcp), req, url).await?
    };
    if status.is_success() {
        Ok(())
    } else {
        Err(HealthError::Status {
            url: url.clone(),
            status,
        })
    }
}

async fn exchange<I>(
    io: I,
    req: http::Request<Empty<bytes::Bytes>>,
    url: &http::Uri,
) -> Result<http::StatusCode, HealthError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let http_err = |source| HealthError::Http {
        url: url.clone(),
        source,
    };
    let (mut send, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(http_err)?;
    // The connection task ends when the response is read and `send` is dropped.
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let resp = send.send_request(req).await.map_err(http_err)?;
    Ok(resp.status())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
