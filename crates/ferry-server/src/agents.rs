//! Agent hosts: the [`Hub`] that hands work to each host's `ferry agent` (which long-polls
//! for it) and takes back the results, and [`AgentDriver`], the [`Hypervisor`] of an agent
//! host, which forwards each call to its agent. The control plane reaches no host itself:
//! agents connect to it, so neither site ever needs to reach the other.
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferry_api::{
    AgentCounters, AgentDataReply, AgentOp, AgentProgressReply, AgentResult, AgentTask, AgentView,
};
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

/// What reaches a caller waiting for its task.
enum Msg {
    Progress(AgentCounters),
    /// The agent restarted and was handed the task again: its counters start over.
    Restarted,
    Done(AgentResult),
}

#[derive(Default)]
struct Inner {
    next: u64,
    queues: HashMap<String, VecDeque<AgentTask>>,
    waiting: HashMap<u64, (String, mpsc::Sender<Msg>)>,
    /// Tasks an agent took and has not answered yet.
    taken: HashMap<u64, AgentTask>,
    /// Each agent host's current process.
    sessions: HashMap<String, String>,
    /// Tasks whose caller asked them to stop.
    cancelled: HashSet<u64>,
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

    /// Queues `op` for `host`'s agent; the receiver gets its progress and answer.
    fn submit(&self, host: &Host, op: AgentOp) -> (u64, mpsc::Receiver<Msg>) {
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
        (id, rx)
    }

    /// Forgets task `id` (answered, or given up).
    fn forget(&self, id: u64, host: &str) {
        let mut g = self.inner.lock().unwrap();
        g.waiting.remove(&id);
        g.taken.remove(&id);
        g.cancelled.remove(&id);
        if let Some(q) = g.queues.get_mut(host) {
            q.retain(|t| t.id != id);
        }
    }

    fn answer(r: AgentResult) -> Result<serde_json::Value, HvError> {
        match r {
            AgentResult { error: Some(e), .. } => Err(HvError::Invalid(e)),
            AgentResult { ok, .. } => Ok(ok.unwrap_or(serde_json::Value::Null)),
        }
    }

    /// Hands `op` to the agent of `host` and waits for its answer (blocking, at most
    /// [`CALL_TIMEOUT`]).
    pub fn call(&self, host: &Host, op: AgentOp) -> Result<serde_json::Value, HvError> {
        self.check(&host.name)?;
        let (id, rx) = self.submit(host, op);
        let deadline = std::time::Instant::now() + CALL_TIMEOUT;
        let r = loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match rx.recv_timeout(left) {
                Ok(Msg::Progress(_) | Msg::Restarted) => continue,
                Ok(Msg::Done(r)) => break Some(r),
                Err(_) => break None,
            }
        };
        self.forget(id, &host.name);
        match r {
            Some(r) => Self::answer(r),
            None => Err(HvError::Disconnected {
                host: host.name.clone(),
                seen: format!("did not answer within {} s", CALL_TIMEOUT.as_secs()),
            }),
        }
    }

    /// Hands a long-running `op` (a data operation) to `host`'s agent and waits for its
    /// answer as long as it takes: progress goes to `progress`; while the agent is away the
    /// call says so through `note` and waits for it to come back (a restarted agent is handed
    /// the task again, and `restarted` runs); `cancelled` stops the wait (and the agent's work). `Ok(None)`: cancelled.
    pub fn call_long(
        &self,
        host: &Host,
        op: AgentOp,
        progress: &mut dyn FnMut(AgentCounters),
        restarted: &mut dyn FnMut(),
        cancelled: &dyn Fn() -> bool,
        note: &dyn Fn(String),
    ) -> Result<Option<serde_json::Value>, HvError> {
        self.check(&host.name)?;
        let (id, rx) = self.submit(host, op);
        let mut away = false;
        let r = loop {
            match rx.recv_timeout(Duration::from_secs(1)) {
                Ok(Msg::Progress(c)) => progress(c),
                Ok(Msg::Restarted) => {
                    restarted();
                    note(format!(
                        "the agent of host {} restarted; it continues the work where its journal says it stopped",
                        host.name
                    ));
                }
                Ok(Msg::Done(r)) => break Some(r),
                Err(mpsc::RecvTimeoutError::Disconnected) => break None,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let gone = self.check(&host.name);
                    if cancelled() {
                        self.inner.lock().unwrap().cancelled.insert(id);
                        if gone.is_err() {
                            break None;
                        }
                    }
                    match gone {
                        Err(e) if !away => {
                            away = true;
                            note(format!("waiting for agent {}: {e}", host.name));
                        }
                        Ok(()) if away => {
                            away = false;
                            note(format!("agent {} is back; continuing", host.name));
                        }
                        _ => {}
                    }
                }
            }
        };
        self.forget(id, &host.name);
        match r {
            Some(r) => Self::answer(r).map(Some),
            None => Ok(None),
        }
    }

    /// Records a heartbeat of `host`'s agent process `session`: when it is a new process,
    /// the tasks the old one took and never answered are handed out again.
    pub fn heartbeat(&self, host: &str, session: Option<&str>) {
        let Some(session) = session else { return };
        let mut g = self.inner.lock().unwrap();
        let old = g.sessions.insert(host.into(), session.into());
        if old.is_none() || old.as_deref() == Some(session) {
            return;
        }
        let mut lost: Vec<AgentTask> = g
            .taken
            .values()
            .filter(|t| t.host.name == host)
            .cloned()
            .collect();
        lost.sort_by_key(|t| t.id);
        for t in &lost {
            g.taken.remove(&t.id);
            if let Some((_, tx)) = g.waiting.get(&t.id) {
                let _ = tx.send(Msg::Restarted);
            }
        }
        let q = g.queues.entry(host.into()).or_default();
        for t in lost.into_iter().rev() {
            tracing::info!(
                "agent of host {host} restarted: handing task {} to it again",
                t.id
            );
            q.push_front(t);
        }
        drop(g);
        self.wake.notify_waiters();
    }

    /// A progress report of `host`'s agent for task `id`: whether it should stop (also when
    /// nobody waits for the task any more, e.g. after the control plane restarted).
    pub fn progress(&self, id: u64, host: &str, c: AgentCounters) -> AgentProgressReply {
        let g = self.inner.lock().unwrap();
        match g.waiting.get(&id) {
            Some((h, tx)) if h == host => {
                let _ = tx.send(Msg::Progress(c));
                AgentProgressReply {
                    cancel: g.cancelled.contains(&id),
                }
            }
            _ => AgentProgressReply { cancel: true },
        }
    }

    /// The next task for `host`, waiting up to [`POLL_WAIT`] for one.
    pub async fn next_task(&self, host: &str) -> Option<AgentTask> {
        let deadline = tokio::time::Instant::now() + POLL_WAIT;
        loop {
            let woken = self.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            {
                let mut g = self.inner.lock().unwrap();
                if let Some(t) = g.queues.get_mut(host).and_then(|q| q.pop_front()) {
                    g.taken.insert(t.id, t.clone());
                    return Some(t);
                }
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
        g.taken.remove(&id);
        tx.send(Msg::Done(r)).is_ok()
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

    /// Disk I/O of an agent host never passes through the control plane: the engine sends
    /// it to the agent as a data operation (see `RemoteHosts::data`).
    fn data_path(&self) -> HvError {
        HvError::Invalid(format!(
            "internal: the disks of host {} are read and written by its agent (a data operation), never through the control plane",
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
            image: spec.image.clone(),
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

    fn data(
        &self,
        host: &Host,
        req: &ferry_engine::data::DataReq,
        ctx: &ferry_engine::JobCtx,
        note: &(dyn Fn(String) + Sync),
    ) -> anyhow::Result<serde_json::Value> {
        let _span = tracing::debug_span!("agent_data_call", host = %host.name).entered();
        let op = AgentOp::Data {
            request: serde_json::to_value(req)?,
            threads: ctx.threads,
            bandwidth: ctx.bandwidth(),
            mid_point: ctx.mid_point(),
        };
        // Agents report totals; the job counts what is new since the last report.
        let seen = std::cell::Cell::new(AgentCounters::default());
        let count = |c: AgentCounters| {
            let s = seen.get();
            ctx.add_remote(
                c.read.saturating_sub(s.read),
                c.transferred.saturating_sub(s.transferred),
                c.written.saturating_sub(s.written),
                c.step_done.saturating_sub(s.step_done),
            );
            seen.set(AgentCounters {
                read: s.read.max(c.read),
                transferred: s.transferred.max(c.transferred),
                written: s.written.max(c.written),
                step_done: s.step_done.max(c.step_done),
            });
        };
        let wait = tracing::debug_span!("agent_wait").entered();
        let r = self.0.call_long(
            host,
            op,
            &mut |c| count(c),
            &mut || seen.set(AgentCounters::default()),
            &|| ctx.is_cancelled(),
            note,
        );
        drop(wait);
        let v = match r {
            Ok(Some(v)) => v,
            Ok(None) => return Err(ferry_engine::Cancelled.into()),
            Err(_) if ctx.is_cancelled() => return Err(ferry_engine::Cancelled.into()),
            Err(e) => return Err(e.into()),
        };
        let reply: AgentDataReply = serde_json::from_value(v).map_err(|e| {
            anyhow::anyhow!(
                "host {}: its agent answered in a form this control plane cannot read ({e}); run the same ferry version on both",
                host.name
            )
        })?;
        count(reply.counters);
        for n in reply.notes {
            note(n);
        }
        Ok(reply.out)
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
