//! A flipped disk offset in a change record.

use super::fixture::Fixture;
use super::flips::check_mismatch;
use super::truth::Truth;
use super::{CKPT, FRAME};
use crate::common::{have, one_line_failure, read_range, receive_file, status_text, MIB};

/// The damage a flipped offset would do: the record lands on [2 MiB, 3 MiB), s0's data that
/// no transition of the stream touches again.
fn offset_flip_cases() -> Vec<(&'static str, &'static str, &'static str, u8)> {
    vec![
        // (fixture compat, record type, what, xor on offset byte 2)
        ("1.1", "zero", "zero record 0 -> 2 MiB", 0x20),
        ("0.10", "discard", "discard record 0 -> 2 MiB", 0x20),
        ("1.1", "data", "data record 4 MiB -> 2 MiB", 0x60),
    ]
}

/// The disk offset in the body of the change record whose frame starts at `at`.
fn offset_field(bytes: &[u8], at: u64) -> u64 {
    let body = (at + FRAME) as usize;
    u64::from_le_bytes(bytes[body..body + 8].try_into().unwrap())
}

#[test]
fn a_flipped_record_offset_never_leaves_a_wrong_snapshot_recorded() {
    if !have("qemu-img") {
        return;
    }
    for (compat, kind, what, xor) in offset_flip_cases() {
        let f = Fixture::new(compat, 0);
        let r = f.rec(0, kind, 0);
        let (off, _) = r.disk_range();
        let mut bytes = f.bytes.clone();
        bytes[(r.at + FRAME + 2) as usize] ^= xor;
        assert_eq!(offset_field(&bytes, r.at), 2 * MIB, "{what}: from {off}");
        let bad = f.s.path("bad.bd");
        std::fs::write(&bad, &bytes).unwrap();
        let replica = f.fresh_replica("r.raw");
        let err = one_line_failure(&receive_file(&bad, &replica, &[]), what);
        // Caught at the damaged record itself, before any of it reaches the replica.
        let want = check_mismatch(&bytes, r.at);
        assert!(err.starts_with(&want), "{what}: want {want:?}, got: {err}");
        assert_eq!(
            f.truth(&replica, &[], Some(r.at)),
            f.expected_after(r.at),
            "{what}"
        );
        assert!(
            read_range(&replica, 2 * MIB, MIB) == read_range(&f.exports[0], 2 * MIB, MIB),
            "{what}: the damaged record reached [2 MiB, 3 MiB)"
        );
        f.assert_image_before(&replica, r.at, what);
        let out = receive_file(&f.stream, &replica, &[]);
        assert!(
            out.status.success(),
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let st = status_text(&replica, &[]);
        assert!(st.contains("holds snapshot 's3'"), "{what}: {st}");
        assert!(
            read_range(&replica, 2 * MIB, MIB) == read_range(&f.exports[3], 2 * MIB, MIB),
            "{what}: after re-applying the intact stream, status says 'holds snapshot s3' but \
             [2 MiB, 3 MiB) of the replica differs from qemu's export of s3"
        );
        // And all of it is s3.
        assert_eq!(f.truth(&replica, &[], None), Truth::Holds(3), "{what}");
    }
}

#[test]
fn the_resume_token_after_a_flipped_offset_skips_nothing() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    // A zero record after a checkpoint record: when it comes, the durable offset has advanced.
    let zero = f
        .changes(0)
        .into_iter()
        .filter(|r| r.kind == "zero")
        .find(|r| f.verified_end(0, r.at) > 0)
        .expect("a zero record after a checkpoint record in transition 0");
    let (off, len) = zero.disk_range();
    // Its offset moves by 1 MiB, still inside the disk.
    let mut bytes = f.bytes.clone();
    bytes[(zero.at + FRAME + 2) as usize] ^= 0x10;
    let flipped = offset_field(&bytes, zero.at);
    assert_eq!(flipped.abs_diff(off), MIB, "from {off} to {flipped}");
    assert!(flipped + len <= 32 * MIB);
    let bad = f.s.path("bad.bd");
    std::fs::write(&bad, &bytes).unwrap();
    let replica = f.fresh_replica("r.raw");
    let err = one_line_failure(&receive_file(&bad, &replica, &CKPT), "zero offset flip");
    let want = check_mismatch(&bytes, zero.at);
    assert!(err.starts_with(&want), "want {want:?}, got: {err}");
    let (truth, durable, token) = f.truth_full(&replica, &[], Some(zero.at));
    assert_eq!(truth, Truth::InProgress(1));
    // Something is durable, but never the damaged record, which was not applied.
    assert!(durable > 0, "no checkpoint recorded");
    assert!(
        durable <= off,
        "durable below {durable}, past the damaged record at disk offset {off}"
    );
    f.assert_image_before(&replica, zero.at, "zero offset flip");
    // Re-applying the whole intact stream repairs everything here...
    let copy = f.copy_replica(&replica, "reapplied.raw");
    f.reapply_gives_s3(&copy, &[]);
    // ...and so must resuming from the token status prints: it may not claim durable the
    // record at `off`, which was never applied.
    f.resume_gives_s3(&replica, &[], &token.expect("a resume token"));
}
