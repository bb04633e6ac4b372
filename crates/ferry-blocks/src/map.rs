//! Block maps (one hash per block of a disk), manifests (the maps of all disks of a VM
//! at one instant) and delta plans (runs of blocks that differ).
use std::ops::Range;
use std::path::Path;

use crate::{block_count, io_err, BlockError, Hash, Result, UNKNOWN, ZERO};

const MAP_MAGIC: &[u8; 8] = b"FRYMAP01";
const MANIFEST_MAGIC: &[u8; 8] = b"FRYMAN01";

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
        let (size, block_size, n) = (u(8), u(16), u(24) as usize);
        if block_size == 0 || block_count(size, block_size) as usize != n || b.len() < 32 + n * 32 {
            return Err(bad());
        }
        let hashes = b[32..32 + n * 32]
            .chunks_exact(32)
            .map(|c| c.try_into().unwrap())
            .collect();
        Ok((
            BlockMap {
                size,
                block_size,
                hashes,
            },
            32 + n * 32,
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
    /// Serializes to ferry's binary manifest format.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(MANIFEST_MAGIC);
        out.extend_from_slice(&(self.disks.len() as u64).to_le_bytes());
        for d in &self.disks {
            out.extend_from_slice(&d.to_bytes());
        }
        out
    }

    /// Parses ferry's binary manifest format.
    pub fn from_bytes(b: &[u8]) -> Result<Self> {
        if b.len() < 16 || &b[..8] != MANIFEST_MAGIC {
            return Err(BlockError::Format(
                "not a ferry manifest (wrong magic)".into(),
            ));
        }
        let n = u64::from_le_bytes(b[8..16].try_into().unwrap()) as usize;
        let mut pos = 16;
        let mut disks = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let (m, used) = BlockMap::from_bytes(&b[pos..])?;
            disks.push(m);
            pos += used;
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
