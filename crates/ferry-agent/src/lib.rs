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

/// How often an agent says it is alive (more often when the control plane's timeout is short).
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
        session: Some(session().into()),
    }
}

/// This process's session id: a restarted agent is a new session, to which the control
/// plane hands again the tasks the old process took and never answered.
fn session() -> &'static str {
    static S: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    S.get_or_init(|| {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        format!("{}-{t:x}", std::process::id())
    })
}

/// How often a running data operation reports its progress.
pub const PROGRESS: Duration = Duration::from_secs(1);

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
        // Three heartbeats within the control plane's timeout: one lost request never
        // disconnects the host.
        let every = HEARTBEAT
            .min(Duration::from_millis(
                welcome.timeout_s.saturating_mul(1000) / 3,
            ))
            .max(Duration::from_millis(200));
        let (client, o) = (client.clone(), o.clone());
        std::thread::spawn(move || loop {
            std::thread::sleep(every);
            if let Err(e) = client.post::<_, AgentWelcome>("/v1/agent/heartbeat", &hello(&o)) {
                tracing::warn!("agent: heartbeat: {e}");
            }
        });
    }
    let path = format!("/v1/agent/tasks?host={}", segment(&o.host));
    loop {
        match client.get_opt::<AgentTask>(&path, Duration::from_secs(60)) {
            Ok(Some(task)) => {
                tracing::debug!("agent: task {} received", task.id);
                let (client, o) = (client.clone(), o.clone());
                std::thread::spawn(move || {
                    let id = task.id;
                    let r = match &task.op {
                        AgentOp::Data { .. } => run_data(&o, &client, task),
                        _ => run_task(&o, task),
                    };
                    let path = format!("/v1/agent/tasks/{id}?host={}", segment(&o.host));
                    if let Err(e) = client.post::<_, serde_json::Value>(&path, &r) {
                        tracing::warn!("agent: answering task {id}: {e}");
                    }
                    tracing::debug!("agent: task {id} answered");
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

/// VMs whose data an operation of this process is moving (one operation per VM at a time:
/// a task handed out again after a control-plane restart waits for the old one to stop).
static BUSY: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
static FREED: std::sync::Condvar = std::sync::Condvar::new();

/// Runs a data operation (capture, apply, restore, scan) on this machine, reporting progress
/// to the control plane every second and stopping when it says so.
pub fn run_data(o: &AgentOpts, client: &Client, task: AgentTask) -> AgentResult {
    let fail = |e: String| AgentResult {
        ok: None,
        error: Some(e),
    };
    let AgentOp::Data {
        request,
        threads,
        bandwidth,
        mid_point,
    } = &task.op
    else {
        return fail("internal: not a data operation".into());
    };
    let _span = tracing::debug_span!("agent_data", task = task.id).entered();
    let req: ferry_engine::data::DataReq = match serde_json::from_value(request.clone()) {
        Ok(r) => r,
        Err(e) => {
            return fail(format!(
                "host {}: this agent cannot read the control plane's request ({e}); run the same ferry version on both",
                o.host
            ))
        }
    };
    let vm = req.vm().to_string();
    let ctx = ferry_engine::JobCtx::new(*threads, *bandwidth);
    ctx.arm_mid_point(mid_point.clone());
    let counters = |ctx: &ferry_engine::JobCtx| {
        let (read, transferred, written, step_done) = ctx.counters();
        ferry_api::AgentCounters {
            read,
            transferred,
            written,
            step_done,
        }
    };
    {
        let mut busy = BUSY.lock().unwrap();
        while busy.contains(&vm) {
            busy = FREED.wait(busy).unwrap();
        }
        busy.push(vm.clone());
    }
    // Dropped when the operation ends: wakes the progress reporter at once.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let notes = std::sync::Mutex::new(Vec::<String>::new());
    let host = Host {
        root: o.root.clone(),
        agent: false,
        ..task.host.clone()
    };
    let r = std::thread::scope(|s| {
        s.spawn(|| {
            let done_rx = done_rx; // moved in: a Receiver is not shared between threads
            let path = format!(
                "/v1/agent/tasks/{}/progress?host={}",
                task.id,
                segment(&o.host)
            );
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                done_rx.recv_timeout(PROGRESS)
            {
                match client.post::<_, ferry_api::AgentProgressReply>(&path, &counters(&ctx)) {
                    Ok(r) if r.cancel => {
                        tracing::info!("agent: task {} stopped by the control plane", task.id);
                        ctx.cancel();
                    }
                    Err(e) if e.kind != ErrorKind::Unreachable => {
                        tracing::info!("agent: task {}: {e}; stopping it", task.id);
                        ctx.cancel();
                    }
                    _ => {}
                }
            }
        });
        let r = (|| -> Result<serde_json::Value> {
            let key = o
                .key
                .as_deref()
                .map(ferry_store::crypto::Key::load)
                .transpose()?;
            let driver = ferry_hypervisor::connect(&host)?;
            let note = |m: String| notes.lock().unwrap().push(m);
            let env = ferry_engine::data::Env {
                ctx: &ctx,
                note: &note,
                driver: driver.as_ref(),
                journals: o.root.join(".ferry").join("journal"),
            };
            ferry_engine::data::run(&env, key.as_ref(), &req)
        })();
        drop(done_tx);
        r
    });
    {
        let mut busy = BUSY.lock().unwrap();
        busy.retain(|v| *v != vm);
        FREED.notify_all();
    }
    match r {
        Ok(out) => {
            let reply = ferry_api::AgentDataReply {
                out,
                notes: notes.into_inner().unwrap(),
                counters: counters(&ctx),
            };
            AgentResult {
                ok: Some(serde_json::to_value(reply).unwrap_or_default()),
                error: None,
            }
        }
        Err(e) => fail(format!("{e:#}")),
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
            image,
        } => {
            let spec = VmSpec {
                name: name.clone(),
                cpus: *cpus,
                memory: *memory,
                disks: disks.clone(),
                nics: nics.clone(),
                image: image.clone(),
            };
            ok(driver
                .check_spec(&spec)
                .and_then(|_| driver.create_vm(&spec)))
        }
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
        AgentOp::Data { .. } => AgentResult {
            ok: None,
            error: Some("internal: data operations run through run_data".into()),
        },
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
                image: None,
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
                image: None,
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
