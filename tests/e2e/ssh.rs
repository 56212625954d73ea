//! `blkdelta send img@s1..s3 | ssh host blkdelta receive REPLICA` through a real sshd on
//! 127.0.0.1 with throwaway keys.

use std::path::Path;
use std::process::Command;

use crate::common::{
    assert_same_file, bin, checksum, export, have, have_ssh, qemu_io, run, snapshot, Scratch, Sshd,
};

/// Runs `blkdelta send SOURCE | ssh 127.0.0.1 blkdelta receive TARGET` through a shell pipe.
fn send_over_ssh(sshd: &Sshd, source: &str, target: &Path) {
    let script = format!(
        "set -o pipefail; '{bin}' send -q '{source}' | {ssh} -o BatchMode=yes \
         -c aes128-gcm@openssh.com 127.0.0.1 '{bin}' receive -q '{target}'",
        bin = bin().display(),
        ssh = sshd.ssh_command(),
        target = target.display()
    );
    run(Command::new("bash").arg("-c").arg(script));
}

#[test]
fn seed_and_incremental_over_ssh() {
    if !have("qemu-img") || !have_ssh() {
        return;
    }
    let s = Scratch::new();
    let img = s.qcow2("vm.qcow2", "32M", "");
    let r = s.random_file("r", 4 << 20, 11);
    qemu_io(&img, &[format!("write -s {} 0 4M", r.display())]);
    snapshot(&img, "s1");
    qemu_io(&img, &["write -P 0x21 8M 1M".into(), "discard 0 1M".into()]);
    snapshot(&img, "s2");
    qemu_io(
        &img,
        &["write -z 2M 64k".into(), "write -P 0x31 31M 1M".into()],
    );
    snapshot(&img, "s3");

    let sshd = Sshd::start(&s);
    let replica = s.path("replica.raw");
    send_over_ssh(&sshd, &format!("{}@s1", img.display()), &replica);
    send_over_ssh(&sshd, &format!("{}@s1..s3", img.display()), &replica);
    let e3 = s.path("s3.raw");
    export(&img, Some("s3"), &e3);
    assert_same_file(&replica, &e3);
    assert_eq!(
        checksum(&format!("{}@s3", img.display()), &[]),
        checksum(replica.to_str().unwrap(), &[])
    );
}
