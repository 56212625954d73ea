//! The snapshot table as the writer keeps it: each entry's bytes exactly as the file holds
//! them (extra data QEMU may add later is kept), plus entries this writer makes.
//!
//! ```text
//! entry  0 l1_table_offset u64 | 8 l1_size u32 | 12 id_str_size u16 | 14 name_size u16
//!        16 date_sec u32 | 20 date_nsec u32 | 24 vm_clock_nsec u64 | 32 vm_state_size u32
//!        36 extra_data_size u32 | 40 extra (vm_state_size_large u64, disk_size u64,
//!        icount i64) | id | name | zeros to a multiple of 8
//! ```

use std::fs::File;

use super::io::read_at;
use crate::image::qcow2::bytes::{be_u16, be_u32, be_u64};
use crate::image::qcow2::{Header, Snapshot};
use crate::ImageError;

/// What a new internal snapshot records about itself: with the fields of the snapshot it
/// copies, its blkdelta GUID is that snapshot's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Snapshot id (QEMU numbers them "1", "2", …).
    pub id: String,
    /// Snapshot name.
    pub name: String,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds.
    pub date_nsec: u32,
    /// Guest run time at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size at the snapshot.
    pub disk_size: u64,
}

/// Bytes of the extra data this writer stores (as QEMU does).
const EXTRA_BYTES: usize = 24;

/// One entry of the table, as stored.
#[derive(Clone, Debug)]
pub(crate) struct RawEntry {
    pub(crate) bytes: Vec<u8>,
}

impl RawEntry {
    /// An entry for `meta` whose L1 copy is at `l1_offset` with `l1_size` entries.
    pub(crate) fn new(meta: &SnapshotMeta, l1_offset: u64, l1_size: u32) -> RawEntry {
        let mut b = Vec::with_capacity(64 + meta.id.len() + meta.name.len());
        b.extend_from_slice(&l1_offset.to_be_bytes());
        b.extend_from_slice(&l1_size.to_be_bytes());
        b.extend_from_slice(&(meta.id.len() as u16).to_be_bytes());
        b.extend_from_slice(&(meta.name.len() as u16).to_be_bytes());
        b.extend_from_slice(&meta.date_sec.to_be_bytes());
        b.extend_from_slice(&meta.date_nsec.to_be_bytes());
        b.extend_from_slice(&meta.vm_clock_nsec.to_be_bytes());
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&(EXTRA_BYTES as u32).to_be_bytes());
        b.extend_from_slice(&0u64.to_be_bytes());
        b.extend_from_slice(&meta.disk_size.to_be_bytes());
        b.extend_from_slice(&(-1i64).to_be_bytes());
        b.extend_from_slice(meta.id.as_bytes());
        b.extend_from_slice(meta.name.as_bytes());
        b.resize(b.len().div_ceil(8) * 8, 0);
        RawEntry { bytes: b }
    }

    /// The snapshot this entry describes (`header_size`: the disk size of an entry without
    /// one in its extra data).
    pub(crate) fn snapshot(&self, header_size: u64) -> Snapshot {
        let b = &self.bytes;
        let extra_len = be_u32(b, 36) as usize;
        let id_len = usize::from(be_u16(b, 12));
        let name_len = usize::from(be_u16(b, 14));
        let extra = &b[40..40 + extra_len];
        let extra_u64 = |i: usize| extra.get(i..i + 8).map(|x| be_u64(x, 0));
        let id = &b[40 + extra_len..40 + extra_len + id_len];
        let name = &b[40 + extra_len + id_len..40 + extra_len + id_len + name_len];
        Snapshot {
            id: String::from_utf8_lossy(id).into_owned(),
            name: String::from_utf8_lossy(name).into_owned(),
            l1_table_offset: self.l1_offset(),
            l1_size: self.l1_size(),
            date_sec: be_u32(b, 16),
            date_nsec: be_u32(b, 20),
            vm_clock_nsec: be_u64(b, 24),
            vm_state_size: extra_u64(0).unwrap_or(u64::from(be_u32(b, 32))),
            disk_size: extra_u64(8).unwrap_or(header_size),
        }
    }

    /// Where the snapshot's L1 table is.
    pub(crate) fn l1_offset(&self) -> u64 {
        be_u64(&self.bytes, 0)
    }

    /// Entries of the snapshot's L1 table.
    pub(crate) fn l1_size(&self) -> u32 {
        be_u32(&self.bytes, 8)
    }
}

/// Reads the `header.nb_snapshots` entries of a table the reader has validated.
pub(crate) fn read_entries(
    file: &File,
    header: &Header,
    file_len: u64,
) -> Result<Vec<RawEntry>, ImageError> {
    let mut at = header.snapshots_offset;
    let mut entries = Vec::with_capacity(header.nb_snapshots as usize);
    for _ in 0..header.nb_snapshots {
        let fixed = read_at(file, "snapshot table entry", at, 40, file_len)?;
        let len = 40
            + u64::from(be_u32(&fixed, 36))
            + u64::from(be_u16(&fixed, 12))
            + u64::from(be_u16(&fixed, 14));
        let mut bytes = read_at(file, "snapshot table entry", at, len, file_len)?;
        bytes.resize(len.div_ceil(8) as usize * 8, 0);
        at += bytes.len() as u64;
        entries.push(RawEntry { bytes });
    }
    Ok(entries)
}

/// The table's bytes.
pub(crate) fn encode(entries: &[RawEntry]) -> Vec<u8> {
    entries
        .iter()
        .flat_map(|e| e.bytes.iter().copied())
        .collect()
}
