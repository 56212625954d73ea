//! A read-only qcow2 reader: the header, internal snapshots, the bitmap directory, and each
//! layer (the active one or a snapshot) as a [`BlockSource`] that reads through the backing
//! chain.
//!
//! ```text
//! cluster 0: header | extensions | backing name      (header.rs)
//! L1 (active, one per snapshot) ──► L2 tables ──► data / compressed clusters  (layer.rs)
//! snapshot table (snapshot.rs), bitmap directory (bitmap.rs), refcounts (not needed to read)
//! ```
//!
//! The format is specified in QEMU's `docs/interop/qcow2.rst`; the reader relies on nothing
//! else, and its tests check it against qemu 10 (qemu-img and qemu-io). Every field read from the
//! file is checked before it is used as a shift, a size, an allocation or an offset.
//!
//! ```no_run
//! use blkdelta_common::image::qcow2::{Layer, Qcow2Image};
//! use blkdelta_common::image::BlockSource;
//! # fn main() -> Result<(), blkdelta_common::ImageError> {
//! let image = Qcow2Image::open("vm.qcow2".as_ref())?;
//! let monday = image.find_snapshot("mon")?;
//! let disk = image.layer(Layer::Snapshot(monday))?;
//! let mut first = vec![0u8; 4096];
//! disk.read_at(&mut first, 0)?;
//! # Ok(()) }
//! ```

mod bitmap;
mod bytes;
pub mod check;
mod counters;
mod decompress;
pub mod extension;
pub mod header;
mod layer;
mod own;
mod read;
mod snapshot;
pub mod tables;
#[cfg(test)]
mod tests;
mod write;

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rustix::fs::SeekFrom;

pub use bitmap::{table_entry, BitmapGeometry, BitmapInfo, DirtyBitmap, TableEntry};
pub use counters::ReadCounts;
pub use header::{CompressionType, Header, MAGIC};
pub use layer::{L2Table, Qcow2Layer};
pub use own::OwnAllocation;
pub use snapshot::{snapshot_guid, Snapshot, SnapshotIdentity};
pub use tables::Geometry;
pub use write::{Qcow2Writer, SnapshotMeta};

use super::lock::lock_for_read;
use super::raw::{pread_exact, DirectReads, RawImage};
use super::{probe_format, BlockSource, Format, OpenOptions};
use crate::limits::MAX_BACKING_DEPTH;
use crate::ImageError;

/// Which view of the disk to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Layer {
    /// The current state of the disk.
    Active,
    /// An internal snapshot, by index into [`Qcow2Image::snapshots`].
    Snapshot(usize),
}

/// An open qcow2 file (read-only). Cheap to clone and share between threads.
#[derive(Clone)]
pub struct Qcow2Image {
    inner: Arc<ImageInner>,
}

/// What every layer of an image shares.
pub(crate) struct ImageInner {
    pub(crate) path: PathBuf,
    pub(crate) file: File,
    /// Data cluster reads, around the page cache where they can.
    pub(crate) direct: DirectReads,
    pub(crate) file_len: u64,
    pub(crate) header: Header,
    snapshots: Vec<Snapshot>,
    /// (device, inode) of this file and of every image above it in the backing chain: its
    /// length is the depth, and a backing file among them is a loop.
    chain: Vec<(u64, u64)>,
    /// How the image was opened: the backing chain is opened the same way.
    options: OpenOptions,
    /// The backing source, opened on first use.
    backing: Mutex<Option<Arc<dyn BlockSource>>>,
    /// What the layers have read from the file.
    pub(crate) counters: counters::Counters,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("path", &self.inner.path)
            .field("header", &self.inner.header)
            .field("snapshots", &self.inner.snapshots.len())
            .finish()
    }
}

impl Qcow2Image {
    /// Opens and validates a qcow2 image: its header, extensions and snapshot table. The
    /// backing file is opened by [`Qcow2Image::layer`]. Takes QEMU's reader locks, as
    /// [`Qcow2Image::open_with`] does with the default [`OpenOptions`].
    pub fn open(path: &Path) -> Result<Qcow2Image, ImageError> {
        Self::open_with(path, &OpenOptions::default())
    }

    /// Opens an image, taking QEMU's reader locks on it, and later on each file of its
    /// backing chain, as `options` say. They are held until the last clone of the image and
    /// of its layers is dropped.
    pub fn open_with(path: &Path, options: &OpenOptions) -> Result<Qcow2Image, ImageError> {
        Self::open_in_chain(path, Vec::new(), options)
    }

    /// Opens `path` below the images whose (device, inode) are `above`.
    fn open_in_chain(
        path: &Path,
        mut above: Vec<(u64, u64)>,
        options: &OpenOptions,
    ) -> Result<Qcow2Image, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = File::open(path).map_err(open_err)?;
        let meta = file.metadata().map_err(open_err)?;
        above.push((meta.dev(), meta.ino()));
        lock_for_read(&file, path, options)?;
        // Seeking to the end gives the size of block devices too.
        let file_len = rustix::fs::seek(&file, SeekFrom::End(0)).map_err(|e| open_err(e.into()))?;
        let header = read_header(&file, file_len)?;
        let snapshots = snapshot::read_table(&file, file_len, &header)?;
        Ok(Qcow2Image {
            inner: Arc::new(ImageInner {
                path: path.to_path_buf(),
                file,
                direct: DirectReads::default(),
                file_len,
                header,
                snapshots,
                chain: above,
                options: *options,
                backing: Mutex::new(None),
                counters: counters::Counters::default(),
            }),
        })
    }

    /// The path the image was opened with.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The validated header.
    pub fn header(&self) -> &Header {
        &self.inner.header
    }

    /// log2 of the cluster size.
    pub fn cluster_bits(&self) -> u32 {
        self.inner.header.cluster_bits
    }

    /// Virtual size of the active layer.
    pub fn virtual_size(&self) -> u64 {
        self.inner.header.size
    }

    /// Length of the image file in bytes.
    pub fn file_len(&self) -> u64 {
        self.inner.file_len
    }

    /// How many L2 tables and guest data reads the layers of this image have taken from its
    /// file since it was opened (see [`ReadCounts`]). Finding changes from metadata alone
    /// leaves `data_reads` at 0.
    pub fn read_counts(&self) -> ReadCounts {
        self.inner.counters.get()
    }

    /// The internal snapshots in table order (the order they were created in).
    pub fn snapshots(&self) -> &[Snapshot] {
        &self.inner.snapshots
    }

    /// Index of the snapshot called `name_or_id`, by name first, then by id.
    pub fn find_snapshot(&self, name_or_id: &str) -> Result<usize, ImageError> {
        snapshot::find(&self.inner.snapshots, name_or_id)
    }

    /// The persistent bitmaps listed in the bitmap directory (empty without the extension).
    /// They are listed even when [`Qcow2Image::bitmaps_consistent`] is false, each then marked
    /// [`in_use`](BitmapInfo::in_use) and [`inconsistent`](BitmapInfo::inconsistent), as QEMU
    /// holds them; callers must not trust a bitmap marked in use.
    pub fn bitmaps(&self) -> Result<Vec<BitmapInfo>, ImageError> {
        bitmap::read_directory(&self.inner.file, self.inner.file_len, &self.inner.header)
    }

    /// Whether autoclear bit 0 says the bitmaps extension is consistent.
    pub fn bitmaps_consistent(&self) -> bool {
        self.inner.header.autoclear_features & header::AUTOCLEAR_BITMAPS != 0
    }

    /// The backing file's path, resolved against this image's directory, if there is one.
    pub fn backing_path(&self) -> Option<PathBuf> {
        let name = self.inner.header.backing_file.as_deref()?;
        let dir = self.inner.path.parent().unwrap_or(Path::new(""));
        Some(dir.join(name))
    }

    /// Opens one view of the disk. Opens the backing chain on first use.
    pub fn layer(&self, which: Layer) -> Result<Qcow2Layer, ImageError> {
        let inner = &self.inner;
        let (l1_offset, l1_size, size) = match which {
            Layer::Active => (
                inner.header.l1_table_offset,
                inner.header.l1_size,
                inner.header.size,
            ),
            Layer::Snapshot(i) => {
                let s = inner.snapshots.get(i).ok_or_else(|| {
                    ImageError::NoSuchSnapshot(format!(
                        "#{i} (the image has {})",
                        inner.snapshots.len()
                    ))
                })?;
                (s.l1_table_offset, s.l1_size, s.disk_size)
            }
        };
        let l1 = layer::read_l1(inner, l1_offset, l1_size, size)?;
        Ok(Qcow2Layer {
            inner: Arc::new(layer::LayerInner {
                image: inner.clone(),
                which,
                geometry: inner.header.geometry(),
                size,
                l1,
                backing: self.backing_source()?,
                cache: Mutex::default(),
            }),
        })
    }

    /// The backing source, opened once and shared by every layer.
    fn backing_source(&self) -> Result<Option<Arc<dyn BlockSource>>, ImageError> {
        let Some(path) = self.backing_path() else {
            return Ok(None);
        };
        let name = self
            .inner
            .header
            .backing_file
            .as_deref()
            .unwrap_or_default();
        if name.starts_with("json:") || name.contains("://") {
            return Err(ImageError::Unsupported(format!(
                "backing file '{name}' is not a plain file"
            )));
        }
        let mut slot = self.inner.backing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(b) = slot.as_ref() {
            return Ok(Some(b.clone()));
        }
        let source = open_backing(
            &path,
            self.inner.header.backing_format.as_deref(),
            &self.inner.chain,
            &self.inner.options,
        )?;
        *slot = Some(source.clone());
        Ok(Some(source))
    }
}

/// Reads cluster 0 (as much of it as the file holds) and validates the header.
pub(crate) fn read_header(file: &File, file_len: u64) -> Result<Header, ImageError> {
    let mut first = vec![0u8; (header::RAW_HEADER_BYTES as u64).min(file_len) as usize];
    pread_exact(file, &mut first, 0)?;
    let raw = header::RawHeader::parse(&first);
    // The cluster size is only trusted after Header::parse checks it; read no more than 2 MiB.
    let cluster_bits = raw.cluster_bits.clamp(9, 21);
    let mut cluster0 = vec![0u8; (1u64 << cluster_bits).min(file_len) as usize];
    pread_exact(file, &mut cluster0, 0)?;
    Header::parse(&cluster0, file_len)
}

/// Opens the backing file at `path` in `format` (probed when the image does not say).
fn open_backing(
    path: &Path,
    format: Option<&str>,
    above: &[(u64, u64)],
    options: &OpenOptions,
) -> Result<Arc<dyn BlockSource>, ImageError> {
    if above.len() > MAX_BACKING_DEPTH {
        return Err(ImageError::BackingDepth {
            path: path.to_path_buf(),
            limit: MAX_BACKING_DEPTH,
        });
    }
    let meta = std::fs::metadata(path).map_err(|source| ImageError::Open {
        path: path.to_path_buf(),
        source,
    })?;
    if above.contains(&(meta.dev(), meta.ino())) {
        return Err(ImageError::BackingLoop {
            path: path.to_path_buf(),
        });
    }
    let name = path.to_string_lossy();
    let format = match format {
        Some("qcow2") => Format::Qcow2,
        Some("raw") => Format::Raw,
        Some(other) => {
            return Err(ImageError::Unsupported(format!(
                "backing file format '{other}' of {name}"
            )))
        }
        None => probe_format(path)?,
    };
    Ok(match format {
        Format::Qcow2 => Arc::new(
            Qcow2Image::open_in_chain(path, above.to_vec(), options)?.layer(Layer::Active)?,
        ),
        Format::Raw => Arc::new(RawImage::open_with(path, options)?),
    })
}
