//! `checksum` of a replica and `verify`: the replica's kept block hashes, and the replica
//! read against them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use blkdelta_common::digest::{image_digest, to_hex};
use blkdelta_receive::kept::{self, Replica};
use blkdelta_receive::state::Health;

use super::{print_out, threads};
use crate::cli::{ChecksumArgs, VerifyArgs};

/// `checksum` of a path that has a replica state: from the kept hashes when they stand for
/// the replica's content (unless `--read`), else read. `None` when `spec` is no replica.
pub fn checksum(a: &ChecksumArgs) -> Result<Option<()>> {
    let path = Path::new(&a.image);
    if !path.exists() {
        return Ok(None);
    }
    let Some(replica) = Replica::open(path, a.state.as_deref())? else {
        return Ok(None);
    };
    let (digest, note) = match (&replica.kept, a.read) {
        (Ok(kept), false) => (
            kept.digest()?,
            "digest from the kept block hashes (--read reads the replica)".to_string(),
        ),
        (kept, _) => {
            let disk = replica
                .reader(&super::share(a.force_share))
                .with_context(|| format!("cannot checksum {}", a.image))?;
            let note = match kept {
                Err(why) if !a.read => {
                    format!("read the replica (its kept block hashes are not used: {why})")
                }
                _ => "read the replica".to_string(),
            };
            (image_digest(&disk, threads(a.threads))?, note)
        }
    };
    eprintln!("note: {note}");
    print_out(|out| {
        writeln!(out, "{}  {}", to_hex(&digest), a.image)?;
        Ok(())
    })?;
    Ok(Some(()))
}

/// `blkdelta verify TARGET`.
pub fn verify(a: VerifyArgs) -> Result<()> {
    let Some(replica) = Replica::open(&a.target, a.state.as_deref())? else {
        bail!(
            "{} is not a blkdelta replica (no state): nothing to verify it against",
            a.target.display()
        );
    };
    let st = &replica.state;
    if st.in_progress.is_some() {
        bail!(
            "{}: an apply is in progress ({}): finish it first (blkdelta status says how)",
            a.target.display(),
            blkdelta_receive::state::describe(st)
        );
    }
    if replica.health == Health::Missing {
        bail!("{}: the replica is missing", a.target.display());
    }
    let kept = kept::intact(&replica.state_path, st)
        .map_err(|why| anyhow::anyhow!("cannot verify {}: {why}", a.target.display()))?;
    let disk = replica
        .reader(&Default::default())
        .with_context(|| format!("cannot verify {}", a.target.display()))?;
    let mut lines = Vec::new();
    let summary = kept::verify(&kept, &disk, threads(a.threads), &mut |m| {
        lines.push(format!("differs: offset {} length {}", m.offset, m.len));
    })?;
    let held = st
        .snapshot
        .as_ref()
        .map_or("no snapshot".to_string(), |s| format!("'{}'", s.name));
    print_out(|out| {
        for l in &lines {
            writeln!(out, "{l}")?;
        }
        if summary.differing == 0 {
            writeln!(
                out,
                "verify: all {} blocks match {held} ({})",
                summary.blocks,
                st.digest.as_deref().unwrap_or("")
            )?;
        } else {
            writeln!(
                out,
                "verify: {} of {} blocks differ from {held}",
                summary.differing, summary.blocks
            )?;
        }
        Ok(())
    })?;
    if summary.differing > 0 {
        bail!(
            "{}: {} of {} blocks differ from the kept block hashes: repair it with \
             'blkdelta checksum --blocks' and 'blkdelta send --against', or seed it again",
            a.target.display(),
            summary.differing,
            summary.blocks
        );
    }
    Ok(())
}
