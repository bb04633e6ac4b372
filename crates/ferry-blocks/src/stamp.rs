//! Change stamps: a cheap, safe way to know a disk file was not written since a moment.
//!
//! The kernel updates a file's ctime on every write and user space cannot set it back, so an
//! unchanged (device, inode, size, mtime, ctime) means no write happened — except within one
//! timestamp tick of when the stamp was taken (the "racy" window, as in git's index), so a
//! stamp taken within [`RACY_WINDOW_NS`] of the file's last change is never trusted.
//!
//! Limits, by design on the safe side: stamps on network or FUSE file systems are never trusted
//! (another client's writes may not be visible yet); a writer that modifies a disk image through
//! a shared `mmap` updates ctime only when a clean page is first dirtied, which guests and
//! hypervisors do not do to disk images (they use write/pwrite or O_DIRECT), and a wall-clock
//! step backwards during the racy window could hide a write. The QEMU driver replaces stamps with
//! dirty bitmaps.
use serde::{Deserialize, Serialize};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::{io_err, Result};

/// A stamp whose ctime is this close to the moment it was taken is not trusted.
pub const RACY_WINDOW_NS: i128 = 2_000_000_000;

/// Identity and change times of a disk file at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStamp {
    /// Device id.
    pub dev: u64,
    /// Inode number.
    pub ino: u64,
    /// Size in bytes.
    pub size: u64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i128,
    /// Status-change time, ns since the epoch.
    pub ctime_ns: i128,
    /// When the stamp was taken, ns since the epoch.
    pub taken_ns: i128,
    /// False on file systems whose ctime cannot be trusted (network and FUSE file systems,
    /// where another client's writes may not show yet): such a stamp never proves anything.
    #[serde(default = "yes")]
    pub local_fs: bool,
}

fn yes() -> bool {
    true
}

/// True when `path` lives on a local file system whose ctime the kernel keeps exact.
fn on_local_fs(path: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return false;
    };
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return false;
    }
    // NFS, SMB/CIFS (two magics), FUSE (sshfs, …), Ceph, GlusterFS and 9p: not trusted.
    const REMOTE: [i64; 7] = [
        0x6969,
        0xFF53_4D42,
        0xFE53_4D42,
        0x517B,
        0x6573_5546,
        0x00C3_6400,
        0x0102_1997,
    ];
    !REMOTE.contains(&(st.f_type as i64))
}

impl DiskStamp {
    /// Stamps the file at `path` now.
    pub fn take(path: &Path) -> Result<Self> {
        let m = std::fs::metadata(path).map_err(io_err(path))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as i128;
        Ok(DiskStamp {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            taken_ns: now,
            local_fs: on_local_fs(path),
        })
    }

    /// True when `later` proves the file was not written since `self` was taken.
    pub fn unchanged_in(&self, later: &DiskStamp) -> bool {
        let same = (self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns)
            == (
                later.dev,
                later.ino,
                later.size,
                later.mtime_ns,
                later.ctime_ns,
            );
        same && self.local_fs && self.taken_ns - self.ctime_ns > RACY_WINDOW_NS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_and_racy_stamps_are_never_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d");
        std::fs::write(&p, b"abc").unwrap();
        let s = DiskStamp::take(&p).unwrap();
        // Just written: racy, so not trusted even though nothing changed.
        assert!(!s.unchanged_in(&DiskStamp::take(&p).unwrap()));
        let mut old = s;
        old.taken_ns += 10 * RACY_WINDOW_NS;
        assert!(old.unchanged_in(&DiskStamp::take(&p).unwrap()));
        std::fs::write(&p, b"abd").unwrap();
        let later = DiskStamp::take(&p).unwrap();
        let changed = later.ctime_ns != old.ctime_ns || later.mtime_ns != old.mtime_ns;
        assert_eq!(old.unchanged_in(&later), !changed);
    }
}
