//! Extents: byte ranges of a virtual disk with what happened to them, and a coalescing sink.
//!
//! A change source pushes extents into an [`ExtentSink`]; the sink answers each with a
//! [`Visit`]: go on, or stop because its consumer needs no more (a writer that went away).
//! A stop is control flow, not an error: the source returns early and successfully, and the
//! consumer, which knows why it stopped, reports what went wrong, if anything did.

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

/// What a sink tells the source after taking an extent (thin-provisioning-tools' `Visit`).
#[must_use = "a source must stop pushing when its sink says Stop"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visit {
    /// Push the next extent.
    Continue,
    /// The consumer needs no more extents: return early, without an error.
    Stop,
}

impl Visit {
    /// Whether the source must stop.
    pub fn is_stop(self) -> bool {
        self == Visit::Stop
    }
}

/// Receives sorted, non-overlapping extents from a change source.
pub trait ExtentSink {
    /// Takes the next extent; extents arrive in increasing offset order. After
    /// [`Visit::Stop`], the source pushes nothing more.
    fn push(&mut self, extent: Extent) -> Result<Visit, crate::ImageError>;
}

impl<T: ExtentSink + ?Sized> ExtentSink for &mut T {
    fn push(&mut self, extent: Extent) -> Result<Visit, crate::ImageError> {
        (**self).push(extent)
    }
}

impl ExtentSink for Vec<Extent> {
    fn push(&mut self, extent: Extent) -> Result<Visit, crate::ImageError> {
        Vec::push(self, extent);
        Ok(Visit::Continue)
    }
}

/// Wraps a sink and merges adjacent extents of the same kind before passing them on.
///
/// Callers must call [`Coalescer::finish`] to flush the last pending extent. Once the inner
/// sink said [`Visit::Stop`], every push answers `Stop` and nothing more is passed on.
pub struct Coalescer<S: ExtentSink> {
    inner: S,
    pending: Option<Extent>,
    stopped: bool,
}

impl<S: ExtentSink> Coalescer<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Coalescer {
            inner,
            pending: None,
            stopped: false,
        }
    }

    /// Flushes the pending extent (unless the inner sink stopped) and returns the inner sink.
    pub fn finish(mut self) -> Result<S, crate::ImageError> {
        if let Some(p) = self.pending.take().filter(|_| !self.stopped) {
            // The last push: whether the sink wants more no longer matters.
            let _ = self.inner.push(p)?;
        }
        Ok(self.inner)
    }
}

impl<S: ExtentSink> ExtentSink for Coalescer<S> {
    fn push(&mut self, extent: Extent) -> Result<Visit, crate::ImageError> {
        if self.stopped {
            return Ok(Visit::Stop);
        }
        if extent.len == 0 {
            return Ok(Visit::Continue);
        }
        match &mut self.pending {
            Some(p) if p.kind == extent.kind && p.end() == extent.offset => {
                p.len += extent.len;
                Ok(Visit::Continue)
            }
            Some(_) => {
                let prev = self.pending.replace(extent).expect("pending is Some");
                let visit = self.inner.push(prev)?;
                self.stopped = visit.is_stop();
                Ok(visit)
            }
            None => {
                self.pending = Some(extent);
                Ok(Visit::Continue)
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
    fn push(&mut self, extent: Extent) -> Result<Visit, crate::ImageError> {
        self.extents += 1;
        match extent.kind {
            ExtentKind::Data => self.data_bytes += extent.len,
            ExtentKind::Zero | ExtentKind::Discard => self.zero_bytes += extent.len,
        }
        Ok(Visit::Continue)
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
            assert_eq!(c.push(e).unwrap(), Visit::Continue);
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
        let _ = t.push(Extent::new(0, 10, ExtentKind::Data)).unwrap();
        let _ = t.push(Extent::new(10, 6, ExtentKind::Discard)).unwrap();
        assert_eq!(
            t,
            Totals {
                extents: 2,
                data_bytes: 10,
                zero_bytes: 6
            }
        );
    }

    /// Takes two extents, then stops.
    struct TakesTwo(Vec<Extent>);

    impl ExtentSink for TakesTwo {
        fn push(&mut self, extent: Extent) -> Result<Visit, crate::ImageError> {
            self.0.push(extent);
            Ok(if self.0.len() == 2 {
                Visit::Stop
            } else {
                Visit::Continue
            })
        }
    }

    #[test]
    fn coalescer_passes_a_stop_on_and_then_holds_back() {
        let mut c = Coalescer::new(TakesTwo(Vec::new()));
        let kinds = [ExtentKind::Data, ExtentKind::Zero];
        let mut visits = Vec::new();
        for i in 0..5u64 {
            let e = Extent::new(i * 10, 10, kinds[i as usize % 2]);
            visits.push(c.push(e).unwrap());
        }
        use Visit::{Continue, Stop};
        assert_eq!(visits, [Continue, Continue, Stop, Stop, Stop]);
        let got = c.finish().unwrap().0;
        assert_eq!(
            got,
            vec![
                Extent::new(0, 10, ExtentKind::Data),
                Extent::new(10, 10, ExtentKind::Zero)
            ]
        );
    }
}
