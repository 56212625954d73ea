//! External snapshots: what the overlays above a base changed, from their L1/L2 tables alone.
//!
//! ```text
//! o2.qcow2    . D . . . Z . .      --since base.qcow2 o2.qcow2 sends every range that o2
//! o1.qcow2    . . C . . . D .      or o1 holds itself (D data, Z zeroed, C compressed), as
//! base.qcow2  D D D D D D D D      o2 reads it: data, zeros, or (past a smaller base) holes
//! sent        . D D . . Z D .
//! ```
//!
//! A range that no layer above the base holds reads through to the base, so it is unchanged;
//! a range some layer holds is sent as the top reads it (a layer may have written back what
//! the base has: the stream is then larger than needed, never wrong). Beyond the smallest
//! virtual size below the top (the base's, or a layer's that was shrunk), reads no longer
//! come from the base, so that tail is sent whole.
//!
//! The layers' runs are merged lazily, one cursor per layer, so memory does not depend on the
//! disk size, and each layer's empty L2 ranges are skipped without being read.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use blkdelta_common::extent::{Coalescer, ExtentSink, Visit};
use blkdelta_common::image::qcow2::{Layer, Qcow2Image, Qcow2Layer};
use blkdelta_common::image::raw::RawImage;
use blkdelta_common::image::{probe_format, BlockSource, Format, OpenOptions};
use blkdelta_common::limits::MAX_BACKING_DEPTH;
use blkdelta_common::stream::{SourceInfo, Transition};
use blkdelta_common::ImageError;

use super::identity::named;
use super::util::{file_name, push_status, stop_if_told};
use super::{ChangeSource, SourceOptions};
use crate::SendError;

/// Opens overlay `top` to send what the layers above `base` changed.
pub fn open(
    top: &Path,
    base: &Path,
    opts: &SourceOptions,
) -> Result<Box<dyn ChangeSource>, SendError> {
    Ok(Box::new(BackingChain::open(top, base, opts)?))
}

/// A stream of what the overlays above a base image changed: one transition from the base's
/// state to the top's.
pub struct BackingChain {
    /// The top layer, reading through its whole chain.
    top: Qcow2Layer,
    /// The layers above the base, top first (the first is `top` itself).
    overlays: Vec<Qcow2Layer>,
    /// Below this offset, a range that no overlay holds reads as the base has it.
    shared_bytes: u64,
    name: String,
    transitions: Vec<Transition>,
}

impl BackingChain {
    /// Opens `top` (taking QEMU's reader locks on its whole chain as `opts.open` says),
    /// finds `base` in its backing chain, and names the states: `--from-name` or the base's
    /// file name, `--to-name` or the top's.
    pub fn open(top: &Path, base: &Path, opts: &SourceOptions) -> Result<Self, SendError> {
        if probe_format(top)? != Format::Qcow2 {
            return Err(SendError::Source(format!(
                "{}: --since needs a qcow2 overlay, and this is not a qcow2 image",
                top.display()
            )));
        }
        let base_id = FileId::of(base)
            .map_err(|e| SendError::Source(format!("--since {}: {e}", base.display())))?;
        let image = Qcow2Image::open_with(top, &opts.open)?;
        let top_layer = image.layer(Layer::Active)?;
        if FileId::of(top).ok() == Some(base_id) {
            return Err(SendError::Source(format!(
                "--since {}: BASE is the image itself; name a file of its backing chain",
                base.display()
            )));
        }
        let (overlays, shared_bytes) =
            layers_above(&image, top_layer.clone(), base, base_id, &opts.open)?;
        let from = opts.from_name.clone().unwrap_or_else(|| file_name(base));
        let to = opts.to_name.clone().unwrap_or_else(|| file_name(top));
        let transitions = vec![Transition {
            from: Some(named(&from)),
            to: super::identity::state_of(&to, &[top]),
            virtual_size: top_layer.size(),
        }];
        Ok(BackingChain {
            top: top_layer,
            overlays,
            shared_bytes,
            name: file_name(top),
            transitions,
        })
    }

    /// Pushes the ranges below `limit` that some overlay holds, as the top reads them.
    fn push_held(&self, limit: u64, sink: &mut dyn ExtentSink) -> Result<Visit, SendError> {
        // Start of the run of held ranges not pushed yet: consecutive held runs (of different
        // layers) go to `push_status` together.
        let mut pending: Option<u64> = None;
        stop_if_told!(merge_held(&self.overlays, limit, |start, _end, held| {
            match (held, pending) {
                (true, None) => pending = Some(start),
                (false, Some(from)) => {
                    pending = None;
                    return push_status(&self.top, from, start, sink);
                }
                _ => {}
            }
            Ok(Visit::Continue)
        }));
        match pending {
            Some(from) => push_status(&self.top, from, limit, sink),
            None => Ok(Visit::Continue),
        }
    }
}

impl ChangeSource for BackingChain {
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: "qcow2".into(),
            name: self.name.clone(),
        }
    }

    fn transitions(&self) -> &[Transition] {
        &self.transitions
    }

    fn changes(&self, _index: usize, sink: &mut dyn ExtentSink) -> Result<(), SendError> {
        let mut c = Coalescer::new(sink);
        let end = self.top.size();
        let shared = self.shared_bytes.min(end);
        if !self.push_held(shared, &mut c)?.is_stop() && end > shared {
            let _ = push_status(&self.top, shared, end, &mut c)?;
        }
        c.finish()?;
        Ok(())
    }

    fn reader(&self, _index: usize) -> Arc<dyn BlockSource> {
        Arc::new(self.top.clone())
    }
}

/// A file's identity: the same file whatever the path that names it (relative, through a
/// symlink, or with `..`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    fn of(path: &Path) -> std::io::Result<FileId> {
        let m = std::fs::metadata(path)?;
        Ok(FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Walks the backing chain of `image` (whose active layer is `top`) down to the file
/// `base_id`: returns the layers above it, top first, and the smallest virtual size below
/// the top (the base's included). Refuses a base that is not in the chain, naming its files.
fn layers_above(
    image: &Qcow2Image,
    top: Qcow2Layer,
    base: &Path,
    base_id: FileId,
    options: &OpenOptions,
) -> Result<(Vec<Qcow2Layer>, u64), SendError> {
    let mut chain = vec![image.path().display().to_string()];
    let mut overlays = vec![top];
    let mut image = image.clone();
    let mut shared = u64::MAX;
    while chain.len() <= MAX_BACKING_DEPTH + 1 {
        let Some(path) = image.backing_path() else {
            break;
        };
        chain.push(path.display().to_string());
        let below = match backing_format(&image, &path)? {
            Format::Raw => None,
            Format::Qcow2 => Some(Qcow2Image::open_with(&path, options)?),
        };
        let size = match &below {
            Some(img) => img.virtual_size(),
            None => RawImage::open_with(&path, options)?.size(),
        };
        shared = shared.min(size);
        if FileId::of(&path).ok() == Some(base_id) {
            return Ok((overlays, shared));
        }
        let Some(next) = below else {
            break;
        };
        overlays.push(next.layer(Layer::Active)?);
        image = next;
    }
    Err(SendError::Source(format!(
        "--since {}: not in the backing chain of {} ({})",
        base.display(),
        chain[0],
        chain.join(" -> ")
    )))
}

/// The format of `image`'s backing file at `path`: from the header extension, else probed.
fn backing_format(image: &Qcow2Image, path: &Path) -> Result<Format, SendError> {
    match image.header().backing_format.as_deref() {
        Some("qcow2") => Ok(Format::Qcow2),
        Some("raw") => Ok(Format::Raw),
        Some(other) => Err(ImageError::Unsupported(format!(
            "backing file format '{other}' of {}",
            path.display()
        ))
        .into()),
        None => Ok(probe_format(path)?),
    }
}

/// What a layer holds itself, as runs: whether it holds `offset`, and for how many bytes.
trait HeldRuns {
    fn held_run(&self, offset: u64, max_len: u64) -> Result<(bool, u64), ImageError>;
}

impl HeldRuns for Qcow2Layer {
    fn held_run(&self, offset: u64, max_len: u64) -> Result<(bool, u64), ImageError> {
        let (kind, len) = self.own_status(offset, max_len)?;
        Ok((kind.is_held(), len))
    }
}

/// A layer's current run: whether it holds it, and where it ends.
struct Cursor<'a, L> {
    layer: &'a L,
    held: bool,
    end: u64,
}

/// Calls `visit(start, end, held)` for consecutive runs covering `[0, limit)`, in order:
/// `held` when at least one layer holds the run, until `visit` says stop. Each layer is asked
/// again only when its current run ends, so the work is proportional to the number of runs in
/// all layers.
fn merge_held<L: HeldRuns>(
    layers: &[L],
    limit: u64,
    mut visit: impl FnMut(u64, u64, bool) -> Result<Visit, SendError>,
) -> Result<Visit, SendError> {
    let mut cursors: Vec<Cursor<'_, L>> = layers
        .iter()
        .map(|layer| Cursor {
            layer,
            held: false,
            end: 0,
        })
        .collect();
    let mut pos = 0;
    while pos < limit {
        for c in cursors.iter_mut().filter(|c| c.end <= pos) {
            let (held, len) = c.layer.held_run(pos, limit - pos)?;
            c.held = held;
            c.end = pos + len.clamp(1, limit - pos);
        }
        // A held run ends where the last layer holding it stops; a free one where the first
        // layer changes.
        let held_end = cursors.iter().filter(|c| c.held).map(|c| c.end).max();
        let (held, end) = match held_end {
            Some(end) => (true, end),
            None => (false, cursors.iter().map(|c| c.end).min().unwrap_or(limit)),
        };
        stop_if_told!(visit(pos, end, held));
        pos = end;
    }
    Ok(Visit::Continue)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake layer holding the listed `[start, end)` ranges (sorted, disjoint), answering in
    /// runs of at most `step` bytes to exercise the re-asking.
    struct Ranges {
        held: Vec<(u64, u64)>,
        step: u64,
    }

    impl HeldRuns for Ranges {
        fn held_run(&self, offset: u64, max_len: u64) -> Result<(bool, u64), ImageError> {
            let max_len = max_len.min(self.step);
            for &(s, e) in &self.held {
                if offset < s {
                    return Ok((false, (s - offset).min(max_len)));
                }
                if offset < e {
                    return Ok((true, (e - offset).min(max_len)));
                }
            }
            Ok((false, max_len))
        }
    }

    /// The union as `merge_held` reports it, coalesced into held `[start, end)` ranges.
    fn union(layers: &[Ranges], limit: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut next = 0;
        let _ = merge_held(layers, limit, |start, end, held| {
            assert_eq!(start, next, "runs are consecutive");
            assert!(end > start && end <= limit);
            next = end;
            match out.last_mut() {
                Some(last) if held && last.1 == start => last.1 = end,
                _ if held => out.push((start, end)),
                _ => {}
            }
            Ok(Visit::Continue)
        })
        .unwrap();
        assert_eq!(next, limit);
        out
    }

    #[test]
    fn union_of_overlapping_layers() {
        let top = Ranges {
            held: vec![(10, 20), (50, 60)],
            step: 1000,
        };
        let mid = Ranges {
            held: vec![(15, 30), (40, 45), (59, 70)],
            step: 3,
        };
        assert_eq!(union(&[top, mid], 100), vec![(10, 30), (40, 45), (50, 70)]);
    }

    #[test]
    fn union_matches_a_brute_force_bitmap() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rand = |n: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        };
        for _ in 0..200 {
            let limit = 1 + rand(300);
            let layers: Vec<Ranges> = (0..1 + rand(4))
                .map(|_| {
                    let mut held = Vec::new();
                    let mut at = rand(20);
                    while at < limit + 10 {
                        let len = 1 + rand(25);
                        held.push((at, at + len));
                        at += len + 1 + rand(30);
                    }
                    Ranges {
                        held,
                        step: 1 + rand(40),
                    }
                })
                .collect();
            let mut expected: Vec<(u64, u64)> = Vec::new();
            for b in 0..limit {
                let hit = layers
                    .iter()
                    .any(|l| l.held.iter().any(|&(s, e)| s <= b && b < e));
                match expected.last_mut() {
                    Some(last) if hit && last.1 == b => last.1 = b + 1,
                    _ if hit => expected.push((b, b + 1)),
                    _ => {}
                }
            }
            assert_eq!(union(&layers, limit), expected);
        }
    }

    #[test]
    fn empty_limit_visits_nothing() {
        let layer = Ranges {
            held: vec![(0, 5)],
            step: 1,
        };
        assert!(union(&[layer], 0).is_empty());
    }
}
