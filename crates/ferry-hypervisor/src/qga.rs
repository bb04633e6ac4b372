//! A small blocking client of the QEMU guest agent (`qemu-ga`) over the VM's Unix socket.
//!
//! The guest agent speaks JSON lines like QMP, but without a greeting, and a reply that
//! arrives after its client gave up stays in the channel. So every session starts with
//! `guest-sync {"id": N}` (a fresh N) and skips everything until `{"return": N}`; a late reply
//! of an earlier command is skipped the same way. ferry uses it to freeze the guest's file
//! systems around a snapshot (`guest-fsfreeze-freeze` / `guest-fsfreeze-thaw`).
//!
//! QEMU serves one client per socket at a time; keep sessions short.
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest line accepted from the agent.
const MAX_LINE: usize = 1 << 20;

/// Errors of the guest-agent client; each says what went wrong in words an operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum QgaError {
    /// The channel could not be opened or used.
    #[error("guest agent channel {path}: {source}")]
    Io {
        /// Socket path.
        path: String,
        /// Underlying error.
        source: io::Error,
    },
    /// No reply in time: no agent runs in the guest, or it is busy.
    #[error("the guest agent did not answer {what} within {timeout:?} (is qemu-guest-agent running in the guest?)")]
    Timeout {
        /// The command.
        what: String,
        /// How long the client waited.
        timeout: Duration,
    },
    /// The agent answered with an error.
    #[error("the guest agent refused {what}: {desc}")]
    Command {
        /// The command.
        what: String,
        /// The agent's description.
        desc: String,
    },
}

/// A connection to one VM's guest agent.
pub struct Qga {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qga {
    /// Connects to the agent socket at `path` and synchronises (waiting at most `timeout`).
    pub fn connect(path: &Path, timeout: Duration) -> Result<Self, QgaError> {
        let p = path.display().to_string();
        let io = |source| QgaError::Io {
            path: p.clone(),
            source,
        };
        let s = UnixStream::connect(path).map_err(io)?;
        let writer = s.try_clone().map_err(io)?;
        let mut q = Qga {
            path: p.clone(),
            reader: BufReader::new(s),
            writer,
        };
        q.sync(timeout)?;
        Ok(q)
    }

    /// `guest-sync` with a fresh id: afterwards the next reply belongs to the next command.
    pub fn sync(&mut self, timeout: Duration) -> Result<(), QgaError> {
        let id = sync_id();
        self.send(&json!({"execute": "guest-sync", "arguments": {"id": id}}))?;
        let deadline = Instant::now() + timeout;
        loop {
            let v = self.read_reply("guest-sync", deadline, timeout)?;
            if v.get("return").and_then(Value::as_u64) == Some(id) {
                return Ok(());
            }
            // Anything else is a late reply to an earlier client's command: skip it.
        }
    }

    /// Runs `command` and returns its `return` value (waiting at most `timeout`).
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        self.send(&msg)?;
        let deadline = Instant::now() + timeout;
        let v = self.read_reply(command, deadline, timeout)?;
        if let Some(e) = v.get("error") {
            return Err(QgaError::Command {
                what: command.into(),
                desc: e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown error")
                    .into(),
            });
        }
        Ok(v.get("return").cloned().unwrap_or(Value::Null))
    }

    /// Sends `command` without waiting for its reply (it queues behind a command the agent
    /// is still running; a later [`Qga::sync`] waits for both).
    pub fn send_only(&mut self, command: &str) -> Result<(), QgaError> {
        self.send(&json!({ "execute": command }))
    }

    fn send(&mut self, msg: &Value) -> Result<(), QgaError> {
        let mut line = msg.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .and_then(|_| self.writer.flush())
            .map_err(|source| QgaError::Io {
                path: self.path.clone(),
                source,
            })
    }

    /// The next JSON object from the agent, before `deadline`.
    fn read_reply(
        &mut self,
        what: &str,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<Value, QgaError> {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QgaError::Timeout {
                    what: what.into(),
                    timeout,
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(|source| QgaError::Io {
                    path: self.path.clone(),
                    source,
                })?;
            let mut line = Vec::new();
            let r = io::Read::take(&mut self.reader, MAX_LINE as u64).read_until(b'\n', &mut line);
            match r {
                Ok(0) => {
                    return Err(QgaError::Io {
                        path: self.path.clone(),
                        source: io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "QEMU closed the channel",
                        ),
                    })
                }
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    // A partial line is kept by BufReader only up to what was consumed; a
                    // timeout here ends the wait.
                    return Err(QgaError::Timeout {
                        what: what.into(),
                        timeout,
                    });
                }
                Err(source) => {
                    return Err(QgaError::Io {
                        path: self.path.clone(),
                        source,
                    })
                }
            }
            // `guest-sync-delimited` replies start with 0xFF; tolerate it and blank lines.
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_matches(|c: char| c.is_whitespace() || c == '\u{FFFD}');
            if text.is_empty() {
                continue;
            }
            if let Ok(v) = serde_json::from_str::<Value>(text) {
                if v.is_object() {
                    return Ok(v);
                }
            }
        }
    }
}

/// A sync id that differs between calls and processes.
fn sync_id() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64)
        .unwrap_or(0);
    // Keep it within JSON's safe integer range.
    ((std::process::id() as u64) << 32 ^ t ^ (n << 20)) & ((1 << 52) - 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A fake agent: answers guest-sync after a stale reply, then freeze after `delay`.
    fn fake_agent(dir: &Path, delay: Duration) -> std::path::PathBuf {
        let path = dir.join("qga.sock");
        let l = UnixListener::bind(&path).unwrap();
        std::thread::spawn(move || {
            let (s, _) = l.accept().unwrap();
            let mut w = s.try_clone().unwrap();
            let r = BufReader::new(s);
            // A late reply from an earlier session, before anything was asked.
            w.write_all(b"{\"return\": 7}\n").unwrap();
            for line in r.lines() {
                let v: Value = serde_json::from_str(&line.unwrap()).unwrap();
                let reply = match v["execute"].as_str().unwrap() {
                    "guest-sync" => json!({"return": v["arguments"]["id"]}),
                    "guest-fsfreeze-freeze" => {
                        std::thread::sleep(delay);
                        json!({"return": 1})
                    }
                    _ => json!({"error": {"class": "CommandNotFound", "desc": "no such command"}}),
                };
                w.write_all(format!("{reply}\n").as_bytes()).unwrap();
            }
        });
        path
    }

    #[test]
    fn syncs_past_stale_replies_and_runs_commands() {
        let dir = tempfile::tempdir().unwrap();
        let p = fake_agent(dir.path(), Duration::ZERO);
        let mut q = Qga::connect(&p, Duration::from_secs(5)).unwrap();
        let n = q
            .execute("guest-fsfreeze-freeze", None, Duration::from_secs(5))
            .unwrap();
        assert_eq!(n, json!(1));
        let e = q.execute("nope", None, Duration::from_secs(5)).unwrap_err();
        assert!(e.to_string().contains("no such command"), "{e}");
    }

    #[test]
    fn a_slow_command_times_out_and_a_sync_skips_its_late_reply() {
        let dir = tempfile::tempdir().unwrap();
        let p = fake_agent(dir.path(), Duration::from_millis(300));
        let mut q = Qga::connect(&p, Duration::from_secs(5)).unwrap();
        let e = q
            .execute("guest-fsfreeze-freeze", None, Duration::from_millis(20))
            .unwrap_err();
        assert!(matches!(e, QgaError::Timeout { .. }), "{e}");
        // The freeze's reply arrives later; the sync must not take it for its own.
        q.sync(Duration::from_secs(5)).unwrap();
        assert!(q
            .execute("nope", None, Duration::from_secs(5))
            .is_err_and(|e| e.to_string().contains("no such command")));
    }

    #[test]
    fn no_agent_is_a_timeout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qga.sock");
        let _l = UnixListener::bind(&path).unwrap();
        // QEMU accepts the connection even when no agent runs in the guest; nobody answers.
        let e = Qga::connect(&path, Duration::from_millis(100))
            .err()
            .expect("no agent answers");
        assert!(matches!(e, QgaError::Timeout { .. }), "{e}");
    }
}
