//! A crash-safe record of what ferry wrote to a target disk.
//!
//! - Before blocks whose content was known are overwritten, a durable *intent* marks them
//!   [`UNKNOWN`] (blocks already unknown need none).
//! - After the data is written (not yet durable) a *done* record carries their new hashes.
//! - After the disk was flushed, a durable *sync* record says "every done record before byte N
//!   of this journal is durable".
//!
//! Replaying the journal over the map the disk had before gives a map that is never wrong: a
//! block is either known exactly or unknown (and then re-sent). Done records without a later
//! sync are ignored, so flushing the disk is needed only now and then, not per batch.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{io_err, BlockError, BlockMap, Hash, Result, UNKNOWN};

const INTENT: u8 = 1;
const DONE: u8 = 2;
const SYNC: u8 = 3;

/// Append-only journal of writes to one disk.
#[derive(Debug)]
pub struct MapJournal {
    file: File,
    path: PathBuf,
    len: u64,
}

impl MapJournal {
    /// Opens (creating if needed) the journal at `path` for appending. A torn record at the end
    /// (a crash mid-append) is cut off first, so new records never follow garbage.
    pub fn open(path: &Path) -> Result<Self> {
        let existed = path.exists();
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_err(path))?;
        let mut len = file.metadata().map_err(io_err(path))?.len();
        if existed {
            let b = std::fs::read(path).map_err(io_err(path))?;
            let valid = valid_prefix(&b) as u64;
            if valid < len {
                file.set_len(valid).map_err(io_err(path))?;
                file.sync_all().map_err(io_err(path))?;
                len = valid;
            }
        } else {
            sync_parent(path);
        }
        Ok(MapJournal {
            file,
            path: path.to_path_buf(),
            len,
        })
    }

    /// Records that blocks `start..start+count` are about to be overwritten (durably).
    pub fn intent(&mut self, start: u64, count: u64) -> Result<()> {
        let mut rec = Vec::with_capacity(17);
        rec.push(INTENT);
        rec.extend_from_slice(&start.to_le_bytes());
        rec.extend_from_slice(&count.to_le_bytes());
        self.append(&rec, true)
    }

    /// Records the hashes now durably stored in blocks `start..start+hashes.len()`.
    pub fn done(&mut self, start: u64, hashes: &[Hash]) -> Result<()> {
        let mut rec = Vec::with_capacity(17 + hashes.len() * 32);
        rec.push(DONE);
        rec.extend_from_slice(&start.to_le_bytes());
        rec.extend_from_slice(&(hashes.len() as u64).to_le_bytes());
        for h in hashes {
            rec.extend_from_slice(h);
        }
        self.append(&rec, true)?;
        self.sync()
    }

    /// Records several intents with one flush: `(start, count)` each.
    pub fn intents(&mut self, runs: &[(u64, u64)]) -> Result<()> {
        let mut rec = Vec::with_capacity(17 * runs.len());
        for &(start, count) in runs {
            rec.push(INTENT);
            rec.extend_from_slice(&start.to_le_bytes());
            rec.extend_from_slice(&count.to_le_bytes());
        }
        if rec.is_empty() {
            return Ok(());
        }
        self.append(&rec, true)
    }

    /// Records several written runs `(start, hashes)`; they count only after a later [`Self::sync`].
    pub fn done_many(&mut self, runs: &[(u64, Vec<Hash>)]) -> Result<()> {
        let mut rec = Vec::new();
        for (start, hashes) in runs {
            rec.push(DONE);
            rec.extend_from_slice(&start.to_le_bytes());
            rec.extend_from_slice(&(hashes.len() as u64).to_le_bytes());
            for h in hashes {
                rec.extend_from_slice(h);
            }
        }
        self.append(&rec, false)
    }

    /// Declares every earlier record durable; call it right after flushing the disk.
    pub fn sync(&mut self) -> Result<()> {
        let mut rec = vec![SYNC];
        rec.extend_from_slice(&self.len.to_le_bytes());
        rec.extend_from_slice(&0u64.to_le_bytes());
        self.append(&rec, true)
    }

    /// Empties the journal (after its effect was saved into the map file).
    pub fn reset(path: &Path) -> Result<()> {
        match std::fs::remove_file(path) {
            Ok(()) => {
                sync_parent(path);
                Ok(())
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    fn append(&mut self, rec: &[u8], durable: bool) -> Result<()> {
        self.file.write_all(rec).map_err(io_err(&self.path))?;
        self.len += rec.len() as u64;
        if durable {
            self.file.sync_data().map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Applies the journal at `path` (if any) to `map`. A torn last record is ignored:
    /// its intent, if written, already marked the blocks unknown.
    pub fn replay(path: &Path, map: &mut BlockMap) -> Result<()> {
        let b = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_err(path)(e)),
        };
        // First pass: how far done records are covered by a sync record.
        let mut synced_upto = 0u64;
        let mut pos = 0;
        // Lengths are checked: a damaged record must not overflow or reach past the file.
        let body_end = |pos: usize, count: u64| -> Option<usize> {
            count
                .checked_mul(32)
                .and_then(|n| n.checked_add(pos as u64 + 17))
                .filter(|&e| e <= b.len() as u64)
                .map(|e| e as usize)
        };
        while pos + 17 <= b.len() {
            let tag = b[pos];
            let a = u64::from_le_bytes(b[pos + 1..pos + 9].try_into().unwrap());
            let count = u64::from_le_bytes(b[pos + 9..pos + 17].try_into().unwrap());
            match tag {
                SYNC => synced_upto = a,
                DONE => {
                    let Some(end) = body_end(pos, count) else {
                        break;
                    };
                    pos = end - 17;
                }
                INTENT => {}
                _ => break,
            }
            pos += 17;
        }
        let mut pos = 0;
        while pos + 17 <= b.len() {
            let rec_start = pos as u64;
            let tag = b[pos];
            let start64 = u64::from_le_bytes(b[pos + 1..pos + 9].try_into().unwrap());
            let count64 = u64::from_le_bytes(b[pos + 9..pos + 17].try_into().unwrap());
            let in_disk = start64
                .checked_add(count64)
                .is_some_and(|e| e <= map.hashes.len() as u64);
            if tag != SYNC && !in_disk {
                return Err(BlockError::Format(format!(
                    "{}: journal names blocks beyond the disk",
                    path.display()
                )));
            }
            let (start, count) = (start64 as usize, count64 as usize);
            let done_end = body_end(pos, count64);
            pos += 17;
            match tag {
                INTENT => map.hashes[start..start + count].fill(UNKNOWN),
                DONE => {
                    let Some(end) = done_end else {
                        break; // torn record
                    };
                    if rec_start < synced_upto {
                        for (k, c) in b[pos..end].chunks_exact(32).enumerate() {
                            map.hashes[start + k] = c.try_into().unwrap();
                        }
                    }
                    pos = end;
                }
                SYNC => {}
                _ => {
                    return Err(BlockError::Format(format!(
                        "{}: not a ferry journal",
                        path.display()
                    )))
                }
            }
        }
        Ok(())
    }
}

/// Length of the longest prefix of `b` made of whole records.
fn valid_prefix(b: &[u8]) -> usize {
    let mut pos = 0;
    while pos + 17 <= b.len() {
        let count = u64::from_le_bytes(b[pos + 9..pos + 17].try_into().unwrap()) as usize;
        let body = match b[pos] {
            INTENT | SYNC => 0,
            DONE => match count.checked_mul(32) {
                Some(n) => n,
                None => return pos,
            },
            _ => return pos,
        };
        if pos + 17 + body > b.len() {
            return pos;
        }
        pos += 17 + body;
    }
    pos
}

/// Makes a file's creation or removal durable (best effort).
fn sync_parent(path: &Path) {
    if let Some(d) = path.parent().and_then(|d| File::open(d).ok()) {
        let _ = d.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        // A journal left by a crash (or damaged on disk) is replayed or refused, never
        // followed past its end or past the disk.
        #[test]
        fn any_journal_bytes_replay_or_are_refused(
            b in proptest::collection::vec(any::<u8>(), 0..200),
            records in proptest::collection::vec((0u8..4, any::<u64>(), 0u64..1 << 62), 0..4),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("j");
            let mut bytes = b;
            for (tag, start, count) in records {
                bytes.push(tag);
                bytes.extend_from_slice(&start.to_le_bytes());
                bytes.extend_from_slice(&count.to_le_bytes());
            }
            std::fs::write(&p, &bytes).unwrap();
            let mut m = BlockMap::zeros(8 * 4096, 4096);
            let _ = MapJournal::replay(&p, &mut m);
            prop_assert_eq!(m.hashes.len(), 8);
        }
    }

    #[test]
    fn replay_marks_in_flight_blocks_unknown_and_applies_done_ones() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("j");
        let mut j = MapJournal::open(&p).unwrap();
        j.intent(0, 2).unwrap();
        j.done(0, &[[5; 32], [6; 32]]).unwrap();
        j.intent(3, 1).unwrap(); // crash before done
        drop(j);
        let mut m = BlockMap::zeros(5 * 4096, 4096);
        MapJournal::replay(&p, &mut m).unwrap();
        assert_eq!(m.hashes[0], [5; 32]);
        assert_eq!(m.hashes[1], [6; 32]);
        assert_eq!(m.hashes[2], crate::ZERO);
        assert_eq!(m.hashes[3], UNKNOWN);
        // Done records count only once a sync record covers them.
        let mut j = MapJournal::open(&p).unwrap();
        j.done_many(&[(2, vec![[7; 32]])]).unwrap();
        drop(j);
        MapJournal::replay(&p, &mut m).unwrap();
        assert_eq!(m.hashes[2], crate::ZERO, "unsynced done record ignored");
        let mut j = MapJournal::open(&p).unwrap();
        j.sync().unwrap();
        j.done_many(&[(4, vec![[8; 32]])]).unwrap();
        drop(j);
        let mut m = BlockMap::zeros(5 * 4096, 4096);
        MapJournal::replay(&p, &mut m).unwrap();
        assert_eq!(m.hashes[2], [7; 32]);
        assert_eq!(m.hashes[3], UNKNOWN);
        assert_eq!(m.hashes[4], crate::ZERO, "done after the last sync ignored");
        // A torn trailing record is ignored.
        let mut b = std::fs::read(&p).unwrap();
        b.extend_from_slice(&[DONE, 4, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 9]);
        std::fs::write(&p, b).unwrap();
        MapJournal::replay(&p, &mut m).unwrap();
        assert_eq!(m.hashes[4], crate::ZERO);
        // Appending after the torn record: it is cut off first, so later records stay readable.
        let mut j = MapJournal::open(&p).unwrap();
        j.intent(1, 1).unwrap();
        j.done_many(&[(1, vec![[9; 32]])]).unwrap();
        j.sync().unwrap();
        drop(j);
        let mut m = BlockMap::zeros(5 * 4096, 4096);
        MapJournal::replay(&p, &mut m).unwrap();
        assert_eq!(m.hashes[1], [9; 32]);
        assert_eq!(m.hashes[3], UNKNOWN);
    }
}
