//! What `send` says when SOURCE or an option names something wrongly, and how `--since`
//! finds BASE, through the library functions the CLI calls. Images are made with qemu-img.

use std::path::Path;
use std::process::Command;

use blkdelta_send::source::{open_source, open_source_opts, SourceOptions};
use blkdelta_send::SendError;

fn have_qemu_img() -> bool {
    blkdelta_common::testing::have("qemu-img")
}

fn qemu_img(dir: &Path, args: &[&str]) {
    let out = Command::new("qemu-img")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
}

fn error_of(r: Result<Box<dyn blkdelta_send::ChangeSource>, SendError>) -> SendError {
    r.err().expect("refused")
}

#[test]
fn a_mistyped_snapshot_lists_the_names_there_are() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "vm.qcow2", "1M"],
    );
    for snap in ["mon", "tue"] {
        qemu_img(dir.path(), &["snapshot", "-c", snap, "vm.qcow2"]);
    }
    let img = dir.path().join("vm.qcow2");
    let err = error_of(open_source(&format!("{}@mon..wed", img.display()))).to_string();
    assert!(
        err.contains("no snapshot named or numbered 'wed'") && err.contains("'mon', 'tue'"),
        "{err}"
    );
    qemu_img(
        dir.path(),
        &["create", "-q", "-f", "qcow2", "bare.qcow2", "1M"],
    );
    let bare = dir.path().join("bare.qcow2");
    let err = error_of(open_source(&format!("{}@mon", bare.display()))).to_string();
    assert!(err.contains("it has no snapshots"), "{err}");
}

#[test]
fn options_that_read_a_plain_image_refuse_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.raw");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let spec = format!("{}@a..b", img.display());
    let options = [
        (
            "--bitmap",
            SourceOptions {
                bitmap: Some("d".into()),
                ..Default::default()
            },
        ),
        (
            "--since",
            SourceOptions {
                since: Some(img.clone()),
                ..Default::default()
            },
        ),
        (
            "--changed-blocks",
            SourceOptions {
                changed_blocks: Some(img.clone()),
                ..Default::default()
            },
        ),
        (
            "--compare",
            SourceOptions {
                compare_old: Some(img.clone()),
                ..Default::default()
            },
        ),
    ];
    for (name, opts) in options {
        let err = error_of(open_source_opts(&spec, &opts));
        assert!(matches!(err, SendError::Usage(_)), "{name}: {err}");
        let err = err.to_string();
        assert!(
            err.contains(&format!("{name} takes a plain image")),
            "{err}"
        );
        assert!(err.contains("@snapshots"), "{err}");
    }
}

#[test]
fn since_resolves_base_as_the_chain_names_it() {
    if !have_qemu_img() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let images = dir.path().join("images");
    std::fs::create_dir(&images).unwrap();
    qemu_img(
        &images,
        &["create", "-q", "-f", "qcow2", "base.qcow2", "1M"],
    );
    let create_overlay = |name: &str, backing: &str| {
        let args = [
            "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing, name,
        ];
        qemu_img(&images, &args);
    };
    create_overlay("o1.qcow2", "base.qcow2");
    let absolute = images.join("o1.qcow2");
    create_overlay("o2.qcow2", absolute.to_str().unwrap());
    let top = images.join("o2.qcow2");
    // From the test's working directory, neither base.qcow2 nor o1.qcow2 exists as given.
    for base in ["base.qcow2", "o1.qcow2"] {
        assert!(!Path::new(base).exists());
        let opts = SourceOptions {
            since: Some(base.into()),
            ..Default::default()
        };
        let source = open_source_opts(top.to_str().unwrap(), &opts)
            .unwrap_or_else(|e| panic!("--since {base}: {e}"));
        let from = source.transitions()[0].from.as_ref().unwrap();
        assert_eq!(from.name, base);
    }
    let opts = SourceOptions {
        since: Some("missing.qcow2".into()),
        ..Default::default()
    };
    let err = error_of(open_source_opts(top.to_str().unwrap(), &opts)).to_string();
    assert!(
        err.contains("missing.qcow2") && err.contains("base.qcow2"),
        "{err}"
    );
}
