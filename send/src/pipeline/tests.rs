//! The pipeline against in-memory sources: round trips, and every failure ends in an error,
//! never a hang.

use std::io::{self, Write};
use std::sync::Arc;

use blkdelta_common::extent::{Extent, ExtentSink, Visit};
use blkdelta_common::image::mem::MemImage;
use blkdelta_common::image::{Allocation, BlockSource};
use blkdelta_common::stream::{Record, SnapRef, SourceInfo, StreamReader, Transition};
use blkdelta_common::ImageError;

use super::{send, SendOptions};
use crate::source::FullSource;
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
