//! End to end: NBD exports as send sources. A full stream of a `qemu-nbd` export (unix socket
//! and TCP) received into a raw file equals `qemu-img convert`; a seed sent with `--to-name`,
//! then `send --bitmap NAME` of the export with `qemu-nbd -B NAME`, applied onto the replica,
//! equals the image after its writes, twice (the first stream is then refused as a replay);
//! and the refusals (no such bitmap, no such export, no server, a malformed URI).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{
    arg, assert_ok, assert_refused, assert_same_file, blkdelta, export, have, holds,
    one_line_failure, pipe_args, qemu_io, receive_file, records, run, send_file, QemuNbd, Scratch,
    KIB, MIB,
};

fn have_qemu() -> bool {
    have("qemu-img") && have("qemu-io") && have("qemu-nbd")
}

/// A 64 MiB image (64 KiB clusters) of random data, a pattern, zeroed and discarded ranges
/// and an unaligned last write.
fn image(s: &Scratch) -> PathBuf {
    let img = s.qcow2("vm.qcow2", "64M", "");
    let seed = s.random_file("seed", 4 << 20, 7);
    qemu_io(
        &img,
        &[
            format!("write -s {} 0 4M", seed.display()),
            "write -P 0x11 20M 3M".into(),
            "write -z 21M 512k".into(),
            "discard 22M 128k".into(),
            "write -P 0x22 67108352 512".into(),
        ],
    );
    img
}

/// The replica equals qemu's raw export of the image's active layer.
fn assert_replica_is_image(s: &Scratch, img: &Path, replica: &Path) {
    let expected = s.path("expected.raw");
    let _ = std::fs::remove_file(&expected);
    export(img, None, &expected);
    assert_same_file(replica, &expected);
}

#[test]
fn a_full_send_of_a_qemu_nbd_export_equals_qemu_img_convert() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    let server = QemuNbd::unix(&img, &s.path("nbd.sock"), &[]);
    let stream = s.path("full.bd");
    send_file(&[&server.uri], &stream);
    let (header, recs) = records(&stream);
    assert_eq!(header.source.kind, "nbd");
    assert_eq!(header.source.name, server.uri);
    assert_eq!(header.virtual_size, 64 * MIB);
    // What the export holds no data for is sent as discards, never read.
    let data: u64 = recs
        .iter()
        .filter(|r| r.kind == "data")
        .map(|r| r.range.unwrap().1)
        .sum();
    assert!(data <= 8 * MIB, "{data} bytes of data records");
    let replica = s.path("replica.raw");
    assert_ok(&receive_file(&stream, &replica, &[]), "receive");
    drop(server);
    assert_replica_is_image(&s, &img, &replica);
    assert!(holds(&replica, "drive0"));
}

#[test]
fn a_full_send_over_tcp_with_many_reads_in_flight_equals_qemu_img_convert() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    let server = QemuNbd::tcp(&img, &[]);
    let replica = s.path("replica.raw");
    let out = pipe_args(
        &["--threads", "8", "--to-name", "seed", &server.uri],
        &replica,
        &[],
    );
    assert_ok(&out, "receive");
    drop(server);
    assert_replica_is_image(&s, &img, &replica);
    assert!(holds(&replica, "seed"));
}

/// `qemu-img bitmap ARGS IMG NAME`.
fn bitmap(img: &Path, args: &[&str], name: &str) {
    run(Command::new("qemu-img")
        .arg("bitmap")
        .args(args)
        .arg(img)
        .arg(name));
}

/// Sends what bitmap 'daily' of the export marks dirty and applies it to the replica, which
/// then equals the image; the stream is no larger than the dirty granules.
fn incremental(s: &Scratch, img: &Path, replica: &Path, dirty: u64, step: &str) {
    let server = QemuNbd::unix(img, &s.path(&format!("{step}.sock")), &["-B", "daily"]);
    let stream = s.path(&format!("{step}.bd"));
    let len = send_file(&["--bitmap", "daily", &server.uri], &stream);
    assert!(
        len < dirty + 64 * KIB,
        "{step}: a stream of {len} bytes for {dirty} bytes of dirty granules"
    );
    drop(server);
    assert_ok(&receive_file(&stream, replica, &[]), "receive");
    assert_replica_is_image(s, img, replica);
    assert!(holds(replica, "daily"));
}

#[test]
fn nbd_bitmap_incrementals_onto_a_seeded_replica_equal_the_image() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    bitmap(&img, &["--add", "-g", "65536"], "daily");
    let replica = s.path("replica.raw");
    {
        let seed = QemuNbd::unix(&img, &s.path("seed.sock"), &[]);
        let out = pipe_args(&["--to-name", "daily", &seed.uri], &replica, &[]);
        assert_ok(&out, "receive the seed");
    }
    assert!(holds(&replica, "daily"));

    let r1 = s.random_file("r1", 256 << 10, 2);
    qemu_io(
        &img,
        &[
            format!("write -s {} 8M 256k", r1.display()),
            "write -P 0x33 10485860 5000".into(),
            "write -z 1M 128k".into(),
            "discard 2M 512k".into(),
            "write -P 0x44 50M 64k".into(),
        ],
    );
    // Granules: 8M +256k, 10M +64k, 1M +128k, 2M +512k, 50M +64k.
    incremental(
        &s,
        &img,
        &replica,
        (256 + 64 + 128 + 512 + 64) * KIB,
        "first",
    );

    bitmap(&img, &["--clear"], "daily");
    qemu_io(
        &img,
        &[
            "write -P 0x55 40M 128k".into(),
            "discard 20M 1M".into(),
            "write -P 0x66 63M 1M".into(),
        ],
    );
    incremental(&s, &img, &replica, (128 + 1024 + 1024) * KIB, "second");
    // Every send produced a state of its own: the first cycle's stream is an old one now.
    let out = receive_file(&s.path("first.bd"), &replica, &[]);
    assert_refused(
        &out,
        &["replayed", "--rewind"],
        "the first incremental again",
    );
    assert_replica_is_image(&s, &img, &replica);
}

#[test]
fn nbd_send_refusals_are_one_line() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    bitmap(&img, &["--add"], "daily");
    let sock = s.path("nbd.sock");
    let server = QemuNbd::unix(&img, &sock, &["-B", "daily"]);
    let send = |args: &[&str]| {
        let mut all = vec!["send", "-q", "-o", "/dev/null"];
        all.extend_from_slice(args);
        blkdelta(&all)
    };
    let out = send(&["--bitmap", "weekly", &server.uri]);
    assert_refused(
        &out,
        &["qemu:dirty-bitmap:weekly", "did not grant"],
        "no such bitmap",
    );
    let other = format!("nbd+unix:///drive1?socket={}", sock.display());
    let out = send(&[&other]);
    assert_refused(&out, &["no export named 'drive1'"], "no such export");
    let gone = format!(
        "nbd+unix:///drive0?socket={}",
        s.path("none.sock").display()
    );
    let out = send(&[&gone]);
    let err = one_line_failure(&out, "no server");
    assert!(
        err.contains(&format!(
            "cannot connect to the NBD server at unix socket {}",
            arg(&s.path("none.sock"))
        )),
        "{err}"
    );
    // The server still serves after the refusals.
    assert_ok(
        &send(&["--bitmap", "daily", &server.uri]),
        "send --bitmap daily",
    );
    // A malformed URI, and options that read files, are usage errors.
    for args in [
        &["nbd+unix:///drive0"][..],
        &["nbd://host:70000/x"],
        &["--since", "base.qcow2", &server.uri],
    ] {
        let out = send(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}
