//! `serve` and `check`: load the config, open the warm pools (before reporting ready), start
//! admin and listeners; SIGHUP reloads routes, certificates and origins; SIGTERM drains.

use crate::access_log::AccessLog;
use crate::admin::{self, EdgeStatus};
use crate::config::regions::Force;
use crate::config::{self, Config, EdgeConfig, Role};
use crate::edge;
use crate::metrics::EdgeCounters;
use crate::pool::Pool;
use crate::proxy::Runtime;
use crate::tls::certs::{CertUse, Validity};
use anyhow::Context;
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `edgepop check`: validates every role whose sections the file has (the DNS role with its
/// region file); exit 1 with `file:line:column: reason` on the first error.
pub fn check(path: &Path) -> anyhow::Result<ExitCode> {
    let cfg = match config::load(path) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            return Ok(ExitCode::FAILURE);
        }
    };
    let regions = match &cfg.dns {
        Some(dns) => match config::regions::load(&dns.regions) {
            Ok(r) => Some(r),
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        None => None,
    };
    let statics = match cfg
        .dns
        .as_ref()
        .and_then(|d| Some((d, d.zone_file.as_ref()?)))
    {
        Some((dns, path)) => match crate::dns::records::load(path, dns) {
            Ok(r) => Some((path, r)),
            Err(e) => {
                eprintln!("{e}");
                return Ok(ExitCode::FAILURE);
            }
        },
        None => None,
    };
    println!("{}: ok", path.display());
    if let Some(e) = &cfg.edge {
        let resumption = match (&e.pop.ticket_keys, e.pop.early_data) {
            (_, true) => "per-instance sessions, 0-RTT early data on",
            (Some(_), false) => "shared ticket keys",
            (None, false) => "per-process ticket key",
        };
        println!("  pop {} (TLS resumption: {resumption})", e.pop.name);
    }
    if let Some(a) = &cfg.admin {
        println!("  admin {}", a.listen);
    }
    if let Some(e) = &cfg.edge {
        print_edge_summary(e);
    }
    if let (Some(d), Some(r)) = (&cfg.dns, regions) {
        println!(
            "  dns {} zone {} names {} ttl {:?}",
            d.listen,
            d.zone,
            d.names.join(","),
            d.ttl
        );
        if let Some(a) = d.admin_listen {
            println!("  dns admin {a}");
        }
        if let Some(n) = &d.nsid {
            println!("  nsid {:?}", n.to_string());
        }
        if d.udp_io != crate::config::UdpIo::Auto {
            println!("  dns udp_io {}", d.udp_io.as_str());
        }
        if d.udp_coalesce_us > 0 {
            println!(
                "  dns udp_coalesce {}",
                humantime::format_duration(std::time::Duration::from_micros(
                    d.udp_coalesce_us.into()
                ))
            );
        }
        if let Some(l) = &d.rate_limit {
            let exempt: Vec<String> = l.exempt.iter().map(ToString::to_string).collect();
            println!(
                "  rate limit {} responses per {}, burst {}{}, slip {}, networks /{} and /{}{}",
                l.responses,
                humantime::format_duration(l.per),
                l.burst,
                [
                    ("nodata", l.nodata),
                    ("nxdomains", l.nxdomains),
                    ("errors", l.errors)
                ]
                .iter()
                .filter(|(_, n)| *n != l.responses)
                .map(|(k, n)| match n {
                    0 => format!(", {k} not limited"),
                    n => format!(", {k} {n}"),
                })
                .collect::<String>(),
                l.slip,
                l.ipv4_prefix,
                l.ipv6_prefix,
                if exempt.is_empty() {
                    String::new()
                } else {
                    format!(", exempt {}", exempt.join(" "))
                }
            );
        }
        if let Some(k) = &d.cookie_keys {
            println!("  cookie keys {} ({:?})", k.path.display(), k.secret);
        }
        println!(
            "  nameservers {}",
            d.nameservers
                .iter()
                .map(|n| match d.glue.iter().find(|g| &g.name == n) {
                    Some(g) => format!(
                        "{n} ({})",
                        g.addresses
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(" ")
                    ),
                    None => n.clone(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        );
        for n in d.unreachable_nameservers() {
            println!(
                "  warning: nameserver {n} is inside zone {} but has no [dns] glue addresses; \
                 resolvers cannot reach it",
                d.zone
            );
        }
        println!(
            "  regions {}: {} PoPs, {} regions, {} networks, default {}",
            d.regions.display(),
            r.pops.len(),
            r.regions.len(),
            r.regions.iter().map(|g| g.networks.len()).sum::<usize>(),
            r.default
                .iter()
                .filter_map(|&i| r.pops.get(i).map(|p| p.name.as_str()))
                .collect::<Vec<_>>()
                .join(" > ")
        );
        print_forced(&r);
        if let Some((path, names)) = statics {
            println!(
                "  zone file {}: {} records at {} names",
                path.display(),
                names.iter().map(|n| n.record_count()).sum::<usize>(),
                names.len()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_edge_summary(e: &EdgeConfig) {
    for l in &e.listeners {
        let h3 = if l.http3 { " (+ HTTP/3 over UDP)" } else { "" };
        let plain = l
            .redirect_to_https
            .map(|p| format!(" (plain HTTP, redirected to HTTPS on port {p})"))
            .unwrap_or_default();
        let proxy = if l.proxy_protocol {
            ", PROXY protocol header required"
        } else {
            ""
        };
        let per_client = l
            .max_connections_per_client
            .map(|n| format!(", at most {n} per client"))
            .unwrap_or_default();
        println!("  listener {}{plain}{h3}{proxy}{per_client}", l.address);
    }
    let now = std::time::SystemTime::now();
    let mut warnings = Vec::new();
    for c in &e.certificates {
        let validity = c.key.cert.first().and_then(Validity::of);
        println!(
            "  certificate {} ({}){}",
            c.names.join(","),
            c.cert_path.display(),
            validity
                .map(|v| format!(" {}", v.describe(now)))
                .unwrap_or_default()
        );
        if let Some(v) = validity {
            let what = format!("certificate {}", c.cert_path.display());
            warnings.extend(v.warnings(&what, CertUse::Server, now));
        }
    }
    for o in &e.origins {
        let client_cert = o
            .client_auth
            .as_ref()
            .map(|a| format!(" client_cert={}", a.cert.display()))
            .unwrap_or_default();
        let client_validity = o
            .client_auth
            .as_ref()
            .and_then(|a| Some((a, a.chain.first().and_then(Validity::of)?)));
        if let Some((a, v)) = client_validity {
            let what = format!("origin {} client_cert {}", o.name, a.cert.display());
            warnings.extend(v.warnings(&what, CertUse::Client, now));
        }
        println!(
            "  origin {} {} sni={} {} warm={} max={}{client_cert}",
            o.name,
            o.address,
            o.server_name.to_str(),
            o.protocol.as_str(),
            o.warm_connections,
            o.max_connections
        );
    }
    for r in &e.routes {
        let origins: Vec<&str> = r
            .origins
            .iter()
            .filter_map(|&i| e.origins.get(i).map(|o| o.name.as_str()))
            .collect();
        let limit = r
            .rate_limit
            .map(|l| {
                format!(
                    ", {} requests per {} per client, bursts of {}, {} clients remembered",
                    l.requests,
                    humantime::format_duration(l.per),
                    l.burst,
                    l.max_clients
                )
            })
            .unwrap_or_default();
        let hsts = r
            .hsts
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .map(|v| format!(", Strict-Transport-Security: {v}"))
            .unwrap_or_default();
        let edits = [
            ("request", &r.request_headers),
            ("response", &r.response_headers),
        ]
        .into_iter()
        .filter(|(_, e)| !e.is_empty())
        .map(|(side, e)| format!(", {side} headers: {}", describe_edits(e)))
        .collect::<String>();
        println!(
            "  route {} -> {}{limit}{hsts}{edits}",
            r.hosts.join(","),
            origins.join(" > ")
        );
    }
    for w in warnings {
        println!("  warning: {w}");
    }
}

/// `remove a, b; set c` for `check`: names only, as a value may be a secret the origin checks.
fn describe_edits(e: &crate::config::HeaderEdits) -> String {
    let list = |verb: &str, names: Vec<&str>| {
        (!names.is_empty()).then(|| format!("{verb} {}", names.join(", ")))
    };
    let remove = list("remove", e.remove.iter().map(|n| n.as_str()).collect());
    let set = list("set", e.set.iter().map(|(n, _)| n.as_str()).collect());
    remove.into_iter().chain(set).collect::<Vec<_>>().join("; ")
}

/// A running edge: listeners, pools and admin, in this process.
pub struct EdgeServer {
    /// Bound listener addresses, in config order (useful when the config says port 0).
    pub listen_addrs: Vec<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    status: EdgeStatus,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    /// Kept across reloads so sessions keep resuming.
    resumption: crate::tls::sni::Resumption,
    shutdown: CancellationToken,
    /// The admin listener outlives `shutdown`: it answers (503 "draining") until the drain ends.
    admin_stop: CancellationToken,
    /// The configured admin address (as written, so port 0 compares equal across reloads).
    admin_listen: Option<SocketAddr>,
    /// Each running listener's settings, which a reload swaps where it can.
    listeners: Vec<edge::Settings>,
    /// Runtimes replaced by reloads that requests may still hold (a pool they use stays open
    /// until none does).
    replaced: std::sync::Mutex<Vec<std::sync::Weak<Runtime>>>,
    tracker: TaskTracker,
}

/// The floor of origin `i`: `warm_connections` if it is some route's first choice,
/// `standby_connections` if it is only ever a failover target.
fn floor_of(edge: &EdgeConfig, i: usize, o: &config::OriginConfig) -> usize {
    let primary = edge.routes.iter().any(|r| r.origins.first() == Some(&i));
    let floor = if primary {
        o.warm_connections
    } else {
        o.standby_connections
    };
    floor.min(o.max_connections)
}

fn new_pool(edge: &EdgeConfig, i: usize, o: &Arc<config::OriginConfig>) -> anyhow::Result<Pool> {
    Pool::new(o.clone(), floor_of(edge, i, o)).with_context(|| format!("origin {}", o.name))
}

/// Builds one pool per origin (nothing is opened until `Pool::start`).
pub fn build_pools(edge: &EdgeConfig) -> anyhow::Result<Vec<Pool>> {
    edge.origins
        .iter()
        .enumerate()
        .map(|(i, o)| new_pool(edge, i, o))
        .collect()
}

impl EdgeServer {
    /// Opens the warm pools, waits (up to the connect timeout) until they are warm, then binds
    /// admin and listeners. Returns once everything accepts.
    pub async fn start(cfg: &Config) -> anyhow::Result<EdgeServer> {
        let edge_cfg = cfg.edge.as_ref().with_context(|| {
            format!(
                "{}: no edge sections ([[listeners]] ...) to serve",
                cfg.path.display()
            )
        })?;
        let pools = build_pools(edge_cfg)?;
        for p in &pools {
            p.start();
        }
        let warm_wait = edge_cfg
            .origins
            .iter()
            .map(|o| crate::pool::warm_open_limit(o.connect_timeout))
            .max()
            .unwrap_or(Duration::from_secs(3));
        let warmed =
            futures_util::future::join_all(pools.iter().map(|p| p.wait_warm(warm_wait))).await;
        for (p, ok) in pools.iter().zip(warmed) {
            if !ok {
                tracing::warn!(origin = %p.origin().name, "pool not warm at start-up; serving anyway, refill continues");
            }
        }
        let counters = Arc::new(EdgeCounters::default());
        let access_log = match &edge_cfg.pop.access_log {
            Some(t) => Some(
                AccessLog::start(t, counters.access_log_dropped.clone())
                    .context("opening the access log")?,
            ),
            None => None,
        };
        let runtime = Arc::new(ArcSwap::from_pointee(Runtime::new(
            &edge_cfg.pop,
            edge_cfg,
            pools,
            counters.clone(),
            access_log,
            None,
        )));
        let resumption =
            crate::tls::sni::Resumption::new().context("making the session ticket key")?;
        let tls = Arc::new(ArcSwap::from_pointee(
            crate::tls::sni::server_config(&edge_cfg.certificates, &edge_cfg.pop, &resumption)
                .context("building the TLS server config")?,
        ));
        let status = EdgeStatus {
            runtime: runtime.clone(),
            draining: Arc::new(AtomicBool::new(false)),
            counters,
        };
        let shutdown = CancellationToken::new();
        let admin_stop = CancellationToken::new();
        let tracker = TaskTracker::new();
        let admin_addr = match &cfg.admin {
            Some(a) => Some(
                admin::start(
                    a.listen,
                    status.clone(),
                    Some(tls.clone()),
                    admin_stop.clone(),
                )
                .await?,
            ),
            None => None,
        };
        let mut listen_addrs = Vec::new();
        let mut listeners = Vec::new();
        for l in &edge_cfg.listeners {
            let (mut bound, quic) = bind_listener(l, &tls.load_full())?;
            let addr = bound.local_addr()?;
            listen_addrs.push(addr);
            listeners.push(bound.settings());
            if let Some(quic) = quic {
                bound.advertise_h3(addr.port());
                tokio::spawn(quic.run(
                    tls.clone(),
                    runtime.clone(),
                    shutdown.clone(),
                    tracker.clone(),
                ));
            }
            tokio::spawn(bound.run(
                tls.clone(),
                runtime.clone(),
                shutdown.clone(),
                tracker.clone(),
            ));
        }
        tokio::spawn(forget_idle_clients(runtime.clone(), shutdown.clone()));
        Ok(EdgeServer {
            listen_addrs,
            admin_addr,
            status,
            tls,
            resumption,
            shutdown,
            admin_stop,
            admin_listen: cfg.admin.as_ref().map(|a| a.listen),
            listeners,
            replaced: std::sync::Mutex::new(Vec::new()),
            tracker,
        })
    }

    pub fn status(&self) -> &EdgeStatus {
        &self.status
    }

    /// Clients the routes' rate limiters remember now (all routes).
    pub fn rate_limited_clients(&self) -> usize {
        let rt = self.status.runtime.load();
        rt.router.rate_limiters().map(|l| l.clients()).sum()
    }

    pub fn pools(&self) -> Vec<Pool> {
        self.status.runtime.load().pools.clone()
    }

    /// Applies a new configuration: certificates and routes swap atomically; origins whose
    /// settings did not change keep their warm pools; listener timeouts apply to new
    /// connections. Listener and admin addresses and `max_connections` are not rebound (a
    /// restart is needed; a warning says so). On error, the running state is untouched.
    pub async fn reload(&self, cfg: &Config) -> anyhow::Result<()> {
        let edge_cfg = cfg
            .edge
            .as_ref()
            .context("reloaded config has no edge sections")?;
        let pop = &edge_cfg.pop;
        let tls = crate::tls::sni::server_config(&edge_cfg.certificates, pop, &self.resumption)?;
        let old = self.status.runtime.load_full();
        // SIGHUP reopens the access log (log rotation) or switches it to a new target, once
        // the rest of the reload has succeeded.
        let access_log = match (&old.access_log, &pop.access_log) {
            (Some(log), Some(_)) => Some(log.clone()),
            (None, Some(t)) => Some(
                AccessLog::start(t, old.counters.access_log_dropped.clone())
                    .context("opening the access log")?,
            ),
            (_, None) => None,
        };
        let mut pools = Vec::with_capacity(edge_cfg.origins.len());
        let mut fresh = Vec::new();
        for (i, o) in edge_cfg.origins.iter().enumerate() {
            let floor = floor_of(edge_cfg, i, o);
            let kept = old
                .pools
                .iter()
                .find(|p| **p.origin() == **o && p.floor() == floor);
            let pool = match kept {
                Some(p) => p.clone(),
                None => {
                    let p = new_pool(edge_cfg, i, o)?;
                    fresh.push(p.clone());
                    p
                }
            };
            pools.push(pool);
        }
        for p in &fresh {
            p.start();
        }
        futures_util::future::join_all(
            fresh
                .iter()
                .map(|p| p.wait_warm(crate::pool::warm_open_limit(p.origin().connect_timeout))),
        )
        .await;
        let retired: Vec<Pool> = old
            .pools
            .iter()
            .filter(|p| !pools.iter().any(|n| Arc::ptr_eq(n.origin(), p.origin())))
            .cloned()
            .collect();
        let new_rt = Runtime::new(
            pop,
            edge_cfg,
            pools,
            old.counters.clone(),
            access_log,
            Some(&old),
        );
        if let (Some(log), Some(t)) = (&old.access_log, &pop.access_log) {
            log.reopen(t);
        }
        self.tls.store(Arc::new(tls));
        self.status.runtime.store(Arc::new(new_rt));
        self.apply_listener_settings(&edge_cfg.listeners);
        if cfg.admin.as_ref().map(|a| a.listen) != self.admin_listen {
            tracing::warn!("[admin] listen changed: a restart is needed to rebind it");
        }
        let holders = {
            let mut replaced = self.replaced.lock().unwrap_or_else(|p| p.into_inner());
            replaced.retain(|w| w.strong_count() > 0);
            replaced.push(Arc::downgrade(&old));
            replaced.clone()
        };
        if !retired.is_empty() {
            tokio::spawn(retire(holders, retired));
        }
        Ok(())
    }

    /// Timeouts of a listener whose address did not change apply to its next connections;
    /// anything that needs a rebind (an address added or removed, `max_connections`) is
    /// reported and waits for a restart.
    fn apply_listener_settings(&self, new: &[config::ListenerConfig]) {
        for (i, running) in self.listeners.iter().enumerate() {
            let old = running.load_full();
            // Addresses are unique, except port 0 (each bind picks a port): those go by position.
            let same = |(j, l): &(usize, &config::ListenerConfig)| {
                l.address == old.address && (old.address.port() != 0 || *j == i)
            };
            match new.iter().enumerate().find(same).map(|(_, l)| l) {
                Some(l) => {
                    if l.max_connections != old.max_connections {
                        tracing::warn!(address = %l.address, running = old.max_connections, configured = l.max_connections,
                            "max_connections changed: a restart is needed to apply it");
                    }
                    if l.http3 != old.http3 {
                        tracing::warn!(address = %l.address, running = old.http3, configured = l.http3,
                            "http3 changed: a restart is needed to apply it");
                    }
                    if l.redirect_to_https.is_some() != old.redirect_to_https.is_some() {
                        tracing::warn!(address = %l.address,
                            "redirect_to_https changed between TLS and plain HTTP: a restart is needed to apply it");
                    }
                    let redirect_to_https = match old.redirect_to_https {
                        Some(_) => l.redirect_to_https.or(old.redirect_to_https),
                        None => None,
                    };
                    running.store(Arc::new(config::ListenerConfig {
                        max_connections: old.max_connections,
                        http3: old.http3,
                        redirect_to_https,
                        ..l.clone()
                    }));
                }
                None => tracing::warn!(address = %old.address,
                    "listener removed from the config: still listening until a restart"),
            }
        }
        for l in new {
            if !self.listeners.iter().any(|r| r.load().address == l.address) {
                tracing::warn!(address = %l.address, "new listener: a restart is needed to bind it");
            }
        }
    }

    /// Stops accepting, lets in-flight requests finish (up to the drain timeout), closes pools.
    pub async fn drain(self) {
        self.status.draining.store(true, Ordering::Release);
        self.shutdown.cancel();
        self.tracker.close();
        // The listeners' current settings: a reload may have changed drain_timeout.
        let drain_timeout = self
            .listeners
            .iter()
            .map(|l| l.load().drain_timeout)
            .max()
            .unwrap_or(Duration::ZERO);
        if tokio::time::timeout(drain_timeout, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(after = ?drain_timeout, "drain timeout: closing remaining connections");
        }
        let rt = self.status.runtime.load_full();
        for p in rt.pools.iter() {
            p.shutdown();
        }
        if let Some(log) = &rt.access_log {
            log.close(Duration::from_secs(2)).await;
        }
        self.admin_stop.cancel();
    }
}

/// Longest a pool dropped by a reload stays open for requests that started before it.
const RETIRE_GRACE: Duration = Duration::from_secs(60);

/// Shuts the pools a reload dropped once no request can still use them. Every request holds
/// the runtime it started with (and may check out, queue or retry on its pools until it has
/// its response head), so every replaced runtime going away is that moment (any of them may
/// hold the pools); a request stuck longer than [`RETIRE_GRACE`] loses its pool.
async fn retire(holders: Vec<std::sync::Weak<Runtime>>, pools: Vec<Pool>) {
    let deadline = tokio::time::Instant::now() + RETIRE_GRACE;
    while holders.iter().any(|w| w.strong_count() > 0) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for p in pools {
        p.shutdown();
    }
}

/// `edgepop serve`: runs until SIGTERM/SIGINT, reloading on SIGHUP. Only the edge sections
/// are validated (and their files read): `[dns]` belongs to `edgepop dns`.
pub async fn serve(path: &Path) -> anyhow::Result<ExitCode> {
    use tokio::signal::unix::{signal, SignalKind};
    let cfg = config::load_role(path, Role::Edge)?;
    // Handlers first: a SIGHUP right after the "listening" line must reload, not kill.
    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let server = EdgeServer::start(&cfg).await?;
    let name = cfg.edge.as_ref().map_or("", |e| e.pop.name.as_str());
    let listeners = cfg.edge.as_ref().map_or(&[][..], |e| &e.listeners[..]);
    for (i, a) in server.listen_addrs.iter().enumerate() {
        let plain = listeners
            .get(i)
            .is_some_and(|l| l.redirect_to_https.is_some());
        let scheme = if plain { "http" } else { "https" };
        println!("edgepop {name}: listening on {scheme}://{a}");
    }
    if let Some(a) = server.admin_addr {
        println!("edgepop {name}: admin on http://{a}");
    }
    loop {
        tokio::select! {
            _ = hup.recv() => match config::load_role(path, Role::Edge) {
                Ok(new) => match server.reload(&new).await {
                    Ok(()) => tracing::info!(config = %path.display(), "reloaded"),
                    Err(e) => tracing::error!(error = format!("{e:#}"), "reload failed; keeping the running configuration"),
                },
                Err(e) => tracing::error!(error = %e, "reload failed; keeping the running configuration"),
            },
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }
    tracing::info!("draining");
    server.drain().await;
    Ok(ExitCode::SUCCESS)
}

/// How often the rate limiters forget clients whose allowance is full again.
const FORGET_IDLE_EVERY: Duration = Duration::from_secs(10);

/// Keeps the rate limiters' tables to recent clients, off the request path, until shutdown.
async fn forget_idle_clients(runtime: Arc<ArcSwap<Runtime>>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(FORGET_IDLE_EVERY) => {}
            _ = shutdown.cancelled() => return,
        }
        let limiters: Vec<_> = runtime.load().router.rate_limiters().cloned().collect();
        if limiters.is_empty() {
            continue;
        }
        // A sweep holds each shard's lock in turn: not on the request threads.
        let sweep = tokio::task::spawn_blocking(move || {
            for limiter in limiters {
                limiter.forget_idle();
            }
        });
        let _ = sweep.await;
    }
}

/// Binds a listener and, with `http3`, the same port over UDP. With port 0 the TCP bind picks
/// the port, and UDP may have that one taken already: then both are tried again elsewhere.
fn bind_listener(
    l: &config::ListenerConfig,
    tls: &Arc<rustls::ServerConfig>,
) -> anyhow::Result<(edge::Listener, Option<edge::h3::H3Listener>)> {
    let attempts = if l.http3 && l.address.port() == 0 {
        8
    } else {
        1
    };
    let mut last = None;
    for _ in 0..attempts {
        let bound = edge::bind(l)?;
        if !l.http3 {
            return Ok((bound, None));
        }
        let addr = bound.local_addr()?;
        match edge::h3::bind(addr, bound.settings(), tls, l.address.port() != 0) {
            Ok(quic) => return Ok((bound, Some(quic))),
            Err(e @ edge::h3::H3Error::Bind { .. }) => last = Some(e),
            Err(e) => return Err(e.into()),
        }
    }
    Err(last.map_or_else(|| anyhow::anyhow!("no port for HTTP/3"), Into::into))
}

/// PoPs the region file forces up or down, and the regions left with no PoP to answer.
fn print_forced(r: &crate::config::regions::RegionFile) {
    for p in &r.pops {
        match p.force {
            Force::No => {}
            Force::Up => println!(
                "  pop {} forced up: its health checks are overridden",
                p.name
            ),
            Force::Down => println!("  pop {} forced down: it gets no answers", p.name),
        }
    }
    let classes = r
        .regions
        .iter()
        .map(|g| (g.name.as_str(), &g.pops))
        .chain(std::iter::once(("default", &r.default)));
    for (name, pops) in classes {
        let down = |&i: &usize| r.pops.get(i).is_some_and(|p| p.force == Force::Down);
        if pops.iter().all(down) {
            println!(
                "  warning: every pop of region {name} is forced down: its first still answers (there must be an answer)"
            );
        }
    }
}
