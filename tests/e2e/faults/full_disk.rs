//! A target filesystem that fills up.

use std::io::Write;
use std::time::{Duration, Instant};

use super::fixture::Fixture;
use super::sigkill::polls;
use super::truth::Truth;
use super::CKPT;
use crate::common::{
    assert_same_file, export, free_bytes, have, one_line_failure, qemu_io, receive_file, records,
    send_to_file, snapshot, status_text, Mounted, Receiver, Scratch,
};

#[test]
fn a_full_target_filesystem_fails_cleanly_and_recovers_once_it_grows() {
    if !have("qemu-img") || !have("mount") {
        return;
    }
    // About 24 MiB of data by s3 on a 12 or 14 MiB filesystem; the seed (7 MiB) fits.
    let f = Fixture::new("1.1", 6);
    for state_elsewhere in [false, true] {
        let variant = if state_elsewhere {
            "state elsewhere, resumed"
        } else {
            "state beside the replica, re-applied"
        };
        let dir = f.s.path(if state_elsewhere {
            "small-b"
        } else {
            "small-a"
        });
        // 14 MiB: transition 0 fits, transition 1 does not; 12 MiB: transition 0 does not.
        let size = if state_elsewhere { "12m" } else { "14m" };
        let Some(mount) = Mounted::tmpfs(&dir, size) else {
            return;
        };
        let replica = dir.join("r.raw");
        let state_file = f.s.path("elsewhere.state");
        let state_file = state_file.to_str().unwrap();
        let state: &[&str] = if state_elsewhere {
            &["--state", state_file]
        } else {
            &[]
        };
        f.seed_into(&replica, state);
        let mut extra = state.to_vec();
        extra.extend_from_slice(&CKPT);
        let out = receive_file(&f.stream, &replica, &extra);
        let err = one_line_failure(&out, variant);
        assert!(err.contains("No space left on device"), "{variant}: {err}");
        let (truth, _, token) = f.truth_full(&replica, state, None);
        assert_ne!(truth, Truth::Holds(3), "{variant}: the stream cannot fit");
        eprintln!(
            "full filesystem, {variant}: {} -> {truth:?}",
            err.trim_end()
        );

        mount.remount("size=64m");
        match (state_elsewhere, truth, token) {
            (true, Truth::InProgress(_), Some(token)) => f.resume_gives_s3(&replica, state, &token),
            (true, other, _) => panic!("{variant}: expected a resumable apply, got {other:?}"),
            (false, _, _) => f.reapply_gives_s3(&replica, state),
        }
        // The replica is still usable afterwards: applying the stream again changes nothing.
        f.reapply_gives_s3(&replica, state);
    }
}

#[test]
fn a_failure_is_reported_at_once_while_the_input_stays_open() {
    if !have("qemu-img") || !have("mount") {
        return;
    }
    // A seed fed up to a checkpoint and applied; then the filesystem fills up, and the seed is
    // fed up to the next checkpoint and no further, the input staying open as behind a
    // connection that hangs. The receiver has read all it was given when it fails to apply
    // it: it must say so then, not once the input moves or closes.
    let f = Fixture::new("1.1", 0);
    let dir = f.s.path("small");
    let Some(_mount) = Mounted::tmpfs(&dir, "32m") else {
        return;
    };
    let bytes = std::fs::read(&f.seed).unwrap();
    let recs = records(&f.seed).1;
    let mut checkpoints = recs.iter().filter(|r| r.kind == "checkpoint");
    let (first, second) = (checkpoints.next().unwrap(), checkpoints.next().unwrap());
    assert!(
        recs.iter()
            .any(|r| r.kind == "data" && r.at > first.at && r.at < second.at),
        "data between the two checkpoints"
    );
    let mut r = Receiver::start(&dir.join("r.raw"), &[]);
    r.feed(&bytes[..first.end as usize]);
    polls(|| r.unread() == 0, "the receiver to read the first part");
    std::thread::sleep(Duration::from_millis(500));
    r.assert_running("after the first checkpoint");
    let mut filler = std::fs::File::create(dir.join("filler")).unwrap();
    let zeros = vec![0u8; 1 << 20];
    while filler.write_all(&zeros).is_ok() {}
    drop(filler);
    r.feed(&bytes[first.end as usize..second.end as usize]);
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = r.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the receiver failed but waited for its input to move or close"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = r.stderr_after_exit();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn a_state_write_failing_at_a_snapshot_end_never_records_the_snapshot() {
    if !have("qemu-img") || !have("mount") {
        return;
    }
    // A transition that only allocates: 3 MiB of new data. With exactly that much space free,
    // every data write fits and the state update at the snapshot-end is what fails.
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "16M", "");
    let r0 = s.random_file("r0", 2 << 20, 31);
    qemu_io(&img, &[format!("write -s {} 0 2M", r0.display())]);
    snapshot(&img, "a");
    let r1 = s.random_file("r1", 3 << 20, 32);
    qemu_io(&img, &[format!("write -s {} 8M 3M", r1.display())]);
    snapshot(&img, "b");
    let seed = s.path("a.bd");
    send_to_file(&format!("{}@a", img.display()), &seed);
    let inc = s.path("ab.bd");
    send_to_file(&format!("{}@a..b", img.display()), &inc);
    let want = s.path("b.export");
    export(&img, Some("b"), &want);

    let dir = s.path("small");
    let Some(_mount) = Mounted::tmpfs(&dir, "16m") else {
        return;
    };
    let replica = dir.join("r.raw");
    let clear = || {
        for name in [
            "r.raw",
            "r.raw.blkdelta",
            "r.raw.blkdelta.lock",
            "r.raw.blkdelta.tmp",
        ] {
            let _ = std::fs::remove_file(dir.join(name));
        }
    };
    let seeded = || {
        clear();
        let out = receive_file(&seed, &replica, &[]);
        assert!(out.status.success());
        free_bytes(&dir)
    };
    // Measure what the transition takes, then leave exactly that much free.
    let before = seeded();
    assert!(receive_file(&inc, &replica, &[]).status.success());
    let needed = before - free_bytes(&dir);
    assert!(needed >= 3 << 20, "the transition took only {needed} bytes");
    let free = seeded();
    let filler = s.path("small/filler");
    let mut fill = std::fs::File::create(&filler).unwrap();
    let zeros = vec![0u8; 1 << 20];
    let mut left = free - needed;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        fill.write_all(&zeros[..n]).unwrap();
        left -= n as u64;
    }
    fill.sync_all().unwrap();
    drop(fill);
    assert_eq!(free_bytes(&dir), needed);

    let out = receive_file(&inc, &replica, &[]);
    let err = one_line_failure(&out, "state write at the snapshot-end");
    assert!(
        err.contains("replica state") && err.contains("No space left on device"),
        "the state update should have been what failed: {err}"
    );
    let st = status_text(&replica, &[]);
    assert!(st.contains("in progress, 'a' -> 'b'"), "{st}");
    assert!(!st.contains("holds snapshot"), "{st}");

    std::fs::remove_file(&filler).unwrap();
    let out = receive_file(&inc, &replica, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status_text(&replica, &[]).contains("holds snapshot 'b'"));
    assert_same_file(&replica, &want);
}
