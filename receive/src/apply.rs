//! Applies a stream to a target: checks the base, verifies every record before writing it, and
//! makes each snapshot-end durable before recording it in the replica's state.

use std::io::Read;
use std::path::Path;

use blkdelta_common::digest::to_hex;
use blkdelta_common::progress::Progress;
use blkdelta_common::stream::{Record, StreamHeader, StreamReader};

use crate::state::{self, InProgress, ReplicaState, StateSnap};
use crate::target::Target;
use crate::ReceiveError;

/// How to receive.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// Apply even when the replica does not hold the stream's base.
    pub force: bool,
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveSummary {
    /// Data records written.
    pub data_records: u64,
    /// Plain bytes written.
    pub data_bytes: u64,
    /// Bytes zeroed or discarded (skipped on a fresh target).
    pub zero_bytes: u64,
    /// Names of the snapshots reached, in order.
    pub snapshots: Vec<String>,
}

/// Checks that a stream may be applied to a replica in state `prior`.
pub fn check_base(
    header: &StreamHeader,
    prior: Option<&ReplicaState>,
    target_fresh: bool,
) -> Result<(), ReceiveError> {
    let first = &header.transitions[0];
    match (&first.from, prior) {
        (None, _) if target_fresh => Ok(()),
        (None, Some(st))
            if st.source_kind == header.source.kind && st.source_name == header.source.name =>
        {
            Ok(())
        }
        (None, _) => Err(ReceiveError::Refused(format!(
            "the target holds data that is not a replica of {} '{}'; a full stream would overwrite it",
            header.source.kind, header.source.name
        ))),
        (Some(from), None) => Err(ReceiveError::Refused(format!(
            "the target is not a blkdelta replica (no state); the stream needs snapshot '{}' ({})",
            from.name,
            to_hex(&from.guid)
        ))),
        (Some(from), Some(st)) => {
            let holds = st.snapshot.as_ref().is_some_and(|s| s.is(from));
            let resuming = st
                .in_progress
                .as_ref()
                .is_some_and(|p| p.from.as_ref().is_some_and(|s| s.is(from)));
            if holds || resuming {
                return Ok(());
            }
            Err(ReceiveError::Refused(format!(
                "the replica holds {} but the stream starts from '{}' ({})",
                describe(st),
                from.name,
                to_hex(&from.guid)
            )))
        }
    }
}

/// A one-phrase description of what a replica holds.
pub fn describe(st: &ReplicaState) -> String {
    match (&st.snapshot, &st.in_progress) {
        (_, Some(p)) => format!(
            "an unfinished apply ({} → '{}')",
            p.from
                .as_ref()
                .map_or("full".to_string(), |f| format!("'{}'", f.name)),
            p.to.name
        ),
        (Some(s), None) => format!("'{}' ({})", s.name, s.guid),
        (None, None) => "no snapshot".into(),
    }
}

/// Applies the stream `reader` has opened (its header read) to `target`, keeping the replica
/// state at `state_path`.
pub fn receive<R: Read>(
    mut reader: StreamReader<R>,
    target: &mut dyn Target,
    state_path: &Path,
    opts: &ReceiveOptions,
    progress: &dyn Progress,
) -> Result<ReceiveSummary, ReceiveError> {
    let header = reader.header().clone();
    if let Some(capacity) = target.capacity() {
        let needed = header.transitions.iter().map(|t| t.virtual_size).max();
        if let Some(needed) = needed.filter(|&n| n > capacity) {
            return Err(ReceiveError::TooSmall {
                target: capacity,
                needed,
            });
        }
    }
    let prior = state::load(state_path)?;
    if !opts.force {
        check_base(&header, prior.as_ref(), target.is_fresh())?;
    }
    let mut run = Apply {
        header: &header,
        state_path,
        skip_zeroing: target.is_fresh() && header.is_full(),
        transition: 0,
        started: false,
        state: ReplicaState {
            format: 1,
            source_kind: header.source.kind.clone(),
            source_name: header.source.name.clone(),
            virtual_size: target.size(),
            snapshot: prior.as_ref().and_then(|p| p.snapshot.clone()),
            in_progress: None,
            updated_unix: state::now_unix(),
        },
        summary: ReceiveSummary::default(),
    };
    progress.start(header.total_data_bytes + header.total_zero_bytes);
    run.begin_transition(target)?;
    while let Some(rec) = reader.next_record()? {
        let at = reader.record_position();
        run.record(rec, at, target, progress)?;
    }
    progress.finish();
    Ok(run.summary)
}

/// The state of one apply.
struct Apply<'a> {
    header: &'a StreamHeader,
    state_path: &'a Path,
    skip_zeroing: bool,
    transition: usize,
    started: bool,
    state: ReplicaState,
    summary: ReceiveSummary,
}

impl Apply<'_> {
    /// Marks the current transition in progress (once) before its first change to the target.
    fn mark_started(&mut self) -> Result<(), ReceiveError> {
        if self.started {
            return Ok(());
        }
        let t = &self.header.transitions[self.transition];
        self.state.in_progress = Some(InProgress {
            stream_id: to_hex(&self.header.stream_id),
            from: self
                .state
                .snapshot
                .take()
                .or_else(|| t.from.as_ref().map(StateSnap::from)),
            to: StateSnap::from(&t.to),
            transition: self.transition as u32,
            durable_offset: 0,
        });
        self.save()?;
        self.started = true;
        Ok(())
    }

    /// Resizes the target for the transition that starts now.
    fn begin_transition(&mut self, target: &mut dyn Target) -> Result<(), ReceiveError> {
        let Some(t) = self.header.transitions.get(self.transition) else {
            return Ok(());
        };
        if target.size() != t.virtual_size {
            self.mark_started()?;
            target.set_size(t.virtual_size)?;
            self.state.virtual_size = t.virtual_size;
        }
        Ok(())
    }

    fn record(
        &mut self,
        rec: Record,
        at: u64,
        target: &mut dyn Target,
        progress: &dyn Progress,
    ) -> Result<(), ReceiveError> {
        match rec {
            Record::Data(d) => {
                let plain = d.plain(at)?;
                self.mark_started()?;
                target.write_at(&plain, d.offset)?;
                self.summary.data_records += 1;
                self.summary.data_bytes += plain.len() as u64;
                progress.advance(plain.len() as u64);
            }
            Record::Zero { offset, len } | Record::Discard { offset, len } => {
                let discard = matches!(rec, Record::Discard { .. });
                if !(self.skip_zeroing && self.transition == 0) {
                    self.mark_started()?;
                    if discard {
                        target.discard(offset, len)?;
                    } else {
                        target.write_zeroes(offset, len)?;
                    }
                }
                self.summary.zero_bytes += len;
                progress.advance(len);
            }
            Record::SnapshotEnd(end) => {
                target.flush()?;
                self.state.in_progress = None;
                self.state.snapshot = Some(StateSnap {
                    name: end.name.clone(),
                    guid: to_hex(&end.guid),
                });
                self.state.virtual_size = end.virtual_size;
                self.save()?;
                self.summary.snapshots.push(end.name);
                self.transition += 1;
                self.started = false;
                self.begin_transition(target)?;
            }
            Record::End(_) => {}
        }
        Ok(())
    }

    fn save(&mut self) -> Result<(), ReceiveError> {
        self.state.updated_unix = state::now_unix();
        state::save(self.state_path, &self.state)
    }
}
