//! Fault injection, end to end. The receiver is SIGKILLed at many points of a multi-snapshot
//! stream; the stream is truncated and altered byte by byte; the target's filesystem fills up
//! or turns read-only. After each fault the exit is non-zero with a one-line error, `status`
//! tells the truth (a snapshot it says the replica holds is byte for byte qemu's export of that
//! snapshot; otherwise it says "in progress" and names no held snapshot), and re-applying the
//! stream, or resuming it from the token `status` prints, gives exactly the last snapshot.
//!
//! The receiver holds every record back until a later checkpoint or snapshot-end record (a
//! verified point) vouches for the stream before it: after a failure, the replica is the last
//! snapshot reached plus exactly the records up to the last verified point the receiver read
//! completely, and nothing read after that point (a record cut short, damaged, or inserted)
//! reaches it.
//!
//! Tests that mount filesystems need root; they skip loudly (`SKIPPED: ...`) when mounting is
//! impossible (and fail under `BLKDELTA_REQUIRE_TOOLS=1`). Mounts and child processes are undone by guards, even when a test fails.
//!
//! `fixture` builds the image and its streams and knows where each record lies; `truth` checks
//! what `status` says against qemu's exports; one module per kind of fault.

mod fixture;
mod truth;

mod flips;
mod full_disk;
mod offsets;
mod read_only;
mod sigkill;
mod truncation;

use blkdelta_common::stream::{DATA_FIXED_BYTES, FRAME_HEADER_BYTES, MAGIC};

/// The snapshots of the fixture image.
const SNAPS: [&str; 4] = ["s0", "s1", "s2", "s3"];
/// Bytes of the preamble (magic, version u32): the header's frame starts here.
const PREAMBLE: u64 = MAGIC.len() as u64 + 4;
/// Bytes of a frame header (docs/STREAM.md): `u8 type | u8 flags | u16 reserved |
/// u32 LE body_len | check[8]`; a record's body starts `FRAME` bytes after its `at`.
const FRAME: u64 = FRAME_HEADER_BYTES as u64;
/// Bytes of a data record's fixed fields: offset u64, len u32, compression u8, hash[32].
const DATA_FIXED: u64 = DATA_FIXED_BYTES as u64;
/// `--checkpoint-bytes` for frequent checkpoints of the durable offset.
const CKPT: [&str; 2] = ["--checkpoint-bytes", "1048576"];
