//! Change sources: what a stream carries and which extents changed in each transition.

mod full;
mod qcow2_snapshots;
mod resume;

pub use full::FullSource;
pub use qcow2_snapshots::{Qcow2Snapshots, SnapshotSpec};
pub use resume::Resumed;

use std::path::Path;
use std::sync::Arc;

use blkdelta_common::extent::ExtentSink;
use blkdelta_common::image::{probe_format, BlockSource, Format, OpenOptions};
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

    /// Where the first transition's records start (non-zero for a resumed send).
    fn resume_offset(&self) -> u64 {
        0
    }
}

/// Opens a source as the command line names it: `IMAGE.qcow2@SNAP`, `IMAGE.qcow2@FROM..TO`,
/// `IMAGE.qcow2` (its active layer), or a raw file or block device (a full stream). Refuses an
/// image a QEMU writer holds (see [`open_source_with`]).
pub fn open_source(spec: &str) -> Result<Box<dyn ChangeSource>, SendError> {
    open_source_with(spec, &OpenOptions::default())
}

/// [`open_source`], with QEMU's image locks taken (or not) as `options` say; the source holds
/// them until it is dropped.
pub fn open_source_with(
    spec: &str,
    options: &OpenOptions,
) -> Result<Box<dyn ChangeSource>, SendError> {
    let path = Path::new(spec);
    if path.exists() {
        return open_path(path, SnapshotSpec::Active, options);
    }
    let Some((file, snap)) = spec.rsplit_once('@') else {
        return Err(SendError::Source(format!("{spec}: no such file")));
    };
    let snap = SnapshotSpec::parse(snap)?;
    open_path(Path::new(file), snap, options)
}

fn open_path(
    path: &Path,
    snap: SnapshotSpec,
    options: &OpenOptions,
) -> Result<Box<dyn ChangeSource>, SendError> {
    match probe_format(path)? {
        Format::Qcow2 => Ok(Box::new(Qcow2Snapshots::open_with(path, &snap, options)?)),
        Format::Raw if snap == SnapshotSpec::Active => {
            Ok(Box::new(FullSource::raw_with(path, options)?))
        }
        Format::Raw => Err(SendError::Source(format!(
            "{}: a raw image has no snapshots",
            path.display()
        ))),
    }
}
