//! Reads and checks a stream: framing, limits, order, transitions and the end hash.
//!
//! The reader enforces every structural rule, so its users see only records that are in
//! bounds, sorted within their transition, and closed by a verified end record. Payload
//! checksums are verified by [`DataRecord::plain`], where the payload is decompressed.

use std::io::{ErrorKind, Read};

use super::record::{RangeBody, RawDataFields, RecordType};
use super::{
    decode_body, frame_check, CheckpointRecord, Compression, DataRecord, EndRecord, Record,
    SnapshotEnd, SnapshotInfo, StreamHeader, DATA_FIXED_BYTES, FLAG_OPTIONAL, FRAME_HEADER_BYTES,
    MAGIC, VERSION,
};
use crate::buf::{AlignedBuf, ALIGN};
use crate::limits::{
    CHUNK_BYTES, MAX_HEADER_BYTES, MAX_RECORD_BODY_BYTES, MAX_UNVERIFIED_PLAIN_BYTES,
    MAX_UNVERIFIED_STREAM_BYTES,
};
use crate::StreamError;

/// Decodes records from a byte source, checking the stream's rules as it goes.
pub struct StreamReader<R: Read> {
    inner: R,
    header: StreamHeader,
    hasher: blake3::Hasher,
    pos: u64,
    records: u64,
    transition: usize,
    next_free: u64,
    record_start: u64,
    prefix_hash: [u8; 32],
    /// Stream bytes and plain data bytes since the last verified point.
    unverified: (u64, u64),
    /// The last frame was a snapshot-info record: the next one must be its snapshot-end.
    info_pending: bool,
    done: bool,
    /// Spare payload buffers handed back by [`StreamReader::recycle`].
    spare: Vec<AlignedBuf>,
}

/// Spare payload buffers a reader keeps for reuse.
const MAX_SPARE_BUFFERS: usize = 16;

/// A frame read from the stream, before its body is interpreted. A data frame's body is
/// split: its fixed fields and its payload (read straight into a reused buffer, never
/// copied); other frames have their whole body in `body`.
struct Frame {
    kind: u8,
    flags: u8,
    data: Option<([u8; DATA_FIXED_BYTES], AlignedBuf)>,
    body: Vec<u8>,
}

impl<R: Read> StreamReader<R> {
    /// Reads the preamble and the header.
    pub fn new(mut inner: R) -> Result<Self, StreamError> {
        let mut pre = [0u8; 12];
        read_full(&mut inner, &mut pre, 0)?;
        let magic: [u8; 8] = pre[..8].try_into().expect("8 bytes");
        if magic != MAGIC {
            return Err(StreamError::BadMagic(magic));
        }
        let version = u32::from_le_bytes(pre[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(StreamError::BadVersion(version, VERSION));
        }
        let mut hasher = blake3::Hasher::new();
        hasher.update(&pre);
        let mut r = StreamReader {
            inner,
            header: placeholder_header(),
            hasher,
            pos: 12,
            records: 0,
            transition: 0,
            next_free: 0,
            record_start: 12,
            prefix_hash: [0; 32],
            unverified: (0, 0),
            info_pending: false,
            done: false,
            spare: Vec::new(),
        };
        let frame = r.read_frame()?;
        if frame.kind != RecordType::Header as u8 {
            return Err(r.corrupt(format!(
                "first record has type {}, not a header",
                frame.kind
            )));
        }
        let (header, used): (StreamHeader, usize) =
            decode_body(&frame.body, "header").map_err(|e| r.corrupt(e))?;
        if used != frame.body.len() {
            return Err(r.corrupt("header record has trailing bytes".into()));
        }
        header.validate().map_err(|e| r.corrupt(e))?;
        r.next_free = header.resume_offset;
        r.header = header;
        Ok(r)
    }

    /// The stream header.
    pub fn header(&self) -> &StreamHeader {
        &self.header
    }

    /// Stream bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Stream position of the first byte of the last record returned.
    pub fn record_position(&self) -> u64 {
        self.record_start
    }

    /// Index of the transition the next record belongs to.
    pub fn transition(&self) -> usize {
        self.transition
    }

    /// The running stream hash after the last record returned (to continue the stream with
    /// [`StreamWriter::continue_after`](super::StreamWriter::continue_after)).
    pub fn stream_hasher(&self) -> blake3::Hasher {
        self.hasher.clone()
    }

    /// Hands back a buffer (a payload or plain bytes that are no longer needed), so that a
    /// later data record is read into it instead of a fresh allocation.
    pub fn recycle(&mut self, buf: AlignedBuf) {
        if self.spare.len() < MAX_SPARE_BUFFERS && buf.capacity() > 0 {
            self.spare.push(buf);
        }
    }

    /// The next record, or `None` after the end record.
    pub fn next_record(&mut self) -> Result<Option<Record>, StreamError> {
        if self.done {
            return Ok(None);
        }
        loop {
            let frame = self.read_frame()?;
            if self.info_pending && frame.kind != RecordType::SnapshotEnd as u8 {
                return Err(self.corrupt(format!(
                    "record of type {} after a snapshot-info record, which only its \
                     snapshot-end may follow",
                    frame.kind
                )));
            }
            let Some(kind) = RecordType::from_u8(frame.kind) else {
                if frame.flags & FLAG_OPTIONAL != 0 {
                    continue;
                }
                return Err(self.corrupt(format!("unknown record type {}", frame.kind)));
            };
            return self.interpret(kind, frame).map(Some);
        }
    }

    fn interpret(&mut self, kind: RecordType, frame: Frame) -> Result<Record, StreamError> {
        let Frame { data, body, .. } = frame;
        match (kind, data) {
            (RecordType::Data, Some((fixed, payload))) => {
                self.data(&fixed, payload).map(Record::Data)
            }
            (RecordType::Data, None) => {
                Err(self.corrupt(format!("data record body of {} bytes", body.len())))
            }
            (RecordType::Header, _) => Err(self.corrupt("a second header record".into())),
            (RecordType::Zero | RecordType::Discard, _) => {
                let r: RangeBody = self.decode_exact(&body, "zero/discard")?;
                self.claim(r.offset, r.len)?;
                Ok(if kind == RecordType::Zero {
                    Record::Zero {
                        offset: r.offset,
                        len: r.len,
                    }
                } else {
                    Record::Discard {
                        offset: r.offset,
                        len: r.len,
                    }
                })
            }
            (RecordType::SnapshotEnd, _) => self.snapshot_end(&body).map(Record::SnapshotEnd),
            (RecordType::SnapshotInfo, _) => self.snapshot_info(&body).map(Record::SnapshotInfo),
            (RecordType::Checkpoint, _) => {
                let rec: CheckpointRecord = self.decode_exact(&body, "checkpoint")?;
                if rec.prefix_hash != self.prefix_hash {
                    return Err(StreamError::StreamHash {
                        offset: self.record_start,
                    });
                }
                Ok(Record::Checkpoint(rec))
            }
            (RecordType::End, _) => self.end(&body).map(Record::End),
        }
    }

    fn data(
        &mut self,
        fixed: &[u8; DATA_FIXED_BYTES],
        payload: AlignedBuf,
    ) -> Result<DataRecord, StreamError> {
        let (f, _): (RawDataFields, usize) =
            decode_body(fixed, "data").map_err(|e| self.corrupt(e))?;
        let len = u64::from(f.len);
        if len == 0 {
            return Err(self.corrupt(format!("empty data record at disk offset {}", f.offset)));
        }
        if f.offset % CHUNK_BYTES + len > CHUNK_BYTES {
            return Err(self.corrupt(format!(
                "data record of {len} bytes at disk offset {} crosses a 1 MiB boundary",
                f.offset
            )));
        }
        let compression = match f.compression {
            0 if payload.len() as u64 == len => Compression::None,
            1 => Compression::Zstd,
            c => {
                return Err(self.corrupt(format!(
                    "data record with compression {c} and a payload of {} bytes for {len}",
                    payload.len()
                )))
            }
        };
        self.claim(f.offset, len)?;
        self.unverified.1 += len;
        if self.unverified.1 > MAX_UNVERIFIED_PLAIN_BYTES + CHUNK_BYTES {
            return Err(self.corrupt(format!(
                "no checkpoint record in {} bytes of data (limit {MAX_UNVERIFIED_PLAIN_BYTES})",
                self.unverified.1
            )));
        }
        Ok(DataRecord {
            offset: f.offset,
            len: f.len,
            compression,
            hash: f.hash,
            payload,
        })
    }

    /// A snapshot-info record: in the current transition, of its `to` snapshot (same name, and
    /// the transition's size); the next frame must be that transition's snapshot-end.
    fn snapshot_info(&mut self, body: &[u8]) -> Result<SnapshotInfo, StreamError> {
        let rec: SnapshotInfo = self.decode_exact(body, "snapshot-info")?;
        rec.validate()
            .map_err(|e| self.corrupt(format!("snapshot-info record: {e}")))?;
        let Some(t) = self.header.transitions.get(self.transition) else {
            return Err(self.corrupt("snapshot-info record after the last transition".into()));
        };
        if rec.transition as usize != self.transition
            || rec.name != t.to.name
            || rec.disk_size != t.virtual_size
        {
            return Err(self.corrupt(format!(
                "snapshot-info record for '{}' (transition {}, {} bytes) does not describe \
                 transition {} to '{}' ({} bytes)",
                rec.name, rec.transition, rec.disk_size, self.transition, t.to.name, t.virtual_size
            )));
        }
        self.info_pending = true;
        Ok(rec)
    }

    fn snapshot_end(&mut self, body: &[u8]) -> Result<SnapshotEnd, StreamError> {
        let rec: SnapshotEnd = self.decode_exact(body, "snapshot-end")?;
        let Some(t) = self.header.transitions.get(self.transition) else {
            return Err(self.corrupt("snapshot-end record after the last transition".into()));
        };
        if rec.transition as usize != self.transition
            || rec.guid != t.to.guid
            || rec.name != t.to.name
            || rec.virtual_size != t.virtual_size
        {
            return Err(self.corrupt(format!(
                "snapshot-end record for '{}' does not close transition {} to '{}'",
                rec.name, self.transition, t.to.name
            )));
        }
        if rec.prefix_hash != self.prefix_hash {
            return Err(StreamError::StreamHash {
                offset: self.record_start,
            });
        }
        self.transition += 1;
        self.next_free = 0;
        self.info_pending = false;
        Ok(rec)
    }

    fn end(&mut self, body: &[u8]) -> Result<EndRecord, StreamError> {
        let rec: EndRecord = self.decode_exact(body, "end")?;
        if self.transition != self.header.transitions.len() {
            return Err(self.corrupt(format!(
                "end record after {} of {} transitions",
                self.transition,
                self.header.transitions.len()
            )));
        }
        if rec.records != self.records {
            return Err(self.corrupt(format!(
                "end record counts {} records, the stream had {}",
                rec.records, self.records
            )));
        }
        if rec.stream_hash != *self.hasher.finalize().as_bytes() {
            return Err(StreamError::StreamHash {
                offset: self.record_start,
            });
        }
        let mut probe = [0u8; 1];
        loop {
            match self.inner.read(&mut probe) {
                Ok(0) => break,
                Ok(_) => return Err(self.corrupt("bytes after the end record".into())),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(StreamError::Read(e)),
            }
        }
        self.done = true;
        Ok(rec)
    }

    /// Checks that `[offset, offset+len)` is non-empty, in bounds and after the previous range.
    fn claim(&mut self, offset: u64, len: u64) -> Result<(), StreamError> {
        let Some(t) = self.header.transitions.get(self.transition) else {
            return Err(self.corrupt("record after the last transition".into()));
        };
        let size = t.virtual_size;
        if len == 0 {
            return Err(self.corrupt(format!("empty range at disk offset {offset}")));
        }
        let end = offset.checked_add(len).filter(|&e| e <= size);
        let Some(end) = end else {
            return Err(self.corrupt(format!(
                "range at {offset} (+{len} bytes) outside the virtual size {size}"
            )));
        };
        if offset < self.next_free {
            return Err(self.corrupt(format!(
                "range at {offset} overlaps or precedes the previous one (ending at {})",
                self.next_free
            )));
        }
        self.next_free = end;
        Ok(())
    }

    fn decode_exact<T: serde::de::DeserializeOwned>(
        &self,
        body: &[u8],
        what: &str,
    ) -> Result<T, StreamError> {
        let (v, used) = decode_body(body, what).map_err(|e| self.corrupt(e))?;
        if used != body.len() {
            return Err(self.corrupt(format!("{what} record has trailing bytes")));
        }
        Ok(v)
    }

    fn read_frame(&mut self) -> Result<Frame, StreamError> {
        self.record_start = self.pos;
        let mut head = [0u8; FRAME_HEADER_BYTES];
        read_full(&mut self.inner, &mut head, self.pos)?;
        let (kind, flags) = (head[0], head[1]);
        let body_len = u32::from_le_bytes(head[4..8].try_into().expect("4 bytes"));
        let limit = if kind == RecordType::Header as u8 {
            MAX_HEADER_BYTES
        } else {
            MAX_RECORD_BODY_BYTES
        };
        if head[2..4] != [0, 0] || flags & !FLAG_OPTIONAL != 0 {
            return Err(self.corrupt(format!("frame with reserved bits set: {head:02x?}")));
        }
        if body_len > limit {
            return Err(self.corrupt(format!("record body of {body_len} bytes (limit {limit})")));
        }
        let body_at = self.pos + FRAME_HEADER_BYTES as u64;
        let (data, body) =
            if kind == RecordType::Data as u8 && body_len as usize >= DATA_FIXED_BYTES {
                let mut fixed = [0u8; DATA_FIXED_BYTES];
                read_full(&mut self.inner, &mut fixed, body_at)?;
                // A reused buffer keeps its old bytes (about to be overwritten): only growth is
                // zero-filled. A short payload gets a buffer of its own size, so that the
                // records a receiver holds until a checkpoint cost their bytes, not a chunk's.
                let n = body_len as usize - DATA_FIXED_BYTES;
                let mut payload = match n {
                    ALIGN.. => self.spare.pop().unwrap_or_default(),
                    _ => AlignedBuf::new(),
                };
                payload.set_len(n);
                let at = body_at + DATA_FIXED_BYTES as u64;
                read_full(&mut self.inner, &mut payload, at)?;
                (Some((fixed, payload)), Vec::new())
            } else {
                let mut body = vec![0u8; body_len as usize];
                read_full(&mut self.inner, &mut body, body_at)?;
                (None, body)
            };
        // A data record's payload is covered by its plain-bytes hash, in the fixed fields.
        let checked: &[u8] = data.as_ref().map_or(&body, |(f, _)| &f[..]);
        if frame_check(&head[..8], &[checked]) != head[8..16] {
            return Err(self.corrupt(format!(
                "record check mismatch (type {kind}, {body_len} bytes): the record was altered"
            )));
        }
        if kind == RecordType::SnapshotEnd as u8 || kind == RecordType::Checkpoint as u8 {
            self.prefix_hash = *self.hasher.finalize().as_bytes();
            self.unverified = (0, 0);
        } else {
            self.unverified.0 += u64::from(body_len) + FRAME_HEADER_BYTES as u64;
            if self.unverified.0 > MAX_UNVERIFIED_STREAM_BYTES + MAX_RECORD_BODY_BYTES as u64 {
                return Err(self.corrupt(format!(
                    "no checkpoint record in {} stream bytes (limit {MAX_UNVERIFIED_STREAM_BYTES})",
                    self.unverified.0
                )));
            }
        }
        if kind != RecordType::End as u8 {
            self.hasher.update(&head);
            self.hasher.update(checked);
            self.records += 1;
        }
        self.pos += u64::from(body_len) + FRAME_HEADER_BYTES as u64;
        Ok(Frame {
            kind,
            flags,
            data,
            body,
        })
    }

    fn corrupt(&self, reason: String) -> StreamError {
        StreamError::Corrupt {
            offset: self.record_start,
            reason,
        }
    }
}

/// Fills `buf`, reporting a clean or mid-record end of input as truncation at `pos`.
fn read_full<R: Read>(r: &mut R, buf: &mut [u8], pos: u64) -> Result<(), StreamError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => return Err(StreamError::Truncated(pos + got as u64)),
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(StreamError::Read(e)),
        }
    }
    Ok(())
}

fn placeholder_header() -> StreamHeader {
    StreamHeader {
        stream_id: [0; 16],
        virtual_size: 0,
        source: super::SourceInfo {
            kind: String::new(),
            name: String::new(),
        },
        transitions: Vec::new(),
        total_extents: 0,
        total_data_bytes: 0,
        total_zero_bytes: 0,
        resume_offset: 0,
    }
}
