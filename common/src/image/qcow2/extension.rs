//! Header extensions: after the fixed header fields, inside cluster 0, a list of
//! `u32 type, u32 len, data[len]` records, each padded to a multiple of 8 and ended by type 0.
//! Unknown types are skipped; the ones a reader needs are kept.
//!
//! ```text
//! header_length ──► [type|len|data..pad] [type|len|data..pad] … [0|0] … backing name
//! ```

use super::bytes::{be_u32, be_u64};
use crate::ImageError;

/// Header extension type: end of the list.
pub const EXT_END: u32 = 0;
/// Header extension type: backing file format name.
pub const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
/// Header extension type: feature name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_F857;
/// Header extension type: persistent bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;

/// The bitmaps header extension as stored; checked when the directory is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Offset of the extension's head in cluster 0.
    pub offset: u64,
    /// Length of the extension data (must be 24).
    pub data_len: u32,
    /// Number of bitmaps in the directory.
    pub nb_bitmaps: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory.
    pub directory_offset: u64,
}

/// What the header extension walk found.
#[derive(Default)]
pub(crate) struct Extensions {
    pub(crate) backing_format: Option<String>,
    pub(crate) bitmaps: Option<BitmapsExtension>,
    /// (type, bit, name) from the feature name table.
    pub(crate) feature_names: Vec<(u8, u8, String)>,
}

/// Walks the extension list from `header_length` to the backing name (or the end of
/// cluster 0), like QEMU's `qcow2_read_extensions`. The caller has checked that the backing
/// name starts inside cluster 0.
pub(crate) fn walk_extensions(
    c0: &[u8],
    start: u32,
    backing_offset: u64,
) -> Result<Extensions, ImageError> {
    let end = match usize::try_from(backing_offset) {
        Ok(0) | Err(_) => c0.len(),
        Ok(offset) => offset.min(c0.len()),
    };
    let mut ext = Extensions::default();
    let mut at = start as usize;
    while at < end {
        let past_end = |len: usize| ImageError::ExtensionPastEnd {
            offset: at as u64,
            len: len as u64,
            end: end as u64,
        };
        if end - at < 8 {
            return Err(past_end(8));
        }
        let (kind, len) = (be_u32(c0, at), be_u32(c0, at + 4) as usize);
        if len > end - at - 8 {
            return Err(past_end(8 + len));
        }
        at += 8;
        if kind == EXT_END {
            break;
        }
        record_extension(&mut ext, kind, &c0[at..at + len], at - 8)?;
        at += len.div_ceil(8) * 8;
    }
    Ok(ext)
}

fn record_extension(
    ext: &mut Extensions,
    kind: u32,
    data: &[u8],
    at: usize,
) -> Result<(), ImageError> {
    match kind {
        EXT_BACKING_FORMAT => {
            // QEMU keeps the format in a 16-byte buffer.
            if data.len() >= 16 {
                return Err(ImageError::ExtensionLength {
                    name: "backing format",
                    offset: at as u64,
                    len: data.len() as u64,
                    expected: "at most 15",
                });
            }
            ext.backing_format = Some(String::from_utf8_lossy(data).into_owned());
        }
        EXT_FEATURE_TABLE => {
            ext.feature_names = data
                .chunks_exact(48)
                .map(|e| {
                    let name = e[2..].split(|&c| c == 0).next().unwrap_or_default();
                    (e[0], e[1], String::from_utf8_lossy(name).into_owned())
                })
                .collect();
        }
        EXT_BITMAPS => {
            let field = |i: usize| data.get(i..i + 8).map_or(0, |b| be_u64(b, 0));
            ext.bitmaps = Some(BitmapsExtension {
                offset: at as u64,
                data_len: data.len() as u32,
                nb_bitmaps: data.get(0..4).map_or(0, |b| be_u32(b, 0)),
                directory_size: field(8),
                directory_offset: field(16),
            });
        }
        _ => {}
    }
    Ok(())
}
