//! `blkdelta send img@s1..s3 | ssh host blkdelta receive REPLICA` through a real sshd on
//! 127.0.0.1 with throwaway keys.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    assert_same_file, bin, checksum, export, have, qemu_io, run, snapshot, write_text, Scratch,
};

const SSHD: &str = "/usr/sbin/sshd";

/// An sshd listening on loopback, killed on drop.
struct Sshd {
    child: Child,
    port: u16,
    client_key: PathBuf,
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn keygen(path: &Path) {
    run(Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path));
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_sshd(s: &Scratch) -> Sshd {
    let (host_key, client_key) = (s.path("host_key"), s.path("client_key"));
    keygen(&host_key);
    keygen(&client_key);
    let auth = s.path("authorized_keys");
    std::fs::copy(client_key.with_extension("pub"), &auth).unwrap();
    let port = free_port();
    let config = s.path("sshd_config");
    write_text(
        &config,
        &format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {}\nAuthorizedKeysFile {}\n\
             PidFile {}\nStrictModes no\nUsePAM no\nPermitRootLogin yes\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\n",
            host_key.display(),
            auth.display(),
            s.path("sshd.pid").display()
        ),
    );
    std::fs::create_dir_all("/run/sshd").unwrap();
    let child = Command::new(SSHD)
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sshd did not start listening");
        std::thread::sleep(Duration::from_millis(50));
    }
    Sshd {
        child,
        port,
        client_key,
    }
}

/// Runs `blkdelta send SOURCE | ssh 127.0.0.1 blkdelta receive TARGET` through a shell pipe.
fn send_over_ssh(sshd: &Sshd, source: &str, target: &Path) {
    let script = format!(
        "set -o pipefail; '{bin}' send -q '{source}' | ssh -p {port} -i '{key}' \
         -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null \
         -o LogLevel=ERROR -c aes128-gcm@openssh.com 127.0.0.1 '{bin}' receive -q '{target}'",
        bin = bin().display(),
        port = sshd.port,
        key = sshd.client_key.display(),
        target = target.display()
    );
    run(Command::new("bash").arg("-c").arg(script));
}

#[test]
fn seed_and_incremental_over_ssh() {
    if !have("qemu-img") || !have("ssh") || !have("ssh-keygen") || !have(SSHD) {
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

    let sshd = start_sshd(&s);
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
