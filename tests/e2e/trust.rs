//! Trust in the replica: what the receiver must refuse (a replica deleted, swapped, written or
//! resized behind its back; a stream older than what the replica holds), what `status` must say
//! about such a replica, the block hashes it keeps (`checksum`, `verify`, repair), block devices
//! named through other paths, and receives with `--undo` killed at their most delicate points.
//!
//! A refusal is exit status 1 with one line on stderr, `blkdelta: REASON (nothing written;
//! --SWITCH overrides)`, and the replica exactly as it was.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::common::{
    arg, assert_ok, assert_refused, assert_same_file, assert_same_prefix, bin, blkdelta,
    blkdelta_env, blkdelta_ok, checksum, export, flip_bytes, have, io, pipe, pipe_args, qemu_io,
    random, receive_file, records_of, run, seeded_with_s0_s1, send_to_file, snapshot, spec,
    status_env, stderr, Loop, Scratch,
};

/// A 16 MiB image with snapshots s0, s1, s2: random data, a pattern, zeros.
fn history(s: &Scratch) -> PathBuf {
    let steps = [
        ("s0", vec![random(0, 6, 21)]),
        ("s1", vec![io("write -P 0x11 4M 4M")]),
        ("s2", vec![random(8, 5, 22), io("write -z 0 1M")]),
    ];
    s.history("vm.qcow2", "16M", "", &steps)
}

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers.
// ---------------------------------------------------------------------------------------------

fn assert_holds(target: &Path, env: &[(&str, &Path)], snap: &str) {
    let (code, text) = status_env(target, env);
    assert_eq!(code, Some(0), "status: {text}");
    assert!(
        text.contains(&format!("holds snapshot '{snap}'")),
        "status must say it holds {snap}: {text}"
    );
}

/// `status` of a replica changed behind blkdelta's back.
fn assert_status_changed(target: &Path) {
    let (code, text) = status_env(target, &[]);
    assert_eq!(code, Some(1), "status of a changed replica: {text}");
    assert!(
        text.contains("changed since blkdelta last wrote it"),
        "status must say the replica changed: {text}"
    );
    assert!(!text.contains("holds snapshot"), "{text}");
}

/// blkdelta run in `dir` (relative paths), optionally under strace injecting faults.
fn bd_in(dir: &Path, strace: &[&str], args: &[&str]) -> Output {
    let mut cmd = if strace.is_empty() {
        Command::new(bin())
    } else {
        let mut c = Command::new("strace");
        c.args(strace).arg(bin());
        c
    };
    cmd.current_dir(dir).args(args).output().unwrap()
}

// ---------------------------------------------------------------------------------------------
// 1. A resume token applied to a replica that was deleted since.
// ---------------------------------------------------------------------------------------------

#[test]
fn resuming_a_seed_onto_a_deleted_replica_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "64M", "");
    let r = s.random_file("r", 40 << 20, 1);
    qemu_io(&img, &[format!("write -s {} 0 40M", r.display())]);
    snapshot(&img, "s0");
    let seed = s.path("seed.bd");
    let len = send_to_file(&spec(&img, "s0"), &seed) as usize;
    let at = records_of(&seed, "checkpoint")
        .into_iter()
        .find(|&at| at > len / 2)
        .expect("a checkpoint record past half the stream");
    let cut = s.path("cut.bd");
    std::fs::write(&cut, &std::fs::read(&seed).unwrap()[..at + 200]).unwrap();
    let replica = s.path("r.raw");
    let out = receive_file(&cut, &replica, &["--checkpoint-bytes", "4194304"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let (_, st) = status_env(&replica, &[]);
    let token = st
        .split_whitespace()
        .find(|w| w.starts_with("bd1-"))
        .unwrap_or_else(|| panic!("no resume token in:\n{st}"))
        .to_string();

    std::fs::remove_file(&replica).unwrap();
    let recv = pipe_args(&["--resume", &token, &spec(&img, "s0")], &replica, &[]);
    assert_eq!(
        recv.status.code(),
        Some(1),
        "a resumed seed onto a deleted replica must be refused: {}",
        stderr(&recv)
    );
    assert!(
        !replica.exists(),
        "a refused receive must not create the replica"
    );
    let (_, st) = status_env(&replica, &[]);
    assert!(!st.contains("holds snapshot"), "{st}");
}

// ---------------------------------------------------------------------------------------------
// 2, 3. A replica swapped, written through a loop device, or resized behind blkdelta's back.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_same_size_file_swapped_in_for_the_replica_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let (replica, inc) = seeded_with_s0_s1(&s, &img);

    let other = s.path("other.raw");
    std::fs::write(&other, vec![0x5au8; 16 << 20]).unwrap();
    std::fs::rename(&other, &replica).unwrap();
    let out = receive_file(&inc, &replica, &[]);
    assert_refused(
        &out,
        &["--overwrite"],
        "an incremental onto a swapped-in file",
    );
    let now = std::fs::read(&replica).unwrap();
    assert!(
        now.len() == 16 << 20 && now.iter().all(|&b| b == 0x5a),
        "a refused receive must leave the file as it was"
    );
    assert_status_changed(&replica);
}

#[test]
fn a_replica_written_through_a_loop_device_is_refused() {
    if !have("qemu-img") || !have("losetup") || !have("mkfs.ext4") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let (replica, inc) = seeded_with_s0_s1(&s, &img);
    std::thread::sleep(std::time::Duration::from_millis(20));
    {
        let Some(dev) = Loop::attach(&replica, false) else {
            return;
        };
        run(Command::new("mkfs.ext4").args(["-q", "-F", &dev.0]));
        run(&mut Command::new("sync"));
    }
    let before = std::fs::read(&replica).unwrap();
    let e0 = std::fs::read(s.export_of(&img, "s0")).unwrap();
    assert!(before != e0, "mkfs.ext4 did not change the replica");
    let out = receive_file(&inc, &replica, &[]);
    assert_refused(
        &out,
        &["--overwrite"],
        "an incremental onto a mkfs'd replica",
    );
    assert!(
        std::fs::read(&replica).unwrap() == before,
        "a refused receive must leave the replica as it was"
    );
    assert_status_changed(&replica);
}

/// Truncation is refused today already (but without naming the switch); extension is not.
#[test]
fn a_shortened_or_extended_replica_is_refused() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let inc = s.path("s0s1.bd");
    send_to_file(&spec(&img, "s0..s1"), &inc);
    for (name, len) in [("short.raw", 12 << 20), ("long.raw", 20 << 20)] {
        let replica = s.path(name);
        pipe(&spec(&img, "s0"), &replica, &[]);
        std::fs::File::options()
            .write(true)
            .open(&replica)
            .unwrap()
            .set_len(len)
            .unwrap();
        let before = std::fs::read(&replica).unwrap();
        let out = receive_file(&inc, &replica, &[]);
        assert_refused(&out, &["--overwrite"], &format!("{name} resized to {len}"));
        assert!(
            std::fs::read(&replica).unwrap() == before,
            "{name}: a refused receive must leave the replica as it was"
        );
        assert_status_changed(&replica);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Named states from dirty bitmaps: a cycle's stream applied again later.
// ---------------------------------------------------------------------------------------------

/// A bitmap-tracked image seeded as `daily` and two cycles sent, applied and cleared; returns
/// the image, the replica and the two cycles' streams.
fn bitmap_cycles(s: &Scratch) -> (PathBuf, PathBuf, PathBuf, PathBuf) {
    let img = s.qcow2("vm.qcow2", "16M", "");
    let r = s.random_file("r", 4 << 20, 31);
    qemu_io(&img, &[format!("write -s {} 0 4M", r.display())]);
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("daily"));
    let replica = s.path("r.raw");
    let recv = pipe_args(&["--to-name", "daily", arg(&img)], &replica, &[]);
    assert_ok(&recv, "seed");
    let clear = || {
        run(Command::new("qemu-img")
            .args(["bitmap", "--clear"])
            .arg(&img)
            .arg("daily"))
    };
    let cycle = |n: usize, cmds: &[String]| {
        qemu_io(&img, cmds);
        let stream = s.path(&format!("c{n}.bd"));
        blkdelta_ok(&[
            "send",
            "-q",
            "--bitmap",
            "daily",
            arg(&img),
            "-o",
            arg(&stream),
        ]);
        assert_ok(&receive_file(&stream, &replica, &[]), "cycle");
        clear();
        stream
    };
    let c1 = cycle(1, &["write -P 0x61 2M 4M".into()]);
    let c2 = cycle(
        2,
        &["write -P 0x62 3M 2M".into(), "write -P 0x63 10M 1M".into()],
    );
    (img, replica, c1, c2)
}

#[test]
fn an_older_bitmap_cycle_applied_again_is_refused_as_a_rewind() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let s = Scratch::new();
    let (img, replica, c1, _c2) = bitmap_cycles(&s);
    let now = s.path("active.export");
    export(&img, None, &now);
    assert_same_file(&replica, &now);
    let out = receive_file(&c1, &replica, &[]);
    assert_refused(&out, &["--rewind"], "cycle 1's stream after cycle 2");
    assert_same_file(&replica, &now);
}

/// Guard: the stream the replica has just applied, applied again, succeeds and changes nothing.
/// (Today it rewrites the same bytes: the file's mtime changes, so it is not checked here.)
#[test]
fn the_last_bitmap_cycle_applied_again_changes_nothing() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let s = Scratch::new();
    let (img, replica, _c1, c2) = bitmap_cycles(&s);
    let now = s.path("active.export");
    export(&img, None, &now);
    let out = receive_file(&c2, &replica, &[]);
    assert_ok(&out, "cycle 2's stream again");
    assert_same_file(&replica, &now);
    assert_holds(&replica, &[], "daily");
}

// ---------------------------------------------------------------------------------------------
// 5, 6. A full stream of an older snapshot; status of a deleted replica.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_full_stream_of_an_older_snapshot_needs_rewind() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    pipe(&spec(&img, "s0..s2"), &replica, &[]);
    let seed = s.path("s0.bd");
    send_to_file(&spec(&img, "s0"), &seed);
    let out = receive_file(&seed, &replica, &[]);
    assert_refused(
        &out,
        &["--rewind"],
        "a full stream of s0 onto a replica of s2",
    );
    assert_same_file(&replica, &s.export_of(&img, "s2"));
    assert_holds(&replica, &[], "s2");

    assert_ok(&receive_file(&seed, &replica, &["--rewind"]), "--rewind");
    assert_same_file(&replica, &s.export_of(&img, "s0"));
    assert_holds(&replica, &[], "s0");
}

#[test]
fn status_of_a_deleted_replica_says_missing() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    assert_holds(&replica, &[], "s0");
    std::fs::remove_file(&replica).unwrap();
    let (code, text) = status_env(&replica, &[]);
    assert_eq!(code, Some(1), "status of a deleted replica: {text}");
    assert!(text.contains("missing"), "{text}");
    assert!(!text.contains("holds snapshot"), "{text}");
}

#[test]
fn seeding_a_deleted_replica_again_with_the_snapshot_its_state_names_writes_it_whole() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    std::fs::remove_file(&replica).unwrap();
    // Another file takes the deleted replica's inode number, if the file system reuses it.
    let other = s.random_file("other", 4096, 5);
    // The state still says 's0': the stream must not be taken as one the replica is past.
    pipe(&spec(&img, "s0"), &replica, &[]);
    assert_same_file(&replica, &s.export_of(&img, "s0"));
    assert_holds(&replica, &[], "s0");
    blkdelta_ok(&["verify", arg(&replica)]);
    drop(other);
}

// ---------------------------------------------------------------------------------------------
// 7. Block devices, whatever path names them.
// ---------------------------------------------------------------------------------------------

#[test]
fn a_device_state_is_found_through_a_symlink() {
    if !have("qemu-img") || !have("losetup") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let Some(dev) = Loop::over_new_file(&s.path("dev.img"), 20 << 20, 0xee) else {
        return;
    };
    let state_dir = s.path("state");
    std::fs::create_dir(&state_dir).unwrap();
    let env = [("BLKDELTA_STATE_DIR", state_dir.as_path())];
    let seed = s.path("s0.bd");
    send_to_file(&spec(&img, "s0"), &seed);
    let out = blkdelta_env(
        &env,
        &["receive", "-q", "--force", "-i", arg(&seed), &dev.0],
    );
    assert_ok(&out, "seed onto the device");

    let link = s.path("dev-link");
    std::os::unix::fs::symlink(&dev.0, &link).unwrap();
    let inc = s.path("s0s2.bd");
    send_to_file(&spec(&img, "s0..s2"), &inc);
    let out = blkdelta_env(&env, &["receive", "-q", "-i", arg(&inc), arg(&link)]);
    assert_ok(&out, "an incremental through a symlink to the device");
    assert_same_prefix(Path::new(&dev.0), &s.export_of(&img, "s2"));
    assert_holds(&link, &env, "s2");
    assert_holds(Path::new(&dev.0), &env, "s2");
}

/// A device replica swapped behind blkdelta's back (the path now names another device) or
/// resized (a loop device's file grown, its capacity re-read) is refused, like a file.
#[test]
fn a_device_swapped_or_resized_behind_blkdeltas_back_is_refused() {
    if !have("qemu-img") || !have("losetup") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let backing = s.path("a.img");
    let Some(a) = Loop::over_new_file(&backing, 20 << 20, 0xee) else {
        return;
    };
    let Some(b) = Loop::over_new_file(&s.path("b.img"), 20 << 20, 0x11) else {
        return;
    };
    let state_dir = s.path("state");
    std::fs::create_dir(&state_dir).unwrap();
    let env = [("BLKDELTA_STATE_DIR", state_dir.as_path())];
    let link = s.path("replica");
    std::os::unix::fs::symlink(&a.0, &link).unwrap();
    let seed = s.path("s0.bd");
    send_to_file(&spec(&img, "s0"), &seed);
    let out = blkdelta_env(
        &env,
        &["receive", "-q", "--overwrite", "-i", arg(&seed), arg(&link)],
    );
    assert_ok(&out, "seed through the link");
    let inc = s.path("s0s2.bd");
    send_to_file(&spec(&img, "s0..s2"), &inc);

    // The link now names another device, which holds no replica.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&b.0, &link).unwrap();
    let before = std::fs::read(s.path("b.img")).unwrap();
    let out = blkdelta_env(&env, &["receive", "-q", "-i", arg(&inc), arg(&link)]);
    assert_refused(&out, &["--rebase"], "an incremental onto the other device");
    assert!(
        std::fs::read(s.path("b.img")).unwrap() == before,
        "the other device was written"
    );

    // The replica's device grows behind blkdelta's back.
    std::fs::remove_file(&link).unwrap();
    std::os::unix::fs::symlink(&a.0, &link).unwrap();
    std::fs::File::options()
        .write(true)
        .open(&backing)
        .unwrap()
        .set_len(24 << 20)
        .unwrap();
    run(Command::new("losetup").args(["-c", &a.0]));
    let out = blkdelta_env(&env, &["receive", "-q", "-i", arg(&inc), arg(&link)]);
    let err = assert_refused(
        &out,
        &["--overwrite"],
        "an incremental onto a resized device",
    );
    assert!(err.contains("the device holds 25165824 bytes"), "{err}");
    let (code, st) = status_env(&link, &env);
    assert_eq!(code, Some(1), "{st}");
    assert!(st.contains("changed since blkdelta last wrote it"), "{st}");
}

#[test]
fn checksum_of_a_device_without_state_says_it_digests_the_whole_device() {
    if !have("losetup") {
        return;
    }
    let s = Scratch::new();
    let backing = s.path("dev.img");
    let Some(dev) = Loop::over_new_file(&backing, 8 << 20, 0x3c) else {
        return;
    };
    let state_dir = s.path("state");
    std::fs::create_dir(&state_dir).unwrap();
    let out = blkdelta_env(
        &[("BLKDELTA_STATE_DIR", state_dir.as_path())],
        &["checksum", &dev.0],
    );
    assert_ok(&out, "checksum of a device");
    let digest = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(digest, checksum(arg(&backing), &[]));
    assert!(
        stderr(&out).contains("whole device"),
        "checksum must say it digests the whole device: {}",
        stderr(&out)
    );
}

// ---------------------------------------------------------------------------------------------
// 8, 9. `receive --undo` killed at its delicate points.
// ---------------------------------------------------------------------------------------------

/// One traced syscall: thread id, name, arguments.
struct Call {
    tid: String,
    name: String,
    args: String,
}

/// The syscalls of an `strace -f -o LOG` log, in order (a call split by another thread counts
/// where it started).
fn calls(log: &Path) -> Vec<Call> {
    std::fs::read_to_string(log)
        .unwrap()
        .lines()
        .filter_map(|l| {
            let (tid, rest) = l.split_once(' ')?;
            let rest = rest.trim_start();
            if rest.starts_with("<...") || rest.starts_with("+++") || rest.starts_with("---") {
                return None;
            }
            let (name, args) = rest.split_once('(')?;
            Some(Call {
                tid: tid.to_string(),
                name: name.to_string(),
                args: args.to_string(),
            })
        })
        .collect()
}

/// The `strace` fault that SIGKILLs the call `calls[i]`: `inject=NAME:signal=SIGKILL:when=N`,
/// N counting that thread's calls of that name (strace counts per thread).
fn kill_at(calls: &[Call], i: usize) -> String {
    let c = &calls[i];
    let n = calls[..=i]
        .iter()
        .filter(|k| k.tid == c.tid && k.name == c.name)
        .count();
    format!("inject={}:signal=SIGKILL:when={n}", c.name)
}

/// Two directories with the same names (a trial traced run, and the run killed), each with a
/// replica seeded with s0; the incremental s0..s1.
struct UndoRig {
    s: Scratch,
    img: PathBuf,
    inc: PathBuf,
}

const UNDO_ARGS: [&str; 7] = [
    "receive",
    "-q",
    "-i",
    "../inc.bd",
    "--undo",
    "u.bd",
    "r.raw",
];

impl UndoRig {
    fn new() -> UndoRig {
        let s = Scratch::new();
        let img = history(&s);
        let seed = s.path("seed.bd");
        send_to_file(&spec(&img, "s0"), &seed);
        let inc = s.path("inc.bd");
        send_to_file(&spec(&img, "s0..s1"), &inc);
        for d in ["trial", "real"] {
            std::fs::create_dir(s.path(d)).unwrap();
            let out = bd_in(
                &s.path(d),
                &[],
                &["receive", "-q", "-i", "../seed.bd", "r.raw"],
            );
            assert_ok(&out, "seed");
        }
        UndoRig { s, img, inc }
    }

    /// The syscalls of the receive with undo, run to its end in `trial`.
    fn trial(&self) -> Vec<Call> {
        let log = self.s.path("trial.log");
        let out = bd_in(
            &self.s.path("trial"),
            &["-f", "-qq", "-o", arg(&log), "-e", "trace=all"],
            &UNDO_ARGS,
        );
        assert_ok(&out, "the traced trial receive");
        calls(&log)
    }

    /// The receive with undo in `real`, SIGKILLed by `fault`.
    fn killed(&self, fault: &str) {
        let out = bd_in(
            &self.s.path("real"),
            &["-f", "-qq", "-o", "/dev/null", "-e", fault],
            &UNDO_ARGS,
        );
        assert!(
            !out.status.success(),
            "the receive was not killed by {fault}: {}",
            stderr(&out)
        );
    }

    fn real(&self, name: &str) -> PathBuf {
        self.s.path("real").join(name)
    }

    /// The documented retry finishes the receive, and the undo stream rolls it back to s0.
    fn retry_then_undo(&self) {
        let replica = self.real("r.raw");
        let out = bd_in(&self.s.path("real"), &[], &UNDO_ARGS);
        assert_ok(&out, "the same receive --undo again");
        assert_same_file(&replica, &self.s.export_of(&self.img, "s1"));
        assert_holds(&replica, &[], "s1");
        let out = receive_file(&self.real("u.bd"), &replica, &[]);
        assert_ok(&out, "applying the undo stream");
        assert_same_file(&replica, &self.s.export_of(&self.img, "s0"));
        assert_holds(&replica, &[], "s0");
        // And the original stream replays.
        assert_ok(&receive_file(&self.inc, &replica, &[]), "replay");
        assert_same_file(&replica, &self.s.export_of(&self.img, "s1"));
    }
}

fn is_rename(c: &Call) -> bool {
    matches!(c.name.as_str(), "rename" | "renameat" | "renameat2")
}

#[test]
fn undo_killed_before_the_final_state_rename_is_finished_by_the_same_command() {
    if !have("qemu-img") || !have("strace") {
        return;
    }
    let rig = UndoRig::new();
    let calls = rig.trial();
    // The last rename onto the state file: the undo file is complete by then.
    let i = calls
        .iter()
        .rposition(|c| is_rename(c) && c.args.contains("r.raw.blkdelta\""))
        .expect("a rename onto the state file");
    rig.killed(&kill_at(&calls, i));
    let undo = rig.real("u.bd");
    assert!(undo.exists(), "the undo file was not written");
    let out = blkdelta(&["dump", arg(&undo)]);
    assert_ok(&out, "the undo file is complete");

    let (_, st) = status_env(&rig.real("r.raw"), &[]);
    assert!(
        st.contains("--undo") && st.contains("u.bd"),
        "status must name --undo u.bd: {st}"
    );
    // The resume command it prints is one that works: with the undo stream.
    let resume = st
        .lines()
        .find(|l| l.contains("blkdelta send --resume"))
        .unwrap_or_else(|| panic!("no resume command: {st}"));
    assert!(resume.contains("receive --undo "), "{resume}");
    assert!(!st.contains("holds snapshot"), "{st}");
    rig.retry_then_undo();
}

#[test]
fn undo_killed_just_after_creating_the_undo_file_is_finished_by_the_same_command() {
    if !have("qemu-img") || !have("strace") {
        return;
    }
    let rig = UndoRig::new();
    let calls = rig.trial();
    let open = calls
        .iter()
        .position(|c| {
            c.name.starts_with("open") && c.args.contains("u.bd") && c.args.contains("O_CREAT")
        })
        .expect("the undo file's creation");
    let i = (open + 1..calls.len())
        .find(|&i| {
            calls[i].tid == calls[open].tid
                && matches!(calls[i].name.as_str(), "fsync" | "fdatasync")
        })
        .expect("a sync after the undo file's creation");
    rig.killed(&kill_at(&calls, i));
    let created = std::fs::read_dir(rig.s.path("real"))
        .unwrap()
        .any(|e| e.unwrap().file_name().to_string_lossy().starts_with("u.bd"));
    assert!(created, "the undo file was not created before the kill");
    rig.retry_then_undo();
}

// ---------------------------------------------------------------------------------------------
// 10. Kept block hashes, verify and repair.
// ---------------------------------------------------------------------------------------------

#[test]
fn kept_hashes_answer_checksum_and_verify_finds_and_repair_fixes_damage() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    pipe(&spec(&img, "s0..s2"), &replica, &[]);
    let want = checksum(&spec(&img, "s2"), &[]);

    let out = blkdelta(&["checksum", arg(&replica)]);
    assert_ok(&out, "checksum of the replica");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(
        text.split_whitespace().next(),
        Some(want.as_str()),
        "{text}"
    );
    assert!(
        stderr(&out).contains("kept block hashes"),
        "checksum must say it answered from the kept hashes: {}",
        stderr(&out)
    );

    // Damage behind blkdelta's back: 3 bytes in block 5, 1 byte in block 9.
    flip_bytes(&replica, 5 * MIB + 7, 3);
    flip_bytes(&replica, 9 * MIB, 1);
    let out = blkdelta(&["checksum", "--read", arg(&replica)]);
    assert_ok(&out, "checksum --read");
    assert!(stderr(&out).contains("read"), "{}", stderr(&out));
    let read = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_ne!(read.split_whitespace().next(), Some(want.as_str()));

    let out = blkdelta(&["verify", arg(&replica)]);
    assert_eq!(out.status.code(), Some(1), "verify: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let differs: Vec<&str> = text.lines().filter(|l| l.starts_with("differs:")).collect();
    assert_eq!(
        differs,
        [
            "differs: offset 5242880 length 1048576",
            "differs: offset 9437184 length 1048576"
        ],
        "{text}"
    );
    assert!(
        text.lines()
            .last()
            .is_some_and(|l| l.starts_with("verify:")),
        "{text}"
    );

    // Repair: the replica's block list, a stream of only the blocks that differ.
    let out = blkdelta(&["checksum", "--blocks", arg(&replica)]);
    assert_ok(&out, "checksum --blocks");
    let blocks = s.path("r.blocks");
    std::fs::write(&blocks, &out.stdout).unwrap();
    let damaged = std::fs::read(&replica).unwrap();
    let send = ["--against", arg(&blocks), &spec(&img, "s2")];
    // Only the two damaged blocks travel (at most 1.1 times their bytes).
    let stream = s.path("repair.bd");
    blkdelta_ok(&["send", "-q", send[0], send[1], send[2], "-o", arg(&stream)]);
    let bytes = std::fs::metadata(&stream).unwrap().len();
    assert!(bytes <= 2 * MIB * 11 / 10, "the repair sent {bytes} bytes");
    let out = blkdelta_ok(&["dump", arg(&stream)]);
    let data: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("data "))
        .map(|l| {
            l.split_whitespace()
                .find(|w| w.starts_with("offset="))
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(data, ["offset=5242880", "offset=9437184"]);
    let recv = pipe_args(&send, &replica, &[]);
    assert_eq!(
        recv.status.code(),
        Some(1),
        "without --repair: {}",
        stderr(&recv)
    );
    assert!(std::fs::read(&replica).unwrap() == damaged);
    let recv = pipe_args(&send, &replica, &["--repair"]);
    assert_ok(&recv, "receive --repair");
    assert_same_file(&replica, &s.export_of(&img, "s2"));
    assert_holds(&replica, &[], "s2");
    let out = blkdelta(&["verify", arg(&replica)]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "verify after repair: {}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr(&out)
    );
}

/// A repair needs no state: a plain copy of an old export becomes a replica of s2, and so does
/// a replica left part way through an apply.
#[test]
fn a_repair_takes_a_file_without_state_or_one_part_way_through_an_apply() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let repair = |target: &Path| {
        let out = blkdelta_ok(&["checksum", "--blocks", arg(target)]);
        let blocks = s.path("t.blocks");
        std::fs::write(&blocks, &out.stdout).unwrap();
        let recv = pipe_args(
            &["--against", arg(&blocks), &spec(&img, "s2")],
            target,
            &["--repair"],
        );
        assert_ok(&recv, "receive --repair");
        assert_same_file(target, &s.export_of(&img, "s2"));
        assert_holds(target, &[], "s2");
        blkdelta_ok(&["verify", arg(target)]);
    };
    // A copy of s0 that blkdelta never wrote.
    let plain = s.path("plain.raw");
    std::fs::copy(s.export_of(&img, "s0"), &plain).unwrap();
    repair(&plain);

    // A replica whose incremental was cut after its first checkpoint.
    let (replica, _) = seeded_with_s0_s1(&s, &img);
    let stream = s.path("s0s2.bd");
    send_to_file(&spec(&img, "s0..s2"), &stream);
    let cut = s.path("cut.bd");
    let at = records_of(&stream, "checkpoint")[1];
    std::fs::write(&cut, &std::fs::read(&stream).unwrap()[..at + 100]).unwrap();
    let out = receive_file(&cut, &replica, &["--checkpoint-bytes", "65536"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let (_, st) = status_env(&replica, &[]);
    assert!(st.contains("in progress"), "{st}");
    repair(&replica);
}

/// A replica that changed again after its block list was made: the repair is refused, nothing
/// is written, and the kept hashes still tell `verify` every block that differs.
#[test]
fn a_repair_against_a_stale_block_list_is_refused_and_keeps_the_hashes() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let replica = s.path("r.raw");
    pipe(&spec(&img, "s0"), &replica, &[]);
    pipe(&spec(&img, "s0..s2"), &replica, &[]);
    flip_bytes(&replica, 5 * MIB + 1, 1);
    let out = blkdelta_ok(&["checksum", "--blocks", arg(&replica)]);
    let blocks = s.path("r.blocks");
    std::fs::write(&blocks, &out.stdout).unwrap();
    flip_bytes(&replica, 9 * MIB + 1, 1);
    let before = std::fs::read(&replica).unwrap();
    let recv = pipe_args(
        &["--against", arg(&blocks), &spec(&img, "s2")],
        &replica,
        &["--repair"],
    );
    assert_eq!(recv.status.code(), Some(1), "{}", stderr(&recv));
    assert!(
        stderr(&recv).contains("make the block list again"),
        "{}",
        stderr(&recv)
    );
    assert!(
        std::fs::read(&replica).unwrap() == before,
        "a refused repair wrote"
    );
    let out = blkdelta(&["verify", arg(&replica)]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let differs: Vec<&str> = text.lines().filter(|l| l.starts_with("differs:")).collect();
    assert_eq!(
        differs,
        [
            "differs: offset 5242880 length 1048576",
            "differs: offset 9437184 length 1048576"
        ],
        "{text}{}",
        stderr(&out)
    );
}

/// A block device's content can change without its identity changing: `receive` cannot see
/// it, `verify` finds it (exact range), records it in the state, and a repair over the link
/// mends it sending only that block.
#[test]
fn a_device_written_behind_blkdeltas_back_is_found_by_verify_and_repaired() {
    if !have("qemu-img") || !have("losetup") {
        return;
    }
    let s = Scratch::new();
    let img = history(&s);
    let Some(dev) = Loop::over_new_file(&s.path("dev.img"), 20 << 20, 0x5a) else {
        return;
    };
    let state_dir = s.path("state");
    std::fs::create_dir(&state_dir).unwrap();
    let env = [("BLKDELTA_STATE_DIR", state_dir.as_path())];
    let run = |args: &[&str]| blkdelta_env(&env, args);
    let seed = s.path("s0.bd");
    send_to_file(&spec(&img, "s0"), &seed);
    let out = run(&["receive", "-q", "-i", arg(&seed), &dev.0]);
    assert_refused(&out, &["--overwrite"], "a seed onto a device holding data");
    assert_ok(
        &run(&["receive", "-q", "--overwrite", "-i", arg(&seed), &dev.0]),
        "seed",
    );
    let inc = s.path("s0s2.bd");
    send_to_file(&spec(&img, "s0..s2"), &inc);
    assert_ok(
        &run(&["receive", "-q", "-i", arg(&inc), &dev.0]),
        "incremental",
    );
    let want = checksum(&spec(&img, "s2"), &[]);
    let out = run(&["checksum", &dev.0]);
    assert_ok(&out, "checksum of the device");
    assert!(String::from_utf8_lossy(&out.stdout).starts_with(&want));
    assert!(
        stderr(&out).contains("from the kept block hashes"),
        "{}",
        stderr(&out)
    );

    // Behind blkdelta's back: 2 bytes in block 3, straight onto the device.
    flip_bytes(Path::new(&dev.0), 3 * MIB + 5, 2);
    let out = run(&["verify", &dev.0]);
    assert_eq!(out.status.code(), Some(1), "verify: {}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let differs: Vec<&str> = text.lines().filter(|l| l.starts_with("differs:")).collect();
    assert_eq!(
        differs,
        ["differs: offset 3145728 length 1048576"],
        "{text}"
    );
    // Now the state knows: no snapshot is claimed, and an incremental is refused.
    let (code, st) = status_env(Path::new(&dev.0), &env);
    assert_eq!(code, Some(1), "{st}");
    assert!(st.contains("changed since blkdelta last wrote it"), "{st}");
    assert!(!st.contains("holds snapshot"), "{st}");
    let out = run(&["checksum", &dev.0]);
    assert!(!String::from_utf8_lossy(&out.stdout).starts_with(&want));

    let out = run(&["checksum", "--blocks", &dev.0]);
    assert_ok(&out, "checksum --blocks");
    let blocks = s.path("dev.blocks");
    std::fs::write(&blocks, &out.stdout).unwrap();
    let stream = s.path("repair.bd");
    blkdelta_ok(&[
        "send",
        "-q",
        "--against",
        arg(&blocks),
        &spec(&img, "s2"),
        "-o",
        arg(&stream),
    ]);
    let bytes = std::fs::metadata(&stream).unwrap().len();
    assert!(
        bytes < MIB + 64 * 1024,
        "a repair of one block sent {bytes} bytes"
    );
    assert_ok(
        &run(&["receive", "-q", "--repair", "-i", arg(&stream), &dev.0]),
        "receive --repair",
    );
    assert_same_prefix(Path::new(&dev.0), &s.export_of(&img, "s2"));
    assert_holds(Path::new(&dev.0), &env, "s2");
    assert_ok(&run(&["verify", &dev.0]), "verify after the repair");
}

// ---------------------------------------------------------------------------------------------
// 11. A huge sparse disk (guard).
// ---------------------------------------------------------------------------------------------

/// Guard: the checksum of an empty 16 TiB qcow2 finishes (unallocated ranges cost nothing).
#[test]
fn checksum_of_an_empty_16_tib_qcow2_finishes() {
    if !have("qemu-img") || !have("timeout") {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("big.qcow2", "16T", "");
    let out = Command::new("timeout")
        .arg("30")
        .arg(bin())
        .arg("checksum")
        .arg(&img)
        .output()
        .unwrap();
    assert_ok(&out, "checksum of a 16 TiB qcow2 (timeout 30 s)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let digest = text.split_whitespace().next().unwrap().to_string();

    let raw = s.path("big.raw");
    let made = Command::new("truncate")
        .args(["-s", "16T"])
        .arg(&raw)
        .status()
        .is_ok_and(|st| st.success());
    if made {
        assert_eq!(digest, checksum(arg(&raw), &[]));
    } else {
        eprintln!(
            "SKIPPED (comparison with a raw file): this filesystem cannot hold a 16 TiB sparse \
             file; comparing with the digest of 16 TiB of zeros computed from its definition"
        );
        let size = 16u64 << 40;
        let mut d = blkdelta_common::digest::DigestBuilder::new(size);
        d.push_zero_blocks(size / MIB);
        assert_eq!(digest, blkdelta_common::digest::to_hex(&d.finish()));
    }
}
