//! The history a stream carries, end to end: the replica lists the source's snapshots with
//! their table entries, exports each as the source does and stays sparse; any of its
//! snapshots restores to a raw file, and the replica is sent on to a third image (a cascade)
//! that keeps the same GUIDs.

use std::path::Path;

use serde_json::Value;

use super::qemu::snapshots;
use super::week::{Source, DAYS, VM_CLOCKS};
use crate::common::{
    allocated_bytes, arg, assert_ok, assert_same_file, blkdelta_ok, checksum, have, pipe_args_ok,
    receive_file, records, send_to_file, spec, status_text, MIB,
};

#[test]
fn a_week_of_snapshots_lands_as_the_replicas_internal_snapshots() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(2);
    let replica = src.s.path("r.qcow2");
    let (seed, inc) = (src.s.path("mon.bd"), src.s.path("mon-fri.bd"));
    send_to_file(&src.spec("mon"), &seed);
    send_to_file(&src.spec("mon..fri"), &inc);

    assert_ok(&receive_file(&seed, &replica, &[]), "the seed");
    src.assert_history(&replica, &["mon"], "after the seed");
    src.assert_holds(&replica, "mon", "after the seed");
    assert_ok(&receive_file(&inc, &replica, &[]), "mon..fri");
    src.assert_history(&replica, &DAYS, "after mon..fri");
    src.assert_holds(&replica, "fri", "after mon..fri");

    // The vm clocks compared above are not all zero: the source recorded them.
    let listed = snapshots(&replica);
    for (index, nsec) in VM_CLOCKS {
        let s = &listed[index];
        let clock = s["vm-clock-sec"].as_u64().unwrap() * 1_000_000_000
            + s["vm-clock-nsec"].as_u64().unwrap();
        assert_eq!(clock, nsec, "vm clock of {}", s["name"]);
    }

    // Sparse: what is allocated is the data the streams carried, and some metadata.
    let data: u64 = [&seed, &inc]
        .iter()
        .flat_map(|s| records(s).1)
        .filter(|r| r.kind == "data")
        .map(|r| r.disk_range().1)
        .sum();
    let allocated = allocated_bytes(&replica);
    assert!(
        allocated <= data + data / 10 + 4 * MIB,
        "{allocated} bytes allocated for {data} bytes of data"
    );
}

/// What `blkdelta list --json` says of each snapshot: its name and GUID.
fn guids(img: &Path) -> Vec<(String, String)> {
    let out = blkdelta_ok(&["list", "--json", arg(img)]);
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            let text = |k: &str| s[k].as_str().unwrap().to_string();
            (text("name"), text("guid"))
        })
        .collect()
}

#[test]
fn a_replica_is_sent_on_to_a_third_image_with_the_same_guids() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let b = src.replica("b.qcow2", "fri");
    let c = src.s.path("c.qcow2");
    pipe_args_ok(&[&spec(&b, "mon")], &c, &[]);
    src.assert_history(&c, &["mon"], "C seeded from B@mon");
    pipe_args_ok(&[&spec(&b, "mon..fri")], &c, &[]);
    src.assert_history(&c, &DAYS, "C after B@mon..fri");
    src.assert_holds(&c, "fri", "C after B@mon..fri");

    let digest = src.digest("fri");
    assert_eq!(checksum(arg(&b), &[]), digest, "checksum of B");
    assert_eq!(checksum(arg(&c), &[]), digest, "checksum of C");
    assert_eq!(checksum(&spec(&c, "fri"), &[]), digest, "checksum of C@fri");
    let (a, b_guids, c_guids) = (guids(&src.img), guids(&b), guids(&c));
    assert_eq!(a.len(), DAYS.len());
    assert_eq!(b_guids, a, "B's snapshots have A's GUIDs");
    assert_eq!(c_guids, a, "C's snapshots have A's GUIDs");
    let fri = &a[4].1;
    let st = status_text(&c, &[]);
    assert!(
        st.contains(&format!("holds snapshot 'fri' (guid {fri})")),
        "{st}"
    );
}

#[test]
fn any_snapshot_of_a_replica_restores_to_a_raw_file() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(1);
    let r = src.replica("r.qcow2", "fri");
    for day in ["mon", "wed", "fri"] {
        let restored = src.s.path(&format!("restored-{day}.raw"));
        pipe_args_ok(&[&spec(&r, day)], &restored, &[]);
        assert_same_file(&restored, &src.export(day));
    }
    // The restored wed follows the replica's own snapshots onwards.
    let restored = src.s.path("restored-wed.raw");
    pipe_args_ok(&[&spec(&r, "wed..fri")], &restored, &[]);
    assert_same_file(&restored, &src.export("fri"));
}
