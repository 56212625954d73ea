//! The NBD wire: magic numbers, option, reply, command and flag values as the protocol names
//! them (all big-endian), the request layout, and exact reads that name what they read.
//!
//! ```text
//! request (28 bytes)   : magic 0x25609513 u32 | flags u16 | type u16 | handle u64 | offset u64 | length u32
//! simple reply (16)    : magic 0x67446698 u32 | error u32 | handle u64
//! structured chunk (20): magic 0x668e33ef u32 | flags u16 | type u16 | handle u64 | length u32 | payload
//! option (16 + data)   : magic IHAVEOPT u64 | option u32 | length u32 | data
//! option reply (20 + p): magic 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 | payload
//! ```

use std::io::Read;

use crate::error::NbdError;

/// `NBDMAGIC`, the first word of the server's greeting.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`: newstyle negotiation (second word of the greeting) and every option's magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of an option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flag: the server speaks fixed newstyle negotiation.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Handshake flag: the server can leave out the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: fixed newstyle negotiation.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: no zero padding.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Option: end the negotiation (a soft disconnect).
pub const OPT_ABORT: u32 = 2;
/// Option: choose an export and enter the transmission phase, with information replies.
pub const OPT_GO: u32 = 7;
/// Option: structured replies in the transmission phase.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// Option: select the metadata contexts of `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;

/// Option reply: done.
pub const REP_ACK: u32 = 1;
/// Option reply: information about the export (`NBD_OPT_GO`).
pub const REP_INFO: u32 = 3;
/// Option reply: a metadata context granted.
pub const REP_META_CONTEXT: u32 = 4;
/// Bit 31 marks an error reply.
pub const REP_ERR_BIT: u32 = 1 << 31;
/// Error reply: the export is not available.
pub const REP_ERR_UNKNOWN: u32 = REP_ERR_BIT | 6;

/// Information: export size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// Information: block size constraints.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Command: read.
pub const CMD_READ: u16 = 0;
/// Command: disconnect.
pub const CMD_DISC: u16 = 2;
/// Command: block status of the selected metadata contexts.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Chunk flag: the last chunk of a reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
/// Chunk type: nothing (a final chunk).
pub const REPLY_TYPE_NONE: u16 = 0;
/// Chunk type: data at an offset.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// Chunk type: a range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// Chunk type: extents of one metadata context (32-bit descriptors).
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// Chunk type: an error.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;
/// Chunk type: an error at an offset.
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) | 2;
/// Bit 15 marks an error chunk type.
pub const REPLY_TYPE_ERROR_BIT: u16 = 1 << 15;

/// `base:allocation`: the range is not allocated.
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation`: the range reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;
/// `qemu:dirty-bitmap:NAME`: the range is dirty.
pub const STATE_DIRTY: u32 = 1 << 0;

/// The metadata context of allocation status.
pub const CONTEXT_ALLOCATION: &str = "base:allocation";
/// The prefix of QEMU's dirty bitmap contexts.
pub const CONTEXT_DIRTY_PREFIX: &str = "qemu:dirty-bitmap:";

/// The name of an option, for messages.
pub fn option_name(option: u32) -> &'static str {
    match option {
        OPT_ABORT => "NBD_OPT_ABORT",
        OPT_GO => "NBD_OPT_GO",
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY",
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT",
        _ => "an NBD option",
    }
}

/// The name of a command, for messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "NBD_CMD_READ",
        CMD_BLOCK_STATUS => "NBD_CMD_BLOCK_STATUS",
        CMD_DISC => "NBD_CMD_DISC",
        _ => "an NBD command",
    }
}

/// The name of a chunk type, for messages.
pub fn chunk_name(ty: u16) -> &'static str {
    match ty {
        REPLY_TYPE_NONE => "NBD_REPLY_TYPE_NONE",
        REPLY_TYPE_OFFSET_DATA => "NBD_REPLY_TYPE_OFFSET_DATA",
        REPLY_TYPE_OFFSET_HOLE => "NBD_REPLY_TYPE_OFFSET_HOLE",
        REPLY_TYPE_BLOCK_STATUS => "NBD_REPLY_TYPE_BLOCK_STATUS",
        REPLY_TYPE_ERROR => "NBD_REPLY_TYPE_ERROR",
        REPLY_TYPE_ERROR_OFFSET => "NBD_REPLY_TYPE_ERROR_OFFSET",
        t if t & REPLY_TYPE_ERROR_BIT != 0 => "unknown error chunk",
        _ => "unknown chunk",
    }
}

/// The bytes of a request.
pub fn request(command: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    // b[4..6]: command flags, none.
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// The bytes of an option with its data.
pub fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(16 + data.len());
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

/// Reads exactly `buf.len()` bytes; a failure names `during` (made only then).
pub fn read_exact<R: Read + ?Sized>(
    r: &mut R,
    buf: &mut [u8],
    timeout_secs: u64,
    during: impl FnOnce() -> String,
) -> Result<(), NbdError> {
    r.read_exact(buf)
        .map_err(|e| NbdError::io(during(), timeout_secs, e))
}

/// Big-endian fields of a byte slice whose length the caller checked.
pub fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

/// See [`be16`].
pub fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

/// See [`be16`].
pub fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
