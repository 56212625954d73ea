//! What a lock found on one of QEMU's lock bytes means: [`LockConflict`], the reason an image
//! cannot be read (or a target written) that [`crate::ImageError::InUse`] carries. A leaf
//! module, so the error type can name it without importing the locking code back.

/// First of QEMU's "holds permission i" bytes (`RAW_LOCK_PERM_BASE`).
pub(super) const PERM_BASE: u64 = 100;
/// First of QEMU's "does not share permission i" bytes (`RAW_LOCK_SHARED_BASE`).
pub(super) const SHARED_BASE: u64 = 200;
/// `BLK_PERM_CONSISTENT_READ` is bit 0.
pub(super) const CONSISTENT_READ: u64 = 0;
/// `BLK_PERM_WRITE` is bit 1.
pub(super) const WRITE: u64 = 1;
/// `BLK_PERM_RESIZE` is bit 3.
pub(super) const RESIZE: u64 = 3;

/// Why another process's locks forbid reading an image, or writing a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockConflict {
    /// Another process holds write permission (byte 101): a running VM, most likely.
    Writer,
    /// Another process holds resize permission (byte 103).
    Resizer,
    /// Another process shares no consistent reads (byte 200): it is building the image.
    NoConsistentRead,
    /// Another process holds an exclusive lock on one of QEMU's lock bytes (not QEMU's doing).
    Exclusive {
        /// The byte offset of the lock.
        byte: u64,
    },
    /// A target to write is open in another process (a VM, qemu-img, a blkdelta reader): it
    /// holds a permission a writer that shares nothing does not share (byte 100, 101 or
    /// 103), or does not share one that writer takes (byte 201 or 203).
    TargetInUse {
        /// The lock byte found held.
        byte: u64,
    },
    /// A target to write is being written by another process that shares nothing (byte 200):
    /// another blkdelta receive, or a QEMU block job.
    TargetBeingWritten,
}

impl LockConflict {
    /// The conflict a lock found on a tested `byte` means.
    pub(super) fn of_tested(byte: u64) -> Self {
        match byte {
            b if b == PERM_BASE + WRITE => LockConflict::Writer,
            b if b == PERM_BASE + RESIZE => LockConflict::Resizer,
            _ => LockConflict::NoConsistentRead,
        }
    }

    /// The conflict a lock found on a `byte` a writer that shares nothing tests means.
    pub(super) fn of_tested_by_writer(byte: u64) -> Self {
        if byte == SHARED_BASE + CONSISTENT_READ {
            LockConflict::TargetBeingWritten
        } else {
            LockConflict::TargetInUse { byte }
        }
    }
}

/// What the holder of a lock `byte` a writer tests does to the target, in words.
fn holder_does(byte: u64) -> &'static str {
    match byte {
        b if b == PERM_BASE + WRITE => "writes it (QEMU's write lock is held)",
        b if b == PERM_BASE + RESIZE => "may resize it (QEMU's resize lock is held)",
        b if b == PERM_BASE + CONSISTENT_READ => "reads it (QEMU's read lock is held)",
        b if b == SHARED_BASE + WRITE => "lets nobody else write it (QEMU's lock byte 201 is held)",
        _ => "lets nobody else resize it (QEMU's lock byte 203 is held)",
    }
}

/// What `--force-share` does to a running image, said once for every message that offers it.
const FORCE_SHARE_HINT: &str = "pass --force-share to read it anyway (safe for internal \
     snapshots, which do not change unless deleted meanwhile; the active layer may change while \
     it is read)";

impl std::fmt::Display for LockConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LockConflict::Writer => write!(
                f,
                "is in use by a writer (a running VM?): QEMU holds its write lock; stop the VM, \
                 or {FORCE_SHARE_HINT}"
            ),
            LockConflict::Resizer => write!(
                f,
                "is in use by a process that may resize it: QEMU holds its resize lock; stop \
                 it, or {FORCE_SHARE_HINT}"
            ),
            LockConflict::NoConsistentRead => f.write_str(
                "is being written by a process that lets nobody read it (a QEMU block job or a \
                 blkdelta receive building it?): its content is not consistent until that \
                 ends, and --force-share does not override this, as with qemu-img -U",
            ),
            LockConflict::Exclusive { byte } => write!(
                f,
                "is locked by another process (an exclusive lock on QEMU's lock byte {byte}); \
                 stop it and retry"
            ),
            LockConflict::TargetInUse { byte } => write!(
                f,
                "is in use by another process (a VM or qemu-img?) that {}: stop it and retry; \
                 a replica is written only while nothing else has it open",
                holder_does(*byte)
            ),
            LockConflict::TargetBeingWritten => f.write_str(
                "is being written by another process that shares nothing (another blkdelta \
                 receive, or a QEMU block job?): wait for it to end and retry",
            ),
        }
    }
}
