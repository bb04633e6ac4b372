//! Hypervisors behind one small trait: the built-in `dir` driver and the `qemu` driver.
//!
//! The `dir` driver needs no hypervisor: a VM is a folder `<root>/<vm>/` with `vm.json`
//! and raw disk images `disk0.raw`, `disk1.raw`, … (sparse where zero). "Running" is a flag
//! in `vm.json`; while a VM runs, anything that writes its disk files plays the guest. It is
//! the driver for trying ferry, for tests, and for sites whose disks are plain files.
//!
//! The `qemu` driver ([`QemuDriver`]) runs real `qemu-system-x86_64` processes with qcow2
//! disks, drives them over QMP ([`qmp`]) and reads and writes their disks over NBD.
use std::path::PathBuf;

use ferry_blocks::{BlockDevice, DiskStamp};
use ferry_model::Host;
use serde::{Deserialize, Serialize};

mod dir;
pub mod guest;
pub mod qemu;
pub mod qga;
pub mod qmp;
pub use dir::DirDriver;
pub use qemu::QemuDriver;

/// Errors of hypervisor drivers; messages say what to do next.
#[derive(Debug, thiserror::Error)]
pub enum HvError {
    /// The host cannot be reached.
    #[error("host {host} is not connected: its root folder {root} is not accessible ({reason}); check that the folder exists and is readable here (a missing mount?), then retry")]
    NotConnected {
        /// Host name.
        host: String,
        /// Root folder.
        root: String,
        /// Why.
        reason: String,
    },
    /// An agent host whose agent does not answer.
    #[error("host {host} is not connected: its agent {seen}; start `ferry agent --host {host} …` on that machine (or check its network to the control plane), then retry")]
    Disconnected {
        /// Host name.
        host: String,
        /// When it was last seen, in words.
        seen: String,
    },
    /// No such VM on the host.
    #[error("VM {vm} does not exist on host {host}")]
    NoSuchVm {
        /// VM name.
        vm: String,
        /// Host name.
        host: String,
    },
    /// The VM already exists.
    #[error("VM {vm} already exists on host {host}")]
    VmExists {
        /// VM name.
        vm: String,
        /// Host name.
        host: String,
    },
    /// A NIC's switch is missing on the host.
    #[error("host {host} has no switch named {switch:?} (it has: {available}); add it with `ferry host add {host} --switch {switch} …` or pick another host")]
    MissingSwitch {
        /// Host name.
        host: String,
        /// Missing switch.
        switch: String,
        /// Switches the host has.
        available: String,
    },
    /// A disk is inconsistent (an interrupted sync), so the VM must not start.
    #[error("VM {vm} on host {host} cannot start: disk {disk} is inconsistent (a failback sync into it, or a failover restoring it, did not finish); resume it with `ferry failback {vm}` or `ferry failover {vm}`")]
    Inconsistent {
        /// VM name.
        vm: String,
        /// Host name.
        host: String,
        /// Disk index.
        disk: u32,
    },
    /// A file operation failed.
    #[error("host {host}: {detail}")]
    Io {
        /// Host name.
        host: String,
        /// What failed.
        detail: String,
    },
    /// The VM runs, and the action needs it stopped.
    #[error("VM {vm} on host {host} is running, and {action} needs it stopped; stop it with `ferry vm stop {vm} --host {host}` and retry")]
    Running {
        /// VM name.
        vm: String,
        /// Host name.
        host: String,
        /// What was refused.
        action: String,
    },
    /// A program the driver needs is not installed.
    #[error("host {host}: the {driver} driver needs `{program}`, which is not on PATH; {hint}")]
    MissingProgram {
        /// Host name.
        host: String,
        /// Driver name.
        driver: String,
        /// Program name.
        program: String,
        /// How to install it.
        hint: String,
    },
    /// A hypervisor process (QEMU, qemu-nbd) failed or misbehaved.
    #[error("host {host}, VM {vm}: {detail}")]
    Process {
        /// Host name.
        host: String,
        /// VM name.
        vm: String,
        /// What happened and what to do.
        detail: String,
    },
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
    /// No guest agent answered, so nothing was asked of the guest (nothing to thaw).
    #[error("VM {vm} on host {host}: {detail}")]
    NoGuestAgent {
        /// VM name.
        vm: String,
        /// Host name.
        host: String,
        /// Why.
        detail: String,
    },
    /// The guest could not be frozen or thawed through its guest agent.
    #[error("VM {vm} on host {host}: {detail}")]
    GuestAgent {
        /// VM name.
        vm: String,
        /// Host name.
        host: String,
        /// What failed.
        detail: String,
    },
}

/// Result alias of drivers.
pub type Result<T> = std::result::Result<T, HvError>;

/// Power state of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Power {
    /// Running its workload.
    Running,
    /// Stopped.
    Stopped,
}

/// One virtual disk of a VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskInfo {
    /// Position of the disk on the VM.
    pub index: u32,
    /// Image file.
    pub path: PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// Image format (`raw` or `qcow2`).
    pub format: String,
    /// False while a sync into it is incomplete; such a VM refuses to start.
    pub consistent: bool,
    /// Block node name of the disk inside the hypervisor (`disk0` for QEMU), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Guest device id of the disk (`vblk0` for QEMU; its block backend for `qemu-io -d` is
    /// `vblk0/virtio-backend`), if it has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
}

/// One network adapter: the switch it is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nic {
    /// Switch name.
    pub switch: String,
}

/// A VM as a host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM name.
    pub name: String,
    /// Host it lives on.
    pub host: String,
    /// Power state.
    pub power: Power,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Disks in index order.
    pub disks: Vec<DiskInfo>,
    /// Network adapters.
    pub nics: Vec<Nic>,
    /// The VM's QMP monitor socket (QEMU only; it answers while the VM runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qmp: Option<PathBuf>,
    /// The boot image the VM runs (`guest`: ferry's test guest), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
}

/// What ferry keeps to learn later which parts of a disk changed since a moment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeMark {
    /// A change stamp of the disk file (`dir` driver): an equal stamp later proves no write.
    Stamp {
        /// The stamp.
        stamp: DiskStamp,
    },
    /// A persistent dirty bitmap in the disk image (`qemu` driver) that records every write
    /// since; later bitmaps of the same disk continue it (see the driver's documentation).
    Bitmap {
        /// Bitmap name (`ferry-<generation>`).
        name: String,
    },
}

/// What changed on a disk since a [`ChangeMark`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Changes {
    /// Only these byte ranges `[start, end)` may differ (empty: nothing changed).
    Ranges(Vec<(u64, u64)>),
    /// Unknown: every block must be read. `Some(reason)` when tracking existed but cannot be
    /// trusted (worth telling the user), `None` when there was nothing to go by.
    Unknown(Option<String>),
}

/// One disk of a [`DiskView`].
pub struct ViewDisk {
    /// Disk index.
    pub index: u32,
    /// The disk's content at the view's moment, read-only.
    pub dev: Box<dyn BlockDevice>,
    /// What changed since the mark the view was opened with.
    pub changes: Changes,
    /// The view's moment as a mark (`None`: the disk cannot be tracked).
    pub mark: Option<ChangeMark>,
}

impl std::fmt::Debug for ViewDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewDisk")
            .field("index", &self.index)
            .field("changes", &self.changes)
            .field("mark", &self.mark)
            .finish_non_exhaustive()
    }
}

/// What a driver does when a view closes (`true`: the view's marks were recorded).
pub type ViewCloser = Box<dyn FnOnce(bool) -> Result<()> + Send>;

/// The disks of one VM opened together for reading, at one moment when `point_in_time`.
pub struct DiskView {
    /// The disks in index order.
    pub disks: Vec<ViewDisk>,
    /// True when every disk shows the same instant (a stopped VM, or a snapshot of a running
    /// one); false when a running VM's disks are read as they are.
    pub point_in_time: bool,
    closer: Option<ViewCloser>,
}

impl std::fmt::Debug for DiskView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DiskView")
            .field("disks", &self.disks)
            .field("point_in_time", &self.point_in_time)
            .finish_non_exhaustive()
    }
}

impl DiskView {
    /// A view of `disks`; `closer` runs after the disks are closed.
    pub fn new(disks: Vec<ViewDisk>, point_in_time: bool, closer: Option<ViewCloser>) -> Self {
        DiskView {
            disks,
            point_in_time,
            closer,
        }
    }

    /// The view's marks, by disk index.
    pub fn marks(&self) -> Vec<Option<ChangeMark>> {
        self.disks.iter().map(|d| d.mark.clone()).collect()
    }

    /// Closes the disks and the view. `committed`: the caller recorded [`DiskView::marks`], so
    /// tracking older than them can go.
    pub fn close(mut self, committed: bool) -> Result<()> {
        let _span = tracing::debug_span!("close_view", committed).entered();
        self.disks.clear();
        match self.closer.take() {
            Some(c) => c(committed),
            None => Ok(()),
        }
    }
}

impl Drop for DiskView {
    fn drop(&mut self) {
        self.disks.clear();
        if let Some(c) = self.closer.take() {
            if let Err(e) = c(false) {
                tracing::warn!("closing a disk view: {e}");
            }
        }
    }
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VmSpec {
    /// VM name.
    pub name: String,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Memory in bytes.
    pub memory: u64,
    /// Disk sizes in bytes.
    pub disks: Vec<u64>,
    /// Switch of each NIC.
    pub nics: Vec<String>,
    /// Boot image (`guest`: ferry's test guest, see `scripts/guest-image.sh`); `None`: no
    /// operating system (the disks are data only).
    pub image: Option<String>,
}

impl VmSpec {
    /// A spec that recreates `vm` (same shape, new disks).
    pub fn like(vm: &VmInfo) -> Self {
        VmSpec {
            name: vm.name.clone(),
            cpus: vm.cpus,
            memory: vm.memory,
            disks: vm.disks.iter().map(|d| d.size).collect(),
            nics: vm.nics.iter().map(|n| n.switch.clone()).collect(),
            image: vm.image.clone(),
        }
    }
}

/// A hypervisor endpoint: creates, runs and deletes VMs and opens their disks.
pub trait Hypervisor: Send + Sync {
    /// The host this driver manages.
    fn host(&self) -> &Host;
    /// Fails with [`HvError::NotConnected`] when the host cannot be used.
    fn check_connected(&self) -> Result<()>;
    /// Every VM on the host (the VM folders under its root, by name).
    fn list_vms(&self) -> Result<Vec<VmInfo>> {
        self.check_connected()?;
        let mut out = Vec::new();
        for name in vm_names(self.host())? {
            if let Some(vm) = self.get_vm(&name)? {
                out.push(vm);
            }
        }
        Ok(out)
    }
    /// One VM, if it exists.
    fn get_vm(&self, name: &str) -> Result<Option<VmInfo>>;
    /// Creates a stopped VM with zeroed disks.
    fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo>;
    /// Deletes a VM and its disks.
    fn delete_vm(&self, name: &str) -> Result<()>;
    /// Starts a VM (idempotent); refuses while a disk is inconsistent.
    fn start_vm(&self, name: &str) -> Result<()>;
    /// Stops a VM (idempotent).
    fn stop_vm(&self, name: &str) -> Result<()>;
    /// Opens a disk for reading, or reading and writing.
    fn open_disk(&self, name: &str, index: u32, writable: bool) -> Result<Box<dyn BlockDevice>>;
    /// Records whether a disk holds a complete, consistent image.
    fn set_disk_consistent(&self, name: &str, index: u32, consistent: bool) -> Result<()>;
    /// Change evidence of a disk: equal trusted stamps prove it was not written in between.
    fn disk_stamp(&self, name: &str, index: u32) -> Result<Option<DiskStamp>>;

    /// Starts change tracking on every disk of `vm` from this moment (dropping older tracking)
    /// and returns one mark per disk (`None`: this disk cannot be tracked). The caller records
    /// the marks once the disks' maps are known at this moment.
    ///
    /// The default takes [`Hypervisor::disk_stamp`]s.
    fn mark_disks(&self, vm: &str) -> Result<Vec<Option<ChangeMark>>> {
        let info = self.get_vm(vm)?.ok_or_else(|| self.no_such_vm(vm))?;
        info.disks
            .iter()
            .map(|d| {
                Ok(self
                    .disk_stamp(vm, d.index)?
                    .map(|stamp| ChangeMark::Stamp { stamp }))
            })
            .collect()
    }

    /// Opens every disk of `vm` for reading as one view and says, per disk, what changed since
    /// the marks `since` (by disk index; `None`: nothing known). Each view disk carries the mark
    /// of the view's own moment; close the view with `committed = true` once those marks are
    /// recorded, so tracking older than them is dropped.
    ///
    /// The default compares [`Hypervisor::disk_stamp`]s and reads the disks as they are (a
    /// running VM's writes during the read make the next stamp differ, so nothing is missed).
    fn open_view(&self, vm: &str, since: &[Option<ChangeMark>]) -> Result<DiskView> {
        let info = self.get_vm(vm)?.ok_or_else(|| self.no_such_vm(vm))?;
        let mut disks = Vec::new();
        for d in &info.disks {
            let now = self.disk_stamp(vm, d.index)?;
            let changes = match (since.get(d.index as usize).cloned().flatten(), now) {
                (Some(ChangeMark::Stamp { stamp: old }), Some(now)) if old.unchanged_in(&now) => {
                    Changes::Ranges(Vec::new())
                }
                (Some(ChangeMark::Bitmap { .. }), _) => Changes::Unknown(Some(
                    "its change mark comes from another hypervisor driver".into(),
                )),
                _ => Changes::Unknown(None),
            };
            let dev = self.open_disk(vm, d.index, false)?;
            disks.push(ViewDisk {
                index: d.index,
                dev,
                changes,
                mark: now.map(|stamp| ChangeMark::Stamp { stamp }),
            });
        }
        Ok(DiskView::new(disks, info.power == Power::Stopped, None))
    }

    /// Like [`Hypervisor::open_view`], for a look whose marks will not be recorded (a dry run,
    /// a disk about to be rewritten): no new tracking starts, the view's marks are `None`, and
    /// the disks' tracking is left as it was.
    fn peek_view(&self, vm: &str, since: &[Option<ChangeMark>]) -> Result<DiskView> {
        self.open_view(vm, since)
    }

    /// The error for a VM this host does not have.
    fn no_such_vm(&self, vm: &str) -> HvError {
        HvError::NoSuchVm {
            vm: vm.into(),
            host: self.host().name.clone(),
        }
    }

    /// Freezes the guest's file systems through its guest agent (they are flushed and take
    /// no writes until [`Hypervisor::thaw_guest`]), waiting at most `timeout`; returns how
    /// many were frozen. The default: this driver runs no guest agent.
    fn freeze_guest(&self, vm: &str, timeout: std::time::Duration) -> Result<u32> {
        let _ = timeout;
        Err(HvError::NoGuestAgent {
            vm: vm.into(),
            host: self.host().name.clone(),
            detail: "this host's driver has no guest agent channel".into(),
        })
    }

    /// Thaws what [`Hypervisor::freeze_guest`] froze (also after a freeze that timed out:
    /// the agent may finish it late). Nothing frozen: nothing happens.
    fn thaw_guest(&self, vm: &str) -> Result<()> {
        let _ = vm;
        Ok(())
    }

    /// Disk formats this driver reads and writes.
    fn disk_formats(&self) -> &'static [&'static str] {
        match self.host().driver {
            ferry_model::DriverKind::Dir => &["raw"],
            ferry_model::DriverKind::Qemu => &["qcow2"],
        }
    }

    /// Checks what every driver needs before creating `spec`: a connected host, its switches,
    /// at least one disk.
    fn check_spec(&self, spec: &VmSpec) -> Result<()> {
        self.check_connected()?;
        self.check_switches(&spec.nics)?;
        if spec.disks.is_empty() {
            return Err(HvError::Invalid(format!(
                "VM {} needs at least one disk",
                spec.name
            )));
        }
        Ok(())
    }

    /// Checks that every switch in `switches` exists on the host.
    fn check_switches(&self, switches: &[String]) -> Result<()> {
        let h = self.host();
        for s in switches {
            if !h.switches.iter().any(|x| x == s) {
                return Err(HvError::MissingSwitch {
                    host: h.name.clone(),
                    switch: s.clone(),
                    available: if h.switches.is_empty() {
                        "none".into()
                    } else {
                        h.switches.join(", ")
                    },
                });
            }
        }
        Ok(())
    }
}

/// Checks that a host's root folder exists and can be listed (how file-based drivers see
/// whether their host is connected).
pub fn check_root(host: &Host) -> Result<()> {
    let root = &host.root;
    let not = |reason: String| HvError::NotConnected {
        host: host.name.clone(),
        root: root.display().to_string(),
        reason,
    };
    let m = std::fs::metadata(root).map_err(|e| not(e.to_string()))?;
    if !m.is_dir() {
        return Err(not("not a folder".into()));
    }
    std::fs::read_dir(root).map_err(|e| not(e.to_string()))?;
    Ok(())
}

/// Names of the VM folders (holding a `vm.json`) under a host's root, sorted; names that are not
/// valid VM names are ignored (so nothing outside ferry's naming reaches a driver).
pub fn vm_names(host: &Host) -> Result<Vec<String>> {
    let io = |e: std::io::Error| HvError::Io {
        host: host.name.clone(),
        detail: format!("list VMs: {e}"),
    };
    let mut out = Vec::new();
    for e in std::fs::read_dir(&host.root).map_err(io)? {
        let e = e.map_err(io)?;
        let name = e.file_name().to_string_lossy().to_string();
        if e.path().join("vm.json").is_file() && ferry_model::validate_name("VM", &name).is_ok() {
            out.push(name);
        }
    }
    out.sort();
    Ok(out)
}

/// Opens the driver for a host (for `qemu`, fails when the QEMU programs are not installed).
pub fn connect(host: &Host) -> Result<Box<dyn Hypervisor>> {
    match host.driver {
        ferry_model::DriverKind::Dir => Ok(Box::new(DirDriver::new(host.clone()))),
        ferry_model::DriverKind::Qemu => Ok(Box::new(QemuDriver::new(host.clone())?)),
    }
}
