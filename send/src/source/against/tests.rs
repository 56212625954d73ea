use super::*;

use blkdelta_common::blocklist::write_block_list;
use blkdelta_common::digest::image_digest;
use blkdelta_common::image::mem::MemImage;

use crate::source::{open_source_opts, FullSource, SourceOptions};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
        .collect()
}

fn list_of(img: &MemImage) -> BlockList {
    let (text, _) = write_block_list(img, 2, Vec::new()).unwrap();
    BlockList::read(&text[..]).unwrap()
}

/// The replica with `extents` applied, data read from `source`, as a receiver would do.
fn apply(replica: &MemImage, source: &MemImage, extents: &[Extent]) -> Vec<u8> {
    let mut r = replica.bytes().to_vec();
    r.resize(source.bytes().len(), 0);
    for e in extents {
        let range = e.offset as usize..e.end() as usize;
        match e.kind {
            ExtentKind::Data => r[range.clone()].copy_from_slice(&source.bytes()[range]),
            ExtentKind::Zero | ExtentKind::Discard => r[range].fill(0),
        }
    }
    r
}

/// An 8 MiB replica and a source grown to 10 MiB + 1000 bytes, block by block:
/// 0 same data · 1 a few bytes differ · 2 source hole over replica data · 3 both holes ·
/// 4 source allocated zeros over replica data · 5 source data over a replica hole · 6, 7 same
/// data · past 8 MiB (grown): a hole, then 4 KiB of data at 9 MiB, then a hole.
fn pair() -> (MemImage, MemImage) {
    let mut replica = MemImage::new(8 * MIB, 4 * KIB);
    let mut source = MemImage::new(10 * MIB + 1000, 4 * KIB);
    let same = data(MIB as usize, 1);
    for b in [0, 6, 7] {
        replica.write(b * MIB, &same);
        source.write(b * MIB, &same);
    }
    replica.write(MIB, &same);
    source.write(MIB, &same);
    source.write(MIB + 300 * KIB, b"changed");
    replica.write(2 * MIB, &data(8 * KIB as usize, 2));
    replica.write(4 * MIB, &data(MIB as usize, 3));
    source.write(4 * MIB, &vec![0; MIB as usize]);
    source.write(5 * MIB + 12 * KIB, &data(100, 4));
    source.write(9 * MIB, &data(4 * KIB as usize, 5));
    (replica, source)
}

#[test]
fn only_differing_blocks_and_the_grown_tail_are_sent() {
    let (replica, source) = pair();
    let mut got = Vec::new();
    let digest = repair(&source, &list_of(&replica), 2, &mut got).unwrap();
    assert_eq!(
        got,
        vec![
            Extent::new(MIB, MIB, ExtentKind::Data),
            Extent::new(2 * MIB, MIB, ExtentKind::Zero),
            Extent::new(4 * MIB, MIB, ExtentKind::Zero),
            Extent::new(5 * MIB, MIB, ExtentKind::Data),
            Extent::new(8 * MIB, MIB, ExtentKind::Discard),
            Extent::new(9 * MIB, 4 * KIB, ExtentKind::Data),
            Extent::new(9 * MIB + 4 * KIB, MIB - 4 * KIB + 1000, ExtentKind::Discard),
        ]
    );
    assert_eq!(apply(&replica, &source, &got), source.bytes());
    assert_eq!(digest, Some(image_digest(&source, 1).unwrap()));
}

#[test]
fn a_shrunk_source_sends_its_short_last_block() {
    let (replica, _) = pair();
    let mut source = MemImage::new(7 * MIB + 10, 4 * KIB);
    source.write(0, replica.bytes()[..7 * MIB as usize].as_ref());
    source.write(7 * MIB, &[1; 10]);
    let mut got = Vec::new();
    let digest = repair(&source, &list_of(&replica), 1, &mut got).unwrap();
    assert_eq!(got, vec![Extent::new(7 * MIB, 10, ExtentKind::Data)]);
    assert_eq!(apply(&replica, &source, &got), source.bytes());
    assert_eq!(digest, Some(image_digest(&source, 1).unwrap()));
}

#[test]
fn an_equal_replica_needs_nothing() {
    let (_, source) = pair();
    let mut got = Vec::new();
    repair(&source, &list_of(&source), 2, &mut got).unwrap();
    assert_eq!(got, vec![]);
}

fn against(source: MemImage, list: BlockList) -> Result<AgainstSource, SendError> {
    let info = SourceInfo {
        kind: "raw".into(),
        name: "src".into(),
    };
    let full = FullSource::new(Arc::new(source), info, crate::source::identity::named("to"));
    AgainstSource::new(Box::new(full), list, 2)
}

#[test]
fn the_transition_starts_at_the_lists_content_and_the_digest_follows_changes() {
    let (replica, source) = pair();
    let want = image_digest(&source, 1).unwrap();
    let list = list_of(&replica);
    let list_digest = image_digest(&replica, 1).unwrap();
    let src = against(source, list).unwrap();
    let t = &src.transitions()[0];
    assert_eq!(t.from, Some(content_state(&list_digest)));
    assert_eq!(t.from.as_ref().unwrap().guid[..], list_digest[..16]);
    assert!(t.from.as_ref().unwrap().name.starts_with("blocks:"));
    assert_eq!(t.to, crate::source::identity::named("to"));
    assert_eq!(t.virtual_size, 10 * MIB + 1000);
    assert_eq!(src.to_digest(0), None);
    let (mut first, mut second) = (Vec::new(), Vec::new());
    src.changes(0, &mut first).unwrap();
    assert_eq!(src.to_digest(0), Some(want));
    src.changes(0, &mut second).unwrap();
    assert_eq!(first, second);
    assert_eq!(first.len(), 7);
}

#[test]
fn only_a_full_source_can_be_repaired_from() {
    let (replica, source) = pair();
    let inner = against(source, list_of(&replica)).unwrap();
    let err = AgainstSource::new(Box::new(inner), list_of(&replica), 1).err();
    assert!(matches!(err, Some(SendError::Usage(_))), "{err:?}");
}

#[test]
fn open_reads_the_list_file_and_refuses_other_modes() {
    let dir = tempfile::tempdir().unwrap();
    let (replica, source) = pair();
    let raw = dir.path().join("disk.raw");
    std::fs::write(&raw, source.bytes()).unwrap();
    let blocks = dir.path().join("replica.blocks");
    std::fs::write(
        &blocks,
        write_block_list(&replica, 1, Vec::new()).unwrap().0,
    )
    .unwrap();
    let opts = SourceOptions {
        against: Some(blocks.clone()),
        ..SourceOptions::default()
    };
    let src = open_source_opts(raw.to_str().unwrap(), &opts).unwrap();
    let mut got = Vec::new();
    src.changes(0, &mut got).unwrap();
    // A raw file reports everything as data: the grown tail is one data extent.
    assert_eq!(
        got.last(),
        Some(&Extent::new(8 * MIB, 2 * MIB + 1000, ExtentKind::Data))
    );
    assert_eq!(src.to_digest(0), Some(image_digest(&source, 1).unwrap()));

    let both = SourceOptions {
        compare_old: Some(raw.clone()),
        ..opts.clone()
    };
    let err = open_source_opts(raw.to_str().unwrap(), &both).err();
    assert!(matches!(err, Some(SendError::Usage(_))), "{err:?}");

    std::fs::write(&blocks, "blkdelta-blocks 1 10 65536\n").unwrap();
    let err = open_source_opts(raw.to_str().unwrap(), &opts)
        .err()
        .unwrap();
    let msg = err.to_string();
    assert!(
        msg.contains("replica.blocks") && msg.contains("line 1"),
        "{msg}"
    );
}
