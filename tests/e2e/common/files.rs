//! Files and their bytes: pseudo-random content, sparse files and punched holes, byte-for-byte
//! comparisons, cut and altered copies.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

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

/// XORs the bytes of `file` at `offset` with 0xff (a write behind blkdelta's back).
pub fn flip_bytes(file: &Path, offset: u64, len: usize) {
    let f = File::options().read(true).write(true).open(file).unwrap();
    let mut buf = vec![0u8; len];
    f.read_exact_at(&mut buf, offset).unwrap();
    for b in &mut buf {
        *b ^= 0xff;
    }
    f.write_all_at(&buf, offset).unwrap();
    f.sync_all().unwrap();
}

/// The bytes `[off, off+len)` of a file.
pub fn read_range(p: &Path, off: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    File::open(p).unwrap().read_exact_at(&mut buf, off).unwrap();
    buf
}

/// Writes the first `len` bytes of `stream` to `out`: a stream cut short.
pub fn truncated_copy(stream: &Path, len: usize, out: &Path) {
    let bytes = std::fs::read(stream).unwrap();
    std::fs::write(out, &bytes[..len]).unwrap();
}

/// Writes text to a file.
pub fn write_text(p: &Path, text: &str) {
    std::fs::write(p, text).unwrap();
}

/// Bytes actually allocated on disk for a file.
pub fn allocated_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

/// Compares two files byte for byte (in bounded pieces); panics naming the first difference.
pub fn assert_same_file(a: &Path, b: &Path) {
    let (ma, mb) = (std::fs::metadata(a).unwrap(), std::fs::metadata(b).unwrap());
    assert_eq!(ma.len(), mb.len(), "sizes of {a:?} and {b:?} differ");
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut pos = 0u64;
    loop {
        let n = read_full(&mut fa, &mut ba);
        let m = read_full(&mut fb, &mut bb);
        assert_eq!(n, m);
        if n == 0 {
            return;
        }
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!("{a:?} and {b:?} differ at byte {}", pos + i as u64);
        }
        pos += n as u64;
    }
}

/// Compares the first `len` bytes of a device (or file) with a file.
pub fn assert_same_prefix(dev: &Path, file: &Path) {
    let len = std::fs::metadata(file).unwrap().len();
    let mut fd = File::open(dev).unwrap().take(len);
    let mut ff = File::open(file).unwrap();
    let (mut bd, mut bf) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let n = read_full(&mut fd, &mut bd);
        let m = read_full(&mut ff, &mut bf);
        assert_eq!(n, m, "{dev:?} is shorter than {file:?}");
        if n == 0 {
            return;
        }
        assert!(bd[..n] == bf[..n], "{dev:?} differs from {file:?}");
    }
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> usize {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]).unwrap() {
            0 => break,
            n => got += n,
        }
    }
    got
}
