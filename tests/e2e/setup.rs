//! Set-up commands: init, sites, hosts, VMs; shapes of their JSON; idempotent start/stop.

use crate::harness::*;
use std::path::PathBuf;

#[test]
fn init_is_idempotent_and_keeps_existing_objects() {
    let f = Ferry::new();
    f.ok(&["init"]);
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    // A second init succeeds and does not wipe the vault.
    f.ok(&["init"]);
    f.json(&["init"]);
    f.ok(&[
        "host", "add", "h1", "--site", "prim", "--driver", "dir", "--switch", "lan",
    ]);
    let hosts = f.json(&["host", "list"]);
    let hosts = hosts.as_array().expect("host list --json is an array");
    assert_eq!(hosts.len(), 1, "one host after add: {hosts:?}");
}

#[test]
fn host_list_and_show() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan", "mgmt"]);
    let list = f.json(&["host", "list"]);
    let list = list.as_array().expect("host list --json is an array");
    let names: Vec<&str> = list.iter().filter_map(|h| h["name"].as_str()).collect();
    assert!(
        names.contains(&"h1") && names.contains(&"r1"),
        "host list names: {names:?}"
    );
    assert_eq!(list.len(), 2);

    let h = f.json(&["host", "show", "h1"]);
    assert_eq!(h["name"], "h1", "host show: {h}");
    let text = h.to_string();
    assert!(text.contains("prim"), "host show mentions its site: {h}");
    assert!(
        text.contains("lan") && text.contains("mgmt"),
        "host show lists its switches: {h}"
    );
    assert!(text.contains("dir"), "host show mentions its driver: {h}");

    let err = f.fail(&["host", "show", "nosuch"]);
    assert!(
        err.contains("nosuch"),
        "error names the unknown host: {err}"
    );
}

#[test]
fn vm_create_and_show_shape() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan", "mgmt"]);
    let odd = 10 * MIB + 12345; // not a multiple of 64 KiB
    f.ok(&[
        "vm",
        "create",
        "app",
        "--host",
        "h1",
        "--disk",
        &odd.to_string(),
        "--disk",
        "8MiB",
        "--switch",
        "lan",
        "--switch",
        "mgmt",
        "--cpus",
        "2",
        "--memory",
        "512MiB",
    ]);
    let v = f.vm_show("app", None);
    assert_eq!(v["name"], "app", "{v}");
    assert_eq!(v["host"], "h1", "{v}");
    assert_eq!(v["site"], "prim", "{v}");
    let power = v["power"].as_str().expect("power string");
    assert!(power == "running" || power == "stopped", "power: {power}");

    let disks = v["disks"].as_array().expect("disks array");
    assert_eq!(disks.len(), 2);
    let want_sizes = [odd, 8 * MIB];
    for (i, d) in disks.iter().enumerate() {
        assert_eq!(d["index"].as_u64(), Some(i as u64), "disk order/index: {v}");
        assert_eq!(d["size"].as_u64(), Some(want_sizes[i]), "disk size: {d}");
        assert_eq!(d["format"], "raw", "dir driver disks are raw: {d}");
        assert_eq!(d["consistent"], true, "a new disk is consistent: {d}");
        let p = disk_path_of(&v, i);
        assert_eq!(
            file_len(&p),
            want_sizes[i],
            "raw image file has the disk size: {}",
            p.display()
        );
        // Layout of the dir driver: <root>/<vm>/disk<i>.raw next to vm.json.
        let expected = f.host_root("h1").join("app").join(format!("disk{i}.raw"));
        assert_eq!(p, expected, "dir driver layout");
    }
    assert!(
        f.host_root("h1").join("app").join("vm.json").is_file(),
        "vm.json exists"
    );

    let nics = v["nics"].as_array().expect("nics array");
    let sw: Vec<&str> = nics.iter().map(|n| n["switch"].as_str().unwrap()).collect();
    assert_eq!(sw, vec!["lan", "mgmt"], "NICs keep their order: {v}");

    // --host addresses the same copy.
    let v2 = f.vm_show("app", Some("h1"));
    assert_eq!(v2["host"], "h1");

    let list = f.json(&["vm", "list"]);
    let list = list.as_array().expect("vm list --json is an array");
    assert!(
        list.iter().any(|x| x["name"] == "app"),
        "vm list contains app: {list:?}"
    );
}

#[test]
fn sizes_accept_units_and_plain_bytes() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    f.ok(&[
        "vm", "create", "s", "--host", "h1", "--disk", "65536", "--disk", "1MiB", "--disk",
        "10498105",
    ]);
    let v = f.vm_show("s", None);
    let sizes: Vec<u64> = v["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["size"].as_u64().unwrap())
        .collect();
    assert_eq!(sizes, vec![65536, MIB, 10498105]);
}

#[test]
fn host_root_option_places_vm_folders() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let root: PathBuf = f.home().join("elsewhere").join("h2root");
    std::fs::create_dir_all(&root).unwrap();
    f.add_host("h2", "prim", &["lan"], Some(&root));
    let v = f.create_vm("web", "h2", &[4 * MIB], &["lan"]);
    let p = disk_path_of(&v, 0);
    assert_eq!(
        p,
        root.join("web").join("disk0.raw"),
        "VM lives under --root"
    );
    assert!(root.join("web").join("vm.json").is_file());
    assert!(
        !f.host_root("h2").join("web").exists(),
        "nothing under the default root"
    );
}

#[test]
fn vm_start_and_stop_are_idempotent() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", "h1", &[4 * MIB], &["lan"]);
    f.ok(&["vm", "stop", "app"]);
    assert_eq!(f.power("app", None), "stopped");
    f.ok(&["vm", "stop", "app"]); // stop on a stopped VM: success, no change
    assert_eq!(f.power("app", None), "stopped");
    f.ok(&["vm", "start", "app"]);
    assert_eq!(f.power("app", None), "running");
    f.ok(&["vm", "start", "app"]); // start on a running VM: success, no change
    assert_eq!(f.power("app", Some("h1")), "running");
    f.ok(&["vm", "stop", "app", "--host", "h1"]);
    assert_eq!(f.power("app", None), "stopped");
}

#[test]
fn vm_create_refuses_unknown_switch_and_duplicates() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let err = f.fail(&[
        "vm",
        "create",
        "app",
        "--host",
        "h1",
        "--disk",
        "4MiB",
        "--switch",
        "nosuchnet",
    ]);
    assert!(
        err.contains("nosuchnet"),
        "error names the missing switch: {err}"
    );
    f.fail(&["vm", "show", "app"]);
    assert!(
        !f.host_root("h1").join("app").exists(),
        "refusal created nothing"
    );

    f.create_vm("app", "h1", &[4 * MIB], &["lan"]);
    let path = f.disk_path("app", "h1", 0);
    write_pattern(&path, 0, 64 * KIB, 0x5a);
    let before = digest(&path);
    let err = f.fail(&["vm", "create", "app", "--host", "h1", "--disk", "8MiB"]);
    assert!(err.contains("app"), "error names the VM: {err}");
    assert_eq!(
        digest(&path),
        before,
        "duplicate create did not touch the existing disk"
    );
    assert_eq!(file_len(&path), 4 * MIB);
}

#[test]
fn status_of_unprotected_vm() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", "h1", &[4 * MIB], &["lan"]);
    let s = f.status("app");
    assert_eq!(s["vm"], "app", "{s}");
    assert_eq!(s["state"], "unprotected", "{s}");
    assert_eq!(s["active_site"], "primary", "{s}");
    assert!(s.get("job").is_none_or(|j| j.is_null()), "no job yet: {s}");
}
