//! Feeds arbitrary bytes to the NBD client as what a server sends: the handshake, then the
//! replies of the transmission phase (`blkdelta send nbd://…` reads an export whose server
//! may be anyone's, so its bytes are untrusted).
//!
//! The first byte picks whether the dirty bitmap context `qemu:dirty-bitmap:b` is asked for
//! (bit 0) and how many reads follow the block status walk (bits 1-3); the rest is the
//! server's side of the session, played through an in-memory duplex (what the client writes
//! is dropped). After a successful handshake the client walks the block status of the export
//! (at most 16 requests of up to 1 GiB) and reads up to 8 ranges. Nothing may panic or hang,
//! and nothing is allocated beyond the client's limits; what the client accepts keeps its
//! promises: extents consecutive from the request's offset, none empty, none past the
//! request; reads exactly as long as asked.
#![no_main]

use std::io::{Cursor, Read, Write};

use blkdelta_common::image::nbd::NbdClient;
use libfuzzer_sys::fuzz_target;

/// The server's bytes to read; the client's writes go nowhere.
struct Duplex<'a>(Cursor<&'a [u8]>);

impl Read for Duplex<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

impl Write for Duplex<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Offsets and lengths of the reads, scaled into the export.
const READS: [(u64, u32); 8] = [
    (0, 512),
    (4096, 4096),
    (1 << 20, 1 << 16),
    (12345, 777),
    (0, 1),
    (1 << 30, 512),
    (u64::MAX / 2, 4096),
    (511, 1025),
];

fuzz_target!(|bytes: &[u8]| {
    let Some((&pick, server)) = bytes.split_first() else {
        return;
    };
    let bitmap = (pick & 1 == 1).then_some("b");
    let Ok(mut c) = NbdClient::connect(Duplex(Cursor::new(server)), "drive0", bitmap) else {
        return;
    };
    let export = *c.export();
    if export.size == 0 {
        return;
    }
    let mut at = 0u64;
    for _ in 0..16 {
        if at >= export.size {
            break;
        }
        let len = (export.size - at).min(1 << 30) as u32;
        let Ok(st) = c.block_status(at, len) else {
            break;
        };
        let mut reached = at;
        for list in [st.allocation, st.dirty].into_iter().flatten() {
            let mut pos = at;
            for e in &list {
                assert_eq!(e.offset, pos, "extents are consecutive");
                assert!(e.len > 0, "no extent is empty");
                pos += e.len;
            }
            assert!(pos <= at + u64::from(len), "extents stay within the request");
            assert!(!list.is_empty(), "a status chunk has an extent");
            reached = reached.max(pos);
        }
        if reached == at {
            break;
        }
        at = reached;
    }
    let reads: Vec<(u64, u32)> = READS[..usize::from((pick >> 1) & 7)]
        .iter()
        .map(|&(o, l)| (o % export.size, l))
        .filter(|&(o, l)| o + u64::from(l) <= export.size && l <= export.block.max)
        .collect();
    if let Ok(data) = c.read_many(&reads) {
        assert_eq!(data.len(), reads.len());
        for (d, r) in data.iter().zip(&reads) {
            assert_eq!(d.len(), r.1 as usize, "a read is as long as asked");
        }
    }
});
