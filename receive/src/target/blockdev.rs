//! A block device: its size is fixed; zero and discard ranges use `fallocate` where the
//! device supports it, then `BLKZEROOUT`, then written zeros.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use rustix::fs::{FallocateFlags, SeekFrom};

use super::{pwrite_all, sync_data, try_fallocate, write_zeroes_plain, Target};
use crate::ReceiveError;

/// `BLKZEROOUT`, `_IO(0x12, 127)`: zero a byte range `[start, len]` of a block device.
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// A block device holding a raw replica.
#[derive(Debug)]
pub struct BlockDevTarget {
    file: File,
    device_bytes: u64,
    size: u64,
}

impl BlockDevTarget {
    /// Opens the device at `path` for writing.
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
        let device_bytes =
            rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| open_err(e.into()))?;
        Ok(BlockDevTarget {
            file,
            device_bytes,
            size: device_bytes,
        })
    }

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
        self.size = size;
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ReceiveError> {
        pwrite_all(&self.file, buf, offset)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        let zero = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        if try_fallocate(&self.file, zero, offset, len, "zero")? || self.blkzeroout(offset, len) {
            return Ok(());
        }
        write_zeroes_plain(&self.file, offset, len)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        // PUNCH_HOLE on a block device unmaps and guarantees zeros on read.
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if try_fallocate(&self.file, punch, offset, len, "discard")? {
            return Ok(());
        }
        self.write_zeroes(offset, len)
    }

    fn flush(&mut self) -> Result<(), ReceiveError> {
        sync_data(&self.file)
    }

    fn is_fresh(&self) -> bool {
        false
    }

    fn is_block_device(&self) -> bool {
        true
    }
}
