//! The replication scheduler of `ferry serve`: every protected VM gets a replication cycle
//! when its newest recovery point is as old as its RPO, without any command. A cycle never
//! overlaps another job of the same VM, and at most [`MAX_CYCLES`] run at once.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_api::{Api, ReplicateReq};
use ferry_model::{ItemState, JobState, ProtectedItem};

use crate::Local;

/// Cycles running at once, over all VMs.
pub const MAX_CYCLES: usize = 2;
/// How often the scheduler looks at the VMs.
pub const TICK: Duration = Duration::from_secs(1);

/// A running scheduler; [`Scheduler::stop`] ends it.
pub struct Scheduler {
    stop: Arc<AtomicBool>,
}

/// Whether `item`, whose newest point is `age` seconds old (None: it has none), needs a cycle
/// now. A VM whose last attempt failed waits a whole RPO (at least 5 s) before the next.
pub fn due(item: &ProtectedItem, age: Option<u64>, since_try: Option<Duration>) -> bool {
    if item.state != ItemState::Protected || item.rpo_secs == 0 {
        return false;
    }
    let rpo = Duration::from_secs(item.rpo_secs.max(1));
    if since_try.is_some_and(|t| t < rpo.max(Duration::from_secs(5))) {
        return false;
    }
    age.is_none_or(|a| a >= item.rpo_secs)
}

impl Scheduler {
    /// Starts the scheduler's thread over `local`'s installation.
    pub fn start(local: Local) -> Scheduler {
        let stop = Arc::new(AtomicBool::new(false));
        let s2 = stop.clone();
        std::thread::Builder::new()
            .name("ferry-scheduler".into())
            .spawn(move || run(local, s2))
            .expect("scheduler thread");
        Scheduler { stop }
    }

    /// Stops starting new cycles.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn run(local: Local, stop: Arc<AtomicBool>) {
    let running: Arc<Mutex<HashSet<String>>> = Arc::default();
    let mut tried: HashMap<String, Instant> = HashMap::new();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(TICK);
        let Ok(vault) = ferry_vault::Vault::open(local.home()) else {
            continue;
        };
        let Ok(items) = vault.items() else { continue };
        for item in items {
            if running.lock().unwrap().len() >= MAX_CYCLES {
                break;
            }
            if running.lock().unwrap().contains(&item.vm) {
                continue;
            }
            let busy = item
                .job
                .and_then(|id| vault.job(id).ok().flatten())
                .is_some_and(|j| j.state == JobState::Running);
            if busy {
                continue;
            }
            let points = vault.points(&item.vm).unwrap_or_default();
            let age = points
                .first()
                .and_then(|p| crate::local::seconds_since(&p.created_at));
            if !due(&item, age, tried.get(&item.vm).map(|t| t.elapsed())) {
                continue;
            }
            tried.insert(item.vm.clone(), Instant::now());
            running.lock().unwrap().insert(item.vm.clone());
            let every = vault
                .item_extra(&item.vm)
                .ok()
                .and_then(|x| serde_json::from_value::<ferry_engine::ItemExtra>(x).ok())
                .and_then(|x| x.app_every_secs);
            let app_age = points
                .iter()
                .find(|p| p.consistency == ferry_model::Consistency::App)
                .and_then(|p| crate::local::seconds_since(&p.created_at));
            let req = ReplicateReq {
                app_consistent: app_due(every, app_age),
                ..Default::default()
            };
            let (local, running, vm) = (local.clone(), running.clone(), item.vm.clone());
            std::thread::spawn(move || {
                match local.replicate(&vm, &req) {
                    Ok(r) => tracing::info!(
                        "scheduler: VM {vm}: replication cycle done (job {})",
                        r.job.map(|j| j.id).unwrap_or_default()
                    ),
                    Err(e) => tracing::warn!("scheduler: VM {vm}: replication cycle failed: {e}"),
                }
                running.lock().unwrap().remove(&vm);
            });
        }
    }
}

/// Whether a cycle should be app-consistent: an interval is set and the newest app-consistent
/// point (`app_age` seconds old, None: there is none) is at least that old.
fn app_due(every: Option<u64>, app_age: Option<u64>) -> bool {
    match (every, app_age) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(every), Some(age)) => age >= every,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn app_consistent_cycles_follow_their_interval() {
        assert!(!app_due(None, None));
        assert!(app_due(Some(3600), None));
        assert!(!app_due(Some(3600), Some(3599)));
        assert!(app_due(Some(3600), Some(3600)));
    }

    fn item(state: ItemState, rpo: u64) -> ProtectedItem {
        ProtectedItem {
            vm: "a".into(),
            primary_host: "h".into(),
            recovery_site: "r".into(),
            recovery_host: None,
            state,
            block_size: 65536,
            rpo_secs: rpo,
            retention_secs: 3600,
            job: None,
            failed_over_at: None,
        }
    }

    #[test]
    fn a_cycle_is_due_once_the_newest_point_is_as_old_as_the_rpo() {
        let it = item(ItemState::Protected, 60);
        assert!(!due(&it, Some(59), None));
        assert!(due(&it, Some(60), None));
        assert!(due(&it, None, None));
        assert!(!due(&item(ItemState::FailedOver, 60), Some(600), None));
        // After a failed try, wait a whole RPO.
        assert!(!due(&it, Some(600), Some(Duration::from_secs(30))));
        assert!(due(&it, Some(600), Some(Duration::from_secs(61))));
    }
}
