//! The image digest: one hash for the content of a virtual disk, whatever holds it.
//!
//! ```text
//! digest = blake3( u64 LE virtual_size || blake3(block 0) || blake3(block 1) || ... )
//! ```
//! Blocks are 1 MiB (the last one may be shorter and is hashed at its own length). A block that
//! the source reports as unallocated or zero is not read: its hash is the hash of zeros.

mod walk;

use std::sync::OnceLock;

use crate::buf::AlignedBuf;
use crate::image::{Allocation, BlockSource};
use crate::limits::CHUNK_BYTES;
use crate::ImageError;

/// Size of a digest block.
pub const BLOCK_BYTES: u64 = CHUNK_BYTES;

/// The blake3 of `len` zero bytes.
pub fn zero_hash(len: u64) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let zeros = [0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        h.update(&zeros[..n]);
        left -= n as u64;
    }
    *h.finalize().as_bytes()
}

/// The blake3 of a whole block of zeros (computed once).
pub fn zero_block_hash() -> &'static [u8; 32] {
    static HASH: OnceLock<[u8; 32]> = OnceLock::new();
    HASH.get_or_init(|| zero_hash(BLOCK_BYTES))
}

/// [`FOLD_BATCH_BYTES`] of repeated [`zero_block_hash`]es: runs of zero blocks are folded
/// from it, 2048 blocks per hasher call, with no per-block work.
fn zero_run() -> &'static [u8] {
    static RUN: OnceLock<Vec<u8>> = OnceLock::new();
    RUN.get_or_init(|| zero_block_hash().repeat(FOLD_BATCH_BYTES / 32))
}

/// Hashes the block at `offset` of `len` bytes, reading only its allocated parts (into `buf`,
/// aligned so that cold data is read around the page cache, and reused between calls).
pub fn block_hash(
    src: &dyn BlockSource,
    offset: u64,
    len: u64,
    zero_block: &[u8; 32],
    buf: &mut AlignedBuf,
) -> Result<[u8; 32], ImageError> {
    let mut data_ranges = Vec::new();
    let mut pos = offset;
    while pos < offset + len {
        let (alloc, n) = src.status(pos, offset + len - pos)?;
        if alloc == Allocation::Data {
            data_ranges.push((pos, n));
        }
        pos += n;
    }
    if data_ranges.is_empty() {
        return Ok(if len == BLOCK_BYTES {
            *zero_block
        } else {
            zero_hash(len)
        });
    }
    buf.set_len(len as usize);
    // Data ranges are read, the gaps between them (left over from an earlier block) zeroed.
    let mut filled = 0;
    for (start, n) in data_ranges {
        let at = (start - offset) as usize;
        buf[filled..at].fill(0);
        src.read_at(&mut buf[at..at + n as usize], start)?;
        filled = at + n as usize;
    }
    buf[filled..].fill(0);
    Ok(*blake3::hash(buf).as_bytes())
}

/// A run of blocks in disk order, as [`block_runs`] hands them on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRun {
    /// Block `index` hashes to `hash`.
    Block {
        /// Index of the block (its offset divided by [`BLOCK_BYTES`]).
        index: u64,
        /// Its blake3 hash.
        hash: [u8; 32],
    },
    /// `count` whole blocks from block `first` read as zeros: each hashes to
    /// `zero_hash(BLOCK_BYTES)`. A short last block of zeros comes as a [`BlockRun::Block`].
    Zeros {
        /// Index of the first block.
        first: u64,
        /// Number of blocks (at least one).
        count: u64,
    },
}

/// Hands every block of `src` to `each`, in order, as runs: a range the source reports as
/// unallocated or zero costs one call for the whole range, whatever its length; blocks holding
/// data are read and hashed on `threads` workers (at least one). Memory is bounded by the
/// threads. Stops at the first error, of the source or of `each`.
pub fn block_runs(
    src: &dyn BlockSource,
    threads: usize,
    each: &mut dyn FnMut(BlockRun) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    walk::walk(src, threads, each)
}

/// Calls `each` with the index and hash of every block of `src`, in order (see
/// [`block_runs`], which this expands: zero blocks cost no reading, only the call).
// The callback's signature is the API: spelled out, it documents itself better than an alias.
#[allow(clippy::type_complexity)]
pub fn block_hashes(
    src: &dyn BlockSource,
    threads: usize,
    each: &mut dyn FnMut(u64, &[u8; 32]) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let zero_block = zero_block_hash();
    block_runs(src, threads, &mut |run| match run {
        BlockRun::Block { index, hash } => each(index, &hash),
        BlockRun::Zeros { first, count } => {
            (first..first + count).try_for_each(|index| each(index, zero_block))
        }
    })
}

/// Computes the digest of `src` with `threads` workers (at least one).
pub fn image_digest(src: &dyn BlockSource, threads: usize) -> Result<[u8; 32], ImageError> {
    let mut top = DigestBuilder::new(src.size());
    block_runs(src, threads, &mut |run| {
        match run {
            BlockRun::Block { hash, .. } => top.push(&hash),
            BlockRun::Zeros { count, .. } => top.push_zero_blocks(count),
        }
        Ok(())
    })?;
    Ok(top.finish())
}

/// Bytes of block hashes gathered before they are fed to the top-level hasher: blake3 hashes
/// a long input many chunks at a time, 32 bytes per call one block at a time.
const FOLD_BATCH_BYTES: usize = 64 << 10;

/// Folds the hashes of a disk's blocks, in order, into its digest (batched, so the top-level
/// hash runs at blake3's speed whatever the number of blocks).
///
/// ```
/// use blkdelta_common::digest::{zero_hash, DigestBuilder, BLOCK_BYTES};
/// let mut d = DigestBuilder::new(2 * BLOCK_BYTES);
/// d.push_zero_blocks(2);
/// let digest = d.finish();
/// assert_eq!(digest.len(), 32);
/// ```
#[derive(Debug, Clone)]
pub struct DigestBuilder {
    top: blake3::Hasher,
    batch: Vec<u8>,
    pushed: u64,
}

impl DigestBuilder {
    /// A digest of a disk of `size` bytes.
    pub fn new(size: u64) -> Self {
        let mut top = blake3::Hasher::new();
        top.update(&size.to_le_bytes());
        DigestBuilder {
            top,
            batch: Vec::with_capacity(FOLD_BATCH_BYTES),
            pushed: 0,
        }
    }

    /// Appends the hash of the next block.
    pub fn push(&mut self, hash: &[u8; 32]) {
        self.batch.extend_from_slice(hash);
        self.pushed += 1;
        if self.batch.len() >= FOLD_BATCH_BYTES {
            self.fold();
        }
    }

    /// Appends `count` whole blocks of zeros, at the hasher's speed (no per-block work).
    pub fn push_zero_blocks(&mut self, count: u64) {
        let run = zero_run();
        let mut left = count;
        while left > 0 {
            if self.batch.is_empty() && left >= (run.len() / 32) as u64 {
                // A whole batch of zero hashes: straight from the prebuilt run, no copy.
                self.top.update(run);
                left -= (run.len() / 32) as u64;
                continue;
            }
            let room = (FOLD_BATCH_BYTES - self.batch.len()) / 32;
            let n = left.min(room as u64) as usize;
            self.batch.extend_from_slice(&run[..n * 32]);
            left -= n as u64;
            if self.batch.len() >= FOLD_BATCH_BYTES {
                self.fold();
            }
        }
        self.pushed += count;
    }

    /// Blocks pushed so far.
    pub fn blocks(&self) -> u64 {
        self.pushed
    }

    fn fold(&mut self) {
        self.top.update(&self.batch);
        self.batch.clear();
    }

    /// The digest.
    pub fn finish(mut self) -> [u8; 32] {
        self.fold();
        *self.top.finalize().as_bytes()
    }
}

/// Lower-case hex of a digest (kept here for its callers; [`crate::hex`] reads it back).
pub use crate::hex::to_hex;

#[cfg(test)]
mod tests;
