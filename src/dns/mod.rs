//! The authoritative DNS sidecar: `server` (UDP/TCP wire I/O), `query` (one query -> one
//! answer, pure), `geo` (address or ECS -> region, pure), `map` (building the immutable map
//! from the region file), `health` (PoP probes), `stats` and `admin` (observability).
//! [`DnsState`] holds the map in service behind an atomic swap.

pub mod admin;
#[cfg(target_os = "linux")]
mod batch;
#[cfg_attr(not(target_os = "linux"), allow(dead_code))]
mod coalesce;
pub mod cookie;
pub mod geo;
pub mod health;
pub mod map;
#[cfg(target_os = "linux")]
mod pktinfo;
pub mod query;
pub mod records;
pub mod rrl;
pub mod server;
pub mod stats;
#[cfg(target_os = "linux")]
mod uring;

use crate::config::{regions, Config, ConfigError, DnsConfig, Role};
use arc_swap::ArcSwap;
use cookie::CookieSecret;
use health::{HealthBook, Prober};
use map::{HitBook, Map, MapError};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("region file rejected")]
    Regions(#[source] ConfigError),
    #[error("configuration file rejected")]
    Config(#[source] ConfigError),
    #[error("zone file rejected")]
    Records(#[source] ConfigError),
    #[error("cannot build the region map")]
    Map(#[source] MapError),
    #[error("map build task failed")]
    Join(#[source] tokio::task::JoinError),
    #[error(transparent)]
    Server(#[from] server::ServerError),
    /// Says what to do in the common case: `serve` from the same file holds `[admin] listen`.
    #[error(
        "cannot bind admin listener on {addr}: {source} (when `edgepop serve` runs from the same \
         file it holds [admin] listen: set [dns] admin_listen to give the sidecar its own address)"
    )]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// What a rejected load was reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadKind {
    /// The region file, at a regeneration (periodic or SIGHUP).
    Regions,
    /// The configuration file (and the region file it names), at SIGHUP.
    Config,
}

/// The last rejected load of the region file or of the configuration file.
#[derive(Debug, Clone)]
pub struct RegenError {
    pub message: String,
    pub at: SystemTime,
    pub kind: LoadKind,
    /// True until a later load of the same thing succeeds (a regeneration with the running
    /// configuration does not clear a rejected configuration file).
    pub current: bool,
}

/// Shared state of a running sidecar; cheap to clone.
#[derive(Clone)]
pub struct DnsState(Arc<Inner>);

struct Inner {
    /// The `[dns]` settings in service. Only the regeneration task replaces them, together
    /// with the map built from them.
    cfg: ArcSwap<DnsConfig>,
    map: ArcSwap<Map>,
    health: HealthBook,
    hits: HitBook,
    stats: stats::Stats,
    regen_failures: AtomicU64,
    /// `[dns] udp_coalesce` in microseconds, read by the io_uring workers before each wait
    /// (so a reload applies it without a restart).
    udp_coalesce_us: AtomicU32,
    /// Written by the regeneration task, read by /metrics and /map; never by a query.
    last_error: Mutex<Option<RegenError>>,
}

impl DnsState {
    /// Loads the region file and builds the first map; an error here is fatal (there is no
    /// previous map to keep).
    pub async fn new(cfg: DnsConfig) -> Result<Self, DnsError> {
        let health = HealthBook::default();
        let hits = HitBook::default();
        let first = build_map(&cfg, None, &health, &hits)?;
        let udp_coalesce_us = AtomicU32::new(cfg.udp_coalesce_us);
        Ok(DnsState(Arc::new(Inner {
            cfg: ArcSwap::from_pointee(cfg),
            map: ArcSwap::from_pointee(first),
            health,
            hits,
            stats: stats::Stats::default(),
            regen_failures: AtomicU64::new(0),
            udp_coalesce_us,
            last_error: Mutex::new(None),
        })))
    }

    /// The `[dns]` settings in service.
    pub fn config(&self) -> Arc<DnsConfig> {
        self.0.cfg.load_full()
    }

    /// The map in service (a cheap guard for the query path).
    #[inline]
    pub fn map_guard(&self) -> arc_swap::Guard<Arc<Map>> {
        self.0.map.load()
    }

    /// A per-thread handle on the map in service for a long-lived worker: a query checks one
    /// shared counter instead of taking a guard. It holds the previous map until its next
    /// load after a swap.
    pub fn map_cache(&self) -> arc_swap::Cache<&ArcSwap<Map>, Arc<Map>> {
        arc_swap::Cache::new(&self.0.map)
    }

    pub fn map(&self) -> Arc<Map> {
        self.0.map.load_full()
    }

    pub fn stats(&self) -> &stats::Stats {
        &self.0.stats
    }

    /// `[dns] udp_coalesce` in service, in microseconds (0: answer at once).
    #[inline]
    pub fn udp_coalesce_us(&self) -> u32 {
        self.0.udp_coalesce_us.load(Ordering::Relaxed)
    }

    pub fn hits(&self) -> &HitBook {
        &self.0.hits
    }

    /// (rejected loads so far, the last rejection).
    pub fn regen_status(&self) -> (u64, Option<RegenError>) {
        let last = self.0.last_error.lock().ok().and_then(|g| g.clone());
        (self.0.regen_failures.load(Ordering::Relaxed), last)
    }

    /// Healthy while a map is in service and at least one PoP gets answers.
    pub fn healthz(&self) -> bool {
        self.map().pops.iter().any(|p| p.serves())
    }

    /// Re-reads the region file and swaps in a new map; on error the old map stays.
    pub async fn regenerate(&self) -> Result<Arc<Map>, DnsError> {
        let old = self.map();
        let this = self.clone();
        let result = tokio::task::spawn_blocking(move || {
            build_map(&this.config(), Some(&old), &this.0.health, &this.0.hits)
        })
        .await
        .map_err(DnsError::Join)
        .and_then(|r| r);
        match result {
            Ok(m) => {
                let m = Arc::new(m);
                self.0.map.store(m.clone());
                self.loaded(LoadKind::Regions);
                Ok(m)
            }
            Err(e) => {
                self.rejected(LoadKind::Regions, &e);
                Err(e)
            }
        }
    }

    /// Re-reads the configuration file (its `[dns]` and `[admin]` only) and the region file
    /// it names, and swaps in the new settings and map together; on any error both old ones
    /// stay. Addresses cannot change without new sockets: they are kept, with a warning.
    /// `prober` gets the new health settings; `admin` is the admin address asked for at start.
    pub async fn reconfigure(
        &self,
        path: &Path,
        prober: &Prober,
        admin: Option<SocketAddr>,
    ) -> Result<Arc<Map>, DnsError> {
        let old = self.map();
        let running = self.config();
        let this = self.clone();
        let path_owned = path.to_path_buf();
        let result = tokio::task::spawn_blocking(move || {
            let file =
                crate::config::load_role(&path_owned, Role::Dns).map_err(DnsError::Config)?;
            let mut cfg = dns_section(&file, &path_owned).map_err(DnsError::Config)?;
            let kept = restart_only_changes(&running, admin, &cfg, admin_address(&file, &cfg));
            if !kept.is_empty() {
                tracing::warn!(
                    config = %path_owned.display(),
                    "not applied until restart (they need new sockets): {}",
                    kept.join(", ")
                );
            }
            warn_unreachable_nameservers(&cfg);
            cfg.listen = running.listen;
            cfg.udp_workers = running.udp_workers;
            cfg.udp_io = running.udp_io;
            cfg.admin_listen = running.admin_listen;
            let changed = answers_differ(&running, &cfg);
            let m = build_map_changed(&cfg, Some(&old), changed, &this.0.health, &this.0.hits)?;
            Ok((cfg, m))
        })
        .await
        .map_err(DnsError::Join)
        .and_then(|r| r);
        match result {
            Ok((cfg, m)) => {
                let m = Arc::new(m);
                prober.update(&cfg);
                let coalesce = cfg.udp_coalesce_us;
                self.0.udp_coalesce_us.store(coalesce, Ordering::Relaxed);
                let on_recvmmsg = self.0.stats.udp_workers[1].load(Ordering::Relaxed);
                if coalesce > 0 && on_recvmmsg > 0 {
                    tracing::warn!(
                        config = %path.display(),
                        "[dns] udp_coalesce needs io_uring; {on_recvmmsg} DNS UDP worker(s) on recvmmsg answer at once"
                    );
                }
                self.0.cfg.store(Arc::new(cfg));
                self.0.map.store(m.clone());
                self.loaded(LoadKind::Config);
                tracing::info!(
                    config = %path.display(),
                    generation = m.generation,
                    serial = m.serial,
                    "configuration reloaded"
                );
                Ok(m)
            }
            Err(e) => {
                self.rejected(LoadKind::Config, &e);
                Err(e)
            }
        }
    }

    /// A load of `kind` succeeded: the last error is history if it was about the same thing
    /// (a configuration load re-reads the region file too).
    fn loaded(&self, kind: LoadKind) {
        if let Ok(mut g) = self.0.last_error.lock() {
            if let Some(e) = g.as_mut() {
                if e.kind == kind || kind == LoadKind::Config {
                    e.current = false;
                }
            }
        }
    }

    fn rejected(&self, kind: LoadKind, e: &DnsError) {
        self.0.regen_failures.fetch_add(1, Ordering::Relaxed);
        let message = error_chain(e);
        let what = match kind {
            LoadKind::Regions => "region map not rebuilt",
            LoadKind::Config => "configuration not reloaded",
        };
        tracing::error!(
            generation = self.map().generation,
            "{what}, keeping the previous one: {message}"
        );
        if let Ok(mut g) = self.0.last_error.lock() {
            *g = Some(RegenError {
                message,
                at: SystemTime::now(),
                kind,
                current: true,
            });
        }
    }

    /// JSON for `/map`: regions -> PoP chosen now, every PoP's health, the map's identity.
    pub fn map_json(&self) -> serde_json::Value {
        let m = self.map();
        let pops: Vec<_> = m
            .pops
            .iter()
            .map(|p| {
                let pass = p.health.is_up();
                let (up, force) = match p.force {
                    regions::Force::No => (pass, None),
                    regions::Force::Up => (true, Some("up")),
                    regions::Force::Down => (false, Some("down")),
                };
                serde_json::json!({
                    "name": p.name,
                    "up": up,
                    "checks_pass": pass,
                    "force": force,
                    "health_url": p.health.url.as_ref().map(|u| u.to_string()),
                    "probes": p.health.probes.load(Ordering::Relaxed),
                    "failures": p.health.failures.load(Ordering::Relaxed),
                    "last_error": p.health.last_error(),
                })
            })
            .collect();
        let mut regions: Vec<serde_json::Value> = Vec::new();
        let chosen = |class: geo::ClassId| {
            let (pos, c) = m.choose(class);
            m.pops[usize::from(c.pops[pos])].name.clone()
        };
        let names = |list: &[usize]| -> Vec<String> {
            list.iter()
                .filter_map(|&i| m.source.pops.get(i).map(|p| p.name.clone()))
                .collect()
        };
        regions.push(serde_json::json!({
            "name": "default",
            "pops": names(&m.source.default),
            "chosen": chosen(geo::DEFAULT_CLASS),
        }));
        for r in &m.source.regions {
            let class = m
                .classes
                .iter()
                .position(|c| c.label.split('+').any(|l| l == r.name))
                .unwrap_or(0) as geo::ClassId;
            regions.push(serde_json::json!({
                "name": r.name,
                "networks": r.networks.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
                "pops": names(&r.pops),
                "chosen": chosen(class),
            }));
        }
        let (failures, last) = self.regen_status();
        serde_json::json!({
            "generation": m.generation,
            "serial": m.serial,
            "age_seconds": SystemTime::now().duration_since(m.built_at).unwrap_or_default().as_secs_f64(),
            "blocks": m.geo.block_count(),
            "regions": regions,
            "pops": pops,
            "static_records": {
                "file": self.config().zone_file.as_ref().map(|p| p.display().to_string()),
                "names": m.zone.statics.len(),
                "records": m.zone.statics.iter().map(|n| n.record_count()).sum::<usize>(),
            },
            "rate_limit": m.rate_limit.as_deref().map(|l| {
                let l = l.limit();
                serde_json::json!({
                    "responses": l.responses,
                    "per_seconds": l.per.as_secs_f64(),
                    "burst": l.burst,
                    "nodata": l.nodata,
                    "nxdomains": l.nxdomains,
                    "errors": l.errors,
                    "slip": l.slip,
                    "ipv4_prefix": l.ipv4_prefix,
                    "ipv6_prefix": l.ipv6_prefix,
                    "exempt": l.exempt.iter().map(ToString::to_string).collect::<Vec<_>>(),
                })
            }),
            "errors": failures,
            "last_error": last.map(|e| serde_json::json!({
                "message": e.message,
                "current": e.current,
                "file": match e.kind { LoadKind::Regions => "regions", LoadKind::Config => "config" },
            })),
        })
    }
}

fn warn_unreachable_nameservers(cfg: &DnsConfig) {
    for n in cfg.unreachable_nameservers() {
        tracing::warn!(nameserver = n, zone = %cfg.zone, "in-zone nameserver without [dns] glue addresses: resolvers cannot reach it");
    }
}

/// The `[dns]` section of a file loaded for the DNS role.
fn dns_section(file: &Config, path: &Path) -> Result<DnsConfig, ConfigError> {
    file.dns.clone().ok_or_else(|| {
        ConfigError::invalid(
            crate::config::Location::file(path),
            "no [dns] section: nothing for `edgepop dns` to run",
        )
    })
}

/// The sidecar's admin address: `[dns] admin_listen`, else `[admin] listen`.
fn admin_address(file: &Config, dns: &DnsConfig) -> Option<SocketAddr> {
    dns.admin_listen.or(file.admin.as_ref().map(|a| a.listen))
}

/// Settings of `new` that differ from the running ones but need new sockets, as
/// "[dns] listen 127.0.0.1:53 -> 127.0.0.1:5353"; `*_admin`: the admin addresses.
fn restart_only_changes(
    running: &DnsConfig,
    running_admin: Option<SocketAddr>,
    new: &DnsConfig,
    new_admin: Option<SocketAddr>,
) -> Vec<String> {
    let mut out = Vec::new();
    if new.listen != running.listen {
        out.push(format!("[dns] listen {} -> {}", running.listen, new.listen));
    }
    if new.udp_workers != running.udp_workers {
        out.push(format!(
            "[dns] udp_workers {} -> {}",
            running.udp_workers, new.udp_workers
        ));
    }
    if new.udp_io != running.udp_io {
        out.push(format!(
            "[dns] udp_io {} -> {}",
            running.udp_io.as_str(),
            new.udp_io.as_str()
        ));
    }
    if new_admin != running_admin {
        let show = |a: Option<SocketAddr>| a.map_or("none".to_string(), |a| a.to_string());
        out.push(format!(
            "admin address ([dns] admin_listen, else [admin] listen) {} -> {}",
            show(running_admin),
            show(new_admin)
        ));
    }
    out
}

/// Whether the answers built from the two settings differ for the same region file (then the
/// SOA serial must move). Every `[dns]` key that reaches `map::build` and changes the zone's
/// data belongs here (`nsid` and `cookie_keys` reach it but change no record).
fn answers_differ(a: &DnsConfig, b: &DnsConfig) -> bool {
    a.ttl != b.ttl
        || a.zone != b.zone
        || a.names != b.names
        || a.nameservers != b.nameservers
        || a.glue != b.glue
        || a.hostmaster != b.hostmaster
}

fn build_map(
    cfg: &DnsConfig,
    old: Option<&Map>,
    health: &HealthBook,
    hits: &HitBook,
) -> Result<Map, DnsError> {
    build_map_changed(cfg, old, false, health, hits)
}

/// `cfg_changed`: the settings differ from those `old` was built with in a way the answers
/// show ([`answers_differ`]).
fn build_map_changed(
    cfg: &DnsConfig,
    old: Option<&Map>,
    cfg_changed: bool,
    health: &HealthBook,
    hits: &HitBook,
) -> Result<Map, DnsError> {
    let file = regions::load(&cfg.regions).map_err(DnsError::Regions)?;
    let statics = match &cfg.zone_file {
        Some(path) => records::load(path, cfg).map_err(DnsError::Records)?,
        None => Vec::new(),
    };
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(1, |d| u32::try_from(d.as_secs()).unwrap_or(u32::MAX));
    // The serial moves only when the content does, and never backwards.
    let serial = match old {
        Some(o) if o.source == file && o.zone.statics == statics && !cfg_changed => o.serial,
        Some(o) => now.max(o.serial.wrapping_add(1)),
        None => now,
    };
    let cx = map::BuildContext {
        cfg,
        health,
        hits,
        generation: old.map_or(1, |o| o.generation + 1),
        serial,
        // A limiter's allowances survive rebuilds (a regeneration must not hand a flood a
        // fresh burst) unless its settings change.
        rate_limit: cfg
            .rate_limit
            .as_ref()
            .map(|l| match old.and_then(|o| o.rate_limit.clone()) {
                Some(kept) if kept.limit() == l => kept,
                _ => Arc::new(rrl::RateLimiter::new(l.clone())),
            }),
        cookie_secret: match &cfg.cookie_keys {
            Some(k) => k.secret.clone(),
            None => old.map_or_else(CookieSecret::random, |o| o.cookie_secret.clone()),
        },
    };
    map::build(file, statics, &cx).map_err(DnsError::Map)
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// A running sidecar: sockets bound, map loaded, probes and regeneration running. Dropping
/// it stops everything.
pub struct Sidecar {
    state: DnsState,
    dns_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    reload: Arc<Reload>,
    cancel: CancellationToken,
    _udp: server::UdpWorkers,
}

/// Requests to the regeneration task, which alone replaces the map and the settings.
#[derive(Default)]
struct Reload {
    wake: tokio::sync::Notify,
    /// A configuration file to re-read at the next wake-up (SIGHUP). Several requests before
    /// the task gets to them are one: the file is read as it is then.
    config: Mutex<Option<PathBuf>>,
}

impl Sidecar {
    /// How the UDP workers do their I/O: "io_uring", "recvmmsg", or both with counts when
    /// some fell back.
    pub fn udp_io(&self) -> String {
        let [uring, mmsg] = self
            .state
            .stats()
            .udp_workers
            .each_ref()
            .map(|n| n.load(Ordering::Relaxed));
        match (uring, mmsg) {
            (_, 0) => "io_uring".to_string(),
            (0, _) => "recvmmsg".to_string(),
            (u, m) => format!("io_uring x{u}, recvmmsg x{m}"),
        }
    }

    /// Starts on `cfg.listen` (port 0 picks one, the same for UDP and TCP) and, if given, an
    /// admin listener.
    pub async fn start(cfg: DnsConfig, admin: Option<SocketAddr>) -> Result<Self, DnsError> {
        warn_unreachable_nameservers(&cfg);
        let prober = Prober::new(&cfg);
        let state = DnsState::new(cfg.clone()).await?;
        let cancel = CancellationToken::new();
        // Whatever fails below (the admin bind, say) stops the tasks already started.
        let guard = cancel.clone().drop_guard();
        let (udp, tcp) = server::bind(cfg.listen, cfg.udp_workers)?;
        let dns_addr = tcp
            .local_addr()
            .map_err(|source| server::ServerError::Bind {
                proto: "TCP",
                addr: cfg.listen,
                source,
            })?;
        release_free_memory();
        let udp = server::UdpWorkers::start(udp, state.clone(), cfg.udp_io)?;
        tokio::spawn(server::tcp_accept(tcp, state.clone(), cancel.clone()));
        for h in state.0.health.reconcile(&current_health(&state.map())) {
            prober.spawn(h);
        }
        let reload = Arc::new(Reload::default());
        tokio::spawn(regenerate_loop(
            state.clone(),
            prober,
            reload.clone(),
            admin,
            cancel.clone(),
        ));
        let admin_addr = match admin {
            Some(addr) => Some(admin::start(addr, state.clone(), cancel.clone()).await?),
            None => None,
        };
        guard.disarm();
        Ok(Sidecar {
            state,
            dns_addr,
            admin_addr,
            reload,
            cancel,
            _udp: udp,
        })
    }

    pub fn dns_addr(&self) -> SocketAddr {
        self.dns_addr
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn state(&self) -> &DnsState {
        &self.state
    }

    /// Asks for a regeneration (region file re-read) now.
    pub fn reload(&self) {
        self.reload.wake.notify_one();
    }

    /// Asks for `path` to be re-read and applied (what SIGHUP does): its `[dns]` settings
    /// that need no new socket, and the region file; see [`DnsState::reconfigure`].
    pub fn reload_config(&self, path: &Path) {
        if let Ok(mut g) = self.reload.config.lock() {
            *g = Some(path.to_path_buf());
        }
        self.reload.wake.notify_one();
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_free_memory() {
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_free_memory() {}

fn current_health(m: &Map) -> Vec<Arc<health::Health>> {
    m.pops.iter().map(|p| p.health.clone()).collect()
}

/// The one writer of the map and the settings: every `regenerate_every`, and on request.
async fn regenerate_loop(
    state: DnsState,
    prober: Prober,
    reload: Arc<Reload>,
    admin: Option<SocketAddr>,
    cancel: CancellationToken,
) {
    loop {
        // Read each time round: a reload may have changed it.
        let every = state.config().regenerate_every;
        tokio::select! {
            _ = cancel.cancelled() => {
                // Retire every probe task with the sidecar.
                state.0.health.reconcile(&[]);
                return;
            }
            _ = tokio::time::sleep(every) => {}
            _ = reload.wake.notified() => {}
        }
        let config = reload.config.lock().ok().and_then(|mut g| g.take());
        let result = match config {
            Some(path) => {
                tracing::info!(config = %path.display(), "reloading the configuration on request");
                state.reconfigure(&path, &prober, admin).await
            }
            None => state.regenerate().await,
        };
        if let Ok(m) = result {
            for h in state.0.health.reconcile(&current_health(&m)) {
                prober.spawn(h);
            }
        }
        // Parsing the region file and building a map leave megabytes of freed memory that
        // the allocator would otherwise keep; hand it back so RSS reflects the live map.
        let _ = tokio::task::spawn_blocking(release_free_memory).await;
    }
}

/// `edgepop dns`: runs until SIGTERM or SIGINT; SIGHUP re-reads the configuration file and
/// the region file at once. Only `[dns]` and `[admin]` are validated: the edge's sections
/// (and the certificate files they name) belong to `edgepop serve`.
pub async fn run(config: &Path) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let cfg = crate::config::load_role(config, Role::Dns)?;
    let dns = dns_section(&cfg, config)?;
    let admin = admin_address(&cfg, &dns);
    // Handlers first: a SIGHUP right after the "listening" line must reload, not kill.
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).context("SIGHUP handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let sidecar = Sidecar::start(dns, admin).await.context("dns sidecar")?;
    let m = sidecar.state().map();
    tracing::info!(
        addr = %sidecar.dns_addr(),
        admin = ?sidecar.admin_addr(),
        udp_io = %sidecar.udp_io(),
        generation = m.generation,
        serial = m.serial,
        "dns listening on {} (udp+tcp)",
        sidecar.dns_addr()
    );
    loop {
        tokio::select! {
            _ = hup.recv() => sidecar.reload_config(config),
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        }
    }
    tracing::info!("dns sidecar stopping");
    drop(sidecar);
    // Let in-flight TCP answers finish writing.
    tokio::time::sleep(Duration::from_millis(50)).await;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `[dns]` section on `listen` for `names`, with `extra` keys.
    fn dns(listen: &str, names: &str, extra: &str) -> DnsConfig {
        let text = format!(
            "[dns]\nlisten = \"{listen}\"\nzone = \"example.com\"\nnames = [{names}]\nregions = \"r.toml\"\n{extra}\n"
        );
        crate::config::parse_role(Path::new("t.toml"), &text, Role::Dns)
            .map(|c| c.dns)
            .expect("valid")
            .expect("[dns]")
    }

    #[test]
    fn a_reload_names_what_needs_a_restart_and_knows_when_answers_change() {
        let (addr, www) = ("127.0.0.1:53", "\"www.example.com\"");
        let running = dns(addr, www, "udp_workers = 2");
        let admin: SocketAddr = "127.0.0.1:9953".parse().expect("address");
        assert!(restart_only_changes(&running, Some(admin), &running, Some(admin)).is_empty());
        let new = dns("127.0.0.1:5353", www, "udp_workers = 3\nttl = \"5s\"");
        assert_eq!(
            restart_only_changes(&running, Some(admin), &new, None),
            vec![
                "[dns] listen 127.0.0.1:53 -> 127.0.0.1:5353".to_string(),
                "[dns] udp_workers 2 -> 3".to_string(),
                "admin address ([dns] admin_listen, else [admin] listen) 127.0.0.1:9953 -> none"
                    .to_string(),
            ]
        );
        assert!(answers_differ(&running, &new), "ttl is in every answer");
        let probes_only = dns(
            addr,
            www,
            "health_interval = \"5s\"\nregenerate_every = \"1m\"",
        );
        assert!(!answers_differ(&running, &probes_only));
        let more_names = dns(addr, &format!("{www}, \"api.example.com\""), "");
        assert!(answers_differ(&running, &more_names));
    }
}
