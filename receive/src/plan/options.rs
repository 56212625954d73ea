//! What a receive is told: the checks it may skip and how it applies.

use std::path::PathBuf;

/// Applied bytes between two checkpoints of the durable offset (a sync and a state update).
pub const CHECKPOINT_BYTES: u64 = 256 << 20;

/// The checks a receive may be told to skip, one switch each, since their risks differ.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Overrides {
    /// `--rebase`: apply an incremental onto a replica that does not hold its base.
    pub rebase: bool,
    /// `--overwrite`: write onto unknown data, or onto a replica changed since blkdelta last
    /// wrote it.
    pub overwrite: bool,
    /// `--rewind`: apply a stream older than what the replica holds, one it already went
    /// through, or a full stream onto an existing replica of the same source.
    pub rewind: bool,
}

impl Overrides {
    /// Every check skipped (`--force`).
    pub fn all() -> Self {
        Overrides {
            rebase: true,
            overwrite: true,
            rewind: true,
        }
    }
}

/// How to receive.
#[derive(Debug, Clone, Default)]
pub struct ReceiveOptions {
    /// The checks to skip.
    pub overrides: Overrides,
    /// Accept a replica whose state is missing, changed or in progress, for a repair stream
    /// (`send --against`): its content is checked against the stream's base digest instead.
    pub repair: bool,
    /// Save the old contents of every overwritten range into this undo stream.
    pub undo: Option<PathBuf>,
    /// Read and verify everything, touch nothing.
    pub dry_run: bool,
    /// Applied bytes between checkpoints of the durable offset (0: [`CHECKPOINT_BYTES`]).
    pub checkpoint_bytes: u64,
    /// What the replica is kept as (`None`: what the target is, or its name says).
    pub format: Option<crate::target::ReplicaFormat>,
    /// log2 of the cluster size of a new qcow2 replica (0: 64 KiB).
    pub cluster_bits: u32,
}
