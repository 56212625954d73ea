//! The computed refcounts: one counter per host cluster of the file, and what first used each
//! cluster, so that a use colliding with it can be named.

use crate::error::ClusterUse;
use crate::ImageError;

/// Every use, by its code in [`Counter::uses`] (0 is "unused").
const USES: [ClusterUse; 12] = [
    ClusterUse::Header,
    ClusterUse::ActiveL1,
    ClusterUse::SnapshotL1,
    ClusterUse::L2Table,
    ClusterUse::Data,
    ClusterUse::Compressed,
    ClusterUse::RefcountTable,
    ClusterUse::RefcountBlock,
    ClusterUse::SnapshotTable,
    ClusterUse::BitmapDirectory,
    ClusterUse::BitmapTable,
    ClusterUse::BitmapData,
];

fn code(u: ClusterUse) -> u8 {
    USES.iter()
        .position(|&x| x == u)
        .expect("every use is listed") as u8
        + 1
}

/// Whether a cluster first used as `first` may also be used as `second`: guest data shared by
/// snapshots (normal or compressed), or an L2 table that several L1 tables name. Any other
/// second use of a cluster is a collision.
fn may_share(first: ClusterUse, second: ClusterUse) -> bool {
    use ClusterUse::{Compressed, Data, L2Table};
    matches!(
        (first, second),
        (Data | Compressed, Data | Compressed) | (L2Table, L2Table)
    )
}

/// QEMU's rule (`qcow2_inc_refcounts_imrt`): a range may reach past the end of the file, into
/// the last cluster's unwritten tail, by less than a cluster.
pub(super) fn past_end(offset: u64, len: u64, file_len: u64, cluster_size: u64) -> bool {
    match offset.checked_add(len) {
        Some(end) => end.saturating_sub(file_len) >= cluster_size,
        None => true,
    }
}

/// Computed refcounts and first uses, one per cluster of the file: 3 bytes per cluster.
pub(super) struct Counter {
    counts: Vec<u16>,
    uses: Vec<u8>,
    cluster_bits: u32,
    file_len: u64,
    /// The largest count: the image's refcount maximum, at most `u16::MAX`.
    max: u16,
    limit_of: &'static str,
}

impl Counter {
    /// Counters for `clusters` clusters (checked against the limit by the caller) of an image
    /// whose refcounts hold at most `max_refcount`.
    pub(super) fn new(clusters: u64, cluster_bits: u32, file_len: u64, max_refcount: u64) -> Self {
        let (max, limit_of) = match u16::try_from(max_refcount) {
            Ok(max) => (max, "the image's refcount width"),
            Err(_) => (u16::MAX, "the check's 16-bit counters"),
        };
        Counter {
            counts: vec![0; clusters as usize],
            uses: vec![0; clusters as usize],
            cluster_bits,
            file_len,
            max,
            limit_of,
        }
    }

    /// The computed refcounts.
    pub(super) fn into_counts(self) -> Vec<u16> {
        self.counts
    }

    /// Clusters counted: those of the file, and maybe the one after its end.
    pub(super) fn len(&self) -> u64 {
        self.counts.len() as u64
    }

    /// log2 of the cluster size.
    pub(super) fn cluster_bits(&self) -> u32 {
        self.cluster_bits
    }

    /// The computed refcount of `cluster` (0 past the file).
    pub(super) fn get(&self, cluster: u64) -> u64 {
        let count = usize::try_from(cluster)
            .ok()
            .and_then(|i| self.counts.get(i));
        count.map_or(0, |&c| u64::from(c))
    }

    /// Counts one reference to every cluster that `[offset, offset + len)` touches, used as
    /// `what` by the pointer at file offset `referrer`. Refuses a range a cluster or more past
    /// the end of the file, a collision with another use and a count past the maximum.
    pub(super) fn add(
        &mut self,
        offset: u64,
        len: u64,
        what: ClusterUse,
        referrer: u64,
    ) -> Result<(), ImageError> {
        if len == 0 {
            return Ok(());
        }
        let cs = 1u64 << self.cluster_bits;
        if past_end(offset, len, self.file_len, cs) {
            return Err(ImageError::PastEnd {
                what: what.name(),
                offset,
                len,
                file_len: self.file_len,
            });
        }
        let first = offset >> self.cluster_bits;
        let last = (offset + len - 1) >> self.cluster_bits;
        for cluster in first..=last {
            self.add_one(cluster, what, referrer)?;
        }
        Ok(())
    }

    fn add_one(&mut self, cluster: u64, what: ClusterUse, referrer: u64) -> Result<(), ImageError> {
        let offset = cluster << self.cluster_bits;
        let i = cluster as usize;
        // A range ending less than a cluster past the end of the file may reach the cluster
        // after the last one: QEMU grows its counters for it, and so does this.
        if i == self.counts.len() {
            self.counts.push(0);
            self.uses.push(0);
        } else if i > self.counts.len() {
            return Err(ImageError::PastEnd {
                what: what.name(),
                offset,
                len: 1 << self.cluster_bits,
                file_len: self.file_len,
            });
        }
        let count = self.counts[i];
        if count > 0 {
            let first = USES[usize::from(self.uses[i]) - 1];
            if !may_share(first, what) {
                return Err(ImageError::ClusterOverlap {
                    cluster,
                    offset,
                    first,
                    second: what,
                    referrer,
                });
            }
        }
        if count == self.max {
            return Err(ImageError::RefcountOverflow {
                cluster,
                offset,
                max: u64::from(self.max),
                limit_of: self.limit_of,
            });
        }
        if count == 0 {
            self.uses[i] = code(what);
        }
        self.counts[i] = count + 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CS: u64 = 4096;

    #[test]
    fn counts_each_cluster_a_range_touches() {
        let mut c = Counter::new(4, 12, 4 * CS, 0xffff);
        c.add(0, 1, ClusterUse::Header, 0).unwrap();
        // A compressed range across a cluster boundary counts both clusters.
        c.add(CS + 4000, 200, ClusterUse::Compressed, 8).unwrap();
        c.add(2 * CS + 10, 100, ClusterUse::Compressed, 16).unwrap();
        assert_eq!((0..4).map(|k| c.get(k)).collect::<Vec<_>>(), [1, 1, 2, 0]);
    }

    #[test]
    fn ranges_may_reach_less_than_a_cluster_past_the_end() {
        // An aligned end: a compressed range's last sector reaches into the next cluster.
        let mut c = Counter::new(2, 12, 2 * CS, 0xffff);
        c.add(2 * CS - 512, 1024, ClusterUse::Compressed, 0)
            .unwrap();
        assert_eq!((c.get(1), c.get(2)), (1, 1));
        assert!(matches!(
            c.add(2 * CS, CS, ClusterUse::Data, 0),
            Err(ImageError::PastEnd {
                what: "a data cluster",
                ..
            })
        ));
        assert!(past_end(u64::MAX, 2, 2 * CS, CS));
        // A partial last cluster: a data cluster starting in it is inside.
        assert!(!past_end(2 * CS, CS, 2 * CS + 8, CS));
    }

    #[test]
    fn collisions_name_both_uses() {
        let mut c = Counter::new(4, 12, 4 * CS, 0xffff);
        c.add(CS, CS, ClusterUse::Data, 0x100).unwrap();
        c.add(CS, CS, ClusterUse::Data, 0x108).unwrap();
        c.add(2 * CS, CS, ClusterUse::L2Table, 0x200).unwrap();
        c.add(2 * CS, CS, ClusterUse::L2Table, 0x208).unwrap();
        let err = c.add(CS, CS, ClusterUse::RefcountTable, 48).unwrap_err();
        assert_eq!(
            err.to_string(),
            "qcow2 cluster 1 (offset 0x1000) is used as a data cluster and as the refcount \
             table (referenced at offset 0x30)"
        );
        assert!(matches!(
            c.add(2 * CS, CS, ClusterUse::Data, 0x300),
            Err(ImageError::ClusterOverlap {
                first: ClusterUse::L2Table,
                second: ClusterUse::Data,
                ..
            })
        ));
    }

    #[test]
    fn counts_stop_at_the_refcount_width() {
        let mut c = Counter::new(2, 12, 2 * CS, 1);
        c.add(CS, CS, ClusterUse::Data, 0).unwrap();
        let err = c.add(CS, CS, ClusterUse::Data, 8).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::RefcountOverflow {
                    cluster: 1,
                    max: 1,
                    ..
                }
            ),
            "{err}"
        );
        let wide = Counter::new(2, 12, 2 * CS, u64::MAX);
        assert_eq!(
            (wide.max, wide.limit_of),
            (u16::MAX, "the check's 16-bit counters")
        );
    }
}
