//! Resume tokens, undo streams and dry runs, end to end.

use std::path::{Path, PathBuf};

use crate::common::{
    assert_same_file, blkdelta, blkdelta_ok, checksum, export, have, io, pipe, qemu_io, random,
    receive_file, records, run, send_to_file, snapshot, spec, status_text, Scratch,
};

/// A 32 MiB image with snapshots s0 and s1: random data, then random data over part of it,
/// zeros, a discard and a pattern.
fn history(s: &Scratch) -> PathBuf {
    let steps = [
        ("s0", vec![random(0, 8, 5)]),
        (
            "s1",
            vec![
                random(2, 8, 6),
                io("write -z 0 1M"),
                io("discard 12M 1M"),
                io("write -P 0x7 20M 3M"),
            ],
        ),
    ];
    s.history("vm.qcow2", "32M", "", &steps)
}

fn cut(stream: &Path, fraction: f64, out: &Path) {
    let bytes = std::fs::read(stream).unwrap();
    let n = (bytes.len() as f64 * fraction) as usize;
    std::fs::write(out, &bytes[..n]).unwrap();
}

#[test]
fn an_interrupted_receive_resumes_from_its_token() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let stream = s.path("inc.bd");
    let full_len = send_to_file(&spec(&img, "s0..s1"), &stream);
    let part = s.path("part.bd");
    cut(&stream, 0.7, &part);
    let out = receive_file(&part, &replica, &["--checkpoint-bytes", "1048576"]);
    assert_eq!(out.status.code(), Some(1));
    let st = status_text(&replica, &[]);
    let token = st
        .lines()
        .find_map(|l| l.strip_prefix("resume token: "))
        .unwrap_or_else(|| panic!("no token in:\n{st}"))
        .to_string();
    assert!(!st.contains("durable below offset 0)"), "{st}");

    let resumed = s.path("resumed.bd");
    blkdelta_ok(&[
        "send",
        "-q",
        "--resume",
        &token,
        &spec(&img, "s0..s1"),
        "-o",
        resumed.to_str().unwrap(),
    ]);
    let resumed_len = std::fs::metadata(&resumed).unwrap().len();
    assert!(resumed_len < full_len, "{resumed_len} >= {full_len}");
    // It still carries the snapshot's table entry, right before its snapshot-end.
    let kinds: Vec<&str> = records(&resumed).1.iter().map(|r| r.kind).collect();
    assert!(
        kinds.ends_with(&["snapshot-info", "snapshot-end", "end"]),
        "{kinds:?}"
    );
    let out = receive_file(&resumed, &replica, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_file(&replica, &s.export_of(&img, "s1"));
    assert!(status_text(&replica, &[]).contains("holds snapshot 's1'"));

    // A resumed stream cannot be applied to a replica that does not hold its beginning.
    let other = s.path("other.raw");
    pipe(&spec(&img, "s0"), &other, &[]);
    let out = receive_file(&resumed, &other, &[]);
    assert_eq!(out.status.code(), Some(1));
}

#[test]
fn a_token_for_another_image_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let other = s.qcow2("other.qcow2", "32M", "");
    snapshot(&other, "s0");
    snapshot(&other, "s1");
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let stream = s.path("inc.bd");
    send_to_file(&spec(&img, "s0..s1"), &stream);
    let part = s.path("part.bd");
    cut(&stream, 0.5, &part);
    receive_file(&part, &replica, &["--checkpoint-bytes", "1048576"]);
    let st = status_text(&replica, &[]);
    let token = st
        .lines()
        .find_map(|l| l.strip_prefix("resume token: "))
        .unwrap();
    let out = blkdelta(&[
        "send",
        "--resume",
        token,
        &spec(&other, "s0..s1"),
        "-o",
        "/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("another image"));
    let out = blkdelta(&[
        "send",
        "--resume",
        "bd1-00",
        &spec(&img, "s0..s1"),
        "-o",
        "/dev/null",
    ]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn undo_rolls_back_and_the_stream_replays() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let undo = s.path("undo.bd");
    let stream = s.path("inc.bd");
    send_to_file(&spec(&img, "s0..s1"), &stream);
    let out = receive_file(&stream, &replica, &["--undo", undo.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_file(&replica, &s.export_of(&img, "s1"));

    // The undo stream takes the replica back to s0, and the state says so.
    let dump = String::from_utf8(blkdelta_ok(&["dump", undo.to_str().unwrap()]).stdout).unwrap();
    assert!(
        dump.lines().next().unwrap().contains("transitions=s1->s0"),
        "{dump}"
    );
    assert!(receive_file(&undo, &replica, &[]).status.success());
    assert_same_file(&replica, &s.export_of(&img, "s0"));
    assert!(status_text(&replica, &[]).contains("holds snapshot 's0'"));

    // And forward again.
    assert!(receive_file(&stream, &replica, &[]).status.success());
    assert_same_file(&replica, &s.export_of(&img, "s1"));

    // An existing undo file is never overwritten.
    let out = receive_file(&undo, &replica, &["--undo", undo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("exists already"));
}

#[test]
fn an_interrupted_receive_with_undo_continues_its_undo_stream() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let undo = s.path("undo.bd");
    let u = undo.to_str().unwrap();
    let stream = s.path("inc.bd");
    send_to_file(&spec(&img, "s0..s1"), &stream);
    let part = s.path("part.bd");
    cut(&stream, 0.6, &part);
    let small_batches = ["--undo", u, "--checkpoint-bytes", "1048576"];
    assert_eq!(
        receive_file(&part, &replica, &small_batches).status.code(),
        Some(1)
    );
    assert!(status_text(&replica, &[]).contains("undo stream:"));
    // Finishing without the undo file would lose the rollback: refused.
    let out = receive_file(&stream, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--undo"));
    let out = receive_file(&stream, &replica, &["--undo", u]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_file(&replica, &s.export_of(&img, "s1"));
    assert!(receive_file(&undo, &replica, &[]).status.success());
    assert_same_file(&replica, &s.export_of(&img, "s0"));
}

#[test]
fn undo_restores_a_shrunk_tail_and_a_grown_size() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "8M", "");
    qemu_io(&img, &["write -P 0x31 0 8M".into()]);
    snapshot(&img, "big");
    let resize = |size: &str, shrink: bool| {
        let mut cmd = std::process::Command::new("qemu-img");
        cmd.args(["resize", "-q"]);
        if shrink {
            cmd.arg("--shrink");
        }
        run(cmd.arg(&img).arg(size));
    };
    resize("5M", true);
    qemu_io(&img, &["write -P 0x32 1M 1M".into()]);
    snapshot(&img, "small");
    resize("12M", false);
    qemu_io(&img, &["write -P 0x33 10M 1M".into()]);
    snapshot(&img, "grown");
    let replica = s.path("r.raw");
    pipe(&spec(&img, "big"), &replica, &[]);
    for (step, back) in [("big..small", "big"), ("small..grown", "small")] {
        let stream = s.path(&format!("{back}.bd"));
        send_to_file(&spec(&img, step), &stream);
        let undo = s.path(&format!("{back}.undo"));
        let out = receive_file(&stream, &replica, &["--undo", undo.to_str().unwrap()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(receive_file(&undo, &replica, &[]).status.success());
        let e = s.path(&format!("{back}.raw"));
        // qemu exports a snapshot at the image's current size: compare the snapshot's bytes.
        export(&img, Some(back), &e);
        let want = std::fs::read(&e).unwrap();
        let got = std::fs::read(&replica).unwrap();
        let size = if back == "big" { 8 << 20 } else { 5 << 20 };
        assert_eq!(got.len(), size, "{step}");
        assert!(
            got[..] == want[..size],
            "{step}: replica differs after undo"
        );
        assert!(receive_file(&stream, &replica, &[]).status.success());
    }
}

#[test]
fn undo_needs_a_single_incremental_transition() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    qemu_io(&img, &["write -P 0x9 0 1M".into()]);
    snapshot(&img, "s2");
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let stream = s.path("multi.bd");
    send_to_file(&spec(&img, "s0..s2"), &stream);
    let undo = s.path("u.bd");
    let out = receive_file(&stream, &replica, &["--undo", undo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("one incremental transition"));
    assert!(!undo.exists());
}

#[test]
fn dry_runs_touch_nothing() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let out = blkdelta_ok(&["send", "--dry-run", &spec(&img, "s0..s1")]);
    let plan = String::from_utf8(out.stdout).unwrap();
    assert!(plan.contains("'s0' -> 's1'"), "{plan}");

    let seed = s.path("seed.bd");
    send_to_file(&spec(&img, "s0"), &seed);
    let missing = s.path("missing.raw");
    let out = receive_file(&seed, &missing, &["--dry-run"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing was written"));
    assert!(!missing.exists());

    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let state = std::fs::read(s.path("r.raw.blkdelta")).unwrap();
    let stream = s.path("inc.bd");
    send_to_file(&spec(&img, "s0..s1"), &stream);
    let out = receive_file(&stream, &replica, &["--dry-run"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("reaching 's1'"));
    assert_same_file(&replica, &s.export_of(&img, "s0"));
    assert_eq!(std::fs::read(s.path("r.raw.blkdelta")).unwrap(), state);

    let mut bad = std::fs::read(&stream).unwrap();
    let n = bad.len();
    bad[n / 2] ^= 0x10;
    std::fs::write(&stream, bad).unwrap();
    let out = receive_file(&stream, &replica, &["--dry-run"]);
    assert_eq!(out.status.code(), Some(1));
    assert_same_file(&replica, &s.export_of(&img, "s0"));
}

#[test]
fn an_interrupted_growing_apply_is_finished_by_reapplying() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "8M", "");
    qemu_io(&img, &["write -P 0x1 0 8M".into()]);
    snapshot(&img, "small");
    run(std::process::Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&img)
        .arg("24M"));
    let r = s.random_file("r", 12 << 20, 8);
    qemu_io(&img, &[format!("write -s {} 10M 12M", r.display())]);
    snapshot(&img, "grown");
    let stream = s.path("grow.bd");
    send_to_file(&spec(&img, "small..grown"), &stream);
    let part = s.path("part.bd");
    cut(&stream, 0.5, &part);
    for with_undo in [false, true] {
        let replica = s.path(&format!("r{with_undo}.raw"));
        pipe(&spec(&img, "small"), &replica, &[]);
        let undo = s.path(&format!("u{with_undo}.bd"));
        let mut args = vec!["--checkpoint-bytes", "1048576"];
        if with_undo {
            args.extend(["--undo", undo.to_str().unwrap()]);
        }
        assert_eq!(receive_file(&part, &replica, &args).status.code(), Some(1));
        assert_eq!(std::fs::metadata(&replica).unwrap().len(), 24 << 20);
        let out = receive_file(&stream, &replica, &args);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same_file(&replica, &s.export_of(&img, "grown"));
        if with_undo {
            assert!(receive_file(&undo, &replica, &[]).status.success());
            assert_eq!(
                checksum(replica.to_str().unwrap(), &[]),
                checksum(&spec(&img, "small"), &[])
            );
        }
    }
}
