//! One sync at a time per source and per target: an exclusive `flock` on a lock file named
//! after each end, held until the cycle ends (the kernel drops it if the process dies).

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use rustix::fs::{flock, FlockOperation};

/// A lock held until dropped.
#[derive(Debug)]
pub struct Held(#[allow(dead_code)] Vec<File>);

/// Where lock files go: the runtime directory when there is one, else the temporary one.
fn lock_dir() -> PathBuf {
    std::env::var_os("XDG_RUNTIME_DIR")
        .map(PathBuf::from)
        .filter(|d| d.is_dir())
        .unwrap_or_else(std::env::temp_dir)
}

/// Takes the lock of every end in `keys` (`what`, for messages, then a key naming it
/// uniquely), in the order given; waits for another sync to end when `wait`, else refuses.
pub fn take(keys: &[(String, String)], wait: bool) -> Result<Held> {
    let mut files = Vec::new();
    for (what, key) in keys {
        let hash = blake3::hash(key.as_bytes()).to_hex();
        let path = lock_dir().join(format!("blkdelta-sync-{}.lock", &hash[..16]));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("cannot open the lock file {}", path.display()))?;
        let op = if wait {
            FlockOperation::LockExclusive
        } else {
            FlockOperation::NonBlockingLockExclusive
        };
        flock(&file, op).map_err(|e| {
            if e == rustix::io::Errno::WOULDBLOCK {
                anyhow!("another blkdelta sync of {what} is running (--wait waits for it to end)")
            } else {
                anyhow!("cannot lock {}: {e}", path.display())
            }
        })?;
        files.push(file);
    }
    Ok(Held(files))
}

/// The key of a local path: its canonical form (of its directory, for a file not there yet).
pub fn local_key(path: &std::path::Path) -> String {
    if let Ok(p) = path.canonicalize() {
        return p.display().to_string();
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    dir.join(path.file_name().unwrap_or_default())
        .display()
        .to_string()
}
