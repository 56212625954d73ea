//! Applies a stream to a target: verifies every record before writing it, and makes each
//! snapshot-end durable before recording it in the replica's state.

use std::io::Read;
use std::path::Path;

use blkdelta_common::digest::to_hex;
use blkdelta_common::progress::Progress;
use blkdelta_common::stream::{Record, StreamHeader, StreamReader};

use crate::plan::{plan, Plan, TargetProbe};
use crate::state::{self, default_state_path, InProgress, ReplicaState, StateSnap};
use crate::target::{open_target, Target};
use crate::ReceiveError;

/// How to receive.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// Apply every transition even when the replica does not hold the stream's base.
    pub force: bool,
}

/// What an apply did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveSummary {
    /// Transitions read and verified but not applied (the replica was past them).
    pub skipped_transitions: usize,
    /// Data records written.
    pub data_records: u64,
    /// Plain bytes written.
    pub data_bytes: u64,
    /// Bytes zeroed or discarded (skipped on a fresh target).
    pub zero_bytes: u64,
    /// Names of the snapshots reached, in order.
    pub snapshots: Vec<String>,
}

/// A one-phrase description of what a replica holds.
pub fn describe(st: &ReplicaState) -> String {
    match (&st.snapshot, &st.in_progress) {
        (_, Some(p)) => format!(
            "an unfinished apply ({} -> '{}')",
            p.from
                .as_ref()
                .map_or("full".to_string(), |f| format!("'{}'", f.name)),
            p.to.name
        ),
        (Some(s), None) => format!("'{}' ({})", s.name, s.guid),
        (None, None) => "no snapshot".into(),
    }
}

/// Receives the stream `reader` has opened into the raw file or block device at `path`: takes
/// the replica's lock, checks its state, and only then opens (or creates) the target.
pub fn receive_path<R: Read>(
    reader: StreamReader<R>,
    path: &Path,
    state_path: Option<&Path>,
    opts: &ReceiveOptions,
    progress: &dyn Progress,
) -> Result<ReceiveSummary, ReceiveError> {
    let probe = TargetProbe::of(path)?;
    let state_path = state_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_state_path(path, probe.is_block_device));
    let _lock = state::lock(&state_path)?;
    let prior = state::load(&state_path)?;
    let plan = plan(reader.header(), prior, &probe, opts.force)?;
    let mut target = open_target(path)?;
    receive(reader, target.as_mut(), &state_path, plan, progress)
}

/// Applies the stream `reader` has opened to `target` as `plan` says, keeping the replica
/// state at `state_path`. The caller holds the replica's lock.
pub fn receive<R: Read>(
    mut reader: StreamReader<R>,
    target: &mut dyn Target,
    state_path: &Path,
    plan: Plan,
    progress: &dyn Progress,
) -> Result<ReceiveSummary, ReceiveError> {
    let header = reader.header().clone();
    let state = plan.prior.clone().unwrap_or_else(|| ReplicaState {
        format: 1,
        source_kind: String::new(),
        source_name: String::new(),
        virtual_size: target.size(),
        snapshot: None,
        in_progress: None,
        updated_unix: 0,
    });
    let mut run = Apply {
        header: &header,
        state_path,
        skip_zeroing: plan.fresh && header.is_full(),
        first: plan.first,
        transition: 0,
        started: false,
        state,
        summary: ReceiveSummary {
            skipped_transitions: plan.first,
            ..ReceiveSummary::default()
        },
    };
    progress.start(
        header
            .total_data_bytes
            .saturating_add(header.total_zero_bytes),
    );
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
    first: usize,
    transition: usize,
    started: bool,
    state: ReplicaState,
    summary: ReceiveSummary,
}

impl Apply<'_> {
    /// Whether the records of the current transition are written (not only verified).
    fn applying(&self) -> bool {
        self.transition >= self.first
    }

    /// Marks the current transition in progress (once) before its first change to the target.
    fn mark_started(&mut self) -> Result<(), ReceiveError> {
        if self.started {
            return Ok(());
        }
        let t = &self.header.transitions[self.transition];
        self.state.source_kind = self.header.source.kind.clone();
        self.state.source_name = self.header.source.name.clone();
        self.state.snapshot = None;
        self.state.in_progress = Some(InProgress {
            stream_id: to_hex(&self.header.stream_id),
            from: t.from.as_ref().map(StateSnap::from),
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
        if !self.applying() {
            return Ok(());
        }
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
                let len = plain.len() as u64;
                if self.applying() {
                    self.mark_started()?;
                    target.write_at(&plain, d.offset)?;
                    self.summary.data_records += 1;
                    self.summary.data_bytes += len;
                }
                progress.advance(len);
            }
            Record::Zero { offset, len } | Record::Discard { offset, len } => {
                let discard = matches!(rec, Record::Discard { .. });
                let skip = self.skip_zeroing && self.transition == 0;
                if self.applying() && !skip {
                    self.mark_started()?;
                    if discard {
                        target.discard(offset, len)?;
                    } else {
                        target.write_zeroes(offset, len)?;
                    }
                }
                if self.applying() {
                    self.summary.zero_bytes = self.summary.zero_bytes.saturating_add(len);
                }
                progress.advance(len);
            }
            Record::SnapshotEnd(end) => {
                if self.applying() {
                    self.reached(&end.name, &end.guid, end.virtual_size, target)?;
                }
                self.transition += 1;
                self.started = false;
                self.begin_transition(target)?;
            }
            Record::End(_) => {}
        }
        Ok(())
    }

    /// The current transition's `to` state is complete: make it durable, then record it.
    fn reached(
        &mut self,
        name: &str,
        guid: &[u8; 16],
        virtual_size: u64,
        target: &mut dyn Target,
    ) -> Result<(), ReceiveError> {
        target.flush()?;
        self.state.source_kind = self.header.source.kind.clone();
        self.state.source_name = self.header.source.name.clone();
        self.state.in_progress = None;
        self.state.snapshot = Some(StateSnap {
            name: name.to_string(),
            guid: to_hex(guid),
        });
        self.state.virtual_size = virtual_size;
        self.save()?;
        self.summary.snapshots.push(name.to_string());
        Ok(())
    }

    fn save(&mut self) -> Result<(), ReceiveError> {
        self.state.updated_unix = state::now_unix();
        state::save(self.state_path, &self.state)
    }
}
