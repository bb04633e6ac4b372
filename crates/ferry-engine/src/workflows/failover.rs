//! Failover (planned and unplanned) and commit.

use super::*;

impl Engine {
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
        // While the failover awaits commit, `--point` moves the recovery copy to another point.
        if let (ItemState::FailoverCommitPending, Some(id)) = (item.state, point) {
            return self.change_point(vm, id, opts);
        }
        self.check_no_running_job(&item)?;
        let next = begin(vm, item.state, Command::Failover)?;
        self.refuse_while_testing(vm)?;
        let rhost = self.recovery_host_for(&item, host)?;
        let rd = self.driver(&rhost)?;
        rd.check_connected()?;
        let phost = self.host(&item.primary_host)?;
        let pd = self.driver(&phost)?;
        // The recovery host restores; a planned failover also captures on the primary.
        self.require_key(vm, &[&rhost, &phost])?;
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
            (FailoverMode::Planned, Some(_)) => bail!("--point applies to --unplanned and --test failovers, and to a failover awaiting commit (to change its point); a planned failover always takes a last point"),
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
        // Each NIC joins its mapped switch at the recovery site (or one of the same name).
        let nics = self.target_nics(vm, &phost.site, &rhost, &shape.nics)?;
        let store = self.item_store(&item, &[&rhost, &phost])?;
        store.check()?;
        let names = match mode {
            FailoverMode::Planned => crate::faults::FAILOVER_PLANNED,
            FailoverMode::Unplanned => crate::faults::FAILOVER_UNPLANNED,
        };
        let run = self.new_job(
            JobKind::Failover,
            vm,
            names,
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
                        self.replicate_copy(
                            &run,
                            &item,
                            &phost,
                            "replicate final changes",
                            false,
                            false,
                        )?
                    }
                };
                let manifest = Manifest {
                    disks: store.get_point(&run.ctx, &|n| run.note(n), &point.manifest)?,
                };
                self.make_recovery_copy(
                    &run,
                    &item,
                    &rhost,
                    rd.as_ref(),
                    &shape,
                    &nics,
                    &point,
                    &manifest,
                    &store,
                )?;
            }
            run.begin_step("start recovery VM", 0);
            rd.start_vm(vm)?;
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

    /// Restores `vm`'s recovery copy, while its failover awaits commit, from point `id`
    /// instead (the seed's "change recovery point"): the recovery VM is stopped and made
    /// again from that point, so what it wrote since the failover is discarded; the store's
    /// points are not touched. Run again after an interruption, it starts over.
    pub fn change_point(&self, vm: &str, id: i64, opts: RunOpts) -> Result<Job> {
        let item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        if item.state != ItemState::FailoverCommitPending {
            bail!(
                "the recovery point of VM {vm} can change only while its failover awaits commit; it is {} (see `ferry status {vm}`)",
                item.state.as_str()
            );
        }
        let redo = self.last_side_job_failed(&item, "change-point")?;
        let mut extra = self.extra(vm)?;
        if extra.failover_point == Some(id) && !redo {
            bail!(
                "VM {vm} already runs from point {id}; pick another one from `ferry points {vm}`"
            );
        }
        let rname = item.recovery_host.clone().ok_or_else(|| {
            anyhow!("VM {vm} has no recovery host on record; see `ferry status {vm}`")
        })?;
        let rhost = self.host(&rname)?;
        let rd = self.driver(&rhost)?;
        rd.check_connected()?;
        self.require_key(vm, &[&rhost])?;
        let p = self.point_of(vm, Some(id))?;
        // The recovery copy's shape, its NICs as mapped at failover; without a copy (an
        // interrupted change), the primary's shape mapped again.
        let (shape, nics) = match rd.get_vm(vm)? {
            Some(i) => {
                let s = crate::SavedSpec::from(VmSpec::like(&i));
                rd.check_switches(&s.nics)?;
                let n = s.nics.clone();
                (s, n)
            }
            None => {
                let s = extra.vm_spec.clone().ok_or_else(|| {
                    anyhow!("ferry has no record of VM {vm}'s shape; fail it over again")
                })?;
                let from = self.host(&item.primary_host)?.site;
                let n = self.target_nics(vm, &from, &rhost, &s.nics)?;
                (s, n)
            }
        };
        let store = self.item_store(&item, &[&rhost])?;
        store.check()?;
        let run = self.new_job(
            JobKind::Failover,
            vm,
            crate::faults::FAILOVER_UNPLANNED,
            json!({"mode": "change-point", "host": rhost.name, "point": p.id}),
            opts,
        )?;
        self.side_job(&item, run.id())?;
        let r = (|| -> Result<()> {
            let manifest = Manifest {
                disks: store.get_point(&run.ctx, &|n| run.note(n), &p.manifest)?,
            };
            // From here the copy is neither point's until the restore ends.
            extra.failover_point = None;
            extra.recovery = None;
            self.set_extra(vm, &extra)?;
            if rd.get_vm(vm)?.is_some() {
                rd.stop_vm(vm)?;
            }
            self.make_recovery_copy(
                &run,
                &item,
                &rhost,
                rd.as_ref(),
                &shape,
                &nics,
                &p,
                &manifest,
                &store,
            )?;
            run.begin_step("start recovery VM", 0);
            rd.start_vm(vm)?;
            run.end_step();
            let mut ex = self.extra(vm)?;
            ex.failover_partial = None;
            self.set_extra(vm, &ex)?;
            Ok(())
        })()
        .map_err(|e| {
            e.context(format!(
                "the recovery copy is incomplete; run `ferry failover {vm} --point {id}` again to finish"
            ))
        });
        self.close_side_job(vm, run, r)
    }

    /// The steps "create recovery VM" and "restore disks": `vm` made again on `rhost` (an old
    /// copy deleted) with `shape` and `nics`, its disks restored from `point`, its change
    /// tracking started; then the vault records the recovery copy and its point. Its disks
    /// are marked inconsistent until the restore ends, so nothing starts it half-made.
    #[allow(clippy::too_many_arguments)]
    fn make_recovery_copy(
        &self,
        run: &JobRun,
        item: &ProtectedItem,
        rhost: &Host,
        rd: &dyn Hypervisor,
        shape: &crate::SavedSpec,
        nics: &[String],
        point: &RecoveryPoint,
        manifest: &Manifest,
        store: &ItemStore<'_>,
    ) -> Result<()> {
        let vm = item.vm.as_str();
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
            nics: nics.to_vec(),
            image: shape.image.clone(),
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
        let req = data::RestoreReq {
            vm: vm.into(),
            store: self.store_ref(item)?,
            point: point.id,
            disks: manifest.disks.iter().cloned().map(data::Map).collect(),
        };
        self.on_host(
            run,
            rhost,
            || data::DataReq::Restore(req.clone()),
            |env| {
                // The last replication (of a planned failover) stored blocks through another
                // handle on the store, or on the primary's agent.
                store.refresh()?;
                data::restore(env, store.local()?, &req)
            },
        )?;
        for (i, m) in manifest.disks.iter().enumerate() {
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
        ex.failover_point = Some(point.id);
        self.set_extra(vm, &ex)?;
        run.end_step();
        Ok(())
    }

    /// The newest app-consistent point of `vm` (for `--point latest-app-consistent`).
    pub fn latest_app_point(&self, vm: &str) -> Result<i64> {
        self.item(vm)?;
        self.vault
            .points(vm)?
            .into_iter()
            .find(|p| p.consistency == Consistency::App)
            .map(|p| p.id)
            .ok_or_else(|| anyhow!("VM {vm} has no app-consistent point; take one with `ferry replicate {vm} --app-consistent`, or pick a point from `ferry points {vm}`"))
    }

    /// Commits a failover (the VM stays at the recovery site) or a failback (the recovery VM
    /// and its disks are deleted).
    pub fn commit(&self, vm: &str) -> Result<Job> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        if self.last_side_job_failed(&item, "change-point")? {
            let id = item.job.unwrap_or_default();
            let point = self.vault.job_params(id)?["point"]
                .as_i64()
                .unwrap_or_default();
            bail!("the change of VM {vm}'s recovery point to point {point} was interrupted (job {id}), so the recovery copy is incomplete; finish it with `ferry failover {vm} --point {point}`, then commit");
        }
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
        let steps = if after_failback {
            crate::faults::COMMIT_FAILBACK
        } else {
            crate::faults::COMMIT_FAILOVER
        };
        let name = steps[0];
        let run = self.new_job(JobKind::Commit, vm, steps, json!({}), RunOpts::default())?;
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
            // The failover's point is fixed now: retention treats it as any other.
            let mut ex = self.extra(vm)?;
            if ex.failover_point.take().is_some() {
                self.set_extra(vm, &ex)?;
            }
            run.end_step();
            Ok((Outcome::Succeeded, ()))
        })();
        Ok(self.conclude(vm, Command::Commit, run, r)?.0)
    }
}
