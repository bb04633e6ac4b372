//! A small blocking QMP (QEMU Machine Protocol) client over a Unix socket.
//!
//! QMP is JSON over a stream: the server sends a greeting (`{"QMP": {...}}`), the client
//! answers `qmp_capabilities`, then each command `{"execute", "arguments"?, "id"}` gets one
//! reply `{"return": …, "id"}` or `{"error": {"class", "desc"}, "id"}`. Asynchronous events
//! (`{"event": …}`) may arrive at any time; they are set aside (see [`Qmp::take_events`]).
//!
//! Parsing is lenient: messages may span several lines or share none, unknown fields are
//! ignored and replies to other ids (left over from an earlier timeout) are skipped, so the
//! client works with QEMU 7.2 to 10.x alike.
//!
//! QEMU serves one QMP client per socket at a time; a second client waits until the first
//! hangs up. Keep connections short: connect, run the commands, drop.
//!
//! ```no_run
//! use ferry_hypervisor::qmp::Qmp;
//! let mut q = Qmp::connect("/var/lib/ferry/web1/qmp.sock")?;
//! let status = q.execute("query-status", None)?;
//! println!("{}", status["status"]);
//! let out = q.human_monitor_command(r#"qemu-io -d vblk0/virtio-backend "write -P 0xab 4M 2M""#)?;
//! assert!(out.is_empty(), "qemu-io failed: {out}");
//! # Ok::<(), ferry_hypervisor::qmp::QmpError>(())
//! ```
use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

/// How long [`Qmp::connect`] waits for the greeting and each reply by default.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest message accepted from the server (guards against a runaway peer).
const MAX_MESSAGE: usize = 64 << 20;

/// Events kept for [`Qmp::take_events`]; older ones are dropped.
const MAX_EVENTS: usize = 1024;

/// Errors of the QMP client; each names the socket and says what to try next.
#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    /// The socket could not be opened.
    #[error("cannot connect to QMP socket {path}: {source} (is the VM running? `ferry vm show VM --host HOST` shows its power state and socket)")]
    Connect {
        /// Socket path.
        path: String,
        /// Underlying error.
        source: io::Error,
    },
    /// Reading or writing the socket failed; the connection is unusable.
    #[error("QMP connection {path} failed: {source}; the connection is closed (did QEMU exit? see qemu.log next to the socket), connect again")]
    Io {
        /// Socket path.
        path: String,
        /// Underlying error.
        source: io::Error,
    },
    /// The server did not answer in time; the connection is unusable.
    #[error("QMP server {path} did not answer {what} within {timeout:?}; QEMU may be hung or another client holds the monitor: retry, or stop the VM")]
    Timeout {
        /// Socket path.
        path: String,
        /// What was awaited.
        what: String,
        /// The limit.
        timeout: Duration,
    },
    /// The server sent something that is not QMP; the connection is unusable.
    #[error("QMP server {path} broke the protocol: {detail}; check that the socket belongs to a QEMU monitor (-qmp unix:PATH,server=on)")]
    Protocol {
        /// Socket path.
        path: String,
        /// What was wrong.
        detail: String,
    },
    /// The server refused a command (the connection stays usable).
    #[error("QMP command {command} on {path} failed: {class}: {desc}")]
    Command {
        /// Socket path.
        path: String,
        /// The command that failed.
        command: String,
        /// QMP error class (`GenericError`, `CommandNotFound`, `DeviceNotFound`, …).
        class: String,
        /// QEMU's description.
        desc: String,
    },
    /// An earlier I/O, timeout or protocol error left the connection unusable.
    #[error("QMP connection {path} is unusable after an earlier error; connect again")]
    Closed {
        /// Socket path.
        path: String,
    },
}

impl QmpError {
    /// The QMP error class when the server refused a command.
    pub fn class(&self) -> Option<&str> {
        match self {
            QmpError::Command { class, .. } => Some(class),
            _ => None,
        }
    }

    /// QEMU's description when the server refused a command.
    pub fn desc(&self) -> Option<&str> {
        match self {
            QmpError::Command { desc, .. } => Some(desc),
            _ => None,
        }
    }

    /// True when the connection broke (EOF, reset) rather than the command being refused.
    pub fn is_disconnect(&self) -> bool {
        matches!(self, QmpError::Io { .. } | QmpError::Closed { .. })
    }
}

/// Result alias of the QMP client.
pub type Result<T> = std::result::Result<T, QmpError>;

/// A connected QMP session in command mode.
pub struct Qmp {
    path: String,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    timeout: Duration,
    next_id: u64,
    greeting: Value,
    events: Vec<Value>,
    pending: Vec<u8>,
    broken: bool,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("path", &self.path)
            .field("next_id", &self.next_id)
            .finish_non_exhaustive()
    }
}

impl Qmp {
    /// Connects to the QMP socket at `path`, reads the greeting and enters command mode
    /// (`qmp_capabilities`), waiting at most [`DEFAULT_TIMEOUT`] for each answer.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        Self::connect_timeout(path, DEFAULT_TIMEOUT)
    }

    /// [`Qmp::connect`] with a chosen timeout for the greeting and every later reply.
    pub fn connect_timeout(path: impl AsRef<Path>, timeout: Duration) -> Result<Self> {
        let path = path.as_ref();
        let label = path.display().to_string();
        let stream = UnixStream::connect(path).map_err(|source| QmpError::Connect {
            path: label.clone(),
            source,
        })?;
        Self::handshake(stream, label, timeout)
    }

    /// Runs the greeting and capabilities negotiation on an already connected stream
    /// (`label` names the peer in errors). Used by [`Qmp::connect`] and by tests.
    pub fn handshake(stream: UnixStream, label: String, timeout: Duration) -> Result<Self> {
        let io = |source| QmpError::Io {
            path: label.clone(),
            source,
        };
        stream.set_read_timeout(Some(timeout)).map_err(io)?;
        stream.set_write_timeout(Some(timeout)).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        let mut q = Qmp {
            path: label,
            reader: BufReader::new(stream),
            writer,
            timeout,
            next_id: 1,
            greeting: Value::Null,
            events: Vec::new(),
            pending: Vec::new(),
            broken: false,
        };
        let g = q.read_message("the greeting")?;
        if g.get("QMP").is_none() {
            return Err(q.fail(q.protocol(format!(
                "the first message is not a QMP greeting: {}",
                clip(&g.to_string())
            ))));
        }
        q.greeting = g;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    /// The greeting the server sent (`{"QMP": {"version": …, "capabilities": […]}}`).
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// QEMU's version from the greeting as (major, minor, micro), if present.
    pub fn version(&self) -> Option<(u64, u64, u64)> {
        let v = &self.greeting["QMP"]["version"]["qemu"];
        Some((
            v["major"].as_u64()?,
            v["minor"].as_u64()?,
            v["micro"].as_u64().unwrap_or(0),
        ))
    }

    /// The socket this session talks to.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Changes the reply timeout for later commands.
    pub fn set_timeout(&mut self, timeout: Duration) -> Result<()> {
        self.timeout = timeout;
        let r = self.writer.set_read_timeout(Some(timeout));
        r.map_err(|source| QmpError::Io {
            path: self.path.clone(),
            source,
        })
    }

    /// Runs `command` with optional `arguments` (a JSON object) and returns its `return` value.
    /// Events that arrive meanwhile are kept for [`Qmp::take_events`].
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        let _span = tracing::debug_span!("qmp", command).entered();
        if self.broken {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": command, "id": id });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).expect("a JSON value serializes");
        line.push(b'\n');
        if let Err(e) = self
            .writer
            .write_all(&line)
            .and_then(|_| self.writer.flush())
        {
            let e = self.io_error(e, &format!("the {command} command"));
            return Err(self.fail(e));
        }
        let what = format!("the reply to {command}");
        loop {
            let m = self.read_message(&what)?;
            if m.get("event").is_some() {
                if self.events.len() >= MAX_EVENTS {
                    self.events.remove(0);
                }
                self.events.push(m);
                continue;
            }
            match m.get("id") {
                // A reply to an earlier command whose answer we stopped waiting for.
                Some(other) if !same_id(other, id) => continue,
                _ => {}
            }
            if let Some(r) = m.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = m.get("error") {
                return Err(QmpError::Command {
                    path: self.path.clone(),
                    command: command.to_string(),
                    class: e["class"].as_str().unwrap_or("GenericError").to_string(),
                    desc: e["desc"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| e.to_string()),
                });
            }
            // Anything else (a stray greeting, a message type from a newer QEMU): skip it.
        }
    }

    /// Runs an HMP command line through `human-monitor-command` and returns its text output.
    ///
    /// HMP reports many failures as text rather than as a QMP error: `qemu-io`, for one,
    /// answers `""` on success and an error message otherwise.
    pub fn human_monitor_command(&mut self, command_line: &str) -> Result<String> {
        let r = self.execute(
            "human-monitor-command",
            Some(json!({ "command-line": command_line })),
        )?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }

    /// Events received so far (oldest first), removing them from the session.
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }

    /// Reads one JSON object, however it is split across lines (or several share one).
    fn read_message(&mut self, what: &str) -> Result<Value> {
        if self.broken {
            return Err(QmpError::Closed {
                path: self.path.clone(),
            });
        }
        loop {
            if !self.pending.is_empty() {
                let mut it =
                    serde_json::Deserializer::from_slice(&self.pending).into_iter::<Value>();
                match it.next() {
                    Some(Ok(v)) => {
                        let used = it.byte_offset();
                        self.pending.drain(..used);
                        if v.is_object() {
                            return Ok(v);
                        }
                        let e = self.protocol(format!(
                            "expected a JSON object, got {}",
                            clip(&v.to_string())
                        ));
                        return Err(self.fail(e));
                    }
                    // The message continues in bytes not read yet.
                    Some(Err(e)) if e.is_eof() => {}
                    Some(Err(e)) => {
                        let e = self.protocol(format!(
                            "invalid JSON ({e}): {}",
                            clip(&String::from_utf8_lossy(&self.pending))
                        ));
                        return Err(self.fail(e));
                    }
                    None => self.pending.clear(),
                }
            }
            // Bounded: a line without an end must not grow past the limit before it is checked.
            let room = (MAX_MESSAGE + 1).saturating_sub(self.pending.len()) as u64;
            let n =
                match io::Read::take(&mut self.reader, room).read_until(b'\n', &mut self.pending) {
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        let e = self.io_error(e, what);
                        return Err(self.fail(e));
                    }
                };
            if n == 0 {
                let detail = if self.pending.iter().all(u8::is_ascii_whitespace) {
                    format!("the server closed the connection while we waited for {what}")
                } else {
                    format!(
                        "the server closed the connection in the middle of a message: {}",
                        clip(&String::from_utf8_lossy(&self.pending))
                    )
                };
                let e = QmpError::Io {
                    path: self.path.clone(),
                    source: io::Error::new(io::ErrorKind::UnexpectedEof, detail),
                };
                return Err(self.fail(e));
            }
            if self.pending.len() > MAX_MESSAGE {
                let e = self.protocol(format!("a message exceeds {MAX_MESSAGE} bytes"));
                return Err(self.fail(e));
            }
        }
    }

    fn io_error(&self, e: io::Error, what: &str) -> QmpError {
        if matches!(
            e.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ) {
            QmpError::Timeout {
                path: self.path.clone(),
                what: what.to_string(),
                timeout: self.timeout,
            }
        } else {
            QmpError::Io {
                path: self.path.clone(),
                source: e,
            }
        }
    }

    fn protocol(&self, detail: String) -> QmpError {
        QmpError::Protocol {
            path: self.path.clone(),
            detail,
        }
    }

    fn fail(&mut self, e: QmpError) -> QmpError {
        self.broken = true;
        e
    }
}

fn same_id(v: &Value, id: u64) -> bool {
    v.as_u64() == Some(id) || v.as_str().and_then(|s| s.parse().ok()) == Some(id)
}

fn clip(s: &str) -> String {
    let s = s.trim();
    match s.char_indices().nth(200) {
        Some((i, _)) => format!("{}…", &s[..i]),
        None => s.to_string(),
    }
}

/// Socket path of a VM's QMP monitor inside its folder.
pub fn socket_in(vm_dir: &Path) -> PathBuf {
    vm_dir.join("qmp.sock")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::thread;

    /// A fake QMP server: sends `script` pieces, answering each request line with the next reply.
    fn serve(
        greeting: &'static str,
        replies: Vec<&'static str>,
    ) -> (UnixStream, thread::JoinHandle<Vec<Value>>) {
        let (client, mut server) = UnixStream::pair().unwrap();
        let h = thread::spawn(move || {
            server.write_all(greeting.as_bytes()).unwrap();
            let mut seen = Vec::new();
            let mut r = BufReader::new(server.try_clone().unwrap());
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).unwrap() == 0 {
                    break;
                }
                seen.push(serde_json::from_str(&line).unwrap());
                server.write_all(reply.as_bytes()).unwrap();
            }
            // Drain until the client hangs up.
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            seen
        });
        (client, h)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(96))]

        // A QMP server (or whatever listens on the socket) answering with any bytes: the
        // handshake and a command give a value or an error, never a panic or a hang.
        #[test]
        fn any_greeting_or_reply_is_a_value_or_an_error(
            greeting in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            reply in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..200),
            good_greeting in proptest::prelude::any::<bool>(),
        ) {
            let (client, mut server) = UnixStream::pair().unwrap();
            let h = thread::spawn(move || {
                if !good_greeting {
                    // Garbage, then the end: the client must not wait for more.
                    let _ = server.write_all(&greeting);
                    let _ = server.shutdown(std::net::Shutdown::Both);
                    return;
                }
                let _ = server.write_all(GREETING.as_bytes());
                let mut r = BufReader::new(server.try_clone().unwrap());
                for answer in [b"{\"return\": {}, \"id\": 1}\r\n".to_vec(), reply] {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let _ = server.write_all(&answer);
                }
                let _ = server.shutdown(std::net::Shutdown::Both);
            });
            if let Ok(mut q) = Qmp::handshake(client, "fuzz".into(), Duration::from_secs(5)) {
                let _ = q.execute("query-status", None);
            }
            h.join().unwrap();
        }
    }

    const GREETING: &str = "{\"QMP\": {\"version\": {\"qemu\": {\"micro\": 2, \"minor\": 0, \"major\": 10}, \"package\": \"\"}, \"capabilities\": [\"oob\"]}}\r\n";

    #[test]
    fn greeting_capabilities_and_ids() {
        let (c, h) = serve(
            GREETING,
            vec![
                "{\"return\": {}, \"id\": 1}\r\n",
                "{\"return\": {\"status\": \"running\", \"running\": true}, \"id\": 2}\r\n",
            ],
        );
        let mut q = Qmp::handshake(c, "fake".into(), Duration::from_secs(5)).unwrap();
        assert_eq!(q.version(), Some((10, 0, 2)));
        let s = q.execute("query-status", None).unwrap();
        assert_eq!(s["status"], "running");
        drop(q);
        let seen = h.join().unwrap();
        assert_eq!(seen[0]["execute"], "qmp_capabilities");
        assert_eq!(seen[0]["id"], 1);
        assert!(seen[0].get("arguments").is_none());
        assert_eq!(seen[1]["execute"], "query-status");
        assert_eq!(seen[1]["id"], 2);
    }

    #[test]
    fn events_and_stale_replies_are_skipped_and_messages_may_span_lines() {
        let (c, h) = serve(
            GREETING,
            vec![
                "{\"return\": {}}\n",
                // An event, a stale reply, then the real one pretty-printed over lines.
                "{\"event\": \"RESUME\", \"timestamp\": {\"seconds\": 1, \"microseconds\": 2}}\r\n\r\n{\"return\": 7, \"id\": 99}\n{\n  \"return\": \"\",\n  \"id\": 2\n}\n",
                "{\"return\": {}, \"id\": 3}{\"event\":\"X\"}\n",
                "[1]\n",
            ],
        );
        let mut q = Qmp::handshake(c, "fake".into(), Duration::from_secs(5)).unwrap();
        let out = q.human_monitor_command("info status").unwrap();
        assert_eq!(out, "");
        let ev = q.take_events();
        assert_eq!(ev.len(), 1);
        assert_eq!(ev[0]["event"], "RESUME");
        // Two objects on one line: the reply, then an event (read with the next reply).
        q.execute("stop", None).unwrap();
        // Not an object: reported, and the connection is closed.
        let err = q.execute("cont", None).unwrap_err();
        assert!(matches!(err, QmpError::Protocol { .. }), "{err}");
        assert_eq!(q.take_events()[0]["event"], "X");
        assert!(matches!(
            q.execute("cont", None),
            Err(QmpError::Closed { .. })
        ));
        drop(q);
        let seen = h.join().unwrap();
        assert_eq!(seen[1]["arguments"]["command-line"], "info status");
    }

    #[test]
    fn errors_carry_class_and_desc() {
        let (c, _h) = serve(
            GREETING,
            vec![
                "{\"return\": {}, \"id\": 1}\n",
                "{\"id\": 2, \"error\": {\"class\": \"DeviceNotFound\", \"desc\": \"Device 'x' not found\"}}\n",
                "{\"return\": {}, \"id\": 3}\n",
            ],
        );
        let mut q = Qmp::handshake(c, "fake".into(), Duration::from_secs(5)).unwrap();
        let err = q
            .execute("block-export-del", Some(json!({"id": "x"})))
            .unwrap_err();
        assert_eq!(err.class(), Some("DeviceNotFound"));
        assert_eq!(err.desc(), Some("Device 'x' not found"));
        assert!(err.to_string().contains("block-export-del"), "{err}");
        assert!(!err.is_disconnect());
        // The session stays usable after a refused command.
        q.execute("stop", None).unwrap();
    }

    #[test]
    fn not_a_greeting_eof_and_timeout_are_reported() {
        let (c, _h) = serve("{\"return\": {}}\n", vec![]);
        let err = Qmp::handshake(c, "fake".into(), Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("greeting"), "{err}");

        let (c, s) = UnixStream::pair().unwrap();
        drop(s);
        let err = Qmp::handshake(c, "fake".into(), Duration::from_secs(5)).unwrap_err();
        assert!(err.is_disconnect(), "{err}");
        assert!(err.to_string().contains("closed the connection"), "{err}");

        let (c, _s) = UnixStream::pair().unwrap();
        let err = Qmp::handshake(c, "fake".into(), Duration::from_millis(50)).unwrap_err();
        assert!(matches!(err, QmpError::Timeout { .. }), "{err}");

        let err = Qmp::connect("/nonexistent/qmp.sock").unwrap_err();
        assert!(matches!(err, QmpError::Connect { .. }), "{err}");
    }
}
