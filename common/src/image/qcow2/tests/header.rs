//! The header's rejection tests: the valid cluster 0 of [`super::header`], one field
//! mutated per test, refused with the variant that names the field and its value.

use super::{assert_err, header, open_bytes, put32, put64, unaligned, valid_image};
use super::{CLUSTERS, CS, L1, REFTABLE, SNAPTABLE};
use crate::image::qcow2::header::{Header, INCOMPAT_DATA_FILE, INCOMPAT_EXTL2};
use crate::image::qcow2::CompressionType;
use crate::ImageError;

fn parse(h: &[u8]) -> Result<Header, ImageError> {
    Header::parse(h, (CLUSTERS * CS) as u64)
}

/// The header field a header is refused for: (field, offset, value).
#[track_caller]
fn bad_field(result: Result<Header, ImageError>) -> (&'static str, u64, u64) {
    match result {
        Err(ImageError::HeaderField {
            field,
            offset,
            value,
            ..
        }) => (field, offset, value),
        other => panic!("expected a header field error, got {other:?}"),
    }
}

fn mutated(edit: impl FnOnce(&mut Vec<u8>)) -> Result<Header, ImageError> {
    let mut h = header();
    edit(&mut h);
    parse(&h)
}

#[test]
fn valid_header_parses() {
    let h = parse(&header()).unwrap();
    assert_eq!((h.version, h.cluster_bits, h.size), (3, 12, 1 << 20));
    assert_eq!((h.l1_size, h.l1_table_offset), (1, L1));
    assert_eq!((h.nb_snapshots, h.snapshots_offset), (1, SNAPTABLE));
    assert_eq!((h.refcount_order, h.header_length), (4, 112));
    assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
    assert_eq!(h.backing_file, None);
    assert!(!h.extended_l2 && !h.is_dirty() && !h.is_corrupt());
}

#[test]
fn version_2_extensions_start_at_byte_72() {
    let h = mutated(|h| {
        put32(h, 4, 2); // version 2: no v3 fields, the extensions follow byte 72
        h[72..112].fill(0);
        put32(h, 72, 0xE279_2ACA); // backing format extension, read as features if misparsed
        put32(h, 76, 3);
        h[80..83].copy_from_slice(b"raw");
        put64(h, 88, 0); // end of extensions (and a clear autoclear field if misparsed)
    })
    .unwrap();
    assert_eq!((h.version, h.header_length, h.refcount_order), (2, 72, 4));
    assert_eq!((h.incompatible_features, h.autoclear_features), (0, 0));
    assert_eq!(h.backing_format.as_deref(), Some("raw"));
}

#[test]
fn compression_type_needs_a_header_longer_than_104() {
    let h = mutated(|h| {
        put32(h, 100, 104); // header_length 104: byte 104 starts an extension, not the type
        h[104..136].fill(0);
        h[104] = 1; // extension type 0x01000000 of length 0, skipped
    });
    assert_eq!(h.unwrap().compression_type, CompressionType::Deflate);
}

#[test]
fn rejects_bad_magic() {
    let err = mutated(|h| h[3] = 0xfc).unwrap_err();
    assert!(
        matches!(&err, ImageError::BadMagic { found } if found == b"QFI\xfc"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "not a qcow2 image (it starts with 51 46 49 fc)"
    );
}

#[test]
fn a_raw_image_is_not_a_qcow2_image() {
    let mut raw = valid_image();
    raw[..CS].fill(0); // a raw disk whose first sector is zeros
    assert_err(
        open_bytes(&raw),
        "not a qcow2 image (it starts with 00 00 00 00)",
    );
}

#[test]
fn rejects_version_4() {
    let err = mutated(|h| put32(h, 4, 4)).unwrap_err();
    assert!(matches!(err, ImageError::UnsupportedVersion { version: 4 }));
    assert_eq!(
        err.to_string(),
        "unsupported qcow2 version 4 (only 2 and 3 exist)"
    );
}

#[test]
fn rejects_cluster_bits_8_and_22() {
    for bits in [8, 22] {
        let err = mutated(|h| put32(h, 20, bits)).unwrap_err();
        assert!(matches!(err, ImageError::ClusterBits { bits: b } if b == bits));
    }
    assert_err(mutated(|h| put32(h, 20, 8)), "cluster_bits 8");
}

#[test]
fn rejects_bad_header_length() {
    for len in [100, 108, 8192] {
        let refused = bad_field(mutated(|h| put32(h, 100, len)));
        assert_eq!(refused, ("header_length", 100, len.into()));
    }
    assert_err(
        mutated(|h| put32(h, 100, 8192)),
        "qcow2 header: header_length 8192 at offset 100 is invalid: expected at most the \
         cluster size 4096",
    );
}

#[test]
fn rejects_unknown_incompatible_bit_by_name() {
    assert_err(
        mutated(|h| put64(h, 72, 1 << 5)),
        "incompatible feature bit 5",
    );
    let named = mutated(|h| {
        put64(h, 72, 1 << 9);
        put32(h, 128, 0x6803_F857); // feature name table replaces the end marker
        put32(h, 132, 48);
        h[136] = 0; // incompatible
        h[137] = 9; // bit 9
        h[138..142].copy_from_slice(b"warp");
    });
    assert_err(named, "bit 9 (warp)");
}

#[test]
fn dirty_and_corrupt_images_are_readable() {
    let h = mutated(|h| put64(h, 72, 0b11)).unwrap();
    assert!(h.is_dirty() && h.is_corrupt());
}

#[test]
fn rejects_external_data_file() {
    assert_err(
        mutated(|h| put64(h, 72, INCOMPAT_DATA_FILE)),
        "external data file",
    );
}

#[test]
fn rejects_encryption() {
    assert_err(mutated(|h| put32(h, 32, 1)), "encryption (AES)");
    assert_err(mutated(|h| put32(h, 32, 2)), "encryption (LUKS)");
    let refused = bad_field(mutated(|h| put32(h, 32, 3)));
    assert_eq!(refused, ("crypt_method", 32, 3));
}

#[test]
fn compression_type_must_agree_with_its_bit() {
    let refused = bad_field(mutated(|h| h[104] = 1));
    assert_eq!(refused, ("compression_type", 104, 1));
    let refused = bad_field(mutated(|h| put64(h, 72, 1 << 3)));
    assert_eq!(refused, ("compression_type", 104, 0));
    assert_err(mutated(|h| h[104] = 2), "compression type 2");
    let zstd = mutated(|h| {
        h[104] = 1;
        put64(h, 72, 1 << 3);
    });
    assert_eq!(zstd.unwrap().compression_type, CompressionType::Zstd);
}

#[test]
fn rejects_extended_l2_with_small_clusters() {
    let refused = mutated(|h| put64(h, 72, INCOMPAT_EXTL2));
    assert_eq!(bad_field(refused), ("cluster_bits", 20, 12));
    assert_err(mutated(|h| put64(h, 72, INCOMPAT_EXTL2)), "at least 16 KiB");
}

#[test]
fn rejects_bad_refcount_order() {
    assert_eq!(
        bad_field(mutated(|h| put32(h, 96, 7))),
        ("refcount_order", 96, 7)
    );
}

#[test]
fn rejects_huge_size() {
    let refused = bad_field(mutated(|h| put64(h, 24, u64::MAX)));
    assert_eq!(refused, ("size", 24, u64::MAX));
}

#[test]
fn rejects_bad_l1_size() {
    let huge = mutated(|h| put32(h, 36, u32::MAX));
    assert!(
        matches!(
            huge,
            Err(ImageError::TableTooLarge {
                what: "active L1 table",
                offset: L1,
                entries: 0xffff_ffff,
                limit_bytes: crate::limits::MAX_L1_BYTES,
            })
        ),
        "{huge:?}"
    );
    assert_eq!(bad_field(mutated(|h| put32(h, 36, 0))), ("l1_size", 36, 0));
    // 4 MiB entries of 8 bytes: within the 32 MiB limit but far past the end of the file.
    let past = mutated(|h| put32(h, 36, 4 << 20));
    assert!(matches!(past, Err(ImageError::PastEnd { .. })), "{past:?}");
}

#[test]
fn rejects_unaligned_or_past_end_l1() {
    let refused = unaligned(mutated(|h| put64(h, 40, L1 + 8)));
    assert_eq!(refused, ("active L1 table", L1 + 8));
    let past = mutated(|h| put64(h, 40, (CLUSTERS * CS) as u64));
    assert!(matches!(
        past,
        Err(ImageError::PastEnd {
            what: "active L1 table",
            ..
        })
    ));
    let wrap = mutated(|h| put64(h, 40, u64::MAX - 4095));
    assert!(matches!(wrap, Err(ImageError::PastEnd { .. })));
}

#[test]
fn rejects_bad_refcount_table() {
    for clusters in [0, u32::MAX] {
        let refused = bad_field(mutated(|h| put32(h, 56, clusters)));
        assert_eq!(refused, ("refcount_table_clusters", 56, clusters.into()));
    }
    let refused = unaligned(mutated(|h| put64(h, 48, REFTABLE + 1)));
    assert_eq!(refused, ("refcount table", REFTABLE + 1));
}

#[test]
fn rejects_absurd_snapshot_tables() {
    let refused = bad_field(mutated(|h| put32(h, 60, 1_000_000)));
    assert_eq!(refused, ("nb_snapshots", 60, 1_000_000));
    let many = mutated(|h| put32(h, 60, 65536));
    assert!(matches!(
        many,
        Err(ImageError::PastEnd {
            what: "snapshot table",
            ..
        })
    ));
    let refused = unaligned(mutated(|h| put64(h, 64, SNAPTABLE + 8)));
    assert_eq!(refused, ("snapshot table", SNAPTABLE + 8));
    let past = mutated(|h| put64(h, 64, 1 << 40));
    assert!(matches!(past, Err(ImageError::PastEnd { .. })));
}

#[test]
fn rejects_bad_backing_names() {
    let backing_name = |offset: u64, len: u32| {
        let refused = mutated(|h| {
            put64(h, 8, offset);
            put32(h, 16, len);
        });
        match refused {
            Err(ImageError::BackingName {
                offset: o,
                len: l,
                cluster_size: 4096,
                max_len: 1023,
            }) => assert_eq!((o, l), (offset, u64::from(len))),
            other => panic!("expected a backing name error, got {other:?}"),
        }
    };
    backing_name(8192, 0); // starts outside cluster 0
    backing_name(512, 2000); // longer than 1023
    backing_name(4000, 200); // leaves cluster 0
    let ok = mutated(|h| {
        put64(h, 8, 512);
        put32(h, 16, 8);
        h[512..520].copy_from_slice(b"base.img");
    });
    assert_eq!(ok.unwrap().backing_file.as_deref(), Some("base.img"));
}

#[test]
fn rejects_extensions_that_leave_cluster_0() {
    let past = mutated(|h| put32(h, 116, 5000));
    assert!(
        matches!(
            past,
            Err(ImageError::ExtensionPastEnd {
                offset: 112,
                len: 5008,
                end: 4096
            })
        ),
        "{past:?}"
    );
    let long = mutated(|h| put32(h, 116, 16));
    assert!(
        matches!(
            long,
            Err(ImageError::ExtensionLength {
                name: "backing format",
                offset: 112,
                len: 16,
                ..
            })
        ),
        "{long:?}"
    );
}

#[test]
fn rejects_truncated_files() {
    assert!(matches!(
        Header::parse(&header()[..80], 80),
        Err(ImageError::PastEnd {
            what: "qcow2 header",
            ..
        })
    ));
    assert_err(
        open_bytes(b"QFI"),
        "not a qcow2 image (it starts with 51 46 49)",
    );
    assert_err(open_bytes(b""), "not a qcow2 image (it is empty)");
}
