//! Hypervisors behind one small trait, and the built-in `dir` driver.
//!
//! The `dir` driver needs no hypervisor: a VM is a folder `<root>/<vm>/` with `vm.json`
//! and raw disk images `disk0.raw`, `disk1.raw`, … (sparse where zero). "Running" is a flag
//! in `vm.json`; while a VM runs, anything that writes its disk files plays the guest. It is
//! the driver for trying ferry, for tests, and for sites whose disks are plain files.
use std::path::PathBuf;

use ferry_blocks::{BlockDevice, DiskStamp};
use ferry_model::Host;
use serde::{Deserialize, Serialize};

mod dir;
pub use dir::DirDriver;

/// Disk formats ferry can read and write.
pub const SUPPORTED_FORMATS: &[&str] = &["raw"];

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
    #[error("VM {vm} on host {host} cannot start: disk {disk} is inconsistent (a failback sync was interrupted); resume it with `ferry failback {vm}`")]
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
    /// Invalid input.
    #[error("{0}")]
    Invalid(String),
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
    /// Image format (`raw`).
    pub format: String,
    /// False while a sync into it is incomplete; such a VM refuses to start.
    pub consistent: bool,
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
}

/// What to create.
#[derive(Debug, Clone, PartialEq, Eq)]
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
        }
    }
}

/// A hypervisor endpoint: creates, runs and deletes VMs and opens their disks.
pub trait Hypervisor: Send + Sync {
    /// The host this driver manages.
    fn host(&self) -> &Host;
    /// Fails with [`HvError::NotConnected`] when the host cannot be used.
    fn check_connected(&self) -> Result<()>;
    /// Every VM on the host.
    fn list_vms(&self) -> Result<Vec<VmInfo>>;
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

/// Opens the driver for a host.
pub fn connect(host: &Host) -> Result<Box<dyn Hypervisor>> {
    match host.driver {
        ferry_model::DriverKind::Dir => Ok(Box::new(DirDriver::new(host.clone()))),
        ferry_model::DriverKind::Qemu => Err(HvError::Invalid(format!(
            "host {}: the qemu driver is not built into this version of ferry yet; use --driver dir",
            host.name
        ))),
    }
}
