//! What the file-based fuzz targets share: a private scratch directory, and the check that keeps
//! an image's backing file inside it.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use blkdelta_common::image::qcow2::Qcow2Image;

/// A directory of this process (`blkdelta-fuzz-TARGET-PID`), on tmpfs when there is one,
/// made on first use. What a target writes there is all it holds, so a backing file name can
/// only resolve to one of those files (or to nothing).
pub fn dir(target: &str) -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let base = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let dir = base.join(format!("blkdelta-fuzz-{target}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz directory");
        dir
    })
}

/// Whether the image's backing file (if any) stays inside the private directory: a name
/// with a path separator could reach any file of the machine (a device, a FIFO).
#[allow(dead_code)]
pub fn backing_is_contained(image: &Qcow2Image) -> bool {
    match image.header().backing_file.as_deref() {
        None => true,
        Some(name) => !name.contains('/') && name != "." && name != "..",
    }
}
