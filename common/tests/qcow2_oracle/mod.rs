//! Test support for the qcow2 reader tests: qemu-img / qemu-io fixture builders and the
//! comparisons with qemu's own view of an image (`convert -O raw`, `map --output=json`).

use std::path::Path;
use std::process::Command;

use blkdelta_common::image::qcow2::{Layer, Qcow2Image, Qcow2Layer};
use blkdelta_common::image::{Allocation, BlockSource};

/// Whether qemu-img and qemu-io can run; says loudly what is missing when not.
pub fn have_qemu() -> bool {
    for tool in ["qemu-img", "qemu-io"] {
        if Command::new(tool).arg("--version").output().is_err() {
            assert!(
                std::env::var_os("BLKDELTA_REQUIRE_TOOLS").is_none_or(|v| v != "1"),
                "{} is required (BLKDELTA_REQUIRE_TOOLS=1): apt-get install qemu-utils",
                tool
            );
            eprintln!(
                "SKIPPED: {tool} is not installed (install qemu-utils); qcow2 reader test not run"
            );
            return false;
        }
    }
    true
}

/// Returns from the test (after saying why) when qemu is missing.
macro_rules! require_qemu {
    () => {
        if !$crate::qcow2_oracle::have_qemu() {
            return;
        }
    };
}

pub fn run(dir: &Path, prog: &str, args: &[&str]) -> Vec<u8> {
    let out = Command::new(prog)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {prog}: {e}"));
    assert!(
        out.status.success(),
        "{prog} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `qemu-img create -f qcow2 OPTS NAME SIZE` in `dir`.
pub fn create(dir: &Path, name: &str, size: &str, opts: &[&str]) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    args.extend_from_slice(opts);
    args.extend_from_slice(&[name, size]);
    run(dir, "qemu-img", &args);
}

/// `qemu-io -f FMT -c CMD ... IMG` in `dir`.
pub fn io_fmt(dir: &Path, fmt: &str, img: &str, cmds: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(img);
    run(dir, "qemu-io", &args);
}

pub fn io(dir: &Path, img: &str, cmds: &[&str]) {
    io_fmt(dir, "qcow2", img, cmds);
}

pub fn qemu_img(dir: &Path, args: &[&str]) {
    run(dir, "qemu-img", args);
}

/// What qemu reads: `qemu-img convert -f qcow2 [-l snapshot.name=SNAP] -O raw`.
pub fn convert(dir: &Path, img: &str, snapshot: Option<&str>) -> Vec<u8> {
    let out = dir.join("oracle.raw");
    let out_s = out.to_str().unwrap();
    let snap_opt = snapshot.map(|s| format!("snapshot.name={s}"));
    let mut args = vec!["convert", "-f", "qcow2"];
    if let Some(o) = &snap_opt {
        args.extend_from_slice(&["-l", o]);
    }
    args.extend_from_slice(&["-O", "raw", img, out_s]);
    run(dir, "qemu-img", &args);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

pub fn open(dir: &Path, img: &str) -> Qcow2Image {
    Qcow2Image::open(&dir.join(img)).unwrap_or_else(|e| panic!("open {img}: {e}"))
}

/// The whole layer, read in pieces that cross cluster boundaries at odd places.
pub fn layer_bytes(layer: &Qcow2Layer) -> Vec<u8> {
    let mut out = vec![0u8; layer.size() as usize];
    let piece = (1 << 20) + 12345;
    for (i, chunk) in out.chunks_mut(piece).enumerate() {
        layer.read_at(chunk, (i * piece) as u64).unwrap();
    }
    out
}

/// Compares a layer with qemu's output. qemu converts a snapshot at the *current* virtual
/// size, so its output may be longer than the snapshot; that tail must be zeros.
pub fn assert_same(what: &str, layer: &Qcow2Layer, expected: &[u8]) {
    let ours = layer_bytes(layer);
    assert!(
        ours.len() <= expected.len(),
        "{what}: {} > {}",
        ours.len(),
        expected.len()
    );
    if let Some(i) = (0..ours.len()).find(|&i| ours[i] != expected[i]) {
        panic!(
            "{what}: first difference at byte {i:#x}: ours {:#04x}, qemu {:#04x}",
            ours[i], expected[i]
        );
    }
    assert!(
        expected[ours.len()..].iter().all(|&b| b == 0),
        "{what}: tail not zero"
    );
    check_random_reads(what, layer, expected);
}

/// Small reads at pseudo-random offsets and lengths, crossing (sub)cluster boundaries.
pub fn check_random_reads(what: &str, layer: &Qcow2Layer, expected: &[u8]) {
    let size = layer.size();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let off = (x >> 11) % size;
        let len = ((x >> 3) % 200_000).min(size - off) as usize;
        let mut buf = vec![0xAAu8; len];
        layer.read_at(&mut buf, off).unwrap();
        assert!(
            buf[..] == expected[off as usize..off as usize + len],
            "{what}: read {len} at {off:#x}"
        );
    }
}

/// A piecewise-constant allocation map: (start, allocation) at every change.
pub type Map = Vec<(u64, Allocation)>;

pub fn alloc_at(map: &Map, at: u64) -> Allocation {
    map.iter()
        .rev()
        .find(|(s, _)| *s <= at)
        .expect("map starts at 0")
        .1
}

pub fn json_field<'a>(line: &'a str, key: &str) -> &'a str {
    let start = line
        .find(&format!("\"{key}\": "))
        .unwrap_or_else(|| panic!("{key} in {line}"));
    let rest = &line[start + key.len() + 4..];
    rest[..rest.find([',', '}']).unwrap()].trim()
}

/// `qemu-img map --output=json`: data → Data, zero and present → Zero, absent → Hole.
pub fn qemu_map(dir: &Path, img: &str) -> Map {
    let out = run(
        dir,
        "qemu-img",
        &["map", "--output=json", "-f", "qcow2", img],
    );
    let text = String::from_utf8(out).unwrap();
    text.lines()
        .filter(|l| l.contains("\"start\""))
        .map(|l| {
            let a = match (json_field(l, "data"), json_field(l, "present")) {
                ("true", _) => Allocation::Data,
                (_, "true") => Allocation::Zero,
                _ => Allocation::Hole,
            };
            (json_field(l, "start").parse().unwrap(), a)
        })
        .collect()
}

/// Our map from `status`, asking for varying lengths.
pub fn our_map(layer: &Qcow2Layer) -> Map {
    let (mut map, mut at, mut ask) = (Map::new(), 0u64, 1u64 << 30);
    while at < layer.size() {
        let (a, len) = layer.status(at, ask).unwrap();
        assert!(len >= 1 && len <= ask && at + len <= layer.size());
        map.push((at, a));
        at += len;
        ask = if ask == 1 << 30 { 77_777 } else { 1 << 30 };
    }
    map
}

pub fn assert_map_matches(dir: &Path, img: &str, layer: &Qcow2Layer) {
    let (qemu, ours) = (qemu_map(dir, img), our_map(layer));
    for &(at, _) in qemu.iter().chain(ours.iter()) {
        assert_eq!(
            alloc_at(&ours, at),
            alloc_at(&qemu, at),
            "{img}: status at {at:#x}\nqemu {qemu:?}\nours {ours:?}"
        );
    }
}

/// Compares the active layer and every named snapshot with qemu.
pub fn assert_image(dir: &Path, img: &str) -> Qcow2Image {
    let image = open(dir, img);
    assert_same(
        &format!("{img} active"),
        &image.layer(Layer::Active).unwrap(),
        &convert(dir, img, None),
    );
    for (i, s) in image.snapshots().iter().enumerate() {
        let expected = convert(dir, img, Some(&s.name));
        assert_same(
            &format!("{img}@{}", s.name),
            &image.layer(Layer::Snapshot(i)).unwrap(),
            &expected,
        );
    }
    image
}
