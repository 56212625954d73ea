//! What happens to a qcow2 replica behind blkdelta's back: QEMU writes into it, deletes or
//! makes snapshots; the file is replaced, deleted or truncated. blkdelta tells what the
//! replica holds, refuses in one line what cannot apply, writing nothing, and goes on where
//! it can.

use std::fs::OpenOptions;

use super::qemu::{assert_clean, revert};
use super::week::{Source, Untouched, DAYS};
use crate::common::{
    arg, assert_refused, blkdelta, delete_snapshot, have, one_line_failure, pipe_args,
    pipe_args_ok, qemu_io, snapshot, status_text,
};

#[test]
fn a_replica_qemu_wrote_into_holds_nothing_and_refuses_an_incremental() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    qemu_io(&r, &["write -P 0x99 4M 4k".into()]);
    let st = status_text(&r, &[]);
    assert!(!st.contains("holds snapshot"), "{st}");
    let image = Untouched::new(&r);
    let out = pipe_args(&[&src.spec("wed..fri")], &r, &[]);
    assert_refused(
        &out,
        &["'wed'", "qemu-img snapshot -a wed", "nothing written"],
        "wed..fri onto a replica written since",
    );
    image.assert("wed..fri refused");

    revert(&r, "wed");
    pipe_args_ok(&[&src.spec("wed..fri")], &r, &[]);
    src.assert_history(&r, &DAYS, "wed..fri after reverting QEMU's write");
    src.assert_holds(&r, "fri", "wed..fri after reverting QEMU's write");
}

#[test]
fn status_of_a_replica_qemu_wrote_into_says_how_to_revert_it() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    qemu_io(&r, &["write -P 0x99 4M 4k".into()]);
    let st = status_text(&r, &[]);
    assert!(
        st.contains(
            "no snapshot (its active layer was written since it held 'wed': \
             'qemu-img snapshot -a wed' reverts it)"
        ),
        "{st}"
    );
}

#[test]
fn a_replica_replaced_by_another_qcow2_is_refused_as_another_file() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    // Another replica of the same snapshot, moved over it.
    let other = src.replica("other.qcow2", "wed");
    std::fs::rename(&other, &r).unwrap();
    let image = Untouched::new(&r);
    let out = pipe_args(&[&src.spec("wed..fri")], &r, &[]);
    assert_refused(&out, &["another file"], "wed..fri onto a replaced replica");
    image.assert("wed..fri onto a replaced replica");
}

#[test]
fn a_deleted_replica_is_refused_as_missing() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    std::fs::remove_file(&r).unwrap();
    let out = pipe_args(&[&src.spec("wed..fri")], &r, &[]);
    assert_refused(
        &out,
        &["missing", "'wed'"],
        "wed..fri onto a deleted replica",
    );
    assert!(!r.exists(), "the refused incremental made a replica");
}

#[test]
fn a_truncated_replica_fails_in_one_line() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    let len = std::fs::metadata(&r).unwrap().len();
    // Empty, inside the header, after the header cluster, half way, one byte short.
    for cut in [len - 1, len / 2, 70_000, 100, 0] {
        let what = format!("the replica cut to {cut} of {len} bytes");
        let f = OpenOptions::new().write(true).open(&r).unwrap();
        f.set_len(cut).unwrap();
        drop(f);
        let image = Untouched::new(&r);
        let out = pipe_args(&[&src.spec("wed..fri")], &r, &[]);
        one_line_failure(&out, &what);
        image.assert(&what);
        let status = blkdelta(&["status", arg(&r)]);
        let err = String::from_utf8_lossy(&status.stderr);
        assert!(!err.contains("panicked"), "{what}: status: {err}");
    }
}

#[test]
fn snapshots_qemu_deletes_leave_the_replica_holding_its_last() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    delete_snapshot(&r, "mon");
    delete_snapshot(&r, "tue");
    assert_clean(&r, "after qemu-img snapshot -d mon, tue");
    src.assert_holds(&r, "wed", "after qemu-img snapshot -d mon, tue");
    pipe_args_ok(&[&src.spec("wed..fri")], &r, &[]);
    src.assert_history(&r, &["wed", "thu", "fri"], "wed..fri after deletions");
    src.assert_holds(&r, "fri", "wed..fri after deletions");
}

#[test]
fn a_snapshot_qemu_makes_on_the_replica_does_not_stop_the_next_incremental() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let mut src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    snapshot(&r, "mine");
    assert_clean(&r, "after qemu-img snapshot -c mine");
    let out = pipe_args(&[&src.spec("wed..fri")], &r, &[]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "wed..fri after QEMU's snapshot: {err}"
    );
    // QEMU's snapshot took the id the source's thu has: thu and fri get ids of their own.
    let days = ["mon", "tue", "wed", "mine", "thu", "fri"];
    src.assert_exports(&r, &days, "wed..fri after QEMU's snapshot");
    src.assert_holds(&r, "fri", "wed..fri after QEMU's snapshot");
    src.add("sat", &["write -P 0x61 3M 1M"]);
    pipe_args_ok(&[&src.spec("fri..sat")], &r, &[]);
    let mut days = days.to_vec();
    days.push("sat");
    src.assert_exports(&r, &days, "fri..sat after QEMU's snapshot");
    src.assert_holds(&r, "sat", "fri..sat after QEMU's snapshot");
}

#[test]
fn a_replica_qemu_wrote_into_is_repaired_over_the_link() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    qemu_io(
        &r,
        &["write -P 0x99 4M 64k".into(), "write -z 9M 1M".into()],
    );
    let blocks = src.s.path("blocks.txt");
    let out = blkdelta(&["checksum", "--blocks", arg(&r)]);
    std::fs::write(&blocks, &out.stdout).unwrap();
    // Only the blocks that differ travel; the replica then holds wed again.
    let spec = src.spec("wed");
    pipe_args_ok(&["--against", arg(&blocks), &spec], &r, &["--repair"]);
    assert_clean(&r, "after the repair");
    src.assert_holds(&r, "wed", "after the repair");
    let out = blkdelta(&["checksum", arg(&r)]);
    let want = blkdelta(&["checksum", &spec]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .next(),
        String::from_utf8_lossy(&want.stdout)
            .split_whitespace()
            .next()
    );
    pipe_args_ok(&[&src.spec("wed..fri")], &r, &[]);
    src.assert_holds(&r, "fri", "wed..fri after the repair");
}
