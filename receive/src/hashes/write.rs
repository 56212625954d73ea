//! Writing entries: settling the gathered updates (re-hashing partly written blocks from the
//! disk, zero runs as holes) and rebuilding every entry from the disk.

use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use blkdelta_common::buf::AlignedBuf;
use blkdelta_common::image::BlockSource;

use super::pending::Piece;
use super::pieces::{self, Cvs, PIECES, PIECE_BYTES};

use super::*;

impl KeptHashes {
    /// Rewrites every entry by reading `disk` whole (at least [`size`](Self::size) bytes),
    /// with `threads` workers, in bounded batches: for a replica whose content is unknown.
    /// Updates not yet settled are dropped, since the disk's content supersedes them.
    pub fn rebuild(&mut self, disk: &dyn BlockSource, threads: usize) -> Result<(), ReceiveError> {
        if disk.size() < self.size {
            return Err(self.err(format!(
                "the disk holds {} bytes, the hashes describe {}",
                disk.size(),
                self.size
            )));
        }
        self.pending.clear();
        let blocks = block_count(self.size);
        let mut first = 0;
        while first < blocks {
            let count = (blocks - first).min(REBUILD_BATCH_BLOCKS);
            let hashed = self.hash_blocks(disk, first, count, threads.max(1))?;
            let mut bytes = Vec::with_capacity((count * ENTRY_BYTES) as usize);
            for (i, (hash, cvs)) in hashed.iter().enumerate() {
                let block = first + i as u64;
                bytes.extend_from_slice(&self.entry_of(block, hash));
                self.write_cvs(block, cvs)?;
            }
            self.write_entries(first, &bytes)?;
            first += count;
        }
        Ok(())
    }

    /// Hashes `count` blocks from `first` with `threads` workers.
    pub(super) fn hash_blocks(
        &self,
        disk: &dyn BlockSource,
        first: u64,
        count: u64,
        threads: usize,
    ) -> Result<Vec<([u8; 32], Cvs)>, ReceiveError> {
        let out = Mutex::new(vec![([0u8; 32], *pieces::zero_cvs()); count as usize]);
        let next = AtomicUsize::new(0);
        let failure = Mutex::new(None);
        std::thread::scope(|s| {
            for _ in 0..threads.min(count as usize) {
                s.spawn(|| {
                    let mut buf = AlignedBuf::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count as usize || failure.lock().expect("not poisoned").is_some() {
                            break;
                        }
                        match self.read_block_hash(disk, first + i as u64, &mut buf) {
                            Ok(h) => out.lock().expect("not poisoned")[i] = h,
                            Err(e) => *failure.lock().expect("not poisoned") = Some(e),
                        }
                    }
                });
            }
        });
        match failure.into_inner().expect("not poisoned") {
            Some(e) => Err(e),
            None => Ok(out.into_inner().expect("not poisoned")),
        }
    }

    /// The hash of `block` as read from `disk` (its allocated parts only), and its pieces'
    /// chaining values (those of zeros for the short last block, which has none of use).
    pub(super) fn read_block_hash(
        &self,
        disk: &dyn BlockSource,
        block: u64,
        buf: &mut AlignedBuf,
    ) -> Result<([u8; 32], Cvs), ReceiveError> {
        let (offset, len) = (block * BLOCK_BYTES, self.block_len(block));
        buf.set_len(len as usize);
        pieces::read_range(disk, offset, buf)
            .map_err(|e| self.err(format!("cannot re-hash block {block}: {}", error_chain(&e))))?;
        if len < BLOCK_BYTES {
            return Ok((*blake3::hash(buf).as_bytes(), *pieces::zero_cvs()));
        }
        let cvs = pieces::block_cvs(buf);
        Ok((pieces::block_root(&cvs), cvs))
    }

    /// The entry and pieces of a block some of whose pieces changed: the others' values from
    /// the pieces file, pieces written in part read back from `disk`.
    fn merge_pieces(
        &self,
        disk: &dyn BlockSource,
        block: u64,
        changed: &[Piece; PIECES],
        buf: &mut AlignedBuf,
    ) -> Result<([u8; 32], Cvs), ReceiveError> {
        let mut cvs = if changed.contains(&Piece::Keep) {
            self.read_cvs(block)?
        } else {
            *pieces::zero_cvs()
        };
        for (i, p) in changed.iter().enumerate() {
            cvs[i] = match p {
                Piece::Keep => cvs[i],
                Piece::Cv(cv) => *cv,
                Piece::Zero => pieces::zero_cvs()[i],
                Piece::Reread => {
                    buf.set_len(PIECE_BYTES as usize);
                    let at = block * BLOCK_BYTES + i as u64 * PIECE_BYTES;
                    pieces::read_range(disk, at, buf).map_err(|e| {
                        self.err(format!("cannot re-hash block {block}: {}", error_chain(&e)))
                    })?;
                    pieces::piece_cv(i, buf)
                }
            };
        }
        Ok((pieces::block_root(&cvs), cvs))
    }

    fn read_cvs(&self, block: u64) -> Result<Cvs, ReceiveError> {
        let p = self
            .pieces
            .as_ref()
            .ok_or_else(|| self.err("opened read-only".into()))?;
        p.read(block)
            .map_err(|e| self.err(format!("cannot read the pieces of block {block}: {e}")))
    }

    fn write_cvs(&self, block: u64, cvs: &Cvs) -> Result<(), ReceiveError> {
        let p = self
            .pieces
            .as_ref()
            .ok_or_else(|| self.err("opened read-only".into()))?;
        p.write(block, cvs)
            .map_err(|e| self.err(format!("cannot write the pieces of block {block}: {e}")))
    }

    /// Works out the entries of the blocks only partly covered since the last settle. The
    /// one step that reads the disk.
    pub(super) fn rehash_partial_blocks(
        &mut self,
        disk: &dyn BlockSource,
    ) -> Result<(), ReceiveError> {
        let mut buf = std::mem::take(&mut self.buf);
        let mut pending = std::mem::take(&mut self.pending.blocks);
        let mut result = Ok(());
        for (&block, change) in pending.iter_mut() {
            let worked_out = match change {
                Change::Entry(..) => continue,
                Change::Rehash => self.read_block_hash(disk, block, &mut buf),
                Change::Pieces(p) => self.merge_pieces(disk, block, p, &mut buf),
            };
            match worked_out {
                Ok((hash, cvs)) => {
                    *change = Change::Entry(self.entry_of(block, &hash), Box::new(cvs))
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.pending.blocks = pending;
        self.buf = buf;
        result
    }

    /// Writes the single-block entries, consecutive blocks in one write.
    pub(super) fn write_block_entries(&self) -> Result<(), ReceiveError> {
        let max_bytes = (ENTRIES_PER_IO * ENTRY_BYTES) as usize;
        let mut run = Vec::with_capacity(max_bytes.min(self.pending.blocks.len() * 32));
        let mut run_first = 0;
        for (&block, change) in &self.pending.blocks {
            let Change::Entry(entry, cvs) = change else {
                unreachable!("every block re-hashed before its entry is written");
            };
            self.write_cvs(block, cvs)?;
            let run_end = run_first + (run.len() as u64) / ENTRY_BYTES;
            if !run.is_empty() && (block != run_end || run.len() >= max_bytes) {
                self.write_entries(run_first, &run)?;
                run.clear();
            }
            if run.is_empty() {
                run_first = block;
            }
            run.extend_from_slice(entry);
        }
        if !run.is_empty() {
            self.write_entries(run_first, &run)?;
        }
        Ok(())
    }

    /// Sets the zero runs' entries: a hole punched for a long run, zeros written otherwise
    /// (and where the filesystem punches no holes).
    pub(super) fn write_zero_runs(&self) -> Result<(), ReceiveError> {
        for (&first, &end) in &self.pending.zero_runs {
            if let Some(p) = &self.pieces {
                p.zero_run(first, end)
                    .map_err(|e| self.err(format!("cannot zero pieces from block {first}: {e}")))?;
            }
            let (start, len) = (entry_offset(first), (end - first) * ENTRY_BYTES);
            if len >= PUNCH_MIN_BYTES && self.punch_hole(start, len)? {
                continue;
            }
            let zeros = vec![0u8; (len.min(ENTRIES_PER_IO * ENTRY_BYTES)) as usize];
            let mut block = first;
            while block < end {
                let count = (end - block).min(ENTRIES_PER_IO);
                self.write_entries(block, &zeros[..(count * ENTRY_BYTES) as usize])?;
                block += count;
            }
        }
        Ok(())
    }

    /// Punches `[start, start + len)` out of the file; `false` where the filesystem cannot.
    pub(super) fn punch_hole(&self, start: u64, len: u64) -> Result<bool, ReceiveError> {
        use rustix::fs::FallocateFlags;
        use rustix::io::Errno;
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        match rustix::fs::fallocate(&self.file, flags, start, len) {
            Ok(()) => Ok(true),
            Err(Errno::OPNOTSUPP | Errno::NOSYS | Errno::INVAL | Errno::NODEV) => Ok(false),
            Err(e) => Err(self.err(format!("cannot punch entries at {start} (+{len}): {e}"))),
        }
    }

    pub(super) fn write_entries(&self, first: u64, bytes: &[u8]) -> Result<(), ReceiveError> {
        self.file
            .write_all_at(bytes, entry_offset(first))
            .map_err(|e| self.err(format!("cannot write entries from block {first}: {e}")))
    }
}
