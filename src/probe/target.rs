//! What is probed and where it lives: URL parsing, `--resolve` overrides, and name resolution
//! (system resolver, or one DNS server over UDP with an optional ECS subnet, via hickory-proto).

use super::ProbeError;
use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{ClientSubnet, EdnsOption};
use hickory_proto::rr::{Name, RData, RecordType};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;
use tokio::net::UdpSocket;

/// One URL to probe.
#[derive(Debug, Clone)]
pub struct Target {
    url: String,
    host: String,
    port: u16,
    tls: bool,
    /// Origin-form request target (`/path?query`).
    path: String,
}

impl Target {
    /// `https://host[:port][/path]` (or `http://`, probed without the TLS phase).
    pub fn parse(url: &str) -> Result<Target, ProbeError> {
        let bad = |reason: &str| ProbeError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a valid URL"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(bad("scheme must be https:// or http://")),
        };
        let host = uri.host().ok_or_else(|| bad("no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let path = uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| "/".to_string());
        Ok(Target {
            url: url.to_string(),
            host,
            port,
            tls,
            path,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }
    pub fn host(&self) -> &str {
        &self.host
    }
    pub fn port(&self) -> u16 {
        self.port
    }
    pub fn is_tls(&self) -> bool {
        self.tls
    }
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `host[:port]` as it goes in `Host` / `:authority` (IPv6 in brackets).
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let default = if self.tls { 443 } else { 80 };
        if self.port == default {
            host
        } else {
            format!("{host}:{}", self.port)
        }
    }
}

/// `--resolve HOST:PORT:ADDR` (curl's syntax): connect there instead of resolving HOST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolveOverride {
    pub host: String,
    pub port: u16,
    pub addr: IpAddr,
}

impl FromStr for ResolveOverride {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut it = s.splitn(3, ':');
        let (Some(host), Some(port), Some(addr)) = (it.next(), it.next(), it.next()) else {
            return Err(format!("{s}: expected HOST:PORT:ADDR"));
        };
        if host.is_empty() {
            return Err(format!("{s}: empty HOST"));
        }
        let port = port
            .parse()
            .map_err(|_| format!("{s}: PORT {port:?} is not a port number"))?;
        let addr = addr
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{s}: ADDR {addr:?} is not an IP address"))?;
        Ok(ResolveOverride {
            host: host.to_ascii_lowercase(),
            port,
            addr,
        })
    }
}

/// `--dns SERVER:PORT [--subnet NET]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsServer {
    pub server: SocketAddr,
    /// Sent as EDNS Client Subnet (RFC 7871).
    pub subnet: Option<IpNet>,
}

/// Why a name did not resolve.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("system resolver: {0}")]
    System(#[source] std::io::Error),
    #[error("no address")]
    NoAddress,
    #[error("bad name: {0}")]
    Name(#[source] hickory_proto::error::ProtoError),
    #[error("dns server {server}: {source}")]
    Io {
        server: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("dns server {server}: malformed message: {source}")]
    Wire {
        server: SocketAddr,
        #[source]
        source: hickory_proto::error::ProtoError,
    },
    #[error("dns server {server} answered {code}")]
    Rcode {
        server: SocketAddr,
        code: ResponseCode,
    },
}

/// How a target's address was found.
pub enum Resolution {
    /// An IP literal or a `--resolve` entry: no DNS phase.
    Fixed(SocketAddr),
    System,
    Server(DnsServer),
}

impl Resolution {
    pub fn for_target(
        target: &Target,
        overrides: &[ResolveOverride],
        dns: Option<&DnsServer>,
    ) -> Resolution {
        if let Ok(ip) = target.host.parse::<IpAddr>() {
            return Resolution::Fixed(SocketAddr::new(ip, target.port));
        }
        let host = target.host.to_ascii_lowercase();
        if let Some(o) = overrides
            .iter()
            .find(|o| o.host == host && o.port == target.port)
        {
            return Resolution::Fixed(SocketAddr::new(o.addr, target.port));
        }
        match dns {
            Some(d) => Resolution::Server(d.clone()),
            None => Resolution::System,
        }
    }

    /// `Fixed` is not a DNS phase (the caller records none).
    pub async fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, DnsError> {
        match self {
            Resolution::Fixed(a) => Ok(*a),
            Resolution::System => tokio::net::lookup_host((host, port))
                .await
                .map_err(DnsError::System)?
                .next()
                .ok_or(DnsError::NoAddress),
            Resolution::Server(d) => {
                let ip = match query(d, host, RecordType::A).await? {
                    Some(ip) => ip,
                    None => query(d, host, RecordType::AAAA)
                        .await?
                        .ok_or(DnsError::NoAddress)?,
                };
                Ok(SocketAddr::new(ip, port))
            }
        }
    }
}

/// One UDP query to one server; the first A/AAAA answer, `None` on NOERROR with no address.
/// The caller bounds it with the probe's timeout.
async fn query(d: &DnsServer, host: &str, rtype: RecordType) -> Result<Option<IpAddr>, DnsError> {
    let server = d.server;
    let io = |source| DnsError::Io { server, source };
    let wire = |source| DnsError::Wire { server, source };
    let name = Name::from_str(host).map_err(DnsError::Name)?;
    let id: u16 = rand::random();
    let mut msg = Message::new();
    msg.set_id(id)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(name, rtype));
    let mut edns = Edns::new();
    edns.set_max_payload(1232);
    if let Some(net) = d.subnet {
        edns.options_mut()
            .insert(EdnsOption::Subnet(ClientSubnet::new(
                net.network(),
                net.prefix_len(),
                0,
            )));
    }
    msg.set_edns(edns);
    let bytes = msg.to_vec().map_err(wire)?;

    let local: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await.map_err(io)?;
    sock.connect(server).await.map_err(io)?;
    sock.send(&bytes).await.map_err(io)?;
    let mut buf = vec![0u8; 4096];
    let reply = loop {
        let n = sock.recv(&mut buf).await.map_err(io)?;
        match Message::from_vec(&buf[..n]) {
            // Stray or spoofed datagrams with another id are ignored, not fatal.
            Ok(m) if m.id() == id && m.message_type() == MessageType::Response => break m,
            Ok(_) => continue,
            Err(e) => return Err(wire(e)),
        }
    };
    if reply.response_code() != ResponseCode::NoError {
        return Err(DnsError::Rcode {
            server,
            code: reply.response_code(),
        });
    }
    Ok(reply.answers().iter().find_map(|r| match r.data() {
        Some(RData::A(a)) => Some(IpAddr::V4(a.0)),
        Some(RData::AAAA(a)) => Some(IpAddr::V6(a.0)),
        _ => None,
    }))
}

/// Default per-phase timeout (also the DNS query's).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_urls_and_defaults_the_path_and_port() {
        let t = Target::parse("https://origin.edgepop.test").expect("url");
        assert_eq!(
            (t.host(), t.port(), t.path()),
            ("origin.edgepop.test", 443, "/")
        );
        assert_eq!(t.authority(), "origin.edgepop.test");
        let t = Target::parse("https://[::1]:8443/a?b=c").expect("url");
        assert_eq!((t.host(), t.port(), t.path()), ("::1", 8443, "/a?b=c"));
        assert_eq!(t.authority(), "[::1]:8443");
        assert!(Target::parse("ftp://x/").is_err());
        assert!(Target::parse("not a url").is_err());
    }

    #[test]
    fn parses_resolve_overrides_like_curl() {
        let o: ResolveOverride = "Example.com:443:[::1]".parse().expect("override");
        assert_eq!(o.host, "example.com");
        assert_eq!(o.addr, "::1".parse::<IpAddr>().expect("ip"));
        assert!("example.com:443".parse::<ResolveOverride>().is_err());
        assert!("example.com:x:127.0.0.1"
            .parse::<ResolveOverride>()
            .is_err());
    }
}
