//! The applier: takes the decoder's steps in order, holds ranges back until a prefix hash
//! vouches for them, writes them (saving pre-images first for an undo stream), checkpoints the
//! durable offset, and records each snapshot reached once it is durable.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use blkdelta_common::buf::AlignedBuf;
use blkdelta_common::digest::to_hex;
use blkdelta_common::progress::Progress;
use blkdelta_common::stream::{SnapshotEnd, SnapshotInfo, StreamHeader};

use super::decode::{Range, Step};
use super::ReceiveSummary;
use crate::hashes::KeptHashes;
use crate::plan::UndoMode;
use crate::state::{self, absolute_display, InProgress, ReplicaState, StateSnap};
use crate::target::Target;
use crate::undo::{undo_header, UndoWriter};
use crate::writers::{self, Writers};
use crate::ReceiveError;

/// With an undo stream, bytes of records gathered before their pre-images are saved and
/// synced together (bounds memory and the number of syncs).
const UNDO_BATCH_BYTES: u64 = 32 << 20;

/// With an undo stream, records gathered at most before their pre-images are saved.
const UNDO_BATCH_RECORDS: usize = 4096;

/// Where the apply is in the stream.
pub(crate) struct Position {
    /// Index of the current transition.
    pub(crate) transition: usize,
    /// The first transition applied; earlier ones are only verified.
    pub(crate) first: usize,
    /// Whether the current transition is marked in progress in the state.
    pub(crate) started: bool,
    /// The durable offset of the interrupted apply this one finishes (see
    /// [`crate::plan::Plan::finishes`]).
    pub(crate) finishing: Option<u64>,
    /// The target reads as zeros: the zero and discard records of a full stream are skipped.
    pub(crate) skip_zeroing: bool,
}

/// Ranges on their way to the target.
#[derive(Default)]
pub(crate) struct Batch {
    /// Read since the last checkpoint or snapshot-end record, not yet vouched for.
    unverified: Vec<Range>,
    /// Vouched for, waiting to be written (with an undo stream, gathered to save their
    /// pre-images together).
    pending: Vec<Range>,
    /// Data bytes in `pending`.
    pending_bytes: u64,
}

/// How far the current transition is durable.
pub(crate) struct Durability {
    /// Applied bytes between checkpoints of the durable offset.
    pub(crate) checkpoint_bytes: u64,
    /// Applied since the last checkpoint acted on.
    since_checkpoint: u64,
    /// End of the last range applied in the current transition.
    applied_end: u64,
}

impl Durability {
    /// Nothing applied yet; a checkpoint every `checkpoint_bytes`.
    pub(crate) fn new(checkpoint_bytes: u64) -> Self {
        Durability {
            checkpoint_bytes,
            since_checkpoint: 0,
            applied_end: 0,
        }
    }
}

/// The undo stream of the apply, if asked for.
pub(crate) struct Undo {
    /// Where, and how to open it.
    pub(crate) plan: Option<(PathBuf, UndoMode)>,
    /// Open once the transition starts.
    writer: Option<UndoWriter>,
}

impl Undo {
    /// The undo stream `plan` says, not open yet.
    pub(crate) fn new(plan: Option<(PathBuf, UndoMode)>) -> Self {
        Undo { plan, writer: None }
    }
}

/// The state of one apply.
pub(crate) struct Apply<'a> {
    pub(crate) header: &'a StreamHeader,
    pub(crate) position: Position,
    pub(crate) batch: Batch,
    pub(crate) durability: Durability,
    pub(crate) undo: Undo,
    /// The replica's kept block hashes, updated as ranges are applied (none: not kept).
    pub(crate) kept: Option<KeptHashes>,
    /// The replica's state, and where it is saved (none: a dry run).
    pub(crate) state: ReplicaState,
    pub(crate) state_path: Option<&'a Path>,
    /// Writer threads for data records (none: written here, through the target).
    pub(crate) writers: Option<Writers<'a>>,
    /// Buffers of written data go back to the decoder here.
    pub(crate) spare: Sender<AlignedBuf>,
    /// The qcow2 internal snapshot the current transition's snapshot-end reaches, from the
    /// snapshot-info record right before it (trusted only once that snapshot-end is verified
    /// and its GUID is the transition's `to`, see [`SnapshotInfo::is_for`]).
    pub(crate) snapshot_info: Option<SnapshotInfo>,
    pub(crate) summary: ReceiveSummary,
}

impl Apply<'_> {
    /// Whether the ranges of the current transition are written (not only verified).
    fn applying(&self) -> bool {
        self.position.transition >= self.position.first
    }

    /// Takes one step of the stream.
    pub(crate) fn step(
        &mut self,
        step: Step,
        target: &mut dyn Target,
        progress: &dyn Progress,
    ) -> Result<(), ReceiveError> {
        match step {
            Step::Range(r) => {
                progress.advance(r.span().1);
                self.hold(r);
                Ok(())
            }
            Step::Checkpoint => self.verified(target, false),
            Step::SnapshotInfo(info) => {
                self.snapshot_info = Some(info);
                Ok(())
            }
            Step::SnapshotEnd(end) => {
                if self.applying() {
                    self.verified(target, true)?;
                    self.reached(&end, target)?;
                }
                // The info belongs to this snapshot-end alone (the reader puts it right before).
                self.snapshot_info = None;
                self.batch.unverified.clear();
                self.position.transition += 1;
                self.position.started = false;
                self.begin_transition(target)
            }
            Step::End => Ok(()),
        }
    }

    /// Marks the current transition in progress (once) before its first change to the target,
    /// and opens the undo stream while the target still holds `from`.
    fn mark_started(&mut self, target: &dyn Target) -> Result<(), ReceiveError> {
        if self.position.started {
            return Ok(());
        }
        let p = &self.position;
        let t = &self.header.transitions[p.transition];
        if let Some((path, mode)) = &self.undo.plan {
            let header = undo_header(t, &self.header.source, target.size());
            self.undo.writer = Some(match mode {
                UndoMode::Create => UndoWriter::create(path, header)?,
                UndoMode::Continue => UndoWriter::resume(path, &header)?,
                UndoMode::Restart => UndoWriter::restart(path, header)?,
            });
        }
        let durable = match p.finishing {
            Some(d) if p.transition == p.first => d,
            _ if p.transition == 0 => self.header.resume_offset,
            _ => 0,
        };
        self.state.source_kind = self.header.source.kind.clone();
        self.state.source_name = self.header.source.name.clone();
        self.state.snapshot = None;
        self.state.digest = None;
        self.state.in_progress = Some(InProgress {
            stream_id: to_hex(&self.header.stream_id),
            from: t.from.as_ref().map(StateSnap::from),
            to: StateSnap::from(&t.to),
            transition: p.transition as u32,
            durable_offset: durable,
            undo: self.undo.plan.as_ref().map(|(p, _)| absolute_display(p)),
        });
        self.save(target)?;
        self.position.started = true;
        Ok(())
    }

    /// Grows the target for the transition that starts now (a shrink waits for its end, so
    /// an undo stream can save the tail first).
    pub(crate) fn begin_transition(&mut self, target: &mut dyn Target) -> Result<(), ReceiveError> {
        if !self.applying() {
            return Ok(());
        }
        let Some(t) = self.header.transitions.get(self.position.transition) else {
            return Ok(());
        };
        if t.virtual_size > target.size() {
            self.mark_started(target)?;
            target.set_size(t.virtual_size)?;
            if let Some(k) = &mut self.kept {
                k.set_size(t.virtual_size)?;
            }
            self.state.virtual_size = t.virtual_size;
            self.save(target)?;
        }
        Ok(())
    }

    /// Holds a range back until a checkpoint or snapshot-end record vouches for it: a record
    /// that is well formed but out of place (inserted, repeated) never reaches the target.
    fn hold(&mut self, range: Range) {
        let skipped = match &range {
            Range::Data { .. } => false,
            _ => self.position.skip_zeroing && self.position.transition == 0,
        };
        if self.applying() && !skipped {
            self.batch.unverified.push(range);
        } else if let Range::Data { bytes, .. } = range {
            let _ = self.spare.send(bytes);
        }
    }

    /// Every range so far is verified: apply them (with an undo stream, in batches whose
    /// pre-images are saved first), and every [`Durability::checkpoint_bytes`] sync the target
    /// and record the durable offset. At the end of a transition everything is applied.
    fn verified(&mut self, target: &mut dyn Target, end: bool) -> Result<(), ReceiveError> {
        if !self.applying() {
            self.batch.unverified.clear();
            return Ok(());
        }
        let b = &mut self.batch;
        for r in b.unverified.drain(..) {
            if let Range::Data { bytes, .. } = &r {
                b.pending_bytes += bytes.len() as u64;
            }
            b.pending.push(r);
        }
        let batch_full = b.pending_bytes >= UNDO_BATCH_BYTES.min(self.durability.checkpoint_bytes)
            || b.pending.len() >= UNDO_BATCH_RECORDS;
        if self.undo.plan.is_none() || end || batch_full {
            self.flush_pending(target)?;
        }
        let d = &self.durability;
        if end || !self.position.started || !self.batch.pending.is_empty() {
            return Ok(());
        }
        if d.since_checkpoint < d.checkpoint_bytes {
            return Ok(());
        }
        self.wait_writes()?;
        target.flush()?;
        self.settle_kept(target)?;
        if let Some(p) = &mut self.state.in_progress {
            p.durable_offset = self.durability.applied_end;
        }
        self.durability.since_checkpoint = 0;
        self.save(target)
    }

    /// Writes the verified ranges gathered; with an undo stream, their pre-images are saved
    /// and synced first.
    fn flush_pending(&mut self, target: &mut dyn Target) -> Result<(), ReceiveError> {
        if self.batch.pending.is_empty() {
            return Ok(());
        }
        self.mark_started(target)?;
        if let Some(undo) = &mut self.undo.writer {
            let reader = target.reader().ok_or_else(unreadable)?;
            for r in &self.batch.pending {
                let (off, len) = r.span();
                undo.save(&reader, off, len)?;
            }
            undo.sync()?;
        }
        let mut pending = std::mem::take(&mut self.batch.pending);
        for r in pending.drain(..) {
            let (off, len) = r.span();
            self.write(r, target)?;
            self.durability.applied_end = off + len;
            self.durability.since_checkpoint = self.durability.since_checkpoint.saturating_add(len);
        }
        // The allocation is kept for the next batch.
        self.batch.pending = pending;
        self.batch.pending_bytes = 0;
        Ok(())
    }

    /// Writes one verified range (data through the writer threads when there are some) and
    /// notes it in the kept hashes.
    fn write(&mut self, range: Range, target: &mut dyn Target) -> Result<(), ReceiveError> {
        let (off, len) = range.span();
        match range {
            Range::Data { bytes, cvs, .. } => {
                if let Some(k) = &mut self.kept {
                    k.wrote_hashed(off, &bytes, cvs.as_deref());
                }
                let placed = match &self.writers {
                    Some(_) => target.place(off, len)?,
                    None => None,
                };
                match (&self.writers, placed) {
                    (Some(w), Some(at)) => w.write(bytes, at)?,
                    _ => {
                        if target.shares_clusters() {
                            self.wait_writes()?;
                        }
                        target.write_at(&bytes, off)?;
                        // The decoder reads a later record into this buffer.
                        let _ = self.spare.send(bytes);
                    }
                }
                self.summary.data_records += 1;
                self.summary.data_bytes += len;
            }
            Range::Zero { .. } | Range::Discard { .. } => {
                if target.shares_clusters() {
                    self.wait_writes()?;
                }
                self.settle_page_edges(off, len)?;
                if matches!(range, Range::Zero { .. }) {
                    target.write_zeroes(off, len)?;
                } else {
                    target.discard(off, len)?;
                }
                if let Some(k) = &mut self.kept {
                    k.zeroed(off, len);
                }
                self.summary.zero_bytes = self.summary.zero_bytes.saturating_add(len);
            }
        }
        Ok(())
    }

    /// The current transition's `to` state is complete: shrink if it shrank (saving the tail
    /// first), make it durable (data, then kept hashes), check its digest when the stream
    /// gives one, then record it.
    fn reached(&mut self, end: &SnapshotEnd, target: &mut dyn Target) -> Result<(), ReceiveError> {
        self.wait_writes()?;
        let size = end.virtual_size;
        if target.size() > size {
            self.mark_started(target)?;
            if let Some(undo) = &mut self.undo.writer {
                let r = target.reader().ok_or_else(unreadable)?;
                undo.save(&r, size, target.size() - size)?;
                undo.sync()?;
            }
            target.set_size(size)?;
            if let Some(k) = &mut self.kept {
                k.set_size(size)?;
            }
        }
        target.flush()?;
        self.settle_kept(target)?;
        let digest = self.kept.as_ref().map(KeptHashes::digest).transpose()?;
        if let (Some(have), Some(want)) = (&digest, &end.digest) {
            if have != want {
                return Err(ReceiveError::Failed(format!(
                    "after the stream the replica's content digest is {}, but '{}' has {}: \
                     the replica changed while it was repaired; repair it again",
                    to_hex(have),
                    end.name,
                    to_hex(want)
                )));
            }
        }
        if let Some(undo) = self.undo.writer.take() {
            undo.finish()?;
        }
        let info = self.snapshot_info.take();
        let to = &self.header.transitions[self.position.transition].to;
        let info = info.filter(|i| i.is_for(to));
        if let Some(own) = target.keep_snapshot(end, info.as_ref())? {
            self.state.alias(&to_hex(&own), StateSnap::from(to));
        }
        self.record_reached(end, digest);
        self.durability.since_checkpoint = 0;
        self.durability.applied_end = 0;
        self.save(target)?;
        self.summary.snapshots.push(end.name.clone());
        Ok(())
    }

    /// The state of a replica that holds `end`'s snapshot, whose kept hashes give `digest`.
    fn record_reached(&mut self, end: &SnapshotEnd, digest: Option<[u8; 32]>) {
        let st = &mut self.state;
        st.source_kind = self.header.source.kind.clone();
        st.source_name = self.header.source.name.clone();
        st.in_progress = None;
        st.snapshot = Some(StateSnap {
            name: end.name.clone(),
            guid: to_hex(&end.guid),
        });
        if self.header.transitions[self.position.transition]
            .from
            .is_none()
        {
            // A full stream starts the replica's history anew (after --rewind or --overwrite,
            // what it went through before is no longer what it holds).
            st.history.clear();
        }
        st.remember(&to_hex(&end.guid));
        st.diverged = None;
        st.digest = digest.as_ref().map(|d| to_hex(d));
        st.virtual_size = end.virtual_size;
    }

    /// Brings the kept block hashes up to date with what the target holds now (every write
    /// is done and durable) and makes them durable too, before the state says so.
    fn settle_kept(&mut self, target: &dyn Target) -> Result<(), ReceiveError> {
        let Some(k) = &mut self.kept else {
            return Ok(());
        };
        let reader = target.source().ok_or_else(|| {
            ReceiveError::Failed("the target cannot be read back to hash its blocks".into())
        })?;
        k.settle(reader.as_ref())?;
        k.sync()
    }

    /// Waits for the writer threads to finish every write handed to them.
    pub(crate) fn wait_writes(&self) -> Result<(), ReceiveError> {
        self.writers.as_ref().map_or(Ok(()), Writers::wait)
    }

    /// The first error a write on the writer threads has met, if any, without waiting.
    pub(crate) fn check_writes(&self) -> Result<(), ReceiveError> {
        self.writers.as_ref().map_or(Ok(()), Writers::check)
    }

    /// Before zeroing or discarding `[off, off + len)` on this thread: when the range covers
    /// part of a page at either end, a data write of the neighbouring bytes may still be in
    /// flight on a writer thread, through that same page. Zeroing drops the range from the page
    /// cache, and such a write could bring the old bytes back (a block device does not order
    /// the two): wait for it. Ranges of whole pages share no page with any data record.
    fn settle_page_edges(&self, off: u64, len: u64) -> Result<(), ReceiveError> {
        let page = writers::page_size();
        if off % page != 0 || off.saturating_add(len) % page != 0 {
            self.wait_writes()?;
        }
        Ok(())
    }

    /// Records the state, with the replica's identity as it is after the writes so far.
    fn save(&mut self, target: &dyn Target) -> Result<(), ReceiveError> {
        let Some(path) = self.state_path else {
            return Ok(());
        };
        self.state.identity = target.identity();
        self.state.updated_unix = state::now_unix();
        state::save(path, &self.state)
    }
}

/// An undo stream needs the target's old contents.
fn unreadable() -> ReceiveError {
    ReceiveError::Failed(
        "the target cannot be read back, so --undo cannot save its old contents".into(),
    )
}
