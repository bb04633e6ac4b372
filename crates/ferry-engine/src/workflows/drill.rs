//! Test failover (a DR drill): a throw-away copy of a protected VM at the recovery site,
//! restored from a chosen point and started on an isolated switch, while the VM stays
//! `protected`, its replication cycles go on and its primary is not touched; and the clean-up
//! that deletes the copy with its disks.

use super::*;

/// The switch a test copy's NICs join unless `--switch` names another.
pub const TEST_SWITCH: &str = "ferry-test";

/// A test copy of a protected VM (kept in its extra state while it exists).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestCopy {
    /// Recovery host it runs on.
    pub host: String,
    /// Its VM name there (`VM-test`).
    pub name: String,
    /// The point it was restored from.
    pub point: i64,
    /// RFC 3339 time it was started.
    pub started_at: String,
    /// The isolated switch of its NICs.
    pub switch: String,
}

/// The side job a job's parameters describe (`test`, `cleanup-test`, `change-point`), if it
/// is one: a job that leaves the VM's lifecycle state alone.
pub(crate) fn side_mode(params: &serde_json::Value) -> Option<&str> {
    params
        .get("mode")
        .and_then(|m| m.as_str())
        .filter(|m| *m == "test" || *m == "cleanup-test" || *m == "change-point")
}

/// The name of `vm`'s test copy.
pub fn test_copy_name(vm: &str) -> String {
    format!("{vm}-test")
}

impl Engine {
    /// Starts a test copy of `vm` at its recovery site (on `host`, or the site's first host)
    /// from point `point` (default: the newest), its NICs on `switch` (default
    /// [`TEST_SWITCH`], never one of the VM's production switches).
    pub fn test_failover(
        &self,
        vm: &str,
        point: Option<i64>,
        host: Option<&str>,
        switch: Option<&str>,
        opts: RunOpts,
    ) -> Result<Job> {
        let item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        if item.state != ItemState::Protected {
            bail!(
                "a test failover drills a protected VM; VM {vm} is {} (see `ferry status {vm}`)",
                item.state.as_str()
            );
        }
        let mut extra = self.extra(vm)?;
        let redo = self.last_side_job_failed(&item, "test")?;
        if let Some(t) = &extra.test {
            if !redo {
                bail!(
                    "VM {vm} already has a test copy ({} on host {}, from point {}, since {}); remove it first: `ferry failover {vm} --cleanup-test`",
                    t.name, t.host, t.point, t.started_at
                );
            }
        }
        let rhost = self.recovery_host_for(&item, host)?;
        let switch = switch.unwrap_or(TEST_SWITCH).to_string();
        ferry_model::validate_name("switch", &switch)?;
        // The test switch is the drill's own isolated network: the host need not declare it.
        let mut thost = rhost.clone();
        if !thost.switches.contains(&switch) {
            thost.switches.push(switch.clone());
        }
        let rd = self.driver(&thost)?;
        rd.check_connected()?;
        self.require_key(vm, &[&rhost])?;
        let shape = extra.vm_spec.clone().ok_or_else(|| {
            anyhow!("ferry has no record of VM {vm}'s shape yet; run `ferry replicate {vm}` once")
        })?;
        if shape.nics.contains(&switch) {
            bail!(
                "switch {switch} is one of VM {vm}'s production switches; a test copy runs on an isolated one (default {TEST_SWITCH}): pass --switch NAME"
            );
        }
        let p = self.point_of(vm, point)?;
        let name = test_copy_name(vm);
        // An interrupted test failover starts over: what it made goes first.
        if let (Some(t), true) = (extra.test.clone(), redo) {
            let d = self.driver(&self.host(&t.host)?)?;
            if d.get_vm(&t.name)?.is_some() {
                d.stop_vm(&t.name)?;
                d.delete_vm(&t.name)?;
            }
            extra.test = None;
            self.set_extra(vm, &extra)?;
        }
        if rd.get_vm(&name)?.is_some() {
            bail!(
                "host {} already has a VM named {name} that ferry did not start as a test copy; remove it or pick another host with --host",
                rhost.name
            );
        }
        let store = self.item_store(&item, &[&rhost])?;
        store.check()?;
        let run = self.new_job(
            JobKind::Failover,
            vm,
            crate::faults::FAILOVER_TEST,
            json!({"mode": "test", "host": rhost.name, "point": p.id, "switch": switch}),
            opts,
        )?;
        self.side_job(&item, run.id())?;
        let r = (|| -> Result<()> {
            let maps = store.get_point(&run.ctx, &|n| run.note(n), &p.manifest)?;
            run.begin_step("create test VM", 0);
            // Recorded first: whatever a crash leaves behind, the clean-up finds it.
            extra.test = Some(TestCopy {
                host: rhost.name.clone(),
                name: name.clone(),
                point: p.id,
                started_at: ferry_model::rfc3339(now_secs()),
                switch: switch.clone(),
            });
            self.set_extra(vm, &extra)?;
            let spec = VmSpec {
                name: name.clone(),
                cpus: shape.cpus,
                memory: shape.memory,
                disks: maps.iter().map(|m| m.size).collect(),
                nics: vec![switch.clone(); shape.nics.len()],
                image: shape.image.clone(),
            };
            rd.create_vm(&spec)?;
            for i in 0..maps.len() as u32 {
                rd.set_disk_consistent(&name, i, false)?;
            }
            run.end_step();
            run.begin_step(
                "restore disks",
                maps.iter().map(|m| m.data_bytes()).sum(),
            );
            let req = data::RestoreReq {
                vm: name.clone(),
                store: self.store_ref(&item)?,
                point: p.id,
                disks: maps.iter().cloned().map(data::Map).collect(),
            };
            self.on_host(
                &run,
                &rhost,
                || data::DataReq::Restore(req.clone()),
                |env| data::restore(env, store.local()?, &req),
            )?;
            for i in 0..maps.len() as u32 {
                rd.set_disk_consistent(&name, i, true)?;
            }
            run.end_step();
            run.begin_step("start test VM", 0);
            rd.start_vm(&name)?;
            run.end_step();
            Ok(())
        })()
        .map_err(|e| {
            e.context(format!(
                "the test copy is incomplete; remove what was made with `ferry failover {vm} --cleanup-test`"
            ))
        });
        self.close_side_job(vm, run, r)
    }

    /// Stops and deletes `vm`'s test copy and its disks. Run again after an interruption, it
    /// finishes (nothing left to delete is no error then).
    pub fn cleanup_test(&self, vm: &str, opts: RunOpts) -> Result<Job> {
        let item = self.item(vm)?;
        self.check_no_running_job(&item)?;
        let mut extra = self.extra(vm)?;
        let again = self.last_side_job_failed(&item, "cleanup-test")?;
        let t = match (extra.test.clone(), again) {
            (Some(t), _) => Some(t),
            (None, true) => None,
            (None, false) => {
                bail!("VM {vm} has no test copy; start one with `ferry failover {vm} --test`")
            }
        };
        let d = match &t {
            Some(t) => {
                let d = self.driver(&self.host(&t.host)?)?;
                d.check_connected()?;
                Some(d)
            }
            None => None,
        };
        let run = self.new_job(
            JobKind::Failover,
            vm,
            crate::faults::CLEANUP_TEST,
            json!({"mode": "cleanup-test", "host": t.as_ref().map(|t| t.host.clone())}),
            opts,
        )?;
        self.side_job(&item, run.id())?;
        let r = (|| -> Result<()> {
            run.begin_step("delete test VM", 0);
            if let (Some(t), Some(d)) = (&t, &d) {
                if d.get_vm(&t.name)?.is_some() {
                    d.stop_vm(&t.name)?;
                    d.delete_vm(&t.name)?;
                }
            }
            extra.test = None;
            self.set_extra(vm, &extra)?;
            run.end_step();
            Ok(())
        })();
        self.close_side_job(vm, run, r)
    }

    /// Makes job `id` the item's current job without changing its lifecycle state (a drill's
    /// jobs leave the VM `protected`).
    pub(super) fn side_job(&self, item: &ProtectedItem, id: i64) -> Result<()> {
        let mut it = item.clone();
        it.job = Some(id);
        self.vault.update_item(&it)?;
        Ok(())
    }

    /// True when the item's current job is a drill job of `mode` (`test`, `cleanup-test`)
    /// that did not succeed: running that command again redoes it.
    pub(crate) fn last_side_job_failed(&self, item: &ProtectedItem, mode: &str) -> Result<bool> {
        let Some(id) = item.job else {
            return Ok(false);
        };
        let Some(job) = self.vault.job(id)? else {
            return Ok(false);
        };
        Ok(side_mode(&self.vault.job_params(id)?) == Some(mode)
            && matches!(job.state, JobState::Failed | JobState::Cancelled))
    }

    /// Ends a job that leaves the VM's lifecycle state alone.
    pub(super) fn close_side_job(&self, vm: &str, run: JobRun, r: Result<()>) -> Result<Job> {
        match r {
            Ok(()) => run.close(&self.vault, JobState::Succeeded, None),
            Err(e) => {
                let msg = format!("{e:#}");
                let job = run.close(&self.vault, JobState::Failed, Some(&msg))?;
                self.vault.event(Some(vm), Some(job.id), &msg)?;
                Err(e.context(format!(
                    "job {} ({}) of VM {vm} failed",
                    job.id,
                    job.kind.as_str()
                )))
            }
        }
    }

    /// Refuses a planned or unplanned failover while a test copy of `vm` exists.
    pub(super) fn refuse_while_testing(&self, vm: &str) -> Result<()> {
        if let Some(t) = self.extra(vm)?.test {
            bail!(
                "VM {vm} has a test copy running ({} on host {}, since {}); clean it up before a real failover: `ferry failover {vm} --cleanup-test`",
                t.name, t.host, t.started_at
            );
        }
        Ok(())
    }

    /// The recovery host of a failover of `item`: `host`, or the first of its recovery site.
    pub(super) fn recovery_host_for(
        &self,
        item: &ProtectedItem,
        host: Option<&str>,
    ) -> Result<Host> {
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
                "host {} is at site {}, not at VM {}'s recovery site {}",
                rhost.name,
                rhost.site,
                item.vm,
                item.recovery_site
            );
        }
        Ok(rhost)
    }
}
