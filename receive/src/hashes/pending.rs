//! Updates of the kept hashes gathered between two settles.

use std::collections::BTreeMap;

use super::pieces::{Cvs, PIECES};

/// What became of one 64 KiB piece of a block since the last settle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Piece {
    /// As it was.
    Keep,
    /// Written whole: its chaining value.
    Cv([u8; 32]),
    /// Zeroed whole.
    Zero,
    /// Written or zeroed in part: read back from the disk.
    Reread,
}

/// What became of a block since the last settle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Change {
    /// Some of its pieces changed.
    Pieces(Box<[Piece; PIECES]>),
    /// Its hash must be worked out from the whole block on the disk (the short last block of
    /// the disk, or one whose length changed).
    Rehash,
    /// Worked out at a settle: its entry and its pieces' chaining values.
    Entry([u8; 32], Box<Cvs>),
}

impl Change {
    /// Notes that piece `i` is now `p` (a later change wins; a whole re-hash stays one).
    pub(super) fn set(&mut self, i: usize, p: Piece) {
        if let Change::Entry(..) = self {
            *self = Change::Pieces(Box::new([Piece::Keep; PIECES]));
        }
        if let Change::Pieces(pieces) = self {
            pieces[i] = p;
        }
    }
}

/// Updates not yet in the file. Zero runs are applied first, then single blocks, which win
/// over them: zeroing drops the single-block changes it covers, so the order holds.
#[derive(Debug, Default)]
pub(super) struct Pending {
    /// Whole blocks zeroed, as merged runs: first block → end block (exclusive).
    pub(super) zero_runs: BTreeMap<u64, u64>,
    /// Blocks changed after any zero run that covers them.
    pub(super) blocks: BTreeMap<u64, Change>,
}

impl Pending {
    pub(super) fn zero_run(&mut self, first: u64, end: u64) {
        let inside: Vec<u64> = self.blocks.range(first..end).map(|(&b, _)| b).collect();
        for b in inside {
            self.blocks.remove(&b);
        }
        let (mut first, mut end) = (first, end);
        if let Some((&s, &e)) = self.zero_runs.range(..=first).next_back() {
            if e >= first {
                self.zero_runs.remove(&s);
                first = s;
                end = end.max(e);
            }
        }
        while let Some((&s, &e)) = self.zero_runs.range(first..=end).next() {
            self.zero_runs.remove(&s);
            end = end.max(e);
        }
        self.zero_runs.insert(first, end);
    }

    /// Forgets everything at or past block `blocks` (the disk shrank).
    pub(super) fn truncate(&mut self, blocks: u64) {
        self.blocks.split_off(&blocks);
        self.zero_runs.split_off(&blocks);
        if let Some((_, end)) = self.zero_runs.iter_mut().next_back() {
            *end = (*end).min(blocks);
        }
    }

    pub(super) fn clear(&mut self) {
        self.zero_runs.clear();
        self.blocks.clear();
    }
}
