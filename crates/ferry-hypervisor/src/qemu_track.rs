//! Change tracking and point-in-time views of the `qemu` driver.
//!
//! Every disk carries persistent dirty bitmaps named `ferry-<generation>` (64 KiB granularity,
//! stored in the qcow2 image, so they survive a clean QEMU exit). A mark ([`ChangeMark::Bitmap`])
//! names one generation; the writes since that mark are the union of that bitmap and every
//! later generation of the disk — a later generation is always started while the earlier one
//! still records, so the chain has no gap. Marks are recorded by the engine only once the maps
//! of that moment are saved; older generations are removed when a view closes committed or a
//! new mark replaces them.
//!
//! A view of a running VM is taken with one QMP `transaction` over all disks: per disk it
//! freezes a merged copy of the bitmaps since the caller's mark (a temporary disabled bitmap),
//! starts the next generation, and starts *fleecing* (`blockdev-backup sync=none` into a
//! temporary qcow2 overlay whose backing is the disk: QEMU copies old data there before the
//! guest overwrites it). The overlay is exported read-only over QEMU's NBD server with the
//! frozen bitmap, so ferry reads the disk exactly as it was at the transaction's instant while
//! the guest keeps writing, and learns the dirty extents through `qemu:dirty-bitmap:…`. Closing
//! the view cancels the backup job and deletes the overlay and the frozen bitmap: no overlay is
//! left behind, nothing needs merging back.
//!
//! A stopped VM's disks do not change while ferry reads them (its read-only `qemu-nbd` holds
//! the image lock, so QEMU cannot start meanwhile): the next generation is added with
//! `qemu-img bitmap --add`, and the bitmaps since the mark are exported by `qemu-nbd --bitmap`.
//!
//! Tracking cannot be trusted — and the engine falls back to reading every block — when the
//! mark's bitmap is missing (removed, the image replaced), a bitmap is flagged `in-use` /
//! inconsistent (QEMU was killed and never wrote it back), or a bitmap stopped recording
//! (disabled behind ferry's back). A bitmap *cleared* behind ferry's back cannot be detected:
//! `--verify` (a full hash comparison) is the safety net for that.
//!
//! While a view of a running VM is open, the guest's first write to each cluster first copies
//! the old data into the view's overlay (in the VM's folder): the overlay needs as much free
//! space as the guest overwrites during the read. The overlay of a ferry process that died is
//! removed the next time ferry looks at the VM (`vm show`, `status`, any job).
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_nbd::{dirty_bitmap_context, NbdDisk, BASE_ALLOCATION};
use serde_json::{json, Value};

use super::{alive, one_line, QemuDisk, QemuDriver, Server, VmFile, VmPaths, QMP_TIMEOUT};
use crate::qmp::Qmp;
use crate::{ChangeMark, Changes, DiskView, HvError, Result, ViewCloser, ViewDisk};

/// Prefix of ferry's tracking bitmaps.
const PREFIX: &str = "ferry-";
/// Granularity of tracking bitmaps (ferry's smallest block size).
const GRANULARITY: u64 = 64 << 10;
/// Longest wait for a cancelled fleecing job to go away.
const JOB_GONE_TIMEOUT: Duration = Duration::from_secs(15);

/// A bitmap of a disk as QEMU or `qemu-img` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BitmapState {
    /// Bitmap name.
    pub name: String,
    /// True when its content cannot be trusted (`in-use` in a closed image, `inconsistent`).
    pub inconsistent: bool,
    /// False when it does not record writes (disabled; `auto` missing in a closed image).
    pub recording: bool,
}

/// The generation of a ferry tracking bitmap name (`ferry-<digits>`).
pub(super) fn generation(name: &str) -> Option<u64> {
    let g = name.strip_prefix(PREFIX)?;
    if g.is_empty() || !g.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    g.parse().ok()
}

/// The bitmaps whose union holds every write since `since`, or why that is unknown
/// (`None`: there was no mark to go by).
pub(super) fn bitmaps_since(
    since: Option<&ChangeMark>,
    present: &[BitmapState],
) -> std::result::Result<Vec<String>, Option<String>> {
    let name = match since {
        None => return Err(None),
        Some(ChangeMark::Stamp { .. }) => {
            return Err(Some(
                "its change mark comes from another hypervisor driver".into(),
            ))
        }
        Some(ChangeMark::Bitmap { name }) => name,
    };
    let Some(g0) = generation(name) else {
        return Err(Some(format!(
            "its change mark {name:?} is not a ferry bitmap"
        )));
    };
    if !present.iter().any(|b| &b.name == name) {
        return Err(Some(format!(
            "its dirty bitmap {name} is missing from the image (removed, or the image was replaced)"
        )));
    }
    let mut chain: Vec<(u64, &BitmapState)> = present
        .iter()
        .filter_map(|b| generation(&b.name).map(|g| (g, b)))
        .filter(|(g, _)| *g >= g0)
        .collect();
    chain.sort_by_key(|(g, _)| *g);
    if let Some((_, b)) = chain.iter().find(|(_, b)| b.inconsistent) {
        return Err(Some(format!(
            "its dirty bitmap {} is inconsistent (QEMU stopped without saving it: killed or crashed)",
            b.name
        )));
    }
    if let Some((_, b)) = chain.iter().find(|(_, b)| !b.recording) {
        return Err(Some(format!(
            "its dirty bitmap {} was disabled and stopped recording writes",
            b.name
        )));
    }
    Ok(chain.into_iter().map(|(_, b)| b.name.clone()).collect())
}

/// The next generation: after every present one, and not before `now`.
pub(super) fn next_generation(present: &[BitmapState], now_micros: u64) -> u64 {
    present
        .iter()
        .filter_map(|b| generation(&b.name))
        .max()
        .map_or(now_micros, |g| (g + 1).max(now_micros))
}

/// Tracking bitmaps older than generation `keep`, to remove.
pub(super) fn older_than(present: &[BitmapState], keep: u64) -> Vec<String> {
    present
        .iter()
        .filter(|b| generation(&b.name).is_some_and(|g| g < keep))
        .map(|b| b.name.clone())
        .collect()
}

/// Microseconds since the epoch.
fn now_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// A short id unique to this process and view: `<pid>x<n>` (names of fleecing nodes, jobs,
/// exports and frozen bitmaps embed it, so leftovers of a dead ferry are recognised).
fn view_id() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{}x{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The owner pid embedded in a fleecing name `fv<pid>x<n>d<i>` / `ferry-view-<pid>x<n>-<i>`.
fn owner_of(name: &str) -> Option<i32> {
    let rest = name
        .strip_prefix("fv")
        .or_else(|| name.strip_prefix("ferry-view-"))?;
    rest.split('x').next()?.parse().ok()
}

/// Node name of the fleecing overlay of disk `i` in view `id`.
fn fleece_node(id: &str, i: u32) -> String {
    format!("fv{id}d{i}")
}

/// Job id of the fleecing job that feeds overlay node `fleece`.
fn fleece_job(fleece: &str) -> String {
    format!("{fleece}j")
}

/// Name of the frozen bitmap of disk `i` in view `id`.
fn frozen_bitmap(id: &str, i: u32) -> String {
    format!("ferry-view-{id}-{i}")
}

/// Bitmaps of every node of a running QEMU, by node name.
fn running_bitmaps(q: &mut Qmp) -> Result<Vec<(String, Value)>> {
    let nodes = q
        .execute("query-named-block-nodes", Some(json!({"flat": true})))
        .map_err(|e| HvError::Invalid(format!("query-named-block-nodes: {e}")))?;
    Ok(nodes
        .as_array()
        .map(|a| {
            a.iter()
                .map(|n| (n["node-name"].as_str().unwrap_or("").to_string(), n.clone()))
                .collect()
        })
        .unwrap_or_default())
}

fn states_of_node(node: &Value) -> Vec<BitmapState> {
    node["dirty-bitmaps"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| BitmapState {
                    name: b["name"].as_str().unwrap_or("").to_string(),
                    inconsistent: b["inconsistent"].as_bool().unwrap_or(false),
                    recording: b["recording"].as_bool().unwrap_or(true),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What one disk of a running VM needs in the view transaction.
struct RunningDisk {
    index: u32,
    size: u64,
    node: String,
    fleece: String,
    file: PathBuf,
    merge: std::result::Result<Vec<String>, Option<String>>,
    frozen: String,
}

impl QemuDriver {
    fn qmp_err(&self, vm: &str, what: &str) -> impl Fn(crate::qmp::QmpError) -> HvError + '_ {
        let vm = vm.to_string();
        let what = what.to_string();
        move |e| self.process(&vm, format!("{what}: {e}"))
    }

    /// Runs `qemu-img` with `args`, failing with its message.
    fn qemu_img(&self, vm: &str, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
        let _span = tracing::debug_span!("qemu-img", command = ?args.first()).entered();
        let out = Command::new(&self.img)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(self.io(format!("run {}", self.img.display())))?;
        if !out.status.success() {
            let shown: Vec<String> = args.iter().map(|a| a.to_string_lossy().into()).collect();
            return Err(self.process(
                vm,
                format!(
                    "`qemu-img {}` failed: {}",
                    shown.join(" "),
                    one_line(&String::from_utf8_lossy(&out.stderr))
                ),
            ));
        }
        Ok(out.stdout)
    }

    /// Bitmaps stored in a closed qcow2 image (`in-use` ones were never written back).
    fn image_bitmaps(&self, vm: &str, file: &std::path::Path) -> Result<Vec<BitmapState>> {
        let out = self.qemu_img(
            vm,
            &[
                "info".as_ref(),
                "--output=json".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                file.as_os_str(),
            ],
        )?;
        let v: Value = serde_json::from_slice(&out)
            .map_err(|e| self.process(vm, format!("qemu-img info printed no JSON: {e}")))?;
        Ok(v["format-specific"]["data"]["bitmaps"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|b| BitmapState {
                        name: b["name"].as_str().unwrap_or("").to_string(),
                        inconsistent: b["flags"]
                            .as_array()
                            .is_some_and(|f| f.iter().any(|x| x == "in-use")),
                        recording: b["flags"]
                            .as_array()
                            .is_some_and(|f| f.iter().any(|x| x == "auto")),
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// Adds (`add`) or removes bitmaps of a closed image.
    fn edit_image_bitmaps(
        &self,
        vm: &str,
        file: &std::path::Path,
        add: Option<&str>,
        remove: &[String],
    ) -> Result<()> {
        let g = GRANULARITY.to_string();
        if let Some(name) = add {
            self.qemu_img(
                vm,
                &[
                    "bitmap".as_ref(),
                    "--add".as_ref(),
                    "-g".as_ref(),
                    g.as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    file.as_os_str(),
                    name.as_ref(),
                ],
            )?;
        }
        for name in remove {
            self.qemu_img(
                vm,
                &[
                    "bitmap".as_ref(),
                    "--remove".as_ref(),
                    "-f".as_ref(),
                    "qcow2".as_ref(),
                    file.as_os_str(),
                    name.as_ref(),
                ],
            )?;
        }
        Ok(())
    }

    /// Removes what views of ferry processes that are gone left in a running QEMU: exports,
    /// fleecing jobs and overlays, frozen bitmaps, overlay files.
    pub(super) fn clean_stale_views(&self, q: &mut Qmp, p: &VmPaths) {
        let stale = |name: &str| owner_of(name).is_some_and(|pid| !alive(pid));
        if let Ok(ex) = q.execute("query-block-exports", None) {
            for e in ex.as_array().into_iter().flatten() {
                let id = e["id"].as_str().unwrap_or("");
                if stale(id) {
                    let _ = q.execute("block-export-del", Some(json!({"id": id, "mode": "hard"})));
                }
            }
        }
        if let Ok(jobs) = q.execute("query-block-jobs", None) {
            for j in jobs.as_array().into_iter().flatten() {
                let id = j["device"].as_str().unwrap_or("");
                if stale(id) {
                    let _ = q.execute(
                        "block-job-cancel",
                        Some(json!({"device": id, "force": true})),
                    );
                    wait_job_gone(q, id);
                }
            }
        }
        if let Ok(nodes) = running_bitmaps(q) {
            for (name, node) in &nodes {
                if stale(name) {
                    let _ = q.execute("blockdev-del", Some(json!({"node-name": name})));
                }
                for b in states_of_node(node) {
                    if stale(&b.name) {
                        let _ = q.execute(
                            "block-dirty-bitmap-remove",
                            Some(json!({"node": name, "name": b.name})),
                        );
                    }
                }
            }
        }
        remove_stale_overlay_files(p);
    }

    /// [`crate::Hypervisor::mark_disks`] for a VM whose QEMU runs.
    pub(super) fn mark_running(&self, vm: &VmFile, p: &VmPaths) -> Result<Vec<Option<ChangeMark>>> {
        let mut q = Qmp::connect_timeout(&p.qmp, QMP_TIMEOUT)
            .map_err(self.qmp_err(&vm.name, "cannot reach QMP to start change tracking"))?;
        let nodes = running_bitmaps(&mut q)?;
        let mut actions = Vec::new();
        let mut marks = Vec::new();
        let mut old = Vec::new();
        for d in &vm.disks {
            let node = format!("disk{}", d.index);
            let present = nodes
                .iter()
                .find(|(n, _)| *n == node)
                .map(|(_, v)| states_of_node(v))
                .unwrap_or_default();
            let g = next_generation(&present, now_micros());
            let name = format!("{PREFIX}{g}");
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": node, "name": name, "persistent": true, "granularity": GRANULARITY}}));
            old.push((node, older_than(&present, g)));
            marks.push(Some(ChangeMark::Bitmap { name }));
        }
        q.execute("transaction", Some(json!({"actions": actions})))
            .map_err(self.qmp_err(&vm.name, "cannot start change tracking"))?;
        for (node, names) in old {
            for n in names {
                let _ = q.execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": node, "name": n})),
                );
            }
        }
        Ok(marks)
    }

    /// [`crate::Hypervisor::mark_disks`] for a stopped VM (the caller holds the VM lock).
    pub(super) fn mark_stopped(&self, vm: &VmFile) -> Result<Vec<Option<ChangeMark>>> {
        let mut marks = Vec::new();
        for d in &vm.disks {
            let file = self.disk_path(vm, d)?;
            let present = self.image_bitmaps(&vm.name, &file)?;
            let g = next_generation(&present, now_micros());
            let name = format!("{PREFIX}{g}");
            let old: Vec<String> = present
                .iter()
                .filter(|b| generation(&b.name).is_some() || owner_of(&b.name).is_some())
                .map(|b| b.name.clone())
                .collect();
            self.edit_image_bitmaps(&vm.name, &file, Some(&name), &old)?;
            marks.push(Some(ChangeMark::Bitmap { name }));
        }
        Ok(marks)
    }

    /// [`crate::Hypervisor::open_view`] for a VM whose QEMU runs: one transaction snapshots
    /// every disk (see the module documentation).
    pub(super) fn view_running(
        &self,
        vm: &VmFile,
        p: &VmPaths,
        since: &[Option<ChangeMark>],
        track: bool,
    ) -> Result<DiskView> {
        self.check_socket_path(&p.nbd)?;
        let err = |what: &'static str| self.qmp_err(&vm.name, what);
        let mut q = Qmp::connect_timeout(&p.qmp, QMP_TIMEOUT)
            .map_err(err("cannot reach QMP to snapshot the disks"))?;
        self.clean_stale_views(&mut q, p);
        let nodes = running_bitmaps(&mut q)?;
        let id = view_id();
        let mut disks: Vec<RunningDisk> = Vec::new();
        // One generation for every disk, after each disk's present ones.
        let mut g = 0;
        for d in &vm.disks {
            let node = format!("disk{}", d.index);
            let info = nodes.iter().find(|(n, _)| *n == node).map(|(_, v)| v);
            let present = info.map(states_of_node).unwrap_or_default();
            g = g.max(next_generation(&present, now_micros()));
            let size = info
                .and_then(|v| v["image"]["virtual-size"].as_u64())
                .unwrap_or(d.size);
            let fleece = fleece_node(&id, d.index);
            disks.push(RunningDisk {
                index: d.index,
                size,
                file: p.dir.join(format!("{fleece}.qcow2")),
                merge: bitmaps_since(
                    since.get(d.index as usize).and_then(|m| m.as_ref()),
                    &present,
                ),
                frozen: frozen_bitmap(&id, d.index),
                node,
                fleece,
            });
        }
        let next = format!("{PREFIX}{g}");
        // Everything created from here on is undone by `undo` if the view cannot be opened.
        let created: Vec<(String, String, PathBuf, String, String)> = disks
            .iter()
            .map(|d| {
                (
                    d.fleece.clone(),
                    d.node.clone(),
                    d.file.clone(),
                    d.frozen.clone(),
                    fleece_job(&d.fleece),
                )
            })
            .collect();
        let qmp_path = p.qmp.clone();
        let undo = move |committed: bool, next: &str| -> Result<()> {
            // A view that started no generation has nothing to commit or remove.
            let committed = committed && track;
            let mut q = match Qmp::connect_timeout(&qmp_path, QMP_TIMEOUT) {
                Ok(q) => q,
                // QEMU is gone, and with it every node, job and bitmap of the view.
                Err(_) => {
                    for (_, _, file, _, _) in &created {
                        let _ = std::fs::remove_file(file);
                    }
                    return Ok(());
                }
            };
            let mut first_err = None;
            for (fleece, node, file, frozen, job) in &created {
                let _ = q.execute(
                    "block-export-del",
                    Some(json!({"id": fleece, "mode": "hard"})),
                );
                let _ = q.execute(
                    "block-job-cancel",
                    Some(json!({"device": job, "force": true})),
                );
                wait_job_gone(&mut q, job);
                let t = Instant::now();
                loop {
                    match q.execute("blockdev-del", Some(json!({"node-name": fleece}))) {
                        Ok(_) => break,
                        Err(e)
                            if e.desc().is_some_and(|m| {
                                m.contains("not found")
                                    || m.contains("Cannot find")
                                    || m.contains("Failed to find")
                            }) =>
                        {
                            break
                        }
                        Err(e) if t.elapsed() > JOB_GONE_TIMEOUT => {
                            first_err
                                .get_or_insert(format!("removing snapshot overlay {fleece}: {e}"));
                            break;
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(10)),
                    }
                }
                let _ = std::fs::remove_file(file);
                let _ = q.execute(
                    "block-dirty-bitmap-remove",
                    Some(json!({"node": node, "name": frozen})),
                );
                if committed {
                    if let Ok(nodes) = running_bitmaps(&mut q) {
                        let present = nodes
                            .iter()
                            .find(|(n, _)| n == node)
                            .map(|(_, v)| states_of_node(v))
                            .unwrap_or_default();
                        let keep = generation(next).unwrap_or(0);
                        for b in older_than(&present, keep) {
                            let _ = q.execute(
                                "block-dirty-bitmap-remove",
                                Some(json!({"node": node, "name": b})),
                            );
                        }
                    }
                } else if track {
                    // Not recorded: the caller's older mark still records every write, so the
                    // view's own generation would only pile up.
                    let _ = q.execute(
                        "block-dirty-bitmap-remove",
                        Some(json!({"node": node, "name": next})),
                    );
                }
            }
            match first_err {
                Some(e) => Err(HvError::Invalid(e)),
                None => Ok(()),
            }
        };
        let opened = (|| -> Result<Vec<ViewDisk>> {
            let mut actions = Vec::new();
            for d in &disks {
                let size = d.size.to_string();
                self.qemu_img(
                    &vm.name,
                    &[
                        "create".as_ref(),
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        d.file.as_os_str(),
                        size.as_ref(),
                    ],
                )?;
                q.execute(
                    "blockdev-add",
                    Some(json!({
                        "driver": "qcow2",
                        "node-name": d.fleece,
                        "file": {"driver": "file", "filename": d.file.to_string_lossy()},
                        "backing": d.node,
                    })),
                )
                .map_err(err("cannot add the snapshot overlay"))?;
                if let Ok(merge) = &d.merge {
                    actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                        "node": d.node, "name": d.frozen, "persistent": false, "disabled": true,
                        "granularity": GRANULARITY}}));
                    actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                        "node": d.node, "target": d.frozen, "bitmaps": merge}}));
                }
                if track {
                    actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                        "node": d.node, "name": next, "persistent": true,
                        "granularity": GRANULARITY}}));
                }
                actions.push(json!({"type": "blockdev-backup", "data": {
                    "job-id": fleece_job(&d.fleece), "device": d.node, "target": d.fleece,
                    "sync": "none"}}));
            }
            q.execute("transaction", Some(json!({"actions": actions})))
                .map_err(err("cannot snapshot the disks"))?;
            let start = q.execute(
                "nbd-server-start",
                Some(json!({"addr": {"type": "unix", "data": {"path": p.nbd.to_string_lossy()}}})),
            );
            match start {
                Ok(_) => {}
                Err(e) if e.desc().is_some_and(|m| m.contains("already running")) => {}
                Err(e) => return Err(err("cannot start QEMU's NBD server")(e)),
            }
            let mut out = Vec::new();
            for d in &disks {
                let mut export = json!({
                    "type": "nbd", "id": d.fleece, "node-name": d.fleece, "name": d.fleece,
                    "writable": false,
                });
                if d.merge.is_ok() {
                    export["bitmaps"] = json!([d.frozen]);
                }
                q.execute("block-export-add", Some(export))
                    .map_err(err("cannot export the snapshot"))?;
                let server = Server::Export {
                    qmp: p.qmp.clone(),
                    id: d.fleece.clone(),
                };
                let ctx = dirty_bitmap_context(&d.frozen);
                let contexts: Vec<&str> = if d.merge.is_ok() {
                    vec![BASE_ALLOCATION, ctx.as_str()]
                } else {
                    vec![BASE_ALLOCATION]
                };
                let disk_size = vm
                    .disks
                    .iter()
                    .find(|x| x.index == d.index)
                    .map_or(d.size, |x| x.size);
                let dev = QemuDisk::connect(server, disk_size, || {
                    NbdDisk::connect_unix(&p.nbd, &d.fleece, &contexts)
                })
                .map_err(|e| {
                    self.process(
                        &vm.name,
                        format!("cannot read the snapshot of disk {}: {e}", d.index),
                    )
                })?;
                let changes = match &d.merge {
                    Ok(_) => {
                        let r = dev.conns[0].client().dirty_ranges(&d.frozen).map_err(|e| {
                            self.process(
                                &vm.name,
                                format!("cannot read the dirty bitmap of disk {}: {e}", d.index),
                            )
                        })?;
                        Changes::Ranges(clip(r, disk_size))
                    }
                    Err(why) => Changes::Unknown(why.clone()),
                };
                out.push(ViewDisk {
                    index: d.index,
                    dev: Box::new(dev),
                    changes,
                    mark: track.then(|| ChangeMark::Bitmap { name: next.clone() }),
                });
            }
            Ok(out)
        })();
        match opened {
            Ok(view_disks) => {
                let closer: ViewCloser = Box::new(move |committed| undo(committed, &next));
                Ok(DiskView::new(view_disks, true, Some(closer)))
            }
            Err(e) => {
                drop(q);
                let _ = undo(false, &next);
                Err(e)
            }
        }
    }

    /// [`crate::Hypervisor::open_view`] for a stopped VM (the caller holds the VM lock while
    /// the view opens; the read-only `qemu-nbd`s keep QEMU from starting while it is open).
    pub(super) fn view_stopped(
        &self,
        vm: &VmFile,
        p: &VmPaths,
        since: &[Option<ChangeMark>],
        track: bool,
    ) -> Result<DiskView> {
        let mut out = Vec::new();
        let mut prune = Vec::new();
        for d in &vm.disks {
            let file = self.disk_path(vm, d)?;
            let present = self.image_bitmaps(&vm.name, &file)?;
            let merge = bitmaps_since(
                since.get(d.index as usize).and_then(|m| m.as_ref()),
                &present,
            );
            let g = next_generation(&present, now_micros());
            let next = format!("{PREFIX}{g}");
            if track {
                self.edit_image_bitmaps(&vm.name, &file, Some(&next), &[])?;
            }
            let bitmaps = merge.clone().unwrap_or_default();
            let dev = self.open_stopped(vm, d, p, false, &bitmaps)?;
            let changes = match merge {
                Ok(names) => {
                    let mut all = Vec::new();
                    for n in &names {
                        let r = dev.conns[0].client().dirty_ranges(n).map_err(|e| {
                            self.process(
                                &vm.name,
                                format!("cannot read dirty bitmap {n} of disk {}: {e}", d.index),
                            )
                        })?;
                        all.extend(r);
                    }
                    Changes::Ranges(clip(union(all), d.size))
                }
                Err(why) => Changes::Unknown(why),
            };
            prune.push((file, g));
            out.push(ViewDisk {
                index: d.index,
                dev: Box::new(dev),
                changes,
                mark: track.then_some(ChangeMark::Bitmap { name: next }),
            });
        }
        let this = self.clone();
        let name = vm.name.clone();
        let lock_paths = p.clone();
        let closer: ViewCloser = Box::new(move |committed| {
            if !track {
                return Ok(());
            }
            let _g = this.lock(&lock_paths)?;
            if QemuDriver::live_pid(&lock_paths).is_some() {
                // Started meanwhile: the extra bitmaps go with the next view or mark.
                return Ok(());
            }
            for (file, keep) in prune {
                let remove = if committed {
                    older_than(&this.image_bitmaps(&name, &file)?, keep)
                } else {
                    // Not recorded: the caller's older mark still records every write.
                    vec![format!("{PREFIX}{keep}")]
                };
                this.edit_image_bitmaps(&name, &file, None, &remove)?;
            }
            Ok(())
        });
        Ok(DiskView::new(out, true, Some(closer)))
    }
}

/// Waits until block job `id` is gone (cancelled jobs conclude and are dismissed).
fn wait_job_gone(q: &mut Qmp, id: &str) {
    let t = Instant::now();
    while t.elapsed() < JOB_GONE_TIMEOUT {
        let listed = q
            .execute("query-block-jobs", None)
            .ok()
            .and_then(|v| v.as_array().cloned())
            .is_some_and(|a| a.iter().any(|j| j["device"] == id));
        if !listed {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Names of overlay files `fv<pid>x…qcow2` of ferry processes that are gone.
fn stale_overlays(p: &VmPaths) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(&p.dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            name.starts_with("fv")
                && name.ends_with(".qcow2")
                && owner_of(&name).is_some_and(|pid| !alive(pid))
        })
        .map(|e| e.path())
        .collect()
}

/// True when a ferry process that died left a view's overlay in the VM's folder.
pub(super) fn has_stale_overlays(p: &VmPaths) -> bool {
    !stale_overlays(p).is_empty()
}

/// Removes overlay files `fv<pid>x…qcow2` of ferry processes that are gone.
pub(super) fn remove_stale_overlay_files(p: &VmPaths) {
    for f in stale_overlays(p) {
        let _ = std::fs::remove_file(f);
    }
}

/// Sorted, merged ranges.
fn union(mut r: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    r.sort();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in r {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Ranges clipped to `[0, size)`.
fn clip(r: Vec<(u64, u64)>, size: u64) -> Vec<(u64, u64)> {
    r.into_iter()
        .filter(|&(s, _)| s < size)
        .map(|(s, e)| (s, e.min(size)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(name: &str) -> BitmapState {
        BitmapState {
            name: name.into(),
            inconsistent: false,
            recording: true,
        }
    }

    fn mark(name: &str) -> ChangeMark {
        ChangeMark::Bitmap { name: name.into() }
    }

    #[test]
    fn generations_are_only_ferry_digits() {
        assert_eq!(generation("ferry-12"), Some(12));
        assert_eq!(generation("ferry-"), None);
        assert_eq!(generation("ferry-view-1x2-0"), None);
        assert_eq!(generation("other-3"), None);
    }

    #[test]
    fn changes_since_a_mark_are_its_bitmap_and_every_later_one() {
        let present = [
            b("ferry-5"),
            b("ferry-3"),
            b("ferry-7"),
            b("mine"),
            b("ferry-view-1x1-0"),
        ];
        assert_eq!(
            bitmaps_since(Some(&mark("ferry-5")), &present).unwrap(),
            vec!["ferry-5".to_string(), "ferry-7".to_string()]
        );
        assert_eq!(bitmaps_since(None, &present), Err(None));
        let missing = bitmaps_since(Some(&mark("ferry-4")), &present).unwrap_err();
        assert!(missing.unwrap().contains("missing"));
        let mut bad = present.to_vec();
        bad[2].inconsistent = true;
        let why = bitmaps_since(Some(&mark("ferry-5")), &bad)
            .unwrap_err()
            .unwrap();
        assert!(why.contains("inconsistent"), "{why}");
        let mut off = present.to_vec();
        off[0].recording = false;
        let why = bitmaps_since(Some(&mark("ferry-5")), &off)
            .unwrap_err()
            .unwrap();
        assert!(why.contains("disabled"), "{why}");
        // An inconsistent bitmap older than the mark does not matter.
        let mut old_bad = present.to_vec();
        old_bad[1].inconsistent = true;
        assert!(bitmaps_since(Some(&mark("ferry-5")), &old_bad).is_ok());
    }

    #[test]
    fn next_generation_follows_every_present_one() {
        assert_eq!(next_generation(&[], 100), 100);
        assert_eq!(next_generation(&[b("ferry-500")], 100), 501);
        assert_eq!(next_generation(&[b("ferry-5")], 100), 100);
        assert_eq!(
            older_than(&[b("ferry-5"), b("ferry-9"), b("x")], 9),
            vec!["ferry-5"]
        );
    }

    #[test]
    fn leftovers_name_their_owner() {
        assert_eq!(owner_of(&fleece_node("123x4", 0)), Some(123));
        assert_eq!(owner_of(&frozen_bitmap("77x1", 2)), Some(77));
        assert_eq!(owner_of(&fleece_job(&fleece_node("9x1", 3))), Some(9));
        assert_eq!(owner_of("ferry-12"), None);
        assert_eq!(
            union(vec![(5, 9), (0, 2), (1, 3), (9, 10)]),
            vec![(0, 3), (5, 10)]
        );
        assert_eq!(
            clip(vec![(0, 4), (8, 20), (30, 40)], 10),
            vec![(0, 4), (8, 10)]
        );
    }
}
