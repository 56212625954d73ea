//! Receiving into a block device (a loop device), and checksums across formats.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{
    assert_same_prefix, blkdelta_ok, checksum, export, have, pipe, qemu_io, receive_file, run,
    send_to_file, snapshot, spec, Loop, Scratch,
};

/// The device starts with qemu's export of `img@snap` (kept as `SNAP.raw`, which is returned)
/// and has the checksum of that snapshot.
fn assert_device_holds(s: &Scratch, img: &Path, snap: &str, dev: &Loop, st: &str) -> PathBuf {
    let e = s.path(&format!("{snap}.raw"));
    export(img, Some(snap), &e);
    assert_same_prefix(dev.path(), &e);
    assert_eq!(
        checksum(&spec(img, snap), &[]),
        checksum(&dev.0, &["--state", st])
    );
    e
}

#[test]
fn seed_and_incremental_into_a_loop_device() {
    if !have("qemu-img") || !have("losetup") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "32M", "");
    let r = s.random_file("r", 2 << 20, 7);
    qemu_io(
        &img,
        &[
            format!("write -s {} 0 2M", r.display()),
            "write -P 0x9 20M 1M".into(),
        ],
    );
    snapshot(&img, "s1");
    qemu_io(
        &img,
        &[
            "write -z 0 1M".into(),
            "discard 20M 1M".into(),
            "write -P 0x4 30M 64k".into(),
        ],
    );
    snapshot(&img, "s2");

    // A backing file larger than the image, full of old data: the replica must still match.
    let Some(dev) = Loop::over_new_file(&s.path("dev.img"), 40 << 20, 0xee) else {
        return;
    };
    let state = s.path("dev.state");
    let st = state.to_str().unwrap();
    let devp = dev.path();

    // Unknown data on the device: a seed needs --force.
    let seed = s.path("seed.bd");
    send_to_file(&spec(&img, "s1"), &seed);
    let out = receive_file(&seed, devp, &["--state", st]);
    assert_eq!(out.status.code(), Some(1));
    assert!(receive_file(&seed, devp, &["--state", st, "--force"])
        .status
        .success());
    let e1 = s.path("s1.raw");
    export(&img, Some("s1"), &e1);
    assert_same_prefix(devp, &e1);

    pipe(&spec(&img, "s1..s2"), devp, &["--state", st]);
    let e2 = assert_device_holds(&s, &img, "s2", &dev, st);
    assert_eq!(
        checksum(&spec(&img, "s2"), &[]),
        checksum(e2.to_str().unwrap(), &[])
    );
    let status = blkdelta_ok(&["status", &dev.0, "--state", st]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("holds snapshot 's2'"));
}

#[test]
fn device_too_small_is_refused() {
    if !have("qemu-img") || !have("losetup") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "32M", "");
    snapshot(&img, "s1");
    let Some(dev) = Loop::over_new_file(&s.path("small.img"), 8 << 20, 0) else {
        return;
    };
    let seed = s.path("seed.bd");
    send_to_file(&spec(&img, "s1"), &seed);
    let state = s.path("dev.state");
    let out = receive_file(
        &seed,
        dev.path(),
        &["--state", state.to_str().unwrap(), "--force"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("needs 33554432"));
}

/// A device is larger than the replica; a grown image must not show the device's old bytes.
#[test]
fn growing_onto_a_device_zeroes_the_grown_range() {
    if !have("qemu-img") || !have("losetup") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "1M", "");
    qemu_io(&img, &["write -P 0x5 0 64k".into()]);
    snapshot(&img, "small");
    run(Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&img)
        .arg("2M"));
    snapshot(&img, "big");
    let Some(dev) = Loop::over_new_file(&s.path("dev.img"), 4 << 20, 0xee) else {
        return;
    };
    let state = s.path("dev.state");
    let st = state.to_str().unwrap();
    pipe(
        &spec(&img, "small"),
        dev.path(),
        &["--state", st, "--force"],
    );
    pipe(&spec(&img, "small..big"), dev.path(), &["--state", st]);
    assert_device_holds(&s, &img, "big", &dev, st);
}

/// An undo stream taken on a device covers the replica, not the whole (larger) device.
#[test]
fn undo_on_a_device_rolls_back_the_replica() {
    if !have("qemu-img") || !have("losetup") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "4M", "");
    qemu_io(&img, &["write -P 0x5 0 4M".into()]);
    snapshot(&img, "a");
    qemu_io(&img, &["write -P 0x6 1M 1M".into(), "discard 3M 1M".into()]);
    snapshot(&img, "b");
    let Some(dev) = Loop::over_new_file(&s.path("dev.img"), 16 << 20, 0xee) else {
        return;
    };
    let state = s.path("dev.state");
    let st = state.to_str().unwrap();
    let devp = dev.path();
    pipe(&spec(&img, "a"), devp, &["--state", st, "--force"]);
    let undo = s.path("undo.bd");
    let stream = s.path("ab.bd");
    send_to_file(&spec(&img, "a..b"), &stream);
    let out = receive_file(
        &stream,
        devp,
        &["--state", st, "--undo", undo.to_str().unwrap()],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dump = blkdelta_ok(&["dump", "--json", undo.to_str().unwrap()]);
    let head: serde_json::Value = serde_json::from_str(
        String::from_utf8(dump.stdout)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(head["virtual_size"].as_u64(), Some(4 << 20));
    assert!(receive_file(&undo, devp, &["--state", st]).status.success());
    assert_eq!(
        checksum(&spec(&img, "a"), &[]),
        checksum(&dev.0, &["--state", st])
    );
}
