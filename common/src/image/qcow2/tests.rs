//! Parser tests: a hand-made image with a comment per header field (the header's rejection
//! tests, one per mutated field, are in [`header`]), then snapshot tables and hostile L1/L2
//! tables that must fail with an error naming them (never a panic).

mod header;

use std::io::Write;

use super::tables::{QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED, QCOW_OFLAG_ZERO};
use super::{Layer, Qcow2Image, ReadCounts};
use crate::error::L2Problem;
use crate::image::{Allocation, BlockSource};
use crate::ImageError;

const CS: usize = 4096;
const REFTABLE: u64 = CS as u64;
const REFBLOCK: u64 = 2 * CS as u64;
const L1: u64 = 3 * CS as u64;
const L2: u64 = 4 * CS as u64;
const DATA: u64 = 5 * CS as u64;
const SNAPTABLE: u64 = 6 * CS as u64;
const SNAP_L1: u64 = 7 * CS as u64;
/// Compressed stream of guest cluster 2, byte-packed 0x10 bytes into this cluster.
const COMP: u64 = 8 * CS as u64 + 0x10;
const CLUSTERS: usize = 9;

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Cluster 0 of a valid version 3 image with 4 KiB clusters.
fn header() -> Vec<u8> {
    let mut h = vec![0u8; CS];
    h[0..4].copy_from_slice(b"QFI\xfb"); // magic
    put32(&mut h, 4, 3); // version
    put64(&mut h, 8, 0); // backing_file_offset: no backing file
    put32(&mut h, 16, 0); // backing_file_size
    put32(&mut h, 20, 12); // cluster_bits: 4 KiB
    put64(&mut h, 24, 1 << 20); // size: 1 MiB
    put32(&mut h, 32, 0); // crypt_method: none
    put32(&mut h, 36, 1); // l1_size: one L2 table maps 512 * 4 KiB = 2 MiB
    put64(&mut h, 40, L1); // l1_table_offset
    put64(&mut h, 48, REFTABLE); // refcount_table_offset
    put32(&mut h, 56, 1); // refcount_table_clusters
    put32(&mut h, 60, 1); // nb_snapshots
    put64(&mut h, 64, SNAPTABLE); // snapshots_offset
    put64(&mut h, 72, 0); // incompatible_features
    put64(&mut h, 80, 0); // compatible_features
    put64(&mut h, 88, 0); // autoclear_features
    put32(&mut h, 96, 4); // refcount_order: 16-bit refcounts
    put32(&mut h, 100, 112); // header_length: what qemu 10 writes
    h[104] = 0; // compression_type: deflate; 105..112 padding
    put32(&mut h, 112, 0xE279_2ACA); // extension: backing format (unused without backing)
    put32(&mut h, 116, 5); // its length
    h[120..125].copy_from_slice(b"qcow2"); // data, padded to 8
    put32(&mut h, 128, 0); // end of extensions
    put32(&mut h, 132, 0);
    h
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..CS).map(|i| (i as u8 / 3).wrapping_add(seed)).collect()
}

fn deflate(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

/// The compressed descriptor of the stream at COMP (x = 62 - (12 - 8) = 58).
fn comp_entry(stream_len: u64) -> u64 {
    let nsect = (0x10 + stream_len).div_ceil(512) - 1;
    QCOW_OFLAG_COMPRESSED | (nsect << 58) | COMP
}

/// A whole image: guest cluster 0 is data, 1 reads as zeros, 2 is compressed; one snapshot
/// shares the L2 table.
fn image() -> Vec<u8> {
    let mut f = header();
    f.resize(CLUSTERS * CS, 0);
    put64(&mut f, REFTABLE as usize, REFBLOCK);
    for c in 0..CLUSTERS {
        f[REFBLOCK as usize + 2 * c + 1] = 1;
    }
    put64(&mut f, L1 as usize, QCOW_OFLAG_COPIED | L2);
    put64(&mut f, SNAP_L1 as usize, L2);
    let stream = deflate(&pattern(2));
    put64(&mut f, L2 as usize, QCOW_OFLAG_COPIED | DATA);
    put64(&mut f, L2 as usize + 8, QCOW_OFLAG_ZERO);
    put64(&mut f, L2 as usize + 16, comp_entry(stream.len() as u64));
    f[DATA as usize..][..CS].copy_from_slice(&pattern(0));
    f[COMP as usize..][..stream.len()].copy_from_slice(&stream);
    f
}

/// Writes the snapshot entry at SNAPTABLE: id "1", name "s", `extra` bytes of extra data.
fn put_snapshot(f: &mut [u8], extra: u32) {
    let at = SNAPTABLE as usize;
    put64(f, at, SNAP_L1); // l1_table_offset
    put32(f, at + 8, 1); // l1_size
    f[at + 12..at + 14].copy_from_slice(&1u16.to_be_bytes()); // id_str_size
    f[at + 14..at + 16].copy_from_slice(&1u16.to_be_bytes()); // name_size
    put32(f, at + 16, 1_700_000_000); // date_sec
    put32(f, at + 20, 7); // date_nsec
    put64(f, at + 24, 42); // vm_clock_nsec
    put32(f, at + 32, 0); // vm_state_size
    put32(f, at + 36, extra); // extra_data_size
    if extra >= 24 {
        put64(f, at + 40, 0); // vm_state_size_large
        put64(f, at + 48, 1 << 20); // disk_size
        put64(f, at + 56, u64::MAX); // icount: -1
    }
    let strings = at + 40 + extra as usize;
    if strings + 2 <= f.len() {
        f[strings] = b'1'; // id
        f[strings + 1] = b's'; // name
    }
}

fn write_image(bytes: &[u8]) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(bytes).unwrap();
    f.flush().unwrap();
    f
}

fn valid_image() -> Vec<u8> {
    let mut f = image();
    put_snapshot(&mut f, 24);
    f
}

fn open_bytes(bytes: &[u8]) -> Result<Qcow2Image, ImageError> {
    let f = write_image(bytes);
    Qcow2Image::open(f.path())
}

/// Asserts that `result` is an error whose message contains `needle`.
#[track_caller]
fn assert_err<T: std::fmt::Debug>(result: Result<T, ImageError>, needle: &str) {
    match result {
        Ok(v) => panic!("expected an error containing {needle:?}, got {v:?}"),
        Err(e) => assert!(
            e.to_string().contains(needle),
            "{e} does not contain {needle:?}"
        ),
    }
}

/// The table a header is refused for as unaligned: (what, offset).
#[track_caller]
fn unaligned<T: std::fmt::Debug>(result: Result<T, ImageError>) -> (&'static str, u64) {
    match result {
        Err(ImageError::Unaligned {
            what,
            offset,
            cluster_size,
        }) if cluster_size == CS as u64 => (what, offset),
        other => panic!("expected an alignment error, got {other:?}"),
    }
}

#[test]
fn hand_made_image_reads_back() {
    let f = write_image(&valid_image());
    let img = Qcow2Image::open(f.path()).unwrap();
    let snap = &img.snapshots()[0];
    assert_eq!(
        (snap.id.as_str(), snap.name.as_str(), snap.disk_size),
        ("1", "s", 1 << 20)
    );
    assert_eq!((snap.date_nsec, snap.vm_clock_nsec), (7, 42));
    for which in [Layer::Active, Layer::Snapshot(0)] {
        let layer = img.layer(which).unwrap();
        let mut buf = vec![0xeeu8; 4 * CS];
        layer.read_at(&mut buf, 0).unwrap();
        assert_eq!(buf[..CS], pattern(0)[..]);
        assert!(buf[CS..2 * CS].iter().all(|&b| b == 0));
        assert_eq!(buf[2 * CS..3 * CS], pattern(2)[..]);
        assert!(buf[3 * CS..].iter().all(|&b| b == 0));
        assert_eq!(
            layer.status(0, u64::MAX).unwrap(),
            (Allocation::Data, CS as u64)
        );
        assert_eq!(layer.status(CS as u64, 1).unwrap(), (Allocation::Zero, 1));
        assert_eq!(
            layer.status(2 * CS as u64, u64::MAX).unwrap(),
            (Allocation::Data, CS as u64)
        );
        assert_eq!(
            layer.status(3 * CS as u64, u64::MAX).unwrap(),
            (Allocation::Hole, (1 << 20) - 3 * CS as u64)
        );
    }
}

#[test]
fn rejects_huge_snapshot_extra_data() {
    let mut f = image();
    put_snapshot(&mut f, 0x10_0000);
    let refused = open_bytes(&f);
    assert!(
        matches!(
            refused,
            Err(ImageError::SnapshotEntry {
                index: 0,
                offset: SNAPTABLE,
                field: "extra_data_size",
                value: 0x10_0000,
                limit: 1024,
            })
        ),
        "{refused:?}"
    );
}

#[test]
fn snapshot_entries_past_the_end_fail() {
    let mut f = valid_image();
    put32(&mut f, 60, 2); // two entries, but the file ends inside the second
    f.truncate(SNAPTABLE as usize + 72 + 30);
    assert!(matches!(
        open_bytes(&f),
        Err(ImageError::PastEnd {
            what: "snapshot table entry",
            ..
        })
    ));
    let mut f = image();
    put_snapshot(&mut f, 24);
    f.truncate(SNAPTABLE as usize + 40 + 24 + 1); // the file ends inside the name
    let cut = open_bytes(&f);
    assert!(matches!(
        cut,
        Err(ImageError::PastEnd {
            what: "snapshot table entry",
            ..
        })
    ));
}

#[test]
fn rejects_a_snapshot_disk_past_the_limit() {
    let mut f = valid_image();
    let limit = crate::limits::MAX_VIRTUAL_BYTES;
    put64(&mut f, SNAPTABLE as usize + 48, limit + 1); // disk_size
    let refused = open_bytes(&f);
    assert!(
        matches!(
            refused,
            Err(ImageError::SnapshotEntry {
                index: 0,
                field: "disk_size",
                value,
                ..
            }) if value == limit + 1
        ),
        "{refused:?}"
    );
}

#[test]
fn rejects_a_snapshot_l1_table_past_the_limit() {
    let mut f = valid_image();
    put32(&mut f, SNAPTABLE as usize + 8, u32::MAX); // l1_size
    let img = open_bytes(&f).unwrap();
    let refused = img.layer(Layer::Snapshot(0));
    assert!(
        matches!(
            refused,
            Err(ImageError::TableTooLarge {
                what: "L1 table",
                offset: SNAP_L1,
                entries: 0xffff_ffff,
                ..
            })
        ),
        "{refused:?}"
    );
}

#[test]
fn short_snapshot_extra_data_falls_back_to_the_header_size() {
    let mut f = image();
    put_snapshot(&mut f, 8);
    let img = open_bytes(&f).unwrap();
    assert_eq!(img.snapshots()[0].disk_size, 1 << 20);
}

#[test]
fn hostile_tables_give_errors_not_panics() {
    let read = |edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = valid_image();
        edit(&mut f);
        let img = open_bytes(&f)?;
        let layer = img.layer(Layer::Active)?;
        let mut buf = vec![0u8; 4 * CS];
        layer.read_at(&mut buf, 0)
    };
    // L1 entry pointing at an unaligned L2 table, or past the end of the file.
    let refused = unaligned(read(&|f| put64(f, L1 as usize, L2 + 512)));
    assert_eq!(refused, ("L2 table", L2 + 512));
    assert_err(read(&|f| put64(f, L1 as usize, 1 << 50)), "past the end");
    // Data cluster past the end of the file, or unaligned.
    assert_err(read(&|f| put64(f, L2 as usize, 1 << 40)), "past the end");
    let host = DATA + 512;
    let refused = read(&|f| put64(f, L2 as usize, host));
    let problem = L2Problem::UnalignedHost {
        host,
        cluster_size: CS as u64,
    };
    assert!(
        matches!(
            refused,
            Err(ImageError::L2Entry { table_offset: L2, index: 0, entry, problem: p })
                if entry == host && p == problem
        ),
        "{refused:?}"
    );
    // Compressed stream past the end of the file, or garbage.
    assert_err(
        read(&|f| put64(f, L2 as usize + 16, QCOW_OFLAG_COMPRESSED | (1 << 50))),
        "past the end",
    );
    assert_err(
        read(&|f| f[COMP as usize..][..64].fill(0xff)),
        "does not decompress",
    );
    // A huge sector count near the end of the file: read up to the end only.
    let tail = read(&|f| {
        put64(
            f,
            L2 as usize + 16,
            QCOW_OFLAG_COMPRESSED | (15 << 58) | COMP,
        )
    });
    assert!(tail.is_ok(), "{tail:?}");
}

#[test]
fn status_does_not_read_data_clusters() {
    let mut f = valid_image();
    put64(&mut f, L2 as usize, 1 << 40); // data cluster far past the end
    let img = open_bytes(&f).unwrap();
    let layer = img.layer(Layer::Active).unwrap();
    assert_eq!(layer.status(0, 10).unwrap(), (Allocation::Data, 10));
    assert!(layer.status(1 << 20, 1).is_err());
}

#[test]
fn a_backing_loop_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("self.qcow2");
    let mut f = valid_image();
    put64(&mut f, 8, 512); // backing_file_offset
    put32(&mut f, 16, 10); // backing_file_size
    f[512..522].copy_from_slice(b"self.qcow2");
    std::fs::write(&path, &f).unwrap();
    let img = Qcow2Image::open(&path).unwrap();
    assert_eq!(img.backing_path().unwrap(), path);
    assert!(
        matches!(img.layer(Layer::Active), Err(ImageError::BackingLoop { path: p }) if p == path)
    );
    assert_err(img.layer(Layer::Active), "backing chain loops");
}

#[test]
fn missing_backing_file_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("top.qcow2");
    let mut f = valid_image();
    put64(&mut f, 8, 512);
    put32(&mut f, 16, 7);
    f[512..519].copy_from_slice(b"nothere");
    std::fs::write(&path, &f).unwrap();
    let img = Qcow2Image::open(&path).unwrap();
    assert!(matches!(
        img.layer(Layer::Active),
        Err(ImageError::Open { .. })
    ));
}

#[test]
fn snapshot_l1_shorter_than_its_disk_is_unallocated_beyond() {
    let mut f = valid_image();
    put64(
        &mut f,
        SNAPTABLE as usize + 48,
        crate::limits::MAX_VIRTUAL_BYTES,
    ); // disk_size
    let img = open_bytes(&f).unwrap();
    let snap = img.layer(Layer::Snapshot(0)).unwrap();
    assert_eq!(snap.size(), 1 << 56);
    assert_eq!(snap.l1().len(), 1);
    // One step over 2^41 L2 ranges: no loop in proportion to the disk size.
    let rest = (1u64 << 56) - (3 * CS as u64);
    assert_eq!(
        snap.status(3 * CS as u64, u64::MAX).unwrap(),
        (Allocation::Hole, rest)
    );
    let mut buf = [0xffu8; 64];
    snap.read_at(&mut buf, (1 << 56) - 64).unwrap();
    assert_eq!(buf, [0u8; 64]);
}

#[test]
fn mutated_metadata_never_panics() {
    let base = valid_image();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.qcow2");
    // Bytes worth mutating: the header, the L1 and L2 tables, the snapshot table.
    let regions = [
        (0, 200),
        (L1 as usize, 16),
        (L2 as usize, 32),
        (SNAPTABLE as usize, 72),
    ];
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..400 {
        let mut f = base.clone();
        for _ in 0..3 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let (start, len) = regions[(x % 4) as usize];
            f[start + (x >> 8) as usize % len] = (x >> 40) as u8;
        }
        std::fs::write(&path, &f).unwrap();
        let Ok(img) = Qcow2Image::open(&path) else {
            continue;
        };
        let _ = img.bitmaps();
        for which in [Layer::Active, Layer::Snapshot(0)] {
            let Ok(layer) = img.layer(which) else {
                continue;
            };
            let len = layer.size().min(1 << 20) as usize;
            let _ = layer.read_at(&mut vec![0u8; len], 0);
            let _ = layer.status(0, u64::MAX);
        }
    }
}

#[test]
fn read_counts_count_l2_loads_and_data_reads_not_cache_hits() {
    let f = write_image(&valid_image());
    let img = Qcow2Image::open(f.path()).unwrap();
    let none = ReadCounts::default();
    assert_eq!(
        img.read_counts(),
        none,
        "opening reads no L2 table and no data"
    );
    let active = img.layer(Layer::Active).unwrap();
    assert_eq!(img.read_counts(), none, "a layer reads its L1 only");
    active.status(0, u64::MAX).unwrap();
    active.status(CS as u64, 1).unwrap();
    active.read_l2(active.l1()[0]).unwrap().unwrap();
    let one_table = ReadCounts {
        l2_tables: 1,
        ..none
    };
    assert_eq!(img.read_counts(), one_table, "cache hits are not counted");
    // Cluster 0 is a host read of CS bytes, cluster 1 reads as zeros, cluster 2 is one read
    // of its compressed stream (then cached), cluster 3 is unallocated.
    let stream_len = deflate(&pattern(2)).len() as u64;
    let mut buf = vec![0u8; 4 * CS];
    active.read_at(&mut buf, 0).unwrap();
    active.read_at(&mut buf[..CS], 2 * CS as u64).unwrap();
    let read = img.read_counts();
    assert_eq!((read.l2_tables, read.data_reads), (1, 2));
    // The compressed read takes the sector-rounded size, clipped at the end of the file.
    let csize = 512 * (stream_len + 0x10).div_ceil(512) - 0x10;
    let comp_read = csize.min((CLUSTERS * CS) as u64 - COMP);
    assert_eq!(read.data_bytes, CS as u64 + comp_read);
    // Counters are the image's; caches are the layer's: the snapshot reads the shared table.
    let snap = img.clone().layer(Layer::Snapshot(0)).unwrap();
    snap.status(0, 1).unwrap();
    assert_eq!(img.read_counts().l2_tables, 2);
}

#[test]
fn cold_aligned_data_clusters_are_read_around_the_page_cache() {
    use crate::buf::AlignedBuf;
    use crate::image::raw::make_cold;
    let f = write_image(&valid_image());
    let img = Qcow2Image::open(f.path()).unwrap();
    let active = img.layer(Layer::Active).unwrap();
    // The tables are read (and the kernel's readahead around them) before the cache is
    // dropped: the data is cold.
    active.status(0, u64::MAX).unwrap();
    let direct = make_cold(f.as_file());
    let mut want = pattern(0);
    want.resize(2 * CS, 0);
    want.extend_from_slice(&pattern(2));
    want.resize(4 * CS, 0);
    // Cluster 0 (a whole, aligned host cluster) is read directly where that is supported;
    // the compressed cluster 2 never is. Both read back the same.
    let mut buf = AlignedBuf::zeroed(4 * CS);
    active.read_at(&mut buf, 0).unwrap();
    assert!(buf[..] == want[..]);
    let counts = img.read_counts();
    if direct {
        assert_eq!(counts.direct_bytes, CS as u64);
    }
    assert!(counts.data_bytes > counts.direct_bytes);
    // A buffer that is not aligned goes through the page cache.
    let mut odd = AlignedBuf::zeroed(CS + 1);
    active.read_at(&mut odd[1..], 0).unwrap();
    assert!(odd[1..] == want[..CS]);
    assert_eq!(img.read_counts().direct_bytes, counts.direct_bytes);
    // So does a cluster the page cache now holds.
    active.read_at(&mut buf[..CS], 0).unwrap();
    assert!(buf[..CS] == want[..CS]);
    assert_eq!(img.read_counts().direct_bytes, counts.direct_bytes);
}
