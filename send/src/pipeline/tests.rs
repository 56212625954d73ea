//! The pipeline against in-memory sources: round trips, and every failure ends in an error,
//! never a hang.

use std::io::{self, Write};
use std::sync::Arc;

use blkdelta_common::extent::{Extent, ExtentSink, Visit};
use blkdelta_common::image::mem::MemImage;
use blkdelta_common::image::qcow2::Snapshot;
use blkdelta_common::image::{Allocation, BlockSource};
use blkdelta_common::stream::{
    Record, ResumeToken, SnapRef, SnapshotInfo, SourceInfo, StreamReader, Transition,
};
use blkdelta_common::ImageError;

use super::{send, SendOptions};
use crate::source::{FullSource, Resumed};
use crate::{ChangeSource, NoProgress, SendError};

fn full(src: Arc<dyn BlockSource>) -> FullSource {
    let info = SourceInfo {
        kind: "mem".into(),
        name: "mem".into(),
    };
    let to = SnapRef {
        name: "now".into(),
        guid: [7; 16],
    };
    FullSource::new(src, info, to)
}

fn image() -> MemImage {
    let mut img = MemImage::new(5 << 20, 64 << 10);
    let noise: Vec<u8> = (0..(3 << 20) as u32)
        .map(|i| (i * 7 + i / 4093) as u8)
        .collect();
    img.write(100_000, &noise);
    img.write(4 << 20, &[0u8; 70_000]);
    img
}

/// Rebuilds the disk a stream describes.
fn replay(stream: &[u8]) -> Vec<u8> {
    let mut r = StreamReader::new(stream).unwrap();
    let mut disk = vec![0u8; r.header().virtual_size as usize];
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Data(d) = rec {
            let plain = d.plain(0).unwrap();
            disk[d.offset as usize..][..plain.len()].copy_from_slice(&plain);
        }
    }
    disk
}

#[test]
fn full_stream_round_trips_with_any_thread_count_and_level() {
    let img = Arc::new(image());
    for (threads, level) in [(1, 0), (2, 3), (7, 1)] {
        let src = full(img.clone());
        let opts = SendOptions { level, threads };
        let mut out = Vec::new();
        let summary = send(&src, &opts, &mut out, &NoProgress).unwrap();
        assert_eq!(summary.stream_bytes, out.len() as u64);
        assert_eq!(replay(&out), img.bytes());
        // The all-zero allocated chunk became zero records, not data.
        assert!(summary.data_bytes < 4 << 20, "{summary:?}");
    }
}

#[test]
fn a_read_error_ends_the_send_with_that_error() {
    let img = image();
    img.fail_reads_at(2 << 20);
    let src = full(Arc::new(img));
    let err = send(&src, &SendOptions::default(), io::sink(), &NoProgress).unwrap_err();
    let source = std::error::Error::source(&err).map(ToString::to_string);
    assert!(err.to_string().starts_with("read of"), "{err}");
    assert_eq!(source.as_deref(), Some("injected fault"));
}

/// A sink that fails after some bytes, like a pipe whose reader went away.
struct BrokenPipe(usize);

impl Write for BrokenPipe {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0 < buf.len() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        self.0 -= buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_failing_writer_ends_the_send_with_that_error() {
    let src = full(Arc::new(image()));
    for threads in [1, 3] {
        let opts = SendOptions { level: 0, threads };
        let err = send(&src, &opts, BrokenPipe(300_000), &NoProgress).unwrap_err();
        assert!(
            err.to_string().contains("writing the stream failed"),
            "{err}"
        );
    }
}

/// A source whose reads panic: a reader bug must become an error, not a hang.
struct Panicky;

impl BlockSource for Panicky {
    fn size(&self) -> u64 {
        8 << 20
    }
    fn read_at(&self, _: &mut [u8], _: u64) -> Result<(), ImageError> {
        panic!("reader bug");
    }
    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        Ok((Allocation::Data, max_len.min(self.size() - offset)))
    }
}

#[test]
fn a_panicking_reader_ends_the_send_with_an_error() {
    for threads in [1, 4] {
        let src = full(Arc::new(Panicky));
        let opts = SendOptions { level: 0, threads };
        let err = send(&src, &opts, io::sink(), &NoProgress).unwrap_err();
        assert!(err.to_string().contains("failed unexpectedly"), "{err}");
    }
}

/// A source whose change walk fails half way.
struct FailingWalk(FullSource);

impl ChangeSource for FailingWalk {
    fn info(&self) -> SourceInfo {
        self.0.info()
    }
    fn transitions(&self) -> &[Transition] {
        self.0.transitions()
    }
    fn changes(&self, _: usize, _: &mut dyn ExtentSink) -> Result<(), SendError> {
        Err(SendError::Source("walk failed".into()))
    }
    fn reader(&self, index: usize) -> Arc<dyn BlockSource> {
        self.0.reader(index)
    }
}

#[test]
fn a_failing_change_walk_is_reported() {
    let src = FailingWalk(full(Arc::new(image())));
    let err = send(&src, &SendOptions::default(), io::sink(), &NoProgress).unwrap_err();
    assert_eq!(err.to_string(), "walk failed");
}

/// A source that counts how often its changes are found.
struct Counted(FullSource, std::sync::atomic::AtomicUsize);

impl ChangeSource for Counted {
    fn info(&self) -> SourceInfo {
        self.0.info()
    }
    fn transitions(&self) -> &[Transition] {
        self.0.transitions()
    }
    fn changes(&self, index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.0.changes(index, sink)
    }
    fn reader(&self, index: usize) -> Arc<dyn BlockSource> {
        self.0.reader(index)
    }
}

#[test]
fn the_changes_are_found_once_for_totals_and_records() {
    let img = image();
    let want = img.bytes().to_vec();
    let src = Counted(full(Arc::new(img)), Default::default());
    let mut out = Vec::new();
    send(&src, &SendOptions::default(), &mut out, &NoProgress).unwrap();
    assert_eq!(src.1.load(std::sync::atomic::Ordering::Relaxed), 1);
    assert_eq!(replay(&out), want);
}

/// A sink that stops after `left` extents, recording them.
struct StopAfter {
    left: usize,
    got: Vec<Extent>,
}

impl ExtentSink for StopAfter {
    fn push(&mut self, e: Extent) -> Result<Visit, ImageError> {
        self.got.push(e);
        self.left -= 1;
        Ok(if self.left == 0 {
            Visit::Stop
        } else {
            Visit::Continue
        })
    }
}

#[test]
fn a_source_stops_when_its_sink_says_so() {
    let src = full(Arc::new(image()));
    let mut all = Vec::new();
    src.changes(0, &mut all).unwrap();
    assert!(all.len() > 2, "{all:?}");
    let mut first = StopAfter {
        left: 2,
        got: Vec::new(),
    };
    src.changes(0, &mut first).unwrap();
    assert_eq!(first.got, all[..2]);
}

/// Internal snapshots `s1`, `s2`, … of one image, as a snapshot table lists them.
fn snapshots(n: usize, size: u64) -> Vec<Snapshot> {
    (1..=n)
        .map(|i| Snapshot {
            id: i.to_string(),
            name: format!("s{i}"),
            l1_table_offset: 0x10000 * i as u64,
            l1_size: 1,
            date_sec: 1_700_000_000 + i as u32,
            date_nsec: 1000 * i as u32,
            vm_clock_nsec: 5_000_000_000 * i as u64,
            vm_state_size: 0,
            disk_size: size,
        })
        .collect()
}

/// A source going through `snaps` (the first is the base), whose infos are `info(i)`.
struct Snapshots {
    inner: FullSource,
    transitions: Vec<Transition>,
    info: fn(&[Snapshot], usize) -> Option<SnapshotInfo>,
    snaps: Vec<Snapshot>,
}

impl Snapshots {
    fn new(info: fn(&[Snapshot], usize) -> Option<SnapshotInfo>) -> Self {
        let img = Arc::new(image());
        let snaps = snapshots(3, img.size());
        let as_ref = |s: &Snapshot| SnapRef {
            name: s.name.clone(),
            guid: s.guid(),
        };
        let transitions = snaps
            .windows(2)
            .map(|w| Transition {
                from: Some(as_ref(&w[0])),
                to: as_ref(&w[1]),
                virtual_size: img.size(),
            })
            .collect();
        Snapshots {
            inner: full(img),
            transitions,
            info,
            snaps,
        }
    }
}

impl ChangeSource for Snapshots {
    fn info(&self) -> SourceInfo {
        self.inner.info()
    }
    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }
    fn changes(&self, _: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        self.inner.changes(0, sink)
    }
    fn reader(&self, _: usize) -> Arc<dyn BlockSource> {
        self.inner.reader(0)
    }
    fn snapshot_info(&self, index: usize) -> Option<SnapshotInfo> {
        (self.info)(&self.snaps, index)
    }
}

/// The right info: transition `i` reaches snapshot `i + 1`.
fn right_info(snaps: &[Snapshot], i: usize) -> Option<SnapshotInfo> {
    Some(SnapshotInfo::from_snapshot(i as u32, &snaps[i + 1]))
}

/// The snapshot-info and snapshot-end records of a stream, in order.
fn closing_records(stream: &[u8]) -> Vec<Record> {
    let mut r = StreamReader::new(stream).unwrap();
    let mut out = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        if matches!(rec, Record::SnapshotInfo(_) | Record::SnapshotEnd(_)) {
            out.push(rec);
        }
    }
    out
}

#[test]
fn a_snapshot_info_goes_right_before_each_snapshot_end_it_describes() {
    let src = Snapshots::new(right_info);
    let mut out = Vec::new();
    send(&src, &SendOptions::default(), &mut out, &NoProgress).unwrap();
    let recs = closing_records(&out);
    assert_eq!(recs.len(), 4, "{recs:?}");
    for (i, pair) in recs.chunks(2).enumerate() {
        let (Record::SnapshotInfo(info), Record::SnapshotEnd(end)) = (&pair[0], &pair[1]) else {
            panic!("not an info and its snapshot-end: {pair:?}");
        };
        assert_eq!(
            *info,
            SnapshotInfo::from_snapshot(i as u32, &src.snaps[i + 1])
        );
        assert_eq!(info.guid(), end.guid);
    }
    // Without infos (any source but qcow2 internal snapshots), none is written.
    let src = Snapshots::new(|_, _| None);
    let mut out = Vec::new();
    send(&src, &SendOptions::default(), &mut out, &NoProgress).unwrap();
    assert!(closing_records(&out)
        .iter()
        .all(|r| matches!(r, Record::SnapshotEnd(_))));
}

#[test]
fn an_info_that_does_not_describe_its_transition_fails_the_send() {
    let src = Snapshots::new(|snaps, i| Some(SnapshotInfo::from_snapshot(i as u32, &snaps[i])));
    let err = send(&src, &SendOptions::default(), io::sink(), &NoProgress).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not describe transition 0 to 's2'"),
        "{err}"
    );
}

#[test]
fn a_resumed_send_carries_the_info_renumbered() {
    let src = Snapshots::new(right_info);
    let t = &src.transitions()[1];
    let token = ResumeToken {
        from: t.from.as_ref().map(|f| f.guid),
        to: t.to.guid,
        offset: 1 << 20,
    };
    let resumed = Resumed::new(Box::new(Snapshots::new(right_info)), &token).unwrap();
    let mut out = Vec::new();
    send(&resumed, &SendOptions::default(), &mut out, &NoProgress).unwrap();
    let recs = closing_records(&out);
    let want = SnapshotInfo::from_snapshot(0, &src.snaps[2]);
    assert!(matches!(&recs[..], [Record::SnapshotInfo(i), Record::SnapshotEnd(_)] if *i == want));
}
