use std::time::Instant;

use blkdelta_common::digest::image_digest;
use blkdelta_common::image::mem::MemImage;
use blkdelta_common::image::Allocation;
use blkdelta_common::testing::Rng;
use blkdelta_common::ImageError;

use super::*;
use blkdelta_common::limits::MAX_VIRTUAL_BYTES;

const MIB: u64 = BLOCK_BYTES;
const PAGE: u64 = 4096;

/// A disk in memory whose pages can be holes, that grows, shrinks, and fails reads on demand.
fn page_disk(size: u64) -> MemImage {
    MemImage::new(size, PAGE)
}

/// A disk of any size whose every byte is data and every read fails: proves nothing is read.
struct Unreadable(u64);

impl BlockSource for Unreadable {
    fn size(&self) -> u64 {
        self.0
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        Err(ImageError::Read {
            offset,
            len: buf.len(),
            source: std::io::Error::other("this disk is never read"),
        })
    }
    fn status(&self, offset: u64, max_len: u64) -> Result<(Allocation, u64), ImageError> {
        Ok((Allocation::Data, max_len.min(self.0 - offset)))
    }
}

/// The hash of each block of the disk, the last one short when the disk is.
fn block_hashes(disk: &MemImage) -> Vec<[u8; 32]> {
    let blocks = disk.bytes().chunks(BLOCK_BYTES as usize);
    blocks.map(|b| *blake3::hash(b).as_bytes()).collect()
}

fn all_hashes(kept: &KeptHashes) -> Vec<[u8; 32]> {
    let mut got = Vec::new();
    kept.for_each(&mut |block, hash| {
        assert_eq!(block, got.len() as u64, "blocks come in order");
        got.push(*hash);
        Ok(())
    })
    .unwrap();
    got
}

fn assert_matches(kept: &KeptHashes, disk: &MemImage, what: &str) {
    assert_eq!(kept.size(), disk.size(), "{what}: size");
    assert_eq!(all_hashes(kept), block_hashes(disk), "{what}: block hashes");
    assert_eq!(
        kept.digest().unwrap(),
        image_digest(disk, 2).unwrap(),
        "{what}: digest"
    );
}

/// A random size of at most 7 MiB, often whole blocks, sometimes with a short last block.
fn random_size(rng: &mut Rng) -> u64 {
    let blocks = rng.below(7);
    match rng.below(3) {
        0 => blocks * MIB,
        1 => blocks * MIB + rng.below(MIB),
        _ => blocks * MIB + PAGE * rng.below(256),
    }
}

/// One random change to both the disk and the kept hashes, as a receiver makes them.
fn random_change(rng: &mut Rng, disk: &mut MemImage, kept: &mut KeptHashes) -> String {
    let size = disk.size();
    let blocks = size.div_ceil(MIB);
    let roll = rng.below(100);
    if blocks == 0 || roll >= 90 {
        let new = random_size(rng);
        disk.resize(new);
        kept.set_size(new).unwrap();
        return format!("resize {size} -> {new}");
    }
    let block = rng.below(blocks);
    let block_start = block * MIB;
    let block_len = MIB.min(size - block_start);
    let (offset, len) = match roll {
        // A whole aligned block, sometimes of zeros.
        0..=29 => (block_start, block_len),
        // Part of one block, as a record that does not fill its block.
        30..=54 => {
            let at = rng.below(block_len);
            (block_start + at, 1 + rng.below(block_len - at))
        }
        // Anywhere, across blocks: more than any record does.
        55..=59 => {
            let at = rng.below(size);
            (at, 1 + rng.below(3 * MIB))
        }
        // Zero or discard: short, or long and possibly past the end.
        60..=74 => {
            let at = rng.below(size);
            (at, 1 + rng.below(2 * PAGE))
        }
        _ => {
            let at = if rng.below(2) == 0 {
                block_start
            } else {
                rng.below(size)
            };
            let len = rng.below(5 * MIB) + 1;
            disk.zero(at, len);
            kept.zeroed(at, len);
            return format!("zero {at} +{len}");
        }
    };
    if roll >= 60 {
        disk.zero(offset, len);
        kept.zeroed(offset, len);
        return format!("zero {offset} +{len}");
    }
    let len = len.min(size - offset);
    let bytes = if rng.below(8) == 0 {
        vec![0; len as usize]
    } else {
        rng.bytes(len)
    };
    disk.write(offset, &bytes);
    kept.wrote(offset, &bytes);
    format!("write {offset} +{len}")
}

#[test]
fn random_writes_zeroings_and_resizes_keep_the_hashes_of_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    for seed in 1..=12u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let path = dir.path().join(format!("{seed}.hashes"));
        let mut disk = page_disk(random_size(&mut rng));
        let mut kept = KeptHashes::open_or_create(&path, disk.size()).unwrap();
        assert_matches(&kept, &disk, "new");
        let mut log = Vec::new();
        for _ in 0..120 {
            log.push(random_change(&mut rng, &mut disk, &mut kept));
            if rng.below(6) == 0 {
                kept.settle(&disk).unwrap();
                let what = format!("seed {seed} after {}", log.join(", "));
                assert_matches(&kept, &disk, &what);
            }
        }
        kept.settle(&disk).unwrap();
        kept.sync().unwrap();
        assert_matches(&kept, &disk, &format!("seed {seed} at the end"));
        let digest = kept.digest().unwrap();
        drop(kept);
        let reopened = KeptHashes::open(&path).unwrap();
        assert_eq!(reopened.digest().unwrap(), digest, "seed {seed} reopened");
        let read_only = KeptHashes::open_read_only(&path).unwrap();
        assert_matches(&read_only, &disk, &format!("seed {seed} read-only"));
    }
}

#[test]
fn open_or_create_keeps_an_existing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.hashes");
    let mut disk = page_disk(3 * MIB);
    let mut kept = KeptHashes::open_or_create(&path, disk.size()).unwrap();
    disk.write(MIB + 5, b"hello");
    kept.wrote(MIB + 5, b"hello");
    kept.settle(&disk).unwrap();
    drop(kept);
    let kept = KeptHashes::open_or_create(&path, 99).unwrap();
    assert_matches(&kept, &disk, "reopened");
}

#[test]
fn rebuild_reads_the_whole_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng(77);
    let mut disk = page_disk(9 * MIB + 12345);
    for _ in 0..20 {
        let at = rng.below(disk.size() - 9000);
        let len = 1 + rng.below(9000);
        let bytes = rng.bytes(len);
        disk.write(at, &bytes);
    }
    disk.write(4 * MIB, &vec![0; MIB as usize]);
    for threads in [0, 1, 3] {
        let path = dir.path().join(format!("{threads}.hashes"));
        let mut kept = KeptHashes::open_or_create(&path, disk.size()).unwrap();
        kept.wrote(0, &[7]);
        kept.rebuild(&disk, threads).unwrap();
        assert_eq!(kept.pending_updates(), 0, "rebuild supersedes updates");
        assert_matches(&kept, &disk, &format!("{threads} threads"));
    }
    let path = dir.path().join("small.hashes");
    let mut kept = KeptHashes::open_or_create(&path, disk.size() + 1).unwrap();
    assert!(
        kept.rebuild(&disk, 1).is_err(),
        "a disk too small is refused"
    );
}

#[test]
fn whole_blocks_and_long_zeroing_cost_no_read_and_little_space() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.hashes");
    let size = 1 << 40;
    let disk = Unreadable(size);
    let mut kept = KeptHashes::open_or_create(&path, size).unwrap();
    let allocated = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().blocks() * 512
    };
    assert!(allocated(&path) < (1 << 20), "a new file is sparse");
    let data = vec![0x5au8; MIB as usize];
    let hash = *blake3::hash(&data).as_bytes();
    for block in [0, 1, 500_000, (size / MIB) - 1] {
        kept.wrote(block * MIB, &data);
    }
    kept.settle(&disk).unwrap();
    let mut seen = Vec::new();
    kept.for_each(&mut |block, h| {
        if *h == hash {
            seen.push(block);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, [0, 1, 500_000, (size / MIB) - 1]);
    kept.zeroed(0, size);
    kept.wrote(3 * MIB, &data);
    kept.zeroed(10 * MIB, 30 * MIB);
    assert_eq!(kept.pending_updates(), 2, "one run and one block");
    kept.settle(&disk).unwrap();
    kept.sync().unwrap();
    assert!(allocated(&path) < (1 << 20), "zero runs punched out");
    let mut zeros = DigestBuilder::new(size);
    zeros.push_zero_blocks(3);
    zeros.push(&hash);
    zeros.push_zero_blocks(size / MIB - 4);
    assert_eq!(kept.digest().unwrap(), zeros.finish());
}

#[test]
fn a_failed_read_keeps_the_updates_for_the_next_settle() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.hashes");
    let mut disk = page_disk(4 * MIB);
    let mut kept = KeptHashes::open_or_create(&path, disk.size()).unwrap();
    disk.write(2 * MIB + 100, &[1; 100]);
    kept.wrote(2 * MIB + 100, &[1; 100]);
    disk.fail_every_read(true);
    let err = kept.settle(&disk).unwrap_err().to_string();
    assert!(err.contains("block 2") && err.contains("x.hashes"), "{err}");
    disk.fail_every_read(false);
    kept.settle(&disk).unwrap();
    assert_matches(&kept, &disk, "after the retry");
    assert!(kept.settle(&page_disk(MIB)).is_err(), "a smaller disk");
}

#[test]
fn shrink_and_grow_rehash_the_last_block() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.hashes");
    let mut disk = page_disk(3 * MIB);
    let mut kept = KeptHashes::open_or_create(&path, disk.size()).unwrap();
    let bytes = vec![5u8; MIB as usize];
    for block in 0..3 {
        disk.write(block * MIB, &bytes);
        kept.wrote(block * MIB, &bytes);
    }
    kept.settle(&disk).unwrap();
    for size in [
        2 * MIB + 777,
        2 * MIB + 5000,
        2 * MIB,
        4 * MIB + 1,
        MIB / 2,
        0,
        MIB,
    ] {
        disk.resize(size);
        kept.set_size(size).unwrap();
        kept.settle(&disk).unwrap();
        assert_matches(&kept, &disk, &format!("size {size}"));
        let reopened = KeptHashes::open(&path).unwrap();
        assert_matches(&reopened, &disk, &format!("size {size} reopened"));
    }
    assert!(kept.set_size(MAX_VIRTUAL_BYTES + 1).is_err());
}

#[test]
fn hashes_live_beside_the_state() {
    assert_eq!(
        hashes_path(Path::new("/srv/vm.raw.blkdelta")),
        Path::new("/srv/vm.raw.blkdelta.hashes")
    );
}

/// The header of a disk of 3 MiB + 1 byte, field by field.
fn valid_header() -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(b"BDHASH01"); // magic
    h.extend_from_slice(&1u32.to_le_bytes()); // version
    h.extend_from_slice(&(1u32 << 20).to_le_bytes()); // block bytes
    h.extend_from_slice(&(3 * MIB + 1).to_le_bytes()); // virtual size
    h.extend_from_slice(&GENERATION); // generation, as in the pieces file
    h.extend_from_slice(&[0; 24]); // reserved
    h
}

/// The generation of the files the damage test writes.
const GENERATION: [u8; 16] = [0x42; 16];

#[test]
fn the_header_is_as_documented() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.hashes");
    KeptHashes::create(&path, 3 * MIB + 1).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut want = valid_header();
    // A new pair of files gets a random generation.
    want[24..40].copy_from_slice(&bytes[24..40]);
    assert_eq!(bytes[..64], want[..]);
    let pieces = std::fs::read(crate::hashes::pieces_path(&path)).unwrap();
    assert_eq!(pieces[..8], *b"BDPIECE1");
    assert_eq!(
        pieces[8..24],
        bytes[24..40],
        "the pair shares its generation"
    );
    assert_eq!(bytes.len(), 64 + 4 * 32, "four zero entries");
    assert!(bytes[64..].iter().all(|&b| b == 0));
}

/// A change to the bytes of a hashes file.
type Damage = fn(&mut Vec<u8>);

#[test]
fn a_damaged_file_is_refused_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.hashes");
    let entries = vec![0u8; 4 * 32];
    let damaged: [(&str, Damage); 10] = [
        ("magic", |f| f[0] = b'X'),
        ("version", |f| f[8] = 2),
        ("block bytes", |f| f[13] = 0x20),
        ("size", |f| f[18] = 0x50),
        ("huge size", |f| f[23] = 0xff),
        ("reserved", |f| f[63] = 1),
        ("truncated header", |f| f.truncate(10)),
        ("missing entry", |f| f.truncate(f.len() - 32)),
        ("extra entry", |f| f.extend_from_slice(&[0; 32])),
        ("empty", |f| f.clear()),
    ];
    let mut good = valid_header();
    good.extend_from_slice(&entries);
    std::fs::write(&path, &good).unwrap();
    let mut pieces = b"BDPIECE1".to_vec();
    pieces.extend_from_slice(&GENERATION);
    pieces.resize(64 + 4 * 512, 0);
    std::fs::write(crate::hashes::pieces_path(&path), &pieces).unwrap();
    KeptHashes::open(&path).unwrap();
    for (what, damage) in damaged {
        let mut bytes = good.clone();
        damage(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        let err = KeptHashes::open(&path).unwrap_err();
        assert!(matches!(err, ReceiveError::State { .. }), "{what}: {err}");
        assert!(err.to_string().contains("x.hashes"), "{what}: {err}");
        assert!(
            KeptHashes::open_or_create(&path, 3 * MIB + 1).is_err(),
            "{what}"
        );
    }
    let missing = dir.path().join("missing.hashes");
    let err = KeptHashes::open(&missing).unwrap_err();
    assert!(err.to_string().contains("missing.hashes"), "{err}");
}

/// The digest of a 1 TiB disk whose 1 M entries all hold real hashes. Run with
/// `cargo test --release -p blkdelta-receive -- --ignored --nocapture digest_time`.
#[test]
#[ignore = "a measurement, not a check"]
fn digest_time_for_a_tebibyte() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tib.hashes");
    let size = 1u64 << 40;
    let kept = KeptHashes::open_or_create(&path, size).unwrap();
    let blocks = size / MIB;
    let mut piece = Vec::with_capacity(32 << 20);
    for block in 0..blocks {
        piece.extend_from_slice(blake3::hash(&block.to_le_bytes()).as_bytes());
    }
    kept.write_entries(0, &piece).unwrap();
    for round in 0..5 {
        let start = Instant::now();
        let digest = kept.digest().unwrap();
        let took = start.elapsed();
        println!("round {round}: digest of {blocks} blocks in {took:?} ({digest:02x?})");
    }
}

#[test]
fn zero_runs_merge_and_bound_the_updates() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.hashes");
    let mut kept = KeptHashes::open_or_create(&path, 100 * MIB).unwrap();
    kept.zeroed(10 * MIB, 10 * MIB);
    kept.zeroed(30 * MIB, 10 * MIB);
    kept.zeroed(20 * MIB, 10 * MIB);
    assert_eq!(kept.pending_updates(), 1, "adjacent runs merge");
    kept.wrote(15 * MIB, &vec![1; MIB as usize]);
    kept.zeroed(5 * MIB, 50 * MIB);
    assert_eq!(
        kept.pending_updates(),
        1,
        "a run swallows the blocks it covers"
    );
    kept.zeroed(60 * MIB + 1, MIB - 2);
    assert_eq!(kept.pending_updates(), 2, "a partial block is one more");
    kept.set_size(8 * MIB).unwrap();
    assert_eq!(
        kept.pending_updates(),
        1,
        "a shrink drops what is past the end"
    );
}

#[test]
fn a_block_written_in_whole_pieces_is_rehashed_without_reading_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.hashes");
    let size = 4 * MIB;
    let disk = Unreadable(size);
    let mut kept = KeptHashes::create(&path, size).unwrap();
    let mut block: Vec<u8> = (0..MIB as usize).map(|i| (i % 253) as u8).collect();
    kept.wrote(MIB, &block);
    kept.settle(&disk).unwrap();
    // Two 64 KiB clusters of the block written later, as an incremental writes them.
    let cluster = vec![0xc3u8; 64 << 10];
    for at in [128 << 10, 832 << 10] {
        block[at..at + cluster.len()].copy_from_slice(&cluster);
        kept.wrote(MIB + at as u64, &cluster);
    }
    kept.settle(&disk).unwrap();
    drop(kept);
    let kept = KeptHashes::open(&path).unwrap();
    assert_eq!(
        kept.entries(1, 1).unwrap()[0],
        *blake3::hash(&block).as_bytes()
    );
}

#[test]
fn a_whole_block_is_hashed_once_for_its_record_and_its_kept_hash() {
    let data = Rng(7).bytes(MIB);
    // A whole block at a block's start: the pieces come with the hash, and the hash is blake3's.
    let (hash, cvs) = hash_block_write(2 * MIB, &data);
    assert_eq!(hash, *blake3::hash(&data).as_bytes());
    let cvs = cvs.expect("a whole block gets its pieces");
    assert_eq!(*cvs, pieces::block_cvs(&data));
    // Anything else gets blake3 alone.
    for (offset, len) in [(2 * MIB + 4096, MIB - 4096), (2 * MIB, MIB / 2), (0, 4096)] {
        let part = &data[..len as usize];
        assert_eq!(
            hash_block_write(offset, part),
            (*blake3::hash(part).as_bytes(), None)
        );
    }
    // The kept hashes take the pieces as given: the bytes are not hashed again. Pieces of
    // other bytes prove it, and the entry is theirs.
    let dir = tempfile::tempdir().unwrap();
    let mut kept = KeptHashes::open_or_create(&dir.path().join("h"), 4 * MIB).unwrap();
    let other = vec![0x11u8; MIB as usize];
    kept.wrote_hashed(2 * MIB, &data, Some(&pieces::block_cvs(&other)));
    kept.settle(&Unreadable(4 * MIB)).unwrap();
    assert_eq!(
        kept.entries(2, 1).unwrap()[0],
        *blake3::hash(&other).as_bytes()
    );
    // Pieces given for a range that is not a whole block are not used.
    let mut disk = page_disk(4 * MIB);
    disk.write(MIB, &data[..4096]);
    kept.wrote_hashed(MIB, &data[..4096], Some(&pieces::block_cvs(&other)));
    kept.settle(&disk).unwrap();
    let mut want = vec![0u8; MIB as usize];
    want[..4096].copy_from_slice(&data[..4096]);
    assert_eq!(
        kept.entries(1, 1).unwrap()[0],
        *blake3::hash(&want).as_bytes()
    );
}
