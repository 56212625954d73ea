use super::*;
use crate::image::mem::MemImage;

fn naive_digest(bytes: &[u8]) -> [u8; 32] {
    let mut top = blake3::Hasher::new();
    top.update(&(bytes.len() as u64).to_le_bytes());
    for block in bytes.chunks(BLOCK_BYTES as usize) {
        top.update(blake3::hash(block).as_bytes());
    }
    *top.finalize().as_bytes()
}

#[test]
fn digest_matches_the_definition_with_holes_and_a_short_tail() {
    let size = 5 * BLOCK_BYTES + 1234;
    let mut img = MemImage::new(size, 4096);
    img.write(BLOCK_BYTES + 17, &[3u8; 9000]);
    img.write(size - 10, &[9u8; 10]);
    for threads in [1, 2, 7] {
        assert_eq!(
            image_digest(&img, threads).unwrap(),
            naive_digest(img.bytes())
        );
    }
}

#[test]
fn a_reused_buffer_never_leaks_an_earlier_block_into_the_holes_of_the_next() {
    // One thread, one buffer: a full block, then blocks with data between holes.
    let size = 4 * BLOCK_BYTES;
    let mut img = MemImage::new(size, 4096);
    img.write(0, &vec![0xee; BLOCK_BYTES as usize]);
    img.write(BLOCK_BYTES + 8192, &[1; 4096]);
    img.write(2 * BLOCK_BYTES, &[2; 4096]);
    img.write(3 * BLOCK_BYTES - 4096, &[3; 4096]);
    img.write(3 * BLOCK_BYTES + 4096, &[4; 100]);
    assert_eq!(image_digest(&img, 1).unwrap(), naive_digest(img.bytes()));
}

#[test]
fn holes_are_not_read() {
    let img = MemImage::new(3 * BLOCK_BYTES, 4096);
    img.fail_reads_at(BLOCK_BYTES + 5);
    assert_eq!(image_digest(&img, 2).unwrap(), naive_digest(img.bytes()));
}

#[test]
fn read_errors_surface() {
    let mut img = MemImage::new(3 * BLOCK_BYTES, 4096);
    img.write(BLOCK_BYTES, &[1; 10]);
    img.fail_reads_at(BLOCK_BYTES + 5);
    assert!(image_digest(&img, 2).is_err());
}

#[test]
fn empty_disk_has_a_digest() {
    let img = MemImage::new(0, 4096);
    assert_eq!(image_digest(&img, 1).unwrap(), naive_digest(&[]));
}

fn naive_hashes(bytes: &[u8]) -> Vec<[u8; 32]> {
    bytes
        .chunks(BLOCK_BYTES as usize)
        .map(|b| *blake3::hash(b).as_bytes())
        .collect()
}

/// A disk of `size` bytes holding `writes`, allocated in 4 KiB units.
fn image(size: u64, writes: &[(u64, &[u8])]) -> MemImage {
    let mut img = MemImage::new(size, 4096);
    for (offset, bytes) in writes {
        img.write(*offset, bytes);
    }
    img
}

/// Reports a MemImage's holes as explicitly zeroed ranges.
struct Zeroed(MemImage);

impl BlockSource for Zeroed {
    fn size(&self) -> u64 {
        self.0.size()
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        self.0.read_at(buf, offset)
    }
    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        let (a, n) = self.0.status(offset, max_len)?;
        Ok((
            if a == Allocation::Hole {
                Allocation::Zero
            } else {
                a
            },
            n,
        ))
    }
}

#[test]
fn long_hole_runs_with_data_in_the_middle_and_a_short_tail() {
    let b = BLOCK_BYTES;
    let size = 40 * b + 777;
    let cases = [
        image(size, &[]),
        image(size, &[(17 * b + 5, &[7; 100])]),
        image(size, &[(3 * b - 1, &[1; 2]), (39 * b, &[2; 4096])]),
        image(size, &[(size - 1, &[9])]),
        image(size, &[(0, &[5; 3 * BLOCK_BYTES as usize])]),
    ];
    for img in &cases {
        let want = naive_digest(img.bytes());
        for threads in [1, 3] {
            assert_eq!(image_digest(img, threads).unwrap(), want);
        }
    }
    for img in cases {
        let want = naive_digest(img.bytes());
        assert_eq!(image_digest(&Zeroed(img), 2).unwrap(), want);
    }
}

#[test]
fn block_hashes_calls_back_for_every_block_in_order() {
    let b = BLOCK_BYTES;
    let size = 30 * b + 100;
    let img = image(size, &[(b + 3, &[1; 10]), (20 * b, &[2; 5000])]);
    let mut got = Vec::new();
    block_hashes(&img, 2, &mut |i, h| {
        assert_eq!(i, got.len() as u64);
        got.push(*h);
        Ok(())
    })
    .unwrap();
    assert_eq!(got, naive_hashes(img.bytes()));
}

#[test]
fn block_hashes_stops_at_the_callbacks_error() {
    let img = image(10 * BLOCK_BYTES, &[(4 * BLOCK_BYTES, &[1; 10])]);
    let mut calls = 0;
    let err = block_hashes(&img, 2, &mut |i, _| {
        calls += 1;
        match i {
            3 => Err(ImageError::Cancelled),
            _ => Ok(()),
        }
    });
    assert!(matches!(err, Err(ImageError::Cancelled)));
    assert_eq!(calls, 4);
}

#[test]
fn a_whole_zero_disk_is_one_run() {
    let img = image(1000 * BLOCK_BYTES + 1, &[]);
    let mut runs = Vec::new();
    block_runs(&img, 2, &mut |r| {
        runs.push(r);
        Ok(())
    })
    .unwrap();
    let tail = *blake3::hash(&[0]).as_bytes();
    assert_eq!(
        runs,
        vec![
            BlockRun::Zeros {
                first: 0,
                count: 1000
            },
            BlockRun::Block {
                index: 1000,
                hash: tail
            },
        ]
    );
}

#[test]
fn pushing_zero_runs_equals_pushing_each_block() {
    let zero = *zero_block_hash();
    for before in [0u64, 1, 2047, 2048, 3000] {
        for count in [0u64, 1, 2047, 2048, 2049, 4096 + 5, 10_000] {
            let (mut fast, mut slow) = (DigestBuilder::new(7), DigestBuilder::new(7));
            for i in 0..before {
                let h = [i as u8; 32];
                fast.push(&h);
                slow.push(&h);
            }
            fast.push_zero_blocks(count);
            (0..count).for_each(|_| slow.push(&zero));
            fast.push(&[1; 32]);
            slow.push(&[1; 32]);
            assert_eq!(fast.blocks(), slow.blocks());
            assert_eq!(fast.finish(), slow.finish(), "{before} then {count}");
        }
    }
}
