//! Hexadecimal text of byte strings: digests, GUIDs and ids as they appear in block lists,
//! state files, resume tokens and command output. Written in lower case; read in either case.
//!
//! ```
//! use blkdelta_common::hex::{from_hex, to_hex};
//! assert_eq!(to_hex(&[0x0b, 0xad]), "0bad");
//! assert_eq!(from_hex::<2>("0BaD"), Some([0x0b, 0xad]));
//! ```

#[cfg(test)]
mod tests;

/// Lower-case hex of `bytes`, two digits a byte.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// The `N` bytes that exactly `2 * N` hex digits (either case, nothing else: no sign, no
/// spaces, no `0x`) spell; `None` for any other text.
pub fn from_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let digits = s.as_bytes();
    if digits.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

/// The value of one hex digit.
fn digit(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}
