//! A qcow2 replica describes itself: the snapshot it holds is the one whose mapping its
//! active layer has, whatever its state file says. QEMU may revert it to an older snapshot
//! (`qemu-img snapshot -a`), delete snapshots, or write into it (a VM booted from it): the
//! state is brought in line with the image before anything trusts it.
//!
//! ```text
//! active layer = snapshot S (same clusters)  ─► holds S's state (its GUID, or the alias the
//!                                               state recorded for it)
//! active layer = no snapshot                 ─► holds nothing (an incremental is refused)
//! apply in progress, image holds its `to`    ─► the apply reached it (killed before it said so)
//! apply in progress otherwise                ─► left as it is: its resume point stands
//! ```

use std::path::Path;

use blkdelta_common::digest::to_hex;
use blkdelta_common::image::qcow2::Qcow2Image;
use blkdelta_common::image::OpenOptions;

use crate::identity::Identity;
use crate::plan::TargetProbe;
use crate::state::{self, ReplicaState, StateSnap};
use crate::target::{replica_format, ReplicaFormat};
use crate::ReceiveError;

/// The replica at `path` as it is now, and its state at `state_path` brought in line with it:
/// for a qcow2 replica, what the image holds (see the module documentation), its virtual size
/// and its identity as an image; for anything else, the state as saved.
pub fn load_state(
    path: &Path,
    state_path: &Path,
) -> Result<(Option<ReplicaState>, TargetProbe), ReceiveError> {
    let probe = TargetProbe::of(path)?;
    let st = state::load(state_path)?;
    if !probe.exists || probe.is_block_device || replica_format(path, None)? != ReplicaFormat::Qcow2
    {
        return Ok((st, probe));
    }
    let held = held(path, &OpenOptions::default())?;
    let meta = std::fs::metadata(path).map_err(|source| ReceiveError::OpenTarget {
        path: path.to_path_buf(),
        source,
    })?;
    let probe = TargetProbe {
        size: held.virtual_size,
        identity: Some(Identity::of_image(&meta)),
        ..probe
    };
    let st = reconcile(st, &held, probe.identity.as_ref());
    Ok((st, probe))
}

/// What the qcow2 replica at `path` holds, read from the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    /// Virtual size of the active layer.
    pub virtual_size: u64,
    /// The snapshots the active layer is (name, their own GUID in hex), newest first: none,
    /// one, or several when QEMU took a snapshot of the replica as it was.
    pub matches: Vec<(String, String)>,
    /// Names of every snapshot, oldest first.
    pub snapshots: Vec<String>,
}

/// Reads what the qcow2 image at `path` holds (taking QEMU's reader locks as `options` say:
/// an image a VM writes is refused).
pub fn held(path: &Path, options: &OpenOptions) -> Result<Held, ReceiveError> {
    let err = |source| ReceiveError::Qcow2 {
        op: "read",
        path: path.to_path_buf(),
        source,
    };
    let image = Qcow2Image::open_with(path, options).map_err(err)?;
    let mut matches = Vec::new();
    for (i, s) in image.snapshots().iter().enumerate().rev() {
        if image.active_is_snapshot(i).map_err(err)? {
            matches.push((s.name.clone(), to_hex(&s.guid())));
        }
    }
    Ok(Held {
        virtual_size: image.virtual_size(),
        matches,
        snapshots: image.snapshots().iter().map(|s| s.name.clone()).collect(),
    })
}

/// One snapshot of a qcow2 replica, and the stream state it holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ReplicaSnapshot {
    /// The snapshot's id in the image.
    pub id: String,
    /// Its name in the image.
    pub name: String,
    /// Its date, seconds since the epoch.
    pub date_sec: u32,
    /// The state it holds: the name and GUID streams use for it.
    pub state: StateSnap,
}

/// The snapshots of the qcow2 replica at `path`, oldest first, each with the state it holds
/// (its own GUID, or the one `st`'s aliases give it); empty for a replica that is no qcow2
/// image.
pub fn snapshots(
    path: &Path,
    st: Option<&ReplicaState>,
) -> Result<Vec<ReplicaSnapshot>, ReceiveError> {
    let is_file = std::fs::metadata(path).is_ok_and(|m| m.is_file());
    if !is_file || replica_format(path, None)? != ReplicaFormat::Qcow2 {
        return Ok(Vec::new());
    }
    let image = Qcow2Image::open(path).map_err(|source| ReceiveError::Qcow2 {
        op: "read",
        path: path.to_path_buf(),
        source,
    })?;
    Ok(image
        .snapshots()
        .iter()
        .map(|s| {
            let guid = to_hex(&s.guid());
            let state = match st {
                Some(st) => st.state_of_snapshot(&guid, &s.name),
                None => StateSnap {
                    name: s.name.clone(),
                    guid,
                },
            };
            ReplicaSnapshot {
                id: s.id.clone(),
                name: s.name.clone(),
                date_sec: s.date_sec,
                state,
            }
        })
        .collect())
}

/// Brings the state `st` of the qcow2 replica at `path` (`identity`: what the path is now) in
/// line with what the image holds. A replica without a state that holds a snapshot gets one:
/// the image says what it is.
pub fn reconcile(
    st: Option<ReplicaState>,
    held: &Held,
    identity: Option<&Identity>,
) -> Option<ReplicaState> {
    let same_file = |st: &ReplicaState| match (&st.identity, identity) {
        (Some(recorded), Some(now)) => recorded.changed(now, false).is_none(),
        _ => true,
    };
    let Some(mut st) = st else {
        let (name, guid) = held.matches.first().cloned()?;
        let mut st = ReplicaState::new(held.virtual_size);
        st.source_kind = "qcow2".into();
        st.source_name = name.clone();
        st.remember(&guid);
        st.snapshot = Some(StateSnap { name, guid });
        st.identity = identity.cloned();
        return Some(st);
    };
    if !same_file(&st) {
        // Another file: the state's checks refuse it as it is.
        return Some(st);
    }
    // Of the snapshots the active layer is, the one the state knows: the one it holds, else
    // the newest it went through, else the newest.
    let candidates: Vec<StateSnap> = held
        .matches
        .iter()
        .map(|(name, guid)| st.state_of_snapshot(guid, name))
        .collect();
    let is = |c: &&StateSnap, g: &str| c.guid.eq_ignore_ascii_case(g);
    let holds = st
        .snapshot
        .as_ref()
        .and_then(|h| candidates.iter().find(|c| is(c, &h.guid)))
        .or_else(|| {
            st.history
                .iter()
                .rev()
                .find_map(|g| candidates.iter().find(|c| is(c, g)))
        })
        .or(candidates.first())
        .cloned();
    if let Some(p) = &st.in_progress {
        // It reached `to` (killed before it said so), or it is back at `from` (reverted with
        // `qemu-img snapshot -a`, or nothing written yet: every write after a snapshot goes to
        // new clusters): either is what it holds. Anything else: part way, resumable.
        let at = |s: Option<&StateSnap>| matches!((&holds, s), (Some(h), Some(s)) if h.guid.eq_ignore_ascii_case(&s.guid));
        if !at(Some(&p.to)) && !at(p.from.as_ref()) {
            return Some(st);
        }
    }
    let changed = st.snapshot.as_ref().map(|s| &s.guid) != holds.as_ref().map(|h| &h.guid)
        || st.in_progress.is_some();
    if changed {
        // Its kept hashes were of what it held before.
        st.digest = None;
        st.in_progress = None;
    }
    if let Some(h) = &holds {
        // Reverted to a state it went through: what came after is no longer its past (a
        // stream to those states again is no replay), as after `zfs rollback -r`.
        if let Some(i) = st
            .history
            .iter()
            .position(|g| g.eq_ignore_ascii_case(&h.guid))
        {
            if changed {
                st.history.truncate(i + 1);
            }
        }
        st.remember(&h.guid);
    }
    if holds.is_none() {
        st.written_since = st.snapshot.as_ref().map(|s| s.name.clone());
    }
    st.snapshot = holds;
    st.virtual_size = held.virtual_size;
    st.diverged = None;
    // The file changed by QEMU's hand (a revert, a deleted snapshot): it is still this replica.
    st.identity = identity.cloned();
    Some(st)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holds(snapshot: Option<(&str, &str)>) -> Held {
        Held {
            virtual_size: 1 << 20,
            matches: snapshot
                .map(|(n, g)| (n.to_string(), g.to_string()))
                .into_iter()
                .collect(),
            snapshots: vec!["a".into(), "b".into()],
        }
    }

    const A: &str = "0000000000000000000000000000000a";
    const B: &str = "0000000000000000000000000000000b";

    fn holding(name: &str, guid: &str) -> ReplicaState {
        let mut st = ReplicaState::new(1 << 20);
        st.snapshot = Some(StateSnap {
            name: name.into(),
            guid: guid.into(),
        });
        st.digest = Some("ff".into());
        st
    }

    #[test]
    fn a_revert_makes_the_replica_hold_the_older_snapshot() {
        let st = reconcile(Some(holding("b", B)), &holds(Some(("a", A))), None).unwrap();
        assert_eq!(st.snapshot.unwrap().guid, A);
        assert_eq!(st.digest, None, "kept hashes were of b");
    }

    #[test]
    fn a_write_into_the_replica_makes_it_hold_nothing() {
        let st = reconcile(Some(holding("b", B)), &holds(None), None).unwrap();
        assert_eq!(st.snapshot, None);
        assert!(crate::state::describe(&st).contains("qemu-img snapshot -a b"));
    }

    #[test]
    fn the_state_that_agrees_keeps_its_digest() {
        let st = reconcile(Some(holding("b", B)), &holds(Some(("b", B))), None).unwrap();
        assert_eq!(st.digest.as_deref(), Some("ff"));
    }

    #[test]
    fn an_alias_names_the_stream_state_of_a_snapshot() {
        let mut st = holding("daily", "1111");
        st.alias(
            B,
            StateSnap {
                name: "daily".into(),
                guid: "1111".into(),
            },
        );
        let st = reconcile(Some(st), &holds(Some(("daily-2", B))), None).unwrap();
        assert_eq!(st.snapshot.unwrap().guid, "1111");
        assert_eq!(st.digest.as_deref(), Some("ff"));
    }

    #[test]
    fn an_apply_reverted_to_its_base_holds_the_base() {
        let mut st = holding("a", A);
        st.snapshot = None;
        st.in_progress = Some(crate::state::InProgress {
            stream_id: "00".repeat(16),
            from: Some(StateSnap {
                name: "a".into(),
                guid: A.into(),
            }),
            to: StateSnap {
                name: "b".into(),
                guid: B.into(),
            },
            transition: 0,
            durable_offset: 1 << 20,
            undo: None,
        });
        let reverted = reconcile(Some(st.clone()), &holds(Some(("a", A))), None).unwrap();
        assert_eq!(reverted.in_progress, None);
        assert_eq!(reverted.snapshot.unwrap().guid, A);
        let part_way = reconcile(Some(st.clone()), &holds(None), None).unwrap();
        assert_eq!(part_way.in_progress, st.in_progress, "resumable");
    }

    #[test]
    fn an_image_without_state_says_what_it_holds() {
        let st = reconcile(None, &holds(Some(("a", A))), None).unwrap();
        assert_eq!(st.snapshot.unwrap().guid, A);
        assert!(reconcile(None, &holds(None), None).is_none());
    }
}
