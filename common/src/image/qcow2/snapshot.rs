//! The internal snapshot table: `nb_snapshots` variable-length entries at `snapshots_offset`,
//! each padded to a multiple of 8.
//!
//! ```text
//! 0  l1_table_offset  8  l1_size  12 id_str_size  14 name_size  16 date_sec  20 date_nsec
//! 24 vm_clock_nsec    32 vm_state_size (u32)      36 extra_data_size
//! 40 extra data: +0 vm_state_size_large, +8 disk_size, +16 icount (each present if it fits)
//!    then the id string, the name string, zero padding to 8
//! ```

use std::fs::File;

use super::bytes::read_checked;

use super::bytes::{be_u16, be_u32, be_u64};
use super::header::{Header, SNAPSHOT_ENTRY_FIXED_BYTES};
use crate::limits::{MAX_SNAPSHOT_EXTRA_BYTES, MAX_SNAPSHOT_TABLE_BYTES, MAX_VIRTUAL_BYTES};
use crate::ImageError;

/// Domain separation prefix of [`snapshot_guid`].
const GUID_CONTEXT: &[u8] = b"blkdelta-qcow2-snapshot-v1";

/// One internal snapshot, as listed in the snapshot table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Snapshot {
    /// The unique id string (QEMU uses "1", "2", …).
    pub id: String,
    /// The name (tag); not necessarily unique.
    pub name: String,
    /// Offset of the snapshot's own L1 table.
    pub l1_table_offset: u64,
    /// Entries of that L1 table (may cover VM state beyond the disk).
    pub l1_size: u32,
    /// Creation time, seconds since the epoch (host clock).
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Size of the saved VM state (the 64-bit extra field when present, else the 32-bit one).
    pub vm_state_size: u64,
    /// Virtual disk size at snapshot time (extra data, else the header's size).
    pub disk_size: u64,
}

impl Snapshot {
    /// Stable 16-byte identity: see [`snapshot_guid`].
    pub fn guid(&self) -> [u8; 16] {
        snapshot_guid(&SnapshotIdentity {
            id: &self.id,
            name: &self.name,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            disk_size: self.disk_size,
        })
    }
}

/// The fields of a snapshot table entry that make up its identity (where its L1 table lives
/// is not one of them, so moving the tables keeps the GUID).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SnapshotIdentity<'a> {
    /// The unique id string.
    pub id: &'a str,
    /// The name (tag).
    pub name: &'a str,
    /// Creation time, seconds since the epoch.
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size at snapshot time.
    pub disk_size: u64,
}

/// The GUID of the internal snapshot with these fields, wherever they come from (a snapshot
/// table, or a stream's snapshot-info record): the first 16 bytes of
/// `blake3("blkdelta-qcow2-snapshot-v1" || u64le(id.len()) || id || u64le(name.len()) ||
/// name || u32le(date_sec) || u32le(date_nsec) || u64le(vm_clock_nsec) || u64le(disk_size))`.
pub fn snapshot_guid(s: &SnapshotIdentity<'_>) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(GUID_CONTEXT);
    h.update(&(s.id.len() as u64).to_le_bytes());
    h.update(s.id.as_bytes());
    h.update(&(s.name.len() as u64).to_le_bytes());
    h.update(s.name.as_bytes());
    h.update(&s.date_sec.to_le_bytes());
    h.update(&s.date_nsec.to_le_bytes());
    h.update(&s.vm_clock_nsec.to_le_bytes());
    h.update(&s.disk_size.to_le_bytes());
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&h.finalize().as_bytes()[..16]);
    guid
}

/// The fixed 40 bytes of a snapshot table entry, as stored.
struct RawSnapshotEntry {
    l1_table_offset: u64,
    l1_size: u32,
    id_str_size: u16,
    name_size: u16,
    date_sec: u32,
    date_nsec: u32,
    vm_clock_nsec: u64,
    vm_state_size: u32,
    extra_data_size: u32,
}

impl RawSnapshotEntry {
    fn parse(b: &[u8; SNAPSHOT_ENTRY_FIXED_BYTES as usize]) -> RawSnapshotEntry {
        RawSnapshotEntry {
            l1_table_offset: be_u64(b, 0),
            l1_size: be_u32(b, 8),
            id_str_size: be_u16(b, 12),
            name_size: be_u16(b, 14),
            date_sec: be_u32(b, 16),
            date_nsec: be_u32(b, 20),
            vm_clock_nsec: be_u64(b, 24),
            vm_state_size: be_u32(b, 32),
            extra_data_size: be_u32(b, 36),
        }
    }

    /// Bytes after the fixed part: extra data, id and name.
    fn variable_len(&self) -> u64 {
        u64::from(self.extra_data_size) + u64::from(self.id_str_size) + u64::from(self.name_size)
    }
}

/// Reads the whole snapshot table named by a validated header.
pub(crate) fn read_table(
    file: &File,
    file_len: u64,
    header: &Header,
) -> Result<Vec<Snapshot>, ImageError> {
    let start = header.snapshots_offset;
    let mut snapshots = Vec::new();
    let mut table_len = 0u64;
    for index in 0..header.nb_snapshots {
        let at = start + table_len;
        let fixed = read_checked(file, file_len, "snapshot table entry", at, 40)?;
        let mut b = [0u8; SNAPSHOT_ENTRY_FIXED_BYTES as usize];
        b.copy_from_slice(&fixed);
        let raw = RawSnapshotEntry::parse(&b);
        if raw.extra_data_size > MAX_SNAPSHOT_EXTRA_BYTES {
            return Err(ImageError::SnapshotEntry {
                index,
                offset: at,
                field: "extra_data_size",
                value: raw.extra_data_size.into(),
                limit: MAX_SNAPSHOT_EXTRA_BYTES.into(),
            });
        }
        let entry_len = (SNAPSHOT_ENTRY_FIXED_BYTES + raw.variable_len()).div_ceil(8) * 8;
        table_len += entry_len;
        if table_len > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(ImageError::SnapshotTable {
                offset: start,
                index,
                limit_bytes: MAX_SNAPSHOT_TABLE_BYTES,
            });
        }
        let var = read_checked(
            file,
            file_len,
            "snapshot table entry",
            at + 40,
            raw.variable_len(),
        )?;
        snapshots.push(build(&raw, &var, header, index, at)?);
    }
    Ok(snapshots)
}

/// Builds a snapshot from its fixed fields and its variable part (extra, id, name).
fn build(
    raw: &RawSnapshotEntry,
    var: &[u8],
    header: &Header,
    index: u32,
    at: u64,
) -> Result<Snapshot, ImageError> {
    let extra = &var[..raw.extra_data_size as usize];
    let (id, name) = var[extra.len()..].split_at(usize::from(raw.id_str_size));
    let extra_u64 = |i: usize| extra.get(i..i + 8).map(|b| be_u64(b, 0));
    let disk_size = extra_u64(8).unwrap_or(header.size);
    if disk_size > MAX_VIRTUAL_BYTES {
        return Err(ImageError::SnapshotEntry {
            index,
            offset: at,
            field: "disk_size",
            value: disk_size,
            limit: MAX_VIRTUAL_BYTES,
        });
    }
    Ok(Snapshot {
        // QEMU treats these as opaque bytes; a non-UTF-8 byte shows as U+FFFD.
        id: String::from_utf8_lossy(id).into_owned(),
        name: String::from_utf8_lossy(name).into_owned(),
        l1_table_offset: raw.l1_table_offset,
        l1_size: raw.l1_size,
        date_sec: raw.date_sec,
        date_nsec: raw.date_nsec,
        vm_clock_nsec: raw.vm_clock_nsec,
        vm_state_size: extra_u64(0).unwrap_or(u64::from(raw.vm_state_size)),
        disk_size,
    })
}

/// Index of the snapshot called `name_or_id`: by name first, then by id.
/// A name shared by several snapshots is refused rather than guessed: a replica must never
/// be brought to the wrong one.
pub(crate) fn find(snapshots: &[Snapshot], name_or_id: &str) -> Result<usize, ImageError> {
    let named: Vec<usize> = (0..snapshots.len())
        .filter(|&i| snapshots[i].name == name_or_id)
        .collect();
    match named.as_slice() {
        [i] => Ok(*i),
        [] => snapshots
            .iter()
            .position(|s| s.id == name_or_id)
            .ok_or_else(|| ImageError::NoSuchSnapshot(name_or_id.to_owned())),
        many => {
            let ids: Vec<&str> = many.iter().map(|&i| snapshots[i].id.as_str()).collect();
            Err(ImageError::AmbiguousSnapshot {
                name: name_or_id.to_owned(),
                ids: ids.join(", "),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_shared_by_two_snapshots_is_refused() {
        let snaps = [snap("1", "a"), snap("2", "b"), snap("3", "b")];
        let err = find(&snaps, "b").unwrap_err().to_string();
        assert!(err.contains("ambiguous (ids 2, 3)"), "{err}");
        assert_eq!(find(&snaps, "3").unwrap(), 2);
    }

    fn snap(id: &str, name: &str) -> Snapshot {
        Snapshot {
            id: id.into(),
            name: name.into(),
            l1_table_offset: 0x10000,
            l1_size: 1,
            date_sec: 1_700_000_000,
            date_nsec: 5,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: 1 << 20,
        }
    }

    #[test]
    fn find_prefers_names_over_ids() {
        let list = [snap("1", "2"), snap("2", "b")];
        assert_eq!(find(&list, "2").unwrap(), 0);
        assert_eq!(find(&list, "b").unwrap(), 1);
        assert_eq!(find(&list, "1").unwrap(), 0);
        assert!(matches!(find(&list, "x"), Err(ImageError::NoSuchSnapshot(s)) if s == "x"));
    }

    #[test]
    fn guid_is_stable_and_covers_identity_fields() {
        let a = snap("1", "mon");
        // Frozen: changing the derivation changes every replica's identity.
        let mut h = blake3::Hasher::new();
        h.update(b"blkdelta-qcow2-snapshot-v1");
        h.update(&1u64.to_le_bytes());
        h.update(b"1");
        h.update(&3u64.to_le_bytes());
        h.update(b"mon");
        h.update(&1_700_000_000u32.to_le_bytes());
        h.update(&5u32.to_le_bytes());
        h.update(&0u64.to_le_bytes());
        h.update(&(1u64 << 20).to_le_bytes());
        assert_eq!(a.guid()[..], h.finalize().as_bytes()[..16]);
        // id "1" + name "2mon" must not collide with id "12" + name "mon".
        assert_ne!(snap("1", "2mon").guid(), snap("12", "mon").guid());
        let mut b = a.clone();
        b.date_nsec += 1;
        assert_ne!(a.guid(), b.guid());
        // Where the L1 lives is not part of the identity.
        b = a.clone();
        b.l1_table_offset = 0x20000;
        assert_eq!(a.guid(), b.guid());
    }
}
