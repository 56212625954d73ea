//! An in-memory image for tests, with fault injection.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::{check_range, Allocation, BlockSource};
use crate::ImageError;

/// A virtual disk held in memory that grows and shrinks. Ranges never written (or zeroed whole
/// blocks) are holes.
#[derive(Debug)]
pub struct MemImage {
    data: Vec<u8>,
    allocated: Vec<bool>,
    block_bytes: u64,
    fail_reads_at: AtomicU64,
    fail_every_read: AtomicBool,
}

impl MemImage {
    /// A disk of `size` bytes, all holes, tracking allocation in blocks of `block_bytes`.
    pub fn new(size: u64, block_bytes: u64) -> Self {
        let blocks = size.div_ceil(block_bytes) as usize;
        MemImage {
            data: vec![0; size as usize],
            allocated: vec![false; blocks],
            block_bytes,
            fail_reads_at: AtomicU64::new(u64::MAX),
            fail_every_read: AtomicBool::new(false),
        }
    }

    /// Writes bytes and marks their blocks allocated.
    pub fn write(&mut self, offset: u64, bytes: &[u8]) {
        let start = offset as usize;
        self.data[start..start + bytes.len()].copy_from_slice(bytes);
        let first = offset / self.block_bytes;
        let last = (offset + bytes.len() as u64).div_ceil(self.block_bytes);
        for b in first..last {
            self.allocated[b as usize] = true;
        }
    }

    /// Zeroes a range (clipped to the disk), making the blocks it covers whole into holes; a
    /// short last block counts as whole when the range reaches the end of the disk.
    pub fn zero(&mut self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size());
        if offset >= end {
            return;
        }
        self.data[offset as usize..end as usize].fill(0);
        let last_whole = if end == self.size() {
            end.div_ceil(self.block_bytes)
        } else {
            end / self.block_bytes
        };
        for b in offset.div_ceil(self.block_bytes)..last_whole {
            self.allocated[b as usize] = false;
        }
    }

    /// Grows (with holes) or shrinks the disk to `size` bytes.
    pub fn resize(&mut self, size: u64) {
        self.data.truncate(size as usize);
        self.data.resize(size as usize, 0);
        let blocks = size.div_ceil(self.block_bytes) as usize;
        self.allocated.resize(blocks, false);
    }

    /// Makes every read that covers `offset` fail with an I/O error.
    pub fn fail_reads_at(&self, offset: u64) {
        self.fail_reads_at.store(offset, Ordering::SeqCst);
    }

    /// Makes every read fail with an I/O error (`true`) or none but those of
    /// [`MemImage::fail_reads_at`] (`false`).
    pub fn fail_every_read(&self, fail: bool) {
        self.fail_every_read.store(fail, Ordering::SeqCst);
    }

    /// The whole content.
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }
}

impl BlockSource for MemImage {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size())?;
        let bad = self.fail_reads_at.load(Ordering::SeqCst);
        let covered = bad >= offset && bad < offset + buf.len() as u64;
        if covered || self.fail_every_read.load(Ordering::SeqCst) {
            return Err(ImageError::Read {
                offset,
                len: buf.len(),
                source: std::io::Error::other("injected fault"),
            });
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }

    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        check_range(offset, 1, self.size())?;
        let limit = offset.saturating_add(max_len).min(self.size());
        let first = self.allocated[(offset / self.block_bytes) as usize];
        let mut end = (offset / self.block_bytes + 1) * self.block_bytes;
        while end < limit && self.allocated[(end / self.block_bytes) as usize] == first {
            end += self.block_bytes;
        }
        let kind = if first {
            Allocation::Data
        } else {
            Allocation::Hole
        };
        Ok((kind, end.min(limit) - offset))
    }
}
