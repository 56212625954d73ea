//! qcow2 internal snapshots: full streams of one snapshot and incrementals between two (through
//! every snapshot between them, or straight from one to the other), found by comparing L1/L2
//! tables.
//!
//! Clusters shared between snapshots are never rewritten in place (their refcount forces copy
//! on write), so equal table entries mean equal content: an equal L1 entry skips its whole L2
//! range unread, and only clusters (or subclusters) whose L2 entries differ are looked at.

use std::path::Path;
use std::sync::Arc;

use blkdelta_common::extent::{Coalescer, ExtentSink, Visit};
use blkdelta_common::image::qcow2::tables::{
    L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_COPIED,
};
use blkdelta_common::image::qcow2::{L2Table, Layer, Qcow2Image, Qcow2Layer, Snapshot};
use blkdelta_common::image::{BlockSource, OpenOptions};
use blkdelta_common::stream::{SnapRef, SnapshotInfo, SourceInfo, Transition};
use blkdelta_common::ImageError;

use super::util::{file_name, push_status, stop_if_told};
use super::ChangeSource;
use crate::SendError;

/// Which states of a qcow2 image to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSpec {
    /// The active layer, in full.
    Active,
    /// One snapshot, in full.
    Snapshot(String),
    /// From one snapshot to a later one, through every snapshot between them (one transition
    /// each, as `zfs send -I`): what `FROM..TO` parses to.
    Range {
        /// The base snapshot (the replica holds it).
        from: String,
        /// The last snapshot sent.
        to: String,
    },
    /// From one snapshot straight to a later one, in one transition that leaves out the
    /// snapshots between them (as `zfs send -i`; `send --direct`).
    Direct {
        /// The base snapshot (the replica holds it).
        from: String,
        /// The snapshot sent.
        to: String,
    },
    /// From one snapshot to the active layer: what a snapshot taken now would carry, for
    /// plans (`sync --dry-run`) only, since the active layer has no identity a replica could
    /// keep.
    ToActive {
        /// The base snapshot.
        from: String,
    },
}

impl SnapshotSpec {
    /// Parses what follows `@`: `SNAP` or `FROM..TO`.
    pub fn parse(s: &str) -> Result<Self, SendError> {
        match s.split_once("..") {
            Some((from, to)) if !from.is_empty() && !to.is_empty() => Ok(SnapshotSpec::Range {
                from: from.into(),
                to: to.into(),
            }),
            Some(_) => Err(SendError::Usage(format!(
                "'{s}': a range needs both ends, FROM..TO"
            ))),
            None if s.is_empty() => Err(SendError::Usage("empty snapshot name after '@'".into())),
            None => Ok(SnapshotSpec::Snapshot(s.into())),
        }
    }
}

/// One transition and the layers it compares.
struct Step {
    from: Option<Qcow2Layer>,
    to: Qcow2Layer,
    /// The snapshot `to` is (none for the active layer).
    snapshot: Option<Snapshot>,
}

/// A stream of a qcow2 image's snapshots (or its active layer).
pub struct Qcow2Snapshots {
    image: Qcow2Image,
    name: String,
    steps: Vec<Step>,
    transitions: Vec<Transition>,
}

fn snap_ref(s: &Snapshot) -> SnapRef {
    SnapRef {
        name: s.name.clone(),
        guid: s.guid(),
    }
}

impl Qcow2Snapshots {
    /// Opens `path` and resolves the snapshots `spec` names, refusing an image a QEMU writer
    /// holds.
    pub fn open(path: &Path, spec: &SnapshotSpec) -> Result<Self, SendError> {
        Self::open_with(path, spec, &OpenOptions::default())
    }

    /// [`Qcow2Snapshots::open`], with QEMU's image locks taken (or not) as `options` say.
    pub fn open_with(
        path: &Path,
        spec: &SnapshotSpec,
        options: &OpenOptions,
    ) -> Result<Self, SendError> {
        let image = Qcow2Image::open_with(path, options)?;
        let made = match spec {
            SnapshotSpec::Active => vec![full_step(&image, path, Layer::Active)?],
            SnapshotSpec::Snapshot(name) => {
                let i = find_snapshot(&image, name)?;
                vec![full_step(&image, path, Layer::Snapshot(i))?]
            }
            SnapshotSpec::Range { from, to } => {
                let (fi, ti) = ordered_pair(&image, from, to)?;
                (fi..ti)
                    .map(|i| incremental_step(&image, i, i + 1))
                    .collect::<Result<_, _>>()?
            }
            SnapshotSpec::Direct { from, to } => {
                let (fi, ti) = ordered_pair(&image, from, to)?;
                vec![incremental_step(&image, fi, ti)?]
            }
            SnapshotSpec::ToActive { from } => {
                let fi = find_snapshot(&image, from)?;
                let (mut step, mut transition) = full_step(&image, path, Layer::Active)?;
                step.from = Some(image.layer(Layer::Snapshot(fi))?);
                transition.from = Some(snap_ref(&image.snapshots()[fi]));
                vec![(step, transition)]
            }
        };
        let (steps, transitions) = made.into_iter().unzip();
        Ok(Qcow2Snapshots {
            image,
            name: file_name(path),
            steps,
            transitions,
        })
    }

    /// The image the states are read from; its [`Qcow2Image::read_counts`] show what finding
    /// the changes and reading the data took from the file.
    pub fn image(&self) -> &Qcow2Image {
        &self.image
    }
}

impl ChangeSource for Qcow2Snapshots {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: "qcow2".into(),
            name: self.name.clone(),
        }
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    fn changes(&self, index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        let step = &self.steps[index];
        let mut c = Coalescer::new(sink);
        let _ = match &step.from {
            None => push_status(&step.to, 0, step.to.size(), &mut c)?,
            Some(from) => diff_layers(from, &step.to, &mut c)?,
        };
        c.finish()?;
        Ok(())
    }

    fn reader(&self, index: usize) -> Arc<dyn BlockSource> {
        Arc::new(self.steps[index].to.clone())
    }

    /// The snapshot's table entry. An id or name longer than a stream carries (QEMU's ids are
    /// numbers) gives none: the replica is still brought to the state, only without what it
    /// takes to recreate the snapshot.
    fn snapshot_info(&self, index: usize) -> Option<SnapshotInfo> {
        let snapshot = self.steps[index].snapshot.as_ref()?;
        let info = SnapshotInfo::from_snapshot(index as u32, snapshot);
        info.validate().is_ok().then_some(info)
    }
}

/// A full step to `layer` (the active layer or a snapshot of the image at `path`), and its
/// transition.
fn full_step(
    image: &Qcow2Image,
    path: &Path,
    layer: Layer,
) -> Result<(Step, Transition), SendError> {
    let to = image.layer(layer)?;
    let snapshot = match layer {
        Layer::Snapshot(i) => Some(image.snapshots()[i].clone()),
        Layer::Active => None,
    };
    let to_ref = match &snapshot {
        Some(s) => snap_ref(s),
        None => super::identity::state_of(&format!("{}@active", file_name(path)), &[path]),
    };
    let transition = Transition {
        from: None,
        to: to_ref,
        virtual_size: to.size(),
    };
    let step = Step {
        from: None,
        to,
        snapshot,
    };
    Ok((step, transition))
}

/// An incremental step from snapshot index `from` to the later snapshot index `to`, and its
/// transition. The snapshots between them need not be looked at: a cluster (or table) that
/// `from` and `to` both point to was shared all along, so never rewritten in place.
fn incremental_step(
    image: &Qcow2Image,
    from: usize,
    to: usize,
) -> Result<(Step, Transition), SendError> {
    let snaps = image.snapshots();
    let to_layer = image.layer(Layer::Snapshot(to))?;
    let transition = Transition {
        from: Some(snap_ref(&snaps[from])),
        to: snap_ref(&snaps[to]),
        virtual_size: to_layer.size(),
    };
    let step = Step {
        from: Some(image.layer(Layer::Snapshot(from))?),
        to: to_layer,
        snapshot: Some(snaps[to].clone()),
    };
    Ok((step, transition))
}

/// The indexes of snapshots `from` and `to`, refusing a `from` that is not older than `to`.
fn ordered_pair(image: &Qcow2Image, from: &str, to: &str) -> Result<(usize, usize), SendError> {
    let (fi, ti) = (find_snapshot(image, from)?, find_snapshot(image, to)?);
    if fi >= ti {
        return Err(SendError::Usage(format!(
            "snapshot '{from}' is not older than '{to}'"
        )));
    }
    Ok((fi, ti))
}

/// The index of snapshot `name` (by name, then by id); a name that matches none is refused
/// with the names the image has, so a typo shows what was meant.
fn find_snapshot(image: &Qcow2Image, name: &str) -> Result<usize, SendError> {
    match image.find_snapshot(name) {
        Err(ImageError::NoSuchSnapshot(_)) => {
            let names: Vec<String> = image
                .snapshots()
                .iter()
                .map(|s| format!("'{}'", s.name))
                .collect();
            let have = match names.len() {
                0 => "it has no snapshots".to_string(),
                _ => format!("it has {}", names.join(", ")),
            };
            Err(SendError::Source(format!(
                "{}: no snapshot named or numbered '{name}' ({have})",
                file_name(image.path())
            )))
        }
        other => Ok(other?),
    }
}

/// Pushes the ranges of `to` that may differ from `from`, classified by `to`'s allocation
/// status: within the size both share, the ranges whose L1/L2 entries differ; past `from`'s
/// size, everything `to` has (a shrink to a size inside a cluster keeps that cluster's tail,
/// which a later grow shows again, so equal entries there prove nothing). Stops when the sink
/// says so.
pub fn diff_layers(
    from: &Qcow2Layer,
    to: &Qcow2Layer,
    sink: &mut dyn ExtentSink,
) -> Result<Visit, SendError> {
    let g = to.geometry();
    if from.geometry() != g {
        return Err(SendError::Source(
            "snapshots with different geometry".into(),
        ));
    }
    let shared = from.size().min(to.size());
    let span = (1u64 << g.cluster_bits) * g.l2_entries;
    let ranges = shared.div_ceil(span) as usize;
    let differing = |i: usize| {
        let ea = from.l1().get(i).copied().unwrap_or(0);
        let eb = to.l1().get(i).copied().unwrap_or(0);
        (ea & L1E_OFFSET_MASK != eb & L1E_OFFSET_MASK).then_some((ea, eb))
    };
    // Every table the diff reads is known from the L1 tables: announce them all first.
    for (ea, eb) in (0..ranges).filter_map(differing) {
        from.prefetch_l2(ea);
        to.prefetch_l2(eb);
    }
    for i in 0..ranges {
        if let Some((ea, eb)) = differing(i) {
            let tables = (from.read_l2(ea)?, to.read_l2(eb)?);
            stop_if_told!(diff_l2(to, i as u64 * span, shared, &tables, sink));
        }
    }
    if to.size() > shared {
        stop_if_told!(push_status(to, shared, to.size(), sink));
    }
    Ok(Visit::Continue)
}

/// Pushes the changed ranges of one L2 range starting at guest offset `base`, below `limit`.
fn diff_l2(
    to: &Qcow2Layer,
    base: u64,
    limit: u64,
    (la, lb): &(Option<L2Table>, Option<L2Table>),
    sink: &mut dyn ExtentSink,
) -> Result<Visit, SendError> {
    let g = to.geometry();
    let cluster = 1u64 << g.cluster_bits;
    let sub = cluster / SUBCLUSTERS;
    let entries =
        (g.l2_entries as usize).min(limit.saturating_sub(base).div_ceil(cluster) as usize);
    if !g.extended_l2 {
        return diff_standard_l2(to, base, limit, la, lb, entries, sink);
    }
    for j in 0..entries {
        let off = base + j as u64 * cluster;
        for (first, count) in changed_runs(entry(la, j), entry(lb, j), g.extended_l2) {
            let (start, len) = if g.extended_l2 {
                (off + first * sub, count * sub)
            } else {
                (off, cluster)
            };
            stop_if_told!(push_status(to, start, (start + len).min(limit), sink));
        }
    }
    Ok(Visit::Continue)
}

/// [`diff_l2`] for standard entries: blocks of entries that are equal but for the COPIED flag
/// are skipped with one branch-free comparison each (a diff loads thousands of tables).
fn diff_standard_l2(
    to: &Qcow2Layer,
    base: u64,
    limit: u64,
    la: &Option<L2Table>,
    lb: &Option<L2Table>,
    entries: usize,
    sink: &mut dyn ExtentSink,
) -> Result<Visit, SendError> {
    const BLOCK: usize = 64;
    let cluster = 1u64 << to.geometry().cluster_bits;
    let none = vec![
        0u64;
        if la.is_none() || lb.is_none() {
            entries
        } else {
            0
        }
    ];
    let wa = la.as_ref().map_or(&none[..], |t| &t.words()[..entries]);
    let wb = lb.as_ref().map_or(&none[..], |t| &t.words()[..entries]);
    for (block, (ba, bb)) in wa.chunks(BLOCK).zip(wb.chunks(BLOCK)).enumerate() {
        let differs = ba
            .iter()
            .zip(bb)
            .fold(0, |acc, (a, b)| acc | ((a ^ b) & !QCOW_OFLAG_COPIED));
        if differs == 0 {
            continue;
        }
        for (k, (a, b)) in ba.iter().zip(bb).enumerate() {
            if (a ^ b) & !QCOW_OFLAG_COPIED != 0 {
                let off = base + (block * BLOCK + k) as u64 * cluster;
                stop_if_told!(push_status(to, off, (off + cluster).min(limit), sink));
            }
        }
    }
    Ok(Visit::Continue)
}

const SUBCLUSTERS: u64 = 32;

fn entry(table: &Option<L2Table>, j: usize) -> (u64, u64) {
    table.as_ref().map_or((0, 0), |t| t.entry(j))
}

/// The runs of subclusters (first, count) that differ between two L2 entries; for standard
/// entries a differing cluster is the single run (0, 1).
fn changed_runs(a: (u64, u64), b: (u64, u64), extended: bool) -> Vec<(u64, u64)> {
    let (wa, wb) = (a.0 & !QCOW_OFLAG_COPIED, b.0 & !QCOW_OFLAG_COPIED);
    if !extended {
        return if wa == wb { vec![] } else { vec![(0, 1)] };
    }
    if (wa, a.1) == (wb, b.1) {
        return vec![];
    }
    if (wa | wb) & QCOW_OFLAG_COMPRESSED != 0 {
        return vec![(0, SUBCLUSTERS)];
    }
    let state = |w: u64, bm: u64, i: u64| {
        let alloc = (bm >> i) & 1;
        let zero = (bm >> (32 + i)) & 1;
        (
            alloc,
            zero,
            if alloc == 1 { w & L2E_OFFSET_MASK } else { 0 },
        )
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for i in 0..SUBCLUSTERS {
        if state(wa, a.1, i) == state(wb, b.1, i) {
            continue;
        }
        match runs.last_mut() {
            Some((first, count)) if *first + *count == i => *count += 1,
            _ => runs.push((i, 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_parses_snapshot_and_range() {
        assert_eq!(
            SnapshotSpec::parse("mon").unwrap(),
            SnapshotSpec::Snapshot("mon".into())
        );
        assert_eq!(
            SnapshotSpec::parse("mon..fri").unwrap(),
            SnapshotSpec::Range {
                from: "mon".into(),
                to: "fri".into()
            }
        );
        assert!(SnapshotSpec::parse("mon..").is_err());
        assert!(SnapshotSpec::parse("").is_err());
    }

    #[test]
    fn standard_entries_compare_without_the_copied_bit() {
        let e = 0x50000u64;
        assert!(changed_runs((e | QCOW_OFLAG_COPIED, 0), (e, 0), false).is_empty());
        assert_eq!(changed_runs((e, 0), (e | 1, 0), false), vec![(0, 1)]);
    }

    #[test]
    fn extended_entries_compare_per_subcluster() {
        // COW of a 2k write at 0x1000 (64k clusters) copies subclusters 0 and 2 to a new cluster.
        let old = (0x50000u64, 0xffff_ffffu64);
        let new = (0x70000u64, 0x7u64);
        assert_eq!(changed_runs(old, new, true), vec![(0, 32)]);
        // zeroing subcluster 0 of a full cluster in place
        let zeroed = (0x50000u64, 0x0000_0001_ffff_fffeu64);
        assert_eq!(changed_runs(old, zeroed, true), vec![(0, 1)]);
        // a write -z of 8k into an unallocated cluster
        assert_eq!(
            changed_runs((0, 0), (0, 0x0000_000f_0000_0000), true),
            vec![(0, 4)]
        );
    }
}
