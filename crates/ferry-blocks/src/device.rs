//! Block devices: what ferry reads disks from and writes them to.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{io_err, Result};

/// A disk ferry can read and write at byte offsets.
pub trait BlockDevice: Send + Sync {
    /// Size of the disk in bytes.
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset` (the caller stays within the disk).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()>;
    /// Makes `len` bytes at `offset` read as zeros (a hole where the device supports it).
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()>;
    /// Ranges `[start, end)` that may hold data; everything else reads as zeros.
    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        Ok(vec![(0, self.size())])
    }
    /// Makes every completed write durable.
    fn flush(&self) -> Result<()>;
    /// Hints that `len` bytes at `offset` were written and may be sent to stable storage now
    /// (so a later [`BlockDevice::flush`] has less to wait for). Never required for correctness.
    fn start_writeback(&self, _offset: u64, _len: u64) {}
}

/// A raw disk image in a regular file (sparse where zero).
#[derive(Debug)]
pub struct RawDisk {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawDisk {
    /// Opens an existing raw image for reading, or reading and writing.
    pub fn open(path: &Path, writable: bool) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io_err(path))?;
        let size = file.metadata().map_err(io_err(path))?.len();
        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// Creates (or truncates to) a sparse raw image of `size` bytes, all zeros.
    pub fn create(path: &Path, size: u64) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err(path))?;
        file.set_len(size).map_err(io_err(path))?;
        Ok(RawDisk {
            file,
            path: path.to_path_buf(),
            size,
        })
    }

    /// Path of the image.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockDevice for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(io_err(&self.path))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.file
            .write_all_at(buf, offset)
            .map_err(io_err(&self.path))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        let rc = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if rc == 0 {
            return Ok(());
        }
        // The file system cannot punch holes: write zeros instead.
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(zeros.len() as u64) as usize;
            self.write_at(offset + done, &zeros[..n])?;
            done += n as u64;
        }
        Ok(())
    }

    fn data_ranges(&self) -> Result<Vec<(u64, u64)>> {
        let fd = self.file.as_raw_fd();
        let mut ranges = Vec::new();
        let mut pos: i64 = 0;
        let size = self.size as i64;
        while pos < size {
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::ENXIO) {
                    break; // only a hole remains
                }
                // SEEK_DATA unsupported: treat everything as data.
                return Ok(vec![(0, self.size)]);
            }
            let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
            let end = if hole < 0 { size } else { hole.min(size) };
            ranges.push((data as u64, end as u64));
            pos = end;
        }
        Ok(ranges)
    }

    fn flush(&self) -> Result<()> {
        self.file.sync_data().map_err(io_err(&self.path))
    }

    fn start_writeback(&self, offset: u64, len: u64) {
        // Best effort: errors only mean the kernel will write back later on its own.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_disk_round_trips_and_reports_sparse_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.raw");
        let d = RawDisk::create(&p, 10 << 20).unwrap();
        assert!(d.data_ranges().unwrap().is_empty());
        d.write_at(4 << 20, &[7u8; 65536]).unwrap();
        let r = d.data_ranges().unwrap();
        assert_eq!(r.len(), 1);
        assert!(r[0].0 <= 4 << 20 && r[0].1 >= (4 << 20) + 65536);
        let mut buf = [0u8; 16];
        d.read_at((4 << 20) + 10, &mut buf).unwrap();
        assert_eq!(buf, [7u8; 16]);
        d.write_zeroes(4 << 20, 65536).unwrap();
        d.read_at((4 << 20) + 10, &mut buf).unwrap();
        assert_eq!(buf, [0u8; 16]);
        d.flush().unwrap();
        assert_eq!(RawDisk::open(&p, false).unwrap().size(), 10 << 20);
    }
}
