//! The kept block hashes as the rest of blkdelta uses them: opened (or started) for an apply,
//! trusted or not for `checksum`, compared with the disk by `verify`, and checked against a
//! repair stream's base before it applies.
//!
//! Kept hashes stand for the replica's content only when every one of these holds: no apply is
//! in progress, the replica is the file or device its state describes and unchanged since
//! blkdelta last wrote it, and the hashes give the digest the state recorded when the replica
//! reached its snapshot. Anything else is read from the disk.

use std::path::{Path, PathBuf};

use blkdelta_common::digest::{to_hex, BLOCK_BYTES};
use blkdelta_common::image::raw::RawImage;
use std::os::unix::fs::FileTypeExt;

use blkdelta_common::image::qcow2::{Layer, Qcow2Image};
use blkdelta_common::image::{probe_format, BlockSource, Format, OpenOptions};
use blkdelta_common::stream::{SnapRef, StreamHeader};
use blkdelta_common::ImageError;

use crate::hashes::{hashes_path, KeptHashes};
use crate::plan::{Plan, TargetProbe};
use crate::state::{default_state_path, Health, ReplicaState};
use crate::ReceiveError;

#[cfg(test)]
mod tests;

/// A replica as `checksum` and `verify` see it: its state, how it compares with it, and its
/// kept hashes if they stand for its content.
pub struct Replica {
    /// The replica's path.
    pub path: PathBuf,
    /// Where its state lives.
    pub state_path: PathBuf,
    /// Its state.
    pub state: ReplicaState,
    /// How the replica compares with its state.
    pub health: Health,
    /// The kept hashes, when they stand for the replica's content; else why not.
    pub kept: Result<KeptHashes, String>,
}

impl Replica {
    /// The replica at `path` (state at `state_path`, or where it lives by default), `None` when
    /// there is no state: then it is no replica, just a file or device.
    pub fn open(path: &Path, state_path: Option<&Path>) -> Result<Option<Self>, ReceiveError> {
        let is_dev = TargetProbe::of(path)?.is_block_device;
        let state_path = state_path
            .map(Path::to_path_buf)
            .unwrap_or_else(|| default_state_path(path, is_dev));
        let (st, probe) = crate::history::load_state(path, &state_path)?;
        let Some(st) = st else {
            return Ok(None);
        };
        let health = st.health(probe.identity.as_ref());
        let kept = trusted(&state_path, &st, &health);
        Ok(Some(Replica {
            path: path.to_path_buf(),
            state_path,
            state: st,
            health,
            kept,
        }))
    }

    /// A reader of the replica's content (its virtual size, not the whole device; the active
    /// layer of a qcow2 replica), taking QEMU's image locks as `options` say.
    pub fn reader(&self, options: &OpenOptions) -> Result<Box<dyn BlockSource>, ImageError> {
        if !self
            .path
            .metadata()
            .is_ok_and(|m| m.file_type().is_block_device())
            && probe_format(&self.path)? == Format::Qcow2
        {
            let image = Qcow2Image::open_with(&self.path, options)?;
            return Ok(Box::new(image.layer(Layer::Active)?));
        }
        let mut raw = RawImage::open_with(&self.path, options)?;
        if raw.is_block_device() {
            raw.limit_size(self.state.virtual_size);
        }
        Ok(Box::new(raw))
    }
}

/// The kept hashes of a replica in state `st`, if they stand for its content (see the module
/// docs); else why not, in a few words.
pub fn trusted(
    state_path: &Path,
    st: &ReplicaState,
    health: &Health,
) -> Result<KeptHashes, String> {
    if st.in_progress.is_some() {
        return Err("an apply is in progress".into());
    }
    match health {
        Health::Unchanged => {}
        Health::Missing => return Err("the replica is missing".into()),
        Health::Changed(what) => {
            return Err(format!(
                "the replica changed since blkdelta last wrote it: {what}"
            ))
        }
    }
    intact(state_path, st)
}

/// The digest the state recorded for the replica's kept hashes: what [`intact`] hashes give,
/// so a caller that has them need not fold them again.
pub fn recorded_digest(st: &ReplicaState) -> Option<[u8; 32]> {
    blkdelta_common::hex::from_hex(st.digest.as_deref()?)
}

/// The kept hashes of the replica in state `st` if they are what blkdelta last left there
/// (they give the digest the state recorded), whatever the replica holds now.
pub fn intact(state_path: &Path, st: &ReplicaState) -> Result<KeptHashes, String> {
    let Some(recorded) = &st.digest else {
        return Err("no block hashes are kept for it".into());
    };
    let kept = KeptHashes::open_read_only(&hashes_path(state_path)).map_err(|e| e.to_string())?;
    let digest = kept.digest().map_err(|e| e.to_string())?;
    if !to_hex(&digest).eq_ignore_ascii_case(recorded) || kept.size() != st.virtual_size {
        return Err("its kept block hashes do not match its state".into());
    }
    Ok(kept)
}

/// The kept hashes an apply updates as it writes: the replica's own when they are intact (or
/// part way through the apply this one finishes); new ones when the stream writes every range
/// of an empty or overwritten target; none otherwise (an incremental onto a replica whose
/// hashes were never kept, or are damaged: its content is not known without reading it all).
pub(crate) fn for_apply(
    header: &StreamHeader,
    plan: &Plan,
    state_path: &Path,
    target_size: u64,
) -> Result<Option<KeptHashes>, ReceiveError> {
    let path = hashes_path(state_path);
    if let Some(st) = &plan.prior {
        // Part way through an apply, the hashes are as far as the replica is durable: for
        // the apply that finishes it, on that replica (not a new seed or another stream).
        let finishing = plan.finishes(header).is_some() && path.exists();
        // A replica changed behind blkdelta's back (applied to with --overwrite) is not what
        // its hashes say, and will not be after the stream either.
        let unchanged = plan.health == Some(Health::Unchanged);
        let intact = unchanged && intact(state_path, st).is_ok();
        if finishing {
            // Killed between resizing the target and its hashes, the two differ: the
            // target's size is what it holds.
            let mut kept = KeptHashes::open(&path)?;
            kept.set_size(target_size)?;
            return Ok(Some(kept));
        }
        if intact && (plan.first > 0 || !header.is_full()) {
            return KeptHashes::open(&path).map(Some);
        }
    }
    let whole = header.is_full() && plan.first == 0 && header.resume_offset == 0;
    if plan.fresh || whole {
        return KeptHashes::create(&path, target_size).map(Some);
    }
    // Nobody may take stale hashes for the replica's content.
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(None),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(ReceiveError::State {
            path,
            reason: format!("cannot remove stale block hashes: {e}"),
        }),
    }
}

/// Before a repair stream applies: the replica's content must be the one the block list
/// described (the stream's base GUID is the first 16 bytes of that content's digest). Uses
/// the kept hashes when they stand for the content, else reads the replica whole and keeps
/// what it read. Returns the kept hashes the repair updates.
pub(crate) fn for_repair(
    header: &StreamHeader,
    plan: &Plan,
    state_path: &Path,
    disk: &dyn BlockSource,
    threads: usize,
) -> Result<KeptHashes, ReceiveError> {
    let base = header.transitions[0]
        .from
        .as_ref()
        .expect("a repair stream has a base");
    // The kept hashes are a shortcut: when they do not give the list's digest, the replica
    // is read before the repair is refused (a device written behind blkdelta's back keeps
    // its identity). Trusted hashes give the digest the state recorded.
    let known = plan
        .prior
        .as_ref()
        .zip(plan.health.as_ref())
        .and_then(|(st, health)| {
            Some((trusted(state_path, st, health).ok()?, recorded_digest(st)?))
        })
        .filter(|(_, d)| d[..16] == base.guid);
    let (kept, digest) = match known {
        Some((k, d)) => (KeptHashes::open(k.path())?, d),
        None => {
            // Read into a file of its own: a refused repair leaves the kept hashes as they
            // were, for `verify` to say what differs.
            let path = hashes_path(state_path);
            let mut name = path.clone().into_os_string();
            name.push(".read");
            let read = PathBuf::from(name);
            let mut k = KeptHashes::create(&read, disk.size())?;
            k.rebuild(disk, threads)?;
            k.sync()?;
            let d = k.digest()?;
            if d[..16] != base.guid {
                let _ = std::fs::remove_file(&read);
                let _ = std::fs::remove_file(crate::hashes::pieces_path(&read));
                return Err(not_the_base(&d, base));
            }
            k.rename_to(&path)?;
            (KeptHashes::open(&path)?, d)
        }
    };
    if digest[..16] != base.guid {
        return Err(not_the_base(&digest, base));
    }
    Ok(kept)
}

/// The refusal of a repair stream whose base is not the replica's content.
fn not_the_base(digest: &[u8; 32], base: &SnapRef) -> ReceiveError {
    ReceiveError::refused_outright(format!(
        "the replica's content (digest {}) is not the one the repair stream's block list \
         describes ({}...): it changed since 'blkdelta checksum --blocks' read it; make the \
         block list again",
        &to_hex(digest)[..16],
        &to_hex(&base.guid)[..16]
    ))
}

/// A run of whole blocks whose content differs from the kept hashes: byte offset and length
/// (the last one clipped to the virtual size).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// First byte.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// What `verify` found.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VerifySummary {
    /// Blocks compared.
    pub blocks: u64,
    /// Blocks whose content differs from the kept hashes.
    pub differing: u64,
}

/// Reads `disk` whole and compares every block with `kept`, calling `each` for every run of
/// differing blocks, in order. A disk of another size than the hashes differs in its tail.
pub fn verify(
    kept: &KeptHashes,
    disk: &dyn BlockSource,
    threads: usize,
    each: &mut dyn FnMut(Mismatch),
) -> Result<VerifySummary, ReceiveError> {
    let size = kept.size();
    let mut runs = Runs {
        run: None,
        each,
        size: size.max(disk.size()),
    };
    let mut summary = VerifySummary::default();
    let mut expected: Vec<[u8; 32]> = Vec::new();
    let mut first = 0u64;
    let mut failed = None;
    let common = disk.size().min(size);
    let clipped = Clipped {
        inner: disk,
        size: common,
    };
    let walked = blkdelta_common::digest::block_hashes(&clipped, threads, &mut |i, hash| {
        if i < first || i >= first + expected.len() as u64 {
            first = i;
            expected = match kept.entries(i, VERIFY_BATCH_BLOCKS) {
                Ok(e) => e,
                Err(e) => {
                    failed = Some(e);
                    return Err(blkdelta_common::ImageError::Cancelled);
                }
            };
        }
        summary.blocks += 1;
        // The last common block is short when the sizes differ: it differs unless both end
        // there.
        let whole = (i + 1) * BLOCK_BYTES <= common || common == size;
        if whole && expected[(i - first) as usize] == *hash {
            runs.end();
        } else {
            summary.differing += 1;
            runs.add(i * BLOCK_BYTES);
        }
        Ok(())
    });
    if let Some(e) = failed {
        return Err(e);
    }
    walked.map_err(|e| ReceiveError::Failed(format!("reading the replica: {e}")))?;
    // Blocks past the end of the shorter of the two.
    let mut at = common.div_ceil(BLOCK_BYTES) * BLOCK_BYTES;
    while at < size.max(disk.size()) {
        summary.blocks += 1;
        summary.differing += 1;
        runs.add(at);
        at += BLOCK_BYTES;
    }
    runs.end();
    Ok(summary)
}

/// Kept hashes compared per batch of blocks.
const VERIFY_BATCH_BLOCKS: u64 = 32 * 1024;

/// Runs of differing blocks, merged as they come.
struct Runs<'a> {
    run: Option<Mismatch>,
    each: &'a mut dyn FnMut(Mismatch),
    size: u64,
}

impl Runs<'_> {
    fn add(&mut self, offset: u64) {
        let len = BLOCK_BYTES.min(self.size - offset);
        match &mut self.run {
            Some(r) if r.offset + r.len == offset => r.len += len,
            _ => {
                self.end();
                self.run = Some(Mismatch { offset, len });
            }
        }
    }

    fn end(&mut self) {
        if let Some(r) = self.run.take() {
            (self.each)(r);
        }
    }
}

/// A disk seen only up to `size` bytes.
struct Clipped<'a> {
    inner: &'a dyn BlockSource,
    size: u64,
}

impl BlockSource for Clipped<'_> {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), blkdelta_common::ImageError> {
        self.inner.read_at(buf, offset)
    }

    fn status(
        &self,
        offset: u64,
        len: u64,
    ) -> Result<(blkdelta_common::image::Allocation, u64), blkdelta_common::ImageError> {
        self.inner
            .status(offset, len.min(self.size.saturating_sub(offset)))
    }
}
