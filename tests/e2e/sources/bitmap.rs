//! End to end: `send --bitmap NAME IMAGE.qcow2`. A seed named after the bitmap, then what the
//! bitmap recorded (qemu-io writes, zero writes, discards), received into a raw replica and
//! compared with qemu's export of the image byte for byte; and the refusals (unknown,
//! disabled, in use, inconsistent bitmaps; an incremental the replica has no base for).

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::common::{
    arg, assert_ok, assert_refused, assert_same_file, blkdelta, blkdelta_ok, export, have, holds,
    pipe_args, qemu_io, receive_file, run, Reaped, Scratch,
};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn have_qemu() -> bool {
    have("qemu-img") && have("qemu-io")
}

/// `qemu-img bitmap ARGS IMG NAME`.
fn bitmap(img: &Path, args: &[&str], name: &str) {
    run(Command::new("qemu-img")
        .arg("bitmap")
        .args(args)
        .arg(img)
        .arg(name));
}

/// `blkdelta send -q ARGS -o STREAM`; returns the stream's size.
fn send(args: &[&str], stream: &Path) -> u64 {
    let mut all = vec!["send", "-q", "-o", arg(stream)];
    all.extend_from_slice(args);
    blkdelta_ok(&all);
    std::fs::metadata(stream).unwrap().len()
}

/// The replica equals qemu's raw export of the image's active layer.
fn assert_replica_is_image(s: &Scratch, img: &Path, replica: &Path) {
    let expected = s.path("expected.raw");
    let _ = std::fs::remove_file(&expected);
    export(img, None, &expected);
    assert_same_file(replica, &expected);
}

/// An image with 4 MiB of random data and bitmap 'daily' of `gran` bytes per bit, seeded
/// into `replica.raw` with `--to-name daily`.
fn seeded(s: &Scratch, opts: &str, gran: &str) -> (PathBuf, PathBuf) {
    let img = s.qcow2("vm.qcow2", "64M", opts);
    let seed = s.random_file("seed", 4 << 20, 1);
    qemu_io(
        &img,
        &[
            format!("write -s {} 0 4M", seed.display()),
            "write -P 0x11 20M 1M".into(),
        ],
    );
    bitmap(&img, &["--add", "-g", gran], "daily");
    let replica = s.path("replica.raw");
    assert_ok(
        &pipe_args(&["--to-name", "daily", arg(&img)], &replica, &[]),
        "receive",
    );
    assert_replica_is_image(s, &img, &replica);
    assert!(holds(&replica, "daily"));
    (img, replica)
}

/// Guest bytes a bitmap of `gran`-byte granules marks dirty after writes to `ranges`
/// (offset, length): the union of the ranges rounded out to whole granules.
fn dirty_bytes(ranges: &[(u64, u64)], gran: u64) -> u64 {
    let mut granules: Vec<u64> = ranges
        .iter()
        .flat_map(|&(o, l)| o / gran..(o + l).div_ceil(gran))
        .collect();
    granules.sort_unstable();
    granules.dedup();
    granules.len() as u64 * gran
}

/// Sends what bitmap 'daily' recorded into the replica; checks the replica equals the image
/// and the stream is no larger than the granules written (not the disk, not the data).
fn incremental(s: &Scratch, img: &Path, replica: &Path, dirty: u64, step: &str) {
    let stream = s.path(&format!("{step}.bd"));
    let len = send(&["--bitmap", "daily", arg(img)], &stream);
    assert!(
        len < dirty + 64 * KIB,
        "{step}: a stream of {len} bytes for {dirty} bytes of dirty granules"
    );
    assert_ok(&receive_file(&stream, replica, &[]), "receive");
    assert_replica_is_image(s, img, replica);
    assert!(holds(replica, "daily"));
}

/// Runs qemu-io commands `"{verb} {offset} {len}"` on the image; returns the bytes of the
/// `gran`-byte granules they touch.
fn io_step(img: &Path, gran: u64, cmds: &[(String, u64, u64)]) -> u64 {
    let lines: Vec<String> = cmds
        .iter()
        .map(|(v, o, l)| format!("{v} {o} {l}"))
        .collect();
    qemu_io(img, &lines);
    let ranges: Vec<(u64, u64)> = cmds.iter().map(|&(_, o, l)| (o, l)).collect();
    dirty_bytes(&ranges, gran)
}

/// Seed, an incremental of mixed writes, `--clear`, more writes, a second incremental, with
/// a bitmap of `gran` bytes per bit.
fn seed_then_incrementals(opts: &str, gran: u64) {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let (img, replica) = seeded(&s, opts, &gran.to_string());
    let r1 = format!("write -s {}", s.random_file("r1", 256 << 10, 2).display());
    let dirty = io_step(
        &img,
        gran,
        &[
            (r1, 8 * MIB, 256 * KIB),
            ("write -P 0x33".into(), 10 * MIB + 1234, 5000),
            ("write -z".into(), MIB, 128 * KIB),
            ("write -z".into(), 3 * MIB + 512, 4096),
            ("discard".into(), 2 * MIB, 512 * KIB),
            ("write -P 0x44".into(), 50 * MIB, 64 * KIB),
            ("write -P 0x55".into(), 20 * MIB, 4 * KIB),
        ],
    );
    incremental(&s, &img, &replica, dirty, "first");

    bitmap(&img, &["--clear"], "daily");
    let r2 = format!("write -s {}", s.random_file("r2", 128 << 10, 3).display());
    let dirty = io_step(
        &img,
        gran,
        &[
            (r2, 40 * MIB + 512, 128 * KIB),
            ("discard".into(), 20 * MIB, MIB),
            ("write -P 0x66".into(), 63 * MIB, MIB),
            ("write -z".into(), 0, 64 * KIB),
        ],
    );
    incremental(&s, &img, &replica, dirty, "second");
}

#[test]
fn bitmap_incrementals_64k_clusters_and_granularity() {
    seed_then_incrementals("", 64 * KIB);
}

#[test]
fn bitmap_granularity_4k_below_the_cluster_size() {
    seed_then_incrementals("", 4 * KIB);
}

#[test]
fn bitmap_granularity_1m_above_the_cluster_size() {
    seed_then_incrementals("", MIB);
}

#[test]
fn bitmap_of_512_byte_granules_spans_many_table_entries() {
    // 131072 bits in 512-byte data clusters: a table of 32 entries.
    seed_then_incrementals("cluster_size=512", 512);
}

#[test]
fn bitmap_on_2m_clusters() {
    seed_then_incrementals("cluster_size=2M", 64 * KIB);
}

#[test]
fn bitmap_on_extended_l2_image() {
    seed_then_incrementals("extended_l2=on,cluster_size=64k", 8 * KIB);
}

#[test]
fn unknown_bitmap_is_refused_naming_those_there_are() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "16M", "");
    let out = blkdelta(&["send", "--bitmap", "daily", "-o", "/dev/null", arg(&img)]);
    assert_refused(&out, &["no bitmap named 'daily'", "it has no bitmaps"], "");
    bitmap(&img, &["--add"], "daily");
    bitmap(&img, &["--add"], "weekly");
    let out = blkdelta(&["send", "--bitmap", "monthly", "-o", "/dev/null", arg(&img)]);
    assert_refused(
        &out,
        &["no bitmap named 'monthly'", "'daily', 'weekly'"],
        "",
    );
}

#[test]
fn disabled_bitmap_is_refused_unless_allowed() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "16M", "");
    bitmap(&img, &["--add"], "paused");
    qemu_io(&img, &["write -P 0x11 1M 64k".into()]);
    bitmap(&img, &["--disable"], "paused");
    qemu_io(&img, &["write -P 0x22 8M 64k".into()]);
    let stream = s.path("paused.bd");
    let out = blkdelta(&["send", "--bitmap", "paused", "-o", arg(&stream), arg(&img)]);
    assert_refused(
        &out,
        &["bitmap 'paused' is disabled", "--allow-disabled"],
        "",
    );
    send(
        &["--bitmap", "paused", "--allow-disabled", arg(&img)],
        &stream,
    );
    // What the bitmap recorded before it was disabled, and nothing after.
    let dump = blkdelta_ok(&["dump", arg(&stream)]);
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains(&format!("offset={}", MIB)), "{dump}");
    assert!(!dump.contains(&format!("offset={}", 8 * MIB)), "{dump}");
}

/// Starts qemu-io on `img` and writes through it, waiting until the write is done: a process
/// holding the image open for writing, killed with SIGKILL (and reaped) when dropped.
fn start_writer(img: &Path) -> Reaped {
    let child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut w = Reaped(child);
    let stdin = w.stdin.as_mut().unwrap();
    stdin.write_all(b"write -P 0x77 2M 64k\n").unwrap();
    stdin.flush().unwrap();
    let mut out = BufReader::new(w.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("wrote") {
        line.clear();
        assert!(out.read_line(&mut line).unwrap() > 0, "qemu-io exited");
    }
    w
}

#[test]
fn bitmap_of_a_crashed_writer_is_refused_as_in_use() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "16M", "");
    bitmap(&img, &["--add"], "daily");
    let writer = start_writer(&img);
    // While the writer runs, its locks refuse the image.
    let out = blkdelta(&["send", "--bitmap", "daily", "-o", "/dev/null", arg(&img)]);
    assert_eq!(out.status.code(), Some(1));
    drop(writer); // SIGKILL: the bitmap stays marked in use.
    let out = blkdelta(&["send", "--bitmap", "daily", "-o", "/dev/null", arg(&img)]);
    assert_refused(
        &out,
        &[
            "bitmap 'daily' is marked in use",
            "QEMU did not close the image cleanly",
        ],
        "",
    );
    let out = blkdelta(&[
        "send",
        "--bitmap",
        "daily",
        "--allow-disabled",
        "-o",
        "/dev/null",
        arg(&img),
    ]);
    assert_refused(&out, &["marked in use"], "");
}

#[test]
fn inconsistent_bitmaps_are_refused() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "16M", "");
    bitmap(&img, &["--add"], "daily");
    // Clear autoclear bit 0 (byte 95 of the header), as a writer unaware of bitmaps would.
    let mut bytes = std::fs::read(&img).unwrap();
    assert_eq!(bytes[95] & 1, 1, "qemu-img set the bitmaps autoclear bit");
    bytes[95] &= !1;
    std::fs::write(&img, bytes).unwrap();
    let out = blkdelta(&["send", "--bitmap", "daily", "-o", "/dev/null", arg(&img)]);
    assert_refused(
        &out,
        &["bitmap 'daily'", "inconsistent", "autoclear bit 0"],
        "",
    );
}

#[test]
fn receiver_checks_the_named_base_and_force_overrides() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let (img, replica) = seeded(&s, "", "65536");
    qemu_io(&img, &["write -P 0x21 5M 100k".into()]);
    let stream = s.path("weekly.bd");
    let weekly = [
        "--bitmap",
        "daily",
        "--from-name",
        "weekly",
        "--to-name",
        "tue",
    ];
    send(&[&weekly[..], &[arg(&img)]].concat(), &stream);
    let before = std::fs::read(&replica).unwrap();
    let out = receive_file(&stream, &replica, &[]);
    assert_refused(&out, &["'daily'", "'weekly'"], "");
    assert!(
        std::fs::read(&replica).unwrap() == before,
        "replica changed"
    );
    assert!(holds(&replica, "daily"));
    assert_ok(&receive_file(&stream, &replica, &["--force"]), "receive");
    assert_replica_is_image(&s, &img, &replica);
    assert!(holds(&replica, "tue"));
}

#[test]
fn named_states_chain_and_a_stale_name_is_refused() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let (img, replica) = seeded(&s, "", "65536");
    // daily → tue → wed; then an incremental from 'daily' no longer applies.
    qemu_io(&img, &["write -P 0x21 5M 100k".into()]);
    let to_tue = ["--bitmap", "daily", "--to-name", "tue"];
    assert_ok(
        &pipe_args(&[&to_tue[..], &[arg(&img)]].concat(), &replica, &[]),
        "receive",
    );
    assert!(holds(&replica, "tue"));
    bitmap(&img, &["--clear"], "daily");
    qemu_io(&img, &["write -P 0x22 6M 64k".into()]);
    let to_wed = [
        "--bitmap",
        "daily",
        "--from-name",
        "tue",
        "--to-name",
        "wed",
    ];
    assert_ok(
        &pipe_args(&[&to_wed[..], &[arg(&img)]].concat(), &replica, &[]),
        "receive",
    );
    assert_replica_is_image(&s, &img, &replica);
    assert!(holds(&replica, "wed"));
    bitmap(&img, &["--clear"], "daily");
    qemu_io(&img, &["write -P 0x23 7M 64k".into()]);
    let again = s.path("again.bd");
    send(&["--bitmap", "daily", arg(&img)], &again);
    assert_refused(
        &receive_file(&again, &replica, &[]),
        &["'wed'", "'daily'"],
        "",
    );
}

#[test]
fn seed_without_a_name_does_not_start_a_bitmap_chain() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "16M", "");
    bitmap(&img, &["--add"], "daily");
    let replica = s.path("replica.raw");
    assert_ok(&pipe_args(&[arg(&img)], &replica, &[]), "receive");
    qemu_io(&img, &["write -P 0x21 1M 64k".into()]);
    let out = pipe_args(&["--bitmap", "daily", arg(&img)], &replica, &[]);
    assert_refused(&out, &["'daily'"], "");
}
