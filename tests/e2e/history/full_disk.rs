//! A qcow2 replica on a filesystem that fills up part way through mon..fri, or through the
//! seed that creates it: one line naming the lack of space, a replica that `qemu-img check`
//! finds clean and whose `status` tells the truth; once there is room, the same stream
//! finishes it.

use super::qemu::{assert_clean, snapshot_names};
use super::truth::{finish, truth, Truth};
use super::week::Source;
use crate::common::{
    assert_ok, have, one_line_failure, pipe_args_ok, receive_file, send_to_file, status_text,
    Mounted,
};

#[test]
fn a_full_filesystem_fails_cleanly_and_the_stream_finishes_once_there_is_room() {
    if !have("qemu-img") || !have("qemu-io") || !have("mount") {
        return;
    }
    // About 5 MiB by mon and 15 MiB more by fri, on a 10 MiB filesystem.
    let src = Source::week(3);
    let stream = src.s.path("mon-fri.bd");
    send_to_file(&src.spec("mon..fri"), &stream);
    for resume in [false, true] {
        let what = if resume { "resumed" } else { "re-applied" };
        let dir = src.s.path(&format!("small-{what}"));
        let Some(mount) = Mounted::tmpfs(&dir, "10m") else {
            return;
        };
        let r = dir.join("r.qcow2");
        pipe_args_ok(&[&src.spec("mon")], &r, &[]);
        let out = receive_file(&stream, &r, &["--checkpoint-bytes", "262144"]);
        let err = one_line_failure(&out, what);
        assert!(err.contains("No space left on device"), "{what}: {err}");
        assert_clean(&r, what);
        let t = truth(&src, &r, src.snaps.len(), what);
        assert_ne!(t, Truth::Holds(4), "{what}: fri cannot fit");
        eprintln!("full filesystem, {what}: {} -> {t:?}", err.trim_end());

        mount.remount("size=256m");
        finish(&src, &r, &stream, &t, resume, what);
    }
}

#[test]
fn a_seed_that_fills_the_filesystem_leaves_a_clean_replica_in_progress() {
    if !have("qemu-img") || !have("qemu-io") || !have("mount") {
        return;
    }
    // mon carries 3 MiB of random data: a 2 MiB filesystem fills part way.
    let src = Source::week(2);
    let seed = src.s.path("mon.bd");
    send_to_file(&src.spec("mon"), &seed);
    let dir = src.s.path("small");
    let Some(mount) = Mounted::tmpfs(&dir, "2m") else {
        return;
    };
    let r = dir.join("r.qcow2");
    let out = receive_file(&seed, &r, &["--checkpoint-bytes", "262144"]);
    let err = one_line_failure(&out, "the seed");
    assert!(err.contains("No space left on device"), "{err}");
    assert_clean(&r, "the seed cut short");
    let st = status_text(&r, &[]);
    assert!(st.contains("in progress, (full) -> 'mon'"), "{st}");
    assert!(st.contains("resume token: "), "{st}");
    assert!(snapshot_names(&r).is_empty(), "{st}");

    mount.remount("size=64m");
    assert_ok(&receive_file(&seed, &r, &[]), "the seed again");
    src.assert_history(&r, &["mon"], "the seed again");
    src.assert_holds(&r, "mon", "the seed again");
}
