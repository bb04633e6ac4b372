//! The `qemu` driver against real QEMU (TCG). Skipped with a note when QEMU is not installed.
use std::path::Path;
use std::time::{Duration, Instant};

use ferry_hypervisor::qemu::{Accel, QemuDriver};
use ferry_hypervisor::qmp::Qmp;
use ferry_hypervisor::{HvError, Hypervisor, Power, VmSpec};
use ferry_model::{DriverKind, Host};

const MIB: u64 = 1 << 20;

fn driver(root: &Path) -> Option<QemuDriver> {
    if !QemuDriver::available() {
        eprintln!("note: QEMU is not installed (qemu-system-x86_64, qemu-img, qemu-nbd): qemu driver test skipped");
        return None;
    }
    let host = Host {
        name: "h1".into(),
        site: "prim".into(),
        driver: DriverKind::Qemu,
        root: root.to_path_buf(),
        switches: vec!["lan".into()],
        accel: None,
        agent: false,
    };
    Some(QemuDriver::new(host).unwrap().with_accel(Accel::Tcg))
}

/// Pids of processes whose command line mentions `root`.
fn processes_under(root: &Path) -> Vec<i32> {
    let needle = root.to_str().unwrap().as_bytes().to_vec();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        if stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z')
        {
            continue;
        }
        if let Ok(c) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            if c.windows(needle.len()).any(|w| w == needle.as_slice()) {
                out.push(pid);
            }
        }
    }
    out
}

/// Kills whatever a failed test left running under `root`.
struct Cleanup<'a>(&'a Path);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        for pid in processes_under(self.0) {
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
        }
    }
}

fn qmp_of(d: &QemuDriver, vm: &str) -> Qmp {
    let info = d.get_vm(vm).unwrap().unwrap();
    Qmp::connect(info.qmp.unwrap()).unwrap()
}

#[test]
fn qemu_vm_lifecycle_disks_and_death() {
    let dir = tempfile::tempdir().unwrap();
    let Some(d) = driver(dir.path()) else { return };
    let _cleanup = Cleanup(dir.path());

    let vm = d
        .create_vm(&VmSpec {
            name: "web1".into(),
            cpus: 1,
            memory: 128 * MIB,
            disks: vec![32 * MIB, 65536 + 7],
            nics: vec!["lan".into()],
            image: None,
        })
        .unwrap();
    assert_eq!(vm.power, Power::Stopped);
    assert_eq!(vm.disks[0].format, "qcow2");
    assert_eq!(vm.disks[1].size, 65536 + 7);
    assert_eq!(vm.disks[1].node.as_deref(), Some("disk1"));
    assert_eq!(vm.disks[1].device.as_deref(), Some("vblk1"));
    assert!(vm.qmp.as_ref().unwrap().ends_with("web1/qmp.sock"));
    let err = d
        .create_vm(&VmSpec {
            name: "web2".into(),
            cpus: 1,
            memory: 128 * MIB,
            disks: vec![MIB],
            nics: vec!["dmz".into()],
            image: None,
        })
        .unwrap_err();
    assert!(matches!(err, HvError::MissingSwitch { .. }), "{err}");

    // Stopped: qemu-nbd, writable.
    {
        let dev = d.open_disk("web1", 0, true).unwrap();
        assert_eq!(dev.size(), 32 * MIB);
        assert!(
            dev.data_ranges().unwrap().is_empty(),
            "a new disk is sparse"
        );
        dev.write_at(MIB, &[7u8; 65536]).unwrap();
        dev.write_at(8 * MIB, &[9u8; 65536]).unwrap();
        dev.write_zeroes(8 * MIB, 65536).unwrap();
        dev.flush().unwrap();
        let r = dev.data_ranges().unwrap();
        assert!(
            r.iter().any(|&(s, e)| s <= MIB && e >= MIB + 65536),
            "{r:?}"
        );
        let odd = d.open_disk("web1", 1, true).unwrap();
        assert_eq!(odd.size(), 65536 + 7);
        odd.write_at(65536, b"tail!!!").unwrap();
        let mut b = [0u8; 7];
        odd.read_at(65536, &mut b).unwrap();
        assert_eq!(&b, b"tail!!!");
        odd.flush().unwrap();
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("web1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("nbd-"))
        .collect();
    assert!(leftovers.is_empty(), "qemu-nbd files left: {leftovers:?}");
    assert!(
        processes_under(dir.path()).is_empty(),
        "qemu-nbd left running"
    );

    // Start (twice: idempotent).
    let t = Instant::now();
    d.start_vm("web1").unwrap();
    eprintln!("QEMU start (TCG) took {:?}", t.elapsed());
    d.start_vm("web1").unwrap();
    assert_eq!(d.get_vm("web1").unwrap().unwrap().power, Power::Running);
    // A lost pid file does not make a running QEMU look stopped.
    let pidfile = dir.path().join("web1/qemu.pid");
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    std::fs::remove_file(&pidfile).unwrap();
    assert_eq!(d.get_vm("web1").unwrap().unwrap().power, Power::Running);
    assert_eq!(std::fs::read_to_string(&pidfile).unwrap(), pid);

    // The guest writes through its virtio device.
    let mut q = qmp_of(&d, "web1");
    assert_eq!(
        q.execute("query-status", None).unwrap()["status"],
        "running"
    );
    let out = q
        .human_monitor_command(r#"qemu-io -d vblk0/virtio-backend "write -P 0xab 4M 2M""#)
        .unwrap();
    assert_eq!(out, "", "qemu-io failed");
    drop(q);

    // Running: read through QEMU's NBD server; writing is refused.
    {
        let dev = d.open_disk("web1", 0, false).unwrap();
        let mut b = vec![0u8; 2 * MIB as usize];
        dev.read_at(4 * MIB, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xab));
        let mut b = vec![0u8; 65536];
        dev.read_at(MIB, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 7));
        let r = dev.data_ranges().unwrap();
        assert!(
            r.iter().any(|&(s, e)| s <= 4 * MIB && e >= 6 * MIB),
            "{r:?}"
        );
        // A second reader at the same time.
        let dev2 = d.open_disk("web1", 1, false).unwrap();
        let mut b = [0u8; 7];
        dev2.read_at(65536, &mut b).unwrap();
        assert_eq!(&b, b"tail!!!");
    }
    let mut q = qmp_of(&d, "web1");
    let exports = q.execute("query-block-exports", None).unwrap();
    assert_eq!(exports.as_array().map(|a| a.len()), Some(0), "{exports}");
    drop(q);
    let Err(err) = d.open_disk("web1", 0, true) else {
        panic!("writing a running VM's disk must be refused")
    };
    assert!(matches!(err, HvError::Running { .. }), "{err}");
    assert!(err.to_string().contains("ferry vm stop web1"), "{err}");

    // Stop, refuse to start an inconsistent disk.
    let t = Instant::now();
    d.stop_vm("web1").unwrap();
    eprintln!("QEMU stop (quit) took {:?}", t.elapsed());
    d.stop_vm("web1").unwrap();
    assert_eq!(d.get_vm("web1").unwrap().unwrap().power, Power::Stopped);
    assert!(!dir.path().join("web1/qmp.sock").exists());
    d.set_disk_consistent("web1", 1, false).unwrap();
    let err = d.start_vm("web1").unwrap_err();
    assert!(
        matches!(err, HvError::Inconsistent { disk: 1, .. }),
        "{err}"
    );
    assert!(processes_under(dir.path()).is_empty());
    d.set_disk_consistent("web1", 1, true).unwrap();

    // QEMU dies: reported stopped, cleaned up, disks checked before the next start.
    d.start_vm("web1").unwrap();
    let pid: i32 = std::fs::read_to_string(dir.path().join("web1/qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
    let t = Instant::now();
    while d.get_vm("web1").unwrap().unwrap().power != Power::Stopped {
        assert!(t.elapsed() < Duration::from_secs(10), "still running");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(!dir.path().join("web1/qemu.pid").exists());
    assert!(dir.path().join("web1/unclean").exists());
    d.start_vm("web1").unwrap();
    assert!(!dir.path().join("web1/unclean").exists());
    let mut q = qmp_of(&d, "web1");
    let out = q
        .human_monitor_command(r#"qemu-io -d vblk0/virtio-backend "read -P 0xab 4M 2M""#)
        .unwrap();
    assert_eq!(out, "", "data written before the kill is there");
    drop(q);

    // Delete stops first.
    d.delete_vm("web1").unwrap();
    assert!(d.get_vm("web1").unwrap().is_none());
    assert!(!dir.path().join("web1").exists());
    assert!(processes_under(dir.path()).is_empty());
}

#[test]
fn a_qemu_that_cannot_start_is_reported_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let Some(d) = driver(dir.path()) else { return };
    let _cleanup = Cleanup(dir.path());
    d.create_vm(&VmSpec {
        name: "bad".into(),
        cpus: 1,
        memory: 64 * MIB,
        disks: vec![MIB],
        nics: vec![],
        image: None,
    })
    .unwrap();
    std::fs::write(dir.path().join("bad/disk0.qcow2"), b"not a qcow2 image").unwrap();
    let err = d.start_vm("bad").unwrap_err().to_string();
    assert!(err.contains("QEMU exited while starting"), "{err}");
    assert!(!err.contains('\n'), "one line: {err}");
    assert_eq!(d.get_vm("bad").unwrap().unwrap().power, Power::Stopped);
    assert!(processes_under(dir.path()).is_empty());
}

/// A guest write of `len` bytes of `pattern` at `offset` on disk 0 of running `vm`.
fn guest_write(d: &QemuDriver, vm: &str, pattern: u8, offset: u64, len: u64) {
    let mut q = qmp_of(d, vm);
    let out = q
        .human_monitor_command(&format!(
            "qemu-io -d vblk0/virtio-backend \"write -P {pattern} {offset} {len}\""
        ))
        .unwrap();
    assert_eq!(out, "", "guest write failed");
}

fn read(dev: &dyn ferry_blocks::BlockDevice, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    dev.read_at(offset, &mut b).unwrap();
    b
}

/// Names of the dirty bitmaps of `disk0` in the running QEMU of `vm`.
fn bitmaps(d: &QemuDriver, vm: &str) -> Vec<String> {
    let nodes = qmp_of(d, vm)
        .execute(
            "query-named-block-nodes",
            Some(serde_json::json!({"flat": true})),
        )
        .unwrap();
    let node = nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "disk0")
        .unwrap()
        .clone();
    let mut names: Vec<String> = node["dirty-bitmaps"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    names
}

#[test]
fn change_tracking_views_are_point_in_time_and_exact() {
    use ferry_hypervisor::{ChangeMark, Changes};
    let dir = tempfile::tempdir().unwrap();
    let Some(d) = driver(dir.path()) else { return };
    let _cleanup = Cleanup(dir.path());
    d.create_vm(&VmSpec {
        name: "db1".into(),
        cpus: 1,
        memory: 64 * MIB,
        disks: vec![32 * MIB],
        nics: vec![],
        image: None,
    })
    .unwrap();

    // Marked while stopped; the guest writes 128 KiB at 4 MiB.
    let marks = d.mark_disks("db1").unwrap();
    assert!(
        matches!(marks[0], Some(ChangeMark::Bitmap { .. })),
        "{marks:?}"
    );
    d.start_vm("db1").unwrap();
    guest_write(&d, "db1", 0xab, 4 * MIB, 128 << 10);

    // A view of the running VM sees exactly that range, at one instant.
    let view = d.open_view("db1", &marks).unwrap();
    assert!(view.point_in_time);
    assert_eq!(
        view.disks[0].changes,
        Changes::Ranges(vec![(4 * MIB, 4 * MIB + (128 << 10))])
    );
    // The guest keeps writing; the view does not move.
    guest_write(&d, "db1", 0xcd, 4 * MIB, 64 << 10);
    guest_write(&d, "db1", 0xcd, 20 * MIB, 64 << 10);
    assert_eq!(
        read(view.disks[0].dev.as_ref(), 4 * MIB, 4096),
        vec![0xab; 4096]
    );
    assert_eq!(
        read(view.disks[0].dev.as_ref(), 20 * MIB, 4096),
        vec![0; 4096]
    );
    let marks2 = view.marks();
    assert_ne!(marks2, marks);
    view.close(true).unwrap();
    // Closing committed leaves only the new generation; no overlay, node or file remains.
    let ChangeMark::Bitmap { name } = marks2[0].clone().unwrap() else {
        unreachable!()
    };
    assert_eq!(bitmaps(&d, "db1"), vec![name.clone()]);
    // A peek (dry run) reads the same way but starts no tracking and changes no bitmap.
    let peek = d.peek_view("db1", &marks2).unwrap();
    assert!(peek.point_in_time);
    assert!(peek.marks().iter().all(|m| m.is_none()), "{peek:?}");
    assert_eq!(
        peek.disks[0].changes,
        Changes::Ranges(vec![
            (4 * MIB, 4 * MIB + (64 << 10)),
            (20 * MIB, 20 * MIB + (64 << 10))
        ])
    );
    drop(peek);
    assert_eq!(bitmaps(&d, "db1"), vec![name.clone()]);
    let left: Vec<_> = std::fs::read_dir(dir.path().join("db1"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("fv"))
        .collect();
    assert!(left.is_empty(), "overlays left behind: {left:?}");

    // Writes after the view are what the next view reports; an uncommitted view keeps the
    // older generation so nothing is lost.
    let view = d.open_view("db1", &marks2).unwrap();
    assert_eq!(
        view.disks[0].changes,
        Changes::Ranges(vec![
            (4 * MIB, 4 * MIB + (64 << 10)),
            (20 * MIB, 20 * MIB + (64 << 10))
        ])
    );
    drop(view);
    // An uncommitted view leaves no generation of its own behind.
    let ChangeMark::Bitmap { name: name2 } = marks2[0].clone().unwrap() else {
        unreachable!()
    };
    assert_eq!(bitmaps(&d, "db1"), vec![name2]);
    guest_write(&d, "db1", 0xee, 8 * MIB, 64 << 10);
    let view = d.open_view("db1", &marks2).unwrap();
    let Changes::Ranges(r) = &view.disks[0].changes else {
        panic!()
    };
    assert_eq!(r.len(), 3, "{r:?}");
    let marks3 = view.marks();
    view.close(true).unwrap();

    // Stopped cleanly: the bitmaps persist in the image and a stopped view reads them.
    d.stop_vm("db1").unwrap();
    let view = d.open_view("db1", &marks3).unwrap();
    assert_eq!(view.disks[0].changes, Changes::Ranges(vec![]));
    assert_eq!(
        read(view.disks[0].dev.as_ref(), 8 * MIB, 4096),
        vec![0xee; 4096]
    );
    let marks4 = view.marks();
    view.close(true).unwrap();

    // QEMU killed after writing: the bitmap was never saved, so tracking says it cannot tell.
    d.start_vm("db1").unwrap();
    guest_write(&d, "db1", 0x11, 12 * MIB, 64 << 10);
    let pid: i32 = std::fs::read_to_string(dir.path().join("db1/qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let t = Instant::now();
    while d.get_vm("db1").unwrap().unwrap().power == Power::Running {
        assert!(t.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let view = d.open_view("db1", &marks4).unwrap();
    match &view.disks[0].changes {
        Changes::Unknown(Some(why)) => assert!(why.contains("inconsistent"), "{why}"),
        other => panic!("a killed QEMU's bitmap was trusted: {other:?}"),
    }
    drop(view);
    // A fresh mark starts over and is exact again.
    let marks5 = d.mark_disks("db1").unwrap();
    let view = d.open_view("db1", &marks5).unwrap();
    assert_eq!(view.disks[0].changes, Changes::Ranges(vec![]));
    drop(view);
    // A lost bitmap (removed behind ferry's back) is reported too.
    d.start_vm("db1").unwrap();
    let ChangeMark::Bitmap { name } = marks5[0].clone().unwrap() else {
        unreachable!()
    };
    qmp_of(&d, "db1")
        .execute(
            "block-dirty-bitmap-remove",
            Some(serde_json::json!({"node": "disk0", "name": name})),
        )
        .unwrap();
    let view = d.open_view("db1", &marks5).unwrap();
    match &view.disks[0].changes {
        Changes::Unknown(Some(why)) => assert!(why.contains("missing"), "{why}"),
        other => panic!("a removed bitmap was trusted: {other:?}"),
    }
    drop(view);
    d.stop_vm("db1").unwrap();
}
