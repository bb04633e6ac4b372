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

/// Seconds since the epoch of an RFC 3339 job time.
fn job_secs(job: &serde_json::Value, field: &str) -> i64 {
    ferry_engine::parse_rfc3339(job[field].as_str().expect("a job time")).expect("RFC 3339")
}

#[test]
fn a_failing_pre_step_stops_the_plan_before_its_group_and_changes_nothing_later() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    for vm in ["db", "app1", "app2", "web"] {
        f.protected_vm(vm, &[4 * MIB], &["lan"], MIB);
    }
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("steps.log");
    let ready = dir.path().join("app-ready");
    let post = format!(
        "echo \"$FERRY_PLAN $FERRY_PLAN_ACTION $FERRY_PLAN_GROUP $FERRY_PLAN_STEP $FERRY_PLAN_VMS\" >> {}",
        log.display()
    );
    let pre = format!(
        "echo checking the app tier; test -f {} || {{ echo app tier not ready >&2; exit 7; }}",
        ready.display()
    );
    let created = f.json(&[
        "plan",
        "create",
        "shop",
        "--group",
        "db",
        "--post",
        &post,
        "--group",
        "app1,app2",
        "--pre",
        &pre,
        "--timeout",
        "30s",
        "--group",
        "web",
        "--post",
        &post,
    ]);
    assert_eq!(created["steps"][0]["post"], post.as_str(), "{created}");
    assert_eq!(created["steps"][1]["timeout_s"], 30, "{created}");
    // A step before any --group belongs to no group.
    let err = f.fail(&["plan", "create", "bad", "--pre", "true", "--group", "db"]);
    assert!(err.contains("--pre belongs to a group"), "{err}");
    // Steps of an empty group do not slide onto the next one.
    let err = f.fail(&[
        "plan", "create", "bad", "--group", "db", "--group", "", "--pause", "p", "--group", "web",
    ]);
    assert!(err.contains("group 2 has steps but no VM"), "{err}");

    let err = f.fail(&["plan", "failover", "shop", "--planned"]);
    for s in [
        "group 2",
        "exit code 7",
        "app tier not ready",
        "ferry plan failover shop",
    ] {
        assert!(err.contains(s), "{s:?} in {err}");
    }
    f.assert_state("db", "failover_commit_pending");
    for vm in ["app1", "app2", "web"] {
        f.assert_state(vm, "protected");
        assert_eq!(f.power(vm, Some("h1")), "running", "{vm} was not touched");
    }
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "shop failover 1 post db\n",
        "group 1's post step ran once, group 3's never"
    );
    let shown = f.json(&["plan", "show", "shop"]);
    assert_eq!(shown["last_run"]["state"], "failed", "{shown}");
    assert!(shown["last_run"].get("request").is_none(), "{shown}");

    // Fixed: the re-run skips group 1 (its steps too) and goes on.
    std::fs::write(&ready, b"").unwrap();
    let run = f.json(&["plan", "failover", "shop", "--planned"]);
    assert_eq!(run["groups"][0][0]["skipped"], true, "{run}");
    let pre_out = run["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["step"] == "pre")
        .expect("the pre step ran");
    assert_eq!(pre_out["exit_code"], 0);
    assert!(pre_out["output"]
        .as_str()
        .unwrap()
        .contains("checking the app tier"));
    for vm in ["db", "app1", "app2", "web"] {
        f.assert_state(vm, "failover_commit_pending");
    }
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "shop failover 1 post db\nshop failover 3 post web\n"
    );
    assert_eq!(
        f.json(&["plan", "show", "shop"])["last_run"]["state"],
        "succeeded"
    );
}

#[test]
fn a_paused_plan_resumes_at_the_next_group_whose_vms_fail_over_in_parallel() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    for vm in ["db", "app1", "app2", "app3"] {
        let p = f.protected_vm(vm, &[8 * MIB], &["lan"], MIB);
        // The planned failover's last cycle moves these 3 MiB at the --bandwidth below.
        write_random(&p[0], 4 * MIB, 3 * MIB, 900);
    }
    f.ok(&[
        "plan",
        "create",
        "shop",
        "--group",
        "db",
        "--pause",
        "check the database",
        "--group",
        "app1,app2,app3",
        "--parallel",
        "3",
    ]);
    let err = f.fail(&["plan", "resume", "shop"]);
    assert!(err.contains("not paused"), "{err}");

    let run = f.json(&[
        "plan",
        "failover",
        "shop",
        "--planned",
        "--bandwidth",
        "1MiB/s",
    ]);
    assert_eq!(run["paused"], "check the database", "{run}");
    f.assert_state("db", "failover_commit_pending");
    for vm in ["app1", "app2", "app3"] {
        f.assert_state(vm, "protected");
    }
    let shown = f.json(&["plan", "show", "shop"]);
    assert_eq!(shown["last_run"]["state"], "paused", "{shown}");
    assert_eq!(shown["last_run"]["resumes_at_group"], 2, "{shown}");
    let text = f.ok(&["plan", "show", "shop"]);
    assert!(text.contains("pause \"check the database\""), "{text}");

    // Resumed: group 2, its three VMs at once (each takes ~3 s at 1 MiB/s).
    let resumed = f.json(&["plan", "resume", "shop"]);
    assert_eq!(resumed["first_group"], 2, "{resumed}");
    assert!(resumed.get("paused").is_none(), "{resumed}");
    let jobs: Vec<serde_json::Value> = resumed["groups"][0]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["job"].clone())
        .collect();
    assert_eq!(jobs.len(), 3);
    for vm in ["db", "app1", "app2", "app3"] {
        f.assert_state(vm, "failover_commit_pending");
    }
    let starts: Vec<i64> = jobs.iter().map(|j| job_secs(j, "started_at")).collect();
    let ends: Vec<i64> = jobs.iter().map(|j| job_secs(j, "ended_at")).collect();
    assert!(
        starts.iter().max().unwrap() < ends.iter().min().unwrap(),
        "the three failovers overlapped: started {starts:?}, ended {ends:?}"
    );
    let err = f.fail(&["plan", "resume", "shop"]);
    assert!(
        err.contains("not paused") && err.contains("succeeded"),
        "{err}"
    );
}

#[test]
fn a_failed_post_step_runs_again_on_the_re_run_and_a_refused_command_keeps_a_pause() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    for vm in ["db", "app"] {
        f.protected_vm(vm, &[4 * MIB], &["lan"], MIB);
    }
    let dir = tempfile::tempdir().unwrap();
    let healthy = dir.path().join("healthy");
    let post = format!(
        "test -f {} || {{ echo db not healthy; exit 3; }}",
        healthy.display()
    );
    f.ok(&[
        "plan",
        "create",
        "shop",
        "--group",
        "db",
        "--post",
        &post,
        "--pause",
        "look at db",
        "--group",
        "app",
    ]);
    let err = f.fail(&["plan", "failover", "shop", "--unplanned"]);
    assert!(
        err.contains("db not healthy") && err.contains("post step runs again"),
        "{err}"
    );
    f.assert_state("db", "failover_commit_pending");
    f.assert_state("app", "protected");

    // Fixed: the re-run runs group 1's post step (its VM is skipped), then its pause.
    std::fs::write(&healthy, b"").unwrap();
    let run = f.json(&["plan", "failover", "shop", "--unplanned"]);
    assert_eq!(run["groups"][0][0]["skipped"], true, "{run}");
    assert_eq!(run["hooks"][0]["step"], "post", "{run}");
    assert_eq!(run["hooks"][0]["exit_code"], 0, "{run}");
    assert_eq!(run["paused"], "look at db", "{run}");
    f.assert_state("app", "protected");

    // A plan command refused before it changes anything leaves the pause resumable.
    let err = f.fail(&["plan", "commit", "shop"]);
    assert!(err.contains("app"), "{err}");
    assert_eq!(
        f.json(&["plan", "show", "shop"])["last_run"]["state"],
        "paused"
    );
    let resumed = f.json(&["plan", "resume", "shop"]);
    assert_eq!(resumed["first_group"], 2, "{resumed}");
    f.assert_state("app", "failover_commit_pending");
}
