//! Gathering a map's ranges: checked against the device as they are read, then sorted and
//! merged, with discarded ranges cut where a changed range covers them.

use super::map::{invalid, MapError, MapKind, MapRange};

/// A half-open byte range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: u64,
    end: u64,
}

/// Gathers ranges, checked against the device, merging as it goes while they come sorted.
pub struct Collector {
    device_bytes: u64,
    changed: Vec<Span>,
    discarded: Vec<Span>,
}

impl Collector {
    /// Ranges of a device of `device_bytes`.
    pub fn new(device_bytes: u64) -> Self {
        Collector {
            device_bytes,
            changed: Vec::new(),
            discarded: Vec::new(),
        }
    }

    /// Adds `[offset, offset + len)`; `len` is `None` when computing it overflowed. A range may
    /// end past the device only inside its last `unit_bytes` block (a partial last block).
    pub fn add(
        &mut self,
        kind: MapKind,
        offset: u64,
        len: Option<u64>,
        unit_bytes: u64,
        line: u64,
        desc: impl Fn() -> String,
    ) -> Result<(), MapError> {
        let Some(end) = len.and_then(|l| offset.checked_add(l)) else {
            return invalid(line, format!("{}: end overflows 64 bits", desc()));
        };
        if end == offset {
            return invalid(line, format!("{}: empty range", desc()));
        }
        let size = self.device_bytes;
        if offset >= size || (end > size && end - size >= unit_bytes) {
            return invalid(
                line,
                format!(
                    "{}: bytes {offset}..{end} lie past the end of the device ({size} bytes)",
                    desc()
                ),
            );
        }
        let span = Span {
            start: offset,
            end: end.min(size),
        };
        let list = match kind {
            MapKind::Changed => &mut self.changed,
            MapKind::Discarded => &mut self.discarded,
        };
        match list.last_mut() {
            Some(last) if last.start <= span.start && span.start <= last.end => {
                last.end = last.end.max(span.end);
            }
            _ => list.push(span),
        }
        Ok(())
    }

    /// The ranges, sorted and merged; discarded ranges lose what a changed range covers.
    pub fn finish(self) -> Vec<MapRange> {
        let changed = normalize(self.changed);
        let discarded = subtract(&normalize(self.discarded), &changed);
        let mut out = Vec::with_capacity(changed.len() + discarded.len());
        let (mut c, mut d) = (changed.iter().peekable(), discarded.iter().peekable());
        loop {
            let (span, kind) = match (c.peek(), d.peek()) {
                (Some(a), Some(b)) if a.start < b.start => (c.next(), MapKind::Changed),
                (Some(_), Some(_)) | (None, Some(_)) => (d.next(), MapKind::Discarded),
                (Some(_), None) => (c.next(), MapKind::Changed),
                (None, None) => return out,
            };
            if let Some(s) = span {
                out.push(MapRange {
                    offset: s.start,
                    len: s.end - s.start,
                    kind,
                });
            }
        }
    }
}

/// Sorts spans and merges those that overlap or touch, in place.
fn normalize(mut spans: Vec<Span>) -> Vec<Span> {
    if !spans.is_sorted_by_key(|s| s.start) {
        spans.sort_unstable_by_key(|s| s.start);
    }
    let mut kept = 0usize;
    for i in 0..spans.len() {
        let s = spans[i];
        match kept.checked_sub(1).map(|last| &mut spans[last]) {
            Some(last) if s.start <= last.end => last.end = last.end.max(s.end),
            _ => {
                spans[kept] = s;
                kept += 1;
            }
        }
    }
    spans.truncate(kept);
    spans
}

/// `a` minus `b`; both sorted and merged.
fn subtract(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    let mut j = 0;
    for s in a {
        let mut start = s.start;
        while j < b.len() && b[j].end <= start {
            j += 1;
        }
        let mut k = j;
        while k < b.len() && b[k].start < s.end {
            if b[k].start > start {
                out.push(Span {
                    start,
                    end: b[k].start,
                });
            }
            start = start.max(b[k].end);
            k += 1;
        }
        if start < s.end {
            out.push(Span { start, end: s.end });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtract_cuts_every_overlap() {
        let s = |start, end| Span { start, end };
        let a = [s(0, 10), s(20, 30), s(40, 50)];
        let b = [s(2, 4), s(6, 22), s(25, 26), s(45, 60)];
        assert_eq!(
            subtract(&a, &b),
            vec![s(0, 2), s(4, 6), s(22, 25), s(26, 30), s(40, 45)]
        );
        assert_eq!(subtract(&a, &[]), a.to_vec());
        assert_eq!(subtract(&a, &[s(0, 100)]), vec![]);
    }

    #[test]
    fn normalize_sorts_and_merges_in_place() {
        let s = |start, end| Span { start, end };
        let spans = vec![s(30, 40), s(0, 5), s(5, 8), s(35, 50), s(10, 12), s(11, 11)];
        assert_eq!(normalize(spans), vec![s(0, 8), s(10, 12), s(30, 50)]);
        assert_eq!(normalize(vec![]), vec![]);
    }
}
