//! Which snapshot the active layer of an image is: the one whose mapping it has. Clusters
//! and tables shared with a snapshot are never changed in place, so equal host offsets mean
//! equal content; the active layer equals a snapshot when, for every guest cluster of the
//! disk, both map the same host cluster (or both read zeros).

use crate::image::qcow2::bytes::{be_u64, check_table};
use crate::image::qcow2::layer::read_l1;
use crate::image::qcow2::tables::{
    classify_cluster, ClusterKind, L1E_OFFSET_MASK, QCOW_OFLAG_COPIED,
};
use crate::image::qcow2::Qcow2Image;
use crate::image::raw::pread_exact;
use crate::ImageError;

impl Qcow2Image {
    /// Whether the active layer maps exactly what snapshot `index` maps (same size, same
    /// clusters). Reads the L1 tables and, where they differ, both L2 tables.
    pub fn active_is_snapshot(&self, index: usize) -> Result<bool, ImageError> {
        let inner = &self.inner;
        let h = &inner.header;
        let Some(s) = self.snapshots().get(index) else {
            return Err(ImageError::NoSuchSnapshot(format!("#{index}")));
        };
        if s.disk_size != h.size {
            return Ok(false);
        }
        let active = read_l1(inner, h.l1_table_offset, h.l1_size, h.size)?;
        let snap = read_l1(inner, s.l1_table_offset, s.l1_size, s.disk_size)?;
        let needed = h.geometry().l1_entries_for(h.size) as usize;
        for i in 0..needed {
            let a = active.get(i).copied().unwrap_or(0) & L1E_OFFSET_MASK;
            let b = snap.get(i).copied().unwrap_or(0) & L1E_OFFSET_MASK;
            if a == b {
                continue;
            }
            if self.mapping(a)? != self.mapping(b)? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// The newest snapshot the active layer equals, if any (see
    /// [`Qcow2Image::active_is_snapshot`]).
    pub fn held_snapshot(&self) -> Result<Option<usize>, ImageError> {
        for i in (0..self.snapshots().len()).rev() {
            if self.active_is_snapshot(i)? {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    /// What the L2 table at `at` maps, entry by entry, with what does not change a read
    /// masked away (COPIED; zero and unallocated clusters alike when there is no backing
    /// file); all unmapped for `at == 0`.
    fn mapping(&self, at: u64) -> Result<Vec<u64>, ImageError> {
        let inner = &self.inner;
        let h = &inner.header;
        let g = h.geometry();
        let words = if g.extended_l2 { 2 } else { 1 } * g.l2_entries as usize;
        if at == 0 {
            return Ok(vec![0; words]);
        }
        let cs = h.cluster_size();
        check_table("L2 table", at, cs, cs, inner.file_len)?;
        let mut raw = vec![0u8; cs as usize];
        pread_exact(&inner.file, &mut raw, at)?;
        let backing = h.backing_file.is_some();
        let mut out = Vec::with_capacity(words);
        for w in raw.chunks_exact(8).take(words).map(|b| be_u64(b, 0)) {
            let plain = w & !QCOW_OFLAG_COPIED;
            if g.extended_l2 {
                out.push(plain);
                continue;
            }
            out.push(match classify_cluster(w, g) {
                Ok(ClusterKind::Unallocated) if backing => 1,
                Ok(
                    ClusterKind::Unallocated | ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc(_),
                ) => 0,
                _ => plain,
            });
        }
        Ok(out)
    }
}
