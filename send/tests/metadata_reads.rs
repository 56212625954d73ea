//! The cost of finding an incremental's changes in metadata (and, in the last test, of a
//! whole send, which finds them once): on a 1 TiB qcow2 with 10,000
//! scattered changed clusters, `send --dry-run` (the plan of `plan_transitions`) reads the L1
//! tables and exactly the L2 tables that the two L1 tables say changed, and no guest data.
//!
//! The image is built at test time with qemu-img and qemu-io (sparse: about 900 MiB of file).
//! The expected number of L2 reads is computed from the two snapshots' L1 tables, read here
//! straight from the file (header, snapshot table, L1), independently of the reader under test.
//! `bench/metadata.sh` builds the same fixture (same generator, same seed) to time the dry run.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;

use blkdelta_common::extent::{Extent, ExtentKind};
use blkdelta_common::image::qcow2::Layer;
use blkdelta_common::image::BlockSource;
use blkdelta_common::testing::{have, Rng};
use blkdelta_send::pipeline::{plan_transitions, send, SendOptions};
use blkdelta_send::source::{Qcow2Snapshots, SnapshotSpec};
use blkdelta_send::{ChangeSource, NoProgress};

const CLUSTER: u64 = 64 << 10;
/// Entries of one L2 table with 64 KiB clusters: one table maps 512 MiB.
const L2_ENTRIES: u64 = CLUSTER / 8;
const SPAN: u64 = CLUSTER * L2_ENTRIES;
const SIZE: u64 = 1 << 40;
/// L1 entries of the 1 TiB disk.
const RANGES: u64 = SIZE / SPAN;
/// L2 ranges the changes after s1 fall in (a quarter of the disk's): the rest keep the L2
/// tables s1 has, so a diff that read every table would read four times what it needs.
const CHANGED_RANGES: usize = 512;
/// Clusters written after s1, all distinct.
const CHANGED: usize = 10_000;
/// Of those, how many overwrite a cluster s1 holds (copy on write of a shared data cluster).
const OVERWRITES: usize = 100;
/// `-c` commands per qemu-io call.
const BATCH: usize = 1000;
const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// The fixture's writes as guest cluster indices: one cluster in every L2 range before s1,
/// then the changed clusters (in write order), and the L2 ranges those fall in.
struct Plan {
    base: Vec<u64>,
    changed: Vec<u64>,
    changed_ranges: BTreeSet<u64>,
}

fn plan(seed: u64, changed_ranges: usize) -> Plan {
    let mut rng = Rng(seed);
    let base: Vec<u64> = (0..RANGES)
        .map(|r| r * L2_ENTRIES + rng.below(L2_ENTRIES))
        .collect();
    let mut perm: Vec<u64> = (0..RANGES).collect();
    for i in (1..perm.len()).rev() {
        let j = rng.below(i as u64 + 1) as usize;
        perm.swap(i, j);
    }
    let chosen = &perm[..changed_ranges];
    let mut seen = BTreeSet::new();
    let mut changed = Vec::with_capacity(CHANGED);
    for &r in &chosen[..OVERWRITES] {
        seen.insert(base[r as usize]);
        changed.push(base[r as usize]);
    }
    while changed.len() < CHANGED {
        let r = chosen[rng.below(chosen.len() as u64) as usize];
        let c = r * L2_ENTRIES + rng.below(L2_ENTRIES);
        if seen.insert(c) {
            changed.push(c);
        }
    }
    Plan {
        base,
        changed,
        changed_ranges: chosen.iter().copied().collect(),
    }
}

/// The byte pattern of the `i`-th write of a batch list (never 0).
fn pattern(i: usize) -> u8 {
    (i % 255) as u8 + 1
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("error"),
        "{cmd:?} failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// How qemu opens the fixture: no flushes (it is thrown away), and L2 and refcount caches
/// that cover the whole disk, which makes the writes and snapshots several times faster.
fn image_opts(img: &Path) -> String {
    format!(
        "driver=qcow2,file.filename={},cache.no-flush=on,l2-cache-size=128M,\
         refcount-cache-size=8M",
        img.display()
    )
}

/// Writes 64 KiB clusters `clusters` with qemu-io, `BATCH` commands per call.
fn write_clusters(img: &Path, clusters: &[u64]) {
    for (b, batch) in clusters.chunks(BATCH).enumerate() {
        let mut cmd = Command::new("qemu-io");
        cmd.arg("--image-opts");
        for (k, c) in batch.iter().enumerate() {
            let p = pattern(b * BATCH + k);
            cmd.arg("-c")
                .arg(format!("write -q -P {p} {} 64k", c * CLUSTER));
        }
        run(cmd.arg(image_opts(img)));
    }
}

/// `qemu-img snapshot -c NAME`.
fn snapshot(img: &Path, name: &str) {
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", name, "--image-opts"])
        .arg(image_opts(img)));
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn be16(b: &[u8], at: usize) -> usize {
    u16::from_be_bytes(b[at..at + 2].try_into().unwrap()) as usize
}

/// `len` bytes of `file` at `offset`.
fn bytes_at(file: &File, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    file.read_exact_at(&mut buf, offset).unwrap();
    buf
}

/// The disk-range L1 entries of each named snapshot, parsed from the file (qemu's docs/interop/qcow2.rst: the header and the snapshot table).
fn snapshot_l1s(img: &Path, names: &[&str]) -> Vec<Vec<u64>> {
    let file = File::open(img).unwrap();
    let h = bytes_at(&file, 0, 72);
    assert_eq!(&h[..4], b"QFI\xfb");
    assert_eq!(be32(&h, 20), 16, "64 KiB clusters");
    let (count, mut at) = (be32(&h, 60), be64(&h, 64));
    let mut found = vec![None; names.len()];
    for _ in 0..count {
        let e = bytes_at(&file, at, 40);
        let (l1_offset, l1_size) = (be64(&e, 0), be32(&e, 8) as usize);
        let (id_len, name_len) = (be16(&e, 12), be16(&e, 14));
        let extra_len = be32(&e, 36) as usize;
        assert!(
            extra_len >= 16,
            "qemu writes the disk size in the extra data"
        );
        let rest = bytes_at(&file, at + 40, extra_len + id_len + name_len);
        let disk_size = be64(&rest, 8);
        let name = std::str::from_utf8(&rest[extra_len + id_len..]).unwrap();
        if let Some(i) = names.iter().position(|n| *n == name) {
            let entries = l1_size.min(disk_size.div_ceil(SPAN) as usize);
            let raw = bytes_at(&file, l1_offset, 8 * entries);
            found[i] = Some(raw.chunks_exact(8).map(|w| be64(w, 0)).collect());
        }
        at = (at + 40 + rest.len() as u64).next_multiple_of(8);
    }
    found
        .into_iter()
        .zip(names)
        .map(|(l1, n)| l1.unwrap_or_else(|| panic!("no snapshot {n}")))
        .collect()
}

/// The guest clusters, merged into runs, as the data extents of a change list.
fn merged(clusters: &[u64]) -> Vec<Extent> {
    let mut sorted = clusters.to_vec();
    sorted.sort_unstable();
    let mut runs: Vec<Extent> = Vec::new();
    for c in sorted {
        match runs.last_mut() {
            Some(e) if e.end() == c * CLUSTER => e.len += CLUSTER,
            _ => runs.push(Extent::new(c * CLUSTER, CLUSTER, ExtentKind::Data)),
        }
    }
    runs
}

fn open_range(img: &Path) -> Qcow2Snapshots {
    let spec = SnapshotSpec::Range {
        from: "s1".into(),
        to: "s2".into(),
    };
    Qcow2Snapshots::open(img, &spec).unwrap()
}

#[test]
fn dry_run_of_1tib_image_reads_only_the_changed_l2_tables() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let dir = tempfile::Builder::new()
        .prefix("blkdelta-meta")
        .tempdir()
        .unwrap();
    let img = dir.path().join("img.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg("1T"));
    let p = plan(42, CHANGED_RANGES);
    write_clusters(&img, &p.base);
    snapshot(&img, "s1");
    write_clusters(&img, &p.changed);
    snapshot(&img, "s2");

    // What the L1 tables require: for each index whose entries differ, one table per side
    // with an entry; an equal entry costs nothing.
    let l1s = snapshot_l1s(&img, &["s1", "s2"]);
    let (a, b) = (&l1s[0], &l1s[1]);
    assert_eq!((a.len(), b.len()), (RANGES as usize, RANGES as usize));
    let table = |e: u64| e & L1E_OFFSET_MASK;
    let differing: BTreeSet<u64> = (0..a.len())
        .filter(|&i| table(a[i]) != table(b[i]))
        .map(|i| i as u64)
        .collect();
    let expected = differing
        .iter()
        .map(|&i| u64::from(table(a[i as usize]) != 0) + u64::from(table(b[i as usize]) != 0))
        .sum::<u64>();
    let every_table = a.iter().chain(b).filter(|&&e| table(e) != 0).count() as u64;
    // The fixture is what it should be: s1 has a table in every L2 range, writing into a
    // range after s1 copied its table, and the other ranges share s1's tables.
    assert_eq!(differing, p.changed_ranges);
    assert_eq!(expected, 2 * CHANGED_RANGES as u64);
    assert_eq!(every_table, 2 * RANGES);

    // The dry run: plan_transitions, on the source `send IMG@s1..s2` opens.
    let source = open_range(&img);
    for (which, l1) in [(0, a), (1, b)] {
        let layer = source.image().layer(Layer::Snapshot(which)).unwrap();
        assert_eq!(layer.l1(), &l1[..], "the reader's L1 of snapshot {which}");
    }
    assert_eq!(
        source.image().read_counts().l2_tables,
        0,
        "opening reads L1 tables only"
    );
    let totals = plan_transitions(&source).unwrap();
    let reads = source.image().read_counts();
    let want = merged(&p.changed);
    eprintln!(
        "1 TiB, {CHANGED} changed clusters in {} extents: {} L2 tables loaded, {expected} \
         required, {every_table} in the two snapshots, {} data reads",
        want.len(),
        reads.l2_tables,
        reads.data_reads
    );
    // Reading every table would load 4096 (2048 per snapshot); the diff needs 1024.
    assert_eq!(reads.l2_tables, expected, "L2 tables loaded by the dry run");
    assert!(4 * reads.l2_tables <= every_table);
    assert_eq!(reads.data_reads, 0, "the dry run read guest data");
    assert_eq!(totals.len(), 1);
    assert_eq!(totals[0].data_bytes, CHANGED as u64 * CLUSTER);
    assert_eq!(totals[0].zero_bytes, 0);
    assert_eq!(totals[0].extents, want.len() as u64);

    // The extents themselves, from a fresh source (empty caches): exactly the written
    // clusters, at the same cost.
    let source = open_range(&img);
    let mut got: Vec<Extent> = Vec::new();
    source.changes(0, &mut got).unwrap();
    assert!(
        got == want,
        "the changes are not exactly the written clusters"
    );
    assert_eq!(source.image().read_counts().l2_tables, expected);
    assert_eq!(source.image().read_counts().data_reads, 0);

    // Reading data is what the data counter sees: the last cluster written, one read.
    let last = *p.changed.last().unwrap();
    let mut buf = vec![0u8; CLUSTER as usize];
    source.reader(0).read_at(&mut buf, last * CLUSTER).unwrap();
    assert!(buf.iter().all(|&x| x == pattern(CHANGED - 1)));
    let after = source.image().read_counts();
    assert_eq!((after.data_reads, after.data_bytes), (1, CLUSTER));
}

/// A whole send finds the changes once: the L2 tables of a snapshot diff are read once for
/// the totals and the records together, and the data reads look up `to`'s tables once more
/// (the diff's pass left other tables in the cache of 64). Finding the changes a second time
/// for the records, as the pipeline did, read 600 tables here instead of 450: each differing
/// table of both snapshots again, while the data reads then found `to`'s tables cached.
#[test]
fn send_reads_each_changed_l2_table_once() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    const TABLES: u64 = 150;
    let dir = tempfile::Builder::new()
        .prefix("blkdelta-meta-send")
        .tempdir()
        .unwrap();
    let img = dir.path().join("img.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(&img)
        .arg(format!("{}", 256 * SPAN)));
    let first: Vec<u64> = (0..TABLES).map(|r| r * L2_ENTRIES).collect();
    let second: Vec<u64> = (0..TABLES).map(|r| r * L2_ENTRIES + 1).collect();
    write_clusters(&img, &first);
    snapshot(&img, "s1");
    write_clusters(&img, &second);
    snapshot(&img, "s2");
    let l1s = snapshot_l1s(&img, &["s1", "s2"]);
    let table = |e: u64| e & L1E_OFFSET_MASK;
    let expected = (0..l1s[0].len())
        .filter(|&i| table(l1s[0][i]) != table(l1s[1][i]))
        .map(|i| u64::from(table(l1s[0][i]) != 0) + u64::from(table(l1s[1][i]) != 0))
        .sum::<u64>();
    assert_eq!(expected, 2 * TABLES);

    let source = open_range(&img);
    let opts = SendOptions {
        level: 0,
        threads: 2,
    };
    let summary = send(&source, &opts, std::io::sink(), &NoProgress).unwrap();
    assert_eq!(summary.data_bytes, TABLES * CLUSTER);
    let reads = source.image().read_counts();
    eprintln!(
        "send of {TABLES} changed L2 ranges: {} L2 tables loaded, {expected} for the diff and \
         {TABLES} for the data reads",
        reads.l2_tables
    );
    assert_eq!(
        reads.l2_tables,
        expected + TABLES,
        "L2 tables loaded by the send"
    );
}
