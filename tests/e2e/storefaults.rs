//! Store faults: the Azure Blob API (Azurite) and the S3 server behind a fault proxy
//! (`faultproxy.rs`) that drops connections, answers 500 and 503, stalls and cuts bodies short
//! on a schedule. Replication, failover, failback and verify retry, resume and end
//! identical; a store gone for longer than the retry budget fails the job naming the store,
//! and a re-run continues. Run when FERRY_TEST_AZURE=1 / FERRY_TEST_S3=1 (`.ci/run`).
use std::time::Duration;

use crate::cloud::{enabled, unique};
use crate::faultproxy::{Fault, FaultProxy};
use crate::harness::*;

/// The store server `kind` (`azure`, `s3`) behind a new proxy, and a Ferry whose commands
/// (or server) reach it only through the proxy, with a retry budget of `budget_s` seconds.
fn behind_proxy(kind: &str, budget_s: u64) -> (FaultProxy, Ferry, String) {
    let (upstream, var, url) = match kind {
        "azure" => (
            "127.0.0.1:10000",
            "AZURITE_BLOB_STORAGE_URL",
            format!("az://{}", unique("ferry-faults-")),
        ),
        _ => (
            "127.0.0.1:9000",
            "AWS_ENDPOINT_URL",
            format!("s3://{}", unique("ferry-faults-")),
        ),
    };
    let p = FaultProxy::start(upstream);
    let budget = budget_s.to_string();
    let f = Ferry::with_env(&[(var, &p.url()), ("FERRY_STORE_RETRY_SECS", &budget)]);
    (p, f, url)
}

/// Every fault, among requests that pass.
fn schedule() -> Vec<Fault> {
    vec![
        Fault::Pass,
        Fault::Status(503),
        Fault::Pass,
        Fault::Drop,
        Fault::Pass,
        Fault::Pass,
        Fault::Status(500),
        Fault::Truncate,
        Fault::Pass,
        Fault::Stall(Duration::from_millis(700)),
        Fault::Pass,
    ]
}

fn lifecycle_through_faults(kind: &str) {
    let (p, f, url) = behind_proxy(kind, 30);
    f.ok(&["init"]);
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    f.ok(&["site", "add", "dr", "--role", "recovery", "--store", &url]);
    f.add_host("h1", "prim", &["lan"], None);
    f.add_host("r1", "dr", &["lan"], None);
    f.create_vm("app", "h1", &[6 * MIB], &["lan"]);
    f.ok(&["vm", "start", "app"]);
    let prim = f.disk_paths("app", "h1");
    write_random(&prim[0], 0, 5 * MIB, 901);
    p.set_schedule(schedule());
    assert_job_state(&f.json(&["protect", "app", "--to", "dr"]), "succeeded");
    write_random(&prim[0], MIB, 512 * KIB, 902);
    assert_job_state(&f.json(&["replicate", "app"]), "succeeded");
    assert_eq!(f.json(&["verify", "app"])["ok"], true);
    // The primary site goes down; the failover restores the last point through the faults.
    f.ok(&["vm", "stop", "app", "--host", "h1"]);
    assert_job_state(&f.json(&["failover", "app", "--unplanned"]), "succeeded");
    let rec = f.disk_paths("app", "r1");
    assert_all_identical(&prim, &rec);
    f.ok(&["commit", "app"]);
    write_random(&rec[0], 2 * MIB, 512 * KIB, 903);
    assert_job_state(
        &f.json(&["failback", "app", "--auto-complete"]),
        "succeeded",
    );
    assert_all_identical(&prim, &rec);
    f.ok(&["commit", "app"]);
    assert_eq!(f.json(&["verify", "app"])["ok"], true);
    assert!(
        p.injected() >= 10,
        "the proxy injected {} faults",
        p.injected()
    );
}

#[test]
fn azure_faults_are_retried_and_the_lifecycle_ends_identical() {
    if enabled("FERRY_TEST_AZURE") {
        lifecycle_through_faults("azure");
    }
}

#[test]
fn s3_faults_are_retried_and_the_lifecycle_ends_identical() {
    if enabled("FERRY_TEST_S3") {
        lifecycle_through_faults("s3");
    }
}

#[test]
fn a_store_gone_longer_than_the_retry_budget_fails_the_job_by_name_and_a_rerun_continues() {
    if !enabled("FERRY_TEST_AZURE") {
        return;
    }
    let (p, f, url) = behind_proxy("azure", 3);
    f.ok(&["init"]);
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    f.ok(&["site", "add", "dr", "--role", "recovery", "--store", &url]);
    f.add_host("h1", "prim", &["lan"], None);
    f.add_host("r1", "dr", &["lan"], None);
    let prim = f.protected_vm("app", &[6 * MIB], &["lan"], 4 * MIB);
    write_random(&prim[0], MIB, MIB, 911);
    p.set_down(true);
    let out = f.run(&["replicate", "app"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains(&url) && err.contains("503"),
        "the failure names the store and what it answered: {err}"
    );
    f.assert_state("app", "protected");
    p.set_down(false);
    let job = f.json(&["replicate", "app"]);
    assert_job_state(&job, "succeeded");
    assert_eq!(f.json(&["verify", "app"])["ok"], true);
    f.ok(&["vm", "stop", "app", "--host", "h1"]);
    assert_job_state(&f.json(&["failover", "app", "--unplanned"]), "succeeded");
    assert_all_identical(&prim, &f.disk_paths("app", "r1"));
}
