//! Extents: byte ranges of a virtual disk with what happened to them, and a coalescing sink.

use serde::{Deserialize, Serialize};

/// What a changed range holds in the newer state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ExtentKind {
    /// The range holds data that must be read from the source.
    Data,
    /// The range reads as zeros (explicitly zeroed, still allocated at the source).
    Zero,
    /// The range was freed at the source: it reads as zeros and can be deallocated.
    Discard,
}

/// A byte range `[offset, offset + len)` of a virtual disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First byte.
    pub offset: u64,
    /// Length in bytes, never zero in a change list.
    pub len: u64,
    /// What the range holds.
    pub kind: ExtentKind,
}

impl Extent {
    /// Builds an extent.
    pub fn new(offset: u64, len: u64, kind: ExtentKind) -> Self {
        Extent { offset, len, kind }
    }

    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// Receives sorted, non-overlapping extents from a change source.
pub trait ExtentSink {
    /// Takes the next extent; extents arrive in increasing offset order.
    fn push(&mut self, extent: Extent) -> Result<(), crate::ImageError>;
}

impl<T: ExtentSink + ?Sized> ExtentSink for &mut T {
    fn push(&mut self, extent: Extent) -> Result<(), crate::ImageError> {
        (**self).push(extent)
    }
}

impl ExtentSink for Vec<Extent> {
    fn push(&mut self, extent: Extent) -> Result<(), crate::ImageError> {
        Vec::push(self, extent);
        Ok(())
    }
}

/// Wraps a sink and merges adjacent extents of the same kind before passing them on.
///
/// Callers must call [`Coalescer::finish`] to flush the last pending extent.
pub struct Coalescer<S: ExtentSink> {
    inner: S,
    pending: Option<Extent>,
}

impl<S: ExtentSink> Coalescer<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Coalescer {
            inner,
            pending: None,
        }
    }

    /// Flushes the pending extent and returns the inner sink.
    pub fn finish(mut self) -> Result<S, crate::ImageError> {
        if let Some(p) = self.pending.take() {
            self.inner.push(p)?;
        }
        Ok(self.inner)
    }
}

impl<S: ExtentSink> ExtentSink for Coalescer<S> {
    fn push(&mut self, extent: Extent) -> Result<(), crate::ImageError> {
        if extent.len == 0 {
            return Ok(());
        }
        match &mut self.pending {
            Some(p) if p.kind == extent.kind && p.end() == extent.offset => {
                p.len += extent.len;
                Ok(())
            }
            Some(_) => {
                let prev = self.pending.replace(extent).expect("pending is Some");
                self.inner.push(prev)
            }
            None => {
                self.pending = Some(extent);
                Ok(())
            }
        }
    }
}

/// Counts extents and bytes without keeping them (the first pass that gives a stream's totals).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    /// Number of extents of any kind.
    pub extents: u64,
    /// Bytes in data extents.
    pub data_bytes: u64,
    /// Bytes in zero and discard extents.
    pub zero_bytes: u64,
}

impl ExtentSink for Totals {
    fn push(&mut self, extent: Extent) -> Result<(), crate::ImageError> {
        self.extents += 1;
        match extent.kind {
            ExtentKind::Data => self.data_bytes += extent.len,
            ExtentKind::Zero | ExtentKind::Discard => self.zero_bytes += extent.len,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coalescer_merges_adjacent_same_kind_only() {
        let mut c = Coalescer::new(Vec::new());
        for e in [
            Extent::new(0, 10, ExtentKind::Data),
            Extent::new(10, 5, ExtentKind::Data),
            Extent::new(15, 5, ExtentKind::Zero),
            Extent::new(30, 5, ExtentKind::Zero),
            Extent::new(35, 0, ExtentKind::Data),
        ] {
            c.push(e).unwrap();
        }
        let v = c.finish().unwrap();
        assert_eq!(
            v,
            vec![
                Extent::new(0, 15, ExtentKind::Data),
                Extent::new(15, 5, ExtentKind::Zero),
                Extent::new(30, 5, ExtentKind::Zero),
            ]
        );
    }

    #[test]
    fn totals_count_kinds() {
        let mut t = Totals::default();
        t.push(Extent::new(0, 10, ExtentKind::Data)).unwrap();
        t.push(Extent::new(10, 6, ExtentKind::Discard)).unwrap();
        assert_eq!(
            t,
            Totals {
                extents: 2,
                data_bytes: 10,
                zero_bytes: 6
            }
        );
    }
}
