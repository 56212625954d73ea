//! Snapshot-info records: their bytes, their GUID, and where a reader accepts them.

use super::{end_of, expect_corrupt, header, read_all, snap, stream_with};
use crate::hex::to_hex;
use crate::image::qcow2::Snapshot;
use crate::limits::CHUNK_BYTES;
use crate::stream::{
    encode_body, Record, RecordType, SnapRef, SnapshotInfo, StreamHeader, StreamWriter, Transition,
    FLAG_OPTIONAL,
};
use crate::StreamError;

/// The snapshot of the GUID test vector in docs/STREAM.md, *Identities*.
fn monday() -> Snapshot {
    Snapshot {
        id: "1".into(),
        name: "mon".into(),
        l1_table_offset: 0x10000,
        l1_size: 1,
        date_sec: 1_700_000_000,
        date_nsec: 5,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: CHUNK_BYTES,
    }
}

/// One transition to `monday()`: from `sun` when `incremental`, else a full stream.
fn to_monday(incremental: bool) -> StreamHeader {
    let mon = monday();
    header(vec![Transition {
        from: incremental.then(|| snap("sun", 7)),
        to: SnapRef {
            name: mon.name.clone(),
            guid: mon.guid(),
        },
        virtual_size: mon.disk_size,
    }])
}

fn monday_info() -> SnapshotInfo {
    SnapshotInfo::from_snapshot(0, &monday())
}

#[test]
fn snapshot_info_round_trips_and_gives_the_snapshot_guid() {
    let h = to_monday(true);
    let b = stream_with(&h, |w| {
        w.zero(0, 4096).unwrap();
        w.snapshot_info(&monday_info()).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    let recs = read_all(&b).unwrap();
    assert_eq!(recs.len(), 4);
    assert_eq!(recs[1], Record::SnapshotInfo(monday_info()));
    assert!(matches!(&recs[2], Record::SnapshotEnd(e) if e.name == "mon"));
    let info = monday_info();
    assert_eq!(info.guid(), monday().guid());
    assert_eq!(to_hex(&info.guid()), "9205c39c93e4f215792739a469bd3f4b");
    assert!(info.is_for(&h.transitions[0].to));
    // Every field is part of the identity.
    let changed = [
        SnapshotInfo {
            id: "2".into(),
            ..info.clone()
        },
        SnapshotInfo {
            date_sec: info.date_sec + 1,
            ..info.clone()
        },
        SnapshotInfo {
            date_nsec: info.date_nsec + 1,
            ..info.clone()
        },
        SnapshotInfo {
            vm_clock_nsec: 1,
            ..info.clone()
        },
        SnapshotInfo {
            disk_size: 2 * CHUNK_BYTES,
            ..info.clone()
        },
    ];
    for other in changed {
        assert!(!other.is_for(&h.transitions[0].to), "{other:?}");
    }
}

/// Freezes the snapshot-info frame: type 8, the optional flag, and its body (docs/STREAM.md).
#[test]
fn golden_snapshot_info_frame() {
    let h = to_monday(false);
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    let at = w.bytes_written() as usize;
    w.snapshot_info(&monday_info()).unwrap();
    let frame = w.flush_inner().unwrap()[at..].to_vec();
    assert_eq!(to_hex(&frame), GOLDEN_INFO_HEX);
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    assert_eq!(read_all(&w.finish().unwrap()).unwrap().len(), 3);
}

const GOLDEN_INFO_HEX: &str = concat!(
    "080100003000000067abf0f314974d78", // type 8, flags 1, reserved, body_len 48, check
    "00000000",                         // transition 0
    "0100000000000000",                 // id length 1
    "31",                               // "1"
    "0300000000000000",                 // name length 3
    "6d6f6e",                           // "mon"
    "00f15365",                         // date_sec 1,700,000,000
    "05000000",                         // date_nsec 5
    "0000000000000000",                 // vm_clock_nsec 0
    "0000100000000000",                 // disk_size 1 MiB
);

/// An info record reaches a reader only in its place: in the current transition, of its `to`
/// snapshot, right before that transition's snapshot-end.
#[test]
fn misplaced_snapshot_info_is_rejected() {
    let h = to_monday(true);
    let with = |info: SnapshotInfo| {
        stream_with(&h, |w| {
            w.snapshot_info(&info).unwrap();
            w.snapshot_end(&end_of(&h, 0)).unwrap();
        })
    };
    let wrong = [
        SnapshotInfo {
            transition: 1,
            ..monday_info()
        },
        SnapshotInfo {
            name: "tue".into(),
            ..monday_info()
        },
        SnapshotInfo {
            disk_size: 2 * CHUNK_BYTES,
            ..monday_info()
        },
    ];
    for info in wrong {
        expect_corrupt(&with(info), "does not describe transition 0 to 'mon'");
    }
    // Anything but the snapshot-end after it: a range, a checkpoint, a second info, an unknown
    // optional frame, the end record.
    let then = |f: &dyn Fn(&mut StreamWriter<Vec<u8>>)| {
        let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
        w.snapshot_info(&monday_info()).unwrap();
        f(&mut w);
        w.snapshot_end(&end_of(&h, 0)).unwrap();
        w.finish().unwrap()
    };
    let after = "after a snapshot-info record";
    expect_corrupt(&then(&|w| w.zero(0, 4096).unwrap()), after);
    expect_corrupt(&then(&|w| w.checkpoint().unwrap()), after);
    expect_corrupt(&then(&|w| w.snapshot_info(&monday_info()).unwrap()), after);
    expect_corrupt(
        &then(&|w| w.raw_frame(0x70, FLAG_OPTIONAL, b"future").unwrap()),
        after,
    );
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.snapshot_info(&monday_info()).unwrap();
    expect_corrupt(
        &w.finish().unwrap(),
        "record of type 6 after a snapshot-info",
    );
    // After the last snapshot-end there is no transition left to describe.
    let b = stream_with(&h, |w| {
        w.snapshot_end(&end_of(&h, 0)).unwrap();
        w.snapshot_info(&monday_info()).unwrap();
    });
    expect_corrupt(&b, "snapshot-info record after the last transition");
}

#[test]
fn snapshot_info_of_a_later_transition_names_it() {
    let mon = monday();
    let tue = Snapshot {
        id: "2".into(),
        name: "tue".into(),
        date_sec: mon.date_sec + 86_400,
        ..mon.clone()
    };
    let as_ref = |s: &Snapshot| SnapRef {
        name: s.name.clone(),
        guid: s.guid(),
    };
    let h = header(vec![
        Transition {
            from: Some(snap("sun", 7)),
            to: as_ref(&mon),
            virtual_size: CHUNK_BYTES,
        },
        Transition {
            from: Some(as_ref(&mon)),
            to: as_ref(&tue),
            virtual_size: CHUNK_BYTES,
        },
    ]);
    let two = |first: u32, second: u32| {
        stream_with(&h, |w| {
            w.snapshot_info(&SnapshotInfo::from_snapshot(first, &mon))
                .unwrap();
            w.snapshot_end(&end_of(&h, 0)).unwrap();
            w.snapshot_info(&SnapshotInfo::from_snapshot(second, &tue))
                .unwrap();
            w.snapshot_end(&end_of(&h, 1)).unwrap();
        })
    };
    let recs = read_all(&two(0, 1)).unwrap();
    assert!(
        matches!(&recs[2], Record::SnapshotInfo(i) if i.transition == 1 && i.is_for(&h.transitions[1].to))
    );
    expect_corrupt(&two(0, 0), "does not describe transition 1 to 'tue'");
}

#[test]
fn snapshot_info_strings_are_bounded_like_names() {
    let long = "x".repeat(crate::limits::MAX_NAME_BYTES + 1);
    let info = SnapshotInfo {
        id: long.clone(),
        ..monday_info()
    };
    assert!(info
        .validate()
        .unwrap_err()
        .contains("snapshot id is 1025 bytes"));
    let h = to_monday(true);
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    let err = w.snapshot_info(&info).unwrap_err().to_string();
    assert!(err.contains("limit 1024"), "{err}");
    // A writer that does not check: the reader refuses it.
    let b = stream_with(&h, |w| {
        w.raw_frame(
            RecordType::SnapshotInfo as u8,
            FLAG_OPTIONAL,
            &encode_body(&info),
        )
        .unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&b, "snapshot-info record: snapshot id is 1025 bytes long");
    // A body with bytes left over.
    let mut body = encode_body(&monday_info());
    body.push(0);
    let b = stream_with(&h, |w| {
        w.raw_frame(RecordType::SnapshotInfo as u8, FLAG_OPTIONAL, &body)
            .unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&b, "snapshot-info record has trailing bytes");
}

/// The info is covered like any frame: its check catches a changed byte, and the prefix hash
/// of the snapshot-end after it catches one dropped whole.
#[test]
fn snapshot_info_is_covered_by_its_check_and_the_next_prefix_hash() {
    let h = to_monday(true);
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    let from = w.bytes_written() as usize;
    w.snapshot_info(&monday_info()).unwrap();
    let to = w.bytes_written() as usize;
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let intact = w.finish().unwrap();
    let mut flipped = intact.clone();
    flipped[to - 1] ^= 1; // the last byte of disk_size
    expect_corrupt(&flipped, "record check mismatch (type 8");
    let mut dropped = intact[..from].to_vec();
    dropped.extend_from_slice(&intact[to..]);
    assert!(matches!(
        read_all(&dropped),
        Err(StreamError::StreamHash { .. })
    ));
}

/// A reader that knows type 8 reads it whatever the optional bit says; a reader that does not
/// (an older build, shown here by an unknown type with the same flag and body) skips it, and
/// the stream still verifies, since skipped frames count in the hashes like any other.
#[test]
fn snapshot_info_is_skipped_by_readers_that_do_not_know_it() {
    let h = to_monday(true);
    let body = encode_body(&monday_info());
    let b = stream_with(&h, |w| {
        w.raw_frame(RecordType::SnapshotInfo as u8, 0, &body)
            .unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    assert_eq!(
        read_all(&b).unwrap()[0],
        Record::SnapshotInfo(monday_info())
    );
    let b = stream_with(&h, |w| {
        w.raw_frame(0x70, FLAG_OPTIONAL, &body).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    let recs = read_all(&b).unwrap();
    assert_eq!(recs.len(), 2);
    assert!(matches!(recs[0], Record::SnapshotEnd(_)));
}
