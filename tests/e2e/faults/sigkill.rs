//! The receiver SIGKILLed at many points of a multi-snapshot stream.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::time::{Duration, Instant};

use super::fixture::Fixture;
use super::truth::Truth;
use super::{CKPT, FRAME};
use crate::common::{have, status_text, Receiver};

/// What the test waits for between feeding and killing.
pub enum Wait {
    /// Kill at once: the receiver is busy with what it was just given.
    Now,
    /// Until the receiver has read everything fed and had time to apply it.
    Settle,
    /// Until `status` satisfies the predicate (the receiver recorded something).
    Status(fn(&str) -> bool),
    /// Until `status` satisfies the predicate and the receiver has read everything fed, then
    /// time to apply it (a loaded machine may take a while to record the first).
    SettleUntil(fn(&str) -> bool),
}

pub struct KillPoint {
    what: String,
    fed: u64,
    /// Close stdin after feeding (the receiver may finish before the kill).
    close: bool,
    checkpoints: bool,
    wait: Wait,
    /// What status must say after the kill, when the point determines it.
    expect: Option<Truth>,
    /// The point waited for a checkpoint: the durable offset is above 0.
    checkpointed: bool,
}

/// A point fed `fed` bytes, stdin left open, with checkpoints every MiB when `checkpoints`.
fn point(
    what: impl Into<String>,
    fed: u64,
    checkpoints: bool,
    wait: Wait,
    expect: Option<Truth>,
) -> KillPoint {
    KillPoint {
        what: what.into(),
        fed,
        close: false,
        checkpoints,
        wait,
        expect,
        checkpointed: false,
    }
}

impl KillPoint {
    /// The point waits for a checkpoint: the durable offset must be above 0.
    fn checkpointed(self) -> Self {
        KillPoint {
            checkpointed: true,
            ..self
        }
    }

    /// Stdin is closed after feeding.
    fn closing(self) -> Self {
        KillPoint {
            close: true,
            ..self
        }
    }
}

pub fn polls(mut cond: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn holds(name: &'static str) -> fn(&str) -> bool {
    match name {
        "s1" => |st| st.contains("holds snapshot 's1'"),
        "s2" => |st| st.contains("holds snapshot 's2'"),
        "s3" => |st| st.contains("holds snapshot 's3'"),
        _ => unreachable!(),
    }
}

/// `status` says the transition s0 -> s1 is under way.
fn s1_under_way(st: &str) -> bool {
    st.contains("'s0' -> 's1'")
}

/// `status` says the transition to `name` is under way past its first checkpoint.
fn past_a_checkpoint(name: &'static str) -> fn(&str) -> bool {
    match name {
        "s1" => |st| st.contains("'s0' -> 's1'") && !st.contains("durable below offset 0)"),
        "s3" => |st| st.contains("'s2' -> 's3'") && !st.contains("durable below offset 0)"),
        _ => unreachable!(),
    }
}

#[test]
pub fn sigkill_at_many_points_of_a_multi_snapshot_stream() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    let ends = f.ends();
    let len = f.len();
    // The receiver applies records only once a checkpoint (or snapshot-end) record vouches
    // for them, and makes its durable offset advance only at checkpoint records.
    let first_ckpt = f.rec(0, "checkpoint", 0);
    let last_ckpt = f.rec(2, "checkpoint", 0);
    assert!(
        f.rec(0, "data", 0).at + 300_000 < first_ckpt.at,
        "the first data payload precedes the first checkpoint record"
    );
    let mut points = vec![
        // No checkpoint record seen: the records read are held back, nothing is written
        // and nothing started (the replica is exactly s0).
        point(
            "inside transition 0, in its first data payload, before any checkpoint",
            f.rec(0, "data", 0).at + 300_000,
            true,
            Wait::Settle,
            Some(Truth::Holds(0)),
        ),
        // Every record before it is read, but none is applied: the checkpoint that would
        // vouch for them is not verified yet.
        point(
            "inside transition 0's first checkpoint record",
            first_ckpt.at + FRAME + 5,
            true,
            Wait::Settle,
            Some(Truth::Holds(0)),
        ),
        point(
            "inside transition 0, after a checkpoint",
            first_ckpt.end + 1000,
            true,
            Wait::Status(past_a_checkpoint("s1")),
            Some(Truth::InProgress(1)),
        )
        .checkpointed(),
        point(
            "just before s1's snapshot-end",
            ends[0].at,
            false,
            Wait::SettleUntil(s1_under_way),
            Some(Truth::InProgress(1)),
        ),
        point(
            "inside s1's snapshot-end frame header",
            ends[0].at + FRAME / 2,
            true,
            Wait::SettleUntil(s1_under_way),
            Some(Truth::InProgress(1)),
        ),
        point(
            "inside s1's snapshot-end body",
            ends[0].at + FRAME + (ends[0].end - ends[0].at - FRAME) / 2,
            false,
            Wait::SettleUntil(s1_under_way),
            Some(Truth::InProgress(1)),
        ),
        point(
            "right after s1's snapshot-end",
            ends[0].end,
            false,
            Wait::Status(holds("s1")),
            Some(Truth::Holds(1)),
        ),
        point(
            "right after s2's snapshot-end",
            ends[1].end,
            true,
            Wait::Status(holds("s2")),
            Some(Truth::Holds(2)),
        ),
        point(
            "inside the last transition, after a checkpoint",
            last_ckpt.end + 300_000,
            true,
            Wait::Status(past_a_checkpoint("s3")),
            Some(Truth::InProgress(3)),
        )
        .checkpointed(),
        point(
            "everything but the end record",
            f.end_record().at,
            false,
            Wait::Status(holds("s3")),
            Some(Truth::Holds(3)),
        ),
        point(
            "the whole stream, stdin still open",
            len,
            true,
            Wait::Status(holds("s3")),
            Some(Truth::Holds(3)),
        ),
        point(
            "the whole stream, stdin closed, killed at once",
            len,
            false,
            Wait::Now,
            None,
        )
        .closing(),
    ];
    for pct in [20, 45, 70, 95] {
        let what = format!("at once after {pct}% of the stream");
        points.push(point(what, len * pct / 100, pct % 10 == 5, Wait::Now, None));
    }

    let mut resumed = 0;
    for p in &points {
        if kill_at(&f, p) {
            resumed += 1;
        }
    }
    assert!(resumed >= 3, "only {resumed} kills left a resumable apply");
}

/// Feeds the receiver what `p` says, kills it, checks what it left, and finishes the apply
/// (resuming a copy when a token allows); whether a resume token was used.
fn kill_at(f: &Fixture, p: &KillPoint) -> bool {
    let len = f.len();
    let what = format!("kill {} (byte {} of {len})", p.what, p.fed);
    let replica = f.fresh_replica("r.raw");
    let mut rx = Receiver::start(&replica, if p.checkpoints { &CKPT[..] } else { &[] });
    rx.feed(&f.bytes[..p.fed as usize]);
    if p.close {
        drop(rx.stdin.take());
    }
    wait_for(&mut rx, &p.wait, &replica, &what);
    let _ = rx.child.kill();
    let exit = rx.child.wait().unwrap();
    if p.close {
        assert!(
            exit.signal() == Some(9) || exit.success(),
            "{what}: {exit:?}"
        );
    } else {
        assert_eq!(exit.signal(), Some(9), "{what}: not killed mid-stream");
    }
    drop(rx);

    let (truth, durable, token) = f.truth_full(&replica, &[], Some(p.fed));
    if let Some(want) = p.expect {
        assert_eq!(truth, want, "{what}");
    }
    if p.close && exit.success() {
        assert_eq!(truth, Truth::Holds(3), "{what}: exited 0");
    }
    if p.checkpointed {
        assert!(durable > 0, "{what}: no checkpoint recorded");
    }
    if !matches!(p.wait, Wait::Now) {
        // The receiver read everything fed: exactly what its verified points vouch for
        // was written, and nothing it held back.
        f.assert_image_before(&replica, p.fed, &what);
    }
    let resumed = if let (Truth::InProgress(_), Some(token)) = (truth, &token) {
        // Resume a copy from the token; finish the original by re-applying the stream.
        let copy = f.copy_replica(&replica, "resumed.raw");
        f.resume_gives_s3(&copy, &[], token);
        true
    } else {
        assert!(
            !matches!(truth, Truth::InProgress(_)),
            "{what}: in progress without a resume token"
        );
        false
    };
    f.reapply_gives_s3(&replica, &[]);
    resumed
}

/// Waits as `wait` says, the receiver running all the while.
fn wait_for(rx: &mut Receiver, wait: &Wait, replica: &Path, what: &str) {
    match wait {
        Wait::Now => {}
        Wait::Settle => {
            polls(
                || {
                    rx.assert_running(what);
                    rx.unread() == 0
                },
                what,
            );
            std::thread::sleep(Duration::from_millis(300));
        }
        Wait::Status(pred) => polls(
            || {
                rx.assert_running(what);
                pred(&status_text(replica, &[]))
            },
            what,
        ),
        Wait::SettleUntil(pred) => {
            polls(
                || {
                    rx.assert_running(what);
                    rx.unread() == 0 && pred(&status_text(replica, &[]))
                },
                what,
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }
}
