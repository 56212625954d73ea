//! What a cycle does, from what the source has and what the replica says it holds: a seed,
//! an incremental from the newest snapshot both have, the end of an interrupted one, or a
//! refusal that names the way out.

use serde_json::Value;

/// A state by name and GUID (32 hex digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// Its name.
    pub name: String,
    /// Its GUID, hex.
    pub guid: String,
}

impl State {
    fn from_json(v: &Value) -> Option<State> {
        Some(State {
            name: v.get("name")?.as_str()?.to_string(),
            guid: v.get("guid")?.as_str()?.to_string(),
        })
    }
}

/// A snapshot of the source (`blkdelta list --json`), in table order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSnap {
    /// Its name.
    pub name: String,
    /// Its GUID, hex.
    pub guid: String,
}

/// The source's snapshots from `blkdelta list --json`.
pub fn source_snapshots(list: &Value) -> Option<Vec<SourceSnap>> {
    list.get("snapshots")?
        .as_array()?
        .iter()
        .map(|s| {
            Some(SourceSnap {
                name: s.get("name")?.as_str()?.to_string(),
                guid: s.get("guid")?.as_str()?.to_string(),
            })
        })
        .collect()
}

/// A snapshot of a qcow2 replica: its own name, and the state it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplicaSnap {
    /// Its name in the replica.
    pub name: String,
    /// Its date, seconds since the epoch.
    pub date_sec: u32,
    /// The state it holds.
    pub state: State,
}

/// What `status --json` says of the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// No replica: `missing`, `empty`, or `data` (something that is not a replica).
    None(String),
    /// A replica.
    Replica(Replica),
}

/// A replica, as `status --json` describes it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Replica {
    /// Whether it keeps history (a qcow2 replica).
    pub qcow2: bool,
    /// The state it holds, if any.
    pub held: Option<State>,
    /// Its snapshots (a qcow2 replica), oldest first.
    pub snapshots: Vec<ReplicaSnap>,
    /// An apply in progress: its base (none for a seed) and where it goes.
    pub in_progress: Option<(Option<State>, State)>,
    /// Where an interrupted apply resumes.
    pub resume_token: Option<String>,
    /// What changed behind blkdelta's back, when something did (it holds nothing then).
    pub changed: Option<String>,
}

/// Reads `status --json`; `None` when it is not what status prints.
pub fn target(status: &Value) -> Option<Target> {
    let replica = status.get("replica")?.as_str()?;
    if replica == "none" {
        let what = status.get("target")?.as_str()?;
        return Some(Target::None(what.to_string()));
    }
    let snapshots = match status.get("snapshots").and_then(Value::as_array) {
        Some(list) => list
            .iter()
            .map(|s| {
                Some(ReplicaSnap {
                    name: s.get("name")?.as_str()?.to_string(),
                    date_sec: u32::try_from(s.get("date_sec")?.as_u64()?).ok()?,
                    state: State::from_json(s.get("state")?)?,
                })
            })
            .collect::<Option<Vec<_>>>()?,
        None => Vec::new(),
    };
    let in_progress = match status.get("in_progress") {
        Some(p) if !p.is_null() => {
            let from = p.get("from").and_then(State::from_json);
            Some((from, State::from_json(p.get("to")?)?))
        }
        _ => None,
    };
    let written = status
        .get("written_since")
        .and_then(Value::as_str)
        .map(|s| format!("written into since it held '{s}'"));
    let changed = match replica {
        "unchanged" => written,
        other => Some(other.to_string()),
    };
    Some(Target::Replica(Replica {
        qcow2: status.get("replica_format").and_then(Value::as_str) == Some("qcow2"),
        held: status.get("snapshot").and_then(State::from_json),
        snapshots,
        in_progress,
        resume_token: status
            .get("resume_token")
            .and_then(Value::as_str)
            .map(str::to_string),
        changed,
    }))
}

/// Where a cycle starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Start {
    /// A full stream: there is no replica yet (or `--rewind` replaces it).
    Seed,
    /// An incremental from `base`, which the source has. With `revert`, the replica holds
    /// another state and goes back to its snapshot `revert` (which holds `base`) first.
    From {
        /// The source snapshot the stream starts from.
        base: String,
        /// The replica snapshot to revert to first.
        revert: Option<String>,
    },
    /// An interrupted apply, from `from` (none: a seed) to `to`, sent again to finish it
    /// (from `token` on, when the receiver kept a resume point).
    Finish {
        /// Its base.
        from: Option<String>,
        /// Where it goes.
        to: String,
        /// Where the receiver resumes.
        token: Option<String>,
    },
}

/// Why a cycle cannot start without the user's word.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoBase(pub String);

/// The way out that every refusal names.
pub const WAY_OUT: &str = "--repair sends only the blocks that differ (by block hashes), \
                           --rewind seeds the replica again";

/// Where a cycle of an image whose snapshots are `source` (oldest first) starts, given what
/// the target holds. The replica's own state comes first (a replica reverted by hand sends
/// from where it was reverted to); else the newest source snapshot the replica keeps.
pub fn start(source: &[SourceSnap], target: &Target, rewind: bool) -> Result<Start, NoBase> {
    let r = match target {
        Target::None(what) if what == "data" && !rewind => {
            return Err(NoBase(format!(
                "the target holds data that is not a blkdelta replica; {WAY_OUT}"
            )))
        }
        Target::None(_) => return Ok(Start::Seed),
        Target::Replica(_) if rewind => return Ok(Start::Seed),
        Target::Replica(r) => r,
    };
    let has = |guid: &str| source.iter().find(|s| s.guid == guid);
    if let Some((from, to)) = &r.in_progress {
        let from_ok = from.as_ref().is_none_or(|f| has(&f.guid).is_some());
        if let (true, Some(t)) = (from_ok, has(&to.guid)) {
            return Ok(Start::Finish {
                from: from
                    .as_ref()
                    .and_then(|f| has(&f.guid))
                    .map(|s| s.name.clone()),
                to: t.name.clone(),
                token: r.resume_token.clone(),
            });
        }
        return Err(NoBase(format!(
            "the replica is part way from {} to '{}', which the source no longer has; {WAY_OUT}",
            from.as_ref()
                .map_or("nothing".to_string(), |f| format!("'{}'", f.name)),
            to.name
        )));
    }
    if let Some(changed) = &r.changed {
        return Err(NoBase(format!(
            "the replica changed since blkdelta last wrote it ({changed}); {WAY_OUT}"
        )));
    }
    if let Some(s) = r.held.as_ref().and_then(|h| has(&h.guid)) {
        return Ok(Start::From {
            base: s.name.clone(),
            revert: None,
        });
    }
    for s in source.iter().rev() {
        if let Some(kept) = r.snapshots.iter().rev().find(|k| k.state.guid == s.guid) {
            return Ok(Start::From {
                base: s.name.clone(),
                revert: Some(kept.name.clone()),
            });
        }
    }
    let held = r
        .held
        .as_ref()
        .map_or("no snapshot".to_string(), |h| format!("'{}'", h.name));
    Err(NoBase(format!(
        "no common snapshot: the replica holds {held}, and the source has none of the \
         replica's snapshots; {WAY_OUT}"
    )))
}

/// The `blkdelta-` snapshots `--keep-source N` deletes from `source` (oldest first): all but
/// the newest `keep`, never one in `protected` (those replicas hold), never a user's.
pub fn source_prune(source: &[SourceSnap], keep: usize, protected: &[String]) -> Vec<String> {
    let ours: Vec<&SourceSnap> = source
        .iter()
        .filter(|s| s.name.starts_with(super::PREFIX))
        .collect();
    let old = ours.len().saturating_sub(keep);
    ours[..old]
        .iter()
        .filter(|s| !protected.contains(&s.name))
        .map(|s| s.name.clone())
        .collect()
}

/// The replica snapshots `blkdelta prune --prefix blkdelta-` with `rules` would delete once
/// the replica has received `new` (dated `now`), which it then holds: what a dry run shows.
pub fn replica_prune(
    replica: &[ReplicaSnap],
    new: &str,
    now: u32,
    rules: &blkdelta_receive::prune::PruneRules,
) -> Vec<String> {
    let snap = |name: &str, date_sec: u32| blkdelta_common::image::qcow2::Snapshot {
        id: String::new(),
        name: name.to_string(),
        l1_table_offset: 0,
        l1_size: 0,
        date_sec,
        date_nsec: 0,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: 0,
    };
    let mut all: Vec<_> = replica.iter().map(|r| snap(&r.name, r.date_sec)).collect();
    all.push(snap(new, now));
    let held = Some(all.len() - 1);
    blkdelta_receive::prune::plan_prune(&all, held, rules)
        .into_iter()
        .map(|i| all[i].name.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snaps(names: &[&str]) -> Vec<SourceSnap> {
        names
            .iter()
            .map(|n| SourceSnap {
                name: n.to_string(),
                guid: format!("g-{n}"),
            })
            .collect()
    }

    fn state(n: &str) -> State {
        State {
            name: n.into(),
            guid: format!("g-{n}"),
        }
    }

    fn holding(n: &str, kept: &[&str]) -> Target {
        Target::Replica(Replica {
            qcow2: true,
            held: Some(state(n)),
            snapshots: kept
                .iter()
                .map(|k| ReplicaSnap {
                    name: k.to_string(),
                    date_sec: 1,
                    state: state(k),
                })
                .collect(),
            ..Replica::default()
        })
    }

    fn from(base: &str, revert: Option<&str>) -> Start {
        Start::From {
            base: base.into(),
            revert: revert.map(str::to_string),
        }
    }

    #[test]
    fn no_replica_is_a_seed_and_data_is_refused() {
        let src = snaps(&["a"]);
        assert_eq!(
            start(&src, &Target::None("missing".into()), false),
            Ok(Start::Seed)
        );
        assert_eq!(
            start(&src, &Target::None("empty".into()), false),
            Ok(Start::Seed)
        );
        let e = start(&src, &Target::None("data".into()), false).unwrap_err();
        assert!(e.0.contains("--rewind"), "{e:?}");
    }

    #[test]
    fn the_held_state_is_the_base_even_when_newer_ones_are_kept() {
        // Reverted by hand to b: the next cycle sends from b.
        let src = snaps(&["a", "b", "c"]);
        assert_eq!(
            start(&src, &holding("b", &["a", "b", "c"]), false),
            Ok(from("b", None))
        );
    }

    #[test]
    fn a_held_state_the_source_lost_reverts_to_the_newest_common_one() {
        let src = snaps(&["a", "b"]);
        assert_eq!(
            start(&src, &holding("c", &["a", "b", "c"]), false),
            Ok(from("b", Some("b")))
        );
        let e = start(&snaps(&["x"]), &holding("c", &["a", "c"]), false).unwrap_err();
        assert!(
            e.0.starts_with("no common snapshot") && e.0.contains("--repair"),
            "{e:?}"
        );
        assert_eq!(
            start(&snaps(&["x"]), &holding("c", &["c"]), true),
            Ok(Start::Seed)
        );
    }

    #[test]
    fn an_interrupted_apply_is_finished_or_refused() {
        let mut r = Replica {
            in_progress: Some((Some(state("a")), state("b"))),
            resume_token: Some("tok".into()),
            ..Replica::default()
        };
        let src = snaps(&["a", "b", "c"]);
        assert_eq!(
            start(&src, &Target::Replica(r.clone()), false),
            Ok(Start::Finish {
                from: Some("a".into()),
                to: "b".into(),
                token: Some("tok".into())
            })
        );
        r.in_progress = Some((None, state("z")));
        let e = start(&src, &Target::Replica(r), false).unwrap_err();
        assert!(e.0.contains("'z'"), "{e:?}");
    }

    #[test]
    fn a_changed_replica_is_refused_naming_the_way_out() {
        let r = Replica {
            changed: Some("written into since it held 'a'".into()),
            ..Replica::default()
        };
        let e = start(&snaps(&["a"]), &Target::Replica(r), false).unwrap_err();
        assert!(
            e.0.contains("written into") && e.0.contains("--repair"),
            "{e:?}"
        );
    }

    #[test]
    fn keep_source_deletes_only_old_blkdelta_snapshots_never_the_held_one() {
        let src = snaps(&[
            "blkdelta-1",
            "mine",
            "blkdelta-2",
            "blkdelta-3",
            "blkdelta-4",
        ]);
        let held = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert_eq!(
            source_prune(&src, 2, &held(&["blkdelta-4"])),
            vec!["blkdelta-1", "blkdelta-2"]
        );
        assert_eq!(
            source_prune(&src, 1, &held(&["blkdelta-2"])),
            vec!["blkdelta-1", "blkdelta-3"]
        );
        // Another replica holds blkdelta-1: it stays too.
        assert_eq!(
            source_prune(&src, 1, &held(&["blkdelta-4", "blkdelta-1"])),
            vec!["blkdelta-2", "blkdelta-3"]
        );
        assert!(source_prune(&src, 9, &held(&["blkdelta-4"])).is_empty());
    }

    #[test]
    fn a_dry_run_counts_the_new_snapshot_among_those_kept() {
        let Target::Replica(r) = holding("b", &["blkdelta-1", "mine", "blkdelta-2"]) else {
            unreachable!()
        };
        let rules = blkdelta_receive::prune::PruneRules {
            keep: 2,
            prefix: Some(PREFIX_FOR_TESTS.into()),
            ..Default::default()
        };
        assert_eq!(
            replica_prune(&r.snapshots, "blkdelta-3", 9, &rules),
            vec!["blkdelta-1"]
        );
    }

    const PREFIX_FOR_TESTS: &str = super::super::PREFIX;

    #[test]
    fn status_json_reads_back() {
        let v: Value = serde_json::from_str(
            r#"{"replica":"unchanged","replica_format":"qcow2",
                "snapshot":{"name":"b","guid":"g-b"},"in_progress":null,"resume_token":null,
                "snapshots":[{"id":"1","name":"a","date_sec":1,"state":{"name":"a","guid":"g-a"}}]}"#,
        )
        .unwrap();
        assert_eq!(target(&v), Some(holding("b", &["a"])));
        let none: Value = serde_json::from_str(r#"{"replica":"none","target":"missing"}"#).unwrap();
        assert_eq!(target(&none), Some(Target::None("missing".into())));
    }
}
