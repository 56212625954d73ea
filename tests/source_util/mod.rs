//! Helpers for the raw-source tests (change maps, compare, raw seeds): writing and punching
//! ranges of raw files, and sending with source options through a real pipe.
#![allow(dead_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::{Command, Output};

use crate::common::bin;

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;

/// `len` pseudo-random (incompressible) bytes from `seed`.
pub fn random_bytes(len: u64, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut buf = vec![0u8; len as usize];
    for chunk in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    buf
}

/// Creates (or truncates) a sparse file of `size` bytes.
pub fn sparse_file(path: &Path, size: u64) {
    File::create(path).unwrap().set_len(size).unwrap();
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new().write(true).open(path).unwrap()
}

/// Writes `bytes` at `offset` of the file.
pub fn write_at(path: &Path, offset: u64, bytes: &[u8]) {
    open_rw(path).write_all_at(bytes, offset).unwrap();
}

/// Writes `len` random bytes from `seed` at `offset`.
pub fn write_random(path: &Path, offset: u64, len: u64, seed: u64) {
    write_at(path, offset, &random_bytes(len, seed));
}

/// Deallocates `[offset, offset + len)`: it reads as zeros and becomes a hole.
pub fn punch_hole(path: &Path, offset: u64, len: u64) {
    let f = open_rw(path);
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate only reads its integer arguments; the descriptor is open for writing.
    let rc = unsafe { libc::fallocate(f.as_raw_fd(), mode, offset as i64, len as i64) };
    assert_eq!(rc, 0, "fallocate: {}", std::io::Error::last_os_error());
}

/// `blkdelta send -q SEND_ARGS | blkdelta receive -q TARGET EXTRA` through a real pipe.
pub fn send_receive(send_args: &[&str], target: &Path, extra: &[&str]) -> Output {
    crate::common::pipe_args(send_args, target, extra)
}

/// [`send_receive`], asserting that the receiver succeeded.
pub fn send_receive_ok(send_args: &[&str], target: &Path) {
    let out = send_receive(send_args, target, &[]);
    assert!(
        out.status.success(),
        "receive after send {send_args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `blkdelta send -q ARGS... -o STREAM`; returns the stream's size.
pub fn send_file(send_args: &[&str], stream: &Path) -> u64 {
    let out = Command::new(bin())
        .args(["send", "-q"])
        .args(send_args)
        .arg("-o")
        .arg(stream)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "send {send_args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::metadata(stream).unwrap().len()
}

/// The text of a path argument.
pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
