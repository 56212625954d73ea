//! Deciding whether, and from which transition, a stream may be applied to a replica — before
//! anything is opened for writing.
//!
//! Like `zfs receive` checking `fromguid`: an incremental applies only onto the snapshot it
//! starts from (compared by GUID), a full stream only onto an empty target or a replica of the
//! same source, and an interrupted apply is finished only by a stream carrying the same
//! transition. Transitions before the one the replica needs are read and verified, not applied,
//! so applying the same multi-snapshot stream again finishes an interrupted apply.

use std::path::PathBuf;

use blkdelta_common::digest::to_hex;
use blkdelta_common::stream::{SnapRef, StreamHeader, Transition};

use crate::state::{describe, InProgress, ReplicaState};
use crate::ReceiveError;

mod options;
mod probe;
mod undo;

#[cfg(test)]
mod tests;

pub use options::{Overrides, ReceiveOptions, CHECKPOINT_BYTES};
pub use probe::TargetProbe;
use undo::undo_plan;
pub use undo::UndoMode;

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
    /// A repair stream: the replica's content must match the stream's base digest.
    pub repair: bool,
    /// How the replica compares with its state (none: no state).
    pub health: Option<crate::state::Health>,
}

impl Plan {
    /// The interrupted apply this plan finishes, on the very replica it was writing: the
    /// transition applied first is the one in progress, and the replica was neither replaced
    /// nor emptied since. Only then do that apply's durable offset and kept hashes carry over.
    pub fn finishes(&self, header: &StreamHeader) -> Option<&InProgress> {
        let p = self.prior.as_ref()?.in_progress.as_ref()?;
        let same_replica = !self.fresh && self.health == Some(crate::state::Health::Unchanged);
        (same_replica && resume_point(&header.transitions, p) == Some(self.first)).then_some(p)
    }
}

fn named(s: &SnapRef) -> String {
    format!("'{}' ({})", s.name, to_hex(&s.guid))
}

/// Whether a stream's base is "the disk whose content digest is D": a repair stream made by
/// `send --against`.
pub fn is_repair_base(s: &SnapRef) -> bool {
    s.name.starts_with("blocks:")
}

/// Decides how `header`'s stream applies to a target in state `prior`; refuses, naming both
/// sides and the one switch that overrides the check, when it does not.
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
    let first = if opts.repair {
        repair_transition(header)?
    } else {
        refuse_repair_stream(header)?;
        check_identity(header, prior.as_ref(), probe, &opts.overrides)?;
        first_transition(header, prior.as_ref(), probe, &opts.overrides)?
    };
    let in_progress = prior.as_ref().and_then(|p| p.in_progress.as_ref());
    if first == 0 && header.resume_offset > 0 {
        check_resume_offset(header, in_progress, probe)?;
    }
    let undo = undo_plan(header, first, in_progress, opts)?;
    let health = prior.as_ref().map(|st| st.health(probe.identity.as_ref()));
    let checkpoint_bytes = match opts.checkpoint_bytes {
        0 => CHECKPOINT_BYTES,
        n => n,
    };
    Ok(Plan {
        first,
        fresh,
        prior,
        undo,
        checkpoint_bytes,
        repair: opts.repair,
        health,
    })
}

/// A repair stream applies as a whole, whatever the replica's state says: its content is
/// checked against the stream's base digest instead (by the caller).
fn repair_transition(header: &StreamHeader) -> Result<usize, ReceiveError> {
    match header.transitions[0].from.as_ref() {
        Some(f) if is_repair_base(f) && header.transitions.len() == 1 => Ok(0),
        _ => Err(ReceiveError::refused_outright(
            "--repair takes a repair stream (blkdelta send --against BLOCKS SOURCE); this one is not",
        )),
    }
}

/// A repair stream applies only where its base (the content its block list describes) is
/// checked, with `--repair`.
fn refuse_repair_stream(header: &StreamHeader) -> Result<(), ReceiveError> {
    match header.transitions[0].from.as_ref() {
        Some(from) if is_repair_base(from) => Err(ReceiveError::refused(
            format!(
                "this is a repair stream (for the disk whose block list digest starts {}): it \
                 applies only with --repair",
                &to_hex(&from.guid)[..16]
            ),
            "--repair",
        )),
        _ => Ok(()),
    }
}

/// The replica must be what its state describes: not deleted, replaced, resized or written
/// behind blkdelta's back. A new full stream onto a missing or empty target is a new seed.
fn check_identity(
    header: &StreamHeader,
    prior: Option<&ReplicaState>,
    probe: &TargetProbe,
    overrides: &Overrides,
) -> Result<(), ReceiveError> {
    let Some(st) = prior else {
        return Ok(());
    };
    let seed = header.is_full() && header.resume_offset == 0 && probe.is_empty();
    let health = match st.health(probe.identity.as_ref()) {
        crate::state::Health::Unchanged => shortened(header, st, probe).map_or(
            crate::state::Health::Unchanged,
            crate::state::Health::Changed,
        ),
        other => other,
    };
    match health {
        crate::state::Health::Unchanged => Ok(()),
        _ if seed => Ok(()),
        crate::state::Health::Missing => Err(ReceiveError::refused_outright(format!(
            "the replica is missing or empty, but its state says it holds {}: seed it again \
             with a full stream",
            describe(st)
        ))),
        crate::state::Health::Changed(_) if overrides.overwrite => Ok(()),
        crate::state::Health::Changed(what) => Err(ReceiveError::refused(
            format!(
                "the replica changed since blkdelta last wrote it ({what}): find what changed \
                 with 'blkdelta verify', repair it with 'blkdelta send --against', or seed it again"
            ),
            "--overwrite",
        )),
    }
}

/// While an apply is in progress only which file the replica is counts (its size and time
/// change with the apply's own writes), but its own writes never make it shorter than both the
/// size it recorded last and the size of the transition under way: a file shorter than that
/// was cut behind blkdelta's back, and finishing the apply would not bring back what was cut.
fn shortened(header: &StreamHeader, st: &ReplicaState, probe: &TargetProbe) -> Option<String> {
    let p = st.in_progress.as_ref()?;
    let Some(crate::identity::Identity::File { size: recorded, .. }) = &st.identity else {
        return None;
    };
    let to_size = header
        .transitions
        .iter()
        .find(|t| p.to.is(&t.to))
        .map_or(*recorded, |t| t.virtual_size);
    let least = (*recorded).min(to_size);
    // An emptied file is refused as missing or empty, whatever the switches.
    let cut = probe.exists && !probe.is_block_device && probe.size > 0 && probe.size < least;
    cut.then(|| {
        format!(
            "its size is {} bytes, shorter than the apply in progress leaves it ({least})",
            probe.size
        )
    })
}

/// A resumed stream lacks its first transition's records below its resume offset: the replica
/// must be part way through that transition and already hold them durably.
fn check_resume_offset(
    header: &StreamHeader,
    p: Option<&InProgress>,
    probe: &TargetProbe,
) -> Result<(), ReceiveError> {
    let t = &header.transitions[0];
    if probe.is_empty() {
        return Err(ReceiveError::refused_outright(format!(
            "the stream resumes '{}' at offset {}, but the target is missing or empty: send \
             the stream whole",
            t.to.name, header.resume_offset
        )));
    }
    let Some(p) = p.filter(|p| p.to.is(&t.to)) else {
        return Err(ReceiveError::refused_outright(format!(
            "the stream resumes transition '{}' at offset {}, but the replica is not part way \
             through it",
            t.to.name, header.resume_offset
        )));
    };
    if header.resume_offset > p.durable_offset {
        return Err(ReceiveError::refused_outright(format!(
            "the stream resumes at offset {} but the replica is durable only below {}",
            header.resume_offset, p.durable_offset
        )));
    }
    Ok(())
}

fn first_transition(
    header: &StreamHeader,
    prior: Option<&ReplicaState>,
    probe: &TargetProbe,
    overrides: &Overrides,
) -> Result<usize, ReceiveError> {
    let ts = &header.transitions;
    if header.is_full() && probe.is_empty() {
        // A new seed (a resumed one is refused later: it lacks what the target lacks).
        return Ok(0);
    }
    // Only a replica as its state describes it is part way through, or past, a stream. While
    // an apply is in progress only which file it is counts: an emptied one holds nothing of it.
    let as_described = prior.filter(|st| {
        !probe.is_empty() && st.health(probe.identity.as_ref()) == crate::state::Health::Unchanged
    });
    if let Some(k) = as_described.and_then(|st| finishing(ts, st)) {
        return Ok(k);
    }
    if header.is_full() {
        return full_stream(header, prior, probe, overrides);
    }
    let from = ts[0].from.as_ref().expect("an incremental has a base");
    let Some(st) = prior else {
        return Err(ReceiveError::refused(
            format!(
                "the target is not a blkdelta replica (no state); the stream needs snapshot {}",
                named(from)
            ),
            "--rebase",
        ))
        .or_else(|e| if overrides.rebase { Ok(0) } else { Err(e) });
    };
    if probe.is_empty() {
        return Err(ReceiveError::refused_outright(format!(
            "the target is missing or empty, but its state says it holds {}",
            describe(st)
        )));
    }
    let held = match (&st.snapshot, &st.in_progress) {
        (_, Some(_)) => None,
        (held, None) => held.as_ref(),
    };
    let base = held.and_then(|h| {
        let k = ts
            .iter()
            .position(|t| t.from.as_ref().is_some_and(|f| h.satisfies(f)))?;
        Some((k, ts[k].from.as_ref().is_some_and(|f| h.is(f))))
    });
    if let Some((k, exact)) = base {
        // A base named by reference matches any state of that name: a stream whose states
        // the replica went through already is an old one replayed. A base matched by GUID is
        // no replay (the stream undone, then applied again; here onto a changed replica).
        let replayed = ts[k..].iter().find(|t| !exact && st.went_through(&t.to));
        return match replayed {
            Some(t) if !overrides.rewind => Err(ReceiveError::refused(
                format!(
                    "the replica went through {} already and now holds {}: this stream is an \
                     old one replayed",
                    named(&t.to),
                    describe(st)
                ),
                "--rewind",
            )),
            _ => Ok(k),
        };
    }
    // Whatever the stream goes to, its changes are from a base the replica does not hold:
    // applying them anyway is a rebase (rewinding is what a full stream does).
    let older = ts.iter().find(|t| st.went_through(&t.to));
    let (why, switch, allowed) = match older {
        Some(t) => (
            format!(
                "the stream goes to {}, which is older than what the replica holds ({}), \
                 from {}, which it does not hold",
                named(&t.to),
                describe(st),
                named(from)
            ),
            "--rebase",
            overrides.rebase,
        ),
        None if st.in_progress.is_some() => (
            format!(
                "the replica has {} that this stream does not carry",
                describe(st)
            ),
            "--rebase",
            overrides.rebase,
        ),
        None => (
            format!(
                "the replica holds {} but the stream starts from {}",
                describe(st),
                named(from)
            ),
            "--rebase",
            overrides.rebase,
        ),
    };
    if allowed {
        Ok(0)
    } else {
        Err(ReceiveError::refused(why, switch))
    }
}

/// Where a stream that the replica is part way through, or past, picks up: the transition an
/// interrupted apply was in, or the one after the snapshot the replica holds. Not a replay:
/// transitions before it are verified, not applied.
fn finishing(ts: &[Transition], st: &ReplicaState) -> Option<usize> {
    if let Some(p) = &st.in_progress {
        return resume_point(ts, p);
    }
    let held = st.snapshot.as_ref()?;
    ts.iter()
        .position(|t| held.is(&t.to))
        .map(|k| k + 1)
        .or_else(|| {
            ts.iter()
                .position(|t| t.from.as_ref().is_some_and(|f| held.is(f)))
        })
}

/// A full stream goes onto a missing or empty target, or (to finish it) a replica part way
/// through it; a replica of the same source is rewound only with `--rewind`, anything else
/// overwritten only with `--overwrite`.
fn full_stream(
    header: &StreamHeader,
    prior: Option<&ReplicaState>,
    probe: &TargetProbe,
    overrides: &Overrides,
) -> Result<usize, ReceiveError> {
    if probe.is_empty() {
        return Ok(0);
    }
    let same_source = prior
        .filter(|st| st.source_kind == header.source.kind && st.source_name == header.source.name);
    let Some(st) = same_source else {
        if overrides.overwrite {
            return Ok(0);
        }
        return Err(ReceiveError::refused(
            format!(
                "the target holds data that is not a replica of {} '{}'; a full stream would \
                 overwrite it",
                header.source.kind, header.source.name
            ),
            "--overwrite",
        ));
    };
    if overrides.rewind {
        return Ok(0);
    }
    let why = match header.transitions.iter().find(|t| st.went_through(&t.to)) {
        Some(t) => format!(
            "the stream goes to {}, which is older than what the replica holds ({})",
            named(&t.to),
            describe(st)
        ),
        None => format!(
            "the replica holds {} of {} '{}' already; a full stream would replace it",
            describe(st),
            header.source.kind,
            header.source.name
        ),
    };
    Err(ReceiveError::refused(why, "--rewind"))
}

/// The transition an interrupted apply `p` was in, if the stream carries it.
fn resume_point(ts: &[Transition], p: &InProgress) -> Option<usize> {
    ts.iter().position(|t| {
        let from = match (&p.from, &t.from) {
            (None, None) => true,
            (Some(a), Some(b)) => a.is(b),
            _ => false,
        };
        from && p.to.is(&t.to)
    })
}
