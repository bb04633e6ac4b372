//! Faults during failback (DESIGN.md §2 rule 6, §6): cancel from another process, kill -9,
//! inconsistent target disks refuse to start, re-running continues the same job where it stopped.

use crate::harness::*;
use serde_json::Value;
use std::process::Child;
use std::time::{Duration, Instant};

const BW: &str = "2MiB/s";

fn status_job_bytes(s: &Value) -> u64 {
    s["job"]["bytes_transferred"].as_u64().unwrap_or(0)
}

/// Polls `status` until the VM is in one of `states` with its job having moved at least
/// `min_bytes` over the WAN. Panics (with the child's stderr) if the child already exited.
fn wait_moving(f: &Ferry, child: &mut Child, states: &[&str], min_bytes: u64) -> Value {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < POLL_TIMEOUT {
        if let Some(st) = child.try_wait().unwrap() {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut err);
            }
            panic!("the failback ended ({st}) before it could be interrupted; last status {last}; stderr:\n{err}");
        }
        let out = f.run(&["--json", "status", "app"]);
        if out.status.code() == Some(0) {
            if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                let st = v["state"].as_str().unwrap_or("");
                if states.contains(&st) && status_job_bytes(&v) >= min_bytes {
                    return v;
                }
                last = v;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {states:?} with ≥ {min_bytes} bytes transferred; last status: {last}");
}

/// The primary copy after an interruption: inconsistent and refusing to start.
fn assert_primary_inconsistent_and_unstartable(f: &Ferry) {
    let v = f.vm_show("app", Some("h1"));
    let d0 = &v["disks"][0];
    assert_eq!(
        d0["consistent"], false,
        "the interrupted target disk is marked inconsistent: {v}"
    );
    assert_eq!(v["power"], "stopped", "{v}");
    let err = f.fail(&["vm", "start", "app", "--host", "h1"]);
    assert!(
        err.contains("inconsistent"),
        "vm start explains the disk is inconsistent: {err}"
    );
    assert_eq!(
        f.power("app", Some("h1")),
        "stopped",
        "the refused start changed nothing"
    );
}

/// A VM failed over with `fill` bytes of data and `changed` bytes of new random data written
/// on the recovery copy (from offset `fill`). Returns (primary, recovery) disk paths.
fn failed_over_with_changes(
    f: &Ferry,
    size: u64,
    fill: u64,
    changed: u64,
) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[size], &["lan"], fill);
    write_random(&rec[0], fill, changed, 31);
    (prim, rec)
}

#[test]
fn cancel_delta_failback_from_another_process_then_resume() {
    let f = Ferry::new();
    let changed = 20 * MIB;
    let (prim, rec) = failed_over_with_changes(&f, 32 * MIB, 8 * MIB, changed);

    let mut child = f.spawn(&["failback", "app", "--bandwidth", BW]);
    let s = wait_moving(&f, &mut child, &["failback_syncing"], 6 * MIB);
    let id = job_id(&s["job"]);
    assert_eq!(s["job"]["state"], "running", "{s}");
    // While syncing the recovery VM keeps running and is the active copy.
    assert_eq!(f.power("app", Some("r1")), "running");

    let t = Instant::now();
    f.ok(&["cancel", "app"]);
    assert!(
        t.elapsed() < Duration::from_secs(35),
        "cancel returns once the job stopped (≤ 30 s)"
    );
    // cancel returned: the job has stopped, so the state is already final.
    let s = f.status("app");
    assert_eq!(s["state"], "failback_interrupted", "{s}");
    assert_eq!(
        job_id(&s["job"]),
        id,
        "status shows the interrupted job: {s}"
    );

    let out = wait_output(child, Duration::from_secs(60), "cancelled failback");
    assert_eq!(out.status.code(), Some(1), "the cancelled process exits 1");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cancelled"), "stderr says cancelled: {err}");
    assert!(
        err.trim_end()
            .lines()
            .last()
            .unwrap_or("")
            .starts_with("error: "),
        "error line: {err}"
    );

    let b1 = status_job_bytes(&f.status("app"));
    assert!(
        b1 >= 6 * MIB,
        "counters keep what the first run moved: {b1}"
    );
    assert_primary_inconsistent_and_unstartable(&f);
    assert_eq!(
        f.vm_show("app", None)["host"],
        "r1",
        "the recovery copy stays active"
    );
    assert_eq!(
        f.power("app", Some("r1")),
        "running",
        "cancelling phase 1 leaves the workload running"
    );

    // Re-run: the same job continues where it stopped.
    let job = f.json(&["failback", "app"]);
    assert_eq!(job_id(&job), id, "re-running continues the same job");
    assert_job_state(&job, "waiting");
    f.assert_state("app", "failback_ready");
    let total = job_u64(&job, "bytes_transferred");
    assert!(total >= b1, "bytes keep accumulating: {total} < {b1}");
    assert!(
        total <= changed + changed / 10 + 2 * MIB,
        "resume must not start over: {total} bytes moved for {changed} changed (first run {b1})"
    );
    assert_eq!(
        f.all_jobs()
            .iter()
            .filter(|j| j["kind"] == "failback")
            .count(),
        1,
        "one failback job"
    );

    let done = f.json(&["complete", "app"]);
    assert_job_state(&done, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    assert_all_identical(&prim, &rec);
    let v = f.vm_show("app", Some("h1"));
    assert_eq!(
        v["disks"][0]["consistent"], true,
        "consistent again after the sync: {v}"
    );
    assert_eq!(v["power"], "running");
}

#[test]
fn kill_9_during_delta_failback_then_resume() {
    let f = Ferry::new();
    let changed = 20 * MIB;
    let (prim, rec) = failed_over_with_changes(&f, 32 * MIB, 8 * MIB, changed);

    let mut child = f.spawn(&["failback", "app", "--bandwidth", BW, "--auto-complete"]);
    let s = wait_moving(&f, &mut child, &["failback_syncing"], 6 * MIB);
    let id = job_id(&s["job"]);
    f.kill_job_runner(&mut child);

    // The next command notices the abandoned job.
    let s = f.status("app");
    assert_eq!(
        s["state"], "failback_interrupted",
        "a killed failback is detected as interrupted: {s}"
    );
    assert_eq!(job_id(&s["job"]), id, "{s}");
    let b1 = status_job_bytes(&s);
    assert!(
        b1 >= 6 * MIB,
        "what the killed run moved is remembered: {s}"
    );
    assert_primary_inconsistent_and_unstartable(&f);
    assert_eq!(f.power("app", Some("r1")), "running");

    let job = f.json(&["failback", "app", "--auto-complete"]);
    assert_eq!(job_id(&job), id, "re-running continues the same job");
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    let total = job_u64(&job, "bytes_transferred");
    assert!(total >= b1, "bytes keep accumulating: {total} < {b1}");
    assert!(
        total <= changed + changed / 10 + 2 * MIB,
        "resume must not start over: {total} (first run {b1})"
    );
    assert_all_identical(&prim, &rec);
    assert_eq!(f.vm_show("app", Some("h1"))["disks"][0]["consistent"], true);
    assert_eq!(f.power("app", Some("h1")), "running");
}

#[test]
fn cancel_full_failback_then_resume() {
    let f = Ferry::new();
    let data = 24 * MIB;
    let (prim, rec) = failed_over_with_changes(&f, 32 * MIB, data, MIB);
    let non_zero = data + MIB + 4096; // fill + new data + the random tail written by the fixture

    let mut child = f.spawn(&["failback", "app", "--sync", "full", "--bandwidth", BW]);
    let s = wait_moving(
        &f,
        &mut child,
        &["failback_completing", "failback_syncing"],
        8 * MIB,
    );
    let id = job_id(&s["job"]);
    f.ok(&["cancel", "app"]);
    let out = wait_output(child, Duration::from_secs(60), "cancelled full failback");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cancelled"));
    let s = f.status("app");
    assert_eq!(s["state"], "failback_interrupted", "{s}");
    let b1 = status_job_bytes(&s);
    assert_primary_inconsistent_and_unstartable(&f);

    let job = f.json(&["failback", "app", "--sync", "full"]);
    assert_eq!(job_id(&job), id, "re-running continues the same job");
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    let total = job_u64(&job, "bytes_transferred");
    assert!(total >= b1);
    assert!(
        total <= non_zero + non_zero / 10 + 2 * MIB,
        "resume must not start over: {total} bytes for {non_zero} of data (first run {b1})"
    );
    assert_all_identical(&prim, &rec);
    assert_eq!(f.power("app", Some("h1")), "running");
    assert_eq!(f.power("app", Some("r1")), "stopped");
}

#[test]
fn bandwidth_cap_limits_transfer_rate() {
    let f = Ferry::new();
    let changed = 8 * MIB;
    let (prim, rec) = failed_over_with_changes(&f, 16 * MIB, 4 * MIB, changed);
    let t = Instant::now();
    let job = f.json(&["failback", "app", "--bandwidth", "2MiB/s", "--threads", "2"]);
    let secs = t.elapsed().as_secs_f64();
    assert_job_state(&job, "waiting");
    let moved = job_u64(&job, "bytes_transferred") as f64;
    // 8 MiB at 2 MiB/s cannot take much less than 4 s (allow a 1 s burst).
    assert!(
        secs >= moved / (2.0 * MIB as f64) - 1.0,
        "{moved} bytes in {secs:.1}s exceeds 2 MiB/s"
    );
    assert_job_state(&f.json(&["complete", "app"]), "succeeded");
    assert_all_identical(&prim, &rec);
}

/// A small ext4 file system on a loop device, mounted for the test and unmounted after it.
struct SmallFs {
    dir: tempfile::TempDir,
    mnt: std::path::PathBuf,
}

impl SmallFs {
    /// None (with a note) where loop mounts are not permitted.
    fn mount(size_mib: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(size_mib << 20).unwrap();
        let ok = |c: &mut std::process::Command| c.output().is_ok_and(|o| o.status.success());
        if !ok(std::process::Command::new("mkfs.ext4")
            .args(["-q", "-F"])
            .arg(&img))
            || !ok(std::process::Command::new("mount")
                .args(["-o", "loop"])
                .arg(&img)
                .arg(&mnt))
        {
            eprintln!("note: disk-full test skipped: cannot loop-mount a file system here (needs root and /dev/loop*)");
            return None;
        }
        Some(SmallFs { dir, mnt })
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.mnt)
            .status();
        let _ = &self.dir;
    }
}

#[test]
fn a_full_primary_file_system_fails_the_failback_by_name_and_a_rerun_completes_once_freed() {
    let Some(fs) = SmallFs::mount(48) else {
        return;
    };
    let f = Ferry::new();
    f.ok(&["init"]);
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    f.ok(&["site", "add", "dr", "--role", "recovery"]);
    f.add_host(PRIMARY_HOST, "prim", &["lan"], Some(&fs.mnt.join("h1")));
    f.add_host(RECOVERY_HOST, "dr", &["lan"], None);
    let (prim, rec) = f.failed_over_vm("app", &[32 * MIB], &["lan"], 2 * MIB);
    let changed = 24 * MIB;
    write_random(&rec[0], 4 * MIB, changed, 881);
    // Something else fills the primary's file system.
    let filler = fs.mnt.join("filler");
    let out = std::process::Command::new("fallocate")
        .args(["-l", "20M"])
        .arg(&filler)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let out = f.run(&["failback", "app", "--auto-complete"]);
    assert!(!out.status.success(), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("disk 0 of VM app on host h1")
            && err.contains("is full")
            && err.contains("free")
            && err.contains("ferry failback app"),
        "the failure names the disk, the space and the next command: {err}"
    );
    f.assert_state("app", "failback_interrupted");
    let h1 = f.vm_show("app", Some("h1"));
    assert_eq!(h1["disks"][0]["consistent"], false, "{h1}");
    assert_eq!(h1["power"], "stopped", "{h1}");
    let refused = f.fail(&["vm", "start", "app", "--host", "h1"]);
    assert!(refused.contains("inconsistent"), "{refused}");
    assert_eq!(
        f.power("app", Some("r1")),
        "running",
        "the recovery VM keeps running"
    );
    // Space freed: the same command continues and ends bit-identical.
    std::fs::remove_file(&filler).unwrap();
    let job = f.json(&["failback", "app", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &rec);
    // What was written before the file system filled up is not written again.
    assert!(
        job_u64(&job, "bytes_written") <= changed + 5 * MIB,
        "the re-run did not start over: {job}"
    );
    assert_eq!(f.power("app", Some("h1")), "running");
}
