//! Writes arbitrary bytes to a file in a private tmpfs directory, opens it as a qcow2 image and
//! reads its persistent dirty bitmaps the way `send --bitmap NAME` does: the directory, each
//! bitmap's table and data, then the send source itself over the active layer.
//!
//! What can be checked is: a directory entry the reader accepts has the fields it checked; a
//! bitmap's table has the entries its geometry needs; the dirty ranges are non-empty, in
//! order, apart (coalesced) and within the disk, and are the ranges a bit-by-bit model of the
//! table and data (read from the input itself) gives; `send --bitmap` accepts the bitmaps the
//! reader accepts and pushes extents that cover exactly the dirty ranges.
//!
//! The work the target does per input is capped (bitmaps, ranges, extents, model bits), so a
//! slow or huge-allocation input points at the library.
#![no_main]

mod scratch;

use std::path::Path;

use blkdelta_common::extent::{Extent, ExtentSink, Visit};
use blkdelta_common::image::qcow2::{BitmapInfo, DirtyBitmap, Layer, Qcow2Image, TableEntry};
use blkdelta_common::ImageError;
use blkdelta_send::source::{open_source_opts, SourceOptions};
use libfuzzer_sys::fuzz_target;

/// Bitmaps read per input.
const MAX_BITMAPS: usize = 8;
/// Dirty ranges (and extents) collected per bitmap; the walk is stopped past them.
const MAX_RANGES: usize = 1 << 14;
/// Bits of data clusters the model reads one by one per bitmap.
const MAX_MODEL_BITS: u64 = 1 << 22;
/// A refusal's message is one line for a person to read; anything near this is a bug.
const MAX_MESSAGE_BYTES: usize = 16 << 10;

fn check_message(err: &dyn std::fmt::Display) {
    let message = err.to_string();
    assert!(!message.is_empty());
    assert!(
        message.len() <= MAX_MESSAGE_BYTES,
        "a message of {} bytes",
        message.len()
    );
}

/// What the directory reader checked of an entry it accepted.
fn check_entry(image: &Qcow2Image, info: &BitmapInfo) {
    assert!(!info.name.is_empty() && info.name.len() <= 4 * 1023);
    assert!((9..=31).contains(&info.granularity_bits), "{info:?}");
    let cluster_size = 1u64 << image.cluster_bits();
    assert_eq!(info.table_offset % cluster_size, 0, "{info:?}");
    assert_eq!(info.inconsistent, !image.bitmaps_consistent());
    assert_eq!(info.in_use, info.flags & 1 != 0 || info.inconsistent);
    assert_eq!(info.auto, info.flags & 2 != 0);
}

/// Why a walk stopped early.
enum Stop {
    Image(ImageError),
    Full,
}

impl From<ImageError> for Stop {
    fn from(e: ImageError) -> Self {
        Stop::Image(e)
    }
}

/// The first dirty ranges of `bitmap`, checked as they come; `None` when reading failed.
fn dirty_ranges(bitmap: &DirtyBitmap) -> Option<(Vec<(u64, u64)>, bool)> {
    let size = bitmap.geometry().disk_size();
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    let walk = bitmap.for_each_dirty_range(|offset, len| {
        assert!(len > 0, "an empty range at {offset}");
        let end = offset.checked_add(len).expect("range end overflows");
        assert!(end <= size, "{offset}+{len} ends past the disk ({size})");
        if let Some(&(_, last_end)) = ranges.last() {
            assert!(
                last_end < offset,
                "{offset}+{len} touches or precedes {last_end}"
            );
        }
        if ranges.len() == MAX_RANGES {
            return Err(Stop::Full);
        }
        ranges.push((offset, end));
        Ok(())
    });
    match walk {
        Ok(()) => Some((ranges, true)),
        Err(Stop::Full) => Some((ranges, false)),
        Err(Stop::Image(e)) => {
            check_message(&e);
            None
        }
    }
}

/// The dirty ranges, read bit by bit from the input; `None` when that is too much work.
fn model_ranges(bitmap: &DirtyBitmap, data: &[u8]) -> Option<Vec<(u64, u64)>> {
    let g = bitmap.geometry();
    let (per_cluster, bits, gran) = (g.bits_per_cluster(), g.bits(), g.granularity());
    let entries: Vec<TableEntry> = bitmap.table().collect();
    let data_bits = entries
        .iter()
        .filter(|e| matches!(e, TableEntry::Data(_)))
        .count() as u64
        * per_cluster;
    if data_bits > MAX_MODEL_BITS {
        return None;
    }
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut push = |first_bit: u64, end_bit: u64| {
        let start = first_bit * gran;
        let end = end_bit.saturating_mul(gran).min(g.disk_size());
        match out.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => out.push((start, end)),
        }
    };
    for (i, entry) in entries.iter().enumerate() {
        let first = i as u64 * per_cluster;
        if first >= bits {
            break;
        }
        let end = (first + per_cluster).min(bits);
        match *entry {
            TableEntry::Zeros => {}
            TableEntry::Ones => push(first, end),
            TableEntry::Data(offset) => {
                let cluster = &data[offset as usize..][..g.cluster_size() as usize];
                for bit in first..end {
                    let n = bit - first;
                    if cluster[(n / 8) as usize] & (1 << (n % 8)) != 0 {
                        push(bit, bit + 1);
                    }
                }
            }
        }
    }
    out.truncate(MAX_RANGES);
    Some(out)
}

fn check_bitmap(image: &Qcow2Image, info: &BitmapInfo, bitmap: &DirtyBitmap, data: &[u8]) {
    let g = bitmap.geometry();
    assert_eq!(bitmap.info(), info);
    assert_eq!(g.disk_size(), image.virtual_size());
    assert_eq!(g.granularity(), 1 << info.granularity_bits);
    assert_eq!(g.cluster_size(), 1 << image.cluster_bits());
    assert_eq!(g.table_entries(), u64::from(info.table_size));
    assert_eq!(bitmap.table().count() as u64, g.table_entries());
    let Some((ranges, _)) = dirty_ranges(bitmap) else {
        return;
    };
    if let Some(model) = model_ranges(bitmap, data) {
        assert_eq!(
            ranges, model,
            "dirty ranges differ from the bit-by-bit model"
        );
    }
}

/// Keeps the first extents pushed, then stops the walk (and says it did).
#[derive(Default)]
struct Capped(Vec<Extent>, bool);

impl ExtentSink for Capped {
    fn push(&mut self, extent: Extent) -> Result<Visit, ImageError> {
        if self.0.len() == MAX_RANGES {
            self.1 = true;
            return Ok(Visit::Stop);
        }
        self.0.push(extent);
        Ok(Visit::Continue)
    }
}

/// `send --bitmap NAME` on the image: accepted exactly when the reader accepted the bitmap,
/// and pushing extents that cover exactly the dirty ranges.
fn check_send(path: &Path, image: &Qcow2Image, info: &BitmapInfo, direct: Option<&DirtyBitmap>) {
    let opts = SourceOptions {
        bitmap: Some(info.name.clone()),
        allow_disabled: true,
        ..SourceOptions::default()
    };
    let source = open_source_opts(path.to_str().expect("a UTF-8 path"), &opts);
    let opens = direct.is_some() && image.layer(Layer::Active).is_ok();
    let source = match source {
        Ok(s) => s,
        Err(e) => {
            assert!(
                !opens,
                "send --bitmap refuses a bitmap the reader reads: {e}"
            );
            check_message(&e);
            return;
        }
    };
    let bitmap = direct.expect("send --bitmap accepts a bitmap the reader refuses");
    let size = image.virtual_size();
    assert_eq!(source.transitions()[0].virtual_size, size);
    let mut sink = Capped::default();
    let complete = match source.changes(0, &mut sink) {
        Ok(()) => !sink.1,
        Err(e) => {
            check_message(&e);
            false
        }
    };
    let extents = sink.0;
    for w in extents.windows(2) {
        assert!(w[0].end() <= w[1].offset, "{:?} and {:?}", w[0], w[1]);
    }
    for e in &extents {
        assert!(
            e.len > 0 && e.end() <= size,
            "{e:?} outside the disk ({size})"
        );
    }
    let Some((ranges, all)) = dirty_ranges(bitmap) else {
        return;
    };
    if complete && all {
        // Extents of different kinds touch; joined, they are the dirty ranges.
        let mut joined: Vec<(u64, u64)> = Vec::new();
        for e in &extents {
            match joined.last_mut() {
                Some(last) if last.1 == e.offset => last.1 = e.end(),
                _ => joined.push((e.offset, e.end())),
            }
        }
        assert_eq!(
            joined, ranges,
            "the extents send pushes are not the dirty ranges"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let path = &scratch::dir("bitmaps").join("img");
    std::fs::write(path, data).expect("write the image");
    let image = match Qcow2Image::open(path) {
        Ok(image) => image,
        Err(e) => return check_message(&e),
    };
    let list = match image.bitmaps() {
        Ok(list) => list,
        Err(e) => return check_message(&e),
    };
    for info in list.iter().take(MAX_BITMAPS) {
        check_entry(&image, info);
        let unique = match image.find_bitmap(&info.name) {
            Ok(found) => {
                assert_eq!(found.as_ref(), Some(info), "find_bitmap of a listed name");
                true
            }
            Err(e) => {
                check_message(&e);
                false
            }
        };
        let bitmap = match image.dirty_bitmap(info) {
            Ok(bitmap) => {
                check_bitmap(&image, info, &bitmap, data);
                Some(bitmap)
            }
            Err(e) => {
                check_message(&e);
                None
            }
        };
        // send finds the bitmap by name: only a unique name names this entry.
        if unique && scratch::backing_is_contained(&image) {
            check_send(path, &image, info, bitmap.as_ref());
        }
    }
});
