//! The retention rule on synthetic snapshot tables, then `prune` on images the qcow2 writer
//! builds (the end-to-end tests check the same against qemu-img).

use std::path::Path;

use blkdelta_common::image::qcow2::{Qcow2Image, Qcow2Writer, Snapshot, SnapshotMeta};

use super::*;
use crate::identity::Identity;
use crate::state::{Health, InProgress, ReplicaState, StateSnap};

/// 2024-12-29 12:00 UTC, a Sunday: the last day of ISO week 2024-W52.
const SUN_2024_W52: u32 = 1_735_473_600;
const DAY: u32 = 86_400;
const HOUR: u32 = 3_600;

/// A snapshot named `name` taken at `date_sec`.
fn snap(name: &str, date_sec: u32) -> Snapshot {
    Snapshot {
        id: name.into(),
        name: name.into(),
        l1_table_offset: 0,
        l1_size: 0,
        date_sec,
        date_nsec: 0,
        vm_clock_nsec: 0,
        vm_state_size: 0,
        disk_size: 1 << 20,
    }
}

/// Snapshots one hour apart.
fn hourly(n: usize) -> Vec<Snapshot> {
    (0..n)
        .map(|i| snap(&format!("s{i}"), SUN_2024_W52 + i as u32 * HOUR))
        .collect()
}

fn keep(n: usize) -> PruneRules {
    PruneRules {
        keep: n,
        ..PruneRules::default()
    }
}

#[test]
fn keep_n_keeps_the_newest_in_table_order() {
    let snaps = hourly(6);
    assert_eq!(plan_prune(&snaps, None, &keep(2)), vec![0, 1, 2, 3]);
    assert_eq!(plan_prune(&snaps, None, &keep(5)), vec![0]);
}

#[test]
fn table_order_is_age_order_whatever_the_dates_say() {
    // The source's clock went back: s2 is dated before s1 but was taken after it.
    let snaps = [
        snap("s0", 3 * DAY),
        snap("s1", 5 * DAY),
        snap("s2", 4 * DAY),
    ];
    assert_eq!(plan_prune(&snaps, None, &keep(1)), vec![0, 1]);
}

#[test]
fn nothing_to_delete() {
    let snaps = hourly(3);
    assert!(plan_prune(&snaps, None, &keep(3)).is_empty());
    assert!(plan_prune(&snaps, None, &keep(10)).is_empty());
    assert!(plan_prune(&[], Some(0), &keep(0)).is_empty());
}

#[test]
fn the_held_snapshot_is_always_kept() {
    let snaps = hourly(6);
    assert_eq!(plan_prune(&snaps, Some(1), &keep(2)), vec![0, 2, 3]);
    // Among those the rules keep already: nothing more stays.
    assert_eq!(plan_prune(&snaps, Some(5), &keep(2)), vec![0, 1, 2, 3]);
    // No rule at all: only the held one stays.
    assert_eq!(
        plan_prune(&snaps, Some(3), &PruneRules::default()),
        vec![0, 1, 2, 4, 5]
    );
    // An index past the table holds nothing.
    assert_eq!(plan_prune(&snaps, Some(6), &keep(5)), vec![0]);
}

#[test]
fn keep_daily_keeps_the_newest_of_each_recent_day_that_has_snapshots() {
    let base = SUN_2024_W52 - 12 * HOUR; // midnight
    let snaps = [
        snap("d0a", base + HOUR),
        snap("d0b", base + 2 * HOUR),
        // No snapshot on day 1 or 2: they do not count.
        snap("d3a", base + 3 * DAY + HOUR),
        snap("d3b", base + 3 * DAY + 23 * HOUR),
        snap("d4a", base + 4 * DAY),
        snap("d4b", base + 4 * DAY + HOUR),
    ];
    let daily = |d| PruneRules {
        keep_daily: d,
        ..PruneRules::default()
    };
    assert_eq!(plan_prune(&snaps, None, &daily(1)), vec![0, 1, 2, 3, 4]);
    assert_eq!(plan_prune(&snaps, None, &daily(2)), vec![0, 1, 2, 4]);
    assert_eq!(plan_prune(&snaps, None, &daily(3)), vec![0, 2, 4]);
    assert_eq!(plan_prune(&snaps, None, &daily(9)), vec![0, 2, 4]);
}

#[test]
fn the_newest_of_a_day_is_the_last_in_table_order() {
    let snaps = [snap("late", 10 * DAY + 20 * HOUR), snap("early", 10 * DAY)];
    let rules = PruneRules {
        keep_daily: 1,
        ..PruneRules::default()
    };
    assert_eq!(plan_prune(&snaps, None, &rules), vec![0]);
}

#[test]
fn keep_weekly_groups_by_iso_week_monday_to_sunday() {
    let snaps = [
        snap("w52-sun", SUN_2024_W52),
        snap("w01-mon", SUN_2024_W52 + DAY),
        snap("w01-sun", SUN_2024_W52 + 7 * DAY),
        snap("w02-mon", SUN_2024_W52 + 8 * DAY),
        snap("w02-tue", SUN_2024_W52 + 9 * DAY),
    ];
    let weekly = |w| PruneRules {
        keep_weekly: w,
        ..PruneRules::default()
    };
    // 2024-12-30 (Monday) and 2025-01-05 (Sunday) are both in 2025-W01.
    assert_eq!(plan_prune(&snaps, None, &weekly(2)), vec![0, 1, 3]);
    assert_eq!(plan_prune(&snaps, None, &weekly(3)), vec![1, 3]);
}

#[test]
fn the_week_of_the_epoch_starts_on_monday_1969_12_29() {
    let week = |secs| iso_week(&snap("x", secs));
    assert_eq!(week(0), week(3 * DAY + DAY - 1)); // Thursday to Sunday 1970-01-04
    assert_eq!(week(4 * DAY), week(0) + 1); // Monday 1970-01-05
                                            // 2025-03-10 12:00 UTC, a Monday, starts the week after Sunday 2025-03-09.
    assert_eq!(week(1_741_608_000), week(1_741_608_000 - DAY) + 1);
}

#[test]
fn rules_add_up() {
    let base = SUN_2024_W52;
    let snaps: Vec<Snapshot> = (0..10)
        .map(|i| snap(&format!("d{i}"), base + i * DAY))
        .collect();
    let rules = PruneRules {
        keep: 2,
        keep_daily: 3,
        keep_weekly: 2,
        prefix: None,
    };
    // keep 2: d8 d9; daily 3: d7 d8 d9; weekly 2: d9 (W02 ends 2025-01-12 = d14) and d7
    // (W01 ends on Sunday 2025-01-05 = d7).
    assert_eq!(plan_prune(&snaps, Some(2), &rules), vec![0, 1, 3, 4, 5, 6]);
}

#[test]
fn a_prefix_keeps_every_other_snapshot_and_counts_only_its_own() {
    // blkdelta-0, user-1, blkdelta-2, user-3, blkdelta-4, blkdelta-5
    let snaps: Vec<Snapshot> = (0..6)
        .map(|i| {
            let kind = if i == 1 || i == 3 { "user" } else { "blkdelta" };
            snap(&format!("{kind}-{i}"), SUN_2024_W52 + i as u32 * HOUR)
        })
        .collect();
    let rules = PruneRules {
        keep: 2,
        prefix: Some("blkdelta-".into()),
        ..PruneRules::default()
    };
    // The two newest blkdelta- snapshots stay (4, 5); the user's are never counted or deleted.
    assert_eq!(plan_prune(&snaps, None, &rules), vec![0, 2]);
    // The held one stays too, whatever its age.
    assert_eq!(plan_prune(&snaps, Some(0), &rules), vec![2]);
    // A held snapshot that is not the prefix's changes nothing.
    assert_eq!(plan_prune(&snaps, Some(1), &rules), vec![0, 2]);
}

/// A replica built by the qcow2 writer: snapshots s0..s{n-1}, each after writing its own
/// byte into its own cluster; the active layer then holds the last one.
fn replica(dir: &Path, n: u32) -> std::path::PathBuf {
    let path = dir.join("r.qcow2");
    let mut w = Qcow2Writer::create(&path, 8 << 20, 16).unwrap();
    for i in 0..n {
        w.write_at(&vec![i as u8 + 1; 64 << 10], u64::from(i) << 16)
            .unwrap();
        w.create_snapshot(&SnapshotMeta {
            id: (i + 1).to_string(),
            name: format!("s{i}"),
            date_sec: SUN_2024_W52 + i * HOUR,
            date_nsec: 0,
            vm_clock_nsec: 0,
            disk_size: 8 << 20,
        })
        .unwrap();
    }
    path
}

fn names(path: &Path) -> Vec<String> {
    let image = Qcow2Image::open(path).unwrap();
    image.snapshots().iter().map(|s| s.name.clone()).collect()
}

fn report_names<'a>(v: impl Iterator<Item = &'a Snapshot>) -> Vec<&'a str> {
    v.map(|s| s.name.as_str()).collect()
}

#[test]
fn prune_deletes_what_the_rules_do_not_keep() {
    let dir = tempfile::tempdir().unwrap();
    let path = replica(dir.path(), 5);
    let report = prune(&path, None, &keep(2), false).unwrap();
    assert_eq!(report_names(report.deleted()), ["s0", "s1", "s2"]);
    assert_eq!(report_names(report.kept()), ["s3", "s4"]);
    assert_eq!(report.held().map(|s| s.name.as_str()), Some("s4"));
    assert_eq!(names(&path), ["s3", "s4"]);
    // Nothing left to delete: a second prune changes nothing.
    let again = prune(&path, None, &keep(2), false).unwrap();
    assert!(again.deleted.is_empty());
    assert_eq!(again.freed_bytes, 0);
}

#[test]
fn a_dry_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = replica(dir.path(), 4);
    let bytes = std::fs::read(&path).unwrap();
    let report = prune(&path, None, &keep(1), true).unwrap();
    assert!(report.dry_run);
    assert_eq!(report_names(report.deleted()), ["s0", "s1", "s2"]);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
}

#[test]
fn a_raw_file_has_no_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.raw");
    std::fs::write(&path, vec![0u8; 4096]).unwrap();
    let err = prune(&path, None, &keep(1), false).unwrap_err();
    assert!(matches!(err, ReceiveError::NotQcow2 { .. }), "{err}");
    assert!(err.to_string().contains("no snapshots"), "{err}");
}

/// The state of a replica of 8 MiB that holds `s{n-1}`, as it was left.
fn state_for(path: &Path, n: u32) -> ReplicaState {
    ReplicaState {
        source_kind: "qcow2".into(),
        snapshot: Some(StateSnap {
            name: format!("s{}", n - 1),
            guid: "00".repeat(16),
        }),
        identity: Some(Identity::of_image(&std::fs::metadata(path).unwrap())),
        ..ReplicaState::new(8 << 20)
    }
}

#[test]
fn an_apply_in_progress_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = replica(dir.path(), 3);
    let state_path = default_state_path(&path, false);
    let st = ReplicaState {
        snapshot: None,
        in_progress: Some(InProgress {
            stream_id: "00".repeat(16),
            from: None,
            to: StateSnap {
                name: "s3".into(),
                guid: "11".repeat(16),
            },
            transition: 0,
            durable_offset: 0,
            undo: None,
        }),
        ..state_for(&path, 3)
    };
    state::save(&state_path, &st).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    for dry_run in [false, true] {
        let err = prune(&path, None, &keep(1), dry_run).unwrap_err();
        assert!(matches!(err, ReceiveError::ApplyInProgress { .. }), "{err}");
        assert!(err.to_string().contains("unfinished apply"), "{err}");
    }
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn a_replica_as_blkdelta_left_it_stays_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = replica(dir.path(), 4);
    let state_path = dir.path().join("elsewhere.state");
    state::save(&state_path, &state_for(&path, 4)).unwrap();
    prune(&path, Some(&state_path), &keep(1), false).unwrap();
    let (st, now) = crate::history::load_state(&path, &state_path).unwrap();
    assert_eq!(st.unwrap().health(now.identity.as_ref()), Health::Unchanged);
}

#[test]
fn a_changed_replica_stays_changed() {
    let dir = tempfile::tempdir().unwrap();
    let path = replica(dir.path(), 4);
    let state_path = default_state_path(&path, false);
    let st = ReplicaState {
        identity: Some(Identity::File {
            dev: 0,
            ino: 0,
            size: 0,
            mtime_ns: 0,
        }),
        ..state_for(&path, 4)
    };
    state::save(&state_path, &st).unwrap();
    prune(&path, None, &keep(1), false).unwrap();
    assert_eq!(state::load(&state_path).unwrap().unwrap(), st);
}
