//! Feeds arbitrary bytes to the change-map parser (`send --changed-blocks MAP`): thin_delta
//! XML (plain and `--verbose`), era_invalidate XML and `OFFSET LENGTH` lines.
//!
//! The first byte of an input picks the device size (low 4 bits) and the era block size
//! (high 4 bits; a quarter of the choices give none); the rest is the map. Each map is read
//! twice:
//!
//! - by the parser itself, through its hidden entry point
//!   `blkdelta_send::source::changemap::fuzz_parse(bytes, options)`. An accepted map is checked against
//!   what the parser promises: ranges non-empty, sorted, apart, merged, within the device; an
//!   era_invalidate map only with an era block size; a lines map gives the ranges a simple
//!   model of its lines gives; and the ranges, written back as lines and as XML, read back
//!   the same. A refused map gives a bounded message.
//! - as `send --changed-blocks` reads it, through `open_source_opts` on a sparse raw file of
//!   the device's size. It must accept exactly the maps the parser accepts (and the era block
//!   size `open` accepts), and push every listed byte as a discard: the device is all holes.
#![no_main]

mod scratch;

use std::fmt::Write as _;

use blkdelta_common::extent::{Extent, ExtentKind};
use blkdelta_send::source::changemap::{
    fuzz_parse, ChangeMap, MapError, MapFormat, MapKind, MapOptions, MapRange,
};
use blkdelta_send::source::{open_source_opts, SourceOptions};
use libfuzzer_sys::fuzz_target;

/// Device sizes, picked by the low 4 bits of the first byte.
const DEVICE_BYTES: [u64; 16] = [
    0,
    1,
    511,
    512,
    4096,
    (64 << 10) - 1,
    64 << 10,
    (1 << 20) + 512,
    64 << 20,
    (1 << 30) + 1,
    1 << 40,
    1 << 56,
    i64::MAX as u64,
    (1 << 63) + 4096,
    u64::MAX - 1,
    u64::MAX,
];

/// Era block sizes, picked by the high 4 bits of the first byte. The parser takes any; `open`
/// refuses those that are not a non-zero multiple of 512 before it reads the map.
const ERA_BLOCK_BYTES: [Option<u64>; 16] = [
    None,
    None,
    None,
    None,
    Some(0),
    Some(1),
    Some(512),
    Some(1000),
    Some(4096),
    Some(64 << 10),
    Some(3 * 512),
    Some(1 << 20),
    Some(1 << 30),
    Some(1 << 40),
    Some(1 << 63),
    Some(u64::MAX - 511),
];

/// A refusal's message is one line for a person to read. Some quote a whole tag name or
/// attribute name (up to the XML reader's 64 KiB tag limit); anything near this is a bug.
const MAX_MESSAGE_BYTES: usize = 256 << 10;

/// Largest device the public path is tried on: a file length is an `off_t`.
const MAX_FILE_BYTES: u64 = i64::MAX as u64;

fn parse_bytes(
    map: &[u8],
    device_bytes: u64,
    era_block_bytes: Option<u64>,
) -> Result<ChangeMap, MapError> {
    let opts = MapOptions {
        device_bytes,
        era_block_bytes,
    };
    fuzz_parse(map, &opts)
}

/// What the parser promises of the ranges of an accepted map.
fn check_ranges(ranges: &[MapRange], device_bytes: u64) {
    for r in ranges {
        assert!(r.len > 0, "empty range {r:?}");
        let end = r.offset.checked_add(r.len).expect("range end overflows");
        assert!(
            end <= device_bytes,
            "{r:?} ends past the device ({device_bytes})"
        );
    }
    for w in ranges.windows(2) {
        let (a, b) = (w[0], w[1]);
        assert!(
            a.end() <= b.offset,
            "{a:?} and {b:?} overlap or are out of order"
        );
        assert!(
            a.kind != b.kind || a.end() < b.offset,
            "{a:?} and {b:?} touch and are not merged"
        );
    }
}

/// The input without a byte-order mark and leading whitespace, as the parser skips them.
fn content(map: &[u8]) -> &[u8] {
    let map = map.strip_prefix(b"\xef\xbb\xbf").unwrap_or(map);
    let start = map
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(map.len());
    &map[start..]
}

/// A decimal number, or a hexadecimal one after `0x`: what the lines format allows.
fn model_number(s: &str) -> u64 {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16).expect("an accepted hex number"),
        None => s.parse().expect("an accepted decimal number"),
    }
}

/// The ranges an accepted lines map lists, clipped to the device, sorted and merged.
fn lines_model(map: &[u8], device_bytes: u64) -> Vec<(u64, u64)> {
    let text = std::str::from_utf8(content(map)).expect("an accepted lines map is text");
    let mut spans = Vec::new();
    for line in text.split('\n') {
        let fields: Vec<&str> = line
            .split('#')
            .next()
            .unwrap_or("")
            .split_whitespace()
            .collect();
        if let [offset, len] = fields[..] {
            let offset = model_number(offset);
            let end = offset + model_number(len);
            spans.push((offset, end.min(device_bytes)));
        }
    }
    merge(spans)
}

/// Sorts `(start, end)` spans and merges those that overlap or touch.
fn merge(mut spans: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    spans.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(spans.len());
    for (start, end) in spans {
        match out.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => out.push((start, end)),
        }
    }
    out
}

fn changed_only(ranges: &[MapRange]) -> Vec<MapRange> {
    ranges
        .iter()
        .copied()
        .filter(|r| r.kind == MapKind::Changed)
        .collect()
}

/// The changed ranges written as lines read back as themselves.
fn check_lines_round_trip(map: &ChangeMap, device_bytes: u64) {
    let mut text = String::from("# written back\n");
    for r in changed_only(&map.ranges) {
        writeln!(text, "{} {:#x}", r.offset, r.len).unwrap();
    }
    let again =
        parse_bytes(text.as_bytes(), device_bytes, None).expect("written lines are accepted");
    assert_eq!(again.format, MapFormat::Lines);
    assert_eq!(
        again.ranges,
        changed_only(&map.ranges),
        "lines round trip of {text:?}"
    );
}

/// Blocks `[begin, end)` of `unit` bytes covering `r`, when `r` starts on a block and ends on
/// one or at the end of the device (a partial last block).
fn blocks(r: &MapRange, unit: u64, device_bytes: u64) -> Option<(u64, u64)> {
    let aligned =
        r.offset.is_multiple_of(unit) && (r.end().is_multiple_of(unit) || r.end() == device_bytes);
    let end = r.end().div_ceil(unit);
    // A last block past 2^64 bytes cannot be written in blocks.
    (aligned && end.checked_mul(unit).is_some()).then_some((r.offset / unit, end))
}

/// All ranges written as thin_delta XML of 512-byte blocks read back as themselves.
fn check_thin_round_trip(map: &ChangeMap, device_bytes: u64) {
    let mut xml = String::from(
        "<superblock uuid=\"\" time=\"0\" transaction=\"1\" data_block_size=\"1\" nr_data_blocks=\"0\">\n  <diff left=\"1\" right=\"2\">\n",
    );
    for r in &map.ranges {
        let Some((begin, end)) = blocks(r, 512, device_bytes) else {
            return;
        };
        let name = match r.kind {
            MapKind::Changed => "different",
            MapKind::Discarded => "left_only",
        };
        writeln!(
            xml,
            "    <{name} begin=\"{begin}\" length=\"{}\"/>",
            end - begin
        )
        .unwrap();
    }
    xml.push_str("  </diff>\n</superblock>\n");
    let again = parse_bytes(xml.as_bytes(), device_bytes, None).expect("written XML is accepted");
    assert_eq!(again.format, MapFormat::ThinDelta);
    assert_eq!(again.ranges, map.ranges, "thin_delta round trip of {xml:?}");
}

/// The changed ranges written as era_invalidate XML of `era` bytes read back as themselves.
fn check_era_round_trip(map: &ChangeMap, device_bytes: u64, era: u64) {
    let mut xml = String::from("<blocks>\n");
    for r in changed_only(&map.ranges) {
        let Some((begin, end)) = blocks(&r, era, device_bytes) else {
            return;
        };
        match end - begin {
            1 => writeln!(xml, "  <block block=\"{begin}\"/>").unwrap(),
            _ => writeln!(xml, "  <range begin=\"{begin}\" end=\"{end}\"/>").unwrap(),
        }
    }
    xml.push_str("</blocks>\n");
    let again =
        parse_bytes(xml.as_bytes(), device_bytes, Some(era)).expect("written era XML is accepted");
    assert_eq!(again.format, MapFormat::EraInvalidate);
    assert_eq!(
        again.ranges,
        changed_only(&map.ranges),
        "era round trip of {xml:?}"
    );
}

fn check_accepted(map: &ChangeMap, input: &[u8], device_bytes: u64, era: Option<u64>) {
    check_ranges(&map.ranges, device_bytes);
    let is_xml = content(input).first() == Some(&b'<');
    match map.format {
        MapFormat::Lines => {
            assert!(!is_xml, "an XML document read as lines");
            let got: Vec<(u64, u64)> = map.ranges.iter().map(|r| (r.offset, r.end())).collect();
            assert_eq!(
                got,
                lines_model(input, device_bytes),
                "lines differ from the model"
            );
            assert!(map.ranges.iter().all(|r| r.kind == MapKind::Changed));
        }
        MapFormat::ThinDelta => assert!(is_xml, "lines read as XML"),
        MapFormat::EraInvalidate => {
            assert!(is_xml, "lines read as XML");
            assert!(era.is_some(), "an era map read without an era block size");
            assert!(map.ranges.iter().all(|r| r.kind == MapKind::Changed));
        }
    }
    check_lines_round_trip(map, device_bytes);
    check_thin_round_trip(map, device_bytes);
    if let Some(era) = era.filter(|&e| e > 0) {
        check_era_round_trip(map, device_bytes, era);
    }
}

fn check_refused(err: &MapError, era: Option<u64>) {
    let message = err.to_string();
    assert!(!message.is_empty(), "an empty message for {err:?}");
    assert!(
        message.len() <= MAX_MESSAGE_BYTES,
        "a message of {} bytes",
        message.len()
    );
    if let MapError::Usage(_) = err {
        assert!(
            era.is_none(),
            "a usage error with an era block size: {message}"
        );
    }
    assert!(
        !matches!(err, MapError::Read(_)),
        "reading a slice failed: {err:?}"
    );
}

/// What `send --changed-blocks` does with the map; `direct` is the parser's answer.
fn check_send_path(
    map: &[u8],
    device_bytes: u64,
    era: Option<u64>,
    direct: &Result<ChangeMap, MapError>,
) {
    let dir = scratch::dir("map");
    let (map_path, device) = (dir.join("map"), dir.join("device"));
    std::fs::write(&map_path, map).expect("write the map");
    let file = std::fs::File::create(&device).expect("create the device");
    file.set_len(device_bytes).expect("size the device");
    drop(file);
    let opts = SourceOptions {
        changed_blocks: Some(map_path),
        era_block_bytes: era,
        from_name: Some("a".into()),
        to_name: Some("b".into()),
        ..SourceOptions::default()
    };
    let source = open_source_opts(device.to_str().expect("a UTF-8 path"), &opts);
    let era_fits = |m: &ChangeMap| match era {
        None => true,
        Some(e) => e > 0 && e.is_multiple_of(512) && m.format == MapFormat::EraInvalidate,
    };
    let expected = direct.as_ref().is_ok_and(era_fits);
    let source = match source {
        Ok(s) if expected => s,
        Err(_) if !expected => return,
        Ok(_) => panic!("send accepts a map the parser refuses: {direct:?}"),
        Err(e) => panic!("send refuses a map the parser accepts: {e}"),
    };
    let ranges = &direct.as_ref().expect("accepted").ranges;
    assert_eq!(source.transitions().len(), 1);
    assert_eq!(source.transitions()[0].virtual_size, device_bytes);
    let mut got: Vec<Extent> = Vec::new();
    source
        .changes(0, &mut got)
        .expect("changes of a sparse file");
    let spans = merge(ranges.iter().map(|r| (r.offset, r.end())).collect());
    let want: Vec<Extent> = spans
        .into_iter()
        .map(|(start, end)| Extent::new(start, end - start, ExtentKind::Discard))
        .collect();
    assert_eq!(got, want, "the extents send pushes");
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, map)) = data.split_first() else {
        return;
    };
    let device_bytes = DEVICE_BYTES[usize::from(pick & 0x0f)];
    let era = ERA_BLOCK_BYTES[usize::from(pick >> 4)];
    let direct = parse_bytes(map, device_bytes, era);
    match &direct {
        Ok(m) => check_accepted(m, map, device_bytes, era),
        Err(e) => check_refused(e, era),
    }
    if device_bytes <= MAX_FILE_BYTES {
        check_send_path(map, device_bytes, era, &direct);
    }
});
