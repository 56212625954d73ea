//! The blkdelta stream, version 2: a preamble, then framed records.
//!
//! ```text
//! preamble   89 42 4C 4B 0D 0A 1A 0A  "\x89BLK\r\n\x1a\n"   magic (catches text-mode mangling)
//!            02 00 00 00                                     u32 LE format version
//! frame      u8 type | u8 flags | u16 reserved (0) | u32 LE body_len | check[8] | body[body_len]
//!            check = first 8 bytes of blake3(the frame's first 8 bytes || body), where a data
//!            record's body stops before its payload (covered by the record's plain-bytes hash)
//!            header, then data / zero / discard / checkpoint / snapshot-info / snapshot-end
//!            records, then end
//! ```
//!
//! Bodies are bincode 2 (serde, little endian, fixed-width integers); a data body is its fixed
//! fields followed by the payload. The full layout, byte by byte, is in `docs/STREAM.md`.

mod header;
mod reader;
mod record;
mod token;
mod writer;

pub use header::{SnapRef, SourceInfo, StreamHeader, Transition};
pub use reader::StreamReader;
pub use record::{
    encode_chunk, encode_chunk_owned, CheckpointRecord, Compression, DataFrame, DataRecord,
    EndRecord, Record, RecordType, SnapshotEnd, SnapshotInfo, DATA_FIXED_BYTES,
};
pub use token::ResumeToken;
pub use writer::StreamWriter;

/// The first eight bytes of every stream.
pub const MAGIC: [u8; 8] = [0x89, b'B', b'L', b'K', b'\r', b'\n', 0x1a, b'\n'];

/// The format version this build writes and reads.
pub const VERSION: u32 = 2;

/// Bytes of a frame header (type, flags, reserved, body length, check).
pub const FRAME_HEADER_BYTES: usize = 16;

/// The check of a frame: the first 8 bytes of blake3 over the frame's first 8 bytes (type,
/// flags, reserved, body length) and `checked`: the whole body, except for a data record,
/// whose payload is left to the record's own hash of its plain bytes (checked once
/// decompressed). Every record is checked before it is used.
pub(crate) fn frame_check(head8: &[u8], checked: &[&[u8]]) -> [u8; 8] {
    let mut h = blake3::Hasher::new();
    h.update(head8);
    for p in checked {
        h.update(p);
    }
    h.finalize().as_bytes()[..8].try_into().expect("8 bytes")
}

/// The header of a frame of type `kind` with `flags` and a body of `body_len` bytes, whose
/// check covers `checked` (see [`frame_check`]).
pub(crate) fn frame_head(
    kind: u8,
    flags: u8,
    body_len: usize,
    checked: &[&[u8]],
) -> [u8; FRAME_HEADER_BYTES] {
    let mut head = [0u8; FRAME_HEADER_BYTES];
    head[0] = kind;
    head[1] = flags;
    head[4..8].copy_from_slice(&(body_len as u32).to_le_bytes());
    let check = frame_check(&head[..8], checked);
    head[8..16].copy_from_slice(&check);
    head
}

/// Bytes of the end record's frame (frame header, record count, stream hash).
pub const END_FRAME_BYTES: u64 = (FRAME_HEADER_BYTES + 8 + 32) as u64;

/// Frame flag: a reader that does not know the record type may skip the record. A reader of
/// this version knows every type it writes, so the flag changes nothing for those: checkpoint
/// frames carry it (from when they were an optional extension), yet a reader must check them
/// (see docs/STREAM.md, "Checkpoint"); snapshot-info frames carry it so that readers older
/// than the type skip them.
pub const FLAG_OPTIONAL: u8 = 0x01;

/// The bincode configuration of every record body.
pub(crate) fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ crate::limits::MAX_HEADER_BYTES as usize }>()
}

/// Encodes a record body with the stream's bincode configuration.
pub(crate) fn encode_body<T: serde::Serialize>(value: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(value, bincode_config())
        .expect("encoding plain structs into a Vec cannot fail")
}

/// Decodes a record body, requiring that it is consumed exactly.
pub(crate) fn decode_body<T: serde::de::DeserializeOwned>(
    body: &[u8],
    what: &str,
) -> Result<(T, usize), String> {
    bincode::serde::decode_from_slice(body, bincode_config())
        .map_err(|e| format!("{what} record does not decode: {e}"))
}

#[cfg(test)]
mod tests;

/// A fresh random 16-byte identity (stream ids, states without a durable identity), from
/// the operating system's random number generator.
///
/// Should the OS generator fail (no `getrandom(2)` and no readable `/dev/urandom`, as in a
/// bare chroot), the id is the blake3 hash of the time, the process id and a per-process
/// counter instead: unique enough to tell streams and states apart, which is all an id is
/// for here, but predictable. It never panics.
pub fn random_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    if getrandom::fill(&mut id).is_err() {
        id = fallback_id();
    }
    id
}

/// The id [`random_id`] makes when the OS generator fails: time, pid and a counter, hashed.
fn fallback_id() -> [u8; 16] {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{SystemTime, UNIX_EPOCH};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let mut h = blake3::Hasher::new();
    h.update(&now.as_nanos().to_le_bytes());
    h.update(&std::process::id().to_le_bytes());
    h.update(&CALLS.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&h.finalize().as_bytes()[..16]);
    id
}
