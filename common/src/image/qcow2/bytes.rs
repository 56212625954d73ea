//! Big-endian field readers, the cluster-table placement check and bounded reads, shared by
//! every parser of the qcow2 reader (header, extensions, snapshot table, L1/L2 tables, bitmaps)
//! and by the writer. A leaf module: it imports nothing from its siblings, so none of them
//! import each other for these.

use std::fs::File;

use crate::image::raw::pread_exact;
use crate::ImageError;

/// The big-endian `u16` at `b[at..at + 2]`.
pub(crate) fn be_u16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The big-endian `u32` at `b[at..at + 4]`.
pub(crate) fn be_u32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// The big-endian `u64` at `b[at..at + 8]`.
pub(crate) fn be_u64(b: &[u8], at: usize) -> u64 {
    (u64::from(be_u32(b, at)) << 32) | u64::from(be_u32(b, at + 4))
}

/// Checks that `[offset, offset + len)` is cluster-aligned and inside the file.
pub(crate) fn check_table(
    what: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), ImageError> {
    if offset & (cluster_size - 1) != 0 {
        return Err(ImageError::Unaligned {
            what,
            offset,
            cluster_size,
        });
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(ImageError::PastEnd {
            what,
            offset,
            len,
            file_len,
        }),
    }
}

/// Reads `len` bytes at `offset`, refusing anything past the end of the file.
pub(crate) fn read_checked(
    file: &File,
    file_len: u64,
    what: &'static str,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>, ImageError> {
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(ImageError::PastEnd {
            what,
            offset,
            len,
            file_len,
        });
    }
    let mut buf = vec![0u8; len as usize];
    pread_exact(file, &mut buf, offset)?;
    Ok(buf)
}
