//! The undo stream: the old contents of every range an apply overwrites, saved (and synced)
//! before the range is written, as a stream of the same format going back from `to` to `from`.
//! Applying it to the replica rolls it back; applying the original stream again replays it.
//!
//! An interrupted apply leaves an undo stream without its snapshot-end and end records. Passing
//! the same `--undo FILE` when finishing the apply continues that file: its complete records are
//! kept, the ranges they cover are not saved again, and the stream is closed at the end.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use blkdelta_common::image::raw::RawImage;
use blkdelta_common::image::{Allocation, BlockSource};
use blkdelta_common::limits::CHUNK_BYTES;
use blkdelta_common::stream::{
    encode_chunk, random_id, Record, SnapshotEnd, SourceInfo, StreamHeader, StreamReader,
    StreamWriter, Transition,
};

use crate::ReceiveError;

/// Writes the undo stream of one transition.
pub struct UndoWriter {
    path: PathBuf,
    writer: StreamWriter<BufWriter<File>>,
    header: StreamHeader,
    /// Disk offset below which every range that may be written is already saved.
    saved_upto: u64,
    /// Size of the replica before the transition: nothing at or past it needs saving.
    old_size: u64,
    /// The stream was finished by an apply killed before it recorded the end of its
    /// transition: every pre-image is in it, so nothing more is saved (the replica holds the
    /// new contents already wherever they were written).
    complete: bool,
}

fn undo_io(path: &Path, op: &'static str, source: std::io::Error) -> ReceiveError {
    ReceiveError::UndoIo {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn undo_err(path: &Path, reason: impl ToString) -> ReceiveError {
    ReceiveError::Undo {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// The undo header for `forward`, applied to a replica of `old_size` bytes.
pub fn undo_header(forward: &Transition, source: &SourceInfo, old_size: u64) -> StreamHeader {
    let from = forward
        .from
        .clone()
        .expect("undo applies to incremental transitions");
    StreamHeader {
        stream_id: random_id(),
        virtual_size: old_size,
        source: source.clone(),
        transitions: vec![Transition {
            from: Some(forward.to.clone()),
            to: from,
            virtual_size: old_size,
        }],
        total_extents: 0,
        total_data_bytes: 0,
        total_zero_bytes: 0,
        resume_offset: 0,
    }
}

impl UndoWriter {
    /// Starts a new undo stream at `path`, which must not exist.
    pub fn create(path: &Path, header: StreamHeader) -> Result<Self, ReceiveError> {
        Self::start(path, header, false)
    }

    /// Starts the undo stream at `path` again: an apply created it and was killed before
    /// it saved anything in it (see [`is_unused`]).
    pub fn restart(path: &Path, header: StreamHeader) -> Result<Self, ReceiveError> {
        Self::start(path, header, true)
    }

    fn start(path: &Path, header: StreamHeader, replace: bool) -> Result<Self, ReceiveError> {
        let file = OpenOptions::new()
            .write(true)
            .create_new(!replace)
            .truncate(replace)
            .open(path)
            .map_err(|e| undo_io(path, "open", e))?;
        let writer = StreamWriter::new(BufWriter::with_capacity(1 << 20, file), &header)?;
        let old_size = header.virtual_size;
        let mut w = UndoWriter {
            path: path.to_path_buf(),
            writer,
            header,
            saved_upto: 0,
            old_size,
            complete: false,
        };
        w.sync()?;
        // The file's name is durable before anything it protects is overwritten.
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d,
            _ => Path::new("."),
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| undo_io(path, "open", e))?;
        Ok(w)
    }

    /// Continues the interrupted undo stream at `path`, which must be for the same transition
    /// (`from`, `to` and size of `expected`).
    pub fn resume(path: &Path, expected: &StreamHeader) -> Result<Self, ReceiveError> {
        let scan = scan(path)?;
        let (want, have) = (&expected.transitions[0], &scan.header.transitions[0]);
        // The size is the file's: the target may have grown or shrunk since it was written.
        if want.from != have.from || want.to != have.to {
            return Err(undo_err(
                path,
                "it is the undo stream of another transition",
            ));
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| undo_io(path, "open", e))?;
        // A complete stream is kept as it is: nothing more is written to it.
        let keep = if scan.complete {
            Ok(())
        } else {
            file.set_len(scan.valid_bytes)
        };
        keep.and_then(|()| file.seek(SeekFrom::End(0)).map(|_| ()))
            .map_err(|e| undo_io(path, "open", e))?;
        let writer = StreamWriter::continue_after(
            BufWriter::with_capacity(1 << 20, file),
            scan.hasher,
            scan.records,
            scan.valid_bytes,
        );
        let old_size = scan.header.virtual_size;
        Ok(UndoWriter {
            path: path.to_path_buf(),
            writer,
            header: scan.header,
            saved_upto: scan.saved_upto,
            old_size,
            complete: scan.complete,
        })
    }

    /// Saves the current contents of `[offset, offset+len)` of the replica (read through
    /// `replica`), except what an earlier call or run already saved.
    pub fn save(&mut self, replica: &RawImage, offset: u64, len: u64) -> Result<(), ReceiveError> {
        if self.complete {
            return Ok(());
        }
        let start = offset.max(self.saved_upto);
        let end = (offset + len).min(self.old_size).min(replica.size());
        let mut pos = start;
        while pos < end {
            let (alloc, n) = replica
                .status(pos, end - pos)
                .map_err(ReceiveError::ReadReplica)?;
            let n = n.clamp(1, end - pos);
            match alloc {
                Allocation::Hole => self.writer.discard(pos, n)?,
                Allocation::Zero => self.writer.zero(pos, n)?,
                Allocation::Data => self.save_data(replica, pos, n)?,
            }
            pos += n;
        }
        self.saved_upto = self.saved_upto.max(offset + len);
        Ok(())
    }

    fn save_data(&mut self, replica: &RawImage, offset: u64, len: u64) -> Result<(), ReceiveError> {
        let mut buf = Vec::new();
        let mut pos = offset;
        while pos < offset + len {
            let n = (CHUNK_BYTES - pos % CHUNK_BYTES).min(offset + len - pos);
            buf.resize(n as usize, 0);
            replica
                .read_at(&mut buf, pos)
                .map_err(ReceiveError::ReadReplica)?;
            if buf.iter().all(|&b| b == 0) {
                self.writer.zero(pos, n)?;
            } else {
                self.writer.data(&encode_chunk(pos, &buf, 3)?)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Makes everything saved so far durable, behind a checkpoint record (so applying the undo
    /// stream checkpoints its progress too).
    pub fn sync(&mut self) -> Result<(), ReceiveError> {
        if self.complete {
            return Ok(());
        }
        self.writer.checkpoint()?;
        let file = self.writer.flush_inner()?.get_ref();
        file.sync_data()
            .map_err(|e| undo_io(&self.path, "write", e))
    }

    /// Closes the undo stream: the replica now holds the forward transition's `to`.
    pub fn finish(mut self) -> Result<(), ReceiveError> {
        if self.complete {
            return Ok(());
        }
        let t = &self.header.transitions[0];
        self.writer.snapshot_end(&SnapshotEnd {
            transition: 0,
            name: t.to.name.clone(),
            guid: t.to.guid,
            virtual_size: t.virtual_size,
            digest: None,
            prefix_hash: [0; 32],
        })?;
        let file = self.writer.finish()?;
        let file = file
            .into_inner()
            .map_err(|e| undo_io(&self.path, "write", e.into_error()))?;
        file.sync_all().map_err(|e| undo_io(&self.path, "write", e))
    }
}

/// What an interrupted undo stream holds.
struct Scan {
    header: StreamHeader,
    records: u64,
    valid_bytes: u64,
    saved_upto: u64,
    /// Ranges saved (data, zero and discard records).
    ranges: u64,
    /// The stream ends with its snapshot-end and a verified end record.
    complete: bool,
    /// The running stream hash of the first `valid_bytes` bytes.
    hasher: blake3::Hasher,
}

/// Reads an undo stream up to its first incomplete record. A snapshot-end without a verified
/// end record after it (an apply killed while closing the stream) is left out: closing it
/// writes both again.
fn scan(path: &Path) -> Result<Scan, ReceiveError> {
    let file = File::open(path).map_err(|e| undo_io(path, "open", e))?;
    let mut reader = StreamReader::new(std::io::BufReader::new(file))
        .map_err(|e| undo_err(path, format!("not an undo stream: {e}")))?;
    let header = reader.header().clone();
    let mut scan = Scan {
        header,
        records: 1,
        valid_bytes: reader.position(),
        saved_upto: 0,
        ranges: 0,
        complete: false,
        hasher: reader.stream_hasher(),
    };
    let mut ended = false;
    loop {
        match reader.next_record() {
            Ok(Some(Record::Data(d))) if !ended && d.plain(reader.record_position()).is_ok() => {
                scan.saved_upto = d.offset + u64::from(d.len);
                scan.ranges += 1;
            }
            Ok(Some(Record::Zero { offset, len } | Record::Discard { offset, len })) if !ended => {
                scan.saved_upto = offset + len;
                scan.ranges += 1;
            }
            Ok(Some(Record::Checkpoint(_))) if !ended => {}
            // An info belongs to the snapshot-end after it, and is left out with it (this
            // receiver's undo streams carry none).
            Ok(Some(Record::SnapshotInfo(_))) if !ended => continue,
            Ok(Some(Record::SnapshotEnd(_))) if !ended => {
                ended = true;
                continue;
            }
            Ok(Some(Record::End(_))) if ended => {
                scan.complete = true;
                return Ok(scan);
            }
            _ => return Ok(scan),
        }
        scan.records += 1;
        scan.valid_bytes = reader.position();
        scan.hasher = reader.stream_hasher();
    }
}

/// Whether `path` is an undo stream of `forward` (the transition it would undo) in which
/// nothing was saved: what an apply killed right after creating it leaves.
pub fn is_unused(path: &Path, forward: &Transition) -> bool {
    let Ok(scan) = scan(path) else {
        return false;
    };
    let t = &scan.header.transitions[0];
    scan.ranges == 0
        && !scan.complete
        && t.from.as_ref() == Some(&forward.to)
        && Some(&t.to) == forward.from.as_ref()
}
