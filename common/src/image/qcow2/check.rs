//! A refcount consistency check, as `qemu-img check` makes it (QEMU's
//! `qcow2_check_refcounts`), for a writer to run before it writes: every host cluster the
//! metadata uses is counted, the counts are compared with the stored refcounts, and the
//! COPIED flags of the active tables with the refcounts they summarize.
//!
//! ```text
//! computed[c] = references the metadata makes to host cluster c:
//!   header, active L1, each L2 table +1 per L1 entry naming it (active and snapshot L1s),
//!   each data cluster +1 per L2 entry naming it, through every reference to its L2 table,
//!   each cluster a compressed cluster's sectors touch +1, snapshot L1s, snapshot table,
//!   refcount table, refcount blocks, bitmap directory, tables and data (when consistent)
//! stored[c] < computed[c]  → corruption: freeing a reference would free a cluster in use
//! stored[c] > computed[c]  → leak: harmless, the cluster is only wasted
//! active L1/L2 entry: COPIED set ⇔ refcount == 1
//! ```
//!
//! Anything that makes writing unsafe is an error naming the structure and its offsets:
//! the corrupt bit, malformed or misplaced refcount, L1, L2 or bitmap entries, a cluster used
//! by two structures that may not share it, a refcount lower than the uses, COPIED on a
//! shared cluster. What a writer can repair is reported: leaks, COPIED flags missing on
//! clusters of refcount 1, and, when the dirty bit says the stored refcounts are stale
//! (lazy refcounts), every mismatch, so that the refcounts can be rewritten from
//! [`CheckReport::computed`].
//!
//! Memory: one `u16` counter and one byte per host cluster, plus the stored refcounts of
//! [`read_refcounts`] (`refcount_bits / 8` bytes per cluster) and one cluster of table at a
//! time; files of more than [`MAX_CHECK_CLUSTERS`] clusters are refused.
//!
//! ```no_run
//! use blkdelta_common::image::qcow2::{check, Qcow2Image};
//! # fn main() -> Result<(), blkdelta_common::ImageError> {
//! let image = Qcow2Image::open("vm.qcow2".as_ref())?;
//! let file = std::fs::File::open(image.path()).expect("open");
//! let report = check::check(&file, image.file_len(), image.header(), image.snapshots())?;
//! if report.dirty {
//!     // Rewrite the refcounts from report.computed before writing anything else.
//! }
//! for leak in report.leaks() {
//!     println!("cluster {}: refcount {}, used {} times", leak.cluster, leak.stored, leak.computed);
//! }
//! # Ok(()) }
//! ```

mod copied;
mod counter;
mod refcounts;
#[cfg(test)]
mod tests;
mod walk;

use std::fs::File;

pub use copied::{CopiedMismatch, EntryTable, MAX_LISTED_COPIED_MISMATCHES};
pub use refcounts::{
    read_refcounts, Refcounts, MAX_CHECK_CLUSTERS, REFT_OFFSET_MASK, REFT_RESERVED_MASK,
};
pub use walk::L2E_STD_RESERVED_MASK;

use super::header::Header;
use super::snapshot::Snapshot;
use crate::ImageError;
use counter::Counter;
use walk::{Image, Walk};

/// What the metadata says each host cluster is used for, and how that compares with the
/// stored refcounts and COPIED flags. Built by [`check`] only for an image safe to write
/// once its findings are repaired.
#[derive(Clone)]
pub struct CheckReport {
    /// The dirty bit is set (lazy refcounts): the stored refcounts are stale, so refcounts
    /// lower than the uses are not errors but listed by [`CheckReport::mismatches`], and the
    /// COPIED flags were checked against the computed refcounts. Rewrite the refcounts from
    /// [`CheckReport::computed`] before clearing the bit.
    pub dirty: bool,
    /// References the metadata makes to each host cluster (index = host offset >>
    /// cluster_bits): one per cluster of the file, and one more when a compressed cluster's
    /// last sector reaches into the cluster after the end of the file.
    pub computed: Vec<u16>,
    /// The stored refcounts.
    pub stored: Refcounts,
    /// Clusters whose stored refcount is higher than their uses (leaks).
    pub leaked_clusters: u64,
    /// Clusters whose stored refcount is lower than their uses (only in a dirty image; in a
    /// clean one the first such cluster is an error).
    pub undercounted_clusters: u64,
    /// Active L1 and L2 entries without COPIED whose cluster has refcount 1, at most
    /// [`MAX_LISTED_COPIED_MISMATCHES`] of them.
    pub copied_mismatches: Vec<CopiedMismatch>,
    /// All such entries, listed or not.
    pub copied_mismatches_total: u64,
}

/// A cluster whose stored refcount differs from its uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RefcountMismatch {
    /// The cluster index (host offset >> cluster_bits).
    pub cluster: u64,
    /// The refcount stored.
    pub stored: u64,
    /// The references the metadata makes to it.
    pub computed: u64,
}

impl std::fmt::Debug for CheckReport {
    /// A summary: the counters are not listed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckReport")
            .field("dirty", &self.dirty)
            .field("clusters", &self.computed.len())
            .field("stored", &self.stored)
            .field("leaked_clusters", &self.leaked_clusters)
            .field("undercounted_clusters", &self.undercounted_clusters)
            .field("copied_mismatches_total", &self.copied_mismatches_total)
            .finish()
    }
}

impl CheckReport {
    /// Every cluster whose stored refcount differs from its uses, in cluster order.
    pub fn mismatches(&self) -> impl Iterator<Item = RefcountMismatch> + '_ {
        self.computed.iter().enumerate().filter_map(|(i, &c)| {
            let (cluster, computed) = (i as u64, u64::from(c));
            let stored = self.stored.get(cluster);
            (stored != computed).then_some(RefcountMismatch {
                cluster,
                stored,
                computed,
            })
        })
    }

    /// The leaks: clusters whose stored refcount is higher than their uses.
    pub fn leaks(&self) -> impl Iterator<Item = RefcountMismatch> + '_ {
        self.mismatches().filter(|m| m.stored > m.computed)
    }

    /// Whether nothing needs repair: not dirty, no leak, no COPIED mismatch.
    pub fn is_clean(&self) -> bool {
        !self.dirty && self.leaked_clusters == 0 && self.copied_mismatches_total == 0
    }
}

/// Checks the refcounts of the image in `file` (`file_len` bytes), whose validated header is
/// `header` and snapshot table `snapshots` (as [`super::Qcow2Image::snapshots`] reads it).
/// Every rule of QEMU's `qcow2_check_refcounts` is applied, and an error returned for
/// anything that would make a write unsafe; see the [module documentation](self). Reads the
/// metadata one cluster at a time; memory is bounded by the file's cluster count.
pub fn check(
    file: &File,
    file_len: u64,
    header: &Header,
    snapshots: &[Snapshot],
) -> Result<CheckReport, ImageError> {
    if header.is_corrupt() {
        return Err(ImageError::MarkedCorrupt);
    }
    let stored = read_refcounts(file, file_len, header)?;
    let clusters = refcounts::file_clusters(file_len, header.cluster_bits)?;
    let image = Image {
        file,
        file_len,
        header,
    };
    let counter = Counter::new(
        clusters,
        header.cluster_bits,
        file_len,
        stored.max_refcount(),
    );
    let mut walk = Walk::new(image, counter);
    walk.count_all(snapshots, &stored)?;
    let counter = walk.counter;
    let dirty = header.is_dirty();
    let (leaked_clusters, undercounted_clusters) = compare(&counter, &stored, dirty)?;
    let found = if dirty {
        copied::scan(image, |c| counter.get(c))?
    } else {
        copied::scan(image, |c| stored.get(c))?
    };
    Ok(CheckReport {
        dirty,
        computed: counter.into_counts(),
        stored,
        leaked_clusters,
        undercounted_clusters,
        copied_mismatches: found.listed,
        copied_mismatches_total: found.total,
    })
}

/// Compares computed and stored refcounts like QEMU's `compare_refcounts`: (leaks, refcounts
/// lower than the uses). A refcount lower than the uses is an error unless the image is
/// dirty.
fn compare(counter: &Counter, stored: &Refcounts, dirty: bool) -> Result<(u64, u64), ImageError> {
    let (mut leaked, mut under) = (0, 0);
    for cluster in 0..counter.len() {
        let (computed, refcount) = (counter.get(cluster), stored.get(cluster));
        if refcount > computed {
            leaked += 1;
        } else if refcount < computed {
            if !dirty {
                return Err(ImageError::RefcountTooLow {
                    cluster,
                    offset: cluster << counter.cluster_bits(),
                    stored: refcount,
                    computed,
                });
            }
            under += 1;
        }
    }
    Ok((leaked, under))
}
