//! Decompression of one compressed cluster, bounded by the cluster size.
//!
//! * deflate (type 0): a raw RFC 1951 stream without a zlib header. QEMU writes it with a
//!   4 KiB window but inflates with any window, so this uses the default 32 KiB one. Like
//!   QEMU's `qcow2_zlib_decompress`, it succeeds once the cluster is full: bytes after that
//!   (the sector padding, or even more compressed data) are ignored.
//! * zstd (type 1): one or more frames without a length prefix, decoded as a stream until
//!   the cluster is full (QEMU's `qcow2_zstd_decompress`); the frame in progress must end
//!   exactly there, and the padding after it is ignored.

use flate2::{Decompress, FlushDecompress, Status};
use zstd::stream::raw::{DParameter, Decoder, InBuffer, Operation, OutBuffer};

use super::header::CompressionType;
use crate::ImageError;

/// Largest zstd window accepted (8 MiB, four times the largest cluster): bounds the decoder's
/// memory whatever window a hostile frame declares.
const ZSTD_WINDOW_LOG_MAX: u32 = 23;

/// Decompresses the stream `input` (read at host offset `offset`) into `out`, which is one
/// cluster long, filling it completely or failing.
pub(crate) fn decompress_cluster(
    kind: CompressionType,
    input: &[u8],
    out: &mut [u8],
    offset: u64,
) -> Result<(), ImageError> {
    let result = match kind {
        CompressionType::Deflate => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    };
    result.map_err(|reason| ImageError::Decompress { offset, reason })
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = Decompress::new(false);
    loop {
        let (read, written) = (d.total_in() as usize, d.total_out() as usize);
        if written == out.len() {
            return Ok(());
        }
        let status = d
            .decompress(&input[read..], &mut out[written..], FlushDecompress::Finish)
            .map_err(|e| format!("deflate: {e}"))?;
        let progress = d.total_in() as usize != read || d.total_out() as usize != written;
        if d.total_out() as usize == out.len() {
            return Ok(());
        }
        if status == Status::StreamEnd || !progress {
            return Err(format!(
                "deflate stream of {} bytes gives {} bytes, less than the cluster ({})",
                input.len(),
                d.total_out(),
                out.len()
            ));
        }
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut decoder = Decoder::new().map_err(|e| format!("zstd: {e}"))?;
    decoder
        .set_parameter(DParameter::WindowLogMax(ZSTD_WINDOW_LOG_MAX))
        .map_err(|e| format!("zstd: {e}"))?;
    let cluster = out.len();
    let mut src = InBuffer::around(input);
    let mut dst = OutBuffer::around(out);
    let mut hint = 0;
    while dst.pos() < cluster {
        let (read, written) = (src.pos(), dst.pos());
        hint = decoder
            .run(&mut src, &mut dst)
            .map_err(|e| format!("zstd after {written} bytes: {e}"))?;
        if src.pos() == read && dst.pos() == written {
            return Err(format!(
                "zstd stream of {} bytes gives {written} bytes, less than the cluster ({cluster})",
                input.len()
            ));
        }
    }
    if hint != 0 {
        return Err(format!(
            "zstd frame continues past the end of the cluster ({cluster} bytes)"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn deflate_raw(data: &[u8], level: u32) -> Vec<u8> {
        let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 7 % 251) as u8).collect()
    }

    #[test]
    fn deflate_fills_the_cluster_and_ignores_padding() {
        let plain = pattern(65536);
        let mut stream = deflate_raw(&plain, 6);
        stream.extend_from_slice(&[0u8; 300]);
        let mut out = vec![0u8; 65536];
        decompress_cluster(CompressionType::Deflate, &stream, &mut out, 0).unwrap();
        assert_eq!(out, plain);
    }

    #[test]
    fn deflate_longer_than_the_cluster_stops_at_the_cluster() {
        let plain = pattern(8192);
        let stream = deflate_raw(&plain, 6);
        let mut out = vec![0u8; 4096];
        decompress_cluster(CompressionType::Deflate, &stream, &mut out, 0).unwrap();
        assert_eq!(out, plain[..4096]);
    }

    #[test]
    fn short_or_garbage_streams_fail() {
        let stream = deflate_raw(&pattern(1000), 6);
        let mut out = vec![0u8; 4096];
        let err = decompress_cluster(CompressionType::Deflate, &stream, &mut out, 0x5004f);
        assert!(matches!(
            err,
            Err(ImageError::Decompress {
                offset: 0x5004f,
                ..
            })
        ));
        let half = deflate_raw(&pattern(4096), 6);
        assert!(decompress_cluster(
            CompressionType::Deflate,
            &half[..half.len() / 2],
            &mut out,
            0
        )
        .is_err());
        assert!(decompress_cluster(CompressionType::Deflate, &[0xff; 64], &mut out, 0).is_err());
        assert!(decompress_cluster(CompressionType::Zstd, &[0xff; 64], &mut out, 0).is_err());
        assert!(decompress_cluster(CompressionType::Zstd, &[], &mut out, 0).is_err());
    }

    #[test]
    fn zstd_reads_concatenated_frames_and_ignores_padding() {
        let plain = pattern(65536);
        let mut stream = zstd::bulk::compress(&plain[..30000], 3).unwrap();
        stream.extend(zstd::bulk::compress(&plain[30000..], 3).unwrap());
        stream.extend_from_slice(&[0u8; 100]);
        let mut out = vec![0u8; 65536];
        decompress_cluster(CompressionType::Zstd, &stream, &mut out, 0).unwrap();
        assert_eq!(out, plain);
    }

    #[test]
    fn zstd_frame_longer_than_the_cluster_fails() {
        let stream = zstd::bulk::compress(&pattern(8192), 3).unwrap();
        let mut out = vec![0u8; 4096];
        assert!(decompress_cluster(CompressionType::Zstd, &stream, &mut out, 0).is_err());
        let short = zstd::bulk::compress(&pattern(1000), 3).unwrap();
        assert!(decompress_cluster(CompressionType::Zstd, &short, &mut out, 0).is_err());
    }
}
