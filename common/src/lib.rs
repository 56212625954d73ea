//! Shared pieces of blkdelta: the stream format, extents, the image digest and block image
//! access (raw files, block devices and the qcow2 reader).
//!
//! `send` and `receive` never depend on each other; they meet only in the types of this crate.
//!
//! ```
//! use blkdelta_common::extent::{Extent, ExtentKind};
//! let e = Extent::new(0, 4096, ExtentKind::Data);
//! assert_eq!(e.end(), 4096);
//! ```
// unsafe only where a syscall needs it and no safe wrapper exists (the OFD byte-range lock
// fcntls of `image::lock`, `cachestat` in `image::raw`) and for the byte view of
// `buf::AlignedBuf`; each block has a `// SAFETY:` comment and an `allow` on its function.
#![deny(unsafe_code)]

pub mod blocklist;
pub mod buf;
pub mod digest;
pub mod error;
pub mod extent;
pub mod hex;
pub mod image;
pub mod limits;
pub mod progress;
pub mod qmp;
pub mod stream;
#[cfg(any(test, feature = "test-utils"))]
pub mod testing;
pub mod time;

pub use error::{ImageError, StreamError};
