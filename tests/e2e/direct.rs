//! `send --direct IMAGE.qcow2@FROM..TO`: one transition straight from FROM to TO, leaving out
//! the snapshots between them (as `zfs send -i`), where a plain range passes through each (as
//! `zfs send -I`); any other SOURCE with --direct is a usage error.

use std::path::{Path, PathBuf};

use crate::common::{
    arg, assert_ok, assert_same_file, blkdelta, export, have, holds, io, one_error_line, pipe,
    random, receive_file, records, send_file, sparse_file, spec, status_text, Scratch, MIB,
};

/// A 32 MiB image with snapshots a, b and c, each with writes of its own. c rewrites the first
/// half of the 4 MiB b wrote at 4M and discards the other half (6M to 8M), which a holds
/// nothing of: a→c has nothing to carry there, a→b→c has b's data.
fn a_b_c(s: &Scratch) -> PathBuf {
    s.history(
        "vm.qcow2",
        "32M",
        "",
        &[
            ("a", vec![random(0, 4, 1), io("write -P 0x11 8M 1M")]),
            ("b", vec![random(4, 4, 2), io("write -z 1M 1M")]),
            (
                "c",
                vec![
                    random(4, 2, 3),
                    io("discard 6M 2M"),
                    io("write -P 0x33 16M 1M"),
                ],
            ),
        ],
    )
}

/// Whether a data record of the stream lies in `[start, end)` of the disk.
fn has_data_in(stream: &Path, start: u64, end: u64) -> bool {
    records(stream).1.iter().any(|r| {
        r.kind == "data" && {
            let (offset, len) = r.disk_range();
            offset < end && start < offset + len
        }
    })
}

#[test]
fn a_direct_range_is_one_transition_from_from_to_to() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let s = Scratch::new();
    let img = a_b_c(&s);
    let (direct, through) = (s.path("direct.bd"), s.path("through.bd"));
    send_file(&["--direct", &spec(&img, "a..c")], &direct);
    send_file(&[&spec(&img, "a..c")], &through);

    let (header, recs) = records(&direct);
    let (every, _) = records(&through);
    assert_eq!(header.transitions.len(), 1, "{:?}", header.transitions);
    assert_eq!(every.transitions.len(), 2, "without --direct, through b");
    let t = &header.transitions[0];
    assert_eq!(t.from, every.transitions[0].from, "from a");
    assert_eq!(t.to, every.transitions[1].to, "to c");
    assert_eq!(
        (t.from.as_ref().unwrap().name.as_str(), t.to.name.as_str()),
        ("a", "c")
    );
    let ends: Vec<_> = recs.iter().filter(|r| r.kind == "snapshot-end").collect();
    assert_eq!(ends.len(), 1);
    assert_eq!(ends[0].guid, Some(t.to.guid));
    assert!(
        has_data_in(&through, 6 * MIB, 8 * MIB),
        "b's data, through b"
    );
    assert!(
        !has_data_in(&direct, 6 * MIB, 8 * MIB),
        "nothing of b's in a→c"
    );

    // Seeded with a, the replica takes the direct stream to c, as qemu exports c.
    let replica = s.path("r.raw");
    pipe(&spec(&img, "a"), &replica, &[]);
    assert_ok(
        &receive_file(&direct, &replica, &[]),
        "receive --direct's stream",
    );
    assert_same_file(&replica, &s.export_of(&img, "c"));
    assert!(holds(&replica, "c"), "{}", status_text(&replica, &[]));
}

#[test]
fn a_qcow2_replica_keeps_from_and_to_but_nothing_between() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let s = Scratch::new();
    let img = a_b_c(&s);
    let direct = s.path("direct.bd");
    send_file(&["--direct", &spec(&img, "a..c")], &direct);
    let replica = s.path("r.qcow2");
    pipe(&spec(&img, "a"), &replica, &[]);
    assert_ok(&receive_file(&direct, &replica, &[]), "receive into qcow2");
    let status = status_text(&replica, &[]);
    assert!(status.contains("oldest first: a, c\n"), "{status}");
    assert!(holds(&replica, "c"), "{status}");
    let out = s.path("c.raw");
    export(&replica, Some("c"), &out);
    assert_same_file(&out, &s.export_of(&img, "c"));
}

#[test]
fn direct_without_a_qcow2_range_is_a_usage_error() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let s = Scratch::new();
    let img = a_b_c(&s);
    let raw = s.path("disk.raw");
    sparse_file(&raw, MIB);
    let (range, one) = (spec(&img, "a..c"), spec(&img, "b"));
    let raw_range = spec(&raw, "a..c");
    for args in [
        &[one.as_str()][..],
        &[arg(&img)],
        &[arg(&raw)],
        &[raw_range.as_str()],
        &["nbd://localhost/vda"],
        &[range.as_str(), "--bitmap", "daily"],
        &[range.as_str(), "--to-name", "c2"],
        &[range.as_str(), "--against", "blocks"],
        &["--qmp", "/nonexistent.qmp", "--node", "drive0"],
    ] {
        let mut all = vec!["send", "--direct", "-o", "/dev/null"];
        all.extend_from_slice(args);
        let out = blkdelta(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(one_error_line(&out).contains("--direct"), "{args:?}");
    }
}
