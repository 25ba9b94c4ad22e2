//! The configuration file exactly as written: serde structs that reject unknown keys and keep
//! the span of everything a later check may need to point at.

use serde::Deserialize;
use std::time::Duration;
use toml::Spanned;

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
    #[serde(default, with = "humantime_serde::option")]
    pub handshake_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub header_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub body_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub send_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub drain_timeout: Option<Duration>,
    /// Client connections open at once; above it the listener stops accepting.
    pub max_connections: Option<Spanned<i64>>,
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
    pub protocol: Option<Spanned<String>>,
    pub warm_connections: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub standby_connections: Option<Spanned<i64>>,
    pub queue_size: Option<Spanned<i64>>,
    #[serde(default, with = "humantime_serde::option")]
    pub connect_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub first_byte_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub queue_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub tunnel_idle_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub keepalive_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub keepalive_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub max_connection_age: Option<Duration>,
    pub health_path: Option<Spanned<String>>,
    #[serde(default, with = "humantime_serde::option")]
    pub health_interval: Option<Duration>,
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
}

/// `[dns] glue`: nameserver name -> addresses.
pub type RawGlue = std::collections::BTreeMap<String, Spanned<Vec<Spanned<String>>>>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDns {
    pub listen: Spanned<String>,
    pub zone: Spanned<String>,
    pub names: Spanned<Vec<Spanned<String>>>,
    #[serde(default, with = "humantime_serde::option")]
    pub ttl: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub regenerate_every: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub health_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde::option")]
    pub health_timeout: Option<Duration>,
    pub unhealthy_after: Option<Spanned<i64>>,
    pub healthy_after: Option<Spanned<i64>>,
    pub regions: Spanned<String>,
    /// Nameserver names published at the apex (NS records); default `ns1.<zone>`.
    pub nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    /// Addresses of in-zone nameservers (glue): name -> IPv4/IPv6 addresses.
    pub glue: Option<Spanned<RawGlue>>,
    /// SOA RNAME; default `hostmaster.<zone>`.
    pub hostmaster: Option<Spanned<String>>,
    /// CA for the HTTPS health checks of PoPs; default: webpki roots.
    pub health_ca: Option<Spanned<String>>,
    /// UDP worker threads (one socket each, SO_REUSEPORT); default: one per core.
    pub udp_workers: Option<Spanned<i64>>,
    /// The sidecar's own admin address, for a file that holds both roles (`serve` takes
    /// `[admin] listen`); default: `[admin] listen`.
    pub admin_listen: Option<Spanned<String>>,
}
