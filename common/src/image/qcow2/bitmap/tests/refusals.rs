//! The bitmap rejection tests: the hand-made image of [`super::image`], one field mutated per
//! test, refused with the variant that names the structure and carries the values.

use super::{dirty_ranges, image, put16, put32, put64};
use super::{CLUSTERS, CS, DATA1, DIR, DISK, ENTRY, TABLE};
use crate::error::{BitmapProblem, DirectoryProblem, TableEntryProblem};
use crate::image::qcow2::Qcow2Image;
use crate::ImageError;

/// The error that opening and reading the mutated image ends with: one line, naming the
/// structure.
fn refusal(mutate: impl FnOnce(&mut Vec<u8>)) -> ImageError {
    let mut f = image();
    mutate(&mut f);
    let err = dirty_ranges(&f).expect_err("the mutated image must be refused");
    let text = err.to_string();
    assert!(!text.contains('\n'), "one line: {text}");
    err
}

/// Asserts that the mutated image is refused with an error whose message contains `expect`.
fn refused(mutate: impl FnOnce(&mut Vec<u8>), expect: &str) {
    let text = refusal(mutate).to_string();
    assert!(text.contains(expect), "expected '{expect}' in: {text}");
}

/// The problem of bitmap 'daily' (directory entry at DIR) the mutated image is refused for.
fn bitmap_problem(mutate: impl FnOnce(&mut Vec<u8>)) -> BitmapProblem {
    match refusal(mutate) {
        ImageError::Bitmap {
            name,
            entry_offset,
            problem,
        } if name == "daily" && entry_offset == DIR => problem,
        other => panic!("not a problem of bitmap 'daily' at {DIR:#x}: {other:?}"),
    }
}

/// The directory problem the mutated image is refused for.
fn directory_problem(mutate: impl FnOnce(&mut Vec<u8>)) -> DirectoryProblem {
    match refusal(mutate) {
        ImageError::BitmapDirectory { offset, problem } if offset == DIR => problem,
        other => panic!("not a problem of the directory at {DIR:#x}: {other:?}"),
    }
}

#[test]
fn refuses_inconsistent_bitmaps() {
    let problem = bitmap_problem(|f| put64(f, 88, 0));
    assert_eq!(problem, BitmapProblem::Inconsistent);
    refused(|f| put64(f, 88, 0), "autoclear bit 0 is clear");
}

#[test]
fn inconsistent_bitmaps_are_listed_as_in_use() {
    let mut f = image();
    put64(&mut f, 88, 0); // autoclear_features: bit 0 clear, as a writer unaware of bitmaps leaves it
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &f).unwrap();
    let img = Qcow2Image::open(tmp.path()).unwrap();
    assert!(!img.bitmaps_consistent());
    let listed = img.bitmaps().unwrap();
    let daily = &listed[0];
    assert!(daily.inconsistent && daily.in_use, "{daily:?}");
    assert_eq!(daily.flags, 2, "the flags stay as stored");
    let refused = img.dirty_bitmap(daily).unwrap_err();
    assert!(matches!(
        refused,
        ImageError::Bitmap {
            problem: BitmapProblem::Inconsistent,
            ..
        }
    ));
    // With the bit set, the same bitmap is neither.
    std::fs::write(tmp.path(), image()).unwrap();
    let img = Qcow2Image::open(tmp.path()).unwrap();
    let daily = &img.bitmaps().unwrap()[0];
    assert!(!daily.inconsistent && !daily.in_use, "{daily:?}");
    assert_eq!(daily.entry_offset, DIR);
}

#[test]
fn refuses_in_use_bitmap() {
    assert_eq!(
        bitmap_problem(|f| put32(f, ENTRY + 12, 3)),
        BitmapProblem::InUse
    );
    refused(|f| put32(f, ENTRY + 12, 3), "marked in use");
}

#[test]
fn refuses_unknown_flags() {
    refused(|f| put32(f, ENTRY + 12, 2 | 4), "flags 0x6");
}

#[test]
fn refuses_extra_data() {
    // 8 bytes of extra data before the name: the entry grows to 40 bytes.
    refused(
        |f| {
            put32(f, ENTRY + 20, 8);
            f.copy_within(ENTRY + 24..ENTRY + 29, ENTRY + 32);
            put64(f, 128, 40);
        },
        "8 bytes of extra data",
    );
}

#[test]
fn refuses_bad_type() {
    refused(|f| f[ENTRY + 16] = 2, "bitmap 'daily' has type 2");
}

#[test]
fn refuses_bad_granularity() {
    for bits in [8, 32] {
        let problem = bitmap_problem(|f| f[ENTRY + 17] = bits);
        let (min, max) = (9, 31);
        assert_eq!(problem, BitmapProblem::Granularity { bits, min, max });
    }
    refused(|f| f[ENTRY + 17] = 8, "granularity_bits 8");
}

#[test]
fn refuses_empty_name() {
    let problem = directory_problem(|f| put16(f, ENTRY + 18, 0));
    assert_eq!(
        problem,
        DirectoryProblem::NameSize {
            entry_offset: DIR,
            name_size: 0,
            max: 1023
        }
    );
}

#[test]
fn refuses_entry_past_the_end_of_the_directory() {
    let problem = directory_problem(|f| put16(f, ENTRY + 18, 100)); // name_size
    let entry_offset = DIR;
    assert_eq!(
        problem,
        DirectoryProblem::EntryPastEnd {
            entry_offset,
            len: 128
        }
    );
}

#[test]
fn refuses_bad_nb_bitmaps() {
    let problem = directory_problem(|f| put32(f, 120, 0));
    let max = crate::limits::MAX_BITMAPS;
    assert_eq!(problem, DirectoryProblem::NbBitmaps { nb_bitmaps: 0, max });
}

#[test]
fn refuses_bad_directory_size() {
    let problem = directory_problem(|f| put64(f, 128, 8));
    assert!(
        matches!(
            problem,
            DirectoryProblem::Size {
                size: 8,
                min: 24,
                ..
            }
        ),
        "{problem:?}"
    );
}

#[test]
fn refuses_more_entries_than_nb_bitmaps() {
    let problem = directory_problem(|f| put64(f, 128, 64)); // room for a second entry
    assert_eq!(problem, DirectoryProblem::TooManyEntries { nb_bitmaps: 1 });
}

#[test]
fn refuses_a_short_last_entry() {
    let problem = directory_problem(|f| {
        put32(f, 120, 2); // nb_bitmaps
        put64(f, 128, 48); // bitmap_directory_size: 16 bytes after the first entry
    });
    let entry_offset = DIR + 32;
    let (left, needed) = (16, 24);
    assert_eq!(
        problem,
        DirectoryProblem::ShortEntry {
            entry_offset,
            left,
            needed
        }
    );
}

#[test]
fn refuses_a_bitmaps_extension_of_the_wrong_length() {
    // 8 bytes of extension data: the walk then reads the end marker (type 0, length 32) from
    // bitmap_directory_size.
    let err = refusal(|f| put32(f, 116, 8));
    assert!(
        matches!(
            err,
            ImageError::ExtensionLength {
                name: "bitmaps",
                offset: 112,
                len: 8,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn refuses_two_bitmaps_of_one_name() {
    let err = refusal(|f| {
        put32(f, 120, 2); // nb_bitmaps
        put64(f, 128, 64); // bitmap_directory_size
        f.copy_within(ENTRY..ENTRY + 32, ENTRY + 32); // a second 'daily'
    });
    assert!(
        matches!(
            err,
            ImageError::Bitmap {
                ref name,
                entry_offset,
                problem: BitmapProblem::DuplicateName { count: 2 },
            } if name == "daily" && entry_offset == DIR + 32
        ),
        "{err:?}"
    );
}

#[test]
fn refuses_misaligned_table() {
    let problem = bitmap_problem(|f| put64(f, ENTRY, TABLE + 8));
    let (offset, cluster_size) = (TABLE + 8, CS as u64);
    assert_eq!(
        problem,
        BitmapProblem::TableUnaligned {
            offset,
            cluster_size
        }
    );
}

#[test]
fn refuses_table_at_offset_zero() {
    assert_eq!(
        bitmap_problem(|f| put64(f, ENTRY, 0)),
        BitmapProblem::TableAtZero
    );
}

#[test]
fn refuses_table_past_the_end() {
    let problem = bitmap_problem(|f| put64(f, ENTRY, 64 * CS as u64));
    let (offset, len, file_len) = (64 * CS as u64, 32, (CLUSTERS * CS) as u64);
    assert_eq!(
        problem,
        BitmapProblem::TablePastEnd {
            offset,
            len,
            file_len
        }
    );
    refused(|f| put64(f, ENTRY, 64 * CS as u64), "past the end");
}

#[test]
fn refuses_table_too_small_for_the_disk() {
    let problem = bitmap_problem(|f| put32(f, ENTRY + 8, 3));
    let expected = BitmapProblem::TableTooSmall {
        entries: 3,
        covered: 3 * CS as u64 * 8 * 512,
        disk_size: DISK,
    };
    assert_eq!(problem, expected);
}

#[test]
fn refuses_table_larger_than_qemu_writes() {
    let problem = bitmap_problem(|f| put32(f, ENTRY + 8, 5));
    let expected = BitmapProblem::TableSize {
        entries: 5,
        expected: 4,
        disk_size: DISK,
        granularity: 512,
    };
    assert_eq!(problem, expected);
    refused(
        |f| put32(f, ENTRY + 8, 5),
        "bitmap_table_size 5 does not match",
    );
}

#[test]
fn refuses_table_over_the_data_cap() {
    let entries = (1 << 17) + 1;
    let problem = bitmap_problem(|f| put32(f, ENTRY + 8, entries as u32));
    let expected = BitmapProblem::TableTooLarge {
        entries,
        bytes: entries * CS as u64,
        limit: 512 << 20,
    };
    assert_eq!(problem, expected);
}

#[test]
fn refuses_entry_with_reserved_bits() {
    let problem = bitmap_problem(|f| put64(f, TABLE as usize + 16, 2));
    let expected = BitmapProblem::TableEntry {
        index: 2,
        offset: TABLE + 16,
        problem: TableEntryProblem::Reserved { entry: 2 },
    };
    assert_eq!(problem, expected);
    refused(
        |f| put64(f, TABLE as usize + 16, 2),
        "table entry 2 at offset 0x4010: entry 0x0000000000000002 has reserved bits set",
    );
}

#[test]
fn refuses_entry_past_the_end() {
    let offset = CLUSTERS as u64 * CS as u64;
    let problem = bitmap_problem(|f| put64(f, TABLE as usize + 24, offset));
    let file_len = offset;
    let expected = BitmapProblem::TableEntry {
        index: 3,
        offset: TABLE + 24,
        problem: TableEntryProblem::PastEnd { offset, file_len },
    };
    assert_eq!(problem, expected);
}

#[test]
fn refuses_entry_with_offset_and_all_ones() {
    let problem = bitmap_problem(|f| put64(f, TABLE as usize, DATA1 | 1));
    let expected = BitmapProblem::TableEntry {
        index: 0,
        offset: TABLE,
        problem: TableEntryProblem::OffsetAndAllOnes { entry: DATA1 | 1 },
    };
    assert_eq!(problem, expected);
}

#[test]
fn in_use_bitmap_may_have_a_short_table_but_is_still_refused() {
    // QEMU tolerates an in-use bitmap whose table no longer covers the disk (an unclean
    // resize): it is listed, but never read.
    let problem = bitmap_problem(|f| {
        put32(f, ENTRY + 12, 3);
        put32(f, ENTRY + 8, 1);
    });
    assert_eq!(problem, BitmapProblem::InUse);
}
