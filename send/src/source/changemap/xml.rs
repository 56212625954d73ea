//! A small streaming reader of the XML that thin_delta and era_invalidate print: one tag at a
//! time, with its attributes and the line it starts on.
//!
//! ```text
//! <superblock uuid="" data_block_size="128" ...>     start tag       Tag { kind: Start, .. }
//!   <different begin="0" length="4"/>                 empty element   Tag { kind: Empty, .. }
//! </superblock>                                       end tag         Tag { kind: End, .. }
//! ```
//!
//! Only what those tools write is understood: tags, attributes in single or double quotes,
//! comments, the `<?xml ...?>` declaration, and whitespace between tags. Anything else (text,
//! DOCTYPE, CDATA) is refused with its line. Memory is bounded: a tag longer than
//! [`MAX_TAG_BYTES`] is refused, comments are skipped without being kept. Entity references in
//! attribute values are not decoded: the values read are numbers, which never hold one.

use std::io::{self, BufRead};

/// The longest tag accepted, in bytes (the tools' longest is about a hundred).
pub const MAX_TAG_BYTES: usize = 64 << 10;

/// What kind of tag was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TagKind {
    /// `<name ...>`
    Start,
    /// `<name .../>`
    Empty,
    /// `</name>`
    End,
}

/// One tag of the document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    /// Start, empty element or end.
    pub kind: TagKind,
    /// The element name.
    pub name: String,
    /// Attributes in document order (none for an end tag).
    pub attrs: Vec<(String, String)>,
    /// The 1-based line the tag starts on.
    pub line: u64,
}

impl Tag {
    /// The value of attribute `name`, if present.
    pub fn attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Why the document cannot be read.
#[derive(Debug)]
pub enum XmlError {
    /// Reading the underlying file failed.
    Io(io::Error),
    /// The document is malformed at a line.
    Syntax {
        /// 1-based line.
        line: u64,
        /// What is wrong.
        reason: String,
    },
}

impl From<io::Error> for XmlError {
    fn from(e: io::Error) -> Self {
        XmlError::Io(e)
    }
}

fn syntax<T>(line: u64, reason: impl Into<String>) -> Result<T, XmlError> {
    Err(XmlError::Syntax {
        line,
        reason: reason.into(),
    })
}

/// Reads tags one after the other from a buffered reader.
pub struct XmlReader<R: BufRead> {
    input: R,
    line: u64,
}

impl<R: BufRead> XmlReader<R> {
    /// A reader whose first byte is on line `line`.
    pub fn new(input: R, line: u64) -> Self {
        XmlReader { input, line }
    }

    /// The next tag, or `None` at the end of the document.
    pub fn next_tag(&mut self) -> Result<Option<Tag>, XmlError> {
        loop {
            if !self.skip_to_markup()? {
                return Ok(None);
            }
            let line = self.line;
            match self.peek()? {
                Some(b'?') => self.skip_until(b"?>", line, "<?")?,
                Some(b'!') => self.skip_comment(line)?,
                _ => return self.read_tag(line).map(Some),
            }
        }
    }

    fn peek(&mut self) -> io::Result<Option<u8>> {
        Ok(self.input.fill_buf()?.first().copied())
    }

    fn byte(&mut self) -> io::Result<Option<u8>> {
        let b = self.peek()?;
        if let Some(b) = b {
            self.input.consume(1);
            if b == b'\n' {
                self.line += 1;
            }
        }
        Ok(b)
    }

    /// Skips whitespace up to and including the next `<`; false at the end of the input.
    fn skip_to_markup(&mut self) -> Result<bool, XmlError> {
        loop {
            match self.byte()? {
                None => return Ok(false),
                Some(b'<') => return Ok(true),
                Some(b) if b.is_ascii_whitespace() => {}
                Some(_) => return syntax(self.line, "text outside a tag"),
            }
        }
    }

    /// Skips input up to and including `end`, which must come before the end of the input.
    fn skip_until(&mut self, end: &[u8], line: u64, what: &str) -> Result<(), XmlError> {
        // The last bytes read, as many as `end` has.
        let mut tail = Vec::with_capacity(end.len() + 1);
        while tail != end {
            let Some(b) = self.byte()? else {
                return syntax(line, format!("{what} is not closed"));
            };
            tail.push(b);
            if tail.len() > end.len() {
                tail.remove(0);
            }
        }
        Ok(())
    }

    fn skip_comment(&mut self, line: u64) -> Result<(), XmlError> {
        self.byte()?; // the '!'
        for _ in 0..2 {
            if self.byte()? != Some(b'-') {
                return syntax(
                    line,
                    "unsupported markup <!... (only comments are accepted)",
                );
            }
        }
        self.skip_until(b"-->", line, "comment")
    }

    /// Reads the rest of a tag after its `<`, up to the `>` that is not inside quotes.
    fn read_tag(&mut self, line: u64) -> Result<Tag, XmlError> {
        let mut body = Vec::new();
        let mut quote = None;
        loop {
            let Some(b) = self.byte()? else {
                return syntax(line, "tag is not closed");
            };
            match (quote, b) {
                (None, b'>') => break,
                (None, b'<') => return syntax(line, "'<' inside a tag"),
                (None, b'"' | b'\'') => quote = Some(b),
                (Some(q), _) if q == b => quote = None,
                _ => {}
            }
            if body.len() == MAX_TAG_BYTES {
                return syntax(line, format!("tag longer than {MAX_TAG_BYTES} bytes"));
            }
            body.push(b);
        }
        parse_tag(&body, line)
    }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
}

/// Splits `s` into a leading name and the rest.
fn take_name(s: &[u8]) -> (&[u8], &[u8]) {
    let n = s.iter().position(|&b| !is_name_byte(b)).unwrap_or(s.len());
    s.split_at(n)
}

fn trim_start(s: &[u8]) -> &[u8] {
    let n = s
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(s.len());
    &s[n..]
}

fn text(s: &[u8]) -> String {
    String::from_utf8_lossy(s).into_owned()
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

/// Most attributes a tag may have: the formats read here use at most 8. Bounds the work of
/// the duplicate check, which compares each attribute with the ones before it.
const MAX_ATTRS: usize = 32;

/// Parses what lies between `<` and `>`.
fn parse_tag(body: &[u8], line: u64) -> Result<Tag, XmlError> {
    let (kind, inner) = match body {
        [b'/', rest @ ..] => (TagKind::End, rest),
        [rest @ .., b'/'] => (TagKind::Empty, rest),
        _ => (TagKind::Start, body),
    };
    let (name, mut rest) = take_name(inner);
    if name.is_empty() {
        return syntax(line, format!("tag <{}> has no name", clip(&text(body))));
    }
    let name = text(name);
    let mut attrs: Vec<(String, String)> = Vec::new();
    loop {
        let trimmed = trim_start(rest);
        if trimmed.is_empty() {
            break;
        }
        if kind == TagKind::End || trimmed.len() == rest.len() {
            return syntax(
                line,
                format!("<{}>: unexpected '{}'", clip(&name), clip(&text(trimmed))),
            );
        }
        if attrs.len() == MAX_ATTRS {
            return syntax(
                line,
                format!("<{}> has more than {MAX_ATTRS} attributes", clip(&name)),
            );
        }
        let (attr, value, after) = parse_attr(trimmed, &name, line)?;
        if attrs.iter().any(|(a, _)| *a == attr) {
            return syntax(
                line,
                format!("<{}>: attribute {} given twice", clip(&name), clip(&attr)),
            );
        }
        attrs.push((attr, value));
        rest = after;
    }
    Ok(Tag {
        kind,
        name,
        attrs,
        line,
    })
}

/// Parses `name = "value"` at the start of `s`; returns it and what follows.
fn parse_attr<'a>(
    s: &'a [u8],
    tag: &str,
    line: u64,
) -> Result<(String, String, &'a [u8]), XmlError> {
    let (attr, rest) = take_name(s);
    let tag = clip(tag);
    if attr.is_empty() {
        return syntax(line, format!("<{tag}>: unexpected '{}'", clip(&text(s))));
    }
    let attr = text(attr);
    let shown = clip(&attr);
    let rest = trim_start(rest);
    let Some(rest) = rest.strip_prefix(b"=") else {
        return syntax(line, format!("<{tag}>: attribute {shown} has no value"));
    };
    let rest = trim_start(rest);
    let Some((&q, rest)) = rest
        .split_first()
        .filter(|(q, _)| matches!(q, b'"' | b'\''))
    else {
        return syntax(line, format!("<{tag}>: value of {shown} is not quoted"));
    };
    let Some(end) = rest.iter().position(|&b| b == q) else {
        return syntax(line, format!("<{tag}>: value of {shown} is not closed"));
    };
    Ok((attr, text(&rest[..end]), &rest[end + 1..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(doc: &str) -> Result<Vec<Tag>, XmlError> {
        let mut r = XmlReader::new(doc.as_bytes(), 1);
        let mut out = Vec::new();
        while let Some(t) = r.next_tag()? {
            out.push(t);
        }
        Ok(out)
    }

    fn error_line(doc: &str) -> (u64, String) {
        match tags(doc) {
            Err(XmlError::Syntax { line, reason }) => (line, reason),
            other => panic!("expected a syntax error, got {other:?}"),
        }
    }

    #[test]
    fn reads_tags_attributes_and_lines() {
        let doc = "<?xml version=\"1.0\"?>\n<!-- a > comment --->\n<a x=\"1\" y='2>'>\n  <b\n z=\"\"/>\n</a>\n";
        let t = tags(doc).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(
            (t[0].kind, t[0].name.as_str(), t[0].line),
            (TagKind::Start, "a", 3)
        );
        assert_eq!(t[0].attr("x"), Some("1"));
        assert_eq!(t[0].attr("y"), Some("2>"));
        assert_eq!(
            (t[1].kind, t[1].line, t[1].attr("z")),
            (TagKind::Empty, 4, Some(""))
        );
        assert_eq!(
            (t[2].kind, t[2].name.as_str(), t[2].line),
            (TagKind::End, "a", 6)
        );
    }

    #[test]
    fn rejects_malformed_markup_with_its_line() {
        assert_eq!(error_line("<a>\nhello\n</a>").0, 2);
        assert_eq!(error_line("<a>\n<b x=1/>").0, 2);
        assert_eq!(error_line("<a>\n<b x=\"1/>").0, 2);
        assert_eq!(error_line("\n\n<a x=\"1\" x=\"2\"/>").0, 3);
        assert_eq!(error_line("<a>\n<!DOCTYPE x>").0, 2);
        assert_eq!(error_line("<a>\n<!-- open").0, 2);
        assert_eq!(error_line("<a>\n</a b=\"1\">").0, 2);
        assert_eq!(error_line("<a x=\"1\"y=\"2\"/>").0, 1);
        assert_eq!(error_line("< a/>").0, 1);
        assert!(error_line("<a x>").1.contains("no value"));
    }

    #[test]
    fn messages_stay_short_and_on_one_line() {
        // Many attributes: refused at the limit, not compared pairwise without end.
        let attrs: String = (0..=MAX_ATTRS).map(|i| format!(" a{i}=\"\"")).collect();
        let (_, reason) = error_line(&format!("<t{attrs}/>"));
        assert!(reason.contains("more than 32 attributes"), "{reason}");
        let last = attrs.rfind(' ').unwrap();
        let most = tags(&format!("<t{}/>", &attrs[..last])).unwrap();
        assert_eq!(most[0].attrs.len(), MAX_ATTRS);
        // Long names and values with line breaks are clipped and shown on one line.
        let long = "n".repeat(5000);
        for doc in [
            format!("<{long} {long}=\"1\" {long}=\"1\"/>"),
            format!("<{long} {long}/>"),
            format!("<{long}>\n</{long} x=\"1\">"),
        ] {
            let (_, reason) = error_line(&doc);
            assert!(reason.len() < 200, "{} bytes: {reason}", reason.len());
        }
        assert_eq!(clip("a\r\nb"), "a  b");
    }

    #[test]
    fn refuses_overlong_tags() {
        let doc = format!("<a x=\"{}\"/>", "9".repeat(MAX_TAG_BYTES));
        assert!(error_line(&doc).1.contains("longer"));
    }
}
