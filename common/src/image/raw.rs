//! Raw images: regular files (sparse or not) and block devices, read with `pread`.
//!
//! Allocation comes from `SEEK_DATA`/`SEEK_HOLE` where the filesystem answers them; a block
//! device, or a filesystem that does not, is all data.

use std::fs::File;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use rustix::fs::SeekFrom;

use super::lock::lock_for_read;
use super::{check_range, Allocation, BlockSource, OpenOptions};
use crate::buf::ALIGN;
use crate::ImageError;

/// A raw image file or block device opened read-only.
#[derive(Debug)]
pub struct RawImage {
    file: File,
    direct: DirectReads,
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
            direct: DirectReads::default(),
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

/// Reads of guest data that go around the page cache (`O_DIRECT`) where they can: from the
/// disk straight into the caller's buffer, without the copy out of the page cache and without
/// filling it with data read once (a seed of a large disk would otherwise push out what the
/// host has cached). A range the page cache holds whole is read from it (`cachestat(2)` tells,
/// without reading), so a cached image is read at memory speed; so is everything where the
/// kernel cannot tell (before Linux 6.5, where the call is refused, on overlayfs).
/// A read whose buffer, offset or length is not [`ALIGN`]-aligned (a compressed cluster, a
/// sub-cluster, a buffer that is not an [`AlignedBuf`](crate::buf::AlignedBuf)) goes through
/// the page cache, and so does every read once the file system has refused a direct one.
///
/// A direct read sees what was written through the page cache: the kernel writes such pages
/// back before it reads around them.
#[derive(Debug, Default)]
pub(crate) struct DirectReads {
    /// A second open of the file with `O_DIRECT`, made on the first aligned read (`None`
    /// where that is refused, or on overlayfs).
    handle: OnceLock<Option<File>>,
    refused: AtomicBool,
    /// The kernel cannot tell what is cached: read through the page cache.
    blind: AtomicBool,
}

impl DirectReads {
    /// Reads exactly `buf.len()` bytes at `offset` of `file`, directly when it can; whether
    /// it did.
    pub(crate) fn read(
        &self,
        file: &File,
        buf: &mut [u8],
        offset: u64,
    ) -> Result<bool, ImageError> {
        if self.read_direct(file, buf, offset) {
            return Ok(true);
        }
        pread_exact(file, buf, offset).map(|()| false)
    }

    /// Whether part of `[offset, offset + len)` is not in the page cache; `None` when the
    /// kernel cannot tell.
    fn partly_uncached(&self, file: &File, offset: u64, len: u64) -> Option<bool> {
        if self.blind.load(Ordering::Relaxed) {
            return None;
        }
        match cachestat::cached_pages(file, offset, len) {
            Some((cached, touched)) => Some(cached < touched),
            None => {
                self.blind.store(true, Ordering::Relaxed);
                None
            }
        }
    }

    /// Whether `buf` was read directly; `false` when it has to go through the page cache.
    fn read_direct(&self, file: &File, buf: &mut [u8], offset: u64) -> bool {
        let aligned = !buf.is_empty()
            && buf.as_ptr() as usize % ALIGN == 0
            && buf.len() % ALIGN == 0
            && offset % ALIGN as u64 == 0;
        if !aligned || self.refused.load(Ordering::Relaxed) {
            return false;
        }
        let direct = self
            .handle
            .get_or_init(|| reopen_direct(file, false).filter(|_| !on_overlayfs(file)));
        let Some(direct) = direct else {
            return false;
        };
        if self.partly_uncached(file, offset, buf.len() as u64) != Some(true) {
            return false;
        }
        // One read: a short one (a file cut short meanwhile) or a failure is retried through
        // the page cache, which reports what is wrong in the usual words.
        match direct.read_at(buf, offset) {
            Ok(n) => n == buf.len(),
            Err(e) => {
                let unsupported = [libc::EINVAL, libc::EOPNOTSUPP, libc::ENOTSUP];
                if e.raw_os_error().is_some_and(|c| unsupported.contains(&c)) {
                    self.refused.store(true, Ordering::Relaxed);
                }
                false
            }
        }
    }
}

/// Whether `file` is on overlayfs, whose page cache belongs to the file below it: `cachestat`
/// on the overlay's file sees none of it, so every read would look cold.
fn on_overlayfs(file: &File) -> bool {
    const OVERLAYFS_SUPER_MAGIC: u64 = 0x794c_7630;
    rustix::fs::fstatfs(file).is_ok_and(|st| st.f_type as u64 == OVERLAYFS_SUPER_MAGIC)
}

/// `cachestat(2)` (Linux 6.5): how much of a range of a file the page cache holds, found
/// without reading anything. Neither libc nor rustix wraps it yet, hence the raw syscall.
mod cachestat {
    use std::fs::File;
    use std::os::fd::AsRawFd;

    /// Its number in the generic table, which every architecture uses for calls this new
    /// (MIPS offsets it: there it is not asked).
    #[cfg(not(any(target_arch = "mips", target_arch = "mips64")))]
    const SYS_CACHESTAT: libc::c_long = 451;

    #[repr(C)]
    struct Range {
        off: u64,
        len: u64,
    }

    #[repr(C)]
    #[derive(Default)]
    struct Stat {
        nr_cache: u64,
        nr_dirty: u64,
        nr_writeback: u64,
        nr_evicted: u64,
        nr_recently_evicted: u64,
    }

    /// Pages of `[offset, offset + len)` (`len` > 0) in the page cache, and the pages the
    /// range touches; `None` where the kernel cannot say.
    #[cfg(any(target_arch = "mips", target_arch = "mips64"))]
    pub(super) fn cached_pages(_: &File, _: u64, _: u64) -> Option<(u64, u64)> {
        None
    }

    #[cfg(not(any(target_arch = "mips", target_arch = "mips64")))]
    #[allow(unsafe_code)]
    pub(super) fn cached_pages(file: &File, offset: u64, len: u64) -> Option<(u64, u64)> {
        let page = rustix::param::page_size() as u64;
        let range = Range { off: offset, len };
        let mut stat = Stat::default();
        // SAFETY: `range` and `stat` have the kernel's layout and outlive the call, which
        // reads the one and writes the other.
        let r = unsafe {
            libc::syscall(
                SYS_CACHESTAT,
                file.as_raw_fd(),
                &range as *const Range,
                &mut stat as *mut Stat,
                0u32,
            )
        };
        let touched = (offset + len - 1) / page - offset / page + 1;
        (r == 0).then_some((stat.nr_cache, touched))
    }
}

/// Writes back and drops the page cache of `file`, as a cold read finds it; whether reads of it
/// can go around the page cache here, observably: the file system takes `O_DIRECT`, the kernel
/// tells what is cached, and the cache is gone (tmpfs keeps it: its pages are the file).
#[cfg(test)]
pub(crate) fn make_cold(file: &File) -> bool {
    file.sync_all().unwrap();
    rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
    let len = file.metadata().unwrap().len().max(1);
    reopen_direct(file, false).is_some()
        && !on_overlayfs(file)
        && cachestat::cached_pages(file, 0, len).is_some_and(|(cached, _)| cached == 0)
}

/// Opens the file behind `file` again with `O_DIRECT`, for reading or (`write`) for writing: a
/// new open file, so that the flag does not reach `file`, made through `/proc/self/fd`, so
/// that it is the same file even if its path now names another. `None` where that is refused.
pub fn reopen_direct(file: &File, write: bool) -> Option<File> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_DIRECT)
        .open(format!("/proc/self/fd/{}", file.as_raw_fd()))
        .ok()
}

impl BlockSource for RawImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.direct.read(&self.file, buf, offset).map(drop)
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

    fn reads_in_flight(&self) -> usize {
        super::FILE_READS_IN_FLIGHT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn cold_aligned_reads_leave_the_page_cache_alone() {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        let data: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let file = f.as_file();
        let direct = make_cold(file);
        let img = RawImage::open(f.path()).unwrap();
        let cached = |off: u64, len: u64| cachestat::cached_pages(file, off, len);
        // An aligned read of a cold range: around the page cache, which stays empty there.
        let mut buf = crate::buf::AlignedBuf::zeroed(64 << 10);
        img.read_at(&mut buf, 64 << 10).unwrap();
        assert!(buf[..] == data[64 << 10..128 << 10]);
        if direct {
            let (pages, _) = cached(64 << 10, 64 << 10).unwrap();
            assert_eq!(pages, 0, "read directly");
        }
        // An unaligned buffer, or offset: through the page cache.
        let mut odd = crate::buf::AlignedBuf::zeroed((8 << 10) + 1);
        img.read_at(&mut odd[1..], 128 << 10).unwrap();
        assert!(odd[1..] == data[128 << 10..136 << 10]);
        img.read_at(&mut buf[..4096], 4095).unwrap();
        assert!(buf[..4096] == data[4095..8191]);
        if direct {
            let (pages, touched) = cached(128 << 10, 8 << 10).unwrap();
            assert_eq!(pages, touched, "read through the cache");
        }
        // A range the page cache holds whole is read from it, as it is.
        std::fs::read(f.path()).unwrap();
        img.read_at(&mut buf, 0).unwrap();
        assert!(buf[..] == data[..64 << 10]);
    }

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
