//! Streams cut short, at every kind of place.

use std::path::Path;

use super::fixture::Fixture;
use super::truth::Truth;
use super::{CKPT, FRAME, PREAMBLE};
use crate::common::{
    blkdelta, have, one_line_failure, receive_file, send_pipe_receive, state_of, status_text, Rec,
};

#[test]
fn truncated_streams_fail_and_leave_a_truthful_recoverable_replica() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    let len = f.len();
    let h = f.header_end();
    // Inside the preamble, the header's frame header and its body, every 5% of the stream,
    // and at the edges of the snapshot-end, checkpoint and end records: inside the frame
    // header, just past it, one byte short of the end, at the end.
    let mut cuts: Vec<u64> = vec![
        0,
        7,
        PREAMBLE,
        PREAMBLE + FRAME / 2,
        PREAMBLE + FRAME + 8,
        h / 2,
        h - 1,
        h,
    ];
    cuts.extend((1..20).map(|i| len * i / 20));
    let edges = |r: &Rec| [r.at + FRAME / 2, r.at + FRAME + 1, r.end - 1, r.end];
    for e in f.ends() {
        cuts.extend(edges(e));
    }
    for t in 0..3 {
        cuts.extend(edges(f.rec(t, "checkpoint", 0)));
    }
    let end = f.end_record();
    cuts.extend([end.at + FRAME / 2, end.at + FRAME, len - 1]);
    cuts.sort_unstable();
    cuts.dedup();
    let mut resumed = 0;
    for (i, &cut) in cuts.iter().enumerate() {
        let what = format!("cut at byte {cut} of {len}");
        let replica = f.fresh_replica("r.raw");
        let part = f.s.path("part.bd");
        std::fs::write(&part, &f.bytes[..cut as usize]).unwrap();
        // Frequent checkpoints (slow: a sync per MiB) where the resume token is used.
        let extra: &[&str] = if i % 3 == 0 { &CKPT } else { &[] };
        let out = receive_file(&part, &replica, extra);
        let err = one_line_failure(&out, &what);
        assert!(
            err.contains(&format!("truncated after {cut} bytes")),
            "{what}: {err}"
        );
        let (truth, _, token) = f.truth_full(&replica, &[], Some(cut));
        assert_eq!(truth, f.expected_after(cut), "{what}");
        // Records after the last verified point before the cut were held back.
        f.assert_image_before(&replica, cut, &what);
        if let (Truth::InProgress(_), Some(token)) = (truth, &token) {
            assert!(err.contains("marked in progress"), "{what}: {err}");
            if i % 3 == 0 {
                let copy = f.copy_replica(&replica, "resumed.raw");
                f.resume_gives_s3(&copy, &[], token);
                resumed += 1;
            }
        }
        f.reapply_gives_s3(&replica, &[]);
    }
    assert!(resumed >= 3, "only {resumed} resumes tried");
}
#[test]
fn the_in_progress_hints_work_with_a_state_elsewhere() {
    if !have("qemu-img") {
        return;
    }
    let f = Fixture::new("1.1", 0);
    let state_file = f.s.path("elsewhere.state");
    let state = ["--state", state_file.to_str().unwrap()];
    let replica = f.s.path("r.raw");
    f.seed_into(&replica, &state);
    let part = f.s.path("part.bd");
    // Inside transition 1, after a checkpoint record vouched for some of its records.
    let cut = f.rec(1, "checkpoint", 0).end + 1000;
    std::fs::write(&part, &f.bytes[..cut as usize]).unwrap();
    let mut extra = state.to_vec();
    extra.extend_from_slice(&CKPT);
    let err = one_line_failure(&receive_file(&part, &replica, &extra), "truncated");
    assert_eq!(f.truth(&replica, &state, Some(cut)), Truth::InProgress(2));
    assert!(!state_of(&replica).exists(), "a state beside the replica");
    // The error tells the user to run `blkdelta status ...`: that command must work as printed.
    let hint = err
        .split("token '")
        .nth(1)
        .and_then(|r| r.split("' prints").next())
        .unwrap_or_else(|| panic!("no status hint in: {err}"));
    let args: Vec<&str> = hint.split_whitespace().skip(1).collect();
    let out = blkdelta(&args);
    assert!(
        out.status.success(),
        "the hinted `{hint}` fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = status_text(&replica, &state);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        st,
        "the hinted `{hint}` reads another state"
    );
    // So must status's "or:" line, SOURCE being the image: it resumes to s3.
    let or = st
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("or: "))
        .unwrap_or_else(|| panic!("no 'or:' line in:\n{st}"));
    let (send_cmd, recv_cmd) = or
        .split_once(" | ")
        .unwrap_or_else(|| panic!("no pipe in: {or}"));
    let spec = f.spec("s0..s3");
    let send_args: Vec<&str> = send_cmd
        .split_whitespace()
        .skip(1)
        .map(|a| if a == "SOURCE" { spec.as_str() } else { a })
        .collect();
    assert!(send_args.contains(&spec.as_str()), "no SOURCE in: {or}");
    let recv_args: Vec<&str> = recv_cmd.split_whitespace().skip(1).collect();
    assert_eq!(
        recv_args[..2],
        ["receive", replica.to_str().unwrap()],
        "{or}"
    );
    assert!(recv_args.contains(&"--state"), "{or}");
    let out = send_pipe_receive(&send_args, Path::new(recv_args[1]), &recv_args[2..]);
    assert!(
        out.status.success(),
        "the hinted `{or}` fails: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(f.truth(&replica, &state, None), Truth::Holds(3));
}
