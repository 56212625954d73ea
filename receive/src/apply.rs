//! Applies a stream to a target: verifies every record before writing it, checkpoints the
//! durable offset as it goes, saves pre-images first when asked for an undo stream, and makes
//! each snapshot-end durable before recording it in the replica's state.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, sync_channel, Receiver, RecvTimeoutError, Sender, SyncSender};

use blkdelta_common::buf::AlignedBuf;
use blkdelta_common::digest::to_hex;
use blkdelta_common::progress::Progress;
use blkdelta_common::stream::{Record, StreamHeader, StreamReader};
use blkdelta_common::StreamError;

use crate::hashes::KeptHashes;
use crate::plan::{plan, Plan, TargetProbe, UndoMode};
pub use crate::plan::{ReceiveOptions, CHECKPOINT_BYTES};
pub use crate::state::describe;
use crate::state::{
    self, absolute_display, default_state_path, InProgress, ReplicaState, StateSnap,
};
use crate::target::{open_target, DryTarget, Target};
use crate::undo::{undo_header, UndoWriter};
use crate::writers::{self, Writers};
use crate::ReceiveError;

#[cfg(test)]
mod tests;

/// With an undo stream, bytes of records gathered before their pre-images are saved and
/// synced together (bounds memory and the number of syncs).
const UNDO_BATCH_BYTES: u64 = 32 << 20;

/// Records decoded and verified ahead of the writes (each holds at most 1 MiB).
const DECODE_QUEUE: usize = 4;

/// How long the applier waits for a record before it looks for a failed write.
const IDLE_CHECK: std::time::Duration = std::time::Duration::from_millis(100);

/// Threads reading a replica whose content a repair must check and has no kept hashes for.
const REPAIR_THREADS: usize = 4;

/// Threads writing data records into the target.
const WRITER_THREADS: usize = 4;

/// What an apply did (or, in a dry run, would do).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReceiveSummary {
    /// Transitions read and verified but not applied (the replica was past them).
    pub skipped_transitions: usize,
    /// Data records written.
    pub data_records: u64,
    /// Plain bytes written.
    pub data_bytes: u64,
    /// Bytes zeroed or discarded (none for the holes of a full stream on a fresh target).
    pub zero_bytes: u64,
    /// Names of the snapshots reached, in order.
    pub snapshots: Vec<String>,
}

/// Receives the stream `reader` has opened into the raw file or block device at `path`: takes
/// the replica's lock, checks its state, and only then opens (or creates) the target. A dry
/// run checks the same things and reads the whole stream, touching nothing.
pub fn receive_path<R: Read + Send + 'static>(
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
    if opts.dry_run {
        let prior = state::load(&state_path)?;
        let plan = Plan {
            undo: None,
            ..plan(reader.header(), prior, &probe, opts)?
        };
        let mut target = DryTarget::new(probe.size);
        return receive(reader, &mut target, None, plan, progress);
    }
    let _lock = state::lock(&state_path)?;
    let prior = state::load(&state_path)?;
    let plan = plan(reader.header(), prior, &probe, opts)?;
    let mut target = open_target(path)?;
    receive(reader, target.as_mut(), Some(&state_path), plan, progress)
}

/// Applies the stream `reader` has opened to `target` as `plan` says, keeping the replica
/// state at `state_path` (none: a dry run). The caller holds the replica's lock.
///
/// A decoder thread reads, checks and decompresses records ahead of this one, which writes
/// them: verification and decompression overlap with the writes, through a bounded queue.
pub fn receive<R: Read + Send + 'static>(
    reader: StreamReader<R>,
    target: &mut dyn Target,
    state_path: Option<&Path>,
    plan: Plan,
    progress: &dyn Progress,
) -> Result<ReceiveSummary, ReceiveError> {
    let header = reader.header().clone();
    if let Some(prior) = plan.prior.as_ref().filter(|_| target.is_block_device()) {
        // A device is larger than the replica it holds: its size is the replica's.
        if prior.virtual_size <= target.size() {
            target.set_size(prior.virtual_size)?;
        }
    }
    let state = plan
        .prior
        .clone()
        .unwrap_or_else(|| ReplicaState::new(target.size()));
    let kept = match state_path {
        None => None,
        Some(sp) if plan.repair => {
            let mut disk = target.reader().ok_or_else(|| {
                ReceiveError::Failed("the target cannot be read back to check it".into())
            })?;
            disk.limit_size(target.size());
            Some(crate::kept::for_repair(
                &header,
                &plan,
                sp,
                &disk,
                REPAIR_THREADS,
            )?)
        }
        Some(sp) => crate::kept::for_apply(&header, &plan, sp, target.size())?,
    };
    let (spare_tx, spare_rx) = channel();
    let mut run = Apply {
        header: &header,
        spare: spare_tx,
        writers: None,
        state_path,
        skip_zeroing: plan.fresh && header.is_full(),
        first: plan.first,
        finishing: plan.finishes(&header).map(|p| p.durable_offset),
        undo_plan: plan.undo.clone(),
        checkpoint_bytes: plan.checkpoint_bytes,
        transition: 0,
        started: false,
        state,
        undo: None,
        kept,
        pending: Vec::new(),
        pending_bytes: 0,
        unverified: Vec::new(),
        since_checkpoint: 0,
        applied_end: 0,
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
    // Data goes through writer threads unless pre-images must be saved before each write.
    let handle = target.write_handle().filter(|_| run.undo_plan.is_none());
    let direct = handle.as_ref().and_then(|_| target.direct_handle());
    let write_progress = writers::Progress::default();
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel(DECODE_QUEUE);
        let spare_tx = run.spare.clone();
        // Not scoped: once the applier has failed, its error is reported without waiting for
        // the decoder, which may be blocked reading an input that stalls without closing (a
        // hung connection); it ends when that input moves or closes, or with the process.
        let decoder = std::thread::spawn(move || {
            let mut reader = reader;
            decode(&mut reader, &tx, &spare_rx);
        });
        if let Some(file) = handle {
            let (pool, jobs) = Writers::new(&write_progress);
            let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
            for _ in 0..WRITER_THREADS {
                let (file, jobs, spare) = (file.try_clone(), jobs.clone(), spare_tx.clone());
                let direct = direct
                    .as_ref()
                    .and_then(|d| d.try_clone().ok())
                    .map(writers::Direct::new);
                let progress = &write_progress;
                s.spawn(move || {
                    if let Ok(file) = file {
                        writers::run(file, direct, &jobs, progress, spare);
                    }
                });
            }
            run.writers = Some(pool);
        }
        // A panic here still stops the writer threads (they would wait for work forever and
        // the scope for them), then goes on.
        let apply_all = || -> Result<(), ReceiveError> {
            loop {
                match rx.recv_timeout(IDLE_CHECK) {
                    Ok(item) => {
                        let (item, at) = item?;
                        run.record(item, at, target, progress)?;
                    }
                    // Nothing to apply for a while (the input is slow or stalled): a write
                    // that failed meanwhile is reported now, not when the next record comes.
                    Err(RecvTimeoutError::Timeout) => run.check_writes()?,
                    Err(RecvTimeoutError::Disconnected) => return Ok(()),
                }
            }
        };
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(apply_all));
        // Stops the writer threads (after their last writes) and a decoder still reading
        // ahead (its next hand-over fails).
        let written = run.writers.take().map_or(Ok(()), Writers::finish);
        drop(rx);
        applied.unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
        written?;
        // Every record was applied: the decoder has ended (it closed the queue).
        decoder
            .join()
            .map_err(|_| ReceiveError::Failed("the stream decoder panicked".into()))
    })?;
    progress.finish();
    Ok(run.summary)
}

/// A record as the decoder hands it over: data already decompressed and verified.
enum Item {
    /// Offset, plain bytes and their (verified) blake3.
    Data(u64, AlignedBuf, [u8; 32]),
    Other(Record),
}

/// Reads, checks and decompresses records into `tx` until the end record, an error (sent as
/// the last item) or the applier going away; reuses the buffers that come back on `spare`.
fn decode<R: Read>(
    reader: &mut StreamReader<R>,
    tx: &SyncSender<Result<(Item, u64), StreamError>>,
    spare: &Receiver<AlignedBuf>,
) {
    let mut out = AlignedBuf::new();
    loop {
        while let Ok(buf) = spare.try_recv() {
            if out.capacity() == 0 {
                out = buf;
            } else {
                reader.recycle(buf);
            }
        }
        let item = match reader.next_record() {
            Ok(None) => return,
            Ok(Some(Record::Data(d))) => {
                let (offset, hash, at) = (d.offset, d.hash, reader.record_position());
                d.into_plain(at, std::mem::take(&mut out))
                    .map(|(plain, left)| {
                        out = left;
                        (Item::Data(offset, plain, hash), at)
                    })
            }
            Ok(Some(rec)) => Ok((Item::Other(rec), reader.record_position())),
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        if tx.send(item).is_err() || failed {
            return;
        }
    }
}

/// A verified record waiting to be written.
enum Pending {
    /// Offset, plain bytes and their blake3.
    Data(u64, AlignedBuf, [u8; 32]),
    Zero(u64, u64),
    Discard(u64, u64),
}

impl Pending {
    fn range(&self) -> (u64, u64) {
        match self {
            Pending::Data(off, bytes, _) => (*off, bytes.len() as u64),
            Pending::Zero(off, len) | Pending::Discard(off, len) => (*off, *len),
        }
    }
}

/// The state of one apply.
struct Apply<'a> {
    header: &'a StreamHeader,
    /// Buffers of written data go back to the decoder here.
    spare: Sender<AlignedBuf>,
    /// Writer threads for data records (none: written here, through the target).
    writers: Option<Writers<'a>>,
    state_path: Option<&'a Path>,
    skip_zeroing: bool,
    first: usize,
    /// The durable offset of the interrupted apply this one finishes (see [`Plan::finishes`]).
    finishing: Option<u64>,
    undo_plan: Option<(PathBuf, UndoMode)>,
    checkpoint_bytes: u64,
    transition: usize,
    started: bool,
    state: ReplicaState,
    undo: Option<UndoWriter>,
    /// The replica's kept block hashes, updated as records are applied (none: not kept).
    kept: Option<KeptHashes>,
    pending: Vec<Pending>,
    pending_bytes: u64,
    /// Records read since the last checkpoint or snapshot-end record, not yet vouched for.
    unverified: Vec<Pending>,
    since_checkpoint: u64,
    /// End of the last record applied in the current transition.
    applied_end: u64,
    summary: ReceiveSummary,
}

impl Apply<'_> {
    /// Whether the records of the current transition are written (not only verified).
    fn applying(&self) -> bool {
        self.transition >= self.first
    }

    /// Marks the current transition in progress (once) before its first change to the target,
    /// and opens the undo stream while the target still holds `from`.
    fn mark_started(&mut self, target: &dyn Target) -> Result<(), ReceiveError> {
        if self.started {
            return Ok(());
        }
        let t = &self.header.transitions[self.transition];
        if let Some((path, mode)) = &self.undo_plan {
            let header = undo_header(t, &self.header.source, target.size());
            self.undo = Some(match mode {
                UndoMode::Create => UndoWriter::create(path, header)?,
                UndoMode::Continue => UndoWriter::resume(path, &header)?,
                UndoMode::Restart => UndoWriter::restart(path, header)?,
            });
        }
        let durable = match self.finishing {
            Some(d) if self.transition == self.first => d,
            _ if self.transition == 0 => self.header.resume_offset,
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
            transition: self.transition as u32,
            durable_offset: durable,
            undo: self.undo_plan.as_ref().map(|(p, _)| absolute_display(p)),
        });
        self.save(target)?;
        self.started = true;
        Ok(())
    }

    /// Grows the target for the transition that starts now (a shrink waits for its end, so
    /// an undo stream can save the tail first).
    fn begin_transition(&mut self, target: &mut dyn Target) -> Result<(), ReceiveError> {
        if !self.applying() {
            return Ok(());
        }
        let Some(t) = self.header.transitions.get(self.transition) else {
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

    fn record(
        &mut self,
        item: Item,
        at: u64,
        target: &mut dyn Target,
        progress: &dyn Progress,
    ) -> Result<(), ReceiveError> {
        let rec = match item {
            Item::Data(offset, plain, hash) => {
                progress.advance(plain.len() as u64);
                return self.hold(Pending::Data(offset, plain, hash));
            }
            Item::Other(rec) => rec,
        };
        let pending = match rec {
            Record::Data(d) => {
                let (offset, hash) = (d.offset, d.hash);
                let (plain, _) = d.into_plain(at, AlignedBuf::new())?;
                progress.advance(plain.len() as u64);
                Pending::Data(offset, plain, hash)
            }
            Record::Zero { offset, len } => {
                progress.advance(len);
                Pending::Zero(offset, len)
            }
            Record::Discard { offset, len } => {
                progress.advance(len);
                Pending::Discard(offset, len)
            }
            Record::Checkpoint(_) => return self.verified(target, false),
            Record::SnapshotEnd(end) => {
                if self.applying() {
                    self.verified(target, true)?;
                    let expected = end.digest;
                    self.reached(
                        &end.name,
                        &end.guid,
                        end.virtual_size,
                        expected.as_ref(),
                        target,
                    )?;
                }
                self.unverified.clear();
                self.transition += 1;
                self.started = false;
                return self.begin_transition(target);
            }
            Record::End(_) => return Ok(()),
        };
        self.hold(pending)
    }

    /// Holds a record back until a checkpoint or snapshot-end record vouches for it: a record
    /// that is well formed but out of place (inserted, repeated) never reaches the target.
    fn hold(&mut self, pending: Pending) -> Result<(), ReceiveError> {
        let zeroing = !matches!(pending, Pending::Data(..));
        if self.applying() && !(zeroing && self.skip_zeroing && self.transition == 0) {
            self.unverified.push(pending);
        } else if let Pending::Data(_, bytes, _) = pending {
            let _ = self.spare.send(bytes);
        }
        Ok(())
    }

    /// Every record so far is verified: apply them (with an undo stream, in batches whose
    /// pre-images are saved first), and every [`ReceiveOptions::checkpoint_bytes`] sync the
    /// target and record the durable offset. At the end of a transition everything is applied.
    fn verified(&mut self, target: &mut dyn Target, end: bool) -> Result<(), ReceiveError> {
        if !self.applying() {
            self.unverified.clear();
            return Ok(());
        }
        for p in self.unverified.drain(..) {
            if let Pending::Data(_, bytes, _) = &p {
                self.pending_bytes += bytes.len() as u64;
            }
            self.pending.push(p);
        }
        let batch_full = self.pending_bytes >= UNDO_BATCH_BYTES.min(self.checkpoint_bytes)
            || self.pending.len() >= 4096;
        if self.undo_plan.is_none() || end || batch_full {
            self.flush_pending(target)?;
        }
        if end || !self.started || !self.pending.is_empty() {
            return Ok(());
        }
        if self.since_checkpoint < self.checkpoint_bytes {
            return Ok(());
        }
        self.wait_writes()?;
        target.flush()?;
        self.settle_kept(target)?;
        if let Some(p) = &mut self.state.in_progress {
            p.durable_offset = self.applied_end;
        }
        self.since_checkpoint = 0;
        self.save(target)
    }

    /// Writes the verified records gathered; with an undo stream, their pre-images are saved and
    /// synced first.
    fn flush_pending(&mut self, target: &mut dyn Target) -> Result<(), ReceiveError> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.mark_started(target)?;
        if let Some(undo) = &mut self.undo {
            let reader = target.reader().ok_or_else(unreadable)?;
            for p in &self.pending {
                let (off, len) = p.range();
                undo.save(&reader, off, len)?;
            }
            undo.sync()?;
        }
        let mut pending = std::mem::take(&mut self.pending);
        for p in pending.drain(..) {
            let (off, len) = p.range();
            match p {
                Pending::Data(off, bytes, hash) => {
                    if let Some(k) = &mut self.kept {
                        k.wrote(off, len, &hash);
                    }
                    match &self.writers {
                        Some(w) => w.write(bytes, off)?,
                        None => {
                            target.write_at(&bytes, off)?;
                            // The decoder reads a later record into this buffer.
                            let _ = self.spare.send(bytes);
                        }
                    }
                    self.summary.data_records += 1;
                    self.summary.data_bytes += len;
                }
                Pending::Zero(off, len) => {
                    self.settle_page_edges(off, len)?;
                    target.write_zeroes(off, len)?;
                    if let Some(k) = &mut self.kept {
                        k.zeroed(off, len);
                    }
                    self.summary.zero_bytes = self.summary.zero_bytes.saturating_add(len);
                }
                Pending::Discard(off, len) => {
                    self.settle_page_edges(off, len)?;
                    target.discard(off, len)?;
                    if let Some(k) = &mut self.kept {
                        k.zeroed(off, len);
                    }
                    self.summary.zero_bytes = self.summary.zero_bytes.saturating_add(len);
                }
            }
            self.applied_end = off + len;
            self.since_checkpoint = self.since_checkpoint.saturating_add(len);
        }
        // The allocation is kept for the next batch.
        self.pending = pending;
        self.pending_bytes = 0;
        Ok(())
    }

    /// The current transition's `to` state is complete: shrink if it shrank (saving the tail
    /// first), make it durable, then record it.
    fn reached(
        &mut self,
        name: &str,
        guid: &[u8; 16],
        virtual_size: u64,
        expected: Option<&[u8; 32]>,
        target: &mut dyn Target,
    ) -> Result<(), ReceiveError> {
        self.wait_writes()?;
        if target.size() > virtual_size {
            self.mark_started(target)?;
            if let Some(undo) = &mut self.undo {
                let r = target.reader().ok_or_else(unreadable)?;
                undo.save(&r, virtual_size, target.size() - virtual_size)?;
                undo.sync()?;
            }
            target.set_size(virtual_size)?;
            if let Some(k) = &mut self.kept {
                k.set_size(virtual_size)?;
            }
        }
        target.flush()?;
        self.settle_kept(target)?;
        let digest = self.kept.as_ref().map(KeptHashes::digest).transpose()?;
        if let (Some(have), Some(want)) = (&digest, expected) {
            if have != want {
                return Err(ReceiveError::Failed(format!(
                    "after the stream the replica's content digest is {}, but '{name}' has {}: \
                     the replica changed while it was repaired; repair it again",
                    to_hex(have),
                    to_hex(want)
                )));
            }
        }
        if let Some(undo) = self.undo.take() {
            undo.finish()?;
        }
        self.state.source_kind = self.header.source.kind.clone();
        self.state.source_name = self.header.source.name.clone();
        self.state.in_progress = None;
        self.state.snapshot = Some(StateSnap {
            name: name.to_string(),
            guid: to_hex(guid),
        });
        if self.header.transitions[self.transition].from.is_none() {
            // A full stream starts the replica's history anew (after --rewind or --overwrite,
            // what it went through before is no longer what it holds).
            self.state.history.clear();
        }
        self.state.remember(&to_hex(guid));
        self.state.diverged = None;
        self.state.digest = digest.as_ref().map(|d| to_hex(d));
        self.state.virtual_size = virtual_size;
        self.since_checkpoint = 0;
        self.applied_end = 0;
        self.save(target)?;
        self.summary.snapshots.push(name.to_string());
        Ok(())
    }

    /// Brings the kept block hashes up to date with what the target holds now (every write
    /// is done and durable) and makes them durable too, before the state says so.
    fn settle_kept(&mut self, target: &dyn Target) -> Result<(), ReceiveError> {
        let Some(k) = &mut self.kept else {
            return Ok(());
        };
        let reader = target.reader().ok_or_else(|| {
            ReceiveError::Failed("the target cannot be read back to hash its blocks".into())
        })?;
        k.settle(&reader)?;
        k.sync()
    }

    /// Waits for the writer threads to finish every write handed to them.
    fn wait_writes(&self) -> Result<(), ReceiveError> {
        self.writers.as_ref().map_or(Ok(()), Writers::wait)
    }

    /// The first error a write on the writer threads has met, if any, without waiting.
    fn check_writes(&self) -> Result<(), ReceiveError> {
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
