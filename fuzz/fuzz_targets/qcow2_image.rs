//! Writes arbitrary bytes to a file in a private tmpfs directory, opens it as a qcow2 image,
//! and exercises everything a sender does with one: the snapshot table, the bitmap
//! directory, every layer's L1 and L2 tables, allocation status and guest reads.
//!
//! The work the target itself does is capped (a bounded number of layers, status calls,
//! reads and L2 tables), so a slow or huge-allocation input points at the library. Where
//! an answer can be checked it is: status runs stay within what was asked, and ranges
//! reported as Zero or Hole read as zeros.
#![no_main]

mod scratch;

use blkdelta_common::image::qcow2::{Layer, Qcow2Image, Qcow2Layer};
use blkdelta_common::image::{Allocation, BlockSource};
use libfuzzer_sys::fuzz_target;

/// Layers opened per input (the active one and the first snapshots).
const MAX_LAYERS: usize = 8;
/// `status` calls per layer.
const MAX_STATUS_CALLS: usize = 64;
/// Bytes read per `read_at` call.
const READ_BYTES: u64 = 64 << 10;
/// L1 entries whose L2 table is read, per layer.
const MAX_L2_READS: usize = 256;

fn exercise_layer(layer: &Qcow2Layer) {
    let size = layer.size();
    let mut runs = Vec::new();
    let mut offset = 0u64;
    for _ in 0..MAX_STATUS_CALLS {
        if offset >= size {
            break;
        }
        let Ok((kind, len)) = layer.status(offset, size - offset) else {
            break;
        };
        assert!(
            len >= 1 && len <= size - offset,
            "status({offset}, {}) gave {len} bytes",
            size - offset
        );
        runs.push((offset, kind, len));
        offset += len;
    }
    let mut buf = vec![0u8; READ_BYTES as usize];
    for &(at, kind, len) in runs.iter().take(8) {
        let n = len.min(READ_BYTES) as usize;
        if layer.read_at(&mut buf[..n], at).is_ok() && kind != Allocation::Data {
            assert!(
                buf[..n].iter().all(|&b| b == 0),
                "{kind:?} run at {at} does not read as zeros"
            );
        }
    }
    for at in [
        size / 2,
        size.saturating_sub(READ_BYTES),
        size.saturating_sub(1),
    ] {
        let n = (size - at).min(READ_BYTES) as usize;
        let _ = layer.read_at(&mut buf[..n], at);
    }
    for &entry in layer.l1().iter().take(MAX_L2_READS) {
        let _ = layer.read_l2(entry);
    }
}

fuzz_target!(|data: &[u8]| {
    let path = &scratch::dir("image").join("img");
    std::fs::write(path, data).expect("write the image");
    let Ok(image) = Qcow2Image::open(path) else {
        return;
    };
    let _ = image.bitmaps();
    let _ = image.bitmaps_consistent();
    if let Some(first) = image.snapshots().first() {
        let _ = image.find_snapshot(&first.name);
        let _ = first.guid();
    }
    if !scratch::backing_is_contained(&image) {
        return;
    }
    let snapshots = (0..image.snapshots().len()).map(Layer::Snapshot);
    for which in std::iter::once(Layer::Active)
        .chain(snapshots)
        .take(MAX_LAYERS)
    {
        if let Ok(layer) = image.layer(which) {
            exercise_layer(&layer);
        }
    }
});
