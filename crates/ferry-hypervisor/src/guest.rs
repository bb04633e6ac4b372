//! What ferry's test guest (`scripts/guest-image.sh`, `--image guest`) says on its serial
//! console: at each boot the result of `e2fsck -fn` on its data disk and of `sha256sum -c` on
//! the files it wrote, then a line per file it fsynced. The qemu driver keeps that console in
//! `console.log` in the VM's folder; [`read_console`] reads the last boot's report from it.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file, in a qemu VM's folder, that keeps its serial console.
pub const CONSOLE_FILE: &str = "console.log";

/// The console log of VM `vm` on a qemu host whose root folder is `root`.
pub fn console_path(root: &Path, vm: &str) -> PathBuf {
    root.join(vm).join(CONSOLE_FILE)
}

/// What the guest reported since its last boot.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct BootReport {
    /// Boots seen in the whole log.
    pub boots: usize,
    /// `e2fsck -fn` exit code of the data disk (0: clean), once checked.
    pub fsck: Option<i32>,
    /// Checksum lines that verified.
    pub ok: u64,
    /// Checksum lines whose file is missing or differs.
    pub failed: u64,
    /// Lines of the checksum list that were not well-formed (a crash may tear the last one).
    pub malformed: u64,
    /// Number of the last file the checksum list named at boot (0: none).
    pub last_at_boot: u64,
    /// Number of the newest file fsynced (with its checksum line) since this boot.
    pub synced: u64,
    /// The guest agent was started.
    pub agent: bool,
    /// Every console line since the boot (for messages).
    pub lines: Vec<String>,
}

impl BootReport {
    /// True once the boot's checks are done and the guest agent runs.
    pub fn checked(&self) -> bool {
        self.boots > 0 && self.fsck.is_some() && self.agent
    }

    /// True when the boot's checks found a clean file system and every checksummed file
    /// intact (at most the last checksum line torn).
    pub fn clean(&self) -> bool {
        self.fsck == Some(0) && self.failed == 0 && self.malformed <= 1
    }
}

fn file_number(s: &str) -> u64 {
    s.trim()
        .strip_prefix("f-")
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Parses a console log's text: the report of its last boot.
pub fn parse_console(text: &str) -> BootReport {
    let mut b = BootReport::default();
    for line in text.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with("FERRY-GUEST boot") {
            b = BootReport {
                boots: b.boots + 1,
                ..BootReport::default()
            };
        }
        b.lines.push(line.to_string());
        if let Some(rc) = line.strip_prefix("FERRY-FSCK rc=") {
            b.fsck = rc.trim().parse().ok();
        } else if let Some(rest) = line.strip_prefix("FERRY-SUMS ") {
            for kv in rest.split_whitespace() {
                match kv.split_once('=') {
                    Some(("ok", v)) => b.ok = v.parse().unwrap_or(0),
                    Some(("failed", v)) => b.failed = v.parse().unwrap_or(0),
                    Some(("malformed", v)) => b.malformed = v.parse().unwrap_or(0),
                    Some(("last", v)) => b.last_at_boot = file_number(v),
                    _ => {}
                }
            }
        } else if let Some(f) = line.strip_prefix("FERRY-SYNCED ") {
            b.synced = b.synced.max(file_number(f));
        } else if line.starts_with("FERRY-GUEST agent on") {
            b.agent = true;
        }
    }
    b
}

/// Reads the console log at `path` (a missing file is an empty report).
pub fn read_console(path: &Path) -> BootReport {
    parse_console(&std::fs::read_to_string(path).unwrap_or_default())
}

/// Reads the console log at `path` every 200 ms until its report satisfies `cond` (answered
/// as `Ok`), or `timeout` passes (the last report as `Err`).
pub fn wait_console(
    path: &Path,
    timeout: Duration,
    cond: impl Fn(&BootReport) -> bool,
) -> Result<BootReport, BootReport> {
    let t = Instant::now();
    loop {
        let b = read_console(path);
        if cond(&b) {
            return Ok(b);
        }
        if t.elapsed() > timeout {
            return Err(b);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_boot_counts() {
        let log = "FERRY-GUEST boot 1.9 0.0\nFERRY-FSCK rc=0\nFERRY-SUMS ok=0 failed=0 malformed=0 last=none\n\
                   FERRY-GUEST agent on /dev/vport0p1\nFERRY-SYNCED f-000001\nFERRY-SYNCED f-000002\n\
                   FERRY-GUEST boot 2.0 0.0\nFERRY-FSCK rc=0\nFERRY-SUMS ok=2 failed=0 malformed=1 last=f-000002\n";
        let b = parse_console(log);
        assert_eq!(b.boots, 2);
        assert_eq!((b.ok, b.failed, b.malformed, b.last_at_boot), (2, 0, 1, 2));
        assert_eq!(b.synced, 0);
        assert!(!b.checked(), "the agent of the second boot is not up yet");
        assert!(b.clean());
        let b = parse_console(&format!(
            "{log}FERRY-GUEST agent on /dev/vport0p1\nFERRY-SYNCED f-000003\n"
        ));
        assert!(b.checked());
        assert_eq!(b.synced, 3);
    }

    #[test]
    fn a_failed_check_is_not_clean() {
        let b = parse_console("FERRY-GUEST boot 1\nFERRY-FSCK rc=4\nFERRY-SUMS ok=3 failed=1 malformed=0 last=f-000004\n");
        assert_eq!(b.fsck, Some(4));
        assert!(!b.clean());
        assert_eq!(
            read_console(Path::new("/nonexistent/console.log")),
            BootReport::default()
        );
    }
}
