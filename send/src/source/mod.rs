//! Change sources: what a stream carries and which extents changed in each transition.

mod full;
mod qcow2_snapshots;

pub use full::FullSource;
pub use qcow2_snapshots::{Qcow2Snapshots, SnapshotSpec};

use std::path::Path;
use std::sync::Arc;

use blkdelta_common::extent::ExtentSink;
use blkdelta_common::image::{probe_format, BlockSource, Format};
use blkdelta_common::stream::{SourceInfo, Transition};

use crate::SendError;

/// A source of changes: a list of transitions and, for each, its changed extents.
pub trait ChangeSource: Send + Sync {
    /// Kind and name of the source for the stream header.
    fn info(&self) -> SourceInfo;

    /// The transitions, in the order they are applied.
    fn transitions(&self) -> &[Transition];

    /// Pushes the extents that differ between transition `index`'s `from` and `to` states,
    /// sorted and non-overlapping, within the `to` state's virtual size.
    fn changes(&self, index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError>;

    /// A reader of transition `index`'s `to` state, for the data extents.
    fn reader(&self, index: usize) -> Arc<dyn BlockSource>;
}

/// Opens a source as the command line names it: `IMAGE.qcow2@SNAP`, `IMAGE.qcow2@FROM..TO`,
/// `IMAGE.qcow2` (its active layer), or a raw file or block device (a full stream).
pub fn open_source(spec: &str) -> Result<Box<dyn ChangeSource>, SendError> {
    let path = Path::new(spec);
    if path.exists() {
        return open_path(path, SnapshotSpec::Active);
    }
    let Some((file, snap)) = spec.rsplit_once('@') else {
        return Err(SendError::Source(format!("{spec}: no such file")));
    };
    let snap = SnapshotSpec::parse(snap)?;
    open_path(Path::new(file), snap)
}

fn open_path(path: &Path, snap: SnapshotSpec) -> Result<Box<dyn ChangeSource>, SendError> {
    match probe_format(path)? {
        Format::Qcow2 => Ok(Box::new(Qcow2Snapshots::open(path, &snap)?)),
        Format::Raw if snap == SnapshotSpec::Active => Ok(Box::new(FullSource::raw(path)?)),
        Format::Raw => Err(SendError::Source(format!(
            "{}: a raw image has no snapshots",
            path.display()
        ))),
    }
}
