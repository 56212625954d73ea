//! Bitmap tests: table entries and bit order on hand-built bytes, then a hand-made image with
//! one bitmap (a comment per field); its rejection tests, one per mutated field, are in
//! [`refusals`].

mod refusals;

use super::table::{set_runs, walk};
use super::{table_entry, BitmapGeometry, TableEntry};
use crate::error::TableEntryProblem;
use crate::image::qcow2::Qcow2Image;
use crate::ImageError;

const MIB: u64 = 1 << 20;

fn ranges(
    g: &BitmapGeometry,
    table: &[TableEntry],
    clusters: &[(u64, Vec<u8>)],
) -> Vec<(u64, u64)> {
    let read = |offset: u64, buf: &mut [u8]| {
        let (_, data) = clusters.iter().find(|(o, _)| *o == offset).expect("known");
        buf.copy_from_slice(data);
        Ok(())
    };
    let mut out = Vec::new();
    walk(g, table.iter().copied(), read, |o, l| {
        out.push((o, l));
        Ok::<_, ImageError>(())
    })
    .unwrap();
    out
}

/// A 512-byte data cluster with the given bits set.
fn cluster_with(bits: &[u64]) -> Vec<u8> {
    let mut c = vec![0u8; 512];
    for &b in bits {
        c[(b / 8) as usize] |= 1 << (b % 8);
    }
    c
}

#[test]
fn table_entries_classify_like_qemu() {
    let cs = 65536;
    assert_eq!(table_entry(0, cs, MIB), Ok(TableEntry::Zeros));
    assert_eq!(table_entry(1, cs, MIB), Ok(TableEntry::Ones));
    assert_eq!(table_entry(0x10000, cs, MIB), Ok(TableEntry::Data(0x10000)));
    // The last cluster of the file is inside it; the one after is not.
    assert_eq!(table_entry(0xf0000, cs, MIB), Ok(TableEntry::Data(0xf0000)));
    assert!(table_entry(0x100000, cs, MIB).is_err());
}

#[test]
fn table_entries_with_reserved_bits_are_refused() {
    for bit in (1..=8).chain(56..=63) {
        let entry = 1u64 << bit;
        let err = table_entry(entry, 512, MIB).unwrap_err();
        assert_eq!(err, TableEntryProblem::Reserved { entry }, "bit {bit}");
    }
}

#[test]
fn table_entry_with_offset_and_all_ones_bit_is_refused() {
    let err = table_entry(0x10000 | 1, 65536, MIB).unwrap_err();
    assert_eq!(err, TableEntryProblem::OffsetAndAllOnes { entry: 0x10001 });
    assert!(err.to_string().contains("all-ones"), "{err}");
}

#[test]
fn table_entry_with_misaligned_offset_is_refused() {
    let err = table_entry(0x10200, 65536, MIB).unwrap_err();
    let cluster_size = 65536;
    let offset = 0x10200;
    assert_eq!(
        err,
        TableEntryProblem::Unaligned {
            offset,
            cluster_size
        }
    );
    let offset = 0x00ff_ffff_ffff_0000;
    let err = table_entry(offset, 65536, MIB).unwrap_err();
    let file_len = MIB;
    assert_eq!(err, TableEntryProblem::PastEnd { offset, file_len });
    assert!(err.to_string().contains("past the end"), "{err}");
}

#[test]
fn table_size_follows_the_qemu_formula() {
    let entries = |size, gran_bits, cluster_bits| {
        BitmapGeometry::new(size, gran_bits, cluster_bits)
            .unwrap()
            .table_entries()
    };
    // qemu-img's default: 64 KiB granularity and clusters; 1024 bits fit one cluster.
    assert_eq!(entries(64 * MIB, 16, 16), 1);
    // 2^21 + 1 bits → 2^18 + 1 bytes → 513 clusters of 512 bytes.
    assert_eq!(entries((1 << 30) + 1, 9, 9), 513);
    // One bit more than a cluster holds needs a second entry.
    assert_eq!(entries(4096 * 512, 9, 9), 1);
    assert_eq!(entries(4096 * 512 + 1, 9, 9), 2);
    assert_eq!(entries(0, 9, 9), 0);
}

#[test]
fn geometry_out_of_range_is_refused() {
    assert!(BitmapGeometry::new(MIB, 8, 16).is_err());
    assert!(BitmapGeometry::new(MIB, 32, 16).is_err());
    assert!(BitmapGeometry::new(MIB, 16, 22).is_err());
    assert!(BitmapGeometry::new((1 << 56) + 1, 16, 16).is_err());
}

#[test]
fn bits_are_lsb_first() {
    // qcow2.rst, "Bitmaps": a 4k bitmap, a write at 0x3000 sets bit 3 (byte 0 = 0x08).
    let g = BitmapGeometry::new(MIB, 12, 9).unwrap();
    let c = cluster_with(&[3]);
    assert_eq!(c[0], 0x08);
    let got = ranges(&g, &[TableEntry::Data(512)], &[(512, c)]);
    assert_eq!(got, [(0x3000, 0x1000)]);
}

#[test]
fn runs_cross_words_and_merge() {
    let mut runs = Vec::new();
    let c = cluster_with(&[0, 1, 62, 63, 64, 65, 200, 4095]);
    set_runs(&c, 4096, |a, b| {
        runs.push((a, b));
        Ok::<_, ()>(())
    })
    .unwrap();
    assert_eq!(runs, [(0, 2), (62, 66), (200, 201), (4095, 4096)]);
}

#[test]
fn all_ones_and_all_zeros_entries() {
    // 512-byte clusters hold 4096 bits of 512 bytes: each entry covers 2 MiB.
    let g = BitmapGeometry::new(8 * MIB, 9, 9).unwrap();
    let table = [
        TableEntry::Data(512),
        TableEntry::Ones,
        TableEntry::Zeros,
        TableEntry::Ones,
    ];
    // The last bit of the first cluster joins the all-ones range that follows.
    let got = ranges(&g, &table, &[(512, cluster_with(&[0, 4095]))]);
    assert_eq!(
        got,
        [(0, 512), (2 * MIB - 512, 2 * MIB + 512), (6 * MIB, 2 * MIB)]
    );
}

#[test]
fn tail_bits_are_ignored_and_the_last_granule_is_clipped() {
    // 1000 bytes in 512-byte granules: bit 0 full, bit 1 covers 488 bytes, bits 2.. are tail.
    let g = BitmapGeometry::new(1000, 9, 9).unwrap();
    let got = ranges(
        &g,
        &[TableEntry::Data(0)],
        &[(0, cluster_with(&[1, 2, 7, 4095]))],
    );
    assert_eq!(got, [(512, 488)]);
    // An all-ones entry stops at the disk size too.
    assert_eq!(ranges(&g, &[TableEntry::Ones], &[]), [(0, 1000)]);
}

#[test]
fn a_visitor_error_stops_the_walk() {
    let g = BitmapGeometry::new(8 * MIB, 9, 9).unwrap();
    let mut seen = 0;
    let table = [TableEntry::Ones, TableEntry::Zeros, TableEntry::Ones];
    let result = walk(
        &g,
        table,
        |_, _| Ok(()),
        |_, _| {
            seen += 1;
            Err(ImageError::Cancelled)
        },
    );
    assert!(matches!(result, Err(ImageError::Cancelled)));
    assert_eq!(seen, 1);
}

// A hand-made image with one bitmap.

const CS: usize = 4096;
const REFTABLE: u64 = CS as u64;
const L1: u64 = 2 * CS as u64;
const DIR: u64 = 3 * CS as u64;
const TABLE: u64 = 4 * CS as u64;
const DATA1: u64 = 5 * CS as u64;
const DATA2: u64 = 6 * CS as u64;
const CLUSTERS: usize = 7;
/// 64 MiB less 1000 bytes: 131071 granules of 512 bytes, the last one 24 bytes long.
const DISK: u64 = 64 * MIB - 1000;
/// Where the bitmap directory entry's fields are.
const ENTRY: usize = DIR as usize;

fn put16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// A version 3 image with 4 KiB clusters, no data, and bitmap 'daily' (512-byte granules:
/// 4 table entries of 16 MiB each).
fn image() -> Vec<u8> {
    let mut f = vec![0u8; CLUSTERS * CS];
    let h = &mut f[..CS];
    h[0..4].copy_from_slice(b"QFI\xfb"); // magic
    put32(h, 4, 3); // version
    put32(h, 20, 12); // cluster_bits: 4 KiB
    put64(h, 24, DISK); // size
    put32(h, 36, 32); // l1_size: 32 L2 tables of 2 MiB each
    put64(h, 40, L1); // l1_table_offset (all entries 0)
    put64(h, 48, REFTABLE); // refcount_table_offset
    put32(h, 56, 1); // refcount_table_clusters
    put64(h, 88, 1); // autoclear_features: bit 0, the bitmaps are consistent
    put32(h, 96, 4); // refcount_order
    put32(h, 100, 112); // header_length
    put32(h, 112, 0x2385_2875); // extension: bitmaps
    put32(h, 116, 24); // its length
    put32(h, 120, 1); // nb_bitmaps
    put32(h, 124, 0); // reserved
    put64(h, 128, 32); // bitmap_directory_size
    put64(h, 136, DIR); // bitmap_directory_offset
    put32(h, 144, 0); // end of extensions
    let e = ENTRY;
    put64(&mut f, e, TABLE); // bitmap_table_offset
    put32(&mut f, e + 8, 4); // bitmap_table_size
    put32(&mut f, e + 12, 2); // flags: auto
    f[e + 16] = 1; // type: dirty tracking
    f[e + 17] = 9; // granularity_bits: 512 bytes
    put16(&mut f, e + 18, 5); // name_size
    put32(&mut f, e + 20, 0); // extra_data_size
    f[e + 24..e + 29].copy_from_slice(b"daily"); // name, padded to 32
    let t = TABLE as usize;
    put64(&mut f, t, DATA1); // entry 0: a data cluster
    put64(&mut f, t + 8, 1); // entry 1: all ones
    put64(&mut f, t + 16, 0); // entry 2: all zeros
    put64(&mut f, t + 24, DATA2); // entry 3: a data cluster
    let d1 = DATA1 as usize;
    f[d1] = 0b0000_1001; // bits 0 and 3
    f[d1 + CS - 1] = 0x80; // bit 32767, joins entry 1's ones
    let d2 = DATA2 as usize;
    f[d2] = 0xff; // bits 98304..98312
    f[d2 + 1] = 0x01; // bit 98312
    f[d2 + CS - 1] = 0b1100_0000; // bit 131070 (the last, 24 bytes) and a tail bit
    f
}

const EXPECTED: [(u64, u64); 5] = [
    (0, 512),
    (1536, 512),
    (16 * MIB - 512, 16 * MIB + 512),
    (48 * MIB, 9 * 512),
    (131_070 * 512, 24),
];

/// Opens the image bytes and lists bitmap 'daily''s dirty ranges.
fn dirty_ranges(bytes: &[u8]) -> Result<Vec<(u64, u64)>, ImageError> {
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), bytes).unwrap();
    let image = Qcow2Image::open(tmp.path())?;
    let info = image
        .find_bitmap("daily")?
        .expect("bitmap 'daily' is listed");
    let bitmap = image.dirty_bitmap(&info)?;
    let mut out = Vec::new();
    bitmap.for_each_dirty_range(|o, l| {
        out.push((o, l));
        Ok::<_, ImageError>(())
    })?;
    Ok(out)
}

#[test]
fn hand_made_bitmap_reads() {
    assert_eq!(dirty_ranges(&image()).unwrap(), EXPECTED);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), image()).unwrap();
    let image = Qcow2Image::open(tmp.path()).unwrap();
    assert_eq!(image.find_bitmap("weekly").unwrap(), None);
    let info = image.find_bitmap("daily").unwrap().unwrap();
    let b = image.dirty_bitmap(&info).unwrap();
    let kinds: Vec<_> = b.table().collect();
    assert_eq!(
        kinds,
        [
            TableEntry::Data(DATA1),
            TableEntry::Ones,
            TableEntry::Zeros,
            TableEntry::Data(DATA2)
        ]
    );
}
