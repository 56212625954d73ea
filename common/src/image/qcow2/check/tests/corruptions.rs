//! One corruption per test, patched into an image qemu made: the check must give the expected
//! error or report, and qemu-img check a matching verdict (2: corruptions, 3: leaks).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{
    active_l2_entry, assert_consistent, check_image, qemu_img, qemu_io, qemu_mismatches,
    qemu_verdict, read_u64, snapshot, write_u64, Scratch,
};
use crate::error::{ClusterUse, L1Problem, L2Problem, RefcountTableProblem};
use crate::image::qcow2::check::{read_refcounts, EntryTable, RefcountMismatch};
use crate::image::qcow2::header::{AUTOCLEAR_BITMAPS, INCOMPAT_CORRUPT};
use crate::image::qcow2::tables::{L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED};
use crate::image::qcow2::Qcow2Image;
use crate::testing::have;
use crate::ImageError;

const CS: u64 = 65536;
/// Header offsets of the fields patched here.
const L1_TABLE_OFFSET: u64 = 40;
const REFCOUNT_TABLE_OFFSET: u64 = 48;
const INCOMPATIBLE_FEATURES: u64 = 72;
const AUTOCLEAR_FEATURES: u64 = 88;

/// A 64 KiB-cluster image with 16-bit refcounts and data in guest clusters 0, 1 and 16,
/// checked clean before it is patched.
fn image(s: &Scratch, name: &str) -> PathBuf {
    let img = s.create(name, "64M", "");
    qemu_io(&img, &["write -P 1 0 128k", "write -P 2 1M 64k"]);
    assert_consistent(&img);
    img
}

/// Sets the 16-bit refcount of host cluster `cluster`.
fn set_refcount(img: &Path, cluster: u64, value: u16) {
    let image = Qcow2Image::open(img).unwrap();
    let file = std::fs::File::open(img).unwrap();
    let rc = read_refcounts(&file, image.file_len(), image.header()).unwrap();
    assert_eq!(rc.refcount_bits(), 16);
    let block = rc.table()[(cluster / rc.block_entries()) as usize];
    let at = block + (cluster % rc.block_entries()) * 2;
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &value.to_be_bytes(), at).unwrap();
}

/// Asserts qemu-img check's exit status on `img`.
#[track_caller]
fn assert_qemu_says(img: &Path, expected: i32) -> String {
    let (status, text) = qemu_verdict(img);
    assert_eq!(status, expected, "qemu-img check:\n{text}");
    text
}

/// The check's error for `img`.
#[track_caller]
fn check_error(img: &Path) -> ImageError {
    match check_image(img) {
        Ok(report) => panic!("expected an error, got {report:?}"),
        Err(e) => e,
    }
}

#[test]
fn an_image_marked_corrupt_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "corrupt.qcow2");
    let bits = read_u64(&img, INCOMPATIBLE_FEATURES);
    write_u64(&img, INCOMPATIBLE_FEATURES, bits | INCOMPAT_CORRUPT);
    let err = check_error(&img);
    assert!(matches!(err, ImageError::MarkedCorrupt), "{err}");
    assert!(err.to_string().contains("marked corrupt"), "{err}");
    // qemu-img check finds nothing else wrong, but qemu refuses to write.
    assert_qemu_says(&img, 0);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 512"])
        .arg(&img)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(text.contains("Image is corrupt"), "{text}");
}

#[test]
fn a_refcount_lowered_to_zero_is_an_error() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "low.qcow2");
    let host = active_l2_entry(&img, 1).1 & L2E_OFFSET_MASK;
    set_refcount(&img, host / CS, 0);
    let err = check_error(&img);
    assert!(
        matches!(err, ImageError::RefcountTooLow { cluster, offset, stored: 0, computed: 1 }
            if cluster == host / CS && offset == host),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    let line = format!("ERROR cluster {} refcount=0 reference=1", host / CS);
    assert!(text.contains(&line), "{text}");
}

#[test]
fn a_data_cluster_inside_the_refcount_table_is_an_overlap() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "overlap.qcow2");
    let reftable = read_u64(&img, REFCOUNT_TABLE_OFFSET);
    let (at, _) = active_l2_entry(&img, 0);
    write_u64(&img, at, QCOW_OFLAG_COPIED | reftable);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::ClusterOverlap {
                first: ClusterUse::Data,
                second: ClusterUse::RefcountTable,
                referrer: REFCOUNT_TABLE_OFFSET,
                offset,
                ..
            } if offset == reftable
        ),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("is used as a data cluster and as the refcount table"),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    let line = format!("ERROR cluster {} refcount=1 reference=2", reftable / CS);
    assert!(text.contains(&line), "{text}");
}

#[test]
fn an_l1_entry_past_the_end_is_an_error() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "l1-past-end.qcow2");
    let l1 = read_u64(&img, L1_TABLE_OFFSET);
    let entry = QCOW_OFLAG_COPIED | (1 << 40);
    write_u64(&img, l1, entry);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::L1Entry {
                index: 0,
                entry: e,
                problem: L1Problem::L2PastEnd { offset: 0x100_0000_0000, .. },
                ..
            } if e == entry
        ),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    assert!(text.contains("exceeding the end of the file"), "{text}");
}

/// An image whose guest clusters 0 and 1 are shared with snapshot s1.
fn shared_image(s: &Scratch, name: &str) -> PathBuf {
    let img = image(s, name);
    snapshot(&img, "-c", "s1");
    assert_consistent(&img);
    img
}

#[test]
fn copied_on_a_shared_data_cluster_is_an_error() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = shared_image(&s, "copied-data.qcow2");
    let (at, entry) = active_l2_entry(&img, 1);
    assert_eq!(entry & QCOW_OFLAG_COPIED, 0);
    write_u64(&img, at, entry | QCOW_OFLAG_COPIED);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::L2Entry {
                index: 1,
                problem: L2Problem::CopiedShared { refcount: 2 },
                ..
            }
        ),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    assert!(text.contains("ERROR OFLAG_COPIED data cluster"), "{text}");
}

#[test]
fn copied_on_a_shared_l2_table_is_an_error() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = shared_image(&s, "copied-l2.qcow2");
    let l1 = read_u64(&img, L1_TABLE_OFFSET);
    let entry = read_u64(&img, l1);
    write_u64(&img, l1, entry | QCOW_OFLAG_COPIED);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::L1Entry {
                index: 0,
                problem: L1Problem::CopiedShared { refcount: 2 },
                ..
            }
        ),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    assert!(text.contains("ERROR OFLAG_COPIED L2 cluster"), "{text}");
}

#[test]
fn a_raised_refcount_is_a_leak() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "leak.qcow2");
    // The header cluster: no COPIED flag summarizes its refcount.
    set_refcount(&img, 0, 2);
    let report = check_image(&img).unwrap();
    let leak = RefcountMismatch {
        cluster: 0,
        stored: 2,
        computed: 1,
    };
    assert_eq!(report.leaks().collect::<Vec<_>>(), [leak]);
    assert_eq!((report.leaked_clusters, report.is_clean()), (1, false));
    let text = assert_qemu_says(&img, 3);
    assert_eq!(qemu_mismatches(&text), [leak], "{text}");
}

#[test]
fn copied_missing_at_refcount_one_is_reported_for_repair() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "copied-missing.qcow2");
    let (at, entry) = active_l2_entry(&img, 16);
    write_u64(&img, at, entry & !QCOW_OFLAG_COPIED);
    let report = check_image(&img).unwrap();
    assert_eq!(report.copied_mismatches_total, 1);
    let m = report.copied_mismatches[0];
    assert_eq!(
        (m.table, m.index, m.entry_offset, m.fixed_entry()),
        (EntryTable::L2, 16, at, entry)
    );
    assert_eq!(report.leaked_clusters, 0);
    // qemu-img counts the missing flag among corruptions; it only makes writes copy.
    let text = assert_qemu_says(&img, 2);
    assert!(text.contains("ERROR OFLAG_COPIED data cluster"), "{text}");
    write_u64(&img, m.entry_offset, m.fixed_entry());
    assert_consistent(&img);
}

#[test]
fn a_compressed_cluster_with_copied_is_an_error() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "compressed-copied.qcow2");
    qemu_io(&img, &["write -c -P 3 2M 64k"]);
    let (at, entry) = active_l2_entry(&img, 32);
    assert_ne!(entry & QCOW_OFLAG_COMPRESSED, 0);
    write_u64(&img, at, entry | QCOW_OFLAG_COPIED);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::L2Entry {
                index: 32,
                problem: L2Problem::CompressedCopied,
                ..
            }
        ),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    assert!(text.contains("copied flag must never be set"), "{text}");
}

#[test]
fn reserved_bits_of_an_l2_entry_are_an_error() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "l2-reserved.qcow2");
    let (at, entry) = active_l2_entry(&img, 0);
    write_u64(&img, at, entry | 0x2);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::L2Entry {
                index: 0,
                problem: L2Problem::ReservedBits { bits: 0x2 },
                ..
            }
        ),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    assert!(text.contains("reserved bits set"), "{text}");
}

#[test]
fn a_refcount_block_on_the_l1_table_is_an_overlap() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "refblock-on-l1.qcow2");
    let reftable = read_u64(&img, REFCOUNT_TABLE_OFFSET);
    let l1 = read_u64(&img, L1_TABLE_OFFSET);
    // Entry 1 covers clusters past the end of the file, so only its placement matters.
    write_u64(&img, reftable + 8, l1);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::ClusterOverlap {
                first: ClusterUse::ActiveL1,
                second: ClusterUse::RefcountBlock,
                referrer,
                ..
            } if referrer == reftable + 8
        ),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    assert!(text.contains("ERROR refcount block 1 refcount=2"), "{text}");
}

#[test]
fn an_unaligned_refcount_block_is_an_error() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "refblock-unaligned.qcow2");
    let reftable = read_u64(&img, REFCOUNT_TABLE_OFFSET);
    write_u64(&img, reftable + 8, CS + 512);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::RefcountTableEntry {
                index: 1,
                problem: RefcountTableProblem::Unaligned {
                    offset: 0x10200,
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    assert!(text.contains("not cluster aligned"), "{text}");
}

#[test]
fn bitmaps_of_an_inconsistent_extension_are_leaks() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = image(&s, "bitmap-leaks.qcow2");
    qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b0"]);
    qemu_io(&img, &["write -P 4 8M 1M"]);
    assert_consistent(&img);
    // A program without bitmap support wrote to the image: QEMU ignores the bitmaps, and
    // their clusters leak.
    let bits = read_u64(&img, AUTOCLEAR_FEATURES);
    write_u64(&img, AUTOCLEAR_FEATURES, bits & !AUTOCLEAR_BITMAPS);
    let report = check_image(&img).unwrap();
    let ours: Vec<_> = report.leaks().collect();
    // The directory, the table and one data cluster.
    assert_eq!(ours.len(), 3, "{ours:?}");
    let text = assert_qemu_says(&img, 3);
    assert_eq!(ours, qemu_mismatches(&text), "{text}");
}

#[test]
fn a_subcluster_both_allocated_and_zero_is_an_error() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.create("subclusters.qcow2", "64M", "extended_l2=on");
    qemu_io(&img, &["write -P 1 0 4k"]);
    assert_consistent(&img);
    let (at, _) = active_l2_entry(&img, 0);
    // [V] a 4k write at 0 allocates subclusters 0 and 1 (2k each): bitmap 0x3.
    assert_eq!(read_u64(&img, at + 8), 0x3);
    write_u64(&img, at + 8, 0x1_0000_0003);
    let err = check_error(&img);
    assert!(
        matches!(
            err,
            ImageError::L2Entry {
                index: 0,
                problem: L2Problem::SubclusterBitmap {
                    bitmap: 0x1_0000_0003,
                    ..
                },
                ..
            }
        ),
        "{err}"
    );
    let text = assert_qemu_says(&img, 2);
    assert!(
        text.contains("corrupted subcluster allocation bitmap"),
        "{text}"
    );
}
