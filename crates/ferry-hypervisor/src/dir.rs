//! The `dir` driver: a VM is a folder with `vm.json` and raw disk images.
use std::path::{Path, PathBuf};

use ferry_blocks::{BlockDevice, DiskStamp, RawDisk};
use ferry_model::Host;
use serde::{Deserialize, Serialize};

use crate::{DiskInfo, HvError, Hypervisor, Nic, Power, Result, VmInfo, VmSpec};

/// `vm.json` as stored on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmFile {
    name: String,
    cpus: u32,
    memory: u64,
    power: Power,
    disks: Vec<DiskFile>,
    nics: Vec<Nic>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskFile {
    index: u32,
    file: String,
    size: u64,
    format: String,
    consistent: bool,
}

/// Driver for hosts whose VMs are folders of raw images.
#[derive(Debug, Clone)]
pub struct DirDriver {
    host: Host,
}

impl DirDriver {
    /// A driver for `host` (its `root` holds the VM folders).
    pub fn new(host: Host) -> Self {
        DirDriver { host }
    }

    fn vm_dir(&self, name: &str) -> Result<PathBuf> {
        ferry_model::validate_name("VM", name).map_err(|e| HvError::Invalid(e.to_string()))?;
        Ok(self.host.root.join(name))
    }

    fn io(&self, what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> HvError + '_ {
        let detail = what.to_string();
        move |e| HvError::Io {
            host: self.host.name.clone(),
            detail: format!("{detail}: {e}"),
        }
    }

    fn read(&self, name: &str) -> Result<Option<VmFile>> {
        let p = self.vm_dir(name)?.join("vm.json");
        match std::fs::read(&p) {
            Ok(b) => serde_json::from_slice(&b)
                .map(Some)
                .map_err(|e| HvError::Io {
                    host: self.host.name.clone(),
                    detail: format!("{} is not a valid vm.json: {e}", p.display()),
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io(p.display())(e)),
        }
    }

    /// Serializes read-modify-write of one VM's `vm.json` across processes (an advisory lock
    /// on `<vm>/.lock`, released when the guard drops).
    fn lock(&self, name: &str) -> Result<std::fs::File> {
        use std::os::unix::io::AsRawFd;
        let p = self.vm_dir(name)?.join(".lock");
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(self.io(p.display()))?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.io(p.display())(std::io::Error::last_os_error()));
        }
        Ok(f)
    }

    fn must_read(&self, name: &str) -> Result<VmFile> {
        self.read(name)?.ok_or_else(|| HvError::NoSuchVm {
            vm: name.into(),
            host: self.host.name.clone(),
        })
    }

    fn write(&self, vm: &VmFile) -> Result<()> {
        let p = self.vm_dir(&vm.name)?.join("vm.json");
        let data = serde_json::to_vec_pretty(vm).expect("vm.json serializes");
        ferry_blocks::map::write_atomic(&p, &data).map_err(|e| HvError::Io {
            host: self.host.name.clone(),
            detail: e.to_string(),
        })
    }

    fn disk_path(&self, vm: &VmFile, index: u32) -> Result<PathBuf> {
        let d = vm
            .disks
            .iter()
            .find(|d| d.index == index)
            .ok_or_else(|| HvError::Invalid(format!("VM {} has no disk {index}", vm.name)))?;
        if d.file.contains('/') || d.file.starts_with('.') {
            return Err(HvError::Invalid(format!(
                "VM {}: disk file name {:?} escapes the VM folder",
                vm.name, d.file
            )));
        }
        Ok(self.vm_dir(&vm.name)?.join(&d.file))
    }

    fn info(&self, vm: &VmFile) -> Result<VmInfo> {
        let disks = vm
            .disks
            .iter()
            .map(|d| {
                Ok(DiskInfo {
                    index: d.index,
                    path: self.disk_path(vm, d.index)?,
                    size: d.size,
                    format: d.format.clone(),
                    consistent: d.consistent,
                    node: None,
                    device: None,
                })
            })
            .collect::<Result<_>>()?;
        Ok(VmInfo {
            name: vm.name.clone(),
            host: self.host.name.clone(),
            power: vm.power,
            cpus: vm.cpus,
            memory: vm.memory,
            disks,
            nics: vm.nics.clone(),
            qmp: None,
            image: None,
        })
    }
}

fn is_vm_dir(p: &Path) -> bool {
    p.join("vm.json").is_file()
}

impl Hypervisor for DirDriver {
    fn host(&self) -> &Host {
        &self.host
    }

    fn check_connected(&self) -> Result<()> {
        crate::check_root(&self.host)
    }

    fn get_vm(&self, name: &str) -> Result<Option<VmInfo>> {
        self.check_connected()?;
        self.read(name)?.map(|v| self.info(&v)).transpose()
    }

    fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        self.check_spec(spec)?;
        if let Some(image) = &spec.image {
            return Err(HvError::Invalid(format!(
                "host {} (dir driver) runs no guest, so it cannot boot image {image:?}; create the VM on a qemu host",
                self.host.name
            )));
        }
        let dir = self.vm_dir(&spec.name)?;
        if is_vm_dir(&dir) {
            return Err(HvError::VmExists {
                vm: spec.name.clone(),
                host: self.host.name.clone(),
            });
        }
        std::fs::create_dir_all(&dir).map_err(self.io(dir.display()))?;
        let mut disks = Vec::new();
        for (i, &size) in spec.disks.iter().enumerate() {
            let file = format!("disk{i}.raw");
            RawDisk::create(&dir.join(&file), size).map_err(|e| HvError::Io {
                host: self.host.name.clone(),
                detail: e.to_string(),
            })?;
            disks.push(DiskFile {
                index: i as u32,
                file,
                size,
                format: "raw".into(),
                consistent: true,
            });
        }
        let vm = VmFile {
            name: spec.name.clone(),
            cpus: spec.cpus,
            memory: spec.memory,
            power: Power::Stopped,
            disks,
            nics: spec
                .nics
                .iter()
                .map(|s| Nic { switch: s.clone() })
                .collect(),
        };
        self.write(&vm)?;
        self.info(&vm)
    }

    fn delete_vm(&self, name: &str) -> Result<()> {
        self.check_connected()?;
        let dir = self.vm_dir(name)?;
        if !is_vm_dir(&dir) {
            return Err(HvError::NoSuchVm {
                vm: name.into(),
                host: self.host.name.clone(),
            });
        }
        std::fs::remove_dir_all(&dir).map_err(self.io(dir.display()))
    }

    fn start_vm(&self, name: &str) -> Result<()> {
        self.check_connected()?;
        let _guard = self.lock(name)?;
        let mut vm = self.must_read(name)?;
        if let Some(d) = vm.disks.iter().find(|d| !d.consistent) {
            return Err(HvError::Inconsistent {
                vm: name.into(),
                host: self.host.name.clone(),
                disk: d.index,
            });
        }
        if vm.power == Power::Running {
            return Ok(());
        }
        vm.power = Power::Running;
        self.write(&vm)
    }

    fn stop_vm(&self, name: &str) -> Result<()> {
        self.check_connected()?;
        let _guard = self.lock(name)?;
        let mut vm = self.must_read(name)?;
        if vm.power == Power::Stopped {
            return Ok(());
        }
        vm.power = Power::Stopped;
        self.write(&vm)
    }

    fn open_disk(&self, name: &str, index: u32, writable: bool) -> Result<Box<dyn BlockDevice>> {
        let vm = self.must_read(name)?;
        let p = self.disk_path(&vm, index)?;
        let d = RawDisk::open(&p, writable).map_err(|e| HvError::Io {
            host: self.host.name.clone(),
            detail: e.to_string(),
        })?;
        Ok(Box::new(d))
    }

    fn set_disk_consistent(&self, name: &str, index: u32, consistent: bool) -> Result<()> {
        let _guard = self.lock(name)?;
        let mut vm = self.must_read(name)?;
        let d = vm
            .disks
            .iter_mut()
            .find(|d| d.index == index)
            .ok_or_else(|| HvError::Invalid(format!("VM {name} has no disk {index}")))?;
        if d.consistent == consistent {
            return Ok(());
        }
        d.consistent = consistent;
        self.write(&vm)
    }

    fn disk_stamp(&self, name: &str, index: u32) -> Result<Option<DiskStamp>> {
        let vm = self.must_read(name)?;
        let p = self.disk_path(&vm, index)?;
        Ok(DiskStamp::take(&p).ok())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(root: &Path) -> Host {
        Host {
            name: "h1".into(),
            site: "prim".into(),
            driver: ferry_model::DriverKind::Dir,
            root: root.to_path_buf(),
            switches: vec!["lan".into()],
            accel: None,
            agent: false,
        }
    }

    fn spec(nics: &[&str]) -> VmSpec {
        VmSpec {
            name: "web1".into(),
            cpus: 2,
            memory: 1 << 30,
            disks: vec![1 << 20, 65536 + 7],
            nics: nics.iter().map(|s| s.to_string()).collect(),
            image: None,
        }
    }

    #[test]
    fn lifecycle_of_a_dir_vm() {
        let dir = tempfile::tempdir().unwrap();
        let d = DirDriver::new(host(dir.path()));
        let vm = d.create_vm(&spec(&["lan"])).unwrap();
        assert_eq!(vm.disks[1].size, 65536 + 7);
        assert_eq!(
            std::fs::metadata(&vm.disks[1].path).unwrap().len(),
            65536 + 7
        );
        assert!(matches!(
            d.create_vm(&spec(&["lan"])),
            Err(HvError::VmExists { .. })
        ));
        d.start_vm("web1").unwrap();
        d.start_vm("web1").unwrap();
        assert_eq!(d.get_vm("web1").unwrap().unwrap().power, Power::Running);
        d.stop_vm("web1").unwrap();
        d.set_disk_consistent("web1", 0, false).unwrap();
        let err = d.start_vm("web1").unwrap_err();
        assert!(err.to_string().contains("inconsistent"), "{err}");
        assert_eq!(d.list_vms().unwrap().len(), 1);
        d.delete_vm("web1").unwrap();
        assert!(d.get_vm("web1").unwrap().is_none());
    }

    #[test]
    fn refusals_name_the_problem() {
        let dir = tempfile::tempdir().unwrap();
        let d = DirDriver::new(host(dir.path()));
        let err = d.create_vm(&spec(&["dmz"])).unwrap_err().to_string();
        assert!(err.contains("\"dmz\"") && err.contains("lan"), "{err}");
        assert!(d.get_vm("../etc").is_err());
        let gone = DirDriver::new(host(&dir.path().join("missing")));
        assert!(gone
            .check_connected()
            .unwrap_err()
            .to_string()
            .contains("not connected"));
    }
}
