//! Noting what the apply changed: the writes and zeroings gathered until the next settle.

use super::pending::{Change, Piece};
use super::pieces::{self, Cvs, PIECES, PIECE_BYTES};
use super::*;

impl KeptHashes {
    /// `data` was written at `offset`. Every 64 KiB piece it covers takes its chaining value
    /// from these bytes; a piece covered in part is read back at the next settle (64 KiB, not
    /// the block). A range past the disk's end is clipped (the target refuses such writes).
    pub fn wrote(&mut self, offset: u64, data: &[u8]) {
        self.wrote_hashed(offset, data, None);
    }

    /// Like [`KeptHashes::wrote`], with the pieces' chaining values already worked out when
    /// `data` is a whole block at a block's start (see [`hash_block_write`](super::hash_block_write)):
    /// they are taken as they are instead of hashing `data` again.
    pub fn wrote_hashed(&mut self, offset: u64, data: &[u8], cvs: Option<&Cvs>) {
        let Some((start, end)) = self.clip(offset, data.len() as u64) else {
            return;
        };
        let cvs = cvs.filter(|_| offset % BLOCK_BYTES == 0 && data.len() as u64 == BLOCK_BYTES);
        self.each_piece(start, end, |block_start, i, piece_start, piece_end| {
            let covered = piece_end - piece_start == PIECE_BYTES;
            let from = (block_start + piece_start - offset) as usize;
            let to = (block_start + piece_end - offset) as usize;
            match (covered, cvs) {
                (true, Some(cvs)) => Piece::Cv(cvs[i]),
                (true, None) => Piece::Cv(pieces::piece_cv(i, &data[from..to])),
                (false, _) => Piece::Reread,
            }
        });
    }

    /// Calls `what` for every piece `[start, end)` touches, with the block's start, the
    /// piece's index and the part of it touched (offsets within the block), and notes its
    /// answer; the short last block of the disk is re-hashed whole instead.
    fn each_piece(
        &mut self,
        start: u64,
        end: u64,
        mut what: impl FnMut(u64, usize, u64, u64) -> Piece,
    ) {
        let mut pos = start;
        while pos < end {
            let block = pos / BLOCK_BYTES;
            let block_start = block * BLOCK_BYTES;
            let stop = end.min(block_start + BLOCK_BYTES);
            if self.block_len(block) < BLOCK_BYTES {
                self.pending.blocks.insert(block, Change::Rehash);
                pos = stop;
                continue;
            }
            let change = self
                .pending
                .blocks
                .entry(block)
                .or_insert_with(|| Change::Pieces(Box::new([Piece::Keep; PIECES])));
            let (first, last) = (
                (pos - block_start) / PIECE_BYTES,
                (stop - block_start - 1) / PIECE_BYTES,
            );
            for i in first..=last {
                let piece_start = (i * PIECE_BYTES).max(pos - block_start);
                let piece_end = ((i + 1) * PIECE_BYTES).min(stop - block_start);
                change.set(
                    i as usize,
                    what(block_start, i as usize, piece_start, piece_end),
                );
            }
            pos = stop;
        }
    }

    /// `[offset, offset + len)` now reads as zeros (a zero or discard record). Whole blocks
    /// take zero entries without any read, however long the range.
    pub fn zeroed(&mut self, offset: u64, len: u64) {
        let Some((start, end)) = self.clip(offset, len) else {
            return;
        };
        let first_whole = start.div_ceil(BLOCK_BYTES);
        let end_whole = if end == self.size {
            block_count(end)
        } else {
            end / BLOCK_BYTES
        };
        if first_whole < end_whole {
            self.pending.zero_run(first_whole, end_whole);
        }
        let head_end = end.min(first_whole * BLOCK_BYTES);
        if start < head_end {
            self.zero_pieces(start, head_end);
        }
        let tail_start = start.max(end_whole * BLOCK_BYTES).max(head_end);
        if tail_start < end {
            self.zero_pieces(tail_start, end);
        }
    }

    /// Notes `[start, end)` (inside one block) as zeros, piece by piece.
    fn zero_pieces(&mut self, start: u64, end: u64) {
        self.each_piece(start, end, |_, _, piece_start, piece_end| {
            if piece_end - piece_start == PIECE_BYTES {
                Piece::Zero
            } else {
                Piece::Reread
            }
        });
    }
}
