//! Protect, replication cycles and reverse replication: recovery points from the primary copy.

use super::*;

impl Engine {
    /// Enables replication of `vm` to `site` and takes the first recovery point.
    pub fn protect(
        &self,
        vm: &str,
        site: &str,
        policy: &crate::Protection,
        opts: RunOpts,
    ) -> Result<Job> {
        let crate::Protection {
            rpo,
            retention,
            block_size,
            app,
        } = *policy;
        ferry_model::validate_name("VM", vm)?;
        if !(4096..=ferry_blocks::MAX_BLOCK_SIZE).contains(&block_size)
            || !block_size.is_power_of_two()
        {
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
        if !h.agent {
            self.store(site)?;
        }
        // The key's id is recorded; its file is read only where the data moves (here, or on
        // the host's agent, which is asked before anything changes).
        let key_id = self.operator_key_id()?;
        if let Some(id) = &key_id {
            if h.agent {
                let ctx = JobCtx::new(1, None);
                let req = data::DataReq::Check(data::CheckReq {
                    vm: vm.into(),
                    key_id: Some(id.clone()),
                });
                self.remote_data(&ctx, &|_| {}, &h, &req)?;
            } else {
                self.given_key()?;
            }
        }
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
        self.set_extra(
            vm,
            &ItemExtra {
                key_id: key_id.clone(),
                key_file: key_id.as_ref().and(self.key_file.clone()),
                vm_spec: Some(VmSpec::like(&info).into()),
                app_every_secs: app.every.map(|d| d.as_secs()),
                app_retention_secs: app.retention.map(|d| d.as_secs()),
                ..Default::default()
            },
        )?;
        self.drop_maps(vm, Copy::Primary)?;
        let run = self.new_job(
            JobKind::Protect,
            vm,
            crate::faults::PROTECT,
            json!({}),
            opts,
        )?;
        self.enter(&mut item, next, run.id())?;
        let r = self
            .replicate_copy(&run, &item, &host, "initial replication", false, false)
            .map(|p| (Outcome::Succeeded, p));
        Ok(self.conclude(vm, Command::Protect, run, r)?.0)
    }

    /// Runs one replication cycle now; `app_consistent` freezes the guest around the snapshot.
    pub fn replicate(
        &self,
        vm: &str,
        opts: RunOpts,
        verify: bool,
        app_consistent: bool,
    ) -> Result<Job> {
        let mut item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        let next = begin(vm, item.state, Command::Replicate)?;
        let host = self.host(&item.primary_host)?;
        self.driver(&host)?.check_connected()?;
        let run = self.new_job(
            JobKind::Replicate,
            vm,
            crate::faults::REPLICATE,
            json!({"app_consistent": app_consistent}),
            opts,
        )?;
        self.enter(&mut item, next, run.id())?;
        let r = self
            .replicate_copy(
                &run,
                &item,
                &host,
                "replicate changes",
                verify,
                app_consistent,
            )
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
        self.item_store(&item, &[&host])?.check()?;
        let run = self.new_job(
            JobKind::ReverseReplicate,
            vm,
            crate::faults::REVERSE_REPLICATE,
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
                false,
            )
            .map(|p| (Outcome::Succeeded, p));
        Ok(self.conclude(vm, Command::ReverseReplicate, run, r)?.0)
    }

    /// Replicates the primary copy into a new recovery point: a point-in-time view of its
    /// disks, reading only what change tracking says changed (every block when it cannot
    /// tell, or with `verify`); only blocks new to the store move.
    pub(super) fn replicate_copy(
        &self,
        run: &JobRun,
        item: &ProtectedItem,
        host: &Host,
        step: &str,
        verify: bool,
        app_consistent: bool,
    ) -> Result<RecoveryPoint> {
        let d = self.driver(host)?;
        let info = d
            .get_vm(&item.vm)?
            .ok_or_else(|| anyhow!("VM {} no longer exists on host {}", item.vm, host.name))?;
        check_formats(&info, d.as_ref())?;
        let store = self.item_store(item, &[host])?;
        let mut extra = self.extra(&item.vm)?;
        let known = extra.primary.clone().filter(|p| p.host == host.name);
        let since = known.as_ref().map(|k| k.marks.clone()).unwrap_or_default();
        let total: u64 = info.disks.iter().map(|x| x.size).sum();
        run.begin_step(step, total);
        let disks = self.capture_disks(
            &item.vm,
            Copy::Primary,
            &info.disks,
            item.block_size,
            known.is_some(),
        )?;
        let req = data::CaptureReq {
            vm: item.vm.clone(),
            store: self.store_ref(item)?,
            block_size: item.block_size,
            since,
            disks,
            verify,
            crosses_sites: true,
            app_consistent,
        };
        let out = self.capture_on(run, host, &store, &req)?;
        let consistency = if out.app_consistent {
            Consistency::App
        } else {
            Consistency::Crash
        };
        let maps: Vec<BlockMap> = out.maps.into_iter().map(|m| m.0).collect();
        for (disk, m) in info.disks.iter().zip(&maps) {
            self.save_map(&item.vm, Copy::Primary, disk.index, m)?;
        }
        extra.primary = Some(CopyState {
            host: host.name.clone(),
            marks: out.marks,
        });
        extra.vm_spec = Some(VmSpec::like(&info).into());
        self.set_extra(&item.vm, &extra)?;
        let point = self.record_point(
            run,
            &store,
            &item.vm,
            maps,
            PointKind::Replication,
            consistency,
        )?;
        self.apply_retention(run, &store, item)?;
        run.end_step();
        Ok(point)
    }

    pub(super) fn record_point(
        &self,
        run: &JobRun,
        store: &ItemStore<'_>,
        vm: &str,
        maps: Vec<BlockMap>,
        kind: PointKind,
        consistency: Consistency,
    ) -> Result<RecoveryPoint> {
        let _span = tracing::debug_span!("record_point").entered();
        let id = self.vault.next_point_id()?;
        let key = store.put_point(&run.ctx, &|n| run.note(n), id, &maps)?;
        let m = Manifest { disks: maps };
        let p = RecoveryPoint {
            id,
            vm: vm.into(),
            created_at: ferry_model::rfc3339(now_secs()),
            kind,
            size: m.size(),
            data_bytes: m.disks.iter().map(|d| d.data_bytes()).sum(),
            manifest: key,
            consistency,
        };
        self.vault.add_point(&p)?;
        Ok(p)
    }

    /// Deletes points older than the retention (always keeping the newest) and collects packs
    /// nothing references any more.
    pub(super) fn apply_retention(
        &self,
        run: &JobRun,
        store: &ItemStore<'_>,
        item: &ProtectedItem,
    ) -> Result<()> {
        let points = self.vault.points(&item.vm)?;
        let extra = self.extra(&item.vm)?;
        let keep = Retention {
            now: now_secs(),
            retention_secs: item.retention_secs,
            app_retention_secs: extra
                .app_retention_secs
                .unwrap_or(crate::DEFAULT_APP_RETENTION.as_secs()),
            // A test copy's point stays while the copy exists, a pending failover's until
            // commit.
            in_use: [
                extra.test.map(|t| t.point),
                extra
                    .failover_point
                    .filter(|_| item.state == ItemState::FailoverCommitPending),
            ]
            .into_iter()
            .flatten()
            .collect(),
        };
        let expired = keep.expired(&points);
        if expired.is_empty() {
            return Ok(());
        }
        let note = |n: String| run.note(n);
        if store.busy(&run.ctx, &note)? {
            // Another job may be reading one of these points or writing packs: try next cycle.
            self.vault.event(
                Some(&item.vm),
                None,
                "retention deferred: another job is using the store",
            )?;
            return Ok(());
        }
        // Forget the points first: a crash in between leaves orphan manifests, never a
        // listed point that cannot be restored.
        for p in &expired {
            self.vault.delete_point(p.id)?;
        }
        let manifests = expired.iter().map(|p| p.manifest.clone()).collect();
        // Leases keep running jobs safe; the grace period is a second line of defence.
        let out = store.prune(&run.ctx, &note, manifests, Duration::from_secs(900))?;
        if let Some(e) = out.gc_error {
            self.vault.event(
                Some(&item.vm),
                None,
                &format!("garbage collection skipped: {e}"),
            )?;
        }
        Ok(())
    }
}

/// Which recovery points retention deletes (pure: the caller reads the clock and the vault).
struct Retention {
    /// Unix time now.
    now: i64,
    /// Points older than this are deleted…
    retention_secs: u64,
    /// …but app-consistent ones only when older than this too.
    app_retention_secs: u64,
    /// Points a test copy or a pending failover uses: kept.
    in_use: Vec<i64>,
}

impl Retention {
    /// The expired points of `points` (newest first, as the vault lists them): never the
    /// newest, nor one in use.
    fn expired<'a>(&self, points: &'a [RecoveryPoint]) -> Vec<&'a RecoveryPoint> {
        let cutoff = self.now - self.retention_secs as i64;
        let app_cutoff = self.now - self.app_retention_secs as i64;
        points
            .iter()
            .skip(1)
            .filter(|p| {
                let at = parse_rfc3339(&p.created_at).unwrap_or(i64::MAX);
                at < cutoff && (p.consistency != Consistency::App || at < app_cutoff)
            })
            .filter(|p| !self.in_use.contains(&p.id))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(id: i64, age_secs: i64, consistency: Consistency) -> RecoveryPoint {
        RecoveryPoint {
            id,
            vm: "app".into(),
            created_at: ferry_model::rfc3339(1_000_000 - age_secs),
            kind: PointKind::Replication,
            size: 1,
            data_bytes: 1,
            manifest: format!("m{id}"),
            consistency,
        }
    }

    #[test]
    fn retention_keeps_the_newest_points_in_use_and_app_points_for_longer() {
        let points = vec![
            point(6, 7200, Consistency::Crash), // the newest, however old
            point(5, 7300, Consistency::App),   // app, within the app retention
            point(4, 7400, Consistency::Crash), // used by a test copy
            point(3, 7500, Consistency::Crash), // used by a pending failover
            point(2, 7600, Consistency::Crash), // expired
            point(1, 90_000, Consistency::App), // app, past the app retention too
        ];
        let r = Retention {
            now: 1_000_000,
            retention_secs: 3600,
            app_retention_secs: 86_400,
            in_use: vec![4, 3],
        };
        let ids: Vec<i64> = r.expired(&points).iter().map(|p| p.id).collect();
        assert_eq!(ids, [2, 1]);
        // Within the retention nothing goes.
        let r = Retention {
            retention_secs: 100_000,
            ..r
        };
        assert!(r.expired(&points).is_empty());
    }
}
