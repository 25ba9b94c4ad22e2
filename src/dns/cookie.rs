//! DNS Cookies (RFC 7873) with interoperable server cookies (RFC 9018, `domain`'s
//! implementation): a query with a COOKIE option gets its client cookie back with a fresh
//! server cookie, SipHash-2-4 of the client cookie, a timestamp and the client's address under
//! the sidecar's secret. The echo is what lets a resolver tell our answers from off-path
//! forgeries. A server cookie that comes back is checked, but only to count it: no query is
//! refused for lacking a valid one (BIND's default, `require-server-cookie no`), as the
//! answers are too small to be worth amplifying.
//!
//! The secret is random per process unless `[dns] cookie_keys` names a key file, which the
//! instances behind one address share (RFC 9018's anycast set): one key per line, 32 hex
//! digits (16 bytes), `#` starts a comment; the first key makes server cookies, every key
//! checks them, so a key is rotated by adding a new first line everywhere and removing the
//! old one an hour later. Generate one with `head -c 16 /dev/urandom | xxd -p`.

use domain::base::opt::cookie::{ClientCookie, ServerCookie, StandardServerCookie};
use domain::base::Serial;
use domain::dep::octseq::Parser;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

/// Length of the option we send: an 8-octet client cookie and a 16-octet server cookie.
pub const ANSWER_LEN: usize = 24;
/// RFC 9018 4.3: a server cookie older than an hour, or more than five minutes ahead, is
/// not valid.
const MAX_AGE_SECS: i64 = 3600;
const MAX_AHEAD_SECS: i64 = 300;

const KEY_LEN: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CookieKeyError {
    #[error("cookie key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cookie key file {}:{line}: expected 32 hex digits (a 16-byte SipHash key)", path.display())]
    Malformed { path: PathBuf, line: usize },
    #[error("cookie key file {} holds no key", path.display())]
    Empty { path: PathBuf },
}

/// The SipHash keys of the server cookies: the first makes them, any of them checks them.
#[derive(Clone, PartialEq, Eq)]
pub struct CookieSecret {
    signing: [u8; KEY_LEN],
    /// Older keys still accepted (rotation).
    accepted: Vec<[u8; KEY_LEN]>,
}

impl CookieSecret {
    pub fn random() -> Self {
        Self::from_bytes(rand::random())
    }

    pub fn from_bytes(signing: [u8; KEY_LEN]) -> Self {
        CookieSecret {
            signing,
            accepted: Vec::new(),
        }
    }

    /// Reads a key file (see the module documentation).
    pub fn load(path: &Path) -> Result<Self, CookieKeyError> {
        let lines = crate::config::key_file::read_hex_lines(path).map_err(|source| {
            CookieKeyError::Read {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let mut keys = Vec::new();
        for l in lines {
            let key = l
                .bytes
                .and_then(|b| <[u8; KEY_LEN]>::try_from(b).ok())
                .ok_or_else(|| CookieKeyError::Malformed {
                    path: path.to_path_buf(),
                    line: l.line,
                })?;
            keys.push(key);
        }
        let mut keys = keys.into_iter();
        let signing = keys.next().ok_or_else(|| CookieKeyError::Empty {
            path: path.to_path_buf(),
        })?;
        Ok(CookieSecret {
            signing,
            accepted: keys.collect(),
        })
    }

    fn keys(&self) -> impl Iterator<Item = &[u8; KEY_LEN]> {
        std::iter::once(&self.signing).chain(&self.accepted)
    }
}

impl std::fmt::Debug for CookieSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        write!(f, "CookieSecret({} keys)", 1 + self.accepted.len())
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
                    && secret
                        .keys()
                        .any(|k| s.check_hash(self.client, client_ip, k)) =>
            {
                CookieState::Valid
            }
            Some(_) => CookieState::Invalid,
        };
        let server =
            StandardServerCookie::calculate(self.client, Serial(now), client_ip, &secret.signing);
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

    /// RFC 9018 A.4: an IPv6 client whose cookie was made with the key now rotated out of
    /// first place.
    #[test]
    fn rfc_9018_ipv6_vector_across_a_key_rotation() {
        let client: IpAddr = "2001:db8:220:1:59de:d0f4:8769:82b8".parse().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cookie.keys");
        std::fs::write(
            &path,
            "445536bcd2513298075a5d379663c962\ndd3bdf9344b678b185a6f5cb60fca715\n",
        )
        .unwrap();
        let keys = CookieSecret::load(&path).unwrap();
        let c = CookieIn::parse(&hex("22681ab97d52c298010000005cf7c57926556bd0934c72f8")).unwrap();
        let (out, state) = c.answer(client, &keys, 1559741961);
        assert_eq!(state, CookieState::Valid);
        assert_eq!(
            out.to_vec(),
            hex("22681ab97d52c298010000005cf7c609a6bb79d16625507a")
        );
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
            "CookieSecret(1 keys)"
        );
    }

    #[test]
    fn a_key_file_signs_with_its_first_key_and_accepts_all() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cookie.keys");
        let new = "00112233445566778899aabbccddeeff";
        std::fs::write(
            &path,
            format!("# rotated\n{new}\n\ne5e973e5a6b2a43f48e7dc849e37bfcf # old\n"),
        )
        .unwrap();
        let keys = CookieSecret::load(&path).unwrap();
        // A.2's cookie was made with the old key: still valid, and renewed under the new one.
        let c = CookieIn::parse(&hex("2464c4abcf10c957010000005cf79f111f8130c3eee29480")).unwrap();
        let (out, state) = c.answer(CLIENT_1, &keys, 1559734385);
        assert_eq!(state, CookieState::Valid);
        let (renewed, _) = c.answer(CLIENT_1, &CookieSecret::from_bytes(SECRET), 1559734385);
        assert_ne!(out, renewed, "signed with the first key, not the old one");
        let (again, _) = c.answer(CLIENT_1, &CookieSecret::load(&path).unwrap(), 1559734385);
        assert_eq!(out, again);
        for (text, want) in [
            ("", "holds no key"),
            ("# only a comment\n", "holds no key"),
            ("00112233\n", ":1: expected 32 hex digits"),
            (&format!("{new}\nxyz\n"), ":2: expected 32 hex digits"),
        ] {
            std::fs::write(&path, text).unwrap();
            let e = CookieSecret::load(&path).unwrap_err().to_string();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }
}
