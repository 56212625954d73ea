//! The replica's state: which snapshot it holds and whether an apply is in progress.
//!
//! Kept as JSON beside the replica (`<file>.blkdelta`) or, for a block device, under
//! `/var/lib/blkdelta` (or `$BLKDELTA_STATE_DIR`). Every update is atomic: a temporary file is
//! written and synced, renamed over the old state, and the directory is synced.

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use blkdelta_common::digest::to_hex;
use blkdelta_common::stream::SnapRef;
use serde::{Deserialize, Serialize};

use crate::identity::{device_state_name, DeviceKey, Identity};
use crate::ReceiveError;

/// GUIDs of the states a replica went through that its state remembers (the newest), so that
/// a stream older than what it holds, or one already applied, is refused.
pub const HISTORY_LIMIT: usize = 1024;

/// A snapshot as the state names it (GUID in hex).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateSnap {
    /// Snapshot name.
    pub name: String,
    /// GUID, 32 hex digits.
    pub guid: String,
}

impl From<&SnapRef> for StateSnap {
    fn from(s: &SnapRef) -> Self {
        StateSnap {
            name: s.name.clone(),
            guid: to_hex(&s.guid),
        }
    }
}

impl StateSnap {
    /// Whether this is the state `s` (GUIDs compared).
    pub fn is(&self, s: &SnapRef) -> bool {
        self.guid.eq_ignore_ascii_case(&to_hex(&s.guid))
    }

    /// Whether holding this state satisfies a stream whose base is `s`: the same state, or,
    /// for a base named by reference ([`SnapRef::named`]), a named state of that name.
    pub fn satisfies(&self, s: &SnapRef) -> bool {
        from_hex16(&self.guid).is_some_and(|g| s.answers_to(&self.name, &g))
    }
}

/// An apply that has started and not yet reached its last snapshot-end record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InProgress {
    /// The stream being applied (hex).
    pub stream_id: String,
    /// The state the replica held when the current transition started (`None`: a full stream).
    pub from: Option<StateSnap>,
    /// The state the current transition produces.
    pub to: StateSnap,
    /// Index of the current transition in the stream.
    pub transition: u32,
    /// Disk offset below which this transition's writes are durable.
    pub durable_offset: u64,
    /// The undo stream this apply writes, if any: finishing the apply must continue it.
    #[serde(default)]
    pub undo: Option<String>,
}

impl InProgress {
    /// The resume token of this apply: where `send --resume` starts.
    pub fn token(&self) -> Option<blkdelta_common::stream::ResumeToken> {
        let from = match &self.from {
            Some(f) => Some(from_hex16(&f.guid)?),
            None => None,
        };
        Some(blkdelta_common::stream::ResumeToken {
            from,
            to: from_hex16(&self.to.guid)?,
            offset: self.durable_offset,
        })
    }
}

/// Parses 32 hex digits (either case).
pub fn from_hex16(s: &str) -> Option<[u8; 16]> {
    blkdelta_common::hex::from_hex(s)
}

/// What a replica holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaState {
    /// Format of this file.
    pub format: u32,
    /// Kind of the source the replica copies (`qcow2`, `raw`).
    pub source_kind: String,
    /// Name of the source the replica copies.
    pub source_name: String,
    /// Virtual size of the replica.
    pub virtual_size: u64,
    /// The snapshot the replica holds; `None` while an apply is in progress.
    pub snapshot: Option<StateSnap>,
    /// The apply in progress, if any.
    pub in_progress: Option<InProgress>,
    /// Seconds since the epoch of the last update.
    pub updated_unix: u64,
    /// What the replica is (file or device), as it was after blkdelta's last durable write.
    #[serde(default)]
    pub identity: Option<Identity>,
    /// GUIDs (hex) of the states the replica reached, oldest first, at most
    /// [`HISTORY_LIMIT`].
    #[serde(default)]
    pub history: Vec<String>,
    /// The digest (hex) of the replica's content when it reached `snapshot`, from its kept
    /// block hashes.
    #[serde(default)]
    pub digest: Option<String>,
    /// What `verify` found when it read the replica and some blocks no longer matched its
    /// kept hashes: the replica holds no known snapshot until it is repaired or seeded again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diverged: Option<String>,
    /// For a qcow2 replica: the states its snapshots stand for, where a snapshot's own GUID
    /// is not the stream's (the source's states had none of their own, or their id was taken
    /// in the replica). At most [`HISTORY_LIMIT`], the newest last.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub aliases: Vec<Alias>,
    /// For a qcow2 replica whose active layer is none of its snapshots: the one it held
    /// before something wrote into it (found from the image, never saved).
    #[serde(skip)]
    pub written_since: Option<String>,
}

/// A snapshot of a qcow2 replica (its own GUID, hex) and the stream state it stands for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    /// The replica snapshot's GUID, 32 hex digits.
    pub snapshot: String,
    /// The state it holds.
    pub state: StateSnap,
}

/// How a replica compares with its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// The file or device the state describes, unchanged since blkdelta last wrote it (or a
    /// state from before identities were recorded).
    Unchanged,
    /// Nothing is at the replica's path.
    Missing,
    /// Something changed behind blkdelta's back; says what.
    Changed(String),
}

impl ReplicaState {
    /// The state of a replica of `virtual_size` bytes that holds nothing yet.
    pub fn new(virtual_size: u64) -> Self {
        ReplicaState {
            format: 1,
            source_kind: String::new(),
            source_name: String::new(),
            virtual_size,
            snapshot: None,
            in_progress: None,
            updated_unix: 0,
            identity: None,
            history: Vec::new(),
            digest: None,
            diverged: None,
            aliases: Vec::new(),
            written_since: None,
        }
    }

    /// Notes that the replica snapshot whose GUID is `snapshot` (hex) holds `state`.
    pub fn alias(&mut self, snapshot: &str, state: StateSnap) {
        self.aliases
            .retain(|a| !a.snapshot.eq_ignore_ascii_case(snapshot));
        if !snapshot.eq_ignore_ascii_case(&state.guid) {
            self.aliases.push(Alias {
                snapshot: snapshot.to_string(),
                state,
            });
        }
        let excess = self.aliases.len().saturating_sub(HISTORY_LIMIT);
        self.aliases.drain(..excess);
    }

    /// The state a replica snapshot (its GUID, hex, and name) holds.
    pub fn state_of_snapshot(&self, guid: &str, name: &str) -> StateSnap {
        self.aliases
            .iter()
            .find(|a| a.snapshot.eq_ignore_ascii_case(guid))
            .map(|a| a.state.clone())
            .unwrap_or_else(|| StateSnap {
                name: name.to_string(),
                guid: guid.to_string(),
            })
    }

    /// Notes that the replica reached the state `guid` (hex).
    pub fn remember(&mut self, guid: &str) {
        self.history.retain(|g| !g.eq_ignore_ascii_case(guid));
        self.history.push(guid.to_string());
        let excess = self.history.len().saturating_sub(HISTORY_LIMIT);
        self.history.drain(..excess);
    }

    /// Whether the replica went through the state `s` at some point.
    pub fn went_through(&self, s: &SnapRef) -> bool {
        let hex = to_hex(&s.guid);
        self.history.iter().any(|g| g.eq_ignore_ascii_case(&hex))
    }

    /// Compares the replica found at its path (`now`: `None` when nothing is there) with the
    /// identity recorded. An apply in progress changes size and times itself: then only which
    /// file or device it is counts.
    pub fn health(&self, now: Option<&Identity>) -> Health {
        let Some(now) = now else {
            return Health::Missing;
        };
        if let Some(found) = &self.diverged {
            return Health::Changed(format!("verify found {found}"));
        }
        let Some(recorded) = &self.identity else {
            return Health::Unchanged;
        };
        match recorded.changed(now, self.in_progress.is_none()) {
            Some(what) => Health::Changed(what),
            None => Health::Unchanged,
        }
    }
}

/// A one-phrase description of what a replica holds.
pub fn describe(st: &ReplicaState) -> String {
    match (&st.snapshot, &st.in_progress) {
        (_, Some(p)) => format!(
            "an unfinished apply ({} -> '{}')",
            p.from
                .as_ref()
                .map_or("full".to_string(), |f| format!("'{}'", f.name)),
            p.to.name
        ),
        (Some(s), None) => format!("'{}' ({})", s.name, s.guid),
        (None, None) => match &st.written_since {
            Some(name) => format!(
                "no snapshot (its active layer was written since it held '{name}': \
                 'qemu-img snapshot -a {name}' reverts it)"
            ),
            None => "no snapshot".into(),
        },
    }
}

/// A path made absolute (symlinks kept), as the state records it.
pub fn absolute_display(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}

/// Where the state of `target` lives when `--state` does not say.
pub fn default_state_path(target: &Path, is_block_device: bool) -> PathBuf {
    if !is_block_device {
        let mut name = target.as_os_str().to_owned();
        name.push(".blkdelta");
        return PathBuf::from(name);
    }
    let dir = std::env::var_os("BLKDELTA_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/blkdelta"));
    // Keyed by what the device is (its DM UUID, else its resolved path), whatever path names
    // it: a symlink finds the same state, and /dev/dm-N renumbering does not lose it.
    let key = DeviceKey::of(target, 0).map_or_else(
        |_| {
            std::path::absolute(target)
                .unwrap_or_else(|_| target.to_path_buf())
                .display()
                .to_string()
        },
        |k| k.key,
    );
    dir.join(device_state_name(&key))
}

fn state_io(path: &Path, op: &'static str, source: std::io::Error) -> ReceiveError {
    ReceiveError::StateIo {
        path: path.to_path_buf(),
        op,
        source,
    }
}

fn state_err(path: &Path, reason: impl ToString) -> ReceiveError {
    ReceiveError::State {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Reads the state at `path`; `Ok(None)` when there is none.
pub fn load(path: &Path) -> Result<Option<ReplicaState>, ReceiveError> {
    let text = match fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(state_io(path, "read", e)),
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|e| state_err(path, format!("unreadable: {e}")))
}

/// Replaces the state at `path` atomically and durably.
pub fn save(path: &Path, state: &ReplicaState) -> Result<(), ReceiveError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    fs::create_dir_all(&dir).map_err(|e| state_io(path, "create its directory", e))?;
    let mut tmp_name = path.as_os_str().to_owned();
    tmp_name.push(".tmp");
    let tmp = PathBuf::from(tmp_name);
    let mut text = serde_json::to_string_pretty(state).map_err(|e| state_err(path, e))?;
    text.push('\n');
    let write = || -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(&dir)?.sync_all()
    };
    write().map_err(|e| state_io(path, "write", e))
}

/// An exclusive hold on a replica, released on drop: two receives never apply at once. The
/// lock file holds the pid of its holder; it is removed on drop when the replica has no state
/// (a refused first receive leaves nothing behind).
#[derive(Debug)]
pub struct StateLock {
    file: File,
    lock_path: PathBuf,
    state_path: PathBuf,
}

impl Drop for StateLock {
    fn drop(&mut self) {
        // Still held: nobody can take this file's lock while it is unlinked.
        if !self.state_path.exists() {
            let _ = fs::remove_file(&self.lock_path);
        }
        let _ = &self.file;
    }
}

/// Takes the replica's lock (`<state>.lock`, `flock`), failing at once, naming the holder's
/// pid, if another process holds it.
pub fn lock(state_path: &Path) -> Result<StateLock, ReceiveError> {
    use rustix::fs::FlockOperation;
    let mut name = state_path.as_os_str().to_owned();
    name.push(".lock");
    let lock_path = PathBuf::from(name);
    if let Some(dir) = lock_path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| state_io(state_path, "create its directory", e))?;
    }
    loop {
        let mut file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&lock_path)
            .map_err(|e| state_io(&lock_path, "open the lock", e))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(rustix::io::Errno::WOULDBLOCK) => {
                let mut text = String::new();
                let _ = std::io::Read::read_to_string(&mut file, &mut text);
                return Err(ReceiveError::Busy {
                    lock: lock_path,
                    pid: text.trim().parse().ok(),
                });
            }
            Err(e) => return Err(state_io(&lock_path, "lock", e.into())),
        }
        // A holder that removed the file on its way out: lock the one at the path now.
        let same = fs::metadata(&lock_path).ok().map(|m| (m.dev(), m.ino()))
            == file.metadata().ok().map(|m| (m.dev(), m.ino()));
        if !same {
            continue;
        }
        file.set_len(0)
            .and_then(|()| file.write_all(format!("{}\n", std::process::id()).as_bytes()))
            .map_err(|e| state_io(&lock_path, "write the lock", e))?;
        return Ok(StateLock {
            file,
            lock_path,
            state_path: state_path.to_path_buf(),
        });
    }
}

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    blkdelta_common::time::now_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_then_load_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.raw.blkdelta");
        assert_eq!(load(&path).unwrap(), None);
        let st = ReplicaState {
            source_kind: "qcow2".into(),
            source_name: "vm.qcow2".into(),
            snapshot: Some(StateSnap {
                name: "s1".into(),
                guid: "00".repeat(16),
            }),
            updated_unix: 1,
            ..ReplicaState::new(42)
        };
        save(&path, &st).unwrap();
        assert_eq!(load(&path).unwrap(), Some(st));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn default_paths() {
        assert_eq!(
            default_state_path(Path::new("/srv/vm.raw"), false),
            PathBuf::from("/srv/vm.raw.blkdelta")
        );
        let p = default_state_path(Path::new("/nonexistent/dev/x"), true);
        assert!(p.to_string_lossy().ends_with("nonexistent_2fdev_2fx.state"));
    }

    #[test]
    fn a_second_lock_on_the_same_replica_fails_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.raw.blkdelta");
        let first = lock(&path).unwrap();
        let err = lock(&path).unwrap_err().to_string();
        assert!(err.contains("another blkdelta receive"), "{err}");
        assert!(
            err.contains(&format!("(pid {})", std::process::id())),
            "{err}"
        );
        drop(first);
        lock(&path).unwrap();
    }

    #[test]
    fn garbage_state_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s");
        fs::write(&path, b"{not json").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("unreadable"));
    }
}

#[cfg(test)]
mod history_tests {
    use super::*;

    #[test]
    fn a_guid_in_upper_case_hex_is_the_same_state() {
        let s = SnapRef::named("daily");
        let upper = StateSnap {
            name: "daily".into(),
            guid: to_hex(&s.guid).to_uppercase(),
        };
        assert!(upper.is(&s) && upper.satisfies(&s));
    }

    #[test]
    fn history_keeps_the_newest_states_once_each() {
        let mut st = ReplicaState::new(0);
        for i in 0..HISTORY_LIMIT + 10 {
            st.remember(&format!("{i:032x}"));
        }
        st.remember(&format!("{:032x}", HISTORY_LIMIT + 5));
        assert_eq!(st.history.len(), HISTORY_LIMIT);
        assert_eq!(
            st.history.last().unwrap(),
            &format!("{:032x}", HISTORY_LIMIT + 5)
        );
        let old = SnapRef {
            name: "x".into(),
            guid: [0; 16],
        };
        assert!(!st.went_through(&old));
    }
}
