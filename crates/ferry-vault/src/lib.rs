//! The vault: ferry's durable state in one SQLite file (WAL mode, versioned migrations).
//!
//! It holds sites, hosts, protected items, recovery points, jobs and events. Every process
//! opens its own connection; writers wait up to `BUSY_TIMEOUT` for each other, so a second
//! `ferry` process can watch, cancel or query while a job runs.
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_model::{
    Consistency, DriverKind, Host, ItemState, Job, JobKind, JobState, PointKind, ProtectedItem,
    RecoveryPoint, Role, Site, SiteRole, Step, TokenInfo,
};
use rusqlite::{params, Connection, OptionalExtension, Row};

/// How long a writer waits for another process's transaction.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(30);

/// File name of the vault under the ferry home.
pub const VAULT_FILE: &str = "vault.db";

const MIGRATIONS: &[&str] = &[
    // 1: initial schema
    "CREATE TABLE sites(name TEXT PRIMARY KEY, role TEXT NOT NULL, store TEXT NOT NULL);
     CREATE TABLE hosts(name TEXT PRIMARY KEY, site TEXT NOT NULL REFERENCES sites(name),
                        driver TEXT NOT NULL, root TEXT NOT NULL, switches TEXT NOT NULL);
     CREATE TABLE items(vm TEXT PRIMARY KEY, primary_host TEXT NOT NULL, recovery_site TEXT NOT NULL,
                        recovery_host TEXT, state TEXT NOT NULL, block_size INTEGER NOT NULL,
                        rpo_secs INTEGER NOT NULL, retention_secs INTEGER NOT NULL, job INTEGER,
                        failed_over_at INTEGER, extra TEXT NOT NULL DEFAULT '{}');
     CREATE TABLE points(id INTEGER PRIMARY KEY AUTOINCREMENT, vm TEXT NOT NULL, created_at TEXT NOT NULL,
                         kind TEXT NOT NULL, size INTEGER NOT NULL, data_bytes INTEGER NOT NULL,
                         manifest TEXT NOT NULL);
     CREATE INDEX points_vm ON points(vm);
     CREATE TABLE jobs(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, vm TEXT NOT NULL,
                       state TEXT NOT NULL, steps TEXT NOT NULL, bytes_read INTEGER NOT NULL DEFAULT 0,
                       bytes_transferred INTEGER NOT NULL DEFAULT 0, bytes_written INTEGER NOT NULL DEFAULT 0,
                       started_at TEXT NOT NULL, ended_at TEXT, error TEXT, downtime_ms INTEGER,
                       params TEXT NOT NULL DEFAULT '{}', pid INTEGER, pid_start TEXT,
                       cancel_requested INTEGER NOT NULL DEFAULT 0);
     CREATE INDEX jobs_vm ON jobs(vm);
     CREATE TABLE events(id INTEGER PRIMARY KEY AUTOINCREMENT, at TEXT NOT NULL, vm TEXT, job INTEGER,
                         message TEXT NOT NULL);",
    // 2: recovery plans
    "CREATE TABLE plans(name TEXT PRIMARY KEY, groups TEXT NOT NULL);",
    // 3: job notes
    "ALTER TABLE jobs ADD COLUMN notes TEXT NOT NULL DEFAULT '[]';",
    // 4: QEMU accelerator per host
    "ALTER TABLE hosts ADD COLUMN accel TEXT;",
    // 5: API tokens of `ferry serve` (only a hash of each secret)
    "CREATE TABLE tokens(name TEXT PRIMARY KEY, role TEXT NOT NULL, host TEXT,
                         hash TEXT NOT NULL UNIQUE, created_at TEXT NOT NULL);",
    // 6: hosts served by a `ferry agent`, and what their agents last reported
    "ALTER TABLE hosts ADD COLUMN agent INTEGER NOT NULL DEFAULT 0;
     CREATE TABLE agents(host TEXT PRIMARY KEY, last_seen INTEGER NOT NULL, version TEXT NOT NULL,
                         driver TEXT NOT NULL, root TEXT NOT NULL);",
    // 7: the resources a job was started with (threads, bandwidth), for a control plane that
    // continues it after a restart
    "ALTER TABLE jobs ADD COLUMN run_opts TEXT;",
    // 8: app-consistent recovery points (taken with the guest's file systems frozen)
    "ALTER TABLE points ADD COLUMN consistency TEXT NOT NULL DEFAULT 'crash';",
    // 9: plans with steps around their groups (pre/post commands, pauses, parallelism), and
    // what the plan's last run did (where a paused run resumes)
    "ALTER TABLE plans ADD COLUMN steps TEXT NOT NULL DEFAULT '[]';
     ALTER TABLE plans ADD COLUMN progress TEXT;
     CREATE TABLE point_ids(id INTEGER PRIMARY KEY);",
    // 10: network mapping between sites: a NIC on `from_switch` at `from_site` joins
    // `to_switch` at `to_site` (each pair is stored in both directions)
    "CREATE TABLE network_map(from_site TEXT NOT NULL, from_switch TEXT NOT NULL,
                              to_site TEXT NOT NULL, to_switch TEXT NOT NULL,
                              PRIMARY KEY(from_site, from_switch, to_site));",
];

/// Errors of the vault.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// No installation at the home folder.
    #[error(
        "no ferry installation at {0}: run `ferry init` (or pass --home DIR / set FERRY_HOME)"
    )]
    NotInitialized(PathBuf),
    /// SQLite failed.
    #[error("vault: {0}")]
    Sql(#[from] rusqlite::Error),
    /// Something named does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Something named already exists.
    #[error("{0}")]
    Exists(String),
    /// The vault was written by a newer ferry.
    #[error("the vault at {0} was created by a newer ferry (schema {1}); upgrade ferry")]
    TooNew(PathBuf, i64),
}

/// Result alias of the vault.
pub type Result<T> = std::result::Result<T, VaultError>;

/// A connection to the vault.
pub struct Vault {
    conn: Connection,
    path: PathBuf,
}

impl std::fmt::Debug for Vault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vault").field("path", &self.path).finish()
    }
}

fn now_rfc3339() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    ferry_model::rfc3339(secs)
}

fn token_row(r: &Row) -> rusqlite::Result<TokenInfo> {
    Ok(TokenInfo {
        name: r.get(0)?,
        role: parse::<Role>(r.get(1)?)?,
        host: r.get(2)?,
        created_at: r.get(3)?,
    })
}

/// The current time as RFC 3339 (for records the vault's callers create).
pub fn now() -> String {
    now_rfc3339()
}

fn parse<T: std::str::FromStr<Err = String>>(s: String) -> rusqlite::Result<T> {
    s.parse().map_err(|e: String| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, e.into())
    })
}

fn json<T: serde::de::DeserializeOwned>(s: String) -> rusqlite::Result<T> {
    serde_json::from_str(&s).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
    })
}

const JOB_COLS: &str = "id, kind, vm, state, steps, bytes_read, bytes_transferred, bytes_written, started_at, ended_at, error, downtime_ms, notes";
const ITEM_COLS: &str = "vm, primary_host, recovery_site, recovery_host, state, block_size, rpo_secs, retention_secs, job, failed_over_at";

fn job_row(r: &Row) -> rusqlite::Result<Job> {
    Ok(Job {
        id: r.get(0)?,
        kind: parse(r.get(1)?)?,
        vm: r.get(2)?,
        state: parse(r.get(3)?)?,
        steps: json(r.get(4)?)?,
        bytes_read: r.get::<_, i64>(5)? as u64,
        bytes_transferred: r.get::<_, i64>(6)? as u64,
        bytes_written: r.get::<_, i64>(7)? as u64,
        started_at: r.get(8)?,
        ended_at: r.get(9)?,
        error: r.get(10)?,
        downtime_ms: r.get::<_, Option<i64>>(11)?.map(|v| v as u64),
        notes: json(r.get(12)?)?,
    })
}

fn item_row(r: &Row) -> rusqlite::Result<ProtectedItem> {
    Ok(ProtectedItem {
        vm: r.get(0)?,
        primary_host: r.get(1)?,
        recovery_site: r.get(2)?,
        recovery_host: r.get(3)?,
        state: parse::<ItemState>(r.get(4)?)?,
        block_size: r.get::<_, i64>(5)? as u64,
        rpo_secs: r.get::<_, i64>(6)? as u64,
        retention_secs: r.get::<_, i64>(7)? as u64,
        job: r.get(8)?,
        failed_over_at: r.get(9)?,
    })
}

fn point_row(r: &Row) -> rusqlite::Result<RecoveryPoint> {
    let kind: String = r.get(3)?;
    Ok(RecoveryPoint {
        id: r.get(0)?,
        vm: r.get(1)?,
        created_at: r.get(2)?,
        kind: if kind == "failback" {
            PointKind::Failback
        } else {
            PointKind::Replication
        },
        size: r.get::<_, i64>(4)? as u64,
        data_bytes: r.get::<_, i64>(5)? as u64,
        manifest: r.get(6)?,
        consistency: if r.get::<_, String>(7)? == "app" {
            Consistency::App
        } else {
            Consistency::Crash
        },
    })
}

/// What a host's agent reported in its last heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentInfo {
    /// Unix time (seconds) of the heartbeat.
    pub last_seen: i64,
    /// The agent's ferry version.
    pub version: String,
    /// The driver it runs (`dir`, `qemu`).
    pub driver: String,
    /// Its `--root` folder on its own machine.
    pub root: String,
}

/// Who runs a job: a process id and its start time (so a reused pid is not mistaken for it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Runner {
    /// Process id.
    pub pid: i64,
    /// Process start time as the kernel reports it.
    pub start: String,
}

impl Vault {
    /// Creates the vault under `home` if needed and brings its schema up to date.
    pub fn create(home: &Path) -> Result<Self> {
        std::fs::create_dir_all(home).map_err(|e| {
            VaultError::NotFound(format!("cannot create ferry home {}: {e}", home.display()))
        })?;
        Self::connect(home.join(VAULT_FILE))
    }

    /// Opens the vault of an initialized installation.
    pub fn open(home: &Path) -> Result<Self> {
        let _span = tracing::debug_span!("open_vault").entered();
        let path = home.join(VAULT_FILE);
        if !path.is_file() {
            return Err(VaultError::NotInitialized(home.to_path_buf()));
        }
        Self::connect(path)
    }

    fn connect(path: PathBuf) -> Result<Self> {
        let conn = Connection::open(&path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let mut v = Vault { conn, path };
        v.migrate()?;
        Ok(v)
    }

    fn migrate(&mut self) -> Result<()> {
        let version: i64 = self
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if version > MIGRATIONS.len() as i64 {
            return Err(VaultError::TooNew(self.path.clone(), version));
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
            let tx = self.conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", (i + 1) as i64)?;
            tx.commit()?;
        }
        Ok(())
    }

    /// Path of the SQLite file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    // ---- sites and hosts ----

    /// Adds a site.
    pub fn add_site(&self, s: &Site) -> Result<()> {
        if self.site(&s.name)?.is_some() {
            return Err(VaultError::Exists(format!(
                "site {} already exists",
                s.name
            )));
        }
        self.conn.execute(
            "INSERT INTO sites(name, role, store) VALUES (?1, ?2, ?3)",
            params![s.name, s.role.as_str(), s.store],
        )?;
        Ok(())
    }

    /// One site, if it exists.
    pub fn site(&self, name: &str) -> Result<Option<Site>> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, role, store FROM sites WHERE name = ?1",
                [name],
                |r| {
                    Ok(Site {
                        name: r.get(0)?,
                        role: parse::<SiteRole>(r.get(1)?)?,
                        store: r.get(2)?,
                    })
                },
            )
            .optional()?)
    }

    /// Maps `a_switch` at site `a` to `b_switch` at site `b`, both directions (replacing what
    /// either switch was mapped to at the other site).
    pub fn map_network(&self, a: &str, a_switch: &str, b: &str, b_switch: &str) -> Result<()> {
        self.atomically(|v| {
            for (fs, fw, ts, tw) in [(a, a_switch, b, b_switch), (b, b_switch, a, a_switch)] {
                v.conn.execute(
                    "INSERT OR REPLACE INTO network_map(from_site, from_switch, to_site, to_switch) VALUES (?1,?2,?3,?4)",
                    params![fs, fw, ts, tw],
                )?;
            }
            Ok(())
        })
    }

    /// The network map of site `site`: (its switch, other site, that site's switch), sorted.
    pub fn network_map(&self, site: &str) -> Result<Vec<(String, String, String)>> {
        let mut st = self.conn.prepare(
            "SELECT from_switch, to_site, to_switch FROM network_map WHERE from_site = ?1 ORDER BY from_switch, to_site",
        )?;
        let v = st
            .query_map([site], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    /// The switch at `to_site` that `switch` at `from_site` is mapped to, if any.
    pub fn mapped_switch(
        &self,
        from_site: &str,
        switch: &str,
        to_site: &str,
    ) -> Result<Option<String>> {
        Ok(self
            .conn
            .query_row(
                "SELECT to_switch FROM network_map WHERE from_site = ?1 AND from_switch = ?2 AND to_site = ?3",
                params![from_site, switch, to_site],
                |r| r.get(0),
            )
            .optional()?)
    }

    /// All sites, by name.
    pub fn sites(&self) -> Result<Vec<Site>> {
        let mut st = self.conn.prepare("SELECT name FROM sites ORDER BY name")?;
        let names: Vec<String> = st
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        names
            .iter()
            .map(|n| Ok(self.site(n)?.expect("listed site exists")))
            .collect()
    }

    /// Adds a host.
    pub fn add_host(&self, h: &Host) -> Result<()> {
        if self.host(&h.name)?.is_some() {
            return Err(VaultError::Exists(format!(
                "host {} already exists",
                h.name
            )));
        }
        self.conn.execute(
            "INSERT INTO hosts(name, site, driver, root, switches, accel, agent) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            params![
                h.name,
                h.site,
                h.driver.as_str(),
                h.root.display().to_string(),
                serde_json::to_string(&h.switches).unwrap(),
                h.accel,
                h.agent as i64
            ],
        )?;
        Ok(())
    }

    /// One host, if it exists.
    pub fn host(&self, name: &str) -> Result<Option<Host>> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, site, driver, root, switches, accel, agent FROM hosts WHERE name = ?1",
                [name],
                |r| {
                    Ok(Host {
                        name: r.get(0)?,
                        site: r.get(1)?,
                        driver: parse::<DriverKind>(r.get(2)?)?,
                        root: PathBuf::from(r.get::<_, String>(3)?),
                        switches: json(r.get(4)?)?,
                        accel: r.get(5)?,
                        agent: r.get::<_, i64>(6)? != 0,
                    })
                },
            )
            .optional()?)
    }

    /// All hosts, by name.
    pub fn hosts(&self) -> Result<Vec<Host>> {
        let mut st = self.conn.prepare("SELECT name FROM hosts ORDER BY name")?;
        let names: Vec<String> = st
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?;
        names
            .iter()
            .map(|n| Ok(self.host(n)?.expect("listed host exists")))
            .collect()
    }

    // ---- protected items ----

    /// Adds a protected item.
    pub fn add_item(&self, i: &ProtectedItem) -> Result<()> {
        self.conn.execute(
            &format!("INSERT INTO items({ITEM_COLS}) VALUES (?1,?2,?3,?4,?5,?6,?7,?8,?9,?10)"),
            params![
                i.vm,
                i.primary_host,
                i.recovery_site,
                i.recovery_host,
                i.state.as_str(),
                i.block_size as i64,
                i.rpo_secs as i64,
                i.retention_secs as i64,
                i.job,
                i.failed_over_at
            ],
        )?;
        Ok(())
    }

    /// Writes every field of an existing item.
    pub fn update_item(&self, i: &ProtectedItem) -> Result<()> {
        let n = self.conn.execute(
            "UPDATE items SET primary_host=?2, recovery_site=?3, recovery_host=?4, state=?5, block_size=?6,
             rpo_secs=?7, retention_secs=?8, job=?9, failed_over_at=?10 WHERE vm=?1",
            params![
                i.vm,
                i.primary_host,
                i.recovery_site,
                i.recovery_host,
                i.state.as_str(),
                i.block_size as i64,
                i.rpo_secs as i64,
                i.retention_secs as i64,
                i.job,
                i.failed_over_at
            ],
        )?;
        if n == 0 {
            return Err(VaultError::NotFound(format!(
                "VM {} is not protected",
                i.vm
            )));
        }
        Ok(())
    }

    /// Removes an item (used when a first protection fails before any point exists).
    pub fn delete_item(&self, vm: &str) -> Result<()> {
        self.conn.execute("DELETE FROM items WHERE vm = ?1", [vm])?;
        Ok(())
    }

    /// One item, if the VM is protected.
    pub fn item(&self, vm: &str) -> Result<Option<ProtectedItem>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {ITEM_COLS} FROM items WHERE vm = ?1"),
                [vm],
                item_row,
            )
            .optional()?)
    }

    /// All items, by VM name.
    pub fn items(&self) -> Result<Vec<ProtectedItem>> {
        let mut st = self
            .conn
            .prepare(&format!("SELECT {ITEM_COLS} FROM items ORDER BY vm"))?;
        let v = st
            .query_map([], item_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    /// The engine's free-form JSON state of an item (disk bases, stamps).
    pub fn item_extra(&self, vm: &str) -> Result<serde_json::Value> {
        let s: Option<String> = self
            .conn
            .query_row("SELECT extra FROM items WHERE vm = ?1", [vm], |r| r.get(0))
            .optional()?;
        Ok(s.and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::json!({})))
    }

    /// Replaces the engine's JSON state of an item.
    pub fn set_item_extra(&self, vm: &str, v: &serde_json::Value) -> Result<()> {
        self.conn.execute(
            "UPDATE items SET extra = ?2 WHERE vm = ?1",
            params![vm, v.to_string()],
        )?;
        Ok(())
    }

    // ---- recovery points ----

    /// Reserves the next point id (manifests are written under it before it is recorded):
    /// each call answers a new one, also to jobs of other threads and processes running at
    /// the same time.
    pub fn next_point_id(&self) -> Result<i64> {
        let reserve = |v: &Vault| -> Result<i64> {
            let max: Option<i64> = v.conn.query_row(
                "SELECT MAX(v) FROM (SELECT MAX(id) AS v FROM points
                     UNION ALL SELECT seq FROM sqlite_sequence WHERE name='points'
                     UNION ALL SELECT MAX(id) FROM point_ids)",
                [],
                |r| r.get(0),
            )?;
            let id = max.unwrap_or(0) + 1;
            v.conn
                .execute("INSERT INTO point_ids(id) VALUES (?1)", [id])?;
            Ok(id)
        };
        if self.conn.is_autocommit() {
            self.atomically(reserve)
        } else {
            reserve(self)
        }
    }

    /// Records a point whose manifest is already stored.
    pub fn add_point(&self, p: &RecoveryPoint) -> Result<()> {
        self.conn.execute(
            "INSERT INTO points(id, vm, created_at, kind, size, data_bytes, manifest, consistency) VALUES (?1,?2,?3,?4,?5,?6,?7,?8)",
            params![
                p.id,
                p.vm,
                p.created_at,
                match p.kind {
                    PointKind::Replication => "replication",
                    PointKind::Failback => "failback",
                },
                p.size as i64,
                p.data_bytes as i64,
                p.manifest,
                p.consistency.as_str()
            ],
        )?;
        Ok(())
    }

    /// Points of a VM, newest first.
    pub fn points(&self, vm: &str) -> Result<Vec<RecoveryPoint>> {
        let mut st = self.conn.prepare(
            "SELECT id, vm, created_at, kind, size, data_bytes, manifest, consistency FROM points WHERE vm = ?1 ORDER BY id DESC",
        )?;
        let v = st
            .query_map([vm], point_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    /// One point by id.
    pub fn point(&self, id: i64) -> Result<Option<RecoveryPoint>> {
        Ok(self
            .conn
            .query_row(
                "SELECT id, vm, created_at, kind, size, data_bytes, manifest, consistency FROM points WHERE id = ?1",
                [id],
                point_row,
            )
            .optional()?)
    }

    /// Forgets a point (after its manifest was deleted).
    pub fn delete_point(&self, id: i64) -> Result<()> {
        self.conn
            .execute("DELETE FROM points WHERE id = ?1", [id])?;
        Ok(())
    }

    // ---- jobs ----

    /// Creates a running job owned by `runner`.
    pub fn create_job(
        &self,
        kind: JobKind,
        vm: &str,
        steps: &[Step],
        params_json: &serde_json::Value,
        runner: &Runner,
    ) -> Result<Job> {
        self.conn.execute(
            "INSERT INTO jobs(kind, vm, state, steps, started_at, params, pid, pid_start) VALUES (?1,?2,'running',?3,?4,?5,?6,?7)",
            params![
                kind.as_str(),
                vm,
                serde_json::to_string(steps).unwrap(),
                now_rfc3339(),
                params_json.to_string(),
                runner.pid,
                runner.start
            ],
        )?;
        let id = self.conn.last_insert_rowid();
        Ok(self.job(id)?.expect("job just inserted"))
    }

    /// One job by id.
    pub fn job(&self, id: i64) -> Result<Option<Job>> {
        Ok(self
            .conn
            .query_row(
                &format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"),
                [id],
                job_row,
            )
            .optional()?)
    }

    /// Jobs, newest first; only unfinished ones unless `all`.
    pub fn jobs(&self, all: bool) -> Result<Vec<Job>> {
        let filter = if all {
            ""
        } else {
            "WHERE state IN ('queued','running','waiting')"
        };
        let mut st = self.conn.prepare(&format!(
            "SELECT {JOB_COLS} FROM jobs {filter} ORDER BY id DESC"
        ))?;
        let v = st
            .query_map([], job_row)?
            .collect::<rusqlite::Result<_>>()?;
        Ok(v)
    }

    /// A job's parameters as recorded when it was created.
    pub fn job_params(&self, id: i64) -> Result<serde_json::Value> {
        let s: String =
            self.conn
                .query_row("SELECT params FROM jobs WHERE id = ?1", [id], |r| r.get(0))?;
        Ok(serde_json::from_str(&s).unwrap_or(serde_json::json!({})))
    }

    /// The resources (JSON) job `id` was started with, if recorded.
    pub fn job_run_opts(&self, id: i64) -> Result<Option<serde_json::Value>> {
        let s: Option<String> =
            self.conn
                .query_row("SELECT run_opts FROM jobs WHERE id = ?1", [id], |r| {
                    r.get(0)
                })?;
        Ok(s.and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// Records the resources (JSON) job `id` runs with.
    pub fn set_job_run_opts(&self, id: i64, v: &serde_json::Value) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET run_opts = ?2 WHERE id = ?1",
            params![id, v.to_string()],
        )?;
        Ok(())
    }

    /// Replaces a job's parameters.
    pub fn set_job_params(&self, id: i64, v: &serde_json::Value) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET params = ?2 WHERE id = ?1",
            params![id, v.to_string()],
        )?;
        Ok(())
    }

    /// Persists a job's progress (steps and byte counters).
    pub fn save_progress(&self, job: &Job) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET steps=?2, bytes_read=?3, bytes_transferred=?4, bytes_written=?5, downtime_ms=?6, notes=?7 WHERE id=?1",
            params![
                job.id,
                serde_json::to_string(&job.steps).unwrap(),
                job.bytes_read as i64,
                job.bytes_transferred as i64,
                job.bytes_written as i64,
                job.downtime_ms.map(|v| v as i64),
                serde_json::to_string(&job.notes).unwrap()
            ],
        )?;
        Ok(())
    }

    /// Moves a job to `state`; final states record the end time and error.
    pub fn set_job_state(&self, id: i64, state: JobState, error: Option<&str>) -> Result<()> {
        let ended = state.is_final().then(now_rfc3339);
        self.conn.execute(
            "UPDATE jobs SET state=?2, error=?3, ended_at=?4 WHERE id=?1",
            params![id, state.as_str(), error, ended],
        )?;
        Ok(())
    }

    /// Makes `runner` the job's process and sets it running again (resume).
    pub fn claim_job(&self, id: i64, runner: &Runner) -> Result<()> {
        self.conn.execute(
            "UPDATE jobs SET state='running', pid=?2, pid_start=?3, cancel_requested=0, error=NULL, ended_at=NULL WHERE id=?1",
            params![id, runner.pid, runner.start],
        )?;
        Ok(())
    }

    /// The process recorded as running a job.
    pub fn job_runner(&self, id: i64) -> Result<Option<Runner>> {
        Ok(self
            .conn
            .query_row("SELECT pid, pid_start FROM jobs WHERE id = ?1", [id], |r| {
                Ok(
                    match (r.get::<_, Option<i64>>(0)?, r.get::<_, Option<String>>(1)?) {
                        (Some(pid), Some(start)) => Some(Runner { pid, start }),
                        _ => None,
                    },
                )
            })
            .optional()?
            .flatten())
    }

    /// Asks the process running a job to stop.
    pub fn request_cancel(&self, id: i64) -> Result<()> {
        self.conn
            .execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?1", [id])?;
        Ok(())
    }

    /// True once someone asked the job to stop.
    pub fn cancel_requested(&self, id: i64) -> Result<bool> {
        let v: i64 = self.conn.query_row(
            "SELECT cancel_requested FROM jobs WHERE id = ?1",
            [id],
            |r| r.get(0),
        )?;
        Ok(v != 0)
    }

    // ---- recovery plans ----

    /// Adds a recovery plan: ordered groups of VM names.
    pub fn add_plan(&self, name: &str, groups: &[Vec<String>]) -> Result<()> {
        if self.plan(name)?.is_some() {
            return Err(VaultError::Exists(format!(
                "plan {name} already exists; see it with `ferry plan show {name}`"
            )));
        }
        self.conn.execute(
            "INSERT INTO plans(name, groups) VALUES (?1, ?2)",
            params![name, serde_json::to_string(groups).unwrap()],
        )?;
        Ok(())
    }

    /// Sets the steps of a plan's groups (JSON, one entry per group).
    pub fn set_plan_steps(&self, name: &str, steps: &serde_json::Value) -> Result<()> {
        self.conn.execute(
            "UPDATE plans SET steps = ?2 WHERE name = ?1",
            params![name, steps.to_string()],
        )?;
        Ok(())
    }

    /// The steps of a plan's groups (JSON; `[]` when it has none).
    pub fn plan_steps(&self, name: &str) -> Result<serde_json::Value> {
        Ok(self
            .conn
            .query_row("SELECT steps FROM plans WHERE name = ?1", [name], |r| {
                json(r.get(0)?)
            })
            .optional()?
            .unwrap_or_else(|| serde_json::json!([])))
    }

    /// Records what the plan's last run did (JSON; None clears it).
    pub fn set_plan_progress(
        &self,
        name: &str,
        progress: Option<&serde_json::Value>,
    ) -> Result<()> {
        self.conn.execute(
            "UPDATE plans SET progress = ?2 WHERE name = ?1",
            params![name, progress.map(|p| p.to_string())],
        )?;
        Ok(())
    }

    /// What the plan's last run did, if anything is recorded.
    pub fn plan_progress(&self, name: &str) -> Result<Option<serde_json::Value>> {
        let s: Option<Option<String>> = self
            .conn
            .query_row("SELECT progress FROM plans WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()?;
        Ok(s.flatten().and_then(|s| serde_json::from_str(&s).ok()))
    }

    /// A plan's groups, if the plan exists.
    pub fn plan(&self, name: &str) -> Result<Option<Vec<Vec<String>>>> {
        Ok(self
            .conn
            .query_row("SELECT groups FROM plans WHERE name = ?1", [name], |r| {
                json(r.get(0)?)
            })
            .optional()?)
    }

    // ---- agents ----

    /// Records a heartbeat of the agent of `host` at Unix time `now`; its root becomes the
    /// host's root.
    pub fn agent_seen(&self, host: &str, a: &AgentInfo) -> Result<()> {
        self.conn.execute(
            "INSERT INTO agents(host, last_seen, version, driver, root) VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT(host) DO UPDATE SET last_seen = ?2, version = ?3, driver = ?4, root = ?5",
            params![host, a.last_seen, a.version, a.driver, a.root],
        )?;
        self.conn.execute(
            "UPDATE hosts SET root = ?2 WHERE name = ?1 AND agent = 1",
            params![host, a.root],
        )?;
        Ok(())
    }

    /// What the agent of `host` last reported, if it ever did.
    pub fn agent(&self, host: &str) -> Result<Option<AgentInfo>> {
        Ok(self
            .conn
            .query_row(
                "SELECT last_seen, version, driver, root FROM agents WHERE host = ?1",
                [host],
                |r| {
                    Ok(AgentInfo {
                        last_seen: r.get(0)?,
                        version: r.get(1)?,
                        driver: r.get(2)?,
                        root: r.get(3)?,
                    })
                },
            )
            .optional()?)
    }

    // ---- API tokens ----

    /// Adds a token; `hash` is the hash of its secret (the secret itself is never stored).
    pub fn add_token(&self, t: &TokenInfo, hash: &str) -> Result<()> {
        if self.tokens()?.iter().any(|x| x.name == t.name) {
            return Err(VaultError::Exists(format!(
                "token {} already exists; revoke it with `ferry token revoke {}` or pick another name",
                t.name, t.name
            )));
        }
        self.conn.execute(
            "INSERT INTO tokens(name, role, host, hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![t.name, t.role.as_str(), t.host, hash, t.created_at],
        )?;
        Ok(())
    }

    /// Every token, by name.
    pub fn tokens(&self) -> Result<Vec<TokenInfo>> {
        let mut st = self
            .conn
            .prepare("SELECT name, role, host, created_at FROM tokens ORDER BY name")?;
        let rows = st.query_map([], token_row)?;
        Ok(rows.collect::<rusqlite::Result<_>>()?)
    }

    /// The token whose secret hashes to `hash`, if any.
    pub fn token_by_hash(&self, hash: &str) -> Result<Option<TokenInfo>> {
        Ok(self
            .conn
            .query_row(
                "SELECT name, role, host, created_at FROM tokens WHERE hash = ?1",
                [hash],
                token_row,
            )
            .optional()?)
    }

    /// Deletes a token; returns it, or `None` when no token has that name.
    pub fn delete_token(&self, name: &str) -> Result<Option<TokenInfo>> {
        let t = self.tokens()?.into_iter().find(|t| t.name == name);
        self.conn
            .execute("DELETE FROM tokens WHERE name = ?1", [name])?;
        Ok(t)
    }

    // ---- events ----

    /// Appends an event to the log.
    pub fn event(&self, vm: Option<&str>, job: Option<i64>, message: &str) -> Result<()> {
        self.conn.execute(
            "INSERT INTO events(at, vm, job, message) VALUES (?1, ?2, ?3, ?4)",
            params![now_rfc3339(), vm, job, message],
        )?;
        Ok(())
    }

    /// Runs `f` in one write transaction (IMMEDIATE, so concurrent writers queue up).
    pub fn atomically<T>(&self, f: impl FnOnce(&Vault) -> Result<T>) -> Result<T> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        match f(self) {
            Ok(v) => {
                self.conn.execute_batch("COMMIT")?;
                Ok(v)
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner() -> Runner {
        Runner {
            pid: 1,
            start: "x".into(),
        }
    }

    #[test]
    fn an_agent_heartbeat_is_recorded_and_sets_its_hosts_root() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::create(dir.path()).unwrap();
        v.add_site(&Site {
            name: "p".into(),
            role: SiteRole::Primary,
            store: "file:///x".into(),
        })
        .unwrap();
        let mut h = Host {
            name: "a1".into(),
            site: "p".into(),
            driver: DriverKind::Dir,
            root: PathBuf::new(),
            switches: vec![],
            accel: None,
            agent: true,
        };
        v.add_host(&h).unwrap();
        assert_eq!(v.agent("a1").unwrap(), None);
        let a = AgentInfo {
            last_seen: 100,
            version: "0.1.0".into(),
            driver: "dir".into(),
            root: "/srv/vms".into(),
        };
        v.agent_seen("a1", &a).unwrap();
        v.agent_seen(
            "a1",
            &AgentInfo {
                last_seen: 105,
                ..a.clone()
            },
        )
        .unwrap();
        assert_eq!(v.agent("a1").unwrap().unwrap().last_seen, 105);
        h.root = "/srv/vms".into();
        assert_eq!(v.host("a1").unwrap(), Some(h));
    }

    #[test]
    fn tokens_are_found_by_hash_listed_and_revoked() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::create(dir.path()).unwrap();
        let t = TokenInfo {
            name: "ops".into(),
            role: Role::Operator,
            host: None,
            created_at: now(),
        };
        v.add_token(&t, "h1").unwrap();
        assert!(matches!(v.add_token(&t, "h2"), Err(VaultError::Exists(_))));
        assert_eq!(v.token_by_hash("h1").unwrap(), Some(t.clone()));
        assert_eq!(v.token_by_hash("nope").unwrap(), None);
        assert_eq!(v.tokens().unwrap(), vec![t.clone()]);
        assert_eq!(v.delete_token("ops").unwrap(), Some(t));
        assert_eq!(v.token_by_hash("h1").unwrap(), None);
        assert_eq!(v.delete_token("ops").unwrap(), None);
    }

    #[test]
    fn open_requires_init_and_create_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            Vault::open(dir.path()),
            Err(VaultError::NotInitialized(_))
        ));
        Vault::create(dir.path()).unwrap();
        Vault::create(dir.path()).unwrap();
        Vault::open(dir.path()).unwrap();
    }

    #[test]
    fn sites_hosts_items_points_jobs_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let v = Vault::create(dir.path()).unwrap();
        let s = Site {
            name: "dr".into(),
            role: SiteRole::Recovery,
            store: "file:///x".into(),
        };
        v.add_site(&s).unwrap();
        assert!(v.add_site(&s).is_err());
        let h = Host {
            name: "h".into(),
            site: "dr".into(),
            driver: DriverKind::Dir,
            root: "/r".into(),
            switches: vec!["lan".into()],
            accel: Some("tcg".into()),
            agent: false,
        };
        v.add_host(&h).unwrap();
        assert_eq!(v.hosts().unwrap(), vec![h]);
        let mut i = ProtectedItem {
            vm: "web".into(),
            primary_host: "h".into(),
            recovery_site: "dr".into(),
            recovery_host: None,
            state: ItemState::Protecting,
            block_size: 65536,
            rpo_secs: 300,
            retention_secs: 86400,
            job: None,
            failed_over_at: None,
        };
        v.add_item(&i).unwrap();
        i.state = ItemState::Protected;
        v.update_item(&i).unwrap();
        assert_eq!(v.item("web").unwrap().unwrap(), i);
        v.set_item_extra("web", &serde_json::json!({"a": 1}))
            .unwrap();
        assert_eq!(v.item_extra("web").unwrap()["a"], 1);
        let id = v.next_point_id().unwrap();
        v.add_point(&RecoveryPoint {
            id,
            vm: "web".into(),
            created_at: "t".into(),
            kind: PointKind::Replication,
            size: 1,
            data_bytes: 1,
            manifest: "m".into(),
            consistency: Consistency::App,
        })
        .unwrap();
        assert_eq!(v.points("web").unwrap()[0].consistency, Consistency::App);
        assert_eq!(v.next_point_id().unwrap(), id + 1);
        // Reserved ids are not handed out twice, even before their points are recorded.
        assert_eq!(v.next_point_id().unwrap(), id + 2);
        let mut j = v
            .create_job(
                JobKind::Failback,
                "web",
                &[],
                &serde_json::json!({"sync": "delta"}),
                &runner(),
            )
            .unwrap();
        assert_eq!(j.state, JobState::Running);
        j.bytes_written = 42;
        v.save_progress(&j).unwrap();
        v.request_cancel(j.id).unwrap();
        assert!(v.cancel_requested(j.id).unwrap());
        v.set_job_state(j.id, JobState::Cancelled, Some("cancelled"))
            .unwrap();
        let j2 = v.job(j.id).unwrap().unwrap();
        assert_eq!((j2.bytes_written, j2.state), (42, JobState::Cancelled));
        assert!(j2.ended_at.is_some());
        assert!(v.jobs(false).unwrap().is_empty());
        v.claim_job(j.id, &runner()).unwrap();
        assert!(!v.cancel_requested(j.id).unwrap());
        assert_eq!(v.jobs(false).unwrap().len(), 1);
        assert_eq!(v.job_params(j.id).unwrap()["sync"], "delta");
        assert_eq!(v.job_run_opts(j.id).unwrap(), None);
        let opts = serde_json::json!({"threads": 1, "bandwidth": 4194304});
        v.set_job_run_opts(j.id, &opts).unwrap();
        assert_eq!(v.job_run_opts(j.id).unwrap(), Some(opts));
        let groups = vec![
            vec!["a".to_string(), "b".to_string()],
            vec!["c".to_string()],
        ];
        v.add_plan("p", &groups).unwrap();
        assert!(v.add_plan("p", &groups).is_err());
        assert_eq!(v.plan("p").unwrap().unwrap(), groups);
        assert!(v.plan("q").unwrap().is_none());
        v.map_network("a", "lan", "b", "dr-lan").unwrap();
        v.map_network("a", "dmz", "b", "dr-dmz").unwrap();
        assert_eq!(
            v.mapped_switch("b", "dr-lan", "a").unwrap().as_deref(),
            Some("lan")
        );
        assert_eq!(
            v.mapped_switch("a", "lan", "b").unwrap().as_deref(),
            Some("dr-lan")
        );
        assert_eq!(v.mapped_switch("a", "wan", "b").unwrap(), None);
        // Mapping lan again replaces its old partner in both directions' lookups from a.
        v.map_network("a", "lan", "b", "dr-lan2").unwrap();
        assert_eq!(
            v.network_map("a").unwrap(),
            [
                ("dmz".to_string(), "b".to_string(), "dr-dmz".to_string()),
                ("lan".to_string(), "b".to_string(), "dr-lan2".to_string()),
            ]
        );
        assert_eq!(v.plan_steps("p").unwrap(), serde_json::json!([]));
        let steps = serde_json::json!([{"pre": "true", "parallel": 2}]);
        v.set_plan_steps("p", &steps).unwrap();
        assert_eq!(v.plan_steps("p").unwrap(), steps);
        assert_eq!(v.plan_progress("p").unwrap(), None);
        let progress = serde_json::json!({"state": "paused", "next_group": 1});
        v.set_plan_progress("p", Some(&progress)).unwrap();
        assert_eq!(v.plan_progress("p").unwrap(), Some(progress));
    }
}
