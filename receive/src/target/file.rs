//! A raw image file: created sparse when missing, grown or shrunk to the stream's size.

use std::fs::{File, OpenOptions};
use std::path::Path;

use rustix::fs::FallocateFlags;

use super::{pwrite_all, sync_data, try_fallocate, write_zeroes_plain, Target, WriteBehind};
use blkdelta_common::image::lock::lock_for_write;
use blkdelta_common::image::raw::RawImage;

use crate::ReceiveError;

/// A regular file holding a raw replica.
#[derive(Debug)]
pub struct FileTarget {
    file: File,
    size: u64,
    behind: WriteBehind,
}

impl FileTarget {
    /// Opens `path` for writing, creating it empty when missing, and takes QEMU's locks of a
    /// writer that shares nothing on it (see [`lock_for_write`]): they last as long as the target.
    pub fn open(path: &Path) -> Result<Self, ReceiveError> {
        let open_err = |source| ReceiveError::OpenTarget {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(open_err)?;
        // Before anything is written or resized: nobody else may have the replica open while
        // it is received, and the locks last as long as `file`.
        lock_for_write(&file, path).map_err(ReceiveError::TargetLocked)?;
        let size = file.metadata().map_err(open_err)?.len();
        Ok(FileTarget {
            file,
            size,
            behind: WriteBehind::default(),
        })
    }
}

impl Target for FileTarget {
    fn size(&self) -> u64 {
        self.size
    }

    fn capacity(&self) -> Option<u64> {
        None
    }

    fn set_size(&mut self, size: u64) -> Result<(), ReceiveError> {
        if size != self.size {
            self.file
                .set_len(size)
                .map_err(|source| ReceiveError::Target {
                    op: "resize",
                    offset: size,
                    len: 0,
                    source,
                })?;
            self.size = size;
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ReceiveError> {
        pwrite_all(&self.file, buf, offset)?;
        self.behind.wrote(&self.file, offset, buf.len() as u64);
        Ok(())
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        let zero = FallocateFlags::ZERO_RANGE | FallocateFlags::KEEP_SIZE;
        if try_fallocate(&self.file, zero, offset, len, "zero")? {
            return Ok(());
        }
        self.discard(offset, len)
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if try_fallocate(&self.file, punch, offset, len, "discard")? {
            return Ok(());
        }
        write_zeroes_plain(&self.file, offset, len)
    }

    fn flush(&mut self) -> Result<(), ReceiveError> {
        sync_data(&self.file)
    }

    fn is_block_device(&self) -> bool {
        false
    }

    fn identity(&self) -> Option<crate::identity::Identity> {
        let meta = self.file.metadata().ok()?;
        Some(crate::identity::Identity::of_file(&meta))
    }

    fn write_handle(&self) -> Option<File> {
        self.file.try_clone().ok()
    }

    fn direct_handle(&self) -> Option<File> {
        blkdelta_common::image::raw::reopen_direct(&self.file, true)
    }

    fn reader(&self) -> Option<RawImage> {
        RawImage::from_file(self.file.try_clone().ok()?).ok()
    }
}
