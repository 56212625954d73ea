//! Error types of the shared crate: one enum per boundary (images, streams). A validation
//! error names the structure, carries the offending values and says where they are; what is
//! wrong with a qcow2 L2 entry or bitmap is a small enum of its own ([`qcow2`]), and so is
//! what went wrong talking to an NBD server ([`nbd`]).

pub mod nbd;
pub mod qcow2;

use std::io;
use std::path::PathBuf;

pub use nbd::NbdError;
pub use qcow2::{
    BitmapProblem, ClusterUse, DirectoryProblem, L1Problem, L2Problem, RefcountTableProblem,
    TableEntryProblem,
};

/// Errors reading a block image (raw file, block device or qcow2).
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Opening the image failed.
    #[error("cannot open {path}")]
    Open {
        /// The image path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading the image failed at an offset.
    #[error("read of {len} bytes at offset {offset} failed")]
    Read {
        /// Byte offset in the file.
        offset: u64,
        /// Bytes requested.
        len: usize,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The image is shorter than a structure it points to.
    #[error("{what} at offset {offset} (+{len} bytes) lies past the end of the image ({file_len} bytes)")]
    PastEnd {
        /// What was being read.
        what: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// Length of the structure.
        len: u64,
        /// Length of the file.
        file_len: u64,
    },
    /// The file does not start with the qcow2 magic `QFI\xfb`.
    #[error("not a qcow2 image ({})", starts_with(.found))]
    BadMagic {
        /// The first bytes of the file (fewer than 4 when the file is shorter).
        found: Vec<u8>,
    },
    /// The qcow2 version is neither 2 nor 3.
    #[error("unsupported qcow2 version {version} (only 2 and 3 exist)")]
    UnsupportedVersion {
        /// The version field (header offset 4).
        version: u32,
    },
    /// The cluster size is outside 512 B..=2 MiB.
    #[error("qcow2 header: cluster_bits {bits} at offset 20 is outside 9..=21 (512 B to 2 MiB)")]
    ClusterBits {
        /// The cluster_bits field.
        bits: u32,
    },
    /// A field of the qcow2 header is out of range, or disagrees with another.
    #[error("qcow2 header: {field} {value} at offset {offset} is invalid: expected {expected}")]
    HeaderField {
        /// The field's name in the specification.
        field: &'static str,
        /// Its byte offset in the header.
        offset: u64,
        /// Its value.
        value: u64,
        /// What a valid value is.
        expected: String,
    },
    /// A header extension runs past the end of the extension area (the backing file name, or
    /// the end of cluster 0).
    #[error(
        "qcow2 header extension at offset {offset} ({len} bytes with its 8-byte head) runs \
         past offset {end}, the end of the extension area"
    )]
    ExtensionPastEnd {
        /// Offset of the extension's head in cluster 0.
        offset: u64,
        /// Its length including the head.
        len: u64,
        /// Where the extension area ends.
        end: u64,
    },
    /// A header extension has a length its type does not allow.
    #[error("qcow2 {name} extension at offset {offset} is {len} bytes long, expected {expected}")]
    ExtensionLength {
        /// Which extension.
        name: &'static str,
        /// Offset of its head in cluster 0.
        offset: u64,
        /// Its data length.
        len: u64,
        /// The length its type allows.
        expected: &'static str,
    },
    /// The backing file name leaves cluster 0 or is longer than QEMU allows.
    #[error(
        "qcow2 backing file name at offset {offset:#x} ({len} bytes) leaves cluster 0 \
         ({cluster_size} bytes) or is longer than {max_len} bytes"
    )]
    BackingName {
        /// backing_file_offset.
        offset: u64,
        /// backing_file_size.
        len: u64,
        /// The cluster size.
        cluster_size: u64,
        /// The longest name QEMU accepts.
        max_len: u64,
    },
    /// A table (or data cluster) offset is not a multiple of the cluster size.
    #[error(
        "qcow2 {what} at offset {offset:#x} is not aligned to the cluster size {cluster_size}"
    )]
    Unaligned {
        /// Which table.
        what: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A table is larger than this reader's limits.
    #[error(
        "qcow2 {what} at offset {offset:#x} has {entries} entries, more than the limit of \
         {limit_bytes} bytes"
    )]
    TableTooLarge {
        /// Which table.
        what: &'static str,
        /// Its offset in the file.
        offset: u64,
        /// Its declared entries.
        entries: u64,
        /// The limit on its size.
        limit_bytes: u64,
    },
    /// An L2 table entry is malformed.
    #[error(
        "qcow2 L2 table at offset {table_offset:#x}, entry {index} ({entry:#018x}): {problem}"
    )]
    L2Entry {
        /// Offset of the L2 table in the file.
        table_offset: u64,
        /// Index of the entry in the table.
        index: u64,
        /// The entry's standard 64-bit word.
        entry: u64,
        /// What is wrong with it.
        problem: L2Problem,
    },
    /// An L1 table entry is malformed.
    #[error(
        "qcow2 L1 table at offset {table_offset:#x}, entry {index} ({entry:#018x}): {problem}"
    )]
    L1Entry {
        /// Offset of the L1 table in the file.
        table_offset: u64,
        /// Index of the entry in the table.
        index: u64,
        /// The entry.
        entry: u64,
        /// What is wrong with it.
        problem: L1Problem,
    },
    /// A refcount table entry is malformed.
    #[error(
        "qcow2 refcount table at offset {table_offset:#x}, entry {index} ({entry:#018x}): \
         {problem}"
    )]
    RefcountTableEntry {
        /// Offset of the refcount table in the file.
        table_offset: u64,
        /// Index of the entry in the table.
        index: u64,
        /// The entry.
        entry: u64,
        /// What is wrong with it.
        problem: RefcountTableProblem,
    },
    /// The image is marked corrupt (incompatible feature bit 1): QEMU refuses to write it.
    #[error(
        "qcow2 image is marked corrupt (incompatible feature bit 1): repair it with \
         `qemu-img check -r all`, which clears the bit"
    )]
    MarkedCorrupt,
    /// A cluster is referenced more often than its stored refcount says: freeing one
    /// reference would free a cluster still in use.
    #[error(
        "qcow2 cluster {cluster} (offset {offset:#x}) has refcount {stored} but is referenced \
         {computed} times"
    )]
    RefcountTooLow {
        /// The cluster index (host offset >> cluster_bits).
        cluster: u64,
        /// Its host offset.
        offset: u64,
        /// The refcount stored in its refcount block.
        stored: u64,
        /// The references the metadata makes to it.
        computed: u64,
    },
    /// A cluster is referenced more often than a refcount can count.
    #[error(
        "qcow2 cluster {cluster} (offset {offset:#x}) is referenced more than {max} times, \
         the most {limit_of} allows"
    )]
    RefcountOverflow {
        /// The cluster index.
        cluster: u64,
        /// Its host offset.
        offset: u64,
        /// The largest count.
        max: u64,
        /// What sets it: the image's refcount width or the check's counters.
        limit_of: &'static str,
    },
    /// One host cluster is used by two structures that may not share it.
    #[error(
        "qcow2 cluster {cluster} (offset {offset:#x}) is used as {first} and as {second} \
         (referenced at offset {referrer:#x})"
    )]
    ClusterOverlap {
        /// The cluster index.
        cluster: u64,
        /// Its host offset.
        offset: u64,
        /// The use found first.
        first: ClusterUse,
        /// The use that collides with it.
        second: ClusterUse,
        /// File offset of the pointer (table entry or header field) that makes the second use.
        referrer: u64,
    },
    /// The file has more clusters than a refcount check holds counters for.
    #[error(
        "qcow2 file of {file_len} bytes has {clusters} clusters, more than the {limit} a \
         refcount check counts"
    )]
    TooManyClusters {
        /// The file's length.
        file_len: u64,
        /// Its clusters.
        clusters: u64,
        /// The limit.
        limit: u64,
    },
    /// A field of a snapshot table entry exceeds this reader's limits.
    #[error(
        "qcow2 snapshot {index} (table entry at offset {offset:#x}): {field} {value} \
         exceeds {limit}"
    )]
    SnapshotEntry {
        /// Index of the snapshot in the table.
        index: u32,
        /// Offset of its entry in the file.
        offset: u64,
        /// The field's name in the specification.
        field: &'static str,
        /// Its value.
        value: u64,
        /// The limit.
        limit: u64,
    },
    /// The snapshot table is larger than this reader's limit.
    #[error(
        "qcow2 snapshot table at offset {offset:#x} grows past {limit_bytes} bytes at entry \
         {index}"
    )]
    SnapshotTable {
        /// Offset of the table in the file.
        offset: u64,
        /// The entry that crosses the limit.
        index: u32,
        /// The limit on the table's size.
        limit_bytes: u64,
    },
    /// The bitmap directory, or the bitmaps extension naming it, is malformed.
    #[error("qcow2 bitmap directory at offset {offset:#x}: {problem}")]
    BitmapDirectory {
        /// bitmap_directory_offset.
        offset: u64,
        /// What is wrong.
        problem: DirectoryProblem,
    },
    /// A persistent bitmap is malformed, or its content cannot be trusted.
    #[error("qcow2 bitmap '{name}' (directory entry at offset {entry_offset:#x}): {problem}")]
    Bitmap {
        /// The bitmap's name.
        name: String,
        /// Offset of its directory entry in the file.
        entry_offset: u64,
        /// What is wrong.
        problem: BitmapProblem,
    },
    /// The backing chain is deeper than this reader's limit.
    #[error("backing chain deeper than {limit} images at {}", .path.display())]
    BackingDepth {
        /// The backing file that would exceed the depth.
        path: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// A backing file is an image above itself in the chain.
    #[error("backing chain loops: {} is an image above itself in the chain", .path.display())]
    BackingLoop {
        /// The backing file.
        path: PathBuf,
    },
    /// The image uses a feature this reader refuses.
    #[error("unsupported qcow2 feature: {0}")]
    Unsupported(String),
    /// A named snapshot does not exist.
    #[error("no snapshot named or numbered '{0}'")]
    NoSuchSnapshot(String),
    /// Several snapshots carry the name asked for.
    #[error("snapshot name '{name}' is ambiguous (ids {ids}): name the snapshot by id")]
    AmbiguousSnapshot {
        /// The name asked for.
        name: String,
        /// The ids of the snapshots carrying it, comma-separated.
        ids: String,
    },
    /// A compressed cluster does not decompress.
    #[error("compressed cluster at host offset {offset} does not decompress: {reason}")]
    Decompress {
        /// Host offset of the compressed data.
        offset: u64,
        /// What went wrong.
        reason: String,
    },
    /// The consumer of a walk stopped (a writer failed); the walk ends quietly.
    #[error("stopped: the consumer of the change list went away")]
    Cancelled,
    /// Another process holds QEMU image locks that forbid reading the image (or writing it,
    /// for a receive target).
    #[error("{} {conflict}", .path.display())]
    InUse {
        /// The image (or backing file) path.
        path: PathBuf,
        /// What the other process's locks say.
        conflict: crate::image::lock::LockConflict,
    },
    /// Taking or testing QEMU's image locks failed.
    #[error("cannot lock {} (QEMU image locks)", .path.display())]
    Lock {
        /// The image (or backing file) path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing a qcow2 image that is being written failed.
    #[error("{op} of the qcow2 {what} at offset {offset} failed")]
    WriteFailed {
        /// What was read or written.
        what: &'static str,
        /// `read`, `write` or `flush`.
        op: &'static str,
        /// Byte offset in the file.
        offset: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A qcow2 image cannot be written as asked (a limit of its format or of this writer).
    #[error("cannot write the qcow2 image: {0}")]
    Unwritable(String),
    /// Talking to an NBD server failed, or the server sent something this client refuses.
    #[error(transparent)]
    Nbd(#[from] NbdError),
    /// A guest read past the virtual size.
    #[error("guest read at {offset} (+{len} bytes) past the virtual size {size}")]
    OutOfRange {
        /// Guest offset.
        offset: u64,
        /// Length requested.
        len: u64,
        /// Virtual size.
        size: u64,
    },
}

/// Errors encoding or decoding a blkdelta stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// Reading the stream failed.
    #[error("reading the stream failed")]
    Read(#[source] io::Error),
    /// Writing the stream failed.
    #[error("writing the stream failed")]
    Write(#[source] io::Error),
    /// The stream does not start with the blkdelta magic.
    #[error("not a blkdelta stream (bad magic {0:02x?}){hint}", hint = magic_hint(.0))]
    BadMagic([u8; 8]),
    /// The stream's format version is not supported.
    #[error("unsupported stream version {0} (this build reads version {1})")]
    BadVersion(u32, u32),
    /// The stream ended before its end record.
    #[error("stream truncated after {0} bytes (no end record)")]
    Truncated(u64),
    /// A structural rule of the stream is broken.
    #[error("corrupt stream at byte {offset}: {reason}")]
    Corrupt {
        /// Byte position of the record in the stream.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A data record's payload does not match its checksum.
    #[error("checksum mismatch in data record at stream byte {stream_offset} (disk offset {disk_offset})")]
    Checksum {
        /// Byte position of the record in the stream.
        stream_offset: u64,
        /// Disk offset the record targets.
        disk_offset: u64,
    },
    /// A checkpoint, snapshot-end or end record's hash does not match the stream bytes
    /// received: a frame was removed, inserted or altered before it.
    #[error("stream hash mismatch at byte {offset} (a checkpoint, snapshot-end or end record): the stream was altered before it")]
    StreamHash {
        /// Byte position of the record whose hash failed.
        offset: u64,
    },
    /// Compressing or decompressing a payload failed.
    #[error("payload compression failed: {0}")]
    Compression(String),
}

/// How a file that is not qcow2 starts, for [`ImageError::BadMagic`].
fn starts_with(found: &[u8]) -> String {
    if found.is_empty() {
        return "it is empty".into();
    }
    let bytes: Vec<String> = found.iter().map(|b| format!("{b:02x}")).collect();
    format!("it starts with {}", bytes.join(" "))
}

fn magic_hint(magic: &[u8; 8]) -> &'static str {
    if magic.starts_with(&[0x89, b'B', b'L', b'K']) {
        "; it looks mangled by a text-mode transfer (line endings or 8-bit bytes altered)"
    } else {
        ""
    }
}
