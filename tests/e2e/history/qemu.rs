//! What QEMU's own tools say of an image: `qemu-img check`, the snapshot table as
//! `qemu-img info` lists it, and raw exports of a snapshot.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::common::{export, run};

/// `qemu-img check IMG`: no error and no leak (a replica's writer promises both, a crash
/// included). Returns the report.
pub fn assert_clean(img: &Path, what: &str) -> String {
    let out = Command::new("qemu-img")
        .arg("check")
        .arg(img)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("No errors were found"),
        "{what}: qemu-img check {img:?} ({:?}):\n{text}",
        out.status.code()
    );
    assert!(
        !text.to_lowercase().contains("leak"),
        "{what}: qemu-img check {img:?} finds leaks:\n{text}"
    );
    text
}

/// `qemu-img info --output=json -U IMG`.
pub fn info(img: &Path) -> Value {
    let out = run(Command::new("qemu-img")
        .args(["info", "--output=json", "-U"])
        .arg(img));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The snapshot table as QEMU lists it, oldest first.
pub fn snapshots(img: &Path) -> Vec<Value> {
    info(img)["snapshots"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// The names `qemu-img snapshot -l` lists, oldest first.
pub fn snapshot_names(img: &Path) -> Vec<String> {
    snapshots(img)
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_string())
        .collect()
}

/// The image's cluster size.
pub fn cluster_size(img: &Path) -> u64 {
    info(img)["cluster-size"].as_u64().unwrap()
}

/// The image's format as QEMU probes it (`qcow2`, `raw`).
pub fn format(img: &Path) -> String {
    info(img)["format"].as_str().unwrap().to_string()
}

/// The image's virtual size.
pub fn virtual_size(img: &Path) -> u64 {
    info(img)["virtual-size"].as_u64().unwrap()
}

/// QEMU's raw export of snapshot `snap` at the snapshot's own size: a copy of the image
/// reverted to it (`qemu-img snapshot -a`, which resizes), exported. `convert -l` exports
/// every snapshot at the active layer's size, which hides the tail of a shrunk image.
pub fn export_reverted(img: &Path, snap: &str, out: &Path) {
    let copy = out.with_extension("reverted.qcow2");
    std::fs::copy(img, &copy).unwrap();
    run(Command::new("qemu-img")
        .args(["snapshot", "-a", snap])
        .arg(&copy));
    export(&copy, None, out);
    std::fs::remove_file(&copy).unwrap();
}

/// `qemu-img snapshot -a SNAP IMG`: QEMU reverts the active layer to a snapshot.
pub fn revert(img: &Path, snap: &str) {
    run(Command::new("qemu-img")
        .args(["snapshot", "-a", snap])
        .arg(img));
}
