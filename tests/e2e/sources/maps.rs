//! Change maps end to end: a raw "device" seeded to a replica, changed by a program, then sent
//! with the thin_delta XML, era_invalidate XML or `OFFSET LENGTH` lines that describe the
//! change; the replica must equal the device byte for byte, and each stream be as small as
//! the change.

use std::path::{Path, PathBuf};

use crate::common::{
    arg, assert_same_file, blkdelta, have, one_error_line, pipe_args_ok, punch_hole, receive_file,
    send_file, sparse_file, write_at, write_random, write_text, Loop, Scratch, KIB, MIB,
};

/// thin_delta's data block in these tests: 128 sectors.
const BLOCK: u64 = 64 * KIB;
const DEV_BYTES: u64 = 64 * MIB;

/// A 64 MiB sparse device with data at 0..6 MiB, 20..22 MiB and 40..40.5 MiB, and a replica
/// seeded from it as the state `dev0`.
struct Fixture {
    sc: Scratch,
    dev: PathBuf,
    replica: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let sc = Scratch::new();
        let dev = sc.path("dev.raw");
        sparse_file(&dev, DEV_BYTES);
        write_random(&dev, 0, 6 * MIB, 1);
        write_random(&dev, 20 * MIB, 2 * MIB, 2);
        write_random(&dev, 40 * MIB, 512 * KIB, 3);
        let replica = sc.path("replica.raw");
        pipe_args_ok(&["--to-name", "dev0", arg(&dev)], &replica, &[]);
        assert_same_file(&replica, &dev);
        Fixture { sc, dev, replica }
    }

    /// Writes `text` as a map file.
    fn map(&self, name: &str, text: &str) -> PathBuf {
        let p = self.sc.path(name);
        write_text(&p, text);
        p
    }

    /// Sends the change `map` lists from `from` to `to` (to a stream file, returning its
    /// size), receives it, and checks the replica against the device.
    fn send_map(&self, map: &Path, from: &str, to: &str, extra: &[&str]) -> u64 {
        let stream = self.sc.path(&format!("{to}.bd"));
        let mut args = vec![
            "--changed-blocks",
            arg(map),
            "--from-name",
            from,
            "--to-name",
            to,
        ];
        args.extend_from_slice(extra);
        args.push(arg(&self.dev));
        let size = send_file(&args, &stream);
        let out = receive_file(&stream, &self.replica, &[]);
        assert!(
            out.status.success(),
            "receive: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_same_file(&self.replica, &self.dev);
        size
    }
}

#[test]
fn thin_delta_maps_send_changed_runs_and_discard_left_only_runs() {
    let f = Fixture::new();
    // blocks 3-4 rewritten, block 10 zeroed with written zeros, block 200 newly mapped (a
    // hole before), blocks 320..336 unmapped (a hole now).
    write_random(&f.dev, 3 * BLOCK + 1000, 100 * KIB, 11);
    write_at(&f.dev, 10 * BLOCK, &[0u8; BLOCK as usize]);
    write_random(&f.dev, 200 * BLOCK, BLOCK, 12);
    punch_hole(&f.dev, 320 * BLOCK, 16 * BLOCK);
    let map = f.map(
        "delta.xml",
        r#"<superblock uuid="" time="0" transaction="1" flags="0" version="2" data_block_size="128" nr_data_blocks="16384">
  <diff left="1" right="2">
    <same begin="0" length="3"/>
    <different begin="3" length="2"/>
    <same begin="5" length="5"/>
    <different begin="10" length="1"/>
    <right_only begin="200" length="1"/>
    <left_only begin="320" length="16"/>
  </diff>
</superblock>
"#,
    );
    let size = f.send_map(&map, "dev0", "dev1", &[]);
    // Three blocks of random data; block 10 travels as a zero record, 320..336 as a discard.
    assert!(size > 3 * BLOCK && size < 3 * BLOCK + 16 * KIB, "{size}");

    // thin_delta --verbose: runs wrap <range> elements with mapping attributes.
    write_random(&f.dev, 500 * BLOCK, BLOCK, 13);
    write_random(&f.dev, 640 * BLOCK + 70 * KIB, 20 * KIB, 14);
    let map = f.map(
        "verbose.xml",
        r#"<superblock uuid="" time="1" transaction="2" flags="0" version="2" data_block_size="128" nr_data_blocks="16384">
  <diff left="1" right="2">
    <same>
      <range begin="0" data_begin="0" length="3"/>
    </same>
    <right_only>
      <range begin="500" data_begin="77" length="1"/>
    </right_only>
    <different>
      <range begin="640" left_data_begin="5" right_data_begin="78" length="2"/>
    </different>
  </diff>
</superblock>
"#,
    );
    let size = f.send_map(&map, "dev1", "dev2", &[]);
    assert!(size > 3 * BLOCK && size < 3 * BLOCK + 16 * KIB, "{size}");
}

#[test]
fn era_invalidate_maps_send_their_blocks_in_any_order() {
    let f = Fixture::new();
    let era = 256 * KIB;
    write_random(&f.dev, MIB + 5, 20, 21); // era block 4
    write_random(&f.dev, 21 * MIB, 600 * KIB, 22); // era blocks 84..87
    punch_hole(&f.dev, 40 * MIB, era); // era block 160
    let map = f.map(
        "era.xml",
        "<blocks>\n  <range begin=\"84\" end=\"87\"/>\n  <block block=\"160\"/>\n  <block block=\"4\"/>\n</blocks>\n",
    );
    let size = f.send_map(&map, "dev0", "dev1", &["--era-block-size", "262144"]);
    // Four era blocks of data (block 160 is a hole now: a discard).
    assert!(size > 4 * era && size < 4 * era + 16 * KIB, "{size}");
}

#[test]
fn offset_length_lines_send_exactly_those_bytes() {
    let f = Fixture::new();
    write_random(&f.dev, 5 * MIB + 3, 10, 31);
    write_random(&f.dev, 33 * MIB + 7, 3, 32);
    // Unsorted, overlapping, with comments and blank lines.
    let lines = format!(
        "# written by a test\n{} 3\n\n{} 10   # inside the first 6 MiB\n{} 8\n",
        33 * MIB + 7,
        5 * MIB + 3,
        5 * MIB
    );
    let map = f.map("changes.txt", &lines);

    // The replica holds dev0: a stream from another state is refused, and nothing changes.
    let stream = f.sc.path("wrong.bd");
    let args = [
        "--changed-blocks",
        arg(&map),
        "--from-name",
        "dev9",
        arg(&f.dev),
    ];
    send_file(&args, &stream);
    let before = std::fs::read(&f.replica).unwrap();
    let out = receive_file(&stream, &f.replica, &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("dev9"));
    assert!(std::fs::read(&f.replica).unwrap() == before);

    let size = f.send_map(&map, "dev0", "dev1", &[]);
    assert!(size < 4 * KIB, "{size}");
}

#[test]
fn a_loop_device_is_a_source_for_change_maps() {
    if !have("losetup") {
        return;
    }
    let f = Fixture::new();
    write_random(&f.dev, 2 * MIB + 100, 300 * KIB, 41);
    punch_hole(&f.dev, 21 * MIB, MIB);
    let map = f.map(
        "loop.txt",
        &format!("{} {}\n{} {}\n", 2 * MIB, 512 * KIB, 21 * MIB, MIB),
    );
    let Some(dev) = Loop::attach(&f.dev, true) else {
        return;
    };
    let stream = f.sc.path("loop.bd");
    let args = [
        "--changed-blocks",
        arg(&map),
        "--from-name",
        "dev0",
        "--to-name",
        "dev1",
        &dev.0,
    ];
    let size = send_file(&args, &stream);
    // A device has no holes to report: the unmapped MiB is read and sent as a zero record.
    assert!(size > 512 * KIB && size < 512 * KIB + 16 * KIB, "{size}");
    let out = receive_file(&stream, &f.replica, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_same_file(&f.replica, &f.dev);
}

/// `blkdelta send --changed-blocks MAP EXTRA... dev.raw -o /dev/null`.
fn send_map_to_null(f: &Fixture, map: &Path, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["send", "--changed-blocks", arg(map)];
    args.extend_from_slice(extra);
    args.extend_from_slice(&[arg(&f.dev), "-o", "/dev/null"]);
    blkdelta(&args)
}

#[test]
fn malformed_maps_fail_with_one_line_naming_the_line() {
    let f = Fixture::new();
    let thin = |body: &str| {
        format!("<superblock uuid=\"\" data_block_size=\"128\" nr_data_blocks=\"9\">\n  <diff left=\"1\" right=\"2\">\n{body}\n  </diff>\n</superblock>\n")
    };
    let past_end = format!("0 1\n\n{} 10\n", DEV_BYTES - 5);
    let cases: [(&str, String, &[&str]); 7] = [
        ("a.txt", "0 10\nbogus\n".into(), &["line 2", "bogus"]),
        ("b.txt", past_end, &["line 3", "past the end"]),
        (
            "c.xml",
            thin("<different begin=\"1\"/>"),
            &["line 3", "<different>", "length"],
        ),
        (
            "d.xml",
            thin("<right_only begin=\"1024\" length=\"1\"/>"),
            &["line 3", "past the end"],
        ),
        (
            "e.xml",
            thin("<mapping begin=\"1\"/>"),
            &["line 3", "<mapping>"],
        ),
        (
            "f.xml",
            "<superblock data_block_size=\"128\">\n<diff>\n".into(),
            &["line 2", "<diff>"],
        ),
        (
            "g.xml",
            "<superblock time=\"0\">\n</superblock>\n".into(),
            &["line 1", "data_block_size"],
        ),
    ];
    for (name, text, needles) in cases {
        let out = send_map_to_null(&f, &f.map(name, &text), &[]);
        assert_eq!(out.status.code(), Some(1), "{name}");
        let err = one_error_line(&out);
        for n in needles {
            assert!(err.contains(n), "{name}: {err}");
        }
    }
}

#[test]
fn era_maps_need_their_block_size_and_must_fit() {
    let f = Fixture::new();
    let era = f.map("era.xml", "<blocks>\n<block block=\"256\"/>\n</blocks>\n");
    // 256 blocks of 256 KiB: the block starts at the end of the 64 MiB device.
    let out = send_map_to_null(&f, &era, &["--era-block-size", "262144"]);
    assert_eq!(out.status.code(), Some(1));
    let err = one_error_line(&out);
    assert!(
        err.contains("line 2") && err.contains("<block block=\"256\">"),
        "{err}"
    );
    // Usage errors: no block size, or one given in sectors.
    for extra in [&[][..], &["--era-block-size", "128"]] {
        let out = send_map_to_null(&f, &era, extra);
        assert_eq!(out.status.code(), Some(2), "{extra:?}");
        assert!(one_error_line(&out).contains("--era-block-size"));
    }
}
