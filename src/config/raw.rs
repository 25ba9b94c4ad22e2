//! The configuration file exactly as written: serde structs that reject unknown keys and keep
//! the span of everything a later check may need to point at.

use serde::Deserialize;
use toml::Spanned;

/// A duration as written ("750ms", "5m"). Parsed during validation, not by serde, so that a
/// bad value in one role's section does not stop the other role (see `validate`).
pub type RawDuration = Option<Spanned<String>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub pop: Option<Spanned<RawPop>>,
    pub admin: Option<Spanned<RawAdmin>>,
    #[serde(default)]
    pub listeners: Vec<Spanned<RawListener>>,
    #[serde(default)]
    pub certificates: Vec<Spanned<RawCertificate>>,
    #[serde(default)]
    pub origins: Vec<Spanned<RawOrigin>>,
    #[serde(default)]
    pub routes: Vec<Spanned<RawRoute>>,
    pub dns: Option<Spanned<RawDns>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPop {
    pub name: Spanned<String>,
    /// Add a `Server-Timing` header with the PoP's view of each request.
    pub server_timing: Option<bool>,
    /// Session-ticket key file shared by the instances of a PoP (see `tls::tickets`).
    pub ticket_keys: Option<Spanned<String>>,
    /// Accept TLS 1.3 0-RTT early data (safe requests only; see `tls::early`).
    pub early_data: Option<Spanned<bool>>,
    /// One JSON line per request: "stdout" or a file path; absent: no access log.
    pub access_log: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    pub listen: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawListener {
    pub address: Spanned<String>,
    pub handshake_timeout: RawDuration,
    pub header_timeout: RawDuration,
    pub idle_timeout: RawDuration,
    pub body_timeout: RawDuration,
    pub send_timeout: RawDuration,
    pub drain_timeout: RawDuration,
    /// Client connections open at once; above it the listener stops accepting.
    pub max_connections: Option<Spanned<i64>>,
    /// Also serve HTTP/3 (QUIC) on the same port, over UDP.
    pub http3: Option<bool>,
    /// Every TCP connection starts with a PROXY protocol header (v1 or v2) from a balancer.
    pub proxy_protocol: Option<bool>,
    /// TCP connections one client (IPv4 address, IPv6 /64) may hold open.
    pub max_connections_per_client: Option<Spanned<i64>>,
    /// Plain HTTP (no TLS): every request is redirected to HTTPS (ACME challenges excepted).
    pub redirect_to_https: Option<Spanned<bool>>,
    /// The HTTPS port redirects name; default 443.
    pub https_port: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCertificate {
    pub names: Spanned<Vec<Spanned<String>>>,
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawOrigin {
    pub name: Spanned<String>,
    pub address: Spanned<String>,
    pub server_name: Spanned<String>,
    pub ca: Option<Spanned<String>>,
    /// Certificate chain (PEM) the edge presents to an origin that asks for one.
    pub client_cert: Option<Spanned<String>>,
    /// Its private key (PEM).
    pub client_key: Option<Spanned<String>>,
    pub protocol: Option<Spanned<String>>,
    pub warm_connections: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub standby_connections: Option<Spanned<i64>>,
    pub queue_size: Option<Spanned<i64>>,
    pub connect_timeout: RawDuration,
    pub first_byte_timeout: RawDuration,
    pub idle_timeout: RawDuration,
    pub queue_timeout: RawDuration,
    pub tunnel_idle_timeout: RawDuration,
    pub keepalive_interval: RawDuration,
    pub keepalive_timeout: RawDuration,
    pub max_connection_age: RawDuration,
    /// How long the origin keeps an idle connection (its keep-alive timeout), when known.
    pub origin_idle_timeout: RawDuration,
    pub health_path: Option<Spanned<String>>,
    pub health_interval: RawDuration,
    pub unhealthy_after: Option<Spanned<i64>>,
    pub healthy_after: Option<Spanned<i64>>,
    pub warm_ratio: Option<Spanned<f64>>,
    /// `false`: no pool at all, a new connection per request (for comparisons, e.g. `demo`).
    pub pooling: Option<Spanned<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    pub hosts: Spanned<Vec<Spanned<String>>>,
    pub origins: Spanned<Vec<Spanned<String>>>,
    /// Largest request body accepted: bytes, or text with a unit.
    pub max_body_size: Option<Spanned<RawSize>>,
    /// Requests per client over a period, with a burst.
    pub rate_limit: Option<Spanned<RawRateLimit>>,
    /// `Strict-Transport-Security` for HTTPS answers that have none.
    pub hsts: Option<Spanned<String>>,
    /// Fields set (replaced) on requests to the origin: name -> value.
    pub request_headers: Option<Spanned<RawHeaders>>,
    /// Fields removed from requests to the origin.
    pub remove_request_headers: Option<Spanned<Vec<Spanned<String>>>>,
    /// Fields set (replaced) on the origin's answers.
    pub response_headers: Option<Spanned<RawHeaders>>,
    /// Fields removed from the origin's answers.
    pub remove_response_headers: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `request_headers` / `response_headers`: field name -> value.
pub type RawHeaders = std::collections::BTreeMap<String, Spanned<String>>;

/// `rate_limit = { requests = 100, per = "1s", burst = 200 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub requests: Spanned<i64>,
    pub per: RawDuration,
    pub burst: Option<Spanned<i64>>,
    pub max_clients: Option<Spanned<i64>>,
}

/// A size as written: a number of bytes or text with a unit, parsed during validation.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(i64),
    Text(String),
}

/// `[dns] glue`: nameserver name -> addresses.
pub type RawGlue = std::collections::BTreeMap<String, Spanned<Vec<Spanned<String>>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub listen: Spanned<String>,
    pub zone: Spanned<String>,
    pub names: Spanned<Vec<Spanned<String>>>,
    pub ttl: RawDuration,
    pub regenerate_every: RawDuration,
    pub health_interval: RawDuration,
    pub health_timeout: RawDuration,
    pub unhealthy_after: Option<Spanned<i64>>,
    pub healthy_after: Option<Spanned<i64>>,
    pub regions: Spanned<String>,
    /// Static records of the zone (RFC 1035 master file), read with the region file.
    pub zone_file: Option<Spanned<String>>,
    /// Nameserver names published at the apex (NS records); default `ns1.<zone>`.
    pub nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    /// Addresses of in-zone nameservers (glue): name -> IPv4/IPv6 addresses.
    pub glue: Option<Spanned<RawGlue>>,
    /// SOA RNAME; default `hostmaster.<zone>`.
    pub hostmaster: Option<Spanned<String>>,
    /// CA for the HTTPS health checks of PoPs; default: the system's roots.
    pub health_ca: Option<Spanned<String>>,
    /// UDP worker threads (one socket each, SO_REUSEPORT); default: one per core.
    pub udp_workers: Option<Spanned<i64>>,
    /// How the UDP workers receive and send: "auto" (default), "io_uring" or "recvmmsg".
    pub udp_io: Option<Spanned<String>>,
    /// How long an io_uring worker, once woken, waits for more queries before answering;
    /// default "0s" (answer at once).
    pub udp_coalesce: RawDuration,
    /// The sidecar's own admin address, for a file that holds both roles (`serve` takes
    /// `[admin] listen`); default: `[admin] listen`.
    pub admin_listen: Option<Spanned<String>>,
    /// Name server identifier answered to queries that ask for it (RFC 5001 NSID).
    pub nsid: Option<Spanned<String>>,
    /// Key file for DNS server cookies shared by the sidecars behind one address.
    pub cookie_keys: Option<Spanned<String>>,
    /// UDP answers larger than this go truncated to queries without a valid server cookie.
    pub max_nocookie_response: Option<Spanned<i64>>,
    /// Response rate limiting for UDP answers.
    pub rate_limit: Option<Spanned<RawDnsRateLimit>>,
}

/// `[dns] rate_limit = { responses = 20, per = "1s", burst = 20, slip = 2, ipv4_prefix = 24,
/// ipv6_prefix = 56 }`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDnsRateLimit {
    pub responses: Spanned<i64>,
    pub per: RawDuration,
    pub burst: Option<Spanned<i64>>,
    pub nodata: Option<Spanned<i64>>,
    pub nxdomains: Option<Spanned<i64>>,
    pub errors: Option<Spanned<i64>>,
    pub slip: Option<Spanned<i64>>,
    pub ipv4_prefix: Option<Spanned<i64>>,
    pub ipv6_prefix: Option<Spanned<i64>>,
    pub exempt: Option<Vec<Spanned<String>>>,
}
