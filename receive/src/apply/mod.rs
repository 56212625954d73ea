//! Applies a stream to a target: verifies every record before writing it, checkpoints the
//! durable offset as it goes, saves pre-images first when asked for an undo stream, and makes
//! each snapshot-end durable before recording it in the replica's state.
//!
//! ```text
//! decoder thread ──Step──► applier ──data──► writer threads ──► target
//!  (read, check,            (hold back until     (pwrite / O_DIRECT)
//!   decompress)              vouched for; zero,
//!                            discard, checkpoint,
//!                            snapshot-end, state)
//! ```

mod applier;
mod decode;

use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{channel, sync_channel, RecvTimeoutError};

use blkdelta_common::progress::Progress;
use blkdelta_common::stream::StreamReader;

use crate::history::load_state;
use crate::plan::{plan, Plan, TargetProbe};
pub use crate::plan::{ReceiveOptions, CHECKPOINT_BYTES};
pub use crate::state::describe;
use crate::state::{self, default_state_path, ReplicaState};
use crate::target::{
    open_target, replica_format, DryTarget, ReplicaFormat, Target, DEFAULT_CLUSTER_BITS,
};
use crate::writers::{self, Writers};
use crate::ReceiveError;
use applier::{Apply, Batch, Durability, Position, Undo};

#[cfg(test)]
mod tests;

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
    let found = TargetProbe::of(path)?;
    let is_dev = found.is_block_device;
    let state_path = state_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_state_path(path, is_dev));
    let format = replica_format(path, opts.format)?;
    if format == ReplicaFormat::Qcow2 && opts.undo.is_some() {
        return Err(ReceiveError::refused_outright(
            "a qcow2 replica keeps every snapshot it reaches, so --undo is not needed: roll it \
             back with 'qemu-img snapshot -a SNAPSHOT'",
        ));
    }
    if opts.dry_run {
        let (prior, probe) = load_state(path, &state_path)?;
        let plan = Plan {
            undo: None,
            ..plan(reader.header(), prior, &probe, opts)?
        };
        let mut target = DryTarget::new(probe.size);
        return receive(reader, &mut target, None, plan, progress);
    }
    refuse_missing_directory(path, &found)?;
    let _lock = state::lock(&state_path)?;
    let (prior, probe) = load_state(path, &state_path)?;
    let plan = plan(reader.header(), prior, &probe, opts)?;
    let bits = match opts.cluster_bits {
        0 => DEFAULT_CLUSTER_BITS,
        b => b,
    };
    let mut target = open_target(path, format, bits)?;
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
            let disk = target.source().ok_or_else(|| {
                ReceiveError::Failed("the target cannot be read back to check it".into())
            })?;
            Some(crate::kept::for_repair(
                &header,
                &plan,
                sp,
                disk.as_ref(),
                REPAIR_THREADS,
            )?)
        }
        Some(sp) => crate::kept::for_apply(&header, &plan, sp, target.size())?,
    };
    let (spare_tx, spare_rx) = channel();
    let mut run = Apply {
        header: &header,
        position: Position {
            transition: 0,
            first: plan.first,
            started: false,
            finishing: plan.finishes(&header).map(|p| p.durable_offset),
            skip_zeroing: plan.fresh && header.is_full(),
        },
        batch: Batch::default(),
        durability: Durability::new(plan.checkpoint_bytes),
        undo: Undo::new(plan.undo.clone()),
        kept,
        state,
        state_path,
        writers: None,
        spare: spare_tx,
        snapshot_info: None,
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
    let handles = writer_handles(target).filter(|_| run.undo.plan.is_none());
    let in_flight = writers::InFlight::default();
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel(DECODE_QUEUE);
        let spare_tx = run.spare.clone();
        // Not scoped: once the applier has failed, its error is reported without waiting for
        // the decoder, which may be blocked reading an input that stalls without closing (a
        // hung connection); it ends when that input moves or closes, or with the process.
        let decoder = std::thread::spawn(move || {
            let mut reader = reader;
            decode::decode(&mut reader, &tx, &spare_rx);
        });
        if let Some(handles) = handles {
            let (pool, jobs) = Writers::new(&in_flight);
            let jobs = std::sync::Arc::new(std::sync::Mutex::new(jobs));
            // Every thread has its handles before any starts: a pool is never left with a
            // queue that no thread drains.
            for (file, direct) in handles {
                let (jobs, spare, in_flight) = (jobs.clone(), spare_tx.clone(), &in_flight);
                s.spawn(move || writers::run(file, direct, &jobs, in_flight, spare));
            }
            run.writers = Some(pool);
        }
        // A panic here still stops the writer threads (they would wait for work forever and
        // the scope for them), then goes on.
        let apply_all = || -> Result<(), ReceiveError> {
            loop {
                match rx.recv_timeout(IDLE_CHECK) {
                    Ok(step) => run.step(step?, target, progress)?,
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

/// A write handle and, where the target has one, a direct (`O_DIRECT`) handle for each writer
/// thread; `None` (writes go through the target on the applier's thread) when the target
/// offers none or a handle cannot be duplicated.
fn writer_handles(target: &dyn Target) -> Option<Vec<(std::fs::File, Option<writers::Direct>)>> {
    let file = target.write_handle()?;
    let direct = target.direct_handle();
    (0..WRITER_THREADS)
        .map(|_| {
            let f = file.try_clone().ok()?;
            let d = match &direct {
                Some(d) => Some(writers::Direct::new(d.try_clone().ok()?)),
                None => None,
            };
            Some((f, d))
        })
        .collect()
}

/// A new file goes only into a directory that exists: a mistyped path is refused rather than
/// created, with its directories, as a new replica.
fn refuse_missing_directory(path: &Path, probe: &TargetProbe) -> Result<(), ReceiveError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => return Ok(()),
    };
    if probe.exists || dir.is_dir() {
        return Ok(());
    }
    Err(ReceiveError::OpenTarget {
        path: path.to_path_buf(),
        source: std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("its directory {} does not exist", dir.display()),
        ),
    })
}
