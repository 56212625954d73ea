//! One persistent bitmap's table and data, read as the sorted, coalesced byte ranges of the
//! disk that the bitmap marks dirty.
//!
//! ```text
//! bitmap table entry (u64):  63..56 reserved | 55..9 data cluster offset | 8..1 reserved | 0
//!   offset 0, bit 0 clear: every bit of this cluster's worth of bitmap is 0 (no cluster)
//!   offset 0, bit 0 set:   every bit is 1 (no cluster)
//!   offset ≠ 0:            a data cluster; bit 0 is reserved
//! table entry i covers bitmap bits [i * cluster_size * 8, (i + 1) * cluster_size * 8)
//! entries = ceil(ceil(ceil(disk_size / gran) / 8) / cluster_size)      (QEMU: exactly)
//! ```
//!
//! The table is read and every entry checked when the bitmap is opened (at most 512 MiB of
//! data, so at most 8 MiB of table); the data is read one cluster at a time while walking,
//! so memory stays bounded whatever the disk size.

use std::sync::Arc;

use super::super::bytes::be_u64;
use super::super::{ImageInner, Qcow2Image};
use super::{
    BitmapInfo, BME_RESERVED_FLAGS, MAX_BITMAP_DATA_BYTES, MAX_GRANULARITY_BITS,
    MIN_GRANULARITY_BITS,
};
use crate::error::{BitmapProblem, TableEntryProblem};
use crate::image::raw::pread_exact;
use crate::limits::MAX_VIRTUAL_BYTES;
use crate::ImageError;

/// Bits 9-55 of a bitmap table entry: the offset of a data cluster.
pub const BME_TABLE_ENTRY_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 0 of a bitmap table entry without a data cluster: all bits of the cluster are set.
pub const BME_TABLE_ENTRY_FLAG_ALL_ONES: u64 = 1;
/// Reserved bits of a bitmap table entry (1-8 and 56-63; bit 0 too when there is an offset).
pub const BME_TABLE_ENTRY_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;

/// What one bitmap table entry says about its cluster's worth of bitmap data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableEntry {
    /// No data cluster: every bit is 0.
    Zeros,
    /// No data cluster: every bit is 1.
    Ones,
    /// The bits are in the data cluster at this host offset.
    Data(u64),
}

/// Classifies a bitmap table entry like QEMU's `check_table_entry`, and checks that its data
/// cluster lies inside a file of `file_len` bytes. The error says what is wrong.
pub fn table_entry(
    entry: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<TableEntry, TableEntryProblem> {
    if entry & BME_TABLE_ENTRY_RESERVED_MASK != 0 {
        return Err(TableEntryProblem::Reserved { entry });
    }
    let offset = entry & BME_TABLE_ENTRY_OFFSET_MASK;
    if offset == 0 {
        return Ok(kind_of(entry));
    }
    if entry & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 {
        return Err(TableEntryProblem::OffsetAndAllOnes { entry });
    }
    if offset & (cluster_size - 1) != 0 {
        return Err(TableEntryProblem::Unaligned {
            offset,
            cluster_size,
        });
    }
    match offset.checked_add(cluster_size) {
        Some(end) if end <= file_len => Ok(TableEntry::Data(offset)),
        _ => Err(TableEntryProblem::PastEnd { offset, file_len }),
    }
}

/// What an entry says, read without checking it (any value maps to one of the three).
fn kind_of(entry: u64) -> TableEntry {
    match entry & BME_TABLE_ENTRY_OFFSET_MASK {
        0 if entry & BME_TABLE_ENTRY_FLAG_ALL_ONES != 0 => TableEntry::Ones,
        0 => TableEntry::Zeros,
        offset => TableEntry::Data(offset),
    }
}

/// How a bitmap's bits map onto a disk: the disk size, the bytes each bit covers and the
/// bits each data cluster holds. Only [`BitmapGeometry::new`] builds one, so every
/// quantity below fits in a `u64`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapGeometry {
    disk_size: u64,
    granularity_bits: u8,
    cluster_bits: u32,
}

impl BitmapGeometry {
    /// Checks the three numbers: a disk of at most 2^56 bytes, granularity_bits 9..=31 and
    /// cluster_bits 9..=21.
    pub fn new(
        disk_size: u64,
        granularity_bits: u8,
        cluster_bits: u32,
    ) -> Result<Self, BitmapProblem> {
        if disk_size > MAX_VIRTUAL_BYTES {
            return Err(BitmapProblem::DiskSize {
                size: disk_size,
                limit: MAX_VIRTUAL_BYTES,
            });
        }
        if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
            return Err(BitmapProblem::Granularity {
                bits: granularity_bits,
                min: MIN_GRANULARITY_BITS,
                max: MAX_GRANULARITY_BITS,
            });
        }
        if !(9..=21).contains(&cluster_bits) {
            return Err(BitmapProblem::ClusterBits { bits: cluster_bits });
        }
        Ok(BitmapGeometry {
            disk_size,
            granularity_bits,
            cluster_bits,
        })
    }

    /// Guest bytes per bit.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// The disk size the bitmap covers.
    pub fn disk_size(&self) -> u64 {
        self.disk_size
    }

    /// Bytes of a data cluster.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Bits of the bitmap: one per granule of the disk, the last one possibly partial.
    pub fn bits(&self) -> u64 {
        self.disk_size.div_ceil(self.granularity())
    }

    /// Bits held by one data cluster (one table entry).
    pub fn bits_per_cluster(&self) -> u64 {
        self.cluster_size() * 8
    }

    /// The bitmap_table_size QEMU requires: the data clusters the bits need.
    pub fn table_entries(&self) -> u64 {
        self.bits().div_ceil(8).div_ceil(self.cluster_size())
    }

    /// The guest byte range `[start, end)` of bits `[first, end)`, clipped to the disk.
    fn byte_range(&self, first: u64, end: u64) -> (u64, u64) {
        let g = self.granularity();
        let clip = |bit: u64| bit.saturating_mul(g).min(self.disk_size);
        (clip(first), clip(end))
    }
}

/// A persistent bitmap whose table has been read and checked: a reader of the byte ranges
/// it marks dirty. Holds the image (and its locks) open.
pub struct DirtyBitmap {
    image: Arc<ImageInner>,
    info: BitmapInfo,
    geometry: BitmapGeometry,
    /// The table entries as stored, each accepted by [`table_entry`].
    table: Vec<u64>,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyBitmap")
            .field("info", &self.info)
            .field("geometry", &self.geometry)
            .finish()
    }
}

impl Qcow2Image {
    /// The directory entry of the bitmap called `name`, or `None` when there is none.
    /// Refuses a directory that names two bitmaps alike (QEMU requires unique names).
    pub fn find_bitmap(&self, name: &str) -> Result<Option<BitmapInfo>, ImageError> {
        let found: Vec<BitmapInfo> = self
            .bitmaps()?
            .into_iter()
            .filter(|b| b.name == name)
            .collect();
        if let [_, second, ..] = &found[..] {
            let count = found.len();
            return Err(second.error(BitmapProblem::DuplicateName { count }));
        }
        Ok(found.into_iter().next())
    }

    /// Reads and checks the table of bitmap `info` (an entry of [`Qcow2Image::bitmaps`]).
    /// Refuses a bitmap whose content cannot be trusted: the image's bitmaps are marked
    /// inconsistent (autoclear bit 0 clear: [`BitmapProblem::Inconsistent`]), the bitmap is in
    /// use (not saved cleanly: [`BitmapProblem::InUse`]), or it
    /// has flags or extra data QEMU does not know. It does not look at the auto flag: a
    /// disabled bitmap is valid, it just stopped recording.
    pub fn dirty_bitmap(&self, info: &BitmapInfo) -> Result<DirtyBitmap, ImageError> {
        check_trustworthy(self, info)?;
        let header = self.header();
        let geometry = BitmapGeometry::new(header.size, info.granularity_bits, header.cluster_bits)
            .map_err(|p| info.error(p))?;
        let table = read_table(&self.inner, info, &geometry)?;
        Ok(DirtyBitmap {
            image: Arc::clone(&self.inner),
            info: info.clone(),
            geometry,
            table,
        })
    }
}

/// The refusals that do not depend on the table: inconsistent, in use, unknown flags.
fn check_trustworthy(image: &Qcow2Image, info: &BitmapInfo) -> Result<(), ImageError> {
    let name = &info.name;
    if info.inconsistent || !image.bitmaps_consistent() {
        return Err(info.error(BitmapProblem::Inconsistent));
    }
    if info.in_use {
        return Err(info.error(BitmapProblem::InUse));
    }
    if info.flags & BME_RESERVED_FLAGS != 0 || info.extra_data_size != 0 {
        return Err(ImageError::Unsupported(format!(
            "bitmap '{name}' has flags {:#x} and {} bytes of extra data (QEMU knows flags \
             0x3 and no extra data)",
            info.flags, info.extra_data_size
        )));
    }
    Ok(())
}

/// Reads the table of `info` after checking its offset and size; then checks every entry.
fn read_table(
    image: &ImageInner,
    info: &BitmapInfo,
    geometry: &BitmapGeometry,
) -> Result<Vec<u64>, ImageError> {
    let cs = geometry.cluster_size();
    let entries = check_table_size(info, geometry)?;
    let (offset, len, file_len) = (info.table_offset, entries * 8, image.file_len);
    if offset & (cs - 1) != 0 {
        let cluster_size = cs;
        return Err(info.error(BitmapProblem::TableUnaligned {
            offset,
            cluster_size,
        }));
    }
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        let problem = BitmapProblem::TablePastEnd {
            offset,
            len,
            file_len,
        };
        return Err(info.error(problem));
    }
    // entries * cs ≤ 512 MiB and cs ≥ 512, so the table is at most 8 MiB.
    let mut raw = vec![0u8; (entries * 8) as usize];
    pread_exact(&image.file, &mut raw, info.table_offset)?;
    let table: Vec<u64> = raw.chunks_exact(8).map(|b| be_u64(b, 0)).collect();
    for (i, &e) in table.iter().enumerate() {
        table_entry(e, cs, file_len).map_err(|problem| {
            info.error(BitmapProblem::TableEntry {
                index: i as u64,
                offset: offset + i as u64 * 8,
                problem,
            })
        })?;
    }
    Ok(table)
}

/// The table's entries, checked like QEMU's `load_bitmap_data`: exactly as many as the disk
/// needs at this granularity, at most 512 MiB of data, and not at offset 0.
fn check_table_size(info: &BitmapInfo, geometry: &BitmapGeometry) -> Result<u64, ImageError> {
    let entries = u64::from(info.table_size);
    if entries != geometry.table_entries() || entries == 0 {
        return Err(info.error(BitmapProblem::TableSize {
            entries,
            expected: geometry.table_entries(),
            disk_size: geometry.disk_size(),
            granularity: geometry.granularity(),
        }));
    }
    let bytes = entries * geometry.cluster_size();
    if bytes > MAX_BITMAP_DATA_BYTES {
        return Err(info.error(BitmapProblem::TableTooLarge {
            entries,
            bytes,
            limit: MAX_BITMAP_DATA_BYTES,
        }));
    }
    if info.table_offset == 0 {
        return Err(info.error(BitmapProblem::TableAtZero));
    }
    Ok(entries)
}

impl DirtyBitmap {
    /// The directory entry this bitmap was opened from.
    pub fn info(&self) -> &BitmapInfo {
        &self.info
    }

    /// How the bits map onto the disk.
    pub fn geometry(&self) -> BitmapGeometry {
        self.geometry
    }

    /// The checked table entries, in order.
    pub fn table(&self) -> impl Iterator<Item = TableEntry> + '_ {
        self.table.iter().map(|&e| kind_of(e))
    }

    /// Calls `visit(offset, len)` for each range of guest bytes the bitmap marks dirty, in
    /// increasing order, coalesced (two ranges never touch) and clipped to the disk size.
    /// Reads one data cluster at a time; stops at the first error `visit` returns.
    pub fn for_each_dirty_range<E: From<ImageError>>(
        &self,
        visit: impl FnMut(u64, u64) -> Result<(), E>,
    ) -> Result<(), E> {
        let file = &self.image.file;
        walk(
            &self.geometry,
            self.table(),
            |offset, buf| pread_exact(file, buf, offset),
            visit,
        )
    }
}

/// Walks the table entries of a bitmap of `geometry`, reading data clusters with `read`, and
/// calls `visit(offset, len)` for each coalesced dirty byte range.
pub(crate) fn walk<E: From<ImageError>>(
    geometry: &BitmapGeometry,
    table: impl IntoIterator<Item = TableEntry>,
    mut read: impl FnMut(u64, &mut [u8]) -> Result<(), ImageError>,
    visit: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let per_cluster = geometry.bits_per_cluster();
    let total = geometry.bits();
    let mut runs = Runs {
        geometry,
        pending: None,
        visit,
    };
    let mut buf = Vec::new();
    for (i, entry) in table.into_iter().enumerate() {
        let first = (i as u64).saturating_mul(per_cluster);
        if first >= total {
            break;
        }
        let nbits = per_cluster.min(total - first);
        match entry {
            TableEntry::Zeros => {}
            TableEntry::Ones => runs.push(first, first + nbits)?,
            TableEntry::Data(offset) => {
                buf.resize(geometry.cluster_size() as usize, 0);
                read(offset, &mut buf)?;
                set_runs(&buf, nbits, |a, b| runs.push(first + a, first + b))?;
            }
        }
    }
    runs.finish()
}

/// Joins runs of dirty bits that touch, and hands each finished run on as a byte range.
struct Runs<'g, F> {
    geometry: &'g BitmapGeometry,
    /// Bits `[first, end)` not yet handed on.
    pending: Option<(u64, u64)>,
    visit: F,
}

impl<F, E> Runs<'_, F>
where
    F: FnMut(u64, u64) -> Result<(), E>,
{
    fn push(&mut self, first: u64, end: u64) -> Result<(), E> {
        match &mut self.pending {
            Some((_, e)) if *e == first => {
                *e = end;
                Ok(())
            }
            _ => match self.pending.replace((first, end)) {
                Some((a, b)) => self.emit(a, b),
                None => Ok(()),
            },
        }
    }

    fn emit(&mut self, first: u64, end: u64) -> Result<(), E> {
        let (start, stop) = self.geometry.byte_range(first, end);
        if stop > start {
            (self.visit)(start, stop - start)?;
        }
        Ok(())
    }

    fn finish(mut self) -> Result<(), E> {
        match self.pending.take() {
            Some((a, b)) => self.emit(a, b),
            None => Ok(()),
        }
    }
}

/// Calls `f(first, end)` for each run of set bits `[first, end)` below bit `nbits` of `data`
/// (bit n is bit n % 8 of byte n / 8, LSB first).
pub(crate) fn set_runs<E>(
    data: &[u8],
    nbits: u64,
    mut f: impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E> {
    let mut at = 0;
    while at < nbits {
        let first = next_bit(data, at, nbits, true);
        if first >= nbits {
            break;
        }
        let end = next_bit(data, first, nbits, false);
        f(first, end)?;
        at = end;
    }
    Ok(())
}

/// The first bit at or after `from`, below `nbits`, that is set (or clear when `set` is
/// false); `nbits` when there is none. Bits past the end of `data` read as 0.
fn next_bit(data: &[u8], from: u64, nbits: u64, set: bool) -> u64 {
    let mut at = from;
    while at < nbits {
        let word = le_word(data, (at / 64) as usize);
        let word = if set { word } else { !word };
        let rest = word >> (at % 64);
        if rest != 0 {
            return (at + u64::from(rest.trailing_zeros())).min(nbits);
        }
        at = (at / 64 + 1) * 64;
    }
    nbits
}

/// Bitmap word `index`: bytes `8 * index ..` as a little-endian u64, so that bit k of the
/// word is bit k % 8 of byte k / 8. Missing bytes read as 0.
fn le_word(data: &[u8], index: usize) -> u64 {
    let mut b = [0u8; 8];
    let start = index.saturating_mul(8).min(data.len());
    let bytes = &data[start..data.len().min(start + 8)];
    b[..bytes.len()].copy_from_slice(bytes);
    u64::from_le_bytes(b)
}
