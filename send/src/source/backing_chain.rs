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
use std::path::{Path, PathBuf};
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
        let wanted = Wanted::of(base);
        let top_id = FileId::of(top).map_err(|e| open_error(top, e))?;
        if wanted == Wanted::File(top_id) {
            return Err(SendError::Source(format!(
                "--since {}: BASE is the image itself; name a file of its backing chain",
                base.display()
            )));
        }
        let image = Qcow2Image::open_with(top, &opts.open)?;
        let chain = Chain::walk(&image, top_id, base, &wanted, &opts.open)?;
        // Every file is opened by path after its identity was taken: the layers (which open
        // the chain below them) first, then each identity is checked again.
        let top_layer = image.layer(Layer::Active)?;
        let mut overlays = vec![top_layer.clone()];
        for below in chain.above_base() {
            overlays.push(below.layer(Layer::Active)?);
        }
        chain.check_unchanged()?;
        let base_path = chain.base_path();
        let from = opts
            .from_name
            .clone()
            .unwrap_or_else(|| file_name(base_path));
        let to = opts.to_name.clone().unwrap_or_else(|| file_name(top));
        let transitions = vec![Transition {
            from: Some(named(&from)),
            to: super::identity::state_of(&to, &[top]),
            virtual_size: top_layer.size(),
        }];
        Ok(BackingChain {
            top: top_layer,
            overlays,
            shared_bytes: chain.shared_bytes(),
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

fn open_error(path: &Path, e: std::io::Error) -> SendError {
    SendError::Source(format!("cannot open {}: {e}", path.display()))
}

/// The base `--since` names: a file that exists as given, or else a name the chain resolves,
/// as backing file names are resolved (relative to the overlay that names them).
#[derive(Clone, Debug, PartialEq, Eq)]
enum Wanted {
    File(FileId),
    Named(PathBuf),
}

impl Wanted {
    fn of(base: &Path) -> Wanted {
        match FileId::of(base) {
            Ok(id) => Wanted::File(id),
            Err(_) => Wanted::Named(base.to_path_buf()),
        }
    }

    /// Whether the chain's file `id` at `path`, which its overlay names `backing_name`, is
    /// the base: the same file, or (for a name) the overlay's own name for it, or its file
    /// name when BASE is a bare file name.
    fn is(&self, id: FileId, path: &Path, backing_name: &str) -> bool {
        match self {
            Wanted::File(want) => *want == id,
            Wanted::Named(name) => {
                let bare = name.parent().is_none_or(|p| p.as_os_str().is_empty());
                Path::new(backing_name) == name || (bare && path.file_name() == name.file_name())
            }
        }
    }
}

/// One file of a backing chain below the top, as the walk found it.
struct ChainFile {
    path: PathBuf,
    id: FileId,
    /// The image, or `None` for a raw file (which can only be the base).
    image: Option<Qcow2Image>,
    virtual_size: u64,
}

/// The backing chain of an overlay down to the base, each file's identity taken before it was
/// opened.
struct Chain {
    top: (PathBuf, FileId),
    /// The files below the top, the base last.
    files: Vec<ChainFile>,
}

impl Chain {
    /// Walks the backing chain of `image` (the top, whose identity is `top_id`) down to the
    /// file `wanted` names. Refuses a base that is not in the chain, naming its files.
    fn walk(
        image: &Qcow2Image,
        top_id: FileId,
        base: &Path,
        wanted: &Wanted,
        options: &OpenOptions,
    ) -> Result<Chain, SendError> {
        let top = (image.path().to_path_buf(), top_id);
        let mut files = Vec::new();
        let mut image = image.clone();
        while files.len() <= MAX_BACKING_DEPTH {
            let (Some(path), Some(name)) =
                (image.backing_path(), image.header().backing_file.clone())
            else {
                break;
            };
            let id = FileId::of(&path).map_err(|e| open_error(&path, e))?;
            let below = match backing_format(&image, &path)? {
                Format::Raw => None,
                Format::Qcow2 => Some(Qcow2Image::open_with(&path, options)?),
            };
            let virtual_size = match &below {
                Some(img) => img.virtual_size(),
                None => RawImage::open_with(&path, options)?.size(),
            };
            let found = wanted.is(id, &path, &name);
            files.push(ChainFile {
                path,
                id,
                image: below.clone(),
                virtual_size,
            });
            if found {
                return Ok(Chain { top, files });
            }
            let Some(next) = below else {
                break;
            };
            image = next;
        }
        let mut names = vec![top.0.display().to_string()];
        names.extend(files.iter().map(|f| f.path.display().to_string()));
        let top = names[0].clone();
        let why = match wanted {
            Wanted::File(_) => "not in the backing chain of",
            Wanted::Named(_) => "no such file, and no file of the backing chain of",
        };
        let names = names.join(" -> ");
        Err(SendError::Source(match wanted {
            Wanted::File(_) => format!("--since {}: {why} {top} ({names})", base.display()),
            Wanted::Named(_) => format!(
                "--since {}: {why} {top} is called that ({names})",
                base.display()
            ),
        }))
    }

    /// The images between the top and the base, top first.
    fn above_base(&self) -> impl Iterator<Item = &Qcow2Image> {
        let above = &self.files[..self.files.len() - 1];
        above.iter().filter_map(|f| f.image.as_ref())
    }

    /// The smallest virtual size below the top (the base's included).
    fn shared_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.virtual_size).min().unwrap_or(0)
    }

    fn base_path(&self) -> &Path {
        &self.files[self.files.len() - 1].path
    }

    /// Refuses a chain one of whose files was replaced (renamed over, or deleted and made
    /// anew) since its identity was taken: then some open may have found the new file.
    fn check_unchanged(&self) -> Result<(), SendError> {
        let named = std::iter::once((&self.top.0, self.top.1))
            .chain(self.files.iter().map(|f| (&f.path, f.id)));
        for (path, id) in named {
            if FileId::of(path).ok() != Some(id) {
                return Err(SendError::Source(format!(
                    "{}: the file was replaced while its backing chain was opened; try again",
                    path.display()
                )));
            }
        }
        Ok(())
    }
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
    fn a_missing_base_is_found_by_the_chains_name_for_it() {
        let id = FileId { dev: 1, ino: 2 };
        let path = Path::new("/var/lib/libvirt/images/base.qcow2");
        let named = |n: &str| Wanted::Named(n.into());
        assert!(named("base.qcow2").is(id, path, "base.qcow2"));
        assert!(named("base.qcow2").is(id, path, "/var/lib/libvirt/images/base.qcow2"));
        assert!(named("../images/base.qcow2").is(id, path, "../images/base.qcow2"));
        assert!(!named("other/base.qcow2").is(id, path, "base.qcow2"));
        assert!(!named("o1.qcow2").is(id, path, "base.qcow2"));
        assert!(Wanted::File(id).is(id, Path::new("x"), "y"));
    }

    #[test]
    fn a_chain_file_replaced_after_its_identity_was_taken_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (top, base) = (dir.path().join("top"), dir.path().join("base"));
        std::fs::write(&top, b"top").unwrap();
        std::fs::write(&base, b"base").unwrap();
        let file = |path: &Path| ChainFile {
            path: path.to_path_buf(),
            id: FileId::of(path).unwrap(),
            image: None,
            virtual_size: 0,
        };
        let chain = Chain {
            top: (top.clone(), FileId::of(&top).unwrap()),
            files: vec![file(&base)],
        };
        chain.check_unchanged().unwrap();
        let swapped = dir.path().join("swapped");
        std::fs::write(&swapped, b"base").unwrap();
        std::fs::rename(&swapped, &base).unwrap();
        let err = chain.check_unchanged().unwrap_err().to_string();
        assert!(err.contains("replaced"), "{err}");
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
