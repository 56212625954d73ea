//! Targets a stream is applied to: raw image files, block devices, and qcow2 replicas that
//! keep every snapshot the stream passes through.

mod blockdev;
mod file;
mod qcow2;

pub use blockdev::BlockDevTarget;
pub use file::FileTarget;
pub use qcow2::{Qcow2Target, DEFAULT_CLUSTER_BITS};

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use blkdelta_common::image::raw::RawImage;
use blkdelta_common::image::{probe_format, BlockSource, Format};
use blkdelta_common::stream::{SnapshotEnd, SnapshotInfo};

use crate::ReceiveError;

/// A writable virtual disk.
pub trait Target {
    /// Current size in bytes.
    fn size(&self) -> u64;
    /// The largest size the target can take, `None` when it can grow (a file).
    fn capacity(&self) -> Option<u64>;
    /// Makes the target hold `size` bytes (grows or shrinks a file; a device must be large enough).
    fn set_size(&mut self, size: u64) -> Result<(), ReceiveError>;
    /// Writes `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ReceiveError>;
    /// Makes `[offset, offset+len)` read as zeros, keeping it allocated where that is cheap.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError>;
    /// Makes `[offset, offset+len)` read as zeros, deallocating it where the target can.
    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError>;
    /// Makes every write so far durable.
    fn flush(&mut self) -> Result<(), ReceiveError>;
    /// Whether the target is a block device.
    fn is_block_device(&self) -> bool;
    /// What the target is now (recorded in the state after each durable write), `None` for a
    /// target that is not kept.
    fn identity(&self) -> Option<crate::identity::Identity>;
    /// A reader of the target's current bytes (for pre-images), or `None` when the target
    /// cannot be read back that way.
    fn reader(&self) -> Option<RawImage>;
    /// A reader of the disk the target holds (to hash its blocks), or `None` when it cannot
    /// be read back.
    fn source(&self) -> Option<Box<dyn BlockSource>> {
        let mut raw = self.reader()?;
        raw.limit_size(self.size());
        Some(Box::new(raw))
    }
    /// The stream reached `end` and the target holds it durably: a target that keeps history
    /// records it as a snapshot of its own (`info`: the source snapshot's own fields, when the
    /// stream carries them and they are its) and returns that snapshot's GUID; others do
    /// nothing and return `None`.
    fn keep_snapshot(
        &mut self,
        end: &SnapshotEnd,
        info: Option<&SnapshotInfo>,
    ) -> Result<Option<[u8; 16]>, ReceiveError> {
        let _ = (end, info);
        Ok(None)
    }
    /// A second handle to write data through from other threads, at offsets no other write
    /// in flight touches (`pwrite`), or `None` when the target takes writes only through
    /// [`Target::write_at`].
    fn write_handle(&self) -> Option<std::fs::File> {
        None
    }
    /// A handle that writes around the page cache (`O_DIRECT`), for aligned writes from other
    /// threads, or `None` when the target has none.
    fn direct_handle(&self) -> Option<std::fs::File> {
        None
    }
    /// Where the data of `[offset, offset + len)` goes in the file [`Target::write_handle`]
    /// writes: a raw target keeps it at the same offset; a qcow2 replica maps it here (and
    /// says `None` when the range must go through [`Target::write_at`]: part of a cluster, or
    /// clusters that are not one run).
    fn place(&mut self, offset: u64, len: u64) -> Result<Option<u64>, ReceiveError> {
        let _ = len;
        Ok(Some(offset))
    }
    /// Whether zeroing or discarding, or a write through [`Target::write_at`], may touch
    /// what writes in flight on other threads write (a qcow2 replica reuses and copies
    /// clusters): then those writes must end first.
    fn shares_clusters(&self) -> bool {
        false
    }
}

/// A target that takes every operation and writes nothing: what a dry run applies to.
#[derive(Debug)]
pub struct DryTarget {
    size: u64,
}

impl DryTarget {
    /// A dry target that starts `size` bytes long.
    pub fn new(size: u64) -> Self {
        DryTarget { size }
    }
}

impl Target for DryTarget {
    fn size(&self) -> u64 {
        self.size
    }
    fn capacity(&self) -> Option<u64> {
        None
    }
    fn set_size(&mut self, size: u64) -> Result<(), ReceiveError> {
        self.size = size;
        Ok(())
    }
    fn write_at(&mut self, _: &[u8], _: u64) -> Result<(), ReceiveError> {
        Ok(())
    }
    fn write_zeroes(&mut self, _: u64, _: u64) -> Result<(), ReceiveError> {
        Ok(())
    }
    fn discard(&mut self, _: u64, _: u64) -> Result<(), ReceiveError> {
        Ok(())
    }
    fn flush(&mut self) -> Result<(), ReceiveError> {
        Ok(())
    }
    fn is_block_device(&self) -> bool {
        false
    }
    fn identity(&self) -> Option<crate::identity::Identity> {
        None
    }
    fn reader(&self) -> Option<RawImage> {
        None
    }
}

/// What a replica is kept as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaFormat {
    /// The disk's bytes as they are: a raw file or a block device.
    Raw,
    /// A qcow2 image that keeps every snapshot the streams pass through.
    Qcow2,
}

/// The format of the replica at `path`: `asked` when given (a block device is always raw);
/// else qcow2 for an existing qcow2 file or a missing path ending in `.qcow2`, raw otherwise.
pub fn replica_format(
    path: &Path,
    asked: Option<ReplicaFormat>,
) -> Result<ReplicaFormat, ReceiveError> {
    let meta = std::fs::metadata(path).ok();
    if meta
        .as_ref()
        .is_some_and(|m| m.file_type().is_block_device())
    {
        return match asked {
            Some(ReplicaFormat::Qcow2) => Err(ReceiveError::refused_outright(format!(
                "{} is a block device: a qcow2 replica is a file",
                path.display()
            ))),
            _ => Ok(ReplicaFormat::Raw),
        };
    }
    let existing = match meta.filter(|m| m.len() > 0) {
        Some(_) => Some(probe_format(path).map_err(|e| ReceiveError::Qcow2 {
            op: "read",
            path: path.to_path_buf(),
            source: e,
        })?),
        None => None,
    };
    match (asked, existing) {
        (Some(ReplicaFormat::Qcow2), Some(Format::Raw)) => {
            Err(ReceiveError::refused_outright(format!(
                "{} holds data that is not a qcow2 image: it cannot become a qcow2 replica",
                path.display()
            )))
        }
        (Some(ReplicaFormat::Raw), Some(Format::Qcow2)) => {
            Err(ReceiveError::refused_outright(format!(
                "{} is a qcow2 image: receiving raw bytes into it would destroy it (its \
                 snapshots included)",
                path.display()
            )))
        }
        (Some(f), _) => Ok(f),
        (None, Some(Format::Qcow2)) => Ok(ReplicaFormat::Qcow2),
        (None, Some(Format::Raw)) => Ok(ReplicaFormat::Raw),
        (None, None) => Ok(
            if path
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("qcow2"))
            {
                ReplicaFormat::Qcow2
            } else {
                ReplicaFormat::Raw
            },
        ),
    }
}

/// Opens `path` as a target of `format`: a block device as it is, a regular file created
/// (empty, sparse) if missing, a qcow2 image created (clusters of `1 << cluster_bits` bytes,
/// no data) if missing.
pub fn open_target(
    path: &Path,
    format: ReplicaFormat,
    cluster_bits: u32,
) -> Result<Box<dyn Target>, ReceiveError> {
    let is_dev = std::fs::metadata(path)
        .map(|m| m.file_type().is_block_device())
        .unwrap_or(false);
    if is_dev {
        Ok(Box::new(BlockDevTarget::open(path)?))
    } else if format == ReplicaFormat::Qcow2 {
        Ok(Box::new(Qcow2Target::open(path, cluster_bits)?))
    } else {
        Ok(Box::new(FileTarget::open(path)?))
    }
}

/// Writes zeros over a range with plain writes, in bounded pieces (the last fallback).
pub(crate) fn write_zeroes_plain(
    file: &std::fs::File,
    offset: u64,
    len: u64,
) -> Result<(), ReceiveError> {
    use std::os::unix::fs::FileExt;
    const PIECE: u64 = 1 << 20;
    let zeros = vec![0u8; PIECE.min(len) as usize];
    let mut pos = offset;
    while pos < offset + len {
        let n = PIECE.min(offset + len - pos) as usize;
        file.write_all_at(&zeros[..n], pos)
            .map_err(|source| ReceiveError::Target {
                op: "zero write",
                offset: pos,
                len: n as u64,
                source,
            })?;
        pos += n as u64;
    }
    Ok(())
}

/// Syncs data of `file`, naming the failure.
pub(crate) fn sync_data(file: &std::fs::File) -> Result<(), ReceiveError> {
    file.sync_data().map_err(|source| ReceiveError::Target {
        op: "flush",
        offset: 0,
        len: 0,
        source,
    })
}

/// Bytes written to a target before their write-back to the disk is started.
const WRITE_BEHIND_BYTES: u64 = 16 << 20;

/// Starts the write-back of written ranges as a stream is applied, so that the disk works
/// while later records arrive and a checkpoint's sync waits only for the last few: the
/// kernel would otherwise start only once a large share of memory is dirty.
#[derive(Debug, Default)]
pub(crate) struct WriteBehind {
    /// The range written since the last start, `start == end` when none.
    start: u64,
    end: u64,
}

impl WriteBehind {
    /// Notes a write of `len` bytes at `offset` to `file`; every [`WRITE_BEHIND_BYTES`]
    /// starts the write-back of the range written since the last time (without waiting for
    /// it). Best effort: durability still comes from [`Target::flush`].
    #[allow(unsafe_code)]
    pub(crate) fn wrote(&mut self, file: &std::fs::File, offset: u64, len: u64) {
        use std::os::fd::AsRawFd;
        if self.start == self.end {
            (self.start, self.end) = (offset, offset + len);
        } else {
            self.start = self.start.min(offset);
            self.end = self.end.max(offset + len);
        }
        if self.end - self.start < WRITE_BEHIND_BYTES {
            return;
        }
        let (Ok(start), Ok(len)) = (
            i64::try_from(self.start),
            i64::try_from(self.end - self.start),
        ) else {
            return;
        };
        // SAFETY: sync_file_range on a descriptor owned by `file`, which outlives the call;
        // it only starts write-back of dirty pages and touches no memory of ours.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), start, len, libc::SYNC_FILE_RANGE_WRITE);
        }
        self.start = self.end;
    }
}

/// Writes `buf` at `offset` of `file`, naming the failure.
pub(crate) fn pwrite_all(
    file: &std::fs::File,
    buf: &[u8],
    offset: u64,
) -> Result<(), ReceiveError> {
    use std::os::unix::fs::FileExt;
    file.write_all_at(buf, offset)
        .map_err(|source| ReceiveError::Target {
            op: "write",
            offset,
            len: buf.len() as u64,
            source,
        })
}

/// Tries `fallocate` with `flags` on a range; `false` when the kernel or filesystem refuses
/// the mode (so the caller falls back), an error for anything else.
pub(crate) fn try_fallocate(
    file: &std::fs::File,
    flags: rustix::fs::FallocateFlags,
    offset: u64,
    len: u64,
    op: &'static str,
) -> Result<bool, ReceiveError> {
    use rustix::io::Errno;
    match rustix::fs::fallocate(file, flags, offset, len) {
        Ok(()) => Ok(true),
        Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL | Errno::NODEV) => Ok(false),
        Err(e) => Err(ReceiveError::Target {
            op,
            offset,
            len,
            source: e.into(),
        }),
    }
}
