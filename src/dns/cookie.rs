//! DNS Cookies (RFC 7873) with interoperable server cookies (RFC 9018, `domain`'s
//! implementation): a query with a COOKIE option gets its client cookie back with a fresh
//! server cookie, SipHash-2-4 of the client cookie, a timestamp and the client's address under
//! the sidecar's secret. The echo is what lets a resolver tell our answers from off-path
//! forgeries. A server cookie that comes back is checked, but only to count it: no query is
//! refused for lacking a valid one (BIND's and Knot's default), as the sidecar's answers are
//! too small to be worth amplifying.

use domain::base::opt::cookie::{ClientCookie, ServerCookie, StandardServerCookie};
use domain::base::Serial;
use domain::dep::octseq::Parser;
use std::net::IpAddr;

/// Length of the option we send: an 8-octet client cookie and a 16-octet server cookie.
pub const ANSWER_LEN: usize = 24;
/// RFC 9018 4.3: a server cookie older than an hour, or more than five minutes ahead, is
/// not valid.
const MAX_AGE_SECS: i64 = 3600;
const MAX_AHEAD_SECS: i64 = 300;

/// The SipHash key of the server cookies, random per process.
#[derive(Clone)]
pub struct CookieSecret([u8; 16]);

impl CookieSecret {
    pub fn random() -> Self {
        CookieSecret(rand::random())
    }

    #[cfg(test)]
    pub fn from_bytes(b: [u8; 16]) -> Self {
        CookieSecret(b)
    }
}

impl std::fmt::Debug for CookieSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CookieSecret(..)")
    }
}

/// What the query's server cookie was, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CookieState {
    /// A client cookie alone: a client that has not heard from us yet (or forgot).
    ClientOnly,
    /// Ours, from this process, within its lifetime.
    Valid,
    /// Not ours, too old, or from before a restart (the secret changed).
    Invalid,
}

impl CookieState {
    pub const ALL: [CookieState; 3] = [
        CookieState::ClientOnly,
        CookieState::Valid,
        CookieState::Invalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CookieState::ClientOnly => "client_only",
            CookieState::Valid => "valid",
            CookieState::Invalid => "invalid",
        }
    }
}

/// A COOKIE option as received, lengths checked.
#[derive(Debug, Clone, Copy)]
pub struct CookieIn {
    client: ClientCookie,
    server: Option<Server>,
}

#[derive(Debug, Clone, Copy)]
enum Server {
    Standard(StandardServerCookie),
    /// 8 to 32 octets but not RFC 9018's 16: some other server's, never valid here.
    Foreign,
}

impl CookieIn {
    /// RFC 7873 5.2.2: a client cookie of 8 octets, alone or followed by a server cookie
    /// of 8 to 32; any other length is a FORMERR (`None`).
    pub fn parse(value: &[u8]) -> Option<Self> {
        if !matches!(value.len(), 8 | 16..=40) {
            return None;
        }
        let mut p = Parser::from_ref(value);
        let client = ClientCookie::parse(&mut p).ok()?;
        let server = ServerCookie::parse_opt(&mut p).ok()?.map(|s| {
            s.try_to_standard()
                .map_or(Server::Foreign, Server::Standard)
        });
        Some(CookieIn { client, server })
    }

    /// The option data to answer with (client cookie + a fresh server cookie for `client_ip`
    /// at `now`, seconds since the epoch) and what the query brought.
    pub fn answer(
        &self,
        client_ip: IpAddr,
        secret: &CookieSecret,
        now: u32,
    ) -> ([u8; ANSWER_LEN], CookieState) {
        let state = match self.server {
            None => CookieState::ClientOnly,
            Some(Server::Standard(s))
                if fresh(s.timestamp().into_int(), now)
                    && s.check_hash(self.client, client_ip, &secret.0) =>
            {
                CookieState::Valid
            }
            Some(_) => CookieState::Invalid,
        };
        let server =
            StandardServerCookie::calculate(self.client, Serial(now), client_ip, &secret.0);
        let mut out = [0u8; ANSWER_LEN];
        out[..8].copy_from_slice(self.client.as_ref());
        out[8..].copy_from_slice(ServerCookie::from(server).as_ref());
        (out, state)
    }
}

/// Whether a cookie made at `made` (serial-number arithmetic on 32-bit seconds) is still
/// good at `now`.
fn fresh(made: u32, now: u32) -> bool {
    let age = i64::from(now.wrapping_sub(made) as i32);
    (-MAX_AHEAD_SECS..=MAX_AGE_SECS).contains(&age)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    /// RFC 9018 appendix A.
    const SECRET: [u8; 16] = [
        0xe5, 0xe9, 0x73, 0xe5, 0xa6, 0xb2, 0xa4, 0x3f, 0x48, 0xe7, 0xdc, 0x84, 0x9e, 0x37, 0xbf,
        0xcf,
    ];
    const CLIENT_1: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 100));
    const CLIENT_2: IpAddr = IpAddr::V4(Ipv4Addr::new(203, 0, 113, 203));

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn answer(query: &str, ip: IpAddr, now: u32) -> (Vec<u8>, CookieState) {
        let c = CookieIn::parse(&hex(query)).unwrap();
        let (out, state) = c.answer(ip, &CookieSecret::from_bytes(SECRET), now);
        (out.to_vec(), state)
    }

    #[test]
    fn rfc_9018_test_vectors() {
        // A.1: a new client learns its server cookie.
        assert_eq!(
            answer("2464c4abcf10c957", CLIENT_1, 1559731985),
            (
                hex("2464c4abcf10c957010000005cf79f111f8130c3eee29480"),
                CookieState::ClientOnly
            )
        );
        // A.2: it comes back 40 minutes later and gets a renewed one.
        assert_eq!(
            answer(
                "2464c4abcf10c957010000005cf79f111f8130c3eee29480",
                CLIENT_1,
                1559734385
            ),
            (
                hex("2464c4abcf10c957010000005cf7a871d4a564a1442aca77"),
                CookieState::Valid
            )
        );
        // A.3: another client, whose cookie came from a server of the set that sets reserved
        // octets, 1 h 52 min earlier: past the hour, so counted invalid, but renewed all the same.
        let a3 = "fc93fc62807ddb8601abcdef5cf78f71a314227b6679ebf5";
        assert_eq!(
            answer(a3, CLIENT_2, 1559734700),
            (
                hex("fc93fc62807ddb86010000005cf7a9acf73a7810aca2381e"),
                CookieState::Invalid
            )
        );
        // Within the hour its hash (over those reserved octets) checks out.
        assert_eq!(answer(a3, CLIENT_2, 1559727985 + 60).1, CookieState::Valid);
    }

    #[test]
    fn a_cookie_from_another_address_a_secret_or_an_hour_ago_is_invalid() {
        let q = "2464c4abcf10c957010000005cf79f111f8130c3eee29480";
        assert_eq!(answer(q, CLIENT_2, 1559731985).1, CookieState::Invalid);
        assert_eq!(
            answer(q, CLIENT_1, 1559731985 + 3601).1,
            CookieState::Invalid
        );
        assert_eq!(
            answer(q, CLIENT_1, 1559731985 - 301).1,
            CookieState::Invalid
        );
        assert_eq!(answer(q, CLIENT_1, 1559731985 - 300).1, CookieState::Valid);
        let c = CookieIn::parse(&hex(q)).unwrap();
        let other = CookieSecret::from_bytes([7; 16]);
        assert_eq!(
            c.answer(CLIENT_1, &other, 1559731985).1,
            CookieState::Invalid
        );
        // A foreign (non-RFC 9018 length) server cookie is accepted but never valid.
        assert_eq!(
            answer("2464c4abcf10c9570102030405060708", CLIENT_1, 1).1,
            CookieState::Invalid
        );
    }

    #[test]
    fn only_rfc_7873_lengths_parse() {
        for len in 0..=48 {
            let ok = CookieIn::parse(&vec![1u8; len]).is_some();
            assert_eq!(ok, len == 8 || (16..=40).contains(&len), "length {len}");
        }
    }

    #[test]
    fn the_secret_stays_out_of_debug_output() {
        assert_eq!(
            format!("{:?}", CookieSecret::from_bytes(SECRET)),
            "CookieSecret(..)"
        );
    }
}
