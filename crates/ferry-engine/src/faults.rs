//! Fault points: every step of every workflow offers a crash (a real SIGKILL of the process
//! running the job, when `FERRY_FAULT` names the point) before its side effect, after it, and,
//! for steps that move data, after the first batch made durable. The job runner fires them
//! itself ([`crate::jobs::JobRun::begin_step`], `end_step`, [`crate::jobs::JobCtx::batch_durable`]),
//! so a step added to a workflow's list here gets its points without anyone remembering; the
//! workflows build their jobs from these same lists. `ferry debug fault-points` prints them
//! for the crash-matrix test (tests/e2e/matrix.rs).
use ferry_model::JobKind;
use serde::Serialize;

/// Steps of `protect`.
pub const PROTECT: &[&str] = &["initial replication"];
/// Steps of a replication cycle.
pub const REPLICATE: &[&str] = &["replicate changes"];
/// Steps of reverse replication.
pub const REVERSE_REPLICATE: &[&str] = &["replicate changes since failback"];
/// Steps of a planned failover.
pub const FAILOVER_PLANNED: &[&str] = &[
    "stop primary VM",
    "replicate final changes",
    "create recovery VM",
    "restore disks",
    "start recovery VM",
];
/// Steps of an unplanned failover.
pub const FAILOVER_UNPLANNED: &[&str] =
    &["create recovery VM", "restore disks", "start recovery VM"];
/// Steps of a delta failback (`failback` runs phase 1, `complete` the rest).
pub const FAILBACK_DELTA: &[&str] = &[
    "prepare primary VM",
    "sync disks (phase 1)",
    "stop recovery VM",
    "sync final changes (phase 2)",
    "start primary VM",
];
/// Steps of a full-download failback.
pub const FAILBACK_FULL: &[&str] = &[
    "prepare primary VM",
    "stop recovery VM",
    "download all blocks",
    "start primary VM",
];
/// Steps of a test failover (a drill: a throw-away copy on an isolated switch).
pub const FAILOVER_TEST: &[&str] = &["create test VM", "restore disks", "start test VM"];
/// Steps of removing a test copy.
pub const CLEANUP_TEST: &[&str] = &["delete test VM"];
/// Steps of committing a failover.
pub const COMMIT_FAILOVER: &[&str] = &["commit failover"];
/// Steps of committing a failback.
pub const COMMIT_FAILBACK: &[&str] = &["delete recovery VM"];

/// Steps that move data in batches (they also offer a `mid` point).
pub const DATA_STEPS: &[&str] = &[
    "initial replication",
    "replicate changes",
    "replicate changes since failback",
    "replicate final changes",
    "restore disks",
    "sync disks (phase 1)",
    "sync final changes (phase 2)",
    "download all blocks",
];

/// A workflow as the crash matrix runs it: its name, the kind of its job and its steps.
#[derive(Debug, Clone, Copy)]
pub struct Workflow {
    /// Name (`failback-delta`, …).
    pub name: &'static str,
    /// Kind of job it runs.
    pub kind: JobKind,
    /// Its steps, in order.
    pub steps: &'static [&'static str],
}

/// Every workflow that runs a job.
pub const WORKFLOWS: &[Workflow] = &[
    Workflow {
        name: "protect",
        kind: JobKind::Protect,
        steps: PROTECT,
    },
    Workflow {
        name: "replicate",
        kind: JobKind::Replicate,
        steps: REPLICATE,
    },
    Workflow {
        name: "failover-planned",
        kind: JobKind::Failover,
        steps: FAILOVER_PLANNED,
    },
    Workflow {
        name: "failover-unplanned",
        kind: JobKind::Failover,
        steps: FAILOVER_UNPLANNED,
    },
    // Changing the point of a failover awaiting commit makes the recovery VM again.
    Workflow {
        name: "failover-change-point",
        kind: JobKind::Failover,
        steps: FAILOVER_UNPLANNED,
    },
    Workflow {
        name: "failover-test",
        kind: JobKind::Failover,
        steps: FAILOVER_TEST,
    },
    Workflow {
        name: "cleanup-test",
        kind: JobKind::Failover,
        steps: CLEANUP_TEST,
    },
    Workflow {
        name: "commit-failover",
        kind: JobKind::Commit,
        steps: COMMIT_FAILOVER,
    },
    Workflow {
        name: "failback-delta",
        kind: JobKind::Failback,
        steps: FAILBACK_DELTA,
    },
    Workflow {
        name: "failback-full",
        kind: JobKind::Failback,
        steps: FAILBACK_FULL,
    },
    Workflow {
        name: "commit-failback",
        kind: JobKind::Commit,
        steps: COMMIT_FAILBACK,
    },
    Workflow {
        name: "reverse-replicate",
        kind: JobKind::ReverseReplicate,
        steps: REVERSE_REPLICATE,
    },
    // A plan runs the same jobs, group by group: its points are theirs, reached by the first
    // VM of the first group; a re-run of the plan command continues from there.
    Workflow {
        name: "plan-failover",
        kind: JobKind::Failover,
        steps: FAILOVER_PLANNED,
    },
    Workflow {
        name: "plan-failback",
        kind: JobKind::Failback,
        steps: FAILBACK_DELTA,
    },
];

/// When in a step a fault point fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum When {
    /// Before the step's side effect.
    Before,
    /// After the first batch of the step's transfer was made durable.
    Mid,
    /// After the side effect, before anything later is recorded.
    After,
}

impl When {
    fn as_str(self) -> &'static str {
        match self {
            When::Before => "before",
            When::Mid => "mid",
            When::After => "after",
        }
    }
}

/// The name of a fault point: `KIND/step-slug/when` (e.g. `failback/sync-disks-phase-1/mid`).
pub fn point(kind: JobKind, step: &str, when: When) -> String {
    let mut slug = String::new();
    for c in step.chars() {
        if c.is_ascii_alphanumeric() {
            slug.push(c.to_ascii_lowercase());
        } else if !slug.ends_with('-') {
            slug.push('-');
        }
    }
    format!(
        "{}/{}/{}",
        kind.as_str(),
        slug.trim_matches('-'),
        when.as_str()
    )
}

/// One fault point of one workflow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FaultPoint {
    /// The workflow (see [`WORKFLOWS`]).
    pub workflow: &'static str,
    /// The step.
    pub step: &'static str,
    /// The point's name (what `FERRY_FAULT` takes).
    pub point: String,
}

/// Every fault point of every workflow, in workflow and step order.
pub fn all() -> Vec<FaultPoint> {
    let mut out = Vec::new();
    for w in WORKFLOWS {
        for &step in w.steps {
            let mut whens = vec![When::Before];
            if DATA_STEPS.contains(&step) {
                whens.push(When::Mid);
            }
            whens.push(When::After);
            for when in whens {
                out.push(FaultPoint {
                    workflow: w.name,
                    step,
                    point: point(w.kind, step, when),
                });
            }
        }
    }
    out
}

/// Kills this process (SIGKILL, no clean-up) when `FERRY_FAULT` names `point`.
pub fn fire(point: &str) {
    if std::env::var("FERRY_FAULT").is_ok_and(|f| f == point) {
        eprintln!("ferry: injected fault at {point}");
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_are_named_from_the_kind_and_the_step() {
        assert_eq!(
            point(JobKind::Failback, "sync disks (phase 1)", When::Mid),
            "failback/sync-disks-phase-1/mid"
        );
        assert_eq!(
            point(
                JobKind::ReverseReplicate,
                "replicate changes since failback",
                When::Before
            ),
            "reverse_replicate/replicate-changes-since-failback/before"
        );
    }

    #[test]
    fn every_step_has_before_and_after_and_data_steps_a_mid() {
        let all = all();
        for w in WORKFLOWS {
            for s in w.steps {
                let n = all
                    .iter()
                    .filter(|p| p.workflow == w.name && p.step == *s)
                    .count();
                assert_eq!(n, if DATA_STEPS.contains(s) { 3 } else { 2 }, "{s}");
            }
        }
        for d in DATA_STEPS {
            assert!(
                WORKFLOWS.iter().any(|w| w.steps.contains(d)),
                "data step {d} belongs to a workflow"
            );
        }
    }
}
