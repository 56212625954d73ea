//! End to end: qcow2 snapshots → stream → raw replica, compared with qemu's own export.

use std::os::unix::fs::FileExt;
use std::path::Path;

use serde_json::Value;

use crate::common::{
    allocated_bytes, arg, assert_same_file, blkdelta_ok, checksum, delete_snapshot, drop_cache,
    export, have, pipe, qemu_io, receive_file, run, send_to_file, snapshot, spec, Scratch,
};

/// Builds an image with three snapshots holding random and patterned writes, zero writes,
/// discards and compressed clusters, then a further write to the active layer.
fn build_history(s: &Scratch, opts: &str, cluster: u64) -> std::path::PathBuf {
    let img = s.qcow2("vm.qcow2", "64M", opts);
    let r1 = s.random_file("r1", 2 << 20, 1);
    let r2 = s.random_file("r2", 1 << 20, 2);
    let r3 = s.random_file("r3", 3 << 20, 3);
    let (r1, r2, r3) = (r1.display(), r2.display(), r3.display());
    let c = cluster;
    qemu_io(
        &img,
        &[
            format!("write -s {r1} 0 2M"),
            "write -P 0x11 5M 300k".into(),
            format!("write -c -P 0x22 {} {c}", 8 << 20),
            format!("write -P 0x33 {} 4097", (40 << 20) + 3),
        ],
    );
    snapshot(&img, "s1");
    qemu_io(
        &img,
        &[
            format!("write -s {r2} 1M 1M"),
            "write -z 5M 64k".into(),
            "discard 0 512k".into(),
            "write -P 0x44 20000 7000".into(),
            format!("write -c -P 0x55 {} {c}", 16 << 20),
            "write -z 40M 1M".into(),
        ],
    );
    snapshot(&img, "s2");
    qemu_io(
        &img,
        &[
            format!("discard {} {c}", 8 << 20),
            format!("write -s {r3} 30M 3M"),
            "write -P 0x66 63M 1M".into(),
        ],
    );
    snapshot(&img, "s3");
    qemu_io(&img, &["write -P 0x77 0 1M".into()]);
    img
}

/// Seed s1, then s1..s3 incrementally; the replica equals qemu's export at each step and the
/// digests agree across formats.
fn seed_then_incremental(opts: &str, cluster: u64) {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = build_history(&s, opts, cluster);
    let replica = s.path("replica.raw");
    let (e1, e3) = (s.path("s1.raw"), s.path("s3.raw"));
    export(&img, Some("s1"), &e1);
    export(&img, Some("s3"), &e3);
    let spec = |snap: &str| format!("{}@{snap}", img.display());

    // Cold, as a backup finds an image: data is read around the page cache where aligned.
    drop_cache(&img);
    pipe(&spec("s1"), &replica, &[]);
    assert_same_file(&replica, &e1);
    let status = blkdelta_ok(&["status", replica.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("holds snapshot 's1'"));

    drop_cache(&img);
    pipe(&spec("s1..s3"), &replica, &[]);
    assert_same_file(&replica, &e3);
    let status = blkdelta_ok(&["status", replica.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("holds snapshot 's3'"));

    let d = checksum(&spec("s3"), &[]);
    assert_eq!(d, checksum(replica.to_str().unwrap(), &[]));
    assert_eq!(d, checksum(e3.to_str().unwrap(), &[]));
    assert_ne!(d, checksum(&spec("s1"), &[]));
}

#[test]
fn history_64k_clusters() {
    seed_then_incremental("", 64 << 10);
}

#[test]
fn history_512_byte_clusters() {
    seed_then_incremental("cluster_size=512", 512);
}

#[test]
fn history_2m_clusters() {
    seed_then_incremental("cluster_size=2M", 2 << 20);
}

#[test]
fn history_extended_l2() {
    seed_then_incremental("extended_l2=on,cluster_size=64k", 64 << 10);
}

#[test]
fn history_zstd_compression_type() {
    seed_then_incremental("compression_type=zstd", 64 << 10);
}

#[test]
fn history_v2_image() {
    seed_then_incremental("compat=0.10", 64 << 10);
}

#[test]
fn incremental_carries_every_snapshot_between_and_skips_deleted_ones() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = build_history(&s, "", 64 << 10);
    qemu_io(&img, &["write -P 0x88 2M 1M".into()]);
    snapshot(&img, "s4");
    delete_snapshot(&img, "s2");
    let stream = s.path("d.bd");
    send_to_file(&format!("{}@s1..s4", img.display()), &stream);
    let dump = blkdelta_ok(&["dump", stream.to_str().unwrap()]);
    let text = String::from_utf8(dump.stdout).unwrap();
    let ends: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("snapshot-end"))
        .collect();
    assert_eq!(ends.len(), 2, "{text}");
    assert!(ends[0].contains("name=s3") && ends[1].contains("name=s4"));

    let replica = s.path("replica.raw");
    pipe(&format!("{}@s1", img.display()), &replica, &[]);
    let out = receive_file(&stream, &replica, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let e4 = s.path("s4.raw");
    export(&img, Some("s4"), &e4);
    assert_same_file(&replica, &e4);
}

#[test]
fn grown_image_grows_the_replica() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "32M", "");
    qemu_io(&img, &["write -P 0x1 0 1M".into()]);
    snapshot(&img, "small");
    run(std::process::Command::new("qemu-img")
        .args(["resize", "-q"])
        .arg(&img)
        .arg("48M"));
    qemu_io(
        &img,
        &["write -P 0x2 40M 1M".into(), "write -P 0x3 0 4k".into()],
    );
    snapshot(&img, "big");
    let replica = s.path("replica.raw");
    pipe(&format!("{}@small", img.display()), &replica, &[]);
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), 32 << 20);
    pipe(&format!("{}@small..big", img.display()), &replica, &[]);
    let e = s.path("big.raw");
    export(&img, Some("big"), &e);
    assert_same_file(&replica, &e);
}

#[test]
fn active_layer_full_send() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = build_history(&s, "", 64 << 10);
    let replica = s.path("active.raw");
    pipe(img.to_str().unwrap(), &replica, &[]);
    let e = s.path("active-export.raw");
    export(&img, None, &e);
    assert_same_file(&replica, &e);
    assert_eq!(
        checksum(img.to_str().unwrap(), &[]),
        checksum(replica.to_str().unwrap(), &[])
    );
}

#[test]
fn big_sparse_seed_is_small_and_stays_sparse() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("big.qcow2", "8G", "");
    let r = s.random_file("r", 4 << 20, 9);
    qemu_io(
        &img,
        &[
            format!("write -s {} 1G 4M", r.display()),
            "write -P 0x5a 7G 1M".into(),
        ],
    );
    snapshot(&img, "s1");
    let stream = s.path("seed.bd");
    let bytes = send_to_file(&format!("{}@s1", img.display()), &stream);
    assert!(
        bytes < (5 << 20) + (64 << 10),
        "seed stream is {bytes} bytes"
    );
    let replica = s.path("replica.raw");
    let out = receive_file(&stream, &replica, &[]);
    assert!(out.status.success());
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), 8 << 30);
    let used = allocated_bytes(&replica);
    assert!(used < 16 << 20, "replica allocates {used} bytes");
    assert_eq!(
        checksum(&format!("{}@s1", img.display()), &[]),
        checksum(replica.to_str().unwrap(), &[])
    );
}

#[test]
fn small_change_makes_a_small_stream() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "1G", "");
    let r = s.random_file("r", 64 << 20, 4);
    qemu_io(&img, &[format!("write -s {} 0 64M", r.display())]);
    snapshot(&img, "s1");
    let w = s.random_file("w", 64 << 10, 5);
    qemu_io(
        &img,
        &[
            format!("write -s {} 3M 64k", w.display()),
            format!("write -s {} 900M 4k", w.display()),
        ],
    );
    snapshot(&img, "s2");
    let stream = s.path("inc.bd");
    let bytes = send_to_file(&format!("{}@s1..s2", img.display()), &stream);
    // Two changed 64 KiB clusters of random data, plus headers.
    assert!(
        bytes < 2 * (64 << 10) + 4096,
        "incremental stream is {bytes} bytes"
    );
    assert!(bytes > 64 << 10, "incremental stream is {bytes} bytes");
}

#[test]
fn vmstate_beyond_the_disk_is_never_sent() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "16M", "");
    // `write -b` writes the VM state area, stored in guest clusters past the disk's L1 range.
    qemu_io(
        &img,
        &["write -P 1 0 1M".into(), "write -b -P 9 0 2M".into()],
    );
    snapshot(&img, "a");
    qemu_io(
        &img,
        &["write -b -P 7 0 1M".into(), "write -P 2 1M 1M".into()],
    );
    snapshot(&img, "b");
    let stream = s.path("ab.bd");
    send_to_file(&format!("{}@a..b", img.display()), &stream);
    let out = blkdelta_ok(&["dump", "--json", stream.to_str().unwrap()]);
    let head: serde_json::Value = serde_json::from_str(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(head["total_data_bytes"].as_u64(), Some(1 << 20));
    let replica = s.path("r.raw");
    pipe(&format!("{}@a", img.display()), &replica, &[]);
    assert!(receive_file(&stream, &replica, &[]).status.success());
    let e = s.path("b.raw");
    export(&img, Some("b"), &e);
    assert_same_file(&replica, &e);
}

#[test]
fn overlay_snapshots_read_through_the_backing_file() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "32M", "");
    let r = s.random_file("r", 4 << 20, 21);
    qemu_io(
        &base,
        &[
            format!("write -s {} 0 4M", r.display()),
            "write -P 0x3c 20M 2M".into(),
        ],
    );
    let raw_base = s.path("base.raw");
    export(&base, None, &raw_base);
    for (name, backing, fmt) in [
        ("over.qcow2", "base.qcow2", "qcow2"),
        ("over-raw.qcow2", "base.raw", "raw"),
    ] {
        let top = s.path(name);
        // A relative backing name, resolved against the overlay's directory.
        run(std::process::Command::new("qemu-img")
            .current_dir(s.dir.path())
            .args([
                "create", "-q", "-f", "qcow2", "-b", backing, "-F", fmt, name,
            ]));
        qemu_io(
            &top,
            &["write -P 0x11 1M 64k".into(), "write -z 20M 64k".into()],
        );
        snapshot(&top, "t1");
        qemu_io(
            &top,
            &["write -P 0x22 2M 1M".into(), "discard 1M 64k".into()],
        );
        snapshot(&top, "t2");
        let replica = s.path(&format!("{name}.replica"));
        pipe(&format!("{}@t1", top.display()), &replica, &[]);
        let e1 = s.path(&format!("{name}.t1"));
        export(&top, Some("t1"), &e1);
        assert_same_file(&replica, &e1);
        pipe(&format!("{}@t1..t2", top.display()), &replica, &[]);
        let e2 = s.path(&format!("{name}.t2"));
        export(&top, Some("t2"), &e2);
        assert_same_file(&replica, &e2);
        assert_eq!(
            checksum(&format!("{}@t2", top.display()), &[]),
            checksum(e2.to_str().unwrap(), &[])
        );
    }
}

/// A shrink to a size inside a cluster keeps the cluster's tail, and a later grow shows it
/// again: the grown range must be sent even though its L2 entry did not change.
#[test]
fn grow_after_an_unaligned_shrink_shows_the_old_tail() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("g.qcow2", "1M", "");
    qemu_io(&img, &["write -P 0xaa 960k 64k".into()]);
    snapshot(&img, "s0");
    let resize = |args: &[&str]| {
        run(std::process::Command::new("qemu-img")
            .args(["resize", "-q"])
            .args(args)
            .arg(&img)
            .arg(if args.is_empty() { "1M" } else { "992k" }));
    };
    resize(&["--shrink"]);
    snapshot(&img, "s1");
    resize(&[]);
    snapshot(&img, "s2");
    let replica = s.path("r.raw");
    pipe(&format!("{}@s0", img.display()), &replica, &[]);
    pipe(&format!("{}@s0..s2", img.display()), &replica, &[]);
    let e = s.path("s2.raw");
    export(&img, Some("s2"), &e);
    assert_same_file(&replica, &e);
    assert_eq!(std::fs::read(&e).unwrap()[992 << 10], 0xaa);
}

/// Sets the vm clock of entry `index` of `img`'s snapshot table, read straight from the file
/// (QEMU records a clock only when it snapshots a running VM: qemu-img leaves it 0).
fn set_vm_clock(img: &Path, index: usize, nsec: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let be = |at: u64, len: usize| {
        let mut b = [0u8; 8];
        f.read_exact_at(&mut b[8 - len..], at).unwrap();
        u64::from_be_bytes(b)
    };
    let mut entry = be(64, 8); // snapshots_offset
    for _ in 0..index {
        // extra_data_size, id_str_size and name_size follow the 40 fixed bytes; 8-aligned.
        let variable = be(entry + 36, 4) + be(entry + 12, 2) + be(entry + 14, 2);
        entry += (40 + variable).div_ceil(8) * 8;
    }
    f.write_all_at(&nsec.to_be_bytes(), entry + 24).unwrap();
}

/// What `qemu-img info` says of snapshot `name` of `img`.
fn qemu_snapshot(img: &Path, name: &str) -> Value {
    let out = run(std::process::Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(img));
    let info: Value = serde_json::from_slice(&out.stdout).unwrap();
    info["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no snapshot {name} in {info}"))
        .clone()
}

fn dump_json(stream: &Path) -> Vec<Value> {
    let out = blkdelta_ok(&["dump", "--json", arg(stream)]);
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// A stream of internal snapshots carries, right before each snapshot-end, what the snapshot
/// table says of that snapshot, as qemu lists it; its GUID is the snapshot-end's. A stream of
/// the active layer carries none.
#[test]
fn a_snapshot_stream_carries_each_snapshots_table_entry() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "8M", "");
    qemu_io(&img, &["write -P 1 0 1M".into()]);
    snapshot(&img, "a");
    qemu_io(&img, &["write -P 2 1M 1M".into()]);
    snapshot(&img, "b");
    set_vm_clock(&img, 1, 3_000_000_042);
    let stream = s.path("ab.bd");
    send_to_file(&spec(&img, "a..b"), &stream);
    let recs = dump_json(&stream);
    let infos: Vec<usize> = (0..recs.len())
        .filter(|&i| recs[i]["record"] == "snapshot-info")
        .collect();
    let [i] = infos[..] else {
        panic!("not one snapshot-info record: {recs:?}");
    };
    let (info, end) = (&recs[i], &recs[i + 1]);
    assert_eq!(end["record"], "snapshot-end", "{recs:?}");
    let qemu = qemu_snapshot(&img, "b");
    assert_eq!(info["transition"], 0);
    assert_eq!(info["id"], qemu["id"]);
    assert_eq!(info["name"], "b");
    assert_eq!(info["date_sec"], qemu["date-sec"]);
    assert_eq!(info["date_nsec"], qemu["date-nsec"]);
    let clock = qemu["vm-clock-sec"].as_u64().unwrap() * 1_000_000_000
        + qemu["vm-clock-nsec"].as_u64().unwrap();
    assert_eq!(clock, 3_000_000_042, "{qemu}");
    assert_eq!(info["vm_clock_nsec"], clock);
    assert_eq!(info["disk_size"], 8 << 20);
    assert_eq!(info["guid"], end["guid"]);
    let text = String::from_utf8(blkdelta_ok(&["dump", arg(&stream)]).stdout).unwrap();
    let line = text.lines().find(|l| l.starts_with("snapshot-info "));
    assert!(
        line.is_some_and(|l| l.contains(" name=b ") && l.contains(" vm_clock_nsec=3000000042")),
        "{text}"
    );

    let active = s.path("active.bd");
    send_to_file(arg(&img), &active);
    assert!(dump_json(&active)
        .iter()
        .all(|r| r["record"] != "snapshot-info"));
}
