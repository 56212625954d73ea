//! The hashes file's header and the size rules, byte by byte (see the module docs above).

use std::path::Path;

use blkdelta_common::digest::{self, BLOCK_BYTES};
use blkdelta_common::limits::MAX_VIRTUAL_BYTES;

use super::{state_err, HASHES_MAGIC, HASHES_VERSION, HEADER_BYTES};
use crate::ReceiveError;

pub(super) fn check_size(path: &Path, size: u64) -> Result<(), ReceiveError> {
    if size > MAX_VIRTUAL_BYTES {
        return Err(state_err(
            path,
            format!("a disk of {size} bytes is past the {MAX_VIRTUAL_BYTES}-byte limit"),
        ));
    }
    Ok(())
}

/// The hash of zeros at the length of the last block of a disk of `size` bytes.
pub(super) fn zero_tail(size: u64, zero_block: &[u8; 32]) -> [u8; 32] {
    match size % BLOCK_BYTES {
        0 => *zero_block,
        tail => digest::zero_hash(tail),
    }
}

pub(super) fn encode_header(size: u64, generation: &[u8; 16]) -> [u8; HEADER_BYTES as usize] {
    let mut h = [0u8; HEADER_BYTES as usize];
    h[24..40].copy_from_slice(generation);
    h[0..8].copy_from_slice(&HASHES_MAGIC);
    h[8..12].copy_from_slice(&HASHES_VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&(BLOCK_BYTES as u32).to_le_bytes());
    h[16..24].copy_from_slice(&size.to_le_bytes());
    h
}

/// Checks a header and gives the virtual size it holds and its generation (which the pieces
/// file names too: a pair left mismatched by a crash is refused).
pub(super) fn decode_header(h: &[u8; HEADER_BYTES as usize]) -> Result<(u64, [u8; 16]), String> {
    let u32_at = |at: usize| u32::from_le_bytes(h[at..at + 4].try_into().expect("4 bytes"));
    if h[0..8] != HASHES_MAGIC {
        return Err(format!("bad magic {:02x?}", &h[0..8]));
    }
    let version = u32_at(8);
    if version != HASHES_VERSION {
        return Err(format!("unsupported version {version}"));
    }
    let block_bytes = u32_at(12);
    if u64::from(block_bytes) != BLOCK_BYTES {
        return Err(format!("block size {block_bytes}, expected {BLOCK_BYTES}"));
    }
    let size = u64::from_le_bytes(h[16..24].try_into().expect("8 bytes"));
    if size > MAX_VIRTUAL_BYTES {
        return Err(format!("virtual size {size} is past the limit"));
    }
    if h[40..].iter().any(|&b| b != 0) {
        return Err("reserved header bytes are not zero".to_string());
    }
    Ok((size, h[24..40].try_into().expect("16 bytes")))
}
