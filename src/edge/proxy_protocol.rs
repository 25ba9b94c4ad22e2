//! The PROXY protocol (HAProxy's; v1 text and v2 binary headers). A layer-4 balancer that
//! terminates TCP in front of the edge (a cloud network balancer, HAProxy in TCP mode) loses
//! the client's address; with the protocol it writes a header carrying that address before the
//! client's TLS bytes. On a listener with `proxy_protocol = true` every connection must start
//! with one, and its source address becomes the client's address for X-Forwarded-For, the
//! access log and the logs, as with nginx's `listen ... proxy_protocol` or HAProxy's
//! `accept-proxy`. A `LOCAL` header (the balancer's own health check) or an `UNKNOWN` one keeps
//! the socket's peer address. The `ppp` crate parses; this module only finds where the header
//! ends without taking a byte of what follows it.

use ppp::{v1, v2, HeaderResult};
use std::net::SocketAddr;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest header taken: v1 is at most 107 bytes by the spec; v2 is 16 plus its addresses
/// and TLVs, which balancers keep to a few hundred bytes (the spec allows up to 64 KiB).
const MAX_HEADER: usize = 4096;
const V1_MAX: usize = 107;
/// The fixed part of a v2 header: signature, version and command, family, length.
const V2_FIXED: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a PROXY protocol header: starts with byte {0:#04x}")]
    NotAHeader(u8),
    #[error("not a PROXY protocol header: {0}")]
    V1(#[source] v1::BinaryParseError),
    #[error("not a PROXY protocol header: {0}")]
    V2(#[source] v2::ParseError),
    #[error("not a PROXY protocol header: a v2 header where a v1 line was")]
    NotV1,
    /// Closed before sending a byte: a balancer's TCP health check or a port scan.
    #[error("connection closed before sending anything")]
    Empty,
    #[error("connection closed within the PROXY protocol header")]
    Closed,
    #[error("PROXY protocol header longer than {0} bytes")]
    TooLong(usize),
    #[error("no complete PROXY protocol header within {0:?}")]
    Timeout(std::time::Duration),
}

/// Reads the header off `tcp`, leaving the bytes after it for TLS. Returns the client's
/// address, or `None` when the header carries none (LOCAL, UNKNOWN, a non-IP family).
/// Callers bound it with a timeout.
pub async fn read(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut first = [0u8; 1];
    match tcp.peek(&mut first).await? {
        0 => Err(ProxyHeaderError::Empty),
        _ if first[0] == b'\r' => read_v2(tcp).await,
        _ if first[0] == b'P' => read_v1(tcp).await,
        _ => Err(ProxyHeaderError::NotAHeader(first[0])),
    }
}

/// A v2 header states its length in its fixed part, so exactly the header is read.
async fn read_v2(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; V2_FIXED];
    read_exact(tcp, &mut buf).await?;
    let len = V2_FIXED + usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_HEADER {
        return Err(ProxyHeaderError::TooLong(MAX_HEADER));
    }
    buf.resize(len, 0);
    read_exact(tcp, &mut buf[V2_FIXED..]).await?;
    match v2::Header::try_from(&buf[..]) {
        Ok(h) => Ok(v2_source(&h)),
        Err(e) => Err(ProxyHeaderError::V2(e)),
    }
}

/// A v1 header ends at its line feed: the bytes up to it are taken as they arrive (peeked
/// first, so nothing after the line is taken), then the line is parsed once, whole.
async fn read_v1(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut line = Vec::with_capacity(V1_MAX);
    let mut peeked = [0u8; V1_MAX];
    loop {
        let room = V1_MAX - line.len();
        let n = tcp.peek(&mut peeked[..room]).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let end = peeked[..n].iter().position(|&b| b == b'\n');
        let take = end.map_or(n, |i| i + 1);
        let start = line.len();
        line.resize(start + take, 0);
        read_exact(tcp, &mut line[start..]).await?;
        if end.is_some() {
            break;
        }
        if line.len() == V1_MAX {
            return Err(ProxyHeaderError::TooLong(V1_MAX));
        }
    }
    // The whole line is here: anything but a header is final.
    match HeaderResult::parse(&line) {
        HeaderResult::V1(Ok(h)) => Ok(v1_source(&h.addresses)),
        HeaderResult::V1(Err(e)) => Err(ProxyHeaderError::V1(e)),
        HeaderResult::V2(_) => Err(ProxyHeaderError::NotV1),
    }
}

async fn read_exact(tcp: &mut TcpStream, buf: &mut [u8]) -> Result<(), ProxyHeaderError> {
    match tcp.read_exact(buf).await {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ProxyHeaderError::Closed),
        Err(e) => Err(e.into()),
    }
}

/// IPv4 clients stay IPv4 when a balancer writes them as IPv6 (`::ffff:192.0.2.7`).
fn client(ip: std::net::IpAddr, port: u16) -> SocketAddr {
    SocketAddr::new(ip.to_canonical(), port)
}

fn v1_source(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(client(a.source_address.into(), a.source_port)),
        v1::Addresses::Tcp6(a) => Some(client(a.source_address.into(), a.source_port)),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match &header.addresses {
        v2::Addresses::IPv4(a) => Some(client(a.source_address.into(), a.source_port)),
        v2::Addresses::IPv6(a) => Some(client(a.source_address.into(), a.source_port)),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// Sends `pieces` (with a pause between them) and then "TLS" (nothing at all without
    /// pieces), reads the header on the other end, and returns what `read` gave and the bytes
    /// left behind it.
    async fn exchange(pieces: &[&[u8]]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let pieces_sent_nothing = pieces.is_empty();
        let sender = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for p in pieces {
                s.write_all(&p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if !pieces_sent_nothing {
                s.write_all(b"TLS").await.unwrap();
            }
            s.shutdown().await.unwrap();
        });
        let (mut tcp, _) = listener.accept().await.unwrap();
        // Bounded as the listener bounds it (by its handshake timeout): a header cut short
        // keeps the reader waiting for its end.
        let got = match tokio::time::timeout(Duration::from_secs(1), read(&mut tcp)).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err("timed out".to_string()),
        };
        let mut rest = Vec::new();
        if got.is_ok() {
            tcp.read_to_end(&mut rest).await.unwrap();
        }
        sender.await.unwrap();
        (got, rest)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn v1_gives_the_source_address_and_leaves_what_follows() {
        let (got, rest) = exchange(&[b"PROXY TCP4 192.0.2.7 127.0.0.1 5555 443\r\n"]).await;
        assert_eq!(got, Ok(Some("192.0.2.7:5555".parse().unwrap())));
        assert_eq!(rest, b"TLS");
        let (got, _) = exchange(&[b"PROXY TCP6 2001:db8::7 ::1 5555 443\r\n"]).await;
        assert_eq!(got, Ok(Some("[2001:db8::7]:5555".parse().unwrap())));
        let (got, rest) = exchange(&[b"PROXY UNKNOWN\r\n"]).await;
        assert_eq!(got, Ok(None));
        assert_eq!(rest, b"TLS");
    }

    #[tokio::test]
    async fn v2_gives_the_source_address_and_local_gives_none() {
        let proxy = v2::Builder::with_addresses(
            v2::Version::Two | v2::Command::Proxy,
            v2::Protocol::Stream,
            (addr("[2001:db8::9]:40000"), addr("[::1]:443")),
        )
        .write_tlv(v2::Type::NoOp, b"pad")
        .unwrap()
        .build()
        .unwrap();
        let (got, rest) = exchange(&[&proxy]).await;
        assert_eq!(got, Ok(Some(addr("[2001:db8::9]:40000"))));
        assert_eq!(rest, b"TLS");
        let local = v2::Builder::new(
            v2::Version::Two | v2::Command::Local,
            v2::AddressFamily::Unspecified | v2::Protocol::Unspecified,
        )
        .build()
        .unwrap();
        let (got, rest) = exchange(&[&local]).await;
        assert_eq!(got, Ok(None));
        assert_eq!(rest, b"TLS");
    }

    #[tokio::test]
    async fn a_header_in_pieces_is_waited_for() {
        use std::os::fd::AsRawFd;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut tcp, _) = listener.accept().await.unwrap();
        let fd = tcp.as_raw_fd();
        let reader = tokio::spawn(async move {
            let got = read(&mut tcp).await.map_err(|e| e.to_string());
            let mut rest = Vec::new();
            tcp.read_to_end(&mut rest).await.unwrap();
            (got, rest)
        });
        client.write_all(b"PROXY TCP4 192.0.2").await.unwrap();
        // The second piece goes only once the reader has taken the first off the socket, so
        // the header really arrives in two reads.
        let unread = || {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one c_int; `fd` stays open while the reader holds it.
            unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n) };
            n
        };
        for _ in 0..10_000 {
            if unread() == 0 {
                break;
            }
            tokio::task::yield_now().await;
        }
        assert_eq!(unread(), 0, "the reader never took the first piece");
        client
            .write_all(b".7 127.0.0.1 5555 443\r\nTLS")
            .await
            .unwrap();
        client.shutdown().await.unwrap();
        let (got, rest) = reader.await.unwrap();
        assert_eq!(got, Ok(Some("192.0.2.7:5555".parse().unwrap())));
        assert_eq!(rest, b"TLS");
    }

    #[tokio::test]
    async fn ipv4_clients_written_as_ipv6_stay_ipv4() {
        let (got, _) = exchange(&[b"PROXY TCP6 ::ffff:192.0.2.7 ::1 5555 443\r\n"]).await;
        assert_eq!(got, Ok(Some(addr("192.0.2.7:5555"))));
    }

    #[tokio::test]
    async fn anything_else_is_refused_at_once() {
        let bad_v2_version = [&b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c"[..], &[0; 12]].concat();
        let cases: [(&[u8], &str); 6] = [
            // A TLS ClientHello: no header at all.
            (
                b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
                "not a PROXY",
            ),
            (b"PROXY TCP4 192.0.2.7 nonsense 5555 443\r\n", "not a PROXY"),
            // Complete lines with fields missing: refused, not waited on.
            (b"PROXY TCP4 192.0.2.7\r\n", "not a PROXY"),
            (&bad_v2_version, "not a PROXY"),
            (&[b'P'; 200], "PROXY protocol header longer than 107"),
            (
                b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff",
                "PROXY protocol header longer than 4096",
            ),
        ];
        for (bad, want) in cases {
            let (got, _) = exchange(&[bad]).await;
            assert!(
                got.as_ref().is_err_and(|e| e.starts_with(want)),
                "{bad:?}: {got:?}"
            );
        }
    }

    #[tokio::test]
    async fn cut_short_or_empty_connections_are_told_apart() {
        let (got, _) = exchange(&[]).await;
        assert_eq!(got, Err("connection closed before sending anything".into()));
        // Cut short then closed: the "TLS" sent after it ends the line without a line feed.
        let (got, _) = exchange(&[b"PROXY TCP4 192.0.2.7 127.0.0.1"]).await;
        assert_eq!(
            got,
            Err("connection closed within the PROXY protocol header".into())
        );
    }
}
