//! The `qemu` driver end to end: real `qemu-system-x86_64` VMs (TCG, no guest OS; the guest's
//! writes come through QMP `human-monitor-command` + `qemu-io` on the virtio device, as in
//! shared/INFRA.md), at both sites and mixed with the `dir` driver.
//!
//! Skipped with a note when QEMU is not installed (`scripts/install-deps.sh` installs it).
//! The test process makes itself a child subreaper, so QEMU processes that outlive the
//! `ferry` command that started them are reaped here (no zombies), and every test kills
//! whatever is left under its home folder when it ends, pass or fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_hypervisor::qmp::Qmp;
use serde_json::Value;

use crate::harness::*;

/// Every ferry command of these tests runs QEMU with TCG (nested KVM is slower here).
const ACCEL: (&str, &str) = ("FERRY_QEMU_ACCEL", "tcg");

pub(crate) fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(program).is_file()))
        .unwrap_or(false)
}

/// A `Ferry` whose commands force TCG, and which leaves no QEMU behind.
pub(crate) struct QemuFerry {
    pub(crate) f: Ferry,
}

impl QemuFerry {
    /// None (with a note) when QEMU is not installed.
    pub(crate) fn new(test: &str) -> Option<Self> {
        Self::with_env(test, &[])
    }

    /// Like [`QemuFerry::new`], with `env` where the jobs run (each command, or the server).
    pub(crate) fn with_env(test: &str, env: &[(&str, &str)]) -> Option<Self> {
        let missing: Vec<&str> = ["qemu-system-x86_64", "qemu-img", "qemu-nbd"]
            .into_iter()
            .filter(|p| !on_path(p))
            .collect();
        if !missing.is_empty() {
            eprintln!(
                "note: {test} skipped: {} not installed (scripts/install-deps.sh installs QEMU)",
                missing.join(", ")
            );
            return None;
        }
        // Orphaned QEMUs (their `ferry vm start` exited) become our children: reaped below.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
        let mut all = vec![ACCEL];
        all.extend_from_slice(env);
        Some(QemuFerry {
            f: Ferry::with_env(&all),
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = self.f.command(args);
        c.env(ACCEL.0, ACCEL.1)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    }

    #[track_caller]
    pub(crate) fn run(&self, args: &[&str]) -> Output {
        let child = self
            .command(args)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ferry {args:?}: {e}"));
        wait_output(child, CMD_TIMEOUT, &format!("ferry {}", args.join(" ")))
    }

    #[track_caller]
    pub(crate) fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_exit(&out, 0, args);
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    #[track_caller]
    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        parse_one_json(&out, &a)
    }

    /// `init`, sites `prim` / `dr`, hosts h1 (primary) and r1 (recovery) with switch `lan`.
    #[track_caller]
    pub(crate) fn setup(&self, primary_driver: &str, recovery_driver: &str) {
        self.ok(&["init"]);
        self.ok(&["site", "add", "prim", "--role", "primary"]);
        self.ok(&["site", "add", "dr", "--role", "recovery"]);
        for (h, site, drv) in [
            (PRIMARY_HOST, "prim", primary_driver),
            (RECOVERY_HOST, "dr", recovery_driver),
        ] {
            let mut args = vec![
                "host", "add", h, "--site", site, "--driver", drv, "--switch", "lan",
            ];
            if drv == "qemu" {
                args.extend(["--accel", "tcg"]);
            }
            let host = self.json(&args);
            assert_eq!(host["driver"], drv, "{host}");
            if drv == "qemu" {
                assert_eq!(host["accel"], "tcg", "{host}");
            }
        }
    }

    /// The guest of the copy of `vm` on `host` runs `qemu-io` command `cmd` on disk `disk`
    /// (e.g. `write -P 0xab 4M 2M`), through QMP and the virtio device.
    #[track_caller]
    fn guest(&self, vm: &str, host: &str, disk: usize, cmd: &str) {
        let v = self.f.vm_show(vm, Some(host));
        assert_eq!(v["power"], "running", "the guest needs a running VM: {v}");
        let qmp = v["qmp"]
            .as_str()
            .unwrap_or_else(|| panic!("vm show has no qmp socket: {v}"));
        let dev = v["disks"][disk]["device"]
            .as_str()
            .unwrap_or_else(|| panic!("vm show has no device for disk {disk}: {v}"));
        let mut q = Qmp::connect(qmp).unwrap_or_else(|e| panic!("QMP of {vm} on {host}: {e}"));
        let out = q
            .human_monitor_command(&format!("qemu-io -d {dev}/virtio-backend \"{cmd}\""))
            .unwrap_or_else(|e| panic!("qemu-io {cmd:?}: {e}"));
        assert_eq!(out, "", "guest qemu-io {cmd:?} on {vm}@{host} failed");
    }

    /// Pid of the QEMU running the copy of `vm` on `host` (its `qemu.pid`, next to the socket).
    #[track_caller]
    fn qemu_pid(&self, vm: &str, host: &str) -> i32 {
        let v = self.f.vm_show(vm, Some(host));
        let qmp = PathBuf::from(v["qmp"].as_str().expect("qmp socket"));
        std::fs::read_to_string(qmp.with_file_name("qemu.pid"))
            .expect("qemu.pid of a running VM")
            .trim()
            .parse()
            .expect("a pid")
    }

    /// Live processes whose command line mentions this home (QEMU, qemu-nbd).
    pub(crate) fn leftovers(&self) -> Vec<String> {
        reap_qemu_zombies();
        processes_mentioning(self.f.home())
            .into_iter()
            .map(|(pid, cmd)| format!("{pid}: {cmd}"))
            .collect()
    }
}

impl Drop for QemuFerry {
    fn drop(&mut self) {
        for (pid, _) in processes_mentioning(self.f.home()) {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
        let t = Instant::now();
        while !processes_mentioning(self.f.home()).is_empty() && t.elapsed().as_secs() < 5 {
            std::thread::sleep(Duration::from_millis(10));
        }
        reap_qemu_zombies();
    }
}

/// Non-zombie processes whose command line contains `dir`.
pub(crate) fn processes_mentioning(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().as_bytes().to_vec();
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
        {
            continue;
        }
        let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if c.windows(needle.len()).any(|w| w == needle.as_slice()) {
            let cmd = String::from_utf8_lossy(&c).replace('\0', " ");
            if !cmd.contains("--home") {
                out.push((pid, cmd));
            }
        }
    }
    out
}

/// Reaps exited QEMU / qemu-nbd processes this test process inherited as subreaper.
pub(crate) fn reap_qemu_zombies() {
    let me = std::process::id().to_string();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let comm_is_qemu = stat
            .split_once('(')
            .and_then(|(_, r)| r.rsplit_once(')'))
            // Only the daemons ferry starts (QEMU, qemu-nbd): never the tools this test runs
            // itself (qemu-img, qemu-io), whose exit status their own `wait` must collect.
            .is_some_and(|(comm, _)| comm.starts_with("qemu-system") || comm == "qemu-nbd");
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, r)| r.split_whitespace().collect())
            .unwrap_or_default();
        if comm_is_qemu && fields.first() == Some(&"Z") && fields.get(1) == Some(&me.as_str()) {
            unsafe {
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// `qemu-img compare` of two stopped images: identical guest-visible content (allocation may
/// differ: a zero block may be a hole on one side and written zeros on the other).
#[track_caller]
pub(crate) fn assert_same_content(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b)
        .output()
        .expect("run qemu-img compare");
    assert!(
        out.status.success(),
        "{} and {} differ: {}{}",
        a.display(),
        b.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-io` on a stopped image: `read -P` checks a pattern.
#[track_caller]
fn assert_image_reads(img: &Path, fmt: &str, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-r", "-f", fmt, "-c", cmd])
        .arg(img)
        .output()
        .expect("run qemu-io");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && !text.contains("Pattern verification failed")
            && !text.contains("error"),
        "qemu-io {cmd:?} on {}: {text}",
        img.display()
    );
}

#[track_caller]
fn disk0(v: &Value) -> PathBuf {
    disk_path_of(v, 0)
}

#[test]
fn qemu_at_both_sites_whole_lifecycle() {
    let Some(q) = QemuFerry::new("qemu_at_both_sites_whole_lifecycle") else {
        return;
    };
    let t0 = Instant::now();
    let f = &q.f;
    q.setup("qemu", "qemu");
    let v = q.json(&[
        "vm", "create", "web1", "--host", "h1", "--disk", "32MiB", "--switch", "lan", "--memory",
        "128MiB",
    ]);
    assert_eq!(v["driver"], "qemu", "{v}");
    assert_eq!(v["power"], "stopped", "{v}");
    let d = &v["disks"][0];
    assert_eq!(d["format"], "qcow2", "{v}");
    assert_eq!(d["node"], "disk0", "{v}");
    assert_eq!(d["device"], "vblk0", "{v}");
    assert_eq!(d["size"], 32 * MIB, "{v}");
    let qmp = v["qmp"].as_str().expect("qmp socket path");
    assert!(qmp.ends_with("/web1/qmp.sock"), "{v}");

    let t = Instant::now();
    let v = q.json(&["vm", "start", "web1"]);
    eprintln!("vm start (QEMU, TCG): {:?}", t.elapsed());
    assert_eq!(v["power"], "running", "{v}");
    q.ok(&["vm", "start", "web1"]); // idempotent
    q.guest("web1", "h1", 0, "write -P 0xab 4M 2M");

    // ---- protect (reads the running VM through QEMU's NBD server)
    let job = q.json(&["protect", "web1", "--to", "dr"]);
    assert_job_shape(&job);
    assert_job_state(&job, "succeeded");
    f.assert_state("web1", "protected");
    assert!(
        job_u64(&job, "bytes_read") < 8 * MIB,
        "sparse ranges are not read: {job}"
    );

    // ---- guest writes, replicate: the dirty bitmap leaves exactly the written MiB to read
    q.guest("web1", "h1", 0, "write -P 0xcd 10M 1M");
    let job = q.json(&["replicate", "web1"]);
    assert_job_state(&job, "succeeded");
    assert_eq!(
        job_u64(&job, "bytes_read"),
        MIB,
        "change-tracked replication reads only what the guest wrote: {job}"
    );
    assert!(job.get("notes").is_none(), "tracking was trusted: {job}");
    // --verify reads every block and confirms what tracking reported.
    q.guest("web1", "h1", 0, "write -P 0xce 12M 64k");
    let job = q.json(&["replicate", "web1", "--verify"]);
    assert_job_state(&job, "succeeded");
    assert!(
        job_u64(&job, "bytes_read") >= 3 * MIB,
        "every allocated block: {job}"
    );
    assert!(
        job["notes"]
            .to_string()
            .contains("agrees with change tracking"),
        "{job}"
    );

    // ---- planned failover: the primary QEMU stops, the recovery QEMU starts
    let job = q.json(&["failover", "web1", "--planned"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("web1", "failover_commit_pending");
    assert_eq!(f.power("web1", Some("h1")), "stopped");
    let rv = f.vm_show("web1", None);
    assert_eq!(rv["host"], "r1", "{rv}");
    assert_eq!(rv["power"], "running", "{rv}");
    assert_eq!(rv["driver"], "qemu", "{rv}");
    let job = q.json(&["commit", "web1"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("web1", "failed_over");

    // ---- the guest runs at the recovery site
    q.guest("web1", "r1", 0, "write -P 0x11 20M 3M");
    q.guest("web1", "r1", 0, "write -z 4M 64k"); // a block that held data becomes zero

    // ---- failback phase 1 while the recovery VM runs and its guest keeps writing
    let writes = std::sync::atomic::AtomicU64::new(0);
    let done = std::sync::atomic::AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut i = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let off = 24 * MIB + (i * 3 * BLOCK) % (4 * MIB);
                q.guest(
                    "web1",
                    "r1",
                    0,
                    &format!("write -P {} {off} 64k", 0x60 + i % 32),
                );
                i += 1;
                writes.store(i, std::sync::atomic::Ordering::Relaxed);
            }
        });
        let child = q
            .command(&["--json", "failback", "web1"])
            .spawn()
            .expect("spawn ferry failback");
        let out = wait_output(child, CMD_TIMEOUT, "ferry --json failback web1");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        out
    });
    assert_exit(&out, 0, &["--json", "failback", "web1"]);
    let p1 = parse_one_json(&String::from_utf8_lossy(&out.stdout), &["failback"]);
    eprintln!(
        "guest writes during phase 1: {}",
        writes.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert_job_shape(&p1);
    assert_job_state(&p1, "waiting");
    // Phase 1 reads what the recovery guest wrote since failover (at most ~7 MiB with the
    // concurrent writer), not the 32 MiB disk; the stopped primary is not read at all.
    assert!(
        job_u64(&p1, "bytes_read") <= 8 * MIB,
        "phase 1 follows the dirty bitmap: {p1}"
    );
    f.assert_state("web1", "failback_ready");
    assert_eq!(f.power("web1", Some("r1")), "running");
    assert_eq!(f.power("web1", Some("h1")), "stopped");

    // ---- more guest writes, then phase 2
    q.guest("web1", "r1", 0, "write -P 0x22 0 64k");
    q.guest("web1", "r1", 0, "write -P 0x33 30M 1M");
    let t = Instant::now();
    let p2 = q.json(&["complete", "web1"]);
    eprintln!(
        "complete (phase 2): {:?}, downtime_ms {}",
        t.elapsed(),
        p2.get("downtime_ms").unwrap_or(&Value::Null)
    );
    assert_job_state(&p2, "succeeded");
    assert_eq!(job_id(&p2), job_id(&p1));
    // Phase 2 reads the final delta only (1 MiB + 64 KiB, plus what the writer added after
    // phase 1's snapshot, all inside 24..28 MiB).
    let p2_read = job_u64(&p2, "bytes_read") - job_u64(&p1, "bytes_read");
    assert!(p2_read <= 6 * MIB, "phase 2 read {p2_read} bytes: {p2}");
    assert!(
        p2_read >= MIB + 64 * KIB,
        "phase 2 read {p2_read} bytes: {p2}"
    );
    assert!(p2.get("notes").is_none(), "tracking was trusted: {p2}");
    // The downtime (recovery VM stop → primary started) is measured and in the job.
    let down = p2["downtime_ms"]
        .as_u64()
        .expect("phase 2 records its downtime");
    assert!(down < 3000, "phase-2 downtime {down} ms: {p2}");
    f.assert_state("web1", "failback_commit_pending");
    assert_eq!(f.power("web1", Some("h1")), "running");
    assert_eq!(f.power("web1", Some("r1")), "stopped");

    // ---- the primary holds exactly what the recovery VM held at shutdown
    let prim = disk0(&f.vm_show("web1", Some("h1")));
    let rec = disk0(&f.vm_show("web1", Some("r1")));
    let t = Instant::now();
    q.ok(&["vm", "stop", "web1", "--host", "h1"]);
    eprintln!("vm stop (QMP quit): {:?}", t.elapsed());
    assert_same_content(&prim, "qcow2", &rec, "qcow2");
    for cmd in [
        "read -P 0x22 0 64k",
        "read -P 0xab 4259840 2031616", // 4M+64k .. 6M
        "read -P 0 4M 64k",
        "read -P 0xcd 10M 1M",
        "read -P 0x11 20M 3M",
        "read -P 0x33 30M 1M",
    ] {
        assert_image_reads(&prim, "qcow2", cmd);
    }
    q.ok(&["vm", "start", "web1", "--host", "h1"]);

    // ---- commit deletes the recovery VM; reverse replication protects again
    let job = q.json(&["commit", "web1"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("web1", "failed_back");
    f.fail(&["vm", "show", "web1", "--host", "r1"]);
    assert!(!rec.exists(), "recovery disk deleted");
    q.guest("web1", "h1", 0, "write -P 0x44 16M 1M");
    let job = q.json(&["reverse-replicate", "web1"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("web1", "protected");
    assert_eq!(
        job_u64(&job, "bytes_read"),
        MIB,
        "reverse replication reads only what changed since the failback: {job}"
    );

    q.ok(&["vm", "stop", "web1"]);
    let left = q.leftovers();
    assert!(left.is_empty(), "processes left running: {left:?}");
    eprintln!("qemu_at_both_sites_whole_lifecycle: {:?}", t0.elapsed());
}

#[test]
fn qemu_primary_dir_recovery_failover_and_failback() {
    let Some(q) = QemuFerry::new("qemu_primary_dir_recovery_failover_and_failback") else {
        return;
    };
    let t0 = Instant::now();
    let f = &q.f;
    q.setup("qemu", "dir");
    // Not a multiple of the 64 KiB block: qcow2 rounds the image up, ferry keeps the size.
    let size = 24 * MIB + 4608;
    let size_s = size.to_string();
    q.json(&[
        "vm", "create", "app", "--host", "h1", "--disk", &size_s, "--switch", "lan", "--memory",
        "64MiB",
    ]);
    q.ok(&["vm", "start", "app"]);
    q.guest("app", "h1", 0, "write -P 0x5a 1M 3M");
    q.guest("app", "h1", 0, &format!("write -P 0x6b {} 4608", 24 * MIB));
    let job = q.json(&["protect", "app", "--to", "dr"]);
    assert_job_state(&job, "succeeded");

    let job = q.json(&["failover", "app", "--planned"]);
    assert_job_state(&job, "succeeded");
    q.json(&["commit", "app"]);
    f.assert_state("app", "failed_over");
    let rv = f.vm_show("app", None);
    assert_eq!(rv["driver"], "dir", "{rv}");
    assert_eq!(rv["disks"][0]["size"], size, "{rv}");
    let raw = disk0(&rv);
    let prim = disk0(&f.vm_show("app", Some("h1")));
    assert_same_content(&prim, "qcow2", &raw, "raw");

    // The dir "guest" writes its raw image; phase 1, more writes, phase 2.
    write_random(&raw, 2 * MIB, 512 * KIB, 7);
    write_random(&raw, size - 1000, 1000, 8);
    let p1 = q.json(&["failback", "app"]);
    assert_job_state(&p1, "waiting");
    write_random(&raw, 9 * MIB, 128 * KIB, 9);
    zero_range(&raw, MIB, BLOCK);
    let p2 = q.json(&["complete", "app"]);
    assert_job_state(&p2, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    assert_eq!(f.power("app", Some("h1")), "running");

    q.ok(&["vm", "stop", "app", "--host", "h1"]);
    assert_same_content(&prim, "qcow2", &raw, "raw");
    q.ok(&["vm", "start", "app", "--host", "h1"]);
    q.json(&["commit", "app"]);
    f.assert_state("app", "failed_back");
    q.guest("app", "h1", 0, "write -P 0x7c 12M 1M");
    let job = q.json(&["reverse-replicate", "app"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "protected");

    q.ok(&["vm", "stop", "app"]);
    let left = q.leftovers();
    assert!(left.is_empty(), "processes left running: {left:?}");
    eprintln!(
        "qemu_primary_dir_recovery_failover_and_failback: {:?}",
        t0.elapsed()
    );
}

#[test]
fn a_killed_qemu_is_reported_stopped_and_starts_again() {
    let Some(q) = QemuFerry::new("a_killed_qemu_is_reported_stopped_and_starts_again") else {
        return;
    };
    let f = &q.f;
    q.setup("qemu", "qemu");
    q.json(&[
        "vm", "create", "db", "--host", "h1", "--disk", "8MiB", "--memory", "64MiB",
    ]);
    q.ok(&["vm", "start", "db"]);
    q.guest("db", "h1", 0, "write -P 0x99 1M 1M");
    let pid = q.qemu_pid("db", "h1");
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let t = Instant::now();
    while f.power("db", None) != "stopped" {
        assert!(
            t.elapsed() < POLL_TIMEOUT,
            "a killed QEMU still shows as running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let v = f.vm_show("db", None);
    let qmp = PathBuf::from(v["qmp"].as_str().unwrap());
    assert!(!qmp.exists(), "stale QMP socket removed");
    assert!(
        !qmp.with_file_name("qemu.pid").exists(),
        "stale pid file removed"
    );
    // `vm stop` of the dead VM succeeds and changes nothing; `vm start` checks the disk and runs.
    q.ok(&["vm", "stop", "db"]);
    let v = q.json(&["vm", "start", "db"]);
    assert_eq!(v["power"], "running", "{v}");
    q.guest("db", "h1", 0, "read -P 0x99 1M 1M");
    q.ok(&["vm", "stop", "db"]);
    assert_eq!(f.power("db", None), "stopped");
    let left = q.leftovers();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

/// Names of ferry's tracking bitmaps on `disk0` of the running copy of `vm` on `host`.
fn tracking_bitmaps(q: &QemuFerry, vm: &str, host: &str) -> Vec<String> {
    let v = q.f.vm_show(vm, Some(host));
    let mut qmp = Qmp::connect(v["qmp"].as_str().unwrap()).unwrap();
    let nodes = qmp
        .execute(
            "query-named-block-nodes",
            Some(serde_json::json!({"flat": true})),
        )
        .unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .filter(|n| n["node-name"] == "disk0")
        .flat_map(|n| n["dirty-bitmaps"].as_array().cloned().unwrap_or_default())
        .filter_map(|b| b["name"].as_str().map(str::to_string))
        .filter(|n| n.starts_with("ferry-"))
        .collect()
}

/// Protects a 32 MiB qemu VM `db` (qemu at both sites), fails it over planned and commits;
/// the recovery guest then writes 0x77 at 8 MiB (2 MiB).
fn failed_over_qemu_vm(q: &QemuFerry) {
    q.setup("qemu", "qemu");
    q.json(&[
        "vm", "create", "db", "--host", "h1", "--disk", "32MiB", "--memory", "64MiB",
    ]);
    q.ok(&["vm", "start", "db"]);
    q.guest("db", "h1", 0, "write -P 0x5a 1M 4M");
    assert_job_state(&q.json(&["protect", "db", "--to", "dr"]), "succeeded");
    assert_job_state(&q.json(&["failover", "db", "--planned"]), "succeeded");
    assert_job_state(&q.json(&["commit", "db"]), "succeeded");
    q.guest("db", "r1", 0, "write -P 0x77 8M 2M");
}

/// Both copies of `db` hold the same bytes (primary stopped for the comparison).
fn assert_copies_equal(q: &QemuFerry) {
    let prim = disk0(&q.f.vm_show("db", Some("h1")));
    let rec = disk0(&q.f.vm_show("db", Some("r1")));
    q.ok(&["vm", "stop", "db", "--host", "h1"]);
    assert_same_content(&prim, "qcow2", &rec, "qcow2");
}

#[test]
fn a_lost_dirty_bitmap_falls_back_to_a_hash_scan() {
    let Some(q) = QemuFerry::new("a_lost_dirty_bitmap_falls_back_to_a_hash_scan") else {
        return;
    };
    failed_over_qemu_vm(&q);
    // --accel belongs to the qemu driver.
    let err = q.f.fail(&[
        "host", "add", "h9", "--site", "prim", "--driver", "dir", "--accel", "kvm",
    ]);
    assert!(err.contains("qemu driver only"), "{err}");
    // Someone removes ferry's bitmaps from the running recovery VM.
    let names = tracking_bitmaps(&q, "db", "r1");
    assert!(
        !names.is_empty(),
        "failover started tracking on the recovery VM"
    );
    let v = q.f.vm_show("db", Some("r1"));
    {
        let mut qmp = Qmp::connect(v["qmp"].as_str().unwrap()).unwrap();
        for n in &names {
            qmp.execute(
                "block-dirty-bitmap-remove",
                Some(serde_json::json!({"node": "disk0", "name": n})),
            )
            .unwrap();
        }
    }
    q.guest("db", "r1", 0, "write -P 0x78 20M 1M");
    let p1 = q.json(&["failback", "db"]);
    assert_job_state(&p1, "waiting");
    let notes = p1["notes"].to_string();
    assert!(
        notes.contains("change tracking cannot be trusted") && notes.contains("missing"),
        "the job says tracking was lost: {p1}"
    );
    // Every allocated block (4 + 2 + 1 MiB) was read, not just the 3 MiB written since.
    assert!(
        job_u64(&p1, "bytes_read") >= 7 * MIB,
        "the whole recovery disk was scanned: {p1}"
    );
    // Tracking restarted with phase 1: phase 2 is exact again.
    q.guest("db", "r1", 0, "write -P 0x79 30M 64k");
    let p2 = q.json(&["complete", "db"]);
    assert_job_state(&p2, "succeeded");
    let p2_read = job_u64(&p2, "bytes_read") - job_u64(&p1, "bytes_read");
    assert_eq!(p2_read, 64 * KIB, "phase 2 reads the final delta: {p2}");
    assert_copies_equal(&q);
    assert_image_reads(
        &disk0(&q.f.vm_show("db", Some("h1"))),
        "qcow2",
        "read -P 0x78 20M 1M",
    );
    let left = q.leftovers();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[test]
fn killing_the_recovery_qemu_mid_failback_then_rerunning_ends_bit_identical() {
    let Some(q) =
        QemuFerry::new("killing_the_recovery_qemu_mid_failback_then_rerunning_ends_bit_identical")
    else {
        return;
    };
    failed_over_qemu_vm(&q);
    // 16 MiB of incompressible guest data (more than the pipeline reads ahead), so a
    // bandwidth cap keeps phase 1 reading from the recovery VM for seconds.
    let random = q.f.home().join("random.bin");
    std::fs::write(&random, random_bytes(16 * MIB as usize, 42)).unwrap();
    q.guest(
        "db",
        "r1",
        0,
        &format!("write -s {} 12M 16M", random.display()),
    );
    // Phase 1 slowed to ~2 MiB/s so the kill lands in the middle of it.
    let child = q
        .command(&["--json", "failback", "db", "--bandwidth", "2MiB/s"])
        .spawn()
        .expect("spawn ferry failback");
    std::thread::sleep(Duration::from_millis(1500));
    let pid = q.qemu_pid("db", "r1");
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let out = wait_output(
        child,
        CMD_TIMEOUT,
        "ferry failback db (recovery QEMU killed)",
    );
    assert_ne!(out.status.code(), Some(0), "the failback noticed: {out:?}");
    let t = Instant::now();
    while q.f.power("db", Some("r1")) != "stopped" {
        assert!(
            t.elapsed() < POLL_TIMEOUT,
            "a killed QEMU still shows as running"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The re-run continues the same job; the killed QEMU never saved its bitmap, so ferry
    // says so and reads every block.
    let p = q.json(&["failback", "db", "--auto-complete"]);
    assert_job_state(&p, "succeeded");
    let notes = p["notes"].to_string();
    assert!(
        notes.contains("inconsistent"),
        "the job says the bitmap of the killed QEMU was not trusted: {p}"
    );
    q.f.assert_state("db", "failback_commit_pending");
    assert_copies_equal(&q);
    let left = q.leftovers();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[test]
fn demo_runs_the_whole_story_on_real_qemu_vms() {
    let Some(q) = QemuFerry::new("demo_runs_the_whole_story_on_real_qemu_vms") else {
        return;
    };
    let dir = q.f.home().join("demo");
    let dir_s = dir.to_str().unwrap().to_string();
    let v = q.json(&[
        "demo",
        "--driver",
        "qemu",
        "--disk-size",
        "32MiB",
        "--dir",
        &dir_s,
    ]);
    assert_eq!(v["bit_identical"], true, "{v}");
    assert_eq!(v["state"], "protected", "{v}");
    let steps = v["steps"].as_array().unwrap();
    let complete = steps
        .iter()
        .find(|s| s["step"].as_str().unwrap().starts_with("complete"))
        .unwrap();
    assert!(
        complete["job"]["downtime_ms"].as_u64().unwrap() < 3000,
        "phase-2 downtime: {complete}"
    );
    // Change tracking: the 1% reverse replication reads far less than the 40 MiB of disks.
    let reverse = steps.last().unwrap();
    assert!(
        reverse["job"]["bytes_read"].as_u64().unwrap() < 4 * MIB,
        "{reverse}"
    );
    let left = processes_mentioning(&dir);
    assert!(left.is_empty(), "the demo left processes running: {left:?}");
}

#[test]
fn a_disabled_dirty_bitmap_is_not_trusted() {
    let Some(q) = QemuFerry::new("a_disabled_dirty_bitmap_is_not_trusted") else {
        return;
    };
    failed_over_qemu_vm(&q);
    // Someone disables ferry's bitmaps: they stop recording, then the guest writes.
    let names = tracking_bitmaps(&q, "db", "r1");
    assert!(!names.is_empty());
    let v = q.f.vm_show("db", Some("r1"));
    {
        let mut qmp = Qmp::connect(v["qmp"].as_str().unwrap()).unwrap();
        for n in &names {
            qmp.execute(
                "block-dirty-bitmap-disable",
                Some(serde_json::json!({"node": "disk0", "name": n})),
            )
            .unwrap();
        }
    }
    q.guest("db", "r1", 0, "write -P 0x3c 20M 2M");
    let job = q.json(&["failback", "db", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    assert!(
        job["notes"].to_string().contains("disabled"),
        "the job says the bitmap stopped recording: {job}"
    );
    assert_copies_equal(&q);
    assert_image_reads(
        &disk0(&q.f.vm_show("db", Some("h1"))),
        "qcow2",
        "read -P 0x3c 20M 2M",
    );
    let left = q.leftovers();
    assert!(left.is_empty(), "processes left running: {left:?}");
}

#[test]
fn a_view_left_by_a_killed_ferry_is_cleaned_up_and_the_failback_resumes() {
    let Some(q) =
        QemuFerry::new("a_view_left_by_a_killed_ferry_is_cleaned_up_and_the_failback_resumes")
    else {
        return;
    };
    failed_over_qemu_vm(&q);
    let random = q.f.home().join("random.bin");
    std::fs::write(&random, random_bytes(16 * MIB as usize, 7)).unwrap();
    q.guest(
        "db",
        "r1",
        0,
        &format!("write -s {} 12M 16M", random.display()),
    );
    let mut child = q
        .command(&["--json", "failback", "db", "--bandwidth", "2MiB/s"])
        .spawn()
        .expect("spawn ferry failback");
    let vm_dir = disk0(&q.f.vm_show("db", Some("r1")))
        .parent()
        .unwrap()
        .to_path_buf();
    let overlays = || -> Vec<String> {
        std::fs::read_dir(&vm_dir)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with("fv"))
            .collect()
    };
    // Wait until phase 1 reads from its snapshot, then kill ferry outright.
    let t = Instant::now();
    while overlays().is_empty() {
        assert!(
            t.elapsed() < POLL_TIMEOUT,
            "phase 1 never opened its snapshot"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(500));
    q.f.kill_job_runner(&mut child);
    assert!(!overlays().is_empty(), "the killed ferry left its snapshot");
    // Looking at the VM removes the dead process's snapshot: no overlay, no block job.
    q.f.vm_show("db", Some("r1"));
    assert!(overlays().is_empty(), "stale overlays: {:?}", overlays());
    let v = q.f.vm_show("db", Some("r1"));
    {
        let mut qmp = Qmp::connect(v["qmp"].as_str().unwrap()).unwrap();
        let jobs = qmp.execute("query-block-jobs", None).unwrap();
        assert_eq!(jobs, serde_json::json!([]), "fleecing job left running");
    }
    // The guest keeps writing; the resumed failback ends bit-identical.
    q.guest("db", "r1", 0, "write -P 0x5e 2M 1M");
    let job = q.json(&["failback", "db", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    assert_copies_equal(&q);
    let left = q.leftovers();
    assert!(left.is_empty(), "processes left running: {left:?}");
}
