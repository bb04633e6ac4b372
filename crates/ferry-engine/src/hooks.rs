//! Commands a recovery plan runs around its groups (`--pre`, `--post`): `sh -c CMD` in its
//! own process group, its output captured in an unlinked temporary file (the last
//! [`MAX_OUTPUT`] bytes are kept), and, when it runs past its timeout, killed with everything
//! it started in its group. A command that finishes in time may leave background processes
//! running (`nohup … &`); they are its business, and they cannot hold the plan up: the output
//! goes to a file, not a pipe whose end they would keep open.
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Output kept of one command (its tail).
pub const MAX_OUTPUT: usize = 16 << 10;

/// How a command ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookOutcome {
    /// Exit code; None when a signal ended it (the timeout's kill among them).
    pub exit_code: Option<i32>,
    /// True when it ran past the timeout and was killed.
    pub timed_out: bool,
    /// stdout and stderr, interleaved as written (the last [`MAX_OUTPUT`] bytes).
    pub output: String,
    /// How long it ran.
    pub elapsed: Duration,
}

/// Runs `sh -c command` with `env` added to ferry's environment, waiting at most `timeout`.
pub fn run(
    command: &str,
    env: &[(&str, String)],
    timeout: Duration,
) -> std::io::Result<HookOutcome> {
    let mut out = tempfile::tempfile()?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?);
    for (k, v) in env {
        cmd.env(k, v);
    }
    // Its own process group: the timeout kills what it started too.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpgid(0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let mut child = cmd.spawn()?;
    let pgid = child.id() as i32;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            // The group still has its leader (not reaped yet): the id cannot be reused.
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    let len = out.seek(SeekFrom::End(0))?;
    out.seek(SeekFrom::Start(len.saturating_sub(MAX_OUTPUT as u64)))?;
    let mut kept = Vec::new();
    out.read_to_end(&mut kept)?;
    Ok(HookOutcome {
        exit_code: if timed_out { None } else { status.code() },
        timed_out,
        output: String::from_utf8_lossy(&kept).into_owned(),
        elapsed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_exit_code_and_environment() {
        let r = run(
            "echo out; echo err >&2; echo \"$FERRY_X\"; exit 3",
            &[("FERRY_X", "x-value".into())],
            Duration::from_secs(10),
        )
        .unwrap();
        assert_eq!(r.exit_code, Some(3));
        assert!(!r.timed_out);
        for s in ["out", "err", "x-value"] {
            assert!(r.output.contains(s), "{s} in {:?}", r.output);
        }
    }

    #[test]
    fn a_command_past_its_timeout_is_killed_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("late");
        let cmd = format!("(sleep 2; touch {}) & sleep 30", marker.display());
        let r = run(&cmd, &[], Duration::from_millis(300)).unwrap();
        assert!(r.timed_out);
        assert_eq!(r.exit_code, None);
        assert!(r.elapsed < Duration::from_secs(5), "{:?}", r.elapsed);
        std::thread::sleep(Duration::from_millis(2500));
        assert!(
            !marker.exists(),
            "the command's background child was killed too"
        );
    }

    #[test]
    fn a_background_process_that_keeps_running_does_not_hold_the_plan_up() {
        let t = Instant::now();
        // setsid leaves the group; the daemon keeps stdout open for 20 s.
        let r = run(
            "setsid sleep 20 & echo started",
            &[],
            Duration::from_secs(30),
        )
        .unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert!(r.output.contains("started"));
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }

    #[test]
    fn only_the_tail_of_a_long_output_is_kept() {
        let r = run(
            "i=0; while [ $i -lt 3000 ]; do echo line-$i-xxxxxxxxxxxxxxxx; i=$((i+1)); done",
            &[],
            Duration::from_secs(20),
        )
        .unwrap();
        assert_eq!(r.exit_code, Some(0));
        assert!(r.output.len() <= MAX_OUTPUT);
        assert!(r.output.trim_end().ends_with("line-2999-xxxxxxxxxxxxxxxx"));
    }
}
