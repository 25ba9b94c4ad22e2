//! `[[listeners]] max_connections_per_client`: how many TCP connections one client may hold
//! open on a listener, as nginx's `limit_conn` keyed by address or HAProxy's
//! `src_conn_cur`, so one client cannot take the listener's whole `max_connections`. A client
//! is an IPv4 address (also when NAT64 writes it as `64:ff9b::a.b.c.d`) or an IPv6 /64 (one
//! subscriber's prefix: a client that changes address within it is still one client), after
//! any PROXY protocol header. A connection over the limit is reset before its TLS handshake,
//! costing the edge no handshake.
//!
//! HTTP/3 connections are not counted: a QUIC client's address is not proven before its
//! handshake, and counting it would let spoofed packets lock a client out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// `64:ff9b::/96`.
const NAT64: [u8; 12] = [0, 0x64, 0xff, 0x9b, 0, 0, 0, 0, 0, 0, 0, 0];

/// A client, as the limit counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum ClientKey {
    V4([u8; 4]),
    /// The /64 prefix.
    V6([u8; 8]),
}

impl ClientKey {
    pub(crate) fn of(ip: IpAddr) -> ClientKey {
        match ip.to_canonical() {
            IpAddr::V4(a) => ClientKey::V4(a.octets()),
            IpAddr::V6(a) => {
                let o = a.octets();
                // NAT64's well-known prefix (RFC 6052) carries IPv4 clients in its last 32
                // bits: each is a client of its own, not all one /64.
                if o[..12] == NAT64[..] {
                    return ClientKey::V4([o[12], o[13], o[14], o[15]]);
                }
                ClientKey::V6([o[0], o[1], o[2], o[3], o[4], o[5], o[6], o[7]])
            }
        }
    }
}

/// Open connections per client on one listener; kept across reloads (the limit itself is
/// read from the settings of the moment). One lock per listener is enough: it is held for
/// one hash-map operation, only when a connection is accepted or closes.
#[derive(Debug, Default)]
pub struct ClientTable {
    open: Mutex<HashMap<ClientKey, usize>>,
}

/// One counted connection; dropping it (when the socket closes) gives it back.
#[derive(Debug)]
pub struct ClientSlot {
    table: Arc<ClientTable>,
    key: ClientKey,
}

impl ClientTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ClientKey, usize>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for one more connection from `ip`, unless it already holds `limit`.
    pub fn try_take(self: &Arc<Self>, ip: IpAddr, limit: usize) -> Option<ClientSlot> {
        let key = ClientKey::of(ip);
        let mut open = self.lock();
        let n = open.get(&key).copied().unwrap_or(0);
        if n >= limit {
            return None;
        }
        open.insert(key, n + 1);
        Some(ClientSlot {
            table: self.clone(),
            key,
        })
    }

    /// Clients with a connection open.
    pub fn clients(&self) -> usize {
        self.lock().values().filter(|&&n| n > 0).count()
    }
}

/// One client's share of a listener's table, for what takes a slot after the connection's
/// own (an h2 WebSocket, which holds a connection's worth of resources on a shared one).
#[derive(Clone, Debug)]
pub struct PerClient {
    pub table: Arc<ClientTable>,
    pub ip: IpAddr,
    pub limit: usize,
}

impl PerClient {
    pub fn take(&self) -> Option<ClientSlot> {
        self.table.try_take(self.ip, self.limit)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut open = self.table.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn each_client_gets_its_own_limit_and_slots_come_back() {
        let t = Arc::new(ClientTable::default());
        let a1 = t.try_take(ip("192.0.2.1"), 2).unwrap();
        let _a2 = t.try_take(ip("192.0.2.1"), 2).unwrap();
        assert!(t.try_take(ip("192.0.2.1"), 2).is_none());
        // Another address is another client; the same one written as IPv6 is not.
        let _b = t.try_take(ip("192.0.2.2"), 2).unwrap();
        assert!(t.try_take(ip("::ffff:192.0.2.1"), 2).is_none());
        drop(a1);
        let _a3 = t.try_take(ip("192.0.2.1"), 2).unwrap();
        assert_eq!(t.clients(), 2);
    }

    #[test]
    fn an_ipv6_client_is_its_64() {
        let t = Arc::new(ClientTable::default());
        let _a = t.try_take(ip("2001:db8:1:2::1"), 1).unwrap();
        assert!(t.try_take(ip("2001:db8:1:2:ffff::9"), 1).is_none());
        let _b = t.try_take(ip("2001:db8:1:3::1"), 1).unwrap();
        // Through NAT64, IPv4 clients are told apart, and match their plain IPv4 selves.
        let _c = t.try_take(ip("64:ff9b::c000:201"), 1).unwrap();
        let _d = t.try_take(ip("64:ff9b::c000:202"), 1).unwrap();
        assert!(t.try_take(ip("192.0.2.1"), 1).is_none());
        drop((_a, _b, _c, _d));
        assert_eq!(
            t.clients(),
            0,
            "entries go once their last connection closes"
        );
    }
}
