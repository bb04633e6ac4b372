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

    /// True for the actions that run the groups' steps (pre/post commands, pauses and
    /// parallelism): those that start VMs somewhere, failovers (drills too) and failbacks.
    fn has_steps(&self) -> bool {
        match self {
            PlanAction::Failover { .. } | PlanAction::Test { .. } => true,
            PlanAction::Failback(o) => !o.dry_run,
            _ => false,
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

pub use ferry_api::{GroupSteps, HookRun, PlanRun, PlanStep};

impl Engine {
    /// Creates a plan of ordered VM groups, with optional steps around each group; every VM
    /// must exist and appear once.
    pub fn create_plan(
        &self,
        name: &str,
        groups: Vec<Vec<String>>,
        steps: Vec<GroupSteps>,
    ) -> Result<(Vec<Vec<String>>, Vec<GroupSteps>)> {
        ferry_model::validate_name("plan", name)?;
        if steps.len() > groups.len() {
            bail!(
                "plan {name} has {} groups but steps for {}; --pre, --post, --timeout, --pause and --parallel follow the --group they belong to",
                groups.len(),
                steps.len()
            );
        }
        // An empty group goes, with its steps (they must not slide onto the next group).
        let mut steps_of = steps.into_iter();
        let (groups, steps): (Vec<Vec<String>>, Vec<GroupSteps>) = groups
            .into_iter()
            .map(|g| (g, steps_of.next().unwrap_or_default()))
            .filter(|(g, st)| !g.is_empty() || *st != GroupSteps::default())
            .collect();
        if let Some(i) = groups.iter().position(|g| g.is_empty()) {
            bail!(
                "plan {name}: group {} has steps but no VM; give it VMs or drop its steps",
                i + 1
            );
        }
        if groups.is_empty() {
            bail!("plan {name} needs at least one group: --group VM[,VM]...");
        }
        for (i, st) in steps.iter().enumerate() {
            if st.parallel == Some(0) {
                bail!(
                    "plan {name}, group {}: --parallel must be at least 1",
                    i + 1
                );
            }
            if st.timeout_s == Some(0) {
                bail!(
                    "plan {name}, group {}: --timeout must be longer than 0 s",
                    i + 1
                );
            }
            for cmd in [&st.pre, &st.post].into_iter().flatten() {
                if cmd.trim().is_empty() {
                    bail!(
                        "plan {name}, group {}: an empty --pre or --post command",
                        i + 1
                    );
                }
            }
        }
        let mut seen = std::collections::HashSet::new();
        for vm in groups.iter().flatten() {
            if !seen.insert(vm.clone()) {
                bail!("VM {vm} appears twice in plan {name}; a VM belongs to one group");
            }
            self.locate_vm(vm, None)
                .with_context(|| format!("plan {name}"))?;
        }
        // Trailing groups without steps need no entry.
        let mut steps = steps;
        while steps.last().is_some_and(|s| *s == GroupSteps::default()) {
            steps.pop();
        }
        self.vault.atomically(|v| {
            v.add_plan(name, &groups)?;
            v.set_plan_steps(
                name,
                &serde_json::to_value(&steps).expect("steps serialize"),
            )
        })?;
        Ok((groups, steps))
    }

    /// The groups of a plan.
    pub fn plan(&self, name: &str) -> Result<Vec<Vec<String>>> {
        self.vault.plan(name)?.ok_or_else(|| {
            anyhow!("no plan named {name}; create it with `ferry plan create {name} --group VM[,VM]...`")
        })
    }

    /// The steps around a plan's groups, as stored: an entry per group up to the last group
    /// that has any.
    pub fn plan_steps(&self, name: &str) -> Result<Vec<GroupSteps>> {
        self.plan(name)?;
        serde_json::from_value(self.vault.plan_steps(name)?)
            .with_context(|| format!("plan {name}: its steps in the vault are unreadable"))
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

    /// Runs `action` on every VM of the plan, group after group, from group `start` (0: the
    /// first; a resumed run starts after the group whose pause stopped it). Failover and
    /// failback runs also run each group's pre and post commands and stop at its pause;
    /// `retry_post` names a group (0-based) whose post step failed in the last run: it runs
    /// again (with the group's pause) though its VMs went through. A run that stops after
    /// changing something fails with a [`PlanStopped`].
    pub fn run_plan(
        &self,
        name: &str,
        action: PlanAction,
        opts: RunOpts,
        start: usize,
        retry_post: Option<usize>,
    ) -> Result<PlanRun> {
        let groups = self.plan(name)?;
        let mut steps = self.plan_steps(name)?;
        steps.resize(groups.len(), GroupSteps::default());
        if start >= groups.len() {
            bail!(
                "plan {name} has {} groups; nothing to run from group {}",
                groups.len(),
                start + 1
            );
        }
        let cmd = action.command();
        // Every VM must be able to take the step before any VM takes it.
        for vm in groups[start..].iter().flatten() {
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
            first_group: start + 1,
            groups: Vec::new(),
            hooks: Vec::new(),
            paused: None,
        };
        let with_steps = action.has_steps();
        for (gi, group) in groups.iter().enumerate().skip(start) {
            let st = &steps[gi];
            // A group whose VMs all went through already is passed over, steps and all.
            let mut todo = Vec::new();
            for vm in group {
                if !self.plan_done(&action, &self.item(vm)?)? {
                    todo.push(vm.clone());
                }
            }
            let stopped = |step: &'static str, what: String| {
                anyhow::Error::new(PlanStopped {
                    group: gi,
                    step,
                    message: format!(
                        "plan {name} stopped at group {}: {what}; groups after it were not touched. Fix the cause and re-run `ferry plan {} {name}` (VMs that went through are skipped{})",
                        gi + 1,
                        action.name(),
                        if step == "post" { "; this group's post step runs again" } else { "" }
                    ),
                })
            };
            // The re-run after a failed post step runs that step (and the group's pause) again.
            let retry = retry_post == Some(gi);
            if with_steps && !todo.is_empty() {
                if let Some(c) = &st.pre {
                    let h = self.run_hook(name, &action, gi, group, "pre", c, st)?;
                    let failed = hook_failure(&h);
                    out.hooks.push(h);
                    if let Some(why) = failed {
                        return Err(stopped("pre", why));
                    }
                }
            }
            let parallel = if with_steps {
                st.parallel.unwrap_or(1).max(1) as usize
            } else {
                1
            };
            let results = self.run_group(&action, &todo, opts, parallel)?;
            let mut steps_out = Vec::new();
            let mut failures = Vec::new();
            for vm in group {
                match results.iter().find(|(v, _)| v == vm) {
                    None => steps_out.push(PlanStep {
                        vm: vm.clone(),
                        job: None,
                        dry_run: None,
                        skipped: true,
                    }),
                    Some((_, Ok((job, dry_run)))) => steps_out.push(PlanStep {
                        vm: vm.clone(),
                        job: job.clone(),
                        dry_run: dry_run.clone(),
                        skipped: false,
                    }),
                    Some((_, Err(e))) => failures.push(format!("VM {vm} failed: {e:#}")),
                }
            }
            out.groups.push(steps_out);
            if !failures.is_empty() {
                return Err(stopped("vms", failures.join("; ")));
            }
            if with_steps && (!todo.is_empty() || retry) {
                if let Some(c) = &st.post {
                    let h = self.run_hook(name, &action, gi, group, "post", c, st)?;
                    let failed = hook_failure(&h);
                    out.hooks.push(h);
                    if let Some(why) = failed {
                        return Err(stopped("post", why));
                    }
                }
                if let (Some(text), true) = (&st.pause, gi + 1 < groups.len()) {
                    out.paused = Some(text.clone());
                    return Ok(out);
                }
            }
        }
        Ok(out)
    }

    /// Runs `action` on the VMs `todo`, up to `parallel` at once (each with its own vault
    /// connection); answers each VM's outcome, in `todo`'s order.
    #[allow(clippy::type_complexity)]
    fn run_group(
        &self,
        action: &PlanAction,
        todo: &[String],
        opts: RunOpts,
        parallel: usize,
    ) -> Result<Vec<(String, Result<VmOutcome>)>> {
        if parallel <= 1 || todo.len() <= 1 {
            let mut out = Vec::new();
            for vm in todo {
                let r = self.plan_vm(action, vm, opts);
                let failed = r.is_err();
                out.push((vm.clone(), r));
                if failed {
                    // One at a time: the VMs after a failing one are not started.
                    break;
                }
            }
            return Ok(out);
        }
        let next = std::sync::atomic::AtomicUsize::new(0);
        let results = std::sync::Mutex::new(Vec::new());
        let engines = (0..parallel.min(todo.len()))
            .map(|_| self.sibling())
            .collect::<Result<Vec<_>>>()?;
        std::thread::scope(|s| {
            for e in engines {
                let (next, results) = (&next, &results);
                s.spawn(move || loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let Some(vm) = todo.get(i) else { break };
                    let r = e.plan_vm(action, vm, opts);
                    results.lock().unwrap().push((i, vm.clone(), r));
                });
            }
        });
        let mut r = results.into_inner().unwrap();
        r.sort_by_key(|(i, _, _)| *i);
        Ok(r.into_iter().map(|(_, vm, r)| (vm, r)).collect())
    }

    /// Runs `action` on one VM of a plan.
    fn plan_vm(&self, action: &PlanAction, vm: &str, opts: RunOpts) -> Result<VmOutcome> {
        match action {
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
        }
    }

    /// Runs a group's pre or post command (`sh -c`) with the plan's context in its
    /// environment, killing it (and what it started) past the group's timeout.
    #[allow(clippy::too_many_arguments)]
    fn run_hook(
        &self,
        plan: &str,
        action: &PlanAction,
        gi: usize,
        group: &[String],
        step: &str,
        command: &str,
        st: &GroupSteps,
    ) -> Result<HookRun> {
        let timeout =
            std::time::Duration::from_secs(st.timeout_s.unwrap_or(DEFAULT_HOOK_TIMEOUT_S));
        let env = [
            ("FERRY_PLAN", plan.to_string()),
            ("FERRY_PLAN_ACTION", action.name().to_string()),
            ("FERRY_PLAN_GROUP", (gi + 1).to_string()),
            ("FERRY_PLAN_STEP", step.to_string()),
            ("FERRY_PLAN_VMS", group.join(",")),
            ("FERRY_HOME", self.home.display().to_string()),
        ];
        let r = crate::hooks::run(command, &env, timeout).with_context(|| {
            format!(
                "plan {plan}, group {}: cannot run its {step} command",
                gi + 1
            )
        })?;
        let h = HookRun {
            group: gi + 1,
            step: step.into(),
            command: command.into(),
            exit_code: r.exit_code,
            timed_out: r.timed_out,
            output: r.output,
            elapsed_ms: r.elapsed.as_millis() as u64,
        };
        let outcome = match (h.timed_out, h.exit_code) {
            (true, _) => format!("killed after {}", ferry_model::format_duration(timeout)),
            (false, Some(c)) => format!("exit {c}"),
            (false, None) => "killed by a signal".into(),
        };
        self.vault.event(
            None,
            None,
            &format!(
                "plan {plan}, group {}: {step} command `{command}` ended ({outcome}); output: {}",
                gi + 1,
                last_lines(&h.output, 5)
            ),
        )?;
        Ok(h)
    }
}

/// Why a plan run stopped part-way: the group (0-based) and its step (`pre`, `vms`, `post`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanStopped {
    /// The group, 0-based.
    pub group: usize,
    /// `pre`, `vms` or `post`.
    pub step: &'static str,
    /// What happened and what to do next.
    pub message: String,
}

impl std::fmt::Display for PlanStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PlanStopped {}

/// What one VM's part of a plan run produced: its job, or a dry run's prediction.
type VmOutcome = (Option<ferry_model::Job>, Option<ferry_api::DryRun>);

/// Longest a group's pre or post command runs when the plan gives no `--timeout`.
pub const DEFAULT_HOOK_TIMEOUT_S: u64 = 300;

/// Why a pre or post command counts as failed, if it does.
fn hook_failure(h: &HookRun) -> Option<String> {
    let what = format!("its {} command `{}`", h.step, h.command);
    let tail = last_lines(&h.output, 3);
    let tail = if tail.is_empty() {
        String::new()
    } else {
        format!(" (output: {tail})")
    };
    match (h.timed_out, h.exit_code) {
        (false, Some(0)) => None,
        (true, _) => Some(format!(
            "{what} ran longer than its timeout and was killed{tail}"
        )),
        (false, Some(c)) => Some(format!("{what} failed with exit code {c}{tail}")),
        (false, None) => Some(format!("{what} was killed by a signal{tail}")),
    }
}

/// The last `n` non-empty lines of `s`, joined with " | ".
fn last_lines(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}
