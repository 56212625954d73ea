//! The undo rules of a plan: which undo stream an apply writes, and how it opens it.

use std::path::PathBuf;

use blkdelta_common::stream::StreamHeader;

use super::ReceiveOptions;
use crate::state::{absolute_display, InProgress};
use crate::ReceiveError;

/// How the undo stream is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UndoMode {
    /// A new undo stream (the file must not exist).
    Create,
    /// The undo stream of the interrupted apply this one finishes.
    Continue,
    /// An undo stream of this transition that an apply created and never used (it was killed
    /// before recording anything): started again.
    Restart,
}

/// Checks the undo rules: one incremental transition; a new file for a new apply; the same
/// file to finish an interrupted apply that had one.
pub(super) fn undo_plan(
    header: &StreamHeader,
    first: usize,
    in_progress: Option<&InProgress>,
    opts: &ReceiveOptions,
) -> Result<Option<(PathBuf, UndoMode)>, ReceiveError> {
    let refuse = |why: String| Err(ReceiveError::refused_outright(why));
    let resuming = in_progress.filter(|p| {
        header
            .transitions
            .get(first)
            .is_some_and(|t| p.to.is(&t.to))
    });
    let Some(path) = &opts.undo else {
        return match resuming.and_then(|p| p.undo.as_ref()) {
            Some(u) if !opts.overrides.overwrite => Err(ReceiveError::refused(
                format!(
                    "the interrupted apply writes the undo stream {u}: pass --undo {u} to \
                     finish it"
                ),
                "--overwrite",
            )),
            _ => Ok(None),
        };
    };
    let applied = &header.transitions[first.min(header.transitions.len())..];
    match applied {
        [] => return Ok(None),
        [t] if t.from.is_some() => {}
        [_] => {
            return refuse(
                "--undo takes an incremental stream: a full stream replaces everything, and \
                 its undo would be a whole copy of the old replica"
                    .into(),
            )
        }
        _ => {
            return refuse(format!(
            "--undo takes a stream that applies one incremental transition; this one applies {} \
                 (send the range one snapshot at a time)",
            applied.len()
        ))
        }
    }
    match resuming {
        Some(p) if p.undo.as_deref() == Some(&*absolute_display(path)) => {
            Ok(Some((path.clone(), UndoMode::Continue)))
        }
        Some(_) => refuse(format!(
            "the interrupted apply did not write {}: its old contents are partly overwritten \
             already; finish it without --undo",
            path.display()
        )),
        // Created by an apply killed before it recorded anything: nothing was saved in it,
        // and nothing written to the replica.
        None if crate::undo::is_unused(path, &applied[0]) => {
            Ok(Some((path.clone(), UndoMode::Restart)))
        }
        None if path.exists() => refuse(format!(
            "the undo file {} exists already: choose another",
            path.display()
        )),
        None => Ok(Some((path.clone(), UndoMode::Create))),
    }
}
