//! `blkdelta prune`: retention for qcow2 replicas, checked against qemu-img. The snapshots that
//! stay are exactly the newest and the held one, each reads as before, `qemu-img check` finds
//! no error and no leak, and the file allocates less; a dry run and every refusal leave the
//! file's bytes as they were.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use blkdelta_receive::identity::Identity;
use blkdelta_receive::state::{self, InProgress, ReplicaState, StateSnap};

use crate::common::{
    allocated_bytes, arg, assert_refused, assert_same_file, blkdelta, blkdelta_ok, export, have,
    lock_held, one_error_line, qemu_io, run, snapshot, state_of, Reaped, Scratch,
};

/// QEMU's lock byte for "holds write permission".
const WRITE_BYTE: u64 = 101;

fn have_qemu() -> bool {
    have("qemu-img") && have("qemu-io")
}

/// An image with snapshots s1..s6, each with its own 2 MiB at offset 0 (so deleting one frees
/// clusters) and 512 KiB of its own further on, then `qemu-img snapshot -a s2`: the replica
/// holds s2.
fn six_snapshots(s: &Scratch) -> PathBuf {
    let img = s.qcow2("vm.qcow2", "32M", "");
    for i in 1..=6 {
        qemu_io(
            &img,
            &[
                format!("write -P 0x{i}{i} 0 2M"),
                format!("write -P 0x{i}0 {}M 512k", 4 + 2 * i),
            ],
        );
        snapshot(&img, &format!("s{i}"));
    }
    run(Command::new("qemu-img")
        .args(["snapshot", "-a", "s2"])
        .arg(&img));
    img
}

/// The snapshot names `qemu-img snapshot -l` lists, in its order (`ID TAG VM_SIZE DATE ...`
/// under two header lines; nothing at all without snapshots).
fn snapshot_names(img: &Path) -> Vec<String> {
    let out = run(Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(img));
    let text = String::from_utf8(out.stdout).unwrap();
    text.lines()
        .skip(2)
        .map(|l| l.split_whitespace().nth(1).unwrap().to_string())
        .collect()
}

/// `qemu-img check`: it must pass, with no corruption and no leaked cluster.
fn assert_checks_clean(img: &Path) {
    let out = run(Command::new("qemu-img")
        .args(["check", "--output=json"])
        .arg(img));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    for field in ["corruptions", "leaks", "check-errors"] {
        let n = report.get(field).and_then(|v| v.as_u64()).unwrap_or(0);
        assert_eq!(n, 0, "qemu-img check found {field}: {report}");
    }
}

/// qemu's raw export of each of `snaps` (and of the active layer, as `active`) into `dir`.
fn exports(s: &Scratch, img: &Path, snaps: &[&str], tag: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for snap in snaps.iter().map(|n| Some(*n)).chain([None]) {
        let e = s.path(&format!("{}.{tag}.raw", snap.unwrap_or("active")));
        export(img, snap, &e);
        out.push(e);
    }
    out
}

/// The text a command wrote to stdout.
fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

#[test]
fn prune_keeps_the_newest_and_the_held_snapshot() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = six_snapshots(&s);
    let stay = ["s2", "s5", "s6"];
    let before = exports(&s, &img, &stay, "before");
    let allocated = allocated_bytes(&img);
    let out = blkdelta_ok(&["prune", "--keep", "2", arg(&img)]);
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    for (line, name) in lines.iter().zip(["s1", "s3", "s4"]) {
        assert!(line.starts_with(&format!("deleted {name} (id ")), "{text}");
    }
    assert!(lines[3].starts_with("kept 3, deleted 3, freed ~"), "{text}");
    assert!(lines[3].contains("holds s2"), "{text}");
    assert_eq!(snapshot_names(&img), stay);
    assert_checks_clean(&img);
    for (old, new) in before.iter().zip(exports(&s, &img, &stay, "after")) {
        assert_same_file(old, &new);
    }
    let lock = PathBuf::from(format!("{}.lock", state_of(&img).display()));
    assert!(!lock.exists() && !state_of(&img).exists(), "left beside it");
    let now = allocated_bytes(&img);
    assert!(
        now + (4 << 20) <= allocated,
        "allocated {now} bytes after, {allocated} before"
    );
}

#[test]
fn json_says_what_went_what_stays_and_what_was_freed() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = six_snapshots(&s);
    let out = blkdelta_ok(&["prune", "--json", "--keep", "1", arg(&img)]);
    let report: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let names = |key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("deleted"), ["s1", "s3", "s4", "s5"], "{report}");
    assert_eq!(names("kept_snapshots"), ["s2", "s6"], "{report}");
    assert_eq!(report["kept"], 2, "{report}");
    assert_eq!(report["held"]["name"], "s2", "{report}");
    assert_eq!(report["dry_run"], false, "{report}");
    assert!(
        report["freed_bytes"].as_u64().unwrap() >= 4 << 20,
        "{report}"
    );
    assert!(report["deleted"][0]["date"].is_string(), "{report}");
    assert_eq!(snapshot_names(&img), ["s2", "s6"]);
    assert_checks_clean(&img);
}

#[test]
fn quiet_prints_nothing() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = six_snapshots(&s);
    let out = blkdelta_ok(&["prune", "-q", "--keep", "5", arg(&img)]);
    assert_eq!(stdout(&out), "");
    assert_eq!(snapshot_names(&img), ["s2", "s3", "s4", "s5", "s6"]);
}

#[test]
fn a_dry_run_changes_nothing() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = six_snapshots(&s);
    let copy = s.path("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let out = blkdelta_ok(&["prune", "--dry-run", "--keep", "2", arg(&img)]);
    let text = stdout(&out);
    let expect = [
        "would delete s1 (id 1, ",
        "would keep s2 (id 2, ",
        "would delete s3 (id 3, ",
        "would delete s4 (id 4, ",
        "would keep s5 (id 5, ",
        "would keep s6 (id 6, ",
        "would keep 3, delete 3; the replica holds s2 (dry run: nothing changed)",
    ];
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), expect.len(), "{text}");
    for (line, start) in lines.iter().zip(expect) {
        assert!(line.starts_with(start), "{line:?} in:\n{text}");
    }
    assert!(lines[1].ends_with(", held by the replica"), "{text}");
    assert_same_file(&img, &copy);
    assert!(!state_of(&img).exists());
}

#[test]
fn a_replica_that_holds_no_snapshot_is_pruned_by_the_rules_alone() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = six_snapshots(&s);
    qemu_io(&img, &["write -P 0x77 0 64k".into()]);
    let out = blkdelta_ok(&["prune", "--keep-daily", "1", arg(&img)]);
    let text = stdout(&out);
    assert!(text.contains("holds none of its snapshots"), "{text}");
    // All were taken within seconds: the newest of their day stays (and the newest of the
    // day before, when they straddle midnight UTC).
    let names = snapshot_names(&img);
    assert_eq!(names.last().map(String::as_str), Some("s6"), "{names:?}");
    assert!(names.len() <= 2, "{names:?}");
    assert_checks_clean(&img);
}

#[test]
fn a_raw_file_has_no_snapshots_to_prune() {
    let s = Scratch::new();
    let raw = s.path("vm.raw");
    std::fs::write(&raw, vec![7u8; 1 << 20]).unwrap();
    let out = blkdelta(&["prune", "--keep", "1", arg(&raw)]);
    assert_refused(
        &out,
        &["vm.raw", "not a qcow2 image", "no snapshots"],
        "raw",
    );
    assert_eq!(std::fs::read(&raw).unwrap(), vec![7u8; 1 << 20]);
}

#[test]
fn a_keep_rule_is_required() {
    for args in [
        &["prune", "vm.qcow2"][..],
        &["prune", "--dry-run", "vm.qcow2"],
        &["prune", "--keep", "x", "vm.qcow2"],
        &["prune", "--keep", "1"],
    ] {
        let out = blkdelta(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        one_error_line(&out);
    }
}

/// qemu-io holding the image for writing, as a VM would, until dropped.
fn qemu_io_holding(img: &Path) -> Reaped {
    let child = Command::new("qemu-io")
        .args(["-f", "qcow2"])
        .arg(img)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut child = Reaped(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lock_held(img, WRITE_BYTE) {
        assert!(child.try_wait().unwrap().is_none(), "qemu-io exited");
        assert!(Instant::now() < deadline, "qemu-io did not lock {img:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn an_image_in_use_is_refused_and_left_as_it_was() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = six_snapshots(&s);
    let copy = s.path("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let mut holder = qemu_io_holding(&img);
    for dry_run in [false, true] {
        let mut args = vec!["prune", "--keep", "1", arg(&img)];
        if dry_run {
            args.push("--dry-run");
        }
        let out = blkdelta(&args);
        assert_refused(&out, &["vm.qcow2", "in use by another process"], "in use");
    }
    // qemu-io still answers: it held the image all along.
    let stdin = holder.stdin.as_mut().unwrap();
    std::io::Write::write_all(stdin, b"length\n").unwrap();
    let mut line = String::new();
    BufReader::new(holder.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("MiB"), "qemu-io answered {line:?}");
    drop(holder);
    assert_same_file(&img, &copy);
}

#[test]
fn an_image_the_writer_refuses_is_left_as_it_was() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let base = six_snapshots(&s);
    let img = s.path("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&img));
    snapshot(&img, "a");
    snapshot(&img, "b");
    let copy = s.path("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let out = blkdelta(&["prune", "--keep", "1", arg(&img)]);
    assert_refused(&out, &["overlay.qcow2", "backing file"], "backing file");
    assert_same_file(&img, &copy);
}

/// A state for `img` as blkdelta leaves it: holding `held`, the file as it is now.
fn state_holding(img: &Path, held: &str) -> ReplicaState {
    ReplicaState {
        source_kind: "qcow2".into(),
        source_name: "vm.qcow2".into(),
        snapshot: Some(StateSnap {
            name: held.into(),
            guid: "ab".repeat(16),
        }),
        identity: Some(Identity::of_image(&std::fs::metadata(img).unwrap())),
        ..ReplicaState::new(32 << 20)
    }
}

#[test]
fn an_apply_in_progress_is_finished_first() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = six_snapshots(&s);
    let st = ReplicaState {
        snapshot: None,
        in_progress: Some(InProgress {
            stream_id: "01".repeat(16),
            from: None,
            to: StateSnap {
                name: "s7".into(),
                guid: "cd".repeat(16),
            },
            transition: 0,
            durable_offset: 1 << 20,
            undo: None,
        }),
        ..state_holding(&img, "s6")
    };
    state::save(&state_of(&img), &st).unwrap();
    let copy = s.path("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    for extra in [&[][..], &["--dry-run"]] {
        let mut args = vec!["prune", "--keep", "1", arg(&img)];
        args.extend_from_slice(extra);
        let out = blkdelta(&args);
        assert_refused(&out, &["unfinished apply", "next receive"], "in progress");
    }
    assert_same_file(&img, &copy);
}

#[test]
fn the_replica_state_still_stands_for_the_pruned_replica() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = six_snapshots(&s);
    let state_path = s.path("elsewhere.state");
    state::save(&state_path, &state_holding(&img, "s2")).unwrap();
    let state_arg = arg(&state_path);
    blkdelta_ok(&["prune", "--state", state_arg, "--keep", "1", arg(&img)]);
    assert_eq!(snapshot_names(&img), ["s2", "s6"]);
    // status compares the replica with its state: the prune's own change is not a change.
    let out = blkdelta(&["status", "--state", state_arg, arg(&img)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
