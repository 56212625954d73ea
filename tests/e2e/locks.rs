//! QEMU's image locks, end to end: a writer (qemu-storage-daemon, qemu-io) holding an image
//! makes send, checksum and list refuse it unless `--force-share`; a read-only holder does not;
//! and while blkdelta reads an image, QEMU cannot start writing it. A receive refuses a replica
//! that QEMU holds, and while it writes one, neither QEMU nor blkdelta can open it.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    assert_refused, assert_same_file, blkdelta, blkdelta_ok, checksum, export, have, lock_held,
    qemu_io, random, receive_file, run, send_to_file, snapshot, spec, Reaped, Receiver, Scratch,
};
use blkdelta_common::image::qcow2::Qcow2Image;

/// QEMU's lock byte for "holds write permission" (`RAW_LOCK_PERM_BASE` + `BLK_PERM_WRITE`).
const WRITE_BYTE: u64 = 101;
/// QEMU's lock byte for "holds consistent read permission".
const READ_BYTE: u64 = 100;

/// A QEMU process holding an image open; killed and reaped when dropped, so that no process
/// outlives its test, even a failed one.
struct Holder {
    child: Reaped,
}

impl Holder {
    /// Starts `cmd` and waits until it holds QEMU lock `byte` on `img`.
    fn start(cmd: &mut Command, img: &Path, byte: u64) -> Holder {
        let child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
        let mut holder = Holder {
            child: Reaped(child),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !lock_held(img, byte) {
            if let Some(status) = holder.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ =
                    std::io::Read::read_to_string(holder.child.stderr.as_mut().unwrap(), &mut err);
                panic!("{cmd:?} exited ({status}) before locking {img:?}: {err}");
            }
            assert!(
                Instant::now() < deadline,
                "{cmd:?} did not lock byte {byte} of {img:?} (no OFD locks in /proc/locks?)"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        holder
    }

    /// A qemu-storage-daemon with the image as a qcow2 node: a writer, as a VM is.
    fn storage_daemon(img: &Path) -> Holder {
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=f,filename={}",
                img.display()
            ))
            .args(["--blockdev", "driver=qcow2,node-name=q,file=f"]);
        Holder::start(&mut cmd, img, WRITE_BYTE)
    }

    /// qemu-io reading commands from a pipe kept open: a writer, or a reader with `-r`.
    fn qemu_io(img: &Path, read_only: bool) -> Holder {
        Holder::qemu_io_as(img, "qcow2", read_only)
    }

    /// [`Holder::qemu_io`] on an image of format `fmt`.
    fn qemu_io_as(img: &Path, fmt: &str, read_only: bool) -> Holder {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", fmt]);
        if read_only {
            cmd.arg("-r");
        }
        let byte = if read_only { READ_BYTE } else { WRITE_BYTE };
        Holder::start(cmd.arg(img), img, byte)
    }

    /// Checks the holder still answers (it held the image through the test).
    fn still_there(&mut self) {
        let stdin = self.child.stdin.as_mut().unwrap();
        writeln!(stdin, "length").unwrap();
        let mut line = String::new();
        BufReader::new(self.child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert!(line.contains("MiB"), "qemu-io answered {line:?}");
    }
}

fn have_qemu() -> bool {
    have("qemu-img") && have("qemu-io") && have("qemu-storage-daemon")
}

/// An image with two snapshots of different content, and data in the active layer.
fn image(s: &Scratch) -> PathBuf {
    let img = s.qcow2("vm.qcow2", "16M", "");
    qemu_io(&img, &["write -P 0x1 0 2M".into()]);
    snapshot(&img, "s1");
    qemu_io(&img, &["write -P 0x2 1M 2M".into()]);
    snapshot(&img, "s2");
    qemu_io(&img, &["write -P 0x3 4M 1M".into()]);
    img
}

/// qemu's raw export of a snapshot of an image in use (`qemu-img convert -U`).
fn export_shared(img: &Path, snap: &str, out: &Path) {
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-f", "qcow2", "-l"])
        .arg(format!("snapshot.name={snap}"))
        .args(["-O", "raw"])
        .arg(img)
        .arg(out));
}

/// Asserts a refusal: exit 1, one `blkdelta:` line naming the writer and `--force-share`.
fn assert_writer_refused(out: &Output, names: &Path) {
    let name = names.display().to_string();
    let words = [name.as_str(), "writer", "write lock", "--force-share"];
    assert_refused(out, &words, "a refusal of an image a writer holds");
}

#[test]
fn send_refuses_an_image_a_writer_holds() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    let _vm = Holder::storage_daemon(&img);
    let stream = s.path("s1.bd");
    for snaps in ["s1", "s1..s2"] {
        let out = blkdelta(&["send", &spec(&img, snaps), "-o", stream.to_str().unwrap()]);
        assert_writer_refused(&out, &img);
        assert!(!stream.exists(), "a refused send created its output");
    }
    let out = blkdelta(&[
        "send",
        img.to_str().unwrap(),
        "-o",
        stream.to_str().unwrap(),
    ]);
    assert_writer_refused(&out, &img);
}

#[test]
fn force_share_sends_what_qemu_exports_of_a_running_image() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    let _vm = Holder::storage_daemon(&img);
    let (full, incr) = (s.path("s1.bd"), s.path("s1-s2.bd"));
    let out = blkdelta_ok(&[
        "send",
        "-q",
        "-U",
        &spec(&img, "s1"),
        "-o",
        full.to_str().unwrap(),
    ]);
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(
        note.contains("not for its active layer") && note.contains("send --qmp"),
        "-U warns that the live path is the safe one: {note}"
    );
    blkdelta_ok(&[
        "send",
        "-q",
        "--force-share",
        &spec(&img, "s1..s2"),
        "-o",
        incr.to_str().unwrap(),
    ]);
    let (replica, oracle) = (s.path("replica.raw"), s.path("oracle.raw"));
    let out = receive_file(&full, &replica, &[]);
    assert!(out.status.success(), "{out:?}");
    export_shared(&img, "s1", &oracle);
    assert_same_file(&replica, &oracle);
    let out = receive_file(&incr, &replica, &[]);
    assert!(out.status.success(), "{out:?}");
    export_shared(&img, "s2", &oracle);
    assert_same_file(&replica, &oracle);
}

#[test]
fn checksum_and_list_refuse_a_writer_unless_force_share() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    let oracle = s.path("s1.raw");
    export_shared(&img, "s1", &oracle);
    let mut vm = Holder::qemu_io(&img, false);
    let spec = spec(&img, "s1");
    assert_writer_refused(&blkdelta(&["checksum", &spec]), &img);
    assert_writer_refused(&blkdelta(&["list", img.to_str().unwrap()]), &img);
    assert_eq!(
        checksum(&spec, &["-U"]),
        checksum(oracle.to_str().unwrap(), &[])
    );
    let out = blkdelta_ok(&["list", "--force-share", img.to_str().unwrap()]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("s1") && text.contains("s2"), "{text}");
    vm.still_there();
}

#[test]
fn a_read_only_holder_does_not_block() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    let mut reader = Holder::qemu_io(&img, true);
    assert!(!lock_held(&img, WRITE_BYTE));
    let stream = s.path("s1.bd");
    send_to_file(&spec(&img, "s1"), &stream);
    let oracle = s.path("s1.raw");
    export_shared(&img, "s1", &oracle);
    let replica = s.path("replica.raw");
    assert!(receive_file(&stream, &replica, &[]).status.success());
    assert_same_file(&replica, &oracle);
    checksum(&spec(&img, "s2"), &[]);
    blkdelta_ok(&["list", img.to_str().unwrap()]);
    reader.still_there();
}

#[test]
fn qemu_cannot_start_writing_while_blkdelta_reads() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = image(&s);
    let write = |img: &Path| {
        Command::new("qemu-io")
            .args(["-f", "qcow2", "-c", "write -P 0x9 0 4k"])
            .arg(img)
            .output()
            .unwrap()
    };
    let held = Qcow2Image::open(&img).unwrap();
    let out = write(&img);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "qemu-io wrote under our locks");
    assert!(err.contains("\"write\" lock"), "{err}");
    // Readers share: qemu-img convert (without -U) still reads it.
    export(&img, Some("s1"), &s.path("s1.raw"));
    drop(held);
    let out = write(&img);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_writer_on_the_backing_file_blocks_the_overlay() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let base = s.qcow2("base.qcow2", "16M", "");
    qemu_io(&base, &["write -P 0x5 0 4M".into()]);
    let top = s.qcow2(
        "top.qcow2",
        "16M",
        &format!("backing_file={},backing_fmt=qcow2", base.display()),
    );
    qemu_io(&top, &["write -P 0x6 1M 1M".into()]);
    snapshot(&top, "s1");
    let _writer = Holder::qemu_io(&base, false);
    let out = blkdelta(&["send", &spec(&top, "s1"), "-o", "/dev/null"]);
    assert_writer_refused(&out, &base);
    let stream = s.path("s1.bd");
    blkdelta_ok(&[
        "send",
        "-q",
        "-U",
        &spec(&top, "s1"),
        "-o",
        stream.to_str().unwrap(),
    ]);
    let (replica, oracle) = (s.path("replica.raw"), s.path("oracle.raw"));
    assert!(receive_file(&stream, &replica, &[]).status.success());
    export_shared(&top, "s1", &oracle);
    assert_same_file(&replica, &oracle);
}

/// An image whose snapshot `s1` holds 6 MiB of incompressible data (a stream of some MiB), and
/// `s2` 1 MiB more.
fn big_image(s: &Scratch) -> PathBuf {
    let steps = [
        ("s1", vec![random(0, 6, 21)]),
        ("s2", vec![random(8, 1, 22)]),
    ];
    s.history("big.qcow2", "16M", "", &steps)
}

/// Asserts that a receive refused a replica QEMU holds: exit 1, one `blkdelta:` line naming
/// the replica as in use, and no `--force-share` offered (receive has none).
fn assert_target_refused(out: &Output, replica: &Path) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.lines().count(), 1, "not one line: {err}");
    assert!(err.starts_with("blkdelta: "), "{err}");
    let name = replica.display().to_string();
    for word in [name.as_str(), "is in use by another process"] {
        assert!(err.contains(word), "no {word:?} in: {err}");
    }
    assert!(!err.contains("force-share"), "{err}");
}

/// `qemu-io -f raw -c 'read 0 512' IMG`, as a VM or a tool reading the replica would.
fn qemu_read(img: &Path) -> Output {
    Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 512"])
        .arg(img)
        .output()
        .unwrap()
}

#[test]
fn receive_refuses_a_replica_qemu_holds() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = big_image(&s);
    let (full, incr) = (s.path("s1.bd"), s.path("s1-s2.bd"));
    send_to_file(&spec(&img, "s1"), &full);
    send_to_file(&spec(&img, "s1..s2"), &incr);
    let replica = s.path("replica.raw");
    let state = s.path("replica.raw.blkdelta");
    let out = receive_file(&full, &replica, &[]);
    assert!(out.status.success(), "{out:?}");
    let (bytes, held) = (
        std::fs::read(&replica).unwrap(),
        std::fs::read(&state).unwrap(),
    );
    // A VM writing the replica (qemu-io -f raw holds 100 and 101), then a reader (100).
    for read_only in [false, true] {
        let mut qemu = Holder::qemu_io_as(&replica, "raw", read_only);
        for stream in [&incr, &full] {
            let out = receive_file(stream, &replica, &[]);
            assert_target_refused(&out, &replica);
            let err = String::from_utf8_lossy(&out.stderr);
            let does = if read_only { "reads it" } else { "writes it" };
            assert!(err.contains(does), "no {does:?} in: {err}");
        }
        assert!(
            std::fs::read(&replica).unwrap() == bytes,
            "the replica changed"
        );
        assert_eq!(std::fs::read(&state).unwrap(), held, "the state changed");
        qemu.still_there();
    }
    // Once QEMU is gone, the same stream applies.
    let out = receive_file(&incr, &replica, &[]);
    assert!(out.status.success(), "{out:?}");
    let oracle = s.path("s2.raw");
    export(&img, Some("s2"), &oracle);
    assert_same_file(&replica, &oracle);
}

#[test]
fn a_replica_being_received_is_locked() {
    if !have_qemu() {
        return;
    }
    let s = Scratch::new();
    let img = big_image(&s);
    let stream = s.path("s1.bd");
    send_to_file(&spec(&img, "s1"), &stream);
    let bytes = std::fs::read(&stream).unwrap();
    let replica = s.path("replica.raw");
    let mut recv = Receiver::start(&replica, &[]);
    let half = bytes.len() / 2;
    recv.feed(&bytes[..half]);
    // The receive has read the header, opened the replica and sized it; it now waits for the
    // rest of the stream.
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::metadata(&replica).map_or(true, |m| m.len() != 16 << 20) {
        assert!(
            Instant::now() < deadline,
            "the receive did not size the replica"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = qemu_read(&replica);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qemu-io read a replica being received"
    );
    assert!(err.contains("\"consistent read\" lock"), "{err}");
    let out = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&replica)
        .arg(s.path("copy.raw"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qemu-img converted a replica being received"
    );
    assert!(err.contains("\"consistent read\" lock"), "{err}");
    for extra in [&[][..], &["--force-share"][..]] {
        let mut args = vec!["checksum", replica.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = blkdelta(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert_eq!(err.lines().count(), 1, "not one line: {err}");
        assert!(err.contains("blkdelta receive"), "{err}");
    }
    recv.feed(&bytes[half..]);
    let out = recv.finish();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let oracle = s.path("s1.raw");
    export(&img, Some("s1"), &oracle);
    assert_same_file(&replica, &oracle);
    for byte in [100, 101, 200] {
        assert!(!lock_held(&replica, byte), "byte {byte} still locked");
    }
    let out = qemu_read(&replica);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        checksum(replica.to_str().unwrap(), &[]),
        checksum(&spec(&img, "s1"), &[])
    );
}
