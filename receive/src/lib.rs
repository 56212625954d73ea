//! The receiving side of blkdelta: targets, the apply pipeline and the replica's state.
//!
//! A stream is applied to a [`target::Target`] (a raw file or a block device). Before the first
//! write the replica is marked in progress in its state file; each snapshot-end record is made
//! durable (data synced, then the state replaced atomically), so an interrupted apply leaves the
//! replica marked in progress, never reported as holding a snapshot it does not hold.
//!
//! ```no_run
//! use blkdelta_receive::apply::{receive_path, ReceiveOptions};
//! let file = std::fs::File::open("delta.bd").unwrap();
//! let stream = blkdelta_common::stream::StreamReader::new(std::io::BufReader::new(file)).unwrap();
//! let path = std::path::Path::new("/srv/vm.raw");
//! let none = blkdelta_common::progress::NoProgress;
//! receive_path(stream, path, None, &ReceiveOptions::default(), &none).unwrap();
//! ```

// unsafe only where a syscall needs it and rustix has no safe call for it (`sync_file_range`
// in `target`, the `BLKZEROOUT` ioctl in `target::blockdev`), each block with a SAFETY line.
#![deny(unsafe_code)]

pub mod apply;
pub mod hashes;
pub mod history;
pub mod identity;
pub mod kept;
pub mod plan;
pub mod prune;
pub mod state;
pub mod target;
pub mod undo;
mod writers;

use std::io;
use std::path::PathBuf;

use blkdelta_common::{ImageError, StreamError};

/// Errors of the receiving side.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    /// The stream is unreadable, corrupt or truncated.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Opening or creating the target failed.
    #[error("cannot open target {path}")]
    OpenTarget {
        /// The target path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another process has the target open, as QEMU's image locks on it say (or taking them
    /// failed): the target was opened but nothing was written. Names the target.
    #[error(transparent)]
    TargetLocked(ImageError),
    /// An operation on the target failed.
    #[error("{op} at offset {offset} (+{len} bytes) on the target failed")]
    Target {
        /// What was being done (write, zero, discard, flush, resize).
        op: &'static str,
        /// Disk offset.
        offset: u64,
        /// Length.
        len: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The target cannot hold the stream's virtual size.
    #[error("target holds {target} bytes but the stream needs {needed}")]
    TooSmall {
        /// Target size.
        target: u64,
        /// Size needed.
        needed: u64,
    },
    /// Reading or writing the replica state failed.
    #[error("replica state {path}: {reason}")]
    State {
        /// The state file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// Reading or writing the replica state (or its lock, or its kept hashes) failed.
    #[error("replica state {path}: cannot {op}")]
    StateIo {
        /// The file.
        path: PathBuf,
        /// What was being done (read, write, lock, ...).
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Another receive is applying to this replica.
    #[error("another blkdelta receive{} is applying to this replica (its lock is {}): wait for it to end", .pid.map_or(String::new(), |p| format!(" (pid {p})")), .lock.display())]
    Busy {
        /// The lock file.
        lock: PathBuf,
        /// The process holding it, as it wrote in the lock file.
        pid: Option<u32>,
    },
    /// Reading the replica back (its old contents for an undo stream, its blocks to hash
    /// them) failed.
    #[error("reading the replica failed")]
    ReadReplica(#[source] ImageError),
    /// Writing or continuing the undo stream failed on I/O.
    #[error("undo stream {path}: cannot {op}")]
    UndoIo {
        /// The undo file.
        path: PathBuf,
        /// What was being done.
        op: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing or continuing the undo stream failed.
    #[error("undo stream {path}: {reason}")]
    Undo {
        /// The undo file.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// The stream does not apply to this replica as it is; nothing was written. Names the one
    /// switch that overrides the check, if any.
    #[error("{why} (nothing written{})", switch.map_or(String::new(), |s| format!("; {s} overrides")))]
    Refused {
        /// What is wrong, and what to do.
        why: String,
        /// The `receive` switch that overrides this check (`--rebase`, `--overwrite`,
        /// `--rewind`, `--repair`), if any.
        switch: Option<&'static str>,
    },
    /// The apply failed part way for a reason of its own (a worker thread stopped).
    #[error("{0}")]
    Failed(String),
    /// A prune's target is not a qcow2 image: a raw file or block device has no snapshots.
    #[error("{} is not a qcow2 image: a raw file or block device has no snapshots to prune", .path.display())]
    NotQcow2 {
        /// The target.
        path: PathBuf,
    },
    /// A prune found an apply in progress on the replica: it deletes nothing until the next
    /// receive finishes or resumes that apply.
    #[error("{}: the replica holds {what}: the next receive finishes or resumes it; nothing was pruned", .path.display())]
    ApplyInProgress {
        /// The replica.
        path: PathBuf,
        /// What the state says, as [`state::describe`] puts it.
        what: String,
    },
    /// The replica's snapshot table changed between a prune's plan and its deletion (another
    /// process wrote the image meanwhile): nothing was deleted.
    #[error("{}: its snapshots changed while prune was planning; nothing was deleted: run it again", .path.display())]
    SnapshotsChanged {
        /// The replica.
        path: PathBuf,
    },
    /// Reading a qcow2 replica, or writing it, failed or was refused (a corrupt image, or one
    /// the qcow2 writer cannot keep consistent).
    #[error("cannot {op} {}", .path.display())]
    Qcow2 {
        /// The replica.
        path: PathBuf,
        /// What was being done (read, write, delete snapshots of).
        op: &'static str,
        /// The cause.
        #[source]
        source: ImageError,
    },
}

impl ReceiveError {
    /// A refusal that `switch` overrides.
    pub fn refused(why: impl Into<String>, switch: &'static str) -> Self {
        ReceiveError::Refused {
            why: why.into(),
            switch: Some(switch),
        }
    }

    /// A refusal that no switch overrides.
    pub fn refused_outright(why: impl Into<String>) -> Self {
        ReceiveError::Refused {
            why: why.into(),
            switch: None,
        }
    }
}
