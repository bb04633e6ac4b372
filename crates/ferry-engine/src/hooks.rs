//! Commands a recovery plan runs around its groups (`--pre`, `--post`): `sh -c CMD` in its
//! own process group, output captured (the last [`MAX_OUTPUT`] bytes), killed with everything
//! it started when it runs past its timeout.
use std::io::Read;
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
    let (mut reader, writer) = std::io::pipe()?;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(command)
        .stdin(Stdio::null())
        .stdout(writer.try_clone()?)
        .stderr(writer);
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
    // The pipe's write ends now live only in the child (and its children).
    drop(cmd);
    let collector = std::thread::spawn(move || {
        let mut kept: Vec<u8> = Vec::new();
        let mut buf = [0u8; 8192];
        while let Ok(n) = reader.read(&mut buf) {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            if kept.len() > 2 * MAX_OUTPUT {
                kept.drain(..kept.len() - MAX_OUTPUT);
            }
        }
        if kept.len() > MAX_OUTPUT {
            kept.drain(..kept.len() - MAX_OUTPUT);
        }
        String::from_utf8_lossy(&kept).into_owned()
    });
    let pgid = child.id() as i32;
    let mut timed_out = false;
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        if started.elapsed() >= timeout {
            timed_out = true;
            unsafe {
                libc::kill(-pgid, libc::SIGKILL);
            }
            break child.wait()?;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let elapsed = started.elapsed();
    // Background children that keep the pipe open are killed with the group.
    unsafe {
        libc::kill(-pgid, libc::SIGKILL);
    }
    let output = collector.join().unwrap_or_default();
    Ok(HookOutcome {
        exit_code: if timed_out { None } else { status.code() },
        timed_out,
        output,
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
