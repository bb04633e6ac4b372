//! The store suite, run on every backend: `local::*` always; `azure::*` when
//! `FERRY_TEST_AZURE=1` (Azurite or a real account, configured by the usual `AZURE_*`
//! variables) and `s3::*` when `FERRY_TEST_S3=1` (configured by `AWS_*`). With the flag set
//! the server must be there: the tests fail rather than skip. Locally:
//!
//! ```text
//! scripts/services.sh start && eval "$(scripts/services.sh env)"
//! FERRY_TEST_AZURE=1 FERRY_TEST_S3=1 cargo test -p ferry-store --test backends
//! ```
//!
//! Every test uses its own container/bucket, so they run in parallel against one server.
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_blocks::{hash_block, BlockMap, Hash, Manifest};
use ferry_store::{encode, Codec, PackWriter, Store, StoreError, PACK_TARGET};

#[derive(Clone, Copy, Debug)]
enum Backend {
    Local,
    Azure,
    S3,
}

/// Where one test's store lives.
struct Env {
    base: String,
    _dir: Option<tempfile::TempDir>,
}

impl Env {
    /// A fresh, empty store location for `test`, or None (after saying so) when the backend
    /// is not enabled.
    fn new(b: Backend, test: &str) -> Option<Env> {
        let flag = match b {
            Backend::Local => {
                let dir = tempfile::tempdir().unwrap();
                let base = format!("file://{}/store", dir.path().display());
                return Some(Env {
                    base,
                    _dir: Some(dir),
                });
            }
            Backend::Azure => "FERRY_TEST_AZURE",
            Backend::S3 => "FERRY_TEST_S3",
        };
        if std::env::var(flag).as_deref() != Ok("1") {
            println!("skipped: set {flag}=1 (servers: scripts/services.sh start)");
            return None;
        }
        let scheme = match b {
            Backend::Azure => "az",
            _ => "s3",
        };
        Some(Env {
            base: format!("{scheme}://{}", unique_name(test)),
            _dir: None,
        })
    }

    fn url(&self) -> &str {
        &self.base
    }

    fn open(&self) -> Arc<Store> {
        Arc::new(Store::open(&self.base).unwrap_or_else(|e| panic!("open {}: {e}", self.base)))
    }
}

/// Empties the test's container/bucket (best effort): the servers keep everything in memory,
/// and a real account should not fill up with test data.
impl Drop for Env {
    fn drop(&mut self) {
        if self._dir.is_some() || std::thread::panicking() {
            return;
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            use futures::{StreamExt, TryStreamExt};
            let Ok(os) = ferry_store::backend::open(&self.base).await else {
                return;
            };
            let paths = os.list(None).map_ok(|m| m.location).boxed();
            let _ = os.delete_stream(paths).try_collect::<Vec<_>>().await;
        });
    }
}

/// A container/bucket name valid on Azure and S3: lowercase, 3-63 characters.
fn unique_name(test: &str) -> String {
    let slug: String = test
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    let slug = slug.trim_matches('-');
    let slug = &slug[..slug.len().min(36)];
    let slug = slug.trim_end_matches('-');
    format!(
        "ft-{slug}-{:08x}-{:04x}",
        rand::random::<u32>(),
        std::process::id() & 0xffff
    )
}

/// Deterministic, distinct block contents: `kind` 0 = compressible (mostly text, a random
/// byte every 64), 1 = incompressible.
fn block(seed: u32, kind: u8, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761) | 1;
    (0..len)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            if kind == 0 && i % 64 != 0 {
                b"ferry block "[i % 12]
            } else {
                x as u8
            }
        })
        .collect()
}

/// Writes `blocks` through a pack writer with pack size `target`; returns their ids.
fn write_blocks(store: &Arc<Store>, target: usize, blocks: &[Vec<u8>]) -> Vec<Hash> {
    let mut w = PackWriter::new(store.clone(), target);
    let mut comp = zstd::bulk::Compressor::new(1).unwrap();
    let mut ids = Vec::new();
    for b in blocks {
        let h = hash_block(b);
        let (frame, codec) = encode(&mut comp, b);
        w.add(h, &frame, codec, b.len() as u32).unwrap();
        ids.push(h);
    }
    w.finish().unwrap();
    ids
}

fn manifest_of(ids: &[Hash], block_size: u64) -> Manifest {
    let mut m = BlockMap::zeros(ids.len() as u64 * block_size, block_size);
    m.hashes.copy_from_slice(ids);
    Manifest { disks: vec![m] }
}

// ------------------------------------------------------------------------------------------
// The suite
// ------------------------------------------------------------------------------------------

/// Blocks go up in full-size packs (one > 16 MiB object and a remainder) and come back by
/// ranged reads, verified; compressible blocks are stored compressed; duplicates are skipped.
fn blocks_round_trip_through_packs(env: &Env) {
    let s = env.open();
    let mut blocks: Vec<Vec<u8>> = (0..280).map(|i| block(i, 1, 65536)).collect();
    blocks.extend((0..20).map(|i| block(1000 + i, 0, 65536)));
    let ids = write_blocks(&s, PACK_TARGET, &blocks);
    assert_eq!(s.block_count(), blocks.len());
    let packs: std::collections::HashSet<u128> =
        ids.iter().map(|h| s.locate(h).unwrap().pack).collect();
    assert_eq!(
        packs.len(),
        2,
        "280 incompressible 64 KiB blocks fill one 16 MiB pack and start another"
    );
    assert_eq!(s.locate(&ids[290]).unwrap().codec, Codec::Zstd);
    for (h, b) in ids.iter().zip(&blocks) {
        assert_eq!(&s.read_block(h).unwrap(), b);
    }
    // Adding the same blocks again stores nothing.
    let mut w = PackWriter::new(s.clone(), PACK_TARGET);
    assert!(!w.add(ids[0], &blocks[0], Codec::Raw, 65536).unwrap());
    w.finish().unwrap();
    assert!(matches!(
        s.read_block(&[7; 32]),
        Err(StoreError::Missing(_))
    ));
}

/// A second `Store::open` of the same URL loads the index written by the first.
fn reopening_reads_the_index(env: &Env) {
    let s = env.open();
    let blocks: Vec<Vec<u8>> = (0..24).map(|i| block(i, (i % 2) as u8, 65536)).collect();
    // Small packs: several index objects to list and load.
    let ids = write_blocks(&s, 256 << 10, &blocks);
    drop(s);
    let s2 = env.open();
    assert_eq!(s2.block_count(), blocks.len());
    for (h, b) in ids.iter().zip(&blocks) {
        assert_eq!(&s2.read_block(h).unwrap(), b);
    }
}

fn manifests_put_get_delete(env: &Env) {
    let s = env.open();
    let ids = write_blocks(&s, 1 << 20, &[block(1, 0, 4096), block(2, 1, 4096)]);
    let m = manifest_of(&ids, 4096);
    let k1 = s.put_manifest("vm-a", 1, &m).unwrap();
    let k2 = s.put_manifest("vm-a", 2, &m).unwrap();
    assert_ne!(k1, k2);
    assert_eq!(s.get_manifest(&k1).unwrap().disks[0].hashes, ids);
    // Visible from another handle.
    assert_eq!(env.open().get_manifest(&k2).unwrap().disks[0].hashes, ids);
    s.delete_manifest(&k1).unwrap();
    s.delete_manifest(&k1).unwrap(); // idempotent
    assert!(s.get_manifest(&k1).is_err());
    assert!(s.get_manifest(&k2).is_ok());
}

/// Packs no manifest references go (after the grace period); referenced ones stay.
fn garbage_collection(env: &Env) {
    let s = env.open();
    let kept = write_blocks(&s, 1 << 20, &[block(10, 1, 65536), block(11, 0, 65536)]);
    let dropped = write_blocks(&s, 1 << 20, &[block(20, 1, 65536)]);
    let shared = write_blocks(&s, 1 << 20, &[block(30, 1, 65536), block(31, 1, 65536)]);
    // A manifest referencing one block of the third pack keeps the whole pack.
    let key = s
        .put_manifest("vm", 1, &manifest_of(&[kept[0], kept[1], shared[1]], 65536))
        .unwrap();
    assert_eq!(
        s.collect_garbage(Duration::from_secs(3600)).unwrap(),
        0,
        "grace period"
    );
    assert_eq!(s.collect_garbage(Duration::ZERO).unwrap(), 1);
    assert!(!s.contains(&dropped[0]));
    for h in kept.iter().chain(&shared) {
        assert!(s.read_block(h).is_ok());
    }
    // The deletion is in the store, not only in this handle's index.
    let s2 = env.open();
    assert_eq!(s2.block_count(), 4);
    assert!(matches!(
        s2.read_block(&dropped[0]),
        Err(StoreError::Missing(_))
    ));
    s.delete_manifest(&key).unwrap();
    assert_eq!(s.collect_garbage(Duration::ZERO).unwrap(), 2);
    assert_eq!(env.open().block_count(), 0);
}

/// Opening a store whose container/bucket/folder does not exist creates it; opening it again
/// (it now exists) is fine too.
fn missing_container_is_created(env: &Env) {
    let s = env.open();
    assert_eq!(s.block_count(), 0);
    let ids = write_blocks(&s, 1 << 20, &[block(5, 1, 4096)]);
    let again = env.open();
    assert_eq!(again.read_block(&ids[0]).unwrap(), block(5, 1, 4096));
}

/// `URL/prefix` stores are separate namespaces in one container/bucket.
fn prefixes_are_separate_stores(env: &Env) {
    let a = Arc::new(Store::open(&format!("{}/site-a", env.url())).unwrap());
    let ids = write_blocks(&a, 1 << 20, &[block(8, 1, 4096)]);
    let b = Store::open(&format!("{}/site-b", env.url())).unwrap();
    assert_eq!(b.block_count(), 0);
    assert!(!b.contains(&ids[0]));
    let root = Store::open(env.url()).unwrap();
    assert_eq!(
        root.block_count(),
        0,
        "the prefix's index is not the root's"
    );
    let a2 = Store::open(&format!("{}/site-a/", env.url())).unwrap();
    assert_eq!(a2.read_block(&ids[0]).unwrap(), block(8, 1, 4096));
}

fn run(b: Backend, test: &str, f: fn(&Env)) {
    if let Some(env) = Env::new(b, test) {
        f(&env);
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod local { $( #[test] fn $name() { super::run(super::Backend::Local, stringify!($name), super::$name) } )* }
        mod azure { $( #[test] fn $name() { super::run(super::Backend::Azure, stringify!($name), super::$name) } )* }
        mod s3 { $( #[test] fn $name() { super::run(super::Backend::S3, stringify!($name), super::$name) } )* }
    };
}

suite!(
    blocks_round_trip_through_packs,
    reopening_reads_the_index,
    manifests_put_get_delete,
    garbage_collection,
    missing_container_is_created,
    prefixes_are_separate_stores,
);

// ------------------------------------------------------------------------------------------
// Failures that must be quick and say what to do. They change the environment, so each runs
// `probe_open` in a child process with its own variables.
// ------------------------------------------------------------------------------------------

/// Child side: opens `FERRY_PROBE_URL` and reports the outcome on stdout.
#[test]
#[ignore = "run by the failure tests in a child process"]
fn probe_open() {
    let Ok(url) = std::env::var("FERRY_PROBE_URL") else {
        return;
    };
    let t = Instant::now();
    match Store::open(&url) {
        Ok(_) => println!("PROBE ok"),
        Err(e) => println!("PROBE err {e}"),
    }
    println!("PROBE secs {:.2}", t.elapsed().as_secs_f64());
}

/// Runs `probe_open` with `vars` set (and, when `clean`, every other AZURE_* / AWS_* variable
/// removed); returns (error message or None, seconds).
fn probe(url: &str, clean: bool, vars: &[(&str, String)]) -> (Option<String>, f64) {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args([
        "probe_open",
        "--exact",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])
    .env("FERRY_PROBE_URL", url);
    if clean {
        for (k, _) in std::env::vars() {
            if k.starts_with("AZURE") || k.starts_with("AWS_") || k == "IDENTITY_ENDPOINT" {
                cmd.env_remove(k);
            }
        }
    }
    for (k, v) in vars {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "probe failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = stdout
        .lines()
        .find_map(|l| l.split_once("PROBE err ").map(|(_, e)| e))
        .map(str::to_string);
    assert!(
        err.is_some() || stdout.contains("PROBE ok"),
        "no probe result: {stdout}"
    );
    let secs = stdout
        .lines()
        .find_map(|l| l.split_once("PROBE secs ").map(|(_, e)| e))
        .and_then(|s| s.parse().ok())
        .unwrap();
    (err, secs)
}

/// A port nothing listens on.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// No server needed: always runs.
#[test]
fn azure_unreachable_fails_fast_and_says_what_to_do() {
    let port = closed_port();
    let (err, secs) = probe(
        "az://ferry-nowhere",
        true,
        &[
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            (
                "AZURITE_BLOB_STORAGE_URL",
                format!("http://127.0.0.1:{port}"),
            ),
        ],
    );
    let err = err.expect("opening a store on a dead server must fail");
    assert!(secs < 10.0, "took {secs}s: {err}");
    assert!(err.contains("az://ferry-nowhere"), "{err}");
    assert!(
        err.contains(&format!("unreachable at http://127.0.0.1:{port}")),
        "{err}"
    );
    assert!(err.contains("is Azurite running"), "{err}");
    assert!(err.contains("scripts/services.sh start"), "{err}");
}

/// No server needed: always runs.
#[test]
fn s3_unreachable_fails_fast_and_says_what_to_do() {
    let port = closed_port();
    let (err, secs) = probe(
        "s3://ferry-nowhere",
        true,
        &[
            ("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{port}")),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
        ],
    );
    let err = err.expect("opening a store on a dead server must fail");
    assert!(secs < 10.0, "took {secs}s: {err}");
    assert!(err.contains("s3://ferry-nowhere"), "{err}");
    assert!(
        err.contains(&format!(
            "unreachable at http://127.0.0.1:{port}/ferry-nowhere"
        )),
        "{err}"
    );
    assert!(err.contains("AWS_ENDPOINT_URL"), "{err}");
}

/// No configuration at all names the variables to set.
#[test]
fn azure_without_account_says_which_variables_to_set() {
    let (err, secs) = probe("az://ferry-noaccount", true, &[]);
    let err = err.expect("must fail");
    assert!(secs < 10.0, "took {secs}s: {err}");
    assert!(err.contains("AZURE_STORAGE_ACCOUNT_NAME"), "{err}");
    assert!(err.contains("AZURE_STORAGE_USE_EMULATOR=true"), "{err}");
}

/// A wrong account key is refused with advice about the key (needs Azurite).
#[test]
fn azure_wrong_key_is_explained() {
    let Some(env) = Env::new(Backend::Azure, "wrong-key") else {
        return;
    };
    // Valid base64, wrong key.
    let (err, _) = probe(
        env.url(),
        false,
        &[(
            "AZURE_STORAGE_ACCOUNT_KEY",
            "d3Jvbmcga2V5IHdyb25nIGtleSB3cm9uZyBrZXk=".into(),
        )],
    );
    let err = err.expect("a wrong key must be refused");
    assert!(err.contains("403"), "{err}");
    assert!(err.contains("AZURE_STORAGE_ACCOUNT_KEY"), "{err}");
}

#[test]
fn local_store_in_an_unusable_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let e = Store::open(&format!("file://{}/store", file.display())).unwrap_err();
    assert!(e.to_string().contains("a-file"), "{e}");
    assert!(matches!(
        Store::open("file://relative/dir"),
        Err(StoreError::Url(_))
    ));
}

// ------------------------------------------------------------------------------------------
// The server goes away in the middle of a run and comes back (Azurite with its blobs on
// disk, on a port of its own, started with scripts/services.sh): the command fails within
// the retry timeout with advice, and nothing written before is lost.
// ------------------------------------------------------------------------------------------

fn wait_for(path: &std::path::Path, what: &str) {
    let t = Instant::now();
    while !path.exists() {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Child side of `azure_server_restart_mid_run`.
#[test]
#[ignore = "run by azure_server_restart_mid_run in a child process"]
fn fault_child() {
    let (Ok(url), Ok(dir)) = (
        std::env::var("FERRY_PROBE_URL"),
        std::env::var("FERRY_FAULT_DIR"),
    ) else {
        return;
    };
    let dir = std::path::PathBuf::from(dir);
    let s = Arc::new(Store::open(&url).unwrap());
    let blocks: Vec<Vec<u8>> = (0..8).map(|i| block(i, 1, 65536)).collect();
    let ids = write_blocks(&s, 1 << 20, &blocks);
    let key = s.put_manifest("vm", 1, &manifest_of(&ids, 65536)).unwrap();
    std::fs::write(dir.join("written"), b"").unwrap();
    wait_for(&dir.join("stopped"), "the server to stop");
    let t = Instant::now();
    let e = s.read_block(&ids[3]).unwrap_err();
    println!("FAULT err {e}");
    println!("FAULT secs {:.1}", t.elapsed().as_secs_f64());
    std::fs::write(dir.join("failed"), b"").unwrap();
    wait_for(&dir.join("restarted"), "the server to restart");
    // The same handle recovers (its connections are re-established), and a new one sees all.
    assert_eq!(s.read_block(&ids[3]).unwrap(), blocks[3]);
    let s2 = Store::open(&url).unwrap();
    assert_eq!(s2.get_manifest(&key).unwrap().disks[0].hashes, ids);
    for (h, b) in ids.iter().zip(&blocks) {
        assert_eq!(&s2.read_block(h).unwrap(), b);
    }
    println!("FAULT recovered");
}

#[test]
fn azure_server_restart_mid_run() {
    let Some(env) = Env::new(Backend::Azure, "restart") else {
        return;
    };
    if std::env::var("AZURE_STORAGE_USE_EMULATOR").as_deref() != Ok("true") {
        println!("skipped: needs AZURE_STORAGE_USE_EMULATOR=true (it runs an Azurite of its own)");
        return;
    }
    let run = tempfile::tempdir().unwrap();
    let port = closed_port();
    let services = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/services.sh");
    let svc = |cmd: &str| {
        let st = Command::new("bash")
            .args([services, cmd, "azurite"])
            .env("FERRY_SERVICES_DIR", run.path())
            .env("FERRY_AZURITE_PORT", port.to_string())
            .env("FERRY_AZURITE_DISK", "1")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(st.success(), "services.sh {cmd} azurite failed");
    };
    svc("start");
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "fault_child",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FERRY_PROBE_URL", env.url())
        .env("FERRY_FAULT_DIR", run.path())
        .env(
            "AZURITE_BLOB_STORAGE_URL",
            format!("http://127.0.0.1:{port}"),
        )
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_for(&run.path().join("written"), "the child to write");
        svc("stop");
        std::fs::write(run.path().join("stopped"), b"").unwrap();
        wait_for(&run.path().join("failed"), "the child's read to fail");
        svc("start");
        std::fs::write(run.path().join("restarted"), b"").unwrap();
    }));
    let out = child.wait_with_output().unwrap();
    svc("stop");
    let stdout = String::from_utf8_lossy(&out.stdout);
    if let Err(p) = result {
        eprintln!("child: {stdout}\n{}", String::from_utf8_lossy(&out.stderr));
        std::panic::resume_unwind(p);
    }
    assert!(
        out.status.success() && stdout.contains("FAULT recovered"),
        "child failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let err = stdout
        .lines()
        .find_map(|l| l.split_once("FAULT err ").map(|(_, e)| e))
        .unwrap();
    let secs: f64 = stdout
        .lines()
        .find_map(|l| l.split_once("FAULT secs ").map(|(_, e)| e))
        .unwrap()
        .parse()
        .unwrap();
    println!("read on a stopped server failed after {secs}s: {err}");
    assert!(
        secs < 45.0,
        "a dead server must fail a command within the retry timeout: {secs}s"
    );
    assert!(err.contains("is Azurite running"), "{err}");
}
