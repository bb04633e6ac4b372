//! Command-line definitions (CLI.md is the contract) and dispatch to the engine.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_api::*;
use ferry_engine::Engine;
use ferry_model::{
    parse_bandwidth, parse_duration, parse_size, DriverKind, JobState, Role, SiteRole, SyncMode,
};
use serde_json::json;

use crate::output;

/// ferry — site recovery for virtual machines: replicate, fail over, and fail back with minimal
/// downtime and data movement.
///
/// Example (a first look, on the built-in `dir` driver):
///   ferry demo
#[derive(Parser, Debug)]
#[command(name = "ferry", version, about, long_about = None, after_help = "Quick start:\n  ferry init\n  ferry site add prim --role primary && ferry site add dr --role recovery\n  ferry host add h1 --site prim --driver dir --switch lan\n  ferry host add r1 --site dr --driver dir --switch lan\n  ferry vm create web1 --host h1 --disk 1GiB --switch lan\n  ferry protect web1 --to dr && ferry failover web1 --planned && ferry commit web1\n  ferry failback web1 && ferry complete web1 && ferry commit web1 && ferry reverse-replicate web1")]
pub struct Cli {
    /// ferry home (vault, local stores, dir-driver hosts)
    #[arg(long, global = true, env = "FERRY_HOME")]
    pub home: Option<PathBuf>,
    /// Talk to a running `ferry serve` (its URL, e.g. http://127.0.0.1:7450) instead of an
    /// embedded installation
    #[arg(long, global = true, env = "FERRY_SERVER")]
    pub server: Option<String>,
    /// API token for --server (`ferry token new`)
    #[arg(long, global = true, env = "FERRY_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Trust this certificate (PEM: the server's own, or its CA's) for an https:// --server
    #[arg(long, global = true, env = "FERRY_CA_CERT")]
    pub ca_cert: Option<PathBuf>,
    /// Print exactly one JSON document on stdout
    #[arg(long, global = true)]
    pub json: bool,
    /// True when --home was given on the command line: it then wins over FERRY_SERVER from
    /// the environment (e.g. `ferry --home /srv/ferry token new …` on the server's machine).
    #[arg(skip)]
    pub home_flag: bool,
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Flags for commands that move data.
#[derive(Args, Debug, Clone)]
pub struct DataFlags {
    /// Worker threads for reading, hashing and compressing, and packs uploaded at once to a
    /// network store (default: number of cores)
    #[arg(long)]
    pub threads: Option<usize>,
    /// Cap on bytes transferred between sites per second, e.g. 100MiB/s
    #[arg(long, value_parser = parse_bandwidth_arg)]
    pub bandwidth: Option<u64>,
}

/// Flags of `failback` (for one VM, or for every VM of a plan).
#[derive(Args, Debug, Clone)]
pub struct FailbackFlags {
    /// delta or full
    #[arg(long, value_parser = ["delta", "full"])]
    pub sync: Option<String>,
    /// Fail back to this (alternate) host instead of the original one
    #[arg(long)]
    pub host: Option<String>,
    /// Create the VM on the target host if it does not exist
    #[arg(long)]
    pub create_vm: bool,
    /// Key file (`ferry key new FILE`); required for failover, failback and verify of an encrypted VM
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Run phase 2 right after phase 1 (for a plan: group by group)
    #[arg(long)]
    pub auto_complete: bool,
    /// Report what would move and change nothing
    #[arg(long)]
    pub dry_run: bool,
    /// Read every recovery block instead of trusting change tracking, and after the final
    /// sync re-read the primary disks and compare every block hash
    #[arg(long)]
    pub verify: bool,
    #[command(flatten)]
    pub data: DataFlags,
}

impl FailbackFlags {
    fn req(&self) -> Result<FailbackReq> {
        let sync = self
            .sync
            .as_deref()
            .map(|s| s.parse::<SyncMode>())
            .transpose()
            .map_err(anyhow::Error::msg)?;
        Ok(FailbackReq {
            sync,
            host: self.host.clone(),
            create_vm: self.create_vm,
            key: key_arg(&self.key),
            key_id: key_id_arg(&self.key)?,
            auto_complete: self.auto_complete,
            dry_run: self.dry_run,
            verify: self.verify,
            data: self.data.opts(),
        })
    }
}

impl DataFlags {
    fn opts(&self) -> DataOpts {
        DataOpts {
            threads: self.threads.map(|t| t.max(1)),
            bandwidth: self.bandwidth,
        }
    }
}

/// A `--key FILE` as the API takes it: an absolute path (resolved against this directory).
fn key_arg(key: &Option<PathBuf>) -> Option<String> {
    key.as_ref().map(|p| {
        let abs = if p.is_absolute() {
            p.clone()
        } else {
            std::env::current_dir()
                .map(|c| c.join(p))
                .unwrap_or_else(|_| p.clone())
        };
        abs.display().to_string()
    })
}

/// The id of a `--key FILE`, read here: a control plane whose agents move the data checks it
/// and never reads the file.
fn key_id_arg(key: &Option<PathBuf>) -> Result<Option<String>> {
    key.as_ref()
        .map(|p| {
            ferry_store::crypto::Key::load(p)
                .map(|k| k.id())
                .with_context(|| format!("--key {}", p.display()))
        })
        .transpose()
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}
fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}
fn parse_bandwidth_arg(s: &str) -> Result<u64, String> {
    parse_bandwidth(s).map_err(|e| e.to_string())
}

#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create the vault under --home (idempotent).
    ///
    /// Example: ferry --home /srv/ferry init
    Init,
    /// Manage sites (primary and recovery).
    ///
    /// Example: ferry site add dr --role recovery
    #[command(subcommand)]
    Site(SiteCmd),
    /// Manage hypervisor hosts.
    ///
    /// Example: ferry host add h1 --site prim --driver dir --switch lan
    #[command(subcommand)]
    Host(HostCmd),
    /// Manage VMs on hosts.
    ///
    /// Example: ferry vm create web1 --host h1 --disk 4GiB --switch lan
    #[command(subcommand)]
    Vm(VmCmd),
    /// Enable replication of a VM to a recovery site and take the first recovery point.
    ///
    /// Example: ferry protect web1 --to dr --rpo 5m --retention 24h
    Protect {
        /// VM to protect
        vm: String,
        /// Recovery site
        #[arg(long)]
        to: String,
        /// Recovery-point objective (copy frequency target)
        #[arg(long, default_value = "5m", value_parser = parse_duration_arg)]
        rpo: Duration,
        /// How long recovery points are kept (the newest is always kept)
        #[arg(long, default_value = "24h", value_parser = parse_duration_arg)]
        retention: Duration,
        /// Change-detection block size
        #[arg(long, default_value = "64KiB", value_parser = parse_size_arg)]
        block_size: u64,
        /// Key file (`ferry key new FILE`); required for failover, failback and verify of an encrypted VM
        #[arg(long)]
        key: Option<PathBuf>,
        /// `ferry serve` takes an app-consistent point (guest file systems frozen through the
        /// QEMU guest agent) whenever the newest one is this old, e.g. 1h
        #[arg(long, value_parser = parse_duration_arg)]
        app_consistent_every: Option<Duration>,
        /// How long app-consistent points are kept (beyond --retention)
        #[arg(long, value_parser = parse_duration_arg)]
        app_retention: Option<Duration>,
        #[command(flatten)]
        data: DataFlags,
    },
    /// Run one replication cycle now (a new recovery point).
    ///
    /// Example: ferry replicate web1
    ///
    /// With --app-consistent the guest's file systems are frozen through the QEMU guest agent
    /// while the snapshot is taken (about a second); a guest that cannot freeze yields a
    /// crash-consistent point and a job note saying why. `ferry points` shows each point's
    /// consistency.
    Replicate {
        /// VM
        vm: String,
        /// Key file (default: the one given to `protect`)
        #[arg(long)]
        key: Option<PathBuf>,
        /// Read every block and compare hashes instead of trusting change tracking (the job
        /// notes whether tracking agreed)
        #[arg(long)]
        verify: bool,
        /// Freeze the guest's file systems around the snapshot (an app-consistent point)
        #[arg(long)]
        app_consistent: bool,
        #[command(flatten)]
        data: DataFlags,
    },
    /// List recovery points of a VM, newest first.
    ///
    /// Example: ferry points web1 --json
    Points {
        /// VM
        vm: String,
    },
    /// Fail a VM over to its recovery site.
    ///
    /// Examples:
    ///   ferry failover web1 --planned        (stops the primary, no data loss)
    ///   ferry failover web1 --unplanned --point latest-app-consistent
    ///   ferry failover web1 --point 41       (awaiting commit: move to another point)
    ///   ferry failover web1 --test           (a drill; then --cleanup-test)
    Failover {
        /// VM
        vm: String,
        /// Stop the primary VM and replicate its last changes first (default)
        #[arg(long, conflicts_with_all = ["unplanned", "test"])]
        planned: bool,
        /// Recover from an existing point without touching the primary
        #[arg(long, conflicts_with = "test")]
        unplanned: bool,
        /// Test failover (a drill): start a throw-away copy (VM-test) at the recovery site
        /// from a point, on an isolated switch; the VM stays protected and keeps replicating
        #[arg(long, conflicts_with = "cleanup_test")]
        test: bool,
        /// Stop and delete the VM's test copy and its disks
        #[arg(long, conflicts_with_all = ["planned", "unplanned"])]
        cleanup_test: bool,
        /// --test: the isolated switch of the copy's NICs (default ferry-test; never one of the
        /// VM's production switches)
        #[arg(long, requires = "test")]
        switch: Option<String>,
        /// Recovery point for --unplanned or --test: latest, latest-app-consistent or an id
        /// from `ferry points`. While a failover awaits commit, `--point ID` alone moves the
        /// recovery copy to that point (what it wrote since is discarded)
        #[arg(long)]
        point: Option<String>,
        /// Recovery host (default: the first host of the recovery site)
        #[arg(long)]
        host: Option<String>,
        /// Key file, required when the VM's replication is encrypted
        #[arg(long)]
        key: Option<PathBuf>,
        #[command(flatten)]
        data: DataFlags,
    },
    /// Fail a VM back from the recovery site to the primary site (planned).
    ///
    /// Delta (default): phase 1 copies only differing blocks while the recovery VM runs; then
    /// `ferry complete VM` shuts it down, moves the last changes and starts the primary VM.
    /// Full: shuts the recovery VM down and downloads every block.
    ///
    /// Examples:
    ///   ferry failback web1 --dry-run
    ///   ferry failback web1 && ferry complete web1
    ///   ferry failback web1 --sync full --host h3 --create-vm
    Failback {
        /// VM
        vm: String,
        #[command(flatten)]
        flags: FailbackFlags,
    },
    /// Phase 2 of a waiting failback: stop the recovery VM, move the last changes, start the primary.
    ///
    /// The downtime of the VM is this command's stop → start window; it is shown in the job.
    ///
    /// Example: ferry complete web1
    Complete {
        /// VM
        vm: String,
        /// Key file (default: the one given to `protect`)
        #[arg(long)]
        key: Option<PathBuf>,
        /// Read every recovery block instead of trusting change tracking, and after the sync
        /// re-read the primary disks and compare every block hash
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        data: DataFlags,
    },
    /// Cancel the running or waiting job of a VM (returns once it stopped).
    ///
    /// A cancelled failback leaves the primary disks marked inconsistent (they refuse to start);
    /// running `ferry failback VM` again continues the same job where it stopped.
    ///
    /// Example: ferry cancel web1
    Cancel {
        /// VM
        vm: String,
    },
    /// Commit a failover, or a failback (deletes the recovery VM and its disks).
    ///
    /// Example: ferry commit web1
    Commit {
        /// VM
        vm: String,
    },
    /// After a committed failback: protect the VM again, sending only the changes since.
    ///
    /// Example: ferry reverse-replicate web1
    ReverseReplicate {
        /// VM
        vm: String,
        /// Key file (default: the one given to `protect`)
        #[arg(long)]
        key: Option<PathBuf>,
        /// Read every block and compare hashes instead of trusting change tracking (the job
        /// notes whether tracking agreed)
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        data: DataFlags,
    },
    /// Lifecycle state of a VM (or of all protected VMs).
    ///
    /// Example: ferry status web1 --json
    Status {
        /// VM
        vm: Option<String>,
    },
    /// List jobs (unfinished ones unless --all).
    ///
    /// Example: ferry jobs --all
    Jobs {
        /// Include finished jobs
        #[arg(long)]
        all: bool,
    },
    /// Show or watch one job.
    ///
    /// Example: ferry job watch 7
    #[command(subcommand)]
    Job(JobCmd),
    /// Encryption keys: the operator holds them; they never reach the store.
    ///
    /// Example: ferry key new /root/ferry-web1.key && ferry protect web1 --to dr --key /root/ferry-web1.key
    #[command(subcommand)]
    Key(KeyCmd),
    /// Tools for ferry's own tests (hidden).
    #[command(subcommand, hide = true)]
    Debug(DebugCmd),
    /// Read back every block of a recovery point and check it against its hash.
    ///
    /// Example: ferry verify web1 --point 3
    Verify {
        /// VM
        vm: String,
        /// Point id (default: the newest)
        #[arg(long)]
        point: Option<i64>,
        /// Key file (`ferry key new FILE`); required for failover, failback and verify of an encrypted VM
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// Recovery plans: ordered groups of VMs that fail over and back together.
    ///
    /// A group starts only when every VM of the previous group is up; every VM's state is checked
    /// before anything changes, and a re-run skips VMs that already went through the step.
    ///
    /// Example: ferry plan create shop --group db1 --group app1,app2 && ferry plan failback shop && ferry plan complete shop
    #[command(subcommand)]
    Plan(PlanCmd),
    /// Run the control plane: the REST API over this --home, with tokens and roles, and the
    /// replication scheduler (every protected VM gets a cycle by its --rpo).
    ///
    /// Prints one line `listening on URL` when ready; runs until SIGTERM or SIGINT (jobs it
    /// runs are then cancelled; re-running their command continues them). Clients use
    /// `--server URL --token T` (or FERRY_SERVER / FERRY_TOKEN).
    ///
    /// Example:
    ///   ferry --home /srv/ferry token new ops --role operator
    ///   ferry --home /srv/ferry serve --listen 127.0.0.1:7450
    Serve {
        /// Address to listen on (port 0: any free port)
        #[arg(long, default_value = "127.0.0.1:7450")]
        listen: String,
        /// After a crash, leave interrupted jobs as they are (default: they continue by
        /// themselves from their durable logs; re-running their command continues them too)
        #[arg(long)]
        no_resume: bool,
        /// Missed heartbeats for this long mark an agent host disconnected
        #[arg(long, default_value = "15s", value_parser = parse_duration_arg)]
        agent_timeout: Duration,
        /// Serve HTTPS with this certificate chain (PEM); clients that do not trust its issuer
        /// pass --ca-cert FILE (or FERRY_CA_CERT)
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// Private key of --tls-cert (PEM)
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Run on a hypervisor host's own machine: does that host's disk and hypervisor work for
    /// a `ferry serve` control plane (declared with `ferry host add NAME … --agent`).
    ///
    /// Connects out to --server with an agent token for --host, registers, heartbeats every
    /// 5 s and runs the work it is given on its local driver over --root. Runs until SIGTERM
    /// or SIGINT; reconnects by itself when the server restarts.
    ///
    /// Example:
    ///   ferry --home /srv/ferry token new h1-agent --role agent --host h1   # on the server
    ///   ferry agent --server http://ctl:7450 --token ferry_… --host h1 --root /var/lib/ferry/vms
    Agent {
        /// The host this agent serves
        #[arg(long)]
        host: String,
        /// Folder of the host's VMs on this machine
        #[arg(long)]
        root: PathBuf,
        /// Hypervisor driver: dir or qemu
        #[arg(long, default_value = "dir", value_parser = ["dir", "qemu"])]
        driver: String,
        /// Encryption key of the VMs whose data this agent moves (it never leaves this machine)
        #[arg(long)]
        key: Option<PathBuf>,
    },
    /// API tokens of `ferry serve`: create, list, revoke (against --home, or remotely as admin).
    ///
    /// Example: ferry --home /srv/ferry token new ops --role operator
    #[command(subcommand)]
    Token(TokenCmd),
    /// Run the whole lifecycle on the embedded defaults and print a summary table.
    ///
    /// Example: ferry demo --disk-size 256MiB
    Demo {
        /// Folder for the demo installation (default: a new temporary folder)
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Size of the demo VM's first disk (the second is a quarter of it)
        #[arg(long, default_value = "1GiB", value_parser = parse_size_arg)]
        disk_size: u64,
        /// Hypervisor driver of both hosts: `dir` (built in) or `qemu` (real QEMU VMs, with
        /// change tracking by dirty bitmaps; needs QEMU installed)
        #[arg(long, default_value = "dir")]
        driver: String,
        /// With --driver qemu: the VM boots ferry's test guest (`scripts/guest-image.sh`),
        /// which writes checksummed files throughout, and the demo prints the guest's own
        /// file-system and checksum check after each move
        #[arg(long)]
        guest: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum PlanCmd {
    /// Create a plan. Example: ferry plan create shop --group db1 --group app1,app2
    ///
    /// Steps around a group follow the --group they belong to; they run when the plan fails
    /// over (drills too) or back:
    ///
    ///   ferry plan create shop \
    ///     --group db1 --pre 'notify-oncall start' --pause 'check the database, then: ferry plan resume shop' \
    ///     --group app1,app2,app3 --parallel 2 --post 'curl -fsS http://lb/health' --timeout 2m
    ///
    /// --pre/--post run `sh -c CMD` where the plan runs (this process, or `ferry serve`) with
    /// FERRY_PLAN, FERRY_PLAN_ACTION, FERRY_PLAN_GROUP, FERRY_PLAN_STEP and FERRY_PLAN_VMS set;
    /// a non-zero exit or a timeout stops the plan before anything later changes. --pause
    /// stops the plan after the group until `ferry plan resume NAME`.
    Create {
        /// Plan name
        name: String,
        /// A group of VMs (comma-separated); groups run in the order given
        #[arg(long = "group", required = true)]
        groups: Vec<String>,
        /// Command run before the group's VMs (applies to the --group before it)
        #[arg(long)]
        pre: Vec<String>,
        /// Command run after the group's VMs
        #[arg(long)]
        post: Vec<String>,
        /// Longest the group's --pre/--post may run (default 5m)
        #[arg(long, value_parser = parse_duration_arg)]
        timeout: Vec<Duration>,
        /// Stop after the group with this text until `ferry plan resume NAME`
        #[arg(long)]
        pause: Vec<String>,
        /// VMs of the group that fail over (or back) at once (default 1)
        #[arg(long)]
        parallel: Vec<u32>,
    },
    /// Show a plan's groups, their steps and what its last run did.
    Show {
        /// Plan name
        name: String,
    },
    /// Continue a plan run that stopped at a --pause (the same action, from the next group).
    Resume {
        /// Plan name
        name: String,
    },
    /// Fail over every VM of the plan, group by group.
    Failover {
        /// Plan name
        name: String,
        /// Stop each primary VM and replicate its last changes first (default)
        #[arg(long, conflicts_with = "unplanned")]
        planned: bool,
        /// Recover from the latest points without touching the primaries
        #[arg(long, conflicts_with_all = ["test", "cleanup_test"])]
        unplanned: bool,
        /// A drill: a test copy of every VM, group by group, on an isolated switch (the VMs
        /// stay protected; see `ferry failover --test`)
        #[arg(long, conflicts_with_all = ["planned", "cleanup_test"])]
        test: bool,
        /// Remove every VM's test copy
        #[arg(long, conflicts_with = "planned")]
        cleanup_test: bool,
        /// --test: the isolated switch (default ferry-test)
        #[arg(long, requires = "test")]
        switch: Option<String>,
        /// Recovery host for every VM
        #[arg(long)]
        host: Option<String>,
        /// Key file for encrypted VMs
        #[arg(long)]
        key: Option<PathBuf>,
        #[command(flatten)]
        data: DataFlags,
    },
    /// Fail back every VM of the plan (phase 1; `complete` then finishes all with one command).
    Failback {
        /// Plan name
        name: String,
        #[command(flatten)]
        flags: FailbackFlags,
    },
    /// Phase 2 for every VM of the plan, group by group: one "complete" for the whole plan.
    Complete {
        /// Plan name
        name: String,
        /// Key file (default: the ones given to `protect`)
        #[arg(long)]
        key: Option<PathBuf>,
        /// After each sync, re-read the primary disks and compare every block hash
        #[arg(long)]
        verify: bool,
        #[command(flatten)]
        data: DataFlags,
    },
    /// Commit every VM's failover or failback.
    Commit {
        /// Plan name
        name: String,
    },
    /// Protect every failed-back VM of the plan again, sending only changes.
    ReverseReplicate {
        /// Plan name
        name: String,
        /// Key file (default: the ones given to `protect`)
        #[arg(long)]
        key: Option<PathBuf>,
        #[command(flatten)]
        data: DataFlags,
    },
}

#[derive(Subcommand, Debug)]
pub enum SiteCmd {
    /// Add a site. Example: ferry site add dr --role recovery
    Add {
        /// Site name
        name: String,
        /// primary or recovery
        #[arg(long, value_parser = ["primary", "recovery"])]
        role: String,
        /// Store URL: file:///abs/dir, az://CONTAINER[/prefix] or s3://BUCKET[/prefix]
        /// (default: <home>/stores/NAME)
        #[arg(long)]
        store: Option<String>,
        /// Do not open the store from here to check it: for a control plane (`ferry serve`)
        /// that has no store credentials because only its agents, with their own, use it
        #[arg(long)]
        no_store_check: bool,
    },
    /// List sites.
    List,
    /// Show a site with its network map. Example: ferry site show prim --json
    Show {
        /// Site name
        name: String,
    },
    /// Map a switch of one site to a switch of another, both ways: a failover or failback
    /// between them attaches each NIC on one to the other (without a mapping, to a switch of
    /// the same name, or the move is refused before anything changes).
    ///
    /// Example: ferry site map-network prim:lan=dr:dr-lan
    MapNetwork {
        /// SITE_A:SWITCH=SITE_B:SWITCH
        mapping: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum HostCmd {
    /// Add a host. Example: ferry host add h1 --site prim --driver dir --switch lan
    Add {
        /// Host name
        name: String,
        /// Site the host belongs to
        #[arg(long)]
        site: String,
        /// dir (built in, no hypervisor) or qemu
        #[arg(long, value_parser = ["dir", "qemu"])]
        driver: String,
        /// Folder for the host's VMs (default: <home>/hosts/NAME)
        #[arg(long)]
        root: Option<PathBuf>,
        /// A virtual switch on the host (repeat for several)
        #[arg(long = "switch")]
        switches: Vec<String>,
        /// qemu driver: accelerator of the host's VMs — kvm, tcg, or auto (KVM when /dev/kvm
        /// works, else TCG; the default). The environment variable FERRY_QEMU_ACCEL overrides it.
        #[arg(long, value_parser = ["kvm", "tcg", "auto"])]
        accel: Option<String>,
        /// The host is served by `ferry agent --host NAME` on its own machine (server mode):
        /// the agent does its disk and hypervisor work, and its --root is the host's root
        #[arg(long, conflicts_with = "root")]
        agent: bool,
    },
    /// List hosts.
    List,
    /// Show one host.
    Show {
        /// Host name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum VmCmd {
    /// Create a VM. Example: ferry vm create web1 --host h1 --disk 4GiB --disk 512MiB --switch lan
    ///
    /// With `--image guest` (qemu hosts) the VM boots ferry's test guest, a tiny Linux that
    /// keeps writing checksummed files to its first disk and answers the QEMU guest agent
    /// (build it once with `scripts/guest-image.sh`). Its console is `console.log` in the
    /// VM's folder. Example: ferry vm create app --host h1 --image guest --disk 512MiB
    Create {
        /// VM name
        name: String,
        /// Host to create it on
        #[arg(long)]
        host: String,
        /// Disk size (repeat for several disks)
        #[arg(long = "disk", required = true, value_parser = parse_size_arg)]
        disks: Vec<u64>,
        /// Switch of a NIC (repeat for several NICs)
        #[arg(long = "switch")]
        switches: Vec<String>,
        /// Virtual CPUs
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        /// Memory
        #[arg(long, default_value = "512MiB", value_parser = parse_size_arg)]
        memory: u64,
        /// Boot image: `guest` (ferry's test guest; qemu hosts). Without it the VM has data
        /// disks only.
        #[arg(long, value_parser = ["guest"])]
        image: Option<String>,
    },
    /// Start a VM (the active copy, or the copy on --host).
    Start {
        /// VM name
        name: String,
        /// Host of the copy to start
        #[arg(long)]
        host: Option<String>,
    },
    /// Stop a VM (the active copy, or the copy on --host).
    Stop {
        /// VM name
        name: String,
        /// Host of the copy to stop
        #[arg(long)]
        host: Option<String>,
    },
    /// List VMs on all hosts, or on one (`--host`).
    List {
        /// Only the VMs of this host.
        #[arg(long)]
        host: Option<String>,
    },
    /// Show a VM (the active copy, or the copy on --host).
    Show {
        /// VM name
        name: String,
        /// Host of the copy to show
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum JobCmd {
    /// Show a job.
    Show {
        /// Job id
        id: i64,
    },
    /// Follow a job until it ends or waits.
    Watch {
        /// Job id
        id: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token and print its secret (shown only here; only a hash is kept).
    ///
    /// Roles: viewer (reads), operator (also runs protect, replicate, failover, failback,
    /// complete, cancel, commit and plans), admin (also changes sites, hosts, VMs and tokens),
    /// agent (acts only as its --host).
    ///
    /// Example: ferry token new ops --role operator
    New {
        /// Token name
        name: String,
        /// viewer, operator, admin or agent
        #[arg(long, value_parser = ["viewer", "operator", "admin", "agent"])]
        role: String,
        /// For agent tokens: the host the agent serves
        #[arg(long)]
        host: Option<String>,
    },
    /// List tokens (names and roles, never secrets).
    List,
    /// Revoke a token: requests with it are refused from now on.
    Revoke {
        /// Token name
        name: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum DebugCmd {
    /// Every fault point of every workflow (`FERRY_FAULT=POINT` kills the process running the
    /// job there), listed from the code: one per line as `WORKFLOW POINT`, or `--json`.
    FaultPoints,
}

#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a new encryption key file.
    New {
        /// Key file
        file: PathBuf,
    },
}

fn home(cli: &Cli) -> PathBuf {
    cli.home.clone().unwrap_or_else(crate::default_home)
}

/// The operations: over HTTP with `--server`, else in this process over `--home`. Either way
/// the same calls, so both modes print the same.
fn api(cli: &Cli) -> Result<Box<dyn Api>> {
    let progress = output::show_progress(cli.json);
    if let Some(url) = cli.server.as_ref().filter(|_| !cli.home_flag) {
        let mut c =
            ferry_api::client::Client::with_ca(url, cli.token.clone(), cli.ca_cert.as_deref())?;
        if progress {
            let (obs, _bar) = output::progress_observer();
            c.set_progress(obs);
        }
        return Ok(Box::new(c));
    }
    let mut l = ferry_server::Local::new(&home(cli));
    l.set_notify(std::sync::Arc::new(|s: &str| eprintln!("{s}")));
    if progress {
        let (obs, _bar) = output::progress_observer();
        l.set_observer(obs);
    }
    Ok(Box::new(l))
}

/// Prints what a job-running command returns: its notes on stderr, then the job.
fn print_run(r: &RunReply, j: bool) {
    for m in &r.messages {
        eprintln!("{m}");
    }
    if let Some(job) = &r.job {
        output::job(job, j);
    }
}

fn print_vm(v: &VmView, j: bool, text: impl FnOnce(&VmView) -> String) {
    if j {
        output::json(v)
    } else {
        println!("{}", text(v))
    }
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> Result<()> {
    let j = cli.json;
    match &cli.cmd {
        Cmd::Init => {
            if cli.server.is_some() && !cli.home_flag {
                // A server's installation exists already: say where it is.
                let i = api(&cli)?.info()?;
                if j {
                    output::json(&json!({"home": i.home, "vault": i.vault}));
                } else {
                    println!(
                        "ferry home ready at {} (server {})",
                        i.home,
                        cli.server.as_deref().unwrap_or("")
                    );
                }
                return Ok(());
            }
            let h = home(&cli);
            let e = Engine::init(&h)?;
            if j {
                output::json(&json!({"home": e.home, "vault": e.vault.path()}));
            } else {
                println!("ferry home ready at {}", e.home.display());
            }
        }
        Cmd::Site(SiteCmd::Add {
            name,
            role,
            store,
            no_store_check,
        }) => {
            let role: SiteRole = role.parse().map_err(anyhow::Error::msg)?;
            let s = api(&cli)?.add_site(&SiteAdd {
                name: name.clone(),
                role,
                store: store.clone(),
                no_store_check: *no_store_check,
            })?;
            if j {
                output::json(&s)
            } else {
                println!("site {} ({}) store {}", s.name, s.role.as_str(), s.store)
            }
        }
        Cmd::Site(SiteCmd::Show { name }) => {
            print_site(&api(&cli)?.site(name)?, j);
        }
        Cmd::Site(SiteCmd::MapNetwork { mapping }) => {
            let bad = || {
                anyhow::anyhow!(
                    "{mapping:?} is not a network mapping: write SITE_A:SWITCH=SITE_B:SWITCH, e.g. prim:lan=dr:dr-lan"
                )
            };
            let (a, b) = mapping.split_once('=').ok_or_else(bad)?;
            let (sa, wa) = a.split_once(':').ok_or_else(bad)?;
            let (sb, wb) = b.split_once(':').ok_or_else(bad)?;
            let v = api(&cli)?.map_network(&NetworkMapReq {
                site: sa.trim().into(),
                switch: wa.trim().into(),
                to_site: sb.trim().into(),
                to_switch: wb.trim().into(),
            })?;
            print_site(&v, j);
        }
        Cmd::Site(SiteCmd::List) => {
            let sites = api(&cli)?.sites()?;
            if j {
                output::json(&sites)
            } else {
                for s in sites {
                    println!("{:<16} {:<9} {}", s.name, s.role.as_str(), s.store)
                }
            }
        }
        Cmd::Host(HostCmd::Add {
            name,
            site,
            driver,
            root,
            switches,
            accel,
            agent,
        }) => {
            let d: DriverKind = driver.parse().map_err(anyhow::Error::msg)?;
            let root = root.as_ref().map(|r| {
                if r.is_absolute() || cli.server.is_some() {
                    r.display().to_string()
                } else {
                    std::env::current_dir()
                        .map(|c| c.join(r))
                        .unwrap_or_else(|_| r.clone())
                        .display()
                        .to_string()
                }
            });
            let h = api(&cli)?.add_host(&HostAdd {
                name: name.clone(),
                site: site.clone(),
                driver: d,
                root,
                switches: switches.clone(),
                accel: accel.clone(),
                agent: *agent,
            })?;
            if j {
                output::json(&h)
            } else {
                println!(
                    "host {} at site {} ({} driver, root {})",
                    h.name, h.site, h.driver, h.root
                )
            }
        }
        Cmd::Host(HostCmd::List) => {
            let hosts = api(&cli)?.hosts()?;
            if j {
                output::json(&hosts)
            } else {
                for h in hosts {
                    println!(
                        "{:<16} {:<12} {:<5} connected={} switches={}",
                        h.name,
                        h.site,
                        h.driver,
                        h.connected,
                        serde_json::to_string(&h.switches).unwrap_or_default()
                    );
                }
            }
        }
        Cmd::Host(HostCmd::Show { name }) => {
            output::json(&api(&cli)?.host(name)?);
        }
        Cmd::Vm(VmCmd::Create {
            name,
            host,
            disks,
            switches,
            cpus,
            memory,
            image,
        }) => {
            let v = api(&cli)?.create_vm(&VmCreate {
                name: name.clone(),
                host: host.clone(),
                disks: disks.clone(),
                switches: switches.clone(),
                cpus: *cpus,
                memory: *memory,
                image: image.clone(),
            })?;
            print_vm(&v, j, |v| {
                format!(
                    "VM {} created on host {} ({} disks, stopped)",
                    v.name,
                    v.host,
                    v.disks.len()
                )
            });
        }
        Cmd::Vm(VmCmd::Start { name, host }) | Cmd::Vm(VmCmd::Stop { name, host }) => {
            let running = matches!(cli.cmd, Cmd::Vm(VmCmd::Start { .. }));
            let v = api(&cli)?.set_power(
                name,
                &VmPower {
                    running,
                    host: host.clone(),
                },
            )?;
            print_vm(&v, j, |v| {
                format!("VM {} on host {} is {}", v.name, v.host, v.power)
            });
        }
        Cmd::Vm(VmCmd::List { host }) => {
            let a = api(&cli)?;
            if let Some(h) = host {
                a.host(h)?; // an unknown host is an error, not an empty list
            }
            let mut out = a.vms()?;
            if let Some(h) = host {
                out.retain(|v| v.host == *h);
            }
            if j {
                output::json(&out)
            } else {
                for v in out {
                    println!(
                        "{:<20} {:<12} {:<10} {:<8} disks={}",
                        v.name,
                        v.host,
                        v.site,
                        v.power,
                        v.disks.len()
                    );
                }
            }
        }
        Cmd::Vm(VmCmd::Show { name, host }) => {
            output::json(&api(&cli)?.vm(name, host.as_deref())?);
        }
        Cmd::Protect {
            vm,
            to,
            rpo,
            retention,
            block_size,
            key,
            app_consistent_every,
            app_retention,
            data,
        } => {
            let r = api(&cli)?.protect(
                vm,
                &ProtectReq {
                    to: to.clone(),
                    rpo_s: rpo.as_secs(),
                    retention_s: retention.as_secs(),
                    block_size: *block_size,
                    app_consistent_every_s: app_consistent_every.map(|d| d.as_secs()),
                    app_retention_s: app_retention.map(|d| d.as_secs()),
                    key: key_arg(key),
                    key_id: key_id_arg(key)?,
                    data: data.opts(),
                },
            )?;
            print_run(&r, j);
        }
        Cmd::Replicate {
            vm,
            key,
            verify,
            data,
            ..
        }
        | Cmd::ReverseReplicate {
            vm,
            key,
            verify,
            data,
        } => {
            let app_consistent = matches!(
                cli.cmd,
                Cmd::Replicate {
                    app_consistent: true,
                    ..
                }
            );
            let req = ReplicateReq {
                key: key_arg(key),
                key_id: key_id_arg(key)?,
                verify: *verify,
                app_consistent,
                data: data.opts(),
            };
            let api = api(&cli)?;
            let r = match cli.cmd {
                Cmd::Replicate { .. } => api.replicate(vm, &req)?,
                _ => api.reverse_replicate(vm, &req)?,
            };
            print_run(&r, j);
        }
        Cmd::Points { vm } => {
            let pts = api(&cli)?.points(vm)?;
            if j {
                output::json(&pts)
            } else {
                for p in pts {
                    println!(
                        "{:>6}  {}  {:<11} {:<5}  {} data",
                        p.id,
                        p.created_at,
                        format!("{:?}", p.kind).to_lowercase(),
                        p.consistency.as_str(),
                        ferry_model::format_bytes(p.data_bytes)
                    );
                }
            }
        }
        Cmd::Failover {
            vm,
            planned: _,
            unplanned,
            test,
            cleanup_test,
            switch,
            point,
            host,
            key,
            data,
        } => {
            let mode = if *unplanned {
                FailoverMode::Unplanned
            } else {
                FailoverMode::Planned
            };
            let latest_app_consistent = point.as_deref() == Some("latest-app-consistent");
            let point = match point.as_deref() {
                None | Some("latest") | Some("latest-app-consistent") => None,
                Some(id) => Some(id.parse::<i64>().map_err(|_| {
                    anyhow::anyhow!(
                        "--point takes `latest`, `latest-app-consistent` or a point id from `ferry points {vm}`, not {id:?}"
                    )
                })?),
            };
            let r = api(&cli)?.failover(
                vm,
                &FailoverReq {
                    mode,
                    point,
                    latest_app_consistent,
                    host: host.clone(),
                    test: *test,
                    cleanup_test: *cleanup_test,
                    switch: switch.clone(),
                    key: key_arg(key),
                    key_id: key_id_arg(key)?,
                    data: data.opts(),
                },
            )?;
            print_run(&r, j);
        }
        Cmd::Failback { vm, flags } => {
            let r = api(&cli)?.failback(vm, &flags.req()?)?;
            for m in &r.messages {
                eprintln!("{m}");
            }
            if let Some(d) = &r.dry_run {
                print_dry_run(d, j);
            } else if let Some(job) = &r.job {
                output::job(job, j);
                if !j && job.state == JobState::Waiting {
                    println!("phase 1 done; the recovery VM keeps running. Run `ferry complete {vm}` for phase 2 (or `ferry failback {vm}` for another pre-sync round).");
                }
            }
        }
        Cmd::Complete {
            vm,
            key,
            verify,
            data,
        } => {
            let r = api(&cli)?.complete(
                vm,
                &CompleteReq {
                    key: key_arg(key),
                    key_id: key_id_arg(key)?,
                    verify: *verify,
                    data: data.opts(),
                },
            )?;
            print_run(&r, j);
        }
        Cmd::Cancel { vm } => print_run(&api(&cli)?.cancel(vm)?, j),
        Cmd::Commit { vm } => print_run(&api(&cli)?.commit(vm)?, j),
        Cmd::Status { vm } => match vm {
            Some(vm) => {
                let s = api(&cli)?.status(vm)?;
                if j {
                    output::json(&s)
                } else {
                    println!(
                        "{}: {} (active at the {} site)",
                        vm,
                        s.state.as_str(),
                        s.active_site
                    );
                    if let Some(r) = &s.rpo {
                        println!("  {}", rpo_line(r));
                    }
                    if let Some(job) = &s.job {
                        println!("  {}", output::job_line(job));
                    }
                }
            }
            None => {
                let all = api(&cli)?.statuses()?;
                if j {
                    output::json(&all)
                } else {
                    for s in all {
                        let rpo = s.rpo.as_ref().map(rpo_line).unwrap_or_default();
                        println!(
                            "{:<20} {:<26} active={} {rpo}",
                            s.vm,
                            s.state.as_str(),
                            s.active_site
                        );
                    }
                }
            }
        },
        Cmd::Jobs { all } => {
            let jobs = api(&cli)?.jobs(*all)?;
            if j {
                output::json(&jobs)
            } else {
                for job in jobs {
                    println!("{}", output::job_line(&job));
                }
            }
        }
        Cmd::Job(JobCmd::Show { id }) => {
            output::job(&api(&cli)?.job(*id)?, j);
        }
        Cmd::Job(JobCmd::Watch { id }) => {
            let bar = if output::show_progress(j) {
                Some(output::progress_observer())
            } else {
                None
            };
            let job = api(&cli)?.watch_job(*id, &mut |job| {
                if let Some((obs, _)) = &bar {
                    obs(job);
                }
            })?;
            if let Some((_, b)) = &bar {
                output::finish_bar(b);
            }
            output::job(&job, j);
        }
        Cmd::Debug(DebugCmd::FaultPoints) => {
            let points = ferry_engine::faults::all();
            if j {
                output::json(&points)
            } else {
                for p in points {
                    println!("{} {}", p.workflow, p.point);
                }
            }
        }
        Cmd::Key(KeyCmd::New { file }) => {
            let k = ferry_store::crypto::Key::create_file(file)?;
            if j {
                output::json(&json!({"file": file, "id": k.id()}));
            } else {
                println!("key {} written to {} (mode 0600)", k.id(), file.display());
                eprintln!("keep it off the store and back it up: without it, recovery points protected with it cannot be recovered");
            }
        }
        Cmd::Verify { vm, point, key } => {
            let r = api(&cli)?.verify(
                vm,
                &VerifyReq {
                    point: *point,
                    key: key_arg(key),
                    key_id: key_id_arg(key)?,
                },
            )?;
            if j {
                output::json(&r)
            } else {
                println!(
                    "point {} of {}: {} blocks ({}) read back and verified",
                    r.point,
                    r.vm,
                    r.blocks,
                    ferry_model::format_bytes(r.bytes)
                );
            }
        }
        Cmd::Serve {
            listen,
            no_resume,
            agent_timeout,
            tls_cert,
            tls_key,
        } => {
            let tls = tls_cert.as_deref().zip(tls_key.as_deref());
            ferry_server::serve(&home(&cli), listen, !no_resume, *agent_timeout, tls)?;
        }
        Cmd::Token(t) => run_token(&cli, t)?,
        Cmd::Agent {
            host,
            root,
            driver,
            key,
        } => {
            let (Some(server), Some(token)) = (&cli.server, &cli.token) else {
                bail!("`ferry agent` needs --server URL and --token T (an agent token for host {host}: `ferry token new NAME --role agent --host {host}` on the server)");
            };
            ferry_model::validate_name("host", host)?;
            ferry_agent::run(ferry_agent::AgentOpts {
                ca_cert: cli.ca_cert.clone(),
                server: server.clone(),
                token: token.clone(),
                host: host.clone(),
                root: root.clone(),
                driver: driver.parse().map_err(anyhow::Error::msg)?,
                key: key.clone(),
            })?;
        }
        Cmd::Demo {
            dir,
            disk_size,
            driver,
            guest,
        } => {
            let d: DriverKind = driver.parse().map_err(anyhow::Error::msg)?;
            match (guest, d) {
                (true, DriverKind::Qemu) => crate::demo_guest::run(dir.clone(), *disk_size, j)?,
                (true, _) => bail!("--guest boots a real guest: add --driver qemu"),
                (false, _) => crate::demo::run(dir.clone(), *disk_size, d, j)?,
            }
        }
        Cmd::Plan(p) => run_plan(&cli, p)?,
    }
    Ok(())
}

fn rpo_line(r: &RpoView) -> String {
    let age = r
        .last_point_age_s
        .map(|a| format!("{a} s"))
        .unwrap_or_else(|| "none yet".into());
    format!(
        "rpo {} s, newest point {age} old: {}",
        r.target_s,
        if r.healthy { "healthy" } else { "LATE" }
    )
}

fn print_dry_run(d: &DryRun, j: bool) {
    if j {
        return output::json(d);
    }
    println!(
        "dry run: failback of {} to host {} with --sync {}",
        d.vm,
        d.host,
        d.sync.as_str()
    );
    for x in &d.disks {
        println!(
            "  disk {}: {} of {} blocks differ ({})",
            x.index,
            x.blocks_to_move,
            x.blocks,
            ferry_model::format_bytes(x.bytes_to_move)
        );
    }
    println!(
        "would move {} in {} blocks; read {} to find out",
        ferry_model::format_bytes(d.bytes_to_move),
        d.blocks_to_move,
        ferry_model::format_bytes(d.bytes_read)
    );
    println!(
        "recommendation: --sync {} ({})",
        d.recommended_sync.as_str(),
        d.reason
    );
}

fn run_token(cli: &Cli, t: &TokenCmd) -> Result<()> {
    let j = cli.json;
    let api = api(cli)?;
    match t {
        TokenCmd::New { name, role, host } => {
            let role: Role = role.parse().map_err(anyhow::Error::msg)?;
            let t = api.token_new(&TokenNew {
                name: name.clone(),
                role,
                host: host.clone(),
            })?;
            if j {
                output::json(&t);
            } else {
                println!("{}", t.token);
                eprintln!(
                    "token {} ({}{}) created; this is the only time its secret is shown: pass it as --token or FERRY_TOKEN",
                    t.name,
                    t.role.as_str(),
                    t.host.as_deref().map(|h| format!(" for host {h}")).unwrap_or_default()
                );
            }
        }
        TokenCmd::List => {
            let all = api.tokens()?;
            if j {
                output::json(&all);
            } else {
                for t in all {
                    println!(
                        "{:<20} {:<9} {:<12} created {}",
                        t.name,
                        t.role.as_str(),
                        t.host.as_deref().unwrap_or("-"),
                        t.created_at
                    );
                }
            }
        }
        TokenCmd::Revoke { name } => {
            let t = api.token_revoke(name)?;
            if j {
                output::json(&t);
            } else {
                println!("token {} revoked", t.name);
            }
        }
    }
    Ok(())
}

fn run_plan(cli: &Cli, p: &PlanCmd) -> Result<()> {
    let j = cli.json;
    let base = |action| PlanRunReq {
        action,
        mode: FailoverMode::Planned,
        host: None,
        failback: None,
        verify: false,
        key: None,
        key_id: None,
        test: false,
        cleanup_test: false,
        switch: None,
        data: DataOpts::default(),
    };
    let (name, req) = match p {
        PlanCmd::Create { name, groups, .. } => {
            let groups: Vec<Vec<String>> = groups
                .iter()
                .map(|g| {
                    g.split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect()
                })
                .collect();
            let steps = group_steps_from_args(groups.len())?;
            let p = api(cli)?.create_plan(&PlanCreate {
                name: name.clone(),
                groups,
                steps,
            })?;
            if j {
                output::json(&p);
            } else {
                print_plan(&p);
            }
            return Ok(());
        }
        PlanCmd::Show { name } => {
            let p = api(cli)?.plan(name)?;
            if j {
                output::json(&p);
            } else {
                print_plan(&p);
            }
            return Ok(());
        }
        PlanCmd::Resume { name } => {
            let r = api(cli)?.resume_plan(name)?;
            print_plan_run(&r, j);
            return Ok(());
        }
        PlanCmd::Failover {
            name,
            planned: _,
            unplanned,
            test,
            cleanup_test,
            switch,
            host,
            key,
            data,
        } => (
            name,
            PlanRunReq {
                mode: if *unplanned {
                    FailoverMode::Unplanned
                } else {
                    FailoverMode::Planned
                },
                test: *test,
                cleanup_test: *cleanup_test,
                switch: switch.clone(),
                host: host.clone(),
                key: key_arg(key),
                key_id: key_id_arg(key)?,
                data: data.opts(),
                ..base(PlanActionKind::Failover)
            },
        ),
        PlanCmd::Failback { name, flags } => (
            name,
            PlanRunReq {
                failback: Some(flags.req()?),
                key: key_arg(&flags.key),
                key_id: key_id_arg(&flags.key)?,
                data: flags.data.opts(),
                ..base(PlanActionKind::Failback)
            },
        ),
        PlanCmd::Complete {
            name,
            key,
            verify,
            data,
        } => (
            name,
            PlanRunReq {
                verify: *verify,
                key: key_arg(key),
                key_id: key_id_arg(key)?,
                data: data.opts(),
                ..base(PlanActionKind::Complete)
            },
        ),
        PlanCmd::Commit { name } => (name, base(PlanActionKind::Commit)),
        PlanCmd::ReverseReplicate { name, key, data } => (
            name,
            PlanRunReq {
                key: key_arg(key),
                key_id: key_id_arg(key)?,
                data: data.opts(),
                ..base(PlanActionKind::ReverseReplicate)
            },
        ),
    };
    let r = api(cli)?.run_plan(name, &req)?;
    print_plan_run(&r, j);
    Ok(())
}

/// Prints what a plan run did: each group's commands and VMs, and a pause.
fn print_plan_run(r: &ferry_api::PlanRun, j: bool) {
    if j {
        output::json(r);
        return;
    }
    for (i, g) in r.groups.iter().enumerate() {
        let n = r.first_group.max(1) + i;
        let hook = |step: &str| {
            for h in r.hooks.iter().filter(|h| h.group == n && h.step == step) {
                let how = match (h.timed_out, h.exit_code) {
                    (true, _) => "killed at its timeout".to_string(),
                    (false, Some(c)) => format!("exit {c}"),
                    (false, None) => "killed".to_string(),
                };
                println!(
                    "group {n}: {step} `{}`: {how} ({} ms)",
                    h.command, h.elapsed_ms
                );
                for line in h.output.lines().filter(|l| !l.trim().is_empty()) {
                    println!("    | {line}");
                }
            }
        };
        hook("pre");
        for s in g {
            match (&s.job, &s.dry_run, s.skipped) {
                (_, _, true) => println!("group {n}: {} already done, skipped", s.vm),
                (Some(job), _, _) => println!("group {n}: {}", output::job_line(job)),
                (_, Some(d), _) => println!(
                    "group {n}: {} would move {} ({} blocks); recommended --sync {}",
                    d.vm,
                    ferry_model::format_bytes(d.bytes_to_move),
                    d.blocks_to_move,
                    d.recommended_sync.as_str()
                ),
                _ => {}
            }
        }
        hook("post");
    }
    if let Some(text) = &r.paused {
        println!(
            "plan {} paused after group {}: {text}\nwhen done, run `ferry plan resume {}`",
            r.plan,
            r.first_group.max(1) + r.groups.len() - 1,
            r.plan
        );
    }
}

/// Prints a plan: its groups with their steps, and its last run.
fn print_plan(p: &ferry_api::PlanView) {
    println!("plan {}: {}", p.name, fmt_groups(&p.groups));
    for (i, st) in p.steps.iter().enumerate() {
        let mut parts = Vec::new();
        if let Some(c) = &st.pre {
            parts.push(format!("pre `{c}`"));
        }
        if let Some(c) = &st.post {
            parts.push(format!("post `{c}`"));
        }
        if let Some(t) = st.timeout_s {
            parts.push(format!("timeout {t} s"));
        }
        if let Some(n) = st.parallel {
            parts.push(format!("parallel {n}"));
        }
        if let Some(t) = &st.pause {
            parts.push(format!("pause \"{t}\""));
        }
        if !parts.is_empty() {
            println!("  group {}: {}", i + 1, parts.join(", "));
        }
    }
    if let Some(l) = &p.last_run {
        println!(
            "  last run: {} {}{}",
            l["action"].as_str().unwrap_or("?"),
            l["state"].as_str().unwrap_or("?"),
            l["message"]
                .as_str()
                .map(|m| format!(": {m}"))
                .unwrap_or_default()
        );
    }
}

/// The steps of `ferry plan create`'s groups: each --pre, --post, --timeout, --pause and
/// --parallel belongs to the --group before it on the command line.
fn group_steps_from_args(groups: usize) -> Result<Vec<ferry_api::GroupSteps>> {
    use clap::CommandFactory;
    let m = Cli::command().try_get_matches_from(std::env::args_os())?;
    let Some(m) = m
        .subcommand_matches("plan")
        .and_then(|m| m.subcommand_matches("create"))
    else {
        return Ok(Vec::new());
    };
    let starts: Vec<usize> = m
        .indices_of("groups")
        .map(|i| i.collect())
        .unwrap_or_default();
    let mut steps = vec![ferry_api::GroupSteps::default(); groups.max(starts.len())];
    let group_of = |flag: &str, idx: usize| -> Result<usize> {
        starts.iter().rposition(|&s| s < idx).ok_or_else(|| {
            anyhow::anyhow!("--{flag} belongs to a group: put it after the --group it applies to")
        })
    };
    let each = |id: &str| -> Vec<(String, usize)> {
        match (m.get_raw(id), m.indices_of(id)) {
            (Some(vals), Some(idx)) => vals
                .map(|v| v.to_string_lossy().into_owned())
                .zip(idx)
                .collect(),
            _ => Vec::new(),
        }
    };
    for (flag, id) in [
        ("pre", "pre"),
        ("post", "post"),
        ("timeout", "timeout"),
        ("pause", "pause"),
        ("parallel", "parallel"),
    ] {
        for (v, idx) in each(id) {
            let g = group_of(flag, idx)?;
            let st = &mut steps[g];
            let twice = |set: bool| -> Result<()> {
                if set {
                    bail!("group {} has --{flag} twice; give each group one", g + 1);
                }
                Ok(())
            };
            match flag {
                "pre" => {
                    twice(st.pre.is_some())?;
                    st.pre = Some(v);
                }
                "post" => {
                    twice(st.post.is_some())?;
                    st.post = Some(v);
                }
                "timeout" => {
                    twice(st.timeout_s.is_some())?;
                    st.timeout_s = Some(
                        ferry_model::parse_duration(&v)
                            .map_err(|e| anyhow::anyhow!("--timeout {v}: {e}"))?
                            .as_secs(),
                    );
                }
                "pause" => {
                    twice(st.pause.is_some())?;
                    st.pause = Some(v);
                }
                _ => {
                    twice(st.parallel.is_some())?;
                    st.parallel =
                        Some(v.parse().map_err(|_| {
                            anyhow::anyhow!("--parallel takes a number, not {v:?}")
                        })?);
                }
            }
        }
    }
    Ok(steps)
}

/// Prints a site with its network map.
fn print_site(s: &SiteView, j: bool) {
    if j {
        output::json(s);
        return;
    }
    println!("site {} ({}) store {}", s.name, s.role.as_str(), s.store);
    if s.network_map.is_empty() {
        println!("  no network map: NICs join switches of the same name at other sites");
    }
    for m in &s.network_map {
        println!("  switch {} ↔ {}:{}", m.switch, m.to_site, m.to_switch);
    }
}

fn fmt_groups(groups: &[Vec<String>]) -> String {
    groups
        .iter()
        .enumerate()
        .map(|(i, g)| format!("[{}] {}", i + 1, g.join(", ")))
        .collect::<Vec<_>>()
        .join(" → ")
}
