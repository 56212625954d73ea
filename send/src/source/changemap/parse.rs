//! Change maps: which byte ranges of a device changed, as three tools write them.
//!
//! ```text
//! thin_delta (thin-provisioning-tools), begin/length in data blocks of data_block_size sectors:
//!   <superblock uuid="" time="0" transaction="1" data_block_size="128" nr_data_blocks="...">
//!     <diff left="1" right="2">
//!       <different begin="0" length="4"/>       changed: data
//!       <same begin="4" length="2"/>            unchanged: skipped
//!       <right_only begin="6" length="1"/>      mapped only in the newer: data
//!       <left_only begin="9" length="3"/>       unmapped since: discard
//!     </diff>
//!   </superblock>
//!   (--verbose wraps <range begin=".." length=".." .../> elements in <different>...</different>)
//!
//! era_invalidate, in era blocks whose size the user gives (--era-block-size), exclusive ends:
//!   <blocks> <block block="3"/> <range begin="5" end="9"/> </blocks>
//!
//! plain lines, in bytes; '#' starts a comment:
//!   OFFSET LENGTH
//! ```
//!
//! The format is told by the first byte that is not whitespace (`<` for XML). Ranges may come
//! in any order and overlap: they are sorted and merged, and where a changed range and a
//! discarded one overlap, the changed one wins (sending what the device holds is always right).
//! Memory grows with the number of ranges listed, never with a number written in the map.

use std::io::{self, BufRead, Read};

use super::collect::Collector;
use super::map::{clip, invalid, ChangeMap, MapError, MapFormat, MapKind, MapOptions};
use super::xml::{Tag, TagKind, XmlError, XmlReader};

/// The longest line of a plain map, in bytes.
pub const MAX_LINE_BYTES: u64 = 4096;
/// The deepest nesting of XML elements accepted (thin_delta --verbose needs four).
pub const MAX_DEPTH: usize = 8;

impl From<XmlError> for MapError {
    fn from(e: XmlError) -> Self {
        match e {
            XmlError::Io(e) => MapError::Read(e),
            XmlError::Syntax { line, reason } => MapError::Invalid { line, reason },
        }
    }
}

/// Parses a map of any of the three formats.
pub fn parse(mut input: impl BufRead, opts: &MapOptions) -> Result<ChangeMap, MapError> {
    let line = skip_blank(&mut input).map_err(MapError::Read)?;
    let is_xml = input.fill_buf().map_err(MapError::Read)?.first() == Some(&b'<');
    let mut ranges = Collector::new(opts.device_bytes);
    let format = if is_xml {
        parse_xml(XmlReader::new(input, line), opts, &mut ranges)?
    } else {
        parse_lines(input, line, &mut ranges)?;
        MapFormat::Lines
    };
    Ok(ChangeMap {
        format,
        ranges: ranges.finish(),
    })
}

/// Skips a byte-order mark and leading whitespace; returns the line reached.
fn skip_blank(input: &mut impl BufRead) -> io::Result<u64> {
    if input.fill_buf()?.starts_with(b"\xef\xbb\xbf") {
        input.consume(3);
    }
    let mut line = 1;
    loop {
        let buf = input.fill_buf()?;
        let Some(&b) = buf.first() else {
            return Ok(line);
        };
        if !b.is_ascii_whitespace() {
            return Ok(line);
        }
        line += u64::from(b == b'\n');
        input.consume(1);
    }
}

// ---- plain lines --------------------------------------------------------------------------

fn parse_lines(
    mut input: impl BufRead,
    first_line: u64,
    out: &mut Collector,
) -> Result<(), MapError> {
    let mut buf = Vec::new();
    let mut line = first_line;
    loop {
        buf.clear();
        let n = (&mut input)
            .take(MAX_LINE_BYTES + 1)
            .read_until(b'\n', &mut buf)
            .map_err(MapError::Read)?;
        if n == 0 {
            return Ok(());
        }
        if buf.last() != Some(&b'\n') && n as u64 > MAX_LINE_BYTES {
            return invalid(line, format!("line longer than {MAX_LINE_BYTES} bytes"));
        }
        parse_line(&buf, line, out)?;
        line += 1;
    }
}

fn parse_line(raw: &[u8], line: u64, out: &mut Collector) -> Result<(), MapError> {
    let Ok(text) = std::str::from_utf8(raw) else {
        return invalid(line, "not text (expected OFFSET LENGTH in bytes)");
    };
    let text = text.split('#').next().unwrap_or("");
    let fields: Vec<&str> = text.split_whitespace().collect();
    match fields[..] {
        [] => Ok(()),
        [offset, len] => {
            let what = |f: &str| {
                format!(
                    "'{}' is not a number (expected OFFSET LENGTH in bytes)",
                    clip(f)
                )
            };
            let offset = number(offset).ok_or_else(|| bad(line, what(offset)))?;
            let len = number(len).ok_or_else(|| bad(line, what(len)))?;
            let desc = || format!("range {offset}+{len}");
            out.add(MapKind::Changed, offset, Some(len), 1, line, desc)
        }
        _ => invalid(
            line,
            format!(
                "expected OFFSET LENGTH in bytes, found '{}'",
                clip(text.trim())
            ),
        ),
    }
}

fn bad(line: u64, reason: String) -> MapError {
    MapError::Invalid { line, reason }
}

/// A decimal number, or a hexadecimal one after `0x`.
fn number(s: &str) -> Option<u64> {
    match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()
        }
        Some(_) => None,
        None if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s.parse().ok(),
        None => None,
    }
}

// ---- XML ----------------------------------------------------------------------------------

/// What an open element is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    /// thin_delta's root.
    Superblock,
    /// thin_delta's `<diff left=".." right="..">`.
    Diff,
    /// A thin_delta run type (`different`, `same`, `left_only`, `right_only`): `None` for `same`.
    Delta(Option<MapKind>),
    /// era_invalidate's root.
    Blocks,
    /// A leaf (`range`, `block`) given as a start tag.
    Leaf,
}

/// An element whose end tag has not been read yet.
struct Open {
    elem: Elem,
    name: String,
    line: u64,
    /// The document's block size in bytes, from the root.
    block_bytes: u64,
}

fn parse_xml<R: BufRead>(
    mut xml: XmlReader<R>,
    opts: &MapOptions,
    out: &mut Collector,
) -> Result<MapFormat, MapError> {
    let mut stack: Vec<Open> = Vec::new();
    let mut format = None;
    while let Some(tag) = xml.next_tag()? {
        if tag.kind == TagKind::End {
            close(&mut stack, &tag)?;
            continue;
        }
        let (elem, block_bytes) = match stack.last() {
            None if format.is_some() => return invalid(tag.line, "content after the root element"),
            None => root(&tag, opts)?,
            Some(parent) => (child(parent, &tag, out)?, parent.block_bytes),
        };
        format.get_or_insert(match elem {
            Elem::Blocks => MapFormat::EraInvalidate,
            _ => MapFormat::ThinDelta,
        });
        if tag.kind == TagKind::Start {
            if stack.len() == MAX_DEPTH {
                return invalid(tag.line, format!("elements nested deeper than {MAX_DEPTH}"));
            }
            let (name, line) = (tag.name, tag.line);
            stack.push(Open {
                elem,
                name,
                line,
                block_bytes,
            });
        }
    }
    if let Some(open) = stack.last() {
        return invalid(open.line, format!("<{}> is never closed", open.name));
    }
    // A document without any element is read as lines, so a root was seen.
    Ok(format.unwrap_or(MapFormat::ThinDelta))
}

fn close(stack: &mut Vec<Open>, tag: &Tag) -> Result<(), MapError> {
    match stack.pop() {
        Some(open) if open.name == tag.name => Ok(()),
        Some(open) => invalid(
            tag.line,
            format!(
                "</{}> closes <{}> of line {}",
                clip(&tag.name),
                open.name,
                open.line
            ),
        ),
        None => invalid(tag.line, format!("</{}> closes nothing", clip(&tag.name))),
    }
}

/// The root element: what the document is, and its block size in bytes.
fn root(tag: &Tag, opts: &MapOptions) -> Result<(Elem, u64), MapError> {
    match tag.name.as_str() {
        "superblock" => {
            let sectors = required(tag, "data_block_size")?;
            match sectors.checked_mul(512) {
                Some(bytes) if bytes > 0 => Ok((Elem::Superblock, bytes)),
                _ => invalid(
                    tag.line,
                    format!("<superblock>: data_block_size=\"{sectors}\" is not a usable block size"),
                ),
            }
        }
        "blocks" => match opts.era_block_bytes {
            Some(bytes) => Ok((Elem::Blocks, bytes)),
            None => Err(MapError::Usage(
                "this is an era_invalidate map: give the era block size with --era-block-size BYTES"
                    .into(),
            )),
        },
        other => invalid(
            tag.line,
            format!(
                "<{}> is not the root of a thin_delta or era_invalidate map",
                clip(other)
            ),
        ),
    }
}

/// An element inside `parent`; a range element adds its range to `out`.
fn child(parent: &Open, tag: &Tag, out: &mut Collector) -> Result<Elem, MapError> {
    let name = tag.name.as_str();
    let block_bytes = parent.block_bytes;
    match (parent.elem, name, delta_kind(name)) {
        (Elem::Superblock, "diff", _) => Ok(Elem::Diff),
        (Elem::Superblock | Elem::Diff, _, Some(kind)) => {
            // thin_delta --verbose opens a run element around <range> elements instead.
            if tag.kind == TagKind::Empty {
                thin_range(tag, kind, block_bytes, out)?;
            }
            Ok(Elem::Delta(kind))
        }
        (Elem::Delta(kind), "range", _) => {
            thin_range(tag, kind, block_bytes, out)?;
            Ok(Elem::Leaf)
        }
        (Elem::Blocks, "block", _) => {
            let b = required(tag, "block")?;
            era_range(tag, b, b.checked_add(1), block_bytes, out)?;
            Ok(Elem::Leaf)
        }
        (Elem::Blocks, "range", _) => {
            let (begin, end) = (required(tag, "begin")?, required(tag, "end")?);
            if end <= begin {
                return invalid(
                    tag.line,
                    format!("<range begin=\"{begin}\" end=\"{end}\">: end is not past begin"),
                );
            }
            era_range(tag, begin, Some(end), block_bytes, out)?;
            Ok(Elem::Leaf)
        }
        _ => invalid(
            tag.line,
            format!(
                "<{}> is not expected inside <{}>",
                clip(name),
                clip(&parent.name)
            ),
        ),
    }
}

/// `Some(kind)` for the four thin_delta run elements (`Some(None)` for `same`).
fn delta_kind(name: &str) -> Option<Option<MapKind>> {
    match name {
        "different" | "right_only" => Some(Some(MapKind::Changed)),
        "left_only" => Some(Some(MapKind::Discarded)),
        "same" => Some(None),
        _ => None,
    }
}

/// A thin_delta run (`begin`, `length` in data blocks); `same` runs are checked and skipped.
fn thin_range(
    tag: &Tag,
    kind: Option<MapKind>,
    block_bytes: u64,
    out: &mut Collector,
) -> Result<(), MapError> {
    let (begin, length) = (required(tag, "begin")?, required(tag, "length")?);
    let Some(kind) = kind else {
        return Ok(());
    };
    let desc = || format!("<{} begin=\"{begin}\" length=\"{length}\">", tag.name);
    let offset = begin.checked_mul(block_bytes);
    let len = length.checked_mul(block_bytes);
    match offset {
        Some(offset) => out.add(kind, offset, len, block_bytes, tag.line, desc),
        None => invalid(tag.line, format!("{}: offset overflows 64 bits", desc())),
    }
}

/// An era_invalidate range of era blocks `[begin, end)`.
fn era_range(
    tag: &Tag,
    begin: u64,
    end: Option<u64>,
    block_bytes: u64,
    out: &mut Collector,
) -> Result<(), MapError> {
    // The attributes were read as numbers: they are short.
    let desc = || match tag.name.as_str() {
        "block" => format!("<block block=\"{begin}\">"),
        name => format!(
            "<{name} begin=\"{begin}\" end=\"{}\">",
            tag.attr("end").unwrap_or_default()
        ),
    };
    let (Some(offset), Some(end)) = (
        begin.checked_mul(block_bytes),
        end.and_then(|e| e.checked_mul(block_bytes)),
    ) else {
        return invalid(tag.line, format!("{}: offset overflows 64 bits", desc()));
    };
    out.add(
        MapKind::Changed,
        offset,
        Some(end - offset),
        block_bytes,
        tag.line,
        desc,
    )
}

/// A numeric attribute the element must have.
fn required(tag: &Tag, attr: &str) -> Result<u64, MapError> {
    match tag.attr(attr) {
        None => invalid(
            tag.line,
            format!("<{}> has no {attr} attribute", clip(&tag.name)),
        ),
        Some(v) => number(v).ok_or_else(|| {
            bad(
                tag.line,
                format!(
                    "<{}>: {attr}=\"{}\" is not a number",
                    clip(&tag.name),
                    clip(v)
                ),
            )
        }),
    }
}

#[cfg(test)]
mod tests;
