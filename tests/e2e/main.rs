//! End-to-end tests of the blkdelta binary: one test binary, one module per area, and the
//! fixture builders and helpers they share in `common`.
//!
//! Images are built at test time with qemu-img and qemu-io, and qemu's own raw export is the
//! oracle. A test that needs a tool the machine lacks skips loudly, naming it; with
//! `BLKDELTA_REQUIRE_TOOLS=1` (as `.ci/run` sets) it fails instead.

mod common;

mod blockdev;
mod bwlimit;
mod cli;
mod direct;
mod faults;
mod history;
mod live;
mod locks;
mod nbd;
mod prune;
mod qcow2;
mod replica_safety;
mod resume_undo;
mod rough_edges;
mod sources;
mod ssh;
mod sync;
mod trust;
