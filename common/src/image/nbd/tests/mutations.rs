//! Valid transcripts with bytes flipped, cut, dropped or repeated: the client refuses or
//! accepts each without a panic, and what it accepts keeps its promises (extents within the
//! request, reads as long as asked). The fuzz target `nbd_client` does the same with
//! arbitrary bytes.

use super::super::client::NbdClient;
use super::super::wire::*;
use super::script::{Duplex, Script};
use crate::testing::Rng;

const SIZE: u64 = 64 << 10;

/// A session against a 64 KiB export: handshake with a dirty bitmap, the status of the whole
/// export, three reads.
fn transcript() -> Script {
    Script::new()
        .handshake(SIZE, &[(1, "base:allocation"), (2, "qemu:dirty-bitmap:b")])
        .status(
            1,
            1,
            &[(4096, 0), (4096, STATE_HOLE | STATE_ZERO), (57344, 0)],
            false,
        )
        .status(1, 2, &[(8192, 1), (57344, 0)], true)
        .data(2, 0, &[1; 512], false)
        .hole(2, 512, 512, true)
        .error(3, 5, "bad sector", false)
        .none(3)
        .data(4, 60000, &[9; 100], true)
}

/// Runs the session over `bytes`; panics only when an accepted reply breaks a promise.
fn exercise(bytes: Vec<u8>) {
    let Ok(mut c) = NbdClient::connect(Duplex::new(Script(bytes)), "drive0", Some("b")) else {
        return;
    };
    let size = c.export().size;
    if size == 0 {
        return;
    }
    let len = size.min(1 << 30) as u32;
    if let Ok(st) = c.block_status(0, len) {
        for list in [st.allocation, st.dirty].into_iter().flatten() {
            let mut at = 0;
            for e in list {
                assert_eq!(e.offset, at);
                assert!(e.len > 0);
                at += e.len;
            }
            assert!(at <= u64::from(len));
        }
    }
    let ranges: Vec<(u64, u32)> = [(0, 1024), (4096, 512), (60000, 100)]
        .into_iter()
        .filter(|&(o, l)| o + u64::from(l) <= size)
        .collect();
    if let Ok(data) = c.read_many(&ranges) {
        for (d, r) in data.iter().zip(&ranges) {
            assert_eq!(d.len(), r.1 as usize);
        }
    }
}

#[test]
fn the_valid_nbd_transcript_is_accepted() {
    let mut c = NbdClient::connect(Duplex::new(transcript()), "drive0", Some("b")).unwrap();
    let st = c.block_status(0, SIZE as u32).unwrap();
    assert_eq!(st.allocation.unwrap().len(), 3);
    assert!(c.read_many(&[(0, 1024)]).is_ok());
    assert!(c.read_many(&[(4096, 512)]).is_err(), "the server's EIO");
    assert_eq!(c.read_many(&[(60000, 100)]).unwrap(), vec![vec![9; 100]]);
}

#[test]
fn mutated_nbd_transcripts_never_panic() {
    let base = transcript().0;
    let mut rng = Rng(0x6e62_6400_1234_5678);
    for _ in 0..20_000 {
        let mut b = base.clone();
        for _ in 0..=rng.below(3) {
            mutate(&mut b, &mut rng);
        }
        exercise(b);
    }
}

/// One mutation: a flipped byte, a field set to an extreme, a cut, a dropped or a repeated
/// span.
fn mutate(b: &mut Vec<u8>, rng: &mut Rng) {
    if b.is_empty() {
        return;
    }
    let at = rng.below(b.len() as u64) as usize;
    match rng.below(6) {
        0 => b[at] ^= 1 << rng.below(8),
        1 => b[at] = [0, 0xff, 0x7f, 0x80][rng.below(4) as usize],
        2 => {
            let end = (at + 4).min(b.len());
            b[at..end].fill(0xff);
        }
        3 => b.truncate(at),
        4 => {
            let end = (at + 1 + rng.below(24) as usize).min(b.len());
            b.drain(at..end);
        }
        _ => {
            let end = (at + 1 + rng.below(24) as usize).min(b.len());
            let span = b[at..end].to_vec();
            b.splice(at..at, span);
        }
    }
}
