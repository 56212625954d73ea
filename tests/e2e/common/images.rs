//! Fixture images, built at test time with qemu-img and qemu-io, and qemu's raw exports of
//! them (the oracle).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::files::random_bytes;
use super::run::run;

/// A scratch directory holding one test's images.
pub struct Scratch {
    pub dir: tempfile::TempDir,
}

/// One write of a history step.
pub enum Write {
    /// `mib` MiB of pseudo-random (incompressible) data from `seed`, written at `at` (a
    /// qemu-io offset: `0`, `8M`).
    Random { at_mib: u64, mib: u64, seed: u64 },
    /// A qemu-io command as given: `write -P 0x11 4M 4M`, `write -z 0 1M`, `discard 4M 1M`.
    Io(String),
}

/// [`Write::Random`]: `mib` MiB of random data from `seed` at `at_mib` MiB.
pub fn random(at_mib: u64, mib: u64, seed: u64) -> Write {
    Write::Random { at_mib, mib, seed }
}

/// [`Write::Io`] of a command.
pub fn io(cmd: impl Into<String>) -> Write {
    Write::Io(cmd.into())
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
        std::fs::write(&p, random_bytes(len as u64, seed)).unwrap();
        p
    }

    /// A qcow2 image `name` of `size` (`-o opts`) with one internal snapshot per step: the
    /// step's writes, then `qemu-img snapshot -c SNAP`.
    pub fn history(
        &self,
        name: &str,
        size: &str,
        opts: &str,
        steps: &[(&str, Vec<Write>)],
    ) -> PathBuf {
        let img = self.qcow2(name, size, opts);
        for (snap, writes) in steps {
            let cmds: Vec<String> = writes.iter().map(|w| self.io_command(w)).collect();
            qemu_io(&img, &cmds);
            snapshot(&img, snap);
        }
        img
    }

    /// The qemu-io command of a write (a random one reads a file made for it here).
    fn io_command(&self, w: &Write) -> String {
        match w {
            Write::Random { at_mib, mib, seed } => {
                let name = format!("random-{seed}-{mib}M");
                let file = self.path(&name);
                if !file.exists() {
                    self.random_file(&name, (*mib << 20) as usize, *seed);
                }
                format!("write -s {} {at_mib}M {mib}M", file.display())
            }
            Write::Io(cmd) => cmd.clone(),
        }
    }

    /// qemu's raw export of `snap` of `img`, made once per scratch directory.
    pub fn export_of(&self, img: &Path, snap: &str) -> PathBuf {
        let e = self.path(&format!("{snap}.export"));
        if !e.exists() {
            export(img, Some(snap), &e);
        }
        e
    }
}

/// `IMG@SNAPS`: a send source naming snapshots of an image.
pub fn spec(img: &Path, snaps: &str) -> String {
    format!("{}@{snaps}", img.display())
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
