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
//!
//! Data replicated with an encryption key lives under `k/<key id>/` with the same layout; there
//! every frame, index and manifest is sealed (see [`crypto`]) and block ids are keyed hashes.
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use ferry_blocks::{Hash, Hasher, Manifest};
use futures::{StreamExt, TryStreamExt};
use object_store::{path::Path as ObjPath, ObjectStore, PutPayload};

pub mod backend;
pub mod crypto;
mod pack;
pub use pack::{decode, encode, Codec, PackWriter};

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store URL is not one ferry understands.
    #[error("unsupported store URL {0:?}: use file:///absolute/dir, az://CONTAINER[/prefix] or s3://BUCKET[/prefix]")]
    Url(String),
    /// The object store failed or is unreachable.
    #[error("store {url}: {cause}")]
    Backend {
        /// Store URL.
        url: String,
        /// Underlying error.
        cause: object_store::Error,
    },
    /// The store cannot be used as configured (credentials, endpoint, names).
    #[error("store {url}: {msg}")]
    Config {
        /// Store URL.
        url: String,
        /// What is wrong and what to set.
        msg: String,
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
    prefix: String,
    sealer: Option<crypto::Sealer>,
    hasher: Hasher,
    os: Arc<dyn ObjectStore>,
    rt: tokio::runtime::Runtime,
    lease: std::sync::Mutex<Option<Lease>>,
    index: Arc<RwLock<HashMap<Hash, Location>>>,
    /// Index objects already read into `index` (a refresh reads only the others).
    indexed: std::sync::Mutex<std::collections::HashSet<String>>,
    uploads: std::sync::atomic::AtomicUsize,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("url", &self.url).finish()
    }
}

/// Packs a network store uploads at once unless a job sets its own
/// ([`Store::set_upload_parallelism`]).
pub const DEFAULT_UPLOADS: usize = 4;

/// A lease left unrenewed this long belongs to a dead job and is ignored.
pub const LEASE_TTL: std::time::Duration = std::time::Duration::from_secs(300);
/// Pack indexes read at once when a store is opened.
const INDEX_READS: usize = 16;
const LEASE_RENEW: std::time::Duration = std::time::Duration::from_secs(60);

/// A job's mark that it uses the store (`locks/<id>.lease`, store-wide): while another job's
/// lease is live, retention and garbage collection hold off, so nothing a running job writes
/// or reads is deleted under it.
struct Lease {
    path: ObjPath,
    renew: tokio::task::JoinHandle<()>,
}

/// Key of a point's manifest.
pub fn manifest_key(vm: &str, point: i64) -> String {
    format!("points/{vm}/{point:012}.manifest")
}

impl Store {
    /// Opens the plaintext namespace of the store at `url`, creating it if needed, and loads its index.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with(url, None)
    }

    /// Opens the store at `url` in the namespace of `key` (plaintext when None).
    pub fn open_with(url: &str, key: Option<&crypto::Key>) -> Result<Self> {
        let _span = tracing::debug_span!("open_store", url).entered();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let os = rt.block_on(backend::open(url))?;
        let store = Store {
            url: url.into(),
            prefix: key.map(|k| format!("k/{}/", k.id())).unwrap_or_default(),
            sealer: key.map(crypto::Sealer::new),
            hasher: Hasher::keyed(key.map(|k| k.block_id_key())),
            lease: std::sync::Mutex::new(None),
            os,
            rt,
            index: Arc::new(RwLock::new(HashMap::new())),
            indexed: Default::default(),
            uploads: std::sync::atomic::AtomicUsize::new(if url.starts_with("file://") {
                1
            } else {
                DEFAULT_UPLOADS
            }),
        };
        store.load_index(true)?;
        Ok(store)
    }

    /// The URL the store was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn backend(&self) -> impl Fn(object_store::Error) -> StoreError + '_ {
        move |cause| StoreError::Backend {
            url: self.url.clone(),
            cause,
        }
    }

    /// Reads the index of packs another process stored since this one was opened or last
    /// refreshed (one listing and one request per new pack); when packs were deleted
    /// meanwhile (garbage collection), reads the whole index again.
    pub fn refresh(&self) -> Result<()> {
        self.load_index(false)
    }

    /// Reads pack indexes into memory, several at once (one request each: on a network store
    /// its latency, not its size, is the cost): every one (`full`), or those not read yet.
    fn load_index(&self, full: bool) -> Result<()> {
        let at = self.path("index");
        let metas: Vec<_> = self
            .rt
            .block_on(retry_cut_short(&self.url, || {
                self.os.list(Some(&at)).try_collect::<Vec<_>>()
            }))
            .map_err(self.backend())?;
        let listed: std::collections::HashSet<String> =
            metas.iter().map(|m| m.location.to_string()).collect();
        let full = full || {
            let seen = self.indexed.lock().unwrap();
            seen.iter().any(|p| !listed.contains(p))
        };
        let metas: Vec<_> = if full {
            metas
        } else {
            let seen = self.indexed.lock().unwrap();
            metas
                .into_iter()
                .filter(|m| !seen.contains(m.location.as_ref()))
                .collect()
        };
        if !full && metas.is_empty() {
            return Ok(());
        }
        let os = &self.os;
        let mut idx = HashMap::new();
        let mut read = Vec::new();
        self.rt.block_on(async {
            let url = &self.url;
            let mut fetched = futures::stream::iter(metas.into_iter().map(|m| async move {
                let b = retry_cut_short(url, || {
                    let (os, at) = (os.clone(), m.location.clone());
                    async move { os.get(&at).await?.bytes().await }
                })
                .await?;
                Ok::<_, object_store::Error>((m.location, b))
            }))
            .buffer_unordered(INDEX_READS);
            while let Some(r) = fetched.next().await {
                let (at, b) = r.map_err(self.backend())?;
                for (h, loc) in self.parse_index(&at, &b)? {
                    idx.insert(h, loc);
                }
                read.push(at.to_string());
            }
            Ok::<_, StoreError>(())
        })?;
        let mut seen = self.indexed.lock().unwrap();
        if full {
            *self.index.write().unwrap() = idx;
            seen.clear();
        } else {
            self.index.write().unwrap().extend(idx);
        }
        seen.extend(read);
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

    /// Takes a lease on the store for as long as this `Store` lives (renewed in the background).
    pub fn hold_lease(&self, what: &str) -> Result<()> {
        let id: u64 = rand::random();
        let path = ObjPath::from(format!("locks/{id:016x}.lease"));
        let body = bytes::Bytes::from(format!(
            "{{\"what\":{:?},\"pid\":{}}}",
            what,
            std::process::id()
        ));
        self.rt
            .block_on(self.os.put(&path, PutPayload::from(body.clone())))
            .map_err(self.backend())?;
        let (os, p) = (self.os.clone(), path.clone());
        let renew = self.rt.spawn(async move {
            loop {
                tokio::time::sleep(LEASE_RENEW).await;
                let _ = os.put(&p, PutPayload::from(body.clone())).await;
            }
        });
        if let Some(old) = self.lease.lock().unwrap().replace(Lease { path, renew }) {
            old.renew.abort();
            let _ = self.rt.block_on(self.os.delete(&old.path));
        }
        Ok(())
    }

    /// True when a job other than this one holds a live lease on the store.
    pub fn others_active(&self) -> Result<bool> {
        let own = self.lease.lock().unwrap().as_ref().map(|l| l.path.clone());
        let leases: Vec<_> = self
            .rt
            .block_on(retry_cut_short(&self.url, || {
                self.os
                    .list(Some(&ObjPath::from("locks")))
                    .try_collect::<Vec<_>>()
            }))
            .map_err(self.backend())?;
        let now = chrono_now();
        Ok(leases.iter().any(|m| {
            Some(&m.location) != own.as_ref()
                && now - m.last_modified.timestamp() < LEASE_TTL.as_secs() as i64
        }))
    }

    /// How block ids are computed in this namespace.
    pub fn hasher(&self) -> Hasher {
        self.hasher
    }

    /// Seals an encoded block frame for this namespace (a no-op without encryption).
    pub fn seal_frame(&self, frame: Vec<u8>, h: &Hash) -> Vec<u8> {
        self.seal(frame, h)
    }

    fn path(&self, key: &str) -> ObjPath {
        ObjPath::from(format!("{}{key}", self.prefix))
    }

    pub(crate) fn seal(&self, data: Vec<u8>, aad: &[u8]) -> Vec<u8> {
        match &self.sealer {
            Some(s) => s.seal(&data, aad),
            None => data,
        }
    }

    fn unseal(&self, data: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        match &self.sealer {
            Some(s) => s.open(data, aad),
            None => Some(data.to_vec()),
        }
    }

    fn parse_index(&self, at: &ObjPath, b: &[u8]) -> Result<Vec<(Hash, Location)>> {
        let plain = self.unseal(b, b"ferry index").ok_or_else(|| {
            StoreError::Format(format!(
                "{at} (cannot be decrypted: altered, or another key's)"
            ))
        })?;
        pack::parse_index(&plain).ok_or_else(|| StoreError::Format(at.to_string()))
    }

    fn get(&self, key: &ObjPath) -> Result<Bytes> {
        self.rt
            .block_on(retry_cut_short(&self.url, || {
                let (os, key) = (self.os.clone(), key.clone());
                async move { os.get(&key).await?.bytes().await }
            }))
            .map_err(self.backend())
    }

    fn put(&self, key: &str, data: Vec<u8>) -> Result<()> {
        self.rt
            .block_on(self.os.put(&self.path(key), PutPayload::from(data)))
            .map_err(self.backend())?;
        Ok(())
    }

    /// Starts uploading a finished pack in the background: the pack, then its index, then its
    /// blocks become visible (so no index ever points at a missing or partial pack).
    pub(crate) fn spawn_pack_upload(
        &self,
        id: u128,
        data: Vec<u8>,
        entries: Vec<(Hash, Location)>,
    ) -> tokio::task::JoinHandle<Result<()>> {
        let index = self.seal(pack::index_bytes(id, &entries), b"ferry index");
        let (os, map, url) = (self.os.clone(), self.index.clone(), self.url.clone());
        let (pack_path, index_path) = (
            self.path(&format!("packs/{id:032x}.pack")),
            self.path(&format!("index/{id:032x}.idx")),
        );
        let span = tracing::debug_span!("pack_upload", bytes = data.len());
        let upload = async move {
            let fail = |cause| StoreError::Backend {
                url: url.clone(),
                cause,
            };
            os.put(&pack_path, PutPayload::from(data))
                .await
                .map_err(fail)?;
            os.put(&index_path, PutPayload::from(index))
                .await
                .map_err(fail)?;
            let mut idx = map.write().unwrap();
            for (h, loc) in entries {
                idx.insert(h, loc);
            }
            Ok(())
        };
        self.rt.spawn(tracing::Instrument::instrument(upload, span))
    }

    /// Waits for a background upload.
    pub(crate) fn join_upload(&self, h: tokio::task::JoinHandle<Result<()>>) -> Result<()> {
        self.rt
            .block_on(h)
            .unwrap_or_else(|e| Err(StoreError::Format(format!("pack upload task failed: {e}"))))
    }

    /// How many packs may upload at once: several for a network store (latency; see
    /// [`Store::set_upload_parallelism`]), one locally.
    pub fn upload_parallelism(&self) -> usize {
        self.uploads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets how many packs a network store uploads at once (a job's `--threads`); a local
    /// store keeps writing one at a time.
    pub fn set_upload_parallelism(&self, n: usize) {
        if !self.url.starts_with("file://") {
            self.uploads
                .store(n.max(1), std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Reads several blocks, fetching neighbouring frames of one pack with coalesced ranged
    /// reads; each block is decoded and checked against its hash.
    pub fn read_blocks(&self, hashes: &[Hash]) -> Result<Vec<Vec<u8>>> {
        let mut locs = Vec::with_capacity(hashes.len());
        for h in hashes {
            locs.push(
                self.locate(h)
                    .ok_or_else(|| StoreError::Missing(hex::encode(h)))?,
            );
        }
        let mut by_pack: HashMap<u128, Vec<usize>> = HashMap::new();
        for (i, l) in locs.iter().enumerate() {
            by_pack.entry(l.pack).or_default().push(i);
        }
        let mut out: Vec<Vec<u8>> = vec![Vec::new(); hashes.len()];
        for (pack, idxs) in by_pack {
            let key = self.path(&format!("packs/{pack:032x}.pack"));
            let ranges: Vec<std::ops::Range<usize>> = idxs
                .iter()
                .map(|&i| locs[i].offset as usize..(locs[i].offset + locs[i].len as u64) as usize)
                .collect();
            let wanted: usize = ranges.iter().map(|r| r.len()).sum();
            let end = ranges.iter().map(|r| r.end).max().unwrap_or(0);
            // Most of a pack wanted: one plain GET of the whole object beats ranged reads.
            let frames: Vec<Bytes> = if wanted * 2 >= end {
                let all = self.get(&key)?;
                ranges
                    .iter()
                    .map(|r| {
                        all.get(r.clone())
                            .map(|_| all.slice(r.clone()))
                            .ok_or_else(|| StoreError::Corrupt {
                                pack: format!("{pack:032x}"),
                                block: "(pack shorter than its index says)".into(),
                            })
                    })
                    .collect::<Result<_>>()?
            } else {
                self.rt
                    .block_on(retry_cut_short(&self.url, || {
                        self.os.get_ranges(&key, &ranges)
                    }))
                    .map_err(self.backend())?
            };
            for (&i, frame) in idxs.iter().zip(frames) {
                out[i] = self.decode_checked(&hashes[i], locs[i], &frame)?;
            }
        }
        Ok(out)
    }

    fn decode_checked(&self, h: &Hash, loc: Location, frame: &[u8]) -> Result<Vec<u8>> {
        let corrupt = || StoreError::Corrupt {
            pack: format!("{:032x}", loc.pack),
            block: hex::encode(h),
        };
        // One copy (or the decryption itself) per block: an opened frame is decoded in place.
        let raw = match &self.sealer {
            Some(s) => s
                .open(frame, h)
                .and_then(|plain| pack::decode_owned(plain, loc)),
            None => pack::decode(frame, loc),
        }
        .ok_or_else(corrupt)?;
        if self.hasher.hash(&raw) != *h {
            return Err(corrupt());
        }
        Ok(raw)
    }

    /// Reads one block's frame, decodes it and checks it against its hash.
    pub fn read_block(&self, h: &Hash) -> Result<Vec<u8>> {
        let loc = self
            .locate(h)
            .ok_or_else(|| StoreError::Missing(hex::encode(h)))?;
        let key = self.path(&format!("packs/{:032x}.pack", loc.pack));
        let range = loc.offset as usize..(loc.offset + loc.len as u64) as usize;
        let frame = self
            .rt
            .block_on(retry_cut_short(&self.url, || {
                self.os.get_range(&key, range.clone())
            }))
            .map_err(self.backend())?;
        self.decode_checked(h, loc, &frame)
    }

    /// Stores a recovery point's manifest (sealed, and bound to its name, when encrypted).
    pub fn put_manifest(&self, vm: &str, point: i64, m: &Manifest) -> Result<String> {
        let key = manifest_key(vm, point);
        let data = self.seal(m.to_bytes(), key.as_bytes());
        self.put(&key, data)?;
        Ok(key)
    }

    /// Reads a recovery point's manifest.
    pub fn get_manifest(&self, key: &str) -> Result<Manifest> {
        let b = self.get(&self.path(key))?;
        let plain = self.unseal(&b, key.as_bytes()).ok_or_else(|| {
            StoreError::Format(format!(
                "{key} (cannot be decrypted: altered, or another key's)"
            ))
        })?;
        Manifest::from_bytes(&plain).map_err(|_| StoreError::Format(key.into()))
    }

    /// Deletes a recovery point's manifest (its blocks go with the next garbage collection).
    pub fn delete_manifest(&self, key: &str) -> Result<()> {
        match self.rt.block_on(self.os.delete(&self.path(key))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.backend()(e)),
        }
    }

    /// Deletes packs none of whose blocks any manifest in the store references, if they are
    /// older than `grace` (so packs a running job just wrote are never collected). Returns the
    /// number of packs deleted.
    pub fn collect_garbage(&self, grace: std::time::Duration) -> Result<usize> {
        if self.others_active()? {
            return Ok(0); // another job may be writing or reading packs: try next time
        }
        let points = self.path("points");
        let manifests: Vec<_> = self
            .rt
            .block_on(retry_cut_short(&self.url, || {
                self.os.list(Some(&points)).try_collect::<Vec<_>>()
            }))
            .map_err(self.backend())?;
        let mut live = std::collections::HashSet::new();
        for m in manifests {
            let name = m.location.as_ref();
            let man = self.get_manifest(name.strip_prefix(self.prefix.as_str()).unwrap_or(name))?;
            for d in &man.disks {
                live.extend(d.hashes.iter().copied());
            }
        }
        let index = self.path("index");
        let packs: Vec<_> = self
            .rt
            .block_on(retry_cut_short(&self.url, || {
                self.os.list(Some(&index)).try_collect::<Vec<_>>()
            }))
            .map_err(self.backend())?;
        let now = chrono_now();
        let mut deleted = 0;
        for p in packs {
            if now - p.last_modified.timestamp() < grace.as_secs() as i64 {
                continue;
            }
            let b = self.get(&p.location)?;
            let entries = self.parse_index(&p.location, &b)?;
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
                .block_on(self.os.delete(&self.path(&format!("packs/{id}.pack"))));
            let mut idx = self.index.write().unwrap();
            for (h, _) in entries {
                idx.remove(&h);
            }
            deleted += 1;
        }
        Ok(deleted)
    }
}

/// Runs `op` (a request and the reading of its answer) again, with backoff and within the
/// retry budget, while it fails with an answer that started and then broke off. object_store
/// retries a request until its answer starts. A connection dropped in the middle of a body
/// comes later and is retried here. Reads only: they can be repeated without effect.
async fn retry_cut_short<T, Fut>(
    url: &str,
    mut op: impl FnMut() -> Fut,
) -> std::result::Result<T, object_store::Error>
where
    Fut: std::future::Future<Output = std::result::Result<T, object_store::Error>>,
{
    let budget = backend::retry_budget();
    let start = std::time::Instant::now();
    let mut wait = std::time::Duration::from_millis(100);
    loop {
        match op().await {
            Err(e) if cut_short(&e) && start.elapsed() + wait < budget => {
                tracing::debug!("store {url}: an answer broke off ({e}); asking again");
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(std::time::Duration::from_secs(4));
            }
            r => return r,
        }
    }
}

/// True when `e` is an answer that broke off (its body cut short or undecodable).
fn cut_short(e: &object_store::Error) -> bool {
    let mut text = e.to_string();
    let mut cur = std::error::Error::source(e);
    while let Some(c) = cur {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cur = c.source();
    }
    let text = text.to_lowercase();
    [
        "decoding response body",
        "error reading a body",
        "connection reset",
        "connection closed before message completed",
        "unexpected eof",
        "end of file before message length",
    ]
    .iter()
    .any(|m| text.contains(m))
}

fn chrono_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Some(l) = self.lease.get_mut().unwrap().take() {
            l.renew.abort();
            // Bounded: on a dead server the lease simply expires after LEASE_TTL.
            let del = self.os.delete(&l.path);
            let _ = self.rt.block_on(async {
                tokio::time::timeout(std::time::Duration::from_secs(2), del).await
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_blocks::BlockMap;

    #[test]
    fn only_answers_that_broke_off_are_asked_again_here() {
        let generic = |m: &str| object_store::Error::Generic {
            store: "S3",
            source: m.to_string().into(),
        };
        assert!(cut_short(&generic("error decoding response body")));
        assert!(cut_short(&generic(
            "Connection reset by peer (os error 104)"
        )));
        assert!(!cut_short(&generic(
            "Server returned non-2xx status code: 503"
        )));
        assert!(!cut_short(&object_store::Error::NotFound {
            path: "x".into(),
            source: "gone".into(),
        }));
    }

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
    fn a_refresh_sees_packs_another_process_stored_and_packs_it_deleted() {
        let (dir, s) = open_temp();
        let url = format!("file://{}", dir.path().display());
        let other = Arc::new(Store::open(&url).unwrap());
        let put = |st: &Arc<Store>, byte: u8| {
            let mut w = PackWriter::new(st.clone(), 1 << 20);
            let a = vec![byte; 4096];
            let h = ferry_blocks::hash_block(&a);
            w.add(h, &a, Codec::Raw, 4096).unwrap();
            w.finish().unwrap();
            h
        };
        let a = put(&other, 1);
        assert!(!s.contains(&a), "not seen before a refresh");
        s.refresh().unwrap();
        assert!(s.contains(&a));
        let b = put(&other, 2);
        s.refresh().unwrap();
        assert!(
            s.contains(&a) && s.contains(&b),
            "a refresh adds only the new pack"
        );
        assert_eq!(s.read_block(&b).unwrap(), vec![2u8; 4096]);
        // The other process collects both packs (no manifest refers to them): a refresh
        // forgets them instead of pointing at packs that are gone.
        assert_eq!(other.collect_garbage(std::time::Duration::ZERO).unwrap(), 2);
        s.refresh().unwrap();
        assert!(!s.contains(&a) && !s.contains(&b));
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

    #[test]
    fn a_live_lease_holds_off_garbage_collection() {
        let (dir, s) = open_temp();
        let url = format!("file://{}", dir.path().display());
        let s = Arc::new(s);
        let mut w = PackWriter::new(s.clone(), 1 << 20);
        let a = vec![5u8; 4096];
        w.add(ferry_blocks::hash_block(&a), &a, Codec::Raw, 4096)
            .unwrap();
        w.finish().unwrap();
        // The pack is unreferenced; another job holds a lease: nothing is collected.
        let job = Store::open(&url).unwrap();
        job.hold_lease("replicate vm1").unwrap();
        let gc = Store::open(&url).unwrap();
        gc.hold_lease("gc").unwrap();
        assert!(gc.others_active().unwrap());
        assert!(!job.others_active().unwrap() || gc.others_active().unwrap());
        assert_eq!(gc.collect_garbage(std::time::Duration::ZERO).unwrap(), 0);
        drop(job); // the job ends and releases its lease
        assert!(!gc.others_active().unwrap());
        assert_eq!(gc.collect_garbage(std::time::Duration::ZERO).unwrap(), 1);
    }

    #[test]
    fn encrypted_namespace_hides_plaintext_and_refuses_other_keys() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().display());
        let key = crypto::Key::generate();
        let s = Arc::new(Store::open_with(&url, Some(&key)).unwrap());
        let text = b"TOP-SECRET-PAYROLL-RECORD ".repeat(2521);
        let block = &text[..65536];
        let h = s.hasher().hash(block);
        assert_ne!(h, ferry_blocks::hash_block(block), "block ids are keyed");
        let mut comp = zstd::bulk::Compressor::new(1).unwrap();
        let (f, c) = encode(&mut comp, block);
        let mut w = PackWriter::new(s.clone(), 1 << 20);
        w.add(h, &f, c, block.len() as u32).unwrap();
        w.finish().unwrap();
        let mut m = ferry_blocks::BlockMap::zeros(65536, 65536);
        m.hashes[0] = h;
        let mkey = s
            .put_manifest("vm1", 1, &Manifest { disks: vec![m] })
            .unwrap();
        // Same key, new process: everything readable.
        let again = Store::open_with(&url, Some(&key)).unwrap();
        assert_eq!(again.read_block(&h).unwrap(), block);
        assert_eq!(again.get_manifest(&mkey).unwrap().disks[0].hashes[0], h);
        // Another key or no key: nothing of it is visible.
        let other = Store::open_with(&url, Some(&crypto::Key::generate())).unwrap();
        assert!(!other.contains(&h));
        assert!(other.get_manifest(&mkey).is_err());
        assert!(!Store::open(&url).unwrap().contains(&h));
        // No stored object holds the plaintext (compressed or not) or the key.
        let mut stack = vec![dir.path().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(d).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    stack.push(p);
                    continue;
                }
                let b = std::fs::read(&p).unwrap();
                assert!(
                    !b.windows(20).any(|w| w == &text[..20]),
                    "plaintext in {}",
                    p.display()
                );
                assert!(!b.windows(16).any(|w| w == &key.block_id_key()[..16]));
            }
        }
    }
}
