//! The bit twiddling of qcow2 L1 and L2 entries, named after the fields of the specification
//! (`docs/interop/qcow2.rst`, "Cluster mapping") and QEMU's `block/qcow2.h`.
//!
//! ```text
//! L1 entry   63 COPIED | 62..56 reserved | 55..9 L2 table offset | 8..0 reserved
//! L2 entry   63 COPIED | 62 COMPRESSED   | 61..0 cluster descriptor
//!   standard descriptor:   55..9 host cluster offset | 0 ZERO (not with extended L2)
//!   compressed descriptor: (x = 62 - (cluster_bits - 8))
//!                          61..x additional 512-byte sectors | x-1..0 host byte offset
//! extended L2 bitmap (second u64 of a 128-bit entry):
//!   63..32 subcluster i reads as zeros | 31..0 subcluster i is allocated
//! ```

use crate::error::L2Problem;

/// Bits 9-55 of an L1 entry: the offset of the L2 table.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Reserved bits of an L1 entry (0-8 and 56-62).
pub const L1E_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// Bits 9-55 of a standard L2 entry: the host offset of the data cluster.
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bit 63 of L1 and L2 entries: the table or cluster has refcount 1 (only meaningful in the
/// active tables).
pub const QCOW_OFLAG_COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const QCOW_OFLAG_COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros (ignored with extended L2).
pub const QCOW_OFLAG_ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS_PER_CLUSTER: u32 = 32;
/// The allocation half (bits 0-31) of an extended L2 bitmap.
pub const QCOW_L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;
/// The zero half (bits 32-63) of an extended L2 bitmap.
pub const QCOW_L2_BITMAP_ALL_ZEROES: u64 = 0xffff_ffff << 32;

/// Shape of the L2 tables of an image or snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// Whether L2 entries are 128 bits with a subcluster bitmap.
    pub extended_l2: bool,
    /// Entries per L2 table: cluster size / 8, or / 16 with extended L2.
    pub l2_entries: u64,
}

impl Geometry {
    /// The geometry of an image with these parameters.
    pub fn new(cluster_bits: u32, extended_l2: bool) -> Geometry {
        let entry_bytes = if extended_l2 { 16 } else { 8 };
        Geometry {
            cluster_bits,
            extended_l2,
            l2_entries: (1u64 << cluster_bits) / entry_bytes,
        }
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Guest bytes mapped by one L2 table (one L1 entry).
    pub fn l2_range_bytes(&self) -> u64 {
        self.cluster_size() * self.l2_entries
    }

    /// Size of the unit an L2 entry describes independently: a subcluster with extended L2,
    /// otherwise a cluster.
    pub fn unit_size(&self) -> u64 {
        if self.extended_l2 {
            self.cluster_size() / u64::from(SUBCLUSTERS_PER_CLUSTER)
        } else {
            self.cluster_size()
        }
    }

    /// L1 entries needed to map `disk_size` bytes: `ceil(disk_size / l2_range_bytes)`.
    pub fn l1_entries_for(&self, disk_size: u64) -> u64 {
        disk_size.div_ceil(self.l2_range_bytes())
    }
}

/// What one L2 entry says about its whole cluster (QEMU's `QCow2ClusterType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterKind {
    /// Offset 0: read the backing file, or zeros without one.
    Unallocated,
    /// ZERO bit with offset 0: reads as zeros.
    ZeroPlain,
    /// ZERO bit with a preallocated host cluster: reads as zeros.
    ZeroAlloc(u64),
    /// Guest data at this cluster-aligned host offset.
    Normal(u64),
    /// Compressed data: `len` bytes starting at host byte `offset` (the sector-rounded length
    /// from the descriptor, which may run past the end of the file).
    Compressed {
        /// Host byte offset of the compressed stream (not aligned).
        offset: u64,
        /// Bytes to read.
        len: u64,
    },
}

impl ClusterKind {
    /// The kind's name, for messages.
    pub fn name(&self) -> &'static str {
        match self {
            ClusterKind::Unallocated => "unallocated",
            ClusterKind::ZeroPlain => "zero",
            ClusterKind::ZeroAlloc(_) => "zero (allocated)",
            ClusterKind::Normal(_) => "normal",
            ClusterKind::Compressed { .. } => "compressed",
        }
    }
}

/// What an extended L2 entry says about one subcluster (QEMU's `QCow2SubclusterType`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubclusterKind {
    /// Allocated: guest data at the cluster's host offset plus the subcluster's offset.
    Normal,
    /// The cluster has a host offset and the subcluster's zero bit is set.
    ZeroAlloc,
    /// The cluster has no host offset and the subcluster's zero bit is set.
    ZeroPlain,
    /// The cluster has a host offset but this subcluster is not allocated: backing or zeros.
    UnallocatedAlloc,
    /// Neither the cluster nor the subcluster is allocated: backing or zeros.
    UnallocatedPlain,
    /// The whole cluster is compressed (no subclusters).
    Compressed,
}

/// Whether bit 62 (COMPRESSED) of an L2 entry is set.
pub fn l2_entry_is_compressed(entry: u64) -> bool {
    entry & QCOW_OFLAG_COMPRESSED != 0
}

/// The `x` of the specification: how far the sector count is shifted in a compressed
/// descriptor, `62 - (cluster_bits - 8)`.
pub fn csize_shift(cluster_bits: u32) -> u32 {
    62 - (cluster_bits - 8)
}

/// Decodes a compressed cluster descriptor into (`coffset`, `csize`): the host byte offset of
/// the compressed stream and the bytes to read, up to the end of the sector holding its last
/// byte. `cluster_bits` must be 9..=21 (the header checks it).
pub fn compressed_descriptor(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let x = csize_shift(cluster_bits);
    let coffset = entry & ((1u64 << x) - 1);
    let nsect_field = (entry >> x) & ((1u64 << (cluster_bits - 8)) - 1);
    let csize = (nsect_field + 1) * 512 - (coffset & 511);
    (coffset, csize)
}

/// Classifies a standard L2 word like QEMU's `qcow2_get_cluster_type`. Host offsets of
/// normal and zero-allocated clusters must be cluster-aligned.
pub fn classify_cluster(entry: u64, geometry: Geometry) -> Result<ClusterKind, L2Problem> {
    if l2_entry_is_compressed(entry) {
        let (offset, len) = compressed_descriptor(entry, geometry.cluster_bits);
        return Ok(ClusterKind::Compressed { offset, len });
    }
    let host = entry & L2E_OFFSET_MASK;
    let aligned = |host: u64| {
        if host & (geometry.cluster_size() - 1) != 0 {
            return Err(L2Problem::UnalignedHost {
                host,
                cluster_size: geometry.cluster_size(),
            });
        }
        Ok(host)
    };
    if entry & QCOW_OFLAG_ZERO != 0 && !geometry.extended_l2 {
        return Ok(match host {
            0 => ClusterKind::ZeroPlain,
            _ => ClusterKind::ZeroAlloc(aligned(host)?),
        });
    }
    match host {
        0 => Ok(ClusterKind::Unallocated),
        _ => Ok(ClusterKind::Normal(aligned(host)?)),
    }
}

/// Checks an extended L2 bitmap against its cluster: no subcluster may be both allocated and
/// zero (`(bitmap >> 32) & bitmap == 0`), and an unallocated cluster has no allocated
/// subclusters. Bitmaps of compressed clusters are ignored, as QEMU does.
pub fn check_l2_bitmap(kind: ClusterKind, bitmap: u64) -> Result<(), L2Problem> {
    let bad = match kind {
        ClusterKind::Compressed { .. } => false,
        ClusterKind::Unallocated | ClusterKind::ZeroPlain => bitmap & QCOW_L2_BITMAP_ALL_ALLOC != 0,
        ClusterKind::Normal(_) | ClusterKind::ZeroAlloc(_) => (bitmap >> 32) & bitmap != 0,
    };
    if bad {
        return Err(L2Problem::SubclusterBitmap {
            bitmap,
            kind: kind.name(),
        });
    }
    Ok(())
}

/// Classifies subcluster `index` (0..32) of a cluster with extended L2 entries, like QEMU's
/// `qcow2_get_subcluster_type`: the zero bit wins over the allocation bit.
pub fn classify_subcluster(
    kind: ClusterKind,
    bitmap: u64,
    index: u32,
) -> Result<SubclusterKind, L2Problem> {
    check_l2_bitmap(kind, bitmap)?;
    let zero = bitmap & (1u64 << (32 + index)) != 0;
    let alloc = bitmap & (1u64 << index) != 0;
    Ok(match kind {
        ClusterKind::Compressed { .. } => SubclusterKind::Compressed,
        ClusterKind::Normal(_) | ClusterKind::ZeroAlloc(_) if zero => SubclusterKind::ZeroAlloc,
        ClusterKind::Normal(_) | ClusterKind::ZeroAlloc(_) if alloc => SubclusterKind::Normal,
        ClusterKind::Normal(_) | ClusterKind::ZeroAlloc(_) => SubclusterKind::UnallocatedAlloc,
        ClusterKind::Unallocated | ClusterKind::ZeroPlain if zero => SubclusterKind::ZeroPlain,
        ClusterKind::Unallocated | ClusterKind::ZeroPlain => SubclusterKind::UnallocatedPlain,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const G64K: Geometry = Geometry {
        cluster_bits: 16,
        extended_l2: false,
        l2_entries: 8192,
    };

    #[test]
    fn geometry_derives_table_sizes() {
        assert_eq!(Geometry::new(16, false), G64K);
        let ext = Geometry::new(16, true);
        assert_eq!(ext.l2_entries, 4096);
        assert_eq!(ext.unit_size(), 2048);
        assert_eq!(Geometry::new(9, false).l2_range_bytes(), 512 * 64);
        assert_eq!(G64K.l1_entries_for(0), 0);
        assert_eq!(G64K.l1_entries_for(512 << 20), 1);
        assert_eq!(G64K.l1_entries_for((512 << 20) + 1), 2);
    }

    #[test]
    fn compressed_descriptor_matches_qemu_examples() {
        // [V] 64k clusters: 0x40000000001c0000 is one sector (512 B) at 0x1c0000.
        assert_eq!(
            compressed_descriptor(0x4000_0000_001c_0000, 16),
            (0x1c_0000, 512)
        );
        // [V] 2M clusters: 0x4008000000a00000 is 5 sectors (2560 B) at 0xa00000.
        assert_eq!(
            compressed_descriptor(0x4008_0000_00a0_0000, 21),
            (0xa0_0000, 2560)
        );
        // [V] byte-packed: a stream starting mid-sector reads up to its last sector's end.
        assert_eq!(
            compressed_descriptor(0x4000_0000_0005_004f, 16),
            (0x5004f, 433)
        );
        // 512-byte clusters: one sector-count bit (61), coffset in bits 0..61.
        assert_eq!(csize_shift(9), 61);
        assert_eq!(
            compressed_descriptor(QCOW_OFLAG_COMPRESSED | (1 << 61) | 0x1234, 9),
            (0x1234, 1024 - 0x34)
        );
        assert_eq!(csize_shift(21), 49);
    }

    #[test]
    fn classify_standard_entries() {
        let c = |e| classify_cluster(e, G64K).unwrap();
        assert_eq!(c(0), ClusterKind::Unallocated);
        // [V] discard in v3 gives ZERO_PLAIN 0x1.
        assert_eq!(c(0x1), ClusterKind::ZeroPlain);
        // [V] write -z on a shared cluster keeps the offset: ZERO_ALLOC 0x50001.
        assert_eq!(c(0x50001), ClusterKind::ZeroAlloc(0x50000));
        assert_eq!(c(QCOW_OFLAG_COPIED | 0x50000), ClusterKind::Normal(0x50000));
        assert_eq!(c(0x50000), ClusterKind::Normal(0x50000));
        assert_eq!(
            c(0x4000_0000_001c_0000),
            ClusterKind::Compressed {
                offset: 0x1c_0000,
                len: 512
            }
        );
        // COPIED alone (offset 0) is unallocated without an external data file.
        assert_eq!(c(QCOW_OFLAG_COPIED), ClusterKind::Unallocated);
        assert!(l2_entry_is_compressed(0x4000_0000_0000_0000));
        assert!(!l2_entry_is_compressed(QCOW_OFLAG_COPIED | 0x50000));
    }

    #[test]
    fn classify_rejects_unaligned_host_offsets() {
        let unaligned = L2Problem::UnalignedHost {
            host: 0x50200,
            cluster_size: 65536,
        };
        assert_eq!(classify_cluster(0x50200, G64K), Err(unaligned));
        assert_eq!(classify_cluster(0x50201, G64K), Err(unaligned));
        // With 512-byte clusters every offset of the mask is aligned.
        assert_eq!(
            classify_cluster(0x50200, Geometry::new(9, false)).unwrap(),
            ClusterKind::Normal(0x50200)
        );
    }

    #[test]
    fn zero_bit_is_ignored_with_extended_l2() {
        let ext = Geometry::new(16, true);
        assert_eq!(
            classify_cluster(0x1, ext).unwrap(),
            ClusterKind::Unallocated
        );
        assert_eq!(
            classify_cluster(0x50001, ext).unwrap(),
            ClusterKind::Normal(0x50000)
        );
    }

    #[test]
    fn classify_subclusters_with_qemu_examples() {
        let normal = ClusterKind::Normal(0x50000);
        let sc = |k, bm, i| classify_subcluster(k, bm, i).unwrap();
        // [V] a 4k write at 0 with 64k clusters (2k subclusters) gives bitmap 0x3.
        assert_eq!(sc(normal, 0x3, 0), SubclusterKind::Normal);
        assert_eq!(sc(normal, 0x3, 1), SubclusterKind::Normal);
        assert_eq!(sc(normal, 0x3, 2), SubclusterKind::UnallocatedAlloc);
        // [V] write -z 8k into an unallocated cluster: entry 0, bitmap 0x0000000f_00000000.
        let unalloc = ClusterKind::Unallocated;
        assert_eq!(sc(unalloc, 0xf_0000_0000, 3), SubclusterKind::ZeroPlain);
        assert_eq!(
            sc(unalloc, 0xf_0000_0000, 4),
            SubclusterKind::UnallocatedPlain
        );
        // [V] zeroing subcluster 0 of a full cluster: 0x00000001_fffffffe.
        assert_eq!(sc(normal, 0x1_ffff_fffe, 0), SubclusterKind::ZeroAlloc);
        assert_eq!(sc(normal, 0x1_ffff_fffe, 31), SubclusterKind::Normal);
        let comp = ClusterKind::Compressed {
            offset: 0,
            len: 512,
        };
        assert_eq!(sc(comp, 0, 5), SubclusterKind::Compressed);
    }

    #[test]
    fn invalid_subcluster_bitmaps_are_rejected() {
        // Both allocated and zero.
        let both = classify_subcluster(ClusterKind::Normal(0x50000), 0x1_0000_0001, 7);
        let problem = L2Problem::SubclusterBitmap {
            bitmap: 0x1_0000_0001,
            kind: "normal",
        };
        assert_eq!(both, Err(problem));
        assert_eq!(
            problem.to_string(),
            "extended L2 bitmap 0x0000000100000001 is invalid for a cluster of kind normal"
        );
        // Allocated subclusters in an unallocated cluster.
        let alloc = classify_subcluster(ClusterKind::Unallocated, 0x1, 0);
        let problem = L2Problem::SubclusterBitmap {
            bitmap: 1,
            kind: "unallocated",
        };
        assert_eq!(alloc, Err(problem));
        assert!(check_l2_bitmap(ClusterKind::Normal(0x50000), 0xffff_ffff).is_ok());
    }
}
