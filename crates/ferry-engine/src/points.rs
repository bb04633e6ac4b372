//! Store work on recovery points: seal and store a point's manifest, read one back, retention
//! (delete manifests, collect packs nothing references) and verification. It needs the
//! store's credentials and, for an encrypted VM, its key; so when every host of a job is
//! served by an agent, the control plane sends it as [`PointsReq`] to one of those agents,
//! and neither credentials nor key have to reach the control plane. Only maps (whose block
//! ids are keyed hashes for an encrypted VM) and counters travel back.
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use ferry_blocks::{Manifest, ZERO};
use ferry_store::Store;
use serde::{Deserialize, Serialize};

use crate::data::{Map, StoreRef};

/// One piece of store work for one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointsReq {
    /// VM name.
    pub vm: String,
    /// The VM's store (and key id).
    pub store: StoreRef,
    /// What to do.
    pub op: PointsOp,
}

/// Store work on points (each answers its own `…Out`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PointsOp {
    /// Store the manifest of point `point` (answers [`PutOut`]).
    Put {
        /// Point id (from the vault).
        point: i64,
        /// Map of each disk.
        disks: Vec<Map>,
    },
    /// Read a point's manifest (answers [`GetOut`]).
    Get {
        /// Its key in the store.
        manifest: String,
    },
    /// Whether another job holds a lease on the store (answers [`BusyOut`]).
    Busy,
    /// Delete manifests, then collect packs nothing references that are older than
    /// `grace_s` (answers [`PruneOut`]).
    Prune {
        /// Keys of the manifests (points the vault already forgot).
        manifests: Vec<String>,
        /// Age under which a pack is never collected.
        grace_s: u64,
    },
    /// Read back every block of a point and check it against its hash (answers [`VerifyOut`]).
    Verify {
        /// Its key in the store.
        manifest: String,
        /// Point id (for messages).
        point: i64,
    },
}

/// Answer of [`PointsOp::Put`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutOut {
    /// Key of the stored manifest.
    pub manifest: String,
}

/// Answer of [`PointsOp::Get`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GetOut {
    /// Map of each disk.
    pub disks: Vec<Map>,
}

/// Answer of [`PointsOp::Busy`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BusyOut {
    /// True when another job holds a live lease.
    pub busy: bool,
}

/// Answer of [`PointsOp::Prune`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PruneOut {
    /// Packs deleted.
    pub collected: usize,
    /// Why garbage collection was skipped, if it failed (the manifests are deleted anyway).
    pub gc_error: Option<String>,
}

/// Answer of [`PointsOp::Verify`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyOut {
    /// Blocks read back and checked.
    pub blocks: u64,
    /// Their bytes.
    pub bytes: u64,
}

/// Runs `op` on `store` (already opened in the VM's namespace) and answers its `…Out` as JSON.
pub fn run(store: &Arc<Store>, vm: &str, op: &PointsOp) -> Result<serde_json::Value> {
    Ok(match op {
        PointsOp::Put { point, disks } => {
            let m = Manifest {
                disks: disks.iter().map(|d| d.0.clone()).collect(),
            };
            serde_json::to_value(PutOut {
                manifest: store.put_manifest(vm, *point, &m)?,
            })?
        }
        PointsOp::Get { manifest } => serde_json::to_value(GetOut {
            disks: store
                .get_manifest(manifest)?
                .disks
                .into_iter()
                .map(Map)
                .collect(),
        })?,
        PointsOp::Busy => serde_json::to_value(BusyOut {
            busy: store.others_active()?,
        })?,
        PointsOp::Prune { manifests, grace_s } => {
            for m in manifests {
                store.delete_manifest(m)?;
            }
            let (collected, gc_error) = match store.collect_garbage(Duration::from_secs(*grace_s)) {
                Ok(n) => (n, None),
                Err(e) => (0, Some(e.to_string())),
            };
            serde_json::to_value(PruneOut {
                collected,
                gc_error,
            })?
        }
        PointsOp::Verify { manifest, point } => {
            serde_json::to_value(verify(store, manifest, *point)?)?
        }
    })
}

/// Reads back every block of a point and checks it against its hash.
pub fn verify(store: &Store, manifest: &str, point: i64) -> Result<VerifyOut> {
    let m = store
        .get_manifest(manifest)
        .with_context(|| format!("point {point}: manifest unreadable"))?;
    let mut out = VerifyOut::default();
    for (di, d) in m.disks.iter().enumerate() {
        let data_blocks: Vec<usize> = (0..d.hashes.len())
            .filter(|&b| d.hashes[b] != ZERO)
            .collect();
        // Groups of blocks share coalesced ranged reads; a failing group is re-read block by
        // block so the error names the exact block.
        for group in data_blocks.chunks(256) {
            let hashes: Vec<_> = group.iter().map(|&b| d.hashes[b]).collect();
            let datas = match store.read_blocks(&hashes) {
                Ok(v) => v,
                Err(_) => group
                    .iter()
                    .map(|&bi| {
                        store
                            .read_block(&d.hashes[bi])
                            .with_context(|| format!("point {point}, disk {di}, block {bi}"))
                    })
                    .collect::<Result<Vec<_>>>()?,
            };
            out.blocks += datas.len() as u64;
            out.bytes += datas.iter().map(|x| x.len() as u64).sum::<u64>();
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_blocks::BlockMap;

    fn store() -> (tempfile::TempDir, Arc<Store>) {
        let d = tempfile::tempdir().unwrap();
        let s = Store::open(&format!("file://{}", d.path().display())).unwrap();
        (d, Arc::new(s))
    }

    #[test]
    fn a_point_put_through_a_request_reads_back_equal_and_prunes_away() {
        let (_d, s) = store();
        let mut m = BlockMap::zeros(2 << 16, 1 << 16);
        m.hashes[0] = [3u8; 32];
        let put = PointsOp::Put {
            point: 7,
            disks: vec![Map(m.clone())],
        };
        // The request crosses JSON as it does to an agent.
        let put: PointsOp = serde_json::from_str(&serde_json::to_string(&put).unwrap()).unwrap();
        let out: PutOut = serde_json::from_value(run(&s, "app", &put).unwrap()).unwrap();
        assert_eq!(out.manifest, ferry_store::manifest_key("app", 7));
        let got: GetOut = serde_json::from_value(
            run(
                &s,
                "app",
                &PointsOp::Get {
                    manifest: out.manifest.clone(),
                },
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(got.disks, vec![Map(m)]);
        let busy: BusyOut =
            serde_json::from_value(run(&s, "app", &PointsOp::Busy).unwrap()).unwrap();
        assert!(!busy.busy);
        let pruned: PruneOut = serde_json::from_value(
            run(
                &s,
                "app",
                &PointsOp::Prune {
                    manifests: vec![out.manifest.clone()],
                    grace_s: 0,
                },
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(pruned.gc_error, None);
        let gone = run(
            &s,
            "app",
            &PointsOp::Get {
                manifest: out.manifest,
            },
        );
        assert!(gone.is_err(), "a pruned manifest is gone");
    }

    /// A store (plaintext or encrypted) holding one point of `blocks` 4 KiB blocks of data:
    /// its manifest key and map.
    fn stored_point(
        dir: &std::path::Path,
        key: Option<&ferry_store::crypto::Key>,
    ) -> (Arc<Store>, String, BlockMap) {
        let s = Arc::new(Store::open_with(&format!("file://{}", dir.display()), key).unwrap());
        let mut m = BlockMap::zeros(6 * 4096, 4096);
        let mut w = ferry_store::PackWriter::new(s.clone(), ferry_store::PACK_TARGET);
        let mut comp = zstd::bulk::Compressor::new(1).unwrap();
        for i in 0..6usize {
            let data: Vec<u8> = (0..4096).map(|k| ((k * 7 + i * 13) % 251) as u8).collect();
            let h = s.hasher().hash(&data);
            m.hashes[i] = h;
            let (f, c) = ferry_store::encode(&mut comp, &data);
            w.add(h, &f, c, data.len() as u32).unwrap();
        }
        w.finish().unwrap();
        let key = s
            .put_manifest(
                "app",
                1,
                &Manifest {
                    disks: vec![m.clone()],
                },
            )
            .unwrap();
        (s, key, m)
    }

    /// Every file of the store (packs, indexes, manifests), in a stable order.
    fn objects(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
        let mut out = Vec::new();
        let mut todo = vec![dir.to_path_buf()];
        while let Some(d) = todo.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let p = e.path();
                if p.is_dir() {
                    todo.push(p);
                } else if !p.to_string_lossy().contains("locks") {
                    out.push(p);
                }
            }
        }
        out.sort();
        out
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

        // One flipped bit anywhere in any stored object of a point (a pack, its index, the
        // manifest; plaintext or encrypted) is found by `verify` and by a restore: an error,
        // never a wrong block accepted.
        #[test]
        fn one_flipped_bit_in_any_stored_object_is_detected_by_verify_and_restore(
            which in proptest::prelude::any::<usize>(),
            at in proptest::prelude::any::<usize>(),
            bit in 0u8..8,
            encrypted in proptest::prelude::any::<bool>(),
        ) {
            let d = tempfile::tempdir().unwrap();
            let key = encrypted.then(ferry_store::crypto::Key::generate);
            let (_, mkey, map) = stored_point(d.path(), key.as_ref());
            let objs = objects(d.path());
            let obj = &objs[which % objs.len()];
            let mut b = std::fs::read(obj).unwrap();
            let n = b.len();
            b[at % n] ^= 1 << bit;
            std::fs::write(obj, &b).unwrap();
            // A fresh process's view of the store (or its refusal to load a damaged index).
            let reopened = Store::open_with(&format!("file://{}", d.path().display()), key.as_ref());
            let Ok(s) = reopened else {
                return Ok(()); // refused at open, naming the object: detected
            };
            let s = Arc::new(s);
            let v = verify(&s, &mkey, 1);
            proptest::prop_assert!(v.is_err(), "verify missed a flip in {}", obj.display());
            // A restore reads the manifest the same way, then every block.
            let restored = s.get_manifest(&mkey).map_err(anyhow::Error::from).and_then(|m| {
                let disk = d.path().join("restore.raw");
                let dev = ferry_blocks::RawDisk::create(&disk, m.disks[0].size)?;
                crate::pipeline::restore(&crate::jobs::JobCtx::new(1, None), &s, &m.disks[0], &dev, "point 1, disk 0")
            });
            proptest::prop_assert!(restored.is_err(), "a restore missed a flip in {}", obj.display());
            let _ = map;
        }
    }

    #[test]
    fn verify_names_the_missing_block() {
        let (_d, s) = store();
        let mut m = BlockMap::zeros(2 << 16, 1 << 16);
        m.hashes[1] = [9u8; 32];
        let key = s
            .put_manifest("app", 1, &Manifest { disks: vec![m] })
            .unwrap();
        let e = verify(&s, &key, 1).unwrap_err();
        assert!(
            format!("{e:#}").contains("point 1, disk 0, block 1"),
            "{e:#}"
        );
    }
}
