//! What a replica *is*: the file or device the state describes, recorded after blkdelta's last
//! durable write and compared with what the path holds now before anything else is trusted.
//!
//! ```text
//! file    device, inode, size, modification time (ns)    a swap, a truncation, a write
//!                                                        (also through a loop device) changes one
//! device  key (DM UUID, else the resolved path), major:minor, size, loop backing file
//! ```
//! A block device's content can change without any of these changing: `verify` finds that,
//! not `receive`.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// The identity of a replica, as recorded in its state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Identity {
    /// A regular file.
    File {
        /// `st_dev` of the file system holding it.
        dev: u64,
        /// Inode number.
        ino: u64,
        /// Size in bytes.
        size: u64,
        /// Modification time, nanoseconds since the epoch.
        mtime_ns: i64,
    },
    /// A block device.
    Device(DeviceKey),
    /// A qcow2 replica: which file it is. What it holds is what the image itself says (the
    /// snapshot its active layer is), so QEMU may change it (revert to a snapshot, delete
    /// one) without making it another replica.
    Image {
        /// `st_dev` of the file system holding it.
        dev: u64,
        /// Inode number.
        ino: u64,
    },
}

/// What names a block device whatever path reaches it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceKey {
    /// The device-mapper UUID (LVM: `LVM-<vg uuid><lv uuid>`) when there is one, else the
    /// resolved path (`/dev/loop0`): stable where `/dev/dm-N` numbers are not.
    pub key: String,
    /// The resolved path (`/dev/dm-3`), for messages.
    pub resolved: PathBuf,
    /// `major:minor`.
    pub rdev: String,
    /// Size of the device in bytes.
    pub size: u64,
    /// For a loop device, the file it is attached to.
    #[serde(default)]
    pub loop_backing: Option<String>,
}

impl DeviceKey {
    /// Reads the key of the block device `path` leads to (symlinks resolved).
    pub fn of(path: &Path, size: u64) -> std::io::Result<Self> {
        let resolved = std::fs::canonicalize(path)?;
        let rdev = std::fs::metadata(&resolved)?.rdev();
        let (major, minor) = (libc::major(rdev), libc::minor(rdev));
        let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
        let read = |rel: &str| {
            std::fs::read_to_string(sys.join(rel))
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        };
        let key = read("dm/uuid")
            .map(|u| format!("dm-uuid:{u}"))
            .unwrap_or_else(|| resolved.display().to_string());
        Ok(DeviceKey {
            key,
            resolved,
            rdev: format!("{major}:{minor}"),
            size,
            loop_backing: read("loop/backing_file"),
        })
    }
}

impl Identity {
    /// The identity of the file `meta` describes.
    pub fn of_file(meta: &std::fs::Metadata) -> Self {
        Identity::File {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: meta
                .mtime()
                .saturating_mul(1_000_000_000)
                .saturating_add(meta.mtime_nsec()),
        }
    }

    /// The identity of the qcow2 replica file `meta` describes.
    pub fn of_image(meta: &std::fs::Metadata) -> Self {
        Identity::Image {
            dev: meta.dev(),
            ino: meta.ino(),
        }
    }

    /// The identity of what `path` holds now: `None` when nothing is there.
    pub fn of_path(path: &Path, device_size: u64) -> std::io::Result<Option<Self>> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        if meta.file_type().is_block_device() {
            Ok(Some(Identity::Device(DeviceKey::of(path, device_size)?)))
        } else {
            Ok(Some(Identity::of_file(&meta)))
        }
    }

    /// How `now` differs from this recorded identity, in a few words; `None` when it is the
    /// same replica, unchanged. While an apply is in progress (`settled` false) the replica's
    /// size and time change with blkdelta's own writes: only which file or device it is counts.
    pub fn changed(&self, now: &Identity, settled: bool) -> Option<String> {
        match (self, now) {
            (
                Identity::File {
                    dev,
                    ino,
                    size,
                    mtime_ns,
                },
                Identity::File {
                    dev: dev2,
                    ino: ino2,
                    size: size2,
                    mtime_ns: mtime2,
                },
            ) => {
                if (dev, ino) != (dev2, ino2) {
                    Some(format!(
                        "it is another file (inode {ino2}, was {ino}): replaced or moved"
                    ))
                } else if settled && size != size2 {
                    Some(format!("its size is {size2} bytes, was {size}"))
                } else if settled && mtime_ns != mtime2 {
                    Some("it was written to (its modification time changed)".into())
                } else {
                    None
                }
            }
            (Identity::Device(a), Identity::Device(b)) => {
                if a.key != b.key {
                    Some(format!("it is another device ({}, was {})", b.key, a.key))
                } else if a.loop_backing != b.loop_backing {
                    Some(format!(
                        "the loop device is attached to {}, was {}",
                        b.loop_backing.as_deref().unwrap_or("nothing"),
                        a.loop_backing.as_deref().unwrap_or("nothing")
                    ))
                } else if a.size != b.size {
                    Some(format!("the device holds {} bytes, was {}", b.size, a.size))
                } else {
                    None
                }
            }
            (Identity::Image { dev, ino }, Identity::Image { dev: d2, ino: i2 }) => ((dev, ino)
                != (d2, i2))
                .then(|| format!("it is another file (inode {i2}, was {ino}): replaced or moved")),
            (Identity::Image { .. }, _) => Some("it is no longer a qcow2 image".into()),
            (_, Identity::Image { .. }) => Some("it is a qcow2 image now".into()),
            (Identity::File { .. }, Identity::Device(_)) => {
                Some("it is a block device now, was a file".into())
            }
            (Identity::Device(_), Identity::File { .. }) => {
                Some("it is a file now, was a block device".into())
            }
        }
    }
}

/// The state file name of a block device: its key with every byte outside `[A-Za-z0-9.-]`
/// escaped as `_XX` (so `/dev/vg_a/lv` and `/dev/vg/a_lv` never share a name).
pub fn device_state_name(key: &str) -> String {
    let mut name = String::with_capacity(key.len() + 6);
    for b in key.trim_start_matches('/').bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            name.push(b as char);
        } else {
            name.push_str(&format!("_{b:02x}"));
        }
    }
    name.push_str(".state");
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_state_names_never_collide() {
        assert_ne!(
            device_state_name("/dev/vg_a/lv"),
            device_state_name("/dev/vg/a_lv")
        );
        assert_eq!(device_state_name("/dev/loop0"), "dev_2floop0.state");
        assert_eq!(
            device_state_name("dm-uuid:LVM-abc"),
            "dm-uuid_3aLVM-abc.state"
        );
    }

    #[test]
    fn a_file_changes_identity_when_replaced_resized_or_written() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let before = Identity::of_path(&p, 0).unwrap().unwrap();
        assert_eq!(before.changed(&before, true), None);
        // Written (a different time), then replaced by a same-size file.
        std::thread::sleep(std::time::Duration::from_millis(20));
        std::fs::write(&p, [1u8; 4096]).unwrap();
        let written = Identity::of_path(&p, 0).unwrap().unwrap();
        assert!(before.changed(&written, true).unwrap().contains("written"));
        assert_eq!(before.changed(&written, false), None);
        let other = dir.path().join("other.raw");
        std::fs::write(&other, [1u8; 4096]).unwrap();
        std::fs::rename(&other, &p).unwrap();
        let swapped = Identity::of_path(&p, 0).unwrap().unwrap();
        assert!(before
            .changed(&swapped, false)
            .unwrap()
            .contains("another file"));
        std::fs::remove_file(&p).unwrap();
        assert_eq!(Identity::of_path(&p, 0).unwrap(), None);
    }
}
