//! A cycle killed (SIGKILL) before the source's snapshot, between it and the stream, between
//! the stream and the pruning, and part way through the stream: both images stay clean for
//! `qemu-img check`, `status` says what the replica holds (and holds it) or that an apply is
//! in progress, and the next cycle, unhooked, brings the replica to the newest snapshot.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::fixture::{
    assert_replica_is, assert_replica_is_newest, field, guest_writes, have_qemu, held, newest,
    qemu_check, snapshots, source, status_json, sync_env, sync_json, wait_unlocked,
};
use crate::common::{allocated_bytes, arg, bin, qemu_io, state_of, Reaped, Scratch};

/// What `status` says must be so: the replica holds a snapshot of the source, byte for byte.
fn assert_status_truthful(s: &Scratch, img: &Path, replica: &Path) {
    let holds = held(replica).expect("the replica holds a snapshot");
    assert_replica_is(s, img, &holds.name, replica);
}

#[test]
fn a_cycle_killed_at_each_step_leaves_both_sides_clean_and_the_next_right() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = source(&s, "32M");
    let replica = s.path("r.qcow2");
    let args = ["--keep", "2", arg(&img), arg(&replica)];
    sync_json(&args);
    for (step, at) in (1..).zip(["snapshot", "stream", "prune"]) {
        guest_writes(&s, &img, step);
        let (before, holds) = (snapshots(&img), held(&replica));
        let out = sync_env(&[("BLKDELTA_SYNC_KILL_AT", at)], &args);
        assert_eq!(out.status.signal(), Some(9), "killed at {at}: {out:?}");
        qemu_check(&img);
        qemu_check(&replica);
        assert_status_truthful(&s, &img, &replica);
        let after = snapshots(&img);
        assert_eq!(after[..before.len()], before[..], "killed at {at}");
        match at {
            "snapshot" => assert_eq!(after.len(), before.len(), "no snapshot yet"),
            _ => assert_eq!(after.len(), before.len() + 1, "the new one, nothing pruned"),
        }
        let holds_now = held(&replica);
        match at {
            "prune" => assert_eq!(holds_now.as_ref(), after.last(), "received"),
            _ => assert_eq!(holds_now, holds, "nothing received"),
        }
        let v = sync_json(&args);
        assert_eq!(
            field(&v, "from"),
            holds_now.map(|h| h.name).as_deref(),
            "{v}"
        );
        assert_replica_is_newest(&s, &img, &replica);
        qemu_check(&img);
    }
}

/// Whether the receiver has begun (the replica's state records an apply in progress) and
/// written `bytes` at least into the replica (counted in allocated bytes).
fn written_into(replica: &Path, allocated_before: u64, bytes: u64) -> bool {
    let text = std::fs::read_to_string(state_of(replica)).unwrap_or_default();
    let began = serde_json::from_str::<Value>(&text).is_ok_and(|st| st["in_progress"].is_object());
    began && allocated_bytes(replica) >= allocated_before + bytes
}

/// A cycle into `replica` (named `name`) of 48 MiB of incompressible data, killed once its
/// receiver wrote 8 MiB; then the next cycle. Whether `status` said, in between, that the
/// apply was in progress (else it said, truly, that the replica holds its base), and the next
/// cycle's JSON.
fn killed_mid_stream(name: &str) -> (bool, Value) {
    let s = Scratch::new();
    let img = source(&s, "64M");
    let replica = s.path(name);
    sync_json(&[arg(&img), arg(&replica)]);
    let data = s.random_file("big", 48 << 20, 7);
    qemu_io(&img, &[format!("write -s {} 8M 48M", data.display())]);
    let allocated_before = allocated_bytes(&replica);
    let mut cycle = Reaped(
        Command::new(bin())
            .args(["sync", "-q", "-l", "0", arg(&img), arg(&replica)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !written_into(&replica, allocated_before, 8 << 20) {
        let ended = cycle.try_wait().unwrap();
        assert!(
            ended.is_none(),
            "the cycle ended before it was cut: {ended:?}"
        );
        assert!(Instant::now() < deadline, "the receiver never began");
        std::thread::sleep(Duration::from_micros(200));
    }
    cycle.kill().unwrap();
    assert_eq!(cycle.wait().unwrap().signal(), Some(9));
    // Its receiver, left alone, reads what the pipe held and stops.
    wait_unlocked(Path::new(&format!("{}.lock", state_of(&replica).display())));
    qemu_check(&img);
    let cut = newest(&img);
    let st = status_json(&replica);
    let in_progress = st["in_progress"].is_object();
    // The next cycle starts from the cut stream's end once it is finished, else from the base.
    let mut from = cut.name.clone();
    if in_progress {
        assert!(st["snapshot"].is_null(), "holds nothing complete: {st}");
        assert_eq!(st["in_progress"]["to"]["guid"], cut.guid.as_str(), "{st}");
        assert!(st["resume_token"].is_string(), "{st}");
        if name.ends_with(".qcow2") {
            qemu_check(&replica);
        }
    } else {
        assert_status_truthful(&s, &img, &replica);
        from = held(&replica).unwrap().name;
    }
    guest_writes(&s, &img, 2);
    let v = sync_json(&[arg(&img), arg(&replica)]);
    let finished = in_progress.then_some(cut.name.as_str());
    assert_eq!(field(&v, "finished"), finished, "{v}");
    assert_eq!(field(&v, "from"), Some(from.as_str()), "{v}");
    assert_replica_is_newest(&s, &img, &replica);
    (in_progress, v)
}

#[test]
fn a_raw_replica_cut_mid_stream_is_finished_by_the_next_cycle() {
    if !have_qemu() {
        return;
    }
    assert!(killed_mid_stream("r.raw").0, "the apply was in progress");
}

#[test]
fn a_cycle_that_finishes_a_cut_stream_counts_its_bytes() {
    if !have_qemu() {
        return;
    }
    // At least the 40 MiB the cut stream still had to carry went to the receiver.
    let (in_progress, v) = killed_mid_stream("r.raw");
    assert!(in_progress);
    assert!(v["bytes"].as_u64().unwrap() > 16 << 20, "{v}");
}

#[test]
fn a_qcow2_replica_cut_mid_stream_is_brought_up_by_the_next_cycle() {
    if !have_qemu() {
        return;
    }
    // Cut before its first checkpoint, a qcow2 replica maps its base still, and says so.
    killed_mid_stream("r.qcow2");
}
