//! Altered bytes in every part of a stream, forged records and inserted ones.

use blkdelta_common::stream::Compression;

use super::fixture::Fixture;
use super::truth::Truth;
use super::{CKPT, DATA_FIXED, FRAME, PREAMBLE};
use crate::common::{have, one_line_failure, read_range, receive_file, records, send_to_file};

/// One altered byte, and the error the receiver must give at the frame holding it.
pub struct Flip {
    what: &'static str,
    pos: u64,
    xor: u8,
    /// The start of the error, when it is not the record check mismatch of that frame.
    error: Option<String>,
}

pub fn flip(what: &'static str, pos: u64, xor: u8) -> Flip {
    Flip {
        what,
        pos,
        xor,
        error: None,
    }
}

/// The error for the frame at `at` of an altered stream whose check does not match, naming
/// the type and body length its (possibly altered) frame header gives.
pub fn check_mismatch(bytes: &[u8], at: u64) -> String {
    let a = at as usize;
    let body_len = u32::from_le_bytes(bytes[a + 4..a + 8].try_into().unwrap());
    format!(
        "blkdelta: corrupt stream at byte {at}: record check mismatch (type {}, {body_len} \
         bytes): the record was altered",
        bytes[a]
    )
}
#[test]
fn flipped_bytes_are_caught_and_never_recorded_as_a_snapshot() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    let ends = f.ends();
    let end = f.end_record();
    let h = &f.header;
    let plain = f
        .changes(1)
        .into_iter()
        .filter(|r| r.kind == "data" && r.payload.is_some_and(|(c, _)| c == Compression::None))
        .nth(1)
        .expect("a plain data record in transition 1");
    let zstd = f
        .changes(0)
        .into_iter()
        .find(|r| r.kind == "data" && r.payload.is_some_and(|(c, _)| c == Compression::Zstd))
        .expect("a zstd data record in transition 0");
    let hashed = f.rec(2, "data", 0);
    let zero = f.rec(0, "zero", 0);
    let ckpt = f.rec(1, "checkpoint", 0);
    let flips = vec![
        Flip {
            what: "magic",
            pos: 1,
            xor: 0x20,
            error: Some("blkdelta: not a blkdelta stream".into()),
        },
        Flip {
            what: "version",
            pos: 8,
            xor: 0x01,
            error: Some("blkdelta: unsupported stream version 3".into()),
        },
        flip("the header's type", PREAMBLE, 0x01),
        flip("the header's check", PREAMBLE + 8 + 3, 0x01),
        flip("stream id", h.stream_id as u64 + 5, 0x01),
        flip("transition 0's to name", h.to_name[0] as u64, 0x01),
        flip(
            "the last transition's to name",
            h.to_name[2] as u64 + 1,
            0x01,
        ),
        flip(
            "transition 0's from GUID",
            h.from_guid[0].unwrap() as u64 + 3,
            0x80,
        ),
        flip(
            "the last transition's to GUID",
            h.to_guid[2] as u64 + 15,
            0x01,
        ),
        // Payloads are covered by their record's hash of the plain bytes, not the frame check.
        Flip {
            what: "a plain data payload",
            pos: plain.at + FRAME + DATA_FIXED + 777_777,
            xor: 0x04,
            error: Some(format!(
                "blkdelta: checksum mismatch in data record at stream byte {} (disk offset {})",
                plain.at,
                plain.disk_range().0
            )),
        },
        Flip {
            what: "a zstd data payload",
            pos: zstd.at + FRAME + DATA_FIXED + zstd.payload.unwrap().1 / 2,
            xor: 0x04,
            // Decompression (bounded to the record's length) fails on this one, before the
            // hash of the plain bytes would.
            error: Some(format!(
                "blkdelta: corrupt stream at byte {}: data record for disk offset {}: \
                 Destination buffer is too small",
                zstd.at,
                zstd.disk_range().0
            )),
        },
        // offset u64, len u32, compression u8, then the hash: its last byte.
        flip("a data record's hash", hashed.at + FRAME + 13 + 31, 0x04),
        flip("a data record's body length", plain.at + 5, 0x04),
        flip("a data record's check", hashed.at + 8 + 7, 0x04),
        flip(
            "a zero record's offset (out of range)",
            zero.at + FRAME + 7,
            0x01,
        ),
        flip(
            "a zero record's length (out of range)",
            zero.at + FRAME + 8 + 6,
            0x40,
        ),
        flip(
            "a zero record's type (unknown, not optional)",
            zero.at,
            0x0c,
        ),
        flip("a zero record's check", zero.at + 8, 0x01),
        Flip {
            what: "a zero record's reserved bits",
            pos: zero.at + 2,
            xor: 0x01,
            error: Some(format!(
                "blkdelta: corrupt stream at byte {}: frame with reserved bits set",
                zero.at
            )),
        },
        // transition u32, name (u64 length, "s1"), then the GUID.
        flip(
            "s1's snapshot-end GUID",
            ends[0].at + FRAME + 4 + 8 + 2 + 4,
            0x10,
        ),
        flip("s2's snapshot-end prefix hash", ends[1].end - 7, 0x01),
        flip(
            "s3's snapshot-end transition index",
            ends[2].at + FRAME,
            0x01,
        ),
        flip("a checkpoint's prefix hash", ckpt.end - 1, 0x01),
        flip("a checkpoint's optional flag", ckpt.at + 1, 0x01),
        // records u64, then the stream hash.
        flip(
            "the end record's stream hash",
            end.at + FRAME + 8 + 20,
            0x01,
        ),
        flip("the end record's record count", end.at + FRAME, 0x01),
    ];
    let bad = f.s.path("bad.bd");
    let mut resumed = 0;
    for (i, flip) in flips.iter().enumerate() {
        let what = format!("flip of {} at byte {}", flip.what, flip.pos);
        // Every flip is caught at the frame that holds it, before that record is used.
        let (at, _) = f.frame_at(flip.pos);
        let mut bytes = f.bytes.clone();
        bytes[flip.pos as usize] ^= flip.xor;
        let want = flip
            .error
            .clone()
            .unwrap_or_else(|| check_mismatch(&bytes, at));
        std::fs::write(&bad, &bytes).unwrap();
        let replica = f.fresh_replica("r.raw");
        let extra: &[&str] = if i % 2 == 0 { &CKPT } else { &[] };
        let err = one_line_failure(&receive_file(&bad, &replica, extra), &what);
        assert!(err.starts_with(&want), "{what}: want {want:?}, got: {err}");
        resumed += usize::from(f.caught_before_use(&replica, at, &what));
    }
    assert!(resumed >= 5, "only {resumed} flips left a resumable apply");

    // A forged but well-framed record passes its own check; the prefix hash of the record
    // vouching for it catches it. The same snapshots sent again give the same layout (only the
    // stream id and so every hash differ): its checkpoint, snapshot-end and end records are
    // well framed, and vouch for other bytes.
    let again = f.s.path("again.bd");
    send_to_file(&f.spec("s0..s3"), &again);
    let other = std::fs::read(&again).unwrap();
    let other_recs = records(&again).1;
    assert_eq!(other.len(), f.bytes.len(), "the same layout");
    assert!(
        other_recs
            .iter()
            .zip(&f.recs)
            .all(|(a, b)| a.at == b.at && a.kind == b.kind),
        "the same layout"
    );
    for (i, r) in [f.rec(1, "checkpoint", 0), ends[1], end]
        .into_iter()
        .enumerate()
    {
        let what = format!(
            "the well-framed {} record of another stream at {}",
            r.kind, r.at
        );
        let frame = r.at as usize..r.end as usize;
        let mut bytes = f.bytes.clone();
        assert!(bytes[frame.clone()] != other[frame.clone()], "{what}");
        bytes[frame.clone()].copy_from_slice(&other[frame]);
        std::fs::write(&bad, &bytes).unwrap();
        let replica = f.fresh_replica("r.raw");
        let extra: &[&str] = if i % 2 == 0 { &CKPT } else { &[] };
        let err = one_line_failure(&receive_file(&bad, &replica, extra), &what);
        assert!(
            err.starts_with("blkdelta: stream hash mismatch"),
            "{what}: {err}"
        );
        f.caught_before_use(&replica, r.at, &what);
    }

    // A well-framed record of this very stream inserted where it does not belong, in bounds
    // and in order: transition 0's last data record, repeated before its second checkpoint.
    // Nothing rejects it on its own; it is held back with the records read since the first
    // checkpoint, and the second checkpoint's prefix hash catches it: none of them is applied.
    let late = f
        .changes(0)
        .into_iter()
        .rfind(|r| r.kind == "data")
        .unwrap();
    let ck = f.rec(0, "checkpoint", 1);
    let (late_off, late_len) = late.disk_range();
    assert!(
        late.at > ck.end,
        "the repeated record comes later in the stream"
    );
    let what = format!(
        "the data record at {} repeated before the checkpoint record at {}",
        late.at, ck.at
    );
    let mut bytes = f.bytes[..ck.at as usize].to_vec();
    bytes.extend_from_slice(&f.bytes[late.at as usize..late.end as usize]);
    bytes.extend_from_slice(&f.bytes[ck.at as usize..]);
    std::fs::write(&bad, &bytes).unwrap();
    let replica = f.fresh_replica("r.raw");
    let err = one_line_failure(&receive_file(&bad, &replica, &CKPT), &what);
    assert!(
        err.starts_with("blkdelta: stream hash mismatch"),
        "{what}: {err}"
    );
    assert_eq!(
        f.truth(&replica, &[], Some(ck.at)),
        Truth::InProgress(1),
        "{what}: the first checkpoint vouched for records"
    );
    assert!(
        read_range(&replica, late_off, late_len) == read_range(&f.exports[0], late_off, late_len),
        "{what}: the inserted record reached the replica"
    );
    // Every record before `ck.at` lies where it does in the intact stream.
    assert!(
        f.caught_before_use(&replica, ck.at, &what),
        "{what}: resumed"
    );

    // Trailing garbage after the end record is an altered stream too.
    let mut bytes = f.bytes.clone();
    bytes.push(0);
    std::fs::write(&bad, &bytes).unwrap();
    let replica = f.fresh_replica("r.raw");
    one_line_failure(&receive_file(&bad, &replica, &[]), "a byte after the end");
    assert_eq!(f.truth(&replica, &[], None), Truth::Holds(3));
}
