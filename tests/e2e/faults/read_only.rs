//! A read-only target: the replica, its state, or both.

use super::fixture::Fixture;
use super::truth::Truth;
use crate::common::{have, one_line_failure, receive_file, state_of, Mounted};

#[test]
fn a_read_only_target_is_refused_and_nothing_changes() {
    if !have("qemu-img") || !have("mount") {
        return;
    }
    let f = Fixture::new("1.1", 0);

    // (a) Replica and state on a tmpfs remounted read-only.
    let dir = f.s.path("ro-a");
    let Some(mount) = Mounted::tmpfs(&dir, "64m") else {
        return;
    };
    let replica = dir.join("r.raw");
    f.seed_into(&replica, &[]);
    let state_before = std::fs::read(state_of(&replica)).unwrap();
    mount.remount("ro");
    let err = one_line_failure(
        &receive_file(&f.stream, &replica, &[]),
        "read-only filesystem",
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(f.truth(&replica, &[], None), Truth::Holds(0));
    assert_eq!(std::fs::read(state_of(&replica)).unwrap(), state_before);
    mount.remount("rw");
    f.reapply_gives_s3(&replica, &[]);
    drop(mount);

    // (b) The replica through a read-only bind mount, its state elsewhere (writable).
    let src = f.s.path("rw-b");
    std::fs::create_dir_all(&src).unwrap();
    let dir = f.s.path("ro-b");
    let state_file = f.s.path("b.state");
    let state = ["--state", state_file.to_str().unwrap()];
    let Some(bind) = Mounted::new(&["--bind", src.to_str().unwrap()], &dir) else {
        return;
    };
    let replica = dir.join("r.raw");
    f.seed_into(&replica, &state);
    let state_before = std::fs::read(&state_file).unwrap();
    bind.remount("bind,ro");
    let err = one_line_failure(
        &receive_file(&f.stream, &replica, &state),
        "read-only bind mount",
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(f.truth(&replica, &state, None), Truth::Holds(0));
    assert_eq!(std::fs::read(&state_file).unwrap(), state_before);
    bind.remount("bind,rw");
    f.reapply_gives_s3(&replica, &state);
    drop(bind);

    // (c) A writable replica whose state lives on a read-only filesystem.
    let dir = f.s.path("ro-c");
    let Some(mount) = Mounted::tmpfs(&dir, "1m") else {
        return;
    };
    let state_file = dir.join("c.state");
    let state = ["--state", state_file.to_str().unwrap()];
    let replica = f.s.path("c.raw");
    f.seed_into(&replica, &state);
    let state_before = std::fs::read(&state_file).unwrap();
    mount.remount("ro");
    let err = one_line_failure(
        &receive_file(&f.stream, &replica, &state),
        "read-only state",
    );
    assert!(err.contains("Read-only file system"), "{err}");
    assert_eq!(f.truth(&replica, &state, None), Truth::Holds(0));
    assert_eq!(std::fs::read(&state_file).unwrap(), state_before);
    mount.remount("rw");
    f.reapply_gives_s3(&replica, &state);
}
