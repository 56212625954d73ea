//! The qcow2 reader against qemu as the oracle: images are built at test time with qemu-img
//! and qemu-io, and every layer read by [`Qcow2Layer`] must equal `qemu-img convert -O raw`
//! byte for byte; allocation status must agree with `qemu-img map --output=json`.

#[macro_use]
mod qcow2_oracle;

use std::path::Path;

use blkdelta_common::image::qcow2::tables::l2_entry_is_compressed;
use blkdelta_common::image::qcow2::{CompressionType, Layer, Qcow2Image, Qcow2Layer};
use blkdelta_common::image::{Allocation, BlockSource};
use qcow2_oracle::{
    alloc_at, assert_image, assert_map_matches, check_random_reads, convert, create, io, io_fmt,
    open, our_map, qemu_img, qemu_map, Map,
};

const MIXED_WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100000 300000",
    "write -P 0x33 1M 4k",
    "write -P 0x44 3145725 7",
    "write -z 120k 64k",
    "write -z 2M 128k",
    "discard 1M 64k",
    "write -P 0x55 7M 1M",
    "discard 7340032 131072",
];

#[test]
fn writes_zero_writes_and_discards_64k() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "a.qcow2", "8M", &[]);
    io(dir, "a.qcow2", MIXED_WRITES);
    let image = assert_image(dir, "a.qcow2");
    assert_eq!((image.cluster_bits(), image.virtual_size()), (16, 8 << 20));
    assert_eq!(image.header().version, 3);
    assert!(image.bitmaps().unwrap().is_empty());
    let layer = image.layer(Layer::Active).unwrap();
    assert!(!layer.has_backing());
    assert_map_matches(dir, "a.qcow2", &layer);
    assert_eq!(
        layer.status(2 << 20, 4096).unwrap(),
        (Allocation::Zero, 4096)
    );
}

#[test]
fn cluster_sizes_512_and_2m() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "small.qcow2", "4M", &["-o", "cluster_size=512"]);
    io(dir, "small.qcow2", &MIXED_WRITES[..6]);
    io(
        dir,
        "small.qcow2",
        &[
            "write -c -P 0x66 3670016 512",
            "write -c -P 0x67 3670528 512",
        ],
    );
    let image = assert_image(dir, "small.qcow2");
    assert_map_matches(dir, "small.qcow2", &image.layer(Layer::Active).unwrap());

    create(dir, "big.qcow2", "40M", &["-o", "cluster_size=2M"]);
    io(dir, "big.qcow2", MIXED_WRITES);
    io(
        dir,
        "big.qcow2",
        &[
            "write -c -P 0x77 16M 2M",
            "write -P 0x78 33554431 1",
            "write -z 12M 1M",
        ],
    );
    let image = assert_image(dir, "big.qcow2");
    assert_eq!(image.cluster_bits(), 21);
    assert_map_matches(dir, "big.qcow2", &image.layer(Layer::Active).unwrap());
}

/// Compressible but varied content, so compressed clusters hold real streams of many sizes.
fn varied_raw(dir: &Path, name: &str, size: usize) {
    let mut x = 12345u64;
    let data: Vec<u8> = (0..size)
        .map(|i| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            match (i / 65536) % 4 {
                0 => b"the quick brown fox "[i % 20],
                1 => (x >> 60) as u8,
                2 => 0,
                _ => (x >> 56) as u8,
            }
        })
        .collect();
    std::fs::write(dir.join(name), data).unwrap();
}

fn compressed_case(compression: &str, expected: CompressionType) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    varied_raw(dir, "src.raw", 2 << 20);
    let opt = format!("compression_type={compression}");
    qemu_img(
        dir,
        &[
            "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &opt, "src.raw", "c.qcow2",
        ],
    );
    // Compressed clusters written by qemu-io, then partly overwritten (COW of a compressed one).
    io(
        dir,
        "c.qcow2",
        &[
            "write -c -P 0x5a 128k 64k",
            "write -c -P 0x5b 384k 64k",
            "write -P 0x5c 400k 100",
        ],
    );
    let image = assert_image(dir, "c.qcow2");
    assert_eq!(image.header().compression_type, expected);
    let layer = image.layer(Layer::Active).unwrap();
    assert_map_matches(dir, "c.qcow2", &layer);
    let l2 = layer.read_l2(layer.l1()[0]).unwrap().unwrap();
    let compressed = (0..l2.len())
        .filter(|&i| l2_entry_is_compressed(l2.entry(i).0))
        .count();
    assert!(compressed >= 10, "only {compressed} compressed clusters");
}

#[test]
fn compressed_clusters_deflate() {
    require_qemu!();
    compressed_case("zlib", CompressionType::Deflate);
}

#[test]
fn compressed_clusters_zstd() {
    require_qemu!();
    compressed_case("zstd", CompressionType::Zstd);
}

#[test]
fn extended_l2_subclusters() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "base.qcow2", "4M", &[]);
    io(dir, "base.qcow2", &["write -P 0xb1 0 4M"]);
    let opts = [
        "-o",
        "extended_l2=on,cluster_size=64k",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
    ];
    create(dir, "x.qcow2", "4M", &opts);
    io(
        dir,
        "x.qcow2",
        &[
            "write -P 0x01 0 4k",
            "write -P 0x02 0x11000 2k",
            "write -z 0x20000 8k",
            "write -P 0x03 0x30000 64k",
            "write -z 0x30000 2k",
            "write -c -P 0x04 0x40000 64k",
            "discard 0x50000 64k",
            "write -P 0x05 0x60800 0x1000",
        ],
    );
    let image = assert_image(dir, "x.qcow2");
    assert!(image.header().extended_l2);
    let layer = image.layer(Layer::Active).unwrap();
    assert_eq!(layer.geometry().l2_entries, 4096);
    assert_map_matches(dir, "x.qcow2", &layer);
    // [V] a 4k write at 0 gives bitmap 0x3 with 2k subclusters.
    let l2 = layer.read_l2(layer.l1()[0]).unwrap().unwrap();
    assert_eq!(l2.len(), 4096);
    assert_eq!(l2.entry(0).1, 0x3);
    assert_eq!(l2.entry(3).1, 0x0000_0001_ffff_fffe);
}

#[test]
fn version_2_image() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "v2.qcow2", "8M", &["-o", "compat=0.10"]);
    io(dir, "v2.qcow2", MIXED_WRITES);
    qemu_img(dir, &["snapshot", "-c", "one", "v2.qcow2"]);
    io(
        dir,
        "v2.qcow2",
        &["write -P 0x99 0 128k", "write -z 7M 64k"],
    );
    let image = assert_image(dir, "v2.qcow2");
    assert_eq!(
        (image.header().version, image.header().refcount_order),
        (2, 4)
    );
    assert_map_matches(dir, "v2.qcow2", &image.layer(Layer::Active).unwrap());
    // A version 2 image with a backing file: its extensions start at byte 72.
    create(
        dir,
        "v2top.qcow2",
        "8M",
        &["-o", "compat=0.10", "-b", "v2.qcow2", "-F", "qcow2"],
    );
    io(
        dir,
        "v2top.qcow2",
        &["write -P 0x98 64k 64k", "write -z 0 4k"],
    );
    let top = assert_image(dir, "v2top.qcow2");
    assert_eq!(top.header().backing_format.as_deref(), Some("qcow2"));
    assert_map_matches(dir, "v2top.qcow2", &top.layer(Layer::Active).unwrap());
}

#[test]
fn snapshots_including_a_deleted_middle_one() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "s.qcow2", "4M", &[]);
    let rounds = [
        ("mon", "write -P 0x01 0 1M"),
        ("tue", "write -P 0x02 64k 64k"),
        ("wed", "write -z 512k 128k"),
        ("thu", "discard 0 64k"),
        ("fri", "write -P 0x05 3M 100k"),
    ];
    for (name, cmd) in rounds {
        io(dir, "s.qcow2", &[cmd]);
        qemu_img(dir, &["snapshot", "-c", name, "s.qcow2"]);
    }
    io(dir, "s.qcow2", &["write -P 0x06 0 4k"]);
    qemu_img(dir, &["snapshot", "-d", "tue", "s.qcow2"]);
    let image = assert_image(dir, "s.qcow2");
    let names: Vec<_> = image.snapshots().iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["mon", "wed", "thu", "fri"]);
    assert_eq!(image.find_snapshot("wed").unwrap(), 1);
    assert_eq!(image.find_snapshot("3").unwrap(), 1, "wed has id 3");
    assert!(image.find_snapshot("tue").is_err());
    assert!(image.find_snapshot("2").is_err());
    let mut guids: Vec<_> = image.snapshots().iter().map(|s| s.guid()).collect();
    guids.dedup();
    assert_eq!(guids.len(), 4);
    assert!(image.snapshots().iter().all(|s| s.disk_size == 4 << 20));
    // A snapshot's L1 covers the disk only.
    assert_eq!(image.layer(Layer::Snapshot(0)).unwrap().l1().len(), 1);
    assert!(image.layer(Layer::Snapshot(9)).is_err());
}

#[test]
fn resized_image_keeps_the_snapshot_size() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "r.qcow2", "4M", &[]);
    io(
        dir,
        "r.qcow2",
        &["write -P 0x21 0 1M", "write -P 0x22 4128768 65536"],
    );
    qemu_img(dir, &["snapshot", "-c", "small", "r.qcow2"]);
    qemu_img(dir, &["resize", "r.qcow2", "40M"]);
    io(
        dir,
        "r.qcow2",
        &["write -P 0x23 6M 1M", "write -P 0x24 39M 64k"],
    );
    let image = assert_image(dir, "r.qcow2");
    assert_eq!(image.virtual_size(), 40 << 20);
    assert_eq!(image.snapshots()[0].disk_size, 4 << 20);
    let snap = image.layer(Layer::Snapshot(0)).unwrap();
    assert_eq!(snap.size(), 4 << 20);
    assert!(snap.read_at(&mut [0u8; 1], 4 << 20).is_err());
    assert_eq!(image.layer(Layer::Active).unwrap().l1().len(), 1);
}

#[test]
fn qcow2_backing_chain_with_relative_names() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "base.qcow2", "4M", &[]);
    io(
        dir,
        "base.qcow2",
        &["write -P 0xb0 0 4M", "write -z 1M 64k"],
    );
    create(dir, "mid.qcow2", "6M", &["-b", "base.qcow2", "-F", "qcow2"]);
    io(
        dir,
        "mid.qcow2",
        &[
            "write -P 0xc0 64k 64k",
            "write -P 0xc1 5M 64k",
            "write -z 2M 64k",
        ],
    );
    std::fs::create_dir(dir.join("sub")).unwrap();
    create(
        dir,
        "sub/top.qcow2",
        "8M",
        &["-b", "../mid.qcow2", "-F", "qcow2"],
    );
    io(
        dir,
        "sub/top.qcow2",
        &["write -P 0xd0 128k 4k", "discard 0 64k", "write -z 3M 64k"],
    );
    qemu_img(dir, &["snapshot", "-c", "snap", "sub/top.qcow2"]);
    io(dir, "sub/top.qcow2", &["write -P 0xd1 200k 4k"]);
    let image = assert_image(dir, "sub/top.qcow2");
    assert_eq!(image.header().backing_file.as_deref(), Some("../mid.qcow2"));
    assert_eq!(image.header().backing_format.as_deref(), Some("qcow2"));
    assert_eq!(image.backing_path().unwrap(), dir.join("sub/../mid.qcow2"));
    let layer = image.layer(Layer::Active).unwrap();
    assert!(layer.has_backing());
    assert_map_matches(dir, "sub/top.qcow2", &layer);
    assert_map_matches(
        dir,
        "mid.qcow2",
        &open(dir, "mid.qcow2").layer(Layer::Active).unwrap(),
    );
}

#[test]
fn raw_backing_file() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::File::create(dir.join("base.raw"))
        .unwrap()
        .set_len(3 << 20)
        .unwrap();
    io_fmt(
        dir,
        "raw",
        "base.raw",
        &["write -P 0xe0 0 1M", "write -P 0xe1 2M 4k"],
    );
    create(dir, "top.qcow2", "4M", &["-b", "base.raw", "-F", "raw"]);
    io(
        dir,
        "top.qcow2",
        &["write -P 0xf0 512k 64k", "write -z 2M 64k"],
    );
    let image = assert_image(dir, "top.qcow2");
    assert_eq!(image.header().backing_format.as_deref(), Some("raw"));
    let layer = image.layer(Layer::Active).unwrap();
    // qemu calls holes of a raw file "zero", this reader "hole": compare data against the rest.
    let (qemu, ours) = (qemu_map(dir, "top.qcow2"), our_map(&layer));
    for &(at, _) in qemu.iter().chain(ours.iter()) {
        let is_data = |m: &Map| alloc_at(m, at) == Allocation::Data;
        assert_eq!(is_data(&ours), is_data(&qemu), "status at {at:#x}");
    }
    assert_eq!(
        layer.status(2 << 20, 1 << 20).unwrap(),
        (Allocation::Zero, 64 << 10)
    );
    assert_eq!(
        layer.status(3 << 20, 1 << 20).unwrap(),
        (Allocation::Hole, 1 << 20)
    );
}

#[test]
fn bitmap_directory_lists_bitmaps() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "b.qcow2", "16M", &[]);
    qemu_img(dir, &["bitmap", "--add", "b.qcow2", "b0"]);
    qemu_img(
        dir,
        &[
            "bitmap",
            "--add",
            "-g",
            "4096",
            "--disable",
            "b.qcow2",
            "second",
        ],
    );
    io(dir, "b.qcow2", &["write -P 0x01 0x30000 4k"]);
    let image = open(dir, "b.qcow2");
    assert!(image.bitmaps_consistent());
    let list = image.bitmaps().unwrap();
    let summary: Vec<_> = list
        .iter()
        .map(|b| (b.name.as_str(), b.granularity_bits, b.auto, b.in_use))
        .collect();
    assert_eq!(
        summary,
        [("b0", 16, true, false), ("second", 12, false, false)]
    );
    assert!(list
        .iter()
        .all(|b| b.table_size == 1 && b.table_offset % 65536 == 0));
}

#[test]
fn layers_are_shareable_between_threads() {
    fn assert_send_sync_clone<T: Send + Sync + Clone>() {}
    assert_send_sync_clone::<Qcow2Image>();
    assert_send_sync_clone::<Qcow2Layer>();
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "t.qcow2", "8M", &[]);
    io(dir, "t.qcow2", MIXED_WRITES);
    let expected = convert(dir, "t.qcow2", None);
    let layer = open(dir, "t.qcow2").layer(Layer::Active).unwrap();
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| check_random_reads("threads", &layer, &expected));
        }
    });
}

/// A seeded history of writes, zero writes, discards and compressed writes with snapshots in
/// between; every layer must match qemu.
fn random_history(opts: &[&str], cluster: u64, seed: u64) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let size = 8u64 << 20;
    create(dir, "h.qcow2", "8M", opts);
    let mut x = seed;
    let mut next = move |n: u64| {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (x >> 17) % n
    };
    // Compressed writes need whole clusters that were never written: do them first.
    let mut clusters: Vec<u64> = (0..size / cluster).collect();
    let mut cmds: Vec<String> = (0..(size / cluster / 2).min(6))
        .map(|i| {
            let c = clusters.swap_remove(next(clusters.len() as u64) as usize);
            format!("write -c -P {} {} {cluster}", 0x40 + i, c * cluster)
        })
        .collect();
    for round in 0..4 {
        for _ in 0..12 {
            let (off, len) = (next(size - 1), 1 + next(300_000));
            let len = len.min(size - off);
            cmds.push(match next(4) {
                0 | 1 => format!("write -P {} {off} {len}", 1 + next(250)),
                2 => format!("write -z {off} {len}"),
                _ => format!("discard {off} {len}"),
            });
        }
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        io(dir, "h.qcow2", &refs);
        cmds.clear();
        if round < 3 {
            qemu_img(dir, &["snapshot", "-c", &format!("r{round}"), "h.qcow2"]);
        }
    }
    qemu_img(dir, &["snapshot", "-d", "r1", "h.qcow2"]);
    let image = assert_image(dir, "h.qcow2");
    assert_eq!(image.snapshots().len(), 2);
    assert_map_matches(dir, "h.qcow2", &image.layer(Layer::Active).unwrap());
}

#[test]
fn random_history_4k_clusters() {
    require_qemu!();
    random_history(&["-o", "cluster_size=4k"], 4096, 1);
}

#[test]
fn random_history_64k_zstd() {
    require_qemu!();
    random_history(&["-o", "compression_type=zstd"], 65536, 2);
}

#[test]
fn random_history_extended_l2() {
    require_qemu!();
    random_history(&["-o", "extended_l2=on,cluster_size=64k"], 65536, 3);
}

#[test]
fn random_history_2m_clusters() {
    require_qemu!();
    random_history(&["-o", "cluster_size=2M"], 2 << 20, 4);
}
