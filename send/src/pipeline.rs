//! The send pipeline: change list → chunker → parallel read, hash and compress → framer.
//!
//! ```text
//! planner thread : source.changes() ─► chunks (≤ 1 MiB, 1 MiB-aligned) ─► jobs ─┐
//! workers (N)    : read chunk, all-zero? → zero record, else blake3, zstd when  ◄─┘
//!                  a sample shows it pays, frame check
//! this thread    : records in plan order ─► StreamWriter ─► out
//! ```
//! Order is kept by queueing, for every chunk, a one-shot receiver in plan order; the queue is
//! bounded, so memory is bounded by the chunks in flight, never by the image or delta size.
//! Chunk buffers go back to a shared pool once written, so a steady send allocates nothing.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use blkdelta_common::buf::AlignedBuf;
use blkdelta_common::extent::{Extent, ExtentKind, ExtentSink, Totals, Visit};
use blkdelta_common::image::BlockSource;
use blkdelta_common::limits::CHUNK_BYTES;
use blkdelta_common::stream::{
    encode_chunk_owned, random_id, DataFrame, SnapshotEnd, SnapshotInfo, StreamHeader,
    StreamWriter, Transition, END_FRAME_BYTES,
};
use blkdelta_common::ImageError;

use crate::{ChangeSource, Progress, SendError};

/// How to send.
#[derive(Debug, Clone)]
pub struct SendOptions {
    /// zstd level for payloads; 0 stores them plain.
    pub level: i32,
    /// Worker threads for reading, hashing and compressing (memory grows with them: about
    /// 4 MiB each).
    pub threads: usize,
}

impl Default for SendOptions {
    fn default() -> Self {
        SendOptions {
            level: 3,
            threads: std::thread::available_parallelism().map_or(2, |n| n.get().min(8)),
        }
    }
}

/// What a finished send wrote.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SendSummary {
    /// Stream bytes written.
    pub stream_bytes: u64,
    /// Data records written.
    pub data_records: u64,
    /// Plain bytes carried by data records.
    pub data_bytes: u64,
    /// Bytes covered by zero and discard records.
    pub zero_bytes: u64,
}

/// One record-to-be, in plan order.
enum Planned {
    Data(Receiver<Result<Chunk, SendError>>),
    Zero(u64, u64),
    Discard(u64, u64),
    SnapshotEnd(usize),
}

/// A worker's result for one chunk.
enum Chunk {
    Data(DataFrame),
    Zero(u64, u64),
}

struct Job {
    reader: Arc<dyn BlockSource>,
    offset: u64,
    len: u64,
    level: i32,
    reply: SyncSender<Result<Chunk, SendError>>,
}

/// Spare chunk buffers shared by the workers and the writer.
#[derive(Default)]
struct Pool(Mutex<Vec<AlignedBuf>>);

impl Pool {
    /// Most spare buffers kept: enough for every chunk in flight.
    const MAX: usize = 64;

    fn take(&self) -> AlignedBuf {
        self.0
            .lock()
            .map(|mut p| p.pop().unwrap_or_default())
            .unwrap_or_default()
    }

    fn put(&self, buf: AlignedBuf) {
        if let Ok(mut p) = self.0.lock() {
            if p.len() < Self::MAX && buf.capacity() > 0 {
                p.push(buf);
            }
        }
    }
}

/// Most extents kept, over all transitions, from the pass that counts a stream's totals, so
/// that the records are planned from them instead of finding the changes a second time (for
/// a qcow2 snapshot diff, reading every differing L2 table again). A transition whose list
/// would not fit is found again. 24 bytes each: 24 MiB at most.
pub const MAX_BUFFERED_EXTENTS: usize = 1 << 20;

/// Counts the extents pushed and keeps them while the shared budget allows.
struct Counting<'a> {
    totals: Totals,
    kept: Option<Vec<Extent>>,
    /// Extents the transitions after this one may still keep.
    budget: &'a mut usize,
}

impl ExtentSink for Counting<'_> {
    fn push(&mut self, e: Extent) -> Result<Visit, ImageError> {
        let _ = self.totals.push(e)?;
        match &mut self.kept {
            Some(kept) if *self.budget > 0 => {
                kept.push(e);
                *self.budget -= 1;
            }
            Some(kept) => {
                // Too many: this transition's changes are found again; its share goes back.
                *self.budget += kept.len();
                self.kept = None;
            }
            None => {}
        }
        Ok(Visit::Continue)
    }
}

/// Each transition's extents, when they were kept.
type Kept = Vec<Option<Vec<Extent>>>;

/// The totals of each transition and, within [`MAX_BUFFERED_EXTENTS`], its extents.
fn count_transitions(source: &dyn ChangeSource) -> Result<(Vec<Totals>, Kept), SendError> {
    let mut budget = MAX_BUFFERED_EXTENTS;
    let mut totals = Vec::new();
    let mut kept = Vec::new();
    for i in 0..source.transitions().len() {
        let mut sink = Counting {
            totals: Totals::default(),
            kept: Some(Vec::new()),
            budget: &mut budget,
        };
        source.changes(i, &mut sink)?;
        totals.push(sink.totals);
        kept.push(sink.kept);
    }
    Ok((totals, kept))
}

fn sum(per_transition: &[Totals]) -> Totals {
    let mut totals = Totals::default();
    for t in per_transition {
        totals.extents += t.extents;
        totals.data_bytes += t.data_bytes;
        totals.zero_bytes += t.zero_bytes;
    }
    totals
}

/// Computes the totals of every transition, from metadata only.
pub fn plan_totals(source: &dyn ChangeSource) -> Result<Totals, SendError> {
    Ok(sum(&plan_transitions(source)?))
}

/// The totals of each transition, from metadata only (what `send --dry-run` shows).
pub fn plan_transitions(source: &dyn ChangeSource) -> Result<Vec<Totals>, SendError> {
    (0..source.transitions().len())
        .map(|i| {
            let mut totals = Totals::default();
            source.changes(i, &mut totals)?;
            Ok(totals)
        })
        .collect()
}

/// Builds the stream header of `source` with the totals of a first metadata pass.
pub fn make_header(source: &dyn ChangeSource, totals: &Totals) -> StreamHeader {
    let transitions = source.transitions().to_vec();
    StreamHeader {
        stream_id: random_id(),
        virtual_size: transitions.last().map_or(0, |t| t.virtual_size),
        source: source.info(),
        transitions,
        total_extents: totals.extents,
        total_data_bytes: totals.data_bytes,
        total_zero_bytes: totals.zero_bytes,
        resume_offset: source.resume_offset(),
    }
}

/// Sends every transition of `source` as one stream to `out`.
pub fn send<W: Write>(
    source: &dyn ChangeSource,
    opts: &SendOptions,
    out: W,
    progress: &dyn Progress,
) -> Result<SendSummary, SendError> {
    let (per_transition, kept) = count_transitions(source)?;
    let totals = sum(&per_transition);
    let header = make_header(source, &totals);
    progress.start(totals.data_bytes + totals.zero_bytes);
    let mut writer = StreamWriter::new(out, &header)?;
    let threads = opts.threads.max(1);
    // Chunks in flight, each holding at most two 1 MiB buffers: those queued in plan order
    // (finished or not) and those a worker holds. Memory is bounded by the threads alone.
    let (plan_tx, plan_rx) = sync_channel::<Planned>(threads * 2 + 2);
    let (job_tx, job_rx) = sync_channel::<Job>(threads);
    let job_rx = Arc::new(Mutex::new(job_rx));
    let mut summary = SendSummary::default();
    let pool = Pool::default();
    let result = std::thread::scope(|s| {
        for _ in 0..threads {
            let rx = Arc::clone(&job_rx);
            let pool = &pool;
            s.spawn(move || worker(&rx, pool));
        }
        // Only the workers hold the job queue: if they all stop, the planner's sends fail
        // instead of blocking forever.
        drop(job_rx);
        let kept = &kept;
        let planner = s.spawn(move || plan(source, kept, opts.level, plan_tx, job_tx));
        let written = write_in_order(
            &plan_rx,
            source,
            &header,
            &mut writer,
            &mut summary,
            progress,
            &pool,
        );
        drop(plan_rx);
        let planned = planner
            .join()
            .unwrap_or_else(|_| Err(SendError::Source("the change planner panicked".into())));
        written.and(planned)
    });
    result?;
    summary.stream_bytes = writer.bytes_written() + END_FRAME_BYTES;
    writer.finish()?;
    progress.finish();
    Ok(summary)
}

fn worker_gone() -> SendError {
    SendError::Source("a send worker stopped without a result".into())
}

fn worker(rx: &Mutex<Receiver<Job>>, pool: &Pool) {
    loop {
        let next = rx.lock().map(|queue| queue.recv());
        let Ok(Ok(job)) = next else {
            return;
        };
        // A panic (a reader bug on a hostile image) becomes this chunk's error, so the writer
        // reports it instead of waiting for a reply that never comes.
        let result =
            catch_unwind(AssertUnwindSafe(|| encode_job(&job, pool))).unwrap_or_else(|_| {
                Err(SendError::Source(format!(
                    "reading the chunk at offset {} failed unexpectedly",
                    job.offset
                )))
            });
        let _ = job.reply.send(result);
    }
}

fn encode_job(job: &Job, pool: &Pool) -> Result<Chunk, SendError> {
    let mut buf = pool.take();
    buf.set_len(job.len as usize);
    job.reader.read_at(&mut buf, job.offset)?;
    if is_zero(&buf) {
        pool.put(buf);
        return Ok(Chunk::Zero(job.offset, job.len));
    }
    let spare = if job.level != 0 {
        pool.take()
    } else {
        AlignedBuf::new()
    };
    let (rec, left) = encode_chunk_owned(job.offset, buf, job.level, spare)?;
    pool.put(left);
    Ok(Chunk::Data(DataFrame::new(rec)))
}

/// Whether every byte of `buf` is zero (word-wide, so that it runs at memory speed).
fn is_zero(buf: &[u8]) -> bool {
    let mut chunks = buf.chunks_exact(64);
    chunks.all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

/// Walks the change lists (those kept from the totals pass, else the source's) and queues
/// one planned record per chunk or range.
fn plan(
    source: &dyn ChangeSource,
    kept: &[Option<Vec<Extent>>],
    level: i32,
    plan_tx: SyncSender<Planned>,
    job_tx: SyncSender<Job>,
) -> Result<(), SendError> {
    for index in 0..source.transitions().len() {
        let mut sink = Planner {
            reader: source.reader(index),
            level,
            plan_tx: &plan_tx,
            job_tx: &job_tx,
            stopped: false,
        };
        match kept.get(index).and_then(Option::as_ref) {
            Some(list) => replay(list, &mut sink)?,
            None => source.changes(index, &mut sink)?,
        }
        // The writer stopped (its own error is the one to report): the sink said so.
        if sink.stopped || plan_tx.send(Planned::SnapshotEnd(index)).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

/// Pushes `list` to `sink` until it says stop.
fn replay(list: &[Extent], sink: &mut dyn ExtentSink) -> Result<(), ImageError> {
    for e in list {
        if sink.push(*e)?.is_stop() {
            break;
        }
    }
    Ok(())
}

struct Planner<'a> {
    reader: Arc<dyn BlockSource>,
    level: i32,
    plan_tx: &'a SyncSender<Planned>,
    job_tx: &'a SyncSender<Job>,
    /// The writer or the workers went away: the source is told to stop.
    stopped: bool,
}

impl Planner<'_> {
    /// Queues `planned`; false when the writer went away.
    fn queue(&mut self, planned: Planned) -> bool {
        self.stopped |= self.plan_tx.send(planned).is_err();
        !self.stopped
    }

    fn visit(&self) -> Visit {
        if self.stopped {
            Visit::Stop
        } else {
            Visit::Continue
        }
    }
}

impl ExtentSink for Planner<'_> {
    fn push(&mut self, e: Extent) -> Result<Visit, ImageError> {
        match e.kind {
            ExtentKind::Zero => self.queue(Planned::Zero(e.offset, e.len)),
            ExtentKind::Discard => self.queue(Planned::Discard(e.offset, e.len)),
            ExtentKind::Data => self.queue_chunks(e),
        };
        Ok(self.visit())
    }
}

impl Planner<'_> {
    /// Queues the chunks of a data extent and their jobs; false when the writer or the
    /// workers went away.
    fn queue_chunks(&mut self, e: Extent) -> bool {
        let mut pos = e.offset;
        while pos < e.end() {
            let len = (CHUNK_BYTES - pos % CHUNK_BYTES).min(e.end() - pos);
            let (reply, rx) = sync_channel(1);
            if !self.queue(Planned::Data(rx)) {
                return false;
            }
            let job = Job {
                reader: Arc::clone(&self.reader),
                offset: pos,
                len,
                level: self.level,
                reply,
            };
            self.stopped |= self.job_tx.send(job).is_err();
            if self.stopped {
                return false;
            }
            pos += len;
        }
        true
    }
}

/// Writes planned records in order, merging adjacent zero ranges into one record.
fn write_in_order<W: Write>(
    plan_rx: &Receiver<Planned>,
    source: &dyn ChangeSource,
    header: &StreamHeader,
    writer: &mut StreamWriter<W>,
    summary: &mut SendSummary,
    progress: &dyn Progress,
    pool: &Pool,
) -> Result<(), SendError> {
    let mut zero: Option<(u64, u64)> = None;
    let flush_zero = |w: &mut StreamWriter<W>, z: &mut Option<(u64, u64)>| match z.take() {
        Some((off, len)) => w.zero(off, len),
        None => Ok(()),
    };
    for planned in plan_rx.iter() {
        let zero_range = match planned {
            Planned::Data(rx) => match rx.recv().map_err(|_| worker_gone())?? {
                Chunk::Zero(off, len) => Some((off, len)),
                Chunk::Data(frame) => {
                    flush_zero(writer, &mut zero)?;
                    writer.data_frame(&frame)?;
                    let rec = frame.into_record();
                    summary.data_records += 1;
                    summary.data_bytes += u64::from(rec.len);
                    progress.advance(u64::from(rec.len));
                    pool.put(rec.payload);
                    None
                }
            },
            Planned::Zero(off, len) => Some((off, len)),
            Planned::Discard(off, len) => {
                flush_zero(writer, &mut zero)?;
                writer.discard(off, len)?;
                summary.zero_bytes += len;
                progress.advance(len);
                None
            }
            Planned::SnapshotEnd(i) => {
                flush_zero(writer, &mut zero)?;
                let t = &header.transitions[i];
                if let Some(info) = source.snapshot_info(i) {
                    writer.snapshot_info(&checked_info(info, i, t)?)?;
                }
                // The planner queued this after the transition's changes() returned, so a
                // source that hashed every block of `to` knows its digest by now.
                writer.snapshot_end(&SnapshotEnd {
                    transition: i as u32,
                    name: t.to.name.clone(),
                    guid: t.to.guid,
                    virtual_size: t.virtual_size,
                    digest: source.to_digest(i),
                    prefix_hash: [0; 32],
                })?;
                None
            }
        };
        if let Some((off, len)) = zero_range {
            summary.zero_bytes += len;
            progress.advance(len);
            zero = match zero {
                Some((zo, zl)) if zo + zl == off => Some((zo, zl + len)),
                Some(prev) => {
                    writer.zero(prev.0, prev.1)?;
                    Some((off, len))
                }
                None => Some((off, len)),
            };
        }
    }
    flush_zero(writer, &mut zero)?;
    Ok(())
}

/// `info`, the source's for transition `index`, when it describes that transition's `to`; an
/// error otherwise (a receiver would reject the stream, or not trust the info).
fn checked_info(
    info: SnapshotInfo,
    index: usize,
    t: &Transition,
) -> Result<SnapshotInfo, SendError> {
    if info.transition as usize == index && info.disk_size == t.virtual_size && info.is_for(&t.to) {
        return Ok(info);
    }
    Err(SendError::Source(format!(
        "the snapshot info of '{}' (id {}) does not describe transition {index} to '{}'",
        info.name, info.id, t.to.name
    )))
}

#[cfg(test)]
mod tests;
