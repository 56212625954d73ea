//! A new, empty image: built under a temporary name beside the target and renamed into place
//! once complete, so a crash never leaves a half-made image at the target's path.
//!
//! ```text
//! cluster 0: header (v3, 112 bytes) + end of extensions | cluster 1: refcount table
//! cluster 2: refcount block (16-bit refcounts; clusters 0-2 used) | then the L1 table
//! ```

use std::fs::OpenOptions;
use std::path::Path;

use super::io::{sync, write_at};
use super::Qcow2Writer;
use crate::image::qcow2::header::MAGIC;
use crate::ImageError;

/// The refcount order of new images (16-bit refcounts, as qemu-img creates them).
const REFCOUNT_ORDER: u32 = 4;

impl Qcow2Writer {
    /// Creates a version 3 image of `size` bytes with clusters of `1 << cluster_bits` bytes
    /// at `path` (which must not exist yet), with no data and no snapshots, and opens it.
    pub fn create(path: &Path, size: u64, cluster_bits: u32) -> Result<Qcow2Writer, ImageError> {
        if !(9..=21).contains(&cluster_bits) {
            return Err(ImageError::ClusterBits { bits: cluster_bits });
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.blkdelta-new"));
        let open_err = |source| ImageError::Open {
            path: tmp.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(open_err)?;
        let cs = 1u64 << cluster_bits;
        write_at(&file, "header", &empty_header(cluster_bits, cs), 0)?;
        let mut table = vec![0u8; 8];
        table.copy_from_slice(&(2 * cs).to_be_bytes());
        write_at(&file, "refcount table", &table, cs)?;
        write_at(&file, "refcount block", &[0, 1, 0, 1, 0, 1], 2 * cs)?;
        file.set_len(3 * cs).map_err(open_err)?;
        sync(&file)?;
        drop(file);
        let made = (|| {
            let mut w = Qcow2Writer::open(&tmp)?;
            w.set_size(size)?;
            w.commit()?;
            std::fs::rename(&tmp, path).map_err(|source| ImageError::Open {
                path: path.to_path_buf(),
                source,
            })?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            w.path = path.to_path_buf();
            Ok(w)
        })();
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        made
    }
}

/// The 120 bytes of a new image's header: 112 of header, 8 that end the extensions.
fn empty_header(cluster_bits: u32, cs: u64) -> Vec<u8> {
    let mut h = vec![0u8; 120];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..8].copy_from_slice(&3u32.to_be_bytes());
    h[20..24].copy_from_slice(&cluster_bits.to_be_bytes());
    // size 0, no L1 table yet (the writer makes one for the size).
    h[48..56].copy_from_slice(&cs.to_be_bytes());
    h[56..60].copy_from_slice(&1u32.to_be_bytes());
    h[96..100].copy_from_slice(&REFCOUNT_ORDER.to_be_bytes());
    h[100..104].copy_from_slice(&112u32.to_be_bytes());
    h
}
