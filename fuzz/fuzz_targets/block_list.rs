//! Feeds arbitrary bytes to the block-list readers (`blkdelta checksum --blocks` output, read by
//! `send --against`: it comes over the link from the replica's host, so it is untrusted). The
//! streaming reader and the whole-list reader must agree: both refuse, or both give the same
//! size and hashes, and a list read back writes the same bytes (hex in lower case). Nothing may panic or allocate
//! beyond the list's line and entry limits.
#![no_main]

use blkdelta_common::blocklist::{BlockList, BlockListReader, BlockListWriter};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    let whole = BlockList::read(bytes);
    let streamed = BlockListReader::new(bytes).and_then(|mut r| {
        let size = r.size();
        let mut hashes = Vec::new();
        while let Some(h) = r.next_hash()? {
            hashes.push(h);
        }
        Ok((size, hashes))
    });
    match (whole, streamed) {
        (Ok(list), Ok((size, hashes))) => {
            assert_eq!(list.size(), size);
            let listed: Vec<[u8; 32]> = list.iter().collect();
            assert_eq!(listed, hashes);
            let mut w = BlockListWriter::new(Vec::new(), size).expect("a size it read");
            for h in &hashes {
                w.push(h).expect("as many hashes as blocks");
            }
            // Hex digits are read in either case and written in lower case.
            assert_eq!(
                w.finish().expect("complete"),
                bytes.to_ascii_lowercase(),
                "a list reads back as written"
            );
            let _ = list.digest();
        }
        (Err(_), Err(_)) => {}
        (whole, streamed) => panic!(
            "the readers disagree: whole {:?}, streamed {:?}",
            whole.map(|l| l.size()),
            streamed.map(|(s, _)| s)
        ),
    }
});
