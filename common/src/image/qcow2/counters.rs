//! What the readers of one image file have read from it: a few relaxed atomic counters,
//! cheap enough to keep on in every build.

use std::sync::atomic::{AtomicU64, Ordering};

/// How much an open image has read from its file since it was opened, summed over every
/// layer and clone of the [`super::Qcow2Image`]. Each file of a backing chain counts its own
/// reads. Header, snapshot table, bitmap and L1 reads are not counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadCounts {
    /// L2 tables read from the file. A table found in a layer's L2 cache is not counted; each
    /// layer has its own cache, so two layers sharing a table may each read it once.
    pub l2_tables: u64,
    /// Reads of guest data from the file: runs of normal (sub)clusters and compressed
    /// clusters (a compressed cluster found in the layer's cache is not counted).
    pub data_reads: u64,
    /// Bytes those data reads took from the file.
    pub data_bytes: u64,
    /// Of those, the bytes read around the page cache (`O_DIRECT`): aligned runs that the
    /// page cache did not hold whole.
    pub direct_bytes: u64,
}

/// The live counters behind [`ReadCounts`], shared by every layer of an image.
#[derive(Default)]
pub(crate) struct Counters {
    l2_tables: AtomicU64,
    data_reads: AtomicU64,
    data_bytes: AtomicU64,
    direct_bytes: AtomicU64,
}

impl Counters {
    /// Counts one L2 table read from the file.
    pub(crate) fn l2_table(&self) {
        self.l2_tables.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts one read of `bytes` bytes of guest data from the file, made around the page
    /// cache when `direct`.
    pub(crate) fn data_read(&self, bytes: u64, direct: bool) {
        self.data_reads.fetch_add(1, Ordering::Relaxed);
        self.data_bytes.fetch_add(bytes, Ordering::Relaxed);
        if direct {
            self.direct_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    /// The counts so far.
    pub(crate) fn get(&self) -> ReadCounts {
        ReadCounts {
            l2_tables: self.l2_tables.load(Ordering::Relaxed),
            data_reads: self.data_reads.load(Ordering::Relaxed),
            data_bytes: self.data_bytes.load(Ordering::Relaxed),
            direct_bytes: self.direct_bytes.load(Ordering::Relaxed),
        }
    }
}
