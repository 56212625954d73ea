//! A point-in-time view of a running QEMU's disk, through QMP: the checkpoint a live send
//! streams from, and its teardown.
//!
//! ```text
//! begin   blockdev-add FLEECE (qcow2 scratch file, backing = NODE)
//!         transaction: [ block-dirty-bitmap-add TMP (disabled, not persistent)       incremental
//!                        block-dirty-bitmap-merge TMP <- every blkdelta-GUID bitmap  only
//!                        block-dirty-bitmap-add blkdelta-NEW (persistent)
//!                        blockdev-backup NODE -> FLEECE sync=none ]   <- the moment
//!         nbd-server-start (unless one serves already: --nbd-socket), block-export-add FLEECE
//!         with bitmap TMP (found in FLEECE's backing chain)
//! stream  nbd+unix:///EXPORT?socket=S, only TMP's dirty ranges for an incremental
//! end     block-export-del, block-job-cancel, blockdev-del FLEECE, TMP removed;
//!         the stream ended well: the old bitmaps go, blkdelta-NEW stays
//!         it did not: blkdelta-NEW is merged into the oldest bitmap and goes, so the next
//!         run sends from where the replica is
//! ```
//!
//! From the transaction on, guest writes go to NODE as before; the backup job copies the old
//! content of each cluster the guest overwrites into FLEECE first, so the export keeps showing
//! the disk as it was at the moment. Bitmaps are named `blkdelta-<GUID>`, the GUID of the
//! state the stream that created them produced, so the stream's base is found without being
//! typed. Everything this module adds to QEMU is named `blkdelta-…`: a run killed part way is
//! cleaned up by the next one before it starts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use blkdelta_common::digest::to_hex;
use blkdelta_common::qmp::{Qmp, QmpError};
use blkdelta_common::stream::{random_id, SnapRef};
use serde::Deserialize;
use serde_json::json;

use crate::SendError;

/// Prefix of the persistent bitmaps that mark a state streamed.
pub const BITMAP_PREFIX: &str = "blkdelta-";

/// How long a cancelled backup job may take to go away.
const JOB_TIMEOUT: Duration = Duration::from_secs(30);

/// What `send --qmp` is told.
#[derive(Debug, Clone)]
pub struct LiveOptions {
    /// The QMP socket of the QEMU (or qemu-storage-daemon) that runs the disk.
    pub qmp: PathBuf,
    /// The block node (`node-name`) of the disk.
    pub node: String,
    /// Where QEMU's NBD server listens when it already runs one (it can run only one).
    pub nbd_socket: Option<PathBuf>,
    /// A directory QEMU can create files in, for the scratch overlay (default: the disk
    /// image's own directory).
    pub scratch: Option<PathBuf>,
    /// The bitmap the replica's state started from, when several are left (a killed run).
    pub from_bitmap: Option<String>,
    /// Send the whole disk and start a new bitmap, whatever bitmaps are there.
    pub full: bool,
    /// Name of the state the stream produces (default: `NODE@<UTC time>`).
    pub to_name: Option<String>,
}

/// A block node as `query-named-block-nodes` describes it (the fields used).
#[derive(Debug, Deserialize)]
struct Node {
    #[serde(rename = "node-name")]
    node_name: String,
    file: String,
    image: NodeImage,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<Bitmap>,
}

#[derive(Debug, Deserialize)]
struct NodeImage {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
}

#[derive(Debug, Deserialize)]
struct Bitmap {
    name: String,
    #[serde(default)]
    persistent: bool,
    #[serde(default)]
    inconsistent: bool,
    #[serde(default)]
    count: u64,
}

/// A QMP failure of a live send, naming the socket.
fn qmp_err(e: QmpError) -> SendError {
    SendError::Live(e.to_string())
}

/// The checkpoint a live send streams from (see the module documentation).
#[derive(Debug)]
pub struct Checkpoint {
    qmp: Qmp,
    node: String,
    /// The bitmaps of earlier states, oldest (most dirty) first.
    old: Vec<String>,
    /// The state the stream starts from (none: a full stream).
    from: Option<SnapRef>,
    /// The state it produces, and its bitmap.
    to: SnapRef,
    new_bitmap: String,
    /// The frozen copy of the old bitmaps that is exported.
    tmp_bitmap: Option<String>,
    fleece: String,
    fleece_file: PathBuf,
    job: String,
    export: String,
    socket: PathBuf,
    /// This run started the NBD server (and stops it).
    started_server: bool,
    /// Parts set up so far, torn down in reverse.
    stage: Stage,
    /// The virtual size of the disk.
    pub size: u64,
}

/// How far [`Checkpoint::begin`] got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stage {
    Nothing,
    Fleece,
    Moment,
    Exported,
    Done,
}

impl Checkpoint {
    /// Connects to QMP, cleans up what a killed run left, and takes the point-in-time view of
    /// `opts.node` with the bitmaps that say what changed since the replica's state.
    pub fn begin(opts: &LiveOptions) -> Result<Checkpoint, SendError> {
        let mut qmp = Qmp::connect(&opts.qmp).map_err(qmp_err)?;
        clean_leftovers(&mut qmp)?;
        let node = find_node(&mut qmp, &opts.node)?;
        let id = to_hex(&random_id())[..8].to_string();
        let guid = random_id();
        let mut old: Vec<&Bitmap> = node
            .dirty_bitmaps
            .iter()
            .filter(|b| b.persistent && parse_bitmap(&b.name).is_some())
            .collect();
        if let Some(b) = old.iter().find(|b| b.inconsistent).filter(|_| !opts.full) {
            return Err(SendError::Live(format!(
                "bitmap {} of node {} is inconsistent (QEMU stopped without saving it): send \
                 the whole disk with --full, which starts a new bitmap",
                b.name, opts.node
            )));
        }
        // The oldest bitmap has recorded the most (the newer ones started later).
        old.sort_by_key(|b| std::cmp::Reverse(b.count));
        let from = if opts.full || old.is_empty() {
            None
        } else {
            let base = match &opts.from_bitmap {
                Some(name) => old
                    .iter()
                    .find(|b| &b.name == name)
                    .map(|b| b.name.clone())
                    .ok_or_else(|| {
                        SendError::Live(format!(
                            "node {} has no blkdelta bitmap {name} (it has: {})",
                            opts.node,
                            names(&old)
                        ))
                    })?,
                None if old.len() > 1 && old[0].count == old[1].count => {
                    return Err(SendError::Live(format!(
                        "node {} has several blkdelta bitmaps that recorded the same ({}): \
                         name the one of the state the replica holds with --from-bitmap",
                        opts.node,
                        names(&old)
                    )))
                }
                None => old[0].name.clone(),
            };
            let g = parse_bitmap(&base).expect("filtered above");
            Some(SnapRef {
                name: base.clone(),
                guid: g,
            })
        };
        let scratch = match &opts.scratch {
            Some(d) => d.clone(),
            None => Path::new(&node.file)
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from(".")),
        };
        let to_name = opts
            .to_name
            .clone()
            .unwrap_or_else(|| format!("{}@{}", opts.node, utc_stamp()));
        let mut cp = Checkpoint {
            qmp,
            node: opts.node.clone(),
            old: old.iter().map(|b| b.name.clone()).collect(),
            from,
            to: SnapRef {
                name: to_name,
                guid,
            },
            new_bitmap: format!("{BITMAP_PREFIX}{}", to_hex(&guid)),
            tmp_bitmap: None,
            fleece: format!("{BITMAP_PREFIX}fleece-{id}"),
            fleece_file: scratch.join(format!(".{BITMAP_PREFIX}fleece-{id}.qcow2")),
            job: format!("{BITMAP_PREFIX}job-{id}"),
            export: format!("{BITMAP_PREFIX}export-{id}"),
            socket: opts
                .nbd_socket
                .clone()
                .unwrap_or_else(|| scratch.join(format!(".{BITMAP_PREFIX}{id}.sock"))),
            started_server: false,
            stage: Stage::Nothing,
            size: node.image.virtual_size,
        };
        cp.set_up(opts.nbd_socket.is_some())?;
        Ok(cp)
    }

    /// The scratch overlay, the moment, the export.
    fn set_up(&mut self, server_given: bool) -> Result<(), SendError> {
        blkdelta_common::image::qcow2::Qcow2Writer::create(&self.fleece_file, self.size, 16)
            .map_err(|e| {
                SendError::Live(format!(
                    "cannot create the scratch overlay {}: {e} (--scratch DIR chooses where)",
                    self.fleece_file.display()
                ))
            })?;
        let added = self.qmp.execute::<serde_json::Value>(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": self.fleece,
                "file": {"driver": "file", "filename": self.fleece_file},
                "backing": self.node,
                "discard": "unmap",
            }),
        );
        if let Err(e) = added {
            let _ = std::fs::remove_file(&self.fleece_file);
            return Err(qmp_err(e));
        }
        self.stage = Stage::Fleece;
        let mut actions = Vec::new();
        if self.from.is_some() {
            let tmp = format!("{BITMAP_PREFIX}tmp-{}", &self.job[self.job.len() - 8..]);
            actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
                "node": self.node, "name": tmp, "persistent": false, "disabled": true}}));
            actions.push(json!({"type": "block-dirty-bitmap-merge", "data": {
                "node": self.node, "target": tmp, "bitmaps": self.old}}));
            self.tmp_bitmap = Some(tmp);
        }
        actions.push(json!({"type": "block-dirty-bitmap-add", "data": {
            "node": self.node, "name": self.new_bitmap, "persistent": true}}));
        actions.push(json!({"type": "blockdev-backup", "data": {
            "device": self.node, "target": self.fleece, "sync": "none", "job-id": self.job}}));
        self.qmp
            .execute::<serde_json::Value>("transaction", json!({ "actions": actions }))
            .map_err(qmp_err)?;
        self.stage = Stage::Moment;
        if !server_given {
            let started = self.qmp.execute::<serde_json::Value>(
                "nbd-server-start",
                json!({"addr": {"type": "unix", "data": {"path": self.socket}}}),
            );
            match started {
                Ok(_) => self.started_server = true,
                Err(QmpError::Command { desc, .. }) if desc.contains("already running") => {
                    return Err(SendError::Live(
                        "QEMU already runs an NBD server (it can run only one): tell blkdelta \
                         where it listens with --nbd-socket PATH"
                            .into(),
                    ))
                }
                Err(e) => return Err(qmp_err(e)),
            }
        }
        let mut export = json!({"type": "nbd", "id": self.export, "node-name": self.fleece,
            "name": self.export, "writable": false});
        if let Some(tmp) = &self.tmp_bitmap {
            export["bitmaps"] = json!([tmp]);
        }
        self.qmp
            .execute::<serde_json::Value>("block-export-add", export)
            .map_err(qmp_err)?;
        self.stage = Stage::Exported;
        Ok(())
    }

    /// The export of the point-in-time view.
    pub fn uri(&self) -> String {
        format!(
            "nbd+unix:///{}?socket={}",
            self.export,
            self.socket.display()
        )
    }

    /// The exported bitmap that marks what changed since [`Checkpoint::from`] (none for a
    /// full stream).
    pub fn bitmap(&self) -> Option<&str> {
        self.tmp_bitmap.as_deref()
    }

    /// The state the stream starts from (none: a full stream).
    pub fn from(&self) -> Option<&SnapRef> {
        self.from.as_ref()
    }

    /// The state the stream produces.
    pub fn to(&self) -> &SnapRef {
        &self.to
    }

    /// The change source of the view: the whole disk, or what changed since
    /// [`Checkpoint::from`] (see [`super::nbd::open_checkpoint`]).
    pub fn source(&self) -> Result<Box<dyn super::ChangeSource>, SendError> {
        super::nbd::open_checkpoint(
            &self.uri(),
            self.bitmap(),
            self.from.clone(),
            self.to.clone(),
            &self.node,
        )
    }

    /// Tears the view down. `streamed`: the stream ended well, so the replica can hold the
    /// new state: the old bitmaps go. Otherwise the new bitmap is merged into the oldest and
    /// goes, and the next run streams from the state the replica holds.
    pub fn finish(mut self, streamed: bool) -> Result<(), SendError> {
        let torn = self.tear_down();
        let kept = if streamed {
            self.drop_bitmaps(&self.old.clone())
        } else {
            self.keep_old()
        };
        self.stage = Stage::Done;
        torn.and(kept)
    }

    /// Removes the export, the job, the scratch overlay and the frozen bitmap, in that order
    /// (each only if this run set it up), going on past failures and returning the first.
    fn tear_down(&mut self) -> Result<(), SendError> {
        let mut first: Option<SendError> = None;
        let mut note = |r: Result<(), SendError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if self.stage >= Stage::Exported {
            note(self.run("block-export-del", json!({"id": self.export})));
            if self.started_server {
                note(self.run("nbd-server-stop", json!({})));
                let _ = std::fs::remove_file(&self.socket);
            }
        }
        if self.stage >= Stage::Moment {
            note(cancel_job(&mut self.qmp, &self.job));
            if let Some(tmp) = self.tmp_bitmap.clone() {
                note(self.run(
                    "block-dirty-bitmap-remove",
                    json!({"node": self.node, "name": tmp}),
                ));
            }
        }
        if self.stage >= Stage::Fleece {
            note(self.run("blockdev-del", json!({"node-name": self.fleece})));
            let _ = std::fs::remove_file(&self.fleece_file);
        }
        self.stage = Stage::Nothing;
        first.map_or(Ok(()), Err)
    }

    /// The stream did not end well: what the new bitmap recorded goes into the oldest one
    /// (which never stopped recording, so nothing is lost either way), and the new one goes.
    fn keep_old(&mut self) -> Result<(), SendError> {
        if self.stage < Stage::Moment && self.stage != Stage::Nothing {
            return Ok(());
        }
        if let Some(oldest) = self.old.first().cloned() {
            self.run(
                "block-dirty-bitmap-merge",
                json!({"node": self.node, "target": oldest, "bitmaps": [self.new_bitmap]}),
            )?;
        }
        let new = self.new_bitmap.clone();
        self.drop_bitmaps(&[new])
    }

    fn drop_bitmaps(&mut self, names: &[String]) -> Result<(), SendError> {
        for name in names {
            self.run(
                "block-dirty-bitmap-remove",
                json!({"node": self.node, "name": name}),
            )?;
        }
        Ok(())
    }

    fn run(&mut self, command: &str, args: serde_json::Value) -> Result<(), SendError> {
        self.qmp
            .execute::<serde_json::Value>(command, args)
            .map(drop)
            .map_err(qmp_err)
    }
}

#[cfg(test)]
impl Checkpoint {
    /// Closes the QMP connection and tears nothing down, as a killed process leaves QEMU.
    fn abandon(mut self) {
        self.stage = Stage::Done;
    }
}

impl Drop for Checkpoint {
    fn drop(&mut self) {
        if self.stage != Stage::Done {
            let _ = self.tear_down();
            let _ = self.keep_old();
        }
    }
}

/// Cancels the backup job `job` and waits for it to go away.
fn cancel_job(qmp: &mut Qmp, job: &str) -> Result<(), SendError> {
    qmp.execute::<serde_json::Value>("block-job-cancel", json!({"device": job, "force": true}))
        .map_err(qmp_err)?;
    qmp.wait_event("JOB_STATUS_CHANGE", JOB_TIMEOUT, |d| {
        d["id"] == job && d["status"] == "null"
    })
    .map(drop)
    .map_err(qmp_err)
}

/// Removes what a killed run left in QEMU: exports, backup jobs, scratch nodes and frozen
/// bitmaps named `blkdelta-…` (its persistent bitmaps stay: they are the next base).
fn clean_leftovers(qmp: &mut Qmp) -> Result<(), SendError> {
    #[derive(Deserialize)]
    struct Export {
        id: String,
    }
    #[derive(Deserialize)]
    struct Job {
        device: String,
    }
    let exports: Vec<Export> = qmp
        .execute("query-block-exports", json!({}))
        .map_err(qmp_err)?;
    for e in exports.iter().filter(|e| e.id.starts_with(BITMAP_PREFIX)) {
        qmp.execute::<serde_json::Value>("block-export-del", json!({"id": e.id, "mode": "hard"}))
            .map_err(qmp_err)?;
    }
    let jobs: Vec<Job> = qmp
        .execute("query-block-jobs", json!({}))
        .map_err(qmp_err)?;
    for j in jobs.iter().filter(|j| j.device.starts_with(BITMAP_PREFIX)) {
        cancel_job(qmp, &j.device)?;
    }
    let nodes: Vec<Node> = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .map_err(qmp_err)?;
    for n in &nodes {
        for b in n
            .dirty_bitmaps
            .iter()
            .filter(|b| b.name.starts_with(&format!("{BITMAP_PREFIX}tmp-")))
        {
            qmp.execute::<serde_json::Value>(
                "block-dirty-bitmap-remove",
                json!({"node": n.node_name, "name": b.name}),
            )
            .map_err(qmp_err)?;
        }
    }
    for n in nodes
        .iter()
        .filter(|n| n.node_name.starts_with(&format!("{BITMAP_PREFIX}fleece-")))
    {
        qmp.execute::<serde_json::Value>("blockdev-del", json!({"node-name": n.node_name}))
            .map_err(qmp_err)?;
        let _ = std::fs::remove_file(&n.file);
    }
    Ok(())
}

/// The node called `name`.
fn find_node(qmp: &mut Qmp, name: &str) -> Result<Node, SendError> {
    let nodes: Vec<Node> = qmp
        .execute("query-named-block-nodes", json!({"flat": true}))
        .map_err(qmp_err)?;
    let listed: Vec<String> = nodes.iter().map(|n| n.node_name.clone()).collect();
    nodes
        .into_iter()
        .find(|n| n.node_name == name)
        .ok_or_else(|| {
            SendError::Live(format!(
                "QEMU has no block node '{name}' (its nodes: {})",
                listed.join(", ")
            ))
        })
}

/// The GUID a `blkdelta-<32 hex>` bitmap name carries.
pub fn parse_bitmap(name: &str) -> Option<[u8; 16]> {
    let hex = name.strip_prefix(BITMAP_PREFIX)?;
    if hex.len() != 32 {
        return None;
    }
    blkdelta_common::hex::from_hex(hex)
}

fn names(bitmaps: &[&Bitmap]) -> String {
    bitmaps
        .iter()
        .map(|b| b.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `YYYY-MM-DDTHH:MM:SSZ` now.
fn utc_stamp() -> String {
    blkdelta_common::time::utc_stamp(blkdelta_common::time::now_secs())
}

#[cfg(test)]
mod tests;
