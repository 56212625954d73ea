//! Limits applied to every length, count and offset read from a stream or an image, checked
//! before any allocation or seek.

/// Size of a digest block and the largest plain payload of a data record.
pub const CHUNK_BYTES: u64 = 1 << 20;

/// Largest frame body of any record (a 1 MiB payload that did not compress plus its fields).
pub const MAX_RECORD_BODY_BYTES: u32 = (CHUNK_BYTES as u32) + 4096;

/// Largest encoded stream header.
pub const MAX_HEADER_BYTES: u32 = 1 << 20;

/// Largest number of snapshot transitions one stream may carry.
pub const MAX_TRANSITIONS: usize = 4096;

/// Longest name (snapshot, source) carried in a stream, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;

/// Largest virtual disk size accepted anywhere: 2^56 bytes (64 PiB), qcow2's own host limit.
pub const MAX_VIRTUAL_BYTES: u64 = 1 << 56;

/// Largest active or snapshot L1 table QEMU accepts: 32 MiB.
pub const MAX_L1_BYTES: u64 = 32 << 20;

/// Largest qcow2 snapshot table QEMU accepts: 64 MiB.
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;

/// Largest number of qcow2 internal snapshots QEMU accepts.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Largest snapshot extra data QEMU accepts.
pub const MAX_SNAPSHOT_EXTRA_BYTES: u32 = 1024;

/// Largest number of qcow2 persistent bitmaps.
pub const MAX_BITMAPS: u32 = 65535;

/// Largest qcow2 bitmap directory.
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 64 << 20;

/// Deepest backing chain followed.
pub const MAX_BACKING_DEPTH: usize = 64;

/// Stream bytes after which a writer puts a checkpoint record (a verified point).
pub const CHECKPOINT_STREAM_BYTES: u64 = 1 << 20;

/// Plain data bytes after which a writer puts a checkpoint record.
pub const CHECKPOINT_PLAIN_BYTES: u64 = 4 << 20;

/// Most stream bytes a reader accepts between two verified points (checkpoint or snapshot-end
/// records): a receiver holds back what it has not verified, so this bounds its memory.
pub const MAX_UNVERIFIED_STREAM_BYTES: u64 = 16 << 20;

/// Most plain data bytes a reader accepts between two verified points.
pub const MAX_UNVERIFIED_PLAIN_BYTES: u64 = 16 << 20;

/// Most entries a block list held in memory may have: hashes of blocks that are not all zeros,
/// plus runs of zero blocks (32 and 16 bytes each, so at most 128 MiB: 4 TiB of data blocks).
pub const MAX_BLOCK_LIST_ENTRIES: u64 = 1 << 22;
