//! A qcow2 replica that keeps history: data goes into the active layer, and each snapshot the
//! stream reaches becomes an internal snapshot of the image, carrying the source snapshot's
//! id, name, dates and size when the stream says them (so its GUID is the source's and the
//! replica can be sent on), else the stream state's name and the time it was reached.

use std::path::Path;
use std::sync::{Arc, Mutex};

use blkdelta_common::image::qcow2::{Qcow2Writer, SnapshotMeta};
use blkdelta_common::image::raw::RawImage;
use blkdelta_common::image::{Allocation, BlockSource};
use blkdelta_common::stream::{SnapshotEnd, SnapshotInfo};
use blkdelta_common::ImageError;

use super::Target;
use crate::ReceiveError;

/// Cluster size of a new qcow2 replica when none is asked for (qemu-img's default).
pub const DEFAULT_CLUSTER_BITS: u32 = 16;

/// A qcow2 file holding a replica with its snapshots.
#[derive(Debug)]
pub struct Qcow2Target {
    writer: Arc<Mutex<Qcow2Writer>>,
}

impl Qcow2Target {
    /// Opens the qcow2 image at `path` for writing (QEMU's write locks taken), or creates an
    /// empty one with clusters of `1 << cluster_bits` bytes when the path is missing.
    pub fn open(path: &Path, cluster_bits: u32) -> Result<Self, ReceiveError> {
        let made = if path.exists() {
            Qcow2Writer::open(path)
        } else {
            Qcow2Writer::create(path, 0, cluster_bits)
        };
        let writer = made.map_err(|e| match e {
            ImageError::InUse { .. } | ImageError::Lock { .. } => ReceiveError::TargetLocked(e),
            e => ReceiveError::Qcow2 {
                op: "open",
                path: path.to_path_buf(),
                source: e,
            },
        })?;
        Ok(Qcow2Target {
            writer: Arc::new(Mutex::new(writer)),
        })
    }

    fn w(&self) -> std::sync::MutexGuard<'_, Qcow2Writer> {
        self.writer.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `op` on the writer, naming a failure as the target's.
    fn with<T>(
        &self,
        op: &'static str,
        offset: u64,
        len: u64,
        f: impl FnOnce(&mut Qcow2Writer) -> Result<T, ImageError>,
    ) -> Result<T, ReceiveError> {
        let mut w = self.w();
        f(&mut w).map_err(|e| target_error(op, offset, len, e))
    }
}

/// A writer's failure as the target's: I/O errors keep their cause (a full disk says so).
fn target_error(op: &'static str, offset: u64, len: u64, e: ImageError) -> ReceiveError {
    match e {
        ImageError::WriteFailed { source, .. } => ReceiveError::Target {
            op,
            offset,
            len,
            source,
        },
        other => ReceiveError::Failed(format!(
            "{op} at offset {offset} of the qcow2 replica: {other}"
        )),
    }
}

impl Target for Qcow2Target {
    fn size(&self) -> u64 {
        self.w().size()
    }

    fn capacity(&self) -> Option<u64> {
        None
    }

    fn set_size(&mut self, size: u64) -> Result<(), ReceiveError> {
        self.with("resize", size, 0, |w| w.set_size(size))
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ReceiveError> {
        self.with("write", offset, buf.len() as u64, |w| {
            w.write_at(buf, offset)
        })
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        self.with("zero", offset, len, |w| w.zero(offset, len))
    }

    fn discard(&mut self, offset: u64, len: u64) -> Result<(), ReceiveError> {
        self.with("discard", offset, len, |w| w.zero(offset, len))
    }

    fn flush(&mut self) -> Result<(), ReceiveError> {
        self.with("flush", 0, 0, Qcow2Writer::commit)
    }

    fn is_block_device(&self) -> bool {
        false
    }

    fn identity(&self) -> Option<crate::identity::Identity> {
        let meta = self.w().file().metadata().ok()?;
        Some(crate::identity::Identity::of_image(&meta))
    }

    fn reader(&self) -> Option<RawImage> {
        None
    }

    fn write_handle(&self) -> Option<std::fs::File> {
        self.w().file().try_clone().ok()
    }

    fn direct_handle(&self) -> Option<std::fs::File> {
        blkdelta_common::image::raw::reopen_direct(self.w().file(), true)
    }

    fn place(&mut self, offset: u64, len: u64) -> Result<Option<u64>, ReceiveError> {
        self.with("write", offset, len, |w| w.place(offset, len))
    }

    fn shares_clusters(&self) -> bool {
        true
    }

    fn source(&self) -> Option<Box<dyn BlockSource>> {
        Some(Box::new(ActiveLayer {
            writer: self.writer.clone(),
        }))
    }

    fn keep_snapshot(
        &mut self,
        end: &SnapshotEnd,
        info: Option<&SnapshotInfo>,
    ) -> Result<Option<[u8; 16]>, ReceiveError> {
        self.with("snapshot", 0, 0, |w| {
            // The same state reached again (after a revert, or by an apply killed before its
            // state said so): the new snapshot is what the active layer maps, the old goes.
            let again: Vec<usize> = w
                .snapshots()
                .iter()
                .enumerate()
                .filter(|(_, s)| info.is_some() && s.guid() == end.guid)
                .map(|(i, _)| i)
                .collect();
            w.delete_snapshots(&again)?;
            let meta = snapshot_meta(end, info, &w.snapshots());
            w.create_snapshot(&meta)?;
            let made = w.snapshots().pop().expect("just created");
            Ok(Some(made.guid()))
        })
    }
}

/// What the snapshot for `end` records: the source snapshot's own fields when the stream
/// carries them and their id is free in the replica (its GUID is then the source's), else
/// the next free id, the stream state's name (made unique) and the time now.
fn snapshot_meta(
    end: &SnapshotEnd,
    info: Option<&SnapshotInfo>,
    existing: &[blkdelta_common::image::qcow2::Snapshot],
) -> SnapshotMeta {
    let id_taken = |id: &str| existing.iter().any(|s| s.id == id);
    let next_id = existing
        .iter()
        .filter_map(|s| s.id.parse::<u64>().ok())
        .max()
        .unwrap_or(0)
        + 1;
    if let Some(i) = info.filter(|i| !id_taken(&i.id)) {
        return SnapshotMeta {
            id: i.id.clone(),
            name: i.name.clone(),
            date_sec: i.date_sec,
            date_nsec: i.date_nsec,
            vm_clock_nsec: i.vm_clock_nsec,
            disk_size: i.disk_size,
        };
    }
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let name_taken = |n: &str| existing.iter().any(|s| s.name == n);
    let name = if info.is_some() || !name_taken(&end.name) {
        end.name.clone()
    } else {
        (2..)
            .map(|k| format!("{}-{k}", end.name))
            .find(|n| !name_taken(n))
            .expect("a free name")
    };
    SnapshotMeta {
        id: next_id.to_string(),
        name,
        date_sec: u32::try_from(now.as_secs()).unwrap_or(u32::MAX),
        date_nsec: now.subsec_nanos(),
        vm_clock_nsec: 0,
        disk_size: end.virtual_size,
    }
}

/// The replica's active layer as the writer has it, read from other threads.
struct ActiveLayer {
    writer: Arc<Mutex<Qcow2Writer>>,
}

impl BlockSource for ActiveLayer {
    fn size(&self) -> u64 {
        self.writer.lock().unwrap_or_else(|e| e.into_inner()).size()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .read_at(buf, offset)
    }

    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        let size = self.size();
        Ok((Allocation::Data, max_len.min(size - offset)))
    }
}
