//! Error types of the shared crate: one enum per boundary (images, streams).

use std::io;
use std::path::PathBuf;

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
    /// A structure of the image is malformed.
    #[error("invalid qcow2 image: {0}")]
    Invalid(String),
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

fn magic_hint(magic: &[u8; 8]) -> &'static str {
    if magic.starts_with(&[0x89, b'B', b'L', b'K']) {
        "; it looks mangled by a text-mode transfer (line endings or 8-bit bytes altered)"
    } else {
        ""
    }
}
