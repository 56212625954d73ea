//! The rules of [`plan`](super::plan), one table per situation of the replica.

use super::*;
use crate::state::Health;

#[test]
#[rustfmt::skip]
fn a_fresh_target_takes_a_full_stream_and_nothing_else_without_a_switch() {
    let (a, b) = (snap("a", 1), snap("b", 2));
    let seed = header(vec![full(&a)]);
    let delta = header(vec![inc(&a, &b)]);
    let file_with_data = probe(Some(file_id(9, SIZE, 1)));
    let empty_file = probe(Some(file_id(9, 0, 1)));
    check(vec![
        row("seed onto nothing", &seed, None, &missing(), none(), From(0)),
        row("seed onto an empty file", &seed, None, &empty_file, none(), From(0)),
        row("incremental onto nothing", &delta, None, &missing(), none(), Refused(Some("--rebase"))),
        row("incremental onto nothing, rebased", &delta, None, &missing(), rebase(), From(0)),
        row("incremental onto data", &delta, None, &file_with_data, none(), Refused(Some("--rebase"))),
        row("incremental onto data, overwrite is not rebase", &delta, None, &file_with_data, overwrite(), Refused(Some("--rebase"))),
        row("seed onto unknown data", &seed, None, &file_with_data, none(), Refused(Some("--overwrite"))),
        row("seed onto unknown data, rewind is not overwrite", &seed, None, &file_with_data, rewind(), Refused(Some("--overwrite"))),
        row("seed onto unknown data, overwritten", &seed, None, &file_with_data, overwrite(), From(0)),
    ]);
    let p = plan(&seed, None, &missing(), &none()).unwrap();
    assert!(p.fresh && p.health.is_none() && p.undo.is_none() && !p.repair);
    assert_eq!(p.checkpoint_bytes, CHECKPOINT_BYTES);
    let p = plan(&seed, None, &file_with_data, &overwrite()).unwrap();
    assert!(!p.fresh);
}

#[test]
#[rustfmt::skip]
fn a_missing_replica_takes_only_a_new_seed() {
    let (a, b) = (snap("a", 1), snap("b", 2));
    let st = holding(&a, &[]);
    let seed_b = header(vec![full(&b)]);
    let seed_a = header(vec![full(&a)]);
    let delta = header(vec![inc(&a, &b)]);
    check(vec![
        row("incremental", &delta, Some(&st), &missing(), none(), Refused(None)),
        row("incremental, forced", &delta, Some(&st), &missing(), force(), Refused(None)),
        row("new seed", &seed_b, Some(&st), &missing(), none(), From(0)),
        // The seed of the snapshot the deleted replica held is a seed, not "already there".
        row("seed of the held snapshot", &seed_a, Some(&st), &missing(), none(), From(0)),
        row("resumed seed", &resumed(seed_b.clone(), 1 << 20), Some(&st), &missing(), force(), Refused(None)),
    ]);
    let p = plan(&seed_a, Some(st), &missing(), &none()).unwrap();
    assert!(p.fresh);
    assert_eq!(p.health, Some(Health::Missing));
}

#[test]
#[rustfmt::skip]
fn a_changed_replica_takes_a_stream_only_with_overwrite() {
    let (a, b, c) = (snap("a", 1), snap("b", 2), snap("c", 3));
    let st = holding(&a, &[]);
    let delta = header(vec![inc(&a, &b)]);
    let other_base = header(vec![inc(&c, &b)]);
    let seed = header(vec![full(&b)]);
    let written = probe(Some(file_id(7, SIZE, 200)));
    let resized = probe(Some(file_id(7, 2 * SIZE, 100)));
    let replaced = probe(Some(file_id(8, SIZE, 100)));
    let emptied = probe(Some(file_id(7, 0, 100)));
    let mut rows = Vec::new();
    for p in [&written, &resized, &replaced] {
        rows.extend([
            row("changed: incremental", &delta, Some(&st), p, none(), Refused(Some("--overwrite"))),
            row("changed: rebase is not overwrite", &delta, Some(&st), p, rebase(), Refused(Some("--overwrite"))),
            row("changed: rewind is not overwrite", &delta, Some(&st), p, rewind(), Refused(Some("--overwrite"))),
            row("changed: overwritten", &delta, Some(&st), p, overwrite(), From(0)),
            row("changed: forced", &delta, Some(&st), p, force(), From(0)),
            row("changed: another base, overwritten", &other_base, Some(&st), p, overwrite(), Refused(Some("--rebase"))),
            row("changed: another base, forced", &other_base, Some(&st), p, force(), From(0)),
            row("changed: seed", &seed, Some(&st), p, none(), Refused(Some("--overwrite"))),
            // Past the identity check, a seed onto a replica of the same source is a rewind.
            row("changed: seed, overwritten", &seed, Some(&st), p, overwrite(), Refused(Some("--rewind"))),
            row("changed: seed, forced", &seed, Some(&st), p, force(), From(0)),
        ]);
    }
    rows.extend([
        row("emptied: seed", &seed, Some(&st), &emptied, none(), From(0)),
        row("emptied: incremental, overwritten", &delta, Some(&st), &emptied, overwrite(), Refused(None)),
    ]);
    check(rows);
    let p = plan(&delta, Some(st), &written, &overwrite()).unwrap();
    assert!(matches!(p.health, Some(Health::Changed(w)) if w.contains("written")));
}

#[test]
#[rustfmt::skip]
fn an_interrupted_apply_is_finished_by_a_stream_that_carries_it() {
    let (a, b, c, x) = (snap("a", 1), snap("b", 2), snap("c", 3), snap("x", 9));
    let st = applying(Some(&a), &b, 1 << 20);
    // An apply in progress grows and writes the file: only which file it is counts.
    let grown = probe(Some(file_id(7, 3 * SIZE, 999)));
    let replaced = probe(Some(file_id(8, SIZE, 100)));
    let same = header(vec![inc(&a, &b)]);
    let longer = header(vec![inc(&x, &a), inc(&a, &b), inc(&b, &c)]);
    let other = header(vec![inc(&a, &c)]);
    let seed = header(vec![full(&b)]);
    let seeding = applying(None, &b, 1 << 20);
    check(vec![
        row("the same stream", &same, Some(&st), &grown, none(), From(0)),
        row("a stream that carries it second", &longer, Some(&st), &grown, none(), From(1)),
        row("resumed at the durable offset", &resumed(same.clone(), 1 << 20), Some(&st), &grown, none(), From(0)),
        row("resumed below the durable offset", &resumed(same.clone(), 4096), Some(&st), &grown, none(), From(0)),
        row("resumed past the durable offset", &resumed(same.clone(), 2 << 20), Some(&st), &grown, force(), Refused(None)),
        row("another transition", &other, Some(&st), &grown, none(), Refused(Some("--rebase"))),
        row("another transition, rebased", &other, Some(&st), &grown, rebase(), From(0)),
        row("another resumed transition", &resumed(other.clone(), 4096), Some(&st), &grown, force(), Refused(None)),
        row("replaced file", &same, Some(&st), &replaced, none(), Refused(Some("--overwrite"))),
        row("a seed finished", &seed, Some(&seeding), &grown, none(), From(0)),
        row("a seed finished by its resumed stream", &resumed(seed.clone(), 1 << 20), Some(&seeding), &grown, none(), From(0)),
        row("a seed onto a deleted replica", &seed, Some(&seeding), &missing(), none(), From(0)),
        row("a resumed seed onto a deleted replica", &resumed(seed.clone(), 1 << 20), Some(&seeding), &missing(), force(), Refused(None)),
        row("a resumed stream onto a replica holding its base", &resumed(same.clone(), 4096), Some(&holding(&a, &[])), &unchanged(), force(), Refused(None)),
    ]);
}

/// An apply killed part way through, then its file emptied (same inode, so the identity of
/// an apply in progress matches): the file holds none of what the state says is durable.
#[test]
#[rustfmt::skip]
fn an_emptied_file_is_not_part_way_through_an_incremental() {
    let (a, b) = (snap("a", 1), snap("b", 2));
    let st = applying(Some(&a), &b, 1 << 20);
    let emptied = probe(Some(file_id(7, 0, 999)));
    let same = header(vec![inc(&a, &b)]);
    check(vec![
        row("the same stream", &same, Some(&st), &emptied, none(), Refused(None)),
        row("the same stream, forced", &same, Some(&st), &emptied, force(), Refused(None)),
    ]);
}

#[test]
#[rustfmt::skip]
fn a_file_cut_short_during_an_apply_is_not_part_way_through_it() {
    let (a, b) = (snap("a", 1), snap("b", 2));
    let st = applying(Some(&a), &b, 1 << 20);
    let same = header(vec![inc(&a, &b)]);
    // Its own writes change the time and never shorten it below what it recorded.
    let written_on = probe(Some(file_id(7, SIZE, 999)));
    let cut = probe(Some(file_id(7, SIZE / 2, 999)));
    check(vec![
        row("written on by the apply", &same, Some(&st), &written_on, none(), From(0)),
        row("cut to half", &same, Some(&st), &cut, none(), Refused(Some("--overwrite"))),
        row("cut to half, overwritten", &same, Some(&st), &cut, overwrite(), From(0)),
    ]);
}

#[test]
#[rustfmt::skip]
fn a_replica_past_the_stream_applies_nothing_or_the_rest() {
    let (a, b, c) = (snap("a", 1), snap("b", 2), snap("c", 3));
    let st = holding(&b, &[&a]);
    check(vec![
        row("already there", &header(vec![inc(&a, &b)]), Some(&st), &unchanged(), none(), From(1)),
        row("the rest", &header(vec![inc(&a, &b), inc(&b, &c)]), Some(&st), &unchanged(), none(), From(1)),
        row("the seed of what it holds", &header(vec![full(&b)]), Some(&st), &unchanged(), none(), From(1)),
        row("a seed then the rest", &header(vec![full(&a), inc(&a, &b), inc(&b, &c)]), Some(&st), &unchanged(), none(), From(2)),
    ]);
}

#[test]
#[rustfmt::skip]
fn an_incremental_applies_onto_its_base_only() {
    let (a, b, c, d) = (snap("a", 1), snap("b", 2), snap("c", 3), snap("d", 4));
    let holds_a = holding(&a, &[]);
    let holds_c = holding(&c, &[&a, &b]);
    let holds_d = holding(&d, &[]);
    let a_b = header(vec![inc(&a, &b)]);
    check(vec![
        row("from the held snapshot", &a_b, Some(&holds_a), &unchanged(), none(), From(0)),
        row("from the held snapshot, forced", &a_b, Some(&holds_a), &unchanged(), force(), From(0)),
        row("from another base", &a_b, Some(&holds_d), &unchanged(), none(), Refused(Some("--rebase"))),
        row("from another base, rewind is not rebase", &a_b, Some(&holds_d), &unchanged(), rewind(), Refused(Some("--rebase"))),
        row("from another base, rebased", &a_b, Some(&holds_d), &unchanged(), rebase(), From(0)),
        row("older than what it holds", &a_b, Some(&holds_c), &unchanged(), none(), Refused(Some("--rebase"))),
        row("older, rewind is not rebase", &a_b, Some(&holds_c), &unchanged(), rewind(), Refused(Some("--rebase"))),
        row("older, rebased", &a_b, Some(&holds_c), &unchanged(), rebase(), From(0)),
        row("a later transition from the held one", &header(vec![inc(&b, &a), inc(&a, &d)]), Some(&holds_a), &unchanged(), none(), From(1)),
    ]);
}

#[test]
#[rustfmt::skip]
fn named_states_tell_cycles_apart_and_refuse_a_replayed_one() {
    let daily = SnapRef::named("daily");
    let d1 = SnapRef::named_state("daily", b"cycle 1");
    let d2 = SnapRef::named_state("daily", b"cycle 2");
    let d3 = SnapRef::named_state("daily", b"cycle 3");
    let weekly = SnapRef::named("weekly");
    let w1 = SnapRef::named_state("weekly", b"cycle 1");
    let holds_d1 = holding(&d1, &[]);
    let holds_d2 = holding(&d2, &[&d1]);
    check(vec![
        row("the next cycle", &header(vec![inc(&daily, &d2)]), Some(&holds_d1), &unchanged(), none(), From(0)),
        row("the cycle after", &header(vec![inc(&daily, &d3)]), Some(&holds_d2), &unchanged(), none(), From(0)),
        row("the same cycle again", &header(vec![inc(&daily, &d2)]), Some(&holds_d2), &unchanged(), none(), From(1)),
        row("an old cycle replayed", &header(vec![inc(&daily, &d1)]), Some(&holds_d2), &unchanged(), none(), Refused(Some("--rewind"))),
        row("an old cycle replayed, rebase is not rewind", &header(vec![inc(&daily, &d1)]), Some(&holds_d2), &unchanged(), rebase(), Refused(Some("--rewind"))),
        row("an old cycle replayed, rewound", &header(vec![inc(&daily, &d1)]), Some(&holds_d2), &unchanged(), rewind(), From(0)),
        row("another name", &header(vec![inc(&weekly, &w1)]), Some(&holds_d1), &unchanged(), none(), Refused(Some("--rebase"))),
        // A snapshot called "daily" is not a named state: its GUID is its own.
        row("a snapshot of that name", &header(vec![inc(&daily, &d2)]), Some(&holding(&snap("daily", 5), &[])), &unchanged(), none(), Refused(Some("--rebase"))),
    ]);
}

/// After the undo stream of A → B rolled the replica back to A, the original stream applies
/// again: its base is A by exact GUID, so going to B again is no replay.
#[test]
#[rustfmt::skip]
fn an_exact_base_is_never_a_replay() {
    let (a, b) = (snap("a", 1), snap("b", 2));
    let rolled_back = holding(&a, &[&b]);
    let a_b = header(vec![inc(&a, &b)]);
    let written = probe(Some(file_id(7, SIZE, 200)));
    check(vec![
        row("after an undo", &a_b, Some(&rolled_back), &unchanged(), none(), From(0)),
        row("after an undo, the replica changed, overwritten", &a_b, Some(&rolled_back), &written, overwrite(), From(0)),
    ]);
}

#[test]
#[rustfmt::skip]
fn a_full_stream_onto_a_replica_needs_rewind_or_overwrite() {
    let (a, b, c) = (snap("a", 1), snap("b", 2), snap("c", 3));
    let holds_b = holding(&b, &[&a]);
    let mut other_source = holding(&b, &[&a]);
    other_source.source_name = "other.qcow2".into();
    check(vec![
        row("a newer seed", &header(vec![full(&c)]), Some(&holds_b), &unchanged(), none(), Refused(Some("--rewind"))),
        row("a newer seed, overwrite is not rewind", &header(vec![full(&c)]), Some(&holds_b), &unchanged(), overwrite(), Refused(Some("--rewind"))),
        row("a newer seed, rewound", &header(vec![full(&c)]), Some(&holds_b), &unchanged(), rewind(), From(0)),
        row("an older seed", &header(vec![full(&a)]), Some(&holds_b), &unchanged(), none(), Refused(Some("--rewind"))),
        row("an older seed, rewound", &header(vec![full(&a)]), Some(&holds_b), &unchanged(), rewind(), From(0)),
        row("a seed of another source", &header(vec![full(&c)]), Some(&other_source), &unchanged(), none(), Refused(Some("--overwrite"))),
        row("a seed of another source, rewind is not overwrite", &header(vec![full(&c)]), Some(&other_source), &unchanged(), rewind(), Refused(Some("--overwrite"))),
        row("a seed of another source, overwritten", &header(vec![full(&c)]), Some(&other_source), &unchanged(), overwrite(), From(0)),
    ]);
}

#[test]
#[rustfmt::skip]
fn a_repair_stream_applies_only_with_repair_and_whatever_the_state() {
    let (a, b) = (snap("a", 1), snap("b", 2));
    let base = SnapRef {
        name: "blocks:0123".into(),
        guid: [0x42; 16],
    };
    let fix = header(vec![inc(&base, &b)]);
    let two = header(vec![inc(&base, &a), inc(&a, &b)]);
    let written = probe(Some(file_id(7, SIZE, 200)));
    check(vec![
        row("without --repair", &fix, Some(&holding(&a, &[])), &unchanged(), none(), Refused(Some("--repair"))),
        row("without --repair, forced", &fix, Some(&holding(&a, &[])), &unchanged(), force(), Refused(Some("--repair"))),
        row("no state", &fix, None, &written, repair(), From(0)),
        row("changed replica", &fix, Some(&holding(&a, &[])), &written, repair(), From(0)),
        row("missing replica", &fix, Some(&holding(&a, &[])), &missing(), repair(), From(0)),
        row("in progress", &fix, Some(&applying(Some(&a), &b, 4096)), &written, repair(), From(0)),
        row("holding its target already", &fix, Some(&holding(&b, &[])), &unchanged(), repair(), From(0)),
        row("not a repair stream", &header(vec![inc(&a, &b)]), Some(&holding(&a, &[])), &unchanged(), repair(), Refused(None)),
        row("a repair stream of two transitions", &two, None, &written, repair(), Refused(None)),
    ]);
    let p = plan(&fix, None, &written, &repair()).unwrap();
    assert!(p.repair);
}

#[test]
#[rustfmt::skip]
fn a_block_device_must_hold_the_largest_state_of_the_stream() {
    let (a, b) = (snap("a", 1), snap("b", 2));
    let mut grow = header(vec![full(&a), inc(&a, &b)]);
    grow.transitions[0].virtual_size = 2 * SIZE;
    check(vec![
        row("large enough", &grow, None, &device(2 * SIZE), none(), Refused(Some("--overwrite"))),
        row("large enough, overwritten", &grow, None, &device(2 * SIZE), overwrite(), From(0)),
        row("too small", &grow, None, &device(SIZE), force(), TooSmall),
    ]);
    // A device is never empty: a seed onto it overwrites whatever it holds.
    assert!(!device(SIZE).is_empty());
}
