//! Change sources: what a stream carries and which extents changed in each transition.

mod against;
mod backing_chain;
mod bitmap;
pub mod changemap;
mod compare;
mod full;
pub mod identity;
pub mod live;
pub mod nbd;
mod qcow2_snapshots;
mod resume;
mod util;

pub use against::{content_state, repair, AgainstSource};
pub use full::FullSource;
pub use qcow2_snapshots::{Qcow2Snapshots, SnapshotSpec};
pub use resume::Resumed;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use blkdelta_common::extent::ExtentSink;
use blkdelta_common::image::nbd::NbdUri;
use blkdelta_common::image::{probe_format, BlockSource, Format, OpenOptions};
use blkdelta_common::stream::{SnapshotInfo, SourceInfo, Transition};

use crate::SendError;

/// A source of changes: a list of transitions and, for each, its changed extents.
pub trait ChangeSource: Send + Sync {
    /// Kind and name of the source for the stream header.
    fn info(&self) -> SourceInfo;

    /// The transitions, in the order they are applied.
    fn transitions(&self) -> &[Transition];

    /// Pushes the extents that differ between transition `index`'s `from` and `to` states,
    /// sorted and non-overlapping, within the `to` state's virtual size. Returns early, and
    /// successfully, when the sink says [`Visit::Stop`](blkdelta_common::extent::Visit).
    fn changes(&self, index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError>;

    /// A reader of transition `index`'s `to` state, for the data extents.
    fn reader(&self, index: usize) -> Arc<dyn BlockSource>;

    /// Where the first transition's records start (non-zero for a resumed send).
    fn resume_offset(&self) -> u64 {
        0
    }

    /// The image digest of transition `index`'s `to` state, when the source knows it (it
    /// hashed every block of `to`) once [`ChangeSource::changes`] ran for that transition;
    /// the snapshot-end record carries it.
    fn to_digest(&self, _index: usize) -> Option<[u8; 32]> {
        None
    }

    /// What the snapshot table says of transition `index`'s `to` state when it is an internal
    /// snapshot of a qcow2 source (never an active layer, a bitmap's, a change map's or another
    /// named state), with `transition` = `index`. The stream carries it right before that
    /// transition's snapshot-end, so that a receiver can create the same snapshot (same GUID).
    fn snapshot_info(&self, _index: usize) -> Option<SnapshotInfo> {
        None
    }

    /// How many reads at once keep the source busy ([`BlockSource::reads_in_flight`] of
    /// the first transition's reader): a sender runs at least that many workers unless told
    /// otherwise.
    fn reads_in_flight(&self) -> usize {
        if self.transitions().is_empty() {
            0
        } else {
            self.reader(0).reads_in_flight()
        }
    }
}

/// What `send` is asked for beyond SOURCE: the change source to use and the names of states
/// without a durable identity.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// QEMU image locks (`--force-share`).
    pub open: OpenOptions,
    /// Name of the base state (`--from-name`) for sources without durable identities.
    pub from_name: Option<String>,
    /// Name of the state produced (`--to-name`).
    pub to_name: Option<String>,
    /// Send what persistent dirty bitmap NAME recorded (`--bitmap`), or for an NBD export
    /// what its context `qemu:dirty-bitmap:NAME` marks dirty.
    pub bitmap: Option<String>,
    /// Accept a disabled bitmap (`--allow-disabled`).
    pub allow_disabled: bool,
    /// Send what the overlays above BASE changed (`--since`).
    pub since: Option<PathBuf>,
    /// Send the ranges a change map lists (`--changed-blocks`).
    pub changed_blocks: Option<PathBuf>,
    /// Size of an era block in bytes, for era_invalidate maps (`--era-block-size`).
    pub era_block_bytes: Option<u64>,
    /// Send what differs from OLD, by content (`--compare`).
    pub compare_old: Option<PathBuf>,
    /// Send only the blocks whose hash differs from this block list's, a repair of the
    /// replica it lists (`--against`): SOURCE must be one state, sent in full otherwise.
    pub against: Option<PathBuf>,
    /// Send `IMAGE.qcow2@FROM..TO` as one transition straight from FROM to TO, leaving out the
    /// snapshots between them (`--direct`, as `zfs send -i`; without it the range passes
    /// through each of them, as `zfs send -I`). Anything else as SOURCE is a usage error.
    pub direct: bool,
}

/// Opens the source `send` is asked for: SOURCE alone (see [`open_source`]), with one of
/// `--bitmap`, `--since`, `--changed-blocks`, `--compare`, or as a repair (`--against`).
pub fn open_source_opts(
    spec: &str,
    opts: &SourceOptions,
) -> Result<Box<dyn ChangeSource>, SendError> {
    let Some(list_path) = &opts.against else {
        return open_changes(spec, opts);
    };
    let others = opts.bitmap.is_some()
        || opts.since.is_some()
        || opts.changed_blocks.is_some()
        || opts.compare_old.is_some()
        || opts.from_name.is_some()
        || opts.direct;
    if others {
        return Err(SendError::Usage(
            "--against excludes --bitmap, --since, --changed-blocks, --compare, --from-name \
             and --direct"
                .into(),
        ));
    }
    let source = open_changes(spec, opts)?;
    // Checked before the list is read: a wrong SOURCE is a usage error whatever the list.
    if source.transitions().len() != 1 || source.transitions()[0].from.is_some() {
        return Err(SendError::Usage(format!(
            "--against repairs a replica from one state, not the range '{spec}'"
        )));
    }
    let list = against::read_list(list_path)?;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    Ok(Box::new(AgainstSource::new(source, list, threads)?))
}

/// [`open_source_opts`] without `--against`.
fn open_changes(spec: &str, opts: &SourceOptions) -> Result<Box<dyn ChangeSource>, SendError> {
    let chosen = [
        opts.bitmap.is_some(),
        opts.since.is_some(),
        opts.changed_blocks.is_some(),
        opts.compare_old.is_some(),
    ];
    if chosen.iter().filter(|&&c| c).count() > 1 {
        return Err(SendError::Usage(
            "--bitmap, --since, --changed-blocks and --compare exclude each other".into(),
        ));
    }
    if opts.direct {
        return open_direct(spec, opts);
    }
    if NbdUri::is_nbd(spec) {
        return nbd::open(spec, opts);
    }
    let path = Path::new(spec);
    if let Some(option) = chosen_option(opts) {
        refuse_snapshots(spec, option)?;
    }
    if let Some(name) = &opts.bitmap {
        return bitmap::open(path, name, opts);
    }
    if let Some(base) = &opts.since {
        return backing_chain::open(path, base, opts);
    }
    if let Some(map) = &opts.changed_blocks {
        return changemap::open(map, path, opts);
    }
    if let Some(old) = &opts.compare_old {
        return compare::open(old, path, opts);
    }
    if opts.from_name.is_some() {
        return Err(SendError::Usage(
            "--from-name names the base of --bitmap, --since, --changed-blocks or --compare".into(),
        ));
    }
    if opts.to_name.is_some() && !path.exists() {
        return Err(SendError::Usage(
            "--to-name names a state without an identity of its own (a raw file, a device, an \
             active layer); a snapshot has one"
                .into(),
        ));
    }
    let source = open_source_with(spec, &opts.open)?;
    match &opts.to_name {
        Some(name) => FullSource::renamed(source, identity::state_of(name, &[path])),
        None => Ok(source),
    }
}

/// `--direct`: `IMAGE.qcow2@FROM..TO` as one transition, refusing (as a usage error) any other
/// SOURCE and every option that finds changes another way or names states.
fn open_direct(spec: &str, opts: &SourceOptions) -> Result<Box<dyn ChangeSource>, SendError> {
    let refuse = |why: String| {
        Err(SendError::Usage(format!(
            "--direct sends IMAGE.qcow2@FROM..TO as one transition: {why}"
        )))
    };
    let option = chosen_option(opts).or_else(|| {
        [
            (opts.from_name.is_some(), "--from-name"),
            (opts.to_name.is_some(), "--to-name"),
        ]
        .into_iter()
        .find_map(|(given, name)| given.then_some(name))
    });
    if let Some(option) = option {
        return refuse(format!("not with {option}"));
    }
    let snapshots = if NbdUri::is_nbd(spec) || Path::new(spec).exists() {
        None
    } else {
        spec.rsplit_once('@')
    };
    let Some((file, snap)) = snapshots else {
        return refuse(format!("'{spec}' names no snapshots"));
    };
    let (from, to) = match SnapshotSpec::parse(snap)? {
        SnapshotSpec::Range { from, to } => (from, to),
        _ => return refuse(format!("'{spec}' names one snapshot, not a range")),
    };
    let path = Path::new(file);
    if probe_format(path)? != Format::Qcow2 {
        return refuse(format!("{file} is not a qcow2 image"));
    }
    let direct = SnapshotSpec::Direct { from, to };
    Ok(Box::new(Qcow2Snapshots::open_with(
        path, &direct, &opts.open,
    )?))
}

/// The option naming how changes are found, when one is given besides SOURCE.
fn chosen_option(opts: &SourceOptions) -> Option<&'static str> {
    [
        (opts.bitmap.is_some(), "--bitmap"),
        (opts.since.is_some(), "--since"),
        (opts.changed_blocks.is_some(), "--changed-blocks"),
        (opts.compare_old.is_some(), "--compare"),
    ]
    .into_iter()
    .find_map(|(given, name)| given.then_some(name))
}

/// Refuses `IMAGE@SNAP` or `IMAGE@FROM..TO` as the SOURCE of `option`, which reads a plain
/// image (a file or device, a qcow2 image's active layer).
fn refuse_snapshots(spec: &str, option: &str) -> Result<(), SendError> {
    if Path::new(spec).exists() {
        return Ok(());
    }
    match spec.rsplit_once('@') {
        Some((file, _)) if Path::new(file).exists() => Err(SendError::Usage(format!(
            "{option} takes a plain image as SOURCE, not '{spec}' with @snapshots: name \
             {file} alone (snapshots are sent as IMAGE@SNAP or IMAGE@FROM..TO without it)"
        ))),
        _ => Ok(()),
    }
}

/// Opens a source as the command line names it: `IMAGE.qcow2@SNAP`, `IMAGE.qcow2@FROM..TO`,
/// `IMAGE.qcow2` (its active layer), a raw file or block device, or an NBD export
/// (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`) (a full stream). Refuses an
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
    if NbdUri::is_nbd(spec) {
        let opts = SourceOptions {
            open: *options,
            ..SourceOptions::default()
        };
        return nbd::open(spec, &opts);
    }
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
