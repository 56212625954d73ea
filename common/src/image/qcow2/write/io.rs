//! Reads and writes of the image file, each failure naming what was read or written.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::ImageError;

/// Reads `len` bytes of `what` at `offset`, refusing a range past `file_len`.
pub(crate) fn read_at(
    file: &File,
    what: &'static str,
    offset: u64,
    len: u64,
    file_len: u64,
) -> Result<Vec<u8>, ImageError> {
    crate::image::qcow2::bytes::read_checked(file, file_len, what, offset, len)
}

/// Fills `buf` from `offset`; bytes past the end of the file read as zeros (a cluster
/// allocated at the end and not written yet).
pub(crate) fn read_into(
    file: &File,
    what: &'static str,
    buf: &mut [u8],
    offset: u64,
) -> Result<(), ImageError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(());
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(source) => {
                return Err(ImageError::WriteFailed {
                    what,
                    op: "read",
                    offset: offset + done as u64,
                    source,
                })
            }
        }
    }
    Ok(())
}

/// Writes all of `buf` (`what`) at `offset`.
pub(crate) fn write_at(
    file: &File,
    what: &'static str,
    buf: &[u8],
    offset: u64,
) -> Result<(), ImageError> {
    file.write_all_at(buf, offset)
        .map_err(|source| ImageError::WriteFailed {
            what,
            op: "write",
            offset,
            source,
        })
}

/// Makes every write so far durable.
pub(crate) fn sync(file: &File) -> Result<(), ImageError> {
    file.sync_data().map_err(|source| ImageError::WriteFailed {
        what: "image",
        op: "flush",
        offset: 0,
        source,
    })
}

/// Gives the host range `[offset, offset + len)` back to the filesystem (best effort: the
/// clusters are free whether or not the filesystem takes them back).
pub(crate) fn punch(file: &File, offset: u64, len: u64) {
    use rustix::fs::FallocateFlags;
    let _ = rustix::fs::fallocate(
        file,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        offset,
        len,
    );
}
