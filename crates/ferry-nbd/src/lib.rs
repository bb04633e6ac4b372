//! A small synchronous NBD client for QEMU's NBD servers (`qemu-nbd`, and QMP
//! `nbd-server-start` + `block-export-add`).
//!
//! It speaks the fixed-newstyle handshake (`NBD_OPT_STRUCTURED_REPLY`,
//! `NBD_OPT_SET_META_CONTEXT`, `NBD_OPT_GO`) and the transmission commands ferry
//! needs: READ, WRITE, WRITE_ZEROES, FLUSH, TRIM and BLOCK_STATUS, the latter for
//! allocation (`base:allocation`) and QEMU dirty bitmaps (`qemu:dirty-bitmap:NAME`).
//! One request is in flight at a time; [`NbdDisk`] wraps a client in a mutex to
//! make it a [`ferry_blocks::BlockDevice`].
//!
//! ```no_run
//! use ferry_nbd::{NbdClient, BASE_ALLOCATION};
//! let mut c = NbdClient::connect_unix("/run/nbd.sock", "disk0", &[BASE_ALLOCATION])?;
//! let mut buf = vec![0u8; 65536];
//! c.read_at(0, &mut buf)?;
//! for (start, end) in c.allocated_ranges()? {
//!     println!("data in [{start}, {end})");
//! }
//! # Ok::<(), ferry_nbd::NbdError>(())
//! ```
use std::io;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use ferry_blocks::{BlockDevice, BlockError};

mod client;
pub use client::{NbdClient, HANDSHAKE_TIMEOUT};

/// Meta context describing allocation: extent flags [`STATE_HOLE`] and [`STATE_ZERO`].
pub const BASE_ALLOCATION: &str = "base:allocation";
/// `base:allocation` flag: the extent is not allocated on the server.
pub const STATE_HOLE: u32 = 1;
/// `base:allocation` flag: the extent reads as zeros.
pub const STATE_ZERO: u32 = 2;
/// `qemu:dirty-bitmap:NAME` flag: the extent changed since the bitmap was started.
pub const STATE_DIRTY: u32 = 1;

/// Name of the meta context exposing QEMU dirty bitmap `bitmap`.
pub fn dirty_bitmap_context(bitmap: &str) -> String {
    format!("qemu:dirty-bitmap:{bitmap}")
}

/// One extent of a BLOCK_STATUS reply: `len` bytes at `offset` with context-specific `flags`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Start of the extent in bytes.
    pub offset: u64,
    /// Length of the extent in bytes.
    pub len: u64,
    /// Status flags; their meaning depends on the meta context.
    pub flags: u32,
}

/// Errors of the NBD client. Each message names the server and says what to try next.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    /// The socket could not be opened.
    #[error("cannot connect to NBD server {uri}: {source} (is qemu-nbd or QEMU's NBD server running, and is the socket path or address right?)")]
    Connect {
        /// The server, as an NBD URI.
        uri: String,
        /// Underlying error.
        source: io::Error,
    },
    /// Reading or writing the socket failed; the connection is unusable.
    #[error("NBD connection to {uri} failed: {source}; this connection is closed, open a new one")]
    Io {
        /// The server, as an NBD URI.
        uri: String,
        /// Underlying error.
        source: io::Error,
    },
    /// The server sent something this client does not understand; the connection is unusable.
    #[error("NBD server {uri} broke the protocol: {detail}; reconnect, and check that it is a fixed-newstyle NBD server")]
    Protocol {
        /// The server, as an NBD URI.
        uri: String,
        /// What was wrong.
        detail: String,
    },
    /// The server refused a handshake option.
    #[error("NBD server {uri} refused export '{export}' ({option}: {reply}): {message}{hint}")]
    Refused {
        /// The server, as an NBD URI.
        uri: String,
        /// Export that was asked for.
        export: String,
        /// Option that was refused.
        option: &'static str,
        /// The server's error reply type (e.g. `NBD_REP_ERR_UNKNOWN`).
        reply: &'static str,
        /// The server's message.
        message: String,
        /// What to do about it.
        hint: &'static str,
    },
    /// The server answered a request with an error; the connection stays usable.
    #[error("NBD {command} of {len} bytes at offset {offset} on {uri} failed: {errno} [{code}]{message}; check the server's log and the disk image")]
    Request {
        /// The server, as an NBD URI.
        uri: String,
        /// Command name (READ, WRITE, ...).
        command: &'static str,
        /// Request offset.
        offset: u64,
        /// Request length.
        len: u64,
        /// The NBD error code (an errno value).
        code: u32,
        /// Name and meaning of the error code.
        errno: &'static str,
        /// The server's message, if any (with a leading separator).
        message: String,
    },
    /// A meta context was asked for that the server did not agree to.
    #[error("meta context '{context}' is not available on {uri} (negotiated: [{available}]); pass it to connect, and for qemu:dirty-bitmap:NAME export the bitmap (qemu-nbd -B NAME, block-export-add \"bitmaps\")")]
    NoContext {
        /// The server, as an NBD URI.
        uri: String,
        /// Context that was asked for.
        context: String,
        /// Contexts that were negotiated.
        available: String,
    },
    /// The request cannot be sent as asked (out of range, read-only export, misaligned).
    #[error("cannot {what} on {uri}: {detail}")]
    Invalid {
        /// The server, as an NBD URI.
        uri: String,
        /// What was attempted.
        what: &'static str,
        /// Why not, and what to do.
        detail: String,
    },
    /// An earlier I/O or protocol error left the connection unusable.
    #[error("NBD connection to {uri} is unusable after an earlier error; reconnect")]
    Closed {
        /// The server, as an NBD URI.
        uri: String,
    },
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, NbdError>;

/// An NBD export as a [`BlockDevice`]: a client behind a mutex (requests are serialised).
pub struct NbdDisk {
    client: Mutex<NbdClient>,
    size: u64,
    uri: String,
}

impl NbdDisk {
    /// Wraps a connected client.
    pub fn new(client: NbdClient) -> Self {
        NbdDisk {
            size: client.size(),
            uri: client.uri().to_string(),
            client: Mutex::new(client),
        }
    }

    /// Connects over a Unix socket (see [`NbdClient::connect_unix`]).
    pub fn connect_unix(path: impl AsRef<Path>, export: &str, contexts: &[&str]) -> Result<Self> {
        NbdClient::connect_unix(path, export, contexts).map(Self::new)
    }

    /// Locks the client for calls the trait does not offer (e.g. [`NbdClient::dirty_ranges`]).
    pub fn client(&self) -> MutexGuard<'_, NbdClient> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives back the client.
    pub fn into_inner(self) -> NbdClient {
        self.client.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    fn err(&self, e: NbdError) -> BlockError {
        BlockError::Io {
            path: self.uri.clone(),
            source: io::Error::other(e),
        }
    }
}

impl std::fmt::Debug for NbdDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdDisk")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .finish()
    }
}

impl BlockDevice for NbdDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> ferry_blocks::Result<()> {
        self.client().read_at(offset, buf).map_err(|e| self.err(e))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> ferry_blocks::Result<()> {
        self.client().write_at(offset, buf).map_err(|e| self.err(e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> ferry_blocks::Result<()> {
        self.client()
            .write_zeroes(offset, len)
            .map_err(|e| self.err(e))
    }

    /// Uses `base:allocation` when it was negotiated, else reports the whole disk.
    fn data_ranges(&self) -> ferry_blocks::Result<Vec<(u64, u64)>> {
        let mut c = self.client();
        if !c.has_context(BASE_ALLOCATION) {
            return Ok(vec![(0, self.size)]);
        }
        c.allocated_ranges().map_err(|e| self.err(e))
    }

    fn flush(&self) -> ferry_blocks::Result<()> {
        self.client().flush().map_err(|e| self.err(e))
    }
}

/// Merges extents whose flags satisfy `keep` into sorted `[start, end)` ranges.
pub(crate) fn ranges_where(extents: &[Extent], keep: impl Fn(u32) -> bool) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for e in extents.iter().filter(|e| keep(e.flags)) {
        match out.last_mut() {
            Some(last) if last.1 == e.offset => last.1 += e.len,
            _ => out.push((e.offset, e.offset + e.len)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_merge_neighbours_and_skip_others() {
        let ext = |offset, len, flags| Extent { offset, len, flags };
        let e = [
            ext(0, 10, 3),
            ext(10, 5, 0),
            ext(15, 5, 1),
            ext(20, 5, 3),
            ext(25, 1, 0),
        ];
        assert_eq!(
            ranges_where(&e, |f| f & STATE_ZERO == 0),
            vec![(10, 20), (25, 26)]
        );
        assert_eq!(
            ranges_where(&e, |f| f & STATE_DIRTY != 0),
            vec![(0, 10), (15, 25)]
        );
        assert_eq!(dirty_bitmap_context("bm0"), "qemu:dirty-bitmap:bm0");
    }
}
