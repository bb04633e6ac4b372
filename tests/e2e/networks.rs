//! Network mapping between sites: a failover attaches each NIC to the switch its primary
//! switch is mapped to at the recovery site, a failback to a new VM maps them back, and a NIC
//! with neither a mapping nor a same-named switch on the target host is refused before
//! anything changes.
use crate::harness::*;

fn nic_switches(f: &Ferry, vm: &str, host: &str) -> Vec<String> {
    f.vm_show(vm, Some(host))["nics"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["switch"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn nics_follow_the_network_map_through_failover_and_failback() {
    let f = Ferry::new();
    f.ok(&["init"]);
    f.ok(&["site", "add", "prim", "--role", "primary"]);
    f.ok(&["site", "add", "dr", "--role", "recovery"]);
    f.add_host(PRIMARY_HOST, "prim", &["lan", "dmz"], None);
    f.add_host("h2", "prim", &["lan", "dmz"], None);
    f.add_host(RECOVERY_HOST, "dr", &["dr-lan", "dr-dmz"], None);
    let prim = f.protected_vm("app", &[4 * MIB], &["lan", "dmz"], MIB);

    // No mapping and no same-named switch: refused, naming the NIC and the fix.
    let err = f.fail(&["failover", "app", "--planned"]);
    for s in [
        "NIC 0",
        "switch lan",
        "ferry site map-network prim:lan=dr:SWITCH",
    ] {
        assert!(err.contains(s), "{s:?} in {err}");
    }
    f.assert_state("app", "protected");
    assert_eq!(f.power("app", Some(PRIMARY_HOST)), "running");

    let v = f.json(&["site", "map-network", "prim:lan=dr:dr-lan"]);
    assert_eq!(
        v["network_map"],
        serde_json::json!([{"switch": "lan", "to_site": "dr", "to_switch": "dr-lan"}])
    );
    // Half mapped is still refused, before anything changes.
    let err = f.fail(&["failover", "app", "--planned"]);
    assert!(err.contains("NIC 1") && err.contains("switch dmz"), "{err}");
    f.assert_state("app", "protected");
    f.ok(&["site", "map-network", "prim:dmz=dr:dr-dmz"]);
    let dr = f.json(&["site", "show", "dr"]);
    assert_eq!(dr["network_map"][0]["switch"], "dr-dmz", "{dr}");
    assert_eq!(dr["network_map"][0]["to_switch"], "dmz", "{dr}");
    let text = f.ok(&["site", "show", "prim"]);
    assert!(text.contains("switch lan ↔ dr:dr-lan"), "{text}");

    assert_job_state(&f.json(&["failover", "app", "--planned"]), "succeeded");
    assert_eq!(nic_switches(&f, "app", RECOVERY_HOST), ["dr-lan", "dr-dmz"]);
    f.ok(&["commit", "app"]);
    let rec = f.disk_paths("app", RECOVERY_HOST);
    write_random(&rec[0], MIB, MIB, 41);

    // Back to a new VM on another primary host: the NICs map back.
    let j = f.json(&[
        "failback",
        "app",
        "--host",
        "h2",
        "--create-vm",
        "--auto-complete",
    ]);
    assert_job_state(&j, "succeeded");
    assert_eq!(nic_switches(&f, "app", "h2"), ["lan", "dmz"]);
    assert_all_identical(&f.disk_paths("app", "h2"), &rec);
    let _ = prim;

    // Mistakes in the mapping itself are said plainly.
    let err = f.fail(&["site", "map-network", "prim-lan-dr"]);
    assert!(err.contains("SITE_A:SWITCH=SITE_B:SWITCH"), "{err}");
    let err = f.fail(&["site", "map-network", "prim:lan=nowhere:x"]);
    assert!(err.contains("no site named nowhere"), "{err}");
    let err = f.fail(&["site", "map-network", "prim:lan=prim:x"]);
    assert!(err.contains("two sites"), "{err}");
}
