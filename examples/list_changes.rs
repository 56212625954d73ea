//! Lists the extents that changed between two internal snapshots of a qcow2 image, from
//! metadata alone: `cargo run --example list_changes -- IMAGE.qcow2 FROM TO`.

use std::path::Path;

use blkdelta_common::extent::{Extent, ExtentKind};
use blkdelta_send::source::{Qcow2Snapshots, SnapshotSpec};
use blkdelta_send::ChangeSource;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [image, from, to] = args.as_slice() else {
        eprintln!("usage: list_changes IMAGE.qcow2 FROM TO");
        std::process::exit(2);
    };
    let spec = SnapshotSpec::Range {
        from: from.clone(),
        to: to.clone(),
    };
    let source = Qcow2Snapshots::open(Path::new(image), &spec)?;
    for (i, t) in source.transitions().iter().enumerate() {
        let from = t.from.as_ref().map_or("-", |f| f.name.as_str());
        println!("# {from} -> {}", t.to.name);
        let mut extents: Vec<Extent> = Vec::new();
        source.changes(i, &mut extents)?;
        for e in extents {
            let kind = match e.kind {
                ExtentKind::Data => "data",
                ExtentKind::Zero => "zero",
                ExtentKind::Discard => "discard",
            };
            println!("{:>14} {:>12} {kind}", e.offset, e.len);
        }
    }
    Ok(())
}
