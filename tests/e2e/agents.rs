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
    let (url, _) = f.server_url().unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs '{home}' && exec '{bin}' agent --server '{url}' --token '{token}' --host {host} --root '{root}'",
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
    // Moving disk data through agents is not there yet: refused before anything changes.
    let err = f.fail(&["protect", "web", "--to", "dr"]);
    assert!(err.contains("not available in this version"), "{err}");
    assert_eq!(f.state("web"), "unprotected");

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
