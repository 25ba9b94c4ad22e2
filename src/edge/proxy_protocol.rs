//! The PROXY protocol (HAProxy's; v1 text and v2 binary headers). A layer-4 balancer that
//! terminates TCP in front of the edge (a cloud network balancer, HAProxy in TCP mode) loses
//! the client's address; with the protocol it writes a header carrying that address before the
//! client's TLS bytes. On a listener with `proxy_protocol = true` every connection must start
//! with one, and its source address becomes the client's address for X-Forwarded-For, the
//! access log and the logs, as with nginx's `listen ... proxy_protocol` or HAProxy's
//! `accept-proxy`. A `LOCAL` header (the balancer's own health check) or an `UNKNOWN` one keeps
//! the socket's peer address. The `ppp` crate parses; this module only finds where the header
//! ends without taking a byte of what follows it.

use ppp::{v1, v2, HeaderResult, PartialResult};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

/// Longest header taken: v1 is at most 107 bytes; v2 is 16 plus its addresses and TLVs, which
/// balancers keep to a few hundred bytes.
const MAX_HEADER: usize = 4096;
/// Pause between looks at a header that arrived in pieces (see `read`).
const PARTIAL_RETRY: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum ProxyHeaderError {
    #[error("reading the PROXY protocol header: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a PROXY protocol header: {0}")]
    Invalid(String),
    #[error("connection closed before the PROXY protocol header ended")]
    Closed,
    #[error("PROXY protocol header longer than {MAX_HEADER} bytes")]
    TooLong,
}

/// Reads the header off `tcp`, leaving the bytes after it for TLS. Returns the client's
/// address, or `None` when the header carries none (LOCAL, UNKNOWN, a non-IP family).
/// Callers bound it with a timeout.
pub async fn read(tcp: &mut TcpStream) -> Result<Option<SocketAddr>, ProxyHeaderError> {
    let mut buf = vec![0u8; MAX_HEADER];
    loop {
        // Peek, so that the TLS bytes sent right behind the header stay in the socket.
        let n = tcp.peek(&mut buf).await?;
        if n == 0 {
            return Err(ProxyHeaderError::Closed);
        }
        let found = match HeaderResult::parse(&buf[..n]) {
            parsed if parsed.is_incomplete() => None,
            HeaderResult::V1(Ok(h)) => Some((h.header.len(), v1_source(&h.addresses))),
            HeaderResult::V2(Ok(h)) => Some((h.len(), v2_source(&h))),
            HeaderResult::V1(Err(e)) => return Err(ProxyHeaderError::Invalid(e.to_string())),
            HeaderResult::V2(Err(e)) => return Err(ProxyHeaderError::Invalid(e.to_string())),
        };
        match found {
            Some((len, source)) => {
                tcp.read_exact(&mut buf[..len]).await?;
                return Ok(source);
            }
            None if n == buf.len() => return Err(ProxyHeaderError::TooLong),
            // Senders write the header at once; one that did not sends the rest right after.
            // A peek returns at once while any byte waits, so the retries are paced.
            None => tokio::time::sleep(PARTIAL_RETRY).await,
        }
    }
}

fn v1_source(addresses: &v1::Addresses) -> Option<SocketAddr> {
    match addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

fn v2_source(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match &header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    /// Sends `pieces` (with a pause between them) and then "TLS", reads the header on the
    /// other end, and returns what `read` gave and the bytes left behind it.
    async fn exchange(pieces: &[&[u8]]) -> (Result<Option<SocketAddr>, String>, Vec<u8>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pieces: Vec<Vec<u8>> = pieces.iter().map(|p| p.to_vec()).collect();
        let sender = tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for p in pieces {
                s.write_all(&p).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            s.write_all(b"TLS").await.unwrap();
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
        let (got, rest) = exchange(&[b"PROXY TCP4 192.0.2", b".7 127.0.0.1 5555 443\r\n"]).await;
        assert_eq!(got, Ok(Some("192.0.2.7:5555".parse().unwrap())));
        assert_eq!(rest, b"TLS");
    }

    #[tokio::test]
    async fn anything_else_is_refused() {
        // A TLS ClientHello's first bytes, a broken v1 line, a v2 signature with a bad version.
        for bad in [
            &b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"[..],
            b"PROXY TCP4 192.0.2.7 nonsense 5555 443\r\n",
            b"\r\n\r\n\x00\r\nQUIT\n\x31\x11\x00\x0c",
        ] {
            let (got, _) = exchange(&[bad]).await;
            assert!(
                got.as_ref()
                    .is_err_and(|e| e.starts_with("not a PROXY protocol header")),
                "{bad:?}: {got:?}"
            );
        }
        // Cut short, then nothing: waited for until the caller's timeout.
        let (got, _) = exchange(&[b"PROXY TCP4 192.0.2.7 127.0.0.1"]).await;
        assert!(got.is_err(), "{got:?}");
    }
}
