//! One view of a qcow2 disk (the active layer or a snapshot): its L1 table, cached L2 tables,
//! and the lookup from a guest offset to where its bytes are.
//!
//! ```text
//! guest offset ──► l1_index = offset / (cluster_size * l2_entries) ──► L1 entry ──► L2 table
//!              ──► l2_index = (offset >> cluster_bits) % l2_entries ──► L2 entry (+ bitmap)
//!              ──► host offset | zeros | backing file | compressed cluster
//! ```

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use super::bytes::{be_u64, check_table};
use super::tables::{
    check_l2_bitmap, classify_cluster, classify_subcluster, ClusterKind, Geometry, SubclusterKind,
    L1E_OFFSET_MASK, L2E_OFFSET_MASK,
};
use super::{ImageInner, Layer};
use crate::error::L2Problem;
use crate::image::raw::pread_exact;
use crate::image::BlockSource;
use crate::limits::MAX_L1_BYTES;
use crate::ImageError;

/// Bytes of L2 tables each layer keeps cached (at least two tables).
const L2_CACHE_BYTES: u64 = 4 << 20;

/// Most (sub)clusters one lookup merges into a run. A table of a uniform kind has up to 4M
/// of them (2 MiB clusters with extended L2), and `status` merges up to 1024 lookups: without
/// this bound one call could examine 4G entries of a table that many L1 entries share.
const MAX_LOOKUP_UNITS: u32 = 1024;

/// One L2 table: `l2_entries` entries, each a standard word and (with extended L2) a
/// subcluster bitmap word.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct L2Table {
    offset: u64,
    words: Arc<[u64]>,
    extended: bool,
}

impl L2Table {
    /// Offset of the table in the image file.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The error for entry `index`, which has `problem`.
    fn bad_entry(&self, index: usize, problem: L2Problem) -> ImageError {
        ImageError::L2Entry {
            table_offset: self.offset,
            index: index as u64,
            entry: self.entry(index).0,
            problem,
        }
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        if self.extended {
            self.words.len() / 2
        } else {
            self.words.len()
        }
    }

    /// Whether the table has no entries (never true for a table read from an image).
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// The table's 64-bit words as stored: one per entry, or two (word, bitmap) per entry
    /// with extended L2 entries.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Entry `index` as stored: (standard 64-bit word, subcluster bitmap word — 0 when the
    /// image has no extended L2 entries). Panics if `index >= len()`, like slice indexing.
    pub fn entry(&self, index: usize) -> (u64, u64) {
        if self.extended {
            (self.words[2 * index], self.words[2 * index + 1])
        } else {
            (self.words[index], 0)
        }
    }
}

/// Where a run of guest bytes is, as found by [`Qcow2Layer::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Piece {
    /// At this host offset (contiguous for the whole run).
    Host(u64),
    /// Reads as zeros.
    Zero,
    /// Not in this layer: the backing file, or zeros.
    Unallocated,
    /// Inside the compressed cluster of this L2 entry, from `in_cluster` on.
    Compressed {
        /// The L2 entry (the compressed descriptor).
        entry: u64,
        /// Offset of the run inside the cluster.
        in_cluster: u64,
    },
}

impl Piece {
    /// Whether `next`, found `len` bytes after the start of `self`, continues the same run.
    fn continued_by(self, len: u64, next: Piece) -> bool {
        match (self, next) {
            (Piece::Host(a), Piece::Host(b)) => a.checked_add(len) == Some(b),
            (Piece::Zero, Piece::Zero) | (Piece::Unallocated, Piece::Unallocated) => true,
            _ => false,
        }
    }
}

/// Recently used L2 tables and the last decompressed cluster.
#[derive(Default)]
pub(crate) struct Cache {
    /// (L2 table offset, table), most recently used last.
    pub(crate) l2: VecDeque<(u64, L2Table)>,
    /// (compressed descriptor, cluster bytes).
    pub(crate) cluster: Option<(u64, Arc<[u8]>)>,
}

/// One view of the disk: the active layer or one snapshot. Implements [`BlockSource`]; reads
/// of unallocated ranges go to the backing file when the image has one. Cheap to clone.
#[derive(Clone)]
pub struct Qcow2Layer {
    pub(crate) inner: Arc<LayerInner>,
}

pub(crate) struct LayerInner {
    pub(crate) image: Arc<ImageInner>,
    pub(crate) which: Layer,
    pub(crate) geometry: Geometry,
    pub(crate) size: u64,
    pub(crate) l1: Vec<u64>,
    pub(crate) backing: Option<Arc<dyn BlockSource>>,
    pub(crate) cache: Mutex<Cache>,
}

impl std::fmt::Debug for Qcow2Layer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Layer")
            .field("path", &self.inner.image.path)
            .field("which", &self.inner.which)
            .field("size", &self.inner.size)
            .field("geometry", &self.inner.geometry)
            .field("has_backing", &self.has_backing())
            .finish()
    }
}

/// Reads the L1 table of a layer: only the entries that cover `disk_size` (VM state beyond
/// them is not part of the disk).
pub(crate) fn read_l1(
    image: &ImageInner,
    offset: u64,
    l1_size: u32,
    disk_size: u64,
) -> Result<Vec<u64>, ImageError> {
    let bytes = u64::from(l1_size) * 8;
    if bytes > MAX_L1_BYTES {
        return Err(ImageError::TableTooLarge {
            what: "L1 table",
            offset,
            entries: l1_size.into(),
            limit_bytes: MAX_L1_BYTES,
        });
    }
    let cs = image.header.cluster_size();
    check_table("L1 table", offset, bytes, cs, image.file_len)?;
    let g = image.header.geometry();
    let entries = g.l1_entries_for(disk_size).min(u64::from(l1_size)) as usize;
    let mut raw = vec![0u8; entries * 8];
    pread_exact(&image.file, &mut raw, offset)?;
    Ok(raw.chunks_exact(8).map(|b| be_u64(b, 0)).collect())
}

impl Qcow2Layer {
    /// The image this layer belongs to.
    pub fn image(&self) -> super::Qcow2Image {
        super::Qcow2Image {
            inner: self.inner.image.clone(),
        }
    }

    /// Which layer of the image this is.
    pub fn which(&self) -> Layer {
        self.inner.which
    }

    /// The L2 geometry.
    pub fn geometry(&self) -> Geometry {
        self.inner.geometry
    }

    /// The L1 entries covering the disk range only:
    /// `min(l1_size, ceil(disk_size / (cluster_size * l2_entries)))` raw values as stored.
    pub fn l1(&self) -> &[u64] {
        &self.inner.l1
    }

    /// Whether reads of unallocated ranges go to a backing file.
    pub fn has_backing(&self) -> bool {
        self.inner.backing.is_some()
    }

    /// The backing source that unallocated ranges read from, if any.
    pub fn backing(&self) -> Option<&Arc<dyn BlockSource>> {
        self.inner.backing.as_ref()
    }

    /// Asks the kernel to start reading the L2 table an L1 entry points to, without waiting
    /// (a diff announces every table it will read, so that they load in parallel instead of
    /// one seek at a time). Best effort and bounded: one hint per table, nothing is read here.
    pub fn prefetch_l2(&self, l1_entry: u64) {
        let offset = l1_entry & L1E_OFFSET_MASK;
        let cs = self.inner.geometry.cluster_size();
        let file_len = self.inner.image.file_len;
        if offset == 0 || offset.checked_add(cs).is_none_or(|end| end > file_len) {
            return;
        }
        let _ = rustix::fs::fadvise(
            &self.inner.image.file,
            offset,
            std::num::NonZeroU64::new(cs),
            rustix::fs::Advice::WillNeed,
        );
    }

    /// Reads and validates the L2 table an L1 entry points to (an entry with offset 0 gives
    /// `Ok(None)`). Checks alignment and that the table lies inside the file before reading,
    /// and that every entry classifies (aligned host offsets, valid subcluster bitmaps).
    /// A table this layer has cached is not read again; each read from the file counts in
    /// [`super::Qcow2Image::read_counts`].
    pub fn read_l2(&self, l1_entry: u64) -> Result<Option<L2Table>, ImageError> {
        let offset = l1_entry & L1E_OFFSET_MASK;
        if offset == 0 {
            return Ok(None);
        }
        if let Some(t) = self.cached_l2(offset) {
            return Ok(Some(t));
        }
        let table = self.load_l2(offset)?;
        let mut cache = self.lock_cache();
        let max = (L2_CACHE_BYTES / self.inner.geometry.cluster_size()).max(2) as usize;
        while cache.l2.len() >= max {
            cache.l2.pop_front();
        }
        cache.l2.push_back((offset, table.clone()));
        Ok(Some(table))
    }

    pub(crate) fn lock_cache(&self) -> MutexGuard<'_, Cache> {
        // A panic while holding the lock cannot leave the cache inconsistent.
        self.inner.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cached_l2(&self, offset: u64) -> Option<L2Table> {
        let mut cache = self.lock_cache();
        let pos = cache.l2.iter().position(|(o, _)| *o == offset)?;
        let hit = cache.l2.remove(pos)?;
        cache.l2.push_back(hit.clone());
        Some(hit.1)
    }

    fn load_l2(&self, offset: u64) -> Result<L2Table, ImageError> {
        let image = &self.inner.image;
        let g = self.inner.geometry;
        let cs = g.cluster_size();
        check_table("L2 table", offset, cs, cs, image.file_len)?;
        let mut raw = vec![0u8; cs as usize];
        pread_exact(&image.file, &mut raw, offset)?;
        image.counters.l2_table();
        let words: Vec<u64> = raw
            .chunks_exact(8)
            .map(|b| u64::from_be_bytes(b.try_into().expect("8 bytes")))
            .collect();
        let words: Arc<[u64]> = words.into();
        let table = L2Table {
            offset,
            words,
            extended: g.extended_l2,
        };
        if !g.extended_l2 && standard_entries_valid(&table.words, cs) {
            return Ok(table);
        }
        // Find the first invalid entry, for the message (or check extended entries).
        for index in 0..table.len() {
            let (word, bitmap) = table.entry(index);
            let checked = classify_cluster(word, g).and_then(|kind| {
                if g.extended_l2 {
                    check_l2_bitmap(kind, bitmap)
                } else {
                    Ok(())
                }
            });
            checked.map_err(|problem| table.bad_entry(index, problem))?;
        }
        Ok(table)
    }

    /// Finds how the guest bytes at `offset` are stored, and for how many bytes (at least 1,
    /// at most `max_len`, which the caller keeps within the virtual size) the same holds.
    /// Runs stop at the end of an L2 table, except runs of unallocated L1 entries, and after
    /// [`MAX_LOOKUP_UNITS`] (sub)clusters.
    pub(crate) fn lookup(&self, offset: u64, max_len: u64) -> Result<(Piece, u64), ImageError> {
        let g = self.inner.geometry;
        let range = g.l2_range_bytes();
        let l1_index = (offset / range) as usize;
        let l1 = &self.inner.l1;
        let entry = l1.get(l1_index).copied().unwrap_or(0);
        let Some(table) = self.read_l2(entry)? else {
            // A run of unallocated L1 entries; past the end of the L1 table everything is
            // unallocated (a snapshot's L1 may be shorter than its disk).
            let mut i = l1_index + 1;
            while i < l1.len()
                && (i as u64) * range - offset < max_len
                && l1[i] & L1E_OFFSET_MASK == 0
            {
                i += 1;
            }
            let run = if i < l1.len() {
                (i as u64) * range - offset
            } else {
                max_len
            };
            return Ok((Piece::Unallocated, run.min(max_len)));
        };
        let table_end = (l1_index as u64 + 1) * range;
        let limit = max_len.min(table_end - offset);
        let (first, mut len) = self.unit_at(&table, offset)?;
        let mut units = 1;
        while len < limit && units < MAX_LOOKUP_UNITS {
            units += 1;
            let (next, n) = self.unit_at(&table, offset + len)?;
            if !first.continued_by(len, next) {
                break;
            }
            len += n;
        }
        Ok((first, len.min(limit)))
    }

    /// The piece at `offset` up to the end of its cluster (or subcluster with extended L2).
    fn unit_at(&self, table: &L2Table, offset: u64) -> Result<(Piece, u64), ImageError> {
        let g = self.inner.geometry;
        let cs = g.cluster_size();
        let index = ((offset >> g.cluster_bits) % g.l2_entries) as usize;
        let (word, bitmap) = table.entry(index);
        let in_cluster = offset & (cs - 1);
        let bad = |problem| table.bad_entry(index, problem);
        let kind = classify_cluster(word, g).map_err(bad)?;
        let whole = cs - in_cluster;
        let piece = match kind {
            ClusterKind::Compressed { .. } => Piece::Compressed {
                entry: word,
                in_cluster,
            },
            _ if g.extended_l2 => {
                return subcluster_piece(kind, bitmap, in_cluster, g).map_err(bad)
            }
            ClusterKind::Unallocated => Piece::Unallocated,
            ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc(_) => Piece::Zero,
            ClusterKind::Normal(host) => Piece::Host(host + in_cluster),
        };
        Ok((piece, whole))
    }
}

/// Whether every standard L2 entry in `words` classifies: the only way one can fail is a host
/// offset not aligned to the cluster size in an entry that is not compressed. Checked without
/// branches over the whole table (a diff of a large image loads thousands of tables).
fn standard_entries_valid(words: &[u64], cluster_size: u64) -> bool {
    let misaligned = L2E_OFFSET_MASK & (cluster_size - 1);
    let bad = words.iter().fold(0u64, |acc, &w| {
        // All ones for an entry that is not compressed, zero for one that is.
        let plain = ((w >> 62) & 1).wrapping_sub(1);
        acc | (w & misaligned & plain)
    });
    bad == 0
}

/// The piece at `in_cluster` of a cluster with extended L2 entries, up to the subcluster end.
fn subcluster_piece(
    kind: ClusterKind,
    bitmap: u64,
    in_cluster: u64,
    g: Geometry,
) -> Result<(Piece, u64), L2Problem> {
    let sc_size = g.unit_size();
    let index = (in_cluster / sc_size) as u32;
    let piece = match classify_subcluster(kind, bitmap, index)? {
        SubclusterKind::Normal => match kind {
            ClusterKind::Normal(host) | ClusterKind::ZeroAlloc(host) => {
                Piece::Host(host + in_cluster)
            }
            _ => {
                return Err(L2Problem::SubclusterBitmap {
                    bitmap,
                    kind: kind.name(),
                })
            }
        },
        SubclusterKind::ZeroAlloc | SubclusterKind::ZeroPlain => Piece::Zero,
        SubclusterKind::UnallocatedAlloc | SubclusterKind::UnallocatedPlain => Piece::Unallocated,
        // The caller handles compressed clusters before asking about subclusters.
        SubclusterKind::Compressed => {
            return Err(L2Problem::SubclusterBitmap {
                bitmap,
                kind: kind.name(),
            })
        }
    };
    Ok((piece, sc_size - in_cluster % sc_size))
}

#[cfg(test)]
mod fast_check_tests {
    use super::*;
    use crate::image::qcow2::tables::{QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED};

    #[test]
    fn standard_entries_check_agrees_with_classify() {
        let cs = 64 << 10;
        let g = Geometry {
            cluster_bits: 16,
            l2_entries: 8192,
            extended_l2: false,
        };
        let cases = [
            0,
            cs * 3,
            (cs * 3) | QCOW_OFLAG_COPIED,
            1,                                   // zero flag, unallocated
            (cs * 5) | 1,                        // zero flag, allocated
            QCOW_OFLAG_COMPRESSED | 0x1234_5678, // compressed: any low bits are a descriptor
            cs * 3 + 512,                        // misaligned
            (cs * 3 + 512) | 1,                  // misaligned zero-allocated
        ];
        for &w in &cases {
            let table = [0, cs, w, 0];
            assert_eq!(
                standard_entries_valid(&table, cs),
                classify_cluster(w, g).is_ok(),
                "entry {w:#x}"
            );
        }
    }
}
