//! Block image access: what a sender reads from and a digest is computed over.
//!
//! Every image is seen through [`BlockSource`]: a virtual size, positioned reads of guest bytes,
//! and an allocation status, so that readers skip ranges that hold nothing.

pub mod lock;
pub mod nbd;
pub mod qcow2;
pub mod raw;

#[cfg(any(test, feature = "test-utils"))]
pub mod mem;

use std::path::Path;
use std::sync::Arc;

use crate::ImageError;

/// How to open an image for reading.
///
/// The default is the safe one: take QEMU's reader locks and refuse an image (or backing file)
/// that a writer holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpenOptions {
    /// Read even if a writer holds the image, as `qemu-img -U` (`--force-share`) does: take
    /// and test only the locks that option does (see [`lock`]).
    pub force_share: bool,
}

/// How a range of a virtual disk is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Allocation {
    /// The range holds data that has to be read (it may still happen to be zeros).
    Data,
    /// The range is explicitly zeroed (allocated or not): it reads as zeros.
    Zero,
    /// Nothing in the image (or its backing chain) holds the range: it reads as zeros.
    Hole,
}

/// A virtual disk that can be read at any guest offset.
pub trait BlockSource: Send + Sync {
    /// Virtual size in bytes.
    fn size(&self) -> u64;

    /// Fills `buf` with the guest bytes at `offset`. The whole range must lie within [`size`].
    ///
    /// [`size`]: BlockSource::size
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError>;

    /// Describes the range starting at `offset`: how it is backed and for how many bytes
    /// (at least 1, at most `max_len`, never past [`size`]). `offset` must be below the size.
    ///
    /// [`size`]: BlockSource::size
    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError>;

    /// How many reads at once keep this source busy when that is more than the cores: a
    /// network export answers each read a round trip later, so readers should keep several
    /// in flight. 0 (the default): no more than the cores.
    fn reads_in_flight(&self) -> usize {
        0
    }
}

/// Reads a reader of an image file should keep in flight: a disk answers many requests at
/// once, and cold reads (O_DIRECT, or scattered clusters) see no readahead. On the benchmark's
/// disk (2 cores, bench/run.sh's 2 GiB image), sixteen against two took a cold level-3 send of
/// the seed from 1.14 s to 0.95 s, and an incremental `send -l 0 | receive` from 0.24 s to
/// 0.19 s; each reader holds about 4 MiB while sending.
pub const FILE_READS_IN_FLIGHT: usize = 16;

impl<T: BlockSource + ?Sized> BlockSource for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        (**self).read_at(buf, offset)
    }
    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        (**self).status(offset, max_len)
    }
    fn reads_in_flight(&self) -> usize {
        (**self).reads_in_flight()
    }
}

/// Checks that `[offset, offset + len)` lies within a virtual size.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<(), ImageError> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(ImageError::OutOfRange { offset, len, size }),
    }
}

/// The format of an image file, decided by its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A qcow2 image (magic `QFI\xfb`).
    Qcow2,
    /// Anything else: raw bytes, a raw file or a block device.
    Raw,
}

/// Probes the format of the file at `path` by its magic.
pub fn probe_format(path: &Path) -> Result<Format, ImageError> {
    use std::io::Read;
    let open_err = |source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::open(path).map_err(open_err)?;
    let mut magic = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match f.read(&mut magic[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ImageError::Read {
                    offset: got as u64,
                    len: 4,
                    source,
                })
            }
        }
    }
    Ok(if got == 4 && magic == qcow2::MAGIC {
        Format::Qcow2
    } else {
        Format::Raw
    })
}
