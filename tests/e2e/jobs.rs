//! Job views: `jobs`, `jobs --all`, `job show`, `job watch`; the job object's shape.

use crate::harness::*;

#[test]
fn job_views_and_shapes() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let prim = f.protected_vm("app", &[8 * MIB], &["lan"], 8 * MIB);
    write_random(&prim[0], 0, MIB, 5);
    let rep = f.json(&["replicate", "app"]);
    assert_job_shape(&rep);
    assert_eq!(rep["vm"], "app");
    assert_job_state(&rep, "succeeded");
    assert!(
        rep["ended_at"].is_string(),
        "a finished job has ended_at: {rep}"
    );
    assert!(
        job_u64(&rep, "bytes_read") > 0,
        "replication reads the disk: {rep}"
    );

    let jobs = f.json(&["jobs"]);
    let jobs = jobs.as_array().expect("jobs --json is an array");
    for j in jobs {
        assert_job_shape(j);
    }
    let all = f.all_jobs();
    assert!(
        all.len() >= 2,
        "protect and replicate jobs are listed: {all:?}"
    );
    for j in &all {
        assert_job_shape(j);
    }
    let rid = job_id(&rep);
    assert!(
        all.iter().any(|j| job_id(j) == rid),
        "jobs --all lists the replicate job"
    );
    let ids: std::collections::HashSet<u64> = all.iter().map(job_id).collect();
    assert_eq!(ids.len(), all.len(), "job ids are unique");

    let shown = f.job(rid);
    assert_job_shape(&shown);
    assert_eq!(job_id(&shown), rid);
    assert_eq!(shown["kind"], rep["kind"]);
    assert_eq!(shown["state"], "succeeded");
    for field in ["bytes_read", "bytes_transferred", "bytes_written"] {
        assert_eq!(
            shown[field], rep[field],
            "job show agrees with what replicate printed ({field})"
        );
    }
    let steps = shown["steps"].as_array().unwrap();
    assert!(!steps.is_empty(), "a replication job has steps: {shown}");
    for s in steps {
        assert_eq!(
            s["state"], "succeeded",
            "all steps of a succeeded job succeeded: {s}"
        );
    }

    // A failback job has steps with byte progress and a failback kind.
    assert_job_state(&f.json(&["failover", "app", "--planned"]), "succeeded");
    assert_job_state(&f.json(&["commit", "app"]), "succeeded");
    let rec = f.disk_paths("app", "r1");
    write_random(&rec[0], 2 * MIB, MIB, 6);
    let fb = f.json(&["failback", "app", "--auto-complete"]);
    assert_job_shape(&fb);
    assert_eq!(fb["kind"], "failback");
    let fsteps = fb["steps"].as_array().unwrap();
    assert!(
        fsteps.len() >= 2,
        "a failback has several steps (sync, shut down, start…): {fb}"
    );
    let moved: u64 = fsteps
        .iter()
        .map(|s| s["bytes_done"].as_u64().unwrap())
        .sum();
    assert!(
        moved >= near_lower(MIB),
        "step byte progress covers the data moved: {fb}"
    );

    // job watch on a finished job returns at once with the job.
    let w = f.json(&["job", "watch", &job_id(&fb).to_string()]);
    assert_eq!(job_id(&w), job_id(&fb));
    assert_eq!(w["state"], "succeeded");

    // Unknown job id: refused.
    f.fail(&["job", "show", "987654321"]);
}
