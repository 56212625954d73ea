//! Resuming a send: the stream starts at the transition a resume token names, at the offset
//! below which the replica already holds that transition's records.

use std::sync::Arc;

use blkdelta_common::extent::{Extent, ExtentSink, Visit};
use blkdelta_common::image::BlockSource;
use blkdelta_common::stream::{ResumeToken, SnapshotInfo, SourceInfo, Transition};
use blkdelta_common::ImageError;

use super::ChangeSource;
use crate::SendError;

/// A change source that starts at one of another source's transitions, part way through it.
pub struct Resumed {
    inner: Box<dyn ChangeSource>,
    first: usize,
    offset: u64,
    /// The inner source's transitions from `first` on, the first one producing the token's state.
    transitions: Vec<Transition>,
}

/// Whether `t` is the transition `token` names. A named state read from a block device is
/// new at every send (its content cannot be fingerprinted), so it matches the token's state
/// of the same name (the first 8 bytes of a named state's GUID come from its name).
fn names(t: &Transition, token: &ResumeToken) -> bool {
    let from = t.from.as_ref().map(|f| f.guid) == token.from;
    let to = t.to.guid == token.to || (!t.to.is_name_ref() && t.to.guid[..8] == token.to[..8]);
    from && to
}

impl Resumed {
    /// Starts `inner` where `token` says; refuses a token for another image or transition.
    pub fn new(inner: Box<dyn ChangeSource>, token: &ResumeToken) -> Result<Self, SendError> {
        let all = inner.transitions();
        let first = all
            .iter()
            .position(|t| t.from.as_ref().map(|f| f.guid) == token.from && t.to.guid == token.to)
            .or_else(|| all.iter().position(|t| names(t, token)))
            .ok_or_else(|| {
                SendError::Usage(
                    "the resume token is for another image or another transition than SOURCE \
                     carries"
                        .into(),
                )
            })?;
        if token.offset > all[first].virtual_size {
            return Err(SendError::Usage(
                "the resume token's offset lies past its transition's virtual size".into(),
            ));
        }
        let mut transitions = all[first..].to_vec();
        transitions[0].to.guid = token.to;
        if let Some(next) = transitions.get_mut(1).and_then(|t| t.from.as_mut()) {
            next.guid = token.to;
        }
        Ok(Resumed {
            inner,
            first,
            offset: token.offset,
            transitions,
        })
    }
}

impl ChangeSource for Resumed {
    fn info(&self) -> SourceInfo {
        self.inner.info()
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    fn changes(&self, index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        if index > 0 {
            return self.inner.changes(self.first + index, sink);
        }
        let mut clipped = StartAt {
            inner: sink,
            offset: self.offset,
        };
        self.inner.changes(self.first, &mut clipped)
    }

    fn reader(&self, index: usize) -> Arc<dyn BlockSource> {
        self.inner.reader(self.first + index)
    }

    fn to_digest(&self, index: usize) -> Option<[u8; 32]> {
        self.inner.to_digest(self.first + index)
    }

    /// The inner source's, renumbered; none when the first transition's state took the
    /// token's GUID (see [`names`]) and the snapshot's fields no longer give it.
    fn snapshot_info(&self, index: usize) -> Option<SnapshotInfo> {
        let info = SnapshotInfo {
            transition: index as u32,
            ..self.inner.snapshot_info(self.first + index)?
        };
        info.is_for(&self.transitions[index].to).then_some(info)
    }

    fn resume_offset(&self) -> u64 {
        self.offset
    }
}

/// Passes on only what lies at or after `offset`.
struct StartAt<'a> {
    inner: &'a mut dyn ExtentSink,
    offset: u64,
}

impl ExtentSink for StartAt<'_> {
    fn push(&mut self, e: Extent) -> Result<Visit, ImageError> {
        if e.end() <= self.offset {
            return Ok(Visit::Continue);
        }
        let start = e.offset.max(self.offset);
        self.inner.push(Extent::new(start, e.end() - start, e.kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkdelta_common::extent::ExtentKind;

    #[test]
    fn start_at_clips_and_drops() {
        let mut out: Vec<Extent> = Vec::new();
        let mut s = StartAt {
            inner: &mut out,
            offset: 100,
        };
        for e in [
            Extent::new(0, 50, ExtentKind::Data),
            Extent::new(50, 100, ExtentKind::Zero),
            Extent::new(200, 10, ExtentKind::Discard),
        ] {
            assert_eq!(s.push(e).unwrap(), Visit::Continue);
        }
        assert_eq!(
            out,
            vec![
                Extent::new(100, 50, ExtentKind::Zero),
                Extent::new(200, 10, ExtentKind::Discard)
            ]
        );
    }
}
