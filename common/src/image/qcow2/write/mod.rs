//! A qcow2 writer for replicas: writes, zeroes and discards in the active layer, creates and
//! deletes internal snapshots, and grows or shrinks the disk, keeping the image one that
//! QEMU opens and `qemu-img check` passes at every moment, a crash included.
//!
//! It writes by generations. The file always holds a complete image, the one its header names
//! (the *durable* generation). Changes go to clusters that generation does not use; L1 and L2
//! tables, refcount blocks, the refcount table and the snapshot table that change are written
//! to such clusters too, never over the ones the header names. A commit makes them durable,
//! then switches the header to them in one write of bytes 24..72 (size, L1, refcount table,
//! snapshot table), then discards what only the old generation used:
//!
//! ```text
//! write data (new clusters, or in place where only the active layer uses a cluster)
//! commit: tables that changed ─► new clusters ─► L1 ─► snapshot table ─► refcount blocks
//!         and table (all to new clusters) ─► fdatasync ─► header 24..72 ─► fdatasync
//!         ─► discard the clusters only the old generation used
//! ```
//!
//! A crash before the header write leaves the old generation whole: the new clusters are free
//! in its refcounts, so nothing leaks and nothing is corrupt; after it, the new one. This is
//! stronger than QEMU's in-place order (refcounts, data, L2, L1, snapshot table, header), which
//! can leave leaks and, while a snapshot is created or deleted, COPIED flags that disagree
//! with the refcounts.
//!
//! Guest data is written in place only into a cluster the active layer alone uses (refcount
//! 1); any other cluster is copied on write. What this writer refuses to write into: backing
//! files, extended L2 entries, persistent bitmaps, version 2, images marked corrupt or dirty.

mod create;
mod held;
mod io;
mod refcounts;
mod snapshots;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions as FsOpenOptions};
use std::path::{Path, PathBuf};

pub use snapshots::SnapshotMeta;

use super::bytes::be_u64;
use super::decompress::decompress_cluster;
use super::header::Header;
use super::snapshot::Snapshot;
use super::tables::{classify_cluster, ClusterKind, Geometry, L1E_OFFSET_MASK, QCOW_OFLAG_COPIED};
use crate::image::check_range;
use crate::image::lock::lock_for_write;
use crate::limits::MAX_L1_BYTES;
use crate::ImageError;
use io::{punch, read_at, read_into, sync, write_at};
use refcounts::Refcounts;
use snapshots::RawEntry;

/// L2 tables kept in memory at most; a changed table beyond this is written (to a cluster the
/// durable generation does not use) to make room.
const MAX_CACHED_TABLES: usize = 256;

/// One L2 table as the new generation has it.
struct Table {
    entries: Vec<u64>,
    /// Changed since it was last written.
    dirty: bool,
}

/// Where a table-like structure of the durable generation is: offset and clusters.
#[derive(Clone, Copy, Debug, Default)]
struct Place {
    offset: u64,
    clusters: u64,
}

/// An open qcow2 image being written (see the module documentation).
pub struct Qcow2Writer {
    path: PathBuf,
    file: File,
    header: Header,
    geometry: Geometry,
    /// Virtual size of the active layer.
    size: u64,
    /// The active L1 table (new generation).
    l1: Vec<u64>,
    l1_place: Place,
    l1_changed: bool,
    /// L2 tables read or changed, by L1 index, and the order they came in.
    tables: HashMap<u64, Table>,
    order: VecDeque<u64>,
    refs: Refcounts,
    snapshots: Vec<RawEntry>,
    snapshots_place: Place,
    snapshots_changed: bool,
    /// The virtual size changed since the last commit.
    size_changed: bool,
    /// Guest data was written since the last commit.
    data_written: bool,
    /// The file opened again with `O_DIRECT`: whole aligned runs of guest data go through it,
    /// around the page cache (none where the filesystem refuses the flag).
    direct: Option<File>,
}

impl std::fmt::Debug for Qcow2Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Writer")
            .field("path", &self.path)
            .field("size", &self.size)
            .field("snapshots", &self.snapshots.len())
            .finish()
    }
}

impl Qcow2Writer {
    /// Opens an existing image for writing: takes QEMU's write locks (nobody else may have it
    /// open), checks that this writer can keep it consistent and that its refcounts agree
    /// with its tables, and repairs leaked clusters (refcounts higher than their uses, as a
    /// crash of QEMU leaves them) before anything else.
    pub fn open(path: &Path) -> Result<Qcow2Writer, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = FsOpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        lock_for_write(&file, path)?;
        let file_len = file.metadata().map_err(open_err)?.len();
        let header = super::read_header(&file, file_len)?;
        refuse_unwritable(&header)?;
        let geometry = header.geometry();
        let cs = header.cluster_size();
        let l1_bytes = u64::from(header.l1_size) * 8;
        let l1 = if header.l1_size == 0 {
            Vec::new()
        } else {
            let raw = read_at(
                &file,
                "L1 table",
                header.l1_table_offset,
                l1_bytes,
                file_len,
            )?;
            raw.chunks_exact(8).map(|b| be_u64(b, 0)).collect()
        };
        let snapshots = snapshots::read_entries(&file, &header, file_len)?;
        let table_bytes = snapshots::encode(&snapshots).len() as u64;
        let refs = Refcounts::open(&file, &header, file_len)?;
        let mut w = Qcow2Writer {
            path: path.to_path_buf(),
            size: header.size,
            l1,
            l1_place: Place {
                offset: header.l1_table_offset,
                clusters: l1_bytes.div_ceil(cs),
            },
            l1_changed: false,
            tables: HashMap::new(),
            order: VecDeque::new(),
            refs,
            snapshots,
            snapshots_place: Place {
                offset: header.snapshots_offset,
                clusters: table_bytes.div_ceil(cs),
            },
            snapshots_changed: false,
            size_changed: false,
            data_written: false,
            direct: crate::image::raw::reopen_direct(&file, true),
            geometry,
            header,
            file,
        };
        w.clear_autoclear()?;
        w.repair(file_len)?;
        Ok(w)
    }

    /// Checks the refcounts against every table of the image, as `qemu-img check` does, and
    /// refuses an image whose refcounts are too low or whose structures overlap (writing into
    /// it would destroy data). Leaked clusters (refcounts higher than their uses, as a crash
    /// of QEMU leaves them) and COPIED flags missing where a cluster is the active layer's
    /// alone are repaired, in one commit.
    fn repair(&mut self, file_len: u64) -> Result<(), ImageError> {
        let snapshots = super::snapshot::read_table(&self.file, file_len, &self.header)?;
        let report = super::check::check(&self.file, file_len, &self.header, &snapshots)?;
        let mut changed = false;
        for leak in report.leaks() {
            self.refs
                .repair_leak(&self.file, leak.cluster, leak.computed)?;
            changed = true;
        }
        if report.copied_mismatches_total > 0 {
            // Every active table is written again, with flags from the refcounts.
            for index in 0..self.l1.len() as u64 {
                if self.l1[index as usize] & L1E_OFFSET_MASK != 0 {
                    self.table(index)?.dirty = true;
                }
            }
            self.l1_changed = true;
            changed = true;
        }
        if changed {
            self.commit()?;
        }
        Ok(())
    }

    /// The image's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The virtual size of the active layer.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.header.cluster_size()
    }

    /// The open file (for its identity; write through the writer only).
    pub fn file(&self) -> &File {
        &self.file
    }

    /// The internal snapshots, in table order.
    pub fn snapshots(&self) -> Vec<Snapshot> {
        self.snapshots
            .iter()
            .map(|e| e.snapshot(self.header.size))
            .collect()
    }

    /// Autoclear bits name extensions a writer must keep up to date; this one keeps none, so
    /// it clears them before its first write (the image has no bitmaps: they are refused).
    fn clear_autoclear(&mut self) -> Result<(), ImageError> {
        if self.header.autoclear_features == 0 {
            return Ok(());
        }
        write_at(&self.file, "header", &[0u8; 8], 88)?;
        sync(&self.file)?;
        self.header.autoclear_features = 0;
        Ok(())
    }

    /// Makes the disk `size` bytes long. Growing maps the new range as zeros; shrinking frees
    /// what lies past the new end.
    pub fn set_size(&mut self, size: u64) -> Result<(), ImageError> {
        if size > crate::limits::MAX_VIRTUAL_BYTES {
            return Err(ImageError::Unwritable(format!(
                "a virtual size of {size} bytes is above the limit {}",
                crate::limits::MAX_VIRTUAL_BYTES
            )));
        }
        let cs = self.cluster_size();
        if size < self.size {
            // Whole clusters past the new end are unmapped; the tail of the last one is
            // zeroed so that growing again shows zeros.
            let from = size.div_ceil(cs) * cs;
            if from < self.size {
                self.zero(from, self.size - from)?;
            }
            if size % cs != 0 && from <= self.size {
                let end = from.min(self.size);
                self.zero(size, end - size)?;
            }
        }
        let need = self.geometry.l1_entries_for(size);
        if need * 8 > MAX_L1_BYTES {
            return Err(ImageError::Unwritable(format!(
                "a virtual size of {size} bytes needs an L1 table above {MAX_L1_BYTES} bytes \
                 with {cs}-byte clusters"
            )));
        }
        if need as usize > self.l1.len() {
            self.l1.resize(need as usize, 0);
            self.l1_changed = true;
        }
        if size != self.size {
            self.size = size;
            self.size_changed = true;
        }
        Ok(())
    }

    /// The L2 entry of guest cluster `gc` (0 where no table maps it).
    fn entry(&mut self, gc: u64) -> Result<u64, ImageError> {
        let per = self.geometry.l2_entries;
        let t = self.table(gc / per)?;
        Ok(t.entries[(gc % per) as usize])
    }

    /// Sets the L2 entry of guest cluster `gc`.
    fn set_entry(&mut self, gc: u64, value: u64) -> Result<(), ImageError> {
        let per = self.geometry.l2_entries;
        let t = self.table(gc / per)?;
        t.entries[(gc % per) as usize] = value;
        t.dirty = true;
        Ok(())
    }

    /// The L2 table for L1 index `index`, read on first use (all zeros where none is mapped).
    fn table(&mut self, index: u64) -> Result<&mut Table, ImageError> {
        if !self.tables.contains_key(&index) {
            self.make_room()?;
            let per = self.geometry.l2_entries as usize;
            let at = self.l1.get(index as usize).copied().unwrap_or(0) & L1E_OFFSET_MASK;
            let entries = if at == 0 {
                vec![0u64; per]
            } else {
                let raw = read_at(&self.file, "L2 table", at, self.cluster_size(), u64::MAX)?;
                raw.chunks_exact(8).map(|b| be_u64(b, 0)).collect()
            };
            self.tables.insert(
                index,
                Table {
                    entries,
                    dirty: false,
                },
            );
            self.order.push_back(index);
        }
        Ok(self.tables.get_mut(&index).expect("inserted above"))
    }

    /// Drops the oldest tables (writing a changed one first) while too many are in memory.
    fn make_room(&mut self) -> Result<(), ImageError> {
        while self.tables.len() >= MAX_CACHED_TABLES {
            let Some(index) = self.order.pop_front() else {
                break;
            };
            if self.tables.get(&index).is_some_and(|t| t.dirty) {
                self.place_table(index)?;
            }
            self.tables.remove(&index);
        }
        Ok(())
    }

    /// Writes the changed table at `index` where the durable generation does not look: in
    /// place if it already sits in a cluster allocated since the last commit, else in a new
    /// one (the old cluster loses the active layer's use). A table that maps nothing is
    /// dropped. COPIED flags are set from the refcounts as they are now.
    fn place_table(&mut self, index: u64) -> Result<(), ImageError> {
        let bits = self.header.cluster_bits;
        let old = self.l1[index as usize] & L1E_OFFSET_MASK;
        let entries = std::mem::take(
            &mut self
                .tables
                .get_mut(&index)
                .expect("placed tables are loaded")
                .entries,
        );
        let result = self.place_entries(old, &entries);
        let t = self
            .tables
            .get_mut(&index)
            .expect("placed tables are loaded");
        t.entries = entries;
        let new = result?;
        t.dirty = false;
        if new != old {
            if old != 0 {
                self.refs.decrement(&self.file, old >> bits)?;
            }
            self.l1[index as usize] = new;
            self.l1_changed = true;
        }
        Ok(())
    }

    /// Writes `entries` (with COPIED flags from the refcounts) for a table whose durable
    /// cluster is `old`; returns where it now is (0: dropped).
    fn place_entries(&mut self, old: u64, entries: &[u64]) -> Result<u64, ImageError> {
        if entries.iter().all(|&e| e == 0) {
            return Ok(0);
        }
        let bits = self.header.cluster_bits;
        let mut raw = Vec::with_capacity(entries.len() * 8);
        for &e in entries {
            let e = match classify_cluster(e, self.geometry).map_err(|p| bad_entry(e, p))? {
                ClusterKind::Normal(h) | ClusterKind::ZeroAlloc(h) => {
                    let plain = e & !QCOW_OFLAG_COPIED;
                    if self.refs.get(&self.file, h >> bits)? == 1 {
                        plain | QCOW_OFLAG_COPIED
                    } else {
                        plain
                    }
                }
                ClusterKind::Compressed { .. } => e & !QCOW_OFLAG_COPIED,
                _ => e & !QCOW_OFLAG_COPIED,
            };
            raw.extend_from_slice(&e.to_be_bytes());
        }
        let at = if old != 0 && self.refs.is_fresh(old >> bits) {
            old
        } else {
            self.refs.allocate(&self.file, 1)?.0 << bits
        };
        write_at(&self.file, "L2 table", &raw, at)?;
        Ok(at | QCOW_OFLAG_COPIED)
    }

    /// The full content of a cluster as `kind` maps it (zeros where nothing is allocated).
    fn read_cluster(&self, kind: ClusterKind) -> Result<Vec<u8>, ImageError> {
        let cs = self.cluster_size() as usize;
        let mut out = vec![0u8; cs];
        match kind {
            ClusterKind::Normal(h) => read_into(&self.file, "data cluster", &mut out, h)?,
            ClusterKind::Compressed { offset, len } => {
                let mut input = vec![0u8; len as usize];
                read_into(&self.file, "compressed cluster", &mut input, offset)?;
                decompress_cluster(self.header.compression_type, &input, &mut out, offset)?;
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain | ClusterKind::ZeroAlloc(_) => {}
        }
        Ok(out)
    }

    /// The active layer drops its use of what `kind` points to.
    fn release(&mut self, kind: ClusterKind) -> Result<(), ImageError> {
        let bits = self.header.cluster_bits;
        match kind {
            ClusterKind::Normal(h) | ClusterKind::ZeroAlloc(h) => {
                self.refs.decrement(&self.file, h >> bits)
            }
            ClusterKind::Compressed { offset, len } => {
                let first = offset >> bits;
                let last = (offset + len - 1) >> bits;
                for c in first..=last {
                    self.refs.decrement(&self.file, c)?;
                }
                Ok(())
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain => Ok(()),
        }
    }

    /// What guest cluster `gc` maps now.
    fn kind(&mut self, gc: u64) -> Result<ClusterKind, ImageError> {
        let e = self.entry(gc)?;
        classify_cluster(e, self.geometry).map_err(|p| bad_entry(e, p))
    }

    /// Writes `buf` at guest `offset` of the active layer.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let end = offset + buf.len() as u64;
        let mut run = Run::default();
        let mut pos = offset;
        while pos < end {
            let gc = pos >> bits;
            let within = pos & (cs - 1);
            let n = (cs - within).min(end - pos);
            let part = &buf[(pos - offset) as usize..][..n as usize];
            let kind = self.kind(gc)?;
            let in_place = match kind {
                ClusterKind::Normal(h) => self.refs.get(&self.file, h >> bits)? == 1,
                _ => false,
            };
            if let (true, ClusterKind::Normal(h)) = (in_place, kind) {
                run.add(
                    &self.file,
                    self.direct.as_ref(),
                    buf,
                    h + within,
                    pos - offset,
                    n,
                )?;
            } else {
                let host = self.refs.allocate(&self.file, 1)?.0 << bits;
                if n == cs {
                    run.add(&self.file, self.direct.as_ref(), buf, host, pos - offset, n)?;
                } else {
                    let mut cluster = self.read_cluster(kind)?;
                    cluster[within as usize..(within + n) as usize].copy_from_slice(part);
                    write_at(&self.file, "data cluster", &cluster, host)?;
                }
                self.set_entry(gc, host | QCOW_OFLAG_COPIED)?;
                self.release(kind)?;
            }
            pos += n;
        }
        run.flush(&self.file, self.direct.as_ref(), buf)?;
        self.data_written = true;
        Ok(())
    }

    /// Maps whole clusters `[offset, offset + len)` of the active layer for a write that the
    /// caller makes itself, into the file, at the host offset returned: where they already
    /// lie in one run that only the active layer uses, or in a new run allocated for them (the
    /// clusters they replace are released). `None`, with nothing changed, when the range is
    /// not whole clusters or cannot be one run: write it with [`Qcow2Writer::write_at`].
    ///
    /// The caller must have written the data before [`Qcow2Writer::commit`], and must not
    /// read or write the range through the writer meanwhile.
    pub fn place(&mut self, offset: u64, len: u64) -> Result<Option<u64>, ImageError> {
        check_range(offset, len, self.size)?;
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        if len == 0 || offset % cs != 0 || len % cs != 0 {
            return Ok(None);
        }
        let (first, n) = (offset >> bits, len >> bits);
        let mut kinds = Vec::with_capacity(n as usize);
        let mut in_place = true;
        for i in 0..n {
            let kind = self.kind(first + i)?;
            let own = match kind {
                ClusterKind::Normal(h) => {
                    self.refs.get(&self.file, h >> bits)? == 1
                        && kinds.first().is_none_or(|&(k, _)| match k {
                            ClusterKind::Normal(h0) => h0 + (i << bits) == h,
                            _ => false,
                        })
                }
                _ => false,
            };
            in_place &= own;
            kinds.push((kind, own));
        }
        if in_place {
            let ClusterKind::Normal(h) = kinds[0].0 else {
                unreachable!("in place means normal clusters")
            };
            self.data_written = true;
            return Ok(Some(h));
        }
        if kinds.iter().any(|&(_, own)| own) {
            return Ok(None);
        }
        let c = self.refs.allocate_run(&self.file, n)?;
        for (i, (kind, _)) in kinds.into_iter().enumerate() {
            let host = (c + i as u64) << bits;
            self.set_entry(first + i as u64, host | QCOW_OFLAG_COPIED)?;
            self.release(kind)?;
        }
        self.data_written = true;
        Ok(Some(c << bits))
    }

    /// Makes `[offset, offset + len)` of the active layer read as zeros: whole clusters are
    /// unmapped (their host clusters freed once no snapshot uses them), parts of clusters
    /// are written with zeros.
    pub fn zero(&mut self, offset: u64, len: u64) -> Result<(), ImageError> {
        check_range(offset, len, self.size)?;
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let per = self.geometry.l2_entries;
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let gc = pos >> bits;
            let within = pos & (cs - 1);
            let n = (cs - within).min(end - pos);
            // A whole table range that nothing maps is skipped at once.
            let index = gc / per;
            if within == 0
                && gc % per == 0
                && !self.tables.contains_key(&index)
                && self.l1.get(index as usize).copied().unwrap_or(0) & L1E_OFFSET_MASK == 0
            {
                pos = ((index + 1) * per * cs).min(end).max(pos + n);
                continue;
            }
            let kind = self.kind(gc)?;
            let whole = within == 0 && (n == cs || pos + n >= self.size);
            match kind {
                ClusterKind::Unallocated | ClusterKind::ZeroPlain => {}
                _ if whole => {
                    self.set_entry(gc, 0)?;
                    self.release(kind)?;
                }
                ClusterKind::ZeroAlloc(_) => {}
                _ => {
                    let zeros = vec![0u8; n as usize];
                    self.write_at(&zeros, pos)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Reads guest bytes of the active layer at `offset` as this writer has them (written or
    /// not yet committed).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> Result<(), ImageError> {
        check_range(offset, buf.len() as u64, self.size)?;
        let cs = self.cluster_size();
        let bits = self.header.cluster_bits;
        let end = offset + buf.len() as u64;
        let mut pos = offset;
        while pos < end {
            let within = pos & (cs - 1);
            let n = (cs - within).min(end - pos);
            let out = &mut buf[(pos - offset) as usize..][..n as usize];
            match self.kind(pos >> bits)? {
                ClusterKind::Normal(h) => read_into(&self.file, "data cluster", out, h + within)?,
                kind @ ClusterKind::Compressed { .. } => {
                    let c = self.read_cluster(kind)?;
                    out.copy_from_slice(&c[within as usize..(within + n) as usize]);
                }
                _ => out.fill(0),
            }
            pos += n;
        }
        Ok(())
    }

    /// Whether anything changed since the last commit.
    pub fn is_dirty(&self) -> bool {
        self.data_written
            || self.l1_changed
            || self.size_changed
            || self.snapshots_changed
            || self.tables.values().any(|t| t.dirty)
    }

    /// Makes everything written so far durable and the image's new state the one its header
    /// names (see the module documentation for the order).
    pub fn commit(&mut self) -> Result<(), ImageError> {
        let mut dirty: Vec<u64> = self
            .tables
            .iter()
            .filter(|(_, t)| t.dirty)
            .map(|(i, _)| *i)
            .collect();
        dirty.sort_unstable();
        for index in dirty {
            self.place_table(index)?;
        }
        let metadata =
            self.l1_changed || self.snapshots_changed || self.size_changed || self.refs.changed();
        if !metadata {
            if self.data_written {
                sync(&self.file)?;
                self.data_written = false;
            }
            return Ok(());
        }
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        if self.l1_changed {
            for i in 0..self.l1.len() {
                let at = self.l1[i] & L1E_OFFSET_MASK;
                self.l1[i] = match at {
                    0 => 0,
                    _ if self.refs.get(&self.file, at >> bits)? == 1 => at | QCOW_OFLAG_COPIED,
                    _ => at,
                };
            }
            let mut raw: Vec<u8> = self.l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            // An empty table takes no cluster (QEMU counts none for it).
            let clusters = (raw.len() as u64).div_ceil(cs);
            raw.resize((clusters * cs) as usize, 0);
            let old = self.l1_place;
            let at = self.relocate(old, clusters)?;
            if clusters > 0 {
                write_at(&self.file, "L1 table", &raw, at)?;
            }
            self.l1_place = Place {
                offset: at,
                clusters,
            };
        }
        if self.snapshots_changed {
            let mut raw = snapshots::encode(&self.snapshots);
            let clusters = (raw.len() as u64).div_ceil(cs);
            let old = self.snapshots_place;
            if old.offset != 0 {
                for i in 0..old.clusters {
                    self.refs.decrement(&self.file, (old.offset >> bits) + i)?;
                }
            }
            let at = if clusters == 0 {
                0
            } else {
                self.refs.allocate_run(&self.file, clusters)? << bits
            };
            raw.resize((clusters * cs) as usize, 0);
            if clusters > 0 {
                write_at(&self.file, "snapshot table", &raw, at)?;
            }
            self.snapshots_place = Place {
                offset: at,
                clusters,
            };
        }
        let reft = self.refs.write_new(&self.file)?;
        let (reft_at, reft_clusters) =
            reft.unwrap_or((self.refs.table_offset, self.refs.table_clusters));
        sync(&self.file)?;
        let mut h = [0u8; 48];
        h[0..8].copy_from_slice(&self.size.to_be_bytes());
        h[12..16].copy_from_slice(&(self.l1.len() as u32).to_be_bytes());
        h[16..24].copy_from_slice(&self.l1_place.offset.to_be_bytes());
        h[24..32].copy_from_slice(&reft_at.to_be_bytes());
        h[32..36].copy_from_slice(&(reft_clusters as u32).to_be_bytes());
        h[36..40].copy_from_slice(&(self.snapshots.len() as u32).to_be_bytes());
        h[40..48].copy_from_slice(&self.snapshots_place.offset.to_be_bytes());
        write_at(&self.file, "header", &h, 24)?;
        sync(&self.file)?;
        self.header.size = self.size;
        self.header.l1_size = self.l1.len() as u32;
        self.header.l1_table_offset = self.l1_place.offset;
        self.header.refcount_table_offset = reft_at;
        self.header.refcount_table_clusters = reft_clusters as u32;
        self.header.nb_snapshots = self.snapshots.len() as u32;
        self.header.snapshots_offset = self.snapshots_place.offset;
        let freed = self.refs.committed();
        discard_runs(&self.file, &freed, bits);
        self.l1_changed = false;
        self.snapshots_changed = false;
        self.size_changed = false;
        self.data_written = false;
        Ok(())
    }

    /// Where a structure of `clusters` clusters now at `old` goes: in place when it was
    /// allocated since the last commit and is large enough, else a new run (the old one
    /// loses its use).
    fn relocate(&mut self, old: Place, clusters: u64) -> Result<u64, ImageError> {
        let bits = self.header.cluster_bits;
        if clusters > 0
            && old.offset != 0
            && old.clusters >= clusters
            && self.refs.is_fresh(old.offset >> bits)
        {
            return Ok(old.offset);
        }
        if old.offset != 0 {
            for i in 0..old.clusters {
                self.refs.decrement(&self.file, (old.offset >> bits) + i)?;
            }
        }
        if clusters == 0 {
            return Ok(0);
        }
        Ok(self.refs.allocate_run(&self.file, clusters)? << bits)
    }

    /// Creates an internal snapshot of the active layer as it is now, recording `meta`
    /// (commits before and after: the snapshot is in the image once this returns).
    pub fn create_snapshot(&mut self, meta: &SnapshotMeta) -> Result<(), ImageError> {
        if meta.id.len() > usize::from(u16::MAX) || meta.name.len() > usize::from(u16::MAX) {
            return Err(ImageError::Unwritable(
                "a snapshot id or name longer than 65535 bytes".into(),
            ));
        }
        if self.snapshots().iter().any(|s| s.id == meta.id) {
            return Err(ImageError::Unwritable(format!(
                "the image already has a snapshot with id '{}'",
                meta.id
            )));
        }
        self.commit()?;
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        let mut raw: Vec<u8> = self
            .l1
            .iter()
            .flat_map(|e| (e & !QCOW_OFLAG_COPIED).to_be_bytes())
            .collect();
        let clusters = (raw.len() as u64).div_ceil(cs);
        raw.resize((clusters * cs) as usize, 0);
        let at = match clusters {
            0 => 0,
            n => self.refs.allocate_run(&self.file, n)? << bits,
        };
        if clusters > 0 {
            write_at(&self.file, "snapshot L1 table", &raw, at)?;
        }
        // The snapshot uses every table and cluster the active layer maps; the active layer
        // moves to copies of its tables, whose COPIED flags say the clusters are shared.
        for index in 0..self.l1.len() as u64 {
            let table = self.l1[index as usize] & L1E_OFFSET_MASK;
            if table == 0 {
                continue;
            }
            self.refs.increment(&self.file, table >> bits)?;
            let entries = self.table(index)?.entries.clone();
            for e in entries {
                let kind = classify_cluster(e, self.geometry).map_err(|p| bad_entry(e, p))?;
                self.use_again(kind)?;
            }
            self.table(index)?.dirty = true;
        }
        self.snapshots
            .push(RawEntry::new(meta, at, self.l1.len() as u32));
        self.snapshots_changed = true;
        self.l1_changed = true;
        self.commit()
    }

    /// One more use of what `kind` points to.
    fn use_again(&mut self, kind: ClusterKind) -> Result<(), ImageError> {
        let bits = self.header.cluster_bits;
        match kind {
            ClusterKind::Normal(h) | ClusterKind::ZeroAlloc(h) => {
                self.refs.increment(&self.file, h >> bits)
            }
            ClusterKind::Compressed { offset, len } => {
                for c in (offset >> bits)..=((offset + len - 1) >> bits) {
                    self.refs.increment(&self.file, c)?;
                }
                Ok(())
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain => Ok(()),
        }
    }

    /// Deletes the snapshots at `indices` (into [`Qcow2Writer::snapshots`]) as `qemu-img
    /// snapshot -d` does, in one commit: the clusters only they used are freed and discarded.
    pub fn delete_snapshots(&mut self, indices: &[usize]) -> Result<(), ImageError> {
        let mut indices = indices.to_vec();
        indices.sort_unstable();
        indices.dedup();
        if let Some(&i) = indices.iter().find(|&&i| i >= self.snapshots.len()) {
            return Err(ImageError::NoSuchSnapshot(format!(
                "#{i} (the image has {})",
                self.snapshots.len()
            )));
        }
        if indices.is_empty() {
            return Ok(());
        }
        self.commit()?;
        let bits = self.header.cluster_bits;
        let cs = self.cluster_size();
        let file_len = self.file_len()?;
        for &i in indices.iter().rev() {
            let entry = self.snapshots.remove(i);
            let (l1_at, l1_size) = (entry.l1_offset(), u64::from(entry.l1_size()));
            let raw = read_at(
                &self.file,
                "snapshot L1 table",
                l1_at,
                l1_size * 8,
                file_len,
            )?;
            for b in raw.chunks_exact(8) {
                let table = be_u64(b, 0) & L1E_OFFSET_MASK;
                if table == 0 {
                    continue;
                }
                let t = read_at(&self.file, "L2 table", table, cs, file_len)?;
                for e in t.chunks_exact(8).map(|b| be_u64(b, 0)) {
                    let kind = classify_cluster(e, self.geometry).map_err(|p| bad_entry(e, p))?;
                    self.release(kind)?;
                }
                self.refs.decrement(&self.file, table >> bits)?;
            }
            for c in 0..(l1_size * 8).div_ceil(cs) {
                self.refs.decrement(&self.file, (l1_at >> bits) + c)?;
            }
        }
        // Clusters the active layer shared with them may be its own now: its tables are
        // written again with COPIED flags that say so.
        for index in 0..self.l1.len() as u64 {
            if self.l1[index as usize] & L1E_OFFSET_MASK != 0 {
                self.table(index)?.dirty = true;
            }
        }
        self.snapshots_changed = true;
        self.l1_changed = true;
        self.commit()
    }

    /// The file's length now.
    fn file_len(&self) -> Result<u64, ImageError> {
        self.file
            .metadata()
            .map(|m| m.len())
            .map_err(|source| ImageError::WriteFailed {
                what: "image",
                op: "stat",
                offset: 0,
                source,
            })
    }
}

/// Data writes gathered into one `pwrite` while their host clusters follow each other.
#[derive(Default)]
struct Run {
    /// Host offset, offset in the caller's buffer, length.
    at: u64,
    from: u64,
    len: u64,
}

impl Run {
    /// Adds `len` bytes of `buf` from `from` to be written at host `at`.
    fn add(
        &mut self,
        file: &File,
        direct: Option<&File>,
        buf: &[u8],
        at: u64,
        from: u64,
        len: u64,
    ) -> Result<(), ImageError> {
        if self.len > 0 && self.at + self.len == at && self.from + self.len == from {
            self.len += len;
            return Ok(());
        }
        self.flush(file, direct, buf)?;
        *self = Run { at, from, len };
        Ok(())
    }

    /// Writes what is gathered: around the page cache when it is aligned for `O_DIRECT`.
    fn flush(&mut self, file: &File, direct: Option<&File>, buf: &[u8]) -> Result<(), ImageError> {
        if self.len > 0 {
            let part = &buf[self.from as usize..(self.from + self.len) as usize];
            let aligned = |v: u64| v % DIRECT_ALIGN == 0;
            let fits = aligned(self.at) && aligned(self.len) && aligned(part.as_ptr() as u64);
            match direct.filter(|_| fits) {
                Some(d) => write_at(d, "data cluster", part, self.at)?,
                None => write_at(file, "data cluster", part, self.at)?,
            }
            self.len = 0;
        }
        Ok(())
    }
}

/// Alignment of offsets, lengths and buffers written with `O_DIRECT` (the largest logical
/// block size of common devices).
const DIRECT_ALIGN: u64 = 4096;

/// Gives runs of freed clusters back to the filesystem.
fn discard_runs(file: &File, clusters: &[u64], bits: u32) {
    let mut i = 0;
    while i < clusters.len() {
        let mut j = i + 1;
        while j < clusters.len() && clusters[j] == clusters[j - 1] + 1 {
            j += 1;
        }
        punch(file, clusters[i] << bits, ((j - i) as u64) << bits);
        i = j;
    }
}

/// An L2 entry the writer cannot follow.
fn bad_entry(entry: u64, problem: crate::error::L2Problem) -> ImageError {
    ImageError::Unwritable(format!("L2 entry {entry:#018x}: {problem}"))
}

/// Refuses what this writer cannot keep consistent, naming it.
fn refuse_unwritable(h: &Header) -> Result<(), ImageError> {
    let refuse = |what: &str| Err(ImageError::Unsupported(format!("writing {what}")));
    if h.is_corrupt() {
        return Err(ImageError::Unwritable(
            "the image is marked corrupt; repair it with qemu-img check -r all".into(),
        ));
    }
    if h.is_dirty() {
        return Err(ImageError::Unwritable(
            "the image is marked dirty (lazy refcounts); repair it with qemu-img check -r all"
                .into(),
        ));
    }
    if h.version < 3 {
        return refuse("a version 2 image (qemu-img amend -o compat=1.1 converts it)");
    }
    if h.extended_l2 {
        return refuse("an image with extended L2 entries");
    }
    if h.backing_file.is_some() {
        return refuse("an image with a backing file");
    }
    if h.bitmaps.is_some() {
        return refuse("an image with persistent bitmaps (qemu-img bitmap --remove drops them)");
    }
    Ok(())
}
