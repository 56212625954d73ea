//! What the tests of sync share: running `blkdelta sync` and reading its JSON, the guest's
//! writes between cycles, what the source and the replica say they hold, and the oracle.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::common::{arg, assert_ok, assert_same_file, bin, export, have, qemu_io, run, Scratch};

/// Whether qemu-img and qemu-io are here.
pub fn have_qemu() -> bool {
    have("qemu-img") && have("qemu-io")
}

/// A snapshot by name and GUID (hex), as `list --json` and `status --json` print them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snap {
    pub name: String,
    pub guid: String,
}

impl Snap {
    fn of(v: &Value) -> Snap {
        Snap {
            name: v["name"].as_str().unwrap().to_string(),
            guid: v["guid"].as_str().unwrap().to_string(),
        }
    }
}

/// `blkdelta sync ARGS`, whatever its exit.
pub fn sync(args: &[&str]) -> Output {
    sync_env(&[], args)
}

/// `blkdelta sync ARGS` with extra environment variables, whatever its exit.
pub fn sync_env(env: &[(&str, &str)], args: &[&str]) -> Output {
    Command::new(bin())
        .arg("sync")
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap()
}

/// `blkdelta sync --json ARGS`: it must succeed and print one JSON object, which is returned.
pub fn sync_json(args: &[&str]) -> Value {
    let mut all = vec!["--json"];
    all.extend_from_slice(args);
    let out = sync(&all);
    assert_ok(&out, &format!("sync {all:?}"));
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 1, "one JSON object: {text}");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// A string field of sync's JSON, `None` for null.
pub fn field<'a>(v: &'a Value, name: &str) -> Option<&'a str> {
    assert!(v.get(name).is_some(), "no {name} in {v}");
    v[name].as_str()
}

/// A list of names in sync's JSON (`pruned_source`, `pruned_replica`).
pub fn field_names(v: &Value, name: &str) -> Vec<String> {
    let list = v[name]
        .as_array()
        .unwrap_or_else(|| panic!("{name} in {v}"));
    list.iter()
        .map(|n| n.as_str().unwrap().to_string())
        .collect()
}

/// The snapshots of a qcow2 image, oldest first (`blkdelta list --json`).
pub fn snapshots(img: &Path) -> Vec<Snap> {
    let out = run(Command::new(bin()).args(["list", "--json", arg(img)]));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    v["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(Snap::of)
        .collect()
}

/// The names of an image's snapshots, oldest first.
pub fn names(img: &Path) -> Vec<String> {
    snapshots(img).into_iter().map(|s| s.name).collect()
}

/// The newest snapshot of an image.
pub fn newest(img: &Path) -> Snap {
    snapshots(img).pop().expect("a snapshot")
}

/// The snapshot of `img` named `name`.
pub fn named(img: &Path, name: &str) -> Snap {
    let all = snapshots(img);
    let found = all.iter().find(|s| s.name == name);
    found
        .unwrap_or_else(|| panic!("no {name} in {all:?}"))
        .clone()
}

/// What `blkdelta status --json REPLICA` prints (it fails, answering, for no replica).
pub fn status_json(replica: &Path) -> Value {
    let out = Command::new(bin())
        .args(["status", "--json", arg(replica)])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("status --json {replica:?}: {e}: {out:?}"))
}

/// The state a replica holds, by `status --json` (none while an apply is in progress).
pub fn held(replica: &Path) -> Option<Snap> {
    let st = status_json(replica);
    st["snapshot"]
        .is_object()
        .then(|| Snap::of(&st["snapshot"]))
}

/// A qcow2 replica's snapshots, each named as in the replica with the GUID of the state it
/// holds (`status --json`), oldest first.
pub fn replica_snapshots(replica: &Path) -> Vec<Snap> {
    let st = status_json(replica);
    let list = st["snapshots"]
        .as_array()
        .expect("a qcow2 replica's snapshots");
    list.iter()
        .map(|s| Snap {
            name: s["name"].as_str().unwrap().to_string(),
            guid: s["state"]["guid"].as_str().unwrap().to_string(),
        })
        .collect()
}

/// The guest's writes before cycle `step`: incompressible data, a pattern, and a discard or
/// zeroes, at places that move with the step (the image is at least 32 MiB).
pub fn guest_writes(s: &Scratch, img: &Path, step: u64) {
    let data = s.random_file(&format!("guest-{step}"), 256 << 10, 1000 + step);
    let last = match step % 3 {
        0 => format!("discard {}M 1M", (step * 5) % 31),
        1 => format!("write -z {}M 512k", (step * 11) % 31),
        _ => format!("write -P 0 {}M 64k", (step * 13) % 31),
    };
    qemu_io(
        img,
        &[
            format!("write -s {} {}M 256k", data.display(), (step * 3) % 30),
            format!("write -P {} {}M 64k", step % 250 + 1, (step * 7) % 31),
            last,
        ],
    );
}

/// `qemu-img check IMG`: no error, no leak (any other exit than 0 fails).
pub fn qemu_check(img: &Path) {
    run(Command::new("qemu-img").arg("check").arg(img));
}

/// Whether a replica keeps history (the tests name their qcow2 replicas `*.qcow2`).
fn is_qcow2(replica: &Path) -> bool {
    replica.extension().is_some_and(|e| e == "qcow2")
}

/// What a replica reads as: the file itself, or qemu's raw export of a qcow2 replica's active
/// layer (after `qemu-img check`).
pub fn replica_bytes(s: &Scratch, replica: &Path) -> PathBuf {
    if !is_qcow2(replica) {
        return replica.to_path_buf();
    }
    qemu_check(replica);
    let out = s.path("replica-now.raw");
    export(replica, None, &out);
    out
}

/// The oracle: the replica reads as qemu's export of `snap` of the source, and `status` says
/// it holds that snapshot.
pub fn assert_replica_is(s: &Scratch, img: &Path, snap: &str, replica: &Path) {
    let want = s.path("source-snapshot.raw");
    export(img, Some(snap), &want);
    assert_same_file(&replica_bytes(s, replica), &want);
    let source = named(img, snap);
    assert_eq!(held(replica), Some(source), "status of {replica:?}");
}

/// The oracle for the newest source snapshot, which it returns.
pub fn assert_replica_is_newest(s: &Scratch, img: &Path, replica: &Path) -> Snap {
    let snap = newest(img);
    assert_replica_is(s, img, &snap.name, replica);
    snap
}

/// Waits (at most 30 s) until no process holds the `flock` on `lock`: a receiver left to
/// itself when its sync was killed has read what was in the pipe and gone.
pub fn wait_unlocked(lock: &Path) {
    let Ok(file) = File::open(lock) else { return };
    let deadline = Instant::now() + Duration::from_secs(30);
    // SAFETY: flock only reads its integer arguments; the descriptor is open.
    while unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        assert!(Instant::now() < deadline, "{lock:?} is still locked");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A source image `vm.qcow2` of `size`, with a first write.
pub fn source(s: &Scratch, size: &str) -> PathBuf {
    let img = s.qcow2("vm.qcow2", size, "");
    guest_writes(s, &img, 0);
    img
}

/// Sleeps until a new second of the clock begins (sync names its snapshots by the second).
pub fn to_the_next_second() {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
    std::thread::sleep(Duration::from_nanos(
        1_000_000_000 - now.subsec_nanos() as u64,
    ));
}
