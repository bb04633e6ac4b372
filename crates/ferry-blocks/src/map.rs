//! Block maps (one hash per block of a disk), manifests (the maps of all disks of a VM
//! at one instant) and delta plans (runs of blocks that differ).
use std::ops::Range;
use std::path::Path;

use crate::{block_count, io_err, BlockError, Hash, Result, UNKNOWN, ZERO};

const MAP_MAGIC: &[u8; 8] = b"FRYMAP01";
/// Manifests written before they carried a checksum (still read).
const MANIFEST_MAGIC_V1: &[u8; 8] = b"FRYMAN01";
/// Manifests with a BLAKE3 checksum of everything before it at the end.
const MANIFEST_MAGIC: &[u8; 8] = b"FRYMAN02";

/// The hash of every block of one disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    /// Disk size in bytes (need not be a multiple of the block size).
    pub size: u64,
    /// Block size in bytes.
    pub block_size: u64,
    /// One hash per block; [`ZERO`] for holes, [`UNKNOWN`] where the content is not known.
    pub hashes: Vec<Hash>,
}

impl BlockMap {
    /// A map of a disk that is all zeros.
    pub fn zeros(size: u64, block_size: u64) -> Self {
        BlockMap {
            size,
            block_size,
            hashes: vec![ZERO; block_count(size, block_size) as usize],
        }
    }

    /// A map whose every block is unknown.
    pub fn unknown(size: u64, block_size: u64) -> Self {
        BlockMap {
            size,
            block_size,
            hashes: vec![UNKNOWN; block_count(size, block_size) as usize],
        }
    }

    /// Number of blocks.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// True for a zero-sized disk.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// Byte range of block `i` (the last block may be short).
    pub fn block_range(&self, i: u64) -> Range<u64> {
        let start = i * self.block_size;
        start..(start + self.block_size).min(self.size)
    }

    /// Bytes covered by blocks that are not holes.
    pub fn data_bytes(&self) -> u64 {
        (0..self.hashes.len() as u64)
            .filter(|&i| self.hashes[i as usize] != ZERO)
            .map(|i| {
                let r = self.block_range(i);
                r.end - r.start
            })
            .sum()
    }

    /// Serializes to ferry's binary map format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + self.hashes.len() * 32);
        out.extend_from_slice(MAP_MAGIC);
        out.extend_from_slice(&self.size.to_le_bytes());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&(self.hashes.len() as u64).to_le_bytes());
        for h in &self.hashes {
            out.extend_from_slice(h);
        }
        out
    }

    /// Parses ferry's binary map format, returning the map and the bytes consumed.
    pub fn from_bytes(b: &[u8]) -> Result<(Self, usize)> {
        let bad = || BlockError::Format("not a ferry block map (truncated or wrong magic)".into());
        if b.len() < 32 || &b[..8] != MAP_MAGIC {
            return Err(bad());
        }
        let u = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let (size, block_size, n) = (u(8), u(16), u(24));
        // Checked: a damaged header must not overflow or ask for more than the bytes hold.
        let end = n
            .checked_mul(32)
            .and_then(|x| x.checked_add(32))
            .filter(|&e| e <= b.len() as u64);
        let Some(end) = end.map(|e| e as usize) else {
            return Err(bad());
        };
        let n = n as usize;
        if block_size == 0 || block_count(size, block_size) != n as u64 {
            return Err(bad());
        }
        let hashes = b[32..end]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        Ok((
            BlockMap {
                size,
                block_size,
                hashes,
            },
            end,
        ))
    }

    /// Writes the map atomically (temporary file, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        write_atomic(path, &self.to_bytes())
    }

    /// Reads a map written by [`BlockMap::save`].
    pub fn load(path: &Path) -> Result<Self> {
        let b = std::fs::read(path).map_err(io_err(path))?;
        Ok(Self::from_bytes(&b)?.0)
    }
}

/// The block maps of all disks of a VM at one instant: the content of a recovery point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// One map per disk, in disk-index order.
    pub disks: Vec<BlockMap>,
}

impl Manifest {
    /// Serializes to ferry's binary manifest format: the maps, then a BLAKE3 checksum of all
    /// that precedes it (a plaintext store has no other guard against a flipped bit).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&(self.disks.len() as u64).to_le_bytes());
        for d in &self.disks {
            out.extend_from_slice(&d.to_bytes());
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    /// Parses ferry's binary manifest format (checking its checksum; manifests of the first
    /// format, without one, are still read).
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        let format = |m: &str| BlockError::Format(m.into());
        if b.len() < 16 {
            return Err(format("not a ferry manifest (truncated)"));
        }
        let body = if &b[..8] == MANIFEST_MAGIC {
            if b.len() < 16 + 32 {
                return Err(format("not a ferry manifest (truncated)"));
            }
            let (body, sum) = b.split_at(b.len() - 32);
            if blake3::hash(body).as_bytes() != sum {
                return Err(format(
                    "damaged manifest (its checksum does not match its content)",
                ));
            }
            body
        } else if &b[..8] == MANIFEST_MAGIC_V1 {
            b
        } else {
            return Err(format("not a ferry manifest (wrong magic)"));
        };
        let n = u64::from_le_bytes(body[8..16].try_into().unwrap()) as usize;
        let mut pos = 16;
        let mut disks = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let (m, used) = BlockMap::from_bytes(&body[pos..])?;
            disks.push(m);
            pos += used;
        }
        if &b[..8] == MANIFEST_MAGIC && pos != body.len() {
            return Err(format("damaged manifest (bytes after its last map)"));
        }
        Ok(Manifest { disks })
    }

    /// Total size of all disks.
    pub fn size(&self) -> u64 {
        self.disks.iter().map(|d| d.size).sum()
    }
}

/// Runs of consecutive block indices where `a` and `b` differ (or either is unknown),
/// coalesced into ranges so writes can be large.
pub fn differing_runs(a: &[Hash], b: &[Hash]) -> Vec<Range<u64>> {
    assert_eq!(a.len(), b.len(), "maps of different disks compared");
    let mut runs: Vec<Range<u64>> = Vec::new();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        if x != y || *x == UNKNOWN {
            let i = i as u64;
            match runs.last_mut() {
                Some(r) if r.end == i => r.end = i + 1,
                _ => runs.push(i..i + 1),
            }
        }
    }
    runs
}

/// Writes `data` to `path` atomically: temporary file, fsync, rename, fsync of the folder.
pub fn write_atomic(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(data).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
    if let Some(dir) = path.parent() {
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A valid map or manifest encoding, then `flips` (position, bit) applied to it.
    fn mutated(mut b: Vec<u8>, flips: &[(usize, u8)]) -> Vec<u8> {
        let len = b.len();
        for &(at, bit) in flips {
            b[at % len] ^= 1 << (bit % 8);
        }
        b
    }

    proptest! {
        // Stored and received maps and manifests are parsed from bytes anyone may have
        // damaged: any input gives a value or an error, never a panic, an overflow or an
        // allocation larger than the input.
        #[test]
        fn any_bytes_parse_to_a_map_or_an_error(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = BlockMap::from_bytes(&b);
            let _ = Manifest::from_bytes(&b);
        }

        #[test]
        fn a_damaged_header_is_refused_without_overflow(
            size in any::<u64>(), bs in any::<u64>(), n in any::<u64>(), tail in 0usize..64,
        ) {
            let mut b = MAP_MAGIC.to_vec();
            for v in [size, bs, n] {
                b.extend_from_slice(&v.to_le_bytes());
            }
            b.resize(b.len() + tail, 7);
            if let Ok((m, used)) = BlockMap::from_bytes(&b) {
                prop_assert_eq!(used, 32 + m.hashes.len() * 32);
                prop_assert!(used <= b.len());
            }
            let mut man = MANIFEST_MAGIC_V1.to_vec();
            man.extend_from_slice(&n.to_le_bytes());
            man.extend_from_slice(&b);
            let _ = Manifest::from_bytes(&man);
        }

        #[test]
        fn flipped_bits_in_a_manifest_give_an_error_or_another_manifest(
            blocks in 1u64..40,
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        ) {
            let mut m = BlockMap::zeros(blocks * 4096, 4096);
            for (i, h) in m.hashes.iter_mut().enumerate() {
                *h = [i as u8 + 1; 32];
            }
            let good = Manifest { disks: vec![m.clone(), m] };
            let bad = mutated(good.to_bytes(), &flips);
            // Flips that cancel out leave the manifest as it was; any other is refused.
            if bad != good.to_bytes() {
                prop_assert!(Manifest::from_bytes(&bad).is_err());
            }
        }
    }

    #[test]
    fn last_block_may_be_short() {
        let m = BlockMap::zeros(65536 * 2 + 100, 65536);
        assert_eq!(m.len(), 3);
        assert_eq!(m.block_range(2), 131072..131172);
    }

    #[test]
    fn manifest_round_trips() {
        let mut a = BlockMap::zeros(1000, 512);
        a.hashes[1] = [3u8; 32];
        let m = Manifest {
            disks: vec![a, BlockMap::unknown(4096, 1024)],
        };
        assert_eq!(Manifest::from_bytes(&m.to_bytes()).unwrap(), m);
        assert!(Manifest::from_bytes(b"garbage garbage!").is_err());
        // A manifest of the first format (no checksum) still reads.
        let mut v1 = MANIFEST_MAGIC_V1.to_vec();
        v1.extend_from_slice(&(m.disks.len() as u64).to_le_bytes());
        for d in &m.disks {
            v1.extend_from_slice(&d.to_bytes());
        }
        assert_eq!(Manifest::from_bytes(&v1).unwrap(), m);
    }

    #[test]
    fn unknown_blocks_always_differ() {
        let a = vec![UNKNOWN, [1; 32], [1; 32], [2; 32]];
        let b = vec![UNKNOWN, [1; 32], [9; 32], [9; 32]];
        assert_eq!(differing_runs(&a, &b), vec![0..1, 2..4]);
    }

    proptest! {
        #[test]
        fn runs_cover_exactly_the_differing_blocks(
            pairs in proptest::collection::vec((0u8..3, 0u8..3), 0..200)
        ) {
            let a: Vec<Hash> = pairs.iter().map(|p| [p.0; 32]).collect();
            let b: Vec<Hash> = pairs.iter().map(|p| [p.1; 32]).collect();
            let runs = differing_runs(&a, &b);
            let mut covered = vec![false; a.len()];
            let mut last_end = None;
            for r in &runs {
                prop_assert!(r.start < r.end);
                if let Some(e) = last_end { prop_assert!(r.start > e, "runs must be coalesced"); }
                last_end = Some(r.end);
                for i in r.clone() { covered[i as usize] = true; }
            }
            for i in 0..a.len() { prop_assert_eq!(covered[i], a[i] != b[i]); }
        }
    }
}
