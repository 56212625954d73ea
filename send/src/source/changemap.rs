//! Change maps: a device's changed ranges listed by a tool that knows them (thin_delta for LVM
//! thin snapshots, era_invalidate for dm-era, or any program writing `OFFSET LENGTH` lines),
//! sent as what the device holds there now.
//!
//! A listed range is sent by the device's allocation status (data, or a discard over a hole);
//! thin_delta's `left_only` ranges (unmapped since) are discards. The map is read and checked
//! in full before anything is sent (see [`parse`] for the formats), so a malformed map or one
//! that does not fit the device stops the send with the offending line.

mod collect;
mod map;
mod parse;
mod xml;

pub use map::{ChangeMap, MapError, MapFormat, MapKind, MapOptions, MapRange};
pub use parse::{MAX_DEPTH, MAX_LINE_BYTES};
pub use xml::MAX_TAG_BYTES;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;
use std::sync::Arc;

use blkdelta_common::extent::{Coalescer, Extent, ExtentKind, ExtentSink, Visit};
use blkdelta_common::image::BlockSource;
use blkdelta_common::stream::{SourceInfo, Transition};

use super::util::{file_name, open_image, push_status, stop_if_told};
use super::{identity, ChangeSource, SourceOptions};
use crate::SendError;

/// Opens `source` to send the ranges `map` lists.
pub fn open(
    map: &Path,
    source: &Path,
    opts: &SourceOptions,
) -> Result<Box<dyn ChangeSource>, SendError> {
    if let Some(bytes) = opts.era_block_bytes {
        check_era_block(bytes)?;
    }
    let (src, kind) = open_image(source, &opts.open)?;
    let parsed = read_map(map, src.size(), opts.era_block_bytes)?;
    if opts.era_block_bytes.is_some() && parsed.format != MapFormat::EraInvalidate {
        return Err(SendError::Usage(format!(
            "--era-block-size applies to era_invalidate maps; {} is a {} map",
            map.display(),
            match parsed.format {
                MapFormat::ThinDelta => "thin_delta",
                _ => "plain OFFSET LENGTH",
            }
        )));
    }
    let name = file_name(source);
    let from = opts.from_name.clone().unwrap_or_else(|| name.clone());
    let to = opts.to_name.clone().unwrap_or_else(|| name.clone());
    let info = SourceInfo {
        kind: kind.into(),
        name,
    };
    let transition = Transition {
        from: Some(identity::named(&from)),
        to: identity::state_of(&to, &[source, map]),
        virtual_size: src.size(),
    };
    Ok(Box::new(ChangeMapSource::new(
        src,
        parsed.ranges,
        info,
        transition,
    )))
}

/// dm-era blocks are whole sectors; a small number is most likely a count of sectors.
fn check_era_block(bytes: u64) -> Result<(), SendError> {
    if bytes == 0 || bytes % 512 != 0 {
        return Err(SendError::Usage(format!(
            "--era-block-size {bytes}: give the era block size in bytes, a non-zero multiple \
             of 512 (dm-era's block size is in sectors: multiply it by 512)"
        )));
    }
    Ok(())
}

/// Reads and checks the map at `path` for a device of `device_bytes`.
pub fn read_map(
    path: &Path,
    device_bytes: u64,
    era_block_bytes: Option<u64>,
) -> Result<ChangeMap, SendError> {
    let shown = path.display();
    let file = File::open(path)
        .map_err(|e| SendError::Source(format!("cannot open change map {shown}: {e}")))?;
    let opts = MapOptions {
        device_bytes,
        era_block_bytes,
    };
    parse::parse(BufReader::with_capacity(1 << 16, file), &opts).map_err(|e| match e {
        MapError::Read(e) => SendError::Source(format!("cannot read change map {shown}: {e}")),
        MapError::Usage(m) => SendError::Usage(format!("{shown}: {m}")),
        invalid @ MapError::Invalid { .. } => SendError::Source(format!("{shown}: {invalid}")),
    })
}

/// The parser itself, on a map held in memory: the entry point of the `change_map` fuzz
/// target (`fuzz/fuzz_targets/change_map.rs`), not an API to build on.
#[doc(hidden)]
pub fn fuzz_parse(map: &[u8], opts: &MapOptions) -> Result<ChangeMap, MapError> {
    parse::parse(map, opts)
}

/// The ranges a change map lists, read from the device they describe.
pub struct ChangeMapSource {
    src: Arc<dyn BlockSource>,
    ranges: Vec<MapRange>,
    info: SourceInfo,
    transitions: Vec<Transition>,
}

impl ChangeMapSource {
    /// Sends `ranges` (sorted, non-overlapping, within `src`) of `src` as `transition`.
    pub fn new(
        src: Arc<dyn BlockSource>,
        ranges: Vec<MapRange>,
        info: SourceInfo,
        transition: Transition,
    ) -> Self {
        ChangeMapSource {
            src,
            ranges,
            info,
            transitions: vec![transition],
        }
    }
}

impl ChangeMapSource {
    /// Pushes each listed range, a changed one as the device holds it, until told to stop.
    fn push_ranges(&self, out: &mut dyn ExtentSink) -> Result<Visit, SendError> {
        for r in &self.ranges {
            match r.kind {
                MapKind::Changed => {
                    stop_if_told!(push_status(self.src.as_ref(), r.offset, r.end(), out))
                }
                MapKind::Discarded => {
                    stop_if_told!(out.push(Extent::new(r.offset, r.len, ExtentKind::Discard)))
                }
            }
        }
        Ok(Visit::Continue)
    }
}

impl ChangeSource for ChangeMapSource {
    fn info(&self) -> SourceInfo {
        self.info.clone()
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    fn changes(&self, _index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        let mut out = Coalescer::new(sink);
        let _ = self.push_ranges(&mut out)?;
        out.finish()?;
        Ok(())
    }

    fn reader(&self, _index: usize) -> Arc<dyn BlockSource> {
        Arc::clone(&self.src)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blkdelta_common::image::mem::MemImage;

    const KIB: u64 = 1 << 10;

    #[test]
    fn changed_ranges_follow_the_device_and_left_only_discards() {
        let mut img = MemImage::new(1 << 20, 4 * KIB);
        img.write(0, &[1; 8192]);
        let ranges = vec![
            MapRange {
                offset: 4 * KIB,
                len: 12 * KIB,
                kind: MapKind::Changed,
            },
            MapRange {
                offset: 16 * KIB,
                len: 4 * KIB,
                kind: MapKind::Discarded,
            },
            MapRange {
                offset: 64 * KIB,
                len: 4 * KIB,
                kind: MapKind::Changed,
            },
        ];
        let t = Transition {
            from: Some(identity::named("a")),
            to: identity::named("b"),
            virtual_size: img.size(),
        };
        let info = SourceInfo {
            kind: "raw".into(),
            name: "dev".into(),
        };
        let src = ChangeMapSource::new(Arc::new(img), ranges, info, t);
        let mut got = Vec::new();
        src.changes(0, &mut got).unwrap();
        assert_eq!(
            got,
            vec![
                Extent::new(4 * KIB, 4 * KIB, ExtentKind::Data),
                Extent::new(8 * KIB, 12 * KIB, ExtentKind::Discard),
                Extent::new(64 * KIB, 4 * KIB, ExtentKind::Discard),
            ]
        );
    }

    #[test]
    fn era_block_sizes_must_be_whole_sectors() {
        assert!(check_era_block(65536).is_ok());
        for bad in [0, 128, 1000] {
            assert!(matches!(check_era_block(bad), Err(SendError::Usage(_))));
        }
    }
}
