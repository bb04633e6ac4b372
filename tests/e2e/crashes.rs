//! Crashes at the riskiest instants (injected with FERRY_FAULT, a real SIGKILL), corrupt store
//! data, a store shared with a long-running job, and a lost failback target: nothing is lost.
use std::time::Duration;

use crate::harness::*;

#[test]
fn crash_after_primary_started_never_overwrites_its_new_writes() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan"], 4 * MIB);
    write_random(&rec[0], 0, MIB, 501);
    f.crash_at(
        "failback/start-primary-vm/after",
        &["failback", "app", "--auto-complete"],
    );
    // The primary runs the workload now; the next command settles the dead job.
    assert_eq!(f.power("app", Some("h1")), "running");
    f.assert_state("app", "failback_interrupted");
    assert_all_identical(&prim, &rec);
    // The guest writes on the primary before the operator re-runs the failback.
    write_random(&prim[0], 2 * MIB, MIB, 502);
    let snapshot = read_range(&prim[0], 0, 8 * MIB);
    let job = f.json(&["failback", "app"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    assert_eq!(
        read_range(&prim[0], 0, 8 * MIB),
        snapshot,
        "the primary's new writes survive"
    );
    assert_eq!(f.power("app", Some("h1")), "running");
}

#[test]
fn crash_before_primary_started_finishes_by_starting_it() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan"], 4 * MIB);
    write_random(&rec[0], MIB, MIB, 511);
    f.crash_at(
        "failback/start-primary-vm/before",
        &["failback", "app", "--auto-complete"],
    );
    f.assert_state("app", "failback_interrupted");
    assert_eq!(f.power("app", Some("h1")), "stopped");
    let job = f.json(&["failback", "app"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    assert_eq!(f.power("app", Some("h1")), "running");
    assert_all_identical(&prim, &rec);
}

#[test]
fn crash_after_recovery_vm_started_keeps_its_writes() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let prim = f.protected_vm("app", &[8 * MIB], &["lan"], 4 * MIB);
    f.crash_at(
        "failover/start-recovery-vm/after",
        &["failover", "app", "--planned"],
    );
    let rec = f.disk_paths("app", "r1");
    assert_eq!(f.power("app", Some("r1")), "running");
    write_random(&rec[0], 3 * MIB, MIB, 521); // the recovered guest already works
    let snapshot = read_range(&rec[0], 0, 8 * MIB);
    let job = f.json(&["failover", "app", "--planned"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failover_commit_pending");
    assert_eq!(
        read_range(&rec[0], 0, 8 * MIB),
        snapshot,
        "the recovery VM was not recreated"
    );
    assert_eq!(f.power("app", Some("h1")), "stopped");
    let _ = prim;
}

#[test]
fn corrupt_store_data_fails_failover_quickly_and_writes_nothing_wrong() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    f.protected_vm("app", &[8 * MIB], &["lan"], 8 * MIB);
    let mut packs = Vec::new();
    for e in std::fs::read_dir(f.home().join("stores/dr/packs")).unwrap() {
        packs.push(e.unwrap().path());
    }
    let pack = &packs[0];
    let mut b = std::fs::read(pack).unwrap();
    let mid = b.len() / 2;
    b[mid] ^= 0x5a;
    std::fs::write(pack, b).unwrap();
    let err = f.fail(&["verify", "app"]);
    assert!(err.contains("corrupt") && err.contains("block"), "{err}");
    let out = f.run_timeout(&["failover", "app", "--unplanned"], Duration::from_secs(60));
    assert_eq!(
        out.status.code(),
        Some(1),
        "failover refuses corrupt data instead of hanging"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("corrupt"), "{err}");
    f.assert_state("app", "protected");
    let show = f.vm_show("app", Some("r1"));
    assert_ne!(
        show["power"], "running",
        "a VM with a corrupt disk must not run: {show}"
    );
}

#[test]
fn retention_of_another_vm_never_collects_a_running_jobs_packs() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    // VM "big" protects slowly (bandwidth cap) while VM "small" churns points with a 1 s retention.
    f.create_vm("big", "h1", &[32 * MIB], &["lan"]);
    write_random(&f.disk_paths("big", "h1")[0], 0, 32 * MIB, 531);
    f.create_vm("small", "h1", &[2 * MIB], &["lan"]);
    let small = f.disk_paths("small", "h1");
    write_random(&small[0], 0, 2 * MIB, 532);
    f.ok(&["protect", "small", "--to", "dr", "--retention", "1s"]);
    let child = f.spawn(&["protect", "big", "--to", "dr", "--bandwidth", "3MiB/s"]);
    f.wait_status("big", POLL_TIMEOUT, "protect moving data", |s| {
        s["job"]["bytes_transferred"].as_u64().unwrap_or(0) > 2 * MIB
    });
    std::thread::sleep(Duration::from_secs(1));
    for round in 0..3 {
        // Make every pack look hours old, as for a job that has run that long: only the
        // running job's lease can keep its packs (no manifest names them yet) from collection.
        let st = std::process::Command::new("find")
            .arg(f.home().join("stores/dr"))
            .args(["-type", "f", "-not", "-path", "*/locks/*"])
            .args(["-exec", "touch", "-d", "3 hours ago", "{}", "+"])
            .status()
            .unwrap();
        assert!(st.success());
        write_random(&small[0], 0, 2 * MIB, 540 + round);
        std::thread::sleep(Duration::from_millis(2100)); // point times have 1 s resolution
        f.ok(&["replicate", "small"]);
    }
    let out = wait_output(child, CMD_TIMEOUT, "slow protect");
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = f.json(&["verify", "big"]);
    assert_eq!(
        v["ok"], true,
        "every block of the slow job's point is still stored: {v}"
    );
    let v = f.json(&["verify", "small"]);
    assert_eq!(v["ok"], true, "{v}");
    // Once nothing else runs, retention does prune the small VM's old points.
    write_random(&small[0], 0, 2 * MIB, 549);
    std::thread::sleep(Duration::from_millis(2100)); // point times have 1 s resolution
    f.ok(&["replicate", "small"]);
    assert_eq!(
        f.points("small").len(),
        1,
        "old points pruned once the store is quiet"
    );
}

#[test]
fn interrupted_failback_can_be_retargeted_to_another_host() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (_prim, rec) = f.failed_over_vm("app", &[16 * MIB], &["lan"], 4 * MIB);
    write_random(&rec[0], 0, 8 * MIB, 551);
    let mut child = f.spawn(&["failback", "app", "--bandwidth", "2MiB/s"]);
    f.wait_status("app", POLL_TIMEOUT, "failback moving data", |s| {
        s["state"] == "failback_syncing"
            && s["job"]["bytes_transferred"].as_u64().unwrap_or(0) > MIB
    });
    f.ok(&["cancel", "app"]);
    let _ = child.wait();
    f.assert_state("app", "failback_interrupted");
    // The original host is lost: its folder is gone.
    std::fs::rename(f.host_root("h1"), f.home().join("h1-gone")).unwrap();
    f.fail(&["failback", "app"]);
    f.add_host("h3", "prim", &["lan"], None);
    let job = f.json(&[
        "failback",
        "app",
        "--host",
        "h3",
        "--create-vm",
        "--auto-complete",
    ]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    assert_all_identical(&f.disk_paths("app", "h3"), &rec);
}

#[test]
fn unplanned_failover_without_the_primary_keeps_the_vms_shape() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan", "dmz"]);
    f.ok(&[
        "vm", "create", "app", "--host", "h1", "--disk", "4MiB", "--switch", "lan", "--switch",
        "dmz", "--cpus", "4", "--memory", "8GiB",
    ]);
    write_random(&f.disk_paths("app", "h1")[0], 0, 4 * MIB, 561);
    f.ok(&["protect", "app", "--to", "dr"]);
    std::fs::rename(f.host_root("h1"), f.home().join("h1-lost")).unwrap();
    let job = f.json(&["failover", "app", "--unplanned"]);
    assert_job_state(&job, "succeeded");
    let v = f.vm_show("app", Some("r1"));
    assert_eq!(v["cpus"], 4, "{v}");
    assert_eq!(v["memory"], 8u64 << 30, "{v}");
    assert_eq!(v["nics"][0]["switch"], "lan", "{v}");
    assert_eq!(v["nics"][1]["switch"], "dmz", "{v}");
}
