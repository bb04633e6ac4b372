//! ferry's workflows — protect, replicate, failover, commit, failback (two-phase delta or full),
//! complete, cancel, reverse replication — as durable jobs over the vault, the store and the
//! hypervisor drivers.
//!
//! Error policy: every refusal happens before anything changes and its message names the
//! object, its state and the command to run next.
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use ferry_blocks::{BlockMap, MapJournal};
use ferry_hypervisor::{ChangeMark, Hypervisor, VmInfo};
use ferry_model::{Host, ItemState, Job, ProtectedItem, Site, SiteRole};
use ferry_store::Store;
use ferry_vault::Vault;
use serde::{Deserialize, Serialize};

pub mod data;
pub mod faults;
pub mod hooks;
pub mod jobs;
pub mod pipeline;
pub mod plans;
pub mod points;
mod workflows;

pub use jobs::{Cancelled, JobCtx, Observer};
pub use plans::{PlanAction, PlanRun, PlanStep, PlanStopped};

pub use workflows::{
    parse_rfc3339, test_copy_name, DryRun, DryRunDisk, FailbackOpts, FailoverMode, RunOpts,
    TestCopy, VerifyReport, TEST_SWITCH,
};

/// Which copy of a protected VM a map or stamp describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Copy {
    /// The copy at the primary site.
    Primary,
    /// The copy at the recovery site.
    Recovery,
}

impl Copy {
    fn dir(&self) -> &'static str {
        match self {
            Copy::Primary => "primary",
            Copy::Recovery => "recovery",
        }
    }
}

/// What ferry knows about one copy's disks: where they are and how they looked when their map
/// files were last known to be exact.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CopyState {
    /// Host of the copy.
    pub host: String,
    /// Per disk, the change mark of the moment its map was last exact (older vaults' stamps
    /// are not read back: those disks are scanned once).
    #[serde(default)]
    pub marks: Vec<Option<ChangeMark>>,
}

/// The engine's private state of a protected item (kept as JSON in the vault).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ItemExtra {
    /// Primary copy's map state.
    pub primary: Option<CopyState>,
    /// Recovery copy's map state.
    pub recovery: Option<CopyState>,
    /// Host where a failover started creating the recovery VM (cleaned up on re-run).
    pub failover_partial: Option<String>,
    /// Id of the key the replication is encrypted with (None: plaintext).
    #[serde(default)]
    pub key_id: Option<String>,
    /// Key file given at protect time (stays with the operator; used by replication cycles).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Shape of the VM as last replicated, to recreate it when the primary is unreachable.
    #[serde(default)]
    pub vm_spec: Option<SavedSpec>,
    /// Host an agent `apply` was sent to and whose new maps are not saved yet: its disks may
    /// hold more than the saved maps say (its journal knows), so the next sync must send it
    /// an apply even when the maps agree.
    #[serde(default)]
    pub apply_pending: Option<String>,
    /// The test copy (a drill) running at the recovery site, if any.
    #[serde(default)]
    pub test: Option<TestCopy>,
    /// The point the recovery copy was restored from, while a failover awaits commit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_point: Option<i64>,
    /// `ferry serve` takes an app-consistent point when the newest is this old (seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_every_secs: Option<u64>,
    /// App-consistent points are kept this long, beyond the retention (seconds; None: 24 h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_retention_secs: Option<u64>,
}

/// How a VM is protected: `ferry protect`'s settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Protection {
    /// Recovery-point objective (how often `ferry serve` runs a cycle).
    pub rpo: Duration,
    /// How long points are kept (the newest always is).
    pub retention: Duration,
    /// Change-detection block size in bytes.
    pub block_size: u64,
    /// App-consistent points.
    pub app: AppPolicy,
}

/// How often app-consistent points are taken and how long they are kept.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AppPolicy {
    /// Take one when the newest app-consistent point is this old (`ferry serve`'s scheduler).
    pub every: Option<Duration>,
    /// Keep them this long (default [`DEFAULT_APP_RETENTION`]).
    pub retention: Option<Duration>,
}

/// How long app-consistent points are kept when `--app-retention` is not given.
pub const DEFAULT_APP_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// The shape of a protected VM (everything but its disks' content).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSpec {
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Switch of each NIC.
    pub nics: Vec<String>,
    /// Boot image (`guest`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

impl From<ferry_hypervisor::VmSpec> for SavedSpec {
    fn from(s: ferry_hypervisor::VmSpec) -> Self {
        SavedSpec {
            cpus: s.cpus,
            memory: s.memory,
            nics: s.nics,
            image: s.image,
        }
    }
}

/// Status of a VM as `ferry status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// VM name.
    pub vm: String,
    /// Lifecycle state.
    pub state: ItemState,
    /// `primary` or `recovery`.
    pub active_site: String,
    /// The job running, waiting or last interrupted for this VM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job: Option<Job>,
    /// Its test copy, while one exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub test: Option<TestCopy>,
    /// While a failover awaits commit: the point the recovery copy was restored from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failover_point: Option<i64>,
}

/// One ferry installation opened by this process.
pub struct Engine {
    /// The ferry home folder.
    pub home: PathBuf,
    /// The vault connection.
    pub vault: Vault,
    observer: Option<Observer>,
    notify: Option<Notify>,
    key_file: Option<PathBuf>,
    key_id: Option<String>,
    remote: Option<Arc<dyn RemoteHosts>>,
}

/// Why hosts could not be asked (one message each).
type Unreachable = Vec<String>;

/// Drivers of hosts whose disks and hypervisor only their own `ferry agent` can reach.
pub trait RemoteHosts: Send + Sync {
    /// The driver of agent host `host`, forwarding each call to its agent.
    fn driver(&self, host: &Host) -> Result<Box<dyn Hypervisor>>;

    /// Runs a data operation on agent host `host` and answers its result (JSON of the
    /// operation's output). Progress reaches `ctx` while it runs, notes reach `note`; while
    /// the agent is away the call waits for it (and says so), unless the job is cancelled.
    fn data(
        &self,
        host: &Host,
        req: &data::DataReq,
        ctx: &JobCtx,
        note: &(dyn Fn(String) + Sync),
    ) -> Result<serde_json::Value>;
}

/// Receives one-line notes for the operator (e.g. the failback recommendation).
pub type Notify = Arc<dyn Fn(&str) + Send + Sync>;

impl Engine {
    /// Creates (idempotently) an installation at `home`.
    pub fn init(home: &Path) -> Result<Engine> {
        let vault = Vault::create(home)?;
        for d in ["stores", "hosts", "maps"] {
            std::fs::create_dir_all(home.join(d))
                .with_context(|| format!("creating {}", home.join(d).display()))?;
        }
        Ok(Engine {
            home: home.to_path_buf(),
            vault,
            observer: None,
            notify: None,
            key_file: None,
            key_id: None,
            remote: None,
        })
    }

    /// Opens an installation and settles jobs whose process died.
    pub fn open(home: &Path) -> Result<Engine> {
        let vault = Vault::open(home)?;
        let e = Engine {
            home: home.to_path_buf(),
            vault,
            observer: None,
            notify: None,
            key_file: None,
            key_id: None,
            remote: None,
        };
        e.reconcile()?;
        Ok(e)
    }

    /// Another engine on the same installation with the same settings (observer, key,
    /// agents) and its own vault connection: for jobs that run in parallel threads.
    pub fn sibling(&self) -> Result<Engine> {
        Ok(Engine {
            home: self.home.clone(),
            vault: Vault::open(&self.home)?,
            observer: self.observer.clone(),
            notify: self.notify.clone(),
            key_file: self.key_file.clone(),
            key_id: self.key_id.clone(),
            remote: self.remote.clone(),
        })
    }

    /// Receives job snapshots while jobs run (for progress bars).
    pub fn set_observer(&mut self, o: Observer) {
        self.observer = Some(o);
    }

    /// Receives notes for the operator once a command's checks passed.
    pub fn set_notify(&mut self, n: Notify) {
        self.notify = Some(n);
    }

    /// The key file the operator passed (`--key`) for the next command.
    pub fn set_key_file(&mut self, p: Option<PathBuf>) {
        self.key_file = p.map(|p| self.abs(&p));
    }

    /// The key the operator passed (`--key`) for the next command: its file (read only by a
    /// process that moves the VM's data itself) and its id (read by the client from the file
    /// on its own machine; without it, the file's).
    pub fn set_key(&mut self, file: Option<PathBuf>, id: Option<String>) {
        self.set_key_file(file);
        self.key_id = id;
    }

    /// Id of the key the operator passed, if any (from the client, else read from the file).
    pub(crate) fn operator_key_id(&self) -> Result<Option<String>> {
        if let Some(id) = &self.key_id {
            return Ok(Some(id.clone()));
        }
        Ok(self.given_key()?.map(|k| k.id()))
    }

    /// Loads the key file passed with `--key`, if any.
    pub(crate) fn given_key(&self) -> Result<Option<ferry_store::crypto::Key>> {
        self.key_file
            .as_deref()
            .map(ferry_store::crypto::Key::load)
            .transpose()
            .map_err(Into::into)
    }

    /// The key of a VM's replication: the one passed with `--key` (checked against the key the
    /// VM was protected with) or, when `recorded_ok`, the key file recorded at protect time.
    pub(crate) fn item_key(
        &self,
        vm: &str,
        recorded_ok: bool,
    ) -> Result<Option<ferry_store::crypto::Key>> {
        let extra = self.extra(vm)?;
        let Some(id) = extra.key_id else {
            if self.key_file.is_some() {
                bail!("VM {vm} is replicated without encryption; run the command without --key");
            }
            return Ok(None);
        };
        let path = match (&self.key_file, &extra.key_file) {
            (Some(p), _) => p.clone(),
            (None, Some(p)) if recorded_ok => p.clone(),
            _ => bail!("VM {vm}'s recovery points are encrypted (key {id}); pass the key it was protected with: --key FILE"),
        };
        let key = ferry_store::crypto::Key::load(&path)?;
        if key.id() != id {
            bail!(
                "wrong key: {} holds key {}, but VM {vm} was protected with key {id}; pass that key with --key FILE",
                path.display(),
                key.id()
            );
        }
        Ok(Some(key))
    }

    /// The store namespace of a protected item opened in this process (with its key when
    /// encrypted), holding a lease while it lives.
    pub(crate) fn open_item_store(&self, item: &ProtectedItem) -> Result<Arc<Store>> {
        let key = self.item_key(&item.vm, true)?;
        let s = self.site(&item.recovery_site)?;
        let store = Store::open_with(&s.store, key.as_ref())
            .with_context(|| format!("site {}: store unreachable", item.recovery_site))?;
        store.hold_lease(&format!("ferry job for VM {}", item.vm))?;
        Ok(Arc::new(store))
    }

    /// How a protected item's block ids are computed.
    pub(crate) fn item_hasher(&self, vm: &str) -> Result<ferry_blocks::Hasher> {
        Ok(ferry_blocks::Hasher::keyed(
            self.item_key(vm, true)?.map(|k| k.block_id_key()),
        ))
    }

    pub(crate) fn note(&self, s: &str) {
        if let Some(n) = &self.notify {
            n(s);
        }
    }

    // ---- inventory ----

    /// Adds a site; the store defaults to a folder under the home. A recovery site's store is
    /// opened once to check it, unless `check_store` is false (a control plane whose agents
    /// hold the store's credentials: they open it when they first use it).
    pub fn add_site(
        &self,
        name: &str,
        role: SiteRole,
        store: Option<String>,
        check_store: bool,
    ) -> Result<Site> {
        ferry_model::validate_name("site", name)?;
        let store = match store {
            Some(s) => s,
            None => format!(
                "file://{}",
                self.abs(&self.home.join("stores").join(name)).display()
            ),
        };
        ferry_store::backend::check_store_url(&store)?;
        if role == SiteRole::Recovery && check_store {
            Store::open(&store).with_context(|| {
                format!("site {name}: cannot open its store from here (when only ferry agents use it, with their own credentials, add the site with --no-store-check)")
            })?;
        }
        let site = Site {
            name: name.into(),
            role,
            store,
        };
        self.vault.add_site(&site)?;
        Ok(site)
    }

    fn abs(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            std::env::current_dir()
                .map(|c| c.join(p))
                .unwrap_or_else(|_| p.to_path_buf())
        }
    }

    /// Adds a host to a site; its root defaults to a folder under the home. An `agent` host is
    /// served by a `ferry agent` on its own machine, whose `--root` becomes the host's root.
    #[allow(clippy::too_many_arguments)]
    pub fn add_host(
        &self,
        name: &str,
        site: &str,
        driver: ferry_model::DriverKind,
        root: Option<PathBuf>,
        switches: Vec<String>,
        accel: Option<String>,
        agent: bool,
    ) -> Result<Host> {
        if let Some(a) = &accel {
            if driver != ferry_model::DriverKind::Qemu {
                bail!(
                    "--accel applies to the qemu driver only (host {name} uses {})",
                    driver.as_str()
                );
            }
            ferry_hypervisor::qemu::Accel::parse(a).map_err(|e| anyhow!("--accel: {e}"))?;
        }
        ferry_model::validate_name("host", name)?;
        for s in &switches {
            ferry_model::validate_name("switch", s)?;
        }
        self.site(site)?;
        if self.vault.host(name)?.is_some() {
            bail!("host {name} already exists; see it with `ferry host show {name}`");
        }
        if agent && root.is_some() {
            bail!("--root applies to hosts ferry drives itself; an agent host's root is the agent's `ferry agent --root DIR` on its own machine");
        }
        let root = if agent {
            PathBuf::new()
        } else {
            let root = self.abs(&root.unwrap_or_else(|| self.home.join("hosts").join(name)));
            std::fs::create_dir_all(&root)
                .with_context(|| format!("cannot create host root {}", root.display()))?;
            root
        };
        let mut sw = switches;
        sw.dedup();
        let host = Host {
            name: name.into(),
            site: site.into(),
            driver,
            root,
            switches: sw,
            accel: accel.map(|a| a.trim().to_ascii_lowercase()),
            agent,
        };
        if !agent {
            ferry_hypervisor::connect(&host)?;
        }
        self.vault.add_host(&host)?;
        Ok(host)
    }

    /// Maps switch `a_switch` of site `a` to `b_switch` of site `b`, both ways: a failover or
    /// failback between them attaches a NIC on one to the other.
    pub fn map_network(&self, a: &str, a_switch: &str, b: &str, b_switch: &str) -> Result<()> {
        self.site(a)?;
        self.site(b)?;
        if a == b {
            bail!("a network map joins two sites; {a} is named twice");
        }
        ferry_model::validate_name("switch", a_switch)?;
        ferry_model::validate_name("switch", b_switch)?;
        self.vault.map_network(a, a_switch, b, b_switch)?;
        Ok(())
    }

    /// The switches `vm`'s NICs (on `switches`, at site `from`) join on host `to`: each one's
    /// mapped switch (`ferry site map-network`), else the same name; refused, naming the NIC
    /// and the fix, when `to` lacks that switch.
    pub fn target_nics(
        &self,
        vm: &str,
        from: &str,
        to: &Host,
        switches: &[String],
    ) -> Result<Vec<String>> {
        switches
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let mapped = if from == to.site {
                    None
                } else {
                    self.vault.mapped_switch(from, s, &to.site)?
                };
                let target = mapped.clone().unwrap_or_else(|| s.clone());
                if to.switches.contains(&target) {
                    return Ok(target);
                }
                let have = if to.switches.is_empty() {
                    "none".to_string()
                } else {
                    to.switches.join(", ")
                };
                match mapped {
                    Some(m) => bail!(
                        "NIC {i} of VM {vm} is on switch {s} at site {from}, mapped to {m} at site {}, but host {} has no switch {m} (it has: {have}); add it to the host or map the network again with `ferry site map-network {from}:{s}={}:SWITCH`",
                        to.site, to.name, to.site
                    ),
                    None => bail!(
                        "NIC {i} of VM {vm} is on switch {s} at site {from}, which has no mapping to site {} and host {} has no switch {s} (it has: {have}); map it with `ferry site map-network {from}:{s}={}:SWITCH`",
                        to.site, to.name, to.site
                    ),
                }
            })
            .collect()
    }

    /// A site by name.
    pub fn site(&self, name: &str) -> Result<Site> {
        self.vault.site(name)?.ok_or_else(|| {
            anyhow!(
                "no site named {name}; add it with `ferry site add {name} --role primary|recovery`"
            )
        })
    }

    /// A host by name.
    pub fn host(&self, name: &str) -> Result<Host> {
        self.vault
            .host(name)?
            .ok_or_else(|| anyhow!("no host named {name}; add it with `ferry host add {name} --site SITE --driver dir`"))
    }

    /// The driver of a host: in this process, or through the host's agent.
    pub fn driver(&self, host: &Host) -> Result<Box<dyn Hypervisor>> {
        if host.agent {
            return match &self.remote {
                Some(r) => r.driver(host),
                None => bail!(
                    "host {} is served by a ferry agent; run this command against the control plane it reports to (`--server URL`, or FERRY_SERVER)",
                    host.name
                ),
            };
        }
        Ok(ferry_hypervisor::connect(host)?)
    }

    /// Reaches hosts served by agents (set by `ferry serve`).
    pub fn set_remote(&mut self, r: Arc<dyn RemoteHosts>) {
        self.remote = Some(r);
    }

    /// The store of a site.
    pub fn store(&self, site: &str) -> Result<Arc<Store>> {
        let s = self.site(site)?;
        Ok(Arc::new(Store::open(&s.store).with_context(|| {
            format!("site {site}: store unreachable")
        })?))
    }

    /// The protected item of a VM, or an error saying how to protect it.
    pub fn item(&self, vm: &str) -> Result<ProtectedItem> {
        ferry_model::validate_name("VM", vm)?;
        self.vault.item(vm)?.ok_or_else(|| {
            anyhow!("VM {vm} is unprotected; protect it first with `ferry protect {vm} --to SITE`")
        })
    }

    /// Every copy of a VM on any connected host.
    pub fn copies(&self, vm: &str) -> Result<Vec<(Host, VmInfo)>> {
        Ok(self.copies_and_unreachable(vm)?.0)
    }

    /// Every copy of a VM on any connected host, and why each other host cannot be asked.
    fn copies_and_unreachable(&self, vm: &str) -> Result<(Vec<(Host, VmInfo)>, Unreachable)> {
        let (mut out, mut unreachable) = (Vec::new(), Vec::new());
        for h in self.vault.hosts()? {
            // A host out of reach (an agent host in embedded mode, a disconnected one) has no
            // copy to show.
            let d = match self.driver(&h) {
                Ok(d) => d,
                Err(e) => {
                    unreachable.push(format!("{e:#}"));
                    continue;
                }
            };
            if let Err(e) = d.check_connected() {
                unreachable.push(e.to_string());
                continue;
            }
            if let Some(info) = d.get_vm(vm)? {
                out.push((h, info));
            }
        }
        Ok((out, unreachable))
    }

    /// The copy of `vm` that `vm …` commands address: on `host` if given, else the active copy.
    pub fn locate_vm(&self, vm: &str, host: Option<&str>) -> Result<(Host, VmInfo)> {
        ferry_model::validate_name("VM", vm)?;
        if let Some(h) = host {
            let host = self.host(h)?;
            let d = self.driver(&host)?;
            d.check_connected()?;
            let info = d.get_vm(vm)?.ok_or_else(|| {
                anyhow!("VM {vm} does not exist on host {h}; see `ferry vm list`")
            })?;
            return Ok((host, info));
        }
        if let Some(item) = self.vault.item(vm)? {
            let h = match (item.state.active_side(), &item.recovery_host) {
                (ferry_model::Side::Recovery, Some(r)) => r.clone(),
                _ => item.primary_host.clone(),
            };
            return self.locate_vm(vm, Some(&h));
        }
        let (copies, unreachable) = self.copies_and_unreachable(vm)?;
        match copies.len() {
            0 if !unreachable.is_empty() => bail!(
                "VM {vm} is on none of the connected hosts, and some hosts cannot be asked: {}",
                unreachable.join("; ")
            ),
            0 => bail!("VM {vm} does not exist on any host; create it with `ferry vm create {vm} --host HOST --disk SIZE`"),
            1 => Ok(copies.into_iter().next().unwrap()),
            _ => bail!(
                "VM {vm} exists on several hosts ({}); pick one with --host",
                copies.iter().map(|c| c.0.name.as_str()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    // ---- engine state of items ----

    fn extra(&self, vm: &str) -> Result<ItemExtra> {
        serde_json::from_value(self.vault.item_extra(vm)?).with_context(|| {
            format!("the vault's state of VM {vm} cannot be read (written by a newer ferry?); upgrade ferry, or re-protect the VM")
        })
    }

    fn set_extra(&self, vm: &str, e: &ItemExtra) -> Result<()> {
        self.vault.set_item_extra(vm, &serde_json::to_value(e)?)?;
        Ok(())
    }

    fn map_dir(&self, vm: &str, copy: Copy) -> PathBuf {
        self.home.join("maps").join(vm).join(copy.dir())
    }

    fn map_path(&self, vm: &str, copy: Copy, disk: u32) -> PathBuf {
        self.map_dir(vm, copy).join(format!("disk{disk}.map"))
    }

    fn journal_path(&self, vm: &str, copy: Copy, disk: u32) -> PathBuf {
        self.map_dir(vm, copy).join(format!("disk{disk}.journal"))
    }

    /// The map of a copy's disk when one exists and fits a disk of `size` bytes in blocks of
    /// `block_size` (a map of another shape describes nothing about this disk).
    fn load_fitting_map(
        &self,
        vm: &str,
        copy: Copy,
        disk: u32,
        size: u64,
        block_size: u64,
    ) -> Result<Option<BlockMap>> {
        Ok(self
            .load_map(vm, copy, disk)?
            .filter(|m| m.size == size && m.block_size == block_size))
    }

    /// The map file of a copy's disk with its journal applied, if one exists.
    fn load_map(&self, vm: &str, copy: Copy, disk: u32) -> Result<Option<BlockMap>> {
        let _span = tracing::debug_span!("load_map", ?copy, disk).entered();
        let p = self.map_path(vm, copy, disk);
        if !p.exists() {
            return Ok(None);
        }
        let mut m = BlockMap::load(&p)?;
        MapJournal::replay(&self.journal_path(vm, copy, disk), &mut m)?;
        Ok(Some(m))
    }

    /// Saves a copy's disk map and empties its journal.
    fn save_map(&self, vm: &str, copy: Copy, disk: u32, m: &BlockMap) -> Result<()> {
        let _span = tracing::debug_span!("save_map", ?copy, disk).entered();
        std::fs::create_dir_all(self.map_dir(vm, copy))?;
        m.save(&self.map_path(vm, copy, disk))?;
        MapJournal::reset(&self.journal_path(vm, copy, disk))?;
        Ok(())
    }

    fn drop_maps(&self, vm: &str, copy: Copy) -> Result<()> {
        let d = self.map_dir(vm, copy);
        if d.exists() {
            std::fs::remove_dir_all(&d).with_context(|| format!("removing {}", d.display()))?;
        }
        Ok(())
    }

    // ---- status ----

    /// State, active site and current job of a protected VM.
    pub fn status(&self, vm: &str) -> Result<Status> {
        let item = self.item(vm)?;
        let job = match item.job {
            Some(id) => self.vault.job(id)?,
            None => None,
        };
        let extra = self.extra(vm)?;
        Ok(Status {
            failover_point: extra
                .failover_point
                .filter(|_| item.state == ItemState::FailoverCommitPending),
            vm: item.vm,
            state: item.state,
            active_site: item.state.active_side().as_str().into(),
            job,
            test: extra.test,
        })
    }

    /// Settles jobs whose process died: the job fails and its item becomes recoverable.
    fn reconcile(&self) -> Result<()> {
        for job in self.vault.jobs(false)? {
            if job.state != ferry_model::JobState::Running {
                continue;
            }
            let alive = self
                .vault
                .job_runner(job.id)?
                .is_some_and(|r| jobs::runner_alive(&r));
            if alive {
                continue;
            }
            self.vault.atomically(|v| {
                // Re-check inside the transaction: another process may have settled it.
                if v.job(job.id)?.map(|j| j.state) != Some(ferry_model::JobState::Running) {
                    return Ok(());
                }
                let params = v.job_params(job.id)?;
                let side = workflows::side_mode(&params);
                let flag = match side {
                    Some("change-point") => format!(
                        " --point {}",
                        params.get("point").and_then(|p| p.as_i64()).unwrap_or_default()
                    ),
                    Some(m) => format!(" --{m}"),
                    None => String::new(),
                };
                let msg = format!(
                    "interrupted: the ferry process running this job stopped unexpectedly; run `ferry {} {}{flag}` to resume",
                    workflows::resume_command(job.kind),
                    job.vm,
                );
                v.set_job_state(job.id, ferry_model::JobState::Failed, Some(&msg))?;
                if let Some(mut item) = v.item(&job.vm)? {
                    // A drill's job leaves the lifecycle state alone.
                    if item.job == Some(job.id) && side.is_none() {
                        let cmd = workflows::command_of(job.kind, item.state, &v.job_params(job.id)?);
                        item.state = ferry_model::finish(item.state, cmd, ferry_model::Outcome::Abandoned);
                        v.update_item(&item)?;
                    }
                }
                v.event(Some(&job.vm), Some(job.id), &msg)?;
                Ok(())
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_state_with_every_kind_of_change_mark_round_trips_through_json() {
        let stamp = ferry_blocks::DiskStamp {
            dev: 1,
            ino: 2,
            size: 3,
            mtime_ns: 1_795_702_417_943_952_769,
            ctime_ns: 1_795_702_417_943_952_769,
            taken_ns: 1_795_702_417_952_309_257,
            local_fs: true,
        };
        let e = ItemExtra {
            primary: Some(CopyState {
                host: "h1".into(),
                marks: vec![Some(ChangeMark::Stamp { stamp }), None],
            }),
            recovery: Some(CopyState {
                host: "r1".into(),
                marks: vec![Some(ChangeMark::Bitmap {
                    name: "ferry-17".into(),
                })],
            }),
            key_id: Some("k1".into()),
            ..Default::default()
        };
        let v = serde_json::to_value(&e).unwrap();
        let back: ItemExtra = serde_json::from_value(v).unwrap();
        assert_eq!(back.primary, e.primary);
        assert_eq!(back.recovery, e.recovery);
        assert_eq!(back.key_id, e.key_id);
    }
}
