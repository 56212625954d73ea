//! Page-aligned byte buffers for data payloads.
//!
//! A chunk of guest data travels in an [`AlignedBuf`] from the read on the sender to the
//! write on the receiver. Its first byte is 4 KiB-aligned (once it holds that much), so that
//! both ends can move it with `O_DIRECT` (straight between the disk and the buffer, no copy
//! through the page cache), which a `Vec<u8>` does not allow.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// Alignment of an [`AlignedBuf`]'s first byte: a multiple of every logical block size in use.
pub const ALIGN: usize = 4096;

/// One aligned block of storage.
#[derive(Clone, Copy)]
#[repr(C, align(4096))]
struct Block([u8; ALIGN]);

impl Block {
    const ZERO: Block = Block([0; ALIGN]);
}

/// A byte buffer whose first byte is [`ALIGN`]-aligned once it has held [`ALIGN`] bytes or
/// more. Shorter buffers (which no direct I/O could use) are kept in exactly as much memory
/// as they need, so that many small records cost no more than their bytes.
///
/// Its length changes without touching memory: bytes past the previous length hold whatever
/// an earlier use left there (zeros in memory never used), which suits a buffer about to be
/// overwritten by a read, and makes reusing one free.
#[derive(Default)]
pub struct AlignedBuf {
    /// The aligned storage; empty while the buffer is small.
    blocks: Vec<Block>,
    /// The storage of a buffer that has never held [`ALIGN`] bytes.
    small: Vec<u8>,
    len: usize,
}

impl AlignedBuf {
    /// An empty buffer; allocates nothing.
    pub const fn new() -> Self {
        AlignedBuf {
            blocks: Vec::new(),
            small: Vec::new(),
            len: 0,
        }
    }

    /// A buffer of `len` zero bytes.
    pub fn zeroed(len: usize) -> Self {
        let mut b = AlignedBuf::new();
        b.set_len(len);
        b
    }

    /// A buffer holding a copy of `bytes`.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut b = AlignedBuf::new();
        b.set_len(bytes.len());
        b.copy_from_slice(bytes);
        b
    }

    /// Bytes the buffer holds without growing.
    pub fn capacity(&self) -> usize {
        if self.blocks.is_empty() {
            self.small.len()
        } else {
            self.blocks.len() * ALIGN
        }
    }

    /// Sets the length to `len`, growing the storage (zero-filled) when needed. Bytes between
    /// the old and the new length are unspecified: zeros, or what an earlier use left.
    pub fn set_len(&mut self, len: usize) {
        if self.blocks.is_empty() && len < ALIGN {
            if len > self.small.len() {
                self.small.reserve_exact(len - self.small.len());
                self.small.resize(len, 0);
            }
        } else {
            let blocks = len.div_ceil(ALIGN);
            if blocks > self.blocks.len() {
                let was_small = self.blocks.is_empty();
                self.blocks.reserve_exact(blocks - self.blocks.len());
                self.blocks.resize(blocks, Block::ZERO);
                if was_small {
                    // Keeps the bytes held so far, as a growing buffer does.
                    let small = std::mem::take(&mut self.small);
                    let n = small.len().min(self.len);
                    self.len = n;
                    self[..n].copy_from_slice(&small[..n]);
                }
            }
        }
        self.len = len;
    }

    /// Shortens the buffer to `len` bytes (no effect when it is not longer).
    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }
}

impl Clone for AlignedBuf {
    /// A copy of the bytes (not of the unused storage past them).
    fn clone(&self) -> Self {
        AlignedBuf::from_slice(self)
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];

    #[allow(unsafe_code)]
    fn deref(&self) -> &[u8] {
        if self.blocks.is_empty() {
            return &self.small[..self.len];
        }
        debug_assert!(self.len <= self.capacity());
        // SAFETY: `blocks` holds `capacity() >= len` initialised bytes (a `Block` is a plain
        // byte array without padding), borrowed for as long as `self` is.
        unsafe { std::slice::from_raw_parts(self.blocks.as_ptr().cast::<u8>(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    #[allow(unsafe_code)]
    fn deref_mut(&mut self) -> &mut [u8] {
        if self.blocks.is_empty() {
            return &mut self.small[..self.len];
        }
        debug_assert!(self.len <= self.capacity());
        // SAFETY: as in `deref`, borrowed mutably for as long as `self` is; any byte pattern
        // is a valid `Block`.
        unsafe { std::slice::from_raw_parts_mut(self.blocks.as_mut_ptr().cast::<u8>(), self.len) }
    }
}

impl PartialEq for AlignedBuf {
    fn eq(&self, other: &Self) -> bool {
        **self == **other
    }
}

impl Eq for AlignedBuf {}

impl PartialEq<[u8]> for AlignedBuf {
    fn eq(&self, other: &[u8]) -> bool {
        **self == *other
    }
}

impl PartialEq<Vec<u8>> for AlignedBuf {
    fn eq(&self, other: &Vec<u8>) -> bool {
        **self == other[..]
    }
}

impl fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const SHOWN: usize = 16;
        write!(f, "AlignedBuf({} bytes", self.len)?;
        if !self.is_empty() {
            write!(f, ": {:02x?}", &self[..self.len.min(SHOWN)])?;
            if self.len > SHOWN {
                f.write_str("…")?;
            }
        }
        f.write_str(")")
    }
}

impl From<&[u8]> for AlignedBuf {
    fn from(bytes: &[u8]) -> Self {
        AlignedBuf::from_slice(bytes)
    }
}

impl From<Vec<u8>> for AlignedBuf {
    fn from(bytes: Vec<u8>) -> Self {
        AlignedBuf::from_slice(&bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_resizable_and_reused_without_zeroing() {
        let mut b = AlignedBuf::new();
        assert!(b.is_empty());
        assert_eq!(b.capacity(), 0);
        b.set_len(10_000);
        assert_eq!(b.len(), 10_000);
        assert_eq!(b.capacity(), 3 * ALIGN);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b.iter().all(|&x| x == 0), "new storage is zeroed");
        b.fill(7);
        b.truncate(100);
        assert_eq!(b.len(), 100);
        // Growing back within the capacity keeps the old bytes: no memory is touched.
        b.set_len(10_000);
        assert!(b.iter().all(|&x| x == 7));
        // Growing past it keeps what was there and zero-fills the rest.
        b.set_len(5 * ALIGN);
        assert!(b[..10_000].iter().all(|&x| x == 7));
        assert!(b[10_000..].iter().all(|&x| x == 0));
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        b.truncate(1 << 30);
        assert_eq!(b.len(), 5 * ALIGN, "truncate never grows");
    }

    #[test]
    fn short_buffers_take_only_their_bytes_until_they_grow() {
        let mut b = AlignedBuf::from_slice(&[5; 100]);
        assert_eq!(b.capacity(), 100, "no aligned block for 100 bytes");
        b.set_len(ALIGN - 1);
        assert_eq!(b.capacity(), ALIGN - 1);
        assert!(b[..100].iter().all(|&x| x == 5));
        // Growing to a direct-I/O size moves the bytes into aligned storage.
        b.set_len(2 * ALIGN);
        assert_eq!(b.capacity(), 2 * ALIGN);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert!(b[..100].iter().all(|&x| x == 5));
        // Once aligned, it stays so, however short it gets.
        b.set_len(10);
        assert_eq!(b.as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.capacity(), 2 * ALIGN);
        // A clone copies the bytes, not the storage.
        assert_eq!(b.clone().capacity(), 10);
    }

    #[test]
    fn copies_compare_by_content() {
        let a = AlignedBuf::from_slice(b"hello");
        let b: AlignedBuf = b"hello".to_vec().into();
        assert_eq!(a, b);
        assert_eq!(a, b"hello".to_vec());
        assert_eq!(a, b"hello"[..]);
        assert_ne!(a, AlignedBuf::from(&b"hellO"[..]));
        assert_eq!(a.clone(), a);
        assert_eq!(
            format!("{a:?}"),
            "AlignedBuf(5 bytes: [68, 65, 6c, 6c, 6f])"
        );
        assert_eq!(&AlignedBuf::zeroed(3)[..], &[0, 0, 0]);
    }
}
