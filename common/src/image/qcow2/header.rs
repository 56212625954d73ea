//! The qcow2 header (cluster 0): the fixed fields, the header extensions and the backing
//! file name, parsed in two layers: [`RawHeader`] holds the big-endian fields as stored, and
//! [`Header`] is built from it only by [`Header::parse`], which checks every field before it
//! is used as a shift, a size or an offset.
//!
//! ```text
//! 0   magic "QFI\xfb"        4  version (2, 3)       8  backing_file_offset  16 backing_file_size
//! 20  cluster_bits           24 size                32 crypt_method         36 l1_size
//! 40  l1_table_offset        48 refcount_table_offset                       56 refcount_table_clusters
//! 60  nb_snapshots           64 snapshots_offset
//! v3: 72 incompatible_features  80 compatible_features  88 autoclear_features
//!     96 refcount_order         100 header_length       104 compression_type (if length > 104)
//! then header extensions (u32 type, u32 len, data padded to 8; type 0 ends), then the backing
//! file name, all inside cluster 0.
//! ```

use super::bytes::{be_u32, be_u64, check_table};
use super::extension::{walk_extensions, BitmapsExtension, Extensions};
use super::tables::Geometry;
use crate::limits::{MAX_L1_BYTES, MAX_SNAPSHOTS, MAX_VIRTUAL_BYTES};
use crate::ImageError;

/// The qcow2 magic, `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Incompatible feature bit 0: refcounts may be stale (harmless for a reader).
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
/// Incompatible feature bit 1: the image is marked corrupt (readable, not writable).
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
/// Incompatible feature bit 2: guest data lives in an external data file.
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
/// Incompatible feature bit 3: the compression type field is not deflate.
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
/// Incompatible feature bit 4: extended L2 entries (subclusters).
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// The incompatible features this reader handles.
pub const INCOMPAT_SUPPORTED: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit 0: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear feature bit 0: the bitmaps extension is consistent.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
/// Autoclear feature bit 1: the external data file is a raw image by itself.
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Length of a version 2 header.
pub const V2_HEADER_LENGTH: u32 = 72;
/// Shortest version 3 header.
pub const V3_MIN_HEADER_LENGTH: u32 = 104;
/// Longest backing file name QEMU accepts.
pub const MAX_BACKING_NAME_BYTES: u32 = 1023;
/// Largest refcount table QEMU accepts (`QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// Size of a snapshot table entry's fixed part.
pub const SNAPSHOT_ENTRY_FIXED_BYTES: u64 = 40;
/// Bytes of the fixed header read before the cluster size is known.
pub const RAW_HEADER_BYTES: usize = 112;

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompressionType {
    /// Raw deflate (RFC 1951), type 0.
    Deflate,
    /// zstd frames, type 1.
    Zstd,
}

/// The fixed header fields exactly as stored, before any check. Fields absent from a version 2
/// header (or beyond `header_length`) read as 0.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RawHeader {
    /// Bytes 0-3.
    pub magic: [u8; 4],
    /// Bytes 4-7.
    pub version: u32,
    /// Bytes 8-15.
    pub backing_file_offset: u64,
    /// Bytes 16-19.
    pub backing_file_size: u32,
    /// Bytes 20-23.
    pub cluster_bits: u32,
    /// Bytes 24-31.
    pub size: u64,
    /// Bytes 32-35.
    pub crypt_method: u32,
    /// Bytes 36-39.
    pub l1_size: u32,
    /// Bytes 40-47.
    pub l1_table_offset: u64,
    /// Bytes 48-55.
    pub refcount_table_offset: u64,
    /// Bytes 56-59.
    pub refcount_table_clusters: u32,
    /// Bytes 60-63.
    pub nb_snapshots: u32,
    /// Bytes 64-71.
    pub snapshots_offset: u64,
    /// Bytes 72-79 (v3).
    pub incompatible_features: u64,
    /// Bytes 80-87 (v3).
    pub compatible_features: u64,
    /// Bytes 88-95 (v3).
    pub autoclear_features: u64,
    /// Bytes 96-99 (v3).
    pub refcount_order: u32,
    /// Bytes 100-103 (v3).
    pub header_length: u32,
    /// Byte 104 (v3, when header_length > 104).
    pub compression_type: u8,
}

impl RawHeader {
    /// Decodes the fixed fields from the first bytes of the file; missing bytes read as 0, and
    /// so do the version 3 fields of a version 2 header (its extensions start at byte 72) and
    /// the compression type of a header not longer than 104 bytes.
    pub fn parse(bytes: &[u8]) -> RawHeader {
        let mut b = [0u8; RAW_HEADER_BYTES];
        let n = bytes.len().min(RAW_HEADER_BYTES);
        b[..n].copy_from_slice(&bytes[..n]);
        if be_u32(&b, 4) < 3 {
            b[V2_HEADER_LENGTH as usize..].fill(0);
        }
        if be_u32(&b, 100) <= V3_MIN_HEADER_LENGTH {
            b[V3_MIN_HEADER_LENGTH as usize..].fill(0);
        }
        RawHeader {
            magic: [b[0], b[1], b[2], b[3]],
            version: be_u32(&b, 4),
            backing_file_offset: be_u64(&b, 8),
            backing_file_size: be_u32(&b, 16),
            cluster_bits: be_u32(&b, 20),
            size: be_u64(&b, 24),
            crypt_method: be_u32(&b, 32),
            l1_size: be_u32(&b, 36),
            l1_table_offset: be_u64(&b, 40),
            refcount_table_offset: be_u64(&b, 48),
            refcount_table_clusters: be_u32(&b, 56),
            nb_snapshots: be_u32(&b, 60),
            snapshots_offset: be_u64(&b, 64),
            incompatible_features: be_u64(&b, 72),
            compatible_features: be_u64(&b, 80),
            autoclear_features: be_u64(&b, 88),
            refcount_order: be_u32(&b, 96),
            header_length: be_u32(&b, 100),
            compression_type: b[104],
        }
    }
}

/// A validated qcow2 header. Only [`Header::parse`] builds one, so every field is in range:
/// the cluster size is 512 B..=2 MiB, the tables it names are cluster-aligned and lie inside
/// the file, and no unsupported feature is in use.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size, 9..=21 (≥ 14 with extended L2).
    pub cluster_bits: u32,
    /// Virtual size of the active layer in bytes.
    pub size: u64,
    /// Entries of the active L1 table.
    pub l1_size: u32,
    /// Offset of the active L1 table.
    pub l1_table_offset: u64,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Size of the refcount table in clusters.
    pub refcount_table_clusters: u32,
    /// Number of internal snapshots.
    pub nb_snapshots: u32,
    /// Offset of the snapshot table (0 without snapshots).
    pub snapshots_offset: u64,
    /// Incompatible feature bits (only supported ones).
    pub incompatible_features: u64,
    /// Compatible feature bits.
    pub compatible_features: u64,
    /// Autoclear feature bits.
    pub autoclear_features: u64,
    /// refcount_bits = 1 << refcount_order (4 for version 2).
    pub refcount_order: u32,
    /// Header length in bytes (72 for version 2).
    pub header_length: u32,
    /// How compressed clusters are compressed.
    pub compression_type: CompressionType,
    /// Whether L2 entries are extended (subclusters).
    pub extended_l2: bool,
    /// The backing file name as stored (maybe relative to the image's directory).
    pub backing_file: Option<String>,
    /// The backing file format from the header extension, if present.
    pub backing_format: Option<String>,
    /// The bitmaps extension, if present.
    pub bitmaps: Option<BitmapsExtension>,
}

/// A header field error: `field` at header `offset` holds `value`, valid is `expected`.
fn field(field: &'static str, offset: u64, value: u64, expected: String) -> ImageError {
    ImageError::HeaderField {
        field,
        offset,
        value,
        expected,
    }
}

impl Header {
    /// Validates the header from the start of the file (`cluster0`: the first cluster, or as
    /// much of it as the file holds; missing bytes read as 0, as QEMU reads them) of a file of
    /// `file_len` bytes.
    pub fn parse(cluster0: &[u8], file_len: u64) -> Result<Header, ImageError> {
        let raw = RawHeader::parse(cluster0);
        if raw.magic != MAGIC {
            let found = cluster0[..cluster0.len().min(MAGIC.len())].to_vec();
            return Err(ImageError::BadMagic { found });
        }
        check_version(&raw)?;
        let cluster_bits = check_cluster_bits(&raw)?;
        let cluster_size = 1usize << cluster_bits;
        let mut c0 = vec![0u8; cluster_size];
        let n = cluster0.len().min(cluster_size);
        c0[..n].copy_from_slice(&cluster0[..n]);
        let header_length = check_header_length(&raw, file_len)?;
        check_backing_offset(&raw, cluster_size as u64)?;
        let ext = walk_extensions(&c0, header_length, raw.backing_file_offset)?;
        check_incompatible(&raw, &ext)?;
        check_crypt(&raw)?;
        let compression_type = check_compression(&raw, header_length)?;
        let extended_l2 = raw.incompatible_features & INCOMPAT_EXTL2 != 0;
        if extended_l2 && cluster_bits < 14 {
            return Err(field(
                "cluster_bits",
                20,
                cluster_bits.into(),
                "at least 14 with extended L2 entries (clusters of at least 16 KiB)".into(),
            ));
        }
        let refcount_order = check_refcount_order(&raw)?;
        let geometry = Geometry::new(cluster_bits, extended_l2);
        check_size_and_l1(&raw, geometry, file_len)?;
        check_refcount_table(&raw, geometry, file_len)?;
        check_snapshot_table(&raw, geometry, file_len)?;
        let backing_file = read_backing_name(&raw, &c0)?;
        Ok(Header {
            version: raw.version,
            cluster_bits,
            size: raw.size,
            l1_size: raw.l1_size,
            l1_table_offset: raw.l1_table_offset,
            refcount_table_offset: raw.refcount_table_offset,
            refcount_table_clusters: raw.refcount_table_clusters,
            nb_snapshots: raw.nb_snapshots,
            snapshots_offset: raw.snapshots_offset,
            incompatible_features: raw.incompatible_features,
            compatible_features: raw.compatible_features,
            autoclear_features: raw.autoclear_features,
            refcount_order,
            header_length,
            compression_type,
            extended_l2,
            backing_file,
            backing_format: ext.backing_format,
            bitmaps: ext.bitmaps,
        })
    }

    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The L2 geometry of this image.
    pub fn geometry(&self) -> Geometry {
        Geometry::new(self.cluster_bits, self.extended_l2)
    }

    /// Whether the dirty bit is set (refcounts may be stale).
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Whether the image is marked corrupt.
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
}

fn check_version(raw: &RawHeader) -> Result<(), ImageError> {
    match raw.version {
        2 | 3 => Ok(()),
        version => Err(ImageError::UnsupportedVersion { version }),
    }
}

fn check_cluster_bits(raw: &RawHeader) -> Result<u32, ImageError> {
    match raw.cluster_bits {
        9..=21 => Ok(raw.cluster_bits),
        bits => Err(ImageError::ClusterBits { bits }),
    }
}

fn check_header_length(raw: &RawHeader, file_len: u64) -> Result<u32, ImageError> {
    let cluster_size = 1u64 << raw.cluster_bits;
    let fixed = match raw.version {
        2 => V2_HEADER_LENGTH,
        _ => V3_MIN_HEADER_LENGTH,
    };
    if u64::from(fixed) > file_len {
        return Err(ImageError::PastEnd {
            what: "qcow2 header",
            offset: 0,
            len: u64::from(fixed),
            file_len,
        });
    }
    let len = if raw.version == 2 {
        V2_HEADER_LENGTH
    } else {
        raw.header_length
    };
    if raw.version == 3 && (len < V3_MIN_HEADER_LENGTH || len % 8 != 0) {
        let expected = format!("a multiple of 8, at least {V3_MIN_HEADER_LENGTH}");
        return Err(field("header_length", 100, len.into(), expected));
    }
    if u64::from(len) > cluster_size {
        let expected = format!("at most the cluster size {cluster_size}");
        return Err(field("header_length", 100, len.into(), expected));
    }
    if u64::from(len) > file_len {
        return Err(ImageError::PastEnd {
            what: "qcow2 header",
            offset: 0,
            len: u64::from(len),
            file_len,
        });
    }
    Ok(len)
}

fn check_incompatible(raw: &RawHeader, ext: &Extensions) -> Result<(), ImageError> {
    let bits = raw.incompatible_features;
    if bits & INCOMPAT_DATA_FILE != 0 {
        return Err(ImageError::Unsupported("external data file".into()));
    }
    let unknown = bits & !INCOMPAT_SUPPORTED;
    if unknown == 0 {
        return Ok(());
    }
    let bit = unknown.trailing_zeros();
    let name = ext
        .feature_names
        .iter()
        .find(|(kind, b, _)| *kind == 0 && u32::from(*b) == bit)
        .map(|(_, _, n)| format!(" ({n})"))
        .unwrap_or_default();
    Err(ImageError::Unsupported(format!(
        "incompatible feature bit {bit}{name} (incompatible_features {bits:#x})"
    )))
}

fn check_crypt(raw: &RawHeader) -> Result<(), ImageError> {
    match raw.crypt_method {
        0 => Ok(()),
        1 => Err(ImageError::Unsupported("encryption (AES)".into())),
        2 => Err(ImageError::Unsupported("encryption (LUKS)".into())),
        m => Err(field(
            "crypt_method",
            32,
            m.into(),
            "0 (none), 1 (AES) or 2 (LUKS)".into(),
        )),
    }
}

fn check_compression(raw: &RawHeader, header_length: u32) -> Result<CompressionType, ImageError> {
    let stored = if header_length > V3_MIN_HEADER_LENGTH {
        raw.compression_type
    } else {
        0
    };
    let kind = match stored {
        0 => CompressionType::Deflate,
        1 => CompressionType::Zstd,
        t => return Err(ImageError::Unsupported(format!("compression type {t}"))),
    };
    let bit = raw.incompatible_features & INCOMPAT_COMPRESSION != 0;
    if bit != (kind != CompressionType::Deflate) {
        let expected = if bit {
            "not 0 (deflate): incompatible feature bit 3 is set"
        } else {
            "0 (deflate): incompatible feature bit 3 is clear"
        };
        return Err(field(
            "compression_type",
            104,
            stored.into(),
            expected.into(),
        ));
    }
    Ok(kind)
}

fn check_refcount_order(raw: &RawHeader) -> Result<u32, ImageError> {
    if raw.version == 2 {
        return Ok(4);
    }
    match raw.refcount_order {
        0..=6 => Ok(raw.refcount_order),
        o => Err(field("refcount_order", 96, o.into(), "0..=6".into())),
    }
}

fn check_size_and_l1(raw: &RawHeader, g: Geometry, file_len: u64) -> Result<(), ImageError> {
    if raw.size > MAX_VIRTUAL_BYTES {
        let expected = format!("a virtual size of at most {MAX_VIRTUAL_BYTES} bytes");
        return Err(field("size", 24, raw.size, expected));
    }
    let needed = g.l1_entries_for(raw.size);
    if u64::from(raw.l1_size) < needed {
        let expected = format!(
            "at least {needed} entries for the virtual size {}",
            raw.size
        );
        return Err(field("l1_size", 36, raw.l1_size.into(), expected));
    }
    let l1_bytes = u64::from(raw.l1_size) * 8;
    if l1_bytes > MAX_L1_BYTES {
        return Err(ImageError::TableTooLarge {
            what: "active L1 table",
            offset: raw.l1_table_offset,
            entries: raw.l1_size.into(),
            limit_bytes: MAX_L1_BYTES,
        });
    }
    let cs = g.cluster_size();
    check_table(
        "active L1 table",
        raw.l1_table_offset,
        l1_bytes,
        cs,
        file_len,
    )
}

fn check_refcount_table(raw: &RawHeader, g: Geometry, file_len: u64) -> Result<(), ImageError> {
    let cs = g.cluster_size();
    let bytes = u64::from(raw.refcount_table_clusters) * cs;
    if raw.refcount_table_clusters == 0 || bytes > MAX_REFTABLE_BYTES {
        let expected = format!("1..={}", MAX_REFTABLE_BYTES / cs);
        let value = raw.refcount_table_clusters.into();
        return Err(field("refcount_table_clusters", 56, value, expected));
    }
    check_table(
        "refcount table",
        raw.refcount_table_offset,
        bytes,
        cs,
        file_len,
    )
}

fn check_snapshot_table(raw: &RawHeader, g: Geometry, file_len: u64) -> Result<(), ImageError> {
    if raw.nb_snapshots > MAX_SNAPSHOTS {
        let expected = format!("at most {MAX_SNAPSHOTS}");
        return Err(field("nb_snapshots", 60, raw.nb_snapshots.into(), expected));
    }
    if raw.nb_snapshots == 0 {
        return Ok(());
    }
    // Each entry has at least its fixed part; the variable parts are checked while reading.
    let min_len = u64::from(raw.nb_snapshots) * SNAPSHOT_ENTRY_FIXED_BYTES;
    let cs = g.cluster_size();
    check_table(
        "snapshot table",
        raw.snapshots_offset,
        min_len,
        cs,
        file_len,
    )
}

/// Checks that the backing file name starts inside cluster 0, which ends the extension area.
fn check_backing_offset(raw: &RawHeader, cluster_size: u64) -> Result<(), ImageError> {
    if raw.backing_file_offset > cluster_size {
        return Err(backing_name(raw, cluster_size));
    }
    Ok(())
}

fn backing_name(raw: &RawHeader, cluster_size: u64) -> ImageError {
    ImageError::BackingName {
        offset: raw.backing_file_offset,
        len: raw.backing_file_size.into(),
        cluster_size,
        max_len: MAX_BACKING_NAME_BYTES.into(),
    }
}

fn read_backing_name(raw: &RawHeader, c0: &[u8]) -> Result<Option<String>, ImageError> {
    if raw.backing_file_offset == 0 {
        return Ok(None);
    }
    let (offset, len) = (raw.backing_file_offset, raw.backing_file_size);
    let fits = offset
        .checked_add(u64::from(len))
        .is_some_and(|end| end <= c0.len() as u64);
    if len > MAX_BACKING_NAME_BYTES || !fits {
        return Err(backing_name(raw, c0.len() as u64));
    }
    let bytes = &c0[offset as usize..offset as usize + len as usize];
    // An empty name means no backing file, as in QEMU.
    match std::str::from_utf8(bytes) {
        Ok("") => Ok(None),
        Ok(name) => Ok(Some(name.to_owned())),
        Err(_) => Err(ImageError::Unsupported(format!(
            "backing file name at offset {offset:#x} is not UTF-8"
        ))),
    }
}
