//! Test harness: drives the real `ferry` binary against a private `--home` in a temp dir.
//!
//! Every command gets `--home <tempdir>` and `NO_COLOR=1`; `FERRY_HOME`, `FERRY_SERVER` and
//! `RUST_LOG` are removed from the environment so a developer's shell cannot leak in.
//! Every command runs with a timeout so a hung binary fails the test instead of hanging it.
//! Set `FERRY_E2E_KEEP=1` to keep the home folders of the tests for inspection.
//!
//! Served mode: [`Ferry::served`] (or every [`Ferry::new`] when `FERRY_E2E_SERVE=1`) starts a
//! real `ferry serve` over the home and runs every command as a client (`--server URL
//! --token T`, no `--home`), so the same test proves both modes print the same.

#![allow(dead_code)]

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
/// ferry's default change-detection block size.
pub const BLOCK: u64 = 64 * KIB;
/// Default timeout for one command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(300);
/// Timeout of polling loops.
pub const POLL_TIMEOUT: Duration = Duration::from_secs(60);

/// The recovery-site host every two-site set-up has.
pub const RECOVERY_HOST: &str = "r1";
/// The primary-site host every two-site set-up has.
pub const PRIMARY_HOST: &str = "h1";

pub struct Ferry {
    home: Option<tempfile::TempDir>,
    home_path: PathBuf,
    server: std::sync::Mutex<Option<Server>>,
    /// Environment every server of this Ferry gets (served mode).
    server_env: Vec<(String, String)>,
}

/// A `ferry serve` process over a test's home, killed when dropped.
pub struct Server {
    pub child: Child,
    pub url: String,
    /// An admin token of the server.
    pub token: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// True when `FERRY_E2E_SERVE=1` runs the whole suite through `ferry serve`.
pub fn serve_mode() -> bool {
    std::env::var("FERRY_E2E_SERVE").is_ok_and(|v| v == "1")
}

/// Starts `ferry --home HOME serve --listen 127.0.0.1:0` (with `env`) and waits for its
/// `listening on URL` line. Creates (once) and returns an admin token.
pub fn start_server(home: &Path, env: &[(&str, &str)], args: &[&str]) -> (Child, String) {
    use std::io::BufRead;
    let mut c = Command::new(Ferry::bin());
    c.arg("--home")
        .arg(home)
        .arg("serve")
        .args(if args.contains(&"--listen") {
            &[][..]
        } else {
            &["--listen", "127.0.0.1:0"][..]
        })
        .args(args)
        .env_remove("FERRY_HOME")
        .env_remove("FERRY_SERVER")
        .env_remove("FERRY_TOKEN")
        .env("RUST_BACKTRACE", "1")
        .env(
            "FERRY_LOG",
            std::env::var("FERRY_E2E_SERVER_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c.spawn().expect("spawn ferry serve");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(out);
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        let _ = tx.send(line);
        // Keep draining so the server never blocks on a full pipe.
        let _ = std::io::copy(&mut r, &mut std::io::sink());
    });
    let line = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("ferry serve printed no `listening on` line within 30 s");
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("unexpected first line of ferry serve: {line:?}"))
        .to_string();
    (child, url)
}

/// `ferry --home HOME token new NAME --role ROLE` (against the home, as an operator of the
/// server's machine does); returns the secret.
pub fn new_token(home: &Path, name: &str, role: &str) -> String {
    let out = Command::new(Ferry::bin())
        .arg("--home")
        .arg(home)
        .args(["token", "new", name, "--role", role])
        .env_remove("FERRY_SERVER")
        .env_remove("FERRY_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("run ferry token new");
    assert_exit(&out, 0, &["token", "new", name]);
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

impl Default for Ferry {
    fn default() -> Self {
        Self::new()
    }
}

impl Ferry {
    /// A fresh, empty home (not yet `init`ed); served when `FERRY_E2E_SERVE=1`.
    pub fn new() -> Self {
        if serve_mode() {
            return Self::served();
        }
        Self::embedded()
    }

    /// A fresh, empty home driven embedded (`--home`), whatever `FERRY_E2E_SERVE` says.
    pub fn embedded() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("ferry-e2e-")
            .tempdir()
            .expect("create temp home");
        let home_path = dir.path().to_path_buf();
        Ferry {
            home: Some(dir),
            home_path,
            server: std::sync::Mutex::new(None),
            server_env: Vec::new(),
        }
    }

    /// Like [`Ferry::new`], with `env` in the environment of whatever runs the jobs (each
    /// command embedded, or the server when served).
    pub fn with_env(env: &[(&str, &str)]) -> Self {
        let mut f = Self::embedded();
        f.server_env = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if serve_mode() {
            f.start_server(&[]);
        }
        f
    }

    /// A fresh home behind a real `ferry serve`; every command runs as its client with an
    /// admin token.
    pub fn served() -> Self {
        let f = Self::embedded();
        f.start_server(&[]);
        f
    }

    /// True when commands go through a server.
    pub fn is_served(&self) -> bool {
        self.server.lock().unwrap().is_some()
    }

    /// (Re)starts the server over this home with `env` (e.g. `FERRY_FAULT`); the previous
    /// one is killed (SIGKILL) first.
    pub fn start_server(&self, env: &[(&str, &str)]) {
        self.start_server_with(env, &[])
    }

    /// Like [`Ferry::start_server`], with extra `ferry serve` flags (e.g. `--no-resume`).
    pub fn start_server_with(&self, env: &[(&str, &str)], args: &[&str]) {
        let token = match self.server.lock().unwrap().take() {
            Some(old) => old.token.clone(),
            None => String::new(),
        };
        let mut all: Vec<(&str, &str)> = self
            .server_env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        all.extend_from_slice(env);
        let (child, url) = start_server(&self.home_path, &all, args);
        let token = if token.is_empty() {
            new_token(&self.home_path, "e2e-admin", "admin")
        } else {
            token
        };
        *self.server.lock().unwrap() = Some(Server { child, url, token });
    }

    /// URL and admin token of the server, in served mode.
    pub fn server_url(&self) -> Option<(String, String)> {
        self.server
            .lock()
            .unwrap()
            .as_ref()
            .map(|s| (s.url.clone(), s.token.clone()))
    }

    /// Pid of the server process (served mode).
    pub fn server_pid(&self) -> u32 {
        self.server
            .lock()
            .unwrap()
            .as_ref()
            .expect("served")
            .child
            .id()
    }

    /// True while the server process runs (it is reaped once it exits).
    pub fn server_alive(&self) -> bool {
        let mut g = self.server.lock().unwrap();
        let s = g.as_mut().expect("served");
        s.child.try_wait().unwrap().is_none()
    }

    /// Kills whatever runs the jobs of `child`'s command, like a crash: the command's own
    /// process (embedded), or the server with SIGKILL, which is then started again with
    /// `--no-resume` (served), so the test sees the interrupted job as embedded mode does.
    pub fn kill_job_runner(&self, child: &mut Child) {
        if self.is_served() {
            self.start_server_with(&[], &["--no-resume"]);
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Runs `ferry ARGS…` with a crash injected (`FERRY_FAULT=point`, a real SIGKILL) in
    /// whatever runs its job: the command's process (embedded), or the server, which is then
    /// started again without the fault (served). Asserts the command did not succeed.
    #[track_caller]
    pub fn crash_at(&self, point: &str, args: &[&str]) -> Output {
        let served = self.is_served();
        if served {
            self.start_server(&[("FERRY_FAULT", point)]);
        }
        let child = self
            .command(args)
            .env("FERRY_FAULT", point)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_output(child, CMD_TIMEOUT, point);
        assert_ne!(
            out.status.code(),
            Some(0),
            "{point}: the process must have died"
        );
        if served {
            let died = {
                let mut g = self.server.lock().unwrap();
                let s = g.as_mut().unwrap();
                let t = Instant::now();
                loop {
                    if s.child.try_wait().unwrap().is_some() {
                        break true;
                    }
                    if t.elapsed() > Duration::from_secs(30) {
                        break false;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            };
            assert!(died, "{point}: the server must have died");
            self.start_server_with(&[], &["--no-resume"]);
        }
        out
    }

    pub fn home(&self) -> &Path {
        &self.home_path
    }

    pub fn bin() -> &'static str {
        env!("CARGO_BIN_EXE_ferry")
    }

    /// A `Command` for `ferry --home HOME ARGS…` with a clean environment.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(Self::bin());
        match &*self.server.lock().unwrap() {
            Some(s) => {
                c.arg("--server").arg(&s.url).arg("--token").arg(&s.token);
            }
            None => {
                c.arg("--home").arg(&self.home_path);
                // Embedded, the command runs the jobs: it gets the environment a server would.
                for (k, v) in &self.server_env {
                    c.env(k, v);
                }
            }
        }
        c.args(args);
        c.env("NO_COLOR", "1")
            .env_remove("FERRY_HOME")
            .env_remove("FERRY_SERVER")
            .env_remove("FERRY_TOKEN")
            .env_remove("RUST_LOG")
            .env("RUST_BACKTRACE", "1")
            .stdin(Stdio::null());
        c
    }

    /// Starts `ferry ARGS…` in the background with stdout/stderr piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ferry {args:?}: {e}"))
    }

    /// Runs `ferry ARGS…` to completion (bounded by `CMD_TIMEOUT`).
    #[track_caller]
    pub fn run(&self, args: &[&str]) -> Output {
        self.run_timeout(args, CMD_TIMEOUT)
    }

    #[track_caller]
    pub fn run_timeout(&self, args: &[&str], timeout: Duration) -> Output {
        let child = self.spawn(args);
        wait_output(child, timeout, &format!("ferry {}", args.join(" ")))
    }

    /// Runs and asserts exit status 0; returns stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_exit(&out, 0, args);
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    /// Runs `ferry --json ARGS…`, asserts exit 0 and that stdout is exactly one JSON document.
    #[track_caller]
    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let out = self.ok(&a);
        parse_one_json(&out, &a)
    }

    /// Runs and asserts exit status 1 with exactly one line `error: …` on stderr; returns stderr.
    #[track_caller]
    pub fn fail(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_exit(&out, 1, args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_error_line(&err, args);
        err
    }

    /// Like `fail` but with `--json` (errors still go to stderr; stdout holds no stray text).
    #[track_caller]
    pub fn fail_json(&self, args: &[&str]) -> String {
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        self.fail(&a)
    }

    /// Runs and asserts a usage error (exit 2); returns stderr.
    #[track_caller]
    pub fn usage_error(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_exit(&out, 2, args);
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    // ---------------------------------------------------------------- set-up helpers

    /// `init`, site `prim` (primary), site `dr` (recovery), host `h1` at `prim` and host `r1`
    /// at `dr`, both with the given switches, both with the `dir` driver and default roots.
    #[track_caller]
    pub fn setup_two_sites(&self, switches: &[&str]) {
        self.ok(&["init"]);
        self.ok(&["site", "add", "prim", "--role", "primary"]);
        self.ok(&["site", "add", "dr", "--role", "recovery"]);
        self.add_host(PRIMARY_HOST, "prim", switches, None);
        self.add_host(RECOVERY_HOST, "dr", switches, None);
    }

    #[track_caller]
    pub fn add_host(&self, name: &str, site: &str, switches: &[&str], root: Option<&Path>) {
        let mut args: Vec<String> = vec![
            "host".into(),
            "add".into(),
            name.into(),
            "--site".into(),
            site.into(),
            "--driver".into(),
            "dir".into(),
        ];
        if let Some(r) = root {
            args.push("--root".into());
            args.push(r.to_str().unwrap().into());
        }
        for s in switches {
            args.push("--switch".into());
            args.push((*s).into());
        }
        self.ok(&strs(&args));
    }

    /// Default root folder of a host (`<home>/hosts/<host>`).
    pub fn host_root(&self, host: &str) -> PathBuf {
        self.home_path.join("hosts").join(host)
    }

    /// `vm create NAME --host HOST --disk S… --switch W…`; returns `vm show NAME --host HOST`.
    #[track_caller]
    pub fn create_vm(
        &self,
        name: &str,
        host: &str,
        disk_sizes: &[u64],
        switches: &[&str],
    ) -> Value {
        let mut args: Vec<String> = vec![
            "vm".into(),
            "create".into(),
            name.into(),
            "--host".into(),
            host.into(),
        ];
        for s in disk_sizes {
            args.push("--disk".into());
            args.push(s.to_string());
        }
        for w in switches {
            args.push("--switch".into());
            args.push((*w).into());
        }
        self.ok(&strs(&args));
        self.vm_show(name, Some(host))
    }

    /// `vm show NAME [--host HOST]` as JSON.
    #[track_caller]
    pub fn vm_show(&self, name: &str, host: Option<&str>) -> Value {
        match host {
            Some(h) => self.json(&["vm", "show", name, "--host", h]),
            None => self.json(&["vm", "show", name]),
        }
    }

    #[track_caller]
    pub fn power(&self, vm: &str, host: Option<&str>) -> String {
        self.vm_show(vm, host)["power"]
            .as_str()
            .expect("power is a string")
            .to_string()
    }

    /// Absolute path of disk `index` of the copy of `vm` on `host`.
    #[track_caller]
    pub fn disk_path(&self, vm: &str, host: &str, index: usize) -> PathBuf {
        let v = self.vm_show(vm, Some(host));
        disk_path_of(&v, index)
    }

    /// Paths of all disks of the copy of `vm` on `host`, by index.
    #[track_caller]
    pub fn disk_paths(&self, vm: &str, host: &str) -> Vec<PathBuf> {
        let v = self.vm_show(vm, Some(host));
        let n = v["disks"].as_array().expect("disks array").len();
        (0..n).map(|i| disk_path_of(&v, i)).collect()
    }

    #[track_caller]
    pub fn status(&self, vm: &str) -> Value {
        self.json(&["status", vm])
    }

    #[track_caller]
    pub fn state(&self, vm: &str) -> String {
        let s = self.status(vm);
        s["state"]
            .as_str()
            .unwrap_or_else(|| panic!("status has no state: {s}"))
            .to_string()
    }

    #[track_caller]
    pub fn active_site(&self, vm: &str) -> String {
        let s = self.status(vm);
        s["active_site"]
            .as_str()
            .unwrap_or_else(|| panic!("status has no active_site: {s}"))
            .to_string()
    }

    #[track_caller]
    pub fn assert_state(&self, vm: &str, want: &str) {
        let got = self.state(vm);
        assert_eq!(got, want, "state of {vm}");
    }

    #[track_caller]
    pub fn job(&self, id: u64) -> Value {
        self.json(&["job", "show", &id.to_string()])
    }

    /// All jobs (`jobs --all --json`).
    #[track_caller]
    pub fn all_jobs(&self) -> Vec<Value> {
        let v = self.json(&["jobs", "--all"]);
        v.as_array()
            .unwrap_or_else(|| panic!("jobs --all --json is not an array: {v}"))
            .clone()
    }

    #[track_caller]
    pub fn points(&self, vm: &str) -> Vec<Value> {
        let v = self.json(&["points", vm]);
        v.as_array()
            .unwrap_or_else(|| panic!("points --json is not an array: {v}"))
            .clone()
    }

    /// Polls `status VM` until `pred` holds; bounded by `timeout`. Returns the last status.
    #[track_caller]
    pub fn wait_status<F: Fn(&Value) -> bool>(
        &self,
        vm: &str,
        timeout: Duration,
        what: &str,
        pred: F,
    ) -> Value {
        let start = Instant::now();
        let mut last = Value::Null;
        while start.elapsed() < timeout {
            let out = self.run(&["--json", "status", vm]);
            if out.status.code() == Some(0) {
                if let Ok(v) = serde_json::from_slice::<Value>(&out.stdout) {
                    if pred(&v) {
                        return v;
                    }
                    last = v;
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("timed out after {timeout:?} waiting for {what}; last status: {last}");
    }

    // ------------------------------------------------------------ scenario helpers

    /// Creates `vm` on h1 with the disks and switches, starts it, fills every disk with
    /// `fill` bytes of random data from offset 0 (capped to the disk size) plus a random tail
    /// in the last (possibly partial) block, and protects it to `dr`. Returns the primary disk paths.
    #[track_caller]
    pub fn protected_vm(
        &self,
        vm: &str,
        disk_sizes: &[u64],
        switches: &[&str],
        fill: u64,
    ) -> Vec<PathBuf> {
        self.create_vm(vm, PRIMARY_HOST, disk_sizes, switches);
        self.ok(&["vm", "start", vm]);
        let paths = self.disk_paths(vm, PRIMARY_HOST);
        for (i, (p, &size)) in paths.iter().zip(disk_sizes).enumerate() {
            write_random(p, 0, fill.min(size), 1000 + i as u64);
            let tail = 4096.min(size);
            write_random(p, size - tail, tail, 2000 + i as u64);
        }
        let job = self.json(&["protect", vm, "--to", "dr"]);
        assert_job_state(&job, "succeeded");
        self.assert_state(vm, "protected");
        paths
    }

    /// `protected_vm` + planned failover + commit: the VM runs at the recovery site (state
    /// `failed_over`). Returns (primary disk paths, recovery disk paths).
    #[track_caller]
    pub fn failed_over_vm(
        &self,
        vm: &str,
        disk_sizes: &[u64],
        switches: &[&str],
        fill: u64,
    ) -> (Vec<PathBuf>, Vec<PathBuf>) {
        let prim = self.protected_vm(vm, disk_sizes, switches, fill);
        let job = self.json(&["failover", vm, "--planned"]);
        assert_job_state(&job, "succeeded");
        self.assert_state(vm, "failover_commit_pending");
        let job = self.json(&["commit", vm]);
        assert_job_state(&job, "succeeded");
        self.assert_state(vm, "failed_over");
        let active = self.vm_show(vm, None);
        assert_eq!(
            active["host"], RECOVERY_HOST,
            "active copy after failover: {active}"
        );
        assert_eq!(
            active["power"], "running",
            "recovery copy runs after failover: {active}"
        );
        let rec = self.disk_paths(vm, RECOVERY_HOST);
        (prim, rec)
    }
}

impl Drop for Ferry {
    fn drop(&mut self) {
        // Stop the server before its home goes.
        self.server.lock().unwrap().take();
        if std::env::var_os("FERRY_E2E_KEEP").is_some() {
            if let Some(d) = self.home.take() {
                let p = d.keep();
                eprintln!("FERRY_E2E_KEEP: kept {}", p.display());
            }
        }
    }
}

// -------------------------------------------------------------------- free helpers

pub fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(|s| s.as_str()).collect()
}

#[track_caller]
pub fn disk_path_of(vm_show: &Value, index: usize) -> PathBuf {
    let d = vm_show["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("vm show has no disks array: {vm_show}"))
        .iter()
        .find(|d| d["index"].as_u64() == Some(index as u64))
        .unwrap_or_else(|| panic!("vm show has no disk with index {index}: {vm_show}"));
    let p = PathBuf::from(
        d["path"]
            .as_str()
            .unwrap_or_else(|| panic!("disk without path: {d}")),
    );
    assert!(
        p.is_absolute(),
        "disk path must be absolute: {}",
        p.display()
    );
    p
}

/// Waits for a child with a timeout, collecting stdout/stderr without pipe deadlocks.
#[track_caller]
pub fn wait_output(mut child: Child, timeout: Duration, what: &str) -> Output {
    let mut so = child.stdout.take();
    let mut se = child.stderr.take();
    let t_out = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = so.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let t_err = std::thread::spawn(move || {
        let mut b = Vec::new();
        if let Some(s) = se.as_mut() {
            let _ = s.read_to_end(&mut b);
        }
        b
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait().expect("try_wait") {
            Some(st) => break st,
            None if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                let stderr = t_err.join().unwrap_or_default();
                panic!(
                    "{what}: still running after {timeout:?}, killed; stderr:\n{}",
                    String::from_utf8_lossy(&stderr)
                );
            }
            None => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    Output {
        status,
        stdout: t_out.join().unwrap_or_default(),
        stderr: t_err.join().unwrap_or_default(),
    }
}

#[track_caller]
pub fn assert_exit(out: &Output, code: i32, args: &[&str]) {
    assert_eq!(
        out.status.code(),
        Some(code),
        "ferry {}: expected exit {code}, got {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Contract: a refusal prints exactly one line `error: …` on stderr.
#[track_caller]
pub fn assert_error_line(stderr: &str, args: &[&str]) {
    assert!(
        stderr.starts_with("error: "),
        "ferry {}: stderr must start with 'error: ', got:\n{stderr}",
        args.join(" ")
    );
    let lines: Vec<&str> = stderr.trim_end().lines().collect();
    assert_eq!(
        lines.len(),
        1,
        "ferry {}: stderr must be one line, got:\n{stderr}",
        args.join(" ")
    );
    assert!(
        lines[0].len() > "error: ".len() + 5,
        "error line says nothing useful: {stderr}"
    );
}

/// stdout must be exactly one JSON document (whitespace around it allowed).
#[track_caller]
pub fn parse_one_json(stdout: &str, args: &[&str]) -> Value {
    let mut it = serde_json::Deserializer::from_str(stdout).into_iter::<Value>();
    let first = match it.next() {
        Some(Ok(v)) => v,
        Some(Err(e)) => panic!(
            "ferry {}: stdout is not JSON ({e}):\n{stdout}",
            args.join(" ")
        ),
        None => panic!(
            "ferry {}: stdout is empty, expected one JSON document",
            args.join(" ")
        ),
    };
    let rest = it.next();
    assert!(
        rest.is_none(),
        "ferry {}: stdout holds more than one JSON document / stray text:\n{stdout}",
        args.join(" ")
    );
    first
}

/// Normalises a message for matching state names written as `failover_commit_pending`,
/// `failover commit pending`, `FailoverCommitPending` or `failover-commit-pending`.
pub fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(|c| c.to_lowercase())
        .collect()
}

#[track_caller]
pub fn assert_mentions_state(msg: &str, state: &str) {
    assert!(
        squash(msg).contains(&squash(state)),
        "message should name state {state:?}: {msg}"
    );
}

// ------------------------------------------------------------------------ jobs

#[track_caller]
pub fn job_id(job: &Value) -> u64 {
    job["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("job id must be an integer: {job}"))
}

#[track_caller]
pub fn job_u64(job: &Value, field: &str) -> u64 {
    job[field]
        .as_u64()
        .unwrap_or_else(|| panic!("job.{field} must be a non-negative integer: {job}"))
}

#[track_caller]
pub fn assert_job_state(job: &Value, want: &str) {
    assert_eq!(job["state"].as_str(), Some(want), "job state: {job}");
}

/// Checks the job object's shape from CLI.md.
#[track_caller]
pub fn assert_job_shape(job: &Value) {
    assert!(job.is_object(), "job is an object: {job}");
    job_id(job);
    assert!(job["kind"].is_string(), "job.kind: {job}");
    assert!(job["vm"].is_string(), "job.vm: {job}");
    let st = job["state"]
        .as_str()
        .unwrap_or_else(|| panic!("job.state: {job}"));
    assert!(
        [
            "queued",
            "running",
            "waiting",
            "succeeded",
            "failed",
            "cancelled"
        ]
        .contains(&st),
        "job.state {st:?} not in the contract"
    );
    for f in ["bytes_read", "bytes_transferred", "bytes_written"] {
        job_u64(job, f);
    }
    assert!(
        job["started_at"].is_string() || job["started_at"].is_null(),
        "job.started_at: {job}"
    );
    assert!(
        job.get("ended_at").is_some(),
        "job.ended_at present (may be null): {job}"
    );
    let steps = job["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("job.steps array: {job}"));
    for s in steps {
        assert!(s["name"].is_string(), "step.name: {s}");
        let ss = s["state"]
            .as_str()
            .unwrap_or_else(|| panic!("step.state: {s}"));
        assert!(!ss.is_empty());
        let done = s["bytes_done"]
            .as_u64()
            .unwrap_or_else(|| panic!("step.bytes_done: {s}"));
        let total = s["bytes_total"]
            .as_u64()
            .unwrap_or_else(|| panic!("step.bytes_total: {s}"));
        if ss == "succeeded" {
            assert!(
                done <= total || total == 0,
                "succeeded step has done {done} > total {total}: {s}"
            );
        }
    }
}

/// `x` must lie within [lo, hi].
#[track_caller]
pub fn assert_between(what: &str, x: u64, lo: u64, hi: u64) {
    assert!(x >= lo && x <= hi, "{what} = {x} not within [{lo}, {hi}]");
}

/// Upper bound for "bytes that follow the changed bytes": changed + 10% + 128 KiB.
pub fn near_upper(changed: u64) -> u64 {
    changed + changed / 10 + 128 * KIB
}

/// Lower bound for random (incompressible) changed bytes that must cross: 90%.
pub fn near_lower(changed: u64) -> u64 {
    changed - changed / 10
}

// ---------------------------------------------------------------- disk "guest"

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {} for writing: {e}", path.display()))
}

/// Deterministic, incompressible pseudo-random bytes (splitmix64).
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(len + 8);
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    while out.len() < len {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// The guest writes `len` random bytes at `offset` (pwrite, no size change allowed).
#[track_caller]
pub fn write_random(path: &Path, offset: u64, len: u64, seed: u64) {
    let f = open_rw(path);
    let size = f.metadata().unwrap().len();
    assert!(
        offset + len <= size,
        "write past the end of {} ({offset}+{len} > {size})",
        path.display()
    );
    let chunk = 4 * MIB;
    let mut done = 0u64;
    let mut s = seed;
    while done < len {
        let n = chunk.min(len - done);
        let buf = random_bytes(n as usize, s);
        f.write_all_at(&buf, offset + done).expect("pwrite");
        done += n;
        s = s.wrapping_add(0x1234_5678_9abc_def1);
    }
    f.sync_all().expect("fsync");
}

/// The guest writes `len` bytes of `byte` at `offset`.
#[track_caller]
pub fn write_pattern(path: &Path, offset: u64, len: u64, byte: u8) {
    let f = open_rw(path);
    let size = f.metadata().unwrap().len();
    assert!(
        offset + len <= size,
        "write past the end of {}",
        path.display()
    );
    let buf = vec![byte; MIB.min(len) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (buf.len() as u64).min(len - done);
        f.write_all_at(&buf[..n as usize], offset + done)
            .expect("pwrite");
        done += n;
    }
    f.sync_all().expect("fsync");
}

/// The guest zeroes a range (writes zeros; no hole punching).
#[track_caller]
pub fn zero_range(path: &Path, offset: u64, len: u64) {
    write_pattern(path, offset, len, 0);
}

#[track_caller]
pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, offset).expect("pread");
    buf
}

#[track_caller]
pub fn file_len(path: &Path) -> u64 {
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// First offset where two files differ, or where one ends (None if bit-identical).
#[track_caller]
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    let mut fa = File::open(a).unwrap_or_else(|e| panic!("open {}: {e}", a.display()));
    let mut fb = File::open(b).unwrap_or_else(|e| panic!("open {}: {e}", b.display()));
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < la.min(lb) {
        let n = (MIB).min(la.min(lb) - off) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n]
                .iter()
                .zip(&bb[..n])
                .position(|(x, y)| x != y)
                .unwrap();
            return Some(off + i as u64);
        }
        off += n as u64;
    }
    if la != lb {
        return Some(la.min(lb));
    }
    None
}

#[track_caller]
pub fn assert_identical(a: &Path, b: &Path) {
    if let Some(off) = first_difference(a, b) {
        panic!(
            "{} and {} differ (sizes {} / {}), first at byte {off} (block {})",
            a.display(),
            b.display(),
            file_len(a),
            file_len(b),
            off / BLOCK
        );
    }
}

#[track_caller]
pub fn assert_all_identical(a: &[PathBuf], b: &[PathBuf]) {
    assert_eq!(a.len(), b.len(), "disk counts differ");
    for (x, y) in a.iter().zip(b) {
        assert_identical(x, y);
    }
}

/// A 64-bit FNV-1a digest of a whole file (for "did not change" checks).
#[track_caller]
pub fn digest(path: &Path) -> u64 {
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for &b in &buf[..n] {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h ^ file_len(path)
}

#[track_caller]
pub fn digests(paths: &[PathBuf]) -> Vec<u64> {
    paths.iter().map(|p| digest(p)).collect()
}

/// Copies a file (a reference image of a disk at one moment).
#[track_caller]
pub fn snapshot_file(src: &Path, dst: &Path) {
    fs::copy(src, dst)
        .unwrap_or_else(|e| panic!("copy {} -> {}: {e}", src.display(), dst.display()));
}
