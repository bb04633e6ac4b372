//! Block-level data plane primitives: disks as block devices, block hashes, block maps,
//! manifests, delta plans and change stamps.
//!
//! A disk is cut into fixed-size blocks (64 KiB by default; the last one may be short).
//! Each block is identified by its BLAKE3 hash; an all-zero block is a *hole*
//! ([`ZERO`]) that is never stored or sent.
pub mod device;
pub mod hash;
pub mod journal;
pub mod map;
pub mod stamp;

pub use device::{BlockDevice, RawDisk};
pub use hash::{hash_block, is_zero, Hash, Hasher, UNKNOWN, ZERO};
pub use journal::MapJournal;
pub use map::{differing_runs, BlockMap, Manifest};
pub use stamp::DiskStamp;

/// Default change-detection granularity (QEMU's dirty-bitmap granularity).
pub const DEFAULT_BLOCK_SIZE: u64 = 64 * 1024;

/// Errors of the block layer.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// An I/O error on a named file.
    #[error("{path}: {source}")]
    Io {
        /// File that failed.
        path: String,
        /// Underlying error.
        source: std::io::Error,
    },
    /// A map, manifest or journal file is not in ferry's format.
    #[error("{0}")]
    Format(String),
}

/// Result alias of the block layer.
pub type Result<T> = std::result::Result<T, BlockError>;

/// Wraps an I/O error with the path it concerns.
pub fn io_err(path: impl AsRef<std::path::Path>) -> impl FnOnce(std::io::Error) -> BlockError {
    let path = path.as_ref().display().to_string();
    move |source| BlockError::Io { path, source }
}

/// The largest block size ferry replicates with (4 MiB): no stored block is larger.
pub const MAX_BLOCK_SIZE: u64 = 4 << 20;

/// Number of blocks of `block_size` needed to cover `size` bytes.
pub fn block_count(size: u64, block_size: u64) -> u64 {
    size.div_ceil(block_size)
}
