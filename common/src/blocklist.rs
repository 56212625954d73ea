//! Block lists: the 1 MiB block hashes of a disk, as text, so that a sender can send only the
//! blocks that differ from a replica (`blkdelta checksum --blocks` writes one, `blkdelta send
//! --against` reads it). Text passes unharmed through ssh and shell redirection.
//!
//! ```text
//! blkdelta-blocks 1 <virtual size in bytes> 1048576\n      header: magic, version, size, block size
//! <64 lower-case hex digits: blake3 of block 0>\n
//! <64 hex digits: blake3 of block 1>\n
//! ...                                                      exactly ceil(size / 1 MiB) hash lines
//! ```
//! The hashes are those of the image digest ([`crate::digest`]), so the digest of a list is
//! the `blkdelta checksum` digest of the disk it lists. The format is specified in
//! `docs/STREAM.md`, section "Block lists".
//!
//! A list is untrusted input: lines are read with a bounded length, every field is checked,
//! and every error names its line.
//!
//! ```
//! use blkdelta_common::blocklist::{BlockList, BlockListWriter};
//! use blkdelta_common::digest::zero_block_hash;
//! let mut w = BlockListWriter::new(Vec::new(), 2 << 20).unwrap();
//! w.push(zero_block_hash()).unwrap();
//! w.push(&[7; 32]).unwrap();
//! let text = w.finish().unwrap();
//! let list = BlockList::read(&text[..]).unwrap();
//! assert_eq!(list.blocks(), 2);
//! assert_eq!(list.iter().nth(1), Some([7; 32]));
//! ```

use std::io::{self, BufRead, Read, Write};

use crate::digest::{block_runs, zero_block_hash, BlockRun, DigestBuilder, BLOCK_BYTES};
use crate::image::BlockSource;
use crate::limits::{MAX_BLOCK_LIST_ENTRIES, MAX_VIRTUAL_BYTES};
use crate::ImageError;

/// First word of a block list.
pub const MAGIC: &str = "blkdelta-blocks";
/// The format version written and read.
pub const VERSION: u32 = 1;
/// Longest header line accepted, newline included.
const MAX_HEADER_LINE_BYTES: usize = 128;
/// A hash line: 64 hex digits and a newline.
const HASH_LINE_BYTES: usize = 65;

/// Errors writing or reading a block list.
#[derive(Debug, thiserror::Error)]
pub enum BlockListError {
    /// Reading the list failed.
    #[error("reading the block list failed at line {line}")]
    Read {
        /// Line being read (1 is the header).
        line: u64,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// Writing the list failed.
    #[error("writing the block list failed")]
    Write(#[source] io::Error),
    /// A line of the list is malformed.
    #[error("block list line {line}: {problem}")]
    Malformed {
        /// Line number (1 is the header).
        line: u64,
        /// What is wrong with it.
        problem: Malformed,
    },
    /// A writer was given a number of hashes other than the disk's number of blocks.
    #[error("a block list of {size} bytes has {expected} block hashes, not {pushed}")]
    Count {
        /// Virtual size in the header.
        size: u64,
        /// Blocks of that size.
        expected: u64,
        /// Hashes pushed.
        pushed: u64,
    },
    /// Reading the disk being listed failed.
    #[error(transparent)]
    Image(#[from] ImageError),
}

/// What is wrong with one line of a block list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Malformed {
    /// The list is empty.
    #[error("empty input, not a block list")]
    Empty,
    /// The header does not have the header's shape.
    #[error("not a block list header (expected '{MAGIC} {VERSION} SIZE 1048576')")]
    Header,
    /// The header's version is not [`VERSION`].
    #[error("unsupported block list version {0:?} (this build reads version {VERSION})")]
    Version(String),
    /// The header's size is not a decimal number.
    #[error("virtual size {0:?} is not a number of bytes")]
    Size(String),
    /// The header's size is past [`MAX_VIRTUAL_BYTES`].
    #[error("virtual size {0} exceeds the limit of {MAX_VIRTUAL_BYTES} bytes")]
    SizeTooLarge(u64),
    /// The header's block size is not 1 MiB.
    #[error("block size {0:?} is not {BLOCK_BYTES}")]
    BlockSize(String),
    /// A hash line is not 64 hex digits.
    #[error("not a block hash (64 hex digits)")]
    Hash,
    /// A line is longer than any valid line.
    #[error("line longer than {0} bytes")]
    TooLong(usize),
    /// A line ends in CR LF.
    #[error("line ends in CR LF (mangled by a text-mode transfer?)")]
    CarriageReturn,
    /// The last line has no newline.
    #[error("no newline at the end of the line (truncated list?)")]
    NoNewline,
    /// The list ends before its last block's hash.
    #[error("the list ends after {got} of its {expected} block hashes")]
    TooFew {
        /// Hashes read.
        got: u64,
        /// Hashes the header announces.
        expected: u64,
    },
    /// The list goes on past its last block's hash.
    #[error("a line past the {0} block hashes the header announces")]
    TooMany(u64),
    /// The list holds more entries than [`MAX_BLOCK_LIST_ENTRIES`].
    #[error("more than {MAX_BLOCK_LIST_ENTRIES} blocks with data or zero runs: too large to hold")]
    TooLarge,
}

/// Writes a block list: the header, then one line per pushed hash. `out` should be buffered.
pub struct BlockListWriter<W: Write> {
    out: W,
    size: u64,
    expected: u64,
    pushed: u64,
}

impl<W: Write> BlockListWriter<W> {
    /// Writes the header of the list of a disk of `size` bytes.
    pub fn new(mut out: W, size: u64) -> Result<Self, BlockListError> {
        writeln!(out, "{MAGIC} {VERSION} {size} {BLOCK_BYTES}").map_err(BlockListError::Write)?;
        Ok(BlockListWriter {
            out,
            size,
            expected: size.div_ceil(BLOCK_BYTES),
            pushed: 0,
        })
    }

    /// Writes the hash of the next block; refuses one more than the disk has.
    pub fn push(&mut self, hash: &[u8; 32]) -> Result<(), BlockListError> {
        if self.pushed == self.expected {
            return Err(self.count_error(self.pushed + 1));
        }
        let mut line = [b'\n'; HASH_LINE_BYTES];
        for (i, b) in hash.iter().enumerate() {
            line[2 * i] = HEX[usize::from(b >> 4)];
            line[2 * i + 1] = HEX[usize::from(b & 15)];
        }
        self.out.write_all(&line).map_err(BlockListError::Write)?;
        self.pushed += 1;
        Ok(())
    }

    /// Checks that every block has its hash, flushes, and gives the output back.
    pub fn finish(mut self) -> Result<W, BlockListError> {
        if self.pushed != self.expected {
            return Err(self.count_error(self.pushed));
        }
        self.out.flush().map_err(BlockListError::Write)?;
        Ok(self.out)
    }

    fn count_error(&self, pushed: u64) -> BlockListError {
        BlockListError::Count {
            size: self.size,
            expected: self.expected,
            pushed,
        }
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Writes the block list of `src`, hashing its blocks on `threads` workers (see
/// [`crate::digest::block_hashes`]); returns the output and the disk's digest.
pub fn write_block_list<W: Write>(
    src: &dyn BlockSource,
    threads: usize,
    out: W,
) -> Result<(W, [u8; 32]), BlockListError> {
    let mut w = BlockListWriter::new(out, src.size())?;
    let mut digest = DigestBuilder::new(src.size());
    let mut failed = None;
    let zero = zero_block_hash();
    let walked = block_runs(src, threads, &mut |run| {
        let pushed = match run {
            BlockRun::Block { hash, .. } => {
                digest.push(&hash);
                w.push(&hash)
            }
            BlockRun::Zeros { count, .. } => {
                digest.push_zero_blocks(count);
                (0..count).try_for_each(|_| w.push(zero))
            }
        };
        // The walk speaks ImageError: keep the writer's own error to return it as it is.
        pushed.map_err(|e| {
            failed = Some(e);
            ImageError::Cancelled
        })
    });
    if let Some(e) = failed {
        return Err(e);
    }
    walked?;
    Ok((w.finish()?, digest.finish()))
}

/// Reads a block list line by line, in order, holding one line at a time.
pub struct BlockListReader<R: BufRead> {
    input: R,
    size: u64,
    blocks: u64,
    read: u64,
    /// Number of the line last read (1 is the header).
    line_no: u64,
    line: Vec<u8>,
}

impl<R: BufRead> BlockListReader<R> {
    /// Reads and checks the header.
    pub fn new(input: R) -> Result<Self, BlockListError> {
        let mut r = BlockListReader {
            input,
            size: 0,
            blocks: 0,
            read: 0,
            line_no: 0,
            line: Vec::with_capacity(MAX_HEADER_LINE_BYTES + 1),
        };
        if !r.next_line(MAX_HEADER_LINE_BYTES)? {
            return Err(r.malformed(Malformed::Empty));
        }
        r.size = parse_header(&r.line).map_err(|p| r.malformed(p))?;
        r.blocks = r.size.div_ceil(BLOCK_BYTES);
        Ok(r)
    }

    /// Virtual size of the listed disk.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks (and of hash lines).
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// The next block's hash, or `None` once every block's hash was read and the input ends.
    pub fn next_hash(&mut self) -> Result<Option<[u8; 32]>, BlockListError> {
        let more = self.next_line(HASH_LINE_BYTES)?;
        match (more, self.read < self.blocks) {
            (false, false) => Ok(None),
            (false, true) => Err(self.malformed(Malformed::TooFew {
                got: self.read,
                expected: self.blocks,
            })),
            (true, false) => Err(self.malformed(Malformed::TooMany(self.blocks))),
            (true, true) => {
                let hash = parse_hash(&self.line).ok_or_else(|| self.malformed(Malformed::Hash))?;
                self.read += 1;
                Ok(Some(hash))
            }
        }
    }

    fn malformed(&self, problem: Malformed) -> BlockListError {
        BlockListError::Malformed {
            line: self.line_no,
            problem,
        }
    }

    /// Reads the next line, without its newline, into `self.line`: at most `max` bytes with
    /// the newline, so a hostile line never grows the buffer. False at the end of the input.
    fn next_line(&mut self, max: usize) -> Result<bool, BlockListError> {
        self.line.clear();
        self.line_no += 1;
        let got = Read::take(&mut self.input, max as u64 + 1)
            .read_until(b'\n', &mut self.line)
            .map_err(|source| BlockListError::Read {
                line: self.line_no,
                source,
            })?;
        if got == 0 {
            return Ok(false);
        }
        let problem = match self.line.pop() {
            Some(b'\n') if self.line.last() == Some(&b'\r') => Malformed::CarriageReturn,
            Some(b'\n') => return Ok(true),
            _ if got > max => Malformed::TooLong(max),
            _ => Malformed::NoNewline,
        };
        Err(self.malformed(problem))
    }
}

/// Checks a header line (without its newline) and returns the virtual size it announces.
fn parse_header(line: &[u8]) -> Result<u64, Malformed> {
    let text = std::str::from_utf8(line).map_err(|_| Malformed::Header)?;
    let fields: Vec<&str> = text.split(' ').collect();
    let [magic, version, size, block] = fields[..] else {
        return Err(Malformed::Header);
    };
    if magic != MAGIC {
        return Err(Malformed::Header);
    }
    if version != VERSION.to_string() {
        return Err(Malformed::Version(version.into()));
    }
    let size = decimal(size).ok_or_else(|| Malformed::Size(size.into()))?;
    if size > MAX_VIRTUAL_BYTES {
        return Err(Malformed::SizeTooLarge(size));
    }
    if decimal(block) != Some(BLOCK_BYTES) {
        return Err(Malformed::BlockSize(block.into()));
    }
    Ok(size)
}

/// A plain decimal number as the writer writes it: digits only (no sign, no spaces, no
/// leading zero but for 0 itself), fitting in a u64. One spelling per value, so a list read
/// back writes the same bytes.
fn decimal(s: &str) -> Option<u64> {
    let canonical = s == "0" || !s.starts_with('0');
    if s.is_empty() || !canonical || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

/// Parses 64 hex digits (either case).
fn parse_hash(line: &[u8]) -> Option<[u8; 32]> {
    crate::hex::from_hex(std::str::from_utf8(line).ok()?)
}

/// A whole block list in memory, validated. Runs of zero blocks are held as runs, so a sparse
/// disk's list costs little; at most [`MAX_BLOCK_LIST_ENTRIES`] entries are accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockList {
    size: u64,
    /// Hashes of the blocks that are not whole zero blocks, in order.
    hashes: Vec<[u8; 32]>,
    /// Runs of whole zero blocks: (first block, count), in order.
    zero_runs: Vec<(u64, u64)>,
}

impl BlockList {
    /// Reads and validates a whole list.
    pub fn read(input: impl BufRead) -> Result<Self, BlockListError> {
        let mut r = BlockListReader::new(input)?;
        let mut list = BlockList {
            size: r.size(),
            hashes: Vec::new(),
            zero_runs: Vec::new(),
        };
        let zero = zero_block_hash();
        let mut index = 0u64;
        while let Some(hash) = r.next_hash()? {
            if list.hashes.len() + list.zero_runs.len() >= MAX_BLOCK_LIST_ENTRIES as usize {
                return Err(r.malformed(Malformed::TooLarge));
            }
            match list.zero_runs.last_mut() {
                Some((first, count)) if hash == *zero && *first + *count == index => *count += 1,
                _ if hash == *zero => list.zero_runs.push((index, 1)),
                _ => list.hashes.push(hash),
            }
            index += 1;
        }
        Ok(list)
    }

    /// Virtual size of the listed disk.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Number of blocks.
    pub fn blocks(&self) -> u64 {
        self.size.div_ceil(BLOCK_BYTES)
    }

    /// The hashes of every block, in order.
    pub fn iter(&self) -> Hashes<'_> {
        Hashes {
            list: self,
            index: 0,
            hash: 0,
            run: 0,
        }
    }

    /// The image digest of the listed disk: what `blkdelta checksum` prints for it.
    pub fn digest(&self) -> [u8; 32] {
        let mut d = DigestBuilder::new(self.size);
        let mut hashes = self.hashes.iter();
        let mut index = 0;
        for &(first, count) in &self.zero_runs {
            hashes
                .by_ref()
                .take((first - index) as usize)
                .for_each(|h| d.push(h));
            d.push_zero_blocks(count);
            index = first + count;
        }
        hashes.for_each(|h| d.push(h));
        d.finish()
    }
}

/// The hashes of a [`BlockList`], in block order.
pub struct Hashes<'a> {
    list: &'a BlockList,
    index: u64,
    hash: usize,
    run: usize,
}

impl Iterator for Hashes<'_> {
    type Item = [u8; 32];

    fn next(&mut self) -> Option<[u8; 32]> {
        if self.index >= self.list.blocks() {
            return None;
        }
        let runs = &self.list.zero_runs;
        while runs
            .get(self.run)
            .is_some_and(|&(f, n)| f + n <= self.index)
        {
            self.run += 1;
        }
        self.index += 1;
        match runs.get(self.run) {
            Some(&(first, _)) if first < self.index => Some(*zero_block_hash()),
            _ => {
                self.hash += 1;
                self.list.hashes.get(self.hash - 1).copied()
            }
        }
    }
}

#[cfg(test)]
mod tests;
