//! Resuming interrupted jobs, cancelling, verifying points.

use super::*;

impl Engine {
    /// Continues job `id`, whose process died, the way re-running its command would, with
    /// the options it was started with (`ferry serve` does this for the jobs it ran when it
    /// was killed), and the resources it last ran with (`opts` when none are recorded).
    /// Returns the job as it ended or waits; `None` when there is nothing to continue (the
    /// VM moved on, or the job's command needs the operator: `protect`).
    pub fn resume_interrupted(&self, id: i64, opts: RunOpts) -> Result<Option<Job>> {
        let job = self.vault.job(id)?.ok_or_else(|| anyhow!("no job {id}"))?;
        let opts = self
            .vault
            .job_run_opts(id)?
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or(opts);
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
            JobKind::Failover if side_mode(&params) == Some("test") => {
                let point = params.get("point").and_then(|p| p.as_i64());
                let host = params.get("host").and_then(|h| h.as_str());
                let switch = params.get("switch").and_then(|h| h.as_str());
                Some(self.test_failover(vm, point, host, switch, opts)?)
            }
            JobKind::Failover if side_mode(&params) == Some("change-point") => {
                let point = params.get("point").and_then(|p| p.as_i64());
                let point = point.ok_or_else(|| anyhow!("job {id} names no point"))?;
                Some(self.change_point(vm, point, opts)?)
            }
            JobKind::Failover if side_mode(&params) == Some("cleanup-test") => {
                Some(self.cleanup_test(vm, opts)?)
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
            JobKind::Replicate => {
                let app = params.get("app_consistent").and_then(|a| a.as_bool());
                Some(self.replicate(vm, opts, false, app.unwrap_or(false))?)
            }
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

    /// Reads back every block of a point and checks it against its hash: in this process,
    /// or on an agent host of the VM (its recovery host first) when they are all agent hosts.
    pub fn verify(&self, vm: &str, point: Option<i64>) -> Result<VerifyReport> {
        let item = self.item(vm)?;
        let mut hosts = Vec::new();
        for h in item.recovery_host.iter().chain([&item.primary_host]) {
            hosts.push(self.host(h)?);
        }
        let hosts: Vec<&Host> = hosts.iter().collect();
        let store = self.item_store(&item, &hosts)?;
        let at: Vec<&Host> = store.agent().into_iter().collect();
        self.require_key(vm, &at)?;
        let p = self.point_of(vm, point)?;
        let ctx = JobCtx::new(1, None);
        let out = store.verify(&ctx, &|_| {}, &p.manifest, p.id)?;
        let (blocks, bytes) = (out.blocks, out.bytes);
        Ok(VerifyReport {
            vm: vm.into(),
            point: p.id,
            blocks,
            bytes,
            ok: true,
        })
    }
}
