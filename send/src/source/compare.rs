//! Content comparison: what differs between OLD and NEW, found by reading both, for images
//! that carry no change metadata at all (like bdsync or blocksync, in one pass on one machine).
//!
//! ```text
//! status walk (this thread) : OLD ─┬─ both holes ─────────────► skipped, never read
//!                           : NEW ─┼─ NEW hole, OLD data ─────► Discard (NEW zero → Zero)
//!                                  └─ NEW data ─► 1 MiB windows ─► requests ─┐
//! reader threads (2)        : pread OLD windows  ║  pread NEW windows    ◄────┘
//! this thread               : compare 64 KiB blocks, in order ─► Data extents of NEW
//! ```
//! The readers run ahead by at most [`WINDOWS_IN_FLIGHT`] windows, so memory stays bounded
//! whatever the image size. Bytes are compared directly: both images are on this machine, so
//! hashing them would only cost more. Past OLD's size, NEW is sent as it is; below NEW's size
//! nothing more is needed (the transition's virtual size shrinks the replica).

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use blkdelta_common::buf::AlignedBuf;
use blkdelta_common::extent::{Coalescer, Extent, ExtentKind, ExtentSink, Visit};
use blkdelta_common::image::{Allocation, BlockSource};
use blkdelta_common::stream::{SourceInfo, Transition};
use blkdelta_common::ImageError;

use super::util::{file_name, open_image, push_status, replay, Recorder};
use super::{identity, ChangeSource, SourceOptions};
use crate::SendError;

/// The unit of comparison: a differing block is sent whole.
pub const BLOCK_BYTES: u64 = 64 << 10;
/// The unit of reading.
pub const WINDOW_BYTES: u64 = 1 << 20;
/// Windows each reader may be ahead of the comparison.
pub const WINDOWS_IN_FLIGHT: usize = 8;
/// Ranges that need no reading, queued behind windows being read, before the walk waits.
const MAX_QUEUED: usize = 4096;

static ZEROS: [u8; BLOCK_BYTES as usize] = [0; BLOCK_BYTES as usize];

/// Opens `new` to send what differs from `old`, by content.
pub fn open(
    old: &Path,
    new: &Path,
    opts: &SourceOptions,
) -> Result<Box<dyn ChangeSource>, SendError> {
    let (old_src, _) = open_image(old, &opts.open)?;
    let (new_src, kind) = open_image(new, &opts.open)?;
    let from = opts.from_name.clone().unwrap_or_else(|| file_name(old));
    let to = opts.to_name.clone().unwrap_or_else(|| file_name(new));
    let info = SourceInfo {
        kind: kind.into(),
        name: file_name(new),
    };
    let transition = Transition {
        from: Some(identity::named(&from)),
        to: identity::state_of(&to, &[old, new]),
        virtual_size: new_src.size(),
    };
    Ok(Box::new(CompareSource::new(
        old_src, new_src, info, transition,
    )))
}

/// NEW's changes since OLD, found by reading both.
pub struct CompareSource {
    old: Arc<dyn BlockSource>,
    new: Arc<dyn BlockSource>,
    info: SourceInfo,
    transitions: Vec<Transition>,
    /// The extents of the last comparison, when it was short enough to keep.
    cache: Mutex<Option<Arc<Vec<Extent>>>>,
}

impl CompareSource {
    /// Compares `old` with `new` to produce `transition` (whose virtual size is `new`'s).
    pub fn new(
        old: Arc<dyn BlockSource>,
        new: Arc<dyn BlockSource>,
        info: SourceInfo,
        transition: Transition,
    ) -> Self {
        CompareSource {
            old,
            new,
            info,
            transitions: vec![transition],
            cache: Mutex::new(None),
        }
    }

    fn cached(&self) -> Option<Arc<Vec<Extent>>> {
        self.cache.lock().ok().and_then(|c| c.clone())
    }
}

impl ChangeSource for CompareSource {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// Compares the images; the first comparison is kept (when short enough) and replayed,
    /// since the pipeline asks once for the totals and once for the records.
    fn changes(&self, _index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        if let Some(list) = self.cached() {
            let _ = replay(&list, sink)?;
            return Ok(());
        }
        let mut rec = Recorder::new(sink);
        compare(self.old.as_ref(), self.new.as_ref(), &mut rec)?;
        if let (Some(kept), Ok(mut cache)) = (rec.into_kept(), self.cache.lock()) {
            *cache = Some(Arc::new(kept));
        }
        Ok(())
    }

    fn reader(&self, _index: usize) -> Arc<dyn BlockSource> {
        Arc::clone(&self.new)
    }
}

/// Pushes to `sink` the sorted extents of `new` that differ from `old`, within `new`'s size,
/// until the sink says stop.
pub fn compare(
    old: &dyn BlockSource,
    new: &dyn BlockSource,
    sink: &mut dyn ExtentSink,
) -> Result<(), SendError> {
    let common = old.size().min(new.size());
    let mut out = Coalescer::new(sink);
    let stopped = std::thread::scope(|s| {
        let (old_side, old_serve) = Side::pair();
        let (new_side, new_serve) = Side::pair();
        s.spawn(move || old_serve.run(old));
        s.spawn(move || new_serve.run(new));
        let mut cmp = Comparer {
            old: old_side,
            new: new_side,
            queue: VecDeque::new(),
            windows: 0,
            out: &mut out,
            stopped: false,
        };
        // Dropping `cmp` closes the channels, which stops the readers.
        walk(old, new, common, &mut cmp).and_then(|()| cmp.drain())?;
        Ok::<_, SendError>(cmp.stopped)
    })?;
    if !stopped && new.size() > common {
        let _ = push_status(new, common, new.size(), &mut out)?;
    }
    out.finish()?;
    Ok(())
}

/// A window to read: offset and length.
type Request = (u64, u64);
type Reply = Result<AlignedBuf, ImageError>;

/// The comparing thread's end of one reader's channels.
struct Side {
    requests: SyncSender<Request>,
    replies: Receiver<Reply>,
    /// Buffers handed back for reuse (fresh 1 MiB buffers cost page faults and zeroing).
    spare: SyncSender<AlignedBuf>,
}

/// A reader thread's end.
struct Serve {
    requests: Receiver<Request>,
    replies: SyncSender<Reply>,
    spare: Receiver<AlignedBuf>,
}

impl Side {
    fn pair() -> (Side, Serve) {
        let (req_tx, req_rx) = sync_channel(WINDOWS_IN_FLIGHT);
        let (rep_tx, rep_rx) = sync_channel(WINDOWS_IN_FLIGHT);
        let (spare_tx, spare_rx) = sync_channel(WINDOWS_IN_FLIGHT);
        let side = Side {
            requests: req_tx,
            replies: rep_rx,
            spare: spare_tx,
        };
        let serve = Serve {
            requests: req_rx,
            replies: rep_tx,
            spare: spare_rx,
        };
        (side, serve)
    }

    fn request(&self, offset: u64, len: u64) -> Result<(), SendError> {
        self.requests.send((offset, len)).map_err(|_| reader_gone())
    }

    fn reply(&self) -> Result<AlignedBuf, SendError> {
        Ok(self.replies.recv().map_err(|_| reader_gone())??)
    }

    /// Hands a compared buffer back to the reader (or drops it when enough are spare).
    fn give_back(&self, buf: AlignedBuf) {
        let _ = self.spare.try_send(buf);
    }
}

fn reader_gone() -> SendError {
    SendError::Source("a compare reader stopped without a result".into())
}

impl Serve {
    /// Reads each requested window in order until the comparing side hangs up.
    fn run(self, src: &dyn BlockSource) {
        for (offset, len) in self.requests.iter() {
            let read = || {
                // Aligned, so that cold windows are read around the page cache.
                let mut buf = self.spare.try_recv().unwrap_or_default();
                buf.set_len(len as usize);
                src.read_at(&mut buf, offset).map(|()| buf)
            };
            // A reader bug on a hostile image becomes this window's error, not a hang.
            let reply = catch_unwind(AssertUnwindSafe(read)).unwrap_or_else(|_| {
                Err(ImageError::Read {
                    offset,
                    len: len as usize,
                    source: std::io::Error::other("the reader failed unexpectedly"),
                })
            });
            if self.replies.send(reply).is_err() {
                return;
            }
        }
    }
}

/// Walks the allocation of both images over `[0, end)` and hands each range to `cmp`, until
/// its sink stops.
fn walk(
    old: &dyn BlockSource,
    new: &dyn BlockSource,
    end: u64,
    cmp: &mut Comparer,
) -> Result<(), SendError> {
    let (mut o, mut n) = (Cursor::new(old), Cursor::new(new));
    let mut pos = 0;
    while pos < end && !cmp.stopped {
        let (old_kind, old_end) = o.at(pos, end)?;
        let (new_kind, new_end) = n.at(pos, end)?;
        let stop = old_end.min(new_end);
        let old_data = old_kind == Allocation::Data;
        match new_kind {
            Allocation::Data => cmp.windows(pos, stop, old_data)?,
            // Both read as zeros: nothing changed, and nothing is read.
            _ if !old_data => {}
            Allocation::Hole => cmp.direct(Extent::new(pos, stop - pos, ExtentKind::Discard))?,
            Allocation::Zero => cmp.direct(Extent::new(pos, stop - pos, ExtentKind::Zero))?,
        }
        pos = stop;
    }
    Ok(())
}

/// The allocation run of an image around the walk's position, asked for once per run.
struct Cursor<'a> {
    src: &'a dyn BlockSource,
    kind: Allocation,
    start: u64,
    end: u64,
}

impl<'a> Cursor<'a> {
    fn new(src: &'a dyn BlockSource) -> Self {
        Cursor {
            src,
            kind: Allocation::Hole,
            start: 0,
            end: 0,
        }
    }

    fn at(&mut self, pos: u64, limit: u64) -> Result<(Allocation, u64), SendError> {
        if pos < self.start || pos >= self.end {
            let (kind, len) = self.src.status(pos, limit - pos)?;
            self.kind = kind;
            self.start = pos;
            self.end = pos + len.clamp(1, limit - pos);
        }
        Ok((self.kind, self.end.min(limit)))
    }
}

/// A range in walk order: either known without reading, or a window being read.
enum Pending {
    Direct(Extent),
    Window { offset: u64, old: bool },
}

/// Keeps the windows being read in order and compares them as they arrive.
struct Comparer<'a> {
    old: Side,
    new: Side,
    queue: VecDeque<Pending>,
    windows: usize,
    out: &'a mut dyn ExtentSink,
    /// The sink said stop: nothing more is read or pushed.
    stopped: bool,
}

impl Comparer<'_> {
    /// Pushes `e` unless the sink stopped.
    fn emit(&mut self, e: Extent) -> Result<(), SendError> {
        if !self.stopped {
            self.stopped = self.out.push(e)?.is_stop();
        }
        Ok(())
    }

    /// An extent known without reading, pushed in walk order.
    fn direct(&mut self, e: Extent) -> Result<(), SendError> {
        if self.queue.is_empty() {
            return self.emit(e);
        }
        self.queue.push_back(Pending::Direct(e));
        while self.queue.len() > MAX_QUEUED {
            self.pop()?;
        }
        Ok(())
    }

    /// Reads `[start, stop)` of NEW (and of OLD when it holds data there) window by window.
    fn windows(&mut self, start: u64, stop: u64, old: bool) -> Result<(), SendError> {
        let mut pos = start;
        while pos < stop && !self.stopped {
            let len = (WINDOW_BYTES - pos % WINDOW_BYTES).min(stop - pos);
            if old {
                self.old.request(pos, len)?;
            }
            self.new.request(pos, len)?;
            self.queue.push_back(Pending::Window { offset: pos, old });
            self.windows += 1;
            while self.windows >= WINDOWS_IN_FLIGHT {
                self.pop()?;
            }
            pos += len;
        }
        Ok(())
    }

    /// Handles the oldest pending range.
    fn pop(&mut self) -> Result<(), SendError> {
        match self.queue.pop_front() {
            None => Ok(()),
            Some(Pending::Direct(e)) => self.emit(e),
            Some(Pending::Window { offset, old }) => {
                self.windows -= 1;
                // Each reader answers its requests in order: these are this window's bytes.
                let old_buf = if old { Some(self.old.reply()?) } else { None };
                let new_buf = self.new.reply()?;
                if !self.stopped {
                    let visit = diff_window(offset, &new_buf, old_buf.as_deref(), self.out)?;
                    self.stopped = visit.is_stop();
                }
                self.new.give_back(new_buf);
                if let Some(buf) = old_buf {
                    self.old.give_back(buf);
                }
                Ok(())
            }
        }
    }

    fn drain(&mut self) -> Result<(), SendError> {
        while !self.queue.is_empty() && !self.stopped {
            self.pop()?;
        }
        Ok(())
    }
}

/// Pushes the blocks of a window where NEW differs from OLD (from zeros when `old` is `None`).
fn diff_window(
    offset: u64,
    new: &[u8],
    old: Option<&[u8]>,
    out: &mut dyn ExtentSink,
) -> Result<Visit, SendError> {
    let mut pos = 0usize;
    while pos < new.len() {
        let at = offset + pos as u64;
        let n = ((BLOCK_BYTES - at % BLOCK_BYTES) as usize).min(new.len() - pos);
        let block = &new[pos..pos + n];
        let differs = match old {
            Some(old) => old[pos..pos + n] != *block,
            None => block != &ZEROS[..n],
        };
        if differs
            && out
                .push(Extent::new(at, n as u64, ExtentKind::Data))?
                .is_stop()
        {
            return Ok(Visit::Stop);
        }
        pos += n;
    }
    Ok(Visit::Continue)
}

#[cfg(test)]
mod tests;
