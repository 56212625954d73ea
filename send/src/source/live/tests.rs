//! The checkpoint against a real qemu-storage-daemon: a writable NBD export stands in for the
//! guest, `qemu-img convert` reads the point-in-time export.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::*;
use blkdelta_common::testing::have;

#[test]
fn bitmap_names_carry_the_state_guid() {
    let g = [0xabu8; 16];
    assert_eq!(parse_bitmap(&format!("blkdelta-{}", to_hex(&g))), Some(g));
    assert_eq!(parse_bitmap("blkdelta-tmp-1234"), None);
    assert_eq!(parse_bitmap("daily"), None);
}

#[test]
fn stamps_are_utc_iso() {
    let s = utc_stamp();
    assert_eq!(s.len(), 20, "{s}");
    assert!(s.ends_with('Z') && s.as_bytes()[10] == b'T', "{s}");
}

/// A qemu-storage-daemon serving `disk.qcow2` as node `drive0`, with a QMP socket and a
/// writable NBD export `drive0` (the guest).
struct Daemon {
    child: Child,
    dir: tempfile::TempDir,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.qcow2");
        run(Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&disk)
            .arg("16M"));
        run(Command::new("qemu-io")
            .args(["-c", "write -P 1 0 4M"])
            .arg(&disk));
        let p = |name: &str| dir.path().join(name).display().to_string();
        let child = Command::new("qemu-storage-daemon")
            .arg("--blockdev")
            .arg(format!(
                "driver=file,node-name=file0,filename={}",
                p("disk.qcow2")
            ))
            .args(["--blockdev", "driver=qcow2,node-name=drive0,file=file0"])
            .arg("--nbd-server")
            .arg(format!("addr.type=unix,addr.path={}", p("guest.sock")))
            .args([
                "--export",
                "type=nbd,id=guest,node-name=drive0,name=drive0,writable=on",
            ])
            .arg("--chardev")
            .arg(format!(
                "socket,id=qmp,path={},server=on,wait=off",
                p("qmp.sock")
            ))
            .args(["--monitor", "chardev=qmp"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let d = Daemon { child, dir };
        let start = Instant::now();
        while !d.path("qmp.sock").exists() || !d.path("guest.sock").exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the daemon did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn guest_write(&self, args: &str) {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", args])
            .arg(format!(
                "nbd+unix:///drive0?socket={}",
                self.path("guest.sock").display()
            )));
    }

    fn options(&self) -> LiveOptions {
        LiveOptions {
            qmp: self.path("qmp.sock"),
            node: "drive0".into(),
            nbd_socket: Some(self.path("guest.sock")),
            scratch: None,
            from_bitmap: None,
            full: false,
            to_name: None,
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The export read whole, through qemu-img.
fn read_export(uri: &str, out: &Path) -> Vec<u8> {
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", uri])
        .arg(out));
    std::fs::read(out).unwrap()
}

fn bitmaps(d: &Daemon) -> Vec<String> {
    let mut q = Qmp::connect(&d.path("qmp.sock")).unwrap();
    let nodes: Vec<Node> = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .unwrap();
    let mut names: Vec<String> = nodes
        .into_iter()
        .flat_map(|n| n.dirty_bitmaps.into_iter().map(|b| b.name))
        .collect();
    names.sort();
    names
}

/// The export shows the disk as it was at the moment, whatever the guest writes after it; the
/// first checkpoint is full and leaves a bitmap; the next starts from it, and once the stream
/// ended well only the new bitmap is left; nothing of the checkpoint stays in QEMU.
#[test]
fn the_view_is_the_moment_and_the_bitmaps_follow_the_replica() {
    if !have("qemu-storage-daemon") || !have("qemu-img") || !have("qemu-io") {
        return;
    }
    let d = Daemon::start();
    let cp = Checkpoint::begin(&d.options()).unwrap();
    assert!(cp.from().is_none(), "no bitmap yet: a full stream");
    d.guest_write("write -P 9 0 64k");
    let view = read_export(&cp.uri(), &d.path("v1.raw"));
    assert!(
        view[..65536].iter().all(|&b| b == 1),
        "the guest's write is not in the view"
    );
    let first = cp.to().clone();
    cp.finish(true).unwrap();
    assert_eq!(bitmaps(&d), [format!("blkdelta-{}", to_hex(&first.guid))]);

    let cp = Checkpoint::begin(&d.options()).unwrap();
    assert_eq!(
        cp.from().map(|f| f.guid),
        Some(first.guid),
        "from the bitmap"
    );
    assert!(cp.bitmap().is_some());
    let view = read_export(&cp.uri(), &d.path("v2.raw"));
    assert!(
        view[..65536].iter().all(|&b| b == 9),
        "the write before the moment is in"
    );
    let second = cp.to().clone();
    cp.finish(true).unwrap();
    assert_eq!(bitmaps(&d), [format!("blkdelta-{}", to_hex(&second.guid))]);

    // A stream that failed: the old bitmap stays (with what the new one recorded).
    let cp = Checkpoint::begin(&d.options()).unwrap();
    assert_eq!(cp.from().map(|f| f.guid), Some(second.guid));
    cp.finish(false).unwrap();
    assert_eq!(bitmaps(&d), [format!("blkdelta-{}", to_hex(&second.guid))]);

    // A run dropped part way (killed): the next cleans up and goes on. The bitmap of the
    // abandoned run started later than the old one: it recorded less.
    d.guest_write("write -P 5 8M 64k");
    let cp = Checkpoint::begin(&d.options()).unwrap();
    cp.abandon();
    let cp = Checkpoint::begin(&d.options()).unwrap();
    assert_eq!(
        cp.from().map(|f| f.guid),
        Some(second.guid),
        "the oldest bitmap"
    );
    cp.finish(false).unwrap();
    let mut q = Qmp::connect(&d.path("qmp.sock")).unwrap();
    let exports: serde_json::Value = q.execute("query-block-exports", json!({})).unwrap();
    assert_eq!(
        exports.as_array().unwrap().len(),
        1,
        "only the guest's: {exports}"
    );
    let jobs: serde_json::Value = q.execute("query-block-jobs", json!({})).unwrap();
    assert_eq!(jobs, json!([]));
}
