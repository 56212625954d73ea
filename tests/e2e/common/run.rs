//! Running blkdelta (alone, in a directory, with an environment, through a real pipe) and
//! checking what it says.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use super::images::{spec, Scratch};

/// The blkdelta binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkdelta"))
}

/// Runs a command, panicking with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The text of a path argument.
pub fn arg(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A command's stderr as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs blkdelta with arguments; returns the output whatever the status.
pub fn blkdelta(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// Runs blkdelta in `dir` (so relative names resolve there); returns the output.
pub fn blkdelta_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap()
}

/// Runs blkdelta with extra environment variables.
pub fn blkdelta_env(env: &[(&str, &Path)], args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.args(args).output().unwrap()
}

/// Runs blkdelta and panics unless it succeeds.
pub fn blkdelta_ok(args: &[&str]) -> Output {
    let out = blkdelta(args);
    assert_ok(&out, &format!("blkdelta {args:?}"));
    out
}

/// Asserts that a command succeeded, naming `what` and its stderr otherwise.
pub fn assert_ok(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed ({:?}): {}",
        out.status.code(),
        stderr(out)
    );
}

/// The only line of stderr, which must start with `blkdelta:`.
pub fn one_error_line(out: &Output) -> String {
    let err = stderr(out);
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("blkdelta: "), "{err}");
    err
}

/// The failure contract: exit status 1 and one line on stderr starting `blkdelta:`.
pub fn one_line_failure(out: &Output, what: &str) -> String {
    let err = stderr(out);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{what}: exit {:?}, stderr: {err}",
        out.status
    );
    assert!(err.starts_with("blkdelta: "), "{what}: {err}");
    assert!(err.ends_with('\n'), "{what}: {err:?}");
    assert_eq!(err.lines().count(), 1, "{what}: multi-line error:\n{err}");
    assert!(!err.contains("panicked"), "{what}: {err}");
    err
}

/// A refusal: [`one_line_failure`] naming each of `expect` (the switch that overrides it, the
/// name of what is refused).
pub fn assert_refused(out: &Output, expect: &[&str], what: &str) -> String {
    let err = one_line_failure(out, what);
    for e in expect {
        assert!(err.contains(e), "{what}: no {e:?} in: {err}");
    }
    err
}

/// `blkdelta send -q SOURCE -o STREAM`; returns the stream size.
pub fn send_to_file(source: &str, stream: &Path) -> u64 {
    send_file(&[source], stream)
}

/// `blkdelta send -q SEND_ARGS... -o STREAM`; returns the stream's size.
pub fn send_file(send_args: &[&str], stream: &Path) -> u64 {
    // Tests send to the same file again on purpose: --force replaces it.
    let mut args = vec!["send", "-q", "--force", "-o", arg(stream)];
    args.extend_from_slice(send_args);
    blkdelta_ok(&args);
    std::fs::metadata(stream).unwrap().len()
}

/// `blkdelta receive -q -i STREAM TARGET [extra...]`.
pub fn receive_file(stream: &Path, target: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["receive", "-q", "-i", arg(stream), arg(target)];
    args.extend_from_slice(extra);
    blkdelta(&args)
}

/// `blkdelta ARGS | blkdelta receive -q TARGET RECV_ARGS` through a real pipe, both run in `dir`
/// when given; returns the sender's and the receiver's outputs.
pub fn run_pipe(
    dir: Option<&Path>,
    args: &[&str],
    target: &Path,
    recv_args: &[&str],
) -> (Output, Output) {
    let command = || {
        let mut c = Command::new(bin());
        if let Some(d) = dir {
            c.current_dir(d);
        }
        c
    };
    let mut sender = command()
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = sender.stdout.take().unwrap();
    let recv = command()
        .args(["receive", "-q"])
        .arg(target)
        .args(recv_args)
        .stdin(stdout)
        .output()
        .unwrap();
    (sender.wait_with_output().unwrap(), recv)
}

/// `blkdelta send -q SEND_ARGS | blkdelta receive -q TARGET RECV_ARGS` through a real pipe,
/// run in `dir` when given; returns the receiver's output. A receiver that refuses closes the
/// pipe, and the sender then fails on a broken pipe: the sender must succeed only when the
/// receiver did.
pub fn pipe_args_in(
    dir: Option<&Path>,
    send_args: &[&str],
    target: &Path,
    recv_args: &[&str],
) -> Output {
    let args: Vec<&str> = ["send", "-q"].iter().chain(send_args).copied().collect();
    let (sent, recv) = run_pipe(dir, &args, target, recv_args);
    assert!(
        sent.status.success() || !recv.status.success(),
        "send {send_args:?} failed: {}",
        stderr(&sent)
    );
    recv
}

/// [`pipe_args_in`] in the current directory.
pub fn pipe_args(send_args: &[&str], target: &Path, recv_args: &[&str]) -> Output {
    pipe_args_in(None, send_args, target, recv_args)
}

/// [`pipe_args`], asserting that the receiver succeeded.
pub fn pipe_args_ok(send_args: &[&str], target: &Path, recv_args: &[&str]) {
    let out = pipe_args(send_args, target, recv_args);
    assert_ok(&out, &format!("receive after send {send_args:?}"));
}

/// `blkdelta send SOURCE | blkdelta receive TARGET` through a real pipe; both must succeed.
pub fn pipe(source: &str, target: &Path, extra: &[&str]) {
    pipe_args_ok(&[source], target, extra);
}

/// `blkdelta SEND_ARGS | blkdelta receive -q TARGET RECV_EXTRA` through a real pipe; returns
/// the receiver's output after checking that the sender succeeded.
pub fn send_pipe_receive(send_args: &[&str], target: &Path, recv_extra: &[&str]) -> Output {
    let (sent, recv) = run_pipe(None, send_args, target, recv_extra);
    assert_ok(&sent, &format!("send {send_args:?}"));
    recv
}

/// The digest `blkdelta checksum` prints for an image.
pub fn checksum(spec: &str, extra: &[&str]) -> String {
    checksum_with_note(spec, extra).0
}

/// `blkdelta checksum SPEC`: the digest, and the note on stderr saying how it was found.
pub fn checksum_with_note(spec: &str, extra: &[&str]) -> (String, String) {
    let mut args = vec!["checksum", spec];
    args.extend_from_slice(extra);
    let out = blkdelta_ok(&args);
    let text = String::from_utf8(out.stdout).unwrap();
    let digest = text.split_whitespace().next().unwrap().to_string();
    (digest, String::from_utf8(out.stderr).unwrap())
}

/// What `blkdelta status REPLICA [state...]` prints; it must succeed.
pub fn status_text(replica: &Path, state: &[&str]) -> String {
    let mut args = vec!["status", arg(replica)];
    args.extend_from_slice(state);
    String::from_utf8(blkdelta_ok(&args).stdout).unwrap()
}

/// Whether `blkdelta status` says the replica holds snapshot `name`.
pub fn holds(replica: &Path, name: &str) -> bool {
    status_text(replica, &[]).contains(&format!("holds snapshot '{name}'"))
}

/// `blkdelta status TARGET` with extra environment variables, whatever its exit: the exit
/// code, and stdout followed by stderr.
pub fn status_env(target: &Path, env: &[(&str, &Path)]) -> (Option<i32>, String) {
    let out = blkdelta_env(env, &["status", arg(target)]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A replica `r.raw` seeded with `IMG@s0`, and the stream `IMG@s0..s1` in `s0s1.bd`: where
/// many tests of what a replica refuses start.
pub fn seeded_with_s0_s1(s: &Scratch, img: &Path) -> (PathBuf, PathBuf) {
    let replica = s.path("r.raw");
    pipe(&spec(img, "s0"), &replica, &[]);
    let inc = s.path("s0s1.bd");
    send_to_file(&spec(img, "s0..s1"), &inc);
    (replica, inc)
}
