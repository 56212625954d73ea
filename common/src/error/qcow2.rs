//! What is wrong with one qcow2 structure, for the [`ImageError`](super::ImageError) variant
//! that names where it is: an L1 entry ([`L1Problem`]), an L2 entry ([`L2Problem`]), a refcount
//! table entry ([`RefcountTableProblem`]), the bitmap directory ([`DirectoryProblem`]), one
//! bitmap ([`BitmapProblem`]) or one of its table entries ([`TableEntryProblem`]). Each carries
//! the offending values; each message is a clause that follows the structure's name.
//! [`ClusterUse`] names what a host cluster holds, for the refcount check's overlap errors.

/// What is wrong with an L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum L2Problem {
    /// The host offset of a normal or zero-allocated cluster is not cluster-aligned.
    #[error("host cluster offset {host:#x} is not aligned to the cluster size {cluster_size}")]
    UnalignedHost {
        /// The host offset (bits 9-55).
        host: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// An extended L2 bitmap contradicts its cluster: a subcluster both allocated and zero,
    /// or an allocated subcluster in a cluster without a host offset.
    #[error("extended L2 bitmap {bitmap:#018x} is invalid for a cluster of kind {kind}")]
    SubclusterBitmap {
        /// The subcluster bitmap word.
        bitmap: u64,
        /// The cluster's kind ("unallocated", "zero", "normal", ...).
        kind: &'static str,
    },
    /// Reserved bits of a standard cluster descriptor (1-8 and 56-61) are set.
    #[error("reserved bits {bits:#018x} are set")]
    ReservedBits {
        /// The reserved bits that are set.
        bits: u64,
    },
    /// A compressed cluster carries COPIED (bit 63), which is never valid for one.
    #[error("a compressed cluster has the COPIED flag (bit 63)")]
    CompressedCopied,
    /// A compressed cluster has a non-zero extended L2 bitmap.
    #[error("a compressed cluster has the non-zero subcluster bitmap {bitmap:#018x}")]
    CompressedBitmap {
        /// The subcluster bitmap word.
        bitmap: u64,
    },
    /// The host range (a data cluster, or a compressed cluster's sectors) reaches a cluster
    /// or more past the end of the file.
    #[error(
        "host range at {offset:#x} (+{len} bytes) lies past the end of the image ({file_len} \
         bytes)"
    )]
    PastEnd {
        /// Host offset of the range.
        offset: u64,
        /// Its length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// COPIED is set but the cluster's refcount is not 1: writing in place would change
    /// another reference (a snapshot).
    #[error(
        "COPIED is set but the data cluster's refcount is {refcount}: a write in place would \
         change what a snapshot holds"
    )]
    CopiedShared {
        /// The cluster's refcount.
        refcount: u64,
    },
}

/// What is wrong with an L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum L1Problem {
    /// Reserved bits (0-8 and 56-62) are set.
    #[error("reserved bits {bits:#018x} are set")]
    ReservedBits {
        /// The reserved bits that are set.
        bits: u64,
    },
    /// The L2 table offset is not cluster-aligned.
    #[error("L2 table offset {offset:#x} is not aligned to the cluster size {cluster_size}")]
    UnalignedL2 {
        /// The L2 table offset (bits 9-55).
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The L2 table lies past the end of the file.
    #[error("L2 table at {offset:#x} lies past the end of the image ({file_len} bytes)")]
    L2PastEnd {
        /// The L2 table offset.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
    /// COPIED is set but the L2 table's refcount is not 1: updating it in place would change
    /// another reference (a snapshot).
    #[error(
        "COPIED is set but the L2 table's refcount is {refcount}: an update in place would \
         change what a snapshot holds"
    )]
    CopiedShared {
        /// The L2 table's refcount.
        refcount: u64,
    },
}

/// What is wrong with a refcount table entry (the offset of a refcount block).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RefcountTableProblem {
    /// Reserved bits (0-8) are set.
    #[error("reserved bits {bits:#x} are set")]
    ReservedBits {
        /// The reserved bits that are set.
        bits: u64,
    },
    /// The refcount block offset is not cluster-aligned.
    #[error("refcount block offset {offset:#x} is not aligned to the cluster size {cluster_size}")]
    Unaligned {
        /// The refcount block offset.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The refcount block lies past the end of the file.
    #[error("refcount block at {offset:#x} lies past the end of the image ({file_len} bytes)")]
    PastEnd {
        /// The refcount block offset.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
}

/// What a host cluster is used for, as the refcount check finds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ClusterUse {
    /// The header (cluster 0).
    Header,
    /// The active L1 table.
    ActiveL1,
    /// A snapshot's L1 table.
    SnapshotL1,
    /// An L2 table (of any L1 table).
    L2Table,
    /// A guest data cluster (normal or preallocated zero).
    Data,
    /// Part of a compressed cluster's sectors.
    Compressed,
    /// The refcount table.
    RefcountTable,
    /// A refcount block.
    RefcountBlock,
    /// The snapshot table.
    SnapshotTable,
    /// The bitmap directory.
    BitmapDirectory,
    /// A bitmap table.
    BitmapTable,
    /// A bitmap data cluster.
    BitmapData,
}

impl ClusterUse {
    /// The use's name, for messages.
    pub fn name(self) -> &'static str {
        match self {
            ClusterUse::Header => "the header",
            ClusterUse::ActiveL1 => "the active L1 table",
            ClusterUse::SnapshotL1 => "a snapshot L1 table",
            ClusterUse::L2Table => "an L2 table",
            ClusterUse::Data => "a data cluster",
            ClusterUse::Compressed => "a compressed cluster",
            ClusterUse::RefcountTable => "the refcount table",
            ClusterUse::RefcountBlock => "a refcount block",
            ClusterUse::SnapshotTable => "the snapshot table",
            ClusterUse::BitmapDirectory => "the bitmap directory",
            ClusterUse::BitmapTable => "a bitmap table",
            ClusterUse::BitmapData => "a bitmap data cluster",
        }
    }
}

impl std::fmt::Display for ClusterUse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What is wrong with the bitmap directory or the bitmaps extension that names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryProblem {
    /// nb_bitmaps is 0 or more than this reader's limit.
    #[error("nb_bitmaps {nb_bitmaps} is outside 1..={max}")]
    NbBitmaps {
        /// The extension's nb_bitmaps.
        nb_bitmaps: u32,
        /// The limit.
        max: u32,
    },
    /// bitmap_directory_size cannot hold nb_bitmaps entries, or exceeds the limit.
    #[error("bitmap_directory_size {size} is outside {min}..={max}")]
    Size {
        /// The extension's bitmap_directory_size.
        size: u64,
        /// The size of nb_bitmaps entries without names.
        min: u64,
        /// The limit.
        max: u64,
    },
    /// The directory holds more entries than nb_bitmaps says.
    #[error("it holds more than the {nb_bitmaps} entries the extension says")]
    TooManyEntries {
        /// The extension's nb_bitmaps.
        nb_bitmaps: u32,
    },
    /// The directory holds fewer entries than nb_bitmaps says.
    #[error("it holds {found} entries, the extension says {nb_bitmaps}")]
    Count {
        /// Entries found.
        found: u64,
        /// The extension's nb_bitmaps.
        nb_bitmaps: u32,
    },
    /// Fewer bytes than an entry's fixed part are left at the end of the directory.
    #[error(
        "entry at offset {entry_offset:#x}: only {left} bytes are left, an entry needs {needed}"
    )]
    ShortEntry {
        /// Offset of the entry in the file.
        entry_offset: u64,
        /// Bytes left in the directory.
        left: u64,
        /// Bytes of an entry's fixed part.
        needed: u64,
    },
    /// An entry's name_size is 0 or longer than QEMU allows.
    #[error("entry at offset {entry_offset:#x}: name_size {name_size} is outside 1..={max}")]
    NameSize {
        /// Offset of the entry in the file.
        entry_offset: u64,
        /// Its name_size.
        name_size: u16,
        /// The longest name QEMU accepts.
        max: u16,
    },
    /// An entry (with its extra data and name) runs past the end of the directory.
    #[error(
        "entry at offset {entry_offset:#x} is {len} bytes long, past the end of the directory"
    )]
    EntryPastEnd {
        /// Offset of the entry in the file.
        entry_offset: u64,
        /// Its padded length.
        len: u64,
    },
}

/// What is wrong with one persistent bitmap, or why its content cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BitmapProblem {
    /// Autoclear bit 0 of the header is clear while the bitmaps extension exists: QEMU holds
    /// every bitmap of the image inconsistent.
    #[error(
        "autoclear bit 0 is clear, so the image's bitmaps are inconsistent (a program that does \
         not maintain bitmaps wrote to it)"
    )]
    Inconsistent,
    /// Flag bit 0 (in_use) is set: the bitmap was not saved cleanly.
    #[error("marked in use: it was not saved cleanly, so its content is invalid")]
    InUse,
    /// Another bitmap carries the same name (QEMU requires unique names).
    #[error("{count} bitmaps carry this name (names must be unique)")]
    DuplicateName {
        /// How many bitmaps carry it.
        count: usize,
    },
    /// granularity_bits is outside what QEMU accepts.
    #[error("granularity_bits {bits} is outside {min}..={max}")]
    Granularity {
        /// The entry's granularity_bits.
        bits: u8,
        /// The smallest QEMU accepts.
        min: u8,
        /// The largest QEMU accepts.
        max: u8,
    },
    /// The disk is larger than this reader's limit (a bitmap geometry of another disk).
    #[error("disk size {size} exceeds {limit}")]
    DiskSize {
        /// The disk size.
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// The image's cluster_bits is outside 9..=21 (a bitmap geometry of another image).
    #[error("cluster_bits {bits} is outside 9..=21")]
    ClusterBits {
        /// The cluster_bits.
        bits: u32,
    },
    /// bitmap_table_offset is 0.
    #[error("bitmap_table_offset is 0")]
    TableAtZero,
    /// bitmap_table_offset is not cluster-aligned.
    #[error("bitmap_table_offset {offset:#x} is not aligned to the cluster size {cluster_size}")]
    TableUnaligned {
        /// The entry's bitmap_table_offset.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The table names more bitmap data than QEMU accepts.
    #[error(
        "bitmap_table_size {entries} names {bytes} bytes of bitmap data, too large (at most \
         {limit})"
    )]
    TableTooLarge {
        /// The entry's bitmap_table_size.
        entries: u64,
        /// Bytes of bitmap data that many entries name.
        bytes: u64,
        /// The limit (QEMU's `BME_MAX_PHYS_SIZE`).
        limit: u64,
    },
    /// A bitmap not in use has a table too small to cover the disk.
    #[error(
        "bitmap_table_size {entries} covers {covered} bytes, less than the disk ({disk_size})"
    )]
    TableTooSmall {
        /// The entry's bitmap_table_size.
        entries: u64,
        /// Guest bytes the table's bits cover.
        covered: u64,
        /// The disk size.
        disk_size: u64,
    },
    /// The table size is not what the disk size and granularity require.
    #[error(
        "bitmap_table_size {entries} does not match the disk: {disk_size} bytes in granules of \
         {granularity} need {expected} entries"
    )]
    TableSize {
        /// The entry's bitmap_table_size.
        entries: u64,
        /// The entries the disk needs.
        expected: u64,
        /// The disk size.
        disk_size: u64,
        /// Guest bytes per bit.
        granularity: u64,
    },
    /// The table lies past the end of the image.
    #[error(
        "bitmap table at offset {offset:#x} ({len} bytes) lies past the end of the image \
         ({file_len} bytes)"
    )]
    TablePastEnd {
        /// The table's offset.
        offset: u64,
        /// The table's length.
        len: u64,
        /// The file's length.
        file_len: u64,
    },
    /// An entry of the bitmap table is malformed.
    #[error("table entry {index} at offset {offset:#x}: {problem}")]
    TableEntry {
        /// Index of the entry in the table.
        index: u64,
        /// Offset of the entry in the file.
        offset: u64,
        /// What is wrong with it.
        problem: TableEntryProblem,
    },
}

/// What is wrong with one bitmap table entry (QEMU's `check_table_entry`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TableEntryProblem {
    /// Reserved bits (1-8, 56-63) are set.
    #[error("entry {entry:#018x} has reserved bits set")]
    Reserved {
        /// The entry.
        entry: u64,
    },
    /// The entry names a data cluster and sets the all-ones bit.
    #[error("entry {entry:#018x} has both a data cluster and the all-ones bit")]
    OffsetAndAllOnes {
        /// The entry.
        entry: u64,
    },
    /// The data cluster offset is not cluster-aligned.
    #[error("data cluster offset {offset:#x} is not aligned to the cluster size {cluster_size}")]
    Unaligned {
        /// The data cluster offset.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The data cluster lies past the end of the image.
    #[error("data cluster at {offset:#x} lies past the end of the image ({file_len} bytes)")]
    PastEnd {
        /// The data cluster offset.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
}
