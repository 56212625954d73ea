//! End to end: external snapshots (`send --since BASE OVERLAY.qcow2`). Chains are built at
//! test time with `qemu-img create -b NAME -F FMT` from the images' directory (relative
//! backing names), and the replica must equal qemu's raw export of the top, byte for byte.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    assert_same_file, blkdelta_in, blkdelta_ok, checksum, export, have, lock_held, one_error_line,
    pipe_args_in, qemu_io, run, Reaped, Scratch,
};

/// `blkdelta send -q SEND_ARGS | blkdelta receive -q TARGET RECV_ARGS`, both run in `dir`.
fn pipe_in(dir: &Path, send_args: &[&str], target: &Path, recv_args: &[&str]) -> Output {
    pipe_args_in(Some(dir), send_args, target, recv_args)
}

/// [`pipe_in`], and the receiver must succeed.
fn pipe_ok(dir: &Path, send_args: &[&str], target: &Path, recv_args: &[&str]) {
    let out = pipe_in(dir, send_args, target, recv_args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "receive after {send_args:?}: {err}");
}

/// `blkdelta send -q ARGS -o STREAM` in `dir`; returns the stream's size in bytes.
fn stream_size(dir: &Path, args: &[&str]) -> u64 {
    let stream = dir.join("size-probe.bd");
    let mut all = vec!["send", "-q", "-o", stream.to_str().unwrap()];
    all.extend_from_slice(args);
    let out = blkdelta_in(dir, &all);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let len = std::fs::metadata(&stream).unwrap().len();
    std::fs::remove_file(stream).unwrap();
    len
}

/// `qemu-img create -f qcow2 -b BACKING -F FMT [-o OPTS] NAME [SIZE]`, run in the scratch
/// directory so that the backing name is stored as given (relative).
fn overlay(s: &Scratch, name: &str, backing: &str, fmt: &str, opts: &str) -> PathBuf {
    let mut cmd = Command::new("qemu-img");
    cmd.current_dir(s.dir.path())
        .args(["create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt]);
    if !opts.is_empty() {
        cmd.args(["-o", opts]);
    }
    run(cmd.arg(name));
    s.path(name)
}

/// qemu's raw export of a qcow2 image, reading through its chain.
fn exported(s: &Scratch, img: &Path) -> PathBuf {
    let out = s.path(&format!(
        "{}.oracle",
        img.file_name().unwrap().to_str().unwrap()
    ));
    export(img, None, &out);
    out
}

/// What `blkdelta status` says the replica holds.
fn holds(replica: &Path) -> String {
    let out = blkdelta_ok(&["status", replica.to_str().unwrap()]);
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A 64 MiB base: 24 MiB of random data in three places, a patterned range, a zero range.
fn base_qcow2(s: &Scratch, opts: &str) -> PathBuf {
    let base = s.qcow2("base.qcow2", "64M", opts);
    let r = s.random_file("rbase", 8 << 20, 7);
    let r = r.display();
    qemu_io(
        &base,
        &[
            format!("write -s {r} 0 8M"),
            format!("write -s {r} 24M 8M"),
            format!("write -s {r} 50M 8M"),
            "write -P 0x5a 40M 2M".into(),
            "write -z 60M 1M".into(),
        ],
    );
    base
}

/// Writes, zero writes, discards and compressed clusters over the base's data and holes;
/// about 1.3 MiB of data in all.
fn change_o1(s: &Scratch, o1: &Path, cluster: u64) {
    let r = s.random_file("r1", 1 << 20, 11);
    let c = cluster;
    qemu_io(
        o1,
        &[
            format!("write -s {} 1M 1M", r.display()),
            "write -P 0x61 3000000 70000".into(),
            "write -z 25M 512k".into(),
            "discard 26M 1M".into(),
            format!("write -c -P 0x62 {} {c}", 40 << 20),
            format!("write -c -P 0x63 {} {c}", 45 << 20),
            "write -P 0x64 63M 64k".into(),
        ],
    );
}

fn change_o2(o2: &Path) {
    qemu_io(
        o2,
        &[
            "write -P 0x71 1M 64k".into(),
            "write -z 3000000 4096".into(),
            "discard 24M 64k".into(),
            "write -P 0x72 44M 100k".into(),
        ],
    );
}

/// base ← o1 ← o2, each overlay changed (o1 as [`change_o1`] with 64 KiB clusters).
fn two_overlays(s: &Scratch) -> (PathBuf, PathBuf) {
    let o1 = overlay(s, "o1.qcow2", "base.qcow2", "qcow2", "");
    change_o1(s, &o1, 64 << 10);
    let o2 = overlay(s, "o2.qcow2", "o1.qcow2", "qcow2", "");
    change_o2(&o2);
    (o1, o2)
}

/// Seeds `replica` from the base, as a read-only base is seeded: a full send named after it.
fn seed(s: &Scratch, base: &str, replica: &Path) {
    pipe_ok(s.dir.path(), &["--to-name", base, base], replica, &[]);
    assert!(holds(replica).contains(&format!("holds snapshot '{base}'")));
}

/// [`base_qcow2`] and a replica seeded from it; returns the replica's path.
fn seeded_replica(s: &Scratch, opts: &str) -> PathBuf {
    base_qcow2(s, opts);
    let replica = s.path("replica.raw");
    seed(s, "base.qcow2", &replica);
    replica
}

/// `send --since BASE TOP | receive REPLICA`, run in the scratch directory: the stream (named
/// `what` in a failure) is under `max_bytes`, and the replica then equals qemu's export of TOP.
fn follow(s: &Scratch, replica: &Path, base: &str, top: &str, max_bytes: u64, what: &str) {
    let args = ["--since", base, top];
    let size = stream_size(s.dir.path(), &args);
    assert!(size < max_bytes, "{what} stream is {size} bytes");
    pipe_ok(s.dir.path(), &args, replica, &[]);
    assert_same_file(replica, &exported(s, &s.path(top)));
}

/// base ← o1 ← o2 with the given overlay options: the replica follows each overlay, one
/// layer at a time, and each stream is proportionate to the change.
fn layer_by_layer(overlay_opts: &str, cluster: u64) {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let replica = seeded_replica(&s, "");

    let o1 = overlay(&s, "o1.qcow2", "base.qcow2", "qcow2", overlay_opts);
    change_o1(&s, &o1, cluster);
    let o1_max = (1 << 20) + (300 << 10);
    follow(&s, &replica, "base.qcow2", "o1.qcow2", o1_max, "o1");
    assert!(holds(&replica).contains("holds snapshot 'o1.qcow2'"));

    let o2 = overlay(&s, "o2.qcow2", "o1.qcow2", "qcow2", overlay_opts);
    change_o2(&o2);
    follow(&s, &replica, "o1.qcow2", "o2.qcow2", 200 << 10, "o2");
    assert_eq!(
        checksum(replica.to_str().unwrap(), &[]),
        checksum(o2.to_str().unwrap(), &[])
    );
}

#[test]
fn overlays_layer_by_layer_64k() {
    layer_by_layer("", 64 << 10);
}

#[test]
fn overlays_layer_by_layer_512_byte_clusters() {
    layer_by_layer("cluster_size=512", 512);
}

#[test]
fn overlays_layer_by_layer_extended_l2() {
    layer_by_layer("extended_l2=on,cluster_size=64k", 64 << 10);
}

#[test]
fn extended_l2_subcluster_writes() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let replica = seeded_replica(&s, "extended_l2=on,cluster_size=128k");
    let o1 = overlay(
        &s,
        "o1.qcow2",
        "base.qcow2",
        "qcow2",
        "extended_l2=on,cluster_size=128k",
    );
    qemu_io(
        &o1,
        &[
            "write -P 0x81 4096 4096".into(),
            "write -P 0x82 1000000 5000".into(),
            "write -z 25165824 8192".into(),
            "write -z 30000128 12288".into(),
            "write -P 0x83 41943040 4096".into(),
        ],
    );
    follow(
        &s,
        &replica,
        "base.qcow2",
        "o1.qcow2",
        64 << 10,
        "subcluster",
    );
}

/// Two layers at once, named by absolute paths from another directory.
#[test]
fn two_layers_in_one_step() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let replica = seeded_replica(&s, "");
    let (_, o2) = two_overlays(&s);
    let base = s.path("base.qcow2");
    let args = ["--since", base.to_str().unwrap(), o2.to_str().unwrap()];
    let size = stream_size(Path::new("/"), &args);
    assert!(
        size < (1 << 20) + (400 << 10),
        "two-layer stream is {size} bytes"
    );
    pipe_ok(Path::new("/"), &args, &replica, &[]);
    assert_same_file(&replica, &exported(&s, &o2));
    assert!(holds(&replica).contains("holds snapshot 'o2.qcow2'"));
}

#[test]
fn raw_base() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let base = s.random_file("base.raw", 16 << 20, 3);
    let replica = s.path("replica.raw");
    seed(&s, "base.raw", &replica);
    assert_same_file(&replica, &base);
    let o1 = overlay(&s, "o1.qcow2", "base.raw", "raw", "");
    qemu_io(
        &o1,
        &[
            "write -P 0x91 0 64k".into(),
            "write -z 5M 1M".into(),
            "discard 9M 64k".into(),
            "write -c -P 0x92 12M 64k".into(),
        ],
    );
    follow(&s, &replica, "base.raw", "o1.qcow2", 64 << 10, "raw-base");
}

/// An overlay grown past its base: the range beyond the base's size is sent whole (data
/// where the overlay wrote, holes elsewhere), and the replica grows with it.
#[test]
fn grown_overlay() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let replica = seeded_replica(&s, "");
    let o1 = overlay(&s, "o1.qcow2", "base.qcow2", "qcow2", "");
    run(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&o1)
        .arg("96M"));
    qemu_io(
        &o1,
        &["write -P 0xa1 2M 64k".into(), "write -P 0xa2 70M 1M".into()],
    );
    follow(
        &s,
        &replica,
        "base.qcow2",
        "o1.qcow2",
        200 << 10,
        "grown overlay",
    );
}

/// A middle layer shrunk below the base and its overlay grown back: past the middle layer's
/// end the top reads zeros, not the base, so that range is sent although no layer holds it.
#[test]
fn shrunk_middle_layer_hides_the_base_tail() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let replica = seeded_replica(&s, "");
    let o1 = overlay(&s, "o1.qcow2", "base.qcow2", "qcow2", "");
    run(Command::new("qemu-img")
        .args(["resize", "-q", "--shrink"])
        .arg(&o1)
        .arg("32M"));
    let o2 = overlay(&s, "o2.qcow2", "o1.qcow2", "qcow2", "");
    run(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&o2)
        .arg("64M"));
    qemu_io(&o2, &["write -P 0xb1 1M 64k".into()]);
    pipe_ok(
        s.dir.path(),
        &["--since", "base.qcow2", "o2.qcow2"],
        &replica,
        &[],
    );
    assert_same_file(&replica, &exported(&s, &o2));
}

#[test]
fn base_not_in_the_chain_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let dir = s.dir.path();
    base_qcow2(&s, "");
    overlay(&s, "o1.qcow2", "base.qcow2", "qcow2", "");
    overlay(&s, "o2.qcow2", "o1.qcow2", "qcow2", "");
    s.qcow2("other.qcow2", "64M", "");
    std::fs::copy(s.path("base.qcow2"), s.path("copy.qcow2")).unwrap();
    for base in ["other.qcow2", "copy.qcow2", "o2.qcow2", "missing.qcow2"] {
        let out = blkdelta_in(
            dir,
            &["send", "-q", "-o", "x.bd", "--since", base, "o2.qcow2"],
        );
        assert_eq!(out.status.code(), Some(1), "--since {base}");
        let err = one_error_line(&out);
        assert!(err.contains(base), "{err}");
    }
    let out = blkdelta_in(
        dir,
        &[
            "send",
            "-q",
            "-o",
            "x.bd",
            "--since",
            "copy.qcow2",
            "o2.qcow2",
        ],
    );
    let err = one_error_line(&out);
    assert!(
        err.contains("not in the backing chain")
            && err.contains("o1.qcow2")
            && err.contains("base.qcow2"),
        "{err}"
    );
}

/// Names are checked as GUIDs are: `--since o1 o2` does not apply to a replica of the base,
/// unless forced; names given on the command line replace the file names.
#[test]
fn receiver_checks_the_base_name() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let dir = s.dir.path();
    let replica = seeded_replica(&s, "");
    let (o1, _) = two_overlays(&s);

    let before = exported(&s, &s.path("base.qcow2"));
    let out = pipe_in(dir, &["--since", "o1.qcow2", "o2.qcow2"], &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out);
    assert!(
        err.contains("base.qcow2") && err.contains("o1.qcow2"),
        "{err}"
    );
    assert_same_file(&replica, &before);
    assert!(holds(&replica).contains("holds snapshot 'base.qcow2'"));

    pipe_ok(
        dir,
        &["--since", "o1.qcow2", "o2.qcow2"],
        &replica,
        &["--force"],
    );
    assert!(holds(&replica).contains("holds snapshot 'o2.qcow2'"));

    let named = s.path("named.raw");
    pipe_ok(dir, &["--to-name", "monday", "base.qcow2"], &named, &[]);
    let args = [
        "--since",
        "base.qcow2",
        "--from-name",
        "monday",
        "--to-name",
        "tuesday",
    ];
    pipe_ok(dir, &[&args[..], &["o1.qcow2"]].concat(), &named, &[]);
    assert!(holds(&named).contains("holds snapshot 'tuesday'"));
    assert_same_file(&named, &exported(&s, &o1));
}

/// A full send of an overlay reads through its chain; an incremental follows on from it.
#[test]
fn full_send_of_an_overlay_reads_through_the_chain() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let dir = s.dir.path();
    base_qcow2(&s, "");
    let (_, o2) = two_overlays(&s);
    let replica = s.path("replica.raw");
    pipe_ok(dir, &["--to-name", "o2.qcow2", "o2.qcow2"], &replica, &[]);
    assert_same_file(&replica, &exported(&s, &o2));

    let o3 = overlay(&s, "o3.qcow2", "o2.qcow2", "qcow2", "");
    qemu_io(
        &o3,
        &["write -P 0xc1 10M 64k".into(), "discard 0 1M".into()],
    );
    pipe_ok(dir, &["--since", "o2.qcow2", "o3.qcow2"], &replica, &[]);
    assert_same_file(&replica, &exported(&s, &o3));
}

/// An overlay in a subdirectory naming its backing file `../base.qcow2`, sent from a third
/// directory with relative paths.
#[test]
fn relative_names_resolve_from_the_overlay_directory() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let replica = seeded_replica(&s, "");
    std::fs::create_dir(s.path("vm")).unwrap();
    std::fs::create_dir(s.path("elsewhere")).unwrap();
    let o1 = overlay(&s, "vm/o1.qcow2", "../base.qcow2", "qcow2", "");
    change_o1(&s, &o1, 64 << 10);
    let cwd = s.path("elsewhere");
    pipe_ok(
        &cwd,
        &["--since", "../base.qcow2", "../vm/o1.qcow2"],
        &replica,
        &[],
    );
    assert_same_file(&replica, &exported(&s, &o1));
}

/// A 1 TiB chain with a few small writes: the stream (and the work, which only reads the
/// tables of allocated L2 ranges) is that of the writes, not of the disk.
#[test]
fn large_sparse_chain_sends_only_the_change() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "1T", "");
    qemu_io(&base, &["write -P 0xd1 300G 1M".into()]);
    let o1 = overlay(&s, "o1.qcow2", "base.qcow2", "qcow2", "");
    qemu_io(
        &o1,
        &[
            "write -P 0xd2 100G 64k".into(),
            "write -z 300G 64k".into(),
            "write -P 0xd3 1023G 64k".into(),
        ],
    );
    let size = stream_size(s.dir.path(), &["--since", "base.qcow2", "o1.qcow2"]);
    assert!(size < 16 << 10, "1 TiB chain stream is {size} bytes");
    let out = blkdelta_in(
        s.dir.path(),
        &["send", "--dry-run", "--since", "base.qcow2", "o1.qcow2"],
    );
    let plan = String::from_utf8_lossy(&out.stdout);
    assert!(plan.contains("3 extents, 131072 data bytes"), "{plan}");
}

/// A running VM (here qemu-storage-daemon) writes the newest overlay: that one is refused
/// as in use, while the frozen overlay below it, which QEMU opens read-only as a backing
/// file, can be sent (the libvirt flow: send a layer once a newer one is created above it).
#[test]
fn frozen_overlay_below_a_running_vm_can_be_sent() {
    if !have("qemu-img") || !have("qemu-storage-daemon") {
        return;
    }
    let s = Scratch::new();
    let dir = s.dir.path();
    base_qcow2(&s, "");
    let o1 = overlay(&s, "o1.qcow2", "base.qcow2", "qcow2", "");
    change_o1(&s, &o1, 64 << 10);
    let o2 = overlay(&s, "o2.qcow2", "o1.qcow2", "qcow2", "");
    let vm = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,node-name=f,filename={}", o2.display()))
        .args(["--blockdev", "driver=qcow2,node-name=q,file=f"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map(Reaped)
        .unwrap();
    // Wait for its write lock (byte 101) without reading meanwhile, which would make it fail.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lock_held(&o2, 101) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let send = |args: &[&str]| blkdelta_in(dir, &[&["send", "-q", "-o", "x.bd"], args].concat());
    let refused = send(&["--since", "o1.qcow2", "o2.qcow2"]);
    let frozen = send(&["--since", "base.qcow2", "o1.qcow2"]);
    drop(vm);
    assert!(one_error_line(&refused).contains("in use by a writer"));
    let err = String::from_utf8_lossy(&frozen.stderr);
    assert!(frozen.status.success(), "{err}");
}
