//! What a change map is made of once read, and why one is refused: the types the parser,
//! the range collector and the change-map source share.

use std::io;

/// What a listed range says about the device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapKind {
    /// The range changed: send what the device holds there.
    Changed,
    /// The range was unmapped: it reads as zeros and can be discarded.
    Discarded,
}

/// One range of a parsed map, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapRange {
    /// First byte.
    pub offset: u64,
    /// Length in bytes, never zero.
    pub len: u64,
    /// What happened to the range.
    pub kind: MapKind,
}

impl MapRange {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Which tool wrote a map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapFormat {
    /// thin_delta XML.
    ThinDelta,
    /// era_invalidate XML.
    EraInvalidate,
    /// `OFFSET LENGTH` lines in bytes.
    Lines,
}

/// A parsed map: its ranges sorted, merged and within the device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeMap {
    /// The tool that wrote it.
    pub format: MapFormat,
    /// Sorted, non-overlapping ranges.
    pub ranges: Vec<MapRange>,
}

/// What the parser needs to know about the device.
#[derive(Debug, Clone, Copy)]
pub struct MapOptions {
    /// Size of the device in bytes: no range may start at or past it.
    pub device_bytes: u64,
    /// Size of an era block in bytes (`--era-block-size`), for era_invalidate maps.
    pub era_block_bytes: Option<u64>,
}

/// Why a map cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// Reading the map failed.
    #[error("cannot read the map")]
    Read(#[source] io::Error),
    /// The map is malformed or lists a range it may not.
    #[error("line {line}: {reason}")]
    Invalid {
        /// 1-based line of the offending element or entry.
        line: u64,
        /// What is wrong.
        reason: String,
    },
    /// The map cannot be read without an option (a usage error).
    #[error("{0}")]
    Usage(String),
}

/// An [`MapError::Invalid`] refusal of line `line`.
pub fn invalid<T>(line: u64, reason: impl Into<String>) -> Result<T, MapError> {
    Err(MapError::Invalid {
        line,
        reason: reason.into(),
    })
}

/// `s` cut to a length fit for a one-line error message, control characters (a line break,
/// a carriage return) shown as spaces.
pub fn clip(s: &str) -> String {
    const MAX_CHARS: usize = 40;
    let shown = |t: &str| -> String {
        t.chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect()
    };
    match s.char_indices().nth(MAX_CHARS) {
        Some((at, _)) => format!("{}...", shown(&s[..at])),
        None => shown(s),
    }
}
