//! The tags of the XML that thin_delta and era_invalidate print, read with quick-xml (the
//! reader thin-provisioning-tools' own XML code is written with): one tag at a time, with its
//! attributes and the line it starts on.
//!
//! ```text
//! <superblock uuid="" data_block_size="128" ...>     start tag       Tag { kind: Start, .. }
//!   <different begin="0" length="4"/>                 empty element   Tag { kind: Empty, .. }
//! </superblock>                                       end tag         Tag { kind: End, .. }
//! ```
//!
//! Only what those tools write is accepted: tags, attributes in single or double quotes,
//! comments, the `<?xml ...?>` declaration, and whitespace between tags. Anything else (text,
//! DOCTYPE, CDATA) is refused with its line. quick-xml reports byte positions; lines are
//! counted here from the bytes of each event. Memory is bounded: a tag, comment or run of
//! whitespace longer than [`MAX_TAG_BYTES`] is refused while it is being read, and a tag may
//! have at most 32 attributes. Entity references in attribute values are not decoded: the
//! values read are numbers, which never hold one.

use std::io::{self, BufRead, Read};

use quick_xml::errors::{Error as QuickError, SyntaxError};
use quick_xml::events::attributes::AttrError;
use quick_xml::events::{BytesStart, Event};
use quick_xml::Reader;

use super::map::clip;

/// The longest tag accepted, in bytes (the tools' longest is about a hundred); comments and
/// whitespace between tags are held to it too, as quick-xml keeps each event whole.
pub const MAX_TAG_BYTES: usize = 64 << 10;

/// Most attributes a tag may have: the formats read here use at most 8. Bounds the work of
/// the duplicate check, which compares each attribute with the ones before it.
const MAX_ATTRS: usize = 32;

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

fn syntax<T>(line: u64, reason: impl Into<String>) -> Result<T, XmlError> {
    Err(XmlError::Syntax {
        line,
        reason: reason.into(),
    })
}

/// The input, refusing to hand quick-xml more than [`MAX_TAG_BYTES`] (and one buffer) for one
/// event: quick-xml keeps an event's bytes whole, however long.
struct Bounded<R> {
    inner: R,
    /// Bytes consumed since the current event started.
    used: usize,
    /// The limit was reached.
    over: bool,
}

impl<R: BufRead> Read for Bounded<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.fill_buf()?.len().min(buf.len());
        buf[..n].copy_from_slice(&self.fill_buf()?[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl<R: BufRead> BufRead for Bounded<R> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.used > MAX_TAG_BYTES + 2 {
            self.over = true;
            return Err(io::Error::other("markup too long"));
        }
        self.inner.fill_buf()
    }

    fn consume(&mut self, n: usize) {
        self.used += n;
        self.inner.consume(n);
    }
}

/// What one event was, copied out of quick-xml's buffer.
enum Markup {
    Tag(TagKind, String),
    /// Text: whitespace, or something else at this byte of it.
    Text(Option<usize>),
    /// A comment, the declaration or a processing instruction.
    Skipped,
    /// DOCTYPE, CDATA or an entity reference.
    Unsupported,
    End,
}

/// Reads tags one after the other from a buffered reader.
pub struct XmlReader<R: BufRead> {
    reader: Reader<Bounded<R>>,
    buf: Vec<u8>,
    line: u64,
}

impl<R: BufRead> XmlReader<R> {
    /// A reader whose first byte is on line `line`.
    pub fn new(input: R, line: u64) -> Self {
        let bounded = Bounded {
            inner: input,
            used: 0,
            over: false,
        };
        let mut reader = Reader::from_reader(bounded);
        let config = reader.config_mut();
        // The parser matches end tags itself, naming the line of the start tag.
        config.check_end_names = false;
        config.allow_unmatched_ends = true;
        config.expand_empty_elements = false;
        config.trim_text(false);
        XmlReader {
            reader,
            buf: Vec::new(),
            line,
        }
    }

    /// The next tag, or `None` at the end of the document.
    pub fn next_tag(&mut self) -> Result<Option<Tag>, XmlError> {
        loop {
            let line = self.line;
            let markup = self.next_markup(line)?;
            // The event's bytes, delimiters aside (which hold no line break), are in `buf`.
            let newlines = |b: &[u8]| b.iter().filter(|&&c| c == b'\n').count() as u64;
            match markup {
                Markup::End => return Ok(None),
                Markup::Tag(kind, body) => {
                    self.line += newlines(&self.buf);
                    return parse_tag(kind, &body, line).map(Some);
                }
                Markup::Text(Some(at)) => {
                    return syntax(line + newlines(&self.buf[..at]), "text outside a tag")
                }
                Markup::Unsupported => {
                    return syntax(
                        line,
                        "unsupported markup <!... (only comments are accepted)",
                    )
                }
                Markup::Text(None) | Markup::Skipped => self.line += newlines(&self.buf),
            }
        }
    }

    /// Reads one event and copies out what the caller needs of it.
    fn next_markup(&mut self, line: u64) -> Result<Markup, XmlError> {
        self.buf.clear();
        self.reader.get_mut().used = 0;
        let event = match self.reader.read_event_into(&mut self.buf) {
            Ok(event) => event,
            Err(e) => return Err(read_error(e, line, self.reader.get_ref().over)),
        };
        let markup = match event {
            Event::Start(t) => Markup::Tag(TagKind::Start, start_body(&t)),
            Event::Empty(t) => Markup::Tag(TagKind::Empty, start_body(&t)),
            Event::End(t) => Markup::Tag(TagKind::End, t.to_string()),
            Event::Text(t) => Markup::Text(t.find(|c: char| !c.is_ascii_whitespace())),
            Event::Comment(_) | Event::Decl(_) | Event::PI(_) => Markup::Skipped,
            Event::GeneralRef(_) => Markup::Text(Some(0)),
            Event::DocType(_) | Event::CData(_) => Markup::Unsupported,
            Event::Eof => Markup::End,
        };
        if self.reader.get_ref().used > MAX_TAG_BYTES + 2 {
            return syntax(line, too_long());
        }
        Ok(markup)
    }
}

fn too_long() -> String {
    format!("tag, comment or whitespace longer than {MAX_TAG_BYTES} bytes")
}

/// What lies between `<` and `>` of a start tag or empty element.
fn start_body(t: &BytesStart<'_>) -> String {
    t.to_string()
}

/// quick-xml's error, at the line where the event that failed starts.
fn read_error(e: QuickError, line: u64, over: bool) -> XmlError {
    let reason = match e {
        _ if over => too_long(),
        QuickError::Io(e) => {
            return XmlError::Io(io::Error::new(e.kind(), e.to_string()));
        }
        QuickError::Syntax(s) => match s {
            SyntaxError::InvalidBangMarkup
            | SyntaxError::UnclosedDoctype
            | SyntaxError::UnclosedCData => {
                "unsupported markup <!... (only comments are accepted)".into()
            }
            SyntaxError::UnclosedComment => "comment is not closed".into(),
            SyntaxError::UnclosedPI | SyntaxError::UnclosedXmlDecl => "<? is not closed".into(),
            SyntaxError::UnclosedTag => "tag is not closed".into(),
            SyntaxError::UnclosedSingleQuotedAttributeValue
            | SyntaxError::UnclosedDoubleQuotedAttributeValue => {
                "tag is not closed (an attribute value is open)".into()
            }
        },
        QuickError::Encoding(_) => "not UTF-8 text".into(),
        other => clip(&other.to_string()),
    };
    XmlError::Syntax { line, reason }
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':')
}

/// Splits `s` into a leading name and the rest.
fn take_name(s: &str) -> (&str, &str) {
    let n = s.bytes().position(|b| !is_name_byte(b)).unwrap_or(s.len());
    s.split_at(n)
}

/// Checks the name of a tag whose body (between `<` and `>` or `/>`) is `body`, and reads
/// its attributes with quick-xml.
fn parse_tag(kind: TagKind, body: &str, line: u64) -> Result<Tag, XmlError> {
    let (name, rest) = take_name(body);
    if name.is_empty() {
        return syntax(line, format!("tag <{}> has no name", clip(body)));
    }
    let shown = clip(name);
    let trimmed = rest.trim_start_matches(|c: char| c.is_ascii_whitespace());
    let attrs_follow = !trimmed.is_empty();
    if attrs_follow && (kind == TagKind::End || trimmed.len() == rest.len()) {
        return syntax(line, format!("<{shown}>: unexpected '{}'", clip(trimmed)));
    }
    if let Some(at) = value_without_space_after(rest) {
        return syntax(
            line,
            format!("<{shown}>: unexpected '{}'", clip(&rest[at..])),
        );
    }
    let mut attrs: Vec<(String, String)> = Vec::new();
    if attrs_follow {
        let start = BytesStart::from_content(body, name.len());
        let mut iter = start.attributes();
        iter.with_checks(false);
        for attr in iter {
            if attrs.len() == MAX_ATTRS {
                return syntax(
                    line,
                    format!("<{shown}> has more than {MAX_ATTRS} attributes"),
                );
            }
            let attr = attr.map_err(|e| attr_error(e, &shown, body, line))?;
            let key = attr.key.as_ref().to_string();
            if attrs.iter().any(|(a, _)| *a == key) {
                return syntax(
                    line,
                    format!("<{shown}>: attribute {} given twice", clip(&key)),
                );
            }
            attrs.push((key, attr.value.into_owned()));
        }
    }
    Ok(Tag {
        kind,
        name: name.to_string(),
        attrs,
        line,
    })
}

/// Where something other than whitespace follows the closing quote of a value: XML wants
/// attributes apart, and quick-xml reads `x="1"y="2"` as two.
fn value_without_space_after(attrs: &str) -> Option<usize> {
    let mut quote = None;
    let mut closed = false;
    for (at, c) in attrs.char_indices() {
        if closed && !c.is_ascii_whitespace() {
            return Some(at);
        }
        closed = false;
        match quote {
            None if c == '"' || c == '\'' => quote = Some(c),
            Some(q) if q == c => {
                quote = None;
                closed = true;
            }
            _ => {}
        }
    }
    None
}

/// An attribute quick-xml refused, with the text where it did.
fn attr_error(e: AttrError, tag: &str, body: &str, line: u64) -> XmlError {
    let near = |at: usize| clip(body.get(at.min(body.len())..).unwrap_or(""));
    let reason = match e {
        AttrError::ExpectedEq(at) | AttrError::ExpectedValue(at) => {
            format!("<{tag}>: an attribute has no value at '{}'", near(at))
        }
        AttrError::UnquotedValue(at) => {
            format!(
                "<{tag}>: an attribute value is not quoted at '{}'",
                near(at)
            )
        }
        AttrError::ExpectedQuote(at, _) => {
            format!(
                "<{tag}>: an attribute value is not closed at '{}'",
                near(at)
            )
        }
        AttrError::Duplicated(at, _) => {
            format!("<{tag}>: an attribute is given twice at '{}'", near(at))
        }
    };
    XmlError::Syntax { line, reason }
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
