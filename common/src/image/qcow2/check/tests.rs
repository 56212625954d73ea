//! Checks against qemu as the oracle: images made at test time by qemu-img and qemu-io must
//! check clean, with computed refcounts equal to the stored ones everywhere, as
//! `qemu-img check` finds them; [`corruptions`] patches bytes of such images and expects the
//! error or report that matches qemu-img check's verdict.

mod corruptions;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{check, CheckReport, RefcountMismatch};
use crate::image::qcow2::tables::L1E_OFFSET_MASK;
use crate::image::qcow2::{Layer, Qcow2Image};
use crate::testing::have;
use crate::ImageError;

/// A scratch directory of qcow2 images.
struct Scratch {
    dir: tempfile::TempDir,
}

impl Scratch {
    fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("blkdelta-check")
            .tempdir()
            .unwrap();
        Scratch { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `qemu-img create -f qcow2 -o OPTS NAME SIZE`.
    fn create(&self, name: &str, size: &str, opts: &str) -> PathBuf {
        let p = self.path(name);
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        qemu_img(&[&args[..], &[p.to_str().unwrap(), size]].concat());
        p
    }
}

/// Runs a program and panics with its output unless it succeeds.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

fn qemu_img(args: &[&str]) -> String {
    run(Command::new("qemu-img").args(args))
}

/// Runs qemu-io commands on an image.
fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    run(cmd.arg(img));
}

fn snapshot(img: &Path, flag: &str, name: &str) {
    qemu_img(&["snapshot", flag, name, img.to_str().unwrap()]);
}

/// qemu-img check's verdict: (exit status: 0 clean, 2 corruptions, 3 leaks; its output).
fn qemu_verdict(img: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-f", "qcow2"])
        .arg(img)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Opens the image as a writer would and checks it.
fn check_image(img: &Path) -> Result<CheckReport, ImageError> {
    let image = Qcow2Image::open(img)?;
    let file = File::open(img).unwrap();
    check(&file, image.file_len(), image.header(), image.snapshots())
}

/// Asserts that qemu-img check finds the image clean, and that so does the check: no
/// error, no leak, no COPIED mismatch, computed == stored for every cluster.
#[track_caller]
fn assert_consistent(img: &Path) -> CheckReport {
    let (status, text) = qemu_verdict(img);
    assert_eq!(status, 0, "qemu-img check {}:\n{text}", img.display());
    let report = check_image(img).unwrap_or_else(|e| panic!("{}: {e}", img.display()));
    let mismatches: Vec<RefcountMismatch> = report.mismatches().take(8).collect();
    assert!(mismatches.is_empty(), "{}: {mismatches:?}", img.display());
    assert!(report.is_clean(), "{}: {report:?}", img.display());
    assert_eq!(report.undercounted_clusters, 0);
    let file_len = std::fs::metadata(img).unwrap().len();
    let cs = Qcow2Image::open(img).unwrap().header().cluster_size();
    assert_eq!(report.computed.len() as u64, file_len.div_ceil(cs));
    report
}

fn read_u64(img: &Path, offset: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(img)
        .unwrap()
        .read_exact_at(&mut b, offset)
        .unwrap();
    u64::from_be_bytes(b)
}

fn write_u64(img: &Path, offset: u64, value: u64) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(&value.to_be_bytes(), offset).unwrap();
}

/// File offset of the active L2 entry mapping guest cluster `guest_cluster`, and the entry
/// (its standard word; with extended L2 entries, the subcluster bitmap follows it).
fn active_l2_entry(img: &Path, guest_cluster: u64) -> (u64, u64) {
    let image = Qcow2Image::open(img).unwrap();
    let g = image.header().geometry();
    let entry_bytes = if g.extended_l2 { 16 } else { 8 };
    let layer = image.layer(Layer::Active).unwrap();
    let l1 = layer.l1()[(guest_cluster / g.l2_entries) as usize];
    let at = (l1 & L1E_OFFSET_MASK) + (guest_cluster % g.l2_entries) * entry_bytes;
    (at, read_u64(img, at))
}

/// How many clusters have more than one reference.
fn shared(report: &CheckReport) -> usize {
    report.computed.iter().filter(|&&c| c > 1).count()
}

/// A small history: data, a snapshot, rewrites that copy clusters and L2 tables, a zero write
/// on a shared cluster, a discard, a second snapshot and writes after it.
fn history(s: &Scratch, name: &str, opts: &str) -> PathBuf {
    let img = s.create(name, "64M", opts);
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 4M",
            "write -P 0x12 33M 1M",
            "write -P 0x13 60M 64k",
        ],
    );
    snapshot(&img, "-c", "s1");
    qemu_io(
        &img,
        &[
            "write -P 0x21 1M 128k",
            "write -z 2M 64k",
            "discard 3M 64k",
            "write -P 0x22 40M 2k",
        ],
    );
    snapshot(&img, "-c", "s2");
    qemu_io(&img, &["write -P 0x31 0 4k", "write -P 0x32 33M 512"]);
    img
}

#[test]
fn fresh_images_check_clean() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let opts = [
        "",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "refcount_bits=1",
        "refcount_bits=2",
        "refcount_bits=8",
        "refcount_bits=32",
        "refcount_bits=64",
        "compat=0.10",
    ];
    for (i, o) in opts.iter().enumerate() {
        let empty = s.create(&format!("empty{i}.qcow2"), "64M", o);
        assert_consistent(&empty);
        let img = s.create(&format!("written{i}.qcow2"), "64M", o);
        qemu_io(
            &img,
            &["write -P 1 0 1M", "write -z 8M 1M", "write -P 2 63M 3k"],
        );
        let report = assert_consistent(&img);
        assert!(report.computed.iter().all(|&c| c <= 1), "{o}: {report:?}");
    }
    let zero_size = s.create("zero-size.qcow2", "0", "");
    assert_consistent(&zero_size);
}

#[test]
fn snapshots_share_l2_tables_and_data() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let opts = [
        "",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "refcount_bits=2",
        "refcount_bits=64",
        "compat=0.10",
    ];
    for (i, o) in opts.iter().enumerate() {
        let img = history(&s, &format!("h{i}.qcow2"), o);
        let report = assert_consistent(&img);
        assert!(shared(&report) > 0, "{o}: nothing shared");
        // Deleting a snapshot lowers refcounts and restores COPIED flags.
        snapshot(&img, "-d", "s1");
        assert_consistent(&img);
        snapshot(&img, "-d", "s2");
        let report = assert_consistent(&img);
        assert_eq!(shared(&report), 0, "{o}");
    }
}

#[test]
fn compressed_clusters_count_every_cluster_they_touch() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let raw = s.path("data.raw");
    // Compressible data: patterns, so that many compressed clusters share a host cluster.
    // The last 8 MiB stay zero, so unallocated: compressed writes go only there.
    let mut data = vec![0u8; 16 << 20];
    for (i, chunk) in data[..8 << 20].chunks_mut(4096).enumerate() {
        chunk.fill((i % 251) as u8);
        chunk[i % 4096] = 0xff;
    }
    std::fs::write(&raw, &data).unwrap();
    let opts = [
        "",
        "cluster_size=512",
        "cluster_size=2M",
        "extended_l2=on",
        "compression_type=zstd",
        "refcount_bits=64",
    ];
    for (i, o) in opts.iter().enumerate() {
        let img = s.path(&format!("c{i}.qcow2"));
        let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
        if !o.is_empty() {
            args.extend(["-o", o]);
        }
        qemu_img(&[&args[..], &[raw.to_str().unwrap(), img.to_str().unwrap()]].concat());
        let report = assert_consistent(&img);
        assert!(
            shared(&report) > 0,
            "{o}: no host cluster holds two compressed clusters"
        );
        // A snapshot shares them; compressed writes after it add more.
        snapshot(&img, "-c", "s1");
        // Compressed writes take whole clusters.
        let len = if o.contains("2M") { "2M" } else { "64k" };
        let compressed = format!("write -c -P 0x44 12M {len}");
        qemu_io(&img, &[&compressed, "write -P 0x45 1M 4k"]);
        assert_consistent(&img);
    }
}

#[test]
fn bitmap_clusters_are_counted() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    for (i, o) in ["", "cluster_size=512"].iter().enumerate() {
        let img = s.create(&format!("b{i}.qcow2"), "64M", o);
        let p = img.to_str().unwrap();
        qemu_img(&["bitmap", "--add", p, "b0"]);
        qemu_img(&["bitmap", "--add", "-g", "512", p, "fine"]);
        qemu_io(&img, &["write -P 1 0 1M", "write -P 2 40M 64k"]);
        let report = assert_consistent(&img);
        let image = Qcow2Image::open(&img).unwrap();
        assert_eq!(image.bitmaps().unwrap().len(), 2);
        // Data clusters, tables and the directory are all counted.
        assert!(report.computed.iter().filter(|&&c| c == 1).count() > 10);
    }
}

#[test]
fn dirty_images_report_the_refcounts_to_rebuild() {
    if !have("qemu-io") {
        return;
    }
    let s = Scratch::new();
    let img = s.create("lazy.qcow2", "64M", "lazy_refcounts=on");
    // Killed before its refcounts reach the file: the dirty bit stays set.
    let status = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 1 0 64k",
            "-c",
            "write -P 2 1M 192k",
        ])
        .args(["-c", "sigraise 9"])
        .arg(&img)
        .output()
        .unwrap()
        .status;
    assert!(!status.success());
    let report = check_image(&img).unwrap();
    assert!(report.dirty);
    assert!(report.undercounted_clusters > 0);
    assert_eq!(report.copied_mismatches_total, 0);
    // qemu-img check lists every cluster whose refcount differs from its references.
    let (status, text) = qemu_verdict(&img);
    assert_eq!(status, 2, "{text}");
    let qemu = qemu_mismatches(&text);
    let ours: Vec<RefcountMismatch> = report.mismatches().collect();
    assert_eq!(ours, qemu, "{text}");
    // Once qemu-img rebuilt them, they check clean.
    qemu_img(&["check", "-q", "-r", "all", img.to_str().unwrap()]);
    assert_consistent(&img);
}

/// The refcount mismatches qemu-img check lists in its output, in cluster order:
/// `ERROR cluster 5 refcount=0 reference=1`, `Leaked cluster 4 refcount=1 reference=0`
/// (found anywhere: a warning without a newline may precede one).
fn qemu_mismatches(text: &str) -> Vec<RefcountMismatch> {
    let mut found: Vec<RefcountMismatch> = ["ERROR cluster ", "Leaked cluster "]
        .iter()
        .flat_map(|prefix| {
            text.match_indices(prefix)
                .map(|(at, p)| &text[at + p.len()..])
        })
        .filter_map(|rest| {
            let mut words = rest.split_whitespace();
            let cluster = words.next()?.parse().ok()?;
            let stored = words.next()?.strip_prefix("refcount=")?.parse().ok()?;
            let computed = words.next()?.strip_prefix("reference=")?.parse().ok()?;
            Some(RefcountMismatch {
                cluster,
                stored,
                computed,
            })
        })
        .collect();
    found.sort_by_key(|m| m.cluster);
    found.dedup();
    found
}

/// Byte ranges of the metadata of `img`: cluster 0, the active L1 table and its L2 tables,
/// the refcount table and blocks, the snapshot table.
fn metadata_ranges(img: &Path) -> Vec<(u64, u64)> {
    let image = Qcow2Image::open(img).unwrap();
    let h = image.header();
    let cs = h.cluster_size();
    let mut ranges = vec![
        (0, cs),
        (h.l1_table_offset, u64::from(h.l1_size) * 8),
        (
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
        ),
    ];
    if h.nb_snapshots > 0 {
        ranges.push((h.snapshots_offset, cs));
    }
    let layer = image.layer(Layer::Active).unwrap();
    let l2s = layer.l1().iter().map(|e| e & L1E_OFFSET_MASK);
    ranges.extend(l2s.filter(|&o| o != 0).map(|o| (o, cs)));
    let file = File::open(img).unwrap();
    let rc = super::read_refcounts(&file, image.file_len(), h).unwrap();
    let blocks = rc.table().iter().map(|e| e & super::REFT_OFFSET_MASK);
    ranges.extend(blocks.filter(|&o| o != 0).map(|o| (o, cs)));
    ranges
}

/// qemu-img check's exit status for what the check found: 2 for an error or anything qemu
/// counts as corruption (a missing COPIED flag, refcounts below the uses in a dirty image), 3
/// for leaks, 0 for nothing.
fn verdict(found: &Result<CheckReport, ImageError>) -> i32 {
    match found {
        Err(_) => 2,
        Ok(r) if r.copied_mismatches_total > 0 || r.undercounted_clusters > 0 => 2,
        Ok(r) if r.leaked_clusters > 0 => 3,
        Ok(_) => 0,
    }
}

#[test]
fn mutants_get_the_verdict_of_qemu_img_check() {
    const MUTANTS: u32 = 120;
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    for (n, opts) in ["cluster_size=512", "", "extended_l2=on"]
        .iter()
        .enumerate()
    {
        let img = s.create(&format!("base{n}.qcow2"), "4M", opts);
        qemu_img(&["bitmap", "--add", img.to_str().unwrap(), "b0"]);
        qemu_io(&img, &["write -P 1 0 256k", "write -c -P 2 2M 64k"]);
        snapshot(&img, "-c", "s1");
        qemu_io(&img, &["write -P 3 4k 8k", "write -z 128k 1k"]);
        assert_consistent(&img);
        let base = std::fs::read(&img).unwrap();
        let ranges = metadata_ranges(&img);
        let cs = Qcow2Image::open(&img).unwrap().header().cluster_size();
        let clusters = (base.len() as u64).div_ceil(cs);
        let mutant = s.path("mutant.qcow2");
        let mut rng = crate::testing::Rng(0x9e37_79b9_7f4a_7c15 + n as u64);
        for i in 0..MUTANTS {
            let mut bytes = base.clone();
            let mut flips = Vec::new();
            for _ in 0..1 + rng.below(3) {
                let (start, len) = ranges[rng.below(ranges.len() as u64) as usize];
                let at = (start + rng.below(len)) as usize;
                if at + 8 > bytes.len() {
                    continue;
                }
                if rng.below(2) == 0 {
                    let bit = rng.below(8);
                    bytes[at] ^= 1 << bit;
                    flips.push((at, bit));
                } else {
                    // Point an aligned entry at another cluster of the file, flags kept.
                    let at = at & !7;
                    let entry = u64::from_be_bytes(bytes[at..at + 8].try_into().unwrap());
                    let cluster = rng.below(clusters) * cs;
                    let moved = (entry & !L1E_OFFSET_MASK) | cluster;
                    bytes[at..at + 8].copy_from_slice(&moved.to_be_bytes());
                    flips.push((at, 64));
                }
            }
            std::fs::write(&mutant, &bytes).unwrap();
            let ours = check_image(&mutant);
            let (qemu, text) = qemu_verdict(&mutant);
            // qemu-img checks an image marked corrupt, which the check refuses at once; and
            // 1 means qemu-img could not open or check it.
            if matches!(ours, Err(ImageError::MarkedCorrupt)) || (qemu == 1 && ours.is_err()) {
                continue;
            }
            assert_eq!(
                verdict(&ours),
                qemu,
                "{opts} mutant {i}, bits flipped (64: entry moved) {flips:x?}: {ours:?}\nqemu-img check:\n{text}"
            );
        }
    }
}
