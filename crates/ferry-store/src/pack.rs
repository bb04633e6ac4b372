//! Pack building and the binary formats of packs and pack indexes.
use std::sync::Arc;

use ferry_blocks::Hash;

use crate::{Location, Result, Store};

const INDEX_MAGIC: &[u8; 8] = b"FRYIDX01";
const ENTRY_LEN: usize = 32 + 8 + 4 + 4 + 1;
/// Most a stored frame exceeds its block by (the seal's nonce and tag, with room to spare).
const MAX_FRAME_OVERHEAD: u64 = 64;

/// How a block frame is encoded in a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is (it did not compress).
    Raw,
    /// A zstd frame.
    Zstd,
}

/// Compresses a block, falling back to raw when compression does not pay.
pub fn encode(comp: &mut zstd::bulk::Compressor<'_>, raw: &[u8]) -> (Vec<u8>, Codec) {
    match comp.compress(raw) {
        Ok(c) if c.len() < raw.len() - raw.len() / 32 => (c, Codec::Zstd),
        _ => (raw.to_vec(), Codec::Raw),
    }
}

/// Decodes a frame; `None` when it is malformed.
pub fn decode(frame: &[u8], loc: Location) -> Option<Vec<u8>> {
    match loc.codec {
        Codec::Raw => (frame.len() == loc.raw_len as usize).then(|| frame.to_vec()),
        Codec::Zstd => decode_zstd(frame, loc),
    }
}

/// Decodes a frame the caller owns (a raw frame is returned as is, without a copy).
pub fn decode_owned(frame: Vec<u8>, loc: Location) -> Option<Vec<u8>> {
    match loc.codec {
        Codec::Raw => (frame.len() == loc.raw_len as usize).then_some(frame),
        Codec::Zstd => decode_zstd(&frame, loc),
    }
}

fn decode_zstd(frame: &[u8], loc: Location) -> Option<Vec<u8>> {
    thread_local! {
        // One decompression context per thread: making one per 64 KiB block costs more than
        // decompressing it.
        static DCTX: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DCTX.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            *d = zstd::bulk::Decompressor::new().ok();
        }
        d.as_mut()?
            .decompress(frame, loc.raw_len as usize)
            .ok()
            .filter(|r| r.len() == loc.raw_len as usize)
    })
}

/// Serializes a pack's index.
pub(crate) fn index_bytes(pack: u128, entries: &[(Hash, Location)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + entries.len() * ENTRY_LEN);
    out.extend_from_slice(INDEX_MAGIC);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    out.extend_from_slice(&pack.to_le_bytes());
    for (h, l) in entries {
        out.extend_from_slice(h);
        out.extend_from_slice(&l.offset.to_le_bytes());
        out.extend_from_slice(&l.len.to_le_bytes());
        out.extend_from_slice(&l.raw_len.to_le_bytes());
        out.push(match l.codec {
            Codec::Raw => 0,
            Codec::Zstd => 1,
        });
    }
    out
}

/// Parses a pack index whose object name carries the pack id.
pub(crate) fn parse_index(b: &[u8]) -> Option<Vec<(Hash, Location)>> {
    if b.len() < 32 || &b[..8] != INDEX_MAGIC {
        return None;
    }
    let pack = u128::from_le_bytes(b[16..32].try_into().ok()?);
    let n = u64::from_le_bytes(b[8..16].try_into().ok()?);
    let body = &b[32..];
    if n.checked_mul(ENTRY_LEN as u64) != Some(body.len() as u64) {
        return None;
    }
    body.chunks_exact(ENTRY_LEN)
        .map(|e| {
            let codec = match e[48] {
                0 => Codec::Raw,
                1 => Codec::Zstd,
                _ => return None,
            };
            let len = u32::from_le_bytes(e[40..44].try_into().ok()?);
            let raw_len = u32::from_le_bytes(e[44..48].try_into().ok()?);
            // No block is larger than the largest block size, nor its frame much larger than
            // the block (a damaged index must not make a reader allocate gigabytes).
            if raw_len as u64 > ferry_blocks::MAX_BLOCK_SIZE
                || len as u64 > raw_len as u64 + MAX_FRAME_OVERHEAD
            {
                return None;
            }
            Some((
                e[..32].try_into().ok()?,
                Location {
                    pack,
                    offset: u64::from_le_bytes(e[32..40].try_into().ok()?),
                    len,
                    raw_len,
                    codec,
                },
            ))
        })
        .collect()
}

/// Collects block frames into a pack and uploads it once it reaches its target size.
/// Blocks already in the store (or already in this pack) are skipped.
pub struct PackWriter {
    store: Arc<Store>,
    target: usize,
    id: u128,
    data: Vec<u8>,
    entries: Vec<(Hash, Location)>,
    /// Blocks added by this writer (also those still uploading).
    pending: std::collections::HashSet<Hash>,
    uploads: std::collections::VecDeque<tokio::task::JoinHandle<Result<()>>>,
    /// Frame bytes accepted (new to the store) so far.
    pub bytes_added: u64,
}

impl PackWriter {
    /// A writer that cuts packs of about `target` bytes.
    pub fn new(store: Arc<Store>, target: usize) -> Self {
        PackWriter {
            store,
            target,
            id: rand::random(),
            data: Vec::new(),
            entries: Vec::new(),
            pending: Default::default(),
            uploads: Default::default(),
            bytes_added: 0,
        }
    }

    /// Adds a frame unless the block is already stored; returns whether it was added.
    pub fn add(&mut self, h: Hash, frame: &[u8], codec: Codec, raw_len: u32) -> Result<bool> {
        if self.store.contains(&h) || self.pending.contains(&h) {
            return Ok(false);
        }
        let sealed = self.store.seal_frame(frame.to_vec(), &h);
        self.add_sealed(h, &sealed, codec, raw_len)
    }

    /// Adds a frame already sealed with [`Store::seal_frame`] (sealing can then run in
    /// parallel workers); returns whether it was added.
    pub fn add_sealed(
        &mut self,
        h: Hash,
        sealed: &[u8],
        codec: Codec,
        raw_len: u32,
    ) -> Result<bool> {
        if self.store.contains(&h) || self.pending.contains(&h) {
            return Ok(false);
        }
        let loc = Location {
            pack: self.id,
            offset: self.data.len() as u64,
            len: sealed.len() as u32,
            raw_len,
            codec,
        };
        self.data.extend_from_slice(sealed);
        self.entries.push((h, loc));
        self.pending.insert(h);
        self.bytes_added += loc.len as u64;
        if self.data.len() >= self.target {
            self.flush()?;
        }
        Ok(true)
    }

    /// Uploads the current pack (if any) and starts a new one.
    pub fn flush(&mut self) -> Result<()> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.data);
        let entries = std::mem::take(&mut self.entries);
        self.uploads
            .push_back(self.store.spawn_pack_upload(self.id, data, entries));
        self.id = rand::random();
        // Bounded: at most `upload_parallelism` packs in flight (memory stays bounded too).
        while self.uploads.len() > self.store.upload_parallelism().saturating_sub(1) {
            let h = self.uploads.pop_front().expect("non-empty");
            self.store.join_upload(h)?;
        }
        Ok(())
    }

    /// Uploads what is left and waits for every upload; every added block is then readable.
    pub fn finish(mut self) -> Result<()> {
        self.flush()?;
        let mut first_err = None;
        while let Some(h) = self.uploads.pop_front() {
            if let Err(e) = self.store.join_upload(h) {
                first_err.get_or_insert(e);
            }
        }
        first_err.map_or(Ok(()), Err)
    }
}

impl Drop for PackWriter {
    fn drop(&mut self) {
        // Abandoned uploads (an error elsewhere) are waited for, never left running detached.
        while let Some(h) = self.uploads.pop_front() {
            let _ = self.store.join_upload(h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry(raw_len: u32, len: u32, codec: u8) -> Vec<u8> {
        let mut e = vec![9u8; 32];
        e.extend_from_slice(&0u64.to_le_bytes());
        e.extend_from_slice(&len.to_le_bytes());
        e.extend_from_slice(&raw_len.to_le_bytes());
        e.push(codec);
        e
    }

    fn index(n: u64, body: &[u8]) -> Vec<u8> {
        let mut b = INDEX_MAGIC.to_vec();
        b.extend_from_slice(&n.to_le_bytes());
        b.extend_from_slice(&7u128.to_le_bytes());
        b.extend_from_slice(body);
        b
    }

    #[test]
    fn an_index_entry_larger_than_any_block_is_refused() {
        assert!(parse_index(&index(1, &entry(64 << 10, 64 << 10, 0))).is_some());
        assert!(parse_index(&index(1, &entry(u32::MAX, 100, 1))).is_none());
        assert!(parse_index(&index(1, &entry(4096, u32::MAX, 1))).is_none());
        assert!(parse_index(&index(u64::MAX, &entry(4096, 4096, 0))).is_none());
    }

    proptest! {
        // Pack indexes and frames come from the store: any bytes give entries or an
        // error, never a panic or an allocation beyond the largest block.
        #[test]
        fn any_index_bytes_parse_or_are_refused(
            b in proptest::collection::vec(any::<u8>(), 0..300),
            n in any::<u64>(),
            entries in proptest::collection::vec((any::<u32>(), any::<u32>(), 0u8..3), 0..4),
        ) {
            let _ = parse_index(&b);
            let body: Vec<u8> = entries.iter().flat_map(|&(r, l, c)| entry(r, l, c)).collect();
            for idx in [index(n, &body), index(entries.len() as u64, &body)] {
                if let Some(es) = parse_index(&idx) {
                    for (_, loc) in es {
                        prop_assert!(loc.raw_len as u64 <= ferry_blocks::MAX_BLOCK_SIZE);
                    }
                }
            }
        }

        #[test]
        fn any_frame_decodes_to_its_length_or_fails(
            frame in proptest::collection::vec(any::<u8>(), 0..2048),
            raw_len in 0u32..(64 << 10),
            zstd in any::<bool>(),
        ) {
            let loc = Location {
                pack: 0,
                offset: 0,
                len: frame.len() as u32,
                raw_len,
                codec: if zstd { Codec::Zstd } else { Codec::Raw },
            };
            if let Some(d) = decode(&frame, loc) {
                prop_assert_eq!(d.len(), raw_len as usize);
            }
        }
    }
}
