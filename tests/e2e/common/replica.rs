//! A replica's files as blkdelta keeps them, and QEMU's locks on an image.

use std::path::{Path, PathBuf};

/// The state file blkdelta keeps beside a replica file.
pub fn state_of(replica: &Path) -> PathBuf {
    PathBuf::from(format!("{}.blkdelta", replica.display()))
}

/// Whether some process holds an OFD lock covering `byte` of `img` (QEMU's lock bytes), from
/// `/proc/locks` (`N: OFDLCK ADVISORY READ -1 MAJ:MIN:INODE START END`).
pub fn lock_held(img: &Path, byte: u64) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = format!(":{}", std::fs::metadata(img).unwrap().ino());
    let locks = std::fs::read_to_string("/proc/locks").unwrap_or_default();
    locks.lines().any(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        let Some(i) = f.iter().position(|t| t.ends_with(&ino)) else {
            return false;
        };
        let start = f.get(i + 1).and_then(|s| s.parse::<u64>().ok());
        let end = f.get(i + 2).map(|e| e.parse::<u64>().unwrap_or(u64::MAX));
        line.contains("OFDLCK") && start.is_some_and(|s| s <= byte) && end >= Some(byte)
    })
}

/// Makes the state file `state` describe the replica file `replica` as it is now (device,
/// inode, size, time): what a copy of a replica and its state needs to stand for the original
/// (blkdelta itself refuses a replica that is another file than its state recorded).
pub fn adopt_replica(replica: &Path, state: &Path) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(replica).unwrap();
    let mut st: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(state).unwrap()).unwrap();
    st["identity"] = serde_json::json!({
        "kind": "file",
        "dev": m.dev(),
        "ino": m.ino(),
        "size": m.size(),
        "mtime_ns": m.mtime() * 1_000_000_000 + m.mtime_nsec(),
    });
    std::fs::write(state, serde_json::to_string_pretty(&st).unwrap()).unwrap();
}
