//! A replica rolled back by QEMU (`qemu-img snapshot -a wed`) holds wed: the stream from wed
//! applies, one from a later snapshot is refused (`--rewind` included: it cannot make fri),
//! and the snapshots it had after wed stay.

use std::path::Path;

use super::qemu::{assert_clean, revert};
use super::week::{Source, Untouched, DAYS};
use crate::common::{
    assert_refused, assert_same_file, export, have, one_line_failure, pipe_args, pipe_args_ok,
    state_of,
};

/// A replica of the week reverted to wed by QEMU.
fn reverted_to_wed(src: &Source) -> std::path::PathBuf {
    let r = src.replica("r.qcow2", "fri");
    revert(&r, "wed");
    assert_clean(&r, "after qemu-img snapshot -a wed");
    src.assert_holds(&r, "wed", "after qemu-img snapshot -a wed");
    r
}

/// The active layer exports as `snap` of the source.
fn assert_active_is(src: &Source, r: &Path, snap: &str) {
    let out = src.s.path("replica-active.raw");
    export(r, None, &out);
    assert_same_file(&out, &src.export(snap));
}

#[test]
fn a_replica_reverted_by_qemu_takes_the_stream_from_that_snapshot() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = reverted_to_wed(&src);
    pipe_args_ok(&[&src.spec("wed..fri")], &r, &[]);
    src.assert_history(&r, &DAYS, "wed..fri after the revert");
    assert_active_is(&src, &r, "fri");
}

#[test]
fn a_stream_from_past_the_snapshot_qemu_reverted_to_is_refused() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = reverted_to_wed(&src);
    let (image, state) = (Untouched::new(&r), Untouched::new(&state_of(&r)));
    let out = pipe_args(&[&src.spec("thu..fri")], &r, &[]);
    // The replica holds wed; the stream starts from thu. fri is not behind it: QEMU took
    // the replica back from it.
    let err = assert_refused(
        &out,
        &["'wed'", "'thu'"],
        "thu..fri onto a replica holding wed",
    );
    assert!(!err.contains("--rewind"), "{err}");
    image.assert("thu..fri refused");
    state.assert("thu..fri refused");
}

#[test]
fn rewind_never_applies_a_stream_from_past_the_revert_point() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = reverted_to_wed(&src);
    let image = Untouched::new(&r);
    // thu..fri carries no change of wed..thu: onto wed it cannot make fri. Refused, or (if
    // it applies) the replica must be fri.
    let out = pipe_args(&[&src.spec("thu..fri")], &r, &["--rewind"]);
    if out.status.success() {
        assert_active_is(&src, &r, "fri");
    } else {
        one_line_failure(&out, "thu..fri --rewind onto wed");
        image.assert("thu..fri --rewind refused");
    }
}

#[test]
fn a_replica_reverted_by_qemu_and_brought_forward_holds_the_last_snapshot() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let mut src = Source::week(1);
    let r = reverted_to_wed(&src);
    pipe_args_ok(&[&src.spec("wed..fri")], &r, &[]);
    assert_active_is(&src, &r, "fri");
    // The stream reached fri again: the replica holds it, and the next day applies.
    src.assert_holds(&r, "fri", "wed..fri after the revert");
    src.add("sat", &["write -P 0x61 3M 1M"]);
    pipe_args_ok(&[&src.spec("fri..sat")], &r, &[]);
    let mut days = DAYS.to_vec();
    days.push("sat");
    src.assert_history(&r, &days, "fri..sat after the revert");
    src.assert_holds(&r, "sat", "fri..sat after the revert");
}
