//! Request and response types of every operation. Requests refuse unknown fields, so a typo in
//! a script is an error rather than a silently ignored option.
use ferry_model::{ItemState, Job, Role, SiteRole, SyncMode};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// The installation a client talks to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Info {
    /// The ferry home folder (on the server's machine in server mode).
    pub home: String,
    /// The vault file.
    pub vault: String,
    /// ferry's version.
    pub version: String,
}

/// `ferry site add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteAdd {
    /// Site name.
    pub name: String,
    /// Primary or recovery.
    pub role: SiteRole,
    /// Store URL (`file:///abs/dir`, `az://CONTAINER`, `s3://BUCKET`); default: a folder
    /// under the home.
    #[serde(default)]
    pub store: Option<String>,
    /// Do not open the store to check it (the control plane does not reach it: only agents,
    /// with their own credentials, do).
    #[serde(default)]
    pub no_store_check: bool,
}

/// `ferry site map-network A:SWITCH=B:SWITCH`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkMapReq {
    /// One site.
    pub site: String,
    /// Its switch.
    pub switch: String,
    /// The other site.
    pub to_site: String,
    /// The switch there that NICs on `switch` join (and the other way round).
    pub to_switch: String,
}

/// One entry of a site's network map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkMapping {
    /// A switch of this site.
    pub switch: String,
    /// The other site.
    pub to_site: String,
    /// The switch there.
    pub to_switch: String,
}

/// `ferry site show`: a site with its network map.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct SiteView {
    /// Site name.
    pub name: String,
    /// Primary or recovery.
    pub role: SiteRole,
    /// Store URL.
    pub store: String,
    /// Where NICs on this site's switches go at other sites.
    pub network_map: Vec<NetworkMapping>,
}

/// `ferry host add`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HostAdd {
    /// Host name.
    pub name: String,
    /// Site of the host.
    pub site: String,
    /// `dir` or `qemu`.
    pub driver: ferry_model::DriverKind,
    /// Folder for the host's VMs (default: `<home>/hosts/NAME`).
    #[serde(default)]
    pub root: Option<String>,
    /// Virtual switches of the host.
    #[serde(default)]
    pub switches: Vec<String>,
    /// qemu: `kvm`, `tcg` or `auto`.
    #[serde(default)]
    pub accel: Option<String>,
    /// Served by a `ferry agent` on the host's own machine (then no `root`: the agent has it).
    #[serde(default)]
    pub agent: bool,
}

/// A host as `ferry host show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HostView {
    /// Host name.
    pub name: String,
    /// Site.
    pub site: String,
    /// Driver.
    pub driver: String,
    /// Folder of the host's VMs.
    pub root: String,
    /// Virtual switches.
    pub switches: Vec<String>,
    /// True when the host can be used now.
    pub connected: bool,
    /// qemu: the accelerator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
    /// Hosts served by a `ferry agent`: its connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<AgentView>,
}

/// The connection of an agent host's `ferry agent`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentView {
    /// True while its heartbeats arrive (none missed for the server's agent timeout).
    pub connected: bool,
    /// RFC 3339 time of its last heartbeat (absent before the first).
    pub last_seen: Option<String>,
    /// Its ferry version (absent before the first heartbeat).
    pub version: Option<String>,
}

/// `POST /v1/agent/heartbeat`: an agent says it is alive (and registers with its first).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentHello {
    /// The host it serves.
    pub host: String,
    /// Its ferry version.
    pub version: String,
    /// The driver it runs.
    pub driver: ferry_model::DriverKind,
    /// Its `--root` folder.
    pub root: String,
    /// Changes each time the agent process starts (tasks handed to an earlier process are
    /// handed out again).
    #[serde(default)]
    pub session: Option<String>,
}

/// The control plane's answer to a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentWelcome {
    /// The host as the control plane knows it.
    pub host: ferry_model::Host,
    /// Seconds without a heartbeat after which the host counts as disconnected.
    pub timeout_s: u64,
}

/// One piece of work for an agent (`GET /v1/agent/tasks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentTask {
    /// Task id, to answer with.
    pub id: u64,
    /// The host record (switches, accelerator) the work is for.
    pub host: ferry_model::Host,
    /// What to do.
    pub op: AgentOp,
}

/// Hypervisor work an agent does on its host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentOp {
    /// Is the host usable (its root readable, its programs present)?
    CheckConnected,
    /// Every VM of the host.
    ListVms,
    /// One VM, or null.
    GetVm {
        /// VM name.
        name: String,
    },
    /// Create a stopped VM with zeroed disks.
    CreateVm {
        /// VM name.
        name: String,
        /// Virtual CPUs.
        cpus: u32,
        /// Memory in bytes.
        memory: u64,
        /// Disk sizes in bytes.
        disks: Vec<u64>,
        /// Switch of each NIC.
        nics: Vec<String>,
        /// Boot image (`guest`), if any.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        image: Option<String>,
    },
    /// Delete a VM and its disks.
    DeleteVm {
        /// VM name.
        name: String,
    },
    /// Start a VM.
    StartVm {
        /// VM name.
        name: String,
    },
    /// Stop a VM.
    StopVm {
        /// VM name.
        name: String,
    },
    /// Mark a disk consistent or not.
    SetDiskConsistent {
        /// VM name.
        name: String,
        /// Disk index.
        index: u32,
        /// Consistent?
        consistent: bool,
    },
    /// A disk's change stamp.
    DiskStamp {
        /// VM name.
        name: String,
        /// Disk index.
        index: u32,
    },
    /// Start change tracking on every disk; returns a mark per disk.
    MarkDisks {
        /// VM name.
        name: String,
    },
    /// Move disk data between this host's disks and the store (capture, apply, restore,
    /// scan: see docs/agents.md); answers an [`AgentDataReply`]. Progress goes to
    /// `POST /v1/agent/tasks/{id}/progress` while it runs.
    Data {
        /// The operation (`{"capture"|"apply"|"restore"|"scan"|"points"|"check": {…}}`) with
        /// its maps.
        #[schema(value_type = Object)]
        request: serde_json::Value,
        /// Hash/compress worker threads.
        threads: usize,
        /// Cap on bytes per second crossing between the sites.
        bandwidth: Option<u64>,
        /// The job step's `mid` fault point (tests: an agent whose `FERRY_FAULT` names it
        /// kills itself after the operation's first durable batch).
        #[serde(default)]
        mid_point: Option<String>,
    },
}

/// Byte counters of a data operation so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentCounters {
    /// Bytes read from disks.
    pub read: u64,
    /// Bytes that crossed between the sites.
    pub transferred: u64,
    /// Bytes written to disks.
    pub written: u64,
    /// Progress of the step (bytes).
    pub step_done: u64,
}

/// The control plane's answer to a progress report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct AgentProgressReply {
    /// Stop the operation (the job was cancelled, or nobody waits for it any more).
    pub cancel: bool,
}

/// What a data operation answers (inside [`AgentResult`]'s `ok`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentDataReply {
    /// The operation's result.
    #[schema(value_type = Object)]
    pub out: serde_json::Value,
    /// Notes for the job.
    pub notes: Vec<String>,
    /// Final counters.
    pub counters: AgentCounters,
}

/// An agent's answer to a task: `ok` with the result, or `error` with the message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AgentResult {
    /// The result (JSON of the operation's value).
    #[serde(default)]
    #[schema(value_type = Object)]
    pub ok: Option<serde_json::Value>,
    /// What went wrong, as the user should read it.
    #[serde(default)]
    pub error: Option<String>,
}

/// One disk of a [`VmView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DiskView {
    /// Position of the disk.
    pub index: u32,
    /// Image file on the host.
    pub path: String,
    /// Size in bytes.
    pub size: u64,
    /// `raw` or `qcow2`.
    pub format: String,
    /// False while a sync into it is incomplete (the VM refuses to start).
    pub consistent: bool,
    /// qemu: block node name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// qemu: guest device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// One NIC of a [`VmView`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NicView {
    /// Switch the NIC is attached to.
    pub switch: String,
}

/// A VM copy as `ferry vm show` prints it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VmView {
    /// VM name.
    pub name: String,
    /// Host of this copy.
    pub host: String,
    /// Site of the host.
    pub site: String,
    /// Driver of the host.
    pub driver: String,
    /// `running` or `stopped`.
    pub power: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Disks in index order.
    pub disks: Vec<DiskView>,
    /// NICs.
    pub nics: Vec<NicView>,
    /// qemu: the QMP socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<String>,
}

/// `ferry vm create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmCreate {
    /// VM name.
    pub name: String,
    /// Host to create it on.
    pub host: String,
    /// Disk sizes in bytes.
    pub disks: Vec<u64>,
    /// Switch of each NIC.
    #[serde(default)]
    pub switches: Vec<String>,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Boot image: `guest` boots ferry's test guest (qemu hosts); none: data disks only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// `ferry vm start|stop`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmPower {
    /// True to start, false to stop.
    pub running: bool,
    /// The copy on this host (default: the active copy).
    #[serde(default)]
    pub host: Option<String>,
}

/// Resources of a command that moves data.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DataOpts {
    /// Worker threads (default: the cores of the machine that moves the data).
    #[serde(default)]
    pub threads: Option<usize>,
    /// Cap on bytes transferred between the sites per second.
    #[serde(default)]
    pub bandwidth: Option<u64>,
}

/// `ferry protect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtectReq {
    /// Recovery site.
    pub to: String,
    /// Recovery-point objective in seconds.
    pub rpo_s: u64,
    /// Retention of recovery points in seconds.
    pub retention_s: u64,
    /// Change-detection block size in bytes.
    pub block_size: u64,
    /// Take an app-consistent point when the newest is this old (seconds; `ferry serve`'s
    /// scheduler). None: crash-consistent cycles only.
    #[serde(default)]
    pub app_consistent_every_s: Option<u64>,
    /// Keep app-consistent points this long, beyond `retention_s` (seconds; default 24 h).
    #[serde(default)]
    pub app_retention_s: Option<u64>,
    /// Key file (a path where the data moves) for encrypted replication.
    #[serde(default)]
    pub key: Option<String>,
    /// Id of that key, read from the file by the client: a control plane whose agents move
    /// the data checks it against the VM's and never reads the file.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Threads and bandwidth.
    #[serde(default)]
    pub data: DataOpts,
}

/// `ferry replicate` and `ferry reverse-replicate`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicateReq {
    /// Key file (default: the one given to `protect`).
    #[serde(default)]
    pub key: Option<String>,
    /// Id of that key, read from the file by the client: a control plane whose agents move
    /// the data checks it against the VM's and never reads the file.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Read every block instead of trusting change tracking.
    #[serde(default)]
    pub verify: bool,
    /// Freeze the guest's file systems through its guest agent around the snapshot (an
    /// app-consistent point; crash-consistent with a job note when the guest cannot freeze).
    #[serde(default)]
    pub app_consistent: bool,
    /// Threads and bandwidth.
    #[serde(default)]
    pub data: DataOpts,
}

/// How a failover treats the primary.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum FailoverMode {
    /// Stop the primary and replicate its last changes first: no data loss.
    #[default]
    Planned,
    /// Recover from an existing point without touching the primary.
    Unplanned,
}

/// `ferry failover`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverReq {
    /// Planned (default) or unplanned.
    #[serde(default)]
    pub mode: FailoverMode,
    /// Unplanned or test: the point id (default: the latest). While a failover awaits
    /// commit: the point to move the recovery copy to.
    #[serde(default)]
    pub point: Option<i64>,
    /// Take the newest app-consistent point (instead of `point`).
    #[serde(default)]
    pub latest_app_consistent: bool,
    /// Recovery host (default: the first host of the recovery site).
    #[serde(default)]
    pub host: Option<String>,
    /// A test failover (a drill): a throw-away copy on an isolated switch; the VM stays
    /// protected. `mode` is then ignored.
    #[serde(default)]
    pub test: bool,
    /// Stop and delete the VM's test copy.
    #[serde(default)]
    pub cleanup_test: bool,
    /// Test failover: the isolated switch of the copy's NICs (default `ferry-test`).
    #[serde(default)]
    pub switch: Option<String>,
    /// Key file of an encrypted VM.
    #[serde(default)]
    pub key: Option<String>,
    /// Id of that key, read from the file by the client: a control plane whose agents move
    /// the data checks it against the VM's and never reads the file.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Threads and bandwidth.
    #[serde(default)]
    pub data: DataOpts,
}

/// `ferry failback`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FailbackReq {
    /// `delta` (default) or `full`.
    #[serde(default)]
    pub sync: Option<SyncMode>,
    /// Alternate primary host.
    #[serde(default)]
    pub host: Option<String>,
    /// Create the VM on the target host if it is missing.
    #[serde(default)]
    pub create_vm: bool,
    /// Key file of an encrypted VM.
    #[serde(default)]
    pub key: Option<String>,
    /// Id of that key, read from the file by the client: a control plane whose agents move
    /// the data checks it against the VM's and never reads the file.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Run phase 2 right after phase 1.
    #[serde(default)]
    pub auto_complete: bool,
    /// Only predict what would move.
    #[serde(default)]
    pub dry_run: bool,
    /// Read every block and compare hashes after the sync.
    #[serde(default)]
    pub verify: bool,
    /// Threads and bandwidth.
    #[serde(default)]
    pub data: DataOpts,
}

/// `ferry complete`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CompleteReq {
    /// Key file (default: the one given to `protect`).
    #[serde(default)]
    pub key: Option<String>,
    /// Id of that key, read from the file by the client: a control plane whose agents move
    /// the data checks it against the VM's and never reads the file.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Read every block and compare hashes after the sync.
    #[serde(default)]
    pub verify: bool,
    /// Threads and bandwidth.
    #[serde(default)]
    pub data: DataOpts,
}

/// `ferry verify`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyReq {
    /// Point id (default: the newest).
    #[serde(default)]
    pub point: Option<i64>,
    /// Key file of an encrypted VM.
    #[serde(default)]
    pub key: Option<String>,
    /// Id of that key, read from the file by the client: a control plane whose agents move
    /// the data checks it against the VM's and never reads the file.
    #[serde(default)]
    pub key_id: Option<String>,
}

/// What a command that runs a job returns: the job (or a dry run's prediction) and the notes
/// for the operator that came up on the way (e.g. the failback recommendation).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct RunReply {
    /// The job that ran, waits or was continued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// A failback dry run's prediction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<DryRun>,
    /// Notes for the operator (printed on stderr by the CLI).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
}

/// Per-disk prediction of a dry run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DryRunDisk {
    /// Disk index.
    pub index: u32,
    /// Blocks on the disk.
    pub blocks: u64,
    /// Blocks that differ and would move.
    pub blocks_to_move: u64,
    /// Bytes those blocks hold.
    pub bytes_to_move: u64,
}

/// What a failback would do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct DryRun {
    /// VM name.
    pub vm: String,
    /// Sync mode evaluated.
    pub sync: SyncMode,
    /// Target host.
    pub host: String,
    /// Per-disk figures.
    pub disks: Vec<DryRunDisk>,
    /// Total blocks that would move.
    pub blocks_to_move: u64,
    /// Total bytes that would move.
    pub bytes_to_move: u64,
    /// Bytes ferry had to read to find out.
    pub bytes_read: u64,
    /// Recommended sync mode.
    pub recommended_sync: SyncMode,
    /// Why.
    pub reason: String,
}

/// Result of `ferry verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct VerifyReport {
    /// VM name.
    pub vm: String,
    /// Point checked.
    pub point: i64,
    /// Data blocks read back and checked.
    pub blocks: u64,
    /// Bytes of those blocks.
    pub bytes: u64,
    /// True when every block matched its hash.
    pub ok: bool,
}

/// How far a VM's newest recovery point lags behind its RPO target (server mode).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct RpoView {
    /// The target in seconds.
    pub target_s: u64,
    /// Age of the newest point in seconds (absent before the first point).
    pub last_point_age_s: Option<u64>,
    /// True while the newest point is younger than the target (plus a grace for the cycle).
    pub healthy: bool,
}

/// `ferry status VM`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct StatusView {
    /// VM name.
    pub vm: String,
    /// Lifecycle state.
    pub state: ItemState,
    /// `primary` or `recovery`.
    pub active_site: String,
    /// The job running, waiting or last interrupted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// Replication health against the RPO (server mode, protected VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpo: Option<RpoView>,
    /// The VM's test copy (a drill), while one exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<TestView>,
    /// While a failover awaits commit: the point the recovery copy runs from (`ferry
    /// failover VM --point ID` changes it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_point: Option<i64>,
}

/// A running test copy of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TestView {
    /// Recovery host it runs on.
    pub host: String,
    /// Its VM name there.
    pub name: String,
    /// The recovery point it was started from.
    pub point: i64,
    /// RFC 3339 time it was started.
    pub started_at: String,
    /// The isolated switch of its NICs.
    pub switch: String,
}

/// What runs around one group of a plan when the plan fails over or back
/// (`ferry plan create … --group VM,VM --pre CMD --post CMD --timeout 5m --pause TEXT --parallel N`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSteps {
    /// Shell command (`sh -c`) run before the group's VMs; a failure stops the plan there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre: Option<String>,
    /// Shell command run after the group's VMs; a failure stops the plan there.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub post: Option<String>,
    /// Longest a pre or post command may run, in seconds (default 300); then it is killed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<u64>,
    /// A manual step after the group: the plan stops, showing this text, until
    /// `ferry plan resume NAME`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<String>,
    /// VMs of the group that run at once (default 1: one after another).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<u32>,
}

/// `ferry plan create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanCreate {
    /// Plan name.
    pub name: String,
    /// Groups of VM names, in order.
    pub groups: Vec<Vec<String>>,
    /// Steps around each group, in the groups' order (missing entries: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<GroupSteps>,
}

/// A plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct PlanView {
    /// Plan name.
    pub name: String,
    /// Groups of VM names, in order.
    pub groups: Vec<Vec<String>>,
    /// Steps around each group (absent when no group has any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub steps: Vec<GroupSteps>,
    /// What the plan's last run did: `{"action","state":"paused"|"failed"|"succeeded",
    /// "next_group"?,"message"?,"at"}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_run: Option<serde_json::Value>,
}

/// A pre or post command of a plan group, as it ran.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct HookRun {
    /// Group number (1-based).
    pub group: usize,
    /// `pre` or `post`.
    pub step: String,
    /// The command.
    pub command: String,
    /// Its exit code (absent when it was killed: timeout or signal).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// True when it ran past its timeout and was killed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub timed_out: bool,
    /// Its output (stdout and stderr; the last 16 KiB).
    pub output: String,
    /// How long it ran, in milliseconds.
    pub elapsed_ms: u64,
}

/// What a plan command does to each VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PlanActionKind {
    /// Fail every VM over.
    Failover,
    /// Fail every VM back.
    Failback,
    /// Phase 2 of every waiting failback.
    Complete,
    /// Commit every VM.
    Commit,
    /// Protect every failed-back VM again.
    ReverseReplicate,
}

/// `ferry plan failover|failback|complete|commit|reverse-replicate`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanRunReq {
    /// The action.
    pub action: PlanActionKind,
    /// failover: planned or unplanned.
    #[serde(default)]
    pub mode: FailoverMode,
    /// failover: the recovery host of every VM.
    #[serde(default)]
    pub host: Option<String>,
    /// failover: a drill (a test copy of every VM; see `FailoverReq::test`).
    #[serde(default)]
    pub test: bool,
    /// failover: remove every VM's test copy.
    #[serde(default)]
    pub cleanup_test: bool,
    /// failover with `test`: the isolated switch (default `ferry-test`).
    #[serde(default)]
    pub switch: Option<String>,
    /// failback: its options (`host` there is the alternate primary host).
    #[serde(default)]
    pub failback: Option<FailbackReq>,
    /// complete: compare every block after the sync.
    #[serde(default)]
    pub verify: bool,
    /// Key file of encrypted VMs.
    #[serde(default)]
    pub key: Option<String>,
    /// Id of that key, read from the file by the client: a control plane whose agents move
    /// the data checks it against the VM's and never reads the file.
    #[serde(default)]
    pub key_id: Option<String>,
    /// Threads and bandwidth.
    #[serde(default)]
    pub data: DataOpts,
}

/// What happened to one VM of a plan run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlanStep {
    /// VM name.
    pub vm: String,
    /// The job that ran (absent when skipped or for a dry run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// The dry run's prediction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dry_run: Option<DryRun>,
    /// True when the VM had already been through this action.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
}

fn one() -> usize {
    1
}

/// Result of a plan command: per group, per VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PlanRun {
    /// Plan name.
    pub plan: String,
    /// `failover`, `failback`, `complete`, `commit` or `reverse-replicate`.
    pub action: String,
    /// Number (1-based) of the plan's group that `groups[0]` is: 1, or where a resumed run
    /// started.
    #[serde(default = "one")]
    pub first_group: usize,
    /// Groups in order (those it reached).
    pub groups: Vec<Vec<PlanStep>>,
    /// The groups' pre and post commands, as they ran.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hooks: Vec<HookRun>,
    /// Set when the run stopped at a manual step: its text; `ferry plan resume` continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub paused: Option<String>,
}

/// `ferry token new`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenNew {
    /// Token name.
    pub name: String,
    /// What it may do.
    pub role: Role,
    /// Agent tokens: the host it acts as.
    #[serde(default)]
    pub host: Option<String>,
}

/// A new token with its secret (shown once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenCreated {
    /// Token name.
    pub name: String,
    /// Role.
    pub role: Role,
    /// Agent tokens: the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The secret: pass it as `--token` / `FERRY_TOKEN`; only its hash is kept.
    pub token: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_refuse_unknown_fields() {
        let e = serde_json::from_str::<FailbackReq>(r#"{"sync":"delta","sink":"full"}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field `sink`"), "{e}");
        let ok: FailbackReq = serde_json::from_str(r#"{"sync":"full"}"#).unwrap();
        assert_eq!(ok.sync, Some(SyncMode::Full));
    }

    #[test]
    fn a_skipped_plan_step_round_trips() {
        let s = PlanStep {
            vm: "a".into(),
            job: None,
            dry_run: None,
            skipped: true,
        };
        let back: PlanStep = serde_json::from_value(serde_json::to_value(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }
}
