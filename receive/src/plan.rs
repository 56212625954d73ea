//! Deciding whether, and from which transition, a stream may be applied to a replica — before
//! anything is opened for writing.
//!
//! Like `zfs receive` checking `fromguid`: an incremental applies only onto the snapshot it
//! starts from (compared by GUID), a full stream only onto an empty target or a replica of the
//! same source, and an interrupted apply is finished only by a stream carrying the same
//! transition. Transitions before the one the replica needs are read and verified, not applied,
//! so applying the same multi-snapshot stream again finishes an interrupted apply.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use blkdelta_common::digest::to_hex;
use blkdelta_common::stream::{SnapRef, StreamHeader, Transition};

use crate::apply::ReceiveOptions;
use crate::state::{InProgress, ReplicaState, StateSnap};
use crate::ReceiveError;

/// What the target path holds, looked at without opening it for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetProbe {
    /// Whether the path exists.
    pub exists: bool,
    /// Whether it is a block device.
    pub is_block_device: bool,
    /// Its size in bytes (0 when missing).
    pub size: u64,
}

impl TargetProbe {
    /// Looks at `path`.
    pub fn of(path: &Path) -> Result<Self, ReceiveError> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(TargetProbe {
                    exists: false,
                    is_block_device: false,
                    size: 0,
                })
            }
            Err(source) => {
                return Err(ReceiveError::OpenTarget {
                    path: path.to_path_buf(),
                    source,
                })
            }
        };
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            let f = std::fs::File::open(path).map_err(|source| ReceiveError::OpenTarget {
                path: path.to_path_buf(),
                source,
            })?;
            rustix::fs::seek(&f, rustix::fs::SeekFrom::End(0)).map_err(|e| {
                ReceiveError::OpenTarget {
                    path: path.to_path_buf(),
                    source: e.into(),
                }
            })?
        } else {
            meta.len()
        };
        Ok(TargetProbe {
            exists: true,
            is_block_device,
            size,
        })
    }

    /// Whether the target reads as zeros everywhere: a missing or empty file.
    pub fn is_empty(&self) -> bool {
        !self.exists || (!self.is_block_device && self.size == 0)
    }
}

/// How the undo stream is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndoMode {
    /// A new undo stream (the file must not exist).
    Create,
    /// The undo stream of the interrupted apply this one finishes.
    Continue,
}

/// How a stream is to be applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    /// Index of the first transition applied; earlier ones are only verified.
    pub first: usize,
    /// The target reads as zeros: zero and discard records of a full stream are skipped.
    pub fresh: bool,
    /// The replica's state before this apply.
    pub prior: Option<ReplicaState>,
    /// The undo stream to write, and how to open it.
    pub undo: Option<(PathBuf, UndoMode)>,
    /// Applied bytes between checkpoints of the durable offset.
    pub checkpoint_bytes: u64,
}

fn same(state: Option<&StateSnap>, snap: Option<&SnapRef>) -> bool {
    match (state, snap) {
        (None, None) => true,
        (Some(s), Some(r)) => s.is(r),
        _ => false,
    }
}

fn named(s: &SnapRef) -> String {
    format!("'{}' ({})", s.name, to_hex(&s.guid))
}

/// Decides how `header`'s stream applies to a target in state `prior`; refuses, naming both
/// sides, when it does not. `--force` applies every transition whatever the replica holds.
pub fn plan(
    header: &StreamHeader,
    prior: Option<ReplicaState>,
    probe: &TargetProbe,
    opts: &ReceiveOptions,
) -> Result<Plan, ReceiveError> {
    if probe.is_block_device {
        let needed = header.transitions.iter().map(|t| t.virtual_size).max();
        if let Some(needed) = needed.filter(|&n| n > probe.size) {
            return Err(ReceiveError::TooSmall {
                target: probe.size,
                needed,
            });
        }
    }
    let fresh = probe.is_empty();
    let first = if opts.force {
        0
    } else {
        first_transition(header, prior.as_ref(), probe)?
    };
    let in_progress = prior.as_ref().and_then(|p| p.in_progress.as_ref());
    if !opts.force && first == 0 && header.resume_offset > 0 {
        check_resume_offset(header, in_progress)?;
    }
    let undo = undo_plan(header, first, in_progress, opts)?;
    let checkpoint_bytes = match opts.checkpoint_bytes {
        0 => crate::apply::CHECKPOINT_BYTES,
        n => n,
    };
    Ok(Plan {
        first,
        fresh,
        prior,
        undo,
        checkpoint_bytes,
    })
}

/// A resumed stream lacks its first transition's records below its resume offset: the replica
/// must be part way through that transition and already hold them durably.
fn check_resume_offset(header: &StreamHeader, p: Option<&InProgress>) -> Result<(), ReceiveError> {
    let t = &header.transitions[0];
    let Some(p) = p.filter(|p| p.to.is(&t.to)) else {
        return Err(ReceiveError::Refused(format!(
            "the stream resumes transition '{}' at offset {}, but the replica is not part way \
             through it",
            t.to.name, header.resume_offset
        )));
    };
    if header.resume_offset > p.durable_offset {
        return Err(ReceiveError::Refused(format!(
            "the stream resumes at offset {} but the replica is durable only below {}",
            header.resume_offset, p.durable_offset
        )));
    }
    Ok(())
}

/// Checks the undo rules: one incremental transition; a new file for a new apply; the same
/// file to finish an interrupted apply that had one.
fn undo_plan(
    header: &StreamHeader,
    first: usize,
    in_progress: Option<&InProgress>,
    opts: &ReceiveOptions,
) -> Result<Option<(PathBuf, UndoMode)>, ReceiveError> {
    let refuse = |why: String| Err(ReceiveError::Refused(why));
    let resuming = in_progress.filter(|p| {
        header
            .transitions
            .get(first)
            .is_some_and(|t| p.to.is(&t.to))
    });
    let Some(path) = &opts.undo else {
        return match resuming.and_then(|p| p.undo.as_ref()) {
            Some(u) if !opts.force => refuse(format!(
                "the interrupted apply writes the undo stream {u}: pass --undo {u} to finish it"
            )),
            _ => Ok(None),
        };
    };
    let applied = &header.transitions[first.min(header.transitions.len())..];
    match applied {
        [] => return Ok(None),
        [t] if t.from.is_some() => {}
        _ => {
            return refuse(format!(
            "--undo takes a stream that applies one incremental transition; this one applies {} \
                 (send the range one snapshot at a time)",
            applied.len()
        ))
        }
    }
    match resuming {
        Some(p) if p.undo.as_deref() == Some(&*crate::apply::absolute_display(path)) => {
            Ok(Some((path.clone(), UndoMode::Continue)))
        }
        Some(_) => refuse(format!(
            "the interrupted apply did not write {}: its old contents are partly overwritten \
             already; finish it without --undo",
            path.display()
        )),
        None if path.exists() => refuse(format!(
            "the undo file {} exists already: choose another",
            path.display()
        )),
        None => Ok(Some((path.clone(), UndoMode::Create))),
    }
}

fn first_transition(
    header: &StreamHeader,
    prior: Option<&ReplicaState>,
    probe: &TargetProbe,
) -> Result<usize, ReceiveError> {
    let ts = &header.transitions;
    let refuse = |why: String| Err(ReceiveError::Refused(why));
    if header.is_full() {
        let same_source = prior.is_some_and(|st| {
            st.source_kind == header.source.kind && st.source_name == header.source.name
        });
        if probe.is_empty() || same_source {
            return Ok(0);
        }
        return refuse(format!(
            "the target holds data that is not a replica of {} '{}'; a full stream would overwrite it",
            header.source.kind, header.source.name
        ));
    }
    let from = ts[0].from.as_ref().expect("an incremental has a base");
    let Some(st) = prior else {
        return refuse(format!(
            "the target is not a blkdelta replica (no state); the stream needs snapshot {}",
            named(from)
        ));
    };
    if probe.is_empty() {
        return refuse(format!(
            "the target is missing or empty, but its state says it holds {}",
            crate::apply::describe(st)
        ));
    }
    // While an apply is in progress the size may be part way through a change.
    if !probe.is_block_device && st.in_progress.is_none() && probe.size != st.virtual_size {
        return refuse(format!(
            "the target is {} bytes but its state says {}: it was changed outside blkdelta",
            probe.size, st.virtual_size
        ));
    }
    match (&st.snapshot, &st.in_progress) {
        (_, Some(p)) => resume_point(ts, p).ok_or(()).or_else(|()| {
            refuse(format!(
                "the replica has {} that this stream does not carry",
                crate::apply::describe(st)
            ))
        }),
        (Some(held), None) => {
            if let Some(k) = ts.iter().position(|t| same(Some(held), t.from.as_ref())) {
                return Ok(k);
            }
            if held.is(&ts[ts.len() - 1].to) {
                return Ok(ts.len());
            }
            refuse(format!(
                "the replica holds '{}' ({}) but the stream starts from {}",
                held.name,
                held.guid,
                named(from)
            ))
        }
        (None, None) => refuse(format!(
            "the replica holds no snapshot; the stream needs {}",
            named(from)
        )),
    }
}

/// The transition an interrupted apply `p` was in, if the stream carries it.
fn resume_point(ts: &[Transition], p: &InProgress) -> Option<usize> {
    ts.iter()
        .position(|t| same(p.from.as_ref(), t.from.as_ref()) && p.to.is(&t.to))
}
