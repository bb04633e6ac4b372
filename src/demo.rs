//! `ferry demo`: the whole lifecycle on the embedded defaults, with a summary table.
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use ferry_engine::{Engine, FailbackOpts, FailoverMode, RunOpts};
use ferry_hypervisor::{qmp::Qmp, Power};
use ferry_model::{format_bytes, DriverKind, Job, SiteRole};
use rand::{Rng, RngCore, SeedableRng};
use serde_json::json;

use crate::output;

pub(crate) const VM: &str = "app1";

/// The blocks a guest writes: `fraction` of the 64 KiB blocks of a disk of `size` bytes,
/// text-like, binary and zeroed, deterministic from `seed`.
fn guest_blocks(size: u64, fraction: f64, seed: u64) -> Vec<(u64, Vec<u8>)> {
    let bs = 65536u64;
    let blocks = size.div_ceil(bs);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let n = ((blocks as f64) * fraction).ceil() as u64;
    let words: &[&[u8]] = &[
        b"ferry ",
        b"replica ",
        b"block ",
        b"failback ",
        b"journal ",
        b"site ",
        b"2026-11-26 ",
        b"INFO ",
        b"commit\n",
    ];
    let mut out = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let b = rng.gen_range(0..blocks);
        let len = (size - b * bs).min(bs) as usize;
        let mut buf = vec![0u8; len];
        match rng.gen_range(0..10) {
            0..=4 => {
                let mut p = 0;
                while p < len {
                    let w = words[rng.gen_range(0..words.len())];
                    let k = w.len().min(len - p);
                    buf[p..p + k].copy_from_slice(&w[..k]);
                    p += k;
                }
            }
            5..=8 => rng.fill_bytes(&mut buf),
            _ => {}
        }
        out.push((b * bs, buf));
    }
    out
}

/// Writes `fraction` of the blocks of every disk of the active copy of the VM as its guest
/// would: into the disk file (`dir` driver), through QEMU's block layer with `qemu-io` over
/// QMP (running `qemu` VM), or through the driver (stopped `qemu` VM). Returns bytes written.
fn guest_writes(
    e: &Engine,
    host: Option<&str>,
    scratch: &Path,
    fraction: f64,
    seed: u64,
) -> Result<u64> {
    let (h, info) = e.locate_vm(VM, host)?;
    let mut written = 0;
    for d in &info.disks {
        let blocks = guest_blocks(d.size, fraction, seed + d.index as u64);
        written += blocks.iter().map(|(_, b)| b.len() as u64).sum::<u64>();
        match (h.driver, info.power) {
            (DriverKind::Dir, _) => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(&d.path)
                    .with_context(|| format!("opening {}", d.path.display()))?;
                for (off, buf) in &blocks {
                    f.write_all_at(buf, *off)?;
                }
                f.sync_all()?;
            }
            (DriverKind::Qemu, Power::Running) => {
                let qmp = info
                    .qmp
                    .as_ref()
                    .context("a running QEMU VM has a QMP socket")?;
                let mut q = Qmp::connect(qmp)?;
                let dev = d.device.as_deref().context("a QEMU disk has a device id")?;
                let src = scratch.join("guest-block.bin");
                for (off, buf) in &blocks {
                    let cmd = if buf.iter().all(|&x| x == 0) {
                        format!("write -z {off} {}", buf.len())
                    } else {
                        std::fs::write(&src, buf)?;
                        format!("write -s {} {off} {}", src.display(), buf.len())
                    };
                    let out = q.human_monitor_command(&format!(
                        "qemu-io -d {dev}/virtio-backend \"{cmd}\""
                    ))?;
                    if !out.is_empty() {
                        bail!("the guest's write failed: {}", out.trim());
                    }
                }
                let _ = std::fs::remove_file(&src);
            }
            (DriverKind::Qemu, Power::Stopped) => {
                let dev = e.driver(&h)?.open_disk(VM, d.index, true)?;
                for (off, buf) in &blocks {
                    if buf.iter().all(|&x| x == 0) {
                        dev.write_zeroes(*off, buf.len() as u64)?;
                    } else {
                        dev.write_at(*off, buf)?;
                    }
                }
                dev.flush()?;
            }
        }
    }
    Ok(written)
}

/// True when every disk of the copies on hosts `a` and `b` holds the same bytes (read through
/// the drivers, so any disk format compares).
fn identical(e: &Engine, a: &str, b: &str) -> Result<bool> {
    let (ha, ia) = e.locate_vm(VM, Some(a))?;
    let (hb, ib) = e.locate_vm(VM, Some(b))?;
    if ia.disks.len() != ib.disks.len() {
        return Ok(false);
    }
    let (da, db) = (e.driver(&ha)?, e.driver(&hb)?);
    for (x, y) in ia.disks.iter().zip(&ib.disks) {
        if x.size != y.size {
            return Ok(false);
        }
        let fa = da.open_disk(VM, x.index, false)?;
        let fb = db.open_disk(VM, y.index, false)?;
        let mut ba = vec![0u8; 4 << 20];
        let mut bb = vec![0u8; 4 << 20];
        let mut off = 0;
        while off < x.size {
            let n = (x.size - off).min(ba.len() as u64) as usize;
            fa.read_at(off, &mut ba[..n])?;
            fb.read_at(off, &mut bb[..n])?;
            if ba[..n] != bb[..n] {
                return Ok(false);
            }
            off += n as u64;
        }
    }
    Ok(true)
}

/// Stops the demo VM on both hosts when dropped (no QEMU outlives the demo).
pub(crate) struct StopVms<'a>(pub(crate) &'a Engine);

impl Drop for StopVms<'_> {
    fn drop(&mut self) {
        for h in ["hv1", "dr1"] {
            let Ok(host) = self.0.host(h) else { continue };
            let Ok(d) = self.0.driver(&host) else {
                continue;
            };
            if d.get_vm(VM).ok().flatten().is_some() {
                let _ = d.stop_vm(VM);
            }
        }
    }
}

/// One step of a demo: what it did, its job, how long it took.
pub(crate) struct Row {
    pub(crate) what: String,
    pub(crate) job: Job,
    pub(crate) secs: f64,
}

/// Runs one step of a demo and adds its row (a continued job, like `complete`'s, counts only
/// what this run moved).
pub(crate) fn time_step(
    rows: &mut Vec<Row>,
    what: &str,
    f: &mut dyn FnMut() -> Result<Job>,
) -> Result<()> {
    let t = Instant::now();
    let mut job = f()?;
    if let Some(prev) = rows.iter().rev().find(|r| r.job.id == job.id) {
        job.bytes_read -= prev.job.bytes_read.min(job.bytes_read);
        job.bytes_transferred -= prev.job.bytes_transferred.min(job.bytes_transferred);
        job.bytes_written -= prev.job.bytes_written.min(job.bytes_written);
    }
    rows.push(Row {
        what: what.into(),
        job,
        secs: t.elapsed().as_secs_f64(),
    });
    Ok(())
}

/// Where a demo's installation lives: `--dir`, or a temporary folder removed afterwards.
pub(crate) struct DemoPlace {
    _tmp: Option<TempDir>,
    /// The folder.
    pub(crate) dir: PathBuf,
    /// The ferry home in it.
    pub(crate) home: PathBuf,
    /// True when the folder stays (`--dir`).
    pub(crate) keep: bool,
}

impl DemoPlace {
    /// The folder of `--dir` (created), or a new temporary one; refuses one that already
    /// holds an installation.
    pub(crate) fn new(dir: Option<PathBuf>) -> Result<Self> {
        let keep = dir.is_some();
        let (tmp, dir) = match dir {
            Some(d) => {
                std::fs::create_dir_all(&d)?;
                (None, d)
            }
            None => {
                let t = tempdir()?;
                let d = t.0.clone();
                (Some(t), d)
            }
        };
        let home = dir.join("home");
        if home.join(ferry_vault::VAULT_FILE).exists() {
            bail!(
                "{} already holds a ferry installation; pass an empty --dir",
                home.display()
            );
        }
        Ok(DemoPlace {
            _tmp: tmp,
            dir,
            home,
            keep,
        })
    }

    /// A new installation there, with progress bars on a terminal.
    pub(crate) fn engine(&self, as_json: bool) -> Result<Engine> {
        let mut e = Engine::init(&self.home)?;
        if output::show_progress(as_json) {
            let (obs, _) = output::progress_observer();
            e.set_observer(obs);
        }
        Ok(e)
    }
}

/// Prints the demo's summary table.
pub(crate) fn print_rows(rows: &[Row]) {
    println!();
    println!(
        "{:<66} {:>10} {:>12} {:>10} {:>8} {:>9}",
        "step", "read", "transferred", "written", "time", "downtime"
    );
    for r in rows {
        println!(
            "{:<66} {:>10} {:>12} {:>10} {:>7.2}s {:>9}",
            r.what,
            format_bytes(r.job.bytes_read),
            format_bytes(r.job.bytes_transferred),
            format_bytes(r.job.bytes_written),
            r.secs,
            r.job
                .downtime_ms
                .map(|d| format!("{d} ms"))
                .unwrap_or_else(|| "-".into())
        );
    }
}

/// Runs the demo.
pub fn run(dir: Option<PathBuf>, disk_size: u64, driver: DriverKind, as_json: bool) -> Result<()> {
    if disk_size < 1 << 20 {
        bail!("--disk-size must be at least 1MiB");
    }
    if driver == DriverKind::Qemu && !ferry_hypervisor::QemuDriver::available() {
        bail!("`ferry demo --driver qemu` needs QEMU (qemu-system-x86_64, qemu-img, qemu-nbd); install it (from ferry's source tree: `scripts/install-deps.sh`) or run `ferry demo` on the built-in dir driver");
    }
    let place = DemoPlace::new(dir)?;
    let (dir, home, keep) = (place.dir.clone(), place.home.clone(), place.keep);
    let say = |s: &str| {
        if !as_json {
            println!("==> {s}");
        }
    };
    let e = place.engine(as_json)?;
    say(&format!("installation in {}", home.display()));
    e.add_site("onprem", SiteRole::Primary, None, true)?;
    e.add_site("cloud", SiteRole::Recovery, None, true)?;
    e.add_host(
        "hv1",
        "onprem",
        driver,
        None,
        vec!["lan".into(), "dmz".into()],
        None,
        false,
    )?;
    e.add_host(
        "dr1",
        "cloud",
        driver,
        None,
        vec!["lan".into(), "dmz".into()],
        None,
        false,
    )?;
    // No QEMU outlives the demo (the dir driver's "running" is only a flag).
    let _stop = (driver == DriverKind::Qemu).then_some(StopVms(&e));
    let scratch = dir.clone();
    let h = e.host("hv1")?;
    let d = e.driver(&h)?;
    d.create_vm(&ferry_hypervisor::VmSpec {
        name: VM.into(),
        cpus: 2,
        memory: 2 << 30,
        disks: vec![disk_size, (disk_size / 4).max(1 << 20) + 12345],
        nics: vec!["lan".into(), "dmz".into()],
        image: None,
    })?;
    say(&format!(
        "VM {VM} on hv1 ({} driver): disks of {} and {}; writing realistic content",
        driver.as_str(),
        format_bytes(disk_size),
        format_bytes((disk_size / 4).max(1 << 20) + 12345)
    ));
    guest_writes(&e, None, &scratch, 0.7, 1)?;
    d.start_vm(VM)?;
    let opts = RunOpts::default();
    let mut rows: Vec<Row> = Vec::new();
    let mut timed = |what: &str, f: &mut dyn FnMut() -> Result<Job>| -> Result<()> {
        say(what);
        time_step(&mut rows, what, f)
    };
    timed(
        "protect to the cloud site (initial replication)",
        &mut || {
            e.protect(
                VM,
                "cloud",
                &ferry_engine::Protection {
                    rpo: std::time::Duration::from_secs(300),
                    retention: std::time::Duration::from_secs(86400),
                    block_size: 65536,
                    app: ferry_engine::AppPolicy::default(),
                },
                opts,
            )
        },
    )?;
    guest_writes(&e, None, &scratch, 0.02, 10)?;
    timed("replicate (2% of blocks changed)", &mut || {
        e.replicate(VM, opts, false, false)
    })?;
    timed("planned failover to dr1", &mut || {
        e.failover(VM, FailoverMode::Planned, None, None, opts)
    })?;
    timed("commit failover", &mut || e.commit(VM))?;
    say("the VM runs in the cloud for a while: 5% of its blocks change, some are zeroed");
    guest_writes(&e, None, &scratch, 0.05, 20)?;
    let rec = e
        .failback(
            VM,
            &FailbackOpts {
                dry_run: true,
                run: Some(opts),
                ..Default::default()
            },
        )?
        .1
        .context("dry run")?;
    say(&format!(
        "dry run: {} would move ({} blocks); recommended --sync {} ({})",
        format_bytes(rec.bytes_to_move),
        rec.blocks_to_move,
        rec.recommended_sync.as_str(),
        rec.reason
    ));
    timed(
        "failback phase 1 (delta, recovery VM keeps running)",
        &mut || {
            e.failback(
                VM,
                &FailbackOpts {
                    run: Some(opts),
                    ..Default::default()
                },
            )?
            .0
            .context("job")
        },
    )?;
    say("more guest writes between phase 1 and complete (0.5%)");
    guest_writes(&e, None, &scratch, 0.005, 30)?;
    timed(
        "complete: phase 2 (stop recovery VM, last delta, start primary)",
        &mut || e.complete(VM, opts, false),
    )?;
    let same = identical(&e, "hv1", "dr1")?;
    if !same {
        bail!("the primary disks differ from the recovery disks after the failback — this is a bug, please report it");
    }
    say("verified: primary disks are bit-identical to the recovery disks at shutdown");
    timed("commit failback (recovery VM deleted)", &mut || {
        e.commit(VM)
    })?;
    guest_writes(&e, None, &scratch, 0.01, 40)?;
    timed("reverse replicate (1% changed since failback)", &mut || {
        e.reverse_replicate(VM, opts, false)
    })?;
    let state = e.status(VM)?;
    if as_json {
        output::json(&json!({
            "dir": dir,
            "state": state.state,
            "bit_identical": same,
            "steps": rows.iter().map(|r| json!({"step": r.what, "job": r.job, "seconds": r.secs})).collect::<Vec<_>>(),
        }));
    } else {
        print_rows(&rows);
        println!();
        println!(
            "{VM} is {} again, active at the {} site; primary disks verified bit-identical.",
            state.state, state.active_site
        );
        if driver == DriverKind::Qemu {
            println!("(its QEMU process is stopped now; `ferry vm start {VM}` runs it again)");
        }
        if keep {
            println!(
                "Explore it: ferry --home {} status {VM}   (or `jobs --all`, `points {VM}`)",
                home.display()
            );
        } else {
            println!("(the temporary installation was removed; `ferry demo --dir DIR` keeps one to explore)");
        }
    }
    Ok(())
}

/// A temporary folder removed on drop.
pub(crate) struct TempDir(pub(crate) PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn tempdir() -> Result<TempDir> {
    let base = std::env::temp_dir().join(format!("ferry-demo-{}", std::process::id()));
    std::fs::create_dir_all(&base)?;
    Ok(TempDir(base))
}
