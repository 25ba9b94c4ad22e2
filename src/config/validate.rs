//! One pass from the raw file to the typed configuration. Everything that can be checked
//! before start-up is checked here, and each failure points at the offending key.

use super::error::{ConfigError, Location};
use super::raw::*;
use crate::tls::certs;
use rustls::sign::CertifiedKey;
use rustls_pki_types::ServerName;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use toml::Spanned;

/// The two things a file can configure. A file may hold either role or both; each command
/// validates only its role's sections (DESIGN.md: "each ignores the other's sections").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// `serve`: `[pop]`, `[[listeners]]`, `[[certificates]]`, `[[origins]]`, `[[routes]]`.
    Edge,
    /// `dns`: `[dns]` and the region file it names.
    Dns,
}

/// A validated configuration: `[admin]` if present, and each role that was validated (a
/// role-scoped load leaves the other `None` even when the file has its sections).
#[derive(Debug, Clone)]
pub struct Config {
    pub path: PathBuf,
    pub admin: Option<AdminConfig>,
    pub edge: Option<EdgeConfig>,
    pub dns: Option<DnsConfig>,
}

#[derive(Debug, Clone)]
pub struct PopConfig {
    pub name: String,
    pub server_timing: bool,
    /// Shared session-ticket keys; `None`: each process makes its own.
    pub ticket_keys: Option<Arc<crate::tls::tickets::FileTicketer>>,
    /// Accept TLS 1.3 0-RTT early data from resuming clients (then no `ticket_keys`).
    pub early_data: bool,
    /// Where the access log goes; `None`: no access log.
    pub access_log: Option<AccessLogTarget>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AccessLogTarget {
    Stdout,
    File(PathBuf),
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
}

/// Everything `serve` needs; present only when the edge role was validated.
#[derive(Debug, Clone)]
pub struct EdgeConfig {
    pub pop: PopConfig,
    pub listeners: Vec<ListenerConfig>,
    pub certificates: Vec<CertificateConfig>,
    pub origins: Vec<Arc<OriginConfig>>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    pub handshake_timeout: Duration,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Longest pause while a client sends a request body (then 408).
    pub body_timeout: Duration,
    /// Longest a client may leave the connection unwritable (then it is closed).
    pub send_timeout: Duration,
    pub drain_timeout: Duration,
    /// Client connections open at once (TLS handshakes included); at the limit the listener
    /// stops accepting and new connections wait in the kernel's backlog.
    pub max_connections: usize,
    /// Also HTTP/3 on the same port (UDP), advertised to TCP clients with `Alt-Svc`.
    pub http3: bool,
    /// TCP connections start with a PROXY protocol header whose source address is the client's.
    pub proxy_protocol: bool,
    /// TCP connections one client (IPv4 address, IPv6 /64) may hold open; `None`: no limit
    /// but `max_connections`.
    pub max_connections_per_client: Option<usize>,
    /// `Some(port)`: a plain-HTTP listener that redirects requests to HTTPS on `port` (ACME
    /// HTTP-01 challenges are forwarded instead); `None`: TLS.
    pub redirect_to_https: Option<u16>,
}

#[derive(Clone)]
pub struct CertificateConfig {
    /// Lower-case names; `*.example.com` matches exactly one label.
    pub names: Vec<String>,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub key: Arc<CertifiedKey>,
}

impl std::fmt::Debug for CertificateConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateConfig")
            .field("names", &self.names)
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    H2,
    Http1,
}

impl Protocol {
    pub fn alpn(self) -> &'static [u8] {
        match self {
            Protocol::H2 => b"h2",
            Protocol::Http1 => b"http/1.1",
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::H2 => "h2",
            Protocol::Http1 => "http1",
        }
    }
}

/// `[[origins]] client_cert` and `client_key`, read once (so the pair checked is the pair
/// used) and checked to belong together.
#[derive(Clone)]
pub struct ClientAuth {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub chain: Vec<rustls_pki_types::CertificateDer<'static>>,
    pub key_der: Arc<rustls_pki_types::PrivateKeyDer<'static>>,
    /// SHA-256 of both files: a reload with changed files is a changed origin.
    pub digest: [u8; 32],
}

impl PartialEq for ClientAuth {
    fn eq(&self, other: &Self) -> bool {
        (&self.cert, &self.key, self.digest) == (&other.cert, &other.key, other.digest)
    }
}

impl std::fmt::Debug for ClientAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientAuth")
            .field("cert", &self.cert)
            .field("key", &self.key)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct OriginConfig {
    pub name: String,
    /// `host:port`, resolved at every connect so DNS changes are followed.
    pub address: String,
    pub server_name: ServerName<'static>,
    pub ca: Option<PathBuf>,
    /// SHA-256 of the CA file's bytes: a reload with a changed CA is a changed origin, so its
    /// pool is rebuilt with the new trust store.
    pub ca_digest: Option<[u8; 32]>,
    /// The certificate the edge presents when the origin asks (mutual TLS).
    pub client_auth: Option<ClientAuth>,
    pub protocol: Protocol,
    /// Connections kept open at all times when this origin is a route's first choice.
    pub warm_connections: usize,
    /// Floor when the origin is only a failover target of every route using it.
    pub standby_connections: usize,
    pub max_connections: usize,
    /// Requests that may wait for capacity beyond `max_connections`.
    pub queue_size: usize,
    pub connect_timeout: Duration,
    pub first_byte_timeout: Duration,
    pub idle_timeout: Duration,
    pub queue_timeout: Duration,
    /// An upgraded connection (WebSocket) with no bytes either way for this long is closed.
    pub tunnel_idle_timeout: Duration,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
    pub max_connection_age: Duration,
    /// `origin_idle_timeout`: the origin's keep-alive timeout as the operator states it;
    /// `None`: learned (`pool::idle`).
    pub origin_idle_timeout: Option<Duration>,
    pub health_path: Option<String>,
    pub health_interval: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    /// Open connections kept per recent peak of concurrent requests.
    pub warm_ratio: f64,
    /// `false`: a new connection per request, closed after it (no reuse, no warm floor).
    pub pooling: bool,
}

#[derive(Debug, Clone)]
pub struct RouteConfig {
    /// Lower-case host names without port; `*.example.com` matches one label.
    pub hosts: Vec<String>,
    /// Indices into [`EdgeConfig::origins`], in failover order; never empty.
    pub origins: Vec<usize>,
    /// Largest request body accepted, in bytes (413 above it); none: no limit.
    pub max_body_size: Option<u64>,
    /// Requests one client may make (429 beyond); none: no limit.
    pub rate_limit: Option<RateLimit>,
    /// `Strict-Transport-Security` added to HTTPS answers that have none.
    pub hsts: Option<http::HeaderValue>,
    /// Fields removed, then set, on requests to the origin.
    pub request_headers: HeaderEdits,
    /// Fields removed, then set, on the origin's answers.
    pub response_headers: HeaderEdits,
}

/// Header fields a route removes and sets (replacing any there) on one direction of its
/// traffic. Never framing, hop-by-hop or (on requests) the fields the edge sets itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub remove: Vec<http::HeaderName>,
    pub set: Vec<(http::HeaderName, http::HeaderValue)>,
}

impl HeaderEdits {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty()
    }
}

/// `[[routes]] rate_limit`: `requests` per `per` for each client, with bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// At least 1.
    pub requests: u32,
    /// At least a millisecond per request.
    pub per: Duration,
    /// At least 1.
    pub burst: u32,
    /// Clients remembered at once (beyond that, newcomers are served uncounted).
    pub max_clients: usize,
}

/// `[dns] rate_limit`: response rate limiting for UDP answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsRateLimit {
    /// At least 1.
    pub responses: u32,
    /// At least a millisecond per response.
    pub per: Duration,
    /// At least 1.
    pub burst: u32,
    /// NODATA answers per `per`, per name (BIND's `nodata-per-second`); 0: not limited.
    pub nodata: u32,
    /// NXDOMAIN answers per `per`, for the zone (`nxdomains-per-second`); 0: not limited.
    pub nxdomains: u32,
    /// Error answers per `per` (`errors-per-second`); 0: not limited.
    pub errors: u32,
    /// Every `slip`-th answer over the limit goes out truncated; 0: none (all dropped).
    pub slip: u32,
    /// Client networks: IPv4 prefix length (8 to 32).
    pub ipv4_prefix: u8,
    /// IPv6 prefix length (16 to 128).
    pub ipv6_prefix: u8,
    /// Client networks never limited (BIND's `exempt-clients`, Knot's `whitelist`).
    pub exempt: Vec<ipnet::IpNet>,
}

/// Longest `[dns] udp_coalesce`: a wait past this adds latency a resolver would notice, for
/// little more saving (`benches/dns/README.md`).
pub const MAX_UDP_COALESCE: Duration = Duration::from_millis(1);

/// `[dns] udp_io`.
fn parse_udp_io(cx: &Ctx, d: &RawDns) -> Result<UdpIo, ConfigError> {
    Ok(match d.udp_io.as_ref().map(|v| (v, v.get_ref().as_str())) {
        None | Some((_, "auto")) => UdpIo::Auto,
        Some((v, "io_uring")) if !cfg!(target_os = "linux") => {
            return Err(cx.err(v, "udp_io = \"io_uring\" needs Linux"));
        }
        Some((_, "io_uring")) => UdpIo::IoUring,
        Some((_, "recvmmsg")) => UdpIo::Recvmmsg,
        Some((v, other)) => {
            return Err(cx.err(
                v,
                format!("udp_io must be \"auto\", \"io_uring\" or \"recvmmsg\", not {other:?}"),
            ));
        }
    })
}

/// `[dns] udp_coalesce` in whole microseconds (what the kernel takes); only io_uring can
/// wait for a batch with a bounded delay.
fn udp_coalesce_us(cx: &Ctx, d: &RawDns, io: UdpIo) -> Result<u32, ConfigError> {
    let (Some(wait), Some(s)) = (cx.raw_duration(&d.udp_coalesce)?, &d.udp_coalesce) else {
        return Ok(0);
    };
    if wait > MAX_UDP_COALESCE {
        return Err(cx.err(s, "udp_coalesce must be at most 1ms"));
    }
    if wait.subsec_nanos() % 1000 != 0 {
        return Err(cx.err(s, "udp_coalesce must be whole microseconds"));
    }
    // At most 1 ms: always fits.
    let us = u32::try_from(wait.as_micros()).unwrap_or(u32::MAX);
    if us == 0 {
        return Ok(0);
    }
    if !cfg!(target_os = "linux") {
        return Err(cx.err(s, "udp_coalesce needs Linux (io_uring)"));
    }
    if io == UdpIo::Recvmmsg {
        return Err(cx.err(
            s,
            "udp_coalesce needs io_uring; udp_io = \"recvmmsg\" answers every wake-up at once",
        ));
    }
    Ok(us)
}

/// `[dns] udp_io`: how the UDP workers receive queries and send answers (Linux).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UdpIo {
    /// io_uring where the kernel allows it, else `recvmmsg`/`sendmmsg`.
    Auto,
    /// io_uring (multishot receive into a ring of provided buffers); the sidecar does not
    /// start where the kernel refuses it.
    IoUring,
    /// Batched `recvmmsg`/`sendmmsg` system calls.
    Recvmmsg,
}

impl UdpIo {
    /// As written in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            UdpIo::Auto => "auto",
            UdpIo::IoUring => "io_uring",
            UdpIo::Recvmmsg => "recvmmsg",
        }
    }
}

#[derive(Debug, Clone)]
pub struct DnsConfig {
    pub listen: SocketAddr,
    /// Lower-case zone name without the trailing dot.
    pub zone: String,
    /// Lower-case names (inside the zone) answered from the region map.
    pub names: Vec<String>,
    pub ttl: Duration,
    pub regenerate_every: Duration,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    pub unhealthy_after: u32,
    pub healthy_after: u32,
    pub regions: PathBuf,
    /// `[dns] zone_file`: static records, read (like `regions`) at every map build.
    pub zone_file: Option<PathBuf>,
    pub nameservers: Vec<String>,
    /// Addresses of in-zone nameservers: answered for A/AAAA and sent as glue with NS.
    pub glue: Vec<Glue>,
    pub hostmaster: String,
    /// Roots for the HTTPS health checks of PoPs, loaded at validation; `None`: webpki roots.
    pub health_ca: Option<HealthCa>,
    /// UDP worker threads; at least 1.
    pub udp_workers: usize,
    /// `[dns] udp_io`: the UDP workers' system calls.
    pub udp_io: UdpIo,
    /// `[dns] udp_coalesce` in microseconds: at most [`MAX_UDP_COALESCE`]; zero answers at
    /// once.
    pub udp_coalesce_us: u32,
    /// Admin address of `edgepop dns` when it differs from `[admin] listen`.
    pub admin_listen: Option<SocketAddr>,
    /// NSID (RFC 5001): 1 to 128 octets.
    pub nsid: Option<Nsid>,
    /// `[dns] cookie_keys`, loaded; `None`: a random secret per process.
    pub cookie_keys: Option<CookieKeys>,
    /// UDP answers over this size to queries without a valid server cookie are sent
    /// truncated (128 to 1232); `None`: no such limit.
    pub max_nocookie_response: Option<u16>,
    /// `[dns] rate_limit`; `None`: answers are not rate limited.
    pub rate_limit: Option<DnsRateLimit>,
}

/// `[dns] cookie_keys`, loaded.
#[derive(Debug, Clone)]
pub struct CookieKeys {
    pub path: PathBuf,
    pub secret: crate::dns::cookie::CookieSecret,
}

/// `[dns] health_ca`, loaded.
#[derive(Clone)]
pub struct HealthCa {
    pub path: PathBuf,
    pub roots: Arc<rustls::RootCertStore>,
}

impl std::fmt::Debug for HealthCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthCa")
            .field("path", &self.path)
            .field("roots", &self.roots.len())
            .finish()
    }
}

/// One in-zone nameserver and its addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Glue {
    /// Lower-case, without the trailing dot; one of `nameservers`, inside the zone.
    pub name: String,
    /// Never empty.
    pub addresses: Vec<std::net::IpAddr>,
}

impl DnsConfig {
    /// Nameservers inside the zone that have no glue: resolvers cannot reach them.
    pub fn unreachable_nameservers(&self) -> Vec<&str> {
        self.nameservers
            .iter()
            .filter(|n| {
                in_zone(n, &self.zone)
                    && !self.names.contains(n)
                    && !self.glue.iter().any(|g| &g.name == *n)
            })
            .map(String::as_str)
            .collect()
    }
}

fn in_zone(name: &str, zone: &str) -> bool {
    name == zone
        || name
            .strip_suffix(zone)
            .is_some_and(|head| head.ends_with('.'))
}

/// Carries the file path and text so spans can become file:line:column.
struct Ctx<'a> {
    path: &'a Path,
    source: &'a str,
}

impl Ctx<'_> {
    fn at<T>(&self, s: &Spanned<T>) -> Location {
        Location::from_offset(self.path, self.source, s.span().start)
    }

    fn err<T>(&self, s: &Spanned<T>, reason: impl Into<String>) -> ConfigError {
        ConfigError::invalid(self.at(s), reason)
    }

    fn count(
        &self,
        v: &Option<Spanned<i64>>,
        default: usize,
        key: &str,
    ) -> Result<usize, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) if *n.get_ref() < 0 => Err(self.err(n, format!("{key} must not be negative"))),
            Some(n) => usize::try_from(*n.get_ref())
                .map_err(|_| self.err(n, format!("{key} is too large"))),
        }
    }

    fn threshold(
        &self,
        v: &Option<Spanned<i64>>,
        default: u32,
        key: &str,
    ) -> Result<u32, ConfigError> {
        match v {
            None => Ok(default),
            Some(n) => match u32::try_from(*n.get_ref()) {
                Ok(0) | Err(_) => {
                    Err(self.err(n, format!("{key} must be between 1 and {}", u32::MAX)))
                }
                Ok(k) => Ok(k),
            },
        }
    }

    /// A duration as written, unchecked; `None` when the key is absent.
    fn raw_duration(&self, v: &RawDuration) -> Result<Option<Duration>, ConfigError> {
        let Some(s) = v else { return Ok(None) };
        humantime::parse_duration(s.get_ref())
            .map(Some)
            .map_err(|e| {
                ConfigError::invalid_because(
                    self.at(s),
                    format!(
                        "invalid value: string {:?}, expected a duration",
                        s.get_ref()
                    ),
                    e,
                )
            })
    }

    /// A timeout or period: `default` when absent, else above zero and at most a year.
    fn duration(
        &self,
        v: &RawDuration,
        default: Duration,
        key: &str,
    ) -> Result<Duration, ConfigError> {
        match (self.raw_duration(v)?, v) {
            (Some(d), Some(s)) => non_zero(d, key, self.at(s)),
            _ => Ok(default),
        }
    }

    fn socket_addr(&self, s: &Spanned<String>, what: &str) -> Result<SocketAddr, ConfigError> {
        s.get_ref().parse().map_err(|e| {
            ConfigError::invalid_because(
                self.at(s),
                format!("{what} {:?} is not an address:port", s.get_ref()),
                e,
            )
        })
    }
}

/// Longest duration any setting takes: a year. Far beyond any sensible timeout, and small
/// enough that adding it to a clock reading can never overflow.
const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

fn non_zero(d: Duration, key: &str, at: Location) -> Result<Duration, ConfigError> {
    if d.is_zero() {
        Err(ConfigError::invalid(
            at,
            format!("{key} must be greater than zero"),
        ))
    } else if d > MAX_DURATION {
        Err(ConfigError::invalid(
            at,
            format!("{key} must be at most a year"),
        ))
    } else {
        Ok(d)
    }
}

const EDGE_SECTIONS: &str = "[[listeners]], [[certificates]], [[origins]], [[routes]]";

/// `only`: the role a command runs (its sections alone are validated, and must be there);
/// `None` (`check`): every role whose sections the file has, at least one.
pub(super) fn validate(
    path: &Path,
    source: &str,
    raw: RawConfig,
    only: Option<Role>,
) -> Result<Config, ConfigError> {
    let cx = Ctx { path, source };
    let has_edge = !raw.listeners.is_empty()
        || !raw.certificates.is_empty()
        || !raw.origins.is_empty()
        || !raw.routes.is_empty();
    let has_dns = raw.dns.is_some();
    let (want_edge, want_dns) = match only {
        Some(Role::Edge) => (true, false),
        Some(Role::Dns) => (false, true),
        None if !has_edge && !has_dns => {
            return Err(ConfigError::invalid(
                Location::file(path),
                format!(
                    "nothing to run: the file has neither the edge sections ({EDGE_SECTIONS}) nor [dns]"
                ),
            ))
        }
        None => (has_edge, has_dns),
    };
    // [admin] serves whichever role runs, so both check it.
    let admin = match &raw.admin {
        Some(a) => Some(AdminConfig {
            listen: cx.socket_addr(&a.get_ref().listen, "admin listen")?,
        }),
        None => None,
    };
    let edge = if want_edge {
        Some(edge(&cx, &raw, has_edge)?)
    } else {
        None
    };
    let dns = match (&raw.dns, want_dns) {
        (_, false) => None,
        (Some(d), true) => Some(dns(&cx, d)?),
        (None, true) => {
            return Err(ConfigError::invalid(
                Location::file(path),
                "no [dns] section: nothing for `edgepop dns` to run",
            ))
        }
    };
    Ok(Config {
        path: path.to_path_buf(),
        admin,
        edge,
        dns,
    })
}

fn pop(cx: &Ctx, p: &Spanned<RawPop>) -> Result<PopConfig, ConfigError> {
    let p = p.get_ref();
    if p.name.get_ref().trim().is_empty() {
        return Err(cx.err(&p.name, "pop name must not be empty"));
    }
    let ticket_keys = match &p.ticket_keys {
        Some(path) => Some(Arc::new(
            crate::tls::tickets::FileTicketer::load(Path::new(path.get_ref())).map_err(|e| {
                let reason = e.to_string();
                ConfigError::invalid_because(cx.at(path), reason, e)
            })?,
        )),
        None => None,
    };
    let early_data =
        match &p.early_data {
            Some(e) if *e.get_ref() && p.ticket_keys.is_some() => return Err(cx.err(
                e,
                "early_data cannot be combined with ticket_keys: rustls accepts 0-RTT only for \
                 sessions each instance keeps itself (single-use, so a replay cannot resume); \
                 remove one of the two",
            )),
            Some(e) => *e.get_ref(),
            None => false,
        };
    let access_log = match &p.access_log {
        None => None,
        Some(t) if t.get_ref() == "stdout" => Some(AccessLogTarget::Stdout),
        Some(t) => {
            let path = PathBuf::from(t.get_ref());
            let dir = match path.parent() {
                Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
                _ => PathBuf::from("."),
            };
            if t.get_ref().is_empty() || path.is_dir() || !dir.is_dir() {
                return Err(cx.err(
                    t,
                    format!(
                        "access_log {:?}: not \"stdout\" nor a file in an existing directory",
                        t.get_ref()
                    ),
                ));
            }
            Some(AccessLogTarget::File(path))
        }
    };
    Ok(PopConfig {
        name: p.name.get_ref().clone(),
        server_timing: p.server_timing.unwrap_or(true),
        ticket_keys,
        early_data,
        access_log,
    })
}

/// The edge role is present when any of its sections is; then all four and [pop] are
/// required.
fn edge(cx: &Ctx, raw: &RawConfig, present: bool) -> Result<EdgeConfig, ConfigError> {
    if !present {
        return Err(ConfigError::invalid(
            Location::file(cx.path),
            format!(
                "nothing for `edgepop serve` to run: the file has none of the edge sections ({EDGE_SECTIONS})"
            ),
        ));
    }
    for (missing, name) in [
        (raw.listeners.is_empty(), "[[listeners]]"),
        (raw.certificates.is_empty(), "[[certificates]]"),
        (raw.origins.is_empty(), "[[origins]]"),
        (raw.routes.is_empty(), "[[routes]]"),
    ] {
        if missing {
            return Err(ConfigError::invalid(
                Location::file(cx.path),
                format!("the edge role needs at least one {name} entry"),
            ));
        }
    }
    let pop = match &raw.pop {
        Some(p) => pop(cx, p)?,
        None => {
            return Err(ConfigError::invalid(
                Location::file(cx.path),
                "missing [pop] section (the edge role needs it)",
            ))
        }
    };
    let listeners = raw
        .listeners
        .iter()
        .map(|l| listener(cx, l))
        .collect::<Result<Vec<_>, _>>()?;
    // SO_REUSEPORT would let both bind, and the kernel would split connections between them
    // (say, a TLS and a plain-HTTP listener on one port). Port 0 picks a free port each.
    for (i, l) in listeners.iter().enumerate() {
        if l.address.port() != 0 && listeners[..i].iter().any(|o| o.address == l.address) {
            return Err(cx.err(
                &raw.listeners[i].get_ref().address,
                format!("listener address {} is given twice", l.address),
            ));
        }
    }
    let certificates = raw
        .certificates
        .iter()
        .map(|c| certificate(cx, c))
        .collect::<Result<Vec<_>, _>>()?;
    let mut origins = Vec::with_capacity(raw.origins.len());
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for o in &raw.origins {
        let origin = origin(cx, o)?;
        if by_name.insert(origin.name.clone(), origins.len()).is_some() {
            return Err(cx.err(
                &o.get_ref().name,
                format!("origin {:?} is defined twice", origin.name),
            ));
        }
        origins.push(Arc::new(origin));
    }
    let mut routes = Vec::with_capacity(raw.routes.len());
    let mut seen_hosts: HashMap<String, ()> = HashMap::new();
    for r in &raw.routes {
        let route = route(cx, r, &by_name)?;
        for (h, spanned) in route.hosts.iter().zip(r.get_ref().hosts.get_ref()) {
            if seen_hosts.insert(h.clone(), ()).is_some() {
                return Err(cx.err(spanned, format!("host {h:?} is served by two routes")));
            }
        }
        routes.push(route);
    }
    Ok(EdgeConfig {
        pop,
        listeners,
        certificates,
        origins,
        routes,
    })
}

/// Like HAProxy's `maxconn` floor and well under a raised `ulimit -n`.
pub const DEFAULT_MAX_CLIENT_CONNECTIONS: usize = 20_000;

fn listener(cx: &Ctx, l: &Spanned<RawListener>) -> Result<ListenerConfig, ConfigError> {
    let l = l.get_ref();
    let secs = Duration::from_secs;
    Ok(ListenerConfig {
        address: cx.socket_addr(&l.address, "listener address")?,
        handshake_timeout: cx.duration(&l.handshake_timeout, secs(10), "handshake_timeout")?,
        header_timeout: cx.duration(&l.header_timeout, secs(30), "header_timeout")?,
        idle_timeout: cx.duration(&l.idle_timeout, secs(75), "idle_timeout")?,
        body_timeout: cx.duration(&l.body_timeout, secs(60), "body_timeout")?,
        send_timeout: cx.duration(&l.send_timeout, secs(60), "send_timeout")?,
        // Zero is allowed: close at once.
        drain_timeout: match (cx.raw_duration(&l.drain_timeout)?, &l.drain_timeout) {
            (Some(d), Some(s)) if d > MAX_DURATION => {
                return Err(cx.err(s, "drain_timeout must be at most a year"))
            }
            (Some(d), _) => d,
            (None, _) => secs(30),
        },
        max_connections: match &l.max_connections {
            None => DEFAULT_MAX_CLIENT_CONNECTIONS,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(v) if (1..=1 << 24).contains(&v) => v,
                _ => return Err(cx.err(n, "max_connections must be between 1 and 16777216")),
            },
        },
        http3: l.http3.unwrap_or(false),
        proxy_protocol: l.proxy_protocol.unwrap_or(false),
        max_connections_per_client: match &l.max_connections_per_client {
            None => None,
            Some(n) => match usize::try_from(*n.get_ref()) {
                Ok(v) if (1..=1 << 24).contains(&v) => Some(v),
                _ => {
                    return Err(cx.err(
                        n,
                        "max_connections_per_client must be between 1 and 16777216",
                    ))
                }
            },
        },
        redirect_to_https: redirect_to_https(cx, l)?,
    })
}

/// `redirect_to_https` and `https_port`: the port to redirect to, for a plain-HTTP listener.
fn redirect_to_https(cx: &Ctx, l: &RawListener) -> Result<Option<u16>, ConfigError> {
    let on = l.redirect_to_https.as_ref().filter(|r| *r.get_ref());
    match (on, &l.https_port) {
        (None, Some(p)) => Err(cx.err(p, "https_port applies only with redirect_to_https = true")),
        (Some(r), _) if l.http3.unwrap_or(false) => Err(cx.err(
            r,
            "a redirect_to_https listener speaks plain HTTP and cannot also serve HTTP/3 (http3)",
        )),
        (Some(_), Some(p)) => match u16::try_from(*p.get_ref()) {
            Ok(port) if port > 0 => Ok(Some(port)),
            _ => Err(cx.err(p, "https_port must be between 1 and 65535")),
        },
        (Some(_), None) => Ok(Some(443)),
        (None, None) => Ok(None),
    }
}

/// Host names are compared lower-case; a wildcard is `*.` followed by at least two labels.
fn host_name(cx: &Ctx, s: &Spanned<String>) -> Result<String, ConfigError> {
    let name = s.get_ref().trim_end_matches('.').to_ascii_lowercase();
    let bare = name.strip_prefix("*.").unwrap_or(&name);
    let valid_label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if bare.is_empty() || bare.len() > 253 || !bare.split('.').all(valid_label) {
        return Err(cx.err(s, format!("{:?} is not a valid host name", s.get_ref())));
    }
    if name.starts_with("*.") && !bare.contains('.') {
        return Err(cx.err(
            s,
            format!(
                "wildcard {:?} must have at least two labels after '*.'",
                s.get_ref()
            ),
        ));
    }
    Ok(name)
}

fn certificate(cx: &Ctx, c: &Spanned<RawCertificate>) -> Result<CertificateConfig, ConfigError> {
    let c = c.get_ref();
    if c.names.get_ref().is_empty() {
        return Err(cx.err(&c.names, "a certificate needs at least one name"));
    }
    let names = c
        .names
        .get_ref()
        .iter()
        .map(|n| host_name(cx, n))
        .collect::<Result<Vec<_>, _>>()?;
    let cert_path = PathBuf::from(c.cert.get_ref());
    let key_path = PathBuf::from(c.key.get_ref());
    let key = certs::load_certified_key(&cert_path, &key_path)
        .map_err(|e| key_pair_error(cx, e, &c.cert, &c.key))?;
    Ok(CertificateConfig {
        names,
        cert_path,
        key_path,
        key: Arc::new(key),
    })
}

/// A certificate/key pair that failed to load, reported at the key's line when the key is at
/// fault, else at the certificate's.
fn key_pair_error(
    cx: &Ctx,
    e: certs::CertError,
    cert: &Spanned<String>,
    key: &Spanned<String>,
) -> ConfigError {
    let at = match e {
        certs::CertError::Key { .. }
        | certs::CertError::NoKey { .. }
        | certs::CertError::EncryptedKey { .. }
        | certs::CertError::Mismatch { .. } => cx.at(key),
        _ => cx.at(cert),
    };
    let reason = e.to_string();
    ConfigError::invalid_because(at, reason, e)
}

/// SHA-256 of byte strings, in order.
fn digest(parts: &[&[u8]]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    let mut digest = [0u8; 32];
    digest.copy_from_slice(ctx.finish().as_ref());
    digest
}

/// `client_cert` + `client_key`, both or neither: each file read once, parsed, and checked
/// to belong together.
fn client_auth(cx: &Ctx, o: &RawOrigin) -> Result<Option<ClientAuth>, ConfigError> {
    let (cert, key) = match (&o.client_cert, &o.client_key) {
        (None, None) => return Ok(None),
        (Some(c), Some(k)) => (c, k),
        (Some(c), None) => return Err(cx.err(c, "client_cert needs client_key")),
        (None, Some(k)) => return Err(cx.err(k, "client_key needs client_cert")),
    };
    let read = |s: &Spanned<String>| {
        let p = PathBuf::from(s.get_ref());
        let bytes = std::fs::read(&p)
            .map_err(|e| cx.err(s, format!("cannot read {}: {e}", p.display())))?;
        Ok::<_, ConfigError>((p, bytes))
    };
    let ((cert_path, cert_pem), (key_path, key_pem)) = (read(cert)?, read(key)?);
    let pair_error = |e| key_pair_error(cx, e, cert, key);
    let chain = certs::chain_from_pem(&cert_path, &cert_pem).map_err(pair_error)?;
    let key_der = certs::key_from_pem(&key_path, &key_pem).map_err(pair_error)?;
    certs::certified_key(
        (&cert_path, chain.clone()),
        (&key_path, key_der.clone_key()),
    )
    .map_err(pair_error)?;
    Ok(Some(ClientAuth {
        digest: digest(&[&cert_pem, &key_pem]),
        cert: cert_path,
        key: key_path,
        chain,
        key_der: Arc::new(key_der),
    }))
}

fn origin(cx: &Ctx, o: &Spanned<RawOrigin>) -> Result<OriginConfig, ConfigError> {
    let at = cx.at(o);
    let o = o.get_ref();
    let name = o.name.get_ref().clone();
    if name.is_empty() {
        return Err(cx.err(&o.name, "origin name must not be empty"));
    }
    let address = o.address.get_ref().clone();
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0) => {}
        _ => {
            return Err(cx.err(
                &o.address,
                format!("origin address {address:?} must be host:port"),
            ))
        }
    }
    let server_name = ServerName::try_from(o.server_name.get_ref().clone()).map_err(|e| {
        ConfigError::invalid_because(
            cx.at(&o.server_name),
            format!(
                "server_name {:?} is not a DNS name or IP address",
                o.server_name.get_ref()
            ),
            e,
        )
    })?;
    let (ca, ca_digest) = match &o.ca {
        Some(ca) => {
            let p = PathBuf::from(ca.get_ref());
            let invalid = |e: certs::CertError| {
                let reason = e.to_string();
                ConfigError::invalid_because(cx.at(ca), reason, e)
            };
            let bytes = std::fs::read(&p).map_err(|e| {
                invalid(certs::CertError::Ca {
                    path: p.clone(),
                    source: rustls::pki_types::pem::Error::Io(e),
                })
            })?;
            certs::roots_from_pem(&p, &bytes).map_err(invalid)?;
            (Some(p), Some(digest(&[&bytes])))
        }
        None => (None, None),
    };
    let client_auth = client_auth(cx, o)?;
    let protocol = match o.protocol.as_ref().map(|p| p.get_ref().as_str()) {
        None | Some("h2") => Protocol::H2,
        Some("http1") | Some("http/1.1") => Protocol::Http1,
        Some(other) => {
            return Err(cx.err(
                o.protocol.as_ref().unwrap_or(&o.name),
                format!("protocol {other:?} is not one of \"h2\", \"http1\""),
            ))
        }
    };
    let pooling = o.pooling.as_ref().is_none_or(|p| *p.get_ref());
    let warm = cx.count(
        &o.warm_connections,
        if pooling { 4 } else { 0 },
        "warm_connections",
    )?;
    if !pooling && warm > 0 {
        let s = o.warm_connections.as_ref().map_or(at.clone(), |s| cx.at(s));
        return Err(ConfigError::invalid(
            s,
            "warm_connections needs pooling = true",
        ));
    }
    let max = cx.count(&o.max_connections, 64, "max_connections")?;
    let standby = cx.count(&o.standby_connections, warm.min(1), "standby_connections")?;
    if !pooling && standby > 0 {
        let s = o
            .standby_connections
            .as_ref()
            .map_or(at.clone(), |s| cx.at(s));
        return Err(ConfigError::invalid(
            s,
            "standby_connections needs pooling = true",
        ));
    }
    if max == 0 {
        let s = o.max_connections.as_ref().map_or(at.clone(), |s| cx.at(s));
        return Err(ConfigError::invalid(
            s,
            "max_connections must be at least 1",
        ));
    }
    if warm > max {
        let s = o.warm_connections.as_ref().map_or(at.clone(), |s| cx.at(s));
        return Err(ConfigError::invalid(
            s,
            format!("warm_connections ({warm}) exceeds max_connections ({max})"),
        ));
    }
    if standby > max {
        let s = o
            .standby_connections
            .as_ref()
            .map_or(at.clone(), |s| cx.at(s));
        return Err(ConfigError::invalid(
            s,
            format!("standby_connections ({standby}) exceeds max_connections ({max})"),
        ));
    }
    let health_path = match &o.health_path {
        Some(p) if !p.get_ref().starts_with('/') => {
            return Err(cx.err(p, "health_path must start with '/'"));
        }
        Some(p) => Some(p.get_ref().clone()),
        None => None,
    };
    let warm_ratio = match &o.warm_ratio {
        None => 1.0,
        Some(r) if r.get_ref().is_finite() && *r.get_ref() >= 0.0 && *r.get_ref() <= 100.0 => {
            *r.get_ref()
        }
        Some(r) => return Err(cx.err(r, "warm_ratio must be between 0 and 100")),
    };
    let d = |v: &RawDuration, default: u64, key: &str| {
        cx.duration(v, Duration::from_millis(default), key)
    };
    Ok(OriginConfig {
        name,
        address,
        server_name,
        ca,
        ca_digest,
        client_auth,
        protocol,
        warm_connections: warm,
        standby_connections: standby,
        max_connections: max,
        queue_size: cx.count(&o.queue_size, 1024, "queue_size")?,
        connect_timeout: d(&o.connect_timeout, 3_000, "connect_timeout")?,
        first_byte_timeout: d(&o.first_byte_timeout, 60_000, "first_byte_timeout")?,
        idle_timeout: d(&o.idle_timeout, 60_000, "idle_timeout")?,
        queue_timeout: d(&o.queue_timeout, 5_000, "queue_timeout")?,
        tunnel_idle_timeout: d(&o.tunnel_idle_timeout, 3_600_000, "tunnel_idle_timeout")?,
        keepalive_interval: d(&o.keepalive_interval, 10_000, "keepalive_interval")?,
        keepalive_timeout: d(&o.keepalive_timeout, 5_000, "keepalive_timeout")?,
        max_connection_age: d(&o.max_connection_age, 600_000, "max_connection_age")?,
        origin_idle_timeout: match &o.origin_idle_timeout {
            None => None,
            Some(v) => {
                let t = d(&o.origin_idle_timeout, 0, "origin_idle_timeout")?;
                if t < Duration::from_secs(1) {
                    return Err(cx.err(
                        v,
                        "origin_idle_timeout must be at least 1s (leave it out to learn it)",
                    ));
                }
                Some(t)
            }
        },
        health_path,
        health_interval: d(&o.health_interval, 5_000, "health_interval")?,
        unhealthy_after: cx.threshold(&o.unhealthy_after, 3, "unhealthy_after")?,
        healthy_after: cx.threshold(&o.healthy_after, 2, "healthy_after")?,
        warm_ratio: if pooling { warm_ratio } else { 0.0 },
        pooling,
    })
}

fn route(
    cx: &Ctx,
    r: &Spanned<RawRoute>,
    by_name: &HashMap<String, usize>,
) -> Result<RouteConfig, ConfigError> {
    let r = r.get_ref();
    if r.hosts.get_ref().is_empty() {
        return Err(cx.err(&r.hosts, "a route needs at least one host"));
    }
    if r.origins.get_ref().is_empty() {
        return Err(cx.err(&r.origins, "a route needs at least one origin"));
    }
    let hosts = r
        .hosts
        .get_ref()
        .iter()
        .map(|h| host_name(cx, h))
        .collect::<Result<Vec<_>, _>>()?;
    let mut origins = Vec::new();
    for o in r.origins.get_ref() {
        let Some(&i) = by_name.get(o.get_ref()) else {
            return Err(cx.err(
                o,
                format!(
                    "route names origin {:?}, which is not defined in [[origins]]",
                    o.get_ref()
                ),
            ));
        };
        if origins.contains(&i) {
            return Err(cx.err(
                o,
                format!("origin {:?} is listed twice in this route", o.get_ref()),
            ));
        }
        origins.push(i);
    }
    let max_body_size = match &r.max_body_size {
        None => None,
        Some(v) => match byte_size(cx, v, "max_body_size")? {
            // nginx reads 0 as "no limit"; here that is said by leaving the key out.
            0 => {
                return Err(cx.err(
                    v,
                    "max_body_size must be at least 1 byte (leave it out for no limit)",
                ))
            }
            n => Some(n),
        },
    };
    let rate_limit = match &r.rate_limit {
        Some(l) => Some(rate_limit(cx, l)?),
        None => None,
    };
    let hsts = match &r.hsts {
        Some(h) => Some(hsts(cx, h)?),
        None => None,
    };
    let request_headers = header_edits(
        cx,
        (&r.request_headers, "request_headers"),
        (&r.remove_request_headers, "remove_request_headers"),
        Direction::Request,
    )?;
    let response_headers = header_edits(
        cx,
        (&r.response_headers, "response_headers"),
        (&r.remove_response_headers, "remove_response_headers"),
        Direction::Response,
    )?;
    Ok(RouteConfig {
        hosts,
        origins,
        max_body_size,
        rate_limit,
        hsts,
        request_headers,
        response_headers,
    })
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Direction {
    Request,
    Response,
}

/// Framing and hop-by-hop fields (the proxy's own hop-by-hop list and the framing ones): the
/// connection's business, not a route's.
const FRAMING_FIELDS: [&str; 10] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "trailer",
];

/// What the edge itself tells the origin: the client's host, address and scheme, the
/// request ID and 0-RTT.
const EDGE_REQUEST_FIELDS: [&str; 6] = [
    "host",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-request-id",
    "early-data",
];

/// What the edge or its HTTP stack sets on answers after a route's edits would run.
const EDGE_RESPONSE_FIELDS: [&str; 2] = ["alt-svc", "date"];

/// Longest value a route may set: far below any server's header limits, so a mistake is
/// caught by `check` instead of as a 431 from the origin.
const MAX_EDIT_VALUE: usize = 4096;

/// A field name a route may set or remove in `direction`.
fn editable_name<T>(
    cx: &Ctx,
    at: &Spanned<T>,
    key: &str,
    name: &str,
    direction: Direction,
) -> Result<http::HeaderName, ConfigError> {
    let parsed = http::HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| cx.err(at, format!("{key}: {name:?} is not a valid header name")))?;
    let n = parsed.as_str();
    if FRAMING_FIELDS.contains(&n) {
        return Err(cx.err(
            at,
            format!(
                "{key}: {name:?} belongs to the connection's framing; it cannot be changed here"
            ),
        ));
    }
    if n.starts_with("sec-websocket-") {
        return Err(cx.err(
            at,
            format!("{key}: {name:?} belongs to WebSocket handshakes; it cannot be changed here"),
        ));
    }
    let edge_set = match direction {
        Direction::Request => EDGE_REQUEST_FIELDS.contains(&n),
        Direction::Response => EDGE_RESPONSE_FIELDS.contains(&n),
    };
    if edge_set {
        return Err(cx.err(
            at,
            format!("{key}: {name:?} is set by the edge; it cannot be changed here"),
        ));
    }
    Ok(parsed)
}

type RawSet<'a> = (&'a Option<Spanned<RawHeaders>>, &'static str);
type RawRemove<'a> = (&'a Option<Spanned<Vec<Spanned<String>>>>, &'static str);

/// A route's `*_headers` table and `remove_*_headers` list for one direction.
fn header_edits(
    cx: &Ctx,
    (set, set_key): RawSet<'_>,
    (remove, remove_key): RawRemove<'_>,
    direction: Direction,
) -> Result<HeaderEdits, ConfigError> {
    let mut edits = HeaderEdits::default();
    for name in remove.iter().flat_map(|l| l.get_ref()) {
        let n = editable_name(cx, name, remove_key, name.get_ref(), direction)?;
        if edits.remove.contains(&n) {
            return Err(cx.err(name, format!("{remove_key}: {n:?} is listed twice")));
        }
        edits.remove.push(n);
    }
    for (name, value) in set.iter().flat_map(|t| t.get_ref()) {
        let n = editable_name(cx, value, set_key, name, direction)?;
        if edits.set.iter().any(|(have, _)| have == n) {
            return Err(cx.err(value, format!("{set_key}: {n:?} is given twice")));
        }
        if edits.remove.contains(&n) {
            return Err(cx.err(
                value,
                format!("{n:?} is both in {set_key} and in {remove_key}"),
            ));
        }
        if direction == Direction::Response && n == http::header::SET_COOKIE {
            return Err(cx.err(
                value,
                format!("{set_key}: \"Set-Cookie\" would replace every cookie the origin sets"),
            ));
        }
        let text = value.get_ref();
        if text.is_empty() {
            return Err(cx.err(
                value,
                format!("{set_key}: {name:?} has an empty value (to take a field out, name it in {remove_key})"),
            ));
        }
        if text.starts_with([' ', '\t']) || text.ends_with([' ', '\t']) {
            return Err(cx.err(
                value,
                format!("{set_key}: the value of {name:?} starts or ends with white space (h2 and HTTP/3 peers refuse such a field)"),
            ));
        }
        if text.len() > MAX_EDIT_VALUE {
            return Err(cx.err(
                value,
                format!("{set_key}: the value of {name:?} is longer than {MAX_EDIT_VALUE} bytes"),
            ));
        }
        let printable = text
            .bytes()
            .all(|b| b == b'\t' || (b' '..=b'~').contains(&b));
        let v = printable
            .then(|| http::HeaderValue::from_str(text).ok())
            .flatten()
            .ok_or_else(|| {
            cx.err(
                value,
                format!("{set_key}: the value of {name:?} is not a valid header value (visible ASCII, spaces and tabs)"),
            )
        })?;
        edits.set.push((n, v));
    }
    Ok(edits)
}

/// A `Strict-Transport-Security` value (RFC 6797 6.1): a header value with a `max-age`
/// directive of whole seconds.
fn hsts(cx: &Ctx, h: &Spanned<String>) -> Result<http::HeaderValue, ConfigError> {
    let text = h.get_ref().trim();
    let max_age = text.split(';').map(str::trim).find_map(|d| {
        let (name, value) = d.split_once('=')?;
        name.trim()
            .eq_ignore_ascii_case("max-age")
            .then(|| value.trim().trim_matches('"'))
    });
    if !max_age.is_some_and(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit())) {
        return Err(cx.err(
            h,
            "hsts needs a max-age in seconds, e.g. \"max-age=31536000; includeSubDomains\"",
        ));
    }
    http::HeaderValue::from_str(text).map_err(|_| cx.err(h, "hsts is not a valid header value"))
}

/// Clients a route's rate limiter remembers by default: about 5 MiB.
const DEFAULT_RATE_LIMIT_CLIENTS: usize = 100_000;

/// `rate_limit`: `requests` (1 to a million) per `per` (default 1s), `burst` (default
/// `requests`, 1 to a million); a request's share of the period must be at least 1ms.
fn rate_limit(cx: &Ctx, l: &Spanned<RawRateLimit>) -> Result<RateLimit, ConfigError> {
    let raw = l.get_ref();
    let count = |n: &Spanned<i64>, key: &str| match u32::try_from(*n.get_ref()) {
        Ok(v) if (1..=1_000_000).contains(&v) => Ok(v),
        _ => Err(cx.err(n, format!("rate_limit {key} must be between 1 and 1000000"))),
    };
    let requests = count(&raw.requests, "requests")?;
    let per = cx.duration(&raw.per, Duration::from_secs(1), "rate_limit per")?;
    if per / requests < Duration::from_millis(1) {
        return Err(cx.err(
            l,
            "rate_limit allows more than one request per millisecond per client: use a longer per or fewer requests",
        ));
    }
    let burst = match &raw.burst {
        Some(b) => count(b, "burst")?,
        None => requests,
    };
    // The GCRA keeps `burst` periods ahead in nanoseconds: keep that within a year.
    if (per / requests).saturating_mul(burst) > MAX_DURATION {
        return Err(cx.err(
            l,
            "rate_limit burst x per / requests must be at most a year",
        ));
    }
    let max_clients = match &raw.max_clients {
        None => DEFAULT_RATE_LIMIT_CLIENTS,
        Some(n) => match usize::try_from(*n.get_ref()) {
            Ok(v) if (1..=10_000_000).contains(&v) => v,
            _ => return Err(cx.err(n, "rate_limit max_clients must be between 1 and 10000000")),
        },
    };
    Ok(RateLimit {
        requests,
        per,
        burst,
        max_clients,
    })
}

/// `[dns] rate_limit = { responses = 20, per = "1s", burst = 20, slip = 2, ipv4_prefix = 24,
/// ipv6_prefix = 56 }` (BIND's `rate-limit` defaults for slip and prefixes).
fn dns_rate_limit(cx: &Ctx, l: &Spanned<RawDnsRateLimit>) -> Result<DnsRateLimit, ConfigError> {
    let raw = l.get_ref();
    let ranged = |n: &Spanned<i64>, key: &str, lo: i64, hi: i64| {
        let v = *n.get_ref();
        if (lo..=hi).contains(&v) {
            Ok(v as u32)
        } else {
            Err(cx.err(n, format!("rate_limit {key} must be between {lo} and {hi}")))
        }
    };
    let responses = ranged(&raw.responses, "responses", 1, 1_000_000)?;
    let per = cx.duration(&raw.per, Duration::from_secs(1), "rate_limit per")?;
    let burst = match &raw.burst {
        Some(b) => ranged(b, "burst", 1, 1_000_000)?,
        None => responses,
    };
    let limit = DnsRateLimit {
        responses,
        per,
        burst,
        nodata: responses,
        nxdomains: responses,
        errors: responses,
        slip: 2,
        ipv4_prefix: 24,
        ipv6_prefix: 56,
        exempt: Vec::new(),
    };
    let kind = |n: &Option<Spanned<i64>>, key: &str| -> Result<u32, ConfigError> {
        let Some(n) = n else { return Ok(responses) };
        let count = ranged(n, key, 0, 1_000_000)?;
        match limit.kind_burst(count) {
            Some(b) if per / count < Duration::from_millis(1) || (per / count).saturating_mul(b) > MAX_DURATION => Err(cx.err(
                n,
                format!("rate_limit {key} with this per and burst allows more than one response per millisecond or a burst longer than a year"),
            )),
            _ => Ok(count),
        }
    };
    let (nodata, nxdomains, errors) = (
        kind(&raw.nodata, "nodata")?,
        kind(&raw.nxdomains, "nxdomains")?,
        kind(&raw.errors, "errors")?,
    );
    if per / responses < Duration::from_millis(1) {
        return Err(cx.err(
            l,
            "rate_limit allows more than one response per millisecond per client network: use a longer per or fewer responses",
        ));
    }
    if (per / responses).saturating_mul(burst) > MAX_DURATION {
        return Err(cx.err(
            l,
            "rate_limit burst x per / responses must be at most a year",
        ));
    }
    let opt = |n: &Option<Spanned<i64>>, key: &str, lo: i64, hi: i64, default: u32| match n {
        Some(n) => ranged(n, key, lo, hi),
        None => Ok(default),
    };
    Ok(DnsRateLimit {
        nodata,
        nxdomains,
        errors,
        slip: opt(&raw.slip, "slip", 0, 10, 2)?,
        ipv4_prefix: opt(&raw.ipv4_prefix, "ipv4_prefix", 8, 32, 24)? as u8,
        ipv6_prefix: opt(&raw.ipv6_prefix, "ipv6_prefix", 16, 128, 56)? as u8,
        exempt: match &raw.exempt {
            None => Vec::new(),
            Some(list) => list
                .iter()
                .map(|n| {
                    n.get_ref().parse::<ipnet::IpNet>().map(|n| n.trunc()).map_err(|_| {
                        cx.err(n, format!("rate_limit exempt: {:?} is not a network (192.0.2.0/24, 2001:db8::/32)", n.get_ref()))
                    })
                })
                .collect::<Result<_, _>>()?,
        },
        ..limit
    })
}

impl DnsRateLimit {
    /// The burst of a kind allowed `count` answers per `per`: `burst` scaled by `count /
    /// responses` (at least 1); `None` for 0, a kind not limited.
    pub fn kind_burst(&self, count: u32) -> Option<u32> {
        let scaled = u64::from(self.burst) * u64::from(count) / u64::from(self.responses.max(1));
        (count > 0).then(|| u32::try_from(scaled.max(1)).unwrap_or(u32::MAX))
    }
}

/// A size: a number of bytes, or text with a unit ("512KiB", "10 MB", "1GiB").
fn byte_size(cx: &Ctx, v: &Spanned<RawSize>, key: &str) -> Result<u64, ConfigError> {
    match v.get_ref() {
        RawSize::Bytes(n) => {
            u64::try_from(*n).map_err(|_| cx.err(v, format!("{key} must not be negative")))
        }
        RawSize::Text(t) => t
            .trim()
            .parse::<bytesize::ByteSize>()
            .map(|b| b.as_u64())
            .map_err(|e| {
                cx.err(
                    v,
                    format!("{key}: {e} (a number of bytes, or e.g. \"512KiB\", \"10MB\")"),
                )
            }),
    }
}

fn dns(cx: &Ctx, d: &Spanned<RawDns>) -> Result<DnsConfig, ConfigError> {
    let d = d.get_ref();
    let zone = d.zone.get_ref().trim_end_matches('.').to_ascii_lowercase();
    if zone.is_empty() {
        return Err(cx.err(&d.zone, "zone must not be empty"));
    }
    host_name(cx, &d.zone)?;
    let in_zone = |n: &str| in_zone(n, &zone);
    let mut names = Vec::new();
    for n in d.names.get_ref() {
        let name = host_name(cx, n)?;
        if !in_zone(&name) {
            return Err(cx.err(n, format!("name {name:?} is not inside zone {zone:?}")));
        }
        names.push(name);
    }
    if names.is_empty() {
        return Err(cx.err(&d.names, "[dns] names must list at least one name"));
    }
    let nameservers = match &d.nameservers {
        Some(list) if list.get_ref().is_empty() => {
            return Err(cx.err(list, "nameservers must not be empty"))
        }
        Some(list) => list
            .get_ref()
            .iter()
            .map(|n| host_name(cx, n))
            .collect::<Result<Vec<_>, _>>()?,
        None => vec![format!("ns1.{zone}")],
    };
    let glue = glue(cx, d, &zone, &names, &nameservers)?;
    let hostmaster = match &d.hostmaster {
        Some(h) => host_name(cx, h)?,
        None => format!("hostmaster.{zone}"),
    };
    let d_or = |v: &RawDuration, default: u64, key: &str| {
        cx.duration(v, Duration::from_millis(default), key)
    };
    // Zero is a valid TTL; the wire field is 31 bits (RFC 2181 section 8).
    let ttl = match (cx.raw_duration(&d.ttl)?, &d.ttl) {
        (Some(t), Some(s)) if t.as_secs() > u64::from(u32::MAX >> 1) => {
            return Err(cx.err(s, "ttl is too large"))
        }
        (Some(t), _) => t,
        (None, _) => Duration::from_secs(60),
    };
    let health_ca = match &d.health_ca {
        Some(s) => {
            let path = PathBuf::from(s.get_ref());
            let roots = certs::load_roots(&path).map_err(|e| {
                let reason = e.to_string();
                ConfigError::invalid_because(cx.at(s), reason, e)
            })?;
            Some(HealthCa {
                path,
                roots: Arc::new(roots),
            })
        }
        None => None,
    };
    let udp_io = parse_udp_io(cx, d)?;
    Ok(DnsConfig {
        listen: cx.socket_addr(&d.listen, "dns listen")?,
        zone,
        names,
        ttl,
        regenerate_every: d_or(&d.regenerate_every, 300_000, "regenerate_every")?,
        health_interval: d_or(&d.health_interval, 1_000, "health_interval")?,
        health_timeout: d_or(&d.health_timeout, 800, "health_timeout")?,
        unhealthy_after: cx.threshold(&d.unhealthy_after, 2, "unhealthy_after")?,
        healthy_after: cx.threshold(&d.healthy_after, 2, "healthy_after")?,
        regions: PathBuf::from(d.regions.get_ref()),
        zone_file: d.zone_file.as_ref().map(|p| PathBuf::from(p.get_ref())),
        nameservers,
        glue,
        hostmaster,
        health_ca,
        admin_listen: match &d.admin_listen {
            Some(a) => Some(cx.socket_addr(a, "dns admin_listen")?),
            None => None,
        },
        udp_workers: match &d.udp_workers {
            Some(n) if *n.get_ref() < 1 || *n.get_ref() > 256 => {
                return Err(cx.err(n, "udp_workers must be between 1 and 256"));
            }
            Some(n) => usize::try_from(*n.get_ref()).unwrap_or(1),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        },
        udp_io,
        udp_coalesce_us: udp_coalesce_us(cx, d, udp_io)?,
        nsid: match &d.nsid {
            Some(n) => Some(nsid(cx, n)?),
            None => None,
        },
        max_nocookie_response: match &d.max_nocookie_response {
            None => None,
            Some(n) => match u16::try_from(*n.get_ref()) {
                Ok(v) if (128..=1232).contains(&v) => Some(v),
                _ => {
                    return Err(cx.err(
                        n,
                        "max_nocookie_response must be between 128 and 1232 (leave it out for no limit)",
                    ))
                }
            },
        },
        rate_limit: match &d.rate_limit {
            Some(l) => Some(dns_rate_limit(cx, l)?),
            None => None,
        },
        cookie_keys: match &d.cookie_keys {
            Some(s) => {
                let path = PathBuf::from(s.get_ref());
                let secret = crate::dns::cookie::CookieSecret::load(&path).map_err(|e| {
                    let reason = e.to_string();
                    ConfigError::invalid_because(cx.at(s), reason, e)
                })?;
                Some(CookieKeys { path, secret })
            }
            None => None,
        },
    })
}

/// `[dns] nsid`: the NSID's octets (RFC 5001), 1 to 128 as gdnsd allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nsid(Box<[u8]>);

impl Nsid {
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }

    fn is_text(bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| b.is_ascii_graphic() || b == b' ')
    }
}

/// As it could be written: the text, or `0x` and hex digits for octets that are not
/// printable ASCII or whose text would read as hex (it starts with `0x`).
impl std::fmt::Display for Nsid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match std::str::from_utf8(&self.0) {
            Ok(text) if Nsid::is_text(&self.0) && !is_hex_form(text) => f.write_str(text),
            _ => write!(f, "0x{}", hex::encode(&self.0)),
        }
    }
}

fn is_hex_form(s: &str) -> bool {
    s.starts_with("0x") || s.starts_with("0X")
}

/// An NSID as operators write it: printable ASCII (gdnsd's `nsid_ascii`), so `dig +nsid`
/// shows it as written, or `0x` and hex digits for any octets (gdnsd's `nsid`, Knot's form);
/// 128 octets at most, as gdnsd allows.
fn nsid(cx: &Ctx, n: &Spanned<String>) -> Result<Nsid, ConfigError> {
    let s = n.get_ref();
    if is_hex_form(s) {
        let digits = s.get(2..).unwrap_or_default();
        return match hex::decode(digits) {
            Ok(b) if (1..=128).contains(&b.len()) => Ok(Nsid(b.into())),
            Ok(_) => Err(cx.err(
                n,
                "nsid must be 1 to 128 octets (2 to 256 hex digits after 0x)",
            )),
            Err(hex::FromHexError::InvalidHexCharacter { c, .. }) => {
                Err(cx.err(n, format!("nsid after 0x must be hex digits, not {c:?}")))
            }
            Err(_) => Err(cx.err(n, "nsid after 0x must be an even number of hex digits")),
        };
    }
    if s.is_empty() || s.len() > 128 {
        return Err(cx.err(n, "nsid must be 1 to 128 characters"));
    }
    if !Nsid::is_text(s.as_bytes()) {
        return Err(cx.err(n, "nsid must be printable ASCII (or 0x and hex digits)"));
    }
    Ok(Nsid(s.as_bytes().into()))
}

fn glue(
    cx: &Ctx,
    d: &RawDns,
    zone: &str,
    names: &[String],
    nameservers: &[String],
) -> Result<Vec<Glue>, ConfigError> {
    let Some(table) = &d.glue else {
        return Ok(Vec::new());
    };
    if table.get_ref().len() > usize::from(u8::MAX) {
        return Err(cx.err(table, "glue: at most 255 nameservers"));
    }
    let mut out: Vec<Glue> = Vec::new();
    for (key, list) in table.get_ref() {
        let name = key.trim_end_matches('.').to_ascii_lowercase();
        if out.iter().any(|g| g.name == name) {
            return Err(cx.err(list, format!("glue for {name:?} is given twice")));
        }
        if !nameservers.contains(&name) {
            return Err(cx.err(
                list,
                format!("glue for {name:?}, which is not one of [dns] nameservers"),
            ));
        }
        if !in_zone(&name, zone) {
            return Err(cx.err(
                list,
                format!("glue for {name:?}: only nameservers inside zone {zone:?} need glue"),
            ));
        }
        if name == zone {
            return Err(cx.err(
                list,
                "the zone apex cannot be a nameserver with glue; use a name below it",
            ));
        }
        if names.contains(&name) {
            return Err(cx.err(
                list,
                format!("{name:?} is both a geo name and a nameserver with glue"),
            ));
        }
        if list.get_ref().is_empty() {
            return Err(cx.err(list, format!("glue for {name:?} lists no address")));
        }
        let addresses = list
            .get_ref()
            .iter()
            .map(|a| {
                a.get_ref()
                    .parse::<std::net::IpAddr>()
                    .map_err(|_| cx.err(a, format!("{:?} is not an IP address", a.get_ref())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        out.push(Glue { name, addresses });
    }
    Ok(out)
}
