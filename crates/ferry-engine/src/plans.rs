//! Recovery plans: ordered groups of VMs that fail over and back together. A group starts only
//! when every VM of the previous group is up; every VM's state is checked before anything changes.
use anyhow::{anyhow, bail, Context, Result};
use ferry_model::{begin, Command, ItemState, SyncMode};

use crate::{Engine, FailbackOpts, FailoverMode, RunOpts};

/// What a plan command does to each VM of the plan.
#[derive(Debug, Clone)]
pub enum PlanAction {
    /// Fail over every VM.
    Failover {
        /// Planned or unplanned.
        mode: FailoverMode,
        /// Recovery host for every VM (default: the first host of each VM's recovery site).
        host: Option<String>,
    },
    /// Fail back every VM (phase 1, or both phases with `auto_complete`).
    Failback(FailbackOpts),
    /// Phase 2 for every waiting failback.
    Complete {
        /// Re-read and compare after the sync.
        verify: bool,
    },
    /// Commit every VM's failover or failback.
    Commit,
    /// Protect every failed-back VM again.
    ReverseReplicate,
    /// A drill: a test copy of every VM (see [`Engine::test_failover`]).
    Test {
        /// Recovery host for every copy.
        host: Option<String>,
        /// Isolated switch (default `ferry-test`).
        switch: Option<String>,
    },
    /// Remove every VM's test copy.
    CleanupTest,
}

impl PlanAction {
    fn name(&self) -> &'static str {
        match self {
            PlanAction::Failover { .. } => "failover",
            PlanAction::Failback(_) => "failback",
            PlanAction::Complete { .. } => "complete",
            PlanAction::Commit => "commit",
            PlanAction::ReverseReplicate => "reverse-replicate",
            PlanAction::Test { .. } => "failover --test",
            PlanAction::CleanupTest => "failover --cleanup-test",
        }
    }

    fn command(&self) -> Command {
        match self {
            PlanAction::Failover { .. } => Command::Failover,
            PlanAction::Failback(o) => Command::Failback(o.sync.unwrap_or(SyncMode::Delta)),
            PlanAction::Complete { .. } => Command::Complete,
            PlanAction::Commit => Command::Commit,
            PlanAction::ReverseReplicate => Command::ReverseReplicate,
            // A drill's precondition (a protected VM) is checked as a failover's.
            PlanAction::Test { .. } | PlanAction::CleanupTest => Command::Failover,
        }
    }

    /// States in which a VM already went through this action (a re-run skips it).
    fn done(&self, s: ItemState) -> bool {
        match self {
            PlanAction::Failover { .. } => {
                matches!(s, ItemState::FailoverCommitPending | ItemState::FailedOver)
            }
            PlanAction::Failback(o) if !o.dry_run => s == ItemState::FailbackCommitPending,
            PlanAction::Failback(_) => false,
            PlanAction::Complete { .. } => s == ItemState::FailbackCommitPending,
            PlanAction::Commit => matches!(s, ItemState::FailedOver | ItemState::FailedBack),
            PlanAction::ReverseReplicate => s == ItemState::Protected,
            // Drills are decided by the VM's test copy (see `Engine::plan_done`).
            PlanAction::Test { .. } | PlanAction::CleanupTest => false,
        }
    }
}

pub use ferry_api::{PlanRun, PlanStep};

impl Engine {
    /// Creates a plan of ordered VM groups; every VM must exist and appear once.
    pub fn create_plan(&self, name: &str, groups: Vec<Vec<String>>) -> Result<Vec<Vec<String>>> {
        ferry_model::validate_name("plan", name)?;
        let groups: Vec<Vec<String>> = groups.into_iter().filter(|g| !g.is_empty()).collect();
        if groups.is_empty() {
            bail!("plan {name} needs at least one group: --group VM[,VM]...");
        }
        let mut seen = std::collections::HashSet::new();
        for vm in groups.iter().flatten() {
            if !seen.insert(vm.clone()) {
                bail!("VM {vm} appears twice in plan {name}; a VM belongs to one group");
            }
            self.locate_vm(vm, None)
                .with_context(|| format!("plan {name}"))?;
        }
        self.vault.add_plan(name, &groups)?;
        Ok(groups)
    }

    /// The groups of a plan.
    pub fn plan(&self, name: &str) -> Result<Vec<Vec<String>>> {
        self.vault.plan(name)?.ok_or_else(|| {
            anyhow!("no plan named {name}; create it with `ferry plan create {name} --group VM[,VM]...`")
        })
    }

    /// True when `item`'s VM already went through `action` (a re-run skips it).
    fn plan_done(&self, action: &PlanAction, item: &ferry_model::ProtectedItem) -> Result<bool> {
        Ok(match action {
            PlanAction::Test { .. } => {
                self.extra(&item.vm)?.test.is_some() && !self.last_side_job_failed(item, "test")?
            }
            PlanAction::CleanupTest => self.extra(&item.vm)?.test.is_none(),
            a => a.done(item.state),
        })
    }

    /// Runs `action` on every VM of the plan, group after group.
    pub fn run_plan(&self, name: &str, action: PlanAction, opts: RunOpts) -> Result<PlanRun> {
        let groups = self.plan(name)?;
        let cmd = action.command();
        // Every VM must be able to take the step before any VM takes it.
        for vm in groups.iter().flatten() {
            let item = self.item(vm).with_context(|| format!("plan {name}"))?;
            if self.plan_done(&action, &item)? {
                continue;
            }
            match &action {
                PlanAction::Test { .. } if item.state != ItemState::Protected => bail!(
                    "plan {name}: a drill needs every VM protected, and VM {vm} is {}; nothing was changed",
                    item.state.as_str()
                ),
                PlanAction::Test { .. } | PlanAction::CleanupTest => {}
                _ => {
                    begin(vm, item.state, cmd)
                        .with_context(|| format!("plan {name}: nothing was changed"))?;
                }
            }
            if let Some(id) = item.job {
                if self
                    .vault
                    .job(id)?
                    .is_some_and(|j| j.state == ferry_model::JobState::Running)
                {
                    bail!("plan {name}: VM {vm} has job {id} running; wait for it or `ferry cancel {vm}`; nothing was changed");
                }
            }
        }
        let mut out = PlanRun {
            plan: name.into(),
            action: action.name().into(),
            groups: Vec::new(),
        };
        for (gi, group) in groups.iter().enumerate() {
            let mut steps = Vec::new();
            for vm in group {
                let item = self.item(vm)?;
                if self.plan_done(&action, &item)? {
                    steps.push(PlanStep {
                        vm: vm.clone(),
                        job: None,
                        dry_run: None,
                        skipped: true,
                    });
                    continue;
                }
                let r = match &action {
                    PlanAction::Failover { mode, host } => self
                        .failover(vm, *mode, None, host.as_deref(), opts)
                        .map(|j| (Some(j), None)),
                    PlanAction::Failback(o) => {
                        let mut o = o.clone();
                        o.run = Some(opts);
                        self.failback(vm, &o)
                    }
                    PlanAction::Complete { verify } => {
                        self.complete(vm, opts, *verify).map(|j| (Some(j), None))
                    }
                    PlanAction::Commit => self.commit(vm).map(|j| (Some(j), None)),
                    PlanAction::ReverseReplicate => self
                        .reverse_replicate(vm, opts, false)
                        .map(|j| (Some(j), None)),
                    PlanAction::Test { host, switch } => self
                        .test_failover(vm, None, host.as_deref(), switch.as_deref(), opts)
                        .map(|j| (Some(j), None)),
                    PlanAction::CleanupTest => self.cleanup_test(vm, opts).map(|j| (Some(j), None)),
                };
                let (job, dry_run) = r.with_context(|| {
                    format!(
                        "plan {name} stopped at VM {vm} (group {}); VMs before it went through; fix the cause and re-run `ferry plan {} {name}` (finished VMs are skipped)",
                        gi + 1,
                        action.name()
                    )
                })?;
                steps.push(PlanStep {
                    vm: vm.clone(),
                    job,
                    dry_run,
                    skipped: false,
                });
            }
            out.groups.push(steps);
        }
        Ok(out)
    }
}
