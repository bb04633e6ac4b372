//! Agent hosts: the [`Hub`] that hands work to each host's `ferry agent` (which long-polls
//! for it) and takes back the results, and [`AgentDriver`], the [`Hypervisor`] of an agent
//! host, which forwards each call to its agent. The control plane reaches no host itself:
//! agents connect to it, so neither site ever needs to reach the other.
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_api::{AgentOp, AgentResult, AgentTask, AgentView};
use ferry_blocks::{BlockDevice, DiskStamp};
use ferry_hypervisor::{ChangeMark, DiskView, HvError, Hypervisor, VmInfo, VmSpec};
use ferry_model::Host;
use serde::de::DeserializeOwned;

/// Default time without a heartbeat after which an agent host counts as disconnected.
pub const AGENT_TIMEOUT: Duration = Duration::from_secs(15);
/// How long an agent's task request waits for work before it asks again.
pub const POLL_WAIT: Duration = Duration::from_secs(20);
/// How long a call waits for its agent's answer.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64
}

/// Work waiting for agents and callers waiting for their answers.
pub struct Hub {
    inner: Mutex<Inner>,
    wake: tokio::sync::Notify,
    /// The server's home (agents' heartbeats are in its vault).
    pub home: PathBuf,
    /// Missed-heartbeat limit.
    pub timeout: Duration,
}

#[derive(Default)]
struct Inner {
    next: u64,
    queues: HashMap<String, VecDeque<AgentTask>>,
    waiting: HashMap<u64, (String, mpsc::Sender<AgentResult>)>,
}

impl Hub {
    /// A hub over the installation at `home`.
    pub fn new(home: PathBuf, timeout: Duration) -> Self {
        Hub {
            inner: Mutex::default(),
            wake: tokio::sync::Notify::new(),
            home,
            timeout,
        }
    }

    /// The connection of agent host `host` as the API shows it.
    pub fn view(&self, host: &str) -> AgentView {
        let a = ferry_vault::Vault::open(&self.home)
            .ok()
            .and_then(|v| v.agent(host).ok().flatten());
        AgentView {
            connected: a
                .as_ref()
                .is_some_and(|a| now() - a.last_seen <= self.timeout.as_secs() as i64),
            last_seen: a.as_ref().map(|a| ferry_model::rfc3339(a.last_seen)),
            version: a.map(|a| a.version),
        }
    }

    /// Fails with [`HvError::Disconnected`] unless `host`'s agent sent a heartbeat lately.
    pub fn check(&self, host: &str) -> Result<(), HvError> {
        let a = ferry_vault::Vault::open(&self.home)
            .map_err(|e| HvError::Invalid(e.to_string()))?
            .agent(host)
            .map_err(|e| HvError::Invalid(e.to_string()))?;
        let seen = match a {
            None => "has never connected".to_string(),
            Some(a) if now() - a.last_seen <= self.timeout.as_secs() as i64 => return Ok(()),
            Some(a) => format!(
                "was last seen at {} ({} s ago)",
                ferry_model::rfc3339(a.last_seen),
                now() - a.last_seen
            ),
        };
        Err(HvError::Disconnected {
            host: host.into(),
            seen,
        })
    }

    /// Hands `op` to the agent of `host` and waits for its answer (blocking).
    pub fn call(&self, host: &Host, op: AgentOp) -> Result<serde_json::Value, HvError> {
        self.check(&host.name)?;
        let (tx, rx) = mpsc::channel();
        let id = {
            let mut g = self.inner.lock().unwrap();
            g.next += 1;
            let id = g.next;
            g.waiting.insert(id, (host.name.clone(), tx));
            g.queues
                .entry(host.name.clone())
                .or_default()
                .push_back(AgentTask {
                    id,
                    host: host.clone(),
                    op,
                });
            id
        };
        self.wake.notify_waiters();
        let r = rx.recv_timeout(CALL_TIMEOUT);
        let mut g = self.inner.lock().unwrap();
        g.waiting.remove(&id);
        if let Some(q) = g.queues.get_mut(&host.name) {
            q.retain(|t| t.id != id);
        }
        drop(g);
        match r {
            Ok(AgentResult { error: Some(e), .. }) => Err(HvError::Invalid(e)),
            Ok(AgentResult { ok, .. }) => Ok(ok.unwrap_or(serde_json::Value::Null)),
            Err(_) => Err(HvError::Disconnected {
                host: host.name.clone(),
                seen: format!("did not answer within {} s", CALL_TIMEOUT.as_secs()),
            }),
        }
    }

    /// The next task for `host`, waiting up to [`POLL_WAIT`] for one.
    pub async fn next_task(&self, host: &str) -> Option<AgentTask> {
        let deadline = tokio::time::Instant::now() + POLL_WAIT;
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if let Some(t) = self
                .inner
                .lock()
                .unwrap()
                .queues
                .get_mut(host)
                .and_then(|q| q.pop_front())
            {
                return Some(t);
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return None;
            }
        }
    }

    /// Delivers the answer of `host`'s agent to the caller waiting for task `id` (false:
    /// nobody waits, or the task was another host's).
    pub fn resolve(&self, id: u64, host: &str, r: AgentResult) -> bool {
        let mut g = self.inner.lock().unwrap();
        match g.waiting.get(&id) {
            Some((h, _)) if h == host => {}
            _ => return false,
        }
        let (_, tx) = g.waiting.remove(&id).expect("checked");
        tx.send(r).is_ok()
    }
}

/// The [`Hypervisor`] of an agent host: every call goes to its agent.
pub struct AgentDriver {
    host: Host,
    hub: Arc<Hub>,
}

impl AgentDriver {
    fn call<T: DeserializeOwned>(&self, op: AgentOp) -> Result<T, HvError> {
        let v = self.hub.call(&self.host, op)?;
        serde_json::from_value(v).map_err(|e| {
            HvError::Invalid(format!(
                "host {}: its agent answered in a form this control plane cannot read ({e}); run the same ferry version on both",
                self.host.name
            ))
        })
    }

    fn data_path(&self) -> HvError {
        HvError::Invalid(format!(
            "host {} is served by an agent, and moving disk data through agents (replication, failover, failback) is not available in this version yet; see docs/agents.md",
            self.host.name
        ))
    }
}

impl Hypervisor for AgentDriver {
    fn host(&self) -> &Host {
        &self.host
    }
    fn check_connected(&self) -> ferry_hypervisor::Result<()> {
        self.hub.check(&self.host.name)
    }
    fn list_vms(&self) -> ferry_hypervisor::Result<Vec<VmInfo>> {
        self.call(AgentOp::ListVms)
    }
    fn get_vm(&self, name: &str) -> ferry_hypervisor::Result<Option<VmInfo>> {
        self.call(AgentOp::GetVm { name: name.into() })
    }
    fn create_vm(&self, spec: &VmSpec) -> ferry_hypervisor::Result<VmInfo> {
        self.call(AgentOp::CreateVm {
            name: spec.name.clone(),
            cpus: spec.cpus,
            memory: spec.memory,
            disks: spec.disks.clone(),
            nics: spec.nics.clone(),
        })
    }
    fn delete_vm(&self, name: &str) -> ferry_hypervisor::Result<()> {
        self.call(AgentOp::DeleteVm { name: name.into() })
    }
    fn start_vm(&self, name: &str) -> ferry_hypervisor::Result<()> {
        self.call(AgentOp::StartVm { name: name.into() })
    }
    fn stop_vm(&self, name: &str) -> ferry_hypervisor::Result<()> {
        self.call(AgentOp::StopVm { name: name.into() })
    }
    fn open_disk(
        &self,
        _name: &str,
        _index: u32,
        _writable: bool,
    ) -> ferry_hypervisor::Result<Box<dyn BlockDevice>> {
        Err(self.data_path())
    }
    fn set_disk_consistent(
        &self,
        name: &str,
        index: u32,
        consistent: bool,
    ) -> ferry_hypervisor::Result<()> {
        self.call(AgentOp::SetDiskConsistent {
            name: name.into(),
            index,
            consistent,
        })
    }
    fn disk_stamp(&self, name: &str, index: u32) -> ferry_hypervisor::Result<Option<DiskStamp>> {
        self.call(AgentOp::DiskStamp {
            name: name.into(),
            index,
        })
    }
    fn mark_disks(&self, vm: &str) -> ferry_hypervisor::Result<Vec<Option<ChangeMark>>> {
        self.call(AgentOp::MarkDisks { name: vm.into() })
    }
    fn open_view(
        &self,
        _vm: &str,
        _since: &[Option<ChangeMark>],
    ) -> ferry_hypervisor::Result<DiskView> {
        Err(self.data_path())
    }
    fn peek_view(
        &self,
        _vm: &str,
        _since: &[Option<ChangeMark>],
    ) -> ferry_hypervisor::Result<DiskView> {
        Err(self.data_path())
    }
}

/// How the engine reaches agent hosts in `ferry serve`: through the hub.
pub struct Remote(pub Arc<Hub>);

impl ferry_engine::RemoteHosts for Remote {
    fn driver(&self, host: &Host) -> anyhow::Result<Box<dyn Hypervisor>> {
        Ok(Box::new(AgentDriver {
            host: host.clone(),
            hub: self.0.clone(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            name: "a1".into(),
            site: "p".into(),
            driver: ferry_model::DriverKind::Dir,
            root: PathBuf::new(),
            switches: vec!["lan".into()],
            accel: None,
            agent: true,
        }
    }

    #[test]
    fn a_host_whose_agent_never_connected_is_refused_with_its_name() {
        let dir = tempfile::tempdir().unwrap();
        ferry_vault::Vault::create(dir.path()).unwrap();
        let hub = Hub::new(dir.path().into(), AGENT_TIMEOUT);
        let e = hub.call(&host(), AgentOp::ListVms).unwrap_err().to_string();
        assert!(e.contains("host a1 is not connected"), "{e}");
        assert!(e.contains("never connected"), "{e}");
    }

    #[test]
    fn tasks_reach_the_polling_agent_and_answers_reach_the_caller() {
        let dir = tempfile::tempdir().unwrap();
        let v = ferry_vault::Vault::create(dir.path()).unwrap();
        v.agent_seen(
            "a1",
            &ferry_vault::AgentInfo {
                last_seen: now(),
                version: "t".into(),
                driver: "dir".into(),
                root: "/r".into(),
            },
        )
        .unwrap();
        let hub = Arc::new(Hub::new(dir.path().into(), AGENT_TIMEOUT));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let h2 = hub.clone();
        let caller =
            std::thread::spawn(move || h2.call(&host(), AgentOp::GetVm { name: "x".into() }));
        let task = rt.block_on(hub.next_task("a1")).expect("a task");
        assert_eq!(task.op, AgentOp::GetVm { name: "x".into() });
        assert!(!hub.resolve(
            task.id,
            "other",
            AgentResult {
                ok: None,
                error: None
            }
        ));
        assert!(hub.resolve(
            task.id,
            "a1",
            AgentResult {
                ok: None,
                error: Some("VM x does not exist on host a1".into())
            }
        ));
        let e = caller.join().unwrap().unwrap_err().to_string();
        assert_eq!(e, "VM x does not exist on host a1");
        assert!(!hub.resolve(
            task.id,
            "a1",
            AgentResult {
                ok: None,
                error: None
            }
        ));
    }
}
