//! The stored refcounts: the refcount table and the refcount blocks it names, read into
//! memory for the clusters of the file.
//!
//! ```text
//! refcount table (refcount_table_clusters clusters of u64):
//!   entry i = 63..9 offset of refcount block i (0: not allocated, all its refcounts 0) | 8..0 reserved
//! refcount block (one cluster of cluster_size * 8 / refcount_bits entries):
//!   refcount_bits 1, 2, 4: packed LSB first in each byte; 8..64: big-endian integers
//! refcount of cluster c = block[c / entries][c % entries]
//! ```

use std::fs::File;

use crate::error::RefcountTableProblem;
use crate::image::qcow2::bytes::be_u64;
use crate::image::qcow2::header::Header;
use crate::image::raw::pread_exact;
use crate::ImageError;

/// Bits 9-63 of a refcount table entry: the offset of a refcount block.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Reserved bits of a refcount table entry (0-8).
pub const REFT_RESERVED_MASK: u64 = 0x1ff;
/// Most clusters a file may have for its refcounts to be read or checked: 2^28, so 256 Mi
/// clusters (16 TiB of 64 KiB clusters, 128 GiB of 512-byte ones). A check holds about
/// `3 + refcount_bits / 8` bytes per cluster.
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 28;

/// The refcounts stored in an image, as [`read_refcounts`] found them: the whole refcount
/// table, and the refcount blocks that cover the clusters of the file (those past the end of
/// the file are checked but not loaded).
#[derive(Clone, PartialEq, Eq)]
pub struct Refcounts {
    cluster_bits: u32,
    refcount_order: u32,
    table_offset: u64,
    table: Vec<u64>,
    /// The refcount blocks of the first `blocks.len()` table entries (`None` for entries 0).
    blocks: Vec<Option<Box<[u8]>>>,
}

impl Refcounts {
    /// Bits per refcount: 1 << refcount_order (1..=64).
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The largest refcount an entry can hold.
    pub fn max_refcount(&self) -> u64 {
        u64::MAX >> (64 - self.refcount_bits())
    }

    /// Refcounts per refcount block: `cluster_size * 8 / refcount_bits`.
    pub fn block_entries(&self) -> u64 {
        (8u64 << self.cluster_bits) >> self.refcount_order
    }

    /// Offset of the refcount table in the file.
    pub fn table_offset(&self) -> u64 {
        self.table_offset
    }

    /// The refcount table's entries as stored (each valid: no reserved bits, an aligned
    /// refcount block inside the file, or 0).
    pub fn table(&self) -> &[u64] {
        &self.table
    }

    /// Clusters whose refcounts were loaded: `[0, loaded_clusters())` covers the whole file.
    /// [`Refcounts::get`] reads 0 past them, whatever the refcount table names there.
    pub fn loaded_clusters(&self) -> u64 {
        self.blocks.len() as u64 * self.block_entries()
    }

    /// The stored refcount of host cluster `cluster` (host offset >> cluster_bits): 0 when
    /// no refcount block covers it, or when it lies past [`Refcounts::loaded_clusters`].
    pub fn get(&self, cluster: u64) -> u64 {
        let per_block = self.block_entries();
        let block = usize::try_from(cluster / per_block)
            .ok()
            .and_then(|i| self.blocks.get(i));
        match block {
            Some(Some(block)) => decode(block, cluster % per_block, self.refcount_order),
            _ => 0,
        }
    }
}

impl std::fmt::Debug for Refcounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refcounts")
            .field("refcount_bits", &self.refcount_bits())
            .field("table_offset", &self.table_offset)
            .field("table_entries", &self.table.len())
            .field("loaded_clusters", &self.loaded_clusters())
            .finish()
    }
}

/// Entry `index` of a refcount block whose entries are `1 << order` bits wide.
fn decode(block: &[u8], index: u64, order: u32) -> u64 {
    let i = index as usize;
    match order {
        0..=2 => {
            // Sub-byte widths are packed LSB first: entry i is at bit (i % per_byte) * bits.
            let bits = 1u32 << order;
            let per_byte = 8 >> order;
            let shift = (i % per_byte) as u32 * bits;
            u64::from(block[i / per_byte] >> shift) & ((1 << bits) - 1)
        }
        3 => u64::from(block[i]),
        4 => u64::from(u16::from_be_bytes([block[2 * i], block[2 * i + 1]])),
        5 => u64::from(u32::from_be_bytes(
            block[4 * i..4 * i + 4].try_into().expect("4 bytes"),
        )),
        _ => be_u64(block, 8 * i),
    }
}

/// The clusters of a file of `file_len` bytes (the last one may be partial), refused past
/// [`MAX_CHECK_CLUSTERS`].
pub(super) fn file_clusters(file_len: u64, cluster_bits: u32) -> Result<u64, ImageError> {
    let clusters = file_len.div_ceil(1 << cluster_bits);
    if clusters > MAX_CHECK_CLUSTERS {
        return Err(ImageError::TooManyClusters {
            file_len,
            clusters,
            limit: MAX_CHECK_CLUSTERS,
        });
    }
    Ok(clusters)
}

/// Reads the refcount table of a validated header and the refcount blocks covering the
/// clusters of the file (`file_len` bytes), after checking every table entry as QEMU's
/// `check_refblocks` does: no reserved bits, a cluster-aligned block that starts inside the
/// file. A block in the file's last, partial cluster reads as zeros past the end, as QEMU
/// reads it. Memory: the table (at most 8 MiB) and `refcount_bits / 8` bytes per cluster of
/// the file; files of more than [`MAX_CHECK_CLUSTERS`] clusters are refused.
pub fn read_refcounts(
    file: &File,
    file_len: u64,
    header: &Header,
) -> Result<Refcounts, ImageError> {
    let clusters = file_clusters(file_len, header.cluster_bits)?;
    let table = read_table(file, header)?;
    let mut refcounts = Refcounts {
        cluster_bits: header.cluster_bits,
        refcount_order: header.refcount_order,
        table_offset: header.refcount_table_offset,
        table,
        blocks: Vec::new(),
    };
    let cs = header.cluster_size();
    for (index, &entry) in refcounts.table.iter().enumerate() {
        check_entry(entry, cs, file_len).map_err(|problem| ImageError::RefcountTableEntry {
            table_offset: header.refcount_table_offset,
            index: index as u64,
            entry,
            problem,
        })?;
    }
    let needed = clusters.div_ceil(refcounts.block_entries());
    let loaded = needed.min(refcounts.table.len() as u64) as usize;
    let mut blocks = Vec::with_capacity(loaded);
    for &entry in &refcounts.table[..loaded] {
        blocks.push(read_block(file, file_len, entry & REFT_OFFSET_MASK, cs)?);
    }
    refcounts.blocks = blocks;
    Ok(refcounts)
}

/// Reads the refcount table (the header checked that it lies inside the file and holds at
/// most 8 MiB).
fn read_table(file: &File, header: &Header) -> Result<Vec<u64>, ImageError> {
    let len = u64::from(header.refcount_table_clusters) * header.cluster_size();
    let mut raw = vec![0u8; len as usize];
    pread_exact(file, &mut raw, header.refcount_table_offset)?;
    Ok(raw.chunks_exact(8).map(|b| be_u64(b, 0)).collect())
}

/// Checks one refcount table entry like QEMU's `check_refblocks`.
fn check_entry(entry: u64, cs: u64, file_len: u64) -> Result<(), RefcountTableProblem> {
    let bits = entry & REFT_RESERVED_MASK;
    if bits != 0 {
        return Err(RefcountTableProblem::ReservedBits { bits });
    }
    let offset = entry & REFT_OFFSET_MASK;
    if offset & (cs - 1) != 0 {
        return Err(RefcountTableProblem::Unaligned {
            offset,
            cluster_size: cs,
        });
    }
    // QEMU: the block's cluster must be one of the file's (the last may be partial).
    if offset >= file_len.div_ceil(cs) * cs {
        return Err(RefcountTableProblem::PastEnd { offset, file_len });
    }
    Ok(())
}

/// Reads the refcount block at `offset` (0: none), zero-filled past the end of the file.
fn read_block(
    file: &File,
    file_len: u64,
    offset: u64,
    cs: u64,
) -> Result<Option<Box<[u8]>>, ImageError> {
    if offset == 0 {
        return Ok(None);
    }
    let mut block = vec![0u8; cs as usize];
    let present = cs.min(file_len - offset) as usize;
    pread_exact(file, &mut block[..present], offset)?;
    Ok(Some(block.into_boxed_slice()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_every_refcount_width() {
        // [V] rc2 refblock byte 0x55: four clusters each with refcount 1 (LSB first).
        let block = [0x55u8, 0xe4, 0x12, 0x34, 0x56, 0x78, 0x9a, 0xbc];
        assert_eq!(
            (0..4).map(|i| decode(&block, i, 1)).collect::<Vec<_>>(),
            [1; 4]
        );
        // 0xe4 = 0b11_10_01_00: entries 4..8 are 0, 1, 2, 3.
        assert_eq!(
            (4..8).map(|i| decode(&block, i, 1)).collect::<Vec<_>>(),
            [0, 1, 2, 3]
        );
        // 1 bit: 0x55 = 0b0101_0101.
        assert_eq!(
            (0..8).map(|i| decode(&block, i, 0)).collect::<Vec<_>>(),
            [1, 0, 1, 0, 1, 0, 1, 0]
        );
        // 4 bits: low nibble first.
        assert_eq!((decode(&block, 2, 2), decode(&block, 3, 2)), (0x4, 0xe));
        assert_eq!(decode(&block, 1, 3), 0xe4);
        assert_eq!(decode(&block, 1, 4), 0x1234);
        assert_eq!(decode(&block, 1, 5), 0x5678_9abc);
        assert_eq!(decode(&block, 0, 6), 0x55e4_1234_5678_9abc);
    }

    #[test]
    fn table_entries_are_checked_like_qemu() {
        let cs = 65536;
        assert_eq!(check_entry(0, cs, 3 * cs), Ok(()));
        assert_eq!(check_entry(2 * cs, cs, 3 * cs), Ok(()));
        // A block in the last, partial cluster of the file is accepted.
        assert_eq!(check_entry(3 * cs, cs, 3 * cs + 8), Ok(()));
        assert_eq!(
            check_entry(3 * cs, cs, 3 * cs),
            Err(RefcountTableProblem::PastEnd {
                offset: 3 * cs,
                file_len: 3 * cs
            })
        );
        assert_eq!(
            check_entry(cs | 1, cs, 3 * cs),
            Err(RefcountTableProblem::ReservedBits { bits: 1 })
        );
        assert_eq!(
            check_entry(cs + 512, cs, 3 * cs),
            Err(RefcountTableProblem::Unaligned {
                offset: cs + 512,
                cluster_size: cs
            })
        );
    }

    #[test]
    fn files_past_the_cluster_limit_are_refused() {
        let limit = MAX_CHECK_CLUSTERS;
        assert_eq!(file_clusters(limit << 9, 9).unwrap(), limit);
        assert!(matches!(
            file_clusters((limit << 9) + 1, 9),
            Err(ImageError::TooManyClusters { clusters, .. }) if clusters == limit + 1
        ));
    }
}
