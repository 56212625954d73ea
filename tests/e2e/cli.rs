//! The command-line contract: exit codes, one-line errors, base checks, list, dump, status.

use std::path::PathBuf;

use crate::common::{
    assert_same_file, bin, blkdelta, blkdelta_ok, export, have, one_error_line, pipe, qemu_io,
    receive_file, run, send_to_file, snapshot, Scratch,
};

fn three_snapshots(s: &Scratch) -> PathBuf {
    let img = s.qcow2("vm.qcow2", "16M", "");
    qemu_io(&img, &["write -P 0x1 0 1M".into()]);
    snapshot(&img, "s1");
    qemu_io(&img, &["write -P 0x2 1M 1M".into()]);
    snapshot(&img, "s2");
    qemu_io(&img, &["write -P 0x3 2M 1M".into()]);
    snapshot(&img, "s3");
    img
}

#[test]
fn usage_errors_are_one_line_and_exit_2() {
    for args in [
        &["send"][..],
        &["frobnicate"],
        &["send", "--level", "99", "x"],
        &["send", "vm.qcow2@a..", "-o", "/dev/null"],
        // Memory grows with the threads: their number is bounded.
        &["send", "--threads", "33", "x@y"],
        &["checksum", "--threads", "0", "x"],
    ] {
        let out = blkdelta(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        one_error_line(&out);
    }
}

/// Freezes the help texts: a change to the CLI shows up here.
#[test]
fn help_texts_are_as_documented() {
    for (args, golden) in [
        (&["--help"][..], include_str!("../golden/help.txt")),
        (&["send", "--help"], include_str!("../golden/send-help.txt")),
        (
            &["receive", "--help"],
            include_str!("../golden/receive-help.txt"),
        ),
        (
            &["prune", "--help"],
            include_str!("../golden/prune-help.txt"),
        ),
        (&["sync", "--help"], include_str!("../golden/sync-help.txt")),
    ] {
        let out = blkdelta_ok(args);
        assert_eq!(String::from_utf8(out.stdout).unwrap(), golden, "{args:?}");
    }
}

#[test]
fn missing_snapshot_is_one_line_and_exit_1() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    let out = blkdelta(&[
        "send",
        &format!("{}@nope", img.display()),
        "-o",
        "/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(one_error_line(&out).contains("nope"));
    let out = blkdelta(&[
        "send",
        &format!("{}@s3..s1", img.display()),
        "-o",
        "/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_error_line(&out).contains("not older"));
}

#[test]
fn wrong_base_is_refused_before_any_write() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    let replica = s.path("r.raw");
    pipe(&format!("{}@s1", img.display()), &replica, &[]);
    let before = std::fs::read(&replica).unwrap();
    let stream = s.path("s2s3.bd");
    send_to_file(&format!("{}@s2..s3", img.display()), &stream);
    let out = receive_file(&stream, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out);
    assert!(err.contains("'s1'") && err.contains("'s2'"), "{err}");
    assert_eq!(std::fs::read(&replica).unwrap(), before);
    // --force applies it anyway.
    let out = receive_file(&stream, &replica, &["--force"]);
    assert!(out.status.success());
}

#[test]
fn full_stream_over_unknown_data_needs_force() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    let target = s.path("precious.raw");
    std::fs::write(&target, vec![7u8; 1 << 20]).unwrap();
    let stream = s.path("seed.bd");
    send_to_file(&format!("{}@s1", img.display()), &stream);
    let out = receive_file(&stream, &target, &[]);
    assert_eq!(out.status.code(), Some(1));
    one_error_line(&out);
    assert_eq!(std::fs::read(&target).unwrap(), vec![7u8; 1 << 20]);
    let out = receive_file(&stream, &target, &["--force"]);
    assert!(out.status.success());
    let e = s.path("s1.raw");
    export(&img, Some("s1"), &e);
    assert_same_file(&target, &e);
}

#[test]
fn corrupt_payload_is_never_written_and_leaves_the_replica_in_progress() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    let replica = s.path("r.raw");
    pipe(&format!("{}@s1", img.display()), &replica, &[]);
    let before = std::fs::read(&replica).unwrap();
    let stream = s.path("inc.bd");
    send_to_file(&format!("{}@s1..s2", img.display()), &stream);
    let mut bytes = std::fs::read(&stream).unwrap();
    let n = bytes.len();
    bytes[n - 200] ^= 0xff; // inside the last data payload
    std::fs::write(&stream, &bytes).unwrap();
    let out = receive_file(&stream, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out);
    assert!(err.contains("checksum") || err.contains("corrupt"), "{err}");
    assert_eq!(std::fs::read(&replica).unwrap(), before);
    let status = blkdelta_ok(&["status", replica.to_str().unwrap()]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(!text.contains("holds snapshot 's2'"), "{text}");
}

#[test]
fn truncated_stream_is_detected() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    let stream = s.path("seed.bd");
    send_to_file(&format!("{}@s1..s3", img.display()), &stream);
    let bytes = std::fs::read(&stream).unwrap();
    std::fs::write(&stream, &bytes[..bytes.len() - 10]).unwrap();
    let out = blkdelta(&["dump", stream.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(one_error_line(&out).contains("truncated"));
}

#[test]
fn list_shows_snapshots_and_bitmaps() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    run(std::process::Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("daily"));
    let out = blkdelta_ok(&["list", img.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    for name in ["s1", "s2", "s3", "daily", "16777216"] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    let out = blkdelta_ok(&["list", "--json", img.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshots"].as_array().unwrap().len(), 3);
    assert_eq!(v["bitmaps"][0]["name"], "daily");
    // GUIDs are stable across invocations and distinct.
    let again = blkdelta_ok(&["list", "--json", img.to_str().unwrap()]);
    let w: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(v["snapshots"], w["snapshots"]);
    assert_ne!(v["snapshots"][0]["guid"], v["snapshots"][1]["guid"]);
}

#[test]
fn dump_json_has_one_object_per_record() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    let stream = s.path("inc.bd");
    send_to_file(&format!("{}@s1..s3", img.display()), &stream);
    let out = blkdelta_ok(&["dump", "--json", stream.to_str().unwrap()]);
    let records: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records[0]["record"], "header");
    assert_eq!(records[0]["transitions"].as_array().unwrap().len(), 2);
    assert_eq!(records.last().unwrap()["record"], "end");
    let data: u64 = records
        .iter()
        .filter(|r| r["record"] == "data")
        .map(|r| r["len"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 2 << 20);
    assert_eq!(records[0]["total_data_bytes"].as_u64(), Some(2 << 20));
}

#[test]
fn stdin_stream_and_file_stream_agree() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    let (a, b) = (s.path("a.raw"), s.path("b.raw"));
    pipe(&format!("{}@s2", img.display()), &a, &[]);
    let stream = s.path("s2.bd");
    send_to_file(&format!("{}@s2", img.display()), &stream);
    assert!(receive_file(&stream, &b, &[]).status.success());
    assert_same_file(&a, &b);
}

#[test]
fn progress_lines_on_request_and_silence_with_q() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    let stream = s.path("p.bd");
    let out = blkdelta_ok(&[
        "send",
        "--progress",
        &format!("{}@s1..s3", img.display()),
        "-o",
        stream.to_str().unwrap(),
    ]);
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.contains("send 2.00 MiB of 2.00 MiB"), "{err}");
    assert!(err.contains("sent 2.00 MiB of data in "), "{err}");
    let replica = s.path("r.raw");
    let out = blkdelta_ok(&[
        "receive",
        "-q",
        "-i",
        stream.to_str().unwrap(),
        replica.to_str().unwrap(),
        "--force",
    ]);
    assert!(out.stderr.is_empty());
}

#[test]
fn send_refuses_a_terminal() {
    if !have("qemu-img") || !have("script") {
        return;
    }
    let s = Scratch::new();
    let img = three_snapshots(&s);
    // `script` gives the command a pseudo-terminal as stdout.
    let cmd = format!("{} send {}@s1", bin().display(), img.display());
    let out = std::process::Command::new("script")
        .args(["-qec", &cmd, "/dev/null"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("refusing to write a stream to a terminal"),
        "{text}"
    );
    assert_eq!(out.status.code(), Some(2));
}
