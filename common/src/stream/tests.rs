//! Round trips, the golden stream, and one rejection test per broken rule.

use super::*;
use crate::buf::AlignedBuf;
use crate::limits::CHUNK_BYTES;
use crate::StreamError;

mod snapshot_info;

fn header(transitions: Vec<Transition>) -> StreamHeader {
    StreamHeader {
        stream_id: [0x11; 16],
        virtual_size: transitions.last().unwrap().virtual_size,
        source: SourceInfo {
            kind: "qcow2".into(),
            name: "vm.qcow2".into(),
        },
        transitions,
        total_extents: 3,
        total_data_bytes: 4096,
        total_zero_bytes: 8192,
        resume_offset: 0,
    }
}

fn snap(name: &str, b: u8) -> SnapRef {
    SnapRef {
        name: name.into(),
        guid: [b; 16],
    }
}

fn one_transition() -> StreamHeader {
    header(vec![Transition {
        from: Some(snap("s1", 1)),
        to: snap("s2", 2),
        virtual_size: 4 * CHUNK_BYTES,
    }])
}

fn end_of(h: &StreamHeader, i: usize) -> SnapshotEnd {
    SnapshotEnd {
        transition: i as u32,
        name: h.transitions[i].to.name.clone(),
        guid: h.transitions[i].to.guid,
        virtual_size: h.transitions[i].virtual_size,
        digest: None,
        prefix_hash: [0; 32],
    }
}

/// A tiny stream: one compressible data record, one zero, one discard.
fn tiny_stream() -> Vec<u8> {
    let h = one_transition();
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.data(&encode_chunk(0, &[0xab; 4096], 3).unwrap()).unwrap();
    w.zero(4096, 4096).unwrap();
    w.discard(CHUNK_BYTES, 4096).unwrap();
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    w.finish().unwrap()
}

fn read_all(bytes: &[u8]) -> Result<Vec<Record>, StreamError> {
    let mut r = StreamReader::new(bytes)?;
    let mut out = Vec::new();
    while let Some(rec) = r.next_record()? {
        if let Record::Data(d) = &rec {
            d.plain(r.record_position())?;
        }
        out.push(rec);
    }
    Ok(out)
}

#[test]
fn round_trip() {
    let bytes = tiny_stream();
    let recs = read_all(&bytes).unwrap();
    assert_eq!(recs.len(), 5);
    let Record::Data(d) = &recs[0] else {
        panic!("not data: {:?}", recs[0])
    };
    assert_eq!(d.compression, Compression::Zstd);
    assert_eq!(d.plain(0).unwrap(), vec![0xab; 4096]);
    assert_eq!(
        recs[1],
        Record::Zero {
            offset: 4096,
            len: 4096
        }
    );
    assert!(matches!(recs[4], Record::End(EndRecord { records: 5, .. })));
}

#[test]
fn incompressible_chunk_is_stored_plain() {
    let mut noise = vec![0u8; 4096];
    blake3::Hasher::new().finalize_xof().fill(&mut noise);
    let rec = encode_chunk(0, &noise, 19).unwrap();
    assert_eq!(rec.compression, Compression::None);
    assert_eq!(rec.payload, noise);
    let plain = encode_chunk(0, &[1; 100], 0).unwrap();
    assert_eq!(plain.compression, Compression::None);
}

/// Freezes the wire format: any change to these bytes is a format change (bump VERSION).
#[test]
fn golden_bytes() {
    let h = header(vec![Transition {
        from: None,
        to: snap("s1", 1),
        virtual_size: 8192,
    }]);
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.data(&encode_chunk(0, b"blkdelta", 0).unwrap()).unwrap();
    w.discard(4096, 4096).unwrap();
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let bytes = w.finish().unwrap();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    assert_eq!(hex, GOLDEN_HEX);
}

const GOLDEN_HEX: &str = concat!(
    "89424c4b0d0a1a0a0200000001000000800000003b984f41c3e0d61d111111111111111111111111",
    "111111110020000000000000050000000000000071636f77320800000000000000766d2e71636f77",
    "32010000000000000000020000000000000073310101010101010101010101010101010100200000",
    "00000000030000000000000000100000000000000020000000000000000000000000000002000000",
    "3500000044f1b7d2dc5c669e00000000000000000800000000dcc890caafa1378fa2be6bf06b4615",
    "909e63a0ffb8cade284300ed3431046719626c6b64656c7461040000001000000071be9acb7832e3",
    "c50010000000000000001000000000000005000000470000001204180114c9226f00000000020000",
    "00000000007331010101010101010101010101010101010020000000000000002cbbf60a08dd10b7",
    "89d3be6ed079cf52c53ef213ebdaad61c7d3673f0132135906000000280000000638b038b24064f7",
    "0400000000000000ea7609c302b8e8245aa2d41df52f321a5310b04073283374aafadeec0dc30461",
);

fn expect_corrupt(bytes: &[u8], needle: &str) {
    match read_all(bytes) {
        Err(e) => assert!(e.to_string().contains(needle), "{e} lacks '{needle}'"),
        Ok(_) => panic!("accepted a stream that should fail with '{needle}'"),
    }
}

#[test]
fn rejects_bad_magic_and_text_mode_mangling() {
    let mut b = tiny_stream();
    b[0] = b'X';
    expect_corrupt(&b, "not a blkdelta stream");
    let mut b = tiny_stream();
    b.splice(4..6, [b'\n']);
    expect_corrupt(&b, "text-mode");
}

#[test]
fn rejects_other_version() {
    let mut b = tiny_stream();
    b[8] = 3;
    expect_corrupt(&b, "unsupported stream version 3");
    // Version 1 streams (whose frame checks and hashes covered data payloads) are refused by
    // their version, not misread.
    b[8] = 1;
    expect_corrupt(&b, "unsupported stream version 1");
}

#[test]
fn rejects_truncation_anywhere() {
    let b = tiny_stream();
    for cut in [0, 5, 12, 20, b.len() / 2, b.len() - 1] {
        let err = read_all(&b[..cut]).unwrap_err();
        assert!(matches!(err, StreamError::Truncated(_)), "cut {cut}: {err}");
    }
}

#[test]
fn rejects_flipped_payload_byte() {
    let mut b = tiny_stream();
    let data_payload =
        12 + FRAME_HEADER_BYTES + header_body_len(&b) + FRAME_HEADER_BYTES + DATA_FIXED_BYTES + 4;
    b[data_payload] ^= 0x40;
    let err = read_all(&b).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::Checksum { .. } | StreamError::Corrupt { .. }
        ),
        "{err}"
    );
}

#[test]
fn rejects_flipped_hash_in_end_record() {
    let mut b = tiny_stream();
    let n = b.len();
    b[n - 1] ^= 1;
    expect_corrupt(&b, "record check mismatch");
    // A well-framed end record whose hash does not match the stream.
    let h = one_transition();
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let forged = encode_body(&EndRecord {
        records: 2,
        stream_hash: [7; 32],
    });
    w.raw_frame(RecordType::End as u8, 0, &forged).unwrap();
    assert!(matches!(
        read_all(&w.flush_inner().unwrap().clone()),
        Err(StreamError::StreamHash { .. })
    ));
}

#[test]
fn rejects_flipped_header_byte_by_its_record_check() {
    let mut b = tiny_stream();
    b[12 + FRAME_HEADER_BYTES] ^= 0x01; // first byte of the stream id
    expect_corrupt(&b, "record check mismatch");
}

fn header_body_len(b: &[u8]) -> usize {
    u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize
}

fn stream_with(h: &StreamHeader, f: impl FnOnce(&mut StreamWriter<Vec<u8>>)) -> Vec<u8> {
    let mut w = StreamWriter::new(Vec::new(), h).unwrap();
    f(&mut w);
    w.finish().unwrap()
}

#[test]
fn rejects_unsorted_and_overlapping_records() {
    let h = one_transition();
    let b = stream_with(&h, |w| {
        w.zero(8192, 4096).unwrap();
        w.zero(0, 4096).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&b, "overlaps or precedes");
    let b = stream_with(&h, |w| {
        w.zero(0, 8192).unwrap();
        w.discard(4096, 4096).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&b, "overlaps or precedes");
}

#[test]
fn rejects_ranges_past_the_virtual_size() {
    let h = one_transition();
    let b = stream_with(&h, |w| {
        w.zero(4 * CHUNK_BYTES - 10, 11).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&b, "outside the virtual size");
    let b = stream_with(&h, |w| {
        w.discard(u64::MAX - 1, 4).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&b, "outside the virtual size");
}

#[test]
fn rejects_data_crossing_a_chunk_boundary() {
    let h = one_transition();
    let b = stream_with(&h, |w| {
        w.data(&encode_chunk(CHUNK_BYTES - 2, &[1; 4], 0).unwrap())
            .unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&b, "crosses a 1 MiB boundary");
}

#[test]
fn rejects_missing_snapshot_end_and_wrong_snapshot_end() {
    let h = one_transition();
    let b = stream_with(&h, |w| w.zero(0, 1).unwrap());
    expect_corrupt(&b, "end record after 0 of 1 transitions");
    let b = stream_with(&h, |w| {
        let mut e = end_of(&h, 0);
        e.guid = [9; 16];
        w.snapshot_end(&e).unwrap();
    });
    expect_corrupt(&b, "does not close transition 0");
}

#[test]
fn rejects_bytes_after_the_end_record() {
    let mut b = tiny_stream();
    let again = b.clone();
    b.extend_from_slice(&again[12..40]);
    expect_corrupt(&b, "bytes after the end record");
}

#[test]
fn rejects_huge_body_length_without_allocating() {
    let mut b = tiny_stream();
    let at = 12 + FRAME_HEADER_BYTES + header_body_len(&b) + 4;
    b[at..at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    expect_corrupt(&b, "record body of 4294967295 bytes");
}

#[test]
fn unknown_records_skip_only_when_optional() {
    let mut b = tiny_stream();
    let at = 12 + FRAME_HEADER_BYTES + header_body_len(&b);
    b[at] = 0x70;
    expect_corrupt(&b, "record check mismatch");
    let h = one_transition();
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.raw_frame(0x70, 0, b"future").unwrap();
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    expect_corrupt(&w.finish().unwrap(), "unknown record type 112");
    // An optional unknown record is skipped (the stream hash still covers it).
    let h = one_transition();
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.raw_frame(0x70, FLAG_OPTIONAL, b"future").unwrap();
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let with_optional = w.finish().unwrap();
    assert_eq!(read_all(&with_optional).unwrap().len(), 2);
}

#[test]
fn rejects_inconsistent_transitions_in_header() {
    let h = header(vec![
        Transition {
            from: Some(snap("a", 1)),
            to: snap("b", 2),
            virtual_size: 10,
        },
        Transition {
            from: Some(snap("x", 7)),
            to: snap("c", 3),
            virtual_size: 10,
        },
    ]);
    let err = h.validate().unwrap_err();
    assert!(
        err.contains("does not start where transition 0 ends"),
        "{err}"
    );
    assert!(StreamWriter::new(Vec::new(), &h).is_err());
}

#[test]
fn a_damaged_zero_record_is_rejected_before_it_is_used() {
    let h = header(vec![
        Transition {
            from: Some(snap("s1", 1)),
            to: snap("s2", 2),
            virtual_size: 4 * CHUNK_BYTES,
        },
        Transition {
            from: Some(snap("s2", 2)),
            to: snap("s3", 3),
            virtual_size: 4 * CHUNK_BYTES,
        },
    ]);
    let mut b = stream_with(&h, |w| {
        w.zero(4096, 4096).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
        w.snapshot_end(&end_of(&h, 1)).unwrap();
    });
    let zero_body = 12 + FRAME_HEADER_BYTES + header_body_len(&b) + FRAME_HEADER_BYTES;
    b[zero_body + 1] ^= 0x01; // offset 4096 becomes 4352: still a valid range
    let mut r = StreamReader::new(b.as_slice()).unwrap();
    let err = r.next_record().unwrap_err().to_string();
    assert!(err.contains("record check mismatch"), "{err}");
}

#[test]
fn a_dropped_record_is_caught_at_the_next_checkpoint() {
    let h = one_transition();
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.zero(0, 4096).unwrap();
    let cut_from = w.bytes_written() as usize;
    w.zero(8192, 4096).unwrap();
    let cut_to = w.bytes_written() as usize;
    w.checkpoint().unwrap();
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let intact = w.finish().unwrap();
    assert!(matches!(
        read_all(&intact).unwrap()[2],
        Record::Checkpoint(_)
    ));
    let mut dropped = intact[..cut_from].to_vec();
    dropped.extend_from_slice(&intact[cut_to..]);
    let mut r = StreamReader::new(dropped.as_slice()).unwrap();
    assert!(matches!(
        r.next_record(),
        Ok(Some(Record::Zero { offset: 0, .. }))
    ));
    assert!(matches!(
        r.next_record(),
        Err(StreamError::StreamHash { .. })
    ));
}

#[test]
fn writer_refuses_a_header_the_reader_would_reject() {
    let mut h = one_transition();
    h.transitions[0].to.name = "x".repeat(crate::limits::MAX_NAME_BYTES + 1);
    assert!(StreamWriter::new(Vec::new(), &h).is_err());
}

#[test]
fn rejects_empty_ranges_by_name() {
    let h = one_transition();
    let b = stream_with(&h, |w| {
        w.zero(0, 0).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&b, "empty range");
}

#[test]
fn a_resumed_stream_starts_at_its_resume_offset() {
    let mut h = one_transition();
    h.resume_offset = CHUNK_BYTES;
    let ok = stream_with(&h, |w| {
        w.zero(CHUNK_BYTES, 4096).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    assert_eq!(read_all(&ok).unwrap().len(), 3);
    let early = stream_with(&h, |w| {
        w.zero(0, 4096).unwrap();
        w.snapshot_end(&end_of(&h, 0)).unwrap();
    });
    expect_corrupt(&early, "precedes");
    h.resume_offset = 5 * CHUNK_BYTES;
    assert!(h.validate().unwrap_err().contains("resume offset"));
}

#[test]
fn writers_put_checkpoints_and_readers_require_them() {
    let h = header(vec![Transition {
        from: None,
        to: snap("big", 4),
        virtual_size: 64 * CHUNK_BYTES,
    }]);
    let chunk = |i: u64| encode_chunk(i * CHUNK_BYTES, &[i as u8 + 1; 1 << 20], 0).unwrap();
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    for i in 0..20 {
        w.data(&chunk(i)).unwrap();
    }
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let checked = read_all(&w.finish().unwrap()).unwrap();
    let checkpoints = checked
        .iter()
        .filter(|r| matches!(r, Record::Checkpoint(_)))
        .count();
    assert!(checkpoints >= 19, "{checkpoints} checkpoints for 20 MiB");

    let mut w = StreamWriter::new(Vec::new(), &h)
        .unwrap()
        .without_checkpoints();
    for i in 0..20 {
        w.data(&chunk(i)).unwrap();
    }
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    expect_corrupt(&w.finish().unwrap(), "no checkpoint record");
}

/// `len` bytes of deterministic noise (incompressible).
fn noise(len: usize, seed: u8) -> Vec<u8> {
    let mut out = vec![0u8; len];
    blake3::Hasher::new()
        .update(&[seed])
        .finalize_xof()
        .fill(&mut out);
    out
}

#[test]
fn sampled_chunks_are_compressed_only_where_it_pays() {
    let mib = CHUNK_BYTES as usize;
    // Random data: the sample says no, and the chunk is stored as it is, without a copy.
    let random = noise(mib, 1);
    let input = AlignedBuf::from_slice(&random);
    let ptr = input.as_ptr();
    let (rec, _) = encode_chunk_owned(0, input, 3, AlignedBuf::new()).unwrap();
    assert_eq!(rec.compression, Compression::None);
    assert_eq!(rec.payload, random);
    assert_eq!(
        rec.payload.as_ptr(),
        ptr,
        "a chunk stored plain is not copied"
    );
    // Half random, half zeros (the sample straddles both): compressed, and it round-trips.
    let mut half = noise(mib, 2);
    half[mib / 2..].fill(0);
    let (rec, left) = encode_chunk_owned(0, half.clone().into(), 3, AlignedBuf::new()).unwrap();
    assert_eq!(rec.compression, Compression::Zstd);
    assert!(rec.payload.len() < mib * 6 / 10, "{}", rec.payload.len());
    assert_eq!(left, half, "the plain buffer is handed back for reuse");
    assert_eq!(rec.plain(0).unwrap(), half);
    // Text-like data compresses; level 0 never does.
    let text: Vec<u8> = b"blkdelta ".iter().copied().cycle().take(mib).collect();
    let (rec, _) = encode_chunk_owned(0, text.clone().into(), 1, AlignedBuf::new()).unwrap();
    assert_eq!(rec.compression, Compression::Zstd);
    let (rec, _) = encode_chunk_owned(0, text.into(), 0, AlignedBuf::new()).unwrap();
    assert_eq!(rec.compression, Compression::None);
}

#[test]
fn into_plain_reuses_buffers_and_verifies() {
    let mut data = noise(64 << 10, 3);
    data[..32 << 10].fill(7);
    let rec = encode_chunk(5 * CHUNK_BYTES, &data, 3).unwrap();
    assert_eq!(rec.compression, Compression::Zstd);
    let spare = AlignedBuf::zeroed(1 << 20);
    let spare_ptr = spare.as_ptr();
    let (plain, left) = rec.clone().into_plain(100, spare).unwrap();
    assert_eq!(plain, data);
    assert_eq!(
        plain.as_ptr(),
        spare_ptr,
        "decompressed into the spare buffer"
    );
    assert_eq!(
        left, rec.payload,
        "the compressed payload comes back for reuse"
    );
    // A flipped payload byte (not covered by the frame check) is caught by the plain hash
    // or by the decompressor, and named.
    let mut bad = rec.clone();
    let mid = bad.payload.len() / 2;
    bad.payload[mid] ^= 0x40;
    let err = bad.into_plain(100, AlignedBuf::new()).unwrap_err();
    assert!(
        matches!(
            err,
            StreamError::Checksum {
                stream_offset: 100,
                ..
            } | StreamError::Corrupt { offset: 100, .. }
        ),
        "{err}"
    );
}

#[test]
fn payload_damage_is_caught_by_the_record_hash() {
    // A stored payload: the frame check covers the fixed fields, the record's hash the bytes.
    let h = one_transition();
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.data(&encode_chunk(0, &noise(4096, 4), 0).unwrap())
        .unwrap();
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let mut b = w.finish().unwrap();
    let good = read_all(&b).unwrap();
    let last = b.len() - (END_FRAME_BYTES as usize) - 200;
    b[last] ^= 1;
    let mut r = StreamReader::new(&b[..]).unwrap();
    let Ok(Some(Record::Data(d))) = r.next_record() else {
        panic!("the frame check does not cover the payload");
    };
    assert_ne!(Record::Data(d.clone()), good[0]);
    let err = d.plain(r.record_position()).unwrap_err();
    assert!(
        matches!(err, StreamError::Checksum { disk_offset: 0, .. }),
        "{err}"
    );
    // The fixed fields are covered by the frame check: a changed disk offset is refused.
    let mut b = tiny_stream();
    let data_frame =
        12 + FRAME_HEADER_BYTES + (u32::from_le_bytes(b[16..20].try_into().unwrap()) as usize);
    b[data_frame + FRAME_HEADER_BYTES] ^= 0x10;
    expect_corrupt(&b, "record check mismatch (type 2");
}

#[test]
fn recycled_buffers_read_the_same_records() {
    let h = header(vec![Transition {
        from: None,
        to: snap("s1", 1),
        virtual_size: 8 * CHUNK_BYTES,
    }]);
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    for i in 0..8u64 {
        let len = (CHUNK_BYTES as usize) >> (i % 4);
        let chunk = encode_chunk(i * CHUNK_BYTES, &noise(len, i as u8), 3).unwrap();
        w.data(&chunk).unwrap();
    }
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let b = w.finish().unwrap();
    let fresh = read_all(&b).unwrap();
    let mut r = StreamReader::new(&b[..]).unwrap();
    let mut recycled = Vec::new();
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Data(d) = &rec {
            let (plain, left) = d.clone().into_plain(0, AlignedBuf::new()).unwrap();
            r.recycle(plain);
            r.recycle(left);
        }
        recycled.push(rec);
    }
    assert_eq!(recycled, fresh);
}

#[test]
fn short_payloads_take_their_own_size_even_with_spare_buffers() {
    // A receiver holds every record until a checkpoint vouches for it: a tiny record must not
    // cost a reused 1 MiB buffer, nor an aligned block.
    let h = header(vec![Transition {
        from: None,
        to: snap("s1", 1),
        virtual_size: 8 * CHUNK_BYTES,
    }]);
    let mut w = StreamWriter::new(Vec::new(), &h).unwrap();
    w.data(&encode_chunk(0, &noise(CHUNK_BYTES as usize, 1), 0).unwrap())
        .unwrap();
    for i in 1..8u64 {
        w.data(&encode_chunk(i * CHUNK_BYTES, &[i as u8; 3], 0).unwrap())
            .unwrap();
    }
    w.snapshot_end(&end_of(&h, 0)).unwrap();
    let b = w.finish().unwrap();
    let mut r = StreamReader::new(&b[..]).unwrap();
    let mut short = 0;
    while let Some(rec) = r.next_record().unwrap() {
        if let Record::Data(d) = rec {
            if d.len == 3 {
                assert_eq!(d.payload.capacity(), 3);
                short += 1;
            }
            let (plain, _) = d.into_plain(0, AlignedBuf::new()).unwrap();
            r.recycle(plain);
        }
    }
    assert_eq!(short, 7);
}

#[test]
fn random_ids_differ_and_the_fallback_does_too() {
    let (a, b) = (random_id(), random_id());
    assert_ne!(a, b);
    assert_ne!(a, [0u8; 16]);
    // The fallback, used only when the OS generator fails, still never repeats in a process.
    assert_ne!(fallback_id(), fallback_id());
}
