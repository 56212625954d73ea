//! The walk behind [`super::block_runs`]: allocation runs of the source, asked for over long
//! ranges, become runs of zero blocks without any per-block work; blocks holding data are
//! hashed by worker threads and handed on in block order.
//!
//! ```text
//! this thread : status(pos, rest) ─┬─ hole/zero run of whole blocks ─► BlockRun::Zeros
//!                                  └─ data (or a hole shorter than a block) ─► jobs ─┐
//! workers (N) : block_hash (reads only the block's allocated parts)            ◄─────┘
//! this thread : replies, in block order ─► BlockRun::Block
//! ```
//! At most [`JOBS_PER_THREAD`] blocks per worker are in flight, so memory is bounded by the
//! threads (one 1 MiB buffer each), never by the disk size.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::Mutex;

use super::{block_hash, zero_block_hash, zero_hash, BlockRun, BLOCK_BYTES};
use crate::buf::AlignedBuf;
use crate::image::{Allocation, BlockSource};
use crate::ImageError;

/// Blocks queued per worker before the walk waits for the oldest.
const JOBS_PER_THREAD: usize = 4;

/// Ranges known without hashing, queued behind blocks being hashed, before the walk waits.
const MAX_QUEUED: usize = 4096;

type Reply = Result<[u8; 32], ImageError>;

/// One block to hash and where its hash goes.
struct Job {
    index: u64,
    reply: SyncSender<Reply>,
}

/// Walks `src` and hands every block's hash to `out`, in order (see the module doc).
pub(super) fn walk(
    src: &dyn BlockSource,
    threads: usize,
    out: &mut dyn FnMut(BlockRun) -> Result<(), ImageError>,
) -> Result<(), ImageError> {
    let threads = threads.max(1);
    let (job_tx, job_rx) = sync_channel::<Job>(threads);
    let job_rx = Mutex::new(job_rx);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| worker(src, &job_rx));
        }
        let mut order = InOrder {
            jobs: job_tx,
            queue: VecDeque::new(),
            in_flight: 0,
            max_in_flight: threads * JOBS_PER_THREAD,
            out,
        };
        // Returning drops `order` and with it the job queue's sender, which stops the workers.
        walk_runs(src, &mut order).and_then(|()| order.drain())
    })
}

/// Hashes blocks until the walk hangs up.
fn worker(src: &dyn BlockSource, jobs: &Mutex<Receiver<Job>>) {
    let zero_block = zero_block_hash();
    let size = src.size();
    let mut buf = AlignedBuf::new();
    loop {
        let next = jobs.lock().map(|queue| queue.recv());
        let Ok(Ok(job)) = next else {
            return;
        };
        let offset = job.index * BLOCK_BYTES;
        let len = BLOCK_BYTES.min(size - offset);
        // A reader bug on a hostile image becomes this block's error, not a hang.
        let hashed = catch_unwind(AssertUnwindSafe(|| {
            block_hash(src, offset, len, zero_block, &mut buf)
        }))
        .unwrap_or_else(|_| {
            Err(ImageError::Read {
                offset,
                len: len as usize,
                source: std::io::Error::other("the reader failed unexpectedly"),
            })
        });
        let _ = job.reply.send(hashed);
    }
}

/// Asks for allocation runs over the rest of the disk; `pos` is always at a block boundary.
fn walk_runs(src: &dyn BlockSource, order: &mut InOrder) -> Result<(), ImageError> {
    let size = src.size();
    let blocks = size.div_ceil(BLOCK_BYTES);
    let mut pos = 0;
    while pos < size {
        let (alloc, len) = src.status(pos, size - pos)?;
        let end = pos + len.clamp(1, size - pos);
        let first = pos / BLOCK_BYTES;
        if alloc != Allocation::Data {
            // Blocks wholly inside the run; one reaching the end of the disk counts whole.
            let stop = if end == size {
                blocks
            } else {
                end / BLOCK_BYTES
            };
            if stop > first {
                zero_blocks(size, first, stop, order)?;
                pos = (stop * BLOCK_BYTES).min(size);
                continue;
            }
        }
        // Data, or a hole shorter than a block: hash every block the run touches.
        let stop = end.div_ceil(BLOCK_BYTES);
        for index in first..stop {
            order.job(index)?;
        }
        pos = (stop * BLOCK_BYTES).min(size);
    }
    Ok(())
}

/// Queues blocks `[first, stop)`, all zeros; the disk's last block may be short.
fn zero_blocks(size: u64, first: u64, stop: u64, order: &mut InOrder) -> Result<(), ImageError> {
    let short_tail = stop * BLOCK_BYTES > size;
    let whole = if short_tail { stop - 1 } else { stop };
    if whole > first {
        order.ready(Pending::Zeros {
            first,
            count: whole - first,
        })?;
    }
    if short_tail {
        let hash = zero_hash(size - whole * BLOCK_BYTES);
        order.ready(Pending::Block(whole, hash))?;
    }
    Ok(())
}

/// A block run in walk order: known already, or a block being hashed.
enum Pending {
    Zeros { first: u64, count: u64 },
    Block(u64, [u8; 32]),
    Hashing(u64, Receiver<Reply>),
}

/// Keeps the blocks being hashed in order and hands runs on as they complete.
struct InOrder<'a> {
    jobs: SyncSender<Job>,
    queue: VecDeque<Pending>,
    in_flight: usize,
    max_in_flight: usize,
    out: &'a mut dyn FnMut(BlockRun) -> Result<(), ImageError>,
}

impl InOrder<'_> {
    /// A run known without hashing.
    fn ready(&mut self, p: Pending) -> Result<(), ImageError> {
        if self.queue.is_empty() {
            return self.emit(p);
        }
        self.queue.push_back(p);
        while self.queue.len() > MAX_QUEUED + self.in_flight {
            self.pop()?;
        }
        Ok(())
    }

    /// A block for the workers.
    fn job(&mut self, index: u64) -> Result<(), ImageError> {
        let (reply, rx) = sync_channel(1);
        self.jobs
            .send(Job { index, reply })
            .map_err(|_| worker_gone(index))?;
        self.queue.push_back(Pending::Hashing(index, rx));
        self.in_flight += 1;
        while self.in_flight >= self.max_in_flight {
            self.pop()?;
        }
        Ok(())
    }

    fn pop(&mut self) -> Result<(), ImageError> {
        match self.queue.pop_front() {
            Some(p) => self.emit(p),
            None => Ok(()),
        }
    }

    fn emit(&mut self, p: Pending) -> Result<(), ImageError> {
        let run = match p {
            Pending::Zeros { first, count } => BlockRun::Zeros { first, count },
            Pending::Block(index, hash) => BlockRun::Block { index, hash },
            Pending::Hashing(index, rx) => {
                self.in_flight -= 1;
                let hash = rx.recv().map_err(|_| worker_gone(index))??;
                BlockRun::Block { index, hash }
            }
        };
        (self.out)(run)
    }

    fn drain(&mut self) -> Result<(), ImageError> {
        while !self.queue.is_empty() {
            self.pop()?;
        }
        Ok(())
    }
}

fn worker_gone(index: u64) -> ImageError {
    ImageError::Read {
        offset: index * BLOCK_BYTES,
        len: BLOCK_BYTES as usize,
        source: std::io::Error::other("a hashing worker stopped without a result"),
    }
}
