//! The refcounts of an image being written, in two generations: what the file holds (the
//! *durable* generation, which the header names) and what the next commit will hold (the *new*
//! generation, kept here in memory). Refcount blocks are never changed in place: a block that
//! changes is written to a cluster that is free in both generations, the refcount table is
//! written anew, and the header switches to them in one write (see [`super::Qcow2Writer`]).
//!
//! ```text
//! cluster c ──► block c / per_block ──► entry c % per_block (refcount_bits wide, big endian,
//!                                       sub-byte widths packed LSB first)
//! ```

use std::collections::{HashMap, HashSet};
use std::fs::File;

use super::io::{read_at, write_at};
use crate::image::qcow2::bytes::be_u64;
use crate::image::qcow2::Header;
use crate::ImageError;

/// Bits 9-63 of a refcount table entry: the offset of the refcount block.
const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;

/// A refcount block as the new generation has it.
struct Block {
    data: Vec<u8>,
    /// Changed since the last commit: it goes to a new cluster.
    dirty: bool,
}

/// Refcounts of both generations (see the module documentation).
pub(crate) struct Refcounts {
    cluster_bits: u32,
    /// log2 of the width of one refcount in bits (0..=6).
    order: u32,
    /// Refcounts in one block.
    per_block: u64,
    /// Block offsets of the durable generation, by block index (0: no block).
    table: Vec<u64>,
    /// Where the durable refcount table is, and its clusters.
    pub(crate) table_offset: u64,
    pub(crate) table_clusters: u64,
    /// Blocks read or changed, by index (the new generation's contents).
    blocks: HashMap<u64, Block>,
    /// Clusters in use in the durable generation and free in the new one: they may not be
    /// reused before the commit, and are discarded after it.
    busy: HashSet<u64>,
    /// Clusters allocated since the last commit (free in the durable generation): written
    /// in place until the commit, and reusable at once when freed again.
    fresh: HashSet<u64>,
    /// The table written by [`Refcounts::write_new`], waiting for the header to name it.
    pending: Option<(Vec<u64>, u64, u64)>,
    /// No cluster below this one is free (allocation scans from here).
    cursor: u64,
    /// The first cluster past every cluster in use (the file's end, in clusters).
    end: u64,
}

impl Refcounts {
    /// Reads the refcount table named by `header` (the blocks are read as they are needed).
    pub(crate) fn open(file: &File, header: &Header, file_len: u64) -> Result<Self, ImageError> {
        let cs = header.cluster_size();
        let clusters = u64::from(header.refcount_table_clusters);
        let raw = read_at(
            file,
            "refcount table",
            header.refcount_table_offset,
            clusters * cs,
            file_len,
        )?;
        let table: Vec<u64> = raw
            .chunks_exact(8)
            .map(|b| be_u64(b, 0) & REFT_OFFSET_MASK)
            .collect();
        for (i, &off) in table.iter().enumerate() {
            if off & (cs - 1) != 0 || off.checked_add(cs).is_none_or(|e| e > file_len) {
                return Err(ImageError::Unwritable(format!(
                    "refcount table entry {i} points to {off:#x}, not a cluster inside the file"
                )));
            }
        }
        let order = header.refcount_order;
        Ok(Refcounts {
            cluster_bits: header.cluster_bits,
            order,
            per_block: (cs * 8) >> order,
            table,
            table_offset: header.refcount_table_offset,
            table_clusters: clusters,
            blocks: HashMap::new(),
            busy: HashSet::new(),
            fresh: HashSet::new(),
            pending: None,
            cursor: 0,
            end: file_len.div_ceil(cs),
        })
    }

    fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The largest refcount an entry holds.
    fn max(&self) -> u64 {
        match self.order {
            6 => u64::MAX,
            o => (1u64 << (1 << o)) - 1,
        }
    }

    /// The block holding cluster `c`'s refcount, read on first use (zeros where the table has
    /// no block).
    fn block(&mut self, file: &File, index: u64) -> Result<&mut Block, ImageError> {
        if !self.blocks.contains_key(&index) {
            let cs = self.cluster_size();
            let off = self.table.get(index as usize).copied().unwrap_or(0);
            let data = if off == 0 {
                vec![0u8; cs as usize]
            } else {
                read_at(file, "refcount block", off, cs, u64::MAX)?
            };
            self.blocks.insert(index, Block { data, dirty: false });
        }
        Ok(self.blocks.get_mut(&index).expect("inserted above"))
    }

    /// The new generation's refcount of cluster `c`.
    pub(crate) fn get(&mut self, file: &File, c: u64) -> Result<u64, ImageError> {
        let (order, per_block) = (self.order, self.per_block);
        let b = self.block(file, c / per_block)?;
        Ok(entry(&b.data, order, c % per_block))
    }

    /// Sets the new generation's refcount of cluster `c`.
    fn set(&mut self, file: &File, c: u64, value: u64) -> Result<(), ImageError> {
        if value > self.max() {
            return Err(ImageError::Unwritable(format!(
                "cluster {c} would be used {value} times, more than {}-bit refcounts hold",
                1u32 << self.order
            )));
        }
        let (order, per_block) = (self.order, self.per_block);
        let b = self.block(file, c / per_block)?;
        set_entry(&mut b.data, order, c % per_block, value);
        b.dirty = true;
        Ok(())
    }

    /// Adds one use of cluster `c` (a use by a snapshot taken now, a table copied).
    pub(crate) fn increment(&mut self, file: &File, c: u64) -> Result<(), ImageError> {
        let v = self.get(file, c)?;
        self.set(file, c, v + 1)
    }

    /// Drops one use of cluster `c`; one that is no longer used becomes free (at once if it
    /// was allocated since the last commit, after the commit otherwise).
    pub(crate) fn decrement(&mut self, file: &File, c: u64) -> Result<(), ImageError> {
        let v = self.get(file, c)?;
        if v == 0 {
            return Err(ImageError::Unwritable(format!(
                "cluster {c} ({:#x}) is freed more often than it is used",
                c << self.cluster_bits
            )));
        }
        self.set(file, c, v - 1)?;
        if v == 1 {
            if self.fresh.remove(&c) {
                self.cursor = self.cursor.min(c);
            } else {
                self.busy.insert(c);
            }
        }
        Ok(())
    }

    /// Lowers the refcount of a leaked cluster `c` to its real uses `uses` (a crash of
    /// another writer left it higher); one no longer used becomes free after the commit.
    pub(crate) fn repair_leak(&mut self, file: &File, c: u64, uses: u64) -> Result<(), ImageError> {
        self.set(file, c, uses)?;
        if uses == 0 {
            self.busy.insert(c);
        }
        Ok(())
    }

    /// Whether any refcount changed since the last commit.
    pub(crate) fn changed(&self) -> bool {
        self.blocks.values().any(|b| b.dirty)
    }

    /// Whether cluster `c` was allocated since the last commit (nothing durable refers to it,
    /// so it may be written in place).
    pub(crate) fn is_fresh(&self, c: u64) -> bool {
        self.fresh.contains(&c)
    }

    /// Allocates up to `max` contiguous free clusters (at least one), each with refcount 1;
    /// returns the first and how many.
    pub(crate) fn allocate(&mut self, file: &File, max: u64) -> Result<(u64, u64), ImageError> {
        let mut c = self.cursor;
        loop {
            if c >= self.end {
                break;
            }
            if self.get(file, c)? == 0 && !self.busy.contains(&c) {
                break;
            }
            c += 1;
        }
        let mut n = 1;
        while n < max {
            let next = c + n;
            if next < self.end && (self.get(file, next)? != 0 || self.busy.contains(&next)) {
                break;
            }
            n += 1;
        }
        for i in c..c + n {
            self.set(file, i, 1)?;
            self.fresh.insert(i);
        }
        self.cursor = c + n;
        self.end = self.end.max(c + n);
        Ok((c, n))
    }

    /// Allocates exactly `n` contiguous clusters (a table), appending if no free run is that
    /// long below the end.
    pub(crate) fn allocate_run(&mut self, file: &File, n: u64) -> Result<u64, ImageError> {
        // Every cluster below the first free one is in use: later scans start there.
        while self.cursor < self.end
            && (self.get(file, self.cursor)? != 0 || self.busy.contains(&self.cursor))
        {
            self.cursor += 1;
        }
        let mut c = self.cursor;
        'scan: while c < self.end {
            for i in 0..n {
                let x = c + i;
                if x >= self.end {
                    break;
                }
                if self.get(file, x)? != 0 || self.busy.contains(&x) {
                    c = x + 1;
                    continue 'scan;
                }
            }
            break;
        }
        for i in c..c + n {
            self.set(file, i, 1)?;
            self.fresh.insert(i);
        }
        self.end = self.end.max(c + n);
        if c == self.cursor {
            self.cursor = c + n;
        }
        Ok(c)
    }

    /// Every block that changed goes to a new cluster and the refcount table is written anew:
    /// allocating those clusters changes refcounts in turn, so this repeats until nothing new
    /// changes. Writes them all; returns the new table's offset and clusters, which the header
    /// must name once the writes are durable (then call [`Refcounts::committed`]).
    pub(crate) fn write_new(&mut self, file: &File) -> Result<Option<(u64, u64)>, ImageError> {
        if !self.blocks.values().any(|b| b.dirty) {
            return Ok(None);
        }
        let cs = self.cluster_size();
        let mut placed: HashMap<u64, u64> = HashMap::new();
        let mut new_table = self.table.clone();
        let mut table_at: Option<(u64, u64)> = None;
        // The durable table is not used by the new generation.
        for i in 0..self.table_clusters {
            let c = (self.table_offset >> self.cluster_bits) + i;
            self.decrement(file, c)?;
        }
        loop {
            let mut changed = false;
            let mut dirty: Vec<u64> = self
                .blocks
                .iter()
                .filter(|(i, b)| b.dirty && !placed.contains_key(i))
                .map(|(i, _)| *i)
                .collect();
            dirty.sort_unstable();
            for index in dirty {
                let (c, _) = self.allocate(file, 1)?;
                placed.insert(index, c);
                let old = self.table.get(index as usize).copied().unwrap_or(0);
                if old != 0 {
                    self.decrement(file, old >> self.cluster_bits)?;
                }
                if new_table.len() <= index as usize {
                    new_table.resize(index as usize + 1, 0);
                }
                new_table[index as usize] = c << self.cluster_bits;
                changed = true;
            }
            let need = (new_table.len() as u64 * 8).div_ceil(cs).max(1);
            if table_at.is_none_or(|(_, n)| n < need) {
                if let Some((at, n)) = table_at {
                    for i in 0..n {
                        self.decrement(file, (at >> self.cluster_bits) + i)?;
                    }
                }
                // Room to grow before the next move.
                let clusters = need + need / 4;
                let at = self.allocate_run(file, clusters)? << self.cluster_bits;
                table_at = Some((at, clusters));
                changed = true;
            }
            if !changed {
                break;
            }
        }
        let (at, clusters) = table_at.expect("placed above");
        for (&index, &c) in &placed {
            let b = self.blocks.get(&index).expect("placed blocks are loaded");
            write_at(file, "refcount block", &b.data, c << self.cluster_bits)?;
        }
        let mut raw = vec![0u8; (clusters * cs) as usize];
        for (i, off) in new_table.iter().enumerate() {
            raw[i * 8..i * 8 + 8].copy_from_slice(&off.to_be_bytes());
        }
        write_at(file, "refcount table", &raw, at)?;
        self.pending = Some((new_table, at, clusters));
        Ok(Some((at, clusters)))
    }

    /// The header now names the new generation (durably): it becomes the durable one.
    /// Returns the clusters that became free, to be discarded.
    pub(crate) fn committed(&mut self) -> Vec<u64> {
        if let Some((table, at, clusters)) = self.pending.take() {
            self.table = table;
            self.table_offset = at;
            self.table_clusters = clusters;
        }
        for b in self.blocks.values_mut() {
            b.dirty = false;
        }
        // Clean blocks are read again when needed: memory stays bounded by the changes of
        // one generation.
        if self.blocks.len() > MAX_CACHED_BLOCKS {
            self.blocks.clear();
        }
        self.fresh.clear();
        let mut freed: Vec<u64> = self.busy.drain().collect();
        freed.sort_unstable();
        if let Some(&first) = freed.first() {
            self.cursor = self.cursor.min(first);
        }
        freed
    }
}

/// Clean refcount blocks kept in memory between commits at most.
const MAX_CACHED_BLOCKS: usize = 1024;

/// The refcount at `index` of a block of `2^order`-bit refcounts.
fn entry(data: &[u8], order: u32, index: u64) -> u64 {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = index * bits;
        let byte = data[(bit / 8) as usize];
        return u64::from(byte >> (bit % 8)) & ((1 << bits) - 1);
    }
    let bytes = (bits / 8) as usize;
    let at = index as usize * bytes;
    data[at..at + bytes]
        .iter()
        .fold(0u64, |v, &b| (v << 8) | u64::from(b))
}

/// Sets the refcount at `index` of a block of `2^order`-bit refcounts.
fn set_entry(data: &mut [u8], order: u32, index: u64, value: u64) {
    let bits = 1u64 << order;
    if bits < 8 {
        let bit = index * bits;
        let mask = (((1u16 << bits) - 1) << (bit % 8)) as u8;
        let b = &mut data[(bit / 8) as usize];
        *b = (*b & !mask) | (((value as u8) << (bit % 8)) & mask);
        return;
    }
    let bytes = (bits / 8) as usize;
    let at = index as usize * bytes;
    let be = value.to_be_bytes();
    data[at..at + bytes].copy_from_slice(&be[8 - bytes..]);
}
