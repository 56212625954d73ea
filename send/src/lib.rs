//! The sending side of blkdelta: change sources and the send pipeline.
//!
//! A [`ChangeSource`] says which transitions a stream carries and, for each, pushes the sorted
//! extents that changed (found from metadata, never by reading unchanged data). The
//! [`pipeline`] reads only the data extents, in 1 MiB-aligned chunks, hashes and compresses
//! them on worker threads, and frames the records in order. [`pace::Paced`] holds a stream
//! to a rate (`send --bwlimit`).
//!
//! ```no_run
//! use blkdelta_send::{pipeline::{send, SendOptions}, source::open_source, NoProgress};
//! let source = open_source("vm.qcow2@mon..fri").unwrap();
//! let out = std::fs::File::create("delta.bd").unwrap();
//! send(source.as_ref(), &SendOptions::default(), out, &NoProgress).unwrap();
//! ```
#![forbid(unsafe_code)]

pub mod pace;
pub mod pipeline;
pub mod source;

pub use blkdelta_common::progress::{NoProgress, Progress};
pub use source::ChangeSource;

use blkdelta_common::{ImageError, StreamError};

/// Errors of the sending side.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// Reading the source image failed.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Writing the stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The source cannot be sent.
    #[error("{0}")]
    Source(String),
    /// The source is named wrongly on the command line (a usage error).
    #[error("{0}")]
    Usage(String),
    /// The point-in-time view of a running QEMU's disk could not be taken or torn down.
    #[error("{0}")]
    Live(String),
}
