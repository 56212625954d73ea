//! The replica's kept block hashes: the blake3 of every 1 MiB block of the replica, kept beside
//! its state file and updated as the receiver writes, so that the digest of a replica costs
//! O(blocks) without reading the disk, and `verify` has something to compare the disk with.
//!
//! The file `<state path>.hashes` (see [`hashes_path`]):
//!
//! ```text
//! offset  bytes  field
//!      0      8  magic "BDHASH01"
//!      8      4  version, u32 LE (1)
//!     12      4  block bytes, u32 LE (1 MiB, digest::BLOCK_BYTES)
//!     16      8  virtual size of the disk, u64 LE
//!     24     16  generation (random; the pieces file carries the same)
//!     40     24  reserved, zero
//!     64   32×n  one entry per block, n = ceil(size / block bytes):
//!                all zeros = the block reads as zeros, anything else = the block's blake3
//! ```
//!
//! A zero entry stands for the hash of zeros at the block's own length (the last block may be
//! short), so a new or grown disk costs a `set_len` of a sparse file, and zeroing a long range
//! punches a hole in the file instead of writing an entry per block. Beside it, the pieces
//! file keeps the chaining values of every block's 64 KiB pieces (see the `pieces` module).
//!
//! Updates are gathered in memory between [`KeptHashes::settle`] calls, bounded by what was
//! written since: each 64 KiB piece a write covers whole takes its chaining value from the
//! bytes written, whole blocks zeroed become a run of zero entries, and a piece covered only
//! in part is read back from the disk at the next settle (64 KiB; the short last block of the
//! disk is read whole). At the settle each changed block's hash is merged from its pieces.
//!
//! Durability follows the data: the caller syncs the target, then settles and syncs the
//! hashes, then saves the state. A block touched after the last sync is touched again when
//! the stream is applied again from the state's durable offset, so its entry is mended then.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use blkdelta_common::buf::AlignedBuf;
use blkdelta_common::digest::{self, DigestBuilder, BLOCK_BYTES};
use blkdelta_common::image::BlockSource;

use crate::ReceiveError;

mod layout;
mod pending;
mod pieces;
mod update;
mod write;

#[cfg(test)]
mod tests;

pub(crate) use pieces::Cvs;

use layout::{check_size, decode_header, encode_header, zero_tail};
use pending::{Change, Pending};
use pieces::PieceFile;

/// The blake3 of `data`, about to be written at disk offset `offset`, in one pass with the
/// chaining values of its 64 KiB pieces when it is a whole block at a block's start: a data
/// record's check and its block's kept hashes then share the hashing
/// ([`KeptHashes::wrote_hashed`]). Other ranges get their hash alone.
pub(crate) fn hash_block_write(offset: u64, data: &[u8]) -> ([u8; 32], Option<Box<Cvs>>) {
    if offset % BLOCK_BYTES != 0 || data.len() as u64 != BLOCK_BYTES {
        return (*blake3::hash(data).as_bytes(), None);
    }
    let cvs = pieces::block_cvs(data);
    (pieces::block_root(&cvs), Some(Box::new(cvs)))
}

/// Magic of a hashes file.
pub const HASHES_MAGIC: [u8; 8] = *b"BDHASH01";
/// Version of the hashes file layout.
pub const HASHES_VERSION: u32 = 1;
/// Bytes of the header before the first entry.
pub const HEADER_BYTES: u64 = 64;
/// Bytes of one entry.
pub const ENTRY_BYTES: u64 = 32;

/// What [`KeptHashes::for_each`] calls for every block: its index and its hash.
pub type EachBlock<'a> = dyn FnMut(u64, &[u8; 32]) -> Result<(), ReceiveError> + 'a;

/// The entry of a block that reads as zeros.
const ZERO_ENTRY: [u8; 32] = [0; 32];
/// Entries read or written per system call (1 MiB of entries, 32 GiB of disk).
const ENTRIES_PER_IO: u64 = 32 * 1024;
/// Blocks hashed per parallel batch in [`KeptHashes::rebuild`].
const REBUILD_BATCH_BLOCKS: u64 = 1024;
/// Zero runs at least this long (in file bytes) punch a hole rather than write zeros.
const PUNCH_MIN_BYTES: u64 = 64 * 1024;

/// Where the kept hashes of the replica whose state lives at `state_path` are.
pub fn hashes_path(state_path: &Path) -> PathBuf {
    let mut name = state_path.as_os_str().to_owned();
    name.push(".hashes");
    PathBuf::from(name)
}

/// Where the pieces of the hashes file `hashes` are (see the `pieces` module).
pub fn pieces_path(hashes: &Path) -> PathBuf {
    PieceFile::path_of(hashes)
}

/// Number of blocks of a disk of `size` bytes.
fn block_count(size: u64) -> u64 {
    size.div_ceil(BLOCK_BYTES)
}

/// Offset in the file of the entry of `block` (also the file length for `block` entries).
fn entry_offset(block: u64) -> u64 {
    HEADER_BYTES + block * ENTRY_BYTES
}

/// The kept block hashes of a replica: the file described in the [module docs](self), and the
/// updates since the last [`settle`](KeptHashes::settle). Memory is bounded by those updates,
/// never by the disk size.
#[derive(Debug)]
pub struct KeptHashes {
    path: PathBuf,
    file: File,
    size: u64,
    pending: Pending,
    /// blake3 of a whole block of zeros.
    zero_block: [u8; 32],
    /// blake3 of the last block's length of zeros (equal to `zero_block` when it is whole).
    zero_tail: [u8; 32],
    buf: AlignedBuf,
    /// The chaining values of every block's pieces (none when opened only to be read).
    pieces: Option<PieceFile>,
    /// The pair's generation, in both files' headers.
    generation: [u8; 16],
}

impl KeptHashes {
    /// Opens the file at `path`, or creates it for a disk of `size` bytes that reads as zeros
    /// everywhere (a new target; an existing replica whose content is unknown needs a
    /// [`rebuild`](Self::rebuild) after). An existing file is opened as it is: its size may
    /// differ from `size`, which [`set_size`](Self::set_size) mends.
    pub fn open_or_create(path: &Path, size: u64) -> Result<Self, ReceiveError> {
        match Self::open(path) {
            Err(_) if !path.exists() => Self::create(path, size),
            other => other,
        }
    }

    /// Opens an existing file for reading and updating; an error naming the file when it is
    /// missing or damaged.
    pub fn open(path: &Path) -> Result<Self, ReceiveError> {
        let file = OpenOptions::new().read(true).write(true).open(path);
        let mut k = Self::from_file(
            path,
            file.map_err(|e| state_err(path, format!("cannot open: {e}")))?,
        )?;
        let pieces = PieceFile::path_of(path);
        k.pieces = Some(
            PieceFile::open(&pieces, block_count(k.size), &k.generation).map_err(|e| {
                state_err(path, format!("its pieces file {}: {e}", pieces.display()))
            })?,
        );
        Ok(k)
    }

    /// Opens an existing file only to read it ([`digest`](Self::digest),
    /// [`for_each`](Self::for_each)): for a caller that may not write beside the replica.
    pub fn open_read_only(path: &Path) -> Result<Self, ReceiveError> {
        let file = File::open(path);
        Self::from_file(
            path,
            file.map_err(|e| state_err(path, format!("cannot open: {e}")))?,
        )
    }

    /// Creates (or replaces) the file for a disk of `size` bytes that reads as zeros.
    pub fn create(path: &Path, size: u64) -> Result<Self, ReceiveError> {
        check_size(path, size)?;
        let mut tmp_name = path.as_os_str().to_owned();
        tmp_name.push(".tmp");
        let tmp = PathBuf::from(tmp_name);
        let generation = blkdelta_common::stream::random_id();
        let write = || -> std::io::Result<()> {
            // The pieces first: until the new hashes file takes the name, the old one's
            // generation no longer matches them, and neither is trusted.
            PieceFile::create(&PieceFile::path_of(path), block_count(size), &generation)?.sync()?;
            let file = File::create(&tmp)?;
            file.set_len(entry_offset(block_count(size)))?;
            file.write_all_at(&encode_header(size, &generation), 0)?;
            file.sync_data()?;
            std::fs::rename(&tmp, path)
        };
        write().map_err(|e| state_err(path, format!("cannot create: {e}")))?;
        Self::open(path)
    }

    fn from_file(path: &Path, file: File) -> Result<Self, ReceiveError> {
        let len = file
            .metadata()
            .map_err(|e| state_err(path, format!("cannot stat: {e}")))?
            .len();
        let mut header = [0u8; HEADER_BYTES as usize];
        if len < HEADER_BYTES {
            return Err(state_err(
                path,
                format!("{len} bytes, shorter than the {HEADER_BYTES}-byte header"),
            ));
        }
        file.read_exact_at(&mut header, 0)
            .map_err(|e| state_err(path, format!("cannot read the header: {e}")))?;
        let (size, generation) =
            decode_header(&header).map_err(|reason| state_err(path, reason))?;
        let expected = entry_offset(block_count(size));
        if len != expected {
            return Err(state_err(
                path,
                format!("{len} bytes where a disk of {size} bytes needs {expected}"),
            ));
        }
        let zero_block = digest::zero_hash(BLOCK_BYTES);
        Ok(KeptHashes {
            path: path.to_path_buf(),
            file,
            size,
            pending: Pending::default(),
            zero_block,
            zero_tail: zero_tail(size, &zero_block),
            buf: AlignedBuf::new(),
            pieces: None,
            generation,
        })
    }

    /// The virtual size of the disk, in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Blocks with an update not yet in the file (zero runs count one each).
    pub fn pending_updates(&self) -> usize {
        self.pending.blocks.len() + self.pending.zero_runs.len()
    }

    /// The disk is now `size` bytes: a grown range reads as zeros; a last block whose length
    /// changed (a shrink to, or a grow from, a size that is not whole blocks) is re-hashed at
    /// the next settle. Updates it makes are in the file at once (header, length).
    pub fn set_size(&mut self, size: u64) -> Result<(), ReceiveError> {
        check_size(&self.path, size)?;
        let old = self.size;
        if size == old {
            return Ok(());
        }
        let blocks = block_count(size);
        self.pending.truncate(blocks);
        if size < old && size % BLOCK_BYTES != 0 {
            self.pending
                .blocks
                .insert(size / BLOCK_BYTES, Change::Rehash);
        }
        if size > old && old % BLOCK_BYTES != 0 {
            self.pending
                .blocks
                .insert(old / BLOCK_BYTES, Change::Rehash);
        }
        // Entries past the old end are cut off by a shrink; a grow adds zero entries.
        self.file
            .set_len(entry_offset(blocks))
            .map_err(|e| self.err(format!("cannot resize to {size} bytes of disk: {e}")))?;
        if let Some(p) = &self.pieces {
            p.set_blocks(blocks)
                .map_err(|e| self.err(format!("cannot resize the pieces: {e}")))?;
        }
        self.file
            .write_all_at(&encode_header(size, &self.generation), 0)
            .map_err(|e| self.err(format!("cannot write the header: {e}")))?;
        self.size = size;
        self.zero_tail = zero_tail(size, &self.zero_block);
        Ok(())
    }

    /// Brings every entry up to date in the file: blocks only partly covered by writes or
    /// zeroing since the last settle are re-hashed by reading them from `disk` (the target,
    /// once its writes completed; at least [`size`](Self::size) bytes). Costs O(blocks
    /// touched), never O(disk). After an error the updates are kept, and a later settle
    /// applies them again.
    pub fn settle(&mut self, disk: &dyn BlockSource) -> Result<(), ReceiveError> {
        if disk.size() < self.size {
            return Err(self.err(format!(
                "the disk holds {} bytes, the hashes describe {}",
                disk.size(),
                self.size
            )));
        }
        self.write_zero_runs()?;
        self.rehash_partial_blocks(disk)?;
        self.write_block_entries()?;
        self.pending.clear();
        Ok(())
    }

    /// Makes the entries durable (`fdatasync`); call after [`settle`](Self::settle).
    pub fn sync(&mut self) -> Result<(), ReceiveError> {
        if let Some(p) = &self.pieces {
            p.sync()
                .map_err(|e| self.err(format!("cannot sync the pieces: {e}")))?;
        }
        self.file
            .sync_data()
            .map_err(|e| self.err(format!("cannot sync: {e}")))
    }

    /// Gives the pair of files the name `path` (the pieces first): hashes made elsewhere, for
    /// instance read from a disk before they are known to be wanted, become the kept ones.
    pub fn rename_to(&mut self, path: &Path) -> Result<(), ReceiveError> {
        let rename = |from: &Path, to: &Path| {
            std::fs::rename(from, to).map_err(|e| {
                state_err(
                    to,
                    format!("cannot take the name of {}: {e}", from.display()),
                )
            })
        };
        rename(&PieceFile::path_of(&self.path), &PieceFile::path_of(path))?;
        rename(&self.path, path)?;
        self.path = path.to_path_buf();
        Ok(())
    }

    /// The digest of the disk as the entries give it (as of the last settle): reads the file
    /// in bounded pieces and folds the hashes, O(blocks).
    pub fn digest(&self) -> Result<[u8; 32], ReceiveError> {
        let mut top = DigestBuilder::new(self.size);
        self.for_each(&mut |_, hash| {
            top.push(hash);
            Ok(())
        })?;
        Ok(top.finish())
    }

    /// Calls `each(block_index, &hash)` for every block in order (as of the last settle),
    /// zero entries given as the real hash of the block's zeros. Stops at the first error.
    pub fn for_each(&self, each: &mut EachBlock<'_>) -> Result<(), ReceiveError> {
        let blocks = block_count(self.size);
        let mut first = 0;
        while first < blocks {
            let hashes = self.entries(first, ENTRIES_PER_IO)?;
            for (i, hash) in hashes.iter().enumerate() {
                each(first + i as u64, hash)?;
            }
            first += hashes.len() as u64;
        }
        Ok(())
    }

    /// The hashes of at most `count` blocks from block `first` on, as of the last settle
    /// (zero entries given as the real hash of zeros); fewer at the end of the disk.
    pub fn entries(&self, first: u64, count: u64) -> Result<Vec<[u8; 32]>, ReceiveError> {
        let count = block_count(self.size).saturating_sub(first).min(count);
        let mut bytes = vec![0u8; (count * ENTRY_BYTES) as usize];
        self.file
            .read_exact_at(&mut bytes, entry_offset(first))
            .map_err(|e| self.err(format!("cannot read entries from block {first}: {e}")))?;
        Ok(bytes
            .chunks_exact(ENTRY_BYTES as usize)
            .enumerate()
            .map(|(i, entry)| {
                let entry: &[u8; 32] = entry.try_into().expect("chunks of 32 bytes");
                *self.hash_of(first + i as u64, entry)
            })
            .collect())
    }

    /// The part of `[offset, offset + len)` inside the disk, if any.
    fn clip(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.saturating_add(len).min(self.size);
        (offset < end).then_some((offset, end))
    }

    /// Length of `block`: a whole block, or what is left of the disk for the last one.
    fn block_len(&self, block: u64) -> u64 {
        BLOCK_BYTES.min(self.size - block * BLOCK_BYTES)
    }

    fn zero_hash_of(&self, block: u64) -> &[u8; 32] {
        if block + 1 == block_count(self.size) {
            &self.zero_tail
        } else {
            &self.zero_block
        }
    }

    /// The entry that records `hash` for `block`: zero when it is the hash of zeros.
    fn entry_of(&self, block: u64, hash: &[u8; 32]) -> [u8; 32] {
        if hash == self.zero_hash_of(block) {
            ZERO_ENTRY
        } else {
            *hash
        }
    }

    /// The hash an entry of `block` stands for.
    fn hash_of<'a>(&'a self, block: u64, entry: &'a [u8; 32]) -> &'a [u8; 32] {
        if *entry == ZERO_ENTRY {
            self.zero_hash_of(block)
        } else {
            entry
        }
    }

    fn err(&self, reason: String) -> ReceiveError {
        state_err(&self.path, reason)
    }
}

fn state_err(path: &Path, reason: impl Into<String>) -> ReceiveError {
    ReceiveError::State {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// An error and its causes on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}
