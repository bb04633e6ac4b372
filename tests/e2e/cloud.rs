//! The lifecycle on cloud stores (Azurite for Azure Blob, moto for S3), and a store server that
//! dies in the middle of a replication and of a failback. Run when FERRY_TEST_AZURE=1 /
//! FERRY_TEST_S3=1 (`.ci/run` starts both servers); skipped otherwise.
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;

pub(crate) fn enabled(var: &str) -> bool {
    if std::env::var(var).as_deref() == Ok("1") {
        return true;
    }
    println!("skipped: set {var}=1 (with the server running: scripts/services.sh start)");
    false
}

pub(crate) fn unique(prefix: &str) -> String {
    format!("{prefix}{}{}", std::process::id(), rand_suffix())
}

fn rand_suffix() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    t.subsec_nanos() % 1_000_000
}

fn lifecycle_on(store: &str) {
    // Store credentials are the environment of each command (served: a server's own).
    let f = Ferry::embedded();
    f.ok(&["init"]);
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    f.ok(&["site", "add", "dr", "--role", "recovery", "--store", store]);
    f.add_host("h1", "prim", &["lan"], None);
    f.add_host("r1", "dr", &["lan"], None);
    let sizes = [6 * MIB + 12345];
    f.create_vm("app", "h1", &sizes, &["lan"]);
    f.ok(&["vm", "start", "app"]);
    let prim = f.disk_paths("app", "h1");
    write_random(&prim[0], 0, 5 * MIB, 601);
    assert_job_state(&f.json(&["protect", "app", "--to", "dr"]), "succeeded");
    write_random(&prim[0], MIB, 256 * KIB, 602);
    let rep = f.json(&["replicate", "app"]);
    assert!(
        job_u64(&rep, "bytes_transferred") <= 300 * KIB,
        "only changes travel: {rep}"
    );
    assert_job_state(&f.json(&["failover", "app", "--planned"]), "succeeded");
    f.ok(&["commit", "app"]);
    let rec = f.disk_paths("app", "r1");
    write_random(&rec[0], 2 * MIB, 512 * KIB, 603);
    assert_job_state(
        &f.json(&["failback", "app", "--auto-complete"]),
        "succeeded",
    );
    assert_all_identical(&prim, &rec);
    f.ok(&["commit", "app"]);
    write_random(&prim[0], 3 * MIB, 128 * KIB, 604);
    let rr = f.json(&["reverse-replicate", "app"]);
    assert!(job_u64(&rr, "bytes_transferred") <= 200 * KIB, "{rr}");
    assert_eq!(f.json(&["verify", "app"])["ok"], true);
}

#[test]
fn lifecycle_on_azure_blob() {
    if enabled("FERRY_TEST_AZURE") {
        lifecycle_on(&format!("az://{}", unique("ferry-e2e-")));
    }
}

#[test]
fn lifecycle_on_s3() {
    if enabled("FERRY_TEST_S3") {
        lifecycle_on(&format!("s3://{}", unique("ferry-e2e-")));
    }
}

/// An Azurite of this test's own (blobs on disk, so they survive a restart).
struct OwnAzurite {
    dir: tempfile::TempDir,
    port: u16,
}

impl OwnAzurite {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let a = OwnAzurite { dir, port };
        a.svc("start");
        a
    }

    fn svc(&self, cmd: &str) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/services.sh");
        let st = Command::new("bash")
            .args([script, cmd, "azurite"])
            .env("FERRY_SERVICES_DIR", self.dir.path())
            .env("FERRY_AZURITE_PORT", self.port.to_string())
            .env("FERRY_AZURITE_DISK", "1")
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "services.sh {cmd} azurite failed");
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnAzurite {
    fn drop(&mut self) {
        self.svc("stop");
    }
}

/// `ferry ARGS…` against our own Azurite.
fn cmd(f: &Ferry, az: &OwnAzurite, args: &[&str]) -> Command {
    let mut c = f.command(args);
    c.env("AZURE_STORAGE_USE_EMULATOR", "true")
        .env("AZURITE_BLOB_STORAGE_URL", az.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

fn run_ok(f: &Ferry, az: &OwnAzurite, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = wait_output(
        cmd(f, az, &full).spawn().unwrap(),
        CMD_TIMEOUT,
        &args.join(" "),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Starts `ferry ARGS…`, waits until its job moved `bytes` between the sites, stops the store
/// server, and checks the command fails with a clear error.
fn store_dies_during(f: &Ferry, az: &OwnAzurite, vm: &str, args: &[&str], bytes: u64) {
    let child = cmd(f, az, args).spawn().unwrap();
    f.wait_status(vm, POLL_TIMEOUT, "job moving data", |s| {
        s["job"]["state"] == "running"
            && s["job"]["bytes_transferred"].as_u64().unwrap_or(0) >= bytes
    });
    az.svc("stop");
    let out = wait_output(child, Duration::from_secs(120), "job with its store gone");
    assert_eq!(
        out.status.code(),
        Some(1),
        "the job fails when its store dies"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("error: "), "{err}");
    az.svc("start");
}

#[test]
fn store_server_dies_mid_replication_and_mid_failback_nothing_lost() {
    if !enabled("FERRY_TEST_AZURE") {
        return;
    }
    let az = OwnAzurite::start();
    // Store credentials are the environment of each command (served: a server's own).
    let f = Ferry::embedded();
    f.ok(&["init"]);
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    let store = format!("az://{}", unique("ferry-fault-"));
    run_ok(
        &f,
        &az,
        &["site", "add", "dr", "--role", "recovery", "--store", &store],
    );
    f.add_host("h1", "prim", &["lan"], None);
    f.add_host("r1", "dr", &["lan"], None);
    f.create_vm("app", "h1", &[40 * MIB], &["lan"]);
    let prim = f.disk_paths("app", "h1");
    write_random(&prim[0], 0, 40 * MIB, 611);

    // The store dies while the first replication uploads (after the first 16 MiB pack).
    store_dies_during(
        &f,
        &az,
        "app",
        &["protect", "app", "--to", "dr", "--bandwidth", "8MiB/s"],
        18 * MIB,
    );
    f.assert_state("app", "unprotected");
    assert_job_state(
        &run_ok(&f, &az, &["protect", "app", "--to", "dr"]),
        "succeeded",
    );
    assert_eq!(run_ok(&f, &az, &["verify", "app"])["ok"], true);

    assert_job_state(
        &run_ok(&f, &az, &["failover", "app", "--planned"]),
        "succeeded",
    );
    run_ok(&f, &az, &["commit", "app"]);
    let rec = f.disk_paths("app", "r1");
    write_random(&rec[0], 0, 36 * MIB, 612);

    // The store dies in the middle of the failback's sync.
    store_dies_during(
        &f,
        &az,
        "app",
        &[
            "failback",
            "app",
            "--bandwidth",
            "8MiB/s",
            "--auto-complete",
        ],
        18 * MIB,
    );
    f.assert_state("app", "failback_interrupted");
    let job = run_ok(&f, &az, &["failback", "app", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &rec);
    run_ok(&f, &az, &["commit", "app"]);
    assert_job_state(&run_ok(&f, &az, &["reverse-replicate", "app"]), "succeeded");
    assert_eq!(run_ok(&f, &az, &["verify", "app"])["ok"], true);
}
