//! What sync prints and what it leaves alone: a dry run prints the plan and changes nothing on
//! either side, `-q` prints nothing, and a command line sync cannot run exits 2 having
//! touched nothing.

use std::collections::BTreeMap;
use std::path::Path;

use super::fixture::{
    assert_replica_is_newest, field, guest_writes, have_qemu, names, newest, source, sync,
    sync_json,
};
use crate::common::{arg, assert_ok, Scratch};

/// Every file of a directory and its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, std::fs::read(e.path()).unwrap())
        })
        .collect()
}

#[test]
fn a_dry_run_prints_the_plan_and_changes_nothing() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    let replica = s.path("r.qcow2");
    sync_json(&[arg(&img), arg(&replica)]);
    let base = newest(&img);
    guest_writes(&s, &img, 1);
    let before = files(s.dir.path());
    let out = sync(&["--dry-run", "--keep", "2", arg(&img), arg(&replica)]);
    assert_ok(&out, "a dry run");
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("dry run"), "{text}");
    assert!(
        text.contains("snapshot blkdelta-"),
        "the snapshot to make: {text}"
    );
    let range = format!("{}..blkdelta-", base.name);
    assert!(text.contains(&range), "{range} in: {text}");
    let v = sync_json(&["--dry-run", arg(&img), arg(&replica)]);
    assert_eq!(v["dry_run"], true, "{v}");
    assert_eq!(field(&v, "kind"), Some("incremental"), "{v}");
    assert_eq!(field(&v, "from"), Some(base.name.as_str()), "{v}");
    let to = field(&v, "to").unwrap();
    assert!(to.starts_with("blkdelta-") && to != base.name, "{v}");
    // Into a target that is not there yet: a seed, and still nothing made.
    let v = sync_json(&["--dry-run", arg(&img), arg(&s.path("new.raw"))]);
    assert_eq!(field(&v, "kind"), Some("seed"), "{v}");
    assert_eq!(field(&v, "from"), None, "{v}");
    assert!(files(s.dir.path()) == before, "a dry run changed a file");
    assert_eq!(names(&img), vec![base.name]);
}

#[test]
fn quiet_prints_nothing() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    let replica = s.path("r.raw");
    for step in 1..=2 {
        let out = sync(&["-q", arg(&img), arg(&replica)]);
        assert_ok(&out, "a quiet cycle");
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{out:?}");
        assert_replica_is_newest(&s, &img, &replica);
        guest_writes(&s, &img, step);
    }
}

#[test]
fn a_command_line_sync_cannot_run_exits_2_touching_nothing() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    let (raw, qcow2) = (s.path("r.raw"), s.path("r.qcow2"));
    let sock = s.path("qmp.sock");
    let cases: [&[&str]; 6] = [
        &[
            "--qmp",
            arg(&sock),
            "--node",
            "drive0",
            arg(&img),
            arg(&qcow2),
        ],
        &["127.0.0.1:/srv/vm.qcow2", "127.0.0.1:/srv/r.raw"],
        &[arg(&img)],
        &["--repair", "--rewind", arg(&img), arg(&qcow2)],
        &["--keep", "2", arg(&img), arg(&raw)],
        &["--keep-source", "x", arg(&img), arg(&qcow2)],
    ];
    for args in cases {
        let out = sync(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
        assert!(out.stdout.is_empty(), "{args:?}: {out:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).starts_with("blkdelta: ")
                || String::from_utf8_lossy(&out.stderr).starts_with("error: "),
            "{args:?}: {out:?}"
        );
        assert!(names(&img).is_empty(), "{args:?} made a snapshot");
        assert!(!raw.exists() && !qcow2.exists(), "{args:?} made a replica");
    }
}

#[test]
fn the_source_as_its_own_target_is_refused_before_any_snapshot() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    sync_json(&[arg(&img), arg(&s.path("r.raw"))]);
    let before = names(&img);
    let out = sync(&[arg(&img), arg(&img)]);
    assert!(!out.status.success(), "{out:?}");
    assert_eq!(names(&img), before, "the refused cycle made a snapshot");
}
