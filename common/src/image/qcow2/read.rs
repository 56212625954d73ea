//! Guest reads and allocation status of a [`Qcow2Layer`], built on its lookup.

use std::sync::Arc;

use super::decompress::decompress_cluster;
use super::layer::{Piece, Qcow2Layer};
use super::tables::compressed_descriptor;
use crate::image::raw::pread_exact;
use crate::image::{check_range, Allocation, BlockSource};
use crate::ImageError;

/// Most lookups one `status` call merges: bounds its work on hostile tables (runs that never
/// merge inside a lookup), while an L2 table of a uniform kind is one lookup.
const MAX_STATUS_STEPS: u32 = 1024;

impl Qcow2Layer {
    /// Reads `buf.len()` bytes of data clusters at host offset `host`.
    fn read_host(&self, buf: &mut [u8], host: u64) -> Result<(), ImageError> {
        let file_len = self.inner.image.file_len;
        let len = buf.len() as u64;
        if host.checked_add(len).is_none_or(|end| end > file_len) {
            return Err(ImageError::PastEnd {
                what: "data cluster",
                offset: host,
                len,
                file_len,
            });
        }
        let image = &self.inner.image;
        let direct = image.direct.read(&image.file, buf, host)?;
        image.counters.data_read(len, direct);
        Ok(())
    }

    /// Reads unallocated guest bytes: from the backing source where it has them, else zeros.
    fn read_backing(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        let backing = match &self.inner.backing {
            Some(b) if offset < b.size() => b,
            _ => {
                buf.fill(0);
                return Ok(());
            }
        };
        let n = (backing.size() - offset).min(buf.len() as u64) as usize;
        backing.read_at(&mut buf[..n], offset)?;
        buf[n..].fill(0);
        Ok(())
    }

    /// The decompressed content of the compressed cluster described by L2 entry `entry`.
    fn decompressed(&self, entry: u64) -> Result<Arc<[u8]>, ImageError> {
        if let Some((e, data)) = &self.lock_cache().cluster {
            if *e == entry {
                return Ok(data.clone());
            }
        }
        let image = &self.inner.image;
        let (coffset, csize) = compressed_descriptor(entry, image.header.cluster_bits);
        if coffset >= image.file_len {
            return Err(ImageError::PastEnd {
                what: "compressed cluster",
                offset: coffset,
                len: csize,
                file_len: image.file_len,
            });
        }
        // The sector-rounded size may run past the end of the file: QEMU reads zeros there,
        // and the stream itself ends before.
        let mut input = vec![0u8; csize.min(image.file_len - coffset) as usize];
        pread_exact(&image.file, &mut input, coffset)?;
        image.counters.data_read(input.len() as u64, false);
        let mut out = vec![0u8; image.header.cluster_size() as usize];
        decompress_cluster(image.header.compression_type, &input, &mut out, coffset)?;
        let data: Arc<[u8]> = out.into();
        self.lock_cache().cluster = Some((entry, data.clone()));
        Ok(data)
    }

    /// The status of one lookup run at `offset` (at most `max_len` bytes), or `None` when
    /// the run would need the backing file's status and `backing_asked` says it was already
    /// asked during this `status` call.
    fn status_once(
        &self,
        offset: u64,
        max_len: u64,
        backing_asked: &mut bool,
    ) -> Result<Option<(Allocation, u64)>, ImageError> {
        let (piece, len) = self.lookup(offset, max_len)?;
        Ok(Some(match piece {
            Piece::Host(_) | Piece::Compressed { .. } => (Allocation::Data, len),
            Piece::Zero => (Allocation::Zero, len),
            Piece::Unallocated => match &self.inner.backing {
                Some(b) if offset < b.size() => {
                    if std::mem::replace(backing_asked, true) {
                        return Ok(None);
                    }
                    let (a, n) = b.status(offset, len.min(b.size() - offset))?;
                    (a, n.clamp(1, len))
                }
                _ => (Allocation::Hole, len),
            },
        }))
    }
}

impl BlockSource for Qcow2Layer {
    /// The snapshot's disk size, or the header's size for the active layer.
    fn size(&self) -> u64 {
        self.inner.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.inner.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let (piece, n) = self.lookup(at, (buf.len() - done) as u64)?;
            let chunk = &mut buf[done..done + n as usize];
            match piece {
                Piece::Host(host) => self.read_host(chunk, host)?,
                Piece::Zero => chunk.fill(0),
                Piece::Unallocated => self.read_backing(chunk, at)?,
                Piece::Compressed { entry, in_cluster } => {
                    let data = self.decompressed(entry)?;
                    let start = in_cluster as usize;
                    chunk.copy_from_slice(&data[start..start + chunk.len()]);
                }
            }
            done += n as usize;
        }
        Ok(())
    }

    /// Data for normal and compressed (sub)clusters, Zero for zero ones, and for unallocated
    /// ones the backing file's status (Hole without one, or past its end). Consecutive runs of
    /// the same kind are merged (with a bounded amount of work per call); only metadata is read.
    ///
    /// The backing file is asked at most once per call: each merges up to
    /// `MAX_STATUS_STEPS` lookups of its own, so asking it for every unallocated run would
    /// make one call cost `MAX_STATUS_STEPS` to the power of the chain's depth.
    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        check_range(offset, 1, self.inner.size)?;
        let limit = max_len.min(self.inner.size - offset).max(1);
        let mut backing_asked = false;
        let (kind, mut len) = self
            .status_once(offset, limit, &mut backing_asked)?
            .expect("the first run may ask the backing file");
        let mut steps = 1;
        while len < limit && steps < MAX_STATUS_STEPS {
            steps += 1;
            let Some((next, n)) =
                self.status_once(offset + len, limit - len, &mut backing_asked)?
            else {
                break;
            };
            if next != kind {
                break;
            }
            len += n;
        }
        Ok((kind, len))
    }

    fn reads_in_flight(&self) -> usize {
        crate::image::FILE_READS_IN_FLIGHT
    }
}
