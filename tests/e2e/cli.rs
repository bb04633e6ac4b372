//! CLI conventions: exit codes, `error:` lines, `--json` = exactly one document, safe names, help.

use crate::harness::*;
use std::path::Path;

/// Every entry of the tree under `dir` whose file name is `name`.
fn find_named(dir: &Path, name: &str, out: &mut Vec<std::path::PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if e.file_name().to_string_lossy() == name {
                out.push(p.clone());
            }
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                find_named(&p, name, out);
            }
        }
    }
}

#[test]
fn unknown_vm_is_refused_with_exit_1() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    for args in [
        vec!["vm", "show", "ghost"],
        vec!["vm", "start", "ghost"],
        vec!["vm", "stop", "ghost"],
        vec!["status", "ghost"],
        vec!["points", "ghost"],
        vec!["protect", "ghost", "--to", "dr"],
        vec!["replicate", "ghost"],
        vec!["failover", "ghost", "--planned"],
        vec!["failback", "ghost"],
        vec!["complete", "ghost"],
        vec!["commit", "ghost"],
        vec!["cancel", "ghost"],
    ] {
        let err = f.fail(&args);
        assert!(err.contains("ghost"), "{args:?}: error names the VM: {err}");
        // Also under --json: still exit 1, error on stderr, no stray text on stdout.
        let mut ja = vec!["--json"];
        ja.extend_from_slice(&args);
        let out = f.run(&ja);
        assert_exit(&out, 1, &ja);
        assert_error_line(&String::from_utf8_lossy(&out.stderr), &ja);
        let so = String::from_utf8_lossy(&out.stdout);
        assert!(
            so.trim().is_empty() || serde_json::from_str::<serde_json::Value>(&so).is_ok(),
            "{ja:?}: stdout holds non-JSON text on error: {so}"
        );
    }
}

#[test]
fn usage_errors_exit_2() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    f.create_vm("app", "h1", &[4 * MIB], &["lan"]);
    f.usage_error(&["frobnicate"]);
    f.usage_error(&["vm", "create"]); // missing NAME and --host
    f.usage_error(&["vm", "show"]); // missing NAME
    f.usage_error(&["site", "add", "x", "--role", "sideways"]);
    f.usage_error(&["failback", "app", "--sync", "sideways"]);
    f.usage_error(&["failback", "app", "--no-such-flag"]);
    f.usage_error(&["failover", "app", "--planned", "--unplanned"]);
    f.usage_error(&["job", "show"]);
    // Nothing changed by the usage errors.
    assert_eq!(f.state("app"), "unprotected");
}

#[test]
fn json_output_is_exactly_one_document() {
    // Every `f.json` call asserts exit 0 and that stdout parses as exactly one JSON document.
    let f = Ferry::new();
    f.json(&["init"]);
    f.json(&["site", "add", "prim", "--role", "primary"]);
    f.json(&["site", "add", "dr", "--role", "recovery"]);
    f.json(&[
        "host", "add", "h1", "--site", "prim", "--driver", "dir", "--switch", "lan",
    ]);
    f.json(&[
        "host", "add", "r1", "--site", "dr", "--driver", "dir", "--switch", "lan",
    ]);
    assert!(f.json(&["host", "list"]).is_array(), "lists are arrays");
    assert!(f.json(&["host", "show", "h1"]).is_object());
    f.json(&[
        "vm", "create", "app", "--host", "h1", "--disk", "4MiB", "--switch", "lan",
    ]);
    assert!(f.json(&["vm", "list"]).is_array(), "lists are arrays");
    assert!(f.json(&["vm", "show", "app"]).is_object());
    f.json(&["vm", "start", "app"]);
    f.json(&["vm", "start", "app"]);
    assert!(f.json(&["status", "app"]).is_object());
    let p = f.json(&["protect", "app", "--to", "dr"]);
    assert_job_shape(&p);
    let points = f.json(&["points", "app"]);
    assert!(points.is_array());
    let r = f.json(&["replicate", "app"]);
    assert_job_shape(&r);
    assert!(f.json(&["jobs"]).is_array());
    assert!(f.json(&["jobs", "--all"]).is_array());
    let j = f.json(&["job", "show", &job_id(&r).to_string()]);
    assert_eq!(job_id(&j), job_id(&r));
    f.json(&["vm", "stop", "app"]);
    // `status` without VM: one document (an array of status objects, lists being arrays).
    let all = f.json(&["status"]);
    assert!(all.is_array() || all.is_object(), "status: {all}");
}

#[test]
fn bad_names_are_refused_and_never_escape() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let root = f.home().join("roots").join("deep").join("h2");
    std::fs::create_dir_all(&root).unwrap();
    f.add_host("h2", "prim", &["lan"], Some(&root));

    let bad_vm_names = [
        "../escaped",
        "../../escaped",
        "..",
        ".",
        "a/escaped",
        "/tmp/escaped",
        "",
    ];
    for name in bad_vm_names {
        for host in ["h1", "h2"] {
            let args = ["vm", "create", name, "--host", host, "--disk", "1MiB"];
            let out = f.run(&args);
            let code = out.status.code();
            assert!(
                code == Some(1) || code == Some(2),
                "vm create {name:?}: expected refusal (exit 1, or 2 as usage error), got {code:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.starts_with("error"),
                "vm create {name:?}: stderr starts with error: {err}"
            );
        }
    }
    for args in [
        vec!["site", "add", "../escaped", "--role", "primary"],
        vec![
            "host",
            "add",
            "../escaped",
            "--site",
            "prim",
            "--driver",
            "dir",
        ],
        vec![
            "host",
            "add",
            "a/escaped",
            "--site",
            "prim",
            "--driver",
            "dir",
        ],
        vec!["vm", "show", "../escaped"],
        vec!["status", "../../escaped"],
    ] {
        let out = f.run(&args);
        let code = out.status.code();
        assert!(
            code == Some(1) || code == Some(2),
            "{args:?}: expected refusal, got {code:?}"
        );
    }
    // Nothing named "escaped" anywhere under home (or next to it) and no VM listed.
    let mut found = Vec::new();
    find_named(f.home(), "escaped", &mut found);
    for p in [
        f.home().parent().unwrap().join("escaped"),
        std::path::PathBuf::from("/tmp/escaped"),
    ] {
        if p.exists() {
            found.push(p);
        }
    }
    assert!(found.is_empty(), "bad names created files: {found:?}");
    let list = f.json(&["vm", "list"]);
    assert_eq!(
        list.as_array().unwrap().len(),
        0,
        "no VM was created: {list}"
    );
}

#[test]
fn help_explains_with_an_example() {
    let f = Ferry::new();
    for cmd in [
        "failback", "failover", "protect", "complete", "cancel", "status",
    ] {
        let out = f.run(&[cmd, "--help"]);
        assert_exit(&out, 0, &[cmd, "--help"]);
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        assert!(
            text.contains("example"),
            "`ferry {cmd} --help` has an example:\n{text}"
        );
        assert!(
            text.contains(&format!("ferry {cmd}")),
            "`ferry {cmd} --help` shows the command:\n{text}"
        );
    }
    let out = f.run(&["failback", "--help"]);
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--sync",
        "--host",
        "--create-vm",
        "--threads",
        "--bandwidth",
        "--auto-complete",
        "--dry-run",
        "--key",
    ] {
        assert!(text.contains(flag), "failback --help mentions {flag}");
    }
}
