//! The rules of [`plan`], one row each: what the replica and its state are, what the stream
//! carries, the overrides given, and the transition applied or the switch a refusal names.
//! The rows are in `rules`, those of undo streams in `undo`; this module builds them.

use blkdelta_common::stream::{SnapRef, StreamHeader, Transition};
use blkdelta_common::testing::{snap, stream_header, transition};

use super::*;
use crate::identity::{DeviceKey, Identity};
use crate::state::{InProgress, ReplicaState, StateSnap};

mod rules;
mod undo;

const SIZE: u64 = 4 << 20;

fn inc(from: &SnapRef, to: &SnapRef) -> Transition {
    transition(Some(from), to, SIZE)
}

fn full(to: &SnapRef) -> Transition {
    transition(None, to, SIZE)
}

fn header(transitions: Vec<Transition>) -> StreamHeader {
    let h = stream_header(transitions);
    h.validate().unwrap();
    h
}

fn resumed(mut h: StreamHeader, offset: u64) -> StreamHeader {
    h.resume_offset = offset;
    h
}

fn file_id(ino: u64, size: u64, mtime_ns: i64) -> Identity {
    Identity::File {
        dev: 1,
        ino,
        size,
        mtime_ns,
    }
}

/// The replica as blkdelta left it: inode 7, `SIZE` bytes, time 100.
fn as_left() -> Identity {
    file_id(7, SIZE, 100)
}

fn probe(identity: Option<Identity>) -> TargetProbe {
    let size = match &identity {
        Some(Identity::File { size, .. }) => *size,
        Some(Identity::Device(k)) => k.size,
        Some(Identity::Image { .. }) => SIZE,
        None => 0,
    };
    TargetProbe {
        exists: identity.is_some(),
        is_block_device: matches!(identity, Some(Identity::Device(_))),
        size,
        identity,
    }
}

fn unchanged() -> TargetProbe {
    probe(Some(as_left()))
}

fn missing() -> TargetProbe {
    probe(None)
}

fn device(size: u64) -> TargetProbe {
    probe(Some(Identity::Device(DeviceKey {
        key: "dm-uuid:LVM-x".into(),
        resolved: "/dev/dm-3".into(),
        rdev: "253:3".into(),
        size,
        loop_backing: None,
    })))
}

fn hex(s: &SnapRef) -> String {
    blkdelta_common::digest::to_hex(&s.guid)
}

/// A replica of vm.qcow2 that holds `held` and went through `history` (oldest first, `held`
/// added last).
fn holding(held: &SnapRef, history: &[&SnapRef]) -> ReplicaState {
    let mut st = ReplicaState {
        source_kind: "qcow2".into(),
        source_name: "vm.qcow2".into(),
        snapshot: Some(StateSnap::from(held)),
        identity: Some(as_left()),
        ..ReplicaState::new(SIZE)
    };
    for s in history.iter().chain([&held]) {
        st.remember(&hex(s));
    }
    st
}

/// A replica part way through `from → to`, durable below `durable`, that held `from` before.
fn applying(from: Option<&SnapRef>, to: &SnapRef, durable: u64) -> ReplicaState {
    let mut st = ReplicaState {
        source_kind: "qcow2".into(),
        source_name: "vm.qcow2".into(),
        identity: Some(as_left()),
        ..ReplicaState::new(SIZE)
    };
    if let Some(f) = from {
        st.remember(&hex(f));
    }
    st.in_progress = Some(InProgress {
        stream_id: "ee".repeat(16),
        from: from.map(StateSnap::from),
        to: StateSnap::from(to),
        transition: 0,
        durable_offset: durable,
        undo: None,
    });
    st
}

fn with(overrides: Overrides) -> ReceiveOptions {
    ReceiveOptions {
        overrides,
        ..ReceiveOptions::default()
    }
}

fn none() -> ReceiveOptions {
    ReceiveOptions::default()
}
fn rebase() -> ReceiveOptions {
    with(Overrides {
        rebase: true,
        ..Overrides::default()
    })
}
fn overwrite() -> ReceiveOptions {
    with(Overrides {
        overwrite: true,
        ..Overrides::default()
    })
}
fn rewind() -> ReceiveOptions {
    with(Overrides {
        rewind: true,
        ..Overrides::default()
    })
}
fn force() -> ReceiveOptions {
    with(Overrides::all())
}
fn repair() -> ReceiveOptions {
    ReceiveOptions {
        repair: true,
        ..ReceiveOptions::default()
    }
}

/// What a row expects.
#[derive(Debug, PartialEq, Eq)]
enum Want {
    /// Applies from this transition.
    From(usize),
    /// Refused; the switch that overrides it, if any.
    Refused(Option<&'static str>),
    /// The target is too small.
    TooSmall,
}
use Want::{From, Refused, TooSmall};

fn outcome(
    h: &StreamHeader,
    prior: Option<ReplicaState>,
    p: &TargetProbe,
    o: &ReceiveOptions,
) -> Want {
    match plan(h, prior, p, o) {
        Ok(plan) => From(plan.first),
        Err(ReceiveError::Refused { switch, .. }) => Refused(switch),
        Err(ReceiveError::TooSmall { .. }) => TooSmall,
        Err(e) => panic!("unexpected error {e}"),
    }
}

struct Row {
    what: &'static str,
    header: StreamHeader,
    prior: Option<ReplicaState>,
    probe: TargetProbe,
    opts: ReceiveOptions,
    want: Want,
}

fn row(
    what: &'static str,
    header: &StreamHeader,
    prior: Option<&ReplicaState>,
    probe: &TargetProbe,
    opts: ReceiveOptions,
    want: Want,
) -> Row {
    Row {
        what,
        header: header.clone(),
        prior: prior.cloned(),
        probe: probe.clone(),
        opts,
        want,
    }
}

fn check(rows: Vec<Row>) {
    let mut failed = Vec::new();
    for r in rows {
        let got = outcome(&r.header, r.prior, &r.probe, &r.opts);
        if got != r.want {
            failed.push(format!("{}: got {got:?}, want {:?}", r.what, r.want));
        }
    }
    assert!(failed.is_empty(), "\n{}", failed.join("\n"));
}
