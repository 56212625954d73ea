//! Fixture builders and helpers for the end-to-end tests: images are made at test time with
//! qemu-img and qemu-io, and qemu's own raw export is the oracle.
#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The blkdelta binary under test.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_blkdelta"))
}

/// Whether a program is on the PATH; prints a loud skip notice when it is not.
pub fn have(program: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        eprintln!(
            "SKIPPED: {program} is not installed (apt-get install qemu-utils / openssh-server)"
        );
    }
    found
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

/// A scratch directory holding one test's images.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

impl Scratch {
    pub fn new() -> Self {
        Scratch {
            dir: tempfile::Builder::new()
                .prefix("blkdelta-test")
                .tempdir()
                .unwrap(),
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `qemu-img create -f qcow2 [-o opts] NAME SIZE`.
    pub fn qcow2(&self, name: &str, size: &str, opts: &str) -> PathBuf {
        let p = self.path(name);
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if !opts.is_empty() {
            cmd.args(["-o", opts]);
        }
        run(cmd.arg(&p).arg(size));
        p
    }

    /// A file of `len` pseudo-random bytes from `seed` (incompressible data for writes).
    pub fn random_file(&self, name: &str, len: usize, seed: u64) -> PathBuf {
        let p = self.path(name);
        let mut buf = vec![0u8; len];
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for chunk in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        std::fs::write(&p, buf).unwrap();
        p
    }
}

/// Runs qemu-io commands on a qcow2 image.
pub fn qemu_io(img: &Path, cmds: &[String]) {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "qcow2"]);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    let out = run(cmd.arg(img));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        !text.contains("failed") && !text.contains("error"),
        "qemu-io reported: {text}"
    );
}

/// `qemu-img snapshot -c NAME IMG`.
pub fn snapshot(img: &Path, name: &str) {
    run(Command::new("qemu-img")
        .args(["snapshot", "-c", name])
        .arg(img));
}

/// `qemu-img snapshot -d NAME IMG`.
pub fn delete_snapshot(img: &Path, name: &str) {
    run(Command::new("qemu-img")
        .args(["snapshot", "-d", name])
        .arg(img));
}

/// qemu's raw export of a snapshot (or the active layer with `None`) into `out`.
pub fn export(img: &Path, snap: Option<&str>, out: &Path) {
    let mut cmd = Command::new("qemu-img");
    cmd.args(["convert", "-f", "qcow2"]);
    if let Some(s) = snap {
        cmd.arg("-l").arg(format!("snapshot.name={s}"));
    }
    run(cmd.args(["-O", "raw"]).arg(img).arg(out));
}

/// Writes `file` back and drops it from the page cache, so that the next reads find it cold
/// (the sender then reads aligned data around the page cache).
pub fn drop_cache(file: &Path) {
    run(Command::new("sync").arg(file));
    run(Command::new("dd")
        .arg(format!("if={}", file.display()))
        .args(["iflag=nocache", "count=0", "status=none"]));
}

/// Compares two files byte for byte (in bounded pieces); panics naming the first difference.
pub fn assert_same_file(a: &Path, b: &Path) {
    let (ma, mb) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    assert_eq!(ma.len(), mb.len(), "sizes of {a:?} and {b:?} differ");
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        assert_eq!(n, m);
        if n == 0 {
            return;
        }
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!("{a:?} and {b:?} differ at byte {}", pos + i as u64);
        }
        pos += n as u64;
    }
}

/// Compares the first `len` bytes of a device (or file) with a file.
pub fn assert_same_prefix(dev: &Path, file: &Path) {
    let len = std::fs::metadata(file).unwrap().len();
    let mut fd = File::open(dev).unwrap().take(len);
    let mut ff = File::open(file).unwrap();
    let (mut bd, mut bf) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fd, &mut bd);
        let m = read_full(&mut ff, &mut bf);
        assert_eq!(n, m, "{dev:?} is shorter than {file:?}");
        if n == 0 {
            return;
        }
        assert!(bd[..n] == bf[..n], "{dev:?} differs from {file:?}");
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    got
}

/// Runs blkdelta with arguments; returns the output whatever the status.
pub fn blkdelta(args: &[&str]) -> Output {
    Command::new(bin()).args(args).output().unwrap()
}

/// Runs blkdelta and panics unless it succeeds.
pub fn blkdelta_ok(args: &[&str]) -> Output {
    let out = blkdelta(args);
    assert!(
        out.status.success(),
        "blkdelta {args:?} failed ({:?}): {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `blkdelta send SOURCE -o STREAM`, returns the stream size.
pub fn send_to_file(source: &str, stream: &Path) -> u64 {
    blkdelta_ok(&["send", "-q", source, "-o", stream.to_str().unwrap()]);
    std::fs::metadata(stream).unwrap().len()
}

/// `blkdelta receive -i STREAM TARGET [extra...]`.
pub fn receive_file(stream: &Path, target: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "receive",
        "-q",
        "-i",
        stream.to_str().unwrap(),
        target.to_str().unwrap(),
    ];
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
        String::from_utf8_lossy(&sent.stderr)
    );
    recv
}

/// [`pipe_args_in`] in the current directory.
pub fn pipe_args(send_args: &[&str], target: &Path, recv_args: &[&str]) -> Output {
    pipe_args_in(None, send_args, target, recv_args)
}

/// `blkdelta send SOURCE | blkdelta receive TARGET` through a real pipe; both must succeed.
pub fn pipe(source: &str, target: &Path, extra: &[&str]) {
    let recv = pipe_args(&[source], target, extra);
    assert!(
        recv.status.success(),
        "receive failed: {}",
        String::from_utf8_lossy(&recv.stderr)
    );
}

/// The digest `blkdelta checksum` prints for an image.
pub fn checksum(spec: &str, extra: &[&str]) -> String {
    let mut args = vec!["checksum", spec];
    args.extend_from_slice(extra);
    let out = blkdelta_ok(&args);
    let text = String::from_utf8(out.stdout).unwrap();
    text.split_whitespace().next().unwrap().to_string()
}

/// Writes text to a file.
pub fn write_text(p: &Path, text: &str) {
    File::create(p).unwrap().write_all(text.as_bytes()).unwrap();
}

/// Bytes actually allocated on disk for a file.
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// A loop device over a file, detached on drop.
pub struct Loop(pub String);

impl Loop {
    /// Attaches `file` (read-only when asked); `None`, with a loud skip notice, when this
    /// machine cannot attach loop devices.
    pub fn attach(file: &Path, read_only: bool) -> Option<Loop> {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if read_only {
            cmd.arg("--read-only");
        }
        let out = cmd.arg(file).output().ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: losetup cannot attach a loop device here: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Loop(String::from_utf8(out.stdout).ok()?.trim().to_string()))
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Whether some process holds an OFD lock covering `byte` of `img` (QEMU's lock bytes), from
/// `/proc/locks` (`N: OFDLCK ADVISORY READ -1 MAJ:MIN:INODE START END`).
pub fn lock_held(img: &Path, byte: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{}", std::fs::metadata(img).unwrap().ino());
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = f.iter().position(|t| t.ends_with(&ino)) else {
            return false;
        };
        let start = f.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        let end = f.get(i + 2).map(|e| e.parse::<u64>().unwrap_or(u64::MAX));
        line.contains("OFDLCK") && start.is_some_and(|s| s <= byte) && end >= Some(byte)
    })
}

/// Makes the state file `state` describe the replica file `replica` as it is now (device,
/// inode, size, time): what a copy of a replica and its state needs to stand for the original
/// (blkdelta itself refuses a replica that is another file than its state recorded).
pub fn adopt_replica(replica: &Path, state: &Path) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(replica).unwrap();
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    st["identity"] = serde_json::json!({
        "kind": "file",
        "dev": m.dev(),
        "ino": m.ino(),
        "size": m.size(),
        "mtime_ns": m.mtime() * 1_000_000_000 + m.mtime_nsec(),
    });
    std::fs::write(state, serde_json::to_string_pretty(&st).unwrap()).unwrap();
}
