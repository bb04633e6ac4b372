//! Durable jobs: progress counters, cancellation, bandwidth caps, and the reporter thread that
//! persists progress and notices `ferry cancel` from other processes.
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_model::{Job, JobState};
use ferry_vault::{Runner, Vault};

/// The error a job returns when `ferry cancel` stopped it.
#[derive(Debug, Clone, Copy, thiserror::Error)]
#[error("cancelled")]
pub struct Cancelled;

/// Receives a snapshot of a running job a few times a second (for progress bars).
pub type Observer = Arc<dyn Fn(&Job) + Send + Sync>;

/// Live state shared by the workers of one job.
pub struct JobCtx {
    /// Worker threads for hashing and compression.
    pub threads: usize,
    read: AtomicU64,
    transferred: AtomicU64,
    written: AtomicU64,
    step_done: AtomicU64,
    cancel: AtomicBool,
    bandwidth: Option<u64>,
    throttle_start: Mutex<Option<(Instant, u64)>>,
    /// The running step's `mid` fault point, until its first durable batch.
    mid_point: Mutex<Option<String>>,
}

impl JobCtx {
    /// A context with `threads` workers and an optional cap on transferred bytes per second.
    pub fn new(threads: usize, bandwidth: Option<u64>) -> Self {
        JobCtx {
            threads: threads.max(1),
            read: AtomicU64::new(0),
            transferred: AtomicU64::new(0),
            written: AtomicU64::new(0),
            step_done: AtomicU64::new(0),
            cancel: AtomicBool::new(false),
            bandwidth,
            throttle_start: Mutex::new(None),
            mid_point: Mutex::new(None),
        }
    }

    /// The running step's `mid` fault point, while its first durable batch is ahead.
    pub fn mid_point(&self) -> Option<String> {
        self.mid_point.lock().unwrap().clone()
    }

    /// Arms `point` as the `mid` fault point of the work this context counts (an agent
    /// arms the one of the control plane's step).
    pub fn arm_mid_point(&self, point: Option<String>) {
        *self.mid_point.lock().unwrap() = point;
    }

    /// Called by a transfer each time a batch is durable (written and synced with its
    /// journal, or a pack stored with its index): the first one of a step is its `mid`
    /// fault point (see [`crate::faults`]).
    pub fn batch_durable(&self) {
        let p = self.mid_point.lock().unwrap().take();
        if let Some(p) = p {
            crate::faults::fire(&p);
        }
    }

    /// Counts bytes read from a disk.
    pub fn add_read(&self, n: u64) {
        self.read.fetch_add(n, Ordering::Relaxed);
    }

    /// Bytes read from disks so far.
    pub fn bytes_read(&self) -> u64 {
        self.read.load(Ordering::Relaxed)
    }

    /// Counts bytes written to a disk.
    pub fn add_written(&self, n: u64) {
        self.written.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts progress of the current step.
    pub fn add_step_done(&self, n: u64) {
        self.step_done.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts payload that crossed between the sites, sleeping as needed to honour the cap.
    pub fn add_transferred(&self, n: u64) {
        let total = self.transferred.fetch_add(n, Ordering::Relaxed) + n;
        let Some(rate) = self.bandwidth else { return };
        let (start, base) = {
            let mut g = self.throttle_start.lock().unwrap();
            *g.get_or_insert((Instant::now(), total - n))
        };
        loop {
            let allowed = start.elapsed().as_secs_f64() * rate as f64;
            let sent = (total - base) as f64;
            if sent <= allowed + rate as f64 / 20.0 || self.is_cancelled() {
                return;
            }
            let wait = ((sent - allowed) / rate as f64).min(0.1);
            std::thread::sleep(Duration::from_secs_f64(wait.max(0.001)));
        }
    }

    /// The cap on transferred bytes per second, if any.
    pub fn bandwidth(&self) -> Option<u64> {
        self.bandwidth
    }

    /// Counters so far: bytes read, transferred, written, and the step's progress not yet
    /// reported (as `(read, transferred, written, step_done)`).
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        (
            self.read.load(Ordering::Relaxed),
            self.transferred.load(Ordering::Relaxed),
            self.written.load(Ordering::Relaxed),
            self.step_done.load(Ordering::Relaxed),
        )
    }

    /// Adds counters that another process (an agent) measured; its own cap already applied.
    pub fn add_remote(&self, read: u64, transferred: u64, written: u64, step_done: u64) {
        self.read.fetch_add(read, Ordering::Relaxed);
        self.transferred.fetch_add(transferred, Ordering::Relaxed);
        self.written.fetch_add(written, Ordering::Relaxed);
        self.step_done.fetch_add(step_done, Ordering::Relaxed);
    }

    /// Asks the workers to stop.
    pub fn cancel(&self) {
        self.cancel.store(true, Ordering::SeqCst);
    }

    /// True once the job should stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn take_step_done(&self) -> u64 {
        self.step_done.swap(0, Ordering::Relaxed)
    }
}

/// This process as a job runner.
pub fn this_runner() -> Runner {
    let pid = std::process::id() as i64;
    Runner {
        pid,
        start: process_start(pid).unwrap_or_default(),
    }
}

fn process_start(pid: i64) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22 (starttime) counts from after the parenthesised command name.
    let after = &stat[stat.rfind(')')? + 2..];
    let state = after.split_whitespace().next()?;
    if state == "Z" || state == "X" {
        return None; // a zombie is dead for our purposes
    }
    after.split_whitespace().nth(19).map(|s| s.to_string())
}

/// True when the recorded runner process is still alive.
pub fn runner_alive(r: &Runner) -> bool {
    process_start(r.pid).is_some_and(|s| s == r.start)
}

/// A job being worked on by this process.
pub struct JobRun {
    shared: Arc<Mutex<Job>>,
    /// Workers' live counters.
    pub ctx: Arc<JobCtx>,
    base: (u64, u64, u64),
    current_step: Arc<Mutex<Option<usize>>>,
    step_started: Mutex<Option<Instant>>,
    stop: Arc<AtomicBool>,
    reporter: Option<std::thread::JoinHandle<()>>,
    home: PathBuf,
}

impl JobRun {
    /// Starts tracking `job` (already created or claimed in the vault) from this process.
    pub fn start(home: PathBuf, job: Job, ctx: JobCtx, observer: Option<Observer>) -> Self {
        let base = (job.bytes_read, job.bytes_transferred, job.bytes_written);
        let shared = Arc::new(Mutex::new(job));
        let ctx = Arc::new(ctx);
        let stop = Arc::new(AtomicBool::new(false));
        let current_step = Arc::new(Mutex::new(None));
        let mut run = JobRun {
            shared,
            ctx,
            base,
            current_step,
            step_started: Mutex::new(None),
            stop,
            reporter: None,
            home,
        };
        let (shared, ctx, stop, home, cur) = (
            run.shared.clone(),
            run.ctx.clone(),
            run.stop.clone(),
            run.home.clone(),
            run.current_step.clone(),
        );
        run.reporter = Some(std::thread::spawn(move || {
            let vault = Vault::open(&home).ok();
            let mut last_save = Instant::now();
            while !stop.load(Ordering::SeqCst) {
                std::thread::park_timeout(Duration::from_millis(100));
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let snap = snapshot(&shared, &ctx, base, &cur);
                if let Some(o) = &observer {
                    o(&snap);
                }
                if last_save.elapsed() >= Duration::from_millis(300) {
                    last_save = Instant::now();
                    if let Some(v) = &vault {
                        let _ = v.save_progress(&snap);
                        if v.cancel_requested(snap.id).unwrap_or(false) {
                            ctx.cancel();
                        }
                    }
                }
            }
        }));
        run
    }

    /// Job id.
    pub fn id(&self) -> i64 {
        self.shared.lock().unwrap().id
    }

    /// The job as it stands now.
    pub fn snapshot(&self) -> Job {
        snapshot(&self.shared, &self.ctx, self.base, &self.current_step)
    }

    /// Index of the step named `name`, adding it (queued) at the end if new.
    pub fn step_index(&self, name: &str) -> usize {
        let mut j = self.shared.lock().unwrap();
        if let Some(i) = j.steps.iter().position(|s| s.name == name) {
            return i;
        }
        j.steps.push(ferry_model::Step {
            name: name.into(),
            state: JobState::Queued,
            bytes_done: 0,
            bytes_total: 0,
            elapsed_ms: None,
        });
        j.steps.len() - 1
    }

    /// Marks step `name` running with `total` bytes to process; its `before` fault point
    /// fires first, and its `mid` one is armed (see [`crate::faults`]).
    pub fn begin_step(&self, name: &str, total: u64) {
        let kind = self.shared.lock().unwrap().kind;
        crate::faults::fire(&crate::faults::point(
            kind,
            name,
            crate::faults::When::Before,
        ));
        *self.ctx.mid_point.lock().unwrap() = crate::faults::DATA_STEPS
            .contains(&name)
            .then(|| crate::faults::point(kind, name, crate::faults::When::Mid));
        let i = self.step_index(name);
        let again = *self.current_step.lock().unwrap() == Some(i);
        if !again {
            self.end_timing();
            *self.step_started.lock().unwrap() = Some(Instant::now());
        }
        self.fold_step();
        self.ctx.take_step_done();
        let mut j = self.shared.lock().unwrap();
        j.steps[i].state = JobState::Running;
        j.steps[i].bytes_total = total;
        j.steps[i].bytes_done = 0;
        *self.current_step.lock().unwrap() = Some(i);
    }

    /// Adds `n` bytes to the running step's total (work found while it runs, e.g. the writes
    /// that follow a capture).
    pub fn add_step_total(&self, n: u64) {
        if let Some(i) = *self.current_step.lock().unwrap() {
            self.shared.lock().unwrap().steps[i].bytes_total += n;
        }
    }

    /// Marks the running step succeeded; then its `after` fault point fires.
    pub fn end_step(&self) {
        self.end_timing();
        self.fold_step();
        *self.ctx.mid_point.lock().unwrap() = None;
        let after = {
            let mut j = self.shared.lock().unwrap();
            let kind = j.kind;
            self.current_step.lock().unwrap().take().map(|i| {
                j.steps[i].state = JobState::Succeeded;
                j.steps[i].bytes_done = j.steps[i].bytes_done.max(j.steps[i].bytes_total);
                crate::faults::point(kind, &j.steps[i].name, crate::faults::When::After)
            })
        };
        if let Some(p) = after {
            crate::faults::fire(&p);
        }
    }

    /// Adds the running step's time so far to its `elapsed_ms`.
    fn end_timing(&self) {
        let Some(t) = self.step_started.lock().unwrap().take() else {
            return;
        };
        if let Some(i) = *self.current_step.lock().unwrap() {
            let mut j = self.shared.lock().unwrap();
            let e = &mut j.steps[i].elapsed_ms;
            *e = Some(e.unwrap_or(0) + t.elapsed().as_millis() as u64);
        }
    }

    fn fold_step(&self) {
        let done = self.ctx.take_step_done();
        let cur = *self.current_step.lock().unwrap();
        if let Some(i) = cur {
            self.shared.lock().unwrap().steps[i].bytes_done += done;
        }
    }

    /// Adds a note for the user to the job (kept with it; shown by `job show`). A note
    /// already there is not repeated (a resumed job may say the same thing again).
    pub fn note(&self, msg: impl Into<String>) {
        let msg = msg.into();
        tracing::info!("job note: {msg}");
        let mut j = self.shared.lock().unwrap();
        if !j.notes.contains(&msg) {
            j.notes.push(msg);
        }
    }

    /// Records the workload's downtime.
    pub fn set_downtime(&self, d: Duration) {
        self.shared.lock().unwrap().downtime_ms = Some(d.as_millis() as u64);
    }

    /// Stops the reporter, marks the running step with `state`, and persists the job in `state`.
    pub fn close(
        mut self,
        vault: &Vault,
        state: JobState,
        error: Option<&str>,
    ) -> anyhow::Result<Job> {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.reporter.take() {
            h.thread().unpark();
            let _ = h.join();
        }
        self.fold_step();
        {
            let mut j = self.shared.lock().unwrap();
            if let Some(i) = self.current_step.lock().unwrap().take() {
                j.steps[i].state = if state == JobState::Waiting {
                    JobState::Succeeded
                } else {
                    state
                };
            }
        }
        let snap = self.snapshot();
        vault.save_progress(&snap)?;
        vault.set_job_state(snap.id, state, error)?;
        Ok(vault.job(snap.id)?.unwrap_or(snap))
    }
}

impl Drop for JobRun {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.reporter.take() {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

fn snapshot(
    shared: &Mutex<Job>,
    ctx: &JobCtx,
    base: (u64, u64, u64),
    cur: &Mutex<Option<usize>>,
) -> Job {
    let mut j = shared.lock().unwrap().clone();
    j.bytes_read = base.0 + ctx.read.load(Ordering::Relaxed);
    j.bytes_transferred = base.1 + ctx.transferred.load(Ordering::Relaxed);
    j.bytes_written = base.2 + ctx.written.load(Ordering::Relaxed);
    if let Some(i) = *cur.lock().unwrap() {
        j.steps[i].bytes_done += ctx.step_done.load(Ordering::Relaxed);
    }
    j
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_fake_one_is_not() {
        let me = this_runner();
        assert!(runner_alive(&me));
        let mut other = me.clone();
        other.start.push('9');
        assert!(!runner_alive(&other));
    }

    #[test]
    fn bandwidth_cap_slows_transfers() {
        let ctx = JobCtx::new(1, Some(10 << 20));
        let t = Instant::now();
        for _ in 0..30 {
            ctx.add_transferred(256 << 10); // 7.5 MiB at 10 MiB/s
        }
        let e = t.elapsed().as_secs_f64();
        assert!(e > 0.6, "capped transfer took only {e}s");
    }
}
