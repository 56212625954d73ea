//! Progress reporting: a trait with do-nothing defaults; only the binary draws bars.

/// Receives progress of a long operation; the default methods do nothing.
pub trait Progress: Send + Sync {
    /// The operation starts; `total_bytes` is what it expects to cover.
    fn start(&self, total_bytes: u64) {
        let _ = total_bytes;
    }
    /// `bytes` more of the total are done.
    fn advance(&self, bytes: u64) {
        let _ = bytes;
    }
    /// The operation is over.
    fn finish(&self) {}
}

/// A progress that shows nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {}
