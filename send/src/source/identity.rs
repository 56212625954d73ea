//! Identities of states that have none of their own (a bitmap's epoch, a raw file, a change
//! map, an overlay): the user names them. A stream's base is a reference to whichever state
//! of that name the replica holds ([`named`]); the state a stream produces is one particular
//! state of that name ([`state_of`]), fingerprinted by what its files looked like when it was
//! sent, so a replica tells two cycles of a bitmap called `daily` apart (and refuses to replay
//! the older one), while sending the same unchanged source again gives the same state.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;

use blkdelta_common::stream::{random_id, SnapRef};

/// A reference to any state called `name`: what a stream's base is called.
pub fn named(name: &str) -> SnapRef {
    SnapRef::named(name)
}

/// The state called `name` that `files` hold now: its fingerprint is each file's device,
/// inode, size and modification time. A block device's times do not change with its content,
/// so a state read from one is new at every send (a fresh random fingerprint).
pub fn state_of(name: &str, files: &[&Path]) -> SnapRef {
    let mut fp = Vec::new();
    for f in files {
        match std::fs::metadata(f) {
            Ok(m) if m.file_type().is_block_device() => {
                fp.extend_from_slice(&m.rdev().to_le_bytes());
                fp.extend_from_slice(&random_id());
            }
            Ok(m) => {
                for v in [m.dev(), m.ino(), m.size()] {
                    fp.extend_from_slice(&v.to_le_bytes());
                }
                fp.extend_from_slice(&m.mtime().to_le_bytes());
                fp.extend_from_slice(&m.mtime_nsec().to_le_bytes());
            }
            // Unreadable metadata: nothing stable to go by.
            Err(_) => fp.extend_from_slice(&random_id()),
        }
    }
    SnapRef::named_state(name, &fp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_state_is_stable_while_its_files_are_and_changes_with_them() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("disk.raw");
        std::fs::write(&f, b"one").unwrap();
        let first = state_of("daily", &[&f]);
        assert_eq!(first, state_of("daily", &[&f]));
        assert!(named("daily").answers_to("daily", &first.guid));
        std::fs::write(&f, b"two!").unwrap();
        let second = state_of("daily", &[&f]);
        assert_ne!(first.guid, second.guid);
        assert!(named("daily").answers_to("daily", &second.guid));
        assert_ne!(named("daily").guid, named("weekly").guid);
    }
}
