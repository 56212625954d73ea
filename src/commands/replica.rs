//! `checksum` of a replica and `verify`: the replica's kept block hashes, and the replica
//! read against them.

use std::path::Path;

use anyhow::{bail, Context, Result};
use blkdelta_common::blocklist::BlockListWriter;
use blkdelta_common::digest::to_hex;
use blkdelta_receive::hashes::KeptHashes;
use blkdelta_receive::kept::{self, Replica};
use blkdelta_receive::state::{self, Health};

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
    let note = match (&replica.kept, a.read) {
        (Ok(kept), false) => {
            if a.blocks {
                print_out(|out| write_kept_list(kept, out))?;
            } else {
                // Trusted hashes give the digest the state recorded (checked as they were
                // opened): no second fold.
                let digest = match kept::recorded_digest(&replica.state) {
                    Some(d) => d,
                    None => kept.digest()?,
                };
                print_out(|out| digest_line(&digest, &a.image, out))?;
            }
            "from the kept block hashes (--read reads the replica)".to_string()
        }
        (kept, _) => {
            let disk = replica
                .reader(&super::share(a.force_share))
                .with_context(|| format!("cannot checksum {}", a.image))?;
            super::print_digest_or_blocks(a, disk.as_ref())?;
            match kept {
                Err(why) if !a.read => {
                    format!("read the replica (its kept block hashes are not used: {why})")
                }
                _ => "read the replica".to_string(),
            }
        }
    };
    eprintln!("note: {note}");
    Ok(Some(()))
}

/// The output line of `checksum`: the digest first.
pub fn digest_line(digest: &[u8; 32], name: &str, out: &mut dyn std::io::Write) -> Result<()> {
    writeln!(out, "{}  {name}", to_hex(digest))?;
    Ok(())
}

/// The block list of the kept hashes.
fn write_kept_list(kept: &KeptHashes, out: &mut dyn std::io::Write) -> Result<()> {
    let mut w = BlockListWriter::new(out, kept.size())?;
    let mut failed = None;
    kept.for_each(&mut |_, hash| {
        w.push(hash).map_err(|e| {
            failed = Some(e);
            blkdelta_receive::ReceiveError::Failed("writing the block list".into())
        })
    })
    .map_err(|e| failed.map_or_else(|| anyhow::Error::new(e), anyhow::Error::new))?;
    w.finish()?;
    Ok(())
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
    let summary = kept::verify(&kept, disk.as_ref(), threads(a.threads), &mut |m| {
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
        record_divergence(&replica, summary.differing, summary.blocks)?;
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

/// Notes in the replica's state what `verify` found, so that `status`, `receive` and
/// `checksum` no longer take the replica for the snapshot it held (a block device's content can
/// change without its identity changing).
fn record_divergence(replica: &Replica, differing: u64, blocks: u64) -> Result<()> {
    let _lock = state::lock(&replica.state_path)?;
    let Some(mut st) = state::load(&replica.state_path)? else {
        return Ok(());
    };
    if st != replica.state {
        // Something applied meanwhile: what was read belongs to the state before it.
        return Ok(());
    }
    st.diverged = Some(format!(
        "{differing} of {blocks} blocks differing from the kept block hashes ({})",
        super::report::utc_date(state::now_unix())
    ));
    state::save(&replica.state_path, &st)?;
    Ok(())
}
