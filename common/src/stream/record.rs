//! Records after the header: data, zero, discard, snapshot-end and end.

use serde::{Deserialize, Serialize};

use crate::limits::CHUNK_BYTES;
use crate::StreamError;

/// The type byte of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RecordType {
    /// The stream header; always first.
    Header = 1,
    /// Data for a range.
    Data = 2,
    /// A range that reads as zeros.
    Zero = 3,
    /// A range freed at the source.
    Discard = 4,
    /// The replica now holds a transition's `to` state.
    SnapshotEnd = 5,
    /// The last record: count and hash of everything before it.
    End = 6,
    /// Everything before it is verified: a receiver may make it durable and resume after it.
    Checkpoint = 7,
}

impl RecordType {
    /// The type for a frame's type byte, if known.
    pub fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => RecordType::Header,
            2 => RecordType::Data,
            3 => RecordType::Zero,
            4 => RecordType::Discard,
            5 => RecordType::SnapshotEnd,
            6 => RecordType::End,
            7 => RecordType::Checkpoint,
            _ => return None,
        })
    }
}

/// How a data payload is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    /// The payload is the plain bytes.
    None = 0,
    /// The payload is one zstd frame of the plain bytes.
    Zstd = 1,
}

/// Fixed fields of a data record, as encoded before the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RawDataFields {
    pub offset: u64,
    pub len: u32,
    pub compression: u8,
    pub hash: [u8; 32],
}

/// Encoded size of the fixed fields of a data record.
pub const DATA_FIXED_BYTES: usize = 8 + 4 + 1 + 32;

/// A data record: `len` plain bytes at `offset`, stored as `payload`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataRecord {
    /// Disk offset of the first byte.
    pub offset: u64,
    /// Plain length, at most 1 MiB; the range never crosses a 1 MiB boundary.
    pub len: u32,
    /// How the payload is stored.
    pub compression: Compression,
    /// blake3 of the plain bytes.
    pub hash: [u8; 32],
    /// The stored bytes.
    pub payload: Vec<u8>,
}

impl DataRecord {
    /// Decompresses (bounded by `len`) and verifies the payload; returns the plain bytes.
    /// `stream_offset` names the record in errors.
    pub fn plain(&self, stream_offset: u64) -> Result<Vec<u8>, StreamError> {
        let plain =
            match self.compression {
                Compression::None => self.payload.clone(),
                Compression::Zstd => zstd::bulk::decompress(&self.payload, self.len as usize)
                    .map_err(|e| StreamError::Corrupt {
                        offset: stream_offset,
                        reason: format!("data record for disk offset {}: {e}", self.offset),
                    })?,
            };
        if plain.len() != self.len as usize || *blake3::hash(&plain).as_bytes() != self.hash {
            return Err(StreamError::Checksum {
                stream_offset,
                disk_offset: self.offset,
            });
        }
        Ok(plain)
    }

    pub(crate) fn fields(&self) -> RawDataFields {
        RawDataFields {
            offset: self.offset,
            len: self.len,
            compression: self.compression as u8,
            hash: self.hash,
        }
    }
}

/// Builds the data record for `plain` bytes at `offset`: hashes them and, when `level` is
/// non-zero, stores them zstd-compressed if that is smaller.
pub fn encode_chunk(offset: u64, plain: &[u8], level: i32) -> Result<DataRecord, StreamError> {
    debug_assert!(plain.len() as u64 <= CHUNK_BYTES);
    let hash = *blake3::hash(plain).as_bytes();
    let mut compression = Compression::None;
    let mut payload = None;
    if level != 0 {
        let packed = zstd::bulk::compress(plain, level)
            .map_err(|e| StreamError::Compression(e.to_string()))?;
        if packed.len() < plain.len() {
            compression = Compression::Zstd;
            payload = Some(packed);
        }
    }
    Ok(DataRecord {
        offset,
        len: plain.len() as u32,
        compression,
        hash,
        payload: payload.unwrap_or_else(|| plain.to_vec()),
    })
}

/// The replica now equals the state `to` of transition `transition`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotEnd {
    /// Index of the transition this record closes.
    pub transition: u32,
    /// Name of the state reached.
    pub name: String,
    /// GUID of the state reached.
    pub guid: [u8; 16],
    /// Virtual size of the state reached.
    pub virtual_size: u64,
    /// The image digest of the state, when the sender computed it.
    pub digest: Option<[u8; 32]>,
    /// blake3 of every stream byte before this record's frame, from the magic on: a receiver
    /// checks it before it records the state as reached.
    pub prefix_hash: [u8; 32],
}

/// A point where every earlier byte is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// blake3 of every stream byte before this record's frame, from the magic on.
    pub prefix_hash: [u8; 32],
}

/// The last record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndRecord {
    /// Number of records before this one, the header included.
    pub records: u64,
    /// blake3 of every stream byte before this record's frame, from the magic on.
    pub stream_hash: [u8; 32],
}

/// A decoded record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// Data for a range.
    Data(DataRecord),
    /// `[offset, offset + len)` reads as zeros.
    Zero {
        /// First byte.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// `[offset, offset + len)` was freed: reads as zeros, deallocate where possible.
    Discard {
        /// First byte.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Every earlier record is verified.
    Checkpoint(CheckpointRecord),
    /// A transition is complete.
    SnapshotEnd(SnapshotEnd),
    /// The stream is complete and its hash verified.
    End(EndRecord),
}

/// Body of zero and discard records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct RangeBody {
    pub offset: u64,
    pub len: u64,
}
