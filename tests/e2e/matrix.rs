//! The crash matrix: every fault point of every workflow, listed by `ferry debug fault-points`
//! from the code (not by hand), is hit with a real SIGKILL of the process running the job (the
//! CLI in embedded mode, `ferry serve` in served mode). After each crash: no VM runs at both
//! sites, no disk is marked consistent unless it holds a complete content (its content before
//! the command, or the one the command ends with), and the VM's job names the command that
//! continues it. Then the same command is run again, and the end state must equal that of a
//! run without a crash (VM state, power at each site, every disk byte for byte), the newest
//! point must verify, and at most one batch (4 MiB) more may have crossed the sites.
use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::os::unix::process::ExitStatusExt;
use std::sync::Mutex;

use crate::harness::*;

/// Extra bytes a crash may make a re-run send again: one write batch.
const ONE_BATCH: u64 = 4 * MIB;
const DISK: u64 = 8 * MIB;

/// How a workflow's case is prepared: the state right before its command, and the command.
struct Workflow {
    name: &'static str,
    prepare: fn(&Ferry),
    command: &'static [&'static str],
    /// The VMs it works on.
    vms: &'static [&'static str],
}

const APP: &[&str] = &["app"];
/// A drill's VM and its test copy.
const DRILL: &[&str] = &["app", "app-test"];
/// The plan's VMs: `db` (first group), then `app`.
const PLAN: &[&str] = &["db", "app"];

/// Two VMs protected with one plan over them (db first), as `prepare` of a plan case.
fn plan(f: &Ferry) {
    f.setup_two_sites(&["lan"]);
    for (vm, seed) in [("db", 21), ("app", 22)] {
        let p = f.protected_vm(vm, &[DISK], &["lan"], 2 * MIB);
        write_random(&p[0], 4 * MIB, MIB, seed);
    }
    f.ok(&["plan", "create", "shop", "--group", "db", "--group", "app"]);
}

fn vm_on_h1(f: &Ferry) {
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", PRIMARY_HOST, &[DISK], &["lan"]);
    f.ok(&["vm", "start", "app"]);
    write_random(&f.disk_paths("app", PRIMARY_HOST)[0], 0, 3 * MIB, 11);
}

fn protected(f: &Ferry) -> std::path::PathBuf {
    f.setup_two_sites(&["lan"]);
    f.protected_vm("app", &[DISK], &["lan"], 3 * MIB)[0].clone()
}

fn failed_over(f: &Ferry) -> std::path::PathBuf {
    f.setup_two_sites(&["lan"]);
    let (_, rec) = f.failed_over_vm("app", &[DISK], &["lan"], 3 * MIB);
    write_random(&rec[0], MIB, MIB, 15);
    rec[0].clone()
}

fn failed_back(f: &Ferry) {
    failed_over(f);
    assert_job_state(
        &f.json(&["failback", "app", "--auto-complete"]),
        "succeeded",
    );
}

const WORKFLOWS: &[Workflow] = &[
    Workflow {
        name: "protect",
        prepare: vm_on_h1,
        command: &["protect", "app", "--to", "dr"],
        vms: APP,
    },
    Workflow {
        name: "replicate",
        prepare: |f| write_random(&protected(f), 4 * MIB, MIB, 12),
        command: &["replicate", "app"],
        vms: APP,
    },
    Workflow {
        name: "failover-planned",
        prepare: |f| write_random(&protected(f), 4 * MIB, MIB, 13),
        command: &["failover", "app", "--planned"],
        vms: APP,
    },
    Workflow {
        name: "failover-unplanned",
        // The primary site goes down after a write the last point lacks: the failover
        // restores the point.
        prepare: |f| {
            write_random(&protected(f), 4 * MIB, MIB, 14);
            f.ok(&["vm", "stop", "app", "--host", PRIMARY_HOST]);
        },
        command: &["failover", "app", "--unplanned"],
        vms: APP,
    },
    Workflow {
        name: "failover-change-point",
        // Failed over to the newest point (2), awaiting commit, with writes at the recovery
        // site: the command makes the recovery copy again from the older point 1.
        prepare: |f| {
            write_random(&protected(f), 4 * MIB, MIB, 18);
            f.ok(&["replicate", "app"]);
            f.ok(&["vm", "stop", "app", "--host", PRIMARY_HOST]);
            assert_job_state(&f.json(&["failover", "app", "--unplanned"]), "succeeded");
            write_random(&f.disk_paths("app", RECOVERY_HOST)[0], 0, MIB, 19);
        },
        command: &["failover", "app", "--point", "1"],
        vms: APP,
    },
    Workflow {
        name: "failover-test",
        prepare: |f| {
            protected(f);
        },
        command: &["failover", "app", "--test"],
        vms: DRILL,
    },
    Workflow {
        name: "cleanup-test",
        prepare: |f| {
            protected(f);
            assert_job_state(&f.json(&["failover", "app", "--test"]), "succeeded");
        },
        command: &["failover", "app", "--cleanup-test"],
        vms: DRILL,
    },
    Workflow {
        name: "commit-failover",
        prepare: |f| {
            protected(f);
            assert_job_state(&f.json(&["failover", "app", "--planned"]), "succeeded");
        },
        command: &["commit", "app"],
        vms: APP,
    },
    Workflow {
        name: "failback-delta",
        prepare: |f| {
            failed_over(f);
        },
        command: &["failback", "app", "--auto-complete"],
        vms: APP,
    },
    Workflow {
        name: "failback-full",
        prepare: |f| {
            failed_over(f);
        },
        command: &["failback", "app", "--sync", "full", "--auto-complete"],
        vms: APP,
    },
    Workflow {
        name: "commit-failback",
        prepare: failed_back,
        command: &["commit", "app"],
        vms: APP,
    },
    Workflow {
        name: "reverse-replicate",
        prepare: |f| {
            failed_back(f);
            f.ok(&["commit", "app"]);
            write_random(&f.disk_paths("app", PRIMARY_HOST)[0], 5 * MIB, MIB, 17);
        },
        command: &["reverse-replicate", "app"],
        vms: APP,
    },
    Workflow {
        name: "plan-failover",
        prepare: plan,
        command: &["plan", "failover", "shop", "--planned"],
        vms: PLAN,
    },
    Workflow {
        name: "plan-failback",
        prepare: |f| {
            plan(f);
            f.json(&["plan", "failover", "shop", "--planned"]);
            f.json(&["plan", "commit", "shop"]);
            for (vm, seed) in [("db", 23), ("app", 24)] {
                write_random(&f.disk_paths(vm, RECOVERY_HOST)[0], MIB, MIB, seed);
            }
        },
        command: &["plan", "failback", "shop", "--auto-complete"],
        vms: PLAN,
    },
];

/// What a copy of `app` on `host` is: power, and per disk its consistency flag and content.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Copy {
    power: String,
    disks: Vec<(bool, u64)>,
}

fn content_hash(p: &std::path::Path) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    std::fs::read(p).unwrap().hash(&mut h);
    h.finish()
}

/// Every copy of each of `names`, by `VM@host`.
fn copies(f: &Ferry, names: &[&str]) -> BTreeMap<String, Copy> {
    let mut out = BTreeMap::new();
    for (host, name) in [PRIMARY_HOST, RECOVERY_HOST]
        .into_iter()
        .flat_map(|h| names.iter().map(move |n| (h, *n)))
    {
        let vms = f.json(&["vm", "list", "--host", host]);
        let Some(v) = vms.as_array().unwrap().iter().find(|v| v["name"] == name) else {
            continue;
        };
        let disks = v["disks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|d| {
                (
                    d["consistent"].as_bool().unwrap(),
                    content_hash(std::path::Path::new(d["path"].as_str().unwrap())),
                )
            })
            .collect();
        out.insert(
            format!("{name}@{host}"),
            Copy {
                power: v["power"].as_str().unwrap().to_string(),
                disks,
            },
        );
    }
    out
}

fn last_job_id(f: &Ferry) -> u64 {
    f.json(&["jobs", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .map(job_id)
        .max()
        .unwrap_or(0)
}

/// Bytes that crossed the sites in the jobs after job `since`.
fn transferred_since(f: &Ferry, since: u64) -> u64 {
    f.json(&["jobs", "--all"])
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| job_id(j) > since)
        .map(|j| j["bytes_transferred"].as_u64().unwrap_or(0))
        .sum()
}

/// The end of a run of a workflow's command: state, copies, bytes transferred.
#[derive(Debug, Clone)]
struct End {
    state: Vec<String>,
    copies: BTreeMap<String, Copy>,
    transferred: u64,
}

/// Those of `vms` that are protected (a test copy is not).
fn protected_of<'a>(f: &Ferry, vms: &[&'a str]) -> Vec<&'a str> {
    vms.iter()
        .copied()
        .filter(|vm| {
            let out = f.run(&["--json", "status", vm]);
            out.status.success()
                && serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["state"]
                    != "unprotected"
        })
        .collect()
}

fn states(f: &Ferry, vms: &[&str]) -> Vec<String> {
    vms.iter()
        .map(|vm| {
            let out = f.run(&["--json", "status", vm]);
            if !out.status.success() {
                return "absent".to_string(); // a test copy that does not exist
            }
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            v["state"].as_str().unwrap().to_string()
        })
        .collect()
}

fn reference(w: &Workflow) -> End {
    let f = Ferry::new();
    (w.prepare)(&f);
    let since = last_job_id(&f);
    f.ok(w.command);
    let end = End {
        state: states(&f, w.vms),
        copies: copies(&f, w.vms),
        transferred: transferred_since(&f, since),
    };
    for vm in protected_of(&f, w.vms) {
        assert_eq!(f.json(&["verify", vm])["ok"], true, "{}", w.name);
    }
    end
}

/// Crashes `w`'s command at `point`, checks the invariants, runs it again and compares with
/// `reference`. Returns a description of what is wrong, if anything.
fn crash_case(w: &Workflow, point: &str, reference: &End) -> Result<(), String> {
    let f = Ferry::new();
    (w.prepare)(&f);
    let before = copies(&f, w.vms);
    let since = last_job_id(&f);
    let out = f.crash_at(point, w.command);
    if !f.is_served() && out.status.signal() != Some(libc::SIGKILL) {
        return Err(format!(
            "the command was not killed at the point (it ended with {:?}: {})",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    // Invariants right after the crash.
    let now = copies(&f, w.vms);
    for vm in w.vms {
        let running = now
            .iter()
            .filter(|(k, c)| k.starts_with(&format!("{vm}@")) && c.power == "running")
            .count();
        if running > 1 {
            return Err(format!("VM {vm} runs at both sites: {now:?}"));
        }
    }
    for (host, c) in &now {
        for (i, &(consistent, h)) in c.disks.iter().enumerate() {
            let was = before.get(host).map(|b| b.disks[i].1);
            let will = reference.copies.get(host).map(|r| r.disks[i].1);
            if consistent && Some(h) != was && Some(h) != will {
                return Err(format!(
                    "disk {i} on {host} is marked consistent but holds neither its content before the command nor the one it ends with"
                ));
            }
        }
    }
    // The VM whose job the crash interrupted names the command that continues it.
    let interrupted = w.vms.iter().map(|vm| f.status(vm)).find(|st| {
        st["job"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("`ferry "))
    });
    if interrupted.is_none() {
        return Err("no VM's state names a next command".into());
    }
    // The same command again finishes the work.
    let out = f.run(w.command);
    if !out.status.success() {
        return Err(format!(
            "re-run failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let end = End {
        state: states(&f, w.vms),
        copies: copies(&f, w.vms),
        transferred: transferred_since(&f, since),
    };
    if end.state != reference.state {
        return Err(format!(
            "ends in states {:?} instead of {:?}",
            end.state, reference.state
        ));
    }
    if end.copies != reference.copies {
        return Err(format!(
            "ends with copies {:?} instead of {:?}",
            end.copies, reference.copies
        ));
    }
    if end.transferred > reference.transferred + ONE_BATCH {
        return Err(format!(
            "{} bytes crossed the sites, {} without the crash: more than one batch again",
            end.transferred, reference.transferred
        ));
    }
    for vm in protected_of(&f, w.vms) {
        let ver = f.json(&["verify", vm]);
        if ver["ok"] != true {
            return Err(format!("the newest point of {vm} does not verify: {ver}"));
        }
    }
    Ok(())
}

/// (workflow, point) of every fault point, as `ferry debug fault-points` lists them.
pub(crate) fn fault_points() -> Vec<(String, String)> {
    let out = std::process::Command::new(Ferry::bin())
        .args(["--json", "debug", "fault-points"])
        .output()
        .unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["workflow"].as_str().unwrap().to_string(),
                p["point"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn every_fault_point_of_every_workflow_crashes_and_recovers() {
    let points = fault_points();
    let known: Vec<&str> = WORKFLOWS.iter().map(|w| w.name).collect();
    for (w, _) in &points {
        assert!(
            known.contains(&w.as_str()),
            "workflow {w} has fault points but no case here: add one to WORKFLOWS"
        );
    }
    let references: HashMap<&str, End> = WORKFLOWS.iter().map(|w| (w.name, reference(w))).collect();
    let queue = Mutex::new(points.clone());
    let failures = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..3 {
            s.spawn(|| loop {
                let Some((wname, point)) = queue.lock().unwrap().pop() else {
                    break;
                };
                let w = WORKFLOWS.iter().find(|w| w.name == wname).unwrap();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    crash_case(w, &point, &references[w.name])
                }))
                .unwrap_or_else(|p| {
                    Err(p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_else(|| "panicked".into()))
                });
                if let Err(e) = r {
                    failures
                        .lock()
                        .unwrap()
                        .push(format!("{wname} at {point}: {e}"));
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap();
    println!(
        "fault points covered: {} of {}",
        points.len() - failures.len(),
        points.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
