//! Feeds arbitrary bytes to the stream decoder: reads the header, every record, and
//! decompresses and verifies every data record. Nothing may panic, hang or allocate more
//! than the record limits allow.
//!
//! Each input is decoded twice: as it is, and with its checks made right (see
//! [`fix_checks`]), so that mutations get past the per-frame check and the blake3 hashes
//! of data, checkpoint, snapshot-end and end records to the rules behind them.
#![no_main]

use blkdelta_common::buf::AlignedBuf;
use blkdelta_common::stream::{
    Record, RecordType, StreamReader, DATA_FIXED_BYTES, FRAME_HEADER_BYTES,
};
use libfuzzer_sys::fuzz_target;

/// Preamble: magic and version.
const PREAMBLE_BYTES: usize = 12;
/// The part of a frame header its check covers: type, flags, reserved, body length.
const CHECKED_HEAD_BYTES: usize = 8;
/// Where the blake3 of the plain bytes sits in a data record's body (after offset u64,
/// len u32, compression u8).
const DATA_HASH_AT: usize = 13;
/// Largest plain length of a data record.
const MAX_PLAIN_BYTES: usize = 1 << 20;

fn decode(bytes: &[u8]) {
    let Ok(mut reader) = StreamReader::new(bytes) else {
        return;
    };
    let _ = reader.header().is_full();
    // Every record consumes at least a frame header of input, so this loop is bounded by
    // the input's length.
    // Decompression reuses buffers as a receiver does: the plain bytes and the payloads go
    // back to the reader, and the leftover buffer is the next decompression's output.
    let mut spare = AlignedBuf::new();
    while let Ok(Some(record)) = reader.next_record() {
        if let Record::Data(d) = record {
            match d.into_plain(reader.record_position(), std::mem::take(&mut spare)) {
                Ok((plain, left)) => {
                    reader.recycle(plain);
                    spare = left;
                }
                Err(_) => spare = AlignedBuf::new(),
            }
        }
    }
}

/// Rewrites what a writer computes from the rest of the stream: the plain-bytes hash of
/// each data record (when its payload decompresses), the prefix hash that ends each
/// checkpoint and snapshot-end body, the record count and stream hash of the end record,
/// and the check of every frame.
fn fix_checks(bytes: &mut [u8]) {
    if bytes.len() < PREAMBLE_BYTES {
        return;
    }
    let mut hasher = blake3::Hasher::new();
    hasher.update(&bytes[..PREAMBLE_BYTES]);
    let mut records = 0u64;
    let mut at = PREAMBLE_BYTES;
    while bytes.len() - at >= FRAME_HEADER_BYTES {
        let kind = bytes[at];
        let body_len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let start = at + FRAME_HEADER_BYTES;
        if body_len > bytes.len() - start {
            return;
        }
        let (head, rest) = bytes[at..].split_at_mut(FRAME_HEADER_BYTES);
        let body = &mut rest[..body_len];
        let prefix = hasher.finalize();
        if kind == RecordType::Data as u8 {
            fix_data_hash(body);
        } else if (kind == RecordType::SnapshotEnd as u8 || kind == RecordType::Checkpoint as u8)
            && body_len >= 32
        {
            body[body_len - 32..].copy_from_slice(prefix.as_bytes());
        } else if kind == RecordType::End as u8 && body_len >= 40 {
            body[..8].copy_from_slice(&records.to_le_bytes());
            body[8..40].copy_from_slice(prefix.as_bytes());
        }
        // A data record's payload is covered by its plain-bytes hash, not by the check or the
        // running hash.
        let checked = if kind == RecordType::Data as u8 && body_len >= DATA_FIXED_BYTES {
            &body[..DATA_FIXED_BYTES]
        } else {
            &body[..]
        };
        let mut check = blake3::Hasher::new();
        check.update(&head[..CHECKED_HEAD_BYTES]);
        check.update(checked);
        head[CHECKED_HEAD_BYTES..].copy_from_slice(&check.finalize().as_bytes()[..8]);
        if kind != RecordType::End as u8 {
            hasher.update(head);
            hasher.update(checked);
            records += 1;
        }
        at = start + body_len;
    }
}

fn fix_data_hash(body: &mut [u8]) {
    if body.len() < DATA_FIXED_BYTES {
        return;
    }
    let len = u32::from_le_bytes(body[8..12].try_into().unwrap()) as usize;
    let payload = &body[DATA_FIXED_BYTES..];
    let hash = match body[12] {
        0 => blake3::hash(payload),
        1 => match zstd::bulk::decompress(payload, len.min(MAX_PLAIN_BYTES)) {
            Ok(plain) => blake3::hash(&plain),
            Err(_) => return,
        },
        _ => return,
    };
    body[DATA_HASH_AT..DATA_HASH_AT + 32].copy_from_slice(hash.as_bytes());
}

fuzz_target!(|data: &[u8]| {
    decode(data);
    let mut fixed = data.to_vec();
    fix_checks(&mut fixed);
    if fixed != data {
        decode(&fixed);
    }
});
