//! Retention for qcow2 replicas: which internal snapshots to keep, and deleting the rest in one
//! commit of the qcow2 writer, as `qemu-img snapshot -d` deletes them.
//!
//! Snapshots are ranked by their place in the snapshot table (creation order), not by their
//! dates, which come from the source's clock: dates only group them into UTC days and weeks.
//! A snapshot stays when any rule keeps it:
//!
//! ```text
//! table order:  s1   s2   s3   s4   s5   s6        (s6 newest)
//! keep 2                            ✓    ✓
//! keep_daily D  the newest snapshot of each of the D most recent UTC days that have one
//! keep_weekly W the same per ISO week (Monday to Sunday, UTC)
//! held          the snapshot whose mapping the active layer has: always kept
//! ```
//!
//! Nothing is deleted while the replica's state records an apply in progress: the next receive
//! finishes or resumes it first. A qcow2 replica's identity is its file (device and inode), so
//! deleting snapshots leaves its state standing for it.
//!
//! ```
//! use blkdelta_common::image::qcow2::Snapshot;
//! use blkdelta_receive::prune::{plan_prune, PruneRules};
//!
//! let day = |n: u32, name: &str| Snapshot {
//!     id: name.into(), name: name.into(), l1_table_offset: 0, l1_size: 0,
//!     date_sec: n * 86_400, date_nsec: 0, vm_clock_nsec: 0, vm_state_size: 0, disk_size: 1 << 20,
//! };
//! let snaps = [day(1, "mon"), day(2, "tue"), day(3, "wed"), day(4, "thu")];
//! // Keep the newest one, and mon because the replica holds it: tue and wed go.
//! let rules = PruneRules { keep: 1, ..PruneRules::default() };
//! assert_eq!(plan_prune(&snaps, Some(0), &rules), vec![1, 2]);
//! ```

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use blkdelta_common::image::lock::lock_for_write;
use blkdelta_common::image::qcow2::{Qcow2Image, Qcow2Writer, Snapshot};
use blkdelta_common::image::{probe_format, Format};
use blkdelta_common::ImageError;

use crate::plan::TargetProbe;
use crate::state::{self, default_state_path};
use crate::ReceiveError;

#[cfg(test)]
mod tests;

/// Seconds in a UTC day (snapshot dates have no leap seconds).
const SECS_PER_DAY: u64 = 86_400;

/// Which snapshots a prune keeps besides the one the replica holds. Every rule adds to what
/// the others keep; all zero keeps only the held snapshot.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PruneRules {
    /// The newest `keep` snapshots, by table order.
    pub keep: usize,
    /// The newest snapshot of each of the `keep_daily` most recent UTC days that have one.
    pub keep_daily: usize,
    /// The newest snapshot of each of the `keep_weekly` most recent ISO weeks (UTC) that have
    /// one.
    pub keep_weekly: usize,
    /// When set, only snapshots whose names start with it are counted by the rules and
    /// deleted; every other snapshot stays (`sync` prunes only the `blkdelta-` snapshots it
    /// made, never one a user made).
    pub prefix: Option<String>,
}

/// What a prune did, or in a dry run would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneReport {
    /// The image's snapshots before the prune, in table order (oldest first).
    pub snapshots: Vec<Snapshot>,
    /// Indices into `snapshots` of those deleted (or, in a dry run, to delete), ascending.
    pub deleted: Vec<usize>,
    /// Index into `snapshots` of the one the replica holds (kept whatever the rules say), if
    /// it holds one.
    pub held: Option<usize>,
    /// How much less the file allocates afterwards (`st_blocks` × 512 before minus after);
    /// 0 in a dry run.
    pub freed_bytes: u64,
    /// Whether this was a dry run: nothing changed.
    pub dry_run: bool,
}

impl PruneReport {
    /// Each snapshot in table order, and whether it is (or would be) deleted.
    pub fn fates(&self) -> impl Iterator<Item = (&Snapshot, bool)> {
        let deleted = &self.deleted;
        (self.snapshots.iter().enumerate())
            .map(move |(i, s)| (s, deleted.binary_search(&i).is_ok()))
    }

    /// The snapshots deleted (or to delete), in table order.
    pub fn deleted(&self) -> impl Iterator<Item = &Snapshot> {
        self.fates().filter(|(_, d)| *d).map(|(s, _)| s)
    }

    /// The snapshots that stay, in table order.
    pub fn kept(&self) -> impl Iterator<Item = &Snapshot> {
        self.fates().filter(|(_, d)| !*d).map(|(s, _)| s)
    }

    /// The snapshot the replica holds, if any.
    pub fn held(&self) -> Option<&Snapshot> {
        self.held.and_then(|i| self.snapshots.get(i))
    }
}

/// The indices (into `snapshots`, in table order, ascending) of the snapshots `rules` do not
/// keep. `held`, the snapshot the replica holds, is always kept.
pub fn plan_prune(snapshots: &[Snapshot], held: Option<usize>, rules: &PruneRules) -> Vec<usize> {
    if let Some(prefix) = &rules.prefix {
        // The rules see only the matching snapshots; indices map back to the whole table.
        let matching: Vec<usize> = (0..snapshots.len())
            .filter(|&i| snapshots[i].name.starts_with(prefix.as_str()))
            .collect();
        let subset: Vec<Snapshot> = matching.iter().map(|&i| snapshots[i].clone()).collect();
        let held = held.and_then(|h| matching.iter().position(|&i| i == h));
        let rules = PruneRules {
            prefix: None,
            ..rules.clone()
        };
        return plan_prune(&subset, held, &rules)
            .into_iter()
            .map(|k| matching[k])
            .collect();
    }
    let n = snapshots.len();
    let mut keep = vec![false; n];
    for k in &mut keep[n.saturating_sub(rules.keep)..] {
        *k = true;
    }
    let daily = newest_of_periods(snapshots, rules.keep_daily, utc_day);
    let weekly = newest_of_periods(snapshots, rules.keep_weekly, iso_week);
    for i in daily.into_iter().chain(weekly).chain(held) {
        if let Some(k) = keep.get_mut(i) {
            *k = true;
        }
    }
    (0..n).filter(|&i| !keep[i]).collect()
}

/// The UTC day of a snapshot's date, counted from 1970-01-01.
fn utc_day(s: &Snapshot) -> u64 {
    u64::from(s.date_sec) / SECS_PER_DAY
}

/// The ISO week (Monday to Sunday, UTC) of a snapshot's date, counted from the week of
/// 1970-01-01. That day was a Thursday: three days after the Monday its week starts on.
fn iso_week(s: &Snapshot) -> u64 {
    (utc_day(s) + 3) / 7
}

/// The newest snapshot (the last in table order) of each of the `count` most recent periods
/// that have snapshots.
fn newest_of_periods(
    snapshots: &[Snapshot],
    count: usize,
    period: fn(&Snapshot) -> u64,
) -> Vec<usize> {
    let mut newest = BTreeMap::new();
    for (i, s) in snapshots.iter().enumerate() {
        newest.insert(period(s), i);
    }
    newest.into_values().rev().take(count).collect()
}

/// Deletes the snapshots of the qcow2 replica at `path` that `rules` do not keep, in one commit
/// (see the module documentation); with `dry_run`, only says which, opening the image for
/// reading only. `state_path` is where the replica's state lives (default: beside it).
///
/// Refuses, changing nothing, a target that is not a qcow2 image, a replica with an apply in
/// progress, an image another process has open, and one the qcow2 writer cannot keep
/// consistent.
pub fn prune(
    path: &Path,
    state_path: Option<&Path>,
    rules: &PruneRules,
    dry_run: bool,
) -> Result<PruneReport, ReceiveError> {
    let probe = TargetProbe::of(path)?;
    if !probe.exists {
        return Err(ReceiveError::OpenTarget {
            path: path.to_path_buf(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
    }
    if probe_format(path).map_err(|e| image_err(path, "read", e))? != Format::Qcow2 {
        return Err(ReceiveError::NotQcow2 {
            path: path.to_path_buf(),
        });
    }
    let state_path = state_path
        .map(Path::to_path_buf)
        .unwrap_or_else(|| default_state_path(path, probe.is_block_device));
    let _lock = (!dry_run).then(|| state::lock(&state_path)).transpose()?;
    let prior = state::load(&state_path)?;
    if let Some(st) = prior.as_ref().filter(|st| st.in_progress.is_some()) {
        return Err(ReceiveError::ApplyInProgress {
            path: path.to_path_buf(),
            what: state::describe(st),
        });
    }
    refuse_if_open(path)?;
    let (snapshots, held) = read_snapshots(path)?;
    let deleted = plan_prune(&snapshots, held, rules);
    let mut report = PruneReport {
        snapshots,
        deleted,
        held,
        freed_bytes: 0,
        dry_run,
    };
    if dry_run || report.deleted.is_empty() {
        return Ok(report);
    }
    // The replica stays the same file: its state (which names the file, not its times)
    // still stands for it, and what it holds is what the image says.
    report.freed_bytes = delete(path, &report.snapshots, &report.deleted)?;
    Ok(report)
}

/// Fails, as the qcow2 writer would, when another process has the image open: tested before
/// anything is read, so that a dry run refuses what the prune itself would. The locks taken
/// to test go away with the file at the end of this function.
fn refuse_if_open(path: &Path) -> Result<(), ReceiveError> {
    let file = File::open(path).map_err(|source| ReceiveError::OpenTarget {
        path: path.to_path_buf(),
        source,
    })?;
    lock_for_write(&file, path).map_err(ReceiveError::TargetLocked)
}

/// The image's snapshots and the one the replica holds, read with QEMU's reader locks (which
/// go away when the image is closed, before the writer opens it).
fn read_snapshots(path: &Path) -> Result<(Vec<Snapshot>, Option<usize>), ReceiveError> {
    let image = Qcow2Image::open(path).map_err(|e| image_err(path, "read", e))?;
    let held = image
        .held_snapshot()
        .map_err(|e| image_err(path, "read", e))?;
    Ok((image.snapshots().to_vec(), held))
}

/// Deletes the snapshots at `doomed` of those `planned` lists, after checking that the table
/// is still the one planned on; returns how much less the file allocates.
fn delete(path: &Path, planned: &[Snapshot], doomed: &[usize]) -> Result<u64, ReceiveError> {
    let before = allocated_bytes(path)?;
    let mut writer = Qcow2Writer::open(path).map_err(|e| image_err(path, "write", e))?;
    if !same_table(&writer.snapshots(), planned) {
        return Err(ReceiveError::SnapshotsChanged {
            path: path.to_path_buf(),
        });
    }
    writer
        .delete_snapshots(doomed)
        .map_err(|e| image_err(path, "delete snapshots of", e))?;
    drop(writer);
    Ok(before.saturating_sub(allocated_bytes(path)?))
}

/// Whether two snapshot tables list the same snapshots in the same order.
fn same_table(a: &[Snapshot], b: &[Snapshot]) -> bool {
    let key = |s: &Snapshot| (s.id.clone(), s.guid());
    a.len() == b.len() && a.iter().map(key).eq(b.iter().map(key))
}

/// Bytes the file at `path` allocates (`st_blocks` × 512).
fn allocated_bytes(path: &Path) -> Result<u64, ReceiveError> {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .map_err(|source| ReceiveError::OpenTarget {
            path: path.to_path_buf(),
            source,
        })
}

/// An image error of the replica at `path`: a lock conflict as [`ReceiveError::TargetLocked`],
/// anything else (a corrupt image, one the writer refuses) as [`ReceiveError::Qcow2`].
fn image_err(path: &Path, op: &'static str, source: ImageError) -> ReceiveError {
    match source {
        ImageError::InUse { .. } | ImageError::Lock { .. } => ReceiveError::TargetLocked(source),
        source => ReceiveError::Qcow2 {
            path: PathBuf::from(path),
            op,
            source,
        },
    }
}
