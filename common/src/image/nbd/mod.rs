//! NBD exports as block images: a client of the NBD protocol
//! (<https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md>) with structured
//! replies and metadata contexts, over TCP or a unix socket.
//!
//! ```text
//! handshake : greeting ─► STRUCTURED_REPLY ─► SET_META_CONTEXT ─► GO ─► size, flags, block sizes
//!             (fixed newstyle)                 base:allocation,         (handshake.rs)
//!                                              qemu:dirty-bitmap:NAME
//! transmit  : READ ─► OFFSET_DATA / OFFSET_HOLE chunks ─► bytes       (reply.rs)
//!             BLOCK_STATUS ─► one extent list per context ─► Hole | Zero | Data, dirty
//! ```
//!
//! [`NbdImage`] is a [`BlockSource`]: reads from many threads share one connection (most
//! servers, `qemu-nbd` by default, take one client at a time), several requests in flight
//! ([`conn`]); a server that says every connection sees the same data
//! (`NBD_FLAG_CAN_MULTI_CONN`) is read through up to four, the reads going round them. [`NbdClient`] is the same protocol over any byte stream, one thread.
//! Everything the server sends is untrusted and checked before it is used: magic numbers,
//! lengths before any allocation, offsets and extents against the request, handles against
//! the requests in flight; a broken promise is a one-line [`NbdError`].
//!
//! ```no_run
//! use blkdelta_common::image::nbd::{NbdImage, NbdOptions, NbdUri};
//! use blkdelta_common::image::BlockSource;
//! let uri = NbdUri::parse("nbd+unix:///drive0?socket=/run/vm.sock").unwrap();
//! let img = NbdImage::open(&uri, &NbdOptions::default()).unwrap();
//! let mut first = vec![0u8; 4096];
//! img.read_at(&mut first, 0).unwrap();
//! ```

pub mod client;
pub mod conn;
pub mod handshake;
pub mod reply;
pub mod uri;
pub mod wire;

#[cfg(test)]
mod tests;

pub use client::NbdClient;
pub use handshake::{BlockSizes, Contexts, Export};
pub use reply::{BlockStatus, StatusExtent};
pub use uri::{Address, NbdUri};

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use conn::Connection;
use reply::{Outcome, Pending};

use super::{check_range, Allocation, BlockSource};
use crate::error::nbd::{ReplyProblem, RequestName};
use crate::error::NbdError;
use crate::extent::Visit;
use crate::ImageError;

/// The longest block status request: 1 GiB (a multiple of every minimum block size).
pub const MAX_STATUS_BYTES: u32 = 1 << 30;

/// How to connect to an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdOptions {
    /// Also negotiate `qemu:dirty-bitmap:NAME` (refused, naming it, when not granted).
    pub dirty_bitmap: Option<String>,
    /// How long to wait for the server at any point (connect, a reply) before giving up.
    pub timeout: Duration,
}

impl Default for NbdOptions {
    fn default() -> Self {
        NbdOptions {
            dirty_bitmap: None,
            timeout: Duration::from_secs(60),
        }
    }
}

/// The allocation extents of the last block status reply, so that a walk over the export
/// asks the server once per reply, not once per extent.
#[derive(Debug, Default)]
struct StatusCache {
    extents: Vec<(u64, u64, Allocation)>,
}

impl StatusCache {
    /// The extent holding `offset`: its allocation and end.
    fn find(&self, offset: u64) -> Option<(Allocation, u64)> {
        let i = self.extents.partition_point(|&(_, end, _)| end <= offset);
        let &(start, end, alloc) = self.extents.get(i)?;
        (start <= offset).then_some((alloc, end))
    }
}

/// Transmission flag: the server serves the same data to every connection to this export.
const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

/// Connections an export is read through, at most, when the server allows several.
const READ_CONNECTIONS: usize = 4;

/// Reads a reader of an export should keep in flight: four per connection, so that the
/// server has the next requests of each connection while it answers one. With two (the cores
/// of a small machine) a full send through `qemu-nbd -e 4` took 1.6x the file's; with eight,
/// 1.3x; with sixteen, as many as an image file asks for, the NBD send took 0.69 s against
/// 0.93 s with eight over five rounds (`bench/live.sh`'s fixture).
pub const READS_IN_FLIGHT: usize = 4 * READ_CONNECTIONS;

/// An NBD export opened for reading.
#[derive(Debug)]
pub struct NbdImage {
    conn: Connection,
    /// More connections for reads, when the server says they see the same data
    /// (`NBD_FLAG_CAN_MULTI_CONN`): reads go round them, so the server serves them at once.
    readers: Vec<Connection>,
    next_reader: std::sync::atomic::AtomicUsize,
    uri: NbdUri,
    cache: Mutex<StatusCache>,
    /// Length of block status requests: [`MAX_STATUS_BYTES`] until the server refuses that.
    status_bytes: AtomicU32,
    spare: Spare,
}

/// Read buffers kept for the next reads: a steady stream of reads allocates (and zeroes)
/// nothing. At most [`Spare::MAX`] buffers of at most [`Spare::MAX_BYTES`] each are kept.
#[derive(Debug, Default)]
struct Spare(Mutex<Vec<Vec<u8>>>);

impl Spare {
    /// Most buffers kept: one per reader thread the send pipeline runs (at most 32).
    const MAX: usize = 32;
    /// Largest buffer kept: the send pipeline reads 1 MiB chunks.
    const MAX_BYTES: usize = 2 << 20;

    fn take(&self) -> Vec<u8> {
        self.0
            .lock()
            .map(|mut v| v.pop().unwrap_or_default())
            .unwrap_or_default()
    }

    fn put(&self, buf: Vec<u8>) {
        if let Ok(mut v) = self.0.lock() {
            if v.len() < Self::MAX && buf.capacity() <= Self::MAX_BYTES {
                v.push(buf);
            }
        }
    }
}

impl NbdImage {
    /// Connects to the export `uri` names.
    pub fn open(uri: &NbdUri, options: &NbdOptions) -> Result<Self, ImageError> {
        let bitmap = options.dirty_bitmap.as_deref();
        let conn = Connection::open(uri, bitmap, options.timeout)?;
        let mut readers = Vec::new();
        if conn.export().flags & FLAG_CAN_MULTI_CONN != 0 {
            for _ in 1..READ_CONNECTIONS {
                // A server that takes fewer clients than it says: the reads share what opened.
                match Connection::open(uri, None, options.timeout) {
                    Ok(c) if c.export().size == conn.export().size => readers.push(c),
                    _ => break,
                }
            }
        }
        Ok(NbdImage {
            conn,
            readers,
            next_reader: std::sync::atomic::AtomicUsize::new(0),
            uri: uri.clone(),
            cache: Mutex::new(StatusCache::default()),
            status_bytes: AtomicU32::new(MAX_STATUS_BYTES),
            spare: Spare::default(),
        })
    }

    /// How many connections reads go through (more than one when the server allows it).
    pub fn connections(&self) -> usize {
        1 + self.readers.len()
    }

    /// The export's URI.
    pub fn uri(&self) -> &NbdUri {
        &self.uri
    }

    /// What the handshake found out about the export.
    pub fn export(&self) -> &Export {
        self.conn.export()
    }

    fn min_block(&self) -> u64 {
        u64::from(self.export().block.min)
    }

    /// The block status from `offset` (rounded down to the minimum block size): one request
    /// of up to 1 GiB, whose reply may cover less but reaches past `offset`. Empty when the
    /// server granted no metadata context.
    pub fn block_status(&self, offset: u64) -> Result<BlockStatus, ImageError> {
        let size = self.size();
        check_range(offset, 1, size)?;
        let contexts = self.export().contexts;
        if contexts.allocation.is_none() && contexts.dirty.is_none() {
            // Without a context the server may not be asked (it would refuse).
            return Ok(BlockStatus::default());
        }
        let start = offset - offset % self.min_block();
        loop {
            let piece = self.status_bytes.load(Ordering::Relaxed);
            let len = (size - start).min(u64::from(piece)) as u32;
            let rx = self
                .conn
                .submit(wire::CMD_BLOCK_STATUS, Pending::status(start, len))?;
            match Connection::wait(&rx) {
                Ok(Outcome::Status(st)) => {
                    reaches(&st, start, len, offset)?;
                    return Ok(st);
                }
                Ok(Outcome::Read(_)) => return Err(wrong_outcome("a block status").into()),
                // A server that limits status requests to its maximum block size says so
                // with EINVAL or EOVERFLOW: ask again, shorter.
                Err(NbdError::ServerError { errno: 22 | 75, .. })
                    if piece > self.export().block.max =>
                {
                    self.status_bytes
                        .store(self.export().block.max, Ordering::Relaxed);
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Calls `f` with each range (offset, length) the dirty bitmap marks dirty, in order,
    /// until it says stop. The connection must have been opened with a dirty bitmap.
    pub fn for_each_dirty<E: From<ImageError>>(
        &self,
        mut f: impl FnMut(u64, u64) -> Result<Visit, E>,
    ) -> Result<(), E> {
        let size = self.size();
        let mut pos = 0;
        while pos < size {
            let st = self.block_status(pos)?;
            self.remember(&st);
            let Some(dirty) = st.dirty else {
                // No dirty context was granted: nothing to walk (open refuses that).
                return Ok(());
            };
            let mut end = pos;
            for e in dirty {
                end = e.offset + e.len;
                // The first extent may start before `pos` (rounded down): skip what was seen.
                let start = e.offset.max(pos);
                let dirty = e.flags & wire::STATE_DIRTY != 0;
                if dirty && start < end && f(start, end - start)?.is_stop() {
                    return Ok(());
                }
            }
            // The extents reach past `pos` (block_status checks that).
            pos = end.max(pos + 1);
        }
        Ok(())
    }

    /// The cached allocation of `offset` and where it ends.
    fn cached(&self, offset: u64) -> Option<(Allocation, u64)> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.find(offset)
    }

    /// Keeps the allocation extents of `st` for [`BlockSource::status`].
    fn remember(&self, st: &BlockStatus) {
        if let Some(extents) = &st.allocation {
            let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            cache.extents = extents
                .iter()
                .map(|e| (e.offset, e.offset + e.len, allocation(e.flags)))
                .collect();
        }
    }

    /// Splits the aligned window around `[offset, offset + len)` into reads of at most the
    /// maximum block size: (offset, length) of each.
    fn pieces(&self, offset: u64, len: u64) -> Vec<(u64, u32)> {
        let min = self.min_block();
        let start = offset - offset % min;
        let end = (offset + len)
            .div_ceil(min)
            .saturating_mul(min)
            .min(self.size());
        let max = u64::from(self.export().block.max);
        let mut out = Vec::with_capacity(((end - start) / max + 1) as usize);
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(max);
            out.push((pos, n as u32));
            pos += n;
        }
        out
    }
}

/// `base:allocation` flags as an allocation: a hole that reads as zeros is a hole, zeros
/// are zeros, and everything else (a hole of undefined content, too) is data to read.
fn allocation(flags: u32) -> Allocation {
    let hole = flags & wire::STATE_HOLE != 0;
    let zero = flags & wire::STATE_ZERO != 0;
    match (hole, zero) {
        (true, true) => Allocation::Hole,
        (false, true) => Allocation::Zero,
        _ => Allocation::Data,
    }
}

/// A request that completed with another command's outcome, which the reply parser never
/// does (each request's state completes only with its own kind).
fn wrong_outcome(request: &str) -> NbdError {
    NbdError::Closed {
        during: format!("{request} request that completed as another command"),
    }
}

/// Checks that every extent list of a reply to the status request at `start` (+`len`)
/// reaches past `offset`, the offset asked about (`start` is it rounded down to the minimum
/// block size): a server whose extents stop short of it would have the walk ask again
/// forever.
fn reaches(st: &BlockStatus, start: u64, len: u32, offset: u64) -> Result<(), NbdError> {
    for list in [&st.allocation, &st.dirty].into_iter().flatten() {
        let end = list.last().map_or(start, |e| e.offset + e.len);
        if end <= offset {
            return Err(NbdError::Reply {
                request: RequestName {
                    command: "NBD_CMD_BLOCK_STATUS",
                    offset: start,
                    len: u64::from(len),
                },
                chunk: "NBD_REPLY_TYPE_BLOCK_STATUS",
                problem: ReplyProblem::ShortOf { end, offset },
            });
        }
    }
    Ok(())
}

impl BlockSource for NbdImage {
    fn size(&self) -> u64 {
        self.export().size
    }

    /// Sends every piece of the read before waiting for the first, so a large read has
    /// several requests in flight, as do reads from several threads.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size())?;
        if buf.is_empty() {
            return Ok(());
        }
        let pieces = self.pieces(offset, buf.len() as u64);
        let mut sent = Vec::with_capacity(pieces.len());
        let k = self.next_reader.fetch_add(1, Ordering::Relaxed) % (self.readers.len() + 1);
        let conn = match k {
            0 => &self.conn,
            k => &self.readers[k - 1],
        };
        for &(o, n) in &pieces {
            let pending = Pending::read_into(o, n, self.spare.take());
            sent.push(conn.submit(wire::CMD_READ, pending)?);
        }
        let end = offset + buf.len() as u64;
        for (&(o, n), rx) in pieces.iter().zip(&sent) {
            let Outcome::Read(data) = Connection::wait(rx)? else {
                return Err(wrong_outcome("a read").into());
            };
            // The overlap of the piece with what was asked for.
            let from = o.max(offset);
            let to = (o + u64::from(n)).min(end);
            if from < to {
                let src = &data[(from - o) as usize..(to - o) as usize];
                buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(src);
            }
            self.spare.put(data);
        }
        Ok(())
    }

    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        check_range(offset, 1, self.size())?;
        let limit = max_len.min(self.size() - offset).max(1);
        if self.export().contexts.allocation.is_none() {
            return Ok((Allocation::Data, limit));
        }
        if let Some((alloc, end)) = self.cached(offset) {
            return Ok((alloc, (end - offset).min(limit)));
        }
        let st = self.block_status(offset)?;
        self.remember(&st);
        // The reply reaches past `offset` (block_status checks that), so the cache holds it.
        let (alloc, end) = self
            .cached(offset)
            .unwrap_or((Allocation::Data, offset + limit));
        Ok((alloc, (end - offset).min(limit)))
    }

    fn reads_in_flight(&self) -> usize {
        READS_IN_FLIGHT
    }
}
