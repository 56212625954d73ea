//! A block device: its size is fixed; zero and discard ranges use `fallocate` where the
//! device supports it, then `BLKZEROOUT`, then written zeros.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use rustix::fs::{FallocateFlags, SeekFrom};

use super::{pwrite_all, sync_data, try_fallocate, write_zeroes_plain, Target, WriteBehind};
use blkdelta_common::image::lock::lock_for_write;
use blkdelta_common::image::raw::RawImage;

use crate::identity::{DeviceKey, Identity};
use crate::ReceiveError;

/// `BLKZEROOUT`, `_IO(0x12, 127)`: zero a byte range `[start, len]` of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Alignment of fallocate and BLKZEROOUT ranges on a block device (its logical block size is
/// at most 4096 and divides it).
const SECTOR_BYTES: u64 = 4096;

/// A block device holding a raw replica.
#[derive(Debug)]
pub struct BlockDevTarget {
    file: File,
    device_bytes: u64,
    size: u64,
    behind: WriteBehind,
    key: Option<DeviceKey>,
}

impl BlockDevTarget {
    /// Opens the device at `path` for writing and takes QEMU's locks of a writer that shares
    /// nothing on it (see [`lock_for_write`]): they last as long as the target.
    pub fn open(path: &Path) -> Result<Self, ReceiveError> {
        let open_err = |source| ReceiveError::OpenTarget {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        // Before anything is written or resized: nobody else may have the replica open while
        // it is received, and the locks last as long as `file`.
        lock_for_write(&file, path).map_err(ReceiveError::TargetLocked)?;
        let device_bytes =
            rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| open_err(e.into()))?;
        Ok(BlockDevTarget {
            file,
            device_bytes,
            size: device_bytes,
            behind: WriteBehind::default(),
            key: DeviceKey::of(path, device_bytes).ok(),
        })
    }

    /// Zeroes a range: the sector-unaligned head and tail by plain writes (the device refuses
    /// unaligned fallocate and BLKZEROOUT), the aligned middle by `fallocate(mode)`, then
    /// `BLKZEROOUT`, then plain writes.
    fn zero_aligned(
        &self,
        offset: u64,
        len: u64,
        mode: FallocateFlags,
    ) -> Result<(), ReceiveError> {
        let end = offset + len;
        let start = offset.next_multiple_of(SECTOR_BYTES).min(end);
        let stop = (end / SECTOR_BYTES * SECTOR_BYTES).max(start);
        write_zeroes_plain(&self.file, offset, start - offset)?;
        write_zeroes_plain(&self.file, stop, end - stop)?;
        if stop == start {
            return Ok(());
        }
        let flags = mode | FallocateFlags::KEEP_SIZE;
        if try_fallocate(&self.file, flags, start, stop - start, "zero")?
            || self.blkzeroout(start, stop - start)
        {
            return Ok(());
        }
        write_zeroes_plain(&self.file, start, stop - start)
    }

    #[allow(unsafe_code)]
    fn blkzeroout(&self, offset: u64, len: u64) -> bool {
        let range: [u64; 2] = [offset, len];
        // SAFETY: BLKZEROOUT reads a `[u64; 2]` through the pointer, which stays valid for the
        // duration of the call; the fd is an open block device.
        let rc = unsafe { libc::ioctl(self.file.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
        rc == 0
    }
}

impl Target for BlockDevTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn capacity(&self) -> Option<u64> {
        Some(self.device_bytes)
    }

    fn set_size(&mut self, size: u64) -> Result<(), ReceiveError> {
        if size > self.device_bytes {
            return Err(ReceiveError::TooSmall {
                target: self.device_bytes,
                needed: size,
            });
        }
        if size > self.size {
            // The grown range holds whatever the device held before: it must read as zeros.
            let old = self.size;
            self.size = size;
            self.write_zeroes(old, size - old)?;
        }
        self.size = size;
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ReceiveError> {
        pwrite_all(&self.file, buf, offset)?;
        self.behind.wrote(&self.file, offset, buf.len() as u64);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        self.zero_aligned(offset, len, FallocateFlags::ZERO_RANGE)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        // PUNCH_HOLE on a block device unmaps and guarantees zeros on read.
        self.zero_aligned(offset, len, FallocateFlags::PUNCH_HOLE)
    }

    fn flush(&mut self) -> Result<(), ReceiveError> {
        sync_data(&self.file)
    }

    fn is_block_device(&self) -> bool {
        true
    }

    fn identity(&self) -> Option<Identity> {
        self.key.clone().map(Identity::Device)
    }

    fn write_handle(&self) -> Option<File> {
        self.file.try_clone().ok()
    }

    fn direct_handle(&self) -> Option<File> {
        blkdelta_common::image::raw::reopen_direct(&self.file, true)
    }

    fn reader(&self) -> Option<RawImage> {
        RawImage::from_file(self.file.try_clone().ok()?).ok()
    }
}
