//! Sources without metadata end to end: `send --compare OLD NEW` (content comparison of two
//! raw files or qcow2 active layers, of equal or different sizes, with holes), and the raw
//! full seed of a large sparse file.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::common::{
    allocated_bytes, arg, assert_same_file, blkdelta_ok, checksum, export, have, pipe_args_ok,
    punch_hole, qemu_io, receive_file, send_file, sparse_file, write_at, write_random, Scratch,
    KIB, MIB,
};

/// A sparse file of `size` bytes with the same data at 0..8 MiB, 16..17 MiB and 30..32 MiB
/// (those of the ranges that fit).
fn base_image(path: &Path, size: u64) {
    sparse_file(path, size);
    for (offset, len, seed) in [(0, 8 * MIB, 1), (16 * MIB, MIB, 2), (30 * MIB, 2 * MIB, 3)] {
        if offset + len <= size {
            write_random(path, offset, len, seed);
        }
    }
}

/// A replica of `old` seeded as the state named after `old`'s file name (the default `from`
/// of `--compare`).
fn seeded_replica(sc: &Scratch, old: &Path) -> PathBuf {
    let replica = sc.path("replica.raw");
    let name = old.file_name().unwrap().to_str().unwrap();
    pipe_args_ok(&["--to-name", name, arg(old)], &replica, &[]);
    replica
}

/// `send --compare OLD NEW` to a stream file, received into `replica`; returns the stream size.
fn compare_into(sc: &Scratch, old: &Path, new: &Path, replica: &Path) -> u64 {
    let stream = sc.path("delta.bd");
    let size = send_file(&["--compare", arg(old), arg(new)], &stream);
    let out = receive_file(&stream, replica, &[]);
    assert!(
        out.status.success(),
        "receive: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_file(replica, new);
    size
}

#[test]
fn compare_sends_only_what_differs_between_two_raw_files() {
    let sc = Scratch::new();
    let (old, new) = (sc.path("old.raw"), sc.path("new.raw"));
    base_image(&old, 64 * MIB);
    base_image(&new, 64 * MIB);
    write_random(&new, 3 * MIB + 17, 1000, 11); // one 64 KiB block changes
    write_random(&new, 40 * MIB, 100 * KIB, 12); // data where OLD has a hole: 2 blocks
    punch_hole(&new, 16 * MIB, MIB); // a hole where OLD has data: a discard
    write_at(&new, 30 * MIB, &vec![0u8; MIB as usize]); // written zeros over data
    let replica = seeded_replica(&sc, &old);
    let started = Instant::now();
    let size = compare_into(&sc, &old, &new, &replica);
    eprintln!(
        "compare of two 64 MiB files (11 MiB allocated each): {:?}, stream {size} bytes",
        started.elapsed()
    );
    // One 64 KiB block and the 100 KiB written over a hole travel as data; the rest are zero
    // and discard records.
    let data = 64 * KIB + 100 * KIB;
    assert!(size > data && size < data + 16 * KIB, "{size}");
    let status = blkdelta_ok(&["status", arg(&replica)]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("'new.raw'"));
}

#[test]
fn compare_follows_a_new_that_grows_and_then_shrinks() {
    let sc = Scratch::new();
    let (old, big, small) = (sc.path("old.raw"), sc.path("big.raw"), sc.path("small.raw"));
    base_image(&old, 48 * MIB);
    base_image(&big, 64 * MIB);
    write_random(&big, 50 * MIB, 256 * KIB, 21); // past OLD's end: sent
    let replica = seeded_replica(&sc, &old);
    let size = compare_into(&sc, &old, &big, &replica);
    assert!(size > 256 * KIB && size < 256 * KIB + 16 * KIB, "{size}");

    base_image(&small, 20 * MIB);
    write_random(&small, 19 * MIB, 64 * KIB, 22);
    let size = compare_into(&sc, &big, &small, &replica);
    assert!(size > 64 * KIB && size < 64 * KIB + 16 * KIB, "{size}");
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), 20 * MIB);
}

#[test]
fn compare_names_can_be_given_and_are_checked() {
    let sc = Scratch::new();
    let (old, new) = (sc.path("mon.raw"), sc.path("tue.raw"));
    base_image(&old, 16 * MIB);
    base_image(&new, 16 * MIB);
    write_random(&new, MIB, 10, 31);
    let replica = sc.path("replica.raw");
    pipe_args_ok(&["--to-name", "monday", arg(&old)], &replica, &[]);
    // The default base name (mon.raw) is not what the replica holds.
    let stream = sc.path("d.bd");
    send_file(&["--compare", arg(&old), arg(&new)], &stream);
    let out = receive_file(&stream, &replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    let args = [
        "--compare",
        arg(&old),
        "--from-name",
        "monday",
        "--to-name",
        "tuesday",
        arg(&new),
    ];
    pipe_args_ok(&args, &replica, &[]);
    assert_same_file(&replica, &new);
    let status = blkdelta_ok(&["status", arg(&replica)]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("'tuesday'"));
}

#[test]
fn compare_reads_qcow2_active_layers() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let sc = Scratch::new();
    let old = sc.qcow2("old.qcow2", "32M", "");
    qemu_io(
        &old,
        &["write -P 0x11 0 4M".into(), "write -P 0x22 20M 1M".into()],
    );
    let new = sc.qcow2("new.qcow2", "32M", "");
    qemu_io(
        &new,
        &[
            "write -P 0x11 0 4M".into(),
            "write -P 0x33 1M 64k".into(),
            "write -P 0x44 28M 128k".into(),
        ],
    );
    let replica = seeded_replica(&sc, &old);
    let stream = sc.path("q.bd");
    let size = send_file(&["--compare", arg(&old), arg(&new)], &stream);
    assert!(size < 64 * KIB, "patterned data compresses: {size}");
    assert!(receive_file(&stream, &replica, &[]).status.success());
    let expect = sc.path("new.raw");
    export(&new, None, &expect);
    assert_same_file(&replica, &expect);
}

#[test]
fn a_sparse_4_gib_raw_file_seeds_fast_and_stays_sparse() {
    let sc = Scratch::new();
    let big = sc.path("big.raw");
    sparse_file(&big, 4 << 30);
    // 4 MiB of data at scattered offsets, and 4 MiB of zeros written as data.
    for i in 0..8u64 {
        write_random(&big, i * 500 * MIB + 12345, 512 * KIB, 40 + i);
    }
    for i in 0..4u64 {
        write_at(&big, (i * 1000 + 333) * MIB, &vec![0u8; MIB as usize]);
    }
    let data = 4 * MIB;
    let allocated = allocated_bytes(&big);
    assert!(
        allocated >= 2 * data,
        "the zeros are allocated: {allocated}"
    );

    let stream = sc.path("seed.bd");
    let started = Instant::now();
    let size = send_file(&[arg(&big)], &stream);
    let sent = started.elapsed();
    let replica = sc.path("replica.raw");
    let out = receive_file(&stream, &replica, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let total = started.elapsed();
    eprintln!(
        "raw seed of a 4 GiB sparse file: send {sent:?}, send + receive {total:?}, stream \
         {size} bytes, replica allocates {} bytes",
        allocated_bytes(&replica)
    );
    assert!(size < data + 64 * KIB, "{size}");
    let replica_allocated = allocated_bytes(&replica);
    assert!(
        replica_allocated < data + 2 * MIB,
        "replica allocates {replica_allocated}"
    );
    assert_eq!(std::fs::metadata(&replica).unwrap().len(), 4 << 30);
    assert_eq!(checksum(arg(&big), &[]), checksum(arg(&replica), &[]));
}
