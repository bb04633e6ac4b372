//! A real guest through drills, point choice, app-consistent points and failback: ferry's test
//! guest (`scripts/guest-image.sh`: Debian's kernel, an initramfs with busybox and
//! qemu-guest-agent) boots under QEMU (TCG) and keeps writing numbered files to its ext4 data
//! disk, fsyncing each and then its line in `SHA256SUMS`. At every boot it checks the file
//! system (`e2fsck -fn` after the journal replay) and every line of the checksum list, and
//! prints what it found on its serial console (`console.log` in the VM's folder), which
//! these tests read.
//!
//! Skipped with a note when QEMU or the guest image is missing, unless FERRY_TEST_GUEST=1
//! (as in `.ci/run`), which makes a missing image a failure.

use std::path::PathBuf;
use std::time::Duration;

use ferry_hypervisor::guest::{self, read_console, BootReport as Boot};
use ferry_hypervisor::qga::Qga;
use serde_json::Value;

use crate::harness::*;
use crate::qemu::QemuFerry;

/// The test guest's folder, or None (with a note) when it is not built.
fn guest_image(test: &str) -> Option<PathBuf> {
    let dir = ferry_hypervisor::qemu::guest_image_dir();
    if dir.join("vmlinuz").is_file() && dir.join("initrd.img").is_file() {
        return Some(dir);
    }
    let msg = format!(
        "{test}: the test guest is not built in {} (run scripts/guest-image.sh)",
        dir.display()
    );
    if std::env::var("FERRY_TEST_GUEST").as_deref() == Ok("1") {
        panic!("{msg}");
    }
    eprintln!("note: skipped: {msg}");
    None
}

fn console(q: &QemuFerry, vm: &str, host: &str) -> PathBuf {
    guest::console_path(&q.f.host_root(host), vm)
}

/// Waits until the console of `vm` on `host` satisfies `cond` (at most 90 s under TCG).
#[track_caller]
fn wait_console(
    q: &QemuFerry,
    vm: &str,
    host: &str,
    what: &str,
    cond: impl Fn(&Boot) -> bool,
) -> Boot {
    guest::wait_console(&console(q, vm, host), Duration::from_secs(90), cond).unwrap_or_else(|b| {
        panic!(
            "{vm}@{host}: {what} did not happen within 90 s; its console since the last boot:\n{}",
            b.lines.join("\n")
        )
    })
}

/// Waits for a boot after `boots_before` boots and its checks, and asserts the file system
/// is clean and every checksummed file verifies; returns the boot's report.
#[track_caller]
fn assert_boots_clean(q: &QemuFerry, vm: &str, host: &str, boots_before: usize) -> Boot {
    let b = wait_console(q, vm, host, "a boot with its file checks", |b| {
        b.boots > boots_before && b.checked()
    });
    assert_eq!(
        b.fsck,
        Some(0),
        "{vm}@{host}: e2fsck found errors:\n{}",
        b.lines.join("\n")
    );
    assert_eq!(
        b.failed,
        0,
        "{vm}@{host}: files whose checksum does not match:\n{}",
        b.lines.join("\n")
    );
    assert!(
        b.malformed <= 1,
        "{vm}@{host}: more than the last checksum line is torn: {b:?}"
    );
    b
}

/// The workload goes on: `n` more files fsynced after `after`.
#[track_caller]
fn wait_writes(q: &QemuFerry, vm: &str, host: &str, after: u64, n: u64) -> u64 {
    wait_console(q, vm, host, "the workload's writes", |b| {
        b.synced >= after + n
    })
    .synced
}

/// Sites and qemu hosts, and VM `app` on h1 booting the test guest with a data disk of
/// `disk`: started, its first boot clean on a new disk, `files` files written; answers the
/// number of the newest.
#[track_caller]
fn guest_vm(q: &QemuFerry, disk: &str, files: u64) -> u64 {
    q.setup("qemu", "qemu");
    let v = q.json(&[
        "vm",
        "create",
        "app",
        "--host",
        PRIMARY_HOST,
        "--image",
        "guest",
        "--disk",
        disk,
        "--switch",
        "lan",
    ]);
    assert_eq!(v["power"], "stopped", "{v}");
    q.ok(&["vm", "start", "app"]);
    let first = assert_boots_clean(q, "app", PRIMARY_HOST, 0);
    assert_eq!(first.ok, 0, "a new disk holds no files yet: {first:?}");
    wait_writes(q, "app", PRIMARY_HOST, 0, files)
}

fn point_id(p: &Value) -> i64 {
    p["id"].as_i64().expect("point id")
}

#[test]
fn a_real_guest_survives_drills_point_changes_and_a_delta_failback() {
    let test = "a_real_guest_survives_drills_point_changes_and_a_delta_failback";
    let Some(q) = QemuFerry::new(test) else {
        return;
    };
    if guest_image(test).is_none() {
        return;
    }
    let n = guest_vm(&q, "256MiB", 3);

    // Protect, then an app-consistent point taken with the guest frozen.
    assert_job_state(&q.json(&["protect", "app", "--to", "dr"]), "succeeded");
    let n = wait_writes(&q, "app", PRIMARY_HOST, n, 3);
    let j = q.json(&["replicate", "app", "--app-consistent"]);
    assert_job_state(&j, "succeeded");
    let pts = q.f.points("app");
    assert_eq!(pts[0]["consistency"], "app", "{:?}", pts[0]);
    let app_point = point_id(&pts[0]);
    // Thawed: the guest writes on.
    let n = wait_writes(&q, "app", PRIMARY_HOST, n, 3);

    // A drill: the test copy boots from the app-consistent point on the isolated switch while
    // replication goes on; the clean-up leaves nothing behind.
    let j = q.json(&[
        "failover",
        "app",
        "--test",
        "--point",
        "latest-app-consistent",
    ]);
    assert_job_state(&j, "succeeded");
    let st = q.f.status("app");
    assert_eq!(st["state"], "protected", "{st}");
    assert_eq!(st["test"]["point"].as_i64(), Some(app_point), "{st}");
    let copy = q.f.vm_show("app-test", Some(RECOVERY_HOST));
    assert_eq!(copy["nics"][0]["switch"], "ferry-test", "{copy}");
    let drill = assert_boots_clean(&q, "app-test", RECOVERY_HOST, 0);
    assert!(
        drill.ok >= 3,
        "the test copy has the files of its point: {drill:?}"
    );
    for _ in 0..2 {
        assert_job_state(&q.json(&["replicate", "app"]), "succeeded");
    }
    let n = wait_writes(&q, "app", PRIMARY_HOST, n, 2);
    assert_job_state(&q.json(&["failover", "app", "--cleanup-test"]), "succeeded");
    assert!(
        !q.f.host_root(RECOVERY_HOST).join("app-test").exists(),
        "the test copy's folder (disks, overlay, console) is gone"
    );
    let left: Vec<String> = q
        .leftovers()
        .into_iter()
        .filter(|p| p.contains("app-test"))
        .collect();
    assert!(
        left.is_empty(),
        "processes of the test copy remain: {left:?}"
    );

    // The primary site goes down after a crash-consistent cycle: an unplanned failover to
    // the app-consistent point, then a change to the newer crash-consistent one, commit.
    assert_job_state(&q.json(&["replicate", "app"]), "succeeded");
    let crash_point = point_id(&q.f.points("app")[0]);
    q.ok(&["vm", "stop", "app", "--host", PRIMARY_HOST]);
    let at_stop = read_console(&console(&q, "app", PRIMARY_HOST)).synced;
    assert!(at_stop >= n);
    let j = q.json(&[
        "failover",
        "app",
        "--unplanned",
        "--point",
        "latest-app-consistent",
    ]);
    assert_job_state(&j, "succeeded");
    let at_app = assert_boots_clean(&q, "app", RECOVERY_HOST, 0);
    let j = q.json(&["failover", "app", "--point", &crash_point.to_string()]);
    assert_job_state(&j, "succeeded");
    assert_eq!(q.f.state("app"), "failover_commit_pending");
    let at_crash = assert_boots_clean(&q, "app", RECOVERY_HOST, 0);
    assert!(
        at_crash.last_at_boot > at_app.last_at_boot,
        "the newer point holds more files: {} vs {}",
        at_crash.last_at_boot,
        at_app.last_at_boot
    );
    assert_job_state(&q.json(&["commit", "app"]), "succeeded");
    let pts: Vec<i64> = q.f.points("app").iter().map(point_id).collect();
    assert!(
        pts.contains(&app_point) && pts.contains(&crash_point),
        "{pts:?}"
    );

    // Failback with the workload running through phase 1, then phase 2.
    let n = wait_writes(&q, "app", RECOVERY_HOST, at_crash.last_at_boot, 5);
    let j = q.json(&["failback", "app"]);
    assert_job_state(&j, "waiting");
    let n = wait_writes(&q, "app", RECOVERY_HOST, n, 3);
    let j = q.json(&["complete", "app"]);
    assert_job_state(&j, "succeeded");
    let stopped_at = read_console(&console(&q, "app", RECOVERY_HOST)).synced;
    assert!(stopped_at >= n);
    let boots = read_console(&console(&q, "app", PRIMARY_HOST)).boots;
    let back = assert_boots_clean(&q, "app", PRIMARY_HOST, boots);
    assert!(
        back.last_at_boot >= stopped_at,
        "every file fsynced before the recovery VM stopped (up to f-{stopped_at:06}) is on the primary, which has up to f-{:06}",
        back.last_at_boot
    );
    assert_eq!(back.ok, back.last_at_boot, "{back:?}");
    eprintln!(
        "guest: drill copy had {} files; failover at the app point {}, at the crash point {}; the recovery VM stopped after f-{stopped_at:06}; the primary came back with {} files",
        drill.ok, at_app.ok, at_crash.ok, back.ok
    );
    assert_job_state(&q.json(&["commit", "app"]), "succeeded");
    wait_writes(&q, "app", PRIMARY_HOST, back.last_at_boot, 2);
}

#[test]
fn a_freeze_that_times_out_thaws_the_guest_and_yields_a_crash_point() {
    let test = "a_freeze_that_times_out_thaws_the_guest_and_yields_a_crash_point";
    // One millisecond is too short for any freeze: the guest agent answers late.
    let Some(q) = QemuFerry::with_env(test, &[("FERRY_GUEST_FREEZE_TIMEOUT_MS", "1")]) else {
        return;
    };
    if guest_image(test).is_none() {
        return;
    }
    let n = guest_vm(&q, "128MiB", 2);
    assert_job_state(&q.json(&["protect", "app", "--to", "dr"]), "succeeded");
    let j = q.json(&["replicate", "app", "--app-consistent"]);
    assert_job_state(&j, "succeeded");
    let notes = j["notes"].to_string();
    assert!(
        notes.contains("not app-consistent") && notes.contains("thawed"),
        "the job says why the point is crash-consistent: {j}"
    );
    assert_eq!(q.f.points("app")[0]["consistency"], "crash");
    // The guest is thawed: its agent says so and its workload goes on.
    let sock = q.f.host_root(PRIMARY_HOST).join("app").join("qga.sock");
    let mut qga = Qga::connect(&sock, Duration::from_secs(10)).expect("guest agent");
    let status = qga
        .execute("guest-fsfreeze-status", None, Duration::from_secs(10))
        .expect("fsfreeze status");
    assert_eq!(status, "thawed");
    drop(qga);
    wait_writes(&q, "app", PRIMARY_HOST, n, 3);

    // A VM with no guest agent at all (no operating system): a crash-consistent point too.
    q.ok(&[
        "vm",
        "create",
        "bare",
        "--host",
        PRIMARY_HOST,
        "--disk",
        "8MiB",
        "--switch",
        "lan",
    ]);
    q.ok(&["vm", "start", "bare"]);
    assert_job_state(&q.json(&["protect", "bare", "--to", "dr"]), "succeeded");
    let j = q.json(&["replicate", "bare", "--app-consistent"]);
    assert_job_state(&j, "succeeded");
    assert!(j["notes"].to_string().contains("guest agent"), "{j}");
    assert_eq!(q.f.points("bare")[0]["consistency"], "crash");
}

#[test]
fn the_guest_demo_prints_the_guests_own_checks_after_each_move() {
    let test = "the_guest_demo_prints_the_guests_own_checks_after_each_move";
    let Some(q) = QemuFerry::new(test) else {
        return;
    };
    if guest_image(test).is_none() || q.f.is_served() {
        // The demo runs embedded whatever the mode: once is enough.
        return;
    }
    let dir = q.f.home().join("demo");
    let v = q.json(&[
        "demo",
        "--driver",
        "qemu",
        "--guest",
        "--disk-size",
        "128MiB",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert_eq!(v["state"], "protected", "{v}");
    let checks = v["guest_checks"].as_array().unwrap();
    assert_eq!(checks.len(), 2, "{v}");
    for c in checks {
        assert_eq!(c["fsck"], 0, "{c}");
        assert_eq!(c["failed"], 0, "{c}");
        assert!(
            c["files_ok"].as_u64().unwrap() >= c["last_fsynced_before_stop"].as_u64().unwrap(),
            "{c}"
        );
    }
    let app = &v["steps"][1];
    assert!(
        app["step"].as_str().unwrap().contains("app-consistent"),
        "{app}"
    );
    let left = crate::qemu::processes_mentioning(&dir);
    assert!(left.is_empty(), "the demo left processes running: {left:?}");
    // Embedded use of `--guest` without QEMU's driver is a usage mistake, said plainly.
    let err = q.f.fail(&["demo", "--guest"]);
    assert!(err.contains("--driver qemu"), "{err}");
}
