//! The image digest: one hash for the content of a virtual disk, whatever holds it.
//!
//! ```text
//! digest = blake3( u64 LE virtual_size || blake3(block 0) || blake3(block 1) || ... )
//! ```
//! Blocks are 1 MiB (the last one may be shorter and is hashed at its own length). A block that
//! the source reports as unallocated or zero is not read: its hash is the hash of zeros.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::buf::AlignedBuf;
use crate::image::{Allocation, BlockSource};
use crate::limits::CHUNK_BYTES;
use crate::ImageError;

/// Size of a digest block.
pub const BLOCK_BYTES: u64 = CHUNK_BYTES;

/// Blocks hashed per parallel batch: bounds memory whatever the disk size.
const BATCH_BLOCKS: usize = 256;

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

/// Computes the digest of `src` with `threads` workers (at least one).
pub fn image_digest(src: &dyn BlockSource, threads: usize) -> Result<[u8; 32], ImageError> {
    let size = src.size();
    let blocks = size.div_ceil(BLOCK_BYTES);
    let zero_block = zero_hash(BLOCK_BYTES);
    let mut top = DigestBuilder::new(size);
    let mut first = 0u64;
    while first < blocks {
        let count = (blocks - first).min(BATCH_BLOCKS as u64) as usize;
        let hashes = hash_batch(src, first, count, threads.max(1), &zero_block)?;
        for h in &hashes {
            top.push(h);
        }
        first += count as u64;
    }
    Ok(top.finish())
}

fn hash_batch(
    src: &dyn BlockSource,
    first: u64,
    count: usize,
    threads: usize,
    zero_block: &[u8; 32],
) -> Result<Vec<[u8; 32]>, ImageError> {
    let size = src.size();
    let out = Mutex::new(vec![[0u8; 32]; count]);
    let next = AtomicUsize::new(0);
    let failure = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads.min(count) {
            s.spawn(|| {
                let mut buf = AlignedBuf::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count || failure.lock().expect("not poisoned").is_some() {
                        break;
                    }
                    let offset = (first + i as u64) * BLOCK_BYTES;
                    let len = BLOCK_BYTES.min(size - offset);
                    match block_hash(src, offset, len, zero_block, &mut buf) {
                        Ok(h) => out.lock().expect("not poisoned")[i] = h,
                        Err(e) => *failure.lock().expect("not poisoned") = Some(e),
                    }
                }
            });
        }
    });
    match failure.into_inner().expect("not poisoned") {
        Some(e) => Err(e),
        None => Ok(out.into_inner().expect("not poisoned")),
    }
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
    zero_block: [u8; 32],
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
            zero_block: zero_hash(BLOCK_BYTES),
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

    /// Appends `count` whole blocks of zeros.
    pub fn push_zero_blocks(&mut self, count: u64) {
        let zero = self.zero_block;
        for _ in 0..count {
            self.push(&zero);
        }
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

/// Lower-case hex of a digest.
pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::mem::MemImage;

    fn naive_digest(bytes: &[u8]) -> [u8; 32] {
        let mut top = blake3::Hasher::new();
        top.update(&(bytes.len() as u64).to_le_bytes());
        for block in bytes.chunks(BLOCK_BYTES as usize) {
            top.update(blake3::hash(block).as_bytes());
        }
        *top.finalize().as_bytes()
    }

    #[test]
    fn digest_matches_the_definition_with_holes_and_a_short_tail() {
        let size = 5 * BLOCK_BYTES + 1234;
        let mut img = MemImage::new(size, 4096);
        img.write(BLOCK_BYTES + 17, &[3u8; 9000]);
        img.write(size - 10, &[9u8; 10]);
        for threads in [1, 2, 7] {
            assert_eq!(
                image_digest(&img, threads).unwrap(),
                naive_digest(img.bytes())
            );
        }
    }

    #[test]
    fn a_reused_buffer_never_leaks_an_earlier_block_into_the_holes_of_the_next() {
        // One thread, one buffer: a full block, then blocks with data between holes.
        let size = 4 * BLOCK_BYTES;
        let mut img = MemImage::new(size, 4096);
        img.write(0, &vec![0xee; BLOCK_BYTES as usize]);
        img.write(BLOCK_BYTES + 8192, &[1; 4096]);
        img.write(2 * BLOCK_BYTES, &[2; 4096]);
        img.write(3 * BLOCK_BYTES - 4096, &[3; 4096]);
        img.write(3 * BLOCK_BYTES + 4096, &[4; 100]);
        assert_eq!(image_digest(&img, 1).unwrap(), naive_digest(img.bytes()));
    }

    #[test]
    fn holes_are_not_read() {
        let img = MemImage::new(3 * BLOCK_BYTES, 4096);
        img.fail_reads_at(BLOCK_BYTES + 5);
        assert_eq!(image_digest(&img, 2).unwrap(), naive_digest(img.bytes()));
    }

    #[test]
    fn read_errors_surface() {
        let mut img = MemImage::new(3 * BLOCK_BYTES, 4096);
        img.write(BLOCK_BYTES, &[1; 10]);
        img.fail_reads_at(BLOCK_BYTES + 5);
        assert!(image_digest(&img, 2).is_err());
    }

    #[test]
    fn empty_disk_has_a_digest() {
        let img = MemImage::new(0, 4096);
        assert_eq!(image_digest(&img, 1).unwrap(), naive_digest(&[]));
    }
}
