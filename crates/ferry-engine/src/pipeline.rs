//! The parallel block pipeline: one reader, N hash/compress workers and an in-order consumer.
//!
//! Memory is bounded by the number of chunks in flight (a token is taken per chunk read and
//! given back once the consumer is done with it), never by the disk size.
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{bounded, Receiver, Sender};
use ferry_blocks::{BlockDevice, BlockMap, Hash, Hasher, MapJournal, ZERO};
use ferry_store::{encode, Codec, PackWriter, Store};

use crate::jobs::{Cancelled, JobCtx};

/// Blocks fetched from the store per request group when restoring (coalesced ranged reads).
const RESTORE_GROUP: usize = 512;
/// Most bytes of blocks fetched together when applying maps.
const APPLY_GROUP_BYTES: u64 = 4 << 20;
/// Reader threads of a pass that reads scattered blocks (change tracking).
const READERS_SPARSE: usize = 8;
/// Most writes of one batch in flight at once.
const WRITERS: usize = 4;
/// Blocks per chunk read by the reader.
const CHUNK_BLOCKS: u64 = 16;
/// Blocks per chunk when change tracking leaves scattered blocks to read: only those are
/// buffered, and larger chunks halve the hand-offs between threads. Fewer of them are in
/// flight, so the read-ahead (and the memory when every block changed) stays the same.
const CHUNK_BLOCKS_SPARSE: u64 = 32;
/// Bytes of pending target writes collected before they are written out.
const WRITE_BATCH: usize = 4 << 20;
/// Longest time between disk flushes (bounds what a crash makes ferry re-send).
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Most bytes written between disk flushes.
const SYNC_BYTES: u64 = 256 << 20;

/// A block the pipeline decided to move.
struct Moved {
    index: u64,
    hash: Hash,
    /// Compressed frame when the block is new to the store.
    frame: Option<(Vec<u8>, Codec)>,
    /// Length of the frame as it crosses the wire (stored frame length when already stored).
    wire_len: u64,
}

struct ChunkIn {
    seq: u64,
    first: u64,
    n: u64,
    data: ChunkData,
    /// False when the chunk lies in a hole (data is empty; every block is zero).
    read: bool,
    /// Per block, its hash when known without reading it (empty: every block was read).
    preset: Vec<Option<Hash>>,
}

struct ChunkOut {
    seq: u64,
    first: u64,
    hashes: Vec<Hash>,
    moved: Vec<Moved>,
    data: ChunkData,
}

/// The bytes read of one chunk: every block at `k * block_size` (dense), or only the blocks
/// read, one after another (compact, when change tracking leaves a few blocks to read).
#[derive(Default)]
struct ChunkData {
    bytes: Vec<u8>,
    /// Compact layout: each block's byte range in `bytes`, `None` when not read. Empty: dense.
    at: Vec<Option<std::ops::Range<usize>>>,
}

impl ChunkData {
    /// Block `k`'s bytes, if it was read.
    fn block(&self, k: u64, bs: u64) -> Option<&[u8]> {
        if self.at.is_empty() {
            let s = (k * bs) as usize;
            let e = (s + bs as usize).min(self.bytes.len());
            (s < e).then(|| &self.bytes[s..e])
        } else {
            self.at
                .get(k as usize)
                .cloned()
                .flatten()
                .map(|r| &self.bytes[r])
        }
    }

    /// Where block `k` starts in `bytes` (blocks read one after another are contiguous).
    fn offset(&self, k: u64, bs: u64) -> usize {
        if self.at.is_empty() {
            (k * bs) as usize
        } else {
            self.at[k as usize].as_ref().map_or(0, |r| r.start)
        }
    }
}

/// What a pass over a source disk does with blocks that differ from `target`.
pub struct PassSpec<'a> {
    /// Source disk.
    pub src: &'a dyn BlockDevice,
    /// Block size.
    pub block_size: u64,
    /// Known content of the destination (a point's map or the target disk's map); blocks whose
    /// hash equals it are skipped. `UNKNOWN` entries always move.
    pub target: Arc<BlockMap>,
    /// How block ids are computed (keyed when the replication is encrypted).
    pub hasher: Hasher,
    /// Store that receives blocks new to it (None: hash only).
    pub store: Option<Arc<Store>>,
    /// Disk to write moved blocks to, with its journal.
    pub write: Option<(&'a dyn BlockDevice, &'a mut MapJournal)>,
    /// Count moved payload as crossing sites (`bytes_transferred`).
    pub crosses_sites: bool,
    /// What is known about the source without reading it (change tracking): blocks outside
    /// its changed ranges are read only when their data must move.
    pub known: Option<KnownSource>,
}

/// The source's content as far as change tracking proves it.
#[derive(Debug, Clone)]
pub struct KnownSource {
    /// The source's map at the tracking mark.
    pub map: Arc<BlockMap>,
    /// Byte ranges `[start, end)` written since the mark (sorted): read and hashed again.
    pub changed: Vec<(u64, u64)>,
}

impl KnownSource {
    /// For blocks `first..first + n`: each block's hash when it need not be read — outside the
    /// changed ranges, known, and `must_read(known, target)` false (its data is not needed to
    /// move it). Computed per chunk, so a pass holds no per-block table for the whole disk.
    fn presets(
        &self,
        first: u64,
        n: u64,
        target: &BlockMap,
        must_read: &dyn Fn(Hash, Hash) -> bool,
    ) -> Vec<Option<Hash>> {
        let bs = self.map.block_size;
        (first..first + n)
            .map(|i| {
                let k = self.map.hashes[i as usize];
                if k == ferry_blocks::UNKNOWN || overlaps(&self.changed, i * bs, (i + 1) * bs) {
                    return None;
                }
                (!must_read(k, target.hashes[i as usize])).then_some(k)
            })
            .collect()
    }
}

/// Outcome of a pass.
#[derive(Debug, Clone)]
pub struct PassResult {
    /// Hash of every source block (unvisited blocks keep the target's hash).
    pub map: BlockMap,
    /// Number of blocks that differed.
    pub blocks_moved: u64,
    /// Bytes of blocks that differed.
    pub bytes_moved: u64,
}

/// Runs one pass: reads the source, hashes every block, and moves the differing ones into the
/// store and/or onto the target disk.
pub fn pass(ctx: &JobCtx, spec: PassSpec<'_>) -> Result<PassResult> {
    let _span = tracing::debug_span!("pass", tracked = spec.known.is_some()).entered();
    let bs = spec.block_size;
    let size = spec.src.size();
    let nblocks = ferry_blocks::block_count(size, bs);
    anyhow::ensure!(
        spec.target.len() as u64 == nblocks,
        "internal: target map has {} blocks, source {}",
        spec.target.len(),
        nblocks
    );
    let data_ranges = spec.src.data_ranges().context("listing allocated ranges")?;
    if let Some(st) = &spec.store {
        // `--threads` bounds the uploads in flight too.
        st.set_upload_parallelism(ctx.threads);
    }
    if let Some(k) = &spec.known {
        anyhow::ensure!(
            k.map.len() as u64 == nblocks && k.map.block_size == bs,
            "internal: known map does not fit the source"
        );
    }
    let writes_any = spec.write.is_some();
    // Onto a disk, a block that differs from the target needs its data. Into a store, a block
    // needs its data only when the store lacks it (even when unchanged: a point must never
    // refer to a block the store lost); hashing alone never needs it.
    let store_ref = spec.store.clone();
    let must_read = move |known: Hash, target: Hash| {
        if writes_any {
            known != target
        } else {
            known != ZERO && store_ref.as_ref().is_some_and(|st| !st.contains(&known))
        }
    };
    let known = spec.known.clone().map(|mut k| {
        k.changed.sort_unstable();
        k
    });
    // Readers: one for a full pass (large sequential reads), several when change tracking
    // leaves scattered blocks to read (latency-bound; the consumer restores the order).
    // A target that is unknown everywhere (a full download) leaves nothing to skip.
    let sparse = known.is_some()
        && !spec
            .target
            .hashes
            .iter()
            .all(|h| *h == ferry_blocks::UNKNOWN);
    let per_chunk = if sparse {
        CHUNK_BLOCKS_SPARSE
    } else {
        CHUNK_BLOCKS
    };
    let mut chunks: Vec<(u64, u64)> = Vec::new();
    let mut b = 0;
    while b < nblocks {
        let n = (nblocks - b).min(per_chunk);
        chunks.push((b, n));
        b += n;
    }
    let threads = ctx.threads.max(1);
    // The read-ahead (and the memory when every block must be read) is `inflight` chunks: the
    // same bytes whatever the chunk size.
    let inflight = ((threads * 4 + 4) * CHUNK_BLOCKS as usize / per_chunk as usize).max(2);
    let (tok_tx, tok_rx) = bounded::<()>(inflight);
    for _ in 0..inflight {
        tok_tx.send(()).unwrap();
    }
    let (work_tx, work_rx) = bounded::<ChunkIn>(inflight);
    let (out_tx, out_rx) = bounded::<Result<ChunkOut>>(inflight);
    let mut map = (*spec.target).clone();
    let mut result = PassResult {
        map: BlockMap::zeros(0, bs),
        blocks_moved: 0,
        bytes_moved: 0,
    };
    let src = spec.src;
    let target = spec.target.clone();
    let store = spec.store.clone();
    let writes = spec.write.is_some();
    let mut write = spec.write;
    let crosses = spec.crosses_sites;
    let hasher = spec.hasher;
    let next_chunk = std::sync::atomic::AtomicUsize::new(0);

    std::thread::scope(|s| -> Result<()> {
        // (A reader holds a token while it reads: more readers than tokens would only wait.)
        let readers = if sparse {
            READERS_SPARSE.min(inflight)
        } else {
            1
        };
        for _ in 0..readers {
            let out_err = out_tx.clone();
            let chunks_ref = &chunks;
            let ranges_ref = &data_ranges;
            let known_ref = &known;
            let must_read_ref = &must_read;
            let target_ref = &target;
            let next_chunk = &next_chunk;
            let tok_rx = tok_rx.clone();
            let work_tx = work_tx.clone();
            s.spawn(move || loop {
                if tok_rx.recv().is_err() || ctx.is_cancelled() {
                    break;
                }
                let seq = next_chunk.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(&(first, n)) = chunks_ref.get(seq) else {
                    break;
                };
                let start = first * bs;
                let end = ((first + n) * bs).min(size);
                let in_data = overlaps(ranges_ref, start, end);
                let mut preset = Vec::new();
                if let (true, Some(k)) = (in_data, known_ref) {
                    preset = k.presets(first, n, target_ref, must_read_ref);
                }
                let must_read = |k: u64| preset.is_empty() || preset[k as usize].is_none();
                let mut data = ChunkData::default();
                if in_data && (0..n).any(must_read) {
                    let block_len = |k: u64| (end - start - k * bs).min(bs) as usize;
                    if preset.is_empty() || (0..n).all(must_read) {
                        data.bytes = vec![0u8; (end - start) as usize];
                    } else {
                        // Only the blocks to read, one after another.
                        let mut at = 0usize;
                        data.at = (0..n)
                            .map(|k| {
                                must_read(k).then(|| {
                                    at += block_len(k);
                                    at - block_len(k)..at
                                })
                            })
                            .collect();
                        data.bytes = vec![0u8; at];
                    }
                    // Runs of blocks that must be read (all of them without presets).
                    let mut k = 0u64;
                    let mut failed = false;
                    while k < n {
                        if !must_read(k) {
                            k += 1;
                            continue;
                        }
                        let mut m = 1;
                        while k + m < n && must_read(k + m) {
                            m += 1;
                        }
                        let s = data.offset(k, bs);
                        let e = s + (k..k + m).map(block_len).sum::<usize>();
                        if let Err(err) = src.read_at(start + k * bs, &mut data.bytes[s..e]) {
                            let _ = out_err.send(Err(err.into()));
                            failed = true;
                            break;
                        }
                        ctx.add_read((e - s) as u64);
                        k += m;
                    }
                    if failed {
                        break;
                    }
                }
                ctx.add_step_done(end - start);
                let chunk = ChunkIn {
                    seq: seq as u64,
                    first,
                    n,
                    data,
                    read: in_data,
                    preset,
                };
                if work_tx.send(chunk).is_err() {
                    break;
                }
            });
        }
        drop(work_tx);
        drop(tok_rx);
        // Workers.
        for _ in 0..threads {
            let work_rx: Receiver<ChunkIn> = work_rx.clone();
            let out_tx: Sender<Result<ChunkOut>> = out_tx.clone();
            let target = target.clone();
            let store = store.clone();
            s.spawn(move || {
                let mut comp = zstd::bulk::Compressor::new(1).expect("zstd");
                for c in work_rx.iter() {
                    let out = hash_chunk(
                        c,
                        bs,
                        hasher,
                        !writes,
                        &target,
                        store.as_deref(),
                        writes,
                        &mut comp,
                    );
                    if out_tx.send(out).is_err() {
                        break;
                    }
                }
            });
        }
        drop(work_rx);
        drop(out_tx);

        // Consumer (this thread), in chunk order.
        let mut next = 0u64;
        let mut held = std::collections::BTreeMap::new();
        let mut packs = store
            .as_ref()
            .map(|st| PackWriter::new(st.clone(), ferry_store::PACK_TARGET));
        let mut batch: Vec<Pending> = Vec::new();
        let mut batch_bytes = 0usize;
        let mut unsynced = 0u64;
        let mut last_sync = std::time::Instant::now();
        let mut failure: Option<anyhow::Error> = None;
        for r in out_rx.iter() {
            let c = match r {
                Ok(c) => c,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            held.insert(c.seq, c);
            while let Some(c) = held.remove(&next) {
                next += 1;
                let step = (|| -> Result<()> {
                    for (k, h) in c.hashes.iter().enumerate() {
                        map.hashes[(c.first + k as u64) as usize] = *h;
                    }
                    for m in &c.moved {
                        result.blocks_moved += 1;
                        let r = map.block_range(m.index);
                        let len = r.end - r.start;
                        result.bytes_moved += len;
                        if let (Some(p), Some((frame, codec))) = (packs.as_mut(), &m.frame) {
                            p.add_sealed(m.hash, frame, *codec, len as u32)?;
                        }
                        if crosses && m.hash != ZERO {
                            ctx.add_transferred(m.wire_len);
                        }
                    }
                    Ok(())
                })();
                let step = step.and_then(|_| {
                    let Some((dev, journal)) = write.as_mut() else {
                        return Ok(());
                    };
                    if !c.moved.is_empty() {
                        let blocks: Vec<(u64, Hash)> =
                            c.moved.iter().map(|m| (m.index, m.hash)).collect();
                        batch_bytes += blocks
                            .iter()
                            .map(|(i, _)| {
                                let r = map.block_range(*i);
                                (r.end - r.start) as usize
                            })
                            .sum::<usize>();
                        batch.push(Pending {
                            first: c.first,
                            data: c.data,
                            blocks,
                        });
                    }
                    let due = last_sync.elapsed() >= SYNC_INTERVAL;
                    if batch_bytes >= WRITE_BATCH || (due && !batch.is_empty()) {
                        unsynced += batch_bytes as u64;
                        write_batch(ctx, *dev, journal, &target, &map, &mut batch)?;
                        batch_bytes = 0;
                    }
                    if unsynced > 0 && (due || unsynced >= SYNC_BYTES) {
                        let _span = tracing::debug_span!("flush").entered();
                        dev.flush()?;
                        journal.sync()?;
                        ctx.batch_durable();
                        unsynced = 0;
                        last_sync = std::time::Instant::now();
                    }
                    Ok(())
                });
                tok_tx.send(()).ok();
                if let Err(e) = step {
                    failure = Some(e);
                    break;
                }
            }
            if failure.is_some() {
                break;
            }
        }
        drop(out_rx);
        drop(tok_tx);
        // Whatever was processed is made durable, even when stopping early.
        if let Some((dev, journal)) = write.as_mut() {
            let _span = tracing::debug_span!("final_writes").entered();
            let wrote = write_batch(ctx, *dev, journal, &target, &map, &mut batch);
            // What was written is made durable even when a write failed (a full file system):
            // the journal then lets a re-run skip it.
            let synced = (|| -> Result<()> {
                dev.flush()?;
                journal.sync()?;
                Ok(())
            })();
            if failure.is_none() {
                wrote?;
                synced?;
                ctx.batch_durable();
            }
        }
        if let Some(p) = packs.take() {
            let _span = tracing::debug_span!("packs_finish").entered();
            let r = p.finish();
            if failure.is_none() {
                r?;
                // Every pack of the pass is stored (no point refers to them yet).
                ctx.batch_durable();
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if (next as usize) < chunks.len() {
            if ctx.is_cancelled() {
                return Err(Cancelled.into());
            }
            return Err(anyhow!("internal: pipeline stopped early"));
        }
        Ok(())
    })?;
    result.map = map;
    Ok(result)
}

/// True when `[start, end)` overlaps one of the sorted, disjoint `ranges`.
fn overlaps(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    let i = ranges.partition_point(|&(_, b)| b <= start);
    ranges.get(i).is_some_and(|&(a, _)| a < end)
}

#[allow(clippy::too_many_arguments)]
fn hash_chunk(
    c: ChunkIn,
    bs: u64,
    hasher: Hasher,
    require_stored: bool,
    target: &BlockMap,
    store: Option<&Store>,
    keep_data: bool,
    comp: &mut zstd::bulk::Compressor<'_>,
) -> Result<ChunkOut> {
    let nblocks = c.n;
    let mut hashes = Vec::with_capacity(nblocks as usize);
    let mut moved = Vec::new();
    for k in 0..nblocks {
        let idx = c.first + k;
        let preset = c.preset.get(k as usize).copied().flatten();
        let h = if let Some(h) = preset {
            h
        } else if c.read {
            hasher.hash(c.data.block(k, bs).unwrap_or(&[]))
        } else {
            ZERO
        };
        hashes.push(h);
        let known = target.hashes[idx as usize];
        // Unchanged blocks are skipped; when feeding a recovery point, only if the store still
        // holds them (a point must never reference a block the store lost).
        let stored = !require_stored || h == ZERO || store.is_none_or(|s| s.contains(&h));
        if h == known && known != ferry_blocks::UNKNOWN && stored {
            continue;
        }
        let (frame, wire_len) = if h == ZERO {
            (None, 0)
        } else if store.is_none() {
            // Hash-only or disk-to-disk: nothing to encode.
            (None, 0)
        } else if let Some(loc) = store.and_then(|s| s.locate(&h)) {
            (None, loc.len as u64)
        } else {
            let Some(raw) = c.data.block(k, bs).filter(|_| preset.is_none()) else {
                // Known by change tracking and in the store a moment ago: gone since.
                return Err(anyhow!(
                    "block {idx} left the store during the pass (a concurrent garbage collection?); run the command again"
                ));
            };
            let (f, codec) = encode(comp, raw);
            // Sealed here, in parallel, not on the single in-order consumer.
            let f = match store {
                Some(s) => s.seal_frame(f, &h),
                None => f,
            };
            let l = f.len() as u64;
            (Some((f, codec)), l)
        };
        moved.push(Moved {
            index: idx,
            hash: h,
            frame,
            wire_len,
        });
    }
    Ok(ChunkOut {
        seq: c.seq,
        first: c.first,
        hashes,
        data: if keep_data && !moved.is_empty() {
            c.data
        } else {
            ChunkData::default()
        },
        moved,
    })
}

/// Moved blocks of one chunk waiting to be written, with the chunk's data.
struct Pending {
    first: u64,
    data: ChunkData,
    blocks: Vec<(u64, Hash)>,
}

/// Writes a batch of blocks: a durable intent for runs whose old content was known, the data
/// (straight from the chunk buffers, runs coalesced), then done records (which count once the
/// next sync covers them).
fn write_batch(
    ctx: &JobCtx,
    dev: &dyn BlockDevice,
    journal: &mut MapJournal,
    target: &BlockMap,
    map: &BlockMap,
    batch: &mut Vec<Pending>,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let _span = tracing::debug_span!("write_batch", chunks = batch.len()).entered();
    let bs = map.block_size;
    // Runs of consecutive moved blocks within one chunk: (pending, first position, count).
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    for (pi, p) in batch.iter().enumerate() {
        let mut k = 0;
        while k < p.blocks.len() {
            let mut n = 1;
            while k + n < p.blocks.len() && p.blocks[k + n].0 == p.blocks[k].0 + n as u64 {
                n += 1;
            }
            runs.push((pi, k, n));
            k += n;
        }
    }
    let intents: Vec<(u64, u64)> = runs
        .iter()
        .filter(|&&(pi, k, n)| {
            batch[pi].blocks[k..k + n]
                .iter()
                .any(|(i, _)| target.hashes[*i as usize] != ferry_blocks::UNKNOWN)
        })
        .map(|&(pi, k, n)| (batch[pi].blocks[k].0, n as u64))
        .collect();
    journal.intents(&intents)?;
    // The writes of the batch: data slices and zeroed ranges (holes), run by run.
    enum Op {
        Zero(u64, u64),
        Data(u64, usize, usize, usize),
    }
    let mut ops = Vec::new();
    let mut done = Vec::with_capacity(runs.len());
    for &(pi, k, n) in &runs {
        let p = &batch[pi];
        let blocks = &p.blocks[k..k + n];
        // Within the run, data blocks are written in one slice; holes become zeroes.
        let mut j = 0;
        while j < n {
            let zero = blocks[j].1 == ZERO;
            let mut m = 1;
            while j + m < n && (blocks[j + m].1 == ZERO) == zero {
                m += 1;
            }
            let start = map.block_range(blocks[j].0).start;
            let end = map.block_range(blocks[j + m - 1].0).end;
            if zero {
                ops.push(Op::Zero(start, end - start));
            } else {
                // Blocks of a run that were all read lie one after another in either layout.
                let off = p.data.offset(blocks[j].0 - p.first, bs);
                ops.push(Op::Data(start, pi, off, (end - start) as usize));
            }
            j += m;
        }
        done.push((blocks[0].0, blocks.iter().map(|b| b.1).collect::<Vec<_>>()));
    }
    let run_op = |op: &Op| -> Result<()> {
        match *op {
            Op::Zero(start, len) => {
                dev.write_zeroes(start, len)?;
                ctx.add_written(len);
            }
            Op::Data(start, pi, off, len) => {
                dev.write_at(start, &batch[pi].data.bytes[off..off + len])?;
                ctx.add_written(len as u64);
            }
        }
        Ok(())
    };
    // Scattered writes are latency-bound: several in flight (devices are thread-safe; the
    // intents above are durable, and nothing counts as done before the next flush).
    let writers = if ops.len() > 2 * WRITERS { WRITERS } else { 1 };
    if writers <= 1 {
        ops.iter().try_for_each(run_op)?;
    } else {
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = (0..writers)
                .map(|w| {
                    let ops = &ops;
                    let run_op = &run_op;
                    s.spawn(move || ops.iter().skip(w).step_by(writers).try_for_each(run_op))
                })
                .collect();
            join_writers(handles)
        })?;
    }
    for &(pi, k, n) in &runs {
        let blocks = &batch[pi].blocks[k..k + n];
        let start = map.block_range(blocks[0].0).start;
        let end = map.block_range(blocks[n - 1].0).end;
        dev.start_writeback(start, end - start);
    }
    journal.done_many(&done)?;
    batch.clear();
    Ok(())
}

/// Fetches one group of blocks of `map` from the store (checked against their hashes) and
/// writes them onto `dev`, starting writeback of each contiguous run; returns the block count.
fn restore_group(
    ctx: &JobCtx,
    store: &Store,
    map: &BlockMap,
    dev: &dyn BlockDevice,
    group: &[u64],
) -> Result<usize> {
    let hashes: Vec<Hash> = group.iter().map(|&i| map.hashes[i as usize]).collect();
    let blocks = store.read_blocks(&hashes)?;
    let mut run: Option<(u64, u64)> = None;
    for (&i, data) in group.iter().zip(&blocks) {
        let r = map.block_range(i);
        dev.write_at(r.start, data)?;
        ctx.add_written(data.len() as u64);
        ctx.add_step_done(data.len() as u64);
        run = match run {
            Some((start, end)) if end == r.start => Some((start, r.end)),
            Some((start, end)) => {
                dev.start_writeback(start, end - start);
                Some((r.start, r.end))
            }
            None => Some((r.start, r.end)),
        };
    }
    if let Some((start, end)) = run {
        dev.start_writeback(start, end - start);
    }
    Ok(group.len())
}

/// Writes the blocks of `map` from the store onto `dev` (a freshly created, zeroed disk),
/// verifying each block against its hash.
pub fn restore(
    ctx: &JobCtx,
    store: &Arc<Store>,
    map: &BlockMap,
    dev: &dyn BlockDevice,
    label: &str,
) -> Result<()> {
    let wanted: Vec<u64> = (0..map.len() as u64)
        .filter(|&i| map.hashes[i as usize] != ZERO)
        .collect();
    // Network stores are latency-bound: keep several ranged reads in flight even on few cores.
    let threads = ctx.threads.max(store.upload_parallelism()).max(1);
    let (job_tx, job_rx) = bounded::<Vec<u64>>(threads * 2);
    let (out_tx, out_rx) = bounded::<Result<usize>>(threads);
    std::thread::scope(|s| -> Result<()> {
        let wanted_ref = &wanted;
        s.spawn(move || {
            // Work is cut per pack (then at most RESTORE_GROUP blocks), so a worker can fetch a
            // pack it needs most of with one request.
            let mut groups: Vec<Vec<u64>> = Vec::new();
            let mut last_pack = None;
            for &i in wanted_ref {
                let pack = store.locate(&map.hashes[i as usize]).map(|l| l.pack);
                match groups.last_mut() {
                    Some(g) if pack == last_pack && g.len() < RESTORE_GROUP => g.push(i),
                    _ => groups.push(vec![i]),
                }
                last_pack = pack;
            }
            for group in groups {
                if ctx.is_cancelled() || job_tx.send(group).is_err() {
                    break;
                }
            }
        });
        for _ in 0..threads {
            let job_rx = job_rx.clone();
            let out_tx = out_tx.clone();
            let store = store.clone();
            // Each worker fetches, checks and writes its own blocks: writing into the page cache
            // costs about as much CPU as the download, so it must not funnel through one thread.
            s.spawn(move || {
                for group in job_rx.iter() {
                    let r = restore_group(ctx, &store, map, dev, &group).map_err(|e| {
                        let first = group.first().copied().unwrap_or(0);
                        e.context(format!("{label}, blocks from {first}"))
                    });
                    if out_tx.send(r).is_err() {
                        break;
                    }
                }
            });
        }
        drop(job_rx);
        drop(out_tx);
        let mut done = 0usize;
        let drained = (|| -> Result<()> {
            for r in out_rx.iter() {
                done += r?;
            }
            Ok(())
        })();
        // Closing the channel stops the workers and the feeder even when we stop early.
        drop(out_rx);
        drained?;
        if done < wanted.len() {
            if ctx.is_cancelled() {
                return Err(Cancelled.into());
            }
            return Err(anyhow!("internal: restore stopped early"));
        }
        dev.flush()?;
        // A disk restored (not yet marked consistent: a crash restores it again).
        ctx.batch_durable();
        Ok(())
    })
}

/// Waits for every disk writer of a scope; the first error (or panic) is the answer.
fn join_writers(handles: Vec<std::thread::ScopedJoinHandle<'_, Result<()>>>) -> Result<()> {
    for h in handles {
        h.join()
            .map_err(|_| anyhow!("internal: a disk writer panicked"))??;
    }
    Ok(())
}

/// One group of blocks to apply: zero blocks (written as zeroes) or blocks fetched together.
struct ApplyGroup {
    zero: bool,
    blocks: Vec<u64>,
}

/// Writes onto `dev` every block where `source` differs from `target` (what the disk holds as
/// far as known; `UNKNOWN` always differs): zero blocks as zeroes, the others fetched from the
/// store and checked against their hashes. Journaled: a durable intent before blocks of known
/// content are overwritten, done records synced after each batch, so a crash leaves `target`
/// plus the journal exact. The store's frames count as transferred. Returns blocks and bytes
/// written.
pub fn apply(
    ctx: &JobCtx,
    store: &Arc<Store>,
    source: &BlockMap,
    target: &BlockMap,
    dev: &dyn BlockDevice,
    journal: &mut MapJournal,
    label: &str,
) -> Result<(u64, u64)> {
    anyhow::ensure!(
        source.len() == target.len() && source.block_size == target.block_size,
        "internal: {label}: the source map does not fit the disk"
    );
    // Groups of at most APPLY_GROUP_BYTES: a batch (and what a crash can make ferry re-send)
    // stays a few of them.
    let per_group =
        ((APPLY_GROUP_BYTES / source.block_size.max(1)) as usize).clamp(1, RESTORE_GROUP);
    let mut groups: Vec<ApplyGroup> = Vec::new();
    let mut last_pack = None;
    for i in 0..source.len() as u64 {
        let (s, t) = (source.hashes[i as usize], target.hashes[i as usize]);
        if s == t && t != ferry_blocks::UNKNOWN {
            continue;
        }
        anyhow::ensure!(
            s != ferry_blocks::UNKNOWN,
            "internal: {label}: block {i} of the source is unknown"
        );
        let zero = s == ZERO;
        let pack = if zero {
            None
        } else {
            store.locate(&s).map(|l| l.pack)
        };
        match groups.last_mut() {
            Some(g)
                if g.zero == zero && (zero || pack == last_pack) && g.blocks.len() < per_group =>
            {
                g.blocks.push(i)
            }
            _ => groups.push(ApplyGroup {
                zero,
                blocks: vec![i],
            }),
        }
        last_pack = pack;
    }
    let (mut blocks, mut bytes) = (0u64, 0u64);
    let threads = ctx.threads.max(store.upload_parallelism()).max(1);
    for batch in groups.chunks(threads * 2) {
        if ctx.is_cancelled() {
            return Err(Cancelled.into());
        }
        let mut all: Vec<u64> = batch
            .iter()
            .flat_map(|g| g.blocks.iter().copied())
            .collect();
        all.sort_unstable();
        let runs = |pred: &dyn Fn(u64) -> bool| {
            let mut out: Vec<(u64, u64)> = Vec::new();
            for &i in all.iter().filter(|&&i| pred(i)) {
                match out.last_mut() {
                    Some((s, n)) if *s + *n == i => *n += 1,
                    _ => out.push((i, 1)),
                }
            }
            out
        };
        journal.intents(&runs(&|i| {
            target.hashes[i as usize] != ferry_blocks::UNKNOWN
        }))?;
        std::thread::scope(|s| -> Result<()> {
            let handles: Vec<_> = (0..threads.min(batch.len()))
                .map(|w| {
                    s.spawn(move || -> Result<()> {
                        for g in batch.iter().skip(w).step_by(threads) {
                            if g.zero {
                                for &i in &g.blocks {
                                    let r = source.block_range(i);
                                    dev.write_zeroes(r.start, r.end - r.start)?;
                                    ctx.add_written(r.end - r.start);
                                    ctx.add_step_done(r.end - r.start);
                                }
                                continue;
                            }
                            for &i in &g.blocks {
                                let h = &source.hashes[i as usize];
                                ctx.add_transferred(store.locate(h).map_or(0, |l| l.len as u64));
                            }
                            restore_group(ctx, store, source, dev, &g.blocks).map_err(|e| {
                                e.context(format!("{label}, blocks from {}", g.blocks[0]))
                            })?;
                        }
                        Ok(())
                    })
                })
                .collect();
            join_writers(handles)
        })?;
        dev.flush()?;
        let done: Vec<(u64, Vec<Hash>)> = runs(&|_| true)
            .into_iter()
            .map(|(s, n)| (s, source.hashes[s as usize..(s + n) as usize].to_vec()))
            .collect();
        journal.done_many(&done)?;
        journal.sync()?;
        ctx.batch_durable();
        blocks += all.len() as u64;
        bytes += all
            .iter()
            .map(|&i| {
                let r = source.block_range(i);
                r.end - r.start
            })
            .sum::<u64>();
    }
    Ok((blocks, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_blocks::RawDisk;

    const BS: u64 = 4096;

    fn disk(dir: &std::path::Path, name: &str, fill: impl Fn(u64) -> u8) -> RawDisk {
        let d = RawDisk::create(&dir.join(name), 64 * BS).unwrap();
        for b in 0..64 {
            d.write_at(b * BS, &vec![fill(b); BS as usize]).unwrap();
        }
        d
    }

    fn scan(ctx: &JobCtx, src: &dyn BlockDevice, known: Option<KnownSource>) -> PassResult {
        pass(
            ctx,
            PassSpec {
                src,
                block_size: BS,
                target: Arc::new(BlockMap::unknown(src.size(), BS)),
                hasher: Hasher::PLAIN,
                store: None,
                write: None,
                crosses_sites: false,
                known,
            },
        )
        .unwrap()
    }

    /// A pass that writes `src` onto `dst`, whose content `target` describes.
    fn sync_onto(
        ctx: &JobCtx,
        src: &dyn BlockDevice,
        dst: &dyn BlockDevice,
        target: BlockMap,
        journal: &mut MapJournal,
        known: KnownSource,
    ) -> PassResult {
        pass(
            ctx,
            PassSpec {
                src,
                block_size: BS,
                target: Arc::new(target),
                hasher: Hasher::PLAIN,
                store: None,
                write: Some((dst, journal)),
                crosses_sites: false,
                known: Some(known),
            },
        )
        .unwrap()
    }

    #[test]
    fn overlap_of_sorted_ranges() {
        let r = [(10, 20), (30, 40)];
        assert!(overlaps(&r, 0, 11));
        assert!(!overlaps(&r, 0, 10));
        assert!(!overlaps(&r, 20, 30));
        assert!(overlaps(&r, 39, 100));
        assert!(!overlaps(&r, 40, 100));
        assert!(!overlaps(&[], 0, 100));
    }

    #[test]
    fn a_known_source_is_read_only_where_it_changed_or_its_data_must_move() {
        let dir = tempfile::tempdir().unwrap();
        let src = disk(dir.path(), "src", |b| b as u8 + 1);
        let ctx = JobCtx::new(2, None);
        let full = scan(&ctx, &src, None);
        assert_eq!(ctx.bytes_read(), 64 * BS);
        let mark = Arc::new(full.map.clone());

        // Blocks 5 and 40 change; tracking reports only block 5 (to prove the rest is trusted).
        src.write_at(5 * BS, &vec![0xee; BS as usize]).unwrap();
        src.write_at(40 * BS, &vec![0xee; BS as usize]).unwrap();
        let ctx = JobCtx::new(2, None);
        let tracked = scan(
            &ctx,
            &src,
            Some(KnownSource {
                map: mark.clone(),
                changed: vec![(5 * BS + 10, 5 * BS + 20)],
            }),
        );
        assert_eq!(ctx.bytes_read(), BS, "only the changed block is read");
        assert_ne!(tracked.map.hashes[5], full.map.hashes[5]);
        assert_eq!(
            tracked.map.hashes[40], full.map.hashes[40],
            "untracked block trusted"
        );

        // Onto a disk: a block outside the changed ranges is still read when the target
        // differs there (its data must move), and the target ends equal to the source.
        let dst = disk(dir.path(), "dst", |b| if b == 9 { 0 } else { b as u8 + 1 });
        let mut target = full.map.clone();
        target.hashes[9] = ferry_blocks::ZERO;
        let mut journal = MapJournal::open(&dir.path().join("j")).unwrap();
        let ctx = JobCtx::new(2, None);
        let known = KnownSource {
            map: mark,
            changed: vec![(5 * BS, 6 * BS), (40 * BS, 41 * BS)],
        };
        let r = sync_onto(&ctx, &src, &dst, target, &mut journal, known);
        assert_eq!(r.blocks_moved, 3);
        assert_eq!(ctx.bytes_read(), 3 * BS);
        for b in 0..64 {
            let (mut x, mut y) = (vec![0u8; BS as usize], vec![0u8; BS as usize]);
            src.read_at(b * BS, &mut x).unwrap();
            dst.read_at(b * BS, &mut y).unwrap();
            assert_eq!(x, y, "block {b}");
        }
    }

    #[test]
    fn scattered_runs_and_a_short_last_block_are_read_compactly_and_written_in_place() {
        // 150 blocks and a 512-byte tail: three sparse chunks, the last one short.
        let dir = tempfile::tempdir().unwrap();
        let size = 150 * BS + 512;
        let fill = |d: &RawDisk, f: &dyn Fn(u64) -> u8| {
            for b in 0..151 {
                let len = (size - b * BS).min(BS) as usize;
                d.write_at(b * BS, &vec![f(b); len]).unwrap();
            }
        };
        let src = RawDisk::create(&dir.path().join("src"), size).unwrap();
        fill(&src, &|b| b as u8 + 1);
        let ctx = JobCtx::new(2, None);
        let mark = Arc::new(scan(&ctx, &src, None).map);
        let dst = RawDisk::create(&dir.path().join("dst"), size).unwrap();
        fill(&dst, &|b| b as u8 + 1);
        let dst_map = scan(&ctx, &dst, None).map;
        // The source changes in a run of 3 blocks (across no chunk edge), one lone block and
        // the tail; tracking reports exactly those.
        for b in [10, 11, 12, 70] {
            src.write_at(b * BS, &vec![0xa0 + b as u8; BS as usize])
                .unwrap();
        }
        src.write_at(150 * BS, &[0xee; 512]).unwrap();
        let mut journal = MapJournal::open(&dir.path().join("j")).unwrap();
        let ctx = JobCtx::new(2, None);
        let known = KnownSource {
            map: mark,
            changed: vec![(10 * BS, 13 * BS), (70 * BS, 71 * BS), (150 * BS, size)],
        };
        let r = sync_onto(&ctx, &src, &dst, dst_map, &mut journal, known);
        assert_eq!(r.blocks_moved, 5);
        assert_eq!(ctx.bytes_read(), 4 * BS + 512);
        let (mut x, mut y) = (vec![0u8; size as usize], vec![0u8; size as usize]);
        src.read_at(0, &mut x).unwrap();
        dst.read_at(0, &mut y).unwrap();
        assert!(x == y, "the target differs from the source after the pass");
    }
}
