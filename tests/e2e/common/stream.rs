//! Where a stream's records lie, read with the library's own reader
//! ([`blkdelta_common::stream::StreamReader`]), which checks the stream as it goes.

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use blkdelta_common::stream::{Compression, Record, StreamHeader, StreamReader};

/// One record after the header: its type (as `dump` names it) and where its frame starts and
/// ends in the stream.
#[derive(Debug, Clone)]
pub struct Rec {
    pub kind: &'static str,
    pub at: u64,
    pub end: u64,
    /// The disk range `(offset, len)` of a data, zero or discard record.
    pub range: Option<(u64, u64)>,
    /// How a data record's payload is stored, and its length.
    pub payload: Option<(Compression, u64)>,
    /// The GUID of the state a snapshot-end record reaches.
    pub guid: Option<[u8; 16]>,
}

impl Rec {
    fn new(r: &Record, at: u64, end: u64) -> Rec {
        let mut rec = Rec {
            kind: kind_of(r),
            at,
            end,
            range: None,
            payload: None,
            guid: None,
        };
        match r {
            Record::Data(d) => {
                rec.range = Some((d.offset, u64::from(d.len)));
                rec.payload = Some((d.compression, d.payload.len() as u64));
            }
            Record::Zero { offset, len } | Record::Discard { offset, len } => {
                rec.range = Some((*offset, *len));
            }
            Record::SnapshotEnd(e) => rec.guid = Some(e.guid),
            Record::Checkpoint(_) | Record::SnapshotInfo(_) | Record::End(_) => {}
        }
        rec
    }

    /// A data, zero or discard record.
    pub fn is_change(&self) -> bool {
        self.range.is_some()
    }

    /// The disk range of a change record.
    pub fn disk_range(&self) -> (u64, u64) {
        self.range
            .unwrap_or_else(|| panic!("the {} record at {} has no range", self.kind, self.at))
    }
}

fn kind_of(r: &Record) -> &'static str {
    match r {
        Record::Data(_) => "data",
        Record::Zero { .. } => "zero",
        Record::Discard { .. } => "discard",
        Record::Checkpoint(_) => "checkpoint",
        Record::SnapshotInfo(_) => "snapshot-info",
        Record::SnapshotEnd(_) => "snapshot-end",
        Record::End(_) => "end",
    }
}

/// The header and every record of a stream file, in order.
pub fn records(stream: &Path) -> (StreamHeader, Vec<Rec>) {
    let file = BufReader::new(File::open(stream).unwrap());
    let mut reader = StreamReader::new(file).unwrap_or_else(|e| panic!("{stream:?}: {e}"));
    let header = reader.header().clone();
    let mut recs = Vec::new();
    while let Some(r) = reader
        .next_record()
        .unwrap_or_else(|e| panic!("{stream:?}: {e}"))
    {
        recs.push(Rec::new(&r, reader.record_position(), reader.position()));
    }
    (header, recs)
}

/// The stream positions of the records of type `kind`.
pub fn records_of(stream: &Path, kind: &str) -> Vec<usize> {
    records(stream)
        .1
        .iter()
        .filter(|r| r.kind == kind)
        .map(|r| r.at as usize)
        .collect()
}

/// The stream position of record `n` of type `kind`.
pub fn record_at(stream: &Path, kind: &str, n: usize) -> usize {
    records_of(stream, kind)
        .get(n)
        .copied()
        .unwrap_or_else(|| panic!("no {kind} record #{n} in {stream:?}"))
}
