//! Persistent dirty bitmaps (header extension 0x23852875). This file reads the directory: the
//! list of bitmaps, their flags and where their tables are. [`table`] reads one bitmap's
//! table and data as sorted dirty byte ranges.
//!
//! ```text
//! bitmaps extension ──► directory, one entry per bitmap (each padded to 8):
//!   0  bitmap_table_offset  8  bitmap_table_size  12 flags (bit 0 in_use, bit 1 auto)
//!   16 type (1)  17 granularity_bits  18 name_size  20 extra_data_size  24 extra data, name
//! bitmap table (u64 per data cluster) ──► data cluster | all zeros | all ones
//! data: bit n (byte n/8, bit n%8, LSB first) covers guest bytes [n*gran, (n+1)*gran)
//! ```
//!
//! The layout is QEMU's `docs/interop/qcow2.rst` ("Bitmaps"); QEMU's own checks
//! (`block/qcow2-bitmap.c`) are followed where the text leaves room.

mod table;
#[cfg(test)]
mod tests;

use std::fs::File;

pub use table::{table_entry, BitmapGeometry, DirtyBitmap, TableEntry};

use super::bytes::{be_u16, be_u32, be_u64, check_table};
use super::extension::BitmapsExtension;
use super::header::{Header, AUTOCLEAR_BITMAPS};
use crate::error::{BitmapProblem, DirectoryProblem};
use crate::image::raw::pread_exact;
use crate::limits::{MAX_BITMAPS, MAX_BITMAP_DIRECTORY_BYTES};
use crate::ImageError;

/// Flag bit 0: the bitmap was not saved cleanly; its content is invalid.
pub const BME_FLAG_IN_USE: u32 = 1 << 0;
/// Flag bit 1: the bitmap is enabled and tracks every write.
pub const BME_FLAG_AUTO: u32 = 1 << 1;
/// Flag bits QEMU does not know (it refuses bit 2, extra_data_compatible, too).
pub const BME_RESERVED_FLAGS: u32 = !(BME_FLAG_IN_USE | BME_FLAG_AUTO);
/// The only bitmap type: dirty tracking.
pub const BT_DIRTY_TRACKING_BITMAP: u8 = 1;
/// Smallest granularity_bits QEMU accepts (512 bytes per bit).
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity_bits QEMU accepts (2 GiB per bit).
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Bytes of a directory entry before its extra data and name.
const ENTRY_FIXED_BYTES: usize = 24;
/// Longest bitmap name QEMU accepts.
const MAX_NAME_BYTES: u16 = 1023;
/// Largest bitmap data QEMU accepts (`BME_MAX_PHYS_SIZE`).
pub const MAX_BITMAP_DATA_BYTES: u64 = 512 << 20;

/// One entry of the bitmap directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BitmapInfo {
    /// The bitmap's name.
    pub name: String,
    /// Each bit covers `1 << granularity_bits` guest bytes.
    pub granularity_bits: u8,
    /// The content must not be trusted, as QEMU sees it: flag bit 0 (in_use) is set, because
    /// the bitmap was not saved cleanly, or every bitmap of the image is
    /// [`inconsistent`](BitmapInfo::inconsistent). `flags` keeps the bit as stored.
    pub in_use: bool,
    /// Autoclear bit 0 of the header is clear: a program that does not maintain bitmaps
    /// wrote to the image, so QEMU holds all its bitmaps inconsistent (and drops them).
    pub inconsistent: bool,
    /// Flag bit 1: enabled (tracks writes).
    pub auto: bool,
    /// Offset of the bitmap table.
    pub table_offset: u64,
    /// Entries of the bitmap table.
    pub table_size: u32,
    /// All flag bits as stored.
    pub flags: u32,
    /// Bytes of extra data before the name (QEMU writes none and refuses a bitmap with some).
    pub extra_data_size: u32,
    /// Offset of its directory entry in the file.
    pub entry_offset: u64,
}

impl BitmapInfo {
    /// The error of this bitmap that has `problem`.
    pub(crate) fn error(&self, problem: BitmapProblem) -> ImageError {
        ImageError::Bitmap {
            name: self.name.clone(),
            entry_offset: self.entry_offset,
            problem,
        }
    }
}

/// Reads and checks the bitmap directory that the header's extension names.
pub(crate) fn read_directory(
    file: &File,
    file_len: u64,
    header: &Header,
) -> Result<Vec<BitmapInfo>, ImageError> {
    let Some(ext) = header.bitmaps else {
        return Ok(Vec::new());
    };
    check_extension(&ext, header, file_len)?;
    let mut dir = vec![0u8; ext.directory_size as usize];
    pread_exact(file, &mut dir, ext.directory_offset)?;
    let dir_error = |problem| ImageError::BitmapDirectory {
        offset: ext.directory_offset,
        problem,
    };
    let nb_bitmaps = ext.nb_bitmaps;
    let mut bitmaps = Vec::new();
    let mut at = 0usize;
    while at < dir.len() {
        if bitmaps.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(dir_error(DirectoryProblem::TooManyEntries { nb_bitmaps }));
        }
        let entry_offset = ext.directory_offset + at as u64;
        let (name, len) = entry_name(&dir[at..], entry_offset).map_err(dir_error)?;
        bitmaps.push(parse_entry(&dir[at..], header, name, entry_offset)?);
        at += len;
    }
    if bitmaps.len() as u64 != u64::from(nb_bitmaps) {
        let found = bitmaps.len() as u64;
        return Err(dir_error(DirectoryProblem::Count { found, nb_bitmaps }));
    }
    Ok(bitmaps)
}

fn check_extension(
    ext: &BitmapsExtension,
    header: &Header,
    file_len: u64,
) -> Result<(), ImageError> {
    if ext.data_len != 24 {
        return Err(ImageError::ExtensionLength {
            name: "bitmaps",
            offset: ext.offset,
            len: ext.data_len.into(),
            expected: "24",
        });
    }
    let dir_error = |problem| ImageError::BitmapDirectory {
        offset: ext.directory_offset,
        problem,
    };
    if ext.nb_bitmaps == 0 || ext.nb_bitmaps > MAX_BITMAPS {
        return Err(dir_error(DirectoryProblem::NbBitmaps {
            nb_bitmaps: ext.nb_bitmaps,
            max: MAX_BITMAPS,
        }));
    }
    let min_size = u64::from(ext.nb_bitmaps) * ENTRY_FIXED_BYTES as u64;
    if ext.directory_size > MAX_BITMAP_DIRECTORY_BYTES || ext.directory_size < min_size {
        return Err(dir_error(DirectoryProblem::Size {
            size: ext.directory_size,
            min: min_size,
            max: MAX_BITMAP_DIRECTORY_BYTES,
        }));
    }
    check_table(
        "bitmap directory",
        ext.directory_offset,
        ext.directory_size,
        header.cluster_size(),
        file_len,
    )
}

/// Parses the entry at the start of `b` (found at file offset `at`), whose name
/// [`entry_name`] has read, so that errors can name the bitmap.
fn parse_entry(b: &[u8], header: &Header, name: String, at: u64) -> Result<BitmapInfo, ImageError> {
    let (kind, granularity_bits) = (b[16], b[17]);
    if kind != BT_DIRTY_TRACKING_BITMAP {
        return Err(ImageError::Unsupported(format!(
            "bitmap '{name}' has type {kind} (only type 1, dirty tracking, exists)"
        )));
    }
    let flags = be_u32(b, 12);
    let inconsistent = header.autoclear_features & AUTOCLEAR_BITMAPS == 0;
    let info = BitmapInfo {
        name,
        granularity_bits,
        in_use: flags & BME_FLAG_IN_USE != 0 || inconsistent,
        inconsistent,
        auto: flags & BME_FLAG_AUTO != 0,
        table_offset: be_u64(b, 0),
        table_size: be_u32(b, 8),
        flags,
        extra_data_size: be_u32(b, 20),
        entry_offset: at,
    };
    if !(MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&granularity_bits) {
        return Err(info.error(BitmapProblem::Granularity {
            bits: granularity_bits,
            min: MIN_GRANULARITY_BITS,
            max: MAX_GRANULARITY_BITS,
        }));
    }
    check_bitmap_table(&info, header).map_err(|p| info.error(p))?;
    Ok(info)
}

/// The name of the entry at the start of `b` (at file offset `at`), and the entry's padded
/// length.
fn entry_name(b: &[u8], at: u64) -> Result<(String, usize), DirectoryProblem> {
    if b.len() < ENTRY_FIXED_BYTES {
        return Err(DirectoryProblem::ShortEntry {
            entry_offset: at,
            left: b.len() as u64,
            needed: ENTRY_FIXED_BYTES as u64,
        });
    }
    let name_size = be_u16(b, 18);
    let extra = be_u32(b, 20) as usize;
    if name_size == 0 || name_size > MAX_NAME_BYTES {
        return Err(DirectoryProblem::NameSize {
            entry_offset: at,
            name_size,
            max: MAX_NAME_BYTES,
        });
    }
    let name_size = usize::from(name_size);
    let len = (ENTRY_FIXED_BYTES + extra + name_size).div_ceil(8) * 8;
    if len > b.len() {
        return Err(DirectoryProblem::EntryPastEnd {
            entry_offset: at,
            len: len as u64,
        });
    }
    let name_at = ENTRY_FIXED_BYTES + extra;
    let name = String::from_utf8_lossy(&b[name_at..name_at + name_size]).into_owned();
    Ok((name, len))
}

/// Checks the table's alignment and size like QEMU's `check_dir_entry`: at most 512 MiB of
/// bitmap data, and (for a bitmap whose in_use flag is clear) enough of it to cover the disk.
fn check_bitmap_table(info: &BitmapInfo, header: &Header) -> Result<(), BitmapProblem> {
    let cs = header.cluster_size();
    if info.table_offset & (cs - 1) != 0 {
        return Err(BitmapProblem::TableUnaligned {
            offset: info.table_offset,
            cluster_size: cs,
        });
    }
    let entries = u64::from(info.table_size);
    let phys = entries * cs;
    if phys > MAX_BITMAP_DATA_BYTES {
        return Err(BitmapProblem::TableTooLarge {
            entries,
            bytes: phys,
            limit: MAX_BITMAP_DATA_BYTES,
        });
    }
    // phys * 8 bits of 2^granularity bytes each; saturate: huge coverage is always enough.
    let covered = (phys * 8).checked_shl(u32::from(info.granularity_bits));
    let covered = covered
        .filter(|c| c >> info.granularity_bits == phys * 8)
        .unwrap_or(u64::MAX);
    if info.flags & BME_FLAG_IN_USE == 0 && covered < header.size {
        return Err(BitmapProblem::TableTooSmall {
            entries,
            covered,
            disk_size: header.size,
        });
    }
    Ok(())
}
