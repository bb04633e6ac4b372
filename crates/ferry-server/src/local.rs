//! [`Local`]: the [`Api`] in-process, over the engine. Embedded mode (`ferry --home DIR …`)
//! calls it directly; `ferry serve` calls the same code for every HTTP request, so the two
//! modes cannot drift apart.
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::*;
use ferry_engine::{Engine, Notify, Observer, RunOpts};
use ferry_hypervisor::VmInfo;
use ferry_model::{DriverKind, ItemState, JobState};

/// The operations of one installation (`home`), run in this process.
#[derive(Clone)]
pub struct Local {
    home: PathBuf,
    observer: Option<Observer>,
    notify: Option<Notify>,
    server: bool,
    hub: Option<Arc<crate::agents::Hub>>,
}

/// Turns an engine error into the API's refusal (the whole chain of context, on one line).
pub fn refused(e: anyhow::Error) -> ApiError {
    ApiError::refused(format!("{e:#}").replace('\n', " "))
}

fn opts(d: &DataOpts) -> RunOpts {
    let mut o = RunOpts::default();
    if let Some(t) = d.threads {
        o.threads = t.max(1);
    }
    o.bandwidth = d.bandwidth;
    o
}

/// Seconds since an RFC 3339 time ferry wrote (None when unreadable).
pub(crate) fn seconds_since(rfc3339: &str) -> Option<u64> {
    let t = ferry_engine::parse_rfc3339(rfc3339)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs() as i64;
    Some((now - t).max(0) as u64)
}

/// Whether a point of age `age` meets an RPO of `target` seconds: a cycle may run late by
/// half the RPO (at least 5 s) before the VM counts as unhealthy.
pub fn rpo_healthy(target: u64, age: Option<u64>) -> bool {
    age.is_some_and(|a| a <= target + (target / 2).max(5))
}

/// A VM copy as the API shows it.
pub fn vm_view(host: &ferry_model::Host, vm: &VmInfo) -> VmView {
    VmView {
        name: vm.name.clone(),
        host: host.name.clone(),
        site: host.site.clone(),
        driver: host.driver.as_str().into(),
        power: match vm.power {
            ferry_hypervisor::Power::Running => "running".into(),
            ferry_hypervisor::Power::Stopped => "stopped".into(),
        },
        cpus: vm.cpus,
        memory: vm.memory,
        disks: vm
            .disks
            .iter()
            .map(|d| ferry_api::DiskView {
                index: d.index,
                path: d.path.display().to_string(),
                size: d.size,
                format: d.format.clone(),
                consistent: d.consistent,
                node: d.node.clone(),
                device: d.device.clone(),
            })
            .collect(),
        nics: vm
            .nics
            .iter()
            .map(|n| NicView {
                switch: n.switch.clone(),
            })
            .collect(),
        qmp: vm.qmp.as_ref().map(|q| q.display().to_string()),
    }
}

impl Local {
    /// Runs a plan action from group `start` and records what the run did.
    fn run_plan_from(&self, name: &str, req: &PlanRunReq, start: usize) -> ApiResult<PlanRun> {
        use ferry_engine::PlanAction;
        let (e, _) = self.engine(req.key.as_deref(), req.key_id.as_deref())?;
        let action = match req.action {
            PlanActionKind::Failover if req.cleanup_test => PlanAction::CleanupTest,
            PlanActionKind::Failover if req.test => PlanAction::Test {
                host: req.host.clone(),
                switch: req.switch.clone(),
            },
            PlanActionKind::Failover => PlanAction::Failover {
                mode: req.mode,
                host: req.host.clone(),
            },
            PlanActionKind::Failback => {
                PlanAction::Failback(failback_opts(&req.failback.clone().unwrap_or_default()))
            }
            PlanActionKind::Complete => PlanAction::Complete { verify: req.verify },
            PlanActionKind::Commit => PlanAction::Commit,
            PlanActionKind::ReverseReplicate => PlanAction::ReverseReplicate,
        };
        let label = action_label(req);
        let last = e.vault.plan_progress(name).map_err(vault_err)?;
        // A post step that failed in the last run of this action runs again.
        let retry_post = last
            .as_ref()
            .filter(|p| {
                start == 0
                    && p["state"] == "failed"
                    && p["failed_step"] == "post"
                    && p["action"] == label.as_str()
            })
            .and_then(|p| p["failed_group"].as_u64())
            .map(|g| g as usize);
        let r = e.run_plan(name, action, opts(&req.data), start, retry_post);
        // What the run did, for `plan show` and `plan resume`.
        let mut progress = serde_json::json!({"action": label, "at": ferry_vault::now()});
        if let Err(x) = &r {
            let Some(stop) = x.downcast_ref::<ferry_engine::PlanStopped>() else {
                // Refused before anything changed: the last run's record stays (a paused
                // plan stays resumable).
                return Err(refused(r.unwrap_err()));
            };
            progress["failed_group"] = stop.group.into();
            progress["failed_step"] = stop.step.into();
        }
        match &r {
            Ok(run) => match &run.paused {
                Some(text) => {
                    let next = start + run.groups.len();
                    progress["state"] = "paused".into();
                    progress["message"] = text.clone().into();
                    progress["next_group"] = next.into();
                    // The plan's next group, 1-based, as operators count.
                    progress["resumes_at_group"] = (next + 1).into();
                    progress["request"] = serde_json::to_value(req).unwrap_or_default();
                }
                None => progress["state"] = "succeeded".into(),
            },
            Err(x) => {
                progress["state"] = "failed".into();
                progress["message"] = format!("{x:#}").into();
            }
        }
        e.vault
            .set_plan_progress(name, Some(&progress))
            .map_err(vault_err)?;
        r.map_err(refused)
    }

    /// The installation at `home` (it must exist: `ferry init`).
    pub fn new(home: &Path) -> Self {
        Local {
            home: home.to_path_buf(),
            observer: None,
            notify: None,
            server: false,
            hub: None,
        }
    }

    /// Serve mode: agent hosts are reached through `hub`.
    pub fn set_hub(&mut self, hub: Arc<crate::agents::Hub>) {
        self.hub = Some(hub);
    }

    /// Shows job progress while jobs run in this process (progress bars).
    pub fn set_observer(&mut self, o: Observer) {
        self.observer = Some(o);
    }

    /// Hands notes for the operator to `n` as they come up, instead of returning them in
    /// [`RunReply::messages`].
    pub fn set_notify(&mut self, n: Notify) {
        self.notify = Some(n);
    }

    /// Serve mode: statuses add RPO health.
    pub fn set_server_mode(&mut self) {
        self.server = true;
    }

    /// The installation's home.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// Opens the engine for one operation; notes go to the hook, or into the returned list.
    fn engine(
        &self,
        key: Option<&str>,
        key_id: Option<&str>,
    ) -> ApiResult<(Engine, Arc<Mutex<Vec<String>>>)> {
        let mut e = Engine::open(&self.home).map_err(refused)?;
        let notes = Arc::new(Mutex::new(Vec::new()));
        match &self.notify {
            Some(n) => e.set_notify(n.clone()),
            None => {
                let n2 = notes.clone();
                e.set_notify(Arc::new(move |s: &str| {
                    n2.lock().unwrap().push(s.to_string())
                }));
            }
        }
        if let Some(o) = &self.observer {
            e.set_observer(o.clone());
        }
        if let Some(h) = &self.hub {
            e.set_remote(Arc::new(crate::agents::Remote(h.clone())));
        }
        e.set_key(key.map(PathBuf::from), key_id.map(String::from));
        Ok((e, notes))
    }

    fn host_view(&self, e: &Engine, h: &ferry_model::Host) -> HostView {
        let agent = h.agent.then(|| match &self.hub {
            Some(hub) => hub.view(&h.name),
            None => crate::agents::Hub::new(self.home.clone(), crate::agents::AGENT_TIMEOUT)
                .view(&h.name),
        });
        let connected = match &agent {
            Some(a) => a.connected,
            None => e
                .driver(h)
                .map(|d| d.check_connected().is_ok())
                .unwrap_or(false),
        };
        HostView {
            agent,
            name: h.name.clone(),
            site: h.site.clone(),
            driver: h.driver.as_str().into(),
            root: h.root.display().to_string(),
            switches: h.switches.clone(),
            connected,
            accel: (h.driver == DriverKind::Qemu)
                .then(|| h.accel.clone().unwrap_or_else(|| "auto".into())),
        }
    }

    fn reply(job: ferry_model::Job, notes: &Mutex<Vec<String>>) -> RunReply {
        let messages = std::mem::take(&mut *notes.lock().unwrap());
        RunReply {
            job: Some(job),
            dry_run: None,
            messages,
        }
    }

    fn status_of(&self, e: &Engine, vm: &str) -> ApiResult<StatusView> {
        let s = e.status(vm).map_err(refused)?;
        let rpo = if self.server && s.state == ItemState::Protected {
            let item = e.item(vm).map_err(refused)?;
            let age = e
                .vault
                .points(vm)
                .map_err(|x| refused(x.into()))?
                .first()
                .and_then(|p| seconds_since(&p.created_at));
            Some(RpoView {
                target_s: item.rpo_secs,
                last_point_age_s: age,
                healthy: rpo_healthy(item.rpo_secs, age),
            })
        } else {
            None
        };
        Ok(StatusView {
            vm: s.vm,
            state: s.state,
            active_site: s.active_site,
            job: s.job,
            rpo,
            failover_point: s.failover_point,
            test: s.test.map(|t| ferry_api::TestView {
                host: t.host,
                name: t.name,
                point: t.point,
                started_at: t.started_at,
                switch: t.switch,
            }),
        })
    }
}

fn vault_err(e: ferry_vault::VaultError) -> ApiError {
    refused(e.into())
}

/// Hash under which the vault keeps a token's secret.
pub fn token_hash(secret: &str) -> String {
    blake3::hash(secret.as_bytes()).to_hex().to_string()
}

/// A new random token secret.
pub fn new_secret() -> String {
    let b: [u8; 32] = rand::random();
    format!("ferry_{}", hex::encode(b))
}

impl Api for Local {
    fn info(&self) -> ApiResult<Info> {
        let (e, _) = self.engine(None, None)?;
        Ok(Info {
            home: e.home.display().to_string(),
            vault: e.vault.path().display().to_string(),
            version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    fn sites(&self) -> ApiResult<Vec<Site>> {
        let (e, _) = self.engine(None, None)?;
        e.vault.sites().map_err(vault_err)
    }

    fn add_site(&self, req: &SiteAdd) -> ApiResult<Site> {
        let (e, _) = self.engine(None, None)?;
        e.add_site(&req.name, req.role, req.store.clone(), !req.no_store_check)
            .map_err(refused)
    }

    fn site(&self, name: &str) -> ApiResult<SiteView> {
        let (e, _) = self.engine(None, None)?;
        let s = e.site(name).map_err(refused)?;
        Ok(SiteView {
            network_map: e
                .vault
                .network_map(name)
                .map_err(vault_err)?
                .into_iter()
                .map(|(switch, to_site, to_switch)| NetworkMapping {
                    switch,
                    to_site,
                    to_switch,
                })
                .collect(),
            name: s.name,
            role: s.role,
            store: s.store,
        })
    }

    fn map_network(&self, req: &NetworkMapReq) -> ApiResult<SiteView> {
        let (e, _) = self.engine(None, None)?;
        e.map_network(&req.site, &req.switch, &req.to_site, &req.to_switch)
            .map_err(refused)?;
        drop(e);
        self.site(&req.site)
    }

    fn hosts(&self) -> ApiResult<Vec<HostView>> {
        let (e, _) = self.engine(None, None)?;
        Ok(e.vault
            .hosts()
            .map_err(vault_err)?
            .iter()
            .map(|h| self.host_view(&e, h))
            .collect())
    }

    fn host(&self, name: &str) -> ApiResult<HostView> {
        let (e, _) = self.engine(None, None)?;
        let h = e.host(name).map_err(refused)?;
        Ok(self.host_view(&e, &h))
    }

    fn add_host(&self, req: &HostAdd) -> ApiResult<HostView> {
        let (e, _) = self.engine(None, None)?;
        let h = e
            .add_host(
                &req.name,
                &req.site,
                req.driver,
                req.root.as_ref().map(PathBuf::from),
                req.switches.clone(),
                req.accel.clone(),
                req.agent,
            )
            .map_err(refused)?;
        Ok(self.host_view(&e, &h))
    }

    fn vms(&self) -> ApiResult<Vec<VmView>> {
        let (e, _) = self.engine(None, None)?;
        let mut out = Vec::new();
        for h in e.vault.hosts().map_err(vault_err)? {
            let Ok(d) = e.driver(&h) else { continue };
            if d.check_connected().is_err() {
                continue;
            }
            for vm in d.list_vms().map_err(|x| refused(x.into()))? {
                out.push(vm_view(&h, &vm));
            }
        }
        Ok(out)
    }

    fn vm(&self, name: &str, host: Option<&str>) -> ApiResult<VmView> {
        let (e, _) = self.engine(None, None)?;
        let (h, info) = e.locate_vm(name, host).map_err(refused)?;
        Ok(vm_view(&h, &info))
    }

    fn create_vm(&self, req: &VmCreate) -> ApiResult<VmView> {
        let (e, _) = self.engine(None, None)?;
        ferry_model::validate_name("VM", &req.name).map_err(|x| refused(x.into()))?;
        let h = e.host(&req.host).map_err(refused)?;
        let d = e.driver(&h).map_err(refused)?;
        let hv = |x: ferry_hypervisor::HvError| refused(x.into());
        d.check_connected().map_err(hv)?;
        let info = d
            .create_vm(&ferry_hypervisor::VmSpec {
                name: req.name.clone(),
                cpus: req.cpus,
                memory: req.memory,
                disks: req.disks.clone(),
                nics: req.switches.clone(),
                image: req.image.clone(),
            })
            .map_err(hv)?;
        Ok(vm_view(&h, &info))
    }

    fn set_power(&self, name: &str, req: &VmPower) -> ApiResult<VmView> {
        let (e, _) = self.engine(None, None)?;
        let (h, _) = e.locate_vm(name, req.host.as_deref()).map_err(refused)?;
        let d = e.driver(&h).map_err(refused)?;
        let hv = |x: ferry_hypervisor::HvError| refused(x.into());
        if req.running {
            d.start_vm(name).map_err(hv)?
        } else {
            d.stop_vm(name).map_err(hv)?
        }
        let info = d
            .get_vm(name)
            .map_err(hv)?
            .ok_or_else(|| ApiError::refused(format!("VM {name} vanished from host {}", h.name)))?;
        Ok(vm_view(&h, &info))
    }

    fn protect(&self, vm: &str, req: &ProtectReq) -> ApiResult<RunReply> {
        let (e, notes) = self.engine(req.key.as_deref(), req.key_id.as_deref())?;
        let job = e
            .protect(
                vm,
                &req.to,
                &ferry_engine::Protection {
                    rpo: Duration::from_secs(req.rpo_s),
                    retention: Duration::from_secs(req.retention_s),
                    block_size: req.block_size,
                    app: ferry_engine::AppPolicy {
                        every: req.app_consistent_every_s.map(Duration::from_secs),
                        retention: req.app_retention_s.map(Duration::from_secs),
                    },
                },
                opts(&req.data),
            )
            .map_err(refused)?;
        Ok(Self::reply(job, &notes))
    }

    fn replicate(&self, vm: &str, req: &ReplicateReq) -> ApiResult<RunReply> {
        let (e, notes) = self.engine(req.key.as_deref(), req.key_id.as_deref())?;
        let job = e
            .replicate(vm, opts(&req.data), req.verify, req.app_consistent)
            .map_err(refused)?;
        Ok(Self::reply(job, &notes))
    }

    fn reverse_replicate(&self, vm: &str, req: &ReplicateReq) -> ApiResult<RunReply> {
        let (e, notes) = self.engine(req.key.as_deref(), req.key_id.as_deref())?;
        let job = e
            .reverse_replicate(vm, opts(&req.data), req.verify)
            .map_err(refused)?;
        Ok(Self::reply(job, &notes))
    }

    fn points(&self, vm: &str) -> ApiResult<Vec<RecoveryPoint>> {
        let (e, _) = self.engine(None, None)?;
        e.item(vm).map_err(refused)?;
        e.vault.points(vm).map_err(vault_err)
    }

    fn failover(&self, vm: &str, req: &FailoverReq) -> ApiResult<RunReply> {
        let (e, notes) = self.engine(req.key.as_deref(), req.key_id.as_deref())?;
        let point = if req.latest_app_consistent {
            Some(e.latest_app_point(vm).map_err(refused)?)
        } else {
            req.point
        };
        let job = if req.cleanup_test {
            e.cleanup_test(vm, opts(&req.data))
        } else if req.test {
            e.test_failover(
                vm,
                point,
                req.host.as_deref(),
                req.switch.as_deref(),
                opts(&req.data),
            )
        } else {
            e.failover(vm, req.mode, point, req.host.as_deref(), opts(&req.data))
        }
        .map_err(refused)?;
        Ok(Self::reply(job, &notes))
    }

    fn failback(&self, vm: &str, req: &FailbackReq) -> ApiResult<RunReply> {
        let (e, notes) = self.engine(req.key.as_deref(), req.key_id.as_deref())?;
        let o = failback_opts(req);
        let (job, dry_run) = e.failback(vm, &o).map_err(refused)?;
        let messages = std::mem::take(&mut *notes.lock().unwrap());
        Ok(RunReply {
            job,
            dry_run,
            messages,
        })
    }

    fn complete(&self, vm: &str, req: &CompleteReq) -> ApiResult<RunReply> {
        let (e, notes) = self.engine(req.key.as_deref(), req.key_id.as_deref())?;
        let job = e
            .complete(vm, opts(&req.data), req.verify)
            .map_err(refused)?;
        Ok(Self::reply(job, &notes))
    }

    fn cancel(&self, vm: &str) -> ApiResult<RunReply> {
        let (e, notes) = self.engine(None, None)?;
        let job = e.cancel(vm).map_err(refused)?;
        Ok(Self::reply(job, &notes))
    }

    fn commit(&self, vm: &str) -> ApiResult<RunReply> {
        let (e, notes) = self.engine(None, None)?;
        let job = e.commit(vm).map_err(refused)?;
        Ok(Self::reply(job, &notes))
    }

    fn verify(&self, vm: &str, req: &VerifyReq) -> ApiResult<VerifyReport> {
        let (e, _) = self.engine(req.key.as_deref(), req.key_id.as_deref())?;
        e.verify(vm, req.point).map_err(refused)
    }

    fn status(&self, vm: &str) -> ApiResult<StatusView> {
        let (e, _) = self.engine(None, None)?;
        match e.vault.item(vm).map_err(vault_err)? {
            Some(_) => self.status_of(&e, vm),
            None => {
                e.locate_vm(vm, None).map_err(refused)?;
                Ok(StatusView {
                    vm: vm.into(),
                    state: ItemState::Unprotected,
                    active_site: "primary".into(),
                    job: None,
                    rpo: None,
                    test: None,
                    failover_point: None,
                })
            }
        }
    }

    fn statuses(&self) -> ApiResult<Vec<StatusView>> {
        let (e, _) = self.engine(None, None)?;
        e.vault
            .items()
            .map_err(vault_err)?
            .iter()
            .map(|i| self.status_of(&e, &i.vm))
            .collect()
    }

    fn jobs(&self, all: bool) -> ApiResult<Vec<Job>> {
        let (e, _) = self.engine(None, None)?;
        e.vault.jobs(all).map_err(vault_err)
    }

    fn job(&self, id: i64) -> ApiResult<Job> {
        let (e, _) = self.engine(None, None)?;
        e.vault.job(id).map_err(vault_err)?.ok_or_else(|| {
            ApiError::refused(format!("no job {id}; list jobs with `ferry jobs --all`"))
        })
    }

    fn watch_job(&self, id: i64, on: JobObserver<'_>) -> ApiResult<Job> {
        loop {
            // Opening the engine settles a job whose process died.
            let job = self.job(id)?;
            if !matches!(job.state, JobState::Running | JobState::Queued) {
                return Ok(job);
            }
            on(&job);
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn create_plan(&self, req: &PlanCreate) -> ApiResult<PlanView> {
        let (e, _) = self.engine(None, None)?;
        let (groups, steps) = e
            .create_plan(&req.name, req.groups.clone(), req.steps.clone())
            .map_err(refused)?;
        Ok(PlanView {
            name: req.name.clone(),
            groups,
            steps,
            last_run: None,
        })
    }

    fn plan(&self, name: &str) -> ApiResult<PlanView> {
        let (e, _) = self.engine(None, None)?;
        let groups = e.plan(name).map_err(refused)?;
        let steps = e.plan_steps(name).map_err(refused)?;
        let last_run = e
            .vault
            .plan_progress(name)
            .map_err(vault_err)?
            .map(|mut p| {
                // The request is kept for `plan resume`; callers see what happened.
                if let Some(o) = p.as_object_mut() {
                    o.remove("request");
                }
                p
            });
        Ok(PlanView {
            name: name.into(),
            groups,
            steps,
            last_run,
        })
    }

    fn run_plan(&self, name: &str, req: &PlanRunReq) -> ApiResult<PlanRun> {
        self.run_plan_from(name, req, 0)
    }

    fn resume_plan(&self, name: &str) -> ApiResult<PlanRun> {
        let (e, _) = self.engine(None, None)?;
        e.plan(name).map_err(refused)?;
        let p = e.vault.plan_progress(name).map_err(vault_err)?;
        let paused = p.as_ref().filter(|p| p["state"] == "paused");
        let Some(p) = paused else {
            return Err(ApiError::refused(format!(
                "plan {name} is not paused{}; `ferry plan show {name}` shows its last run",
                p.as_ref()
                    .and_then(|p| p["state"].as_str().map(|s| format!(" (its last run {s})")))
                    .unwrap_or_default()
            )));
        };
        let req: PlanRunReq = serde_json::from_value(p["request"].clone()).map_err(|x| {
            ApiError::refused(format!(
                "plan {name}: the paused run's request is unreadable ({x}); run the plan command again"
            ))
        })?;
        let next = p["next_group"].as_u64().unwrap_or(0) as usize;
        self.run_plan_from(name, &req, next)
    }

    fn token_new(&self, req: &TokenNew) -> ApiResult<TokenCreated> {
        let (e, _) = self.engine(None, None)?;
        ferry_model::validate_name("token", &req.name).map_err(|x| refused(x.into()))?;
        match (req.role, &req.host) {
            (ferry_model::Role::Agent, None) => {
                return Err(ApiError::refused(format!(
                    "an agent token acts as one host: add --host HOST (e.g. `ferry token new {} --role agent --host h1`)",
                    req.name
                )))
            }
            (ferry_model::Role::Agent, Some(h)) => {
                e.host(h).map_err(refused)?;
            }
            (r, Some(_)) => {
                return Err(ApiError::refused(format!(
                    "--host applies to agent tokens only (this token's role is {})",
                    r.as_str()
                )))
            }
            _ => {}
        }
        let secret = new_secret();
        let t = ferry_model::TokenInfo {
            name: req.name.clone(),
            role: req.role,
            host: req.host.clone(),
            created_at: ferry_vault::now(),
        };
        e.vault
            .add_token(&t, &token_hash(&secret))
            .map_err(vault_err)?;
        Ok(TokenCreated {
            name: t.name,
            role: t.role,
            host: t.host,
            token: secret,
        })
    }

    fn tokens(&self) -> ApiResult<Vec<TokenInfo>> {
        let (e, _) = self.engine(None, None)?;
        e.vault.tokens().map_err(vault_err)
    }

    fn token_revoke(&self, name: &str) -> ApiResult<TokenInfo> {
        let (e, _) = self.engine(None, None)?;
        e.vault
            .delete_token(name)
            .map_err(vault_err)?
            .ok_or_else(|| {
                ApiError::refused(format!(
                    "no token named {name}; list them with `ferry token list`"
                ))
            })
    }
}

fn failback_opts(req: &FailbackReq) -> ferry_engine::FailbackOpts {
    ferry_engine::FailbackOpts {
        sync: req.sync,
        host: req.host.clone(),
        create_vm: req.create_vm,
        auto_complete: req.auto_complete,
        dry_run: req.dry_run,
        verify: req.verify,
        run: Some(opts(&req.data)),
    }
}

/// The command a plan run request stands for, as an operator types it (`failover --test`).
fn action_label(req: &PlanRunReq) -> String {
    match req.action {
        PlanActionKind::Failover if req.cleanup_test => "failover --cleanup-test".into(),
        PlanActionKind::Failover if req.test => "failover --test".into(),
        PlanActionKind::Failover => "failover".into(),
        PlanActionKind::Failback => "failback".into(),
        PlanActionKind::Complete => "complete".into(),
        PlanActionKind::Commit => "commit".into(),
        PlanActionKind::ReverseReplicate => "reverse-replicate".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpo_health_allows_half_the_rpo_of_lateness() {
        assert!(rpo_healthy(60, Some(60)));
        assert!(rpo_healthy(60, Some(90)));
        assert!(!rpo_healthy(60, Some(91)));
        assert!(rpo_healthy(5, Some(10)));
        assert!(!rpo_healthy(5, Some(11)));
        assert!(!rpo_healthy(5, None));
    }

    #[test]
    fn secrets_are_random_and_only_their_hash_is_compared() {
        let (a, b) = (new_secret(), new_secret());
        assert_ne!(a, b);
        assert!(a.starts_with("ferry_") && a.len() == 6 + 64);
        assert_eq!(token_hash(&a), token_hash(&a));
        assert_ne!(token_hash(&a), token_hash(&b));
    }
}
