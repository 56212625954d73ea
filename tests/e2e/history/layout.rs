//! Where a qcow2 file keeps what these tests read or damage, found from the header
//! (docs: the qcow2 specification) and patched in place:
//!
//! ```text
//! header   20 cluster_bits u32 | 40 l1_table_offset u64 | 48 refcount_table_offset u64
//!          64 snapshots_offset u64 | 72 incompatible_features u64 | 96 refcount_order u32
//! snapshot 0 l1_table_offset u64 | 12 id_str_size u16 | 14 name_size u16 | 24 vm_clock_nsec u64
//!          36 extra_data_size u32 | 40 extra, id, name; entries 8-aligned
//! L1/L2    entry & 0x00ff_ffff_ffff_fe00 = host offset; bit 63 COPIED; bit 62 compressed
//! ```

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The host offset bits of an L1 or standard L2 entry.
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// An L1 or L2 entry whose cluster has refcount 1.
pub const COPIED: u64 = 1 << 63;
/// An L2 entry of a compressed cluster.
pub const COMPRESSED: u64 = 1 << 62;

/// An open qcow2 file, read and patched by offset.
pub struct Layout {
    file: File,
}

impl Layout {
    pub fn open(path: &Path) -> Layout {
        let file = File::options().read(true).write(true).open(path).unwrap();
        Layout { file }
    }

    /// The big-endian unsigned number of `len` bytes at `at`.
    pub fn be(&self, at: u64, len: usize) -> u64 {
        let mut b = [0u8; 8];
        self.file.read_exact_at(&mut b[8 - len..], at).unwrap();
        u64::from_be_bytes(b)
    }

    /// Writes the big-endian `value` over the 8 bytes at `at`.
    pub fn put_u64(&self, at: u64, value: u64) {
        self.file.write_all_at(&value.to_be_bytes(), at).unwrap();
        self.file.sync_all().unwrap();
    }

    pub fn cluster_bits(&self) -> u32 {
        self.be(20, 4) as u32
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits()
    }

    /// The active layer's L1 table.
    pub fn l1_offset(&self) -> u64 {
        self.be(40, 8)
    }

    /// Where entry `index` of the snapshot table starts.
    fn snapshot_entry(&self, index: usize) -> u64 {
        let mut entry = self.be(64, 8);
        for _ in 0..index {
            let variable = self.be(entry + 36, 4) + self.be(entry + 12, 2) + self.be(entry + 14, 2);
            entry += (40 + variable).div_ceil(8) * 8;
        }
        entry
    }

    /// The L1 table of snapshot `index` (oldest first).
    pub fn snapshot_l1_offset(&self, index: usize) -> u64 {
        self.be(self.snapshot_entry(index), 8)
    }

    /// Sets the vm clock of snapshot `index`.
    pub fn set_vm_clock(&self, index: usize, nsec: u64) {
        self.put_u64(self.snapshot_entry(index) + 24, nsec);
    }

    /// Sets bit `bit` of the header's incompatible features (bit 1: corrupt).
    pub fn set_incompatible_bit(&self, bit: u32) {
        let features = self.be(72, 8);
        self.put_u64(72, features | 1 << bit);
    }

    /// Where the L2 entry mapping virtual `offset` through the L1 table at `l1` lies (the
    /// table must exist).
    pub fn l2_entry_at(&self, l1: u64, offset: u64) -> u64 {
        let bits = self.cluster_bits();
        let l2_bits = bits - 3;
        let l1_index = offset >> (bits + l2_bits);
        let l2_index = (offset >> bits) & ((1 << l2_bits) - 1);
        let table = self.be(l1 + 8 * l1_index, 8) & OFFSET_MASK;
        assert_ne!(table, 0, "no L2 table maps offset {offset} (L1 at {l1})");
        table + 8 * l2_index
    }

    /// Where the refcount of the cluster at host `offset` lies, and its width in bytes.
    pub fn refcount_entry(&self, offset: u64) -> (u64, usize) {
        let refcount_bits = 1u64 << self.be(96, 4);
        assert!(refcount_bits >= 8, "refcounts of {refcount_bits} bits");
        let per_block = self.cluster_size() * 8 / refcount_bits;
        let cluster = offset / self.cluster_size();
        let table = self.be(48, 8);
        let block = self.be(table + 8 * (cluster / per_block), 8) & OFFSET_MASK;
        assert_ne!(block, 0, "no refcount block covers host offset {offset}");
        let at = block + (cluster % per_block) * refcount_bits / 8;
        (at, (refcount_bits / 8) as usize)
    }

    /// Writes zeros over `len` bytes at `at`.
    pub fn zero(&self, at: u64, len: usize) {
        self.file.write_all_at(&vec![0u8; len], at).unwrap();
        self.file.sync_all().unwrap();
    }
}
