//! The stream header: what the stream carries, decided before the first record.

use serde::{Deserialize, Serialize};

use crate::limits;

/// A named state of a disk (a snapshot) with a stable identity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapRef {
    /// Human name (the snapshot name).
    pub name: String,
    /// Stable identity; the receiver compares GUIDs, never names alone.
    pub guid: [u8; 16],
}

/// One step of a stream: the replica goes from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// The state the replica must hold before; `None` for a full stream.
    pub from: Option<SnapRef>,
    /// The state the replica holds after this transition's snapshot-end record.
    pub to: SnapRef,
    /// Virtual size of `to` in bytes.
    pub virtual_size: u64,
}

/// Where the stream comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceInfo {
    /// Kind of source (`qcow2`, `raw`).
    pub kind: String,
    /// Display name of the source (its file name).
    pub name: String,
}

/// The header record: identity of the stream, its transitions and its totals.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamHeader {
    /// Random identity of this stream.
    pub stream_id: [u8; 16],
    /// Virtual size of the final state.
    pub virtual_size: u64,
    /// Where the stream comes from.
    pub source: SourceInfo,
    /// The transitions, applied in order.
    pub transitions: Vec<Transition>,
    /// Number of data, zero and discard extents the sender planned (before chunking).
    pub total_extents: u64,
    /// Plain bytes of data the stream carries.
    pub total_data_bytes: u64,
    /// Bytes covered by zero and discard records.
    pub total_zero_bytes: u64,
    /// A resumed stream: the first transition's records start at this disk offset, below
    /// which the replica already holds them (0 for a stream that is not resumed).
    pub resume_offset: u64,
}

impl StreamHeader {
    /// Checks the header's own rules; returns a description of the first one broken.
    pub fn validate(&self) -> Result<(), String> {
        if self.transitions.is_empty() {
            return Err("header carries no transition".into());
        }
        if self.transitions.len() > limits::MAX_TRANSITIONS {
            return Err(format!(
                "header carries {} transitions (limit {})",
                self.transitions.len(),
                limits::MAX_TRANSITIONS
            ));
        }
        check_name("source name", &self.source.name)?;
        check_name("source kind", &self.source.kind)?;
        for (i, t) in self.transitions.iter().enumerate() {
            if t.virtual_size > limits::MAX_VIRTUAL_BYTES {
                return Err(format!(
                    "transition {i} has virtual size {} (limit {})",
                    t.virtual_size,
                    limits::MAX_VIRTUAL_BYTES
                ));
            }
            check_name("snapshot name", &t.to.name)?;
            if let Some(f) = &t.from {
                check_name("snapshot name", &f.name)?;
            }
            if i > 0 && t.from.as_ref() != Some(&self.transitions[i - 1].to) {
                return Err(format!(
                    "transition {i} does not start where transition {} ends",
                    i - 1
                ));
            }
        }
        if self.resume_offset > self.transitions[0].virtual_size {
            return Err(format!(
                "resume offset {} past the first transition's virtual size {}",
                self.resume_offset, self.transitions[0].virtual_size
            ));
        }
        let last = self.transitions.last().expect("not empty");
        if last.virtual_size != self.virtual_size {
            return Err(format!(
                "header virtual size {} differs from the last transition's {}",
                self.virtual_size, last.virtual_size
            ));
        }
        Ok(())
    }

    /// Whether the first transition is a full stream (no base).
    pub fn is_full(&self) -> bool {
        self.transitions[0].from.is_none()
    }
}

fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.len() > limits::MAX_NAME_BYTES {
        return Err(format!(
            "{what} is {} bytes long (limit {})",
            name.len(),
            limits::MAX_NAME_BYTES
        ));
    }
    Ok(())
}
