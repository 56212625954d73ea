//! `send --bwlimit RATE`: the stream takes its size over the rate, written to a file or to
//! stdout, and arrives whole; a RATE that is not one is a usage error.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    arg, assert_ok, assert_same_file, bin, blkdelta, blkdelta_ok, have, one_error_line, random,
    receive_file, send_file, spec, Scratch, MIB,
};

/// The rate of the tests, as `--bwlimit` is given it and in bytes per second.
const RATE: (&str, u64) = ("2M", 2 * MIB);

/// A 16 MiB image whose snapshot `s` holds 6 MiB of random data (sent plain, with `-l 0`, a
/// stream of a little over 6 MiB: 3 s at the rate).
fn six_mib_snapshot(s: &Scratch) -> PathBuf {
    s.history("vm.qcow2", "16M", "", &[("s", vec![random(0, 6, 11)])])
}

/// Asserts that `stream_bytes` (the header and every record: the whole stream) took
/// `elapsed` at [`RATE`], within 5%.
fn assert_paced(stream_bytes: u64, elapsed: Duration) {
    let expected = stream_bytes as f64 / RATE.1 as f64;
    let ratio = elapsed.as_secs_f64() / expected;
    assert!(
        (0.95..=1.05).contains(&ratio),
        "{stream_bytes} bytes at {} took {elapsed:.3?}, not {expected:.3} s (x{ratio:.3})",
        RATE.0
    );
}

#[test]
fn a_stream_file_is_paced_to_the_rate() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = six_mib_snapshot(&s);
    let stream = s.path("s.bd");
    let source = spec(&img, "s");
    let started = Instant::now();
    blkdelta_ok(&[
        "send",
        "-q",
        "--bwlimit",
        RATE.0,
        "-l",
        "0",
        "-o",
        arg(&stream),
        &source,
    ]);
    let elapsed = started.elapsed();
    let stream_bytes = std::fs::metadata(&stream).unwrap().len();
    assert!(stream_bytes > 6 * MIB, "{stream_bytes} bytes");
    assert_paced(stream_bytes, elapsed);

    let replica = s.path("r.raw");
    assert_ok(&receive_file(&stream, &replica, &[]), "receive");
    assert_same_file(&replica, &s.export_of(&img, "s"));
}

/// `blkdelta send -q --bwlimit RATE -l 0 SOURCE | blkdelta receive -q REPLICA` through a real
/// pipe; returns how long the sender took.
fn paced_pipe(source: &str, replica: &Path) -> Duration {
    let started = Instant::now();
    let mut sender = Command::new(bin())
        .args(["send", "-q", "--bwlimit", RATE.0, "-l", "0", source])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let receiver = Command::new(bin())
        .args(["receive", "-q", arg(replica)])
        .stdin(sender.stdout.take().unwrap())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let sent = sender.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    assert_ok(&sent, "send --bwlimit to stdout");
    assert_ok(&receiver.wait_with_output().unwrap(), "receive");
    elapsed
}

#[test]
fn stdout_is_paced_to_the_rate() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = six_mib_snapshot(&s);
    let source = spec(&img, "s");
    // The same stream unpaced, for its size (plain payloads: the same size every time).
    let stream_bytes = send_file(&["-l", "0", &source], &s.path("unpaced.bd"));
    let replica = s.path("r.raw");
    let elapsed = paced_pipe(&source, &replica);
    assert_paced(stream_bytes, elapsed);
    assert_same_file(&replica, &s.export_of(&img, "s"));
}

#[test]
fn a_rate_that_is_not_one_is_a_usage_error() {
    for rate in ["0", "0K", "2X", "1.5M", "2MB", "2KiB", "-1", ""] {
        let option = format!("--bwlimit={rate}");
        let out = blkdelta(&["send", &option, "vm.qcow2@s", "-o", "/dev/null"]);
        assert_eq!(out.status.code(), Some(2), "--bwlimit {rate:?}");
        let line = one_error_line(&out);
        assert!(
            line.contains("--bwlimit") && line.contains(&format!("'{rate}'")),
            "{line}"
        );
    }
}
