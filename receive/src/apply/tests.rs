//! The state an apply leaves behind when it stops part way.

use blkdelta_common::progress::NoProgress;
use blkdelta_common::stream::{encode_chunk, SnapRef, StreamHeader, StreamReader, StreamWriter};
use blkdelta_common::testing::{stream_header, transition};

use super::*;
use crate::state::{InProgress, StateSnap};

const SIZE: u64 = 4 << 20;
const MIB: u64 = 1 << 20;

/// A full stream of `to` cut short after its first data record (as a dropped connection
/// leaves it).
fn cut_seed(to: &SnapRef) -> StreamReader<std::io::Cursor<Vec<u8>>> {
    let header = StreamHeader {
        total_data_bytes: MIB,
        ..stream_header(vec![transition(None, to, SIZE)])
    };
    let mut w = StreamWriter::new(Vec::new(), &header).unwrap();
    w.data(&encode_chunk(0, &vec![0xab; MIB as usize], 1).unwrap())
        .unwrap();
    let bytes = std::mem::take(w.flush_inner().unwrap());
    StreamReader::new(std::io::Cursor::new(bytes)).unwrap()
}

/// A seed killed once its first half was durable, its replica deleted, then seeded again and
/// cut short before any checkpoint: none of the first half is on the new file, so the state
/// must not say it is durable (a resumed stream would skip it, and the replica would be
/// recorded as holding the snapshot with that half zero).
#[test]
fn a_new_seed_onto_a_deleted_replica_starts_durable_from_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.raw");
    let state_path = dir.path().join("r.raw.blkdelta");
    let mon = SnapRef {
        name: "mon".into(),
        guid: [1; 16],
    };
    let killed = ReplicaState {
        source_kind: "qcow2".into(),
        source_name: "vm.qcow2".into(),
        in_progress: Some(InProgress {
            stream_id: "ee".repeat(16),
            from: None,
            to: StateSnap::from(&mon),
            transition: 0,
            durable_offset: SIZE / 2,
            undo: None,
        }),
        ..ReplicaState::new(SIZE)
    };
    state::save(&state_path, &killed).unwrap();
    let got = receive_path(
        cut_seed(&mon),
        &path,
        Some(&state_path),
        &ReceiveOptions::default(),
        &NoProgress,
    );
    assert!(matches!(got, Err(ReceiveError::Stream(_))), "{got:?}");
    let after = state::load(&state_path).unwrap().unwrap();
    let p = after.in_progress.expect("still in progress");
    assert_eq!(p.durable_offset, 0);
}
