//! QEMU's image locks, taken and checked the way QEMU's `file-posix` driver does, for a reader
//! (a sender, `checksum`) and for a writer that shares nothing (a receiver's target).
//!
//! A QEMU process that opens an image file announces its permissions with shared OFD
//! byte-range locks (`F_OFD_SETLK`, `F_RDLCK`) on single bytes of the file, one pair of bytes
//! per permission bit `i` (`block/file-posix.c`, `raw_apply_lock_bytes`):
//!
//! ```text
//! byte 100 + i   "I hold permission i"            i = 0 consistent read, 1 write,
//! byte 200 + i   "I do not share permission i"        2 write unchanged, 3 resize
//! ```
//!
//! An opener then tests, with `F_OFD_GETLK` for a write lock, that no other open file holds
//! byte `200 + i` for a permission it wants, nor byte `100 + i` for a permission it does not
//! share (`raw_check_lock_bytes`). Checked against qemu 10 with `/proc/locks`:
//!
//! ```text
//!                                       locks              tests
//! writer (a VM, qemu-io, the daemon)    100 101 103 201 203
//! reader (qemu-img convert, qemu-io -r) 100 201 203        200 101 103
//! reader with -U (force share)          100                200
//! blkdelta receive (a block job target) 100 101 103        200 101 103
//!                                       200 201 203        100 201 203
//! ```
//!
//! So a reader refuses an image a writer or resizer holds, and a writer cannot start while a
//! reader holds its locks (it finds byte 201 taken). With force share only byte 100 is
//! taken, which no ordinary writer minds, and only byte 200 is tested: nobody, not even
//! `qemu-img -U`, reads an image whose builder shares no consistent reads (a block job's
//! target). A receiver writes a replica that is not consistent until the stream ends, so it
//! takes every permission and shares none, as a block job's target does: nobody reads, writes
//! or resizes the replica meanwhile, and a receive does not start on an image anyone holds.
//! The locks belong to the open file description: they last as long as the `File` and go away
//! when it is closed, so an image or target that keeps its `File` keeps its locks.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

mod conflict;

pub use conflict::LockConflict;
use conflict::{CONSISTENT_READ, PERM_BASE, RESIZE, SHARED_BASE, WRITE};

use super::OpenOptions;
use crate::ImageError;

/// Bytes a consistent reader locks: it reads, and shares neither writing nor resizing.
const READER_TAKES: [u64; 3] = [
    PERM_BASE + CONSISTENT_READ,
    SHARED_BASE + WRITE,
    SHARED_BASE + RESIZE,
];
/// Bytes a consistent reader tests: nobody refuses it reads, nobody writes or resizes.
const READER_TESTS: [u64; 3] = [
    SHARED_BASE + CONSISTENT_READ,
    PERM_BASE + WRITE,
    PERM_BASE + RESIZE,
];

/// Bytes a writer that shares nothing locks: it reads, writes and resizes, and shares none of
/// these.
const WRITER_TAKES: [u64; 6] = [
    PERM_BASE + CONSISTENT_READ,
    PERM_BASE + WRITE,
    PERM_BASE + RESIZE,
    SHARED_BASE + CONSISTENT_READ,
    SHARED_BASE + WRITE,
    SHARED_BASE + RESIZE,
];
/// Bytes a writer that shares nothing tests: `200 + i` for each permission it takes, `100 + i`
/// for each it does not share, which is all six. In the order that names a holder best:
/// another writer that shares nothing, then a writer or resizer (a VM also reads), then a
/// reader, then a process that only refuses to share.
const WRITER_TESTS: [u64; 6] = [
    SHARED_BASE + CONSISTENT_READ,
    PERM_BASE + WRITE,
    PERM_BASE + RESIZE,
    PERM_BASE + CONSISTENT_READ,
    SHARED_BASE + WRITE,
    SHARED_BASE + RESIZE,
];

/// Takes QEMU's reader locks on `file` (opened read-only from `path`) and checks that no
/// other process holds the image in a way that forbids reading it. With
/// [`OpenOptions::force_share`], takes and tests only what `qemu-img -U` does.
///
/// The locks last as long as `file` stays open. On a filesystem without OFD locks, reads
/// proceed unlocked, as QEMU's do.
pub fn lock_for_read(file: &File, path: &Path, options: &OpenOptions) -> Result<(), ImageError> {
    let (takes, tests): (&[u64], &[u64]) = if options.force_share {
        (&READER_TAKES[..1], &READER_TESTS[..1])
    } else {
        (&READER_TAKES, &READER_TESTS)
    };
    lock_and_test(file, path, takes, tests, LockConflict::of_tested)
}

/// Takes the locks of a writer that shares nothing on `file` (opened for writing from `path`):
/// it holds consistent read, write and resize, and shares none of them, as the target of a
/// QEMU block job does. Then checks, as QEMU's `raw_check_lock_bytes` does, that no other
/// process holds any of these six bytes: nobody else may have the target open while it is
/// written, and nobody may open it until `file` is closed.
///
/// On a filesystem without OFD locks, writes proceed unlocked, as QEMU's do.
pub fn lock_for_write(file: &File, path: &Path) -> Result<(), ImageError> {
    lock_and_test(
        file,
        path,
        &WRITER_TAKES,
        &WRITER_TESTS,
        LockConflict::of_tested_by_writer,
    )
}

/// Takes shared locks on the bytes `takes`, then fails with the conflict `of_tested` names for
/// the first of `tests` another open file description holds.
fn lock_and_test(
    file: &File,
    path: &Path,
    takes: &[u64],
    tests: &[u64],
    of_tested: fn(u64) -> LockConflict,
) -> Result<(), ImageError> {
    let in_use = |conflict| ImageError::InUse {
        path: path.to_path_buf(),
        conflict,
    };
    let lock_err = |source| ImageError::Lock {
        path: path.to_path_buf(),
        source,
    };
    // Lock first, then test, as QEMU does: of two openers starting together, at least one
    // sees the other.
    for &byte in takes {
        match ofd::read_lock(file, byte) {
            Ok(()) => {}
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) if busy(&e) => return Err(in_use(LockConflict::Exclusive { byte })),
            Err(e) => return Err(lock_err(e)),
        }
    }
    for &byte in tests {
        match ofd::held_by_other(file, byte) {
            Ok(false) => {}
            Ok(true) => return Err(in_use(of_tested(byte))),
            Err(e) if unsupported(&e) => return Ok(()),
            Err(e) => return Err(lock_err(e)),
        }
    }
    Ok(())
}

/// Errors meaning "this filesystem has no OFD locks" (QEMU then proceeds unlocked).
fn unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL | libc::ENOTSUP | libc::ENOLCK | libc::ENOSYS)
    )
}

/// Errors meaning "another process holds a conflicting lock".
fn busy(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EAGAIN | libc::EACCES))
}

/// The two `fcntl` calls, on one byte each.
mod ofd {
    use super::{AsRawFd, File};
    use std::io;

    /// A `struct flock` for the single byte at `byte`.
    #[allow(unsafe_code)]
    fn one_byte(l_type: libc::c_int, byte: u64) -> io::Result<libc::flock> {
        let start = libc::off_t::try_from(byte).map_err(|_| io::ErrorKind::InvalidInput)?;
        // SAFETY: `flock` is a C struct of integers (and, on some targets, integer padding):
        // all zeros is a valid value, and OFD locks require `l_pid` to be 0.
        let mut fl: libc::flock = unsafe { std::mem::zeroed() };
        fl.l_type = l_type as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = start;
        fl.l_len = 1;
        Ok(fl)
    }

    /// Takes a shared lock on one byte for the open file description of `file`.
    pub(super) fn read_lock(file: &File, byte: u64) -> io::Result<()> {
        set_lock(file, libc::F_RDLCK, byte)
    }

    /// Takes an exclusive lock on one byte (`file` must be open for writing): only the
    /// tests do, playing a non-QEMU lock holder.
    #[cfg(test)]
    pub(super) fn write_lock(file: &File, byte: u64) -> io::Result<()> {
        set_lock(file, libc::F_WRLCK, byte)
    }

    #[allow(unsafe_code)]
    fn set_lock(file: &File, l_type: libc::c_int, byte: u64) -> io::Result<()> {
        let fl = one_byte(l_type, byte)?;
        // SAFETY: F_OFD_SETLK reads a `struct flock` through the pointer, which points to a
        // live, initialised value for the duration of the call; the fd is open.
        let rc =
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, std::ptr::from_ref(&fl)) };
        if rc == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Whether another open file description holds any lock on one byte, found as QEMU does
    /// (`qemu_lock_fd_test`): by asking whether a write lock could be taken there. Our own
    /// locks on `file` never count.
    #[allow(unsafe_code)]
    pub(super) fn held_by_other(file: &File, byte: u64) -> io::Result<bool> {
        let mut fl = one_byte(libc::F_WRLCK, byte)?;
        // SAFETY: F_OFD_GETLK reads and overwrites the `struct flock` the pointer designates,
        // which is live, initialised and exclusively borrowed for the call; the fd is open.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_OFD_GETLK,
                std::ptr::from_mut(&mut fl),
            )
        };
        if rc == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file to lock, and a way to open it again as another open file description.
    fn image() -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(4096).unwrap();
        f
    }

    fn reopen(f: &tempfile::NamedTempFile) -> File {
        File::open(f.path()).unwrap()
    }

    const SHARE: OpenOptions = OpenOptions { force_share: true };
    const LOCK: OpenOptions = OpenOptions { force_share: false };

    /// Whether this filesystem answers OFD lock queries; a test that needs it skips loudly.
    fn have_ofd(f: &tempfile::NamedTempFile) -> bool {
        let ok = ofd::held_by_other(&reopen(f), 100).is_ok();
        if !ok {
            eprintln!("SKIPPED: the temporary directory's filesystem has no OFD locks");
        }
        ok
    }

    /// Takes the locks QEMU's writer takes (100 101 103 201 203), as a VM does.
    fn qemu_writer(f: &tempfile::NamedTempFile) -> File {
        let w = reopen(f);
        for byte in [100, 101, 103, 201, 203] {
            ofd::read_lock(&w, byte).unwrap();
        }
        w
    }

    #[test]
    fn a_writer_cannot_start_while_we_read() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let reader = reopen(&f);
        lock_for_read(&reader, f.path(), &LOCK).unwrap();
        // QEMU's writer tests 200+i for what it holds (0, 1, 3) and 100+i for what it does
        // not share (1, 3): it finds our "write not shared" and "resize not shared" bytes.
        let writer = reopen(&f);
        assert!(ofd::held_by_other(&writer, 201).unwrap());
        assert!(ofd::held_by_other(&writer, 203).unwrap());
        for free in [101, 103, 200] {
            assert!(!ofd::held_by_other(&writer, free).unwrap(), "{free}");
        }
        // Closing the reader's file releases everything.
        drop(reader);
        assert!(!ofd::held_by_other(&writer, 201).unwrap());
    }

    #[test]
    fn readers_share_even_within_one_process() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let (a, b) = (reopen(&f), reopen(&f));
        lock_for_read(&a, f.path(), &LOCK).unwrap();
        lock_for_read(&b, f.path(), &LOCK).unwrap();
        lock_for_read(&reopen(&f), f.path(), &SHARE).unwrap();
    }

    #[test]
    fn a_writer_blocks_us_unless_force_share() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let _vm = qemu_writer(&f);
        let err = lock_for_read(&reopen(&f), f.path(), &LOCK).unwrap_err();
        assert!(
            matches!(
                err,
                ImageError::InUse {
                    conflict: LockConflict::Writer,
                    ..
                }
            ),
            "{err}"
        );
        let line = err.to_string();
        assert!(
            line.contains("--force-share") && !line.contains('\n'),
            "{line}"
        );
        lock_for_read(&reopen(&f), f.path(), &SHARE).unwrap();
    }

    #[test]
    fn a_resizer_blocks_us() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let r = reopen(&f);
        ofd::read_lock(&r, 103).unwrap();
        let err = lock_for_read(&reopen(&f), f.path(), &LOCK).unwrap_err();
        assert!(matches!(
            err,
            ImageError::InUse {
                conflict: LockConflict::Resizer,
                ..
            }
        ));
    }

    #[test]
    fn unshared_consistent_read_blocks_even_force_share() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let builder = reopen(&f);
        ofd::read_lock(&builder, 200).unwrap();
        for options in [LOCK, SHARE] {
            let err = lock_for_read(&reopen(&f), f.path(), &options).unwrap_err();
            assert!(matches!(
                err,
                ImageError::InUse {
                    conflict: LockConflict::NoConsistentRead,
                    ..
                }
            ));
        }
    }

    #[test]
    fn force_share_takes_only_the_read_byte() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let reader = reopen(&f);
        lock_for_read(&reader, f.path(), &SHARE).unwrap();
        let other = reopen(&f);
        assert!(ofd::held_by_other(&other, 100).unwrap());
        for free in [101, 103, 200, 201, 203] {
            assert!(!ofd::held_by_other(&other, free).unwrap(), "{free}");
        }
    }

    #[test]
    fn an_exclusive_lock_on_a_byte_we_take_is_a_conflict() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let other = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap();
        ofd::write_lock(&other, 201).unwrap();
        let err = lock_for_read(&reopen(&f), f.path(), &LOCK).unwrap_err();
        assert!(matches!(
            err,
            ImageError::InUse {
                conflict: LockConflict::Exclusive { byte: 201 },
                ..
            }
        ));
    }

    /// Opens the file again for writing, as a receiver opens its target.
    fn reopen_rw(f: &tempfile::NamedTempFile) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(f.path())
            .unwrap()
    }

    /// The conflict `lock_for_write` reports on `f`, panicking if it finds none.
    fn write_conflict(f: &tempfile::NamedTempFile) -> LockConflict {
        match lock_for_write(&reopen_rw(f), f.path()) {
            Err(ImageError::InUse { conflict, .. }) => conflict,
            other => panic!("expected a conflict, got {other:?}"),
        }
    }

    #[test]
    fn a_target_we_write_refuses_a_vm_and_readers() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let target = reopen_rw(&f);
        lock_for_write(&target, f.path()).unwrap();
        // QEMU's writer tests 200+i for what it holds (0, 1, 3) and 100+i for what it does
        // not share (1, 3): it finds every one of them taken.
        let vm = reopen(&f);
        for byte in [200, 201, 203, 101, 103] {
            assert!(ofd::held_by_other(&vm, byte).unwrap(), "{byte}");
        }
        // Readers, even with force share, find consistent reads not shared.
        for options in [LOCK, SHARE] {
            let err = lock_for_read(&reopen(&f), f.path(), &options).unwrap_err();
            assert!(
                matches!(
                    err,
                    ImageError::InUse {
                        conflict: LockConflict::NoConsistentRead,
                        ..
                    }
                ),
                "{err}"
            );
            assert!(err.to_string().contains("blkdelta receive"), "{err}");
        }
        // And a second writer finds the first.
        assert_eq!(write_conflict(&f), LockConflict::TargetBeingWritten);
    }

    #[test]
    fn we_do_not_write_a_target_a_vm_or_a_reader_holds() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let vm = qemu_writer(&f);
        assert_eq!(write_conflict(&f), LockConflict::TargetInUse { byte: 101 });
        drop(vm);
        for options in [LOCK, SHARE] {
            let reader = reopen(&f);
            lock_for_read(&reader, f.path(), &options).unwrap();
            assert_eq!(write_conflict(&f), LockConflict::TargetInUse { byte: 100 });
        }
        let resizer = reopen(&f);
        ofd::read_lock(&resizer, 103).unwrap();
        assert_eq!(write_conflict(&f), LockConflict::TargetInUse { byte: 103 });
        drop(resizer);
        // A process that only refuses to share writing is found too.
        let unsharer = reopen(&f);
        ofd::read_lock(&unsharer, 201).unwrap();
        assert_eq!(write_conflict(&f), LockConflict::TargetInUse { byte: 201 });
    }

    #[test]
    fn a_target_conflict_is_one_line_without_force_share() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let _vm = qemu_writer(&f);
        let err = lock_for_write(&reopen_rw(&f), f.path()).unwrap_err();
        let line = err.to_string();
        let name = f.path().display().to_string();
        assert!(line.starts_with(&name), "{line}");
        assert!(line.contains("in use by another process"), "{line}");
        assert!(line.contains("write lock"), "{line}");
        assert!(
            !line.contains("force-share") && !line.contains('\n'),
            "{line}"
        );
        let messages = [
            LockConflict::TargetBeingWritten.to_string(),
            LockConflict::TargetInUse { byte: 100 }.to_string(),
            LockConflict::TargetInUse { byte: 103 }.to_string(),
            LockConflict::TargetInUse { byte: 203 }.to_string(),
        ];
        for m in messages {
            assert!(!m.contains("force-share") && !m.contains('\n'), "{m}");
        }
    }

    #[test]
    fn closing_the_target_releases_its_locks() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let target = reopen_rw(&f);
        lock_for_write(&target, f.path()).unwrap();
        // A second handle on the same open file description keeps the locks: they go only
        // with the last one.
        let dup = target.try_clone().unwrap();
        drop(target);
        assert_eq!(write_conflict(&f), LockConflict::TargetBeingWritten);
        drop(dup);
        let other = reopen(&f);
        for byte in WRITER_TAKES {
            assert!(!ofd::held_by_other(&other, byte).unwrap(), "{byte}");
        }
        lock_for_read(&reopen(&f), f.path(), &LOCK).unwrap();
        lock_for_write(&reopen_rw(&f), f.path()).unwrap();
    }

    #[test]
    fn an_exclusive_lock_on_a_target_byte_is_a_conflict() {
        let f = image();
        if !have_ofd(&f) {
            return;
        }
        let other = reopen_rw(&f);
        ofd::write_lock(&other, 203).unwrap();
        assert_eq!(write_conflict(&f), LockConflict::Exclusive { byte: 203 });
    }
}
