//! The whole lifecycle (DESIGN.md §2): protect → replicate → failover → commit → failback
//! (delta / full, original / alternate location) → complete → commit → reverse-replicate.

use crate::harness::*;
use serde_json::Value;
use std::collections::HashSet;

fn point_ids(points: &[Value]) -> Vec<u64> {
    points
        .iter()
        .map(|p| {
            p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("point id must be an integer: {p}"))
        })
        .collect()
}

fn assert_point_shape(p: &Value, vm: &str) {
    assert!(p["id"].is_u64(), "point.id: {p}");
    assert_eq!(p["vm"], vm, "point.vm: {p}");
    assert!(p["created_at"].is_string(), "point.created_at: {p}");
}

fn assert_disks_consistent(v: &Value, want: bool) {
    for d in v["disks"].as_array().expect("disks") {
        assert_eq!(
            d["consistent"].as_bool(),
            Some(want),
            "disk consistent flag: {v}"
        );
    }
}

/// Bytes a failback moved over the WAN in total, whether `complete` continued the failback
/// job (same id, counters accumulate) or ran a job of its own.
fn failback_total_transferred(phase1: &Value, phase2: &Value) -> u64 {
    if job_id(phase1) == job_id(phase2) {
        job_u64(phase2, "bytes_transferred")
    } else {
        job_u64(phase1, "bytes_transferred") + job_u64(phase2, "bytes_transferred")
    }
}

#[test]
fn delta_failback_to_original_location_whole_lifecycle() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let sizes = [16 * MIB, 10 * MIB + 12345]; // disk1 is not a multiple of the 64 KiB block
    f.create_vm("app", "h1", &sizes, &["lan"]);
    f.ok(&["vm", "start", "app"]);
    let prim = f.disk_paths("app", "h1");
    write_random(&prim[0], 0, 16 * MIB, 1);
    write_random(&prim[1], 0, 6 * MIB, 2);
    write_random(&prim[1], sizes[1] - 5000, 5000, 3); // the partial last block

    // ---- protect
    let s = f.status("app");
    assert_eq!(s["state"], "unprotected");
    let job = f.json(&[
        "protect",
        "app",
        "--to",
        "dr",
        "--rpo",
        "5m",
        "--retention",
        "24h",
    ]);
    assert_job_shape(&job);
    assert_job_state(&job, "succeeded");
    assert_eq!(job["vm"], "app");
    f.assert_state("app", "protected");
    assert_eq!(f.active_site("app"), "primary");
    let points = f.points("app");
    assert!(
        !points.is_empty(),
        "protect returns after the first recovery point exists"
    );
    for p in &points {
        assert_point_shape(p, "app");
    }
    let first_ids = point_ids(&points);

    // ---- guest writes + replicate: a new point, cost follows the changed bytes
    write_random(&prim[0], 2 * MIB, 512 * KIB, 4);
    let job = f.json(&["replicate", "app"]);
    assert_job_shape(&job);
    assert_job_state(&job, "succeeded");
    assert_between(
        "replicate bytes_transferred",
        job_u64(&job, "bytes_transferred"),
        near_lower(512 * KIB),
        near_upper(512 * KIB),
    );
    let points = f.points("app");
    let ids = point_ids(&points);
    assert!(
        ids.len() > first_ids.len(),
        "replicate added a point: {ids:?} vs {first_ids:?}"
    );
    assert!(
        !first_ids.contains(&ids[0]),
        "newest point comes first: {ids:?} (old {first_ids:?})"
    );
    let unique: HashSet<u64> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "point ids are unique");

    // ---- planned failover
    let job = f.json(&["failover", "app", "--planned"]);
    assert_job_shape(&job);
    assert_job_state(&job, "succeeded");
    let s = f.status("app");
    assert_eq!(s["state"], "failover_commit_pending", "{s}");
    assert_eq!(s["active_site"], "recovery", "{s}");
    assert_eq!(
        f.power("app", Some("h1")),
        "stopped",
        "planned failover stops the primary"
    );
    let active = f.vm_show("app", None);
    assert_eq!(
        active["host"], "r1",
        "active copy is the recovery copy: {active}"
    );
    assert_eq!(active["site"], "dr");
    assert_eq!(active["power"], "running");
    let rsizes: Vec<u64> = active["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["size"].as_u64().unwrap())
        .collect();
    assert_eq!(rsizes, sizes.to_vec(), "recovery disks keep exact sizes");
    assert_disks_consistent(&active, true);
    let nics: Vec<&str> = active["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["switch"].as_str().unwrap())
        .collect();
    assert_eq!(nics, vec!["lan"]);
    let rec = f.disk_paths("app", "r1");
    assert_all_identical(&prim, &rec); // planned failover loses nothing

    let job = f.json(&["commit", "app"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failed_over");

    // ---- the guest runs at the recovery site
    write_random(&rec[0], 4 * MIB, MIB, 5); // 16 blocks
    zero_range(&rec[0], 8 * MIB, BLOCK); // a previously random block becomes zero
    write_random(&rec[1], sizes[1] - 3000, 3000, 6); // the partial last block
    write_pattern(&rec[1], 7 * MIB, 256 * KIB, 0xab); // a previously zero region
    let changed1 = MIB + 3000;

    // ---- failback phase 1 (delta, default)
    let p1 = f.json(&["failback", "app"]);
    assert_job_shape(&p1);
    assert_job_state(&p1, "waiting");
    assert_eq!(p1["kind"], "failback", "{p1}");
    let s = f.status("app");
    assert_eq!(s["state"], "failback_ready", "{s}");
    assert_eq!(
        s["active_site"], "recovery",
        "recovery copy stays active until phase 2: {s}"
    );
    assert_eq!(
        job_id(&s["job"]),
        job_id(&p1),
        "status shows the waiting job: {s}"
    );
    assert_eq!(s["job"]["state"], "waiting");
    assert_eq!(
        f.power("app", Some("r1")),
        "running",
        "phase 1 keeps the recovery VM running"
    );
    assert_eq!(f.vm_show("app", None)["host"], "r1");
    assert_eq!(f.power("app", Some("h1")), "stopped");

    // ---- more guest writes between phase 1 and complete
    write_random(&rec[0], 12 * MIB, 256 * KIB, 7);
    write_random(&rec[0], 4 * MIB + BLOCK, BLOCK, 8); // a block phase 1 already moved
    let changed2 = 256 * KIB + BLOCK;

    // ---- phase 2
    let p2 = f.json(&["complete", "app"]);
    assert_job_shape(&p2);
    assert_job_state(&p2, "succeeded");
    assert_eq!(
        job_id(&p2),
        job_id(&p1),
        "complete continues the waiting failback job"
    );
    if let Some(d) = p2.get("downtime_ms") {
        assert!(d.is_u64(), "downtime_ms is a number of ms: {p2}");
    }
    let s = f.status("app");
    assert_eq!(s["state"], "failback_commit_pending", "{s}");
    assert_eq!(s["active_site"], "primary", "{s}");
    assert_eq!(
        f.power("app", Some("h1")),
        "running",
        "phase 2 starts the primary"
    );
    assert_eq!(
        f.power("app", Some("r1")),
        "stopped",
        "phase 2 stops (but keeps) the recovery VM"
    );
    let active = f.vm_show("app", None);
    assert_eq!(
        active["host"], "h1",
        "the primary is the active copy again: {active}"
    );
    assert_disks_consistent(&active, true);
    assert_all_identical(&prim, &rec); // rule 1: no data loss
    let total = failback_total_transferred(&p1, &p2);
    assert_between(
        "failback bytes_transferred (phase 1 + 2)",
        total,
        near_lower(changed1 + changed2),
        near_upper(changed1 + changed2 + 2 * BLOCK),
    );

    // ---- commit: the recovery VM and its disks are deleted
    let job = f.json(&["commit", "app"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failed_back");
    let err = f.fail(&["vm", "show", "app", "--host", "r1"]);
    assert!(err.contains("app") || err.contains("r1"), "{err}");
    for p in &rec {
        assert!(!p.exists(), "recovery disk deleted: {}", p.display());
    }
    assert!(
        !rec[0].parent().unwrap().exists(),
        "recovery VM folder deleted"
    );
    assert_eq!(f.vm_show("app", None)["host"], "h1");
    assert_eq!(f.power("app", None), "running");

    // ---- reverse replication sends only what changed since the recovery VM shut down
    write_random(&prim[0], 10 * MIB, MIB, 9);
    let job = f.json(&["reverse-replicate", "app"]);
    assert_job_shape(&job);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "protected");
    let t = job_u64(&job, "bytes_transferred");
    assert_between(
        "reverse-replicate bytes_transferred",
        t,
        near_lower(MIB),
        near_upper(MIB),
    );
    assert!(
        t < (sizes[0] + sizes[1]) / 8,
        "reverse replication must not resend the disks ({t} bytes)"
    );

    // ---- the new protection is real: fail over again and find the primary's current data
    let job = f.json(&["failover", "app", "--planned"]);
    assert_job_state(&job, "succeeded");
    let rec2 = f.disk_paths("app", "r1");
    assert_all_identical(&prim, &rec2);
}

#[test]
fn auto_complete_delta_moves_only_changed_bytes() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let size = 24 * MIB;
    let (prim, rec) = f.failed_over_vm("app", &[size], &["lan"], size);
    write_random(&rec[0], 5 * MIB, MIB, 11);
    zero_range(&rec[0], 20 * MIB, 2 * BLOCK);

    let job = f.json(&["failback", "app", "--auto-complete"]);
    assert_job_shape(&job);
    assert_job_state(&job, "succeeded");
    assert_eq!(job["kind"], "failback");
    let s = f.status("app");
    assert_eq!(
        s["state"], "failback_commit_pending",
        "one command runs to commit pending: {s}"
    );
    assert_eq!(s["active_site"], "primary");
    assert_eq!(f.power("app", Some("h1")), "running");
    assert_eq!(f.power("app", Some("r1")), "stopped");
    assert_all_identical(&prim, &rec);

    let t = job_u64(&job, "bytes_transferred");
    assert_between(
        "delta failback bytes_transferred",
        t,
        near_lower(MIB),
        near_upper(MIB),
    );
    let w = job_u64(&job, "bytes_written");
    assert_between(
        "delta failback bytes_written",
        w,
        MIB,
        near_upper(MIB + 2 * BLOCK),
    );
    assert!(
        w < size / 4 && t < size / 4,
        "cost follows the changed bytes, not the disk size"
    );
    let steps = job["steps"].as_array().unwrap();
    assert!(!steps.is_empty(), "a failback job has steps: {job}");
    if let Some(d) = job.get("downtime_ms") {
        assert!(d.is_u64(), "{job}");
    }
}

#[test]
fn failback_in_ready_state_repeats_phase_one() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[16 * MIB], &["lan"], 16 * MIB);
    write_random(&rec[0], MIB, MIB, 41);
    let r1 = f.json(&["failback", "app"]);
    assert_job_state(&r1, "waiting");
    f.assert_state("app", "failback_ready");
    let b1 = job_u64(&r1, "bytes_transferred");
    assert_between("first pre-sync", b1, near_lower(MIB), near_upper(MIB));

    write_random(&rec[0], 8 * MIB, 2 * MIB, 42);
    let r2 = f.json(&["failback", "app"]);
    assert_job_state(&r2, "waiting");
    f.assert_state("app", "failback_ready");
    assert_eq!(
        f.power("app", Some("r1")),
        "running",
        "pre-sync rounds keep the recovery VM running"
    );
    let round2 = if job_id(&r2) == job_id(&r1) {
        job_u64(&r2, "bytes_transferred") - b1
    } else {
        job_u64(&r2, "bytes_transferred")
    };
    assert_between(
        "second pre-sync moves only the new changes",
        round2,
        near_lower(2 * MIB),
        near_upper(2 * MIB),
    );

    let done = f.json(&["complete", "app"]);
    assert_job_state(&done, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    assert_all_identical(&prim, &rec);
}

#[test]
fn full_failback_to_original_location() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let size = 16 * MIB;
    let (prim, rec) = f.failed_over_vm("app", &[size], &["lan"], 12 * MIB);
    write_random(&rec[0], 2 * MIB, MIB, 51);

    // --auto-complete is accepted with full sync (which has no separate phase 2).
    let job = f.json(&["failback", "app", "--sync", "full", "--auto-complete"]);
    assert_job_shape(&job);
    assert_job_state(&job, "succeeded");
    let s = f.status("app");
    assert_eq!(s["state"], "failback_commit_pending", "{s}");
    assert_eq!(f.power("app", Some("h1")), "running");
    assert_eq!(f.power("app", Some("r1")), "stopped");
    assert_all_identical(&prim, &rec);
    // Full download moves every (non-zero) block, not just the changed ones.
    let t = job_u64(&job, "bytes_transferred");
    assert_between(
        "full failback bytes_transferred",
        t,
        near_lower(12 * MIB),
        near_upper(size),
    );

    let job = f.json(&["commit", "app"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failed_back");
    assert_eq!(f.vm_show("app", None)["host"], "h1");
}

#[test]
fn full_failback_creates_vm_on_alternate_host() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan", "mgmt"]);
    let sizes = [12 * MIB, 10 * MIB + 12345];
    let (prim, rec) = f.failed_over_vm("app", &sizes, &["lan", "mgmt"], 8 * MIB);
    write_random(&rec[0], 9 * MIB, MIB, 61);
    write_random(&rec[1], sizes[1] - 777, 777, 62);
    let prim_before = digests(&prim);

    f.add_host("h3", "prim", &["lan", "mgmt", "spare"], None);
    f.fail(&["vm", "show", "app", "--host", "h3"]);

    // Full sync has no phase 2: it runs straight to failback_commit_pending.
    let job = f.json(&[
        "failback",
        "app",
        "--sync",
        "full",
        "--host",
        "h3",
        "--create-vm",
    ]);
    assert_job_shape(&job);
    assert_job_state(&job, "succeeded");
    let s = f.status("app");
    assert_eq!(s["state"], "failback_commit_pending", "{s}");
    assert_eq!(s["active_site"], "primary", "{s}");

    let v3 = f.vm_show("app", Some("h3"));
    assert_eq!(v3["host"], "h3", "{v3}");
    assert_eq!(v3["site"], "prim", "{v3}");
    assert_eq!(v3["power"], "running", "{v3}");
    let nics: Vec<&str> = v3["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["switch"].as_str().unwrap())
        .collect();
    assert_eq!(nics, vec!["lan", "mgmt"], "same NICs on the new host");
    let dsizes: Vec<u64> = v3["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["size"].as_u64().unwrap())
        .collect();
    assert_eq!(dsizes, sizes.to_vec());
    assert_disks_consistent(&v3, true);
    let h3 = f.disk_paths("app", "h3");
    for p in &h3 {
        assert!(
            p.starts_with(f.host_root("h3")),
            "disk lives on h3: {}",
            p.display()
        );
    }
    assert_eq!(f.power("app", Some("r1")), "stopped");
    assert_all_identical(&h3, &rec);
    assert_eq!(f.vm_show("app", None)["host"], "h3", "active copy is on h3");
    // The original primary copy is left alone.
    assert_eq!(
        digests(&prim),
        prim_before,
        "alternate-location failback must not touch h1's disks"
    );
    assert_eq!(f.power("app", Some("h1")), "stopped");

    let job = f.json(&["commit", "app"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failed_back");
    let active = f.vm_show("app", None);
    assert_eq!(
        active["host"], "h3",
        "after commit the active copy is on h3: {active}"
    );
    assert!(!rec[0].exists(), "recovery disks deleted on commit");
}

#[test]
fn unplanned_failover_failback_overwrites_unreplicated_writes() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let size = 16 * MIB;
    let prim = f.protected_vm("app", &[size], &["lan"], size);
    write_random(&prim[0], MIB, 512 * KIB, 21);
    assert_job_state(&f.json(&["replicate", "app"]), "succeeded");
    let reference = f.home().join("last-point.raw");
    snapshot_file(&prim[0], &reference);

    // Writes that never replicate: the primary site is "lost" right after them.
    write_random(&prim[0], 6 * MIB, 512 * KIB, 22);
    let job = f.json(&["failover", "app", "--unplanned"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failover_commit_pending");
    assert_job_state(&f.json(&["commit", "app"]), "succeeded");
    f.assert_state("app", "failed_over");
    let rec = f.disk_paths("app", "r1");
    assert_identical(&rec[0], &reference); // the recovery copy is the last point

    // The primary comes back and someone starts the stale copy: failback must refuse.
    f.ok(&["vm", "start", "app", "--host", "h1"]);
    assert_eq!(f.power("app", Some("h1")), "running");
    write_random(&prim[0], 9 * MIB, 256 * KIB, 23); // more writes on the stale primary
    write_random(&rec[0], 12 * MIB, 512 * KIB, 24); // the real workload writes too
    let jobs_before = f.all_jobs().len();
    let err = f.fail(&["failback", "app"]);
    assert!(
        err.contains("h1"),
        "error names the host where the VM runs: {err}"
    );
    assert!(
        err.contains("ferry vm stop"),
        "error says how to fix it: {err}"
    );
    f.assert_state("app", "failed_over");
    assert_eq!(f.all_jobs().len(), jobs_before, "refusal created no job");
    assert_eq!(f.power("app", Some("r1")), "running");

    f.ok(&["vm", "stop", "app", "--host", "h1"]);
    let job = f.json(&["failback", "app", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    f.assert_state("app", "failback_commit_pending");
    // Both the unreplicated writes (6 MiB) and the stale-copy writes (9 MiB) are overwritten.
    assert_identical(&prim[0], &rec[0]);
    assert_eq!(
        read_range(&prim[0], 6 * MIB, 512 * KIB),
        read_range(&reference, 6 * MIB, 512 * KIB)
    );
    assert_eq!(
        read_range(&prim[0], 9 * MIB, 256 * KIB),
        read_range(&reference, 9 * MIB, 256 * KIB)
    );
}

#[test]
fn a_planned_failover_carries_writes_made_since_the_last_point() {
    // Found by the crash matrix: the failover opened the store before its last replication
    // cycle stored the new blocks, and restored from a stale index ("block … is missing").
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let prim = f.protected_vm("app", &[8 * MIB], &["lan"], 3 * MIB);
    write_random(&prim[0], 4 * MIB, MIB, 1301);
    let job = f.json(&["failover", "app", "--planned"]);
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &f.disk_paths("app", "r1"));
}
