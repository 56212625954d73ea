//! NBD servers for the tests: `qemu-nbd` exporting an image read-only as `drive0`, on a unix
//! socket or on TCP at 127.0.0.1, started with `--fork` (serving once it returns) and stopped
//! (SIGTERM, by the pid it wrote) when dropped.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A running `qemu-nbd`.
pub struct QemuNbd {
    pid: i32,
    /// The export's URI.
    pub uri: String,
}

impl QemuNbd {
    /// `qemu-nbd -r -f qcow2 -x drive0 -t -k SOCK EXTRA IMG`.
    pub fn unix(img: &Path, sock: &Path, extra: &[&str]) -> QemuNbd {
        let mut args = vec!["-k", sock.to_str().unwrap()];
        args.extend_from_slice(extra);
        let pid = start(img, &args).unwrap_or_else(|e| panic!("qemu-nbd: {e}"));
        QemuNbd {
            pid,
            uri: format!("nbd+unix:///drive0?socket={}", sock.display()),
        }
    }

    /// `qemu-nbd -r -f qcow2 -x drive0 -t -b 127.0.0.1 -p PORT EXTRA IMG` on a free port.
    pub fn tcp(img: &Path, extra: &[&str]) -> QemuNbd {
        let mut last = String::new();
        // The port is free when picked; another process may take it first: pick again.
        for _ in 0..5 {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let port = listener.local_addr().unwrap().port().to_string();
            drop(listener);
            let mut args = vec!["-b", "127.0.0.1", "-p", &port];
            args.extend_from_slice(extra);
            match start(img, &args) {
                Ok(pid) => {
                    return QemuNbd {
                        pid,
                        uri: format!("nbd://127.0.0.1:{port}/drive0"),
                    }
                }
                Err(e) => last = e,
            }
        }
        panic!("qemu-nbd did not start on TCP: {last}");
    }
}

/// Starts qemu-nbd in the background; its pid once it serves.
fn start(img: &Path, args: &[&str]) -> Result<i32, String> {
    let pid_file = PathBuf::from(format!("{}.{}.pid", img.display(), std::process::id()));
    let out = Command::new("qemu-nbd")
        .args(["--fork", "--pid-file"])
        .arg(&pid_file)
        .args(["-r", "-f", "qcow2", "-x", "drive0", "-t"])
        .args(args)
        .arg(img)
        .output()
        .map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let pid = std::fs::read_to_string(&pid_file).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&pid_file);
    pid.trim().parse().map_err(|e| format!("pid file: {e}"))
}

impl Drop for QemuNbd {
    /// Stops the server and waits until it is gone (its image locks released).
    fn drop(&mut self) {
        // SAFETY: kill only reads its integer arguments: the pid of the server started here.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let stat = format!("/proc/{}/stat", self.pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            match std::fs::read_to_string(&stat) {
                // The state is the first field after the name in parentheses.
                Ok(s)
                    if !s
                        .rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z')) =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                _ => return,
            }
        }
    }
}
