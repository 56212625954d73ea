//! Writes a stream: preamble, header, records, end.

use std::io::Write;

use super::record::{RangeBody, RecordType};
use super::{
    encode_body, CheckpointRecord, DataFrame, DataRecord, EndRecord, SnapshotEnd, SnapshotInfo,
    StreamHeader, FLAG_OPTIONAL, MAGIC, VERSION,
};
use crate::limits::{CHECKPOINT_PLAIN_BYTES, CHECKPOINT_STREAM_BYTES, MAX_HEADER_BYTES};
use crate::StreamError;

/// Frames records onto a byte sink, keeping the running stream hash.
pub struct StreamWriter<W: Write> {
    inner: W,
    hasher: blake3::Hasher,
    records: u64,
    bytes: u64,
    /// Stream bytes and plain data bytes since the last verified point.
    unverified: (u64, u64),
    auto_checkpoints: bool,
}

impl<W: Write> StreamWriter<W> {
    /// Writes the preamble and the header, refusing a header that a reader would reject.
    pub fn new(inner: W, header: &StreamHeader) -> Result<Self, StreamError> {
        let body = encode_body(header);
        let invalid = |reason| StreamError::Corrupt { offset: 12, reason };
        header.validate().map_err(invalid)?;
        if body.len() > MAX_HEADER_BYTES as usize {
            return Err(invalid(format!(
                "header of {} bytes (limit {MAX_HEADER_BYTES})",
                body.len()
            )));
        }
        let mut w = StreamWriter {
            inner,
            hasher: blake3::Hasher::new(),
            records: 0,
            bytes: 0,
            unverified: (0, 0),
            auto_checkpoints: true,
        };
        let mut preamble = MAGIC.to_vec();
        preamble.extend_from_slice(&VERSION.to_le_bytes());
        w.put(&preamble)?;
        w.frame(RecordType::Header, &[&body])?;
        Ok(w)
    }

    /// Continues a stream whose first `bytes` bytes (`records` complete records, the header
    /// included) are already in `inner`, and whose hash so far is `hasher`: appending to an
    /// interrupted stream.
    pub fn continue_after(inner: W, hasher: blake3::Hasher, records: u64, bytes: u64) -> Self {
        StreamWriter {
            inner,
            hasher,
            records,
            bytes,
            unverified: (0, 0),
            auto_checkpoints: true,
        }
    }

    /// Writes a data record (and a checkpoint record when one is due).
    pub fn data(&mut self, rec: &DataRecord) -> Result<(), StreamError> {
        let fields = encode_body(&rec.fields());
        let body_len = fields.len() + rec.payload.len();
        let head = super::frame_head(RecordType::Data as u8, 0, body_len, &[&fields]);
        self.put_frame(&head, &fields, &rec.payload)?;
        self.unverified.1 += u64::from(rec.len);
        self.checkpoint_if_due()
    }

    /// Writes a data record framed ahead of time (and a checkpoint record when one is due).
    pub fn data_frame(&mut self, frame: &DataFrame) -> Result<(), StreamError> {
        let rec = frame.record();
        self.put_frame(&frame.head, &frame.fields, &rec.payload)?;
        self.unverified.1 += u64::from(rec.len);
        self.checkpoint_if_due()
    }

    /// Writes a zero record (and a checkpoint record when one is due).
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), StreamError> {
        let body = encode_body(&RangeBody { offset, len });
        self.frame(RecordType::Zero, &[&body])?;
        self.checkpoint_if_due()
    }

    /// Writes a discard record (and a checkpoint record when one is due).
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), StreamError> {
        let body = encode_body(&RangeBody { offset, len });
        self.frame(RecordType::Discard, &[&body])?;
        self.checkpoint_if_due()
    }

    /// A checkpoint record after every [`CHECKPOINT_STREAM_BYTES`] of stream or
    /// [`CHECKPOINT_PLAIN_BYTES`] of data since the last verified point, so that a reader never
    /// holds back more than the limits allow.
    fn checkpoint_if_due(&mut self) -> Result<(), StreamError> {
        let (stream, plain) = self.unverified;
        if self.auto_checkpoints
            && (stream >= CHECKPOINT_STREAM_BYTES || plain >= CHECKPOINT_PLAIN_BYTES)
        {
            self.checkpoint()?;
        }
        Ok(())
    }

    /// Stops writing checkpoint records on its own (tests of readers that require them).
    #[cfg(test)]
    pub(crate) fn without_checkpoints(mut self) -> Self {
        self.auto_checkpoints = false;
        self
    }

    /// Writes a snapshot-info record, optional (readers that do not know the type skip it),
    /// refusing one whose id or name a reader would reject. The caller writes the snapshot-end
    /// of the same transition right after it: no checkpoint is put between the two.
    pub fn snapshot_info(&mut self, info: &SnapshotInfo) -> Result<(), StreamError> {
        info.validate().map_err(|reason| StreamError::Corrupt {
            offset: self.bytes,
            reason,
        })?;
        self.frame_bytes(
            RecordType::SnapshotInfo as u8,
            FLAG_OPTIONAL,
            &[&encode_body(info)],
        )
    }

    /// Writes a snapshot-end record; its `prefix_hash` is filled in here.
    pub fn snapshot_end(&mut self, rec: &SnapshotEnd) -> Result<(), StreamError> {
        let rec = SnapshotEnd {
            prefix_hash: *self.hasher.finalize().as_bytes(),
            ..rec.clone()
        };
        self.frame(RecordType::SnapshotEnd, &[&encode_body(&rec)])?;
        self.unverified = (0, 0);
        Ok(())
    }

    /// Writes a checkpoint record: a receiver may make everything before it durable and
    /// resume after it, since its prefix hash vouches for every earlier byte.
    pub fn checkpoint(&mut self) -> Result<(), StreamError> {
        let rec = CheckpointRecord {
            prefix_hash: *self.hasher.finalize().as_bytes(),
        };
        self.frame_bytes(
            RecordType::Checkpoint as u8,
            FLAG_OPTIONAL,
            &[&encode_body(&rec)],
        )?;
        self.unverified = (0, 0);
        Ok(())
    }

    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.bytes
    }

    /// Flushes the sink and returns it, to sync it (a stream that must be durable as it goes).
    pub fn flush_inner(&mut self) -> Result<&mut W, StreamError> {
        self.inner.flush().map_err(StreamError::Write)?;
        Ok(&mut self.inner)
    }

    /// Writes the end record, flushes, and returns the sink.
    pub fn finish(mut self) -> Result<W, StreamError> {
        let end = EndRecord {
            records: self.records,
            stream_hash: *self.hasher.finalize().as_bytes(),
        };
        self.frame(RecordType::End, &[&encode_body(&end)])?;
        self.inner.flush().map_err(StreamError::Write)?;
        Ok(self.inner)
    }

    fn frame(&mut self, kind: RecordType, parts: &[&[u8]]) -> Result<(), StreamError> {
        self.frame_bytes(kind as u8, 0, parts)
    }

    /// Writes a frame of any type and flags (tests of unknown and optional records).
    #[cfg(test)]
    pub(crate) fn raw_frame(
        &mut self,
        kind: u8,
        flags: u8,
        body: &[u8],
    ) -> Result<(), StreamError> {
        self.frame_bytes(kind, flags, &[body])
    }

    fn frame_bytes(&mut self, kind: u8, flags: u8, parts: &[&[u8]]) -> Result<(), StreamError> {
        let body: Vec<u8> = parts.concat();
        let head = super::frame_head(kind, flags, body.len(), &[&body]);
        self.put_frame(&head, &body, &[])
    }

    /// Writes a frame: its head and `hashed` body bytes enter the running stream hash, a data
    /// record's `payload` does not (the record's plain-bytes hash, in `hashed`, stands for it).
    fn put_frame(
        &mut self,
        head: &[u8; super::FRAME_HEADER_BYTES],
        hashed: &[u8],
        payload: &[u8],
    ) -> Result<(), StreamError> {
        self.put(head)?;
        self.put(hashed)?;
        self.inner.write_all(payload).map_err(StreamError::Write)?;
        self.bytes += payload.len() as u64;
        let body_len = hashed.len() + payload.len();
        self.unverified.0 += (super::FRAME_HEADER_BYTES + body_len) as u64;
        self.records += 1;
        Ok(())
    }

    fn put(&mut self, bytes: &[u8]) -> Result<(), StreamError> {
        self.inner.write_all(bytes).map_err(StreamError::Write)?;
        self.hasher.update(bytes);
        self.bytes += bytes.len() as u64;
        Ok(())
    }
}
