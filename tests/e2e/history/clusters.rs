//! Replicas of every cluster size from sources of every cluster size, and a disk that grows
//! and shrinks between snapshots: each snapshot keeps its own size.

use std::process::Command;

use super::qemu::{cluster_size, virtual_size};
use super::week::Source;
use crate::common::{have, io, qemu_io, random, run, snapshot, Scratch, Write};

/// Three snapshots of an 8 MiB disk: random data, and writes, zeroes and discards that start
/// and end inside clusters of every size.
fn steps() -> Vec<(&'static str, Vec<Write>)> {
    vec![
        (
            "a",
            vec![
                random(0, 2, 31),
                io("write -P 0x61 3M 700"),
                io("write -P 0x62 5000 3000"),
            ],
        ),
        (
            "b",
            vec![
                random(1, 1, 32),
                io("write -z 0 100k"),
                io("discard 3M 512k"),
                io("write -P 0x63 6M 2M"),
            ],
        ),
        (
            "c",
            vec![
                io("write -P 0x64 4095 1"),
                io("discard 6M 1M"),
                io("write -z 7M 4k"),
                random(4, 1, 33),
            ],
        ),
    ]
}

#[test]
fn replicas_of_every_cluster_size_from_sources_of_every_cluster_size() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let pairs = [
        ("512", "2M", 2 << 20),
        ("4k", "512", 512),
        ("64k", "4K", 4 << 10),
        ("2M", "64K", 64 << 10),
    ];
    for (source_cluster, replica_cluster, bytes) in pairs {
        let what = format!("{source_cluster} source clusters, {replica_cluster} replica clusters");
        let src = Source::build("8M", &format!("cluster_size={source_cluster}"), steps());
        let r = src.s.path("r.qcow2");
        src.replicate(&r, "c", &["--cluster-size", replica_cluster]);
        assert_eq!(cluster_size(&r), bytes, "{what}");
        src.assert_history(&r, &["a", "b", "c"], &what);
        src.assert_holds(&r, "c", &what);
    }
    // A new replica without --cluster-size has qemu-img's default.
    let src = Source::build("8M", "cluster_size=4k", steps());
    let r = src.replica("default.qcow2", "b");
    assert_eq!(cluster_size(&r), 64 << 10);
    src.assert_history(&r, &["a", "b"], "default cluster size");
}

/// `qemu-img resize [--shrink] IMG SIZE`.
fn resize(img: &std::path::Path, size: &str) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["resize", "-q", "--shrink"]);
    run(cmd.arg(img).arg(size));
}

/// An 8 MiB disk grown to 12 MiB after `a`, shrunk to 5 MiB + 512 after `b` (inside a
/// cluster of every size), and grown to 10 MiB after `c`, whose tail must read as zeros.
fn resized_source() -> Source {
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "8M", "");
    let r = s.random_file("random", 2 << 20, 41);
    let steps: [(&str, Option<&str>, Vec<String>); 4] = [
        (
            "a",
            None,
            vec![
                format!("write -s {} 0 2M", r.display()),
                "write -P 0x71 7M 1M".into(),
            ],
        ),
        (
            "b",
            Some("12M"),
            vec!["write -P 0x72 10M 2M".into(), "write -P 0x73 8M 4k".into()],
        ),
        (
            "c",
            Some("5243392"),
            vec!["write -P 0x74 5M 512".into(), "write -z 0 64k".into()],
        ),
        ("d", Some("10M"), vec!["write -P 0x75 9M 1M".into()]),
    ];
    for (name, size, writes) in steps {
        if let Some(size) = size {
            resize(&img, size);
        }
        qemu_io(&img, &writes);
        snapshot(&img, name);
    }
    let mut src = Source::of(s, img, vec!["a", "b", "c", "d"]);
    src.resized = true;
    src
}

#[test]
fn a_disk_that_grows_and_shrinks_keeps_each_snapshots_size() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = resized_source();
    let sizes = [8 << 20, 12 << 20, 5_243_392, 10 << 20];
    for replica_cluster in ["4K", "2M"] {
        let what = format!("{replica_cluster} replica clusters");
        let r = src.s.path(&format!("r-{replica_cluster}.qcow2"));
        let extra = ["--cluster-size", replica_cluster];
        src.replicate(&r, "a", &extra);
        assert_eq!(virtual_size(&r), sizes[0], "{what}");
        for (k, snap) in ["b", "c", "d"].into_iter().enumerate() {
            let prev = src.snaps[k];
            crate::common::pipe_args_ok(&[&src.spec(&format!("{prev}..{snap}"))], &r, &extra);
            assert_eq!(virtual_size(&r), sizes[k + 1], "{what}: size at {snap}");
            src.assert_history(&r, &src.through(snap), &format!("{what}, at {snap}"));
            src.assert_holds(&r, snap, &what);
        }
    }
}
