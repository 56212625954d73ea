//! The rough edges a newcomer hit in the first hours: what the commands say and leave behind
//! when used slightly wrong, or watched from cron, a terminal or a log.

use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::common::{
    arg, assert_ok, assert_refused, bin, blkdelta, blkdelta_ok, have, io, one_line_failure,
    pipe_args, random, receive_file, records_of, run_pipe, send_to_file, spec, status_text, stderr,
    truncated_copy, Receiver, Scratch,
};

/// A 16 MiB image with snapshots s1 (6 MiB of random data: a stream larger than a pipe holds)
/// and s2 (and 1 MiB of 0x02 after it).
fn two_snapshots(s: &Scratch) -> PathBuf {
    s.history(
        "vm.qcow2",
        "16M",
        "",
        &[
            ("s1", vec![random(0, 6, 7)]),
            ("s2", vec![io("write -P 0x2 8M 1M")]),
        ],
    )
}

/// `script -qec CMD /dev/null`: CMD run with a pseudo-terminal as its stdin, stdout and
/// stderr; returns what the terminal showed and the exit status.
fn on_a_terminal(cmd: &str) -> (String, Option<i32>) {
    let out = Command::new("script")
        .args(["-qec", cmd, "/dev/null"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code(),
    )
}

#[test]
fn send_and_receive_leave_one_summary_line_for_logs_unless_quiet() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let stream = s.path("s1.bd");
    let out = blkdelta(&["send", &spec(&img, "s1"), "-o", arg(&stream)]);
    assert_ok(&out, "send");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("sent 6.00 MiB of data in 6 records"),
        "{err}"
    );
    assert!(
        err.contains(" s (") && err.trim_end().ends_with("/s)"),
        "{err}"
    );
    let replica = s.path("r.raw");
    let out = blkdelta(&["receive", "-i", arg(&stream), arg(&replica)]);
    assert_ok(&out, "receive");
    let err = stderr(&out);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("received 6.00 MiB of data"), "{err}");
    assert!(err.contains("replica holds 's1'"), "{err}");
    let again = s.path("s1..s2.bd");
    let out = blkdelta(&["send", "-q", &spec(&img, "s1..s2"), "-o", arg(&again)]);
    assert!(out.stderr.is_empty(), "{}", stderr(&out));
}

#[test]
fn a_local_send_receive_pipe_on_a_terminal_shows_one_progress_bar() {
    if !have("qemu-img") || !have("script") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let replica = s.path("r.raw");
    let b = bin();
    let cmd = format!(
        "{} send {} | {} receive {}",
        b.display(),
        spec(&img, "s2"),
        b.display(),
        replica.display()
    );
    let (screen, code) = on_a_terminal(&cmd);
    assert_eq!(code, Some(0), "{screen}");
    assert!(!screen.contains("receive ["), "two bars: {screen}");
    assert!(screen.contains("sent 7.00 MiB of data"), "{screen}");
    assert!(screen.contains("received 7.00 MiB of data"), "{screen}");
}

#[test]
fn a_receive_into_a_directory_says_it_is_a_directory_and_leaves_nothing() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let dir = s.path("replicas");
    std::fs::create_dir(&dir).unwrap();
    let out = pipe_args(&[&spec(&img, "s1")], &dir, &[]);
    let err = one_line_failure(&out, "a receive into a directory");
    assert!(err.contains("is a directory"), "{err}");
    assert!(!err.contains("not a replica"), "{err}");
    let left: Vec<String> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("replicas."))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
}

#[test]
fn a_refused_first_receive_leaves_no_lock_file() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let target = s.path("data.raw");
    std::fs::write(&target, [7u8; 4096]).unwrap();
    let out = pipe_args(&[&spec(&img, "s1")], &target, &[]);
    assert_refused(&out, &["--overwrite"], "a seed onto unknown data");
    let names: Vec<String> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("data.raw."))
        .collect();
    assert!(names.is_empty(), "left behind: {names:?}");
}

#[test]
fn a_target_in_a_missing_directory_is_refused_not_created() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let target = s.path("typo/vm.raw");
    let out = pipe_args(&[&spec(&img, "s1")], &target, &[]);
    let err = one_line_failure(&out, "a target in a missing directory");
    assert!(err.contains("does not exist"), "{err}");
    assert!(!s.path("typo").exists(), "the directory was created");
}

#[test]
fn undo_with_a_full_stream_says_undo_needs_an_incremental() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let replica = s.path("r.raw");
    let undo = s.path("u.bd");
    let out = pipe_args(&[&spec(&img, "s1")], &replica, &["--undo", arg(&undo)]);
    let err = one_line_failure(&out, "--undo with a full stream");
    assert!(err.contains("--undo takes an incremental stream"), "{err}");
    assert!(!err.contains("one snapshot at a time"), "{err}");
}

#[test]
fn a_busy_replica_names_the_receive_holding_it() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let replica = s.path("r.raw");
    let stream = s.path("s1.bd");
    send_to_file(&spec(&img, "s1"), &stream);
    let bytes = std::fs::read(&stream).unwrap();
    let mut first = Receiver::start(&replica, &[]);
    first.feed(&bytes[..bytes.len() / 2]);
    // Once it holds the replica's lock, the lock file names it.
    let lock = PathBuf::from(format!("{}.blkdelta.lock", replica.display()));
    let pid = first.child.0.id();
    for _ in 0..500 {
        if std::fs::read_to_string(&lock).is_ok_and(|t| t.trim() == pid.to_string()) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let out = receive_file(&stream, &replica, &[]);
    let err = one_line_failure(&out, "a second receive");
    assert!(err.contains(&format!("pid {pid}")), "{err}");
    assert!(err.contains("wait for it"), "{err}");
    assert!(!err.contains("apply the same stream again"), "{err}");
    first.feed(&bytes[bytes.len() / 2..]);
    assert_ok(&first.finish(), "the first receive");
}

#[test]
fn a_refused_stream_in_a_pipe_prints_one_line_and_the_sender_fails_quietly() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let replica = s.path("r.raw");
    // Not a replica: the seed (6 MiB, more than the pipe holds) is refused.
    std::fs::write(&replica, [1u8; 4096]).unwrap();
    let (sent, recv) = run_pipe(None, &["send", &spec(&img, "s1")], &replica, &[]);
    one_line_failure(&recv, "the refused incremental");
    assert_ne!(sent.status.code(), Some(0), "the sender succeeded");
    assert!(
        sent.stderr.is_empty(),
        "the sender spoke: {}",
        stderr(&sent)
    );
}

#[test]
fn send_o_refuses_to_replace_a_file_without_force() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let stream = s.path("keep.bd");
    std::fs::write(&stream, b"precious").unwrap();
    let out = blkdelta(&["send", "-q", &spec(&img, "s1"), "-o", arg(&stream)]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--force"), "{}", stderr(&out));
    assert_eq!(std::fs::read(&stream).unwrap(), b"precious");
    let out = blkdelta(&[
        "send",
        "-q",
        "--force",
        &spec(&img, "s1"),
        "-o",
        arg(&stream),
    ]);
    assert_ok(&out, "send --force -o");
    assert!(std::fs::read(&stream).unwrap().starts_with(b"\x89BLK"));
}

#[test]
fn dump_refuses_a_terminal_on_stdin() {
    if !have("script") {
        return;
    }
    let (screen, code) = on_a_terminal(&format!("{} dump", bin().display()));
    assert_eq!(code, Some(2), "{screen}");
    assert!(
        screen.contains("refusing to read a stream from a terminal"),
        "{screen}"
    );
}

#[test]
fn status_json_carries_the_resume_token_and_the_replica_check() {
    if !have("qemu-img") {
        return;
    }
    let s = Scratch::new();
    let img = two_snapshots(&s);
    let replica = s.path("r.raw");
    let stream = s.path("s2.bd");
    send_to_file(&spec(&img, "s2"), &stream);
    let cut = s.path("cut.bd");
    let checkpoint = records_of(&stream, "checkpoint")[1];
    truncated_copy(&stream, checkpoint + 100, &cut);
    let out = receive_file(&cut, &replica, &["--checkpoint-bytes", "1048576"]);
    assert_eq!(out.status.code(), Some(1));
    let out = blkdelta_ok(&["status", "--json", arg(&replica)]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["replica"], "unchanged", "{v}");
    let token = v["resume_token"].as_str().unwrap_or_else(|| panic!("{v}"));
    assert!(token.starts_with("bd1-"), "{v}");
    assert!(status_text(&replica, &[]).contains(token));
}
