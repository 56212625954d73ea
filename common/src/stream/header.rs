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

/// Domain of the GUIDs of named states (derived from the name, see [`SnapRef::named`]).
const NAMED_STATE_DOMAIN: &[u8] = b"blkdelta-named-state-v1";

impl SnapRef {
    /// A reference to *whichever* state is called `name`, for sources whose states have no
    /// identity of their own (a bitmap's epoch, a raw file, a change map): its GUID is the first
    /// 16 bytes of blake3("blkdelta-named-state-v1" || name). A stream names its base this way;
    /// a receiver matches it with a held state of that name (see [`SnapRef::answers_to`]).
    pub fn named(name: &str) -> SnapRef {
        SnapRef {
            name: name.to_string(),
            guid: named_guid(name),
        }
    }

    /// One particular state called `name`, told apart from every other state of that name by
    /// `fingerprint` (what the source looked like when it was sent): the first 8 bytes of its
    /// GUID are those of [`SnapRef::named`], the last 8 those of blake3(fingerprint). Two
    /// cycles of a bitmap called `daily` thus produce two states a replica can tell apart,
    /// while sending the same unchanged source again gives the same state.
    pub fn named_state(name: &str, fingerprint: &[u8]) -> SnapRef {
        let mut guid = named_guid(name);
        guid[8..].copy_from_slice(&blake3::hash(fingerprint).as_bytes()[..8]);
        SnapRef {
            name: name.to_string(),
            guid,
        }
    }

    /// Whether this is a reference to any state of its name ([`SnapRef::named`]).
    pub fn is_name_ref(&self) -> bool {
        self.guid == named_guid(&self.name)
    }

    /// Whether a replica holding the state `held` (name and GUID) holds this one: the same
    /// GUID, or, for a reference by name, a named state of that name.
    pub fn answers_to(&self, held_name: &str, held_guid: &[u8; 16]) -> bool {
        if self.guid == *held_guid {
            return true;
        }
        self.is_name_ref() && held_name == self.name && held_guid[..8] == self.guid[..8]
    }
}

fn named_guid(name: &str) -> [u8; 16] {
    let mut h = blake3::Hasher::new();
    h.update(NAMED_STATE_DOMAIN);
    h.update(name.as_bytes());
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&h.finalize().as_bytes()[..16]);
    guid
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

/// Checks a name carried in a stream against [`limits::MAX_NAME_BYTES`].
pub(super) fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.len() > limits::MAX_NAME_BYTES {
        return Err(format!(
            "{what} is {} bytes long (limit {})",
            name.len(),
            limits::MAX_NAME_BYTES
        ));
    }
    Ok(())
}

#[cfg(test)]
mod named_tests {
    use super::SnapRef;

    #[test]
    fn a_name_reference_answers_to_every_state_of_that_name_and_only_those() {
        let any = SnapRef::named("daily");
        let first = SnapRef::named_state("daily", b"cycle 1");
        let second = SnapRef::named_state("daily", b"cycle 2");
        assert!(any.is_name_ref() && !first.is_name_ref());
        assert_ne!(first.guid, second.guid);
        assert_eq!(first, SnapRef::named_state("daily", b"cycle 1"));
        assert!(any.answers_to("daily", &first.guid));
        assert!(any.answers_to("daily", &any.guid));
        assert!(!any.answers_to("weekly", &SnapRef::named_state("weekly", b"x").guid));
        // A state of another kind that happens to share the name is not a named state.
        assert!(!any.answers_to("daily", &[7; 16]));
        // A particular state answers only to itself.
        assert!(!first.answers_to("daily", &second.guid));
    }
}
