//! Failback: the two-phase delta sync or a full download, `complete`, the dry run.

use super::*;
use ferry_blocks::ZERO;
use ferry_store::{encode, PackWriter};

impl Engine {
    /// Fails `vm` back to the primary site (see DESIGN.md §2). Returns the job, or the
    /// prediction of a dry run.
    pub fn failback(&self, vm: &str, o: &FailbackOpts) -> Result<(Option<Job>, Option<DryRun>)> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
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
        self.require_key(vm, &[&rhost, &thost])?;
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
            None => {
                rd.check_switches(&[])?;
                // The new VM's NICs join their mapped switches at the primary site.
                let switches: Vec<String> = rinfo.nics.iter().map(|n| n.switch.clone()).collect();
                self.target_nics(vm, &item.recovery_site, &thost, &switches)?;
            }
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
                let names = match sync {
                    SyncMode::Delta => crate::faults::FAILBACK_DELTA,
                    SyncMode::Full => crate::faults::FAILBACK_FULL,
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
    pub(super) fn failback_finish(
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

    pub(super) fn save_params(&self, run: &JobRun, p: &FailbackParams) -> Result<()> {
        self.vault
            .set_job_params(run.id(), &serde_json::to_value(p)?)?;
        Ok(())
    }

    /// Creates the target VM if needed and marks its disks inconsistent for the sync.
    pub(super) fn failback_prepare(
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
            spec.nics = self.target_nics(vm, &item.recovery_site, thost, &spec.nics)?;
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
        let mut scans = Vec::new();
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
            } else {
                scans.push(data::ScanDisk::rescan(d.index, map));
            }
        }
        if !scans.is_empty() {
            // The view's marks are not recorded: ferry writes these disks next, and tracking
            // of the primary starts over once the failback completes.
            let total = tinfo
                .disks
                .iter()
                .filter(|d| scans.iter().any(|s| s.index == d.index))
                .map(|d| d.size)
                .sum();
            run.begin_step("prepare primary VM", total);
            for (index, r) in self.scan_on(run, thost, item, since, scans)? {
                if let Some(m) = r.map {
                    self.save_map(vm, Copy::Primary, index, &m.0)?;
                }
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
    /// tell). Saves the recovery maps and marks of the view's moment; returns the maps. With
    /// `fill` (the recovery VM is stopped: its maps become the failback point), every block
    /// of the maps is in the store afterwards (through agents the recovery host's capture
    /// always stores every block of its maps the store lacks).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn sync_disks(
        &self,
        run: &JobRun,
        vm: &str,
        block_size: u64,
        store: &ItemStore<'_>,
        td: &dyn Hypervisor,
        rd: &dyn Hypervisor,
        rinfo: &VmInfo,
        verify: bool,
        fill: bool,
    ) -> Result<Vec<BlockMap>> {
        if td.host().agent || rd.host().agent {
            return self.sync_via_store(
                run,
                vm,
                block_size,
                store,
                td.host(),
                rd.host(),
                rinfo,
                verify,
            );
        }
        let local = store.local()?;
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
            let ks = known_source(&|m| run.note(m), vd, base.as_ref(), verify, &rinfo.host);
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
                    store: Some(local.clone()),
                    hasher: local.hasher(),
                    write: Some((dst.as_ref(), &mut journal)),
                    crosses_sites: true,
                    known: ks,
                },
            )
            .map_err(|e| match data::disk_path(td, vm, d.index) {
                Some(p) => data::explain_full_disk(
                    e,
                    &format!("disk {} of VM {vm} on host {}", d.index, td.host().name),
                    &p,
                    vm,
                ),
                None => e,
            })?;
            if verify {
                check_tracking(&|m| run.note(m), vd, base.as_deref(), &r.map, &rinfo.host);
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
        if fill {
            self.fill_store(run, local, rd, vm, &maps)?;
        }
        Ok(maps)
    }

    /// [`Engine::sync_disks`] when a side is served by an agent: the recovery host captures
    /// its disks into the store (only what the store lacks moves), then the target host
    /// writes every block that differs from what its disks hold, from the store (journaled on
    /// that host). Blocks never pass through this process.
    #[allow(clippy::too_many_arguments)]
    fn sync_via_store(
        &self,
        run: &JobRun,
        vm: &str,
        block_size: u64,
        store: &ItemStore<'_>,
        thost: &Host,
        rhost: &Host,
        rinfo: &VmInfo,
        verify: bool,
    ) -> Result<Vec<BlockMap>> {
        let _span = tracing::debug_span!("sync_via_store").entered();
        let item = self.item(vm)?;
        let store_ref = self.store_ref(&item)?;
        let since = self
            .extra(vm)?
            .recovery
            .filter(|r| r.host == rinfo.host)
            .map(|r| r.marks)
            .unwrap_or_default();
        let disks = self.capture_disks(vm, Copy::Recovery, &rinfo.disks, block_size, true)?;
        let req = data::CaptureReq {
            vm: vm.into(),
            store: store_ref.clone(),
            block_size,
            since,
            disks,
            verify,
            crosses_sites: false,
            app_consistent: false,
        };
        let out = self.capture_on(run, rhost, store, &req)?;
        drop(req);
        let maps: Vec<BlockMap> = out.maps.into_iter().map(|m| m.0).collect();
        let mut adisks = Vec::new();
        for (d, m) in rinfo.disks.iter().zip(&maps) {
            let target = self
                .load_map(vm, Copy::Primary, d.index)?
                .filter(|t| t.size == d.size && t.block_size == block_size)
                .unwrap_or_else(|| BlockMap::unknown(d.size, block_size));
            adisks.push(data::ApplyDisk {
                index: d.index,
                source: data::Map(m.clone()),
                target: data::Map(target),
            });
        }
        // The step counted the capture's reads; the writes that follow add to it.
        let to_write: u64 = adisks.iter().map(|d| d.bytes_to_write()).sum();
        run.add_step_total(to_write);
        // Nothing differs (a phase 2 after a converged phase 1) and no apply was cut short:
        // no request at all.
        let pending = self.extra(vm)?.apply_pending.as_deref() == Some(thost.name.as_str());
        if to_write > 0 || pending {
            let mut ex = self.extra(vm)?;
            ex.apply_pending = Some(thost.name.clone());
            self.set_extra(vm, &ex)?;
            let areq = data::ApplyReq {
                vm: vm.into(),
                store: store_ref,
                disks: adisks,
            };
            self.on_host(
                run,
                thost,
                || data::DataReq::Apply(areq.clone()),
                |env| data::apply(env, store.local()?, &areq),
            )?;
        }
        // The target holds the maps now (its host's journal covered the writes until here).
        for (d, m) in rinfo.disks.iter().zip(&maps) {
            self.save_map(vm, Copy::Primary, d.index, m)?;
        }
        for (d, m) in rinfo.disks.iter().zip(&maps) {
            self.save_map(vm, Copy::Recovery, d.index, m)?;
        }
        let mut ex = self.extra(vm)?;
        ex.recovery = Some(CopyState {
            host: rinfo.host.clone(),
            marks: out.marks,
        });
        ex.apply_pending = None;
        self.set_extra(vm, &ex)?;
        Ok(maps)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn failback_phase1(
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
        let store = self.item_store(item, &[rd.host(), td.host()])?;
        let total: u64 = rinfo.disks.iter().map(|d| d.size).sum();
        run.begin_step("sync disks (phase 1)", total);
        self.sync_disks(
            run,
            vm,
            item.block_size,
            &store,
            td,
            rd,
            rinfo,
            verify,
            false,
        )?;
        params.rounds += 1;
        self.save_params(run, params)?;
        run.end_step();
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn failback_phase2(
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
        let store = self.item_store(&item, &[rd.host(), td.host()])?;
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
        // The failback point is what the primary now holds: complete in the store (`fill`)
        // so reverse replication sends only later changes.
        let maps = self.sync_disks(
            run,
            vm,
            item.block_size,
            &store,
            td,
            rd,
            rinfo,
            verify,
            true,
        )?;
        run.end_step();
        if verify {
            let disks = maps
                .iter()
                .enumerate()
                .map(|(i, m)| data::ScanDisk {
                    index: i as u32,
                    base: None,
                    target: Some(data::Map(m.clone())),
                    skip_unchanged: false,
                })
                .collect();
            for (i, r) in self.scan_on(run, thost, &item, Vec::new(), disks)? {
                if r.blocks_moved > 0 {
                    bail!("verification failed: {} blocks of disk {i} on host {} differ from the recovery disk after the sync; re-run `ferry failback {vm}`", r.blocks_moved, thost.name);
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
            run,
            &store,
            vm,
            maps.clone(),
            PointKind::Failback,
            Consistency::Crash,
        )?;
        let mut it = self.item(vm)?;
        it.primary_host = thost.name.clone();
        self.vault.update_item(&it)?;
        // Recorded before starting: after a crash right here, a re-run only starts the
        // primary (its disks are complete) and never syncs over a primary that already runs.
        params.phase = 3;
        self.save_params(run, params)?;
        run.begin_step("start primary VM", 0);
        td.start_vm(vm)?;
        if was_running || params.rounds > 0 {
            run.set_downtime(down.elapsed());
        }
        run.end_step();
        Ok(())
    }

    /// Uploads blocks of `maps` that the store lacks, reading them from the stopped recovery VM.
    pub(super) fn fill_store(
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
    pub(super) fn failback_dry_run(
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
        let rhost = self.host(&rinfo.host)?;
        let known_host = extra.primary.as_ref().is_some_and(|p| p.host == thost.name);
        let tsince = extra
            .primary
            .as_ref()
            .filter(|_| known_host)
            .map(|p| p.marks.clone())
            .unwrap_or_default();
        // What the target disks hold: maps journaled by an interrupted sync of ours, maps that
        // change tracking proves current, or a scan.
        let mut targets: Vec<Option<BlockMap>> = Vec::new();
        let mut scans = Vec::new();
        for d in &rinfo.disks {
            let Some(t) = tinfo else {
                targets.push(Some(BlockMap::zeros(d.size, item.block_size)));
                continue;
            };
            let map = if known_host {
                self.load_fitting_map(vm, Copy::Primary, d.index, d.size, item.block_size)?
            } else {
                None
            };
            let disk_consistent = t.disks.get(d.index as usize).is_some_and(|x| x.consistent);
            match map {
                Some(m) if !disk_consistent && known_host => targets.push(Some(m)),
                map => {
                    targets.push(map.clone());
                    scans.push(data::ScanDisk::rescan(d.index, map));
                }
            }
        }
        if !scans.is_empty() {
            for (index, r) in self.scan_on(&run, thost, item, tsince, scans)? {
                if let Some(m) = r.map {
                    targets[index as usize] = Some(m.0);
                }
            }
        }
        let rsince = extra
            .recovery
            .as_ref()
            .filter(|r| r.host == rinfo.host)
            .map(|r| r.marks.clone())
            .unwrap_or_default();
        let mut rdisks = Vec::new();
        for (d, target) in rinfo.disks.iter().zip(targets) {
            let target = match (sync, target) {
                (SyncMode::Full, _) => BlockMap::unknown(d.size, item.block_size),
                (_, Some(t)) => t,
                (_, None) => bail!("internal: no map of disk {}", d.index),
            };
            let base =
                self.load_fitting_map(vm, Copy::Recovery, d.index, d.size, item.block_size)?;
            rdisks.push(data::ScanDisk {
                index: d.index,
                base: base.map(data::Map),
                target: Some(data::Map(target)),
                skip_unchanged: false,
            });
        }
        let disks: Vec<DryRunDisk> = self
            .scan_on(&run, &rhost, item, rsince, rdisks)?
            .into_iter()
            .map(|(index, r)| DryRunDisk {
                index,
                blocks: r.map.as_ref().map_or(0, |m| m.0.len() as u64),
                blocks_to_move: r.blocks_moved,
                bytes_to_move: r.bytes_moved,
            })
            .collect();
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
}
