//! Persistent dirty bitmaps: send what bitmap NAME of a qcow2 image recorded since it was
//! added or last cleared, with the data of the image's active layer.
//!
//! ```text
//! directory ──► bitmap 'daily' ──► table ──► dirty ranges ──► active layer status ──► extents
//!                                             (granules)       (data | zero | hole → discard)
//! ```
//!
//! A bitmap has no durable identity of its own: the states are named (`--from-name`,
//! `--to-name`, both the bitmap's name by default), so a seed sent with `--to-name NAME` and
//! the bitmap incrementals after it form one chain the receiver checks by name. The data is
//! read from the active layer, which must hold still while it is read: QEMU's locks (taken
//! when the image is opened) refuse an image a writer holds, and QEMU marks every bitmap of
//! an image it has open for writing as in use.

use std::path::Path;
use std::sync::Arc;

use blkdelta_common::extent::{Coalescer, ExtentSink};
use blkdelta_common::image::qcow2::{BitmapInfo, DirtyBitmap, Layer, Qcow2Image, Qcow2Layer};
use blkdelta_common::image::{probe_format, BlockSource, Format};
use blkdelta_common::stream::{SourceInfo, Transition};

use super::util::{file_name, push_status};
use super::{identity, ChangeSource, SourceOptions};
use crate::SendError;

/// A stream of what one bitmap recorded: a single transition from → to.
struct BitmapSource {
    name: String,
    bitmap: DirtyBitmap,
    layer: Qcow2Layer,
    transitions: Vec<Transition>,
}

/// Opens `image` to send what bitmap `name` recorded. Refuses, by name and reason, an image
/// that is not qcow2, an unknown bitmap (listing those that exist), inconsistent bitmaps, a
/// bitmap in use, and a disabled bitmap unless `opts.allow_disabled`.
pub fn open(
    image: &Path,
    name: &str,
    opts: &SourceOptions,
) -> Result<Box<dyn ChangeSource>, SendError> {
    let file = file_name(image);
    if probe_format(image)? != Format::Qcow2 {
        return Err(SendError::Source(format!(
            "{file}: --bitmap needs a qcow2 image (this one is raw)"
        )));
    }
    let img = Qcow2Image::open_with(image, &opts.open)?;
    let info = find(&img, name, &file)?;
    check_usable(&img, &info, opts.allow_disabled)?;
    let bitmap = img.dirty_bitmap(&info)?;
    let layer = img.layer(Layer::Active)?;
    let from = opts.from_name.as_deref().unwrap_or(name);
    let to = opts.to_name.as_deref().unwrap_or(name);
    let transitions = vec![Transition {
        from: Some(identity::named(from)),
        to: identity::state_of(to, &[image]),
        virtual_size: layer.size(),
    }];
    Ok(Box::new(BitmapSource {
        name: file,
        bitmap,
        layer,
        transitions,
    }))
}

/// The directory entry of bitmap `name`, or a refusal listing the bitmaps there are.
fn find(img: &Qcow2Image, name: &str, file: &str) -> Result<BitmapInfo, SendError> {
    if let Some(info) = img.find_bitmap(name)? {
        return Ok(info);
    }
    let names: Vec<String> = img
        .bitmaps()?
        .into_iter()
        .map(|b| format!("'{}'", b.name))
        .collect();
    let have = if names.is_empty() {
        "it has no bitmaps".to_string()
    } else {
        format!("it has {}", names.join(", "))
    };
    Err(SendError::Source(format!(
        "{file}: no bitmap named '{name}' ({have})"
    )))
}

/// The refusals a user can act on, each naming the bitmap and the reason.
fn check_usable(
    img: &Qcow2Image,
    info: &BitmapInfo,
    allow_disabled: bool,
) -> Result<(), SendError> {
    let name = &info.name;
    if !img.bitmaps_consistent() {
        return Err(SendError::Source(format!(
            "bitmap '{name}' cannot be trusted: the image's bitmaps are marked inconsistent \
             (autoclear bit 0 is clear: a program that does not maintain bitmaps wrote to it)"
        )));
    }
    if info.in_use {
        return Err(SendError::Source(format!(
            "bitmap '{name}' is marked in use: QEMU did not close the image cleanly, so it is \
             not trustworthy"
        )));
    }
    if !info.auto && !allow_disabled {
        return Err(SendError::Source(format!(
            "bitmap '{name}' is disabled: it stopped recording writes, so it may miss changes \
             (--allow-disabled sends what it recorded anyway)"
        )));
    }
    Ok(())
}

impl ChangeSource for BitmapSource {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: "qcow2".into(),
            name: self.name.clone(),
        }
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    /// The dirty ranges, each classified by the active layer's allocation status.
    fn changes(&self, _index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        let mut c = Coalescer::new(sink);
        let layer = &self.layer;
        let size = layer.size();
        // The bitmap walk stops only on an error; after a stop, the ranges left are skipped
        // without a status call (the walk reads no more than the bitmap's own clusters).
        let mut stopped = false;
        self.bitmap.for_each_dirty_range(|offset, len| {
            let end = offset.saturating_add(len).min(size);
            if offset < end && !stopped {
                stopped = push_status(layer, offset, end, &mut c)?.is_stop();
            }
            Ok::<_, SendError>(())
        })?;
        c.finish()?;
        Ok(())
    }

    fn reader(&self, _index: usize) -> Arc<dyn BlockSource> {
        Arc::new(self.layer.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_image_is_an_error_not_a_panic() {
        let opts = SourceOptions::default();
        let err = open(Path::new("/nonexistent/x.qcow2"), "daily", &opts)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("cannot open"), "{err}");
    }

    #[test]
    fn a_raw_image_is_refused_by_name() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), vec![0u8; 4096]).unwrap();
        let err = open(tmp.path(), "daily", &SourceOptions::default())
            .err()
            .expect("refused");
        assert!(err.to_string().contains("needs a qcow2 image"), "{err}");
    }
}
