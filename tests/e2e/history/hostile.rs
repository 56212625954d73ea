//! A qcow2 replica damaged on disk: marked corrupt, a refcount lowered, an L2 entry pointing
//! into the header cluster or onto the L1 table. A receive is refused before it writes
//! anything, in one line naming the damage; the replica's bytes and its state stay as they
//! were.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use super::layout::{Layout, COMPRESSED, COPIED, OFFSET_MASK};
use super::qemu::snapshot_names;
use super::week::{Source, Untouched};
use crate::common::{have, one_line_failure, pipe_args, run, state_of};

/// Words of which an error naming the damage has one.
const NAMES_THE_DAMAGE: [&str; 6] = [
    "corrupt",
    "refcount",
    "overlap",
    "metadata",
    "header",
    "is used as",
];

/// A replica of mon..wed (holding wed), damaged by `damage` as `qemu-img check` sees it;
/// then `send wed..fri` must be refused before any write.
fn refused_before_any_write(what: &str, damage: impl FnOnce(&Path)) {
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    damage(&r);
    assert!(
        qemu_check_finds_errors(&r),
        "{what}: qemu-img check finds no error"
    );
    assert_refused_before_any_write(&src, &r, what);
}

/// `send wed..fri` onto the damaged replica `r` is refused in one line naming the damage,
/// and neither the replica nor its state is written.
fn assert_refused_before_any_write(src: &Source, r: &Path, what: &str) {
    let (image, state) = (Untouched::new(r), Untouched::new(&state_of(r)));
    let out = pipe_args(&[&src.spec("wed..fri")], r, &[]);
    let err = one_line_failure(&out, what).to_lowercase();
    assert!(
        NAMES_THE_DAMAGE.iter().any(|w| err.contains(w)),
        "{what}: the error does not name the damage: {err}"
    );
    image.assert(what);
    state.assert(what);
}

/// Whether `qemu-img check` finds errors (leaks aside) in the image.
fn qemu_check_finds_errors(img: &Path) -> bool {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .unwrap();
    out.status.code() == Some(2)
}

/// The virtual offset and host offset of the first data extent of the active layer, as
/// `qemu-img map` finds it.
fn first_data_cluster(img: &Path) -> (u64, u64) {
    let out = run(Command::new("qemu-img")
        .args(["map", "--output=json", "-f", "qcow2"])
        .arg(img));
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let e = map
        .iter()
        .find(|e| e["data"] == true && e["zero"] == false && e["offset"].is_u64())
        .unwrap_or_else(|| panic!("no data in {map:?}"));
    (e["start"].as_u64().unwrap(), e["offset"].as_u64().unwrap())
}

/// The L2 entries mapping virtual `offset` in the active layer and in the snapshot it holds
/// (the last one): the same damage in both leaves the replica holding that snapshot, so that
/// only a check of the image itself can find it.
fn l2_entries(layout: &Layout, offset: u64, snapshots: usize) -> Vec<u64> {
    let mut at = vec![layout.l2_entry_at(layout.l1_offset(), offset)];
    let held = layout.l2_entry_at(layout.snapshot_l1_offset(snapshots - 1), offset);
    if !at.contains(&held) {
        at.push(held);
    }
    at
}

#[test]
fn a_replica_marked_corrupt_is_refused_before_any_write() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "wed");
    Layout::open(&r).set_incompatible_bit(1);
    assert_refused_before_any_write(&src, &r, "the corrupt bit set");
}

#[test]
fn a_replica_with_a_refcount_lowered_is_refused_before_any_write() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    refused_before_any_write("a data cluster's refcount zeroed", |r| {
        let (_, host) = first_data_cluster(r);
        let layout = Layout::open(r);
        let (at, len) = layout.refcount_entry(host);
        layout.zero(at, len);
    });
}

#[test]
fn a_replica_with_an_l2_entry_into_the_header_cluster_is_refused_before_any_write() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    // A standard entry cannot name host offset 0 (it reads as unallocated): a compressed
    // one can, at any byte. This one says: 2 sectors from byte 512 of the header cluster.
    refused_before_any_write("an L2 entry into the header cluster", |r| {
        let (virt, _) = first_data_cluster(r);
        let layout = Layout::open(r);
        let offset_bits = 62 - (layout.cluster_bits() - 8);
        let entry = COMPRESSED | 1 << offset_bits | 512;
        for at in l2_entries(&layout, virt, snapshot_names(r).len()) {
            layout.put_u64(at, entry);
        }
    });
}

#[test]
fn a_replica_with_an_l2_entry_onto_the_l1_table_is_refused_before_any_write() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    refused_before_any_write("an L2 entry onto the active L1 table", |r| {
        let (virt, _) = first_data_cluster(r);
        let layout = Layout::open(r);
        let l1_cluster = layout.l1_offset() & !(layout.cluster_size() - 1);
        for at in l2_entries(&layout, virt, snapshot_names(r).len()) {
            let copied = layout.be(at, 8) & COPIED;
            layout.put_u64(at, copied | (l1_cluster & OFFSET_MASK));
        }
    });
}
