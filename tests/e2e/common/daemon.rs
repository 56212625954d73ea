//! A qemu-storage-daemon standing in for a running VM: its disk is a qcow2 node the sender
//! reaches through QMP, and a writable NBD export through which qemu-io writes as the guest.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use blkdelta_common::qmp::Qmp;

use super::images::Scratch;
use super::run::run;
use super::tools::have;

/// Whether qemu-img, qemu-io and qemu-storage-daemon are here.
pub fn have_storage_daemon() -> bool {
    have("qemu-img") && have("qemu-io") && have("qemu-storage-daemon")
}

/// A qemu-storage-daemon serving `disk.qcow2` as node `drive0`: QMP on `qmp.sock`, the guest's
/// writable NBD export `drive0` on `guest.sock`.
pub struct Daemon {
    pub child: Child,
    pub dir: PathBuf,
}

impl Daemon {
    pub fn start(s: &Scratch) -> Daemon {
        let disk = s.path("disk.qcow2");
        if !disk.exists() {
            run(Command::new("qemu-img")
                .args(["create", "-q", "-f", "qcow2"])
                .arg(&disk)
                .arg("32M"));
            run(Command::new("qemu-io")
                .args(["-c", "write -P 1 0 4M", "-c", "write -P 2 20M 1M"])
                .arg(&disk));
        }
        let dir = s.path("");
        let _ = std::fs::remove_file(dir.join("qmp.sock"));
        let _ = std::fs::remove_file(dir.join("guest.sock"));
        let p = |n: &str| dir.join(n).display().to_string();
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
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-storage-daemon starts");
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

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    pub fn guest(&self) -> String {
        format!(
            "nbd+unix:///drive0?socket={}",
            self.path("guest.sock").display()
        )
    }

    /// A write through the guest's export.
    pub fn write(&self, cmd: &str) {
        run(Command::new("qemu-io")
            .args(["-f", "raw", "-c", cmd])
            .arg(self.guest()));
    }

    /// The disk as the guest sees it now.
    pub fn snapshot_to(&self, out: &Path) {
        run(Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(self.guest())
            .arg(out));
    }

    /// What QMP says of the daemon: block exports and jobs (both must be only the guest's).
    pub fn leftovers(&self) -> (usize, usize) {
        let mut q = Qmp::connect(&self.path("qmp.sock")).expect("QMP");
        let mut count = |cmd: &str| {
            let v: serde_json::Value = q.execute(cmd, serde_json::json!({})).expect(cmd);
            v.as_array().map_or(0, Vec::len)
        };
        (count("query-block-exports"), count("query-block-jobs"))
    }

    /// The names of node `drive0`'s dirty bitmaps.
    pub fn bitmaps(&self) -> Vec<String> {
        let mut q = Qmp::connect(&self.path("qmp.sock")).expect("QMP");
        let nodes: serde_json::Value = q
            .execute("query-named-block-nodes", serde_json::json!({"flat": true}))
            .expect("query-named-block-nodes");
        let node = nodes
            .as_array()
            .and_then(|n| n.iter().find(|n| n["node-name"] == "drive0"))
            .expect("node drive0");
        let names = node["dirty-bitmaps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        names
            .iter()
            .filter_map(|b| b["name"].as_str().map(str::to_string))
            .collect()
    }

    /// Stops the daemon as QEMU stops cleanly (SIGTERM): persistent bitmaps are saved.
    pub fn quit(mut self) {
        run(Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string()));
        let _ = self.child.wait();
    }

    pub fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
