//! The COPIED check of QEMU's `check_oflag_copied`: in the active L1 table and the L2 tables
//! it names, bit 63 of an entry must be set exactly when the refcount of the cluster it points
//! to is 1 (so that a write may go in place). Snapshot tables are not checked: their COPIED
//! bits mean nothing.

use super::walk::{for_each_entry, l2_entry, read_cluster, Image};
use crate::error::{L1Problem, L2Problem};
use crate::image::qcow2::tables::{
    classify_cluster, ClusterKind, L1E_OFFSET_MASK, QCOW_OFLAG_COPIED,
};
use crate::ImageError;

/// Most COPIED mismatches a report lists; the total is counted beyond.
pub const MAX_LISTED_COPIED_MISMATCHES: usize = 1 << 16;

/// Which table an entry with a COPIED mismatch is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryTable {
    /// The active L1 table (the entry points to an L2 table).
    L1,
    /// An L2 table of the active L1 (the entry points to a data cluster).
    L2,
}

/// An active L1 or L2 entry whose COPIED flag is clear although the refcount of the cluster it
/// points to is 1: harmless (writes copy the cluster instead of writing in place), and fixed
/// by writing [`CopiedMismatch::fixed_entry`] at [`entry_offset`](CopiedMismatch::entry_offset).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CopiedMismatch {
    /// The table the entry is in.
    pub table: EntryTable,
    /// Offset of that table in the file.
    pub table_offset: u64,
    /// Index of the entry in the table.
    pub index: u64,
    /// Offset of the entry (its standard 64-bit word) in the file.
    pub entry_offset: u64,
    /// The entry as stored.
    pub entry: u64,
}

impl CopiedMismatch {
    /// The entry with COPIED set, to write back at `entry_offset`.
    pub fn fixed_entry(&self) -> u64 {
        self.entry | QCOW_OFLAG_COPIED
    }
}

/// What the COPIED scan found: the mismatches listed (at most
/// [`MAX_LISTED_COPIED_MISMATCHES`]) and their total.
#[derive(Default)]
pub(super) struct Found {
    pub(super) listed: Vec<CopiedMismatch>,
    pub(super) total: u64,
}

impl Found {
    /// Checks one entry pointing to a cluster of refcount `refcount`: COPIED set on a shared
    /// cluster is refused as `shared` says; COPIED clear at refcount 1 is recorded.
    fn entry<P>(&mut self, m: CopiedMismatch, refcount: u64, shared: P) -> Result<(), ImageError>
    where
        P: FnOnce(u64) -> ImageError,
    {
        let copied = m.entry & QCOW_OFLAG_COPIED != 0;
        if copied && refcount != 1 {
            return Err(shared(refcount));
        }
        if !copied && refcount == 1 {
            self.total += 1;
            if self.listed.len() < MAX_LISTED_COPIED_MISMATCHES {
                self.listed.push(m);
            }
        }
        Ok(())
    }
}

/// Scans the active L1 table and its L2 tables (already checked by the counting walk), with
/// `refcount(cluster)` giving the refcount each COPIED flag must agree with.
pub(super) fn scan(image: Image<'_>, refcount: impl Fn(u64) -> u64) -> Result<Found, ImageError> {
    let h = image.header;
    let mut found = Found::default();
    let mut l2 = vec![0u8; image.cluster_size() as usize];
    let l1_offset = h.l1_table_offset;
    for_each_entry(image.file, l1_offset, h.l1_size.into(), |index, entry| {
        let l2_offset = entry & L1E_OFFSET_MASK;
        if l2_offset == 0 {
            return Ok(());
        }
        let m = CopiedMismatch {
            table: EntryTable::L1,
            table_offset: l1_offset,
            index,
            entry_offset: l1_offset + index * 8,
            entry,
        };
        let rc = refcount(l2_offset >> h.cluster_bits);
        found.entry(m, rc, |refcount| ImageError::L1Entry {
            table_offset: l1_offset,
            index,
            entry,
            problem: L1Problem::CopiedShared { refcount },
        })?;
        read_cluster(image.file, image.file_len, l2_offset, &mut l2)?;
        scan_l2(image, &l2, l2_offset, &refcount, &mut found)
    })?;
    Ok(found)
}

/// Scans the L2 table held in `table` (at `offset`).
fn scan_l2(
    image: Image<'_>,
    table: &[u8],
    offset: u64,
    refcount: &impl Fn(u64) -> u64,
    found: &mut Found,
) -> Result<(), ImageError> {
    let g = image.geometry();
    let entry_bytes = if g.extended_l2 { 16 } else { 8 };
    for index in 0..g.l2_entries {
        let (entry, _) = l2_entry(table, index, g.extended_l2);
        let bad = |problem| ImageError::L2Entry {
            table_offset: offset,
            index,
            entry,
            problem,
        };
        let host = match classify_cluster(entry, g).map_err(bad)? {
            ClusterKind::Normal(host) | ClusterKind::ZeroAlloc(host) => host,
            _ => continue,
        };
        let m = CopiedMismatch {
            table: EntryTable::L2,
            table_offset: offset,
            index,
            entry_offset: offset + index * entry_bytes,
            entry,
        };
        let rc = refcount(host >> g.cluster_bits);
        found.entry(m, rc, |refcount| bad(L2Problem::CopiedShared { refcount }))?;
    }
    Ok(())
}
