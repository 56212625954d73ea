//! Which snapshot each replica of a source holds, kept beside the source
//! (`SOURCE.blkdelta-sync`, JSON), so that `--keep-source` never deletes the base of another
//! replica of the same source. Only ever protects: an entry that is wrong keeps a snapshot
//! longer, it never deletes one.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;

use anyhow::{anyhow, Context, Result};

use super::plan::SourceSnap;
use super::side::{Location, Side};

/// Replica (as sync names it: `PATH` or `HOST:PATH`) → the source snapshot it holds.
pub type Holders = BTreeMap<String, String>;

/// The file beside `source`.
fn file_of(source: &Location) -> String {
    format!("{}.blkdelta-sync", source.path())
}

/// The holders recorded beside `source` (none when there is no file yet, or it is not
/// readable as one: it only protects).
pub fn read(sside: &Side, source: &Location) -> Holders {
    let file = file_of(source);
    let text = match source {
        Location::Local(_) => std::fs::read(&file).ok(),
        Location::Remote { .. } => sside
            .run(
                sside.tool("sh", &["-c", "cat \"$1\" 2>/dev/null || true", "sh", &file]),
                "reading the source's list of replicas",
            )
            .ok(),
    };
    text.and_then(|t| serde_json::from_slice::<Holders>(&t).ok())
        .unwrap_or_default()
}

/// Records that `replica` holds `snapshot`, dropping replicas whose snapshot the source no
/// longer has (they have no base to be protected).
pub fn record(
    sside: &Side,
    source: &Location,
    mut holders: Holders,
    snaps: &[SourceSnap],
    replica: &str,
    snapshot: &str,
) -> Result<()> {
    holders.retain(|_, s| snaps.iter().any(|k| &k.name == s));
    holders.insert(replica.to_string(), snapshot.to_string());
    let json = serde_json::to_vec_pretty(&holders)?;
    let file = file_of(source);
    match source {
        Location::Local(_) => {
            let tmp = format!("{file}.tmp");
            std::fs::write(&tmp, &json)
                .and_then(|()| std::fs::rename(&tmp, &file))
                .with_context(|| format!("cannot write {file}"))
        }
        Location::Remote { .. } => {
            let mut cmd = sside.tool(
                "sh",
                &[
                    "-c",
                    "cat > \"$1.tmp\" && mv \"$1.tmp\" \"$1\"",
                    "sh",
                    &file,
                ],
            );
            let mut child = cmd
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .context("cannot run ssh")?;
            let written = child
                .stdin
                .take()
                .map(|mut i| i.write_all(&json))
                .transpose();
            let out = child.wait_with_output()?;
            if !out.status.success() {
                return Err(sside.failure(&format!("writing {file}"), &out));
            }
            written.map_err(|e| anyhow!("cannot write {file}: {e}"))?;
            Ok(())
        }
    }
}

/// The snapshots replicas other than `replica` hold.
pub fn others(holders: &Holders, replica: &str) -> Vec<String> {
    holders
        .iter()
        .filter(|(r, _)| r.as_str() != replica)
        .map(|(_, s)| s.clone())
        .collect()
}
