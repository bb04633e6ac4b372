//! ferry's operations as one interface, [`Api`], shared by the CLI, `ferry serve` and (later)
//! the agents: every request and response type (serde, with an OpenAPI schema), the error
//! every operation returns ([`ApiError`]), and [`client::Client`], the HTTP implementation that
//! talks to a running `ferry serve`. The in-process implementation over the engine lives in
//! `ferry-server`, so embedded mode and server mode run the same code behind the same calls.
pub mod error;
pub mod types;

#[cfg(feature = "client")]
pub mod client;

pub use error::{ApiError, ErrorKind};
pub use ferry_model::{Host, Job, RecoveryPoint, Role, Site, TokenInfo};
pub use types::*;

/// Result of every operation.
pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// Called with each snapshot of a job while it runs (progress bars).
pub type JobObserver<'a> = &'a mut dyn FnMut(&Job);

/// Every operation of ferry, as the CLI's commands use them (CLI.md is the contract). Names
/// are validated by the implementation; nothing changes when an operation is refused.
pub trait Api {
    /// The installation: its home, vault and version.
    fn info(&self) -> ApiResult<Info>;

    /// Every site.
    fn sites(&self) -> ApiResult<Vec<Site>>;
    /// Adds a site (admin).
    fn add_site(&self, req: &SiteAdd) -> ApiResult<Site>;
    /// One site with its network map.
    fn site(&self, name: &str) -> ApiResult<SiteView>;
    /// Maps a switch of one site to a switch of another, both ways (admin).
    fn map_network(&self, req: &NetworkMapReq) -> ApiResult<SiteView>;

    /// Every host with its connection state.
    fn hosts(&self) -> ApiResult<Vec<HostView>>;
    /// One host.
    fn host(&self, name: &str) -> ApiResult<HostView>;
    /// Adds a host (admin).
    fn add_host(&self, req: &HostAdd) -> ApiResult<HostView>;

    /// Every VM on every connected host.
    fn vms(&self) -> ApiResult<Vec<VmView>>;
    /// One VM: the copy on `host`, or the active copy.
    fn vm(&self, name: &str, host: Option<&str>) -> ApiResult<VmView>;
    /// Creates a stopped VM with zeroed disks (admin).
    fn create_vm(&self, req: &VmCreate) -> ApiResult<VmView>;
    /// Starts (`running`) or stops a VM copy; idempotent (operator).
    fn set_power(&self, name: &str, req: &VmPower) -> ApiResult<VmView>;

    /// Enables replication and takes the first recovery point (operator).
    fn protect(&self, vm: &str, req: &ProtectReq) -> ApiResult<RunReply>;
    /// One replication cycle now (operator).
    fn replicate(&self, vm: &str, req: &ReplicateReq) -> ApiResult<RunReply>;
    /// Protects a failed-back VM again, sending only changes (operator).
    fn reverse_replicate(&self, vm: &str, req: &ReplicateReq) -> ApiResult<RunReply>;
    /// Recovery points of a VM, newest first.
    fn points(&self, vm: &str) -> ApiResult<Vec<RecoveryPoint>>;
    /// Fails a VM over (operator).
    fn failover(&self, vm: &str, req: &FailoverReq) -> ApiResult<RunReply>;
    /// Fails a VM back, or predicts it with `dry_run` (operator).
    fn failback(&self, vm: &str, req: &FailbackReq) -> ApiResult<RunReply>;
    /// Phase 2 of a waiting failback (operator).
    fn complete(&self, vm: &str, req: &CompleteReq) -> ApiResult<RunReply>;
    /// Cancels the running or waiting job of a VM (operator).
    fn cancel(&self, vm: &str) -> ApiResult<RunReply>;
    /// Commits a failover or failback (operator).
    fn commit(&self, vm: &str) -> ApiResult<RunReply>;
    /// Reads back every block of a point (operator: it may need the VM's key).
    fn verify(&self, vm: &str, req: &VerifyReq) -> ApiResult<VerifyReport>;

    /// State of one VM (protected or not).
    fn status(&self, vm: &str) -> ApiResult<StatusView>;
    /// State of every protected VM.
    fn statuses(&self) -> ApiResult<Vec<StatusView>>;
    /// Unfinished jobs, or every job with `all`.
    fn jobs(&self, all: bool) -> ApiResult<Vec<Job>>;
    /// One job.
    fn job(&self, id: i64) -> ApiResult<Job>;
    /// Follows a job until it is no longer running, calling `on` with each new snapshot;
    /// returns the last one.
    fn watch_job(&self, id: i64, on: JobObserver<'_>) -> ApiResult<Job>;

    /// Creates a recovery plan (operator).
    fn create_plan(&self, req: &PlanCreate) -> ApiResult<PlanView>;
    /// One plan.
    fn plan(&self, name: &str) -> ApiResult<PlanView>;
    /// Runs a plan action on every VM of the plan, group by group (operator).
    fn run_plan(&self, name: &str, req: &PlanRunReq) -> ApiResult<PlanRun>;
    /// Continues a plan run that stopped at a group's pause (`ferry plan resume`).
    fn resume_plan(&self, name: &str) -> ApiResult<PlanRun>;

    /// Creates a token and returns its secret, shown only here (admin).
    fn token_new(&self, req: &TokenNew) -> ApiResult<TokenCreated>;
    /// Every token (never their secrets) (admin).
    fn tokens(&self) -> ApiResult<Vec<TokenInfo>>;
    /// Revokes a token (admin).
    fn token_revoke(&self, name: &str) -> ApiResult<TokenInfo>;
}
