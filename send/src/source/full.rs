//! A full stream of one disk state: every range, as data, zero or discard, from allocation
//! status alone (holes are never read).

use std::path::Path;
use std::sync::Arc;

use blkdelta_common::extent::{Coalescer, ExtentSink};
use blkdelta_common::image::raw::RawImage;
use blkdelta_common::image::{BlockSource, OpenOptions};
use blkdelta_common::stream::{SnapRef, SourceInfo, Transition};

use super::util::{file_name, push_status};
use super::ChangeSource;
use crate::SendError;

/// A full stream of a single state: a raw image, a block device, or one qcow2 layer.
pub struct FullSource {
    src: Arc<dyn BlockSource>,
    info: SourceInfo,
    transitions: Vec<Transition>,
}

impl FullSource {
    /// A full stream of `src`, producing the state `to`.
    pub fn new(src: Arc<dyn BlockSource>, info: SourceInfo, to: SnapRef) -> Self {
        let transitions = vec![Transition {
            from: None,
            to,
            virtual_size: src.size(),
        }];
        FullSource {
            src,
            info,
            transitions,
        }
    }

    /// A full stream of a raw file or block device. It has no durable identity, so the state
    /// it produces is the one named after the file (see [`super::identity::named`]), which
    /// change maps and comparisons of the same file start from by default.
    pub fn raw(path: &Path) -> Result<Self, SendError> {
        Self::raw_with(path, &OpenOptions::default())
    }

    /// [`FullSource::raw`], with QEMU's image locks taken (or not) as `options` say.
    pub fn raw_with(path: &Path, options: &OpenOptions) -> Result<Self, SendError> {
        let img = RawImage::open_with(path, options)?;
        let name = file_name(path);
        let info = SourceInfo {
            kind: "raw".into(),
            name: name.clone(),
        };
        Ok(FullSource::new(
            Arc::new(img),
            info,
            super::identity::state_of(&name, &[path]),
        ))
    }
}

impl ChangeSource for FullSource {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    fn changes(&self, _index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        let mut c = Coalescer::new(sink);
        let _ = push_status(self.src.as_ref(), 0, self.src.size(), &mut c)?;
        c.finish()?;
        Ok(())
    }

    fn reader(&self, _index: usize) -> Arc<dyn BlockSource> {
        Arc::clone(&self.src)
    }
}

/// A full stream whose state is named on the command line (`--to-name`) instead of by the
/// source (a raw file, a device, or a qcow2 active layer has no durable identity).
pub struct Renamed {
    inner: Box<dyn ChangeSource>,
    transitions: Vec<Transition>,
}

impl FullSource {
    /// Gives the single full transition of `inner` the state `to`.
    pub fn renamed(
        inner: Box<dyn ChangeSource>,
        to: SnapRef,
    ) -> Result<Box<dyn ChangeSource>, SendError> {
        let mut transitions = inner.transitions().to_vec();
        match transitions.as_mut_slice() {
            [t] if t.from.is_none() => t.to = to,
            _ => {
                return Err(SendError::Usage(
                    "--to-name names the state of a full stream".into(),
                ))
            }
        }
        Ok(Box::new(Renamed { inner, transitions }))
    }
}

impl ChangeSource for Renamed {
    fn info(&self) -> SourceInfo {
        self.inner.info()
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    fn changes(&self, index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        self.inner.changes(index, sink)
    }

    fn reader(&self, index: usize) -> Arc<dyn BlockSource> {
        self.inner.reader(index)
    }

    fn to_digest(&self, index: usize) -> Option<[u8; 32]> {
        self.inner.to_digest(index)
    }
}
