//! The counting walk: every structure the metadata names, counted cluster by cluster in the
//! order of QEMU's `calculate_refcounts`, and checked on the way (reserved bits, alignment,
//! ranges past the end of the file).
//!
//! ```text
//! header ─► active L1 ─► L2 tables (+1 per reference) ─► data / compressed clusters (+1 per
//!           reference through each L2 reference)
//! snapshot L1s (the same walk), snapshot table, refcount table, bitmap directory ─► bitmap
//! tables ─► bitmap data, refcount blocks
//! ```

use std::fs::File;

use super::counter::{past_end, Counter};
use super::refcounts::{Refcounts, REFT_OFFSET_MASK};
use crate::error::{BitmapProblem, ClusterUse, L1Problem, L2Problem};
use crate::image::qcow2::bitmap::BME_RESERVED_FLAGS;
use crate::image::qcow2::bitmap::{
    read_directory, table_entry, BitmapGeometry, BitmapInfo, TableEntry,
};
use crate::image::qcow2::bytes::{be_u16, be_u32, be_u64, check_table};
use crate::image::qcow2::header::{Header, AUTOCLEAR_BITMAPS, SNAPSHOT_ENTRY_FIXED_BYTES};
use crate::image::qcow2::tables::{
    check_l2_bitmap, classify_cluster, l2_entry_is_compressed, ClusterKind, Geometry,
    L1E_OFFSET_MASK, L1E_RESERVED_MASK, QCOW_OFLAG_COPIED,
};
use crate::image::qcow2::Snapshot;
use crate::image::raw::pread_exact;
use crate::limits::{MAX_L1_BYTES, MAX_SNAPSHOT_TABLE_BYTES};
use crate::ImageError;

/// Reserved bits of a standard cluster descriptor (QEMU's `L2E_STD_RESERVED_MASK`): 1-8 and
/// 56-61.
pub const L2E_STD_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Header offset of l1_table_offset, the pointer to the active L1 table.
const HEADER_L1_FIELD: u64 = 40;
/// Header offset of refcount_table_offset.
const HEADER_REFTABLE_FIELD: u64 = 48;
/// Header offset of snapshots_offset.
const HEADER_SNAPSHOTS_FIELD: u64 = 64;
/// Entries of a table read at once (64 KiB).
const CHUNK_ENTRIES: u64 = 8192;

/// Calls `each(index, entry)` for the `count` big-endian `u64` entries at `offset`, read
/// 64 KiB at a time. The caller has checked that they lie inside the file.
pub(super) fn for_each_entry(
    file: &File,
    offset: u64,
    count: u64,
    mut each: impl FnMut(u64, u64) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let mut buf = vec![0u8; (count.min(CHUNK_ENTRIES) * 8) as usize];
    let mut index = 0;
    while index < count {
        let n = (count - index).min(CHUNK_ENTRIES);
        let chunk = &mut buf[..(n * 8) as usize];
        pread_exact(file, chunk, offset + index * 8)?;
        for (j, raw) in chunk.chunks_exact(8).enumerate() {
            each(index + j as u64, be_u64(raw, 0))?;
        }
        index += n;
    }
    Ok(())
}

/// Reads the cluster at `offset` (which starts inside the file) into `buf`, zero-filled past
/// the end of the file as QEMU reads it.
pub(super) fn read_cluster(
    file: &File,
    file_len: u64,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ImageError> {
    let present = (buf.len() as u64).min(file_len.saturating_sub(offset)) as usize;
    pread_exact(file, &mut buf[..present], offset)?;
    buf[present..].fill(0);
    Ok(())
}

/// Entry `index` of an L2 table held in `table`: (standard word, subcluster bitmap or 0).
pub(super) fn l2_entry(table: &[u8], index: u64, extended: bool) -> (u64, u64) {
    if extended {
        let at = (index * 16) as usize;
        (be_u64(table, at), be_u64(table, at + 8))
    } else {
        (be_u64(table, (index * 8) as usize), 0)
    }
}

/// The file and header a walk reads.
#[derive(Clone, Copy)]
pub(super) struct Image<'a> {
    pub(super) file: &'a File,
    pub(super) file_len: u64,
    pub(super) header: &'a Header,
}

impl Image<'_> {
    pub(super) fn geometry(&self) -> Geometry {
        self.header.geometry()
    }

    pub(super) fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }
}

/// The counting walk over one image.
pub(super) struct Walk<'a> {
    image: Image<'a>,
    pub(super) counter: Counter,
    /// The L2 table being walked (one cluster).
    l2: Vec<u8>,
}

impl<'a> Walk<'a> {
    pub(super) fn new(image: Image<'a>, counter: Counter) -> Self {
        Walk {
            image,
            counter,
            l2: vec![0; image.cluster_size() as usize],
        }
    }

    /// Counts everything QEMU's `calculate_refcounts` counts, in its order.
    pub(super) fn count_all(
        &mut self,
        snapshots: &[Snapshot],
        refcounts: &Refcounts,
    ) -> Result<(), ImageError> {
        let h = self.image.header;
        let cs = self.image.cluster_size();
        self.counter.add(0, cs, ClusterUse::Header, 0)?;
        let active = (h.l1_table_offset, h.l1_size);
        self.count_l1(active, ClusterUse::ActiveL1, HEADER_L1_FIELD)?;
        let (entries, table_len) = snapshot_table_layout(self.image)?;
        for (i, s) in snapshots.iter().enumerate() {
            let referrer = entries.get(i).copied().unwrap_or(HEADER_SNAPSHOTS_FIELD);
            let l1 = (s.l1_table_offset, s.l1_size);
            self.count_l1(l1, ClusterUse::SnapshotL1, referrer)?;
        }
        let table = (h.snapshots_offset, table_len);
        self.counter.add(
            table.0,
            table.1,
            ClusterUse::SnapshotTable,
            HEADER_SNAPSHOTS_FIELD,
        )?;
        let reftable_len = u64::from(h.refcount_table_clusters) * cs;
        self.counter.add(
            h.refcount_table_offset,
            reftable_len,
            ClusterUse::RefcountTable,
            HEADER_REFTABLE_FIELD,
        )?;
        self.count_bitmaps()?;
        self.count_refcount_blocks(refcounts)
    }

    /// Counts an L1 table of `l1_size` entries at `offset`, its L2 tables and their clusters.
    /// QEMU counts nothing for an empty table.
    fn count_l1(
        &mut self,
        (offset, l1_size): (u64, u32),
        what: ClusterUse,
        referrer: u64,
    ) -> Result<(), ImageError> {
        if l1_size == 0 {
            return Ok(());
        }
        let name = match what {
            ClusterUse::ActiveL1 => "active L1 table",
            _ => "snapshot L1 table",
        };
        let (cs, file_len) = (self.image.cluster_size(), self.image.file_len);
        let bytes = u64::from(l1_size) * 8;
        if bytes > MAX_L1_BYTES {
            return Err(ImageError::TableTooLarge {
                what: name,
                offset,
                entries: l1_size.into(),
                limit_bytes: MAX_L1_BYTES,
            });
        }
        check_table(name, offset, bytes, cs, file_len)?;
        self.counter.add(offset, bytes, what, referrer)?;
        let file = self.image.file;
        for_each_entry(file, offset, l1_size.into(), |index, entry| {
            self.count_l1_entry(offset, index, entry)
        })
    }

    fn count_l1_entry(
        &mut self,
        table_offset: u64,
        index: u64,
        entry: u64,
    ) -> Result<(), ImageError> {
        if entry == 0 {
            return Ok(());
        }
        let bad = |problem| ImageError::L1Entry {
            table_offset,
            index,
            entry,
            problem,
        };
        let (cs, file_len) = (self.image.cluster_size(), self.image.file_len);
        let bits = entry & L1E_RESERVED_MASK;
        if bits != 0 {
            return Err(bad(L1Problem::ReservedBits { bits }));
        }
        let l2 = entry & L1E_OFFSET_MASK;
        if l2 & (cs - 1) != 0 {
            let cluster_size = cs;
            return Err(bad(L1Problem::UnalignedL2 {
                offset: l2,
                cluster_size,
            }));
        }
        if past_end(l2, cs, file_len, cs) {
            return Err(bad(L1Problem::L2PastEnd {
                offset: l2,
                file_len,
            }));
        }
        let referrer = table_offset + index * 8;
        self.counter.add(l2, cs, ClusterUse::L2Table, referrer)?;
        self.count_l2(l2)
    }

    /// Counts the clusters one reference to the L2 table at `offset` names.
    fn count_l2(&mut self, offset: u64) -> Result<(), ImageError> {
        let image = self.image;
        read_cluster(image.file, image.file_len, offset, &mut self.l2)?;
        let g = image.geometry();
        let entry_bytes = if g.extended_l2 { 16 } else { 8 };
        for index in 0..g.l2_entries {
            let (word, bitmap) = l2_entry(&self.l2, index, g.extended_l2);
            if word == 0 && bitmap == 0 {
                continue;
            }
            let bad = |problem| ImageError::L2Entry {
                table_offset: offset,
                index,
                entry: word,
                problem,
            };
            if let Some((host, len, what)) = l2_entry_range(image, word, bitmap).map_err(bad)? {
                let at = offset + index * entry_bytes;
                self.counter.add(host, len, what, at)?;
            }
        }
        Ok(())
    }

    /// Counts the bitmap directory, tables and data clusters, when the bitmaps extension is
    /// present and autoclear bit 0 says it is consistent. Otherwise QEMU ignores the
    /// extension, and the clusters it names are leaks.
    fn count_bitmaps(&mut self) -> Result<(), ImageError> {
        let image = self.image;
        let h = image.header;
        let Some(ext) = h.bitmaps else {
            return Ok(());
        };
        if h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(());
        }
        // QEMU refuses to open an image whose extension has a non-zero reserved field.
        let reserved_at = ext.offset + 8 + 4;
        let mut reserved = [0u8; 4];
        pread_exact(image.file, &mut reserved, reserved_at)?;
        if reserved != [0; 4] {
            return Err(ImageError::HeaderField {
                field: "bitmaps extension reserved field",
                offset: reserved_at,
                value: u32::from_be_bytes(reserved).into(),
                expected: "0".into(),
            });
        }
        let bitmaps = read_directory(image.file, image.file_len, h)?;
        // The directory offset is the third field of the extension's data.
        let referrer = ext.offset + 8 + 16;
        let dir = (ext.directory_offset, ext.directory_size);
        self.counter
            .add(dir.0, dir.1, ClusterUse::BitmapDirectory, referrer)?;
        for info in &bitmaps {
            self.count_bitmap(info)?;
        }
        Ok(())
    }

    /// Counts one bitmap's table and data clusters, checked like QEMU's `check_dir_entry`
    /// and `check_table_entry`.
    fn count_bitmap(&mut self, info: &BitmapInfo) -> Result<(), ImageError> {
        let image = self.image;
        let (cs, file_len) = (image.cluster_size(), image.file_len);
        if info.flags & BME_RESERVED_FLAGS != 0 || info.extra_data_size != 0 {
            return Err(ImageError::Unsupported(format!(
                "bitmap '{}' has flags {:#x} and {} bytes of extra data (QEMU knows flags 0x3 \
                 and no extra data)",
                info.name, info.flags, info.extra_data_size
            )));
        }
        let (offset, entries) = (info.table_offset, u64::from(info.table_size));
        if offset == 0 {
            return Err(info.error(BitmapProblem::TableAtZero));
        }
        if entries == 0 {
            let disk_size = image.header.size;
            let problem = BitmapProblem::TableTooSmall {
                entries,
                covered: 0,
                disk_size,
            };
            return Err(info.error(problem));
        }
        if !info.in_use {
            check_table_size(info, image)?;
        }
        let len = entries * 8;
        if offset.checked_add(len).is_none_or(|end| end > file_len) {
            let problem = BitmapProblem::TablePastEnd {
                offset,
                len,
                file_len,
            };
            return Err(info.error(problem));
        }
        let referrer = info.entry_offset;
        self.counter
            .add(offset, len, ClusterUse::BitmapTable, referrer)?;
        for_each_entry(image.file, offset, entries, |index, entry| {
            let at = offset + index * 8;
            match table_entry(entry, cs, file_len) {
                Ok(TableEntry::Data(data)) => {
                    self.counter.add(data, cs, ClusterUse::BitmapData, at)
                }
                Ok(_) => Ok(()),
                Err(problem) => Err(info.error(BitmapProblem::TableEntry {
                    index,
                    offset: at,
                    problem,
                })),
            }
        })
    }

    /// Counts every refcount block the refcount table names (checked by `read_refcounts`).
    /// QEMU requires each to be counted exactly once: any other use of its cluster collides.
    fn count_refcount_blocks(&mut self, refcounts: &Refcounts) -> Result<(), ImageError> {
        let cs = self.image.cluster_size();
        for (i, &entry) in refcounts.table().iter().enumerate() {
            let offset = entry & REFT_OFFSET_MASK;
            if offset != 0 {
                let referrer = refcounts.table_offset() + i as u64 * 8;
                self.counter
                    .add(offset, cs, ClusterUse::RefcountBlock, referrer)?;
            }
        }
        Ok(())
    }
}

/// QEMU opens an image only if each bitmap not in use has exactly the table its disk needs
/// (`load_bitmap_data`).
fn check_table_size(info: &BitmapInfo, image: Image<'_>) -> Result<(), ImageError> {
    let h = image.header;
    let geometry = BitmapGeometry::new(h.size, info.granularity_bits, h.cluster_bits)
        .map_err(|problem| info.error(problem))?;
    let (entries, expected) = (u64::from(info.table_size), geometry.table_entries());
    if entries != expected {
        return Err(info.error(BitmapProblem::TableSize {
            entries,
            expected,
            disk_size: h.size,
            granularity: geometry.granularity(),
        }));
    }
    Ok(())
}

/// Checks one L2 entry like QEMU's `check_refcounts_l2`, and gives the host range it uses:
/// (offset, length, use), or `None` for an entry that uses no host cluster.
fn l2_entry_range(
    image: Image<'_>,
    word: u64,
    bitmap: u64,
) -> Result<Option<(u64, u64, ClusterUse)>, L2Problem> {
    let g = image.geometry();
    let (cs, file_len) = (g.cluster_size(), image.file_len);
    if !l2_entry_is_compressed(word) && word & L2E_STD_RESERVED_MASK != 0 {
        let bits = word & L2E_STD_RESERVED_MASK;
        return Err(L2Problem::ReservedBits { bits });
    }
    let kind = classify_cluster(word, g)?;
    let (offset, len, what) = match kind {
        ClusterKind::Compressed { offset, len } => {
            if word & QCOW_OFLAG_COPIED != 0 {
                return Err(L2Problem::CompressedCopied);
            }
            if g.extended_l2 && bitmap != 0 {
                return Err(L2Problem::CompressedBitmap { bitmap });
            }
            (offset, len, ClusterUse::Compressed)
        }
        ClusterKind::Normal(host) | ClusterKind::ZeroAlloc(host) => {
            if g.extended_l2 {
                check_l2_bitmap(kind, bitmap)?;
            }
            (host, cs, ClusterUse::Data)
        }
        ClusterKind::Unallocated | ClusterKind::ZeroPlain => {
            if g.extended_l2 {
                check_l2_bitmap(kind, bitmap)?;
            }
            return Ok(None);
        }
    };
    if past_end(offset, len, file_len, cs) {
        return Err(L2Problem::PastEnd {
            offset,
            len,
            file_len,
        });
    }
    Ok(Some((offset, len, what)))
}

/// Where each snapshot table entry starts, and the table's length as QEMU counts it (up to
/// the end of the last entry, without its padding). Each fixed part is read and checked to lie
/// inside the file; the length is bounded by QEMU's 64 MiB.
fn snapshot_table_layout(image: Image<'_>) -> Result<(Vec<u64>, u64), ImageError> {
    let h = image.header;
    let start = h.snapshots_offset;
    let mut entries = Vec::new();
    let (mut next, mut end) = (start, start);
    for index in 0..h.nb_snapshots {
        let at = next;
        let fixed = SNAPSHOT_ENTRY_FIXED_BYTES;
        if at.checked_add(fixed).is_none_or(|e| e > image.file_len) {
            return Err(ImageError::PastEnd {
                what: "snapshot table entry",
                offset: at,
                len: fixed,
                file_len: image.file_len,
            });
        }
        let mut b = [0u8; SNAPSHOT_ENTRY_FIXED_BYTES as usize];
        pread_exact(image.file, &mut b, at)?;
        let var = u64::from(be_u32(&b, 36)) + u64::from(be_u16(&b, 12)) + u64::from(be_u16(&b, 14));
        end = at + fixed + var;
        if end - start > MAX_SNAPSHOT_TABLE_BYTES {
            return Err(ImageError::SnapshotTable {
                offset: start,
                index,
                limit_bytes: MAX_SNAPSHOT_TABLE_BYTES,
            });
        }
        next = end.div_ceil(8) * 8;
        entries.push(at);
    }
    Ok((entries, end - start))
}
