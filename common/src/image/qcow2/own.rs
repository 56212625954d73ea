//! What one qcow2 layer holds itself, without falling through to its backing file: the
//! question a backing chain's delta asks of every overlay above its base.
//!
//! ```text
//! top.qcow2   . D . . Z . C . .      D data, Z zeroed (cluster or subcluster), C compressed
//! base.qcow2  D D D D D D D D D      own_status(top) sees only D, Z and C; status(top)
//!                                    would report the dots as the base's data
//! ```
//!
//! Only L1 and L2 tables are read. An L1 entry of 0 covers a whole L2 range, and a run of
//! them is skipped in one step, so a mostly empty overlay of a large disk costs its metadata.

use super::layer::{Piece, Qcow2Layer};
use crate::image::{check_range, BlockSource};
use crate::ImageError;

/// Most lookups one [`Qcow2Layer::own_status`] call merges: bounds the work of one call on
/// fragmented tables, while a table of a uniform kind (or a run of empty L1 entries) is one.
const MAX_OWN_STEPS: u32 = 1024;

/// What a layer itself says about a range, ignoring its backing file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OwnAllocation {
    /// Guest data in a (sub)cluster of this layer.
    Data,
    /// Guest data in a compressed cluster of this layer.
    Compressed,
    /// Zeroed by this layer (a ZERO cluster or zero subclusters): it hides the backing file.
    Zero,
    /// Not in this layer: reads come from the backing file, or are zeros without one.
    Unallocated,
}

impl OwnAllocation {
    /// Whether the layer holds the range itself (anything but [`OwnAllocation::Unallocated`]),
    /// so that its backing file does not show through.
    pub fn is_held(self) -> bool {
        self != OwnAllocation::Unallocated
    }

    fn of(piece: Piece) -> Self {
        match piece {
            Piece::Host(_) => OwnAllocation::Data,
            Piece::Compressed { .. } => OwnAllocation::Compressed,
            Piece::Zero => OwnAllocation::Zero,
            Piece::Unallocated => OwnAllocation::Unallocated,
        }
    }
}

impl Qcow2Layer {
    /// Describes the range starting at `offset` as this layer's own tables do, never asking
    /// the backing file: how it is held and for how many bytes (at least 1, at most
    /// `max_len`, never past the layer's size). `offset` must be below the size.
    ///
    /// Consecutive runs of the same kind are merged, with a bounded amount of work per call;
    /// only L1 and L2 tables are read.
    pub fn own_status(
        &self,
        offset: u64,
        max_len: u64,
    ) -> Result<(OwnAllocation, u64), ImageError> {
        let size = self.size();
        check_range(offset, 1, size)?;
        let limit = max_len.min(size - offset).max(1);
        let (piece, mut len) = self.lookup(offset, limit)?;
        let kind = OwnAllocation::of(piece);
        let mut steps = 1;
        while len < limit && steps < MAX_OWN_STEPS {
            steps += 1;
            let (next, n) = self.lookup(offset + len, limit - len)?;
            if OwnAllocation::of(next) != kind {
                break;
            }
            len += n;
        }
        Ok((kind, len.min(limit)))
    }
}
