//! Cycles one after another on this machine: the replica follows the source, the source keeps
//! its `--keep-source` newest blkdelta-* snapshots and every snapshot a user made, a qcow2
//! replica its `--keep` newest, and the JSON says what each cycle did.

use super::fixture::{
    assert_replica_is_newest, field, field_names, guest_writes, have_qemu, named, names, newest,
    replica_snapshots, snapshots, source, sync_json, to_the_next_second, Snap,
};
use crate::common::{arg, snapshot, Scratch};

/// The names of `snaps`.
fn names_of(snaps: &[Snap]) -> Vec<String> {
    snaps.iter().map(|s| s.name.clone()).collect()
}

#[test]
fn ten_cycles_keep_the_newest_snapshots_on_both_sides() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    snapshot(&img, "mine");
    let mine = named(&img, "mine");
    let replica = s.path("r.qcow2");
    let mut made: Vec<Snap> = Vec::new();
    for cycle in 0..10 {
        guest_writes(&s, &img, cycle + 1);
        let v = sync_json(&[
            "--keep-source",
            "2",
            "--keep",
            "3",
            arg(&img),
            arg(&replica),
        ]);
        let to = assert_replica_is_newest(&s, &img, &replica);
        let (kind, from) = match made.last() {
            None => ("seed", None),
            Some(p) => ("incremental", Some(p.name.as_str())),
        };
        assert_eq!(field(&v, "kind"), Some(kind), "cycle {cycle}: {v}");
        assert_eq!(field(&v, "from"), from, "cycle {cycle}: {v}");
        assert_eq!(
            field(&v, "to"),
            Some(to.name.as_str()),
            "cycle {cycle}: {v}"
        );
        assert_eq!(field(&v, "finished"), None, "{v}");
        assert_eq!(field(&v, "reverted_to"), None, "{v}");
        assert_eq!(v["dry_run"], false, "{v}");
        assert!(v["bytes"].as_u64().unwrap() > 0, "{v}");
        // The snapshot two cycles old leaves the source, the one three cycles old the replica.
        let older = |n: usize| made.len().checked_sub(n).map(|i| made[i].name.clone());
        assert_eq!(
            field_names(&v, "pruned_source"),
            older(2).into_iter().collect::<Vec<_>>(),
            "cycle {cycle}: {v}"
        );
        assert_eq!(
            field_names(&v, "pruned_replica"),
            older(3).into_iter().collect::<Vec<_>>(),
            "cycle {cycle}: {v}"
        );
        made.push(to);
        let kept = made[made.len().saturating_sub(2)..].to_vec();
        assert_eq!(snapshots(&img), [vec![mine.clone()], kept].concat());
    }
    // The user's snapshot stays on the source; the replica keeps exactly its 3 newest.
    assert_eq!(
        snapshots(&img),
        vec![mine, made[8].clone(), made[9].clone()]
    );
    assert_eq!(replica_snapshots(&replica), made[7..].to_vec());
}

#[test]
fn a_snapshot_made_between_cycles_reaches_the_replica_only_with_all() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    let replica = s.path("r.qcow2");
    sync_json(&[arg(&img), arg(&replica)]);
    guest_writes(&s, &img, 1);
    snapshot(&img, "mine");
    guest_writes(&s, &img, 2);
    sync_json(&[arg(&img), arg(&replica)]);
    assert_replica_is_newest(&s, &img, &replica);
    assert!(
        !names(&replica).contains(&"mine".to_string()),
        "without --all the stream goes straight to the new snapshot: {:?}",
        names(&replica)
    );
    guest_writes(&s, &img, 3);
    snapshot(&img, "mine2");
    guest_writes(&s, &img, 4);
    sync_json(&["--all", arg(&img), arg(&replica)]);
    assert_replica_is_newest(&s, &img, &replica);
    assert!(names(&replica).contains(&"mine2".to_string()));
}

/// `blkdelta-YYYYMMDDTHHMMSSZ`: the name of a snapshot of sync without its `-N`.
fn stamp(name: &str) -> &str {
    &name[..name.len().min("blkdelta-20250101T000000Z".len())]
}

#[test]
fn a_new_snapshot_never_takes_a_name_the_replica_keeps() {
    if !have_qemu() {
        return;
    }
    // Three cycles in one second: blkdelta-STAMP, -2, then (the source pruned the first)
    // the first name again, which the replica keeps. Tried until the three fall in one second.
    for _ in 0..5 {
        let s = Scratch::new();
        let img = source(&s, "32M");
        let replica = s.path("r.qcow2");
        to_the_next_second();
        let mut tos = Vec::new();
        for step in 1..=3 {
            guest_writes(&s, &img, step);
            let v = sync_json(&[arg(&img), arg(&replica)]);
            tos.push(field(&v, "to").unwrap().to_string());
        }
        assert_replica_is_newest(&s, &img, &replica);
        let kept = names_of(&replica_snapshots(&replica));
        let mut distinct = kept.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), kept.len(), "names repeat: {kept:?}");
        assert_ne!(tos[2], tos[0], "{tos:?}");
        if tos.iter().all(|t| stamp(t) == stamp(&tos[0])) {
            return;
        }
    }
}

#[test]
fn two_replicas_of_one_source_each_stay_incremental() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    let (a, b) = (s.path("a.raw"), s.path("b.qcow2"));
    sync_json(&[arg(&img), arg(&a)]);
    let a_holds = newest(&img);
    sync_json(&[arg(&img), arg(&b)]);
    guest_writes(&s, &img, 1);
    // a's next cycle starts from the snapshot a holds.
    let v = sync_json(&[arg(&img), arg(&a)]);
    assert_replica_is_newest(&s, &img, &a);
    assert_eq!(field(&v, "from"), Some(a_holds.name.as_str()), "{v}");
    guest_writes(&s, &img, 2);
    sync_json(&[arg(&img), arg(&b)]);
    assert_replica_is_newest(&s, &img, &b);
}

/// The list of a source's replicas (`SOURCE.blkdelta-sync`) only ever keeps snapshots: one
/// that names a replica long gone keeps that replica's snapshot, and one that is not a list
/// at all (written over behind sync's back) is read as empty and written anew; the cycles
/// stay right either way.
#[test]
fn the_list_of_a_sources_replicas_only_keeps_snapshots() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    let r = s.path("r.raw");
    let list = s.path("vm.qcow2.blkdelta-sync");
    sync_json(&[arg(&img), arg(&r)]);
    let first = newest(&img);
    // A replica that no longer exists, said to hold the first snapshot: that snapshot stays.
    std::fs::write(&list, format!("{{\"/gone/old.raw\": \"{}\"}}", first.name)).unwrap();
    guest_writes(&s, &img, 1);
    let v = sync_json(&[arg(&img), arg(&r)]);
    assert_replica_is_newest(&s, &img, &r);
    assert_eq!(field(&v, "from"), Some(first.name.as_str()), "{v}");
    assert!(
        names(&img).contains(&first.name),
        "kept for the other replica"
    );
    // Garbage in the list: read as empty, the cycle is right, and the list is whole again.
    std::fs::write(&list, b"\x00 not json").unwrap();
    guest_writes(&s, &img, 2);
    sync_json(&[arg(&img), arg(&r)]);
    let held = assert_replica_is_newest(&s, &img, &r);
    let text = std::fs::read_to_string(&list).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&text).unwrap();
    let ours = parsed
        .as_object()
        .unwrap()
        .values()
        .filter_map(|v| v.as_str())
        .any(|n| n == held.name);
    assert!(ours, "the list names what r holds: {text}");
    // The first snapshot's holder is forgotten with the garbage: --keep-source 1 pruned it.
    assert!(!names(&img).contains(&first.name), "{:?}", names(&img));
}
