//! Failback preconditions (DESIGN.md §2 rules 2, 4, 5; §6): every refusal is exit 1 with one
//! `error:` line that says what is wrong and what to do, and changes nothing — whatever the sync mode.
//! Dry runs predict and change nothing.

use crate::harness::*;
use serde_json::Value;
use std::path::PathBuf;

/// What must not change when a command is refused.
struct Before {
    state: String,
    jobs: usize,
    prim: Vec<u64>,
    rec: Vec<u64>,
    rec_power: Option<String>,
    prim_power: String,
}

fn before(f: &Ferry, vm: &str, prim: &[PathBuf], rec: &[PathBuf]) -> Before {
    Before {
        state: f.state(vm),
        jobs: f.all_jobs().len(),
        prim: digests(prim),
        rec: digests(rec),
        rec_power: if rec.is_empty() {
            None
        } else {
            Some(f.power(vm, Some(RECOVERY_HOST)))
        },
        prim_power: f.power(vm, Some(PRIMARY_HOST)),
    }
}

fn assert_unchanged(
    f: &Ferry,
    vm: &str,
    prim: &[PathBuf],
    rec: &[PathBuf],
    b: &Before,
    what: &str,
) {
    assert_eq!(f.state(vm), b.state, "{what}: state changed");
    assert_eq!(f.all_jobs().len(), b.jobs, "{what}: a job was created");
    assert_eq!(digests(prim), b.prim, "{what}: primary disks changed");
    assert_eq!(digests(rec), b.rec, "{what}: recovery disks changed");
    if let Some(p) = &b.rec_power {
        assert_eq!(
            &f.power(vm, Some(RECOVERY_HOST)),
            p,
            "{what}: recovery VM power changed"
        );
    }
    assert_eq!(
        f.power(vm, Some(PRIMARY_HOST)),
        b.prim_power,
        "{what}: primary VM power changed"
    );
}

/// Runs `failback VM EXTRA…` in delta, full and dry-run variants; each must be refused with an
/// error satisfying `check`, and change nothing.
fn refused_in_every_mode(
    f: &Ferry,
    vm: &str,
    extra: &[&str],
    prim: &[PathBuf],
    rec: &[PathBuf],
    check: &dyn Fn(&str),
) {
    let b = before(f, vm, prim, rec);
    let variants: [&[&str]; 5] = [
        &[],
        &["--sync", "delta"],
        &["--sync", "full"],
        &["--dry-run"],
        &["--auto-complete"],
    ];
    for v in variants {
        let mut args = vec!["failback", vm];
        args.extend_from_slice(extra);
        args.extend_from_slice(v);
        let err = f.fail(&args);
        check(&err);
        assert_unchanged(f, vm, prim, rec, &b, &args.join(" "));
    }
}

#[test]
fn failback_refused_before_failover_commit() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let prim = f.protected_vm("app", &[8 * MIB], &["lan"], 8 * MIB);
    assert_job_state(&f.json(&["failover", "app", "--planned"]), "succeeded");
    f.assert_state("app", "failover_commit_pending");
    let rec = f.disk_paths("app", RECOVERY_HOST);
    refused_in_every_mode(&f, "app", &[], &prim, &rec, &|err| {
        assert_mentions_state(err, "failover_commit_pending");
        assert!(
            err.contains("ferry commit"),
            "error names the command that gets there: {err}"
        );
    });
    // After commit the same command works.
    assert_job_state(&f.json(&["commit", "app"]), "succeeded");
    assert_job_state(
        &f.json(&["failback", "app", "--auto-complete"]),
        "succeeded",
    );
    assert_all_identical(&prim, &rec);
}

#[test]
fn failback_refused_when_not_failed_over() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", "h1", &[4 * MIB], &["lan"]);
    f.ok(&["vm", "start", "app"]);
    let prim = f.disk_paths("app", "h1");
    refused_in_every_mode(&f, "app", &[], &prim, &[], &|err| {
        assert_mentions_state(err, "unprotected");
    });
    assert_job_state(&f.json(&["protect", "app", "--to", "dr"]), "succeeded");
    refused_in_every_mode(&f, "app", &[], &prim, &[], &|err| {
        assert_mentions_state(err, "protected");
        assert!(
            err.contains("ferry failover"),
            "error names the command that gets there: {err}"
        );
    });
}

#[test]
fn complete_refused_without_waiting_failback() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan"], 8 * MIB);
    let b = before(&f, "app", &prim, &rec);
    let err = f.fail(&["complete", "app"]);
    assert_mentions_state(&err, "failed_over");
    assert!(
        err.contains("ferry failback"),
        "error names the command that gets there: {err}"
    );
    assert_unchanged(&f, "app", &prim, &rec, &b, "complete in failed_over");
}

#[test]
fn failback_refused_while_primary_vm_runs() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan"], 8 * MIB);
    f.ok(&["vm", "start", "app", "--host", "h1"]);
    assert_eq!(f.power("app", Some("h1")), "running");
    refused_in_every_mode(&f, "app", &[], &prim, &rec, &|err| {
        assert!(
            err.contains("h1"),
            "error names the host where the VM runs: {err}"
        );
        assert!(
            err.contains("ferry vm stop"),
            "error says how to fix it: {err}"
        );
    });
    f.ok(&["vm", "stop", "app", "--host", "h1"]);
    assert_job_state(
        &f.json(&["failback", "app", "--auto-complete"]),
        "succeeded",
    );
    assert_all_identical(&prim, &rec);
}

#[test]
fn failback_to_alternate_host_needs_create_vm() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan"], 8 * MIB);
    f.add_host("h3", "prim", &["lan"], None);
    refused_in_every_mode(&f, "app", &["--host", "h3"], &prim, &rec, &|err| {
        assert!(
            err.contains("--create-vm"),
            "error suggests --create-vm: {err}"
        );
    });
    f.fail(&["vm", "show", "app", "--host", "h3"]);
    assert!(
        !f.host_root("h3").join("app").exists(),
        "no VM folder created on h3"
    );
}

#[test]
fn failback_to_alternate_host_missing_switch_is_refused() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan", "mgmt"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan", "mgmt"], 8 * MIB);
    f.add_host("h4", "prim", &["lan"], None); // lacks "mgmt"
    refused_in_every_mode(
        &f,
        "app",
        &["--host", "h4", "--create-vm"],
        &prim,
        &rec,
        &|err| {
            assert!(
                err.contains("mgmt"),
                "error names the missing switch: {err}"
            );
            assert!(err.contains("h4"), "error names the host: {err}");
        },
    );
    f.assert_state("app", "failed_over");
    f.fail(&["vm", "show", "app", "--host", "h4"]);
    assert!(
        !f.host_root("h4").join("app").exists(),
        "no VM folder created on h4"
    );
    assert_eq!(
        f.vm_show("app", None)["host"],
        "r1",
        "recovery copy is still the active one"
    );
}

#[test]
fn failback_refused_when_target_host_not_connected() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan"], 8 * MIB);
    let root = f.host_root("h1");
    let moved = f.home().join("h1-unplugged");
    let prim_before = digests(&prim);
    let jobs_before = f.all_jobs().len();
    std::fs::rename(&root, &moved).unwrap();
    for mode in [&[][..], &["--sync", "full"][..], &["--dry-run"][..]] {
        let mut args = vec!["failback", "app"];
        args.extend_from_slice(mode);
        let err = f.fail(&args);
        assert!(
            err.contains("not connected") || err.contains(root.to_str().unwrap()),
            "error says the host is not connected / names its root: {err}"
        );
        assert!(err.contains("h1"), "error names the host: {err}");
        f.assert_state("app", "failed_over");
        assert!(!root.exists(), "refusal must not recreate the missing root");
    }
    assert_eq!(f.all_jobs().len(), jobs_before, "no job created");
    std::fs::rename(&moved, &root).unwrap();
    assert_eq!(digests(&prim), prim_before);
    assert_eq!(f.power("app", Some("r1")), "running");
    // Reconnected: the failback works.
    assert_job_state(
        &f.json(&["failback", "app", "--auto-complete"]),
        "succeeded",
    );
    assert_all_identical(&prim, &rec);
}

#[test]
fn failback_refused_for_unreadable_disk_format() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan"], 8 * MIB);
    let vm_json = rec[0].parent().unwrap().join("vm.json");
    let original = std::fs::read_to_string(&vm_json).expect("recovery copy has vm.json");
    let mut v: Value = serde_json::from_str(&original).expect("vm.json is JSON");
    assert!(
        v["disks"][0].get("format").is_some(),
        "vm.json has disks[0].format: {v}"
    );
    v["disks"][0]["format"] = Value::from("vhdx");
    std::fs::write(&vm_json, serde_json::to_string_pretty(&v).unwrap()).unwrap();

    refused_in_every_mode(&f, "app", &[], &prim, &rec, &|err| {
        assert!(
            err.contains("vhdx"),
            "error names the unsupported format: {err}"
        );
    });
    f.assert_state("app", "failed_over");

    std::fs::write(&vm_json, original).unwrap();
    assert_job_state(
        &f.json(&["failback", "app", "--auto-complete"]),
        "succeeded",
    );
    assert_all_identical(&prim, &rec);
}

#[test]
fn failback_of_encrypted_replication_needs_the_right_key() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let k1 = f.home().join("k1.key");
    let k2 = f.home().join("k2.key");
    f.ok(&["key", "new", k1.to_str().unwrap()]);
    f.ok(&["key", "new", k2.to_str().unwrap()]);
    assert!(k1.is_file() && k2.is_file());
    assert_ne!(
        std::fs::read(&k1).unwrap(),
        std::fs::read(&k2).unwrap(),
        "keys are random"
    );

    f.create_vm("app", "h1", &[8 * MIB], &["lan"]);
    f.ok(&["vm", "start", "app"]);
    let prim = f.disk_paths("app", "h1");
    write_random(&prim[0], 0, 8 * MIB, 71);
    assert_job_state(
        &f.json(&[
            "protect",
            "app",
            "--to",
            "dr",
            "--key",
            k1.to_str().unwrap(),
        ]),
        "succeeded",
    );
    // Failover needs the operator's key too, and refuses without it before anything changes.
    let err = f.fail(&["failover", "app", "--planned"]);
    assert!(
        err.contains("--key"),
        "failover without the key names --key: {err}"
    );
    f.assert_state("app", "protected");
    assert_eq!(
        f.power("app", Some("h1")),
        "running",
        "refused failover left the primary running"
    );
    assert_job_state(
        &f.json(&[
            "failover",
            "app",
            "--planned",
            "--key",
            k1.to_str().unwrap(),
        ]),
        "succeeded",
    );
    assert_job_state(&f.json(&["commit", "app"]), "succeeded");
    let rec = f.disk_paths("app", "r1");
    write_random(&rec[0], 2 * MIB, MIB, 72);

    let b = before(&f, "app", &prim, &rec);
    for mode in [&[][..], &["--sync", "full"][..]] {
        let mut args = vec!["failback", "app", "--key", k2.to_str().unwrap()];
        args.extend_from_slice(mode);
        let err = f.fail(&args);
        assert!(
            err.to_lowercase().contains("key"),
            "error says the key is wrong: {err}"
        );
        assert_unchanged(&f, "app", &prim, &rec, &b, "failback with the wrong key");
    }
    assert_job_state(
        &f.json(&[
            "failback",
            "app",
            "--key",
            k1.to_str().unwrap(),
            "--auto-complete",
        ]),
        "succeeded",
    );
    assert_all_identical(&prim, &rec);
}

fn dry_run(f: &Ferry, extra: &[&str]) -> Value {
    let mut args = vec!["failback", "app", "--dry-run"];
    args.extend_from_slice(extra);
    f.json(&args)
}

fn check_dry_run_shape(d: &Value, sizes: &[u64]) {
    assert_eq!(d["vm"], "app", "{d}");
    let sync = d["sync"].as_str().unwrap_or_else(|| panic!("sync: {d}"));
    assert!(sync == "delta" || sync == "full", "{d}");
    let rec = d["recommended_sync"]
        .as_str()
        .unwrap_or_else(|| panic!("recommended_sync: {d}"));
    assert!(rec == "delta" || rec == "full", "{d}");
    assert!(
        d["reason"].as_str().is_some_and(|r| !r.trim().is_empty()),
        "reason explains: {d}"
    );
    let disks = d["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("disks: {d}"));
    assert_eq!(disks.len(), sizes.len(), "{d}");
    let (mut blocks_sum, mut bytes_sum) = (0u64, 0u64);
    for (i, x) in disks.iter().enumerate() {
        assert_eq!(x["index"].as_u64(), Some(i as u64), "{d}");
        let blocks = x["blocks"].as_u64().unwrap();
        assert_eq!(
            blocks,
            sizes[i].div_ceil(BLOCK),
            "disk {i}: blocks of a {}-byte disk",
            sizes[i]
        );
        let btm = x["blocks_to_move"].as_u64().unwrap();
        assert!(btm <= blocks, "{d}");
        blocks_sum += btm;
        let bytes = x["bytes_to_move"].as_u64().unwrap();
        assert!(
            bytes <= btm * BLOCK,
            "disk {i}: bytes_to_move ≤ blocks_to_move × block: {d}"
        );
        bytes_sum += bytes;
    }
    assert_eq!(
        d["blocks_to_move"].as_u64(),
        Some(blocks_sum),
        "total blocks = sum over disks: {d}"
    );
    assert_eq!(
        d["bytes_to_move"].as_u64(),
        Some(bytes_sum),
        "total bytes = sum over disks: {d}"
    );
}

#[test]
fn dry_run_predicts_and_changes_nothing() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let sizes = [16 * MIB, 10 * MIB + 12345];
    let (prim, rec) = f.failed_over_vm("app", &sizes, &["lan"], 8 * MIB);
    write_random(&rec[0], 3 * MIB, 2 * MIB, 81); // 32 blocks
    write_random(&rec[1], sizes[1] - 4096, 4096, 82); // inside the partial last block
    let b = before(&f, "app", &prim, &rec);

    let d = dry_run(&f, &[]);
    check_dry_run_shape(&d, &sizes);
    assert_eq!(d["sync"], "delta", "delta is the default: {d}");
    let disks = d["disks"].as_array().unwrap();
    assert_eq!(
        disks[0]["blocks_to_move"].as_u64(),
        Some(32),
        "exactly the changed blocks: {d}"
    );
    assert_eq!(
        disks[1]["blocks_to_move"].as_u64(),
        Some(1),
        "the partial last block: {d}"
    );
    let bytes = d["bytes_to_move"].as_u64().unwrap();
    assert_between(
        "delta bytes_to_move",
        bytes,
        2 * MIB + 4096,
        near_upper(2 * MIB + BLOCK),
    );
    assert_eq!(
        d["recommended_sync"], "delta",
        "little changed → delta: {d}"
    );
    assert_unchanged(&f, "app", &prim, &rec, &b, "dry run (delta)");

    let full = dry_run(&f, &["--sync", "full"]);
    check_dry_run_shape(&full, &sizes);
    assert_eq!(full["sync"], "full", "{full}");
    let fbytes = full["bytes_to_move"].as_u64().unwrap();
    // Both disks hold 8 MiB of data (+ the tail); full moves all of it.
    assert_between("full bytes_to_move", fbytes, 16 * MIB, sizes[0] + sizes[1]);
    assert!(fbytes > bytes, "full moves more than delta here");
    assert_unchanged(&f, "app", &prim, &rec, &b, "dry run (full)");
    f.assert_state("app", "failed_over");

    // The prediction holds: the real run moves about what was predicted.
    let job = f.json(&["failback", "app", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    assert_between(
        "bytes_written vs predicted bytes_to_move",
        job_u64(&job, "bytes_written"),
        bytes - bytes / 10,
        near_upper(bytes),
    );
    assert_all_identical(&prim, &rec);
}

#[test]
fn dry_run_recommends_full_when_most_of_the_disk_changed() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let size = 8 * MIB;
    let (prim, rec) = f.failed_over_vm("app", &[size], &["lan"], size);
    write_random(&rec[0], 0, size, 91); // every block changed
    let b = before(&f, "app", &prim, &rec);
    let d = dry_run(&f, &[]);
    check_dry_run_shape(&d, &[size]);
    assert_eq!(d["blocks_to_move"].as_u64(), Some(size / BLOCK), "{d}");
    assert_eq!(
        d["recommended_sync"], "full",
        "most of the disk changed → full: {d}"
    );
    assert_unchanged(&f, "app", &prim, &rec, &b, "dry run");
}

#[test]
fn dry_run_recommends_full_when_target_vm_does_not_exist() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[8 * MIB], &["lan"], 4 * MIB);
    write_random(&rec[0], 0, 64 * KIB, 92);
    f.add_host("h3", "prim", &["lan"], None);
    let b = before(&f, "app", &prim, &rec);
    let d = dry_run(&f, &["--host", "h3", "--create-vm"]);
    check_dry_run_shape(&d, &[8 * MIB]);
    assert_eq!(
        d["recommended_sync"], "full",
        "no VM on the target → full: {d}"
    );
    assert_unchanged(&f, "app", &prim, &rec, &b, "dry run to a new host");
    assert!(
        !f.host_root("h3").join("app").exists(),
        "dry run created no VM"
    );
}
