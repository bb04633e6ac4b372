//! The things ferry manages: sites, hosts, protected items, recovery points and jobs.
use serde::{Deserialize, Serialize};
use std::path::PathBuf;

use crate::lifecycle::ItemState;

/// Role of a site: where VMs normally run, or where they are recovered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SiteRole {
    /// The on-premises site where protected VMs normally run.
    Primary,
    /// The disaster-recovery site that holds the store of replica data.
    Recovery,
}

impl SiteRole {
    /// Lower-case name used on the command line and in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            SiteRole::Primary => "primary",
            SiteRole::Recovery => "recovery",
        }
    }
}

impl std::str::FromStr for SiteRole {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "primary" => Ok(SiteRole::Primary),
            "recovery" => Ok(SiteRole::Recovery),
            _ => Err(format!("unknown site role {s:?}: use primary or recovery")),
        }
    }
}

/// A place VMs run, with its store of replica data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Site {
    /// Unique site name.
    pub name: String,
    /// Primary or recovery.
    pub role: SiteRole,
    /// Store URL (`file:///abs/dir`, `az://container`, `s3://bucket`).
    pub store: String,
}

/// Which hypervisor driver a host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DriverKind {
    /// Built-in driver: a VM is a folder with `vm.json` and raw disk images; no hypervisor needed.
    Dir,
    /// Real QEMU processes driven over QMP.
    Qemu,
}

impl DriverKind {
    /// Lower-case name used on the command line and in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            DriverKind::Dir => "dir",
            DriverKind::Qemu => "qemu",
        }
    }
}

impl std::str::FromStr for DriverKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "dir" => Ok(DriverKind::Dir),
            "qemu" => Ok(DriverKind::Qemu),
            _ => Err(format!("unknown driver {s:?}: use dir or qemu")),
        }
    }
}

/// One hypervisor endpoint at a site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Host {
    /// Unique host name.
    pub name: String,
    /// The site the host belongs to.
    pub site: String,
    /// Driver used to manage VMs on it.
    pub driver: DriverKind,
    /// Folder where the driver keeps VMs.
    #[schema(value_type = String)]
    pub root: PathBuf,
    /// Names of the virtual switches available on the host.
    pub switches: Vec<String>,
    /// QEMU accelerator of the host's VMs (`kvm`, `tcg` or `auto`; `None`: auto).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// True when a `ferry agent` on the host's own machine does its disk and hypervisor work
    /// (`ferry host add … --agent`); `root` is then the agent's `--root`, as it reported it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent: bool,
}

/// A VM under ferry's care.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProtectedItem {
    /// VM name.
    pub vm: String,
    /// Host of the primary copy (changes after a failback to an alternate host).
    pub primary_host: String,
    /// Site that keeps recovery points and runs the VM after failover.
    pub recovery_site: String,
    /// Host of the recovery copy while one exists.
    pub recovery_host: Option<String>,
    /// Lifecycle state.
    pub state: ItemState,
    /// Change-detection block size in bytes.
    pub block_size: u64,
    /// Target recovery-point objective in seconds.
    pub rpo_secs: u64,
    /// Recovery-point retention in seconds.
    pub retention_secs: u64,
    /// The job currently running or waiting for this item, if any.
    pub job: Option<i64>,
    /// Unix time (seconds) of the last failover.
    pub failed_over_at: Option<i64>,
}

/// What produced a recovery point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PointKind {
    /// A replication cycle from the primary copy.
    Replication,
    /// The recovery copy's final state captured by a failback (what the primary now holds).
    Failback,
}

/// What a point's disks hold: a crash's state, or the state of quiesced file systems.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Consistency {
    /// As if the VM had lost power at that moment (journals replay on boot).
    #[default]
    Crash,
    /// Taken while the guest agent held the guest's file systems frozen (flushed, quiet).
    App,
}

impl Consistency {
    /// `app` or `crash`.
    pub fn as_str(self) -> &'static str {
        match self {
            Consistency::Crash => "crash",
            Consistency::App => "app",
        }
    }
}

/// A recovery point as recorded in the vault.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RecoveryPoint {
    /// Point id (unique per installation).
    pub id: i64,
    /// VM the point belongs to.
    pub vm: String,
    /// RFC 3339 creation time.
    pub created_at: String,
    /// What produced it.
    pub kind: PointKind,
    /// Sum of disk sizes in bytes.
    pub size: u64,
    /// Bytes of non-zero blocks.
    pub data_bytes: u64,
    /// Key of the manifest object in the store.
    pub manifest: String,
    /// Crash- or app-consistent.
    #[serde(default)]
    pub consistency: Consistency,
}

/// Kind of durable job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    /// Enable replication and take the first recovery point.
    Protect,
    /// One replication cycle.
    Replicate,
    /// Fail over to the recovery site.
    Failover,
    /// Fail back to the primary site.
    Failback,
    /// Commit a failover or failback.
    Commit,
    /// Protect again after a committed failback, sending only changes.
    ReverseReplicate,
}

impl JobKind {
    /// Lower-case name used in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobKind::Protect => "protect",
            JobKind::Replicate => "replicate",
            JobKind::Failover => "failover",
            JobKind::Failback => "failback",
            JobKind::Commit => "commit",
            JobKind::ReverseReplicate => "reverse_replicate",
        }
    }
}

impl std::str::FromStr for JobKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "protect" => JobKind::Protect,
            "replicate" => JobKind::Replicate,
            "failover" => JobKind::Failover,
            "failback" => JobKind::Failback,
            "commit" => JobKind::Commit,
            "reverse_replicate" => JobKind::ReverseReplicate,
            _ => return Err(format!("unknown job kind {s:?}")),
        })
    }
}

/// State of a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Created, not started.
    Queued,
    /// A process is working on it.
    Running,
    /// Paused until the operator continues it (e.g. `ferry complete`).
    Waiting,
    /// Finished successfully.
    Succeeded,
    /// Stopped by an error.
    Failed,
    /// Stopped by `ferry cancel` (resumable where the workflow allows).
    Cancelled,
}

impl JobState {
    /// Lower-case name used in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Waiting => "waiting",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }

    /// True once the job can no longer make progress on its own.
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            JobState::Succeeded | JobState::Failed | JobState::Cancelled
        )
    }
}

impl std::str::FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "queued" => JobState::Queued,
            "running" => JobState::Running,
            "waiting" => JobState::Waiting,
            "succeeded" => JobState::Succeeded,
            "failed" => JobState::Failed,
            "cancelled" => JobState::Cancelled,
            _ => return Err(format!("unknown job state {s:?}")),
        })
    }
}

/// One step of a job with its byte progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Step {
    /// Human-readable step name.
    pub name: String,
    /// Same vocabulary as jobs: queued, running, succeeded, failed, cancelled.
    pub state: JobState,
    /// Bytes processed so far.
    pub bytes_done: u64,
    /// Bytes this step will process (0 when it moves no data).
    pub bytes_total: u64,
    /// Wall-clock milliseconds the step ran (over every run of the job), once it ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_ms: Option<u64>,
}

/// A durable, observable unit of work.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Job {
    /// Job id.
    pub id: i64,
    /// What the job does.
    pub kind: JobKind,
    /// VM it works on.
    pub vm: String,
    /// Current state.
    pub state: JobState,
    /// Steps in order.
    pub steps: Vec<Step>,
    /// Bytes read from disks.
    pub bytes_read: u64,
    /// Payload bytes that crossed between the sites (after compression).
    pub bytes_transferred: u64,
    /// Bytes written to disks.
    pub bytes_written: u64,
    /// RFC 3339 start time.
    pub started_at: String,
    /// RFC 3339 end time, once final (null before).
    pub ended_at: Option<String>,
    /// Error message of a failed or cancelled job.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Downtime of the workload in milliseconds (failback phase 2, failover).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downtime_ms: Option<u64>,
    /// What the job wants the user to know (e.g. change tracking could not be trusted and
    /// a disk was hash-scanned instead).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// What an API token may do (`ferry token new NAME --role ROLE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything, changes nothing.
    Viewer,
    /// Also runs protect, replicate, failover, failback, complete, cancel, commit and plans.
    Operator,
    /// Also changes sites, hosts, VMs and tokens.
    Admin,
    /// A host's agent: acts only as its own host.
    Agent,
}

impl Role {
    /// Lower-case name used on the command line and in JSON.
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
            Role::Agent => "agent",
        }
    }

    /// True when a token of this role may do what `needed` may do. Viewer < operator < admin;
    /// an agent token is only good for its host's agent requests.
    pub fn allows(&self, needed: Role) -> bool {
        fn rank(r: Role) -> Option<u8> {
            match r {
                Role::Viewer => Some(0),
                Role::Operator => Some(1),
                Role::Admin => Some(2),
                Role::Agent => None,
            }
        }
        match (rank(*self), rank(needed)) {
            (Some(a), Some(b)) => a >= b,
            (None, None) => true,
            _ => false,
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "viewer" => Role::Viewer,
            "operator" => Role::Operator,
            "admin" => Role::Admin,
            "agent" => Role::Agent,
            _ => {
                return Err(format!(
                    "unknown role {s:?}: use viewer, operator, admin or agent"
                ))
            }
        })
    }
}

/// An API token as the vault keeps it (only a hash of its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenInfo {
    /// Unique token name.
    pub name: String,
    /// What the token may do.
    pub role: Role,
    /// For agent tokens: the one host the token acts as.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// RFC 3339 creation time.
    pub created_at: String,
}

/// Formats Unix seconds as an RFC 3339 UTC timestamp (`2026-11-26T11:25:18Z`).
pub fn rfc3339(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        (secs / 60) % 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_795_692_318), "2026-11-26T11:25:18Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
    }

    #[test]
    fn enums_round_trip_through_their_names() {
        for k in [
            JobKind::Protect,
            JobKind::Replicate,
            JobKind::Failover,
            JobKind::Failback,
            JobKind::Commit,
            JobKind::ReverseReplicate,
        ] {
            assert_eq!(k.as_str().parse::<JobKind>().unwrap(), k);
        }
        assert_eq!("recovery".parse::<SiteRole>().unwrap(), SiteRole::Recovery);
        assert!("qemu".parse::<DriverKind>().is_ok());
        assert!("hyperv".parse::<DriverKind>().is_err());
        for r in [Role::Viewer, Role::Operator, Role::Admin, Role::Agent] {
            assert_eq!(r.as_str().parse::<Role>().unwrap(), r);
        }
    }

    #[test]
    fn roles_are_ordered_and_agents_stand_apart() {
        assert!(Role::Admin.allows(Role::Operator));
        assert!(Role::Operator.allows(Role::Viewer));
        assert!(!Role::Viewer.allows(Role::Operator));
        assert!(!Role::Operator.allows(Role::Admin));
        assert!(!Role::Agent.allows(Role::Viewer));
        assert!(!Role::Admin.allows(Role::Agent));
        assert!(Role::Agent.allows(Role::Agent));
    }
}
