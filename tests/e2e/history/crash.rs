//! The receiver SIGKILLed at many points of mon..fri into a qcow2 replica, checkpointing
//! often. After each kill `qemu-img check` finds no error and no leak, `status` tells the
//! truth, and the same stream applied again (or resumed from the token `status --json`
//! gives) leaves exactly the source's snapshots.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::truth::{finish, truth, Truth};
use super::week::{Source, DAYS};
use crate::common::{assert_ok, have, receive_file, records, send_to_file, Rec, Receiver};

/// Checkpoints of the resume point every 256 KiB applied.
const CKPT: [&str; 2] = ["--checkpoint-bytes", "262144"];

/// What the test waits for between feeding and killing.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Wait {
    /// Kill at once: the receiver is busy with what it was just given.
    Now,
    /// Until the receiver has read everything fed, and a while to apply it.
    Settle,
}

struct Point {
    what: String,
    fed: u64,
    wait: Wait,
    /// Close the input after feeding: the receiver may finish before the kill.
    close: bool,
}

fn point(what: impl Into<String>, fed: u64, wait: Wait) -> Point {
    Point {
        what: what.into(),
        fed,
        wait,
        close: false,
    }
}

/// The points of one transition, whose records run from `start` to its snapshot-end `end`:
/// inside its first data payload, after its first and last checkpoint records, before its
/// snapshot-info, inside and right after its snapshot-end.
fn transition_points(t: usize, recs: &[&Rec], end: &Rec) -> Vec<Point> {
    let of = |kind: &'static str| recs.iter().filter(move |r| r.kind == kind);
    let data = of("data").next().expect("a data record");
    let first_ckpt = of("checkpoint").next().expect("a checkpoint record");
    let last_ckpt = of("checkpoint").next_back().unwrap();
    let mut v = vec![
        point(
            format!("inside transition {t}'s first data payload"),
            (data.at + data.end) / 2,
            Wait::Now,
        ),
        point(
            format!("after transition {t}'s first checkpoint"),
            first_ckpt.end,
            Wait::Settle,
        ),
        point(
            format!("after transition {t}'s last checkpoint"),
            last_ckpt.end,
            Wait::Settle,
        ),
        point(
            format!("inside transition {t}'s snapshot-end"),
            (end.at + end.end) / 2,
            Wait::Settle,
        ),
        point(
            format!("right after transition {t}'s snapshot-end, settled"),
            end.end,
            Wait::Settle,
        ),
        point(
            format!("right after transition {t}'s snapshot-end, at once"),
            end.end,
            Wait::Now,
        ),
    ];
    if let Some(info) = of("snapshot-info").next() {
        v.push(point(
            format!("before transition {t}'s snapshot-info"),
            info.at,
            Wait::Settle,
        ));
    }
    v
}

/// Every kill point of the stream whose records are `recs` (`len` bytes).
fn points(recs: &[Rec], len: u64) -> Vec<Point> {
    let ends: Vec<&Rec> = recs.iter().filter(|r| r.kind == "snapshot-end").collect();
    assert_eq!(
        ends.len(),
        DAYS.len() - 1,
        "one snapshot-end per transition"
    );
    let mut v = Vec::new();
    let mut start = recs[0].at;
    for (t, end) in ends.iter().enumerate() {
        let inside: Vec<&Rec> = recs
            .iter()
            .filter(|r| r.at >= start && r.at < end.at)
            .collect();
        v.extend(transition_points(t, &inside, end));
        start = end.end;
    }
    for pct in (10..100).step_by(10) {
        v.push(point(
            format!("at once after {pct}% of the stream"),
            len * pct / 100,
            Wait::Now,
        ));
    }
    v.push(point("the whole stream, input open", len, Wait::Settle));
    v.push(Point {
        close: true,
        ..point("the whole stream, input closed, at once", len, Wait::Now)
    });
    v
}

fn wait_until(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the replica and its state, and seeds it with mon.
fn fresh_replica(r: &Path, seed: &Path) {
    let name = r.display().to_string();
    for suffix in ["", ".lock", ".tmp", ".hashes", ".hashes.pieces"] {
        let _ = std::fs::remove_file(format!("{name}.blkdelta{suffix}"));
    }
    let _ = std::fs::remove_file(r);
    assert_ok(&receive_file(seed, r, &[]), "the seed");
}

/// Feeds the receiver what `p` says and kills it.
fn kill_at(r: &Path, bytes: &[u8], p: &Point, what: &str) {
    let mut rx = Receiver::start(r, &CKPT);
    rx.feed(&bytes[..p.fed as usize]);
    if p.close {
        drop(rx.stdin.take());
    }
    if p.wait == Wait::Settle {
        wait_until(
            || {
                rx.assert_running(what);
                rx.unread() == 0
            },
            what,
        );
        std::thread::sleep(Duration::from_millis(400));
    }
    let _ = rx.child.kill();
    let exit = rx.child.wait().unwrap();
    if p.close {
        assert!(
            exit.signal() == Some(9) || exit.success(),
            "{what}: {exit:?}"
        );
    } else {
        assert_eq!(
            exit.signal(),
            Some(9),
            "{what}: not killed mid-stream: {exit:?}"
        );
    }
}

#[test]
fn sigkill_at_many_points_leaves_a_clean_replica_that_tells_the_truth() {
    if !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let src = Source::week(2);
    let seed = src.s.path("mon.bd");
    send_to_file(&src.spec("mon"), &seed);
    let stream = src.s.path("mon-fri.bd");
    send_to_file(&src.spec("mon..fri"), &stream);
    let bytes = std::fs::read(&stream).unwrap();
    let recs = records(&stream).1;
    let ends: Vec<u64> = recs
        .iter()
        .filter(|r| r.kind == "snapshot-end")
        .map(|r| r.end)
        .collect();
    let points = points(&recs, bytes.len() as u64);
    assert!(points.len() >= 30, "only {} kill points", points.len());

    let r = src.s.path("r.qcow2");
    let (mut in_progress, mut resumed) = (0, 0);
    for p in &points {
        let what = format!("kill {} (byte {} of {})", p.what, p.fed, bytes.len());
        fresh_replica(&r, &seed);
        kill_at(&r, &bytes, p, &what);
        // mon, and each snapshot whose snapshot-end the receiver was given.
        let reached = 1 + ends.iter().filter(|&&e| e <= p.fed).count();
        let t = truth(&src, &r, reached, &what);
        eprintln!("{what}: {t:?}");
        let resume = matches!(t, Truth::InProgress { .. }) && in_progress % 2 == 0;
        if matches!(t, Truth::InProgress { .. }) {
            in_progress += 1;
        }
        finish(&src, &r, &stream, &t, resume, &what);
        resumed += usize::from(resume);
    }
    assert!(resumed >= 2, "only {resumed} kills left a resumable apply");
}
