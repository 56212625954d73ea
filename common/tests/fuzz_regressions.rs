//! Regression tests for the parsers of untrusted input (the qcow2 reader and the stream
//! decoder): one named test per input the fuzz targets in `fuzz/` found, or that reading the
//! code while fuzzing turned up, each with the input embedded and a comment saying what was
//! wrong. See `fuzz/README.md` to run the fuzzers.

use std::path::Path;

use blkdelta_common::image::qcow2::{Layer, Qcow2Image};
use blkdelta_common::image::{Allocation, BlockSource};

/// A hand-made qcow2 image: a version 3 header, the refcount table in cluster 1 (the reader
/// never looks at it), the L1 table in cluster 2, then `clusters` (cluster index, bytes).
struct Image {
    cluster_bits: u32,
    size: u64,
    l1: Vec<u64>,
    clusters: Vec<(u64, Vec<u8>)>,
    backing: Option<&'static str>,
}

impl Image {
    fn bytes(&self) -> Vec<u8> {
        let cs = 1usize << self.cluster_bits;
        let mut c0 = vec![0u8; cs];
        let put = |b: &mut [u8], at: usize, v: &[u8]| b[at..at + v.len()].copy_from_slice(v);
        put(&mut c0, 0, b"QFI\xfb");
        put(&mut c0, 4, &3u32.to_be_bytes()); // version
        if let Some(name) = self.backing {
            put(&mut c0, 8, &512u64.to_be_bytes()); // backing_file_offset
            put(&mut c0, 16, &(name.len() as u32).to_be_bytes()); // backing_file_size
            put(&mut c0, 512, name.as_bytes());
        }
        put(&mut c0, 20, &self.cluster_bits.to_be_bytes());
        put(&mut c0, 24, &self.size.to_be_bytes());
        put(&mut c0, 36, &(self.l1.len() as u32).to_be_bytes()); // l1_size
        put(&mut c0, 40, &(2 * cs as u64).to_be_bytes()); // l1_table_offset
        put(&mut c0, 48, &(cs as u64).to_be_bytes()); // refcount_table_offset
        put(&mut c0, 56, &1u32.to_be_bytes()); // refcount_table_clusters
        put(&mut c0, 96, &4u32.to_be_bytes()); // refcount_order
        put(&mut c0, 100, &104u32.to_be_bytes()); // header_length; the extension list ends at 104
        let l1: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
        let l1_clusters = l1.len().div_ceil(cs).max(1);
        let mut file = c0;
        file.resize((2 + l1_clusters) * cs, 0);
        put(&mut file, 2 * cs, &l1);
        for (index, bytes) in &self.clusters {
            let at = *index as usize * cs;
            if file.len() < at + cs {
                file.resize(at + cs, 0);
            }
            put(&mut file, at, bytes);
        }
        file
    }

    fn write(&self, dir: &Path, name: &str) -> Qcow2Image {
        let path = dir.join(name);
        std::fs::write(&path, self.bytes()).unwrap();
        Qcow2Image::open(&path).unwrap()
    }
}

/// An L2 table whose every entry is `entry`.
fn l2_of(cluster_bits: u32, entry: u64) -> Vec<u8> {
    (0..(1u64 << cluster_bits) / 8)
        .flat_map(|_| entry.to_be_bytes())
        .collect()
}

/// Found by reading `status` while fuzzing. A layer merged up to 1024 lookups per `status`
/// call and asked its backing file's `status` for every unallocated one, which merged up to
/// 1024 lookups of its own, and so on down the chain: one call did up to 1024^depth lookups.
/// Here an empty overlay over an empty middle layer over a base of 4M one-cluster runs that
/// never merge (every L2 entry names the same host cluster): one call on the overlay made
/// 4M lookups. Fixed: a `status` call asks its backing file at most once, so each level of
/// a chain does at most 1024 lookups.
#[test]
fn status_through_a_backing_chain_does_bounded_work() {
    let tmp = tempfile::tempdir().unwrap();
    let bits = 16;
    let l1_entries = 512u64;
    let size = l1_entries << (2 * bits - 3);
    let base = Image {
        cluster_bits: bits,
        size,
        l1: vec![3 << bits; l1_entries as usize],
        clusters: vec![(3, l2_of(bits, 4 << bits)), (4, vec![0xab; 1 << bits])],
        backing: None,
    };
    base.write(tmp.path(), "base");
    let empty = |backing| Image {
        cluster_bits: bits,
        size,
        l1: vec![0; l1_entries as usize],
        clusters: vec![],
        backing: Some(backing),
    };
    empty("base").write(tmp.path(), "mid");
    let top = empty("mid").write(tmp.path(), "top");
    let layer = top.layer(Layer::Active).unwrap();
    let start = std::time::Instant::now();
    let (kind, len) = layer.status(0, size).unwrap();
    eprintln!("{:?}", start.elapsed());
    assert_eq!(kind, Allocation::Data);
    assert!(
        len <= 1024 << bits,
        "one status call covered {len} bytes: {} lookups of the base",
        len >> bits
    );
}

/// Found by reading `lookup` while fuzzing. One lookup merged every (sub)cluster of an L2
/// table that continued its run (up to 4M with 2 MiB clusters and extended L2), and `status`
/// merges up to 1024 lookups, so L1 entries that all name one table of contiguous clusters
/// made a single call examine up to 4G entries (seconds to minutes from an 8 MiB file). Here
/// 8 L1 entries share a table of 2 MiB clusters: one call examined 2M entries. Fixed: a
/// lookup merges at most 1024 (sub)clusters, so a call examines at most 1024 * 1024.
#[test]
fn status_over_a_shared_uniform_table_does_bounded_work() {
    let tmp = tempfile::tempdir().unwrap();
    let bits = 21;
    let l1_entries = 8u64;
    let size = l1_entries << (2 * bits - 3);
    // Entry i maps cluster i of each L2 range to host cluster 16 + i: one contiguous run.
    let l2 = (0..(1u64 << bits) / 8)
        .flat_map(|i| ((16 + i) << bits).to_be_bytes())
        .collect();
    let image = Image {
        cluster_bits: bits,
        size,
        l1: vec![3 << bits; l1_entries as usize],
        clusters: vec![(3, l2)],
        backing: None,
    }
    .write(tmp.path(), "shared");
    let layer = image.layer(Layer::Active).unwrap();
    let (kind, len) = layer.status(0, size).unwrap();
    assert_eq!(kind, Allocation::Data);
    assert!(
        len >> bits <= 1024 * 1024,
        "one status call examined {} L2 entries",
        len >> bits
    );
}
