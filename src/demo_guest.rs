//! `ferry demo --driver qemu --guest`: the story on real QEMU with ferry's test guest, a tiny
//! Linux that writes checksummed files without pause and checks them at every boot. The demo
//! prints what the guest found after each move: a clean file system and every file it had
//! fsynced before its VM stopped.
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Result};
use ferry_engine::{Engine, FailbackOpts, FailoverMode, RunOpts};
use ferry_hypervisor::guest::{console_path, read_console, wait_console, BootReport};
use ferry_model::{format_bytes, DriverKind, Job, SiteRole};
use serde_json::json;

use crate::demo::{print_rows, time_step, DemoPlace, Row, StopVms, VM};
use crate::output;

/// Longest wait for the guest to boot and check its disk (TCG: ~2 s; a slow machine: more).
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// The console log of the copy of the demo VM on `host`.
fn console(e: &Engine, host: &str) -> Result<PathBuf> {
    Ok(console_path(&e.host(host)?.root, VM))
}

/// Waits until the guest on `host` booted (more than `boots` boots in its log), checked its
/// disk and wrote `files` more files; fails when its checks found damage.
fn wait_guest(e: &Engine, host: &str, boots: usize, files: u64) -> Result<BootReport> {
    let path = console(e, host)?;
    let b = wait_console(&path, BOOT_TIMEOUT, |b| {
        b.boots > boots && b.checked() && (!b.clean() || b.synced >= b.last_at_boot + files)
    })
    .map_err(|_| {
        anyhow::anyhow!(
            "the guest on {host} did not boot and write within {BOOT_TIMEOUT:?} (see {}); under nested KVM run with FERRY_QEMU_ACCEL=tcg",
            path.display()
        )
    })?;
    if !b.clean() {
        bail!(
            "the guest on {host} found damage at boot (this is a bug, please report it):\n{}",
            b.lines.join("\n")
        );
    }
    Ok(b)
}

/// The guest's check at a boot, in words.
fn check_line(host: &str, b: &BootReport) -> String {
    format!(
        "guest on {host}: file system clean (e2fsck -fn exit {}), {} files verified by sha256sum, none damaged{}",
        b.fsck.unwrap_or(-1),
        b.ok,
        if b.malformed > 0 {
            " (the last checksum line was torn by the stop, as after a power cut)"
        } else {
            ""
        }
    )
}

/// Runs the guest demo in `dir` (default: a temporary folder).
pub fn run(dir: Option<PathBuf>, disk_size: u64, as_json: bool) -> Result<()> {
    if !ferry_hypervisor::QemuDriver::available() {
        bail!("`ferry demo --guest` needs QEMU (qemu-system-x86_64, qemu-img, qemu-nbd); install it (from ferry's source tree: `scripts/install-deps.sh`)");
    }
    let image = ferry_hypervisor::qemu::guest_image_dir();
    if !image.join("vmlinuz").is_file() {
        bail!(
            "the test guest is not built in {}: run `scripts/guest-image.sh` from ferry's source tree (or set FERRY_GUEST_IMAGE)",
            image.display()
        );
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
    // TCG unless FERRY_QEMU_ACCEL says otherwise: the guest boots in seconds with it, and
    // nested KVM (CI machines, cloud VMs) may hang a Linux guest.
    for (h, site) in [("hv1", "onprem"), ("dr1", "cloud")] {
        e.add_host(
            h,
            site,
            DriverKind::Qemu,
            None,
            vec!["lan".into()],
            Some("tcg".into()),
            false,
        )?;
    }
    let _stop = StopVms(&e);
    let d = e.driver(&e.host("hv1")?)?;
    d.create_vm(&ferry_hypervisor::VmSpec {
        name: VM.into(),
        cpus: 1,
        memory: 256 << 20,
        disks: vec![disk_size],
        nics: vec!["lan".into()],
        image: Some(ferry_hypervisor::qemu::GUEST_IMAGE.into()),
    })?;
    say(&format!(
        "VM {VM} on hv1 boots the test guest; it writes checksummed files to its {} data disk",
        format_bytes(disk_size)
    ));
    d.start_vm(VM)?;
    let b = wait_guest(&e, "hv1", 0, 5)?;
    say(&check_line("hv1", &b));
    let opts = RunOpts::default();
    let mut rows: Vec<Row> = Vec::new();
    let mut checks = Vec::new();
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
                    rpo: Duration::from_secs(300),
                    retention: Duration::from_secs(86400),
                    block_size: 65536,
                    app: ferry_engine::AppPolicy::default(),
                },
                opts,
            )
        },
    )?;
    wait_guest(&e, "hv1", 0, 10)?;
    timed(
        "replicate --app-consistent (guest frozen by its agent)",
        &mut || e.replicate(VM, opts, false, true),
    )?;
    let p = e.vault.points(VM)?;
    say(&format!(
        "point {} is {}-consistent",
        p[0].id,
        p[0].consistency.as_str()
    ));
    timed("planned failover to dr1", &mut || {
        e.failover(VM, FailoverMode::Planned, None, None, opts)
    })?;
    let stopped = read_console(&console(&e, "hv1")?).synced;
    let b = wait_guest(&e, "dr1", 0, 5)?;
    say(&check_line("dr1", &b));
    if b.last_at_boot < stopped {
        bail!("the recovery copy lacks files the primary fsynced before it stopped (f-{stopped:06}, has f-{:06}); this is a bug, please report it", b.last_at_boot);
    }
    checks.push(json!({"host": "dr1", "after": "planned failover", "fsck": b.fsck, "files_ok": b.ok, "failed": b.failed, "last_fsynced_before_stop": stopped}));
    timed("commit failover", &mut || e.commit(VM))?;
    say("the guest keeps writing in the cloud; failback phase 1 runs beside it");
    wait_guest(&e, "dr1", 0, 10)?;
    timed(
        "failback phase 1 (delta, the guest keeps writing)",
        &mut || {
            e.failback(
                VM,
                &FailbackOpts {
                    run: Some(opts),
                    ..Default::default()
                },
            )?
            .0
            .ok_or_else(|| anyhow::anyhow!("no failback job"))
        },
    )?;
    let before = read_console(&console(&e, "dr1")?).synced;
    wait_guest(&e, "dr1", 0, before.saturating_sub(b.last_at_boot) + 3)?;
    let boots = read_console(&console(&e, "hv1")?).boots;
    timed(
        "complete: phase 2 (stop recovery VM, last delta, start primary)",
        &mut || e.complete(VM, opts, false),
    )?;
    let stopped = read_console(&console(&e, "dr1")?).synced;
    let b = wait_guest(&e, "hv1", boots, 3)?;
    say(&check_line("hv1", &b));
    if b.last_at_boot < stopped {
        bail!("the primary lacks files the recovery VM fsynced before it stopped (f-{stopped:06}, has f-{:06}); this is a bug, please report it", b.last_at_boot);
    }
    say(&format!(
        "every file the guest fsynced before the recovery VM stopped (up to f-{stopped:06}) is on the primary"
    ));
    checks.push(json!({"host": "hv1", "after": "failback", "fsck": b.fsck, "files_ok": b.ok, "failed": b.failed, "last_fsynced_before_stop": stopped}));
    timed("commit failback (recovery VM deleted)", &mut || {
        e.commit(VM)
    })?;
    wait_guest(&e, "hv1", boots, 6)?;
    timed("reverse replicate (changes since failback)", &mut || {
        e.reverse_replicate(VM, opts, false)
    })?;
    let state = e.status(VM)?;
    if as_json {
        output::json(&json!({
            "dir": dir,
            "state": state.state,
            "guest_checks": checks,
            "steps": rows.iter().map(|r| json!({"step": r.what, "job": r.job, "seconds": r.secs})).collect::<Vec<_>>(),
        }));
    } else {
        print_rows(&rows);
        println!();
        println!(
            "{VM} is {} again, active at the {} site; its guest found a clean file system and every fsynced file after each move.",
            state.state, state.active_site
        );
        if keep {
            println!(
                "(its QEMU process is stopped now; the guest's console is {})",
                console(&e, "hv1")?.display()
            );
        } else {
            println!("(the temporary installation was removed; `ferry demo --driver qemu --guest --dir DIR` keeps one to explore)");
        }
    }
    Ok(())
}
