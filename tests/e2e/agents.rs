//! Agent hosts: a `ferry agent` process per host, in a mount namespace of its own where the
//! server's home is an empty tmpfs (any shortcut through the server's files fails), does the
//! host's hypervisor work for `ferry serve`; heartbeats make the host connected, and missing
//! ones disconnected, with refusals that name the host and when it was last seen.
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::*;

/// True when this machine lets us make mount namespaces (root and util-linux `unshare`).
fn can_unshare() -> bool {
    Command::new("unshare")
        .args(["--mount", "true"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// `ferry agent` for `host` in its own mount namespace, the server's home hidden under an
/// empty tmpfs.
fn start_agent(f: &Ferry, host: &str, token: &str, root: &std::path::Path) -> Child {
    start_agent_with(f, host, token, root, "")
}

/// [`start_agent`] with more `ferry agent` flags (`extra`, shell words).
fn start_agent_with(
    f: &Ferry,
    host: &str,
    token: &str,
    root: &std::path::Path,
    extra: &str,
) -> Child {
    start_agent_env(f, host, token, root, extra, &[])
}

/// [`start_agent_with`] with more environment (e.g. `FERRY_FAULT`).
fn start_agent_env(
    f: &Ferry,
    host: &str,
    token: &str,
    root: &std::path::Path,
    extra: &str,
    env: &[(&str, &str)],
) -> Child {
    let (url, _) = f.server_url().unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs '{home}' && exec '{bin}' agent --server '{url}' --token '{token}' --host {host} --root '{root}' {extra}",
        home = f.home().display(),
        bin = Ferry::bin(),
        root = root.display(),
    );
    Command::new("unshare")
        .args(["--mount", "sh", "-c", &script])
        .env_remove("FERRY_HOME")
        .env_remove("FERRY_SERVER")
        .env_remove("FERRY_TOKEN")
        .env("FERRY_LOG", "warn")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ferry agent")
}

fn wait_agent(f: &Ferry, host: &str, connected: bool) -> Value {
    let t = Instant::now();
    loop {
        let h = f.json(&["host", "show", host]);
        if h["agent"]["connected"] == connected {
            return h;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent of {host} never became connected={connected}: {h}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn an_agent_in_its_own_namespace_serves_its_host_and_a_silent_one_disconnects_it() {
    if !can_unshare() {
        eprintln!("note: agent test skipped: `unshare --mount` is not permitted here (needs root)");
        return;
    }
    let f = Ferry::served();
    f.start_server_with(&[], &["--agent-timeout", "2s"]);
    f.ok(&["init"]);
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    f.ok(&["site", "add", "dr", "--role", "recovery"]);
    f.ok(&[
        "host", "add", "h1", "--site", "prim", "--driver", "dir", "--switch", "lan", "--agent",
    ]);
    let h = f.json(&["host", "show", "h1"]);
    assert_eq!(h["agent"]["connected"], false, "{h}");
    assert_eq!(h["agent"]["last_seen"], Value::Null, "{h}");
    // Before its agent ever connected, the host is refused by name.
    let err = f.fail(&[
        "vm", "create", "web", "--host", "h1", "--disk", "4MiB", "--switch", "lan",
    ]);
    assert!(
        err.contains("host h1 is not connected") && err.contains("never connected"),
        "{err}"
    );

    let t = f.json(&[
        "token", "new", "h1-agent", "--role", "agent", "--host", "h1",
    ]);
    let token = t["token"].as_str().unwrap().to_string();
    let root = tempfile::tempdir().unwrap();
    let mut agent = start_agent(&f, "h1", &token, root.path());
    let h = wait_agent(&f, "h1", true);
    assert_eq!(h["connected"], true, "{h}");
    assert_eq!(h["agent"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        h["root"],
        root.path().canonicalize().unwrap().display().to_string(),
        "{h}"
    );

    // The agent does the host's work, on its machine, under its root.
    let v = f.json(&[
        "vm", "create", "web", "--host", "h1", "--disk", "4MiB", "--switch", "lan",
    ]);
    let disk = disk_path_of(&v, 0);
    assert!(disk.starts_with(root.path().canonicalize().unwrap()), "{v}");
    assert!(disk.is_file());
    assert_eq!(f.json(&["vm", "start", "web"])["power"], "running");
    assert_eq!(f.power("web", Some("h1")), "running");
    assert_eq!(f.json(&["vm", "list"]).as_array().unwrap().len(), 1);
    let err = f.fail(&[
        "vm", "create", "db", "--host", "h1", "--disk", "4MiB", "--switch", "wan",
    ]);
    assert!(
        err.contains("no switch named \"wan\""),
        "the agent's refusal reaches the user: {err}"
    );
    // The agent stops: missed heartbeats disconnect the host, and work is refused by name.
    let _ = agent.kill();
    let _ = agent.wait();
    let h = wait_agent(&f, "h1", false);
    assert_eq!(h["connected"], false);
    let err = f.fail(&["vm", "stop", "web", "--host", "h1"]);
    assert!(
        err.contains("host h1 is not connected: its agent was last seen at"),
        "{err}"
    );
    assert!(
        err.contains(h["agent"]["last_seen"].as_str().unwrap()),
        "{err}"
    );
    // It comes back: the host is connected again and nothing was lost.
    let mut agent = start_agent(&f, "h1", &token, root.path());
    wait_agent(&f, "h1", true);
    assert_eq!(f.power("web", Some("h1")), "running");
    f.ok(&["vm", "stop", "web"]);
    assert_eq!(f.power("web", None), "stopped");
    let _ = agent.kill();
    let _ = agent.wait();
}

#[test]
fn agent_endpoints_take_only_their_own_hosts_agent_token() {
    let f = Ferry::served();
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    f.ok(&[
        "host", "add", "h1", "--site", "prim", "--driver", "dir", "--agent",
    ]);
    f.ok(&[
        "host", "add", "h2", "--site", "prim", "--driver", "dir", "--agent",
    ]);
    let t1 = f.json(&["token", "new", "a1", "--role", "agent", "--host", "h1"])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let err = f.fail(&["token", "new", "a0", "--role", "agent"]);
    assert!(err.contains("--host"), "{err}");
    let (url, admin) = f.server_url().unwrap();
    let beat = |token: &str, host: &str, driver: &str| {
        let body = format!(r#"{{"host":"{host}","version":"t","driver":"{driver}","root":"/x"}}"#);
        let out = Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-H",
                "Content-Type: application/json",
            ])
            .args([
                "-H",
                &format!("Authorization: Bearer {token}"),
                "-d",
                &body,
                &format!("{url}/v1/agent/heartbeat"),
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    assert_eq!(beat(&t1, "h1", "dir"), "200");
    assert_eq!(
        beat(&t1, "h2", "dir"),
        "403",
        "an agent acts only as its own host"
    );
    assert_eq!(
        beat(&admin, "h1", "dir"),
        "403",
        "user tokens are no agent tokens"
    );
    assert_eq!(
        beat(&t1, "h1", "qemu"),
        "409",
        "the host's driver must match"
    );
    assert_eq!(
        f.json(&["host", "show", "h2"])["agent"]["last_seen"],
        Value::Null
    );
    assert_eq!(f.json(&["host", "show", "h1"])["agent"]["connected"], true);
}

/// Two sites, one agent host each (each agent in its own namespace, blind to the server's
/// home), a store both agents reach: the whole lifecycle through `ferry serve`.
struct AgentSites {
    f: Ferry,
    driver: String,
    agents: Vec<(String, String, std::path::PathBuf, Child)>,
    _roots: Vec<tempfile::TempDir>,
    _store: Option<tempfile::TempDir>,
}

impl AgentSites {
    /// `store`: a store URL, or None for a folder outside the server's home.
    fn start(store: Option<&str>) -> Option<AgentSites> {
        Self::start_on(store, "dir")
    }

    /// [`AgentSites::start`] with hosts (and agents) of `driver` (`qemu`: TCG).
    fn start_on(store: Option<&str>, driver: &str) -> Option<AgentSites> {
        if !can_unshare() {
            eprintln!(
                "note: agent test skipped: `unshare --mount` is not permitted here (needs root)"
            );
            return None;
        }
        let f = Ferry::served();
        // A cloud store's credentials are the agents' alone: the server runs without them.
        let server_env: &[(&str, &str)] = match store {
            Some(_) => &[("AZURE_STORAGE_USE_EMULATOR", "false")],
            None => &[],
        };
        f.start_server_with(server_env, &["--agent-timeout", "3s"]);
        f.ok(&["init"]);
        let dir = tempfile::tempdir().unwrap();
        f.ok(&["site", "add", "prim", "--role", "primary"]);
        match store {
            Some(u) => {
                let err = f.fail(&["site", "add", "dr", "--role", "recovery", "--store", u]);
                assert!(
                    err.contains("--no-store-check"),
                    "the server cannot open the store and says what to do: {err}"
                );
                f.ok(&[
                    "site",
                    "add",
                    "dr",
                    "--role",
                    "recovery",
                    "--store",
                    u,
                    "--no-store-check",
                ]);
            }
            None => {
                let url = format!("file://{}", dir.path().join("dr").display());
                f.ok(&["site", "add", "dr", "--role", "recovery", "--store", &url]);
            }
        }
        let mut me = AgentSites {
            f,
            driver: driver.into(),
            agents: Vec::new(),
            _roots: Vec::new(),
            _store: Some(dir),
        };
        for (host, site) in [("h1", "prim"), ("r1", "dr")] {
            let mut add = vec![
                "host", "add", host, "--site", site, "--driver", driver, "--switch", "lan",
                "--agent",
            ];
            if driver == "qemu" {
                add.extend(["--accel", "tcg"]);
            }
            me.f.ok(&add);
            let token = me.f.json(&[
                "token",
                "new",
                &format!("{host}-agent"),
                "--role",
                "agent",
                "--host",
                host,
            ])["token"]
                .as_str()
                .unwrap()
                .to_string();
            let root = tempfile::tempdir().unwrap();
            let child = start_agent_with(
                &me.f,
                host,
                &token,
                root.path(),
                &format!("--driver {driver}"),
            );
            me.agents.push((
                host.into(),
                token,
                root.path().canonicalize().unwrap(),
                child,
            ));
            me._roots.push(root);
        }
        for (host, ..) in &me.agents {
            wait_agent(&me.f, host, true);
        }
        Some(me)
    }

    fn kill(&mut self, host: &str) {
        let a = self.agents.iter_mut().find(|a| a.0 == host).unwrap();
        let _ = a.3.kill();
        let _ = a.3.wait();
    }

    fn restart(&mut self, host: &str) {
        self.restart_with(host, "");
    }

    /// Restarts `host`'s agent with more flags (e.g. `--key FILE`).
    fn restart_with(&mut self, host: &str, extra: &str) {
        self.restart_env(host, extra, &[]);
    }

    /// Restarts `host`'s agent with more flags and environment (e.g. `FERRY_FAULT`).
    fn restart_env(&mut self, host: &str, extra: &str, env: &[(&str, &str)]) {
        let a = self.agents.iter_mut().find(|a| a.0 == host).unwrap();
        let _ = a.3.kill();
        let _ = a.3.wait();
        let extra = format!("--driver {} {extra}", self.driver);
        a.3 = start_agent_env(&self.f, host, &a.1, &a.2, &extra, env);
        wait_agent(&self.f, host, true);
    }

    /// Agents whose process has ended.
    fn dead(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for a in &mut self.agents {
            if a.3.try_wait().ok().flatten().is_some() {
                out.push(a.0.clone());
            }
        }
        out
    }

    /// VM `app` on h1 with one disk of `size` holding `data` random bytes (`seed`), protected,
    /// failed over to r1 and committed: its primary and recovery disk paths.
    fn failed_over(
        &self,
        size: &str,
        data: u64,
        seed: u64,
    ) -> (Vec<std::path::PathBuf>, Vec<std::path::PathBuf>) {
        let v = self.f.json(&[
            "vm", "create", "app", "--host", "h1", "--disk", size, "--switch", "lan",
        ]);
        let prim = vec![disk_path_of(&v, 0)];
        write_random(&prim[0], 0, data, seed);
        self.f.ok(&["protect", "app", "--to", "dr"]);
        assert_job_state(&self.f.json(&["failover", "app", "--planned"]), "succeeded");
        self.f.ok(&["commit", "app"]);
        (prim, self.f.disk_paths("app", "r1"))
    }

    /// Waits until app's job notes that it waits for `host`'s agent.
    fn wait_waiting_for(&self, host: &str) {
        let want = format!("waiting for agent {host}");
        self.f.wait_status(
            "app",
            Duration::from_secs(30),
            "a note that the job waits",
            |st| {
                st["job"]["notes"]
                    .as_array()
                    .is_some_and(|n| n.iter().any(|n| n.as_str().unwrap_or("").contains(&want)))
            },
        );
    }

    fn root(&self, host: &str) -> std::path::PathBuf {
        self.agents.iter().find(|a| a.0 == host).unwrap().2.clone()
    }
}

impl Drop for AgentSites {
    fn drop(&mut self) {
        for a in &mut self.agents {
            let _ = a.3.kill();
            let _ = a.3.wait();
        }
        // QEMUs the agents started (they outlive their agent).
        for a in &self.agents {
            for (pid, _) in crate::qemu::processes_mentioning(&a.2) {
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        if self.driver == "qemu" {
            std::thread::sleep(Duration::from_millis(200));
            crate::qemu::reap_qemu_zombies();
        }
    }
}

/// The guest of `vm`'s copy on `host` runs `qemu-io` command `cmd` on its first disk, through
/// QMP (its socket is under the agent's root, which this test can reach).
#[track_caller]
fn guest(f: &Ferry, vm: &str, host: &str, cmd: &str) {
    let v = f.vm_show(vm, Some(host));
    assert_eq!(v["power"], "running", "{v}");
    let qmp = v["qmp"].as_str().expect("qmp socket");
    let dev = v["disks"][0]["device"].as_str().expect("guest device");
    let mut q = ferry_hypervisor::qmp::Qmp::connect(qmp).expect("QMP");
    let out = q
        .human_monitor_command(&format!("qemu-io -d {dev}/virtio-backend \"{cmd}\""))
        .expect("qemu-io");
    assert_eq!(out, "", "guest qemu-io {cmd:?} on {vm}@{host}");
}

#[test]
fn qemu_vms_are_protected_failed_over_and_back_by_their_agents() {
    let missing: Vec<&str> = ["qemu-system-x86_64", "qemu-img", "qemu-nbd"]
        .into_iter()
        .filter(|p| !crate::qemu::on_path(p))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "note: agents with qemu skipped: {} not installed",
            missing.join(", ")
        );
        return;
    }
    // QEMUs outlive the agent commands that start them: reaped here.
    unsafe {
        libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
    }
    let Some(s) = AgentSites::start_on(None, "qemu") else {
        return;
    };
    let f = &s.f;
    let v = f.json(&[
        "vm", "create", "web1", "--host", "h1", "--disk", "32MiB", "--switch", "lan", "--memory",
        "128MiB",
    ]);
    assert_eq!(v["driver"], "qemu", "{v}");
    let prim = disk_path_of(&v, 0);
    assert!(prim.starts_with(s.root("h1")), "{v}");
    f.json(&["vm", "start", "web1"]);
    guest(f, "web1", "h1", "write -P 0xab 4M 2M");
    let job = f.json(&["protect", "web1", "--to", "dr"]);
    assert_job_state(&job, "succeeded");
    assert!(
        job_u64(&job, "bytes_read") < 8 * MIB,
        "the agent read only allocated ranges through QEMU: {job}"
    );
    // The primary's agent reads what QEMU's dirty bitmap says the guest wrote, nothing else.
    guest(f, "web1", "h1", "write -P 0xcd 10M 1M");
    let job = f.json(&["replicate", "web1"]);
    assert_job_state(&job, "succeeded");
    assert_eq!(job_u64(&job, "bytes_read"), MIB, "{job}");
    assert!(job.get("notes").is_none(), "tracking was trusted: {job}");
    let job = f.json(&["failover", "web1", "--planned"]);
    assert_job_state(&job, "succeeded");
    assert_eq!(f.power("web1", Some("r1")), "running");
    assert_eq!(f.power("web1", Some("h1")), "stopped");
    f.ok(&["commit", "web1"]);
    let rec = f.disk_paths("web1", "r1")[0].clone();
    assert!(rec.starts_with(s.root("r1")), "{rec:?}");
    // The recovery guest writes; the failback moves that delta only, tracked by the recovery
    // agent's QEMU.
    guest(f, "web1", "r1", "write -P 0xef 16M 1M");
    let job = f.json(&["failback", "web1", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    assert!(
        job_u64(&job, "bytes_transferred") <= 2 * MIB,
        "only the recovery guest's writes crossed: {job}"
    );
    assert_eq!(f.power("web1", Some("h1")), "running");
    f.ok(&["vm", "stop", "web1", "--host", "h1"]);
    crate::qemu::assert_same_content(&prim, "qcow2", &rec, "qcow2");
}

fn lifecycle_through_agents(store: Option<&str>) {
    let Some(s) = AgentSites::start(store) else {
        return;
    };
    let f = &s.f;
    let v = f.json(&[
        "vm", "create", "app", "--host", "h1", "--disk", "6MiB", "--disk", "3MiB", "--switch",
        "lan",
    ]);
    let prim = vec![disk_path_of(&v, 0), disk_path_of(&v, 1)];
    assert!(prim[0].starts_with(s.root("h1")), "{v}");
    write_random(&prim[0], 0, 5 * MIB, 701);
    write_random(&prim[1], MIB, MIB, 702);
    f.ok(&["vm", "start", "app"]);
    let p = f.json(&["protect", "app", "--to", "dr"]);
    assert_job_state(&p, "succeeded");
    assert!(
        job_u64(&p, "bytes_read") >= 6 * MIB,
        "the agent read the disks: {p}"
    );
    assert!(job_u64(&p, "bytes_transferred") >= 5 * MIB, "{p}");
    write_random(&prim[0], MIB, 256 * KIB, 703);
    let rep = f.json(&["replicate", "app"]);
    assert_job_state(&rep, "succeeded");
    assert!(
        job_u64(&rep, "bytes_transferred") <= 400 * KIB,
        "only changes travel: {rep}"
    );
    assert_eq!(f.points("app").len(), 2);
    assert_job_state(&f.json(&["failover", "app", "--planned"]), "succeeded");
    assert_eq!(f.power("app", Some("r1")), "running");
    assert_eq!(f.power("app", Some("h1")), "stopped");
    let rec = f.disk_paths("app", "r1");
    assert!(rec[0].starts_with(s.root("r1")), "{rec:?}");
    assert_all_identical(&prim, &rec);
    f.ok(&["commit", "app"]);
    // The recovery VM writes; a delta failback moves only that, in two phases.
    write_random(&rec[0], 2 * MIB, 512 * KIB, 704);
    let dry = f.json(&["failback", "app", "--dry-run"]);
    assert!(
        dry["bytes_to_move"].as_u64().unwrap() <= 600 * KIB
            && dry["bytes_to_move"].as_u64().unwrap() >= 512 * KIB,
        "the dry run through agents predicts the delta: {dry}"
    );
    let p1 = f.json(&["failback", "app"]);
    assert_job_state(&p1, "waiting");
    write_random(&rec[1], 0, 64 * KIB, 705);
    let done = f.json(&["complete", "app", "--verify"]);
    assert_job_state(&done, "succeeded");
    let moved = job_u64(&done, "bytes_transferred");
    assert!(
        (512 * KIB..=800 * KIB).contains(&moved),
        "phase 1 and 2 moved the delta only: {done}"
    );
    assert_eq!(f.power("app", Some("h1")), "running");
    assert_all_identical(&prim, &rec);
    f.ok(&["commit", "app"]);
    assert!(f
        .json(&["vm", "list", "--host", "r1"])
        .as_array()
        .unwrap()
        .is_empty());
    write_random(&prim[0], 3 * MIB, 128 * KIB, 706);
    let rr = f.json(&["reverse-replicate", "app"]);
    assert_job_state(&rr, "succeeded");
    assert!(job_u64(&rr, "bytes_transferred") <= 300 * KIB, "{rr}");
    let ver = f.json(&["verify", "app"]);
    assert_eq!(ver["ok"], true, "{ver}");
    // The control plane never held a disk block: no disk, map journal or store under its home
    // holds VM data.
    let stores = f.home().join("stores");
    assert!(
        !stores.exists() || std::fs::read_dir(&stores).unwrap().next().is_none(),
        "the server's home holds a store"
    );
}

#[test]
fn the_whole_lifecycle_runs_through_one_agent_per_site() {
    lifecycle_through_agents(None);
}

#[test]
fn the_whole_lifecycle_runs_through_agents_on_azurite() {
    if std::env::var("FERRY_TEST_AZURE").as_deref() != Ok("1") {
        println!(
            "skipped: set FERRY_TEST_AZURE=1 (with Azurite running: scripts/services.sh start)"
        );
        return;
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    lifecycle_through_agents(Some(&format!(
        "az://ferry-agents-{}-{t}",
        std::process::id()
    )));
}

#[test]
fn an_agent_killed_mid_transfer_resumes_its_work_and_the_disks_end_identical() {
    let Some(mut s) = AgentSites::start(None) else {
        return;
    };
    let (prim, rec) = s.failed_over("40MiB", 2 * MIB, 711);
    write_random(&rec[0], 4 * MIB, 32 * MIB, 712);
    // The primary's agent writes at 4 MiB/s in batches of 2 threads x 2 groups of 4 MiB:
    // killed once its first batch is durable, mid-way through the 32 MiB.
    let child = s.f.spawn(&[
        "--json",
        "failback",
        "app",
        "--auto-complete",
        "--bandwidth",
        "4MiB/s",
        "--threads",
        "2",
    ]);
    s.f.wait_status("app", Duration::from_secs(60), "16 MiB written", |st| {
        st["job"]["bytes_written"].as_u64().unwrap_or(0) >= 16 * MIB
    });
    s.kill("h1");
    // The job waits for the agent, and says so.
    s.wait_waiting_for("h1");
    let before = s.f.status("app")["job"]["bytes_written"].as_u64().unwrap();
    assert!(before < 32 * MIB, "killed mid-transfer: {before}");
    s.restart("h1");
    let out = wait_output(child, Duration::from_secs(120), "failback");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let job = parse_one_json(&String::from_utf8_lossy(&out.stdout), &["failback"]);
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &rec);
    // What the killed agent had made durable was not sent again (its journal): at most the
    // batch in flight was.
    let moved = job_u64(&job, "bytes_transferred");
    assert!(moved >= 32 * MIB, "{job}");
    assert!(
        moved <= 32 * MIB + 17 * MIB,
        "re-sent more than a batch: {job}"
    );
    assert_eq!(s.f.state("app"), "failback_commit_pending");
}

#[test]
fn a_server_killed_during_phase_1_through_agents_continues_after_a_restart() {
    let Some(s) = AgentSites::start(None) else {
        return;
    };
    let f = &s.f;
    let (prim, rec) = s.failed_over("40MiB", 2 * MIB, 721);
    let changed = 24 * MIB;
    write_random(&rec[0], 8 * MIB, changed, 722);
    let mut child = f.spawn(&["failback", "app", "--bandwidth", "4MiB/s", "--threads", "1"]);
    let st = f.wait_status("app", Duration::from_secs(60), "phase 1 writing", |st| {
        st["state"] == "failback_syncing"
            && st["job"]["bytes_written"].as_u64().unwrap_or(0) >= 8 * MIB
    });
    let id = job_id(&st["job"]);
    // kill -9 of the control plane while the primary's agent writes; the agents stay up and
    // find it again at the same address.
    let (url, _) = f.server_url().unwrap();
    let listen = url.trim_start_matches("http://").to_string();
    f.start_server_with(&[], &["--agent-timeout", "3s", "--listen", &listen]);
    let _ = child.kill();
    let _ = child.wait();
    let st = f.wait_status(
        "app",
        Duration::from_secs(90),
        "the job to continue and wait",
        |st| st["state"] == "failback_ready",
    );
    assert_eq!(job_id(&st["job"]), id, "the same job continued: {st}");
    assert_eq!(st["job"]["state"], "waiting", "{st}");
    let moved = st["job"]["bytes_transferred"].as_u64().unwrap();
    assert!(
        moved <= changed + 17 * MIB,
        "phase 1 did not start over (the agent's journal kept what it wrote): {moved} bytes for {changed} changed"
    );
    let job = f.json(&["complete", "app"]);
    assert_eq!(job_id(&job), id);
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &rec);
    assert_eq!(f.power("app", Some("h1")), "running");
}

#[test]
fn an_encrypted_vm_moves_through_agents_that_hold_its_key_and_the_control_plane_never_needs_it() {
    let Some(mut s) = AgentSites::start(None) else {
        return;
    };
    // The keys live outside the server's home (the agents cannot see that).
    let keys = tempfile::tempdir().unwrap();
    let key = keys.path().join("app.key");
    let created = s.f.json(&["key", "new", key.to_str().unwrap()]);
    let key_id = created["id"].as_str().unwrap().to_string();
    let other = keys.path().join("other.key");
    s.f.ok(&["key", "new", other.to_str().unwrap()]);
    let v = s.f.json(&[
        "vm", "create", "app", "--host", "h1", "--disk", "4MiB", "--switch", "lan",
    ]);
    let prim = vec![disk_path_of(&v, 0)];
    write_random(&prim[0], 0, 3 * MIB, 731);
    let k = key.to_str().unwrap();
    // Refused before anything changes: the primary's agent lacks the key.
    let err = s.f.fail(&["protect", "app", "--to", "dr", "--key", k]);
    assert!(
        err.contains("agent of host h1") && err.contains("--key") && err.contains(&key_id),
        "the refusal names the agent, the key and the flag: {err}"
    );
    let st = s.f.fail(&["points", "app"]);
    assert!(st.contains("unprotected"), "nothing changed: {st}");
    // The agents load the key from their own copy; the control plane is never told where.
    let agent_key = keys.path().join("agents.key");
    std::fs::copy(&key, &agent_key).unwrap();
    let with_key = format!("--key '{}'", agent_key.display());
    s.restart_with("h1", &with_key);
    s.restart_with("r1", &with_key);
    assert_job_state(
        &s.f.json(&["protect", "app", "--to", "dr", "--key", k]),
        "succeeded",
    );
    // The operator's copy goes: from here on no key file exists where the control plane
    // heard of one, and no command passes --key.
    std::fs::remove_file(&key).unwrap();
    write_random(&prim[0], MIB, 256 * KIB, 733);
    assert_job_state(&s.f.json(&["replicate", "app"]), "succeeded");
    let ver = s.f.json(&["verify", "app"]);
    assert_eq!(ver["ok"], true, "{ver}");
    assert!(ver["blocks"].as_u64().unwrap() > 0, "{ver}");
    let wrong =
        s.f.fail(&["verify", "app", "--key", other.to_str().unwrap()]);
    assert!(
        wrong.contains("wrong key") && wrong.contains(&key_id),
        "{wrong}"
    );
    // The primary site is lost: an unplanned failover restores the last point on r1, whose
    // agent reads the point's manifest itself.
    s.kill("h1");
    wait_agent(&s.f, "h1", false);
    assert_job_state(&s.f.json(&["failover", "app", "--unplanned"]), "succeeded");
    let rec = s.f.disk_paths("app", "r1");
    assert_all_identical(&prim, &rec);
    s.restart_with("h1", &with_key);
    s.f.ok(&["commit", "app"]);
    write_random(&rec[0], MIB, 512 * KIB, 732);
    let job = s.f.json(&["failback", "app", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &rec);
    assert!(job_u64(&job, "bytes_transferred") <= 700 * KIB, "{job}");
    s.f.ok(&["commit", "app"]);
    write_random(&prim[0], 2 * MIB, 128 * KIB, 734);
    assert_job_state(&s.f.json(&["reverse-replicate", "app"]), "succeeded");
    // The failback point is whole in the store: the newest point verifies on an agent.
    let ver = s.f.json(&["verify", "app"]);
    assert_eq!(ver["ok"], true, "{ver}");
}

#[test]
fn a_failback_waiting_for_a_dead_agent_can_be_cancelled_and_its_disk_stays_inconsistent() {
    let Some(mut s) = AgentSites::start(None) else {
        return;
    };
    let (prim, rec) = s.failed_over("40MiB", 2 * MIB, 741);
    write_random(&rec[0], 4 * MIB, 24 * MIB, 742);
    let mut child = s.f.spawn(&[
        "failback",
        "app",
        "--auto-complete",
        "--bandwidth",
        "4MiB/s",
        "--threads",
        "1",
    ]);
    s.f.wait_status("app", Duration::from_secs(60), "8 MiB written", |st| {
        st["job"]["bytes_written"].as_u64().unwrap_or(0) >= 8 * MIB
    });
    s.kill("h1");
    s.wait_waiting_for("h1");
    // The operator gives up waiting: the job stops, the primary's disk stays marked
    // inconsistent, and nothing starts a VM on it.
    s.f.ok(&["cancel", "app"]);
    let _ = child.wait();
    s.f.assert_state("app", "failback_interrupted");
    s.restart("h1");
    let h1 = s.f.json(&["vm", "show", "app", "--host", "h1"]);
    assert_eq!(h1["disks"][0]["consistent"], false, "{h1}");
    let err = s.f.fail(&["vm", "start", "app", "--host", "h1"]);
    assert!(err.contains("inconsistent"), "{err}");
    // Re-running the failback continues where the agent's journal says it stopped.
    let job = s.f.json(&["failback", "app", "--auto-complete"]);
    assert_job_state(&job, "succeeded");
    assert_all_identical(&prim, &rec);
    assert!(
        job_u64(&job, "bytes_transferred") <= 24 * MIB + 17 * MIB,
        "the re-run did not start over: {job}"
    );
}

#[test]
fn packs_lost_while_a_failback_waits_are_stored_again_and_the_failback_point_is_whole() {
    let Some(s) = AgentSites::start(None) else {
        return;
    };
    let (prim, rec) = s.failed_over("8MiB", 6 * MIB, 761);
    write_random(&rec[0], MIB, 512 * KIB, 762);
    // Past the dir driver's racy-stamp window, so phase 2's change tracking trusts phase 1's
    // maps and reads nothing that did not change, unless the store lacks it.
    std::thread::sleep(Duration::from_millis(2500));
    assert_job_state(&s.f.json(&["failback", "app"]), "waiting");
    // While the failback waits, every pack of the store goes (a garbage collection of
    // another VM's retention, or an operator's mistake): what phase 1 captured, and the
    // blocks of every earlier point.
    let store = s._store.as_ref().unwrap().path().join("dr");
    for d in ["packs", "index"] {
        let dir = store.join(d);
        let n = std::fs::read_dir(&dir).unwrap().count();
        assert!(n > 0, "{} holds packs", dir.display());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::create_dir_all(&dir).unwrap();
    }
    let done = s.f.json(&["complete", "app"]);
    assert_job_state(&done, "succeeded");
    assert_all_identical(&prim, &rec);
    // The recovery agent's last capture stored every block of the failback point again.
    let ver = s.f.json(&["verify", "app"]);
    assert_eq!(ver["ok"], true, "{ver}");
    assert!(ver["bytes"].as_u64().unwrap() >= 6 * MIB, "{ver}");
    s.f.ok(&["commit", "app"]);
    write_random(&prim[0], 2 * MIB, 128 * KIB, 764);
    assert_job_state(&s.f.json(&["reverse-replicate", "app"]), "succeeded");
    assert_eq!(s.f.json(&["verify", "app"])["ok"], true);
}

#[test]
fn a_recovery_plan_runs_through_agents_group_by_group_and_the_primary_site_can_be_lost() {
    let Some(mut s) = AgentSites::start(None) else {
        return;
    };
    let mut prim = Vec::new();
    for (i, vm) in ["db", "web"].iter().enumerate() {
        let v = s.f.json(&[
            "vm", "create", vm, "--host", "h1", "--disk", "4MiB", "--switch", "lan",
        ]);
        let p = disk_path_of(&v, 0);
        write_random(&p, 0, 2 * MIB, 770 + i as u64);
        s.f.ok(&["protect", vm, "--to", "dr"]);
        prim.push(p);
    }
    s.f.ok(&["plan", "create", "shop", "--group", "db", "--group", "web"]);
    // The primary site is lost: an unplanned plan failover brings the groups up in order.
    s.kill("h1");
    wait_agent(&s.f, "h1", false);
    let err = s.f.fail(&["plan", "failover", "shop", "--planned"]);
    assert!(
        err.contains("h1"),
        "a planned failover names the lost host: {err}"
    );
    let run = s.f.json(&["plan", "failover", "shop", "--unplanned"]);
    let ids: Vec<u64> = run["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| job_id(&g[0]["job"]))
        .collect();
    assert!(ids[0] < ids[1], "db came up before web: {run}");
    for (i, vm) in ["db", "web"].iter().enumerate() {
        s.f.assert_state(vm, "failover_commit_pending");
        assert_eq!(s.f.power(vm, Some("r1")), "running");
        assert_all_identical(&[prim[i].clone()], &s.f.disk_paths(vm, "r1"));
    }
    s.f.json(&["plan", "commit", "shop"]);
    s.restart("h1");
    for vm in ["db", "web"] {
        write_random(&s.f.disk_paths(vm, "r1")[0], MIB, 256 * KIB, 780);
    }
    let done = s.f.json(&["plan", "failback", "shop", "--auto-complete"]);
    assert_eq!(done["groups"].as_array().unwrap().len(), 2, "{done}");
    for (i, vm) in ["db", "web"].iter().enumerate() {
        s.f.assert_state(vm, "failback_commit_pending");
        assert_eq!(s.f.power(vm, Some("h1")), "running");
        assert_all_identical(&[prim[i].clone()], &s.f.disk_paths(vm, "r1"));
    }
    s.f.json(&["plan", "commit", "shop"]);
    s.f.json(&["plan", "reverse-replicate", "shop"]);
    for vm in ["db", "web"] {
        s.f.assert_state(vm, "protected");
    }
}

/// How the crash matrix of agents prepares each workflow's state, and its command.
struct AgentCase {
    workflow: &'static str,
    prepare: fn(&AgentSites) -> (std::path::PathBuf, Option<std::path::PathBuf>),
    command: &'static [&'static str],
}

fn agent_vm(s: &AgentSites) -> std::path::PathBuf {
    let v = s.f.json(&[
        "vm", "create", "app", "--host", "h1", "--disk", "8MiB", "--switch", "lan",
    ]);
    let p = disk_path_of(&v, 0);
    write_random(&p, 0, 3 * MIB, 801);
    p
}

fn agent_protected(s: &AgentSites) -> std::path::PathBuf {
    let p = agent_vm(s);
    s.f.ok(&["protect", "app", "--to", "dr"]);
    write_random(&p, 4 * MIB, MIB, 802);
    p
}

fn agent_failed_over(s: &AgentSites) -> (std::path::PathBuf, Option<std::path::PathBuf>) {
    let (prim, rec) = s.failed_over("8MiB", 3 * MIB, 803);
    write_random(&rec[0], MIB, MIB, 804);
    (prim[0].clone(), Some(rec[0].clone()))
}

const AGENT_CASES: &[AgentCase] = &[
    AgentCase {
        workflow: "protect",
        prepare: |s| (agent_vm(s), None),
        command: &["protect", "app", "--to", "dr"],
    },
    AgentCase {
        workflow: "replicate",
        prepare: |s| (agent_protected(s), None),
        command: &["replicate", "app"],
    },
    AgentCase {
        workflow: "failover-planned",
        prepare: |s| (agent_protected(s), None),
        command: &["failover", "app", "--planned"],
    },
    AgentCase {
        workflow: "failover-unplanned",
        prepare: |s| {
            let p = agent_protected(s);
            // The write after the last point is lost with the primary: restore the point.
            s.f.ok(&["replicate", "app"]);
            (p, None)
        },
        command: &["failover", "app", "--unplanned"],
    },
    AgentCase {
        workflow: "failover-change-point",
        prepare: |s| {
            // Point 1 as protect took it: what the recovery copy holds after the command.
            let p = agent_vm(s);
            s.f.ok(&["protect", "app", "--to", "dr"]);
            let at_point_1 = s.f.home().join("point-1.img");
            std::fs::copy(&p, &at_point_1).unwrap();
            write_random(&p, 4 * MIB, MIB, 806);
            s.f.ok(&["replicate", "app"]);
            s.f.ok(&["failover", "app", "--unplanned"]);
            (at_point_1, None)
        },
        command: &["failover", "app", "--point", "1"],
    },
    AgentCase {
        workflow: "failback-delta",
        prepare: agent_failed_over,
        command: &["failback", "app", "--auto-complete"],
    },
    AgentCase {
        workflow: "failback-full",
        prepare: agent_failed_over,
        command: &["failback", "app", "--sync", "full", "--auto-complete"],
    },
    AgentCase {
        workflow: "failover-test",
        prepare: |s| (agent_protected(s), None),
        command: &["failover", "app", "--test"],
    },
    AgentCase {
        workflow: "cleanup-test",
        prepare: |s| {
            let p = agent_protected(s);
            s.f.ok(&["failover", "app", "--test"]);
            (p, None)
        },
        command: &["failover", "app", "--cleanup-test"],
    },
    AgentCase {
        workflow: "commit-failover",
        prepare: |s| {
            let p = agent_protected(s);
            s.f.ok(&["failover", "app", "--planned"]);
            (p, None)
        },
        command: &["commit", "app"],
    },
    AgentCase {
        workflow: "commit-failback",
        prepare: |s| {
            let (p, r) = agent_failed_over(s);
            s.f.ok(&["failback", "app", "--auto-complete"]);
            (p, r)
        },
        command: &["commit", "app"],
    },
    AgentCase {
        workflow: "reverse-replicate",
        prepare: |s| {
            let (prim, _) = agent_failed_over(s);
            s.f.ok(&["failback", "app", "--auto-complete"]);
            s.f.ok(&["commit", "app"]);
            write_random(&prim, 5 * MIB, MIB, 805);
            (prim, None)
        },
        command: &["reverse-replicate", "app"],
    },
];

/// Runs one agent case: every agent armed with the fault, the command started, each agent
/// that dies restarted without it, until the command ends; then the disks must agree.
fn agent_case(c: &AgentCase, point: &str) -> Result<(), String> {
    let Some(mut s) = AgentSites::start(None) else {
        return Ok(());
    };
    let (prim, rec) = (c.prepare)(&s);
    for h in ["h1", "r1"] {
        s.restart_env(h, "", &[("FERRY_FAULT", point)]);
    }
    let mut child = s.f.spawn(c.command);
    let t = Instant::now();
    let mut deaths = 0;
    let out = loop {
        for h in s.dead() {
            deaths += 1;
            s.restart(&h);
        }
        if let Some(_st) = child.try_wait().unwrap() {
            break child.wait_with_output().unwrap();
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = child.kill();
            return Err("the command did not end in 120 s".into());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    if deaths == 0 {
        return Err("no agent reached the point".into());
    }
    if !out.status.success() {
        return Err(format!(
            "the command failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    agent_end_check(&s, &prim, rec)
}

/// After a failover or failback both copies hold the same; the newest point verifies.
fn agent_end_check(
    s: &AgentSites,
    prim: &std::path::Path,
    rec: Option<std::path::PathBuf>,
) -> Result<(), String> {
    let st = s.f.status("app");
    let both = [
        "failover_commit_pending",
        "failed_over",
        "failback_commit_pending",
    ];
    if both.iter().any(|b| st["state"] == *b) {
        let rec = rec.unwrap_or_else(|| s.f.disk_paths("app", "r1")[0].clone());
        if std::fs::read(prim).unwrap() != std::fs::read(&rec).unwrap() {
            return Err(format!("the copies differ after the command ({st})"));
        }
    }
    let ver = s.f.json(&["verify", "app"]);
    if ver["ok"] != true {
        return Err(format!("the newest point does not verify: {ver}"));
    }
    Ok(())
}

/// One server case: the control plane killed at `point` while its agent hosts work, started
/// again (same address, its jobs left to the re-run), and the command run again.
fn server_case(c: &AgentCase, point: &str) -> Result<(), String> {
    let Some(s) = AgentSites::start(None) else {
        return Ok(());
    };
    let (prim, rec) = (c.prepare)(&s);
    let (url, _) = s.f.server_url().unwrap();
    let listen = url.trim_start_matches("http://").to_string();
    let restart = |env: &[(&str, &str)], more: &[&str]| {
        let mut args = vec!["--agent-timeout", "3s", "--listen", &listen];
        args.extend_from_slice(more);
        s.f.start_server_with(env, &args);
        for h in ["h1", "r1"] {
            wait_agent(&s.f, h, true);
        }
    };
    restart(&[("FERRY_FAULT", point)], &[]);
    let out = s.f.run(c.command);
    let t = Instant::now();
    while s.f.server_alive() {
        if t.elapsed() > Duration::from_secs(30) {
            return Err(format!(
                "the server did not die at the point (the command ended with {:?})",
                out.status
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    restart(&[], &["--no-resume"]);
    let again = s.f.run(c.command);
    if !again.status.success() {
        return Err(format!(
            "the re-run failed: {}",
            String::from_utf8_lossy(&again.stderr)
        ));
    }
    agent_end_check(&s, &prim, rec)
}

#[test]
fn every_fault_point_survives_a_killed_control_plane_with_agent_hosts() {
    if !can_unshare() {
        return;
    }
    // Every point but the `mid` ones, which fire inside agents (see the test above); plans
    // run the same jobs.
    let cases: Vec<(&AgentCase, String)> = crate::matrix::fault_points()
        .into_iter()
        .filter(|(w, p)| !p.ends_with("/mid") && !w.starts_with("plan-"))
        .map(|(w, p)| {
            let c = AGENT_CASES
                .iter()
                .find(|c| c.workflow == w)
                .unwrap_or_else(|| panic!("workflow {w} has no agent case"));
            (c, p)
        })
        .collect();
    let queue = std::sync::Mutex::new(cases.clone());
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|sc| {
        for _ in 0..3 {
            sc.spawn(|| loop {
                let Some((c, point)) = queue.lock().unwrap().pop() else {
                    break;
                };
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    server_case(c, &point)
                }))
                .unwrap_or_else(|_| Err("panicked".into()));
                if let Err(e) = r {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{} at {point}: {e}", c.workflow));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    println!(
        "control-plane fault points covered with agents: {} of {}",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_data_step_survives_its_agent_killed_after_the_first_durable_batch() {
    if !can_unshare() {
        return;
    }
    // The data steps' `mid` points, from the code; plans run the same jobs (the server's
    // matrix covers them), commits move no data.
    let listed = crate::matrix::fault_points();
    let cases: Vec<(&AgentCase, String)> = listed
        .into_iter()
        .filter(|(w, p)| p.ends_with("/mid") && !w.starts_with("plan-"))
        .map(|(w, p)| {
            let c = AGENT_CASES
                .iter()
                .find(|c| c.workflow == w)
                .unwrap_or_else(|| panic!("workflow {w} has data steps but no agent case"));
            (c, p)
        })
        .collect();
    let mut failures = Vec::new();
    for (c, point) in &cases {
        if let Err(e) = agent_case(c, point) {
            failures.push(format!("{} at {point}: {e}", c.workflow));
        }
    }
    println!(
        "agent fault points covered: {} of {}",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn a_failback_through_agents_can_create_the_vm_on_another_primary_host() {
    let Some(mut s) = AgentSites::start(None) else {
        return;
    };
    // A second primary host, served by its own agent.
    s.f.ok(&[
        "host", "add", "h2", "--site", "prim", "--driver", "dir", "--switch", "lan", "--agent",
    ]);
    let token = s.f.json(&[
        "token", "new", "h2-agent", "--role", "agent", "--host", "h2",
    ])["token"]
        .as_str()
        .unwrap()
        .to_string();
    let root = tempfile::tempdir().unwrap();
    let child = start_agent(&s.f, "h2", &token, root.path());
    s.agents.push((
        "h2".into(),
        token,
        root.path().canonicalize().unwrap(),
        child,
    ));
    s._roots.push(root);
    wait_agent(&s.f, "h2", true);

    let (_, rec) = s.failed_over("6MiB", 4 * MIB, 751);
    write_random(&rec[0], MIB, 256 * KIB, 752);
    let job = s.f.json(&[
        "failback",
        "app",
        "--host",
        "h2",
        "--create-vm",
        "--auto-complete",
    ]);
    assert_job_state(&job, "succeeded");
    let on_h2 = s.f.disk_paths("app", "h2");
    assert!(on_h2[0].starts_with(s.root("h2")), "{on_h2:?}");
    assert_all_identical(&on_h2, &rec);
    assert_eq!(s.f.power("app", Some("h2")), "running");
    // A new disk holds nothing yet: every non-zero block of it crossed the sites once.
    assert!(job_u64(&job, "bytes_written") >= 4 * MIB, "{job}");
}
