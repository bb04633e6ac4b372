//! The commands that run jobs, one module per workflow; this module holds what they share:
//! options, the job life cycle (`new_job` … `conclude`), tracking helpers.
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use ferry_blocks::{BlockMap, Manifest, MapJournal};
use ferry_hypervisor::{DiskView, Hypervisor, Power, VmInfo, VmSpec};
use ferry_model::{
    begin, finish, Command, Consistency, Host, ItemState, Job, JobKind, JobState, Outcome,
    PointKind, ProtectedItem, RecoveryPoint, SiteRole, Step, SyncMode,
};
use ferry_store::Store;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::data::{self, check_tracking, known_source, view_disk};
use crate::jobs::{this_runner, Cancelled, JobCtx, JobRun};
use crate::pipeline::{pass, PassSpec};
use crate::{Copy, CopyState, Engine, ItemExtra};

mod control;
mod drill;
mod failback;
mod failover;
mod item_store;
mod replicate;

use item_store::ItemStore;

pub(crate) use drill::side_mode;
pub use drill::{test_copy_name, TestCopy, TEST_SWITCH};

/// Resources a data-moving command may use (recorded with its job, so a control plane that
/// continues the job after a restart keeps them).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
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

/// How a failover treats the primary copy (one type with the API's).
pub use ferry_api::FailoverMode;

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
    /// Runs a data operation on `host`: `local` in this process for a host the engine drives,
    /// else the request `remote` builds on the host's agent (the same function runs there).
    pub(super) fn on_host<T: serde::de::DeserializeOwned>(
        &self,
        run: &JobRun,
        host: &Host,
        remote: impl FnOnce() -> data::DataReq,
        local: impl FnOnce(&data::Env<'_>) -> Result<T>,
    ) -> Result<T> {
        let note = |m: String| run.note(m);
        if host.agent {
            let v = self.remote_data(&run.ctx, &note, host, &remote())?;
            return serde_json::from_value(v).map_err(|e| {
                anyhow!(
                    "host {}: its agent answered in a form this control plane cannot read ({e}); run the same ferry version on both",
                    host.name
                )
            });
        }
        let d = self.driver(host)?;
        let env = data::Env {
            ctx: &run.ctx,
            note: &note,
            driver: d.as_ref(),
            journals: self.home.join("journals"),
        };
        local(&env)
    }

    /// Sends `req` to agent host `host` and answers its result (see [`crate::RemoteHosts`]).
    pub(super) fn remote_data(
        &self,
        ctx: &JobCtx,
        note: &(dyn Fn(String) + Sync),
        host: &Host,
        req: &data::DataReq,
    ) -> Result<serde_json::Value> {
        let r = self.remote.as_ref().ok_or_else(|| {
            anyhow!(
                "host {} is served by a ferry agent; run this command against the control plane it reports to (`--server URL`, or FERRY_SERVER)",
                host.name
            )
        })?;
        r.data(host, req, ctx, note)
    }

    /// Captures `req.vm`'s disks on `host` into `store` (see [`data::capture`]), in this
    /// process or on the host's agent; after an agent's capture, `store` learns the packs it
    /// wrote.
    pub(super) fn capture_on(
        &self,
        run: &JobRun,
        host: &Host,
        store: &ItemStore<'_>,
        req: &data::CaptureReq,
    ) -> Result<data::CaptureOut> {
        let out = self.on_host(
            run,
            host,
            || data::DataReq::Capture(req.clone()),
            |env| data::capture(env, store.local()?, req),
        )?;
        if host.agent {
            store.refresh()?;
        }
        Ok(out)
    }

    /// The disks of a capture of `vm`'s `copy`: each with its saved map when `known` (the
    /// capture's marks belong to it), else none (every block is read).
    pub(super) fn capture_disks(
        &self,
        vm: &str,
        copy: Copy,
        disks: &[ferry_hypervisor::DiskInfo],
        block_size: u64,
        known: bool,
    ) -> Result<Vec<data::CaptureDisk>> {
        disks
            .iter()
            .map(|d| {
                let base = if known {
                    self.load_fitting_map(vm, copy, d.index, d.size, block_size)?
                } else {
                    None
                };
                Ok(data::CaptureDisk {
                    index: d.index,
                    size: d.size,
                    base: base.map(data::Map),
                })
            })
            .collect()
    }

    /// Hashes `disks` of `item`'s VM on `host` (see [`data::scan`]), in this process or on
    /// the host's agent; answers each disk's index with its result.
    pub(super) fn scan_on(
        &self,
        run: &JobRun,
        host: &Host,
        item: &ProtectedItem,
        since: Vec<Option<ferry_hypervisor::ChangeMark>>,
        disks: Vec<data::ScanDisk>,
    ) -> Result<Vec<(u32, data::ScanResult)>> {
        let req = data::ScanReq {
            vm: item.vm.clone(),
            key_id: self.extra(&item.vm)?.key_id,
            block_size: item.block_size,
            since,
            disks,
        };
        let out: data::ScanOut = self.on_host(
            run,
            host,
            || data::DataReq::Scan(req.clone()),
            |env| data::scan(env, self.item_hasher(&item.vm)?, &req),
        )?;
        Ok(req.disks.iter().map(|d| d.index).zip(out.disks).collect())
    }

    /// Point `id` of `vm`, or its newest point.
    pub(super) fn point_of(&self, vm: &str, id: Option<i64>) -> Result<RecoveryPoint> {
        match id {
            Some(id) => self.vault.point(id)?.filter(|p| p.vm == vm).ok_or_else(|| {
                anyhow!("VM {vm} has no recovery point {id}; list them with `ferry points {vm}`")
            }),
            None => self.vault.points(vm)?.into_iter().next().ok_or_else(|| {
                anyhow!("VM {vm} has no recovery point yet; run `ferry replicate {vm}`")
            }),
        }
    }

    /// The store of an item as a data operation names it.
    pub(super) fn store_ref(&self, item: &ProtectedItem) -> Result<data::StoreRef> {
        Ok(data::StoreRef {
            url: self.site(&item.recovery_site)?.store,
            key_id: self.extra(&item.vm)?.key_id,
        })
    }

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
        self.vault
            .set_job_run_opts(job.id, &serde_json::to_value(opts)?)?;
        Ok(JobRun::start(
            self.home.clone(),
            job,
            JobCtx::new(opts.threads, opts.bandwidth),
            self.observer.clone(),
        ))
    }

    fn resume_job(&self, id: i64, opts: RunOpts) -> Result<JobRun> {
        self.vault.claim_job(id, &this_runner())?;
        self.vault
            .set_job_run_opts(id, &serde_json::to_value(opts)?)?;
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
