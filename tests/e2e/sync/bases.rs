//! Where a cycle starts when the two sides moved by hand: a replica rolled back by QEMU sends
//! from where it went back to, a replica whose snapshot the source lost goes back to the
//! newest one they share, and without any, the cycle is refused naming `--repair` and
//! `--rewind`, each of which then brings the replica to the source.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::fixture::{
    assert_replica_is_newest, field, guest_writes, have_qemu, held, names, newest, source, sync,
    sync_json, Snap,
};
use crate::common::{arg, assert_refused, delete_snapshot, run, Scratch};

/// `cycles` cycles into `replica` keeping every snapshot on the source, each after writes
/// unless `idle` names it; the snapshot each made.
fn cycles(s: &Scratch, img: &Path, replica: &Path, cycles: u64, idle: Option<u64>) -> Vec<Snap> {
    (1..=cycles)
        .map(|step| {
            if idle != Some(step) {
                guest_writes(s, img, step);
            }
            sync_json(&["--keep-source", "9", arg(img), arg(replica)]);
            newest(img)
        })
        .collect()
}

#[test]
fn a_replica_rolled_back_by_hand_sends_from_where_it_was_rolled_back_to() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    let replica = s.path("r.qcow2");
    let made = cycles(&s, &img, &replica, 3, None);
    run(Command::new("qemu-img")
        .args(["snapshot", "-a", &made[0].name])
        .arg(&replica));
    assert_eq!(held(&replica), Some(made[0].clone()));
    guest_writes(&s, &img, 4);
    let v = sync_json(&["--keep-source", "9", arg(&img), arg(&replica)]);
    assert_eq!(field(&v, "kind"), Some("incremental"), "{v}");
    assert_eq!(field(&v, "from"), Some(made[0].name.as_str()), "{v}");
    assert_eq!(field(&v, "reverted_to"), None, "{v}");
    assert_replica_is_newest(&s, &img, &replica);
}

/// Three cycles (the `idle` one without writes), the newest source snapshot deleted by hand,
/// writes, and a cycle: it goes back to the second snapshot, which both sides still have.
fn lost_base_goes_back_to_the_newest_common_snapshot(idle: Option<u64>) {
    let s = Scratch::new();
    let img = source(&s, "32M");
    let replica = s.path("r.qcow2");
    let made = cycles(&s, &img, &replica, 3, idle);
    delete_snapshot(&img, &made[2].name);
    guest_writes(&s, &img, 4);
    let v = sync_json(&["--keep-source", "9", arg(&img), arg(&replica)]);
    assert_eq!(field(&v, "reverted_to"), Some(made[1].name.as_str()), "{v}");
    assert_eq!(field(&v, "from"), Some(made[1].name.as_str()), "{v}");
    assert_replica_is_newest(&s, &img, &replica);
}

#[test]
fn a_lost_base_reverts_the_replica_to_the_newest_common_snapshot() {
    if !have_qemu() {
        return;
    }
    lost_base_goes_back_to_the_newest_common_snapshot(None);
}

#[test]
fn a_lost_base_after_an_idle_cycle_reverts_too() {
    if !have_qemu() {
        return;
    }
    // The third snapshot maps what the second does: receive says the replica still holds the
    // third after the revert, and refuses a stream from the second.
    lost_base_goes_back_to_the_newest_common_snapshot(Some(3));
}

/// A replica `r.qcow2` two cycles on, then every snapshot of the source deleted by hand and
/// writes: the two share no snapshot. The source and the replica.
fn nothing_in_common(s: &Scratch) -> (PathBuf, PathBuf) {
    let img = source(s, "32M");
    let replica = s.path("r.qcow2");
    let made = cycles(s, &img, &replica, 2, None);
    for m in &made {
        delete_snapshot(&img, &m.name);
    }
    guest_writes(s, &img, 3);
    (img, replica)
}

/// The refusal when nothing is in common; it changes neither side.
fn assert_refused_for_want_of_a_base(img: &Path, replica: &Path) {
    let before = (std::fs::read(img).unwrap(), std::fs::read(replica).unwrap());
    let out = sync(&[arg(img), arg(replica)]);
    assert_refused(
        &out,
        &["no common snapshot", "--repair", "--rewind"],
        "a cycle with no common snapshot",
    );
    assert!(names(img).is_empty(), "the refusal made a snapshot");
    let after = (std::fs::read(img).unwrap(), std::fs::read(replica).unwrap());
    assert!(before == after, "the refusal changed an image");
}

/// After a repair or a new seed, the next cycle is an incremental from it again.
fn next_cycle_is_incremental(s: &Scratch, img: &Path, replica: &Path) {
    let base = newest(img);
    guest_writes(s, img, 9);
    let v = sync_json(&[arg(img), arg(replica)]);
    assert_eq!(field(&v, "kind"), Some("incremental"), "{v}");
    assert_eq!(field(&v, "from"), Some(base.name.as_str()), "{v}");
    assert_replica_is_newest(s, img, replica);
}

#[test]
fn with_no_common_snapshot_repair_sends_what_differs() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let (img, replica) = nothing_in_common(&s);
    assert_refused_for_want_of_a_base(&img, &replica);
    let v = sync_json(&["--repair", arg(&img), arg(&replica)]);
    assert_eq!(field(&v, "kind"), Some("repair"), "{v}");
    assert_replica_is_newest(&s, &img, &replica);
    next_cycle_is_incremental(&s, &img, &replica);
}

#[test]
fn with_no_common_snapshot_rewind_seeds_again() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let (img, replica) = nothing_in_common(&s);
    assert_refused_for_want_of_a_base(&img, &replica);
    let v = sync_json(&["--rewind", arg(&img), arg(&replica)]);
    assert_eq!(field(&v, "kind"), Some("seed"), "{v}");
    assert_eq!(field(&v, "from"), None, "{v}");
    assert_replica_is_newest(&s, &img, &replica);
    next_cycle_is_incremental(&s, &img, &replica);
}
