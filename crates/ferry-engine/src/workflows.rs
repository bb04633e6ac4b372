//! The commands that run jobs.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use ferry_blocks::{BlockMap, Manifest, MapJournal, ZERO};
use ferry_hypervisor::{Changes, DiskView, Hypervisor, Power, ViewDisk, VmInfo, VmSpec};
use ferry_model::{
    begin, finish, Command, Host, ItemState, Job, JobKind, JobState, Outcome, PointKind,
    ProtectedItem, RecoveryPoint, SiteRole, Step, SyncMode,
};
use ferry_store::{encode, PackWriter, Store};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::jobs::{this_runner, Cancelled, JobCtx, JobRun};
use crate::pipeline::{pass, restore, KnownSource, PassSpec};
use crate::{Copy, CopyState, Engine, ItemExtra};

/// Resources a data-moving command may use.
#[derive(Debug, Clone, Copy)]
pub struct RunOpts {
    /// Hash/compress worker threads.
    pub threads: usize,
    /// Cap on bytes transferred between sites per second.
    pub bandwidth: Option<u64>,
}

impl Default for RunOpts {
    fn default() -> Self {
        RunOpts {
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(2),
            bandwidth: None,
        }
    }
}

/// How a failover treats the primary copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverMode {
    /// Stop the primary, replicate the last changes, then recover: no data loss.
    Planned,
    /// Recover from an existing point without touching the primary.
    Unplanned,
}

/// Options of `ferry failback`.
#[derive(Debug, Clone, Default)]
pub struct FailbackOpts {
    /// Delta or full (default: delta, or the interrupted job's mode).
    pub sync: Option<SyncMode>,
    /// Alternate primary host.
    pub host: Option<String>,
    /// Create the VM on the target host if missing.
    pub create_vm: bool,
    /// Run phase 2 right after phase 1.
    pub auto_complete: bool,
    /// Report what would move and change nothing.
    pub dry_run: bool,
    /// Re-read the primary disks after the sync and compare every block hash.
    pub verify: bool,
    /// Threads and bandwidth.
    pub run: Option<RunOpts>,
}

pub use ferry_api::{DryRun, DryRunDisk, VerifyReport};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct FailbackParams {
    sync: Option<SyncMode>,
    host: String,
    create_vm: bool,
    /// 1 while pre-syncing, 2 once the recovery VM was stopped for the final sync.
    phase: u8,
    rounds: u32,
    /// True once a full download reset the primary maps to unknown.
    full_reset: bool,
    /// The operator asked for both phases in one go (a resumed job keeps that wish).
    #[serde(default)]
    auto_complete: bool,
}

/// The disk `index` of a view.
fn view_disk(view: &DiskView, index: u32) -> Result<&ViewDisk> {
    view.disks
        .iter()
        .find(|d| d.index == index)
        .ok_or_else(|| anyhow!("internal: the disk view has no disk {index}"))
}

/// What change tracking proves about a view disk whose content at its mark was `base`: the
/// source map to trust outside the changed ranges, or `None` (read every block). Says so in
/// the job when tracking existed but cannot be trusted, or `verify` overrides it.
fn known_source(
    run: &JobRun,
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
            run.note(format!(
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
fn check_tracking(
    run: &JobRun,
    vd: &ViewDisk,
    base: Option<&BlockMap>,
    now: &BlockMap,
    host: &str,
) {
    let (Changes::Ranges(r), Some(base)) = (&vd.changes, base) else {
        run.note(format!(
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
        run.note(format!(
            "disk {} on host {host}: --verify: a full hash comparison agrees with change tracking",
            vd.index
        ));
    } else {
        run.note(format!(
            "disk {} on host {host}: --verify: {missed} changed blocks were not reported by change tracking (synced anyway); report this as a bug",
            vd.index
        ));
    }
}

/// Closes a view whose marks were recorded; a failed clean-up is noted, not fatal.
fn close_view(run: &JobRun, view: DiskView) {
    if let Err(e) = view.close(true) {
        run.note(format!("cleaning up the disk snapshot: {e}"));
    }
}

/// The command that resumes a job of this kind.
pub(crate) fn resume_command(kind: JobKind) -> &'static str {
    match kind {
        JobKind::Protect => "protect",
        JobKind::Replicate => "replicate",
        JobKind::Failover => "failover",
        JobKind::Failback => "failback",
        JobKind::Commit => "commit",
        JobKind::ReverseReplicate => "reverse-replicate",
    }
}

/// The lifecycle command a job of `kind` runs when the item is in `state`.
pub(crate) fn command_of(kind: JobKind, state: ItemState, params: &serde_json::Value) -> Command {
    match kind {
        JobKind::Protect => Command::Protect,
        JobKind::Replicate => Command::Replicate,
        JobKind::Failover => Command::Failover,
        JobKind::Commit => Command::Commit,
        JobKind::ReverseReplicate => Command::ReverseReplicate,
        JobKind::Failback => {
            let sync = params
                .get("sync")
                .and_then(|s| serde_json::from_value(s.clone()).ok())
                .unwrap_or(SyncMode::Delta);
            if state == ItemState::FailbackCompleting && sync == SyncMode::Delta {
                Command::Complete
            } else {
                Command::Failback(sync)
            }
        }
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

fn steps(names: &[&str]) -> Vec<Step> {
    names
        .iter()
        .map(|n| Step {
            name: n.to_string(),
            state: JobState::Queued,
            bytes_done: 0,
            bytes_total: 0,
            elapsed_ms: None,
        })
        .collect()
}

fn check_formats(vm: &VmInfo, driver: &dyn Hypervisor) -> Result<()> {
    let supported = driver.disk_formats();
    for d in &vm.disks {
        if !supported.contains(&d.format.as_str()) {
            bail!(
                "disk {} of VM {} on host {} is in format {:?}, which ferry cannot read (supported: {}); convert it to raw or qcow2 (e.g. `qemu-img convert -O qcow2`) and try again",
                d.index, vm.name, vm.host, d.format, supported.join(", ")
            );
        }
    }
    Ok(())
}

/// Recommends a sync mode from what ferry knows before reading anything.
pub fn recommend(
    target_exists: bool,
    failed_over_for: Option<Duration>,
    changed_fraction: Option<f64>,
) -> (SyncMode, String) {
    if !target_exists {
        return (
            SyncMode::Full,
            "the primary VM does not exist on the target host: every block must be downloaded anyway, so a full download (no checksum pass) is recommended".into(),
        );
    }
    if let Some(f) = changed_fraction {
        return if f > 0.6 {
            (
                SyncMode::Full,
                format!(
                    "{:.0}% of the blocks differ: a full download avoids hashing what moves anyway",
                    f * 100.0
                ),
            )
        } else {
            (SyncMode::Delta, format!("only {:.1}% of the blocks differ: a delta sync moves just those while the VM keeps running", f * 100.0))
        };
    }
    match failed_over_for {
        Some(d) if d > Duration::from_secs(30 * 86_400) => (
            SyncMode::Full,
            format!("the VM has run at the recovery site for {} days: most blocks have probably changed", d.as_secs() / 86_400),
        ),
        _ => (
            SyncMode::Delta,
            "the primary disks still exist: a delta sync moves only differing blocks while the recovery VM keeps running".into(),
        ),
    }
}

impl Engine {
    fn new_job(
        &self,
        kind: JobKind,
        vm: &str,
        step_names: &[&str],
        params: serde_json::Value,
        opts: RunOpts,
    ) -> Result<JobRun> {
        let job = self
            .vault
            .create_job(kind, vm, &steps(step_names), &params, &this_runner())?;
        Ok(JobRun::start(
            self.home.clone(),
            job,
            JobCtx::new(opts.threads, opts.bandwidth),
            self.observer.clone(),
        ))
    }

    fn resume_job(&self, id: i64, opts: RunOpts) -> Result<JobRun> {
        self.vault.claim_job(id, &this_runner())?;
        let job = self
            .vault
            .job(id)?
            .ok_or_else(|| anyhow!("job {id} vanished"))?;
        Ok(JobRun::start(
            self.home.clone(),
            job,
            JobCtx::new(opts.threads, opts.bandwidth),
            self.observer.clone(),
        ))
    }

    /// Refuses when another live process runs a job for this item.
    fn check_no_running_job(&self, item: &ProtectedItem) -> Result<()> {
        if let Some(id) = item.job {
            if let Some(j) = self.vault.job(id)? {
                if j.state == JobState::Running {
                    bail!(
                        "VM {} has job {id} ({}) running; watch it with `ferry job watch {id}` or stop it with `ferry cancel {}`",
                        item.vm, j.kind.as_str(), item.vm
                    );
                }
            }
        }
        Ok(())
    }

    /// Moves the item into `state` with `job` as its current job, atomically.
    fn enter(&self, item: &mut ProtectedItem, state: ItemState, job: i64) -> Result<()> {
        item.state = state;
        item.job = Some(job);
        self.vault.update_item(item)?;
        Ok(())
    }

    /// Ends a job: persists its final state and the item's next state.
    fn conclude<T>(
        &self,
        vm: &str,
        cmd: Command,
        run: JobRun,
        r: Result<(Outcome, T)>,
    ) -> Result<(Job, T)> {
        let mut item = self.item(vm)?;
        match r {
            Ok((outcome, v)) => {
                let state = if outcome == Outcome::Waiting {
                    JobState::Waiting
                } else {
                    JobState::Succeeded
                };
                let job = run.close(&self.vault, state, None)?;
                item.state = finish(item.state, cmd, outcome);
                self.vault.update_item(&item)?;
                Ok((job, v))
            }
            Err(e) => {
                let cancelled = e.downcast_ref::<Cancelled>().is_some();
                let (js, outcome, msg) = if cancelled {
                    (
                        JobState::Cancelled,
                        Outcome::Cancelled,
                        format!("cancelled; run `ferry {} {vm}` to resume", cmd.cli()),
                    )
                } else {
                    (JobState::Failed, Outcome::Failed, format!("{e:#}"))
                };
                let job = run.close(&self.vault, js, Some(&msg))?;
                item.state = finish(item.state, cmd, outcome);
                self.vault.update_item(&item)?;
                self.vault.event(Some(vm), Some(job.id), &msg)?;
                if cancelled {
                    bail!(
                        "job {} of VM {vm} was cancelled; run `ferry {} {vm}` to resume it",
                        job.id,
                        cmd.cli()
                    );
                }
                Err(e.context(format!(
                    "job {} ({}) of VM {vm} failed",
                    job.id,
                    job.kind.as_str()
                )))
            }
        }
    }

    // ---- protect / replicate / reverse ----

    /// Enables replication of `vm` to `site` and takes the first recovery point.
    pub fn protect(
        &self,
        vm: &str,
        site: &str,
        rpo: Duration,
        retention: Duration,
        block_size: u64,
        opts: RunOpts,
    ) -> Result<Job> {
        ferry_model::validate_name("VM", vm)?;
        if !(4096..=(4 << 20)).contains(&block_size) || !block_size.is_power_of_two() {
            bail!("block size {block_size} is not supported: use a power of two from 4KiB to 4MiB (default 64KiB)");
        }
        let site_rec = self.site(site)?;
        if site_rec.role != SiteRole::Recovery {
            bail!("site {site} is a {} site; protect to a recovery site (add one with `ferry site add NAME --role recovery`)", site_rec.role.as_str());
        }
        let existing = self.vault.item(vm)?;
        let state = existing
            .as_ref()
            .map(|i| i.state)
            .unwrap_or(ItemState::Unprotected);
        let next = begin(vm, state, Command::Protect)?;
        let (host, info) = self.locate_vm(vm, None)?;
        let h = self.host(&host.name)?;
        if self.site(&h.site)?.role == SiteRole::Recovery {
            bail!(
                "VM {vm} runs on host {} at recovery site {}; protect VMs from their primary site",
                h.name,
                h.site
            );
        }
        check_formats(&info, self.driver(&h)?.as_ref())?;
        self.store(site)?;
        let mut item = ProtectedItem {
            vm: vm.into(),
            primary_host: host.name.clone(),
            recovery_site: site.into(),
            recovery_host: None,
            state,
            block_size,
            rpo_secs: rpo.as_secs(),
            retention_secs: retention.as_secs(),
            job: None,
            failed_over_at: None,
        };
        if existing.is_some() {
            self.vault.update_item(&item)?;
        } else {
            self.vault.add_item(&item)?;
        }
        let key = self.given_key()?;
        self.set_extra(
            vm,
            &ItemExtra {
                key_id: key.as_ref().map(|k| k.id()),
                key_file: key.as_ref().and(self.key_file.clone()),
                vm_spec: Some(VmSpec::like(&info).into()),
                ..Default::default()
            },
        )?;
        self.drop_maps(vm, Copy::Primary)?;
        let run = self.new_job(
            JobKind::Protect,
            vm,
            &["initial replication"],
            json!({}),
            opts,
        )?;
        self.enter(&mut item, next, run.id())?;
        let r = self
            .replicate_copy(&run, &item, &host, "initial replication", false)
            .map(|p| (Outcome::Succeeded, p));
        Ok(self.conclude(vm, Command::Protect, run, r)?.0)
    }

    /// Runs one replication cycle now.
    pub fn replicate(&self, vm: &str, opts: RunOpts, verify: bool) -> Result<Job> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        let next = begin(vm, item.state, Command::Replicate)?;
        let host = self.host(&item.primary_host)?;
        self.driver(&host)?.check_connected()?;
        let run = self.new_job(
            JobKind::Replicate,
            vm,
            &["replicate changes"],
            json!({}),
            opts,
        )?;
        self.enter(&mut item, next, run.id())?;
        let r = self
            .replicate_copy(&run, &item, &host, "replicate changes", verify)
            .map(|p| (Outcome::Succeeded, p));
        Ok(self.conclude(vm, Command::Replicate, run, r)?.0)
    }

    /// Protects a failed-back VM again, sending only blocks changed since the failback.
    pub fn reverse_replicate(&self, vm: &str, opts: RunOpts, verify: bool) -> Result<Job> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        let next = begin(vm, item.state, Command::ReverseReplicate)?;
        let host = self.host(&item.primary_host)?;
        self.driver(&host)?.check_connected()?;
        self.item_store(&item)?;
        let run = self.new_job(
            JobKind::ReverseReplicate,
            vm,
            &["replicate changes since failback"],
            json!({}),
            opts,
        )?;
        self.enter(&mut item, next, run.id())?;
        let r = self
            .replicate_copy(
                &run,
                &item,
                &host,
                "replicate changes since failback",
                verify,
            )
            .map(|p| (Outcome::Succeeded, p));
        Ok(self.conclude(vm, Command::ReverseReplicate, run, r)?.0)
    }

    /// Replicates the primary copy into a new recovery point: a point-in-time view of its
    /// disks, reading only what change tracking says changed (every block when it cannot
    /// tell, or with `verify`); only blocks new to the store move.
    fn replicate_copy(
        &self,
        run: &JobRun,
        item: &ProtectedItem,
        host: &Host,
        step: &str,
        verify: bool,
    ) -> Result<RecoveryPoint> {
        let d = self.driver(host)?;
        let info = d
            .get_vm(&item.vm)?
            .ok_or_else(|| anyhow!("VM {} no longer exists on host {}", item.vm, host.name))?;
        check_formats(&info, d.as_ref())?;
        let store = self.item_store(item)?;
        let mut extra = self.extra(&item.vm)?;
        let known = extra.primary.clone().filter(|p| p.host == host.name);
        let since = known.as_ref().map(|k| k.marks.clone()).unwrap_or_default();
        let total: u64 = info.disks.iter().map(|x| x.size).sum();
        run.begin_step(step, total);
        let view = d.open_view(&item.vm, &since)?;
        let mut maps = Vec::new();
        for disk in &info.disks {
            let vd = view_disk(&view, disk.index)?;
            let base = match &known {
                Some(_) => self
                    .load_fitting_map(
                        &item.vm,
                        Copy::Primary,
                        disk.index,
                        disk.size,
                        item.block_size,
                    )?
                    .map(Arc::new),
                None => None,
            };
            let ks = known_source(run, vd, base.as_ref(), verify, &host.name);
            // The known map is also the target: one copy in memory.
            let target = base
                .clone()
                .unwrap_or_else(|| Arc::new(BlockMap::zeros(disk.size, item.block_size)));
            let r = pass(
                &run.ctx,
                PassSpec {
                    src: vd.dev.as_ref(),
                    block_size: item.block_size,
                    target,
                    store: Some(store.clone()),
                    hasher: store.hasher(),
                    write: None,
                    crosses_sites: true,
                    known: ks,
                },
            )?;
            if verify {
                check_tracking(run, vd, base.as_deref(), &r.map, &host.name);
            }
            self.save_map(&item.vm, Copy::Primary, disk.index, &r.map)?;
            maps.push(r.map);
        }
        extra.primary = Some(CopyState {
            host: host.name.clone(),
            marks: view.marks(),
        });
        extra.vm_spec = Some(VmSpec::like(&info).into());
        self.set_extra(&item.vm, &extra)?;
        close_view(run, view);
        let point = self.record_point(
            &store,
            &item.vm,
            Manifest { disks: maps },
            PointKind::Replication,
        )?;
        self.apply_retention(&store, item)?;
        run.end_step();
        Ok(point)
    }

    fn record_point(
        &self,
        store: &Store,
        vm: &str,
        m: Manifest,
        kind: PointKind,
    ) -> Result<RecoveryPoint> {
        let _span = tracing::debug_span!("record_point").entered();
        let id = self.vault.next_point_id()?;
        let key = store.put_manifest(vm, id, &m)?;
        let p = RecoveryPoint {
            id,
            vm: vm.into(),
            created_at: ferry_model::rfc3339(now_secs()),
            kind,
            size: m.size(),
            data_bytes: m.disks.iter().map(|d| d.data_bytes()).sum(),
            manifest: key,
        };
        self.vault.add_point(&p)?;
        Ok(p)
    }

    /// Deletes points older than the retention (always keeping the newest) and collects packs
    /// nothing references any more.
    fn apply_retention(&self, store: &Store, item: &ProtectedItem) -> Result<()> {
        let points = self.vault.points(&item.vm)?;
        let cutoff = now_secs() - item.retention_secs as i64;
        let expired: Vec<_> = points
            .iter()
            .skip(1)
            .filter(|p| parse_rfc3339(&p.created_at).unwrap_or(i64::MAX) < cutoff)
            .collect();
        if expired.is_empty() {
            return Ok(());
        }
        if store.others_active()? {
            // Another job may be reading one of these points or writing packs: try next cycle.
            self.vault.event(
                Some(&item.vm),
                None,
                "retention deferred: another job is using the store",
            )?;
            return Ok(());
        }
        for p in expired {
            // Forget the point first: a crash in between leaves an orphan manifest, never a
            // listed point that cannot be restored.
            self.vault.delete_point(p.id)?;
            store.delete_manifest(&p.manifest)?;
        }
        // Leases keep running jobs safe; the grace period is a second line of defence.
        if let Err(e) = store.collect_garbage(Duration::from_secs(900)) {
            self.vault.event(
                Some(&item.vm),
                None,
                &format!("garbage collection skipped: {e}"),
            )?;
        }
        Ok(())
    }

    // ---- failover / commit ----

    /// Fails `vm` over to the recovery site.
    pub fn failover(
        &self,
        vm: &str,
        mode: FailoverMode,
        point: Option<i64>,
        host: Option<&str>,
        opts: RunOpts,
    ) -> Result<Job> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        let next = begin(vm, item.state, Command::Failover)?;
        self.require_key(vm)?;
        let rhost = match host {
            Some(h) => self.host(h)?,
            None => self
                .vault
                .hosts()?
                .into_iter()
                .find(|h| h.site == item.recovery_site)
                .ok_or_else(|| anyhow!("recovery site {} has no host; add one with `ferry host add NAME --site {} --driver dir`", item.recovery_site, item.recovery_site))?,
        };
        if rhost.site != item.recovery_site {
            bail!(
                "host {} is at site {}, not at VM {vm}'s recovery site {}",
                rhost.name,
                rhost.site,
                item.recovery_site
            );
        }
        let rd = self.driver(&rhost)?;
        rd.check_connected()?;
        let phost = self.host(&item.primary_host)?;
        let pd = self.driver(&phost)?;
        let extra = self.extra(vm)?;
        // The shape of the VM to create: from the primary copy if reachable, else from the point.
        let pinfo = match mode {
            FailoverMode::Planned => {
                pd.check_connected()?;
                Some(pd.get_vm(vm)?.ok_or_else(|| anyhow!("VM {vm} no longer exists on host {}; use `ferry failover {vm} --unplanned`", phost.name))?)
            }
            FailoverMode::Unplanned => pd
                .check_connected()
                .ok()
                .and_then(|_| pd.get_vm(vm).ok().flatten()),
        };
        // A failover that crashed after the recovery VM was complete only needs to start it.
        let restored = extra.failover_partial.as_deref() == Some(rhost.name.as_str())
            && extra
                .recovery
                .as_ref()
                .is_some_and(|r| r.host == rhost.name)
            && rd.get_vm(vm)?.is_some();
        if let Some(existing) = rd.get_vm(vm)? {
            if extra.failover_partial.as_deref() != Some(rhost.name.as_str()) {
                bail!("VM {vm} already exists on host {} (not created by ferry); remove it or pick another host with --host", existing.host);
            }
        }
        let chosen = match (mode, point) {
            (FailoverMode::Planned, Some(_)) => bail!("--point applies to --unplanned failovers; a planned failover always takes a last point"),
            (FailoverMode::Planned, None) => None,
            (FailoverMode::Unplanned, Some(id)) => Some(
                self.vault
                    .point(id)?
                    .filter(|p| p.vm == vm)
                    .ok_or_else(|| anyhow!("VM {vm} has no recovery point {id}; list them with `ferry points {vm}`"))?,
            ),
            (FailoverMode::Unplanned, None) => Some(
                self.vault
                    .points(vm)?
                    .into_iter()
                    .next()
                    .ok_or_else(|| anyhow!("VM {vm} has no recovery point yet; run `ferry replicate {vm}`"))?,
            ),
        };
        // The VM's shape: from the primary copy when reachable, else as last replicated.
        let saved = extra.vm_spec.clone();
        let shape = match (&pinfo, &saved) {
            (Some(i), _) => crate::SavedSpec::from(VmSpec::like(i)),
            (None, Some(s)) => s.clone(),
            (None, None) => bail!("the primary copy of VM {vm} is unreachable and ferry has no record of its shape (CPUs, memory, NICs); re-protect it from a reachable primary"),
        };
        let nics = shape.nics.clone();
        rd.check_switches(&nics)?;
        let store = self.item_store(&item)?;
        let names: Vec<&str> = match mode {
            FailoverMode::Planned => vec![
                "stop primary VM",
                "replicate final changes",
                "create recovery VM",
                "restore disks",
                "start recovery VM",
            ],
            FailoverMode::Unplanned => {
                vec!["create recovery VM", "restore disks", "start recovery VM"]
            }
        };
        let run = self.new_job(
            JobKind::Failover,
            vm,
            &names,
            json!({"mode": format!("{mode:?}").to_lowercase(), "host": rhost.name, "point": chosen.as_ref().map(|p| p.id)}),
            opts,
        )?;
        self.enter(&mut item, next, run.id())?;
        let r = (|| -> Result<(Outcome, ())> {
            let mut down = None;
            if !restored {
                let point = match chosen {
                    Some(p) => p,
                    None => {
                        run.begin_step("stop primary VM", 0);
                        let was_running = pd.get_vm(vm)?.map(|v| v.power) == Some(Power::Running);
                        pd.stop_vm(vm)?;
                        if was_running {
                            down = Some(Instant::now());
                        }
                        run.end_step();
                        self.replicate_copy(&run, &item, &phost, "replicate final changes", false)?
                    }
                };
                let manifest = store.get_manifest(&point.manifest)?;
                run.begin_step("create recovery VM", 0);
                let mut ex = self.extra(vm)?;
                ex.failover_partial = Some(rhost.name.clone());
                self.set_extra(vm, &ex)?;
                if rd.get_vm(vm)?.is_some() {
                    rd.delete_vm(vm)?;
                }
                let spec = VmSpec {
                    name: vm.into(),
                    cpus: shape.cpus,
                    memory: shape.memory,
                    disks: manifest.disks.iter().map(|d| d.size).collect(),
                    nics,
                };
                rd.create_vm(&spec)?;
                // Not startable until restored and tracked (nothing may write before the mark).
                for i in 0..spec.disks.len() as u32 {
                    rd.set_disk_consistent(vm, i, false)?;
                }
                run.end_step();
                run.begin_step(
                    "restore disks",
                    manifest.disks.iter().map(|d| d.data_bytes()).sum(),
                );
                for (i, m) in manifest.disks.iter().enumerate() {
                    let dev = rd.open_disk(vm, i as u32, true)?;
                    restore(
                        &run.ctx,
                        &store,
                        m,
                        dev.as_ref(),
                        &format!("point {}, disk {i}", point.id),
                    )?;
                    self.save_map(vm, Copy::Recovery, i as u32, m)?;
                }
                // Change tracking of the recovery copy starts now: its content is the point's.
                let marks = rd.mark_disks(vm)?;
                for i in 0..manifest.disks.len() as u32 {
                    rd.set_disk_consistent(vm, i, true)?;
                }
                // The recovery VM is complete: a crash from here on resumes by starting it.
                let mut ex = self.extra(vm)?;
                ex.recovery = Some(CopyState {
                    host: rhost.name.clone(),
                    marks,
                });
                self.set_extra(vm, &ex)?;
                run.end_step();
            }
            crate::fault("failover-before-start-recovery");
            run.begin_step("start recovery VM", 0);
            rd.start_vm(vm)?;
            crate::fault("failover-after-start-recovery");
            if let Some(t) = down {
                run.set_downtime(t.elapsed());
            }
            run.end_step();
            let mut ex = self.extra(vm)?;
            ex.failover_partial = None;
            self.set_extra(vm, &ex)?;
            let mut it = self.item(vm)?;
            it.recovery_host = Some(rhost.name.clone());
            it.failed_over_at = Some(now_secs());
            self.vault.update_item(&it)?;
            Ok((Outcome::Succeeded, ()))
        })();
        Ok(self.conclude(vm, Command::Failover, run, r)?.0)
    }

    /// Commits a failover (the VM stays at the recovery site) or a failback (the recovery VM
    /// and its disks are deleted).
    pub fn commit(&self, vm: &str) -> Result<Job> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        let next = begin(vm, item.state, Command::Commit)?;
        let after_failback = item.state == ItemState::FailbackCommitPending;
        let rd = match (&item.recovery_host, after_failback) {
            (Some(h), true) => {
                let d = self.driver(&self.host(h)?)?;
                d.check_connected()?;
                Some(d)
            }
            _ => None,
        };
        let name = if after_failback {
            "delete recovery VM"
        } else {
            "commit failover"
        };
        let run = self.new_job(JobKind::Commit, vm, &[name], json!({}), RunOpts::default())?;
        self.enter(&mut item, next, run.id())?;
        let r = (|| -> Result<(Outcome, ())> {
            run.begin_step(name, 0);
            if let Some(d) = &rd {
                if d.get_vm(vm)?.is_some() {
                    d.stop_vm(vm)?;
                    d.delete_vm(vm)?;
                }
                self.drop_maps(vm, Copy::Recovery)?;
                let mut ex = self.extra(vm)?;
                ex.recovery = None;
                self.set_extra(vm, &ex)?;
                let mut it = self.item(vm)?;
                it.recovery_host = None;
                self.vault.update_item(&it)?;
            }
            run.end_step();
            Ok((Outcome::Succeeded, ()))
        })();
        Ok(self.conclude(vm, Command::Commit, run, r)?.0)
    }

    // ---- failback ----

    /// Fails `vm` back to the primary site (see DESIGN.md §2). Returns the job, or the
    /// prediction of a dry run.
    pub fn failback(&self, vm: &str, o: &FailbackOpts) -> Result<(Option<Job>, Option<DryRun>)> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        self.require_key(vm)?;
        let resuming = matches!(
            item.state,
            ItemState::FailbackReady | ItemState::FailbackInterrupted
        );
        let mut prev: Option<FailbackParams> = match (resuming, item.job) {
            (true, Some(id)) => serde_json::from_value(self.vault.job_params(id)?).ok(),
            _ => None,
        };
        // A new --host restarts the sync towards that host (same job); the old target's disks
        // stay marked inconsistent. Not once the primary was being started (phase 3).
        let retarget = match (&prev, &o.host) {
            (Some(p), Some(h)) if &p.host != h && p.phase < 3 => Some(p.host.clone()),
            _ => None,
        };
        if let (Some(p), Some(h)) = (prev.as_mut(), &o.host) {
            if retarget.is_some() {
                *p = FailbackParams {
                    sync: p.sync,
                    host: h.clone(),
                    create_vm: o.create_vm,
                    phase: 1,
                    ..Default::default()
                };
            }
        }
        let sync = o
            .sync
            .or(prev.as_ref().and_then(|p| p.sync))
            .unwrap_or(SyncMode::Delta);
        let cmd = Command::Failback(sync);
        let next = begin(vm, item.state, cmd)?;
        if let (Some(p), Some(id)) = (prev.clone().filter(|p| p.phase == 3), item.job) {
            return Ok((
                Some(self.failback_finish(&mut item, id, p, o.run.unwrap_or_default())?),
                None,
            ));
        }
        let in_phase2 = prev.as_ref().is_some_and(|p| p.phase == 2);
        if let (Some(p), Some(s)) = (&prev, o.sync) {
            if let (true, Some(was)) = (in_phase2, p.sync.filter(|w| *w != s)) {
                bail!("VM {vm} is in the middle of the final {} sync; resume it with `ferry failback {vm}` (without --sync)", was);
            }
        }
        let target_name = o
            .host
            .clone()
            .or(prev.as_ref().map(|p| p.host.clone()))
            .unwrap_or_else(|| item.primary_host.clone());
        let thost = self.host(&target_name)?;
        let tsite = self.site(&thost.site)?;
        if tsite.role != SiteRole::Primary {
            bail!(
                "host {} is at {} site {}; fail back to a host at a primary site",
                thost.name,
                tsite.role.as_str(),
                tsite.name
            );
        }
        let td = self.driver(&thost)?;
        td.check_connected()?;
        let rhost_name = item.recovery_host.clone().ok_or_else(|| {
            anyhow!("VM {vm} has no recovery copy on record; nothing to fail back")
        })?;
        let rhost = self.host(&rhost_name)?;
        let rd = self.driver(&rhost)?;
        rd.check_connected()?;
        let rinfo = rd.get_vm(vm)?.ok_or_else(|| {
            anyhow!(
                "the recovery VM {vm} no longer exists on host {}; it cannot be failed back",
                rhost.name
            )
        })?;
        check_formats(&rinfo, rd.as_ref())?;
        let tinfo = td.get_vm(vm)?;
        let creates = tinfo.is_none()
            && !prev
                .as_ref()
                .is_some_and(|p| p.create_vm && p.host == thost.name);
        match &tinfo {
            None if !(o.create_vm || prev.as_ref().is_some_and(|p| p.create_vm)) => bail!(
                "VM {vm} does not exist on host {}; add --create-vm to create it there{}",
                thost.name,
                if o.host.is_none() {
                    " (the primary VM was deleted: a full download is recommended: --sync full --create-vm)"
                } else {
                    ""
                }
            ),
            None => rd.check_switches(&[]).and_then(|_| {
                td.check_switches(
                    &rinfo
                        .nics
                        .iter()
                        .map(|n| n.switch.clone())
                        .collect::<Vec<_>>(),
                )
            })?,
            Some(t) => {
                if t.power == Power::Running {
                    bail!(
                        "VM {vm} is running on host {} at the primary site; two live copies would diverge. Stop it with `ferry vm stop {vm} --host {}`, then run the failback again",
                        thost.name, thost.name
                    );
                }
                check_formats(t, td.as_ref())?;
                let shape = |v: &VmInfo| v.disks.iter().map(|d| d.size).collect::<Vec<_>>();
                if shape(t) != shape(&rinfo) {
                    bail!("VM {vm} on host {} has disks of sizes {:?} but the recovery VM has {:?}; fail back to another host with --host H --create-vm", thost.name, shape(t), shape(&rinfo));
                }
            }
        }
        let _ = creates;
        let failed_for = item
            .failed_over_at
            .map(|t| Duration::from_secs((now_secs() - t).max(0) as u64));
        let opts = o.run.unwrap_or_default();

        if o.dry_run {
            return Ok((
                None,
                Some(self.failback_dry_run(
                    &item,
                    sync,
                    &thost,
                    tinfo.as_ref(),
                    &rinfo,
                    failed_for,
                    opts,
                )?),
            ));
        }

        // Everything checked: from here on things change.
        if let Some(old) = &retarget {
            self.note(&format!(
                "restarting the failback towards host {} (was {old}); VM {vm}'s disks on {old} stay marked inconsistent",
                thost.name
            ));
        }
        let (rec, why) = recommend(tinfo.is_some(), failed_for, None);
        self.note(&format!("recommendation: --sync {} ({why})", rec.as_str()));
        let (run, mut params) = match (&prev, item.job) {
            (Some(p), Some(id)) => {
                let mut p = p.clone();
                if !in_phase2 {
                    p.sync = Some(sync);
                }
                p.create_vm |= o.create_vm;
                p.auto_complete = o.auto_complete;
                (self.resume_job(id, opts)?, p)
            }
            _ => {
                let p = FailbackParams {
                    sync: Some(sync),
                    host: thost.name.clone(),
                    create_vm: o.create_vm,
                    phase: 1,
                    rounds: 0,
                    full_reset: false,
                    auto_complete: o.auto_complete,
                };
                let names: &[&str] = match sync {
                    SyncMode::Delta => &[
                        "prepare primary VM",
                        "sync disks (phase 1)",
                        "stop recovery VM",
                        "sync final changes (phase 2)",
                        "start primary VM",
                    ],
                    SyncMode::Full => &[
                        "prepare primary VM",
                        "stop recovery VM",
                        "download all blocks",
                        "start primary VM",
                    ],
                };
                (
                    self.new_job(
                        JobKind::Failback,
                        vm,
                        names,
                        serde_json::to_value(&p)?,
                        opts,
                    )?,
                    p,
                )
            }
        };
        let running_state = if in_phase2 {
            ItemState::FailbackCompleting
        } else {
            next
        };
        self.enter(&mut item, running_state, run.id())?;
        let effective_cmd = if in_phase2 && sync == SyncMode::Delta {
            Command::Complete
        } else {
            cmd
        };
        let r = (|| -> Result<(Outcome, ())> {
            self.failback_prepare(&run, &item, &thost, td.as_ref(), &rinfo, &mut params)?;
            if sync == SyncMode::Delta && !in_phase2 {
                self.failback_phase1(
                    &run,
                    &item,
                    td.as_ref(),
                    rd.as_ref(),
                    &rinfo,
                    &mut params,
                    o.verify,
                )?;
                if !o.auto_complete {
                    return Ok((Outcome::Waiting, ()));
                }
                let mut it = self.item(vm)?;
                it.state = ItemState::FailbackCompleting;
                self.vault.update_item(&it)?;
            }
            self.failback_phase2(
                &run,
                &thost,
                td.as_ref(),
                rd.as_ref(),
                &rinfo,
                &mut params,
                o.verify,
            )?;
            Ok((Outcome::Succeeded, ()))
        })();
        let (job, ()) = self.conclude(vm, effective_cmd, run, r)?;
        Ok((Some(job), None))
    }

    /// Finishes a failback interrupted after its data was complete: starts the primary VM.
    fn failback_finish(
        &self,
        item: &mut ProtectedItem,
        id: i64,
        params: FailbackParams,
        opts: RunOpts,
    ) -> Result<Job> {
        let vm = item.vm.clone();
        let thost = self.host(&params.host)?;
        let td = self.driver(&thost)?;
        td.check_connected()?;
        let run = self.resume_job(id, opts)?;
        self.enter(item, ItemState::FailbackCompleting, id)?;
        let r = (|| -> Result<(Outcome, ())> {
            run.begin_step("start primary VM", 0);
            td.start_vm(&vm)?;
            run.end_step();
            Ok((Outcome::Succeeded, ()))
        })();
        let cmd = match params.sync {
            Some(SyncMode::Full) => Command::Failback(SyncMode::Full),
            _ => Command::Complete,
        };
        Ok(self.conclude(&vm, cmd, run, r)?.0)
    }

    /// Phase 2 of a waiting delta failback.
    pub fn complete(&self, vm: &str, opts: RunOpts, verify: bool) -> Result<Job> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        let next = begin(vm, item.state, Command::Complete)?;
        let id = item
            .job
            .ok_or_else(|| anyhow!("VM {vm} has no waiting failback job"))?;
        let mut params: FailbackParams = serde_json::from_value(self.vault.job_params(id)?)?;
        let thost = self.host(&params.host)?;
        let td = self.driver(&thost)?;
        td.check_connected()?;
        let rhost = self.host(item.recovery_host.as_deref().unwrap_or_default())?;
        let rd = self.driver(&rhost)?;
        rd.check_connected()?;
        let rinfo = rd.get_vm(vm)?.ok_or_else(|| {
            anyhow!(
                "the recovery VM {vm} no longer exists on host {}",
                rhost.name
            )
        })?;
        let run = self.resume_job(id, opts)?;
        self.enter(&mut item, next, run.id())?;
        let r = self
            .failback_phase2(
                &run,
                &thost,
                td.as_ref(),
                rd.as_ref(),
                &rinfo,
                &mut params,
                verify,
            )
            .map(|_| (Outcome::Succeeded, ()));
        Ok(self.conclude(vm, Command::Complete, run, r)?.0)
    }

    fn save_params(&self, run: &JobRun, p: &FailbackParams) -> Result<()> {
        self.vault
            .set_job_params(run.id(), &serde_json::to_value(p)?)?;
        Ok(())
    }

    /// Creates the target VM if needed and marks its disks inconsistent for the sync.
    fn failback_prepare(
        &self,
        run: &JobRun,
        item: &ProtectedItem,
        thost: &Host,
        td: &dyn Hypervisor,
        rinfo: &VmInfo,
        params: &mut FailbackParams,
    ) -> Result<()> {
        let vm = &item.vm;
        run.begin_step("prepare primary VM", 0);
        let mut extra = self.extra(vm)?;
        if td.get_vm(vm)?.is_none() {
            let mut spec = VmSpec::like(rinfo);
            spec.name = vm.clone();
            td.create_vm(&spec)?;
            // A new VM's disks are all zeros: its maps are exact without reading anything.
            self.drop_maps(vm, Copy::Primary)?;
            for d in &rinfo.disks {
                self.save_map(
                    vm,
                    Copy::Primary,
                    d.index,
                    &BlockMap::zeros(d.size, item.block_size),
                )?;
            }
            extra.primary = Some(CopyState {
                host: thost.name.clone(),
                marks: vec![None; rinfo.disks.len()],
            });
            self.set_extra(vm, &extra)?;
        }
        let tinfo = td
            .get_vm(vm)?
            .ok_or_else(|| anyhow!("VM {vm} vanished from host {}", thost.name))?;
        // Know what the target disks hold: maps that change tracking proves current (re-reading
        // only what changed), journals of an interrupted sync, or a scan.
        let known_host = extra.primary.as_ref().is_some_and(|p| p.host == thost.name);
        let since = extra
            .primary
            .as_ref()
            .filter(|_| known_host)
            .map(|p| p.marks.clone())
            .unwrap_or_default();
        let full = params.sync == Some(SyncMode::Full) && !params.full_reset;
        let view = if full {
            None
        } else {
            Some(td.peek_view(vm, &since)?)
        };
        for d in &tinfo.disks {
            let inconsistent_by_us = !d.consistent && known_host;
            let map = if known_host {
                self.load_fitting_map(vm, Copy::Primary, d.index, d.size, item.block_size)?
            } else {
                None
            };
            if full {
                // A full download rewrites every block: treat the target as unknown.
                self.save_map(
                    vm,
                    Copy::Primary,
                    d.index,
                    &BlockMap::unknown(d.size, item.block_size),
                )?;
            } else if map.is_some() && inconsistent_by_us {
                // An interrupted sync of ours: its journal keeps the map exact.
            } else if let Some(view) = &view {
                let vd = view_disk(view, d.index)?;
                let rescan = || run.begin_step("prepare primary VM", d.size);
                if let Some(m) = self.rescan_changed(run, item, vd, map, &thost.name, rescan)? {
                    self.save_map(vm, Copy::Primary, d.index, &m)?;
                }
            }
        }
        if let Some(v) = view {
            // Its marks are not recorded: ferry writes these disks next, and tracking of the
            // primary starts over once the failback completes.
            if let Err(e) = v.close(false) {
                run.note(format!("cleaning up the disk snapshot: {e}"));
            }
        }
        for d in &tinfo.disks {
            td.set_disk_consistent(vm, d.index, false)?;
        }
        if params.sync == Some(SyncMode::Full) {
            params.full_reset = true;
        }
        extra.primary = Some(CopyState {
            host: thost.name.clone(),
            marks: vec![None; tinfo.disks.len()],
        });
        self.set_extra(vm, &extra)?;
        self.save_params(run, params)?;
        run.end_step();
        Ok(())
    }

    /// Moves every differing block of the recovery disks to the target disks (journaled),
    /// reading from a point-in-time view of the recovery VM only what change tracking says
    /// changed since the recovery copy's marks (everything with `verify` or when it cannot
    /// tell). Saves the recovery maps and marks of the view's moment; returns the maps.
    #[allow(clippy::too_many_arguments)]
    fn sync_disks(
        &self,
        run: &JobRun,
        vm: &str,
        block_size: u64,
        store: &Arc<Store>,
        td: &dyn Hypervisor,
        rd: &dyn Hypervisor,
        rinfo: &VmInfo,
        verify: bool,
    ) -> Result<Vec<BlockMap>> {
        let since = self
            .extra(vm)?
            .recovery
            .filter(|r| r.host == rinfo.host)
            .map(|r| r.marks)
            .unwrap_or_default();
        let view = rd.open_view(vm, &since)?;
        let mut maps = Vec::new();
        for d in &rinfo.disks {
            let vd = view_disk(&view, d.index)?;
            let base = self
                .load_fitting_map(vm, Copy::Recovery, d.index, d.size, block_size)?
                .map(Arc::new);
            let ks = known_source(run, vd, base.as_ref(), verify, &rinfo.host);
            let target = self
                .load_map(vm, Copy::Primary, d.index)?
                .unwrap_or_else(|| BlockMap::unknown(d.size, block_size));
            let dst = td.open_disk(vm, d.index, true)?;
            let mut journal = MapJournal::open(&self.journal_path(vm, Copy::Primary, d.index))?;
            let r = pass(
                &run.ctx,
                PassSpec {
                    src: vd.dev.as_ref(),
                    block_size,
                    target: Arc::new(target),
                    store: Some(store.clone()),
                    hasher: store.hasher(),
                    write: Some((dst.as_ref(), &mut journal)),
                    crosses_sites: true,
                    known: ks,
                },
            )?;
            if verify {
                check_tracking(run, vd, base.as_deref(), &r.map, &rinfo.host);
            }
            maps.push(r.map);
        }
        // Maps first, then marks: a crash in between leaves older marks, whose changes
        // include everything since the new maps.
        let _span = tracing::debug_span!("save_maps").entered();
        for (i, m) in maps.iter().enumerate() {
            self.save_map(vm, Copy::Recovery, i as u32, m)?;
        }
        let mut ex = self.extra(vm)?;
        ex.recovery = Some(CopyState {
            host: rinfo.host.clone(),
            marks: view.marks(),
        });
        self.set_extra(vm, &ex)?;
        close_view(run, view);
        Ok(maps)
    }

    #[allow(clippy::too_many_arguments)]
    fn failback_phase1(
        &self,
        run: &JobRun,
        item: &ProtectedItem,
        td: &dyn Hypervisor,
        rd: &dyn Hypervisor,
        rinfo: &VmInfo,
        params: &mut FailbackParams,
        verify: bool,
    ) -> Result<()> {
        let vm = &item.vm;
        let store = self.item_store(item)?;
        let total: u64 = rinfo.disks.iter().map(|d| d.size).sum();
        run.begin_step("sync disks (phase 1)", total);
        self.sync_disks(run, vm, item.block_size, &store, td, rd, rinfo, verify)?;
        params.rounds += 1;
        self.save_params(run, params)?;
        run.end_step();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn failback_phase2(
        &self,
        run: &JobRun,
        thost: &Host,
        td: &dyn Hypervisor,
        rd: &dyn Hypervisor,
        rinfo: &VmInfo,
        params: &mut FailbackParams,
        verify: bool,
    ) -> Result<()> {
        let vm = &rinfo.name;
        let item = self.item(vm)?;
        let store = self.item_store(&item)?;
        run.begin_step("stop recovery VM", 0);
        let was_running = rd.get_vm(vm)?.map(|v| v.power) == Some(Power::Running);
        let down = Instant::now();
        // Recorded before stopping, so a crash in between resumes as phase 2, never phase 1.
        params.phase = 2;
        self.save_params(run, params)?;
        rd.stop_vm(vm)?;
        run.end_step();
        let step = if params.sync == Some(SyncMode::Full) {
            "download all blocks"
        } else {
            "sync final changes (phase 2)"
        };
        // After phase 1, change tracking leaves only the final delta to read.
        run.begin_step(step, rinfo.disks.iter().map(|d| d.size).sum());
        let maps = self.sync_disks(run, vm, item.block_size, &store, td, rd, rinfo, verify)?;
        run.end_step();
        // The failback point: what the primary now holds, complete in the store so reverse
        // replication sends only later changes.
        self.fill_store(run, &store, rd, vm, &maps)?;
        if verify {
            for (i, m) in maps.iter().enumerate() {
                let dev = td.open_disk(vm, i as u32, false)?;
                let check = pass(
                    &run.ctx,
                    PassSpec {
                        src: dev.as_ref(),
                        block_size: item.block_size,
                        target: Arc::new(m.clone()),
                        store: None,
                        hasher: self.item_hasher(&item.vm)?,
                        write: None,
                        crosses_sites: false,
                        known: None,
                    },
                )?;
                if check.blocks_moved > 0 {
                    bail!("verification failed: {} blocks of disk {i} on host {} differ from the recovery disk after the sync; re-run `ferry failback {vm}`", check.blocks_moved, thost.name);
                }
            }
        }
        for (i, m) in maps.iter().enumerate() {
            self.save_map(vm, Copy::Primary, i as u32, m)?;
        }
        // Change tracking of the primary starts now, while its disks are still marked
        // inconsistent (nothing can start the VM and write before the mark): its content is
        // the failback point's.
        let marks = td.mark_disks(vm)?;
        let mut extra = self.extra(vm)?;
        extra.primary = Some(CopyState {
            host: thost.name.clone(),
            marks,
        });
        self.set_extra(vm, &extra)?;
        for i in 0..maps.len() as u32 {
            td.set_disk_consistent(vm, i, true)?;
        }
        self.record_point(
            &store,
            vm,
            Manifest {
                disks: maps.clone(),
            },
            PointKind::Failback,
        )?;
        let mut it = self.item(vm)?;
        it.primary_host = thost.name.clone();
        self.vault.update_item(&it)?;
        // Recorded before starting: after a crash right here, a re-run only starts the
        // primary (its disks are complete) and never syncs over a primary that already runs.
        params.phase = 3;
        self.save_params(run, params)?;
        crate::fault("failback-before-start-primary");
        run.begin_step("start primary VM", 0);
        td.start_vm(vm)?;
        crate::fault("failback-after-start-primary");
        if was_running || params.rounds > 0 {
            run.set_downtime(down.elapsed());
        }
        run.end_step();
        Ok(())
    }

    /// What a target disk holds now, given its map at its change mark (`map`): `None` when
    /// change tracking proves the map still exact, else the map re-hashed from the view —
    /// only the changed ranges when tracking knows them, every block otherwise. `on_rescan`
    /// runs before any reading.
    fn rescan_changed(
        &self,
        run: &JobRun,
        item: &ProtectedItem,
        vd: &ViewDisk,
        map: Option<BlockMap>,
        host: &str,
        on_rescan: impl FnOnce(),
    ) -> Result<Option<BlockMap>> {
        let size = vd.dev.size();
        let ks = known_source(run, vd, map.map(Arc::new).as_ref(), false, host);
        if ks.as_ref().is_some_and(|k| k.changed.is_empty()) {
            return Ok(None);
        }
        on_rescan();
        let scanned = pass(
            &run.ctx,
            PassSpec {
                src: vd.dev.as_ref(),
                block_size: item.block_size,
                target: Arc::new(BlockMap::unknown(size, item.block_size)),
                store: None,
                hasher: self.item_hasher(&item.vm)?,
                write: None,
                crosses_sites: false,
                known: ks,
            },
        )?;
        Ok(Some(scanned.map))
    }

    /// Uploads blocks of `maps` that the store lacks, reading them from the stopped recovery VM.
    fn fill_store(
        &self,
        run: &JobRun,
        store: &Arc<Store>,
        rd: &dyn Hypervisor,
        vm: &str,
        maps: &[BlockMap],
    ) -> Result<()> {
        let _span = tracing::debug_span!("fill_store").entered();
        let mut w = PackWriter::new(store.clone(), ferry_store::PACK_TARGET);
        let mut comp = zstd::bulk::Compressor::new(1)?;
        for (i, m) in maps.iter().enumerate() {
            let missing: Vec<u64> = (0..m.len() as u64)
                .filter(|&b| m.hashes[b as usize] != ZERO && !store.contains(&m.hashes[b as usize]))
                .collect();
            if missing.is_empty() {
                continue;
            }
            let dev = rd.open_disk(vm, i as u32, false)?;
            for b in missing {
                let r = m.block_range(b);
                let mut buf = vec![0u8; (r.end - r.start) as usize];
                dev.read_at(r.start, &mut buf)?;
                run.ctx.add_read(buf.len() as u64);
                let h = store.hasher().hash(&buf);
                if h != m.hashes[b as usize] {
                    bail!("recovery disk {i} of VM {vm} changed while stopped (block {b}); re-run `ferry failback {vm}`");
                }
                let (f, c) = encode(&mut comp, &buf);
                w.add(h, &f, c, buf.len() as u32)?;
            }
        }
        w.finish()?;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn failback_dry_run(
        &self,
        item: &ProtectedItem,
        sync: SyncMode,
        thost: &Host,
        tinfo: Option<&VmInfo>,
        rinfo: &VmInfo,
        failed_for: Option<Duration>,
        opts: RunOpts,
    ) -> Result<DryRun> {
        let vm = &item.vm;
        let ctx = JobCtx::new(opts.threads, None);
        let fake = Job {
            id: 0,
            kind: JobKind::Failback,
            vm: vm.clone(),
            state: JobState::Running,
            steps: vec![],
            bytes_read: 0,
            bytes_transferred: 0,
            bytes_written: 0,
            started_at: String::new(),
            ended_at: None,
            error: None,
            downtime_ms: None,
            notes: vec![],
        };
        let run = JobRun::start(self.home.clone(), fake, ctx, None);
        let extra = self.extra(vm)?;
        let td = self.driver(thost)?;
        let rd = self.driver(&self.host(&rinfo.host)?)?;
        let known_host = extra.primary.as_ref().is_some_and(|p| p.host == thost.name);
        let tsince = extra
            .primary
            .as_ref()
            .filter(|_| known_host)
            .map(|p| p.marks.clone())
            .unwrap_or_default();
        let tview = match tinfo {
            Some(_) => Some(td.peek_view(vm, &tsince)?),
            None => None,
        };
        let rsince = extra
            .recovery
            .as_ref()
            .filter(|r| r.host == rinfo.host)
            .map(|r| r.marks.clone())
            .unwrap_or_default();
        let rview = rd.peek_view(vm, &rsince)?;
        let mut disks = Vec::new();
        for d in &rinfo.disks {
            let target = match (tinfo, &tview) {
                (Some(t), Some(tview)) => {
                    let map = if known_host {
                        self.load_fitting_map(vm, Copy::Primary, d.index, d.size, item.block_size)?
                    } else {
                        None
                    };
                    let disk_consistent =
                        t.disks.get(d.index as usize).is_some_and(|x| x.consistent);
                    let vd = view_disk(tview, d.index)?;
                    match map {
                        Some(m) if !disk_consistent && known_host => m,
                        map => {
                            let known = map.clone();
                            self.rescan_changed(&run, item, vd, map, &thost.name, || {})?
                                .or(known)
                                .ok_or_else(|| anyhow!("internal: no map of disk {}", d.index))?
                        }
                    }
                }
                _ => BlockMap::zeros(d.size, item.block_size),
            };
            let target = if sync == SyncMode::Full {
                BlockMap::unknown(d.size, item.block_size)
            } else {
                target
            };
            let vd = view_disk(&rview, d.index)?;
            let base = self
                .load_fitting_map(vm, Copy::Recovery, d.index, d.size, item.block_size)?
                .map(Arc::new);
            let ks = known_source(&run, vd, base.as_ref(), false, &rinfo.host);
            let r = pass(
                &run.ctx,
                PassSpec {
                    src: vd.dev.as_ref(),
                    block_size: item.block_size,
                    target: Arc::new(target),
                    store: None,
                    hasher: self.item_hasher(&item.vm)?,
                    write: None,
                    crosses_sites: false,
                    known: ks,
                },
            )?;
            disks.push(DryRunDisk {
                index: d.index,
                blocks: r.map.len() as u64,
                blocks_to_move: r.blocks_moved,
                bytes_to_move: r.bytes_moved,
            });
        }
        let snap = run.snapshot();
        let blocks: u64 = disks.iter().map(|d| d.blocks).sum();
        let moving: u64 = disks.iter().map(|d| d.blocks_to_move).sum();
        let frac = if blocks == 0 {
            0.0
        } else {
            moving as f64 / blocks as f64
        };
        let (rec, reason) = recommend(
            tinfo.is_some(),
            failed_for,
            if sync == SyncMode::Delta {
                Some(frac)
            } else {
                None
            },
        );
        Ok(DryRun {
            vm: vm.clone(),
            sync,
            host: thost.name.clone(),
            blocks_to_move: moving,
            bytes_to_move: disks.iter().map(|d| d.bytes_to_move).sum(),
            disks,
            bytes_read: snap.bytes_read,
            recommended_sync: rec,
            reason,
        })
    }

    /// What ferry recommends for a failback of `vm`, from what it knows without reading disks.
    pub fn failback_recommendation(
        &self,
        vm: &str,
        host: Option<&str>,
    ) -> Result<(SyncMode, String)> {
        let item = self.item(vm)?;
        let h = host
            .map(|s| s.to_string())
            .unwrap_or(item.primary_host.clone());
        let exists = self
            .host(&h)
            .and_then(|h| Ok(self.driver(&h)?.get_vm(vm)?.is_some()))
            .unwrap_or(false);
        let failed_for = item
            .failed_over_at
            .map(|t| Duration::from_secs((now_secs() - t).max(0) as u64));
        Ok(recommend(exists, failed_for, None))
    }

    // ---- resumption ----

    /// Continues job `id`, whose process died, the way re-running its command would, with
    /// the options it was started with (`ferry serve` does this for the jobs it ran when it
    /// was killed). Returns the job as it ended or waits; `None` when there is nothing to
    /// continue (the VM moved on, or the job's command needs the operator: `protect`).
    pub fn resume_interrupted(&self, id: i64, opts: RunOpts) -> Result<Option<Job>> {
        let job = self.vault.job(id)?.ok_or_else(|| anyhow!("no job {id}"))?;
        let item = self.item(&job.vm)?;
        if item.job != Some(id) || job.state == JobState::Running {
            return Ok(None);
        }
        let params = self.vault.job_params(id)?;
        let vm = job.vm.as_str();
        Ok(match job.kind {
            JobKind::Failback => {
                let p: FailbackParams = serde_json::from_value(params)?;
                let o = FailbackOpts {
                    sync: p.sync,
                    host: Some(p.host),
                    create_vm: p.create_vm,
                    auto_complete: p.auto_complete,
                    dry_run: false,
                    verify: false,
                    run: Some(opts),
                };
                self.failback(vm, &o)?.0
            }
            JobKind::Failover => {
                let mode = match params.get("mode").and_then(|m| m.as_str()) {
                    Some("unplanned") => FailoverMode::Unplanned,
                    _ => FailoverMode::Planned,
                };
                let point = params.get("point").and_then(|p| p.as_i64());
                let host = params.get("host").and_then(|h| h.as_str());
                let point = point.filter(|_| mode == FailoverMode::Unplanned);
                Some(self.failover(vm, mode, point, host, opts)?)
            }
            JobKind::Replicate => Some(self.replicate(vm, opts, false)?),
            JobKind::ReverseReplicate => Some(self.reverse_replicate(vm, opts, false)?),
            JobKind::Commit => Some(self.commit(vm)?),
            JobKind::Protect => None,
        })
    }

    // ---- cancel ----

    /// Cancels the running or waiting job of `vm`; returns once it stopped (at most 30 s).
    pub fn cancel(&self, vm: &str) -> Result<Job> {
        let item = self.item(vm)?;
        let id = item
            .job
            .ok_or_else(|| anyhow!("VM {vm} has no job to cancel; see `ferry status {vm}`"))?;
        let job = self
            .vault
            .job(id)?
            .ok_or_else(|| anyhow!("job {id} not found"))?;
        match job.state {
            JobState::Waiting => {
                let next = begin(vm, item.state, Command::Cancel)?;
                self.vault.atomically(|v| {
                    v.set_job_state(
                        id,
                        JobState::Cancelled,
                        Some(&format!(
                            "cancelled while waiting; run `ferry failback {vm}` to resume"
                        )),
                    )?;
                    let mut it = item.clone();
                    it.state = next;
                    v.update_item(&it)
                })?;
            }
            JobState::Running => {
                self.vault.request_cancel(id)?;
                let t = Instant::now();
                loop {
                    std::thread::sleep(Duration::from_millis(100));
                    self.reconcile()?;
                    let j = self
                        .vault
                        .job(id)?
                        .ok_or_else(|| anyhow!("job {id} vanished"))?;
                    if j.state != JobState::Running {
                        break;
                    }
                    if t.elapsed() > Duration::from_secs(30) {
                        bail!("job {id} did not stop within 30 s; it is still running — try again, or check the process running it");
                    }
                }
            }
            s => bail!(
                "job {id} of VM {vm} is already {}; nothing to cancel",
                s.as_str()
            ),
        }
        Ok(self.vault.job(id)?.expect("job exists"))
    }

    // ---- points / verify ----

    /// Reads back every block of a point and checks it against its hash.
    pub fn verify(&self, vm: &str, point: Option<i64>) -> Result<VerifyReport> {
        let item = self.item(vm)?;
        self.require_key(vm)?;
        let p = match point {
            Some(id) => self
                .vault
                .point(id)?
                .filter(|p| p.vm == vm)
                .ok_or_else(|| {
                    anyhow!(
                        "VM {vm} has no recovery point {id}; list them with `ferry points {vm}`"
                    )
                })?,
            None => self
                .vault
                .points(vm)?
                .into_iter()
                .next()
                .ok_or_else(|| anyhow!("VM {vm} has no recovery point yet"))?,
        };
        let store = self.item_store(&item)?;
        let m = store
            .get_manifest(&p.manifest)
            .with_context(|| format!("point {}: manifest unreadable", p.id))?;
        let (mut blocks, mut bytes) = (0u64, 0u64);
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
                                .with_context(|| format!("point {}, disk {di}, block {bi}", p.id))
                        })
                        .collect::<Result<Vec<_>>>()?,
                };
                blocks += datas.len() as u64;
                bytes += datas.iter().map(|x| x.len() as u64).sum::<u64>();
            }
        }
        Ok(VerifyReport {
            vm: vm.into(),
            point: p.id,
            blocks,
            bytes,
            ok: true,
        })
    }
}

/// Parses the RFC 3339 timestamps ferry writes (`YYYY-MM-DDTHH:MM:SSZ`) into Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20 {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + hh * 3600 + mm * 60 + ss)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_round_trips() {
        for t in [0i64, 1_795_692_318, 951_782_400] {
            assert_eq!(parse_rfc3339(&ferry_model::rfc3339(t)), Some(t));
        }
    }

    #[test]
    fn recommendation_follows_what_is_known() {
        assert_eq!(recommend(true, None, Some(0.9)).0, SyncMode::Full);
        assert_eq!(recommend(true, None, Some(0.01)).0, SyncMode::Delta);
        assert_eq!(
            recommend(true, Some(Duration::from_secs(90 * 86_400)), None).0,
            SyncMode::Full
        );
        assert_eq!(
            recommend(true, Some(Duration::from_secs(3600)), None).0,
            SyncMode::Delta
        );
        assert_eq!(recommend(false, None, None).0, SyncMode::Full);
    }
}
