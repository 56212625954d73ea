//! The writer against qemu as the oracle: every image it leaves passes `qemu-img check` with
//! no errors and no leaks, and `qemu-img convert` of each layer equals a model of what was
//! written; images QEMU made (with its own snapshots) are written just as well.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Qcow2Writer, SnapshotMeta};
use crate::image::qcow2::Qcow2Image;
use crate::testing::{have, Rng};

fn qemu_img() -> bool {
    have("qemu-img")
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("runs");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img check` finds neither errors nor leaks.
fn assert_clean(path: &Path) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", "-f", "qcow2"])
        .arg(path)
        .output()
        .expect("qemu-img runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found") && !text.contains("leak"),
        "qemu-img check {}: {text}",
        path.display()
    );
}

/// `qemu-img convert` of the active layer (`None`) or a snapshot, as raw bytes.
fn export(path: &Path, snapshot: Option<&str>) -> Vec<u8> {
    let out = path.with_extension(format!("{}.raw", snapshot.unwrap_or("active")));
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-U", "-f", "qcow2", "-O", "raw"]);
    if let Some(s) = snapshot {
        cmd.arg("-l").arg(format!("snapshot.name={s}"));
    }
    run(cmd.arg(path).arg(&out));
    let bytes = std::fs::read(&out).expect("export read");
    std::fs::remove_file(&out).expect("export removed");
    bytes
}

/// Closes the writer (QEMU cannot open an image while it is written), lets `look` at the
/// image, and opens it again.
fn closed(w: Qcow2Writer, look: impl FnOnce(&Path)) -> Qcow2Writer {
    let path = w.path().to_path_buf();
    drop(w);
    look(&path);
    Qcow2Writer::open(&path).expect("reopen")
}

fn meta(id: u32, name: &str, size: u64) -> SnapshotMeta {
    SnapshotMeta {
        id: id.to_string(),
        name: name.to_string(),
        date_sec: 1_700_000_000 + id,
        date_nsec: 7,
        vm_clock_nsec: u64::from(id) * 1000,
        disk_size: size,
    }
}

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!(
            "blkdelta-writer-{tag}-{}-{}",
            std::process::id(),
            crate::stream::random_id()[0]
        ));
        std::fs::create_dir_all(&d).expect("temp dir");
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Random writes, zeroes and partial clusters into the writer and the model alike.
fn scribble(w: &mut Qcow2Writer, model: &mut [u8], rng: &mut Rng, ops: usize) {
    let size = model.len() as u64;
    let cs = w.cluster_size();
    for _ in 0..ops {
        let off = match rng.below(3) {
            0 => rng.below(size / cs) * cs,
            _ => rng.below(size),
        };
        let len = (1 + rng.below(3 * cs)).min(size - off);
        if rng.below(4) == 0 {
            w.zero(off, len).expect("zero");
            model[off as usize..(off + len) as usize].fill(0);
        } else {
            let data = rng.bytes(len);
            w.write_at(&data, off).expect("write");
            model[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
    }
}

/// Every cluster size: writes, snapshots, more writes, deletion; after each commit QEMU finds
/// the image clean and each layer equal to the model.
#[test]
fn layers_match_the_model_at_every_cluster_size() {
    if !qemu_img() {
        return;
    }
    for bits in [9u32, 12, 16, 21] {
        let dir = Dir::new(&format!("sizes{bits}"));
        let path = dir.0.join("r.qcow2");
        let size = 6 << 20;
        let mut w = Qcow2Writer::create(&path, size, bits).expect("create");
        let mut rng = Rng(u64::from(bits));
        let mut model = vec![0u8; size as usize];
        let mut kept: Vec<(String, Vec<u8>)> = Vec::new();
        w = closed(w, assert_clean);
        for round in 0..4u32 {
            scribble(&mut w, &mut model, &mut rng, 40);
            w.commit().expect("commit");
            w = closed(w, |p| {
                assert_clean(p);
                assert!(
                    export(p, None) == model,
                    "{bits}: active after round {round}"
                );
            });
            let name = format!("s{round}");
            w.create_snapshot(&meta(round + 1, &name, size))
                .expect("snapshot");
            w = closed(w, assert_clean);
            kept.push((name, model.clone()));
        }
        scribble(&mut w, &mut model, &mut rng, 40);
        w.commit().expect("commit");
        w = closed(w, |p| {
            for (name, m) in &kept {
                assert!(export(p, Some(name)) == *m, "{bits}: snapshot {name}");
            }
        });
        w.delete_snapshots(&[0, 2]).expect("delete");
        let names: Vec<String> = w.snapshots().iter().map(|s| s.name.clone()).collect();
        assert_eq!(names, ["s1", "s3"]);
        drop(w);
        assert_clean(&path);
        assert!(
            export(&path, Some("s1")) == kept[1].1,
            "{bits}: s1 after delete"
        );
        assert!(
            export(&path, Some("s3")) == kept[3].1,
            "{bits}: s3 after delete"
        );
        assert!(export(&path, None) == model, "{bits}: active after delete");
    }
}

/// A snapshot made by the writer carries the given fields, so its GUID is the one they give.
#[test]
fn snapshots_carry_their_metadata() {
    if !qemu_img() {
        return;
    }
    let dir = Dir::new("meta");
    let path = dir.0.join("r.qcow2");
    let mut w = Qcow2Writer::create(&path, 1 << 20, 16).expect("create");
    let m = meta(7, "monday", 1 << 20);
    w.create_snapshot(&m).expect("snapshot");
    drop(w);
    let image = Qcow2Image::open(&path).expect("open");
    let s = &image.snapshots()[0];
    assert_eq!(
        (
            s.id.as_str(),
            s.name.as_str(),
            s.date_sec,
            s.date_nsec,
            s.vm_clock_nsec,
            s.disk_size
        ),
        ("7", "monday", m.date_sec, 7, 7000, 1 << 20)
    );
    let listed = run(Command::new("qemu-img").args(["snapshot", "-l"]).arg(&path));
    assert!(String::from_utf8_lossy(&listed.stdout).contains("monday"));
}

/// An image QEMU made, with its own snapshots and shared tables, is written by copy on write:
/// QEMU's snapshots keep their content, and QEMU can go on with the image afterwards.
#[test]
fn qemu_made_images_are_written_by_copy_on_write() {
    if !qemu_img() || !have("qemu-io") {
        return;
    }
    let dir = Dir::new("qemu");
    let path = dir.0.join("q.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-o", "cluster_size=4096"])
        .arg(&path)
        .arg("4M"));
    run(Command::new("qemu-io")
        .args(["-c", "write -P 0x11 0 1M", "-c", "write -P 0x22 2M 64k"])
        .arg(&path));
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "q1"])
        .arg(&path));
    let q1 = export(&path, Some("q1"));
    let mut model = q1.clone();
    let mut w = Qcow2Writer::open(&path).expect("open");
    let mut rng = Rng(5);
    scribble(&mut w, &mut model, &mut rng, 60);
    w.commit().expect("commit");
    drop(w);
    assert_clean(&path);
    assert!(export(&path, Some("q1")) == q1, "QEMU's snapshot kept");
    assert!(export(&path, None) == model, "active written");
    // QEMU takes it from here: a snapshot, a revert, a delete.
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", "q2"])
        .arg(&path));
    run(Command::new("qemu-io")
        .args(["-c", "write -P 0x33 0 8k"])
        .arg(&path));
    run(Command::new("qemu-img")
        .args(["snapshot", "-a", "q1"])
        .arg(&path));
    run(Command::new("qemu-img")
        .args(["snapshot", "-d", "q2"])
        .arg(&path));
    assert_clean(&path);
    assert!(export(&path, None) == q1);
    let image = Qcow2Image::open(&path).expect("open");
    assert_eq!(image.held_snapshot().expect("held"), Some(0));
}

/// The active layer is a snapshot exactly while nothing was written since (or since QEMU
/// reverted to it).
#[test]
fn the_active_layer_knows_which_snapshot_it_is() {
    if !qemu_img() {
        return;
    }
    let dir = Dir::new("held");
    let path = dir.0.join("r.qcow2");
    let size = 2 << 20;
    let mut w = Qcow2Writer::create(&path, size, 16).expect("create");
    w.write_at(&[1u8; 70000], 0).expect("write");
    w.create_snapshot(&meta(1, "a", size)).expect("a");
    w.write_at(&[2u8; 100], 5).expect("write");
    w.create_snapshot(&meta(2, "b", size)).expect("b");
    drop(w);
    let held = |p: &Path| Qcow2Image::open(p).unwrap().held_snapshot().unwrap();
    assert_eq!(held(&path), Some(1));
    let mut w = Qcow2Writer::open(&path).expect("open");
    w.write_at(&[3u8; 10], 1 << 20).expect("write");
    w.commit().expect("commit");
    drop(w);
    assert_eq!(held(&path), None, "written after b");
    run(Command::new("qemu-img")
        .args(["snapshot", "-a", "a"])
        .arg(&path));
    assert_eq!(held(&path), Some(0), "reverted to a");
}

/// Growing and shrinking the disk; snapshots keep their own size.
#[test]
fn resizing_keeps_snapshots_whole() {
    if !qemu_img() {
        return;
    }
    let dir = Dir::new("resize");
    let path = dir.0.join("r.qcow2");
    let mut w = Qcow2Writer::create(&path, 1 << 20, 12).expect("create");
    let mut rng = Rng(9);
    let mut model = vec![0u8; 1 << 20];
    scribble(&mut w, &mut model, &mut rng, 20);
    w.create_snapshot(&meta(1, "small", 1 << 20)).expect("snap");
    let small = model.clone();
    w.set_size(5 << 20).expect("grow");
    model.resize(5 << 20, 0);
    scribble(&mut w, &mut model, &mut rng, 30);
    w.commit().expect("commit");
    w = closed(w, |p| {
        assert_clean(p);
        assert!(export(p, None) == model);
    });
    w.set_size(3 << 20).expect("shrink");
    model.truncate(3 << 20);
    w.commit().expect("commit");
    w = closed(w, |p| {
        assert_clean(p);
        assert!(export(p, None) == model);
    });
    w.set_size(4 << 20).expect("grow again");
    model.resize(4 << 20, 0);
    w.commit().expect("commit");
    drop(w);
    assert!(export(&path, None) == model, "grown range reads zeros");
    // qemu exports a snapshot at the disk's current size: what lies past its own reads zeros.
    let exported = export(&path, Some("small"));
    assert!(exported[..small.len()] == small[..]);
    assert!(exported[small.len()..].iter().all(|&b| b == 0));
}

/// Uncommitted work vanishes with the writer: what the header names is still a clean image
/// with every snapshot intact, and nothing leaks.
#[test]
fn an_abandoned_generation_leaves_a_clean_image() {
    if !qemu_img() {
        return;
    }
    let dir = Dir::new("abandon");
    let path = dir.0.join("r.qcow2");
    let size = 4 << 20;
    let mut w = Qcow2Writer::create(&path, size, 12).expect("create");
    let mut rng = Rng(11);
    let mut model = vec![0u8; size as usize];
    scribble(&mut w, &mut model, &mut rng, 30);
    w.create_snapshot(&meta(1, "a", size)).expect("a");
    let a = model.clone();
    // More than the writer keeps in memory, so changed tables are written before the commit.
    let mut w2 = w;
    for i in 0..(size / 4096) {
        w2.write_at(&[0x5a; 512], i * 4096 + 100).expect("write");
    }
    drop(w2);
    assert_clean(&path);
    assert!(export(&path, Some("a")) == a);
    assert!(export(&path, None) == a, "the active layer is still a");
}

/// Freed clusters go back to the filesystem: after deleting the snapshots that held them the
/// file takes about what the active layer maps.
#[test]
fn deleting_snapshots_gives_space_back() {
    if !qemu_img() {
        return;
    }
    let dir = Dir::new("space");
    let path = dir.0.join("r.qcow2");
    let size = 16 << 20;
    let mut w = Qcow2Writer::create(&path, size, 16).expect("create");
    for round in 0..4u32 {
        let data = vec![round as u8 + 1; size as usize];
        w.write_at(&data, 0).expect("write");
        w.create_snapshot(&meta(round + 1, &format!("s{round}"), size))
            .expect("snap");
    }
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    let before = allocated(&path);
    assert!(before >= 4 * size, "four full copies: {before}");
    w.delete_snapshots(&[0, 1, 2]).expect("delete");
    drop(w);
    let after = allocated(&path);
    assert!(after < size + (2 << 20), "one copy and metadata: {after}");
    assert_clean(&path);
}

/// Whole clusters placed for the caller's own writes land where `place` says, in place where
/// only the active layer uses them and in a new run otherwise; parts of clusters are refused.
#[test]
fn placed_runs_take_the_callers_writes() {
    if !qemu_img() {
        return;
    }
    use std::os::unix::fs::FileExt;
    let dir = Dir::new("place");
    let path = dir.0.join("r.qcow2");
    let size = 4 << 20;
    let mut w = Qcow2Writer::create(&path, size, 16).expect("create");
    let mut model = vec![0u8; size as usize];
    let put = |w: &mut Qcow2Writer, model: &mut [u8], off: u64, byte: u8| {
        let data = vec![byte; 1 << 20];
        let at = w.place(off, 1 << 20).expect("place").expect("one run");
        w.file().write_all_at(&data, at).expect("write");
        model[off as usize..(off as usize + data.len())].copy_from_slice(&data);
        at
    };
    let first = put(&mut w, &mut model, 1 << 20, 1);
    assert_eq!(
        put(&mut w, &mut model, 1 << 20, 2),
        first,
        "its own clusters: in place"
    );
    assert_eq!(
        w.place(100, 1 << 20).expect("place"),
        None,
        "not whole clusters"
    );
    w.create_snapshot(&meta(1, "a", size)).expect("snapshot");
    let a = model.clone();
    assert_ne!(
        put(&mut w, &mut model, 1 << 20, 3),
        first,
        "shared with a snapshot: a new run"
    );
    w.commit().expect("commit");
    drop(w);
    assert_clean(&path);
    assert!(export(&path, Some("a")) == a);
    assert!(export(&path, None) == model);
}

/// Patches the big-endian u16 refcount of `cluster` in the image's first refcount block.
fn patch_refcount(path: &Path, cluster: u64, value: u16) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut h = [0u8; 64];
    f.read_exact_at(&mut h, 0).unwrap();
    let reft = u64::from_be_bytes(h[48..56].try_into().unwrap());
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, reft).unwrap();
    let block = u64::from_be_bytes(e) & !0x1ff;
    f.write_all_at(&value.to_be_bytes(), block + 2 * cluster)
        .unwrap();
}

/// A leaked cluster (refcount above its uses, as a crash of QEMU leaves it) is repaired when
/// the writer opens the image; a refcount below its uses is refused before any write.
#[test]
fn leaks_are_repaired_and_low_refcounts_refused() {
    if !qemu_img() {
        return;
    }
    let dir = Dir::new("repair");
    let path = dir.0.join("r.qcow2");
    let mut w = Qcow2Writer::create(&path, 4 << 20, 16).expect("create");
    w.write_at(&[7u8; 65536], 0).expect("write");
    w.create_snapshot(&meta(1, "a", 4 << 20)).expect("snapshot");
    drop(w);
    // The header cluster used twice: a leak.
    patch_refcount(&path, 0, 2);
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "qemu-img check sees the leak");
    drop(Qcow2Writer::open(&path).expect("open repairs"));
    assert_clean(&path);
    // The data cluster of guest cluster 0 counted once where two layers use it.
    let image = Qcow2Image::open(&path).unwrap();
    let map = run(Command::new("qemu-img")
        .args(["map", "--output=json"])
        .arg(&path));
    drop(image);
    let text = String::from_utf8_lossy(&map.stdout).to_string();
    let at = text.find("\"offset\": ").map(|i| &text[i + 10..]).unwrap();
    let host: u64 = at[..at.find(|c: char| !c.is_ascii_digit()).unwrap()]
        .parse()
        .unwrap();
    patch_refcount(&path, host >> 16, 1);
    let before = std::fs::read(&path).unwrap();
    let err = Qcow2Writer::open(&path).expect_err("refused").to_string();
    assert!(err.contains("refcount"), "{err}");
    assert!(std::fs::read(&path).unwrap() == before, "nothing written");
}
