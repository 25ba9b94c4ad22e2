//! TLS session-ticket keys shared by the instances of a PoP, so a client resumes whichever
//! instance the L4 balancer picks. The key file holds one key per line, 96 hex digits
//! (a 16-byte key name and a 32-byte ChaCha20-Poly1305 key); `#` starts a comment. The first
//! key encrypts new tickets, every key decrypts: rotate by adding a new first line on every
//! instance, then removing the last one a ticket lifetime later. Generate a key with
//! `head -c 48 /dev/urandom | xxd -p -c 48`.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use std::fmt;
use std::path::{Path, PathBuf};

/// How long clients may keep a ticket (rustls' own ticketer uses 6 hours too).
const LIFETIME_SECS: u32 = 6 * 60 * 60;
const NAME_LEN: usize = 16;
const KEY_LEN: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum TicketKeyError {
    #[error("ticket key file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("ticket key file {}:{line}: expected 96 hex digits (16-byte name + 32-byte key)", path.display())]
    Malformed { path: PathBuf, line: usize },
    #[error("ticket key file {} holds no key", path.display())]
    Empty { path: PathBuf },
}

struct Key {
    name: [u8; NAME_LEN],
    aead: LessSafeKey,
}

/// Ticket encryption with keys from a file; plugged into rustls as its ticketer.
pub struct FileTicketer {
    keys: Vec<Key>,
    rng: SystemRandom,
}

impl fmt::Debug for FileTicketer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material.
        f.debug_struct("FileTicketer")
            .field("keys", &self.keys.len())
            .finish()
    }
}

impl FileTicketer {
    pub fn load(path: &Path) -> Result<FileTicketer, TicketKeyError> {
        let lines = crate::config::key_file::read_hex_lines(path).map_err(|source| {
            TicketKeyError::Read {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let mut keys = Vec::new();
        for l in lines {
            let malformed = || TicketKeyError::Malformed {
                path: path.to_path_buf(),
                line: l.line,
            };
            let bytes = l
                .bytes
                .filter(|b| b.len() == NAME_LEN + KEY_LEN)
                .ok_or_else(malformed)?;
            let mut name = [0u8; NAME_LEN];
            name.copy_from_slice(&bytes[..NAME_LEN]);
            let unbound =
                UnboundKey::new(&CHACHA20_POLY1305, &bytes[NAME_LEN..]).map_err(|_| malformed())?;
            keys.push(Key {
                name,
                aead: LessSafeKey::new(unbound),
            });
        }
        if keys.is_empty() {
            return Err(TicketKeyError::Empty {
                path: path.to_path_buf(),
            });
        }
        Ok(FileTicketer {
            keys,
            rng: SystemRandom::new(),
        })
    }
}

impl rustls::server::ProducesTickets for FileTicketer {
    fn enabled(&self) -> bool {
        true
    }

    fn lifetime(&self) -> u32 {
        LIFETIME_SECS
    }

    /// name || nonce || ciphertext+tag, the name also authenticated as associated data.
    fn encrypt(&self, plain: &[u8]) -> Option<Vec<u8>> {
        let key = self.keys.first()?;
        let mut nonce = [0u8; NONCE_LEN];
        self.rng.fill(&mut nonce).ok()?;
        let mut out = Vec::with_capacity(NAME_LEN + NONCE_LEN + plain.len() + 16);
        out.extend_from_slice(&key.name);
        out.extend_from_slice(&nonce);
        let mut body = plain.to_vec();
        key.aead
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&key.name),
                &mut body,
            )
            .ok()?;
        out.extend_from_slice(&body);
        Some(out)
    }

    fn decrypt(&self, cipher: &[u8]) -> Option<Vec<u8>> {
        let name = cipher.get(..NAME_LEN)?;
        let nonce = cipher.get(NAME_LEN..NAME_LEN + NONCE_LEN)?;
        let sealed = cipher.get(NAME_LEN + NONCE_LEN..)?;
        let key = self.keys.iter().find(|k| k.name == name)?;
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = sealed.to_vec();
        let plain = key
            .aead
            .open_in_place(nonce, Aad::from(&key.name), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::server::ProducesTickets;

    fn file(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("keys");
        std::fs::write(&p, text).expect("write");
        (dir, p)
    }

    const K1: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f";
    const K2: &str = "ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f202122232425262728292a2b2c2d2e2f";

    #[test]
    fn tickets_from_one_instance_open_on_another_with_the_same_file() {
        let (_d, p) = file(&format!("# shared\n{K1}\n"));
        let a = FileTicketer::load(&p).expect("keys");
        let b = FileTicketer::load(&p).expect("keys");
        let t = a.encrypt(b"session state").expect("ticket");
        assert_eq!(b.decrypt(&t).as_deref(), Some(&b"session state"[..]));
        let mut tampered = t.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        assert_eq!(b.decrypt(&tampered), None);
        assert_eq!(b.decrypt(&t[..10]), None);
    }

    #[test]
    fn after_rotation_old_tickets_still_open() {
        let (_d, p) = file(&format!("{K1}\n"));
        let old = FileTicketer::load(&p)
            .expect("keys")
            .encrypt(b"x")
            .expect("ticket");
        let (_d2, p2) = file(&format!("{K2}\n{K1}\n"));
        let rotated = FileTicketer::load(&p2).expect("keys");
        assert_eq!(rotated.decrypt(&old).as_deref(), Some(&b"x"[..]));
    }

    #[test]
    fn malformed_lines_are_reported_by_number() {
        let (_d, p) = file(&format!("{K1}\nnot hex\n"));
        let e = FileTicketer::load(&p).expect_err("malformed");
        assert!(
            e.to_string()
                .ends_with(":2: expected 96 hex digits (16-byte name + 32-byte key)"),
            "{e}"
        );
        let (_d, p) = file("# nothing\n");
        assert!(matches!(
            FileTicketer::load(&p),
            Err(TicketKeyError::Empty { .. })
        ));
    }
}
