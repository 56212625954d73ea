//! Sync over a real sshd on 127.0.0.1: pushed to `127.0.0.1:/path` and pulled from
//! `127.0.0.1:/path/vm.qcow2`, into raw and qcow2 replicas (ten cycles pushed into a qcow2
//! replica, three for the others); a remote
//! failure comes back as one line naming the host.

use std::path::Path;

use super::fixture::{
    assert_replica_is_newest, field, guest_writes, have_qemu, names, replica_snapshots, source,
    sync, sync_json,
};
use crate::common::{arg, bin, have_ssh, one_line_failure, Scratch, Sshd};

/// `--ssh-command` and `--remote-blkdelta` reaching the sshd and this blkdelta, then `args`.
fn remote_args(sshd: &Sshd, args: &[&str]) -> Vec<String> {
    let mut all = vec![
        "--ssh-command".to_string(),
        sshd.ssh_command(),
        "--remote-blkdelta".to_string(),
        bin().display().to_string(),
    ];
    all.extend(args.iter().map(|a| a.to_string()));
    all
}

/// `127.0.0.1:PATH`.
fn there(p: &Path) -> String {
    format!("127.0.0.1:{}", p.display())
}

/// `count` cycles from `from` into `to` (either may be remote) of the source `img`, with
/// `--keep 2` for a qcow2 replica; after each, `replica` (the local path of `to`) equals the
/// newest snapshot.
fn cycles(
    count: u64,
    (sshd, s): (&Sshd, &Scratch),
    img: &Path,
    (from, to): (&str, &str),
    replica: &Path,
) {
    let qcow2 = to.ends_with(".qcow2");
    let mut previous: Option<String> = None;
    for step in 1..=count {
        guest_writes(s, img, step);
        let mut args = vec![from, to];
        if qcow2 {
            args.splice(0..0, ["--keep", "2"]);
        }
        let all = remote_args(sshd, &args);
        let v = sync_json(&all.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(field(&v, "from"), previous.as_deref(), "{v}");
        let newest = assert_replica_is_newest(s, img, replica);
        assert_eq!(field(&v, "to"), Some(newest.name.as_str()), "{v}");
        assert_eq!(names(img), vec![newest.name.clone()], "--keep-source 1");
        previous = Some(newest.name);
    }
    if qcow2 {
        assert_eq!(replica_snapshots(replica).len(), 2, "--keep 2");
    }
}

#[test]
fn cycles_pushed_and_pulled_over_ssh() {
    if !have_qemu() || !have_ssh() {
        return;
    }
    let s = Scratch::new();
    let sshd = Sshd::start(&s);
    for name in ["r.raw", "r.qcow2"] {
        let push = Scratch::new();
        let img = source(&push, "32M");
        let replica = push.path(name);
        let pushed = if name.ends_with(".qcow2") { 10 } else { 3 };
        let to = there(&replica);
        cycles(pushed, (&sshd, &push), &img, (arg(&img), &to), &replica);
        let pull = Scratch::new();
        let img = source(&pull, "32M");
        let replica = pull.path(name);
        let from = there(&img);
        cycles(3, (&sshd, &pull), &img, (&from, arg(&replica)), &replica);
    }
}

#[test]
fn a_remote_failure_is_one_line_naming_the_host() {
    if !have_qemu() || !have_ssh() {
        return;
    }
    let s = Scratch::new();
    let sshd = Sshd::start(&s);
    let img = source(&s, "16M");
    let nowhere = s.path("no-such-dir/r.raw");
    let missing = s.path("missing.qcow2");
    let cases = [
        (arg(&img).to_string(), there(&nowhere)),
        (there(&missing), arg(&s.path("r.raw")).to_string()),
    ];
    for (from, to) in cases {
        let all = remote_args(&sshd, &[&from, &to]);
        let out = sync(&all.iter().map(String::as_str).collect::<Vec<_>>());
        let err = one_line_failure(&out, &format!("{from} -> {to}"));
        assert!(err.starts_with("blkdelta: 127.0.0.1: "), "{err}");
    }
}
