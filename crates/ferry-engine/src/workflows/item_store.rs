//! The recovery store of one job, and where its point work runs: in this process, or on an
//! agent host when every host of the job is served by an agent (then the control plane needs
//! neither the store's credentials nor the VM's key; see [`crate::points`]).

use super::*;
use crate::points::{self, BusyOut, GetOut, PointsOp, PruneOut, PutOut, VerifyOut};

/// A job's recovery store: opened in this process on first use by work this process does,
/// and reached through `agent` for point work when every host of the job is an agent host.
pub(crate) struct ItemStore<'e> {
    engine: &'e Engine,
    item: ProtectedItem,
    sref: data::StoreRef,
    /// The agent host that does point work, if any.
    agent: Option<Host>,
    local: std::sync::OnceLock<Arc<Store>>,
}

/// Where a call reports: a job's counters (and cancellation) and its notes.
pub(crate) type Note<'a> = &'a (dyn Fn(String) + Sync);

impl<'e> ItemStore<'e> {
    /// The store opened in this process (with the VM's key when encrypted), holding a lease
    /// for as long as this value lives.
    pub fn local(&self) -> Result<&Arc<Store>> {
        if let Some(s) = self.local.get() {
            return Ok(s);
        }
        let s = self.engine.open_item_store(&self.item)?;
        Ok(self.local.get_or_init(|| s))
    }

    /// The agent host doing this job's point work (None: this process does it).
    pub fn agent(&self) -> Option<&Host> {
        self.agent.as_ref()
    }

    /// Fails now, before a job starts, when this process does the point work and cannot
    /// open the store (or lacks the key).
    pub fn check(&self) -> Result<()> {
        if self.agent.is_none() {
            self.local()?;
        }
        Ok(())
    }

    /// After an agent stored blocks: this process's copy of the index (if it opened the
    /// store) learns them.
    pub fn refresh(&self) -> Result<()> {
        if let Some(s) = self.local.get() {
            s.refresh()?;
        }
        Ok(())
    }

    fn call<T: serde::de::DeserializeOwned>(
        &self,
        ctx: &JobCtx,
        note: Note<'_>,
        op: PointsOp,
    ) -> Result<T> {
        let v = match &self.agent {
            Some(h) => {
                let req = data::DataReq::Points(points::PointsReq {
                    vm: self.item.vm.clone(),
                    store: self.sref.clone(),
                    op,
                });
                self.engine.remote_data(ctx, note, h, &req)?
            }
            None => points::run(self.local()?, &self.item.vm, &op)?,
        };
        Ok(serde_json::from_value(v)?)
    }

    /// Stores the manifest of point `point`; answers its key.
    pub fn put_point(
        &self,
        ctx: &JobCtx,
        note: Note<'_>,
        point: i64,
        maps: &[BlockMap],
    ) -> Result<String> {
        let disks = maps.iter().cloned().map(data::Map).collect();
        let out: PutOut = self.call(ctx, note, PointsOp::Put { point, disks })?;
        Ok(out.manifest)
    }

    /// Reads a point's maps back.
    pub fn get_point(&self, ctx: &JobCtx, note: Note<'_>, manifest: &str) -> Result<Vec<BlockMap>> {
        let out: GetOut = self.call(
            ctx,
            note,
            PointsOp::Get {
                manifest: manifest.into(),
            },
        )?;
        Ok(out.disks.into_iter().map(|m| m.0).collect())
    }

    /// True when another job holds a lease on the store.
    pub fn busy(&self, ctx: &JobCtx, note: Note<'_>) -> Result<bool> {
        let out: BusyOut = self.call(ctx, note, PointsOp::Busy)?;
        Ok(out.busy)
    }

    /// Deletes manifests, then collects unreferenced packs older than `grace`.
    pub fn prune(
        &self,
        ctx: &JobCtx,
        note: Note<'_>,
        manifests: Vec<String>,
        grace: Duration,
    ) -> Result<PruneOut> {
        self.call(
            ctx,
            note,
            PointsOp::Prune {
                manifests,
                grace_s: grace.as_secs(),
            },
        )
    }

    /// Reads back every block of a point and checks it.
    pub fn verify(
        &self,
        ctx: &JobCtx,
        note: Note<'_>,
        manifest: &str,
        point: i64,
    ) -> Result<VerifyOut> {
        self.call(
            ctx,
            note,
            PointsOp::Verify {
                manifest: manifest.into(),
                point,
            },
        )
    }
}

impl Engine {
    /// The recovery store of `item` for a job on `hosts` (the first that will do data work
    /// first): when all of them are agent hosts, point work goes to the first connected one.
    pub(super) fn item_store(
        &self,
        item: &ProtectedItem,
        hosts: &[&Host],
    ) -> Result<ItemStore<'_>> {
        let agent = if !hosts.is_empty() && hosts.iter().all(|h| h.agent) {
            let up = hosts.iter().find(|h| {
                self.driver(h)
                    .map(|d| d.check_connected().is_ok())
                    .unwrap_or(false)
            });
            Some((*up.unwrap_or(&hosts[0])).clone())
        } else {
            None
        };
        Ok(ItemStore {
            engine: self,
            item: item.clone(),
            sref: self.store_ref(item)?,
            agent,
            local: Default::default(),
        })
    }

    /// Refuses, before anything changes, when `vm`'s points are encrypted and the key is not
    /// where the work happens: for a job on agent hosts only, each connected one of `hosts`
    /// must hold it (and a `--key` the operator passed must be the VM's); otherwise this
    /// process needs it (`--key FILE`).
    pub(super) fn require_key(&self, vm: &str, hosts: &[&Host]) -> Result<()> {
        if hosts.is_empty() || !hosts.iter().all(|h| h.agent) {
            return self.item_key(vm, false).map(|_| ());
        }
        let id = self.extra(vm)?.key_id;
        match (&id, self.operator_key_id()?) {
            (None, Some(_)) => {
                bail!("VM {vm} is replicated without encryption; run the command without --key")
            }
            (Some(id), Some(given)) if given != *id => bail!(
                "wrong key: the key passed with --key is key {given}, but VM {vm} was protected with key {id}; pass that key, or none (the agents hold it)"
            ),
            _ => {}
        }
        if id.is_none() {
            return Ok(());
        }
        let ctx = JobCtx::new(1, None);
        let mut seen = std::collections::HashSet::new();
        for h in hosts {
            if !seen.insert(h.name.clone()) || self.driver(h)?.check_connected().is_err() {
                continue;
            }
            let req = data::DataReq::Check(data::CheckReq {
                vm: vm.into(),
                key_id: id.clone(),
            });
            self.remote_data(&ctx, &|_| {}, h, &req)?;
        }
        Ok(())
    }
}
