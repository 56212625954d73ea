//! Child processes a test keeps running: killed and reaped when dropped, so that none
//! outlives its test, even a failed one.

use std::io::Write;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::time::Duration;

use super::run::bin;

/// A child process killed (SIGKILL) and reaped when dropped.
pub struct Reaped(pub Child);

impl Reaped {
    /// Kills the child at once and reads what it wrote to stderr (when piped).
    pub fn stderr_after_exit(&mut self) -> String {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let mut err = String::new();
        if let Some(e) = self.0.stderr.as_mut() {
            let _ = std::io::Read::read_to_string(e, &mut err);
        }
        err
    }
}

impl std::ops::Deref for Reaped {
    type Target = Child;

    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A `blkdelta receive -q REPLICA` reading its stream from a pipe the test writes.
pub struct Receiver {
    pub child: Reaped,
    pub stdin: Option<ChildStdin>,
}

impl Receiver {
    pub fn start(replica: &Path, extra: &[&str]) -> Receiver {
        let mut child = Command::new(bin())
            .args(["receive", "-q"])
            .arg(replica)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take();
        Receiver {
            child: Reaped(child),
            stdin,
        }
    }

    /// Feeds `bytes` in 64 KiB pieces, pausing after every MiB: the receiver reads at our pace.
    /// The pipe stays open.
    pub fn feed(&mut self, bytes: &[u8]) {
        let stdin = self.stdin.as_mut().unwrap();
        for (i, piece) in bytes.chunks(64 << 10).enumerate() {
            if let Err(e) = stdin.write_all(piece) {
                let err = self.child.stderr_after_exit();
                panic!("the receiver stopped reading its stream ({e}): {err}");
            }
            if i % 16 == 15 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }

    /// Panics with the receiver's stderr if it has exited.
    pub fn assert_running(&mut self, what: &str) {
        if self.child.0.try_wait().unwrap().is_some() {
            let err = self.child.stderr_after_exit();
            panic!("{what}: the receiver exited before it was killed: {err}");
        }
    }

    /// Kills the receiver at once and reads what it wrote to stderr.
    pub fn stderr_after_exit(&mut self) -> String {
        self.child.stderr_after_exit()
    }

    /// Bytes written to the pipe that the receiver has not read yet.
    pub fn unread(&self) -> i32 {
        let fd = self.stdin.as_ref().unwrap().as_raw_fd();
        let mut n: libc::c_int = 0;
        // SAFETY: FIONREAD writes one c_int through the pointer, which is valid for writes.
        let rc = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut n as *mut libc::c_int) };
        assert_eq!(rc, 0, "FIONREAD on the pipe");
        n
    }

    /// Closes the pipe and waits for the receive to end.
    pub fn finish(mut self) -> Output {
        drop(self.stdin.take());
        let mut stderr = Vec::new();
        let pipe = self.child.0.stderr.as_mut().unwrap();
        std::io::Read::read_to_end(pipe, &mut stderr).unwrap();
        let status = self.child.0.wait().unwrap();
        Output {
            status,
            stdout: Vec::new(),
            stderr,
        }
    }
}
