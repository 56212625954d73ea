//! [`Qcow2Layer::own_status`] against qemu as the oracle: what an overlay holds itself must
//! be what `qemu-img map --output=json` reports at `"depth": 0` with `"present": true`
//! (data, compressed data, or zeros), whatever its backing file holds.

#[macro_use]
#[allow(dead_code, unused_macros)]
mod qcow2_oracle;

use std::path::Path;

use blkdelta_common::image::qcow2::{Layer, OwnAllocation, Qcow2Layer};
use blkdelta_common::image::BlockSource;
use qcow2_oracle::{create, io, io_fmt, json_field, open, qemu_img, run};

/// A piecewise-constant map: (start, kind) at every change.
type OwnMap = Vec<(u64, OwnAllocation)>;

fn at(map: &OwnMap, offset: u64) -> OwnAllocation {
    map.iter()
        .rev()
        .find(|(s, _)| *s <= offset)
        .expect("map starts at 0")
        .1
}

/// qemu's view of what the top layer holds: depth 0 and present.
fn qemu_own_map(dir: &Path, img: &str) -> OwnMap {
    let out = run(
        dir,
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", img],
    );
    let text = String::from_utf8(out).unwrap();
    text.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            let own = json_field(l, "depth") == "0" && json_field(l, "present") == "true";
            let kind = match (own, json_field(l, "data"), json_field(l, "compressed")) {
                (false, _, _) => OwnAllocation::Unallocated,
                (true, "true", "true") => OwnAllocation::Compressed,
                (true, "true", _) => OwnAllocation::Data,
                (true, _, _) => OwnAllocation::Zero,
            };
            (json_field(l, "start").parse().unwrap(), kind)
        })
        .collect()
}

/// Our map, asking for varying lengths; checks each answer's bounds.
fn our_own_map(layer: &Qcow2Layer) -> OwnMap {
    let (mut map, mut pos, mut ask) = (OwnMap::new(), 0u64, u64::MAX);
    while pos < layer.size() {
        let (kind, len) = layer.own_status(pos, ask).unwrap();
        assert!(len >= 1 && len <= ask && pos + len <= layer.size());
        map.push((pos, kind));
        pos += len;
        ask = if ask == u64::MAX { 99_999 } else { u64::MAX };
    }
    map
}

fn assert_own_map_matches(dir: &Path, img: &str) {
    let layer = open(dir, img).layer(Layer::Active).unwrap();
    let (qemu, ours) = (qemu_own_map(dir, img), our_own_map(&layer));
    for &(offset, _) in qemu.iter().chain(ours.iter()) {
        assert_eq!(
            at(&ours, offset),
            at(&qemu, offset),
            "{img}: own status at {offset:#x}\nqemu {qemu:?}\nours {ours:?}"
        );
    }
}

/// What the overlays write: data at odd offsets, zero writes, discards, compressed clusters.
const OVERLAY_WRITES: &[&str] = &[
    "write -P 0x21 64k 64k",
    "write -P 0x22 200000 7000",
    "write -z 1M 64k",
    "write -z 1100000 5000",
    "discard 2M 128k",
    "write -P 0x24 5M 100k",
];

/// base (4M, full of data) ← o1 (6M) ← o2, each overlay made with a relative `-b` name; o1
/// also gets a compressed cluster (qemu compresses whole, aligned clusters only).
fn chain(dir: &Path, opts: &[&str], cluster: u64) {
    create(dir, "base.qcow2", "4M", opts);
    io(dir, "base.qcow2", &["write -P 0xb0 0 4M"]);
    let mut o1 = vec!["-b", "base.qcow2", "-F", "qcow2"];
    o1.extend_from_slice(opts);
    create(dir, "o1.qcow2", "6M", &o1);
    io(dir, "o1.qcow2", OVERLAY_WRITES);
    let at = (3 << 20) / cluster * cluster;
    io(
        dir,
        "o1.qcow2",
        &[&format!("write -c -P 0x23 {at} {cluster}")],
    );
    let mut o2 = vec!["-b", "o1.qcow2", "-F", "qcow2"];
    o2.extend_from_slice(opts);
    create(dir, "o2.qcow2", "6M", &o2);
    io(
        dir,
        "o2.qcow2",
        &["write -P 0x31 0 4k", "write -z 3M 64k", "discard 64k 64k"],
    );
}

#[test]
fn overlays_with_64k_clusters() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    chain(tmp.path(), &[], 64 << 10);
    for img in ["base.qcow2", "o1.qcow2", "o2.qcow2"] {
        assert_own_map_matches(tmp.path(), img);
    }
}

#[test]
fn overlays_with_extended_l2_subclusters() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    chain(
        tmp.path(),
        &["-o", "extended_l2=on,cluster_size=64k"],
        64 << 10,
    );
    io(
        tmp.path(),
        "o2.qcow2",
        &["write -P 0x32 4100000 3000", "write -z 4200000 2048"],
    );
    for img in ["o1.qcow2", "o2.qcow2"] {
        assert_own_map_matches(tmp.path(), img);
    }
}

#[test]
fn overlays_with_512_byte_and_2m_clusters() {
    require_qemu!();
    for (opts, cluster) in [("cluster_size=512", 512), ("cluster_size=2M", 2 << 20)] {
        let tmp = tempfile::tempdir().unwrap();
        chain(tmp.path(), &["-o", opts], cluster);
        assert_own_map_matches(tmp.path(), "o1.qcow2");
        assert_own_map_matches(tmp.path(), "o2.qcow2");
    }
}

#[test]
fn version_2_overlay() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    chain(tmp.path(), &["-o", "compat=0.10"], 64 << 10);
    assert_own_map_matches(tmp.path(), "o1.qcow2");
    assert_own_map_matches(tmp.path(), "o2.qcow2");
}

#[test]
fn overlay_of_a_raw_file() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::File::create(dir.join("base.raw"))
        .unwrap()
        .set_len(4 << 20)
        .unwrap();
    io_fmt(dir, "raw", "base.raw", &["write -P 0xe0 0 3M"]);
    create(dir, "top.qcow2", "6M", &["-b", "base.raw", "-F", "raw"]);
    io(dir, "top.qcow2", OVERLAY_WRITES);
    assert_own_map_matches(dir, "top.qcow2");
}

#[test]
fn grown_overlay_holds_only_what_it_wrote() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    chain(dir, &[], 64 << 10);
    qemu_img(dir, &["resize", "-q", "o2.qcow2", "20M"]);
    io(dir, "o2.qcow2", &["write -P 0x41 18M 64k"]);
    assert_own_map_matches(dir, "o2.qcow2");
}

/// An overlay of a 1 TiB disk with two small writes: a few calls cover it, since runs of
/// empty L1 entries (512 MiB each here) are skipped in one step.
#[test]
fn mostly_empty_large_overlay_costs_its_metadata() {
    require_qemu!();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    create(dir, "base.qcow2", "1T", &[]);
    create(dir, "top.qcow2", "1T", &["-b", "base.qcow2", "-F", "qcow2"]);
    io(
        dir,
        "top.qcow2",
        &["write -P 1 100G 64k", "write -z 700G 128k"],
    );
    let layer = open(dir, "top.qcow2").layer(Layer::Active).unwrap();
    let (mut pos, mut calls, mut held) = (0u64, 0, Vec::new());
    while pos < layer.size() {
        let (kind, len) = layer.own_status(pos, u64::MAX).unwrap();
        if kind.is_held() {
            held.push((pos, len, kind));
        }
        pos += len;
        calls += 1;
    }
    assert_eq!(
        held,
        vec![
            (100 << 30, 64 << 10, OwnAllocation::Data),
            (700 << 30, 128 << 10, OwnAllocation::Zero)
        ]
    );
    assert!(calls <= 5, "{calls} calls");
    assert_own_map_matches(dir, "top.qcow2");
}
