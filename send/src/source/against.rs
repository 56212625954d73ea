//! A repair: what a replica needs to become a source state, found by comparing the source's
//! block hashes with the replica's block list (`send --against BLOCKS`), like rsync's blocks.
//!
//! ```text
//! source (a full stream's state) ─► block_runs: every block's hash, in order ─┬─► digest of `to`
//! block list of the replica ───────► its hashes, in order ──────── compare ◄──┘
//!   equal ─► nothing · differs ─► Data (or Zero when the block reads as zeros)
//!   past the list's size ─► as a full stream: data, zero or discard by allocation
//! ```
//! The transition's `from` is the disk whose content digest is the list's digest, so a
//! receiver checks its replica against it; the snapshot-end carries the digest of `to`.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::{Arc, Mutex};

use blkdelta_common::blocklist::{BlockList, Hashes};
use blkdelta_common::digest::{
    block_runs, to_hex, zero_block_hash, zero_hash, BlockRun, DigestBuilder, BLOCK_BYTES,
};
use blkdelta_common::extent::{Coalescer, Extent, ExtentKind, ExtentSink, Visit};
use blkdelta_common::image::BlockSource;
use blkdelta_common::stream::{SnapRef, SnapshotInfo, SourceInfo, Transition};
use blkdelta_common::ImageError;

use super::util::{push_status, replay, Recorder};
use super::ChangeSource;
use crate::SendError;

/// The state whose content digest is `digest`: `blocks:` and 16 hex digits, and the digest's
/// first 16 bytes as GUID.
pub fn content_state(digest: &[u8; 32]) -> SnapRef {
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&digest[..16]);
    SnapRef {
        name: format!("blocks:{}", &to_hex(digest)[..16]),
        guid,
    }
}

/// Reads the block list at `path`; errors name the file.
pub fn read_list(path: &Path) -> Result<BlockList, SendError> {
    let file = File::open(path)
        .map_err(|e| SendError::Source(format!("{}: cannot open: {e}", path.display())))?;
    BlockList::read(BufReader::new(file))
        .map_err(|e| SendError::Source(format!("{}: {e}", path.display())))
}

/// The one transition of a full source, sent as a repair of the replica a block list lists.
pub struct AgainstSource {
    inner: Box<dyn ChangeSource>,
    list: BlockList,
    transitions: Vec<Transition>,
    threads: usize,
    /// The digest of `to`, once [`ChangeSource::changes`] hashed every block.
    to_digest: Mutex<Option<[u8; 32]>>,
    /// The extents of the first pass, when short enough to keep (the pipeline asks twice).
    cache: Mutex<Option<Arc<Vec<Extent>>>>,
}

impl AgainstSource {
    /// Wraps `inner`, a one-transition full source, to send what differs from `list`, hashing
    /// on `threads` workers. Refuses any other kind of source.
    pub fn new(
        inner: Box<dyn ChangeSource>,
        list: BlockList,
        threads: usize,
    ) -> Result<Self, SendError> {
        let [t] = inner.transitions() else {
            return Err(not_full());
        };
        if t.from.is_some() || inner.resume_offset() != 0 {
            return Err(not_full());
        }
        let transition = Transition {
            from: Some(content_state(&list.digest())),
            to: t.to.clone(),
            virtual_size: t.virtual_size,
        };
        Ok(AgainstSource {
            inner,
            list,
            transitions: vec![transition],
            threads: threads.max(1),
            to_digest: Mutex::new(None),
            cache: Mutex::new(None),
        })
    }
}

fn not_full() -> SendError {
    SendError::Usage(
        "--against repairs a replica from one state (IMAGE.qcow2@SNAP, IMAGE.qcow2 or a raw \
         file): not a range, --bitmap, --since, --changed-blocks or --compare"
            .into(),
    )
}

impl ChangeSource for AgainstSource {
    fn info(&self) -> SourceInfo {
        self.inner.info()
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// Hashes every block of `to` and compares; the first pass is kept (when short enough)
    /// and replayed.
    fn changes(&self, _index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        if let Some(list) = self.cache.lock().ok().and_then(|c| c.clone()) {
            let _ = replay(&list, sink)?;
            return Ok(());
        }
        let mut rec = Recorder::new(sink);
        let digest = repair(
            self.inner.reader(0).as_ref(),
            &self.list,
            self.threads,
            &mut rec,
        )?;
        if let (Some(digest), Ok(mut d)) = (digest, self.to_digest.lock()) {
            *d = Some(digest);
        }
        if let (Some(kept), Ok(mut cache)) = (rec.into_kept(), self.cache.lock()) {
            *cache = Some(Arc::new(kept));
        }
        Ok(())
    }

    fn reader(&self, index: usize) -> Arc<dyn BlockSource> {
        self.inner.reader(index)
    }

    fn to_digest(&self, _index: usize) -> Option<[u8; 32]> {
        self.to_digest.lock().ok().and_then(|d| *d)
    }

    /// A repair reaches the inner source's state: an internal snapshot's info goes with it.
    fn snapshot_info(&self, index: usize) -> Option<SnapshotInfo> {
        self.inner.snapshot_info(index)
    }
}

/// Pushes to `sink` the sorted extents that turn the disk `list` lists into `src`, and returns
/// the digest of `src`; `None` when the sink said stop before every block was hashed.
pub fn repair(
    src: &dyn BlockSource,
    list: &BlockList,
    threads: usize,
    sink: &mut dyn ExtentSink,
) -> Result<Option<[u8; 32]>, SendError> {
    let size = src.size();
    let listed = list.blocks().min(size.div_ceil(BLOCK_BYTES));
    let mut out = Coalescer::new(sink);
    let mut cmp = Comparer {
        size,
        listed,
        theirs: list.iter(),
        digest: DigestBuilder::new(size),
        out: &mut out,
        stopped: false,
    };
    let walked = block_runs(src, threads, &mut |run| cmp.run(run));
    if cmp.stopped {
        // The walk's callback can end it only with an error: this one is the stop.
        return Ok(None);
    }
    walked?;
    let digest = cmp.digest.finish();
    // Past the list's last block, the source grew: send it as a full stream would.
    let _ = push_status(src, (listed * BLOCK_BYTES).min(size), size, &mut out)?;
    out.finish()?;
    Ok(Some(digest))
}

/// Compares the source's block hashes, in order, with the list's.
struct Comparer<'a> {
    size: u64,
    /// Blocks the list and the source both have.
    listed: u64,
    theirs: Hashes<'a>,
    digest: DigestBuilder,
    out: &'a mut dyn ExtentSink,
    /// The sink said stop.
    stopped: bool,
}

impl Comparer<'_> {
    fn run(&mut self, run: BlockRun) -> Result<(), ImageError> {
        match run {
            BlockRun::Block { index, hash } => {
                self.digest.push(&hash);
                self.block(index, &hash)
            }
            BlockRun::Zeros { first, count } => {
                self.digest.push_zero_blocks(count);
                let stop = (first + count).min(self.listed);
                (first..stop).try_for_each(|i| self.block(i, zero_block_hash()))
            }
        }
    }

    fn block(&mut self, index: u64, ours: &[u8; 32]) -> Result<(), ImageError> {
        if index >= self.listed {
            return Ok(());
        }
        let theirs = self.theirs.next();
        if theirs.as_ref() == Some(ours) {
            return Ok(());
        }
        let offset = index * BLOCK_BYTES;
        let len = BLOCK_BYTES.min(self.size - offset);
        let zeros = if len == BLOCK_BYTES {
            ours == zero_block_hash()
        } else {
            *ours == zero_hash(len)
        };
        let kind = if zeros {
            ExtentKind::Zero
        } else {
            ExtentKind::Data
        };
        match self.out.push(Extent::new(offset, len, kind))? {
            Visit::Continue => Ok(()),
            Visit::Stop => {
                self.stopped = true;
                // `block_runs` speaks ImageError only: end the walk with the one error that
                // means "stopped"; `repair` turns it back into a stop.
                Err(ImageError::Cancelled)
            }
        }
    }
}

#[cfg(test)]
mod tests;
