//! Test failover (a DR drill): a throw-away copy of a protected VM at the recovery site, on an
//! isolated switch, from a chosen point; the VM stays protected and keeps replicating; a real
//! failover waits for the clean-up, which leaves nothing behind.
use crate::harness::*;

#[test]
fn a_test_failover_runs_beside_replication_and_its_cleanup_leaves_nothing() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", PRIMARY_HOST, &[8 * MIB], &["lan"]);
    f.ok(&["vm", "start", "app"]);
    let prim = f.disk_paths("app", PRIMARY_HOST);
    write_random(&prim[0], 0, 3 * MIB, 1401);
    // A retention of 1 s: only a point a test copy uses outlives the next cycles.
    f.ok(&["protect", "app", "--to", "dr", "--retention", "1s"]);
    let first = read_range(&prim[0], 0, 8 * MIB);
    let p1 = job_id(&f.points("app")[0]);
    write_random(&prim[0], 4 * MIB, MIB, 1402);
    f.ok(&["replicate", "app"]);

    // The isolated switch is never one of the VM's own.
    let err = f.fail(&["failover", "app", "--test", "--switch", "lan"]);
    assert!(err.contains("production switch"), "{err}");
    let job = f.json(&["failover", "app", "--test", "--point", &p1.to_string()]);
    assert_job_state(&job, "succeeded");
    let st = f.status("app");
    assert_eq!(st["state"], "protected", "{st}");
    assert_eq!(st["test"]["host"], "r1", "{st}");
    assert_eq!(st["test"]["name"], "app-test", "{st}");
    assert_eq!(st["test"]["point"], p1, "{st}");
    assert_eq!(st["test"]["switch"], "ferry-test", "{st}");
    assert!(st["test"]["started_at"].is_string(), "{st}");
    let copy = f.vm_show("app-test", Some("r1"));
    assert_eq!(copy["power"], "running", "{copy}");
    assert_eq!(copy["nics"][0]["switch"], "ferry-test", "{copy}");
    let copy_disk = disk_path_of(&copy, 0);
    assert_eq!(
        read_range(&copy_disk, 0, 8 * MIB),
        first,
        "the copy holds the chosen point"
    );
    assert_eq!(
        f.power("app", Some("h1")),
        "running",
        "the primary is untouched"
    );

    // The drill writes to its copy; replication goes on meanwhile; the copy's point stays.
    write_random(&copy_disk, 0, MIB, 1403);
    // Point times have whole seconds: 2.1 s puts a 1 s retention surely behind.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    for seed in [1404, 1405] {
        write_random(&prim[0], 5 * MIB, 256 * KIB, seed);
        assert_job_state(&f.json(&["replicate", "app"]), "succeeded");
    }
    let ids: Vec<u64> = f.points("app").iter().map(job_id).collect();
    assert!(ids.contains(&p1), "the test copy's point is kept: {ids:?}");
    assert!(ids.len() <= 3, "the others expire: {ids:?}");

    // A real failover waits for the clean-up, and a second drill too.
    let err = f.fail(&["failover", "app", "--planned"]);
    assert!(err.contains("--cleanup-test"), "{err}");
    let err = f.fail(&["failover", "app", "--test"]);
    assert!(err.contains("already has a test copy"), "{err}");

    let job = f.json(&["failover", "app", "--cleanup-test"]);
    assert_job_state(&job, "succeeded");
    assert!(f.status("app").get("test").is_none());
    assert!(
        !f.json(&["vm", "list", "--host", "r1"])
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == "app-test"),
        "the copy is gone"
    );
    assert!(!copy_disk.exists(), "its disk is gone");
    // Its point expires with the next cycle; a real failover now goes ahead.
    assert_job_state(&f.json(&["replicate", "app"]), "succeeded");
    // Point times have whole seconds: 2.1 s puts a 1 s retention surely behind.
    std::thread::sleep(std::time::Duration::from_millis(2100));
    assert_job_state(&f.json(&["replicate", "app"]), "succeeded");
    let ids: Vec<u64> = f.points("app").iter().map(job_id).collect();
    assert!(!ids.contains(&p1), "{ids:?}");
    assert_job_state(&f.json(&["failover", "app", "--planned"]), "succeeded");
    assert_all_identical(&prim, &f.disk_paths("app", "r1"));
}

#[test]
fn a_pending_failover_moves_to_another_point_and_commit_keeps_the_points() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let prim = f.protected_vm("app", &[4 * MIB], &["lan"], MIB)[0].clone();
    let mut at = Vec::new();
    for seed in [61, 62] {
        write_random(&prim, MIB, MIB, seed);
        assert_job_state(&f.json(&["replicate", "app"]), "succeeded");
        at.push(std::fs::read(&prim).unwrap());
    }
    let ids: Vec<i64> = f
        .points("app")
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    let (older, newer) = (ids[1], ids[0]);
    // A point id names no failover mode: on a protected VM it needs --unplanned or --test.
    let err = f.fail(&["failover", "app", "--point", &older.to_string()]);
    assert!(err.contains("--unplanned and --test"), "{err}");
    let err = f.fail(&[
        "failover",
        "app",
        "--unplanned",
        "--point",
        "latest-app-consistent",
    ]);
    assert!(err.contains("no app-consistent point"), "{err}");
    f.assert_state("app", "protected");

    f.ok(&["vm", "stop", "app", "--host", PRIMARY_HOST]);
    let older_s = older.to_string();
    assert_job_state(
        &f.json(&["failover", "app", "--unplanned", "--point", &older_s]),
        "succeeded",
    );
    assert_eq!(f.status("app")["failover_point"], older);
    let rec = f.disk_path("app", RECOVERY_HOST, 0);
    assert!(
        std::fs::read(&rec).unwrap() == at[0],
        "restored from the older point"
    );
    write_random(&rec, 0, 64 * KIB, 63);

    // Moved to the newer point: the recovery copy's own writes are gone with the old copy.
    let j = f.json(&["failover", "app", "--point", &newer.to_string()]);
    assert_job_state(&j, "succeeded");
    f.assert_state("app", "failover_commit_pending");
    assert_eq!(f.status("app")["failover_point"], newer);
    assert!(
        std::fs::read(&rec).unwrap() == at[1],
        "restored from the newer point"
    );
    assert_eq!(f.power("app", Some(RECOVERY_HOST)), "running");
    let err = f.fail(&["failover", "app", "--point", &newer.to_string()]);
    assert!(err.contains("already runs from point"), "{err}");

    assert_job_state(&f.json(&["commit", "app"]), "succeeded");
    let st = f.status("app");
    assert!(st.get("failover_point").is_none(), "{st}");
    let after: Vec<i64> = f
        .points("app")
        .iter()
        .map(|p| p["id"].as_i64().unwrap())
        .collect();
    assert_eq!(after, ids, "commit prunes no point");
}
