//! End to end: `send --qmp SOCKET --node NODE` from a running qemu-storage-daemon whose writable
//! NBD export stands in for the guest (qemu-io writes through it). Each replica equals what the
//! disk held at the moment of its send, writes made during a send are in the next stream and not
//! in that one, a sender killed part way leaves the daemon serving and the next run correct, and
//! a bitmap QEMU could not save is refused with the way out.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::common::{
    arg, assert_ok, assert_same_file, bin, blkdelta, have_storage_daemon, one_line_failure,
    receive_file, run, Daemon, Scratch,
};

/// What the tests of `send --qmp` ask of the daemon.
impl Daemon {
    fn send_args(&self) -> Vec<String> {
        vec![
            "send".into(),
            "-q".into(),
            "--qmp".into(),
            arg(&self.path("qmp.sock")).into(),
            "--node".into(),
            "drive0".into(),
            "--nbd-socket".into(),
            arg(&self.path("guest.sock")).into(),
        ]
    }

    /// `send --qmp EXTRA` started, its stream on a pipe (`out`) or into a file.
    fn spawn_send(&self, extra: &[&str], out: Stdio) -> Child {
        Command::new(bin())
            .args(self.send_args())
            .args(extra)
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// The first live send (the whole disk) into `stream`, received into `replica`.
    fn seed(&self, stream: &Path, replica: &Path) {
        assert_ok(&self.send_to(stream, &[]), "the seed");
        assert_ok(&receive_file(stream, replica, &[]), "its receive");
    }

    /// `send --qmp` into `stream`.
    fn send_to(&self, stream: &Path, extra: &[&str]) -> std::process::Output {
        let mut args = self.send_args();
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(["-o".into(), arg(stream).into(), "--force".into()]);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        blkdelta(&refs)
    }
}

/// The replica's active layer, exported.
fn replica_now(s: &Scratch, replica: &Path, name: &str) -> PathBuf {
    let out = s.path(name);
    run(Command::new("qemu-img")
        .args(["convert", "-O", "raw"])
        .arg(replica)
        .arg(&out));
    out
}

#[test]
fn live_sends_are_the_disk_at_their_moment() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let replica = s.path("r.qcow2");
    let stream = s.path("s.bd");
    // First: the whole disk.
    d.snapshot_to(&s.path("m0.raw"));
    assert_ok(&d.send_to(&stream, &[]), "the first live send");
    assert_ok(&receive_file(&stream, &replica, &[]), "its receive");
    assert_same_file(&replica_now(&s, &replica, "r0.raw"), &s.path("m0.raw"));
    // Then what changed, twice.
    for (round, cmd) in ["write -P 7 4M 1M", "write -z 0 64k"].iter().enumerate() {
        d.write(cmd);
        let moment = s.path(&format!("m{}.raw", round + 1));
        d.snapshot_to(&moment);
        assert_ok(&d.send_to(&stream, &[]), "a live incremental");
        let out = blkdelta(&["dump", "--json", arg(&stream)]);
        let header = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap()
            .to_string();
        assert!(header.contains("\"from\":{"), "an incremental: {header}");
        assert_ok(&receive_file(&stream, &replica, &[]), "its receive");
        let now = replica_now(&s, &replica, &format!("r{}.raw", round + 1));
        assert_same_file(&now, &moment);
    }
    assert_eq!(d.leftovers(), (1, 0), "only the guest's export, no job");
    let history = run(Command::new("qemu-img")
        .args(["snapshot", "-l"])
        .arg(&replica));
    assert_eq!(
        String::from_utf8_lossy(&history.stdout)
            .matches("drive0@")
            .count(),
        3
    );
}

#[test]
fn writes_during_a_send_are_in_the_next_stream_only() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let replica = s.path("r.raw");
    let stream = s.path("s.bd");
    d.seed(&stream, &replica);
    d.write("write -P 5 1M 1M");
    let moment = s.path("moment.raw");
    d.snapshot_to(&moment);
    // The stream goes into a pipe nobody reads until the guest wrote: the sender is blocked
    // mid-stream, past the moment.
    let mut child = d.spawn_send(&[], Stdio::piped());
    let mut out = child.stdout.take().unwrap();
    let mut head = [0u8; 8];
    out.read_exact(&mut head).unwrap();
    d.write("write -P 6 1M 64k");
    d.write("write -P 6 30M 64k");
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).unwrap();
    assert!(child.wait().unwrap().success());
    let mut bytes = head.to_vec();
    bytes.extend(rest);
    std::fs::write(&stream, &bytes).unwrap();
    assert_ok(
        &receive_file(&stream, &replica, &[]),
        "the stream taken during the writes",
    );
    assert_same_file(&replica, &moment);
    // The next one has them.
    let after = s.path("after.raw");
    d.snapshot_to(&after);
    assert_ok(&d.send_to(&stream, &[]), "the next send");
    assert_ok(&receive_file(&stream, &replica, &[]), "its receive");
    assert_same_file(&replica, &after);
}

#[test]
fn a_sender_killed_part_way_leaves_the_daemon_serving_and_the_next_run_correct() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let replica = s.path("r.qcow2");
    let stream = s.path("s.bd");
    d.seed(&stream, &replica);
    d.write("write -P 3 2M 2M");
    // Killed once the moment is taken (its stream has begun), before it ends.
    let mut child = d.spawn_send(&[], Stdio::piped());
    let mut head = [0u8; 8];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut head)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    // The guest goes on; the next run cleans up and sends from the state the replica holds.
    d.write("write -P 4 8M 64k");
    let moment = s.path("moment.raw");
    d.snapshot_to(&moment);
    assert_ok(&d.send_to(&stream, &[]), "the next send");
    assert_ok(&receive_file(&stream, &replica, &[]), "its receive");
    assert_same_file(&replica_now(&s, &replica, "r.raw"), &moment);
    assert_eq!(d.leftovers(), (1, 0), "nothing of the killed run is left");
    d.stop();
    let check = run(Command::new("qemu-img")
        .arg("check")
        .arg(s.path("disk.qcow2")));
    assert!(String::from_utf8_lossy(&check.stdout).contains("No errors"));
}

#[test]
fn a_bitmap_qemu_could_not_save_is_refused_with_the_way_out() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let stream = s.path("s.bd");
    assert_ok(&d.send_to(&stream, &[]), "the seed");
    // Stopped cleanly, the bitmap is saved in the image; opened again, it is marked in use
    // there; killed then, it stays so.
    d.quit();
    let mut d = Daemon::start(&s);
    d.child.kill().unwrap();
    d.child.wait().unwrap();
    drop(d);
    let d = Daemon::start(&s);
    let out = d.send_to(&stream, &[]);
    let err = one_line_failure(&out, "an inconsistent bitmap");
    assert!(
        err.contains("inconsistent") && err.contains("--full"),
        "{err}"
    );
    assert_ok(&d.send_to(&stream, &["--full"]), "--full starts again");
    let out = d.send_to(&stream, &[]);
    assert_ok(&out, "and the next is an incremental again");
}

#[test]
fn a_receive_cut_short_is_reverted_by_qemu_and_the_next_stream_applies() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let replica = s.path("r.qcow2");
    let stream = s.path("s.bd");
    d.seed(&stream, &replica);
    let seed = {
        let out = run(Command::new("qemu-img")
            .args(["snapshot", "-l"])
            .arg(&replica));
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let line = text
            .lines()
            .find(|l| l.contains("drive0@"))
            .unwrap()
            .to_string();
        line.split_whitespace().nth(1).unwrap().to_string()
    };
    // The sender killed part way through an uncompressed incremental: its receiver got 2 MiB.
    d.write("write -P 9 0 3M");
    let mut child = d.spawn_send(&["-l", "0"], Stdio::piped());
    let mut part = vec![0u8; 2 << 20];
    child
        .stdout
        .as_mut()
        .unwrap()
        .read_exact(&mut part)
        .unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    let cut = s.path("cut.bd");
    std::fs::write(&cut, &part).unwrap();
    let out = receive_file(&cut, &replica, &["--checkpoint-bytes", "65536"]);
    assert!(!out.status.success(), "a stream cut short fails");
    // The next stream has another `to`: refused while the replica is part way.
    d.write("write -P 8 10M 64k");
    assert_ok(&d.send_to(&stream, &[]), "the next send");
    let out = receive_file(&stream, &replica, &[]);
    let err = one_line_failure(&out, "onto a replica part way");
    assert!(err.contains("--rebase"), "{err}");
    // Reverted by QEMU to the snapshot it held, it takes the stream.
    run(Command::new("qemu-img")
        .args(["snapshot", "-a", &seed])
        .arg(&replica));
    let moment = s.path("moment.raw");
    d.snapshot_to(&moment);
    assert_ok(&receive_file(&stream, &replica, &[]), "after the revert");
    assert_same_file(&replica_now(&s, &replica, "r.raw"), &moment);
}

#[test]
fn a_sender_killed_at_any_moment_leaves_nothing_the_next_run_trips_on() {
    if !have_storage_daemon() {
        return;
    }
    let s = Scratch::new();
    let d = Daemon::start(&s);
    let replica = s.path("r.raw");
    let stream = s.path("s.bd");
    d.seed(&stream, &replica);
    // Killed after 0 to 60 ms: before connecting, in the transaction, the export, the stream or
    // the teardown, wherever it happens to be.
    for (i, ms) in [0u64, 2, 5, 10, 20, 40, 60].iter().enumerate() {
        d.write(&format!("write -P {} {}M 64k", 10 + i, i));
        let killed = s.path("killed.bd");
        let before = d.bitmaps();
        let mut child = d.spawn_send(&["-o", arg(&killed), "--force"], Stdio::null());
        std::thread::sleep(Duration::from_millis(*ms));
        let _ = child.kill();
        let ended = child.wait().unwrap().success();
        // Killed after it dropped the old bitmaps (its last step, once its stream was whole),
        // it only had to exit: the source has moved on to its bitmap alone.
        let after = d.bitmaps();
        let moved_on = after.len() == 1 && !before.contains(&after[0]);
        if ended || moved_on {
            // Its stream is what a pipe would have carried, whole.
            let out = receive_file(&s.path("killed.bd"), &replica, &[]);
            assert_ok(&out, "the stream of a run that ended before its kill");
        }
        let moment = s.path("moment.raw");
        d.snapshot_to(&moment);
        assert_ok(
            &d.send_to(&stream, &[]),
            &format!("the run after a kill at {ms} ms"),
        );
        assert_ok(&receive_file(&stream, &replica, &[]), "its receive");
        assert_same_file(&replica, &moment);
        assert_eq!(d.leftovers(), (1, 0), "after a kill at {ms} ms");
    }
}
