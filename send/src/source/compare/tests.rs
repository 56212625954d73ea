use super::*;

use blkdelta_common::image::mem::MemImage;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

fn data(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed | 1)
        .collect()
}

fn extents(old: &MemImage, new: &MemImage) -> Vec<Extent> {
    let mut v = Vec::new();
    compare(old, new, &mut v).unwrap();
    v
}

/// A replica of `old` with `extents` of `new` applied, as a receiver would do.
fn apply(old: &MemImage, new: &MemImage, extents: &[Extent]) -> Vec<u8> {
    let mut r = old.bytes().to_vec();
    r.resize(new.bytes().len(), 0);
    for e in extents {
        let range = e.offset as usize..e.end() as usize;
        match e.kind {
            ExtentKind::Data => r[range.clone()].copy_from_slice(&new.bytes()[range]),
            ExtentKind::Zero | ExtentKind::Discard => r[range].fill(0),
        }
    }
    r
}

#[test]
fn equal_images_have_no_changes() {
    let mut old = MemImage::new(8 * MIB, 4 * KIB);
    old.write(MIB, &data(300 * KIB as usize, 1));
    let mut new = MemImage::new(8 * MIB, 64 * KIB);
    new.write(MIB, &data(300 * KIB as usize, 1));
    assert_eq!(extents(&old, &new), vec![]);
}

#[test]
fn differing_blocks_are_data_and_holes_over_data_are_discards() {
    let mut old = MemImage::new(16 * MIB, 4 * KIB);
    old.write(0, &data(4 * MIB as usize, 1));
    old.write(10 * MIB, &data(MIB as usize, 2));
    let mut new = MemImage::new(16 * MIB, 4 * KIB);
    new.write(0, &data(4 * MIB as usize, 1));
    new.write(100 * KIB, b"changed"); // inside block 1 (64..128 KiB)
    new.write(3 * MIB - 10, &[9; 20]); // straddles blocks 47 and 48
    new.write(12 * MIB, &data(8 * KIB as usize, 3)); // data over OLD's hole
    new.write(13 * MIB, &[0; 4096]); // allocated zeros over a hole: unchanged
                                     // 10..11 MiB: OLD data, NEW hole.
    let got = extents(&old, &new);
    assert_eq!(
        got,
        vec![
            Extent::new(64 * KIB, 64 * KIB, ExtentKind::Data),
            Extent::new(3 * MIB - 64 * KIB, 128 * KIB, ExtentKind::Data),
            Extent::new(10 * MIB, MIB, ExtentKind::Discard),
            Extent::new(12 * MIB, 8 * KIB, ExtentKind::Data),
        ]
    );
    assert_eq!(apply(&old, &new, &got), new.bytes());
}

#[test]
fn a_larger_new_sends_its_tail_and_a_smaller_one_nothing_past_its_end() {
    let mut old = MemImage::new(4 * MIB, 4 * KIB);
    old.write(0, &data(4 * MIB as usize, 1));
    let mut new = MemImage::new(6 * MIB, 4 * KIB);
    new.write(0, &data(4 * MIB as usize, 1));
    new.write(5 * MIB, &data(4 * KIB as usize, 2));
    let got = extents(&old, &new);
    assert_eq!(
        got,
        vec![
            Extent::new(4 * MIB, MIB, ExtentKind::Discard),
            Extent::new(5 * MIB, 4 * KIB, ExtentKind::Data),
            Extent::new(5 * MIB + 4 * KIB, MIB - 4 * KIB, ExtentKind::Discard),
        ]
    );
    assert_eq!(apply(&old, &new, &got), new.bytes());

    let mut small = MemImage::new(3 * MIB + 512, 512);
    small.write(0, &data(3 * MIB as usize + 512, 1));
    small.write(3 * MIB, &[7; 512]);
    let got = extents(&old, &small);
    assert_eq!(got, vec![Extent::new(3 * MIB, 512, ExtentKind::Data)]);
    assert_eq!(apply(&old, &small, &got), small.bytes());
}

#[test]
fn many_windows_stay_in_order() {
    // More windows than are in flight, with changes and holes spread through them.
    let size = 20 * MIB;
    let mut old = MemImage::new(size, 64 * KIB);
    let mut new = MemImage::new(size, 64 * KIB);
    for i in 0..20u64 {
        old.write(i * MIB, &data(MIB as usize, 1));
        if i % 3 != 0 {
            new.write(i * MIB, &data(MIB as usize, 1));
        }
        if i % 5 == 1 {
            new.write(i * MIB + 200 * KIB, &[i as u8 + 1; 10]);
        }
    }
    let got = extents(&old, &new);
    assert!(got.windows(2).all(|w| w[0].end() <= w[1].offset));
    assert_eq!(apply(&old, &new, &got), new.bytes());
}

#[test]
fn a_read_error_is_reported() {
    let mut old = MemImage::new(8 * MIB, 4 * KIB);
    old.write(0, &data(8 * MIB as usize, 1));
    let mut new = MemImage::new(8 * MIB, 4 * KIB);
    new.write(0, &data(8 * MIB as usize, 2));
    old.fail_reads_at(5 * MIB + 7);
    let err = compare(&old, &new, &mut Vec::new()).unwrap_err();
    assert!(
        matches!(err, SendError::Image(ImageError::Read { .. })),
        "{err}"
    );
}

#[test]
fn the_second_pass_replays_the_first() {
    let mut old = MemImage::new(4 * MIB, 4 * KIB);
    old.write(0, &data(2 * MIB as usize, 1));
    let mut new = MemImage::new(4 * MIB, 4 * KIB);
    new.write(0, &data(2 * MIB as usize, 2));
    let new = Arc::new(new);
    let info = SourceInfo {
        kind: "raw".into(),
        name: "new".into(),
    };
    let t = Transition {
        from: Some(identity::named("a")),
        to: identity::named("b"),
        virtual_size: new.size(),
    };
    let src = CompareSource::new(Arc::new(old), new.clone(), info, t);
    let (mut first, mut second) = (Vec::new(), Vec::new());
    src.changes(0, &mut first).unwrap();
    // Whatever the images hold now, the stream carries what the totals counted.
    new.fail_reads_at(0);
    src.changes(0, &mut second).unwrap();
    assert_eq!(first, vec![Extent::new(0, 2 * MIB, ExtentKind::Data)]);
    assert_eq!(first, second);
}
