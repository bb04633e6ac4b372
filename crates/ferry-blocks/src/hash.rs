//! Block hashes.

/// A block's identity: its BLAKE3 hash, or one of the sentinels [`ZERO`] and [`UNKNOWN`].
pub type Hash = [u8; 32];

/// Sentinel for an all-zero block (a hole): never stored, never sent.
pub const ZERO: Hash = [0u8; 32];

/// Sentinel for a block whose content is not known (e.g. a write was in flight at a crash).
pub const UNKNOWN: Hash = [0xffu8; 32];

/// True when every byte of `buf` is zero.
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = unsafe { buf.align_to::<u128>() };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Hash of one block: [`ZERO`] for an all-zero block, BLAKE3 otherwise.
pub fn hash_block(buf: &[u8]) -> Hash {
    Hasher::PLAIN.hash(buf)
}

/// Computes block ids: plain BLAKE3, or keyed BLAKE3 for encrypted replication (so equal
/// plaintext under different keys gets unrelated ids).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hasher {
    key: Option<[u8; 32]>,
}

impl Hasher {
    /// Unkeyed BLAKE3.
    pub const PLAIN: Hasher = Hasher { key: None };

    /// Keyed BLAKE3 with `key` (None: plain).
    pub fn keyed(key: Option<[u8; 32]>) -> Self {
        Hasher { key }
    }

    /// Id of one block: [`ZERO`] for an all-zero block.
    pub fn hash(&self, buf: &[u8]) -> Hash {
        if is_zero(buf) {
            return ZERO;
        }
        match &self.key {
            None => *blake3::hash(buf).as_bytes(),
            Some(k) => *blake3::keyed_hash(k, buf).as_bytes(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_blocks_are_holes_and_others_hash() {
        assert_eq!(hash_block(&[0u8; 65536]), ZERO);
        let mut b = vec![0u8; 65536];
        b[65535] = 1;
        assert!(!is_zero(&b));
        assert_eq!(hash_block(&b), *blake3::hash(&b).as_bytes());
        assert!(is_zero(&b[1..65535]));
        assert!(is_zero(&[]));
        let keyed = Hasher::keyed(Some([1; 32]));
        assert_ne!(keyed.hash(&b), hash_block(&b));
        assert_eq!(keyed.hash(&[0u8; 100]), ZERO);
    }
}
