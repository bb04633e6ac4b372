//! `ferry agent`: runs on a hypervisor host's own machine and does that host's work for a
//! `ferry serve` control plane. It connects out to the server (the server never reaches the
//! host), registers and heartbeats, long-polls for tasks and runs them on its local driver
//! (`dir` or `qemu`) over its `--root`. It reconnects by itself when the server restarts.
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ferry_api::client::{segment, Client};
use ferry_api::{AgentHello, AgentOp, AgentResult, AgentTask, AgentWelcome, ErrorKind};
use ferry_hypervisor::{Hypervisor, VmSpec};
use ferry_model::{DriverKind, Host};

/// How often an agent says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// What `ferry agent` runs with.
#[derive(Debug, Clone)]
pub struct AgentOpts {
    /// The control plane's URL.
    pub server: String,
    /// An agent token for `host`.
    pub token: String,
    /// The host this agent serves.
    pub host: String,
    /// Folder of the host's VMs on this machine.
    pub root: PathBuf,
    /// The driver of the host.
    pub driver: DriverKind,
    /// The encryption key of VMs whose data this agent moves (stays on this machine).
    pub key: Option<PathBuf>,
    /// Certificate to trust for an https:// server (PEM).
    pub ca_cert: Option<PathBuf>,
}

fn hello(o: &AgentOpts) -> AgentHello {
    AgentHello {
        host: o.host.clone(),
        version: env!("CARGO_PKG_VERSION").into(),
        driver: o.driver,
        root: o.root.display().to_string(),
    }
}

/// Runs the agent until the process is stopped. Fails at once when the server refuses it
/// (wrong token, unknown host, other driver); waits and retries while it cannot be reached.
pub fn run(o: AgentOpts) -> Result<()> {
    std::fs::create_dir_all(&o.root)
        .with_context(|| format!("cannot create the agent's root {}", o.root.display()))?;
    let root = std::fs::canonicalize(&o.root)?;
    let o = AgentOpts { root, ..o };
    if let Some(k) = &o.key {
        let key = ferry_store::crypto::Key::load(k)?;
        tracing::info!("agent: key {} loaded from {}", key.id(), k.display());
    }
    let client = Client::with_ca(&o.server, Some(o.token.clone()), o.ca_cert.as_deref())?;
    let welcome = loop {
        match client.post::<_, AgentWelcome>("/v1/agent/heartbeat", &hello(&o)) {
            Ok(w) => break w,
            Err(e) if e.kind == ErrorKind::Unreachable => {
                tracing::warn!("agent: {e}; retrying");
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => bail!("the control plane refused this agent: {e}"),
        }
    };
    println!(
        "agent of host {} (site {}, {} driver, root {}) connected to {}",
        o.host,
        welcome.host.site,
        o.driver.as_str(),
        o.root.display(),
        client.url()
    );
    std::io::stdout().flush().ok();
    {
        let (client, o) = (client.clone(), o.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(HEARTBEAT);
            if let Err(e) = client.post::<_, AgentWelcome>("/v1/agent/heartbeat", &hello(&o)) {
                tracing::warn!("agent: heartbeat: {e}");
            }
        });
    }
    let path = format!("/v1/agent/tasks?host={}", segment(&o.host));
    loop {
        match client.get_opt::<AgentTask>(&path, Duration::from_secs(60)) {
            Ok(Some(task)) => {
                let (client, o) = (client.clone(), o.clone());
                std::thread::spawn(move || {
                    let id = task.id;
                    let r = run_task(&o, task);
                    let path = format!("/v1/agent/tasks/{id}?host={}", segment(&o.host));
                    if let Err(e) = client.post::<_, serde_json::Value>(&path, &r) {
                        tracing::warn!("agent: answering task {id}: {e}");
                    }
                });
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("agent: waiting for work: {e}");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Runs one task on this machine: the host record from the control plane, with this agent's
/// root, on the local driver.
pub fn run_task(o: &AgentOpts, task: AgentTask) -> AgentResult {
    let host = Host {
        root: o.root.clone(),
        agent: false,
        ..task.host
    };
    match ferry_hypervisor::connect(&host) {
        Ok(d) => execute(d.as_ref(), &task.op),
        Err(e) => AgentResult {
            ok: None,
            error: Some(e.to_string()),
        },
    }
}

/// Runs one task on this machine's driver (the agent's side of [`AgentDriver`]).
pub fn execute(driver: &dyn Hypervisor, op: &AgentOp) -> AgentResult {
    fn ok<T: serde::Serialize>(r: ferry_hypervisor::Result<T>) -> AgentResult {
        match r {
            Ok(v) => AgentResult {
                ok: Some(serde_json::to_value(v).unwrap_or(serde_json::Value::Null)),
                error: None,
            },
            Err(e) => AgentResult {
                ok: None,
                error: Some(e.to_string()),
            },
        }
    }
    match op {
        AgentOp::CheckConnected => ok(driver.check_connected()),
        AgentOp::ListVms => ok(driver.list_vms()),
        AgentOp::GetVm { name } => ok(driver.get_vm(name)),
        AgentOp::CreateVm {
            name,
            cpus,
            memory,
            disks,
            nics,
        } => ok(driver
            .check_spec(&VmSpec {
                name: name.clone(),
                cpus: *cpus,
                memory: *memory,
                disks: disks.clone(),
                nics: nics.clone(),
            })
            .and_then(|_| {
                driver.create_vm(&VmSpec {
                    name: name.clone(),
                    cpus: *cpus,
                    memory: *memory,
                    disks: disks.clone(),
                    nics: nics.clone(),
                })
            })),
        AgentOp::DeleteVm { name } => ok(driver.delete_vm(name)),
        AgentOp::StartVm { name } => ok(driver.start_vm(name)),
        AgentOp::StopVm { name } => ok(driver.stop_vm(name)),
        AgentOp::SetDiskConsistent {
            name,
            index,
            consistent,
        } => ok(driver.set_disk_consistent(name, *index, *consistent)),
        AgentOp::DiskStamp { name, index } => ok(driver.disk_stamp(name, *index)),
        AgentOp::MarkDisks { name } => ok(driver.mark_disks(name)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tasks_run_on_the_local_driver_under_the_agents_root() {
        let dir = tempfile::tempdir().unwrap();
        let o = AgentOpts {
            server: "http://127.0.0.1:9".into(),
            token: "t".into(),
            host: "a1".into(),
            root: dir.path().into(),
            driver: DriverKind::Dir,
            key: None,
            ca_cert: None,
        };
        let host = Host {
            name: "a1".into(),
            site: "p".into(),
            driver: DriverKind::Dir,
            root: PathBuf::new(),
            switches: vec!["lan".into()],
            accel: None,
            agent: true,
        };
        let task = |op| AgentTask {
            id: 1,
            host: host.clone(),
            op,
        };
        let r = run_task(
            &o,
            task(AgentOp::CreateVm {
                name: "web".into(),
                cpus: 1,
                memory: 1 << 20,
                disks: vec![1 << 20],
                nics: vec!["lan".into()],
            }),
        );
        assert_eq!(r.error, None);
        assert!(dir.path().join("web").join("vm.json").is_file());
        let r = run_task(
            &o,
            task(AgentOp::CreateVm {
                name: "db".into(),
                cpus: 1,
                memory: 1 << 20,
                disks: vec![1 << 20],
                nics: vec!["wan".into()],
            }),
        );
        assert!(r.error.unwrap().contains("no switch named \"wan\""));
        let r = run_task(&o, task(AgentOp::ListVms));
        let vms: Vec<ferry_hypervisor::VmInfo> = serde_json::from_value(r.ok.unwrap()).unwrap();
        assert_eq!(vms.len(), 1);
        let r = run_task(
            &o,
            task(AgentOp::StartVm {
                name: "nope".into(),
            }),
        );
        assert!(r.error.unwrap().contains("nope"));
    }
}
