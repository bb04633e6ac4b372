//! The `qemu` driver: real `qemu-system-x86_64` VMs with qcow2 disks, driven over QMP.
//!
//! A VM is a folder `<root>/<vm>/` holding
//!
//! | file | what |
//! |---|---|
//! | `vm.json` | name, cpus, memory, disks `[{index, file, size, format: "qcow2", consistent}]`, nics |
//! | `disk0.qcow2`, … | the disks (`qemu-img create -f qcow2`) |
//! | `qmp.sock` | the QMP monitor while QEMU runs |
//! | `qemu.pid`, `qemu.log` | process id and stdout/stderr of QEMU |
//! | `nbd.sock` | QEMU's own NBD server, started on demand to read a running VM's disks |
//! | `nbd-*.sock`, `nbd-*.pid`, `qemu-nbd.log` | `qemu-nbd` servers of disks ferry has open while the VM is stopped |
//! | `unclean` | QEMU died without being stopped: the disks are checked (`qemu-img check -r leaks`) before reuse |
//! | `fv<pid>x<n>d<i>.qcow2` | temporary fleecing overlay of a point-in-time view (removed when the view closes; leftovers of a dead ferry are removed by the next view) |
//!
//! Power state is not stored: a VM runs while its QEMU process lives (the pid in `qemu.pid`,
//! cross-checked against the process's command line so a recycled pid is not mistaken for it)
//! and its QMP monitor answers `query-status` once started. A VM whose QEMU died is reported
//! stopped, and its stale pid file and sockets are cleaned up.
//!
//! QEMU runs detached from ferry (its own session, output to `qemu.log`) with the command line
//! of `shared/INFRA.md`: `-machine q35,accel=…` (KVM when `/dev/kvm` can be opened, falling
//! back to TCG; `FERRY_QEMU_ACCEL=tcg|kvm|auto` forces a choice), one virtio-blk device per
//! disk (`-blockdev` file node `file{i}`, qcow2 node `disk{i}`, device `vblk{i}`). Stopping
//! sends QMP `quit` (there is no ACPI guest to power down), waits for the process to exit and
//! kills it if it does not.
//!
//! NICs are recorded in `vm.json` (their switches are checked against the host), but no
//! `-netdev` is attached: that needs host networking (bridges, taps) this driver does not
//! manage yet.
//!
//! Disks reach ferry's data path over NBD ([`QemuDisk`]):
//! - stopped VM: a private `qemu-nbd` per open (`--read-only` unless writable), killed when
//!   the device is dropped; it also exits by itself when ferry's connections close, so a
//!   crashed ferry leaves no server holding the image lock;
//! - running VM: read-only, through QEMU's own NBD server (`nbd-server-start` +
//!   `block-export-add` over QMP), the export removed when the device is dropped. A plain
//!   [`Hypervisor::open_disk`] of a running VM reads each block as it is at that moment; the
//!   engine reads through [`Hypervisor::open_view`] instead, which is point-in-time. Writing to
//!   a running VM's disk is refused.
//!
//! Change tracking (persistent dirty bitmaps) and point-in-time views (fleecing) are in the
//! `track` submodule (`qemu_track.rs`). [`Hypervisor::disk_stamp`] returns `None`: a qcow2
//! file's metadata does not prove that the guest wrote nothing; the bitmaps do.
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use ferry_blocks::{BlockDevice, DiskStamp};
use ferry_model::Host;
use ferry_nbd::{NbdDisk, NbdError, BASE_ALLOCATION};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::qmp::{Qmp, QmpError};

#[path = "qemu_track.rs"]
mod track;
use crate::{
    ChangeMark, DiskInfo, DiskView, HvError, Hypervisor, Nic, Power, Result, VmInfo, VmSpec,
};

/// NBD connections per open disk (requests on one connection are serialised).
pub const NBD_CONNECTIONS: usize = 8;
/// Longest wait for a started QEMU to answer on QMP.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for QEMU to exit after `quit` before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest wait for a killed process to disappear.
const KILL_TIMEOUT: Duration = Duration::from_secs(5);
/// QMP reply timeout of the driver's short sessions.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a guest agent to answer guest-sync (an agent that runs answers at once).
const QGA_SYNC_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for a freeze that timed out to finish in the guest, and the thaw behind it.
const QGA_LATE_FREEZE_WAIT: Duration = Duration::from_secs(120);
/// Longest wait for the guest agent to thaw (per attempt).
const QGA_THAW_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait for a qemu-nbd server to listen.
const NBD_START_TIMEOUT: Duration = Duration::from_secs(15);
/// Longest path a Unix socket address holds (`sun_path` minus the terminating NUL).
const SOCKET_PATH_MAX: usize = 107;
/// Environment variable that forces the accelerator (`tcg`, `kvm` or `auto`).
pub const ACCEL_ENV: &str = "FERRY_QEMU_ACCEL";
/// The name of ferry's test guest image (`--image guest`).
pub const GUEST_IMAGE: &str = "guest";
/// Environment variable naming the folder of the built test guest (`vmlinuz`, `initrd.img`).
pub const GUEST_IMAGE_ENV: &str = "FERRY_GUEST_IMAGE";
/// Environment variable: the test guest's pause between two files of its workload, in ms.
pub const GUEST_PACE_ENV: &str = "FERRY_GUEST_PACE_MS";
/// Memory a VM booting the test guest gets at least (its kernel and initramfs need it).
const GUEST_MIN_MEMORY_MIB: u64 = 256;

/// The folder of the built test guest: [`GUEST_IMAGE_ENV`], else `~/.cache/ferry/guest`.
pub fn guest_image_dir() -> PathBuf {
    match std::env::var_os(GUEST_IMAGE_ENV) {
        Some(d) if !d.is_empty() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/ferry/guest"),
    }
}

/// The built test guest's folder, or an error saying how to build it.
fn find_guest_image() -> Result<PathBuf> {
    let dir = guest_image_dir();
    if dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file() {
        return Ok(dir);
    }
    Err(HvError::Invalid(format!(
        "the test guest image is not built in {}: run `scripts/guest-image.sh` from ferry's source tree (or set {GUEST_IMAGE_ENV} to the folder it built)",
        dir.display()
    )))
}

/// The test guest's workload pace in milliseconds ([`GUEST_PACE_ENV`], default 200).
fn guest_pace_ms() -> u64 {
    std::env::var(GUEST_PACE_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(200)
}

const HINT: &str = "install QEMU (from ferry's source tree: `scripts/install-deps.sh`; Debian 12: `apt-get install -t bookworm-backports qemu-system-x86 qemu-utils`) or use --driver dir";

/// Which accelerator QEMU uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accel {
    /// KVM when `/dev/kvm` can be opened (with TCG as QEMU's fallback), else TCG.
    Auto,
    /// KVM only (QEMU fails to start without it).
    Kvm,
    /// TCG, QEMU's emulator: slower, works everywhere.
    Tcg,
}

impl Accel {
    /// Parses `tcg`, `kvm` or `auto` (empty means auto).
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!(
                "{other:?} is not an accelerator; use tcg, kvm or auto"
            )),
        }
    }

    /// Reads [`ACCEL_ENV`] (`tcg`, `kvm`, `auto`; unset means auto).
    pub fn from_env() -> Result<Self> {
        Self::from_env_or(Accel::Auto)
    }

    /// [`ACCEL_ENV`] when set (it overrides every host's choice), else `default`.
    fn from_env_or(default: Accel) -> Result<Self> {
        match std::env::var(ACCEL_ENV) {
            Err(_) => Ok(default),
            Ok(v) => Self::parse(&v)
                .map_err(|e| HvError::Invalid(format!("{ACCEL_ENV}: {e} (or unset it)"))),
        }
    }

    /// The `accel=` value of `-machine`.
    pub fn machine_value(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto if kvm_usable() => "kvm:tcg",
            Accel::Auto => "tcg",
        }
    }
}

/// True when `/dev/kvm` can be opened for reading and writing.
pub fn kvm_usable() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

/// `vm.json` as stored on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VmFile {
    name: String,
    cpus: u32,
    memory: u64,
    disks: Vec<DiskFile>,
    #[serde(default)]
    nics: Vec<Nic>,
    /// Boot image (`guest`): its kernel and initramfs are copied into the VM folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    image: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DiskFile {
    index: u32,
    file: String,
    size: u64,
    format: String,
    consistent: bool,
}

/// The files of one VM folder.
#[derive(Debug, Clone)]
struct VmPaths {
    dir: PathBuf,
    json: PathBuf,
    pid: PathBuf,
    qmp: PathBuf,
    nbd: PathBuf,
    log: PathBuf,
    nbd_log: PathBuf,
    unclean: PathBuf,
    lock: PathBuf,
    qga: PathBuf,
    console: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl VmPaths {
    fn new(dir: PathBuf) -> Self {
        VmPaths {
            qga: dir.join("qga.sock"),
            console: dir.join(crate::guest::CONSOLE_FILE),
            kernel: dir.join("boot-vmlinuz"),
            initrd: dir.join("boot-initrd.img"),
            json: dir.join("vm.json"),
            pid: dir.join("qemu.pid"),
            qmp: dir.join("qmp.sock"),
            nbd: dir.join("nbd.sock"),
            log: dir.join("qemu.log"),
            nbd_log: dir.join("qemu-nbd.log"),
            unclean: dir.join("unclean"),
            lock: dir.join(".lock"),
            dir,
        }
    }
}

/// Driver for hosts that run VMs with QEMU (see the module documentation).
#[derive(Debug, Clone)]
pub struct QemuDriver {
    host: Host,
    accel: Accel,
    system: PathBuf,
    img: PathBuf,
    nbd: PathBuf,
}

impl QemuDriver {
    /// A driver for `host` with the host's accelerator (`--accel`; [`ACCEL_ENV`] overrides
    /// it); fails when `qemu-system-x86_64`, `qemu-img` or `qemu-nbd` is not installed, or an
    /// accelerator name is unknown.
    pub fn new(host: Host) -> Result<Self> {
        let find = |program: &str| {
            find_program(program).ok_or_else(|| HvError::MissingProgram {
                host: host.name.clone(),
                driver: "qemu".into(),
                program: program.into(),
                hint: HINT.into(),
            })
        };
        Ok(QemuDriver {
            system: find("qemu-system-x86_64")?,
            img: find("qemu-img")?,
            nbd: find("qemu-nbd")?,
            accel: Accel::from_env_or(match &host.accel {
                Some(a) => Accel::parse(a).map_err(|e| {
                    HvError::Invalid(format!("host {}: accelerator {e}", host.name))
                })?,
                None => Accel::Auto,
            })?,
            host,
        })
    }

    /// The same driver with accelerator `accel` (instead of [`ACCEL_ENV`]'s choice).
    pub fn with_accel(mut self, accel: Accel) -> Self {
        self.accel = accel;
        self
    }

    /// True when QEMU's programs are installed (what [`QemuDriver::new`] needs).
    pub fn available() -> bool {
        ["qemu-system-x86_64", "qemu-img", "qemu-nbd"]
            .iter()
            .all(|p| find_program(p).is_some())
    }

    fn vm_dir(&self, name: &str) -> Result<PathBuf> {
        ferry_model::validate_name("VM", name).map_err(|e| HvError::Invalid(e.to_string()))?;
        Ok(self.host.root.join(name))
    }

    fn paths(&self, name: &str) -> Result<VmPaths> {
        Ok(VmPaths::new(self.vm_dir(name)?))
    }

    fn io(&self, what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> HvError + '_ {
        let detail = what.to_string();
        move |e| HvError::Io {
            host: self.host.name.clone(),
            detail: format!("{detail}: {e}"),
        }
    }

    fn process(&self, vm: &str, detail: impl Into<String>) -> HvError {
        HvError::Process {
            host: self.host.name.clone(),
            vm: vm.into(),
            detail: detail.into(),
        }
    }

    fn read(&self, name: &str) -> Result<Option<VmFile>> {
        let p = self.paths(name)?.json;
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

    fn must_read(&self, name: &str) -> Result<VmFile> {
        self.read(name)?.ok_or_else(|| HvError::NoSuchVm {
            vm: name.into(),
            host: self.host.name.clone(),
        })
    }

    fn write(&self, vm: &VmFile) -> Result<()> {
        let p = self.paths(&vm.name)?.json;
        let data = serde_json::to_vec_pretty(vm).expect("vm.json serializes");
        ferry_blocks::map::write_atomic(&p, &data).map_err(|e| HvError::Io {
            host: self.host.name.clone(),
            detail: e.to_string(),
        })
    }

    /// Serializes state changes of one VM across processes (an advisory lock on
    /// `<vm>/.lock`, released when the returned file is dropped).
    fn lock(&self, p: &VmPaths) -> Result<File> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p.lock)
            .map_err(self.io(p.lock.display()))?;
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(self.io(p.lock.display())(std::io::Error::last_os_error()));
        }
        Ok(f)
    }

    /// Like [`QemuDriver::lock`], but gives up at once when another process holds the lock.
    fn try_lock(p: &VmPaths) -> Option<File> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p.lock)
            .ok()?;
        (unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0).then_some(f)
    }

    fn disk<'a>(&self, vm: &'a VmFile, index: u32) -> Result<&'a DiskFile> {
        vm.disks
            .iter()
            .find(|d| d.index == index)
            .ok_or_else(|| HvError::Invalid(format!("VM {} has no disk {index}", vm.name)))
    }

    fn disk_path(&self, vm: &VmFile, d: &DiskFile) -> Result<PathBuf> {
        if d.file.is_empty() || d.file.contains('/') || d.file.starts_with('.') {
            return Err(HvError::Invalid(format!(
                "VM {}: disk file name {:?} escapes the VM folder",
                vm.name, d.file
            )));
        }
        Ok(self.vm_dir(&vm.name)?.join(&d.file))
    }

    /// The pid of the VM's live QEMU process, if there is one: the pid in `qemu.pid` when
    /// that process lives and its command line names this VM's QMP socket; else (pid file
    /// lost or stale while a QMP socket exists) a search of `/proc` for such a process.
    fn live_pid(p: &VmPaths) -> Option<i32> {
        let needle = p.qmp.as_os_str().as_bytes();
        if let Some(pid) = read_pid(&p.pid) {
            if alive(pid) && cmdline_contains(pid, needle) {
                return Some(pid);
            }
        }
        if !p.qmp.exists() {
            return None;
        }
        let pid = std::fs::read_dir("/proc")
            .ok()?
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .find(|&pid| alive(pid) && is_qemu(pid) && cmdline_contains(pid, needle))?;
        let _ = ferry_blocks::map::write_atomic(&p.pid, format!("{pid}\n").as_bytes());
        Some(pid)
    }

    /// Power state, cleaning up after a QEMU that died (unless another process holds the lock).
    fn power(&self, p: &VmPaths) -> Power {
        if Self::live_pid(p).is_some() {
            return Power::Running;
        }
        if p.pid.exists() {
            if let Some(_g) = Self::try_lock(p) {
                self.clean_after_exit(p, true);
            }
        }
        Power::Stopped
    }

    /// Removes the pid file and sockets of a QEMU that is gone; `died` marks the disks for a
    /// check before reuse (QEMU did not close them through `quit`).
    fn clean_after_exit(&self, p: &VmPaths, died: bool) {
        if Self::live_pid(p).is_some() {
            return;
        }
        if died && p.pid.exists() {
            let _ = std::fs::write(&p.unclean, b"QEMU exited without `ferry vm stop`\n");
        }
        for f in [&p.pid, &p.qmp, &p.nbd, &p.qga] {
            let _ = std::fs::remove_file(f);
        }
    }

    /// Kills `qemu-nbd` servers left by ferry processes that are gone; returns the pids of
    /// live ferry processes that still have a disk of this VM open.
    fn reap_stale_nbd(&self, p: &VmPaths) -> Vec<i32> {
        let mut busy = Vec::new();
        let Ok(entries) = std::fs::read_dir(&p.dir) else {
            return busy;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !(name.starts_with("nbd-") && name.ends_with(".pid")) {
                continue;
            }
            let pidfile = e.path();
            let sock = pidfile.with_extension("sock");
            let Some(rec) = NbdRecord::read(&pidfile) else {
                continue;
            };
            if rec.owner_alive() {
                busy.push(rec.owner);
                continue;
            }
            if alive(rec.server) && cmdline_contains(rec.server, sock.as_os_str().as_bytes()) {
                signal(rec.server, libc::SIGKILL);
                wait_gone(rec.server, KILL_TIMEOUT);
            }
            let _ = std::fs::remove_file(&sock);
            let _ = std::fs::remove_file(&pidfile);
        }
        busy
    }

    /// Checks (and repairs leaks in) the disks of a VM whose QEMU died, once.
    fn check_if_unclean(&self, vm: &VmFile, p: &VmPaths) -> Result<()> {
        if !p.unclean.exists() {
            return Ok(());
        }
        for d in &vm.disks {
            let file = self.disk_path(vm, d)?;
            // A QEMU that was just killed may still hold its image lock for a moment while the
            // kernel tears it down: retry a lock failure for a few seconds before giving up.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
            let out = loop {
                let out = Command::new(&self.img)
                    .args(["check", "-q", "-r", "leaks", "-f", "qcow2"])
                    .arg(&file)
                    .stdin(Stdio::null())
                    .output()
                    .map_err(self.io(format!("run {}", self.img.display())))?;
                let locked = String::from_utf8_lossy(&out.stderr).contains("lock");
                if out.status.code() == Some(1) && locked && std::time::Instant::now() < deadline {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                    continue;
                }
                break out;
            };
            // 0: clean; 3: leaks left (harmless). 1: could not check; 2: corrupt.
            match out.status.code() {
                Some(0) | Some(3) => {}
                _ => {
                    let msg = one_line(&String::from_utf8_lossy(&out.stderr));
                    return Err(self.process(
                        &vm.name,
                        format!(
                            "disk {} ({}) failed `qemu-img check` after QEMU died ({}: {msg}); repair it with `qemu-img check -r all {}` and retry",
                            d.index,
                            file.display(),
                            out.status,
                            file.display()
                        ),
                    ));
                }
            }
        }
        let _ = std::fs::remove_file(&p.unclean);
        Ok(())
    }

    /// A point-in-time view of every disk of `name`; `track` starts the next generation.
    fn view(&self, name: &str, since: &[Option<ChangeMark>], track: bool) -> Result<DiskView> {
        let p = self.paths(name)?;
        let vm = self.must_read(name)?;
        let _g = self.lock(&p)?;
        if Self::live_pid(&p).is_some() {
            return self.view_running(&vm, &p, since, track);
        }
        self.prepare_stopped_images(&vm, &p, "read the disks with change tracking")?;
        self.view_stopped(&vm, &p, since, track)
    }

    /// Readies a stopped VM's images for `action` (the caller holds the lock): cleans up after
    /// a dead QEMU and checks its disks; refuses while another ferry process has a disk open.
    fn prepare_stopped_images(&self, vm: &VmFile, p: &VmPaths, action: &str) -> Result<()> {
        self.clean_after_exit(p, true);
        track::remove_stale_overlay_files(p);
        let busy = self.reap_stale_nbd(p);
        if let Some(owner) = busy.first() {
            return Err(self.process(
                &vm.name,
                format!("cannot {action}: a disk is open by ferry process {owner} (a running job); wait for it to finish, or cancel it, and retry"),
            ));
        }
        self.check_if_unclean(vm, p)
    }

    fn info(&self, vm: &VmFile) -> Result<VmInfo> {
        let p = self.paths(&vm.name)?;
        let disks = vm
            .disks
            .iter()
            .map(|d| {
                Ok(DiskInfo {
                    index: d.index,
                    path: self.disk_path(vm, d)?,
                    size: d.size,
                    format: d.format.clone(),
                    consistent: d.consistent,
                    node: Some(format!("disk{}", d.index)),
                    device: Some(format!("vblk{}", d.index)),
                })
            })
            .collect::<Result<_>>()?;
        let power = self.power(&p);
        // A view left by a ferry that died keeps its fleecing job copying the guest's writes
        // into an overlay: stop that as soon as ferry looks at the VM.
        if track::has_stale_overlays(&p) {
            match power {
                Power::Running => {
                    if let Ok(mut q) = Qmp::connect_timeout(&p.qmp, QMP_TIMEOUT) {
                        self.clean_stale_views(&mut q, &p);
                    }
                }
                Power::Stopped => track::remove_stale_overlay_files(&p),
            }
        }
        Ok(VmInfo {
            name: vm.name.clone(),
            host: self.host.name.clone(),
            power,
            cpus: vm.cpus,
            memory: vm.memory,
            disks,
            nics: vm.nics.clone(),
            qmp: Some(p.qmp.clone()),
            image: vm.image.clone(),
        })
    }

    fn check_socket_path(&self, path: &Path) -> Result<()> {
        let n = path.as_os_str().len();
        if n > SOCKET_PATH_MAX {
            return Err(HvError::Invalid(format!(
                "host {}: the socket path {} is {n} bytes long, more than the {SOCKET_PATH_MAX} a Unix socket allows; give the host a shorter --root",
                self.host.name,
                path.display()
            )));
        }
        Ok(())
    }

    /// The QEMU command line of `vm`.
    fn command_line(&self, vm: &VmFile, p: &VmPaths) -> Result<Vec<OsString>> {
        let mut a: Vec<OsString> = Vec::new();
        let mut push = |s: String| a.push(s.into());
        push("-name".into());
        push(opt_escape(&vm.name));
        push("-machine".into());
        push(format!("q35,accel={}", self.accel.machine_value()));
        for s in ["-nodefaults", "-no-user-config"] {
            push(s.into());
        }
        push("-display".into());
        push("none".into());
        push("-m".into());
        let min_mib = if vm.image.is_some() {
            GUEST_MIN_MEMORY_MIB
        } else {
            16
        };
        push(format!("{}M", vm.memory.div_ceil(1 << 20).max(min_mib)));
        push("-smp".into());
        push(vm.cpus.max(1).to_string());
        if vm.image.is_some() {
            // The guest's kernel and initramfs (copied in at create); its console is kept.
            push("-kernel".into());
            push(p.kernel.to_string_lossy().into());
            push("-initrd".into());
            push(p.initrd.to_string_lossy().into());
            push("-append".into());
            push(format!(
                "console=ttyS0 quiet panic=-1 ferry.pace={}",
                guest_pace_ms()
            ));
            push("-chardev".into());
            push(format!(
                "file,id=console0,path={},append=on",
                opt_escape(&p.console.to_string_lossy())
            ));
            push("-serial".into());
            push("chardev:console0".into());
        } else {
            push("-serial".into());
            push("null".into());
        }
        // The guest agent's channel (a guest without an agent leaves it unanswered).
        push("-device".into());
        push("virtio-serial-pci,id=vser0".into());
        push("-chardev".into());
        push(format!(
            "socket,id=qga0,path={},server=on,wait=off",
            opt_escape(&p.qga.to_string_lossy())
        ));
        push("-device".into());
        push("virtserialport,chardev=qga0,name=org.qemu.guest_agent.0".into());
        push("-qmp".into());
        push(format!(
            "unix:{},server=on,wait=off",
            opt_escape(&p.qmp.to_string_lossy())
        ));
        for d in &vm.disks {
            let file = self.disk_path(vm, d)?;
            let i = d.index;
            push("-blockdev".into());
            push(format!(
                "driver=file,node-name=file{i},filename={}",
                opt_escape(&file.to_string_lossy())
            ));
            push("-blockdev".into());
            push(format!("driver=qcow2,node-name=disk{i},file=file{i}"));
            push("-device".into());
            push(format!(
                "virtio-blk-pci,drive=disk{i},id=vblk{i},share-rw=on"
            ));
        }
        Ok(a)
    }

    /// Starts QEMU for `vm` and waits until QMP reports it running.
    fn launch(&self, vm: &VmFile, p: &VmPaths) -> Result<()> {
        self.check_socket_path(&p.qmp)?;
        if vm.image.is_some() && !(p.kernel.is_file() && p.initrd.is_file()) {
            return Err(self.process(
                &vm.name,
                format!(
                    "its boot files {} and {} are missing; delete the VM and create it again",
                    p.kernel.display(),
                    p.initrd.display()
                ),
            ));
        }
        for f in [&p.qmp, &p.nbd, &p.qga] {
            let _ = std::fs::remove_file(f);
        }
        let args = self.command_line(vm, p)?;
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.log)
            .map_err(self.io(p.log.display()))?;
        let shown: Vec<String> = args.iter().map(|s| s.to_string_lossy().into()).collect();
        let _ = writeln!(
            log,
            "--- ferry (pid {}) starting QEMU at {} s since the epoch: {} {}",
            std::process::id(),
            unix_now(),
            self.system.display(),
            shown.join(" ")
        );
        let err_log = log.try_clone().map_err(self.io(p.log.display()))?;
        let mut cmd = Command::new(&self.system);
        cmd.args(&args)
            .current_dir(&p.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        // Its own session: QEMU outlives ferry and ignores ferry's terminal signals.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|e| {
            self.process(
                &vm.name,
                format!("cannot run {}: {e}; {HINT}", self.system.display()),
            )
        })?;
        let pid = child.id() as i32;
        if let Err(e) = ferry_blocks::map::write_atomic(&p.pid, format!("{pid}\n").as_bytes()) {
            let _ = child.kill();
            let _ = child.wait();
            return Err(HvError::Io {
                host: self.host.name.clone(),
                detail: e.to_string(),
            });
        }
        let started = Instant::now();
        let fail = |child: &mut Child, detail: String| {
            let _ = child.kill();
            let _ = child.wait();
            let _ = std::fs::remove_file(&p.pid);
            let _ = std::fs::remove_file(&p.qmp);
            self.process(&vm.name, detail)
        };
        loop {
            if let Ok(Some(st)) = child.try_wait() {
                let _ = std::fs::remove_file(&p.pid);
                return Err(self.process(
                    &vm.name,
                    format!(
                        "QEMU exited while starting ({st}): {}; see {} (is an image in use by another process?)",
                        log_tail(&p.log),
                        p.log.display()
                    ),
                ));
            }
            if p.qmp.exists() {
                if let Ok(mut q) = Qmp::connect_timeout(&p.qmp, QMP_TIMEOUT) {
                    if let Ok(s) = q.execute("query-status", None) {
                        if s["status"] == "running" || s["running"] == true {
                            break;
                        }
                        if started.elapsed() > START_TIMEOUT {
                            return Err(fail(
                                &mut child,
                                format!(
                                    "QEMU did not start running within {START_TIMEOUT:?} (status {}); see {}",
                                    s["status"],
                                    p.log.display()
                                ),
                            ));
                        }
                    }
                }
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(fail(
                    &mut child,
                    format!(
                        "QEMU did not answer on {} within {START_TIMEOUT:?}: {}; see {}",
                        p.qmp.display(),
                        log_tail(&p.log),
                        p.log.display()
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        // Reap QEMU when it exits while this process still runs (no zombie left behind).
        let _ = std::thread::Builder::new()
            .name(format!("qemu-{pid}"))
            .spawn(move || {
                let _ = child.wait();
            });
        Ok(())
    }

    /// Opens a disk of a running VM through QEMU's NBD server (read-only).
    fn open_running(&self, vm: &VmFile, d: &DiskFile, p: &VmPaths) -> Result<QemuDisk> {
        let _span = tracing::debug_span!("nbd_export", disk = d.index).entered();
        self.check_socket_path(&p.nbd)?;
        let qmp_err = |e: QmpError| {
            self.process(
                &vm.name,
                format!("cannot export disk {} over QEMU's NBD server: {e}", d.index),
            )
        };
        let mut q = Qmp::connect_timeout(&p.qmp, QMP_TIMEOUT).map_err(qmp_err)?;
        // `nbd-server-start` takes the legacy socket address form (`data` wraps the fields).
        let start = q.execute(
            "nbd-server-start",
            Some(json!({"addr": {"type": "unix", "data": {"path": p.nbd.to_string_lossy()}}})),
        );
        match start {
            Ok(_) => {}
            Err(e) if e.desc().is_some_and(|m| m.contains("already running")) => {}
            Err(e) => return Err(qmp_err(e)),
        }
        let id = unique_name("ferry");
        q.execute(
            "block-export-add",
            Some(json!({
                "type": "nbd",
                "id": id,
                "node-name": format!("disk{}", d.index),
                "name": id,
                "writable": false,
            })),
        )
        .map_err(qmp_err)?;
        drop(q);
        let server = Server::Export {
            qmp: p.qmp.clone(),
            id: id.clone(),
        };
        let connect = || NbdDisk::connect_unix(&p.nbd, &id, &[BASE_ALLOCATION]);
        QemuDisk::connect(server, d.size, connect).map_err(|e| {
            self.process(
                &vm.name,
                format!("cannot read disk {} of the running VM: {e}", d.index),
            )
        })
    }

    /// Opens a disk of a stopped VM through a private qemu-nbd.
    fn open_stopped(
        &self,
        vm: &VmFile,
        d: &DiskFile,
        p: &VmPaths,
        writable: bool,
        bitmaps: &[String],
    ) -> Result<QemuDisk> {
        let _span = tracing::debug_span!("qemu-nbd", disk = d.index, writable).entered();
        let file = self.disk_path(vm, d)?;
        let base = p.dir.join(unique_name("nbd"));
        let sock = base.with_extension("sock");
        let pidfile = base.with_extension("pid");
        self.check_socket_path(&sock)?;
        let _ = std::fs::remove_file(&sock);
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&p.nbd_log)
            .map_err(self.io(p.nbd_log.display()))?;
        let err_log = log.try_clone().map_err(self.io(p.nbd_log.display()))?;
        let mut cmd = Command::new(&self.nbd);
        cmd.arg("--format=qcow2")
            .arg(format!("--shared={NBD_CONNECTIONS}"))
            .arg(format!("--export-name=disk{}", d.index))
            .arg(format!("--socket={}", sock.display()));
        if writable {
            cmd.arg("--discard=unmap");
        } else {
            cmd.arg("--read-only");
        }
        for b in bitmaps {
            cmd.arg(format!("--bitmap={b}"));
        }
        let ctx_names: Vec<String> = bitmaps
            .iter()
            .map(|b| ferry_nbd::dirty_bitmap_context(b))
            .collect();
        let mut contexts = vec![BASE_ALLOCATION];
        contexts.extend(ctx_names.iter().map(String::as_str));
        cmd.arg(&file)
            .current_dir(&p.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err_log));
        let child = cmd.spawn().map_err(|e| {
            self.process(
                &vm.name,
                format!("cannot run {}: {e}; {HINT}", self.nbd.display()),
            )
        })?;
        let rec = NbdRecord {
            server: child.id() as i32,
            owner: std::process::id() as i32,
            owner_start: proc_start_time(std::process::id() as i32).unwrap_or(0),
        };
        let _ = std::fs::write(&pidfile, rec.to_string());
        let server = Server::QemuNbd {
            child,
            sock: sock.clone(),
            pidfile,
        };
        // Wait for the socket, then connect (a refused connect is not a client: retry).
        let started = Instant::now();
        let export = format!("disk{}", d.index);
        let mut server = Some(server);
        let first = loop {
            let exited = match server.as_mut() {
                Some(Server::QemuNbd { child, .. }) => child.try_wait().ok().flatten(),
                _ => None,
            };
            if let Some(st) = exited {
                drop(server.take());
                return Err(self.process(
                    &vm.name,
                    format!(
                        "qemu-nbd for disk {} exited at once ({st}): {}; is the image in use by another process (a running QEMU, another qemu-nbd)?",
                        d.index,
                        log_tail(&p.nbd_log)
                    ),
                ));
            }
            if sock.exists() {
                match NbdDisk::connect_unix(&sock, &export, &contexts) {
                    Ok(c) => break c,
                    Err(NbdError::Connect { .. }) => {}
                    Err(e) => {
                        drop(server.take());
                        return Err(self.process(
                            &vm.name,
                            format!("cannot open disk {} over qemu-nbd: {e}", d.index),
                        ));
                    }
                }
            }
            if started.elapsed() > NBD_START_TIMEOUT {
                drop(server.take());
                return Err(self.process(
                    &vm.name,
                    format!(
                        "qemu-nbd for disk {} did not listen within {NBD_START_TIMEOUT:?}: {}",
                        d.index,
                        log_tail(&p.nbd_log)
                    ),
                ));
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let server = server.take().expect("server still held");
        let mut first = Some(first);
        let connect = || match first.take() {
            Some(c) => Ok(c),
            None => NbdDisk::connect_unix(&sock, &export, &contexts),
        };
        QemuDisk::connect(server, d.size, connect).map_err(|e| {
            self.process(
                &vm.name,
                format!("cannot open disk {} over qemu-nbd: {e}", d.index),
            )
        })
    }
}

impl Hypervisor for QemuDriver {
    fn host(&self) -> &Host {
        &self.host
    }

    fn check_connected(&self) -> Result<()> {
        crate::check_root(&self.host)
    }

    fn get_vm(&self, name: &str) -> Result<Option<VmInfo>> {
        let _span = tracing::debug_span!("get_vm", vm = name).entered();
        self.check_connected()?;
        self.read(name)?.map(|v| self.info(&v)).transpose()
    }

    fn create_vm(&self, spec: &VmSpec) -> Result<VmInfo> {
        self.check_spec(spec)?;
        if let Some(s) = spec.disks.iter().find(|&&s| s == 0) {
            return Err(HvError::Invalid(format!(
                "VM {}: a disk of {s} bytes cannot be created; give every disk a size",
                spec.name
            )));
        }
        let p = self.paths(&spec.name)?;
        if p.json.is_file() {
            return Err(HvError::VmExists {
                vm: spec.name.clone(),
                host: self.host.name.clone(),
            });
        }
        self.check_socket_path(&p.qmp)?;
        let image = match spec.image.as_deref() {
            None => None,
            Some(GUEST_IMAGE) => Some(find_guest_image()?),
            Some(other) => {
                return Err(HvError::Invalid(format!(
                    "unknown image {other:?}: the qemu driver boots `--image {GUEST_IMAGE}` (ferry's test guest), or no image"
                )))
            }
        };
        std::fs::create_dir_all(&p.dir).map_err(self.io(p.dir.display()))?;
        if let Some(dir) = &image {
            for (from, to) in [("vmlinuz", &p.kernel), ("initrd.img", &p.initrd)] {
                std::fs::copy(dir.join(from), to).map_err(self.io(format!(
                    "copy {} to {}",
                    dir.join(from).display(),
                    to.display()
                )))?;
            }
        }
        let mut disks = Vec::new();
        for (i, &size) in spec.disks.iter().enumerate() {
            let file = format!("disk{i}.qcow2");
            let path = p.dir.join(&file);
            // qcow2 sizes are whole sectors: round up; ferry uses only `size` bytes of it.
            let out = Command::new(&self.img)
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&path)
                .arg(size.div_ceil(512).saturating_mul(512).to_string())
                .stdin(Stdio::null())
                .output()
                .map_err(self.io(format!("run {}", self.img.display())))?;
            if !out.status.success() {
                return Err(self.process(
                    &spec.name,
                    format!(
                        "`qemu-img create` of {} failed ({}): {}; check free space and permissions under {}",
                        path.display(),
                        out.status,
                        one_line(&String::from_utf8_lossy(&out.stderr)),
                        self.host.root.display()
                    ),
                ));
            }
            disks.push(DiskFile {
                index: i as u32,
                file,
                size,
                format: "qcow2".into(),
                consistent: true,
            });
        }
        let vm = VmFile {
            name: spec.name.clone(),
            cpus: spec.cpus,
            memory: spec.memory,
            disks,
            nics: spec
                .nics
                .iter()
                .map(|s| Nic { switch: s.clone() })
                .collect(),
            image: spec.image.clone(),
        };
        self.write(&vm)?;
        self.info(&vm)
    }

    fn delete_vm(&self, name: &str) -> Result<()> {
        self.check_connected()?;
        let p = self.paths(name)?;
        if !p.json.is_file() {
            return Err(HvError::NoSuchVm {
                vm: name.into(),
                host: self.host.name.clone(),
            });
        }
        self.stop_vm(name)?;
        let _g = self.lock(&p)?;
        let busy = self.reap_stale_nbd(&p);
        if let Some(owner) = busy.first() {
            return Err(self.process(
                name,
                format!("a disk is still open by ferry process {owner} (a running job); wait for it to finish, or cancel it, and retry"),
            ));
        }
        std::fs::remove_dir_all(&p.dir).map_err(self.io(p.dir.display()))
    }

    fn start_vm(&self, name: &str) -> Result<()> {
        let _span = tracing::debug_span!("start_vm", vm = name).entered();
        self.check_connected()?;
        let p = self.paths(name)?;
        let _g = self.lock(&p)?;
        let vm = self.must_read(name)?;
        if let Some(d) = vm.disks.iter().find(|d| !d.consistent) {
            return Err(HvError::Inconsistent {
                vm: name.into(),
                host: self.host.name.clone(),
                disk: d.index,
            });
        }
        if Self::live_pid(&p).is_some() {
            return Ok(());
        }
        self.clean_after_exit(&p, true);
        let busy = self.reap_stale_nbd(&p);
        if let Some(owner) = busy.first() {
            return Err(self.process(
                name,
                format!("cannot start: a disk is open by ferry process {owner} (a running job); wait for it to finish, or cancel it, and retry"),
            ));
        }
        self.check_if_unclean(&vm, &p)?;
        self.launch(&vm, &p)
    }

    fn stop_vm(&self, name: &str) -> Result<()> {
        let _span = tracing::debug_span!("stop_vm", vm = name).entered();
        self.check_connected()?;
        let p = self.paths(name)?;
        let _g = self.lock(&p)?;
        self.must_read(name)?;
        let Some(pid) = Self::live_pid(&p) else {
            self.clean_after_exit(&p, true);
            return Ok(());
        };
        let asked = match Qmp::connect_timeout(&p.qmp, QMP_TIMEOUT) {
            Ok(mut q) => match q.execute("quit", None) {
                Ok(_) => true,
                Err(e) => e.is_disconnect(),
            },
            Err(_) => false,
        };
        if !asked {
            // No monitor: SIGTERM makes QEMU close its images and exit, like `quit`.
            signal(pid, libc::SIGTERM);
        }
        let mut killed = false;
        if !wait_gone(pid, STOP_TIMEOUT) {
            signal(pid, libc::SIGKILL);
            killed = true;
            if !wait_gone(pid, KILL_TIMEOUT) {
                return Err(self.process(
                    name,
                    format!("QEMU (pid {pid}) did not exit after `quit` and SIGKILL; check the process (`ps -p {pid}`) and retry"),
                ));
            }
        }
        if killed {
            let _ = std::fs::write(&p.unclean, b"QEMU was killed by `ferry vm stop`\n");
        }
        self.clean_after_exit(&p, false);
        Ok(())
    }

    fn open_disk(&self, name: &str, index: u32, writable: bool) -> Result<Box<dyn BlockDevice>> {
        let _span = tracing::debug_span!("open_disk", vm = name, index, writable).entered();
        let p = self.paths(name)?;
        let vm = self.must_read(name)?;
        let d = self.disk(&vm, index)?.clone();
        if Self::live_pid(&p).is_some() {
            if writable {
                return Err(HvError::Running {
                    vm: name.into(),
                    host: self.host.name.clone(),
                    action: format!("writing disk {index}"),
                });
            }
            return Ok(Box::new(self.open_running(&vm, &d, &p)?));
        }
        let g = self.lock(&p)?;
        if Self::live_pid(&p).is_some() {
            drop(g);
            return self.open_disk(name, index, writable);
        }
        self.clean_after_exit(&p, true);
        let busy = self.reap_stale_nbd(&p);
        if busy.is_empty() {
            self.check_if_unclean(&vm, &p)?;
        }
        let disk = self.open_stopped(&vm, &d, &p, writable, &[])?;
        drop(g);
        Ok(Box::new(disk))
    }

    fn set_disk_consistent(&self, name: &str, index: u32, consistent: bool) -> Result<()> {
        let _span = tracing::debug_span!("set_disk_consistent", vm = name, index).entered();
        let p = self.paths(name)?;
        let _g = self.lock(&p)?;
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

    fn mark_disks(&self, name: &str) -> Result<Vec<Option<ChangeMark>>> {
        let _span = tracing::debug_span!("mark_disks", vm = name).entered();
        let p = self.paths(name)?;
        let vm = self.must_read(name)?;
        let _g = self.lock(&p)?;
        if Self::live_pid(&p).is_some() {
            return self.mark_running(&vm, &p);
        }
        self.prepare_stopped_images(&vm, &p, "start change tracking")?;
        self.mark_stopped(&vm)
    }

    fn freeze_guest(&self, vm: &str, timeout: Duration) -> Result<u32> {
        let p = self.paths(vm)?;
        self.must_read(vm)?;
        let none = |detail: String| HvError::NoGuestAgent {
            vm: vm.into(),
            host: self.host.name.clone(),
            detail,
        };
        let fail = |detail: String| HvError::GuestAgent {
            vm: vm.into(),
            host: self.host.name.clone(),
            detail,
        };
        if Self::live_pid(&p).is_none() {
            return Err(none(
                "the VM is not running, so no guest agent can freeze it".into(),
            ));
        }
        // An agent answers guest-sync at once; no answer: nothing was asked of the guest.
        let mut q =
            crate::qga::Qga::connect(&p.qga, QGA_SYNC_TIMEOUT).map_err(|e| none(e.to_string()))?;
        match q.execute("guest-fsfreeze-freeze", None, timeout) {
            Ok(n) => Ok(n.as_u64().unwrap_or(0) as u32),
            Err(e) => {
                // The freeze may still be running in the guest: queue the thaw behind it at
                // once, and wait (longer) until both are done.
                let thawed = q
                    .send_only("guest-fsfreeze-thaw")
                    .and_then(|_| q.sync(QGA_LATE_FREEZE_WAIT));
                Err(fail(match thawed {
                    Ok(()) => format!("{e}; the freeze was undone (thawed)"),
                    Err(t) => format!("{e}; undoing it failed too: {t}"),
                }))
            }
        }
    }

    fn thaw_guest(&self, vm: &str) -> Result<()> {
        let p = self.paths(vm)?;
        if Self::live_pid(&p).is_none() {
            return Ok(());
        }
        let fail = |e: crate::qga::QgaError| {
            HvError::GuestAgent {
            vm: vm.into(),
            host: self.host.name.clone(),
            detail: format!("thawing its file systems failed: {e}; they may still be frozen: check with `guest-fsfreeze-status` on {} or restart the VM", p.qga.display()),
        }
        };
        // The sync waits behind a freeze the agent is still finishing, then the thaw runs.
        let mut last = None;
        for _ in 0..3 {
            match crate::qga::Qga::connect(&p.qga, QGA_THAW_TIMEOUT)
                .and_then(|mut q| q.execute("guest-fsfreeze-thaw", None, QGA_THAW_TIMEOUT))
            {
                Ok(_) => return Ok(()),
                Err(e) => last = Some(e),
            }
        }
        Err(fail(last.expect("three attempts")))
    }

    fn open_view(&self, name: &str, since: &[Option<ChangeMark>]) -> Result<DiskView> {
        let _span = tracing::debug_span!("open_view", vm = name).entered();
        self.view(name, since, true)
    }

    fn peek_view(&self, name: &str, since: &[Option<ChangeMark>]) -> Result<DiskView> {
        let _span = tracing::debug_span!("peek_view", vm = name).entered();
        self.view(name, since, false)
    }

    /// Always `None`: qcow2 metadata does not prove the guest wrote nothing (dirty bitmaps
    /// will), so the engine reads and hashes the disk.
    fn disk_stamp(&self, name: &str, index: u32) -> Result<Option<DiskStamp>> {
        let vm = self.must_read(name)?;
        self.disk(&vm, index)?;
        Ok(None)
    }
}

/// What serves a [`QemuDisk`], stopped when the disk is dropped.
enum Server {
    /// A private `qemu-nbd` (stopped VM).
    QemuNbd {
        child: Child,
        sock: PathBuf,
        pidfile: PathBuf,
    },
    /// An export on the running QEMU's NBD server.
    Export { qmp: PathBuf, id: String },
}

impl Drop for Server {
    fn drop(&mut self) {
        match self {
            Server::QemuNbd {
                child,
                sock,
                pidfile,
            } => {
                // SIGTERM: qemu-nbd flushes and closes the image, then exits.
                signal(child.id() as i32, libc::SIGTERM);
                let t = Instant::now();
                loop {
                    match child.try_wait() {
                        Ok(Some(_)) | Err(_) => break,
                        Ok(None) if t.elapsed() > STOP_TIMEOUT => {
                            let _ = child.kill();
                            let _ = child.wait();
                            break;
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(2)),
                    }
                }
                let _ = std::fs::remove_file(sock);
                let _ = std::fs::remove_file(pidfile);
            }
            Server::Export { qmp, id } => {
                // Best effort: when QEMU is gone, so is the export.
                if let Ok(mut q) = Qmp::connect_timeout(qmp, QMP_TIMEOUT) {
                    let _ = q.execute("block-export-del", Some(json!({"id": id, "mode": "hard"})));
                }
            }
        }
    }
}

/// A disk of a QEMU VM, read and written over NBD ([`NbdDisk`] connections to `qemu-nbd` or
/// to QEMU's own NBD server). Dropping it closes the connections and stops the server
/// (`qemu-nbd`) or removes the export (running QEMU).
///
/// Reads of a running VM's disk opened with [`Hypervisor::open_disk`] are not point-in-time (the
/// guest keeps writing meanwhile); a view's disks read a frozen snapshot.
pub struct QemuDisk {
    conns: Vec<NbdDisk>,
    next: AtomicUsize,
    size: u64,
    server: Option<Server>,
}

impl std::fmt::Debug for QemuDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QemuDisk")
            .field("conns", &self.conns)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl QemuDisk {
    /// Opens [`NBD_CONNECTIONS`] connections with `connect` to the export `server` provides;
    /// the disk reports `size` bytes (the image may be larger: qcow2 rounds to sectors).
    fn connect(
        server: Server,
        size: u64,
        mut connect: impl FnMut() -> ferry_nbd::Result<NbdDisk>,
    ) -> std::result::Result<Self, String> {
        let mut disk = QemuDisk {
            conns: Vec::new(),
            next: AtomicUsize::new(0),
            size,
            server: Some(server),
        };
        for _ in 0..NBD_CONNECTIONS {
            let c = connect().map_err(|e| e.to_string())?;
            if c.size() < size {
                return Err(format!(
                    "the export holds {} bytes, less than the {size} of the disk in vm.json; the image was truncated or replaced",
                    c.size()
                ));
            }
            disk.conns.push(c);
        }
        Ok(disk)
    }

    fn conn(&self) -> &NbdDisk {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.conns.len();
        &self.conns[i]
    }
}

impl Drop for QemuDisk {
    fn drop(&mut self) {
        // Close the connections before the server goes away.
        self.conns.clear();
        drop(self.server.take());
    }
}

impl BlockDevice for QemuDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> ferry_blocks::Result<()> {
        self.conn().read_at(offset, buf)
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> ferry_blocks::Result<()> {
        self.conn().write_at(offset, buf)
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> ferry_blocks::Result<()> {
        self.conn().write_zeroes(offset, len)
    }

    /// Allocated ranges from `base:allocation`, clipped to the disk's size.
    fn data_ranges(&self) -> ferry_blocks::Result<Vec<(u64, u64)>> {
        let r = self.conns[0].data_ranges()?;
        Ok(r.into_iter()
            .filter(|&(s, _)| s < self.size)
            .map(|(s, e)| (s, e.min(self.size)))
            .collect())
    }

    /// Flushes every connection (each NBD flush covers the writes of its own connection).
    fn flush(&self) -> ferry_blocks::Result<()> {
        for c in &self.conns {
            c.flush()?;
        }
        Ok(())
    }
}

/// `nbd-*.pid`: which qemu-nbd serves a disk for which ferry process.
struct NbdRecord {
    server: i32,
    owner: i32,
    owner_start: u64,
}

impl NbdRecord {
    fn read(path: &Path) -> Option<Self> {
        let s = std::fs::read_to_string(path).ok()?;
        let mut it = s.split_whitespace().map(|x| x.parse::<i64>().ok());
        Some(NbdRecord {
            server: it.next()?? as i32,
            owner: it.next()?? as i32,
            owner_start: it.next().flatten().unwrap_or(0) as u64,
        })
    }

    fn owner_alive(&self) -> bool {
        alive(self.owner)
            && (self.owner_start == 0 || proc_start_time(self.owner) == Some(self.owner_start))
    }
}

impl std::fmt::Display for NbdRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{} {} {}", self.server, self.owner, self.owner_start)
    }
}

// ------------------------------------------------------------------ process helpers

/// A name unique across processes and calls: `PREFIX-<pid>-<n>`.
fn unique_name(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// Escapes a value for QEMU's `key=value,…` option syntax (a comma is written twice).
fn opt_escape(s: &str) -> String {
    s.replace(',', ",,")
}

fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p)
                .map(|m| {
                    m.is_file()
                        && std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o111 != 0
                })
                .unwrap_or(false)
        })
}

fn read_pid(path: &Path) -> Option<i32> {
    std::fs::read_to_string(path)
        .ok()?
        .trim()
        .parse()
        .ok()
        .filter(|&p: &i32| p > 0)
}

/// The fields of `/proc/PID/stat` after the command name.
fn proc_stat(pid: i32) -> Option<Vec<String>> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// True when process `pid` exists and is not a zombie.
fn alive(pid: i32) -> bool {
    if pid <= 0 {
        return false;
    }
    match proc_stat(pid) {
        Some(f) => !matches!(f.first().map(String::as_str), Some("Z") | Some("X") | None),
        None => false,
    }
}

/// Start time of a process (clock ticks since boot), to tell a recycled pid apart.
fn proc_start_time(pid: i32) -> Option<u64> {
    // Field 22 of /proc/PID/stat; the slice starts at field 3.
    proc_stat(pid)?.get(19)?.parse().ok()
}

/// True when the program of process `pid` is a QEMU system emulator.
fn is_qemu(pid: i32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let argv0 = c.split(|&b| b == 0).next().unwrap_or_default();
            argv0
                .rsplit(|&b| b == b'/')
                .next()
                .is_some_and(|n| n.starts_with(b"qemu-system"))
        })
        .unwrap_or(false)
}

fn cmdline_contains(pid: i32, needle: &[u8]) -> bool {
    let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    !needle.is_empty() && c.windows(needle.len()).any(|w| w == needle)
}

fn signal(pid: i32, sig: libc::c_int) {
    if pid > 0 {
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Waits until `pid` is gone (or a zombie); false on timeout.
fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let t = Instant::now();
    loop {
        if !alive(pid) {
            return true;
        }
        if t.elapsed() > timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn one_line(s: &str) -> String {
    let parts: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    if parts.is_empty() {
        "no output".into()
    } else {
        parts.join(" | ")
    }
}

/// The last lines of a log file, on one line (for error messages).
fn log_tail(path: &Path) -> String {
    let Ok(mut f) = File::open(path) else {
        return "no log".into();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(4096)));
    let mut s = String::new();
    let mut b = Vec::new();
    if f.read_to_end(&mut b).is_ok() {
        s = String::from_utf8_lossy(&b).into_owned();
    }
    // Only what the latest run wrote.
    if let Some(i) = s.rfind("--- ferry") {
        s = s[i..].lines().skip(1).collect::<Vec<_>>().join("\n");
    }
    let lines: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "no output in the log".into()
    } else {
        tail.join(" | ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_values_escape_commas_and_names_are_unique() {
        assert_eq!(opt_escape("/a,b/c"), "/a,,b/c");
        assert_ne!(unique_name("x"), unique_name("x"));
        assert!(unique_name("nbd").starts_with(&format!("nbd-{}-", std::process::id())));
    }

    #[test]
    fn process_helpers_see_this_process() {
        let me = std::process::id() as i32;
        assert!(alive(me));
        assert!(proc_start_time(me).is_some());
        assert!(!alive(0));
        let rec = NbdRecord {
            server: 1,
            owner: me,
            owner_start: proc_start_time(me).unwrap(),
        };
        assert!(rec.owner_alive());
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("nbd-x.pid");
        std::fs::write(&p, rec.to_string()).unwrap();
        let back = NbdRecord::read(&p).unwrap();
        assert_eq!((back.server, back.owner), (1, me));
        let stale = NbdRecord {
            owner_start: rec.owner_start + 1,
            ..back
        };
        assert!(!stale.owner_alive(), "a recycled pid is not the owner");
    }

    #[test]
    fn log_tail_keeps_the_latest_run_on_one_line() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("qemu.log");
        std::fs::write(
            &p,
            "--- ferry old\nold error\n--- ferry new\n\nline a\nline b\n",
        )
        .unwrap();
        assert_eq!(log_tail(&p), "line a | line b");
        assert_eq!(one_line("x\n\n y \n"), "x | y");
    }
}
