//! The chaining values of every block's 64 KiB pieces, so that a block written in part is
//! re-hashed from what was written and the other pieces' values, without reading it back.
//!
//! A block's blake3 is a binary tree over its 1 KiB chunks; for a whole 1 MiB block the 16
//! subtrees of 64 chunks (64 KiB) are complete, and their chaining values (blake3's `hazmat`
//! API) merge, four levels up, into the block's hash. A data record covering a piece gives its
//! value from the record's bytes; a piece written only in part is read back (64 KiB, not the
//! block). The short last block of a disk is always re-hashed whole.
//!
//! The file `<state>.hashes.pieces`:
//!
//! ```text
//! offset  bytes  field
//!      0      8  magic "BDPIECE1"
//!      8     16  generation: the same as the hashes file's
//!     24     40  zero
//!     64  512×n  per block, 16 chaining values of 32 bytes; all zeros = a piece of zeros
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use blake3::hazmat::{merge_subtrees_non_root, merge_subtrees_root, HasherExt, Mode};
use blkdelta_common::digest::BLOCK_BYTES;
use blkdelta_common::image::{Allocation, BlockSource};
use blkdelta_common::ImageError;

/// Bytes of a piece: a complete subtree of the block's blake3 tree.
pub(crate) const PIECE_BYTES: u64 = 64 << 10;
/// Pieces of a block.
pub(crate) const PIECES: usize = (BLOCK_BYTES / PIECE_BYTES) as usize;
/// The chaining values of a block's pieces.
pub(crate) type Cvs = [[u8; 32]; PIECES];

const MAGIC: [u8; 8] = *b"BDPIECE1";
const HEADER_BYTES: u64 = 64;
const BLOCK_ENTRY_BYTES: u64 = 32 * PIECES as u64;
const ZERO: [u8; 32] = [0; 32];

/// The chaining value of piece `i` of a whole block, holding `data` (64 KiB).
pub(crate) fn piece_cv(i: usize, data: &[u8]) -> [u8; 32] {
    blake3::Hasher::new()
        .set_input_offset(i as u64 * PIECE_BYTES)
        .update(data)
        .finalize_non_root()
}

/// The chaining values of the 16 pieces of zeros.
pub(crate) fn zero_cvs() -> &'static Cvs {
    static ZEROS: OnceLock<Cvs> = OnceLock::new();
    ZEROS.get_or_init(|| {
        let zeros = vec![0u8; PIECE_BYTES as usize];
        std::array::from_fn(|i| piece_cv(i, &zeros))
    })
}

/// The blake3 of a whole block from its pieces' chaining values.
pub(crate) fn block_root(cvs: &Cvs) -> [u8; 32] {
    let mut level: Vec<[u8; 32]> = cvs.to_vec();
    while level.len() > 2 {
        level = level
            .chunks_exact(2)
            .map(|p| merge_subtrees_non_root(&p[0], &p[1], Mode::Hash))
            .collect();
    }
    *merge_subtrees_root(&level[0], &level[1], Mode::Hash).as_bytes()
}

/// The chaining values of a whole block's bytes.
pub(crate) fn block_cvs(data: &[u8]) -> Cvs {
    std::array::from_fn(|i| {
        let at = i * PIECE_BYTES as usize;
        piece_cv(i, &data[at..at + PIECE_BYTES as usize])
    })
}

/// Reads `[offset, offset + buf.len())` of `disk` into `buf`, its holes as zeros (not read).
pub(crate) fn read_range(
    disk: &dyn BlockSource,
    offset: u64,
    buf: &mut [u8],
) -> Result<(), ImageError> {
    let end = offset + buf.len() as u64;
    let mut pos = offset;
    while pos < end {
        let (alloc, n) = disk.status(pos, end - pos)?;
        let n = n.clamp(1, end - pos);
        let part = &mut buf[(pos - offset) as usize..(pos - offset + n) as usize];
        match alloc {
            Allocation::Data => disk.read_at(part, pos)?,
            Allocation::Zero | Allocation::Hole => part.fill(0),
        }
        pos += n;
    }
    Ok(())
}

/// The pieces file of a replica's kept hashes.
#[derive(Debug)]
pub(crate) struct PieceFile {
    file: File,
}

impl PieceFile {
    /// Where the pieces of the hashes file `hashes` are.
    pub(crate) fn path_of(hashes: &Path) -> PathBuf {
        let mut name = hashes.as_os_str().to_owned();
        name.push(".pieces");
        PathBuf::from(name)
    }

    /// Creates (or replaces) the file for `blocks` blocks of zeros.
    pub(crate) fn create(path: &Path, blocks: u64, generation: &[u8; 16]) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let mut header = [0u8; HEADER_BYTES as usize];
        header[..8].copy_from_slice(&MAGIC);
        header[8..24].copy_from_slice(generation);
        file.write_all_at(&header, 0)?;
        let p = PieceFile { file };
        p.set_blocks(blocks)?;
        Ok(p)
    }

    /// Opens an existing file for `blocks` blocks, checking its magic, generation and length.
    pub(crate) fn open(path: &Path, blocks: u64, generation: &[u8; 16]) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let mut head = [0u8; 24];
        file.read_exact_at(&mut head, 0)?;
        let len = file.metadata()?.len();
        if head[..8] != MAGIC || head[8..] != generation[..] || len != Self::len_for(blocks) {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("{} is not the pieces file of this disk", path.display()),
            ));
        }
        Ok(PieceFile { file })
    }

    fn len_for(blocks: u64) -> u64 {
        HEADER_BYTES + blocks * BLOCK_ENTRY_BYTES
    }

    /// Makes room for `blocks` blocks (new ones of zeros).
    pub(crate) fn set_blocks(&self, blocks: u64) -> std::io::Result<()> {
        self.file.set_len(Self::len_for(blocks))
    }

    /// The chaining values of `block`'s pieces.
    pub(crate) fn read(&self, block: u64) -> std::io::Result<Cvs> {
        let mut bytes = [0u8; BLOCK_ENTRY_BYTES as usize];
        self.file
            .read_exact_at(&mut bytes, HEADER_BYTES + block * BLOCK_ENTRY_BYTES)?;
        let zeros = zero_cvs();
        Ok(std::array::from_fn(|i| {
            let cv: [u8; 32] = bytes[i * 32..i * 32 + 32].try_into().expect("32 bytes");
            if cv == ZERO {
                zeros[i]
            } else {
                cv
            }
        }))
    }

    /// Records `block`'s pieces' chaining values.
    pub(crate) fn write(&self, block: u64, cvs: &Cvs) -> std::io::Result<()> {
        let zeros = zero_cvs();
        let mut bytes = [0u8; BLOCK_ENTRY_BYTES as usize];
        for (i, cv) in cvs.iter().enumerate() {
            if *cv != zeros[i] {
                bytes[i * 32..i * 32 + 32].copy_from_slice(cv);
            }
        }
        self.file
            .write_all_at(&bytes, HEADER_BYTES + block * BLOCK_ENTRY_BYTES)
    }

    /// Blocks `[first, end)` read as zeros.
    pub(crate) fn zero_run(&self, first: u64, end: u64) -> std::io::Result<()> {
        use rustix::fs::FallocateFlags;
        let (start, len) = (
            HEADER_BYTES + first * BLOCK_ENTRY_BYTES,
            (end - first) * BLOCK_ENTRY_BYTES,
        );
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(&self.file, flags, start, len).is_ok() {
            return Ok(());
        }
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = start;
        while at < start + len {
            let n = (start + len - at).min(zeros.len() as u64) as usize;
            self.file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        Ok(())
    }

    /// Makes the file durable.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pieces_of_a_block_merge_into_its_hash() {
        let data: Vec<u8> = (0..BLOCK_BYTES as usize)
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let cvs = block_cvs(&data);
        assert_eq!(block_root(&cvs), *blake3::hash(&data).as_bytes());
        let zeros = vec![0u8; BLOCK_BYTES as usize];
        assert_eq!(block_root(zero_cvs()), *blake3::hash(&zeros).as_bytes());
    }

    #[test]
    fn the_file_keeps_values_and_zero_runs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.pieces");
        let f = PieceFile::create(&p, 4, &[1; 16]).unwrap();
        assert_eq!(f.read(2).unwrap(), *zero_cvs());
        let mut cvs = *zero_cvs();
        cvs[3] = [9; 32];
        f.write(2, &cvs).unwrap();
        let f = PieceFile::open(&p, 4, &[1; 16]).unwrap();
        assert_eq!(f.read(2).unwrap(), cvs);
        f.zero_run(1, 3).unwrap();
        assert_eq!(f.read(2).unwrap(), *zero_cvs());
        assert!(PieceFile::open(&p, 5, &[1; 16]).is_err());
        assert!(PieceFile::open(&p, 4, &[2; 16]).is_err());
    }
}
