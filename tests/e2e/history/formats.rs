//! What `--format` says over the target's name and content, and the options a qcow2 replica
//! refuses or honours: `--undo` (snapshots make it unnecessary) and `--dry-run`.

use super::qemu::{format, snapshot_names};
use super::week::{Source, Untouched};
use crate::common::{
    assert_refused, assert_same_file, have, pipe_args, pipe_args_ok, state_of, status_text,
};

#[test]
fn format_raw_writes_raw_bytes_whatever_the_name() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.s.path("disk.qcow2");
    pipe_args_ok(&[&src.spec("mon")], &r, &["--format", "raw"]);
    assert_eq!(format(&r), "raw");
    assert_same_file(&r, &src.export("mon"));
    // An existing file that is not qcow2 stays raw without being told.
    pipe_args_ok(&[&src.spec("mon..wed")], &r, &[]);
    assert_eq!(format(&r), "raw");
    assert_same_file(&r, &src.export("wed"));
}

#[test]
fn format_qcow2_makes_a_qcow2_replica_whatever_the_name() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.s.path("disk.img");
    pipe_args_ok(&[&src.spec("mon")], &r, &["--format", "qcow2"]);
    assert_eq!(format(&r), "qcow2");
    pipe_args_ok(&[&src.spec("mon..wed")], &r, &[]);
    src.assert_history(&r, &["mon", "tue", "wed"], "a qcow2 replica named disk.img");
}

#[test]
fn format_qcow2_onto_a_file_that_is_not_qcow2_is_refused() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let data = src.s.random_file("data.raw", 1 << 20, 7);
    let raw_replica = src.s.path("r.raw");
    pipe_args_ok(&[&src.spec("mon")], &raw_replica, &[]);
    for (target, stream) in [(&data, "mon"), (&raw_replica, "mon..wed")] {
        let what = format!("--format qcow2 onto {}", target.display());
        let (image, state) = (Untouched::new(target), Untouched::new(&state_of(target)));
        let out = pipe_args(&[&src.spec(stream)], target, &["--format", "qcow2"]);
        assert_refused(&out, &["qcow2", "nothing written"], &what);
        image.assert(&what);
        state.assert(&what);
    }
}

#[test]
fn undo_is_refused_for_a_qcow2_replica() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "mon");
    let undo = src.s.path("undo.bd");
    let (image, state) = (Untouched::new(&r), Untouched::new(&state_of(&r)));
    let out = pipe_args(
        &[&src.spec("mon..tue")],
        &r,
        &["--undo", undo.to_str().unwrap()],
    );
    assert_refused(
        &out,
        &["--undo", "qemu-img snapshot -a", "nothing written"],
        "--undo onto a qcow2 replica",
    );
    image.assert("--undo refused");
    state.assert("--undo refused");
    assert!(!undo.exists(), "an undo stream was written");
    // Nor for a new one.
    let new = src.s.path("new.qcow2");
    let out = pipe_args(
        &[&src.spec("mon")],
        &new,
        &["--undo", undo.to_str().unwrap()],
    );
    assert_refused(&out, &["--undo"], "--undo onto a new qcow2 replica");
    assert!(
        !new.exists() && !undo.exists(),
        "--undo refused, yet files were made"
    );
}

#[test]
fn dry_run_onto_a_qcow2_replica_writes_nothing() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "mon");
    let (image, state) = (Untouched::new(&r), Untouched::new(&state_of(&r)));
    let out = pipe_args(&[&src.spec("mon..wed")], &r, &["--dry-run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "--dry-run: {err}");
    image.assert("--dry-run");
    state.assert("--dry-run");
    assert_eq!(snapshot_names(&r), ["mon"]);
    src.assert_holds(&r, "mon", "after --dry-run");
    // A dry run of a seed makes no replica.
    let new = src.s.path("new.qcow2");
    let out = pipe_args(&[&src.spec("mon")], &new, &["--dry-run"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !new.exists() && !state_of(&new).exists(),
        "a dry run made files"
    );
    assert!(status_text(&r, &[]).contains("holds snapshot 'mon'"));
}

#[test]
fn cluster_size_is_for_a_new_qcow2_replica() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let raw = src.s.path("disk.raw");
    let out = pipe_args(
        &[&src.spec("mon")],
        &raw,
        &["--format", "raw", "--cluster-size", "4K"],
    );
    assert_eq!(out.status.code(), Some(2), "a usage error");
    assert!(!raw.exists(), "nothing made");
    let r = src.s.path("r.qcow2");
    pipe_args_ok(&[&src.spec("mon")], &r, &["--cluster-size", "4K"]);
    let out = pipe_args(&[&src.spec("mon..wed")], &r, &["--cluster-size", "64K"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("keeps its clusters"), "{err}");
    let info = std::process::Command::new("qemu-img")
        .arg("info")
        .arg(&r)
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&info.stdout).contains("cluster_size: 4096"));
}
