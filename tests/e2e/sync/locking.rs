//! One sync at a time per source and per target: while a cycle runs (slowed down by a remote
//! blkdelta that takes its time to answer), another of the same source, or into the same
//! target, is refused naming `--wait`, and with `--wait` it waits for the first and succeeds.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::fixture::{
    assert_replica_is, assert_replica_is_newest, field, have_qemu, source, sync, sync_json,
};
use crate::common::{arg, assert_refused, bin, have_ssh, write_text, Reaped, Scratch, Sshd};

/// A remote blkdelta that, asked for a status, first touches `started` and sleeps 2 s.
fn slow_blkdelta(s: &Scratch, started: &Path) -> PathBuf {
    let script = s.path("slow-blkdelta");
    write_text(
        &script,
        &format!(
            "#!/bin/sh\nif [ \"$1\" = status ]; then : > '{}'; sleep 2; fi\nexec '{}' \"$@\"\n",
            started.display(),
            bin().display()
        ),
    );
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn a_second_sync_of_the_same_end_is_refused_or_waits() {
    if !have_qemu() || !have_ssh() {
        return;
    }
    let s = Scratch::new();
    let sshd = Sshd::start(&s);
    let img = source(&s, "32M");
    let started = s.path("started");
    let slow = slow_blkdelta(&s, &started);
    let (remote, here) = (s.path("remote.raw"), s.path("here.raw"));
    let mut first = Reaped(
        Command::new(bin())
            .args(["sync", "--json", "--keep-source", "9"])
            .args(["--ssh-command", &sshd.ssh_command()])
            .args(["--remote-blkdelta", arg(&slow)])
            .arg(&img)
            .arg(format!("127.0.0.1:{}", remote.display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    while !started.exists() {
        assert!(Instant::now() < deadline, "the first sync never asked");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The same source into another target, and another source into the same target.
    let out = sync(&[arg(&img), arg(&here)]);
    assert_refused(
        &out,
        &["another blkdelta sync", "--wait"],
        "the same source",
    );
    let other = s.qcow2("other.qcow2", "16M", "");
    let out = sync(&[
        "--ssh-command",
        &sshd.ssh_command(),
        arg(&other),
        &format!("127.0.0.1:{}", remote.display()),
    ]);
    assert_refused(
        &out,
        &["another blkdelta sync", "--wait"],
        "the same target",
    );
    assert!(!here.exists(), "a refused sync received");
    // --wait: it starts once the first has ended.
    let v = sync_json(&["--wait", "--keep-source", "9", arg(&img), arg(&here)]);
    let ended = first.try_wait().unwrap();
    assert!(ended.is_some_and(|e| e.success()), "the first: {ended:?}");
    let mut text = String::new();
    first
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    let first: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_replica_is(&s, &img, field(&first, "to").unwrap(), &remote);
    assert_ne!(field(&v, "to"), field(&first, "to"));
    assert_replica_is_newest(&s, &img, &here);
}
