//! The data-moving operations of one host: [`capture`] (a point-in-time view of a VM's disks
//! into the store), [`apply`] (make a VM's disks equal to maps, from the store), [`restore`]
//! (a point onto fresh disks) and [`scan`] (hash disks, compare with maps). Each touches the
//! disks of one host and the recovery site's store, never two hosts at once. The engine runs
//! them in-process for hosts it drives; for a host served by an agent it sends the same
//! [`DataReq`] to the agent, which runs the same function beside the disks (see
//! docs/agents.md). Only maps, marks and counters travel back.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, Context, Result};
use ferry_blocks::{BlockMap, Hasher, MapJournal};
use ferry_hypervisor::{ChangeMark, Changes, DiskView, Hypervisor, ViewDisk};
use ferry_store::Store;
use serde::{Deserialize, Serialize};

use crate::jobs::JobCtx;
use crate::pipeline::{self, pass, KnownSource, PassSpec};

/// A block map as it travels in a request or an answer (hex of ferry's binary map format).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Map(pub BlockMap);

impl Serialize for Map {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(self.0.to_bytes()))
    }
}

impl<'de> Deserialize<'de> for Map {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let b = hex::decode(s).map_err(serde::de::Error::custom)?;
        let (m, _) = BlockMap::from_bytes(&b).map_err(serde::de::Error::custom)?;
        Ok(Map(m))
    }
}

/// The store an operation reads or fills: its URL (credentials come from the environment of
/// the process that opens it) and the id of the key its points are encrypted with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRef {
    /// Store URL (file://, az://, s3://).
    pub url: String,
    /// Key id when the VM's points are encrypted.
    pub key_id: Option<String>,
}

/// One data-moving operation on one host. Externally tagged (`{"capture": {…}}`): an
/// internally tagged enum buffers its fields, which cannot hold the 128-bit times of a disk
/// stamp.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataReq {
    /// See [`capture`].
    Capture(CaptureReq),
    /// See [`apply`].
    Apply(ApplyReq),
    /// See [`restore`].
    Restore(RestoreReq),
    /// See [`scan`].
    Scan(ScanReq),
    /// Store work on points (see [`crate::points`]).
    Points(crate::points::PointsReq),
    /// Answers whether this host holds the key of `key_id` (before a job changes anything).
    Check(CheckReq),
}

/// Does this host hold the key a VM's points are encrypted with?
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckReq {
    /// VM name.
    pub vm: String,
    /// Key id of its points (None: plaintext, nothing to hold).
    pub key_id: Option<String>,
}

impl DataReq {
    /// The VM the operation works on.
    pub fn vm(&self) -> &str {
        match self {
            DataReq::Capture(r) => &r.vm,
            DataReq::Apply(r) => &r.vm,
            DataReq::Restore(r) => &r.vm,
            DataReq::Scan(r) => &r.vm,
            DataReq::Points(r) => &r.vm,
            DataReq::Check(r) => &r.vm,
        }
    }

    /// The store it needs, if any.
    pub fn store(&self) -> Option<&StoreRef> {
        match self {
            DataReq::Capture(r) => Some(&r.store),
            DataReq::Apply(r) => Some(&r.store),
            DataReq::Restore(r) => Some(&r.store),
            DataReq::Points(r) => Some(&r.store),
            DataReq::Scan(_) | DataReq::Check(_) => None,
        }
    }
}

/// A disk of a capture: its index, size and map at the marks the capture starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureDisk {
    /// Disk index.
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Its map at `since` (None: unknown, read every block).
    pub base: Option<Map>,
}

/// Capture a VM's disks into the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureReq {
    /// VM name.
    pub vm: String,
    /// The store that receives blocks it lacks.
    pub store: StoreRef,
    /// Block size of the VM's replication.
    pub block_size: u64,
    /// Change-tracking marks the bases belong to.
    pub since: Vec<Option<ChangeMark>>,
    /// The disks, in the VM's order.
    pub disks: Vec<CaptureDisk>,
    /// Read every block even when change tracking knows what changed (and check it).
    pub verify: bool,
    /// Count what moves into the store as crossing sites.
    pub crosses_sites: bool,
    /// Freeze the guest's file systems through its guest agent around the snapshot.
    #[serde(default)]
    pub app_consistent: bool,
}

/// What a capture found: each disk's map at the view's moment, and the view's marks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureOut {
    /// Map of each disk, in the request's order.
    pub maps: Vec<Map>,
    /// Change-tracking marks of the moment captured.
    pub marks: Vec<Option<ChangeMark>>,
    /// The snapshot was taken with the guest's file systems frozen.
    #[serde(default)]
    pub app_consistent: bool,
}

/// Environment variable: how long the guest agent may take to freeze the file systems, in
/// milliseconds (default 10 000).
pub const FREEZE_TIMEOUT_ENV: &str = "FERRY_GUEST_FREEZE_TIMEOUT_MS";

/// How long a guest may take to freeze ([`FREEZE_TIMEOUT_ENV`], default 10 s).
fn freeze_timeout() -> std::time::Duration {
    std::env::var(FREEZE_TIMEOUT_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .map(std::time::Duration::from_millis)
        .unwrap_or(std::time::Duration::from_secs(10))
}

/// Opens a point-in-time view of `vm`'s disks; with `app`, freezes the guest's file systems
/// around it and thaws them on every path (after a failed or timed-out freeze too). Returns
/// the view and whether it is app-consistent; why it is not goes to the job's notes.
fn open_consistent_view(
    env: &Env<'_>,
    vm: &str,
    since: &[Option<ChangeMark>],
    app: bool,
) -> Result<(ferry_hypervisor::DiskView, bool)> {
    if !app {
        return Ok((env.driver.open_view(vm, since)?, false));
    }
    let timeout = freeze_timeout();
    let frozen = env.driver.freeze_guest(vm, timeout);
    if let Err(e @ ferry_hypervisor::HvError::NoGuestAgent { .. }) = &frozen {
        // Nothing was asked of the guest: nothing to thaw.
        (env.note)(format!(
            "not app-consistent: {e}; this point is crash-consistent"
        ));
        return Ok((env.driver.open_view(vm, since)?, false));
    }
    let view = env.driver.open_view(vm, since);
    let thawed = env.driver.thaw_guest(vm);
    let view = view?;
    match (frozen, thawed) {
        (Ok(0), _) => {
            (env.note)(
                "not app-consistent: the guest agent froze no file system (none mounted?); this point is crash-consistent".into(),
            );
            Ok((view, false))
        }
        (Ok(n), Ok(())) => {
            tracing::debug!(vm, filesystems = n, "guest frozen around the snapshot");
            Ok((view, true))
        }
        (Ok(_), Err(e)) => {
            // The snapshot was taken frozen, so the point is app-consistent; the guest is not.
            (env.note)(format!("the point is app-consistent, but {e}"));
            Ok((view, true))
        }
        (Err(e), thawed) => {
            (env.note)(format!(
                "not app-consistent: {e}; this point is crash-consistent{}",
                match thawed {
                    Ok(()) => " (the guest was thawed)".to_string(),
                    Err(t) => format!(", and {t}"),
                }
            ));
            Ok((view, false))
        }
    }
}

/// A disk of an apply: make it hold `source`, knowing it holds `target`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyDisk {
    /// Disk index.
    pub index: u32,
    /// The content to write (every block in the store or zero).
    pub source: Map,
    /// What the disk holds as far as the control plane knows (before the journal).
    pub target: Map,
}

impl ApplyDisk {
    /// Bytes an apply writes when no journal says more is already there: every block whose
    /// source differs from the target (an unknown target block always differs).
    pub fn bytes_to_write(&self) -> u64 {
        let (s, t) = (&self.source.0, &self.target.0);
        (0..s.len())
            .filter(|&i| s.hashes[i] != t.hashes[i] || t.hashes[i] == ferry_blocks::UNKNOWN)
            .map(|i| {
                let r = s.block_range(i as u64);
                r.end - r.start
            })
            .sum()
    }
}

/// Make a VM's disks equal to maps, fetching the differing blocks from the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyReq {
    /// VM name.
    pub vm: String,
    /// The store holding every block of the sources.
    pub store: StoreRef,
    /// The disks.
    pub disks: Vec<ApplyDisk>,
}

/// What an apply wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyOut {
    /// Blocks written.
    pub blocks: u64,
    /// Bytes written.
    pub bytes: u64,
}

/// Write a point onto a VM's freshly created (zeroed) disks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RestoreReq {
    /// VM name.
    pub vm: String,
    /// The store holding the point's blocks.
    pub store: StoreRef,
    /// The point (for messages).
    pub point: i64,
    /// Map of each disk, in disk order.
    pub disks: Vec<Map>,
}

/// A disk of a scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanDisk {
    /// Disk index.
    pub index: u32,
    /// Its map at `since`, trusted where change tracking says nothing changed.
    pub base: Option<Map>,
    /// Map to compare with (None: unknown everywhere).
    pub target: Option<Map>,
    /// Answer `map: None` without reading when change tracking proves `base` still exact.
    pub skip_unchanged: bool,
}

impl ScanDisk {
    /// A disk whose map now is wanted: `base` (its map at the scan's marks, if known) is
    /// trusted where change tracking proves nothing changed, and nothing is read at all when
    /// nothing did (the answer's map is then `None`: `base` still holds).
    pub fn rescan(index: u32, base: Option<BlockMap>) -> Self {
        ScanDisk {
            index,
            base: base.map(Map),
            target: None,
            skip_unchanged: true,
        }
    }
}

/// Hash a VM's disks (a view of them as they are; nothing is written or stored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanReq {
    /// VM name.
    pub vm: String,
    /// Key id whose block ids to compute (encrypted VMs).
    pub key_id: Option<String>,
    /// Block size.
    pub block_size: u64,
    /// Marks the bases belong to.
    pub since: Vec<Option<ChangeMark>>,
    /// The disks.
    pub disks: Vec<ScanDisk>,
}

/// A scanned disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanResult {
    /// Its map now (None: `skip_unchanged` and nothing changed).
    pub map: Option<Map>,
    /// Blocks that differ from the target.
    pub blocks_moved: u64,
    /// Bytes of those blocks.
    pub bytes_moved: u64,
}

/// What a scan found, per disk in the request's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanOut {
    /// The disks.
    pub disks: Vec<ScanResult>,
}

/// Where an operation runs: the job's counters, its notes, the host's driver and the folder
/// of apply journals on that host.
pub struct Env<'a> {
    /// Counters and cancellation.
    pub ctx: &'a JobCtx,
    /// Receives notes for the job.
    pub note: &'a (dyn Fn(String) + Sync),
    /// The host's driver.
    pub driver: &'a dyn Hypervisor,
    /// Folder of apply journals (`<agent root>/.ferry/journal`, or under the ferry home).
    pub journals: PathBuf,
}

/// The disk `index` of a view.
pub(crate) fn view_disk(view: &DiskView, index: u32) -> Result<&ViewDisk> {
    view.disks
        .iter()
        .find(|d| d.index == index)
        .ok_or_else(|| anyhow!("internal: the disk view has no disk {index}"))
}

/// What change tracking proves about a view disk whose content at its mark was `base`: the
/// source map to trust outside the changed ranges, or `None` (read every block). Says so in
/// the job when tracking existed but cannot be trusted, or `verify` overrides it.
pub(crate) fn known_source(
    note: &dyn Fn(String),
    vd: &ViewDisk,
    base: Option<&Arc<BlockMap>>,
    verify: bool,
    host: &str,
) -> Option<KnownSource> {
    match (&vd.changes, base) {
        (Changes::Ranges(r), Some(m)) if !verify => Some(KnownSource {
            map: m.clone(),
            changed: r.clone(),
        }),
        (Changes::Unknown(Some(why)), _) => {
            note(format!(
                "disk {} on host {host}: change tracking cannot be trusted ({why}); read every block instead (hash scan)",
                vd.index
            ));
            None
        }
        _ => None,
    }
}

/// After a `--verify` full read: tells in the job whether change tracking would have found
/// every block that changed since `base` (a block it missed was synced anyway).
pub(crate) fn check_tracking(
    note: &dyn Fn(String),
    vd: &ViewDisk,
    base: Option<&BlockMap>,
    now: &BlockMap,
    host: &str,
) {
    let (Changes::Ranges(r), Some(base)) = (&vd.changes, base) else {
        note(format!(
            "disk {} on host {host}: --verify: every block read and compared by hash (no change tracking to check)",
            vd.index
        ));
        return;
    };
    let bs = base.block_size;
    let missed = (0..now.len())
        .filter(|&i| base.hashes[i] != now.hashes[i])
        .filter(|&i| {
            let (s, e) = (i as u64 * bs, (i as u64 + 1) * bs);
            !r.iter().any(|&(a, b)| a < e && b > s)
        })
        .count();
    if missed == 0 {
        note(format!(
            "disk {} on host {host}: --verify: a full hash comparison agrees with change tracking",
            vd.index
        ));
    } else {
        note(format!(
            "disk {} on host {host}: --verify: {missed} changed blocks were not reported by change tracking (synced anyway); report this as a bug",
            vd.index
        ));
    }
}

/// Opens a point-in-time view of `req.vm`'s disks, reads what change tracking says changed
/// since `req.since` (every block when it cannot tell, or with `verify`) and every unchanged
/// block the store lacks (a point never refers to a block the store lost), stores them, and
/// returns the maps and the view's marks. The view is closed with its
/// marks kept: the caller records them next.
pub fn capture(env: &Env<'_>, store: &Arc<Store>, req: &CaptureReq) -> Result<CaptureOut> {
    let _span = tracing::debug_span!("capture").entered();
    let host = env.driver.host().name.clone();
    let (view, app_consistent) =
        open_consistent_view(env, &req.vm, &req.since, req.app_consistent)?;
    let mut maps = Vec::new();
    for disk in &req.disks {
        let vd = view_disk(&view, disk.index)?;
        let base = disk.base.clone().map(|m| Arc::new(m.0));
        let ks = known_source(env.note, vd, base.as_ref(), req.verify, &host);
        // The known map is also the target: one copy in memory.
        let target = base
            .clone()
            .unwrap_or_else(|| Arc::new(BlockMap::zeros(disk.size, req.block_size)));
        let r = pass(
            env.ctx,
            PassSpec {
                src: vd.dev.as_ref(),
                block_size: req.block_size,
                target,
                store: Some(store.clone()),
                hasher: store.hasher(),
                write: None,
                crosses_sites: req.crosses_sites,
                known: ks,
            },
        )?;
        if req.verify {
            check_tracking(env.note, vd, base.as_deref(), &r.map, &host);
        }
        maps.push(Map(r.map));
    }
    let marks = view.marks();
    if let Err(e) = view.close(true) {
        (env.note)(format!("cleaning up the disk snapshot: {e}"));
    }
    Ok(CaptureOut {
        maps,
        marks,
        app_consistent,
    })
}

/// A full file system under a disk being written, said plainly: which disk, how much space is
/// free there, how much more the disk may take, and what to do. Other errors pass unchanged.
pub fn explain_full_disk(e: anyhow::Error, disk: &str, path: &Path, vm: &str) -> anyhow::Error {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .and_then(|io| io.raw_os_error())
            == Some(libc::ENOSPC)
    });
    if !full {
        return e;
    }
    use std::os::unix::fs::MetadataExt;
    let fmt = ferry_model::format_bytes;
    // A sparse disk grows up to its size as blocks are written.
    let more = std::fs::metadata(path)
        .map(|m| fmt(m.len().saturating_sub(m.blocks() * 512)))
        .unwrap_or_else(|_| "?".into());
    let free = free_space(path.parent().unwrap_or(path))
        .map(fmt)
        .unwrap_or_else(|| "?".into());
    anyhow!(
        "{disk}: the file system holding {} is full ({free} free; the disk may take up to {more} more as it fills). Free space there, or move the host's root to a larger file system, then run `ferry failback {vm}` again: it continues where it stopped. Until then the disk stays marked inconsistent and the VM does not start",
        path.display()
    )
}

/// The image file of disk `index` of `vm` on this host, if the driver knows it.
pub(crate) fn disk_path(driver: &dyn Hypervisor, vm: &str, index: u32) -> Option<PathBuf> {
    let info = driver.get_vm(vm).ok()??;
    info.disks
        .into_iter()
        .find(|d| d.index == index)
        .map(|d| d.path)
}

/// Bytes free for an unprivileged writer on the file system holding `dir`.
fn free_space(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a writable statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The journal of apply writes to disk `index` of `vm`, and the file naming the map it
/// continues.
fn journal_files(dir: &Path, vm: &str, index: u32) -> (PathBuf, PathBuf) {
    let d = dir.join(vm);
    (
        d.join(format!("disk{index}.journal")),
        d.join(format!("disk{index}.base")),
    )
}

/// Makes each disk of `req.vm` hold its `source` map, writing only blocks that differ from
/// what it holds: the request's `target`, plus this host's journal of an interrupted apply
/// over the very same target (a retry after a crash re-sends nothing already written). A
/// journal over another target is stale (the control plane saved the maps it led to) and is
/// dropped.
pub fn apply(env: &Env<'_>, store: &Arc<Store>, req: &ApplyReq) -> Result<ApplyOut> {
    let _span = tracing::debug_span!("apply").entered();
    let host = env.driver.host().name.clone();
    let mut out = ApplyOut::default();
    for d in &req.disks {
        let _prep = tracing::debug_span!("apply_journal", disk = d.index).entered();
        let (jpath, bpath) = journal_files(&env.journals, &req.vm, d.index);
        std::fs::create_dir_all(jpath.parent().expect("has a parent"))
            .with_context(|| format!("creating {}", env.journals.display()))?;
        let digest = blake3::hash(&d.target.0.to_bytes()).to_hex().to_string();
        let mut target = d.target.0.clone();
        if std::fs::read_to_string(&bpath).ok().as_deref() == Some(digest.as_str()) {
            MapJournal::replay(&jpath, &mut target)?;
        } else {
            MapJournal::reset(&jpath)?;
            ferry_blocks::map::write_atomic(&bpath, digest.as_bytes())?;
        }
        let mut journal = MapJournal::open(&jpath)?;
        let dev = env.driver.open_disk(&req.vm, d.index, true)?;
        drop(_prep);
        let label = format!("disk {} of VM {} on host {host}", d.index, req.vm);
        let (b, n) = pipeline::apply(
            env.ctx,
            store,
            &d.source.0,
            &target,
            dev.as_ref(),
            &mut journal,
            &label,
        )
        .map_err(|e| match disk_path(env.driver, &req.vm, d.index) {
            Some(p) => explain_full_disk(e, &label, &p, &req.vm),
            None => e,
        })?;
        out.blocks += b;
        out.bytes += n;
    }
    Ok(out)
}

/// Writes a point's maps onto the freshly created disks of `req.vm`, checking each block.
pub fn restore(env: &Env<'_>, store: &Arc<Store>, req: &RestoreReq) -> Result<()> {
    for (i, m) in req.disks.iter().enumerate() {
        let dev = env.driver.open_disk(&req.vm, i as u32, true)?;
        pipeline::restore(
            env.ctx,
            store,
            &m.0,
            dev.as_ref(),
            &format!("point {}, disk {i}", req.point),
        )?;
    }
    Ok(())
}

/// Hashes the disks of `req.vm` as they are now (a view that leaves no trace), trusting
/// `base` where change tracking since `since` says nothing changed, and counts what differs
/// from each `target`.
pub fn scan(env: &Env<'_>, hasher: Hasher, req: &ScanReq) -> Result<ScanOut> {
    let host = env.driver.host().name.clone();
    let view = env.driver.peek_view(&req.vm, &req.since)?;
    let mut disks = Vec::new();
    for d in &req.disks {
        let vd = view_disk(&view, d.index)?;
        let size = vd.dev.size();
        let base = d.base.clone().map(|m| Arc::new(m.0));
        let ks = known_source(env.note, vd, base.as_ref(), false, &host);
        if d.skip_unchanged && ks.as_ref().is_some_and(|k| k.changed.is_empty()) {
            disks.push(ScanResult {
                map: None,
                blocks_moved: 0,
                bytes_moved: 0,
            });
            continue;
        }
        let target = d
            .target
            .clone()
            .map(|m| m.0)
            .unwrap_or_else(|| BlockMap::unknown(size, req.block_size));
        let r = pass(
            env.ctx,
            PassSpec {
                src: vd.dev.as_ref(),
                block_size: req.block_size,
                target: Arc::new(target),
                store: None,
                hasher,
                write: None,
                crosses_sites: false,
                known: ks,
            },
        )?;
        disks.push(ScanResult {
            map: Some(Map(r.map)),
            blocks_moved: r.blocks_moved,
            bytes_moved: r.bytes_moved,
        });
    }
    if let Err(e) = view.close(false) {
        (env.note)(format!("cleaning up the disk snapshot: {e}"));
    }
    Ok(ScanOut { disks })
}

/// Runs `req` on this host (the agent's side): opens the store it names with `key` (which must
/// be the VM's key when its points are encrypted), and answers the operation's result as JSON.
pub fn run(
    env: &Env<'_>,
    key: Option<&ferry_store::crypto::Key>,
    req: &DataReq,
) -> Result<serde_json::Value> {
    let host = env.driver.host().name.clone();
    let want = |id: &Option<String>| -> Result<Option<&ferry_store::crypto::Key>> {
        match (id, key) {
            (None, _) => Ok(None),
            (Some(id), Some(k)) if k.id() == *id => Ok(Some(k)),
            (Some(id), Some(k)) => Err(anyhow!(
                "VM {}'s recovery points are encrypted with key {id}, and the agent of host {host} holds key {}; restart it with --key FILE of key {id}",
                req.vm(),
                k.id()
            )),
            (Some(id), None) => Err(anyhow!(
                "VM {}'s recovery points are encrypted (key {id}); restart the agent of host {host} with --key FILE",
                req.vm()
            )),
        }
    };
    let _span = tracing::debug_span!("data_op").entered();
    let store = match req.store() {
        Some(s) => {
            let _open = tracing::debug_span!("data_op_store").entered();
            let k = want(&s.key_id)?;
            let st = Store::open_with(&s.url, k)
                .with_context(|| format!("host {host}: the store {} is unreachable from here (store credentials come from the agent's environment)", s.url))?;
            st.hold_lease(&format!("ferry agent of host {host}, VM {}", req.vm()))?;
            Some(Arc::new(st))
        }
        None => None,
    };
    let store = || store.clone().expect("operation with a store");
    Ok(match req {
        DataReq::Capture(r) => serde_json::to_value(capture(env, &store(), r)?)?,
        DataReq::Apply(r) => serde_json::to_value(apply(env, &store(), r)?)?,
        DataReq::Restore(r) => {
            restore(env, &store(), r)?;
            serde_json::Value::Null
        }
        DataReq::Scan(r) => {
            let hasher = Hasher::keyed(want(&r.key_id)?.map(|k| k.block_id_key()));
            serde_json::to_value(scan(env, hasher, r)?)?
        }
        DataReq::Points(r) => crate::points::run(&store(), &r.vm, &r.op)?,
        DataReq::Check(r) => {
            want(&r.key_id)?;
            serde_json::Value::Null
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_travel_as_hex_and_come_back_equal() {
        let mut m = BlockMap::zeros(3 << 16, 1 << 16);
        m.hashes[1] = [7u8; 32];
        let j = serde_json::to_string(&Map(m.clone())).unwrap();
        assert!(j.starts_with('"'));
        let back: Map = serde_json::from_str(&j).unwrap();
        assert_eq!(back.0, m);
        assert!(serde_json::from_str::<Map>("\"00ff\"").is_err());
    }

    #[test]
    fn a_request_with_disk_stamps_travels_through_a_json_value() {
        let stamp = ferry_blocks::DiskStamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 1_733_000_000_123_456_789,
            ctime_ns: 1_733_000_000_123_456_789,
            taken_ns: 1_733_000_001_000_000_000,
            local_fs: true,
        };
        let req = DataReq::Scan(ScanReq {
            vm: "app".into(),
            key_id: None,
            block_size: 1 << 16,
            since: vec![Some(ChangeMark::Stamp { stamp }), None],
            disks: vec![],
        });
        let v = serde_json::to_value(&req).unwrap();
        let back: DataReq = serde_json::from_value(v).unwrap();
        assert_eq!(back, req);
    }
}
