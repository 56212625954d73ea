//! What the receiver accepts and refuses around interrupted and stale replicas.

use std::path::{Path, PathBuf};

use crate::common::{
    assert_same_file, blkdelta_ok, export, have, io, pipe, random, receive_file, record_at,
    seeded_with_s0_s1, send_to_file, spec, status_text, truncated_copy, Scratch,
};

/// A 16 MiB image with snapshots s0, s1, s2: random data, a pattern, zeros.
fn history(s: &Scratch) -> PathBuf {
    let steps = [
        ("s0", vec![random(0, 4, 3)]),
        ("s1", vec![io("write -P 0x1 4M 2M")]),
        ("s2", vec![random(8, 6, 4), io("write -z 0 1M")]),
    ];
    s.history("vm.qcow2", "16M", "", &steps)
}

fn assert_replica_is(img: &Path, snap: &str, replica: &Path, s: &Scratch) {
    let e = s.path(&format!("{snap}.export"));
    export(img, Some(snap), &e);
    assert_same_file(replica, &e);
}

#[test]
fn reapplying_an_interrupted_multi_snapshot_stream_finishes_it() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let stream = s.path("s0s2.bd");
    send_to_file(&spec(&img, "s0..s2"), &stream);
    // Cut inside the second transition, past a checkpoint record: s1 was reached, and s1 -> s2
    // was under way.
    let end0 = record_at(&stream, "snapshot-end", 0);
    let checkpoint = (0..)
        .map(|i| record_at(&stream, "checkpoint", i))
        .find(|&at| at > end0)
        .unwrap();
    let cut = s.path("cut.bd");
    truncated_copy(&stream, checkpoint + 200, &cut);
    let out = receive_file(&cut, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("apply the same stream again"), "{err}");
    let st = status_text(&replica, &[]);
    assert!(st.contains("in progress, 's1' -> 's2'"), "{st}");
    assert!(!st.contains("holds snapshot"), "{st}");

    let out = receive_file(&stream, &replica, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(status_text(&replica, &[]).contains("holds snapshot 's2'"));
    assert_replica_is(&img, "s2", &replica, &s);
    // Applying it once more changes nothing, succeeds, and says so.
    let again = blkdelta_ok(&[
        "receive",
        "-i",
        stream.to_str().unwrap(),
        replica.to_str().unwrap(),
    ]);
    let note = String::from_utf8_lossy(&again.stderr);
    assert!(note.contains("already holds 's2'"), "{note}");
    assert_replica_is(&img, "s2", &replica, &s);
}

#[test]
fn an_interrupted_full_stream_is_not_finished_by_an_incremental() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let reseed = s.path("s2.bd");
    send_to_file(&spec(&img, "s2"), &reseed);
    let cut = s.path("cut.bd");
    truncated_copy(&reseed, record_at(&reseed, "data", 1) + 10, &cut);
    assert_eq!(
        receive_file(&cut, &replica, &["--force"]).status.code(),
        Some(1)
    );
    let inc = s.path("s0s1.bd");
    send_to_file(&spec(&img, "s0..s1"), &inc);
    let out = receive_file(&inc, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unfinished apply (full -> 's2')"));
    // The full stream itself finishes the job.
    assert!(receive_file(&reseed, &replica, &[]).status.success());
    assert_replica_is(&img, "s2", &replica, &s);
}

#[test]
fn a_replaced_or_resized_replica_file_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let (replica, inc) = seeded_with_s0_s1(&s, &img);

    std::fs::remove_file(&replica).unwrap();
    let out = receive_file(&inc, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing or empty"));
    assert!(
        !replica.exists(),
        "a refused receive must not create the target"
    );

    pipe(&spec(&img, "s0"), &replica, &[]);
    std::fs::File::options()
        .write(true)
        .open(&replica)
        .unwrap()
        .set_len(8 << 20)
        .unwrap();
    let out = receive_file(&inc, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("changed since blkdelta last wrote it"),
        "{err}"
    );
    assert!(err.contains("its size is 8388608 bytes"), "{err}");
    assert!(err.contains("--overwrite overrides"), "{err}");
}

#[test]
fn a_stream_the_replica_is_already_past_is_verified_and_skipped() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    pipe(&spec(&img, "s0..s1"), &replica, &[]);
    // s0..s2 starts before what the replica holds: its first transition is only verified.
    pipe(&spec(&img, "s0..s2"), &replica, &[]);
    assert_replica_is(&img, "s2", &replica, &s);
    assert!(status_text(&replica, &[]).contains("holds snapshot 's2'"));
}

/// A well-formed record inserted into a stream (a repeated or foreign frame) passes its own
/// check but not the next checkpoint: it must never reach the replica.
#[test]
fn an_inserted_record_never_reaches_the_replica() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    let stream = s.path("s0s2.bd");
    send_to_file(&spec(&img, "s0..s2"), &stream);
    let bytes = std::fs::read(&stream).unwrap();
    // The first data record of s0 -> s1, repeated inside s1 -> s2 right after its first record.
    let (d0, d0_end) = (record_at(&stream, "data", 0), record_at(&stream, "data", 1));
    let ends: Vec<usize> = (0..2)
        .map(|i| record_at(&stream, "snapshot-end", i))
        .collect();
    let frame_len = u32::from_le_bytes(bytes[d0 + 4..d0 + 8].try_into().unwrap()) as usize + 16;
    assert!(d0 + frame_len <= d0_end);
    let after = ends[0]
        + 16
        + u32::from_le_bytes(bytes[ends[0] + 4..ends[0] + 8].try_into().unwrap()) as usize;
    let mut forged = bytes[..after].to_vec();
    forged.extend_from_slice(&bytes[d0..d0 + frame_len]);
    forged.extend_from_slice(&bytes[after..]);
    let bad = s.path("bad.bd");
    std::fs::write(&bad, &forged).unwrap();

    let before_s1 = s.path("s1.export");
    export(&img, Some("s1"), &before_s1);
    let out = receive_file(&bad, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    // s1 was reached; nothing of the forged transition was written.
    assert!(status_text(&replica, &[]).contains("holds snapshot 's1'"));
    assert_same_file(&replica, &before_s1);
    assert!(receive_file(&stream, &replica, &[]).status.success());
    assert_replica_is(&img, "s2", &replica, &s);
}
