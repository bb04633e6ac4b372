//! The NBD client: handshake and transmission (NBD spec `doc/proto.md`).
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use crate::{dirty_bitmap_context, ranges_where, Extent, NbdError, Result};
use crate::{BASE_ALLOCATION, STATE_DIRTY, STATE_ZERO};

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OLDSTYLE_MAGIC: u64 = 0x0000_4202_8186_1253;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;

const OPT_ABORT: u32 = 2;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;

const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_BLOCK_STATUS: u16 = 7;

const REPLY_FLAG_DONE: u16 = 1;
const CHUNK_NONE: u16 = 0;
const CHUNK_OFFSET_DATA: u16 = 1;
const CHUNK_OFFSET_HOLE: u16 = 2;
const CHUNK_BLOCK_STATUS: u16 = 5;
const CHUNK_ERROR_BIT: u16 = 1 << 15;
const CHUNK_ERROR_OFFSET: u16 = CHUNK_ERROR_BIT + 2;

/// Largest READ/WRITE payload sent in one request (the NBD default maximum).
const MAX_IO: u64 = 32 << 20;
/// Largest WRITE_ZEROES / TRIM length sent in one request.
const MAX_ZERO: u64 = 1 << 30;
/// Largest non-data reply payload accepted (option replies, block status, errors).
const MAX_META: u32 = 64 << 20;

/// How long [`NbdClient::connect_unix`] and [`NbdClient::connect_tcp`] wait for the
/// handshake. A `qemu-nbd` at its `--shared` connection limit accepts the socket but never
/// answers, so without a timeout the client would hang.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A socket the client can run over.
trait Stream: Read + Write + Send + Sized + 'static {
    fn timeouts(&self, t: Option<Duration>) -> io::Result<()>;
    fn dup(&self) -> io::Result<Self>;
}

macro_rules! impl_stream {
    ($t:ty) => {
        impl Stream for $t {
            fn timeouts(&self, t: Option<Duration>) -> io::Result<()> {
                self.set_read_timeout(t)?;
                self.set_write_timeout(t)
            }
            fn dup(&self) -> io::Result<Self> {
                self.try_clone()
            }
        }
    };
}
impl_stream!(UnixStream);
impl_stream!(TcpStream);

/// Where the chunks of one reply go.
enum Sink<'a> {
    Nothing,
    Read { offset: u64, buf: &'a mut [u8] },
    Status(&'a mut Vec<(u32, Vec<(u32, u32)>)>),
}

/// A connected NBD client (one request in flight at a time). Sends NBD_CMD_DISC on drop.
pub struct NbdClient {
    reader: BufReader<Box<dyn Read + Send>>,
    writer: BufWriter<Box<dyn Write + Send>>,
    uri: String,
    export: String,
    size: u64,
    tflags: u16,
    structured: bool,
    contexts: Vec<(String, u32)>,
    min_block: u64,
    max_io: u64,
    cookie: u64,
    broken: bool,
}

impl NbdClient {
    /// Connects to export `export` on a Unix socket, asking for meta `contexts`
    /// (e.g. [`BASE_ALLOCATION`], `qemu:dirty-bitmap:bm0`); contexts the server does
    /// not offer are left out (see [`NbdClient::has_context`]). The handshake must
    /// finish within [`HANDSHAKE_TIMEOUT`].
    pub fn connect_unix(path: impl AsRef<Path>, export: &str, contexts: &[&str]) -> Result<Self> {
        Self::connect_unix_timeout(path, export, contexts, HANDSHAKE_TIMEOUT)
    }

    /// [`NbdClient::connect_unix`] with a chosen handshake timeout.
    pub fn connect_unix_timeout(
        path: impl AsRef<Path>,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
    ) -> Result<Self> {
        let path = path.as_ref();
        let uri = format!("nbd+unix:///{export}?socket={}", path.display());
        let stream = UnixStream::connect(path);
        Self::handshake(uri, export, contexts, timeout, stream)
    }

    /// Connects to export `export` over TCP at `addr` (`host:port`); see [`NbdClient::connect_unix`].
    pub fn connect_tcp(addr: &str, export: &str, contexts: &[&str]) -> Result<Self> {
        let uri = format!("nbd://{addr}/{export}");
        let stream = TcpStream::connect(addr).inspect(|s| {
            let _ = s.set_nodelay(true);
        });
        Self::handshake(uri, export, contexts, HANDSHAKE_TIMEOUT, stream)
    }

    fn handshake<S: Stream>(
        uri: String,
        export: &str,
        contexts: &[&str],
        timeout: Duration,
        stream: io::Result<S>,
    ) -> Result<Self> {
        let split = stream.and_then(|s| {
            s.timeouts(Some(timeout))?;
            Ok((s.dup()?, s.dup()?, s))
        });
        let (ctl, r, w) = split.map_err(|source| NbdError::Connect {
            uri: uri.clone(),
            source,
        })?;
        let mut c = NbdClient {
            reader: BufReader::with_capacity(256 << 10, Box::new(r)),
            writer: BufWriter::with_capacity(256 << 10, Box::new(w)),
            uri,
            export: export.to_string(),
            size: 0,
            tflags: 0,
            structured: false,
            contexts: Vec::new(),
            min_block: 1,
            max_io: MAX_IO,
            cookie: 0,
            broken: false,
        };
        match c
            .negotiate(contexts)
            .and_then(|_| ctl.timeouts(None).map_err(|e| c.io(e)))
        {
            Ok(()) => Ok(c),
            Err(e) => {
                if !matches!(e, NbdError::Io { .. } | NbdError::Protocol { .. }) {
                    let _ = c.send_option(OPT_ABORT, &[]);
                }
                c.broken = true; // no DISC on drop: we never reached transmission
                Err(e)
            }
        }
    }

    fn negotiate(&mut self, contexts: &[&str]) -> Result<()> {
        match self.read_u64()? {
            NBDMAGIC => {}
            m => return Err(self.proto(format!("not an NBD server (magic {m:#x})"))),
        }
        match self.read_u64()? {
            IHAVEOPT => {}
            OLDSTYLE_MAGIC => return Err(self.proto("server speaks only the oldstyle handshake")),
            m => return Err(self.proto(format!("unknown handshake magic {m:#x}"))),
        }
        let hflags = self.read_u16()?;
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(self.proto("server does not support the fixed-newstyle handshake"));
        }
        let cflags = (FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)) as u32;
        self.writer
            .write_all(&cflags.to_be_bytes())
            .map_err(|e| self.io(e))?;

        // Structured replies (needed for meta contexts and sparse reads).
        self.send_option(OPT_STRUCTURED_REPLY, &[])?;
        let (ty, _) = self.option_reply(OPT_STRUCTURED_REPLY)?;
        self.structured = ty == REP_ACK;

        if self.structured && !contexts.is_empty() {
            let mut data = name_bytes(&self.export);
            data.extend_from_slice(&(contexts.len() as u32).to_be_bytes());
            for ctx in contexts {
                data.extend_from_slice(&name_bytes(ctx));
            }
            self.send_option(OPT_SET_META_CONTEXT, &data)?;
            loop {
                let (ty, data) = self.option_reply(OPT_SET_META_CONTEXT)?;
                match ty {
                    REP_ACK => break,
                    REP_META_CONTEXT if data.len() >= 4 => {
                        let id = u32::from_be_bytes(data[..4].try_into().unwrap());
                        let name = String::from_utf8_lossy(&data[4..]).into_owned();
                        self.contexts.push((name, id));
                    }
                    t if t & REP_ERR != 0 => {
                        // A server without meta contexts says UNSUP; anything else is fatal.
                        if t == REP_ERR + 1 {
                            break;
                        }
                        return Err(self.refused("NBD_OPT_SET_META_CONTEXT", t, &data));
                    }
                    t => return Err(self.proto(format!("unexpected meta context reply {t}"))),
                }
            }
        }

        let mut data = name_bytes(&self.export);
        data.extend_from_slice(&1u16.to_be_bytes());
        data.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        self.send_option(OPT_GO, &data)?;
        let mut have_export = false;
        loop {
            let (ty, data) = self.option_reply(OPT_GO)?;
            match ty {
                REP_ACK => break,
                REP_INFO if data.len() >= 2 => {
                    let be32 = |i: usize| u32::from_be_bytes(data[i..i + 4].try_into().unwrap());
                    match u16::from_be_bytes([data[0], data[1]]) {
                        INFO_EXPORT if data.len() == 12 => {
                            self.size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                            self.tflags = u16::from_be_bytes([data[10], data[11]]);
                            have_export = true;
                        }
                        INFO_BLOCK_SIZE if data.len() == 14 => {
                            self.min_block = (be32(2) as u64).max(1);
                            let max = (be32(10) as u64).min(MAX_IO);
                            self.max_io =
                                (max / self.min_block * self.min_block).max(self.min_block);
                        }
                        _ => {} // name, description, ...: not needed
                    }
                }
                t if t & REP_ERR != 0 => return Err(self.refused("NBD_OPT_GO", t, &data)),
                t => return Err(self.proto(format!("unexpected NBD_OPT_GO reply {t}"))),
            }
        }
        if !have_export {
            return Err(self.proto("NBD_OPT_GO succeeded without NBD_INFO_EXPORT"));
        }
        Ok(())
    }

    /// The server and export as an NBD URI (used in error messages).
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// Size of the export in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the server exports the disk read-only.
    pub fn is_read_only(&self) -> bool {
        self.tflags & TF_READ_ONLY != 0
    }

    /// Whether structured replies were negotiated (required for meta contexts).
    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Meta contexts the server agreed to, with their ids.
    pub fn contexts(&self) -> &[(String, u32)] {
        &self.contexts
    }

    /// Whether meta context `name` was negotiated.
    pub fn has_context(&self, name: &str) -> bool {
        self.contexts.iter().any(|(n, _)| n == name)
    }

    /// Reads exactly `buf.len()` bytes at `offset` (split into requests the server accepts).
    pub fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.check("read", offset, buf.len() as u64, false)?;
        for (i, chunk) in buf.chunks_mut(self.max_io as usize).enumerate() {
            let off = offset + i as u64 * self.max_io;
            let len = chunk.len() as u64;
            let sink = Sink::Read {
                offset: off,
                buf: chunk,
            };
            self.transact(CMD_READ, off, len, &[], sink)?;
        }
        Ok(())
    }

    /// Writes all of `buf` at `offset`.
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check("write", offset, buf.len() as u64, true)?;
        for (i, chunk) in buf.chunks(self.max_io as usize).enumerate() {
            let off = offset + i as u64 * self.max_io;
            self.transact(CMD_WRITE, off, chunk.len() as u64, chunk, Sink::Nothing)?;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros, letting the server punch holes.
    /// Falls back to writing zeros if the server lacks WRITE_ZEROES.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check("write zeroes", offset, len, true)?;
        if self.tflags & TF_SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; len.min(self.max_io) as usize];
            let mut done = 0;
            while done < len {
                let n = (len - done).min(zeros.len() as u64) as usize;
                self.write_at(offset + done, &zeros[..n])?;
                done += n as u64;
            }
            return Ok(());
        }
        self.ranged(CMD_WRITE_ZEROES, offset, len)
    }

    /// Tells the server `len` bytes at `offset` are no longer needed (their contents become
    /// unspecified). Does nothing if the server does not support TRIM.
    pub fn trim(&mut self, offset: u64, len: u64) -> Result<()> {
        self.check("trim", offset, len, true)?;
        if self.tflags & TF_SEND_TRIM == 0 {
            return Ok(());
        }
        self.ranged(CMD_TRIM, offset, len)
    }

    /// Makes every completed write durable (a no-op if the server has no write cache).
    pub fn flush(&mut self) -> Result<()> {
        self.check("flush", 0, 0, false)?;
        if self.tflags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.transact(CMD_FLUSH, 0, 0, &[], Sink::Nothing)
    }

    /// Extents of meta context `context` covering exactly `[offset, offset + len)`, with
    /// neighbours of equal flags merged. Repeats BLOCK_STATUS until the range is covered.
    pub fn block_status(&mut self, context: &str, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let Some(id) = self
            .contexts
            .iter()
            .find(|(n, _)| n == context)
            .map(|c| c.1)
        else {
            let available: Vec<&str> = self.contexts.iter().map(|c| c.0.as_str()).collect();
            return Err(NbdError::NoContext {
                uri: self.uri.clone(),
                context: context.to_string(),
                available: available.join(", "),
            });
        };
        self.check("query block status", offset, len, false)?;
        let step = u32::MAX as u64 / self.min_block.max(65536) * self.min_block.max(65536);
        let (mut out, mut pos, end) = (Vec::<Extent>::new(), offset, offset + len);
        while pos < end {
            let want = (end - pos).min(step);
            let mut chunks = Vec::new();
            self.transact(CMD_BLOCK_STATUS, pos, want, &[], Sink::Status(&mut chunks))?;
            let mut covered = 0;
            for (_, descs) in chunks.iter().filter(|(ctx, _)| *ctx == id) {
                for &(dlen, flags) in descs {
                    let dlen = (dlen as u64).min(want - covered);
                    if dlen == 0 {
                        break;
                    }
                    match out.last_mut() {
                        Some(l) if l.flags == flags && l.offset + l.len == pos + covered => {
                            l.len += dlen
                        }
                        _ => out.push(Extent {
                            offset: pos + covered,
                            len: dlen,
                            flags,
                        }),
                    }
                    covered += dlen;
                }
            }
            if covered == 0 {
                let detail = format!("BLOCK_STATUS at {pos} returned no extent for '{context}'");
                return Err(self.fail(self.proto(detail)));
            }
            pos += covered;
        }
        Ok(out)
    }

    /// Ranges `[start, end)` that may hold data according to `base:allocation`: every
    /// extent except those flagged [`STATE_ZERO`] (reads as zeros; usually also a hole).
    pub fn allocated_ranges(&mut self) -> Result<Vec<(u64, u64)>> {
        let ext = self.block_status(BASE_ALLOCATION, 0, self.size)?;
        Ok(ranges_where(&ext, |f| f & STATE_ZERO == 0))
    }

    /// Ranges `[start, end)` marked dirty in QEMU dirty bitmap `bitmap`
    /// (context `qemu:dirty-bitmap:NAME`, which must have been negotiated).
    pub fn dirty_ranges(&mut self, bitmap: &str) -> Result<Vec<(u64, u64)>> {
        let ext = self.block_status(&dirty_bitmap_context(bitmap), 0, self.size)?;
        Ok(ranges_where(&ext, |f| f & STATE_DIRTY != 0))
    }

    /// Sends a length-only command in pieces of at most [`MAX_ZERO`] bytes.
    fn ranged(&mut self, cmd: u16, offset: u64, len: u64) -> Result<()> {
        let step = MAX_ZERO / self.min_block * self.min_block;
        let mut done = 0;
        while done < len {
            let n = (len - done).min(step);
            self.transact(cmd, offset + done, n, &[], Sink::Nothing)?;
            done += n;
        }
        Ok(())
    }

    /// Refuses requests that are out of range, misaligned, or on a broken connection.
    fn check(&self, what: &'static str, offset: u64, len: u64, write: bool) -> Result<()> {
        let invalid = |detail: String| {
            Err(NbdError::Invalid {
                uri: self.uri.clone(),
                what,
                detail,
            })
        };
        if self.broken {
            return Err(NbdError::Closed {
                uri: self.uri.clone(),
            });
        }
        if write && self.is_read_only() {
            return invalid("the export is read-only; export it writable (qemu-nbd without --read-only, block-export-add \"writable\": true)".into());
        }
        if offset.checked_add(len).is_none_or(|end| end > self.size) {
            return invalid(format!(
                "{len} bytes at offset {offset} run past the end of the {}-byte export",
                self.size
            ));
        }
        if !offset.is_multiple_of(self.min_block)
            || (!len.is_multiple_of(self.min_block) && offset + len != self.size)
        {
            return invalid(format!("{len} bytes at offset {offset} are not aligned to the server's minimum block size {}", self.min_block));
        }
        Ok(())
    }

    /// Sends one request and receives its whole reply; I/O and protocol errors break the connection.
    fn transact(
        &mut self,
        cmd: u16,
        offset: u64,
        len: u64,
        payload: &[u8],
        sink: Sink,
    ) -> Result<()> {
        let r = self
            .send_request(cmd, offset, len, payload)
            .and_then(|cookie| self.recv_reply(cookie, cmd, offset, len, sink));
        r.map_err(|e| self.fail(e))
    }

    fn fail(&mut self, e: NbdError) -> NbdError {
        if matches!(e, NbdError::Io { .. } | NbdError::Protocol { .. }) {
            self.broken = true;
        }
        e
    }

    fn send_request(&mut self, cmd: u16, offset: u64, len: u64, payload: &[u8]) -> Result<u64> {
        self.cookie += 1;
        let mut h = Vec::with_capacity(28);
        h.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&cmd.to_be_bytes());
        h.extend_from_slice(&self.cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&(len as u32).to_be_bytes());
        let w = &mut self.writer;
        let r = w
            .write_all(&h)
            .and_then(|_| w.write_all(payload))
            .and_then(|_| w.flush());
        r.map_err(|e| self.io(e))?;
        Ok(self.cookie)
    }

    fn recv_reply(
        &mut self,
        cookie: u64,
        cmd: u16,
        offset: u64,
        len: u64,
        mut sink: Sink,
    ) -> Result<()> {
        let mut first_err: Option<(u32, String)> = None;
        let mut got = 0u64; // bytes of a READ covered by data and hole chunks
        loop {
            let magic = self.read_u32()?;
            if magic == SIMPLE_REPLY_MAGIC {
                let error = self.read_u32()?;
                self.expect_cookie(cookie)?;
                if error != 0 {
                    first_err.get_or_insert((error, String::new()));
                } else if let Sink::Read { buf, .. } = &mut sink {
                    self.reader.read_exact(buf).map_err(|e| self.io(e))?;
                    got = len;
                }
                break;
            }
            if magic != STRUCTURED_REPLY_MAGIC || !self.structured {
                return Err(self.proto(format!("bad reply magic {magic:#x}")));
            }
            let flags = self.read_u16()?;
            let ty = self.read_u16()?;
            self.expect_cookie(cookie)?;
            let clen = self.read_u32()?;
            match (ty, &mut sink) {
                (CHUNK_OFFSET_DATA, Sink::Read { offset: base, buf }) if clen >= 8 => {
                    let off = self.read_u64()?;
                    let start = self.chunk_start(off, clen as u64 - 8, *base, buf.len())?;
                    let dst = &mut buf[start..start + clen as usize - 8];
                    self.reader.read_exact(dst).map_err(|e| self.io(e))?;
                    got += clen as u64 - 8;
                }
                (CHUNK_OFFSET_HOLE, Sink::Read { offset: base, buf }) if clen == 12 => {
                    let off = self.read_u64()?;
                    let n = self.read_u32()? as usize;
                    let start = self.chunk_start(off, n as u64, *base, buf.len())?;
                    buf[start..start + n].fill(0);
                    got += n as u64;
                }
                (CHUNK_BLOCK_STATUS, Sink::Status(out))
                    if clen >= 4 && clen % 8 == 4 && clen <= MAX_META =>
                {
                    let data = self.read_vec(clen)?;
                    let ctx = u32::from_be_bytes(data[..4].try_into().unwrap());
                    let descs = data[4..].chunks(8).map(|d| {
                        let be = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().unwrap());
                        (be(0), be(4))
                    });
                    out.push((ctx, descs.collect()));
                }
                (CHUNK_NONE, _) if clen == 0 => {}
                (t, _) if t & CHUNK_ERROR_BIT != 0 && (6..=MAX_META).contains(&clen) => {
                    let data = self.read_vec(clen)?;
                    let error = u32::from_be_bytes(data[..4].try_into().unwrap());
                    let mlen = u16::from_be_bytes([data[4], data[5]]) as usize;
                    let extra = if t == CHUNK_ERROR_OFFSET { 8 } else { 0 };
                    if error == 0 || 6 + mlen + extra > data.len() {
                        return Err(self.proto(format!("malformed error chunk (type {t})")));
                    }
                    let mut msg = String::from_utf8_lossy(&data[6..6 + mlen]).into_owned();
                    if t == CHUNK_ERROR_OFFSET {
                        let at = u64::from_be_bytes(data[6 + mlen..14 + mlen].try_into().unwrap());
                        msg = format!("{msg} (at offset {at})");
                    }
                    first_err.get_or_insert((error, msg));
                }
                (t, _) => {
                    let what = format!(
                        "unexpected reply chunk type {t} (length {clen}) to {}",
                        cmd_name(cmd)
                    );
                    return Err(self.proto(what));
                }
            }
            if flags & REPLY_FLAG_DONE != 0 {
                break;
            }
        }
        match first_err {
            None if matches!(sink, Sink::Read { .. }) && got != len => {
                Err(self.proto(format!("READ reply covered {got} of {len} bytes")))
            }
            None => Ok(()),
            Some((code, msg)) => Err(NbdError::Request {
                uri: self.uri.clone(),
                command: cmd_name(cmd),
                offset,
                len,
                code,
                errno: errno_name(code),
                message: if msg.is_empty() {
                    msg
                } else {
                    format!(": {msg}")
                },
            }),
        }
    }

    /// Index into the read buffer of a data/hole chunk, checked to lie within the request.
    fn chunk_start(&self, off: u64, n: u64, base: u64, buf_len: usize) -> Result<usize> {
        if off < base || off - base + n > buf_len as u64 {
            return Err(self.proto(format!(
                "read chunk {n}@{off} outside request {buf_len}@{base}"
            )));
        }
        Ok((off - base) as usize)
    }

    fn expect_cookie(&mut self, cookie: u64) -> Result<()> {
        match self.read_u64()? {
            c if c == cookie => Ok(()),
            c => Err(self.proto(format!("reply for unknown request {c} (expected {cookie})"))),
        }
    }

    fn send_option(&mut self, opt: u32, data: &[u8]) -> Result<()> {
        let mut m = Vec::with_capacity(16 + data.len());
        m.extend_from_slice(&IHAVEOPT.to_be_bytes());
        m.extend_from_slice(&opt.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        let w = &mut self.writer;
        w.write_all(&m)
            .and_then(|_| w.flush())
            .map_err(|e| self.io(e))
    }

    fn option_reply(&mut self, opt: u32) -> Result<(u32, Vec<u8>)> {
        if self.read_u64()? != OPT_REPLY_MAGIC {
            return Err(self.proto("bad option reply magic"));
        }
        let got = self.read_u32()?;
        if got != opt {
            return Err(self.proto(format!("reply to option {got}, expected {opt}")));
        }
        let ty = self.read_u32()?;
        let len = self.read_u32()?;
        if len > MAX_META {
            return Err(self.proto(format!("option reply of {len} bytes")));
        }
        Ok((ty, self.read_vec(len)?))
    }

    fn refused(&self, option: &'static str, ty: u32, data: &[u8]) -> NbdError {
        let (reply, hint) = match ty & !REP_ERR {
            1 => ("NBD_REP_ERR_UNSUP", "; the server is too old for this client (qemu-nbd >= 2.12 works)"),
            2 => ("NBD_REP_ERR_POLICY", "; the server's access policy forbids it"),
            3 => ("NBD_REP_ERR_INVALID", ""),
            5 => ("NBD_REP_ERR_TLS_REQD", "; the server requires TLS, which ferry-nbd does not speak: export without --tls-creds"),
            6 => ("NBD_REP_ERR_UNKNOWN", "; check the export name (qemu-nbd -x NAME, block-export-add \"name\"/\"id\")"),
            7 => ("NBD_REP_ERR_SHUTDOWN", "; the server is shutting down, retry once it is back"),
            8 => ("NBD_REP_ERR_BLOCK_SIZE_REQD", ""),
            9 => ("NBD_REP_ERR_TOO_BIG", ""),
            _ => ("unknown NBD_REP_ERR", ""),
        };
        NbdError::Refused {
            uri: self.uri.clone(),
            export: self.export.clone(),
            option,
            reply,
            message: String::from_utf8_lossy(data).into_owned(),
            hint,
        }
    }

    fn io(&self, source: io::Error) -> NbdError {
        use io::ErrorKind::{TimedOut, UnexpectedEof, WouldBlock};
        let source = match source.kind() {
            UnexpectedEof => io::Error::new(UnexpectedEof, "the server closed the connection"),
            WouldBlock | TimedOut => io::Error::new(TimedOut, "timed out waiting for the server (a qemu-nbd at its --shared connection limit accepts connections but never answers them)"),
            _ => source,
        };
        NbdError::Io {
            uri: self.uri.clone(),
            source,
        }
    }

    fn proto(&self, detail: impl Into<String>) -> NbdError {
        NbdError::Protocol {
            uri: self.uri.clone(),
            detail: detail.into(),
        }
    }

    fn read_vec(&mut self, len: u32) -> Result<Vec<u8>> {
        let mut v = vec![0u8; len as usize];
        self.reader.read_exact(&mut v).map_err(|e| self.io(e))?;
        Ok(v)
    }

    fn read_array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let mut a = [0u8; N];
        self.reader.read_exact(&mut a).map_err(|e| self.io(e))?;
        Ok(a)
    }

    fn read_u16(&mut self) -> Result<u16> {
        self.read_array().map(u16::from_be_bytes)
    }

    fn read_u32(&mut self) -> Result<u32> {
        self.read_array().map(u32::from_be_bytes)
    }

    fn read_u64(&mut self) -> Result<u64> {
        self.read_array().map(u64::from_be_bytes)
    }
}

impl Drop for NbdClient {
    fn drop(&mut self) {
        if !self.broken {
            let _ = self.send_request(CMD_DISC, 0, 0, &[]);
        }
    }
}

impl std::fmt::Debug for NbdClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NbdClient")
            .field("uri", &self.uri)
            .field("size", &self.size)
            .field("contexts", &self.contexts)
            .finish_non_exhaustive()
    }
}

/// A length-prefixed string as in NBD option data.
fn name_bytes(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

fn cmd_name(cmd: u16) -> &'static str {
    match cmd {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "command",
    }
}

fn errno_name(code: u32) -> &'static str {
    match code {
        1 => "EPERM (operation not permitted)",
        5 => "EIO (I/O error)",
        12 => "ENOMEM (out of memory)",
        22 => "EINVAL (invalid request)",
        28 => "ENOSPC (no space left on the server)",
        75 => "EOVERFLOW (request too large)",
        95 => "ENOTSUP (not supported)",
        108 => "ESHUTDOWN (server shutting down)",
        _ => "error",
    }
}
