//! When an apply takes the kept hashes of the replica as they are, starts new ones, or drops
//! them.

use blkdelta_common::stream::{SnapRef, StreamHeader};
use blkdelta_common::testing::{snap, stream_header, transition};

use super::*;
use crate::identity::Identity;
use crate::plan::{plan, ReceiveOptions, TargetProbe};
use crate::state::{InProgress, StateSnap};

const SIZE: u64 = 4 << 20;

fn header(from: Option<&SnapRef>, to: &SnapRef) -> StreamHeader {
    stream_header(vec![transition(from, to, SIZE)])
}

fn file(ino: u64, size: u64) -> TargetProbe {
    TargetProbe {
        exists: true,
        is_block_device: false,
        size,
        identity: Some(Identity::File {
            dev: 1,
            ino,
            size,
            mtime_ns: 5,
        }),
    }
}

fn missing() -> TargetProbe {
    TargetProbe {
        exists: false,
        is_block_device: false,
        size: 0,
        identity: None,
    }
}

/// A replica (inode 7) part way through `from → to`, whose apply kept hashes in which block
/// 0 holds data.
fn interrupted(dir: &Path, from: Option<&SnapRef>, to: &SnapRef) -> (PathBuf, ReplicaState) {
    let state_path = dir.join("r.raw.blkdelta");
    let mut k = KeptHashes::create(&hashes_path(&state_path), SIZE).unwrap();
    k.wrote(0, &vec![7; BLOCK_BYTES as usize]);
    let disk = blkdelta_common::image::mem::MemImage::new(SIZE, 4096);
    k.settle(&disk).unwrap();
    k.sync().unwrap();
    let st = ReplicaState {
        source_kind: "qcow2".into(),
        source_name: "vm.qcow2".into(),
        identity: Some(Identity::File {
            dev: 1,
            ino: 7,
            size: SIZE,
            mtime_ns: 5,
        }),
        in_progress: Some(InProgress {
            stream_id: "ee".repeat(16),
            from: from.map(StateSnap::from),
            to: StateSnap::from(to),
            transition: 0,
            durable_offset: BLOCK_BYTES,
            undo: None,
        }),
        ..ReplicaState::new(SIZE)
    };
    (state_path, st)
}

fn zeros_digest(dir: &Path) -> [u8; 32] {
    KeptHashes::create(&dir.join("zeros"), SIZE)
        .unwrap()
        .digest()
        .unwrap()
}

fn kept_for(
    h: &StreamHeader,
    st: &ReplicaState,
    probe: &TargetProbe,
    overrides: crate::plan::Overrides,
    state_path: &Path,
) -> Option<KeptHashes> {
    let opts = ReceiveOptions {
        overrides,
        ..ReceiveOptions::default()
    };
    let p = plan(h, Some(st.clone()), probe, &opts).unwrap();
    for_apply(h, &p, state_path, probe.size).unwrap()
}

#[test]
fn the_apply_that_finishes_an_interrupted_one_continues_its_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (snap("a", 1), snap("b", 2));
    let (sp, st) = interrupted(dir.path(), Some(&a), &b);
    let h = header(Some(&a), &b);
    let k = kept_for(&h, &st, &file(7, SIZE), Default::default(), &sp).unwrap();
    let block = vec![7u8; BLOCK_BYTES as usize];
    assert_eq!(
        k.entries(0, 1).unwrap()[0],
        *blake3::hash(&block).as_bytes()
    );
}

/// A seed killed part way, its replica deleted, then another seed: the new replica reads as
/// zeros wherever the new stream writes nothing (its holes are skipped on a fresh target),
/// whatever the old apply wrote there.
#[test]
fn a_new_seed_onto_a_deleted_replica_starts_new_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let (s1, s2) = (snap("mon", 1), snap("tue", 2));
    let (sp, st) = interrupted(dir.path(), None, &s1);
    for to in [&s2, &s1] {
        let h = header(None, to);
        let mut k = kept_for(&h, &st, &missing(), Default::default(), &sp).unwrap();
        k.set_size(SIZE).unwrap();
        assert_eq!(
            k.digest().unwrap(),
            zeros_digest(dir.path()),
            "seed of {}",
            to.name
        );
    }
}

/// Another stream forced onto a replica part way through an apply: what the interrupted
/// apply wrote past its last checkpoint is in neither the hashes nor the new stream.
#[test]
fn another_stream_onto_an_interrupted_apply_drops_its_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (snap("a", 1), snap("b", 2), snap("c", 3));
    let (sp, st) = interrupted(dir.path(), Some(&a), &b);
    let all = crate::plan::Overrides::all();
    assert!(kept_for(&header(Some(&a), &c), &st, &file(7, SIZE), all, &sp).is_none());
    assert!(!hashes_path(&sp).exists());
    // The same transition onto another file (replaced behind blkdelta's back).
    let (sp, st) = interrupted(dir.path(), Some(&a), &b);
    assert!(kept_for(&header(Some(&a), &b), &st, &file(8, SIZE), all, &sp).is_none());
    assert!(!hashes_path(&sp).exists());
}

/// An apply killed between shrinking the target and shrinking its hashes (or, on a device,
/// between growing them and recording the new size): the apply that finishes it must not
/// fail at every checkpoint because the disk is smaller than its hashes.
#[test]
fn an_interrupted_apply_continues_hashes_resized_to_the_target() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (snap("a", 1), snap("b", 2));
    let (sp, st) = interrupted(dir.path(), Some(&a), &b);
    let shrunk = SIZE / 2 + 4096;
    // The transition shrinks the disk: killed after the shrink, before the hashes followed.
    let h = stream_header(vec![transition(Some(&a), &b, shrunk)]);
    let mut k = kept_for(&h, &st, &file(7, shrunk), Default::default(), &sp).unwrap();
    assert_eq!(k.size(), shrunk);
    let disk = blkdelta_common::image::mem::MemImage::new(shrunk, 4096);
    k.settle(&disk).unwrap();
}
