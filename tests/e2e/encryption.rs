//! Encrypted replication: nothing readable reaches the store, and only the right key recovers.
use crate::harness::*;

fn files_under(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(&p, out);
        } else {
            out.push(p);
        }
    }
}

#[test]
fn encrypted_store_holds_no_plaintext_and_no_key() {
    let f = Ferry::new();
    f.setup_two_sites(&["lan"]);
    let key = f.home().join("op.key");
    let created = f.json(&["key", "new", key.to_str().unwrap()]);
    let key_id = created["id"].as_str().unwrap().to_string();
    f.create_vm("app", "h1", &[4 * MIB], &["lan"]);
    let prim = f.disk_paths("app", "h1");
    // Known, highly compressible plaintext a careless store would keep readable.
    let text = b"CONFIDENTIAL customer ledger line 0042; ".repeat(4 * 1024 * 1024 / 40);
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&prim[0])
            .unwrap();
        file.write_all_at(&text, 0).unwrap();
    }
    let job = f.json(&[
        "protect",
        "app",
        "--to",
        "dr",
        "--key",
        key.to_str().unwrap(),
    ]);
    assert_job_state(&job, "succeeded");
    f.ok(&["replicate", "app"]); // later cycles use the key given at protect time

    let secret_line = std::fs::read_to_string(&key).unwrap();
    let secret_hex = secret_line
        .lines()
        .find_map(|l| l.strip_prefix("ferry-key-v1:"))
        .unwrap()
        .trim()
        .to_string();
    let secret_raw: Vec<u8> = (0..32)
        .map(|i| u8::from_str_radix(&secret_hex[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let mut files = Vec::new();
    files_under(&f.home().join("stores").join("dr"), &mut files);
    assert!(
        files.len() >= 3,
        "packs, indexes and manifests were stored: {files:?}"
    );
    for p in &files {
        let b = std::fs::read(p).unwrap();
        let name = p.to_string_lossy();
        assert!(
            name.contains(&format!("k/{key_id}/")),
            "encrypted data lives in the key's namespace: {name}"
        );
        for needle in [&text[..24], secret_hex.as_bytes(), &secret_raw[..]] {
            assert!(
                !b.windows(needle.len()).any(|w| w == needle),
                "{name} leaks plaintext or key bytes"
            );
        }
    }

    // verify needs the key; with it every block checks out.
    let err = f.fail(&["verify", "app"]);
    assert!(err.contains("--key"), "{err}");
    let other = f.home().join("other.key");
    f.ok(&["key", "new", other.to_str().unwrap()]);
    let err = f.fail(&["verify", "app", "--key", other.to_str().unwrap()]);
    assert!(err.contains("wrong key"), "{err}");
    let v = f.json(&["verify", "app", "--key", key.to_str().unwrap()]);
    assert_eq!(v["ok"], true, "{v}");
    assert!(v["blocks"].as_u64().unwrap() >= 64, "{v}");
    // `key new` never overwrites a key.
    let err = f.fail(&["key", "new", key.to_str().unwrap()]);
    assert!(err.contains("never overwrites"), "{err}");
}
