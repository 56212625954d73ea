//! Identities of states that have none of their own (a bitmap's epoch, a raw file, a change
//! map): the user names them, and the GUID is derived from the name, so the receiver checks a
//! name exactly as it checks a qcow2 snapshot's GUID.

use blkdelta_common::stream::SnapRef;

/// The state called `name`: its GUID is the first 16 bytes of
/// blake3("blkdelta-named-state-v1" || name).
pub fn named(name: &str) -> SnapRef {
    let mut h = blake3::Hasher::new();
    h.update(b"blkdelta-named-state-v1");
    h.update(name.as_bytes());
    let mut guid = [0u8; 16];
    guid.copy_from_slice(&h.finalize().as_bytes()[..16]);
    SnapRef {
        name: name.to_string(),
        guid,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_give_stable_distinct_guids() {
        assert_eq!(named("daily"), named("daily"));
        assert_ne!(named("daily").guid, named("weekly").guid);
        assert_eq!(named("daily").name, "daily");
    }
}
