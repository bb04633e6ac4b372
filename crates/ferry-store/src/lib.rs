//! The recovery-point store: content-addressed blocks kept compressed in *packs* (tens of MiB
//! each, because object stores hate tiny objects), an index from block hash to pack and
//! offset, and one manifest per recovery point — all on `object_store`, so the same code
//! serves a local folder, Azure Blob or S3.
//!
//! Layout under the store root:
//! - `packs/<id>.pack`: concatenated block frames (zstd or raw);
//! - `index/<id>.idx`: the pack's entries, written only after the pack is complete, so a
//!   crash never leaves an index entry pointing at a missing or partial pack;
//! - `points/<vm>/<id>.manifest`: a recovery point (see `ferry_blocks::Manifest`).
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use ferry_blocks::{Hash, Manifest};
use futures::TryStreamExt;
use object_store::{path::Path as ObjPath, ObjectStore, PutPayload};

pub mod backend;
mod pack;
pub use pack::{decode, encode, Codec, PackWriter};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL is not one ferry understands.
    #[error("unsupported store URL {0:?}: use file:///absolute/dir (az:// and s3:// are not built in yet)")]
    Url(String),
    /// The object store failed or is unreachable.
    #[error("store {url}: {source}")]
    Backend {
        /// Store URL.
        url: String,
        /// Underlying error.
        source: object_store::Error,
    },
    /// A block the caller needs is not in the store.
    #[error("block {0} is missing from the store; the recovery point is incomplete — run `ferry verify` and replicate again")]
    Missing(String),
    /// A stored object does not match its hash.
    #[error("corrupt data in the store: pack {pack} holds block {block} whose content does not match its hash; it was not written to any disk")]
    Corrupt {
        /// Pack id.
        pack: String,
        /// Expected block hash (hex).
        block: String,
    },
    /// An object is not in ferry's format.
    #[error("store object {0} is not in ferry's format")]
    Format(String),
}

/// Size at which a pack is cut and uploaded (object stores prefer objects of many MiB).
pub const PACK_TARGET: usize = 16 << 20;

/// Result alias of the store.
pub type Result<T> = std::result::Result<T, StoreError>;

/// Where a block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Pack id.
    pub pack: u128,
    /// Offset of the frame in the pack.
    pub offset: u64,
    /// Length of the frame.
    pub len: u32,
    /// Length of the block once decoded.
    pub raw_len: u32,
    /// How the frame is encoded.
    pub codec: Codec,
}

/// A recovery-point store.
pub struct Store {
    url: String,
    os: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    index: RwLock<HashMap<Hash, Location>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// Key of a point's manifest.
pub fn manifest_key(vm: &str, point: i64) -> String {
    format!("points/{vm}/{point:012}.manifest")
}

impl Store {
    /// Opens the store at `url` (`file:///abs/dir`), creating it if needed, and loads its index.
    pub fn open(url: &str) -> Result<Self> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let os = rt.block_on(backend::open(url))?;
        let store = Store {
            url: url.into(),
            os,
            rt,
            index: RwLock::new(HashMap::new()),
        };
        store.load_index()?;
        Ok(store)
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn backend(&self) -> impl Fn(object_store::Error) -> StoreError + '_ {
        move |source| StoreError::Backend {
            url: self.url.clone(),
            source,
        }
    }

    /// Reads every pack index into memory.
    fn load_index(&self) -> Result<()> {
        let metas: Vec<_> = self
            .rt
            .block_on(
                self.os
                    .list(Some(&ObjPath::from("index")))
                    .try_collect::<Vec<_>>(),
            )
            .map_err(self.backend())?;
        let mut idx = HashMap::new();
        for m in metas {
            let b = self.get(&m.location)?;
            for (h, loc) in
                pack::parse_index(&b).ok_or_else(|| StoreError::Format(m.location.to_string()))?
            {
                idx.insert(h, loc);
            }
        }
        *self.index.write().unwrap() = idx;
        Ok(())
    }

    /// True when the store holds the block.
    pub fn contains(&self, h: &Hash) -> bool {
        self.index.read().unwrap().contains_key(h)
    }

    /// Where the block is stored, if it is.
    pub fn locate(&self, h: &Hash) -> Option<Location> {
        self.index.read().unwrap().get(h).copied()
    }

    /// Number of distinct blocks stored.
    pub fn block_count(&self) -> usize {
        self.index.read().unwrap().len()
    }

    fn get(&self, key: &ObjPath) -> Result<Bytes> {
        self.rt
            .block_on(async { self.os.get(key).await?.bytes().await })
            .map_err(self.backend())
    }

    fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.rt
            .block_on(self.os.put(&ObjPath::from(key), PutPayload::from(data)))
            .map_err(self.backend())?;
        Ok(())
    }

    /// Uploads a finished pack, then its index, then publishes its blocks.
    pub(crate) fn put_pack(
        &self,
        id: u128,
        data: Vec<u8>,
        entries: Vec<(Hash, Location)>,
    ) -> Result<()> {
        self.put(&format!("packs/{id:032x}.pack"), data)?;
        self.put(
            &format!("index/{id:032x}.idx"),
            pack::index_bytes(id, &entries),
        )?;
        let mut idx = self.index.write().unwrap();
        for (h, loc) in entries {
            idx.insert(h, loc);
        }
        Ok(())
    }

    /// Reads one block's frame, decodes it and checks it against its hash.
    pub fn read_block(&self, h: &Hash) -> Result<Vec<u8>> {
        let loc = self
            .locate(h)
            .ok_or_else(|| StoreError::Missing(hex::encode(h)))?;
        let key = ObjPath::from(format!("packs/{:032x}.pack", loc.pack));
        let range = loc.offset as usize..(loc.offset + loc.len as u64) as usize;
        let frame = self
            .rt
            .block_on(self.os.get_range(&key, range))
            .map_err(self.backend())?;
        let corrupt = || StoreError::Corrupt {
            pack: format!("{:032x}", loc.pack),
            block: hex::encode(h),
        };
        let raw = pack::decode(&frame, loc).ok_or_else(corrupt)?;
        if ferry_blocks::hash_block(&raw) != *h {
            return Err(corrupt());
        }
        Ok(raw)
    }

    /// Stores a recovery point's manifest.
    pub fn put_manifest(&self, vm: &str, point: i64, m: &Manifest) -> Result<String> {
        let key = manifest_key(vm, point);
        self.put(&key, m.to_bytes())?;
        Ok(key)
    }

    /// Reads a recovery point's manifest.
    pub fn get_manifest(&self, key: &str) -> Result<Manifest> {
        let b = self.get(&ObjPath::from(key))?;
        Manifest::from_bytes(&b).map_err(|_| StoreError::Format(key.into()))
    }

    /// Deletes a recovery point's manifest (its blocks go with the next garbage collection).
    pub fn delete_manifest(&self, key: &str) -> Result<()> {
        match self.rt.block_on(self.os.delete(&ObjPath::from(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend()(e)),
        }
    }

    /// Deletes packs none of whose blocks any manifest in the store references, if they are
    /// older than `grace` (so packs a running job just wrote are never collected). Returns the
    /// number of packs deleted.
    pub fn collect_garbage(&self, grace: std::time::Duration) -> Result<usize> {
        let manifests: Vec<_> = self
            .rt
            .block_on(
                self.os
                    .list(Some(&ObjPath::from("points")))
                    .try_collect::<Vec<_>>(),
            )
            .map_err(self.backend())?;
        let mut live = std::collections::HashSet::new();
        for m in manifests {
            let man = self.get_manifest(m.location.as_ref())?;
            for d in &man.disks {
                live.extend(d.hashes.iter().copied());
            }
        }
        let packs: Vec<_> = self
            .rt
            .block_on(
                self.os
                    .list(Some(&ObjPath::from("index")))
                    .try_collect::<Vec<_>>(),
            )
            .map_err(self.backend())?;
        let now = chrono_now();
        let mut deleted = 0;
        for p in packs {
            if now - p.last_modified.timestamp() < grace.as_secs() as i64 {
                continue;
            }
            let b = self.get(&p.location)?;
            let entries =
                pack::parse_index(&b).ok_or_else(|| StoreError::Format(p.location.to_string()))?;
            if entries.iter().any(|(h, _)| live.contains(h)) {
                continue;
            }
            let id = p
                .location
                .filename()
                .unwrap_or_default()
                .trim_end_matches(".idx")
                .to_string();
            // Index first: a crash in between leaves an orphan pack, never a dangling entry.
            self.rt
                .block_on(self.os.delete(&p.location))
                .map_err(self.backend())?;
            let _ = self
                .rt
                .block_on(self.os.delete(&ObjPath::from(format!("packs/{id}.pack"))));
            let mut idx = self.index.write().unwrap();
            for (h, _) in entries {
                idx.remove(&h);
            }
            deleted += 1;
        }
        Ok(deleted)
    }
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_blocks::BlockMap;

    fn open_temp() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let s = Store::open(&url).unwrap();
        (dir, s)
    }

    #[test]
    fn blocks_round_trip_through_packs_and_survive_reopen() {
        let (dir, s) = open_temp();
        let s = Arc::new(s);
        let mut w = PackWriter::new(s.clone(), 1 << 20);
        let a = vec![1u8; 65536];
        let b: Vec<u8> = (0..65536u32).map(|i| (i * 7919 % 251) as u8).collect();
        let (ha, hb) = (ferry_blocks::hash_block(&a), ferry_blocks::hash_block(&b));
        let mut comp = zstd::bulk::Compressor::new(1).unwrap();
        let fa = encode(&mut comp, &a);
        let fb = encode(&mut comp, &b);
        assert!(w.add(ha, &fa.0, fa.1, a.len() as u32).unwrap());
        assert!(
            !w.add(ha, &fa.0, fa.1, a.len() as u32).unwrap(),
            "duplicate skipped"
        );
        w.add(hb, &fb.0, fb.1, b.len() as u32).unwrap();
        w.finish().unwrap();
        assert_eq!(s.read_block(&ha).unwrap(), a);
        let url = format!("file://{}", dir.path().display());
        let s2 = Store::open(&url).unwrap();
        assert_eq!(s2.read_block(&hb).unwrap(), b);
        assert!(matches!(
            s2.read_block(&[9; 32]),
            Err(StoreError::Missing(_))
        ));
    }

    #[test]
    fn a_flipped_byte_is_detected_and_named() {
        let (dir, s) = open_temp();
        let s = Arc::new(s);
        let mut w = PackWriter::new(s.clone(), 1 << 20);
        let a: Vec<u8> = (0..65536u32).map(|i| (i % 13) as u8).collect();
        let h = ferry_blocks::hash_block(&a);
        w.add(h, &a, Codec::Raw, a.len() as u32).unwrap();
        w.finish().unwrap();
        let packs = dir.path().join("packs");
        let f = std::fs::read_dir(&packs)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path();
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[100] ^= 0x40;
        std::fs::write(&f, bytes).unwrap();
        let err = s.read_block(&h).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains(&hex::encode(h)));
    }

    #[test]
    fn manifests_and_garbage_collection() {
        let (_dir, s) = open_temp();
        let s = Arc::new(s);
        let mut w = PackWriter::new(s.clone(), 1 << 20);
        let a = vec![3u8; 4096];
        let h = ferry_blocks::hash_block(&a);
        w.add(h, &a, Codec::Raw, 4096).unwrap();
        w.finish().unwrap();
        let mut m = BlockMap::zeros(8192, 4096);
        m.hashes[1] = h;
        let key = s
            .put_manifest("vm1", 1, &Manifest { disks: vec![m] })
            .unwrap();
        assert_eq!(s.get_manifest(&key).unwrap().disks[0].hashes[1], h);
        assert_eq!(s.collect_garbage(std::time::Duration::ZERO).unwrap(), 0);
        s.delete_manifest(&key).unwrap();
        assert_eq!(
            s.collect_garbage(std::time::Duration::from_secs(3600))
                .unwrap(),
            0,
            "grace period"
        );
        assert_eq!(s.collect_garbage(std::time::Duration::ZERO).unwrap(), 1);
        assert!(!s.contains(&h));
    }
}
