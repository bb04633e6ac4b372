//! Recovery plans: groups fail over and back in order, one `complete` finishes them all, a plan
//! is refused as a whole before anything changes, and a re-run skips what is done.
use crate::harness::*;

fn jobs_in_order(run: &serde_json::Value) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    for g in run["groups"].as_array().unwrap() {
        for s in g.as_array().unwrap() {
            if let Some(j) = s.get("job") {
                out.push((s["vm"].as_str().unwrap().to_string(), job_id(j)));
            }
        }
    }
    out
}

#[test]
fn plan_fails_over_and_back_group_by_group_with_one_complete() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let mut prim = Vec::new();
    for (i, vm) in ["db1", "app1", "app2"].iter().enumerate() {
        prim.push(f.protected_vm(vm, &[4 * MIB], &["lan"], 2 * MIB));
        let _ = i;
    }
    let created = f.json(&[
        "plan",
        "create",
        "shop",
        "--group",
        "db1",
        "--group",
        "app1,app2",
    ]);
    assert_eq!(
        created["groups"],
        serde_json::json!([["db1"], ["app1", "app2"]])
    );
    assert_eq!(f.json(&["plan", "show", "shop"])["groups"][1][1], "app2");

    // A plan is refused as a whole: app2 is not failed over yet, so failback changes nothing.
    let err = f.fail(&["plan", "failback", "shop"]);
    assert!(err.contains("app2") || err.contains("db1"), "{err}");
    for vm in ["db1", "app1", "app2"] {
        f.assert_state(vm, "protected");
    }

    let run = f.json(&["plan", "failover", "shop", "--planned"]);
    let order = jobs_in_order(&run);
    assert_eq!(
        order.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
        ["db1", "app1", "app2"]
    );
    assert!(
        order.windows(2).all(|w| w[0].1 < w[1].1),
        "groups ran in order: {order:?}"
    );
    f.json(&["plan", "commit", "shop"]);
    for vm in ["db1", "app1", "app2"] {
        f.assert_state(vm, "failed_over");
        write_random(&f.disk_paths(vm, "r1")[0], MIB, 256 * KIB, 700);
    }

    // Phase 1 for all, more guest writes, then one complete for the whole plan.
    let p1 = f.json(&["plan", "failback", "shop"]);
    assert_eq!(jobs_in_order(&p1).len(), 3);
    for vm in ["db1", "app1", "app2"] {
        f.assert_state(vm, "failback_ready");
        write_random(&f.disk_paths(vm, "r1")[0], 3 * MIB, 64 * KIB, 701);
    }
    let done = f.json(&["plan", "complete", "shop"]);
    let order = jobs_in_order(&done);
    assert_eq!(
        order[0].0, "db1",
        "the first group comes up first: {order:?}"
    );
    for (i, vm) in ["db1", "app1", "app2"].iter().enumerate() {
        f.assert_state(vm, "failback_commit_pending");
        assert_eq!(f.power(vm, Some("h1")), "running");
        assert_all_identical(&prim[i], &f.disk_paths(vm, "r1"));
    }
    // Re-running a finished step skips every VM.
    let again = f.json(&["plan", "complete", "shop"]);
    assert!(
        again["groups"][0][0]["skipped"].as_bool().unwrap_or(false),
        "{again}"
    );

    f.json(&["plan", "commit", "shop"]);
    let rr = f.json(&["plan", "reverse-replicate", "shop"]);
    assert_eq!(jobs_in_order(&rr).len(), 3);
    for vm in ["db1", "app1", "app2"] {
        f.assert_state(vm, "protected");
    }
    assert!(f.fail(&["plan", "show", "nope"]).contains("plan create"));
    assert!(f
        .fail(&["plan", "create", "bad", "--group", "ghost"])
        .contains("ghost"));
}

#[test]
fn a_plan_drill_starts_a_test_copy_of_every_vm_and_its_cleanup_removes_them_all() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    for vm in ["db1", "app1"] {
        f.protected_vm(vm, &[4 * MIB], &["lan"], 2 * MIB);
    }
    f.ok(&[
        "plan", "create", "shop", "--group", "db1", "--group", "app1",
    ]);
    let run = f.json(&["plan", "failover", "shop", "--test"]);
    let order = jobs_in_order(&run);
    assert_eq!(
        order.iter().map(|o| o.0.as_str()).collect::<Vec<_>>(),
        ["db1", "app1"],
        "{run}"
    );
    for vm in ["db1", "app1"] {
        f.assert_state(vm, "protected");
        assert_eq!(f.status(vm)["test"]["name"], format!("{vm}-test"));
        assert_eq!(f.power(&format!("{vm}-test"), Some("r1")), "running");
    }
    // A re-run skips what is done; a real plan failover waits for the clean-up.
    let again = f.json(&["plan", "failover", "shop", "--test"]);
    assert!(jobs_in_order(&again).is_empty(), "{again}");
    let err = f.fail(&["plan", "failover", "shop", "--planned"]);
    assert!(err.contains("--cleanup-test"), "{err}");
    f.json(&["plan", "failover", "shop", "--cleanup-test"]);
    for vm in ["db1", "app1"] {
        assert!(f.status(vm).get("test").is_none());
        assert!(!f
            .json(&["vm", "list", "--host", "r1"])
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["name"] == format!("{vm}-test")));
    }
    f.json(&["plan", "failover", "shop", "--planned"]);
    for vm in ["db1", "app1"] {
        f.assert_state(vm, "failover_commit_pending");
    }
}
