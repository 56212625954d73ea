use std::io::BufReader;

use super::*;
use crate::digest::{image_digest, zero_hash};
use crate::image::mem::MemImage;

const MIB: u64 = 1 << 20;

/// The list of a disk of `size` bytes whose blocks hash to `hashes`.
fn list_text(size: u64, hashes: &[[u8; 32]]) -> Vec<u8> {
    let mut w = BlockListWriter::new(Vec::new(), size).unwrap();
    for h in hashes {
        w.push(h).unwrap();
    }
    w.finish().unwrap()
}

/// A valid list: header, then three hash lines (blocks 0..3 of a 2 MiB + 10 bytes disk).
fn valid() -> String {
    let mut s = String::from("blkdelta-blocks 1 2097162 1048576\n"); // magic version size block
    s += &format!("{}\n", "ab".repeat(32)); // block 0
    s += &format!("{}\n", crate::digest::to_hex(zero_block_hash())); // block 1: zeros
    s += &format!("{}\n", "0F".repeat(32)); // block 2 (short): upper case is accepted
    s
}

fn rejection(text: &str) -> (u64, Malformed) {
    match BlockList::read(text.as_bytes()) {
        Err(BlockListError::Malformed { line, problem }) => (line, problem),
        other => panic!("{text:?} gave {other:?}"),
    }
}

#[test]
fn the_valid_list_reads() {
    let list = BlockList::read(valid().as_bytes()).unwrap();
    assert_eq!(list.size(), 2 * MIB + 10);
    let want = vec![[0xab; 32], *zero_block_hash(), [0x0f; 32]];
    assert_eq!(list.iter().collect::<Vec<_>>(), want);
}

#[test]
fn round_trip_through_several_buffer_sizes() {
    let zero = *zero_block_hash();
    let mut hashes = vec![zero; 5];
    hashes.extend([[1; 32], zero, [2; 32], zero, zero, [3; 32]]);
    hashes.push(zero_hash(5)); // a short last block of zeros is a plain hash
    let size = 11 * MIB + 5;
    let text = list_text(size, &hashes);
    for cap in [1, 7, 65, 4096] {
        let list = BlockList::read(BufReader::with_capacity(cap, &text[..])).unwrap();
        assert_eq!(list.iter().collect::<Vec<_>>(), hashes);
        let mut d = DigestBuilder::new(size);
        hashes.iter().for_each(|h| d.push(h));
        assert_eq!(list.digest(), d.finish());
    }
}

#[test]
fn an_empty_disk_has_a_header_only() {
    let text = list_text(0, &[]);
    assert_eq!(text, b"blkdelta-blocks 1 0 1048576\n");
    let list = BlockList::read(&text[..]).unwrap();
    assert_eq!(list.blocks(), 0);
    assert_eq!(list.digest(), DigestBuilder::new(0).finish());
}

#[test]
fn the_list_of_an_image_gives_its_digest() {
    let mut img = MemImage::new(20 * MIB + 3, 4096);
    img.write(3 * MIB + 7, &[5; 9000]);
    img.write(20 * MIB, &[1; 3]);
    let (text, digest) = write_block_list(&img, 2, Vec::new()).unwrap();
    assert_eq!(digest, image_digest(&img, 1).unwrap());
    let list = BlockList::read(&text[..]).unwrap();
    assert_eq!(list.digest(), digest);
    assert_eq!(list.iter().count(), 21);
}

#[test]
fn the_writer_checks_the_count() {
    let mut w = BlockListWriter::new(Vec::new(), MIB + 1).unwrap();
    w.push(&[0; 32]).unwrap();
    assert!(matches!(
        w.finish(),
        Err(BlockListError::Count {
            expected: 2,
            pushed: 1,
            ..
        })
    ));
    let mut w = BlockListWriter::new(Vec::new(), MIB).unwrap();
    w.push(&[0; 32]).unwrap();
    assert!(matches!(
        w.push(&[0; 32]),
        Err(BlockListError::Count { pushed: 2, .. })
    ));
}

#[test]
fn rejects_empty_input() {
    assert_eq!(rejection(""), (1, Malformed::Empty));
}

#[test]
fn rejects_a_bad_magic() {
    let text = valid().replacen("blkdelta-blocks", "blkdelta-block", 1);
    assert_eq!(rejection(&text), (1, Malformed::Header));
}

#[test]
fn rejects_a_header_with_a_field_missing() {
    let text = valid().replacen(" 1048576", "", 1);
    assert_eq!(rejection(&text), (1, Malformed::Header));
}

#[test]
fn rejects_another_version() {
    let text = valid().replacen(" 1 ", " 2 ", 1);
    assert_eq!(rejection(&text), (1, Malformed::Version("2".into())));
}

#[test]
fn rejects_a_size_that_is_not_a_number() {
    let text = valid().replacen("2097162", "+2097162", 1);
    assert_eq!(rejection(&text), (1, Malformed::Size("+2097162".into())));
    let text = valid().replacen("2097162", "99999999999999999999", 1);
    assert_eq!(
        rejection(&text).1,
        Malformed::Size("99999999999999999999".into())
    );
    // Fuzz find: a leading zero read back as another spelling of the same list.
    let text = valid().replacen("2097162", "002097162", 1);
    assert_eq!(rejection(&text), (1, Malformed::Size("002097162".into())));
    let text = valid().replacen(" 1048576", " 01048576", 1);
    assert_eq!(
        rejection(&text),
        (1, Malformed::BlockSize("01048576".into()))
    );
}

#[test]
fn rejects_a_size_past_the_limit() {
    let big = MAX_VIRTUAL_BYTES + 1;
    let text = valid().replacen("2097162", &big.to_string(), 1);
    assert_eq!(rejection(&text), (1, Malformed::SizeTooLarge(big)));
}

#[test]
fn rejects_another_block_size() {
    let text = valid().replacen("1048576", "65536", 1);
    assert_eq!(rejection(&text), (1, Malformed::BlockSize("65536".into())));
}

#[test]
fn rejects_a_long_header_without_reading_it_all() {
    let text = format!("blkdelta-blocks 1 {} 1048576\n", "1".repeat(1 << 20));
    assert_eq!(
        rejection(&text),
        (1, Malformed::TooLong(MAX_HEADER_LINE_BYTES))
    );
}

#[test]
fn rejects_bad_hex() {
    let text = valid().replacen("abab", "abxb", 1);
    assert_eq!(rejection(&text), (2, Malformed::Hash));
}

#[test]
fn rejects_a_short_hash_line() {
    let text = valid().replacen(&"0F".repeat(32), &"0F".repeat(31), 1);
    assert_eq!(rejection(&text), (4, Malformed::Hash));
}

#[test]
fn rejects_a_long_hash_line() {
    let text = valid().replacen("abab", "ababab", 1);
    assert_eq!(rejection(&text), (2, Malformed::TooLong(HASH_LINE_BYTES)));
}

#[test]
fn rejects_a_missing_last_newline() {
    let text = valid();
    assert_eq!(
        rejection(&text[..text.len() - 1]),
        (4, Malformed::NoNewline)
    );
}

#[test]
fn rejects_too_few_lines() {
    let text = valid();
    let cut = text.len() - HASH_LINE_BYTES;
    assert_eq!(
        rejection(&text[..cut]),
        (
            4,
            Malformed::TooFew {
                got: 2,
                expected: 3
            }
        )
    );
}

#[test]
fn rejects_too_many_lines() {
    let text = valid() + "\n";
    assert_eq!(rejection(&text), (5, Malformed::TooMany(3)));
}

#[test]
fn rejects_carriage_returns() {
    let text = valid().replace('\n', "\r\n");
    assert_eq!(rejection(&text), (1, Malformed::CarriageReturn));
}

#[test]
fn errors_are_one_line_and_name_the_line() {
    let err = BlockList::read(valid().replacen("abab", "abxb", 1).as_bytes()).unwrap_err();
    assert_eq!(
        err.to_string(),
        "block list line 2: not a block hash (64 hex digits)"
    );
}
