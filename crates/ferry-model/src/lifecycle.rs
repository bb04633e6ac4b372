//! The protected item's lifecycle state machine (DESIGN.md §2), as pure functions.
//!
//! A command that runs a job moves the item with [`begin`] when the job starts and with
//! [`finish`] when the job ends or waits. A command that is not allowed in the current state is
//! refused with a [`Refusal`] that names the state and the command that leads onward.

use std::fmt;
use std::str::FromStr;

/// Lifecycle state of a protected item; its JSON form is the snake_case name.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ItemState {
    /// Not (yet) under protection; only the primary copy exists.
    Unprotected,
    /// Replication is being enabled; the first recovery point does not exist yet.
    Protecting,
    /// Replicating primary → recovery; recovery points are taken every RPO.
    Protected,
    /// Failed over to the recovery site; the failover still has to be committed.
    FailoverCommitPending,
    /// Runs at the recovery site after a committed failover.
    FailedOver,
    /// Failback phase 1 (delta pre-sync) is copying to the primary disk; the recovery VM runs.
    FailbackSyncing,
    /// Failback phase 1 is done; waiting for `complete` (the recovery VM still runs).
    FailbackReady,
    /// Failback phase 2 (or a full download): recovery VM shut down, last data moving to the primary.
    FailbackCompleting,
    /// A failback was cancelled or crashed; the primary disk is inconsistent until it is resumed.
    FailbackInterrupted,
    /// The primary VM runs again; the recovery VM is stopped but kept until commit.
    FailbackCommitPending,
    /// Failback committed: recovery VM deleted; the primary is ready to be protected again.
    FailedBack,
    /// Protection is being re-enabled after a failback, sending only changed blocks.
    ReverseReplicating,
}

impl ItemState {
    /// Every state, in lifecycle order.
    pub const ALL: [ItemState; 12] = [
        ItemState::Unprotected,
        ItemState::Protecting,
        ItemState::Protected,
        ItemState::FailoverCommitPending,
        ItemState::FailedOver,
        ItemState::FailbackSyncing,
        ItemState::FailbackReady,
        ItemState::FailbackCompleting,
        ItemState::FailbackInterrupted,
        ItemState::FailbackCommitPending,
        ItemState::FailedBack,
        ItemState::ReverseReplicating,
    ];

    /// The lower-case name used in JSON and on the command line, e.g. `"failback_ready"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            ItemState::Unprotected => "unprotected",
            ItemState::Protecting => "protecting",
            ItemState::Protected => "protected",
            ItemState::FailoverCommitPending => "failover_commit_pending",
            ItemState::FailedOver => "failed_over",
            ItemState::FailbackSyncing => "failback_syncing",
            ItemState::FailbackReady => "failback_ready",
            ItemState::FailbackCompleting => "failback_completing",
            ItemState::FailbackInterrupted => "failback_interrupted",
            ItemState::FailbackCommitPending => "failback_commit_pending",
            ItemState::FailedBack => "failed_back",
            ItemState::ReverseReplicating => "reverse_replicating",
        }
    }

    /// The side whose copy runs (or last ran) the workload: the item's active copy.
    pub fn active_side(&self) -> Side {
        match self {
            ItemState::Unprotected
            | ItemState::Protecting
            | ItemState::Protected
            | ItemState::FailbackCommitPending
            | ItemState::FailedBack
            | ItemState::ReverseReplicating => Side::Primary,
            ItemState::FailoverCommitPending
            | ItemState::FailedOver
            | ItemState::FailbackSyncing
            | ItemState::FailbackReady
            | ItemState::FailbackCompleting
            | ItemState::FailbackInterrupted => Side::Recovery,
        }
    }

    /// True while a job owns the item and other commands must wait (only `cancel` is allowed).
    pub fn is_running(&self) -> bool {
        matches!(
            self,
            ItemState::Protecting
                | ItemState::FailbackSyncing
                | ItemState::FailbackCompleting
                | ItemState::ReverseReplicating
        )
    }
}

impl fmt::Display for ItemState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ItemState {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ItemState::ALL
            .into_iter()
            .find(|state| state.as_str() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = ItemState::ALL.iter().map(|st| st.as_str()).collect();
                format!(
                    "unknown lifecycle state {s:?}: expected one of {}",
                    names.join(", ")
                )
            })
    }
}

/// One of the two sites of a protected item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Side {
    /// The on-premises site where the VM normally runs.
    Primary,
    /// The disaster-recovery site.
    Recovery,
}

impl Side {
    /// The lower-case name: `"primary"` or `"recovery"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Side::Primary => "primary",
            Side::Recovery => "recovery",
        }
    }
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Side {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "primary" => Ok(Side::Primary),
            "recovery" => Ok(Side::Recovery),
            _ => Err(format!(
                "unknown side {s:?}: expected \"primary\" or \"recovery\""
            )),
        }
    }
}

/// How a failback moves data to the primary disk (`failback --sync`).
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    Hash,
    serde::Serialize,
    serde::Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum SyncMode {
    /// Copy only the blocks that differ, while the recovery VM keeps running (the default).
    #[default]
    Delta,
    /// Shut the recovery VM down and download every block.
    Full,
}

impl SyncMode {
    /// The lower-case name: `"delta"` or `"full"`.
    pub fn as_str(&self) -> &'static str {
        match self {
            SyncMode::Delta => "delta",
            SyncMode::Full => "full",
        }
    }
}

impl fmt::Display for SyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SyncMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "delta" => Ok(SyncMode::Delta),
            "full" => Ok(SyncMode::Full),
            _ => Err(format!(
                "unknown sync mode {s:?}: expected \"delta\" or \"full\""
            )),
        }
    }
}

/// A lifecycle command a user (or a recovery plan) gives for one VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// `ferry protect`: enable replication.
    Protect,
    /// `ferry replicate`: one replication cycle now.
    Replicate,
    /// `ferry failover`: start the VM at the recovery site.
    Failover,
    /// `ferry commit`: commit a pending failover or failback.
    Commit,
    /// `ferry failback --sync MODE`: bring the VM back to the primary site.
    Failback(SyncMode),
    /// `ferry complete`: phase 2 of a waiting failback.
    Complete,
    /// `ferry cancel`: stop the running or waiting job.
    Cancel,
    /// `ferry reverse-replicate`: protect again after a committed failback.
    ReverseReplicate,
}

impl Command {
    /// The sub-command name on the command line, e.g. `"reverse-replicate"`.
    pub fn cli(&self) -> &'static str {
        match self {
            Command::Protect => "protect",
            Command::Replicate => "replicate",
            Command::Failover => "failover",
            Command::Commit => "commit",
            Command::Failback(_) => "failback",
            Command::Complete => "complete",
            Command::Cancel => "cancel",
            Command::ReverseReplicate => "reverse-replicate",
        }
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.cli())
    }
}

/// How a job that a command started ended (or paused).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The job did all its work.
    Succeeded,
    /// The job paused and waits for the operator (failback phase 1 done).
    Waiting,
    /// The job stopped on an error.
    Failed,
    /// The job was cancelled.
    Cancelled,
    /// The process running the job died.
    Abandoned,
}

/// A command refused in the item's current state; nothing was changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot {command} VM {vm}: it is {state}; {hint}")]
pub struct Refusal {
    /// The VM the command was for.
    pub vm: String,
    /// The refused command, as typed on the command line (see [`Command::cli`]).
    pub command: &'static str,
    /// The state the item is in.
    pub state: ItemState,
    /// What to do instead, naming the `ferry` command that leads onward.
    pub hint: String,
}

/// State the item enters when `cmd`'s job starts, or a refusal naming the state and the command that leads onward.
///
/// For [`Command::Cancel`] the result is the state after cancelling.
pub fn begin(vm: &str, state: ItemState, cmd: Command) -> Result<ItemState, Refusal> {
    use ItemState as S;
    let next = match (cmd, state) {
        (Command::Protect, S::Unprotected) => Some(S::Protecting),
        (Command::Replicate | Command::Failover, S::Protected) => Some(S::Protected),
        (Command::Commit, S::FailoverCommitPending | S::FailbackCommitPending) => Some(state),
        (
            Command::Failback(SyncMode::Delta),
            S::FailedOver | S::FailbackReady | S::FailbackInterrupted,
        ) => Some(S::FailbackSyncing),
        (
            Command::Failback(SyncMode::Full),
            S::FailedOver | S::FailbackReady | S::FailbackInterrupted,
        ) => Some(S::FailbackCompleting),
        (Command::Complete, S::FailbackReady) => Some(S::FailbackCompleting),
        (Command::Cancel, S::FailbackSyncing | S::FailbackReady | S::FailbackCompleting) => {
            Some(S::FailbackInterrupted)
        }
        (Command::Cancel, S::Protecting) => Some(S::Unprotected),
        (Command::Cancel, S::ReverseReplicating) => Some(S::FailedBack),
        (Command::ReverseReplicate, S::FailedBack) => Some(S::ReverseReplicating),
        _ => None,
    };
    next.ok_or_else(|| Refusal {
        vm: vm.to_string(),
        command: cmd.cli(),
        state,
        hint: hint(vm, state, cmd),
    })
}

/// State after the job that `cmd` started from `running` ends with `outcome`.
///
/// `running` is the state [`begin`] returned (or, after `--auto-complete` moved on by itself,
/// `FailbackCompleting`). A `Waiting` outcome only means something for a delta failback's
/// phase 1; any other job that waits keeps the item in `running`. For [`Command::Cancel`]
/// (which runs no job) and for a `running` state the command cannot start from, `running` is
/// returned unchanged.
pub fn finish(running: ItemState, cmd: Command, outcome: Outcome) -> ItemState {
    use ItemState as S;
    use Outcome as O;
    match (cmd, running, outcome) {
        (Command::Protect, S::Protecting, O::Succeeded) => S::Protected,
        (Command::Protect, S::Protecting, O::Waiting) => S::Protecting,
        (Command::Protect, S::Protecting, _) => S::Unprotected,

        (Command::Replicate, S::Protected, _) => S::Protected,

        (Command::Failover, S::Protected, O::Succeeded) => S::FailoverCommitPending,
        (Command::Failover, S::Protected, _) => S::Protected,

        (Command::Commit, S::FailoverCommitPending, O::Succeeded) => S::FailedOver,
        (Command::Commit, S::FailbackCommitPending, O::Succeeded) => S::FailedBack,
        (Command::Commit, S::FailoverCommitPending | S::FailbackCommitPending, _) => running,

        // Phase 1 of a delta failback is done: wait for `complete`.
        (Command::Failback(SyncMode::Delta), S::FailbackSyncing, O::Waiting) => S::FailbackReady,
        // A delta failback's auto-complete may have moved to FailbackCompleting itself.
        (Command::Failback(SyncMode::Delta), S::FailbackSyncing | S::FailbackCompleting, _)
        | (Command::Failback(SyncMode::Full) | Command::Complete, S::FailbackCompleting, _) => {
            match outcome {
                O::Succeeded => S::FailbackCommitPending,
                O::Waiting => running,
                O::Failed | O::Cancelled | O::Abandoned => S::FailbackInterrupted,
            }
        }

        (Command::ReverseReplicate, S::ReverseReplicating, O::Succeeded) => S::Protected,
        (Command::ReverseReplicate, S::ReverseReplicating, O::Waiting) => S::ReverseReplicating,
        (Command::ReverseReplicate, S::ReverseReplicating, _) => S::FailedBack,

        _ => running,
    }
}

/// True while the primary disk may hold a partial copy (a failback started but has not finished).
pub fn primary_disk_may_be_inconsistent(state: ItemState) -> bool {
    matches!(
        state,
        ItemState::FailbackSyncing
            | ItemState::FailbackReady
            | ItemState::FailbackCompleting
            | ItemState::FailbackInterrupted
    )
}

/// True while the recovery VM and its disks exist (from failover until the failback is committed).
pub fn recovery_copy_exists(state: ItemState) -> bool {
    matches!(
        state,
        ItemState::FailoverCommitPending
            | ItemState::FailedOver
            | ItemState::FailbackSyncing
            | ItemState::FailbackReady
            | ItemState::FailbackCompleting
            | ItemState::FailbackInterrupted
            | ItemState::FailbackCommitPending
    )
}

/// What to do instead of `cmd` in `state`: always names the `ferry` command that leads onward.
fn hint(vm: &str, state: ItemState, cmd: Command) -> String {
    use ItemState as S;
    if state.is_running() {
        return format!(
            "a job is running; watch it with `ferry status {vm}` or stop it with `ferry cancel {vm}`"
        );
    }
    if cmd == Command::Cancel {
        return format!("no job is running for it; see where it stands with `ferry status {vm}`");
    }
    match (state, cmd) {
        (S::Unprotected, _) => format!("protect it first with `ferry protect {vm} --to SITE`"),
        (S::Protected, Command::Protect) => {
            format!("it is already protected; replicate now with `ferry replicate {vm}`")
        }
        (S::Protected, _) => format!("it has not failed over; run `ferry failover {vm}` first"),
        (S::FailoverCommitPending, _) => {
            format!("commit the failover first with `ferry commit {vm}`")
        }
        (S::FailedOver, _) => {
            format!("it runs at the recovery site; fail it back with `ferry failback {vm}`")
        }
        (S::FailbackReady, _) => format!("finish the failback first with `ferry complete {vm}`"),
        (S::FailbackInterrupted, _) => {
            format!("resume the failback with `ferry failback {vm}`")
        }
        (S::FailbackCommitPending, _) => format!("commit it with `ferry commit {vm}`"),
        (S::FailedBack, _) => format!("protect it again with `ferry reverse-replicate {vm}`"),
        // Running states are handled above; kept total so no state goes without a hint.
        (S::Protecting | S::FailbackSyncing | S::FailbackCompleting | S::ReverseReplicating, _) => {
            format!("watch it with `ferry status {vm}`")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ItemState as S;

    const ALL_OUTCOMES: [Outcome; 5] = [
        Outcome::Succeeded,
        Outcome::Waiting,
        Outcome::Failed,
        Outcome::Cancelled,
        Outcome::Abandoned,
    ];
    const FAILURES: [Outcome; 3] = [Outcome::Failed, Outcome::Cancelled, Outcome::Abandoned];
    const ALL_COMMANDS: [Command; 9] = [
        Command::Protect,
        Command::Replicate,
        Command::Failover,
        Command::Commit,
        Command::Failback(SyncMode::Delta),
        Command::Failback(SyncMode::Full),
        Command::Complete,
        Command::Cancel,
        Command::ReverseReplicate,
    ];

    fn ok(state: ItemState, cmd: Command) -> ItemState {
        begin("web1", state, cmd).unwrap_or_else(|e| panic!("{cmd:?} in {state:?} refused: {e}"))
    }

    fn refused(state: ItemState, cmd: Command) -> Refusal {
        match begin("web1", state, cmd) {
            Ok(next) => panic!("{cmd:?} in {state:?} allowed (→ {next:?})"),
            Err(r) => r,
        }
    }

    /// The states from which `cmd` may begin, per the rules.
    fn allowed_from(cmd: Command) -> Vec<ItemState> {
        S::ALL
            .into_iter()
            .filter(|s| begin("v", *s, cmd).is_ok())
            .collect()
    }

    #[test]
    fn names_round_trip() {
        for s in S::ALL {
            assert_eq!(s.as_str().parse::<ItemState>().unwrap(), s);
            assert_eq!(s.to_string(), s.as_str());
        }
        assert!("Failed_Over".parse::<ItemState>().is_err());
        let err = "nope".parse::<ItemState>().unwrap_err();
        assert!(
            err.contains("\"nope\"") && err.contains("failback_ready"),
            "{err}"
        );
        for side in [Side::Primary, Side::Recovery] {
            assert_eq!(side.to_string().parse::<Side>().unwrap(), side);
        }
        assert_eq!("delta".parse::<SyncMode>().unwrap(), SyncMode::Delta);
        assert_eq!("full".parse::<SyncMode>().unwrap(), SyncMode::Full);
        assert_eq!(SyncMode::Full.to_string(), "full");
        assert_eq!(SyncMode::default(), SyncMode::Delta);
        assert!("Full".parse::<SyncMode>().unwrap_err().contains("delta"));
    }

    #[test]
    fn all_lists_each_state_once() {
        let mut seen = std::collections::HashSet::new();
        for s in S::ALL {
            assert!(seen.insert(s));
        }
        assert_eq!(seen.len(), 12);
    }

    #[test]
    fn cli_names() {
        let names: Vec<&str> = ALL_COMMANDS.iter().map(|c| c.cli()).collect();
        assert_eq!(
            names,
            [
                "protect",
                "replicate",
                "failover",
                "commit",
                "failback",
                "failback",
                "complete",
                "cancel",
                "reverse-replicate"
            ]
        );
        assert_eq!(Command::ReverseReplicate.to_string(), "reverse-replicate");
    }

    #[test]
    fn protect() {
        assert_eq!(allowed_from(Command::Protect), [S::Unprotected]);
        let running = ok(S::Unprotected, Command::Protect);
        assert_eq!(running, S::Protecting);
        assert_eq!(
            finish(running, Command::Protect, Outcome::Succeeded),
            S::Protected
        );
        for o in FAILURES {
            assert_eq!(finish(running, Command::Protect, o), S::Unprotected);
        }
    }

    #[test]
    fn replicate() {
        assert_eq!(allowed_from(Command::Replicate), [S::Protected]);
        assert_eq!(ok(S::Protected, Command::Replicate), S::Protected);
        for o in ALL_OUTCOMES {
            assert_eq!(finish(S::Protected, Command::Replicate, o), S::Protected);
        }
    }

    #[test]
    fn failover() {
        assert_eq!(allowed_from(Command::Failover), [S::Protected]);
        assert_eq!(ok(S::Protected, Command::Failover), S::Protected);
        assert_eq!(
            finish(S::Protected, Command::Failover, Outcome::Succeeded),
            S::FailoverCommitPending
        );
        for o in [
            Outcome::Waiting,
            Outcome::Failed,
            Outcome::Cancelled,
            Outcome::Abandoned,
        ] {
            assert_eq!(finish(S::Protected, Command::Failover, o), S::Protected);
        }
    }

    #[test]
    fn commit() {
        assert_eq!(
            allowed_from(Command::Commit),
            [S::FailoverCommitPending, S::FailbackCommitPending]
        );
        for (from, to) in [
            (S::FailoverCommitPending, S::FailedOver),
            (S::FailbackCommitPending, S::FailedBack),
        ] {
            assert_eq!(ok(from, Command::Commit), from);
            assert_eq!(finish(from, Command::Commit, Outcome::Succeeded), to);
            for o in [
                Outcome::Waiting,
                Outcome::Failed,
                Outcome::Cancelled,
                Outcome::Abandoned,
            ] {
                assert_eq!(finish(from, Command::Commit, o), from);
            }
        }
    }

    #[test]
    fn failback_delta() {
        let cmd = Command::Failback(SyncMode::Delta);
        assert_eq!(
            allowed_from(cmd),
            [S::FailedOver, S::FailbackReady, S::FailbackInterrupted]
        );
        for from in [S::FailedOver, S::FailbackReady, S::FailbackInterrupted] {
            assert_eq!(ok(from, cmd), S::FailbackSyncing);
        }
        let running = S::FailbackSyncing;
        assert_eq!(finish(running, cmd, Outcome::Waiting), S::FailbackReady);
        assert_eq!(
            finish(running, cmd, Outcome::Succeeded),
            S::FailbackCommitPending
        );
        for o in FAILURES {
            assert_eq!(finish(running, cmd, o), S::FailbackInterrupted);
        }
    }

    #[test]
    fn failback_full() {
        let cmd = Command::Failback(SyncMode::Full);
        assert_eq!(
            allowed_from(cmd),
            [S::FailedOver, S::FailbackReady, S::FailbackInterrupted]
        );
        for from in [S::FailedOver, S::FailbackReady, S::FailbackInterrupted] {
            assert_eq!(ok(from, cmd), S::FailbackCompleting);
        }
        let running = S::FailbackCompleting;
        assert_eq!(
            finish(running, cmd, Outcome::Succeeded),
            S::FailbackCommitPending
        );
        for o in FAILURES {
            assert_eq!(finish(running, cmd, o), S::FailbackInterrupted);
        }
    }

    #[test]
    fn complete() {
        assert_eq!(allowed_from(Command::Complete), [S::FailbackReady]);
        let running = ok(S::FailbackReady, Command::Complete);
        assert_eq!(running, S::FailbackCompleting);
        assert_eq!(
            finish(running, Command::Complete, Outcome::Succeeded),
            S::FailbackCommitPending
        );
        for o in FAILURES {
            assert_eq!(
                finish(running, Command::Complete, o),
                S::FailbackInterrupted
            );
        }
    }

    #[test]
    fn auto_complete_paths_agree() {
        let cmd = Command::Failback(SyncMode::Delta);
        let syncing = ok(S::FailedOver, cmd);
        // Directly: phase 1 and 2 in one job.
        let direct = finish(syncing, cmd, Outcome::Succeeded);
        // Stepwise: phase 1 waits, the engine begins Complete itself, then the job ends.
        let ready = finish(syncing, cmd, Outcome::Waiting);
        assert_eq!(ready, S::FailbackReady);
        let completing = ok(ready, Command::Complete);
        assert_eq!(completing, S::FailbackCompleting);
        assert_eq!(direct, S::FailbackCommitPending);
        assert_eq!(
            finish(completing, Command::Complete, Outcome::Succeeded),
            direct
        );
        assert_eq!(finish(completing, cmd, Outcome::Succeeded), direct);
        // Failure in phase 2, whichever command the engine reports it under.
        for o in FAILURES {
            assert_eq!(finish(completing, cmd, o), S::FailbackInterrupted);
            assert_eq!(
                finish(completing, Command::Complete, o),
                S::FailbackInterrupted
            );
        }
        // Phase 2 never goes back to "ready" (the recovery VM is already shut down).
        assert_eq!(
            finish(completing, cmd, Outcome::Waiting),
            S::FailbackCompleting
        );
    }

    #[test]
    fn cancel() {
        assert_eq!(
            allowed_from(Command::Cancel),
            [
                S::Protecting,
                S::FailbackSyncing,
                S::FailbackReady,
                S::FailbackCompleting,
                S::ReverseReplicating
            ]
        );
        assert_eq!(
            ok(S::FailbackReady, Command::Cancel),
            S::FailbackInterrupted
        );
        assert_eq!(
            ok(S::FailbackSyncing, Command::Cancel),
            S::FailbackInterrupted
        );
        assert_eq!(
            ok(S::FailbackCompleting, Command::Cancel),
            S::FailbackInterrupted
        );
        assert_eq!(ok(S::Protecting, Command::Cancel), S::Unprotected);
        assert_eq!(ok(S::ReverseReplicating, Command::Cancel), S::FailedBack);
        let r = refused(S::Protected, Command::Cancel);
        assert!(r.hint.contains("no job is running for it"), "{r}");
        assert!(r.hint.contains("`ferry status web1`"), "{r}");
        // Cancel runs no job: finishing it changes nothing.
        for s in S::ALL {
            for o in ALL_OUTCOMES {
                assert_eq!(finish(s, Command::Cancel, o), s);
            }
        }
    }

    #[test]
    fn cancel_agrees_with_a_cancelled_job() {
        // Cancelling a running job moves the item where the job's own Cancelled ending does.
        for from in S::ALL {
            for cmd in ALL_COMMANDS {
                let Ok(running) = begin("v", from, cmd) else {
                    continue;
                };
                if cmd == Command::Cancel {
                    continue;
                }
                if let Ok(cancelled) = begin("v", running, Command::Cancel) {
                    assert_eq!(
                        finish(running, cmd, Outcome::Cancelled),
                        cancelled,
                        "{cmd:?} from {from:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn reverse_replicate() {
        assert_eq!(allowed_from(Command::ReverseReplicate), [S::FailedBack]);
        let running = ok(S::FailedBack, Command::ReverseReplicate);
        assert_eq!(running, S::ReverseReplicating);
        assert_eq!(
            finish(running, Command::ReverseReplicate, Outcome::Succeeded),
            S::Protected
        );
        for o in FAILURES {
            assert_eq!(finish(running, Command::ReverseReplicate, o), S::FailedBack);
        }
    }

    #[test]
    fn finish_ignores_states_the_command_cannot_start_from() {
        for s in S::ALL {
            for cmd in ALL_COMMANDS {
                let starts: Vec<ItemState> = S::ALL
                    .into_iter()
                    .filter_map(|from| begin("v", from, cmd).ok())
                    .collect();
                let engine_moved_on =
                    s == S::FailbackCompleting && cmd == Command::Failback(SyncMode::Delta);
                if !starts.contains(&s) && !engine_moved_on {
                    for o in ALL_OUTCOMES {
                        assert_eq!(finish(s, cmd, o), s, "{cmd:?} {o:?} from {s:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn active_side_and_copies() {
        use Side::*;
        let expected = [
            (S::Unprotected, Primary, false, false),
            (S::Protecting, Primary, false, false),
            (S::Protected, Primary, false, false),
            (S::FailoverCommitPending, Recovery, false, true),
            (S::FailedOver, Recovery, false, true),
            (S::FailbackSyncing, Recovery, true, true),
            (S::FailbackReady, Recovery, true, true),
            (S::FailbackCompleting, Recovery, true, true),
            (S::FailbackInterrupted, Recovery, true, true),
            (S::FailbackCommitPending, Primary, false, true),
            (S::FailedBack, Primary, false, false),
            (S::ReverseReplicating, Primary, false, false),
        ];
        for (s, side, inconsistent, copy) in expected {
            assert_eq!(s.active_side(), side, "{s}");
            assert_eq!(primary_disk_may_be_inconsistent(s), inconsistent, "{s}");
            assert_eq!(recovery_copy_exists(s), copy, "{s}");
        }
    }

    #[test]
    fn every_state_is_reachable() {
        let mut seen = vec![S::Unprotected];
        let mut todo = vec![S::Unprotected];
        while let Some(s) = todo.pop() {
            for cmd in ALL_COMMANDS {
                let Ok(running) = begin("v", s, cmd) else {
                    continue;
                };
                let nexts = std::iter::once(running)
                    .chain(ALL_OUTCOMES.iter().map(|o| finish(running, cmd, *o)));
                for n in nexts {
                    if !seen.contains(&n) {
                        seen.push(n);
                        todo.push(n);
                    }
                }
            }
        }
        for s in S::ALL {
            assert!(seen.contains(&s), "{s} unreachable");
        }
    }

    #[test]
    fn refusal_hints() {
        let cases = [
            (
                S::Protected,
                Command::Failback(SyncMode::Delta),
                "it has not failed over; run `ferry failover web1` first",
            ),
            (
                S::FailoverCommitPending,
                Command::Failback(SyncMode::Delta),
                "commit the failover first with `ferry commit web1`",
            ),
            (
                S::Unprotected,
                Command::Replicate,
                "protect it first with `ferry protect web1 --to SITE`",
            ),
            (
                S::FailedOver,
                Command::Replicate,
                "it runs at the recovery site; fail it back with `ferry failback web1`",
            ),
            (
                S::FailbackReady,
                Command::Commit,
                "finish the failback first with `ferry complete web1`",
            ),
            (
                S::FailbackInterrupted,
                Command::Complete,
                "resume the failback with `ferry failback web1`",
            ),
            (
                S::FailbackCommitPending,
                Command::Failover,
                "commit it with `ferry commit web1`",
            ),
            (
                S::FailedBack,
                Command::Protect,
                "protect it again with `ferry reverse-replicate web1`",
            ),
            (
                S::FailedBack,
                Command::Replicate,
                "protect it again with `ferry reverse-replicate web1`",
            ),
        ];
        for (state, cmd, hint) in cases {
            let r = refused(state, cmd);
            assert_eq!(r.hint, hint);
            assert_eq!(r.state, state);
            assert_eq!(r.command, cmd.cli());
            assert_eq!(r.vm, "web1");
        }
        for state in [
            S::Protecting,
            S::FailbackSyncing,
            S::FailbackCompleting,
            S::ReverseReplicating,
        ] {
            let r = refused(state, Command::Replicate);
            assert_eq!(
                r.hint,
                "a job is running; watch it with `ferry status web1` or stop it with `ferry cancel web1`"
            );
        }
        assert_eq!(
            refused(S::Protected, Command::Failback(SyncMode::Full)).to_string(),
            "cannot failback VM web1: it is protected; it has not failed over; run `ferry failover web1` first"
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn command() -> impl Strategy<Value = Command> {
            proptest::sample::select(ALL_COMMANDS.to_vec())
        }

        /// Outcomes, biased towards success so that runs get deep into the lifecycle.
        fn outcome() -> impl Strategy<Value = Outcome> {
            prop_oneof![
                3 => Just(Outcome::Succeeded),
                1 => Just(Outcome::Waiting),
                1 => Just(Outcome::Failed),
                1 => Just(Outcome::Cancelled),
                1 => Just(Outcome::Abandoned),
            ]
        }

        /// A command for `state`: usually one `begin` allows (picked by `pick`), else `any`.
        fn choose(state: ItemState, pick: u8, any: Command) -> Command {
            let allowed: Vec<Command> = ALL_COMMANDS
                .into_iter()
                .filter(|c| begin("vm", state, *c).is_ok())
                .collect();
            if pick.is_multiple_of(4) || allowed.is_empty() {
                any
            } else {
                allowed[pick as usize % allowed.len()]
            }
        }

        fn state() -> impl Strategy<Value = ItemState> {
            proptest::sample::select(S::ALL.to_vec())
        }

        /// Where copies of the VM's disks are and which one holds the latest data.
        #[derive(Debug, Clone, Copy, PartialEq, Eq)]
        struct Disks {
            /// The side whose copy the workload last wrote to, tracked from events only.
            latest: Side,
        }

        impl Disks {
            /// Update from what happened, independently of the state machine's states.
            fn after(self, cmd: Command, outcome: Outcome) -> Disks {
                match (cmd, outcome) {
                    // The VM now runs at the recovery site and writes there.
                    (Command::Failover, Outcome::Succeeded) => Disks {
                        latest: Side::Recovery,
                    },
                    // The primary VM started from a bit-identical copy of the shut-down recovery VM.
                    (Command::Failback(_) | Command::Complete, Outcome::Succeeded) => Disks {
                        latest: Side::Primary,
                    },
                    _ => self,
                }
            }

            /// The copy holding the latest data exists and is consistent in `state`.
            fn check(self, state: ItemState) -> Result<(), TestCaseError> {
                prop_assert_eq!(state.active_side(), self.latest, "in {}", state);
                match self.latest {
                    Side::Primary => prop_assert!(
                        !primary_disk_may_be_inconsistent(state),
                        "latest data on an inconsistent primary disk in {}",
                        state
                    ),
                    Side::Recovery => prop_assert!(
                        recovery_copy_exists(state),
                        "latest data on a missing recovery copy in {}",
                        state
                    ),
                }
                // At least one consistent copy of the latest data, whatever the model says.
                let primary_ok = state.active_side() == Side::Primary
                    && !primary_disk_may_be_inconsistent(state);
                let recovery_ok =
                    state.active_side() == Side::Recovery && recovery_copy_exists(state);
                prop_assert!(
                    primary_ok || recovery_ok,
                    "no consistent latest copy in {}",
                    state
                );
                Ok(())
            }
        }

        /// A transition from `before` to `after` by `cmd` never drops the recovery copy unless
        /// the primary holds the latest data, and only by committing a failback.
        fn check_drop(
            before: ItemState,
            after: ItemState,
            cmd: Command,
        ) -> Result<(), TestCaseError> {
            if recovery_copy_exists(before) && !recovery_copy_exists(after) {
                prop_assert_eq!(before, S::FailbackCommitPending);
                prop_assert_eq!(cmd, Command::Commit);
                prop_assert_eq!(after.active_side(), Side::Primary);
                prop_assert!(!primary_disk_may_be_inconsistent(before));
                prop_assert!(!primary_disk_may_be_inconsistent(after));
            }
            Ok(())
        }

        proptest! {
            #[test]
            fn random_sequences_stay_in_known_states(
                steps in proptest::collection::vec(
                    (any::<u8>(), command(), outcome(), any::<bool>()),
                    0..64,
                )
            ) {
                let mut state = S::Unprotected;
                for (pick, any_cmd, outcome, cancel_midway) in steps {
                    let cmd = choose(state, pick, any_cmd);
                    match begin("vm", state, cmd) {
                        Err(refusal) => prop_assert_eq!(refusal.state, state),
                        Ok(running) => {
                            prop_assert!(S::ALL.contains(&running));
                            let ended = finish(running, cmd, outcome);
                            prop_assert!(S::ALL.contains(&ended));
                            // Someone else cancels while the job runs: same result as the job
                            // ending as cancelled.
                            state = match begin("vm", running, Command::Cancel) {
                                Ok(cancelled) if cancel_midway && cmd != Command::Cancel => {
                                    prop_assert_eq!(
                                        finish(running, cmd, Outcome::Cancelled),
                                        cancelled
                                    );
                                    cancelled
                                }
                                _ => ended,
                            };
                        }
                    }
                }
            }

            #[test]
            fn latest_data_always_has_a_consistent_copy(
                steps in proptest::collection::vec((any::<u8>(), command(), outcome()), 0..64)
            ) {
                let mut state = S::Unprotected;
                let mut disks = Disks { latest: Side::Primary };
                disks.check(state)?;
                for (pick, any_cmd, outcome) in steps {
                    let cmd = choose(state, pick, any_cmd);
                    let Ok(running) = begin("vm", state, cmd) else {
                        continue;
                    };
                    check_drop(state, running, cmd)?;
                    disks.check(running)?;
                    let ended = finish(running, cmd, outcome);
                    check_drop(running, ended, cmd)?;
                    disks = disks.after(cmd, outcome);
                    disks.check(ended)?;
                    state = ended;
                }
            }

            #[test]
            fn refusals_name_the_state_and_a_command(
                state in state(),
                cmd in command(),
                vm in "[a-z][a-z0-9-]{0,10}",
            ) {
                if let Err(refusal) = begin(&vm, state, cmd) {
                    let text = refusal.to_string();
                    prop_assert!(text.contains(state.as_str()), "{}", text);
                    prop_assert!(text.contains("`ferry "), "{}", text);
                    prop_assert!(text.contains(&vm), "{}", text);
                    prop_assert!(text.starts_with(&format!("cannot {} VM {vm}: ", cmd.cli())), "{}", text);
                }
            }
        }
    }
}
