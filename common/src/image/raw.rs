//! Raw images: regular files (sparse or not) and block devices, read with `pread`.
//!
//! Allocation comes from `SEEK_DATA`/`SEEK_HOLE` where the filesystem answers them; a block
//! device, or a filesystem that does not, is all data.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use rustix::fs::SeekFrom;

use super::lock::lock_for_read;
use super::{check_range, Allocation, BlockSource, OpenOptions};
use crate::ImageError;

/// A raw image file or block device opened read-only.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    size: u64,
    is_block_device: bool,
}

impl RawImage {
    /// Opens `path` read-only with the default [`OpenOptions`] (QEMU's reader locks); its size
    /// is the file length or the device size.
    pub fn open(path: &Path) -> Result<Self, ImageError> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Opens `path` read-only, taking QEMU's reader locks as `options` say: they are held
    /// until the image is dropped.
    pub fn open_with(path: &Path, options: &OpenOptions) -> Result<Self, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        lock_for_read(&file, path, options)?;
        Self::from_file(file).map_err(open_err)
    }

    /// Wraps an open file or block device (taking no locks).
    pub fn from_file(file: File) -> std::io::Result<Self> {
        let meta = file.metadata()?;
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            rustix::fs::seek(&file, SeekFrom::End(0))?
        } else {
            meta.len()
        };
        Ok(RawImage {
            file,
            size,
            is_block_device,
        })
    }

    /// Limits the virtual size to `size` when that is smaller (a device larger than the disk
    /// it holds).
    pub fn limit_size(&mut self, size: u64) {
        self.size = self.size.min(size);
    }

    /// Whether the image is a block device.
    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    /// The next data offset at or after `offset`, or `None` when only a hole follows.
    /// Errors (a filesystem without `SEEK_DATA`) count as "data here".
    fn next_data(&self, offset: u64) -> Option<u64> {
        match rustix::fs::seek(&self.file, SeekFrom::Data(offset)) {
            Ok(pos) => Some(pos),
            Err(rustix::io::Errno::NXIO) => None,
            Err(_) => Some(offset),
        }
    }

    fn next_hole(&self, offset: u64) -> u64 {
        rustix::fs::seek(&self.file, SeekFrom::Hole(offset)).unwrap_or(self.size)
    }
}

/// Reads exactly `buf.len()` bytes at `offset` of `file`, naming the offset on failure.
pub fn pread_exact(file: &File, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
    file.read_exact_at(buf, offset)
        .map_err(|source| ImageError::Read {
            offset,
            len: buf.len(),
            source,
        })
}

impl BlockSource for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        pread_exact(&self.file, buf, offset)
    }

    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        check_range(offset, 1, self.size)?;
        let limit = max_len.min(self.size - offset).max(1);
        if self.is_block_device {
            return Ok((Allocation::Data, limit));
        }
        match self.next_data(offset) {
            None => Ok((Allocation::Hole, limit)),
            Some(d) if d > offset => Ok((Allocation::Hole, (d - offset).min(limit))),
            Some(_) => {
                let hole = self.next_hole(offset).max(offset + 1);
                Ok((Allocation::Data, (hole - offset).min(limit)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn sparse_file_reports_holes_and_reads_data() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(8 << 20).unwrap();
        f.as_file().write_all_at(&[7u8; 4096], 4 << 20).unwrap();
        f.flush().unwrap();
        let img = RawImage::open(f.path()).unwrap();
        assert_eq!(img.size(), 8 << 20);
        let (a, len) = img.status(0, u64::MAX).unwrap();
        // tmpfs and most filesystems report the leading hole; others say data: both are valid.
        if a == Allocation::Hole {
            assert!(len <= 4 << 20);
        }
        let mut buf = [0u8; 8];
        img.read_at(&mut buf, 4 << 20).unwrap();
        assert_eq!(buf, [7u8; 8]);
        assert!(img.read_at(&mut buf, (8 << 20) - 4).is_err());
    }
}
