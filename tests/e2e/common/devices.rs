//! Loop devices and mounts made by a test, undone by guards even when the test fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::run::run;
use super::tools::cannot;

/// A loop device over a file, detached on drop.
pub struct Loop(pub String);

impl Loop {
    /// Attaches `file` (read-only when asked); `None`, after a loud skip notice, when this
    /// machine cannot attach loop devices (a panic under `BLKDELTA_REQUIRE_TOOLS=1`).
    pub fn attach(file: &Path, read_only: bool) -> Option<Loop> {
        let mut cmd = Command::new("losetup");
        cmd.args(["-f", "--show"]);
        if read_only {
            cmd.arg("--read-only");
        }
        let out = match cmd.arg(file).output() {
            Ok(out) => out,
            Err(e) => {
                cannot("attach a loop device with losetup", &e.to_string());
                return None;
            }
        };
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            cannot("attach a loop device with losetup", err.trim());
            return None;
        }
        Some(Loop(String::from_utf8(out.stdout).ok()?.trim().to_string()))
    }

    /// Writes `file`, `len` bytes of `fill`, and attaches it read-write (see [`Loop::attach`]).
    pub fn over_new_file(file: &Path, len: usize, fill: u8) -> Option<Loop> {
        std::fs::write(file, vec![fill; len]).unwrap();
        Loop::attach(file, false)
    }

    /// The device's path.
    pub fn path(&self) -> &Path {
        Path::new(&self.0)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// A mount made by the test, unmounted when dropped.
pub struct Mounted {
    dir: PathBuf,
}

impl Mounted {
    /// Mounts with `mount ARGS... DIR`; `None`, after a loud skip notice, when impossible
    /// (mounting needs root; a panic under `BLKDELTA_REQUIRE_TOOLS=1`).
    pub fn new(args: &[&str], dir: &Path) -> Option<Mounted> {
        std::fs::create_dir_all(dir).unwrap();
        let what = format!("`mount {}`", args.join(" "));
        match Command::new("mount").args(args).arg(dir).output() {
            Ok(o) if o.status.success() => Some(Mounted {
                dir: dir.to_path_buf(),
            }),
            Ok(o) => {
                let err = String::from_utf8_lossy(&o.stderr);
                cannot(&what, &format!("{} (needs root)", err.trim()));
                None
            }
            Err(e) => {
                cannot(&what, &e.to_string());
                None
            }
        }
    }

    /// A tmpfs of `size` (`mount -o size=SIZE`) on `dir`.
    pub fn tmpfs(dir: &Path, size: &str) -> Option<Mounted> {
        Mounted::new(
            &["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"],
            dir,
        )
    }

    /// `mount -o remount,OPTS DIR`.
    pub fn remount(&self, opts: &str) {
        run(Command::new("mount")
            .args(["-o", &format!("remount,{opts}")])
            .arg(&self.dir));
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.dir)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Free bytes of the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: statvfs only writes into the zeroed struct we pass; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(rc, 0, "statvfs {dir:?}");
    st.f_bavail as u64 * st.f_frsize as u64
}
