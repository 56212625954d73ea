//! What several sources share: naming a file, opening an image for reading, pushing a range
//! by allocation status, and keeping a copy of the extents passed on.

use std::path::Path;
use std::sync::Arc;

use blkdelta_common::extent::{Extent, ExtentKind, ExtentSink, Visit};
use blkdelta_common::image::qcow2::{Layer, Qcow2Image};
use blkdelta_common::image::raw::RawImage;
use blkdelta_common::image::{probe_format, Allocation, BlockSource, Format, OpenOptions};
use blkdelta_common::ImageError;

use crate::SendError;

/// Evaluates `$visit` (a `Result<Visit, _>`, propagating its error) and returns
/// `Ok(Visit::Stop)` from the enclosing function when the sink said stop.
macro_rules! stop_if_told {
    ($visit:expr) => {
        if $visit?.is_stop() {
            return Ok(::blkdelta_common::extent::Visit::Stop);
        }
    };
}
pub(crate) use stop_if_told;

/// The last component of a path, for display in a stream header.
pub fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Pushes every range of `src` within `[offset, end)` as an extent of its allocation kind,
/// until the sink says stop.
pub fn push_status(
    src: &dyn BlockSource,
    offset: u64,
    end: u64,
    sink: &mut dyn ExtentSink,
) -> Result<Visit, SendError> {
    let mut pos = offset;
    while pos < end {
        let (alloc, len) = src.status(pos, end - pos)?;
        let len = len.clamp(1, end - pos);
        let kind = match alloc {
            Allocation::Data => ExtentKind::Data,
            Allocation::Zero => ExtentKind::Zero,
            Allocation::Hole => ExtentKind::Discard,
        };
        stop_if_told!(sink.push(Extent::new(pos, len, kind)));
        pos += len;
    }
    Ok(Visit::Continue)
}

/// Opens a raw file, a block device, or a qcow2 image's active layer for reading; also says
/// which (`raw` or `qcow2`).
pub fn open_image(
    path: &Path,
    options: &OpenOptions,
) -> Result<(Arc<dyn BlockSource>, &'static str), SendError> {
    match probe_format(path)? {
        Format::Raw => Ok((Arc::new(RawImage::open_with(path, options)?), "raw")),
        Format::Qcow2 => {
            let layer = Qcow2Image::open_with(path, options)?.layer(Layer::Active)?;
            Ok((Arc::new(layer), "qcow2"))
        }
    }
}

/// Extents kept to replay a source's changes after its totals were counted; a longer list is
/// dropped and the changes are found again instead.
pub const MAX_CACHED_EXTENTS: usize = 4 << 20;

/// Passes extents on and keeps a copy, up to [`MAX_CACHED_EXTENTS`].
pub struct Recorder<'a> {
    sink: &'a mut dyn ExtentSink,
    kept: Option<Vec<Extent>>,
}

impl<'a> Recorder<'a> {
    /// Passes extents on to `sink`.
    pub fn new(sink: &'a mut dyn ExtentSink) -> Self {
        Recorder {
            sink,
            kept: Some(Vec::new()),
        }
    }

    /// The extents passed on, unless there were too many to keep.
    pub fn into_kept(self) -> Option<Vec<Extent>> {
        self.kept
    }
}

impl ExtentSink for Recorder<'_> {
    fn push(&mut self, e: Extent) -> Result<Visit, ImageError> {
        let visit = self.sink.push(e)?;
        match &mut self.kept {
            // A list cut short by a stop is not the whole list.
            _ if visit.is_stop() => self.kept = None,
            Some(k) if k.len() < MAX_CACHED_EXTENTS => k.push(e),
            Some(_) => self.kept = None,
            None => {}
        }
        Ok(visit)
    }
}

/// Pushes `extents` to `sink` until it says stop.
pub fn replay(extents: &[Extent], sink: &mut dyn ExtentSink) -> Result<Visit, SendError> {
    for e in extents {
        stop_if_told!(sink.push(*e));
    }
    Ok(Visit::Continue)
}
