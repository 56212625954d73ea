//! Resume tokens: where an interrupted receive can pick up, as one printable word.
//!
//! ```text
//! bd1-<hex of: from flag u8 | from guid [16] | to guid [16] | offset u64 LE | check [4]>
//! ```
//! `check` is the first four bytes of the blake3 of what precedes it, so a token mangled in a
//! copy and paste is refused rather than misread.

use std::fmt;

/// The point an interrupted receive reached: transition `from` → `to`, durable below `offset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumeToken {
    /// GUID of the transition's base (`None` for a full stream).
    pub from: Option<[u8; 16]>,
    /// GUID of the transition's target state.
    pub to: [u8; 16],
    /// Disk offset below which the replica holds the transition's records.
    pub offset: u64,
}

const PREFIX: &str = "bd1-";
const BODY_BYTES: usize = 1 + 16 + 16 + 8;

impl ResumeToken {
    fn body(&self) -> [u8; BODY_BYTES] {
        let mut b = [0u8; BODY_BYTES];
        b[0] = u8::from(self.from.is_some());
        b[1..17].copy_from_slice(&self.from.unwrap_or_default());
        b[17..33].copy_from_slice(&self.to);
        b[33..41].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Parses a token printed by `blkdelta status`.
    pub fn parse(s: &str) -> Result<Self, String> {
        let bad = || format!("'{s}' is not a blkdelta resume token");
        let hex = s.trim().strip_prefix(PREFIX).ok_or_else(bad)?;
        let bytes: [u8; BODY_BYTES + 4] = crate::hex::from_hex(hex).ok_or_else(bad)?;
        let (body, check) = bytes.split_at(BODY_BYTES);
        if blake3::hash(body).as_bytes()[..4] != *check || body[0] > 1 {
            return Err(format!(
                "{}: damaged (its check digits do not match)",
                bad()
            ));
        }
        let guid = |r: std::ops::Range<usize>| -> [u8; 16] { body[r].try_into().expect("16") };
        Ok(ResumeToken {
            from: (body[0] == 1).then(|| guid(1..17)),
            to: guid(17..33),
            offset: u64::from_le_bytes(body[33..41].try_into().expect("8")),
        })
    }
}

impl fmt::Display for ResumeToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let body = self.body();
        let check = blake3::hash(&body);
        let mut bytes = [0u8; BODY_BYTES + 4];
        bytes[..BODY_BYTES].copy_from_slice(&body);
        bytes[BODY_BYTES..].copy_from_slice(&check.as_bytes()[..4]);
        write!(f, "{PREFIX}{}", crate::hex::to_hex(&bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_damage() {
        for from in [None, Some([3u8; 16])] {
            let t = ResumeToken {
                from,
                to: [9; 16],
                offset: 123 << 20,
            };
            let s = t.to_string();
            assert_eq!(ResumeToken::parse(&s).unwrap(), t);
            let mut damaged = s.clone().into_bytes();
            let i = damaged.len() - 12;
            damaged[i] = if damaged[i] == b'0' { b'1' } else { b'0' };
            let err = ResumeToken::parse(std::str::from_utf8(&damaged).unwrap()).unwrap_err();
            assert!(err.contains("damaged"), "{err}");
        }
        assert!(ResumeToken::parse("bd1-zz").is_err());
        assert!(ResumeToken::parse("hello").is_err());
    }
}
