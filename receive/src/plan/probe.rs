//! What the target path holds, looked at before anything is opened for writing.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use crate::identity::Identity;
use crate::ReceiveError;

/// What the target path holds, looked at without opening it for writing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetProbe {
    /// Whether the path exists.
    pub exists: bool,
    /// Whether it is a block device.
    pub is_block_device: bool,
    /// Its size in bytes (0 when missing).
    pub size: u64,
    /// What it is (`None` when missing).
    pub identity: Option<Identity>,
}

impl TargetProbe {
    /// Looks at `path`.
    pub fn of(path: &Path) -> Result<Self, ReceiveError> {
        let open_err = |source: std::io::Error| ReceiveError::OpenTarget {
            path: path.to_path_buf(),
            source,
        };
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(TargetProbe {
                    exists: false,
                    is_block_device: false,
                    size: 0,
                    identity: None,
                })
            }
            Err(source) => return Err(open_err(source)),
        };
        if meta.is_dir() {
            return Err(open_err(std::io::Error::new(
                std::io::ErrorKind::IsADirectory,
                "it is a directory",
            )));
        }
        let is_block_device = meta.file_type().is_block_device();
        let size = if is_block_device {
            let f = std::fs::File::open(path).map_err(open_err)?;
            rustix::fs::seek(&f, rustix::fs::SeekFrom::End(0)).map_err(|e| open_err(e.into()))?
        } else {
            meta.len()
        };
        let identity = Identity::of_path(path, size).map_err(open_err)?;
        Ok(TargetProbe {
            exists: true,
            is_block_device,
            size,
            identity,
        })
    }

    /// Whether the target reads as zeros everywhere: a missing or empty file.
    pub fn is_empty(&self) -> bool {
        !self.exists || (!self.is_block_device && self.size == 0)
    }
}
