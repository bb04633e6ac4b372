//! Encryption with a key the operator holds (like the seed's VMM certificate): never stored.
//!
//! From one 32-byte secret three independent keys are derived with BLAKE3's key derivation:
//! - the *block-id key*: block ids are keyed BLAKE3 hashes, so equal plaintext under different
//!   keys does not reveal itself;
//! - the *encryption key*: every block frame, pack index and manifest is sealed with
//!   AES-256-GCM (ring; AES-NI/VAES, several GB/s per core) under a random 96-bit nonce
//!   (authenticated: a flipped bit is detected). Random 96-bit nonces keep one key safe for
//!   2^32 sealed objects — 256 TiB of unique 64 KiB blocks; use a new key (re-protect) well
//!   before that;
//! - the *key id*: a public fingerprint naming the store namespace `k/<id>/` the key's data
//!   lives in, so a wrong key is refused by name instead of decrypting garbage.
use std::io::Write;
use std::path::Path;

use std::sync::Arc;

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

/// Bytes an encrypted object is larger than its plaintext (nonce + tag).
pub const SEAL_OVERHEAD: usize = NONCE_LEN + 16;

const FILE_TAG: &str = "ferry-key-v1:";

/// Errors of key handling.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key file cannot be read or written.
    #[error("key file {path}: {reason}")]
    File {
        /// Key file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// An operator's encryption key.
#[derive(Clone)]
pub struct Key {
    secret: [u8; 32],
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Key({})", self.id())
    }
}

impl Key {
    /// A new random key.
    pub fn generate() -> Key {
        Key {
            secret: rand::random(),
        }
    }

    /// Writes a new key to `path` (mode 0600); refuses to overwrite an existing file.
    pub fn create_file(path: &Path) -> Result<Key, KeyError> {
        use std::os::unix::fs::OpenOptionsExt;
        let err = |reason: String| KeyError::File {
            path: path.display().to_string(),
            reason,
        };
        let key = Key::generate();
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::AlreadyExists {
                    err(
                        "already exists; ferry never overwrites a key (pick another file name)"
                            .into(),
                    )
                } else {
                    err(e.to_string())
                }
            })?;
        writeln!(
            f,
            "# ferry encryption key {} — keep it secret, back it up, and never put it on the store",
            key.id()
        )
        .and_then(|_| writeln!(f, "{FILE_TAG}{}", hex::encode(key.secret)))
        .and_then(|_| f.sync_all())
        .map_err(|e| err(e.to_string()))?;
        Ok(key)
    }

    /// Reads a key written by [`Key::create_file`].
    pub fn load(path: &Path) -> Result<Key, KeyError> {
        let err = |reason: String| KeyError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let line = text
            .lines()
            .find_map(|l| l.trim().strip_prefix(FILE_TAG))
            .ok_or_else(|| {
                err("not a ferry key file (create one with `ferry key new FILE`)".into())
            })?;
        let bytes = hex::decode(line.trim()).map_err(|_| err("corrupt key line".into()))?;
        let secret: [u8; 32] = bytes
            .try_into()
            .map_err(|_| err("corrupt key line (wrong length)".into()))?;
        Ok(Key { secret })
    }

    /// Public fingerprint of the key (16 hex digits).
    pub fn id(&self) -> String {
        hex::encode(&blake3::derive_key("ferry 2026-11 key id", &self.secret)[..8])
    }

    /// Key for block ids (keyed BLAKE3).
    pub fn block_id_key(&self) -> [u8; 32] {
        blake3::derive_key("ferry 2026-11 block id", &self.secret)
    }

    fn cipher(&self) -> LessSafeKey {
        let k = blake3::derive_key("ferry 2026-11 encryption", &self.secret);
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &k).expect("32-byte AES-256 key"))
    }
}

/// Seals and opens objects under one key.
#[derive(Clone)]
pub struct Sealer {
    cipher: Arc<LessSafeKey>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sealer")
    }
}

impl Sealer {
    /// A sealer for `key`.
    pub fn new(key: &Key) -> Self {
        Sealer {
            cipher: Arc::new(key.cipher()),
        }
    }

    /// Encrypts and authenticates `msg`, bound to `aad`: `nonce || ciphertext+tag`.
    pub fn seal(&self, msg: &[u8], aad: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + msg.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(msg);
        let tag = self
            .cipher
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut out[NONCE_LEN..],
            )
            .expect("AES-GCM sealing cannot fail for in-memory data");
        out.extend_from_slice(tag.as_ref());
        out
    }

    /// Opens what [`Sealer::seal`] produced; `None` when it was altered or sealed under another key.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let nonce: [u8; NONCE_LEN] = sealed[..NONCE_LEN].try_into().ok()?;
        let mut buf = sealed[NONCE_LEN..].to_vec();
        let plain_len = self
            .cipher
            .open_in_place(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad),
                &mut buf,
            )
            .ok()?
            .len();
        buf.truncate(plain_len);
        Some(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // Sealed objects and key files come from places others can write: any bytes are
        // refused cleanly (never opened as valid, never a panic).
        #[test]
        fn any_sealed_bytes_are_refused(b in proptest::collection::vec(any::<u8>(), 0..200)) {
            let s = Sealer::new(&Key::generate());
            prop_assert!(s.open(&b, b"ferry index").is_none());
        }

        #[test]
        fn one_flipped_bit_in_a_sealed_object_is_detected(
            msg in proptest::collection::vec(any::<u8>(), 0..200),
            at in any::<usize>(),
            bit in 0u8..8,
        ) {
            let s = Sealer::new(&Key::generate());
            let mut sealed = s.seal(&msg, b"points/app/1.manifest");
            let n = sealed.len();
            sealed[at % n] ^= 1 << bit;
            prop_assert!(s.open(&sealed, b"points/app/1.manifest").is_none());
        }

        #[test]
        fn any_key_file_loads_or_is_refused(text in ".{0,200}") {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("k");
            std::fs::write(&p, &text).unwrap();
            let _ = Key::load(&p);
        }
    }

    #[test]
    fn key_files_round_trip_and_never_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let k = Key::create_file(&p).unwrap();
        assert_eq!(Key::load(&p).unwrap().id(), k.id());
        assert!(Key::create_file(&p)
            .unwrap_err()
            .to_string()
            .contains("never overwrites"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(dir.path().join("bad"), "hello").unwrap();
        assert!(Key::load(&dir.path().join("bad")).is_err());
    }

    #[test]
    fn sealing_authenticates_content_key_and_context() {
        let (a, b) = (Key::generate(), Key::generate());
        assert_ne!(a.id(), b.id());
        assert_ne!(a.block_id_key(), b.block_id_key());
        let s = Sealer::new(&a);
        let sealed = s.seal(b"secret data", b"ctx");
        assert_eq!(s.open(&sealed, b"ctx").unwrap(), b"secret data");
        assert!(s.open(&sealed, b"other").is_none());
        assert!(Sealer::new(&b).open(&sealed, b"ctx").is_none());
        let mut bad = sealed.clone();
        bad[30] ^= 1;
        assert!(s.open(&bad, b"ctx").is_none());
        assert!(!sealed.windows(11).any(|w| w == b"secret data"));
    }
}
