//! `ferry serve` as a control plane: tokens and roles, bad requests, the OpenAPI document,
//! job progress over server-sent events, the RPO scheduler, and stopping the server cleanly.
//! (The whole lifecycle suite also runs through a server: `FERRY_E2E_SERVE=1`.)
use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// `ferry --server URL --token TOKEN ARGS…` (no token at all when `token` is empty).
fn as_token(f: &Ferry, token: &str, args: &[&str]) -> Output {
    let (url, _) = f.server_url().expect("served");
    let mut c = Command::new(Ferry::bin());
    c.arg("--server").arg(&url);
    if !token.is_empty() {
        c.arg("--token").arg(token);
    }
    c.args(args)
        .env_remove("FERRY_HOME")
        .env_remove("FERRY_SERVER")
        .env_remove("FERRY_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait_output(c.spawn().unwrap(), CMD_TIMEOUT, &args.join(" "))
}

#[track_caller]
fn refused_as(f: &Ferry, token: &str, args: &[&str], needle: &str) {
    let out = as_token(f, token, args);
    assert_exit(&out, 1, args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_error_line(&err, args);
    assert!(
        err.contains(needle),
        "{args:?}: expected {needle:?} in {err}"
    );
}

/// One raw HTTP/1.1 request; returns the status and the body.
fn http(f: &Ferry, method: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let (url, _) = f.server_url().expect("served");
    let addr = url.trim_start_matches("http://");
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        head.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    // A server may answer (and close) before reading a large body: that is fine.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let text = String::from_utf8_lossy(&resp).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn every_role_gets_what_it_may_and_is_refused_the_rest_naming_the_role() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    f.protected_vm("app", &[4 * MIB], &["lan"], MIB);
    let home = f.home().to_path_buf();
    let viewer = new_token(&home, "v", "viewer");
    let operator = new_token(&home, "o", "operator");
    // An admin makes tokens remotely too; the secret is shown once.
    let t = f.json(&["token", "new", "bot", "--role", "agent", "--host", "h1"]);
    assert_eq!(t["role"], "agent");
    assert_eq!(t["host"], "h1");
    let agent = t["token"].as_str().unwrap().to_string();
    let list = f.json(&["token", "list"]);
    assert!(
        !list.to_string().contains(&agent),
        "token list shows no secret"
    );
    assert_eq!(list.as_array().unwrap().len(), 4, "{list}");

    // No token, an unknown token: 401, exit 1, and what to do.
    refused_as(&f, "", &["status", "app"], "no token");
    refused_as(&f, "ferry_nonsense", &["status", "app"], "token rejected");

    // A viewer reads.
    let out = as_token(&f, &viewer, &["--json", "status", "app"]);
    assert_exit(&out, 0, &["status"]);
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["state"], "protected");
    // … and changes nothing.
    refused_as(&f, &viewer, &["replicate", "app"], "needs role operator");
    refused_as(
        &f,
        &viewer,
        &["failover", "app", "--planned"],
        "needs role operator",
    );
    refused_as(&f, &viewer, &["token", "list"], "needs role admin");
    // An operator runs the lifecycle but does not change the inventory or tokens.
    let out = as_token(&f, &operator, &["--json", "replicate", "app"]);
    assert_exit(&out, 0, &["replicate"]);
    refused_as(
        &f,
        &operator,
        &["host", "add", "h9", "--site", "prim", "--driver", "dir"],
        "needs role admin",
    );
    refused_as(
        &f,
        &operator,
        &["vm", "create", "x", "--host", "h1", "--disk", "1MiB"],
        "needs role admin",
    );
    refused_as(
        &f,
        &operator,
        &["token", "new", "x", "--role", "admin"],
        "needs role admin",
    );
    // An agent token is no user token.
    refused_as(&f, &agent, &["status", "app"], "has role agent");
    assert_eq!(
        f.points("app").len(),
        2,
        "only the operator's cycle made a point"
    );
    assert!(f.json(&["host", "list"]).as_array().unwrap().len() == 2);

    // A revoked token is rejected from then on.
    f.ok(&["token", "revoke", "o"]);
    refused_as(&f, &operator, &["status", "app"], "token rejected");
    let names: Vec<String> = f
        .json(&["token", "list"])
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap().to_string())
        .collect();
    assert!(!names.contains(&"o".to_string()), "{names:?}");
}

#[test]
fn bad_requests_get_4xx_with_a_message_and_change_nothing() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    let (_, token) = f.server_url().unwrap();
    let t = Some(token.as_str());
    let sites_before = f.json(&["site", "list"]);

    let (st, body) = http(&f, "POST", "/v1/sites", t, b"{\"name\": \"x\", \"role\": ");
    assert_eq!(st, 400, "malformed JSON: {body}");
    assert!(body.contains("\"error\""), "{body}");
    let (st, body) = http(
        &f,
        "POST",
        "/v1/sites",
        t,
        br#"{"name":"x","role":"recovery","colour":"red"}"#,
    );
    assert_eq!(st, 400, "unknown field: {body}");
    assert!(
        body.contains("colour"),
        "the message names the field: {body}"
    );
    let (st, body) = http(
        &f,
        "POST",
        "/v1/sites",
        t,
        br#"{"name":"x","role":"sideways"}"#,
    );
    assert_eq!(st, 400, "bad enum value: {body}");
    let big = vec![b' '; 10 << 20];
    let (st, body) = http(&f, "POST", "/v1/sites", t, &big);
    assert!((400..500).contains(&st), "a 10 MiB body: {st} {body}");
    let (st, body) = http(
        &f,
        "POST",
        "/v1/sites",
        t,
        br#"{"name":"../../etc","role":"recovery"}"#,
    );
    assert_eq!(st, 400, "a path in a name: {body}");
    let (st, body) = http(&f, "GET", "/v1/vms/..%2F..%2Fetc", t, b"");
    assert_eq!(st, 400, "a path in a URL name: {body}");
    let (st, body) = http(&f, "POST", "/v1/vms/app/failback", t, b"[]");
    assert_eq!(st, 400, "a list instead of an object: {body}");
    let (st, body) = http(&f, "GET", "/v1/nowhere", t, b"");
    assert_eq!(st, 404, "{body}");
    assert!(body.contains("openapi.json"), "{body}");
    let (st, _) = http(&f, "GET", "/v1/sites", None, b"");
    assert_eq!(st, 401);

    assert_eq!(f.json(&["site", "list"]), sites_before, "nothing changed");
    assert!(!f.home().join("stores").join("x").exists());
    // The server is still there.
    f.json(&["host", "list"]);
}

#[test]
fn the_served_openapi_document_is_the_checked_in_one() {
    let f = Ferry::served();
    let (st, body) = http(&f, "GET", "/openapi.json", None, b"");
    assert_eq!(st, 200);
    let served: Value = serde_json::from_str(&body).unwrap();
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json")).unwrap();
    let checked_in: Value = serde_json::from_str(&file).unwrap();
    assert_eq!(served, checked_in);
    assert!(served["paths"]["/v1/vms/{vm}/failback"]["post"].is_object());
}

#[test]
fn job_watch_follows_a_running_failback_over_server_sent_events() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[16 * MIB], &["lan"], 8 * MIB);
    write_random(&rec[0], 0, 8 * MIB, 77);
    let child = f.spawn(&[
        "--json",
        "failback",
        "app",
        "--bandwidth",
        "4MiB/s",
        "--auto-complete",
    ]);
    let s = f.wait_status("app", POLL_TIMEOUT, "the failback to start", |s| {
        s["state"] == "failback_syncing" && s["job"]["state"] == "running"
    });
    let id = job_id(&s["job"]).to_string();
    let watched = f.json(&["job", "watch", &id]);
    assert_job_state(&watched, "succeeded");
    let out = wait_output(child, CMD_TIMEOUT, "failback");
    assert_exit(&out, 0, &["failback"]);
    let ran: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ran["id"], watched["id"]);
    assert_eq!(ran["bytes_transferred"], watched["bytes_transferred"]);
    assert_all_identical(&prim, &rec);
    // The raw stream: one `data:` line per change, the last one final.
    let (url, token) = f.server_url().unwrap();
    let out = Command::new("curl")
        .args([
            "-sN",
            "-H",
            &format!("Authorization: Bearer {token}"),
            &format!("{url}/v1/jobs/{id}/events"),
        ])
        .output();
    if let Ok(out) = out {
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text
            .lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .next_back()
            .expect("an event");
        let j: Value = serde_json::from_str(last.trim()).unwrap();
        assert_eq!(j["state"], "succeeded");
    }
}

#[test]
fn a_vm_protected_with_a_5s_rpo_gets_points_on_its_own() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", PRIMARY_HOST, &[4 * MIB], &["lan"]);
    f.ok(&["vm", "start", "app"]);
    let disk = f.disk_path("app", PRIMARY_HOST, 0);
    write_random(&disk, 0, MIB, 5);
    f.json(&["protect", "app", "--to", "dr", "--rpo", "5s"]);
    let s = f.status("app");
    assert_eq!(s["rpo"]["target_s"], 5, "{s}");
    assert_eq!(s["rpo"]["healthy"], true, "{s}");
    // The guest writes; without any command, new points appear.
    write_random(&disk, 2 * MIB, MIB, 6);
    let t = Instant::now();
    while f.points("app").len() < 3 {
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no scheduled points after {:?}: {:?}",
            t.elapsed(),
            f.points("app")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let s = f.status("app");
    assert_eq!(s["rpo"]["healthy"], true, "{s}");
    assert!(s["rpo"]["last_point_age_s"].as_u64().unwrap() <= 10, "{s}");
    // The scheduler's cycles are ordinary replicate jobs, never two at once for one VM.
    let jobs = f.all_jobs();
    let cycles: Vec<&Value> = jobs.iter().filter(|j| j["kind"] == "replicate").collect();
    assert!(cycles.len() >= 2, "{jobs:?}");
    assert!(cycles
        .iter()
        .all(|j| j["state"] == "succeeded" || j["state"] == "running"));
    let newest = &f.points("app")[0];
    assert!(
        newest["data_bytes"].as_u64().unwrap() >= 2 * MIB,
        "the last point holds the new writes: {newest}"
    );
}

#[test]
fn a_late_replication_turns_the_rpo_unhealthy() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", PRIMARY_HOST, &[4 * MIB], &["lan"]);
    f.json(&["protect", "app", "--to", "dr", "--rpo", "2s"]);
    // The primary host disappears: cycles fail, and the points age.
    let root = f.host_root(PRIMARY_HOST);
    let hidden = root.with_extension("gone");
    std::fs::rename(&root, &hidden).unwrap();
    let s = f.wait_status(
        "app",
        Duration::from_secs(30),
        "the RPO to turn unhealthy",
        |s| s["rpo"]["healthy"] == false,
    );
    assert!(s["rpo"]["last_point_age_s"].as_u64().unwrap() > 2, "{s}");
    std::fs::rename(&hidden, &root).unwrap();
    f.wait_status("app", Duration::from_secs(30), "the RPO to recover", |s| {
        s["rpo"]["healthy"] == true
    });
}

#[test]
fn sigterm_stops_the_server_and_cancels_its_job_which_a_rerun_continues() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[16 * MIB], &["lan"], 8 * MIB);
    write_random(&rec[0], 0, 8 * MIB, 78);
    let mut child = f.spawn(&["failback", "app", "--bandwidth", "2MiB/s"]);
    let s = f.wait_status("app", POLL_TIMEOUT, "phase 1 moving", |s| {
        s["state"] == "failback_syncing"
            && s["job"]["bytes_transferred"].as_u64().unwrap_or(0) > MIB
    });
    let id = job_id(&s["job"]);
    let pid = f.server_pid();
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let t = Instant::now();
    while f.server_alive() {
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "the server did not stop on SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.wait();
    f.start_server(&[]);
    let s = f.status("app");
    assert_eq!(s["state"], "failback_interrupted", "{s}");
    assert_eq!(s["job"]["state"], "cancelled", "{s}");
    let job = f.json(&["failback", "app", "--auto-complete"]);
    assert_eq!(job_id(&job), id, "the same job continues");
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &rec);
}

#[test]
fn a_killed_server_continues_its_failback_by_itself_after_a_restart() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    let (prim, rec) = f.failed_over_vm("app", &[32 * MIB], &["lan"], 8 * MIB);
    let changed = 16 * MIB;
    write_random(&rec[0], 8 * MIB, changed, 79);
    let mut child = f.spawn(&["failback", "app", "--bandwidth", "4MiB/s"]);
    let s = f.wait_status("app", POLL_TIMEOUT, "phase 1 moving", |s| {
        s["state"] == "failback_syncing"
            && s["job"]["bytes_transferred"].as_u64().unwrap_or(0) >= 4 * MIB
    });
    let id = job_id(&s["job"]);
    // kill -9 of the control plane in the middle of phase 1, then a plain restart.
    f.start_server(&[]);
    let _ = child.kill();
    let _ = child.wait();
    let s = f.wait_status(
        "app",
        Duration::from_secs(60),
        "the job to continue and wait",
        |s| s["state"] == "failback_ready",
    );
    assert_eq!(job_id(&s["job"]), id, "the same job continued: {s}");
    assert_eq!(s["job"]["state"], "waiting", "{s}");
    let moved = s["job"]["bytes_transferred"].as_u64().unwrap();
    assert!(
        moved <= changed + changed / 10 + 2 * MIB,
        "phase 1 did not start over: {moved} bytes for {changed} changed"
    );
    let job = f.json(&["complete", "app"]);
    assert_eq!(job_id(&job), id);
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &rec);
}

#[test]
fn with_a_certificate_the_server_speaks_https_and_clients_trust_it_with_ca_cert() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-subj", "/CN=localhost", "-days", "2"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !made.is_ok_and(|s| s.success()) {
        eprintln!("note: TLS test skipped: openssl cannot make a test certificate here");
        return;
    }
    let f = Ferry::served();
    f.start_server_with(
        &[],
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let (url, token) = f.server_url().unwrap();
    assert!(url.starts_with("https://127.0.0.1:"), "{url}");
    let run = |extra: &[&str], args: &[&str]| {
        let mut c = Command::new(Ferry::bin());
        c.arg("--server")
            .arg(&url)
            .arg("--token")
            .arg(&token)
            .args(extra)
            .args(args);
        c.env_remove("FERRY_CA_CERT")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        wait_output(c.spawn().unwrap(), CMD_TIMEOUT, "ferry over https")
    };
    // Not trusted: refused, and the message says how to trust it.
    let out = run(&[], &["site", "list"]);
    assert_exit(&out, 1, &["site", "list"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--ca-cert"), "{err}");
    // Trusted: every command works as over plain HTTP.
    let ca = ["--ca-cert", cert.to_str().unwrap()];
    let out = run(&ca, &["site", "add", "prim", "--role", "primary"]);
    assert_exit(&out, 0, &["site", "add"]);
    let out = run(&ca, &["--json", "site", "list"]);
    assert_exit(&out, 0, &["site", "list"]);
    let sites: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(sites[0]["name"], "prim");
    // Plain HTTP to the HTTPS port does not get in.
    let plain = url.replace("https://", "http://");
    let mut c = Command::new(Ferry::bin());
    c.args(["--server", &plain, "--token", &token, "site", "list"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let out = wait_output(c.spawn().unwrap(), CMD_TIMEOUT, "plain http");
    assert_exit(&out, 1, &["site", "list"]);
}

#[test]
fn plan_commands_are_an_admins_to_give_a_plain_plan_an_operators() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    f.protected_vm("app", &[4 * MIB], &["lan"], MIB);
    let operator = new_token(f.home(), "o", "operator");
    // A pre or post step is a shell command the server runs as itself.
    refused_as(
        &f,
        &operator,
        &["plan", "create", "p", "--group", "app", "--pre", "id"],
        "needs role admin",
    );
    let out = as_token(
        &f,
        &operator,
        &["plan", "create", "p", "--group", "app", "--pause", "look"],
    );
    assert_exit(&out, 0, &["plan", "create"]);
    // The admin of the harness may.
    f.ok(&["plan", "create", "q", "--group", "app", "--post", "true"]);
}

#[test]
fn the_scheduler_asks_for_app_consistent_cycles_when_they_are_due() {
    let f = Ferry::served();
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", PRIMARY_HOST, &[4 * MIB], &["lan"]);
    f.ok(&["vm", "start", "app"]);
    f.json(&[
        "protect",
        "app",
        "--to",
        "dr",
        "--rpo",
        "2s",
        "--app-consistent-every",
        "1h",
        "--app-retention",
        "7d",
    ]);
    // No app-consistent point exists, so the first scheduled cycle asks the guest to freeze;
    // the dir driver runs no guest agent: a crash-consistent point, and the job says why.
    let t = Instant::now();
    let cycle = loop {
        let jobs = f.all_jobs();
        if let Some(j) = jobs
            .iter()
            .find(|j| j["kind"] == "replicate" && j["state"] == "succeeded")
        {
            break j.clone();
        }
        assert!(
            t.elapsed() < Duration::from_secs(40),
            "no scheduled cycle: {jobs:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    let notes = cycle["notes"].to_string();
    assert!(
        notes.contains("not app-consistent") && notes.contains("no guest agent channel"),
        "{cycle}"
    );
    assert_eq!(f.points("app")[0]["consistency"], "crash");
}
