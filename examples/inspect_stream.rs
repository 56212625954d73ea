//! Summarises a stream file: its transitions and how many bytes each record kind carries,
//! verifying every checksum: `cargo run --example inspect_stream -- STREAM`.

use std::fs::File;
use std::io::BufReader;

use blkdelta_common::stream::{Compression, Record, StreamReader};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: inspect_stream STREAM");
        std::process::exit(2);
    };
    let mut reader = StreamReader::new(BufReader::new(File::open(path)?))?;
    let h = reader.header().clone();
    println!(
        "source {} {}, virtual size {}",
        h.source.kind, h.source.name, h.virtual_size
    );
    for t in &h.transitions {
        let from = t.from.as_ref().map_or("(full)", |f| f.name.as_str());
        println!("transition {from} -> {}", t.to.name);
    }
    let (mut plain, mut stored, mut zstd, mut zeroed) = (0u64, 0u64, 0u64, 0u64);
    while let Some(rec) = reader.next_record()? {
        match &rec {
            Record::Data(d) => {
                d.plain(reader.record_position())?;
                plain += u64::from(d.len);
                stored += d.payload.len() as u64;
                zstd += u64::from(d.compression == Compression::Zstd);
            }
            Record::Zero { len, .. } | Record::Discard { len, .. } => zeroed += len,
            Record::Checkpoint(_) => {}
            Record::SnapshotInfo(i) => println!("snapshot {} (id {}) follows", i.name, i.id),
            Record::SnapshotEnd(e) => println!("reached {}", e.name),
            Record::End(e) => println!("end: {} records, stream hash verified", e.records),
        }
    }
    println!("data {plain} bytes stored as {stored} ({zstd} records zstd), {zeroed} bytes zeroed or discarded");
    Ok(())
}
