use super::super::map::MapRange;
use super::*;

const MIB: u64 = 1 << 20;
/// thin_delta's default data block: 128 sectors of 512 bytes.
const THIN_BLOCK: u64 = 64 << 10;

fn opts(device_bytes: u64) -> MapOptions {
    MapOptions {
        device_bytes,
        era_block_bytes: None,
    }
}

fn parse_str(map: &str, opts: &MapOptions) -> Result<ChangeMap, MapError> {
    parse(map.as_bytes(), opts)
}

fn changed(offset: u64, len: u64) -> MapRange {
    MapRange {
        offset,
        len,
        kind: MapKind::Changed,
    }
}

fn discarded(offset: u64, len: u64) -> MapRange {
    MapRange {
        offset,
        len,
        kind: MapKind::Discarded,
    }
}

/// The line and reason of an `Invalid` error.
fn rejection(map: &str, opts: &MapOptions) -> (u64, String) {
    match parse_str(map, opts) {
        Err(MapError::Invalid { line, reason }) => (line, reason),
        other => panic!("expected a rejection of {map:?}, got {other:?}"),
    }
}

/// thin_delta's output as it prints it (superblock, diff, one element per run).
const THIN: &str = r#"<superblock uuid="" time="0" transaction="1" version="2" data_block_size="128" nr_data_blocks="16384">
  <diff left="1" right="2">
    <different begin="0" length="4"/>
    <same begin="4" length="2"/>
    <right_only begin="6" length="1"/>
    <left_only begin="9" length="3"/>
  </diff>
</superblock>
"#;

#[test]
fn thin_delta_runs_become_changed_and_discarded_bytes() {
    let map = parse_str(THIN, &opts(64 * MIB)).unwrap();
    assert_eq!(map.format, MapFormat::ThinDelta);
    assert_eq!(
        map.ranges,
        vec![
            changed(0, 4 * THIN_BLOCK),
            changed(6 * THIN_BLOCK, THIN_BLOCK),
            discarded(9 * THIN_BLOCK, 3 * THIN_BLOCK),
        ]
    );
}

#[test]
fn thin_delta_verbose_ranges_and_unknown_attributes_are_read() {
    let map = r#"<?xml version="1.0"?>
<superblock uuid="abc" time="3" transaction="7" flags="0" version="2" data_block_size="256" nr_data_blocks="100" metadata_snap="5">
  <diff left="1" right="2">
    <different>
      <range begin="2" left_data_begin="10" right_data_begin="20" length="1"/>
      <range begin="5" left_data_begin="11" right_data_begin="21" length="2"/>
    </different>
    <same>
      <range begin="0" data_begin="7" length="2"/>
    </same>
    <left_only>
      <range begin="8" data_begin="30" length="1"/>
    </left_only>
  </diff>
</superblock>"#;
    let block = 256 * 512;
    let map = parse_str(map, &opts(64 * MIB)).unwrap();
    assert_eq!(
        map.ranges,
        vec![
            changed(2 * block, block),
            changed(5 * block, 2 * block),
            discarded(8 * block, block),
        ]
    );
}

#[test]
fn era_invalidate_blocks_and_ranges_use_the_given_block_size() {
    let map = "<blocks>\n  <range begin=\"5\" end=\"9\"/>\n  <block block=\"3\"/>\n</blocks>\n";
    let o = MapOptions {
        device_bytes: 64 * MIB,
        era_block_bytes: Some(MIB),
    };
    let map = parse_str(map, &o).unwrap();
    assert_eq!(map.format, MapFormat::EraInvalidate);
    assert_eq!(
        map.ranges,
        vec![changed(3 * MIB, MIB), changed(5 * MIB, 4 * MIB)]
    );
}

#[test]
fn era_invalidate_without_a_block_size_is_a_usage_error() {
    let err = parse_str("<blocks><block block=\"1\"/></blocks>", &opts(MIB)).unwrap_err();
    assert!(
        matches!(&err, MapError::Usage(m) if m.contains("--era-block-size")),
        "{err}"
    );
}

#[test]
fn lines_are_bytes_with_comments_and_hex() {
    let map = "# changed ranges\n\n4096 512\n0x10000 0x1000   # a comment\n\t100 1\n";
    let map = parse_str(map, &opts(MIB)).unwrap();
    assert_eq!(map.format, MapFormat::Lines);
    assert_eq!(
        map.ranges,
        vec![
            changed(100, 1),
            changed(4096, 512),
            changed(0x10000, 0x1000)
        ]
    );
}

#[test]
fn empty_map_lists_nothing() {
    for map in ["", "\n\n", "# nothing changed\n"] {
        assert_eq!(parse_str(map, &opts(MIB)).unwrap().ranges, vec![]);
    }
}

#[test]
fn unsorted_ranges_are_sorted_and_overlaps_merged() {
    let map = "900 100\n0 10\n5 10\n1000 24\n20 5\n24 1\n";
    let map = parse_str(map, &opts(MIB)).unwrap();
    assert_eq!(
        map.ranges,
        vec![changed(0, 15), changed(20, 5), changed(900, 124)]
    );
}

#[test]
fn a_changed_range_wins_over_an_overlapping_discard() {
    let map = r#"<superblock data_block_size="1">
  <left_only begin="0" length="10"/>
  <different begin="2" length="2"/>
  <right_only begin="8" length="4"/>
</superblock>"#;
    let map = parse_str(map, &opts(MIB)).unwrap();
    assert_eq!(
        map.ranges,
        vec![
            discarded(0, 1024),
            changed(1024, 1024),
            discarded(2048, 2048),
            changed(4096, 2048),
        ]
    );
}

#[test]
fn a_partial_last_block_is_clamped_to_the_device() {
    let size = 10 * THIN_BLOCK + 4096;
    let map =
        "<superblock data_block_size=\"128\"><different begin=\"9\" length=\"2\"/></superblock>";
    let map = parse_str(map, &opts(size)).unwrap();
    assert_eq!(map.ranges, vec![changed(9 * THIN_BLOCK, THIN_BLOCK + 4096)]);
}

#[test]
fn ranges_past_the_end_name_their_line() {
    let (line, reason) = rejection("0 10\n\n1048570 10\n", &opts(MIB));
    assert_eq!(line, 3);
    assert!(reason.contains("past the end"), "{reason}");
    let (line, _) = rejection("1048576 1\n", &opts(MIB));
    assert_eq!(line, 1);
    let thin = "<superblock data_block_size=\"128\">\n<diff>\n<right_only begin=\"16\" length=\"1\"/>\n</diff>\n</superblock>";
    let (line, reason) = rejection(thin, &opts(MIB));
    assert_eq!(line, 3);
    assert!(reason.contains("<right_only begin=\"16\""), "{reason}");
}

#[test]
fn overflows_are_refused() {
    let huge = 1u64 << 63;
    let cases = [
        format!("<superblock data_block_size=\"128\"><different begin=\"{huge}\" length=\"1\"/></superblock>"),
        format!("<superblock data_block_size=\"128\"><different begin=\"0\" length=\"{huge}\"/></superblock>"),
        format!("<superblock data_block_size=\"{huge}\"></superblock>"),
        format!("{huge} {huge}\n"),
        "18446744073709551615 1\n".to_string(),
        "18446744073709551616 1\n".to_string(),
    ];
    for map in &cases {
        let (line, _) = rejection(map, &opts(u64::MAX));
        assert_eq!(line, 1, "{map}");
    }
}

#[test]
fn malformed_lines_name_their_line() {
    for (map, line) in [
        ("0 10\nten 10\n", 2),
        ("0 10\n\n\n0 10 5\n", 4),
        ("7\n", 1),
        ("0 -1\n", 1),
        ("0 0\n", 1),
        ("0 1\n0x 1\n", 2),
    ] {
        assert_eq!(rejection(map, &opts(MIB)).0, line, "{map:?}");
    }
    let long = format!("0 1\n{}\n", "1".repeat(MAX_LINE_BYTES as usize + 10));
    assert_eq!(rejection(&long, &opts(MIB)).0, 2);
}

#[test]
fn malformed_xml_names_its_line_and_element() {
    for (map, line, needle) in [
        ("<superblock uuid=\"\">\n</superblock>", 1, "data_block_size"),
        ("<superblock data_block_size=\"x\">", 1, "not a number"),
        ("<superblock data_block_size=\"0\"></superblock>", 1, "block size"),
        ("\n<superblock data_block_size=\"128\">\n<different begin=\"1\"/>\n</superblock>", 3, "length"),
        ("<superblock data_block_size=\"128\">\n<device dev_id=\"1\"/>\n</superblock>", 2, "<device>"),
        ("<superblock data_block_size=\"128\">\n<diff>\n</superblock>", 3, "closes <diff>"),
        ("<superblock data_block_size=\"128\">\n<diff>\n", 2, "never closed"),
        ("<superblock data_block_size=\"128\"/>\n<superblock data_block_size=\"128\"/>", 2, "after the root"),
        ("<metadata>\n</metadata>", 1, "not the root"),
        ("<superblock data_block_size=\"128\">\n<different begin=\"1\" length=\"2\">\n<range begin=\"1\"/>", 3, "length"),
        ("<blocks>\n<range begin=\"5\" end=\"5\"/>\n</blocks>", 2, "not past begin"),
        ("<blocks>\n<block/>\n</blocks>", 2, "block attribute"),
        ("<blocks>\n<block block=\"1\">\n<block block=\"2\"/></block></blocks>", 3, "inside <block>"),
        ("<superblock data_block_size=\"128\">\n stray text\n</superblock>", 2, "text"),
    ] {
        let o = MapOptions {
            device_bytes: u64::MAX,
            era_block_bytes: Some(4096),
        };
        let (got, reason) = rejection(map, &o);
        assert_eq!(got, line, "{map:?}: {reason}");
        assert!(reason.contains(needle), "{map:?}: {reason}");
    }
}

#[test]
fn same_runs_are_checked_but_not_kept() {
    let map =
        "<superblock data_block_size=\"128\"><same begin=\"0\" length=\"9999999\"/></superblock>";
    assert_eq!(parse_str(map, &opts(MIB)).unwrap().ranges, vec![]);
    let map = "<superblock data_block_size=\"128\"><same begin=\"0\"/></superblock>";
    assert_eq!(rejection(map, &opts(MIB)).0, 1);
}
