//! The decoder: reads, checks and decompresses records on a thread of its own, ahead of the
//! writes, and hands the applier one [`Step`] per record.

use std::io::Read;
use std::sync::mpsc::{Receiver, SyncSender};

use blkdelta_common::buf::AlignedBuf;
use blkdelta_common::stream::{Record, SnapshotEnd, SnapshotInfo, StreamReader};
use blkdelta_common::StreamError;

use crate::hashes::{hash_block_write, Cvs};

/// A range of the disk that a record changes: what the applier holds back, writes and hashes.
pub(crate) enum Range {
    /// Plain bytes at `offset` (decompressed, their blake3 verified), with the chaining values
    /// of their 64 KiB pieces when they are a whole block (worked out by the same hashing).
    Data {
        offset: u64,
        bytes: AlignedBuf,
        cvs: Option<Box<Cvs>>,
    },
    /// `len` bytes at `offset` read as zeros, kept allocated where cheap.
    Zero { offset: u64, len: u64 },
    /// `len` bytes at `offset` read as zeros, deallocated where the target can.
    Discard { offset: u64, len: u64 },
}

impl Range {
    /// Offset and length.
    pub(crate) fn span(&self) -> (u64, u64) {
        match self {
            Range::Data { offset, bytes, .. } => (*offset, bytes.len() as u64),
            Range::Zero { offset, len } | Range::Discard { offset, len } => (*offset, *len),
        }
    }
}

/// One record, as the applier takes it.
pub(crate) enum Step {
    /// A range to change, once a later prefix hash vouches for it.
    Range(Range),
    /// A verified prefix: the ranges held back so far may be applied.
    Checkpoint,
    /// The qcow2 internal snapshot the next step, a snapshot-end, reaches (vouched for by that
    /// record's prefix hash).
    SnapshotInfo(SnapshotInfo),
    /// A verified prefix, and the end of a transition.
    SnapshotEnd(SnapshotEnd),
    /// The end record, verified.
    End,
}

/// What the decoder hands over: a step, or the error that ended the stream (the last item).
pub(crate) type Decoded = Result<Step, StreamError>;

/// Reads records into `tx` until the end record, an error (sent as the last item) or the
/// applier going away; reuses the buffers that come back on `spare`.
pub(crate) fn decode<R: Read>(
    reader: &mut StreamReader<R>,
    tx: &SyncSender<Decoded>,
    spare: &Receiver<AlignedBuf>,
) {
    let mut out = AlignedBuf::new();
    loop {
        while let Ok(buf) = spare.try_recv() {
            if out.capacity() == 0 {
                out = buf;
            } else {
                reader.recycle(buf);
            }
        }
        let step = match reader.next_record() {
            Ok(None) => return,
            Ok(Some(rec)) => step(rec, reader.record_position(), &mut out),
            Err(e) => Err(e),
        };
        let failed = step.is_err();
        if tx.send(step).is_err() || failed {
            return;
        }
    }
}

/// The step of record `rec` (read at stream offset `at`), a data payload decompressed into
/// `out` (which gets back the buffer left over, for the next one).
fn step(rec: Record, at: u64, out: &mut AlignedBuf) -> Decoded {
    Ok(match rec {
        Record::Data(d) => {
            let offset = d.offset;
            let mut cvs = None;
            let (bytes, left) = d.into_plain_hashed(at, std::mem::take(out), |plain| {
                let (hash, pieces) = hash_block_write(offset, plain);
                cvs = pieces;
                hash
            })?;
            *out = left;
            Step::Range(Range::Data { offset, bytes, cvs })
        }
        Record::Zero { offset, len } => Step::Range(Range::Zero { offset, len }),
        Record::Discard { offset, len } => Step::Range(Range::Discard { offset, len }),
        Record::Checkpoint(_) => Step::Checkpoint,
        Record::SnapshotInfo(info) => Step::SnapshotInfo(info),
        Record::SnapshotEnd(end) => Step::SnapshotEnd(end),
        Record::End(_) => Step::End,
    })
}
