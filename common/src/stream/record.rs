//! Records after the header: data, zero, discard, checkpoint, snapshot-info, snapshot-end and
//! end.

use serde::{Deserialize, Serialize};

use super::header::check_name;
use super::{encode_body, frame_head, SnapRef, FRAME_HEADER_BYTES};
use crate::buf::AlignedBuf;
use crate::image::qcow2::{snapshot_guid, Snapshot, SnapshotIdentity};
use crate::limits::CHUNK_BYTES;
use crate::StreamError;

thread_local! {
    /// One zstd decompression context per thread, reused for every record.
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        std::cell::RefCell::new(zstd::bulk::Decompressor::new().ok());
}

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
    /// The qcow2 internal snapshot the next snapshot-end reaches (optional: a reader that does
    /// not know the type skips it).
    SnapshotInfo = 8,
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
            8 => RecordType::SnapshotInfo,
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
    /// The stored bytes (page-aligned, so that they can be written with `O_DIRECT`).
    pub payload: AlignedBuf,
}

impl DataRecord {
    /// Decompresses (bounded by `len`) and verifies the payload; returns the plain bytes.
    /// `stream_offset` names the record in errors.
    pub fn plain(&self, stream_offset: u64) -> Result<Vec<u8>, StreamError> {
        self.clone()
            .into_plain(stream_offset, AlignedBuf::new())
            .map(|(plain, _)| plain.to_vec())
    }

    /// Like [`DataRecord::plain`], consuming the record: a stored payload becomes the plain
    /// bytes without a copy, a compressed one is decompressed into `spare` (its allocation is
    /// reused). Returns the plain bytes and the buffer left over (the compressed payload, or
    /// `spare`), for reuse.
    pub fn into_plain(
        self,
        stream_offset: u64,
        spare: AlignedBuf,
    ) -> Result<(AlignedBuf, AlignedBuf), StreamError> {
        self.into_plain_hashed(stream_offset, spare, |plain| {
            *blake3::hash(plain).as_bytes()
        })
    }

    /// Like [`DataRecord::into_plain`], with the plain bytes' blake3 computed by `hash`, for a
    /// caller that wants more of the hash's tree than its root in the same pass (the receiver
    /// keeps the chaining values of a whole block's 64 KiB pieces). `hash` must return the
    /// blake3 of what it is given: the record is checked against it.
    pub fn into_plain_hashed(
        self,
        stream_offset: u64,
        mut spare: AlignedBuf,
        hash: impl FnOnce(&[u8]) -> [u8; 32],
    ) -> Result<(AlignedBuf, AlignedBuf), StreamError> {
        let (plain, left) = match self.compression {
            Compression::None => (self.payload, spare),
            Compression::Zstd => {
                // Exactly `len` bytes of room, whatever the buffer held before (so that damage
                // fails the same way every time); only growth is zero-filled.
                spare.set_len(self.len as usize);
                let n = DECOMPRESSOR
                    .with(|d| {
                        let mut d = d.borrow_mut();
                        match d.as_mut() {
                            Some(d) => d.decompress_to_buffer(&self.payload, &mut spare[..]),
                            None => Err(std::io::Error::other("no zstd decompression context")),
                        }
                    })
                    .map_err(|e| StreamError::Corrupt {
                        offset: stream_offset,
                        reason: format!("data record for disk offset {}: {e}", self.offset),
                    })?;
                spare.truncate(n);
                (spare, self.payload)
            }
        };
        if plain.len() != self.len as usize || hash(&plain) != self.hash {
            return Err(StreamError::Checksum {
                stream_offset,
                disk_offset: self.offset,
            });
        }
        Ok((plain, left))
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
    encode_chunk_owned(offset, plain.into(), level, AlignedBuf::new()).map(|(rec, _)| rec)
}

/// Like [`encode_chunk`], taking the plain bytes by value: when compression is off or does not
/// pay they become the payload as they are (no copy); otherwise they are compressed into
/// `spare` (its allocation reused). Chunks that a quick sample shows to be incompressible are
/// stored plain without compressing them whole. Returns the record and the buffer left over
/// (`spare`, or the plain bytes once compressed), for reuse.
pub fn encode_chunk_owned(
    offset: u64,
    plain: AlignedBuf,
    level: i32,
    mut spare: AlignedBuf,
) -> Result<(DataRecord, AlignedBuf), StreamError> {
    debug_assert!(plain.len() as u64 <= CHUNK_BYTES);
    let hash = *blake3::hash(&plain).as_bytes();
    let len = plain.len() as u32;
    if level != 0 && worth_compressing(&plain) {
        spare.set_len(zstd::zstd_safe::compress_bound(plain.len()));
        let n = with_compressor(level, |c| c.compress_to_buffer(&plain, &mut spare[..]))
            .map_err(|e| StreamError::Compression(e.to_string()))?;
        spare.truncate(n);
        if spare.len() < plain.len() {
            let rec = DataRecord {
                offset,
                len,
                compression: Compression::Zstd,
                hash,
                payload: spare,
            };
            return Ok((rec, plain));
        }
    }
    let rec = DataRecord {
        offset,
        len,
        compression: Compression::None,
        hash,
        payload: plain,
    };
    Ok((rec, spare))
}

/// Bytes of each of the pieces a chunk's compressibility is judged on.
const SAMPLE_PIECE: usize = 4 << 10;

/// Pieces in a sample, spread evenly over the chunk.
const SAMPLE_PIECES: usize = 8;

/// Whether compressing `plain` is worth trying: chunks up to 64 KiB always are; of a larger
/// one, a sample of [`SAMPLE_PIECES`] pieces compressed at level 1 must shrink by 1/32 at
/// least (random or already compressed data never does, and then costs no more than the
/// sample).
fn worth_compressing(plain: &[u8]) -> bool {
    if plain.len() <= 16 * SAMPLE_PIECE {
        return true;
    }
    let mut sample = [0u8; SAMPLE_PIECE * SAMPLE_PIECES];
    let step = (plain.len() - SAMPLE_PIECE) / (SAMPLE_PIECES - 1);
    for (i, piece) in sample.chunks_exact_mut(SAMPLE_PIECE).enumerate() {
        piece.copy_from_slice(&plain[i * step..i * step + SAMPLE_PIECE]);
    }
    let mut out = [0u8; SAMPLE_PIECE * SAMPLE_PIECES];
    let room = sample.len() - sample.len() / 32;
    // An output that does not fit in `room` fails: the sample does not shrink enough.
    with_compressor(1, |c| c.compress_to_buffer(&sample[..], &mut out[..room])).is_ok()
}

thread_local! {
    /// zstd compression contexts of this thread, one per level used.
    static COMPRESSORS: std::cell::RefCell<Vec<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's compression context for `level`.
fn with_compressor<T>(
    level: i32,
    f: impl FnOnce(&mut zstd::bulk::Compressor<'static>) -> std::io::Result<T>,
) -> std::io::Result<T> {
    COMPRESSORS.with(|cell| {
        let mut all = cell.borrow_mut();
        let i = match all.iter().position(|(l, _)| *l == level) {
            Some(i) => i,
            None => {
                all.push((level, zstd::bulk::Compressor::new(level)?));
                all.len() - 1
            }
        };
        f(&mut all[i].1)
    })
}

/// A data record with its frame header built ahead of time (the frame check computed), on
/// the thread that built the record rather than the one writing the stream.
#[derive(Debug)]
pub struct DataFrame {
    pub(crate) head: [u8; FRAME_HEADER_BYTES],
    pub(crate) fields: Vec<u8>,
    record: DataRecord,
}

impl DataFrame {
    /// Frames `record`.
    pub fn new(record: DataRecord) -> Self {
        let fields = encode_body(&record.fields());
        let body_len = fields.len() + record.payload.len();
        let head = frame_head(RecordType::Data as u8, 0, body_len, &[&fields]);
        DataFrame {
            head,
            fields,
            record,
        }
    }

    /// The record.
    pub fn record(&self) -> &DataRecord {
        &self.record
    }

    /// The record, unframed (its payload buffer can be reused).
    pub fn into_record(self) -> DataRecord {
        self.record
    }
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

/// The qcow2 internal snapshot that transition `transition` reaches, as the source's snapshot
/// table describes it: what a receiver needs to create the same snapshot in a qcow2 replica,
/// with the same GUID. Sent right before that transition's snapshot-end record, whose prefix
/// hash vouches for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// Index of the transition whose `to` state this snapshot is.
    pub transition: u32,
    /// The snapshot's unique id string (QEMU uses "1", "2", …).
    pub id: String,
    /// The snapshot's name; equals the transition's `to.name`.
    pub name: String,
    /// Creation time, seconds since the epoch (host clock).
    pub date_sec: u32,
    /// Creation time, nanoseconds part.
    pub date_nsec: u32,
    /// Guest run time at creation, in nanoseconds.
    pub vm_clock_nsec: u64,
    /// Virtual disk size of the snapshot; equals the transition's `virtual_size`.
    pub disk_size: u64,
}

impl SnapshotInfo {
    /// The info of `snapshot`, reached by transition `transition`.
    pub fn from_snapshot(transition: u32, snapshot: &Snapshot) -> Self {
        SnapshotInfo {
            transition,
            id: snapshot.id.clone(),
            name: snapshot.name.clone(),
            date_sec: snapshot.date_sec,
            date_nsec: snapshot.date_nsec,
            vm_clock_nsec: snapshot.vm_clock_nsec,
            disk_size: snapshot.disk_size,
        }
    }

    /// The GUID of the snapshot these fields describe, computed as [`Snapshot::guid`] does.
    pub fn guid(&self) -> [u8; 16] {
        snapshot_guid(&SnapshotIdentity {
            id: &self.id,
            name: &self.name,
            date_sec: self.date_sec,
            date_nsec: self.date_nsec,
            vm_clock_nsec: self.vm_clock_nsec,
            disk_size: self.disk_size,
        })
    }

    /// Whether these fields describe the state `to`: the same name, and the GUID they give is
    /// `to`'s. Only then can a receiver trust them to recreate the snapshot.
    pub fn is_for(&self, to: &SnapRef) -> bool {
        self.name == to.name && self.guid() == to.guid
    }

    /// Checks the lengths a reader bounds (id and name, like every name in a stream); returns a
    /// description of the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        check_name("snapshot id", &self.id)?;
        check_name("snapshot name", &self.name)
    }
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
    /// The qcow2 internal snapshot the snapshot-end right after it reaches (vouched for by
    /// that record's prefix hash, not yet verified when returned).
    SnapshotInfo(SnapshotInfo),
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
